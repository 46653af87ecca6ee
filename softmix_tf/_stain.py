"""Stain-normalisation maths in pure TensorFlow (SPEC section 4c); see `softmix_tf.stain`.

Everything here works on pixel groups `[G, N, 3]` (G fits, N pixels each) with a
boolean tissue mask `[G, N]`, is built from ops XLA compiles (no sort: XLA's CPU sort
is ~15x slower than the histogram search below) and keeps NaNs out of the results for
groups with no tissue: callers decide what such a group means from its tissue count.

Conventions follow torchstain 1.4.1's NumPy backend (the independent implementation the
tests compare against): Macenko optical density `OD = -log((I + 1) / io)` with I on the
0..255 scale, and sRGB/D65 CIELAB with L in [0, 100] for Reinhard.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

__all__ = [
    "lab_to_rgb",
    "macenko_apply",
    "macenko_fit_groups",
    "masked_percentiles",
    "reinhard_apply",
    "reinhard_fit_groups",
    "rgb_to_lab",
]

# sRGB (linear) -> XYZ, and the D65 white point: the constants of scikit-image and torchstain.
_RGB_TO_XYZ = np.array(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ]
)
_WHITE = np.array([0.95047, 1.0, 1.08883])
# Fold the white point into the matrices so each conversion is one 3x3 product.
_RGB_TO_XYZN = (_RGB_TO_XYZ / _WHITE[:, None]).T.astype(np.float32)
_XYZN_TO_RGB = (np.linalg.inv(_RGB_TO_XYZ) * _WHITE[None, :]).T.astype(np.float32)

_HIST_BINS = 256  # bins per pass of the percentile search (two passes: range / 65536)


def _pow(x: tf.Tensor, exponent: float) -> tf.Tensor:
    """`x ** exponent` for x > 0: XLA's CPU `pow` is a scalar call, exp/log vectorise (3x)."""
    return tf.exp(exponent * tf.math.log(x))


def _mix3(pixels: tf.Tensor, matrix: np.ndarray, offset: np.ndarray | None = None) -> tf.Tensor:
    """`pixels @ matrix (+ offset)` for [..., 3] pixels, as broadcast multiply-adds.

    XLA on CPU fuses these with the elementwise ops around them into one pass over the
    pixels; a 3x3 `matmul` (or `unstack`/`stack`) would split the loop and store
    intermediates.
    """
    out = sum(pixels[..., i : i + 1] * tf.constant(matrix[i], tf.float32) for i in range(3))
    return out if offset is None else out + tf.constant(offset, tf.float32)


# f(X/Xn), f(Y/Yn), f(Z/Zn) -> L, a, b.
_F_TO_LAB = np.array([[0.0, 500.0, 0.0], [116.0, -500.0, 200.0], [0.0, 0.0, -200.0]])
_LAB_TO_F = np.linalg.inv(_F_TO_LAB)
_LAB_OFFSET = np.array([-16.0, 0.0, 0.0])


def _srgb_linear_table() -> np.ndarray:
    """Linear RGB of each uint8 sRGB value (float32 [256])."""
    c = np.arange(256) / 255.0
    return np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92).astype(np.float32)


_SRGB_LINEAR = _srgb_linear_table()


def rgb_to_lab(pixels: tf.Tensor, *, integer: bool = False) -> tf.Tensor:
    """CIELAB (D65) of sRGB: float32 [..., 3] on the 0..255 scale -> [..., 3], L in [0, 100].

    `integer=True` promises whole-number pixels (from uint8) and looks the sRGB curve up
    in a table instead of computing it.
    """
    if integer:
        linear = tf.gather(_SRGB_LINEAR, tf.cast(pixels, tf.int32))
    else:
        c = pixels / 255.0
        linear = tf.where(
            c > 0.04045, _pow((tf.maximum(c, 0.04045) + 0.055) / 1.055, 2.4), c / 12.92
        )
    t = _mix3(linear, _RGB_TO_XYZN)
    f = tf.where(t > 0.008856, _pow(tf.maximum(t, 0.008856), 1.0 / 3.0), 7.787 * t + 16.0 / 116.0)
    return _mix3(f, _F_TO_LAB, _LAB_OFFSET)


