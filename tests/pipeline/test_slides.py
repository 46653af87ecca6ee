"""Tests of pipeline.io.slides: OME-Zarr v0.4/v0.5, plain Zarr, fsspec URLs, lazy reads, errors."""

from __future__ import annotations

import os
import pathlib
import pickle

import fsspec
import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

from pipeline.errors import PipelineError, SlideError, TileReadError
from pipeline.io.slides import open_slide, read_tile, unit_to_micrometer
from pipeline.records import TileKey

from .conftest import synthetic_tissue, write_ome_zarr, write_raw_multiscales


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return synthetic_tissue(200, 300, [(20, 30, 150, 250)], seed=7)


def _crop(image: np.ndarray, step: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    return image[::step, ::step][y : y + h, x : x + w]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("axes", ["cyx", "tczyx", "czyx"])
def test_ome_zarr_written_by_ome_zarr_py(tmp_path, image, version, axes):
    path = write_ome_zarr(tmp_path / "s.ome.zarr", image, version=version, axes=axes, chunk=64)
    slide = open_slide(path, slide_id="s")
    assert slide.slide_id == "s"
    assert slide.num_levels == 3
    assert [slide.level_shape(i) for i in range(3)] == [(200, 300), (100, 150), (50, 75)]
    assert slide.num_channels == 3 and slide.dtype == np.uint8
    # ome-zarr-py names levels s0, s1, ...: they must come from the metadata.
    assert not (path / "0").exists() and (path / "s0").exists()
    np.testing.assert_array_equal(slide.read_region(0, 10, 20, 70, 50), image[20:70, 10:80])
    assert slide.read_region(0, 0, 0, 300, 200).shape == (200, 300, 3)
    assert slide.mpp(0) == pytest.approx((0.5, 0.5))
    assert slide.mpp(2) == pytest.approx((2.0, 2.0))
    # ome-zarr-py downsamples with its own resize; only shape/dtype are checked there.
    assert slide.read_region(1, 3, 4, 20, 10).shape == (10, 20, 3)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("axes", ["yxc", "zyxc", "tyxc", "cyx"])
def test_hand_written_multiscales_with_custom_paths(tmp_path, image, version, axes):
    path = write_raw_multiscales(
        tmp_path / "s.zarr",
        image,
        axes=axes,
        version=version,
        level_paths=["full", "half", "quarter"],
    )
    slide = open_slide(path)
    assert slide.num_levels == 3 and slide.num_channels == 3
    for level, step in enumerate((1, 2, 4)):
        np.testing.assert_array_equal(
            slide.read_region(level, 5, 7, 30, 20), _crop(image, step, 5, 7, 30, 20)
        )
    np.testing.assert_array_equal(slide.read_level(2), image[::4, ::4])


def test_plain_zarr_array_with_caller_axes(tmp_path, image):
    zarr.create_array(tmp_path / "yxc.zarr", data=image, chunks=(64, 64, 3))
    zarr.create_array(tmp_path / "cyx.zarr", data=np.moveaxis(image, -1, 0), chunks=(3, 64, 64))
    zarr.create_array(tmp_path / "gray.zarr", data=image[..., 0], chunks=(64, 64), zarr_format=2)
    for name, axes in (("yxc.zarr", "yxc"), ("cyx.zarr", "cyx"), ("gray.zarr", "yx")):
        slide = open_slide(tmp_path / name, axes=axes)
        assert slide.num_levels == 1 and slide.mpp(0) is None
        expected = image[30:60, 40:90] if axes != "yx" else image[30:60, 40:90, :1]
        np.testing.assert_array_equal(slide.read_region(0, 40, 30, 50, 30), expected)
    assert open_slide(tmp_path / "gray.zarr", axes="yx").num_channels == 1


def test_plain_zarr_v3_array_uses_dimension_names(tmp_path, image):
    zarr.create_array(
        tmp_path / "a.zarr", data=image, chunks=(64, 64, 3), dimension_names=("y", "x", "c")
    )
    slide = open_slide(tmp_path / "a.zarr")
    np.testing.assert_array_equal(slide.read_region(0, 0, 0, 10, 10), image[:10, :10])


def _copy_to_memory(local: pathlib.Path, prefix: str) -> str:
    fs = fsspec.filesystem("memory")
    for root, _, files in os.walk(local):
        for name in files:
            full = pathlib.Path(root) / name
            fs.pipe(f"/{prefix}/{full.relative_to(local).as_posix()}", full.read_bytes())
    return f"memory://{prefix}"


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_fsspec_memory_url(tmp_path, image, version):
    local = write_ome_zarr(tmp_path / "s.ome.zarr", image, version=version, chunk=64)
    url = _copy_to_memory(local, f"bucket-{version}/s.ome.zarr")
    slide = open_slide(url, slide_id="remote")
    assert slide.path == url
    np.testing.assert_array_equal(slide.read_region(0, 64, 64, 64, 64), image[64:128, 64:128])
    key = TileKey("remote", 0, 128, 64)
    np.testing.assert_array_equal(
        read_tile(slide, key, 64), image[64:128, 128:192]
    )
    with pytest.raises(SlideError, match="does not exist") as info:
        open_slide("memory://bucket-none/absent.zarr", slide_id="r2")
    assert info.value.reason == "missing"


def test_mpp_units_and_multiscale_scale(tmp_path, image):
    nm = write_raw_multiscales(tmp_path / "nm.zarr", image, mpp=500.0, unit="nanometer")
    mm = write_raw_multiscales(tmp_path / "mm.zarr", image, mpp=0.0005, unit="millimeter")
    glob = write_raw_multiscales(tmp_path / "g.zarr", image, mpp=0.25, global_scale=2.0)
    for path in (nm, mm, glob):
        slide = open_slide(path)
        assert slide.mpp(0) == pytest.approx((0.5, 0.5))
        assert slide.mpp(1) == pytest.approx((1.0, 1.0))
        assert slide.mpp(2) == pytest.approx((2.0, 2.0))
    assert unit_to_micrometer("meter") == 1e6 and unit_to_micrometer("pixel") is None


def test_level_for_mpp(tmp_path, image):
    slide = open_slide(write_raw_multiscales(tmp_path / "s.zarr", image))  # 0.5, 1, 2 um
    assert slide.level_for_mpp(0.5) == 0
    assert slide.level_for_mpp(0.9) == 1
    assert slide.level_for_mpp(1.5) == 2  # nearer to 2 than to 1 on a log scale
    assert slide.level_for_mpp(4.0) == 2  # exactly 2x away is accepted
    assert slide.level_for_mpp(0.26) == 0
    with pytest.raises(SlideError, match=r"no level within 2x of mpp=5.0") as info:
        slide.level_for_mpp(5.0)
    assert info.value.reason == "mpp_out_of_range"
    with pytest.raises(SlideError, match="within 2x of mpp=0.2 "):
        slide.level_for_mpp(0.2)
    unitless = open_slide(write_raw_multiscales(tmp_path / "u.zarr", image, mpp=None))
    assert unitless.mpp(0) is None
    with pytest.raises(SlideError, match="no physical pixel size.*level by index") as info:
        unitless.level_for_mpp(0.5)
    assert info.value.reason == "no_units"


class _CountingStore(WrapperStore):
    """Records every key read through the store."""

    def __init__(self, store):
        super().__init__(store)
        self.keys: list[str] = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await super().get(key, prototype, byte_range)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_reads_only_the_chunks_a_tile_touches(tmp_path, version):
    big = synthetic_tissue(1024, 1024, [(0, 0, 1024, 1024)])
    path = write_ome_zarr(tmp_path / "s.ome.zarr", big, version=version, chunk=128)
    store = _CountingStore(LocalStore(path, read_only=True))
    slide = open_slide(store, slide_id="counted")
    store.keys.clear()
    tile = read_tile(slide, TileKey("counted", 0, 256, 128), 128)  # exactly one chunk
    np.testing.assert_array_equal(tile, big[128:256, 256:384])
    assert len(store.keys) == 1 and store.keys[0].startswith("s0/")
    store.keys.clear()
    slide.read_region(0, 200, 100, 128, 128)  # straddles 2 x 2 chunks
    assert len(store.keys) == 4
    store.keys.clear()
    slide.read_region(2, 0, 0, 256, 256)  # the whole 256 x 256 level 2 = 4 chunks
    assert len(store.keys) == 4 and all(k.startswith("s2/") for k in store.keys)


def test_label_image(tmp_path, image):
    labels = np.zeros(image.shape[:2], np.uint8)
    labels[:, 150:] = 2
    labels[:100, :150] = 1
    path = write_ome_zarr(tmp_path / "s.ome.zarr", image, labels={"classes": labels})
    slide = open_slide(path, slide_id="s")
    assert slide.label_names() == ("classes",)
    label = slide.label_image()
    assert label is not None and label.num_channels == 1
    np.testing.assert_array_equal(
        label.read_region(0, 140, 90, 20, 20)[..., 0], labels[90:110, 140:160]
    )
    assert "image-label" in label.attributes
    with pytest.raises(SlideError, match="label image 'nope' not found"):
        slide.label_image("nope")
    bare = open_slide(write_ome_zarr(tmp_path / "b.ome.zarr", image))
    assert bare.label_image() is None and bare.label_names() == ()


# ---------------------------------------------------------------- bad input


def _reason(err: pytest.ExceptionInfo) -> str:
    return err.value.reason


def test_missing_path(tmp_path):
    with pytest.raises(SlideError, match=r"slide 'x'.*does not exist.*manifest") as err:
        open_slide(tmp_path / "nope.zarr", slide_id="x")
    assert _reason(err) == "missing"
    assert isinstance(err.value, PipelineError) and isinstance(err.value, ValueError)


def test_not_a_zarr_store(tmp_path):
    (tmp_path / "slide.bin").write_bytes(b"not zarr")  # (.svs files open as TIFF)
    (tmp_path / "folder").mkdir()
    for path in (tmp_path / "folder", tmp_path / "slide.bin"):
        with pytest.raises(
            SlideError, match="not a Zarr store|could not be opened as Zarr.*Convert"
        ) as err:
            open_slide(path, slide_id="x")
        assert _reason(err) == "not_zarr"


def test_group_without_multiscales(tmp_path):
    zarr.open_group(tmp_path / "g.zarr", mode="w").create_array("0", shape=(8, 8), dtype="u1")
    with pytest.raises(SlideError, match="without OME-NGFF 'multiscales'.*axes='yxc'") as err:
        open_slide(tmp_path / "g.zarr")
    assert _reason(err) == "bad_metadata"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda ms: ms.update(datasets=[]), "has no 'datasets'"),
        (lambda ms: ms["datasets"][1].update(path="missing"), "'missing'.*does not exist"),
        (lambda ms: ms["datasets"][0].pop("path"), r"datasets\[0\].*has no 'path'"),
        (lambda ms: ms.pop("axes"), "has no 'axes'"),
        (
            lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(scale=[1.0]),
            "must list 3 numbers",
        ),
        (lambda ms: ms.update(axes=[{"name": "y"}, {"name": "x"}]), "must list 2 numbers"),
    ],
)
def test_invalid_multiscales(tmp_path, image, edit, match):
    path = write_raw_multiscales(tmp_path / "s.zarr", image, version="0.4")
    group = zarr.open_group(path, mode="r+")
    multiscales = group.attrs["multiscales"]
    edit(multiscales[0])
    group.attrs["multiscales"] = multiscales
    with pytest.raises(SlideError, match=match) as err:
        open_slide(path, slide_id="bad")
    assert _reason(err) == "bad_metadata"


