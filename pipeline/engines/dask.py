"""Dask adapter: the offline SoftMix job on a `distributed` cluster.

    manifest rows -> plan tasks (one per slide) -> reconcile + split (one per slide)
                  -> pack tasks (one per strip: each chunk column)
                  -> run layout + pairing table on the client (one entry per slide)
                  -> pair tasks (one per slide, specs keyed by bucket)
                  -> mix tasks (one per bucket, fed by the slides' pair results)
                  -> concat tasks (one per shard, as soon as its buckets are written)
                  -> accounting + manifest.json on the client

Like the Beam engine, this module only decides *where* the steps of `pipeline.run.tasks`
run; the decisions between them are `pipeline.run.run.Run`'s, and it computes nothing
itself. Futures carry the data-dependent phases (how many strips a
slide has is known only after planning); the client only ever gathers small results:
`(channels, dtype)` per slide, `(slide, strip, tile count)` per strip, accountings and
shard infos, never a list of all tiles or all examples. Only packing and mixing run per
strip / bucket; the small steps run once per slide, and each phase is one `client.map`
(every task and round trip costs the driver, which shares the cores with the workers).
The one all-to-all step, specs (coordinates only) regrouped by bucket, is direct: each
bucket's mix task depends on the pair results of the slides that feed it and picks its
own specs out of them (a
`dask.bag` shuffle here cost a barrier, shuffle tasks and a few coarse mix partitions
that left a worker idle at the end; `benchmarks/profile_dask.py`). Pixels never
enter the graph: they go from the slides into the tile packs and from the packs into
the bucket files in the run's staging area (see `pipeline.steps.pack` for why).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ..accounting import Accounting
from ..config import JobConfig, MixConfig
from ..errors import PipelineError
from ..run import job as _job
from ..run.run import Run, pack_stained, prepare_run, stain_fit_of, strip_size
from ..steps.pack import split_plan

__all__ = [
    "FastExit",
    "WorkerMemoryMonitor",
    "run_dask",
    "run_job",
    "start_local_cluster",
]

logger = logging.getLogger(__name__)

# --- Client side -----------------------------------------------------------------------


def _identity(value: Any) -> Any:
    return value


def _reconciled_strips(plan: Any, record: Any, majority: Any, tile_size: int
                       ) -> tuple[tuple[Accounting, list[tuple[str, str]]], list]:
    """Reconcile a slide's plan with the run's kind and cut it into strips, in one task:
    `((accounting, stain fits), strips)`; only the first part travels to the client."""
    from ..run.tasks import reconcile_plan

    plan = reconcile_plan(plan, majority)
    return ((Accounting.from_plan(plan), stain_fit_of(plan)),
            split_plan(record, plan, tile_size=tile_size))


def _slide_facts(reconciled: tuple[Any, list]) -> tuple[Accounting, list, int]:
    """What the client needs of a reconciled slide: accounting, stain fits, strip count."""
    (accounting, fits), strips = reconciled
    return accounting, fits, len(strips)


def _pack_nth(reconciled: tuple[Any, list], index: int, **options: Any) -> Any:
    """Pack strip `index` of a slide's strips (no separate `getitem` task)."""
    return pack_stained(reconciled[1][index], **options)


def _strips_facts(results: list) -> list[tuple[Accounting, tuple[str, int, int, str | None]]]:
    """What the client needs of a slide's packed strips: accounting and size of each
    (one task per slide, not per strip)."""
    from ..run.tasks import strip_accounting

    return [(strip_accounting(result), strip_size(result)) for result in results]


def _pair_slide(results: list, layout: Any, table: Any) -> tuple[dict, Accounting]:
    """`tasks.pair_strip` over a slide's strips, specs grouped by bucket:
    `({bucket: [spec]}, accounting)` (one task per slide, not per strip)."""
    from ..run.tasks import pair_strip

    by_bucket: dict[tuple[int, int], list] = collections.defaultdict(list)
    parts = []
    for result in results:
        pairs, accounting = pair_strip(result, layout, table)
        parts.append(accounting)
        for bucket, spec in pairs:
            by_bucket[bucket].append(spec)
    return dict(by_bucket), Accounting.merge_all(parts)


def _pair_facts(paired: tuple[dict, Any]) -> tuple[Any, list[tuple[int, int]]]:
    """What the client needs of a slide's pairing: its accounting and bucket keys."""
    return paired[1], sorted(paired[0])


def _mix_bucket_of(bucket: tuple[int, int], paired: list[tuple[dict, Any]], layout: Any,
                   config: MixConfig, num_classes: int, progress_dir: str | None) -> Any:
    """Mix one bucket from the specs the slides feeding it paired into it."""
    from ..run.tasks import mix_bucket

    specs = [spec for by_bucket, _ in paired for spec in by_bucket.get(bucket, ())]
    return mix_bucket(bucket, specs, layout, config, num_classes, progress_dir=progress_dir)


