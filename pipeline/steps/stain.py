"""Stain normalisation in the offline job and the stream (SPEC section 4c).

With ``--stain-norm macenko|reinhard`` every tile is normalised before it is packed
(so before any mixing), by `softmix_tf.stain`:

- **Source fit, once per slide** (`fit_slide`), at planning (`plan._plan`): on a
  tissue-weighted, fixed sample (`sample_fit_tiles`, ``stain_fit_tiles`` of them) of the
  slide's kept tiles, read at the level tiles are cut from, i.e. on the pixels the fit is
  applied to (a fit of a downsampled level has lower concentration percentiles and
  darkens the tiles). Kept in its `SlidePlan` as JSON (``fit.to_dict()``), in the plan
  sidecar (resumed runs keep it) and in the output's ``manifest.json`` (``"stain":
  {"method", "target", "target_source", "fits"}``). A slide whose fit fails (too little
  tissue, not RGB uint8, a fit that is not finite and in range) fails with reason
  ``stain_fit``; a slide without kept tiles has no fit.
- **Target** (`resolve_stain`, on the client before any work): ``builtin`` is
  `builtin_reference(method)`; a slide id of the manifest is that slide's fit, known
  once it is planned (`StainSpec.with_slide_fit`: a Beam singleton side input, a Dask
  future of that one plan); a path is a fit JSON loaded and checked (finite, in range)
  up front.
- **Applying** (`TileTransform`, passed to `pack_task` as its ``transform``):
  ``normalize(tile[None], source, target, method)`` through one traced, XLA-compiled
  `tf.function` per process and method (uint8 in, uint8 out). Every engine and the stream use this
  same function on the same fits, so their tiles, and outputs, are byte-identical.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import PipelineError, SlideError

__all__ = ["StainSpec", "TileTransform", "fit_slide", "resolve_stain", "sample_fit_tiles",
           "strip_transform"]

_SHAPES = {"macenko": ([3, 2], [2]), "reinhard": ([3], [3])}
_FIX = ("Pass --stain-target builtin, a slide_id of the manifest, or the path of a fit JSON "
        "(json.dump(fit.to_dict(), f) of a softmix_tf.stain fit).")


def _dumps(fit_dict: dict[str, Any]) -> str:
    return json.dumps(fit_dict, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class StainSpec:
    """The run's stain normalisation: method and (resolved) target.

    Attributes:
        method: "macenko" or "reinhard".
        kind: "builtin", "slide" or "path": where the target comes from.
        source: the ``--stain-target`` value ("builtin", the slide id or the path);
            the manifest's ``target_source``.
        target: JSON of the target fit; None for a slide target until its plan is known.
    """

    method: str
    kind: str
    source: str
    target: str | None = None

    def with_slide_fit(self, plans: Iterable[Any]) -> StainSpec:
        """This spec with the target slide's fit, from its plan (the only one passed)."""
        if self.target is not None:
            return self
        found = [p for p in plans if p.slide_id == self.source]
        plan = found[0] if found else None
        if plan is None or plan.stain_fit is None:
            why = ("it was not planned" if plan is None else
                   f"it failed ({plan.failure}: {plan.message})" if plan.failure else
                   "it has no stain fit")
            raise PipelineError(
                f"--stain-target {self.source!r}: that slide has no {self.method} stain fit to "
                f"normalise toward: {why}. Choose a slide with enough tissue, or another "
                "target. " + _FIX)
        return dataclasses.replace(self, target=plan.stain_fit)

    def manifest_section(self, fits: dict[str, str]) -> dict[str, Any]:
        """The manifest's ``"stain"`` entry: method, target fit, its source, per-slide fits."""
        return {
            "method": self.method,
            "target": json.loads(self.target) if self.target is not None else None,
            "target_source": self.source,
            "fits": {sid: json.loads(fits[sid]) for sid in sorted(fits)},
        }


