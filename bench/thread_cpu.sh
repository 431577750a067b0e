#!/usr/bin/env bash
# CPU time and context switches of both KMEs' threads, summed by thread name, over 4 s of a
# kms_load run (starting 2 s after its pool is ready), with `perf stat --per-thread`.
# Usage: bench/thread_cpu.sh KMS_LOAD [kms_load options...]
#   e.g. bench/thread_cpu.sh build/bin/kms_load --store durable --synchronous normal --conns 0 --seconds 10
# Needs perf (Debian package linux-perf) and permission to read the KMEs' counters.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,6p' "$0"; exit 2; }
load=$1
shift
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$load" "$@" >"$out/table" 2>"$out/err" &
lp=$!
for _ in $(seq 1 6000); do
  grep -q "keys ready" "$out/err" 2>/dev/null && break
  kill -0 "$lp" 2>/dev/null || break
  sleep 0.1
done
sleep 2
pids=$(pgrep -f "qkd-kms --config" | paste -sd, -)
[ -n "$pids" ] || { echo "no qkd-kms process found" >&2; cat "$out/err" >&2; exit 1; }
perf stat --per-thread -e task-clock,context-switches -p "$pids" -o "$out/perf" -- sleep 4 \
  >/dev/null 2>&1
wait "$lp"
grep "open loop" "$out/table" | head -1 || true
python3 - "$out/perf" <<'PY'
import collections, re, sys
cpu, cs = collections.Counter(), collections.Counter()
for line in open(sys.argv[1]):
    m = re.match(r'\s*(\S+)-(\d+)\s+([\d.,]+)\s+(msec\s+)?(task-clock|context-switches)', line)
    if not m:
        continue
    v = float(m.group(3).replace(',', ''))
    (cpu if m.group(5) == 'task-clock' else cs)[m.group(1)] += v
print("| thread | CPU ms | context switches |\n|---|---:|---:|")
for n in sorted(cpu, key=lambda k: -cpu[k]):
    print(f"| `{n}` | {cpu[n]:.0f} | {cs[n]:.0f} |")
print(f"| all | {sum(cpu.values()):.0f} | {sum(cs.values()):.0f} |")
PY
