"""Resume after a kill: wall time of the resumed run next to an uninterrupted run.

Run: `.venv/bin/python benchmarks/bench_resume.py [--slide-size 8192] [--slides 4]
[--engine beam] [--workers 2] [--kill-at 0.5]`.

1. An uninterrupted `softmix <engine>` run on slide-scale demo slides (timed).
2. The same command again into a new directory, killed with SIGKILL (driver and workers)
   once `--kill-at` of its mix buckets are finished in staging.
3. The same command with `--resume` (timed); its shards must equal run 1's byte for byte.
Prints the times, the ratio resumed / full (target <= 0.6 at a kill at 50%) and what the
resumed run reused (`accounting.resumed`).
"""

from __future__ import annotations

import argparse
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


def softmix(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def timed(*args: str) -> float:
    start = time.perf_counter()
    proc = softmix(*args)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-2000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide-size", type=int, default=8192)
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--engine", default="beam", choices=["beam", "dask"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-at", type=float, default=0.5)
    args = parser.parse_args()
    manifest = demo_slides(args.slide_size, args.slides)
    root = pathlib.Path(tempfile.mkdtemp(prefix="softmix-resume-"))
    common = ["--manifest", str(manifest), "--no-progress", "--workers", str(args.workers)]
    try:
        full_out = root / "full"
        full = timed(args.engine, *common, "--out", str(full_out))
        result = json.loads((full_out / "manifest.json").read_text())
        shards = len(result["shards"])
        buckets = shards * math.ceil(result["num_examples"] / shards / 128)
        out = root / "resumed"
        staging = out / ".softmix.tmp-staging" / "buckets"
        proc = softmix(args.engine, *common, "--out", str(out))
        start = time.perf_counter()
        while proc.poll() is None:
            if len(list(staging.glob("*.json"))) >= args.kill_at * buckets:
                break
            time.sleep(0.05)
        killed_after = time.perf_counter() - start
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done = len(list(staging.glob("*.json")))
        resumed = timed(args.engine, *common, "--out", str(out), "--resume")
        for shard in result["shards"]:
            same = (full_out / shard["file"]).read_bytes() == (out / shard["file"]).read_bytes()
            if not same:
                raise RuntimeError(f"{shard['file']} differs after resume")
        reused = json.loads((out / "manifest.json").read_text())["accounting"]["resumed"]
        print(f"\n{args.slides} slides of {args.slide_size} px, {args.engine} x{args.workers}, "
              f"{result['num_examples']} examples, {buckets} buckets\n")
        print("| run | wall s | vs full |")
        print("|---|---:|---:|")
        print(f"| uninterrupted | {full:.1f} | 1.00x |")
        print(f"| killed after {done}/{buckets} buckets | {killed_after:.1f} | |")
        print(f"| resumed | {resumed:.1f} | {resumed / full:.2f}x |")
        print(f"\nreused: {reused}; shards byte-identical to the uninterrupted run")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
