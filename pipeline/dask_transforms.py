"""Dask adapter: the offline SoftMix job on a `distributed` cluster.

    manifest rows -> plan tasks (one per slide) -> gather plans (coordinates only)
                  -> reconcile + pair + assign shards on the client
                  -> mix tasks (one per shard part) -> write tasks (one per shard)
                  -> accounting + manifest.json on the client

Like `beam_transforms`, this module only decides *where* the pure core runs
(`_tiling.plan_slide`, `_pairing.PairingIndex`, `_mixing.mix_examples`,
`_encoding.encode_example`, `_sharding.shard_for`, `_job.write_staged_shard`,
`_job.tile_accounting`, `_job.publish_output`); it computes nothing itself.

Why futures and not a bag or a dataframe: the shape of the graph depends on data
(how many tiles survive tiling, how many shards), and pairing is global, so the job
runs in two phases. Phase one maps `plan_slide` over the slides and brings back only
coordinates (`SlidePlan`s, a few bytes per tile). The client then knows every
example's shard (`shard_for(example_id, num_shards)`) before any pixel is read, so
phase two is a plain fan-in per shard: mix tasks read, mix and encode a part of one
shard; the shard's write task sorts and writes them (temporary name + rename, so a
retried task never duplicates or truncates a shard). A bag would need a
shuffle/groupby to regroup records by shard, which costs a full data exchange the
client-side assignment makes unnecessary. No slide-sized array enters the graph:
task arguments are `SlideRecord`s and `ExampleSpec`s, results are plans, encoded
tile records and small per-tile outcomes. Shards are prioritised in order, so a
shard's write runs as soon as its parts are done and worker memory holds about one
shard per worker, however many slides the run has.

Accounting: `Accounting.from_tile` must see all outcomes of an anchor tile at once.
When all of an anchor's examples hash to one shard (always with `num_mixes=1` and no
originals), that shard's write task accounts it; the outcomes of anchors split over
several shards go back to the client, which groups them by anchor.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from . import _job, _output, _pairing, _sharding
from ._keys import ExampleSpec, SlidePlan, SlideRecord
from .config import JobConfig, MixConfig, OutputConfig, TileConfig
from .errors import PipelineError

__all__ = [
    "WorkerMemoryMonitor",
    "assign_shards",
    "measure_peak_worker_rss",
    "plan_slides",
    "run_dask",
    "run_job",
    "start_local_cluster",
]

logger = logging.getLogger(__name__)

# --- Worker side -----------------------------------------------------------------------

_CACHE_LOCK = threading.Lock()
_WORKER_CACHE: Any = None


class _LockedCache:
    """The worker process's `SlideCache`, safe for several worker threads."""

    def __init__(self) -> None:
        from ._slides import SlideCache

        self._cache = SlideCache()

    def get(self, path: str, slide_id: str | None = None, axes: str | None = None) -> Any:
        with _CACHE_LOCK:
            return self._cache.get(path, slide_id=slide_id, axes=axes)


def _worker_cache() -> _LockedCache:
    """One slide cache per worker process: a slide's store is opened once per worker."""
    global _WORKER_CACHE
    with _CACHE_LOCK:
        if _WORKER_CACHE is None:
            _WORKER_CACHE = _LockedCache()
        return _WORKER_CACHE


def _plan_task(record: SlideRecord, config: TileConfig, on_error: str,
               class_names: Sequence[str]) -> SlidePlan:
    from ._tiling import plan_slide

    return plan_slide(record, config, slide_cache=_worker_cache(), on_error=on_error,
                      class_names=class_names)


def _mix_task(specs: Sequence[ExampleSpec], slides: Sequence[SlideRecord], tile_size: int,
              config: MixConfig, num_classes: int, on_error: str, progress_dir: str | None
              ) -> tuple[list[tuple[str, bytes]], list[tuple[Any, tuple[str, Any]]]]:
    """Read, mix and encode a part of one shard: `(records, tile outcomes)`."""
    from ._encoding import encode_example
    from ._mixing import ExampleFailure, configure_tensorflow, mix_examples

    configure_tensorflow()  # before TF builds its pools: SOFTMIX_TF_THREADS, default 1
    read = _job.make_tile_reader(slides, tile_size, _worker_cache())
    results = mix_examples(specs, read, config, num_classes, on_error=on_error)
    _job.report_progress(progress_dir, len(results))
    records = [(r.spec.example_id, encode_example(r)) for r in results
               if not isinstance(r, ExampleFailure)]
    return records, [_job.tile_outcome(r) for r in results]


