"""What a run did to every tile, kept in OUT for the run report (`softmix report`).

The staging folder (plans, tile packs, bucket sidecars) is removed when a run publishes,
and ``manifest.json`` holds only counts. Just before the manifest is written,
`publish_report_files` condenses the staging folder into one small file,
``OUT/report/tiles.json.gz``, so that the report can later draw which tiles of each
slide were used or skipped, and why, without rerunning anything:

- the slides of the run (id, path, label; from the run's fingerprint, ``run.json``);
- per planned slide: its tiled level, the number of background tiles (their positions
  are the tile grid minus the kept tiles), the kept tiles by status (``used``,
  ``no_partner``, ``read_error``, ``missing_chunk``, ``nonfinite_pixels``, or
  ``not_packed`` for a slide dropped after planning, e.g. ``incompatible_pixels``) as
  flat ``[x0, y0, x1, y1, ...]`` lists, and the slide's reads (planning + packing);
- the run's timeline: when the run started and when its last plan, pack, bucket and
  shard were finished (file modification times of the staging folder), and when it
  published.

Engine-independent: it reads only the files every engine leaves in staging. Tiles are
"used" when some written example has them as source ``a`` (bucket sidecars list the
example ids ``<slide>/L<level>/x<x>/y<y>#...``).
"""

from __future__ import annotations

import collections
import datetime
import gzip
import json
import logging
import posixpath
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "REPORT_DIR",
    "REPORT_FILES",
    "REPORT_HTML",
    "TILE_RECORD",
    "build_tile_record",
    "publish_report_files",
    "read_tile_record",
]

REPORT_HTML = "report.html"
REPORT_DIR = "report"
# The dataset's report files (listed in manifest.json's "files").
REPORT_FILES = (REPORT_HTML, REPORT_DIR)
TILE_RECORD = posixpath.join(REPORT_DIR, "tiles.json.gz")
TILE_RECORD_FORMAT = "softmix.tiles/1"

_log = logging.getLogger(__name__)


def _fs(path: str) -> tuple[Any, str]:
    from ..io import storage

    return storage.filesystem(path)  # with the run's storage options


def _mtime(info: Mapping[str, Any]) -> float | None:
    """Modification time (UNIX seconds) of an fsspec `info` entry, any backend."""
    for key in ("mtime", "updated", "LastModified", "last_modified", "modified"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime.datetime):
            return value.timestamp()
        try:
            return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


def _listing(fs: Any, directory: str, suffix: str) -> list[dict[str, Any]]:
    try:
        entries = fs.ls(directory, detail=True)
    except (FileNotFoundError, OSError):
        return []
    return [e for e in entries if e.get("type") != "directory" and e["name"].endswith(suffix)
            and ".tmp-" not in posixpath.basename(e["name"])]


def _read_all(fs: Any, entries: Iterable[Mapping[str, Any]]) -> list[Any]:
    paths = [e["name"] for e in entries]
    if not paths:
        return []
    blobs = fs.cat(paths, on_error="omit")
    out = []
    for path in paths:
        try:
            out.append(json.loads(blobs[path]))
        except (KeyError, ValueError):
            continue
    return out


def _tile_of(example_id: str) -> tuple[str, int, int, int] | None:
    """``(slide_id, level, x, y)`` of source ``a`` of an example id."""
    key = example_id.rsplit("#", 1)[0]
    parts = key.rsplit("/", 3)
    if len(parts) != 4 or parts[1][:1] != "L" or parts[2][:1] != "x" or parts[3][:1] != "y":
        return None
    try:
        return parts[0], int(parts[1][1:]), int(parts[2][1:]), int(parts[3][1:])
    except ValueError:
        return None


