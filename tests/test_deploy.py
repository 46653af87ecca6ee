"""deploy/ stays consistent with the code: template parameters, images, manifests."""

from __future__ import annotations

import importlib.util
import inspect
import json
import pathlib
import re
import tomllib

import apache_beam
import pytest
import yaml

from pipeline.cli import _normalize_flags, build_parser, job_config_from_args

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# Flags of `softmix beam` that make no sense in a Flex Template (local execution only).
LOCAL_ONLY = {"--help", "--workers", "--no-progress"}


def _subparser(name: str):
    parser = build_parser()
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return action.choices[name]
    raise AssertionError(name)


def _flags(name: str) -> set[str]:
    return {s for a in _subparser(name)._actions for s in a.option_strings if s.startswith("--")}


def _load_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flex_template_parameters_match_the_beam_cli():
    metadata = json.loads((DEPLOY / "dataflow" / "metadata.json").read_text())
    names = [p["name"] for p in metadata["parameters"]]
    assert len(names) == len(set(names))
    as_flags = {"--" + name.replace("_", "-") for name in names}
    assert as_flags == _flags("beam") - LOCAL_ONLY
    required = {p["name"] for p in metadata["parameters"] if not p.get("isOptional", False)}
    assert required == {"manifest", "out"}
    for param in metadata["parameters"]:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", param["name"]), param["name"]


def test_flex_template_entry_point_builds_the_job_config():
    main = _load_module(DEPLOY / "dataflow" / "main.py")
    argv = ["--manifest=gs://b/m.csv", "--out=gs://b/out", "--tile_size=128", "--grid=4x6",
            "--keep_originals=true", "--overwrite=false", "--pairing=cross-class",
            '--storage_options={"s3": {"anon": true}}', "--temp_location=gs://b/tmp"]
    normalized = _normalize_flags(build_parser(), ["beam", *main._switches(argv)])
    args, extra = build_parser().parse_known_args(normalized)
    job = job_config_from_args(args)
    assert job.tile.tile_size == 128 and job.mix.grid == (4, 6)
    assert job.mix.keep_originals is True and job.output.overwrite is False
    assert job.mix.pairing == "cross-class"
    assert json.loads(job.output.storage_options) == {"s3": {"anon": True}}
    assert extra == ["--temp_location=gs://b/tmp"]


def test_dockerfiles_match_pinned_versions_and_paths():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert f"apache-beam=={apache_beam.__version__}" in pyproject["project"]["dependencies"]
    dataflow = (DEPLOY / "dataflow" / "Dockerfile").read_text()
    assert f"ARG BEAM_VERSION={apache_beam.__version__}" in dataflow
    assert "python3.11" in dataflow and "python311" in dataflow
    assert pyproject["project"]["requires-python"].startswith(">=3.11")
    for dockerfile in (DEPLOY / "dataflow" / "Dockerfile", DEPLOY / "kubernetes" / "Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY") and "--from" not in line:
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), f"{dockerfile.name}: {source} missing"
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE=/template/main.py" in dataflow


def test_kubernetes_job_command_parses_and_targets_the_cluster():
    cluster = yaml.safe_load((DEPLOY / "kubernetes" / "dask-cluster.yaml").read_text())
    job = yaml.safe_load((DEPLOY / "kubernetes" / "softmix-job.yaml").read_text())
    assert cluster["kind"] == "DaskCluster"
    name = cluster["metadata"]["name"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["softmix", "dask"]
    args = build_parser().parse_args(command[1:])
    assert args.scheduler == f"tcp://{name}-scheduler:8786"
    job_config_from_args(args)  # every option value is valid
    images = {c["image"] for part in ("worker", "scheduler")
              for c in cluster["spec"][part]["spec"]["containers"]}
    images |= {c["image"] for c in job["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1


def test_slurm_driver_calls_run_dask_with_real_keywords(monkeypatch):
    from pipeline import dask_transforms

    script = _load_module(DEPLOY / "slurm" / "softmix_slurm.py")
    ours, _, job_flags = script._split(["--jobs", "2", "--", "--manifest", "m.csv",
                                        "--out", "o", "--grid", "2x3"])
    assert ours == ["--jobs", "2"]
    job = job_config_from_args(build_parser().parse_args(["dask", *job_flags]))
    assert job.mix.grid == (2, 3)
    source = (DEPLOY / "slurm" / "softmix_slurm.py").read_text()
    call = re.search(r"run_dask\(([^)]*)\)", source).group(1)
    keywords = {part.split("=")[0].strip() for part in call.split(",") if "=" in part}
    assert keywords <= set(inspect.signature(dask_transforms.run_dask).parameters)
    sbatch = (DEPLOY / "slurm" / "submit.sbatch").read_text()
    assert "deploy/slurm/softmix_slurm.py" in sbatch


@pytest.mark.parametrize("script", ["build_and_launch.sh"])
def test_launch_script_uses_the_metadata_and_dockerfile(script):
    text = (DEPLOY / "dataflow" / script).read_text()
    assert "deploy/dataflow/metadata.json" in text
    assert "deploy/dataflow/Dockerfile" in text
    assert "sdk_container_image" in text
