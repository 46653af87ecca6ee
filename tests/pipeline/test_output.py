"""Tests of pipeline.run.output: accounting, output dir life cycle, manifest, TFDS metadata."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import OutputConfig
from pipeline.dataset.schema import decode_example, encode_example
from pipeline.dataset.shards import shard_filename, shard_for, write_shard
from pipeline.errors import OutputExistsError, PipelineError
from pipeline.records import ExampleSpec, MixedExample, SlidePlan, TileKey, TileRecord
from pipeline.run.output import (
    Accounting,
    finalize_output,
    prepare_output_dir,
    read_manifest,
)

CLASS_NAMES = ["tumor", "normal", "stroma"]


def tile(i, label=0):
    return TileRecord(TileKey("s1", 0, 64 * i, 0), label)


def mixed(i, lam=0.5, dtype=np.uint8, channels=3):
    a, b = tile(i, i % 3), tile(i + 1, (i + 1) % 3)
    label = np.zeros(3, np.float32)
    label[a.label] += 1 - lam
    label[b.label] += lam
    image = (np.arange(8 * 8 * channels).reshape(8, 8, channels) + i).astype(dtype)
    return MixedExample(ExampleSpec(f"{a.key}#m0", a, b, 0, (i, i + 1)), image, label, lam)


def write_dataset(out_dir, examples, num_shards=3, compression=None, name="softmix",
                  overwrite=False):
    config = OutputConfig(out_dir=str(out_dir), name=name, num_shards=num_shards,
                          compression=compression, overwrite=overwrite)
    prepare_output_dir(config)
    buckets = {i: [] for i in range(num_shards)}
    for example in examples:
        eid = example.spec.example_id
        buckets[shard_for(eid, num_shards)].append((eid, encode_example(example)))
    shards = [write_shard(os.path.join(out_dir, shard_filename(name, i, num_shards)), records,
                          compression=compression) for i, records in buckets.items()]
    plan = SlidePlan("s1", tiles=tuple(e.spec.a for e in examples), skipped=(("background", 4),))
    accounting = Accounting.from_plan(plan).merge(  # each tile used, as pair_strip says
        Accounting(tiles_used=len(examples), tiles_pending=-len(examples)),
        Accounting.from_written(examples))
    params = {"seed": 0, "pairing": "random", "grid": [4, 4]}
    manifest = finalize_output(config, shards, accounting, CLASS_NAMES, params)
    return config, manifest


# --- Accounting -----------------------------------------------------------------------

def test_accounting_rule():
    plan = SlidePlan("s1", tiles=tuple(tile(i) for i in range(5)),
                     skipped=(("background", 7),))
    acc = Accounting.from_plan(plan)
    assert (acc.tiles_total, acc.tiles_pending) == (12, 5)
    with pytest.raises(RuntimeError, match="pending"):
        acc.check()
    # How the steps resolve pending tiles: packing skips unusable ones, pairing marks
    # the rest used or no_partner, the stream drops examples whose partner failed,
    # mixing counts what was written.
    outcomes = [
        Accounting(tiles_skipped={"nan_pixels": 1}, tiles_pending=-1),  # strip_accounting
        Accounting(tiles_used=2, tiles_pending=-3, tiles_skipped={"no_partner": 1}),
        Accounting(tiles_skipped={"partner_failed": 1}, tiles_pending=-1,
                   examples_dropped={"partner_failed": 3}),
        Accounting.from_written([mixed(0), mixed(4), mixed(5, lam=0.25)]),
    ]
    failed = Accounting.from_plan(SlidePlan("s2", failure="missing", message="gone"))
    total = Accounting.merge_all([acc, failed, *outcomes])
    total.check()
    assert total.tiles_used == 2
    assert dict(total.tiles_skipped) == {"background": 7, "nan_pixels": 1,
                                         "no_partner": 1, "partner_failed": 1}
    assert dict(total.slides_failed) == {"s2": "missing"}
    assert total.examples_written == 3
    assert dict(total.examples_dropped) == {"partner_failed": 3}
    assert total.class_histogram == pytest.approx(
        np.sum([mixed(i, lam).label for i, lam in ((0, .5), (4, .5), (5, .25))], axis=0))
    as_dict = total.to_dict(3)
    assert set(as_dict) >= {"tiles_total", "tiles_used", "tiles_skipped", "slides_failed"}
    assert as_dict["tiles_total"] == 12


accountings = st.builds(
    Accounting,
    tiles_total=st.integers(0, 50),
    tiles_used=st.integers(0, 50),
    tiles_skipped=st.dictionaries(st.sampled_from(["background", "read_error", "x"]),
                                  st.integers(1, 9)),
    tiles_pending=st.integers(-5, 5),
    slides_failed=st.dictionaries(st.sampled_from(["s1", "s2", "s3"]),
                                  st.sampled_from(["missing", "bad_metadata"])),
    class_mass=st.lists(st.integers(0, 2**40), max_size=3).map(tuple),
    examples_written=st.integers(0, 50),
    examples_dropped=st.dictionaries(st.just("partner_failed"), st.integers(1, 9)),
)


@settings(max_examples=60, deadline=None)
@given(x=accountings, y=accountings, z=accountings)
def test_accounting_merge_is_a_commutative_monoid(x, y, z):
    assert x + y == y + x
    assert (x + y) + z == x + (y + z)
    assert x + Accounting() == x.merge() == Accounting.merge_all([x])
    skipped = sum(x.tiles_skipped.values()) + sum(y.tiles_skipped.values())
    merged = x + y
    assert (merged.tiles_total - merged.tiles_used - sum(merged.tiles_skipped.values())
            - merged.tiles_pending) == (x.tiles_total + y.tiles_total - x.tiles_used
                                        - y.tiles_used - skipped - x.tiles_pending
                                        - y.tiles_pending)


# --- output directory ---------------------------------------------------------------------

def test_prepare_refuses_existing_dataset_and_overwrites(tmp_path):
    out = tmp_path / "out"
    write_dataset(out, [mixed(i) for i in range(6)])
    (out / "preview.png").write_bytes(b"old preview")
    old = sorted(os.listdir(out))
    config = OutputConfig(out_dir=str(out))
    with pytest.raises(OutputExistsError, match=r"(?s)out.*--overwrite"):
        prepare_output_dir(config)
    # Overwrite deletes nothing up front: the old dataset survives until the new publishes.
    assert prepare_output_dir(OutputConfig(out_dir=str(out), overwrite=True))["num_examples"] == 6
    assert sorted(os.listdir(out)) == old
    _, manifest = write_dataset(out, [mixed(i) for i in range(4)], num_shards=2, name="new",
                                overwrite=True)
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json", "dataset_info.json", "features.json",
         "new-00000-of-00002.tfrecord", "new-00001-of-00002.tfrecord"])
    assert manifest["files"] == ["new-00000-of-00002.tfrecord", "new-00001-of-00002.tfrecord",
                                 "dataset_info.json", "features.json", "preview.png",
                                 "report.html", "report"]


def test_prepare_refuses_unfinished_and_foreign(tmp_path):
    (tmp_path / ".softmix.tmp-staging").mkdir()
    with pytest.raises(OutputExistsError, match="unfinished.*--overwrite"):
        prepare_output_dir(OutputConfig(out_dir=str(tmp_path)))
    prepare_output_dir(OutputConfig(out_dir=str(tmp_path), overwrite=True))
    # A shard-like file that no SoftMix manifest lists is not ours, whatever its name.
    (tmp_path / "softmix-00000-of-00002.tfrecord").write_bytes(b"")
    with pytest.raises(OutputExistsError, match="not part of a SoftMix dataset"):
        prepare_output_dir(OutputConfig(out_dir=str(tmp_path), overwrite=True))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="notes.txt"):
        prepare_output_dir(OutputConfig(out_dir=str(tmp_path), overwrite=True))
    assert (tmp_path / "notes.txt").exists()
    assert (tmp_path / "softmix-00000-of-00002.tfrecord").exists()
    empty = tmp_path / "new" / "dir"
    prepare_output_dir(OutputConfig(out_dir=str(empty)))
    assert empty.is_dir()


def test_manifest_contract(tmp_path):
    examples = [mixed(i) for i in range(10)]
    config, manifest = write_dataset(tmp_path / "out", examples)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest == read_manifest(config.out_dir)
    assert list(on_disk) == ["format", "num_examples", "class_names", "shards", "files",
                             "image", "params", "accounting", "warnings"]
    assert on_disk["format"] == "softmix.dataset/1"
    assert on_disk["image"] == {"shape": [8, 8, 3], "dtype": "uint8", "format": "png"}
    assert on_disk["warnings"] == []
    assert on_disk["num_examples"] == 10
    assert on_disk["class_names"] == CLASS_NAMES
    assert [set(s) for s in on_disk["shards"]] == [{"file", "num_examples"}] * 3
    assert [s["file"] for s in on_disk["shards"]] == [
        f"softmix-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert sum(s["num_examples"] for s in on_disk["shards"]) == 10
    params = on_disk["params"]
    assert params["seed"] == 0 and params["compression"] is None and params["num_shards"] == 3
    assert {"softmix", "tensorflow", "numpy", "python"} <= set(params["versions"])
    acc = on_disk["accounting"]
    assert acc["tiles_total"] == acc["tiles_used"] + sum(acc["tiles_skipped"].values()) == 14
    assert acc["slides_failed"] == {}
    assert len(acc["class_histogram"]) == 3
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["manifest.json", "dataset_info.json", "features.json"]
        + [s["file"] for s in on_disk["shards"]])


def test_finalize_refuses_inconsistent_runs(tmp_path):
    config = OutputConfig(out_dir=str(tmp_path), num_shards=1)
    info = write_shard(str(tmp_path / shard_filename("softmix", 0, 1)),
                       [("a", encode_example(mixed(0)))])
    pending = Accounting.from_plan(SlidePlan("s1", tiles=(tile(0),)))
    with pytest.raises(RuntimeError, match="pending"):
        finalize_output(config, [info], pending, CLASS_NAMES, {})
    resolved = pending + Accounting(tiles_used=1, tiles_pending=-1) + Accounting.from_written(
        [mixed(0), mixed(1)])
    with pytest.raises(RuntimeError, match="duplicated"):
        finalize_output(config, [info], resolved, CLASS_NAMES, {})
    with pytest.raises(RuntimeError, match="Shards"):
        finalize_output(config, [], Accounting(), CLASS_NAMES, {})
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(PipelineError, match="unfinished|not finished"):
        read_manifest(str(tmp_path))


def test_tfds_builder_from_directory_reads_the_records(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    examples = [mixed(i) for i in range(7)]
    write_dataset(tmp_path / "out", examples, num_shards=2, name="my-data")
    builder = tfds.builder_from_directory(str(tmp_path / "out"))
    assert builder.info.splits["train"].num_examples == 7
    records = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(records) == 7
    by_id = {r["example_id"].decode(): r for r in records}
    for example in examples:
        record = by_id[example.spec.example_id]
        expected = decode_example(encode_example(example))
        # PNG images are a TFDS Image feature: TFDS users get pixels.
        np.testing.assert_array_equal(record["image"]["encoded"], example.image)
        assert record["image"]["encoded"].dtype == np.uint8
        np.testing.assert_array_equal(record["image"]["shape"], expected["image/shape"])
        np.testing.assert_array_equal(record["label"], expected["label"])
        assert record["a"]["x"] == example.spec.a.key.x
        assert record["b"]["slide_id"] == b"s1"
        np.testing.assert_array_equal(record["seed"], example.spec.seed)


def test_gzip_skips_tfds_metadata(tmp_path):
    _, manifest = write_dataset(tmp_path / "out", [mixed(i) for i in range(3)],
                                compression="GZIP")
    assert manifest["params"]["compression"] == "GZIP" and manifest["params"]["tfds"] is False
    assert not (tmp_path / "out" / "dataset_info.json").exists()