def test_multiscales_not_a_list(tmp_path, image):
    path = write_raw_multiscales(tmp_path / "s.zarr", image, version="0.5")
    group = zarr.open_group(path, mode="r+")
    group.attrs["ome"] = {"version": "0.5", "multiscales": {"oops": 1}}
    with pytest.raises(SlideError, match="must be a non-empty list"):
        open_slide(path)


def test_unsupported_axes(tmp_path, image):
    stack = np.stack([image, image])  # z of size 2
    path = write_raw_multiscales(tmp_path / "z.zarr", image, axes="zyxc")
    group = zarr.open_group(path, mode="r+")
    group.create_array("L0", data=stack, chunks=(1, 64, 64, 3), overwrite=True)
    with pytest.raises(SlideError, match="axis 'z' has size 2.*only size 1") as err:
        open_slide(path)
    assert _reason(err) == "unsupported_axes"
    zarr.create_array(tmp_path / "a.zarr", data=image, chunks=(64, 64, 3))
    for axes, match in (
        ("yxq", "not supported"),
        ("ycc", "not supported"),
        ("yx", "name 2 dimensions"),
    ):
        with pytest.raises(SlideError, match=match) as err:
            open_slide(tmp_path / "a.zarr", axes=axes)
        assert _reason(err) == "unsupported_axes"
    with pytest.raises(SlideError, match="without axis names. Pass axes="):
        open_slide(tmp_path / "a.zarr")


