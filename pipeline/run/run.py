"""One run: the decisions between its steps, made once for every engine.

    prepare_run(job) -> Run: manifest, stain target, fingerprint, OUT locked and staged
        plan_task (per slide)  ->  Run.kind_of(plans): the run's pixel kind
                                   Run.stain_for(plans): the stain target, resolved
        pack_stained (per strip) -> Run.layout(strip sizes), Run.pairing_table(layout)
        pair_strip, mix_bucket, finalize_shard (per strip / bucket / shard)
    Run.publish(shards, accounting, ...) -> manifest.json

An engine (`pipeline.engines`: beam, dask, local, stream) only decides *where* the steps
of `pipeline.run.tasks` run and how their small results reach these functions; what a
run is (its options, its layout, its pairing, what it publishes) is decided here, so
the engines cannot drift apart. A new engine: call `prepare_run`, then the steps in the
order above (see `pipeline.engines.local` for the plainest composition).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..accounting import Accounting
from ..config import JobConfig, MixConfig
from ..errors import PipelineError
from ..records import SlidePlan, SlideRecord
from ..steps.pack import StripResult, StripTask
from ..steps.stain import StainSpec
from . import job as _job
from . import tasks as _tasks

__all__ = [
    "DEFAULT_KIND",
    "Run",
    "load_run",
    "pack_stained",
    "prepare_run",
    "stain_fit_of",
    "strip_size",
]

# The pixel kind a run assumes when no slide could be planned (sizes the shards only).
DEFAULT_KIND = (3, "uint8")


@dataclasses.dataclass(frozen=True)
class Run:
    """What one run is, once its inputs are checked; small and picklable (it travels to
    a Beam worker for the layout and publish steps).

    Attributes:
        job: the run's configuration.
        slides: the manifest's slide records.
        class_names: the run's classes (K = len).
        stain: the run's `StainSpec` (a slide target not resolved yet), None without
            stain normalisation.
        staging: where plans, packs, buckets and staged shards go.
        fingerprint: `job.run_fingerprint` (None for a stream: it publishes nothing).
        resumed: an interrupted run is continued (`job.prepare_output`).
        finished: with `--resume` of a run that already finished: its manifest (the
            engine returns it and does nothing else).
    """

    job: JobConfig
    slides: tuple[SlideRecord, ...]
    class_names: tuple[str, ...]
    stain: StainSpec | None
    staging: str
    fingerprint: Mapping[str, Any] | None = None
    resumed: bool = False
    finished: Mapping[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def on_error(self) -> str:
        return self.job.output.on_error

    def params(self, engine: str, **extra: Any) -> dict[str, Any]:
        """`manifest.json`'s ``params``: every option, `engine`, `extra`, the fingerprint."""
        digest = (_job.fingerprint_digest(self.fingerprint)
                  if self.fingerprint is not None else None)
        return _job.job_params(self.job, engine, **extra, run_fingerprint=digest)

    # --- After planning ----------------------------------------------------------------

    @staticmethod
    def kind_of(plans: Iterable[SlidePlan]) -> tuple[int, str] | None:
        """The run's `(channels, dtype)`: the majority of the usable plans (None: none)."""
        return _tasks.majority_kind(k for plan in plans for k in _tasks.plan_kind(plan))

    @property
    def stain_slide(self) -> str | None:
        """The slide whose plan holds the stain target (a slide target), else None."""
        stain = self.stain
        return stain.source if stain is not None and stain.target is None else None

    def stain_for(self, plans: Iterable[SlidePlan]) -> StainSpec | None:
        """The stain spec tiles are packed with: a slide target resolved from its plan
        (only that plan is needed; raw plans, before `reconcile_plan`)."""
        return self.stain.with_slide_fit(plans) if self.stain is not None else None

    # --- After packing -----------------------------------------------------------------

    def layout(self, sizes: Iterable[tuple[Any, ...]], kind: tuple[int, str] | None,
               *, examples_per_task: int | None = None) -> _tasks.RunLayout:
        """The run layout from `(slide, strip, planned tiles[, content[, failed]])` of
        every strip (`strip_size`)."""
        channels, dtype = kind if kind is not None else DEFAULT_KIND
        return _tasks.build_layout(
            sizes, self.slides, self.job, self.staging,
            tile_bytes=_tasks.example_bytes(channels, dtype, self.job.tile.tile_size),
            examples_per_task=examples_per_task)

    def pairing_table(self, layout: _tasks.RunLayout, *, seed: int | None = None) -> Any:
        """The `PairingTable` of the layout's tile counts (`seed`: another pairing seed,
        the stream's later epochs).

        Raises:
            PipelineError: the tiles cannot be paired as asked (e.g. cross-class pairing
                with one class), with the table's message.
        """
        from ..steps.pair import PairingTable

        mix: MixConfig = self.job.mix
        if seed is not None:
            mix = MixConfig(seed=seed, pair=mix.pair, op=mix.op)
        try:
            return PairingTable(layout.counts(), mix, self.num_classes)
        except ValueError as err:
            raise PipelineError(str(err)) from err

    def num_examples(self, sizes: Iterable[tuple[Any, ...]]) -> int:
        """Examples the run writes for these strip sizes (a progress bar's total)."""
        mix = self.job.mix
        return sum(s[2] - len(s[4] if len(s) > 4 else ()) for s in sizes) * (
            mix.num_mixes + int(mix.keep_originals))

    # --- The end -------------------------------------------------------------------------

    def publish(self, shards: Sequence[Any], num_shards: int, accounting: Accounting,
                params: Mapping[str, Any], *, stain: StainSpec | None = None,
                fits: Iterable[tuple[str, str]] = ()) -> dict[str, Any]:
        """Publish the staged shards (`job.publish_output`) and return the manifest.

        Args:
            shards: the `ShardInfo`s of the staged shards.
            num_shards: the layout's shard count.
            accounting: the merged accounting of every step.
            params: `Run.params(...)`.
            stain: the stain spec tiles were packed with (`stain_for`).
            fits: `(slide_id, fit JSON)` of every usable slide (`stain_fit_of`).
        """
        accounting = accounting.with_resumed({"shards": sum(s.reused for s in shards)},
                                             resumed_run=self.resumed)
        section = stain.manifest_section(dict(fits)) if stain is not None else None
        return _job.publish_output(self.job.output, shards, num_shards, accounting,
                                   self.class_names, params, stain=section)


