"""One storage layer for every byte the job writes or reads: local paths and fsspec URLs.

Slides, the manifest, staging (plans, tile packs, buckets), shards, ``manifest.json``,
the TFDS metadata, the preview and the lock all go through this module, so a run works
the same on a disk, on ``gs://``, ``s3://``, ``az://`` or ``memory://``.

Commit without rename: object stores have no atomic rename (``mv`` is copy + delete),
but a single object upload becomes visible whole or not at all. So local files are
written to a temporary name and `os.replace`-d; objects are uploaded directly under
their final name (large files are staged in a local temporary file first, so a failed
writer uploads nothing). An artifact counts as complete only when the sidecar or
``manifest.json`` written *after* it says so; readers check that, never the data alone.

Storage options (credentials, endpoints...) come from `configure` (the CLI's
``--storage-options`` JSON, ``OutputConfig.storage_options``, the ``storage_options=``
keyword of `stream_dataset` / `read_dataset`) and are applied to every filesystem the
process opens. Either one flat dict (given to every remote filesystem) or one dict per
protocol: ``{"s3": {"endpoint_url": "http://..."}, "gs": {"token": "anon"}}``. They
also travel to worker processes in ``SOFTMIX_STORAGE_OPTIONS`` (JSON) and in the job
config. fsspec's own conventions keep working underneath: ``FSSPEC_S3_ENDPOINT_URL``
style variables and ``~/.config/fsspec/*.json`` (fsspec.config), ``AWS_ENDPOINT_URL``,
``AWS_*`` credentials, ``STORAGE_EMULATOR_HOST`` and Google default credentials.

Request accounting: every request this module sends is counted in `STATS` (reads,
writes, listings, metadata look-ups such as HEAD, and bytes each way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import posixpath
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

from ..errors import PipelineError

__all__ = [
    "STATS",
    "ENV_OPTIONS",
    "StoreStats",
    "configure",
    "counting",
    "create_exclusive",
    "current_options",
    "ensure",
    "exists",
    "filesystem",
    "is_url",
    "isdir",
    "join",
    "listdir",
    "makedirs",
    "modified",
    "move",
    "open_read",
    "read_bytes",
    "read_json",
    "read_ranges",
    "read_text",
    "remove",
    "rmtree",
    "size",
    "stat",
    "write_bytes",
    "write_json",
    "write_text",
    "writer",
]

ENV_OPTIONS = "SOFTMIX_STORAGE_OPTIONS"
_LOCAL = ("", "file", "local")
# The client package behind each protocol (for a clear error when it is missing).
CLIENTS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
           "abfs": "adlfs", "abfss": "adlfs", "adl": "adlfs"}
# Uploads up to this size go from memory; larger ones through a local temporary file.
_SPOOL_BYTES = 64 << 20

_options: dict[str, Any] | None = None
_lock = threading.Lock()


@dataclasses.dataclass
class StoreStats:
    """Requests this process sent to remote stores (local files are not counted).

    Attributes:
        reads: GET requests (whole objects and byte ranges).
        writes: PUT requests (uploads, exclusive creates).
        metadata: HEAD-like look-ups (exists, size, modification time).
        listings: LIST requests.
        deletes: DELETE requests.
        bytes_read: bytes returned by reads.
        bytes_written: bytes uploaded.
    """

    reads: int = 0
    writes: int = 0
    metadata: int = 0
    listings: int = 0
    deletes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    @property
    def requests(self) -> int:
        return self.reads + self.writes + self.metadata + self.listings + self.deletes

    def add(self, **counts: int) -> None:
        with _lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)
        mine = getattr(_thread, "counts", None)
        if mine is not None:
            for name, value in counts.items():
                mine[name] = mine.get(name, 0) + value

    def snapshot(self) -> dict[str, int]:
        with _lock:
            values = dataclasses.asdict(self)
        values["requests"] = sum(values[k] for k in
                                 ("reads", "writes", "metadata", "listings", "deletes"))
        return values

    def reset(self) -> None:
        with _lock:
            for field in dataclasses.fields(self):
                setattr(self, field.name, 0)


STATS = StoreStats()
_thread = threading.local()


@contextlib.contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Count the requests this thread sends through this module inside the block.

    Yields a dict that holds, once the block exits, ``requests`` (all kinds),
    ``writes`` and ``bytes_written`` (a task's share of `STATS`, thread-exact).
    """
    outer = getattr(_thread, "counts", None)
    _thread.counts = {}
    result: dict[str, int] = {}
    try:
        yield result
    finally:
        mine = _thread.counts
        _thread.counts = outer
        if outer is not None:
            for name, value in mine.items():
                outer[name] = outer.get(name, 0) + value
        result["requests"] = sum(mine.get(k, 0) for k in
                                 ("reads", "writes", "metadata", "listings", "deletes"))
        result["writes"] = mine.get("writes", 0)
        result["bytes_written"] = mine.get("bytes_written", 0)


