"""Tests of pipeline.dataset.schema: exact round trips and the documented schema."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from pipeline.dataset.schema import (
    choose_format,
    decode_example,
    encode_example,
    feature_spec,
    parse_and_decode,
)
from pipeline.records import ExampleSpec, MixedExample, TileKey, TileRecord

SCHEMA_KEYS = {
    "image/encoded", "image/format", "image/shape", "image/dtype", "label", "lam", "seed",
    "a/slide_id", "a/level", "a/x", "a/y", "a/label",
    "b/slide_id", "b/level", "b/x", "b/y", "b/label",
}


def make_example(image, num_classes=3, lam=0.25, mix_index=0):
    a = TileRecord(TileKey("slide-a", 1, 512, 768), 0)
    b = TileRecord(TileKey("slide-b", 0, 0, 256), 2, soft_label=(0.1, 0.2, 0.7))
    spec = ExampleSpec(f"{a.key}#m{mix_index}", a, b, mix_index, (123, 2**62 - 1))
    label = np.zeros(num_classes, np.float32)
    label[0] += 1 - lam
    label[2] += lam
    return MixedExample(spec, image, label, lam)


IMAGES = {
    "uint8_rgb": (np.random.default_rng(0).integers(0, 256, (16, 12, 3)).astype(np.uint8),
                  "png"),
    "uint16_gray": (np.random.default_rng(1).integers(0, 65536, (8, 9, 1)).astype(np.uint16),
                    "png"),
    "float32_7ch": (np.random.default_rng(2).normal(size=(5, 6, 7)).astype(np.float32), "raw"),
    "uint8_2ch": (np.arange(40, dtype=np.uint8).reshape(4, 5, 2), "raw"),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_round_trip_exact(name):
    image, fmt = IMAGES[name]
    example = make_example(image)
    serialized = encode_example(example)
    decoded = decode_example(serialized)
    assert decoded["image/format"] == fmt
    assert decoded["image"].dtype == image.dtype
    np.testing.assert_array_equal(decoded["image"], image)
    np.testing.assert_array_equal(decoded["image/shape"], image.shape)
    assert decoded["image/dtype"] == image.dtype.name
    np.testing.assert_array_equal(decoded["label"], example.label)
    assert decoded["lam"] == np.float32(0.25)
    assert (decoded["a/slide_id"], decoded["a/level"], decoded["a/x"], decoded["a/y"]) == (
        "slide-a", 1, 512, 768)
    assert (decoded["b/slide_id"], decoded["b/level"], decoded["b/x"], decoded["b/y"]) == (
        "slide-b", 0, 0, 256)
    assert decoded["a/label"] == 0 and decoded["b/label"] == 2  # argmax of b's soft label
    np.testing.assert_array_equal(decoded["seed"], [123, 2**62 - 1])
    assert decoded["example_id"] == example.spec.example_id
    assert decoded["mix_index"] == 0
    if fmt == "raw":
        assert decoded["image/encoded"] == image.astype(image.dtype.newbyteorder("<")).tobytes()
    # Deterministic bytes: encoding twice gives the same record.
    assert encode_example(make_example(image.copy())) == serialized


def test_record_has_exactly_the_documented_keys():
    serialized = encode_example(make_example(IMAGES["uint8_rgb"][0]))
    keys = set(tf.train.Example.FromString(serialized).features.feature)
    assert keys == SCHEMA_KEYS | {"example_id", "mix_index"}
    assert set(feature_spec(3)) == keys


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_plain_tf_data_parse_of_the_schema(name):
    image, _ = IMAGES[name]
    serialized = [encode_example(make_example(image, mix_index=i)) for i in range(2)]
    # What a user writes from the README alone.
    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string),
        "image/shape": tf.io.FixedLenFeature([3], tf.int64),
        "label": tf.io.FixedLenFeature([3], tf.float32),
        "lam": tf.io.FixedLenFeature([], tf.float32),
        "a/x": tf.io.FixedLenFeature([], tf.int64),
        "seed": tf.io.FixedLenFeature([2], tf.int64),
    }
    dataset = tf.data.Dataset.from_tensor_slices(serialized).map(
        lambda s: tf.io.parse_single_example(s, spec))
    for parsed in dataset:
        assert int(parsed["a/x"]) == 512
        np.testing.assert_allclose(parsed["label"], [0.75, 0.0, 0.25])
    decoded = tf.data.Dataset.from_tensor_slices(serialized).map(
        lambda s: parse_and_decode(s, 3, image.dtype))
    for parsed in decoded:
        np.testing.assert_array_equal(parsed["image"].numpy(), image)


def test_parse_and_decode_under_tf_function_checks_dtype():
    serialized = encode_example(make_example(IMAGES["float32_7ch"][0]))
    fn = tf.function(lambda s: parse_and_decode(s, 3, "uint8")["image"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="dtype"):
        fn(tf.constant(serialized))


def test_forced_raw_and_rank_2():
    image = IMAGES["uint8_rgb"][0]
    decoded = decode_example(encode_example(make_example(image), image_format="raw"))
    assert decoded["image/format"] == "raw"
    np.testing.assert_array_equal(decoded["image"], image)
    gray = image[:, :, 0]
    np.testing.assert_array_equal(decode_example(encode_example(make_example(gray)))["image"],
                                  gray[:, :, None])


def test_errors():
    with pytest.raises(ValueError, match="PNG holds only"):
        encode_example(make_example(IMAGES["float32_7ch"][0]), image_format="png")
    with pytest.raises(ValueError, match="rank 3"):
        encode_example(make_example(np.zeros((2, 2, 2, 2), np.uint8)))
    with pytest.raises(ValueError, match="image_format"):
        encode_example(make_example(IMAGES["uint8_rgb"][0]), image_format="jpeg")
    assert choose_format("uint8", 4) == "png" and choose_format("int16", 1) == "raw"
