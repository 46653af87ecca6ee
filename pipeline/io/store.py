"""Read accounting: a Zarr store wrapper that counts requests, bytes and missing keys.

Every slide the job opens goes through `CountingStore`, so the run can report
``chunks_read`` (chunk fetches), ``bytes_read`` (compressed bytes fetched from the slide
stores, metadata included) and find chunks that do not exist (Zarr would silently
return the fill value for them, i.e. black or blank pixels).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

__all__ = ["CountingStore", "ReadStats", "is_metadata_key"]

_METADATA_NAMES = ("zarr.json", ".zattrs", ".zarray", ".zgroup", ".zmetadata")


def is_metadata_key(key: str) -> bool:
    """Whether `key` names Zarr metadata rather than a chunk.

    >>> is_metadata_key("0/zarr.json"), is_metadata_key("0/c/0/1/2")
    (True, False)
    """
    return key.rsplit("/", 1)[-1] in _METADATA_NAMES


@dataclasses.dataclass
class ReadStats:
    """Counters of one opened slide (thread-safe; Zarr fetches from its own loop).

    Attributes:
        requests: every `get` sent to the store (metadata, chunks, misses).
        chunks_read: chunk fetches that returned data.
        bytes_read: bytes returned by all fetches (metadata included).
        missing: chunk keys the store did not have.
        sizes: bytes of each chunk key fetched (first fetch).
    """

    requests: int = 0
    chunks_read: int = 0
    bytes_read: int = 0
    missing: set[str] = dataclasses.field(default_factory=set)
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def record(self, key: str, size: int | None) -> None:
        with self._lock:
            self.requests += 1
            if size is None:
                if not is_metadata_key(key):
                    self.missing.add(key)
                return
            self.bytes_read += size
            if not is_metadata_key(key):
                self.chunks_read += 1
                self.sizes.setdefault(key, size)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class CountingStore(WrapperStore):
    """A read-only view of a Zarr store that records every fetch in `stats`.

    `measure(store, key, size)`, when given, says how many bytes a fetch of `key` cost
    when the store hands back something else than what it read (tifffile's store
    returns decoded tiles; the cost is the tile's compressed size in the file).
    """

    def __init__(self, store: Any, stats: ReadStats | None = None,
                 measure: Callable[[Any, str, int], int] | None = None):
        super().__init__(store)
        self.stats = stats if stats is not None else ReadStats()
        self.measure = measure

    def _with_store(self, store: Any) -> CountingStore:
        return type(self)(store, self.stats, self.measure)

    def _size(self, key: str, buffer: Buffer | None) -> int | None:
        if buffer is None:
            return None
        if self.measure is None:
            return len(buffer)
        return self.measure(self._store, key, len(buffer))

    async def get(self, key: str, prototype: BufferPrototype,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        buffer = await self._store.get(key, prototype, byte_range)
        self.stats.record(key, self._size(key, buffer))
        return buffer

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Any) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        buffers = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buffer in zip(key_ranges, buffers, strict=True):
            self.stats.record(key, self._size(key, buffer))
        return buffers
