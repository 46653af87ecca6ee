"""Dataflow Flex Template entry point: the `softmix beam` command, unchanged.

Template parameters arrive as `--name=value` (snake_case, see metadata.json); the CLI
accepts snake_case spellings of its flags, and Beam's options (`--runner`, `--project`,
`--region`, `--temp_location`, `--sdk_container_image`, ...) pass through to Beam.
Boolean parameters arrive as `--flag=true|false` and are turned into plain switches.
"""

from __future__ import annotations

import sys

from pipeline.cli import main

SWITCHES = ("overwrite", "keep_originals", "keep-originals", "resume", "verbose",
            "no_report")


def _switches(argv: list[str]) -> list[str]:
    out = []
    for token in argv:
        flag, eq, value = token.partition("=")
        if eq and flag.lstrip("-") in SWITCHES:
            if value.lower() in ("1", "true", "yes"):
                out.append(flag)
            continue
        out.append(token)
    return out


if __name__ == "__main__":
    sys.exit(main(["beam", "--no-progress", *_switches(sys.argv[1:])]))
