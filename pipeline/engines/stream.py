"""Stream mixed tiles from Zarr slides straight into `tf.data` training (SPEC section 4b).

The stream is one more engine on the offline job's `Run` (`pipeline.run.run`) and steps
(`pipeline.run.tasks`): plan every slide (`plan_task`, `reconcile_plan`), cut plans
into strips (`split_plan`), read each strip chunk by chunk once into a tile pack
(`pack_task`; raw tile bytes, ``codec="raw"``: zstd kept 0.97 of a texture tile for
~0.45 ms of CPU), draw examples (`pair_anchors`, the offline `pair_strip`'s core, with the
run's pairing table) and mix them with the offline mixer (`steps.mix.mix_batch`),
yielding the offline example schema's fields (`dataset.schema`). So with the same
manifest, options and seed, epoch 0 yields exactly the examples ``softmix beam`` writes
(same pixels, labels, lam, provenance, seeds; order aside). Epoch ``e > 0`` pairs with
the seed ``epoch_seed(seed, e)``: new mixes every epoch, the same ones on a rerun.

How it runs
-----------
- **Planning** (when `stream_dataset` is called): every slide is planned in a thread
  pool; plans are kept in the cache directory, so a later stream with the same cache
  and tiling options reads nothing again. Pairing counts *planned* tiles (as every
  engine does, `steps.pair`: a partner packing finds unusable is drawn again), so an
  epoch's pairing is known as soon as planning is done, before any pixel is read.
- **Ready first**: the strips are packed in the epoch's order (``pack_threads``
  background threads, and any work unit that needs a strip no one has started). Work
  unit ``k`` is the *stage* of the anchors whose own strip and partners' strips (first
  draws) all lie in the first ``k + 1`` strips of that order, one of them the ``k``-th:
  it is ready once those strips are packed. After ``k`` of ``N`` strips about
  ``(k / N)^2`` of the examples are ready, so the first batch waits for a few strips,
  not the cohort (16 slides of 8192 px: 19 of 125). Strips are staged in order, on
  demand, from the plans alone (a few microseconds a tile); a stage's anchors are
  paired again when it is read, with the packed strips saying which partners are usable.
- **Work units** are interleaved with ``num_parallel_reads`` Python generators; with an
  `InputContext` pipeline ``i`` of ``n`` takes units ``k % n == i`` (every pipeline
  packs in the same order: its stages need the strips before them). A unit reads its
  tiles from the packs (local packs memory-mapped, copied straight into the batch
  arrays) and mixes them in its own thread, in batches of ``batch_size`` (the
  XLA-compiled op for integer tiles, bit-identical to the offline job's;
  batch-invariant, so batching gives the offline pixels bit for bit). The op reads the
  batch arrays in place (DLPack) and its outputs are yielded without a copy; tf.data
  unbatches them, or with ``batch=`` re-cuts them into batches of that size
  (`tf.data.Dataset.rebatch`: no per-example split and restack, ~0.25 ms of CPU an
  example less than ``.batch()`` on single examples). The op is compiled in a
  background thread while tf.data and the first packs start.

tf.data's autotuning model is turned off on the returned dataset (see the end of
`stream_dataset`): the stream's parallelism is fixed, and the model's optimisation loop
delayed the end of an epoch by seconds.

Memory is bounded by configuration, never by cohort size: ``pack_threads *
read_cache_mb`` of decoded slide rows, ``num_parallel_reads`` units of at most
``_CHUNK`` examples in flight, the shuffle buffer, and small per-slide, per-strip and
per-tile records (tile coordinates: about 100 bytes per tile, like the offline job's
plans; the staged anchors of an epoch not yet read: a strip id and an index each).
"""

from __future__ import annotations

import atexit
import bisect
import collections
import concurrent.futures as cf
import dataclasses
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..accounting import Accounting
from ..config import (
    MAX_READ_CACHE_MB,
    MAX_WORKERS,
    STAIN_FIT_TILES,
    JobConfig,
    MixConfig,
    OutputConfig,
    TileConfig,
    check_count,
)
from ..errors import PipelineError, SlideError
from ..records import PairSpec, TileRecord, stable_hash
from ..run import tasks as _stages
from ..run.run import DEFAULT_KIND, Run, load_run, strip_tasks
from ..steps.pack import PackReader, StripResult, StripTask, pack_path

MAX_SHUFFLE_BUFFER = 1_000_000  # examples; the buffer holds decoded images

__all__ = ["StreamStats", "dataset_stats", "epoch_seed", "stream_dataset"]

logger = logging.getLogger(__name__)

_CHUNK = 64  # examples read and mixed together by one work unit
_StripId = tuple[str, int]


def epoch_seed(seed: int, epoch: int) -> int:
    """The pairing seed of epoch `epoch`: `seed` itself for epoch 0 (the offline job's).

    >>> epoch_seed(7, 0)
    7
    >>> epoch_seed(7, 1) == epoch_seed(7, 1) != epoch_seed(7, 2)
    True
    """
    if epoch == 0:
        return seed
    return stable_hash("softmix.stream.epoch", seed, epoch) >> 2


