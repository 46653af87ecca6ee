"""Chunk-once reading: cut every kept tile out of decoded chunks, once, into tile packs.

The design (issue 8), and why
-----------------------------
An example needs two tiles from two unrelated places of the cohort. Reading them
where the example is mixed decodes a 1024-px chunk for every 256-px tile, twice per
example: on 4 slides of 8192 px that read 17.6x the bytes the slides hold. Instead
the job reads in two passes over a *materialised shuffle* of tile pixels:

1. **Pack** (`pack_strip`, one task per *strip* = one chunk column of a slide's
   tiled level). The strip's kept tiles are cut out of decoded chunks, top to bottom,
   with a band of at most ``read_cache_mb`` of decoded rows in memory (plus the rows a
   tile spans), so every chunk is fetched and decoded once per run. One Zarr
   selection covers several chunks, so their fetches overlap (Zarr fetches the
   chunks of a selection concurrently). Each readable tile is zstd-compressed (or, with
   ``codec="raw"``, as the stream's cache does, stored as it is) into
   the strip's *pack* (``<staging>/packs/<slide>-<strip>.bin``) with a JSON index
   written after it (tile coordinates, soft labels, byte ranges); tiles that cannot
   be used are counted under a skip reason (``missing_chunk``, ``read_error``,
   ``nonfinite_pixels``) and never become partners.
2. **Mix** (`tasks.mix_bucket`): a bucket of examples reads its tiles back from the
   packs by byte range (concurrent reads), mixes, encodes and writes.

Only coordinates travel through the engines (tile records, pair specs), never
pixels: Beam's and Dask's shuffles stay small, worker memory is bounded by
``read_cache_mb`` and the bucket size, never by slide or cohort size, and the packs
are durable, verifiable intermediate results. What it costs: every kept tile is
written once to the packs and read back about ``2 * num_mixes`` times (as source
`a` and as a partner), compressed; `benchmarks/bench_pipeline.py` reports these
"shuffle bytes" next to the slide bytes read.

Strips are chunk columns because tile keys sort by ``(x, y)``: the tiles of a slide,
in key order, are the strips' tiles concatenated in strip order, so the partner
index that pairing draws within a slide maps to a strip by a prefix sum. A tile that
crosses a chunk-column edge (tile grid not aligned with the chunks) is read by its
left strip, which fetches the neighbouring column's chunks too: such runs report a
`read_amplification` above 1.
"""

from __future__ import annotations

import collections
import dataclasses
import posixpath
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SlideError, TileReadError
from ..io import storage
from ..records import SlidePlan, SlideRecord, TileKey, TileRecord, stable_hash

if TYPE_CHECKING:
    from ..io.slides import Slide

__all__ = [
    "PackReader",
    "StripResult",
    "StripTask",
    "pack_path",
    "pack_strip",
    "split_plan",
]

DEFAULT_READ_CACHE_MB = 256.0
# zstd's fast mode: no entropy coding of literals, so tiles of slide texture (which
# compress poorly: 0.90 of raw at level 1, 0.97 here) decode 6x faster (0.05 vs 0.30 ms
# a 256-px RGB tile) and encode 1.6x faster; every tile is decoded about twice.
_ZSTD_LEVEL = -1
# Pack codecs: "zstd" (the offline job's packs) or "raw" (tile bytes as they are: the
# stream's cache, where zstd's 0.97 of raw is not worth ~0.45 ms of encoding and
# ~0.05 ms of decoding per 256-px RGB tile). A raw pack's index says so ("codec").
CODECS = ("zstd", "raw")


