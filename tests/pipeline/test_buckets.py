"""Buckets for real: runs from bucket to bucket against S3 (moto) and GCS (fake-gcs-server)
API servers on 127.0.0.1, compared byte for byte with a local run."""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

from pipeline.cli import main as cli_main
from pipeline.dataset.tfrecord import RecordWriter, iter_records
from pipeline.io import storage
from pipeline.run import job as _job
from pipeline.run import output as _output

from .conftest import write_synthetic_dataset

ARGS = ("--tile-size", "128", "--num-shards", "4", "--num-mixes", "3", "--seed", "11",
        "--no-progress")
SHARDS = [f"softmix-{i:05d}-of-00004.tfrecord" for i in range(4)]


@pytest.fixture(autouse=True)
def _both_stores(s3_store, gcs_store) -> str:
    """The options of both servers in force for every test (a run, `stream_dataset` or
    `read_dataset` given options replaces those of the process, as for a user)."""
    options = {"s3": s3_store.options, "gs": gcs_store.options}
    storage.configure(options)
    return json.dumps(options)


def _argv(engine: str, manifest: str, out: str, store, *extra: str) -> list[str]:  # noqa: ANN001
    both = json.dumps(storage.current_options())  # `_both_stores`: S3 and GCS
    return [engine, "--manifest", manifest, "--out", out, "--storage-options", both,
            *ARGS, *extra]


def _bucket_files(store, out: str) -> dict[str, bytes]:  # noqa: ANN001
    return {name: store.fs.cat_file(f"{out.split('://', 1)[1]}/{name}") for name in SHARDS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """Shards of the local run (v0.5 slides; the pixels of the v0.4 copies are the same)."""
    root = tmp_path_factory.mktemp("buckets-reference")
    data = write_synthetic_dataset(root / "data")
    assert cli_main(["beam", "--manifest", str(data.manifest_path), "--out",
                     str(root / "out"), *ARGS, "--workers", "1"]) == 0
    return {name: (root / "out" / name).read_bytes() for name in SHARDS}


@pytest.fixture(scope="module")
def s3_slides(s3_store, tmp_path_factory) -> str:
    """Manifest URL of OME-Zarr v0.5 slides uploaded to the S3 bucket."""
    data = write_synthetic_dataset(tmp_path_factory.mktemp("s3-data"), version="0.5")
    return s3_store.upload(data.root, "data-v05") + "/manifest.csv"


@pytest.fixture(scope="module")
def gcs_slides(gcs_store, tmp_path_factory) -> str:
    """Manifest URL of OME-Zarr v0.4 slides uploaded to the GCS bucket."""
    data = write_synthetic_dataset(tmp_path_factory.mktemp("gcs-data"), version="0.4")
    return gcs_store.upload(data.root, "data-v04") + "/manifest.csv"


# --- The TFRecord framing ------------------------------------------------------------------


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_framing_writer_equals_tensorflow_writer(compression, tmp_path):
    rng = np.random.default_rng(0)
    records = [rng.bytes(int(n)) for n in rng.integers(0, 70_000, size=30)] + [b""]
    path = str(tmp_path / "tf.tfrecord")
    options = tf.io.TFRecordOptions(compression_type=compression or "")
    with tf.io.TFRecordWriter(path, options=options) as writer:
        for record in records:
            writer.write(record)
    buffer = io.BytesIO()
    with RecordWriter(buffer, compression) as ours:
        for record in records:
            ours.write(record)
    data = buffer.getvalue()
    assert data == pathlib.Path(path).read_bytes()
    import zlib

    assert (ours.size, ours.crc32) == (len(data), zlib.crc32(data))  # computed while writing
    (tmp_path / "ours.tfrecord").write_bytes(data)
    read = tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"),
                                   compression_type=compression or "")
    assert [r.numpy() for r in read] == records
    assert list(iter_records(io.BytesIO(data), compression=compression)) == records
    damaged = bytearray(data if compression is None else pathlib.Path(path).read_bytes())
    if compression is None:
        damaged[20] ^= 0xFF
        with pytest.raises(OSError, match="CRC mismatch"):
            list(iter_records(io.BytesIO(bytes(damaged))))


# --- Options and errors --------------------------------------------------------------------


