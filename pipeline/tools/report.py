"""`softmix report OUT`: one self-contained HTML page (and a PNG per slide) of a run.

What it reads, and only that: ``OUT/manifest.json`` (the accounting, options, shards,
stain fits), ``OUT/report/tiles.json.gz`` (which tile of each slide was used or skipped,
and why: `pipeline.run.tile_record`, written by the run when it published), the shards
(a uniform sample of whole shards for the ``lam``, label and pairing plots: each shard
holds the examples whose id hashes to it), and each slide's lowest-resolution level (the
thumbnail, and its tissue mask: the run's rule, `steps.plan.tissue_mask` on the run's
tissue level, box-averaged to at most 192 px: it is drawn on pictures of 256-384 px).
``OUT`` may be any fsspec URL.

What it writes: ``OUT/report.html`` (images are base64 PNG ``data:`` URIs: no external
resource, it opens offline) and ``OUT/report/<slide>.png`` (the slide's thumbnail with
its tissue outline and tiles; file names are sanitised slide ids).

The page: the run's accounting (tiles total = used + skipped by reason, failed slides
with reason and message), read accounting, time per stage, the class histogram before
(source ``a``'s class) and after mixing (soft label mass), the ``lam`` histogram, the
pairing matrix (class of ``a`` x class of ``b``), examples per shard, the contact sheet of
`softmix preview` (`pipeline.tools.preview.write_preview`), with ``--stain-norm`` the
slides' fits next to the target, and a paged, filterable table with one row per slide
(thumbnail, label, pixel size, tiles by status, bytes read; with stain normalisation a
few of its tiles raw and normalised). Only the shown page's thumbnails are decoded by the
browser, so 1,000 slides stay quick to open.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import gzip
import hashlib
import html
import io
import json
import os
import posixpath
import re
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import PipelineError
from ..run.tile_record import REPORT_DIR, REPORT_HTML, read_tile_record

__all__ = ["STATUS_COLORS", "slide_png_name", "write_report", "write_report_or_warn"]

# RGBA overlay colour of each tile status (background: low alpha, problems: strong).
STATUS_COLORS: dict[str, tuple[int, int, int, int]] = {
    "used": (0, 170, 60, 35),
    "background": (70, 110, 200, 55),
    "no_partner": (235, 200, 0, 170),
    "read_error": (220, 0, 0, 190),
    "missing_chunk": (200, 0, 200, 190),
    "nonfinite_pixels": (255, 120, 0, 190),
    "not_packed": (60, 60, 60, 170),
    "unreadable": (120, 0, 0, 190),
}
TISSUE_OUTLINE = (0, 210, 255)
USED_OUTLINE = (0, 120, 40)
SKIP_REASONS = ("background", "read_error", "missing_chunk", "nonfinite_pixels", "no_partner")
_STATUS_CODES = {name: i + 1 for i, name in enumerate(STATUS_COLORS)}
DISPLAY_MAX = 384  # long side of a slide's PNG
DISPLAY_MIN = 256
THUMB_MAX = 200  # long side of a slide's thumbnail in the page
MASK_MAX = 192  # long side of the image the tissue outline is computed on
PAGE_SIZE = 25


def slide_png_name(slide_id: str) -> str:
    """A safe, unique file name for a slide's PNG: the id with anything but letters,
    digits, ``.``, ``_`` and ``-`` replaced, plus a short hash when it was changed.

    >>> slide_png_name("case-1")
    'case-1.png'
    >>> slide_png_name("../a b/c")
    'a_b_c-b716564e.png'
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", slide_id).strip("._")[:80]
    if safe == slide_id and safe:
        return f"{safe}.png"
    digest = hashlib.sha256(slide_id.encode()).hexdigest()[:8]
    return f"{safe or 'slide'}-{digest}.png"


# --- Reading OUT --------------------------------------------------------------------------


def _fs(path: str) -> tuple[Any, str]:
    from ..io import storage

    return storage.filesystem(path)  # with the run's storage options


def _read_manifest(fs: Any, root: str, out_dir: str) -> dict[str, Any]:
    path = posixpath.join(root, "manifest.json")
    try:
        return json.loads(fs.cat(path))
    except FileNotFoundError:
        raise PipelineError(
            f"No manifest.json in {out_dir!r}: the run that writes it has not finished "
            "(the manifest is written last), or this is not a SoftMix output directory. "
            "Point `softmix report` at a finished run's output directory."
        ) from None
    except ValueError as err:
        raise PipelineError(f"{path!r} is not valid JSON ({err}); it is not a finished "
                            "SoftMix run's manifest.") from None


def _tfrecords(handle: Any) -> Iterator[bytes]:
    """The records of a TFRecord stream (length, length CRC, data, data CRC)."""
    while True:
        header = handle.read(12)
        if not header:
            return
        if len(header) < 12:
            raise ValueError("truncated TFRecord header")
        (length,) = struct.unpack("<Q", header[:8])
        data = handle.read(length)
        if len(data) < length or len(handle.read(4)) < 4:
            raise ValueError("truncated TFRecord")
        yield data


@dataclasses.dataclass
class ShardSample:
    """What the report reads from the shards (a sample of whole shards)."""

    examples: int = 0
    shards_read: int = 0
    lam: list[float] = dataclasses.field(default_factory=list)
    label_mass: np.ndarray | None = None  # soft label sum (after mixing)
    a_class: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    pairs: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    mixed: int = 0
    error: str | None = None


