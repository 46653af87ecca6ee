"""Deterministic pairing of tiles: which tile is mixed with which, and with what seed.

Everything here is a pure function of `(config.seed, the set of usable tile records)`.
The order in which tiles arrive, how they are bundled, and how many workers run do not
change the result, so Beam, Dask and reruns all produce the same `ExampleSpec`s.

Randomness comes only from `stable_hash` of `(seed, purpose, tile key, mix_index)`;
neither Python's salted `hash()` nor any global RNG is used.

How a partner is drawn (O(K log N) per draw, K = number of classes):

- The index keeps every tile in buckets (one over all tiles, one per class), each
  sorted by `(block, key)`. A tile's *block* is its group when the group rule is on
  and the tile has a group, else the tile alone. The tiles a partner must not come
  from (the anchor itself and, with the group rule, its whole group) are therefore
  one contiguous run `[lo, hi)` of each bucket, found by bisection.
- A uniform draw over the `m = n - (hi - lo)` eligible tiles picks `r` in `[0, m)`
  and maps it around the run: `r if r < lo else r + (hi - lo)`.

Policies:

- ``random``: uniform over every eligible tile (never the anchor itself).
- ``cross-class``: uniform over the eligible tiles of the *other* classes (the class
  is drawn with weight = its eligible count, then a tile within it).
- ``balanced``: see `balanced_class_weights`.

Tiles with no eligible partner (a single tile, or every other tile in the anchor's
group) get no mixed examples; with `keep_originals` they still get their original.
A tile that ends up with no example at all is counted by the accounting as skipped
with reason ``"no_partner"`` (see `pipeline._output.Accounting.from_tile`).

Example ids are ``"<slide>/L<level>/x<x>/y<y>#m<mix_index>"`` for mixed examples and
``"...#orig"`` for originals; they are unique and sort the records inside a shard.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

from ._keys import ExampleSpec, TileKey, TileRecord, stable_hash
from .config import MixConfig

__all__ = [
    "PairingIndex",
    "balanced_class_weights",
    "example_id",
    "pair_tiles",
]

_TWO_64 = 1 << 64
_SEED_BITS_SHIFT = 2  # 64-bit hash >> 2 < 2**62: safe as a non-negative int64


def example_id(key: TileKey, mix_index: int) -> str:
    """The stable id of the example whose source `a` is `key`.

    >>> example_id(TileKey("s1", 0, 256, 512), 0)
    's1/L0/x256/y512#m0'
    >>> example_id(TileKey("s1", 0, 256, 512), -1)
    's1/L0/x256/y512#orig'
    """
    return f"{key}#orig" if mix_index < 0 else f"{key}#m{mix_index}"


def balanced_class_weights(class_counts: Sequence[int]) -> list[float]:
    """Partner-class weights that make the mixed labels' class histogram even.

    Every used tile is source `a` of the same number of examples, so class `c` is the
    anchor class of a share `p_c = n_c / N` of the examples. With `lam` the weight of
    source `b` (Beta(alpha, alpha) is symmetric, so E[lam] = 1/2), the expected mass
    of class `c` in the mixed labels is

        h_c = (1 - E[lam]) p_c + E[lam] q_c = (p_c + q_c) / 2,

    where `q_c` is the probability that the partner comes from class `c`. An even
    histogram `h_c = 1/K` needs `q_c = 2/K - p_c`. That is a valid distribution
    unless some class already exceeds `2/K` of the anchors; then the best we can do
    is `q_c ∝ max(0, 2/K - p_c)`, i.e. never draw partners from such a class and
    share the rest as prescribed. If every weight is 0 (only possible when K = 1),
    fall back to `q_c ∝ n_c`, which is plain random pairing.

    Args:
        class_counts: number of usable tiles per class, length K.

    Returns:
        K non-negative weights summing to 1 (all 0 when there are no tiles).

    >>> balanced_class_weights([90, 10])
    [0.1, 0.9]
    >>> balanced_class_weights([50, 50])
    [0.5, 0.5]
    """
    total = sum(class_counts)
    num_classes = len(class_counts)
    if total == 0 or num_classes == 0:
        return [0.0] * num_classes
    raw = [max(0.0, 2.0 / num_classes - n / total) for n in class_counts]
    if sum(raw) <= 0.0:
        raw = [float(n) for n in class_counts]
    norm = sum(raw)
    return [round(w / norm, 15) for w in raw]


def _block_id(tile: TileRecord, use_groups: bool) -> tuple[int, Any]:
    # (0, group) and (1, key) never compare a group with a key: the first items differ.
    if use_groups and tile.group is not None:
        return (0, tile.group)
    return (1, tile.key)


def _draw_u64(seed: int, purpose: str, key: TileKey, mix_index: int) -> int:
    return stable_hash("softmix.pairing", seed, purpose, key.slide_id, key.level, key.x,
                       key.y, mix_index)


class _Bucket:
    """Tiles sorted by (block, key) with the block ids kept apart for bisection."""

    __slots__ = ("blocks", "tiles")

    def __init__(self, entries: Iterable[tuple[tuple[int, Any], TileRecord]]):
        entries = sorted(entries, key=lambda entry: (entry[0], entry[1].key))
        self.blocks = [block for block, _ in entries]
        self.tiles = [tile for _, tile in entries]

    def __len__(self) -> int:
        return len(self.tiles)

    def excluded(self, block: tuple[int, Any]) -> tuple[int, int]:
        return bisect.bisect_left(self.blocks, block), bisect.bisect_right(self.blocks, block)

    def draw(self, excluded: tuple[int, int], u64: int) -> TileRecord | None:
        lo, hi = excluded
        eligible = len(self.tiles) - (hi - lo)
        if eligible <= 0:
            return None
        r = (u64 * eligible) >> 64
        return self.tiles[r if r < lo else r + (hi - lo)]


class PairingIndex:
    """All usable tiles of a run, indexed for deterministic partner draws.

    Build it once from every usable tile (coordinates and labels only, so ~10^6 tiles
    fit in memory), then call `examples_for(tile)` for each tile, on any worker, in
    any order: a Beam DoFn takes the index as a side input, a Dask task receives it
    as an argument. The input order and duplicates of identical records do not
    matter; the index sorts internally.

    Args:
        tiles: every usable `TileRecord` of the run (all slides).
        config: the run's `MixConfig` (`seed`, `pairing`, `group_column`,
            `num_mixes`, `keep_originals` are used).
        num_classes: K, the number of class names of the run.

    Raises:
        ValueError: a tile label outside `[0, num_classes)`, two different records
            with the same key, or `cross-class` pairing when all tiles share one class.
    """

    def __init__(self, tiles: Iterable[TileRecord], config: MixConfig, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
        self.config = config
        self.num_classes = num_classes
        self._use_groups = config.group_column is not None
        unique = sorted(set(tiles))
        for previous, current in zip(unique, unique[1:], strict=False):
            if previous.key == current.key:
                raise ValueError(
                    "Each tile key must appear in one record only. Received two records "
                    f"for key={current.key}: {previous!r} and {current!r}."
                )
        for tile in unique:
            if not 0 <= tile.label < num_classes:
                raise ValueError(
                    f"Tile label must be a class index in [0, {num_classes}). "
                    f"Received: label={tile.label} for tile {tile.key}."
                )
        self._num_tiles = len(unique)
        entries = [(_block_id(t, self._use_groups), t) for t in unique]
        self._all = _Bucket(entries)
        self._by_class = [_Bucket(e for e in entries if e[1].label == c)
                          for c in range(num_classes)]
        self.class_counts = [len(b) for b in self._by_class]
        self.partner_class_weights = balanced_class_weights(self.class_counts)
        if config.pairing == "cross-class" and config.num_mixes > 0 and unique:
            present = [c for c, n in enumerate(self.class_counts) if n > 0]
            if len(present) < 2:
                raise ValueError(
                    "`pairing='cross-class'` needs usable tiles of at least two classes. "
                    f"Received: tiles of class index {present} only "
                    f"(class_counts={self.class_counts}). Add slides of another class or "
                    "use --pairing random."
                )

    def __len__(self) -> int:
        return self._num_tiles

    @classmethod
    def from_chunks(
        cls, chunks: Iterable[Iterable[TileRecord]], config: MixConfig, num_classes: int
    ) -> PairingIndex:
        """Build the index from several lists of tiles (e.g. one per slide)."""
        return cls((t for chunk in chunks for t in chunk), config, num_classes)

    def partner_for(self, tile: TileRecord, mix_index: int) -> TileRecord | None:
        """The partner (source `b`) of `tile`'s mix `mix_index`, or None if none is eligible."""
        block = _block_id(tile, self._use_groups)
        return self._partner(tile, mix_index, block)

    def _partner(
        self, tile: TileRecord, mix_index: int, block: tuple[int, Any]
    ) -> TileRecord | None:
        seed = self.config.seed
        policy = self.config.pairing
        if policy == "random":
            return self._all.draw(self._all.excluded(block), _draw_u64(seed, "tile", tile.key,
                                                                       mix_index))
        excluded = [b.excluded(block) for b in self._by_class]
        eligible = [len(b) - (hi - lo) for b, (lo, hi) in zip(self._by_class, excluded,
                                                               strict=True)]
        if policy == "cross-class":
            weights = [float(n) if c != tile.label else 0.0 for c, n in enumerate(eligible)]
        else:  # balanced
            weights = [w if n > 0 else 0.0
                       for w, n in zip(self.partner_class_weights, eligible, strict=True)]
            if sum(weights) <= 0.0:
                weights = [float(n) for n in eligible]
        total = sum(weights)
        if total <= 0.0:
            return None
        u = (_draw_u64(seed, "class", tile.key, mix_index) >> 11) / float(1 << 53) * total
        chosen = max(c for c, w in enumerate(weights) if w > 0)  # guards float round-off
        cumulative = 0.0
        for c, w in enumerate(weights):
            cumulative += w
            if w > 0 and u < cumulative:
                chosen = c
                break
        return self._by_class[chosen].draw(
            excluded[chosen], _draw_u64(seed, "tile", tile.key, mix_index)
        )

    def op_seed(self, tile: TileRecord, mix_index: int) -> tuple[int, int]:
        """The stateless seed of an example: two ints in `[0, 2**62)`."""
        seed = self.config.seed
        key = tile.key
        parts = ("softmix.seed", seed, key.slide_id, key.level, key.x, key.y, mix_index)
        return (stable_hash(*parts, 0) >> _SEED_BITS_SHIFT,
                stable_hash(*parts, 1) >> _SEED_BITS_SHIFT)

    def examples_for(self, tile: TileRecord) -> list[ExampleSpec]:
        """Every example whose source `a` is `tile`, sorted by example id.

        Returns `num_mixes` mixed examples (`mix_index` 0..n-1, skipping draws with no
        eligible partner) plus, with `keep_originals`, the original (`mix_index` -1,
        `b == a`). An empty list means the tile has no eligible partner and originals
        are off: count it as skipped with reason ``"no_partner"``.
        """
        block = _block_id(tile, self._use_groups)
        specs = []
        if self.config.keep_originals:
            specs.append(ExampleSpec(example_id(tile.key, -1), tile, tile, -1,
                                     self.op_seed(tile, -1)))
        for mix_index in range(self.config.num_mixes):
            partner = self._partner(tile, mix_index, block)
            if partner is not None:
                specs.append(ExampleSpec(example_id(tile.key, mix_index), tile, partner,
                                         mix_index, self.op_seed(tile, mix_index)))
        specs.sort()
        return specs

    def tiles(self) -> list[TileRecord]:
        """Every indexed tile, sorted by key."""
        return sorted(self._all.tiles, key=lambda t: t.key)


def pair_tiles(
    tiles: Iterable[TileRecord], config: MixConfig, num_classes: int
) -> list[ExampleSpec]:
    """All examples of a run, sorted by example id (the eager reference of the engines).

    Args:
        tiles: every usable tile, in any order.
        config: the run's `MixConfig`.
        num_classes: K.

    Returns:
        `ExampleSpec`s sorted by `example_id`.

    >>> from pipeline.config import MixConfig
    >>> tiles = [TileRecord(TileKey("s", 0, x, 0), label=0) for x in (0, 256)]
    >>> [(e.example_id, str(e.b.key)) for e in pair_tiles(tiles, MixConfig(), 1)]
    [('s/L0/x0/y0#m0', 's/L0/x256/y0'), ('s/L0/x256/y0#m0', 's/L0/x0/y0')]
    """
    index = PairingIndex(tiles, config, num_classes)
    specs = [spec for tile in index.tiles() for spec in index.examples_for(tile)]
    specs.sort()
    return specs
