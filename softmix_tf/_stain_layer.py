"""`StainNormalize`, a Keras 3 preprocessing layer over `softmix_tf.stain`."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from . import stain

__all__ = ["StainNormalize"]

_SOURCES = ("per_image", "batch")


@keras.saving.register_keras_serializable(package="softmix_tf")
class StainNormalize(keras.layers.Layer):
    """Normalises the stain of image batches toward a fixed target (SPEC section 4c).

    The target is `stain.builtin_reference(method)` (CMU-1-Small-Region H&E) unless a
    fit is given. The source is fitted on each call, per image ("per_image") or over the
    whole batch ("batch"), or is a given fit; images whose fit has fewer than
    `min_tissue_pixels` tissue pixels pass unchanged (`stain.normalize` with no source).
    Unlike `SoftMix`, the layer normalises in training and inference alike (a model should
    see the same colours in both); `enabled=False` makes it the identity, and
    `training_only=True` makes it the identity when `training=False`. Takes an image
    tensor `[B, H, W, 3]` or a dict with "images" (as `SoftMix` does) and returns the
    same structure, in the images' dtype. Compiles with XLA and runs on GPU.

    Args:
        method: "macenko" (default) or "reinhard".
        target: the fit to map to (a `MacenkoFit`/`ReinhardFit` or its `to_dict()`);
            None is the built-in reference.
        source: "per_image" (default), "batch", or a fit (or its dict) for all images.
        enabled: False makes the layer the identity.
        training_only: True makes the layer the identity when `training=False`.
        value_range: the scale of float images, default (0, 255).
        min_tissue_pixels: for fitted sources, the least tissue to normalise an image.
        fit_stride: for fitted sources, fit on every `fit_stride`-th pixel only.
        **kwargs: base `keras.layers.Layer` arguments (name, dtype, ...).

    Example:
        >>> import numpy as np
        >>> layer = StainNormalize(method="reinhard")
        >>> tiles = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
        >>> out = layer(tiles)
        >>> out.dtype.name, tuple(out.shape)
        ('uint8', (2, 16, 16, 3))
        >>> bool(np.array_equal(StainNormalize(enabled=False)(tiles), tiles))
        True
    """

    def __init__(
        self,
        method: str = "macenko",
        target: Any = None,
        source: Any = "per_image",
        enabled: bool = True,
        training_only: bool = False,
        value_range: tuple[float, float] = (0.0, 255.0),
        min_tissue_pixels: int = stain.MIN_TISSUE_PIXELS,
        fit_stride: int = 1,
        **kwargs: Any,
    ):
        kwargs.setdefault("autocast", False)  # keep the images' dtype
        super().__init__(**kwargs)
        self.method = stain._check_method(method)
        self.target = stain.builtin_reference(method) if target is None else _as_fit(target)
        if isinstance(source, str):
            if source not in _SOURCES:
                raise ValueError(
                    f"`source` must be one of {_SOURCES} or a stain fit. "
                    f"Received: source={source!r}"
                )
            self.source: Any = source
        else:
            self.source = _as_fit(source)
        for name, fit in (("target", self.target), ("source", self.source)):
            if not isinstance(fit, str) and fit.method != self.method:
                raise ValueError(
                    f"`{name}` must be a {self.method} fit (the layer's method). "
                    f"Received: a {fit.method} fit"
                )
        self.enabled = bool(enabled)
        self.training_only = bool(training_only)
        self.value_range = tuple(float(v) for v in stain._check_value_range(value_range))
        self.min_tissue_pixels = int(min_tissue_pixels)
        self.fit_stride = stain._check_stride(fit_stride)
        self.supports_jit = True

    def call(self, data: Any, training: bool | None = None) -> Any:
        if not self.enabled or (self.training_only and not training):
            return data
        if isinstance(data, dict):
            return {**data, "images": self._normalize(data["images"])}
        return self._normalize(data)

    def _normalize(self, images: Any) -> tf.Tensor:
        fitted = isinstance(self.source, str)
        return stain.normalize(
            images,
            None if fitted else self.source,
            self.target,
            self.method,
            fit_over="batch" if self.source == "batch" else "image",
            value_range=self.value_range,
            min_tissue_pixels=self.min_tissue_pixels,
            fit_stride=self.fit_stride,
        )

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            method=self.method,
            target=self.target.to_dict(),
            source=self.source if isinstance(self.source, str) else self.source.to_dict(),
            enabled=self.enabled,
            training_only=self.training_only,
            value_range=self.value_range,
            min_tissue_pixels=self.min_tissue_pixels,
            fit_stride=self.fit_stride,
        )
        return config


def _as_fit(fit: Any) -> stain.Fit:
    if isinstance(fit, dict):
        return stain.fit_from_dict(fit)
    stain._check_fit(fit, "fit")
    return fit
