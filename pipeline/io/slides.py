"""Open OME-Zarr (and plain Zarr) slides and read regions of them lazily.

A `Slide` wraps the multiscale pyramid of one image: OME-NGFF v0.4 (Zarr v2,
metadata in the group's attributes) or v0.5 (Zarr v3, metadata under
``attributes["ome"]``), or a single plain Zarr array whose axes the caller names.
Level paths, axes and pixel sizes come from the ``multiscales`` metadata; pixels
come out as ``[height, width, channels]`` whatever the stored axis order.

Only the chunks a region touches are fetched; nothing here loads a whole slide. From
a local store they are read and decoded by `chunks.ChunkReader` (numcodecs, no event
loop) when the array's codecs allow it, else through `zarr`. Every problem with a
slide raises `SlideError` with a short ``reason`` (the skip reason the run reports)
and a message saying how to fix it.
"""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from ..errors import SlideError, TileReadError
from ..records import TileKey

__all__ = ["Slide", "open_slide", "read_tile", "unit_to_micrometer"]

# Micrometres per unit, for the OME-NGFF space units (plus common spellings).
_UNIT_TO_UM: dict[str, float] = {
    "angstrom": 1e-4,
    "attometer": 1e-12,
    "centimeter": 1e4,
    "decimeter": 1e5,
    "exameter": 1e24,
    "femtometer": 1e-9,
    "foot": 304800.0,
    "gigameter": 1e15,
    "hectometer": 1e8,
    "inch": 25400.0,
    "kilometer": 1e9,
    "megameter": 1e12,
    "meter": 1e6,
    "micrometer": 1.0,
    "mile": 1.609344e9,
    "millimeter": 1e3,
    "nanometer": 1e-3,
    "parsec": 3.0857e28,
    "petameter": 1e21,
    "picometer": 1e-6,
    "terameter": 1e18,
    "yard": 914400.0,
    "yoctometer": 1e-18,
    "yottameter": 1e30,
    "zeptometer": 1e-15,
    "zettameter": 1e27,
    # Not in the spec, but seen in the wild.
    "um": 1.0,
    "µm": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "mm": 1e3,
    "m": 1e6,
}

_KNOWN_AXES = ("t", "c", "z", "y", "x")
# Refuse to load a level larger than this with `read_level` (it is meant for thumbnails).
DEFAULT_MAX_LEVEL_PIXELS = 4096 * 4096


def unit_to_micrometer(unit: str | None) -> float | None:
    """Micrometres per `unit`, or None for a missing or non-physical unit.

    >>> unit_to_micrometer("nanometer")
    0.001
    >>> unit_to_micrometer("millimeter")
    1000.0
    >>> unit_to_micrometer(None) is None
    True
    """
    if not unit:
        return None
    return _UNIT_TO_UM.get(str(unit).strip().lower())


def _is_url(path: str) -> bool:
    return "://" in path


def _parse_axes(
    raw: Any, slide_id: str, where: str
) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """Axis names and units from a caller string ("yxc") or OME-NGFF axes metadata."""
    names: list[str] = []
    units: list[str | None] = []
    if isinstance(raw, str):
        names = [a for a in raw.lower().replace(",", "") if not a.isspace()]
        units = [None] * len(names)
    elif isinstance(raw, Sequence):
        for axis in raw:
            if isinstance(axis, str):
                names.append(axis.lower())
                units.append(None)
            elif isinstance(axis, Mapping) and "name" in axis:
                name = str(axis["name"]).lower()
                if axis.get("type") == "channel":
                    name = "c"
                elif axis.get("type") == "time":
                    name = "t"
                names.append(name)
                units.append(axis.get("unit"))
            else:
                raise SlideError(
                    slide_id,
                    "bad_metadata",
                    f"axis entry {axis!r} in {where} is neither a name nor a mapping with "
                    "'name'. Fix the OME-NGFF axes metadata or pass axes='cyx'.",
                )
    else:
        raise SlideError(
            slide_id,
            "bad_metadata",
            f"axes in {where} must be a list or a string such as 'cyx'. Received: {raw!r}",
        )
    unknown = [n for n in names if n not in _KNOWN_AXES]
    if unknown or len(set(names)) != len(names) or "y" not in names or "x" not in names:
        raise SlideError(
            slide_id,
            "unsupported_axes",
            f"axes {''.join(names) or names!r} in {where} are not supported: expected 'y' and "
            "'x', optionally one 'c' and leading 't'/'z' of size 1, each at most once "
            "(e.g. 'cyx', 'yxc', 'tczyx'). Pass axes= to name them.",
        )
    return tuple(names), tuple(units)


