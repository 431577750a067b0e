#!/usr/bin/env bash
# `openssl s_time -new` handshake rates for X25519, qkd, x25519_qkd and p256_qkd, the group
# chosen through openssl.cnf (s_time has no -groups option): one `openssl s_server -www`
# (Debian's binary, qkdprovider loaded through openssl.cnf, admission limits lifted: one
# client SAE on purpose) and, per group, `s_time` with a copy of
# examples/alice-provider.cnf whose `Groups =` line names only that group. Two real
# qkd-kms daemons on loopback supply the keys. Before timing a group, one s_client run
# with the same openssl.cnf checks, by name, that the group is the one negotiated.
# Groups run round-robin (ROUNDS rounds of SECONDS each) so that drift in machine load
# spreads over all of them. Prints a Markdown table; the rate is connections / the time
# s_time spent connecting (its -time window; s_time's own "connections/user sec" counts
# only its user CPU time). Waits first until both KMEs hold MIN_KEYS keys, since every qkd
# connection spends one.
#
#   bench/s_time.sh BUILD_DIR [SECONDS=2] [ROUNDS=3] [PREFETCH=32] [MIN_KEYS=8000]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../tests/interop/common.sh
source "$here/../tests/interop/common.sh"
interop_init "${1:?usage: $0 BUILD_DIR [SECONDS] [ROUNDS] [PREFETCH]}"
secs=${2:-2}
rounds=${3:-3}
prefetch=${4:-32}
min_keys=${5:-8000}
groups=(X25519 qkd x25519_qkd p256_qkd)

# The pool limit is MIN_KEYS (at least 8,000): the links fill the pool, then only top it up
# as connections spend keys (as a deployed link at its limit), instead of producing at full
# speed, their simulated engines and link I/O taking the CPUs from every group, during the
# runs. Topping up (thousands of keys per second) outpaces s_time (hundreds per second).
export QKD_MAX_KEY_COUNT=$((min_keys > 8000 ? min_keys : 8000))
interop_net_start 64
qkd_net_wait_keys "$min_keys" 300 || fail "the KMEs hold fewer than $min_keys keys after 300 s"

# Server: bob's example config, admission lifted, prefetch as asked.
sed -e "s|^timeout_ms = .*|timeout_ms = 5000\nadmit_rate = 1000000\nadmit_burst = 1000000\nadmit_outstanding = 1000\nadmit_outstanding_total = 1000\nprefetch_keys = $prefetch|" \
  "$QKD_ROOT/examples/bob-provider.cnf" > "$work/bob.cnf"
grep -q "^prefetch_keys = $prefetch$" "$work/bob.cnf" || fail "could not write the server's openssl.cnf"
# Clients: alice's example config with one group on the Groups line.
for g in "${groups[@]}"; do
  sed -e "s|^Groups = .*|Groups = $g|" "$QKD_ROOT/examples/alice-provider.cnf" > "$work/alice-$g.cnf"
  grep -q "^Groups = $g$" "$work/alice-$g.cnf" || fail "could not write alice-$g.cnf"
done
server_env=(OPENSSL_CONF="$work/bob.cnf" QKD_DEMO_DIR="$demo_root" QKD_KME_URL="$BOB_KME_URL")
client_env() { echo OPENSSL_CONF="$work/alice-$1.cnf" QKD_DEMO_DIR="$demo_root" QKD_KME_URL="$ALICE_KME_URL"; }

start_s_server "$work/server.log" "X25519:qkd:x25519_qkd:p256_qkd" "${server_env[@]}"

# The group each config negotiates, by name (an unknown name on the Groups line would make
# OpenSSL silently fall back to its default groups).
for g in "${groups[@]}"; do
  # shellcheck disable=SC2046
  printf 'GET / HTTP/1.0\r\n\r\n' | timeout 30 env $(client_env "$g") openssl s_client \
    -connect "127.0.0.1:$port" -servername localhost -CAfile "$work/pki/ca.crt" \
    -verify_return_error -ign_eof > "$work/check-$g.log" 2>&1 ||
    fail "s_client with Groups = $g failed: $(tail -n 5 "$work/check-$g.log")"
  grep -qix "Shared groups: $g" "$work/check-$g.log" ||
    fail "Groups = $g negotiated $(grep -i 'shared groups' "$work/check-$g.log")"
done
pass "each openssl.cnf negotiates its group"

declare -A conns window
for g in "${groups[@]}"; do conns[$g]=0; window[$g]=0; done
for r in $(seq "$rounds"); do
  for g in "${groups[@]}"; do
    # shellcheck disable=SC2046
    env $(client_env "$g") openssl s_time -connect "127.0.0.1:$port" -new -time "$secs" \
      > "$work/s_time-$g-$r.log" 2>&1 || fail "s_time for $g failed: $(tail -n 5 "$work/s_time-$g-$r.log")"
    # "N connections in T real seconds, ..." (T: whole seconds of its -time window)
    read -r n t < <(sed -n 's/^\([0-9]*\) connections in \([0-9.]*\) real seconds.*/\1 \2/p' \
      "$work/s_time-$g-$r.log" | head -n1) || true
    [ -n "${n:-}" ] && [ "$n" -gt 0 ] || fail "s_time for $g made no connection: $(cat "$work/s_time-$g-$r.log")"
    grep -qi "error" "$work/s_time-$g-$r.log" && fail "s_time for $g reported errors: $(grep -i -m3 error "$work/s_time-$g-$r.log")"
    conns[$g]=$((conns[$g] + n))
    window[$g]=$((window[$g] + t))
  done
done
kill -0 "$server_pid" || fail "s_server died: $(tail -n 5 "$work/server.log")"
grep -qi "error" "$work/server.log" && fail "s_server reported errors: $(grep -i -m3 error "$work/server.log")"
pass "s_time ran $rounds rounds of ${secs} s per group"

base=$(python3 -c "print(${conns[X25519]} / ${window[X25519]})")
echo
echo "| group (openssl.cnf Groups =) | connections | s_time window (s) | handshakes/s | rate vs X25519 |"
echo "|---|---:|---:|---:|---:|"
for g in "${groups[@]}"; do
  python3 -c "r = ${conns[$g]} / ${window[$g]}; print('| $g | ${conns[$g]} | ${window[$g]} | %.0f | %.2f |' % (r, r / $base))"
done
echo
echo "s_time -new -time $secs, $rounds rounds round-robin; server prefetch_keys = $prefetch."
interop_done
