#!/usr/bin/env bash
# End to end over loopback HTTP/1.1 (DESIGN.md's budget: server CPU per request with the layer
# <= 1.03x without; requests/s >= 97%). The server (examples/e2e_server.rs, one thread) is
# pinned to core 0 and wrk to core 1; each mode runs ROUNDS times, alternating, and the median
# is reported. Server CPU is utime+stime from /proc/<pid>/stat over the measured run.
#
#   bash benches/e2e.sh            # needs wrk (apt-get install wrk) and 2 cores
#
# Env: DURATION (s, default 10), CONNECTIONS (default 32), ROUNDS (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/orgkey-target}"
DURATION="${DURATION:-10}"
CONNECTIONS="${CONNECTIONS:-32}"
ROUNDS="${ROUNDS:-5}"
command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }

cargo build --release --example e2e_server
bin="$CARGO_TARGET_DIR/release/examples/e2e_server"
clk=$(getconf CLK_TCK)

run() { # run MODE PORT -> prints "rps cpu_us_per_request"
  local mode=$1 port=$2 flag=
  [ "$mode" = on ] && flag=--auth
  taskset -c 0 "$bin" --listen "127.0.0.1:$port" $flag >/dev/null &
  local pid=$!
  for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  local hdr=(-H 'x-org-id: acme' -H 'x-api-key: AbCdEf123456')
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s "${hdr[@]}" "http://127.0.0.1:$port/" >/dev/null # warm-up
  local before after out requests
  before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  out=$(taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" "${hdr[@]}" "http://127.0.0.1:$port/")
  after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  if echo "$out" | grep -q "Non-2xx"; then echo "mode $mode: non-2xx answers" >&2; echo "$out" >&2; exit 1; fi
  requests=$(echo "$out" | awk '/requests in/ {print $1}')
  awk -v r="$requests" -v d="$DURATION" -v t="$((after - before))" -v c="$clk" \
    'BEGIN { printf "%.0f %.3f\n", r / d, t / c * 1e6 / r }'
}

median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

: > /tmp/orgkey-e2e-off; : > /tmp/orgkey-e2e-on
for round in $(seq 1 "$ROUNDS"); do
  for mode in off on; do
    line=$(run "$mode" $((18090 + round)))
    echo "round $round layer $mode: $line (requests/s, server CPU us/request)"
    echo "$line" >> "/tmp/orgkey-e2e-$mode"
  done
done
off_rps=$(cut -d' ' -f1 /tmp/orgkey-e2e-off | median); on_rps=$(cut -d' ' -f1 /tmp/orgkey-e2e-on | median)
off_cpu=$(cut -d' ' -f2 /tmp/orgkey-e2e-off | median); on_cpu=$(cut -d' ' -f2 /tmp/orgkey-e2e-on | median)
awk -v a="$off_rps" -v b="$on_rps" -v c="$off_cpu" -v d="$on_cpu" 'BEGIN {
  printf "median requests/s: without %d, with %d (%.1f%%; budget >= 97%%)\n", a, b, 100 * b / a
  printf "median server CPU per request: without %.2f us, with %.2f us (%.3fx; budget <= 1.03x)\n", c, d, d / c
}'
