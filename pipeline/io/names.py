"""Names read from files on disk are data, never authority.

Every name SoftMix acts on (deletes, renames, overwrites, reads) that it takes from a
file it finds on disk (``manifest.json``'s ``files``/``shards``, demo-data's
``.softmix-demo.json``, sidecars, ``run.json``) goes through `recorded_name` first:
only a plain name inside the directory that file describes is accepted. A path with a
``/`` (unless the record's layout has sub-folders), ``..``, an absolute path, a
Windows drive or a URL scheme is refused by name, before anything is touched.
"""

from __future__ import annotations

import re

from ..errors import PipelineError

__all__ = ["RecordedNameError", "recorded_name"]

# A drive ("C:"), a URL scheme ("gs:", "file:"), or any colon: never in our own names.
_PLAIN_PART = re.compile(r"^[^/\\:\x00]+$")


class RecordedNameError(PipelineError):
    """A file on disk lists a name that is not a plain name inside its directory."""


def recorded_name(name: object, *, record: str, root: str, subfolders: bool = False,
                  reserved: tuple[str, ...] = ()) -> str:
    """Check one name read from `record` before SoftMix acts on ``root/name``.

    Args:
        name: the value found in the record.
        record: the file the name was read from (for the message).
        root: the directory the name must stay inside (for the message).
        subfolders: allow ``a/b`` made of plain parts (demo-data records
            ``slides/<id>.ome.zarr``); otherwise only a single plain name.
        reserved: names that are never the record's to list (e.g. the lock file).

    Returns:
        `name`, unchanged.

    Raises:
        RecordedNameError: naming the record, the entry and what is allowed; the
            caller must then touch nothing.

    >>> recorded_name("softmix-00000-of-00001.tfrecord", record="m.json", root="o")
    'softmix-00000-of-00001.tfrecord'
    >>> recorded_name("../victim.txt", record="m.json", root="o")
    Traceback (most recent call last):
    ...
    pipeline.io.names.RecordedNameError: m.json lists '../victim.txt', which is not ...
    """
    parts = name.split("/") if isinstance(name, str) and subfolders else [name]
    ok = isinstance(name, str) and bool(name) and all(
        isinstance(p, str) and _PLAIN_PART.match(p) and p not in (".", "..")
        and p.strip() == p for p in parts)
    if ok and name not in reserved:
        return name  # type: ignore[return-value]
    kind = "a plain relative path" if subfolders else "a plain file name"
    why = ("that name is SoftMix's own bookkeeping, never a dataset file" if ok else
           f"'..', absolute paths, drives and URLs{'' if subfolders else ' and /'} "
           "are refused")
    raise RecordedNameError(
        f"{record} lists {name!r}, which is not {kind} inside {root!r} ({why}). "
        "The record was edited or is not SoftMix's own, so nothing was deleted or "
        f"replaced. Fix or remove that entry of {record}, or choose another directory."
    )
