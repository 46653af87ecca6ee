"""Shared argument checks for the SoftMix op, layer and tf.data helpers.

Static properties (ranks, shapes, dtypes, hyperparameters) are checked in Python at
call or trace time and raise `ValueError` / `TypeError` in the
`Received: name=value` form. Nothing here uses `assert`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

__all__ = [
    "IMAGE_DTYPES",
    "RAMPS",
    "METHODS",
    "check_alpha",
    "check_grid_fits",
    "check_images",
    "check_label_maps",
    "check_label_values",
    "check_labels",
    "check_method",
    "check_mix_prob",
    "check_ramp",
    "check_seeds",
    "check_softness",
    "normalize_pair",
    "resolve_grid",
]

IMAGE_DTYPES = (tf.uint8, tf.uint16, tf.float16, tf.bfloat16, tf.float32)
RAMPS = ("cosine", "linear")
METHODS = ("softmix", "cutmix", "mixup")


def normalize_pair(value: Any, name: str) -> tuple[int, int]:
    """Returns `value` (an int or a pair of ints) as a pair of positive ints."""
    if isinstance(value, bool | str | bytes | float):
        raise TypeError(f"`{name}` must be an int or a pair of ints. Received: {name}={value!r}")
    if hasattr(value, "__index__"):  # int or numpy integer
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2:
        pair = value
    else:
        try:
            pair = [int(v) for v in value]  # numpy arrays, TensorShapes
        except TypeError:
            raise TypeError(
                f"`{name}` must be an int or a pair of ints. Received: {name}={value!r}"
            ) from None
        if len(pair) != 2:
            raise ValueError(
                f"`{name}` must be an int or a pair of ints. Received: {name}={value!r}"
            )
    out = []
    for v in pair:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise TypeError(f"`{name}` must hold ints. Received: {name}={value!r}")
        out.append(int(v))
    if min(out) < 1:
        raise ValueError(f"`{name}` must be positive. Received: {name}={value!r}")
    return out[0], out[1]


def resolve_grid(
    grid: Any, patch_size: Any, image_size: tuple[int, int], *, grid_is_default: bool = False
) -> tuple[int, int]:
    """Returns the cell grid `(gh, gw)` from `grid` or from `patch_size` in pixels.

    `patch_size=(ph, pw)` implies `grid = (H // ph, W // pw)`.
    """
    if patch_size is not None:
        if grid is not None and not grid_is_default:
            raise ValueError(
                "Pass either `grid` or `patch_size`, not both. "
                f"Received: grid={grid!r}, patch_size={patch_size!r}"
            )
        ph, pw = normalize_pair(patch_size, "patch_size")
        height, width = image_size
        if ph > height or pw > width:
            raise ValueError(
                "`patch_size` must fit the image. "
                f"Received: patch_size={patch_size!r}, image size={(height, width)}. "
                "Use a smaller patch_size."
            )
        resolved = (height // ph, width // pw)
    else:
        if grid is None:
            raise ValueError("One of `grid` or `patch_size` is required. Received: grid=None")
        resolved = normalize_pair(grid, "grid")
    check_grid_fits(resolved, image_size)
    return resolved


def check_grid_fits(grid: tuple[int, int], image_size: tuple[int, int]) -> None:
    if grid[0] > image_size[0] or grid[1] > image_size[1]:
        raise ValueError(
            "`grid` must fit the image: at most one cell per pixel. "
            f"Received: grid={tuple(grid)}, image size={tuple(image_size)}. Use a coarser grid."
        )


def _is_real(value: Any) -> bool:
    """A Python or numpy real scalar (np.float32, np.int64...), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        type(value).__name__ != "bool_")


def check_softness(softness: Any) -> float:
    if not _is_real(softness):
        raise TypeError(f"`softness` must be a float in [0, 1]. Received: softness={softness!r}")
    value = float(softness)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`softness` must be in [0, 1]. Received: softness={softness!r}")
    return value


def check_alpha(alpha: Any) -> float:
    if not _is_real(alpha):
        raise TypeError(f"`alpha` must be a positive float. Received: alpha={alpha!r}")
    value = float(alpha)
    if not (value > 0.0 and math.isfinite(value)):
        raise ValueError(
            "`alpha` must be a positive, finite float (Beta(alpha, alpha)). "
            f"Received: alpha={alpha!r}"
        )
    return value


def check_mix_prob(mix_prob: Any) -> float:
    if not _is_real(mix_prob):
        raise TypeError(f"`mix_prob` must be a float in [0, 1]. Received: mix_prob={mix_prob!r}")
    value = float(mix_prob)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`mix_prob` must be in [0, 1]. Received: mix_prob={mix_prob!r}")
    return value


def check_ramp(ramp: Any) -> str:
    if ramp not in RAMPS:
        raise ValueError(f"`ramp` must be one of {RAMPS}. Received: ramp={ramp!r}")
    return str(ramp)


def check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}. Received: method={method!r}")
    return str(method)