def _write_task(index: int, num_shards: int, config: OutputConfig, split_anchors: frozenset,
                *parts: tuple[list, list]) -> tuple[Any, Any, dict[Any, list]]:
    """Write one shard from its parts; account the anchors that live in it alone.

    Returns:
        `(ShardInfo, Accounting of this shard's unsplit anchors,
        {anchor: outcomes} of its split anchors)`.
    """
    records = [record for part_records, _ in parts for record in part_records]
    info = _job.write_staged_shard(config, index, num_shards, records)
    by_anchor: dict[Any, list] = collections.defaultdict(list)
    for _, outcomes in parts:
        for key, outcome in outcomes:
            by_anchor[key].append(outcome)
    local = _output.Accounting.merge_all(
        _job.tile_accounting(key, outcomes) for key, outcomes in by_anchor.items()
        if key not in split_anchors
    )
    split = {key: outcomes for key, outcomes in by_anchor.items() if key in split_anchors}
    return info, local, split


# --- Client side -----------------------------------------------------------------------


def plan_slides(client: Any, slides: Sequence[SlideRecord], config: TileConfig, *,
                class_names: Sequence[str], on_error: str = "skip",
                run_id: str | None = None) -> tuple[SlidePlan, ...]:
    """Tile every slide on the workers; return the reconciled plans (coordinates only)."""
    run_id = run_id or uuid.uuid4().hex[:8]
    futures = client.map(_plan_task, list(slides),
                         key=[f"softmix-plan-{run_id}-{i}" for i in range(len(slides))],
                         config=config, on_error=on_error, class_names=tuple(class_names))
    try:
        return _job.reconcile_plans(client.gather(futures))
    finally:
        client.cancel(futures)


def assign_shards(plans: Sequence[SlidePlan], config: MixConfig, num_classes: int,
                  num_shards: int) -> tuple[dict[int, list[ExampleSpec]], frozenset, Any]:
    """Pair the tiles of the reconciled `plans` and put each example in its shard.

    Returns:
        `(specs by shard index, anchors whose examples span several shards,
        Accounting of tiles with no example)`; specs are sorted by example id.
    """
    usable = [plan for plan in plans if plan.failure is None]
    index = _pairing.PairingIndex([t for p in usable for t in p.tiles], config, num_classes)
    shards: dict[int, list[ExampleSpec]] = collections.defaultdict(list)
    unpaired, split = [], set()
    for plan in usable:
        for tile in plan.tiles:
            specs = index.examples_for(tile)
            if not specs:
                unpaired.append(_output.Accounting.from_tile(tile))
            targets = {_sharding.shard_for(spec.example_id, num_shards) for spec in specs}
            for spec in specs:
                shards[_sharding.shard_for(spec.example_id, num_shards)].append(spec)
            if len(targets) > 1:
                split.add(_job._key_tuple(tile.key))
    for specs in shards.values():
        specs.sort()
    return dict(shards), frozenset(split), _output.Accounting.merge_all(unpaired)


def _part_size(num_specs: int, batch_size: int, num_threads: int) -> int:
    # At most 4 op batches per task (bounded task memory), but small jobs still spread
    # over every worker thread. Batch-invariance keeps the output independent of this.
    return max(1, min(4 * batch_size, math.ceil(num_specs / max(1, 2 * num_threads))))


