#!/usr/bin/env bash
# Installs the Debian 12 packages this project builds and tests with. Idempotent: quiet and
# quick when everything is already there. Used by examples/demo.sh and tests/run.sh.
set -euo pipefail
pkgs=(
  build-essential cmake ninja-build pkg-config git
  openssl libssl-dev
  libboost-dev libboost-system-dev
  libfmt-dev libspdlog-dev nlohmann-json3-dev libcli11-dev libsqlite3-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  curl python3 procps
  nginx tshark   # interop tests (tshark: non-interactive install keeps capture root-only)
  gnuplot-nox
)
missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
