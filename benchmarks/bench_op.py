"""Benchmark the SoftMix op against Keras CutMix / MixUp and a precomputed-mask floor.

Run: `.venv/bin/python benchmarks/bench_op.py [--quick] [--batch 64] [--size 224]`.
Prints a markdown table of ms/batch and images/s per dtype, and the target ratios:
SoftMix-XLA / floor (target <= 1.2), SoftMix-tf.function / MixUp (target <= 1.0),
CutMix / SoftMix-XLA (target >= 7).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import softmix_tf  # noqa: E402


def _time_interleaved(cases, iters: int) -> list[tuple[str, float]]:
    """Median ms per call of each `(name, fn, args, iters)` case.

    Calls are interleaved round by round (one call of each case per round, after two
    warm-up calls that also trace/compile), so load changes on a shared machine hit
    every case alike and the ratios between cases stay meaningful.
    """
    for _, fn, args, _ in cases:
        for _ in range(2):
            _block(fn(*args))
    times: dict[str, list[float]] = {name: [] for name, *_ in cases}
    for round_index in range(iters):
        for name, fn, args, case_iters in cases:
            if round_index >= case_iters:
                continue
            start = time.perf_counter()
            _block(fn(*args))
            times[name].append((time.perf_counter() - start) * 1e3)
    return [(name, statistics.median(times[name])) for name, *_ in cases]


def _block(out) -> None:
    for t in tf.nest.flatten(out):
        if t is not None:
            t.numpy()


def run(dtype: str, batch: int, size: int, iters: int) -> list[tuple[str, float]]:
    rng = np.random.default_rng(0)
    if dtype == "uint8":
        a = tf.constant(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
        b = tf.constant(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    else:
        a = tf.constant(rng.random((batch, size, size, 3), dtype=np.float32))
        b = tf.constant(rng.random((batch, size, size, 3), dtype=np.float32))
    labels = tf.constant(np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch)])
    seeds = tf.constant(rng.integers(0, 2**63, (batch, 2), dtype=np.int64))
    masks = softmix_tf.softmix_mask(seeds, (size, size), grid=(4, 4))

    def op(a, b, ya, yb, seeds):
        out = softmix_tf.softmix(a, b, ya, yb, seeds, grid=(4, 4), softness=0.5)
        return out.images, out.labels

    def op_unfused(a, b, ya, yb, seeds):
        out = softmix_tf.softmix(
            a, b, ya, yb, seeds, grid=(4, 4), softness=0.5, fuse_with_xla=False
        )
        return out.images, out.labels

    def floor(a, b, m):
        af, bf = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
        return tf.cast(af + m[..., None] * (bf - af), a.dtype)

    layer = softmix_tf.SoftMix(grid=4, softness=0.5, seed=0)
    cutmix = keras.layers.CutMix(seed=0)
    mixup = keras.layers.MixUp(seed=0)

    def keras_call(lyr):
        return tf.function(lambda x, y: lyr({"images": x, "labels": y}, training=True))

    op_args = (a, b, labels, labels, seeds)
    cases = [
        ("SoftMix op, XLA", tf.function(op, jit_compile=True), op_args, iters),
        ("SoftMix op, tf.function", tf.function(op), op_args, iters),
        ("SoftMix op, tf.function, fuse_with_xla=False", tf.function(op_unfused), op_args, iters),
        (
            "SoftMix layer, XLA",
            tf.function(lambda x, y: layer({"images": x, "labels": y}), jit_compile=True),
            (a, labels),
            iters,
        ),
        ("SoftMix layer, tf.function", keras_call(layer), (a, labels), iters),
        ("keras CutMix, tf.function", keras_call(cutmix), (a, labels), max(3, iters // 3)),
        ("keras MixUp, tf.function", keras_call(mixup), (a, labels), iters),
        ("floor: a + M*(b-a), XLA", tf.function(floor, jit_compile=True), (a, b, masks), iters),
    ]
    rows = _time_interleaved(cases, iters)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    iters = 5 if args.quick else 20
    devices = [d.device_type for d in tf.config.list_physical_devices()]
    print(
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, devices {devices}, "
        f"batch {args.batch}x{args.size}x{args.size}x3, median of {iters} interleaved rounds\n"
    )
    print("| dtype | method | ms/batch | images/s |")
    print("|---|---|---:|---:|")
    ratios = []
    for dtype in ("float32", "uint8"):
        rows = run(dtype, args.batch, args.size, iters)
        for name, ms in rows:
            print(f"| {dtype} | {name} | {ms:.1f} | {args.batch / ms * 1e3:.0f} |")
        t = dict(rows)
        ratios.append(
            (
                dtype,
                t["SoftMix op, XLA"] / t["floor: a + M*(b-a), XLA"],
                t["SoftMix layer, tf.function"] / t["keras MixUp, tf.function"],
                t["keras CutMix, tf.function"] / t["SoftMix layer, XLA"],
            )
        )
    print(
        "\n| dtype | SoftMix-XLA / floor (<= 1.2) | SoftMix-tf.function / MixUp (<= 1.0) "
        "| CutMix / SoftMix-XLA (>= 7) |"
    )
    print("|---|---:|---:|---:|")
    for dtype, r1, r2, r3 in ratios:
        print(f"| {dtype} | {r1:.2f} | {r2:.2f} | {r3:.1f} |")


if __name__ == "__main__":
    main()
