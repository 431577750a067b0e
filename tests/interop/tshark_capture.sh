#!/usr/bin/env bash
# Interop: what group qkd looks like on the wire. Captures on lo (tshark, capture filter on
# this test's port) one openssl s_client -> s_server handshake over qkd (provider through
# openssl.cnf) and checks, with Wireshark's dissector (which shows the private-use
# codepoint as "Unknown (0xfe40)" / "Unknown (65088)"):
#   1. the handshake negotiated qkd (s_server: "Shared groups: qkd");
#   2. the ClientHello's supported_groups lists 0xfe40 then x25519 (client -groups qkd:X25519);
#   3. the ClientHello's key_share carries one share, group 0xfe40;
#   4. the ServerHello's key_share answers with group 0xfe40.
# Exits 77 (ctest: skipped) if tshark is missing or capturing on lo is not permitted here.
#   Usage: tests/interop/tshark_capture.sh BUILD_DIR
set -euo pipefail
source "$(dirname "$0")/common.sh"
interop_init "$@"
command -v tshark >/dev/null || skip "tshark is not installed (examples/install-deps.sh)"
interop_net_start 3

# shellcheck disable=SC2046
start_s_server "$work/server.log" qkd $(app_env bob "$BOB_KME_URL")
bg "$work/tshark.log" tshark -i lo -f "tcp port $port" -w "$work/cap.pcapng"
tshark_pid=$bg_pid
for _ in $(seq 150); do
  grep -q 'Capture started\|^Capturing on' "$work/tshark.log" && break
  if ! kill -0 "$tshark_pid" 2>/dev/null; then
    grep -qi 'permission\|not permitted\|capture privileges' "$work/tshark.log" &&
      skip "capturing on lo is not permitted here: $(grep -i -m1 'permission\|permitted\|privileges' "$work/tshark.log")"
    fail "tshark did not start: $(cat "$work/tshark.log")"
  fi
  sleep 0.1
done
grep -q 'Capture started\|^Capturing on' "$work/tshark.log" || fail "tshark did not start capturing in 15 s"
sleep 0.5  # the capture runs once the message is out; leave it a moment

echo "--- 1. s_client -groups qkd:X25519 -> s_server -groups qkd, captured"
# shellcheck disable=SC2046
printf 'GET / HTTP/1.0\r\n\r\n' | timeout 30 env $(app_env alice "$ALICE_KME_URL") \
  openssl s_client -connect "127.0.0.1:$port" -servername localhost -groups qkd:X25519 \
  -CAfile "$work/pki/ca.crt" -verify_return_error -ign_eof > "$work/client.log" 2>&1 ||
  fail "handshake failed: $(tail -n 10 "$work/client.log")"
grep -q '^Shared groups: qkd$' "$work/client.log" ||
  fail "s_server did not report group qkd: $(grep -i groups "$work/client.log")"
pass "handshake negotiated qkd"
sleep 0.5
kill -INT "$tshark_pid" 2>/dev/null || true
stop_pid "$tshark_pid"
stop_pid "$server_pid"

dissect() {  # dissect HANDSHAKE_TYPE: tshark -V of the frames holding that handshake message
  tshark -r "$work/cap.pcapng" -d "tcp.port==$port,tls" -V -Y "tls.handshake.type==$1" 2>/dev/null
}
dissect 1 > "$work/clienthello.txt"
dissect 2 > "$work/serverhello.txt"
[ -s "$work/clienthello.txt" ] || fail "no ClientHello in the capture ($(tshark -r "$work/cap.pcapng" 2>/dev/null | wc -l) packets)"
[ -s "$work/serverhello.txt" ] || fail "no ServerHello in the capture"

echo "--- 2. ClientHello supported_groups"
groups=$(grep -E '^ *Supported Group: ' "$work/clienthello.txt" | sed 's/^ *Supported Group: //' | paste -sd, - || true)
[ "$groups" = "Unknown (0xfe40),x25519 (0x001d)" ] ||
  fail "ClientHello supported_groups is '$groups', want 'Unknown (0xfe40),x25519 (0x001d)'"
pass "ClientHello supported_groups: $groups"

echo "--- 3. ClientHello key_share"
shares=$(grep -E '^ *Key Share Entry: ' "$work/clienthello.txt" | sed 's/^ *Key Share Entry: //' | paste -sd';' - || true)
case "$shares" in
  "Group: Unknown (65088), Key Exchange length: "*[0-9]) ;;
  *) fail "ClientHello key_share is '$shares', want one share of group 0xfe40 (65088)" ;;
esac
pass "ClientHello key_share: $shares"

echo "--- 4. ServerHello key_share"
sshare=$(grep -E '^ *Key Share Entry: ' "$work/serverhello.txt" | sed 's/^ *Key Share Entry: //' | paste -sd';' - || true)
case "$sshare" in
  "Group: Unknown (65088), Key Exchange length: "*[0-9]) ;;
  *) fail "ServerHello key_share is '$sshare', want group 0xfe40 (65088)" ;;
esac
pass "ServerHello key_share: $sshare"
interop_done
