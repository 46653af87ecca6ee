#!/usr/bin/env bash
# Set up, lint (ruff) and run the whole test suite (doctests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The run report's test renders report.html in a real headless browser (Debian's chromium).
# Another apt run holding its locks (e.g. a second checkout's test.sh) is waited for.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "test.sh: chromium is missing (the run report's browser test needs it) and only" \
      "root can install it here: run 'sudo apt-get install chromium', then this again" >&2
    exit 1
  fi
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        -o DPkg::Lock::Timeout=300 --no-install-recommends chromium >/dev/null; } && break
    echo "test.sh: apt-get failed (attempt ${attempt} of 10; another install may hold its" \
      "lock); trying again in 20 s" >&2
    sleep 20
  done
  command -v chromium >/dev/null || { echo "test.sh: could not install chromium with" \
    "apt-get (needed by the run report's browser test); install it, then run this again" >&2
    exit 1; }
fi
export TF_CPP_MIN_LOG_LEVEL=2
.venv/bin/ruff check --quiet pipeline softmix_tf tests benchmarks deploy
.venv/bin/python -m pytest --doctest-modules pipeline softmix_tf tests "$@"
