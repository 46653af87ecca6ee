"""tf.data helpers for SoftMix (public module: `softmix_tf.data`)."""

from __future__ import annotations

from ._data import softmix_batches as softmix_batches
from ._data import softmix_map_fn as softmix_map_fn

__all__ = ["softmix_batches", "softmix_map_fn"]
