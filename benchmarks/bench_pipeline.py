"""The offline job at slide scale: Beam and Dask next to the no-framework floor, one run.

Run: `.venv/bin/python benchmarks/bench_pipeline.py --slide-size 8192 --slides 4
[--latency-ms 20] [--engines local,beam,dask] [--workers 1,2] [--memory]
[--store local|s3|gcs]`.

Slides come from `softmix demo-data --size N` (real H&E texture, OME-Zarr v0.5,
1024-px chunks above 4096 px) and are cached under `.cache/bench/`. Every engine runs
the same job (tile 256, grid 4, one mix per tile) and writes the same examples. The
floor is the local engine (`softmix local`, `pipeline.engines.local`): the very same
run (`pipeline.run`: plan, pack chunk by chunk, pair, mix, PNG-encode, write, publish)
with no framework at all, in process for one worker, else a plain process pool of the
same size. `--latency-ms` serves the slides through the `latency://` test filesystem
(`pipeline.remote`), which adds that delay to every request, like a bucket.
`--store s3|gcs` starts a real S3 (moto) or GCS (fake-gcs-server) API server on
127.0.0.1 (`pipeline.tools.servers`), uploads the slides to a bucket and runs from
bucket to bucket (slides, staging and output all on the server); with S3 the server
counts every request it answers (HEAD included) and the bytes each way, by kind:
slides (input), staging (tile packs, buckets, sidecars) and output (shards, manifest).

Each run is a fresh process, like a user's command: examples/s counts its wall clock,
Python and TensorFlow start-up included; `CPU s` is the CPU time of the run's whole
process tree (driver, scheduler, workers: `RUSAGE_CHILDREN`), the honest figure on a
shared machine. The *start-up* rows run each engine on two 1024-px slides (a few dozen
examples): the fixed cost of a run (imports in every process, runner or cluster start,
planning, publishing). `--breakdown` adds the CPU time per example of each step
(`benchmarks/profile_breakdown.py`, one process). Reported per run: examples/s, the accounting's
`chunks_read`, `bytes_read`, `read_amplification`, slide-store requests per example,
the tile-pack ("shuffle") bytes, and the peak RSS of the busiest process of the run
(driver and workers polled every 0.1 s). `--memory` compares the peak with 4 vs 16
slides (Dask, 2 workers).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parents[1]


class PeakRss:
    """Poll the RSS of this process and all its descendants; keep the largest single one."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak = 0

    def _poll(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(self.interval):
            for proc in [me, *me.children(recursive=True)]:
                try:
                    self.peak = max(self.peak, proc.memory_info().rss)
                except psutil.Error:
                    continue

    def __enter__(self) -> PeakRss:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def demo_slides(size: int, count: int) -> pathlib.Path:
    """`softmix demo-data` slides of `size` px (cached); returns the manifest path."""
    directory = ROOT / ".cache" / "bench" / f"slides-{size}-{count}"
    manifest = directory / "manifest.csv"
    if not manifest.exists():
        subprocess.run([sys.executable, "-m", "pipeline", "demo-data", str(directory),
                        "--num-slides", str(count), "--size", str(size), "--overwrite"],
                       check=True, cwd=ROOT)
    return manifest


def with_latency(manifest: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A copy of `manifest` whose slide paths go through the `latency://` filesystem."""
    rows = list(csv.DictReader(manifest.open()))
    for row in rows:
        path = pathlib.Path(row["path"])
        if not path.is_absolute():
            path = (manifest.parent / path).resolve()
        row["path"] = f"latency://{path}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def make_job(manifest: pathlib.Path | str, out: pathlib.Path | str, tile_size: int):
    from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig

    return JobConfig(manifest=str(manifest), tile=TileConfig(tile_size=tile_size),
                     mix=MixConfig(grid=(4, 4)),
                     output=OutputConfig(out_dir=str(out), overwrite=True))


def upload_slides(manifest: pathlib.Path, server, protocol: str) -> str:  # noqa: ANN001
    """Copy the slides and manifest to bucket ``softmix-bench``; the manifest's URL."""
    from pipeline.io import storage

    storage.configure({protocol: server.options})
    fs, _ = storage.filesystem(f"{protocol}://softmix-bench")
    fs.mkdir("softmix-bench")
    fs.put(str(manifest.parent), "softmix-bench/slides", recursive=True)
    return f"{protocol}://softmix-bench/slides/{manifest.name}"


def run_engine(engine: str, job, workers: int) -> dict:
    if engine == "local":
        from pipeline.engines.local import run_local

        return run_local(job, workers=workers, progress=False)
    if engine == "beam":
        from pipeline.engines.beam import run_beam

        return run_beam(job, workers=workers, progress=False)
    from pipeline.engines.dask import run_dask

    return run_dask(job, workers=workers, progress=False)


def measure(engine: str, job, workers: int, server=None) -> dict:  # noqa: ANN001
    """Run one engine in a fresh process (imports and start-up included, as a user's
    command would) and poll the peak RSS of its process tree; with an S3 `server`, the
    requests it answered during the run."""
    import json

    if server is not None and server.kind == "s3":
        server.reset_requests()
    command = [sys.executable, __file__, "--run-one", engine, str(workers), job.manifest,
               job.output.out_dir, str(job.tile.tile_size)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with PeakRss() as rss:
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"{engine} x{workers} failed: {done.stderr[-3000:]}")
    manifest = json.loads(done.stdout.strip().splitlines()[-1])
    acc = manifest["accounting"]
    examples = manifest["num_examples"]
    seen = server.requests() if server is not None and server.kind == "s3" else {}
    return {
        "server": seen,
        "engine": engine, "workers": workers, "examples": examples, "seconds": seconds,
        "rate": examples / seconds, "cpu": cpu, "chunks_read": acc["chunks_read"],
        "bytes_read": acc["bytes_read"], "amplification": acc["read_amplification"],
        "requests_per_example": acc.get("store_requests", 0) / max(1, examples),
        "pack_bytes": acc.get("pack_bytes"), "peak_rss": rss.peak,
    }


def server_table(rows: list[dict]) -> None:
    """Requests and bytes per example that the S3 server saw, by kind."""
    print("\n| engine | workers | requests/example (all) | slides: requests/example "
          "| slides: HEAD | staging: GET / PUT per example | output: requests "
          "| MB read/example | MB written/example |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        seen, n = r["server"], max(1, r["examples"])
        if not seen:
            continue
        total = sum(v for k, v in seen.items() if ":" not in k)
        inputs = sum(v for k, v in seen.items() if k.startswith("input:")
                     and not k.endswith(("bytes_read", "bytes_written")))
        output = sum(v for k, v in seen.items() if k.startswith("output:")
                     and not k.endswith(("bytes_read", "bytes_written")))
        read = sum(v for k, v in seen.items() if k.endswith(":bytes_read"))
        written = sum(v for k, v in seen.items() if k.endswith(":bytes_written"))
        print(f"| {r['engine']} | {r['workers']} | {total / n:.2f} | {inputs / n:.3f} "
              f"| {seen.get('input:HEAD', 0)} | {seen.get('staging:GET', 0) / n:.2f} / "
              f"{seen.get('staging:PUT', 0) / n:.2f} | {output} | {read / n / 1e6:.3f} "
              f"| {written / n / 1e6:.3f} |")


def run_one(engine: str, workers: int, manifest: str, out: str, tile_size: int) -> None:
    """`--run-one`: run one engine here and print its manifest's counts as JSON."""
    import json

    job = make_job(manifest, out, tile_size)
    result = run_engine(engine, job, workers)
    print(json.dumps({"num_examples": result["num_examples"],
                      "accounting": result["accounting"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide-size", type=int, default=8192)
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="per-request latency of the simulated bucket (0: local disk)")
    parser.add_argument("--engines", default="local,beam,dask")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--memory", action="store_true",
                        help="also compare peak RSS with 4 vs 16 slides (Dask, 2 workers)")
    parser.add_argument("--manifest", default=None,
                        help="use these slides instead of `softmix demo-data` ones")
    parser.add_argument("--breakdown", action="store_true",
                        help="also print the CPU time per example of each step")
    parser.add_argument("--no-startup", action="store_true",
                        help="skip the start-up rows (each engine on two 1024-px slides)")
    parser.add_argument("--store", choices=["local", "s3", "gcs"], default="local",
                        help="where slides, staging and output live: local disk, or a "
                        "bucket on an S3 (moto) / GCS (fake-gcs-server) API server "
                        "started here")
    parser.add_argument("--run-one", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        engine, workers, manifest_path, out, tile = args.run_one
        run_one(engine, int(workers), manifest_path, out, int(tile))
        return
    if args.manifest:
        manifest = pathlib.Path(args.manifest)
    else:
        manifest = demo_slides(args.slide_size, args.slides)
    root = pathlib.Path(tempfile.mkdtemp(prefix="softmix-bench-"))
    server = None
    stack = contextlib.ExitStack()
    if args.store != "local":
        from pipeline.tools import servers

        server = stack.enter_context(servers.s3_server() if args.store == "s3"
                                     else servers.gcs_server())
        protocol = "s3" if args.store == "s3" else "gs"
        manifest = upload_slides(manifest, server, protocol)
        root_out = f"{protocol}://softmix-bench"
    else:
        root_out = str(root)
    if args.latency_ms > 0:
        os.environ["SOFTMIX_LATENCY_MS"] = str(args.latency_ms)
        manifest = with_latency(manifest, root / "manifest-latency.csv")
    rows = []
    try:
        for workers in [int(w) for w in args.workers.split(",")]:
            for engine in args.engines.split(","):
                job = make_job(manifest, f"{root_out}/out-{engine}-{workers}",
                               args.tile_size)
                row = measure(engine, job, workers, server)
                rows.append(row)
                print(f"{engine} x{workers}: {row['examples']} examples in "
                      f"{row['seconds']:.1f} s", flush=True)
        startup = []
        if not args.no_startup:
            small = demo_slides(1024, 2)
            for workers in [int(w) for w in args.workers.split(",")]:
                for engine in args.engines.split(","):
                    job = make_job(small, root / f"start-{engine}-{workers}", args.tile_size)
                    startup.append(measure(engine, job, workers))
        floors = {r["workers"]: r["rate"] for r in rows if r["engine"] == "local"}
        print(f"\n{args.slides} slides of {args.slide_size} px, tile {args.tile_size}, "
              f"latency {args.latency_ms:g} ms/request, store {args.store}, "
              f"{os.cpu_count()} CPUs\n")
        print(f"load average {os.getloadavg()[0]:.1f} at the end (other users of the "
              "machine)\n")
        print("| engine | workers | examples | s | examples/s | vs local | vs 1 worker "
              "| CPU s | CPU ms/example | chunks_read | bytes_read (MB) | read_amplification "
              "| requests/example | peak RSS (MiB) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        single = {r["engine"]: r["rate"] for r in rows if r["workers"] == 1}
        for r in rows:
            floor = floors.get(r["workers"])
            vs_floor = f"{r['rate'] / floor:.2f}x" if floor else ""
            vs_one = f"{r['rate'] / single[r['engine']]:.2f}x" if r["engine"] in single else ""
            print(f"| {r['engine']} | {r['workers']} | {r['examples']} | {r['seconds']:.1f} "
                  f"| {r['rate']:.1f} | {vs_floor} | {vs_one} | {r['cpu']:.1f} "
                  f"| {r['cpu'] / r['examples'] * 1000:.1f} | {r['chunks_read']} "
                  f"| {r['bytes_read'] / 1e6:.1f} | {r['amplification']} "
                  f"| {r['requests_per_example']:.2f} | {r['peak_rss'] / 2**20:.0f} |")
        if startup:
            print("\nstart-up: each engine on two 1024-px slides (the fixed cost of a run)\n")
            print("| engine | workers | examples | s | CPU s |")
            print("|---|---|---|---|---|")
            for r in startup:
                print(f"| {r['engine']} | {r['workers']} | {r['examples']} "
                      f"| {r['seconds']:.1f} | {r['cpu']:.1f} |")
        if args.breakdown:
            print("\nCPU per example by step (`benchmarks/profile_breakdown.py`, one "
                  "process):\n", flush=True)
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_breakdown.py"),
                            str(manifest), "--tile-size", str(args.tile_size)],
                           check=True, cwd=ROOT, stderr=subprocess.DEVNULL)
        if server is not None and server.kind == "s3":
            server_table(rows)
        packs = [r["pack_bytes"] for r in rows if r.get("pack_bytes")]
        if packs:
            print(f"\ntile packs (the shuffle through staging): {packs[0] / 1e6:.1f} MB "
                  "written once, read back ~2x (source a and partner b)")
        if args.memory:
            print("\n| slides | examples | peak RSS (MiB), dask x2 |")
            print("|---|---|---|")
            for count in (4, 16):
                data = demo_slides(args.slide_size, count)
                row = measure("dask", make_job(data, root / f"mem-{count}", args.tile_size), 2)
                print(f"| {count} | {row['examples']} | {row['peak_rss'] / 2**20:.0f} |",
                      flush=True)
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
