"""Apache Beam adapter: the offline SoftMix job as composite PTransforms.

    manifest rows -> SlidesToPlans -> PairTiles -> MixPairs -> EncodeExamples
                  -> WriteShards (+ accounting) -> manifest.json

Each transform only wires the pure core (`_tiling`, `_pairing`, `_mixing`,
`_encoding`, `_sharding`, `_output`) into Beam; nothing here computes anything the
Dask adapter does not compute the same way. Only coordinates (`TileRecord`,
`ExampleSpec`) travel until `MixPairs` reads pixels on the worker that mixes them;
slide stores are opened once per worker (`DoFn.setup`), TensorFlow is initialised once
per worker too.

Local runs use Beam's portable `FnApiRunner` (in-process or multi-process): Beam
2.77's `DirectRunner` would first try to download the Prism runner binary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from . import _job, _output, _pairing, _sharding
from ._keys import ExampleSpec, SlidePlan, SlideRecord
from ._mixing import ExampleFailure
from .config import JobConfig, MixConfig, OutputConfig, TileConfig

__all__ = [
    "EncodeExamples",
    "MixPairs",
    "PairTiles",
    "SlidesToPlans",
    "WriteShards",
    "build_pipeline",
    "local_pipeline_options",
    "run_beam",
]

_NAMESPACE = "softmix"


class _PlanSlide(beam.DoFn):
    """Open one slide, tile it and filter background (pixels never leave the worker)."""

    def __init__(self, config: TileConfig, on_error: str, class_names: Sequence[str] | None):
        self._config = config
        self._on_error = on_error
        self._class_names = class_names

    def setup(self) -> None:
        from ._slides import SlideCache

        self._cache = SlideCache()

    def process(self, record: SlideRecord) -> Iterable[SlidePlan]:
        from ._tiling import plan_slide

        plan = plan_slide(record, self._config, slide_cache=self._cache, on_error=self._on_error,
                          class_names=self._class_names)
        beam.metrics.Metrics.counter(_NAMESPACE, "slides_planned").inc()
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
    """

    def __init__(self, config: TileConfig, *, on_error: str = "skip",
                 class_names: Sequence[str] | None = None):
        super().__init__()
        self._config = config
        self._on_error = on_error
        self._class_names = tuple(class_names) if class_names is not None else None

    def expand(self, records):
        return (
            records
            | "FanOutSlides" >> beam.Reshuffle()
            | "PlanSlide" >> beam.ParDo(
                _PlanSlide(self._config, self._on_error, self._class_names))
        )


_UNPAIRED = "unpaired"


class _PairDoFn(beam.DoFn):
    """Per plan: the examples of its tiles; tiles with no partner go to `_UNPAIRED`."""

    def __init__(self, config: MixConfig, num_classes: int):
        self._config = config
        self._num_classes = num_classes
        self._index_source: object = None

    def process(self, plan: SlidePlan, plans: Sequence[SlidePlan]):
        if self._index_source is not plans:
            self._reconciled = {p.slide_id: p for p in plans}
            tiles = [tile for p in plans if p.failure is None for tile in p.tiles]
            self._index = _pairing.PairingIndex(tiles, self._config, self._num_classes)
            self._index_source = plans
        reconciled = self._reconciled[plan.slide_id]
        if reconciled.failure is not None:
            return
        for tile in reconciled.tiles:
            specs = self._index.examples_for(tile)
            if not specs:
                yield beam.pvalue.TaggedOutput(_UNPAIRED, _output.Accounting.from_tile(tile))
            yield from specs


class PairTiles(beam.PTransform):
    """`SlidePlan`s -> `ExampleSpec`s, one per example to write.

    Every worker builds the same `PairingIndex` from the full, reconciled list of tile
    coordinates (a side input), so partners depend only on `(seed, tile ids)`, never
    on bundling or workers.

    Args:
        config: pairing and mixing parameters.
        num_classes: number of classes.
        plans: singleton side input: the reconciled list of all slide plans
            (`_job.reconcile_plans`).

    Returns:
        A tuple `(specs, unpaired)`: the example specs, and an `Accounting` per tile
        that got no partner (counted under skip reason "no_partner").
    """

    def __init__(self, config: MixConfig, num_classes: int, plans: Any):
        super().__init__()
        self._config = config
        self._num_classes = num_classes
        self._plans = plans

    def expand(self, plans):
        outputs = plans | "Pair" >> beam.ParDo(
            _PairDoFn(self._config, self._num_classes), self._plans
        ).with_outputs(_UNPAIRED, main="specs")
        return outputs.specs, outputs[_UNPAIRED]