@dataclasses.dataclass(frozen=True)
class StripTask:
    """The kept tiles of one chunk column of a slide: one pack task.

    Attributes:
        record: the slide's manifest row.
        strip: chunk-column index on the tiled level.
        tiles: the strip's kept tiles, sorted by key.
        tile_size: tile side in pixels.
        chunk_shape: (height, width) of the level's chunks.
        owned_blocks: chunk blocks ``(row, col)`` this strip counts as needed for
            `read_amplification` (each block needed by the run is owned by one strip).
        stain_fit: the slide's stain fit (JSON, `SlidePlan.stain_fit`) when the run
            normalises stains (`stain.strip_transform`), else None.
        content: the slide's content fingerprint from its plan (`SlidePlan.content`):
            part of the pack's recorded inputs.
    """

    record: SlideRecord
    strip: int
    tiles: tuple[TileRecord, ...]
    tile_size: int
    chunk_shape: tuple[int, int]
    owned_blocks: tuple[tuple[int, int], ...]
    stain_fit: str | None = None
    content: str | None = None


@dataclasses.dataclass(frozen=True)
class StripResult:
    """What packing one strip produced (coordinates and counts, no pixels).

    Attributes:
        slide_id, strip: which strip.
        tiles: the readable tiles, sorted by key (their index in this tuple is their
            index in the pack).
        pack: the pack's path without extension.
        skipped: reason -> number of kept tiles that could not be used.
        messages: a few error messages, for the manifest.
        chunks_read, bytes_read, requests: fetched from the slide's store.
        bytes_needed: compressed bytes of the owned blocks that hold a kept tile.
        pack_bytes: bytes written to the pack.
        reused: the pack was already complete and verified (a resumed run).
        content: the slide's content fingerprint the pack was made from.
        failed: strip-local indices (in the task's planned tiles, key order) of the
            tiles that could not be used: pairing counts planned tiles, so a partner
            drawn at one of these is drawn again (`steps.pair`).
    """

    slide_id: str
    strip: int
    tiles: tuple[TileRecord, ...]
    pack: str
    skipped: tuple[tuple[str, int], ...] = ()
    messages: tuple[str, ...] = ()
    chunks_read: int = 0
    bytes_read: int = 0
    requests: int = 0
    bytes_needed: int = 0
    pack_bytes: int = 0
    reused: bool = False
    output_requests: int = 0
    bytes_written: int = 0
    content: str | None = None
    failed: tuple[int, ...] = ()

    @property
    def planned(self) -> int:
        """The strip's planned tiles (readable and failed)."""
        return len(self.tiles) + len(self.failed)


def _failed_indices(task: StripTask, readable: Any) -> tuple[int, ...]:
    """Indices in `task.tiles` of the tiles whose `(x, y)` is not in `readable`."""
    return tuple(i for i, t in enumerate(task.tiles) if (t.key.x, t.key.y) not in readable)