def test_level_and_region_out_of_range(synthetic_dataset):
    slide = open_slide(synthetic_dataset.root / "slides" / "syn-0.ome.zarr", slide_id="syn-0")
    with pytest.raises(SlideError, match=r"level 3 does not exist.*3 level\(s\) \(0..2\)") as err:
        slide.read_region(3, 0, 0, 8, 8)
    assert _reason(err) == "level_out_of_range"
    with pytest.raises(SlideError, match="not inside level 0 of size"):
        read_tile(slide, TileKey("syn-0", 0, 450, 0), 128)
    with pytest.raises(SlideError, match="read_level is for low-resolution levels"):
        slide.read_level(0, max_pixels=1000)


def test_corrupt_chunk(tmp_path, image):
    path = write_ome_zarr(tmp_path / "s.ome.zarr", image, chunk=64)
    chunk = path / "s0" / "c" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"\x00garbage, not zstd")
    slide = open_slide(path, slide_id="s")
    key = TileKey("s", 0, 0, 0)
    with pytest.raises(TileReadError, match="cannot read the tile.*corrupt") as err:
        read_tile(slide, key, 64)
    assert err.value.reason == "read_error" and err.value.tile == key
    np.testing.assert_array_equal(
        read_tile(slide, TileKey("s", 0, 64, 0), 64), image[0:64, 64:128]
    )  # other chunks still read
    clone = pickle.loads(pickle.dumps(err.value))
    assert clone.reason == "read_error" and str(clone) == str(err.value)


