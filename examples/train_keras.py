"""Train a small Keras model on SoftMix tiles streamed from Zarr slides (no TFRecords).

    softmix demo-data demo                       # writes demo/manifest.csv + slides
    python examples/train_keras.py demo/manifest.csv

Runs two short trainings on the same stream of the demo slides:

1. mixing in tf.data: `pipeline.stream_dataset(...)` yields mixed `(image, label)`;
2. mixing on the accelerator: `stream_dataset(..., mix=False)` yields the unmixed
   pairs and their per-example seeds, and the model's `train_step` mixes them with
   `softmix_tf.softmix`: the same pixels as (1), computed where the model runs.
"""

from __future__ import annotations

import argparse
import tempfile

import keras
import tensorflow as tf

import pipeline
import softmix_tf

OPTIONS = dict(tile_size=128, grid=4, softness=0.5, alpha=1.0, num_mixes=1, seed=0,
               min_tissue=0.5)


def small_model(num_classes: int, tile_size: int) -> keras.Model:
    return keras.Sequential([
        keras.Input((tile_size, tile_size, 3)),
        keras.layers.Rescaling(1.0 / 255),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(num_classes, activation="softmax"),
    ])


class MixInStep(keras.Model):
    """Wraps a model; `train_step` mixes the unmixed pairs of `stream_dataset(mix=False)`."""

    def __init__(self, inner: keras.Model, **mix: object):
        super().__init__()
        self.inner, self.mix = inner, mix

    def call(self, images, training=False):  # noqa: ANN001, ANN201
        return self.inner(images, training=training)

    def train_step(self, pairs):  # noqa: ANN001, ANN201
        out = softmix_tf.softmix(pairs["image_a"], pairs["image_b"], pairs["label_a"],
                                 pairs["label_b"], pairs["seed"], **self.mix)
        original = pairs["mix_index"] < 0  # keep_originals: never mixed
        images = tf.where(original[:, None, None, None], pairs["image_a"], out.images)
        labels = tf.where(original[:, None], pairs["label_a"], out.labels)
        with tf.GradientTape() as tape:
            predictions = self(images, training=True)
            loss = self.compute_loss(y=labels, y_pred=predictions)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables, strict=True))
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
        return {m.name: m.result() for m in self.metrics}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest", help="slide manifest, e.g. demo/manifest.csv")
    parser.add_argument("--steps", type=int, default=8, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as cache:  # plans and tile packs, shared by both runs
        # 1. Mixed in tf.data; endless epochs (epoch=None), each a new pairing.
        stream = pipeline.stream_dataset(args.manifest, cache_dir=cache, shuffle=256,
                                         **OPTIONS)
        num_classes = int(stream.element_spec[1].shape[-1])
        model = small_model(num_classes, OPTIONS["tile_size"])
        model.compile(optimizer="adam", loss="categorical_crossentropy")
        model.fit(stream.batch(args.batch_size), steps_per_epoch=args.steps, epochs=1)
        print("stream:", pipeline.dataset_stats(stream))

        # 2. Unmixed pairs; the SoftMix op runs inside the model's train step.
        pairs = pipeline.stream_dataset(args.manifest, cache_dir=cache, shuffle=256,
                                        mix=False, **OPTIONS)
        mixer = MixInStep(small_model(num_classes, OPTIONS["tile_size"]),
                          grid=OPTIONS["grid"], softness=OPTIONS["softness"],
                          alpha=OPTIONS["alpha"])
        mixer.compile(optimizer="adam", loss="categorical_crossentropy")
        mixer.fit(pairs.batch(args.batch_size), steps_per_epoch=args.steps, epochs=1)
        print("pairs: ", pipeline.dataset_stats(pairs))


if __name__ == "__main__":
    main()
