"""The output directory's life cycle and the manifest (the run's accounting is
`pipeline.accounting.Accounting`, re-exported here).

Output directory life cycle: a directory holds a SoftMix dataset only when its
``manifest.json`` says so (``"format": "softmix.dataset/1"``), and the dataset is exactly
the files that manifest lists under ``files`` (shards, TFDS metadata, ``preview.png``).
`prepare_output_dir` refuses an existing dataset unless overwrite is on, refuses an
unfinished run's staging folder unless overwrite is on, and refuses any other file
always; it deletes nothing. Runs take a lock file in OUT (`acquire_output_lock`), write
into a staging folder, and `finalize_output` publishes by swap: the new shards move in,
the TFDS metadata is written, the old dataset's files that the new one does not reuse
are removed, and ``manifest.json`` is written **last**, atomically. So an old dataset
survives every failed run, and a directory without ``manifest.json`` is an unfinished
run, which `pipeline.read_dataset` refuses.

TFDS: ``dataset_info.json`` and ``features.json`` are written by hand (TFDS is only a
dev dependency) so that ``tfds.builder_from_directory(OUT)`` loads the shards as split
``train``. TFDS's TFRecord reader does not take a compression type, so for GZIP runs
these two files are not written (the manifest says ``"tfds": false`` in `params`) and
only `pipeline.read_dataset` reads the shards.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..accounting import NO_PARTNER, PARTNER_FAILED, Accounting  # noqa: F401 - re-exported
from ..config import OutputConfig
from ..dataset.shards import TEMP_MARKER, ShardInfo, filepath_template, shard_filename
from ..errors import OutputExistsError, PipelineError
from ..io import storage
from ..io.names import recorded_name
from .tile_record import REPORT_FILES, publish_report_files

# The hidden folder inside OUT a run stages everything in (`job.prepare_output`).
STAGING_DIR = ".softmix.tmp-staging"

__all__ = [
    "DATASET_FORMAT",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "Accounting",
    "acquire_output_lock",
    "dataset_files",
    "finalize_output",
    "prepare_output_dir",
    "read_manifest",
    "release_output_lock",
    "software_versions",
]

MANIFEST_NAME = "manifest.json"
# The marker that makes a directory a SoftMix dataset (`manifest["format"]`).
DATASET_FORMAT = "softmix.dataset/1"
# Held by a run while it writes into OUT: {"pid", "host", "since", "run_id"}.
LOCK_NAME = ".softmix.lock"
# Written into the staging folder when a run fails after mixing (e.g. 0 examples): the
# would-be manifest, so the CLI can print the run's summary.
FAILED_RUN_NAME = "failed-run.json"
TFDS_FILES = ("dataset_info.json", "features.json")
# `softmix preview OUT` writes its contact sheet here; it belongs to the dataset.
PREVIEW_NAME = "preview.png"


def software_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the output (no heavy imports)."""
    versions = {"python": platform.python_version()}
    for label, dists in (
        ("softmix", ("softmix",)),
        ("tensorflow", ("tensorflow", "tensorflow-cpu")),
        ("numpy", ("numpy",)),
        ("zarr", ("zarr",)),
        ("ome-zarr", ("ome-zarr",)),
        ("apache-beam", ("apache-beam",)),
        ("dask", ("dask",)),
        ("distributed", ("distributed",)),
    ):
        for dist in dists:
            try:
                versions[label] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


# --- What a directory holds ---------------------------------------------------------------


