"""The SoftMix op: exact pixels, labels, dtypes, determinism, properties, errors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized
from hypothesis import given, settings

import softmix_tf
from tests import strategies
from tests.softmix_tf.oracle import oracle_mask, oracle_mix

DTYPES = ["uint8", "uint16", "float16", "bfloat16", "float32"]
FIELDS = ("images", "labels", "lam", "masks")


def _batch(batch=4, size=(16, 24), channels=3, dtype="float32", seed=0, classes=5):
    rng = np.random.default_rng(seed)
    shape = (batch, *size, channels)
    if dtype in ("uint8", "uint16"):
        hi = np.iinfo(dtype).max
        a = rng.integers(0, hi, shape, endpoint=True).astype(dtype)
        b = rng.integers(0, hi, shape, endpoint=True).astype(dtype)
    else:
        a = tf.cast(rng.random(shape, dtype=np.float32), dtype)
        b = tf.cast(rng.random(shape, dtype=np.float32), dtype)
    eye = np.eye(classes, dtype=np.float32)
    ya, yb = eye[rng.integers(0, classes, batch)], eye[rng.integers(0, classes, batch)]
    seeds = rng.integers(0, 2**63, (batch, 2), dtype=np.int64)
    return a, b, ya, yb, seeds


def _np(x):
    x = tf.convert_to_tensor(x)
    return tf.cast(x, tf.float32).numpy() if x.dtype == tf.bfloat16 else x.numpy()


class SoftMixTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.product(dtype=DTYPES, channels=[1, 3, 7], mode=["eager", "function"])
    def test_dtypes_channels_and_oracle(self, dtype, channels, mode):
        a, b, ya, yb, seeds = _batch(channels=channels, dtype=dtype)
        fn = softmix_tf.softmix if mode == "eager" else tf.function(softmix_tf.softmix)
        out = fn(a, b, ya, yb, seeds, grid=(4, 3), softness=0.6, return_masks=True)
        self.assertEqual(out.images.dtype, tf.as_dtype(dtype))
        self.assertEqual(out.images.shape, (4, 16, 24, channels))
        self.assertEqual(out.labels.dtype, tf.float32)
        self.assertEqual(out.lam.dtype, tf.float32)
        mask = out.masks.numpy()
        self.assertAllEqual(
            mask, softmix_tf.softmix_mask(seeds, (16, 24), grid=(4, 3), softness=0.6)
        )
        expected = oracle_mix(_np(a), _np(b), mask.astype(np.float64))
        if dtype.startswith("uint"):
            self.assertAllClose(out.images.numpy(), np.round(expected), atol=1, rtol=0)
            self.assertLessEqual(np.mean(out.images.numpy() != np.round(expected)), 0.01)
        else:
            tol = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6}[dtype]
            self.assertAllClose(_np(out.images), expected, atol=tol, rtol=0)
        self.assertAllClose(out.lam, mask.mean(axis=(1, 2)), atol=1e-6)
        lam = out.lam.numpy()[:, None]
        self.assertAllClose(out.labels, (1 - lam) * ya + lam * yb, atol=1e-6)

    def test_exact_pixels_from_injected_cells(self):
        a = np.zeros((2, 8, 8, 2), np.uint8)
        a[..., 1] = 10
        b = np.full((2, 8, 8, 2), 200, np.uint8)
        cells = np.array([[[0, 1], [0, 0]], [[1, 1], [1, 0]]], np.float32)
        masks = softmix_tf.cells_to_mask(cells, (8, 8), softness=0.5, ramp="linear")
        ya, yb = np.eye(2, dtype=np.float32)[[0, 0]], np.eye(2, dtype=np.float32)[[1, 1]]
        out = softmix_tf.apply_mix(a, b, ya, yb, masks)
        col = np.array([0, 0, 0, 0.25, 0.75, 1, 1, 1])
        row = np.array([1, 1, 1, 0.75, 0.25, 0, 0, 0])
        m0 = np.outer(row, col)
        self.assertAllEqual(out.images[0, ..., 0], np.round(200 * m0).astype(np.uint8))
        self.assertAllEqual(out.images[0, ..., 1], np.round(10 + 190 * m0).astype(np.uint8))
        self.assertAllEqual(out.images[0, 0, 0], [0, 10])  # interior of a kept cell
        self.assertAllEqual(out.images[0, 0, 7], [200, 200])  # interior of the taken cell
        self.assertAllEqual(out.images[1, 0, 0], [200, 200])
        self.assertAllEqual(out.images[1, 7, 7], [0, 10])
        self.assertAllClose(out.lam, [m0.mean(), 1 - m0.mean()], atol=1e-7)
        self.assertAllClose(out.labels[0], [1 - m0.mean(), m0.mean()], atol=1e-7)

    def test_constant_images_return_the_mask(self):
        _, _, ya, yb, seeds = _batch(batch=6)
        zeros, ones = np.zeros((6, 20, 30, 1), np.float32), np.ones((6, 20, 30, 1), np.float32)
        out = softmix_tf.softmix(zeros, ones, ya, yb, seeds, grid=(5, 6), softness=0.7)
        mask = softmix_tf.softmix_mask(seeds, (20, 30), grid=(5, 6), softness=0.7)
        self.assertAllEqual(out.images[..., 0], mask)
        self.assertAllClose(out.lam, tf.reduce_mean(mask, axis=[1, 2]), atol=1e-7)

    def test_k_zero_and_k_all(self):
        a, b, ya, yb, _ = _batch(batch=2, dtype="float32")
        for value, source in ((0.0, a), (1.0, b)):
            masks = softmix_tf.cells_to_mask(np.full((2, 4, 4), value), (16, 24), softness=1.0)
            out = softmix_tf.apply_mix(a, b, ya, yb, masks)
            self.assertAllEqual(out.images, source)
            self.assertAllEqual(out.lam, [value, value])
            self.assertAllEqual(out.labels, ya if value == 0 else yb)

    def test_mix_prob(self):
        a, b, ya, yb, seeds = _batch(batch=8, dtype="uint8")
        out = softmix_tf.softmix(a, b, ya, yb, seeds, mix_prob=0.0)
        self.assertAllEqual(out.images, a)
        self.assertAllEqual(out.labels, ya)
        self.assertAllEqual(out.lam, np.zeros(8))
        full = softmix_tf.softmix(a, b, ya, yb, seeds, mix_prob=1.0, return_masks=True)
        self.assertAllEqual(full.masks, softmix_tf.softmix_mask(seeds, (16, 24), grid=4))
        a, b, ya, yb, seeds = _batch(batch=400, size=(4, 4), dtype="uint8")
        half = softmix_tf.softmix(a, b, ya, yb, seeds, mix_prob=0.5, return_masks=True)
        unmixed = np.all(half.masks.numpy() == 0, axis=(1, 2))
        self.assertAllInRange(unmixed.mean(), 0.4, 0.62)
        # Mixed examples get exactly softmix_mask's mask.
        ref = softmix_tf.softmix_mask(seeds, (4, 4), grid=4).numpy()
        mixed = half.lam.numpy() > 0
        self.assertAllEqual(half.masks.numpy()[mixed], ref[mixed])

    def test_batch_of_one(self):
        a, b, ya, yb, seeds = _batch(batch=3)
        full = softmix_tf.softmix(a, b, ya, yb, seeds)
        one = softmix_tf.softmix(a[1:2], b[1:2], ya[1:2], yb[1:2], seeds[1:2])
        for field in ("images", "labels", "lam"):
            self.assertAllEqual(getattr(one, field), getattr(full, field)[1:2])

    @parameterized.parameters("uint8", "float32", "bfloat16")
    def test_determinism_across_batches_and_compilation(self, dtype):
        a, b, ya, yb, seeds = _batch(batch=9, size=(30, 20), dtype=dtype, seed=3)

        def op(a, b, ya, yb, seeds):
            return softmix_tf.softmix(
                a, b, ya, yb, seeds, grid=(5, 4), alpha=0.7, softness=0.9, return_masks=True
            )

        ref = op(a, b, ya, yb, seeds)
        # Bit-exact everywhere, except float images under XLA: within an ulp (XLA may
        # fuse the float blend differently; integer outputs, masks and labels are exact).
        tol = {"float32": 1e-6, "bfloat16": 8e-3}.get(dtype, 0.0)
        for jit in (False, True):
            out = tf.function(op, jit_compile=jit)(a, b, ya, yb, seeds)
            for field in FIELDS:
                if jit and field == "images" and tol:
                    self.assertAllClose(_np(out.images), _np(ref.images), atol=tol, rtol=0)
                else:
                    self.assertAllEqual(getattr(out, field), getattr(ref, field), msg=field)
        xla = tf.function(op, jit_compile=True)
        xla_full = xla(a, b, ya, yb, seeds)
        order = np.array([4, 0, 8, 2])
        sub_args = (tf.gather(a, order), tf.gather(b, order), ya[order], yb[order], seeds[order])
        sub = op(*sub_args)
        for field in FIELDS:
            self.assertAllEqual(getattr(sub, field), tf.gather(getattr(ref, field), order))
        xla_sub = xla(*sub_args)
        for field in FIELDS:  # under XLA too, an example's output ignores its batch
            self.assertAllEqual(getattr(xla_sub, field), tf.gather(getattr(xla_full, field), order))

    def test_int32_seeds(self):
        a, b, ya, yb, seeds = _batch()
        s32 = (seeds % 1000).astype(np.int32)
        x = softmix_tf.softmix(a, b, ya, yb, s32)
        y = softmix_tf.softmix(a, b, ya, yb, s32.astype(np.int64))
        self.assertAllEqual(x.images, y.images)

    def test_patch_size(self):
        a, b, ya, yb, seeds = _batch(size=(16, 24))
        x = softmix_tf.softmix(a, b, ya, yb, seeds, patch_size=(4, 8), return_masks=True)
        y = softmix_tf.softmix(a, b, ya, yb, seeds, grid=(4, 3), return_masks=True)
        self.assertAllEqual(x.masks, y.masks)
        self.assertAllEqual(
            softmix_tf.softmix_mask(seeds, (16, 24), grid=None, patch_size=(4, 8)), y.masks
        )

    def test_label_maps(self):
        a, b, ya, yb, seeds = _batch(batch=3)
        rng = np.random.default_rng(0)
        ia, ib = rng.integers(0, 4, (3, 16, 24)), rng.integers(0, 4, (3, 16, 24))
        out = softmix_tf.softmix(
            a, b, ya, yb, seeds, label_maps_a=ia, label_maps_b=ib, return_masks=True
        )
        m = out.masks.numpy()
        self.assertAllEqual(out.label_maps, np.where(m > 0.5, ib, ia))
        fa, fb = np.eye(4, dtype=np.float32)[ia], np.eye(4, dtype=np.float32)[ib]
        out = softmix_tf.softmix(
            a, b, ya, yb, seeds, label_maps_a=fa, label_maps_b=fb, return_masks=True
        )
        self.assertAllClose(out.label_maps, oracle_mix(fa, fb, m), atol=1e-6)
        self.assertAllClose(tf.reduce_sum(out.label_maps, -1), np.ones((3, 16, 24)), atol=1e-6)

    def test_methods_share_the_api(self):
        a, b, ya, yb, seeds = _batch(batch=6)
        cut = softmix_tf.grid_cutmix(a, b, ya, yb, seeds, grid=4, return_masks=True)
        hard = softmix_tf.softmix(a, b, ya, yb, seeds, grid=4, softness=0.0, return_masks=True)
        soft = softmix_tf.softmix(a, b, ya, yb, seeds, grid=4, return_masks=True)
        self.assertAllEqual(cut.images, hard.images)
        self.assertAllInSet(cut.masks, [0.0, 1.0])
        self.assertAllEqual(cut.masks > 0.5, soft.masks > 0.5)  # same cells, soft edges
        mix = softmix_tf.mixup(a, b, ya, yb, seeds, alpha=0.4, return_masks=True)
        lam = mix.lam.numpy()
        self.assertAllClose(mix.masks, np.broadcast_to(lam[:, None, None], (6, 16, 24)))
        self.assertAllClose(
            mix.images, oracle_mix(a.numpy(), b.numpy(), mix.masks.numpy()), atol=1e-6
        )
        self.assertAllEqual(
            softmix_tf.softmix(a, b, ya, yb, seeds, method="mixup", alpha=0.4).images, mix.images
        )
        xla = tf.function(lambda *x: softmix_tf.mixup(*x, alpha=0.4), jit_compile=True)
        self.assertAllClose(xla(a, b, ya, yb, seeds).images, mix.images, atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(case=strategies.mix_cases())
def test_properties(case):
    a, b = case["images_a"], case["images_b"]
    params = {k: case[k] for k in ("grid", "alpha", "softness", "ramp")}
    args = (a, b, case["labels_a"], case["labels_b"], case["seeds"])
    out = softmix_tf.softmix(*args, return_masks=True, **params)
    mask = out.masks.numpy()
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    x = out.images.numpy().astype(np.float64)
    lo = np.minimum(a, b).astype(np.float64)
    hi = np.maximum(a, b).astype(np.float64)
    assert np.all((lo <= x) & (x <= hi))
    np.testing.assert_allclose(out.lam, mask.mean(axis=(1, 2)), atol=1e-6)
    lam = out.lam.numpy()[:, None]
    np.testing.assert_allclose(
        out.labels, (1 - lam) * case["labels_a"] + lam * case["labels_b"], atol=1e-6
    )
    np.testing.assert_array_equal(x[mask == 1.0], b[mask == 1.0])
    np.testing.assert_array_equal(x[mask == 0.0], a[mask == 0.0])
    again = softmix_tf.softmix(*args, return_masks=True, **params)
    np.testing.assert_array_equal(again.images.numpy(), out.images.numpy())
    hard = softmix_tf.softmix(*args, return_masks=True, **{**params, "softness": 0.0})
    cells = softmix_tf.sample_cells(case["seeds"], params["grid"], params["alpha"]).numpy()
    np.testing.assert_array_equal(
        hard.masks.numpy(), oracle_mask(cells, a.shape[1:3], 0.0, "cosine").astype(np.float32)
    )


def _args(**over):
    a, b, ya, yb, seeds = _batch(batch=2, size=(8, 8))
    args = dict(images_a=a, images_b=b, labels_a=ya, labels_b=yb, seeds=seeds)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, kwargs, error, match",
    [
        (dict(images_a=np.zeros((8, 8, 3), np.float32)), {}, ValueError, "rank 4"),
        (dict(images_b=np.zeros((2, 8, 9, 3), np.float32)), {}, ValueError, "same shape"),
        (dict(images_b=np.zeros((2, 8, 8, 3), np.uint8)), {}, TypeError, "same dtype"),
        (
            dict(
                images_a=np.zeros((2, 8, 8, 3), np.int32), images_b=np.zeros((2, 8, 8, 3), np.int32)
            ),
            {},
            TypeError,
            "dtype",
        ),
        (dict(labels_a=np.zeros((2,), np.float32)), {}, ValueError, "labels_a"),
        (dict(labels_a=np.zeros((3, 5), np.float32)), {}, ValueError, "labels_a"),
        (dict(labels_b=np.zeros((2, 4), np.float32)), {}, ValueError, "same shape"),
        (dict(labels_a=np.zeros((2, 5), np.int64)), {}, TypeError, "labels_a"),
        (dict(seeds=np.zeros((2, 2), np.float32)), {}, TypeError, "seeds"),
        (dict(seeds=np.zeros((3, 2), np.int64)), {}, ValueError, "seeds"),
        ({}, dict(grid=(9, 2)), ValueError, "grid"),
        ({}, dict(patch_size=16), ValueError, "patch_size"),
        ({}, dict(grid=(2, 2), patch_size=4), ValueError, "either"),
        ({}, dict(softness=1.5), ValueError, "softness"),
        ({}, dict(softness=-0.5), ValueError, "softness"),
        ({}, dict(alpha=0.0), ValueError, "alpha"),
        ({}, dict(alpha=-2.0), ValueError, "alpha"),
        ({}, dict(ramp="gaussian"), ValueError, "ramp"),
        ({}, dict(mix_prob=1.5), ValueError, "mix_prob"),
        ({}, dict(method="fmix"), ValueError, "method"),
        ({}, dict(label_maps_a=np.zeros((2, 8, 8))), ValueError, "label_maps"),
        (
            {},
            dict(label_maps_a=np.zeros((2, 4, 8)), label_maps_b=np.zeros((2, 4, 8))),
            ValueError,
            "label_maps_a",
        ),
    ],
)
def test_errors(over, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        softmix_tf.softmix(**_args(**over), **kwargs)
    assert "Received:" in str(info.value)


def test_errors_under_tf_function():
    a, b, ya, yb, seeds = _batch(batch=2, size=(8, 8))
    fn = tf.function(lambda a, b: softmix_tf.softmix(a, b, ya, yb, seeds, softness=2.0))
    with pytest.raises(ValueError, match="softness"):
        fn(a, b)
