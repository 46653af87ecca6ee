"""--resume: real processes killed with SIGKILL, resumed, compared byte for byte."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.cli import main as cli_main
from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
from pipeline.errors import OutputExistsError
from pipeline.io.manifest import load_slide_manifest
from pipeline.run import job as _job

# Every completed bucket is followed by a pause in the killed run only (the hook below
# is put on PYTHONPATH of that run), so the kill lands between buckets, mid-run.
_HOOK = textwrap.dedent("""
    import os, time
    if os.environ.get("SOFTMIX_TEST_BUCKET_PAUSE"):
        import pipeline.run.tasks as stages
        _mix = stages.mix_bucket
        def mix_bucket(*args, **kwargs):
            result = _mix(*args, **kwargs)
            time.sleep(float(os.environ["SOFTMIX_TEST_BUCKET_PAUSE"]))
            return result
        stages.mix_bucket = mix_bucket
    if os.environ.get("SOFTMIX_TEST_SNAPSHOT"):
        import json, pathlib
        import pipeline.run.job as job
        _publish = job.publish_output
        def publish_output(config, *args, **kwargs):
            staging = pathlib.Path(job.staging_dir(config))
            stats = {str(p): [p.stat().st_ino, p.stat().st_mtime_ns]
                     for p in staging.rglob("*") if p.is_file()}
            pathlib.Path(os.environ["SOFTMIX_TEST_SNAPSHOT"]).write_text(json.dumps(stats))
            return _publish(config, *args, **kwargs)
        job.publish_output = publish_output
