"""Trust boundaries of the CLI (issue 15): names read from disk are data, counts are
bounded, OUT never lies inside a slide, interrupts and refusals exit cleanly.

Every case runs the real CLI (`pipeline.cli.main` in process, or ``python -m pipeline``
in a subprocess) on real files, as `test_safety.py` does.
"""

from __future__ import annotations

import json
import socket

import pytest

from pipeline.dataset.reader import read_dataset
from pipeline.io.names import RecordedNameError
from pipeline.run.output import LOCK_NAME, finalize_output

from .test_output import mixed, write_dataset
from .test_safety import STAGING, _args, _run, _sleeper, _snapshot, _subprocess

BAD_NAMES = ["../victim.txt", "/ABS/victim.txt", "file:///ABS/victim.txt", "sub/x.tfrecord",
             "..", "C:\\victim.txt", LOCK_NAME, STAGING]


def _victims(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    return victim


@pytest.mark.parametrize("field", ["files", "shards"])
@pytest.mark.parametrize("bad", BAD_NAMES)
def test_overwrite_never_acts_on_names_outside_out(capsys, synthetic_dataset, tmp_path,
                                                   field, bad):
    """BAD 1: a manifest listing ../victim.txt or an absolute path is refused by name
    and nothing (inside or outside OUT) is deleted."""
    victim = _victims(tmp_path)
    bad = bad.replace("/ABS", str(tmp_path))
    out = tmp_path / "o"
    write_dataset(out, [mixed(i) for i in range(4)], num_shards=2)
    manifest = json.loads((out / "manifest.json").read_text())
    if field == "files":
        manifest["files"].append(bad)
    else:
        manifest["shards"].append({"file": bad, "num_examples": 0})
        del manifest["files"]  # older manifests: the shards list is the dataset
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(out)
    rc, _, err = _run(capsys, _args(synthetic_dataset, out, "--overwrite"))
    assert rc == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("softmix: error: ") and repr(bad) in line
    assert "nothing was deleted" in line and "Traceback" not in err
    assert victim.read_text() == "mine"
    assert _snapshot(out) == before and not (out / STAGING).exists()
    assert not (out / LOCK_NAME).exists()


def test_publish_and_read_refuse_a_tampered_manifest(tmp_path):
    """The same check guards the swap at publish time and the reader."""
    victim = _victims(tmp_path)
    out = tmp_path / "o"
    config, manifest = write_dataset(out, [mixed(i) for i in range(4)], num_shards=2)
    manifest["files"].append(str(victim))
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RecordedNameError, match="victim.txt"):
        write_dataset(out, [mixed(i) for i in range(3)], num_shards=1, overwrite=True)
    with pytest.raises(RecordedNameError, match="victim.txt"):
        finalize_output(config, [], None, [], {})  # refused before any check or move
    assert victim.read_text() == "mine" and (out / "manifest.json").exists()
    manifest["files"].pop()
    manifest["shards"][0]["file"] = "../victim.txt"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RecordedNameError, match=r"'\.\./victim\.txt'"):
        read_dataset(str(out))


def test_names_inside_out_still_replace(tmp_path):
    """Plain names keep working: an overwrite replaces the old dataset's files."""
    out = tmp_path / "o"
    write_dataset(out, [mixed(i) for i in range(4)], num_shards=2)
    write_dataset(out, [mixed(i) for i in range(3)], num_shards=1, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset_info.json", "features.json", "manifest.json",
        "softmix-00000-of-00001.tfrecord"]


# --- BAD 7: every count option is bounded (exit status 2 before any work) ---------------

@pytest.mark.parametrize("command,flag,value,message", [
    ("beam", "--num-shards", "1000000000", "`num_shards` must be in [1, 100000]"),
    ("beam", "--num-mixes", "1000000000", "`num_mixes` must be in [0, 64]"),
    ("dask", "--batch-size", "1000000000", "`batch_size` must be in [1, 4096]"),
    ("beam", "--tile-size", "1000000", "`tile_size` must be in [1, 8192]"),
    ("beam", "--read-cache-mb", "1e12", "`read_cache_mb` must be in [0, 65536]"),
    ("beam", "--workers", "100000", "must be in [1, 256]"),
    ("dask", "--threads-per-worker", "100000", "must be in [1, 256]"),
])
def test_absurd_counts_are_usage_errors(capsys, tmp_path, command, flag, value, message):
    rc, _, err = _run(capsys, [command, "--manifest", "m.csv", "--out", str(tmp_path / "o"),
                               flag, value])
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert f"argument {flag}: " in line and message in line, err
    assert "Received:" in line
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_preview_num_is_bounded(capsys, tmp_path):
    rc, _, err = _run(capsys, ["preview", str(tmp_path), "--num", "1000000000"])
    assert rc == 2 and "argument --num: must be in [1, 1024]" in err


