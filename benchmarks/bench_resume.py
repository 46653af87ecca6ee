"""Resume after a kill: wall and CPU time of the resumed run next to an uninterrupted run.

Run: `.venv/bin/python benchmarks/bench_resume.py [--slide-size 8192] [--slides 4]
[--engine beam|dask|both] [--workers 2] [--kill-at 0.5] [--kill-after-buckets F]`.

1. An uninterrupted `softmix <engine>` run on slide-scale demo slides (timed: T).
2. The same command again into a new directory, killed with SIGKILL (driver and workers,
   like a lost machine) `--kill-at` x T after it started (or, with
   `--kill-after-buckets F`, once a fraction F of its mix buckets are in staging).
   What it had committed (verified sidecars of plans, packs, buckets, shards) is counted.
3. The same command with `--resume` (timed); its shards must equal run 1's byte for byte.

Prints per engine the times (wall, and CPU seconds of the process tree), the ratio
resumed / uninterrupted (target <= 0.6 at a kill at 0.5 T), what the killed run had
committed and what the resumed run reused (`accounting.resumed`).

Slides: `.cache/bench/slides-<size>-<count>`; when only a larger cached set exists, its
first `--slides` slides are used (the cache is never regenerated for a subset).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pipeline import demo_slides  # noqa: E402

STAGING = ".softmix.tmp-staging"


def slide_manifest(size: int, count: int, scratch: pathlib.Path) -> pathlib.Path:
    """The manifest of `count` cached demo slides of `size` px (a subset of a larger
    cached set when that is all there is)."""
    cache = ROOT / ".cache" / "bench"
    own = cache / f"slides-{size}-{count}" / "manifest.csv"
    if own.exists():
        return own
    larger = sorted((p for p in cache.glob(f"slides-{size}-*/manifest.csv")
                     if int(p.parent.name.rsplit("-", 1)[1]) > count),
                    key=lambda p: int(p.parent.name.rsplit("-", 1)[1]))
    if not larger:
        return demo_slides(size, count)
    rows = list(csv.DictReader(larger[0].open()))[:count]
    for row in rows:
        row["path"] = str((larger[0].parent / row["path"]).resolve())
    subset = scratch / "manifest.csv"
    with subset.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return subset


def softmix(*args: str) -> subprocess.Popen:
    """A `softmix` process in its own session (its stderr kept in a temporary file, so
    a chatty run never blocks on a full pipe)."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=log)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def running(proc: subprocess.Popen, *, block: bool = False) -> bool:
    """Whether `proc` still runs; once it ended, `proc.cpu` holds the CPU seconds of it
    and of the children it waited for (`os.wait4`, which `Popen.poll` would lose)."""
    if proc.returncode is not None:
        return False
    pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return True
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.cpu = usage.ru_utime + usage.ru_stime  # type: ignore[attr-defined]
    return False


def timed(*args: str, watch: pathlib.Path | None = None,
          timeline: dict[str, list[float]] | None = None) -> tuple[float, float]:
    """`(wall s, CPU s)` of one whole `softmix` run. With `watch` (its OUT), `timeline`
    gets, per kind of artifact, the seconds after the start when the first and the last
    one was committed in staging."""
    start = time.perf_counter()
    proc = softmix(*args)
    if watch is not None and timeline is not None:
        seen = committed(watch)  # what a resumed run starts from
        while running(proc):
            note(timeline, seen, watch, time.perf_counter() - start)
            time.sleep(0.05)
    running(proc, block=True)
    if proc.returncode != 0:
        proc.log.seek(0)
        raise RuntimeError(proc.log.read().decode()[-2000:])
    return time.perf_counter() - start, proc.cpu


def committed(out: pathlib.Path) -> dict[str, int]:
    """Verified artifacts in `out`'s staging folder: sidecars are written last."""
    staging = out / STAGING
    return {"plans": len(list(staging.glob("plans/*.plan.json"))),
            "packs": len(list(staging.glob("packs/*.json"))),
            "buckets": len(list(staging.glob("buckets/*.tfrecord.json"))),
            "shards": len(list(staging.glob("*.tfrecord.json")))}


def note(timeline: dict[str, list[float]], seen: dict[str, int], out: pathlib.Path,
         now: float) -> None:
    """Record in `timeline` when artifacts beyond `seen` got committed (first, last)."""
    for kind, count in committed(out).items():
        if count > seen.get(kind, 0):
            seen[kind] = count
            timeline.setdefault(kind, [now, now])[1] = now


class FinishedBeforeKill(RuntimeError):
    """The run to kill ended first: the machine got faster since T was measured."""

    def __init__(self, seconds: float):
        super().__init__(f"the run finished before the kill ({seconds:.1f} s)")
        self.seconds = seconds


def killed_run(args: list[str], out: pathlib.Path, *, after_s: float | None,
               buckets: int | None, timeline: dict[str, list[float]]) -> float:
    """Start the run and SIGKILL its whole process group `after_s` seconds in (or once
    `buckets` mix buckets are committed); returns when it was killed."""
    start = time.perf_counter()
    proc = softmix(*args, "--out", str(out))
    done = out / STAGING / "buckets"
    seen: dict[str, int] = {}
    while running(proc):
        elapsed = time.perf_counter() - start
        note(timeline, seen, out, elapsed)
        if after_s is not None and elapsed >= after_s:
            break
        if buckets is not None and len(list(done.glob("*.tfrecord.json"))) >= buckets:
            break
        time.sleep(0.02)
    killed_after = time.perf_counter() - start
    if not running(proc):
        raise FinishedBeforeKill(killed_after)
    os.killpg(proc.pid, signal.SIGKILL)
    running(proc, block=True)
    return killed_after


