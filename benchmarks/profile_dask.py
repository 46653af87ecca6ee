"""Where `softmix dask`'s time goes: a profile of one run, not a guess.

Run: `.venv/bin/python benchmarks/profile_dask.py MANIFEST [--workers 2] [--cprofile FILE]`
(e.g. the manifest of `benchmarks/bench_pipeline.py`'s cached demo slides).

Reports, for one run of `run_dask` on a fresh LocalCluster:

- the fixed cost: interpreter + pipeline imports in the driver, cluster start (until
  every worker answers), and the workers' own CPU seconds before the first task;
- the task stream grouped by task prefix (plan, pack, pair, shuffle, mix, finalize):
  task count, summed compute seconds, summed transfer/serialisation seconds;
- with `--idle SECONDS`, the idle cluster's CPU per second (Dask's own housekeeping);
- every process's CPU seconds (driver, scheduler thread included, each worker) and
  whether TensorFlow was imported in each worker, and after which phase;
- with `--cprofile`, the driver's cProfile (sorted by cumulative time).

CPU seconds, not only wall seconds: on a shared machine the wall clock measures the
neighbours as much as the run.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pathlib
import pstats
import resource
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
START = time.perf_counter()
START_CPU = time.process_time()


def _worker_state() -> dict:
    import resource as _resource
    import sys as _sys

    usage = _resource.getrusage(_resource.RUSAGE_SELF)
    return {"cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024,
            "tensorflow": "tensorflow" in _sys.modules,
            "modules": len(_sys.modules)}


def _prefix(key: object) -> str:
    from dask.utils import key_split

    return key_split(key)


def idle_table(tasks: list[dict], start: float, stop: float) -> None:
    """Per worker: seconds with no task computing, and the longest such gaps (before
    which task prefix): a scheduling gap, unlike a slow task, does not depend on
    how busy the machine is."""
    spans: dict[str, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for task in tasks:
        for part in task["startstops"]:
            if part["action"] == "compute":
                spans[task["worker"]].append((part["start"], part["stop"],
                                              _prefix(task["key"])))
    print("\n| worker | busy s | idle s (job start to end) | longest idle gaps "
          "(s, before) |")
    print("|---|---|---|---|")
    for worker, items in sorted(spans.items()):
        items.sort()
        busy, cursor, gaps = 0.0, start, []
        for begin, end, prefix in items:
            if begin > cursor:
                gaps.append((begin - cursor, prefix))
            busy += max(0.0, end - max(begin, cursor))
            cursor = max(cursor, end)
        gaps.append((stop - cursor, "end"))
        worst = ", ".join(f"{g:.1f} {p}" for g, p in sorted(gaps, reverse=True)[:5])
        print(f"| {worker} | {busy:.1f} | {stop - start - busy:.1f} | {worst} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--cprofile", default=None, help="write the driver's profile here")
    parser.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                        help="first measure the idle cluster's CPU for SECONDS (Dask's "
                        "housekeeping: loop ticks, memory and system monitors, heartbeats)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    from distributed import Client

    from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
    from pipeline.engines.dask import run_dask, start_local_cluster
    imports = time.perf_counter() - t0
    driver_tf_after_import = "tensorflow" in sys.modules

    out = pathlib.Path(tempfile.mkdtemp(prefix="softmix-prof-")) / "out"
    job = JobConfig(manifest=args.manifest, tile=TileConfig(tile_size=args.tile_size),
                    mix=MixConfig(grid=(4, 4)),
                    output=OutputConfig(out_dir=str(out), overwrite=True))
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    cluster = start_local_cluster(args.workers)
    client = Client(cluster)
    client.wait_for_workers(args.workers)
    cluster_wall = time.perf_counter() - t0
    cluster_cpu = time.process_time() - cpu0
    at_start = client.run(_worker_state)
    if args.idle > 0:
        cpu0 = time.process_time()
        time.sleep(args.idle)
        idle_cpu = time.process_time() - cpu0
        after = client.run(_worker_state)
        per_worker = ", ".join(f"{(after[a]['cpu'] - at_start[a]['cpu']) / args.idle * 1000:.1f}"
                               for a in sorted(after))
        print(f"idle cluster, CPU ms per second: driver (scheduler, nannies, client) "
              f"{idle_cpu / args.idle * 1000:.1f}; workers {per_worker}")
        at_start = after

    profiler = cProfile.Profile() if args.cprofile else None
    from distributed import get_task_stream

    t0 = time.perf_counter()
    job_start = time.time()
    cpu0 = time.process_time()
    with get_task_stream(client) as stream:
        if profiler:
            profiler.enable()
        manifest = run_dask(job, client=client, progress=False)
        if profiler:
            profiler.disable()
    job_wall = time.perf_counter() - t0
    job_stop = time.time()
    job_cpu = time.process_time() - cpu0
    at_end = client.run(_worker_state)
    client.close()
    cluster.close()

    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for task in stream.data:
        prefix = _prefix(task["key"])
        entry = groups[prefix]
        entry[0] += 1
        for part in task["startstops"]:
            seconds = part["stop"] - part["start"]
            if part["action"] == "compute":
                entry[1] += seconds
            else:
                entry[2] += seconds
    examples = manifest["num_examples"]
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(f"examples: {examples}; workers: {args.workers}; load average: "
          f"{os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs")
    print(f"driver imports (pipeline + distributed): {imports:.2f} s wall; "
          f"TensorFlow imported by them: {driver_tf_after_import}")
    print(f"cluster start until {args.workers} worker(s) answer: {cluster_wall:.2f} s wall, "
          f"{cluster_cpu:.2f} s driver CPU")
    for address, state in sorted(at_start.items()):
        print(f"  worker {address} at start: {state['cpu']:.2f} CPU s, "
              f"{state['rss_mib']:.0f} MiB, tensorflow={state['tensorflow']}, "
              f"{state['modules']} modules")
    print(f"job: {job_wall:.2f} s wall, {job_cpu:.2f} s driver CPU "
          f"(driver process total {own.ru_utime + own.ru_stime:.2f} CPU s, includes the "
          "scheduler's thread)")
    for address, state in sorted(at_end.items()):
        used = state["cpu"] - at_start[address]["cpu"]
        print(f"  worker {address}: {used:.2f} CPU s in the job "
              f"({used / max(1, examples) * 1000:.2f} ms/example), peak "
              f"{state['rss_mib']:.0f} MiB, tensorflow={state['tensorflow']}")
    print("\n| task prefix | tasks | compute s | transfer/other s | compute ms/task |")
    print("|---|---|---|---|---|")
    for prefix, (count, compute, other) in sorted(groups.items(), key=lambda g: -g[1][1]):
        print(f"| {prefix} | {count} | {compute:.2f} | {other:.2f} | "
              f"{compute / max(1, count) * 1000:.1f} |")
    total = sum(g[1] for g in groups.values())
    print(f"| all | {sum(g[0] for g in groups.values())} | {total:.2f} | "
          f"{sum(g[2] for g in groups.values()):.2f} | |")
    idle_table(stream.data, job_start, job_stop)
    print(f"\nprocess wall since start: {time.perf_counter() - START:.2f} s")
    if profiler:
        profiler.dump_stats(args.cprofile)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
