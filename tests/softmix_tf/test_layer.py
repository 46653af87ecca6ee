"""The SoftMix Keras layer and the tf.data helpers."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

import softmix_tf


def _data(batch=6, dtype="float32"):
    rng = np.random.default_rng(0)
    images = (rng.random((batch, 16, 16, 3)) * 255).astype(dtype)
    labels = np.eye(batch, dtype=np.float32)
    return {"images": images, "labels": labels}


class SoftMixLayerTest(tf.test.TestCase, parameterized.TestCase):
    def test_inference_is_identity(self):
        data = _data()
        out = softmix_tf.SoftMix(seed=1)(data, training=False)
        self.assertAllEqual(out["images"], data["images"])
        self.assertAllEqual(out["labels"], data["labels"])

    @parameterized.parameters("softmix", "cutmix", "mixup")
    def test_training_mixes_pairs_of_the_batch(self, method):
        data = _data(dtype="uint8")
        out = softmix_tf.SoftMix(grid=4, seed=3, method=method)(data, training=True)
        self.assertEqual(out["images"].dtype, tf.uint8)
        self.assertAllClose(tf.reduce_sum(out["labels"], axis=1), np.ones(6), atol=1e-6)
        # Each row mixes at most two classes: its own and its partner's.
        self.assertAllLessEqual(tf.reduce_sum(tf.cast(out["labels"] > 0, tf.int32), 1), 2)

    def test_get_config_round_trip(self):
        layer = softmix_tf.SoftMix(
            grid=(3, 5),
            alpha=0.4,
            softness=0.2,
            ramp="linear",
            mix_prob=0.7,
            method="softmix",
            seed=11,
            name="sm",
        )
        config = layer.get_config()
        clone = softmix_tf.SoftMix.from_config(config)
        self.assertEqual(clone.get_config(), config)
        for key, value in dict(
            grid=(3, 5), alpha=0.4, softness=0.2, ramp="linear", mix_prob=0.7, seed=11
        ).items():
            self.assertEqual(config[key], value)
        revived = keras.layers.deserialize(keras.layers.serialize(layer))
        self.assertIsInstance(revived, softmix_tf.SoftMix)
        data = _data()
        self.assertAllEqual(
            clone(data)["images"],
            softmix_tf.SoftMix(
                **{k: config[k] for k in ("grid", "alpha", "softness", "ramp", "mix_prob", "seed")}
            )(data)["images"],
        )

    @parameterized.parameters(False, True)
    def test_inside_a_model(self, jit):
        images = keras.Input((16, 16, 3))
        labels = keras.Input((6,))
        mixed = softmix_tf.SoftMix(grid=4, seed=0)({"images": images, "labels": labels})
        model = keras.Model([images, labels], [mixed["images"], mixed["labels"]])
        data = _data()
        fn = tf.function(lambda x, y: model([x, y], training=True), jit_compile=jit)
        out_images, out_labels = fn(data["images"], data["labels"])
        self.assertEqual(out_images.shape, (6, 16, 16, 3))
        self.assertAllClose(tf.reduce_sum(out_labels, 1), np.ones(6), atol=1e-6)
        same = model([data["images"], data["labels"]], training=False)
        self.assertAllEqual(same[0], data["images"])

    def test_in_tf_data_map(self):
        data = _data(batch=8)
        layer = softmix_tf.SoftMix(grid=2, seed=5)
        ds = tf.data.Dataset.from_tensor_slices(data).batch(4).map(lambda d: layer(d))
        batches = list(ds)
        self.assertLen(batches, 2)
        self.assertEqual(batches[0]["images"].shape, (4, 16, 16, 3))
        self.assertAllClose(tf.reduce_sum(batches[1]["labels"], 1), np.ones(4), atol=1e-6)

    def test_segmentation_masks_and_bad_keys(self):
        data = _data()
        data["segmentation_masks"] = np.zeros((6, 16, 16, 1), np.int32)
        out = softmix_tf.SoftMix(seed=0)(data)
        self.assertEqual(out["segmentation_masks"].shape, (6, 16, 16, 1))
        with pytest.raises(ValueError, match="Received: keys"):
            softmix_tf.SoftMix(seed=0)({"images": data["images"], "boxes": np.zeros((6, 4))})

    def test_constructor_errors(self):
        with pytest.raises(ValueError, match="softness"):
            softmix_tf.SoftMix(softness=2.0)
        with pytest.raises(ValueError, match="alpha"):
            softmix_tf.SoftMix(alpha=0)
        with pytest.raises(ValueError, match="ramp"):
            softmix_tf.SoftMix(ramp="box")


class DataHelpersTest(tf.test.TestCase):
    def test_softmix_batches_is_deterministic(self):
        data = _data(batch=12, dtype="uint8")
        ds = tf.data.Dataset.from_tensor_slices((data["images"], data["labels"])).batch(4)
        first = [x for x, _ in softmix_tf.data.softmix_batches(ds, seed=7, grid=4)]
        again = [
            x for x, _ in softmix_tf.data.softmix_batches(ds, seed=7, grid=4, num_parallel_calls=2)
        ]
        other = [x for x, _ in softmix_tf.data.softmix_batches(ds, seed=8, grid=4)]
        for x, y in zip(first, again, strict=True):
            self.assertAllEqual(x, y)
        self.assertNotAllEqual(np.concatenate(first), np.concatenate(other))

    def test_dict_batches_and_map_fn(self):
        data = _data(batch=4)
        ds = tf.data.Dataset.from_tensor_slices(data).batch(2)
        out = list(softmix_tf.data.softmix_batches(ds, seed=1, method="mixup"))
        self.assertEqual(out[0]["images"].shape, (2, 16, 16, 3))
        fn = softmix_tf.data.softmix_map_fn(seed=1, grid=2)
        self.assertEqual(fn(tf.constant(0, tf.int64), data["images"]).shape, (4, 16, 16, 3))
        with pytest.raises(TypeError, match="seed"):
            softmix_tf.data.softmix_map_fn(seed="x")


def _python(code: str, args: tuple[str, ...] = (), **env: str) -> str:
    """Run `code` in a fresh interpreter (imports are what is tested) and return its
    stdout; the environment gets `env` on top of this one's."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env},
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_softmix_tf_is_all_load_model_needs(tmp_path):
    """A model saved with the layers loads in a process that only imported softmix_tf
    (the layers register with Keras on import), and computes the same."""
    images = keras.Input((16, 16, 3))
    labels = keras.Input((6,))
    mixed = softmix_tf.SoftMix(grid=4, seed=5)({"images": images, "labels": labels})
    normalised = softmix_tf.StainNormalize(method="reinhard")(mixed["images"])
    model = keras.Model([images, labels], [normalised, mixed["labels"]])
    path = tmp_path / "model.keras"
    model.save(path)
    data = _data(dtype="float32")
    expected = model([data["images"], data["labels"]], training=True)
    np.save(tmp_path / "images.npy", data["images"])
    np.save(tmp_path / "labels.npy", data["labels"])
    out = _python(
        "import os, sys, numpy as np, keras, softmix_tf\n"
        "d = sys.argv[1]\n"
        "m = keras.saving.load_model(os.path.join(d, 'model.keras'))\n"
        "x, y = (np.load(os.path.join(d, n + '.npy')) for n in ('images', 'labels'))\n"
        "a, b = m([x, y], training=True)\n"
        "np.save(os.path.join(d, 'a.npy'), np.asarray(a))\n"
        "np.save(os.path.join(d, 'b.npy'), np.asarray(b))\n"
        "print(sorted(type(la).__name__ for la in m.layers\n"
        "             if type(la).__module__.startswith('softmix_tf')))\n",
        args=(str(tmp_path),),
    )
    assert out.strip() == "['SoftMix', 'StainNormalize']"
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.asarray(expected[0]))
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.asarray(expected[1]))


