"""Tests of pipeline.io.manifest: CSV/Parquet slide manifests and their errors."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ManifestError, PipelineError
from pipeline.io.manifest import load_slide_manifest

CSV = (
    "slide_id,path,label,patient_id,split\n"
    "007,slides/a.zarr,tumor,p1,train\n"
    "008,/abs/b.zarr,normal,p1,val\n"
    "009,s3://bucket/c.zarr,tumor,,test\n"
)


def _write(tmp_path, text, name="manifest.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_manifest(tmp_path):
    manifest = load_slide_manifest(_write(tmp_path, CSV), group_column="patient_id")
    assert manifest.class_names == ("normal", "tumor")
    assert [s.slide_id for s in manifest.slides] == ["007", "008", "009"]  # zeros kept
    a, b, c = manifest.slides
    assert a.path == str(tmp_path / "slides" / "a.zarr")
    assert b.path == "/abs/b.zarr" and c.path == "s3://bucket/c.zarr"
    assert (a.label, a.label_index, b.label_index) == ("tumor", 1, 0)
    assert (a.group, c.group) == ("p1", None)
    assert a.metadata_dict == {"patient_id": "p1", "split": "train"}
    assert c.metadata_dict == {"patient_id": "", "split": "test"}
    assert len(manifest) == 3 and manifest.class_counts() == {"normal": 1, "tumor": 2}
    assert load_slide_manifest(tmp_path / "manifest.csv").slides[0].group is None


def test_given_class_names_set_the_order(tmp_path):
    manifest = load_slide_manifest(_write(tmp_path, CSV), class_names=["tumor", "normal", "other"])
    assert manifest.class_names == ("tumor", "normal", "other")
    assert [s.label_index for s in manifest.slides] == [0, 1, 0]
    assert manifest.class_counts()["other"] == 0


def test_parquet_manifest(tmp_path):
    table = pa.table(
        {
            "slide_id": ["s1", "s2"],
            "path": ["x.zarr", "y.zarr"],
            "label": ["b", "a"],
            "age": [40, 50],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    manifest = load_slide_manifest(tmp_path / "m.parquet")
    assert manifest.class_names == ("a", "b")
    assert manifest.slides[0].path == str(tmp_path / "x.zarr")
    assert manifest.slides[1].metadata_dict == {"age": "50"}


def test_manifest_from_url_resolves_relative_paths_against_it():
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/run/manifest.csv", CSV.encode())
    manifest = load_slide_manifest("memory://bucket/run/manifest.csv")
    assert manifest.slides[0].path == "memory://bucket/run/slides/a.zarr"
    assert manifest.slides[2].path == "s3://bucket/c.zarr"


@pytest.mark.parametrize(
    ("text", "kwargs", "match"),
    [
        ("", {}, "is empty. Add a header 'slide_id,path,label'"),
        ("slide_id,path,label\n", {}, "is empty: it has a header but no slides"),
        ("slide_id,label\na,x\n", {}, r"lacks required column\(s\) \['path'\]"),
        ("id,path,label\na,p,x\n", {}, r"lacks required column\(s\) \['slide_id'\].*Received"),
        ("slide_id,path,label\na,p,x\nb,q,y\na,r,x\n", {}, r"duplicate slide_id\(s\) \['a'\]"),
        (
            "slide_id,path,label\na,p,x\nb,q,z\n",
            {"class_names": ["x", "y"]},
            r"unknown label\(s\) \['z'\]; known classes are \['x', 'y'\]",
        ),
        (
            "slide_id,path,label\na,p,x\n",
            {"group_column": "patient"},
            "group column 'patient' is not in manifest",
        ),
        ("slide_id,path,label\na,,x\n", {}, r"row 1 has empty \['path'\]"),
        ("slide_id,path,label\na,p,x\n", {"class_names": ["x", "x"]}, "distinct"),
    ],
)
def test_manifest_errors(tmp_path, text, kwargs, match):
    path = _write(tmp_path, text)
    with pytest.raises(ManifestError, match=match) as err:
        load_slide_manifest(path, **kwargs)
    assert isinstance(err.value, PipelineError)
    if "class_names" not in kwargs:  # bad arguments are not the file's fault
        assert str(path) in str(err.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="does not exist.*demo-data"):
        load_slide_manifest(tmp_path / "none.csv")


def test_bad_parquet(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        load_slide_manifest(tmp_path / "m.parquet")
