"""From a cell matrix `S` to the soft SoftMix mask `M = Wy @ S @ Wx^T` (SPEC section 2).

The axis weights depend only on static shapes and parameters, so they are built in
numpy at trace time. Because the transition windows of neighbouring edges never
overlap (`t <= m`), each pixel row has at most two non-zero weights; with weights
rounded to multiples of 2**-12 the two small matmuls are exact in float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from . import _validate

__all__ = ["WEIGHT_QUANTUM", "axis_weights", "cell_edges", "cells_to_mask", "transition_width"]


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
    # A pixel centre lies inside a window only when t > 1 (centres are 0.5 from edges).
    if transition > 1.0 and num_cells > 1:
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


WEIGHT_QUANTUM = 2.0**-12

# Grids up to this many columns build the mask under XLA as an unrolled multiply-add.
_MAX_UNROLLED_COLUMNS = 16


def in_xla_context() -> bool:
    """Whether ops built now are compiled by XLA (`jit_compile=True` or an XLA context)."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util  # noqa: PLC0415
    except ImportError:  # pragma: no cover - internal API moved: be safe, assume XLA
        return True
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def axis_weights(size: int, num_cells: int, transition: float, ramp: str = "cosine") -> np.ndarray:
    """The partition of unity along one axis: float32 [size, num_cells] (`Wy` or `Wx`).

    Ramp values are rounded to multiples of `WEIGHT_QUANTUM` (2**-12, an error of at
    most 1.2e-4) so that the mask `Wy @ S @ Wx^T` is computed exactly in float32.

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
    weight = np.round(weight.astype(np.float64) / WEIGHT_QUANTUM) * WEIGHT_QUANTUM
    out = np.zeros((size, num_cells), dtype=np.float32)
    rows = np.arange(size)
    out[rows, idx0] += 1.0 - weight
    out[rows, idx1] += weight
    return out


def masks_from_cells(
    cells: tf.Tensor, image_size: tuple[int, int], softness: float, ramp: str
) -> tf.Tensor:
    """`cells_to_mask` without argument checks: float32 [B, gh, gw] -> [B, H, W]."""
    grid = (int(cells.shape[1]), int(cells.shape[2]))
    transition = transition_width(image_size, grid, softness)
    wy = tf.constant(axis_weights(image_size[0], grid[0], transition, ramp))
    wx = tf.constant(axis_weights(image_size[1], grid[1], transition, ramp))
    # Weights are multiples of 2**-12 and each pixel has at most two non-zero weights per
    # axis, so every product and sum below is exact in float32: the mask is bit-identical
    # in any summation order, with or without FMA, eagerly, under XLA, in any batch.
    rows = tf.einsum("hi,bij->bhj", wy, cells)
    if grid[1] <= _MAX_UNROLLED_COLUMNS and in_xla_context():
        # XLA's CPU batched dot is slow and would materialise [B, H, W]; a multiply-add
        # over the few columns is elementwise, so XLA fuses it into the blend that reads
        # it (the mask is never stored). Exact as above, so bit-identical to the einsum.
        wx_np = axis_weights(image_size[1], grid[1], transition, ramp)
        mask = None
        for j in range(grid[1]):
            term = rows[:, :, j : j + 1] * tf.constant(wx_np[:, j])
            mask = term if mask is None else mask + term
        return mask
    return tf.einsum("bhj,wj->bhw", rows, wx)


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
            "`cells` must be rank 3 [batch, gh, gw] with a static grid. "
            f"Received: cells.shape={cells.shape}"
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