def check_images(images_a: tf.Tensor, images_b: tf.Tensor) -> None:
    """Checks rank 4, equal static shapes, equal supported dtypes."""
    for name, images in (("images_a", images_a), ("images_b", images_b)):
        if images.shape.rank != 4:
            raise ValueError(
                f"`{name}` must be rank 4 [batch, height, width, channels]. "
                f"Received: {name}.shape={images.shape}"
            )
        if images.dtype not in IMAGE_DTYPES:
            raise TypeError(
                f"`{name}` must have dtype uint8, uint16, float16, bfloat16 or float32. "
                f"Received: {name}.dtype={images.dtype.name}"
            )
        if images.shape[1] is None or images.shape[2] is None:
            raise ValueError(
                f"`{name}` must have a static height and width. "
                f"Received: {name}.shape={images.shape}"
            )
    if images_a.dtype != images_b.dtype:
        raise TypeError(
            "`images_a` and `images_b` must have the same dtype. "
            f"Received: images_a.dtype={images_a.dtype.name}, images_b.dtype={images_b.dtype.name}"
        )
    if not images_a.shape.is_compatible_with(images_b.shape):
        raise ValueError(
            "`images_a` and `images_b` must have the same shape. "
            f"Received: images_a.shape={images_a.shape}, images_b.shape={images_b.shape}"
        )


def check_labels(labels_a: tf.Tensor, labels_b: tf.Tensor, batch: int | None) -> None:
    for name, labels in (("labels_a", labels_a), ("labels_b", labels_b)):
        if not labels.dtype.is_floating:
            raise TypeError(
                f"`{name}` must be floating point (one-hot or soft labels) [batch, num_classes]. "
                f"Received: {name}.dtype={labels.dtype.name}. Use tf.one_hot(...) first."
            )
        if labels.shape.rank != 2:
            raise ValueError(
                f"`{name}` must be rank 2 [batch, num_classes]. "
                f"Received: {name}.shape={labels.shape}"
            )
        if batch is not None and labels.shape[0] is not None and labels.shape[0] != batch:
            raise ValueError(
                f"`{name}` must have one row per image. "
                f"Received: {name}.shape={labels.shape}, batch size={batch}"
            )
    if not labels_a.shape.is_compatible_with(labels_b.shape):
        raise ValueError(
            "`labels_a` and `labels_b` must have the same shape. "
            f"Received: labels_a.shape={labels_a.shape}, labels_b.shape={labels_b.shape}"
        )
    check_label_values(labels_a, "labels_a")
    check_label_values(labels_b, "labels_b")


def check_label_values(labels: tf.Tensor, name: str = "labels") -> None:
    """Checks that soft labels are finite and each row sums to 1 (within 1e-3).

    Only eager tensors are checked (their values are known here); under `tf.function`
    the values are not available at trace time and nothing is checked.
    """
    if not hasattr(labels, "numpy") or labels.shape.rank != 2:
        return
    import numpy as np

    values = labels.numpy().astype(np.float64)
    if values.size == 0:
        return
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(
            f"`{name}` must be finite (one-hot or soft labels). Received: row {row} = "
            f"{values[row].tolist()}. Remove NaN/inf labels before mixing."
        )
    eps = _EPS.get(labels.dtype.name, 2.0**-23)
    tolerance = max(1e-3, values.shape[1] * eps)
    sums = values.sum(axis=1)
    off = np.abs(sums - 1.0) > tolerance
    if off.any():
        row = int(np.argmax(off))
        raise ValueError(
            f"Each row of `{name}` must sum to 1 (one-hot or soft labels: class "
            f"probabilities). Received: row {row} sums to {sums[row]:.6g} "
            f"({values[row].tolist()[:8]}). Normalize the labels, e.g. labels / "
            "tf.reduce_sum(labels, axis=-1, keepdims=True)."
        )


# Machine epsilon of the label dtypes (sums of K rounded values may be off by ~K eps).
_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}


def check_label_maps(
    maps_a: tf.Tensor | None, maps_b: tf.Tensor | None, image_shape: tf.TensorShape
) -> None:
    if (maps_a is None) != (maps_b is None):
        raise ValueError(
            "Pass both `label_maps_a` and `label_maps_b`, or neither. "
            f"Received: label_maps_a is None={maps_a is None}, "
            f"label_maps_b is None={maps_b is None}"
        )
    if maps_a is None or maps_b is None:
        return
    for name, maps in (("label_maps_a", maps_a), ("label_maps_b", maps_b)):
        if maps.shape.rank not in (3, 4) or not maps.shape[:3].is_compatible_with(image_shape[:3]):
            raise ValueError(
                f"`{name}` must be [batch, height, width] or [batch, height, width, num_classes] "
                f"matching the images. Received: {name}.shape={maps.shape}, "
                f"images.shape={image_shape}"
            )
    if maps_a.dtype != maps_b.dtype or not maps_a.shape.is_compatible_with(maps_b.shape):
        raise ValueError(
            "`label_maps_a` and `label_maps_b` must have the same shape and dtype. "
            f"Received: label_maps_a={maps_a.shape} {maps_a.dtype.name}, "
            f"label_maps_b={maps_b.shape} {maps_b.dtype.name}"
        )


def check_seeds(seeds: tf.Tensor, batch: int | None) -> None:
    if seeds.dtype not in (tf.int32, tf.int64):
        raise TypeError(
            "`seeds` must be int32 or int64 [batch, 2] (one stateless seed per example). "
            f"Received: seeds.dtype={seeds.dtype.name}"
        )
    if seeds.shape.rank != 2 or (seeds.shape[1] is not None and seeds.shape[1] != 2):
        raise ValueError(f"`seeds` must have shape [batch, 2]. Received: seeds.shape={seeds.shape}")
    if batch is not None and seeds.shape[0] is not None and seeds.shape[0] != batch:
        raise ValueError(
            "`seeds` must have one row per image. "
            f"Received: seeds.shape={seeds.shape}, batch size={batch}"
        )
