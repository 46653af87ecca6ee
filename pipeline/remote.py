"""A bucket on your own disk: an fsspec filesystem that adds latency and counts requests.

`LatencyFileSystem` (protocol ``latency``) serves another filesystem (the local disk by
default) and behaves like an object store seen from far away: every request waits a
fixed latency first, and every request and every byte is counted. Tests and benchmarks
use it to show how the job behaves against a bucket (SPEC 4a: ~20 ms a request) without
a network: how many requests it sends, how many bytes it fetches, and whether its reads
overlap.

URLs (usable in a slide manifest, with `pipeline.io.slides.open_slide`, `zarr`, `fsspec`):

- ``latency:///abs/path/slide.ome.zarr``: a local path (the default target);
- ``latency::file:///abs/path/slide.ome.zarr``, ``latency::memory://slide.zarr``,
  ``latency::s3://bucket/slide.zarr``: fsspec chaining over any other filesystem.

Configuration: storage option ``latency_ms`` (per-request delay in milliseconds), else
the environment variable ``SOFTMIX_LATENCY_MS`` (default 0), read at each request, so
Beam worker processes and Dask LocalCluster workers, which inherit the environment, get
the same latency. The protocol is registered through the ``fsspec.specs`` entry point
of the ``softmix`` distribution, so every process finds it without importing this
module first.

The filesystem is asynchronous (``async_impl``): zarr's `FsspecStore` uses it as is
(it wraps only synchronous filesystems, in `AsyncFileSystemWrapper`, whose calls run
on a small thread pool: at most ``cpu_count + 4`` requests would then be in flight).
The latency is an ``asyncio.sleep`` on the event loop, so concurrent requests wait
together, as they would for a bucket; only the target's own I/O runs in threads.

Counts are per process (`stats`, `reset_stats`), by kind: ``get`` (a whole object),
``range`` (a byte range of one), ``list``, ``info`` (info/exists/isdir...) and ``write``
(put/pipe/remove), plus the bytes returned and written.

Example::

    import os
    from pipeline import remote
    from pipeline.io.slides import open_slide

    os.environ["SOFTMIX_LATENCY_MS"] = "20"
    remote.reset_stats()
    slide = open_slide("latency:///data/slides/demo-000-he.ome.zarr")
    slide.read_region(0, x=0, y=0, width=256, height=256)
    remote.stats()  # RemoteStats(get=..., bytes_read=..., ...)
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import threading
from typing import Any, ClassVar

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.spec import AbstractBufferedFile

try:  # fsspec >= 2025: marks filesystems that take the next URL of a chain as their path
    from fsspec.implementations.chained import ChainedFileSystem as _Chained
except ImportError:  # pragma: no cover - older fsspec: chaining without the path hand-off
    _Chained = object  # type: ignore[assignment,misc]

__all__ = ["LATENCY_ENV", "LatencyFileSystem", "RemoteStats", "reset_stats", "stats"]

LATENCY_ENV = "SOFTMIX_LATENCY_MS"
KINDS = ("get", "range", "list", "info", "write")


@dataclasses.dataclass(frozen=True)
class RemoteStats:
    """Requests and bytes through `LatencyFileSystem` in this process.

    Attributes:
        get: whole-object reads (``cat_file`` without a range).
        range: byte-range reads.
        list: listings (``ls``; ``find``/``walk`` send one per directory).
        info: metadata requests (``info``, ``exists``, ``isdir``, ``isfile``, ``size``).
        write: writes and removals (``pipe_file``, ``put_file``, ``rm_file``, writes
            through ``open``).
        bytes_read: bytes returned by ``get`` and ``range`` requests.
        bytes_written: bytes written.
    """

    get: int = 0
    range: int = 0
    list: int = 0
    info: int = 0
    write: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def requests(self) -> int:
        """All requests, of every kind."""
        return self.get + self.range + self.list + self.info + self.write

    @property
    def reads(self) -> int:
        """Data requests: ``get + range``."""
        return self.get + self.range

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "requests": self.requests}


_lock = threading.Lock()
_counts: dict[str, int] = dict.fromkeys((*KINDS, "bytes_read", "bytes_written"), 0)


def _count(kind: str, *, read: int = 0, written: int = 0) -> None:
    with _lock:
        _counts[kind] += 1
        _counts["bytes_read"] += read
        _counts["bytes_written"] += written


def stats() -> RemoteStats:
    """The counts of this process since the last `reset_stats` (a snapshot)."""
    with _lock:
        return RemoteStats(**_counts)


def reset_stats() -> RemoteStats:
    """Zero the counts; returns the counts before the reset."""
    with _lock:
        before = RemoteStats(**_counts)
        for key in _counts:
            _counts[key] = 0
    return before


def _env_latency_ms() -> float:
    raw = os.environ.get(LATENCY_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError as err:
        raise ValueError(
            f"{LATENCY_ENV} must be a number of milliseconds. Received: {LATENCY_ENV}={raw!r}"
        ) from err
    if value < 0:
        raise ValueError(f"{LATENCY_ENV} must be >= 0. Received: {LATENCY_ENV}={raw!r}")
    return value


class LatencyFileSystem(AsyncFileSystem, _Chained):  # type: ignore[misc]
    """Another fsspec filesystem behind a fixed per-request latency, with request counts.

    Args:
        latency_ms: delay before every request, in milliseconds; None reads
            ``SOFTMIX_LATENCY_MS`` at each request (default 0).
        target_protocol: protocol of the filesystem served (default ``"file"``); set by
            fsspec from a chained URL (``latency::memory://...``).
        target_options: options for the served filesystem (credentials...).
        asynchronous, loop, batch_size: as for every `fsspec.asyn.AsyncFileSystem`.
    """

    protocol: ClassVar[tuple[str, ...]] = ("latency",)  # type: ignore[misc]
    root_marker = ""

    def __init__(
        self,
        latency_ms: float | str | None = None,
        target_protocol: str | None = None,
        target_options: dict[str, Any] | None = None,
        *,
        fo: str | None = None,  # the chained path; fsspec passes it, paths come per call
        asynchronous: bool = False,
        loop: Any = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(asynchronous=asynchronous, loop=loop, batch_size=batch_size, **kwargs)
        if latency_ms is not None:
            latency_ms = float(latency_ms)
            if latency_ms < 0:
                raise ValueError(f"`latency_ms` must be >= 0. Received: latency_ms={latency_ms}")
        self._latency_ms = latency_ms
        self.target_protocol = target_protocol or "file"
        self.target = fsspec.filesystem(self.target_protocol, **(target_options or {}))

    @property
    def latency_ms(self) -> float:
        """The delay each request waits, in milliseconds (option, else environment)."""
        return self._latency_ms if self._latency_ms is not None else _env_latency_ms()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        for prefix in ("latency::", "latency://"):
            if path.startswith(prefix):
                path = path[len(prefix) :]
        if "://" in path:  # a chained target's URL: its own protocol's form
            return fsspec.core.strip_protocol(path)
        return path.rstrip("/") or cls.root_marker

    async def _wait(self) -> None:
        delay = self.latency_ms / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # The target is used through its synchronous API, in a thread: any fsspec
        # filesystem works (async ones run on their own loop), and this loop stays free.
        return await asyncio.to_thread(getattr(self.target, method), *args, **kwargs)

    # --- reads ---------------------------------------------------------------------

    async def _cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        path = self._strip_protocol(path)
        ranged = start is not None or end is not None
        await self._wait()
        try:
            data = await self._call("cat_file", path, start=start, end=end, **kwargs)
        except BaseException:
            _count("range" if ranged else "get")
            raise
        _count("range" if ranged else "get", read=len(data))
        return data

    async def _get_file(self, rpath: str, lpath: str, **kwargs: Any) -> None:
        data = await self._cat_file(rpath)
        if os.path.isdir(lpath):
            return
        with open(lpath, "wb") as handle:
            handle.write(data)

    # --- metadata --------------------------------------------------------------------

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        await self._wait()
        _count("info")
        return await self._call("info", self._strip_protocol(path), **kwargs)

    async def _exists(self, path: str, **kwargs: Any) -> bool:
        await self._wait()
        _count("info")
        return bool(await self._call("exists", self._strip_protocol(path), **kwargs))

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        await self._wait()
        _count("list")
        return await self._call("ls", self._strip_protocol(path), detail=detail, **kwargs)

    # --- writes ----------------------------------------------------------------------

    async def _pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        # Objects need no parent "directories"; a local target does (uncounted).
        await self._call("makedirs", self.target._parent(path), exist_ok=True)
        await self._wait()
        _count("write", written=len(value))
        await self._call("pipe_file", path, value, **kwargs)

    async def _put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        if os.path.isdir(lpath):
            await self._makedirs(rpath, exist_ok=True)
            return
        with open(lpath, "rb") as handle:
            await self._pipe_file(rpath, handle.read())

    async def _rm_file(self, path: str, **kwargs: Any) -> None:
        await self._wait()
        _count("write")
        await self._call("rm_file", self._strip_protocol(path))

    async def _rm(self, path: Any, recursive: bool = False, **kwargs: Any) -> None:
        paths = await self._expand_path(path, recursive=recursive)
        # Files first, deepest directories last; a bucket has no directories to remove.
        for entry in sorted(paths, key=len, reverse=True):
            if await self._call("isdir", entry):
                await self._call("rmdir", entry)
            else:
                await self._rm_file(entry)

    async def _makedirs(self, path: str, exist_ok: bool = False) -> None:
        # Buckets have no directories: no request, no latency; the target may need them.
        await self._call("makedirs", self._strip_protocol(path), exist_ok=exist_ok)

    async def _mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        await self._call("mkdir", self._strip_protocol(path), create_parents=create_parents)

    # --- file objects ----------------------------------------------------------------

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        path = self._strip_protocol(path)
        if "r" in mode:
            return _LatencyFile(
                self,
                path,
                mode,
                block_size=block_size or "default",
                cache_options=cache_options,
                **kwargs,
            )
        return _WriteCounter(self, path, mode)


class _LatencyFile(AbstractBufferedFile):
    """A read-only file whose block fetches are counted ``range`` requests."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path, start=start, end=end)  # type: ignore[no-any-return]


class _WriteCounter(io.BytesIO):
    """A file opened for writing: one ``write`` request with its bytes on close."""

    def __init__(self, fs: LatencyFileSystem, path: str, mode: str):
        super().__init__()
        if "a" in mode and fs.exists(path):
            self.write(fs.cat_file(path))
        self._fs, self._path = fs, path

    def close(self) -> None:
        if not self.closed:
            self._fs.pipe_file(self._path, self.getvalue())
        super().close()