""")


def _argv(engine: str, manifest: pathlib.Path, out: pathlib.Path, *extra: str) -> list[str]:
    return [engine, "--manifest", str(manifest), "--out", str(out), "--tile-size", "128",
            "--num-shards", "4", "--num-mixes", "3", "--seed", "11", "--no-progress",
            *extra]


def _files(out: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tfrecord"))}


def _stat(paths) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def _run(argv: list[str], tmp: pathlib.Path, **env: str) -> subprocess.Popen:
    hook = tmp / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(_HOOK)
    env = dict(os.environ, **env,
               PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "pipeline", *argv], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _kill_mid_run(argv: list[str], staging: pathlib.Path, tmp: pathlib.Path) -> None:
    proc = _run(argv, tmp, SOFTMIX_TEST_BUCKET_PAUSE="3")
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list((staging / "buckets").glob("*.tfrecord.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers, like a lost VM
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["beam", "dask"])
def test_sigkill_then_resume_is_byte_identical(engine, synthetic_dataset, tmp_path):
    manifest = synthetic_dataset.manifest_path
    reference = tmp_path / "reference"
    assert cli_main(_argv(engine, manifest, reference, "--workers", "1")) == 0
    out = tmp_path / "out"
    staging = out / _job.STAGING_DIR
    argv = _argv(engine, manifest, out, "--workers", "2")
    _kill_mid_run(argv, staging, tmp_path)
    assert not (out / "manifest.json").exists()
    done = sorted((staging / "buckets").glob("*.tfrecord.json"))
    assert 1 <= len(done) < 4
    assert cli_main(argv) == 1  # without a flag the leftovers are refused
    kept = [d.with_suffix("") for d in done] + sorted((staging / "packs").glob("*"))
    if engine == "beam":  # damage in staging is redone, not kept
        truncated = done[0].with_suffix("")
        truncated.write_bytes(truncated.read_bytes()[:-10])
        pack_index = sorted((staging / "packs").glob("*.json"))[0]
        pack_index.unlink()
        kept = [p for p in kept if p not in (truncated, pack_index,
                                             pack_index.with_suffix(".bin"))]
    before = _stat(kept)
    snapshot = tmp_path / "snapshot.json"
    resumed_run = _run([*argv, "--resume"], tmp_path, SOFTMIX_TEST_SNAPSHOT=str(snapshot))
    assert resumed_run.wait(timeout=300) == 0, resumed_run.stderr.read().decode()[-2000:]
    assert _files(out) == _files(reference)
    # Reused work was not rewritten: same inode and mtime just before publishing.
    at_publish = {path: tuple(value) for path, value in json.loads(snapshot.read_text()).items()}
    assert {path: at_publish.get(path) for path in before} == before
    resumed = json.loads((out / "manifest.json").read_text())["accounting"]["resumed"]
    assert resumed["plans"] == 4 and resumed["buckets"] >= len(done) - (engine == "beam")
    assert resumed["strips"] >= 1
    # A finished run: --resume says so and rewrites nothing.
    before = _stat(out.glob("*"))
    assert cli_main([*argv, "--resume"]) == 0
    assert _stat(out.glob("*")) == before


def _interrupted_run(manifest: pathlib.Path, out: pathlib.Path, seed: int = 11) -> None:
    """Leave `out` as an interrupted run does: staging with its fingerprint, no lock."""
    job = JobConfig(manifest=str(manifest), tile=TileConfig(tile_size=128),
                    mix=MixConfig(num_mixes=3, seed=seed),
                    output=OutputConfig(out_dir=str(out), num_shards=4))
    slides = load_slide_manifest(str(manifest)).slides
    _job.prepare_output(job.output, _job.run_fingerprint(job, slides))
    from pipeline.run.output import release_output_lock

    release_output_lock(str(out))


def test_resume_refuses_other_options_or_manifest(synthetic_dataset_factory, tmp_path, capsys):
    data = synthetic_dataset_factory()
    out = tmp_path / "out"
    _interrupted_run(data.manifest_path, out)
    assert cli_main(_argv("beam", data.manifest_path, out, "--seed", "12", "--resume")) == 1
    err = capsys.readouterr().err
    assert "Cannot resume" in err and "mix.seed: 11 (interrupted run) != 12 (this run)" in err
    rows = data.manifest_path.read_text().splitlines()
    rows[2] = rows[2].replace(",he,", ",ihc,") if ",he," in rows[2] else rows[2].replace(
        ",ihc,", ",he,")
    data.manifest_path.write_text("\n".join(rows) + "\n")
    assert cli_main(_argv("beam", data.manifest_path, out, "--resume")) == 1
    err = capsys.readouterr().err
    assert "slides." in err and ".label:" in err
    # Neither flag: the message names both.
    assert cli_main(_argv("beam", data.manifest_path, out)) == 1
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err


def test_resume_with_nothing_to_resume_runs_fresh(synthetic_dataset, tmp_path):
    out = tmp_path / "fresh"
    assert cli_main(_argv("beam", synthetic_dataset.manifest_path, out, "--resume")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_examples"] == 3 * synthetic_dataset.total_tiles
    assert manifest["accounting"]["resumed"] == {"plans": 0, "strips": 0, "buckets": 0,
                                                 "shards": 0, "slides_changed": 0}


def test_prepare_output_keeps_matching_staging_only(synthetic_dataset, tmp_path):
    out = tmp_path / "out"
    _interrupted_run(synthetic_dataset.manifest_path, out)
    marker = out / _job.STAGING_DIR / "plans" / "x.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    job = JobConfig(manifest=str(synthetic_dataset.manifest_path),
                    tile=TileConfig(tile_size=128), mix=MixConfig(num_mixes=3, seed=11),
                    output=OutputConfig(out_dir=str(out), num_shards=4, resume=True))
    slides = load_slide_manifest(str(synthetic_dataset.manifest_path)).slides
    assert _job.prepare_output(job.output, _job.run_fingerprint(job, slides)) is True
    assert marker.exists()
    from pipeline.run.output import release_output_lock

    release_output_lock(str(out))
    other = JobConfig(manifest=job.manifest, tile=TileConfig(tile_size=64), mix=job.mix,
                      output=job.output)
    with pytest.raises(OutputExistsError, match="tile.tile_size: 128"):
        _job.prepare_output(other.output, _job.run_fingerprint(other, slides))
    with pytest.raises(ValueError, match="exclude each other"):
        OutputConfig(out_dir=str(out), overwrite=True, resume=True)


def _stopped_before_publishing(argv: list[str], monkeypatch) -> None:
    """Run to the end but stop before publishing: every plan, pack, bucket and shard
    is finished in staging (the most there is to reuse wrongly)."""
    def stop(*args, **kwargs):
        raise RuntimeError("stopped before publishing (test)")

    with monkeypatch.context() as patch:
        patch.setattr(_job, "publish_output", stop)
        with pytest.raises(RuntimeError, match="stopped before publishing"):
            cli_main(argv)
    from pipeline.run.output import release_output_lock

    release_output_lock(argv[argv.index("--out") + 1])  # as a killed run leaves it


def _recolour_in_place(slide: pathlib.Path) -> None:
    """New pixels at level 0 (tissue and glass), same path, same metadata, same shape."""
    import zarr

    array = zarr.open_array(str(slide / "s0"), mode="r+")
    before = {p: p.read_bytes() for p in slide.rglob("zarr.json")}
    pixels = array[...]
    array[...] = (pixels.astype(int) * 3 // 4 + 10).astype(pixels.dtype)
    assert {p: p.read_bytes() for p in slide.rglob("zarr.json")} == before


def test_resume_redoes_what_a_changed_slide_or_an_edited_plan_made(
        synthetic_dataset_factory, tmp_path, monkeypatch, capsys):
    data = synthetic_dataset_factory()
    out = tmp_path / "out"
    argv = _argv("beam", data.manifest_path, out, "--workers", "1")
    _stopped_before_publishing(argv, monkeypatch)
    staging = out / _job.STAGING_DIR
    assert len(list(staging.glob("*.tfrecord"))) == 4  # all shards staged
    # Pixels of one slide change in place; another slide's kept plan is edited.
    changed_id = data.slide_ids[1]
    _recolour_in_place(data.root / "slides" / f"{changed_id}.ome.zarr")
    plans = sorted((staging / "plans").glob("*.plan"))
    assert len(plans) == 4
    edited = next(p for p in plans if json.loads(p.read_text())["slide_id"] == data.slide_ids[0])
    plan = json.loads(edited.read_text())
    plan["tiles"][0][0] += 8
    edited.write_text(json.dumps(plan))
    capsys.readouterr()
    assert cli_main([*argv, "--resume"]) == 0
    reference = tmp_path / "reference"
    assert cli_main(_argv("beam", data.manifest_path, reference, "--workers", "1")) == 0
    assert _files(out) == _files(reference)  # the new pixels, the original plan
    manifest = json.loads((out / "manifest.json").read_text())
    resumed = manifest["accounting"]["resumed"]
    assert resumed["plans"] == 2 and resumed["slides_changed"] == 1
    assert resumed["shards"] < 4  # shards holding the changed slide's tiles were redone


def test_plan_task_reuses_a_plan_only_while_slide_and_file_verify(synthetic_dataset_factory,
                                                                 tmp_path):
    from pipeline.run import tasks as _stages

    data = synthetic_dataset_factory()
    record = load_slide_manifest(str(data.manifest_path)).slides[0]
    config = TileConfig(tile_size=128)
    names = ("he", "ihc")
    staging = str(tmp_path / "staging")
    first = _stages.plan_task(record, config, "skip", names, staging)
    assert not first.reused and first.content
    again = _stages.plan_task(record, config, "skip", names, staging)
    assert again.reused and again == first
    path = pathlib.Path(_stages.plan_path(staging, record, config, names))
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["size"] == path.stat().st_size and sidecar["records"] == len(first.tiles)
    # An edited plan (same size even) does not verify: planned again.
    text = path.read_text()
    path.write_text(text.replace("[0, ", "[8, ", 1) if "[0, " in text else text[:-2] + " }")
    redone = _stages.plan_task(record, config, "skip", names, staging)
    assert not redone.reused and not redone.changed and redone == first
    # The slide's pixels change in place: planned again, reported as changed.
    _recolour_in_place(pathlib.Path(record.path))
    changed = _stages.plan_task(record, config, "skip", names, staging)
    assert not changed.reused and changed.changed and changed.content != first.content
    assert _stages.plan_task(record, config, "skip", names, staging).reused


def test_checkpoint_reuse_costs_a_metadata_read_and_edits_are_still_redone(tmp_path,
                                                                           monkeypatch):
    from pipeline.run import checkpoint

    data = tmp_path / "part.bin"
    with data.open("wb") as handle:
        out = checkpoint.CrcWriter(handle)
        out.write(b"x" * 1000)
    checkpoint.write_sidecar(str(data), inputs={"step": 1}, records=1, size=out.size,
                             crc32=out.crc32)
    written_ns = json.loads((tmp_path / "part.json").read_text())["mtime_ns"]
    assert written_ns == data.stat().st_mtime_ns
    reads = []
    real_crc = checkpoint.file_crc32
    monkeypatch.setattr(checkpoint, "file_crc32", lambda path: reads.append(path)
                        or real_crc(path))
    # Untouched since written: reused on its size and time, its bytes are not read.
    assert checkpoint.load_checked(str(data), {"step": 1}) is not None
    assert reads == []
    # Edited in place, same size, later time: read, the CRC differs, redone.
    data.write_bytes(b"y" * 1000)
    os.utime(data, ns=(written_ns + 10**9, written_ns + 10**9))
    assert checkpoint.load_checked(str(data), {"step": 1}) is None
    assert reads == [str(data)]
    # Same bytes under a new time (copied without times): read once, the CRC matches.
    data.write_bytes(b"x" * 1000)
    os.utime(data, ns=(written_ns + 2 * 10**9, written_ns + 2 * 10**9))
    assert checkpoint.load_checked(str(data), {"step": 1}) is not None
    assert len(reads) == 2
    # Truncated with its recorded time put back: the size differs, refused.
    data.write_bytes(b"x" * 999)
    os.utime(data, ns=(written_ns, written_ns))
    assert checkpoint.load_checked(str(data), {"step": 1}) is None
    # Made from other inputs: refused before any stat or read.
    data.write_bytes(b"x" * 1000)
    assert checkpoint.load_checked(str(data), {"step": 2}) is None
    # A data file that was never created (an all-skipped strip's empty pack): the
    # sidecar is still written, and nothing is reused from it.
    empty = tmp_path / "empty.bin"
    checkpoint.write_sidecar(str(empty), inputs={"step": 1}, records=0, size=0, crc32=0)
    assert json.loads((tmp_path / "empty.json").read_text())["mtime_ns"] is None
    assert checkpoint.load_checked(str(empty), {"step": 1}) is None


def _resume_job(manifest: pathlib.Path, out: pathlib.Path, *, resume: bool = False
                ) -> JobConfig:
    return JobConfig(manifest=str(manifest), tile=TileConfig(tile_size=128),
                     mix=MixConfig(num_mixes=3, seed=11),
                     output=OutputConfig(out_dir=str(out), num_shards=4, resume=resume))


def _run_engine(engine: str, job: JobConfig) -> dict:
    """Beam in-process, Dask on an in-process (threads) cluster: a test's patch of
    `pipeline.run.tasks` reaches every task."""
    if engine == "beam":
        from pipeline.engines.beam import run_beam

        return run_beam(job, progress=False)
    import distributed

    from pipeline.engines.dask import run_job

    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2,
                            dashboard_address=":0") as client:
        return run_job(client, job, progress=False)


@pytest.mark.parametrize("engine", ["beam", "dask"])
def test_a_run_stopped_after_packing_reuses_every_plan_and_pack(engine, synthetic_dataset,
                                                                tmp_path, monkeypatch):
    from pipeline.run import tasks as _tasks
    from pipeline.run.output import release_output_lock

    out = tmp_path / "out"

    def stop(*args, **kwargs):
        raise RuntimeError("stopped after packing (test)")

    with monkeypatch.context() as patch:  # every plan and pack done, no bucket mixed
        patch.setattr(_tasks, "mix_bucket", stop)
        with pytest.raises(Exception, match="stopped after packing"):
            _run_engine(engine, _resume_job(synthetic_dataset.manifest_path, out))
    release_output_lock(str(out))  # as a killed run leaves it
    staging = out / _job.STAGING_DIR
    packs = sorted((staging / "packs").glob("*.json"))  # committed: sidecar written last
    assert len(packs) >= 4 and not list(staging.glob("buckets/*.json"))
    manifest = _run_engine(engine, _resume_job(synthetic_dataset.manifest_path, out,
                                               resume=True))
    assert manifest["accounting"]["resumed"] == {
        "plans": 4, "strips": len(packs), "buckets": 0, "shards": 0, "slides_changed": 0}
    assert manifest["num_examples"] == 3 * synthetic_dataset.total_tiles


def test_checkpoint_reuse_on_an_object_store_is_metadata_only(monkeypatch):
    # memory:// goes through the same fsspec path as S3/GCS (size + modified time).
    import uuid

    from pipeline.io import storage
    from pipeline.run import checkpoint

    data = f"memory://softmix-test-{uuid.uuid4().hex}/buckets/part.tfrecord"
    checkpoint.write_checked(data, b"z" * 4096, inputs={"step": 1}, records=2)
    assert storage.read_json(checkpoint.sidecar_path(data))["mtime_ns"] is not None
    reads = []
    monkeypatch.setattr(checkpoint, "file_crc32", lambda path: reads.append(path) or (0, 0))
    with storage.counting() as sent:
        kept = checkpoint.load_checked(data, {"step": 1})
    assert kept is not None and kept[0]["records"] == 2 and kept[1] is None
    # The sidecar's GET, then the data's size and modification time: never its bytes.
    assert reads == [] and sent["requests"] == 3
    storage.write_bytes(data, b"y" * 4096)  # rewritten: a new time, so read and refused
    monkeypatch.undo()
    assert checkpoint.load_checked(data, {"step": 1}) is None


_PREWARM = """
import os, sys
from pipeline.run import tasks
before = "tensorflow" in sys.modules
tasks.prewarm_mixing(without_keras=sys.argv[1] == "1")
tasks.prewarm_mixing()  # once per process
assert len(tasks._PREWARM) == 1
tasks._PREWARM[0].join(timeout=120)
print(before, "tensorflow" in sys.modules, "softmix_tf" in sys.modules, "keras" in sys.modules,
      "softmix_tf._layer" in sys.modules,
      [os.environ.get(k) for k in ("TF_USE_LEGACY_KERAS", "SOFTMIX_TF_LAZY_KERAS")])
