"""TFRecord framing without TensorFlow's file system: write and read through any file object.

A TFRecord file is a sequence of records, each::

    uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)

(little-endian; ``masked = ((crc >> 15) | (crc << 17)) + 0xa282ead8``). Writing the
framing here lets shards go to any fsspec store (TensorFlow's own file systems have no
``s3://``, ``az://`` or ``memory://``); the bytes equal `tf.io.TFRecordWriter`'s.
GZIP files are one zlib stream with a gzip header (window bits 31, default level and
memory level 9), as TensorFlow's ``ZlibOutputBuffer`` writes them.

The writer also keeps the size and the zlib CRC32 of the bytes it wrote, so a caller
can record them in a sidecar without reading the file back.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import IO

import google_crc32c

__all__ = ["RecordWriter", "iter_records", "masked_crc32c"]

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of `data`.

    >>> hex(masked_crc32c(b""))
    '0xa282ead8'
    """
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class RecordWriter:
    """Write TFRecords into the binary file object `handle` (not closed here).

    Args:
        handle: where the file's bytes go.
        compression: None or ``"GZIP"``.

    Attributes:
        size: bytes written to `handle` so far.
        crc32: zlib CRC32 of those bytes (final after `close`).
        count: records written.
    """

    def __init__(self, handle: IO[bytes], compression: str | None = None):
        if compression not in (None, "", "GZIP"):
            raise ValueError(f"`compression` must be None or 'GZIP'. Received: {compression!r}")
        self._handle = handle
        self._zlib = (zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, 31, 9)
                      if compression == "GZIP" else None)
        self.size = 0
        self.crc32 = 0
        self.count = 0
        self._closed = False

    def _emit(self, data: bytes) -> None:
        if data:
            self._handle.write(data)
            self.size += len(data)
            self.crc32 = zlib.crc32(data, self.crc32)

    def write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        framed = b"".join((header, struct.pack("<I", masked_crc32c(header)), record,
                           struct.pack("<I", masked_crc32c(record))))
        self._emit(self._zlib.compress(framed) if self._zlib is not None else framed)
        self.count += 1

    def close(self) -> None:
        """Finish the stream (flushes GZIP); the file object stays open."""
        if not self._closed and self._zlib is not None:
            self._emit(self._zlib.flush(zlib.Z_FINISH))
        self._closed = True

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_records(handle: IO[bytes], *, compression: str | None = None,
                 check_crc: bool = True) -> Iterator[bytes]:
    """The records of a TFRecord stream read from `handle`.

    Raises:
        OSError: a record cut short, or (with `check_crc`) a CRC that does not match.
    """
    if compression == "GZIP":
        import gzip

        handle = gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[assignment]
    index = 0
    while True:
        header = handle.read(12)
        if not header:
            return
        if len(header) < 12:
            raise OSError(f"the header of record {index} is cut short")
        (length,) = struct.unpack("<Q", header[:8])
        if check_crc and struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
            raise OSError(f"record {index}: corrupt length (CRC mismatch)")
        body = handle.read(length + 4)
        if len(body) < length + 4:
            raise OSError(f"record {index} is cut short ({len(body)} of {length + 4} bytes)")
        data = body[:length]
        if check_crc and struct.unpack("<I", body[length:])[0] != masked_crc32c(data):
            raise OSError(f"record {index}: corrupt data (CRC mismatch)")
        yield data
        index += 1
