"""Whole-chunk reads of local Zarr arrays, decoded by numcodecs in the calling threads.

zarr-python reads a region through its asyncio pipeline: per chunk, a file read and a
decode handed to threads, futures chained back to its event loop, then a copy into the
selection's buffer. On slide-sized regions of a local store that costs 20-40% more CPU
than the decoding itself, most of it holding the GIL (the event loop's thread alone
was ~1.3 CPU s of a 16-slide stream pass). `ChunkReader` reads the same chunk files
and decodes them with the same numcodecs codecs Zarr uses, without the event loop,
straight into the caller's ``[height, width, channels]`` buffer.

It takes only the arrays it reads exactly as Zarr does (`chunk_reader` returns None
for any other, which then reads through Zarr as before): a local store
(`zarr.storage.LocalStore`), a regular chunk grid, and either Zarr v3 with the codecs
``bytes`` (data in this machine's byte order, or single bytes) plus at most one of
``zstd``, ``blosc`` or ``gzip``, or Zarr v2 with C order, no filters, this machine's
byte order and a numcodecs compressor (or none). Sharded arrays, transposes, checksum
codecs, other byte orders and remote stores keep Zarr's path. A missing chunk file
reads as the array's fill value and is recorded as missing in the `ReadStats` of the
`CountingStore` the array was opened through, as that store does for a Zarr read.

``SOFTMIX_DIRECT_CHUNKS=0`` turns it off (every read through Zarr).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["ChunkReader", "chunk_reader"]

_pool_lock = threading.Lock()
_pool: cf.ThreadPoolExecutor | None = None


def _decode_pool() -> cf.ThreadPoolExecutor:
    """This process's threads that read and decode the chunks of one region together
    (numcodecs releases the GIL while decoding); a forked child makes its own."""
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(4, os.cpu_count() or 1))
            _pool = cf.ThreadPoolExecutor(workers, "softmix-chunks")
        return _pool


def _forget_pool_after_fork() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # the parent's threads are not here


os.register_at_fork(after_in_child=_forget_pool_after_fork)


class ChunkReader:
    """Reads the chunks of one local Zarr array (build it with `chunk_reader`).

    Args:
        directory: the array's directory on disk.
        key_prefix: the array's path in its store, with a trailing ``/`` (or ``""``):
            the store keys that `stats` records are ``key_prefix + chunk key``.
        encode_key: chunk coordinates -> chunk key (the array's key encoding).
        decode: compressed bytes -> decoded bytes (identity when uncompressed).
        dtype: the stored element type (native byte order).
        chunk_shape: the array's chunk shape (stored axis order).
        fill_value: what a missing chunk reads as.
        stats: the `ReadStats` of the store the array was opened through (or None).
    """

    def __init__(self, directory: str, key_prefix: str,
                 encode_key: Callable[[tuple[int, ...]], str],
                 decode: Callable[[bytes], Any], dtype: np.dtype,
                 chunk_shape: Sequence[int], fill_value: Any, stats: Any = None):
        self.directory, self.key_prefix = directory, key_prefix
        self._encode_key, self._decode = encode_key, decode
        self.dtype = np.dtype(dtype)
        self.chunk_shape = tuple(chunk_shape)
        self.fill_value, self.stats = fill_value, stats

    def chunk(self, coords: tuple[int, ...]) -> np.ndarray | None:
        """The decoded chunk at `coords` (stored axis order), or None when its file
        does not exist (recorded as missing).

        Raises:
            ValueError: the chunk decodes to the wrong number of bytes (corrupt).
            Whatever the codec raises on corrupt data.
        """
        key = self._encode_key(coords)
        try:
            with open(os.path.join(self.directory, key), "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            if self.stats is not None:
                self.stats.record(self.key_prefix + key, None)
            return None
        if self.stats is not None:
            self.stats.record(self.key_prefix + key, len(raw))
        data = np.frombuffer(self._decode(raw), dtype=np.uint8)
        expected = math.prod(self.chunk_shape) * self.dtype.itemsize
        if data.size != expected:
            raise ValueError(
                f"chunk {key} of {self.directory} decodes to {data.size} bytes, not the "
                f"{expected} of a {self.chunk_shape} {self.dtype} chunk: it is corrupt"
            )
        return data.view(self.dtype).reshape(self.chunk_shape)

    def read_into(self, out: np.ndarray, starts: Sequence[int],
                  out_axes: Sequence[int | None]) -> None:
        """Fill `out` with the array's region that starts at `starts`.

        `out_axes[i]` is the axis of `out` that the array's axis ``i`` maps to, or None
        for an axis the region takes one plane of (size 1 there, e.g. ``t``, ``z``).
        The region's extent along a mapped axis is `out`'s extent along it.
        """
        ranges = []
        for axis, (start, target) in enumerate(zip(starts, out_axes, strict=True)):
            stop = start + (out.shape[target] if target is not None else 1)
            size = self.chunk_shape[axis]
            ranges.append((start, stop, range(start // size, -(-stop // size))))
        jobs = list(itertools.product(*(chunks for _, _, chunks in ranges)))
        spans = [(start, stop) for start, stop, _ in ranges]

        def place(coords: tuple[int, ...]) -> None:
            self._place(out, coords, spans, out_axes)

        if len(jobs) == 1:
            place(jobs[0])
            return
        try:
            futures = [_decode_pool().submit(place, coords) for coords in jobs]
        except RuntimeError:  # interpreter shutdown: no new threads, read them here
            for coords in jobs:
                place(coords)
            return
        cf.wait(futures)  # every chunk's read recorded before an error is raised
        for future in futures:
            future.result()

    def _place(self, out: np.ndarray, coords: tuple[int, ...],
               spans: Sequence[tuple[int, int]], out_axes: Sequence[int | None]) -> None:
        chunk = self.chunk(coords)
        source: list[slice] = []
        target: list[slice] = [slice(None)] * out.ndim
        for axis, ((start, stop), index) in enumerate(zip(spans, coords, strict=True)):
            size = self.chunk_shape[axis]
            low, high = max(start, index * size), min(stop, (index + 1) * size)
            source.append(slice(low - index * size, high - index * size))
            if out_axes[axis] is not None:
                target[out_axes[axis]] = slice(low - start, high - start)
        if chunk is None:
            out[tuple(target)] = self.fill_value
            return
        block = chunk[tuple(source)]
        # Drop the single planes (t, z), then order the axes as `out`'s.
        kept = [a for a in range(len(out_axes)) if out_axes[a] is not None]
        block = block.reshape([block.shape[a] for a in kept])
        order = [kept.index(a) for a in sorted(kept, key=lambda a: out_axes[a])]
        block = block.transpose(order)
        region = out[tuple(target)]
        if out.ndim == 3 and region.shape[-1] > 1 and order[-1] != len(order) - 1:
            # Interleave plane by plane: a copy per channel runs far faster than one
            # transposed copy of the whole block.
            for channel in range(region.shape[-1]):
                region[..., channel] = block[..., channel]
        else:
            region[...] = block


def chunk_reader(array: Any, stats: Any = None) -> ChunkReader | None:
    """A `ChunkReader` for `array` (a `zarr.Array`), or None when Zarr must read it:
    see the module docstring for which arrays qualify."""
    if os.environ.get("SOFTMIX_DIRECT_CHUNKS", "1") == "0":
        return None
    try:
        return _reader(array, stats)
    except Exception:  # noqa: BLE001 - anything unexpected: Zarr's own path
        return None


def _reader(array: Any, stats: Any) -> ChunkReader | None:
    import numcodecs
    from zarr.storage import LocalStore

    store = array.store_path.store
    inner = getattr(store, "_store", store)  # a CountingStore wraps the LocalStore
    if not isinstance(inner, LocalStore):
        return None
    metadata = array.metadata
    dtype = np.dtype(array.dtype)
    if dtype.hasobject or dtype.kind not in "biuf":
        return None
    if metadata.zarr_format == 3:
        from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec
        from zarr.core.chunk_grids import RegularChunkGrid

        if not isinstance(metadata.chunk_grid, RegularChunkGrid):
            return None
        codecs = list(metadata.codecs)
        if not codecs or type(codecs[0]) is not BytesCodec or len(codecs) > 2:
            return None
        endian = codecs[0].endian
        if dtype.itemsize > 1 and (endian is None or endian.value != sys.byteorder):
            return None
        if len(codecs) == 1:
            decode: Callable[[bytes], Any] = _as_stored
        else:
            # Zarr's own v3 codecs decode with these numcodecs codecs.
            same = {ZstdCodec: numcodecs.Zstd, BloscCodec: numcodecs.Blosc,
                    GzipCodec: numcodecs.GZip}.get(type(codecs[1]))
            if same is None:
                return None
            decode = same().decode
        chunk_shape = tuple(metadata.chunk_grid.chunk_shape)
    elif metadata.zarr_format == 2:
        if metadata.filters or metadata.order != "C":
            return None
        stored = metadata.dtype.to_native_dtype()
        if stored.itemsize > 1 and stored.byteorder not in ("=", "|", "<" if
                                                           sys.byteorder == "little" else ">"):
            return None
        compressor = metadata.compressor
        decode = _as_stored if compressor is None else compressor.decode
        chunk_shape = tuple(metadata.chunks)
    else:
        return None
    path = array.store_path.path
    directory = os.path.join(str(inner.root), path) if path else str(inner.root)
    fill_value = 0 if array.fill_value is None else array.fill_value
    return ChunkReader(directory, f"{path}/" if path else "", metadata.encode_chunk_key,
                       decode, dtype, chunk_shape, fill_value, stats)


def _as_stored(raw: bytes) -> bytes:
    """An uncompressed chunk's bytes as they are."""
    return raw
