"""tf.data helpers: mix the batches of a dataset with SoftMix, deterministically."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from . import _batch, _validate

__all__ = ["softmix_batches", "softmix_map_fn"]


def softmix_map_fn(
    *,
    seed: int,
    grid: int | tuple[int, int] | None = (4, 4),
    alpha: float = 1.0,
    softness: float = 0.5,
    ramp: str = "cosine",
    mix_prob: float = 1.0,
    method: str = "softmix",
    patch_size: int | tuple[int, int] | None = None,
) -> Callable[..., Any]:
    """A function for `dataset.enumerate().map(fn)` that mixes each batch in itself.

    The batch with index `i` is mixed with the batch seed `(seed, i)`, so the output is
    the same on every run and with any `num_parallel_calls`.

    Args:
        seed: int, the run's seed.
        grid, alpha, softness, ramp, mix_prob, method, patch_size: as `softmix`.

    Returns:
        `fn(index, batch) -> batch`, where a batch is a dict like the `SoftMix` layer's,
        an `(images, labels)` tuple, or an images tensor.
    """
    params = dict(
        grid=None if patch_size is not None else _validate.normalize_pair(grid, "grid"),
        patch_size=patch_size,
        alpha=_validate.check_alpha(alpha),
        softness=_validate.check_softness(softness),
        ramp=_validate.check_ramp(ramp),
        mix_prob=_validate.check_mix_prob(mix_prob),
        method=_validate.check_method(method),
    )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int. Received: seed={seed!r}")

    def fn(index: tf.Tensor, *batch: Any) -> Any:
        batch_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
        if len(batch) == 1 and isinstance(batch[0], tuple):  # enumerate() nests tuples
            batch = batch[0]
        if len(batch) == 2:
            out = _batch.mix_within_batch(
                {"images": batch[0], "labels": batch[1]}, batch_seed, **params
            )
            return out["images"], out["labels"]
        if len(batch) != 1:
            raise ValueError(
                "Batches must be (images, labels), a dict or an images tensor. "
                f"Received: {len(batch)} components"
            )
        return _batch.mix_within_batch(batch[0], batch_seed, **params)

    return fn


def softmix_batches(
    dataset: tf.data.Dataset,
    *,
    seed: int,
    num_parallel_calls: int | None = tf.data.AUTOTUNE,
    **params: Any,
) -> tf.data.Dataset:
    """Mixes every batch of `dataset` with SoftMix (each example with one of its batch).

    Args:
        dataset: batches of `(images, labels)`, dicts with "images", "labels" (and
            optionally "segmentation_masks"), or images alone.
        seed: int, the run's seed; batch `i` uses `(seed, i)`.
        num_parallel_calls: passed to `map` (output order is kept).
        **params: keywords of `softmix_map_fn` (grid, alpha, softness, ramp, mix_prob,
            method, patch_size).

    Returns:
        The dataset of mixed batches, same structure.

    Example:
        >>> import numpy as np
        >>> ds = tf.data.Dataset.from_tensor_slices(
        ...     (np.zeros((8, 16, 16, 3), np.uint8), np.eye(8, dtype=np.float32))).batch(4)
        >>> mixed = softmix_batches(ds, seed=0, grid=4)
        >>> [tuple(x.shape) for x in next(iter(mixed))]
        [(4, 16, 16, 3), (4, 8)]
    """
    fn = softmix_map_fn(seed=seed, **params)
    return dataset.enumerate().map(fn, num_parallel_calls=num_parallel_calls, deterministic=True)