def _tile_blocks(x: int, y: int, tile_size: int, chunk_shape: tuple[int, int]
                 ) -> Iterator[tuple[int, int]]:
    ch, cw = chunk_shape
    for row in range(y // ch, (y + tile_size - 1) // ch + 1):
        for col in range(x // cw, (x + tile_size - 1) // cw + 1):
            yield row, col


def split_plan(record: SlideRecord, plan: SlidePlan, tile_size: int) -> list[StripTask]:
    """Cut a slide's plan into strips (chunk columns), in strip order.

    Concatenating the strips' tiles gives the plan's tiles in key order.
    """
    if plan.failure is not None or not plan.tiles:
        return []
    chunk_shape = plan.chunk_shape
    by_strip: dict[int, list[TileRecord]] = collections.defaultdict(list)
    owner: dict[tuple[int, int], int] = {}
    for tile in plan.tiles:
        strip = tile.key.x // chunk_shape[1]
        by_strip[strip].append(tile)
        for block in _tile_blocks(tile.key.x, tile.key.y, tile_size, chunk_shape):
            owner[block] = min(owner.get(block, strip), strip)
    owned: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for block, strip in owner.items():
        owned[strip].append(block)
    return [
        StripTask(record, strip, tuple(sorted(by_strip[strip])), tile_size, chunk_shape,
                  tuple(sorted(owned[strip])), stain_fit=plan.stain_fit,
                  content=plan.content)
        for strip in sorted(by_strip)
    ]


def pack_path(staging: str, slide_id: str, strip: int) -> str:
    """Where the pack of a strip lives (without extension); safe for any slide id."""
    return posixpath.join(staging, "packs", f"{stable_hash('pack', slide_id):016x}-{strip:05d}")


def _block_keys(slide: Slide, level: int, block: tuple[int, int]) -> list[str]:
    """Store keys of the chunks of `block` (all channels) on `level`."""
    array = slide.level_array(level)
    chunks = getattr(array, "shards", None) or array.chunks
    ranges = []
    for axis, name in enumerate(slide.axes):
        if name == "y":
            ranges.append([block[0]])
        elif name == "x":
            ranges.append([block[1]])
        elif name == "c":
            ranges.append(range(-(-array.shape[axis] // chunks[axis])))
        else:
            ranges.append([0])
    import itertools

    prefix = f"{array.path}/" if array.path else ""
    return [prefix + array.metadata.encode_chunk_key(tuple(coords))
            for coords in itertools.product(*ranges)]


def _check_pixels(tile: np.ndarray) -> str | None:
    if tile.dtype.kind == "f":
        bad = ~np.isfinite(tile)
        if bad.any():
            return (f"{int(bad.sum())} non-finite pixel value(s) (NaN or +-inf) in a float "
                    "slide. Fill or mask them in the slide, or let the run skip the tile.")
    return None


class _Band:
    """Decoded rows ``[y0, y1)`` x columns ``[x0, x1)`` of a level, read chunk rows at a time."""

    def __init__(self, slide: Slide, level: int, x0: int, x1: int, chunk_h: int,
                 height: int, rows_per_read: int, needed_rows: set[int]):
        self.slide, self.level, self.x0, self.x1 = slide, level, x0, x1
        self.chunk_h, self.height, self.rows_per_read = chunk_h, height, rows_per_read
        self.needed_rows = needed_rows  # chunk rows some tile of the strip touches
        self.y0 = self.y1 = 0
        self.pixels: np.ndarray | None = None

    def cover(self, y: int, y_end: int) -> None:
        """Make rows ``[y, y_end)`` available, dropping chunk rows above `y`."""
        keep_from = (y // self.chunk_h) * self.chunk_h
        if self.pixels is not None and self.y1 > keep_from:
            self.pixels = self.pixels[keep_from - self.y0:]
            self.y0 = keep_from
        else:
            self.pixels, self.y0, self.y1 = None, keep_from, keep_from
        if y_end <= self.y1:
            return
        # Read ahead over the next needed chunk rows (never over rows without tiles),
        # so one selection fetches several chunks concurrently.
        row = -(-y_end // self.chunk_h)
        first = self.y1 // self.chunk_h
        while row - first < self.rows_per_read and row in self.needed_rows:
            row += 1
        end = min(self.height, row * self.chunk_h)
        new = self.slide.read_region(self.level, self.x0, self.y1, self.x1 - self.x0,
                                     end - self.y1)
        self.pixels = new if self.pixels is None else np.concatenate([self.pixels, new])
        self.y1 = end

    def cut(self, x: int, y: int, size: int) -> np.ndarray:
        assert self.pixels is not None  # noqa: S101 - internal invariant
        return self.pixels[y - self.y0:y - self.y0 + size, x - self.x0:x - self.x0 + size]


def pack_strip(task: StripTask, staging: str, *,
               read_cache_mb: float = DEFAULT_READ_CACHE_MB,
               transform: Callable[[np.ndarray], np.ndarray] | None = None,
               on_error: str = "skip", codec: str = "zstd") -> StripResult:
    """Read the strip's tiles chunk by chunk and write them into its pack.

    Opens the slide afresh (its `ReadStats` then count exactly this task's reads).

    Args:
        task: the strip.
        staging: the run's staging directory (local path or URL).
        read_cache_mb: decoded pixels held at once (chunk rows read per selection).
        transform: optional ``f(tile) -> tile`` applied before packing (e.g. stain
            normalisation).
        on_error: ``"skip"`` counts an unusable tile under its reason; ``"fail"``
            raises `TileReadError`.
        codec: ``"zstd"`` (compressed tiles) or ``"raw"`` (tile bytes as they are),
            see `CODECS`; readers take it from the pack's index.

    Raises:
        SlideError: the slide cannot be opened (it was planned, so this is rare).
        TileReadError: with ``on_error="fail"``, the first unusable tile.
    """
    import numcodecs

    from ..io.slides import open_slide

    if codec not in CODECS:
        raise ValueError(f"`codec` must be one of {CODECS}. Received: codec={codec!r}")
    record = task.record
    path = pack_path(staging, record.slide_id, task.strip)
    kept = load_pack_result(task, path, codec)  # a resumed run: metadata reads only
    if kept is not None:
        return kept
    slide = open_slide(record.path, slide_id=record.slide_id,
                       axes=record.metadata_dict.get("axes") or None)
    band = _strip_band(slide, task, read_cache_mb)
    zstd = numcodecs.Zstd(level=_ZSTD_LEVEL) if codec == "zstd" else None
    skipped: collections.Counter[str] = collections.Counter()
    messages: list[str] = []
    skipped_at: list[list[Any]] = []  # [x, y, reason] of each unusable tile (run report)
    entries: dict[TileKey, tuple[int, int]] = {}
    offset = 0

    def skip(tile: TileRecord, reason: str, message: str) -> None:
        if on_error == "fail":
            raise TileReadError(tile.key, reason, message)
        skipped[reason] += 1
        skipped_at.append([tile.key.x, tile.key.y, reason])
        if len(messages) < 5:
            messages.append(f"{tile.key}: {reason}: {message}")

    in_read_order = sorted(task.tiles, key=lambda t: (t.key.y, t.key.x))
    from ..run.checkpoint import CrcWriter

    with storage.writer(path + ".bin") as handle:
        out = CrcWriter(handle)
        for tile in in_read_order:
            pixels = _read_tile(slide, band, task, tile, skip)
            if pixels is None:
                continue
            if transform is not None:
                pixels = transform(pixels)
            # Raw: the contiguous copy's own buffer, not a second copy as `bytes`.
            blob = (memoryview(np.ascontiguousarray(pixels)).cast("B") if zstd is None
                    else bytes(zstd.encode(np.ascontiguousarray(pixels))))
            out.write(blob)
            entries[tile.key] = (offset, len(blob))
            offset += len(blob)
    return _write_pack_index(task, slide, path, entries, skipped, messages, skipped_at,
                             pack_bytes=offset, size=out.size, crc32=out.crc32, codec=codec)


def _strip_band(slide: Slide, task: StripTask, read_cache_mb: float) -> _Band:
    """The strip's band of chunk columns, read `read_cache_mb` worth of chunk rows at a
    time and only where the strip's tiles need rows."""
    level = task.tiles[0].key.level
    size = task.tile_size
    ch, cw = task.chunk_shape
    height, width = slide.level_shape(level)
    x0 = task.strip * cw
    x1 = min(width, max(t.key.x for t in task.tiles) + size)
    row_bytes = ch * (x1 - x0) * slide.num_channels * slide.dtype.itemsize
    rows_per_read = max(1, int(read_cache_mb * 2**20) // max(1, row_bytes))
    needed_rows = {row for t in task.tiles
                   for row, _ in _tile_blocks(t.key.x, t.key.y, size, task.chunk_shape)}
    return _Band(slide, level, x0, x1, ch, height, rows_per_read, needed_rows)


def _read_tile(slide: Slide, band: _Band, task: StripTask, tile: TileRecord,
               skip: Callable[[TileRecord, str, str], None]) -> np.ndarray | None:
    """One tile's pixels cut from the band (or, after a failed band read, read alone),
    checked; None after `skip` counted why it is unusable."""
    record = task.record
    level, size = task.tiles[0].key.level, task.tile_size
    x, y = tile.key.x, tile.key.y
    try:
        band.cover(y, y + size)
        pixels = band.cut(x, y, size)
    except SlideError:
        raise
    except Exception as err:  # noqa: BLE001 - codecs and stores raise many types
        # Retry this tile alone so one corrupt chunk costs only its own tiles.
        band.pixels, band.y0, band.y1 = None, 0, 0
        try:
            pixels = slide.read_region(level, x, y, size, size)
        except Exception:  # noqa: BLE001
            skip(tile, "read_error",
                 f"cannot read the tile from {record.path} ({type(err).__name__}: "
                 f"{err}). A chunk is corrupt or unreachable; re-export the slide.")
            return None
    missing = [k for block in _tile_blocks(x, y, size, task.chunk_shape)
               for k in _block_keys(slide, level, block)
               if k in slide.read_stats.missing] if slide.read_stats.missing else []
    if missing:
        skip(tile, "missing_chunk",
             f"chunk(s) {missing[:3]} do not exist in {record.path}, so Zarr would "
             "return blank fill values. Re-export the slide.")
        return None
    problem = _check_pixels(pixels)
    if problem is not None:
        skip(tile, "nonfinite_pixels", problem)
        return None
    return pixels


def _write_pack_index(task: StripTask, slide: Slide, path: str,
                      entries: Mapping[TileKey, tuple[int, int]],
                      skipped: collections.Counter[str], messages: Sequence[str],
                      skipped_at: Sequence[Sequence[Any]], *, pack_bytes: int, size: int,
                      crc32: int, codec: str = "zstd") -> StripResult:
    """The strip's result (tiles kept, skips, read counters) and the pack's verified
    sidecar (its index), written after the pack's data."""
    from ..run.checkpoint import write_sidecar

    record = task.record
    level = task.tiles[0].key.level
    readable = tuple(t for t in task.tiles if t.key in entries)
    stats = slide.read_stats
    needed = 0
    for block in task.owned_blocks:
        needed += sum(stats.sizes.get(k, 0) for k in _block_keys(slide, level, block))
    result = StripResult(
        slide_id=record.slide_id, strip=task.strip, tiles=readable, pack=path,
        skipped=tuple(sorted(skipped.items())), messages=tuple(messages),
        chunks_read=stats.chunks_read, bytes_read=stats.bytes_read, requests=stats.requests,
        bytes_needed=needed, pack_bytes=pack_bytes, content=task.content,
        failed=_failed_indices(task, {(k.x, k.y) for k in entries}),
    )
    index = {
        "slide_id": record.slide_id,
        "strip": task.strip,
        "level": level,
        "tile_size": task.tile_size,
        "dtype": slide.dtype.name,
        "num_channels": slide.num_channels,
        "tiles": [[t.key.x, t.key.y, *entries[t.key], t.soft_label] for t in readable],
        "skipped_tiles": skipped_at,
        "result": {"skipped": result.skipped, "messages": result.messages,
                   "chunks_read": result.chunks_read, "bytes_read": result.bytes_read,
                   "requests": result.requests, "bytes_needed": result.bytes_needed},
    }
    if codec != "zstd":  # zstd packs' indexes stay as they were
        index["codec"] = codec
    # Written after the data: what a resumed run checks before reusing the pack.
    write_sidecar(path + ".bin", inputs=_task_inputs(task, codec), records=len(readable),
                  size=size, crc32=crc32, **index)
    return result


def _task_inputs(task: StripTask, codec: str = "zstd") -> dict[str, Any]:
    """What a pack is made from: the strip task (tiles, geometry, stain fit), the
    slide's content fingerprint and (unless zstd) the codec."""
    digest = stable_hash("strip", task.record, task.strip, task.tiles, task.tile_size,
                         task.chunk_shape, task.stain_fit or "")
    inputs = {"task": f"{digest:016x}", "content": task.content}
    return inputs if codec == "zstd" else {**inputs, "codec": codec}


def load_pack_result(task: StripTask, path: str, codec: str = "zstd"
                     ) -> StripResult | None:
    """The result of an earlier, complete and verified packing of `task`, or None.

    A pack is reused (by a resumed run, or a retried task) only when its index (the
    pack's sidecar, `pipeline.run.checkpoint`) was written for the same task and slide
    content and its data file has the recorded size and CRC32; anything truncated,
    edited or made from other inputs is packed again.
    """
    from ..run.checkpoint import load_checked

    if task.content is None:  # the slide's content cannot be fingerprinted
        return None
    found = load_checked(path + ".bin", _task_inputs(task, codec))
    if found is None:
        return None
    index = found[0]
    try:
        done = index["result"]
        keys = {(x, y) for x, y, *_ in index["tiles"]}
        readable = tuple(t for t in task.tiles if (t.key.x, t.key.y) in keys)
        return StripResult(
            slide_id=task.record.slide_id, strip=task.strip, tiles=readable, pack=path,
            skipped=tuple((r, n) for r, n in done["skipped"]),
            messages=tuple(done["messages"]), chunks_read=done["chunks_read"],
            bytes_read=done["bytes_read"], requests=done["requests"],
            bytes_needed=done["bytes_needed"], pack_bytes=index["size"], reused=True,
            content=task.content, failed=_failed_indices(task, keys))
    except (ValueError, KeyError, TypeError):
        return None


class PackReader:
    """Reads tiles back from packs by byte range; keeps a few pack indexes open.

    Args:
        max_indexes: how many pack indexes to keep in memory.
    """

    def __init__(self, max_indexes: int = 64):
        self._indexes: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._max = max_indexes

    def index(self, pack: str) -> dict[str, Any]:
        """The JSON index of `pack`."""
        found = self._indexes.get(pack)
        if found is None:
            found = storage.read_json(pack + ".json")
            self._indexes[pack] = found
            while len(self._indexes) > self._max:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(pack)
        return found

    def record(self, pack: str, local: int, label: int, group: str | None) -> TileRecord:
        """The `TileRecord` of tile `local` of `pack`."""
        index = self.index(pack)
        x, y, _, _, soft = index["tiles"][local]
        return TileRecord(TileKey(index["slide_id"], index["level"], x, y), label=label,
                          group=group, soft_label=tuple(soft) if soft is not None else None)

    @staticmethod
    def decode(index: Mapping[str, Any], blob: Any, out: np.ndarray | None = None
               ) -> np.ndarray:
        """A tile's pixels from its bytes `blob` in the pack `index` describes (zstd, or
        raw bytes where the index says ``"codec": "raw"``): written into `out` when
        given (decoded straight into it), else a new [size, size, channels] array."""
        import numcodecs

        if index.get("codec", "zstd") == "raw":
            if out is None:
                return np.frombuffer(blob, np.dtype(index["dtype"])).reshape(
                    index["tile_size"], index["tile_size"], index["num_channels"])
            np.copyto(out, np.frombuffer(blob, out.dtype).reshape(out.shape))
            return out
        if out is not None:
            numcodecs.Zstd().decode(blob, out=out)
            return out
        data = np.frombuffer(numcodecs.Zstd().decode(blob), np.dtype(index["dtype"]))
        return data.reshape(index["tile_size"], index["tile_size"], index["num_channels"])

    def read_many(self, locations: Sequence[tuple[str, int]], *, threads: int = 8
                  ) -> list[np.ndarray]:
        """Pixels of tiles ``(pack, local index)``.

        The tiles of one pack are fetched together: neighbouring byte ranges coalesce
        into one request (`storage.read_ranges`); packs are fetched concurrently.
        """
        from concurrent.futures import ThreadPoolExecutor

        by_pack: dict[str, list[int]] = collections.defaultdict(list)
        for position, (pack, _) in enumerate(locations):
            by_pack[pack].append(position)
        out: list[np.ndarray | None] = [None] * len(locations)

        def fetch(pack: str) -> None:
            index = self.index(pack)
            positions = by_pack[pack]
            entries = [index["tiles"][locations[p][1]] for p in positions]
            blobs = storage.read_ranges(pack + ".bin", [(e[2], e[3]) for e in entries])
            for position, blob in zip(positions, blobs, strict=True):
                out[position] = self.decode(index, blob)

        packs = list(by_pack)
        if len(packs) <= 1 or threads <= 1:
            for pack in packs:
                fetch(pack)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(fetch, packs))
        return out  # type: ignore[return-value]
