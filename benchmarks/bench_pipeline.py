"""End-to-end throughput of the offline job: Beam and Dask next to a no-framework floor.

Run: `.venv/bin/python benchmarks/bench_pipeline.py [--num-slides 4] [--tile-size 256]
[--engines floor,beam,dask] [--workers 1,2] [--memory]`.

Every engine processes the same demo slides (`softmix demo-data`) and writes the same
examples. The floor reads exactly the tiles the job uses from Zarr and writes them as
TFRecords (raw bytes, no framework, no mixing, no PNG): the cost of the I/O alone.
`--memory` also measures the peak RSS of the Dask workers for 4 vs 16 slides.
Prints markdown tables of tiles/s (tiles used per wall-clock second, setup included).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline import _job  # noqa: E402
from pipeline._demo import write_demo_data  # noqa: E402
from pipeline._manifest import load_slide_manifest  # noqa: E402
from pipeline._slides import SlideCache  # noqa: E402
from pipeline._tiling import plan_slide  # noqa: E402
from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig  # noqa: E402


def floor(job: JobConfig) -> tuple[float, int]:
    """Plan, read every used tile once and write it raw to one TFRecord file."""
    import tensorflow as tf

    start = time.perf_counter()
    manifest = load_slide_manifest(job.manifest)
    cache = SlideCache()
    plans = [plan_slide(record, job.tile, slide_cache=cache) for record in manifest.slides]
    read = _job.make_tile_reader(manifest.slides, job.tile.tile_size, cache)
    out = pathlib.Path(job.output.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with tf.io.TFRecordWriter(str(out / "floor.tfrecord")) as writer:
        for plan in plans:
            for tile in plan.tiles:
                pixels = read(tile.key)
                feature = {
                    "image": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[pixels.tobytes()])
                    )
                }
                writer.write(
                    tf.train.Example(
                        features=tf.train.Features(feature=feature)
                    ).SerializeToString()
                )
                count += 1
    return time.perf_counter() - start, count


def run_engine(engine: str, job: JobConfig, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    if engine == "beam":
        from pipeline.beam_transforms import run_beam

        manifest = run_beam(job, workers=workers, progress=False)
    else:
        from pipeline.dask_transforms import run_dask

        manifest = run_dask(job, workers=workers, progress=False)
    return time.perf_counter() - start, manifest["accounting"]["tiles_used"]


def make_job(manifest: pathlib.Path, out: pathlib.Path, tile_size: int) -> JobConfig:
    return JobConfig(
        manifest=str(manifest),
        tile=TileConfig(tile_size=tile_size),
        mix=MixConfig(),
        output=OutputConfig(out_dir=str(out), overwrite=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-slides", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--engines", default="floor,beam,dask")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure peak Dask worker RSS with 4 vs 16 slides",
    )
    args = parser.parse_args()
    root = pathlib.Path(tempfile.mkdtemp(prefix="softmix-bench-"))
    try:
        manifest = write_demo_data(root / "data", num_slides=args.num_slides, log=None)
        rows = []
        for engine in args.engines.split(","):
            for workers in [1] if engine == "floor" else [int(w) for w in args.workers.split(",")]:
                job = make_job(manifest, root / f"out-{engine}-{workers}", args.tile_size)
                if engine == "floor":
                    seconds, tiles = floor(job)
                else:
                    seconds, tiles = run_engine(engine, job, workers)
                rows.append((engine, workers, tiles, seconds))
                print(f"{engine} x{workers}: {tiles} tiles in {seconds:.1f} s", flush=True)
        floor_rate = next((t / s for e, _, t, s in rows if e == "floor"), None)
        print(f"\n{args.num_slides} demo slides, tile {args.tile_size}, {os.cpu_count()} CPUs\n")
        print("| engine | workers | tiles | seconds | tiles/s | vs floor |")
        print("|---|---|---|---|---|---|")
        for engine, workers, tiles, seconds in rows:
            rate = tiles / seconds
            ratio = f"{floor_rate / rate:.1f}x slower" if floor_rate and engine != "floor" else ""
            print(f"| {engine} | {workers} | {tiles} | {seconds:.1f} | {rate:.1f} | {ratio} |")
        if args.memory:
            from pipeline.dask_transforms import measure_peak_worker_rss

            print("\n| slides | tiles used | baseline worker RSS (MiB) | peak worker RSS (MiB) |")
            print("|---|---|---|---|")
            for num_slides in (4, 16):
                data = write_demo_data(root / f"mem-{num_slides}", num_slides=num_slides, log=None)
                job = make_job(data, root / f"mem-out-{num_slides}", args.tile_size)
                manifest_out, memory = measure_peak_worker_rss(job, workers=2)
                print(
                    f"| {num_slides} | {manifest_out['accounting']['tiles_used']} | "
                    f"{memory['baseline_rss_bytes'] / 2**20:.0f} | "
                    f"{memory['peak_rss_bytes'] / 2**20:.0f} |",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
