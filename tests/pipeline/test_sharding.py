"""Tests of pipeline.dataset.shards: names, stable assignment, atomic sorted writes."""

from __future__ import annotations

import collections
import os
import random

import pytest
import tensorflow as tf

from pipeline.dataset import shards as _sharding
from pipeline.dataset.shards import (
    ShardInfo,
    filepath_template,
    num_shards_for,
    shard_filename,
    shard_for,
    write_shard,
)


def read_records(path, compression=None):
    return [r.numpy() for r in tf.data.TFRecordDataset(path, compression_type=compression or "")]


def make_records(n):
    return [(f"s/L0/x{i}/y0#m0", f"payload-{i}".encode() * (i % 5 + 1)) for i in range(n)]


def test_names():
    assert shard_filename("softmix", 0, 16) == "softmix-00000-of-00016.tfrecord"
    assert shard_filename("my-data", 15, 16) == "my-data-00015-of-00016.tfrecord"
    assert shard_filename("big", 3, 123456) == "big-00003-of-123456.tfrecord"
    assert filepath_template("a{b}") == "a{{b}}-{SHARD_X_OF_Y}.tfrecord"
    assert _sharding.SHARD_PATTERN.match(shard_filename("x", 1, 2))
    with pytest.raises(ValueError, match="index"):
        shard_filename("softmix", 16, 16)


def test_shard_for_is_stable_and_spread():
    ids = [f"s/L0/x{i}/y0#m0" for i in range(4000)]
    counts = collections.Counter(shard_for(i, 8) for i in ids)
    assert sorted(counts) == list(range(8))
    assert min(counts.values()) > 400
    assert shard_for(ids[0], 8) == shard_for(ids[0], 8)
    assert shard_for("s/L0/x0/y0#m0", 16) == 15  # pinned: changing it reshuffles datasets
    with pytest.raises(ValueError, match="num_shards"):
        shard_for("x", 0)


def test_num_shards_for():
    assert num_shards_for(1000, 200_000, 100.0) == 2
    assert num_shards_for(3, 10**9, 1.0) == 3
    assert num_shards_for(0, 1, 1.0) == 1
    with pytest.raises(ValueError, match="shard_size_mb"):
        num_shards_for(1, 1, 0)


@pytest.mark.parametrize("compression", [None, "GZIP"])
def test_sorted_bytes_independent_of_input_order(tmp_path, compression):
    records = make_records(50)
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)
    first = write_shard(str(tmp_path / "a.tfrecord"), records, compression=compression)
    second = write_shard(str(tmp_path / "b.tfrecord"), shuffled, compression=compression)
    assert (tmp_path / "a.tfrecord").read_bytes() == (tmp_path / "b.tfrecord").read_bytes()
    assert first == ShardInfo("a.tfrecord", 50, os.path.getsize(tmp_path / "a.tfrecord"))
    expected = [payload for _, payload in sorted(records)]
    assert read_records(str(tmp_path / "a.tfrecord"), compression) == expected
    assert second.num_examples == 50
    if compression:
        assert (tmp_path / "a.tfrecord").read_bytes()[:2] == b"\x1f\x8b"


def test_retry_replaces_and_dedupes(tmp_path):
    path = str(tmp_path / "x-00000-of-00001.tfrecord")
    records = make_records(10)
    write_shard(path, records[:3])
    info = write_shard(path, records + records[:4])  # a retried task, duplicates included
    assert info.num_examples == 10
    assert len(read_records(path)) == 10
    assert sorted(os.listdir(tmp_path)) == ["x-00000-of-00001.tfrecord"]
    with pytest.raises(ValueError, match="unique"):
        write_shard(path, [("id", b"1"), ("id", b"2")])


def test_failure_leaves_no_file(tmp_path):
    path = str(tmp_path / "x-00000-of-00001.tfrecord")

    def records():
        yield ("a", b"1")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_shard(path, records())
    assert os.listdir(tmp_path) == []


def test_write_is_temp_then_rename(tmp_path, monkeypatch):
    path = str(tmp_path / "x-00000-of-00001.tfrecord")
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.basename(src), sorted(os.listdir(tmp_path))))
        assert not os.path.exists(dst)  # nothing under the final name before the rename
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_shard(path, make_records(3))
    ((temp, listing),) = seen
    assert temp.startswith(".x-00000-of-00001.tfrecord.tmp-") and listing == [temp]
    assert not _sharding.SHARD_PATTERN.match(temp)
    assert sorted(os.listdir(tmp_path)) == ["x-00000-of-00001.tfrecord"]


def test_write_failure_is_wrapped(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(RuntimeError, match="failed to write shard"):
        write_shard(str(tmp_path / "x.tfrecord"), make_records(2))
    assert os.listdir(tmp_path) == []
