#!/usr/bin/env bash
# User-space instructions per request of datapunk-lb builds, counted by
# callgrind: an A/B that a busy machine does not move (CPU time per
# request does, by a few per cent, which is the size of the changes it is
# meant to judge). Instructions are not cycles: a change that trades
# instructions for cache misses or locked instructions needs the timed
# bench (bench/run.sh) as well.
#
# Each build runs under `valgrind --tool=callgrind` (--threads 1) in front
# of three NGINX backends (bench/configs/nginx-backend.conf); h2load sends
# WARMUP requests, the counters are zeroed (`callgrind_control -z`), it
# sends REQUESTS more over CONNS keep-alive connections (HTTP/1.1, or
# h2c in and out with H2=1: h2c backends and h2load -m STREAMS), and the
# counters are dumped: Ir / REQUESTS. Health checks every 60 s (none in
# the measured window). Ports 18290-18293: no bench lock needed.
#
# Usage: bench/instructions.sh BIN [BIN ...]
# Knobs: REQUESTS (20000), WARMUP (2000), CONNS (16), STRATEGY (adaptive),
# METRICS (true), H2 (0), STREAMS (10), KEEP (a directory to keep each
# build's dump in, for callgrind_annotate).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REQUESTS=${REQUESTS:-20000}
WARMUP=${WARMUP:-2000}
CONNS=${CONNS:-16}
STRATEGY=${STRATEGY:-adaptive}
METRICS=${METRICS:-true}
H2=${H2:-0}
STREAMS=${STREAMS:-10}
LISTEN_PORT=18290
BACKEND_PORTS=(18291 18292 18293)
LOAD_CPU=0-$(($(nproc) - 1))
RUN_DIR=$(mktemp -d /tmp/dp-instructions.XXXXXX)
PIDS=()

(($# > 0)) || {
	echo "usage: bench/instructions.sh BIN [BIN ...]" >&2
	exit 2
}
for tool in valgrind callgrind_control nginx h2load; do
	command -v "$tool" >/dev/null || {
		echo "needs $tool" >&2
		exit 1
	}
done

cleanup() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$RUN_DIR"
}
trap cleanup EXIT

render() {
	local tpl kv
	tpl=$(<"$1")
	shift
	for kv in "$@"; do tpl=${tpl//@${kv%%=*}@/${kv#*=}}; done
	printf '%s\n' "$tpl"
}

wait_port() {
	local i
	for ((i = 0; i < 600; i++)); do
		if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
		sleep 0.1
	done
	echo "port $1 did not open" >&2
	return 1
}

backend_template=$BENCH_DIR/configs/nginx-backend.conf
protocol=""
load=(h2load --h1)
if [[ $H2 == 1 ]]; then
	backend_template=$BENCH_DIR/configs/nginx-backend-h2c.conf
	protocol='upstream_protocol = "h2c"'
	load=(h2load -m "$STREAMS")
fi
instances=""
i=0
for p in "${BACKEND_PORTS[@]}"; do
	i=$((i + 1))
	mkdir -p "$RUN_DIR/backend-$p-tmp"
	render "$backend_template" DIR="$RUN_DIR" PORT="$p" >"$RUN_DIR/backend-$p.conf"
	nginx -p "$RUN_DIR" -e "$RUN_DIR/backend-$p.error.log" -c "$RUN_DIR/backend-$p.conf" \
		>>"$RUN_DIR/backend.log" 2>&1 &
	PIDS+=($!)
	wait_port "$p"
	instances+="[[service.api.instance]]"$'\n'"id = \"b$i\""$'\n'"address = \"127.0.0.1\""$'\n'"port = $p"$'\n\n'
done
cat >"$RUN_DIR/datapunk-lb.toml" <<EOF
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "127.0.0.1:$LISTEN_PORT"
protocol = "http"

[[listener.route]]
path_prefix = "/"
service = "api"

[service.api]
strategy = "$STRATEGY"
retries = 2
metrics_enabled = $METRICS
$protocol

[service.api.health_check]
kind = "http"
path = "/health"
interval = "60s"

$instances
EOF

printf 'build\tinstructions_per_request\n'
for bin in "$@"; do
	valgrind --tool=callgrind --callgrind-out-file="$RUN_DIR/callgrind.out.%p" \
		"$bin" run --config "$RUN_DIR/datapunk-lb.toml" --threads 1 >"$RUN_DIR/valgrind.log" 2>&1 &
	pid=$!
	wait_port "$LISTEN_PORT"
	taskset -c "$LOAD_CPU" "${load[@]}" -n "$WARMUP" -c "$CONNS" "http://127.0.0.1:$LISTEN_PORT/" >/dev/null
	callgrind_control -z "$pid" >/dev/null 2>&1
	taskset -c "$LOAD_CPU" "${load[@]}" -n "$REQUESTS" -c "$CONNS" "http://127.0.0.1:$LISTEN_PORT/" >"$RUN_DIR/load.txt"
	grep -q "succeeded, 0 failed\|$REQUESTS succeeded" "$RUN_DIR/load.txt" ||
		echo "warning: $(grep 'requests:' "$RUN_DIR/load.txt")" >&2
	callgrind_control -d "$pid" >/dev/null 2>&1
	kill "$pid"
	wait "$pid" 2>/dev/null || true
	# The dump of -d (PID.1) holds the measured window only; the one at
	# exit holds the shutdown.
	ir=$(awk '/^(summary|totals):/ {print $2; exit}' "$RUN_DIR/callgrind.out.$pid.1")
	if [[ -n ${KEEP:-} ]]; then cp "$RUN_DIR/callgrind.out.$pid.1" "$KEEP/callgrind-$(basename "$bin")-$pid.out"; fi
	rm -f "$RUN_DIR"/callgrind.out.*
	printf '%s\t%.0f\n' "$bin" "$(awk -v ir="$ir" -v n="$REQUESTS" 'BEGIN {print ir / n}')"
done
