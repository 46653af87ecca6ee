"""`pipeline.stream_dataset`: epoch 0 equals the offline job's output, byte for byte.

Real synthetic OME-Zarr slides (conftest), real tf.data, the real Beam job as the
reference: pixels, labels, lam, seeds and provenance must match exactly.
"""

from __future__ import annotations

import collections
import shutil

import numpy as np
import pytest
import tensorflow as tf

import pipeline
from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
from pipeline.dataset.schema import decode_example
from pipeline.engines.beam import run_beam
from pipeline.errors import PipelineError, SlideError

MIX = dict(seed=5, num_mixes=2, keep_originals=True, grid=4, softness=0.5)
PROVENANCE = ("seed", "mix_index", "a/slide_id", "a/level", "a/x", "a/y", "a/label",
              "b/slide_id", "b/level", "b/x", "b/y", "b/label")


def _stream(manifest, **kwargs):
    options = dict(tile_size=128, as_dict=True, epoch=0, **MIX)
    options.update(kwargs)
    return pipeline.stream_dataset(str(manifest), **options)


def _collect(dataset) -> dict[str, dict]:
    out = {}
    for record in dataset.as_numpy_iterator():
        key = record["example_id"].decode()
        assert key not in out, f"example {key} yielded twice"
        out[key] = record
    return out


@pytest.fixture(scope="module")
def offline(synthetic_dataset, tmp_path_factory):
    """The Beam job's examples (decoded), with the stream's options."""
    out = tmp_path_factory.mktemp("offline") / "out"
    job = JobConfig(manifest=str(synthetic_dataset.manifest_path),
                    tile=TileConfig(tile_size=128), mix=MixConfig(batch_size=4, **MIX),
                    output=OutputConfig(out_dir=str(out), num_shards=2))
    manifest = run_beam(job, progress=False)
    records = {}
    for shard in manifest["shards"]:
        for raw in tf.data.TFRecordDataset(str(out / shard["file"])).as_numpy_iterator():
            record = decode_example(raw)
            records[record["example_id"]] = record
    return records, manifest


