"""Tests of pipeline.steps.plan: grids, tissue masks and fractions, plan_slide."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import TileConfig
from pipeline.errors import SlideError
from pipeline.io.manifest import load_slide_manifest
from pipeline.io.slides import open_slide, read_tile
from pipeline.records import SlideRecord, TileKey
from pipeline.steps.plan import (
    close_with_disk,
    fill_holes,
    plan_slide,
    tile_grid,
    tissue_fraction,
    tissue_mask,
)

from .conftest import synthetic_tissue, write_ome_zarr


def _record(dataset, slide_id: str, **kwargs) -> SlideRecord:
    manifest = load_slide_manifest(dataset.manifest_path)
    record = {s.slide_id: s for s in manifest.slides}[slide_id]
    return SlideRecord(**{**record.__dict__, **kwargs})


# ---------------------------------------------------------------- tile_grid


@pytest.mark.parametrize(
    ("height", "width", "size", "stride", "expected"),
    [
        (512, 512, 128, 128, 16),  # 4 x 4
        (500, 300, 128, 64, 6 * 3),  # y: 0..320 step 64; x: 0, 64, 128 (172 fits, 192 not)
        (500, 300, 128, None, 3 * 2),  # non-divisible: remainders dropped
        (256, 256, 128, 200, 1),  # stride > tile: only the origin fits
        (127, 512, 128, 64, 0),  # smaller than a tile
        (128, 128, 128, 1, 1),
    ],
)
def test_tile_grid_counts(height, width, size, stride, expected):
    grid = tile_grid(height, width, size, stride)
    assert grid.shape == (expected, 2) and grid.dtype == np.int64


def test_tile_grid_exact():
    assert tile_grid(300, 200, 100, 50).tolist() == [
        [y, x] for y in (0, 50, 100, 150, 200) for x in (0, 50, 100)
    ]
    with pytest.raises(ValueError, match="stride"):
        tile_grid(10, 10, 4, 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 400), st.integers(1, 130), st.integers(1, 130))
def test_tile_grid_properties(height, width, size, stride):
    grid = tile_grid(height, width, size, stride)
    count_y = (height - size) // stride + 1 if height >= size else 0
    count_x = (width - size) // stride + 1 if width >= size else 0
    assert len(grid) == count_y * count_x
    if len(grid):
        assert (grid >= 0).all() and (grid % stride == 0).all()
        assert (grid[:, 0] + size <= height).all() and (grid[:, 1] + size <= width).all()
        # The dropped edge is always smaller than one stride.
        assert height - (grid[:, 0].max() + size) < stride
        assert width - (grid[:, 1].max() + size) < stride


# ---------------------------------------------------------------- tissue fraction


def _fraction_oracle(mask, tiles, size, level_shape):
    """Brute force: mean of the mask pixels whose centres lie inside the tile."""
    mh, mw = mask.shape
    cy = (np.arange(mh) + 0.5) * level_shape[0] / mh
    cx = (np.arange(mw) + 0.5) * level_shape[1] / mw
    out = []
    for y, x in tiles:
        rows = (cy >= y) & (cy < y + size)
        cols = (cx >= x) & (cx < x + size)
        if not rows.any():
            rows = np.arange(mh) == int((y + size / 2) * mh / level_shape[0])
        if not cols.any():
            cols = np.arange(mw) == int((x + size / 2) * mw / level_shape[1])
        out.append(mask[np.ix_(rows, cols)].mean())
    return np.array(out)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(2, 40),
    st.integers(2, 40),
    st.sampled_from([8, 16, 32, 48]),
    st.integers(0, 2**32 - 1),
)
def test_tissue_fraction_matches_oracle(factor_y, factor_x, mh, mw, size, seed):
    mask = np.random.default_rng(seed).random((mh, mw)) > 0.5
    level_shape = (mh * factor_y, mw * factor_x)
    tiles = tile_grid(*level_shape, size, max(size // 2, 1))
    np.testing.assert_allclose(
        tissue_fraction(mask, tiles, size, level_shape),
        _fraction_oracle(mask, tiles.tolist(), size, level_shape),
    )


def test_tissue_fraction_exact():
    mask = np.zeros((4, 8), bool)
    mask[:2, :4] = True  # top-left quarter of a 64 x 128 level
    # One mask pixel is 16 x 16 level pixels; a tile counts the mask pixels whose
    # centres (8, 24, 40, ...) it contains.
    tiles = np.array([[0, 0], [0, 48], [16, 16], [16, 48], [32, 64], [0, 64]])
    np.testing.assert_array_equal(
        tissue_fraction(mask, tiles, 32, (64, 128)), [1.0, 0.5, 0.5, 0.25, 0.0, 0.0]
    )
    assert tissue_fraction(mask, np.zeros((0, 2), int), 32, (64, 128)).shape == (0,)


# ---------------------------------------------------------------- tissue mask


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 48),
    st.integers(1, 48),
    st.integers(1, 20),
    st.floats(0.0, 0.6),
    st.integers(0, 2**32 - 1),
)
def test_closing_and_hole_filling_equal_scipys(height, width, radius, density, seed):
    """The mask's closing and hole filling are scipy's, pixel for pixel, at any radius
    (wider than the mask too) and density: blobs, lines, holes, the border."""
    from scipy import ndimage
    from skimage.morphology import disk

    rng = np.random.default_rng(seed)
    mask = rng.random((height, width)) < density
    if height > 6 and width > 6 and seed % 2:  # a ring: a hole to fill
        mask[2:-2, 2:-2] = True
        mask[3:-3, 3:-3] = rng.random((height - 6, width - 6)) < density / 4
    np.testing.assert_array_equal(
        close_with_disk(mask, radius), ndimage.binary_closing(mask, structure=disk(radius))
    )
    np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_closing_and_hole_filling_edge_cases():
    from scipy import ndimage
    from skimage.morphology import disk

    for mask in (np.zeros((5, 7), bool), np.ones((5, 7), bool), np.zeros((0, 3), bool),
                 np.eye(9, dtype=bool), np.ones((1, 9), bool)):
        for radius in (1, 3, 12):
            np.testing.assert_array_equal(
                close_with_disk(mask, radius),
                ndimage.binary_closing(mask, structure=disk(radius)),
            )
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    assert fill_holes(ring)[1:6, 1:6].all() and fill_holes(ring).sum() == 25


def test_tissue_mask_blank_and_uniform_images_have_no_tissue():
    assert not tissue_mask(np.full((64, 64, 3), 240, np.uint8)).any()
    # Uniformly stained: nothing to threshold, but it is all tissue (a crop inside tissue).
    assert tissue_mask(np.full((64, 64, 3), (200, 50, 120), np.uint8)).all()
    assert tissue_mask(synthetic_tissue(64, 64, [(0, 0, 64, 64)])).all()
    assert not tissue_mask(np.zeros((32, 32, 5), np.uint16)).any()
    noisy_glass = synthetic_tissue(64, 64, [])
    assert not tissue_mask(noisy_glass).any()


def test_tissue_mask_rgb_and_multiplex():
    image = synthetic_tissue(128, 128, [(0, 0, 64, 128)])
    mask = tissue_mask(image)
    assert mask[4:60].all() and not mask[70:].any()
    fluo = np.zeros((128, 128, 5), np.uint16)
    fluo[64:, :, 1:3] = 9000
    fluo += np.random.default_rng(0).integers(0, 300, fluo.shape, dtype=np.uint16)
    mask = tissue_mask(fluo)  # intensity: bright = tissue
    assert mask[68:].all() and not mask[:60].any()
    gray = np.full((64, 64), 0.9, np.float32)
    gray[:, :32] = 0.3
    assert tissue_mask(gray, mode="darkness")[:, 2:30].all()
    with pytest.raises(ValueError, match="mode='saturation' needs an RGB"):
        tissue_mask(fluo, mode="saturation")
    with pytest.raises(ValueError, match="`mode` must be"):
        tissue_mask(image, mode="bogus")


def test_no_tiles_on_blank_glass_in_real_demo_tissue(demo_dataset):
    from skimage.color import rgb2hsv

    manifest = load_slide_manifest(demo_dataset)
    config = TileConfig(tile_size=256)
    total_kept = total_background = 0
    for record in manifest:
        plan = plan_slide(record, config, on_error="fail")
        slide = open_slide(record.path, slide_id=record.slide_id)
        kept = {t.key for t in plan.tiles}
        assert kept, record.slide_id
        total_kept += len(kept)
        total_background += plan.skipped_dict.get("background", 0)
        h, w = slide.level_shape(0)
        for y, x in tile_grid(h, w, 256).tolist():
            saturation = rgb2hsv(read_tile(slide, TileKey(record.slide_id, 0, x, y), 256))[..., 1]
            tissue_pixels = (saturation > 0.15).mean()
            if TileKey(record.slide_id, 0, x, y) in kept:
                assert tissue_pixels > 0.15, (record.slide_id, x, y)
            if tissue_pixels < 0.01:  # blank glass is never kept
                assert TileKey(record.slide_id, 0, x, y) not in kept
    assert total_background > 0 and total_kept > 8


# ---------------------------------------------------------------- plan_slide


def test_plan_slide_synthetic_counts(synthetic_dataset):
    manifest = load_slide_manifest(synthetic_dataset.manifest_path)
    config = TileConfig(tile_size=synthetic_dataset.tile_size)
    for record in manifest:
        plan = plan_slide(record, config, on_error="fail")
        assert plan.failure is None
        assert len(plan.tiles) == synthetic_dataset.expected_tiles[record.slide_id]
        assert plan.skipped_dict == {
            "background": synthetic_dataset.expected_background[record.slide_id]
        }
        assert plan.num_tiles_total == 16
        assert plan.num_channels == 3 and plan.dtype == "uint8"
        assert list(plan.tiles) == sorted(plan.tiles)
        boxes = synthetic_dataset.boxes[record.slide_id]
        for tile in plan.tiles:
            assert tile.label == record.label_index and tile.soft_label is None
            assert tile.key.level == 0 and tile.key.slide_id == record.slide_id
            assert any(
                y0 <= tile.key.y
                and tile.key.y + 128 <= y1
                and x0 <= tile.key.x
                and tile.key.x + 128 <= x1
                for y0, x0, y1, x1 in boxes
            )
        assert pickle.loads(pickle.dumps(plan)) == plan


def test_plan_slide_tiles_are_exact_level_pixels(synthetic_dataset):
    record = _record(synthetic_dataset, "syn-0", group="p0")
    config = TileConfig(tile_size=64, stride=48, level=1)
    plan = plan_slide(record, config, on_error="fail")
    slide = open_slide(record.path, slide_id=record.slide_id)
    level = np.moveaxis(np.asarray(slide.level_array(1)[:]), 0, -1)  # stored c, y, x
    assert plan.tiles and all(t.group == "p0" for t in plan.tiles)
    for tile in plan.tiles:
        key = tile.key
        assert key.level == 1
        np.testing.assert_array_equal(
            read_tile(slide, key, 64), level[key.y : key.y + 64, key.x : key.x + 64]
        )
    level0 = plan_slide(record, TileConfig(tile_size=128), on_error="fail")
    image = synthetic_tissue(
        512, 512, synthetic_dataset.boxes["syn-0"], color=(190, 70, 150), seed=0
    )
    for tile in level0.tiles:
        np.testing.assert_array_equal(
            read_tile(slide, tile.key, 128),
            image[tile.key.y : tile.key.y + 128, tile.key.x : tile.key.x + 128],
        )


def test_plan_slide_overlap_hand_count(synthetic_dataset):
    # syn-0 tissue is rows 0..256, cols 0..384. Tiles of 128 every 64: fully inside are
    # y in {0, 64, 128} x x in {0, 64, ..., 256} = 15; half-covered tiles (0.5) are
    # rejected at min_tissue=0.75. The grid is 7 x 7 = 49.
    record = _record(synthetic_dataset, "syn-0")
    plan = plan_slide(record, TileConfig(tile_size=128, stride=64, min_tissue=0.75))
    assert len(plan.tiles) == 15 and plan.num_tiles_total == 49
    assert {(t.key.y, t.key.x) for t in plan.tiles} == {
        (y, x) for y in (0, 64, 128) for x in (0, 64, 128, 192, 256)
    }


def test_plan_slide_by_mpp_and_tissue_level(synthetic_dataset):
    record = _record(synthetic_dataset, "syn-2")
    plan = plan_slide(record, TileConfig(tile_size=64, mpp=1.1), on_error="fail")
    assert {t.key.level for t in plan.tiles} == {1}  # level 1 is 1.0 um/px
    assert len(plan.tiles) == synthetic_dataset.expected_tiles["syn-2"]
    plan = plan_slide(record, TileConfig(tile_size=128, tissue_level=1), on_error="fail")
    assert len(plan.tiles) == synthetic_dataset.expected_tiles["syn-2"]
    everything = plan_slide(record, TileConfig(tile_size=128, min_tissue=0.0))
    assert len(everything.tiles) == 16 and everything.skipped == ()
    plan = plan_slide(record, TileConfig(tile_size=64, mpp=8.0))
    assert plan.failure == "mpp_out_of_range" and "within 2x" in plan.message


def test_plan_slide_soft_labels(tmp_path):
    image = synthetic_tissue(256, 256, [(0, 0, 256, 256)])
    labels = np.zeros((256, 256), np.uint8)
    labels[:, :128] = 1
    labels[:, 128:] = 2
    labels[192:, :] = 0  # unlabelled strip
    path = write_ome_zarr(tmp_path / "s.ome.zarr", image, labels={"classes": labels})
    record = SlideRecord("lab", str(path), "tumor", 1)
    config = TileConfig(tile_size=64, stride=32, min_tissue=0.0, label_image="classes")
    plan = plan_slide(record, config, class_names=("normal", "tumor"), on_error="fail")
    soft = {(t.key.y, t.key.x): t.soft_label for t in plan.tiles}
    assert soft[(0, 0)] == (1.0, 0.0) and soft[(0, 192)] == (0.0, 1.0)
    assert soft[(0, 96)] == (0.5, 0.5)  # straddles the class boundary at x = 128
    assert soft[(160, 0)] == (1.0, 0.0)  # half unlabelled: fractions of labelled pixels
    assert soft[(192, 0)] is None  # nothing labelled: the slide label applies
    assert all(t.label == 1 for t in plan.tiles)
    # Names in image-label properties take precedence over value order.
    named = write_ome_zarr(
        tmp_path / "n.ome.zarr",
        image,
        labels={"classes": labels},
        label_properties={
            "classes": [{"label-value": 1, "class": "tumor"}, {"label-value": 2, "class": "normal"}]
        },
    )
    plan = plan_slide(
        SlideRecord("n", str(named), "tumor", 1),
        config,
        class_names=("normal", "tumor"),
        on_error="fail",
    )
    assert {(t.key.y, t.key.x): t.soft_label for t in plan.tiles}[(0, 0)] == (0.0, 1.0)
    with pytest.raises(ValueError, match="class_names"):
        plan_slide(record, config)
    with pytest.raises(SlideError, match="value 2, which maps to no class"):
        plan_slide(record, config, class_names=("only",), on_error="fail")
    missing = TileConfig(tile_size=64, label_image="nope")  # all tissue: mask is all True
    plan = plan_slide(record, missing, class_names=("normal", "tumor"))
    assert plan.failure == "missing_label_image"


# ---------------------------------------------------------------- plan_slide: bad input


def test_plan_slide_failures_skip_or_raise(synthetic_dataset, tmp_path):
    cases = [
        (
            SlideRecord("gone", str(tmp_path / "gone.zarr"), "he", 0),
            TileConfig(),
            "missing",
            "does not exist",
        ),
        (
            _record(synthetic_dataset, "syn-0"),
            TileConfig(level=7),
            "level_out_of_range",
            r"level 7 does not exist",
        ),
        (
            _record(synthetic_dataset, "syn-0"),
            TileConfig(tile_size=128, tissue_level=9),
            "level_out_of_range",
            "level 9 does not exist",
        ),
        (
            _record(synthetic_dataset, "syn-0"),
            TileConfig(tile_size=1024),
            "too_small",
            r"smaller than one 1024x1024 tile. Use a smaller tile_size",
        ),
    ]
    blank = write_ome_zarr(tmp_path / "blank.ome.zarr", synthetic_tissue(256, 256, []))
    cases.append(
        (
            SlideRecord("blank", str(blank), "he", 0),
            TileConfig(tile_size=64),
            "no_tissue",
            "tissue mask of level 2 is empty.*min_tissue=0",
        )
    )
    notzarr = tmp_path / "notzarr"
    notzarr.mkdir()
    cases.append(
        (SlideRecord("nz", str(notzarr), "he", 0), TileConfig(), "not_zarr", "not a Zarr store")
    )
    for record, config, reason, match in cases:
        plan = plan_slide(record, config)
        assert plan.failure == reason and plan.tiles == () and plan.slide_id == record.slide_id
        assert plan.num_channels == 0 and plan.dtype == ""
        with pytest.raises(SlideError, match=match) as err:
            plan_slide(record, config, on_error="fail")
        assert err.value.reason == reason and err.value.slide_id == record.slide_id
    with pytest.raises(ValueError, match="on_error"):
        plan_slide(cases[0][0], TileConfig(), on_error="ignore")


def test_plan_slide_corrupt_thumbnail(tmp_path):
    path = write_ome_zarr(tmp_path / "s.ome.zarr", synthetic_tissue(256, 256, [(0, 0, 128, 256)]))
    for chunk in (path / "s2").rglob("c/*/*/*"):
        chunk.write_bytes(b"broken")
    plan = plan_slide(SlideRecord("s", str(path), "he", 0), TileConfig(tile_size=64))
    assert plan.failure == "read_error" and "level 2" in plan.message


def test_plan_slide_plain_array_with_manifest_axes(tmp_path):
    image = synthetic_tissue(256, 256, [(0, 0, 256, 128)])
    zarr.create_array(tmp_path / "p.zarr", data=image, chunks=(64, 64, 3))
    plan = plan_slide(
        SlideRecord("p", str(tmp_path / "p.zarr"), "he", 0, metadata=(("axes", "yxc"),)),
        TileConfig(tile_size=64),
        on_error="fail",
    )
    assert sorted((t.key.y, t.key.x) for t in plan.tiles) == [
        (y, x) for y in (0, 64, 128, 192) for x in (0, 64)
    ]


def test_absurd_claimed_shape_is_bad_metadata_not_an_allocation(tmp_path):
    """A 56 KB slide claiming 10^7 x 10^7 px fails alone, in bounded memory."""
    import resource

    import zarr

    from pipeline.records import SlideRecord

    path = tmp_path / "huge.zarr"
    zarr.create_array(store=str(path), shape=(3, 10**7, 10**7), chunks=(3, 1024, 1024),
                      dtype="uint8", dimension_names=["c", "y", "x"])
    record = SlideRecord("huge", str(path), "he", 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = plan_slide(record, TileConfig(tile_size=256, min_tissue=0.0))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert plan.failure == "bad_metadata"
    assert "10000000x10000000" in plan.message and "metadata" in plan.message
    assert grown_mib < 200


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_claimed_area_without_chunks_is_counted_not_recorded(tmp_path, version):
    """Level 0 claims 10^5 x 10^5 px (610k tiles, under the cap) but stores 512 x 512:
    the plan holds only tiles whose chunks exist; the rest of the tissue the (real)
    tissue level shows over the claimed area is counted as `missing_chunk`."""
    import json
    import resource

    image = synthetic_tissue(512, 512, [(0, 0, 512, 256)])
    path = write_ome_zarr(tmp_path / "claims.ome.zarr", image, version=version)
    meta = path / "s0" / ("zarr.json" if version == "0.5" else ".zarray")
    doc = json.loads(meta.read_text())
    doc["shape"] = [3, 100_000, 100_000]
    meta.write_text(json.dumps(doc))
    record = SlideRecord("claims", str(path), "he", 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    plan = plan_slide(record, TileConfig(tile_size=128), on_error="fail")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    skipped = plan.skipped_dict
    grid = (100_000 // 128) ** 2
    assert plan.num_tiles_total == grid
    # Only the stored 512 x 512 corner can hold kept tiles (16 tiles of 128 px).
    assert 0 < len(plan.tiles) <= 16
    assert all(t.key.x < 512 and t.key.y < 512 for t in plan.tiles)
    assert skipped["missing_chunk"] > 100_000  # the stretched tissue, counted
    assert grown_mib < 150


def test_plan_counts_tissue_tiles_in_missing_chunks(tmp_path):
    import os

    image = synthetic_tissue(512, 512, [(0, 0, 512, 512)])
    path = write_ome_zarr(tmp_path / "holes.ome.zarr", image)
    os.remove(path / "s0" / "c" / "0" / "1" / "2")  # block (row 1, col 2), all channels
    plan = plan_slide(SlideRecord("h", str(path), "he", 0), TileConfig(tile_size=128),
                      on_error="fail")
    assert plan.skipped_dict == {"missing_chunk": 1}
    assert TileKey("h", 0, 256, 128) not in {t.key for t in plan.tiles}
    assert len(plan.tiles) == 15


def test_auto_tissue_mode_on_grey_brightfield_keeps_only_tissue(tmp_path):
    """A 2-D grey brightfield scan: bright glass, darker tissue (was: every tile kept)."""
    rng = np.random.default_rng(0)
    grey = np.full((512, 512), 232, np.uint8)
    grey[128:384, 0:256] = 110
    grey = np.clip(grey + rng.normal(0, 4, grey.shape), 0, 255).astype(np.uint8)
    mask = tissue_mask(grey)
    assert mask[140:370, 10:240].all() and not mask[:, 300:].any()
    zarr.create_array(store=str(tmp_path / "grey.zarr"), data=grey, chunks=(128, 128),
                      dimension_names=["y", "x"])
    plan = plan_slide(SlideRecord("g", str(tmp_path / "grey.zarr"), "he", 0),
                      TileConfig(tile_size=128), on_error="fail")
    assert sorted((t.key.y, t.key.x) for t in plan.tiles) == [
        (y, x) for y in (128, 256) for x in (0, 128)]
    assert plan.skipped_dict == {"background": 12}
    # Fluorescence (dark background, bright tissue) keeps its rule.
    assert not tissue_mask(255 - grey)[:, 300:].any()
    assert tissue_mask(255 - grey)[140:370, 10:240].all()