def test_storage_options_per_protocol_and_flat():
    per = {"s3": {"endpoint_url": "http://a"}, "gs": {"token": "anon"}, "*": {"x": 1}}
    assert storage.options_for("s3://b/k", per) == {"x": 1, "endpoint_url": "http://a",
                                                    "max_concurrency": 1}
    assert storage.options_for("gcs://b/k", per) == {"x": 1, "token": "anon"}
    assert storage.options_for("/tmp/x", per) == {}
    assert storage.options_for("gs://b/k", {"anon": True}) == {"anon": True}
    with pytest.raises(Exception, match="--storage-options must be a JSON object"):
        storage.parse_options("endpoint_url=http://a")


def test_missing_client_names_the_package(monkeypatch):
    import importlib

    from pipeline.errors import PipelineError

    registry = importlib.import_module("fsspec.registry")  # the module, not fsspec.registry

    # As on a machine without gcsfs: fsspec cannot import the class behind gs://.
    monkeypatch.setitem(registry.known_implementations, "gs",
                        {"class": "no_such_gcsfs.GCSFileSystem", "err": "Please install gcsfs"})
    for name in ("gs", "gcs"):  # forget the class if gcsfs was imported already
        monkeypatch.delitem(registry._registry, name, raising=False)
    with pytest.raises(PipelineError, match=r"client 'gcsfs' is not installed.*pip install "
                       r"gcsfs"):
        storage.read_bytes("gs://bucket/manifest.csv")


def test_unknown_scheme_is_a_clear_error():
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="unknown URL scheme 'nosuch'"):
        storage.read_bytes("nosuch://bucket/key")


# --- Bucket to bucket ----------------------------------------------------------------------


@pytest.mark.slow
def test_s3_beam_then_dask_overwrite_bucket_to_bucket(s3_store, s3_slides, reference, capsys):
    out = f"{s3_store.root}/out-beam"
    assert cli_main(_argv("beam", s3_slides, out, s3_store, "--workers", "1")) == 0
    assert _bucket_files(s3_store, out) == reference
    names = storage.listdir(out)
    assert _output.LOCK_NAME not in names and _job.STAGING_DIR not in names
    text = storage.read_text(f"{out}/manifest.json")  # never the options (credentials)
    assert "storage_options" not in text and "testing" not in text
    accounting = json.loads(text)["accounting"]
    assert accounting["output_requests"] > 0 and accounting["bytes_written"] > sum(
        len(v) for v in reference.values())
    # A finished dataset is refused without --overwrite, by name.
    capsys.readouterr()
    assert cli_main(_argv("dask", s3_slides, out, s3_store, "--workers", "2")) == 1
    assert "already holds a finished SoftMix dataset" in capsys.readouterr().err
    # --overwrite: Dask with 2 workers replaces it, same bytes; a foreign file stays.
    storage.write_bytes(f"{out}/.notes-kept", b"x")  # hidden: not ours, never deleted
    storage.remove(f"{out}/.notes-kept")
    before = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert cli_main(_argv("dask", s3_slides, out, s3_store, "--workers", "2",
                          "--overwrite")) == 0
    after = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert after["params"]["engine"] == "dask" and before["params"]["engine"] == "beam"
    assert _bucket_files(s3_store, out) == reference
    # read_dataset of the bucket (TF has no s3://: read through fsspec), like local.
    from pipeline import read_dataset

    examples = list(read_dataset(out, as_dict=True).as_numpy_iterator())
    assert len(examples) == 72
    local = [r for name in SHARDS for r in iter_records(io.BytesIO(reference[name]))]
    ids = sorted(e["example_id"].decode() for e in examples)
    from pipeline.dataset.schema import decode_example

    assert ids == sorted(decode_example(r)["example_id"] for r in local)


@pytest.mark.slow
def test_gcs_beam_bucket_to_bucket_v04_slides(gcs_store, gcs_slides, reference):
    out = f"{gcs_store.root}/out-beam"
    assert cli_main(_argv("beam", gcs_slides, out, gcs_store, "--workers", "1")) == 0
    assert _bucket_files(gcs_store, out) == reference
    from pipeline import read_dataset

    images = [image for image, _ in read_dataset(out).as_numpy_iterator()]
    assert len(images) == 72 and images[0].shape == (128, 128, 3)


