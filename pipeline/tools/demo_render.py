"""Large demo slides, rendered and written chunk by chunk (never whole in memory).

A `TiledSlide` is a slide as a function of position: a real tissue image mirror-tiled
(numpy's ``symmetric`` padding, i.e. tiled with flips, so the texture runs on without
seams) under an elliptical tissue outline, on noisy glass. `write_streamed` turns it
into a dask array, one task per chunk, builds the pyramid by 2 x 2 means chunk by chunk
and writes it with ome-zarr-py's `write_multiscale`; memory stays at a few chunks per
thread. Pixels depend on their position only, never on the chunking.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

__all__ = [
    "GLASS_RGB",
    "TiledSlide",
    "num_levels",
    "ome_format",
    "scan_glass",
    "tiled_slide",
    "write_streamed",
]

GLASS_RGB = (236, 234, 240)
LOWEST_LEVEL_MAX = 1024  # add pyramid levels until the lowest is at most this wide


def num_levels(slide_size: int) -> int:
    """Pyramid levels: at least 4, and enough that the lowest is <= 1024 px.

    >>> num_levels(512), num_levels(8192), num_levels(16384), num_levels(100_000)
    (4, 4, 5, 8)
    """
    levels = 4
    while slide_size >> (levels - 1) > LOWEST_LEVEL_MAX:
        levels += 1
    return levels


def ome_format(format_version: str) -> tuple[Any, int]:
    from ome_zarr.format import FormatV04, FormatV05

    if format_version == "0.5":
        return FormatV05(), 3
    return FormatV04(), 2


def reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Mirror tiling (numpy's ``symmetric`` padding) of positions onto ``[0, size)``.

    >>> reflect(np.arange(-2, 7), 3).tolist()
    [1, 0, 0, 1, 2, 2, 1, 0, 0]
    """
    period = np.mod(index, 2 * size)
    return np.where(period < size, period, 2 * size - 1 - period)


@dataclasses.dataclass(frozen=True, eq=False)
class TiledSlide:
    """A large demo slide as a function of position: mirror-tiled tissue on glass.

    Attributes:
        size: level-0 side in pixels.
        source: uint8 ``[3, h, w]`` real tissue, mirror-tiled to cover the slide.
        phase: ``(y, x)`` position in the infinite mirror tiling of slide pixel (0, 0).
        center: ``(y, x)`` centre of the elliptical tissue outline, in pixels.
        radii: ``(y, x)`` radii of the outline, in pixels.
        noise: int16 ``[n, n]`` glass noise, tiled.
        glass_rgb: glass colour around the outline.
    """

    size: int
    source: np.ndarray
    phase: tuple[int, int]
    center: tuple[float, float]
    radii: tuple[float, float]
    noise: np.ndarray
    glass_rgb: tuple[int, int, int] = GLASS_RGB

    def render(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """uint8 ``[3, y1 - y0, x1 - x0]``: pixels ``[y0:y1, x0:x1]`` of level 0."""
        ys, xs = np.arange(y0, y1), np.arange(x0, x1)
        n = self.noise.shape[0]
        glass = np.take(self.noise[ys % n], xs % n, axis=1)
        rgb = np.array(self.glass_rgb, np.int16)[:, None, None]
        out = np.clip(glass[None] + rgb, 0, 255).astype(np.uint8)
        dy = (ys + 0.5 - self.center[0]) / self.radii[0]
        dx = (xs + 0.5 - self.center[1]) / self.radii[1]
        inside = dy[:, None] ** 2 + dx[None, :] ** 2 <= 1.0
        if inside.any():
            _, height, width = self.source.shape
            rows = np.take(self.source, reflect(ys + self.phase[0], height), axis=1)
            tissue = np.take(rows, reflect(xs + self.phase[1], width), axis=2)
            out = np.where(inside[None], tissue, out)
        return out


def halve(block: np.ndarray) -> np.ndarray:
    """2 x 2 mean of uint8 ``[c, 2h, 2w]`` -> ``[c, h, w]``, rounded half up."""
    total = block[:, 0::2, 0::2].astype(np.uint16)  # strided adds: 8x a reshape-sum
    total += block[:, 1::2, 0::2]
    total += block[:, 0::2, 1::2]
    total += block[:, 1::2, 1::2]
    total += 2
    return (total >> 2).astype(np.uint8)


def write_streamed(
    path: pathlib.Path, slide: TiledSlide, mpp: float, format_version: str, chunk: int
) -> None:
    """Write `slide` level by level from a dask graph: one chunk in memory per thread."""
    import dask.array as da
    import zarr
    from ome_zarr.writer import write_multiscale

    def sides(n: int) -> tuple[int, ...]:
        return (chunk,) * (n // chunk) + ((n % chunk,) if n % chunk else ())

    def render(block_info: dict[Any, Any] | None = None) -> np.ndarray:
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]  # type: ignore[index]
        return slide.render(y0, y1, x0, x1)

    size = slide.size
    levels = [
        da.map_blocks(
            render,
            dtype=np.uint8,
            chunks=((3,), sides(size), sides(size)),
            name=f"softmix-demo-{path.name}",
        )
    ]
    for _ in range(1, num_levels(size)):
        previous = levels[-1]
        height, width = previous.shape[1] // 2 * 2, previous.shape[2] // 2 * 2
        even = previous[:, :height, :width].rechunk((3, chunk, chunk))
        halved = tuple(tuple(c // 2 for c in axis) for axis in even.chunks)
        levels.append(da.map_blocks(halve, even, dtype=np.uint8, chunks=((3,), *halved[1:])))
    fmt, zarr_format = ome_format(format_version)
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    write_multiscale(
        levels,
        group,
        fmt=fmt,
        axes="cyx",
        scale={"c": 1.0, "y": mpp, "x": mpp},
        axes_units={"y": "micrometer", "x": "micrometer"},
        storage_options=[
            {"chunks": (3, min(chunk, level.shape[1]), min(chunk, level.shape[2]))}
            for level in levels
        ],
    )


def scan_glass(image: np.ndarray) -> tuple[int, int, int]:
    """Median colour of a scan's own glass, so a tiled scan shows no outline on ours."""
    from ..steps.plan import tissue_mask

    thumbnail = image[::4, ::4]
    glass = thumbnail[~tissue_mask(thumbnail)]
    if len(glass) < 0.05 * thumbnail.shape[0] * thumbnail.shape[1]:
        return GLASS_RGB
    red, green, blue = (int(v) for v in np.median(glass, axis=0))
    return red, green, blue


def tiled_slide(
    source_yxc: np.ndarray,
    size: int,
    index: int,
    fy: float,
    fx: float,
    glass_rgb: tuple[int, int, int] = GLASS_RGB,
) -> TiledSlide:
    """Mirror-tile `source_yxc` under an ellipse of ~0.45 `size` radius, placed per slide."""
    height, width = source_yxc.shape[:2]
    jitter = 0.04 * size
    noise = np.random.default_rng(index).normal(0.0, 2.0, size=(1024, 1024))
    return TiledSlide(
        size=size,
        source=np.ascontiguousarray(np.moveaxis(source_yxc, -1, 0)),
        phase=(int(round(fy * height)), int(round(fx * width))),
        center=(size / 2 + (fy - 0.5) * jitter, size / 2 + (fx - 0.5) * jitter),
        radii=(size * (0.44 if index % 4 < 2 else 0.46), size * (0.46 if index % 4 < 2 else 0.43)),
        noise=np.round(noise).astype(np.int16),
        glass_rgb=glass_rgb,
    )
