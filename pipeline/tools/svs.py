"""Write Aperio-style SVS files (tiled pyramidal JPEG TIFF) with tifffile.

For the demo (`softmix demo-data --format svs`), the tests and the conversion
benchmark: the layout Aperio's scanners write, so tifffile (and OpenSlide) read it as
SVS: a tiled baseline whose ImageDescription starts with ``Aperio`` and carries
``MPP``, a stripped thumbnail, tiled reduced levels (4x apart), then label and macro
images. Pixels come from a function of the region, so a slide-sized file is written
tile by tile and never exists whole in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["write_svs"]

Region = Callable[[int, int, int, int], np.ndarray]  # (y0, y1, x0, x1) -> [h, w, 3] uint8


def _mean_downsample(block: np.ndarray, factor: int) -> np.ndarray:
    """Mean of `factor` x `factor` cells of uint8 ``[h, w, c]``; edges use what is there."""
    h, w, c = block.shape
    out_h, out_w = -(-h // factor), -(-w // factor)
    pad = ((0, out_h * factor - h), (0, out_w * factor - w), (0, 0))
    padded = np.pad(block, pad, mode="edge").astype(np.uint32)
    cells = padded.reshape(out_h, factor, out_w, factor, c)
    return ((cells.sum(axis=(1, 3)) + factor * factor // 2) // (factor * factor)).astype(
        np.uint8)


def _level_region(region: Region, factor: int, height: int, width: int) -> Region:
    if factor == 1:
        return region

    def read(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        block = region(y0 * factor, min(height, y1 * factor), x0 * factor,
                       min(width, x1 * factor))
        return _mean_downsample(block, factor)

    return read


def _tiles(region: Region, height: int, width: int, tile: int) -> Iterator[np.ndarray]:
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield np.ascontiguousarray(region(y, min(height, y + tile), x, min(width, x + tile)))


def write_svs(
    path: str | os.PathLike[str],
    image: np.ndarray | Region,
    *,
    shape: tuple[int, int] | None = None,
    mpp: float = 0.5,
    tile: int = 256,
    quality: int = 90,
    compression: str = "jpeg",
    min_level_size: int = 1024,
    app_mag: int = 20,
) -> list[tuple[int, int]]:
    """Write `image` (``[h, w, 3]`` uint8, or a region function with `shape`) as SVS.

    Args:
        path: the ``.svs`` file to write.
        image: the level-0 pixels, or ``f(y0, y1, x0, x1) -> [h, w, 3]`` uint8.
        shape: ``(height, width)`` when `image` is a function.
        mpp: level-0 micrometres per pixel (Aperio's ``MPP``).
        tile: tile side in pixels (Aperio writes 240 or 256).
        quality: JPEG quality (Aperio's ``Q``).
        compression: ``"jpeg"`` (Aperio's usual), or ``"jpeg2000"`` (Aperio's
            ``33003/33005`` files; imagecodecs writes it lossless by default).
        min_level_size: add 4x-reduced levels while a level is larger than this.
        app_mag: objective magnification written as ``AppMag``.

    Returns:
        The ``(height, width)`` of each pyramid level written.
    """
    import tifffile

    if callable(image):
        if shape is None:
            raise ValueError("`shape` is required when `image` is a region function.")
        region: Region = image
        height, width = shape
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"`image` must be uint8 [h, w, 3]. Received: {array.shape} "
                             f"{array.dtype}")
        height, width = array.shape[:2]

        def region(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            return array[y0:y1, x0:x1]

    codec = "JPEG" if compression == "jpeg" else "J2K"
    head = (f"Aperio Image Library v12.0.15 \n{width}x{height} ({tile}x{tile}) "
            f"{codec}/RGB Q={quality}")
    description = f"{head}|AppMag = {app_mag}|MPP = {mpp:.4f}|Filename = {os.path.basename(path)}"
    args: dict[str, Any] = {"photometric": "rgb", "metadata": None}
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}}
    levels = jpeg if compression == "jpeg" else {"compression": compression}
    factors = [1]
    while max(height, width) // factors[-1] > min_level_size:
        factors.append(factors[-1] * 4)
    sizes = [(-(-height // f), -(-width // f)) for f in factors]
    thumb_factor = max(1, max(height, width) // 768)
    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**31) as writer:
        for index, (factor, (h, w)) in enumerate(zip(factors, sizes, strict=True)):
            level = _level_region(region, factor, height, width)
            writer.write(_tiles(level, h, w, tile), shape=(h, w, 3), dtype=np.uint8,
                         tile=(tile, tile), **levels,
                         description=description if index == 0 else
                         f"{head} -> {w}x{h} - ", **args)
            if index == 0:  # the thumbnail follows the baseline, stripped
                th, tw = -(-height // thumb_factor), -(-width // thumb_factor)
                thumb = _level_region(region, thumb_factor, height, width)(0, th, 0, tw)
                writer.write(thumb, **jpeg,
                             description=f"{head} -> {tw}x{th} - ", **args)
        label = np.full((256, 256, 3), 255, np.uint8)
        writer.write(label, compression="lzw", subfiletype=1,
                     description="Aperio Image Library v12.0.15 \nlabel 256x256", **args)
        macro = _level_region(region, max(1, max(height, width) // 512), height, width)(
            0, 256, 0, 512) if min(height, width) >= 512 else label
        writer.write(np.ascontiguousarray(macro), **jpeg, subfiletype=9,
                     description=f"Aperio Image Library v12.0.15 \nmacro {macro.shape[1]}x"
                                 f"{macro.shape[0]}", **args)
    return sizes


def demo_to_svs(out_dir: str | os.PathLike[str], *, quality: int = 90) -> list[str]:
    """Turn the OME-Zarr slides `softmix demo-data` just wrote in `out_dir` into SVS.

    Each ``slides/<name>.ome.zarr`` becomes ``slides/<name>.svs`` (level 0 read chunk
    row by chunk row, 256-px JPEG tiles, Aperio description with the slide's ``MPP``),
    ``manifest.csv`` points at the ``.svs`` files and the demo's record of what it
    wrote lists them instead, so ``--overwrite`` later removes them. Returns the paths.
    """
    import csv
    import io
    import json
    import pathlib
    import shutil

    from ..io.slides import open_slide
    from .demo import MARKER_NAME

    out = pathlib.Path(out_dir)
    manifest = out / "manifest.csv"
    rows = list(csv.reader(io.StringIO(manifest.read_text())))
    header, body = rows[0], rows[1:]
    column = header.index("path")
    record = json.loads((out / MARKER_NAME).read_text())
    written = list(record["written"])
    paths = []
    for row in body:
        zarr_path = out / row[column]
        slide = open_slide(str(zarr_path))
        height, width = slide.level_shape(0)
        mpp = slide.mpp(0)
        svs = zarr_path.with_name(zarr_path.name.removesuffix(".ome.zarr") + ".svs")

        def region(y0: int, y1: int, x0: int, x1: int, slide: Any = slide) -> np.ndarray:
            return slide.read_region(0, x0, y0, x1 - x0, y1 - y0)

        write_svs(svs, region, shape=(height, width), mpp=mpp[1] if mpp else 0.5,
                  quality=quality)
        shutil.rmtree(zarr_path)
        relative = svs.relative_to(out).as_posix()
        written = [relative if w == row[column] else w for w in written]
        row[column] = relative
        paths.append(str(svs))
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *body])
    manifest.write_text(text.getvalue())
    record["written"] = written
    (out / MARKER_NAME).write_text(json.dumps(record, indent=1) + "\n")
    return paths
