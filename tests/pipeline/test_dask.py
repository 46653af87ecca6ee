"""Dask engine: same shards as Beam and the local engine, 1 vs 2 workers, a killed
worker, accounting, CLI.

One 2-worker LocalCluster serves the module; the synthetic dataset (4 slides of
512 px, 128 px tiles, 24 tiles of tissue) keeps every run to a few seconds.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
import time

import pytest

from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
from pipeline.errors import PipelineError
from pipeline.run import job as _job

distributed = pytest.importorskip("distributed")

from pipeline import dask_transforms  # noqa: E402

pytestmark = pytest.mark.slow

NUM_SHARDS = 3
TILES_USED = 24  # conftest.SYNTHETIC_SLIDES: 6 + 4 + 8 + 6
EXAMPLES = TILES_USED * 3  # num_mixes=2 plus the original


def make_job(manifest: pathlib.Path | str, out: pathlib.Path, *, on_error: str = "skip",
             num_shards: int = NUM_SHARDS) -> JobConfig:
    return JobConfig(
        manifest=str(manifest),
        tile=TileConfig(tile_size=128),
        mix=MixConfig(num_mixes=2, keep_originals=True, seed=7, batch_size=8),
        output=OutputConfig(out_dir=str(out), num_shards=num_shards, on_error=on_error),
    )


def shard_bytes(out: pathlib.Path) -> dict[str, bytes]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {s["file"]: (out / s["file"]).read_bytes() for s in manifest["shards"]}


def decoded_examples(out: pathlib.Path) -> list[tuple]:
    """Every record as a comparable tuple (pixels included), sorted: a multiset."""
    import tensorflow as tf

    from pipeline.dataset.schema import decode_example

    rows = []
    for name in sorted(shard_bytes(out)):
        for raw in tf.data.TFRecordDataset(str(out / name)).as_numpy_iterator():
            ex = decode_example(raw)
            rows.append((ex["example_id"], ex["image"].tobytes(), ex["image"].shape,
                         tuple(ex["label"].tolist()), float(ex["lam"]), ex["a/slide_id"],
                         int(ex["a/x"]), int(ex["a/y"]), ex["b/slide_id"], int(ex["b/x"]),
                         int(ex["b/y"]), tuple(ex["seed"].tolist())))
    return sorted(rows)


def manifest_with_ghost(dataset, directory: pathlib.Path) -> pathlib.Path:
    """The synthetic manifest (absolute paths) plus a slide whose store does not exist."""
    lines = dataset.manifest_path.read_text().strip().splitlines()
    rows = [lines[0]]
    for line in lines[1:]:
        slide_id, path, rest = line.split(",", 2)
        rows.append(f"{slide_id},{dataset.root / path},{rest}")
    rows.append(f"ghost,{directory / 'ghost.ome.zarr'},he,patient-9")
    manifest = directory / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


@pytest.fixture(scope="module")
def client():
    cluster = dask_transforms.start_local_cluster(2, memory_limit="3GiB")
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def beam_run(synthetic_dataset, tmp_path_factory) -> pathlib.Path:
    from pipeline.engines.beam import run_beam

    out = tmp_path_factory.mktemp("beam") / "out"
    run_beam(make_job(synthetic_dataset.manifest_path, out), progress=False)
    return out


@pytest.fixture(scope="module")
def dask_tasks() -> list[dict]:
    """The task stream of the `dask_run` job (filled by that fixture)."""
    return []


@pytest.fixture(scope="module")
def dask_run(client, synthetic_dataset, tmp_path_factory, dask_tasks
             ) -> tuple[pathlib.Path, dict]:
    out = tmp_path_factory.mktemp("dask") / "out"
    with distributed.get_task_stream(client) as stream:
        manifest = dask_transforms.run_job(
            client, make_job(synthetic_dataset.manifest_path, out), progress=False,
            examples_per_task=5)
    dask_tasks.extend(stream.data)
    return out, manifest


def test_shards_are_byte_identical_to_beam(beam_run, dask_run):
    dask_shards = shard_bytes(dask_run[0])
    assert sorted(dask_shards) == [f"softmix-{i:05d}-of-{NUM_SHARDS:05d}.tfrecord"
                                   for i in range(NUM_SHARDS)]
    assert dask_shards == shard_bytes(beam_run)


def test_local_engine_writes_the_same_shards(synthetic_dataset, beam_run, dask_run, tmp_path,
                                             capsys):
    # The framework-free engine is the reference: in process (API) and a 2-process pool
    # (CLI) give Beam's and Dask's bytes.
    from pipeline.cli import main
    from pipeline.engines.local import run_local

    job = make_job(synthetic_dataset.manifest_path, tmp_path / "api")
    manifest = run_local(job, progress=False, examples_per_task=5)
    assert shard_bytes(tmp_path / "api") == shard_bytes(beam_run) == shard_bytes(dask_run[0])
    assert manifest["accounting"] == dask_run[1]["accounting"]
    assert (manifest["params"]["engine"], manifest["params"]["workers"]) == ("local", 1)
    status = main(["local", "--manifest", str(synthetic_dataset.manifest_path),
                   "--out", str(tmp_path / "cli"), "--tile-size", "128", "--num-mixes", "2",
                   "--keep-originals", "--seed", "7", "--batch-size", "8",
                   "--num-shards", str(NUM_SHARDS), "--workers", "2", "--no-progress"])
    assert status == 0 and f"{'examples written':<28}{EXAMPLES:>10}" in capsys.readouterr().out
    assert shard_bytes(tmp_path / "cli") == shard_bytes(beam_run)


def test_decoded_examples_equal_beam(beam_run, dask_run):
    examples = decoded_examples(dask_run[0])
    assert len(examples) == EXAMPLES
    assert len({row[0] for row in examples}) == EXAMPLES  # nothing duplicated
    assert examples == decoded_examples(beam_run)


def test_manifest_accounting_adds_up(beam_run, dask_run):
    out, manifest = dask_run
    assert json.loads((out / "manifest.json").read_text()) == manifest
    acc = manifest["accounting"]
    assert acc["tiles_total"] == acc["tiles_used"] + sum(acc["tiles_skipped"].values())
    assert (acc["tiles_total"], acc["tiles_used"]) == (64, TILES_USED)
    assert acc["tiles_skipped"] == {"background": 40}
    assert acc["slides_failed"] == {}
    assert acc["examples_written"] == manifest["num_examples"] == EXAMPLES
    assert sum(s["num_examples"] for s in manifest["shards"]) == EXAMPLES
    beam_manifest = json.loads((beam_run / "manifest.json").read_text())
    assert acc == beam_manifest["accounting"]
    assert manifest["params"]["engine"] == "dask"
    assert not (out / _job.STAGING_DIR).exists()


def test_graph_has_few_tasks_per_slide(dask_run, dask_tasks):
    # Every task costs the scheduler, the client and a worker: only packing (the unit
    # of work) and mixing run per strip / bucket; the small steps run once per slide.
    from dask.utils import key_split

    out, manifest = dask_run
    counts: dict[str, int] = {}
    for task in dask_tasks:
        prefix = key_split(task["key"])
        counts[prefix] = counts.get(prefix, 0) + 1
    slides = 4
    strips = counts.pop("pack_nth")
    assert strips > slides  # several strips per slide, so "per slide" is fewer tasks
    assert counts.pop("softmix-shard") == NUM_SHARDS
    assert 0 < counts.pop("softmix-mix") <= NUM_SHARDS * 5  # buckets of <= 5 examples
    assert counts == {"softmix-plan": slides, "plan_kind": slides,
                      "reconciled_strips": slides, "slide_facts": slides,
                      "strips_facts": slides, "softmix-layout": 1, "softmix-table": 1,
                      "pair_slide": slides, "pair_facts": slides}


def test_local_cluster_housekeeping_is_slowed(client):
    # Dask's 20 ms loop tick, 100 ms memory monitor and 500 ms system monitor cost the
    # driver and every worker CPU all run long (`WORKER_CONFIG`).
    import dask

    keys = ("distributed.admin.tick.interval", "distributed.worker.memory.monitor-interval",
            "distributed.admin.system-monitor.interval")
    seen = client.run(lambda: tuple(dask.config.get(k) for k in keys))
    assert set(seen.values()) == {("1s", "500ms", "2s")}  # the workers
    # The scheduler and the nannies run in this process, on the client's event loop.
    servers = [client.cluster.scheduler, *client.cluster.workers.values()]
    assert [(s.periodic_callbacks["tick"].callback_time,
             s.periodic_callbacks["monitor"].callback_time) for s in servers] == [
        (1000, 2000)] * len(servers)
    assert [n.memory_manager.memory_monitor_interval
            for n in client.cluster.workers.values()] == [0.5, 0.5]


def _hook_marker(path: str) -> None:
    import atexit

    atexit.register(lambda: pathlib.Path(path).write_text("teardown ran"))


@pytest.mark.parametrize("fast", [False, True])
def test_a_closing_worker_skips_its_teardown_with_fast_exit(fast, tmp_path):
    # `run_dask` adds `FastExit` to the clusters it starts: their workers end without
    # the interpreter's teardown (exit hooks included) once they close.
    from distributed import Client

    from pipeline.engines.dask import FastExit, start_local_cluster

    marker = tmp_path / "teardown.txt"
    with start_local_cluster(1) as cluster, Client(cluster) as client:
        if fast:
            client.register_plugin(FastExit())
        client.run(_hook_marker, str(marker))
        assert client.submit(sum, [1, 2]).result() == 3
    assert marker.exists() is not fast


def _prewarmed() -> tuple[int, bool, bool, bool]:
    import sys

    from pipeline.run import tasks

    for thread in tasks._PREWARM:
        thread.join(timeout=120)
    return (len(tasks._PREWARM), "softmix_tf" in sys.modules, "keras" in sys.modules,
            "softmix_tf._layer" in sys.modules)


def test_a_resumed_runs_cluster_imports_the_op_as_workers_start():
    # `run_dask` starts a resumed run's cluster with `prewarm`: each worker process
    # imports TensorFlow and the op (without Keras) from its start, before any task.
    from distributed import Client

    from pipeline.engines.dask import start_local_cluster

    with start_local_cluster(1, prewarm=True) as cluster, Client(cluster) as own:
        assert list(own.run(_prewarmed).values()) == [(1, True, False, False)]
    with start_local_cluster(1) as cluster, Client(cluster) as own:
        assert list(own.run(_prewarmed).values()) == [(0, False, False, False)]


def test_worker_tensorflow_threads_are_capped(client, dask_run):
    def threads():
        import tensorflow as tf

        return (os.environ.get("SOFTMIX_TF_THREADS"),
                tf.config.threading.get_intra_op_parallelism_threads())

    assert set(client.run(threads).values()) == {("1", 1)}


def test_cli_one_worker_matches_two_workers(synthetic_dataset, dask_run, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "out"
    status = main(["dask", "--manifest", str(synthetic_dataset.manifest_path), "--out", str(out),
                   "--tile-size", "128", "--num-mixes", "2", "--keep-originals", "--seed", "7",
                   "--batch-size", "8", "--num-shards", str(NUM_SHARDS), "--workers", "1",
                   "--memory-limit", "2GiB", "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "dask dashboard: http://" in printed
    assert "examples written" in printed and str(EXAMPLES) in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["workers"] == 1
    assert shard_bytes(out) == shard_bytes(dask_run[0])
    assert manifest["accounting"] == dask_run[1]["accounting"]


def test_cli_refuses_existing_output(synthetic_dataset, dask_run, capsys):
    from pipeline.cli import main

    status = main(["dask", "--manifest", str(synthetic_dataset.manifest_path),
                   "--out", str(dask_run[0]), "--scheduler", "tcp://127.0.0.1:1"])
    assert status == 1  # refused before connecting to the (unreachable) scheduler
    assert "--overwrite" in capsys.readouterr().err


def test_killed_worker_mid_run_gives_the_same_output(client, synthetic_dataset, dask_run,
                                                       tmp_path):
    def slow_reads(delay):
        from pipeline.steps.pack import PackReader

        original = getattr(PackReader, "_test_original_read_many", PackReader.read_many)
        PackReader._test_original_read_many = original

        def read_many(self, *args, **kwargs):
            time.sleep(delay)
            return original(self, *args, **kwargs)

        PackReader.read_many = read_many

    def restore_reads():
        from pipeline.steps.pack import PackReader

        PackReader.read_many = getattr(PackReader, "_test_original_read_many",
                                       PackReader.read_many)

    out = tmp_path / "out"
    staging = out / _job.STAGING_DIR
    state: dict = {}

    def kill_once_started():
        try:
            deadline = time.monotonic() + 120
            while not list(staging.glob("progress-*")) and time.monotonic() < deadline:
                time.sleep(0.02)
            state["finished_before_kill"] = (out / "manifest.json").exists()
            pids = client.run(os.getpid)
            busy = {address: keys for address, keys in client.processing().items() if keys}
            address = sorted(busy or pids)[0]
            state["in_flight"] = list(busy.get(address, ()))
            os.kill(pids[address], signal.SIGKILL)
            state["killed"] = pids[address]
        except Exception as err:  # surfaced by the asserts below
            state["error"] = err

    client.run(slow_reads, 0.5)
    killer = threading.Thread(target=kill_once_started)
    try:
        killer.start()
        manifest = dask_transforms.run_job(client, make_job(synthetic_dataset.manifest_path, out),
                                           progress=False, examples_per_task=3)
    finally:
        killer.join()
        client.wait_for_workers(2, timeout=120)
        client.run(restore_reads)
    assert "error" not in state, state.get("error")
    assert state["finished_before_kill"] is False
    assert state["in_flight"]  # killed while busy
    assert state["killed"] not in set(client.run(os.getpid).values())  # really restarted
    assert shard_bytes(out) == shard_bytes(dask_run[0])
    assert manifest["accounting"] == dask_run[1]["accounting"]
    assert manifest["num_examples"] == EXAMPLES
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_is_written_on_a_worker(client, synthetic_dataset, tmp_path):
    # `softmix dask` (report=True): the published run's report is drawn by a worker,
    # where mixing loaded TensorFlow, not by the client.
    out = tmp_path / "out"
    with distributed.get_task_stream(client) as stream:
        manifest = dask_transforms.run_job(client, make_job(synthetic_dataset.manifest_path, out),
                                           progress=False, report=True)
    assert manifest["num_examples"] == EXAMPLES
    report_tasks = [t for t in stream.data if t["key"].startswith("softmix-report-")]
    assert len(report_tasks) == 1
    assert report_tasks[0]["worker"] in client.scheduler_info()["workers"]
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert all(sid in page for sid in synthetic_dataset.slide_ids)
    from pipeline.tools.report import slide_png_name

    assert sorted(p.name for p in (out / "report").iterdir() if p.suffix == ".png") == sorted(
        slide_png_name(sid) for sid in synthetic_dataset.slide_ids)


def test_missing_slide_is_counted_and_others_done(client, synthetic_dataset, tmp_path):
    manifest_path = manifest_with_ghost(synthetic_dataset, tmp_path)
    manifest = dask_transforms.run_job(client, make_job(manifest_path, tmp_path / "out"),
                                       progress=False)
    acc = manifest["accounting"]
    assert acc["slides_failed"] == {"ghost": "missing"}
    assert acc["tiles_used"] == TILES_USED
    assert acc["tiles_total"] == acc["tiles_used"] + sum(acc["tiles_skipped"].values())
    assert manifest["num_examples"] == EXAMPLES


def test_on_error_fail_raises_pipeline_error_naming_the_slide(client, synthetic_dataset,
                                                              tmp_path):
    manifest_path = manifest_with_ghost(synthetic_dataset, tmp_path)
    job = make_job(manifest_path, tmp_path / "out", on_error="fail")
    with pytest.raises(PipelineError, match="ghost"):
        dask_transforms.run_job(client, job, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_memory_monitor_reports_each_worker(client, synthetic_dataset, tmp_path):
    job = make_job(synthetic_dataset.manifest_path, tmp_path / "out", num_shards=1)
    with dask_transforms.WorkerMemoryMonitor(client, interval=0.05) as monitor:
        dask_transforms.run_job(client, job, progress=False)
    workers = set(client.scheduler_info(n_workers=-1)["workers"])
    assert set(monitor.peak_rss) == workers
    assert monitor.peak_bytes >= max(monitor.peak_rss.values()) > 50 * 2**20
