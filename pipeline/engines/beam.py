"""Apache Beam adapter: the offline SoftMix job as composite PTransforms.

    manifest rows -> SlidesToPlans -> PlansToStrips (tile packs) -> PairStrips
                  -> MixBuckets -> WriteShards (+ accounting) -> manifest.json

Each transform only wires the steps of `pipeline.run.tasks` into Beam, and
`build_pipeline` only wires the decisions between them (pixel kind, stain target,
layout, pairing table, publish) that `pipeline.run.run.Run` makes for every engine:
nothing here computes anything the other engines do not compute the same way. Only
coordinates travel through Beam: strips carry tile records, the one shuffle carries
pair specs to their bucket, and pixels go from the slides into the tile packs and
from the packs into the bucket files (see `pipeline.steps.pack`). The run layout and
pairing table (one entry per slide) are singleton side inputs; no step holds all
tiles of the run. `Reshuffle`s fan slides and strips out over the workers.

Local runs use Beam's portable `FnApiRunner` (in-process or multi-process): Beam
2.77's `DirectRunner` would first try to download the Prism runner binary.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from ..accounting import Accounting
from ..config import JobConfig, MixConfig, OutputConfig, TileConfig
from ..records import SlidePlan, SlideRecord
from ..run import job as _job
from ..run import output as _output
from ..run.run import Run
from .worker_exit import exit_fast

__all__ = [
    "MixBuckets",
    "PairStrips",
    "PlansToStrips",
    "SlidesToPlans",
    "WriteShards",
    "build_pipeline",
    "local_pipeline_options",
    "run_beam",
]

_NAMESPACE = "softmix"
# The job's storage options while `build_pipeline` builds the graph: every DoFn made
# then keeps a copy (it is pickled to the workers) and configures them in `setup`.
_BUILD_STORAGE_OPTIONS: str | None = None
# Whether the workers that plan and pack also mix soon: they then import TensorFlow in
# the background (`tasks.prewarm_mixing`) while planning and packing. True for a
# resumed run (checks of kept work, then mixing) and for the local runner's worker
# processes (every one of them mixes); a remote runner's workers may only plan or pack.
_BUILD_PREWARM = False
# The local runner's SDK worker processes (`--direct_running_mode=multi_processing`):
# they end with `os._exit` once the runner lets them go (`worker_exit.exit_fast`).
_BUILD_LOCAL_PROCESSES = False


def _in_sdk_worker_process() -> bool:
    """Whether this process is an SDK worker the runner started (not the driver): the
    runner hands its workers their control endpoint in this variable."""
    return "CONTROL_API_SERVICE_DESCRIPTOR" in os.environ


class _StorageDoFn(beam.DoFn):
    def __init__(self) -> None:
        super().__init__()
        self.storage_options = _BUILD_STORAGE_OPTIONS
        self.prewarm = _BUILD_PREWARM
        self.local_process = _BUILD_LOCAL_PROCESSES

    def setup(self) -> None:
        from ..io import storage

        storage.ensure(getattr(self, "storage_options", None))
        self._local_setup()
        if getattr(self, "prewarm", False):
            from ..run.tasks import prewarm_mixing

            # An SDK worker process runs only our steps: no Keras to import there.
            prewarm_mixing(without_keras=_in_sdk_worker_process())

    def _local_setup(self) -> None:
        if getattr(self, "local_process", False) and _in_sdk_worker_process():
            exit_fast()


class _PlanSlide(_StorageDoFn):
    """Open one slide, tile it and filter background (pixels never leave the worker)."""

    def __init__(self, config: TileConfig, on_error: str, class_names: Sequence[str] | None,
                 staging: str | None):
        super().__init__()
        self._config = config
        self._on_error = on_error
        self._class_names = class_names
        self._staging = staging

    def process(self, record: SlideRecord) -> Iterable[SlidePlan]:
        from ..run.tasks import plan_task

        plan = plan_task(record, self._config, self._on_error, self._class_names,
                         self._staging)
        beam.metrics.Metrics.counter(_NAMESPACE, "slides_planned").inc()
        beam.metrics.Metrics.counter(_NAMESPACE, "chunks_read").inc(plan.chunks_read)
        beam.metrics.Metrics.counter(_NAMESPACE, "bytes_read").inc(plan.bytes_read)
        if plan.failure is not None:
            beam.metrics.Metrics.counter(_NAMESPACE, "slides_failed").inc()
        beam.metrics.Metrics.counter(_NAMESPACE, "tiles_kept").inc(len(plan.tiles))
        for _, count in plan.skipped:
            beam.metrics.Metrics.counter(_NAMESPACE, "tiles_skipped").inc(count)
        yield plan


class SlidesToPlans(beam.PTransform):
    """`SlideRecord`s -> `SlidePlan`s: tile keys of tissue, skip counts, slide failures.

    Slides fan out over workers with a Reshuffle; each worker opens its slides once.

    Args:
        config: tiling settings.
        on_error: "skip" turns a bad slide into a failed plan; "fail" raises.
        class_names: the run's classes (needed for soft labels from label images).
        staging: the run's staging directory: plans are kept there and reused by a
            resumed run (None: not kept).
    """

    def __init__(self, config: TileConfig, *, on_error: str = "skip",
                 class_names: Sequence[str] | None = None, staging: str | None = None):
        super().__init__()
        self._config = config
        self._on_error = on_error
        self._class_names = tuple(class_names) if class_names is not None else None
        self._staging = staging

    def expand(self, records):
        return (
            records
            | "FanOutSlides" >> beam.Reshuffle()
            | "PlanSlide" >> beam.ParDo(
                _PlanSlide(self._config, self._on_error, self._class_names, self._staging))
        )


class _PackStrip(_StorageDoFn):
    """Pack one strip: read its chunks once, cut and compress its tiles."""

    def __init__(self, staging: str, read_cache_mb: float, on_error: str):
        super().__init__()
        self._staging = staging
        self._read_cache_mb = read_cache_mb
        self._on_error = on_error

    def process(self, task, stain=None):
        from ..run.run import pack_stained

        result = pack_stained(task, stain, staging=self._staging,
                              read_cache_mb=self._read_cache_mb, on_error=self._on_error)
        counter = beam.metrics.Metrics.counter
        counter(_NAMESPACE, "strips_packed").inc()
        counter(_NAMESPACE, "chunks_read").inc(result.chunks_read)
        counter(_NAMESPACE, "bytes_read").inc(result.bytes_read)
        counter(_NAMESPACE, "bytes_needed").inc(result.bytes_needed)
        counter(_NAMESPACE, "tiles_read").inc(len(result.tiles))
        for _, count in result.skipped:
            counter(_NAMESPACE, "tiles_skipped").inc(count)
        yield result


class PlansToStrips(beam.PTransform):
    """`SlidePlan`s -> `StripResult`s: every kept tile read once into the tile packs.

    A plan is cut into strips (chunk columns, `pack.split_plan`) that fan out over
    the workers, so one slide's reading is spread over several workers too.

    Args:
        slides: the manifest's slide records.
        tile_size: tile side in pixels.
        staging: the run's staging directory (packs are written under it).
        read_cache_mb: decoded pixels a strip task holds at once.
        stain: the run's `stain.StainSpec` (or a singleton side input of it) when
            tiles are stain-normalised before packing; None otherwise.
    """

    def __init__(self, slides: Sequence[SlideRecord], tile_size: int, staging: str,
                 read_cache_mb: float, *, on_error: str = "skip", stain: Any = None):
        super().__init__()
        self._stain = stain
        self._records = {record.slide_id: record for record in slides}
        self._tile_size = tile_size
        self._staging = staging
        self._read_cache_mb = read_cache_mb
        self._on_error = on_error

    def expand(self, plans):
        from ..steps.pack import split_plan

        records, size = self._records, self._tile_size
        return (
            plans
            | "SplitPlan" >> beam.FlatMap(lambda p: split_plan(records[p.slide_id], p, size))
            | "FanOutStrips" >> beam.Reshuffle()
            | "PackStrip" >> beam.ParDo(
                _PackStrip(self._staging, self._read_cache_mb, self._on_error), self._stain)
        )


_ACCOUNTING = "accounting"


class _PairStrip(beam.DoFn):
    def process(self, result, layout, table):
        from ..run.tasks import pair_strip

        pairs, accounting = pair_strip(result, layout, table)
        yield beam.pvalue.TaggedOutput(_ACCOUNTING, accounting)
        yield from pairs


class PairStrips(beam.PTransform):
    """`StripResult`s -> `((shard, bucket), PairSpec)`, partners drawn per strip.

    Each worker holds the small run layout and pairing table (one entry per slide)
    as side inputs, never the tiles of other strips.

    Returns:
        `(pairs, accounting)`: the keyed specs and one `Accounting` per strip.
    """

    def __init__(self, layout: Any, table: Any):
        super().__init__()
        self._layout = layout
        self._table = table

    def expand(self, strips):
        outputs = strips | "Pair" >> beam.ParDo(
            _PairStrip(), self._layout, self._table).with_outputs(_ACCOUNTING, main="pairs")
        return outputs.pairs, outputs[_ACCOUNTING]


class _MixBucket(_StorageDoFn):
    def __init__(self, config: MixConfig, num_classes: int, progress_dir: str | None):
        super().__init__()
        self._config = config
        self._num_classes = num_classes
        self._progress_dir = progress_dir

    def setup(self) -> None:
        from ..io import storage
        from ..steps.mix import configure_tensorflow

        storage.ensure(getattr(self, "storage_options", None))
        configure_tensorflow()
        import softmix_tf  # noqa: F401 - build TensorFlow state once per worker

        self._local_setup()  # after TensorFlow's own exit hooks

    def process(self, item, layout):
        from ..run.tasks import mix_bucket

        bucket, specs = item
        result = mix_bucket(bucket, specs, layout, self._config, self._num_classes,
                            progress_dir=self._progress_dir)
        beam.metrics.Metrics.counter(_NAMESPACE, "examples_mixed").inc(
            result.accounting.examples_written)
        yield result


_KEPT = "kept"


class _SplitKept(beam.DoFn):
    """Tag the specs of buckets whose files a resumed run kept (`kept`: their sidecars'
    names in ``staging/buckets``, listed once when the pipeline is built)."""

    def __init__(self, staging: str, kept: frozenset[str]):
        super().__init__()
        self._staging = staging
        self._kept = kept

    def process(self, item):
        from ..run.tasks import bucket_path

        name = posixpath.basename(bucket_path(self._staging, *item[0])) + ".json"
        yield beam.pvalue.TaggedOutput(_KEPT, item) if name in self._kept else item


def _kept_buckets(staging: str) -> frozenset[str]:
    """The sidecar names in ``staging/buckets`` (one listing, in the driver)."""
    from ..io import storage

    return frozenset(storage.listdir(posixpath.join(staging, "buckets")))


class MixBuckets(beam.PTransform):
    """`((shard, bucket), PairSpec)` -> `BucketResult`: read from packs, mix, encode.

    Specs are grouped by bucket (a shuffle of coordinates only); each bucket's part
    file is sorted by example id, so its bytes do not depend on the engine.

    Args:
        config, num_classes: the run's mixing.
        layout: the run layout (a singleton side input).
        progress_dir: the run's staging directory (bucket files and progress).
        split_kept: a resumed run: the buckets whose files staging already holds are
            grouped and checked (reused, or mixed again if they do not verify) apart
            from the new ones, so the new buckets are spread evenly over the workers
            (the local runner splits a stage's input round-robin, not by work: a
            worker given most of the cheap kept buckets idled while the other mixed).
    """

    def __init__(self, config: MixConfig, num_classes: int, layout: Any, *,
                 progress_dir: str | None = None, split_kept: bool = False):
        super().__init__()
        self._dofn = _MixBucket(config, num_classes, progress_dir)
        self._layout = layout
        # Listed here, as the pipeline is built: one LIST for the run, not one per
        # worker thread, and only buckets kept before this run started count.
        self._split = (_SplitKept(progress_dir, _kept_buckets(progress_dir))
                       if split_kept and progress_dir else None)

    def expand(self, pairs):
        if self._split is None:
            return (
                pairs
                | "GroupByBucket" >> beam.GroupByKey()
                | "Mix" >> beam.ParDo(self._dofn, self._layout)
            )
        split = pairs | "SplitKept" >> beam.ParDo(self._split).with_outputs(_KEPT, main="new")
        kept = (split[_KEPT]
                | "GroupKeptByBucket" >> beam.GroupByKey()
                | "CheckKept" >> beam.ParDo(self._dofn, self._layout))
        new = (split.new
               | "GroupByBucket" >> beam.GroupByKey()
               | "Mix" >> beam.ParDo(self._dofn, self._layout))
        return (kept, new) | "AllBuckets" >> beam.Flatten()


class WriteShards(beam.PTransform):
    """`BucketResult`s -> staged shards (`ShardInfo`): a shard's parts concatenated."""

    def __init__(self, config: OutputConfig, layout: Any):
        super().__init__()
        self._config = config
        self._layout = layout

    def expand(self, buckets):
        from ..run.tasks import finalize_shard

        config = self._config

        def write(item, layout):
            shard, parts = item
            info = finalize_shard(shard, list(parts), layout.num_shards, config)
            beam.metrics.Metrics.counter(_NAMESPACE, "examples_written").inc(info.num_examples)
            return info

        return (
            buckets
            | "KeyByShard" >> beam.Map(lambda b: (b.shard, b))
            | "GroupByShard" >> beam.GroupByKey()
            | "ConcatShard" >> beam.Map(write, self._layout)
        )


