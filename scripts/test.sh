#!/usr/bin/env bash
# Set up, lint (ruff) and run the whole test suite (doctests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The run report's test renders report.html in a real headless browser (Debian's chromium).
command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/ruff check --quiet pipeline softmix_tf tests benchmarks deploy
.venv/bin/python -m pytest --doctest-modules pipeline softmix_tf tests "$@"