class StreamStats:
    """Live counters of one stream; thread-safe. Get it with `pipeline.dataset_stats(ds)`.

    Attributes:
        accounting: an `Accounting` as the offline job's manifest reports it: slides
            failed, tiles total / used / skipped by reason (each tile resolved when the
            work unit holding it is consumed in the first epoch this stream starts),
            and the reads this stream made (zero for plans and packs reused from the
            cache directory). After one full epoch, ``accounting.check()`` holds.
        slides_planned, plans_reused: slides tiled now / plans loaded from the cache.
        strips_packed, strips_reused: packs written now / reused verified packs.
        strips_at_first_example: strips packed or reused when the first example was
            yielded (None before): how little of the cohort the first batch waited for.
        examples: examples yielded (all epochs).
        epochs_started: epochs whose first work unit started.
        plan_seconds: time spent planning (before the dataset could be built).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounting = Accounting()
        self.slides_planned = self.plans_reused = 0
        self.strips_packed = self.strips_reused = 0
        self.examples = self.epochs_started = 0
        self.plan_seconds = 0.0
        self.strips_at_first_example: int | None = None

    @property
    def accounting(self) -> Accounting:
        with self._lock:
            return self._accounting

    def add(self, accounting: Accounting | None = None, **counts: int) -> None:
        with self._lock:
            if accounting is not None:
                self._accounting = self._accounting.merge(accounting)
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)
            if counts.get("examples") and self.strips_at_first_example is None:
                self.strips_at_first_example = self.strips_packed + self.strips_reused

    def __repr__(self) -> str:
        acc = self.accounting
        return (f"StreamStats(tiles_total={acc.tiles_total}, tiles_used={acc.tiles_used}, "
                f"tiles_skipped={dict(acc.tiles_skipped)}, slides_failed="
                f"{dict(acc.slides_failed)}, examples={self.examples}, strips_packed="
                f"{self.strips_packed}, strips_reused={self.strips_reused}, "
                f"chunks_read={acc.chunks_read})")


_STATS: weakref.WeakKeyDictionary[Any, StreamStats] = weakref.WeakKeyDictionary()


def dataset_stats(dataset: Any) -> StreamStats:
    """The `StreamStats` of a `stream_dataset` (or of a dataset derived from one).

    Raises:
        ValueError: `dataset` does not come from `stream_dataset`.
    """
    seen = dataset
    while seen is not None:
        try:
            return _STATS[seen]
        except (KeyError, TypeError):
            seen = getattr(seen, "_input_dataset", None)
    raise ValueError("`dataset` is not a stream_dataset (or a dataset made from one). "
                     f"Received: {type(dataset).__name__}")


# --- Planning -------------------------------------------------------------------------


# --- Packing --------------------------------------------------------------------------

_PACK_LOCKS: collections.defaultdict[str, threading.Lock] = collections.defaultdict(
    threading.Lock)  # per pack path: two streams of one process never write one pack


class _Packer:
    """Packs strips once (claimed by whoever needs them first), in background threads."""

    def __init__(self, tasks: dict[_StripId, StripTask], staging: str, read_cache_mb: float,
                 on_error: str, stats: StreamStats, stain: Any = None):
        self._tasks, self._staging, self._stain = tasks, staging, stain
        self._read_cache_mb, self._on_error, self._stats = read_cache_mb, on_error, stats
        self._claims: dict[_StripId, cf.Future] = {}
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def _claim(self, sid: _StripId) -> tuple[cf.Future, bool]:
        with self._lock:
            future = self._claims.get(sid)
            if future is not None:
                return future, False
            future = self._claims[sid] = cf.Future()
            return future, True

    def _pack(self, sid: _StripId, future: cf.Future) -> None:
        from ..steps.pack import pack_path

        try:
            with _PACK_LOCKS[pack_path(self._staging, *sid)]:
                from ..steps.stain import strip_transform

                task = self._tasks[sid]
                # Raw tile bytes: zstd gains ~3% here for ~0.5 ms CPU a tile (pack.CODECS).
                result = _stages.pack_task(task, self._staging, self._read_cache_mb,
                                           self._on_error,
                                           transform=strip_transform(task, self._stain),
                                           codec="raw")
        except BaseException as err:  # handed to every consumer of the strip
            future.set_exception(err)
            return
        counted = result
        if result.reused:  # nothing was read now
            counted = dataclasses.replace(result, chunks_read=0, bytes_read=0, requests=0,
                                          bytes_needed=0)
        self._stats.add(_stages.strip_accounting(counted),
                        strips_reused=int(result.reused), strips_packed=int(not result.reused))
        for message in result.messages:
            logger.warning("skipped a tile of slide %r: %s", result.slide_id, message)
        future.set_result(result)

    def ensure(self, sid: _StripId) -> StripResult:
        """The strip's pack result, packing it in this thread if no one has started."""
        future, mine = self._claim(sid)
        if mine:
            self._pack(sid, future)
        return future.result()

    def ensure_all(self, order: Sequence[_StripId]) -> dict[_StripId, StripResult]:
        """Every strip's pack result: packs those no thread has claimed yet here, in
        `order`, then waits for the others (raises the first strip's error)."""
        for sid in order:
            future, mine = self._claim(sid)
            if mine:
                self._pack(sid, future)
        return {sid: self.ensure(sid) for sid in order}

    def start(self, order: Sequence[_StripId], threads: int) -> None:
        items = iter(order)
        lock = threading.Lock()

        def work() -> None:
            while not self.stop.is_set():
                with lock:
                    sid = next(items, None)
                if sid is None:
                    return
                future, mine = self._claim(sid)
                if mine:
                    self._pack(sid, future)

        for _ in range(threads):
            threading.Thread(target=work, daemon=True, name="softmix-pack").start()


