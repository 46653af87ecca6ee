"""Open scanner whole-slide files (SVS, NDPI, OME-TIFF, tiled TIFF) as `Slide` objects.

Every TIFF-family slide is already a chunked array: tifffile's Zarr store
(`tifffile.TiffPageSeries.aszarr`) serves the file's own tiles (or strips, for
untiled TIFFs) as Zarr chunks, decoded with imagecodecs (JPEG, JPEG 2000, LZW,
deflate...). So a slide opened here reads, packs and accounts exactly like an OME-Zarr
slide: only the tiles a region touches are read, through `store.CountingStore`, which
records each tile's size *in the file* (what was fetched), not its decoded size.

Levels come from the baseline series' pyramid (``series[0].levels``); label, macro and
thumbnail images are other series and never become tiles. The pixel size in
micrometres comes from the vendor metadata: Aperio's ``MPP`` in the ImageDescription,
OME-XML ``PhysicalSizeX/Y`` (with their units), else the TIFF ``XResolution`` /
``YResolution`` tags when ``ResolutionUnit`` is centimetre or inch (NDPI and most
generic writers). A file without any of these opens with ``mpp`` None: it works by
level index, and asking for an ``mpp`` fails that slide (``no_units``).
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Mapping
from typing import Any

from ..errors import SlideError

__all__ = ["TIFF_SUFFIXES", "file_stamp", "is_tiff_path", "open_tiff_slide", "tiff_pixel_size"]

# .ome.tif / .ome.tiff end in .tif / .tiff.
TIFF_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff")
_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_AXIS_NAMES = {"Y": "y", "X": "x", "S": "c", "C": "c", "Z": "z", "T": "t"}
_UM_PER_RESOLUTION_UNIT = {2: 25400.0, 3: 10000.0}  # inch, centimetre


def is_tiff_path(path: str) -> bool:
    """Whether `path` names a TIFF-family slide (by its suffix, case-insensitive).

    >>> is_tiff_path("s3://b/CMU-1.svs"), is_tiff_path("a.ome.tiff"), is_tiff_path("a.ome.zarr")
    (True, True, False)
    """
    return str(path).rstrip("/").lower().endswith(TIFF_SUFFIXES)


def file_stamp(path: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"size", "mtime"}`` of a slide file: what a resumed run checks it against.

    A TIFF slide is one file, so a changed file shows in its size or modification
    time (an OME-Zarr slide is a tree of objects and is identified by its path).
    """
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(os.path.expanduser(path), **dict(storage_options or {}))
    info = fs.info(fs_path)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get(
        "created")
    return {"size": int(info.get("size") or 0), "mtime": str(mtime)}


