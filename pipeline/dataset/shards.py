"""Assign examples to shards and write one shard atomically. Pure and deterministic.

A shard's content depends only on which example ids hash to it: records are sorted by
example id before writing, so its bytes do not depend on the engine, the bundling or
the worker count. Each shard is written to a hidden temporary name in the output
directory and renamed when complete, so a retried or killed task never leaves a
truncated or duplicated shard under the final name.

Shard names follow TensorFlow Datasets' ``{SHARD_X_OF_Y}`` convention:
``<name>-00000-of-00016.tfrecord``.
"""

from __future__ import annotations

import dataclasses
import math
import posixpath
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ..io import storage
from ..records import stable_hash
from .tfrecord import RecordWriter, iter_records

__all__ = [
    "SHARD_PATTERN",
    "ShardInfo",
    "merge_shards",
    "filepath_template",
    "num_shards_for",
    "shard_filename",
    "shard_for",
    "write_shard",
]

# Any SoftMix shard, whatever the dataset name (used to recognise our own files).
SHARD_PATTERN = re.compile(r"^(?P<name>.+)-(?P<index>\d{5,})-of-(?P<total>\d{5,})\.tfrecord$")
TEMP_MARKER = ".tmp-"


@dataclasses.dataclass(frozen=True, order=True)
class ShardInfo:
    """A written shard.

    Attributes:
        file: base name of the shard inside the output directory.
        num_examples: records in the shard.
        num_bytes: size of the file in bytes.
    """

    file: str
    num_examples: int
    num_bytes: int
    reused: bool = dataclasses.field(default=False, compare=False)
    crc32: int | None = dataclasses.field(default=None, compare=False)
    # Requests and bytes sent to a remote store while writing it (accounting only).
    requests: int = dataclasses.field(default=0, compare=False)
    bytes_written: int = dataclasses.field(default=0, compare=False)
    # Shape, dtype and format of its first image (`first_image`), read where the shard
    # was written, so that the manifest's writer never parses a record itself.
    image: dict | None = dataclasses.field(default=None, compare=False)


def shard_for(example_id: str, num_shards: int) -> int:
    """The shard index of `example_id`: a salted stable hash, uniform over shards.

    >>> shard_for("s1/L0/x0/y0#m0", 16) == shard_for("s1/L0/x0/y0#m0", 16)
    True
    >>> 0 <= shard_for("s1/L0/x0/y0#m0", 16) < 16
    True
    """
    if num_shards < 1:
        raise ValueError(f"`num_shards` must be >= 1. Received: num_shards={num_shards}")
    return stable_hash("softmix.shard", example_id) % num_shards


def filepath_template(name: str) -> str:
    """The TFDS `filepathTemplate` of the shards of dataset `name`.

    >>> filepath_template("softmix")
    'softmix-{SHARD_X_OF_Y}.tfrecord'
    """
    return name.replace("{", "{{").replace("}", "}}") + "-{SHARD_X_OF_Y}.tfrecord"


def shard_filename(name: str, index: int, num_shards: int) -> str:
    """The base name of shard `index` of `num_shards`.

    >>> shard_filename("softmix", 3, 16)
    'softmix-00003-of-00016.tfrecord'
    """
    if not 0 <= index < num_shards:
        raise ValueError(
            f"Shard `index` must be in [0, num_shards). Received: index={index}, "
            f"num_shards={num_shards}"
        )
    return f"{name}-{index:05d}-of-{num_shards:05d}.tfrecord"


def num_shards_for(num_examples: int, approx_bytes_per_example: float,
                   shard_size_mb: float) -> int:
    """How many shards of about `shard_size_mb` MiB hold `num_examples` examples.

    At least 1, and never more shards than examples or `config.MAX_NUM_SHARDS`.

    >>> num_shards_for(1000, 200_000, 100.0)
    2
    >>> num_shards_for(0, 200_000, 100.0)
    1
    """
    if not shard_size_mb > 0:
        raise ValueError(f"`shard_size_mb` must be > 0. Received: shard_size_mb={shard_size_mb}")
    from ..config import MAX_NUM_SHARDS

    wanted = math.ceil(num_examples * max(approx_bytes_per_example, 0) / (shard_size_mb * 2**20))
    return max(1, min(num_examples, wanted, MAX_NUM_SHARDS))


