"""What surrounds an offline run's steps: its parameters and fingerprint, the output
directory's life cycle (lock, staging, resume, publish), progress and error reporting.

`pipeline.run.run.Run` calls these for every engine; the steps themselves are
`pipeline.run.tasks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..config import JobConfig, OutputConfig
from .output import STAGING_DIR

if TYPE_CHECKING:
    from ..accounting import Accounting
    from ..dataset.shards import ShardInfo
    from ..records import SlideRecord
    from ..steps.stain import StainSpec

__all__ = [
    "exit_status",
    "job_params",
    "summary_table",
]


def job_params(job: JobConfig, engine: str, **extra: Any) -> dict[str, Any]:
    """Every option of the run, for `manifest.json`'s `params`."""
    import dataclasses

    params: dict[str, Any] = {
        "engine": engine,
        "manifest": job.manifest,
        "class_names": list(job.class_names) if job.class_names else None,
        "tile": dataclasses.asdict(job.tile),
        "mix": job.mix.to_dict(),
        "output": dataclasses.asdict(job.output),
    }
    params["output"].pop("storage_options", None)  # may hold credentials
    params["mix"]["grid"] = list(job.mix.grid)
    params.update(extra)
    return params  # `output.finalize_output` adds the software versions


def run_fingerprint(job: JobConfig, slides: Sequence[SlideRecord], *,
                    stain: StainSpec | None = None) -> dict[str, Any]:
    """What makes a run's output what it is: options, seed, software, manifest content
    (and, with `stain` from a fit JSON file, the target fit it holds).

    A resumed run must match the interrupted one on all of it (`fingerprint_diff`).
    Options that never change a byte of the output (workers, caches, batch size,
    overwrite/resume themselves) are left out.
    """
    import dataclasses

    from .output import software_versions

    mix = job.mix.to_dict()
    mix.pop("batch_size")
    mix["grid"] = list(job.mix.grid)
    output = dataclasses.asdict(job.output)
    for key in ("out_dir", "overwrite", "resume", "storage_options"):
        output.pop(key, None)
    options = {"tile": dataclasses.asdict(job.tile), "mix": mix, "output": output,
               "class_names": list(job.class_names) if job.class_names else None}
    if stain is not None and stain.kind == "path":
        options["stain_target_fit"] = stain.target
    return {
        "options": options,
        "software": software_versions(),
        "slides": {r.slide_id: {"path": r.path, "label": r.label, "group": r.group,
                                "columns": dict(r.metadata), **_file_stamp(r.path)}
                   for r in slides},
    }


def _file_stamp(path: str) -> dict[str, Any]:
    """A TIFF slide is one file: its size and mtime tell a resumed run it changed."""
    from ..io.tiff import file_stamp, is_tiff_path

    if not is_tiff_path(path):
        return {}
    try:
        return {"file": file_stamp(path)}
    except (OSError, ValueError):  # missing: the run reports it as a failed slide
        return {}


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """A short stable digest of `run_fingerprint` (kept in the manifest's params)."""
    import hashlib
    import json

    text = json.dumps(fingerprint, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any],
                     prefix: str = "", *, old_name: str = "interrupted run") -> list[str]:
    """Human-readable differences between two fingerprints (empty when equal).

    >>> fingerprint_diff({"mix": {"seed": 0}}, {"mix": {"seed": 1}})
    ['mix.seed: 0 (interrupted run) != 1 (this run)']
    """
    out: list[str] = []
    for key in sorted(set(old) | set(new), key=str):
        name = f"{prefix}{key}"
        if key not in old:
            out.append(f"{name}: not in the {old_name}")
        elif key not in new:
            out.append(f"{name}: not in this run")
        elif isinstance(old[key], Mapping) and isinstance(new[key], Mapping):
            out.extend(fingerprint_diff(old[key], new[key], f"{name}.", old_name=old_name))
        elif old[key] != new[key]:
            out.append(f"{name}: {old[key]!r} ({old_name}) != {new[key]!r} (this run)")
    return out


def _shown(diff: Sequence[str]) -> str:
    return "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")


