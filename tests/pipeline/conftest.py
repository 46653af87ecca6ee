"""Fixtures that write small slides: synthetic OME-Zarr datasets and the real demo data.

Shared by the slide/tiling tests and by the Beam and Dask tests:

- `write_ome_zarr(path, image_yxc, ...)`: one OME-Zarr image via ome-zarr-py's writer.
- `synthetic_tissue(height, width, boxes, ...)`: glass with coloured tissue rectangles.
- `write_synthetic_dataset(out_dir, ...)`: 4 slides of 2 classes + ``manifest.csv``,
  with exactly known tile counts (see `SyntheticDataset.expected_tiles`).
- fixtures `synthetic_dataset` (session, read-only), `synthetic_dataset_factory`
  (fresh copy per call), `demo_dataset` (session: the real demo data, small slides).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import pytest

GLASS = (236, 234, 240)
CLASS_COLORS = {"he": (190, 70, 150), "ihc": (150, 95, 40)}

# Level 0 is 512x512, tiled at 128 px: a 4x4 grid. Boxes are (y0, x0, y1, x1) and lie on
# the tile grid, so with TileConfig(tile_size=128) the kept tiles are exactly those inside.
SYNTHETIC_SLIDES: tuple[tuple[str, str, tuple[tuple[int, int, int, int], ...]], ...] = (
    ("syn-0", "he", ((0, 0, 256, 384),)),  # 2 x 3 = 6 tiles
    ("syn-1", "ihc", ((128, 128, 384, 384),)),  # 2 x 2 = 4 tiles
    ("syn-2", "he", ((256, 0, 512, 512),)),  # 2 x 4 = 8 tiles
    ("syn-3", "ihc", ((0, 256, 384, 512),)),  # 3 x 2 = 6 tiles
)
SYNTHETIC_SIZE = 512
SYNTHETIC_TILE = 128


def synthetic_tissue(
    height: int,
    width: int,
    boxes: Sequence[tuple[int, int, int, int]],
    *,
    color: tuple[int, int, int] = (190, 70, 150),
    seed: int = 0,
) -> np.ndarray:
    """uint8 [height, width, 3]: noisy glass with noisy, saturated tissue in `boxes`."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.float64)
    image[:] = GLASS
    for y0, x0, y1, x1 in boxes:
        image[y0:y1, x0:x1] = color
        texture = rng.normal(0.0, 12.0, size=(y1 - y0, x1 - x0, 1))
        image[y0:y1, x0:x1] += texture
    image += rng.normal(0.0, 2.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_ome_zarr(
    path: str | pathlib.Path,
    image_yxc: np.ndarray,
    *,
    version: str = "0.5",
    axes: str = "cyx",
    mpp: float | None = 0.5,
    unit: str = "micrometer",
    scale_factors: Sequence[int] = (2, 4),
    chunk: int = 128,
    labels: Mapping[str, np.ndarray] | None = None,
    label_properties: Mapping[str, list[dict]] | None = None,
) -> pathlib.Path:
    """Write `image_yxc` as an OME-Zarr multiscale image with ome-zarr-py.

    Args:
        version: "0.5" (Zarr v3) or "0.4" (Zarr v2).
        axes: stored axis order: "cyx", "yxc", "tczyx" (t, z of size 1) ...
        mpp: pixel size of level 0 in `unit`; None writes no units.
        labels: name -> uint [height, width] label image written under labels/.
    """
    import zarr
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image, write_labels

    path = pathlib.Path(path)
    fmt = FormatV05() if version == "0.5" else FormatV04()
    group = zarr.open_group(str(path), mode="w", zarr_format=3 if version == "0.5" else 2)
    # Build the stored array from [y, x, c]: reorder, then insert size-1 t/z axes.
    order = [a for a in axes if a in "cyx"]
    data = np.transpose(image_yxc, ["yxc".index(a) for a in order])
    for position, name in enumerate(axes):
        if name in "tz":
            data = np.expand_dims(data, position)
    chunks = tuple(chunk if a in "yx" else data.shape[i] for i, a in enumerate(axes))
    kwargs: dict = {}
    if mpp is not None:
        kwargs["scale"] = {a: (mpp if a in "yx" else 1.0) for a in axes}
        kwargs["axes_units"] = {"y": unit, "x": unit}
    else:
        kwargs["scale"] = {a: 1.0 for a in axes}
    write_image(
        data,
        group,
        scale_factors=tuple(scale_factors),
        axes=axes,
        fmt=fmt,
        storage_options={"chunks": chunks},
        **kwargs,
    )
    for name, label in (labels or {}).items():
        props = (label_properties or {}).get(name)
        write_labels(
            label,
            group,
            name=name,
            axes="yx",
            fmt=fmt,
            scaler=None,
            scale_factors=tuple(scale_factors),
            label_metadata={"properties": props} if props else None,
        )
    return path


def write_raw_multiscales(
    path: str | pathlib.Path,
    image_yxc: np.ndarray,
    *,
    axes: str = "yxc",
    version: str = "0.5",
    num_levels: int = 3,
    mpp: float | None = 0.5,
    unit: str = "micrometer",
    level_paths: Sequence[str] | None = None,
    global_scale: float | None = None,
    chunk: int = 64,
) -> pathlib.Path:
    """Write an OME-NGFF multiscale image with plain `zarr` and hand-written metadata.

    For layouts ome-zarr-py refuses to write (e.g. ``y, x, c``), custom level paths
    and a multiscale-level ``coordinateTransformations`` scale (`global_scale`).
    Levels are 2x strided subsamples.
    """
    import zarr

    path = pathlib.Path(path)
    zarr_format = 3 if version == "0.5" else 2
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    paths = list(level_paths or [f"L{i}" for i in range(num_levels)])
    datasets = []
    for level, level_path in enumerate(paths):
        step = 2**level
        data = image_yxc[::step, ::step]
        order = [a for a in axes if a in "cyx"]
        data = np.transpose(data, ["yxc".index(a) for a in order])
        for position, name in enumerate(axes):
            if name in "tz":
                data = np.expand_dims(data, position)
        chunks = tuple(chunk if a in "yx" else data.shape[i] for i, a in enumerate(axes))
        group.create_array(level_path, data=np.ascontiguousarray(data), chunks=chunks)
        scale = [float(step) * (mpp or 1.0) if a in "yx" else 1.0 for a in axes]
        datasets.append(
            {"path": level_path, "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    axes_meta = []
    for a in axes:
        entry = {"name": a, "type": {"c": "channel", "t": "time"}.get(a, "space")}
        if a in "yx" and mpp is not None:
            entry["unit"] = unit
        axes_meta.append(entry)
    multiscale: dict = {"axes": axes_meta, "datasets": datasets, "name": "image"}
    if global_scale is not None:
        multiscale["coordinateTransformations"] = [
            {"type": "scale", "scale": [global_scale if a in "yx" else 1.0 for a in axes]}
        ]
    if version == "0.5":
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    else:
        multiscale["version"] = "0.4"
        group.attrs["multiscales"] = [multiscale]
    return path


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """A written synthetic dataset.

    Attributes:
        root: its directory.
        manifest_path: ``root/manifest.csv`` (columns slide_id, path, label, patient_id).
        class_names: ("he", "ihc").
        slide_ids: ids in manifest order.
        tile_size: 128, the tile size the expected counts are for (stride = tile size,
            level 0, default min_tissue 0.5).
        expected_tiles: slide id -> kept tiles (6, 4, 8, 6: 24 in all).
        expected_background: slide id -> background tiles (10, 12, 8, 10: 40 in all).
        boxes: slide id -> tissue boxes (y0, x0, y1, x1) at level 0.
    """

    root: pathlib.Path
    manifest_path: pathlib.Path
    class_names: tuple[str, ...]
    slide_ids: tuple[str, ...]
    tile_size: int
    expected_tiles: dict[str, int]
    expected_background: dict[str, int]
    boxes: dict[str, tuple[tuple[int, int, int, int], ...]]

    @property
    def total_tiles(self) -> int:
        return sum(self.expected_tiles.values())


def write_synthetic_dataset(
    out_dir: str | pathlib.Path, *, version: str = "0.5"
) -> SyntheticDataset:
    """4 synthetic 512x512 OME-Zarr slides (2 per class) + manifest.csv, in well under 2 s."""
    root = pathlib.Path(out_dir)
    (root / "slides").mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,path,label,patient_id"]
    expected, background, boxes_by_id = {}, {}, {}
    grid_tiles = (SYNTHETIC_SIZE // SYNTHETIC_TILE) ** 2
    for index, (slide_id, label, boxes) in enumerate(SYNTHETIC_SLIDES):
        image = synthetic_tissue(
            SYNTHETIC_SIZE, SYNTHETIC_SIZE, boxes, color=CLASS_COLORS[label], seed=index
        )
        write_ome_zarr(root / "slides" / f"{slide_id}.ome.zarr", image, version=version)
        rows.append(f"{slide_id},slides/{slide_id}.ome.zarr,{label},patient-{index // 2}")
        kept = sum(
            (y1 - y0) // SYNTHETIC_TILE * ((x1 - x0) // SYNTHETIC_TILE) for y0, x0, y1, x1 in boxes
        )
        expected[slide_id] = kept
        background[slide_id] = grid_tiles - kept
        boxes_by_id[slide_id] = boxes
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return SyntheticDataset(
        root=root,
        manifest_path=manifest,
        class_names=("he", "ihc"),
        slide_ids=tuple(s[0] for s in SYNTHETIC_SLIDES),
        tile_size=SYNTHETIC_TILE,
        expected_tiles=expected,
        expected_background=background,
        boxes=boxes_by_id,
    )


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """Session-wide synthetic dataset (OME-Zarr v0.5). Do not modify it."""
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def synthetic_dataset_factory(
    tmp_path: pathlib.Path,
) -> Callable[..., SyntheticDataset]:
    """Call with optional ``version="0.4"`` to get a fresh, writable dataset."""
    counter = iter(range(1000))

    def make(*, version: str = "0.5") -> SyntheticDataset:
        return write_synthetic_dataset(tmp_path / f"synthetic-{next(counter)}", version=version)

    return make


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The real demo data (`write_demo_data`), 4 slides of 1024 px; returns the manifest."""
    from pipeline.tools.demo import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo"), num_slides=4, slide_size=1024, log=None)


# --- Object stores: real S3 and GCS API servers on 127.0.0.1 (tests/pipeline/test_buckets.py)


@dataclasses.dataclass
class BucketStore:
    """A bucket on a running API server: ``root`` (``s3://softmix-test``), the fsspec
    ``options`` that reach it, its `fs`, and the `server` (`pipeline.tools.servers`)."""

    protocol: str
    root: str
    options: dict
    fs: object
    server: object

    @property
    def options_json(self) -> str:
        import json

        return json.dumps({self.protocol: self.options})

    def upload(self, local: pathlib.Path, prefix: str) -> str:
        """Copy the directory `local` to ``root/prefix``; returns its URL."""
        target = f"{self.root}/{prefix}"
        self.fs.put(str(local), target.split("://", 1)[1], recursive=True)
        return target


def _bucket_store(protocol: str, server_factory) -> Iterator[BucketStore]:  # noqa: ANN001
    from pipeline.io import storage

    with server_factory() as server:
        previous = storage.current_options()
        storage.configure({**previous, protocol: server.options})
        fs, _ = storage.filesystem(f"{protocol}://softmix-test")
        fs.mkdir("softmix-test")
        try:
            yield BucketStore(protocol, f"{protocol}://softmix-test", dict(server.options),
                              fs, server)
        finally:
            storage.configure(previous)


@pytest.fixture(scope="session")
def s3_store() -> Iterator[BucketStore]:
    """A moto S3 server (session) with bucket ``softmix-test``; its options in force."""
    from pipeline.tools.servers import s3_server

    yield from _bucket_store("s3", s3_server)


@pytest.fixture(scope="session")
def gcs_store() -> Iterator[BucketStore]:
    """A fake-gcs-server (session) with bucket ``softmix-test``; its options in force."""
    from pipeline.tools.servers import gcs_server

    yield from _bucket_store("gs", gcs_server)