class _AccountingFn(beam.CombineFn):
    def create_accumulator(self):
        return Accounting()

    def add_input(self, accumulator, element):
        return accumulator.merge(element)

    def merge_accumulators(self, accumulators):
        return Accounting.merge_all(accumulators)

    def extract_output(self, accumulator):
        return accumulator


def build_pipeline(pipeline: beam.Pipeline, run: Run, params: dict[str, Any], *,
                   examples_per_task: int | None = None, report: bool = False):
    """Add the whole run to `pipeline`; the last step writes `manifest.json`.

    Args:
        pipeline: a Beam pipeline (any runner).
        run: the prepared run (`run.prepare_run`).
        params: the `params` entry of `manifest.json` (`Run.params`).
        examples_per_task: examples per mix bucket (default 128).
        report: on Beam's local runner, after publishing, the same step writes the run
            report (``OUT/report.html``) when the run wrote examples. Remote runners
            (Dataflow) leave it to the driver (`softmix beam` writes it after the run):
            a worker lost while drawing it would have the runner retry the publishing
            step, which then finds OUT no longer this run's and fails a published run.

    Returns:
        A PCollection holding the manifest dict once written.
    """
    from ..run import tasks as _tasks
    from ..run.run import stain_fit_of, strip_size

    job, staging = run.job, run.staging
    global _BUILD_STORAGE_OPTIONS, _BUILD_PREWARM, _BUILD_LOCAL_PROCESSES
    _BUILD_STORAGE_OPTIONS = job.output.storage_options
    _BUILD_LOCAL_PROCESSES = _local_worker_processes(pipeline) > 0
    _BUILD_PREWARM = run.resumed or _BUILD_LOCAL_PROCESSES
    report = report and _runs_locally(pipeline.options)
    raw = (pipeline
           | "Slides" >> beam.Create(list(run.slides))
           | "SlidesToPlans" >> SlidesToPlans(job.tile, on_error=run.on_error,
                                              class_names=run.class_names, staging=staging))
    kind = beam.pvalue.AsSingleton(  # the run's pixel kind: only (channels, dtype) travel
        raw | "Kinds" >> beam.FlatMap(_tasks.plan_kind)
        | "CollectKinds" >> beam.combiners.ToList()
        | "Majority" >> beam.Map(_tasks.majority_kind))
    plans = raw | "Reconcile" >> beam.Map(_tasks.reconcile_plan, kind)
    stain: Any = run.stain
    if run.stain_slide is not None:  # a slide's fit: only that slide's plan is looked at
        target = run.stain_slide
        stain = beam.pvalue.AsSingleton(
            raw | "StainTargetPlan" >> beam.Filter(lambda p: p.slide_id == target)
            | "CollectStainTarget" >> beam.combiners.ToList()
            | "StainTarget" >> beam.Map(run.stain_for))
    fits = beam.pvalue.AsList(plans | "StainFits" >> beam.FlatMap(stain_fit_of))
    strips = plans | "PlansToStrips" >> PlansToStrips(
        run.slides, job.tile.tile_size, staging, job.read_cache_mb, on_error=run.on_error,
        stain=stain)
    layout_pc = (strips
                 | "StripSizes" >> beam.Map(strip_size)
                 | "CollectSizes" >> beam.combiners.ToList()
                 | "Layout" >> beam.Map(run.layout, kind, examples_per_task=examples_per_task))
    layout = beam.pvalue.AsSingleton(layout_pc)
    table = beam.pvalue.AsSingleton(layout_pc | "PairingTable" >> beam.Map(run.pairing_table))
    pairs, pair_accounting = strips | "PairStrips" >> PairStrips(layout, table)
    buckets = pairs | "MixBuckets" >> MixBuckets(job.mix, run.num_classes, layout,
                                                 progress_dir=staging, split_kept=run.resumed)
    shards = buckets | "WriteShards" >> WriteShards(job.output, layout)
    accounting = (
        (plans | "PlanAccounting" >> beam.Map(Accounting.from_plan),
         strips | "StripAccounting" >> beam.Map(_tasks.strip_accounting),
         pair_accounting,
         buckets | "BucketAccounting" >> beam.Map(lambda b: b.accounting))
        | "AllAccounting" >> beam.Flatten()
        | "MergeAccounting" >> beam.CombineGlobally(_AccountingFn()))

    def publish(_, infos, lay, acc, slide_fits, spec):
        manifest = run.publish(infos, lay.num_shards, acc, params, stain=spec,
                               fits=slide_fits)
        if report and _job.exit_status(manifest) == 0:
            # Here, where mixing loaded TensorFlow already (the report's shard sample
            # and contact sheet need it; in the driver its import alone took ~3 s);
            # the driver's `softmix` command tries once more after a failure.
            from ..tools.report import write_report_or_warn

            write_report_or_warn(job.output.out_dir, where=" in the pipeline")
        return manifest

    return (pipeline
            | "Finish" >> beam.Create([None])
            | "Publish" >> beam.Map(publish, beam.pvalue.AsList(shards), layout,
                                    beam.pvalue.AsSingleton(accounting), fits, stain))