import numpy as np, tensorflow as tf, softmix_tf
mask = softmix_tf.softmix_mask(tf.constant([[3, 4]], tf.int64), (8, 8), grid=2)
print(float(np.asarray(mask).sum()) > 0)
print(type(tf.keras.layers.Dense(2)).__module__.split(".")[0], softmix_tf.SoftMix.__name__)
"""


@pytest.mark.parametrize("without_keras", [False, True])
def test_a_resumed_runs_workers_import_tensorflow_in_the_background(without_keras):
    # Called by the engines for a resumed run only; a fresh run's planning, packing and
    # pairing keep TensorFlow out (test_stages). `without_keras` (the engines' own worker
    # processes): Keras stays out until something asks for it (tf.keras, a layer), the
    # import's environment variables are put back, and the op works.
    done = subprocess.run([sys.executable, "-c", _PREWARM, str(int(without_keras))],
                          capture_output=True, text=True, timeout=300, check=True)
    keras_loaded = str(not without_keras)
    assert done.stdout.splitlines() == [
        f"False True True {keras_loaded} {keras_loaded} [None, None]",
        "True",
        "keras SoftMix",
    ]


def test_a_run_killed_while_publishing_is_resumed(synthetic_dataset, tmp_path, monkeypatch):
    from pipeline.run import output as _output
    from pipeline.run.output import release_output_lock

    out = tmp_path / "out"

    def stop(*args, **kwargs):
        raise RuntimeError("killed while publishing (test)")

    with monkeypatch.context() as patch:  # shards and TFDS files moved in, no manifest
        patch.setattr(_output, "publish_report_files", stop)
        with pytest.raises(Exception, match="killed while publishing"):
            _run_engine("beam", _resume_job(synthetic_dataset.manifest_path, out))
    release_output_lock(str(out))
    moved = _files(out)
    assert len(moved) == 4 and (out / "features.json").exists()
    assert not (out / "manifest.json").exists() and (out / _job.STAGING_DIR).is_dir()
    assert cli_main(_argv("beam", synthetic_dataset.manifest_path, out, "--num-mixes",
                          "3")) == 1  # without --resume: refused, nothing touched
    assert _files(out) == moved
    manifest = _run_engine("beam", _resume_job(synthetic_dataset.manifest_path, out,
                                               resume=True))
    assert _files(out) == moved and (out / "manifest.json").exists()
    resumed = manifest["accounting"]["resumed"]
    assert resumed["plans"] == 4 and resumed["buckets"] >= 4 and resumed["shards"] == 0


def test_a_kept_pack_is_reused_without_opening_its_slide(synthetic_dataset, tmp_path,
                                                         monkeypatch):
    from pipeline.io import slides as _slides
    from pipeline.run import tasks as _tasks
    from pipeline.steps.pack import split_plan

    record = load_slide_manifest(str(synthetic_dataset.manifest_path)).slides[0]
    staging = str(tmp_path / "staging")
    plan = _tasks.plan_task(record, TileConfig(tile_size=128), "skip", ("he", "ihc"), staging)
    task = split_plan(record, plan, 128)[0]
    first = _tasks.pack_task(task, staging, 64.0)
    assert not first.reused and first.tiles

    def refuse(*args, **kwargs):
        raise AssertionError("the slide was opened to reuse a kept pack")

    monkeypatch.setattr(_slides, "open_slide", refuse)
    again = _tasks.pack_task(task, staging, 64.0)
    assert again.reused and again.tiles == first.tiles
    pathlib.Path(first.pack + ".bin").write_bytes(b"")  # damaged: packed again, slide opened
    with pytest.raises(AssertionError, match="the slide was opened"):
        _tasks.pack_task(task, staging, 64.0)