def dataset_files(manifest: Mapping[str, Any], out_dir: str = ".") -> list[str]:
    """The files that belong to the dataset `manifest` describes (base names in OUT).

    The names are data read from disk, not authority: each must be a plain file name
    inside `out_dir` (`pipeline.io.names.recorded_name`), so that ``--overwrite``
    never removes anything outside OUT.

    Raises:
        RecordedNameError: an entry of ``files`` or ``shards`` is not a plain name
            (``../x``, an absolute path, a URL) or names the lock or staging folder.
    """
    record = posixpath.join(out_dir, MANIFEST_NAME)
    if "files" in manifest:
        names = manifest["files"]
        if not isinstance(names, list):
            names = [names]
    else:
        shards = manifest.get("shards", [])
        names = [s.get("file") if isinstance(s, Mapping) else s
                 for s in (shards if isinstance(shards, list) else [shards])]
        if manifest.get("params", {}).get("tfds", True):
            names += list(TFDS_FILES)
        names.append(PREVIEW_NAME)
    for entry in manifest.get("shards", []) if isinstance(manifest.get("shards"), list) else []:
        if isinstance(entry, Mapping):
            recorded_name(entry.get("file"), record=record, root=out_dir,
                          reserved=(LOCK_NAME, STAGING_DIR))
    return [recorded_name(name, record=record, root=out_dir,
                          reserved=(LOCK_NAME, STAGING_DIR)) for name in names]


def _load_json(path: str) -> Any:
    try:
        return storage.read_json(path)
    except (ValueError, OSError):
        return None


def existing_dataset(out_dir: str) -> dict[str, Any] | None:
    """The manifest of the SoftMix dataset in `out_dir`, or None when there is none.

    Only a ``manifest.json`` that carries the marker ``"format": "softmix.dataset/1"``
    makes a directory a SoftMix dataset.
    """
    manifest = _load_json(posixpath.join(out_dir, MANIFEST_NAME))
    if isinstance(manifest, dict) and manifest.get("format") == DATASET_FORMAT:
        return manifest
    return None


def _temp_of(name: str, targets: Iterable[str]) -> bool:
    """`name` is a leftover temporary file of an atomic write of one of `targets`."""
    return name.startswith(".") and any(name.startswith(f".{t}{TEMP_MARKER}") for t in targets)


def ensure_output_dir(out_dir: str) -> bool:
    """Create `out_dir` if missing; returns True when it was created.

    Raises:
        PipelineError: the path cannot be created (parent is a file, not writable).
        OutputExistsError: the path exists and is not a directory.
    """
    if storage.is_url(out_dir):  # object stores have no directories: a prefix
        try:
            if storage.listdir(out_dir):
                return False
            is_object = storage.exists(out_dir.rstrip("/"))
        except PipelineError:
            raise
        except OSError as err:
            raise PipelineError(
                f"Cannot reach output location {out_dir!r}: {err}. Check the bucket name, "
                "the credentials and --storage-options (endpoint_url...).") from None
        if is_object:
            raise OutputExistsError(f"Output path {out_dir!r} exists and is an object, not "
                                    "a prefix. Choose a directory path for --out.")
        bucket = out_dir.split("://", 1)[0] + "://" + out_dir.split("://", 1)[1].split("/")[0]
        if not storage.exists(bucket):
            raise PipelineError(
                f"Cannot write to {out_dir!r}: the bucket {bucket!r} does not exist or is "
                "not reachable with these credentials. Create it first, or check "
                "--storage-options (endpoint_url, credentials).")
        return True
    if not os.path.exists(out_dir):
        parent = posixpath.dirname(out_dir.rstrip("/"))
        if parent and os.path.exists(parent) and not os.path.isdir(parent):
            raise PipelineError(
                f"Cannot create output directory {out_dir!r}: its parent {parent!r} is a "
                "file, not a directory. Choose another --out."
            )
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as err:
            raise PipelineError(
                f"Cannot create output directory {out_dir!r}: "
                f"{err.strerror or err}. Choose a writable --out."
            ) from None
        return True
    if not os.path.isdir(out_dir):
        raise OutputExistsError(f"Output path {out_dir!r} exists and is not a directory. "
                                "Choose a directory path for --out.")
    return False


