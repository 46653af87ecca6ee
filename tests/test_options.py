"""Options are defined once, in the config dataclasses (`pipeline.config`).

The CLI flags of every job command, `stream_dataset`'s keywords and the Dataflow Flex
Template's metadata.json are checked here against the dataclasses' fields and defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import pathlib
import re

import pytest

from pipeline import config as cfg
from pipeline.cli import build_parser, job_config_from_args
from pipeline.engines.stream import stream_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
JOB_COMMANDS = ("beam", "dask", "local")
# Flags that choose where and how visibly a run executes, never what it writes.
EXECUTION = {"help", "workers", "no_progress", "no_report", "verbose", "scheduler", "memory_limit",
             "threads_per_worker"}
# Keywords of `stream_dataset` that only a stream has.
STREAM_ONLY = {"epoch", "shuffle", "batch", "drop_remainder", "mix", "as_dict",
               "input_context", "cache_dir", "num_parallel_reads", "pack_threads"}
# Output options that do not apply to a stream (it writes no dataset).
NOT_STREAMED = {"out_dir", "name", "num_shards", "shard_size_mb", "compression", "overwrite",
                "resume"}


def _fields() -> dict[str, object]:
    """Every option's flat name -> its dataclass default (MISSING when required)."""
    out: dict[str, object] = {}
    for cls in (cfg.TileConfig, cfg.OpConfig, cfg.PairingConfig, cfg.OutputConfig):
        out.update((f.name, f.default) for f in dataclasses.fields(cls))
    out.update((f.name, f.default) for f in dataclasses.fields(cfg.JobConfig)
               if f.name not in ("tile", "mix", "output"))
    return out


def _subparser(name: str):
    for action in build_parser()._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            return action.choices[name]
    raise AssertionError(name)


def test_mix_fields_are_the_two_parts():
    parts = [f.name for cls in (cfg.OpConfig, cfg.PairingConfig) for f in dataclasses.fields(cls)]
    assert sorted(cfg.MIX_FIELDS) == sorted(parts)
    assert [f.name for f in dataclasses.fields(cfg.MixConfig)] == ["pair", "op"]


@pytest.mark.parametrize("command", JOB_COMMANDS)
def test_cli_flags_are_the_config_fields_with_their_defaults(command):
    sub = _subparser(command)
    dests = {a.dest for a in sub._actions} - EXECUTION
    assert {"out_dir" if d == "out" else d for d in dests} == set(_fields())
    args = sub.parse_args(["--manifest", "m.csv", "--out", "o"])
    assert job_config_from_args(args) == cfg.JobConfig(
        manifest="m.csv", tile=cfg.TileConfig(), mix=cfg.MixConfig(),
        output=cfg.OutputConfig(out_dir="o"))
    choices = {a.dest: tuple(a.choices) for a in sub._actions if a.choices}
    assert choices["pairing"] == cfg.PAIRING_POLICIES
    assert choices["tissue_mode"] == cfg.TISSUE_MODES
    assert choices["stain_norm"] == cfg.STAIN_NORMS
    assert choices["on_error"] == cfg.ON_ERROR


def test_stream_keywords_are_the_config_fields_with_their_defaults():
    params = inspect.signature(stream_dataset).parameters
    fields = _fields()
    assert set(params) - STREAM_ONLY == set(fields) - NOT_STREAMED
    for name in set(params) - STREAM_ONLY - {"manifest"}:
        default = params[name].default
        if name == "grid":
            default = cfg.parse_grid(default)
        assert default == fields[name], name


def test_flex_template_parameters_state_the_config_defaults():
    metadata = json.loads((ROOT / "deploy" / "dataflow" / "metadata.json").read_text())
    fields = _fields()
    stated = 0
    for param in metadata["parameters"]:
        name = "out_dir" if param["name"] == "out" else param["name"]
        assert name in fields or name in EXECUTION, name
        found = (re.search(r"default:? ([\w.]+)", param["helpText"])
                 or re.search(r"\(([\d.]+)\)\.?$", param["helpText"]))
        if found:
            stated += 1
            default, text = fields[name], found.group(1)
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                assert float(text) == default, name
            else:
                assert text == str(default).lower(), name
    assert stated >= 5
