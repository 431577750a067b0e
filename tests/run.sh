#!/usr/bin/env bash
# Builds everything and runs the whole test suite (ctest). Installs what is missing first.
# Usage: tests/run.sh [extra ctest arguments, e.g. -R etsi]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
examples/install-deps.sh
jobs=${JOBS:-$(nproc)}
cmake --preset default >/dev/null
cmake --build build -j "$jobs"
ctest --test-dir build --output-on-failure --timeout 600 -j "$jobs" "$@"
