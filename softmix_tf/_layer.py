"""`SoftMix`, a Keras 3 preprocessing layer over the SoftMix op."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from . import _batch, _validate

__all__ = ["SoftMix"]


@keras.saving.register_keras_serializable(package="softmix_tf")
class SoftMix(keras.layers.Layer):
    """Mixes each image of a batch with another of the same batch through soft cells.

    Like `keras.layers.CutMix`, the layer takes `{"images": ..., "labels": ...}` (and
    optionally `"segmentation_masks"`), pairs each example with another of its batch by
    a seeded permutation and returns the same structure. It is the identity when
    `training=False`. Each call draws a fresh batch seed from a Keras `SeedGenerator`;
    per-example randomness then comes from the op's integer hash, so the layer compiles
    with XLA (`jit_compile=True`) and runs on GPU inside a model, and also works in
    `tf.data.Dataset.map` on batches.

    Args:
        grid: cells `(gh, gw)` or an int. Defaults to (4, 4).
        alpha: Beta(alpha, alpha) parameter for the proportion of cells taken, > 0.
        softness: transition width as a fraction of the smallest cell side, in [0, 1].
        ramp: "cosine" (default) or "linear".
        mix_prob: probability that an example is mixed at all.
        method: "softmix" (default), "cutmix" (hard grid CutMix) or "mixup".
        patch_size: cell size in pixels, instead of `grid`.
        seed: int or None, seeds the layer's SeedGenerator.
        **kwargs: base `keras.layers.Layer` arguments (name, dtype, ...).

    Example:
        >>> import numpy as np
        >>> layer = SoftMix(grid=4, softness=0.5, seed=0)
        >>> batch = {"images": np.zeros((4, 16, 16, 3), np.float32),
        ...          "labels": np.eye(4, dtype=np.float32)}
        >>> out = layer(batch, training=True)
        >>> out["images"].shape, out["labels"].shape
        (TensorShape([4, 16, 16, 3]), TensorShape([4, 4]))
    """

    def __init__(
        self,
        grid: int | tuple[int, int] = (4, 4),
        alpha: float = 1.0,
        softness: float = 0.5,
        ramp: str = "cosine",
        mix_prob: float = 1.0,
        method: str = "softmix",
        patch_size: int | tuple[int, int] | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ):
        kwargs.setdefault("autocast", False)  # keep the images' dtype, as the op does
        super().__init__(**kwargs)
        self.grid = None if grid is None else _validate.normalize_pair(grid, "grid")
        self.patch_size = (
            None if patch_size is None else _validate.normalize_pair(patch_size, "patch_size")
        )
        self.alpha = _validate.check_alpha(alpha)
        self.softness = _validate.check_softness(softness)
        self.ramp = _validate.check_ramp(ramp)
        self.mix_prob = _validate.check_mix_prob(mix_prob)
        self.method = _validate.check_method(method)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_jit = True

    def call(self, data: Any, training: bool = True) -> Any:
        if not training:
            return data
        seed = tf.cast(self.seed_generator.next(), tf.int64)
        return _batch.mix_within_batch(
            data,
            seed,
            grid=self.grid if self.patch_size is None else None,
            patch_size=self.patch_size,
            alpha=self.alpha,
            softness=self.softness,
            ramp=self.ramp,
            mix_prob=self.mix_prob,
            method=self.method,
        )

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            grid=self.grid,
            alpha=self.alpha,
            softness=self.softness,
            ramp=self.ramp,
            mix_prob=self.mix_prob,
            method=self.method,
            patch_size=self.patch_size,
            seed=self.seed,
        )
        return config
