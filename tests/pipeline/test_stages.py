"""The engine-independent steps, run in one process, against the plain definition.

The reference here is deliberately naive: pair with `reference.pair_tiles` over all
tiles at once, read each tile straight from its slide, mix with `mix_examples`. The
staged path (packs, strips, buckets) must give exactly the same examples, and the
engines (tests in test_beam.py / test_dask.py) exactly the staged path's bytes.
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
from pipeline.dataset.schema import decode_example, encode_example
from pipeline.io.manifest import load_slide_manifest
from pipeline.io.slides import open_slide, read_tile
from pipeline.run import job as _job
from pipeline.run import tasks as _stages
from pipeline.run.output import Accounting
from pipeline.steps.mix import mix_examples
from pipeline.steps.pack import split_plan
from pipeline.steps.pair import PairingTable

from .reference import pair_tiles


def run_in_process(job: JobConfig, examples_per_task: int = 7):
    """All steps of `_stages` in one process, in the order an engine runs them."""
    manifest = load_slide_manifest(job.manifest, group_column=job.mix.group_column)
    names = manifest.class_names
    staging = _job.staging_dir(job.output)
    tf.io.gfile.makedirs(staging)
    raw = [_stages.plan_task(r, job.tile, "skip", names) for r in manifest.slides]
    majority = _stages.majority_kind(k for p in raw for k in _stages.plan_kind(p))
    plans = [_stages.reconcile_plan(p, majority) for p in raw]
    records = {r.slide_id: r for r in manifest.slides}
    strips = [_stages.pack_task(t, staging, 1.0) for p in plans
              for t in split_plan(records[p.slide_id], p, job.tile.tile_size)]
    layout = _stages.build_layout([(r.slide_id, r.strip, r.planned, r.content, r.failed)
                                   for r in strips],
                                  manifest.slides, job, staging, tile_bytes=1e5,
                                  examples_per_task=examples_per_task)
    table = PairingTable(layout.counts(), job.mix, len(names))
    by_bucket = collections.defaultdict(list)
    accounting = [Accounting.from_plan(p) for p in plans]
    accounting += [_stages.strip_accounting(r) for r in strips]
    for result in strips:
        pairs, acc = _stages.pair_strip(result, layout, table)
        accounting.append(acc)
        for bucket, spec in pairs:
            by_bucket[bucket].append(spec)
    buckets = [_stages.mix_bucket(b, specs, layout, job.mix, len(names))
               for b, specs in sorted(by_bucket.items())]
    accounting += [b.accounting for b in buckets]
    shards = collections.defaultdict(list)
    for b in buckets:
        shards[b.shard].append(b)
    infos = [_stages.finalize_shard(s, bs, layout.num_shards, job.output)
             for s, bs in sorted(shards.items())]
    return plans, layout, infos, Accounting.merge_all(accounting), names


def _config(manifest, out, **mix) -> JobConfig:
    return JobConfig(manifest=str(manifest), tile=TileConfig(tile_size=128),
                     mix=MixConfig(seed=5, batch_size=4, **mix),
                     output=OutputConfig(out_dir=str(out), num_shards=3))


@pytest.mark.parametrize("mix", [dict(), dict(num_mixes=2, keep_originals=True),
                                 dict(pairing="cross-class")])
def test_staged_examples_equal_the_plain_definition(synthetic_dataset, tmp_path, mix):
    job = _config(synthetic_dataset.manifest_path, tmp_path / "out", **mix)
    plans, layout, infos, accounting, names = run_in_process(job)
    staging = _job.staging_dir(job.output)
    got = {}
    for info in infos:
        for raw in tf.data.TFRecordDataset(f"{staging}/{info.file}").as_numpy_iterator():
            record = decode_example(raw)
            got[record["example_id"]] = record
    # The naive reference: global pairing, tiles read straight from the slides.
    tiles = [t for p in plans for t in p.tiles]
    specs = pair_tiles(tiles, job.mix, len(names))
    slides = {}

    def read(key):
        record = next(r for r in load_slide_manifest(job.manifest).slides
                      if r.slide_id == key.slide_id)
        slide = slides.setdefault(key.slide_id, open_slide(record.path, slide_id=key.slide_id))
        return read_tile(slide, key, job.tile.tile_size)

    expected = mix_examples(specs, read, job.mix, len(names))
    assert len(got) == len(expected) == sum(i.num_examples for i in infos)
    for want in expected:
        record = got[want.spec.example_id]
        np.testing.assert_array_equal(record["image"], want.image)
        np.testing.assert_array_equal(record["label"], want.label)
        assert record["b/x"] == want.spec.b.key.x and record["b/y"] == want.spec.b.key.y
        assert decode_example(encode_example(want))["lam"] == record["lam"]
    accounting.check()
    assert accounting.tiles_used == synthetic_dataset.total_tiles
    assert accounting.examples_written == len(expected)
    assert accounting.read_amplification is not None and accounting.read_amplification < 1.2
    # Buckets never depend on the bucket size: same shards with 1 or many per shard.
    other = _config(synthetic_dataset.manifest_path, tmp_path / "other", **mix)
    _, layout2, infos2, _, _ = run_in_process(other, examples_per_task=1000)
    assert layout2.buckets_per_shard == 1 < layout.buckets_per_shard
    for info, info2 in zip(infos, infos2, strict=True):
        ids = [decode_example(r)["example_id"] for r in tf.data.TFRecordDataset(
            f"{_job.staging_dir(other.output)}/{info2.file}").as_numpy_iterator()]
        assert sorted(ids) == sorted(
            decode_example(r)["example_id"] for r in tf.data.TFRecordDataset(
                f"{staging}/{info.file}").as_numpy_iterator())


def test_layout_locates_every_tile_of_a_slide(synthetic_dataset, tmp_path):
    job = _config(synthetic_dataset.manifest_path, tmp_path / "out")
    plans, layout, _, _, _ = run_in_process(job)
    for plan in plans:
        slide = layout.slides[plan.slide_id]
        assert slide.num_tiles == len(plan.tiles)
        seen = [layout.locate(plan.slide_id, i) for i in range(slide.num_tiles)]
        assert len(set(seen)) == len(seen)
        packs = {pack for pack, _ in seen}
        for pack in packs:
            index = json.loads(open(pack + ".json").read())
            assert [local for p, local in seen if p == pack] == list(range(len(index["tiles"])))


def _local_examples(manifest, out, **mix) -> tuple[dict, dict]:
    """`({example id: (record bytes, decoded)}, manifest)` of `softmix local`."""
    from pipeline.engines.local import run_local

    manifest_json = run_local(_config(manifest, out, **mix), progress=False)
    records = {}
    for shard in manifest_json["shards"]:
        for raw in tf.data.TFRecordDataset(str(out / shard["file"])).as_numpy_iterator():
            record = decode_example(raw)
            records[record["example_id"]] = (raw, record)
    return records, manifest_json


def test_a_tile_unusable_at_packing_changes_only_the_examples_that_drew_it(
        synthetic_dataset_factory, tmp_path):
    """Pairing counts planned tiles: a tile only packing finds corrupt is no anchor, a
    draw that lands on it is drawn again, and every other example keeps its bytes."""
    clean, broken = synthetic_dataset_factory(), synthetic_dataset_factory()
    # Level 0 only (planning reads the last level): tile x=128, y=384 of syn-2.
    chunk = broken.root / "slides" / "syn-2.ome.zarr" / "s0" / "c" / "0" / "3" / "1"
    chunk.write_bytes(b"not zstd" * 16)
    mix = dict(num_mixes=3)
    want, _ = _local_examples(clean.manifest_path, tmp_path / "clean", **mix)
    got, manifest = _local_examples(broken.manifest_path, tmp_path / "broken", **mix)
    bad = ("syn-2", 128, 384)

    def tile(record, source):
        slide_id = record[f"{source}/slide_id"]
        slide_id = slide_id.decode() if isinstance(slide_id, bytes) else slide_id
        return (slide_id, int(record[f"{source}/x"]), int(record[f"{source}/y"]))

    assert sorted(got) == sorted(k for k, (_, r) in want.items() if tile(r, "a") != bad)
    redrawn = 0
    for key, (raw, record) in got.items():
        clean_record = want[key][1]
        if tile(clean_record, "b") == bad:
            redrawn += 1
            assert tile(record, "b") != bad
            assert record["seed"].tolist() == clean_record["seed"].tolist()
        else:
            assert raw == want[key][0], key
    assert redrawn > 0  # the run exercised a second draw
    accounting = manifest["accounting"]
    assert accounting["tiles_skipped"] == {"background": accounting["tiles_skipped"][
        "background"], "read_error": 1}
    assert accounting["examples_dropped"] == {}
    assert manifest["num_examples"] == len(want) - 3


def test_reconcile_fails_the_minority_kind_and_keeps_counts():
    from pipeline.records import SlidePlan, TileKey, TileRecord

    def plan(sid, channels, dtype, n):
        tiles = tuple(TileRecord(TileKey(sid, 0, 128 * i, 0), 0) for i in range(n))
        return SlidePlan(sid, tiles=tiles, num_channels=channels, dtype=dtype)

    plans = [plan("a", 3, "uint8", 2), plan("b", 3, "uint8", 1), plan("c", 1, "uint16", 5)]
    majority = _stages.majority_kind(k for p in plans for k in _stages.plan_kind(p))
    assert majority == (3, "uint8")
    out = [_stages.reconcile_plan(p, majority) for p in plans]
    assert out[:2] == plans[:2]
    assert out[2].failure == "incompatible_pixels" and out[2].tiles == ()
    assert Accounting.from_plan(out[2]).tiles_total == 5


_PLAN_PACK_PAIR = """
import sys
from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
from pipeline.run import tasks
from pipeline.run.run import pack_stained, prepare_run, strip_size, strip_tasks
job = JobConfig(manifest=sys.argv[1], tile=TileConfig(tile_size=128),
                mix=MixConfig(num_mixes=2), output=OutputConfig(out_dir=sys.argv[2]))