class _Warnings(logging.Handler):
    """Collects what tifffile logs while a file is parsed (it logs, not raises, on a
    truncated or corrupt IFD chain, and opens what it could read)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _um(value: Any, unit: Any) -> float | None:
    from .slides import unit_to_micrometer

    try:
        size = float(value)
    except (TypeError, ValueError):
        return None
    factor = unit_to_micrometer(str(unit) if unit else "micrometer")
    if factor is None or not size > 0:
        return None
    return size * factor


def tiff_pixel_size(tif: Any) -> tuple[float, float] | None:
    """(y, x) micrometres per pixel of the baseline image of `tif`, or None.

    Looks at, in order: OME-XML ``PhysicalSizeY/X`` (+ units, default micrometre),
    Aperio's ``MPP`` in the ImageDescription, then ``Y/XResolution`` with a
    ``ResolutionUnit`` of inch or centimetre.
    """
    import tifffile

    page = tif.series[0].levels[0].keyframe
    if tif.is_ome and tif.ome_metadata:
        try:
            image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
            y = _um(pixels.get("PhysicalSizeY"), pixels.get("PhysicalSizeYUnit"))
            x = _um(pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit"))
            if y is not None and x is not None:
                return y, x
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    if tif.is_svs:
        from tifffile.tifffile import svs_description_metadata

        try:
            mpp = float(svs_description_metadata(tif.pages.first.description)["MPP"])
            if mpp > 0:
                return mpp, mpp
        except (KeyError, TypeError, ValueError):
            pass
    tags = page.tags
    unit = tags.valueof("ResolutionUnit")
    factor = _UM_PER_RESOLUTION_UNIT.get(int(unit)) if unit is not None else None
    xres, yres = tags.valueof("XResolution"), tags.valueof("YResolution")
    if factor is None or not xres or not yres:
        return None
    try:
        per_unit_x = xres[0] / xres[1] if isinstance(xres, tuple) else float(xres)
        per_unit_y = yres[0] / yres[1] if isinstance(yres, tuple) else float(yres)
    except (ZeroDivisionError, TypeError, IndexError):
        return None
    if not per_unit_x > 0 or not per_unit_y > 0:
        return None
    return factor / per_unit_y, factor / per_unit_x


def _open_file(path: str, slide_id: str, storage_options: Mapping[str, Any] | None
               ) -> tuple[Any, int]:
    """A seekable binary file for `path` (fsspec for URLs) and its size."""
    from .slides import _is_url

    try:
        if _is_url(path):
            import fsspec

            handle = fsspec.open(path, "rb", **dict(storage_options or {})).open()
            size = int(handle.size)
        else:
            handle = open(path, "rb")  # noqa: SIM115 - kept open by the slide's store
            size = os.fstat(handle.fileno()).st_size
    except (OSError, ValueError) as err:
        raise SlideError(slide_id, "missing", f"cannot open {path}: {err}. Check the path "
                         "in the manifest (and storage_options for URLs).") from err
    return handle, size


def _check_extent(tif: Any, series: Any, size: int, warnings: list[str], slide_id: str,
                  path: str) -> None:
    past_end = 0
    for level in series.levels:
        for page in level.pages:
            if page is None:
                continue
            ends = [o + b for o, b in zip(page.dataoffsets, page.databytecounts, strict=True)
                    if o and b]
            past_end = max([past_end, *ends])
    offsets = [int(n) for text in warnings for n in re.findall(r"(?:@|offset )(\d+)", text)]
    if past_end > size or any(o >= size for o in offsets):
        where = max([past_end, *offsets])
        raise SlideError(
            slide_id, "truncated",
            f"{path} is a TIFF of {size} bytes but its structure points at byte {where}: the "
            "file is truncated (an interrupted copy or upload?). Copy it again from the "
            "scanner's output.")
    if warnings:
        raise SlideError(
            slide_id, "bad_tiff",
            f"{path} is a damaged TIFF: {'; '.join(warnings[:3])}. Copy it again or "
            "re-export it from the scanner software.")


def _axes(level: Any, slide_id: str, path: str) -> tuple[str, ...]:
    names = []
    for letter, size in zip(level.axes, level.shape, strict=True):
        name = _AXIS_NAMES.get(letter)
        if name is None or (name in ("t", "z") and size != 1) or name in names:
            raise SlideError(
                slide_id, "unsupported_axes",
                f"the baseline image of {path} has axes {level.axes!r} and shape {level.shape}; "
                "only Y, X and one channel/sample axis (C or S) are supported. Export one "
                "2-D (optionally multichannel) image per file.")
        names.append(name)
    return tuple(names)


def open_tiff_slide(path: str, *, slide_id: str | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> Any:
    """Open an SVS / NDPI / OME-TIFF / (tiled or striped) TIFF file as a `Slide`.

    Args:
        path: local path or fsspec URL of the file.
        slide_id: id for errors and tile keys; defaults to the path.
        storage_options: fsspec options for URLs.

    Returns:
        A `slides.Slide` whose levels are the baseline pyramid, read through the file's
        own tiles; ``read_stats`` counts tiles and their bytes in the file.

    Raises:
        SlideError: ``missing``, ``not_tiff`` (no TIFF header), ``truncated`` (the file
            ends before its data or directories), ``bad_tiff`` (other damage),
            ``unsupported_axes``.
    """
    import tifffile
    import zarr

    from .slides import Slide
    from .store import CountingStore

    path = str(path)
    slide_id = slide_id if slide_id is not None else path
    handle, size = _open_file(path, slide_id, storage_options)
    try:
        head = handle.read(4)
        handle.seek(0)
        if head not in _MAGIC:
            raise SlideError(
                slide_id, "not_tiff",
                f"{path} is named like a TIFF slide but does not start with a TIFF header "
                f"(first bytes {head!r}). Check that the file is the scanner's .svs/.ndpi/"
                ".tif and not an HTML error page or a partial download.")
        collected = _Warnings()
        logger = logging.getLogger("tifffile")
        logger.addHandler(collected)
        try:
            tif = tifffile.TiffFile(handle, name=os.path.basename(path))
            series = tif.series[0] if tif.series else None
            pages = len(tif.pages)  # walks the whole IFD chain: finds a cut-off one
        except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError,
                struct.error) as err:
            raise SlideError(
                slide_id, "truncated" if "offset" in str(err) else "bad_tiff",
                f"{path} cannot be parsed as a TIFF ({type(err).__name__}: {err}). The "
                "file is truncated or damaged; copy it again from the scanner's output."
            ) from err
        finally:
            logger.removeHandler(collected)
        if series is None or not pages:
            raise SlideError(slide_id, "bad_tiff", f"{path} holds no image. Check the file.")
        _check_extent(tif, series, size, collected.messages, slide_id, path)
        axes = _axes(series.levels[0], slide_id, path)
        store = CountingStore(series.aszarr(multiscales=True), measure=_file_bytes)
        group = zarr.open_group(store=store, mode="r", zarr_format=2)
        arrays = [group[str(i)] for i in range(len(series.levels))]
    except SlideError:
        handle.close()
        raise
    except Exception as err:  # tifffile/zarr raise many types on odd files
        handle.close()
        raise SlideError(
            slide_id, "bad_tiff",
            f"{path} could not be opened as a TIFF slide ({type(err).__name__}: {err}). "
            "Re-export it, or convert it with another tool to OME-Zarr.") from err
    mpp = tiff_pixel_size(tif)
    y, x = axes.index("y"), axes.index("x")
    base = arrays[0].shape
    scales: list[tuple[float, float] | None] = [
        None if mpp is None else (mpp[0] * (base[y] / a.shape[y]), mpp[1] * (base[x] / a.shape[x]))
        for a in arrays]
    attributes = {"tiff": {"format": sorted(tif.flags), "series": series.name,
                           "mpp": list(mpp) if mpp else None}}
    slide = Slide(slide_id, path, arrays, axes, scales, attributes=attributes)
    slide.read_stats = store.stats
    slide.chunks_listable = False  # every tile of the file's pyramid exists
    slide._tiff = tif  # keeps the file open as long as the slide
    return slide


def _file_bytes(store: Any, key: str, decoded: int) -> int:
    """Bytes of chunk `key` in the TIFF file (the compressed tile or strip)."""
    try:
        _, page, _, offset, bytecount = store._parse_key(key)  # tifffile's own key map
    except Exception:  # noqa: BLE001 - metadata keys and odd layouts: count what came back
        return decoded
    if page is None or not offset or bytecount is None:
        return decoded
    return int(bytecount)