def load_run(job: JobConfig, *, staging: str | None = None) -> Run:
    """The run's checked inputs (manifest and stain target), without touching OUT.

    For the stream, which keeps its plans and packs in `staging` and publishes nothing.

    Raises:
        ManifestError: a bad manifest.
        PipelineError: a bad stain target.
    """
    from ..io import storage
    from ..io.manifest import load_slide_manifest
    from ..steps.stain import resolve_stain

    storage.ensure(job.output.storage_options)  # before any worker process starts
    manifest = load_slide_manifest(job.manifest, class_names=job.class_names,
                                   group_column=job.mix.group_column)
    stain = resolve_stain(job.tile.stain_norm, job.tile.stain_target,
                          [s.slide_id for s in manifest.slides])
    return Run(job=job, slides=tuple(manifest.slides),
               class_names=tuple(manifest.class_names), stain=stain,
               staging=staging if staging is not None else _job.staging_dir(job.output))


def prepare_run(job: JobConfig) -> Run:
    """Check the manifest and stain target, then lock and stage OUT, before any work.

    With ``--resume`` of a run that already finished, says so and returns a `Run`
    whose `finished` is its manifest.

    Raises:
        ManifestError, PipelineError: bad input.
        OutputExistsError: OUT holds a dataset or another run (see `job.prepare_output`).
    """
    run = load_run(job)
    fingerprint = _job.run_fingerprint(job, run.slides, stain=run.stain)
    try:
        resumed = _job.prepare_output(job.output, fingerprint, slides=run.slides)
    except _job.RunFinished as done:
        print(done, flush=True)
        return dataclasses.replace(run, fingerprint=fingerprint, finished=done.manifest)
    return dataclasses.replace(run, fingerprint=fingerprint, resumed=resumed)


# --- Small picklable step helpers the engines ship to their workers ---------------------


def pack_stained(task: StripTask, stain: StainSpec | None, *, staging: str,
                 read_cache_mb: float, on_error: str) -> StripResult:
    """`tasks.pack_task` with the strip's stain transform (none without stain)."""
    from ..steps.stain import strip_transform

    return _tasks.pack_task(task, staging, read_cache_mb, on_error,
                            transform=strip_transform(task, stain))


def stain_fit_of(plan: SlidePlan) -> list[tuple[str, str]]:
    """`[(slide_id, fit JSON)]` of a usable plan with a stain fit, else `[]`."""
    return [(plan.slide_id, plan.stain_fit)] if plan.failure is None and plan.stain_fit else []


def strip_size(result: StripResult
               ) -> tuple[str, int, int, str | None, tuple[int, ...]]:
    """`(slide, strip, planned tiles, slide content fingerprint, failed tiles)` of a
    packed strip: what `Run.layout` needs (pairing counts planned tiles)."""
    return (result.slide_id, result.strip, result.planned, result.content, result.failed)


def strip_tasks(run: Run, plans: Iterable[SlidePlan]) -> list[StripTask]:
    """Every strip of the plans (`pack.split_plan`), in plan order."""
    from ..steps.pack import split_plan

    records = {r.slide_id: r for r in run.slides}
    return [t for plan in plans
            for t in split_plan(records[plan.slide_id], plan, run.job.tile.tile_size)]