class _SharedPackReader(PackReader):
    """A `PackReader` whose index cache many generator threads share."""

    def __init__(self, max_indexes: int) -> None:
        super().__init__(max_indexes)
        self._lock = threading.RLock()
        self._pool: cf.ThreadPoolExecutor | None = None
        self._maps: collections.OrderedDict[str, Any] = collections.OrderedDict()

    def _mapped(self, pack: str) -> memoryview:
        """A local pack's data, memory-mapped (kept for the `max_indexes` last packs;
        packs are never rewritten in place, `storage.writer`)."""
        import mmap

        from ..io import storage

        with self._lock:
            found = self._maps.get(pack)
            if found is None:
                with open(storage._local(pack + ".bin"), "rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    found = memoryview(mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ)
                                       if size else b"")
                self._maps[pack] = found
                while len(self._maps) > self._max:
                    self._maps.popitem(last=False)  # unmapped once no decode uses it
            else:
                self._maps.move_to_end(pack)
            return found

    def index(self, pack: str) -> dict[str, Any]:
        with self._lock:
            return super().index(pack)

    def read_into(self, locations: Sequence[tuple[str, int]], out: Sequence[np.ndarray]
                  ) -> None:
        """Decode tiles ``(pack, index in pack)`` into ``out[i]`` (no copy after decoding;
        a raw pack's tiles are copied).

        Local packs are memory-mapped and decoded in this thread (the work units are
        the parallelism; zstd and the copies release the GIL); packs in a bucket are fetched
        concurrently, neighbouring ranges coalesced (`storage.read_ranges`), as
        `read_many` does.
        """
        from ..io import storage

        by_pack: dict[str, list[int]] = collections.defaultdict(list)
        for position, (pack, _) in enumerate(locations):
            by_pack[pack].append(position)

        def fetch(pack: str) -> None:
            index = self.index(pack)
            tiles = index["tiles"]
            positions = by_pack[pack]
            ranges = [(tiles[locations[p][1]][2], tiles[locations[p][1]][3]) for p in positions]
            if storage.is_url(pack):
                blobs = storage.read_ranges(pack + ".bin", ranges)
            else:
                data = self._mapped(pack)
                blobs = [data[start:start + length] for start, length in ranges]
                if any(len(b) != n for b, (_, n) in zip(blobs, ranges, strict=True)):
                    raise OSError(f"{pack}.bin is truncated (shorter than its index says). "
                                  "Remove the cache directory's packs to rebuild them.")
            for position, blob in zip(positions, blobs, strict=True):
                self.decode(index, blob, out[position])

        if not by_pack or not storage.is_url(next(iter(by_pack))):
            for pack in by_pack:  # local: memory-mapped, decoded in this thread
                fetch(pack)
            return
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(8, thread_name_prefix="softmix-read")
        list(self._pool.map(fetch, by_pack))


# --- Epochs ---------------------------------------------------------------------------


class _Epoch:
    """One epoch: its pairing table and its stages (module docstring, "Ready first").

    Stage ``k`` holds the anchors ``(strip, index in the strip's plan)`` whose own strip
    and whose partners' strips (first draws) all lie in the first ``k + 1`` strips of
    `order`, with one of them at ``k``: it is ready once those strips are packed.
    Strips are staged in order, on demand, under `lock`; a stage's anchors are handed
    out once (`_Stream.stage`) and only this pipeline's stages are kept.
    """

    def __init__(self, number: int, order: Sequence[_StripId], units: Sequence[int],
                 table: Any):
        self.number, self.order, self.units, self.table = number, tuple(order), tuple(units), table
        self.rank = {sid: k for k, sid in enumerate(self.order)}
        self.lock = threading.Lock()
        self.staged = 0  # strips of `order` staged so far
        self.stages: dict[int, list[tuple[_StripId, int]]] = collections.defaultdict(list)