def summary_table(manifest: Mapping[str, Any]) -> str:
    """A short human summary of a finished run (its `manifest.json` content)."""
    acc = manifest["accounting"]
    lines = [
        f"{'examples written':<28}{manifest['num_examples']:>10}",
        f"{'shards':<28}{len(manifest['shards']):>10}",
        f"{'tiles total':<28}{acc['tiles_total']:>10}",
        f"{'tiles used':<28}{acc['tiles_used']:>10}",
    ]
    for reason, count in sorted(acc["tiles_skipped"].items()):
        lines.append(f"{'tiles skipped: ' + reason:<28}{count:>10}")
    if "chunks_read" in acc:
        amplification = acc.get("read_amplification")
        lines += [
            f"{'chunks read':<28}{acc['chunks_read']:>10}",
            f"{'bytes read':<28}{acc['bytes_read']:>10}",
            f"{'read amplification':<28}"
            f"{'n/a' if amplification is None else f'{amplification:.3f}':>10}",
        ]
    for reason, count in sorted(acc.get("examples_dropped", {}).items()):
        lines.append(f"{'examples dropped: ' + reason:<28}{count:>10}")
    messages = acc.get("slides_failed_messages", {})
    for slide_id, reason in sorted(acc["slides_failed"].items()):
        lines.append(f"{'slide failed: ' + slide_id:<28}{reason:>10}")
        if messages.get(slide_id) and messages[slide_id] != reason:
            lines.append(f"    {messages[slide_id]}")
    hist = acc.get("class_histogram")
    if hist and manifest["num_examples"]:
        for name, weight in zip(manifest["class_names"], hist, strict=True):
            lines.append(f"{'label mass: ' + name:<28}{weight:>10.1f}")
    for warning in manifest.get("warnings", []):
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def exit_status(manifest: Mapping[str, Any]) -> int:
    """0 when the run finished with examples; 1 when it wrote none (a failed run).

    With `--on-error skip` bad slides and tiles are counted, not fatal, as long as
    something was written.
    """
    return 0 if manifest.get("num_examples", 0) > 0 else 1


# --- Output life cycle shared by every offline engine ----------------------------------
#
# A run locks OUT (`OUT/.softmix.lock`: pid, host, start time), writes everything into a
# hidden staging folder inside OUT, and publishes by swap only after every shard exists:
# new shards move in, the old dataset's other files go, manifest.json is written last.
# A failed or interrupted run leaves the old dataset untouched and its staging folder
# as it is (the next run needs --resume to continue it or --overwrite to discard it).

RUN_FILE = "run.json"  # in the staging folder: the owning lock (run id) and fingerprint


def staging_dir(config: OutputConfig) -> str:
    import posixpath

    return posixpath.join(config.out_dir, STAGING_DIR)