def prepare_output_dir(config: OutputConfig) -> dict[str, Any] | None:
    """Create `config.out_dir`, or check that a run may write into it. Deletes nothing.

    An old dataset is replaced only when the new run publishes (`finalize_output`), so
    it survives a failed run.

    Returns:
        The manifest of the SoftMix dataset the run will replace (overwrite), or None.

    Raises:
        OutputExistsError: the directory holds a dataset or an unfinished run's staging
            folder and `config.overwrite` is off, or it holds files that are not part
            of a SoftMix dataset (never deleted, even with overwrite).
        PipelineError: the path cannot be created or is not a directory.
    """
    out_dir = config.out_dir
    if ensure_output_dir(out_dir):
        return None
    names = storage.listdir(out_dir)  # one listing, whatever OUT holds
    manifest = existing_dataset(out_dir)
    ours = {LOCK_NAME, STAGING_DIR}
    if manifest is not None:
        ours.update(dataset_files(manifest, out_dir))  # refuses names outside OUT
        ours.add(MANIFEST_NAME)
    json_targets = (MANIFEST_NAME, PREVIEW_NAME, *TFDS_FILES)
    foreign = [n for n in names if n not in ours and not _temp_of(n, json_targets)]
    if foreign:
        hint = ""
        if MANIFEST_NAME in foreign:
            hint = (f" Its {MANIFEST_NAME} is not a SoftMix manifest (no 'format': "
                    f"'{DATASET_FORMAT}'), so nothing there is replaced.")
        raise OutputExistsError(
            f"Output directory {out_dir!r} holds files that are not part of a SoftMix "
            f"dataset: {foreign[:5]}{' ...' if len(foreign) > 5 else ''}.{hint} Choose an "
            "empty or new directory for --out (--overwrite only replaces the files a "
            "SoftMix manifest lists)."
        )
    resume = config.resume
    if STAGING_DIR in names and not (config.overwrite or resume):
        raise OutputExistsError(
            f"Output directory {out_dir!r} holds an unfinished SoftMix run (its staging "
            f"folder {posixpath.join(out_dir, STAGING_DIR)!r} is left from a run that "
            "failed or was interrupted). Pass --resume to continue it with the same "
            "options, or --overwrite to discard it and start again, or choose another --out."
        )
    if manifest is not None and not config.overwrite and not (resume and STAGING_DIR in names):
        raise OutputExistsError(
            f"Output directory {out_dir!r} already holds a finished SoftMix dataset "
            f"({manifest.get('num_examples', '?')} examples). Pass --overwrite to replace "
            "it (the old one stays until the new run succeeds), or choose another --out."
        )
    return manifest


# --- The output lock ----------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def read_output_lock(out_dir: str) -> dict[str, Any] | None:
    """The lock of the run writing into `out_dir` ({"pid", "host", "since", "run_id",
    "heartbeat", "lease_s"}); None when there is none, {} when it cannot be read."""
    path = posixpath.join(out_dir, LOCK_NAME)
    try:
        lock = storage.read_json(path)
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}
    return lock if isinstance(lock, dict) else {}


def lock_lease_s() -> float:
    """Seconds after its last heartbeat when a lock of another host counts as dead
    (``SOFTMIX_LOCK_LEASE_S``, default 120); the holder renews it every third of that."""
    try:
        return max(1.0, float(os.environ.get("SOFTMIX_LOCK_LEASE_S", "120")))
    except ValueError:
        return 120.0


def _lock_is_stale(lock: Mapping[str, Any]) -> bool:
    """A dead run's lock: its process is gone (this host), or its lease ran out."""
    if lock.get("host") == socket.gethostname():
        pid = lock.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or not _pid_alive(pid):
            return True
    beat = lock.get("heartbeat")
    if isinstance(beat, int | float):
        lease = float(lock.get("lease_s") or lock_lease_s())
        return time.time() - beat > lease
    return False  # an old lock without a heartbeat on another host: cannot tell


_heartbeats: dict[tuple[str, str], threading.Event] = {}


def _heartbeat(out_dir: str, lock: dict[str, Any], stop: threading.Event) -> None:
    """Renew `lock` every third of its lease until stopped or taken over."""
    path = posixpath.join(out_dir, LOCK_NAME)
    while not stop.wait(float(lock["lease_s"]) / 3):
        try:
            held = read_output_lock(out_dir)
            if not held or held.get("run_id") != lock["run_id"]:
                return  # released, or taken over after our lease ran out
            lock["heartbeat"] = time.time()
            storage.write_text(path, json.dumps(lock) + "\n")
        except Exception:  # noqa: BLE001 - a missed beat is retried; the lease allows two
            continue