class _MixDoFn(beam.DoFn):
    def __init__(self, slides: Sequence[SlideRecord], tile_size: int, config: MixConfig,
                 num_classes: int, on_error: str, progress_dir: str | None = None):
        self._progress_dir = progress_dir
        self._slides = tuple(slides)
        self._tile_size = tile_size
        self._config = config
        self._num_classes = num_classes
        self._on_error = on_error

    def setup(self) -> None:
        from ._mixing import configure_tensorflow
        from ._slides import SlideCache

        configure_tensorflow()
        import softmix_tf  # noqa: F401 - build TensorFlow state once per worker

        read = _job.make_tile_reader(self._slides, self._tile_size, SlideCache())
        tiles_read = beam.metrics.Metrics.counter(_NAMESPACE, "tiles_read")

        def counted_read(key):
            tiles_read.inc()
            return read(key)

        self._read = counted_read

    def process(self, batch: Sequence[ExampleSpec]):
        from ._mixing import mix_examples

        results = mix_examples(batch, self._read, self._config, self._num_classes,
                               on_error=self._on_error)
        _job.report_progress(self._progress_dir, len(results))
        for result in results:
            if isinstance(result, ExampleFailure):
                beam.metrics.Metrics.counter(_NAMESPACE, "examples_failed").inc()
            else:
                beam.metrics.Metrics.counter(_NAMESPACE, "examples_mixed").inc()
            yield result


class MixPairs(beam.PTransform):
    """`ExampleSpec`s -> `MixedExample`s (or `ExampleFailure`s): read tiles and mix.

    Specs are regrouped into batches of `config.batch_size`; the SoftMix op is
    batch-invariant, so batch composition does not change any example.
    """

    def __init__(self, slides: Sequence[SlideRecord], tile_size: int, config: MixConfig,
                 num_classes: int, *, on_error: str = "skip", progress_dir: str | None = None):
        super().__init__()
        self._dofn = _MixDoFn(slides, tile_size, config, num_classes, on_error, progress_dir)
        self._batch_size = config.batch_size

    def expand(self, specs):
        return (
            specs
            | "SpreadSpecs" >> beam.Reshuffle()
            | "Batch" >> beam.BatchElements(
                min_batch_size=self._batch_size, max_batch_size=self._batch_size
            )
            | "Mix" >> beam.ParDo(self._dofn)
        )


class EncodeExamples(beam.PTransform):
    """`MixedExample`s -> `(example_id, serialized tf.train.Example)`."""

    def expand(self, examples):
        from ._encoding import encode_example

        return examples | "Encode" >> beam.Map(
            lambda example: (example.spec.example_id, encode_example(example))
        )


class _WriteShardDoFn(beam.DoFn):
    def __init__(self, config: OutputConfig):
        self._config = config

    def process(self, item, num_shards: int):
        index, records = item
        info = _job.write_staged_shard(self._config, index, num_shards, list(records))
        beam.metrics.Metrics.counter(_NAMESPACE, "examples_written").inc(info.num_examples)
        yield info


class WriteShards(beam.PTransform):
    """`(example_id, bytes)` -> staged shard files; yields one `ShardInfo` per shard.

    Records go to `shard_for(example_id)`, and each shard is sorted by example id, so
    a shard's bytes do not depend on the engine, the workers or the bundling.

    Args:
        config: output settings.
        num_shards: singleton side input (or int) with the number of shards.
    """

    def __init__(self, config: OutputConfig, num_shards: Any):
        super().__init__()
        self._config = config
        self._num_shards = num_shards

    def expand(self, records):
        return (
            records
            | "AssignShard" >> beam.Map(
                lambda record, n: (_sharding.shard_for(record[0], n), record), self._num_shards
            )
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShardDoFn(self._config), self._num_shards)
        )


class _AccountingFn(beam.CombineFn):
    def create_accumulator(self):
        return _output.Accounting()

    def add_input(self, accumulator, element):
        return accumulator.merge(element)

    def merge_accumulators(self, accumulators):
        return _output.Accounting.merge_all(accumulators)

    def extract_output(self, accumulator):
        return accumulator


