#!/usr/bin/env bash
# Interop: Python's ssl module (Debian's /usr/bin/python3, system OpenSSL 3) with the group
# list coming only from openssl.cnf (Python 3.11 cannot name the group, and
# set_ecdh_curve('qkd') raises): examples/python/https_{client,server}.py, which know
# nothing of QKD. The group is asserted on the other end, by name where OpenSSL gives it:
#   1. Python client (Groups = qkd:X25519) -> openssl s_server -www -groups qkd: the server
#      reports "Shared groups: qkd", TLS 1.3, and the page crossed (2 connections);
#   2. same client -> s_server without the provider (X25519): falls back to X25519;
#   3. Python client with Groups = qkd only -> the same server: the handshake fails
#      (no silent downgrade when qkd is mandatory);
#   4. openssl s_client -groups qkd (offers only qkd) -> Python http.server + ssl: the
#      reply crossed and the ServerHello key_share is group 0xfe40 (qkd's codepoint).
#   Usage: tests/interop/python_ssl.sh BUILD_DIR
set -euo pipefail
source "$(dirname "$0")/common.sh"
interop_init "$@"
[ -x "$SYS_PYTHON" ] || fail "$SYS_PYTHON not found (Debian's python3, examples/install-deps.sh)"
ver=$("$SYS_PYTHON" -c 'import ssl, sys; print(sys.version.split()[0], ssl.OPENSSL_VERSION)')
case "$ver" in
  3.*" OpenSSL 3."*) echo "python: $ver" ;;
  *) fail "$SYS_PYTHON is not Python 3 on OpenSSL 3: $ver" ;;
esac
pyclient=$QKD_ROOT/examples/python/https_client.py
pyserver=$QKD_ROOT/examples/python/https_server.py
interop_net_start 10

echo "--- 1. Python client -> s_server -groups qkd"
# shellcheck disable=SC2046
start_s_server "$work/server1.log" qkd $(app_env bob "$BOB_KME_URL")
for i in 1 2; do
  # shellcheck disable=SC2046
  timeout 30 env $(app_env alice "$ALICE_KME_URL") "$SYS_PYTHON" "$pyclient" \
    "https://localhost:$port/" --cafile "$work/pki/ca.crt" > "$work/client1.$i.out" 2>&1 ||
    fail "Python client, connection $i: $(tail -n 5 "$work/client1.$i.out"); server: $(tail -n 5 "$work/server1.log")"
  grep -q '^Shared groups: qkd$' "$work/client1.$i.out" ||
    fail "connection $i: s_server did not report group qkd: $(grep -i 'groups' "$work/client1.$i.out")"
  grep -q 'TLSv1.3' "$work/client1.$i.out" || fail "connection $i: not TLS 1.3"
  grep -q '^HTTP/1.0 200 ok' "$work/client1.$i.out" || fail "connection $i: no page"
done
pass "Python ssl client negotiated qkd twice ($(head -n1 "$work/client1.1.out"))"
stop_pid "$server_pid"

echo "--- 2. Python client (Groups = qkd:X25519) -> s_server without the provider"
start_s_server "$work/server2.log" X25519 OPENSSL_CONF=/dev/null
# shellcheck disable=SC2046
timeout 30 env $(app_env alice "$ALICE_KME_URL") "$SYS_PYTHON" "$pyclient" \
  "https://localhost:$port/" --cafile "$work/pki/ca.crt" > "$work/client2.out" 2>&1 ||
  fail "fallback connection failed: $(tail -n 5 "$work/client2.out")"
grep -qi '^Shared groups: x25519$' "$work/client2.out" ||
  fail "fallback did not negotiate X25519: $(grep -i groups "$work/client2.out")"
pass "fell back to X25519"

echo "--- 3. Python client with Groups = qkd only -> the same server: fails"
sed 's/^Groups *=.*/Groups = qkd/' "$QKD_ROOT/examples/alice-provider.cnf" > "$work/alice-qkd-only.cnf"
grep -q '^Groups = qkd$' "$work/alice-qkd-only.cnf" || fail "could not write a Groups = qkd cnf"
# shellcheck disable=SC2046
if timeout 30 env $(app_env alice "$ALICE_KME_URL") OPENSSL_CONF="$work/alice-qkd-only.cnf" \
  "$SYS_PYTHON" "$pyclient" "https://localhost:$port/" --cafile "$work/pki/ca.crt" \
  > "$work/client3.out" 2>&1; then
  fail "a qkd-only client connected to an X25519-only server: $(grep -i groups "$work/client3.out")"
fi
grep -q 'SSLError' "$work/client3.out" || fail "expected an ssl.SSLError: $(tail -n 3 "$work/client3.out")"
pass "qkd-only client refused: $(grep -m1 -o 'SSLError.*' "$work/client3.out" | head -c 150)"
stop_pid "$server_pid"

echo "--- 4. openssl s_client -groups qkd -> Python http.server + ssl"
port=$(qkd_free_port)
# shellcheck disable=SC2046
bg "$work/pyserver.log" env $(app_env bob "$BOB_KME_URL") "$SYS_PYTHON" "$pyserver" \
  --port "$port" --cert "$work/pki/bob.crt" --key "$work/pki/bob.key"
pyserver_pid=$bg_pid
for _ in $(seq 100); do
  grep -q '^listening on' "$work/pyserver.log" && break
  kill -0 "$pyserver_pid" 2>/dev/null || fail "Python server did not start: $(cat "$work/pyserver.log")"
  sleep 0.1
done
grep -q '^listening on' "$work/pyserver.log" || fail "Python server did not start in 10 s"
# shellcheck disable=SC2046
printf 'GET / HTTP/1.0\r\n\r\n' | timeout 30 env $(app_env alice "$ALICE_KME_URL") \
  openssl s_client -connect "127.0.0.1:$port" -servername localhost -groups qkd -trace \
  -CAfile "$work/pki/ca.crt" -verify_return_error -ign_eof > "$work/client4.log" 2>&1 || true
grep -q '^hello from python TLSv1.3$' "$work/client4.log" ||
  fail "no reply from the Python server over TLS 1.3: $(tail -n 5 "$work/client4.log"); server: $(tail -n 5 "$work/pyserver.log")"
# -trace: the first "NamedGroup" line after "ServerHello" is the ServerHello's key_share
sh_group=$(awk '/ServerHello/ { sh = 1 } sh && /NamedGroup:/ { sub(/^ */, ""); print; exit }' \
  "$work/client4.log")
[ "$sh_group" = "NamedGroup: UNKNOWN (65088)" ] ||
  fail "ServerHello key_share is '$sh_group', want qkd's codepoint 0xfe40 (65088)"
pass "Python server answered over TLS 1.3; ServerHello key_share 0xfe40 = qkd (client offered only qkd)"
stop_pid "$pyserver_pid"
interop_done
