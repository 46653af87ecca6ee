"""The engine-independent steps of one offline run; Beam and Dask only move their data.

    slides --plan_task--> SlidePlan --split_plan--> StripTask --pack_task--> StripResult
      StripResults --build_layout--> RunLayout (small: one entry per slide and strip)
      StripResult + RunLayout --pair_strip--> (bucket, PairSpec)...   [shuffle by bucket]
      bucket + PairSpecs --mix_bucket--> BucketResult (a sorted part file in staging)
      shard + BucketResults --finalize_shard--> ShardInfo (parts concatenated)

Only coordinates travel between steps: pixels go from the slides into the strips'
tile packs (`pack`) and from the packs into the bucket files. Every step is a pure
function of its inputs and the run's seed, so the engine, the worker count and the
grouping of work never change a byte of the output.

Buckets: an example goes to shard ``shard_for(example_id, num_shards)`` and, inside
it, to bucket ``stable_hash(example_id) % buckets_per_shard``, so that a bucket holds
about `examples_per_task` examples. Each bucket's part file is sorted by example id and
a shard is its buckets merged by example id: its bytes depend only on which examples it
holds, never on the bucket size, the engine or the worker count.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import logging
import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..accounting import Accounting
from ..config import JobConfig, MixConfig, OutputConfig, TileConfig
from ..io import storage
from ..records import ExampleSpec, SlidePlan, SlideRecord, TileRecord, stable_hash
from ..steps.pack import StripResult, StripTask, pack_path

__all__ = [
    "BucketResult",
    "RunLayout",
    "SlideLayout",
    "build_layout",
    "finalize_shard",
    "mix_bucket",
    "pack_task",
    "pair_strip",
    "plan_task",
    "prewarm_mixing",
    "strip_accounting",
]

DEFAULT_EXAMPLES_PER_TASK = 128

logger = logging.getLogger(__name__)


_PREWARM: list[Any] = []  # the one background import thread of this process, once started


def prewarm_mixing(*, without_keras: bool = False) -> None:
    """Start importing TensorFlow and the mixing op in a background thread (once per
    process); the first `mix_bucket` then finds them loaded. `without_keras`: only for
    a worker process the engine started itself (`mix.import_mixing_ops`).

    For the workers of a *resumed* run: such a run goes from checks that cost
    metadata reads (kept plans, packs) straight to mixing, so the seconds TensorFlow
    takes to import overlap those checks instead of delaying the first new bucket. And
    for the workers of a cluster `softmix dask` starts itself and the local worker
    processes of `softmix beam --workers N` (every one of them mixes): the import
    overlaps planning or packing. Planning, packing and pairing themselves never import
    TensorFlow.
    """
    if _PREWARM:
        return
    import threading

    def load() -> None:
        try:
            from ..steps.mix import import_mixing_ops

            import_mixing_ops(without_keras=without_keras)
        except Exception:  # noqa: BLE001 - the first bucket imports (and reports) it again
            logger.debug("prewarming TensorFlow failed", exc_info=True)

    thread = threading.Thread(target=load, name="softmix-prewarm", daemon=True)
    _PREWARM.append(thread)
    thread.start()


def plan_task(record: SlideRecord, config: TileConfig, on_error: str,
              class_names: Sequence[str], staging: str | None = None) -> SlidePlan:
    """Tile one slide (opened afresh, so its read counters are this task's).

    With `staging`, the plan is kept there (``plans/<name>.plan`` and its verified
    sidecar, `checkpoint`) and a later attempt (a resumed run, a retried task) reuses
    it instead of reading the slide again, when the plan file verifies and the slide's
    content fingerprint (`pipeline.io.content`: its store's listing and metadata) is
    what it was when the plan was made. A slide changed in place is planned again (and
    so are its strips, and the buckets and shards holding its tiles, whose inputs
    name the fingerprint). Failed plans are not kept: they are retried.
    """
    from ..steps.plan import plan_slide

    if record.duplicate_of is not None:  # fails at once (`plan_slide`): nothing to keep
        return plan_slide(record, config, on_error=on_error, class_names=class_names)
    path = plan_path(staging, record, config, class_names) if staging else None
    content = changed = None
    if path is not None:
        from ..io.content import slide_fingerprint

        content = slide_fingerprint(record.path)
        kept, changed = _load_plan(path, record, content)
        if kept is not None:
            return kept
    plan = plan_slide(record, config, on_error=on_error, class_names=class_names)
    plan = dataclasses.replace(plan, content=content, changed=bool(changed))
    if changed:
        logger.warning("slide %r (%s) changed since the interrupted run made its plan "
                       "(its files' sizes, times or metadata differ): planning it again and "
                       "redoing what was made from it", record.slide_id, record.path)
    if path is not None and plan.failure is None:
        from .checkpoint import write_checked

        write_checked(path, json.dumps(_plan_to_json(plan)).encode(),
                      inputs=_plan_inputs(path, content), records=len(plan.tiles))
    return plan


def plan_path(staging: str, record: SlideRecord, config: TileConfig,
              class_names: Sequence[str] = ()) -> str:
    """Where `plan_task` keeps a slide's plan: named by everything the plan depends on."""
    digest = stable_hash("plan", record, dataclasses.astuple(config), tuple(class_names))
    return posixpath.join(staging, "plans", f"{digest:016x}.plan")


def _plan_inputs(path: str, content: str | None) -> dict[str, Any]:
    return {"plan": posixpath.basename(path), "content": content}


def _plan_to_json(plan: SlidePlan) -> dict[str, Any]:
    return {
        "slide_id": plan.slide_id,
        "level": plan.tiles[0].key.level if plan.tiles else 0,
        "tiles": [[t.key.x, t.key.y, t.soft_label] for t in plan.tiles],
        "skipped": [list(item) for item in plan.skipped],
        "num_channels": plan.num_channels,
        "dtype": plan.dtype,
        "chunk_shape": list(plan.chunk_shape),
        "reads": [plan.chunks_read, plan.bytes_read, plan.requests],
        "stain_fit": plan.stain_fit,
    }


def _load_plan(path: str, record: SlideRecord, content: str | None
               ) -> tuple[SlidePlan | None, bool]:
    """`(the kept plan if it verifies for the slide's current content, changed)`:
    `changed` when a verified plan exists but was made from other slide content."""
    from ..records import TileKey
    from .checkpoint import load_checked

    if content is None:  # the slide cannot be fingerprinted: never reuse
        return None, False
    found = load_checked(path, _plan_inputs(path, content), read=True)
    if found is None:
        other = load_checked(path, _plan_inputs(path, _sidecar_content(path)))
        return None, other is not None
    try:
        data = json.loads(found[1] or b"")
        level = data["level"]
        tiles = tuple(
            TileRecord(TileKey(record.slide_id, level, x, y), label=record.label_index,
                       group=record.group, soft_label=tuple(soft) if soft else None)
            for x, y, soft in data["tiles"])
        chunks_read, bytes_read, requests = data["reads"]
        return SlidePlan(slide_id=record.slide_id, tiles=tiles,
                         skipped=tuple((r, n) for r, n in data["skipped"]),
                         num_channels=data["num_channels"], dtype=data["dtype"],
                         chunk_shape=tuple(data["chunk_shape"]), chunks_read=chunks_read,
                         bytes_read=bytes_read, requests=requests, reused=True,
                         stain_fit=data.get("stain_fit"), content=content), False
    except (ValueError, KeyError, TypeError):
        return None, False


def _sidecar_content(path: str) -> str | None:
    """The content fingerprint a kept plan's sidecar records (None if unreadable)."""
    from .checkpoint import sidecar_path

    try:
        return storage.read_json(sidecar_path(path))["inputs"]["content"]
    except (ValueError, KeyError, TypeError, OSError):
        return None


def majority_kind(kinds: Iterable[tuple[int, str]]) -> tuple[int, str] | None:
    """The most common (channels, dtype) of the usable slides (ties: smallest value)."""
    counts = collections.Counter(kinds)
    if not counts:
        return None
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[0][0]


def plan_kind(plan: SlidePlan) -> list[tuple[int, str]]:
    """`[(channels, dtype)]` of a usable plan, `[]` otherwise (for `majority_kind`)."""
    return [(plan.num_channels, plan.dtype)] if plan.failure is None and plan.tiles else []


def reconcile_plan(plan: SlidePlan, majority: tuple[int, str] | None) -> SlidePlan:
    """Fail a slide whose channel count or dtype differs from the run's majority.

    Tiles of one run are mixed with each other, so they must share `[C]` and dtype;
    the others are reported under `slides_failed: incompatible_pixels`.
    """
    kind = (plan.num_channels, plan.dtype)
    if plan.failure is not None or not plan.tiles or majority is None or kind == majority:
        return plan
    return dataclasses.replace(
        plan, tiles=(), failure="incompatible_pixels",
        skipped=plan.skipped + (("incompatible_pixels", len(plan.tiles)),),
        message=(f"slide {plan.slide_id!r} has {kind[0]} channels of {kind[1]}, but most "
                 f"slides of this run have {majority[0]} channels of {majority[1]}; run "
                 "slides of different channel layouts as separate jobs."))


def pack_task(task: StripTask, staging: str, read_cache_mb: float, on_error: str = "skip",
              transform: Any = None, codec: str = "zstd") -> StripResult:
    """Pack one strip (see `pack.pack_strip`)."""
    from ..steps.pack import pack_strip

    with storage.counting() as sent:
        result = pack_strip(task, staging, read_cache_mb=read_cache_mb, transform=transform,
                            on_error=on_error, codec=codec)
    return dataclasses.replace(result, output_requests=sent["requests"],
                               bytes_written=sent["bytes_written"])


def strip_accounting(result: StripResult) -> Accounting:
    """The strip's unusable tiles (resolved) and its reads."""
    skipped = dict(result.skipped)
    return Accounting(tiles_skipped=skipped, tiles_pending=-sum(skipped.values()),
                      chunks_read=result.chunks_read, bytes_read=result.bytes_read,
                      bytes_needed=result.bytes_needed, requests=result.requests,
                      pack_bytes=result.pack_bytes, resumed={"strips": int(result.reused)},
                      output_requests=result.output_requests,
                      bytes_written=result.bytes_written)


@dataclasses.dataclass(frozen=True)
class SlideLayout:
    """Where a slide's planned tiles are: strips in order, their prefix sums and the
    strip-local indices of the tiles packing found unusable (`StripResult.failed`)."""

    slide_id: str
    label: int
    group: str | None
    strips: tuple[int, ...]
    offsets: tuple[int, ...]  # len(strips) + 1; offsets[-1] = planned tiles
    content: str | None = None  # the slide's content fingerprint (`SlidePlan.content`)
    failed: tuple[tuple[int, ...], ...] = ()  # per strip (empty: none failed)

    @property
    def num_tiles(self) -> int:
        return self.offsets[-1]

    @property
    def num_usable(self) -> int:
        return self.offsets[-1] - sum(len(f) for f in self.failed)

    def position(self, index: int) -> tuple[int, int, tuple[int, ...]]:
        """`(strip, strip-local index, that strip's failed indices)` of planned tile `index`."""
        pos = bisect.bisect_right(self.offsets, index) - 1
        return (self.strips[pos], index - self.offsets[pos],
                self.failed[pos] if self.failed else ())


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Everything the pairing and mixing steps need to know about the whole run.

    One entry per slide (and strip), never per tile: it travels as a side input.
    """

    slides: Mapping[str, SlideLayout]
    staging: str
    num_shards: int
    buckets_per_shard: int

    def locate(self, slide_id: str, index: int) -> tuple[str, int]:
        """`(pack, index in pack)` of planned tile `index` of `slide_id` (a usable one:
        the pack holds only those)."""
        strip, local, failed = self.slides[slide_id].position(index)
        return (pack_path(self.staging, slide_id, strip),
                local - bisect.bisect_left(failed, local))

    def usable(self, slide_id: str, index: int) -> bool:
        """Whether planned tile `index` of `slide_id` was packed (can be a partner)."""
        _, local, failed = self.slides[slide_id].position(index)
        pos = bisect.bisect_left(failed, local)
        return pos == len(failed) or failed[pos] != local

    def strip_offset(self, slide_id: str, strip: int) -> int:
        layout = self.slides[slide_id]
        return layout.offsets[layout.strips.index(strip)]

    def bucket_of(self, example_id: str) -> tuple[int, int]:
        from ..dataset.shards import shard_for

        return (shard_for(example_id, self.num_shards),
                stable_hash("softmix.bucket", example_id) % self.buckets_per_shard)

    def counts(self) -> list[Any]:
        from ..steps.pair import SlideCounts

        return [SlideCounts(s.slide_id, s.label, s.group, s.num_tiles)
                for s in sorted(self.slides.values(), key=lambda s: s.slide_id)]


def build_layout(strips: Iterable[tuple[Any, ...]], records: Sequence[SlideRecord],
                 job: JobConfig, staging: str, *, tile_bytes: float,
                 examples_per_task: int | None = None) -> RunLayout:
    """The run's layout from `(slide_id, strip, planned tiles)` of every strip.

    Args:
        strips: ``(slide_id, strip, planned tiles[, content fingerprint[, failed]])``
            per strip (`run.strip_size`); `failed`: the strip-local indices of the
            tiles packing found unusable (`StripResult.failed`), unknown (empty) when
            the layout is made from plans alone (the stream's).
        records: the manifest's slides (labels, groups).
        job: the run's configuration (sharding, mixing).
        staging: the run's staging directory.
        tile_bytes: approximate encoded bytes of one example (sizes the shards).
        examples_per_task: examples per bucket; default `DEFAULT_EXAMPLES_PER_TASK`.
    """
    from ..dataset.shards import num_shards_for

    by_slide: dict[str, list[tuple[int, int, tuple[int, ...]]]] = collections.defaultdict(list)
    contents: dict[str, str | None] = {}
    for slide_id, strip, count, *rest in strips:
        if count > 0:
            failed = tuple(sorted(rest[1])) if len(rest) > 1 else ()
            by_slide[slide_id].append((strip, count, failed))
            contents[slide_id] = rest[0] if rest else None
    records_by_id = {r.slide_id: r for r in records}
    slides = {}
    for slide_id, items in sorted(by_slide.items()):
        items.sort()
        offsets = [0]
        for _, count, _ in items:
            offsets.append(offsets[-1] + count)
        record = records_by_id[slide_id]
        failed_per_strip = tuple(f for _, _, f in items)
        slides[slide_id] = SlideLayout(slide_id, record.label_index, record.group,
                                       tuple(s for s, _, _ in items), tuple(offsets),
                                       contents.get(slide_id),
                                       failed_per_strip if any(failed_per_strip) else ())
    usable = sum(s.num_usable for s in slides.values())
    num_examples = usable * (job.mix.num_mixes + int(job.mix.keep_originals))
    if job.output.num_shards is not None:
        num_shards = job.output.num_shards
    else:
        num_shards = num_shards_for(max(num_examples, 1), tile_bytes, job.output.shard_size_mb)
    per_task = examples_per_task or DEFAULT_EXAMPLES_PER_TASK
    buckets = max(1, math.ceil(num_examples / num_shards / per_task))
    return RunLayout(slides, staging, num_shards, buckets)


def pair_strip(result: StripResult, layout: RunLayout, table: Any
               ) -> tuple[list[tuple[tuple[int, int], Any]], Accounting]:
    """The examples whose source `a` is a tile of this strip, keyed by bucket.

    Pairing counts planned tiles; a partner drawn at a tile packing found unusable is
    drawn again (`steps.pair`, "Tiles that fail when packed"; `layout.usable`).

    Returns:
        `([(bucket, PairSpec)], Accounting)`: the accounting resolves each usable tile
        of the strip as used, or skipped with reason ``no_partner`` or
        ``partner_failed`` (see `pair_anchors`).
    """
    specs, accounting = pair_anchors(usable_anchors(result), result.slide_id,
                                     layout.strip_offset(result.slide_id, result.strip)
                                     if result.tiles else 0, table, layout.usable)
    return [(layout.bucket_of(spec.example_id), spec) for spec in specs], accounting


def usable_anchors(result: StripResult) -> list[tuple[int, TileRecord]]:
    """`(strip-local planned index, tile)` of the strip's usable tiles."""
    failed = set(result.failed)
    return list(zip((i for i in range(result.planned) if i not in failed), result.tiles,
                    strict=False))


def pair_anchors(anchors: Iterable[tuple[int, TileRecord]], slide_id: str, offset: int,
                 table: Any, usable: Any) -> tuple[list[Any], Accounting]:
    """The examples of usable tiles `(strip-local index, tile)` of one strip of
    `slide_id` whose first planned tile is the slide's tile `offset`, and their
    accounting: a tile with an example is used; without, it is skipped as
    ``partner_failed`` when a mix was dropped for want of a usable partner, else as
    ``no_partner``; dropped mixes count in ``examples_dropped: partner_failed``.

    The offline job and the stream both pair through here (`usable`: which planned
    tiles packing kept, ``usable(slide_id, index)``).
    """
    from ..accounting import NO_PARTNER, PARTNER_FAILED

    out = []
    used = dropped = 0
    skipped: collections.Counter[str] = collections.Counter()
    for local, tile in anchors:
        specs, lost = table.pair(tile, offset + local, usable)
        dropped += lost
        if specs:
            used += 1
        else:
            skipped[PARTNER_FAILED if lost else NO_PARTNER] += 1
        out.extend(specs)
    accounting = Accounting(tiles_used=used, tiles_pending=-(used + sum(skipped.values())),
                            tiles_skipped=dict(skipped),
                            examples_dropped={PARTNER_FAILED: dropped} if dropped else {})
    return out, accounting


@dataclasses.dataclass(frozen=True)
class BucketResult:
    """A mixed bucket: its part file in staging and what it holds."""

    shard: int
    bucket: int
    path: str
    accounting: Accounting
    reused: bool = False
    crc32: int | None = None


def bucket_path(staging: str, shard: int, bucket: int) -> str:
    return posixpath.join(staging, "buckets", f"shard-{shard:05d}-bucket-{bucket:05d}.tfrecord")


def mix_bucket(bucket: tuple[int, int], specs: Iterable[Any], layout: RunLayout,
               config: MixConfig, num_classes: int, *, progress_dir: str | None = None
               ) -> BucketResult:
    """Read a bucket's tiles from the packs, mix, encode and write its part file."""
    with storage.counting() as sent:
        result = _mix_bucket(bucket, specs, layout, config, num_classes,
                             progress_dir=progress_dir)
    counted = Accounting(output_requests=sent["requests"],
                         bytes_written=sent["bytes_written"])
    return dataclasses.replace(result, accounting=result.accounting + counted)


def _mix_bucket(bucket: tuple[int, int], specs: Iterable[Any], layout: RunLayout,
                config: MixConfig, num_classes: int, *, progress_dir: str | None = None
                ) -> BucketResult:
    from ..dataset.schema import encode_example
    from ..dataset.shards import write_shard
    from ..steps.mix import configure_tensorflow, mix_examples
    from ..steps.pack import PackReader
    from .checkpoint import load_checked, write_sidecar
    from .job import report_progress

    specs = sorted(specs)
    path = bucket_path(layout.staging, *bucket)
    inputs = _bucket_inputs(specs, layout)
    kept = None if inputs is None else load_checked(path, inputs)
    if kept is not None:
        sidecar = kept[0]
        return BucketResult(bucket[0], bucket[1], path,
                            Accounting(class_mass=tuple(sidecar["class_mass"]),
                                       examples_written=sidecar["records"],
                                       resumed={"buckets": 1}),
                            reused=True, crc32=sidecar["crc32"])
    configure_tensorflow()
    reader = PackReader()
    locations: dict[Any, tuple[str, int]] = {}
    resolved = []
    for spec in specs:
        a_loc = layout.locate(spec.a.key.slide_id, spec.a_index)
        locations[spec.a.key] = a_loc
        if spec.is_original:
            b = spec.a
        else:
            b_loc = layout.locate(spec.b_slide, spec.b_index)
            slide = layout.slides[spec.b_slide]
            b = reader.record(*b_loc, slide.label, slide.group)
            locations[b.key] = b_loc
        resolved.append(ExampleSpec(spec.example_id, spec.a, b, spec.mix_index, spec.seed))
    keys = sorted(locations)
    pixels = dict(zip(keys, reader.read_many([locations[k] for k in keys]), strict=True))
    results = mix_examples(resolved, pixels.__getitem__, config, num_classes)
    records = [(r.spec.example_id, encode_example(r)) for r in results]
    written = write_shard(path, records)  # size and CRC computed while writing
    report_progress(progress_dir, len(results))
    accounting = Accounting.from_written(results)
    size, crc = written.num_bytes, written.crc32  # computed while writing
    write_sidecar(path, inputs=inputs, records=len(results), size=size, crc32=crc,
                  class_mass=list(accounting.class_mass),
                  ids=sorted(r.spec.example_id for r in results))
    return BucketResult(bucket[0], bucket[1], path, accounting, crc32=crc)


def _bucket_inputs(specs: Sequence[Any], layout: RunLayout) -> dict[str, Any] | None:
    """What a bucket is made from: its pair specs (ids, seeds, sources, partners) and
    the content fingerprints of the slides its tiles come from (None: unverifiable)."""
    slides = sorted({s.a.key.slide_id for s in specs} | {s.b_slide for s in specs
                                                          if not s.is_original})
    contents = {sid: layout.slides[sid].content for sid in slides}
    if any(c is None for c in contents.values()):
        return None
    return {"specs": f"{stable_hash('bucket', specs):016x}", "content": contents}


def finalize_shard(shard: int, buckets: Iterable[BucketResult], num_shards: int,
                   config: OutputConfig) -> Any:
    """Merge a shard's bucket files into the staged shard, sorted by example id.

    The shard's bytes depend only on which examples it holds, never on how they
    were bucketed (`examples_per_task`) or which engine mixed them.
    """
    with storage.counting() as sent:
        info = _finalize_shard(shard, buckets, num_shards, config)
    return dataclasses.replace(info, requests=sent["requests"],
                               bytes_written=sent["bytes_written"])


def _finalize_shard(shard: int, buckets: Iterable[BucketResult], num_shards: int,
                    config: OutputConfig) -> Any:
    from ..dataset.shards import ShardInfo, first_image, merge_shards, shard_filename
    from .checkpoint import load_checked, write_sidecar
    from .job import staging_dir

    storage.ensure(config.storage_options)
    parts = []
    for bucket in sorted(buckets, key=lambda b: b.bucket):
        side = storage.read_json(bucket.path + ".json")
        parts.append((bucket.path, side["ids"], side["crc32"]))
    name = shard_filename(config.name, shard, num_shards)
    path = posixpath.join(staging_dir(config), name)
    ids = sorted(i for _, part_ids, _ in parts for i in part_ids)
    # The shard is made from exactly these bucket files: their CRCs name their bytes.
    inputs = {"ids": f"{stable_hash('shard', ids, config.compression):016x}",
              "buckets": [crc for _, _, crc in parts]}
    kept = load_checked(path, inputs)
    if kept is not None:
        info = ShardInfo(name, kept[0]["records"], kept[0]["size"], reused=True)
    else:
        info = merge_shards(path, [(p, i) for p, i, _ in parts],
                            compression=config.compression)
        # size and CRC computed while writing (no read-back)
        write_sidecar(path, inputs=inputs, records=info.num_examples, size=info.num_bytes,
                      crc32=info.crc32)
    # Read here, where the mix already imported TensorFlow: the driver that writes the
    # manifest then never imports it (seconds of start-up in a Beam or Dask driver).
    image = first_image(path, config.compression) if info.num_examples else None
    return dataclasses.replace(info, image=image)


def example_bytes(num_channels: int, dtype: str, tile_size: int) -> float:
    """Approximate encoded size of one example (PNG of tissue takes ~60% of raw)."""
    return tile_size**2 * num_channels * np.dtype(dtype).itemsize * 0.6
