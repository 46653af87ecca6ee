"""Hypothesis strategies shared by the tests (kept small so the suite stays fast)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

IMAGE_DTYPES = ("uint8", "uint16", "float16", "float32")

seeds_64 = st.integers(min_value=0, max_value=2**63 - 1)
softness = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
alphas = st.sampled_from([0.1, 0.5, 1.0, 2.0, 8.0])
ramps = st.sampled_from(["cosine", "linear"])


@st.composite
def image_sizes(draw, max_side: int = 24) -> tuple[int, int]:
    return (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))


@st.composite
def grids_for(draw, image_size: tuple[int, int], max_cells: int = 8) -> tuple[int, int]:
    return (
        draw(st.integers(1, min(max_cells, image_size[0]))),
        draw(st.integers(1, min(max_cells, image_size[1]))),
    )


@st.composite
def seed_arrays(draw, batch: int) -> np.ndarray:
    return np.array([[draw(seeds_64), draw(seeds_64)] for _ in range(batch)], dtype=np.int64)


@st.composite
def mix_cases(draw) -> dict:
    """A small random mixing problem: two image batches, labels, seeds and parameters."""
    batch = draw(st.integers(1, 3))
    size = draw(image_sizes(max_side=16))
    grid = draw(grids_for(size))
    channels = draw(st.sampled_from([1, 3]))
    dtype = draw(st.sampled_from(IMAGE_DTYPES))
    data_seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(data_seed)
    shape = (batch, *size, channels)
    if dtype in ("uint8", "uint16"):
        high = np.iinfo(dtype).max
        a = rng.integers(0, high, shape, endpoint=True).astype(dtype)
        b = rng.integers(0, high, shape, endpoint=True).astype(dtype)
    else:
        scale = draw(st.sampled_from([1.0, 1000.0]))
        a = (rng.standard_normal(shape) * scale).astype(dtype)
        b = (rng.standard_normal(shape) * scale).astype(dtype)
    num_classes = 3
    labels_a = rng.dirichlet(np.ones(num_classes), batch).astype(np.float32)
    labels_b = rng.dirichlet(np.ones(num_classes), batch).astype(np.float32)
    return dict(
        images_a=a,
        images_b=b,
        labels_a=labels_a,
        labels_b=labels_b,
        seeds=draw(seed_arrays(batch)),
        grid=grid,
        alpha=draw(alphas),
        softness=draw(softness),
        ramp=draw(ramps),
    )
