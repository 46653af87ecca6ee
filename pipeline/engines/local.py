"""The local engine: the offline job with no framework at all (`softmix local`).

    prepare_run -> plan_task (per slide) -> kind, stain target -> pack_stained (per strip)
                -> layout + pairing table -> pair_strip (here) -> mix_bucket (per bucket)
                -> finalize_shard (per shard) -> Run.publish

One worker runs every step in this process; more use a plain
`concurrent.futures.ProcessPoolExecutor` (spawned processes, TensorFlow capped to
`SOFTMIX_TF_THREADS` threads each). The steps and the decisions between them are
`pipeline.run`'s, exactly as Beam and Dask run them, so its shards are byte-identical
to theirs: it is the reference the engine tests compare against and the floor of
`benchmarks/bench_pipeline.py`. Pairing runs in the driver: it handles coordinates
only (a few microseconds per tile). Everything stays on one machine.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..accounting import Accounting
from ..config import JobConfig
from ..errors import PipelineError
from ..run import job as _job
from ..run import tasks as _tasks
from ..run.run import Run, pack_stained, prepare_run, stain_fit_of, strip_size, strip_tasks

__all__ = ["run_local"]


def _init_worker() -> None:
    from ..steps.mix import configure_tensorflow

    configure_tensorflow()


def _init_pool_worker() -> None:
    """A spawned worker process runs only the steps: TensorFlow and the op import
    without Keras (`mix.import_mixing_ops`)."""
    from ..steps.mix import import_mixing_ops

    import_mixing_ops(without_keras=True)


class _InProcess:
    """The one-worker "pool": `map` runs right here, in order."""

    def __enter__(self) -> _InProcess:
        _init_worker()
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    @staticmethod
    def map(fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]:
        return map(fn, *iterables)


def _pool(workers: int) -> Any:
    if workers == 1:
        return _InProcess()
    import multiprocessing

    # Spawned, not forked: the driver may already run TensorFlow threads.
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_pool_worker)


def run_local(job: JobConfig, *, workers: int = 1, progress: bool = True,
              examples_per_task: int | None = None) -> dict[str, Any]:
    """Run the whole job on this machine and return the written manifest.

    Args:
        job: the run's configuration.
        workers: processes (1: everything in this process).
        progress: show a progress counter.
        examples_per_task: examples per mix bucket (default 128; never changes output).

    Raises:
        ValueError: `workers` outside [1, config.MAX_WORKERS].
        PipelineError: bad manifest, existing output, or (with on_error="fail") a bad
            slide or tile.
    """
    from ..config import MAX_WORKERS, check_count

    check_count("workers", workers, MAX_WORKERS, "Local runs gain nothing beyond the "
                "machine's cores; to scale out use `softmix beam` or `softmix dask`.")
    run = prepare_run(job)
    if run.finished is not None:
        return dict(run.finished)
    params = run.params("local", workers=workers)
    with _job.progress_reporter(job.output, enabled=progress), _pool(workers) as pool:
        try:
            return _run(pool, run, params, examples_per_task)
        except PipelineError:
            raise
        except Exception as err:
            _job.reraise_pipeline_error(err)
            raise


def _run(pool: Any, run: Run, params: dict[str, Any], examples_per_task: int | None
         ) -> dict[str, Any]:
    job, staging = run.job, run.staging
    raw = list(pool.map(functools.partial(
        _tasks.plan_task, config=job.tile, on_error=run.on_error,
        class_names=run.class_names, staging=staging), run.slides))
    kind = run.kind_of(raw)
    plans = [_tasks.reconcile_plan(plan, kind) for plan in raw]
    stain = run.stain_for(raw)
    strips = list(pool.map(functools.partial(
        pack_stained, stain=stain, staging=staging, read_cache_mb=job.read_cache_mb,
        on_error=run.on_error), strip_tasks(run, plans)))
    layout = run.layout([strip_size(r) for r in strips], kind,
                        examples_per_task=examples_per_task)
    table = run.pairing_table(layout)
    by_bucket: dict[tuple[int, int], list] = collections.defaultdict(list)
    pair_acc = []
    for result in strips:
        pairs, accounting = _tasks.pair_strip(result, layout, table)
        pair_acc.append(accounting)
        for bucket, spec in pairs:
            by_bucket[bucket].append(spec)
    keys = sorted(by_bucket)
    buckets = list(pool.map(functools.partial(
        _tasks.mix_bucket, layout=layout, config=job.mix, num_classes=run.num_classes,
        progress_dir=staging), keys, [by_bucket[k] for k in keys]))
    by_shard: dict[int, list] = collections.defaultdict(list)
    for bucket in buckets:
        by_shard[bucket.shard].append(bucket)
    shards = sorted(by_shard)
    infos = list(pool.map(functools.partial(
        _tasks.finalize_shard, num_shards=layout.num_shards, config=job.output),
        shards, [by_shard[s] for s in shards]))
    accounting = Accounting.merge_all(
        [Accounting.from_plan(p) for p in plans] + [_tasks.strip_accounting(r) for r in strips]
        + pair_acc + [b.accounting for b in buckets])
    fits = [f for plan in plans for f in stain_fit_of(plan)]
    return run.publish(infos, layout.num_shards, accounting, params, stain=stain, fits=fits)