def test_counts_are_bounded_in_the_python_api_too(tmp_path):
    from pipeline import stream_dataset
    from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
    from pipeline.dataset.shards import num_shards_for
    from pipeline.engines.beam import run_beam
    from pipeline.engines.dask import run_dask

    with pytest.raises(ValueError, match=r"`num_shards` must be in \[1, 100000\]"):
        OutputConfig(out_dir=str(tmp_path), num_shards=10**9)
    with pytest.raises(ValueError, match=r"`num_mixes` must be in \[0, 64\]"):
        MixConfig(num_mixes=10**9)
    with pytest.raises(ValueError, match="`batch_size`"):
        MixConfig(batch_size=10**9)
    missing = str(tmp_path / "missing.csv")  # the bound is checked before any reading
    for kwargs, name in (({"num_mixes": 10**9}, "num_mixes"),
                         ({"batch_size": 10**9}, "batch_size"),
                         ({"pack_threads": 10**6}, "pack_threads"),
                         ({"num_parallel_reads": 10**6}, "num_parallel_reads"),
                         ({"shuffle": 10**9}, "shuffle"),
                         ({"read_cache_mb": 1e12}, "read_cache_mb")):
        with pytest.raises(ValueError, match=f"`{name}` must be in"):
            stream_dataset(missing, **kwargs)
    job = JobConfig(missing, TileConfig(), MixConfig(), OutputConfig(str(tmp_path / "o")))
    with pytest.raises(ValueError, match=r"`workers` must be in \[1, 256\]"):
        run_beam(job, workers=10**6)
    with pytest.raises(ValueError, match="`threads_per_worker` must be in"):
        run_dask(job, threads_per_worker=10**6)
    # Shards derived from --shard-size-mb never exceed the examples or the cap.
    assert num_shards_for(10**9, 10**6, 1e-6) == 100_000
    assert num_shards_for(7, 10**6, 1e-6) == 7
    assert not (tmp_path / "o").exists()


# --- WEAK: --out inside an input slide's folder -------------------------------------------

@pytest.mark.parametrize("command,below", [("beam", ""), ("beam", "0/sub"), ("dask", "x")])
def test_out_inside_a_slide_folder_is_refused(capsys, synthetic_dataset_factory, command,
                                              below):
    dataset = synthetic_dataset_factory()
    slide = dataset.root / "slides" / "syn-1.ome.zarr"
    out = slide / below if below else slide
    before = sorted(str(p) for p in dataset.root.rglob("*"))
    rc, _, err = _run(capsys, [command, "--manifest", str(dataset.manifest_path), "--out",
                               str(out), "--tile-size", "128", "--no-progress", "--overwrite"])
    assert rc == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"softmix: error: --out '{out}' lies inside the folder of input "
                           "slide 'syn-1'")
    assert sorted(str(p) for p in dataset.root.rglob("*")) == before  # nothing written


# --- WEAK: --resume into a finished output names the difference ---------------------------

def test_resume_into_a_finished_run_names_the_difference(capsys, synthetic_dataset, tmp_path):
    out = tmp_path / "o"
    assert _run(capsys, _args(synthetic_dataset, out, "--seed", "3"))[0] == 0
    before = _snapshot(out)
    rc, _, err = _run(capsys, _args(synthetic_dataset, out, "--seed", "4", "--num-mixes",
                                    "2", "--resume"))
    assert rc == 1
    line = err.strip().splitlines()[-1]
    assert "holds a finished SoftMix dataset made with other settings (" in line
    assert "mix.num_mixes: 1 (finished run) != 2 (this run)" in line
    assert "mix.seed: 3 (finished run) != 4 (this run)" in line
    assert _snapshot(out) == before and not (out / LOCK_NAME).exists()
    rc, stdout, _ = _run(capsys, _args(synthetic_dataset, out, "--seed", "3", "--resume"))
    assert rc == 0 and "already finished" in stdout


# --- WEAK: the refused one of two simultaneous --resume runs exits cleanly ----------------

def test_a_refused_resume_exits_with_its_status_and_one_line(synthetic_dataset, tmp_path):
    """The refused run printed its message, then sometimes aborted with status 134
    ("terminate called without an active exception"): the program now ends with
    `os._exit` after flushing, so no C++ thread is torn down at interpreter exit."""
    out = tmp_path / "o"
    (out / STAGING).mkdir(parents=True)
    live = _sleeper()
    try:
        (out / LOCK_NAME).write_text(json.dumps(
            {"pid": live.pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00",
             "run_id": "x"}))
        for _ in range(2):
            proc = _subprocess(_args(synthetic_dataset, out, "--resume", "--workers", "2"))
            assert proc.returncode == 1, proc.stderr
            assert proc.stderr.splitlines() == [
                f"softmix: error: Another run is writing here: '{out}' is locked by pid "
                f"{live.pid} on host {socket.gethostname()!r} since 2026-01-01T00:00:00 "
                "(run x). Wait for it to finish or choose another --out; if no such run "
                f"exists, delete '{out / LOCK_NAME}' (or wait 120 s for its lease to run out)."]
            assert proc.stdout == ""
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, STAGING]