def read_shard_sample(fs: Any, root: str, manifest: Mapping[str, Any],
                      max_examples: int) -> ShardSample:
    """Read whole shards, in order, until `max_examples` are read (or all of them).

    Examples go to shards by a hash of their id, so whole shards are a uniform sample.
    Fields are parsed from the `tf.train.Example` protos without decoding images.
    """
    from tensorflow.core.example import example_pb2

    num_classes = len(manifest["class_names"])
    sample = ShardSample(label_mass=np.zeros(num_classes, np.float64))
    gzip_shards = manifest.get("params", {}).get("compression") == "gzip"
    for shard in manifest.get("shards", []):
        if sample.examples >= max_examples:
            break
        if not shard.get("num_examples"):
            sample.shards_read += 1
            continue
        try:
            with fs.open(posixpath.join(root, shard["file"]), "rb", block_size=8 << 20) as raw:
                stream = gzip.GzipFile(fileobj=raw) if gzip_shards else raw
                for record in _tfrecords(stream):
                    feats = example_pb2.Example.FromString(record).features.feature
                    label = np.asarray(feats["label"].float_list.value, np.float64)
                    lam = float(feats["lam"].float_list.value[0])
                    a = int(feats["a/label"].int64_list.value[0])
                    b = int(feats["b/label"].int64_list.value[0])
                    sample.label_mass[:len(label)] += label
                    sample.lam.append(lam)
                    sample.a_class[a] += 1
                    if int(feats["mix_index"].int64_list.value[0]) >= 0:
                        sample.pairs[(a, b)] += 1
                        sample.mixed += 1
                    sample.examples += 1
        except (OSError, ValueError, KeyError, IndexError) as err:
            sample.error = f"{shard['file']}: {type(err).__name__}: {err}"
            break
        sample.shards_read += 1
    return sample


# --- Per slide ----------------------------------------------------------------------------


@dataclasses.dataclass
class SlideView:
    """One slide's row of the report."""

    slide_id: str
    label: str | None
    path: str | None
    failed: str | None = None
    message: str = ""
    level: int | None = None
    level_shape: tuple[int, int] | None = None
    mpp: tuple[float, float] | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes_read: int | None = None
    png: bytes | None = None  # the slide's PNG (also written to OUT/report/)
    thumb: bytes | None = None  # small PNG for the page
    stain_tiles: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    stain_swatch: bytes | None = None
    error: str | None = None  # why the thumbnail could not be drawn

    @property
    def tiles_total(self) -> int:
        return sum(self.counts.values())


def _png(image: Any, *, palette: int | None = None, level: int = 3) -> bytes:
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if palette:
        image = image.convert("RGB").quantize(colors=palette, method=Image.Quantize.FASTOCTREE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=level)
    return buffer.getvalue()


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, border_value=1)
    return mask & ~inner