def _options(compression: str | None) -> str | None:
    if compression is None:
        return None
    if compression.upper() != "GZIP":
        raise ValueError(f"`compression` must be None or 'GZIP'. Received: {compression!r}")
    return "GZIP"


def write_shard(
    path: str, records: Iterable[tuple[str, bytes]], *, compression: str | None = None
) -> ShardInfo:
    """Write `(example_id, serialized)` pairs to the TFRecord file `path`, atomically.

    Records are sorted by example id, so the bytes do not depend on input order.
    An id given twice with identical bytes (an at-least-once retry) is written once.
    The file appears under `path` only when complete (temporary name + rename), and
    an existing file there (from an earlier attempt) is replaced.

    Args:
        path: final path (local, or any fsspec URL).
        records: `(example_id, serialized tf.train.Example)` pairs.
        compression: None or ``"GZIP"``.

    Returns:
        `ShardInfo` with the base name, the record count, the file size and its CRC32
        (computed while writing).

    Raises:
        ValueError: the same example id with two different payloads.
        RuntimeError: writing failed (the temporary file is removed).
    """
    options = _options(compression)
    ordered = sorted(records, key=lambda pair: pair[0])
    unique: list[tuple[str, bytes]] = []
    for example_id, payload in ordered:
        if unique and unique[-1][0] == example_id:
            if unique[-1][1] != payload:
                raise ValueError(
                    f"Two different records have example_id={example_id!r}; example ids must "
                    "be unique (pairing bug or two runs mixed into one shard)."
                )
            continue
        unique.append((example_id, payload))
    base = posixpath.basename(path)
    try:
        with storage.writer(path) as handle, RecordWriter(handle, options) as writer:
            for _, payload in unique:
                writer.write(payload)
    except Exception as err:
        raise RuntimeError(f"failed to write shard {path!r}") from err
    return ShardInfo(file=base, num_examples=len(unique), num_bytes=writer.size,
                     crc32=writer.crc32)


def merge_shards(path: str, parts: Sequence[tuple[str, Sequence[str]]], *,
                 compression: str | None = None) -> ShardInfo:
    """Merge sorted, uncompressed TFRecord files into the shard `path`, sorted by id.

    Args:
        path: the shard to write.
        parts: `(file, example ids of its records in file order)`; each file's ids
            are sorted. The result is every record sorted by example id, so it does
            not depend on how the examples were split into parts.
        compression: None or ``"GZIP"`` for the shard.

    Memory stays at one record per part whatever the shard size; the file appears
    under `path` only when complete (temporary name + rename).

    Returns:
        `ShardInfo` of the written file.
    """
    import heapq

    options = _options(compression)
    base = posixpath.basename(path)

    def stream(file: str, ids: Sequence[str]):
        with storage.open_read(file) as handle:
            yield from zip(ids, iter_records(handle), strict=True)

    try:
        with storage.writer(path) as handle, RecordWriter(handle, options) as writer:
            merged = heapq.merge(*(stream(f, ids) for f, ids in parts), key=lambda r: r[0])
            for _, record in merged:
                writer.write(record)
    except Exception as err:
        raise RuntimeError(f"failed to write shard {path!r}") from err
    return ShardInfo(file=base, num_examples=writer.count, num_bytes=writer.size,
                     crc32=writer.crc32)


def first_image(path: str, compression: str | None) -> dict[str, Any] | None:
    """``{shape, dtype, format}`` of the first record's image in the shard at `path`
    (every example of a run shares them: tiles are square and slides of another pixel
    kind fail); None for an empty shard. Parses one record with TensorFlow."""
    import tensorflow as tf

    with storage.open_read(path, block_size=1 << 20) as handle:
        raw = next(iter_records(handle, compression=compression), None)
    if raw is None:
        return None
    feats = tf.train.Example.FromString(raw).features.feature
    return {
        "shape": [int(d) for d in feats["image/shape"].int64_list.value],
        "dtype": feats["image/dtype"].bytes_list.value[0].decode(),
        "format": feats["image/format"].bytes_list.value[0].decode(),
    }