def resolve_stain(stain_norm: str, stain_target: str,
                  slide_ids: Sequence[str]) -> StainSpec | None:
    """The run's `StainSpec` (None without normalisation), checked before any work.

    Raises:
        PipelineError: `stain_target` is neither "builtin", a slide id of the manifest
            nor a readable fit JSON of method `stain_norm`.
    """
    if stain_norm == "none":
        return None
    from softmix_tf import stain

    if stain_target == "builtin":
        return StainSpec(stain_norm, "builtin", "builtin",
                         _dumps(stain.builtin_reference(stain_norm).to_dict()))
    if stain_target in set(slide_ids):
        return StainSpec(stain_norm, "slide", stain_target)
    from ..io import storage

    if not storage.exists(stain_target) or storage.isdir(stain_target):
        shown = ", ".join(repr(s) for s in list(slide_ids)[:3])
        raise PipelineError(
            f"--stain-target {stain_target!r} is neither 'builtin', a slide_id of the "
            f"manifest ({len(slide_ids)} slides, e.g. {shown}) nor an existing fit JSON "
            f"file. {_FIX}")
    try:
        data = storage.read_json(stain_target)
        fit = stain.fit_from_dict(data)
    except (ValueError, TypeError, OSError) as err:
        raise PipelineError(
            f"--stain-target {stain_target!r} is not a valid stain fit JSON "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else err!r}). "
            f"{_FIX}") from err
    if fit.method != stain_norm:
        raise PipelineError(
            f"--stain-target {stain_target!r} holds a {fit.method} fit, but --stain-norm is "
            f"{stain_norm}. Pass --stain-norm {fit.method}, or a {stain_norm} fit.")
    return StainSpec(stain_norm, "path", stain_target, _dumps(fit.to_dict()))


# A slide's fit looks at this many pixels at most: beyond it the sampled tiles are strided
# (every k-th pixel in raster order), so a fit costs the same whatever the tile size.
MAX_FIT_PIXELS = 1 << 22


def sample_fit_tiles(weights: np.ndarray, count: int) -> np.ndarray:
    """Indices of the tiles a slide's stain fit reads: a tissue-weighted, fixed sample.

    Systematic sampling in plan (raster) order: `count` evenly spaced points on the
    cumulative weight (each tile's tissue fraction) pick the tiles, so the sample is
    spread over the slide, a tile's chance grows with its tissue, and nothing random is
    involved (the same tiles for every run, seed and engine). All tiles when there are
    at most `count`; uniform weights when every weight is 0.

    >>> sample_fit_tiles(np.array([1.0, 0.0, 1.0, 0.5, 0.5, 1.0]), 3).tolist()
    [0, 3, 5]
    """
    weights = np.asarray(weights, np.float64).reshape(-1)
    if len(weights) <= count:
        return np.arange(len(weights))
    if not weights.sum() > 0:
        weights = np.ones_like(weights)
    cumulative = np.cumsum(weights)
    points = (np.arange(count) + 0.5) * (cumulative[-1] / count)
    picked = np.searchsorted(cumulative, points, side="right")
    return np.unique(np.minimum(picked, len(weights) - 1))


