"""Read the slide manifest: one row per slide with its id, location and label.

A CSV or Parquet file (read with pyarrow) with the columns ``slide_id``, ``path``
and ``label``; every other column (``patient_id``, ``group``, ``split``...) is kept
as string metadata. Relative paths are resolved against the manifest's directory;
URLs (``s3://...``) are kept as they are.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..errors import ManifestError
from ..records import SlideRecord

__all__ = ["REQUIRED_COLUMNS", "SlideManifest", "load_slide_manifest"]

REQUIRED_COLUMNS = ("slide_id", "path", "label")
_INT_LABEL = re.compile(r"[+-]?\d+")
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SlideManifest:
    """The slides of a run and its class names.

    Attributes:
        slides: one record per row, in file order.
        class_names: the classes; `SlideRecord.label_index` indexes into these.
        path: where the manifest was read from.
    """

    slides: tuple[SlideRecord, ...]
    class_names: tuple[str, ...]
    path: str = ""

    def __len__(self) -> int:
        return len(self.slides)

    def __iter__(self) -> Iterator[SlideRecord]:
        return iter(self.slides)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> dict[str, int]:
        """Slides per class name (every class listed, zero included)."""
        counts = dict.fromkeys(self.class_names, 0)
        for slide in self.slides:
            counts[slide.label] += 1
        return counts


def sort_labels(labels: Iterable[str]) -> list[str]:
    """The default class order: numeric when every label is an integer, else by text.

    >>> sort_labels(["10", "2", "0", "1"])
    ['0', '1', '2', '10']
    >>> sort_labels(["tumor", "10", "2"])
    ['10', '2', 'tumor']
    """
    unique = set(labels)
    if unique and all(_INT_LABEL.fullmatch(label) for label in unique):
        return sorted(unique, key=lambda label: (int(label), label))
    return sorted(unique)


def _is_url(path: str) -> bool:
    return "://" in path


def _resolve(path: str, base_dir: str) -> str:
    if _is_url(path):
        return path
    path = os.path.expanduser(path)
    if _is_url(base_dir):
        return path if path.startswith("/") else posixpath.join(base_dir, path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _read_table(path: str, storage_options: dict[str, Any] | None) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    is_parquet = path.lower().endswith((".parquet", ".pq"))
    if _is_url(path):
        from . import storage

        fs, inner = storage.filesystem(path, storage_options)
        data = fs.cat_file(inner)
    else:
        with open(path, "rb") as handle:
            data = handle.read()
    if is_parquet:
        try:
            return pq.read_table(pa.BufferReader(data))
        except pa.ArrowInvalid as err:
            raise ManifestError(
                f"manifest {path} is not a readable Parquet file ({err}). Write it with "
                "pyarrow/pandas, or use a CSV with a .csv extension."
            ) from err
    if not data.strip():
        raise ManifestError(
            f"manifest {path} is empty. Add a header 'slide_id,path,label' and one row per slide."
        )
    try:
        # First pass for the column names, then read every column as text so ids like
        # "007" keep their zeros.
        header = pacsv.read_csv(
            pa.BufferReader(data), read_options=pacsv.ReadOptions(block_size=1 << 16)
        ).schema.names
        return pacsv.read_csv(
            pa.BufferReader(data),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=True,
            ),
        )
    except pa.ArrowInvalid as err:
        raise ManifestError(
            f"manifest {path} is not a readable CSV file ({err}). Expected a header "
            "'slide_id,path,label' and one row per slide."
        ) from err


def load_slide_manifest(
    path: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None = None,
    group_column: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> SlideManifest:
    """Load a slide manifest (CSV or Parquet).

    Args:
        path: local path or fsspec URL of a ``.csv`` or ``.parquet`` file.
        class_names: the classes, in label-index order; default: the sorted distinct
            labels (numerically when all are integers: 0, 1, 2, 10). Labels outside a
            given list are an error.
        group_column: column whose value becomes `SlideRecord.group` (e.g.
            ``"patient_id"``, so that tiles of one patient are never paired).
        storage_options: fsspec options for a URL.

    Returns:
        The `SlideManifest`.

    Raises:
        ManifestError: missing file, empty manifest, missing columns, empty cells in
            required columns, duplicate slide ids, unknown labels or group column.

    Example (needs a manifest on disk, e.g. from ``softmix demo-data demo``)::

        manifest = load_slide_manifest("demo/manifest.csv")
        manifest.class_names  # ('he', 'ihc')
    """
    path = os.fspath(path)
    if not _is_url(path):
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise ManifestError(
                f"manifest {path} does not exist. Check the path, or build the demo data "
                "first with `softmix demo-data DIR`."
            )
    table = _read_table(path, storage_options)
    columns = list(table.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"manifest {path} lacks required column(s) {missing}. Expected at least "
            f"{list(REQUIRED_COLUMNS)}. Received columns: {columns}."
        )
    if table.num_rows == 0:
        raise ManifestError(
            f"manifest {path} is empty: it has a header but no slides. Add one row per slide."
        )
    if group_column is not None and group_column not in columns:
        raise ManifestError(
            f"group column {group_column!r} is not in manifest {path}. "
            f"Received columns: {columns}. Use one of them or no group column."
        )
    rows = [
        {name: (None if value is None else str(value).strip()) for name, value in row.items()}
        for row in table.to_pylist()
    ]
    for line, row in enumerate(rows, start=1):
        empty = [c for c in REQUIRED_COLUMNS if not row[c]]
        if empty:
            raise ManifestError(
                f"manifest {path} row {line} has empty {empty}. Every slide needs a "
                "slide_id, a path and a label."
            )
    seen: dict[str, int] = {}
    duplicates = []
    for row in rows:
        seen[row["slide_id"]] = seen.get(row["slide_id"], 0) + 1
        if seen[row["slide_id"]] == 2:
            duplicates.append(row["slide_id"])
    if duplicates:
        raise ManifestError(
            f"manifest {path} has duplicate slide_id(s) {duplicates}. Slide ids must be "
            "unique: they name the tiles."
        )
    labels = sort_labels({row["label"] for row in rows})
    if class_names is None:
        names = tuple(labels)
    else:
        names = tuple(str(c) for c in class_names)
        if len(set(names)) != len(names) or not names:
            raise ManifestError(
                f"`class_names` must be non-empty and distinct. Received: {list(names)}"
            )
        unknown = [label for label in labels if label not in names]
        if unknown:
            raise ManifestError(
                f"manifest {path} has unknown label(s) {unknown}; known classes are "
                f"{list(names)}. Fix the labels or add the classes to class_names."
            )
    base_dir = posixpath.dirname(path) if _is_url(path) else os.path.dirname(os.path.abspath(path))
    extra = [c for c in columns if c not in REQUIRED_COLUMNS]
    slides = tuple(
        SlideRecord(
            slide_id=row["slide_id"],
            path=_resolve(row["path"], base_dir),
            label=row["label"],
            label_index=names.index(row["label"]),
            group=(row[group_column] or None) if group_column is not None else None,
            metadata=tuple((c, row[c] or "") for c in extra),
        )
        for row in rows
    )
    return SlideManifest(slides=_mark_duplicate_paths(slides, path), class_names=names,
                         path=path)


def _same_slide_key(path: str) -> str:
    if _is_url(path):
        return path.rstrip("/")
    return os.path.realpath(path)


def _mark_duplicate_paths(slides: Sequence[SlideRecord], manifest: str
                          ) -> tuple[SlideRecord, ...]:
    """Mark rows whose slide (resolved path) an earlier row already names.

    Such a row is planned as a failure (``duplicate_path``: counted under
    ``slides_failed``, an error with ``--on-error fail``), so the slide is read and
    packed once, and a warning names both rows.
    """
    first: dict[str, str] = {}
    out = []
    repeated: dict[str, list[str]] = {}
    for record in slides:
        key = _same_slide_key(record.path)
        if key in first:
            record = dataclasses.replace(record, duplicate_of=first[key])
            repeated.setdefault(first[key], []).append(record.slide_id)
        else:
            first[key] = record.slide_id
        out.append(record)
    for original, others in repeated.items():
        shown = ", ".join(repr(o) for o in others[:5]) + (" ..." if len(others) > 5 else "")
        logger.warning("manifest %s: %d row(s) (%s) name the slide of row %r again; the "
                       "slide is used once, the other rows are counted as failed "
                       "(duplicate_path)", manifest, len(others), shown, original)
    return tuple(out)
