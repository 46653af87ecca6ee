"""`softmix convert`: scanner slides (SVS, NDPI, OME-TIFF, TIFF) -> OME-Zarr.

Each slide becomes an OME-NGFF image (v0.5 on Zarr v3 by default, v0.4 on Zarr v2 on
request): axes ``c, y, x`` with micrometre units when the source has a pixel size,
``multiscales`` with one ``scale`` transformation per level, ``omero`` channel
metadata, ``chunk``-px chunks (optionally grouped into shards, for buckets), zstd or
blosc compression. The pyramid is rebuilt from level 0 by 2 x 2 means (default) or
copied from the file's own levels.

The work is split below the slide: one task per block of whole chunks (whole shards
when sharded) of one level, so a single huge slide keeps every worker busy and no two
tasks write to the same chunk. Rebuilt levels are done level by level (level k reads
the level k-1 just written). Each finished block leaves an empty marker under
``OUT/.softmix-convert/``, written after its data, so ``resume`` redoes only
unfinished blocks. Tasks run in a local process pool, on Beam or on Dask; the result
does not depend on which, nor on the number of workers.

Everything written is listed in ``OUT/.softmix-convert.json``: a rerun refuses a
non-empty OUT it did not write, and ``overwrite`` removes only what it lists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import OutputExistsError

__all__ = ["ConvertConfig", "MARKER_NAME", "convert_manifest", "convert_slides"]

MARKER_NAME = ".softmix-convert.json"
DONE_DIR = ".softmix-convert"
LOWEST_LEVEL_MAX = 1024  # rebuilt pyramids go down until a level is at most this wide
BLOCK_PIXELS = 2048  # a task covers about this many pixels a side (whole chunks/shards)
ENGINES = ("local", "beam", "dask")


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """How slides are written.

    Attributes:
        chunk: chunk side in pixels (all channels in one chunk).
        shard: shard side in pixels (a multiple of `chunk`; Zarr v3 only), or None.
        compression: ``"zstd"`` or ``"blosc"`` (blosc-zstd, bit-shuffled).
        ngff_version: ``"0.5"`` (Zarr v3) or ``"0.4"`` (Zarr v2).
        pyramid: ``"rebuild"`` (2 x 2 means from level 0) or ``"copy"`` (the file's).
        block: side in pixels of one task's square, rounded down to whole chunks (or
            shards), at least one. Never changes the bytes written.
    """

    chunk: int = 1024
    shard: int | None = None
    compression: str = "zstd"
    ngff_version: str = "0.5"
    pyramid: str = "rebuild"
    block: int = BLOCK_PIXELS

    def __post_init__(self) -> None:
        if self.chunk < 16:
            raise ValueError(f"`chunk` must be >= 16 px. Received: chunk={self.chunk}")
        if self.shard is not None:
            if self.shard < self.chunk or self.shard % self.chunk:
                raise ValueError(f"`shard` must be a multiple of `chunk` ({self.chunk}). "
                                 f"Received: shard={self.shard}")
            if self.ngff_version != "0.5":
                raise ValueError("`shard` needs Zarr v3: use ngff_version='0.5' (the default).")
        if self.compression not in ("zstd", "blosc"):
            raise ValueError(f"`compression` must be 'zstd' or 'blosc'. "
                             f"Received: {self.compression!r}")
        if self.ngff_version not in ("0.4", "0.5"):
            raise ValueError(f"`ngff_version` must be '0.4' or '0.5'. "
                             f"Received: {self.ngff_version!r}")
        if self.pyramid not in ("rebuild", "copy"):
            raise ValueError(f"`pyramid` must be 'rebuild' or 'copy'. Received: {self.pyramid!r}")

    @property
    def unit(self) -> int:
        """Side of the smallest independently writable square: a shard, else a chunk."""
        return self.shard or self.chunk


@dataclasses.dataclass(frozen=True)
class SlidePlan:
    """One slide to convert: where from, where to, and the shape of every level."""

    slide_id: str
    source: str
    target: str  # path of the .ome.zarr image
    name: str  # its name under OUT (also the marker folder's)
    shapes: tuple[tuple[int, int], ...]
    num_channels: int
    dtype: str
    mpp: tuple[float, float] | None


@dataclasses.dataclass(frozen=True)
class BlockTask:
    """Write ``level[:, y0:y1, x0:x1]`` of one slide (whole chunks / shards)."""

    source: str
    target: str
    done: str  # marker written after the data
    level: int
    y0: int
    y1: int
    x0: int
    x1: int
    from_source: bool  # read the source file's level, else halve the target's level - 1


# --- Planning ------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "slide"
    return re.sub(r"\.ome$", "", name)


def _stem(path: str) -> str:
    base = posixpath.basename(path.rstrip("/"))
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".svs", ".ndpi", ".tiff", ".tif",
                   ".zarr"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _rebuilt_shapes(height: int, width: int) -> tuple[tuple[int, int], ...]:
    """Level shapes of a 2x pyramid, down to a level at most `LOWEST_LEVEL_MAX` wide.

    >>> _rebuilt_shapes(2967, 2220)
    ((2967, 2220), (1484, 1110), (742, 555))
    """
    shapes = [(height, width)]
    while max(shapes[-1]) > LOWEST_LEVEL_MAX:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return tuple(shapes)


def plan_slide(slide_id: str, source: str, out_dir: str, name: str, config: ConvertConfig,
               storage_options: Mapping[str, Any] | None = None) -> SlidePlan:
    """Open `source` (a scanner file or Zarr) and decide the levels of its conversion."""
    from ..io.slides import open_slide

    slide = open_slide(source, slide_id=slide_id, storage_options=storage_options)
    if config.pyramid == "copy":
        shapes = tuple(slide.level_shape(i) for i in range(slide.num_levels))
    else:
        shapes = _rebuilt_shapes(*slide.level_shape(0))
    return SlidePlan(slide_id=slide_id, source=source,
                     target=posixpath.join(out_dir, f"{name}.ome.zarr"), name=name,
                     shapes=shapes, num_channels=slide.num_channels, dtype=slide.dtype.name,
                     mpp=slide.mpp(0))


def block_tasks(plan: SlidePlan, out_dir: str, config: ConvertConfig) -> list[list[BlockTask]]:
    """The slide's tasks, one list per stage (copied levels: one stage for all)."""
    unit = config.unit
    side = unit * max(1, config.block // unit)
    stages: list[list[BlockTask]] = []
    for level, (height, width) in enumerate(plan.shapes):
        from_source = level == 0 or config.pyramid == "copy"
        tasks = [
            BlockTask(source=plan.source, target=plan.target,
                      done=posixpath.join(out_dir, DONE_DIR, plan.name, str(level),
                                          f"{y}-{x}"),
                      level=level, y0=y, y1=min(height, y + side), x0=x,
                      x1=min(width, x + side), from_source=from_source)
            for y in range(0, height, side) for x in range(0, width, side)]
        if config.pyramid == "copy" and stages:
            stages[0].extend(tasks)
        else:
            stages.append(tasks)
    return stages


# --- Writing ---------------------------------------------------------------------------


def _channel_metadata(num_channels: int, dtype: str) -> dict[str, Any]:
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    low, high = (float(info.min), float(info.max)) if info is not None else (0.0, 1.0)
    window = {"min": low, "max": high, "start": low, "end": high}
    if num_channels == 3:
        names, colors = ["Red", "Green", "Blue"], ["FF0000", "00FF00", "0000FF"]
    else:
        names = [f"Channel {i}" for i in range(num_channels)]
        colors = ["FFFFFF"] * num_channels
    channels = [{"label": n, "color": c, "window": dict(window), "active": True,
                 "coefficient": 1.0, "family": "linear", "inverted": False}
                for n, c in zip(names, colors, strict=True)]
    model = "color" if num_channels == 3 else "greyscale"
    return {"channels": channels, "rdefs": {"model": model}}


def create_image(plan: SlidePlan, config: ConvertConfig) -> None:
    """Create the image group, its (empty) level arrays and the NGFF metadata."""
    import zarr

    zarr_format = 3 if config.ngff_version == "0.5" else 2
    group = zarr.open_group(plan.target, mode="w", zarr_format=zarr_format)
    c = plan.num_channels
    datasets = []
    for level, (height, width) in enumerate(plan.shapes):
        chunk = (c, min(config.chunk, height), min(config.chunk, width))
        kwargs: dict[str, Any] = {}
        if zarr_format == 3:
            from zarr.codecs import BloscCodec, ZstdCodec

            kwargs["compressors"] = (ZstdCodec(level=3) if config.compression == "zstd" else
                                     BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"))
            kwargs["dimension_names"] = ["c", "y", "x"]
            if config.shard is not None:
                shard = (c, config.shard, config.shard)
                kwargs["shards"] = tuple(
                    -(-n // k) * k if n < s else s
                    for s, n, k in zip(shard, (c, height, width), chunk, strict=True))
        else:
            import numcodecs

            kwargs["compressors"] = (numcodecs.Zstd(level=3) if config.compression == "zstd"
                                     else numcodecs.Blosc(cname="zstd", clevel=5,
                                                          shuffle=numcodecs.Blosc.BITSHUFFLE))
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        group.create_array(str(level), shape=(c, height, width), chunks=chunk,
                           dtype=plan.dtype, fill_value=0, **kwargs)
        factor_y, factor_x = plan.shapes[0][0] / height, plan.shapes[0][1] / width
        if plan.mpp is None:
            scale = [1.0, factor_y, factor_x]
        else:
            scale = [1.0, plan.mpp[0] * factor_y, plan.mpp[1] * factor_x]
        datasets.append({"path": str(level),
                         "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    unit = {} if plan.mpp is None else {"unit": "micrometer"}
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit},
            {"name": "x", "type": "space", **unit}]
    method = ("2x2 mean (softmix convert)" if config.pyramid == "rebuild"
              else "copied from the source file's pyramid (softmix convert)")
    multiscale: dict[str, Any] = {"name": plan.slide_id, "axes": axes, "datasets": datasets,
                                  "type": "mean" if config.pyramid == "rebuild" else "copy",
                                  "metadata": {"method": method, "source": plan.source}}
    omero = _channel_metadata(c, plan.dtype)
    # Written directly (ome-zarr-py reads it back in the tests): importing its writer
    # costs seconds, more than converting a small slide.
    if zarr_format == 3:
        group.attrs.update({"ome": {"version": "0.5", "multiscales": [multiscale],
                                    "omero": omero}})
    else:
        group.attrs.update({"multiscales": [{"version": "0.4", **multiscale}],
                            "omero": omero})


_OPEN: dict[str, Any] = {}  # per worker process: open source slides and target arrays


def _cached(key: str, opener: Callable[[], Any]) -> Any:
    if key not in _OPEN:
        if len(_OPEN) > 32:
            _OPEN.clear()
        _OPEN[key] = opener()
    return _OPEN[key]


def halve(block: np.ndarray) -> np.ndarray:
    """2 x 2 mean of ``[c, h, w]`` (odd edges repeat their last row/column), rounded
    half up for integers.

    >>> halve(np.array([[[0, 1, 2], [3, 4, 5]]], np.uint8)).tolist()
    [[[2, 4]]]
    """
    c, h, w = block.shape
    padded = np.pad(block, ((0, 0), (0, h % 2), (0, w % 2)), mode="edge")
    if block.dtype.kind in "iu":
        total = padded[:, 0::2, 0::2].astype(np.int64)
        total += padded[:, 1::2, 0::2]
        total += padded[:, 0::2, 1::2]
        total += padded[:, 1::2, 1::2]
        return ((total + 2) // 4).astype(block.dtype)
    mean = (padded[:, 0::2, 0::2].astype(np.float64) + padded[:, 1::2, 0::2]
            + padded[:, 0::2, 1::2] + padded[:, 1::2, 1::2]) / 4
    return mean.astype(block.dtype)


def convert_block(task: BlockTask) -> int:
    """Write one block and then its marker; returns the bytes of pixels written."""
    import fsspec
    import zarr

    from ..io.slides import open_slide

    target = _cached(f"{task.target}/{task.level}",
                     lambda: zarr.open_array(f"{task.target}/{task.level}", mode="r+"))
    if task.from_source:
        source = _cached(task.source, lambda: open_slide(task.source))
        region = source.read_region(task.level, task.x0, task.y0, task.x1 - task.x0,
                                    task.y1 - task.y0)
        pixels = np.ascontiguousarray(np.moveaxis(region, -1, 0))
    else:
        below = _cached(f"{task.target}/{task.level - 1}",
                        lambda: zarr.open_array(f"{task.target}/{task.level - 1}", mode="r"))
        _, height, width = below.shape
        pixels = halve(np.asarray(below[:, 2 * task.y0:min(height, 2 * task.y1),
                                        2 * task.x0:min(width, 2 * task.x1)]))
    target[:, task.y0:task.y1, task.x0:task.x1] = pixels
    with fsspec.open(task.done, "wb", auto_mkdir=True) as handle:
        handle.write(b"")
    return int(pixels.nbytes)


# --- Engines ---------------------------------------------------------------------------


class _LocalPool:
    """The local engine: blocks in this process (1 worker) or a process pool kept for
    every stage (spawned, not forked: zarr keeps an event-loop thread a fork would lack)."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            import concurrent.futures
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"))

    def run(self, tasks: Sequence[BlockTask], tick: Callable[[int], None]) -> None:
        sizes = map(convert_block, tasks) if self.pool is None else self.pool.map(
            convert_block, tasks, chunksize=1)
        for size in sizes:
            tick(size)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _run_beam(tasks: Sequence[BlockTask], workers: int, beam_args: Sequence[str],
              tick: Callable[[int], None]) -> None:
    import apache_beam as beam

    from ..engines.beam import local_pipeline_options

    with beam.Pipeline(options=local_pipeline_options(workers, beam_args)) as pipeline:
        _ = (pipeline
             | "CreateBlocks" >> beam.Create(list(tasks))
             | "Spread" >> beam.Reshuffle()
             | "ConvertBlocks" >> beam.Map(convert_block))
    for _ in tasks:
        tick(0)


def _run_dask(tasks: Sequence[BlockTask], client: Any, tick: Callable[[int], None]) -> None:
    from distributed import as_completed

    futures = client.map(convert_block, list(tasks), pure=False)
    for future in as_completed(futures):
        tick(future.result())


# --- Output safety ---------------------------------------------------------------------


def _fs(path: str) -> tuple[Any, str]:
    from ..io import storage

    return storage.filesystem(path)  # with the run's storage options


def _read_marker(out_dir: str) -> dict[str, Any] | None:
    fs, root = _fs(out_dir)
    marker = posixpath.join(root, MARKER_NAME)
    if not fs.exists(marker):
        return None
    try:
        return dict(json.loads(fs.cat_file(marker)))
    except (ValueError, TypeError):
        return None


def _write_marker(out_dir: str, data: Mapping[str, Any]) -> None:
    fs, root = _fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(posixpath.join(root, MARKER_NAME), json.dumps(data, indent=1).encode())


def _prepare_out(out_dir: str, written: list[str], settings: Mapping[str, Any], *,
                 overwrite: bool, resume: bool) -> bool:
    """Check OUT before writing; returns whether an earlier conversion is resumed."""
    fs, root = _fs(out_dir)
    present = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)) \
        if fs.exists(root) else []
    if not present:
        return False
    marker = _read_marker(out_dir)
    if marker is None:
        raise OutputExistsError(
            f"{out_dir} is not empty ({', '.join(present[:5])}...) and was not written by "
            "`softmix convert` (no .softmix-convert.json). Choose an empty or new --out; "
            "convert never overwrites what it did not write.")
    ours = set(marker.get("written", [])) | {MARKER_NAME, DONE_DIR}
    foreign = [p for p in present if p not in ours]
    if foreign:
        raise OutputExistsError(
            f"{out_dir} holds files an earlier convert did not write ({foreign[:5]}). "
            "Move them away or choose another --out.")
    if resume:
        if marker.get("settings") != dict(settings) or marker.get("written") != written:
            raise OutputExistsError(
                f"cannot resume into {out_dir}: it was converted with other settings or "
                f"slides ({marker.get('settings')}, {marker.get('written')}). Rerun with the "
                "same options, or use --overwrite to start again.")
        return True
    if not overwrite:
        raise OutputExistsError(
            f"{out_dir} already holds a conversion. Pass --resume to finish it, or "
            "--overwrite to replace it.")
    for name in present:
        path = posixpath.join(root, name)
        if fs.isdir(path):
            fs.rm(path, recursive=True)
        else:
            fs.rm(path)
    return False


# --- Entry points ----------------------------------------------------------------------


def _log_default(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def convert_slides(
    sources: Sequence[tuple[str, str]] | Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    config: ConvertConfig | None = None,
    engine: str = "local",
    workers: int = 1,
    overwrite: bool = False,
    resume: bool = False,
    beam_args: Sequence[str] = (),
    scheduler: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = _log_default,
    names: Sequence[str] | None = None,
    extra_written: Sequence[str] = (),
) -> list[SlidePlan]:
    """Convert slides into `out_dir`, one ``<name>.ome.zarr`` each.

    Args:
        sources: paths (or ``(slide_id, path)`` pairs) of scanner files or Zarr slides.
        out_dir: output directory (local or fsspec URL); new or empty, or a previous
            conversion with `overwrite` / `resume`.
        config: chunking, compression, NGFF version, pyramid.
        engine: ``"local"`` (process pool), ``"beam"`` or ``"dask"``.
        workers: parallel worker processes.
        overwrite: replace a previous conversion in `out_dir` (only what it wrote).
        resume: finish a previous, interrupted conversion with the same settings.
        beam_args: Beam pipeline options (engine ``"beam"``).
        scheduler: address of a Dask scheduler (engine ``"dask"``; default a local one).
        progress: log blocks done per stage.
        log: where progress lines go (None: nowhere).
        names: output names (default: from the slide ids / file names).
        extra_written: other names under `out_dir` this conversion writes (a manifest).

    Returns:
        One `SlidePlan` per slide, with its target path.

    Raises:
        OutputExistsError: `out_dir` is not empty and not a conversion we may replace.
        SlideError: a source cannot be opened (the message names it).
    """
    config = config or ConvertConfig()
    if engine not in ENGINES:
        raise ValueError(f"`engine` must be one of {ENGINES}. Received: {engine!r}")
    if workers < 1:
        raise ValueError(f"`workers` must be >= 1. Received: {workers}")
    out = os.fspath(out_dir)
    if "://" not in out:
        out = os.path.abspath(os.path.expanduser(out))
    pairs = [(s, s) if isinstance(s, str) else (str(s[0]), str(s[1])) for s in sources]
    if not pairs:
        raise ValueError("no slides to convert.")
    unique = _unique_names(pairs, names)
    written = [f"{n}.ome.zarr" for n in unique] + list(extra_written)
    settings = dataclasses.asdict(config)
    settings["sources"] = [p for _, p in pairs]
    say = log if (log is not None and progress) else (lambda _m: None)
    resumed = _prepare_out(out, written, settings, overwrite=overwrite, resume=resume)
    plans = [plan_slide(sid, path, out, name, config)
             for (sid, path), name in zip(pairs, unique, strict=True)]
    stages: list[list[BlockTask]] = []
    for plan in plans:
        for index, tasks in enumerate(block_tasks(plan, out, config)):
            while len(stages) <= index:
                stages.append([])
            stages[index].extend(tasks)
    _write_marker(out, {"written": written, "settings": settings, "complete": False})
    fs, _ = _fs(out)
    for plan in plans:
        if not resumed or not fs.exists(plan.target):
            create_image(plan, config)
    _run_stages(stages, config, engine=engine, workers=workers, scheduler=scheduler,
                beam_args=beam_args, resumed=resumed, fs=fs, say=say)
    _write_marker(out, {"written": written, "settings": settings, "complete": True})
    return plans


def _unique_names(pairs: Sequence[tuple[str, str]], names: Sequence[str] | None) -> list[str]:
    """Each slide's output name (`names`, or one made from its id or file name), with
    ``-2``, ``-3``... added to repeats."""
    chosen = list(names) if names is not None else [
        _safe_name(slide_id if slide_id != path else _stem(path)) for slide_id, path in pairs]
    seen: dict[str, int] = {}
    unique = []
    for name in chosen:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return unique


def _run_stages(stages: Sequence[Sequence[BlockTask]], config: ConvertConfig, *, engine: str,
                workers: int, scheduler: str | None, beam_args: Sequence[str], resumed: bool,
                fs: Any, say: Callable[[str], None]) -> None:
    """Run the block tasks stage by stage (level by level) on `engine`, skipping the
    blocks a resumed conversion finished, and close the engine's workers."""
    client = None
    local = _LocalPool(workers) if engine == "local" else None
    if engine == "dask":
        from distributed import Client

        from ..engines.dask import start_local_cluster

        # The job's cluster (dashboard on a free port: the default 8787 may be taken).
        client = Client(scheduler) if scheduler else Client(start_local_cluster(workers))
    start = time.perf_counter()
    try:
        for number, stage in enumerate(stages):
            todo = [t for t in stage if not (resumed and fs.exists(t.done))]
            state = {"done": 0, "bytes": 0}
            label = "levels" if config.pyramid == "copy" else f"level {number}"
            every = max(1, len(todo) // 10)

            def tick(size: int, todo: list[BlockTask] = todo, state: dict[str, int] = state,
                     label: str = label, every: int = every) -> None:
                state["done"] += 1
                state["bytes"] += size
                if state["done"] % every == 0 or state["done"] == len(todo):
                    say(f"convert: {label}: {state['done']}/{len(todo)} blocks "
                        f"({time.perf_counter() - start:.1f} s)")

            if len(todo) < len(stage):
                say(f"convert: {label}: {len(stage) - len(todo)} finished block(s) kept")
            if not todo:
                continue
            if local is not None:
                local.run(todo, tick)
            elif engine == "beam":
                _run_beam(todo, workers, beam_args, tick)
            else:
                _run_dask(todo, client, tick)
    finally:
        if local is not None:
            local.close()
        if client is not None:
            cluster = client.cluster
            client.close()
            if cluster is not None:
                cluster.close()


def convert_manifest(
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> str:
    """Convert every slide of a manifest; write ``OUT/manifest.csv`` pointing at them.

    The new manifest has the same columns and rows; ``path`` becomes the relative path
    of each converted slide, so the job runs on it unchanged. Other arguments as in
    `convert_slides`. Returns the new manifest's path.
    """
    import csv
    import io

    from ..io.manifest import _read_table, load_slide_manifest

    manifest = os.fspath(manifest)
    records = load_slide_manifest(manifest, storage_options=dict(storage_options or {}))
    table = _read_table(manifest if "://" in manifest else os.path.expanduser(manifest),
                        dict(storage_options or {}))
    plans = convert_slides([(r.slide_id, r.path) for r in records.slides], out_dir,
                           extra_written=["manifest.csv"], **kwargs)
    target = {p.slide_id: posixpath.basename(p.target) for p in plans}
    columns = list(table.column_names)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for row in table.to_pylist():
        values = {k: ("" if v is None else str(v)) for k, v in row.items()}
        values["path"] = target[values["slide_id"].strip()]
        writer.writerow([values[c] for c in columns])
    out = os.fspath(out_dir)
    if "://" not in out:
        out = os.path.abspath(os.path.expanduser(out))
    fs, root = _fs(out)
    path = posixpath.join(root, "manifest.csv")
    fs.pipe_file(path, text.getvalue().encode())
    return posixpath.join(out, "manifest.csv")
