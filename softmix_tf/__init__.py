"""SoftMix for TensorFlow: soft-boundary grid mixing of image pairs (SPEC section 2).

Public API:
    softmix, grid_cutmix, mixup: mix two batches with per-example stateless seeds.
    softmix_mask: the masks `softmix` applies for given seeds.
    sample_cells, cells_to_mask, apply_mix: the op split into its three steps.
    SoftMix: a Keras 3 layer mixing each example with another of its batch.
    data: tf.data helpers (`softmix_tf.data.softmix_batches`).
    stain, StainNormalize: Macenko / Reinhard stain normalisation (op and Keras layer).
"""

from __future__ import annotations

import os as _os

from . import data as data
from . import stain as stain
from ._masks import axis_weights as axis_weights
from ._masks import cells_to_mask as cells_to_mask
from ._mix import SoftMixResult as SoftMixResult
from ._mix import apply_mix as apply_mix
from ._mix import grid_cutmix as grid_cutmix
from ._mix import mixup as mixup
from ._mix import softmix as softmix
from ._mix import softmix_mask as softmix_mask
from ._sampling import sample_cells as sample_cells

# The Keras layers import Keras (~0.75 CPU s). A process that only runs the ops (the
# pipeline's mixing workers) sets SOFTMIX_TF_LAZY_KERAS=1 while importing softmix_tf:
# the layers then import, and register with Keras, on first use (`softmix_tf.SoftMix`).
# By default they import here, so `import softmix_tf` is all `keras.saving.load_model`
# needs to find them.
_LAYERS = {"SoftMix": "._layer", "StainNormalize": "._stain_layer"}
if _os.environ.get("SOFTMIX_TF_LAZY_KERAS") != "1":
    from ._layer import SoftMix as SoftMix
    from ._stain_layer import StainNormalize as StainNormalize


def __getattr__(name: str):
    if name in _LAYERS:
        import importlib

        value = getattr(importlib.import_module(_LAYERS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "SoftMix",
    "SoftMixResult",
    "StainNormalize",
    "apply_mix",
    "axis_weights",
    "cells_to_mask",
    "data",
    "grid_cutmix",
    "mixup",
    "sample_cells",
    "softmix",
    "softmix_mask",
    "stain",
]
