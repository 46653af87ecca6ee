"""Stain normalisation in the offline job and the stream (issue 11, SPEC section 4c).

Real synthetic OME-Zarr slides (conftest): fits per slide in the manifest, tiles
normalised before mixing, Beam == Dask byte for byte, the stream's epoch 0 == Beam,
`stain_fit` failures counted, and clear errors for a bad --stain-target.
"""

from __future__ import annotations

import json
import pathlib

import distributed
import numpy as np
import pytest
import tensorflow as tf

import pipeline
from pipeline import dask_transforms
from pipeline.cli import main
from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
from pipeline.dataset.schema import decode_example
from pipeline.engines.beam import run_beam
from pipeline.errors import PipelineError
from pipeline.io.manifest import load_slide_manifest
from pipeline.io.slides import open_slide, read_tile
from pipeline.records import TileKey
from pipeline.steps.plan import tissue_mask
from pipeline.steps.stain import TileTransform
from softmix_tf import stain

MIX = dict(seed=3, num_mixes=1, keep_originals=True, grid=4, batch_size=4)


def make_job(manifest, out, *, method="macenko", target="builtin", min_tissue=0.5,
             on_error="skip", **mix) -> JobConfig:
    return JobConfig(manifest=str(manifest),
                     tile=TileConfig(tile_size=128, min_tissue=min_tissue, stain_norm=method,
                                     stain_target=target),
                     mix=MixConfig(**{**MIX, **mix}),
                     output=OutputConfig(out_dir=str(out), num_shards=2, on_error=on_error))