@pytest.fixture(scope="module")
def epoch0(synthetic_dataset, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    dataset = _stream(synthetic_dataset.manifest_path, cache_dir=str(cache))
    return _collect(dataset), pipeline.dataset_stats(dataset), cache


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, expected in want.items():
        record = got[key]
        assert record["image"].dtype == expected["image"].dtype
        np.testing.assert_array_equal(record["image"], expected["image"], err_msg=key)
        np.testing.assert_array_equal(record["label"], expected["label"], err_msg=key)
        assert record["lam"] == expected["lam"], key
        for field in PROVENANCE:
            value, other = record[field], expected[field]
            value = value.decode() if isinstance(value, bytes) else value
            other = other.decode() if isinstance(other, bytes) else other
            np.testing.assert_array_equal(value, other, err_msg=f"{key} {field}")


def test_epoch0_equals_the_offline_job(offline, epoch0, synthetic_dataset):
    want, manifest = offline
    got, stats, _ = epoch0
    assert len(want) == synthetic_dataset.total_tiles * 3
    _assert_same(got, want)
    # The stream's accounting is the offline manifest's.
    accounting = stats.accounting
    accounting.check()
    assert accounting.tiles_total == manifest["accounting"]["tiles_total"]
    assert accounting.tiles_used == manifest["accounting"]["tiles_used"]
    assert dict(accounting.tiles_skipped) == manifest["accounting"]["tiles_skipped"]
    assert accounting.examples_written == len(want) == stats.examples
    assert stats.strips_packed > 0 and stats.slides_planned == 4


def test_later_epochs_are_new_and_repeatable(synthetic_dataset, epoch0, tmp_path):
    got0, _, cache = epoch0
    first = _collect(_stream(synthetic_dataset.manifest_path, epoch=1, cache_dir=str(cache)))
    assert sorted(first) == sorted(got0)  # the same anchors ...
    seeds0 = {k: tuple(r["seed"]) for k, r in got0.items() if r["mix_index"] >= 0}
    seeds1 = {k: tuple(r["seed"]) for k, r in first.items() if r["mix_index"] >= 0}
    assert not set(seeds0.values()) & set(seeds1.values())  # ... with new seeds
    partners0 = {k: (r["b/slide_id"], r["b/x"], r["b/y"]) for k, r in got0.items()}
    partners1 = {k: (r["b/slide_id"], r["b/x"], r["b/y"]) for k, r in first.items()}
    assert partners0 != partners1  # and new pairing
    # A rerun (fresh stream, fresh cache) repeats epoch 1 exactly.
    again = _collect(_stream(synthetic_dataset.manifest_path, epoch=1, cache_dir=str(tmp_path)))
    _assert_same(again, {k: {**r, "example_id": k} for k, r in first.items()})


def test_endless_stream_walks_epochs_in_order(synthetic_dataset, epoch0):
    got0, _, cache = epoch0
    per_epoch = len(got0)
    dataset = _stream(synthetic_dataset.manifest_path, epoch=None, cache_dir=str(cache),
                      num_parallel_reads=1)
    seen = collections.Counter()
    for record in dataset.take(2 * per_epoch).as_numpy_iterator():
        seen[record["example_id"].decode()] += 1
    assert set(seen) == set(got0) and set(seen.values()) == {2}


def test_cache_reuse_reads_nothing(synthetic_dataset, epoch0):
    got0, _, cache = epoch0
    dataset = _stream(synthetic_dataset.manifest_path, cache_dir=str(cache))
    got = _collect(dataset)
    stats = pipeline.dataset_stats(dataset.batch(4))  # found through derived datasets
    assert stats.plans_reused == 4 and stats.slides_planned == 0
    assert stats.strips_packed == 0 and stats.strips_reused > 0
    assert stats.accounting.chunks_read == 0 and stats.accounting.bytes_read == 0
    assert sorted(got) == sorted(got0)
    # tf.data's autotuning model is off for the stream and what is built on it (it held
    # back each epoch's end); a later `with_options` turns it back on.
    assert dataset.batch(4).options().autotune.enabled is False
    again = tf.data.Options()
    again.autotune.enabled = True
    assert dataset.with_options(again).options().autotune.enabled is True


def test_cold_cache_without_packing_threads(synthetic_dataset, offline, tmp_path):
    # No background packing: the first unit packs every strip before pairing.
    dataset = _stream(synthetic_dataset.manifest_path, cache_dir=str(tmp_path),
                      pack_threads=0, num_parallel_reads=1)
    got = _collect(dataset)
    assert pipeline.dataset_stats(dataset).strips_packed > 0
    _assert_same(got, offline[0])


def test_first_example_waits_for_a_few_strips_not_all(synthetic_dataset, tmp_path):
    """Pairing on planned counts right after planning: an example is yielded once its
    anchor's and partners' strips are packed, so the first one comes before the
    cohort is packed (counted in packs, not time: only the work units pack here)."""
    dataset = _stream(synthetic_dataset.manifest_path, cache_dir=str(tmp_path),
                      pack_threads=0, num_parallel_reads=1, num_mixes=1, keep_originals=False,
                      seed=1)
    assert pipeline.dataset_stats(dataset).strips_at_first_example is None
    got = _collect(dataset)
    stats = pipeline.dataset_stats(dataset)
    assert stats.strips_packed == 11 and len(got) == synthetic_dataset.total_tiles
    # With seed 1 an anchor of the first strip in the epoch's order draws a partner in
    # that strip; tf.data may have started the next unit (and its strip) meanwhile.
    assert stats.strips_at_first_example is not None and stats.strips_at_first_example <= 3


def test_tuples_shuffle_and_mix_false_with_the_op(synthetic_dataset, epoch0):
    import softmix_tf

    got0, _, cache = epoch0
    pairs = _stream(synthetic_dataset.manifest_path, mix=False, cache_dir=str(cache),
                    as_dict=True, shuffle=16)
    batch = next(iter(pairs.batch(len(got0))))
    assert batch["image_a"].shape[0] == len(got0)
    out = softmix_tf.softmix(batch["image_a"], batch["image_b"], batch["label_a"],
                             batch["label_b"], batch["seed"], grid=4, softness=0.5)
    original = (batch["mix_index"] < 0).numpy()
    images = np.where(original[:, None, None, None], batch["image_a"], out.images)
    for i, key in enumerate(batch["example_id"].numpy()):
        np.testing.assert_array_equal(images[i], got0[key.decode()]["image"])
    plain = _stream(synthetic_dataset.manifest_path, as_dict=False, cache_dir=str(cache),
                    shuffle=True)
    image, label = next(iter(plain))
    assert image.shape == (128, 128, 3) and image.dtype == tf.uint8 and label.shape == (2,)


def test_batched_output_holds_the_same_examples(synthetic_dataset, epoch0):
    """`batch=` yields the epoch's examples in batches of that size (the work units'
    batches re-cut, no unbatch), byte for byte the single examples; the last batch is
    smaller or, with `drop_remainder`, dropped; with `shuffle`, batches of shuffled
    examples."""
    got0, _, cache = epoch0
    total = len(got0)
    assert total % 7, "the test needs a partial last batch"
    dataset = _stream(synthetic_dataset.manifest_path, cache_dir=str(cache), batch=7)
    assert dataset.element_spec["image"].shape.as_list() == [None, 128, 128, 3]
    sizes, got = [], {}
    for batch in dataset.as_numpy_iterator():
        sizes.append(len(batch["example_id"]))
        for i, key in enumerate(batch["example_id"]):
            assert key.decode() not in got
            got[key.decode()] = {k: v[i] for k, v in batch.items()}
    assert sizes == [7] * (total // 7) + [total % 7]
    _assert_same(got, got0)
    dropped = _stream(synthetic_dataset.manifest_path, cache_dir=str(cache), batch=7,
                      drop_remainder=True, as_dict=False, shuffle=8)
    assert dropped.element_spec[0].shape.as_list() == [7, 128, 128, 3]
    assert [int(images.shape[0]) for images, _ in dropped] == [7] * (total // 7)
    rebatched = _stream(synthetic_dataset.manifest_path, cache_dir=str(cache), batch=7,
                        drop_remainder=True, as_dict=False)  # no shuffle: `rebatch`
    assert rebatched.element_spec[0].shape.as_list() == [7, 128, 128, 3]
    assert [int(images.shape[0]) for images, _ in rebatched] == [7] * (total // 7)
    with pytest.raises(ValueError, match="`batch` must be"):
        _stream(synthetic_dataset.manifest_path, cache_dir=str(cache), batch=0)
    with pytest.raises(ValueError, match="drop_remainder=True, batch=None"):
        _stream(synthetic_dataset.manifest_path, cache_dir=str(cache), drop_remainder=True)


def test_float_slides_stream_the_offline_examples(tmp_path):
    """Float tiles take the op's non-XLA kernels, which require 64-byte aligned inputs
    (a misaligned buffer handed over in place aborts the process): epoch 0 of float32
    slides equals the local engine's output, with a batch size whose tiles are not a
    multiple of 64 bytes apart."""
    from pipeline.engines.local import run_local

    from .conftest import CLASS_COLORS, SYNTHETIC_SLIDES, synthetic_tissue, write_ome_zarr

    rows = ["slide_id,path,label"]
    for i, (sid, label, boxes) in enumerate(SYNTHETIC_SLIDES[:2]):
        image = synthetic_tissue(512, 512, boxes, color=CLASS_COLORS[label], seed=i)
        write_ome_zarr(tmp_path / f"{sid}.ome.zarr", (image / 255.0).astype(np.float32))
        rows.append(f"{sid},{sid}.ome.zarr,{label}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    job = JobConfig(manifest=str(manifest), tile=TileConfig(tile_size=128),
                    mix=MixConfig(batch_size=3, **MIX),
                    output=OutputConfig(out_dir=str(out), num_shards=1))
    shard = run_local(job, progress=False)["shards"][0]["file"]
    want = {}
    for raw in tf.data.TFRecordDataset(str(out / shard)).as_numpy_iterator():
        record = decode_example(raw)
        want[record["example_id"]] = record
    got = _collect(_stream(manifest, cache_dir=str(tmp_path / "cache"), batch_size=3))
    assert got and next(iter(got.values()))["image"].dtype == np.float32
    _assert_same(got, want)


def test_input_pipelines_split_the_epoch(synthetic_dataset, epoch0):
    got0, _, cache = epoch0
    parts = []
    for index in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index)
        parts.append(_collect(_stream(synthetic_dataset.manifest_path, cache_dir=str(cache),
                                      input_context=context)))
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert sorted([*parts[0], *parts[1]]) == sorted(got0)


def test_distribute_datasets_from_function(synthetic_dataset, epoch0):
    got0, _, cache = epoch0
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")

    def dataset_fn(context):
        return _stream(synthetic_dataset.manifest_path, cache_dir=str(cache), as_dict=False,
                       input_context=context).batch(8)

    dist = strategy.distribute_datasets_from_function(dataset_fn)
    count = 0
    for images, labels in dist:
        count += int(images.shape[0])
        assert labels.shape[1] == 2
    assert count == len(got0)


def test_bad_slide_is_counted_or_raised(synthetic_dataset_factory, tmp_path):
    data = synthetic_dataset_factory()
    shutil.rmtree(data.root / "slides" / "syn-1.ome.zarr")
    dataset = _stream(data.manifest_path, cache_dir=str(tmp_path / "c"), num_mixes=1,
                      keep_originals=False)
    got = _collect(dataset)
    stats = pipeline.dataset_stats(dataset)
    assert set(stats.accounting.slides_failed) == {"syn-1"}
    assert len(got) == data.total_tiles - data.expected_tiles["syn-1"]
    assert all(r["b/slide_id"] != b"syn-1" for r in got.values())
    stats.accounting.check()
    with pytest.raises(SlideError, match="syn-1"):
        _stream(data.manifest_path, on_error="fail", cache_dir=str(tmp_path / "d"))


def test_bad_options_are_refused(synthetic_dataset, tmp_path):
    with pytest.raises(ValueError, match="softness"):
        _stream(synthetic_dataset.manifest_path, softness=2.0)
    with pytest.raises(ValueError, match="epoch"):
        _stream(synthetic_dataset.manifest_path, epoch=-1)
    with pytest.raises(PipelineError, match="No usable tile"):
        _stream(synthetic_dataset.manifest_path, min_tissue=1.0, tile_size=512,
                cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="stream_dataset"):
        pipeline.dataset_stats(tf.data.Dataset.range(3))


def test_keys_and_accounting_match_the_offline_job(offline, epoch0):
    # Every key the stream yields (besides the image) is a key of read_dataset's dicts,
    # and after epoch 0 its accounting is the offline manifest's.
    _, manifest = offline
    got0, stats, _ = epoch0
    record = next(iter(got0.values()))
    assert set(record) - {"image", "label", "lam", "example_id"} == set(PROVENANCE)
    assert manifest["num_examples"] == len(got0)
    acc = stats.accounting.to_dict(len(manifest["class_names"]))
    for key in ("tiles_total", "tiles_used", "tiles_skipped", "slides_failed",
                "examples_written"):
        assert acc[key] == manifest["accounting"][key], key


@pytest.mark.parametrize("pack_threads", [0, 2])
def test_epoch0_with_a_corrupt_chunk_equals_offline(synthetic_dataset_factory, tmp_path,
                                                    pack_threads):
    """A tissue chunk that only packing can find corrupt: every configuration pairs on
    the planned counts and draws again a partner that packing found unusable, as the
    offline job does (no `partner_failed`, same examples)."""
    data = synthetic_dataset_factory()
    chunk = data.root / "slides" / "syn-2.ome.zarr" / "s0" / "c" / "0" / "3" / "1"
    chunk.write_bytes(b"not zstd" * 16)  # level 0 only: planning reads the last level
    # (With MIX's seed one first draw lands on that tile: both sides draw it again.)
    job = JobConfig(manifest=str(data.manifest_path), tile=TileConfig(tile_size=128),
                    mix=MixConfig(batch_size=4, **MIX),
                    output=OutputConfig(out_dir=str(tmp_path / "out"), num_shards=2))
    manifest = run_beam(job, progress=False)
    want = {}
    for shard in manifest["shards"]:
        for raw in tf.data.TFRecordDataset(str(tmp_path / "out" / shard["file"])):
            record = decode_example(raw.numpy())
            want[record["example_id"]] = record
    assert manifest["accounting"]["tiles_skipped"].get("read_error") == 1
    dataset = _stream(data.manifest_path, cache_dir=str(tmp_path / "c"),
                      pack_threads=pack_threads, num_parallel_reads=1)
    got = _collect(dataset)
    _assert_same(got, want)
    accounting = pipeline.dataset_stats(dataset).accounting
    assert dict(accounting.examples_dropped) == {}
    assert dict(accounting.tiles_skipped) == manifest["accounting"]["tiles_skipped"]


def test_cache_dir_that_is_a_file_is_named(synthetic_dataset, tmp_path):
    file = tmp_path / "not-a-dir"
    file.write_text("x")
    with pytest.raises(PipelineError, match="not-a-dir") as caught:
        _stream(synthetic_dataset.manifest_path, cache_dir=str(file))
    assert "directory" in str(caught.value)
