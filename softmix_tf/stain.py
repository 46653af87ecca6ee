"""Stain normalisation in TensorFlow: Macenko and Reinhard (SPEC section 4c).

A *fit* describes the stain of some tissue: `MacenkoFit` (a 3x2 stain matrix and the 99th
percentile of each stain's concentration) or `ReinhardFit` (CIELAB means and standard
deviations). `normalize` maps images from a source fit to a target fit; the default
target is `builtin_reference(method)`, fitted on the CC0 CMU-1-Small-Region H&E slide.

    fit = stain.fit_tissue(slide_pixels, mask=tissue_mask, method="macenko")  # once per slide
    tiles = stain.normalize(tiles, fit)  # toward the built-in H&E reference
    json.dumps(fit.to_dict())            # stored per slide; stain.fit_from_dict(...) reads it

Images are `[batch, height, width, 3]` (fits also take one `[height, width, 3]` image):
uint8, or float16/bfloat16/float32 in `value_range` (default (0, 255), the uint8 scale,
as in Keras's preprocessing layers; pass (0, 1) for unit floats). `normalize` returns the
input dtype and scale: uint8 is rounded and clipped (no wrap-around), floats are clipped.

Background is left out of fits: for Macenko, pixels with an optical density below `beta`
= 0.15 in any channel (Macenko et al. 2009, torchstain); for Reinhard, pixels with CIELAB
lightness at or above `luminosity_threshold` = 0.8 of white (StainTools), or none with
`luminosity_threshold=None` (torchstain). An optional `mask` restricts fits further.
Fits need `min_tissue_pixels` (default 100) tissue pixels; the public fit functions raise
`ValueError` eagerly and fail a `tf.debugging` check in graphs (XLA drops that check, so
check fits eagerly where a slide may have no tissue). `normalize(images)` without a
source fits each image itself and returns images without enough tissue unchanged.
`fit_from_dict` and `normalize` (with eager fits) raise `ValueError` naming the field of a
fit with NaN, Infinity or values no fit can have (a stain vector that is not unit length
or has a negative component, parallel stain vectors, a max concentration or std <= 0, a
Lab mean out of range): such a fit would turn every pixel black.

Fits depend on resolution (averaging pixels lowers the 99th concentration percentiles):
fit at the resolution you normalise. The built-in target is the SoftMix job's fit of
CMU-1-Small-Region at full resolution (`_stain_reference`).

Everything is pure TensorFlow and compiles with `tf.function(jit_compile=True)`, fits
included (percentiles come from a two-pass histogram search instead of a sort; see
`_stain.masked_percentiles`), and runs on GPU. Results match torchstain 1.4.1's NumPy
backend given the same tissue pixels (see tests/softmix_tf/test_stain.py); differences:
Macenko's inverse is `io * exp(-OD) - 1` (an exact inverse of the `+ 1` in the optical
density; torchstain leaves the `- 1` out), uint8 results are rounded (torchstain
truncates), and the 99th concentration percentile is taken over tissue pixels (torchstain
takes it over all pixels, so its value drifts with the share of background).

References:
    Macenko et al., "A method for normalizing histology slides for quantitative
    analysis", ISBI 2009. Reinhard et al., "Color transfer between images", IEEE CG&A
    2001. torchstain (github.com/EIDOSlab/torchstain), StainTools.

Example:
    >>> import numpy as np
    >>> from softmix_tf import stain
    >>> rng = np.random.default_rng(0)
    >>> tiles = rng.integers(60, 200, (2, 32, 32, 3)).astype(np.uint8)
    >>> fit = stain.reinhard_fit(tiles)
    >>> sorted(fit.to_dict())
    ['means', 'method', 'stds']
    >>> out = stain.normalize(tiles, fit, method="reinhard")
    >>> out.dtype.name, tuple(out.shape)
    ('uint8', (2, 32, 32, 3))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from . import _stain, _stain_reference

__all__ = [
    "ALPHA",
    "BETA",
    "IO",
    "LUMINOSITY_THRESHOLD",
    "MAX_PERCENTILE",
    "METHODS",
    "MIN_TISSUE_PIXELS",
    "MacenkoFit",
    "ReinhardFit",
    "builtin_reference",
    "fit_from_dict",
    "fit_tissue",
    "macenko_fit",
    "normalize",
    "reinhard_fit",
]

METHODS = ("macenko", "reinhard")
IO = 240.0  # Macenko's transmitted light intensity (torchstain's default)
BETA = 0.15  # Macenko's optical-density threshold for background
ALPHA = 1.0  # Macenko's angle percentile (and 100 - ALPHA)
MAX_PERCENTILE = 99.0  # Macenko's concentration percentile (maxC)
LUMINOSITY_THRESHOLD = 0.8  # Reinhard background: L / 100 at or above this
MIN_TISSUE_PIXELS = 100
_FLOAT_DTYPES = (tf.float16, tf.bfloat16, tf.float32)


class MacenkoFit(NamedTuple):
    """A Macenko stain fit (a tf.nest structure: it passes through tf.function as is).

    Attributes:
        stain_matrix: float32 [..., 3, 2], unit optical-density vectors (RGB rows) of
            hematoxylin (column 0) and eosin (column 1).
        max_concentrations: float32 [..., 2], each stain's 99th concentration percentile.
    """

    stain_matrix: tf.Tensor
    max_concentrations: tf.Tensor

    @property
    def method(self) -> str:
        return "macenko"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (nested lists of floats); `fit_from_dict` reads it."""
        return {
            "method": self.method,
            "stain_matrix": np.asarray(self.stain_matrix, np.float64).tolist(),
            "max_concentrations": np.asarray(self.max_concentrations, np.float64).tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MacenkoFit:
        _check_dict(data, "macenko", ("stain_matrix", "max_concentrations"))
        fit = cls(
            tf.constant(data["stain_matrix"], tf.float32),
            tf.constant(data["max_concentrations"], tf.float32),
        )
        _check_fit(fit, "data")
        _check_values(fit, "data")
        return fit


class ReinhardFit(NamedTuple):
    """A Reinhard stain fit: CIELAB (D65) statistics of tissue pixels.

    Attributes:
        means: float32 [..., 3], mean L (0..100), a and b.
        stds: float32 [..., 3], their standard deviations.
    """

    means: tf.Tensor
    stds: tf.Tensor

    @property
    def method(self) -> str:
        return "reinhard"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (nested lists of floats); `fit_from_dict` reads it."""
        return {
            "method": self.method,
            "means": np.asarray(self.means, np.float64).tolist(),
            "stds": np.asarray(self.stds, np.float64).tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReinhardFit:
        _check_dict(data, "reinhard", ("means", "stds"))
        fit = cls(tf.constant(data["means"], tf.float32), tf.constant(data["stds"], tf.float32))
        _check_fit(fit, "data")
        _check_values(fit, "data")
        return fit


Fit = MacenkoFit | ReinhardFit


def fit_from_dict(data: dict[str, Any]) -> Fit:
    """The fit that `fit.to_dict()` describes (its "method" picks the class)."""
    method = data.get("method") if isinstance(data, dict) else None
    if method not in METHODS:
        raise ValueError(
            f"A stain fit dict needs 'method' in {METHODS}. Received: "
            f"{data if not isinstance(data, dict) else {'method': method}!r}"
        )
    return (MacenkoFit if method == "macenko" else ReinhardFit).from_dict(data)


def builtin_reference(method: str = "macenko") -> Fit:
    """The built-in H&E target fit: CMU-1-Small-Region (CC0), see `_stain_reference`."""
    _check_method(method)
    return fit_from_dict(_stain_reference.REFERENCES[method])


def macenko_fit(
    images: Any,
    mask: Any = None,
    *,
    per_image: bool = False,
    value_range: tuple[float, float] = (0.0, 255.0),
    io: float = IO,
    beta: float = BETA,
    alpha: float = ALPHA,
    max_percentile: float = MAX_PERCENTILE,
    min_tissue_pixels: int = MIN_TISSUE_PIXELS,
    fit_stride: int = 1,
) -> MacenkoFit:
    """Macenko fit of the tissue in `images`.

    Args:
        images: [H, W, 3] or [B, H, W, 3], uint8 or float in `value_range`.
        mask: optional bool [H, W] / [B, H, W]: the pixels that may count as tissue.
        per_image: with [B, H, W, 3], one fit per image (a fit with leading B) instead
            of one fit over all the pixels.
        value_range: the scale of float images.
        io: transmitted light intensity on the 0..255 scale.
        beta: optical density below which (in any channel) a pixel is background.
        alpha: the stain vectors are the `alpha` and `100 - alpha` angle percentiles.
        max_percentile: the concentration percentile that normalisation equalises.
        min_tissue_pixels: fewer tissue pixels than this in a fit raises.
        fit_stride: fit on every `fit_stride`-th pixel (in raster order) only, for
            cheaper fits; torchstain uses every pixel. On the test tiles (256 px), 4
            moved Reinhard fits by under 2% and normalised pixels by 0.5 levels on
            average, but Macenko's percentiles by up to 16% on a tile with little tissue.

    Returns:
        A `MacenkoFit`, with a leading B when `per_image`.

    Raises:
        ValueError: bad arguments, or too little tissue (eagerly; see the module doc).
    """
    pixels, tissue, squeeze = _groups(images, mask, per_image, value_range)
    stride = _check_stride(fit_stride)
    stains, max_c, ok, counts = _stain.macenko_fit_groups(
        pixels[:, ::stride],
        tissue[:, ::stride],
        io=io,
        beta=beta,
        alpha=alpha,
        max_percentile=max_percentile,
    )
    _check_counts(counts, ok, min_tissue_pixels, "macenko", f"beta={beta}")
    fit = MacenkoFit(stains, max_c)
    return MacenkoFit(*(t[0] for t in fit)) if squeeze else fit


def reinhard_fit(
    images: Any,
    mask: Any = None,
    *,
    per_image: bool = False,
    value_range: tuple[float, float] = (0.0, 255.0),
    luminosity_threshold: float | None = LUMINOSITY_THRESHOLD,
    min_tissue_pixels: int = MIN_TISSUE_PIXELS,
    fit_stride: int = 1,
) -> ReinhardFit:
    """Reinhard fit (CIELAB means and stds) of the tissue in `images`.

    Args:
        images, mask, per_image, value_range, min_tissue_pixels, fit_stride: as in
            `macenko_fit`.
        luminosity_threshold: pixels with L / 100 at or above it are background; None
            keeps every (masked) pixel, as torchstain does.

    Returns:
        A `ReinhardFit`, with a leading B when `per_image`.

    Raises:
        ValueError: bad arguments, or too little tissue (eagerly; see the module doc).
    """
    images = tf.convert_to_tensor(images)
    pixels, tissue, squeeze = _groups(images, mask, per_image, value_range)
    stride = _check_stride(fit_stride)
    pixels, tissue = pixels[:, ::stride], tissue[:, ::stride]
    lab = _stain.rgb_to_lab(pixels, integer=images.dtype == tf.uint8)
    tissue = _reinhard_tissue(lab, tissue, luminosity_threshold)
    means, stds, counts = _stain.reinhard_fit_groups(lab, tissue)
    ok = tf.ones_like(counts, tf.bool)
    _check_counts(
        counts, ok, min_tissue_pixels, "reinhard", f"luminosity_threshold={luminosity_threshold}"
    )
    fit = ReinhardFit(means, stds)
    return ReinhardFit(*(t[0] for t in fit)) if squeeze else fit


def fit_tissue(images: Any, mask: Any = None, *, method: str = "macenko", **kwargs: Any) -> Fit:
    """`macenko_fit` or `reinhard_fit` by name, e.g. once per slide with its tissue mask.

    Example:
        >>> import numpy as np
        >>> level = np.full((64, 64, 3), 240, np.uint8)  # white glass ...
        >>> level[16:48, 16:48] = (150, 90, 160)         # ... around a purple square
        >>> mask = np.zeros((64, 64), bool); mask[8:56, 8:56] = True
        >>> fit = fit_tissue(level, mask=mask, method="reinhard")
        >>> [round(v) for v in fit.means.numpy()]  # the square's colour only
        [47, 36, -28]
    """
    _check_method(method)
    fit_fn = macenko_fit if method == "macenko" else reinhard_fit
    return fit_fn(images, mask, **kwargs)


def normalize(
    images: Any,
    source: Fit | None = None,
    target: Fit | None = None,
    method: str | None = None,
    *,
    fit_over: str = "image",
    value_range: tuple[float, float] = (0.0, 255.0),
    io: float = IO,
    beta: float = BETA,
    alpha: float = ALPHA,
    luminosity_threshold: float | None = LUMINOSITY_THRESHOLD,
    min_tissue_pixels: int = MIN_TISSUE_PIXELS,
    fit_stride: int = 1,
) -> tf.Tensor:
    """Maps images from a source stain fit to a target one.

    Args:
        images: [B, H, W, 3], uint8 or float in `value_range`.
        source: the images' fit: one fit for all, or a fit with a leading B (one per
            image). None fits the images themselves (with `io`, `beta`, `alpha`,
            `luminosity_threshold`), each one or all together as `fit_over` says, and
            returns images unchanged where a fit has fewer than `min_tissue_pixels`
            tissue pixels (or colours too uniform for two stains).
        target: the fit to map to; None is `builtin_reference(method)`.
        method: "macenko" or "reinhard"; None takes it from `source` or `target`.
        fit_over: with `source=None`, "image" (one fit per image) or "batch" (one fit).
        fit_stride: with `source=None`, fit on every `fit_stride`-th pixel only (see
            `macenko_fit`); the images' own fits then cost about a quarter with 4.
        value_range: the scale of float images (and of float results).

    Returns:
        [B, H, W, 3] in the dtype and scale of `images`.
    """
    method = _resolve_method(method, source, target)
    images = tf.convert_to_tensor(images)
    _check_images(images, "images", ranks=(4,))
    target = builtin_reference(method) if target is None else target
    _check_fit(target, "target")
    _check_values(target, "target")
    if fit_over not in ("image", "batch"):
        raise ValueError(f"`fit_over` must be 'image' or 'batch'. Received: fit_over={fit_over!r}")
    batch = tf.shape(images)[0]
    pooled = source is None and fit_over == "batch"
    groups = 1 if pooled else batch
    size = -1 if pooled else _pixels_per_image(images)
    pixels = tf.reshape(_to_255(images, value_range), [groups, size, 3])
    integer = images.dtype == tf.uint8
    lab = _stain.rgb_to_lab(pixels, integer=integer) if method == "reinhard" else None
    keep = None
    if source is None:
        stride = _check_stride(fit_stride)
        sampled = pixels[:, ::stride]
        tissue = tf.ones(tf.shape(sampled)[:2], tf.bool)
        if method == "macenko":
            stains, max_c, ok, counts = _stain.macenko_fit_groups(
                sampled, tissue, io=io, beta=beta, alpha=alpha, max_percentile=MAX_PERCENTILE
            )
            source = MacenkoFit(stains, max_c)
        else:
            lab_sampled = lab[:, ::stride]
            tissue = _reinhard_tissue(lab_sampled, tissue, luminosity_threshold)
            means, stds, counts = _stain.reinhard_fit_groups(lab_sampled, tissue)
            source = ReinhardFit(means, stds)
            ok = tf.ones([groups], tf.bool)
        keep = ~((counts >= min_tissue_pixels) & ok)
    else:
        _check_fit(source, "source")
        _check_values(source, "source")
    src = [_batched(t, rank) for t, rank in zip(source, _FIT_RANKS[method], strict=True)]
    tgt = [_batched(t, rank) for t, rank in zip(target, _FIT_RANKS[method], strict=True)]
    if method == "macenko":
        out = _stain.macenko_apply(pixels, *src, *tgt, io=io, identity=keep)
    else:
        out = _stain.reinhard_apply(lab, *src, *tgt, identity=keep) * 255.0
    return _from_255(tf.reshape(out, tf.shape(images)), images.dtype, value_range)


_FIT_RANKS = {"macenko": (2, 1), "reinhard": (1, 1)}


def _batched(tensor: tf.Tensor, rank: int) -> tf.Tensor:
    """A fit field with a leading group axis: [...] -> [1, ...] unless already batched."""
    tensor = tf.convert_to_tensor(tensor, tf.float32)
    return tensor[None] if tensor.shape.rank == rank else tensor


def _reinhard_tissue(lab: tf.Tensor, mask: tf.Tensor, threshold: float | None) -> tf.Tensor:
    if threshold is None:
        return mask
    return mask & (lab[..., 0] < 100.0 * threshold)


def _to_255(images: tf.Tensor, value_range: tuple[float, float]) -> tf.Tensor:
    pixels = tf.cast(images, tf.float32)
    if images.dtype == tf.uint8:
        return pixels
    low, high = _check_value_range(value_range)
    if (low, high) == (0.0, 255.0):
        return pixels
    return (pixels - low) * (255.0 / (high - low))


def _from_255(pixels: tf.Tensor, dtype: tf.DType, value_range: tuple[float, float]) -> tf.Tensor:
    pixels = tf.clip_by_value(pixels, 0.0, 255.0)
    if dtype == tf.uint8:
        return tf.cast(tf.round(pixels), tf.uint8)
    low, high = _check_value_range(value_range)
    if (low, high) != (0.0, 255.0):
        pixels = pixels * ((high - low) / 255.0) + low
    return tf.cast(pixels, dtype)


def _pixels_per_image(images: tf.Tensor) -> int:
    """H * W when static (-1 otherwise), so reshapes keep it with an unknown batch size."""
    height, width = images.shape[-3], images.shape[-2]
    return -1 if height is None or width is None else int(height * width)


def _groups(
    images: Any, mask: Any, per_image: bool, value_range: tuple[float, float]
) -> tuple[tf.Tensor, tf.Tensor, bool]:
    """Pixels [G, N, 3] on the 0..255 scale, mask [G, N], and whether G came from rank 3."""
    images = tf.convert_to_tensor(images)
    _check_images(images, "images", ranks=(3, 4))
    squeeze = images.shape.rank == 3 or not per_image
    groups = 1 if squeeze else tf.shape(images)[0]
    size = -1 if squeeze else _pixels_per_image(images)
    pixels = tf.reshape(_to_255(images, value_range), [groups, size, 3])
    if mask is None:
        return pixels, tf.ones(tf.shape(pixels)[:2], tf.bool), squeeze
    mask = tf.convert_to_tensor(mask)
    if not mask.shape.is_compatible_with(images.shape[:-1]):
        raise ValueError(
            "`mask` must have the images' shape without channels. "
            f"Received: mask.shape={mask.shape}, images.shape={images.shape}. "
            "Resize the tissue mask to the pixels' resolution first."
        )
    tissue = mask if mask.dtype == tf.bool else tf.cast(mask, tf.float32) > 0.5
    return pixels, tf.reshape(tissue, [groups, -1]), squeeze


def _check_counts(
    counts: tf.Tensor, ok: tf.Tensor, minimum: int, method: str, threshold: str
) -> None:
    fix = (
        f"Fit on a region with more tissue, loosen the background threshold ({threshold}), "
        f"lower min_tissue_pixels={minimum}, or use stain.builtin_reference('{method}')."
    )
    if tf.executing_eagerly():
        counts_np, ok_np = counts.numpy(), ok.numpy()
        few = np.flatnonzero(counts_np < minimum)
        if few.size:
            raise ValueError(
                f"Too little tissue for a {method} stain fit: fit(s) {few.tolist()} have "
                f"{counts_np[few].tolist()} tissue pixels, fewer than "
                f"min_tissue_pixels={minimum}. {fix}"
            )
        flat = np.flatnonzero(~ok_np)
        if flat.size:
            raise ValueError(
                f"The tissue of {method} stain fit(s) {flat.tolist()} is too uniform in colour "
                f"to separate two stains. {fix}"
            )
        return
    tf.debugging.assert_greater_equal(
        counts,
        tf.constant(minimum, counts.dtype),
        message=f"Too little tissue for a {method} stain fit (min_tissue_pixels). {fix}",
    )


def _check_images(images: tf.Tensor, name: str, ranks: tuple[int, ...]) -> None:
    if images.shape.rank not in ranks or images.shape[-1] != 3:
        shapes = " or ".join(
            "[height, width, 3]" if r == 3 else "[batch, height, width, 3]" for r in ranks
        )
        raise ValueError(f"`{name}` must be RGB {shapes}. Received: {name}.shape={images.shape}")
    if images.dtype != tf.uint8 and images.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` must be uint8, float16, bfloat16 or float32. "
            f"Received: {name}.dtype={images.dtype.name}"
        )


def _check_value_range(value_range: Any) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"`value_range` must be a pair (low, high). Received: value_range={value_range!r}"
        ) from None
    if not high > low:
        raise ValueError(
            f"`value_range` must have high > low. Received: value_range={value_range!r}"
        )
    return low, high


def _check_stride(stride: Any) -> int:
    if isinstance(stride, bool) or not hasattr(stride, "__index__") or int(stride) < 1:
        raise ValueError(f"`fit_stride` must be an int >= 1. Received: fit_stride={stride!r}")
    return int(stride)


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}. Received: method={method!r}")
    return str(method)


def _resolve_method(method: str | None, source: Any, target: Any) -> str:
    given = [f.method for f in (source, target) if isinstance(f, MacenkoFit | ReinhardFit)]
    if method is None:
        if not given:
            raise ValueError(
                "Pass `method` ('macenko' or 'reinhard') when neither `source` nor `target` "
                "is a fit. Received: method=None"
            )
        method = given[0]
    _check_method(method)
    if any(g != method for g in given):
        raise ValueError(
            "`source` and `target` must be fits of `method`. "
            f"Received: method={method!r}, fits of {given}"
        )
    return method


def _check_fit(fit: Any, name: str) -> None:
    if not isinstance(fit, MacenkoFit | ReinhardFit):
        raise TypeError(
            f"`{name}` must be a MacenkoFit or a ReinhardFit (see stain.fit_from_dict). "
            f"Received: {name}={type(fit).__name__}"
        )
    shapes = [t.shape for t in (tf.convert_to_tensor(t) for t in fit)]
    tails = ((3, 2), (2,)) if fit.method == "macenko" else ((3,), (3,))
    for shape, tail in zip(shapes, tails, strict=True):
        if shape.rank not in (len(tail), len(tail) + 1) or tuple(shape[-len(tail) :]) != tail:
            raise ValueError(
                f"`{name}` is not a {fit.method} fit: its fields must be {tails} with an "
                f"optional leading batch axis. Received shapes: {[s.as_list() for s in shapes]}"
            )


# A fit's stain vectors are unit optical-density vectors; JSON written by hand (or rounded
# to a few digits) may be off by this much.
_UNIT_NORM_TOLERANCE = 0.01


def _check_values(fit: MacenkoFit | ReinhardFit, name: str) -> None:
    """Raise ValueError naming the field when a fit holds values no fit can have.

    Non-finite numbers (NaN, Infinity: JSON readers accept both) would turn every
    normalised pixel black or NaN. Macenko: each stain vector (column) is a unit
    optical-density vector with no negative component, the two are not parallel, and
    each max concentration is > 0. Reinhard: L in [0, 100], a and b in [-128, 128], and
    every std > 0. Checked where values are known (eager tensors); traced ones pass.
    """
    if not tf.executing_eagerly():
        return
    tensors = [tf.convert_to_tensor(t) for t in fit]
    values = [t.numpy().astype(np.float64) for t in tensors]
    fields = dict(zip(fit._fields, values, strict=True))

    def bad(field: str, expected: str) -> ValueError:
        shown = np.round(fields[field], 6).tolist()
        which = "" if name == "data" else f" (`{name}`)"
        return ValueError(
            f"Not a usable {fit.method} stain fit{which}: field '{field}' must be {expected}. "
            f"Received: {field}={shown}. Refit it (stain.fit_tissue(...).to_dict()) or use "
            "stain.builtin_reference()."
        )

    for field, value in fields.items():
        if not np.isfinite(value).all():
            raise bad(field, "finite numbers (no NaN or Infinity)")
    if fit.method == "macenko":
        stains, max_c = fields["stain_matrix"], fields["max_concentrations"]
        norms = np.sqrt((stains**2).sum(axis=-2))
        if np.any(np.abs(norms - 1.0) > _UNIT_NORM_TOLERANCE):
            raise bad("stain_matrix", "two unit-length optical-density vectors (its columns)")
        if np.any(stains < 0.0):
            raise bad("stain_matrix", "optical-density vectors with no negative component")
        gram = np.swapaxes(stains, -1, -2) @ stains
        if np.any(gram[..., 0, 0] * gram[..., 1, 1] - gram[..., 0, 1] ** 2 <= 1e-6):
            raise bad("stain_matrix", "two different (not parallel) stain vectors")
        if np.any(max_c <= 0.0):
            raise bad("max_concentrations", "> 0 (each stain's 99th concentration percentile)")
    else:
        means, stds = fields["means"], fields["stds"]
        if np.any((means[..., 0] < 0.0) | (means[..., 0] > 100.0)) or np.any(
            np.abs(means[..., 1:]) > 128.0
        ):
            raise bad("means", "CIELAB means: L in [0, 100], a and b in [-128, 128]")
        if np.any(stds <= 0.0):
            raise bad("stds", "> 0 (CIELAB standard deviations of the tissue)")


def _check_dict(data: Any, method: str, keys: tuple[str, ...]) -> None:
    if (
        not isinstance(data, dict)
        or data.get("method") != method
        or any(k not in data for k in keys)
    ):
        raise ValueError(
            f"A {method} stain fit dict needs 'method': '{method}' and {list(keys)}. "
            f"Received keys: {sorted(data) if isinstance(data, dict) else type(data).__name__}"
        )
