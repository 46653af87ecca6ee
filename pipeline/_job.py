"""Engine-independent steps of one offline run, shared by the Beam and Dask adapters.

Beam (`beam_transforms`) and Dask (`dask_transforms`) only decide *where* the steps of
`_stages` run; this module holds what surrounds them: the run's parameters, the output
directory's life cycle (staging, publishing), progress and error reporting.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .config import JobConfig

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
        "mix": dataclasses.asdict(job.mix),
        "output": dataclasses.asdict(job.output),
    }
    params["mix"]["grid"] = list(job.mix.grid)
    params.update(extra)
    return params  # `_output.finalize_output` adds the software versions


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
    for slide_id, reason in sorted(acc["slides_failed"].items()):
        lines.append(f"{'slide failed: ' + slide_id:<28}{reason:>10}")
    hist = acc.get("class_histogram")
    if hist:
        for name, weight in zip(manifest["class_names"], hist, strict=True):
            lines.append(f"{'label mass: ' + name:<28}{weight:>10.1f}")
    return "\n".join(lines)


def exit_status(manifest: Mapping[str, Any]) -> int:
    """0 when the run finished; with `--on-error skip` failures are counted, not fatal."""
    return 0


# --- Output life cycle shared by both engines -------------------------------------------
#
# Shards are written into a hidden staging folder inside OUT and moved into place only
# after every shard exists; manifest.json is written last. A crashed run therefore
# leaves no file under a finished-looking name.

STAGING_DIR = ".softmix.tmp-staging"


def staging_dir(config: Any) -> str:
    import posixpath

    return posixpath.join(config.out_dir, STAGING_DIR)


def prepare_output(config: Any) -> None:
    """Refuse or clear an existing dataset (see `_output.prepare_output_dir`), then stage."""
    import tensorflow as tf

    from ._output import prepare_output_dir

    staging = staging_dir(config)
    if config.overwrite and tf.io.gfile.exists(staging):
        tf.io.gfile.rmtree(staging)
    prepare_output_dir(config)
    tf.io.gfile.makedirs(staging)


def write_staged_shard(config: Any, index: int, num_shards: int,
                       records: Iterable[tuple[str, bytes]]) -> Any:
    """Write shard `index` of `num_shards` into the staging folder (atomic, sorted)."""
    import posixpath

    from ._sharding import shard_filename, write_shard

    path = posixpath.join(staging_dir(config), shard_filename(config.name, index, num_shards))
    try:
        return write_shard(path, records, compression=config.compression)
    except Exception as err:
        raise RuntimeError(f"failed to write shard {index} of {num_shards} for "
                           f"{config.out_dir!r}") from err


def publish_output(config: Any, shards: Sequence[Any], num_shards: int, accounting: Any,
                   class_names: Sequence[str], params: Mapping[str, Any]) -> dict[str, Any]:
    """Write empty shards for indices no record went to, move all into OUT, then the
    manifest (last). Returns the manifest."""
    import dataclasses
    import posixpath

    import tensorflow as tf

    from ._output import finalize_output
    from ._sharding import shard_filename

    by_index = {}
    for info in shards:
        for index in range(num_shards):
            if info.file == shard_filename(config.name, index, num_shards):
                by_index[index] = info
    if len(by_index) != len(shards):
        raise RuntimeError(f"Unexpected shard files {sorted(s.file for s in shards)} for "
                           f"{num_shards} shards; an engine wrote a shard twice.")
    for index in range(num_shards):
        if index not in by_index:
            by_index[index] = write_staged_shard(config, index, num_shards, [])
    staging = staging_dir(config)
    for info in by_index.values():
        tf.io.gfile.rename(posixpath.join(staging, info.file),
                           posixpath.join(config.out_dir, info.file), overwrite=True)
    tf.io.gfile.rmtree(staging)
    config_with_count = dataclasses.replace(config, num_shards=num_shards)
    return finalize_output(config_with_count, list(by_index.values()), accounting,
                           class_names, params)


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

    def __init__(self, config: Any, *, enabled: bool = True, total: int | None = None):
        self._directory = staging_dir(config)
        self._enabled = enabled and "://" not in self._directory
        self._total = total

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
        from tqdm import tqdm

        with tqdm(total=self._total, desc="examples mixed", unit="ex") as bar:
            while not self._stop.wait(0.5):
                bar.update(max(0, self._count() - bar.n))
            bar.update(max(0, self._count() - bar.n))  # the last examples, before closing

    def __enter__(self) -> progress_reporter:
        import threading

        if self._enabled:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._enabled:
            self._stop.set()
            self._thread.join()


def reraise_pipeline_error(err: BaseException) -> None:
    """Re-raise the `PipelineError` behind an engine's wrapped worker error, if any.

    Beam and Dask wrap a worker's exception (sometimes only as text); the user should
    see the original message naming the slide or tile and the fix.
    """
    import re

    from .errors import PipelineError

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
