"""Time `softmix report` on a 1,000-slide run (synthetic OUT, real slides and shards).

Run: `.venv/bin/python benchmarks/bench_report.py [--slides 1000] [--size 8192] [--work DIR]`.

What it builds (once, under --work):
- 4 demo slides of `--size` px (`softmix demo-data --size`, pyramid down to <= 1024 px)
  and their real plans (`plan_slide`, 256-px tiles): kept and background tiles;
- a small real Beam run (4 demo slides of 1024 px) for real shards, concatenated into
  shards of 2,000+ examples (TFRecord files concatenate);
- an OUT whose ``manifest.json`` and ``report/tiles.json.gz`` describe `--slides` slides,
  each one of the 4 slides (cycled; every slide is opened and drawn on its own), with
  their kept tiles used except a few marked ``read_error`` and ``no_partner``.

Then times `write_report(OUT)` (the same call as `softmix report OUT`) in this process,
after importing TensorFlow (the CLI imports it anyway), and prints the stages, the page
size and the per-slide PNG size.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import shutil
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _demo(directory: pathlib.Path, size: int) -> pathlib.Path:
    from pipeline.tools.demo import write_demo_data

    manifest = directory / "manifest.csv"
    if not manifest.exists():
        write_demo_data(directory, num_slides=4, slide_size=size, log=None)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slides", type=int, default=1000)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--work", default="/tmp/softmix-bench-report")
    parser.add_argument("--shard-examples", type=int, default=2000)
    args = parser.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import tensorflow  # noqa: F401 - the CLI has it loaded before the report starts

    from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
    from pipeline.io.manifest import load_slide_manifest
    from pipeline.steps.plan import plan_slide

    big = load_slide_manifest(str(_demo(work / f"slides-{args.size}", args.size)))
    config = TileConfig(tile_size=256)
    plans = {r.slide_id: plan_slide(r, config) for r in big.slides}

    run = work / "run"
    if not (run / "manifest.json").exists():
        from pipeline.engines.beam import run_beam

        small = _demo(work / "slides-1024", 1024)
        run_beam(JobConfig(manifest=str(small), tile=config, mix=MixConfig(seed=0),
                           output=OutputConfig(out_dir=str(run), num_shards=1, overwrite=True)),
                 progress=False)
    base = json.loads((run / "manifest.json").read_text())

    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    (out / "report").mkdir(parents=True)
    shard = (run / base["shards"][0]["file"]).read_bytes()
    copies = -(-args.shard_examples // base["num_examples"])
    shards = []
    for index in range(4):
        name = f"softmix-{index:05d}-of-00004.tfrecord"
        (out / name).write_bytes(shard * copies)
        shards.append({"file": name, "num_examples": base["num_examples"] * copies})

    slides, used_total, skipped = {}, 0, {"background": 0, "read_error": 0, "no_partner": 0}
    records = list(big.slides)
    bytes_read = 0
    for i in range(args.slides):
        record = records[i % len(records)]
        plan = plans[record.slide_id]
        xy = [v for t in plan.tiles for v in (t.key.x, t.key.y)]
        tiles = {"used": xy[4:], "read_error": xy[:2], "no_partner": xy[2:4]}
        slide_id = f"case-{i:04d}/{record.slide_id}"
        background = dict(plan.skipped).get("background", 0)
        slides[slide_id] = {"path": record.path, "label": record.label, "planned": True,
                            "level": 0, "background": background, "plan_skipped": {},
                            "tiles": tiles,
                            "reads": {"chunks_read": 100, "bytes_read": 5_000_000,
                                      "requests": 120}}
        used_total += len(xy[4:]) // 2
        skipped["background"] += background
        skipped["read_error"] += 1
        skipped["no_partner"] += 1
        bytes_read += 5_000_000
    now = time.time()
    record = {"format": "softmix.tiles/1", "slides": slides,
              "timeline": {"started": now - 600, "last_plan": now - 500, "last_pack": now - 300,
                           "last_bucket": now - 60, "last_shard": now - 10, "published": now}}
    (out / "report" / "tiles.json.gz").write_bytes(
        gzip.compress(json.dumps(record, separators=(",", ":")).encode()))
    manifest = dict(base)
    manifest["shards"] = shards
    manifest["files"] = [s["file"] for s in shards] + ["preview.png", "report.html", "report"]
    manifest["num_examples"] = sum(s["num_examples"] for s in shards)
    acc = dict(base["accounting"])
    acc.update(tiles_used=used_total, tiles_skipped=skipped,
               tiles_total=used_total + sum(skipped.values()),
               examples_written=manifest["num_examples"], bytes_read=bytes_read,
               slides_failed={}, slides_failed_messages={})
    manifest["accounting"] = acc
    (out / "manifest.json").write_text(json.dumps(manifest))
    print(f"OUT: {out} ({args.slides} slides of {args.size} px, "
          f"{record['slides'][next(iter(slides))]['background']} background tiles each, "
          f"{manifest['num_examples']} examples in {len(shards)} shards)")

    from pipeline.tools.report import write_report

    start, cpu = time.perf_counter(), time.process_time()
    write_report(str(out), log=print)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    page = (out / "report.html").stat().st_size
    pngs = list((out / "report").glob("*.png"))
    mean_png = sum(p.stat().st_size for p in pngs) / max(1, len(pngs))
    load = os.getloadavg()[0]
    print(f"write_report: {seconds:.1f} s ({cpu:.1f} CPU-s) for {args.slides} slides "
          f"({os.cpu_count()} CPUs, load average {load:.1f}); report.html "
          f"{page / 2**20:.1f} MB; "
          f"{len(pngs)} slide PNGs, {mean_png / 1024:.0f} KB each")


if __name__ == "__main__":
    main()
