#!/usr/bin/env bash
# Set up, build the demo slides, run the Beam job on them, and write a preview.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/softmix demo-data demo_data --overwrite
.venv/bin/softmix beam --manifest demo_data/manifest.csv --out demo_out --overwrite \
  "$@"
.venv/bin/softmix preview demo_out
echo "demo: shards and manifest in demo_out/, run report in demo_out/report.html, contact sheet in demo_out/preview.png"
