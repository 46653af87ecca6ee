"""Frozen, validated settings of an offline SoftMix run.

The CLI turns flags into these; the Beam and Dask engines take the same objects, so
one concept has one name everywhere (`softness` <-> `--softness`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

__all__ = [
    "PAIRING_POLICIES",
    "JobConfig",
    "MixConfig",
    "OpConfig",
    "OutputConfig",
    "PairingConfig",
    "STAIN_FIT_TILES",
    "STAIN_NORMS",
    "TISSUE_MODES",
    "TileConfig",
    "check_count",
    "parse_grid",
]

PAIRING_POLICIES = ("random", "cross-class", "balanced")
# `pipeline.steps.plan.tissue_mask(mode=...)`: what the tissue threshold is computed on.
TISSUE_MODES = ("auto", "saturation", "intensity", "darkness")
# `softmix_tf.stain` methods the job can normalise tiles with (SPEC section 4c).
STAIN_NORMS = ("none", "reinhard", "macenko")
# Tiles a slide's stain fit reads by default, and at most (each up to tile_size^2 pixels;
# `pipeline.steps.stain.fit_slide` strides them down to 4 Mpx).
STAIN_FIT_TILES = 32
MAX_STAIN_FIT_TILES = 1024
# A stride below tile_size / STRIDE_WARN_RATIO makes each pixel part of more than
# STRIDE_WARN_RATIO**2 tiles: the tile count (and the output) explodes.
STRIDE_WARN_RATIO = 8
ON_ERROR = ("skip", "fail")
COMPRESSIONS = (None, "GZIP")
# Upper bounds of the count options (issue 15): beyond them a run only heads for an
# absurd allocation or millions of files. Checked here, so the CLI, `stream_dataset`
# and the Python API all refuse them with the same message.
MAX_NUM_SHARDS = 100_000
MAX_NUM_MIXES = 64
MAX_BATCH_SIZE = 4096
MAX_TILE_SIZE = 8192
MAX_READ_CACHE_MB = 65536.0
MAX_WORKERS = 256  # local worker processes (or threads per worker, or reading threads)


def check_count(name: str, value: object, high: float, fix: str, *, low: float = 1,
                integer: bool = True) -> None:
    """Refuse a count option outside ``[low, high]`` (or not an int), naming the option,
    the allowed range and the fix.

    >>> check_count("num_mixes", 10**9, MAX_NUM_MIXES, "Use fewer.")
    Traceback (most recent call last):
    ...
    ValueError: `num_mixes` must be in [1, 64]. Received: num_mixes=1000000000. Use fewer.
    """
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        shown = f"{high:g}" if isinstance(high, float) else f"{high}"
        raise ValueError(f"`{name}` must be in [{low:g}, {shown}]. "
                         f"Received: {name}={value!r}. {fix}")


def parse_grid(value: int | str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Parse a grid given as ``4``, ``"4"``, ``"4x6"`` or ``(4, 6)`` into ``(rows, cols)``.

    >>> parse_grid("4x6")
    (4, 6)
    >>> parse_grid(3)
    (3, 3)
    """
    if isinstance(value, str):
        parts = value.lower().replace(",", "x").split("x")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
    elif isinstance(value, int):
        numbers = [value]
    else:
        numbers = [int(v) for v in value]
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or min(numbers) < 1:
        raise ValueError(
            "`grid` must be a positive int or two of them, such as 4, '4x6' or (4, 6). "
            f"Received: grid={value!r}"
        )
    return (numbers[0], numbers[1])


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """How slides are cut into tiles.

    Attributes:
        tile_size: tile side in pixels (tiles are square), in [1, 8192].
        stride: step between tiles in pixels; defaults to `tile_size` (no overlap).
        level: pyramid level index to tile; used when `mpp` is None.
        mpp: target microns per pixel; picks the nearest level (overrides `level`).
        min_tissue: minimum tissue fraction in [0, 1] for a tile to be kept.
        tissue_level: level on which the tissue mask is computed; None = the
            lowest-resolution level.
        label_image: name of an OME-NGFF label image under the slide's ``labels/``
            whose per-tile class fractions become the tile's soft label; None = the
            slide-level label only.
        tissue_mode: what the tissue mask thresholds (`pipeline.steps.plan.tissue_mask`):
            "auto" (saturation for RGB(A), intensity otherwise), "saturation",
            "intensity" (bright = tissue, fluorescence) or "darkness" (dark = tissue,
            greyscale brightfield).
        stain_norm: "none", "reinhard" or "macenko": normalise every tile's stain
            before mixing (`pipeline.steps.stain`), from a fit of its slide's tissue
            (on a sample of its kept tiles, at the tiled level) toward `stain_target`.
            Needs RGB uint8 slides.
        stain_target: the fit tiles are normalised toward: "builtin" (the H&E
            reference of `softmix_tf.stain.builtin_reference`), a slide id of the
            manifest (that slide's fit), or the path of a fit JSON written from
            `fit.to_dict()`. Only with `stain_norm` other than "none".
        stain_fit_tiles: how many of a slide's kept tiles (a tissue-weighted, fixed
            sample) its stain fit reads, in 1..MAX_STAIN_FIT_TILES. Only with
            `stain_norm` other than "none".
    """

    tile_size: int = 256
    stride: int | None = None
    level: int = 0
    mpp: float | None = None
    min_tissue: float = 0.5
    tissue_level: int | None = None
    label_image: str | None = None
    tissue_mode: str = "auto"
    stain_norm: str = "none"
    stain_target: str = "builtin"
    stain_fit_tiles: int = STAIN_FIT_TILES

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ValueError(f"`tile_size` must be >= 1. Received: tile_size={self.tile_size}")
        check_count("tile_size", self.tile_size, MAX_TILE_SIZE,
                    "Tiles are held in memory whole, a batch at a time; use 224-1024 px "
                    "tiles (the size a model takes) and --level/--mpp for coarser views.")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"`stride` must be >= 1. Received: stride={self.stride}")
        if self.level < 0:
            raise ValueError(f"`level` must be >= 0. Received: level={self.level}")
        if self.mpp is not None and not 0 < self.mpp < math.inf:
            raise ValueError(f"`mpp` must be finite and > 0. Received: mpp={self.mpp}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(
                f"`min_tissue` must be in [0, 1]. Received: min_tissue={self.min_tissue}"
            )
        if self.tissue_level is not None and self.tissue_level < 0:
            raise ValueError(
                f"`tissue_level` must be >= 0. Received: tissue_level={self.tissue_level}"
            )
        if self.label_image is not None and not self.label_image:
            raise ValueError("`label_image` must be a label name or None. Received: ''")
        if self.tissue_mode not in TISSUE_MODES:
            raise ValueError(
                f"`tissue_mode` must be one of {TISSUE_MODES}. "
                f"Received: tissue_mode={self.tissue_mode!r}"
            )
        if self.stain_norm not in STAIN_NORMS:
            raise ValueError(
                f"`stain_norm` must be one of {STAIN_NORMS}. "
                f"Received: stain_norm={self.stain_norm!r}"
            )
        if not isinstance(self.stain_target, str) or not self.stain_target.strip():
            raise ValueError(
                "`stain_target` must be 'builtin', a slide id of the manifest or the path of "
                f"a stain fit JSON. Received: stain_target={self.stain_target!r}"
            )
        if self.stain_norm == "none" and self.stain_target != "builtin":
            raise ValueError(
                f"`stain_target` ({self.stain_target!r}) needs stain normalisation: pass "
                "stain_norm='macenko' or 'reinhard' (--stain-norm), or drop the target."
            )
        tiles = self.stain_fit_tiles
        if isinstance(tiles, bool) or not isinstance(tiles, int) or not (
            1 <= tiles <= MAX_STAIN_FIT_TILES
        ):
            raise ValueError(
                f"`stain_fit_tiles` must be an int in 1..{MAX_STAIN_FIT_TILES} (tiles a "
                f"slide's stain fit reads). Received: stain_fit_tiles={tiles!r}"
            )
        if self.stain_norm == "none" and tiles != STAIN_FIT_TILES:
            raise ValueError(
                f"`stain_fit_tiles` ({tiles}) needs stain normalisation: pass "
                "stain_norm='macenko' or 'reinhard' (--stain-norm), or drop it."
            )

    @property
    def step(self) -> int:
        return self.stride if self.stride is not None else self.tile_size

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not meant (printed, not raised).

        >>> TileConfig(tile_size=256, stride=1).warnings()[0][:40]
        '`stride` 1 is far below the tile size 25'
        >>> TileConfig().warnings()
        []
        """
        out = []
        if self.step * STRIDE_WARN_RATIO < self.tile_size:
            per_pixel = (self.tile_size / self.step) ** 2
            out.append(
                f"`stride` {self.step} is far below the tile size {self.tile_size}: every "
                f"pixel lies in about {per_pixel:,.0f} tiles, so the tile count (and the "
                f"output) is about {per_pixel:,.0f}x that of non-overlapping tiles. Use a "
                f"stride of at least {max(1, self.tile_size // STRIDE_WARN_RATIO)} (or the "
                "tile size) unless this is meant."
            )
        return out


@dataclasses.dataclass(frozen=True)
class PairingConfig:
    """Which tiles are paired, how often, and with what seed (`pipeline.steps.pair`).

    Attributes:
        pairing: "random", "cross-class" or "balanced".
        group_column: manifest column whose equal values are never paired (e.g. a
            patient id), or None.
        num_mixes: mixed examples per used tile (tile is source `a` of each), in
            [0, 64].
        keep_originals: also write each used tile unmixed (lam = 0).
        seed: global seed; every per-example seed is a hash of it and the tile key.
    """

    pairing: str = "random"
    group_column: str | None = None
    num_mixes: int = 1
    keep_originals: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pairing not in PAIRING_POLICIES:
            raise ValueError(
                f"`pairing` must be one of {PAIRING_POLICIES}. Received: pairing={self.pairing!r}"
            )
        if self.num_mixes < 0:
            raise ValueError(f"`num_mixes` must be >= 0. Received: num_mixes={self.num_mixes}")
        check_count("num_mixes", self.num_mixes, MAX_NUM_MIXES,
                    "For more examples per slide use more tiles (a smaller stride), or "
                    "another seed into another output.", low=0)
        if self.num_mixes == 0 and not self.keep_originals:
            raise ValueError(
                "`num_mixes=0` without `keep_originals` would write nothing. "
                "Use num_mixes >= 1 or turn keep_originals on."
            )


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """How a pair is mixed: the SoftMix op's settings (SPEC section 2, `pipeline.steps.mix`).

    Attributes:
        grid: (rows, cols) of the SoftMix cell grid.
        alpha: Beta(alpha, alpha) parameter of the mixed proportion, > 0.
        softness: transition width as a fraction of the smallest cell side, in [0, 1].
        ramp: "cosine" or "linear".
        mix_prob: probability that an example is mixed at all.
        batch_size: examples per call of the TensorFlow op, in [1, 4096] (never
            changes a pixel).
    """

    grid: tuple[int, int] = (4, 4)
    alpha: float = 1.0
    softness: float = 0.5
    ramp: str = "cosine"
    mix_prob: float = 1.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", parse_grid(self.grid))
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"`alpha` must be finite and > 0. Received: alpha={self.alpha}")
        if not 0.0 <= self.softness <= 1.0:
            raise ValueError(f"`softness` must be in [0, 1]. Received: softness={self.softness}")
        if self.ramp not in ("cosine", "linear"):
            raise ValueError(
                f"`ramp` must be 'cosine' or 'linear'. Received: ramp={self.ramp!r}"
            )
        if not 0.0 <= self.mix_prob <= 1.0:
            raise ValueError(f"`mix_prob` must be in [0, 1]. Received: mix_prob={self.mix_prob}")
        if self.batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={self.batch_size}")
        check_count("batch_size", self.batch_size, MAX_BATCH_SIZE,
                    "It is only the examples per op call (it never changes the output); "
                    "the default 32 is enough.")


_UNSET: Any = object()
# The flat names of `MixConfig` (the CLI flags and `manifest.json`'s params keep them,
# in this order), each a field of `OpConfig` or `PairingConfig`.
MIX_FIELDS = ("grid", "alpha", "softness", "ramp", "mix_prob", "pairing", "group_column",
              "num_mixes", "keep_originals", "seed", "batch_size")


@dataclasses.dataclass(frozen=True, init=False)
class MixConfig:
    """How tiles are paired (`pair`: `PairingConfig`) and mixed (`op`: `OpConfig`).

    Built from flat keywords, one per CLI flag (``MixConfig(grid=4, seed=7)``; the
    defaults are those of the two parts), or from the parts
    (``MixConfig(pair=..., op=...)``; flat keywords then override single settings).
    Every setting reads flat too (``mix.seed`` is ``mix.pair.seed``).
    """

    pair: PairingConfig
    op: OpConfig

    def __init__(self, grid: int | str | tuple[int, int] = _UNSET, alpha: float = _UNSET,
                 softness: float = _UNSET, ramp: str = _UNSET, mix_prob: float = _UNSET,
                 pairing: str = _UNSET, group_column: str | None = _UNSET,
                 num_mixes: int = _UNSET, keep_originals: bool = _UNSET, seed: int = _UNSET,
                 batch_size: int = _UNSET, *, pair: PairingConfig | None = None,
                 op: OpConfig | None = None):
        given = {k: v for k, v in locals().items() if k in MIX_FIELDS and v is not _UNSET}
        op_names = {f.name for f in dataclasses.fields(OpConfig)}
        op_changes = {k: v for k, v in given.items() if k in op_names}
        pair_changes = {k: v for k, v in given.items() if k not in op_names}
        object.__setattr__(self, "op", dataclasses.replace(op or OpConfig(), **op_changes))
        object.__setattr__(self, "pair",
                           dataclasses.replace(pair or PairingConfig(), **pair_changes))

    # The flat names (CLI flags, manifest params): each reads its part's setting.

    @property
    def grid(self) -> tuple[int, int]:
        return self.op.grid

    @property
    def alpha(self) -> float:
        return self.op.alpha

    @property
    def softness(self) -> float:
        return self.op.softness

    @property
    def ramp(self) -> str:
        return self.op.ramp

    @property
    def mix_prob(self) -> float:
        return self.op.mix_prob

    @property
    def batch_size(self) -> int:
        return self.op.batch_size

    @property
    def pairing(self) -> str:
        return self.pair.pairing

    @property
    def group_column(self) -> str | None:
        return self.pair.group_column

    @property
    def num_mixes(self) -> int:
        return self.pair.num_mixes

    @property
    def keep_originals(self) -> bool:
        return self.pair.keep_originals

    @property
    def seed(self) -> int:
        return self.pair.seed

    def to_dict(self) -> dict[str, Any]:
        """The flat settings in `MIX_FIELDS` order (`manifest.json`'s ``params.mix``)."""
        return {name: getattr(self, name) for name in MIX_FIELDS}


@dataclasses.dataclass(frozen=True)
class OutputConfig:
    """Where and how the shards are written.

    Attributes:
        out_dir: output directory (local path or fsspec URL).
        name: dataset name; shards are `<name>-00000-of-00016.tfrecord`.
        num_shards: number of shards, in [1, 100000]; None = derived from
            `shard_size_mb` (never more than the examples). More shards than examples
            write empty shards, with a warning in the manifest and the summary.
        shard_size_mb: target shard size used when `num_shards` is None.
        compression: None or "GZIP".
        overwrite: replace an existing dataset in `out_dir`.
        on_error: "skip" (count bad slides/tiles and go on) or "fail".
        resume: continue an interrupted run in `out_dir` (same options, seed, software
            and manifest), keeping its verified plans, packs and shards.
        storage_options: fsspec options (JSON object text) for every filesystem the run
            opens: slides, manifest and `out_dir`; flat, or one object per protocol
            (``{"s3": {...}, "gs": {...}}``), see `pipeline.io.storage`. It travels to
            the workers with the config; it is never written into the manifest.
    """

    out_dir: str
    name: str = "softmix"
    num_shards: int | None = None
    shard_size_mb: float = 100.0
    compression: str | None = None
    overwrite: bool = False
    on_error: str = "skip"
    resume: bool = False
    storage_options: str | None = None

    def __post_init__(self) -> None:
        if self.storage_options is not None and not isinstance(self.storage_options, str):
            import json

            object.__setattr__(self, "storage_options",
                               json.dumps(self.storage_options, sort_keys=True))
        if self.storage_options:
            from .io.storage import parse_options

            parse_options(self.storage_options)  # a JSON object, or a clear error
        if self.overwrite and self.resume:
            raise ValueError(
                "`overwrite` and `resume` exclude each other: resume continues the "
                "interrupted run, overwrite discards it. Pass one of them.")
        if self.compression is not None:
            object.__setattr__(self, "compression", self.compression.upper())
            if self.compression in ("NONE", ""):
                object.__setattr__(self, "compression", None)
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                "`compression` must be None or 'GZIP'. "
                f"Received: compression={self.compression!r}"
            )
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"`num_shards` must be >= 1. Received: num_shards={self.num_shards}")
        if self.num_shards is not None:
            check_count("num_shards", self.num_shards, MAX_NUM_SHARDS,
                        "Use fewer shards, or leave num_shards unset (--shard-size-mb then "
                        "sizes them, never more shards than examples).")
        if not 0 < self.shard_size_mb < math.inf:
            raise ValueError(
                "`shard_size_mb` must be finite and > 0. "
                f"Received: shard_size_mb={self.shard_size_mb}"
            )
        if self.on_error not in ON_ERROR:
            raise ValueError(
                f"`on_error` must be 'skip' or 'fail'. Received: on_error={self.on_error!r}"
            )
        if not self.name or "/" in self.name:
            raise ValueError(
                f"`name` must be a non-empty file-name prefix. Received: name={self.name!r}"
            )


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything one offline run needs; the same object drives Beam and Dask.

    Attributes:
        manifest: path or URL of the slide manifest (CSV or Parquet).
        tile: how slides are tiled.
        mix: how tiles are paired and mixed.
        output: where and how shards are written.
        class_names: explicit class order; None = sorted distinct manifest labels.
        read_cache_mb: decoded slide pixels one reading task holds at once (MiB),
            in (0, 65536].
    """

    manifest: str
    tile: TileConfig
    mix: MixConfig
    output: OutputConfig
    class_names: tuple[str, ...] | None = None
    read_cache_mb: float = 256.0

    def __post_init__(self) -> None:
        if not 0 < self.read_cache_mb < math.inf:
            raise ValueError("`read_cache_mb` must be finite and > 0. "
                             f"Received: read_cache_mb={self.read_cache_mb}")
        check_count("read_cache_mb", self.read_cache_mb, MAX_READ_CACHE_MB,
                    "It is the decoded pixels one reading task holds (MiB); the default "
                    "256 reads whole slides at full speed.", low=0, integer=False)
        rows, cols = self.mix.grid
        if max(rows, cols) > self.tile.tile_size:
            raise ValueError(
                "`grid` must fit the tile: at most one cell per pixel. "
                f"Received: grid={self.mix.grid}, tile_size={self.tile.tile_size}. "
                "Use a coarser grid or larger tiles."
            )
