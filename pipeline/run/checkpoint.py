"""Verified checkpoints: how every artifact a resumed run may reuse is written and checked.

Plans, tile packs, mixed buckets and staged shards are all kept the same way:

1. the data file is written (atomically where the store allows), its size and CRC32
   computed while writing (`CrcWriter`; the TFRecord writer of
   `pipeline.dataset.shards` for buckets and shards): nothing is read back;
2. then a small JSON *sidecar* ``<data>.json`` (``<pack>.json`` for a pack's
   ``<pack>.bin``) is written atomically: ``{"inputs", "records", "size", "crc32",
   ...}``, where ``inputs`` names everything the data was made from (the step's
   parameters, and the content fingerprints of the slides whose pixels it holds,
   `pipeline.io.content`);
3. before reusing it, a later attempt (a resumed run, a retried task) calls
   `load_checked(data, inputs)`: the sidecar must exist and parse, its ``inputs``
   must equal what this attempt would make the data from, and the data file must
   have the recorded size and CRC32. Anything else (missing, truncated, edited,
   made from other inputs) is redone. A data file whose size and modification time
   are those the sidecar recorded is not read again (a metadata read per artifact).
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

from ..io import storage

__all__ = ["CrcWriter", "file_crc32", "load_checked", "sidecar_path", "write_checked",
           "write_sidecar", "write_text_atomic"]


def sidecar_path(data: str) -> str:
    """The sidecar of data file `data` (a pack's ``.bin`` has its index as sidecar)."""
    return (data[:-4] if data.endswith(".bin") else data) + ".json"


def write_text_atomic(path: str, text: str) -> None:
    """Write `path` whole: a temporary file and a rename on a disk, one upload on an
    object store (`storage.write_text`)."""
    storage.write_text(path, text)


def file_crc32(path: str) -> tuple[int, int]:
    """`(size, crc32)` of a file, read in 4 MiB blocks."""
    crc, size = 0, 0
    with storage.open_read(path) as handle:
        while block := handle.read(4 << 20):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc


class CrcWriter:
    """A binary file handle that keeps the size and CRC32 of what went through it."""

    def __init__(self, handle: Any):
        self._handle = handle
        self.size = 0
        self.crc32 = 0

    def write(self, data: bytes) -> None:
        self._handle.write(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        self.size += len(data)


def _stamp(path: str) -> tuple[int, int | None]:
    """`(size, modification time in ns or None)` of `path`: metadata reads, no data."""
    if not storage.is_url(path):
        stat = os.stat(path.removeprefix("file://"))
        return stat.st_size, stat.st_mtime_ns
    size, modified = storage.stat(path)
    return size, None if modified is None else round(modified * 1e9)


def write_sidecar(data: str, *, inputs: Any, records: int, size: int, crc32: int,
                  **extra: Any) -> None:
    """Write `data`'s sidecar (after `data` itself is complete).

    Besides the size and CRC32 it records the data file's modification time, so a
    later attempt can reuse an untouched file on a metadata read (`load_checked`).
    """
    try:
        mtime_ns = _stamp(data)[1]
    except Exception:  # noqa: BLE001 - nothing written (an empty pack is never created)
        mtime_ns = None
    body = {**extra, "inputs": inputs, "records": records, "size": size, "crc32": crc32,
            "mtime_ns": mtime_ns}
    write_text_atomic(sidecar_path(data), json.dumps(body))


def write_checked(data: str, payload: bytes, *, inputs: Any, records: int,
                  **extra: Any) -> None:
    """Write `payload` to `data` atomically, then its sidecar (CRC of the bytes in hand)."""
    storage.write_bytes(data, payload)
    write_sidecar(data, inputs=inputs, records=records, size=len(payload),
                  crc32=zlib.crc32(payload), **extra)


def load_checked(data: str, inputs: Any, *, read: bool = False
                 ) -> tuple[dict[str, Any], bytes | None] | None:
    """`(sidecar, data bytes if read)` when `data` may be reused for `inputs`, else None.

    Reusable means: the sidecar exists and parses, was written for the same `inputs`,
    and the data file has the recorded size and CRC32 (with `read`, the bytes checked
    are returned, so a small file is read once). Without `read`, a file whose size and
    modification time are still those recorded right after it was written is taken as
    untouched without reading it (a resumed run pays metadata reads, not a second read
    of every byte); any other file is read and its CRC32 compared. A same-size edit
    that also restores the modification time is the one change this does not see.
    """
    try:  # the sidecar is written after the data: one GET, no existence checks
        sidecar = storage.read_json(sidecar_path(data))
        if not isinstance(sidecar, dict) or sidecar.get("inputs") != _plain(inputs):
            return None
        if read:
            payload = storage.read_bytes(data)
            found = (len(payload), zlib.crc32(payload))
        elif (sidecar.get("mtime_ns") is not None
              and _stamp(data) == (sidecar["size"], sidecar["mtime_ns"])):
            return sidecar, None
        else:
            payload = None
            found = file_crc32(data)
        if found != (sidecar["size"], sidecar["crc32"]):
            return None
    except (ValueError, KeyError, TypeError, OSError):
        return None
    return sidecar, payload


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))
