#!/usr/bin/env bash
# Interop: Debian's nginx (examples/nginx/nginx.conf.in: ssl_ecdh_curve qkd:X25519, TLS 1.3,
# 2 workers, `env` lines) serving HTTPS with the provider loaded through openssl.cnf, and
# Debian's curl as the client (--curves, provider through openssl.cnf). nginx reports the
# group in the body ($ssl_curve); checks by name, on both ends:
#   1. nginx starts with ssl_ecdh_curve qkd:X25519 (it refuses an unknown group);
#   2. curl --curves qkd, repeated: every request negotiated qkd (nginx: 0xfe40), TLS 1.3,
#      served by at least two different workers (the provider works after nginx's fork and
#      environment wipe);
#   3. curl --curves X25519 (no provider): the server's list falls back to X25519;
#   4. curl --curves qkd without the provider fails hard (exit 59), no silent downgrade.
#   Usage: tests/interop/nginx.sh BUILD_DIR
set -euo pipefail
source "$(dirname "$0")/common.sh"
interop_init "$@"
command -v nginx >/dev/null || fail "nginx is not installed (examples/install-deps.sh)"
curl --version | head -n1 | grep -q 'OpenSSL/3' ||
  fail "curl does not use OpenSSL 3: $(curl --version | head -n1)"
interop_net_start 30

# nginx's report of a provider group: its codepoint (see examples/nginx/nginx.conf.in).
QKD_NGINX_NAME=0xfe40

echo "--- 1. nginx starts with ssl_ecdh_curve qkd:X25519"
prefix=$work/nginx
mkdir -p "$prefix/tmp"
port=$(qkd_free_port)
user_line="# user: the master is not root, workers run as $(id -un)"
[ "$(id -u)" = 0 ] && user_line="user $(id -un) $(id -gn);"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@PORT@|$port|g" -e "s|@USER_LINE@|$user_line|" \
  -e "s|@CERT@|$work/pki/bob.crt|g" -e "s|@KEY@|$work/pki/bob.key|g" \
  "$QKD_ROOT/examples/nginx/nginx.conf.in" > "$prefix/nginx.conf"
# shellcheck disable=SC2046
bg "$work/nginx.out" env $(app_env bob "$BOB_KME_URL") \
  nginx -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/error.log"
nginx_pid=$bg_pid
wait_port "$port" "$nginx_pid" 15 ||
  fail "nginx did not start: $(cat "$work/nginx.out" "$prefix/error.log" 2>/dev/null | tail -n 20)"
for _ in $(seq 50); do  # both workers up
  [ "$(pgrep -P "$nginx_pid" | wc -l)" -ge 2 ] && break
  sleep 0.1
done
workers=$(pgrep -P "$nginx_pid" | wc -l || true)
[ "$workers" -ge 2 ] || fail "nginx runs $workers workers, want 2"
pass "nginx master $nginx_pid with $workers workers on port $port"

curl_get() {  # curl_get OUT CURVES ENV...
  local out=$1 curves=$2
  shift 2
  timeout 20 env "$@" curl -sS --max-time 15 --tlsv1.3 --curves "$curves" \
    --cacert "$work/pki/ca.crt" -o "$out" "https://localhost:$port/" 2> "$out.err"
}

echo "--- 2. curl --curves qkd: every request over qkd, several workers"
declare -A seen_workers=()
n=0
while [ $n -lt 40 ]; do
  n=$((n + 1))
  # shellcheck disable=SC2046
  curl_get "$work/qkd$n.out" qkd $(app_env alice "$ALICE_KME_URL") ||
    fail "curl --curves qkd, request $n failed: $(cat "$work/qkd$n.out.err"); nginx: $(tail -n 5 "$prefix/error.log")"
  body=$(cat "$work/qkd$n.out")
  case "$body" in
    "group=$QKD_NGINX_NAME protocol=TLSv1.3 worker="*) ;;
    *) fail "request $n: nginx reports '$body', want group=$QKD_NGINX_NAME (qkd) over TLSv1.3" ;;
  esac
  seen_workers[${body##*worker=}]=1
  [ $n -ge 8 ] && [ ${#seen_workers[@]} -ge 2 ] && break
done
[ ${#seen_workers[@]} -ge 2 ] ||
  fail "all $n requests went to one worker (${!seen_workers[*]}): could not check several workers"
pass "$n requests, all group qkd ($QKD_NGINX_NAME) over TLS 1.3, served by workers ${!seen_workers[*]}"

echo "--- 3. curl --curves X25519 without the provider: falls back to X25519"
for i in 1 2; do
  curl_get "$work/x$i.out" X25519 OPENSSL_CONF=/dev/null ||
    fail "curl --curves X25519 failed: $(cat "$work/x$i.out.err")"
  body=$(cat "$work/x$i.out")
  case "$body" in
    "group=X25519 protocol=TLSv1.3 worker="*) ;;
    *) fail "nginx reports '$body', want group=X25519" ;;
  esac
done
pass "a client without qkd got X25519 from the server's list qkd:X25519"

echo "--- 4. curl --curves qkd without the provider fails hard"
rc=0
curl_get "$work/noprov.out" qkd OPENSSL_CONF=/dev/null || rc=$?
[ $rc -ne 0 ] || fail "curl --curves qkd without the provider succeeded: $(cat "$work/noprov.out")"
pass "curl --curves qkd without the provider: exit $rc ($(head -c 120 "$work/noprov.out.err"))"

grep -E '\[(emerg|alert|crit)\]' "$prefix/error.log" && fail "nginx logged errors (above)"
stop_pid "$nginx_pid"
interop_done
