"""Config dataclasses validate early, with the `Received:` form."""

from __future__ import annotations

import pytest

from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig, parse_grid


@pytest.mark.parametrize(("value", "expected"), [
    (4, (4, 4)), ("4", (4, 4)), ("4x6", (4, 6)), ("4X6", (4, 6)), ((2, 3), (2, 3)),
    ([5], (5, 5)),
])
def test_parse_grid(value, expected):
    assert parse_grid(value) == expected


@pytest.mark.parametrize("value", ["0", "x", "4x", "1x2x3", (0, 4), -1])
def test_parse_grid_rejects(value):
    with pytest.raises(ValueError, match="grid"):
        parse_grid(value)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(alpha=0), "alpha"), (dict(softness=1.5), "softness"), (dict(ramp="step"), "ramp"),
    (dict(mix_prob=-0.1), "mix_prob"), (dict(pairing="any"), "pairing"),
    (dict(num_mixes=-1), "num_mixes"), (dict(num_mixes=0), "num_mixes=0"),
    (dict(batch_size=0), "batch_size"),
])
def test_mix_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(tile_size=0), "tile_size"), (dict(stride=0), "stride"), (dict(level=-1), "level"),
    (dict(mpp=0), "mpp"), (dict(min_tissue=1.5), "min_tissue"),
])
def test_tile_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TileConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(compression="zip"), "compression"), (dict(num_shards=0), "num_shards"),
    (dict(shard_size_mb=0), "shard_size_mb"), (dict(on_error="ignore"), "on_error"),
    (dict(name="a/b"), "name"),
])
def test_output_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OutputConfig(out_dir="out", **kwargs)


def test_output_config_normalises_compression():
    assert OutputConfig(out_dir="o", compression="gzip").compression == "GZIP"
    assert OutputConfig(out_dir="o", compression="none").compression is None


def test_job_config_rejects_a_grid_finer_than_the_tile():
    with pytest.raises(ValueError, match=r"grid=\(64, 64\), tile_size=32"):
        JobConfig(manifest="m.csv", tile=TileConfig(tile_size=32), mix=MixConfig(grid=64),
                  output=OutputConfig(out_dir="o"))
    JobConfig(manifest="m.csv", tile=TileConfig(tile_size=32), mix=MixConfig(grid=32),
              output=OutputConfig(out_dir="o"))