def lab_to_rgb(lab: tf.Tensor) -> tf.Tensor:
    """sRGB in [0, 1] (clipped) of CIELAB (D65): float32 [..., 3] -> [..., 3]."""
    f = _mix3(lab - tf.constant(_LAB_OFFSET, tf.float32), _LAB_TO_F)
    xyz = tf.where(f > 0.2068966, f * f * f, (f - 16.0 / 116.0) / 7.787)
    t = _mix3(xyz, _XYZN_TO_RGB)
    rgb = tf.where(
        t > 0.0031308, 1.055 * _pow(tf.maximum(t, 0.0031308), 1.0 / 2.4) - 0.055, 12.92 * t
    )
    return tf.clip_by_value(rgb, 0.0, 1.0)


def _segment_counts(ids: tf.Tensor, num_segments: int) -> tf.Tensor:
    """int32 histogram of `ids` (int32, any shape) over `num_segments` (+1 dump) bins."""
    flat = tf.reshape(ids, [-1])
    counts = tf.math.unsorted_segment_sum(tf.ones_like(flat), flat, num_segments + 1)
    return counts[:num_segments]


def _locate(cdf: tf.Tensor, rank: tf.Tensor) -> tf.Tensor:
    """Index of the first bin whose cumulative count exceeds `rank`: [..., K], [...] -> [...]."""
    below = tf.reduce_sum(tf.cast(cdf <= rank[..., None], tf.int32), axis=-1)
    return tf.minimum(below, cdf.shape[-1] - 1)


