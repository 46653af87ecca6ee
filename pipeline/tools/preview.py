"""`softmix preview OUT`: a PNG contact sheet of mixed examples, their masks and labels.

Masks are not stored in the records; they are recomputed from each record's `seed` and
the run's parameters (`manifest.json`) with `softmix_tf.softmix_mask`, which is the mask
the job applied (examples left unmixed by `mix_prob`, and originals, have `lam == 0` and
an empty mask).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["write_preview"]

_CAPTION = 34


def _to_rgb8(image: np.ndarray) -> np.ndarray:
    """Display form of a tile: RGB uint8 (first 3 channels, or grey for 1-2 channels)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        lo, hi = float(np.min(image)), float(np.max(image))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = ((image.astype(np.float64) - lo) * scale).round().astype(np.uint8)
    if image.shape[-1] >= 3:
        return image[..., :3]
    return np.repeat(image[..., :1], 3, axis=-1)


def _stain_row(manifest: dict[str, Any], records: list[dict[str, Any]]
               ) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(raw `a` tile read from its slide, its normalised version, caption) per record."""
    import json

    from ..errors import PipelineError
    from ..io.manifest import load_slide_manifest
    from ..io.slides import open_slide, read_tile
    from ..records import TileKey
    from ..steps.stain import TileTransform

    stain = manifest.get("stain")
    if not stain:
        raise PipelineError(
            "--stain: this run did not normalise stains (no 'stain' in its manifest.json). "
            "Preview it without --stain, or rerun the job with --stain-norm macenko|reinhard.")
    params = manifest["params"]
    slides = {r.slide_id: r for r in load_slide_manifest(
        params["manifest"], class_names=manifest["class_names"]).slides}
    size = int(params["tile"]["tile_size"])
    out = []
    for record in records:
        sid = record["a/slide_id"]
        sid = sid.decode() if isinstance(sid, bytes) else sid
        if sid not in slides or sid not in stain["fits"]:
            continue
        row = slides[sid]
        slide = open_slide(row.path, slide_id=sid, axes=row.metadata_dict.get("axes") or None)
        raw = read_tile(slide, TileKey(sid, int(record["a/level"]), int(record["a/x"]),
                                       int(record["a/y"])), size)
        transform = TileTransform(stain["method"], json.dumps(stain["fits"][sid]),
                                  json.dumps(stain["target"]))
        out.append((raw, transform(raw), f"{sid}: raw | {stain['method']}"))
    return out


def write_preview(out_dir: str, *, output: str | None = None, num_examples: int = 16,
                  tile_px: int = 160, stain: bool = False) -> str:
    """Write a contact sheet of the first `num_examples` records of a finished run.

    Each cell shows the mixed tile, its mask (white = from source b) and a caption with
    `lam`, the soft label and both sources. With `stain` (a run with ``--stain-norm``),
    a last row shows, for the first examples, the raw source tile `a` read from its
    slide next to its stain-normalised version (what the job mixed).

    Args:
        out_dir: output directory of a finished run (holds `manifest.json`).
        output: PNG path; default `OUT/preview.png`.
        num_examples: how many records to show.
        tile_px: display size of each tile.

    Returns:
        The PNG path.

    Raises:
        PipelineError: an unfinished run, a run with no example, or `num_examples` < 1.
    """
    from PIL import Image, ImageDraw

    from ..run.output import read_manifest

    manifest = read_manifest(out_dir)
    params: dict[str, Any] = manifest["params"]
    mix = params["mix"]
    class_names = manifest["class_names"]
    records = _preview_records(out_dir, manifest, num_examples)

    cols = min(4, len(records))
    rows = (len(records) + cols - 1) // cols
    stained = _stain_row(manifest, records[:cols]) if stain else []
    rows += 1 if stained else 0
    cell_w, cell_h = 2 * tile_px + 8, tile_px + _CAPTION + 8
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    masks = _masks_of(records, mix)
    for i, (record, mask) in enumerate(zip(records, masks, strict=True)):
        image = record["image"]
        mask_rgb = np.repeat((mask * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
        x0, y0 = (i % cols) * cell_w, (i // cols) * cell_h
        for j, part in enumerate((_to_rgb8(image), mask_rgb)):
            tile = Image.fromarray(part).resize((tile_px, tile_px), Image.NEAREST)
            sheet.paste(tile, (x0 + j * (tile_px + 4), y0))
        label = ", ".join(f"{n} {v:.2f}" for n, v in zip(class_names, record["label"], strict=True))
        a, b = record["a/slide_id"], record["b/slide_id"]
        a = a.decode() if isinstance(a, bytes) else a
        b = b.decode() if isinstance(b, bytes) else b
        draw.text((x0, y0 + tile_px + 2), f"lam {record['lam']:.3f} | {label}", fill="black")
        draw.text((x0, y0 + tile_px + 16), f"a {a} | b {b}", fill="black")
    for i, (raw, normalised, caption) in enumerate(stained):
        x0, y0 = i * cell_w, (rows - 1) * cell_h
        for j, part in enumerate((_to_rgb8(raw), _to_rgb8(normalised))):
            tile = Image.fromarray(part).resize((tile_px, tile_px), Image.NEAREST)
            sheet.paste(tile, (x0 + j * (tile_px + 4), y0))
        draw.text((x0, y0 + tile_px + 2), caption, fill="black")
    import io

    from ..io import storage

    path = output or posixpath.join(out_dir, "preview.png")
    buffer = io.BytesIO()
    ext = os.path.splitext(path)[1].lower()
    sheet.save(buffer, format=Image.registered_extensions().get(ext, "PNG"))
    storage.write_bytes(path, buffer.getvalue())
    return path


def _preview_records(out_dir: str, manifest: Mapping[str, Any], num_examples: int
                     ) -> list[dict[str, Any]]:
    """The first `num_examples` records of a fixed-seed shuffle of the run's shards,
    decoded.

    Raises:
        PipelineError: `num_examples` < 1, or a run with no example.
    """
    from ..dataset.reader import records_dataset
    from ..dataset.schema import decode_example
    from ..errors import PipelineError

    params = manifest["params"]
    compression = params.get("compression")
    files = [posixpath.join(out_dir, shard["file"]) for shard in manifest["shards"]]
    dataset = records_dataset(files, compression or "")
    # A fixed-seed shuffle shows a spread of anchors, not only the first slide's tiles.
    dataset = dataset.shuffle(1024, seed=0)
    if num_examples < 1:
        raise PipelineError(f"`num_examples` must be >= 1. Received: num_examples={num_examples}")
    if not any(shard["num_examples"] for shard in manifest["shards"]):
        raise PipelineError(
            f"No examples to preview in {out_dir!r}: the run wrote 0 examples (see the "
            "accounting in its manifest.json). Rerun the job with --overwrite once its "
            "inputs or options are fixed."
        )
    records = [decode_example(raw.numpy()) for raw in dataset.take(num_examples)]
    return records


def _masks_of(records: Sequence[Mapping[str, Any]], mix: Mapping[str, Any]
              ) -> list[np.ndarray]:
    """Each example's mixing mask (1 = from source b), drawn again from its seed (one
    `softmix_mask` call per tile shape: per-example seeds make a batch's masks those of
    single calls); zeros for an unmixed example."""
    import softmix_tf

    masks = [np.zeros(r["image"].shape[:2], np.float32) for r in records]
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, record in enumerate(records):
        if record["lam"] > 0:
            by_shape.setdefault(tuple(record["image"].shape[:2]), []).append(i)
    for shape, indices in by_shape.items():
        drawn = softmix_tf.softmix_mask(
            np.stack([np.asarray(records[i]["seed"], np.int64) for i in indices]), shape,
            grid=tuple(mix["grid"]), alpha=mix["alpha"], softness=mix["softness"],
            ramp=mix["ramp"],
        ).numpy()
        for i, mask in zip(indices, drawn, strict=True):
            masks[i] = mask
    return masks
