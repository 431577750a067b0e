# Shell helpers to run a two-KME QKD network on loopback (sourced by examples/demo.sh and
# the interop tests). Every port is chosen by the kernel (port 0) and read back from the
# daemons' ready files, so several networks can run side by side.
#
#   qkd_net_start WORKDIR [LENGTH_KM] [EVE_FRACTION]   # PKI, configs, both KMEs started
#     (QKD_CHANNEL_EXTRA / QKD_PROTOCOL_EXTRA: extra JSON members for link.channel and
#      link.protocol, e.g. '"source": "weak_coherent", "prob_decoy": 0.2'; QKD_MAX_KEY_COUNT:
#      keys.max_key_count, the pool size at which the links stop and only top up)
#   qkd_net_wait_keys MIN_KEYS TIMEOUT_S               # until both KMEs hold MIN_KEYS keys
#   qkd_status SAE KME_URL SLAVE                       # prints the ETSI 014 status JSON
#   qkd_net_stop                                       # stops what qkd_net_start started
# After qkd_net_start: ALICE_KME_URL, BOB_KME_URL, QKD_NET_DIR, QKD_PKI_DIR (the certificates:
# WORKDIR/pki unless QKD_PKI_DIR was set before).

QKD_ROOT=${QKD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
QKD_BIN=${QKD_BIN:-$QKD_ROOT/build/bin}
QKD_NET_PIDS=()

qkd_die() { echo "error: $*" >&2; exit 1; }

qkd_json_field() {  # qkd_json_field FILE_OR_- FIELD[.FIELD...]
  python3 -c '
import json, sys
src = sys.stdin if sys.argv[1] == "-" else open(sys.argv[1])
v = json.load(src)
for k in sys.argv[2].split("."):
    v = v[k]
print(v)' "$1" "$2"
}

qkd_wait_file() {  # qkd_wait_file FILE TIMEOUT_S PID
  local deadline=$((SECONDS + $2))
  while [ ! -s "$1" ]; do
    kill -0 "$3" 2>/dev/null || return 1
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.1
  done
}

qkd_write_kme_config() {  # qkd_write_kme_config FILE ROLE ME PEER MY_SAE PEER_SAE LINK_ADDR KM EVE PSK
  local role=$2 linkkey=listen limit=
  if [ -n "${QKD_MAX_KEY_COUNT:-}" ]; then
    [[ $QKD_MAX_KEY_COUNT =~ ^[1-9][0-9]*$ ]] ||
      qkd_die "QKD_MAX_KEY_COUNT must be a positive integer, got '$QKD_MAX_KEY_COUNT'"
    limit=", \"max_key_count\": $QKD_MAX_KEY_COUNT"
  fi
  [ "$role" = bob ] && linkkey=connect
  cat > "$1" <<JSON
{
  "kme_id": "$3",
  "api": {"listen": "127.0.0.1:0", "cert": "$QKD_PKI_DIR/$3.crt", "key": "$QKD_PKI_DIR/$3.key",
          "ca": "$QKD_PKI_DIR/ca.crt"},
  "saes": ["$5"],
  "keys": {"key_size": 256, "dec_wait_ms": 2000$limit},
  "link": {
    "peer_kme_id": "$4", "peer_saes": ["$6"], "role": "$role", "$linkkey": "$7",
    "psk_hex": "${10}",
    "channel": {"length_km": $8, "eve_intercept_fraction": $9${QKD_CHANNEL_EXTRA:+, $QKD_CHANNEL_EXTRA}},
    "protocol": {${QKD_PROTOCOL_EXTRA:-}}
  },
  "log_level": "info"
}
JSON
}

qkd_net_start() {
  local dir=$1 km=${2:-20} eve=${3:-0}
  [ -x "$QKD_BIN/qkd-kms" ] || qkd_die "$QKD_BIN/qkd-kms not built (run cmake --build build)"
  mkdir -p "$dir"
  QKD_NET_DIR=$(cd "$dir" && pwd)
  QKD_PKI_DIR=${QKD_PKI_DIR:-$QKD_NET_DIR/pki}
  "$QKD_ROOT/examples/pki.sh" "$QKD_PKI_DIR" alice-kme bob-kme alice bob mallory
  QKD_PKI_DIR=$(cd "$QKD_PKI_DIR" && pwd)
  local psk
  psk=$(openssl rand -hex 32)
  rm -f "$QKD_NET_DIR"/*.ready
  qkd_write_kme_config "$QKD_NET_DIR/alice-kme.json" alice alice-kme bob-kme alice bob \
    127.0.0.1:0 "$km" "$eve" "$psk"
  "$QKD_BIN/qkd-kms" --config "$QKD_NET_DIR/alice-kme.json" \
    --ready-file "$QKD_NET_DIR/alice-kme.ready" > "$QKD_NET_DIR/alice-kme.log" 2>&1 &
  QKD_NET_PIDS+=($!)
  qkd_wait_file "$QKD_NET_DIR/alice-kme.ready" 20 "$!" ||
    qkd_die "alice-kme did not start; its log: $QKD_NET_DIR/alice-kme.log: $(tail -n 5 "$QKD_NET_DIR/alice-kme.log")"
  local link_port
  link_port=$(qkd_json_field "$QKD_NET_DIR/alice-kme.ready" link_port)
  ALICE_KME_URL=https://127.0.0.1:$(qkd_json_field "$QKD_NET_DIR/alice-kme.ready" api_port)
  qkd_write_kme_config "$QKD_NET_DIR/bob-kme.json" bob bob-kme alice-kme bob alice \
    "127.0.0.1:$link_port" "$km" "$eve" "$psk"
  "$QKD_BIN/qkd-kms" --config "$QKD_NET_DIR/bob-kme.json" \
    --ready-file "$QKD_NET_DIR/bob-kme.ready" > "$QKD_NET_DIR/bob-kme.log" 2>&1 &
  QKD_NET_PIDS+=($!)
  qkd_wait_file "$QKD_NET_DIR/bob-kme.ready" 20 "$!" ||
    qkd_die "bob-kme did not start; its log: $QKD_NET_DIR/bob-kme.log: $(tail -n 5 "$QKD_NET_DIR/bob-kme.log")"
  BOB_KME_URL=https://127.0.0.1:$(qkd_json_field "$QKD_NET_DIR/bob-kme.ready" api_port)
  export ALICE_KME_URL BOB_KME_URL QKD_NET_DIR QKD_PKI_DIR
}

qkd_status() {  # qkd_status SAE KME_URL SLAVE
  curl -sS --max-time 5 --cert "$QKD_PKI_DIR/$1.crt" --key "$QKD_PKI_DIR/$1.key" \
    --cacert "$QKD_PKI_DIR/ca.crt" "$2/api/v1/keys/$3/status"
}

qkd_net_wait_keys() {  # qkd_net_wait_keys MIN_KEYS TIMEOUT_S
  local deadline=$((SECONDS + $2)) a b
  while :; do
    a=$(qkd_status alice "$ALICE_KME_URL" bob 2>/dev/null | qkd_json_field - stored_key_count 2>/dev/null || echo 0)
    b=$(qkd_status bob "$BOB_KME_URL" alice 2>/dev/null | qkd_json_field - stored_key_count 2>/dev/null || echo 0)
    [ "$a" -ge "$1" ] && [ "$b" -ge "$1" ] && return 0
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

qkd_net_stop() {
  local pid
  for pid in "${QKD_NET_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${QKD_NET_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  QKD_NET_PIDS=()
}

qkd_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
