#!/usr/bin/env bash
# The installed layout (docs/KMS.md, "Deploying with systemd"): `cmake --install` into a
# fresh prefix puts qkd-kms in bin/ and the provider in lib/ossl-modules/, and both work
# from there: qkd-kms answers --help, and the openssl command loads the installed module by
# that folder and lists the provider and its group qkd.
#   Usage: tests/interop/install.sh BUILD_DIR
set -euo pipefail
build=$(cd "${1:?usage: $0 BUILD_DIR}" && pwd)
prefix=$(mktemp -d "${TMPDIR:-/tmp}/qkd-install.XXXXXX")
trap 'rm -rf "$prefix"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$prefix" >/dev/null
[ -x "$prefix/bin/qkd-kms" ] || fail "no bin/qkd-kms under the prefix"
[ -f "$prefix/lib/ossl-modules/qkdprovider.so" ] || fail "no lib/ossl-modules/qkdprovider.so"
"$prefix/bin/qkd-kms" --help | grep -q -- "--check-config" || fail "installed qkd-kms --help"
providers=$(openssl list -providers -provider-path "$prefix/lib/ossl-modules" \
  -provider qkdprovider 2>&1) || fail "openssl did not load the installed module: $providers"
grep -q "qkdprovider" <<<"$providers" || fail "provider not listed: $providers"
groups=$(openssl list -kem-algorithms -provider-path "$prefix/lib/ossl-modules" \
  -provider qkdprovider 2>&1)
grep -Eq "^ *qkd @ qkdprovider" <<<"$groups" || fail "no qkd KEM from the installed module: $groups"
echo "1 passed, 0 failed"