def run_job(client: Any, job: JobConfig, *, progress: bool = True,
            examples_per_task: int | None = None,
            extra_params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole job on the cluster behind `client` and return the written manifest.

    The Python API for users who already hold a `distributed.Client`; the workers must
    see the slides and `job.output.out_dir` at the same paths/URLs as the client.

    Args:
        client: a connected `distributed.Client`.
        job: the run's configuration.
        progress: show a progress counter (local output only).
        examples_per_task: examples per mix task; default: up to 4 op batches.
        extra_params: more entries for the manifest's `params`.

    Raises:
        PipelineError: bad manifest, existing output, or (with on_error="fail") a bad
            slide or tile.
    """
    manifest = _prepare(job)
    return _run_prepared(client, job, manifest, progress=progress,
                         examples_per_task=examples_per_task, extra_params=extra_params)


def _prepare(job: JobConfig) -> Any:
    """Check the manifest and the output directory before any cluster work."""
    from ._manifest import load_slide_manifest

    manifest = load_slide_manifest(job.manifest, class_names=job.class_names,
                                   group_column=job.mix.group_column)
    _job.prepare_output(job.output)
    return manifest


def _run_prepared(client: Any, job: JobConfig, manifest: Any, *, progress: bool,
                  examples_per_task: int | None,
                  extra_params: Mapping[str, Any] | None) -> dict[str, Any]:
    class_names, slides = manifest.class_names, manifest.slides
    num_classes = len(class_names)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    params = _job.job_params(job, "dask", workers=len(workers), **dict(extra_params or {}))
    on_error = job.output.on_error
    run_id = uuid.uuid4().hex[:8]
    futures: list[Any] = []
    try:
        plans = plan_slides(client, slides, job.tile, class_names=class_names,
                            on_error=on_error, run_id=run_id)
        num_shards = _job.num_shards_for_job(job, plans)
        shards, split_anchors, unpaired = assign_shards(plans, job.mix, num_classes,
                                                        num_shards)
        num_specs = sum(len(specs) for specs in shards.values())
        num_threads = sum(w.get("nthreads", 1) for w in workers.values())
        part = examples_per_task or _part_size(num_specs, job.mix.batch_size, num_threads)
        slide_records = {record.slide_id: record for record in slides}
        progress_dir = _job.staging_dir(job.output)
        for index in sorted(shards):
            specs = shards[index]
            priority = 2 * (num_shards - index)  # earlier shards first, writes asap
            parts = []
            for start in range(0, len(specs), part):
                chunk = specs[start:start + part]
                used = sorted({s.a.key.slide_id for s in chunk} | {s.b.key.slide_id
                                                                     for s in chunk})
                parts.append(client.submit(
                    _mix_task, chunk, [slide_records[s] for s in used], job.tile.tile_size,
                    job.mix, num_classes, on_error, progress_dir,
                    key=f"softmix-mix-{run_id}-{index:05d}-{start:07d}", priority=priority,
                    pure=False))
            mine = frozenset(key for key in (_job._key_tuple(s.a.key) for s in specs)
                             if key in split_anchors)
            futures.append(client.submit(
                _write_task, index, num_shards, job.output, mine, *parts,
                key=f"softmix-write-{run_id}-{index:05d}", priority=priority + 1,
                pure=False))
        with _job.progress_reporter(job.output, enabled=progress, total=num_specs):
            infos, parts_acc, split_outcomes = _gather_shards(client, futures)
    except PipelineError:
        raise
    except Exception as err:
        _job.reraise_pipeline_error(err)
        raise
    finally:
        client.cancel(futures)
    accounting = _output.Accounting.merge_all(
        [_output.Accounting.from_plan(plan) for plan in plans] + parts_acc + [unpaired]
        + [_job.tile_accounting(key, outs) for key, outs in sorted(split_outcomes.items())]
    )
    return _job.publish_output(job.output, infos, num_shards, accounting, class_names,
                               params)


def _gather_shards(client: Any, futures: Sequence[Any]) -> tuple[list, list, dict]:
    from distributed import as_completed

    infos, accountings = [], []
    split: dict[Any, list] = collections.defaultdict(list)
    for _, (info, local, outcomes) in as_completed(futures, with_results=True):
        infos.append(info)
        accountings.append(local)
        for key, outs in outcomes.items():
            split[key].extend(outs)
    return infos, accountings, split


def start_local_cluster(workers: int = 1, *, threads_per_worker: int = 1,
                        memory_limit: str | int = "4GiB") -> Any:
    """A `distributed.LocalCluster` of `workers` processes, dashboard on a free port.

    Each worker's TensorFlow gets `threads_per_worker` threads (`SOFTMIX_TF_THREADS`),
    so workers x threads never oversubscribe the cores.
    """
    from distributed import LocalCluster

    env = {"SOFTMIX_TF_THREADS": os.environ.get("SOFTMIX_TF_THREADS", str(threads_per_worker)),
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                        processes=True, memory_limit=memory_limit, dashboard_address=":0",
                        env=env, silence_logs=logging.ERROR)


def run_dask(job: JobConfig, *, client: Any = None, scheduler: str | None = None,
             workers: int = 1, memory_limit: str | int = "4GiB", threads_per_worker: int = 1,
             progress: bool = True, examples_per_task: int | None = None) -> dict[str, Any]:
    """Run the whole job on Dask and return the written manifest (`softmix dask`).

    Uses `client` if given, else connects to `scheduler`, else starts (and closes) a
    LocalCluster of `workers` processes with `memory_limit` and `threads_per_worker`
    each. Prints the dashboard link.

    Raises:
        PipelineError: bad manifest, existing output, or (with on_error="fail") a bad
            slide or tile.
    """
    from distributed import Client

    extra = {"scheduler": scheduler, "memory_limit": str(memory_limit),
             "threads_per_worker": threads_per_worker}
    manifest = _prepare(job)  # bad input fails before any cluster starts
    options = {"progress": progress, "examples_per_task": examples_per_task,
               "extra_params": extra}
    if client is not None:
        return _run_prepared(client, job, manifest, **options)
    if scheduler is not None:
        with Client(scheduler) as own:
            print(f"dask dashboard: {own.dashboard_link}", flush=True)
            return _run_prepared(own, job, manifest, **options)
    with start_local_cluster(workers, threads_per_worker=threads_per_worker,
                             memory_limit=memory_limit) as cluster, Client(cluster) as own:
        print(f"dask dashboard: {own.dashboard_link}", flush=True)
        return _run_prepared(own, job, manifest, **options)


# --- Memory measurement (benchmarks) ---------------------------------------------------


def _process_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _process_peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class WorkerMemoryMonitor:
    """Poll every worker's RSS in a thread while a job runs (a context manager).

    Attributes:
        peak_rss: worker address -> highest polled RSS in bytes.
        peak_maxrss: worker address -> the process's lifetime peak RSS (`ru_maxrss`),
            read on exit; exact, where polling may miss short spikes.
    """

    def __init__(self, client: Any, interval: float = 0.2):
        self._client = client
        self._interval = interval
        self.peak_rss: dict[str, int] = {}
        self.peak_maxrss: dict[str, int] = {}

    def _poll(self) -> None:
        values = self._client.run(_process_rss, on_error="ignore")
        for address, rss in values.items():
            self.peak_rss[address] = max(rss, self.peak_rss.get(address, 0))

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - a worker restarting must not end the poll
                logger.debug("worker RSS poll failed", exc_info=True)

    def __enter__(self) -> WorkerMemoryMonitor:
        self._stop = threading.Event()
        self._poll()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self.peak_maxrss = dict(self._client.run(_process_peak_rss, on_error="ignore"))

    @property
    def peak_bytes(self) -> int:
        """The highest RSS of any worker (polled or `ru_maxrss`), in bytes."""
        return max([0, *self.peak_rss.values(), *self.peak_maxrss.values()])


def measure_peak_worker_rss(job: JobConfig, *, workers: int = 1, threads_per_worker: int = 1,
                            memory_limit: str | int = "4GiB", interval: float = 0.2,
                            examples_per_task: int | None = None
                            ) -> tuple[dict[str, Any], dict[str, int]]:
    """Run `job` on a fresh LocalCluster and measure the workers' peak RSS.

    For the benchmark "peak worker RSS with 4 vs 16 demo slides": a fresh cluster per
    call, so `ru_maxrss` covers this run only.

    Returns:
        `(manifest, {"peak_rss_bytes": max over workers, "baseline_rss_bytes": max
        worker RSS before the run})`.
    """
    from distributed import Client

    with start_local_cluster(workers, threads_per_worker=threads_per_worker,
                             memory_limit=memory_limit) as cluster, Client(cluster) as client:
        baseline = max(client.run(_process_rss).values())
        with WorkerMemoryMonitor(client, interval) as monitor:
            manifest = run_job(client, job, progress=False, examples_per_task=examples_per_task)
    return manifest, {"peak_rss_bytes": monitor.peak_bytes, "baseline_rss_bytes": baseline}
