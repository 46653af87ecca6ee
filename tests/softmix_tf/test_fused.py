"""The op under plain `tf.function` / `tf.data` runs through a nested XLA function
(`fuse_with_xla`): same bits as eager, with and without it, for every dtype and method."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

import softmix_tf
from softmix_tf import _mix

DTYPES = ["uint8", "uint16", "float16", "bfloat16", "float32"]
FIELDS = ("images", "labels", "lam", "label_maps", "masks")


def _batch(batch=5, size=(16, 24), dtype="float32", seed=0, classes=4):
    rng = np.random.default_rng(seed)
    shape = (batch, *size, 3)
    if dtype.startswith("uint"):
        hi = np.iinfo(dtype).max
        a = rng.integers(0, hi, shape, endpoint=True).astype(dtype)
        b = rng.integers(0, hi, shape, endpoint=True).astype(dtype)
    else:
        a = tf.cast(rng.random(shape, dtype=np.float32), dtype).numpy()
        b = tf.cast(rng.random(shape, dtype=np.float32), dtype).numpy()
    eye = np.eye(classes, dtype=np.float32)
    ya, yb = eye[rng.integers(0, classes, batch)], eye[rng.integers(0, classes, batch)]
    seeds = rng.integers(0, 2**63, (batch, 2), dtype=np.int64)
    return a, b, ya, yb, seeds


def _xla_functions(concrete) -> list[str]:
    library = concrete.graph.as_graph_def().library.function
    return [f.signature.name for f in library if f.attr["_XlaMustCompile"].b]


def _assert_same(test, got, want):
    for field in FIELDS:
        g, w = getattr(got, field), getattr(want, field)
        test.assertEqual(g is None, w is None, field)
        if g is not None:
            test.assertEqual(g.dtype, w.dtype, field)
            # Bitwise: compare the raw bytes (NaN-safe, -0.0 != 0.0).
            test.assertEqual(g.numpy().tobytes(), w.numpy().tobytes(), field)


class FusedTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.product(dtype=DTYPES, method=["softmix", "cutmix", "mixup"], fuse=[True, False])
    def test_bit_identical_to_eager(self, dtype, method, fuse):
        a, b, ya, yb, seeds = _batch(dtype=dtype)
        maps_a = np.random.default_rng(1).random((5, 16, 24), np.float32)
        kwargs = dict(return_masks=True, mix_prob=0.7, fuse_with_xla=fuse)
        if method == "mixup":
            op = lambda *x: softmix_tf.mixup(*x[:5], label_maps_a=x[5], label_maps_b=x[6], **kwargs)  # noqa: E731
        else:
            op = (
                lambda *x: softmix_tf.softmix(  # noqa: E731
                    *x[:5],
                    grid=(4, 3),
                    softness=0.6,
                    method=method,
                    label_maps_a=x[5],
                    label_maps_b=x[6],
                    **kwargs,
                )
            )
        args = (a, b, ya, yb, seeds, maps_a, maps_a[::-1])
        want = op(*args)
        fn = tf.function(op)
        _assert_same(self, fn(*args), want)
        xla = _xla_functions(fn.get_concrete_function(*args))
        self.assertEqual(bool(xla), fuse)

    def test_module_flag_opts_out(self):
        a, b, ya, yb, seeds = _batch()
        fn = tf.function(lambda *x: softmix_tf.softmix(*x, grid=4))
        self.assertTrue(_xla_functions(fn.get_concrete_function(a, b, ya, yb, seeds)))
        old, _mix.FUSE_WITH_XLA = _mix.FUSE_WITH_XLA, False
        try:
            fn = tf.function(lambda *x: softmix_tf.softmix(*x, grid=4))
            concrete = fn.get_concrete_function(a, b, ya, yb, seeds)
            self.assertEqual(_xla_functions(concrete), [])
            want = softmix_tf.softmix(a, b, ya, yb, seeds, grid=4)
            _assert_same(self, fn(a, b, ya, yb, seeds), want)
        finally:
            _mix.FUSE_WITH_XLA = old

    def test_no_nesting_under_xla(self):
        a, b, ya, yb, seeds = _batch()
        fn = tf.function(lambda *x: softmix_tf.softmix(*x, grid=4), jit_compile=True)
        _assert_same(self, fn(a, b, ya, yb, seeds), softmix_tf.softmix(a, b, ya, yb, seeds, grid=4))

    def test_one_xla_function_per_config(self):
        a, b, ya, yb, seeds = _batch()
        op = lambda *x: softmix_tf.softmix(*x, grid=(4, 4), softness=0.25)  # noqa: E731
        names = {
            tuple(_xla_functions(tf.function(op).get_concrete_function(a, b, ya, yb, seeds)))
            for _ in range(3)
        }
        self.assertLen(names, 1)  # new outer functions reuse the cached nested one

    @parameterized.parameters("uint8", "float32")
    def test_tf_data_dynamic_batch(self, dtype):
        a, b, ya, yb, _ = _batch(batch=7, dtype=dtype)
        ds = tf.data.Dataset.from_tensor_slices((a, ya)).batch(3)  # batches 3, 3, 1
        self.assertIsNone(ds.element_spec[0].shape[0])
        got = list(softmix_tf.data.softmix_batches(ds, seed=5, grid=4))
        fn = softmix_tf.data.softmix_map_fn(seed=5, grid=4)
        for i, (x, y) in enumerate(ds):
            want_x, want_y = fn(tf.constant(i, tf.int64), x, y)  # eager
            self.assertEqual(got[i][0].numpy().tobytes(), want_x.numpy().tobytes())
            self.assertEqual(got[i][1].numpy().tobytes(), want_y.numpy().tobytes())

    @parameterized.parameters("softmix", "cutmix", "mixup")
    def test_layer_under_tf_function(self, method):
        a, _, ya, _, _ = _batch(dtype="float32")
        eager = softmix_tf.SoftMix(grid=4, method=method, seed=3)
        graph = softmix_tf.SoftMix(grid=4, method=method, seed=3)
        fn = tf.function(lambda x, y: graph({"images": x, "labels": y}, training=True))
        for _ in range(2):
            want = eager({"images": a, "labels": ya}, training=True)
            got = fn(a, ya)
            self.assertEqual(got["images"].numpy().tobytes(), want["images"].numpy().tobytes())
            self.assertEqual(got["labels"].numpy().tobytes(), want["labels"].numpy().tobytes())
        self.assertTrue(_xla_functions(fn.get_concrete_function(a, ya)))