def fit_slide(slide: Any, tiles_yx: np.ndarray, weights: np.ndarray, *, level: int,
              tile_size: int, method: str, count: int) -> str | None:
    """JSON of the `method` fit of a slide: on a sample of its tiles, at their level.

    The tiles are `sample_fit_tiles` of the plan's kept tiles (`tiles_yx`, ``(y, x)`` in
    the tiled level, with their tissue fractions as `weights`), read at `level` as the
    packing step reads them, so the fit sees the pixels it will be applied to (a fit on
    a downsampled level has lower concentration percentiles and darkens the tiles).
    Background pixels are left out by the fit itself (`softmix_tf.stain`'s thresholds),
    as for the built-in target. Unreadable tiles are passed over.

    Returns:
        The fit's JSON; None when the slide keeps no tile (nothing to normalise).

    Raises:
        SlideError: reason ``stain_fit``: not RGB uint8, no sampled tile readable, too
            little tissue, or a fit that is not finite and in range.
    """
    from softmix_tf import stain

    from ..errors import TileReadError
    from ..io.slides import read_tile
    from ..records import TileKey
    from .mix import configure_tensorflow

    slide_id = slide.slide_id
    if slide.num_channels != 3 or slide.dtype != np.uint8:
        raise SlideError(
            slide_id, "stain_fit",
            f"stain normalisation needs RGB uint8 slides; level {level} is "
            f"{slide.num_channels} channel(s) of {slide.dtype}. Run slides like this one "
            "with --stain-norm none.")
    tiles_yx = np.asarray(tiles_yx, np.int64).reshape(-1, 2)
    if len(tiles_yx) == 0:
        return None
    chosen = tiles_yx[sample_fit_tiles(weights, count)]
    stride = -(-len(chosen) * tile_size * tile_size // MAX_FIT_PIXELS)
    pixels, failed = [], []
    for y, x in chosen.tolist():
        try:
            tile = read_tile(slide, TileKey(slide_id, level, x, y), tile_size)
        except TileReadError as err:
            failed.append(str(err))
            continue
        pixels.append(np.ascontiguousarray(tile).reshape(-1, 3)[::stride])
    where = f"{len(chosen)} tile(s) of level {level} sampled for the fit"
    if not pixels:
        raise SlideError(
            slide_id, "stain_fit",
            f"cannot read any of the {where} ({failed[0]}). Re-export the slide, or run "
            "with --stain-norm none.")
    configure_tensorflow()
    fix = ("Check the slide (blank or out of focus?), raise --stain-fit-tiles, drop the "
           "slide from the manifest, or run with --stain-norm none.")
    try:
        fit = stain.fit_tissue(np.concatenate(pixels)[None], method=method)
        stain.fit_from_dict(fit.to_dict())  # finite and in range, or a ValueError
    except ValueError as err:
        first = str(err).split(". Refit")[0].split(". Fit on")[0]
        raise SlideError(
            slide_id, "stain_fit",
            f"cannot fit a {method} stain on the tissue of the {where} ({first}). "
            f"{fix}") from err
    return _dumps(fit.to_dict())


@functools.cache
def _normalizer(method: str) -> Any:
    """The traced `normalize` of one method: one trace per process (any tile size)."""
    import tensorflow as tf

    from softmix_tf import stain

    from .mix import configure_tensorflow

    configure_tensorflow()
    fit_class = stain.MacenkoFit if method == "macenko" else stain.ReinhardFit
    first, second = (tf.TensorSpec(shape, tf.float32) for shape in _SHAPES[method])
    signature = [tf.TensorSpec([None, None, None, 3], tf.uint8), first, second, first, second]

    # XLA: 4x (Macenko) to 10x (Reinhard) faster per tile on CPU than the graph's kernels.
    @tf.function(input_signature=signature, jit_compile=True)
    def normalize(images, source_0, source_1, target_0, target_1):
        return stain.normalize(images, fit_class(source_0, source_1),
                               fit_class(target_0, target_1), method=method)

    return normalize


def _arrays(fit_json: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """A fit JSON's fields as float32 arrays, checked (finite, in range) on the way."""
    from softmix_tf import stain

    data = json.loads(fit_json)
    if not isinstance(data, dict) or data.get("method") != method:
        method_found = data.get("method") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"A {method} stain transform got a {method_found} fit.")
    fit = stain.fit_from_dict(data)
    return tuple(np.asarray(t, np.float32) for t in fit)  # type: ignore[return-value]


class TileTransform:
    """``tile -> normalised tile`` (uint8 ``[H, W, 3]``) of one slide: `pack_task`'s
    `transform`. Picklable (it holds the fits as JSON); the traced function is built
    once per process."""

    def __init__(self, method: str, source: str, target: str):
        self.method, self.source, self.target = method, source, target
        self._fits: tuple[np.ndarray, ...] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"method": self.method, "source": self.source, "target": self.target}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["method"], state["source"], state["target"])

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        return self.batch(np.asarray(tile)[None])[0]

    def batch(self, tiles: np.ndarray) -> np.ndarray:
        """Normalise uint8 ``[B, H, W, 3]`` tiles of this slide."""
        if self._fits is None:
            self._fits = (*_arrays(self.source, self.method), *_arrays(self.target, self.method))
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError("Stain normalisation needs uint8 RGB tiles. Received: "
                             f"{tiles.dtype} {tiles.shape}")
        return _normalizer(self.method)(tiles, *self._fits).numpy()


def strip_transform(task: Any, spec: StainSpec | None) -> TileTransform | None:
    """The `transform` for `pack_task` of one strip: None without normalisation."""
    if spec is None:
        return None
    if spec.target is None:
        raise RuntimeError("The stain target of a slide target must be resolved "
                           "(StainSpec.with_slide_fit) before packing.")
    if task.stain_fit is None:
        raise RuntimeError(f"Slide {task.record.slide_id!r} was planned without a stain fit; "
                           "plan it with the run's stain_norm.")
    return TileTransform(spec.method, task.stain_fit, spec.target)
