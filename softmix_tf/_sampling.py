"""Stateless, compilation-independent randomness for SoftMix.

TensorFlow's stateless RNG ops return different streams under XLA than eagerly on
CPU, so every random number here comes from a counter-based integer hash of the
example's seed (four uint32 words) and a counter. Integer ops give the same bits
eagerly, in `tf.function` and with `jit_compile=True`, on any device, and each
example only ever reads its own seed, so results do not depend on the batch.

Streams (counter ranges) per example:
    0                  the mix_prob coin
    1 .. 1 + 4*A*2     Beta(alpha, alpha) via two Gamma draws (A attempts each)
    2**20 + cell       the score of each cell (cells with the k lowest scores are taken)
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from . import _validate

__all__ = [
    "batch_pairing",
    "hash_bits",
    "sample_beta",
    "sample_cells",
    "seed_words",
    "take_cells",
    "uniforms",
    "words_to_seeds",
]

_NUM_ATTEMPTS = 12  # Marsaglia-Tsang accepts >= 95% per try: P(all fail) < 1e-15.
_MIX_COUNTER = 0
_BETA_COUNTER = 1
_CELL_COUNTER = 1 << 20
_GOLDEN = 0x9E3779B9


def _u32(value: int) -> tf.Tensor:
    return tf.constant(value & 0xFFFFFFFF, tf.uint32)


def _mix32(x: tf.Tensor) -> tf.Tensor:
    """A bijective 32-bit finaliser (Wellons' lowbias32)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))
    x = x * _u32(0x7FEB352D)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(15)))
    x = x * _u32(0x846CA68B)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, _u32(16)))


def seed_words(seeds: tf.Tensor) -> tf.Tensor:
    """Splits int32/int64 seeds [B, 2] into uint32 words [B, 4], using all 64 bits.

    int32 seeds are sign-extended to int64 first, so `seeds` and
    `tf.cast(seeds, tf.int64)` give the same words.
    """
    seeds = tf.cast(seeds, tf.int64)
    low = tf.cast(tf.bitwise.bitwise_and(seeds, tf.constant(0xFFFFFFFF, tf.int64)), tf.uint32)
    high = tf.cast(
        tf.bitwise.bitwise_and(
            tf.bitwise.right_shift(seeds, tf.constant(32, tf.int64)),
            tf.constant(0xFFFFFFFF, tf.int64),
        ),
        tf.uint32,
    )
    return tf.stack([low[:, 0], high[:, 0], low[:, 1], high[:, 1]], axis=1)


def hash_bits(words: tf.Tensor, counters: tf.Tensor | np.ndarray) -> tf.Tensor:
    """Random uint32 bits [B, n] for each example's words [B, 4] and counters [n]."""
    counters = tf.cast(tf.convert_to_tensor(counters), tf.uint32)[tf.newaxis, :]
    h = _mix32(counters * _u32(_GOLDEN) + _u32(0x6A09E667))
    for i in range(4):
        h = _mix32(tf.bitwise.bitwise_xor(h, words[:, i : i + 1]) + _u32(0xBB67AE85 * (i + 1)))
    return h


def uniforms(words: tf.Tensor, counters: tf.Tensor | np.ndarray) -> tf.Tensor:
    """Uniform float32 [B, n] in the open interval (0, 1), 24 bits each."""
    top = tf.cast(tf.bitwise.right_shift(hash_bits(words, counters), _u32(8)), tf.float32)
    return (top + 0.5) * (1.0 / (1 << 24))


def _log_gamma_sample(words: tf.Tensor, alpha: float, counter: int) -> tf.Tensor:
    """log of a Gamma(alpha, 1) draw per example [B] (Marsaglia-Tsang, fixed attempts).

    For alpha < 1 draws Gamma(alpha + 1) and multiplies by U**(1/alpha), in log space
    so tiny alphas do not underflow. Uses counters [counter, counter + 3*A + 1).
    """
    shape = alpha + 1.0 if alpha < 1.0 else alpha
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    u = uniforms(words, np.arange(counter, counter + 3 * _NUM_ATTEMPTS + 1))
    u1 = u[:, 0:_NUM_ATTEMPTS]
    u2 = u[:, _NUM_ATTEMPTS : 2 * _NUM_ATTEMPTS]
    u3 = u[:, 2 * _NUM_ATTEMPTS : 3 * _NUM_ATTEMPTS]
    # Box-Muller: u1, u2 in (0, 1), so the log is finite.
    z = tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos((2.0 * math.pi) * u2)
    v = 1.0 + c * z
    v = v * v * v
    log_v = tf.math.log(tf.maximum(v, 1e-30))
    accept = tf.logical_and(v > 0.0, tf.math.log(u3) < 0.5 * z * z + d - d * v + d * log_v)
    # The first accepted attempt; all rejected (P < 1e-15) falls back to the mode, v = 1.
    attempt = tf.range(_NUM_ATTEMPTS, dtype=tf.int32)[tf.newaxis, :]
    first = tf.reduce_min(tf.where(accept, attempt, _NUM_ATTEMPTS), axis=1)
    chosen = tf.reduce_sum(tf.where(attempt == first[:, tf.newaxis], log_v, 0.0), axis=1)
    log_gamma = math.log(d) + chosen
    if alpha < 1.0:
        log_gamma = log_gamma + tf.math.log(u[:, 3 * _NUM_ATTEMPTS]) * (1.0 / alpha)
    return log_gamma


