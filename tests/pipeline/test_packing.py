"""Chunk-once reading into tile packs: exact pixels, exact chunk/byte counts, bad chunks."""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
import pytest

from pipeline.config import TileConfig
from pipeline.io.slides import open_slide
from pipeline.io.store import ReadStats
from pipeline.records import SlideRecord, TileKey, TileRecord
from pipeline.steps.pack import PackReader, StripTask, pack_strip, split_plan
from pipeline.steps.plan import plan_slide

from .conftest import synthetic_tissue, write_ome_zarr


def _slide(tmp_path: pathlib.Path, *, size: int = 512, chunk: int = 128, dtype=np.uint8,
           name: str = "s.ome.zarr") -> tuple[pathlib.Path, np.ndarray]:
    image = synthetic_tissue(size, size, ((0, 0, size, size),), seed=3)
    if dtype != np.uint8:
        image = image.astype(dtype)
    path = write_ome_zarr(tmp_path / name, image, chunk=chunk, scale_factors=(2,))
    return path, image


def _record(path: pathlib.Path) -> SlideRecord:
    return SlideRecord("s", str(path), "he", 0)


def _chunk_files(path: pathlib.Path, level: str = "s0") -> dict[str, int]:
    root = path / level / "c"
    return {str(p.relative_to(path)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def _strips(path, tile_size=128, stride=None):
    record = _record(path)
    plan = plan_slide(record, TileConfig(tile_size=tile_size, stride=stride, min_tissue=0.0))
    return record, plan, split_plan(record, plan, tile_size)


def test_every_chunk_is_read_once_and_tiles_are_exact(tmp_path):
    path, image = _slide(tmp_path)
    record, plan, strips = _strips(path)
    assert [s.strip for s in strips] == [0, 1, 2, 3]
    assert [len(s.tiles) for s in strips] == [4, 4, 4, 4]
    # Concatenated strips are the plan's tiles in key order (what pairing indexes).
    assert [t for s in strips for t in s.tiles] == list(plan.tiles)
    chunks = _chunk_files(path)
    results = [pack_strip(task, str(tmp_path / "staging")) for task in strips]
    # One chunk holds all 3 channels.
    assert sum(r.chunks_read for r in results) == len(chunks) == 16
    chunk_bytes = sum(chunks.values())
    assert sum(r.bytes_needed for r in results) == chunk_bytes
    read = sum(r.bytes_read for r in results)
    assert chunk_bytes < read < chunk_bytes * 1.2  # the rest is metadata
    reader = PackReader()
    for result in results:
        assert result.skipped == ()
        pixels = reader.read_many([(result.pack, i) for i in range(len(result.tiles))])
        for tile, got in zip(result.tiles, pixels, strict=True):
            x, y = tile.key.x, tile.key.y
            np.testing.assert_array_equal(got, image[y:y + 128, x:x + 128])
        record = reader.record(result.pack, 1, label=0, group=None)
        assert record == result.tiles[1]


def test_raw_packs_hold_the_same_tiles_uncompressed(tmp_path):
    """codec="raw" (the stream's cache): tile bytes as they are, the same pixels back
    through `PackReader`; a pack is reused only by a packing with the same codec."""
    path, image = _slide(tmp_path)
    _, _, strips = _strips(path)
    task = dataclasses.replace(strips[1], content="fingerprint")  # reusable
    raw = pack_strip(task, str(tmp_path / "raw"), codec="raw")
    assert raw.pack_bytes == len(task.tiles) * 128 * 128 * 3 and not raw.reused
    got = PackReader().read_many([(raw.pack, i) for i in range(len(raw.tiles))])
    for tile, pixels in zip(raw.tiles, got, strict=True):
        x, y = tile.key.x, tile.key.y
        np.testing.assert_array_equal(pixels, image[y:y + 128, x:x + 128])
    assert pack_strip(task, str(tmp_path / "raw"), codec="raw").reused
    assert not pack_strip(task, str(tmp_path / "raw")).reused  # zstd: packed again
    with pytest.raises(ValueError, match="`codec` must be one of"):
        pack_strip(task, str(tmp_path / "raw"), codec="lz4")


def test_unaligned_tiles_are_exact_and_amplification_is_reported(tmp_path):
    path, image = _slide(tmp_path)
    _, plan, strips = _strips(path, tile_size=96, stride=80)
    results = [pack_strip(task, str(tmp_path / "staging")) for task in strips]
    reader = PackReader()
    count = 0
    for result in results:
        pixels = reader.read_many([(result.pack, i) for i in range(len(result.tiles))])
        for tile, got in zip(result.tiles, pixels, strict=True):
            x, y = tile.key.x, tile.key.y
            np.testing.assert_array_equal(got, image[y:y + 96, x:x + 96])
            count += 1
    assert count == len(plan.tiles) == 36
    chunks = _chunk_files(path)
    # Each block is owned by one strip: the denominator counts every chunk once.
    assert sum(r.bytes_needed for r in results) == sum(chunks.values())
    # Tiles crossing a chunk column make their left strip read the next column too.
    assert sum(r.chunks_read for r in results) > len(chunks)


def test_read_cache_bounds_rows_read_at_once(tmp_path):
    path, _ = _slide(tmp_path, size=512, chunk=64)
    _, _, strips = _strips(path)
    # 64-px chunk rows of a 128-px-wide strip: 64 * 128 * 3 bytes = 24 KiB per row.
    small = pack_strip(strips[0], str(tmp_path / "a"), read_cache_mb=24 / 1024)
    large = pack_strip(strips[0], str(tmp_path / "b"), read_cache_mb=64)
    assert small.chunks_read == large.chunks_read  # once each, whatever the cache
    reader = PackReader()
    np.testing.assert_array_equal(
        reader.read_many([(small.pack, 3)])[0], reader.read_many([(large.pack, 3)])[0])


def test_missing_chunk_is_a_skip_not_black_tissue(tmp_path):
    path, _ = _slide(tmp_path)
    _, _, strips = _strips(path)
    # Gone after planning (which counts chunks missing then, test_tiling), so the pack
    # is the last line of defence.
    os.remove(path / "s0" / "c" / "0" / "1" / "2")  # block (row 1, col 2), all channels
    results = {r.strip: r for r in (pack_strip(t, str(tmp_path / "st")) for t in strips)}
    assert results[2].skipped == (("missing_chunk", 1),)
    assert len(results[2].tiles) == 3
    assert TileKey("s", 0, 256, 128) not in {t.key for t in results[2].tiles}
    assert "missing_chunk" in results[2].messages[0]
    assert all(results[s].skipped == () for s in (0, 1, 3))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_pixels_are_one_skip_reason(tmp_path, bad):
    image = synthetic_tissue(256, 256, ((0, 0, 256, 256),)).astype(np.float32)
    image[10, 200, 1] = bad
    path = write_ome_zarr(tmp_path / "f.ome.zarr", image, chunk=128, scale_factors=(2,))
    _, _, strips = _strips(path)
    results = [pack_strip(t, str(tmp_path / "st")) for t in strips]
    assert [r.skipped for r in results] == [(), (("nonfinite_pixels", 1),)]
    assert sum(len(r.tiles) for r in results) == 3


def test_corrupt_chunk_costs_only_its_tiles(tmp_path):
    path, image = _slide(tmp_path)
    (path / "s0" / "c" / "0" / "2" / "0").write_bytes(b"not zstd at all")
    _, _, strips = _strips(path)
    result = pack_strip(strips[0], str(tmp_path / "st"))
    assert result.skipped == (("read_error", 1),)
    assert [t.key.y for t in result.tiles] == [0, 128, 384]
    got = PackReader().read_many([(result.pack, 2)])[0]
    np.testing.assert_array_equal(got, image[384:512, 0:128])


def test_counting_store_counts_requests_bytes_and_misses(tmp_path):
    path, _ = _slide(tmp_path)
    slide = open_slide(path)
    stats: ReadStats = slide.read_stats
    before = stats.bytes_read
    slide.read_region(0, 0, 0, 128, 128)
    chunks = _chunk_files(path)
    one_block = sum(v for k, v in chunks.items() if k.endswith("/0/0"))
    assert stats.bytes_read - before == one_block
    assert stats.chunks_read == 1 and not stats.missing


def test_strip_task_is_small_and_picklable(tmp_path):
    import pickle

    path, _ = _slide(tmp_path)
    _, _, strips = _strips(path)
    task = pickle.loads(pickle.dumps(strips[1]))
    assert isinstance(task, StripTask) and task == strips[1]
    assert all(isinstance(t, TileRecord) for t in task.tiles)
    assert task.owned_blocks == tuple((r, 1) for r in range(4))
