#!/usr/bin/env bash
# The core, kms and provider tests under AddressSanitizer and UndefinedBehaviorSanitizer:
# builds the asan-ubsan preset into build-asan/ (Debug; about 40 minutes on 2 cores the
# first time) and runs ctest there. The daemons the tests start are the sanitized qkd-kms.
#   tests/sanitize.sh [ctest options]      e.g. tests/sanitize.sh -R OpsTest
# Leak checking is off unless DETECT_LEAKS=1: with it, LeakSanitizer also reports what
# OpenSSL keeps for the process (its DRBG in a forked child) and the memory the provider
# module holds for the process (its private library context) once OpenSSL unloads the
# module at exit (docs/VALIDATION.md, "Sanitizers"). Not run by tests/run.sh: its build
# would double the suite's time. The tests that run the system's openssl binary on the
# sanitized module are left out (that binary does not load the sanitizer's runtime).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${JOBS:-$(nproc)}
cmake --preset asan-ubsan >/dev/null
cmake --build build-asan -j"$jobs"
cd build-asan
ASAN_OPTIONS=detect_leaks=${DETECT_LEAKS:-0} UBSAN_OPTIONS=print_stacktrace=1 \
  ctest -L "core|kms|provider" -E "^provider\.openssl_" -j"$jobs" --timeout 600 "$@"