@pytest.mark.slow
def test_stream_dataset_from_bucket_equals_local(s3_store, s3_slides, tmp_path):
    from pipeline import stream_dataset

    local = write_synthetic_dataset(tmp_path / "data")
    options = {"tile_size": 128, "num_mixes": 1, "seed": 3, "epoch": 0, "batch_size": 4,
               "as_dict": True}
    from_bucket = list(stream_dataset(s3_slides, storage_options=s3_store.options_json,
                                      **options).take(3).as_numpy_iterator())
    from_disk = list(stream_dataset(str(local.manifest_path), **options)
                     .take(3).as_numpy_iterator())
    assert len(from_bucket) == 3
    for a, b in zip(from_bucket, from_disk, strict=True):
        assert list(a["example_id"]) == list(b["example_id"])
        np.testing.assert_array_equal(a["image"], b["image"])


# --- Kill and resume on a bucket -----------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_resume_on_s3_is_byte_identical(s3_store, s3_slides, reference, tmp_path):
    from .test_resume import _run

    out = f"{s3_store.root}/out-resume"
    argv = _argv("dask", s3_slides, out, s3_store, "--workers", "2")
    proc = _run(argv, tmp_path, SOFTMIX_TEST_BUCKET_PAUSE="3")
    buckets = f"{out.split('://', 1)[1]}/{_job.STAGING_DIR}/buckets"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if s3_store.fs.exists(buckets) and any(
                    p.endswith(".tfrecord.json") for p in s3_store.fs.ls(buckets, refresh=True)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not storage.exists(f"{out}/manifest.json")
    assert cli_main(argv) == 1  # leftovers refused without a flag
    resumed = _run([*argv, "--resume"], tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    assert _bucket_files(s3_store, out) == reference
    manifest = json.loads(storage.read_text(f"{out}/manifest.json"))
    assert manifest["accounting"]["resumed"]["buckets"] >= 1
    assert manifest["accounting"]["resumed"]["plans"] == 4


# --- The lock ------------------------------------------------------------------------------


@pytest.mark.parametrize("store_name", ["s3_store", "gcs_store"])
def test_lock_race_exactly_one_wins(store_name, request):
    store = request.getfixturevalue(store_name)
    out = f"{store.root}/race-{store.protocol}"
    barrier = threading.Barrier(6)
    results: list[object] = []

    def take() -> None:
        barrier.wait()
        try:
            results.append(storage.create_exclusive(f"{out}/{_output.LOCK_NAME}", b"{}"))
        except FileExistsError as err:
            results.append(err)

    threads = [threading.Thread(target=take) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r is None for r in results) == 1
    assert sum(isinstance(r, FileExistsError) for r in results) == 5
    storage.remove(f"{out}/{_output.LOCK_NAME}")


def test_second_run_is_refused_by_name_and_dead_lock_taken_over(s3_store, s3_slides,
                                                                 monkeypatch, capsys):
    out = f"{s3_store.root}/locked"
    holder = subprocess.Popen(  # a live run on this host holds OUT
        [sys.executable, "-c", (
            "import sys, time; from pipeline.io import storage; "
            "from pipeline.run.output import acquire_output_lock; "
            f"storage.configure({s3_store.options_json!r}); "
            f"acquire_output_lock({out!r}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert cli_main(_argv("beam", s3_slides, out, s3_store)) == 1
        err = capsys.readouterr().err
        assert f"is locked by pid {holder.pid}" in err and "Another run is writing" in err
    finally:
        holder.kill()
        holder.wait()
    # A lock of another host whose heartbeat is older than the lease is taken over.
    stale = {"pid": 1, "host": "elsewhere", "since": "x", "run_id": "dead",
             "heartbeat": time.time() - 100, "lease_s": 30}
    storage.write_text(f"{out}/{_output.LOCK_NAME}", json.dumps(stale))
    lock = _output.acquire_output_lock(out)
    assert _output.read_output_lock(out)["run_id"] == lock["run_id"]
    # ... but a fresh one is not.
    assert _output.release_output_lock(out, run_id=lock["run_id"])
    storage.write_text(f"{out}/{_output.LOCK_NAME}",
                       json.dumps({**stale, "heartbeat": time.time()}))
    with pytest.raises(Exception, match="host 'elsewhere'"):
        _output.acquire_output_lock(out)
    storage.remove(f"{out}/{_output.LOCK_NAME}")


# --- Request economy, counted by the S3 server ---------------------------------------------


def test_requests_the_server_sees(s3_store):
    server, base = s3_store.server, f"{s3_store.root}/economy"
    data = bytes(range(256)) * 400
    server.reset_requests()
    storage.write_bytes(f"{base}/blob.bin", data)
    assert storage.read_bytes(f"{base}/blob.bin") == data
    ranges = [(1000, 50), (1100, 10), (5000, 300), (90_000, 7), (4000, 20)]
    assert storage.read_ranges(f"{base}/blob.bin", ranges, gap=60_000) == [
        data[o:o + n] for o, n in ranges]
    seen = server.requests()
    # One PUT, one GET for the whole object (no HEAD first), and the five ranges in two
    # GETs (neighbours coalesced; the one 85 kB further on alone).
    assert (seen.get("PUT"), seen.get("GET"), seen.get("HEAD", 0)) == (1, 3, 0)
    server.reset_requests()
    with pytest.raises(FileNotFoundError):
        storage.read_json(f"{base}/missing.json")  # a sidecar check: one GET, no HEAD
    assert server.requests().get("GET") == 1 and "HEAD" not in server.requests()


def test_writer_commits_only_on_success(s3_store, tmp_path):
    for base in (str(tmp_path), f"{s3_store.root}/writer"):
        with pytest.raises(RuntimeError), storage.writer(f"{base}/x.bin") as handle:
            handle.write(b"partial")
            raise RuntimeError("the task died")
        assert not storage.exists(f"{base}/x.bin") and storage.listdir(base) == []
        with storage.writer(f"{base}/x.bin") as handle:
            handle.write(b"whole")
        assert storage.read_bytes(f"{base}/x.bin") == b"whole"
        with pytest.raises(FileExistsError):
            storage.create_exclusive(f"{base}/x.bin", b"again")


def test_lock_heartbeat_renews_the_lease(gcs_store, monkeypatch):
    monkeypatch.setenv("SOFTMIX_LOCK_LEASE_S", "1.5")
    out = f"{gcs_store.root}/heartbeat"
    lock = _output.acquire_output_lock(out)
    try:
        deadline = time.monotonic() + 20
        while _output.read_output_lock(out)["heartbeat"] == lock["heartbeat"]:
            assert time.monotonic() < deadline, "the heartbeat was never renewed"
            time.sleep(0.2)
        assert _output.read_output_lock(out)["run_id"] == lock["run_id"]
    finally:
        assert _output.release_output_lock(out, run_id=lock["run_id"])
    assert _output.read_output_lock(out) is None


@pytest.mark.parametrize("store_name", ["s3_store", "gcs_store"])
def test_missing_bucket_is_named(store_name, request):
    from pipeline.errors import PipelineError

    store = request.getfixturevalue(store_name)
    with pytest.raises(PipelineError, match="the bucket .*no-such-bucket.* does not exist"):
        _output.ensure_output_dir(f"{store.protocol}://no-such-bucket/out")
    assert _output.ensure_output_dir(f"{store.root}/fresh-out") is True


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_shards_on_a_bucket_equal_local_shards(s3_store, tmp_path, compression):
    from pipeline.dataset.shards import merge_shards, write_shard

    records = [(f"id-{i:03d}", bytes([i]) * (i * 37)) for i in range(40)]
    local = write_shard(str(tmp_path / "a.tfrecord"), records, compression=compression)
    remote = write_shard(f"{s3_store.root}/shards/a.tfrecord", records,
                         compression=compression)
    data = (tmp_path / "a.tfrecord").read_bytes()
    assert storage.read_bytes(f"{s3_store.root}/shards/a.tfrecord") == data
    assert (remote.num_bytes, remote.crc32) == (local.num_bytes, local.crc32)
    with storage.open_read(f"{s3_store.root}/shards/a.tfrecord", block_size=1024) as handle:
        assert list(iter_records(handle, compression=compression)) == [r for _, r in records]
    # A shard merged from parts on the bucket equals the one written at once.
    parts = []
    for k in range(2):
        part = records[k::2]
        write_shard(f"{s3_store.root}/shards/part-{k}", part)
        parts.append((f"{s3_store.root}/shards/part-{k}", [i for i, _ in part]))
    merged = merge_shards(f"{s3_store.root}/shards/m.tfrecord", parts, compression=compression)
    assert storage.read_bytes(f"{s3_store.root}/shards/m.tfrecord") == data
    assert merged.num_examples == 40
