"""From a cell matrix `S` to the soft SoftMix mask `M = Wy @ S @ Wx^T` (SPEC section 2).

The axis weights depend only on static shapes and parameters, so they are built in
numpy at trace time. Because the transition windows of neighbouring edges never
overlap (`t <= m`), each pixel row has at most two non-zero weights: the mask is built
with two gathers per axis and a lerp, which is exact whatever the batch composition.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from . import _validate

__all__ = ["axis_weights", "cell_edges", "cells_to_mask", "transition_width"]


def cell_edges(size: int, num_cells: int) -> np.ndarray:
    """Cell edges along one axis: `i * size // num_cells` for `i = 0..num_cells`.

    Example:
        >>> cell_edges(10, 3).tolist()
        [0, 3, 6, 10]
    """
    return np.arange(num_cells + 1, dtype=np.int64) * size // num_cells


def transition_width(image_size: tuple[int, int], grid: tuple[int, int], softness: float) -> float:
    """`t = softness * m`, `m` the smallest cell side over both axes, in pixels.

    Example:
        >>> transition_width((10, 8), (3, 2), 0.5)
        1.5
    """
    sides = [np.diff(cell_edges(n, g)).min() for n, g in zip(image_size, grid, strict=True)]
    return float(softness) * float(min(sides))


def _ramp(r: np.ndarray, ramp: str) -> np.ndarray:
    if ramp == "cosine":
        return 0.5 - 0.5 * np.cos(np.pi * r)
    return r


def _axis_lerp(
    size: int, num_cells: int, transition: float, ramp: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel: two cell indices and the weight of the second (int32, int32, float32).

    The pixel's weights are `1 - w` on `idx0` and `w` on `idx1` (`idx0 == idx1`, `w = 0`
    away from interior edges).
    """
    edges = cell_edges(size, num_cells)
    centre = np.arange(size, dtype=np.float64) + 0.5
    cell = np.searchsorted(edges, centre, side="right") - 1
    idx0 = cell.copy()
    idx1 = cell.copy()
    weight = np.zeros(size, dtype=np.float64)
    if transition > 0.0 and num_cells > 1:
        half = transition / 2.0
        lower = edges[cell]
        upper = edges[cell + 1]
        near_lower = (cell > 0) & (centre - lower < half)
        near_upper = (cell < num_cells - 1) & (upper - centre < half)
        # Across the edge below the pixel: cell-1 -> cell.
        r = (centre - lower + half) / transition
        idx0 = np.where(near_lower, cell - 1, idx0)
        weight = np.where(near_lower, _ramp(np.clip(r, 0.0, 1.0), ramp), weight)
        # Across the edge above the pixel: cell -> cell+1.
        r = (centre - upper + half) / transition
        idx1 = np.where(near_upper, cell + 1, idx1)
        weight = np.where(near_upper, _ramp(np.clip(r, 0.0, 1.0), ramp), weight)
    return idx0.astype(np.int32), idx1.astype(np.int32), weight.astype(np.float32)


def axis_weights(size: int, num_cells: int, transition: float, ramp: str = "cosine") -> np.ndarray:
    """The partition of unity along one axis: float32 [size, num_cells] (`Wy` or `Wx`).

    Args:
        size: pixels along the axis.
        num_cells: cells along the axis.
        transition: transition width `t` in pixels (see `transition_width`).
        ramp: "cosine" or "linear".

    Returns:
        float32 [size, num_cells]; each row is >= 0 and sums to 1.

    Example:
        >>> axis_weights(4, 2, 2.0, "linear").tolist()
        [[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]]
    """
    ramp = _validate.check_ramp(ramp)
    idx0, idx1, weight = _axis_lerp(size, num_cells, transition, ramp)
    out = np.zeros((size, num_cells), dtype=np.float32)
    rows = np.arange(size)
    out[rows, idx0] += 1.0 - weight
    out[rows, idx1] += weight
    return out


def _lerp_gather(values: tf.Tensor, axis: int, spec: tuple[np.ndarray, np.ndarray, np.ndarray]):
    idx0, idx1, weight = spec
    first = tf.gather(values, idx0, axis=axis)
    if not weight.any():  # no transition along this axis (softness 0 or one cell)
        return first
    second = tf.gather(values, idx1, axis=axis)
    shape = [1] * values.shape.rank
    shape[axis] = weight.shape[0]
    # The select keeps XLA from fusing the product and the sum into an FMA, so the
    # mask is bit-identical eagerly and under jit_compile=True.
    step = tf.constant(weight.reshape(shape)) * (second - first)
    return first + tf.where(tf.constant(weight.reshape(shape) > 0), step, 0.0)


def masks_from_cells(
    cells: tf.Tensor, image_size: tuple[int, int], softness: float, ramp: str
) -> tf.Tensor:
    """`cells_to_mask` without argument checks: float32 [B, gh, gw] -> [B, H, W]."""
    grid = (int(cells.shape[1]), int(cells.shape[2]))
    transition = transition_width(image_size, grid, softness)
    rows = _lerp_gather(cells, 1, _axis_lerp(image_size[0], grid[0], transition, ramp))
    return _lerp_gather(rows, 2, _axis_lerp(image_size[1], grid[1], transition, ramp))


def cells_to_mask(
    cells: Any, image_size: Any, *, softness: float = 0.5, ramp: str = "cosine"
) -> tf.Tensor:
    """Turns cell matrices `S` into soft masks `M = Wy @ S @ Wx^T` (SPEC section 2).

    Args:
        cells: [batch, gh, gw], non-zero = take the cell from image b (bool or numbers in
            [0, 1]; fractional values are blended linearly).
        image_size: `(height, width)` of the images.
        softness: transition width as a fraction of the smallest cell side, in [0, 1].
        ramp: "cosine" (default) or "linear".

    Returns:
        float32 [batch, height, width] in [0, 1]; 1 = take the pixel from image b.

    Raises:
        ValueError: for a bad rank, a grid larger than the image, softness outside
            [0, 1] or an unknown ramp.

    Example:
        >>> import numpy as np
        >>> m = cells_to_mask(np.array([[[0, 1]]]), (2, 4), softness=0.0)
        >>> m.numpy().tolist()
        [[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]]
    """
    cells = tf.convert_to_tensor(cells)
    if cells.shape.rank != 3 or cells.shape[1] is None or cells.shape[2] is None:
        raise ValueError(
            f"`cells` must be rank 3 [batch, gh, gw] with a static grid. Received: cells.shape={cells.shape}"
        )
    if cells.dtype == tf.bool or cells.dtype.is_integer:
        cells = tf.cast(tf.cast(cells, tf.bool), tf.float32)
    else:
        cells = tf.cast(cells, tf.float32)
    image_size = _validate.normalize_pair(image_size, "image_size")
    _validate.check_grid_fits((int(cells.shape[1]), int(cells.shape[2])), image_size)
    softness = _validate.check_softness(softness)
    ramp = _validate.check_ramp(ramp)
    return masks_from_cells(cells, image_size, softness, ramp)