# --- Options ------------------------------------------------------------------------------


def parse_options(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Storage options from a JSON object string (or a dict), checked.

    >>> parse_options('{"s3": {"endpoint_url": "http://127.0.0.1:9000"}}')
    {'s3': {'endpoint_url': 'http://127.0.0.1:9000'}}

    Raises:
        PipelineError: not a JSON object.
    """
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    try:
        value = json.loads(text)
    except ValueError as err:
        raise PipelineError(
            f"--storage-options must be a JSON object, e.g. '{{\"endpoint_url\": "
            f"\"http://127.0.0.1:9000\"}}' or '{{\"s3\": {{...}}, \"gs\": {{...}}}}'. "
            f"Received: {text!r} ({err}).") from None
    if not isinstance(value, dict):
        raise PipelineError(f"--storage-options must be a JSON object. Received: {text!r}.")
    return value


def configure(options: Mapping[str, Any] | str | None) -> None:
    """Set the storage options of this process (and of the workers it starts).

    `options` is applied to every remote filesystem opened afterwards; None or {}
    keeps only fsspec's own configuration. Also exported as ``SOFTMIX_STORAGE_OPTIONS``
    so that worker processes started from here (Beam, Dask) see the same options.
    """
    global _options
    parsed = parse_options(options)
    _options = parsed
    if parsed:
        os.environ[ENV_OPTIONS] = json.dumps(parsed, sort_keys=True)
    else:
        os.environ.pop(ENV_OPTIONS, None)


def ensure(options: str | Mapping[str, Any] | None) -> None:
    """`configure(options)` on a worker when the job config carries options (no-op for
    None, or when they are already in force)."""
    if options is None or options == "":
        return
    if parse_options(options) != current_options():
        configure(options)


def current_options() -> dict[str, Any]:
    """The storage options in force (set by `configure`, or inherited from the parent)."""
    global _options
    if _options is None:
        _options = parse_options(os.environ.get(ENV_OPTIONS))
    return dict(_options)


def protocol(path: str) -> str:
    """The fsspec protocol of `path` ("" for a local path; "s3" for ``s3://b/k``)."""
    if "://" not in path:
        return ""
    return path.split("://", 1)[0].split("::")[-1].lower()


def is_url(path: str) -> bool:
    """Whether `path` is a URL of a remote (non-local) filesystem.

    >>> is_url("s3://bucket/out"), is_url("/tmp/out"), is_url("file:///tmp/out")
    (True, False, False)
    """
    return protocol(str(path)) not in _LOCAL


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def options_for(path: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options for the filesystem of `path`.

    A per-protocol dict (every value a dict and every key a known protocol, or
    ``"*"``) gives ``options[protocol]`` (plus ``options["*"]``); a flat dict is given
    to every remote filesystem as is.
    """
    proto = protocol(path)
    if proto in _LOCAL:
        return {}
    source = current_options() if options is None else dict(options)
    if source and all(isinstance(v, dict) for v in source.values()):
        merged = dict(source.get("*", {}))
        aliases = {"gcs": "gs", "s3a": "s3", "abfs": "az", "abfss": "az"}
        for key, value in source.items():
            if key != "*" and aliases.get(key, key) == aliases.get(proto, proto):
                merged.update(value)
    else:
        merged = source
    if proto in ("s3", "s3a"):
        # s3fs sends a HEAD (for the size) before every whole-object GET unless its
        # concurrent download is off; our objects (chunks, indexes, sidecars) are small.
        merged.setdefault("max_concurrency", 1)
    return merged


def filesystem(path: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """`(fsspec filesystem, path inside it)` for `path`, with the storage options.

    Raises:
        PipelineError: the protocol's client package is not installed (names it).
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(path, **options_for(path, options))
    except ImportError as err:
        package = CLIENTS.get(protocol(path), "the fsspec implementation")
        raise PipelineError(
            f"Cannot open {path!r}: the {protocol(path)}:// client {package!r} is not "
            f"installed ({err}). Install it (pip install {package}, or run "
            "scripts/setup.sh, which installs s3fs, gcsfs and adlfs).") from None
    except ValueError as err:
        if "Protocol not known" in str(err):
            raise PipelineError(
                f"Cannot open {path!r}: unknown URL scheme {protocol(path)!r}. Use a local "
                "path or an fsspec URL (gs://, s3://, az://, memory://...).") from None
        raise


def storage_options_for(path: str) -> dict[str, Any] | None:
    """Options to hand to a library that opens `path` itself (zarr, pandas)."""
    return options_for(path) or None


# --- Paths --------------------------------------------------------------------------------


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` (URLs and local paths alike).

    >>> join("s3://bucket/out", "staging", "x.json")
    's3://bucket/out/staging/x.json'
    """
    return posixpath.join(base, *parts)


# --- Reading ------------------------------------------------------------------------------


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(_local(path))
    fs, inner = filesystem(path)
    STATS.add(metadata=1)
    return fs.exists(inner)


def isdir(path: str) -> bool:
    """A local directory, or (object stores) a prefix that holds objects."""
    if not is_url(path):
        return os.path.isdir(_local(path))
    fs, inner = filesystem(path)
    STATS.add(listings=1)
    return fs.isdir(inner)


def listdir(path: str) -> list[str]:
    """Base names directly under `path` (files and sub-directories), sorted; [] if none."""
    if not is_url(path):
        try:
            return sorted(os.listdir(_local(path)))
        except FileNotFoundError:
            return []
    fs, inner = filesystem(path)
    STATS.add(listings=1)
    try:
        entries = fs.ls(inner, detail=False, refresh=True)
    except FileNotFoundError:
        return []
    inner = inner.rstrip("/")
    return sorted({posixpath.basename(e.rstrip("/")) for e in entries
                   if e.rstrip("/") != inner})


def size(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(_local(path))
    fs, inner = filesystem(path)
    STATS.add(metadata=1)
    return int(fs.size(inner))


def modified(path: str) -> float | None:
    """Modification time of `path` (seconds since the epoch), None when unknown."""
    if not is_url(path):
        try:
            return os.path.getmtime(_local(path))
        except OSError:
            return None
    fs, inner = filesystem(path)
    STATS.add(metadata=1)
    try:
        return fs.modified(inner).timestamp()
    except (NotImplementedError, OSError, AttributeError):
        return None


# Where `info` holds the modification time that `fs.modified` returns (s3fs, gcsfs,
# adlfs): one metadata request gives size and time.
_INFO_MODIFIED = ("LastModified", "mtime", "last_modified")


def stat(path: str) -> tuple[int, float | None]:
    """`(size, modification time or None)` of `path`: `size` and `modified` in one
    metadata request where the store's `info` carries the time."""
    if not is_url(path):
        result = os.stat(_local(path))
        return result.st_size, result.st_mtime
    fs, inner = filesystem(path)
    STATS.add(metadata=1)
    info = fs.info(inner)
    for key in _INFO_MODIFIED:
        value = info.get(key)
        if value is not None:
            stamp = value.timestamp() if hasattr(value, "timestamp") else float(value)
            return int(info["size"]), stamp
    return int(info["size"]), modified(path)


def read_bytes(path: str) -> bytes:
    """The whole content of `path` (FileNotFoundError when absent)."""
    if not is_url(path):
        with open(_local(path), "rb") as handle:
            return handle.read()
    fs, inner = filesystem(path)
    data = fs.cat_file(inner)  # one GET, no HEAD before it
    STATS.add(reads=1, bytes_read=len(data))
    return data


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    """Parsed JSON of `path` (FileNotFoundError when absent, ValueError when broken)."""
    return json.loads(read_bytes(path))


def read_ranges(path: str, ranges: Sequence[tuple[int, int]], *,
                gap: int = 1 << 20) -> list[bytes]:
    """The byte ranges ``(offset, length)`` of `path`, in order.

    Neighbouring ranges (at most `gap` bytes apart) are coalesced into one request
    (one GET for a whole run of tiles of a pack); the others are fetched concurrently.

    Raises:
        OSError: the file is shorter than a range (named, with what was wanted).
    """
    if not ranges:
        return []
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    spans: list[list[int]] = []  # [start, end, *indices]
    for i in order:
        start, length = ranges[i]
        if spans and start <= spans[-1][1] + gap:
            spans[-1][1] = max(spans[-1][1], start + length)
            spans[-1].append(i)
        else:
            spans.append([start, start + length, i])
    if not is_url(path):
        with open(_local(path), "rb") as handle:
            blobs = []
            for start, end, *_ in spans:
                handle.seek(start)
                blobs.append(handle.read(end - start))
    else:
        fs, inner = filesystem(path)
        blobs = fs.cat_ranges([inner] * len(spans), [s[0] for s in spans],
                              [s[1] for s in spans])
        STATS.add(reads=len(spans), bytes_read=sum(len(b) for b in blobs))
    out: list[bytes] = [b""] * len(ranges)
    for (start, _end, *indices), blob in zip(spans, blobs, strict=True):
        if isinstance(blob, Exception):
            raise OSError(f"cannot read {path}: {blob}")
        for i in indices:
            offset, length = ranges[i]
            data = blob[offset - start: offset - start + length]
            if len(data) != length:
                raise OSError(f"{path} is truncated: wanted {length} bytes at {offset}, got "
                              f"{len(data)}. Rerun with --overwrite.")
            out[i] = data
    return out


@contextlib.contextmanager
def open_read(path: str, *, block_size: int = 8 << 20) -> Iterator[IO[bytes]]:
    """A binary file object to read `path` sequentially (ranged GETs of `block_size`)."""
    if not is_url(path):
        with open(_local(path), "rb") as handle:
            yield handle
        return
    fs, inner = filesystem(path)
    STATS.add(metadata=1)  # opening looks the object up (its size)
    with fs.open(inner, "rb", block_size=block_size, cache_type="readahead") as handle:
        yield _CountingReader(handle, block_size)


class _CountingReader:
    def __init__(self, handle: Any, block_size: int):
        self._handle = handle
        self._block = block_size
        self._fetched = 0

    def read(self, n: int = -1) -> bytes:
        data = self._handle.read(n)
        end = self._handle.tell()
        gets = 0
        while self._fetched < end:  # about one ranged GET per block reached
            self._fetched += self._block
            gets += 1
        STATS.add(reads=gets, bytes_read=len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


# --- Writing ------------------------------------------------------------------------------


def makedirs(path: str) -> None:
    """Create a local directory (and parents). Object stores have no directories: no-op."""
    if not is_url(path):
        os.makedirs(_local(path), exist_ok=True)
    elif protocol(path) == "memory":
        fs, inner = filesystem(path)
        fs.makedirs(inner, exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
    """Write `path` whole: local temp + `os.replace`; one object PUT on a store.

    Readers never see a partial file under `path` (a store shows an object only once
    its upload completed).
    """
    if not is_url(path):
        with writer(path) as handle:  # the same temp + os.replace as every local write
            handle.write(data)
        return
    fs, inner = filesystem(path)
    fs.pipe_file(inner, bytes(data))
    STATS.add(writes=1, bytes_written=len(data))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, payload: Any, *, indent: int | None = None) -> None:
    write_bytes(path, (json.dumps(payload, indent=indent) + ("\n" if indent else "")).encode())


def create_exclusive(path: str, data: bytes) -> None:
    """Create `path` with `data` only if it does not exist yet, atomically.

    Local: ``O_CREAT | O_EXCL``. Object stores: the store's precondition (S3
    conditional PUT ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, Azure
    ``If-None-Match: *``): of two racing writers exactly one succeeds.

    Raises:
        FileExistsError: `path` exists (someone else created it first).
    """
    if not is_url(path):
        fd = os.open(_local(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return
    fs, inner = filesystem(path)
    STATS.add(writes=1, bytes_written=len(data))
    if protocol(path) in ("az", "abfs", "abfss"):  # adlfs: upload with If-None-Match: *
        try:
            fs.pipe_file(inner, bytes(data), overwrite=False)
        except Exception as err:
            if "exist" in f"{type(err).__name__} {err}".lower():
                raise FileExistsError(path) from err
            raise
        return
    try:
        fs.pipe_file(inner, bytes(data), mode="create")
    except FileExistsError:
        raise
    except TypeError:  # a filesystem without exclusive create
        if protocol(path) != "memory":
            raise PipelineError(
                f"The {protocol(path)}:// filesystem cannot create {path!r} exclusively "
                "(no conditional write), so two runs could both take the lock. Use gs://, "
                "s3:// or a local --out.") from None
        if fs.exists(inner):
            raise FileExistsError(path) from None
        fs.pipe_file(inner, bytes(data))
    except OSError as err:
        if "precondition" in str(err).lower() or getattr(err, "errno", None) == 17:
            raise FileExistsError(path) from err
        raise


@contextlib.contextmanager
def writer(path: str) -> Iterator[IO[bytes]]:
    """A binary file to write `path`; the file appears under `path` only when the block
    exits without error (local: temp + `os.replace`; store: one upload at the end).
    Nothing is left behind on error."""
    if not is_url(path):
        local = _local(path)
        directory, base = os.path.split(local)
        if directory:
            os.makedirs(directory, exist_ok=True)
        temp = os.path.join(directory, f".{base}.tmp-{uuid.uuid4().hex}")
        try:
            with open(temp, "wb") as handle:
                yield handle
            os.replace(temp, local)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temp)
            raise
        return
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        yield spool
        spool.flush()
        nbytes = spool.tell()
        fs, inner = filesystem(path)
        spool.seek(0)
        if nbytes <= _SPOOL_BYTES:
            fs.pipe_file(inner, spool.read())
        else:  # a multipart upload, completed only if every part went up
            out = fs.open(inner, "wb", block_size=32 << 20)
            try:
                while block := spool.read(32 << 20):
                    out.write(block)
            except BaseException:
                with contextlib.suppress(Exception):
                    out.discard()  # abort: nothing appears under `path`
                raise
            out.close()
        STATS.add(writes=max(1, -(-nbytes // (32 << 20))), bytes_written=nbytes)


def move(source: str, target: str) -> None:
    """Move a file: `os.replace` on a disk, a server-side copy then a delete on a store."""
    if not is_url(source) and not is_url(target):
        os.replace(_local(source), _local(target))
        return
    fs, inner = filesystem(source)
    _, target_inner = filesystem(target)
    fs.cp_file(inner, target_inner)  # server-side copy; `copy` would list both paths
    STATS.add(metadata=1, writes=1)
    remove(source)


# --- Removing -----------------------------------------------------------------------------


def remove(path: str, *, missing_ok: bool = True) -> bool:
    """Delete the file `path`; returns whether it existed (best known)."""
    if not is_url(path):
        try:
            os.remove(_local(path))
            return True
        except FileNotFoundError:
            if missing_ok:
                return False
            raise
    fs, inner = filesystem(path)
    STATS.add(deletes=1)
    try:
        fs.rm_file(inner)
        return True
    except FileNotFoundError:
        if missing_ok:
            return False
        raise


def rmtree(path: str) -> None:
    """Delete `path` and everything under it (no error when absent)."""
    if not is_url(path):
        import shutil

        shutil.rmtree(_local(path), ignore_errors=True)
        return
    fs, inner = filesystem(path)
    STATS.add(listings=1, deletes=1)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(inner, recursive=True)
