"""Read a finished SoftMix output directory back as a `tf.data.Dataset`.

The shard list, the compression and the class count come from ``manifest.json``; a
directory without it is an unfinished run (or not SoftMix output) and is refused.
"""

from __future__ import annotations

import posixpath

import numpy as np
import tensorflow as tf

from ._encoding import feature_spec, parse_and_decode
from ._output import read_manifest

__all__ = ["read_dataset"]

_GZIP_MAGIC = b"\x1f\x8b"


def _compression(manifest: dict, files: list[str]) -> str:
    params = manifest.get("params", {})
    if "compression" in params:
        return params["compression"] or ""
    for path in files:  # older or hand-made manifests: sniff the first bytes
        with tf.io.gfile.GFile(path, "rb") as handle:
            head = handle.read(2)
        if head:
            return "GZIP" if head == _GZIP_MAGIC else ""
    return ""


def _peek_dtype(files: list[str], compression: str, num_classes: int) -> str:
    """The image dtype of the first record (a graph needs it statically)."""
    records = tf.data.TFRecordDataset(files, compression_type=compression).take(1)
    for serialized in records:
        parsed = tf.io.parse_single_example(
            serialized, {"image/dtype": feature_spec(num_classes)["image/dtype"]}
        )
        return parsed["image/dtype"].numpy().decode("utf-8")
    return "uint8"


def read_dataset(
    out_dir: str,
    *,
    split: str | None = None,
    shuffle: bool = False,
    shuffle_buffer: int = 1024,
    seed: int | None = None,
    interleave_cycle: int = 4,
    as_dict: bool = False,
    num_parallel_calls: int = tf.data.AUTOTUNE,
) -> tf.data.Dataset:
    """The examples of a finished SoftMix run, decoded.

    Args:
        out_dir: the run's output directory (local path or `tf.io.gfile` URL).
        split: None or ``"train"`` (a run writes one split, named as in TFDS).
        shuffle: shuffle the shard order and the records (buffer `shuffle_buffer`).
        shuffle_buffer: records held by the record shuffle.
        seed: seed of both shuffles; with a seed the order is reproducible.
        interleave_cycle: shards read concurrently (records interleave across them).
        as_dict: yield every field of the schema (plus ``"image"``) instead of
            `(image, label)`.
        num_parallel_calls: parallelism of reading and decoding.

    Returns:
        A dataset of `(image, label)`: `image` [H, W, C] in the stored dtype, `label`
        float32 [K]; or of dicts with `as_dict`.

    Raises:
        PipelineError: no ``manifest.json`` (unfinished or not a SoftMix directory).
        ValueError: an unknown `split` or a bad option.
    """
    if split not in (None, "train"):
        raise ValueError(f"`split` must be None or 'train'. Received: split={split!r}")
    if interleave_cycle < 1 or shuffle_buffer < 1:
        raise ValueError(
            "`interleave_cycle` and `shuffle_buffer` must be >= 1. Received: "
            f"interleave_cycle={interleave_cycle}, shuffle_buffer={shuffle_buffer}"
        )
    manifest = read_manifest(out_dir)
    num_classes = len(manifest["class_names"])
    files = [posixpath.join(out_dir, shard["file"]) for shard in manifest["shards"]
             if shard["num_examples"] > 0]
    compression = _compression(manifest, files)
    dtype = np.dtype(_peek_dtype(files, compression, num_classes)) if files else np.uint8
    deterministic = not shuffle or seed is not None

    dataset = tf.data.Dataset.from_tensor_slices(tf.constant(files, dtype=tf.string))
    if shuffle and files:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        lambda path: tf.data.TFRecordDataset(path, compression_type=compression),
        cycle_length=interleave_cycle,
        block_length=1,
        num_parallel_calls=num_parallel_calls,
        deterministic=deterministic,
    )
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

    def decode(serialized: tf.Tensor):  # noqa: ANN202 - tuple or dict of tensors
        features = parse_and_decode(serialized, num_classes, dtype)
        if as_dict:
            return features
        return features["image"], features["label"]

    return dataset.map(decode, num_parallel_calls=num_parallel_calls,
                       deterministic=deterministic)