def masked_percentiles(
    values: tf.Tensor,
    mask: tf.Tensor,
    percents: tuple[float, ...],
    to_values: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> tf.Tensor:
    """Percentiles of each row's masked values, as `np.percentile(..., method="linear")`.

    A two-pass histogram search replaces the sort, which XLA compiles slowly on CPU:
    pass one counts the row's values in 256 bins between its masked min and max, pass two
    splits the bin holding the wanted order statistic into 256 more, and the answer is
    interpolated between the smallest and largest value of the final bin. It is exact
    when that bin holds at most two values, and otherwise off by at most its width,
    (max - min) / 65536 of the row.

    Args:
        values: float32 [G, N].
        mask: bool [G, N], the values that count.
        percents: Q percentiles in [0, 100], static.
        to_values: an increasing map applied to the two order statistics around each
            percentile before interpolating between them: the percentiles of
            `to_values(values)` from cheaper stand-in `values`.

    Returns:
        float32 [G, Q]; 0 for rows without masked values.
    """
    groups = tf.shape(values)[0]
    bins = _HIST_BINS
    num_q = len(percents)
    count = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)  # [G]
    lo = tf.reduce_min(tf.where(mask, values, np.inf), axis=1)
    hi = tf.reduce_max(tf.where(mask, values, -np.inf), axis=1)
    lo = tf.where(count > 0, lo, 0.0)
    hi = tf.where(count > 0, hi, 0.0)
    width = tf.maximum((hi - lo) / bins, 1e-30)  # [G]
    scaled = (values - lo[:, None]) / width[:, None]  # [G, N], bin position in pass one
    bin1 = tf.clip_by_value(tf.cast(tf.floor(scaled), tf.int32), 0, bins - 1)
    row = tf.range(groups, dtype=tf.int32)[:, None]
    dump = groups * bins
    counts1 = _segment_counts(tf.where(mask, row * bins + bin1, dump), dump)
    cdf1 = tf.cumsum(tf.reshape(counts1, [groups, bins]), axis=1)  # [G, K]

    rank = (
        tf.constant(percents, tf.float32)[None, :]
        / 100.0
        * tf.cast(tf.maximum(count - 1, 0), tf.float32)[:, None]
    )  # [G, Q], fractional rank h
    k0 = tf.cast(tf.floor(rank), tf.int32)
    j1 = _locate(cdf1[:, None, :], k0)  # [G, Q], pass-one bin of order statistic k0
    below1 = tf.where(j1 > 0, tf.gather(cdf1, tf.maximum(j1 - 1, 0), batch_dims=1), 0)

    # Pass two: the sub-bin of each value inside its target's pass-one bin, per target.
    in_bin = mask[:, None, :] & tf.equal(bin1[:, None, :], j1[:, :, None])  # [G, Q, N]
    offset = (scaled[:, None, :] - tf.cast(j1, tf.float32)[:, :, None]) * bins
    sub = tf.clip_by_value(tf.cast(tf.floor(offset), tf.int32), 0, bins - 1)  # [G, Q, N]
    target = row[:, :, None] * num_q + tf.range(num_q, dtype=tf.int32)[None, :, None]
    dump2 = groups * num_q * bins
    counts2 = _segment_counts(tf.where(in_bin, target * bins + sub, dump2), dump2)
    cdf2 = tf.cumsum(tf.reshape(counts2, [groups, num_q, bins]), axis=2) + below1[:, :, None]
    j2 = _locate(cdf2, k0)  # [G, Q]
    below2 = tf.where(j2 > 0, tf.gather(cdf2, tf.maximum(j2 - 1, 0), batch_dims=2), below1)
    n2 = tf.gather(cdf2, j2, batch_dims=2) - below2  # values in the final bin

    in_final = in_bin & tf.equal(sub, j2[:, :, None])
    vmin = tf.reduce_min(tf.where(in_final, values[:, None, :], np.inf), axis=2)
    vmax = tf.reduce_max(tf.where(in_final, values[:, None, :], -np.inf), axis=2)
    # The next order statistic may lie past the final bin: the smallest value above it.
    above = mask[:, None, :] & (values[:, None, :] > vmax[:, :, None])
    after = tf.reduce_min(tf.where(above, values[:, None, :], np.inf), axis=2)
    span = tf.cast(tf.maximum(n2 - 1, 1), tf.float32)

    def order_statistic(k: tf.Tensor) -> tf.Tensor:
        # Exact when the final bin holds at most two values, else linear inside it.
        inside = tf.cast(k - below2, tf.float32)
        within = vmin + tf.clip_by_value(inside / span, 0.0, 1.0) * (vmax - vmin)
        return tf.where(k - below2 < n2, within, after)

    last = tf.maximum(count - 1, 0)[:, None]
    x0 = order_statistic(k0)
    x1 = order_statistic(tf.minimum(k0 + 1, last))
    x1 = tf.where(tf.math.is_finite(x1), x1, x0)
    if to_values is not None:
        x0, x1 = to_values(x0), to_values(x1)
    out = x0 + (rank - tf.cast(k0, tf.float32)) * (x1 - x0)
    return tf.where((count > 0)[:, None] & (n2 > 0), out, 0.0)


def _sum64(values: tf.Tensor) -> tf.Tensor:
    """Sum over axis 1, accumulated in float64, returned as float32."""
    return tf.cast(tf.reduce_sum(tf.cast(values, tf.float64), axis=1), tf.float32)


def _dot3(pixels: tf.Tensor, vectors: tf.Tensor) -> tf.Tensor:
    """[G, N, 3] . [G, 3] -> [G, N], as multiply-adds XLA fuses (not a dot op)."""
    return sum(pixels[..., i] * vectors[:, i : i + 1] for i in range(3))


def _order_to_angle(order: tf.Tensor) -> tf.Tensor:
    """Inverse of the angle stand-in in `macenko_fit_groups`: order -> phi in [-pi, pi]."""
    return tf.where(
        order >= 0.0,
        tf.acos(tf.clip_by_value(1.0 - order, -1.0, 1.0)),
        -tf.acos(tf.clip_by_value(1.0 + order, -1.0, 1.0)),
    )


def _od(pixels: tf.Tensor, io: float) -> tf.Tensor:
    return -tf.math.log((pixels + 1.0) / io)