def test_lazy_keras_defers_the_layers_to_first_use():
    """SOFTMIX_TF_LAZY_KERAS=1 (the pipeline's worker processes): the ops work without
    the layer modules imported; the layers import, register and work on first use."""
    out = _python(
        "import sys, numpy as np, tensorflow as tf, softmix_tf\n"
        "assert 'softmix_tf._layer' not in sys.modules, 'the layers imported eagerly'\n"
        "m = softmix_tf.softmix_mask(tf.constant([[1, 2]], tf.int64), (8, 8), grid=2)\n"
        "print(m.shape, 'softmix_tf._layer' in sys.modules)\n"
        "import keras\n"
        "layer = softmix_tf.SoftMix(seed=1)\n"
        "print(keras.saving.get_registered_object('softmix_tf>SoftMix') is softmix_tf.SoftMix, "
        "type(softmix_tf.StainNormalize()).__name__)\n"
        "try:\n"
        "    softmix_tf.NoSuchThing\n"
        "except AttributeError as err:\n"
        "    print(err)\n",
        SOFTMIX_TF_LAZY_KERAS="1",
    )
    assert out.splitlines() == [
        "(1, 8, 8) False",
        "True StainNormalize",
        "module 'softmix_tf' has no attribute 'NoSuchThing'",
    ]