def test_nan_in_float_slide(tmp_path):
    data = np.random.default_rng(0).random((128, 128, 2)).astype(np.float32)
    data[70, 80, 1] = np.nan
    zarr.create_array(tmp_path / "f.zarr", data=data, chunks=(64, 64, 2))
    slide = open_slide(tmp_path / "f.zarr", slide_id="f", axes="yxc")
    assert slide.dtype == np.float32 and slide.num_channels == 2
    with pytest.raises(TileReadError, match="1 NaN pixel value") as err:
        read_tile(slide, TileKey("f", 0, 64, 64), 64)
    assert err.value.reason == "nan_pixels"
    np.testing.assert_array_equal(read_tile(slide, TileKey("f", 0, 0, 0), 64), data[:64, :64])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("with_series_list", [False, True])
def test_bioformats2raw_layout_opens_the_first_series(tmp_path, version, with_series_list):
    """bioformats2raw writes the slide at `0/` under a root marked with its layout."""
    image = synthetic_tissue(256, 256, ((0, 0, 128, 256),), color=(190, 70, 150), seed=3)
    root_path = tmp_path / "slide.ome.zarr"
    zarr_format = 2 if version == "0.4" else 3
    root = zarr.open_group(str(root_path), mode="w", zarr_format=zarr_format)
    if version == "0.4":
        root.attrs["bioformats2raw.layout"] = 3
    else:
        root.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    series = "0"
    if with_series_list:
        series = "s0"  # the OME group's series list, not the default "0", is followed
        root.create_group("OME").attrs["series"] = [series]
    write_ome_zarr(root_path / series, image, version=version)
    slide = open_slide(str(root_path), slide_id="b2r")
    assert slide.num_levels == 3 and slide.level_shape(0) == (256, 256)
    np.testing.assert_array_equal(slide.read_region(0, 16, 32, 64, 64), image[32:96, 16:80])

    empty = zarr.open_group(str(tmp_path / "empty.zarr"), mode="w", zarr_format=zarr_format)
    empty.attrs["bioformats2raw.layout"] = 3
    with pytest.raises(SlideError, match="bioformats2raw layout but no image"):
        open_slide(str(tmp_path / "empty.zarr"), slide_id="e")
