"""Small, hashable, picklable records that travel between pipeline stages.

Only these records (coordinates, labels, seeds) travel through the Beam and Dask
graphs; pixels go from the slides into the run's tile packs and from the packs into
the mixed buckets, on the workers (see `pipeline.steps.pack`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Mapping

__all__ = [
    "ExampleSpec",
    "MixedExample",
    "PairSpec",
    "SlidePlan",
    "SlideRecord",
    "TileKey",
    "TileRecord",
    "stable_hash",
]


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of `parts` that is the same in every process and on every machine.

    Python's `hash()` is salted per process, so it cannot be used for anything that
    must agree between Beam workers, Dask workers and reruns.

    >>> stable_hash("slide-1", 0, 256, 512) == stable_hash("slide-1", 0, 256, 512)
    True
    >>> stable_hash("a", 1) != stable_hash("a", 2)
    True
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0]


@dataclasses.dataclass(frozen=True, order=True)
class TileKey:
    """Identity of one tile: `level[y:y + size, x:x + size]` of one slide.

    `x` and `y` are the top-left pixel in the chosen level's own pixel grid.
    """

    slide_id: str
    level: int
    x: int
    y: int

    def __str__(self) -> str:
        return f"{self.slide_id}/L{self.level}/x{self.x}/y{self.y}"


@dataclasses.dataclass(frozen=True, order=True)
class TileRecord:
    """A tile that passed tissue filtering; coordinates and labels only, no pixels.

    Attributes:
        key: where the tile is.
        label: class index (into the run's `class_names`).
        group: value of the manifest's group column (e.g. a patient id), or None.
        soft_label: per-class fractions from a label image, or None for the slide label.
    """

    key: TileKey
    label: int
    group: str | None = None
    soft_label: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SlideRecord:
    """One row of the slide manifest.

    Attributes:
        slide_id: unique id of the slide.
        path: local path or fsspec URL of the OME-Zarr (or plain Zarr) store.
        label: class name of the slide.
        label_index: index of `label` in the run's class names.
        group: value of the group column (e.g. patient), or None.
        metadata: the remaining manifest columns, as strings.
        duplicate_of: the id of an earlier row with the same path (the slide is
            planned and packed once, under that id; this row fails as
            ``duplicate_path``), else None.
    """

    slide_id: str
    path: str
    label: str
    label_index: int
    group: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    duplicate_of: str | None = None

    @property
    def metadata_dict(self) -> Mapping[str, str]:
        return dict(self.metadata)


@dataclasses.dataclass(frozen=True)
class SlidePlan:
    """What tiling made of one slide.

    Attributes:
        slide_id: the slide.
        tiles: tiles kept for mixing, sorted by key.
        skipped: reason -> number of tiles rejected (e.g. ``{"background": 12}``).
        failure: slide-level failure reason (then `tiles` is empty), or None.
        message: human-readable detail for `failure`.
        num_channels: channel count of the slide (0 when failed).
        dtype: numpy dtype name of the pixels ("" when failed).
        chunk_shape: (height, width) of the tiled level's chunks.
        chunks_read, bytes_read, requests: what planning fetched from the slide's
            store (metadata, the tissue level and the stain fit's tiles), for the run's
            read accounting.
        stain_fit: with stain normalisation, the JSON of the slide's stain fit
            (`fit.to_dict()` of `softmix_tf.stain`, fitted on a sample of its kept tiles
            at the tiled level, `pipeline.steps.stain.fit_slide`), else None (no kept
            tile).
        content: the slide's content fingerprint when the plan was made
            (`pipeline.io.content`), None when not computed (no staging) or the store
            cannot be listed; strips, buckets and shards made from the slide record it.
        changed: a kept plan was found but the slide's content had changed since, so
            it was made again (a resumed run reports these slides).
    """

    slide_id: str
    tiles: tuple[TileRecord, ...] = ()
    skipped: tuple[tuple[str, int], ...] = ()
    failure: str | None = None
    message: str = ""
    num_channels: int = 0
    dtype: str = ""
    chunk_shape: tuple[int, int] = (0, 0)
    chunks_read: int = 0
    bytes_read: int = 0
    requests: int = 0
    reused: bool = dataclasses.field(default=False, compare=False)
    stain_fit: str | None = dataclasses.field(default=None, compare=False)
    content: str | None = dataclasses.field(default=None, compare=False)
    changed: bool = dataclasses.field(default=False, compare=False)

    @property
    def skipped_dict(self) -> dict[str, int]:
        return dict(self.skipped)

    @property
    def num_tiles_total(self) -> int:
        return len(self.tiles) + sum(count for _, count in self.skipped)


@dataclasses.dataclass(frozen=True, order=True)
class ExampleSpec:
    """One output example, before any pixel is read.

    Attributes:
        example_id: unique, stable id; sorts the records inside a shard.
        a: first source (the anchor tile).
        b: second source (the partner); equals `a` for an original.
        mix_index: 0..num_mixes-1, or -1 for the unmixed original.
        seed: per-example stateless seed for the SoftMix op.
    """

    example_id: str
    a: TileRecord
    b: TileRecord
    mix_index: int
    seed: tuple[int, int]

    @property
    def is_original(self) -> bool:
        return self.mix_index < 0


@dataclasses.dataclass(frozen=True)
class MixedExample:
    """One mixed (or original) example, ready to encode.

    Attributes:
        spec: what was mixed.
        image: numpy array [height, width, channels], the slide's dtype.
        label: float32 [num_classes], `(1 - lam) * y_a + lam * y_b`.
        lam: weight of source b, the mean of the applied mask (0 for originals and
            for examples that `mix_prob` left unmixed).
    """

    spec: ExampleSpec
    image: object  # np.ndarray; typed loosely so this module stays numpy-free
    label: object  # np.ndarray float32 [K]
    lam: float


@dataclasses.dataclass(frozen=True, order=True)
class PairSpec:
    """One output example as pairing emits it: the partner by position, not by record.

    The pairing table knows only per-slide tile counts, so it names the partner `b`
    as `(b_slide, b_index)`, its position in its slide's usable tiles sorted by
    `TileKey`; the reader resolves it to a `TileRecord` (see `ExampleSpec`).

    Attributes:
        example_id: unique, stable id; sorts the records inside a shard.
        a: first source (the anchor tile).
        a_index: position of `a` among its slide's usable tiles (sorted by key).
        b_slide: slide of the partner; `a`'s slide for an original.
        b_index: position of the partner among `b_slide`'s usable tiles; equals
            `a_index` for an original.
        mix_index: 0..num_mixes-1, or -1 for the unmixed original.
        seed: per-example stateless seed for the SoftMix op.
    """

    example_id: str
    a: TileRecord
    a_index: int
    b_slide: str
    b_index: int
    mix_index: int
    seed: tuple[int, int]

    @property
    def is_original(self) -> bool:
        return self.mix_index < 0