def _inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies below it (local paths resolved, URLs compared as text)."""
    import os
    import posixpath

    if "://" in path or "://" in folder:
        path, folder = posixpath.normpath(path.rstrip("/")), posixpath.normpath(
            folder.rstrip("/"))
        return path == folder or path.startswith(folder + "/")
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_out_outside_slides(out_dir: str, slides: Sequence[SlideRecord]) -> None:
    """Refuse an output directory that is an input slide's folder or lies inside one
    (the run would write its staging and shards into the OME-Zarr store).

    Raises:
        OutputExistsError: naming the slide and the fix; nothing was written.
    """
    from ..errors import OutputExistsError

    for record in slides:
        if record.path and _inside(out_dir, record.path):
            raise OutputExistsError(
                f"--out {out_dir!r} lies inside the folder of input slide "
                f"{record.slide_id!r} ({record.path!r}); the run would write into the "
                "slide. Choose an output directory outside every slide's folder.")


def prepare_output(config: OutputConfig, fingerprint: Mapping[str, Any] | None = None, *,
                   slides: Sequence[SlideRecord] = ()) -> bool:
    """Lock OUT, check it (`output.prepare_output_dir`), then start or resume staging.

    Nothing of an old dataset is deleted here. With overwrite, an unfinished run's
    staging folder is discarded (the lock guarantees no live run owns it). With
    resume, the staging folder of an interrupted run is kept when its fingerprint
    (`run_fingerprint`) equals this run's; the steps then reuse what it verified.

    Returns:
        True when an interrupted run is resumed, False for a fresh run.

    Raises:
        OutputExistsError: OUT lies inside one of `slides`' folders (checked before
            anything is created), another live run holds the lock, an existing dataset or
            unfinished run without overwrite/resume, a resume whose options, seed,
            software or manifest differ (the message names them), or files that are
            not ours.
        RunFinished: resume of a run that already finished with the same fingerprint.
        PipelineError: OUT cannot be created or written.
    """
    import json
    import posixpath

    from ..io import storage
    from .output import (
        acquire_output_lock,
        ensure_output_dir,
        prepare_output_dir,
        release_output_lock,
    )

    digest = fingerprint_digest(fingerprint) if fingerprint is not None else None
    resume = config.resume
    check_out_outside_slides(config.out_dir, slides)
    ensure_output_dir(config.out_dir)
    lock = acquire_output_lock(config.out_dir)
    try:
        staging = staging_dir(config)
        resumed = resume and _resumable(config, fingerprint, digest)
        prepare_output_dir(config)  # now that no other run can change OUT
        if not resumed:
            storage.rmtree(staging)
            storage.makedirs(staging)
        storage.write_text(posixpath.join(staging, RUN_FILE),
                           json.dumps({**lock, "fingerprint": fingerprint,
                                       "fingerprint_digest": digest}, default=str) + "\n")
        return resumed
    except BaseException:
        release_output_lock(config.out_dir, run_id=lock["run_id"])
        raise


def _resumable(config: OutputConfig, fingerprint: Mapping[str, Any] | None,
               digest: str | None) -> bool:
    """With resume (OUT locked by this run): True when OUT holds an interrupted run
    with this run's fingerprint, False when it holds none.

    Raises:
        OutputExistsError: an interrupted or finished run made with other settings.
        RunFinished: a finished run with this fingerprint.
    """
    from ..errors import OutputExistsError
    from ..io import storage
    from .output import existing_dataset

    run_file = _read_run_file(config)
    if run_file is not None or storage.isdir(staging_dir(config)):
        old = run_file or {}
        diff = fingerprint_diff(old.get("fingerprint") or {}, fingerprint or {})
        if "fingerprint" not in old or diff:
            shown = _shown(diff)
            raise OutputExistsError(
                f"Cannot resume the run in {config.out_dir!r}: it was started with "
                f"other settings ({shown or 'no fingerprint recorded'}). Rerun with "
                "the interrupted run's options and manifest, or pass --overwrite "
                "(instead of --resume) to discard it and start again.")
        return True
    finished = existing_dataset(config.out_dir)
    if finished is not None:
        params = finished.get("params", {})
        if params.get("run_fingerprint") == digest:
            raise RunFinished(config.out_dir, finished)
        recorded = params.get("fingerprint")
        diff = fingerprint_diff(recorded, fingerprint or {},
                                old_name="finished run") if isinstance(
                                    recorded, Mapping) else []
        raise OutputExistsError(
            f"Cannot resume in {config.out_dir!r}: it holds a finished SoftMix "
            "dataset made with other settings ("
            f"{_shown(diff) or 'options, seed, software or slides: not recorded'}"
            "). Rerun with its options and manifest to see it is finished, pass "
            "--overwrite to replace it, or choose another --out.")
    return False


class RunFinished(Exception):  # noqa: N818 - a signal, not an error
    """`--resume` of a run that already finished: nothing to do."""

    def __init__(self, out_dir: str, manifest: Mapping[str, Any]):
        super().__init__(f"The run in {out_dir!r} already finished "
                         f"({manifest.get('num_examples', '?')} examples); nothing to resume.")
        self.manifest = dict(manifest)


def _read_run_file(config: OutputConfig) -> dict[str, Any] | None:
    import posixpath

    from ..io import storage

    path = posixpath.join(staging_dir(config), RUN_FILE)
    try:
        return storage.read_json(path)
    except (FileNotFoundError, ValueError):
        return None


def write_staged_shard(config: OutputConfig, index: int, num_shards: int,
                       records: Iterable[tuple[str, bytes]]) -> ShardInfo:
    """Write shard `index` of `num_shards` into the staging folder (atomic, sorted)."""
    import posixpath

    from ..dataset.shards import shard_filename, write_shard

    path = posixpath.join(staging_dir(config), shard_filename(config.name, index, num_shards))
    try:
        return write_shard(path, records, compression=config.compression)
    except Exception as err:
        raise RuntimeError(f"failed to write shard {index} of {num_shards} for "
                           f"{config.out_dir!r}") from err


def _run_id(config: OutputConfig) -> str | None:
    run = _read_run_file(config)
    return run.get("run_id") if isinstance(run, dict) else None


def publish_output(config: OutputConfig, shards: Sequence[ShardInfo], num_shards: int,
                   accounting: Accounting,
                   class_names: Sequence[str], params: Mapping[str, Any], *,
                   stain: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write empty shards for indices no record went to, then publish by swap
    (`output.finalize_output`), remove the staging folder and release the lock.
    Returns the manifest (with `stain`, the manifest's ``"stain"`` entry).

    Raises:
        PipelineError: the run wrote no example (nothing moves; staging is kept), or
            the lock of OUT is no longer this run's.
    """
    import dataclasses

    from ..dataset.shards import shard_filename
    from ..errors import PipelineError
    from ..io import storage
    from .output import finalize_output, read_output_lock, release_output_lock

    by_index = {}
    for info in shards:
        for index in range(num_shards):
            if info.file == shard_filename(config.name, index, num_shards):
                by_index[index] = info
    if len(by_index) != len(shards):
        raise RuntimeError(f"Unexpected shard files {sorted(s.file for s in shards)} for "
                           f"{num_shards} shards; an engine wrote a shard twice.")
    run_id = _run_id(config)
    lock = read_output_lock(config.out_dir)
    if run_id is None or not lock or lock.get("run_id") != run_id:
        raise PipelineError(
            f"The lock of {config.out_dir!r} is not this run's any more (held: {lock}); "
            "another run took the directory over. Nothing was published; rerun with "
            "--overwrite once no other run writes there."
        )
    for index in range(num_shards):
        if index not in by_index:
            by_index[index] = write_staged_shard(config, index, num_shards, [])
    staging = staging_dir(config)
    from ..accounting import Accounting

    accounting = accounting + Accounting(
        output_requests=sum(getattr(s, "requests", 0) for s in by_index.values()),
        bytes_written=sum(getattr(s, "bytes_written", 0) for s in by_index.values()))
    config_with_count = dataclasses.replace(config, num_shards=num_shards)
    run_file = _read_run_file(config) or {}
    if isinstance(run_file.get("fingerprint"), Mapping):
        # What the run was made from, so that a later --resume can name a difference.
        params = {**params, "fingerprint": run_file["fingerprint"]}
    manifest = finalize_output(config_with_count, list(by_index.values()), accounting,
                               class_names, params, staged_dir=staging, stain=stain)
    storage.rmtree(staging)
    release_output_lock(config.out_dir, run_id=run_id)
    return manifest


