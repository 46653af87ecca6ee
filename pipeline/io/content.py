"""Content fingerprints of slides: has a slide changed since an artifact was made from it?

A resumed run must not reuse plans, tile packs, buckets or shards made from pixels
that have since changed in place (same path, same metadata). Hashing the pixels would
cost a full read; instead a slide's fingerprint is computed from its store's listing:

- every file (object) under the slide's path: its relative name, its size and its
  version token: ``st_mtime_ns`` and ``st_ctime_ns`` on a local disk (the ctime changes
  on every write, even one that restores the mtime), the ``generation`` / ``ETag`` /
  ``md5Hash`` / last-modified time that object stores report (whichever the fsspec
  filesystem's listing gives);
- the bytes of every Zarr metadata document (``zarr.json``, ``.zarray``, ``.zattrs``,
  ``.zgroup``, ``.zmetadata``), hashed.

One recursive listing per slide (``os.walk`` locally, ``fs.find(detail=True)``
elsewhere: a paginated list of the slide's prefix on S3/GCS), never a request per
chunk. A slide whose store cannot be listed has no fingerprint (None): nothing made
from it is ever reused.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

__all__ = ["slide_fingerprint"]

_METADATA_NAMES = ("zarr.json", ".zattrs", ".zarray", ".zgroup", ".zmetadata")
_VERSION_KEYS = ("generation", "ETag", "etag", "md5Hash", "LastModified", "last_modified",
                 "mtime", "updated", "created")


def slide_fingerprint(path: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """A short digest of the listing (names, sizes, versions) and metadata of `path`.

    Returns None when the store cannot be listed (then nothing is reused).
    """
    digest = hashlib.sha256()
    try:
        entries = (_local_entries(path) if "://" not in path
                   else _remote_entries(path, storage_options or {}))
    except (OSError, ValueError, ImportError, NotImplementedError):
        return None
    if not entries:
        return None
    for entry in sorted(entries):
        digest.update(repr(entry).encode())
    return digest.hexdigest()[:24]


def _local_entries(path: str) -> list[tuple[Any, ...]]:
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        stat = os.stat(path)
        return [("", stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)]
    out: list[tuple[Any, ...]] = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in files:
            full = os.path.join(root, name)
            stat = os.stat(full)
            entry: tuple[Any, ...] = (os.path.relpath(full, path), stat.st_size,
                                      stat.st_mtime_ns, stat.st_ctime_ns)
            if name in _METADATA_NAMES:
                with open(full, "rb") as handle:
                    entry += (hashlib.sha256(handle.read()).hexdigest(),)
            out.append(entry)
    return out


def _remote_entries(path: str, options: dict[str, Any]) -> list[tuple[Any, ...]]:
    from . import storage

    fs, root = storage.filesystem(path, options or None)
    root = root.rstrip("/")
    if fs.isfile(root):
        info = fs.info(root)
        return [("", info.get("size"), _version(info))]
    listing = fs.find(root, detail=True, withdirs=False)
    out: list[tuple[Any, ...]] = []
    for name, info in listing.items():
        relative = name[len(root):].lstrip("/") if name.startswith(root) else name
        entry: tuple[Any, ...] = (relative, info.get("size"), _version(info))
        if relative.rsplit("/", 1)[-1] in _METADATA_NAMES:
            entry += (hashlib.sha256(fs.cat_file(name)).hexdigest(),)
        out.append(entry)
    return out


def _version(info: dict[str, Any]) -> str:
    return repr(tuple((key, str(info[key])) for key in _VERSION_KEYS if key in info))
