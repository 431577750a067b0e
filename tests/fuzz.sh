#!/usr/bin/env bash
# Builds the fuzz targets with clang (libFuzzer, ASan, UBSan; the "fuzz" preset, into
# build-fuzz/) and runs each for SECONDS (default 60), starting from its saved inputs in
# fuzz/corpus/<name>/. A failure leaves the input in build-fuzz/fuzz-out/<name>/ and ends
# the script with status 1. Not part of tests/run.sh, which replays fuzz/corpus/ in ctest.
#
# Usage: tests/fuzz.sh [SECONDS] [NAME...]   (names: etsi_api key_store store_file kms_config
#        provider_wire key_container core_detections; default all)
#   FUZZ_MERGE=1 tests/fuzz.sh 600   also adds the inputs that reached new code to
#                                    fuzz/corpus/ (minimised), for a later commit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(etsi_api key_store store_file kms_config provider_wire key_container core_detections)
examples/install-deps.sh
# clang and its libFuzzer and sanitizer runtimes.
missing=()
for p in clang libclang-rt-14-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "fuzz: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    sudo_cmd=(sudo)
  fi
  echo "fuzz: installing ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq >/dev/null
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cmake --preset fuzz >/dev/null
cmake --build build-fuzz -j "${JOBS:-$(nproc)}" --target "${targets[@]/#/fuzz_}"
status=0
for t in "${targets[@]}"; do
  work="build-fuzz/fuzz-out/$t"
  rm -rf "$work" && mkdir -p "$work/corpus"
  cp fuzz/corpus/"$t"/* "$work/corpus/" 2>/dev/null || true
  echo "fuzz: $t for ${seconds} s"
  if (cd "$work" && "$root/build-fuzz/bin/fuzz_$t" corpus -max_total_time="$seconds" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >log.txt 2>&1); then
    grep -E "^(stat::number_of_executed_units|stat::new_units_added)" "$work/log.txt" | tr '\n' ' '
    echo
    if [ "${FUZZ_MERGE:-0}" = 1 ]; then
      "$root/build-fuzz/bin/fuzz_$t" -merge=1 "fuzz/corpus/$t" "$work/corpus" >/dev/null 2>&1
    fi
  else
    echo "fuzz: $t FAILED; input and log in $work (crash-*, timeout-*, log.txt):"
    grep -E "ERROR|SUMMARY|runtime error" "$work/log.txt" | head -5
    status=1
  fi
done
exit $status