def acquire_output_lock(out_dir: str) -> dict[str, Any]:
    """Take the lock file ``OUT/.softmix.lock`` for this process.

    The lock is created only if absent, atomically: ``O_EXCL`` on a disk, the store's
    precondition on a bucket (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``),
    so of two runs racing for one OUT exactly one wins. The holder renews a heartbeat
    in it every third of the lease (`lock_lease_s`); the lock of a dead run (its
    process is gone, on this host; or its heartbeat is older than the lease) is
    taken over.

    Returns:
        The lock's content, with a fresh ``run_id``.

    Raises:
        OutputExistsError: another live run holds the lock (named: pid, host, since).
        PipelineError: the directory is not writable.
    """
    lease = lock_lease_s()
    lock = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "run_id": uuid.uuid4().hex,
        "heartbeat": time.time(),
        "lease_s": lease,
    }
    path = posixpath.join(out_dir, LOCK_NAME)
    for _ in range(3):
        try:
            storage.create_exclusive(path, (json.dumps(lock) + "\n").encode())
            stop = threading.Event()
            _heartbeats[(out_dir, lock["run_id"])] = stop
            threading.Thread(target=_heartbeat, args=(out_dir, dict(lock), stop),
                             daemon=True, name="softmix-lock-heartbeat").start()
            return lock
        except FileExistsError:
            held = read_output_lock(out_dir)
            if held is None:
                continue  # released meanwhile
            if not held:  # unreadable: a writer died between create and write
                age = _lock_age(path)
                if age is not None and age < lease:
                    raise OutputExistsError(
                        f"Another run is starting here: {out_dir!r} holds a lock being "
                        f"written ({path!r}). Wait for it or choose another --out; if no "
                        f"run is writing there, delete {path!r}.") from None
            elif not _lock_is_stale(held):
                raise OutputExistsError(
                    f"Another run is writing here: {out_dir!r} is locked by pid "
                    f"{held.get('pid')} on host {held.get('host')!r} since "
                    f"{held.get('since')} (run {held.get('run_id')}). Wait for it to "
                    "finish or choose another --out; if no such run exists, delete "
                    f"{path!r} (or wait {lease:.0f} s for its lease to run out)."
                ) from None
            # Take a dead run's lock over: remove it only if it is still the one we
            # judged (another taker may have replaced it meanwhile), then create ours.
            again = read_output_lock(out_dir)
            if again is not None and again.get("run_id") == held.get("run_id"):
                storage.remove(path)
        except PermissionError as err:
            raise PipelineError(
                f"Output directory {out_dir!r} is not writable ({err}). "
                "Choose a writable --out."
            ) from None
    raise OutputExistsError(f"Could not take the lock {path!r}; retry, or delete it if no "
                            "run is writing into the directory.")


def _lock_age(path: str) -> float | None:
    mtime = storage.modified(path)
    return None if mtime is None else time.time() - mtime


def release_output_lock(out_dir: str, *, run_id: str | None = None,
                        pid: int | None = None) -> bool:
    """Remove the lock of `out_dir` if it is this run's (same `run_id`, or same `pid`
    on this host). Returns whether a lock was removed."""
    held = read_output_lock(out_dir)
    if not held:
        return False
    if run_id is not None and held.get("run_id") != run_id:
        return False
    if pid is not None and (held.get("pid") != pid or held.get("host") != socket.gethostname()):
        return False
    stop = _heartbeats.pop((out_dir, held.get("run_id")), None)
    if stop is not None:
        stop.set()
    return storage.remove(posixpath.join(out_dir, LOCK_NAME))


# --- Manifest and TFDS metadata -----------------------------------------------------------


