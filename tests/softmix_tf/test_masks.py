"""Masks: the definition (against a numpy oracle), exactness and properties."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import softmix_tf
from softmix_tf import _masks
from tests import strategies
from tests.softmix_tf.oracle import oracle_axis_weights, oracle_mask, oracle_transition

# Ramp weights are rounded to multiples of 2**-12 (exact float32 arithmetic): each of
# the two axis weights is off by at most 2**-13, so the mask by at most ~2.5e-4.
MASK_ATOL = 2.5e-4

SIZES = [(16, 16), (12, 20), (17, 23), (33, 9), (64, 64), (31, 31)]
GRIDS = [(1, 1), (2, 2), (3, 5), (4, 4), (7, 3), (8, 8), (16, 16)]


class CellsToMaskTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(
        [
            dict(size=size, grid=grid, softness=s, ramp=ramp)
            for size, grid in itertools.product(SIZES, GRIDS)
            if grid[0] <= size[0] and grid[1] <= size[1]
            for s, ramp in [(0.0, "cosine"), (0.37, "linear"), (1.0, "cosine"), (0.5, "cosine")]
        ]
    )
    def test_matches_oracle(self, size, grid, softness, ramp):
        rng = np.random.default_rng(hash((size, grid, softness)) % 2**32)
        cells = (rng.random((3, *grid)) < 0.5).astype(np.float32)
        mask = softmix_tf.cells_to_mask(cells, size, softness=softness, ramp=ramp).numpy()
        expected = oracle_mask(cells, size, softness, ramp)
        self.assertEqual(mask.dtype, np.float32)
        self.assertAllClose(mask, expected, atol=MASK_ATOL, rtol=0)
        if softness == 0.0:
            self.assertAllEqual(mask, expected)  # hard grid CutMix, bit for bit

    @parameterized.parameters(False, True)
    def test_same_under_tf_function_and_xla(self, jit):
        cells = (np.random.default_rng(1).random((4, 5, 3)) < 0.5).astype(np.float32)
        fn = tf.function(
            lambda c: softmix_tf.cells_to_mask(c, (37, 29), softness=0.8), jit_compile=jit
        )
        eager = softmix_tf.cells_to_mask(cells, (37, 29), softness=0.8)
        self.assertAllEqual(fn(cells), eager)

    def test_exact_pixels_hand_built(self):
        # 8 x 8 image, 2 x 2 grid, one taken cell (top right); t = 0.5 * 4 = 2 pixels,
        # a linear ramp over pixel centres 3.5 and 4.5 -> weights 0.25 / 0.75.
        cells = np.array([[[0, 1], [0, 0]]], np.float32)
        mask = softmix_tf.cells_to_mask(cells, (8, 8), softness=0.5, ramp="linear").numpy()[0]
        col = np.array([0, 0, 0, 0.25, 0.75, 1, 1, 1])
        row = np.array([1, 1, 1, 0.75, 0.25, 0, 0, 0])
        self.assertAllEqual(mask, np.outer(row, col).astype(np.float32))

    def test_weights_partition_of_unity(self):
        for size, cells, s in [(10, 3, 0.7), (64, 16, 1.0), (7, 7, 1.0), (100, 1, 1.0)]:
            t = oracle_transition((size, size), (cells, cells), s)
            w = softmix_tf.axis_weights(size, cells, t, "cosine")
            self.assertAllGreaterEqual(w, 0.0)
            self.assertAllEqual(w.sum(axis=1), np.ones(size, np.float32))
            self.assertAllClose(w, oracle_axis_weights(size, cells, t, "cosine"), atol=2**-13)

    def test_no_ramp_at_border(self):
        w = softmix_tf.axis_weights(12, 3, 4.0, "cosine")
        self.assertAllEqual(w[0], [1, 0, 0])
        self.assertAllEqual(w[-1], [0, 0, 1])

    def test_all_or_nothing_cells(self):
        for value in (0.0, 1.0):
            cells = np.full((2, 5, 7), value, np.float32)
            mask = softmix_tf.cells_to_mask(cells, (23, 31), softness=1.0)
            self.assertAllEqual(mask, np.full((2, 23, 31), value, np.float32))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_mask_properties(data):
    size = data.draw(strategies.image_sizes(max_side=24))
    grid = data.draw(strategies.grids_for(size))
    softness = data.draw(strategies.softness)
    ramp = data.draw(strategies.ramps)
    cells = np.array(
        data.draw(st.lists(st.booleans(), min_size=grid[0] * grid[1], max_size=grid[0] * grid[1]))
    ).reshape(1, *grid)
    mask = softmix_tf.cells_to_mask(cells, size, softness=softness, ramp=ramp).numpy()[0]
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    np.testing.assert_allclose(mask, oracle_mask(cells, size, softness, ramp)[0], atol=MASK_ATOL)
    # Pixels whose t-square touches only taken (kept) cells are exactly 1 (0).
    t = oracle_transition(size, grid, softness)
    ey = [i * size[0] // grid[0] for i in range(grid[0] + 1)]
    ex = [j * size[1] // grid[1] for j in range(grid[1] + 1)]
    for y, x in itertools.product(range(size[0]), range(size[1])):
        cy, cx = y + 0.5, x + 0.5
        rows = [i for i in range(grid[0]) if ey[i] < cy + t / 2 and ey[i + 1] > cy - t / 2]
        cols = [j for j in range(grid[1]) if ex[j] < cx + t / 2 and ex[j + 1] > cx - t / 2]
        touched = {bool(cells[0, i, j]) for i in rows for j in cols}
        if touched == {True}:
            assert mask[y, x] == 1.0
        elif touched == {False}:
            assert mask[y, x] == 0.0


def test_transition_width_uses_smallest_side_over_both_axes():
    assert _masks.transition_width((10, 40), (3, 4), 1.0) == 3.0
    assert _masks.transition_width((40, 10), (4, 3), 0.5) == 1.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cells=np.zeros((2, 2)), image_size=(4, 4)), "rank 3"),
        (dict(cells=np.zeros((1, 5, 2)), image_size=(4, 4)), "grid"),
        (dict(cells=np.zeros((1, 2, 2)), image_size=(4, 4), softness=1.5), "softness"),
        (dict(cells=np.zeros((1, 2, 2)), image_size=(4, 4), softness=-0.1), "softness"),
        (dict(cells=np.zeros((1, 2, 2)), image_size=(4, 4), ramp="step"), "ramp"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        softmix_tf.cells_to_mask(**kwargs)
    assert "Received:" in str(info.value)