def _status_grid(entry: Mapping[str, Any], shape: tuple[int, int], size: int, step: int
                 ) -> tuple[np.ndarray, dict[str, int], list[tuple[int, int]]]:
    """Status code per grid cell (0 = none), counts by status, used tiles' (x, y)."""
    height, width = shape
    rows = max(0, (height - size) // step + 1)
    cols = max(0, (width - size) // step + 1)
    grid = np.full((rows, cols), _STATUS_CODES["background"], np.uint8)
    counts: dict[str, int] = {}
    used: list[tuple[int, int]] = []
    kept = 0
    for status, flat in entry.get("tiles", {}).items():
        xy = np.asarray(flat, np.int64).reshape(-1, 2)
        kept += len(xy)
        counts[status] = counts.get(status, 0) + len(xy)
        code = _STATUS_CODES.get(status, _STATUS_CODES["unreadable"])
        r, c = xy[:, 1] // step, xy[:, 0] // step
        inside = (r < rows) & (c < cols)
        grid[r[inside], c[inside]] = code
        if status == "used":
            used = [(int(x), int(y)) for x, y in xy]
    counts["background"] = int(entry.get("background", 0))
    for reason, n in entry.get("plan_skipped", {}).items():
        counts[reason] = counts.get(reason, 0) + int(n)
    return grid, counts, used


def _draw_slide(view: SlideView, thumb: np.ndarray, mask: np.ndarray | None,
                entry: Mapping[str, Any] | None, size: int, step: int) -> None:
    """Fill `view.png` and `view.thumb`: thumbnail, tissue outline, tiles by status."""
    from PIL import Image, ImageDraw

    from .preview import _to_rgb8

    rgb = _to_rgb8(thumb)
    th, tw = rgb.shape[:2]
    scale = max(DISPLAY_MIN / max(th, tw), min(1.0, DISPLAY_MAX / max(th, tw)))
    dw, dh = max(1, round(tw * scale)), max(1, round(th * scale))
    image = Image.fromarray(rgb)
    if scale < 1:  # a box reduction first: much cheaper than filtering the full size
        image = image.reduce(max(1, int(1 / scale)))
    image = image.resize((dw, dh), Image.BILINEAR).convert("RGBA")
    if entry is not None and entry.get("planned") and view.level_shape is not None:
        grid, counts, used = _status_grid(entry, view.level_shape, size, step)
        view.counts = counts
        lh, lw = view.level_shape
        sx, sy = dw / lw, dh / lh  # display px per level px
        if grid.size:
            lut = np.zeros((len(_STATUS_CODES) + 1, 4), np.uint8)
            for name, code in _STATUS_CODES.items():
                lut[code] = STATUS_COLORS[name]
            cells = Image.fromarray(lut[grid], "RGBA")
            rows, cols = grid.shape
            cells = cells.resize((max(1, round(cols * step * sx)), max(1, round(rows * step * sy))),
                                 Image.NEAREST)
            layer = Image.new("RGBA", (dw, dh), (0, 0, 0, 0))
            layer.paste(cells, (0, 0))
            image = Image.alpha_composite(image, layer)
            if step * sx >= 5 and used:
                draw = ImageDraw.Draw(image)
                for x, y in used:
                    draw.rectangle([x * sx, y * sy, (x + size) * sx - 1, (y + size) * sy - 1],
                                   outline=USED_OUTLINE + (255,))
    if mask is not None and mask.any():
        edge = np.asarray(Image.fromarray(_outline(mask).astype(np.uint8) * 255).resize(
            (dw, dh), Image.NEAREST)) > 0
        pixels = np.array(image)
        pixels[edge] = TISSUE_OUTLINE + (255,)
        image = Image.fromarray(pixels, "RGBA")
    image = image.convert("RGB")
    view.png = _png(image, level=1)
    small = image.copy()
    small.thumbnail((THUMB_MAX, THUMB_MAX), Image.BILINEAR)
    view.thumb = _png(small, palette=96)


def _stain_views(view: SlideView, slide: Any, entry: Mapping[str, Any] | None,
                 stain: Mapping[str, Any], size: int, count: int) -> None:
    """A few used tiles raw and normalised, and the slide's fit next to the target."""
    from PIL import Image

    from ..io.slides import read_tile
    from ..records import TileKey
    from ..steps.stain import TileTransform

    fit = stain.get("fits", {}).get(view.slide_id)
    target = stain.get("target")
    if fit is None or target is None:
        return
    view.stain_swatch = _png(_fit_swatch(fit, target))
    flat = (entry or {}).get("tiles", {}).get("used", [])
    xy = np.asarray(flat, np.int64).reshape(-1, 2)
    if not len(xy) or count <= 0:
        return
    picks = xy[np.linspace(0, len(xy) - 1, min(count, len(xy))).round().astype(int)]
    transform = TileTransform(stain["method"], json.dumps(fit), json.dumps(target))
    level = int(entry.get("level", 0))
    raw = np.stack([read_tile(slide, TileKey(view.slide_id, level, int(x), int(y)), size)
                    for x, y in picks])
    normalised = transform.batch(raw)
    for before, after in zip(raw, normalised, strict=True):
        pair = []
        for tile in (before, after):
            small = Image.fromarray(np.ascontiguousarray(tile[..., :3]))
            small.thumbnail((96, 96), Image.BILINEAR)
            pair.append(_png(small))
        view.stain_tiles.append((pair[0], pair[1]))


def _fit_colors(fit: Mapping[str, Any]) -> list[tuple[int, int, int]]:
    """Display colours of a stain fit: Macenko's stains at their max concentration,
    Reinhard's mean colour."""
    if fit.get("method") == "macenko":
        from softmix_tf.stain import IO

        matrix = np.asarray(fit["stain_matrix"], np.float64)  # [3, 2]
        conc = np.asarray(fit["max_concentrations"], np.float64)
        colors = []
        for i in range(matrix.shape[1]):
            rgb = np.clip(IO * np.exp(-matrix[:, i] * conc[i]), 0, 255)
            colors.append(tuple(int(v) for v in rgb))
        return colors
    from skimage.color import lab2rgb

    means = np.asarray(fit["means"], np.float64)
    rgb = np.clip(lab2rgb(means.reshape(1, 1, 3)).reshape(3) * 255, 0, 255)
    return [tuple(int(v) for v in rgb)]


def _fit_swatch(fit: Mapping[str, Any], target: Mapping[str, Any]) -> np.ndarray:
    """Two rows of colour patches: the slide's fit (top) and the target (bottom)."""
    rows = [_fit_colors(fit), _fit_colors(target)]
    cell = 24
    out = np.full((2 * cell + 2, len(rows[0]) * cell, 3), 255, np.uint8)
    for r, colors in enumerate(rows):
        for c, color in enumerate(colors):
            out[r * (cell + 2):r * (cell + 2) + cell, c * cell:(c + 1) * cell] = color
    return out


def _shrink(image: np.ndarray, longest: int) -> np.ndarray:
    """`image` box-averaged by an integer factor so that its long side is <= `longest`
    (same dtype): the tissue outline is a picture, and the mask of a 1024-px level costs
    ~20x the mask of a 192-px one."""
    factor = -(-max(image.shape[:2]) // longest)
    if factor <= 1:
        return image
    if image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        from PIL import Image

        mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[-1]]
        small = Image.fromarray(np.ascontiguousarray(image.squeeze(-1) if mode == "L"
                                                     else image), mode).reduce(factor)
        return np.asarray(small).reshape(small.height, small.width, image.shape[-1])
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, -1)
    mean = blocks.mean(axis=(1, 3), dtype=np.float64)
    if image.dtype.kind in "ui":
        mean = np.rint(mean)
    return mean.astype(image.dtype)


def _render_slide(slide_id: str, info: Mapping[str, Any], entry: Mapping[str, Any] | None,
                  failed: Mapping[str, str], messages: Mapping[str, str],
                  tile: Mapping[str, Any], stain: Mapping[str, Any] | None,
                  stain_tiles: int) -> SlideView:
    from ..io.slides import open_slide
    from ..steps.plan import tissue_mask

    view = SlideView(slide_id, info.get("label"), info.get("path"),
                     failed=failed.get(slide_id), message=messages.get(slide_id, ""))
    if entry is not None and entry.get("reads"):
        view.bytes_read = int(entry["reads"].get("bytes_read", 0))
    size = int(tile.get("tile_size") or 256)
    step = int(tile.get("stride") or size)
    if not view.path:
        view.error = "no slide path recorded"
        return view
    try:
        columns = info.get("columns") or {}
        slide = open_slide(view.path, slide_id=slide_id, axes=columns.get("axes") or None)
        lowest = slide.num_levels - 1
        if entry is not None and entry.get("planned"):
            view.level = int(entry.get("level", 0))
        else:
            view.level = int(tile.get("level") or 0)
        if 0 <= view.level < slide.num_levels:
            view.level_shape = slide.level_shape(view.level)
            view.mpp = slide.mpp(view.level)
        thumb = slide.read_level(lowest)
        tissue_level = tile.get("tissue_level")
        mask = None
        try:
            source = thumb
            if tissue_level is not None and tissue_level != lowest:
                source = slide.read_level(int(tissue_level))
            mask = tissue_mask(_shrink(source, MASK_MAX),
                               mode=tile.get("tissue_mode") or "auto")
        except Exception:  # noqa: BLE001 - a slide whose mask fails still gets its picture
            mask = None
        _draw_slide(view, thumb, mask, entry, size, step)
        if stain is not None and view.failed is None:
            _stain_views(view, slide, entry, stain, size, stain_tiles)
    except Exception as err:  # noqa: BLE001 - one bad slide must not stop the report
        view.error = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if not view.counts and entry is not None and entry.get("planned"):
        view.counts = _status_grid(entry, (0, 0), size, step)[1]
    return view


# --- Plots --------------------------------------------------------------------------------


def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def _plots(manifest: Mapping[str, Any], sample: ShardSample, timeline: Mapping[str, Any] | None
           ) -> dict[str, bytes]:
    """The run's plots: one figure of 4-5 panels (one savefig is much faster than five),
    and the stain fits."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = list(manifest["class_names"])
    k = len(names)
    out: dict[str, bytes] = {}
    acc = manifest["accounting"]
    scale = manifest["num_examples"] / sample.examples if sample.examples else 0.0
    stages = _stage_times(timeline)
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    (ax_class, ax_lam, ax_pair), (ax_shard, ax_stage, ax_free) = axes
    ax_free.set_visible(False)

    pos = np.arange(k)
    before = np.array([sample.a_class.get(i, 0) for i in range(k)], np.float64) * scale
    after = np.asarray(acc.get("class_histogram") or [0.0] * k, np.float64)
    ax_class.bar(pos - 0.2, before, 0.4, label="before mixing (class of a)")
    ax_class.bar(pos + 0.2, after, 0.4, label="after mixing (soft label mass)")
    ax_class.set_xticks(pos, names)
    ax_class.set_ylabel("examples")
    ax_class.set_title("Class histogram")
    ax_class.legend(fontsize=8)

    ax_lam.hist(sample.lam, bins=np.linspace(0, 1, 21), color="#4a7ab5")
    ax_lam.set_xlabel("lam (weight of source b)")
    ax_lam.set_ylabel("examples")
    ax_lam.set_title(f"lam histogram ({sample.examples} examples read)")

    matrix = np.array([[sample.pairs.get((i, j), 0) for j in range(k)] for i in range(k)])
    ax_pair.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax_pair.text(j, i, str(matrix[i, j]), ha="center", va="center",
                         color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    ax_pair.set_xticks(range(k), names)
    ax_pair.set_yticks(range(k), names)
    ax_pair.set_xlabel("class of b")
    ax_pair.set_ylabel("class of a")
    ax_pair.set_title(f"Pairing matrix ({sample.mixed} mixed examples read)")

    shards = manifest.get("shards", [])
    ax_shard.bar(range(len(shards)), [s["num_examples"] for s in shards], color="#6a9a5b")
    ax_shard.xaxis.get_major_locator().set_params(integer=True)
    ax_shard.set_xlabel("shard")
    ax_shard.set_ylabel("examples")
    ax_shard.set_title("Examples per shard")

    if stages:
        ax_stage.barh(range(len(stages)), [d for _, _, d in stages],
                      left=[s for _, s, _ in stages], color="#b57a4a")
        ax_stage.set_yticks(range(len(stages)), [n for n, _, _ in stages])
        ax_stage.invert_yaxis()
        ax_stage.set_xlabel("seconds since the run started")
        ax_stage.set_title("Time per stage (until its last output)")
    else:
        ax_stage.set_visible(False)
    fig.tight_layout()
    out["run"] = _figure_png(fig)

    stain = manifest.get("stain")
    if stain and stain.get("fits") and stain.get("target"):
        out["stain_fits"] = _stain_plot(stain)
    return out


def _flat_fit(fit: Mapping[str, Any]) -> dict[str, float]:
    if fit.get("method") == "macenko":
        matrix = np.asarray(fit["stain_matrix"], np.float64)
        values = {f"{s} OD {c}": matrix[i, j] for j, s in enumerate(("H", "E"))
                  for i, c in enumerate("RGB")}
        values.update({f"{s} max conc.": v for s, v in zip(
            ("H", "E"), fit["max_concentrations"], strict=True)})
        return values
    means, stds = fit["means"], fit["stds"]
    return {**{f"mean {c}": v for c, v in zip("Lab", means, strict=True)},
            **{f"std {c}": v for c, v in zip("Lab", stds, strict=True)}}


def _stain_plot(stain: Mapping[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    target = _flat_fit(stain["target"])
    fits = [_flat_fit(f) for f in stain["fits"].values()]
    names = list(target)
    fig, axes = plt.subplots(1, len(names), figsize=(1.3 * len(names) + 1, 3), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        values = [f[name] for f in fits]
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
        ax.scatter(jitter, values, s=10, color="#4a7ab5", label="slides")
        ax.axhline(target[name], color="#c03030", lw=2, label="target")
        ax.set_xticks([])
        ax.set_xlim(-0.5, 0.5)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Stain fits ({stain.get('method')}) of {len(fits)} slides vs the target "
                 f"({stain.get('target_source')})", fontsize=9)
    fig.tight_layout()
    return _figure_png(fig)


def _stage_times(timeline: Mapping[str, Any] | None) -> list[tuple[str, float, float]]:
    """``(stage, start, duration)`` in seconds since the run started (from the staging
    files' times: each stage ends when its last output was written)."""
    if not timeline or timeline.get("started") is None:
        return []
    start = float(timeline["started"])
    marks = [("plan slides", "last_plan"), ("pack tiles", "last_pack"),
             ("pair + mix", "last_bucket"), ("merge shards", "last_shard"),
             ("publish", "published")]
    out, previous = [], 0.0
    for name, key in marks:
        value = timeline.get(key)
        if value is None:
            continue
        end = max(previous, float(value) - start)
        out.append((name, previous, end - previous))
        previous = end
    return out


# --- HTML ---------------------------------------------------------------------------------


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _metric(key: str, label: str, value: Any, shown: str | None = None) -> str:
    return (f'<tr><th>{_esc(label)}</th><td class="num" id="m-{_esc(key)}" '
            f'data-metric="{_esc(key)}" data-value="{_esc(value)}">'
            f'{_esc(shown if shown is not None else value)}</td></tr>')


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px;
color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 6px;
text-align:left;vertical-align:top}.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.ok{color:#080}.bad{color:#b00}
.swatch{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle;
border:1px solid #888}.muted{color:#777;font-size:12px}#slides td img{display:block}
img{max-width:100%}#controls{margin:6px 0}
#controls input,#controls select,#controls button{font-size:13px;margin-right:6px}
.msg{max-width:520px;font-size:12px;color:#555}
"""

_JS = """
(function(){
var rows=Array.prototype.slice.call(document.querySelectorAll('#slides tbody tr'));
var page=0,size=%d,shown=[];
function match(r){var q=document.getElementById('q').value.toLowerCase();
 var f=document.getElementById('filter').value;
 if(q&&r.getAttribute('data-search').indexOf(q)<0)return false;
 if(f==='failed')return r.getAttribute('data-failed')==='1';
 if(f==='skipped')return r.getAttribute('data-problem')==='1';return true;}
function render(){shown=rows.filter(match);var pages=Math.max(1,Math.ceil(shown.length/size));
 if(page>=pages)page=pages-1;rows.forEach(function(r){r.style.display='none';});
 shown.slice(page*size,(page+1)*size).forEach(function(r){r.style.display='';
  r.querySelectorAll('img[data-src]').forEach(function(i){i.src=i.getAttribute('data-src');
  i.removeAttribute('data-src');});});
 document.getElementById('pageinfo').textContent='page '+(page+1)+' of '+pages+' ('+
  shown.length+' slides)';}
document.getElementById('q').addEventListener('input',function(){page=0;render();});
document.getElementById('filter').addEventListener('change',function(){page=0;render();});
document.getElementById('prev').addEventListener('click',function(){if(page>0)page--;render();});
document.getElementById('next').addEventListener('click',function(){page++;render();});
render();
window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(
 document.querySelectorAll('img')).filter(function(i){return i.getAttribute('src');});
 var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
 document.body.setAttribute('data-images-loaded',ok+'/'+imgs.length);});
})();
"""


def _img(png: bytes | None, alt: str, *, lazy: bool = False, extra: str = "") -> str:
    if png is None:
        return ""
    attr = "data-src" if lazy else "src"
    return f'<img {attr}="{_data_uri(png)}" alt="{_esc(alt)}"{extra}>'


def _slide_row(view: SlideView, index: int, png_name: str, stain: bool) -> str:
    counts = view.counts
    status = (f'<span class="bad">failed: {_esc(view.failed)}</span>' if view.failed
              else '<span class="ok">ok</span>')
    problem = any(counts.get(r, 0) for r in SKIP_REASONS if r != "background") or bool(
        view.failed) or bool(view.error)
    mpp = (f"{view.mpp[1]:.4g} x {view.mpp[0]:.4g}" if view.mpp else "no units")
    shape = f"{view.level_shape[1]} x {view.level_shape[0]}" if view.level_shape else "-"
    skips = []
    for name in sorted(counts, key=lambda n: (n not in SKIP_REASONS, n)):
        if name == "used" or not counts[name]:
            continue
        r, g, b, _ = STATUS_COLORS.get(name, STATUS_COLORS["unreadable"])
        skips.append(f'<div><span class="swatch" style="background:rgb({r},{g},{b});'
                     f'margin-left:0"></span>{_esc(name)} <span data-count="{_esc(name)}">'
                     f"{counts[name]}</span></div>")
    notes = []
    if view.failed and view.message:
        notes.append(f'<div class="msg">{_esc(view.message)}</div>')
    if view.error and not (view.failed and view.failed in ("missing", "not_zarr")):
        notes.append(f'<div class="msg">no thumbnail: {_esc(view.error)}</div>')
    lazy = index >= PAGE_SIZE
    picture = _img(view.thumb, f"{view.slide_id} thumbnail", lazy=lazy)
    if picture:
        picture = f'<a title="full size: report/{_esc(png_name)}">{picture}</a>'
    stain_cell = ""
    if stain:
        parts = []
        if view.stain_swatch is not None:
            parts.append('<div class="muted">fit (top) vs target (bottom)</div>'
                         + _img(view.stain_swatch, "stain fit vs target", lazy=lazy))
        for raw, norm in view.stain_tiles:
            parts.append('<div style="display:flex;gap:2px">'
                         + _img(raw, "raw tile", lazy=lazy) + _img(norm, "normalised tile",
                                                                    lazy=lazy) + "</div>")
        stain_cell = "<td>" + "".join(parts) + "</td>"
    search = " ".join(str(v) for v in (view.slide_id, view.label, view.failed or "ok")).lower()
    return (
        f'<tr data-slide="{_esc(view.slide_id)}" data-search="{_esc(search)}" '
        f'data-failed="{int(bool(view.failed))}" data-problem="{int(problem)}" '
        f'data-tiles-total="{view.tiles_total}" data-bytes-read="{view.bytes_read or 0}">'
        f"<td>{picture}</td><td><b>{_esc(view.slide_id)}</b><br>{status}{''.join(notes)}</td>"
        f"<td>{_esc(view.label)}</td><td>{view.level if view.level is not None else '-'}"
        f"<br>{shape}</td><td>{mpp}</td>"
        f'<td class="num">{view.tiles_total}</td>'
        f'<td class="num" data-count="used">{counts.get("used", 0)}</td>'
        f'<td>{"".join(skips)}</td>'
        f'<td class="num" title="{view.bytes_read or 0} bytes">{_fmt_bytes(view.bytes_read)}</td>'
        f"{stain_cell}</tr>"
    )


def _legend() -> str:
    items = [f'<span class="swatch" style="background:rgb{TISSUE_OUTLINE}"></span>tissue outline',
             f'<span class="swatch" style="border:2px solid rgb{USED_OUTLINE}"></span>'
             "used tile (outline)"]
    for name in ("used", *SKIP_REASONS, "not_packed"):
        r, g, b, _ = STATUS_COLORS[name]
        items.append(f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>{name}')
    return '<p class="muted">' + "".join(items) + "</p>"


def _build_html(out_dir: str, manifest: Mapping[str, Any], views: Sequence[SlideView],
                png_names: Mapping[str, str], plots: Mapping[str, bytes],
                sample: ShardSample, contact: bytes | None, contact_error: str | None,
                timeline: Mapping[str, Any] | None, has_record: bool, elapsed: float) -> str:
    """The report page: header, accounting, plots, contact sheet and the slides table."""
    acc = manifest["accounting"]
    params = manifest.get("params", {})
    names = manifest["class_names"]
    stain = manifest.get("stain")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>SoftMix run report: {_esc(out_dir)}</title><style>{_CSS}</style></head><body>",
        f"<h1>SoftMix run report</h1><div class='muted'>{_esc(out_dir)} &middot; engine "
        f"{_esc(params.get('engine'))} &middot; {len(views)} slides &middot; "
        f"{manifest['num_examples']} examples in {len(manifest.get('shards', []))} shards "
        f"&middot; softmix {_esc(params.get('versions', {}).get('softmix', '?'))}</div>",
    ]
    for warning in manifest.get("warnings", []):
        parts.append(f"<p class='bad'>warning: {_esc(warning)}</p>")
    if not has_record:
        parts.append("<p class='bad'>This run left no tile record (report/tiles.json.gz, "
                     "written by runs of softmix 0.1.0 with this report): slides are shown "
                     "without their tiles.</p>")

    parts += _accounting_html(acc, names, timeline)
    parts += _plots_html(manifest, plots, sample, stain)

    # Contact sheet
    parts.append("<h2>Mixed examples (softmix preview)</h2>")
    if contact is not None:
        parts.append(_img(contact, "contact sheet of mixed examples", extra=" id='contact'"))
    else:
        parts.append(f"<p class='bad'>no contact sheet: {_esc(contact_error)}</p>")

    # Slides
    parts.append("<h2>Slides</h2>")
    parts.append(_legend())
    parts.append(
        "<div id='controls'><input id='q' placeholder='filter: slide id, label, reason'>"
        "<select id='filter'><option value='all'>all slides</option><option value='failed'>"
        "failed</option><option value='skipped'>failed, errors or unpaired tiles</option>"
        "</select><button id='prev'>&larr; prev</button><button id='next'>next &rarr;"
        "</button><span id='pageinfo' class='muted'></span></div>")
    head = "".join(f"<th>{_esc(h)}</th>" for h in (
        "thumbnail", "slide", "label", "level / size (px)", "µm/px (x x y)", "tiles",
        "used", "skipped", "bytes read"))
    if stain:
        head += "<th>stain: fit vs target, raw | normalised</th>"
    parts.append(f"<table id='slides'><thead><tr>{head}</tr></thead><tbody>")
    for index, view in enumerate(views):
        parts.append(_slide_row(view, index, png_names[view.slide_id], bool(stain)))
    parts.append("</tbody></table>")
    parts.append(f"<p class='muted'>Report written in {elapsed:.1f} s from {_esc(out_dir)}; "
                 "full-size slide pictures are in report/&lt;slide&gt;.png.</p>")
    parts.append(f"<script>{_JS % PAGE_SIZE}</script></body></html>")
    return "\n".join(parts)


def _accounting_html(acc: Mapping[str, Any], names: Sequence[str],
                     timeline: Mapping[str, Any] | None) -> list[str]:
    """The report's accounting, read counters, stage times and failed slides."""
    parts: list[str] = []
    skipped = acc.get("tiles_skipped", {})
    # Accounting
    parts.append("<h2>Accounting</h2><div class='grid'><table id='accounting'>")
    total_skipped = sum(skipped.values())
    parts.append(_metric("tiles_total", "tiles total", acc["tiles_total"]))
    parts.append(_metric("tiles_used", "tiles used", acc["tiles_used"]))
    parts.append(_metric("tiles_skipped_total", "tiles skipped", total_skipped))
    for reason in sorted(set(SKIP_REASONS) | set(skipped)):
        parts.append(_metric(f"tiles_skipped.{reason}", f"  skipped: {reason}",
                             skipped.get(reason, 0)))
    check = acc["tiles_total"] == acc["tiles_used"] + total_skipped
    parts.append(f"<tr><th>check</th><td id='accounting-check' data-ok='{int(check)}' "
                 f"class='{'ok' if check else 'bad'}'>total {'=' if check else '!='} used + "
                 "skipped</td></tr>")
    parts.append(_metric("examples_written", "examples written", acc.get("examples_written")))
    for reason, n in sorted(acc.get("examples_dropped", {}).items()):
        parts.append(_metric(f"examples_dropped.{reason}", f"examples dropped: {reason}", n))
    parts.append(_metric("slides_failed_total", "slides failed", len(acc.get("slides_failed", {}))))
    for i, name in enumerate(names):
        value = (acc.get("class_histogram") or [0.0] * len(names))[i]
        parts.append(_metric(f"class_histogram.{name}", f"label mass: {name}", value,
                             f"{value:.2f}"))
    parts.append("</table><table id='reads'>")
    for key, label in (("chunks_read", "chunks read"), ("bytes_read", "bytes read"),
                       ("bytes_needed", "bytes needed"), ("read_amplification",
                                                          "read amplification"),
                       ("store_requests", "store requests"), ("pack_bytes", "pack bytes")):
        value = acc.get(key)
        shown = _fmt_bytes(value) if "bytes" in key and value is not None else None
        parts.append(_metric(key, label, value if value is not None else "", shown))
    for key, n in sorted(acc.get("resumed", {}).items()):
        parts.append(_metric(f"resumed.{key}", f"resumed {key}", n))
    parts.append("</table>")
    stages = _stage_times(timeline)
    if stages:
        parts.append("<table id='stages'><tr><th>stage</th><th>seconds</th></tr>")
        for name, _, seconds in stages:
            parts.append(f"<tr><td>{_esc(name)}</td><td class='num' data-stage='{_esc(name)}'>"
                         f"{seconds:.1f}</td></tr>")
        parts.append("</table>")
    parts.append("</div>")
    if stages:
        parts.append("<p class='muted'>Stage times come from the staging files' times (each "
                     "stage ends when its last output was written; on Beam stages overlap). "
                     "A resumed run's reused outputs keep their old times.</p>")

    failed = acc.get("slides_failed", {})
    if failed:
        messages = acc.get("slides_failed_messages", {})
        parts.append("<h2>Failed slides</h2><table id='failed'><tr><th>slide</th>"
                     "<th>reason</th><th>message</th></tr>")
        for sid, reason in sorted(failed.items()):
            parts.append(f"<tr data-failed-slide='{_esc(sid)}'><td>{_esc(sid)}</td>"
                         f"<td>{_esc(reason)}</td><td class='msg'>{_esc(messages.get(sid, ''))}"
                         "</td></tr>")
        parts.append("</table>")
    return parts


def _plots_html(manifest: Mapping[str, Any], plots: Mapping[str, bytes], sample: ShardSample,
                stain: Mapping[str, Any] | None) -> list[str]:
    """The report's plots (labels, lam, pairing, shards) and its stain section."""
    parts: list[str] = []
    # Plots
    parts.append("<h2>Labels, lam, pairing and shards</h2>")
    total = manifest["num_examples"]
    if sample.examples < total:
        parts.append(f"<p class='muted'>lam, class-of-a and pairing counts come from "
                     f"{sample.examples} of {total} examples ({sample.shards_read} whole shards; "
                     "examples go to shards by a hash of their id, so this is a uniform "
                     "sample); the class-of-a bars are scaled to all examples.</p>")
    if sample.error:
        parts.append(f"<p class='bad'>reading the shards stopped: {_esc(sample.error)}</p>")
    parts.append(f"<div class='grid' id='plots' data-examples-read='{sample.examples}'>")
    parts.append(_img(plots["run"], "class histogram before and after mixing, lam "
                      "histogram, pairing matrix, examples per shard, time per stage",
                      extra=" id='plot-run'"))
    parts.append("</div>")
    parts.append("<table id='shards'><tr><th>shard</th><th>examples</th></tr>" + "".join(
        f"<tr><td>{_esc(s['file'])}</td><td class='num' data-shard='{_esc(s['file'])}'>"
        f"{s['num_examples']}</td></tr>" for s in manifest.get("shards", [])) + "</table>")

    if stain:
        parts.append(f"<h2>Stain normalisation ({_esc(stain.get('method'))}, target "
                     f"{_esc(stain.get('target_source'))})</h2>")
        if "stain_fits" in plots:
            parts.append(_img(plots["stain_fits"], "stain fits vs target",
                              extra=" id='plot-stain_fits'"))
        parts.append("<p class='muted'>Per slide (table below): its fit's colours next to the "
                     "target's, and a few used tiles raw (left) and normalised (right).</p>")
    return parts


# --- The command --------------------------------------------------------------------------


def _contact_sheet(out_dir: str) -> tuple[bytes | None, str | None]:
    from .preview import write_preview

    with tempfile.TemporaryDirectory(prefix="softmix-report-") as tmp:
        path = os.path.join(tmp, "preview.png")
        try:
            write_preview(out_dir, output=path)
        except Exception as err:  # noqa: BLE001 - e.g. a store TensorFlow cannot read
            return None, f"{type(err).__name__}: {err}".splitlines()[0]
        with open(path, "rb") as handle:
            return handle.read(), None


def _slide_infos(manifest: Mapping[str, Any], record: Mapping[str, Any] | None
                 ) -> dict[str, dict[str, Any]]:
    """slide id -> {path, label} of every slide of the run."""
    if record is not None and record.get("slides"):
        return {sid: dict(entry) for sid, entry in record["slides"].items()}
    try:  # an older run: the slide manifest the run read
        from ..io.manifest import load_slide_manifest

        rows = load_slide_manifest(manifest["params"]["manifest"],
                                   class_names=manifest["class_names"]).slides
        return {r.slide_id: {"path": r.path, "label": r.label,
                             "columns": dict(r.metadata)} for r in rows}
    except Exception:  # noqa: BLE001 - the report then lists the failed slides only
        return {sid: {"path": None, "label": None}
                for sid in manifest["accounting"].get("slides_failed", {})}


def write_report(out_dir: str, *, workers: int | None = None, max_examples: int = 2000,
                 stain_tiles: int = 3, contact_sheet: bool = True,
                 log: Callable[[str], None] | None = None) -> str:
    """Write ``OUT/report.html`` and ``OUT/report/<slide>.png`` for a finished run.

    Args:
        out_dir: a finished run's output directory (local path or fsspec URL).
        workers: threads drawing slides (default: 2 x CPUs, at most 16).
        max_examples: read whole shards until this many examples are read (the
            ``lam``, class-of-``a`` and pairing plots; all when the run has fewer).
        stain_tiles: used tiles per slide shown raw and normalised (runs with
            ``--stain-norm``).
        contact_sheet: include the `softmix preview` contact sheet.
        log: called with progress lines (e.g. `print`).

    Returns:
        The path of ``report.html``.

    Raises:
        PipelineError: `out_dir` holds no finished run.
    """
    started = time.perf_counter()
    fs, root = _fs(out_dir)
    manifest = _read_manifest(fs, root, out_dir)
    record = read_tile_record(out_dir)
    infos = _slide_infos(manifest, record)
    acc = manifest["accounting"]
    failed = acc.get("slides_failed", {})
    for sid in failed:
        infos.setdefault(sid, {"path": None, "label": None})
    entries = (record or {}).get("slides", {})
    tile = manifest.get("params", {}).get("tile", {})
    stain = manifest.get("stain") or None
    messages = acc.get("slides_failed_messages", {})
    ids = sorted(infos)
    threads = workers or min(16, 2 * (os.cpu_count() or 1))

    def render(sid: str) -> SlideView:
        return _render_slide(sid, infos[sid], entries.get(sid), failed, messages, tile, stain,
                             stain_tiles)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        views = list(pool.map(render, ids))
    if log:
        log(f"report: drew {len(views)} slides in {time.perf_counter() - started:.1f} s")
    # Failed slides first, then by id: problems are on the first page.
    views.sort(key=lambda v: (v.failed is None, v.slide_id))

    png_names = _write_slide_pngs(fs, root, views, threads)

    sample = read_shard_sample(fs, root, manifest, max_examples)
    timeline = (record or {}).get("timeline")
    plots = _plots(manifest, sample, timeline)
    contact, contact_error = _contact_sheet(out_dir) if contact_sheet else (None, "not asked for")
    elapsed = time.perf_counter() - started
    page = _build_html(out_dir, manifest, views, png_names, plots, sample, contact,
                       contact_error, timeline, record is not None, elapsed)
    path = posixpath.join(root, REPORT_HTML)
    fs.pipe_file(path, page.encode("utf-8"))
    if log:
        log(f"report: {len(views)} slides, {sample.examples} examples read, "
            f"{len(page) / 2**20:.1f} MB, {time.perf_counter() - started:.1f} s")
    return _shown_path(out_dir)


def _shown_path(out_dir: str) -> str:
    """``report.html`` of `out_dir`, spelled as the user spelled `out_dir`."""
    shown = out_dir.rstrip("/") + "/" + REPORT_HTML
    return shown if "://" in out_dir else os.path.join(out_dir, REPORT_HTML)


def write_report_or_warn(out_dir: str, *, keep_existing: bool = False, where: str = "",
                         hint: str = "", raise_errors: bool = False,
                         writer: Callable[[str], str] | None = None) -> str | None:
    """`write_report` at the end of a run, where a failure is a warning, not the run's:
    the dataset is published either way.

    Args:
        out_dir: the run's output directory.
        keep_existing: an existing ``report.html`` is kept as it is (a run that
            publishes removes the old dataset's report, so one that exists now was
            written by the run's own publishing step).
        where: said in the warning after "was not written" (e.g. " in the pipeline").
        hint: appended to the warning (e.g. how to retry).
        raise_errors: raise instead of warning (``softmix --verbose``).
        writer: writes the report of `out_dir` and returns its path (default
            `write_report`; `softmix dask` runs it on a worker, where TensorFlow is
            loaded already).

    Returns:
        The report's path, or None when it could not be written (warned on stderr).
    """
    import sys

    try:
        if keep_existing:
            fs, root = _fs(out_dir)
            if fs.exists(posixpath.join(root, REPORT_HTML)):
                return _shown_path(out_dir)
        return (writer or write_report)(out_dir)
    except Exception as err:  # noqa: BLE001 - the dataset is published either way
        if raise_errors:
            raise
        print(f"softmix: warning: the run report was not written{where} "
              f"({type(err).__name__}: {err}){hint}", file=sys.stderr, flush=True)
        return None


def _write_slide_pngs(fs: Any, root: str, views: Sequence[SlideView], threads: int
                      ) -> dict[str, str]:
    """Write each slide's picture to ``OUT/report/`` (removing pictures of an earlier
    report) and return the file name of each slide's picture."""
    png_names: dict[str, str] = {}
    used_names: set[str] = set()
    for view in views:
        name = slide_png_name(view.slide_id)
        if name in used_names:  # sanitised ids that collide
            name = name[:-4] + "-" + hashlib.sha256(view.slide_id.encode()).hexdigest()[:8] + ".png"
        used_names.add(name)
        png_names[view.slide_id] = name
    report_dir = posixpath.join(root, REPORT_DIR)
    fs.makedirs(report_dir, exist_ok=True)
    keep = {"tiles.json.gz", *used_names}
    try:
        for entry in fs.ls(report_dir, detail=False):  # pictures of an earlier report
            if posixpath.basename(entry) not in keep and entry.endswith(".png"):
                fs.rm(entry)
    except FileNotFoundError:
        pass
    pngs = {posixpath.join(report_dir, png_names[v.slide_id]): v.png for v in views
            if v.png is not None}
    if pngs:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            list(pool.map(lambda item: fs.pipe_file(*item), pngs.items()))
    return png_names