def build_pipeline(pipeline: beam.Pipeline, job: JobConfig, slides: Sequence[SlideRecord],
                   class_names: Sequence[str], params: dict[str, Any]):
    """Add the whole job to `pipeline`; the last step writes `manifest.json`.

    Args:
        pipeline: a Beam pipeline (any runner).
        job: the run's configuration.
        slides: the manifest's slide records.
        class_names: the run's classes.
        params: the `params` entry of `manifest.json`.

    Returns:
        A PCollection holding the manifest dict once written.
    """
    num_classes = len(class_names)
    on_error = job.output.on_error
    plans = (
        pipeline
        | "Slides" >> beam.Create(list(slides))
        | "SlidesToPlans" >> SlidesToPlans(job.tile, on_error=on_error, class_names=class_names)
    )
    all_plans = (
        plans
        | "CollectPlans" >> beam.combiners.ToList()
        | "Reconcile" >> beam.Map(_job.reconcile_plans)
    )
    plans_side = beam.pvalue.AsSingleton(all_plans)
    num_shards = all_plans | "NumShards" >> beam.Map(
        lambda ps: _job.num_shards_for_job(job, ps)
    )
    num_shards_side = beam.pvalue.AsSingleton(num_shards)

    specs, unpaired = plans | "PairTiles" >> PairTiles(job.mix, num_classes, plans_side)
    results = specs | "MixPairs" >> MixPairs(
        slides, job.tile.tile_size, job.mix, num_classes, on_error=on_error,
        progress_dir=_job.staging_dir(job.output),
    )
    shards = (
        results
        | "Written" >> beam.Filter(lambda r: not isinstance(r, ExampleFailure))
        | "EncodeExamples" >> EncodeExamples()
        | "WriteShards" >> WriteShards(job.output, num_shards_side)
    )
    plan_accounting = all_plans | "PlanAccounting" >> beam.FlatMap(
        lambda ps: [_output.Accounting.from_plan(p) for p in ps]
    )
    tile_accounting = (
        results
        | "TileOutcome" >> beam.Map(_job.tile_outcome)
        | "GroupByTile" >> beam.GroupByKey()
        | "TileAccounting" >> beam.MapTuple(_job.tile_accounting)
    )
    accounting = (
        (plan_accounting, tile_accounting, unpaired)
        | "AllAccounting" >> beam.Flatten()
        | "MergeAccounting" >> beam.CombineGlobally(_AccountingFn())
    )
    return (
        pipeline
        | "Finish" >> beam.Create([None])
        | "Publish" >> beam.Map(
            lambda _, infos, n, acc: _job.publish_output(
                job.output, infos, n, acc, class_names, params),
            beam.pvalue.AsList(shards),
            num_shards_side,
            beam.pvalue.AsSingleton(accounting),
        )
    )


def local_pipeline_options(workers: int = 1, beam_args: Sequence[str] = ()) -> PipelineOptions:
    """Pipeline options for a local run that never downloads a runner binary.

    Without `--runner` in `beam_args`, runs on Beam's portable FnApiRunner: in-process
    for one worker, `multi_processing` with `workers` SDK worker processes otherwise.
    """
    args = list(beam_args)
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        args.append("--default_sdk_harness_log_level=WARNING")
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=FnApiRunner")
        if workers > 1:
            args += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    return PipelineOptions(args)


def run_beam(job: JobConfig, *, workers: int = 1, beam_args: Sequence[str] = (),
             progress: bool = True) -> dict[str, Any]:
    """Run the whole job on Beam and return the written manifest.

    Args:
        job: the run's configuration.
        workers: local worker processes (ignored by remote runners).
        beam_args: extra Beam pipeline options, e.g. ``["--runner=DataflowRunner", ...]``.
        progress: show a progress counter for local runs.

    Raises:
        PipelineError: bad manifest, existing output, or (with on_error="fail") a bad
            slide or tile.
    """
    from ._manifest import load_slide_manifest

    manifest = load_slide_manifest(job.manifest, class_names=job.class_names,
                                   group_column=job.mix.group_column)
    _job.prepare_output(job.output)
    params = _job.job_params(job, "beam", workers=workers,
                             beam_options=[a for a in beam_args])
    options = local_pipeline_options(workers, beam_args)
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    with _job.progress_reporter(job.output, enabled=progress):
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, job, manifest.slides, manifest.class_names, params)
        try:
            pipeline.run().wait_until_finish()
        except Exception as err:
            _job.reraise_pipeline_error(err)
            raise
    return _output.read_manifest(job.output.out_dir)
