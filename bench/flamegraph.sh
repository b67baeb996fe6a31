#!/usr/bin/env bash
# A CPU flame graph of datapunk-lb in the steady scenario of bench/run.sh:
# the same three NGINX backends, the same wrk load, the proxy pinned to one
# core with `--threads 1`; `perf record` samples the proxy (DWARF call
# graphs: the release build has no frame pointers) during the measured
# seconds, and inferno draws the SVG.
#
# Usage: flock /tmp/datapunk-bench.lock bench/flamegraph.sh OUT.svg
# Knobs: STRATEGY (adaptive), DURATION (8 s), FREQ (499 Hz), BUILD (1),
# LISTEN_PORT, LB_CPU, LOAD_CPU, CONNS as in run.sh.
# Needs perf and inferno (`cargo install inferno`: a tool, not a dependency).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
OUT=$(realpath -m "${1:?usage: bench/flamegraph.sh OUT.svg}")

STRATEGY=${STRATEGY:-adaptive}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
FREQ=${FREQ:-499}
CONNS=${CONNS:-64}
LB_CPU=${LB_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
LISTEN_PORT=${LISTEN_PORT:-18080}
BACKEND_PORTS=(18081 18082 18083)
BUILD=${BUILD:-1}
ACCESS_LOG_FILE=/dev/null

STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RUN_DIR="$BENCH_DIR/results/tmp/flame-$STAMP" # git-ignored
mkdir -p "$RUN_DIR"

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in perf nginx wrk taskset inferno-collapse-perf inferno-flamegraph; do
	command -v "$tool" >/dev/null || die "$tool not found"
done

private_binary
for p in "${BACKEND_PORTS[@]}"; do start_nginx_backend "$p"; done
start_proxy datapunk "$STRATEGY" true "${BACKEND_PORTS[@]}"
run_wrk "$WARMUP" "$RUN_DIR/warmup.wrk"
run_wrk "$DURATION" "$RUN_DIR/measured.wrk" &
wrk_pid=$!
# The whole measured run but its first and last half second.
sleep 0.5
perf record -F "$FREQ" --call-graph dwarf,16384 -p "$PROXY_PID" -o "$RUN_DIR/perf.data" \
	-- sleep "$((DURATION - 1))" 2>"$RUN_DIR/perf-record.log"
wait "$wrk_pid" || die "wrk failed: $(cat "$RUN_DIR/measured.wrk")"
stop_proxy
log "wrk: $(grep -E 'Requests/sec' "$RUN_DIR/measured.wrk")"
perf script -i "$RUN_DIR/perf.data" 2>/dev/null | inferno-collapse-perf >"$RUN_DIR/stacks.folded"
inferno-flamegraph --title "datapunk-lb, steady ($STRATEGY), $(git -C "$ROOT" rev-parse --short HEAD)" \
	<"$RUN_DIR/stacks.folded" >"$OUT"
rm -f "$RUN_DIR/perf.data"
log "flame graph: $OUT (folded stacks: $RUN_DIR/stacks.folded)"
