"""The one mixer: `mix_batch` runs the SoftMix op on a batch with the run's settings.

Offline, `tasks.mix_bucket` (every engine's bucket step) calls `mix_examples` with the
bucket's tiles read from the tile packs; it takes each distinct tile once, groups the
examples by tile shape and dtype, and runs `mix_batch` in batches, as a `tf.function`
traced once per process. The stream (`pipeline.engines.stream`) runs the same
`mix_batch` inside its `tf.data` map. The op is batch-invariant (SPEC section 2), so the
output of an example does not depend on which other examples share its batch, and so
not on the engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ..config import MixConfig, OpConfig
from ..records import ExampleSpec, MixedExample, TileKey, TileRecord

__all__ = [
    "configure_tensorflow",
    "import_mixing_ops",
    "label_vector",
    "mix_batch",
    "mix_examples",
]


_TF_CONFIGURED = False


def configure_tensorflow(num_threads: int | None = None) -> None:
    """Cap TensorFlow's thread pools, once per process, before TF builds them.

    Several engine workers share the machine's cores: without a cap every worker
    starts one intra-op thread per core and they oversubscribe the CPU.

    Args:
        num_threads: intra-op threads; None reads `SOFTMIX_TF_THREADS` (default 1).
    """
    global _TF_CONFIGURED
    if _TF_CONFIGURED:
        return
    import tensorflow as tf

    if num_threads is None:
        num_threads = int(os.environ.get("SOFTMIX_TF_THREADS", "1"))
    try:
        tf.config.threading.set_intra_op_parallelism_threads(num_threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, num_threads))
    except RuntimeError:
        pass  # TF already initialised in this process (e.g. by the user): keep its pools.
    _TF_CONFIGURED = True


def import_mixing_ops(*, without_keras: bool = False) -> None:
    """Import TensorFlow and `softmix_tf`'s ops (`configure_tensorflow` first).

    With `without_keras`, for a process that only runs the engine's steps (a worker
    process the engine started itself; `tasks.prewarm_mixing`), neither imports Keras:
    ~0.75 CPU s less per process, on the critical path of a resumed run. TensorFlow's
    ``__init__`` imports Keras' optimizers (for their SavedModel registration) unless
    ``TF_USE_LEGACY_KERAS`` names the legacy `tf_keras` package, and with that package
    not installed it imports nothing; ``SOFTMIX_TF_LAZY_KERAS`` makes `softmix_tf`
    import its Keras layers on first use. Both variables are set for the import only:
    `tf.keras` and the layers still load Keras 3 when asked for. Without effect where
    TensorFlow is loaded already or `tf_keras` is installed. Never for a user's process:
    there ``import softmix_tf`` must register the layers for `keras.saving.load_model`.
    """
    import importlib.util
    import sys

    names: tuple[str, ...] = ()
    if without_keras and "softmix_tf" not in sys.modules:
        names = ("SOFTMIX_TF_LAZY_KERAS",)
        if "tensorflow" not in sys.modules and importlib.util.find_spec("tf_keras") is None:
            names += ("TF_USE_LEGACY_KERAS",)
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(dict.fromkeys(names, "1"))
    try:
        configure_tensorflow()
        import softmix_tf  # noqa: F401 - loads the op library once
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def label_vector(tile: TileRecord, num_classes: int) -> np.ndarray:
    """The label of a tile as float32 [num_classes]: its soft label or a one-hot."""
    if tile.soft_label is not None:
        return np.asarray(tile.soft_label, dtype=np.float32)
    vector = np.zeros(num_classes, dtype=np.float32)
    vector[tile.label] = 1.0
    return vector


def mix_examples(
    specs: Iterable[ExampleSpec],
    read_tile: Callable[[TileKey], np.ndarray],
    config: MixConfig,
    num_classes: int,
) -> list[MixedExample]:
    """Read the tiles of `specs` and mix them, in batches of `config.batch_size`.

    Tiles that cannot be used never get here: packing counts them under a skip reason
    before pairing (`pipeline.steps.pack`), so a tile that fails to read now is an error.

    Args:
        specs: examples to make, in any order.
        read_tile: returns the pixels [H, W, C] of a tile.
        config: the mixing parameters.
        num_classes: length of the label vectors.

    Returns:
        One `MixedExample` per spec, sorted by example id.
    """
    specs = sorted(specs)
    pixels: dict[TileKey, np.ndarray] = {}

    def fetch(tile: TileRecord) -> np.ndarray:
        if tile.key not in pixels:
            pixels[tile.key] = read_tile(tile.key)
        return pixels[tile.key]

    results: dict[str, MixedExample] = {}
    to_mix: dict[tuple, list[tuple[ExampleSpec, np.ndarray, np.ndarray]]] = {}
    for spec in specs:
        image_a = fetch(spec.a)
        if spec.is_original:
            results[spec.example_id] = MixedExample(
                spec, image_a, label_vector(spec.a, num_classes), 0.0
            )
            continue
        image_b = fetch(spec.b)
        if image_a.shape != image_b.shape or image_a.dtype != image_b.dtype:
            raise ValueError(
                f"Tiles {spec.a.key} and {spec.b.key} cannot be mixed: shapes/dtypes "
                f"{image_a.shape} {image_a.dtype} vs {image_b.shape} {image_b.dtype}. "
                "All slides of one run must share channel count and dtype."
            )
        to_mix.setdefault((image_a.shape, image_a.dtype.str), []).append(
            (spec, image_a, image_b)
        )

    for group in to_mix.values():
        for start in range(0, len(group), config.batch_size):
            batch = group[start : start + config.batch_size]
            for example in _mix_batch(batch, config, num_classes):
                results[example.spec.example_id] = example
    return [results[spec.example_id] for spec in specs]


def mix_batch(images_a, images_b, labels_a, labels_b, seeds, mix_index, config: OpConfig):
    """Mix a batch of at most `config.batch_size` pairs: TensorFlow in, TensorFlow out.

    Args:
        images_a, images_b: [B, H, W, C] tiles; labels_a, labels_b: float32 [B, K];
            seeds: int64 [B, 2]; mix_index: int64 [B] (< 0: an original).
        config: the op's settings (`MixConfig.op`).

    The batch is padded to `config.batch_size` (repeating its last pair), so a traced
    caller compiles one graph for every batch, and the padding is cut off again.
    Originals (``mix_index < 0``) come back unmixed: source `a`'s image and label,
    lam 0.

    Returns:
        `(images, labels, lam)` of the batch's length.
    """
    import tensorflow as tf

    import softmix_tf

    count = tf.shape(seeds)[0]
    size = config.batch_size

    def pad(x):
        x = tf.convert_to_tensor(x)
        x = tf.concat([x, tf.repeat(x[-1:], tf.maximum(size - count, 0), axis=0)], axis=0)
        return tf.ensure_shape(x, [size, *x.shape[1:]])

    out = softmix_tf.softmix(pad(images_a), pad(images_b), pad(labels_a), pad(labels_b),
                             pad(seeds), grid=config.grid, alpha=config.alpha,
                             softness=config.softness, ramp=config.ramp,
                             mix_prob=config.mix_prob)
    original = tf.convert_to_tensor(mix_index) < 0
    images = tf.where(original[:, None, None, None], images_a, out.images[:count])
    labels = tf.where(original[:, None], labels_a, out.labels[:count])
    return images, labels, tf.where(original, tf.zeros_like(out.lam[:count]), out.lam[:count])


_COMPILED: dict[tuple[OpConfig, bool], object] = {}


def _compiled_softmix(config: OpConfig, jit_compile: bool = False):
    """`mix_batch` as a `tf.function`, traced once per process and config.

    Eager execution dispatches hundreds of small ops per batch (~85 ms for 32 tiles of
    256 px); the traced function runs the same op in ~9 ms, bit-identical (the op's
    masks and integer outputs do not depend on how it is executed, SPEC section 2).
    Batches are padded to `config.batch_size`, so one trace serves every batch.
    With `jit_compile` (the stream, integer tiles only) XLA compiles it: ~6x less CPU
    on 256-px tiles, the same integer images, labels and lam (`softmix_tf` README:
    float images under XLA may differ by 1 ulp, so float tiles never use it).
    """
    fn = _COMPILED.get((config, jit_compile))
    if fn is None:
        import tensorflow as tf

        def mix(images_a, images_b, labels_a, labels_b, seeds, mix_index):
            return mix_batch(images_a, images_b, labels_a, labels_b, seeds, mix_index, config)

        fn = tf.function(mix, autograph=False, jit_compile=jit_compile or None)
        _COMPILED[(config, jit_compile)] = fn
    return fn


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    if len(array) == size:
        return array
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])


def _mix_batch(
    batch: Sequence[tuple[ExampleSpec, np.ndarray, np.ndarray]],
    config: MixConfig,
    num_classes: int,
) -> list[MixedExample]:
    configure_tensorflow()
    specs = [spec for spec, _, _ in batch]
    size = max(config.batch_size, len(batch))
    images, labels, lams = _compiled_softmix(config.op)(
        _pad(np.stack([a for _, a, _ in batch]), size),
        _pad(np.stack([b for _, _, b in batch]), size),
        _pad(np.stack([label_vector(s.a, num_classes) for s in specs]), size),
        _pad(np.stack([label_vector(s.b, num_classes) for s in specs]), size),
        _pad(np.asarray([s.seed for s in specs], dtype=np.int64), size),
        _pad(np.asarray([s.mix_index for s in specs], dtype=np.int64), size),
    )
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.float32)
    lams = np.asarray(lams, dtype=np.float32)
    return [
        MixedExample(spec, images[i], labels[i], float(lams[i])) for i, spec in enumerate(specs)
    ]
