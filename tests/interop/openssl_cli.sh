#!/usr/bin/env bash
# Interop: the real `openssl s_server` and `s_client` binaries, the provider loaded through
# openssl.cnf, two real qkd-kms daemons on loopback. Checks, by name, that group qkd was
# negotiated and that data crossed; then that a server whose KME is down fails the handshake
# with an error naming the KME, and that a client listing qkd:X25519 against a server
# without the provider falls back to X25519.
#   Usage: tests/interop/openssl_cli.sh BUILD_DIR
set -euo pipefail
QKD_ROOT=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:?usage: $0 BUILD_DIR}" && pwd)
QKD_BIN=$build/bin
source "$QKD_ROOT/examples/qkd-net.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/qkd-interop.XXXXXX")
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
  qkd_net_stop
  [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

# The apps read examples/<sae>-provider.cnf unchanged. It finds the module and the PKI under
# $QKD_DEMO_DIR/{build/lib/ossl-modules,examples/pki}: a tree of links to this build and to
# this test's PKI. Only the KME URL (ports chosen by the kernel) is overridden.
demo_root=$work/root
mkdir -p "$demo_root/build/lib" "$demo_root/examples"
ln -s "$build/lib/ossl-modules" "$demo_root/build/lib/ossl-modules"
ln -s "$work/pki" "$demo_root/examples/pki"
app_env() {  # app_env SAE KME_URL
  echo OPENSSL_CONF="$QKD_ROOT/examples/$1-provider.cnf" QKD_DEMO_DIR="$demo_root" \
    QKD_KME_URL="$2" QKD_TIMEOUT_MS=3000
}

start_server() {  # start_server LOG GROUPS ENV...
  local log=$1 groups=$2
  shift 2
  port=$(qkd_free_port)
  env "$@" openssl s_server -accept "127.0.0.1:$port" -naccept 1 -www -groups "$groups" \
    -cert "$work/pki/bob.crt" -key "$work/pki/bob.key" > "$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    grep -q ACCEPT "$log" 2>/dev/null && return 0
    kill -0 "$server_pid" 2>/dev/null || fail "s_server did not start: $(cat "$log")"
    sleep 0.1
  done
  fail "s_server did not start in 10 s"
}

run_client() {  # run_client LOG GROUPS ENV...
  local log=$1 groups=$2
  shift 2
  printf 'GET / HTTP/1.0\r\n\r\n' | timeout 30 env "$@" openssl s_client \
    -connect "127.0.0.1:$port" -servername localhost -groups "$groups" \
    -CAfile "$work/pki/ca.crt" -verify_return_error -ign_eof > "$log" 2>&1
}

finish_server() {
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

qkd_net_start "$work"
qkd_net_wait_keys 2 120 || fail "the KMEs produced no key in 120 s"

echo "--- 1. s_server/s_client over group qkd"
# shellcheck disable=SC2046
start_server "$work/server1.log" qkd $(app_env bob "$BOB_KME_URL")
# shellcheck disable=SC2046
run_client "$work/client1.log" qkd $(app_env alice "$ALICE_KME_URL") ||
  fail "handshake over qkd failed: $(tail -n 20 "$work/client1.log")"
finish_server
grep -q '^Shared groups: qkd$' "$work/client1.log" ||
  fail "server did not report group qkd: $(grep -i groups "$work/client1.log")"
grep -q 'Protocol *: TLSv1.3' "$work/client1.log" || fail "not TLS 1.3"
grep -q '^HTTP/1.0 200 ok' "$work/client1.log" || fail "application data did not cross (no reply to GET /)"
echo "ok: negotiated qkd, TLS 1.3, data crossed"

echo "--- 2. server's KME down: the handshake fails and says which KME"
dead=https://127.0.0.1:$(qkd_free_port)
# shellcheck disable=SC2046
start_server "$work/server2.log" qkd $(app_env bob "$dead")
# shellcheck disable=SC2046
if run_client "$work/client2.log" qkd $(app_env alice "$ALICE_KME_URL"); then
  grep -q '^Shared groups: qkd$' "$work/client2.log" && fail "handshake over qkd succeeded with the server's KME down"
fi
kill "$server_pid" 2>/dev/null || true
finish_server
grep -q "key service unreachable" "$work/server2.log" && grep -qF "$dead" "$work/server2.log" ||
  fail "the server's error does not name the KME $dead: $(cat "$work/server2.log")"
echo "ok: server reported: $(grep -m1 "key service unreachable" "$work/server2.log")"

echo "--- 3. fallback: client offers qkd:X25519, server has no provider"
start_server "$work/server3.log" X25519 OPENSSL_CONF=/dev/null
# shellcheck disable=SC2046
run_client "$work/client3.log" qkd:X25519 $(app_env alice "$ALICE_KME_URL") ||
  fail "fallback handshake failed: $(tail -n 20 "$work/client3.log")"
finish_server
grep -qi '^Shared groups: x25519$' "$work/client3.log" ||
  fail "fallback did not negotiate X25519: $(grep -i groups "$work/client3.log")"
echo "ok: fell back to X25519"
echo "3 passed, 0 failed"