# --- Progress and errors ------------------------------------------------------------------


def report_progress(directory: str | None, count: int) -> None:
    """Record `count` more examples mixed (workers append to a per-process file).

    Works on local output only; on remote storage progress is the runner's own UI.
    """
    import os

    if not directory or "://" in directory or not os.path.isdir(directory):
        return
    with open(os.path.join(directory, f"progress-{os.getpid()}"), "a") as handle:
        handle.write(f"{count}\n")


class progress_reporter:  # noqa: N801 - used as a context manager, reads like one
    """Show a tqdm counter of mixed examples while a local run is going."""

    def __init__(self, config: OutputConfig, *, enabled: bool = True, total: int | None = None):
        self._directory = staging_dir(config)
        self._out_dir = config.out_dir
        self._enabled = enabled and "://" not in self._directory
        self._total = total
        self._succeeded = False

    def _final_count(self) -> int:
        """The last count: the progress files, or, once a successful run has published
        (and removed its staging folder, progress files included), its manifest."""
        import json
        import os

        count = self._count()
        if self._succeeded:
            try:
                with open(os.path.join(self._out_dir, "manifest.json")) as handle:
                    count = max(count, int(json.load(handle)["num_examples"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return count

    def _count(self) -> int:
        import glob
        import os

        total = 0
        for path in glob.glob(os.path.join(self._directory, "progress-*")):
            try:
                with open(path) as handle:
                    total += sum(int(line) for line in handle if line.strip())
            except (OSError, ValueError):
                continue
        return total

    def _poll(self) -> None:
        import sys

        if not sys.stderr.isatty():
            self._poll_lines(sys.stderr)
            return
        from tqdm import tqdm

        with tqdm(total=self._total, desc="examples mixed", unit="ex") as bar:
            while not self._stop.wait(0.5):
                bar.update(max(0, self._count() - bar.n))
            bar.update(max(0, self._final_count() - bar.n))  # the last examples

    def _poll_lines(self, stream: Any, interval: float = 10.0) -> None:
        """Plain progress lines for logs and pipes (a tqdm bar redraws in place)."""
        import time

        def line(count: int) -> None:
            total = f"/{self._total}" if self._total else ""
            print(f"examples mixed: {count}{total}", file=stream, flush=True)

        shown = latest = 0
        last = time.monotonic()
        while not self._stop.wait(0.5):
            # max: the count reads 0 once published (the staging folder is gone).
            latest = max(latest, self._count())
            if latest != shown and time.monotonic() - last >= interval:
                line(latest)
                shown, last = latest, time.monotonic()
        latest = max(latest, self._final_count())
        if latest > shown:
            line(latest)

    def __enter__(self) -> progress_reporter:
        import threading

        if self._enabled:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled:
            self._succeeded = exc[0] is None
            self._stop.set()
            self._thread.join()


def reraise_pipeline_error(err: BaseException) -> None:
    """Re-raise the `PipelineError` behind an engine's wrapped worker error, if any.

    Beam and Dask wrap a worker's exception (sometimes only as text); the user should
    see the original message naming the slide or tile and the fix.
    """
    import re

    from ..errors import PipelineError

    seen = err
    while seen is not None:
        if isinstance(seen, PipelineError):
            if seen is err:
                raise err
            raise seen from err
        seen = seen.__cause__ or seen.__context__
    matches = re.findall(
        r"(?:SlideError|TileReadError|ManifestError|PipelineError|OutputExistsError): "
        r"([^\n]+)", str(err))
    if matches:
        raise PipelineError(matches[-1]) from err
