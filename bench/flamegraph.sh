#!/usr/bin/env bash
# A CPU flame graph of datapunk-lb in the steady scenario of bench/run.sh:
# the same three NGINX backends, the same wrk load, the proxy pinned to one
# core with `--threads 1`; `perf record` samples the proxy (DWARF call
# graphs: the release build has no frame pointers) during the measured
# seconds, and inferno draws the SVG.
#
# SCENARIO=h2c: HTTP/2 in and out instead, as bench/h2.sh UPSTREAM=h2c
# (h2c backends, `upstream_protocol = "h2c"`, h2load -c10 -m10).
#
# Usage: flock /tmp/datapunk-bench.lock bench/flamegraph.sh OUT.svg
# Knobs: SCENARIO (steady), STRATEGY (adaptive), DURATION (8 s), FREQ
# (499 Hz), BUILD (1), DP_BIN_OVERRIDE (profile this binary instead),
# LISTEN_PORT, LB_CPU, LOAD_CPU, CONNS as in run.sh (h2c: CONNS 10,
# STREAMS 10).
# Needs perf and inferno (`cargo install inferno`: a tool, not a dependency).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
OUT=$(realpath -m "${1:?usage: bench/flamegraph.sh OUT.svg}")

SCENARIO=${SCENARIO:-steady}
STRATEGY=${STRATEGY:-adaptive}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
FREQ=${FREQ:-499}
if [[ $SCENARIO == h2c ]]; then CONNS=${CONNS:-10}; else CONNS=${CONNS:-64}; fi
STREAMS=${STREAMS:-10}
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

need_tools perf nginx wrk h2load taskset inferno-collapse-perf inferno-flamegraph

case $SCENARIO in
steady) load() { run_wrk "$@"; } ;;
h2c)
	BACKEND_TEMPLATE="$BENCH_DIR/configs/nginx-backend-h2c.conf"
	DP_TEMPLATE="$BENCH_DIR/configs/datapunk-lb-h2c.toml"
	load() {
		taskset -c "$LOAD_CPU" h2load -c"$CONNS" -m"$STREAMS" -D"$1" \
			"http://127.0.0.1:$LISTEN_PORT/" >"$2" 2>&1
	}
	;;
*) die "SCENARIO must be steady or h2c" ;;
esac

private_binary
if [[ -n ${DP_BIN_OVERRIDE:-} ]]; then cp "$DP_BIN_OVERRIDE" "$DP_BIN"; fi
for p in "${BACKEND_PORTS[@]}"; do start_nginx_backend "$p"; done
start_proxy datapunk "$STRATEGY" true "${BACKEND_PORTS[@]}"
load "$WARMUP" "$RUN_DIR/warmup.wrk"
load "$DURATION" "$RUN_DIR/measured.wrk" &
wrk_pid=$!
# The whole measured run but its first and last half second.
sleep 0.5
perf record -F "$FREQ" --call-graph dwarf,16384 -p "$PROXY_PID" -o "$RUN_DIR/perf.data" \
	-- sleep "$((DURATION - 1))" 2>"$RUN_DIR/perf-record.log"
wait "$wrk_pid" || die "load failed: $(cat "$RUN_DIR/measured.wrk")"
stop_proxy
log "load: $(grep -E 'Requests/sec|finished in' "$RUN_DIR/measured.wrk")"
perf script -i "$RUN_DIR/perf.data" 2>/dev/null | inferno-collapse-perf >"$RUN_DIR/stacks.folded"
# cpu-clock weighs each sample by its period in ns.
log "sampled: $(awk -v f="$FREQ" '{ n += $NF } END { printf "%.2f s of CPU, about %d samples", n / 1e9, n / 1e9 * f }' "$RUN_DIR/stacks.folded")"
inferno-flamegraph --title "datapunk-lb, $SCENARIO ($STRATEGY), $(git -C "$ROOT" rev-parse --short HEAD)" \
	<"$RUN_DIR/stacks.folded" >"$OUT"
rm -f "$RUN_DIR/perf.data"
log "flame graph: $OUT (folded stacks: $RUN_DIR/stacks.folded)"
