"""Engine-independent steps of one offline run, shared by the Beam and Dask adapters.

Beam (`beam_transforms`) and Dask (`dask_transforms`) only decide *where* these run;
*what* runs is here and in the pure modules (`_tiling`, `_pairing`, `_mixing`,
`_encoding`, `_sharding`, `_output`).
"""

from __future__ import annotations

import collections
import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._keys import SlidePlan, SlideRecord, TileKey
from .config import JobConfig

__all__ = [
    "exit_status",
    "job_params",
    "make_tile_reader",
    "num_shards_for_job",
    "reconcile_plans",
    "summary_table",
]


def reconcile_plans(plans: Iterable[SlidePlan]) -> tuple[SlidePlan, ...]:
    """Fail the slides whose channel count or dtype differs from the run's majority.

    Tiles of one run are mixed with each other, so they must share `[C]` and dtype.
    The majority (ties broken by the sorted value) wins; the others are reported under
    `slides_failed` with reason ``"incompatible_pixels"`` instead of crashing the mix.

    Returns:
        All plans, sorted by slide id, with incompatible ones turned into failures.
    """
    plans = sorted(plans, key=lambda plan: plan.slide_id)
    kinds = collections.Counter(
        (plan.num_channels, plan.dtype) for plan in plans if plan.failure is None and plan.tiles
    )
    if len(kinds) <= 1:
        return tuple(plans)
    majority = sorted(kinds.items(), key=lambda item: (-item[1], item[0]))[0][0]
    out = []
    for plan in plans:
        kind = (plan.num_channels, plan.dtype)
        if plan.failure is None and plan.tiles and kind != majority:
            plan = SlidePlan(
                slide_id=plan.slide_id,
                failure="incompatible_pixels",
                message=(
                    f"slide {plan.slide_id!r} has {kind[0]} channels of {kind[1]}, but most "
                    f"slides of this run have {majority[0]} channels of {majority[1]}; run "
                    "slides of different channel layouts as separate jobs."
                ),
            )
        out.append(plan)
    return tuple(out)


def make_tile_reader(
    slides: Sequence[SlideRecord], tile_size: int, cache: Any
) -> Callable[[TileKey], np.ndarray]:
    """A `read_tile(key)` function over the run's slides, opened through `cache`."""
    from ._slides import read_tile

    paths = {record.slide_id: record.path for record in slides}

    def read(key: TileKey) -> np.ndarray:
        slide = cache.get(paths[key.slide_id], slide_id=key.slide_id)
        return read_tile(slide, key, tile_size)

    return read


def num_shards_for_job(job: JobConfig, plans: Sequence[SlidePlan]) -> int:
    """Number of shards: `--num-shards`, or the estimate that meets `--shard-size-mb`."""
    if job.output.num_shards is not None:
        return job.output.num_shards
    usable = [plan for plan in plans if plan.failure is None and plan.tiles]
    num_tiles = sum(len(plan.tiles) for plan in usable)
    per_tile = job.mix.num_mixes + int(job.mix.keep_originals)
    if not usable:
        return 1
    itemsize = np.dtype(usable[0].dtype).itemsize
    # Raw size is an upper bound; PNG of tissue typically halves it.
    bytes_per_example = job.tile.tile_size**2 * usable[0].num_channels * itemsize * 0.6
    total_mb = num_tiles * per_tile * bytes_per_example / 2**20
    return max(1, int(np.ceil(total_mb / job.output.shard_size_mb)))


def job_params(job: JobConfig, engine: str, **extra: Any) -> dict[str, Any]:
    """Every option of the run plus software versions, for `manifest.json`'s `params`."""
    import dataclasses

    params: dict[str, Any] = {
        "engine": engine,
        "manifest": job.manifest,
        "class_names": list(job.class_names) if job.class_names else None,
        "tile": dataclasses.asdict(job.tile),
        "mix": dataclasses.asdict(job.mix),
        "output": dataclasses.asdict(job.output),
    }
    params["mix"]["grid"] = list(job.mix.grid)
    params.update(extra)
    params["versions"] = software_versions()
    return params


def software_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("softmix", "tensorflow", "tensorflow-cpu", "apache-beam", "dask",
                 "distributed", "zarr", "numpy", "ome-zarr"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def summary_table(manifest: Mapping[str, Any]) -> str:
    """A short human summary of a finished run (its `manifest.json` content)."""
    acc = manifest["accounting"]
    lines = [
        f"{'examples written':<28}{manifest['num_examples']:>10}",
        f"{'shards':<28}{len(manifest['shards']):>10}",
        f"{'tiles total':<28}{acc['tiles_total']:>10}",
        f"{'tiles used':<28}{acc['tiles_used']:>10}",
    ]
    for reason, count in sorted(acc["tiles_skipped"].items()):
        lines.append(f"{'tiles skipped: ' + reason:<28}{count:>10}")
    for slide_id, reason in sorted(acc["slides_failed"].items()):
        lines.append(f"{'slide failed: ' + slide_id:<28}{reason:>10}")
    hist = acc.get("class_histogram")
    if hist:
        for name, weight in zip(manifest["class_names"], hist):
            lines.append(f"{'label mass: ' + name:<28}{weight:>10.1f}")
    return "\n".join(lines)


def exit_status(manifest: Mapping[str, Any]) -> int:
    """0 when the run finished; with `--on-error skip` failures are counted, not fatal."""
    return 0