class _Stream:
    """Everything one `stream_dataset` shares between its generator threads."""

    def __init__(self, run: Run, *, pipeline: tuple[int, int], plan_threads: int,
                 stats: StreamStats):
        job = run.job
        self.run, self.job, self.records = run, job, list(run.slides)
        self.class_names, self.staging, self.stats = run.class_names, run.staging, stats
        self.pipeline_id, self.num_pipelines = pipeline
        on_error = run.on_error
        start = time.monotonic()
        with cf.ThreadPoolExecutor(max(1, plan_threads)) as pool:
            # Usable plans are kept under ``staging/plans`` and reused by later streams.
            raw = list(pool.map(lambda r: _stages.plan_task(r, job.tile, on_error,
                                                            run.class_names, run.staging),
                                self.records))
        majority = run.kind_of(raw)
        plans = [_stages.reconcile_plan(p, majority) for p in raw]
        for plan in plans:
            if plan.failure is not None:
                if on_error == "fail":
                    raise SlideError(plan.slide_id, plan.failure, plan.message)
                logger.warning("skipped slide %r (%s): %s", plan.slide_id, plan.failure,
                               plan.message)
            if plan.reused:  # nothing was read now
                plan = dataclasses.replace(plan, chunks_read=0, bytes_read=0, requests=0)
            stats.add(Accounting.from_plan(plan))
        stats.add(slides_planned=sum(not p.reused for p in raw),
                  plans_reused=sum(p.reused for p in raw))
        stats.plan_seconds = time.monotonic() - start
        self.kind = majority
        self.tasks: dict[_StripId, StripTask] = {
            (task.record.slide_id, task.strip): task for task in strip_tasks(run, plans)}
        if not self.tasks:
            raise PipelineError(
                f"No usable tile in {job.manifest!r} (slides failed: "
                f"{dict(stats.accounting.slides_failed)}, tiles skipped: "
                f"{dict(stats.accounting.tiles_skipped)}). Check the slides, or lower "
                "`min_tissue`.")
        self.strips = sorted(self.tasks)
        # Pairing counts planned tiles (`steps.pair`), so the layout needs no pack.
        self.layout = run.layout([(*sid, len(task.tiles), task.content)
                                  for sid, task in self.tasks.items()], majority)
        self.stain = run.stain_for(raw)  # a slide target: that slide's fit
        self.packer = _Packer(self.tasks, run.staging, job.read_cache_mb, on_error, stats,
                              self.stain)
        self.reader = _SharedPackReader(max_indexes=max(64, len(self.strips)))
        self._epochs: collections.OrderedDict[int, _Epoch] = collections.OrderedDict()
        self._epoch_lock = threading.Lock()
        self._accounted: int | None = None  # the epoch whose anchors the stats resolve
        self._failed: dict[_StripId, tuple[int, ...]] = {}
        self.emit: Any = None  # an `_Emitter`, set by `stream_dataset`

    # Units and epochs.

    def order(self, epoch: int) -> list[_StripId]:
        seed = self.job.mix.seed
        return sorted(self.strips,
                      key=lambda s: (stable_hash("softmix.stream.order", seed, epoch, *s), s))

    def own_stages(self) -> range:
        return range(self.pipeline_id, len(self.strips), self.num_pipelines)

    def epoch(self, number: int) -> _Epoch:
        with self._epoch_lock:
            found = self._epochs.get(number)
            if found is not None:
                return found
            table = self.run.pairing_table(self.layout,
                                           seed=epoch_seed(self.job.mix.seed, number))
            found = _Epoch(number, self.order(number), self.own_stages(), table)
            self._epochs[number] = found
            if self._accounted is None:
                self._accounted = number
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        self.stats.add(epochs_started=1)
        return found

    def stage(self, ep: _Epoch, k: int) -> list[tuple[_StripId, int]]:
        """Stage `k`'s anchors, staging the strips of ``ep.order`` up to `k` first:
        plans only (first draws, no pack needed), a few microseconds per tile."""
        with ep.lock:
            while ep.staged <= k:
                rank = ep.staged
                sid = ep.order[rank]
                offset = self.layout.strip_offset(*sid)
                for local, tile in enumerate(self.tasks[sid].tiles):
                    last = rank
                    for spec in ep.table.examples_for(tile, offset + local):
                        if not spec.is_original:
                            b_sid = (spec.b_slide,
                                     self.layout.slides[spec.b_slide].position(spec.b_index)[0])
                            last = max(last, ep.rank[b_sid])
                    if last % self.num_pipelines == self.pipeline_id:
                        ep.stages[last].append((sid, local))
                ep.staged += 1
            return ep.stages.pop(k, [])

    # Reading.

    def failed(self, sid: _StripId) -> tuple[int, ...]:
        """The strip's unusable tiles (indices in its plan), packing it if need be."""
        found = self._failed.get(sid)
        if found is None:
            found = self._failed[sid] = self.packer.ensure(sid).failed
        return found

    def locate(self, sid: _StripId, local: int) -> tuple[str, int] | None:
        """`(pack, index in pack)` of planned tile `local` of strip `sid`, None if
        packing found it unusable."""
        failed = self.failed(sid)
        pos = bisect.bisect_left(failed, local)
        if pos < len(failed) and failed[pos] == local:
            return None
        return pack_path(self.staging, *sid), local - pos

    def usable(self, slide_id: str, index: int) -> bool:
        """`tasks.pair_anchors`'s ``usable``: planned tile `index` of the slide was packed."""
        strip, local, _ = self.layout.slides[slide_id].position(index)
        return self.locate((slide_id, strip), local) is not None

    def examples(self, number: Any, unit: Any) -> Iterator[dict[str, np.ndarray]]:
        """One work unit (a stage): its anchors' examples, in batches."""
        from ..steps.mix import label_vector

        ep = self.epoch(int(number))
        k = ep.units[int(unit)]
        self.packer.ensure(ep.order[k])  # packs it here if no one has started
        by_strip: dict[_StripId, list[int]] = collections.defaultdict(list)
        for sid, local in self.stage(ep, k):
            by_strip[sid].append(local)
        specs: list[PairSpec] = []
        accounting = Accounting()
        for sid in sorted(by_strip):
            failed = set(self.failed(sid))
            tiles = self.tasks[sid].tiles
            anchors = [(i, tiles[i]) for i in sorted(by_strip[sid]) if i not in failed]
            got, counted = _stages.pair_anchors(anchors, sid[0],
                                                self.layout.strip_offset(*sid), ep.table,
                                                self.usable)
            specs.extend(got)
            accounting += counted
        num_classes = len(self.class_names)
        chunk = self.emit.chunk()
        for start in range(0, len(specs), chunk):
            rows = []
            a_at, b_at = [], []
            for spec in specs[start:start + chunk]:
                a_strip, a_local, _ = self.layout.slides[spec.a.key.slide_id].position(
                    spec.a_index)
                a_at.append(self.locate((spec.a.key.slide_id, a_strip), a_local))
                if spec.is_original:
                    b = spec.a
                    b_at.append(a_at[-1])
                else:
                    strip, local, _ = self.layout.slides[spec.b_slide].position(spec.b_index)
                    b = self.tasks[(spec.b_slide, strip)].tiles[local]
                    b_at.append(self.locate((spec.b_slide, strip), local))
                rows.append((spec, b))
            # Rows up to a whole number of mixing batches: padding them costs no copy.
            count = len(rows)
            images = _aligned_empty((2, self.emit.rows(count), *self.emit.shape),
                                    self.emit.dtype)
            images[:, count:] = 0
            self.reader.read_into(a_at + b_at, [images[0, i] for i in range(count)]
                                  + [images[1, i] for i in range(count)])
            batches = self.emit(self._batch(rows, images, num_classes, label_vector))
            self.stats.add(examples=len(rows))
            yield from batches
        if ep.number == self._accounted:
            self.stats.add(accounting + Accounting(examples_written=len(specs)))

    def _batch(self, rows: list[tuple[PairSpec, TileRecord]], images: np.ndarray,
               num_classes: int, label_vector: Any) -> dict[str, np.ndarray]:
        from ..dataset.schema import FIELDS, PROVENANCE, provenance

        out: dict[str, np.ndarray] = {
            "image_a": images[0],
            "image_b": images[1],
            "label_a": np.stack([label_vector(s.a, num_classes) for s, _ in rows]),
            "label_b": np.stack([label_vector(b, num_classes) for _, b in rows]),
        }
        out["seed"] = np.asarray([s.seed for s, _ in rows], FIELDS["seed"][0]).reshape(-1, 2)
        out["mix_index"] = np.asarray([s.mix_index for s, _ in rows], FIELDS["mix_index"][0])
        if not self.emit.as_dict:  # only the op's inputs are yielded
            return out
        values = [provenance(s.example_id, s.a, b, s.mix_index, s.seed) for s, b in rows]
        for key in PROVENANCE:
            column = [v[key] for v in values]
            out[key] = (np.asarray([c.encode() for c in column], dtype=object)
                        if FIELDS[key][0] == "string" else np.asarray(column, FIELDS[key][0]))
        return out


