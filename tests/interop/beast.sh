#!/usr/bin/env bash
# Interop: a C++ HTTPS server and client on Boost.Beast (examples/cpp/, built as
# build/bin/beast-https-{server,client}) that know nothing of QKD: default SSL_CTX settings,
# groups and provider from openssl.cnf. Each logs SSL_group_to_name(SSL_get_negotiated_group),
# so the group is checked BY NAME on both ends:
#   1. server (bob-provider.cnf) <- client (alice-provider.cnf), 3 connections: both report
#      group=qkd over TLSv1.3 and the HTTP reply (naming the server's group) crossed;
#   2. client (Groups = qkd:X25519) -> server without the provider: both report X25519;
#   3. client -> Python http.server + ssl (examples/python/https_server.py, bob cnf): the
#      client reports group=qkd (Python itself cannot name it) and the reply crossed.
#   Usage: tests/interop/beast.sh BUILD_DIR     (BEAST_BIN_DIR overrides BUILD_DIR/bin)
set -euo pipefail
source "$(dirname "$0")/common.sh"
interop_init "$@"
bin=${BEAST_BIN_DIR:-$build/bin}
for b in beast-https-server beast-https-client; do
  [ -x "$bin/$b" ] || fail "$bin/$b not built (cmake --build build --target $b)"
done
interop_net_start 10

start_beast_server() {  # start_beast_server LOG ENV...
  local log=$1
  shift
  port=$(qkd_free_port)
  bg "$log" env "$@" "$bin/beast-https-server" --port "$port" \
    --cert "$work/pki/bob.crt" --key "$work/pki/bob.key"
  server_pid=$bg_pid
  for _ in $(seq 100); do
    grep -q '^listening on' "$log" && return 0
    kill -0 "$server_pid" 2>/dev/null || fail "beast-https-server did not start: $(cat "$log")"
    sleep 0.1
  done
  fail "beast-https-server did not start in 10 s"
}

beast_client() {  # beast_client OUT ENV...
  local out=$1
  shift
  timeout 30 env "$@" "$bin/beast-https-client" --host localhost --port "$port" \
    --cafile "$work/pki/ca.crt" > "$out" 2>&1
}

echo "--- 1. beast client (alice cnf) -> beast server (bob cnf)"
# shellcheck disable=SC2046
start_beast_server "$work/server1.log" $(app_env bob "$BOB_KME_URL")
for i in 1 2 3; do
  # shellcheck disable=SC2046
  beast_client "$work/client1.$i.out" $(app_env alice "$ALICE_KME_URL") ||
    fail "connection $i failed: $(cat "$work/client1.$i.out"); server: $(tail -n 3 "$work/server1.log")"
  grep -q '^client: group=qkd protocol=TLSv1.3 ' "$work/client1.$i.out" ||
    fail "connection $i: client did not negotiate qkd over TLS 1.3: $(grep '^client:' "$work/client1.$i.out")"
  grep -q '^hello from beast, group=qkd$' "$work/client1.$i.out" ||
    fail "connection $i: the HTTP reply did not cross: $(cat "$work/client1.$i.out")"
done
stop_pid "$server_pid"
n=$(grep -c '^server: group=qkd protocol=TLSv1.3 ' "$work/server1.log" || true)
[ "$n" = 3 ] || fail "server reported qkd on $n of 3 connections: $(grep '^server:' "$work/server1.log")"
pass "3 connections, both ends report group=qkd TLSv1.3 ($(grep -m1 '^client:' "$work/client1.1.out")), replies crossed"

echo "--- 2. beast client (qkd:X25519) -> beast server without the provider"
start_beast_server "$work/server2.log" OPENSSL_CONF=/dev/null
# shellcheck disable=SC2046
beast_client "$work/client2.out" $(app_env alice "$ALICE_KME_URL") ||
  fail "fallback connection failed: $(cat "$work/client2.out")"
stop_pid "$server_pid"
grep -qi '^client: group=X25519 ' "$work/client2.out" ||
  fail "client did not fall back to X25519: $(grep '^client:' "$work/client2.out")"
grep -qi '^server: group=X25519 ' "$work/server2.log" ||
  fail "server did not report X25519: $(grep '^server:' "$work/server2.log")"
pass "both ends fell back to X25519"

echo "--- 3. beast client -> Python http.server + ssl (bob cnf)"
if [ -x "$SYS_PYTHON" ]; then
  port=$(qkd_free_port)
  # shellcheck disable=SC2046
  bg "$work/pyserver.log" env $(app_env bob "$BOB_KME_URL") "$SYS_PYTHON" \
    "$QKD_ROOT/examples/python/https_server.py" --port "$port" \
    --cert "$work/pki/bob.crt" --key "$work/pki/bob.key"
  pyserver_pid=$bg_pid
  for _ in $(seq 100); do
    grep -q '^listening on' "$work/pyserver.log" && break
    kill -0 "$pyserver_pid" 2>/dev/null || fail "Python server did not start: $(cat "$work/pyserver.log")"
    sleep 0.1
  done
  # shellcheck disable=SC2046
  beast_client "$work/client3.out" $(app_env alice "$ALICE_KME_URL") ||
    fail "connection to the Python server failed: $(cat "$work/client3.out"); server: $(tail -n 3 "$work/pyserver.log")"
  stop_pid "$pyserver_pid"
  grep -q '^client: group=qkd protocol=TLSv1.3 ' "$work/client3.out" ||
    fail "client did not negotiate qkd with Python: $(grep '^client:' "$work/client3.out")"
  grep -q '^hello from python TLSv1.3$' "$work/client3.out" ||
    fail "the Python server's reply did not cross: $(cat "$work/client3.out")"
  pass "Python server negotiated qkd (named by the beast client), reply crossed"
else
  echo "(no $SYS_PYTHON: part 3 not run)"
fi
interop_done