def sample_beta(words: tf.Tensor, alpha: float) -> tf.Tensor:
    """Beta(alpha, alpha) float32 [B] for seed words [B, 4]; XLA-compilable."""
    alpha = _validate.check_alpha(alpha)
    log_x = _log_gamma_sample(words, alpha, _BETA_COUNTER)
    log_y = _log_gamma_sample(words, alpha, _BETA_COUNTER + 3 * _NUM_ATTEMPTS + 1)
    # x / (x + y) = 1 / (1 + exp(log y - log x)): stable for tiny and huge draws.
    return 1.0 / (1.0 + tf.exp(tf.clip_by_value(log_y - log_x, -80.0, 80.0)))


def mix_coin(words: tf.Tensor, mix_prob: float) -> tf.Tensor:
    """bool [B]: whether each example is mixed at all (probability `mix_prob`)."""
    if mix_prob >= 1.0:
        return tf.ones(tf.shape(words)[:1], tf.bool)
    return uniforms(words, np.array([_MIX_COUNTER]))[:, 0] < mix_prob


def take_cells(words: tf.Tensor, num_taken: tf.Tensor, grid: tuple[int, int]) -> tf.Tensor:
    """Chooses `num_taken` [B] of the grid's cells uniformly without replacement.

    Each cell gets a random 32-bit score; the cells with the lowest scores are taken,
    ties broken by cell index. Integer-only, so exact on every path.

    Returns:
        float32 [B, gh, gw], 1 = take this cell from image b.
    """
    num_cells = grid[0] * grid[1]
    scores = hash_bits(words, np.arange(_CELL_COUNTER, _CELL_COUNTER + num_cells))
    # A unique int64 key per cell: score, then index (keys < 2**32 * 2**24).
    keys = tf.cast(scores, tf.int64) * (1 << 24) + tf.range(num_cells, dtype=tf.int64)
    sorted_keys = tf.sort(keys, axis=1)
    sentinel = tf.fill([tf.shape(keys)[0], 1], tf.constant(np.iinfo(np.int64).max, tf.int64))
    threshold = tf.gather(
        tf.concat([sorted_keys, sentinel], axis=1), tf.cast(num_taken, tf.int32), batch_dims=1
    )
    taken = keys < threshold[:, tf.newaxis]
    return tf.reshape(tf.cast(taken, tf.float32), [-1, grid[0], grid[1]])


def sample_cells_from_words(
    words: tf.Tensor, grid: tuple[int, int], alpha: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """(cells float32 [B, gh, gw], p float32 [B]) for seed words [B, 4]."""
    p = sample_beta(words, alpha)
    num_cells = grid[0] * grid[1]
    num_taken = tf.clip_by_value(tf.round(p * float(num_cells)), 0.0, float(num_cells))
    return take_cells(words, num_taken, grid), p


def sample_cells(seeds: tf.Tensor, grid: int | tuple[int, int], alpha: float = 1.0) -> tf.Tensor:
    """Samples the binary cell matrix `S` of SoftMix, one per example.

    Draws `p ~ Beta(alpha, alpha)` and takes `k = round(p * gh * gw)` cells uniformly
    without replacement (SPEC section 2, steps 1-2). Stateless: each row depends only on
    its own seed, identically eagerly, in `tf.function` and under XLA.

    Args:
        seeds: int32 or int64 [batch, 2], one stateless seed per example.
        grid: cells `(gh, gw)`, or an int for a square grid.
        alpha: Beta parameter, > 0.

    Returns:
        float32 [batch, gh, gw] of 0/1, 1 = take the cell from image b.

    Example:
        >>> import numpy as np
        >>> cells = sample_cells(np.array([[1, 2], [3, 4]]), grid=(2, 3), alpha=1.0)
        >>> cells.shape
        TensorShape([2, 2, 3])
    """
    grid = _validate.normalize_pair(grid, "grid")
    alpha = _validate.check_alpha(alpha)
    seeds = tf.convert_to_tensor(seeds)
    _validate.check_seeds(seeds, None)
    cells, _ = sample_cells_from_words(seed_words(seeds), grid, alpha)
    return cells


def batch_pairing(seed: tf.Tensor, batch_size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A seeded permutation of the batch and per-example seed words.

    Args:
        seed: integer [2] (e.g. from a Keras SeedGenerator, or (seed, batch index)).
        batch_size: scalar int.

    Returns:
        `(permutation, seeds)`: int32 [B], example i is paired with `permutation[i]`;
        int64 [B, 2] stateless seeds for the examples.
    """
    seed = tf.cast(tf.reshape(seed, [1, 2]), tf.int64)
    base = seed_words(seed)  # [1, 4]
    index = tf.range(batch_size, dtype=tf.int64)
    counters = tf.cast(index, tf.uint32) * 8
    perm_scores = hash_bits(base, counters + 4)[0]  # [B]
    keys = tf.cast(perm_scores, tf.int64) * (1 << 31) + index
    permutation = tf.cast(tf.argsort(keys), tf.int32)
    words = tf.stack([hash_bits(base, counters + i)[0] for i in range(4)], axis=1)
    return permutation, words_to_seeds(words)


def words_to_seeds(words: tf.Tensor) -> tf.Tensor:
    """The inverse of `seed_words`: uint32 [B, 4] -> int64 seeds [B, 2]."""
    w = tf.cast(words, tf.int64)
    shift = tf.constant(32, tf.int64)
    first = tf.bitwise.bitwise_or(w[:, 0], tf.bitwise.left_shift(w[:, 1], shift))
    second = tf.bitwise.bitwise_or(w[:, 2], tf.bitwise.left_shift(w[:, 3], shift))
    return tf.stack([first, second], axis=1)