# --- The dataset ----------------------------------------------------------------------


def _remove_at_exit(path: str, stream_ref: Any) -> None:
    def remove() -> None:
        stream = stream_ref()
        if stream is not None:
            stream.packer.stop.set()
        shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)


def stream_dataset(
    manifest: str | os.PathLike[str],
    *,
    tile_size: int = 256,
    stride: int | None = None,
    level: int = 0,
    mpp: float | None = None,
    min_tissue: float = 0.5,
    tissue_level: int | None = None,
    tissue_mode: str = "auto",
    label_image: str | None = None,
    stain_norm: str = "none",
    stain_target: str = "builtin",
    stain_fit_tiles: int = STAIN_FIT_TILES,
    grid: int | str | tuple[int, int] = 4,
    softness: float = 0.5,
    alpha: float = 1.0,
    ramp: str = "cosine",
    mix_prob: float = 1.0,
    pairing: str = "random",
    group_column: str | None = None,
    num_mixes: int = 1,
    keep_originals: bool = False,
    seed: int = 0,
    batch_size: int = 32,
    on_error: str = "skip",
    class_names: Sequence[str] | None = None,
    read_cache_mb: float = 256.0,
    epoch: int | None = None,
    shuffle: bool | int = False,
    batch: int | None = None,
    drop_remainder: bool = False,
    mix: bool = True,
    as_dict: bool = False,
    input_context: Any = None,
    cache_dir: str | os.PathLike[str] | None = None,
    num_parallel_reads: int | None = None,
    pack_threads: int | None = None,
    storage_options: dict[str, Any] | str | None = None,
) -> Any:
    """Stream SoftMix examples from the slides of `manifest` into a `tf.data.Dataset`.

    Epoch 0 holds exactly the examples ``softmix beam`` writes with the same options
    (the options below carry the ``softmix beam`` flags' names and are validated by the
    same `TileConfig` / `MixConfig`); epoch ``e`` pairs with ``epoch_seed(seed, e)``.
    See the module docstring for how reading, packing and mixing overlap.

    It stays one long function: most of it is this docstring and the keyword list
    (one per ``softmix beam`` flag; `tests/test_options.py` checks them against the
    config dataclasses); the body validates them and composes the `tf.data` pipeline,
    read top to bottom.

    Args:
        manifest: slide manifest (CSV or Parquet), as for ``softmix beam --manifest``.
        tile_size, stride, level, mpp, min_tissue, tissue_level, tissue_mode,
            label_image, stain_norm, stain_target, stain_fit_tiles: tiling and stain
            normalisation (`TileConfig`; `pipeline.steps.stain`): tiles are normalised
            before mixing exactly as the offline job does.
        grid, softness, alpha, ramp, mix_prob, pairing, group_column, num_mixes,
            keep_originals, seed, batch_size: pairing and mixing (`MixConfig`;
            `batch_size` never changes a pixel).
        on_error: "skip" (count bad slides/tiles, see `dataset_stats`) or "fail"
            (raise, naming the slide or tile and the reason).
        class_names: explicit class order; None = the sorted manifest labels.
        read_cache_mb: decoded slide rows one packing thread holds (MiB).
        epoch: the epoch to yield (0 = the offline job's examples), or None for an
            endless stream of epochs 0, 1, 2, ... (use `steps_per_epoch` in `fit`).
        shuffle: False, True (a 1024-example buffer) or a buffer size. Work units are
            always visited in an epoch-seeded order.
        batch: None yields single examples; an int yields batches of `batch` examples
            (the last one smaller unless `drop_remainder`), like
            ``.batch(batch, drop_remainder)`` on the single examples but cheaper: the
            work units' mixed batches are re-cut (`tf.data.Dataset.rebatch`) rather than
            split into examples and stacked again (with `shuffle`, examples are
            shuffled first, then batched).
        drop_remainder: with `batch`, drop the last, smaller batch.
        mix: True mixes in tf.data; False yields the unmixed pairs (dicts with
            ``image_a, image_b, label_a, label_b, seed, mix_index``) to mix on the
            accelerator with `softmix_tf.softmix(..., seeds=seed)`: keep ``image_a``
            and ``label_a`` where ``mix_index < 0`` (originals).
        as_dict: yield dicts with the provenance of `read_dataset(as_dict=True)`
            (``image, label, lam, seed, example_id, mix_index, a/slide_id, a/level,
            a/x, a/y, a/label, b/...``) instead of ``(image, label)``.
        input_context: a `tf.distribute.InputContext`: this pipeline takes work units
            ``k % num_input_pipelines == input_pipeline_id`` of each epoch's order.
        cache_dir: where plans and tile packs are kept (reused by later epochs and by
            later streams with the same tiling options); default a temporary directory
            removed at interpreter exit. One process writes a cache directory at a time.
        num_parallel_reads: work units read concurrently (default min(8, CPUs)).
        pack_threads: background packing threads (default min(4, CPUs)); each holds
            up to `read_cache_mb` of decoded rows.
        storage_options: fsspec options for the manifest, the slides and `cache_dir`
            when they are URLs (a dict or JSON text; flat or per protocol, as
            ``softmix beam --storage-options``); None keeps those in force.

    Returns:
        A `tf.data.Dataset` of `(image, label)` (image [tile_size, tile_size, C] in the
        slides' dtype, label float32 [K]), or of dicts (`as_dict`, `mix=False`); with
        `batch`, each field has a leading batch dimension.
        `pipeline.dataset_stats(ds)` gives its `StreamStats`. tf.data's autotuning
        model is off on it (`pipeline.dataset.reader.without_autotune_model`).

    Raises:
        ValueError: a bad option (the configs' messages).
        ManifestError, SlideError: a bad manifest; with on_error="fail", a bad slide.
        PipelineError: no usable tile at all.
    """
    import tensorflow as tf

    from ..dataset.reader import without_autotune_model
    from ..dataset.schema import FIELDS, PROVENANCE, field_shape
    from ..io import storage

    if storage_options is not None:
        storage.configure(storage_options)
    tile = TileConfig(tile_size=tile_size, stride=stride, level=level, mpp=mpp,
                      min_tissue=min_tissue, tissue_level=tissue_level,
                      tissue_mode=tissue_mode, label_image=label_image,
                      stain_norm=stain_norm, stain_target=stain_target,
                      stain_fit_tiles=stain_fit_tiles)
    mix_config = MixConfig(grid=grid, alpha=alpha, softness=softness, ramp=ramp,
                           mix_prob=mix_prob, pairing=pairing, group_column=group_column,
                           num_mixes=num_mixes, keep_originals=keep_originals, seed=seed,
                           batch_size=batch_size)
    if epoch is not None and (isinstance(epoch, bool) or int(epoch) != epoch or epoch < 0):
        raise ValueError(f"`epoch` must be an int >= 0 or None. Received: epoch={epoch!r}")
    buffer = 1024 if shuffle is True else int(shuffle or 0)
    if buffer < 0:
        raise ValueError(f"`shuffle` must be a bool or a buffer size >= 1. "
                         f"Received: shuffle={shuffle!r}")
    if batch is not None:
        check_count("batch", batch, MAX_SHUFFLE_BUFFER, "It is the examples per element "
                    "the dataset yields; None yields single examples.")
    elif drop_remainder:
        raise ValueError("`drop_remainder` applies to `batch`: pass `batch=N` with it, or "
                         "batch the single examples yourself. Received: "
                         "drop_remainder=True, batch=None")
    cpus = os.cpu_count() or 4
    reads = num_parallel_reads or min(8, cpus)
    packers = pack_threads if pack_threads is not None else min(4, cpus)
    if reads < 1 or packers < 0:
        raise ValueError("`num_parallel_reads` must be >= 1 and `pack_threads` >= 0. "
                         f"Received: num_parallel_reads={reads}, pack_threads={packers}")
    threads = "Threads beyond the machine's cores only add memory; the default suits it."
    check_count("num_parallel_reads", reads, MAX_WORKERS, threads)
    check_count("pack_threads", packers, MAX_WORKERS, threads, low=0)
    check_count("shuffle", buffer, MAX_SHUFFLE_BUFFER, "The buffer holds decoded images; "
                "1024 to 100000 examples shuffle well.", low=0)
    check_count("read_cache_mb", read_cache_mb, MAX_READ_CACHE_MB,
                "It is the decoded rows one packing thread holds (MiB).", low=0,
                integer=False)
    temporary = cache_dir is None
    root = tempfile.mkdtemp(prefix="softmix-stream-") if temporary else os.fspath(cache_dir)
    job = JobConfig(manifest=os.fspath(manifest), tile=tile, mix=mix_config,
                    output=OutputConfig(out_dir=root, num_shards=1, on_error=on_error),
                    class_names=tuple(class_names) if class_names else None,
                    read_cache_mb=read_cache_mb)
    run = load_run(job, staging=root)
    # A target fit read from a file is part of what the packs hold.
    stain = run.stain
    key = (tile, on_error) + ((stain.target,) if stain is not None and stain.kind == "path"
                              else ())
    run = dataclasses.replace(
        run, staging=posixpath.join(root, f"tiles-{stable_hash('softmix.stream', *key):016x}"))
    _check_cache_dir(root, run.staging)
    pipeline = (0, 1)
    if input_context is not None:
        pipeline = (input_context.input_pipeline_id, input_context.num_input_pipelines)
    stats = StreamStats()
    stream = _Stream(run, pipeline=pipeline, plan_threads=min(16, 2 * cpus), stats=stats)
    if temporary:
        _remove_at_exit(root, weakref.ref(stream))
    # Every pipeline packs in the epoch's order: its stages need the strips before them.
    stream.packer.start(stream.order(epoch or 0), packers)

    channels, dtype = stream.kind or DEFAULT_KIND
    size, num_classes = tile.tile_size, run.num_classes
    image = tf.TensorSpec([None, size, size, channels], tf.as_dtype(np.dtype(dtype)))
    label = tf.TensorSpec([None, num_classes], tf.float32)
    fields = {key: tf.TensorSpec([None, *field_shape(key, num_classes)],
                                 tf.as_dtype(FIELDS[key][0])) for key in PROVENANCE}
    stream.emit = _Emitter(mix_config.op, mix, as_dict, np.dtype(dtype), num_classes,
                           (size, size, channels))
    if mix:
        stream.emit.warm_up()  # compiled while the packing threads start on the strips
    signature: Any
    if not mix:
        signature = {"image_a": image, "image_b": image, "label_a": label, "label_b": label,
                     **{k: fields[k] for k in stream.emit.keys if k in fields}}
    elif as_dict:
        signature = {"image": image, "label": label,
                     "lam": tf.TensorSpec([None], tf.float32), **fields}
    else:
        signature = (image, label)

    num_units = len(stream.own_stages())
    if epoch is None:
        epochs = tf.data.Dataset.counter() if num_units else tf.data.Dataset.range(0)
    else:
        epochs = tf.data.Dataset.from_tensors(tf.constant(int(epoch), tf.int64))
    # Plain functions for tf.data (AutoGraph would parse their source: ~0.5 s).
    plain = tf.autograph.experimental.do_not_convert
    units = epochs.flat_map(
        plain(lambda e: tf.data.Dataset.range(num_units).map(plain(lambda u: (e, u)))))
    deterministic = buffer == 0
    # Work units yield finished batches (mixed in their own thread, `_Emitter`): tf.data
    # only moves them (unbatched into examples, or re-cut into `batch`-sized batches).
    dataset = units.interleave(
        plain(lambda e, u: tf.data.Dataset.from_generator(stream.examples, args=(e, u),
                                                          output_signature=signature)),
        cycle_length=reads, block_length=1, num_parallel_calls=reads,
        deterministic=deterministic)
    if buffer or batch is None:
        dataset = dataset.unbatch()
    if buffer:
        dataset = dataset.shuffle(buffer, seed=stable_hash("softmix.stream.shuffle", seed) >> 33,
                                  reshuffle_each_iteration=True)
    if batch is not None:
        # As `.batch` on the examples (batches span epochs when `epoch` is None).
        dataset = (dataset.batch(batch, drop_remainder=drop_remainder) if buffer
                   else dataset.rebatch(batch, drop_remainder=drop_remainder))
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    # tf.data's autotuning model has nothing to tune here (the parallelism is
    # `num_parallel_reads`) and cost much: its optimisation loop held the end of an epoch
    # back by 0.3-3.7 s in about half the passes (`without_autotune_model`).
    dataset = without_autotune_model(dataset)
    _STATS[dataset] = stats
    return dataset


