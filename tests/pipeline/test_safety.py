"""Safety and first-run behaviour of the CLI and the output life cycle (issue 12).

Every test runs the real CLI (`pipeline.cli.main` in process, or `python -m pipeline` in
a subprocess) on real files: no mocks.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from pipeline.cli import main
from pipeline.config import OutputConfig, TileConfig
from pipeline.dataset.reader import read_dataset
from pipeline.dataset.shards import shard_filename, write_shard
from pipeline.errors import PipelineError
from pipeline.io.manifest import load_slide_manifest
from pipeline.run import job as _job
from pipeline.run.output import LOCK_NAME, Accounting, finalize_output, read_manifest

from .test_output import CLASS_NAMES, mixed, write_dataset

REPO = pathlib.Path(__file__).resolve().parents[2]
STAGING = ".softmix.tmp-staging"


def _args(dataset, out, *extra):
    manifest = getattr(dataset, "manifest_path", dataset)
    return ["beam", "--manifest", str(manifest), "--out", str(out),
            "--tile-size", "128", "--no-progress", *extra]


def _manifest_copy(dataset, path, keep=lambda row: True, extra=()):
    """A copy of the synthetic manifest at `path` (absolute slide paths), filtered."""
    header, *rows = dataset.manifest_path.read_text().splitlines()
    rows = [r.replace(",slides/", f",{dataset.root}/slides/") for r in rows if keep(r)]
    path.write_text("\n".join([header, *rows, *extra]) + "\n")
    return path


def _run(capsys, argv):
    """(exit status, stdout, stderr) of `softmix argv` run in this process."""
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def _subprocess(argv, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in pathlib.Path(directory).iterdir() if p.is_file()}


# --- Flags checked up front (exit status 2) ------------------------------------------------

@pytest.mark.parametrize("command,flag,value", [
    ("dask", "--workers", "0"), ("dask", "--workers", "-1"), ("beam", "--workers", "0"),
    ("dask", "--threads-per-worker", "0"), ("beam", "--num-shards", "0"),
])
def test_non_positive_counts_are_usage_errors(capsys, tmp_path, command, flag, value):
    rc, _, err = _run(capsys, [command, "--manifest", "m.csv", "--out", str(tmp_path / "o"),
                               flag, value])
    assert rc == 2
    assert f"argument {flag}: must be >= 1" in err
    assert not (tmp_path / "o").exists()


def test_misspelled_flags_are_errors_naming_the_closest(capsys, tmp_path):
    base = ["--manifest", "m.csv", "--out", str(tmp_path / "o")]
    rc, _, err = _run(capsys, ["beam", *base, "--min_tisue", "0.9"])
    assert rc == 2 and "--min_tisue (did you mean --min-tissue?)" in err
    rc, _, err = _run(capsys, ["beam", *base, "--tile-szie", "128"])
    assert rc == 2 and "--tile-szie (did you mean --tile-size?)" in err
    rc, _, err = _run(capsys, ["beam", *base, "--temp_locaton=gs://b/tmp"])
    assert rc == 2 and "did you mean --temp_location?" in err
    rc, _, err = _run(capsys, ["dask", *base, "--min-tisue", "0.9"])
    assert rc == 2 and "did you mean --min-tissue?" in err
    assert not (tmp_path / "o").exists()


def test_beam_options_still_pass_through(capsys, synthetic_dataset, tmp_path):
    rc, out, err = _run(capsys, _args(synthetic_dataset, tmp_path / "o",
                                      "--direct_running_mode=in_memory",
                                      "--experiments", "beam_fn_api"))
    assert rc == 0, err
    assert "examples written" in out


def test_memory_limit_and_preview_num_are_checked(capsys, tmp_path):
    rc, _, err = _run(capsys, ["dask", "--manifest", "m.csv", "--out", str(tmp_path / "o"),
                               "--memory-limit", "banana"])
    assert rc == 2 and "--memory-limit" in err and "banana" in err
    rc, _, err = _run(capsys, ["preview", str(tmp_path), "--num", "0"])
    assert rc == 2 and "--num" in err


def test_tissue_mode_flag(capsys, tmp_path):
    from pipeline.cli import build_parser, job_config_from_args

    args = build_parser().parse_args(["beam", "--manifest", "m.csv", "--out", "o",
                                      "--tissue-mode", "darkness"])
    assert job_config_from_args(args).tile.tissue_mode == "darkness"
    rc, _, err = _run(capsys, ["beam", "--manifest", "m.csv", "--out", "o",
                               "--tissue-mode", "dark"])
    assert rc == 2 and "--tissue-mode" in err
    with pytest.raises(ValueError, match="tissue_mode"):
        TileConfig(tissue_mode="dark")


def test_stride_far_below_tile_size_warns(capsys, tmp_path):
    rc, _, err = _run(capsys, ["beam", "--manifest", str(tmp_path / "missing.csv"),
                               "--out", str(tmp_path / "o"), "--stride", "1"])
    assert rc == 1
    assert "softmix: warning: `stride` 1 is far below the tile size 256" in err
    assert TileConfig(tile_size=256, stride=64).warnings() == []


# --- Clean one-line errors (exit status 1) -------------------------------------------------

def _error_lines(err):
    return [line for line in err.splitlines() if line.strip()]


def test_out_under_a_file_is_a_clean_error(capsys, synthetic_dataset, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, _, err = _run(capsys, _args(synthetic_dataset, tmp_path / "file" / "out"))
    assert rc == 1
    assert "Traceback" not in err
    assert _error_lines(err)[-1].startswith("softmix: error: Cannot create output directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_not_writable_is_a_clean_error(capsys, synthetic_dataset, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        rc, _, err = _run(capsys, _args(synthetic_dataset, locked))
    finally:
        locked.chmod(0o700)
    assert rc == 1 and "not writable" in err and "Traceback" not in err


def test_cross_class_pairing_with_one_class_is_one_line(capsys, synthetic_dataset, tmp_path):
    one = _manifest_copy(synthetic_dataset, tmp_path / "one.csv", lambda r: ",he," in r)
    rc, _, err = _run(capsys, _args(one, tmp_path / "o", "--pairing", "cross-class"))
    assert rc == 1
    assert "Traceback" not in err
    assert _error_lines(err)[-1].startswith("softmix: error: `pairing='cross-class'` needs")


def test_disk_full_names_the_cause(synthetic_dataset, tmp_path):
    """A file size limit makes writes fail with EFBIG, as a full disk fails with ENOSPC."""
    limit = 64 * 1024

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _subprocess(_args(synthetic_dataset, tmp_path / "o", "--num-mixes", "4"),
                       preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr
    last = _error_lines(proc.stderr)[-1]
    assert last.startswith("softmix: error:") and "File too large" in last, proc.stderr
    assert "Traceback" not in proc.stderr


def _beam_workers(pid):
    import psutil

    try:
        return [c for c in psutil.Process(pid).children(recursive=True)
                if "sdk_worker_main" in " ".join(c.cmdline())]
    except psutil.Error:
        return []


@pytest.mark.parametrize("workers,delay", [("1", 0.0), ("2", 0.3)])
def test_sigint_keeps_staging_and_exits_130(synthetic_dataset, tmp_path, workers, delay):
    """Ctrl-C (SIGINT to the whole process group, Beam's worker processes included)
    while planning, or once the 2 workers run: one line, exit status 130, staging kept,
    lock released (issue 15: ~130 lines of worker tracebacks, or rc 1)."""
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline",
         *_args(synthetic_dataset, out, "--num-mixes", "40", "--workers", workers)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    deadline = time.monotonic() + 240  # a loaded machine starts slowly
    while not (out / STAGING / "run.json").exists() and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    while workers != "1" and not _beam_workers(proc.pid) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert err.splitlines() == [
        f"softmix: interrupted; staging kept in {out / STAGING} (rerun the same command "
        "with --resume to continue)"]
    assert (out / STAGING).is_dir() and not (out / "manifest.json").exists()
    assert not (out / LOCK_NAME).exists()  # released: the next run needs only --overwrite
    assert "--overwrite" in _subprocess(_args(synthetic_dataset, out)).stderr


def test_first_run_prints_no_library_noise(synthetic_dataset, tmp_path):
    proc = _subprocess(["beam", "--manifest", str(synthetic_dataset.manifest_path), "--out",
                        str(tmp_path / "o"), "--tile-size", "128", "--workers", "2"])
    assert proc.returncode == 0, proc.stderr
    # Not a terminal: plain progress lines, no tqdm redraws, no banners or warnings.
    assert proc.stderr.splitlines() == [f"examples mixed: {synthetic_dataset.total_tiles}"]
    assert "examples written" in proc.stdout


# --- Runs that write nothing fail -------------------------------------------------------------

def test_zero_examples_is_a_failed_run_and_old_dataset_survives(capsys, synthetic_dataset,
                                                                tmp_path):
    out = tmp_path / "o"
    assert _run(capsys, _args(synthetic_dataset, out))[0] == 0
    before = _snapshot(out)
    assert json.loads(before["manifest.json"])["format"] == "softmix.dataset/1"
    bad = tmp_path / "missing.csv"
    bad.write_text("slide_id,path,label\nx1,nope1.zarr,he\nx2,nope2.zarr,ihc\n")
    rc, stdout, err = _run(capsys, ["beam", "--manifest", str(bad), "--out", str(out),
                                    "--tile-size", "128", "--no-progress", "--overwrite"])
    assert rc == 1
    assert _error_lines(err)[-1].startswith("softmix: error: no examples written: 2 slide(s) "
                                            "failed (missing: 2")
    assert "examples written                     0" in stdout  # the summary, with reasons
    assert "slide failed: x1" in stdout and "nope1.zarr does not exist" in stdout
    assert _snapshot(out) == before  # the old dataset is untouched
    assert (out / STAGING / "failed-run.json").exists()  # staging kept as it was
    assert not (out / LOCK_NAME).exists()
    # The kept staging folder blocks a plain rerun, with the fix in the message.
    rc, _, err = _run(capsys, _args(synthetic_dataset, out))
    assert rc == 1 and "unfinished" in err and "--overwrite" in err
    assert _job.exit_status({"num_examples": 0}) == 1
    assert _job.exit_status(read_manifest(str(out))) == 0


def test_skip_mode_keeps_each_failed_slides_message(capsys, synthetic_dataset, tmp_path):
    manifest = _manifest_copy(synthetic_dataset, tmp_path / "m.csv",
                              extra=["gone,nowhere.zarr,he,p9"])
    rc, _, err = _run(capsys, ["beam", "--manifest", str(manifest), "--out",
                               str(tmp_path / "o"), "--tile-size", "128", "--no-progress"])
    assert rc == 0, err
    acc = read_manifest(str(tmp_path / "o"))["accounting"]
    assert acc["slides_failed"] == {"gone": "missing"}
    assert "nowhere.zarr does not exist" in acc["slides_failed_messages"]["gone"]


# --- --overwrite replaces only what is ours -------------------------------------------------

def test_overwrite_keeps_other_datasets_files(capsys, synthetic_dataset, tmp_path):
    out = tmp_path / "o"
    assert _run(capsys, _args(synthetic_dataset, out, "--name", "first"))[0] == 0
    assert (out / "first-00000-of-00001.tfrecord").exists()
    (out / "preview.png").write_bytes(b"old preview")
    # A file named like a shard that no SoftMix manifest lists is not ours: refused.
    (out / "other-00000-of-00001.tfrecord").write_bytes(b"someone else's")
    rc, _, err = _run(capsys, _args(synthetic_dataset, out, "--name", "second",
                                    "--overwrite"))
    assert rc == 1 and "other-00000-of-00001.tfrecord" in err
    assert (out / "other-00000-of-00001.tfrecord").read_bytes() == b"someone else's"
    (out / "other-00000-of-00001.tfrecord").unlink()
    rc, _, err = _run(capsys, _args(synthetic_dataset, out, "--name", "second",
                                    "--overwrite", "--num-shards", "2"))
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset_info.json", "features.json", "manifest.json", "report", "report.html",
        "second-00000-of-00002.tfrecord", "second-00001-of-00002.tfrecord"]


def test_a_foreign_manifest_is_never_replaced(capsys, synthetic_dataset, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text('{"shards": []}')
    (out / "features.json").write_text("{}")
    rc, _, err = _run(capsys, _args(synthetic_dataset, out, "--overwrite"))
    assert rc == 1 and "not a SoftMix manifest" in err
    assert (out / "manifest.json").read_text() == '{"shards": []}'


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_lock_refuses_a_live_run_and_takes_over_a_dead_one(capsys, synthetic_dataset,
                                                          tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    live = _sleeper()
    try:
        lock = {"pid": live.pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00",
                "run_id": "x"}
        (out / LOCK_NAME).write_text(json.dumps(lock))
        (out / STAGING).mkdir()  # the live run's staging: never deleted, even by overwrite
        rc, _, err = _run(capsys, _args(synthetic_dataset, out, "--overwrite"))
        assert rc == 1
        assert ("another run is writing here" in err.lower()
                and f"pid {live.pid}" in err and "since 2026-01-01T00:00:00" in err)
        assert (out / STAGING).is_dir() and (out / LOCK_NAME).exists()
    finally:
        live.kill()
        live.wait()
    # Its pid is dead now: a stale lock on this host is taken over.
    rc, _, err = _run(capsys, _args(synthetic_dataset, out, "--overwrite"))
    assert rc == 0, err
    assert not (out / LOCK_NAME).exists() and not (out / STAGING).exists()


def test_publish_refuses_when_the_lock_was_taken_over(tmp_path):
    config = OutputConfig(out_dir=str(tmp_path / "o"), num_shards=1)
    _job.prepare_output(config)
    # This process holds the lock: another process is refused.
    other = subprocess.run(
        [sys.executable, "-c", "from pipeline.run import job as _job; from pipeline.config import "
         f"OutputConfig; _job.prepare_output(OutputConfig(out_dir={config.out_dir!r}))"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
        text=True, timeout=120)
    assert other.returncode != 0 and "Another run is writing here" in other.stderr
    (tmp_path / "o" / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere",
                                                        "run_id": "theirs"}))
    info = _job.write_staged_shard(config, 0, 1, [("a", b"x")])
    with pytest.raises(PipelineError, match="not this run's"):
        _job.publish_output(config, [info], 1, Accounting(), CLASS_NAMES, {})
    assert not (tmp_path / "o" / "manifest.json").exists()


# --- Reading back ----------------------------------------------------------------------------

def test_reader_names_a_truncated_or_miscounted_shard(tmp_path):
    out = tmp_path / "o"
    write_dataset(out, [mixed(i) for i in range(12)], num_shards=2)
    shard = out / shard_filename("softmix", 1, 2)
    data = shard.read_bytes()
    shard.write_bytes(data[:-7])
    with pytest.raises(PipelineError, match=f"shard '{shard}' is truncated"):
        read_dataset(str(out))
    # A complete shard with another record count (e.g. files of two runs mixed).
    write_shard(str(shard), [("only", data[:0] or b"\x00")])
    with pytest.raises(PipelineError, match=f"shard '{shard}' holds 1 records but"):
        read_dataset(str(out))
    shard.unlink()
    with pytest.raises(PipelineError, match="is missing"):
        read_dataset(str(out))


def test_reader_gives_static_image_shapes(tmp_path):
    write_dataset(tmp_path / "o", [mixed(i) for i in range(5)], num_shards=2)
    image_spec, label_spec = read_dataset(str(tmp_path / "o")).element_spec
    assert image_spec.shape == (8, 8, 3) and image_spec.dtype == tf.uint8
    assert label_spec.shape == (3,)
    write_dataset(tmp_path / "gz", [mixed(i, dtype=np.float32, channels=5) for i in range(3)],
                  num_shards=1, compression="GZIP")
    assert read_dataset(str(tmp_path / "gz")).element_spec[0].shape == (8, 8, 5)
    assert len(list(read_dataset(str(tmp_path / "gz")))) == 3


def test_preview_of_a_run_without_examples_is_a_clean_error(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(
        {"format": "softmix.dataset/1", "num_examples": 0, "class_names": ["a"],
         "shards": [], "params": {"mix": {}, "compression": None}}))
    rc, _, err = _run(capsys, ["preview", str(out)])
    assert rc == 1 and _error_lines(err)[-1].startswith("softmix: error: No examples")
    rc, _, err = _run(capsys, ["preview", str(tmp_path / "unfinished")])
    assert rc == 1 and "manifest.json" in err


# --- Manifest details ---------------------------------------------------------------------

def test_integer_labels_sort_numerically(tmp_path):
    rows = ["slide_id,path,label"] + [f"s{v},s{v}.zarr,{v}" for v in ("10", "2", "0", "1")]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    assert load_slide_manifest(tmp_path / "m.csv").class_names == ("0", "1", "2", "10")
    rows.append("s9,s9.zarr,tumor")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    assert load_slide_manifest(tmp_path / "m.csv").class_names == (
        "0", "1", "10", "2", "tumor")


def test_more_shards_than_examples_warns(tmp_path):
    _, manifest = write_dataset(tmp_path / "o", [mixed(i) for i in range(2)], num_shards=5)
    assert manifest["warnings"] and "5 shards for 2 examples" in manifest["warnings"][0]
    assert "warning: 5 shards for 2 examples" in _job.summary_table(manifest)


def test_finalize_refuses_zero_examples(tmp_path):
    config = OutputConfig(out_dir=str(tmp_path), num_shards=1)
    info = write_shard(str(tmp_path / shard_filename("softmix", 0, 1)), [])
    with pytest.raises(PipelineError, match="no examples written"):
        finalize_output(config, [info], Accounting(), CLASS_NAMES, {})
    assert not (tmp_path / "manifest.json").exists()


# --- The op's argument checks ---------------------------------------------------------------

def test_op_checks_soft_labels_and_takes_numpy_scalars():
    import softmix_tf

    images = tf.zeros([2, 8, 8, 3], tf.uint8)
    seeds = tf.constant([[1, 2], [3, 4]], tf.int64)
    good = tf.constant([[1.0, 0.0], [0.3, 0.7]])
    result = softmix_tf.softmix(images, images, good, good[::-1], seeds, grid=2,
                                alpha=np.float32(1.0), softness=np.float64(0.5),
                                mix_prob=np.float32(1.0))
    assert result.labels.shape == (2, 2)
    with pytest.raises(ValueError, match=r"row 1 sums to 0\.8"):
        softmix_tf.softmix(images, images, good, tf.constant([[1.0, 0.0], [0.3, 0.5]]),
                           seeds, grid=2)
    with pytest.raises(ValueError, match="finite"):
        softmix_tf.softmix(images, images, tf.constant([[np.nan, 1.0], [0.0, 1.0]]), good,
                           seeds, grid=2)
    with pytest.raises(TypeError, match="softness"):
        softmix_tf.softmix(images, images, good, good, seeds, grid=2, softness=True)


def test_rows_naming_one_slide_twice_use_it_once(capsys, caplog, synthetic_dataset, tmp_path):
    root = synthetic_dataset.root
    manifest = _manifest_copy(synthetic_dataset, tmp_path / "m.csv", extra=[
        f"again,{root}/slides/./syn-0.ome.zarr/,he,patient-9",
        f"thrice,{root}/slides/syn-0.ome.zarr,ihc,patient-9"])
    slides = load_slide_manifest(str(manifest)).slides
    assert [s.duplicate_of for s in slides] == [None] * 4 + ["syn-0", "syn-0"]
    assert "2 row(s) ('again', 'thrice') name the slide of row 'syn-0'" in caplog.text
    rc, out, err = _run(capsys, _args(manifest, tmp_path / "out", "--num-mixes", "1"))
    assert rc == 0, err
    written = read_manifest(str(tmp_path / "out"))
    acc = written["accounting"]
    assert acc["slides_failed"] == {"again": "duplicate_path", "thrice": "duplicate_path"}
    assert "slide of row 'syn-0'" in acc["slides_failed_messages"]["again"]
    assert written["num_examples"] == synthetic_dataset.total_tiles  # syn-0's tiles once
    assert acc["tiles_total"] == 4 * 16  # the repeated rows were never planned
    rc, _, err = _run(capsys, _args(manifest, tmp_path / "fail", "--on-error", "fail"))
    assert rc == 1 and "again" in err and "syn-0" in err and "duplicate_path" in err
