"""Peak memory of pairing one partition: a run of 10^5 vs 10^6 tile records.

Run: `.venv/bin/python benchmarks/bench_pairing.py [--slides 100,1000]
[--tiles-per-slide 1000] [--partition-slides 10] [--old]`.

Each size runs in a fresh subprocess that does what one worker does for one partition:
build the `PairingTable` from the run's per-slide counts (the side input), make the
`TileRecord`s of its partition (`--partition-slides` slides, 10^4 anchors by default)
and draw their examples (`PairSpec`s, random pairing with the group rule, one mix each).
Reported per size: the process's peak RSS (`ru_maxrss`, interpreter included), the
same minus the RSS after imports, the tracemalloc peak of the pairing step alone (a
second, traced pass), the pickled size of the table and the wall time. The target is
a peak-RSS ratio (largest run / smallest) <= 1.5.

`--old` adds the former approach for reference: `PairingIndex` (git commit c274b9c)
built from every tile record of the run, then the same partition's examples.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import resource
import subprocess
import sys
import time
import tracemalloc
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
OLD_COMMIT = "c274b9c"
GROUP_EVERY = 3  # slides per patient


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _counts(num_slides: int, tiles_per_slide: int) -> list:
    from pipeline.steps.pair import SlideCounts

    return [SlideCounts(f"slide{i:05d}", i % 4, f"p{i // GROUP_EVERY}", tiles_per_slide)
            for i in range(num_slides)]


def _slide_tiles(slide, tiles_per_slide: int) -> list:
    from pipeline.records import TileKey, TileRecord

    side = max(1, int(tiles_per_slide ** 0.5))
    return sorted(TileRecord(TileKey(slide.slide_id, 0, 256 * (j % side), 256 * (j // side)),
                             slide.label, slide.group) for j in range(tiles_per_slide))


def _new_step(num_slides: int, tiles_per_slide: int, partition: int) -> tuple[int, object]:
    from pipeline.config import MixConfig
    from pipeline.steps.pair import PairingTable

    config = MixConfig(seed=1, group_column="patient")
    counts = _counts(num_slides, tiles_per_slide)
    table = PairingTable(counts, config, 4)
    specs = []
    for slide in counts[:partition]:
        for index, tile in enumerate(_slide_tiles(slide, tiles_per_slide)):
            specs.extend(table.examples_for(tile, index))
    return len(specs), table


def _load_old() -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:pipeline/_pairing.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType("pipeline._pairing_old")
    module.__package__ = "pipeline"
    sys.modules[module.__name__] = module  # so that its classes pickle
    exec(compile(source, "pipeline/_pairing_old.py", "exec"), module.__dict__)
    return module


def _old_step(num_slides: int, tiles_per_slide: int, partition: int,
              old) -> tuple[int, object]:
    from pipeline.config import MixConfig

    config = MixConfig(seed=1, group_column="patient")
    counts = _counts(num_slides, tiles_per_slide)
    index = old.PairingIndex((t for slide in counts for t in _slide_tiles(slide, tiles_per_slide)),
                             config, 4)
    specs = []
    for slide in counts[:partition]:
        for tile in _slide_tiles(slide, tiles_per_slide):
            specs.extend(index.examples_for(tile))
    return len(specs), index


def worker(mode: str, num_slides: int, tiles_per_slide: int, partition: int) -> dict:
    import pipeline.config  # noqa: F401
    import pipeline.records  # noqa: F401  (imports before the baseline)
    import pipeline.steps.pair  # noqa: F401

    old = _load_old() if mode == "old" else None

    def step() -> tuple[int, object]:
        if old is None:
            return _new_step(num_slides, tiles_per_slide, partition)
        return _old_step(num_slides, tiles_per_slide, partition, old)

    baseline = _rss_mib()
    start = time.perf_counter()
    num_examples, table = step()
    seconds = time.perf_counter() - start
    peak = _rss_mib()
    table_bytes = len(pickle.dumps(table))  # after the peak: not part of the step
    del table
    tracemalloc.start()
    step()
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return {"mode": mode, "tiles": num_slides * tiles_per_slide, "slides": num_slides,
            "anchors": partition * tiles_per_slide, "peak_rss_mib": round(peak, 1),
            "rss_above_imports_mib": round(peak - baseline, 1),
            "traced_peak_mib": round(traced, 1), "seconds": round(seconds, 2),
            "examples": num_examples, "table_pickle_bytes": table_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", default="100,1000",
                        help="comma-separated slide counts of the runs compared")
    parser.add_argument("--tiles-per-slide", type=int, default=1000)
    parser.add_argument("--partition-slides", type=int, default=10,
                        help="slides whose tiles are the partition's anchors")
    parser.add_argument("--old", action="store_true", help="also run the former PairingIndex")
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "SLIDES", "TILES", "PART"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, slides, tiles, part = args.worker
        print(json.dumps(worker(mode, int(slides), int(tiles), int(part))))
        return
    sizes = [int(s) for s in args.slides.split(",")]
    modes = ["new", "old"] if args.old else ["new"]
    rows = []
    for mode in modes:
        for slides in sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", mode, str(slides),
                 str(args.tiles_per_slide), str(args.partition_slides)],
                cwd=ROOT, check=True, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        small, large = mine[0], mine[-1]
        print(f"{mode}: {small['tiles']:,} -> {large['tiles']:,} tiles: peak RSS "
              f"{small['peak_rss_mib']} -> {large['peak_rss_mib']} MiB "
              f"(x{large['peak_rss_mib'] / small['peak_rss_mib']:.2f}); above imports "
              f"{small['rss_above_imports_mib']} -> {large['rss_above_imports_mib']} MiB; "
              f"traced {small['traced_peak_mib']} -> {large['traced_peak_mib']} MiB "
              f"(x{large['traced_peak_mib'] / max(small['traced_peak_mib'], 1e-9):.2f})")
    new = [r for r in rows if r["mode"] == "new"]
    ratio = new[-1]["peak_rss_mib"] / new[0]["peak_rss_mib"]
    print(f"target peak-RSS ratio <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'} (x{ratio:.2f})")


if __name__ == "__main__":
    main()
