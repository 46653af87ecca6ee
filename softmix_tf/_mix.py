"""SoftMix = sample cells + build the mask + apply it (SPEC section 2).

`apply_mix` is the pure application step (masks in, mixed images and labels out);
`softmix`, `grid_cutmix` and `mixup` sample their masks from per-example stateless
seeds and call it, so the three methods share one code path and compare fairly.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from . import _masks, _sampling, _validate

__all__ = ["SoftMixResult", "apply_mix", "grid_cutmix", "mixup", "softmix", "softmix_mask"]

_DEFAULT_GRID = (4, 4)


class SoftMixResult(NamedTuple):
    """What `softmix` (and `mixup`, `grid_cutmix`, `apply_mix`) return.

    Attributes:
        images: mixed images, same dtype and shape as the inputs [B, H, W, C].
        labels: float32 [B, K], `(1 - lam) * labels_a + lam * labels_b`.
        lam: float32 [B], the weight of image b: the mean of its mask (0 when the
            example was left unmixed by `mix_prob`).
        label_maps: mixed per-pixel label maps, or None when none were given.
        masks: float32 [B, H, W] masks applied (1 = from image b) when
            `return_masks=True`, else None.
    """

    images: tf.Tensor
    labels: tf.Tensor
    lam: tf.Tensor
    label_maps: tf.Tensor | None = None
    masks: tf.Tensor | None = None


_in_xla_context = _masks.in_xla_context


def _no_fma(keep: tf.Tensor, product: tf.Tensor) -> tf.Tensor:
    """`product`, kept out of XLA's FMA contraction.

    XLA fuses `x + y * z` into an FMA, whose single rounding differs from TensorFlow's
    separate kernels by an ulp. Under XLA a select on `keep` (true wherever `product` is
    not already 0) breaks the pattern; outside XLA the ops are never contracted and the
    select would only cost a pass over the data. Used on small tensors (labels).
    """
    if _in_xla_context():
        return tf.where(keep, product, 0.0)
    return product


def _no_fma_bounded(product: tf.Tensor, bound: Any) -> tf.Tensor:
    """`product` (never above `bound`), kept out of XLA's FMA contraction.

    `minimum(product, bound)` is `product` itself, NaN and infinities included, when
    `product <= bound` always holds; XLA cannot prove that, so the minimum stays between
    the multiply and the add and breaks the FMA pattern. Much cheaper than a select on a
    broadcast mask inside XLA's fused blend loop. Outside XLA it is `product`.
    """
    if _in_xla_context():
        return tf.minimum(product, bound)
    return product


def _blend(a: tf.Tensor, b: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
    """`(1 - m) * a + m * b` in float32, `m` broadcast; exact at m = 0 and m = 1."""
    dtype = a.dtype
    af = tf.cast(a, tf.float32)
    bf = tf.cast(b, tf.float32)
    if dtype.is_integer:
        # Integers are exact in float32 (< 2**24), so `a + m * (b - a)` is exactly a at
        # m = 0, exactly b at m = 1 and always between them: after rounding it stays in
        # [min(a, b), max(a, b)], within the dtype's range, so no clip is needed.
        # |m * (b - a)| <= dtype.max < 2**16 + 1 for m in [0, 1].
        bound = float(dtype.max) + 1.0
        return tf.cast(tf.round(af + _no_fma_bounded(m * (bf - af), bound)), dtype)
    # |(1 - m) * a| <= |a| and |m * b| <= |b| for m in [0, 1] (rounding is monotonic).
    mixed = _no_fma_bounded((1.0 - m) * af, tf.abs(af) if _in_xla_context() else None)
    mixed = mixed + _no_fma_bounded(m * bf, tf.abs(bf) if _in_xla_context() else None)
    # Rounding can step one ulp outside [a, b] (e.g. a == b); clamp back between sources.
    mixed = tf.clip_by_value(mixed, tf.minimum(af, bf), tf.maximum(af, bf))
    return tf.cast(mixed, dtype)


def _mix_label_maps(maps_a: tf.Tensor, maps_b: tf.Tensor, masks: tf.Tensor) -> tf.Tensor:
    m = masks if maps_a.shape.rank == 3 else masks[..., tf.newaxis]
    if maps_a.dtype.is_floating:
        return _blend(maps_a, maps_b, m)
    # Class-index maps cannot be blended: each pixel takes the class of its majority source.
    return tf.where(m > 0.5, maps_b, maps_a)


def _mix_labels(labels_a: tf.Tensor, labels_b: tf.Tensor, lam: tf.Tensor) -> tf.Tensor:
    lam = lam[:, tf.newaxis]
    return _no_fma(lam < 1.0, (1.0 - lam) * tf.cast(labels_a, tf.float32)) + _no_fma(
        lam > 0.0, lam * tf.cast(labels_b, tf.float32)
    )


def _mix_pixels(images_a, images_b, masks, maps_a, maps_b, return_masks):
    """The per-pixel part: (images, label_maps, masks or None)."""
    images = _blend(images_a, images_b, masks[..., tf.newaxis])
    label_maps = None if maps_a is None else _mix_label_maps(maps_a, maps_b, masks)
    if not return_masks:
        return images, label_maps, None
    if masks.shape[1] != images_a.shape[1]:  # mixup's [B, 1, 1]
        masks = tf.broadcast_to(masks, tf.shape(images_a)[:3])
    return images, label_maps, masks


def _result(pixels, labels_a, labels_b, lam) -> SoftMixResult:
    """`SoftMixResult` from the per-pixel part `(images, label_maps, masks)` and `lam`."""
    images, label_maps, masks = pixels
    return SoftMixResult(
        images=images,
        labels=_mix_labels(labels_a, labels_b, lam),
        lam=lam,
        label_maps=label_maps,
        masks=masks,
    )


def _apply(
    images_a, images_b, labels_a, labels_b, masks, lam, maps_a, maps_b, return_masks
) -> SoftMixResult:
    pixels = _mix_pixels(images_a, images_b, masks, maps_a, maps_b, return_masks)
    return _result(pixels, labels_a, labels_b, lam)


def _convert(images_a, images_b, labels_a, labels_b, maps_a=None, maps_b=None):
    images_a = tf.convert_to_tensor(images_a)
    images_b = tf.convert_to_tensor(images_b)
    _validate.check_images(images_a, images_b)
    labels_a = tf.convert_to_tensor(labels_a)
    labels_b = tf.convert_to_tensor(labels_b)
    _validate.check_labels(labels_a, labels_b, images_a.shape[0])
    maps_a = None if maps_a is None else tf.convert_to_tensor(maps_a)
    maps_b = None if maps_b is None else tf.convert_to_tensor(maps_b)
    _validate.check_label_maps(maps_a, maps_b, images_a.shape)
    return images_a, images_b, labels_a, labels_b, maps_a, maps_b


def apply_mix(
    images_a: Any,
    images_b: Any,
    labels_a: Any,
    labels_b: Any,
    masks: Any,
    *,
    label_maps_a: Any = None,
    label_maps_b: Any = None,
) -> SoftMixResult:
    """Mixes two batches with given masks: `x = (1 - M) * x_a + M * x_b` (SPEC steps 5-6).

    Args:
        images_a: uint8, uint16, float16, bfloat16 or float32 [B, H, W, C].
        images_b: same shape and dtype as `images_a`.
        labels_a: float [B, K], one-hot or soft.
        labels_b: float [B, K].
        masks: float32 [B, H, W] in [0, 1], 1 = take the pixel from image b.
        label_maps_a: optional per-pixel labels [B, H, W] or [B, H, W, K]: float maps are
            blended with the mask, integer (class index) maps take the class of image b
            where the mask is above 0.5.
        label_maps_b: the same for image b.

    Returns:
        `SoftMixResult`; `lam` is the mean of each mask, `masks` is None.

    Raises:
        ValueError, TypeError: for bad shapes or dtypes.

    Example:
        >>> import numpy as np
        >>> a, b = np.zeros((1, 2, 2, 1), np.uint8), np.full((1, 2, 2, 1), 200, np.uint8)
        >>> y = np.eye(2, dtype=np.float32)
        >>> out = apply_mix(a, b, y[:1], y[1:], np.array([[[0.0, 1.0], [0.5, 1.0]]]))
        >>> out.images[0, ..., 0].numpy().tolist(), out.lam.numpy().tolist()
        ([[0, 200], [100, 200]], [0.625])
    """
    images_a, images_b, labels_a, labels_b, maps_a, maps_b = _convert(
        images_a, images_b, labels_a, labels_b, label_maps_a, label_maps_b
    )
    masks = tf.cast(tf.convert_to_tensor(masks), tf.float32)
    if masks.shape.rank != 3 or not masks.shape.is_compatible_with(images_a.shape[:3]):
        raise ValueError(
            "`masks` must be [batch, height, width] matching the images. "
            f"Received: masks.shape={masks.shape}, images.shape={images_a.shape}"
        )
    lam = tf.reduce_mean(masks, axis=[1, 2])
    return _apply(images_a, images_b, labels_a, labels_b, masks, lam, maps_a, maps_b, False)


def _lam_weights(image_size: tuple[int, int], grid: tuple[int, int], softness: float, ramp: str):
    """float64 [gh, gw]: the mean of the mask contributed by each cell.

    Quantised to multiples of 2**-40 so that their sum is exact in float64 in any order:
    `lam` is then bit-identical whatever the batch or the compiler.
    """
    t = _masks.transition_width(image_size, grid, softness)
    wy = _masks.axis_weights(image_size[0], grid[0], t, ramp).astype(np.float64).mean(axis=0)
    wx = _masks.axis_weights(image_size[1], grid[1], t, ramp).astype(np.float64).mean(axis=0)
    return np.round(np.outer(wy, wx) * 2.0**40) / 2.0**40


def _cells_and_lam(words, image_size, grid, alpha, softness, ramp, mix_prob):
    cells, _ = _sampling.sample_cells_from_words(words, grid, alpha)
    if mix_prob < 1.0:
        mixed = _sampling.mix_coin(words, mix_prob)
        cells = cells * tf.cast(mixed, tf.float32)[:, tf.newaxis, tf.newaxis]
    weights = tf.constant(_lam_weights(image_size, grid, softness, ramp))
    lam = tf.cast(tf.reduce_sum(tf.cast(cells, tf.float64) * weights, axis=[1, 2]), tf.float32)
    return cells, lam


# Inside a graph that XLA does not compile (plain `tf.function`, `tf.data.Dataset.map`),
# `softmix`, `grid_cutmix` and `mixup` build the mask and blend (the per-pixel work)
# in a nested `tf.function(jit_compile=True)`, so that XLA fuses the mask into the blend
# and never stores it. Both are exact under XLA, so the result is bit-identical to eager;
# sampling and labels (a few values per example) stay outside, on TensorFlow's kernels.
# Set to False, or pass `fuse_with_xla=False`, on platforms without XLA. No effect
# eagerly or under XLA.
FUSE_WITH_XLA = True


def _mix(
    images_a,
    images_b,
    labels_a,
    labels_b,
    seeds,
    *,
    method,
    grid,
    patch_size,
    alpha,
    softness,
    ramp,
    mix_prob,
    label_maps_a,
    label_maps_b,
    return_masks,
    grid_is_default,
    fuse_with_xla=None,
) -> SoftMixResult:
    images_a, images_b, labels_a, labels_b, maps_a, maps_b = _convert(
        images_a, images_b, labels_a, labels_b, label_maps_a, label_maps_b
    )
    seeds = tf.convert_to_tensor(seeds)
    _validate.check_seeds(seeds, images_a.shape[0])
    method = _validate.check_method(method)
    alpha = _validate.check_alpha(alpha)
    mix_prob = _validate.check_mix_prob(mix_prob)
    softness = _validate.check_softness(softness)
    ramp = _validate.check_ramp(ramp)
    image_size = (int(images_a.shape[1]), int(images_a.shape[2]))
    words = _sampling.seed_words(seeds)
    if method == "mixup":
        lam = _sampling.sample_beta(words, alpha)
        if mix_prob < 1.0:
            lam = tf.where(_sampling.mix_coin(words, mix_prob), lam, 0.0)
        source = lam[:, tf.newaxis, tf.newaxis]  # the mask itself, [B, 1, 1]
    else:
        grid = _validate.resolve_grid(grid, patch_size, image_size, grid_is_default=grid_is_default)
        if method == "cutmix":
            softness = 0.0
        source, lam = _cells_and_lam(words, image_size, grid, alpha, softness, ramp, mix_prob)
    config = (method != "mixup", float(softness), ramp, bool(return_masks))
    if fuse_with_xla is None:
        fuse_with_xla = FUSE_WITH_XLA
    if fuse_with_xla and not tf.executing_eagerly() and not _in_xla_context():
        pixels = _fused_pixels(config)
    else:
        pixels = functools.partial(_pixels_from_source, config=config)
    return _result(pixels(images_a, images_b, source, maps_a, maps_b), labels_a, labels_b, lam)


def _pixels_from_source(images_a, images_b, source, maps_a, maps_b, *, config):
    """Mask (from cells [B, gh, gw], or the mask [B, 1, 1] itself) and the blend."""
    from_cells, softness, ramp, return_masks = config
    if from_cells:
        image_size = (int(images_a.shape[1]), int(images_a.shape[2]))
        masks = _masks.masks_from_cells(source, image_size, softness, ramp)
    else:
        masks = source
    return _mix_pixels(images_a, images_b, masks, maps_a, maps_b, return_masks)


@functools.lru_cache(maxsize=64)
def _fused_pixels(config: tuple) -> Any:
    """`_pixels_from_source` compiled with XLA, one function per static config (traces
    and XLA's compilation cache are then shared by every graph that calls it)."""
    return tf.function(
        functools.partial(_pixels_from_source, config=config), jit_compile=True, autograph=False
    )


def _is_default_grid(grid: Any) -> bool:
    return isinstance(grid, tuple) and grid == _DEFAULT_GRID


def softmix(
    images_a: Any,
    images_b: Any,
    labels_a: Any,
    labels_b: Any,
    seeds: Any,
    *,
    grid: int | tuple[int, int] = _DEFAULT_GRID,
    alpha: float = 1.0,
    softness: float = 0.5,
    ramp: str = "cosine",
    mix_prob: float = 1.0,
    patch_size: int | tuple[int, int] | None = None,
    method: str = "softmix",
    label_maps_a: Any = None,
    label_maps_b: Any = None,
    return_masks: bool = False,
    fuse_with_xla: bool | None = None,
) -> SoftMixResult:
    """Mixes image b into image a through soft-edged grid cells (SoftMix, SPEC section 2).

    Per example: `p ~ Beta(alpha, alpha)`, `k = round(p * gh * gw)` cells chosen
    uniformly without replacement, soft mask `M = Wy @ S @ Wx^T`,
    `x = (1 - M) * x_a + M * x_b`, `lam = mean(M)`, `y = (1 - lam) * y_a + lam * y_b`.
    Randomness comes only from each example's own seed, through an integer hash, so the
    result is the same whatever the batch, eagerly, in `tf.function` and with
    `jit_compile=True`. Vectorised; the whole op, sampling included, compiles with XLA.

    Args:
        images_a: uint8, uint16, float16, bfloat16 or float32 [B, H, W, C], static H, W.
        images_b: same shape and dtype as `images_a`.
        labels_a: float [B, K], one-hot or soft.
        labels_b: float [B, K].
        seeds: int32 or int64 [B, 2]: one stateless seed per example (all 64 bits used).
        grid: cells `(gh, gw)` or an int for a square grid; at most one cell per pixel.
        alpha: Beta(alpha, alpha) parameter, > 0.
        softness: transition width as a fraction of the smallest cell side, in [0, 1];
            0 gives a hard, cell-aligned grid CutMix.
        ramp: "cosine" (default) or "linear".
        mix_prob: probability that an example is mixed at all; unmixed examples are
            returned as image a with `lam = 0`.
        patch_size: cell size in pixels `(ph, pw)` or an int, instead of `grid`:
            `grid = (H // ph, W // pw)`.
        method: "softmix" (default), "cutmix" (grid CutMix: `softness` forced to 0) or
            "mixup" (`M = p` everywhere), sharing seeds, labels and `mix_prob` handling.
        label_maps_a: optional per-pixel labels [B, H, W] or [B, H, W, K] mixed with the
            same mask: float maps are blended, integer (class index) maps take the
            class of image b where `M > 0.5`.
        label_maps_b: the same for image b.
        return_masks: also return the float32 [B, H, W] masks applied.
        fuse_with_xla: inside a graph that XLA does not compile (plain `tf.function`,
            `tf.data.Dataset.map`), run the op through a nested
            `tf.function(jit_compile=True)` so that XLA fuses the mask into the blend
            (same bits, about 3x faster for float32 on CPU). None (default) follows the
            module flag `softmix_tf._mix.FUSE_WITH_XLA` (True); pass False (or set the
            flag) on platforms without XLA. No effect eagerly or under XLA.

    Returns:
        `SoftMixResult(images, labels, lam, label_maps, masks)`: images in the input
        dtype (integers rounded, half-to-even, and always within the range of the
        sources), labels float32 [B, K], lam float32 [B]. With the same seeds the mask
        applied equals `softmix_mask(...)`'s for every mixed example.

    Raises:
        ValueError: bad ranks or shapes, grid larger than the image, softness or
            mix_prob outside [0, 1], alpha <= 0, unknown ramp or method.
        TypeError: unsupported image dtype, integer labels, non-integer seeds.

    Example:
        >>> import numpy as np
        >>> a = np.zeros((2, 8, 8, 3), np.uint8)
        >>> b = np.full((2, 8, 8, 3), 255, np.uint8)
        >>> y = np.eye(2, dtype=np.float32)
        >>> out = softmix(a, b, y, y[::-1], np.array([[1, 2], [3, 4]]), grid=4)
        >>> out.images.dtype.name, out.labels.shape, out.lam.shape
        ('uint8', TensorShape([2, 2]), TensorShape([2]))
    """
    return _mix(
        images_a,
        images_b,
        labels_a,
        labels_b,
        seeds,
        method=method,
        grid=grid,
        patch_size=patch_size,
        alpha=alpha,
        softness=softness,
        ramp=ramp,
        mix_prob=mix_prob,
        label_maps_a=label_maps_a,
        label_maps_b=label_maps_b,
        return_masks=return_masks,
        grid_is_default=_is_default_grid(grid),
        fuse_with_xla=fuse_with_xla,
    )


def grid_cutmix(
    images_a: Any, images_b: Any, labels_a: Any, labels_b: Any, seeds: Any, **kwargs: Any
) -> SoftMixResult:
    """Grid CutMix: `softmix(..., method="cutmix")`, a hard cell-aligned mask.

    Same seeds give the same cells as `softmix`; only the edges differ. Takes the
    keywords of `softmix` (`softness` is ignored).
    """
    kwargs.pop("softness", None)
    return softmix(images_a, images_b, labels_a, labels_b, seeds, method="cutmix", **kwargs)


def mixup(
    images_a: Any,
    images_b: Any,
    labels_a: Any,
    labels_b: Any,
    seeds: Any,
    *,
    alpha: float = 1.0,
    mix_prob: float = 1.0,
    label_maps_a: Any = None,
    label_maps_b: Any = None,
    return_masks: bool = False,
    fuse_with_xla: bool | None = None,
) -> SoftMixResult:
    """MixUp through the SoftMix API: `M = p ~ Beta(alpha, alpha)` at every pixel.

    Args and returns as `softmix` (`fuse_with_xla` included); `lam = p`.
    """
    return _mix(
        images_a,
        images_b,
        labels_a,
        labels_b,
        seeds,
        method="mixup",
        grid=None,
        patch_size=None,
        alpha=alpha,
        softness=0.0,
        ramp="cosine",
        mix_prob=mix_prob,
        label_maps_a=label_maps_a,
        label_maps_b=label_maps_b,
        return_masks=return_masks,
        grid_is_default=False,
        fuse_with_xla=fuse_with_xla,
    )


def softmix_mask(
    seeds: Any,
    image_size: Any,
    *,
    grid: int | tuple[int, int] | None,
    alpha: float = 1.0,
    softness: float = 0.5,
    ramp: str = "cosine",
    patch_size: int | tuple[int, int] | None = None,
) -> tf.Tensor:
    """The SoftMix masks `M` that `softmix` applies for these seeds.

    Args:
        seeds: int32 or int64 [B, 2], one stateless seed per example.
        image_size: `(height, width)`.
        grid: cells `(gh, gw)` or an int; None when `patch_size` is given.
        alpha: Beta(alpha, alpha) parameter, > 0.
        softness: in [0, 1].
        ramp: "cosine" or "linear".
        patch_size: cell size in pixels, instead of `grid`.

    Returns:
        float32 [B, height, width] in [0, 1]; 1 = taken from image b.

    Example:
        >>> import numpy as np
        >>> m = softmix_mask(np.array([[7, 7]]), (8, 8), grid=2, softness=0.0)
        >>> sorted(set(m.numpy().ravel().tolist())) in ([0.0], [1.0], [0.0, 1.0])
        True
    """
    seeds = tf.convert_to_tensor(seeds)
    _validate.check_seeds(seeds, None)
    image_size = _validate.normalize_pair(image_size, "image_size")
    grid = _validate.resolve_grid(grid, patch_size, image_size)
    alpha = _validate.check_alpha(alpha)
    softness = _validate.check_softness(softness)
    ramp = _validate.check_ramp(ramp)
    cells, _ = _sampling.sample_cells_from_words(_sampling.seed_words(seeds), grid, alpha)
    return _masks.masks_from_cells(cells, image_size, softness, ramp)
