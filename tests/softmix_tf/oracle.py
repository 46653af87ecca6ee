"""An independent numpy implementation of the SoftMix mask definition (SPEC section 2).

Written from the definition, not from the library: each interior edge contributes a
cumulative step F_e(y) (0 before the window, ramp inside, 1 after), and the weight of
cell i is F_i - F_{i+1}, with F_0 = 1 and F_g = 0 (no ramp at the image border).
"""

from __future__ import annotations

import numpy as np


def oracle_axis_weights(size: int, num_cells: int, t: float, ramp: str) -> np.ndarray:
    centres = np.arange(size) + 0.5
    steps = [np.ones(size)]
    for i in range(1, num_cells):
        edge = i * size // num_cells
        if t == 0:
            step = (centres >= edge).astype(np.float64)
        else:
            with np.errstate(over="ignore"):  # subnormal softness: r overflows, then clips
                r = np.clip((centres - (edge - t / 2)) / t, 0.0, 1.0)
            step = 0.5 - 0.5 * np.cos(np.pi * r) if ramp == "cosine" else r
        steps.append(step)
    steps.append(np.zeros(size))
    return np.stack([steps[i] - steps[i + 1] for i in range(num_cells)], axis=1)


def oracle_transition(image_size, grid, softness) -> float:
    sides = []
    for n, g in zip(image_size, grid, strict=True):
        edges = [i * n // g for i in range(g + 1)]
        sides.append(min(edges[i + 1] - edges[i] for i in range(g)))
    return softness * min(sides)


def oracle_mask(cells: np.ndarray, image_size, softness: float, ramp: str) -> np.ndarray:
    """float64 [B, H, W] for cells [B, gh, gw]."""
    gh, gw = cells.shape[1:]
    t = oracle_transition(image_size, (gh, gw), softness)
    wy = oracle_axis_weights(image_size[0], gh, t, ramp)
    wx = oracle_axis_weights(image_size[1], gw, t, ramp)
    return np.einsum("hi,bij,wj->bhw", wy, cells.astype(np.float64), wx)


def oracle_mix(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None]
    return (1 - m) * a.astype(np.float64) + m * b.astype(np.float64)
