"""Accounting of a run, the output directory's life cycle, and the manifest.

Accounting rule (what the manifest's ``accounting`` reports):

- Every tile the tiling step looked at counts once in `tiles_total`.
- Tiles rejected by tiling (e.g. ``background``) count under their reason, from the
  `SlidePlan` (`Accounting.from_plan`). A failed slide counts in `slides_failed`.
- A tile kept by tiling is *pending* until its outcome is reported once with
  `Accounting.from_tile`:
  - **used** iff at least one example with it as source `a` was written;
  - else, when reading it failed, skipped under the failure reason (``read_error``,
    ``nan_pixels``...);
  - else, when all its examples were dropped because their partner `b` failed,
    skipped under ``partner_failed``;
  - else (no eligible partner and no original), skipped under ``no_partner``.
- Hence ``tiles_total == tiles_used + sum(tiles_skipped.values()) + tiles_pending``
  holds for every partial accumulator, and a finished run must have
  ``tiles_pending == 0`` (`finalize_output` checks), so nothing is dropped silently.

`Accounting` is a commutative monoid (`merge`, `+`, `Accounting()` is the identity):
use it as a Beam `CombineFn` accumulator or a Dask tree reduction.

Output directory life cycle: `prepare_output_dir` refuses an existing dataset unless
overwrite is on; shards are written under temporary names and renamed
(`pipeline._sharding.write_shard`); `finalize_output` writes the TFDS metadata and then
``manifest.json`` **last**, atomically. A directory without ``manifest.json`` is an
unfinished run, and `pipeline.read_dataset` refuses it.

TFDS: ``dataset_info.json`` and ``features.json`` are written by hand (TFDS is only a
dev dependency) so that ``tfds.builder_from_directory(OUT)`` loads the shards as split
``train``. TFDS's TFRecord reader does not take a compression type, so for GZIP runs
these two files are not written (the manifest says ``"tfds": false`` in `params`) and
only `pipeline.read_dataset` reads the shards.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import posixpath
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import tensorflow as tf

from ._keys import MixedExample, SlidePlan, TileRecord
from ._sharding import SHARD_PATTERN, TEMP_MARKER, ShardInfo, filepath_template, shard_filename
from .config import OutputConfig
from .errors import OutputExistsError, PipelineError

__all__ = [
    "MANIFEST_NAME",
    "Accounting",
    "finalize_output",
    "prepare_output_dir",
    "read_manifest",
    "software_versions",
]

MANIFEST_NAME = "manifest.json"
TFDS_FILES = ("dataset_info.json", "features.json")
# `softmix preview OUT` writes its contact sheet here; it belongs to the dataset.
PREVIEW_NAME = "preview.png"
PARTNER_FAILED = "partner_failed"
_UNIT = float(1 << 32)
NO_PARTNER = "no_partner"


def _add_counts(x: Mapping[str, int], y: Mapping[str, int]) -> dict[str, int]:
    out = dict(x)
    for key, value in y.items():
        out[key] = out.get(key, 0) + value
    return {k: v for k, v in sorted(out.items()) if v != 0}


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Counts of a run (or of part of it); merge partial counts with `+`.

    Attributes:
        tiles_total: tiles looked at by tiling.
        tiles_used: tiles that are source `a` of at least one written example.
        tiles_skipped: reason -> tiles not used.
        tiles_pending: tiles planned but whose outcome was not reported yet.
        slides_failed: slide_id -> failure reason.
        class_mass: per-class sum of the written examples' soft labels, in fixed point
            units of 2**-32 so that merging is exactly associative (see
            `class_histogram` for floats).
        examples_written: examples handed to the shard writer.
        examples_dropped: reason -> examples not written (e.g. ``partner_failed``).
        chunks_read: chunk fetches from the slide stores (planning and packing).
        bytes_read: compressed bytes fetched from the slide stores (all levels,
            metadata and tissue detection included).
        bytes_needed: compressed bytes of the distinct chunks that hold a kept tile
            (the denominator of `read_amplification`).
        requests: every request sent to the slide stores (metadata, chunks, misses).
        pack_bytes: bytes of the tile packs (the compressed tiles staged for mixing).
    """

    tiles_total: int = 0
    tiles_used: int = 0
    tiles_skipped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    tiles_pending: int = 0
    slides_failed: Mapping[str, str] = dataclasses.field(default_factory=dict)
    class_mass: tuple[int, ...] = ()
    examples_written: int = 0
    examples_dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)
    chunks_read: int = 0
    bytes_read: int = 0
    bytes_needed: int = 0
    requests: int = 0
    pack_bytes: int = 0

    @classmethod
    def from_plan(cls, plan: SlidePlan) -> Accounting:
        """Counts of one slide's tiling: its rejected tiles, its failure, its pending tiles."""
        skipped = {k: v for k, v in sorted(plan.skipped_dict.items()) if v}
        failed = {plan.slide_id: plan.failure} if plan.failure is not None else {}
        return cls(tiles_total=plan.num_tiles_total, tiles_skipped=skipped,
                   tiles_pending=len(plan.tiles), slides_failed=failed,
                   chunks_read=plan.chunks_read, bytes_read=plan.bytes_read,
                   requests=plan.requests)

    @classmethod
    def from_tile(
        cls,
        tile: TileRecord | None = None,
        *,
        written: Sequence[MixedExample] = (),
        read_failure: str | None = None,
        partner_failures: int = 0,
    ) -> Accounting:
        """The outcome of one planned tile, as source `a` (report each tile once).

        Args:
            tile: the anchor tile (informative only; counts do not depend on it).
            written: the examples with this tile as source `a` that were written.
            read_failure: reason reading this tile failed (then nothing was written).
            partner_failures: examples dropped because their partner `b` failed.

        Returns:
            An `Accounting` that resolves one pending tile.
        """
        if read_failure is not None and written:
            raise ValueError(
                f"A tile whose read failed cannot have written examples. Received: "
                f"read_failure={read_failure!r}, {len(written)} written, tile={tile}."
            )
        dropped: dict[str, int] = {}
        if read_failure is not None:
            reason = read_failure
        elif written:
            reason = None
        elif partner_failures:
            reason = PARTNER_FAILED
        else:
            reason = NO_PARTNER
        if partner_failures:
            dropped[PARTNER_FAILED] = partner_failures
        mass: tuple[int, ...] = ()
        for example in written:
            mass = _add_hist(mass, tuple(round(float(v) * _UNIT) for v in _flat(example.label)))
        return cls(
            tiles_used=1 if reason is None else 0,
            tiles_skipped={reason: 1} if reason is not None else {},
            tiles_pending=-1,
            class_mass=mass,
            examples_written=len(written) if reason is None else 0,
            examples_dropped=dropped,
        )

    def merge(self, *others: Accounting) -> Accounting:
        """The sum of `self` and `others` (commutative and associative)."""
        out = self
        for other in others:
            out = Accounting(
                tiles_total=out.tiles_total + other.tiles_total,
                tiles_used=out.tiles_used + other.tiles_used,
                tiles_skipped=_add_counts(out.tiles_skipped, other.tiles_skipped),
                tiles_pending=out.tiles_pending + other.tiles_pending,
                slides_failed=_merge_failures(out.slides_failed, other.slides_failed),
                class_mass=_add_hist(out.class_mass, other.class_mass),
                examples_written=out.examples_written + other.examples_written,
                examples_dropped=_add_counts(out.examples_dropped, other.examples_dropped),
                chunks_read=out.chunks_read + other.chunks_read,
                bytes_read=out.bytes_read + other.bytes_read,
                bytes_needed=out.bytes_needed + other.bytes_needed,
                requests=out.requests + other.requests,
                pack_bytes=out.pack_bytes + other.pack_bytes,
            )
        return out

    def __add__(self, other: Accounting) -> Accounting:
        if not isinstance(other, Accounting):
            return NotImplemented
        return self.merge(other)

    @classmethod
    def merge_all(cls, parts: Iterable[Accounting]) -> Accounting:
        """Merge any iterable of accountings (empty -> the identity `Accounting()`)."""
        return cls().merge(*parts)

    @property
    def class_histogram(self) -> tuple[float, ...]:
        """Per-class sum of the written examples' soft labels."""
        return tuple(v / _UNIT for v in self.class_mass)

    def check(self) -> None:
        """Raise `RuntimeError` unless the counts of a finished run are consistent."""
        skipped = sum(self.tiles_skipped.values())
        if self.tiles_pending != 0 or self.tiles_total != self.tiles_used + skipped:
            raise RuntimeError(
                "Inconsistent accounting: tiles_total must equal tiles_used + "
                f"sum(tiles_skipped) with no tile pending. Received: tiles_total="
                f"{self.tiles_total}, tiles_used={self.tiles_used}, skipped={skipped}, "
                f"tiles_pending={self.tiles_pending}. An engine lost or double-counted tiles."
            )

    def to_dict(self, num_classes: int | None = None) -> dict[str, Any]:
        """The manifest's ``accounting`` object."""
        histogram = list(self.class_histogram)
        if num_classes is not None:
            histogram = (histogram + [0.0] * num_classes)[:max(num_classes, len(histogram))]
        return {
            "tiles_total": self.tiles_total,
            "tiles_used": self.tiles_used,
            "tiles_skipped": dict(sorted(self.tiles_skipped.items())),
            "slides_failed": dict(sorted(self.slides_failed.items())),
            "class_histogram": [round(v, 6) for v in histogram],
            "examples_written": self.examples_written,
            "examples_dropped": dict(sorted(self.examples_dropped.items())),
            "chunks_read": self.chunks_read,
            "bytes_read": self.bytes_read,
            "bytes_needed": self.bytes_needed,
            "read_amplification": self.read_amplification,
            "store_requests": self.requests,
            "pack_bytes": self.pack_bytes,
        }

    @property
    def read_amplification(self) -> float | None:
        """`bytes_read` / compressed bytes of the distinct chunks holding a kept tile."""
        if self.bytes_needed <= 0:
            return None
        return round(self.bytes_read / self.bytes_needed, 4)