def shard_bytes(out: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tfrecord"))}


def examples(out: pathlib.Path) -> dict[str, dict]:
    records = {}
    for path in sorted(out.glob("*.tfrecord")):
        for raw in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            record = decode_example(raw)
            records[record["example_id"]] = record
    return records


def raw_tile(dataset, record) -> np.ndarray:
    sid = record["a/slide_id"]
    sid = sid.decode() if isinstance(sid, bytes) else sid
    slide = open_slide(str(dataset.root / "slides" / f"{sid}.ome.zarr"), slide_id=sid)
    return read_tile(slide, TileKey(sid, int(record["a/level"]), int(record["a/x"]),
                                    int(record["a/y"])), 128)


def _sid(record) -> str:
    sid = record["a/slide_id"]
    return sid.decode() if isinstance(sid, bytes) else sid


@pytest.fixture(scope="module")
def beam_run(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("stain-beam") / "out"
    manifest = run_beam(make_job(synthetic_dataset.manifest_path, out), progress=False)
    return out, manifest


@pytest.fixture(scope="module")
def dask_run(synthetic_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("stain-dask") / "out"
    cluster = dask_transforms.start_local_cluster(2, memory_limit="3GiB")
    with distributed.Client(cluster) as client:
        manifest = dask_transforms.run_job(client, make_job(synthetic_dataset.manifest_path, out),
                                           progress=False, examples_per_task=5)
    cluster.close()
    return out, manifest


def test_config_validates_stain_options():
    with pytest.raises(ValueError, match="stain_norm"):
        TileConfig(stain_norm="vahadane")
    with pytest.raises(ValueError, match="needs stain normalisation"):
        TileConfig(stain_target="syn-0")
    assert TileConfig(stain_norm="reinhard", stain_target="syn-0").stain_target == "syn-0"


def test_beam_and_dask_shards_are_byte_identical(beam_run, dask_run):
    assert shard_bytes(beam_run[0]) == shard_bytes(dask_run[0])
    assert beam_run[1]["stain"] == dask_run[1]["stain"]


def test_stream_epoch0_equals_beam(synthetic_dataset, beam_run, tmp_path):
    dataset = pipeline.stream_dataset(
        str(synthetic_dataset.manifest_path), tile_size=128, as_dict=True, epoch=0,
        stain_norm="macenko", cache_dir=str(tmp_path / "cache"), **MIX)
    got = {r["example_id"].decode(): r for r in dataset.as_numpy_iterator()}
    want = examples(beam_run[0])
    assert sorted(got) == sorted(want)
    for key, expected in want.items():
        np.testing.assert_array_equal(got[key]["image"], expected["image"], err_msg=key)
        np.testing.assert_array_equal(got[key]["label"], expected["label"], err_msg=key)


def test_fits_are_stored_per_slide_and_fitted_on_the_kept_tiles(synthetic_dataset, beam_run):
    # Each slide's fit is made on its kept tiles (fewer than stain_fit_tiles here: all of
    # them) at level 0, the pixels the fit is applied to, not on a downsampled level.
    section = beam_run[1]["stain"]
    assert section["method"] == "macenko" and section["target_source"] == "builtin"
    assert section["target"] == stain.builtin_reference("macenko").to_dict()
    assert sorted(section["fits"]) == list(synthetic_dataset.slide_ids)
    for sid in synthetic_dataset.slide_ids:
        slide = open_slide(str(synthetic_dataset.root / "slides" / f"{sid}.ome.zarr"),
                           slide_id=sid)
        tiles = [read_tile(slide, TileKey(sid, 0, x0 + dx, y0 + dy), 128)
                 for y0, x0, y1, x1 in synthetic_dataset.boxes[sid]
                 for dy in range(0, y1 - y0, 128) for dx in range(0, x1 - x0, 128)]
        assert len(tiles) == synthetic_dataset.expected_tiles[sid] < 32
        fit = stain.fit_tissue(np.stack(tiles), method="macenko")
        stored = section["fits"][sid]
        np.testing.assert_allclose(stored["stain_matrix"], fit.stain_matrix.numpy(), rtol=1e-5)
        np.testing.assert_allclose(stored["max_concentrations"],
                                   fit.max_concentrations.numpy(), rtol=1e-5)
        thumbnail = slide.read_level(slide.num_levels - 1)
        old = stain.fit_tissue(thumbnail, mask=tissue_mask(thumbnail), method="macenko")
        assert not np.allclose(stored["max_concentrations"], old.max_concentrations.numpy(),
                               rtol=0.01)


def test_originals_are_the_normalised_raw_tiles(synthetic_dataset, beam_run):
    section = beam_run[1]["stain"]
    originals = [r for r in examples(beam_run[0]).values() if r["mix_index"] < 0]
    assert len(originals) == synthetic_dataset.total_tiles
    for record in originals[:8]:
        raw = raw_tile(synthetic_dataset, record)
        sid = _sid(record)
        source = stain.fit_from_dict(section["fits"][sid])
        target = stain.fit_from_dict(section["target"])
        expected = TileTransform("macenko", json.dumps(section["fits"][sid]),
                                 json.dumps(section["target"]))(raw)
        np.testing.assert_array_equal(record["image"], expected)
        eager = stain.normalize(raw[None], source, target, method="macenko").numpy()[0]
        assert np.abs(eager.astype(int) - record["image"].astype(int)).max() <= 1
        assert np.abs(raw.astype(int) - record["image"].astype(int)).mean() > 5


def test_target_slide_leaves_its_own_tiles_nearly_unchanged(synthetic_dataset, tmp_path):
    out = tmp_path / "out"
    manifest = run_beam(make_job(synthetic_dataset.manifest_path, out, method="reinhard",
                                 target="syn-1"), progress=False)
    section = manifest["stain"]
    assert section["target_source"] == "syn-1"
    assert section["target"] == section["fits"]["syn-1"]
    own = [r for r in examples(out).values() if r["mix_index"] < 0 and _sid(r) == "syn-1"]
    others = [r for r in examples(out).values() if r["mix_index"] < 0 and _sid(r) == "syn-0"]
    assert own and others
    for record in own:
        diff = np.abs(raw_tile(synthetic_dataset, record).astype(int) - record["image"])
        assert diff.max() <= 2 and diff.mean() < 0.5
    moved = np.abs(raw_tile(synthetic_dataset, others[0]).astype(int) - others[0]["image"])
    assert moved.mean() > 10  # other slides move toward syn-1's colour


def _with_blank_slide(dataset, directory: pathlib.Path) -> pathlib.Path:
    from tests.pipeline.conftest import write_ome_zarr

    blank = np.full((512, 512, 3), 236, np.uint8)
    write_ome_zarr(directory / "blank.ome.zarr", blank)
    lines = dataset.manifest_path.read_text().strip().splitlines()
    rows = [lines[0]]
    for line in lines[1:]:
        slide_id, path, rest = line.split(",", 2)
        rows.append(f"{slide_id},{dataset.root / path},{rest}")
    rows.append(f"blank,{directory / 'blank.ome.zarr'},he,patient-9")
    manifest = directory / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def test_slide_without_tissue_is_counted_as_stain_fit(synthetic_dataset, tmp_path):
    manifest_path = _with_blank_slide(synthetic_dataset, tmp_path)
    manifest = run_beam(make_job(manifest_path, tmp_path / "out", method="reinhard",
                                 min_tissue=0.0, num_mixes=0), progress=False)
    acc = manifest["accounting"]
    assert acc["slides_failed"] == {"blank": "stain_fit"}
    assert "--stain-norm none" in acc["slides_failed_messages"]["blank"]
    assert "blank" not in manifest["stain"]["fits"]
    assert manifest["num_examples"] == 4 * 16  # min_tissue 0: every tile of 4 slides
    with pytest.raises(PipelineError, match="stain_fit|reinhard stain"):
        run_beam(make_job(manifest_path, tmp_path / "fail", method="reinhard", min_tissue=0.0,
                          num_mixes=0, on_error="fail"), progress=False)


def test_target_slide_without_fit_fails_the_run(synthetic_dataset, tmp_path):
    manifest_path = _with_blank_slide(synthetic_dataset, tmp_path)
    with pytest.raises(PipelineError, match="'blank'.*no reinhard stain fit"):
        run_beam(make_job(manifest_path, tmp_path / "out", method="reinhard", target="blank",
                          min_tissue=0.0, num_mixes=0), progress=False)


def test_target_from_a_fit_file(synthetic_dataset, beam_run, tmp_path):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(beam_run[1]["stain"]["fits"]["syn-2"]))
    out = tmp_path / "out"
    manifest = run_beam(make_job(synthetic_dataset.manifest_path, out, target=str(path)),
                        progress=False)
    assert manifest["stain"]["target"] == beam_run[1]["stain"]["fits"]["syn-2"]
    assert manifest["stain"]["target_source"] == str(path)


@pytest.mark.parametrize("target, wanted", [
    ("no-such-slide", "neither 'builtin', a slide_id"),
    ("BAD_JSON", "not a valid stain fit JSON"),
    ("REINHARD", "holds a reinhard fit"),
])
def test_bad_stain_target_is_a_clear_error(synthetic_dataset, tmp_path, capsys, target, wanted):
    if target == "BAD_JSON":
        (tmp_path / "bad.json").write_text("{not json")
        target = str(tmp_path / "bad.json")
    elif target == "REINHARD":
        (tmp_path / "r.json").write_text(json.dumps(stain.builtin_reference("reinhard")
                                                    .to_dict()))
        target = str(tmp_path / "r.json")
    code = main(["beam", "--manifest", str(synthetic_dataset.manifest_path), "--out",
                 str(tmp_path / "out"), "--tile-size", "128", "--stain-norm", "macenko",
                 "--stain-target", target, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert wanted in err and target in err and "--stain-target" in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_stain_target_without_stain_norm_is_a_usage_error(synthetic_dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["beam", "--manifest", str(synthetic_dataset.manifest_path), "--out",
              str(tmp_path / "out"), "--stain-target", "syn-0"])
    assert exit_info.value.code == 2
    assert "--stain-norm" in capsys.readouterr().err


def test_plan_sidecar_keeps_the_fit(synthetic_dataset, tmp_path):
    from pipeline.run.tasks import plan_task

    record = load_slide_manifest(str(synthetic_dataset.manifest_path)).slides[0]
    config = TileConfig(tile_size=128, stain_norm="reinhard")
    plan = plan_task(record, config, "fail", ("he", "ihc"), staging=str(tmp_path))
    again = plan_task(record, config, "fail", ("he", "ihc"), staging=str(tmp_path))
    assert again.reused and not plan.reused
    assert plan.stain_fit is not None and again.stain_fit == plan.stain_fit


def test_preview_shows_raw_and_normalised(beam_run, tmp_path):
    from PIL import Image

    path = tmp_path / "preview.png"
    assert main(["preview", str(beam_run[0]), "--output", str(path), "--num", "4",
                 "--stain"]) == 0
    plain = tmp_path / "plain.png"
    assert main(["preview", str(beam_run[0]), "--output", str(plain), "--num", "4"]) == 0
    assert Image.open(path).size[1] > Image.open(plain).size[1]
