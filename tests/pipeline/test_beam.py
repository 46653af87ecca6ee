"""The Beam job: per-transform TestPipeline tests and end-to-end runs on real slides."""

from __future__ import annotations

import collections
import json
import pathlib

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline.cli import main as cli_main
from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
from pipeline.engines.beam import (
    MixBuckets,
    PairStrips,
    PlansToStrips,
    SlidesToPlans,
    local_pipeline_options,
    run_beam,
)
from pipeline.errors import OutputExistsError
from pipeline.io.manifest import load_slide_manifest
from pipeline.io.slides import open_slide
from pipeline.run import job as _job

TILE = TileConfig(tile_size=128)
MIX = MixConfig(grid=(4, 4), softness=0.5, seed=7, batch_size=5)


def _test_pipeline() -> test_pipeline.TestPipeline:
    return test_pipeline.TestPipeline(options=local_pipeline_options())


def _job_config(manifest, out, **overrides) -> JobConfig:
    mix = dict(grid=(4, 4), softness=0.5, seed=7, batch_size=5)
    mix.update(overrides.pop("mix", {}))
    output = dict(out_dir=str(out), num_shards=3)
    output.update(overrides.pop("output", {}))
    return JobConfig(manifest=str(manifest), tile=overrides.pop("tile", TILE),
                     mix=MixConfig(**mix), output=OutputConfig(**output))


# Independent of the package's decoder: a plain tf.data parse of the README's schema.
def _schema(num_classes: int) -> dict:
    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/shape": tf.io.FixedLenFeature([3], tf.int64),
        "image/dtype": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([num_classes], tf.float32),
        "lam": tf.io.FixedLenFeature([], tf.float32),
        "seed": tf.io.FixedLenFeature([2], tf.int64),
    }
    for source in "ab":
        spec[f"{source}/slide_id"] = tf.io.FixedLenFeature([], tf.string)
        for key in ("level", "x", "y", "label"):
            spec[f"{source}/{key}"] = tf.io.FixedLenFeature([], tf.int64)
    return spec


