"""Tests of pipeline.remote: the `latency://` simulated bucket (latency + request counts)."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time

import fsspec
import numpy as np
import pytest

from pipeline import remote
from pipeline.io.slides import open_slide
from pipeline.remote import LATENCY_ENV, LatencyFileSystem, RemoteStats

from .conftest import synthetic_tissue, write_ome_zarr

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_latency(monkeypatch):
    monkeypatch.delenv(LATENCY_ENV, raising=False)
    remote.reset_stats()


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> tuple[pathlib.Path, np.ndarray]:
    """A 512 px OME-Zarr v0.5 slide in 128-px chunks (4 x 4 per level-0 plane)."""
    image = synthetic_tissue(512, 512, [(64, 64, 448, 448)], seed=3)
    path = write_ome_zarr(tmp_path_factory.mktemp("remote") / "s.ome.zarr", image, chunk=128)
    return path, image


def _chunk_bytes(path: pathlib.Path, rows: range, cols: range) -> int:
    """Size on disk of level 0's chunk files (v0.5 keys ``s0/c/<c>/<y>/<x>``)."""
    level0 = next(p for p in path.iterdir() if p.is_dir() and p.name in ("0", "s0"))
    return sum((level0 / "c" / "0" / str(y) / str(x)).stat().st_size for y in rows for x in cols)


@pytest.mark.parametrize("scheme", ["latency://", "latency::file://"])
def test_region_reads_count_the_chunk_files(slide_path, scheme):
    path, image = slide_path
    slide = open_slide(f"{scheme}{path}", slide_id="s")
    opened = remote.reset_stats()
    assert opened.info == 0 and opened.get >= 1  # no exists() (a HEAD): the metadata only
    assert opened.range == opened.write == 0
    region = slide.read_region(0, x=100, y=100, width=100, height=100)  # chunks (0-1, 0-1)
    np.testing.assert_array_equal(region, image[100:200, 100:200])
    expected = _chunk_bytes(path, range(2), range(2))
    assert remote.reset_stats() == RemoteStats(get=4, bytes_read=expected)
    np.testing.assert_array_equal(slide.read_level(0), image)
    assert remote.stats() == RemoteStats(get=16, bytes_read=_chunk_bytes(path, range(4), range(4)))
    assert remote.stats().requests == remote.stats().reads == 16


def test_concurrent_requests_overlap_their_latency(slide_path):
    path, _ = slide_path
    fs = LatencyFileSystem(latency_ms=50, asynchronous=True)
    chunk = str(path / "s0" / "c" / "0" / "0" / "0")

    async def ten_reads() -> list[bytes]:
        return await asyncio.gather(*(fs._cat_file(chunk) for _ in range(10)))

    start = time.perf_counter()
    data = asyncio.run(ten_reads())
    elapsed = time.perf_counter() - start
    assert len(set(data)) == 1 and remote.stats().get == 10
    assert 0.05 <= elapsed < 0.25, f"10 concurrent 50 ms reads took {elapsed * 1e3:.0f} ms"
    sync_fs = LatencyFileSystem(latency_ms=50)
    start = time.perf_counter()
    sync_fs.cat_file(chunk)
    assert time.perf_counter() - start >= 0.05


def test_latency_through_zarr_applies_per_request_and_overlaps(slide_path, monkeypatch):
    path, image = slide_path
    monkeypatch.setenv(LATENCY_ENV, "50")
    slide = open_slide(f"latency://{path}")
    remote.reset_stats()
    start = time.perf_counter()
    np.testing.assert_array_equal(slide.read_level(0), image)  # 16 chunks
    elapsed = time.perf_counter() - start
    assert remote.stats().get == 16
    # zarr fetches chunks concurrently (10 at a time by default): 2 rounds, not 16.
    assert 0.05 <= elapsed < 16 * 0.05 / 2, f"16 chunk reads took {elapsed * 1e3:.0f} ms"


def test_latency_from_the_option_else_the_environment(monkeypatch, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 10)
    env_fs = LatencyFileSystem()
    assert env_fs.latency_ms == 0.0
    monkeypatch.setenv(LATENCY_ENV, "12.5")
    assert env_fs.latency_ms == 12.5  # read per request, so a cached instance follows it
    assert LatencyFileSystem(latency_ms=3).latency_ms == 3.0
    fs, path = fsspec.core.url_to_fs(f"latency://{tmp_path}/f", latency_ms=7)
    assert fs.latency_ms == 7.0 and path == f"{tmp_path}/f"
    monkeypatch.setenv(LATENCY_ENV, "soon")
    with pytest.raises(ValueError, match="SOFTMIX_LATENCY_MS must be a number"):
        env_fs.cat_file(f"{tmp_path}/f")
    with pytest.raises(ValueError, match="latency_ms"):
        LatencyFileSystem(latency_ms=-1)


def test_every_kind_of_request_is_counted(tmp_path):
    fs = fsspec.filesystem("latency")
    root = f"latency://{tmp_path}"
    fs.pipe_file(f"{root}/a/b.bin", b"0123456789")
    assert fs.cat_file(f"{root}/a/b.bin", start=2, end=5) == b"234"
    assert fs.exists(f"{root}/a/b.bin") and fs.info(f"{root}/a/b.bin")["size"] == 10
    assert [pathlib.Path(p).name for p in fs.ls(f"{root}/a", detail=False)] == ["b.bin"]
    with fs.open(f"{root}/a/b.bin", "rb") as handle:  # info + one block fetch
        assert handle.read() == b"0123456789"
    with fs.open(f"{root}/a/c.bin", "wb") as handle:
        handle.write(b"abc")
    assert remote.stats().as_dict() == {
        "get": 0,
        "range": 2,
        "list": 1,
        "info": 3,
        "write": 2,
        "bytes_read": 13,
        "bytes_written": 13,
        "requests": 8,
    }
    assert remote.reset_stats().requests == 8 and remote.stats() == RemoteStats()
    fs.rm(f"{root}/a", recursive=True)  # a listing, then one removal per object
    assert not (tmp_path / "a").exists()
    assert remote.stats().write == 2 and remote.stats().list >= 1


def test_chained_over_another_filesystem():
    memory = fsspec.filesystem("memory")
    memory.pipe_file("/remote-test/x.bin", b"hello")
    try:
        with fsspec.open("latency::memory://remote-test/x.bin", "rb") as handle:
            assert handle.read() == b"hello"
        fs, path = fsspec.core.url_to_fs("latency::memory://remote-test/x.bin")
        assert isinstance(fs, LatencyFileSystem) and fs.target_protocol == "memory"
        assert fs.cat_file(path) == b"hello"
    finally:
        memory.rm("/remote-test", recursive=True)
    assert remote.stats().get == 1 and remote.stats().range == 1


def test_protocol_is_found_in_a_fresh_process(slide_path):
    """The fsspec entry point: a worker process knows `latency://` without our import."""
    path, _ = slide_path
    code = f"""
import json, sys, time
import zarr
before = "pipeline" in sys.modules
group = zarr.open_group("latency://{path}", mode="r")
first = not before and "pipeline.remote" in sys.modules  # fsspec imported it, not us
start = time.perf_counter()
group["s0"][0, :128, :128]
elapsed = time.perf_counter() - start
from pipeline import remote
print(json.dumps({{"first": first, "elapsed": elapsed, **remote.stats().as_dict()}}))
"""
    env = {**os.environ, LATENCY_ENV: "40"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT / "tests",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["first"], "fsspec must load pipeline.remote itself (entry point)"
    assert result["get"] >= 2 and result["elapsed"] >= 0.04  # metadata + chunk, 40 ms each