def _finalize(shard: int, buckets: list, num_shards: int, config: Any) -> Any:
    from ..run.tasks import finalize_shard

    return finalize_shard(shard, buckets, num_shards, config)


def _without_tiles(plan: Any) -> Any:
    import dataclasses

    return dataclasses.replace(plan, tiles=(), skipped=())


def run_job(client: Any, job: JobConfig, *, progress: bool = True,
            examples_per_task: int | None = None,
            extra_params: Mapping[str, Any] | None = None,
            report: bool = False) -> dict[str, Any]:
    """Run the whole job on the cluster behind `client` and return the written manifest.

    The Python API for users who already hold a `distributed.Client`; the workers must
    see the slides and `job.output.out_dir` at the same paths/URLs as the client.

    Args:
        client: a connected `distributed.Client`.
        job: the run's configuration.
        progress: show a progress counter (local output only).
        examples_per_task: examples per mix bucket (default 128).
        extra_params: more entries for the manifest's `params`.
        report: once the run is published, a worker writes the run report
            (``OUT/report.html``, `pipeline.tools.report`) when the run wrote
            examples; a failure there is a warning on stderr, not the run's.

    Raises:
        PipelineError: bad manifest, existing output, or (with on_error="fail") a bad
            slide or tile.
    """
    run = prepare_run(job)
    if run.finished is not None:
        return dict(run.finished)
    return _run_prepared(client, run, progress=progress, examples_per_task=examples_per_task,
                         extra_params=extra_params, report=report)


