"""Sampling: Beta proportions, uniform cell choice, stateless determinism."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized
from scipy import stats

import softmix_tf
from softmix_tf import _sampling


def _seeds(n, seed=0):
    return np.random.default_rng(seed).integers(0, 2**63, (n, 2), dtype=np.int64)


class SampleCellsTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(0.2, 1.0, 4.0)
    def test_proportion_follows_rounded_beta(self, alpha):
        n, grid = 4000, (16, 16)
        cells = softmix_tf.sample_cells(_seeds(n), grid, alpha).numpy()
        k = cells.sum(axis=(1, 2))
        self.assertAllEqual(k, np.round(k))
        frac = k / 256.0
        mean, var = 0.5, 1.0 / (4.0 * (2.0 * alpha + 1.0))
        self.assertAllClose(frac.mean(), mean, atol=4.5 * np.sqrt(var / n))
        self.assertAllClose(frac.var(), var, rtol=0.12)
        # The proportion itself is Beta(alpha, alpha) (KS test at 1e-3).
        p = _sampling.sample_beta(_sampling.seed_words(tf.constant(_seeds(n, 1))), alpha)
        self.assertGreater(stats.kstest(p.numpy(), stats.beta(alpha, alpha).cdf).pvalue, 1e-3)

    def test_k_is_round_p_times_n(self):
        seeds = tf.constant(_seeds(500))
        words = _sampling.seed_words(seeds)
        p = _sampling.sample_beta(words, 1.0).numpy()
        for grid in [(1, 1), (3, 5), (16, 16)]:
            k = softmix_tf.sample_cells(seeds, grid, 1.0).numpy().sum(axis=(1, 2))
            self.assertAllEqual(k, np.round(p * grid[0] * grid[1]))

    def test_cells_uniform_without_replacement(self):
        # With k fixed, each of the N cells is chosen with probability k / N.
        words = _sampling.seed_words(tf.constant(_seeds(6000)))
        taken = _sampling.take_cells(words, tf.fill([6000], 3.0), (2, 3)).numpy()
        self.assertAllEqual(taken.sum(axis=(1, 2)), np.full(6000, 3.0))
        freq = taken.reshape(6000, 6).mean(axis=0)
        self.assertAllClose(freq, np.full(6, 0.5), atol=0.03)

    def test_tiny_and_large_alpha(self):
        cells = softmix_tf.sample_cells(_seeds(300), (4, 4), 0.01).numpy().sum(axis=(1, 2))
        self.assertGreater(np.mean((cells == 0) | (cells == 16)), 0.9)
        cells = softmix_tf.sample_cells(_seeds(300), (4, 4), 500.0).numpy().sum(axis=(1, 2))
        self.assertAllInRange(cells, 6, 10)

    def test_sub_batch_and_order_invariance(self):
        seeds = _seeds(16)
        full = softmix_tf.sample_cells(seeds, (5, 4), 1.0).numpy()
        self.assertAllEqual(softmix_tf.sample_cells(seeds[5:9], (5, 4), 1.0), full[5:9])
        self.assertAllEqual(softmix_tf.sample_cells(seeds[::-1], (5, 4), 1.0), full[::-1])
        self.assertAllEqual(softmix_tf.sample_cells(seeds[3:4], (5, 4), 1.0), full[3:4])

    @parameterized.parameters(False, True)
    def test_same_under_tf_function_and_xla(self, jit):
        seeds = _seeds(64)
        eager = softmix_tf.sample_cells(seeds, (8, 8), 0.5)
        fn = tf.function(lambda s: softmix_tf.sample_cells(s, (8, 8), 0.5), jit_compile=jit)
        self.assertAllEqual(fn(seeds), eager)
        words = _sampling.seed_words(tf.constant(seeds))
        self.assertAllEqual(
            tf.function(lambda w: _sampling.hash_bits(w, np.arange(50)), jit_compile=jit)(words),
            _sampling.hash_bits(words, np.arange(50)),
        )

    def test_int32_seeds_and_all_64_bits(self):
        s32 = np.array([[1, 2], [-5, 7]], np.int32)
        self.assertAllEqual(
            softmix_tf.sample_cells(s32, 8, 1.0),
            softmix_tf.sample_cells(s32.astype(np.int64), 8, 1.0),
        )
        words = _sampling.seed_words(
            tf.constant([[2**40 + 3, 9], [3, 9], [3, 2**50 + 9]], tf.int64)
        )
        self.assertEqual(len({tuple(w) for w in words.numpy().tolist()}), 3)
        self.assertAllEqual(
            _sampling.words_to_seeds(words), [[2**40 + 3, 9], [3, 9], [3, 2**50 + 9]]
        )
        # Seeds that differ only in the high word give different cells.
        hi = softmix_tf.sample_cells(np.array([[5 + (i << 33), 1] for i in range(32)]), 16, 1.0)
        self.assertEqual(len({c.tobytes() for c in hi.numpy()}), 32)

    def test_batch_pairing_is_a_permutation(self):
        perm, seeds = _sampling.batch_pairing(tf.constant([3, 4]), 10)
        self.assertAllEqual(np.sort(perm.numpy()), np.arange(10))
        self.assertEqual(seeds.shape, (10, 2))
        perm2, seeds2 = _sampling.batch_pairing(tf.constant([3, 4]), 10)
        self.assertAllEqual(perm, perm2)
        self.assertAllEqual(seeds, seeds2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(seeds=np.zeros((2, 2), np.int64), grid=(2, 2), alpha=0.0), ValueError, "alpha"),
        (dict(seeds=np.zeros((2, 2), np.int64), grid=(2, 2), alpha=-1.0), ValueError, "alpha"),
        (dict(seeds=np.zeros((2, 2), np.float32), grid=(2, 2)), TypeError, "seeds"),
        (dict(seeds=np.zeros((2, 3), np.int64), grid=(2, 2)), ValueError, "seeds"),
        (dict(seeds=np.zeros((2, 2), np.int64), grid=(0, 2)), ValueError, "grid"),
        (dict(seeds=np.zeros((2, 2), np.int64), grid="4"), TypeError, "grid"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        softmix_tf.sample_cells(**kwargs)
    assert "Received:" in str(info.value)
