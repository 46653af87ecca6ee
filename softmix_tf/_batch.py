"""Mix each example of a batch with a partner from the same batch (layer and tf.data)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import tensorflow as tf

from . import _mix, _sampling

__all__ = ["SUPPORTED_KEYS", "mix_within_batch"]

SUPPORTED_KEYS = ("images", "labels", "segmentation_masks")


def mix_within_batch(data: Any, seed: tf.Tensor, **params: Any) -> Any:
    """Pairs each example with `permutation[i]` of its batch and mixes them.

    Args:
        data: a dict with "images" [B, H, W, C], optional "labels" float [B, K] and
            optional "segmentation_masks" [B, H, W(, K)]; or an images tensor alone.
        seed: integer [2], the batch's seed (per-example seeds are derived from it).
        **params: keywords of `softmix` (grid, alpha, softness, ramp, mix_prob,
            method, patch_size).

    Returns:
        The same structure, mixed; images keep their dtype, labels become float32.
    """
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - set(SUPPORTED_KEYS))
        if "images" not in data or unknown:
            raise ValueError(
                f"SoftMix takes a dict with keys {SUPPORTED_KEYS} ('images' required). "
                f"Received: keys={sorted(data)}"
            )
        images = tf.convert_to_tensor(data["images"])
        labels = data.get("labels")
        maps = data.get("segmentation_masks")
    else:
        images, labels, maps = tf.convert_to_tensor(data), None, None
    if images.shape.rank != 4:
        raise ValueError(
            "`images` must be rank 4 [batch, height, width, channels]. "
            f"Received: images.shape={images.shape}"
        )
    batch_size = tf.shape(images)[0]
    permutation, seeds = _sampling.batch_pairing(seed, batch_size)
    if labels is None:
        labels_in = tf.zeros(tf.stack([batch_size, 0]), tf.float32)
    else:
        labels_in = tf.convert_to_tensor(labels)
    maps_in = None if maps is None else tf.convert_to_tensor(maps)
    out = _mix.softmix(
        images,
        tf.gather(images, permutation),
        labels_in,
        tf.gather(labels_in, permutation),
        seeds,
        label_maps_a=maps_in,
        label_maps_b=None if maps_in is None else tf.gather(maps_in, permutation),
        **params,
    )
    if not isinstance(data, Mapping):
        return out.images
    result = dict(data)
    result["images"] = out.images
    if labels is not None:
        result["labels"] = out.labels
    if maps is not None:
        result["segmentation_masks"] = out.label_maps
    return result
