"""CPU time per example, step by step, of the offline job's work (one process).

Run: `.venv/bin/python benchmarks/profile_breakdown.py MANIFEST [--tile-size 256]`.

Runs `softmix local` with one worker (every step in this process, exactly the steps
Beam and Dask run) under cProfile with a *process CPU* timer (`time.process_time`, all
threads: TensorFlow's and the pack reader's included), and splits the CPU seconds into:

    imports       Python, pipeline, TensorFlow imports (before the run)
    plan          planning: tissue mask, tile grid, stain fit (`plan_task`)
    read+decode   reading and decoding the slide chunks a strip needs (`_Band.cover`)
    stain         the stain transform of packed tiles (none without --stain-norm)
    pack write    zstd-encoding tiles and writing the packs (rest of `pack_strip`)
    pack read     reading tiles back from the packs (`PackReader.read_many`)
    mix           the SoftMix op (`mix_examples`)
    encode        PNG + tf.train.Example (`encode_example`)
    write         bucket part files and the staged shards (`write_shard`, `finalize_shard`)
    other         the rest (pairing, layout, publishing, the driver's bookkeeping)

Per example = step CPU seconds / examples written. The steps cost the same in every
engine (they are the same functions); what an engine adds shows up as its processes'
total CPU minus these (see `benchmarks/profile_dask.py` for Dask's side). CPU seconds,
not wall seconds: on a shared machine the wall clock measures the neighbours too.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pathlib
import pstats
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_CPU0 = time.process_time()

# (category, module path suffix, function name); cumulative CPU of each is summed.
STEPS = [
    ("plan", "pipeline/run/tasks.py", "plan_task"),
    ("read+decode", "pipeline/steps/pack.py", "cover"),
    ("stain", "pipeline/steps/stain.py", "__call__"),
    ("pack_strip", "pipeline/steps/pack.py", "pack_strip"),
    ("pack read", "pipeline/steps/pack.py", "read_many"),
    ("mix", "pipeline/steps/mix.py", "mix_examples"),
    ("encode", "pipeline/dataset/schema.py", "encode_example"),
    ("write", "pipeline/dataset/shards.py", "write_shard"),
    ("write", "pipeline/run/tasks.py", "finalize_shard"),
]


def breakdown(stats: pstats.Stats) -> dict[str, float]:
    found: dict[str, float] = {}
    for (path, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():
        for category, suffix, function in STEPS:
            if name == function and path.endswith(suffix):
                found[category] = found.get(category, 0.0) + cumulative
    # pack_strip's own work: what is left after reading and the stain transform.
    found["pack write"] = (found.pop("pack_strip", 0.0) - found.get("read+decode", 0.0)
                           - found.get("stain", 0.0))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("--tile-size", type=int, default=256)
    args = parser.parse_args()

    import tensorflow  # noqa: F401 - counted as start-up, as in every worker

    from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
    from pipeline.engines.local import run_local

    imports = time.process_time() - _CPU0
    out = pathlib.Path(tempfile.mkdtemp(prefix="softmix-breakdown-")) / "out"
    job = JobConfig(manifest=args.manifest, tile=TileConfig(tile_size=args.tile_size),
                    mix=MixConfig(grid=(4, 4)),
                    output=OutputConfig(out_dir=str(out), overwrite=True))
    profiler = cProfile.Profile(time.process_time)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    profiler.enable()
    manifest = run_local(job, workers=1, progress=False)
    profiler.disable()
    run_cpu, run_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    examples = manifest["num_examples"]
    steps = breakdown(pstats.Stats(profiler))
    steps["other"] = run_cpu - sum(steps.values())
    print(f"{examples} examples; run {run_cpu:.2f} CPU s ({run_wall:.2f} s wall, load "
          f"average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs); imports before the "
          f"run {imports:.2f} CPU s\n")
    print("| step | CPU s | ms/example | share |")
    print("|---|---|---|---|")
    print(f"| imports (start-up) | {imports:.2f} | | |")
    order = ["plan", "read+decode", "pack write", "pack read", "stain", "mix", "encode",
             "write", "other"]
    for name in order:
        seconds = steps.get(name, 0.0)
        print(f"| {name} | {seconds:.2f} | {seconds / examples * 1000:.2f} | "
              f"{seconds / run_cpu:.0%} |")
    print(f"| run total | {run_cpu:.2f} | {run_cpu / examples * 1000:.2f} | 100% |")


if __name__ == "__main__":
    main()
