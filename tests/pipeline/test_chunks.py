"""Direct chunk reads (`pipeline.io.chunks`) give what Zarr gives, pixel for pixel and
read for read, and step aside for the arrays they do not read exactly."""

from __future__ import annotations

import os
from unittest import mock

import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec

from pipeline.io.chunks import ChunkReader, chunk_reader
from pipeline.io.slides import open_slide

from .conftest import write_ome_zarr

_V3 = {"none": None, "zstd": ZstdCodec(), "blosc": BloscCodec(), "gzip": GzipCodec()}
_V2 = {"none": None, "zstd": numcodecs.Zstd(), "blosc": numcodecs.Blosc(),
       "gzip": numcodecs.GZip()}


def _write(path, data, axes, chunks, zarr_format, compressor, fill_value=0):
    array = zarr.create_array(
        store=str(path), shape=data.shape, chunks=chunks, dtype=data.dtype,
        zarr_format=zarr_format, fill_value=fill_value,
        compressors=(_V3 if zarr_format == 3 else _V2)[compressor],
        **({"dimension_names": list(axes)} if zarr_format == 3 else {}),
    )
    array[...] = data
    return array


def _stats(slide):
    stats = slide.read_stats
    return stats.chunks_read, stats.bytes_read, sorted(stats.missing), dict(stats.sizes)


@settings(max_examples=60, deadline=None)
@given(
    axes=st.sampled_from(["yx", "cyx", "yxc", "tczyx", "zcyx"]),
    zarr_format=st.sampled_from([2, 3]),
    compressor=st.sampled_from(["none", "zstd", "blosc", "gzip"]),
    dtype=st.sampled_from(["uint8", "uint16", "float32"]),
    size=st.tuples(st.integers(5, 40), st.integers(5, 40)),
    chunk=st.tuples(st.integers(3, 16), st.integers(3, 16), st.integers(1, 3)),
    region=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
    drop=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_direct_reads_equal_zarrs(tmp_path_factory, axes, zarr_format, compressor, dtype,
                                  size, chunk, region, drop, seed):
    rng = np.random.default_rng(seed)
    height, width = size
    shape = [{"y": height, "x": width, "c": 3}.get(a, 1) for a in axes]
    data = (rng.random(shape) * 60000).astype(dtype)
    chunks = [{"y": chunk[0], "x": chunk[1], "c": chunk[2]}.get(a, 1) for a in axes]
    path = tmp_path_factory.mktemp("arr") / "a.zarr"
    array = _write(path, data, axes, chunks, zarr_format, compressor, fill_value=7)
    # Some chunks missing (a writer that skipped them, or lost files).
    chunk_files = sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names
        if name not in (".zarray", ".zattrs", ".zgroup", "zarr.json"))
    for index in rng.permutation(len(chunk_files))[:drop]:
        os.remove(chunk_files[index])
    direct = open_slide(str(path), axes=axes)
    with mock.patch.dict(os.environ, {"SOFTMIX_DIRECT_CHUNKS": "0"}):
        through_zarr = open_slide(str(path), axes=axes)
        assert through_zarr._chunk_reader(0) is None
    assert isinstance(direct._chunk_reader(0), ChunkReader), array.metadata
    y0 = int(region[0] * (height - 1))
    x0 = int(region[1] * (width - 1))
    h = 1 + int(region[2] * (height - y0 - 1))
    w = 1 + int(region[3] * (width - x0 - 1))
    got = direct.read_region(0, x0, y0, w, h)
    want = through_zarr.read_region(0, x0, y0, w, h)
    assert got.dtype == want.dtype and got.shape == want.shape == (h, w, 3 if "c" in axes else 1)
    np.testing.assert_array_equal(got, want)
    assert _stats(direct) == _stats(through_zarr)