def _check_cache_dir(root: str, staging: str) -> None:
    """Create the stream's folder in `root`, or say plainly why it cannot be."""
    from ..io import storage

    try:
        if storage.exists(root) and not storage.isdir(root):
            raise PipelineError(
                f"cache_dir={root!r} is a file, not a directory. Pass a directory (it is "
                "created if missing), or None for a temporary one.")
        storage.makedirs(staging)
    except OSError as err:
        raise PipelineError(
            f"cannot use cache_dir={root!r} as a directory for plans and tile packs "
            f"({type(err).__name__}: {err}). Pass a writable directory, or None for a "
            "temporary one.") from err


class _Emitter:
    """What a work unit yields for a chunk of its examples (`_Stream._batch`'s dict).

    With mixing, it runs `steps.mix.mix_batch` (the offline mixer) on slices of
    ``batch_size`` examples, the last one padded: one trace serves every call. Integer
    tiles use the XLA-compiled op (`mix._compiled_softmix`): the same pixels, labels
    and lam as the offline job's, for ~6x less CPU; float tiles the traced one.
    `warm_up` compiles it ahead (in a thread, while the first strips are packed).
    """

    _OP_KEYS = ("image_a", "image_b", "label_a", "label_b", "seed", "mix_index")

    def __init__(self, config: Any, mix: bool, as_dict: bool, dtype: np.dtype,
                 num_classes: int, shape: tuple[int, int, int]):
        from ..dataset.schema import PROVENANCE

        self.config, self.mix, self.as_dict = config, mix, as_dict
        self.dtype, self.num_classes, self.shape = dtype, num_classes, shape
        self.keys = tuple(dict.fromkeys(self._OP_KEYS + (PROVENANCE if as_dict else ())))
        self.provenance = PROVENANCE
        self._fn: Any = None
        self._lock = threading.Lock()

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    def chunk(self) -> int:
        """Examples read together: `_CHUNK`, a whole number of mixing batches."""
        return self.batch_size * max(1, _CHUNK // self.batch_size) if self.mix else _CHUNK

    def rows(self, count: int) -> int:
        """Image rows a chunk of `count` examples is read into: whole mixing batches
        (the rows past `count` pad the last one, `mix_batch` cuts them off)."""
        return -(-count // self.batch_size) * self.batch_size if self.mix else count

    def _mixer(self) -> Any:
        with self._lock:
            if self._fn is None:
                from ..steps.mix import _compiled_softmix

                fn = _compiled_softmix(self.config, jit_compile=self.dtype.kind in "ui")
                # Trace (and compile) on a zero batch of the run's shapes, once.
                size = self.batch_size
                images = np.zeros((size, *self.shape), self.dtype)
                labels = np.zeros((size, self.num_classes), np.float32)
                fn(images, images, labels, labels, np.zeros((size, 2), np.int64),
                   np.zeros(size, np.int64))
                self._fn = fn
            return self._fn

    def warm_up(self) -> None:
        """Trace (and compile) the mixer in a background thread, while planning's last
        steps, tf.data and the first packs proceed; work units wait for it."""
        threading.Thread(target=self._mixer, daemon=True, name="softmix-compile").start()

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[Any]:
        """Yield the chunk's output; its images hold `rows(count)` rows, the rest
        `count` (the padding rows are zeros: the op is batch-invariant, SPEC 2)."""
        if not self.mix:
            yield {k: batch[k] for k in self.keys}
            return
        size, count = self.batch_size, len(batch["seed"])
        mixer = self._mixer()
        for start in range(0, count, size):
            part = [_shared(batch[k][start:start + size]) if k.startswith("image")
                    else _pad(batch[k][start:start + size], size) for k in self._OP_KEYS]
            n = min(size, count - start)
            # np.asarray: the tensors' memory as is (`.numpy()` copies it).
            images, labels, lam = (np.asarray(t)[:n] for t in mixer(*part))
            if not self.as_dict:
                yield images, labels
            else:
                yield {"image": images, "label": labels, "lam": lam,
                       **{k: batch[k][start:start + n] for k in self.provenance}}


#: TensorFlow's kernels require tensor memory aligned to this many bytes
#: (`Tensor::IsAligned`; a misaligned buffer aborts the process, it raises nothing).
_TF_ALIGNMENT = 64


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """`np.empty(shape, dtype)` starting on a `_TF_ALIGNMENT`-byte boundary (numpy
    aligns large arrays to 16 bytes only), so that batches cut from it along the first
    two axes can be handed to TensorFlow in place (`_shared`)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + _TF_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _TF_ALIGNMENT
    return raw[start:start + size].view(dtype).reshape(shape)


def _shared(images: np.ndarray) -> Any:
    """`images` as a tensor on the same memory (DLPack): the op reads the decoded tiles
    where they are, without TensorFlow's copy of ~6 MB per batch of 32 (3 of the op's
    ~9 ms). The array itself (TensorFlow copies it) where it is not contiguous and
    `_TF_ALIGNMENT`-aligned, or DLPack cannot take it: TensorFlow's non-XLA kernels
    (float tiles) abort the process on a misaligned buffer."""
    import tensorflow as tf

    if not images.flags.c_contiguous or images.ctypes.data % _TF_ALIGNMENT:
        return images
    try:
        return tf.experimental.dlpack.from_dlpack(images.__dlpack__())
    except Exception:  # noqa: BLE001 - a dtype or layout DLPack refuses: TF copies
        return images


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    """`array` with its last row repeated up to `size` rows (`mix_batch`'s padding)."""
    if len(array) == size:
        return array
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])
