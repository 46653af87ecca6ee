"""Eager reference implementations the tests compare the pipeline's steps against."""

from __future__ import annotations

import collections
from collections.abc import Iterable

from pipeline.config import MixConfig
from pipeline.records import ExampleSpec, TileRecord
from pipeline.steps.pair import PairingTable, SlideCounts

__all__ = ["pair_tiles"]


def pair_tiles(
    tiles: Iterable[TileRecord], config: MixConfig, num_classes: int
) -> list[ExampleSpec]:
    """All examples of a run, sorted by example id (the eager reference the tests
    check the staged pairing and the engines against).

    Groups the tiles by slide, numbers each slide's tiles in key order, builds the
    `PairingTable` from their counts and resolves each partner to its `TileRecord`.

    Args:
        tiles: every usable tile, in any order (identical duplicates are ignored).
        config: the run's `MixConfig`.
        num_classes: K.

    Returns:
        `ExampleSpec`s sorted by `example_id`.

    Raises:
        ValueError: two different records with the same key, a label outside
            `[0, num_classes)`, tiles of one slide with different labels or groups,
            or what `PairingTable` raises.
    """
    unique = sorted(set(tiles))
    for previous, current in zip(unique, unique[1:], strict=False):
        if previous.key == current.key:
            raise ValueError(
                "Each tile key must appear in one record only. Received two records "
                f"for key={current.key}: {previous!r} and {current!r}."
            )
    by_slide: dict[str, list[TileRecord]] = collections.defaultdict(list)
    for tile in unique:  # sorted by key, so each slide's list is in key order
        if not 0 <= tile.label < num_classes:
            raise ValueError(
                f"Tile label must be a class index in [0, {num_classes}). "
                f"Received: label={tile.label} for tile {tile.key}."
            )
        by_slide[tile.key.slide_id].append(tile)
    counts = []
    for slide_id, slide_tiles in by_slide.items():
        first = slide_tiles[0]
        for tile in slide_tiles:
            if (tile.label, tile.group) != (first.label, first.group):
                raise ValueError(
                    f"Every tile of a slide must have the slide's label and group. Received "
                    f"label={first.label}, group={first.group!r} for tile {first.key} but "
                    f"label={tile.label}, group={tile.group!r} for tile {tile.key}."
                )
        counts.append(SlideCounts(slide_id, first.label, first.group, len(slide_tiles)))
    table = PairingTable(counts, config, num_classes)
    specs = []
    for slide_tiles in by_slide.values():
        for index, tile in enumerate(slide_tiles):
            for spec in table.examples_for(tile, index):
                b = tile if spec.is_original else by_slide[spec.b_slide][spec.b_index]
                specs.append(ExampleSpec(spec.example_id, tile, b, spec.mix_index, spec.seed))
    specs.sort()
    return specs