def build_tile_record(staging: str) -> dict[str, Any]:
    """The tile record of the run whose staging folder is `staging` (see module doc)."""
    fs, root = _fs(staging)
    run = {}
    try:
        run = json.loads(fs.cat(posixpath.join(root, "run.json")))
        started = _mtime(fs.info(posixpath.join(root, "run.json")))
    except (FileNotFoundError, OSError, ValueError):
        started = None
    fingerprint = run.get("fingerprint") or {}
    slides_in = fingerprint.get("slides") or {}

    plan_entries = _listing(fs, posixpath.join(root, "plans"), ".plan")  # data, not sidecars
    pack_entries = _listing(fs, posixpath.join(root, "packs"), ".json")
    bucket_entries = _listing(fs, posixpath.join(root, "buckets"), ".json")
    shard_entries = _listing(fs, root, ".tfrecord.json")

    used: dict[str, set[tuple[int, int]]] = collections.defaultdict(set)
    for sidecar in _read_all(fs, bucket_entries):
        for example_id in sidecar.get("ids", []):
            tile = _tile_of(example_id)
            if tile is not None:
                used[tile[0]].add((tile[2], tile[3]))

    readable: dict[str, set[tuple[int, int]]] = collections.defaultdict(set)
    unusable: dict[str, dict[tuple[int, int], str]] = collections.defaultdict(dict)
    pack_reads: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    packed_slides: set[str] = set()
    for index in _read_all(fs, pack_entries):
        sid = index.get("slide_id")
        packed_slides.add(sid)
        readable[sid].update((t[0], t[1]) for t in index.get("tiles", []))
        result = index.get("result", {})
        for x, y, reason in index.get("skipped_tiles", []):
            unusable[sid][(x, y)] = reason
        reads = pack_reads[sid]
        reads[0] += int(result.get("chunks_read", 0))
        reads[1] += int(result.get("bytes_read", 0))
        reads[2] += int(result.get("requests", 0))

    slides: dict[str, dict[str, Any]] = {}
    for sid, info in sorted(slides_in.items()):
        slides[sid] = {"path": info.get("path"), "label": info.get("label"), "planned": False}
    for plan in _read_all(fs, plan_entries):
        sid = plan.get("slide_id")
        entry = slides.setdefault(sid, {"path": None, "label": None})
        by_status: dict[str, list[int]] = collections.defaultdict(list)
        for x, y, *_ in plan.get("tiles", []):
            if (x, y) in used[sid]:
                status = "used"
            elif (x, y) in readable[sid]:
                status = "no_partner"
            elif (x, y) in unusable[sid]:
                status = unusable[sid][(x, y)]
            else:
                status = "not_packed" if sid not in packed_slides else "unreadable"
            by_status[status] += [x, y]
        skipped = {reason: int(n) for reason, n in plan.get("skipped", [])}
        chunks, nbytes, requests = (int(v) for v in plan.get("reads", [0, 0, 0]))
        extra = pack_reads.get(sid, [0, 0, 0])
        entry.update({
            "planned": True,
            "level": int(plan.get("level", 0)),
            "background": skipped.pop("background", 0),
            "plan_skipped": skipped,
            "tiles": dict(sorted(by_status.items())),
            "reads": {"chunks_read": chunks + extra[0], "bytes_read": nbytes + extra[1],
                      "requests": requests + extra[2]},
        })

    def last(entries: list[dict[str, Any]]) -> float | None:
        times = [t for t in (_mtime(e) for e in entries) if t is not None]
        return max(times) if times else None

    timeline = {"started": started, "last_plan": last(plan_entries),
                "last_pack": last(pack_entries), "last_bucket": last(bucket_entries),
                "last_shard": last(shard_entries), "published": time.time()}
    return {"format": TILE_RECORD_FORMAT, "slides": slides, "timeline": timeline}


def publish_report_files(out_dir: str, staged_dir: str | None) -> None:
    """Replace the report files of an old dataset in `out_dir` and write the new run's
    tile record (`build_tile_record` of `staged_dir`) into ``OUT/report/``.

    Called by `output.finalize_output` before ``manifest.json`` is written. A failure
    here never fails the run: it is logged, and `softmix report` then draws slides
    without their tiles.
    """
    try:
        fs, root = _fs(out_dir)
        for name in REPORT_FILES:  # an old dataset's report: stale once this run publishes
            path = posixpath.join(root, name)
            if fs.exists(path):
                fs.rm(path, recursive=True)
        if staged_dir is None:
            return
        record = build_tile_record(staged_dir)
        fs.makedirs(posixpath.join(root, REPORT_DIR), exist_ok=True)
        payload = gzip.compress(json.dumps(record, separators=(",", ":")).encode(), mtime=0)
        with fs.open(posixpath.join(root, TILE_RECORD), "wb") as handle:
            handle.write(payload)
    except Exception as err:  # noqa: BLE001 - the report is secondary to the dataset
        _log.warning("softmix: could not write the run's tile record for the report "
                     "(%s: %s); `softmix report` will show slides without their tiles.",
                     type(err).__name__, err)


def read_tile_record(out_dir: str) -> dict[str, Any] | None:
    """The tile record of the dataset in `out_dir`, or None when it has none."""
    fs, root = _fs(out_dir)
    path = posixpath.join(root, TILE_RECORD)
    try:
        with fs.open(path, "rb") as handle:
            record = json.loads(gzip.decompress(handle.read()))
    except (FileNotFoundError, OSError, ValueError):
        return None
    return record if record.get("format") == TILE_RECORD_FORMAT else None
