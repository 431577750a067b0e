#!/usr/bin/env bash
# The demo: two KMEs joined by a simulated 20 km fiber running BB84, and a TLS 1.3 handshake
# between `openssl s_server` (SAE bob) and `openssl s_client` (SAE alice) over group `qkd`.
# Installs what is missing, builds, runs, prints what was negotiated and the link figures,
# stops everything it started. Exit 0 only if the handshake used group qkd.
#   Usage: examples/demo.sh [LENGTH_KM]      (environment: JOBS=N for the build)
set -euo pipefail
QKD_ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$QKD_ROOT"
km=${1:-20}

step() { printf '\n== %s\n' "$*"; }

step "Installing missing packages (if any)"
examples/install-deps.sh
step "Building (build/)"
cmake --preset default >/dev/null
cmake --build build -j "${JOBS:-$(nproc)}" | tail -n 1

# shellcheck source=examples/qkd-net.sh
source examples/qkd-net.sh
work=$QKD_ROOT/examples/run          # configs, logs
export QKD_PKI_DIR=$QKD_ROOT/examples/pki   # where examples/*-provider.cnf expect it
rm -rf "$work"
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
  qkd_net_stop
}
trap cleanup EXIT

# A weak coherent source with vacuum + weak decoy states, the key length from the finite-key
# decoy bound (Lim 2014), which needs large blocks (5e7 pulses, 0.05 s of link time each);
# every classical message authenticated (Wegman-Carter, paid from the link's key).
export QKD_CHANNEL_EXTRA='"source": "weak_coherent", "mu_signal": 0.5, "mu_decoy": 0.1, "prob_decoy": 0.2, "prob_vacuum": 0.1'
export QKD_PROTOCOL_EXTRA='"key_bound": "finite-decoy", "pulses_per_block": 50000000'
step "Starting alice-kme and bob-kme, linked by ${km} km of simulated fiber (decoy-state BB84)"
qkd_net_start "$work" "$km"
echo "alice-kme: $ALICE_KME_URL   bob-kme: $BOB_KME_URL   (logs in $work)"
echo -n "waiting for the BB84 link to produce key ... "
qkd_net_wait_keys 4 120 || qkd_die "no key after 120 s; see $work/alice-kme.log and $work/bob-kme.log"
echo "ok"

# The apps read examples/<sae>-provider.cnf unchanged; only the KME's URL is overridden,
# because the KMEs listen on ports the kernel chose.
provider_env() {  # provider_env SAE KME_URL: the environment for an app that is SAE $1
  echo OPENSSL_CONF="$QKD_ROOT/examples/$1-provider.cnf" QKD_DEMO_DIR="$QKD_ROOT" QKD_KME_URL="$2"
}

step "TLS 1.3: openssl s_server (SAE bob) <-> openssl s_client (SAE alice), -groups qkd"
port=$(qkd_free_port)
# shellcheck disable=SC2046
env $(provider_env bob "$BOB_KME_URL") openssl s_server -accept "127.0.0.1:$port" -naccept 1 \
  -www -groups qkd -cert "$QKD_PKI_DIR/bob.crt" -key "$QKD_PKI_DIR/bob.key" \
  > "$work/s_server.log" 2>&1 &
server_pid=$!
for _ in $(seq 50); do
  grep -q ACCEPT "$work/s_server.log" 2>/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || qkd_die "s_server failed: $(cat "$work/s_server.log")"
  sleep 0.1
done
# shellcheck disable=SC2046
printf 'GET / HTTP/1.0\r\n\r\n' | env $(provider_env alice "$ALICE_KME_URL") \
  openssl s_client -connect "127.0.0.1:$port" -servername localhost -groups qkd \
  -CAfile "$QKD_PKI_DIR/ca.crt" -verify_return_error -ign_eof > "$work/s_client.log" 2>&1 ||
  qkd_die "s_client failed: $(tail -n 20 "$work/s_client.log")"
wait "$server_pid" 2>/dev/null || true
server_pid=""

shared=$(grep -m1 '^Shared groups:' "$work/s_client.log" | sed 's/^Shared groups: *//') || true
protocol=$(grep -m1 -E '^ *Protocol *:' "$work/s_client.log" | sed 's/.*: *//') || true
cipher=$(grep -m1 -E '^ *Cipher *:' "$work/s_client.log" | sed 's/.*: *//') || true
echo "protocol:          ${protocol:-?}"
echo "cipher:            ${cipher:-?}"
echo "negotiated group:  ${shared:-none}   (server's report; both sides offered only qkd)"
[ "$shared" = "qkd" ] || qkd_die "the handshake did not use group qkd; see $work/s_client.log"

step "The QKD link (alice-kme's view)"
qkd_status alice "$ALICE_KME_URL" bob | python3 -c '
import json, sys
s = json.load(sys.stdin)
link = s.get("status_extension", {}).get("link", {})
def rate(k): return "%12.1f bit/s" % link.get(k, 0.0)
print("keys stored:       %d of %d-bit keys for SAE pair %s -> %s" % (
    s["stored_key_count"], s["key_size"], s["master_SAE_ID"], s["slave_SAE_ID"]))
print("QBER:              %.2f %%" % (100 * link.get("qber", 0.0)))
print("raw key rate:      " + rate("raw_key_rate_bps"))
print("sifted key rate:   " + rate("sifted_key_rate_bps"))
print("authentication:    " + rate("auth_key_rate_bps") + " of QKD key (Wegman-Carter)")
print("secret key rate:   " + rate("secret_key_rate_bps") + " net, after authentication")
bound = link.get("key_bound", "?")
print("key length from:   %s%s" % (bound, "" if "finite" in bound.lower() else
      "\n                   (an estimate at this block size, not a finite-key bound: docs/KMS.md)"))
print("blocks:            %s (aborted: %s)" % (link.get("blocks"), link.get("aborted_blocks")))
print("(rates per second of simulated link time at the configured pulse rate)")
'
step "Demo succeeded: TLS 1.3 over group qkd, secret from a BB84 key"