def _run_prepared(client: Any, run: Run, *, progress: bool, examples_per_task: int | None,
                  extra_params: Mapping[str, Any] | None, prewarm: bool = False,
                  report: bool = False) -> dict[str, Any]:
    """The run's steps as futures; see the module docstring for what travels where.

    Longer than most functions here because it is the whole composition: five phases,
    each a few `client.map` calls and one decision of `run`, read top to bottom.
    """
    from ..io import storage
    from ..run import tasks as _tasks

    job, slides, staging = run.job, list(run.slides), run.staging
    if job.output.storage_options:  # workers of a cluster started elsewhere, too
        client.run(storage.ensure, job.output.storage_options)
    if run.resumed and not prewarm:
        # Mixing comes soon: TensorFlow imports while kept work is checked. A cluster of
        # our own started that import (without Keras) as its workers started.
        client.run(_tasks.prewarm_mixing)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    params = run.params("dask", workers=len(workers), **dict(extra_params or {}))
    run_id = uuid.uuid4().hex[:8]
    held: list[Any] = []
    try:
        # 1. Plan every slide; only (channels, dtype) come back to the client.
        raw = client.map(_tasks.plan_task, slides, config=job.tile, on_error=run.on_error,
                         class_names=run.class_names, staging=staging,
                         key=[f"softmix-plan-{run_id}-{i}" for i in range(len(slides))])
        held += raw
        kind = _tasks.majority_kind(
            k for ks in client.gather(client.map(_tasks.plan_kind, raw)) for k in ks)
        # 2. Reconcile and cut each plan into strips in one task per slide; one
        # gather brings back what the client needs (accounting, stain fits, strip
        # count). Small results only, few tasks and one gather per phase: every task
        # and every round trip costs the scheduler, the client and a worker
        # (`benchmarks/profile_dask.py`).
        reconciled = client.map(_reconciled_strips, raw, slides, majority=kind,
                                tile_size=job.tile.tile_size)
        held += reconciled
        facts = client.gather(client.map(_slide_facts, reconciled))
        stain = run.stain
        if run.stain_slide is not None:  # only the target slide's plan comes back
            index = [s.slide_id for s in slides].index(run.stain_slide)
            stain = run.stain_for([client.submit(_without_tiles, raw[index]).result()])
        plan_acc = [acc for acc, _, _ in facts]
        fits = [f for _, fs, _ in facts for f in fs]
        # 3. Pack every strip (one task each: the unit of work that balances workers);
        # sizes and accountings come back per slide.
        counts = [n for _, _, n in facts]
        flat = client.map(_pack_nth, [r for r, n in zip(reconciled, counts, strict=True)
                                      for _ in range(n)],
                          [i for n in counts for i in range(n)], stain=stain,
                          staging=staging, read_cache_mb=job.read_cache_mb,
                          on_error=run.on_error, pure=False)
        held += flat
        if prewarm and not run.resumed and flat:
            # Every worker of a cluster of our own will mix: TensorFlow imports in a
            # background thread while the strips are packed (with 1 worker, on the
            # core the driver leaves idle) instead of delaying the first bucket.
            client.run(_tasks.prewarm_mixing, without_keras=True)
        ends = list(itertools.accumulate(counts))
        results = [flat[end - n:end] for end, n in zip(ends, counts, strict=True) if n]
        per_slide = client.gather(client.map(_strips_facts, results))
        strip_acc = [acc for slide_facts in per_slide for acc, _ in slide_facts]
        sizes = [size for slide_facts in per_slide for _, size in slide_facts]
        # 4. The small run layout and pairing table, broadcast to every worker.
        layout = run.layout(sizes, kind, examples_per_task=examples_per_task)
        table = run.pairing_table(layout)
        # Tasks, not `scatter`: a scattered value is lost with its worker, a task's
        # result is recomputed.
        layout_f = client.submit(_identity, layout, key=f"softmix-layout-{run_id}")
        table_f = client.submit(_identity, table, key=f"softmix-table-{run_id}")
        held += [layout_f, table_f]
        # Pair per slide, keyed by bucket; only each slide's bucket keys come back.
        paired = client.map(_pair_slide, results, layout=layout_f, table=table_f)
        held += paired
        pair_facts = client.gather(client.map(_pair_facts, paired))
        pair_acc = [acc for acc, _ in pair_facts]
        bucket_keys = [keys for _, keys in pair_facts]
        feeds: dict[tuple[int, int], list] = collections.defaultdict(list)
        for future, keys in zip(paired, bucket_keys, strict=True):
            for key in keys:
                feeds[key].append(future)
        # 5. One mix task per bucket, reading its specs straight from the slides that
        # feed it (no shuffle: no barrier, no shuffle tasks, every bucket its own
        # task so workers stay evenly busy); each shard is concatenated as soon as its
        # own buckets are written.
        keys = sorted(feeds)
        mixed = client.map(_mix_bucket_of, keys, [feeds[k] for k in keys], layout=layout_f,
                           config=job.mix, num_classes=run.num_classes, progress_dir=staging,
                           key=[f"softmix-mix-{run_id}-{s}-{b}" for s, b in keys], pure=False)
        held += mixed
        by_shard: dict[int, list] = collections.defaultdict(list)
        for key, future in zip(keys, mixed, strict=True):
            by_shard[key[0]].append(future)
        shards = sorted(by_shard)
        finals = client.map(_finalize, shards, [by_shard[s] for s in shards],
                            num_shards=layout.num_shards, config=job.output,
                            key=[f"softmix-shard-{run_id}-{s}" for s in shards], pure=False)
        held += finals
        with _job.progress_reporter(job.output, enabled=progress,
                                    total=run.num_examples(sizes)):
            done = client.gather([*finals, *mixed])
        infos, buckets = done[:len(finals)], done[len(finals):]
    except PipelineError:
        raise
    except Exception as err:
        _job.reraise_pipeline_error(err)
        raise
    finally:
        client.cancel(held)
    accounting = Accounting.merge_all(
        list(plan_acc) + list(strip_acc) + list(pair_acc) + [b.accounting for b in buckets])
    manifest = run.publish(infos, layout.num_shards, accounting, params, stain=stain,
                           fits=fits)
    if report and _job.exit_status(manifest) == 0:
        _report_on_worker(client, job.output.out_dir, run_id)
    return manifest


def _report_on_worker(client: Any, out_dir: str, run_id: str) -> str | None:
    """Write the run report on a worker: mixing loaded TensorFlow there already (the
    report's shard sample and contact sheet need it). At the end of a 16-slide run of
    ~36 s, the client's TensorFlow import and the report took 4.6 s, the task on a
    worker ~1.7 s. A lost worker only makes Dask rerun this task: the dataset is
    published already."""
    from ..tools.report import write_report, write_report_or_warn

    def on_worker(path: str) -> str:
        return client.submit(write_report, path, pure=False,
                             key=f"softmix-report-{run_id}").result()

    return write_report_or_warn(out_dir, where=" on a Dask worker", writer=on_worker)


#: Dask settings for the workers of `start_local_cluster` (measured with
#: `benchmarks/profile_dask.py` and `bench_pipeline.py`, 16 slides of 8192 px):
#:
#: - ``MALLOC_TRIM_THRESHOLD_`` unset: Dask's default (65536, set before a worker
#:   starts) fixes glibc's mmap threshold at 128 KiB, so every decoded chunk, tile pack
#:   and tile batch is a fresh ``mmap`` whose pages fault in again: +14 s of system CPU
#:   for the very same run in one process (7 -> 21 s). Tasks here free what they
#:   allocate, so the default dynamic threshold keeps memory flat without trimming.
#:   An environment variable of the same name still wins (Dask reads it first).
#: - the statistical profiler off: it samples every task thread's stack every 10 ms.
#: - slower housekeeping timers: an idle 2-worker LocalCluster burned 37 ms of CPU per
#:   second in the driver (scheduler and nannies share its event loop) and 17 in each
#:   worker, mostly the 20 ms event-loop "tick" (a blocked-loop diagnostic), the 100 ms
#:   memory monitor and the 500 ms system monitor; with 1 s / 500 ms / 2 s: 11 and 3
#:   (`benchmarks/profile_dask.py --idle`). Memory limits still hold: a worker is
#:   paused, spilled or restarted within half a second of crossing them.
WORKER_CONFIG: dict[str, Any] = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
}


