"""`pipeline.stream_dataset` next to `read_dataset` on the offline output of the same examples.

Run: `.venv/bin/python benchmarks/bench_stream.py --slide-size 8192 --slides 16
[--latency-ms 20] [--manifest PATH]`.

Slides come from `softmix demo-data --size N --num-slides M` (cached under
`.cache/bench/`, shared with bench_pipeline.py), or `--manifest`. One run, same
machine, same options (tile 256, grid 4, one mix per tile):

1. the offline job (`run_beam`) writes the examples; `read_dataset` reads them back
   (examples/s of one pass, batches of 64, nothing else in the step);
2. `stream_dataset(epoch=0, batch=64)` with a cold cache: time to first batch (planning, then
   packing the strips the first examples need: pairing counts planned tiles, so a work
   unit is ready once its anchors' and partners' strips are packed) and examples/s of
   the whole epoch; with how many strips were packed when the first batch came;
3. the stream again on the warm cache (plans and packs reused), e.g. a later run, with
   `batch=64` and with single examples batched by `.batch(64)`;
4. with `--latency-ms`, 2. again with the slides served through `latency://`
   (`pipeline.remote`, every request delayed like a bucket).

The stream's examples/s include planning and packing: it decodes the slides, the
reader only decodes PNGs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

BATCH = 64


def timed_pass(dataset, stats=None, batched=False) -> tuple[int, float, float, float, str]:  # noqa: ANN001
    """`(examples, seconds to the first batch, seconds in all, CPU seconds of the
    process, strips packed or reused at the first batch / all)` of one pass; `batched`:
    `dataset` yields batches of `BATCH` already."""
    start, cpu = time.perf_counter(), time.process_time()
    first = None
    strips = ""
    count = 0
    for images, _ in (dataset if batched else dataset.batch(BATCH)):
        if first is None:
            first = time.perf_counter() - start
            if stats is not None:
                strips = str(stats.strips_packed + stats.strips_reused)
        count += int(images.shape[0])
    if stats is not None:
        strips += f"/{stats.strips_packed + stats.strips_reused}"
    return (count, first or 0.0, time.perf_counter() - start, time.process_time() - cpu,
            strips)


def main(argv: list[str] | None = None) -> None:
    from bench_pipeline import demo_slides, with_latency

    import pipeline
    from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
    from pipeline.engines.beam import run_beam

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slide-size", type=int, default=8192)
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--manifest", default=None, help="existing slides instead of demo ones")
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 4,
                        help="offline job workers")
    args = parser.parse_args(argv)

    manifest = (pathlib.Path(args.manifest) if args.manifest
                else demo_slides(args.slide_size, args.slides))
    options = dict(tile_size=args.tile_size, grid=4, num_mixes=1, seed=0)
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-stream-"))
    rows = []
    try:
        job = JobConfig(manifest=str(manifest), tile=TileConfig(tile_size=args.tile_size),
                        mix=MixConfig(grid=4, num_mixes=1, seed=0),
                        output=OutputConfig(out_dir=str(work / "offline")))
        start = time.perf_counter()
        written = run_beam(job, workers=args.workers, progress=False)["num_examples"]
        offline_s = time.perf_counter() - start
        n, first, total, cpu, _ = timed_pass(pipeline.read_dataset(str(work / "offline")))
        rows.append(("read_dataset (TFRecords)", n, first, total, cpu, ""))

        cache = work / "cache"
        plan_s = {}

        def stream_row(name: str, manifest_path: pathlib.Path, cache_dir: pathlib.Path,
                       batched: bool = True) -> None:
            start, cpu0 = time.perf_counter(), time.process_time()
            stream = pipeline.stream_dataset(str(manifest_path), epoch=0,
                                             cache_dir=str(cache_dir), **options,
                                             batch=BATCH if batched else None)
            build, build_cpu = time.perf_counter() - start, time.process_time() - cpu0
            stats = pipeline.dataset_stats(stream)
            plan_s[name] = stats.plan_seconds
            n, first, total, cpu, strips = timed_pass(stream, stats, batched)
            rows.append((name, n, first + build, total + build, cpu + build_cpu, strips))

        stream_row("stream_dataset, cold cache", manifest, cache)
        stream_row("stream_dataset, warm cache", manifest, cache)
        stream_row("stream_dataset, warm, .batch()", manifest, cache, batched=False)
        if args.latency_ms:
            os.environ["SOFTMIX_LATENCY_MS"] = str(args.latency_ms)
            stream_row(f"stream_dataset, {args.latency_ms:g} ms store",
                       with_latency(manifest, work / "latency.csv"), work / "c2")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"slides: {manifest} | offline job ({args.workers} workers): {written} examples "
          f"in {offline_s:.1f} s")
    print("stream planning (before the dataset exists): "
          + ", ".join(f"{k.split(', ')[1]} {v:.2f} s" for k, v in plan_s.items()))
    reader_rate = rows[0][1] / rows[0][3]
    print(f"{'':32}{'examples':>9}{'first batch s':>14}{'strips at 1st':>14}{'total s':>9}"
          f"{'CPU s':>7}{'ex/s':>7}{'vs reader':>10}")
    for name, count, first_s, total_s, cpu_s, strips in rows:
        rate = count / total_s
        print(f"{name:32}{count:>9}{first_s:>14.2f}{strips:>14}{total_s:>9.2f}{cpu_s:>7.1f}"
              f"{rate:>7.0f}{rate / reader_rate:>9.2f}x")
    print(f"(stream rows yield batches of {BATCH} (`batch={BATCH}`), the '.batch()' row "
          f"single examples batched by `.batch({BATCH})`; they include building the "
          "dataset: planning, or loading saved plans; "
          "'strips at 1st': strips packed or reused when the first batch of "
          f"{BATCH} came / in all)")


if __name__ == "__main__":
    main()
