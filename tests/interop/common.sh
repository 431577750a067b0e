# Shared by the interop tests (sourced, not run). Gives each test a work dir, a two-KME
# network, a tree of links so examples/<sae>-provider.cnf is used unchanged, pass/fail
# bookkeeping ending in "N passed, 0 failed", and a trap that stops everything started.
#   source common.sh; interop_init BUILD_DIR; interop_net_start; ...; interop_done
# shellcheck shell=bash
QKD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# Debian's python3 links the system OpenSSL 3.0 (a pyenv python first in PATH may not).
SYS_PYTHON=${SYS_PYTHON:-/usr/bin/python3}
INTEROP_PIDS=()
interop_passed=0
interop_failed=0

fail() {
  echo "FAIL: $*" >&2
  echo "$interop_passed passed, $((interop_failed + 1)) failed" >&2
  exit 1
}
interop_err() {  # from the ERR trap: set -e is about to stop the test
  echo "FAIL: line $2: '$3' exited with status $1" >&2
  echo "$interop_passed passed, $((interop_failed + 1)) failed" >&2
}
pass() { echo "ok: $*"; interop_passed=$((interop_passed + 1)); }
skip() { echo "SKIP: $*"; exit 77; }  # ctest SKIP_RETURN_CODE 77
interop_done() { echo "$interop_passed passed, $interop_failed failed"; }

interop_cleanup() {
  local pid
  for pid in "${INTEROP_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${INTEROP_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  INTEROP_PIDS=()
  if declare -F qkd_net_stop >/dev/null; then qkd_net_stop; fi
  if [ "${KEEP_WORK:-0}" = 1 ]; then echo "work dir kept: $work"; else rm -rf "$work"; fi
}

interop_init() {  # interop_init BUILD_DIR
  build=$(cd "${1:?usage: $0 BUILD_DIR}" && pwd)
  QKD_BIN=$build/bin
  # shellcheck source=../../examples/qkd-net.sh
  source "$QKD_ROOT/examples/qkd-net.sh"
  work=$(mktemp -d "${TMPDIR:-/tmp}/qkd-interop.XXXXXX")
  trap interop_cleanup EXIT
  # set -e stops a test at a failing command that has no `|| fail ...`: say where.
  trap 'interop_err $? $LINENO "$BASH_COMMAND"' ERR
  trap 'exit 130' INT TERM
  [ -f "$build/lib/ossl-modules/qkdprovider.so" ] ||
    fail "$build/lib/ossl-modules/qkdprovider.so not built"
  # examples/<sae>-provider.cnf finds the module and the PKI under $QKD_DEMO_DIR/{build/lib/
  # ossl-modules,examples/pki}: a tree of links to this build and this test's PKI.
  demo_root=$work/root
  mkdir -p "$demo_root/build/lib" "$demo_root/examples"
  ln -s "$build/lib/ossl-modules" "$demo_root/build/lib/ossl-modules"
  ln -s "$work/pki" "$demo_root/examples/pki"
}

interop_net_start() {  # interop_net_start [MIN_KEYS]
  QKD_PKI_DIR=$work/pki
  qkd_net_start "$work/net" > "$work/net-start.log" 2>&1 ||
    fail "the KME network did not start: $(tail -n 5 "$work/net-start.log")"
  qkd_net_wait_keys "${1:-2}" 60 || fail "the KMEs produced no key in 60 s"
}

app_env() {  # app_env SAE KME_URL: the environment of an app using examples/<sae>-provider.cnf
  echo OPENSSL_CONF="$QKD_ROOT/examples/$1-provider.cnf" QKD_DEMO_DIR="$demo_root" \
    QKD_KME_URL="$2" QKD_TIMEOUT_MS=3000
}

bg() {  # bg LOG CMD...: runs CMD in the background, stopped by the trap; sets bg_pid
  local log=$1
  shift
  "$@" > "$log" 2>&1 &
  bg_pid=$!
  INTEROP_PIDS+=("$bg_pid")
}

stop_pid() {  # stop_pid PID: stops one background process started with bg
  local pid=$1 p keep=()
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  for p in "${INTEROP_PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  INTEROP_PIDS=("${keep[@]}")
}

wait_port() {  # wait_port PORT PID TIMEOUT_S: until something listens on 127.0.0.1:PORT
  local deadline=$((SECONDS + $3))
  while ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    kill -0 "$2" 2>/dev/null || return 1
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.1
  done
}

start_s_server() {  # start_s_server LOG GROUPS ENV...: openssl s_server -www on a free port
  local log=$1 groups=$2
  shift 2
  port=$(qkd_free_port)
  bg "$log" env "$@" openssl s_server -accept "127.0.0.1:$port" -www -groups "$groups" \
    -cert "$work/pki/bob.crt" -key "$work/pki/bob.key"
  server_pid=$bg_pid
  for _ in $(seq 100); do
    grep -q ACCEPT "$log" 2>/dev/null && return 0
    kill -0 "$server_pid" 2>/dev/null || fail "s_server did not start: $(cat "$log")"
    sleep 0.1
  done
  fail "s_server did not start in 10 s"
}