run = prepare_run(job)
raw = [tasks.plan_task(r, job.tile, run.on_error, run.class_names, run.staging)
       for r in run.slides]
kind = run.kind_of(raw)
plans = [tasks.reconcile_plan(p, kind) for p in raw]
strips = [pack_stained(t, run.stain_for(raw), staging=run.staging,
                       read_cache_mb=job.read_cache_mb, on_error=run.on_error)
          for t in strip_tasks(run, plans)]
layout = run.layout([strip_size(r) for r in strips], kind)
table = run.pairing_table(layout)
specs = sum(len(tasks.pair_strip(r, layout, table)[0]) for r in strips)
print(specs, "tensorflow" in sys.modules)
"""


def test_plan_pack_and_pair_never_import_tensorflow(synthetic_dataset, tmp_path):
    # A worker that only plans, packs or pairs does not pay TensorFlow's start-up.
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _PLAN_PACK_PAIR, str(synthetic_dataset.manifest_path),
         str(tmp_path / "out")], capture_output=True, text=True, timeout=300, check=True)
    specs, tensorflow = done.stdout.split()
    assert int(specs) == 2 * synthetic_dataset.total_tiles
    assert tensorflow == "False"


_DASK_DRIVER = """
import json, sys
from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
from pipeline.engines.dask import run_dask
job = JobConfig(manifest=sys.argv[1], tile=TileConfig(tile_size=128),
                mix=MixConfig(num_mixes=1), output=OutputConfig(out_dir=sys.argv[2]))
manifest = run_dask(job, workers=1, progress=False)
print(json.dumps([manifest["image"], "tensorflow" in sys.modules]))
"""


def test_dask_driver_publishes_without_importing_tensorflow(synthetic_dataset, tmp_path):
    # The manifest's image entry comes from the worker that wrote the shard: the
    # driver (client + scheduler) never pays TensorFlow's import.
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _DASK_DRIVER, str(synthetic_dataset.manifest_path),
         str(tmp_path / "out")], capture_output=True, text=True, timeout=300, check=True)
    image, tensorflow = json.loads(done.stdout.strip().splitlines()[-1])
    assert image == {"shape": [128, 128, 3], "dtype": "uint8", "format": "png"}
    assert tensorflow is False