def _read_records(out: pathlib.Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    files = [str(out / shard["file"]) for shard in manifest["shards"]]
    spec = _schema(len(manifest["class_names"]))
    records = []
    for raw in tf.data.TFRecordDataset(files):
        parsed = tf.io.parse_single_example(raw, spec)
        record = {k: v.numpy() for k, v in parsed.items()}
        assert record["image/format"] == b"png"
        record["image"] = tf.io.decode_png(parsed["image/encoded"]).numpy()
        records.append(record)
    return records


def _fingerprint(records: list[dict]) -> collections.Counter:
    return collections.Counter(
        (r["a/slide_id"], int(r["a/x"]), int(r["a/y"]), r["b/slide_id"], int(r["b/x"]),
         int(r["b/y"]), float(r["lam"]), tuple(r["label"].tolist()), r["image"].tobytes())
        for r in records
    )


# --- Per-transform tests (TestPipeline) ---------------------------------------------------


def test_slides_to_plans_matches_plan_slide(synthetic_dataset):
    manifest = load_slide_manifest(synthetic_dataset.manifest_path)
    with _test_pipeline() as p:
        plans = p | beam.Create(manifest.slides) | SlidesToPlans(TILE)
        counts = plans | beam.Map(lambda plan: (plan.slide_id, len(plan.tiles),
                                                plan.skipped_dict.get("background", 0)))
        assert_that(counts, equal_to([
            (sid, synthetic_dataset.expected_tiles[sid],
             synthetic_dataset.expected_background[sid])
            for sid in synthetic_dataset.slide_ids
        ]))


def test_beam_shards_equal_the_in_process_steps(synthetic_dataset, tmp_path):
    from .test_stages import run_in_process

    job = _job_config(synthetic_dataset.manifest_path, tmp_path / "beam",
                      mix=dict(num_mixes=2, keep_originals=True))
    manifest = run_beam(job, progress=False, examples_per_task=7)
    reference = _job_config(synthetic_dataset.manifest_path, tmp_path / "ref",
                            mix=dict(num_mixes=2, keep_originals=True))
    _, _, infos, accounting, _ = run_in_process(reference, examples_per_task=7)
    staged = pathlib.Path(_job.staging_dir(reference.output))
    assert [s["file"] for s in manifest["shards"]] == [i.file for i in infos]
    for info in infos:
        assert (tmp_path / "beam" / info.file).read_bytes() == (staged / info.file).read_bytes()
    assert manifest["accounting"] == json.loads(json.dumps(accounting.to_dict(2)))
    assert manifest["num_examples"] == 3 * synthetic_dataset.total_tiles


def test_strips_pairs_and_buckets_as_transforms(synthetic_dataset, tmp_path):
    from pipeline.steps.pair import PairingTable

    from .test_stages import run_in_process

    job = _job_config(synthetic_dataset.manifest_path, tmp_path / "ref")
    plans, layout, _, _, names = run_in_process(job)
    manifest = load_slide_manifest(synthetic_dataset.manifest_path)
    staging = _job.staging_dir(job.output)
    table = PairingTable(layout.counts(), job.mix, 2)
    with _test_pipeline() as p:
        strips = (p | "Plans" >> beam.Create(plans)
                  | PlansToStrips(manifest.slides, 128, staging, 16.0))
        sizes = strips | beam.Map(lambda r: (r.slide_id, len(r.tiles)))
        assert_that(sizes | beam.CombinePerKey(sum), equal_to(
            [(sid, synthetic_dataset.expected_tiles[sid]) for sid in synthetic_dataset.slide_ids]),
            label="StripSizes")
        side = beam.pvalue.AsSingleton(p | "Layout" >> beam.Create([layout]))
        table_side = beam.pvalue.AsSingleton(p | "Table" >> beam.Create([table]))
        pairs, accounting = strips | PairStrips(side, table_side)
        buckets = pairs | MixBuckets(job.mix, 2, side)
        assert_that(buckets | "Written" >> beam.Map(lambda b: b.accounting.examples_written)
                    | "SumWritten" >> beam.CombineGlobally(sum),
                    equal_to([synthetic_dataset.total_tiles]), label="Examples")
        assert_that(accounting | "Used" >> beam.Map(lambda a: a.tiles_used)
                    | "SumUsed" >> beam.CombineGlobally(sum),
                    equal_to([synthetic_dataset.total_tiles]), label="UsedTiles")


# --- End to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(demo_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("beam") / "out"
    job = _job_config(demo_dataset, out, tile=TileConfig(tile_size=128),
                      mix=dict(keep_originals=True))
    manifest = run_beam(job, progress=False)
    return job, out, manifest


def test_end_to_end_records_follow_the_schema(demo_run):
    job, out, manifest = demo_run
    records = _read_records(out)
    acc = manifest["accounting"]
    class_names = manifest["class_names"]
    assert class_names == ["he", "ihc"]
    assert len(records) == manifest["num_examples"] == sum(s["num_examples"]
                                                           for s in manifest["shards"])
    assert [s["file"] for s in manifest["shards"]] == [
        f"softmix-{i:05d}-of-00003.tfrecord" for i in range(3)]
    assert acc["tiles_total"] == acc["tiles_used"] + sum(acc["tiles_skipped"].values())
    assert acc["tiles_skipped"].get("background", 0) > 0  # demo slides have glass
    # keep_originals: each used tile is `a` of 1 mixed example + its original.
    assert manifest["num_examples"] == 2 * acc["tiles_used"]
    eye = np.eye(len(class_names), dtype=np.float32)
    originals = 0
    for r in records:
        lam = float(r["lam"])
        want = (1 - lam) * eye[r["a/label"]] + lam * eye[r["b/label"]]
        np.testing.assert_allclose(r["label"], want, atol=1e-6)
        assert 0.0 <= lam <= 1.0
        originals += (r["a/slide_id"], r["a/x"], r["a/y"]) == (r["b/slide_id"], r["b/x"],
                                                               r["b/y"]) and lam == 0
    assert originals >= acc["tiles_used"]


def test_end_to_end_pixels_lie_between_their_sources(demo_run, demo_dataset):
    job, out, manifest = demo_run
    slides = {rec.slide_id: rec.path for rec in load_slide_manifest(demo_dataset).slides}
    records = _read_records(out)
    opened = {sid: open_slide(path, slide_id=sid) for sid, path in slides.items()}
    size = job.tile.tile_size
    for r in records[:40]:
        tile_a = opened[r["a/slide_id"].decode()].read_region(int(r["a/level"]), int(r["a/x"]),
                                                              int(r["a/y"]), size, size)
        tile_b = opened[r["b/slide_id"].decode()].read_region(int(r["b/level"]), int(r["b/x"]),
                                                              int(r["b/y"]), size, size)
        lo = np.minimum(tile_a, tile_b)
        hi = np.maximum(tile_a, tile_b)
        assert np.all(r["image"] >= lo) and np.all(r["image"] <= hi)
        if r["lam"] == 0:
            np.testing.assert_array_equal(r["image"], tile_a)


def test_end_to_end_loads_with_tfds_and_read_dataset(demo_run):
    import tensorflow_datasets as tfds

    import pipeline

    job, out, manifest = demo_run
    builder = tfds.builder_from_directory(str(out))
    assert builder.info.splits["train"].num_examples == manifest["num_examples"]
    first = next(iter(builder.as_dataset(split="train")))
    assert first["image"]["encoded"].dtype == tf.uint8  # TFDS Image feature: pixels
    assert first["image"]["encoded"].shape == (128, 128, 3)
    pairs = list(pipeline.read_dataset(str(out)).take(3))
    assert pairs[0][0].shape == (128, 128, 3) and pairs[0][1].shape == (2,)


def test_one_and_two_workers_write_identical_shards(synthetic_dataset, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_beam(_job_config(synthetic_dataset.manifest_path, out), workers=workers,
                 progress=False)
        outs.append(out)
    assert _fingerprint(_read_records(outs[0])) == _fingerprint(_read_records(outs[1]))
    for shard in sorted(outs[0].glob("*.tfrecord")):
        assert shard.read_bytes() == (outs[1] / shard.name).read_bytes()


def test_refuses_existing_output_unless_overwrite(synthetic_dataset, tmp_path):
    out = tmp_path / "out"
    job = _job_config(synthetic_dataset.manifest_path, out)
    run_beam(job, progress=False)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_beam(job, progress=False)
    again = _job_config(synthetic_dataset.manifest_path, out, output=dict(overwrite=True))
    assert run_beam(again, progress=False)["num_examples"] == synthetic_dataset.total_tiles


def _corrupt_level0(slide_root: pathlib.Path) -> int:
    """Overwrite every level-0 chunk of an OME-Zarr v0.5 slide with garbage."""
    meta = json.loads((slide_root / "zarr.json").read_text())
    level0 = meta["attributes"]["ome"]["multiscales"][0]["datasets"][0]["path"]
    chunks = [f for f in (slide_root / level0).rglob("*") if f.is_file()
              and f.name != "zarr.json"]
    for chunk in chunks:
        chunk.write_bytes(b"not a chunk")
    return len(chunks)


def test_bad_slides_are_counted_and_the_rest_is_done(synthetic_dataset_factory, tmp_path):
    data = synthetic_dataset_factory()
    assert _corrupt_level0(data.root / "slides" / "syn-1.ome.zarr") > 0
    rows = data.manifest_path.read_text().splitlines()
    rows.append("ghost,slides/ghost.ome.zarr,he,patient-9")
    data.manifest_path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["beam", "--manifest", str(data.manifest_path), "--out", str(out), "--tile-size",
            "128", "--num-shards", "2", "--seed", "3", "--no-progress"]
    assert cli_main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    acc = manifest["accounting"]
    assert acc["slides_failed"] == {"ghost": "missing"}
    assert acc["tiles_skipped"]["read_error"] == data.expected_tiles["syn-1"]
    assert acc["tiles_total"] == acc["tiles_used"] + sum(acc["tiles_skipped"].values())
    assert acc["tiles_total"] == data.total_tiles + sum(data.expected_background.values())
    dropped = acc["examples_dropped"].get("partner_failed", 0)
    assert manifest["num_examples"] == data.total_tiles - data.expected_tiles["syn-1"] - dropped
    records = _read_records(out)
    assert {r["a/slide_id"] for r in records} == {b"syn-0", b"syn-2", b"syn-3"}
    assert b"syn-1" not in {r["b/slide_id"] for r in records}

    fail_out = tmp_path / "fail"
    assert cli_main(argv[:4] + [str(fail_out)] + argv[5:] + ["--on-error", "fail"]) == 1
    assert not (fail_out / "manifest.json").exists()
    assert not list(fail_out.glob("*.tfrecord"))


def test_cli_help_and_preview(demo_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["beam", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--tile-size", "--stride", "--mpp", "--min-tissue", "--grid", "--softness",
                 "--alpha", "--mix-prob", "--pairing", "--num-mixes", "--keep-originals",
                 "--seed", "--num-shards", "--compression", "--workers", "--overwrite",
                 "--on-error", "DataflowRunner"):
        assert flag in text
    _, out, _ = demo_run
    png = tmp_path / "sheet.png"
    assert cli_main(["preview", str(out), "--output", str(png), "--num", "6"]) == 0
    from PIL import Image

    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 100


def test_preview_masks_are_the_records_masks(demo_run):
    # The contact sheet draws every mask in one batched call: each equals the example's
    # own single-example mask, its mean is the example's lam, and unmixed ones are 0.
    import softmix_tf
    from pipeline.run.output import read_manifest
    from pipeline.tools.preview import _masks_of, _preview_records

    _, out, _ = demo_run
    manifest = read_manifest(str(out))
    mix = manifest["params"]["mix"]
    records = _preview_records(str(out), manifest, 12)
    masks = _masks_of(records, mix)
    assert len(masks) == len(records) == 12
    mixed = 0
    for record, mask in zip(records, masks, strict=True):
        assert mask.shape == record["image"].shape[:2]
        if record["lam"] == 0:
            assert not mask.any()
            continue
        mixed += 1
        single = softmix_tf.softmix_mask(
            np.asarray([record["seed"]], np.int64), mask.shape, grid=tuple(mix["grid"]),
            alpha=mix["alpha"], softness=mix["softness"], ramp=mix["ramp"]).numpy()[0]
        np.testing.assert_array_equal(mask, single)
        assert abs(float(mask.mean()) - float(record["lam"])) < 1e-4
    assert mixed >= 6


def test_cross_class_pairing_with_group_rule(synthetic_dataset, tmp_path):
    out = tmp_path / "out"
    job = _job_config(synthetic_dataset.manifest_path, out,
                      mix=dict(pairing="cross-class", group_column="patient_id", num_mixes=2))
    manifest = run_beam(job, progress=False)
    records = _read_records(out)
    assert len(records) == 2 * synthetic_dataset.total_tiles == manifest["num_examples"]
    patient = {"syn-0": 0, "syn-1": 0, "syn-2": 1, "syn-3": 1}
    for r in records:
        assert r["a/label"] != r["b/label"]
        assert patient[r["a/slide_id"].decode()] != patient[r["b/slide_id"].decode()]
    assert manifest["params"]["mix"]["pairing"] == "cross-class"


def test_mix_prob_zero_writes_the_anchor_tiles_unchanged(synthetic_dataset, tmp_path):
    out = tmp_path / "out"
    run_beam(_job_config(synthetic_dataset.manifest_path, out, mix=dict(mix_prob=0.0)),
             progress=False)
    slides = {rec.slide_id: rec.path
              for rec in load_slide_manifest(synthetic_dataset.manifest_path).slides}
    for r in _read_records(out):
        assert r["lam"] == 0.0
        slide = open_slide(slides[r["a/slide_id"].decode()])
        np.testing.assert_array_equal(
            r["image"], slide.read_region(0, int(r["a/x"]), int(r["a/y"]), 128, 128))
        np.testing.assert_array_equal(r["label"], np.eye(2, dtype=np.float32)[r["a/label"]])


def test_gzip_shards_read_back_without_tfds_metadata(synthetic_dataset, tmp_path):
    import pipeline

    out = tmp_path / "out"
    manifest = run_beam(_job_config(synthetic_dataset.manifest_path, out,
                                    output=dict(compression="GZIP")), progress=False)
    assert not (out / "dataset_info.json").exists()
    assert (out / manifest["shards"][0]["file"]).read_bytes()[:2] == b"\x1f\x8b"
    records = list(pipeline.read_dataset(str(out), as_dict=True))
    assert len(records) == manifest["num_examples"] == synthetic_dataset.total_tiles


def test_plain_zarr_arrays_with_axes_column(tmp_path):
    """A manifest `axes` column gives the axis order of plain (non-OME) Zarr arrays."""
    import zarr

    rng = np.random.default_rng(1)
    rows = ["slide_id,path,label,axes"]
    for i, label in enumerate(["a", "b"]):
        image = np.full((256, 256, 3), 240, np.uint8)
        image[:, :128] = rng.integers(0, 200, size=(256, 128, 3), dtype=np.uint8)
        array = zarr.create_array(str(tmp_path / f"p{i}.zarr"), shape=image.shape,
                                  chunks=(64, 64, 3), dtype="uint8")
        array[:] = image
        rows.append(f"p{i},p{i}.zarr,{label},yxc")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    job = _job_config(tmp_path / "manifest.csv", out, tile=TileConfig(tile_size=64))
    manifest = run_beam(job, progress=False)
    assert manifest["accounting"]["tiles_used"] == 2 * 8  # left half of each 4x4 grid
    for r in _read_records(out):
        assert r["image"].shape == (64, 64, 3) and int(r["a/x"]) < 128


def test_label_image_gives_soft_labels_end_to_end(tmp_path):
    """`--label-image`: tile labels are the class fractions of an OME-NGFF labels/ image."""
    from .conftest import synthetic_tissue, write_ome_zarr

    rows = ["slide_id,path,label"]
    for i in range(2):
        image = synthetic_tissue(256, 256, ((0, 0, 256, 256),), color=(190, 70, 150), seed=i)
        classes = np.zeros((256, 256), np.uint8)
        classes[:, :128] = 1  # left half: class 1 (index 0), right half: class 2 (index 1)
        classes[:, 128:] = 2
        classes[:, 96:128] = 2  # the tile at x=64..128 is 50/50
        write_ome_zarr(tmp_path / f"l{i}.ome.zarr", image, labels={"classes": classes})
        rows.append(f"l{i},l{i}.ome.zarr,{'normal' if i else 'tumor'}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["beam", "--manifest", str(tmp_path / "manifest.csv"), "--out", str(out),
            "--tile-size", "64", "--min-tissue", "0", "--label-image", "classes",
            "--class-names", "tumor,normal", "--mix-prob", "0", "--no-progress"]
    assert cli_main(argv) == 0
    records = _read_records(out)
    assert len(records) == 2 * 16
    expected = {0: [1.0, 0.0], 64: [0.5, 0.5], 128: [0.0, 1.0], 192: [0.0, 1.0]}
    for r in records:
        np.testing.assert_allclose(r["label"], expected[int(r["a/x"])], atol=1e-6)


def test_preview_in_out_does_not_block_overwrite(synthetic_dataset, tmp_path):
    out = tmp_path / "out"
    run_beam(_job_config(synthetic_dataset.manifest_path, out), progress=False)
    assert cli_main(["preview", str(out), "--num", "4"]) == 0
    assert (out / "preview.png").exists()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_beam(_job_config(synthetic_dataset.manifest_path, out), progress=False)
    again = _job_config(synthetic_dataset.manifest_path, out, output=dict(overwrite=True))
    run_beam(again, progress=False)
    assert not (out / "preview.png").exists()  # a stale preview is removed with the rest


# --- The local runner's worker processes ----------------------------------------------------

_BEAM_DRIVER = """
import json, os, sys
from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
from pipeline.engines.beam import run_beam
job = JobConfig(manifest=sys.argv[1], tile=TileConfig(tile_size=128),
                mix=MixConfig(num_mixes=1), output=OutputConfig(out_dir=sys.argv[2]))
manifest = run_beam(job, workers=2, progress=False, report=True)
print(json.dumps([manifest["num_examples"], manifest["image"], "tensorflow" in sys.modules,
                  os.path.exists(os.path.join(sys.argv[2], "report.html"))]))
"""


def test_two_workers_publish_and_report_without_tensorflow_in_the_driver(synthetic_dataset,
                                                                        tmp_path):
    # The local SDK worker processes mix, publish and write the
    # run report, where TensorFlow is loaded already: the driver never imports it.
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", _BEAM_DRIVER, str(synthetic_dataset.manifest_path), str(out)],
        capture_output=True, text=True, timeout=300, check=True)
    examples, image, tensorflow, report = json.loads(done.stdout.strip().splitlines()[-1])
    assert examples == synthetic_dataset.total_tiles  # one mix per tile
    assert image == {"shape": [128, 128, 3], "dtype": "uint8", "format": "png"}
    assert tensorflow is False
    assert report is True and "<html" in (out / "report.html").read_text()[:200].lower()


def test_a_resumed_run_checks_kept_buckets_apart_from_new_ones(synthetic_dataset, tmp_path,
                                                               monkeypatch):
    # The local runner splits a stage's input round-robin: kept buckets (cheap to check)
    # and new ones (mixed) go through separate stages so each is split evenly.
    from apache_beam.metrics.metric import MetricsFilter

    from pipeline.engines.beam import build_pipeline
    from pipeline.run import tasks as _tasks
    from pipeline.run.output import release_output_lock
    from pipeline.run.run import prepare_run

    out = tmp_path / "out"
    real, calls = _tasks.mix_bucket, []

    def two_then_stop(*args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("stopped after two buckets (test)")
        calls.append(args[0])
        return real(*args, **kwargs)

    job = _job_config(synthetic_dataset.manifest_path, out, output=dict(num_shards=4))
    with monkeypatch.context() as patch:
        patch.setattr(_tasks, "mix_bucket", two_then_stop)
        with pytest.raises(Exception, match="stopped after two buckets"):
            run_beam(job, progress=False)
    release_output_lock(str(out))  # as a killed run leaves it
    sidecars = sorted((out / _job.STAGING_DIR / "buckets").glob("*.tfrecord.json"))
    assert len(sidecars) == 2
    kept_examples = sum(json.loads(p.read_text())["records"] for p in sidecars)

    run = prepare_run(_job_config(synthetic_dataset.manifest_path, out,
                                  output=dict(num_shards=4, resume=True)))
    assert run.resumed
    pipeline = beam.Pipeline(options=local_pipeline_options())
    build_pipeline(pipeline, run, run.params("beam"))
    result = pipeline.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_name("examples_mixed"))["counters"]
    by_step = {c.key.step.rsplit("/", 1)[-1]: c.committed for c in counters}
    manifest = json.loads((out / "manifest.json").read_text())
    assert by_step == {"CheckKept": kept_examples,
                       "Mix": manifest["num_examples"] - kept_examples}
    assert manifest["accounting"]["resumed"]["buckets"] == 2


def test_only_the_local_runner_writes_the_report_in_the_pipeline():
    """On a remote runner a worker lost while drawing the report would have the runner
    retry the publishing step, which would then fail a published run: the report is
    left to the driver there."""
    from pipeline.engines.beam import _runs_locally, local_pipeline_options

    assert _runs_locally(local_pipeline_options(1))
    assert _runs_locally(local_pipeline_options(2))
    assert not _runs_locally(local_pipeline_options(1, ["--runner=DataflowRunner"]))