def bench(engine: str, manifest: pathlib.Path, root: pathlib.Path, args) -> dict:
    common = ["--manifest", str(manifest), "--no-progress", "--workers", str(args.workers)]
    full_out = root / f"{engine}-full"
    timeline: dict[str, list[float]] = {}
    full, full_cpu = timed(engine, *common, "--out", str(full_out), watch=full_out,
                           timeline=timeline)
    result = json.loads((full_out / "manifest.json").read_text())
    shards = len(result["shards"])
    buckets = shards * math.ceil(result["num_examples"] / shards / 128)
    out = root / f"{engine}-resumed"
    killed_timeline: dict[str, list[float]] = {}
    if args.kill_after_buckets is not None:
        killed = killed_run([engine, *common], out, after_s=None, timeline=killed_timeline,
                            buckets=math.ceil(args.kill_after_buckets * buckets))
    else:
        try:
            killed = killed_run([engine, *common], out, after_s=args.kill_at * full,
                                buckets=None, timeline=killed_timeline)
        except FinishedBeforeKill as err:  # the load changed since T: kill at kill_at x this run
            print(f"{engine}: {err}; killing a second run at {args.kill_at} x {err.seconds:.1f} s",
                  flush=True)
            shutil.rmtree(out)
            killed_timeline.clear()
            killed = killed_run([engine, *common], out, after_s=args.kill_at * err.seconds,
                                buckets=None, timeline=killed_timeline)
    kept = committed(out)
    resumed_timeline: dict[str, list[float]] = {}
    resumed, resumed_cpu = timed(engine, *common, "--out", str(out), "--resume", watch=out,
                                 timeline=resumed_timeline)
    for shard in result["shards"]:
        if (full_out / shard["file"]).read_bytes() != (out / shard["file"]).read_bytes():
            raise RuntimeError(f"{engine}: {shard['file']} differs after resume")
    reused = json.loads((out / "manifest.json").read_text())["accounting"]["resumed"]
    return {"engine": engine, "full": full, "full_cpu": full_cpu, "killed": killed,
            "kept": kept, "resumed": resumed, "resumed_cpu": resumed_cpu,
            "reused": reused, "examples": result["num_examples"], "buckets": buckets,
            "shards": shards,
            "timelines": {"uninterrupted": (timeline, full), "killed": (killed_timeline, killed),
                          "resumed (new work only)": (resumed_timeline, resumed)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide-size", type=int, default=8192)
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--engine", default="both", choices=["beam", "dask", "both"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=0.5,
                        help="kill at this fraction of the uninterrupted run's wall time")
    parser.add_argument("--kill-after-buckets", type=float, default=None,
                        help="instead: kill once this fraction of the mix buckets is done")
    args = parser.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="softmix-resume-"))
    engines = ["beam", "dask"] if args.engine == "both" else [args.engine]
    try:
        manifest = slide_manifest(args.slide_size, args.slides, root)
        rows = [bench(engine, manifest, root, args) for engine in engines]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first = rows[0]
    trigger = (f"{args.kill_after_buckets:.0%} of the buckets done"
               if args.kill_after_buckets is not None else f"{args.kill_at:g} T")
    print(f"\n{args.slides} slides of {args.slide_size} px, {args.workers} workers, "
          f"{first['examples']} examples, {first['buckets']} buckets, {first['shards']} "
          f"shards; SIGKILL at {trigger}\n")
    print("| engine | uninterrupted s (CPU s) | killed at s | committed when killed: "
          "plans / packs / buckets / shards | resumed s (CPU s) | resumed / full (CPU) "
          "| reused: plans / strips / buckets / shards |")
    print("|---|---:|---:|---|---:|---:|---|")
    for r in rows:
        k, u = r["kept"], r["reused"]
        print(f"| {r['engine']} | {r['full']:.1f} ({r['full_cpu']:.1f}) | {r['killed']:.1f} "
              f"| {k['plans']} / {k['packs']} / {k['buckets']} / {k['shards']} "
              f"| {r['resumed']:.1f} ({r['resumed_cpu']:.1f}) "
              f"| {r['resumed'] / r['full']:.2f}x ({r['resumed_cpu'] / r['full_cpu']:.2f}x) "
              f"| {u.get('plans', 0)} / {u.get('strips', 0)} / {u.get('buckets', 0)} / "
              f"{u.get('shards', 0)} |")
    print("\nshards of every resumed run byte-identical to its uninterrupted run")
    print("\nwhen each run committed its artifacts (s after its start, first - last):")
    for r in rows:
        for name, (timeline, end) in r["timelines"].items():
            spans = ", ".join(f"{kind} {a:.1f}-{b:.1f}" for kind, (a, b) in timeline.items())
            print(f"- {r['engine']}, {name}: {spans or 'nothing'}; ended {end:.1f}")


if __name__ == "__main__":
    main()