class Slide:
    """One multiscale image, read lazily as ``[height, width, channels]`` regions.

    Build it with `open_slide`; the constructor takes already-opened Zarr arrays.

    Args:
        slide_id: id used in errors and tile keys.
        path: where the slide lives (for messages).
        arrays: one Zarr array per level, highest resolution first.
        axes: axis names of the arrays, e.g. ``("c", "y", "x")``.
        scales: per level, the (y, x) pixel size in micrometres, or None when the
            metadata carries no physical unit.
        attributes: the OME-NGFF attributes of the image group (for labels metadata).
        group: the Zarr group of the image, or None for a plain array.
    """

    def __init__(
        self,
        slide_id: str,
        path: str,
        arrays: Sequence[Any],
        axes: Sequence[str],
        scales: Sequence[tuple[float, float] | None],
        attributes: Mapping[str, Any] | None = None,
        group: Any = None,
    ):
        self.slide_id = slide_id
        self.path = path
        self.axes = tuple(axes)
        self.attributes = dict(attributes or {})
        # Whether a listing of the store names the chunks that exist (Zarr stores);
        # False for stores whose chunks are views of one file (TIFF tiles).
        self.chunks_listable = True
        self._arrays = list(arrays)
        self._scales = list(scales)
        self._group = group
        y, x = self.axes.index("y"), self.axes.index("x")
        self._shapes = [(int(a.shape[y]), int(a.shape[x])) for a in self._arrays]
        for level, array in enumerate(self._arrays):
            if array.ndim != len(self.axes):
                raise SlideError(
                    slide_id,
                    "bad_metadata",
                    f"level {level} has {array.ndim} dimensions but the axes are "
                    f"{''.join(self.axes)!r}. Fix the multiscales axes or pass axes=.",
                )
            for name in ("t", "z"):
                if name in self.axes and array.shape[self.axes.index(name)] != 1:
                    raise SlideError(
                        slide_id,
                        "unsupported_axes",
                        f"axis {name!r} has size {array.shape[self.axes.index(name)]} at level "
                        f"{level}; only size 1 is supported. Pick one plane and write it as "
                        "its own image.",
                    )
        c = self.axes.index("c") if "c" in self.axes else None
        channels = {int(a.shape[c]) if c is not None else 1 for a in self._arrays}
        if len(channels) != 1:
            raise SlideError(
                slide_id,
                "bad_metadata",
                f"levels disagree on the channel count ({sorted(channels)}). "
                "Rewrite the pyramid so every level has the same channels.",
            )
        self.num_channels = channels.pop()
        self.dtype = np.dtype(self._arrays[0].dtype)
        self.read_stats: Any = None  # a `store.ReadStats` when opened by `open_slide`
        self._readers: dict[int, Any] = {}

    def __repr__(self) -> str:
        return (
            f"Slide(slide_id={self.slide_id!r}, path={self.path!r}, levels={self._shapes}, "
            f"num_channels={self.num_channels}, dtype={self.dtype})"
        )

    @property
    def num_levels(self) -> int:
        return len(self._arrays)

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.num_levels:
            raise SlideError(
                self.slide_id,
                "level_out_of_range",
                f"level {level} does not exist: the slide has {self.num_levels} level(s) "
                f"(0..{self.num_levels - 1}). Use a level in that range.",
            )

    def level_array(self, level: int) -> Any:
        """The raw Zarr array of `level`, in its stored axis order."""
        self._check_level(level)
        return self._arrays[level]

    def level_shape(self, level: int) -> tuple[int, int]:
        """(height, width) of `level` in pixels."""
        self._check_level(level)
        return self._shapes[level]

    def chunk_shape(self, level: int) -> tuple[int, int]:
        """(height, width) of the chunks of `level` (for sharded arrays, the shards)."""
        array = self.level_array(level)
        chunks = getattr(array, "shards", None) or array.chunks
        return int(chunks[self.axes.index("y")]), int(chunks[self.axes.index("x")])

    def mpp(self, level: int) -> tuple[float, float] | None:
        """(y, x) microns per pixel of `level`, or None when the slide has no units."""
        self._check_level(level)
        return self._scales[level]

    def level_for_mpp(self, mpp: float) -> int:
        """Index of the level whose pixel size is nearest `mpp` (on a log scale).

        Raises:
            SlideError: ``"no_units"`` when the slide has no physical pixel size, or
                ``"mpp_out_of_range"`` when the nearest level is more than 2x away.
        """
        if any(s is None for s in self._scales):
            raise SlideError(
                self.slide_id,
                "no_units",
                f"cannot pick a level for mpp={mpp}: the slide's metadata has no physical "
                "pixel size (axis units / coordinateTransformations). Choose the level by "
                "index instead (level=...).",
            )
        sizes = [math.sqrt(s[0] * s[1]) for s in self._scales if s is not None]
        distances = [abs(math.log(size / mpp)) for size in sizes]
        best = int(np.argmin(distances))
        if distances[best] > math.log(2.0) + 1e-9:
            available = ", ".join(f"L{i}={size:.4g}" for i, size in enumerate(sizes))
            raise SlideError(
                self.slide_id,
                "mpp_out_of_range",
                f"no level within 2x of mpp={mpp} um/px (levels: {available} um/px). "
                "Ask for an available resolution or pick a level by index.",
            )
        return best

    def read_region(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels ``level[y:y + height, x:x + width]`` as ``[height, width, channels]``.

        Only the chunks the region touches are read. The region must lie inside the level.
        """
        h, w = self.level_shape(level)
        if width < 1 or height < 1 or x < 0 or y < 0 or x + width > w or y + height > h:
            raise SlideError(
                self.slide_id,
                "region_out_of_range",
                f"region x={x}, y={y}, width={width}, height={height} is not inside level "
                f"{level} of size (height, width)=({h}, {w}). Ask for a region inside it.",
            )
        reader = self._chunk_reader(level)
        if reader is not None:  # a local store: chunk files decoded here, not by Zarr
            out = np.empty((height, width, self.num_channels), dtype=reader.dtype)
            places = {"y": (y, 0), "x": (x, 1), "c": (0, 2)}
            starts = [places.get(name, (0, None))[0] for name in self.axes]
            targets = [places.get(name, (0, None))[1] for name in self.axes]
            reader.read_into(out if "c" in self.axes else out[..., 0], starts, targets)
            return out
        index: list[Any] = []
        for name in self.axes:
            if name == "y":
                index.append(slice(y, y + height))
            elif name == "x":
                index.append(slice(x, x + width))
            elif name == "c":
                index.append(slice(None))
            else:  # t, z: size 1
                index.append(0)
        data = np.asarray(self._arrays[level][tuple(index)])
        kept = [a for a in self.axes if a in ("c", "y", "x")]
        if kept == ["c", "y", "x"]:  # OME-Zarr's layout: interleave the channel planes,
            return np.stack(list(data), axis=-1)  # 6x faster than a transposed copy
        if "c" not in kept:
            data = data[..., np.newaxis]
            kept.append("c")
        return np.ascontiguousarray(np.transpose(data, [kept.index(a) for a in ("y", "x", "c")]))

    def _chunk_reader(self, level: int) -> Any:
        """The level's `chunks.ChunkReader` (None: read through Zarr), made on first use.
        Its reads are recorded where Zarr's would be: in the `ReadStats` of the
        `CountingStore` the array was opened through (a label image's: its slide's)."""
        if level not in self._readers:
            from .chunks import chunk_reader

            array = self._arrays[level]
            stats = getattr(array.store_path.store, "stats", None)
            self._readers[level] = chunk_reader(array, stats)
        return self._readers[level]

    def read_level(self, level: int, *, max_pixels: int = DEFAULT_MAX_LEVEL_PIXELS) -> np.ndarray:
        """A whole (small, low-resolution) level as ``[height, width, channels]``.

        Raises:
            SlideError: ``"level_too_large"`` when the level has more than `max_pixels`.
        """
        h, w = self.level_shape(level)
        if h * w > max_pixels:
            raise SlideError(
                self.slide_id,
                "level_too_large",
                f"level {level} has {h}x{w} pixels, more than max_pixels={max_pixels}; "
                "read_level is for low-resolution levels. Use a lower-resolution level "
                "(e.g. tissue_level) or read_region.",
            )
        return self.read_region(level, 0, 0, w, h)

    def label_names(self) -> tuple[str, ...]:
        """Names of the OME-NGFF label images under ``labels/`` (empty when none)."""
        if self._group is None:
            return ()
        try:
            labels = self._group["labels"]
        except (KeyError, FileNotFoundError):
            return ()
        attrs = dict(labels.attrs)
        attrs = dict(attrs.get("ome", attrs))
        return tuple(str(name) for name in attrs.get("labels", ()))

    def label_image(self, name: str | None = None) -> Slide | None:
        """The OME-NGFF label image `name` (default: the first) as a `Slide`, or None.

        Its pixels are integer label values (0 = unlabelled); its ``attributes`` hold
        the ``image-label`` metadata (``properties`` may map values to class names).

        Raises:
            SlideError: ``"missing_label_image"`` when `name` is given but absent.
        """
        names = self.label_names()
        if not names:
            if name is None:
                return None
            raise SlideError(
                self.slide_id,
                "missing_label_image",
                f"the slide has no OME-NGFF labels/ group, so label image {name!r} does "
                "not exist. Write one (ome_zarr.writer.write_labels) or turn labels off.",
            )
        chosen = names[0] if name is None else name
        if chosen not in names:
            raise SlideError(
                self.slide_id,
                "missing_label_image",
                f"label image {chosen!r} not found; the slide has {list(names)}. "
                "Use one of those names.",
            )
        group = self._group["labels"][chosen]
        return _slide_from_group(
            group,
            f"{self.slide_id}/labels/{chosen}",
            posixpath.join(self.path, "labels", chosen),
            None,
        )


def _find_multiscales(attrs: Mapping[str, Any]) -> tuple[Mapping[str, Any], Any] | None:
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and "multiscales" in ome:
        return ome, ome["multiscales"]
    if "multiscales" in attrs:
        return attrs, attrs["multiscales"]
    return None


def _scale_of(transforms: Any, ndim: int, slide_id: str, where: str) -> list[float]:
    scale = [1.0] * ndim
    if transforms is None:
        return scale
    if not isinstance(transforms, Sequence):
        raise SlideError(
            slide_id,
            "bad_metadata",
            f"coordinateTransformations of {where} must be a list. Received: {transforms!r}",
        )
    for transform in transforms:
        if isinstance(transform, Mapping) and transform.get("type") == "scale":
            values = transform.get("scale")
            if not isinstance(values, Sequence) or len(values) != ndim:
                raise SlideError(
                    slide_id,
                    "bad_metadata",
                    f"scale transformation of {where} must list {ndim} numbers, one per "
                    f"axis. Received: {values!r}. Fix the coordinateTransformations.",
                )
            scale = [a * float(b) for a, b in zip(scale, values, strict=True)]
    return scale


def _bioformats2raw_series(group: Any) -> str | None:
    """Path of the first image of a bioformats2raw layout, or None for other groups.

    bioformats2raw (the usual converter from vendor WSI formats) writes each series as
    an OME-Zarr image at ``0/``, ``1/``... under a root group marked with
    ``"bioformats2raw.layout"`` (in ``attributes["ome"]`` for NGFF 0.5), and may list
    the series paths in ``OME/``'s ``series`` attribute. The first series is the
    full-resolution slide; the others are labels, macro or overview images.
    """
    attrs = dict(group.attrs)
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), Mapping) else {}
    if "bioformats2raw.layout" not in attrs and "bioformats2raw.layout" not in ome:
        return None
    try:
        series = list(group["OME"].attrs.get("series", []))
    except (KeyError, FileNotFoundError):
        series = []
    return str(series[0]) if series else "0"


def _slide_from_group(group: Any, slide_id: str, path: str, axes: str | None) -> Slide:
    attrs = dict(group.attrs)
    found = _find_multiscales(attrs)
    if found is None:
        series = _bioformats2raw_series(group)
        if series is not None:
            try:
                image = group[series]
            except (KeyError, FileNotFoundError) as err:
                raise SlideError(
                    slide_id,
                    "bad_metadata",
                    f"{path} has a bioformats2raw layout but no image at {series!r}. "
                    "Re-run bioformats2raw, or point the manifest at the image group.",
                ) from err
            return _slide_from_group(image, slide_id, f"{path}/{series}", axes)
        raise SlideError(
            slide_id,
            "bad_metadata",
            f"{path} is a Zarr group without OME-NGFF 'multiscales' metadata. Write it "
            "as OME-Zarr (e.g. ome_zarr.writer.write_image), or point the manifest at "
            "the image array itself and pass its axes (axes='yxc').",
        )
    ome, multiscales = found
    multiscale, datasets = _first_multiscale(multiscales, slide_id, path)
    raw_axes = axes if axes is not None else multiscale.get("axes")
    if raw_axes is None:
        raise SlideError(
            slide_id,
            "bad_metadata",
            f"multiscales[0] of {path} has no 'axes' (OME-NGFF < 0.4). "
            "Pass axes= (e.g. axes='cyx').",
        )
    names, units = _parse_axes(raw_axes, slide_id, f"multiscales of {path}")
    if axes is not None and isinstance(multiscale.get("axes"), Sequence):
        _, meta_units = _parse_axes(multiscale["axes"], slide_id, f"multiscales of {path}")
        if len(meta_units) == len(names):
            units = meta_units
    ndim = len(names)
    global_scale = _scale_of(
        multiscale.get("coordinateTransformations"), ndim, slide_id, f"multiscales[0] of {path}"
    )
    arrays = []
    scales: list[tuple[float, float] | None] = []
    y, x = names.index("y"), names.index("x")
    unit_y, unit_x = unit_to_micrometer(units[y]), unit_to_micrometer(units[x])
    for i, dataset in enumerate(datasets):
        array = _level_array(group, dataset, i, slide_id, path)
        arrays.append(array)
        scale = _scale_of(
            dataset.get("coordinateTransformations"), ndim, slide_id, f"datasets[{i}] of {path}"
        )
        scale = [a * b for a, b in zip(scale, global_scale, strict=True)]
        if unit_y is None or unit_x is None:
            scales.append(None)
        else:
            scales.append((scale[y] * unit_y, scale[x] * unit_x))
    return Slide(slide_id, path, arrays, names, scales, attributes=ome, group=group)

def _first_multiscale(multiscales: Any, slide_id: str, path: str
                      ) -> tuple[Mapping[str, Any], Sequence[Any]]:
    """The first entry of OME-NGFF 'multiscales' and its 'datasets', checked."""
    if (
        not isinstance(multiscales, Sequence)
        or not multiscales
        or not isinstance(multiscales[0], Mapping)
    ):
        raise SlideError(
            slide_id,
            "bad_metadata",
            f"'multiscales' in {path} must be a non-empty list of objects. "
            f"Received: {multiscales!r}. Rewrite the OME-NGFF metadata.",
        )
    multiscale = multiscales[0]
    datasets = multiscale.get("datasets")
    if not isinstance(datasets, Sequence) or not datasets:
        raise SlideError(
            slide_id,
            "bad_metadata",
            f"multiscales[0] of {path} has no 'datasets'. Rewrite the OME-NGFF "
            "metadata with one dataset per pyramid level.",
        )
    return multiscale, datasets


def _level_array(group: Any, dataset: Any, i: int, slide_id: str, path: str) -> zarr.Array:
    """The array of pyramid level `i` (the multiscales' ``datasets[i]``), checked."""
    if not isinstance(dataset, Mapping) or not isinstance(dataset.get("path"), str):
        raise SlideError(
            slide_id,
            "bad_metadata",
            f"datasets[{i}] of {path} has no 'path'. Rewrite the OME-NGFF metadata.",
        )
    try:
        array = group[dataset["path"]]
    except (KeyError, FileNotFoundError) as err:
        raise SlideError(
            slide_id,
            "bad_metadata",
            f"level {i} path {dataset['path']!r} listed in the multiscales of {path} "
            "does not exist. Rewrite the metadata or the missing level.",
        ) from err
    if not isinstance(array, zarr.Array):
        raise SlideError(
            slide_id,
            "bad_metadata",
            f"level {i} path {dataset['path']!r} of {path} is not an array.",
        )
    return array


def _url_exists(path: str, options: Mapping[str, Any]) -> bool:
    import fsspec

    try:
        fs, fs_path = fsspec.core.url_to_fs(path, **options)
        return bool(fs.exists(fs_path))
    except (OSError, ValueError, ImportError):
        return False


def open_slide(
    path: str | os.PathLike[str] | Any,
    *,
    slide_id: str | None = None,
    axes: str | Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Slide:
    """Open an OME-Zarr multiscale image (or a plain Zarr array) as a `Slide`.

    A path ending in ``.svs``, ``.ndpi``, ``.tif`` or ``.tiff`` (``.ome.tif[f]``
    included) is a scanner file and opens through `tiff.open_tiff_slide` instead.

    Args:
        path: local path, fsspec URL (``s3://``, ``gs://``, ``memory://``...) or a
            `zarr` store object.
        slide_id: id for errors and tile keys; defaults to the path.
        axes: axis names, e.g. ``"yxc"``; required for a plain array without
            ``dimension_names``, overrides the OME-NGFF axes when given.
        storage_options: passed to fsspec for URLs (credentials, endpoint...).

    Returns:
        The opened `Slide`; no pixel has been read.

    Raises:
        SlideError: reasons ``missing``, ``not_zarr``, ``bad_metadata``,
            ``unsupported_axes`` (TIFF files also ``not_tiff``, ``truncated``, ``bad_tiff``).

    Example (needs a slide on disk, e.g. from ``softmix demo-data demo``)::

        slide = open_slide("demo/slides/demo-000-he.ome.zarr")
        slide.read_region(0, x=0, y=0, width=256, height=256).shape  # (256, 256, 3)
    """
    is_store = not isinstance(path, str | os.PathLike)
    path_str = str(path) if not is_store else repr(path)
    if not is_store:
        path_str = os.fspath(path)
    slide_id = slide_id if slide_id is not None else path_str
    if storage_options is None and not is_store and _is_url(path_str):
        from . import storage

        storage_options = storage.options_for(path_str)
    options = dict(storage_options or {})
    if not is_store:
        path_str = _located(path_str, slide_id, options)
    from .tiff import is_tiff_path, open_tiff_slide

    if not is_store and is_tiff_path(path_str):
        return open_tiff_slide(path_str, slide_id=slide_id, storage_options=options or None)
    node, counting = _open_zarr_node(path, is_store, path_str, slide_id, options)
    if isinstance(node, zarr.Array):
        slide = _slide_from_array(node, slide_id, path_str, axes)
        slide.read_stats = counting.stats
        return slide
    axes_arg = "".join(axes) if axes is not None and not isinstance(axes, str) else axes
    slide = _slide_from_group(node, slide_id, path_str, axes_arg)
    slide.read_stats = counting.stats
    return slide


def _located(path_str: str, slide_id: str, options: Mapping[str, Any]) -> str:
    """`path_str` with ``~`` expanded, after checking a local path exists and a URL's
    filesystem can be set up (no request: opening the store reads its metadata)."""
    if _is_url(path_str):
        # No existence check here (a HEAD and a LIST per open, and every strip
        # opens its slide): opening reads zarr.json anyway, and a failure is
        # looked at there (`_open_zarr_node`).
        try:
            import fsspec

            fsspec.core.url_to_fs(path_str, **options)
        except (OSError, ValueError, ImportError) as err:
            raise SlideError(
                slide_id,
                "missing",
                f"cannot reach {path_str}: {err}. Check the URL and "
                "storage_options (credentials, endpoint; --storage-options).",
            ) from err
    else:
        path_str = os.path.expanduser(path_str)
        if not os.path.exists(path_str):
            raise SlideError(
                slide_id,
                "missing",
                f"{path_str} does not exist. Check the path in the manifest "
                "(relative paths are resolved against the manifest's directory).",
            )
    return path_str


def _open_zarr_node(path: Any, is_store: bool, path_str: str, slide_id: str,
                    options: Mapping[str, Any]) -> tuple[Any, Any]:
    """The Zarr group or array at `path` (Zarr v3 tried first, then v2) and the
    `CountingStore` that counts its reads."""
    from .store import CountingStore

    try:
        if is_store:
            store = path
        elif _is_url(path_str):
            store = zarr.storage.FsspecStore.from_url(
                path_str, storage_options=options or None, read_only=True)
        else:
            store = zarr.storage.LocalStore(path_str, read_only=True)
        counting = CountingStore(store)
        try:  # Zarr v3 first: one zarr.json GET instead of probing v2 and v3 keys
            node = zarr.open(store=counting, mode="r", zarr_format=3)
        except FileNotFoundError:  # GroupNotFoundError too: a Zarr v2 store
            node = zarr.open(store=counting, mode="r", zarr_format=2)
    except (FileNotFoundError, KeyError, zarr.errors.NodeTypeValidationError) as err:
        if not is_store and _is_url(path_str) and not _url_exists(path_str, options):
            raise SlideError(
                slide_id,
                "missing",
                f"{path_str} does not exist. Check the path in the manifest "
                "(relative paths are resolved against the manifest's directory).",
            ) from err
        raise SlideError(
            slide_id,
            "not_zarr",
            f"{path_str} exists but is not a Zarr store (no zarr.json / .zgroup "
            f"/ .zarray found): {type(err).__name__}. Convert the slide to "
            "OME-Zarr, e.g. with bioformats2raw or ome_zarr.writer.",
        ) from err
    except (ValueError, TypeError, OSError) as err:
        raise SlideError(
            slide_id,
            "not_zarr",
            f"{path_str} could not be opened as Zarr ({type(err).__name__}: "
            f"{err}). Convert the slide to OME-Zarr.",
        ) from err
    return node, counting


def _slide_from_array(node: Any, slide_id: str, path_str: str,
                      axes: str | Sequence[str] | None) -> Slide:
    """A plain Zarr array as a one-level `Slide`, its axes from `axes` or the array's
    ``dimension_names``."""
    names_raw: Any = axes
    if names_raw is None:
        dimension_names = getattr(node.metadata, "dimension_names", None)
        if dimension_names and all(dimension_names):
            names_raw = list(dimension_names)
    if names_raw is None:
        raise SlideError(
            slide_id,
            "unsupported_axes",
            f"{path_str} is a plain Zarr array of shape {node.shape} without axis "
            "names. Pass axes= naming each dimension, e.g. axes='yxc' or 'cyx'.",
        )
    names, _ = _parse_axes(names_raw, slide_id, f"axes of {path_str}")
    if len(names) != node.ndim:
        raise SlideError(
            slide_id,
            "unsupported_axes",
            f"axes={''.join(names)!r} name {len(names)} dimensions but the array at "
            f"{path_str} has shape {node.shape}. Pass one axis name per dimension.",
        )
    return Slide(slide_id, path_str, [node], names, [None], attributes=dict(node.attrs))


def read_tile(slide: Slide, key: TileKey, tile_size: int) -> np.ndarray:
    """Pixels of tile `key`: ``level[y:y + tile_size, x:x + tile_size]``, ``[s, s, C]``.

    Raises:
        TileReadError: ``"read_error"`` when a chunk cannot be fetched or decoded,
            ``"nan_pixels"`` when a float slide has NaN inside the tile.
        SlideError: when the level or the region is out of range.
    """
    try:
        tile = slide.read_region(key.level, key.x, key.y, tile_size, tile_size)
    except SlideError:
        raise
    except Exception as err:  # codecs and stores raise many types; all mean "unreadable"
        raise TileReadError(
            key,
            "read_error",
            f"cannot read the tile from {slide.path} ({type(err).__name__}: {err}). "
            "A chunk is probably corrupt or unreachable; re-export the slide or skip it.",
        ) from err
    if tile.dtype.kind == "f" and np.isnan(tile).any():
        raise TileReadError(
            key,
            "nan_pixels",
            f"{int(np.isnan(tile).sum())} NaN pixel value(s) in a float slide ({slide.path}). "
            "Fill or mask NaNs in the slide, or let the run skip the tile.",
        )
    return tile