def test_a_missing_chunk_reads_as_fill_and_is_recorded(tmp_path):
    data = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    _write(tmp_path / "a.zarr", data, "cyx", (3, 4, 4), 3, "zstd", fill_value=9)
    os.remove(tmp_path / "a.zarr" / "c" / "0" / "1" / "0")
    slide = open_slide(str(tmp_path / "a.zarr"), axes="cyx")
    region = slide.read_region(0, 0, 0, 8, 8)
    assert (region[4:, :4] == 9).all()
    np.testing.assert_array_equal(region[:4], np.moveaxis(data, 0, -1)[:4])
    assert slide.read_stats.missing == {"c/0/1/0"}
    assert slide.read_stats.chunks_read == 3


def test_a_corrupt_chunk_raises(tmp_path):
    data = np.ones((8, 8), np.uint16)
    _write(tmp_path / "a.zarr", data, "yx", (4, 4), 3, "zstd")
    (tmp_path / "a.zarr" / "c" / "1" / "1").write_bytes(b"not zstd at all")
    slide = open_slide(str(tmp_path / "a.zarr"), axes="yx")
    np.testing.assert_array_equal(slide.read_region(0, 0, 0, 4, 4)[..., 0], data[:4, :4])
    with pytest.raises(Exception):  # noqa: B017 - the codec's own error type
        slide.read_region(0, 4, 4, 4, 4)
    (tmp_path / "a.zarr" / "c" / "1" / "1").write_bytes(numcodecs.Zstd().encode(b"\0" * 10))
    with pytest.raises(ValueError, match="decodes to 10 bytes, not the 32"):
        slide.read_region(0, 4, 4, 4, 4)


def test_arrays_zarr_must_read_keep_zarrs_path(tmp_path):
    data = np.arange(64, dtype=np.uint16).reshape(8, 8)
    sharded = zarr.create_array(store=str(tmp_path / "sharded.zarr"), shape=(8, 8),
                                chunks=(2, 2), shards=(4, 4), dtype="uint16")
    sharded[...] = data
    big = zarr.create_array(store=str(tmp_path / "big.zarr"), shape=(8, 8), chunks=(4, 4),
                            dtype="uint16", serializer=BytesCodec(endian="big"))
    big[...] = data
    memory = zarr.create_array(store=zarr.storage.MemoryStore(), shape=(8, 8),
                               chunks=(4, 4), dtype="uint16")
    for array in (sharded, big, memory):
        assert chunk_reader(array) is None
    plain = _write(tmp_path / "plain.zarr", data, "yx", (4, 4), 3, "zstd")
    assert isinstance(chunk_reader(plain), ChunkReader)
    with mock.patch.dict(os.environ, {"SOFTMIX_DIRECT_CHUNKS": "0"}):
        assert chunk_reader(plain) is None
    for name in ("sharded", "big"):  # and they still read right, through Zarr
        slide = open_slide(str(tmp_path / f"{name}.zarr"), axes="yx")
        np.testing.assert_array_equal(slide.read_region(0, 1, 2, 6, 5)[..., 0],
                                      data[2:7, 1:7])


def test_label_image_reads_count_in_the_slides_stats(tmp_path):
    """A label image's chunks are recorded in its slide's `ReadStats`, as through Zarr
    (the run reports them: plans with soft labels read them)."""
    image = np.full((96, 96, 3), 200, np.uint8)
    labels = np.ones((96, 96), np.uint8)
    labels[:, 40:] = 2
    path = write_ome_zarr(tmp_path / "s.ome.zarr", image, labels={"classes": labels},
                          chunk=32)
    counts = []
    for switch in ("1", "0"):
        with mock.patch.dict(os.environ, {"SOFTMIX_DIRECT_CHUNKS": switch}):
            slide = open_slide(str(path))
            label = slide.label_image("classes")
            assert (label._chunk_reader(0) is None) == (switch == "0")
            before = slide.read_stats.chunks_read
            np.testing.assert_array_equal(label.read_region(0, 20, 10, 40, 50)[..., 0],
                                          labels[10:60, 20:60])
            counts.append((slide.read_stats.chunks_read - before,
                           sorted(k for k in slide.read_stats.sizes if "labels" in k)))
    assert counts[0] == counts[1] and counts[0][0] >= 1
