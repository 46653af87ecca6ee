"""Cut a slide into tiles and reject background: a pure-numpy core plus `plan_slide`.

`tile_grid`, `tissue_mask`, `tissue_fraction` and `label_fractions` are pure
functions of arrays; `plan_slide` wires them to a `Slide` and turns a manifest row
into a `SlidePlan` (tile coordinates and labels only, no pixels).

Tiles are identified by ``(slide_id, level, x, y)`` with ``x, y`` the top-left pixel
in the chosen level's own pixel grid, so a tile is exactly
``level[y:y + tile_size, x:x + tile_size]``. Tiles are laid out from the top-left
corner every `stride` pixels; a tile that would cross the right or bottom edge is
dropped (never padded), so up to ``tile_size - 1`` pixels at those edges are not used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config import TileConfig
from ..errors import SlideError
from ..io.slides import Slide, open_slide
from ..records import SlidePlan, SlideRecord, TileKey, TileRecord

__all__ = [
    "label_fractions",
    "plan_slide",
    "tile_grid",
    "tissue_fraction",
    "tissue_mask",
]

# A feature (saturation or intensity, scaled to [0, 1]) that varies less than this
# over the whole image is treated as blank: Otsu would otherwise split pure noise.
MIN_CONTRAST = 0.05
# A low-contrast image is all tissue when its feature is at least this (a field fully
# covered by stained tissue), and all background otherwise (glass, an empty channel).
UNIFORM_TISSUE_LEVEL = 0.15
# More tiles than this on one slide means the metadata is wrong (a 100k px slide at
# 256 px holds ~150k tiles): the slide fails with "bad_metadata" instead of the
# planner trying to allocate the claimed area.
MAX_GRID_TILES = 50_000_000


def tile_grid(height: int, width: int, tile_size: int, stride: int | None = None) -> np.ndarray:
    """Top-left corners of the tiles that fit in a ``height x width`` image.

    Tiles start at 0 and every `stride` pixels on each axis; a tile that would
    cross the bottom or right edge is dropped.

    Args:
        height, width: image size in pixels.
        tile_size: tile side in pixels.
        stride: step between tiles; defaults to `tile_size` (no overlap).

    Returns:
        int64 ``[num_tiles, 2]`` of ``(y, x)``, row-major (y, then x).

    >>> tile_grid(5, 7, 3, 2).tolist()
    [[0, 0], [0, 2], [0, 4], [2, 0], [2, 2], [2, 4]]
    >>> tile_grid(2, 10, 3).shape
    (0, 2)
    """
    stride = tile_size if stride is None else stride
    if tile_size < 1 or stride < 1:
        raise ValueError(
            f"`tile_size` and `stride` must be >= 1. Received: tile_size={tile_size}, "
            f"stride={stride}"
        )
    ys = np.arange(0, max(height - tile_size + 1, 0), stride, dtype=np.int64)
    xs = np.arange(0, max(width - tile_size + 1, 0), stride, dtype=np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_y.ravel(), grid_x.ravel()], axis=1)


def _to_unit_float(image: np.ndarray) -> np.ndarray:
    """Image as float64 in [0, 1]: integers by their dtype range, floats by min/max."""
    if image.dtype.kind in "ui":
        info = np.iinfo(image.dtype)
        return (image.astype(np.float64) - info.min) / float(info.max - info.min)
    values = np.nan_to_num(image.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        low, high = float(values.min()), float(values.max())
        return (values - low) / (high - low) if high > low else np.zeros_like(values)
    return values


def tissue_mask(image: np.ndarray, *, mode: str = "auto") -> np.ndarray:
    """Where the (low-resolution) image shows tissue, by Otsu's threshold.

    The feature thresholded is the HSV saturation for RGB(A) brightfield images
    (glass is grey-white, stained tissue is coloured), and for other channel counts
    the mean channel intensity (fluorescence/multiplex: tissue is bright), or its
    darkness when the image's border is bright (>= 0.5 of the range: a grey
    brightfield scan, where glass is bright and tissue dark).
    The feature is smoothed (Gaussian, sigma 1 px) before scikit-image's
    `threshold_otsu`; the mask is then closed (disk of 1/64 of the shorter side) and
    its holes filled, so sparse stroma between stained structures counts as tissue.
    An image whose feature varies by less than 0.05 has nothing to threshold: it is
    all background (blank glass, an empty scan: all False, not an error) unless the
    feature is high everywhere (>= 0.15: a field fully covered by tissue). Likewise,
    when the class below Otsu's threshold averages >= 0.15 it is not glass, and the
    whole image is tissue.

    Args:
        image: ``[height, width, channels]`` (or ``[height, width]``), any dtype.
        mode: ``"auto"``, ``"saturation"`` (needs 3 or 4 channels), ``"intensity"``
            (bright = tissue) or ``"darkness"`` (dark = tissue, grey brightfield).

    Returns:
        bool ``[height, width]``.

    >>> img = np.full((64, 64, 3), 235, np.uint8); img[:32, :32] = (200, 60, 150)
    >>> mask = tissue_mask(img)
    >>> bool(mask[2:30, 2:30].all()), bool(mask[34:, :].any() or mask[:, 34:].any())
    (True, False)
    >>> bool(tissue_mask(np.full((8, 8, 3), 240, np.uint8)).any())
    False
    """
    from skimage.filters import gaussian, threshold_otsu

    if image.ndim == 2:
        image = image[..., np.newaxis]
    if image.ndim != 3:
        raise ValueError(
            f"`image` must be [height, width, channels]. Received: shape={image.shape}"
        )
    channels = image.shape[-1]
    if mode == "auto":
        mode = ("saturation" if channels in (3, 4)
                else _grey_mode(_to_unit_float(image).mean(axis=-1)))
    if mode not in ("saturation", "intensity", "darkness"):
        raise ValueError(
            "`mode` must be 'auto', 'saturation', 'intensity' or 'darkness'. "
            f"Received: mode={mode!r}"
        )
    if mode == "saturation":
        if channels not in (3, 4):
            raise ValueError(
                f"mode='saturation' needs an RGB(A) image. Received: {channels} channels"
            )
        feature = _saturation(image)
    elif mode == "intensity":
        feature = _to_unit_float(image).mean(axis=-1)
    else:
        feature = 1.0 - _to_unit_float(image).mean(axis=-1)
    if feature.size == 0:
        return np.zeros(feature.shape, dtype=bool)
    smooth = gaussian(feature, sigma=1.0)
    if float(np.ptp(feature)) < MIN_CONTRAST or float(np.ptp(smooth)) < MIN_CONTRAST / 2:
        # Nothing for Otsu to separate: all glass (or empty), or all tissue.
        return np.full(feature.shape, float(feature.mean()) >= UNIFORM_TISSUE_LEVEL)
    feature = smooth
    threshold = threshold_otsu(feature)
    mask = feature > threshold
    if float(feature[~mask].mean()) >= UNIFORM_TISSUE_LEVEL:
        # Otsu split tissue from tissue (e.g. light from dark stain): no glass in view.
        return np.ones(feature.shape, dtype=bool)
    radius = max(1, min(mask.shape) // 64)
    # Pad with edge values so closing does not erode tissue that touches the border.
    padded = np.pad(mask, radius, mode="edge")
    padded = close_with_disk(padded, radius)
    return fill_holes(padded[radius:-radius, radius:-radius])


def _saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation of the first three channels of `image` as unit floats, bit for bit
    what ``skimage.color.rgb2hsv(_to_unit_float(image)[..., :3])[..., 1]`` gives
    (``(max - min) / max`` over the channels, 0 where they are equal), 4x faster: an
    integer image's channel max and min are taken before converting (the conversion is
    increasing), and no hue is computed.
    """
    if image.dtype.kind in "ui":
        rgb = [image[..., c] for c in range(3)]
        high = _to_unit_float(np.maximum(np.maximum(rgb[0], rgb[1]), rgb[2]))
        low = _to_unit_float(np.minimum(np.minimum(rgb[0], rgb[1]), rgb[2]))
    else:
        values = _to_unit_float(image)[..., :3]
        high, low = values.max(axis=-1), values.min(axis=-1)
    delta = high - low
    with np.errstate(invalid="ignore", divide="ignore"):
        saturation = delta / high
    saturation[delta == 0.0] = 0.0
    return saturation