def _write_json_atomic(path: str, payload: Any) -> None:
    """Local: temporary name + rename; store: one upload (see `storage.write_bytes`)."""
    # allow_nan=False: NaN / Infinity are not JSON; a value like that is a bug upstream.
    # Serialised before anything is opened, so an error leaves no temporary behind.
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    storage.write_text(path, text)


def _tensor(dtype: str, dims: Sequence[int] = ()) -> dict[str, Any]:
    shape: dict[str, Any] = {"dimensions": [str(d) for d in dims]} if dims else {}
    return {
        "pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
        "tensor": {"dtype": dtype, "encoding": "none", "shape": shape},
    }


def _image(shape: Sequence[int], dtype: str) -> dict[str, Any]:
    return {
        "pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
        "image": {"dtype": dtype, "encodingFormat": "png",
                  "shape": {"dimensions": [str(d) for d in shape]}},
    }


def _features_dict(features: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "featuresDict": {"features": dict(sorted(features.items()))},
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
    }


def tfds_features(num_classes: int, image: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """TFDS ``features.json`` of the example schema (nested dicts flatten to ``a/x``...).

    Args:
        num_classes: K.
        image: the manifest's ``image`` entry (``shape``, ``dtype``, ``format``). When
            the images are PNG, ``image/encoded`` is a TFDS `Image` feature, so TFDS
            yields decoded pixels (``record["image"]["encoded"]``: [H, W, C]); raw
            images stay encoded bytes (decode them with `pipeline.read_dataset`).
    """
    from ..dataset.schema import FIELDS, field_shape

    tree: dict[str, Any] = {}
    for key, (dtype, _) in FIELDS.items():
        *groups, leaf = key.split("/")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = _tensor(dtype, field_shape(key, num_classes))
    if image is not None and image.get("format") == "png":
        tree["image"]["encoded"] = _image(image["shape"], image["dtype"])

    def nest(node: Mapping[str, Any]) -> dict[str, Any]:
        return _features_dict({k: nest(v) if "pythonClassName" not in v else v
                               for k, v in node.items()})

    return nest(tree)


def tfds_dataset_info(name: str, shards: Sequence[ShardInfo], description: str = ""
                      ) -> dict[str, Any]:
    """TFDS ``dataset_info.json``: one split ``train`` over the shards, TFDS naming."""
    return {
        "description": description or "SoftMix-augmented tiles (see manifest.json).",
        "fileFormat": "tfrecord",
        "name": name,
        "splits": [{
            "filepathTemplate": filepath_template(name),
            "name": "train",
            "numBytes": str(sum(s.num_bytes for s in shards)),
            "shardLengths": [str(s.num_examples) for s in shards],
        }],
        "version": "1.0.0",
    }


def _first_image(directory: str, shards: Sequence[ShardInfo], compression: str | None
                 ) -> dict[str, Any] | None:
    """Shape, dtype and format of the run's images: as the first non-empty shard's
    writer found them (`ShardInfo.image`), else read from that shard here."""
    from ..dataset.shards import first_image

    for info in shards:
        if info.num_examples <= 0:
            continue
        if info.image is not None:
            return info.image
        found = first_image(posixpath.join(directory, info.file), compression)
        if found is not None:
            return found
    return None


def failure_reasons(accounting: Accounting) -> str:
    """Why a run wrote nothing, in one line (from its accounting)."""
    parts = []
    if accounting.slides_failed:
        by_reason: dict[str, int] = {}
        for reason in accounting.slides_failed.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        counts = ", ".join(f"{r}: {n}" for r, n in sorted(by_reason.items()))
        first = sorted(accounting.slides_failed_messages.items())[:1]
        example = f"; first: {first[0][1]}" if first else ""
        parts.append(f"{len(accounting.slides_failed)} slide(s) failed ({counts}{example})")
    if accounting.tiles_skipped:
        parts.append("tiles skipped: " + ", ".join(
            f"{r} {n}" for r, n in sorted(accounting.tiles_skipped.items())))
    if accounting.examples_dropped:
        parts.append("examples dropped: " + ", ".join(
            f"{r} {n}" for r, n in sorted(accounting.examples_dropped.items())))
    if not parts:
        parts.append(f"{accounting.tiles_total} tiles found")
    return "; ".join(parts).replace("\n", " ")


def finalize_output(
    config: OutputConfig,
    shards: Sequence[ShardInfo],
    accounting: Accounting,
    class_names: Sequence[str],
    params: Mapping[str, Any],
    *,
    description: str = "",
    staged_dir: str | None = None,
    stain: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check the run, then publish it: shards, TFDS metadata, ``manifest.json`` last.

    With `staged_dir`, the shards are moved from there into OUT. The old dataset in
    OUT (the files its manifest lists) is replaced: its manifest is removed first (so
    OUT reads as unfinished while files move), then its files that the new dataset
    does not reuse; no other file is touched.

    Args:
        config: the run's `OutputConfig`.
        shards: every shard written, one per index 0..N-1 (any order).
        accounting: the merged accounting of the whole run.
        class_names: the run's class names (K = len).
        params: every option of the run (flat or nested JSON-able values); output
            options and software versions (``params["versions"]``) are added.
        description: free text for ``dataset_info.json``.
        staged_dir: where the shards are (default: OUT itself).
        stain: the run's stain normalisation (`stain.StainSpec.manifest_section`:
            method, target fit, target source, per-slide fits), written as the
            manifest's ``"stain"``; None without normalisation.

    Returns:
        The manifest, as written.

    Raises:
        RuntimeError: missing shards, or counts that do not add up.
        PipelineError: the run wrote no example (nothing is published; with
            `staged_dir`, its would-be manifest is kept there as ``failed-run.json``).
        RecordedNameError: the old manifest lists a name outside OUT (nothing moves).
    """
    out_dir = config.out_dir
    old = existing_dataset(out_dir)
    # Checked before anything else: a bad name in the old manifest refuses the publish.
    old_files = dataset_files(old, out_dir) if old is not None else []
    ordered, expected, num_examples = _checked_shards(config, shards, accounting)
    tfds_files = list(TFDS_FILES) if config.compression is None else []
    manifest = _manifest(config, ordered, expected, tfds_files, accounting, class_names,
                         params, staged_dir or out_dir, stain)
    if num_examples == 0:
        if staged_dir is not None:
            _write_json_atomic(posixpath.join(staged_dir, FAILED_RUN_NAME), manifest)
        raise PipelineError(
            f"no examples written: {failure_reasons(accounting)}. Nothing was published "
            f"in {out_dir!r}; fix the inputs or options (see the summary) and rerun."
        )
    _swap_in(config, ordered, expected, tfds_files, old, old_files, manifest, class_names,
             description=description, staged_dir=staged_dir)
    publish_report_files(out_dir, staged_dir)
    _write_json_atomic(posixpath.join(out_dir, MANIFEST_NAME), manifest)
    return manifest


def _checked_shards(config: OutputConfig, shards: Sequence[ShardInfo], accounting: Accounting
                    ) -> tuple[list[ShardInfo], list[str], int]:
    """The shards in index order, their expected file names and example count, after
    checking there is one per index and that the accounting adds up to them."""
    ordered = sorted(shards, key=lambda s: s.file)
    num_shards = len(ordered)
    expected = [shard_filename(config.name, i, num_shards) for i in range(num_shards)]
    wanted = config.num_shards if config.num_shards is not None else max(num_shards, 1)
    if num_shards != wanted or [s.file for s in ordered] != expected:
        raise RuntimeError(
            f"Shards must be the {wanted} files {config.name}-00000-of-{wanted:05d}.tfrecord... "
            f"Received: {[s.file for s in ordered][:5]}."
        )
    accounting.check()
    num_examples = sum(s.num_examples for s in ordered)
    if accounting.examples_written != num_examples:
        raise RuntimeError(
            f"The shards hold {num_examples} examples but the accounting counted "
            f"{accounting.examples_written} written. An engine lost or duplicated records."
        )
    return ordered, expected, num_examples


def _manifest(config: OutputConfig, ordered: Sequence[ShardInfo], expected: Sequence[str],
              tfds_files: Sequence[str], accounting: Accounting, class_names: Sequence[str],
              params: Mapping[str, Any], source_dir: str,
              stain: Mapping[str, Any] | None) -> dict[str, Any]:
    """The dataset's ``manifest.json`` (`params` with the output options and software
    versions added; the image spec read from the first non-empty shard in `source_dir`)."""
    num_shards = len(ordered)
    num_examples = sum(s.num_examples for s in ordered)
    all_params = dict(params)
    all_params.update({
        "name": config.name,
        "num_shards": num_shards,
        "compression": config.compression,
        "shard_size_mb": config.shard_size_mb,
        "on_error": config.on_error,
        "tfds": config.compression is None,
        "versions": software_versions(),
    })
    warnings = []
    empty = sum(1 for s in ordered if s.num_examples == 0)
    if num_examples and num_shards > num_examples:
        warnings.append(
            f"{num_shards} shards for {num_examples} examples: {empty} shard(s) are empty. "
            f"Use --num-shards {num_examples} or less, or leave it unset.")
    manifest = {
        "format": DATASET_FORMAT,
        "num_examples": num_examples,
        "class_names": list(class_names),
        "shards": [{"file": s.file, "num_examples": s.num_examples} for s in ordered],
        "files": [*expected, *tfds_files, PREVIEW_NAME, *REPORT_FILES],
        "image": _first_image(source_dir, ordered, config.compression),
        "params": all_params,
        "accounting": accounting.to_dict(len(class_names)),
        "warnings": warnings,
    }
    if stain is not None:
        manifest["stain"] = dict(stain)
    return manifest


def _swap_in(config: OutputConfig, ordered: Sequence[ShardInfo], expected: Sequence[str],
             tfds_files: Sequence[str], old: Mapping[str, Any] | None,
             old_files: Sequence[str], manifest: Mapping[str, Any],
             class_names: Sequence[str], *, description: str,
             staged_dir: str | None) -> None:
    """Replace the old dataset by the new one, manifest aside: the old manifest goes
    first, then the shards move in, TFDS metadata is written and the old dataset's
    files the new one does not reuse are removed."""
    out_dir = config.out_dir
    if old is not None:  # first, so that OUT reads as unfinished while files move
        storage.remove(posixpath.join(out_dir, MANIFEST_NAME))
    if staged_dir is not None:  # a rename on a disk, a server-side copy on a store
        for info in ordered:
            storage.move(posixpath.join(staged_dir, info.file),
                         posixpath.join(out_dir, info.file))
    if tfds_files:
        _write_json_atomic(posixpath.join(out_dir, "features.json"),
                           tfds_features(len(class_names), manifest["image"]))
        _write_json_atomic(posixpath.join(out_dir, "dataset_info.json"),
                           tfds_dataset_info(config.name, ordered, description))
    if old is not None:
        keep = set(expected) | set(tfds_files) | set(REPORT_FILES)
        for name in old_files:
            path = posixpath.join(out_dir, name)
            if name not in keep and name != MANIFEST_NAME:
                storage.remove(path)


def read_manifest(out_dir: str) -> dict[str, Any]:
    """Load ``OUT/manifest.json``.

    Raises:
        PipelineError: no manifest (an unfinished run, or not a SoftMix directory).
        RecordedNameError: it lists a shard or file that is not a plain name in OUT.
    """
    path = posixpath.join(out_dir, MANIFEST_NAME)
    try:
        manifest = storage.read_json(path)
    except FileNotFoundError:
        raise PipelineError(
            f"No {MANIFEST_NAME} in {out_dir!r}: the run that writes it has not finished "
            "(the manifest is written last), or this is not a SoftMix output directory. "
            "Rerun the job with --overwrite, or point at a finished output directory."
        ) from None
    if isinstance(manifest, dict):
        dataset_files(manifest, out_dir)  # shards are read by name: plain names only
    return manifest
