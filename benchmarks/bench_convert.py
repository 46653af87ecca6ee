"""`softmix convert` on slide-sized SVS files, next to a same-work floor; then the job
reading the SVS files directly vs. reading their converted OME-Zarr. One run.

Run: `.venv/bin/python benchmarks/bench_convert.py --slide-size 16384 --slides 2
[--workers 1,2] [--latency-ms 20] [--no-job]`.

Slides: Aperio-style SVS (256-px JPEG tiles, Q=90, 4x pyramid, thumbnail, label,
macro) written with tifffile (`pipeline.tools.svs.write_svs`) from the demo's real H&E
texture (CMU-1-Small-Region, mirror-tiled under a tissue outline, as
`softmix demo-data --size N` renders it), cached under `.cache/bench/`.

Conversion: `softmix convert --manifest ... --workers W` (local engine, defaults:
OME-Zarr v0.5, 1024-px chunks, zstd, pyramid rebuilt by 2x2 means), each run a fresh
process (start-up included). The *floor* does the same work with nothing else: a
plain process pool of W workers, each reading 2048-px blocks through tifffile's Zarr
store and writing them with zarr (same chunks, codec, and the same pyramid level by
level), no markers, no metadata, no safety checks. slides/s and MB/s count the
decoded level-0 pixels (height x width x 3 bytes per slide).

Job: `bench_pipeline.measure` (a fresh process, tile 256, grid 4) with Beam on the
SVS manifest and on the converted one; `--latency-ms` serves both through the
`latency://` test filesystem (every request waits that long, like a bucket).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import multiprocessing
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = 2048
CHUNK = 1024


def svs_slides(size: int, count: int) -> pathlib.Path:
    """`count` SVS slides of `size` px (cached); returns their manifest."""
    directory = ROOT / ".cache" / "bench" / f"svs-{size}-{count}"
    manifest = directory / "manifest.csv"
    if manifest.exists():
        return manifest
    import numpy as np

    from pipeline.tools.demo import find_he_source, load_he_image, load_ihc_image
    from pipeline.tools.demo_render import scan_glass, tiled_slide
    from pipeline.tools.svs import write_svs

    source = find_he_source()
    images = {"he": load_he_image(source) if source else load_ihc_image(hematoxylin_only=True),
              "ihc": load_ihc_image()}
    directory.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,path,label"]
    for index in range(count):
        label = ("he", "ihc")[index % 2]
        image = images[label]
        slide = tiled_slide(image, size, index, 0.3 + 0.1 * index, 0.6, scan_glass(image))

        def region(y0: int, y1: int, x0: int, x1: int, slide=slide) -> np.ndarray:
            return np.moveaxis(slide.render(y0, y1, x0, x1), 0, -1)

        name = f"bench-{index:03d}-{label}.svs"
        start = time.perf_counter()
        write_svs(directory / name, region, shape=(size, size), mpp=0.499, tile=256)
        print(f"wrote {name} ({(directory / name).stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        rows.append(f"bench-{index:03d},{name},{label}")
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


# --- The floor: tifffile read + zarr write in a plain process pool ----------------------


_FLOOR_OPEN: dict[str, object] = {}


def _floor_block(task: tuple[str, str, int, int, int, int, int]) -> int:
    import numpy as np
    import tifffile
    import zarr

    from pipeline.tools.convert import halve

    source, target, level, y0, y1, x0, x1 = task
    out = zarr.open_array(f"{target}/{level}", mode="r+")
    if level == 0:
        if source not in _FLOOR_OPEN:  # open each file once per worker, as convert does
            _FLOOR_OPEN[source] = zarr.open(tifffile.TiffFile(source).series[0].aszarr(level=0),
                                            mode="r")
        array = _FLOOR_OPEN[source]
        pixels = np.moveaxis(np.asarray(array[y0:y1, x0:x1]), -1, 0)
    else:
        below = zarr.open_array(f"{target}/{level - 1}", mode="r")
        pixels = halve(np.asarray(below[:, 2 * y0:min(below.shape[1], 2 * y1),
                                        2 * x0:min(below.shape[2], 2 * x1)]))
    out[:, y0:y1, x0:x1] = pixels
    return int(pixels.nbytes)


def run_floor(manifest: pathlib.Path, out: pathlib.Path, workers: int) -> None:
    import tifffile
    import zarr
    from zarr.codecs import ZstdCodec

    from pipeline.tools.convert import _rebuilt_shapes

    stages: list[list[tuple]] = []
    for row in csv.DictReader(manifest.open()):
        source = str(manifest.parent / row["path"])
        with tifffile.TiffFile(source) as tif:
            height, width = tif.series[0].shape[:2]
        target = str(out / f"{row['slide_id']}.zarr")
        group = zarr.open_group(target, mode="w")
        for level, (h, w) in enumerate(_rebuilt_shapes(height, width)):
            group.create_array(str(level), shape=(3, h, w), dtype="uint8",
                               chunks=(3, min(CHUNK, h), min(CHUNK, w)),
                               compressors=ZstdCodec(level=3), fill_value=0)
            while len(stages) <= level:
                stages.append([])
            stages[level] += [(source, target, level, y, min(h, y + BLOCK), x, min(w, x + BLOCK))
                              for y in range(0, h, BLOCK) for x in range(0, w, BLOCK)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for stage in stages:
            list(pool.map(_floor_block, stage))


# --- Measuring ---------------------------------------------------------------------------


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr[-3000:]}")
    return seconds


def with_latency(manifest: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_pipeline import with_latency as rewrite

    return rewrite(manifest, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide-size", type=int, default=16384)
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="per-request latency for the job comparison (0: local disk)")
    parser.add_argument("--no-job", action="store_true", help="skip the job comparison")
    parser.add_argument("--runs", default="floor,convert",
                        help="conversion runs to time (e.g. 'convert' alone before a job "
                        "comparison)")
    parser.add_argument("--run-floor", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_floor:
        run_floor(pathlib.Path(args.run_floor[0]), pathlib.Path(args.run_floor[1]),
                  int(args.run_floor[2]))
        return
    manifest = svs_slides(args.slide_size, args.slides)
    megabytes = args.slides * args.slide_size**2 * 3 / 1e6
    file_mb = sum(p.stat().st_size for p in manifest.parent.glob("*.svs")) / 1e6
    root = pathlib.Path(tempfile.mkdtemp(prefix="softmix-bench-convert-"))
    rows = []
    try:
        for workers in [int(w) for w in args.workers.split(",")]:
            for kind in args.runs.split(","):
                out = root / f"{kind}-{workers}"
                if kind == "floor":
                    out.mkdir()
                    command = [sys.executable, __file__, "--run-floor", str(manifest), str(out),
                               str(workers)]
                else:
                    command = [sys.executable, "-m", "pipeline", "convert", "--manifest",
                               str(manifest), "--out", str(out), "--workers", str(workers),
                               "--no-progress"]
                seconds = timed(command)
                rows.append((kind, workers, seconds))
                print(f"{kind} x{workers}: {seconds:.1f} s", flush=True)
                if kind == "floor":
                    shutil.rmtree(out)
        print(f"\n{args.slides} SVS slides of {args.slide_size} px ({file_mb:.0f} MB of JPEG "
              f"tiles, {megabytes:.0f} MB decoded at level 0), {os.cpu_count()} CPUs\n")
        print("| run | workers | s | slides/s | MB/s | vs floor | vs 1 worker |")
        print("|---|---|---|---|---|---|---|")
        floor = {w: s for k, w, s in rows if k == "floor"}
        one = {k: s for k, w, s in rows if w == 1}
        for kind, workers, seconds in rows:
            paired = workers in floor and kind == "convert"
            vs_floor = f"{floor[workers] / seconds:.2f}x" if paired else ""
            vs_one = f"{one[kind] / seconds:.2f}x" if kind in one else ""
            print(f"| {'softmix convert' if kind == 'convert' else 'floor'} | {workers} "
                  f"| {seconds:.1f} | {args.slides / seconds:.3f} | {megabytes / seconds:.0f} "
                  f"| {vs_floor} | {vs_one} |")
        if args.no_job:
            return
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_pipeline import make_job, measure

        converted = root / f"convert-{max(w for _, w, _ in rows)}" / "manifest.csv"
        manifests = {"SVS (direct)": manifest, "OME-Zarr (converted)": converted}
        if args.latency_ms > 0:
            os.environ["SOFTMIX_LATENCY_MS"] = str(args.latency_ms)
            manifests = {k: with_latency(v, root / f"latency-{i}.csv")
                         for i, (k, v) in enumerate(manifests.items())}
        results = []
        for name, path in manifests.items():
            row = measure("beam", make_job(path, root / f"job-{len(results)}", 256), 1)
            results.append((name, row))
            print(f"job on {name}: {row['examples']} examples in {row['seconds']:.1f} s",
                  flush=True)
        print(f"\njob (Beam, 1 worker, tile 256), latency {args.latency_ms:g} ms/request\n")
        print("| slides read from | examples | s | examples/s | chunks_read "
              "| bytes_read (MB) | requests/example |")
        print("|---|---|---|---|---|---|---|")
        for name, r in results:
            print(f"| {name} | {r['examples']} | {r['seconds']:.1f} | {r['rate']:.1f} "
                  f"| {r['chunks_read']} | {r['bytes_read'] / 1e6:.1f} "
                  f"| {r['requests_per_example']:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
