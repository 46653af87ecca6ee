"""`softmix report OUT`: the page's numbers equal manifest.json, every image is an
embedded PNG, the slides' pictures show their tiles by status, and a real headless
Chromium renders the page with every image loaded."""

from __future__ import annotations

import base64
import gzip
import html.parser
import io
import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.tools.report import STATUS_COLORS, slide_png_name, write_report

from .conftest import write_synthetic_dataset

pytestmark = pytest.mark.slow


class _Page(html.parser.HTMLParser):
    """Every element's attributes (by tag), and the text of each element with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def with_attr(self, name: str) -> list[tuple[str, dict[str, str]]]:
        return [(t, a) for t, a in self.elements if name in a]


def _parse(path: pathlib.Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _corrupt_level0(slide_root: pathlib.Path) -> None:
    meta = json.loads((slide_root / "zarr.json").read_text())
    level0 = meta["attributes"]["ome"]["multiscales"][0]["datasets"][0]["path"]
    for chunk in (slide_root / level0).rglob("*"):
        if chunk.is_file() and chunk.name != "zarr.json":
            chunk.write_bytes(b"not a chunk")


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    """A Beam run (CLI) over the synthetic slides, one of them with corrupt level-0
    chunks (its tiles: read_error) and one missing slide; then `softmix report`."""
    root = tmp_path_factory.mktemp("report")
    data = write_synthetic_dataset(root / "data")
    _corrupt_level0(data.root / "slides" / "syn-1.ome.zarr")
    rows = data.manifest_path.read_text().splitlines() + ["ghost,slides/ghost.ome.zarr,he,p-9"]
    data.manifest_path.write_text("\n".join(rows) + "\n")
    out = root / "out"
    argv = ["beam", "--manifest", str(data.manifest_path), "--out", str(out), "--tile-size",
            "128", "--num-shards", "2", "--seed", "3", "--no-progress", "--no-report"]
    assert cli_main(argv) == 0
    assert not (out / "report.html").exists()  # --no-report
    assert (out / "report" / "tiles.json.gz").exists()  # the run's tile record is kept
    assert cli_main(["report", str(out)]) == 0
    return data, out, json.loads((out / "manifest.json").read_text())


def test_page_numbers_equal_the_manifest(reported_run):
    data, out, manifest = reported_run
    acc = manifest["accounting"]
    page = _parse(out / "report.html")
    metrics = {a["data-metric"]: a["data-value"] for _, a in page.with_attr("data-metric")}
    assert int(metrics["tiles_total"]) == acc["tiles_total"] == 64
    assert int(metrics["tiles_used"]) == acc["tiles_used"]
    assert int(metrics["tiles_skipped_total"]) == sum(acc["tiles_skipped"].values())
    for reason in ("background", "read_error", "missing_chunk", "nonfinite_pixels",
                   "no_partner"):
        assert int(metrics[f"tiles_skipped.{reason}"]) == acc["tiles_skipped"].get(reason, 0)
    assert acc["tiles_skipped"]["read_error"] == data.expected_tiles["syn-1"]
    assert int(metrics["examples_written"]) == manifest["num_examples"]
    assert int(metrics["slides_failed_total"]) == 1
    for name, value in zip(manifest["class_names"], acc["class_histogram"], strict=True):
        assert float(metrics[f"class_histogram.{name}"]) == value
    for key in ("chunks_read", "bytes_read", "bytes_needed", "store_requests", "pack_bytes"):
        assert int(metrics[key]) == acc[key], key
    assert float(metrics["read_amplification"]) == acc["read_amplification"]
    assert [a["data-ok"] for _, a in page.with_attr("data-ok")] == ["1"]
    # Shards, failed slides.
    shards = {a["data-shard"] for _, a in page.with_attr("data-shard")}
    assert shards == {s["file"] for s in manifest["shards"]}
    assert [a["data-failed-slide"] for _, a in page.with_attr("data-failed-slide")] == ["ghost"]
    # Every example was read for the plots (the run is small).
    plots = [a for _, a in page.with_attr("data-examples-read")]
    assert int(plots[0]["data-examples-read"]) == manifest["num_examples"]
    # Per slide: the rows add up to the run's accounting, and match the fixture.
    rows = {a["data-slide"]: a for t, a in page.with_attr("data-slide") if t == "tr"}
    assert set(rows) == {"ghost", *data.slide_ids}
    assert sum(int(r["data-tiles-total"]) for r in rows.values()) == acc["tiles_total"]
    assert sum(int(r["data-bytes-read"]) for r in rows.values()) == acc["bytes_read"]
    assert rows["ghost"]["data-failed"] == "1"
    text = (out / "report.html").read_text()
    assert "failed: missing" in text and "ghost.ome.zarr does not exist" in text
    record = json.loads(gzip.decompress((out / "report" / "tiles.json.gz").read_bytes()))
    slides = record["slides"]
    used = sum(len(s.get("tiles", {}).get("used", [])) // 2 for s in slides.values())
    assert used == acc["tiles_used"]
    assert slides["syn-0"]["background"] == data.expected_background["syn-0"]
    assert len(slides["syn-1"]["tiles"]["read_error"]) // 2 == data.expected_tiles["syn-1"]
    assert slides["ghost"]["planned"] is False


def test_every_image_is_an_embedded_png(reported_run):
    _, out, _ = reported_run
    page = _parse(out / "report.html")
    images = [a for t, a in page.elements if t == "img"]
    assert len(images) >= 6  # plots, contact sheet, 4 thumbnails
    for attrs in images:
        uri = attrs.get("src") or attrs.get("data-src")
        assert uri.startswith("data:image/png;base64,"), uri[:40]
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
            assert image.format == "PNG" and image.size[0] > 0
    text = (out / "report.html").read_text()
    for external in ("http://", "https://", "<link", "src=\"/", "url("):
        assert external not in text


def test_slide_pictures_show_tiles_by_status(reported_run):
    data, out, _ = reported_run
    assert sorted(p.name for p in (out / "report").glob("*.png")) == sorted(
        slide_png_name(s) for s in data.slide_ids)  # no picture for the missing slide
    # Level 0 is 512 px, the lowest level 128 px: the picture is drawn at 256 px, so a
    # 128-px tile at (x, y) covers [x / 2, (x + 128) / 2).
    with Image.open(out / "report" / slide_png_name("syn-1")) as image:
        syn1 = np.asarray(image.convert("RGB")).astype(int)
    assert syn1.shape == (256, 256, 3)
    r, g, b = syn1[96, 96]  # tile (128, 128): read_error (red)
    assert r > 150 and g < 90 and b < 90, (r, g, b)
    with Image.open(out / "report" / slide_png_name("syn-0")) as image:
        syn0 = np.asarray(image.convert("RGB")).astype(int)
    r, g, b = syn0[224, 32]  # tile (0, 384): glass, background (blue tint)
    assert b > r + 20, (r, g, b)
    background = np.array(STATUS_COLORS["background"][:3])
    assert np.abs(syn0[224, 32] - background).sum() < np.abs(syn1[96, 96] - background).sum()
    # Tile (0, 0) of syn-0 is used: tissue (magenta) under a green tint, outline green.
    r, g, b = syn0[30, 30]
    assert r > g and b > g, (r, g, b)


def test_chromium_renders_the_page_with_every_image(reported_run, tmp_path):
    _, out, _ = reported_run
    chromium = shutil.which("chromium")
    if chromium is None:  # CI installs it (scripts/test.sh): never skip
        pytest.fail("chromium is not installed: apt-get install -y chromium")
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1280,2000", "--virtual-time-budget=5000"]
    url = (out / "report.html").resolve().as_uri()
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    loaded = dom.split('data-images-loaded="', 1)[1].split('"', 1)[0]
    done, total = (int(v) for v in loaded.split("/"))
    assert total >= 6 and done == total, loaded
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", url], capture_output=True, timeout=120,
                   check=True)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 20  # not blank
    assert (pixels.reshape(-1, 3) != 255).any(axis=1).mean() > 0.1


def test_report_of_a_stain_normalised_run(tmp_path, capsys):
    """Written at the end of the run (no --no-report), with the stain section."""
    data = write_synthetic_dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["beam", "--manifest", str(data.manifest_path), "--out", str(out), "--tile-size",
            "128", "--num-shards", "1", "--stain-norm", "reinhard", "--no-progress"]
    assert cli_main(argv) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    page = _parse(out / "report.html")
    assert any(a.get("id") == "plot-stain_fits" for t, a in page.elements if t == "img")
    rows = [a for t, a in page.with_attr("data-slide") if t == "tr"]
    assert len(rows) == 4
    images = {a.get("alt"): [] for t, a in page.elements if t == "img"}
    for tag, attrs in page.elements:
        if tag == "img":
            images[attrs["alt"]].append(attrs.get("src") or attrs.get("data-src"))
    assert len(images["stain fit vs target"]) == 4
    raw, normalised = images["raw tile"], images["normalised tile"]
    assert len(raw) == len(normalised) == 12  # 3 tiles x 4 slides

    def decode(uri: str) -> np.ndarray:
        with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
            return np.asarray(image.convert("RGB")).astype(int)

    changed = [np.abs(decode(a) - decode(b)).mean() for a, b in zip(raw, normalised,
                                                                   strict=True)]
    assert min(changed) > 1.0  # the synthetic stains are far from the H&E target


def test_report_reads_out_through_fsspec(reported_run):
    """OUT on a (simulated) bucket: every read and write goes through fsspec."""
    _, out, manifest = reported_run
    url = f"latency://{out}"
    path = write_report(url, contact_sheet=False)
    assert path == f"{url}/report.html"
    page = _parse(out / "report.html")
    metrics = {a["data-metric"]: a["data-value"] for _, a in page.with_attr("data-metric")}
    assert int(metrics["tiles_used"]) == manifest["accounting"]["tiles_used"]
    assert int(metrics["bytes_read"]) == manifest["accounting"]["bytes_read"]


def test_report_refuses_an_unfinished_run(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 1
    assert "No manifest.json" in capsys.readouterr().err


def test_report_at_the_end_of_a_run_warns_or_keeps(tmp_path, capsys):
    # The engines' and the CLI's end-of-run report: a failure warns (the dataset is
    # published either way), --verbose raises, and a report the run wrote is kept.
    from pipeline.errors import PipelineError
    from pipeline.tools.report import write_report_or_warn

    assert write_report_or_warn(str(tmp_path), where=" in the pipeline", hint="; retry") is None
    err = capsys.readouterr().err
    assert err.startswith("softmix: warning: the run report was not written in the pipeline "
                          "(PipelineError: ") and err.rstrip().endswith("; retry")
    with pytest.raises(PipelineError, match="No manifest.json"):
        write_report_or_warn(str(tmp_path), raise_errors=True)
    (tmp_path / "report.html").write_text("<html>written by the run</html>")
    assert write_report_or_warn(str(tmp_path), keep_existing=True) == str(tmp_path / "report.html")
    assert (tmp_path / "report.html").read_text() == "<html>written by the run</html>"

    def lost(out_dir: str) -> str:  # e.g. `softmix dask`'s worker
        raise OSError(f"worker lost drawing {out_dir}")

    assert write_report_or_warn(str(tmp_path), where=" on a Dask worker", writer=lost) is None
    assert capsys.readouterr().err.startswith(
        "softmix: warning: the run report was not written on a Dask worker (OSError: worker "
        f"lost drawing {tmp_path})")