class FastExit(WorkerPlugin):
    """A worker that closes ends its process without the interpreter's teardown
    (`pipeline.engines.worker_exit`: ~1 CPU s per worker with TensorFlow loaded, which
    `LocalCluster.close` waits for). `run_dask` adds it to the clusters it starts
    itself; a worker closes once the run is published, or when its nanny restarts it."""

    name = "softmix-fast-exit"

    def teardown(self, worker: Any) -> None:
        from distributed.core import Status

        from .worker_exit import exit_fast

        # Also called when the plugin is removed or replaced on a running worker.
        if worker.status in (Status.closing, Status.closed):
            exit_fast()


def dask_setup(worker: Any) -> None:
    """Worker preload hook (`distributed`'s ``preload``, see `start_local_cluster`): the
    worker process starts importing TensorFlow and the op, without Keras, as it starts."""
    from ..run.tasks import prewarm_mixing

    prewarm_mixing(without_keras=True)


def start_local_cluster(workers: int = 1, *, threads_per_worker: int = 1,
                        memory_limit: str | int = "4GiB", prewarm: bool = False) -> Any:
    """A `distributed.LocalCluster` of `workers` processes, dashboard on a free port.

    Each worker's TensorFlow gets `threads_per_worker` threads (`SOFTMIX_TF_THREADS`),
    so workers x threads never oversubscribe the cores. With `prewarm` (a resumed
    run: mixing comes right after the checks of kept work), each worker starts
    importing TensorFlow as its process starts (`dask_setup`).
    """
    import dask
    from distributed import LocalCluster

    env = {"SOFTMIX_TF_THREADS": os.environ.get("SOFTMIX_TF_THREADS", str(threads_per_worker)),
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    # Nannies read this when they are made and keep it for restarts; workers get the
    # config as it is now.
    with dask.config.set(WORKER_CONFIG):
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                            processes=True, memory_limit=memory_limit,
                            dashboard_address=":0", env=env, silence_logs=logging.ERROR,
                            preload=[__name__] if prewarm else None)


def run_dask(job: JobConfig, *, client: Any = None, scheduler: str | None = None,
             workers: int = 1, memory_limit: str | int = "4GiB", threads_per_worker: int = 1,
             progress: bool = True, examples_per_task: int | None = None,
             report: bool = False) -> dict[str, Any]:
    """Run the whole job on Dask and return the written manifest (`softmix dask`).

    Uses `client` if given, else connects to `scheduler`, else starts (and closes) a
    LocalCluster of `workers` processes with `memory_limit` and `threads_per_worker`
    each. Prints the dashboard link. With `report`, a worker writes the run report
    once the run is published (`run_job`).

    Raises:
        ValueError: `workers` or `threads_per_worker` outside [1, config.MAX_WORKERS].
        PipelineError: bad manifest, existing output, or (with on_error="fail") a bad
            slide or tile.
    """
    from distributed import Client

    from ..config import MAX_WORKERS, check_count

    for name, value in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        check_count(name, value, MAX_WORKERS, "A local cluster gains nothing beyond the "
                    "machine's cores; to scale out pass `scheduler`.")
    extra = {"scheduler": scheduler, "memory_limit": str(memory_limit),
             "threads_per_worker": threads_per_worker}
    run = prepare_run(job)  # bad input fails before any cluster starts
    if run.finished is not None:
        return dict(run.finished)
    options = {"progress": progress, "examples_per_task": examples_per_task,
               "extra_params": extra, "report": report}
    if client is not None:
        return _run_prepared(client, run, **options)
    if scheduler is not None:
        with Client(scheduler) as own:
            print(f"dask dashboard: {own.dashboard_link}", flush=True)
            return _run_prepared(own, run, **options)
    with start_local_cluster(workers, threads_per_worker=threads_per_worker,
                             memory_limit=memory_limit,
                             prewarm=run.resumed) as cluster, Client(cluster) as own:
        print(f"dask dashboard: {own.dashboard_link}", flush=True)
        own.register_plugin(FastExit())
        return _run_prepared(own, run, prewarm=True, **options)


# --- Memory measurement: the workers' peak RSS while a job runs ---------------------------


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
