"""Benchmark stain normalisation (`softmix_tf.stain.normalize`) against torchstain (NumPy).

Run: `.venv/bin/python benchmarks/bench_stain.py [--quick] [--batch 64] [--size 256]`.

Tiles are random crops with tissue of CMU-1-Small-Region (the H&E demo slide, from
.cache/wheels) or, without it, of scikit-image's IHC sample. Each round calls every case
once on the same batch (interleaved, after a warm-up that also compiles), so machine load
hits all cases alike. Cases, per method (Reinhard, Macenko):

- `fit + normalize, XLA`: `stain.normalize(tiles, method=...)` under
  `tf.function(jit_compile=True)`; fits each tile itself, as torchstain's `normalize` does.
- `fit (fit_stride=4) + normalize, XLA`: the same, fitting on every 4th pixel.
- `normalize given fits, XLA`: the same with the tiles' fits passed in (the pipeline's
  case: fits come once per slide).
- `torchstain numpy`: torchstain 1.4.1's NumPy normaliser, one `normalize` per tile
  (Macenko with `stains=False`), target fitted beforehand.

Prints ms/batch, images/s and the speed-up over torchstain (target >= 10x on CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from softmix_tf import stain  # noqa: E402


def _tiles(batch: int, size: int) -> tuple[np.ndarray, str]:
    from pipeline.tools.demo import find_he_source, load_he_image

    source = find_he_source()
    if source is not None:
        image, name = load_he_image(source), "CMU-1-Small-Region (H&E)"
    else:
        from skimage import data

        image, name = data.immunohistochemistry(), "skimage IHC"
    rng = np.random.default_rng(0)
    tiles = []
    while len(tiles) < batch:
        y = rng.integers(0, image.shape[0] - size + 1)
        x = rng.integers(0, image.shape[1] - size + 1)
        tile = image[y : y + size, x : x + size]
        od = -np.log((tile.astype(np.float64) + 1.0) / stain.IO)
        if np.all(od >= stain.BETA, axis=-1).mean() >= 0.5:  # torchstain needs tissue
            tiles.append(tile)
    return np.stack(tiles), name


def _time_interleaved(cases, iters: int) -> dict[str, float]:
    """Median ms per call of each `(name, fn)`, calls interleaved round by round."""
    for _, fn in cases:
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in cases}
    for _ in range(iters):
        for name, fn in cases:
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _cases(method: str, tiles: np.ndarray, target_image: np.ndarray):
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

    batch = tf.constant(tiles)
    target = stain.fit_tissue(target_image, method=method)
    fits = stain.fit_tissue(batch, method=method, per_image=True)
    fit_and_normalize = tf.function(
        lambda x: stain.normalize(x, target=target, method=method), jit_compile=True
    )
    strided = tf.function(
        lambda x: stain.normalize(x, target=target, method=method, fit_stride=4),
        jit_compile=True,
    )
    given = tf.function(lambda x, s: stain.normalize(x, s, target), jit_compile=True)
    if method == "macenko":
        reference = NumpyMacenkoNormalizer()
        reference.fit(target_image)

        def torchstain_batch():
            return [reference.normalize(t, stains=False)[0] for t in tiles]
    else:
        reference = NumpyReinhardNormalizer()
        reference.fit(target_image)

        def torchstain_batch():
            return [reference.normalize(t) for t in tiles]

    return [
        (f"{method}: fit + normalize, XLA", lambda: fit_and_normalize(batch).numpy()),
        (f"{method}: fit (fit_stride=4) + normalize, XLA", lambda: strided(batch).numpy()),
        (f"{method}: normalize given fits, XLA", lambda: given(batch, fits).numpy()),
        (f"{method}: torchstain numpy", torchstain_batch),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    iters = 3 if args.quick else 7
    tiles, name = _tiles(args.batch, args.size)
    target_image = tiles[0]
    devices = [d.device_type for d in tf.config.list_physical_devices()]
    print(
        f"TensorFlow {tf.__version__}, devices {devices}, {os.cpu_count()} CPUs, tiles of "
        f"{name}: batch {args.batch}x{args.size}x{args.size}x3 uint8, median of {iters} "
        "interleaved rounds\n"
    )
    cases = _cases("reinhard", tiles, target_image) + _cases("macenko", tiles, target_image)
    times = _time_interleaved(cases, iters)
    print("| case | ms/batch | images/s | x torchstain |")
    print("|---|---:|---:|---:|")
    for case, ms in times.items():
        method = case.split(":")[0]
        base = times[f"{method}: torchstain numpy"]
        print(f"| {case} | {ms:.1f} | {args.batch / ms * 1e3:.0f} | {base / ms:.1f} |")


if __name__ == "__main__":
    main()