def _grey_mode(intensity: np.ndarray) -> str:
    """`tissue_mask`'s rule for a non-RGB image: ``"darkness"`` when its border (where
    the background is) is bright, as glass is in a grey brightfield scan, else
    ``"intensity"`` (fluorescence: a dark background, bright tissue)."""
    height, width = intensity.shape
    ring = max(1, min(height, width) // 20)
    border = np.concatenate([intensity[:ring].ravel(), intensity[-ring:].ravel(),
                             intensity[:, :ring].ravel(), intensity[:, -ring:].ravel()])
    return "darkness" if border.size and float(np.median(border)) >= 0.5 else "intensity"


def close_with_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """`ndimage.binary_closing(mask, structure=disk(radius))`, exactly, in O(pixels x radius)
    byte operations.

    The closing is a dilation then an erosion by the Euclidean disk (the pixel offsets
    ``dy**2 + dx**2 <= radius**2``), and the erosion is the complement of the dilation
    of the complement. Pixels outside the array count as background, as with
    `binary_closing`'s default ``border_value=0``, so nothing within `radius` of the
    border survives the erosion. 3.5x faster than thresholding two Euclidean distance
    transforms on the 1024-px thumbnail of a slide; planning is mostly this.

    >>> from scipy import ndimage
    >>> from skimage.morphology import disk
    >>> m = np.zeros((9, 9), bool); m[2:7, 2] = m[2:7, 4] = True
    >>> bool((close_with_disk(m, 1) == ndimage.binary_closing(m, disk(1))).all())
    True
    """
    if not mask.any():
        return mask.copy()
    dilated = _dilate_with_disk(mask, radius)
    height, width = mask.shape
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    inside = np.minimum(np.minimum(rows + 1, height - rows),
                        np.minimum(cols + 1, width - cols)) > radius
    if dilated.all():
        return inside
    return ~_dilate_with_disk(~dilated, radius) & inside


def _dilate_with_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """`ndimage.binary_dilation(mask, structure=disk(radius))`, exactly.

    A pixel is set when, for some row offset ``dy`` within the disk, the row ``dy``
    away has a set pixel within the disk's half-width there,
    ``floor(sqrt(radius**2 - dy**2))``: one horizontal gap map (distance to the
    nearest set pixel of the row), thresholded per half-width and OR-ed row-shifted.
    """
    height, width = mask.shape
    far = 2 * (width + radius + 1)
    columns = np.arange(width, dtype=np.int32 if 2 * far < 2**31 else np.int64)  # |gaps| < 2 far
    left = np.where(mask, columns, -far)
    np.maximum.accumulate(left, axis=1, out=left)
    right = np.where(mask, columns, far)[:, ::-1]
    right = np.minimum.accumulate(right, axis=1)[:, ::-1]
    gap = np.minimum(columns - left, right - columns)
    gap = np.minimum(gap, radius + 1).astype(np.uint8 if radius < 254 else np.int64)
    out = np.zeros_like(mask)
    within: dict[int, np.ndarray] = {}
    for dy in range(-min(radius, height - 1), min(radius, height - 1) + 1):
        half = math.isqrt(radius * radius - dy * dy)
        near = within.get(half)
        if near is None:
            near = within[half] = gap <= half
        if dy >= 0:
            out[:height - dy] |= near[dy:]
        else:
            out[-dy:] |= near[:height + dy]
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`ndimage.binary_fill_holes(mask)` of a 2-D bool mask, exactly, from one
    labelling: background (4-connected) that does not reach the border is a hole.
    Several times faster than `binary_fill_holes`' repeated dilations on a slide's
    thumbnail.

    >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True; m[2, 2] = False
    >>> bool(fill_holes(m)[2, 2]), bool(fill_holes(m)[0, 0])
    (True, False)
    """
    from scipy import ndimage

    labels, count = ndimage.label(~mask)
    if count == 0:
        return mask.copy()
    reaches_border = np.zeros(count + 1, dtype=bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        reaches_border[edge] = True
    reaches_border[0] = True  # label 0: the mask itself
    return mask | ~reaches_border[labels]


def _box_bounds(
    starts: np.ndarray, tile_size: int, scale: float, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mask-pixel ranges [lo, hi) whose centres fall inside each tile (at least one pixel)."""
    lo = np.ceil(starts * scale - 0.5).astype(np.int64)
    hi = np.ceil((starts + tile_size) * scale - 0.5).astype(np.int64)
    # A tile smaller than a mask pixel holds no pixel centre: use the pixel under its centre.
    centre = np.floor((starts + tile_size / 2.0) * scale).astype(np.int64)
    empty = hi <= lo
    lo = np.where(empty, centre, lo)
    hi = np.where(empty, centre + 1, hi)
    return np.clip(lo, 0, size), np.clip(hi, 0, size)


def label_fractions(
    values: np.ndarray,
    tiles_yx: np.ndarray,
    tile_size: int,
    level_shape: tuple[int, int],
) -> np.ndarray:
    """Mean of `values` over each tile's footprint, for a map at any resolution.

    `values` ``[mh, mw, k]`` covers the same field of view as a level of size
    `level_shape`; each tile ``(y, x)`` of that level is mapped onto the mask pixels
    whose centres it contains (the single pixel under its centre when it is smaller
    than one mask pixel). Uses a summed-area table, so it is O(pixels + tiles).

    Returns:
        float64 ``[num_tiles, k]``.
    """
    return _box_means(_summed_area(values), tiles_yx, tile_size, level_shape)


def _summed_area(values: np.ndarray) -> np.ndarray:
    """Summed-area table ``[mh + 1, mw + 1, k]`` of a ``[mh, mw(, k)]`` map."""
    if values.ndim == 2:
        values = values[..., np.newaxis]
    mh, mw, k = values.shape
    table = np.zeros((mh + 1, mw + 1, k), dtype=np.float64)
    inner = table[1:, 1:]  # summed in place: no float64 copies of the map
    np.cumsum(values, axis=0, dtype=np.float64, out=inner)
    np.cumsum(inner, axis=1, out=inner)
    return table


def _box_means(table: np.ndarray, tiles_yx: np.ndarray, tile_size: int,
               level_shape: tuple[int, int]) -> np.ndarray:
    """Mean over each tile's footprint, from a `_summed_area` table: ``[n, k]``."""
    tiles_yx = np.asarray(tiles_yx, dtype=np.int64).reshape(-1, 2)
    mh, mw, k = table.shape[0] - 1, table.shape[1] - 1, table.shape[2]
    height, width = level_shape
    if len(tiles_yx) == 0:
        return np.zeros((0, k), dtype=np.float64)
    y0, y1 = _box_bounds(tiles_yx[:, 0], tile_size, mh / height, mh)
    x0, x1 = _box_bounds(tiles_yx[:, 1], tile_size, mw / width, mw)
    sums = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    area = np.maximum((y1 - y0) * (x1 - x0), 1)[:, np.newaxis]
    return sums / area


def tissue_fraction(
    mask: np.ndarray,
    tiles_yx: np.ndarray,
    tile_size: int,
    level_shape: tuple[int, int],
) -> np.ndarray:
    """Fraction of tissue in each tile, from a mask computed at another resolution.

    Args:
        mask: bool ``[mh, mw]``, the tissue mask of a (low-resolution) level.
        tiles_yx: ``[num_tiles, 2]`` top-left ``(y, x)`` in the tiled level's pixels.
        tile_size: tile side in the tiled level's pixels.
        level_shape: ``(height, width)`` of the tiled level.

    Returns:
        float64 ``[num_tiles]`` in [0, 1].

    >>> mask = np.zeros((4, 4), bool); mask[:2, :2] = True
    >>> tissue_fraction(mask, tile_grid(8, 8, 4), 4, (8, 8)).tolist()
    [1.0, 0.0, 0.0, 0.0]
    """
    return label_fractions(mask.astype(np.float64), tiles_yx, tile_size, level_shape)[:, 0]


def _label_value_map(attributes: Mapping[str, Any], class_names: Sequence[str]) -> dict[int, int]:
    """Label value -> class index, from ``image-label.properties`` "class" names."""
    label_meta = attributes.get("image-label", {})
    properties = label_meta.get("properties", []) if isinstance(label_meta, Mapping) else []
    mapping: dict[int, int] = {}
    for entry in properties:
        if isinstance(entry, Mapping) and "label-value" in entry and "class" in entry:
            name = str(entry["class"])
            if name in class_names:
                mapping[int(entry["label-value"])] = list(class_names).index(name)
    if mapping:
        return mapping
    return {value: value - 1 for value in range(1, len(class_names) + 1)}


def _soft_labels(
    slide: Slide,
    name: str,
    level: int,
    tiles_yx: np.ndarray,
    tile_size: int,
    class_names: Sequence[str],
) -> list[tuple[float, ...] | None]:
    labels = slide.label_image(name)
    if labels is None:  # pragma: no cover - label_image(name) raises instead
        raise SlideError(slide.slide_id, "missing_label_image", f"no label image {name!r}")
    value_map = _label_value_map(labels.attributes, class_names)
    target = slide.level_shape(level)
    matching = [i for i in range(labels.num_levels) if labels.level_shape(i) == target]
    label_level = matching[0] if matching else 0
    label_shape = labels.level_shape(label_level)
    scale_y, scale_x = label_shape[0] / target[0], label_shape[1] / target[1]
    result: list[tuple[float, ...] | None] = []
    for y, x in tiles_yx.tolist():
        y0, y1 = int(y * scale_y), max(int(round((y + tile_size) * scale_y)), int(y * scale_y) + 1)
        x0, x1 = int(x * scale_x), max(int(round((x + tile_size) * scale_x)), int(x * scale_x) + 1)
        y1, x1 = min(y1, label_shape[0]), min(x1, label_shape[1])
        region = labels.read_region(label_level, x0, y0, x1 - x0, y1 - y0)[..., 0]
        values, counts = np.unique(region.astype(np.int64), return_counts=True)
        per_class = np.zeros(len(class_names), dtype=np.float64)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            if value == 0:
                continue
            if value not in value_map:
                raise SlideError(
                    slide.slide_id,
                    "bad_labels",
                    f"label image {name!r} holds value {value}, which maps to no class of "
                    f"{list(class_names)} (values 1..K map to classes in order, or name them "
                    "with image-label properties 'label-value' + 'class'). Fix the labels.",
                )
            per_class[value_map[value]] += count
        total = per_class.sum()
        result.append(None if total == 0 else tuple(float(v) for v in per_class / total))
    return result


def _plan(
    record: SlideRecord,
    config: TileConfig,
    class_names: Sequence[str] | None,
) -> SlidePlan:
    if record.duplicate_of is not None:
        raise SlideError(
            record.slide_id,
            "duplicate_path",
            f"its path {record.path} is the slide of row {record.duplicate_of!r} too; the "
            f"slide is used once, as {record.duplicate_of!r}. Remove the repeated row, or "
            "point it at its own slide.",
        )
    axes = record.metadata_dict.get("axes") or None  # plain Zarr arrays: manifest column
    slide = open_slide(record.path, slide_id=record.slide_id, axes=axes)
    level, height, width, rows, cols = _grid(record, slide, config)
    size = config.tile_size
    mask = _tissue(record, slide, config)
    stain_norm = config.stain_norm
    stain_fit = None
    kept, kept_tissue, rejected, missing = _scan_grid(
        slide, config, level, (height, width), (rows, cols), mask)
    if stain_norm != "none":
        # The slide's stain, once: on a tissue-weighted sample of its kept tiles, read at
        # the level they are cut from (the level the fit is applied to).
        from .stain import fit_slide

        weights = np.concatenate(kept_tissue) if kept_tissue else np.ones(len(kept))
        stain_fit = fit_slide(slide, kept, weights, level=level, tile_size=size,
                              method=stain_norm, count=config.stain_fit_tiles)
    soft: list[tuple[float, ...] | None] = [None] * len(kept)
    if config.label_image is not None:
        if class_names is None:
            raise ValueError(
                "`class_names` must be given to plan_slide when config.label_image is set "
                "(soft labels have one entry per class). Pass manifest.class_names."
            )
        soft = _soft_labels(slide, config.label_image, level, kept, size, class_names)
    # Sorted by key (x, then y: one slide, one level) before the records are made,
    # which sorting the records themselves (dataclass comparisons) takes far longer.
    corners = list(zip(kept.tolist(), soft, strict=True))
    tiles = [
        TileRecord(
            TileKey(record.slide_id, level, int(x), int(y)),
            label=record.label_index,
            group=record.group,
            soft_label=soft_label,
        )
        for (y, x), soft_label in (corners[i] for i in np.lexsort(kept.T).tolist())
    ]
    stats = slide.read_stats
    return SlidePlan(
        slide_id=record.slide_id,
        tiles=tuple(tiles),
        skipped=tuple((reason, count) for reason, count in
                      (("background", rejected), ("missing_chunk", missing)) if count),
        num_channels=slide.num_channels,
        dtype=slide.dtype.name,
        chunk_shape=slide.chunk_shape(level),
        chunks_read=stats.chunks_read if stats is not None else 0,
        bytes_read=stats.bytes_read if stats is not None else 0,
        requests=stats.requests if stats is not None else 0,
        stain_fit=stain_fit,
    )


def _grid(record: SlideRecord, slide: Slide, config: TileConfig
          ) -> tuple[int, int, int, int, int]:
    """The level tiles are cut from, its shape and the tile grid's rows and columns,
    refusing a level smaller than one tile or claiming more than `MAX_GRID_TILES`."""
    level = slide.level_for_mpp(config.mpp) if config.mpp is not None else config.level
    height, width = slide.level_shape(level)
    size = config.tile_size
    if height < size or width < size:
        raise SlideError(
            record.slide_id,
            "too_small",
            f"level {level} is {height}x{width} pixels, smaller than one {size}x{size} tile. "
            "Use a smaller tile_size or a higher-resolution level.",
        )
    step = config.step
    rows = (height - size) // step + 1
    cols = (width - size) // step + 1
    if rows * cols > MAX_GRID_TILES:
        raise SlideError(
            record.slide_id,
            "bad_metadata",
            f"level {level} claims {height}x{width} pixels, i.e. {rows * cols:,} tiles of "
            f"{size} px at stride {step}, more than the {MAX_GRID_TILES:,} one slide may "
            "hold. The shape in the metadata is probably wrong; fix it or use a coarser "
            "level.",
        )
    return level, height, width, rows, cols


def _tissue(record: SlideRecord, slide: Slide, config: TileConfig) -> np.ndarray | None:
    """The slide's tissue mask (`tissue_mask` of the tissue level), when tiles are
    filtered by tissue or stain-normalised; else None."""
    mask = None
    if config.min_tissue > 0 or config.stain_norm != "none":
        tissue_level = slide.num_levels - 1 if config.tissue_level is None else config.tissue_level
        slide.level_shape(tissue_level)  # range check, with a clear error
        try:
            thumbnail = slide.read_level(tissue_level)
        except SlideError:
            raise
        except Exception as err:  # corrupt chunk in the thumbnail: the slide is unusable
            raise SlideError(
                record.slide_id,
                "read_error",
                f"cannot read level {tissue_level} for the tissue mask "
                f"({type(err).__name__}: {err}). Re-export the slide.",
            ) from err
        mask = tissue_mask(thumbnail, mode=config.tissue_mode)
        if not mask.any() and config.min_tissue > 0:
            raise SlideError(
                record.slide_id,
                "no_tissue",
                f"the tissue mask of level {tissue_level} is empty (blank or uniform image). "
                "Check the slide, or set min_tissue=0 to keep every tile.",
            )
    return mask


def _scan_grid(slide: Slide, config: TileConfig, level: int, shape: tuple[int, int],
               grid: tuple[int, int], mask: np.ndarray | None
               ) -> tuple[np.ndarray, list[np.ndarray], int, int]:
    """The grid's kept tile corners ``(y, x)``, their tissue fractions per row (for the
    stain fit), and how many were rejected as background or for missing chunks."""
    height, width = shape
    rows, cols = grid
    size, step = config.tile_size, config.step
    stain_norm = config.stain_norm
    # Row by row, so planning memory follows the tiles kept, not the claimed area; a
    # tissue tile whose chunks do not exist in the store is counted (`missing_chunk`),
    # never recorded, so a level claiming far more pixels than it stores costs one
    # vectorised pass over the claimed grid, not one record per claimed tile.
    xs = np.arange(cols, dtype=np.int64) * step
    kept_rows, kept_tissue, rejected, missing = [], [], 0, 0
    table = _summed_area(mask) if mask is not None else None
    chunk_h, chunk_w = slide.chunk_shape(level)
    blocks = existing_blocks(slide, level)
    for row in range(rows):
        row_yx = np.stack([np.full(cols, row * step, dtype=np.int64), xs], axis=1)
        if table is not None:
            fractions = _box_means(table, row_yx, size, (height, width))[:, 0]
            keep = fractions >= config.min_tissue
            rejected += int((~keep).sum())
            row_yx = row_yx[keep]
        else:
            fractions = None
        if blocks is not None and len(row_yx):
            stored = _blocks_exist(blocks, row_yx, size, (chunk_h, chunk_w), width)
            missing += int((~stored).sum())
            row_yx = row_yx[stored]
            if fractions is not None:
                fractions = fractions[keep][stored]
        elif fractions is not None:
            fractions = fractions[keep]
        if stain_norm != "none" and fractions is not None:
            kept_tissue.append(fractions)
        if len(row_yx):
            kept_rows.append(row_yx)
    kept = np.concatenate(kept_rows) if kept_rows else np.zeros((0, 2), dtype=np.int64)
    return kept, kept_tissue, rejected, missing


def existing_blocks(slide: Slide, level: int) -> np.ndarray | None:
    """Sorted ids ``row * block_cols + col`` of the chunk blocks of `level` whose chunks
    (every channel's) exist in the store, from one listing of the level's prefix.

    Blocks are chunks, or shards for sharded arrays (as `Slide.chunk_shape`). None
    when the store cannot be listed (then nothing is filtered here; packing still
    counts a missing chunk per tile), or when the slide's chunks are not objects of
    their own (`Slide.chunks_listable`: a TIFF file's tiles).
    """
    if not slide.chunks_listable:
        return None
    try:
        from zarr.core.sync import sync

        array = slide.level_array(level)
        metadata = array.metadata
        encoding = getattr(metadata, "chunk_key_encoding", None)
        if encoding is not None:
            separator = encoding.separator
            lead = "c" + separator if getattr(encoding, "name", "default") == "default" else ""
        else:
            separator = getattr(metadata, "dimension_separator", None) or "."
            lead = ""
        prefix = array.store_path.path

        async def listing() -> list[str]:
            return [key async for key in array.store_path.store.list_prefix(prefix)]

        keys = sync(listing())
    except Exception:  # noqa: BLE001 - any store that cannot list: no filter
        return None
    grid = getattr(array, "shards", None) or array.chunks
    axes = slide.axes
    yi, xi = axes.index("y"), axes.index("x")
    block_cols = -(-int(array.shape[xi]) // int(grid[xi]))
    per_block = 1
    for axis, (extent, chunk) in enumerate(zip(array.shape, grid, strict=True)):
        if axis not in (yi, xi):
            per_block *= -(-int(extent) // int(chunk))
    start = len(prefix.rstrip("/")) + 1 if prefix else 0
    names = [key[start:] for key in keys]
    if not any(name in (".zarray", "zarr.json") for name in names):
        return None  # a listing without the array's own metadata cannot be trusted
    counts: dict[int, int] = {}
    for name in names:
        if not name.startswith(lead):
            continue
        parts = name[len(lead):].split(separator)
        if len(parts) != array.ndim or not all(p.isdigit() for p in parts):
            continue
        block = int(parts[yi]) * block_cols + int(parts[xi])
        counts[block] = counts.get(block, 0) + 1
    return np.array(sorted(b for b, n in counts.items() if n >= per_block), dtype=np.int64)


def _blocks_exist(blocks: np.ndarray, tiles_yx: np.ndarray, tile_size: int,
                  chunk_shape: tuple[int, int], width: int) -> np.ndarray:
    """Whether every block each tile ``(y, x)`` touches is in `blocks` (`existing_blocks`)."""
    ch, cw = chunk_shape
    block_cols = -(-width // cw)
    y, x = tiles_yx[:, 0], tiles_yx[:, 1]
    r0, r1 = y // ch, (y + tile_size - 1) // ch
    c0, c1 = x // cw, (x + tile_size - 1) // cw
    ok = np.ones(len(tiles_yx), dtype=bool)
    for dr in range(int((r1 - r0).max()) + 1):
        for dc in range(int((c1 - c0).max()) + 1):
            inside = (r0 + dr <= r1) & (c0 + dc <= c1)
            ids = (r0 + dr) * block_cols + (c0 + dc)
            found = np.isin(ids, blocks, assume_unique=False)
            ok &= found | ~inside
    return ok


def plan_slide(
    record: SlideRecord,
    config: TileConfig,
    *,
    on_error: str = "skip",
    class_names: Sequence[str] | None = None,
) -> SlidePlan:
    """Tile one slide and keep the tiles with enough tissue; no tile pixel is read
    (with ``config.stain_norm``: only the tiles of the slide's stain fit).

    Chooses the level (``config.mpp`` if set, else ``config.level``), lays out the
    tile grid (`tile_grid`), computes `tissue_mask` on ``config.tissue_level`` (the
    lowest resolution by default) and keeps tiles whose `tissue_fraction` is at least
    ``config.min_tissue`` (all tiles, without reading anything, when it is 0). Each
    rejected tile is counted under ``skipped["background"]``. With ``config.stain_norm``,
    the plan's ``stain_fit`` is `stain.fit_slide` of a sample of the kept tiles.

    With ``config.label_image`` set, each kept tile's ``soft_label`` is the class
    fractions of the labelled pixels (value 0 = unlabelled, values 1..K = classes in
    `class_names` order unless the label image's ``properties`` name a "class"); a
    tile without labelled pixels keeps the slide label (``soft_label=None``). The hard
    ``label`` is always the slide's.

    Args:
        record: the manifest row.
        config: tiling settings.
        on_error: ``"skip"`` returns ``SlidePlan(failure=reason, message=...)`` for a
            slide-level problem; ``"fail"`` raises the `SlideError`.
        class_names: the run's classes; required with ``config.label_image``.

    Returns:
        A `SlidePlan` with tiles sorted by key, `num_channels` and `dtype` filled.

    Raises:
        SlideError: with ``on_error="fail"``: ``missing``, ``not_zarr``,
            ``bad_metadata``, ``unsupported_axes``, ``level_out_of_range``, ``no_units``,
            ``mpp_out_of_range``, ``too_small``, ``no_tissue``, ``read_error``,
            ``stain_fit``...
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"`on_error` must be 'skip' or 'fail'. Received: on_error={on_error!r}")
    try:
        return _plan(record, config, class_names)
    except SlideError as err:
        if on_error == "fail":
            raise
        return SlidePlan(slide_id=record.slide_id, failure=err.reason, message=str(err))