def _flat(label: Any) -> list[float]:
    if hasattr(label, "reshape"):
        return list(label.reshape(-1).tolist())
    return [float(v) for v in label]


def _add_hist(x: tuple[int, ...], y: tuple[int, ...]) -> tuple[int, ...]:
    if len(x) < len(y):
        x, y = y, x
    return tuple(a + (y[i] if i < len(y) else 0) for i, a in enumerate(x))


def _merge_failures(x: Mapping[str, str], y: Mapping[str, str]) -> dict[str, str]:
    out = dict(x)
    for slide_id, reason in y.items():
        # A slide reported twice (a retried task): keep one reason, independent of order.
        out[slide_id] = min(reason, out.get(slide_id, reason))
    return dict(sorted(out.items()))


def software_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the output (no heavy imports)."""
    versions = {"python": platform.python_version()}
    for label, dists in (
        ("softmix", ("softmix",)),
        ("tensorflow", ("tensorflow", "tensorflow-cpu")),
        ("numpy", ("numpy",)),
        ("zarr", ("zarr",)),
        ("ome-zarr", ("ome-zarr",)),
        ("apache-beam", ("apache-beam",)),
        ("dask", ("dask",)),
        ("distributed", ("distributed",)),
    ):
        for dist in dists:
            try:
                versions[label] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _is_ours(name: str) -> bool:
    return (name in (MANIFEST_NAME, PREVIEW_NAME, *TFDS_FILES)
            or SHARD_PATTERN.match(name) is not None
            or (name.startswith(".") and TEMP_MARKER in name))


def prepare_output_dir(config: OutputConfig) -> None:
    """Create `config.out_dir`, or clear an old SoftMix dataset there when overwriting.

    Raises:
        OutputExistsError: the directory holds a dataset (finished or not) and
            `config.overwrite` is off, or it holds files that are not ours (never
            deleted, even with overwrite).
    """
    out_dir = config.out_dir
    if not tf.io.gfile.exists(out_dir):
        tf.io.gfile.makedirs(out_dir)
        return
    if not tf.io.gfile.isdir(out_dir):
        raise OutputExistsError(f"Output path {out_dir!r} exists and is not a directory. "
                                "Choose a directory path for --out.")
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(out_dir)]
    foreign = sorted(n for n in names if not _is_ours(n))
    if foreign:
        raise OutputExistsError(
            f"Output directory {out_dir!r} holds files that are not part of a SoftMix "
            f"dataset: {foreign[:5]}{' ...' if len(foreign) > 5 else ''}. Choose an empty or "
            "new directory for --out (--overwrite only replaces SoftMix datasets)."
        )
    ours = sorted(names)
    if not ours:
        return
    if not config.overwrite:
        state = "a finished" if MANIFEST_NAME in ours else "an unfinished"
        raise OutputExistsError(
            f"Output directory {out_dir!r} already holds {state} SoftMix dataset "
            f"({len(ours)} files). Pass --overwrite to replace it, or choose another --out."
        )
    if MANIFEST_NAME in ours:  # first, so an interrupted cleanup reads as unfinished
        tf.io.gfile.remove(posixpath.join(out_dir, MANIFEST_NAME))
    for name in ours:
        if name != MANIFEST_NAME:
            tf.io.gfile.remove(posixpath.join(out_dir, name))


def _write_json_atomic(path: str, payload: Any) -> None:
    directory, base = posixpath.split(path)
    temp = posixpath.join(directory, f".{base}{TEMP_MARKER}{uuid.uuid4().hex}")
    with tf.io.gfile.GFile(temp, "w") as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")
    tf.io.gfile.rename(temp, path, overwrite=True)


def _tensor(dtype: str, dims: Sequence[int] = ()) -> dict[str, Any]:
    shape: dict[str, Any] = {"dimensions": [str(d) for d in dims]} if dims else {}
    return {
        "pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
        "tensor": {"dtype": dtype, "encoding": "none", "shape": shape},
    }


def _features_dict(features: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "featuresDict": {"features": dict(sorted(features.items()))},
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
    }


def tfds_features(num_classes: int) -> dict[str, Any]:
    """TFDS ``features.json`` of the example schema (nested dicts flatten to ``a/x``...)."""
    def source() -> dict[str, Any]:
        return _features_dict({"slide_id": _tensor("string"), "level": _tensor("int64"),
                               "x": _tensor("int64"), "y": _tensor("int64"),
                               "label": _tensor("int64")})

    return _features_dict({
        "image": _features_dict({"encoded": _tensor("string"), "format": _tensor("string"),
                                 "shape": _tensor("int64", [3]), "dtype": _tensor("string")}),
        "label": _tensor("float32", [num_classes]),
        "lam": _tensor("float32"),
        "a": source(),
        "b": source(),
        "seed": _tensor("int64", [2]),
        "example_id": _tensor("string"),
        "mix_index": _tensor("int64"),
    })


def tfds_dataset_info(name: str, shards: Sequence[ShardInfo], description: str = ""
                      ) -> dict[str, Any]:
    """TFDS ``dataset_info.json``: one split ``train`` over the shards, TFDS naming."""
    return {
        "description": description or "SoftMix-augmented tiles (see manifest.json).",
        "fileFormat": "tfrecord",
        "name": name,
        "splits": [{
            "filepathTemplate": filepath_template(name),
            "name": "train",
            "numBytes": str(sum(s.num_bytes for s in shards)),
            "shardLengths": [str(s.num_examples) for s in shards],
        }],
        "version": "1.0.0",
    }


def finalize_output(
    config: OutputConfig,
    shards: Sequence[ShardInfo],
    accounting: Accounting,
    class_names: Sequence[str],
    params: Mapping[str, Any],
    *,
    description: str = "",
) -> dict[str, Any]:
    """Check the run, write the TFDS metadata, then ``manifest.json`` last (atomically).

    Args:
        config: the run's `OutputConfig`.
        shards: every shard written, one per index 0..N-1 (any order).
        accounting: the merged accounting of the whole run.
        class_names: the run's class names (K = len).
        params: every option of the run (flat or nested JSON-able values); output
            options and software versions (``params["versions"]``) are added.
        description: free text for ``dataset_info.json``.

    Returns:
        The manifest, as written.

    Raises:
        RuntimeError: missing shards, or counts that do not add up.
    """
    ordered = sorted(shards, key=lambda s: s.file)
    num_shards = len(ordered)
    expected = [shard_filename(config.name, i, num_shards) for i in range(num_shards)]
    wanted = config.num_shards if config.num_shards is not None else max(num_shards, 1)
    if num_shards != wanted or [s.file for s in ordered] != expected:
        raise RuntimeError(
            f"Shards must be the {wanted} files {config.name}-00000-of-{wanted:05d}.tfrecord... "
            f"Received: {[s.file for s in ordered][:5]}."
        )
    accounting.check()
    num_examples = sum(s.num_examples for s in ordered)
    if accounting.examples_written != num_examples:
        raise RuntimeError(
            f"The shards hold {num_examples} examples but the accounting counted "
            f"{accounting.examples_written} written. An engine lost or duplicated records."
        )
    all_params = dict(params)
    all_params.update({
        "name": config.name,
        "num_shards": num_shards,
        "compression": config.compression,
        "shard_size_mb": config.shard_size_mb,
        "on_error": config.on_error,
        "tfds": config.compression is None,
        "versions": software_versions(),
    })
    out_dir = config.out_dir
    if config.compression is None:
        _write_json_atomic(posixpath.join(out_dir, "features.json"),
                           tfds_features(len(class_names)))
        _write_json_atomic(posixpath.join(out_dir, "dataset_info.json"),
                           tfds_dataset_info(config.name, ordered, description))
    manifest = {
        "num_examples": num_examples,
        "class_names": list(class_names),
        "shards": [{"file": s.file, "num_examples": s.num_examples} for s in ordered],
        "params": all_params,
        "accounting": accounting.to_dict(len(class_names)),
    }
    _write_json_atomic(posixpath.join(out_dir, MANIFEST_NAME), manifest)
    return manifest


def read_manifest(out_dir: str) -> dict[str, Any]:
    """Load ``OUT/manifest.json``.

    Raises:
        PipelineError: no manifest (an unfinished run, or not a SoftMix directory).
    """
    path = posixpath.join(out_dir, MANIFEST_NAME)
    if not tf.io.gfile.exists(path):
        raise PipelineError(
            f"No {MANIFEST_NAME} in {out_dir!r}: the run that writes it has not finished "
            "(the manifest is written last), or this is not a SoftMix output directory. "
            "Rerun the job with --overwrite, or point at a finished output directory."
        )
    with tf.io.gfile.GFile(path, "r") as handle:
        return json.load(handle)