def _pinv_columns(stains: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Left pseudo-inverse of [..., 3, 2] stain matrices -> ([..., 2, 3], det of S^T S)."""
    gram = tf.linalg.matmul(stains, stains, transpose_a=True)  # [..., 2, 2]
    a, b, d = gram[..., 0, 0], gram[..., 0, 1], gram[..., 1, 1]
    det = a * d - b * b
    safe = tf.where(det > 1e-12, det, 1.0)
    inverse = tf.stack([tf.stack([d, -b], -1), tf.stack([-b, a], -1)], -2) / safe[..., None, None]
    return tf.linalg.matmul(inverse, stains, transpose_b=True), det


def macenko_fit_groups(
    pixels: tf.Tensor,
    mask: tf.Tensor,
    *,
    io: float,
    beta: float,
    alpha: float,
    max_percentile: float,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Macenko fit of each group: float32 [G, N, 3] (0..255) and bool [G, N].

    Returns:
        (stain_matrix [G, 3, 2] with hematoxylin first, max_concentrations [G, 2],
        ok [G] bool: the tissue's colours span two stains, tissue pixel counts [G] int32).
    """
    od = _od(pixels, io)  # [G, N, 3]
    tissue = mask & tf.reduce_all(od >= beta, axis=-1)
    count = tf.reduce_sum(tf.cast(tissue, tf.float32), axis=1)  # [G]
    weight = tf.cast(tissue, tf.float32)[..., None]
    # Sums in float64: slide-level fits add up millions of pixels.
    mean = _sum64(od * weight) / tf.maximum(count, 1.0)[:, None]  # [G, 3]
    centred = (od - mean[:, None, :]) * weight
    # The 6 distinct covariance entries as one fused reduction (a [N, 3]^T [N, 3] matmul
    # is several times slower under XLA on CPU).
    pairs = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
    products = tf.stack([centred[..., i] * centred[..., j] for i, j in pairs], axis=-1)
    sums = _sum64(products) / tf.maximum(count - 1.0, 1.0)[:, None]  # [G, 6]
    cov = tf.reshape(tf.gather(sums, [0, 1, 2, 1, 3, 4, 2, 4, 5], axis=1), [-1, 3, 3])
    _, vectors = tf.linalg.eigh(cov)  # ascending eigenvalues; columns are eigenvectors
    # Eigenvector signs are arbitrary (and differ between LAPACK and XLA); fix them so
    # the angles below are the same everywhere. The stain vectors do not depend on it.
    e_mid, e_max = vectors[..., 1], vectors[..., 2]  # [G, 3]
    e_max *= tf.where(tf.reduce_sum(e_max, -1, keepdims=True) < 0, -1.0, 1.0)
    e_mid *= tf.where(e_mid[:, :1] < 0, -1.0, 1.0)
    # The angle phi = atan2(od . e_max, od . e_mid) of each pixel in the plane, ordered by
    # a monotone stand-in: XLA's CPU atan2 is a slow scalar call, and only the two
    # order statistics at each percentile need the exact angle.
    t_max, t_mid = _dot3(od, e_max), _dot3(od, e_mid)  # [G, N]
    cos_phi = t_mid / tf.maximum(tf.sqrt(t_mid * t_mid + t_max * t_max), 1e-30)
    order = tf.where(t_max >= 0.0, 1.0 - cos_phi, cos_phi - 1.0)  # increasing in phi
    angles = masked_percentiles(
        order, tissue, (alpha, 100.0 - alpha), to_values=_order_to_angle
    )  # [G, 2]
    cos, sin = tf.cos(angles), tf.sin(angles)
    v_min = e_mid * cos[:, :1] + e_max * sin[:, :1]  # [G, 3]
    v_max = e_mid * cos[:, 1:] + e_max * sin[:, 1:]
    # Hematoxylin absorbs red more than eosin does: it is the vector with the larger R.
    h_first = (v_min[:, :1] > v_max[:, :1])[:, :, None]
    stains = tf.where(
        h_first, tf.stack([v_min, v_max], axis=-1), tf.stack([v_max, v_min], axis=-1)
    )  # [G, 3, 2]
    pinv, det = _pinv_columns(stains)
    conc = tf.stack([_dot3(od, pinv[:, 0]), _dot3(od, pinv[:, 1])], axis=1)  # [G, 2, N]
    max_c = masked_percentiles(
        tf.reshape(conc, [-1, tf.shape(conc)[2]]),
        tf.repeat(tissue, 2, axis=0),
        (max_percentile,),
    )
    max_c = tf.reshape(max_c, [-1, 2])
    ok = (det > 1e-6) & tf.reduce_all(max_c > 1e-6, axis=-1)
    return stains, max_c, ok, tf.reduce_sum(tf.cast(tissue, tf.int32), axis=1)


def macenko_apply(
    pixels: tf.Tensor,
    source_stains: tf.Tensor,
    source_max_c: tf.Tensor,
    target_stains: tf.Tensor,
    target_max_c: tf.Tensor,
    *,
    io: float,
    identity: tf.Tensor | None = None,
) -> tf.Tensor:
    """Maps float32 [G, N, 3] pixels (0..255) from source stains to target stains.

    Fits are [G, 3, 2] / [G, 2] (or broadcastable). Returns float32 [G, N, 3], unclipped.
    The inverse of `_od` (`io * exp(-OD) - 1`) makes a pixel on the source stain plane
    map back to itself; torchstain leaves out the `- 1`. Groups where `identity` ([G]
    bool) is true map each pixel to itself (up to float rounding).
    """
    pinv, _ = _pinv_columns(source_stains)  # [G, 2, 3]
    scale = target_max_c / tf.where(source_max_c > 0, source_max_c, 1.0)  # [G, 2]
    # OD_out = T diag(scale) pinv(S) OD: one 3x3 matrix per group.
    transform = tf.linalg.matmul(target_stains * scale[..., None, :], pinv)  # [G, 3, 3]
    if identity is not None:
        # Switching the matrix, not the pixels, keeps XLA's fusion of the pixel loop.
        transform = tf.where(identity[:, None, None], tf.eye(3), transform)
    od = _od(pixels, io)  # [G, N, 3]
    # od_out[..., j] = sum_i od[..., i] * transform[j, i], as broadcast multiply-adds.
    od_out = sum(od[..., i : i + 1] * transform[:, None, :, i] for i in range(3))
    return io * tf.exp(-od_out) - 1.0


def reinhard_fit_groups(lab: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Masked per-channel LAB means and (population) stds of [G, N, 3] pixels, [G, N] mask.

    Returns:
        (means [G, 3], stds [G, 3], tissue pixel counts [G] int32).
    """
    # Tiles sum in float32; slide-level fits (over 2^20 pixels a group) in float64, where
    # float32 sums drift (1e-4 on CMU-1's stds). XLA's CPU float64 reduction is slower.
    size = lab.shape[1]
    dtype = tf.float64 if size is None or size > 1 << 20 else tf.float32
    weight = tf.cast(mask, dtype)[..., None]
    count = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)
    denominator = tf.cast(tf.maximum(count, 1), dtype)[:, None]
    lab = tf.cast(lab, dtype)
    mean = tf.reduce_sum(lab * weight, axis=1) / denominator
    var = tf.reduce_sum(tf.square(lab - mean[:, None, :]) * weight, axis=1) / denominator
    return tf.cast(mean, tf.float32), tf.cast(tf.sqrt(var), tf.float32), count


def reinhard_apply(
    lab: tf.Tensor,
    source_means: tf.Tensor,
    source_stds: tf.Tensor,
    target_means: tf.Tensor,
    target_stds: tf.Tensor,
    *,
    identity: tf.Tensor | None = None,
) -> tf.Tensor:
    """sRGB [0, 1] of LAB pixels [G, N, 3] standardised from the source to the target.

    Groups where `identity` ([G] bool) is true keep their LAB values.
    """
    scale = target_stds / tf.maximum(source_stds, 1e-6)  # [G, 3]
    shift = target_means - source_means * scale
    if identity is not None:
        scale = tf.where(identity[:, None], 1.0, scale)
        shift = tf.where(identity[:, None], 0.0, shift)
    return lab_to_rgb(lab * scale[:, None, :] + shift[:, None, :])