def _runs_locally(options: PipelineOptions) -> bool:
    """Whether these options run on Beam's local runner (FnApiRunner / DirectRunner)."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) or runner is None else type(runner).__name__
    return (name or "DirectRunner").rsplit(".", 1)[-1] in ("FnApiRunner", "DirectRunner")


def _local_worker_processes(pipeline: beam.Pipeline) -> int:
    """How many SDK worker processes of the local FnApiRunner the pipeline starts (0: the
    runner is another one, or runs its one worker in the driver's process)."""
    from apache_beam.options.pipeline_options import DirectOptions

    direct = pipeline.options.view_as(DirectOptions)
    if not _runs_locally(pipeline.options) or direct.direct_running_mode != "multi_processing":
        return 0
    return max(1, direct.direct_num_workers or 1)


def _quiet_workers(beam_args: Sequence[str]) -> list[str]:
    args = list(beam_args)
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        args.append("--default_sdk_harness_log_level=WARNING")
    return args


def local_pipeline_options(workers: int = 1, beam_args: Sequence[str] = ()) -> PipelineOptions:
    """Pipeline options for a local run that never downloads a runner binary.

    Without `--runner` in `beam_args`, runs on Beam's portable FnApiRunner: in-process
    for one worker, `multi_processing` with `workers` SDK worker processes otherwise.
    """
    args = _quiet_workers(beam_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=FnApiRunner")
        if workers > 1:
            args += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    return PipelineOptions(args)


def run_beam(job: JobConfig, *, workers: int = 1, beam_args: Sequence[str] = (),
             progress: bool = True, examples_per_task: int | None = None,
             report: bool = False) -> dict[str, Any]:
    """Run the whole job on Beam and return the written manifest.

    Args:
        job: the run's configuration.
        workers: local worker processes (ignored by remote runners).
        beam_args: extra Beam pipeline options, e.g. ``["--runner=DataflowRunner", ...]``.
        progress: show a progress counter for local runs.
        examples_per_task: examples per mix bucket (default 128; never changes output).
        report: on the local runner, also write the run report (``OUT/report.html``)
            in the worker that publishes, right after publishing (`softmix beam` without
            ``--no-report``; on remote runners the command writes it after the run).

    Raises:
        ValueError: `workers` outside [1, config.MAX_WORKERS].
        PipelineError: bad manifest, existing output, or (with on_error="fail") a bad
            slide or tile.
    """
    from ..config import MAX_WORKERS, check_count
    from ..run.run import prepare_run

    check_count("workers", workers, MAX_WORKERS, "Local runs gain nothing beyond the "
                "machine's cores; to scale out use --runner=DataflowRunner.")
    run = prepare_run(job)
    if run.finished is not None:
        return dict(run.finished)
    params = run.params("beam", workers=workers, beam_options=list(beam_args))
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    with _job.progress_reporter(job.output, enabled=progress):
        pipeline = beam.Pipeline(options=local_pipeline_options(workers, beam_args))
        build_pipeline(pipeline, run, params, examples_per_task=examples_per_task,
                       report=report)
        try:
            pipeline.run().wait_until_finish()
        except Exception as err:
            _job.reraise_pipeline_error(err)
            raise
    return _output.read_manifest(job.output.out_dir)
