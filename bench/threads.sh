#!/usr/bin/env bash
# Threads (issue 12): datapunk-lb's default (one single-threaded runtime
# at 1 thread, thread per core at 2) at 1 and 2 threads, its
# `--shared-runtime` mode (one multi-threaded runtime) at 2, and
# HAProxy `nbthread 1` and `nbthread 2`; nothing pinned (proxy, wrk and the
# backends share every core). Same backends and configs as bench/run.sh
# (steady scenario, round robin). Variants interleaved over ROUNDS rounds,
# rotated so none always goes first. Binds 18080-18083: run it as
#   flock /tmp/datapunk-bench.lock bench/threads.sh
# Prints one TSV line per run and writes them to bench/results/tmp/.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
WRK_THREADS=${WRK_THREADS:-2}
BUILD=${BUILD:-1}
LISTEN_PORT=18080
BACKEND_PORTS=(18081 18082 18083)
# Unpinned: taskset over every core (lib.sh pins with these).
ALL_CPUS="0-$(($(nproc) - 1))"
LB_CPU=$ALL_CPUS
LOAD_CPU=$ALL_CPUS
ACCESS_LOG_FILE=/dev/null

# kind:threads[:mode]; mode percore adds --thread-per-core, shared adds
# --shared-runtime (builds since issue 12's per-worker pools: thread per
# core is their default above one thread; before, one shared runtime was).
# Kind datapunk_alt runs DP_ALT_BIN (a second build, e.g. the commit before
# a change) with the same config.
# VARIANTS="..." (space-separated) replaces the list.
if [[ -n ${VARIANTS:-} ]]; then
	read -r -a VARIANTS <<<"$VARIANTS"
else
	VARIANTS=(haproxy:1 haproxy:2 datapunk:1 datapunk:2 datapunk:2:shared)
fi

STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RUN_DIR="$BENCH_DIR/results/tmp/threads-$STAMP"
mkdir -p "$RUN_DIR"
TSV="$RUN_DIR/results.tsv"

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

private_binary
log "raw logs in $RUN_DIR; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for p in "${BACKEND_PORTS[@]}"; do start_nginx_backend "$p"; done

# start_variant KIND THREADS SHARED: lib.sh's start_proxy for round robin,
# with the thread count set and no pinning.
start_variant() {
	local kind=$1 threads=$2 mode=$3 servers="" p i=0 flags=()
	if port_open "$LISTEN_PORT"; then die "port $LISTEN_PORT is already in use"; fi
	case $kind in
	haproxy)
		for p in "${BACKEND_PORTS[@]}"; do
			i=$((i + 1))
			servers+="    server b$i 127.0.0.1:$p check inter 100ms"$'\n'
		done
		render "$BENCH_DIR/configs/haproxy.cfg" "$RUN_DIR/haproxy.cfg" \
			LISTEN_PORT="$LISTEN_PORT" BALANCE=roundrobin SERVERS="$servers"
		sed -i "s/^    nbthread .*/    nbthread $threads/" "$RUN_DIR/haproxy.cfg"
		haproxy -db -f "$RUN_DIR/haproxy.cfg" >>"$RUN_DIR/haproxy.log" 2>&1 &
		;;
	datapunk | datapunk_alt)
		local bin=$DP_BIN
		if [[ $kind == datapunk_alt ]]; then bin=${DP_ALT_BIN:?datapunk_alt needs DP_ALT_BIN}; fi
		for p in "${BACKEND_PORTS[@]}"; do
			i=$((i + 1))
			servers+="[[service.api.instance]]"$'\n'"id = \"b$i\""$'\n'
			servers+="address = \"127.0.0.1\""$'\n'"port = $p"$'\n\n'
		done
		render "$BENCH_DIR/configs/datapunk-lb.toml" "$RUN_DIR/datapunk-lb.toml" \
			LISTEN_PORT="$LISTEN_PORT" STRATEGY=round_robin METRICS=true INSTANCES="$servers" \
			ACCESS_LOG=false ACCESS_LOG_PATH="$ACCESS_LOG_FILE"
		case $mode in
		percore) flags=(--thread-per-core) ;;
		shared) flags=(--shared-runtime) ;;
		esac
		"$bin" run --config "$RUN_DIR/datapunk-lb.toml" --threads "$threads" \
			"${flags[@]}" >>"$RUN_DIR/datapunk-lb.log" 2>&1 &
		;;
	esac
	PROXY_PID=$!
	BENCH_PIDS+=("$PROXY_PID")
	wait_port "$LISTEN_PORT" "$PROXY_PID" || die "$kind did not start (see $RUN_DIR)"
	# Let the first health checks pass before any traffic.
	sleep 0.5
}

printf 'round\tvariant\trps\tproxy_cpu_s\tcpu_us_per_req\tload1\n' | tee "$TSV"
for ((round = 1; round <= ROUNDS; round++)); do
	n=${#VARIANTS[@]}
	for ((k = 0; k < n; k++)); do
		v=${VARIANTS[$(((k + round - 1) % n))]}
		IFS=: read -r kind threads mode <<<"$v"
		start_variant "$kind" "$threads" "${mode:-}"
		taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c"$CONNS" -d"$WARMUP"s \
			"http://127.0.0.1:$LISTEN_PORT/" >/dev/null 2>&1
		t0=$(proc_ticks "$PROXY_PID")
		out="$RUN_DIR/wrk-$round-${v//:/-}.txt"
		taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION"s --timeout 2s \
			"http://127.0.0.1:$LISTEN_PORT/" >"$out" 2>&1
		t1=$(proc_ticks "$PROXY_PID")
		stop_proxy
		reqs=$(awk '/requests in/ {print $1}' "$out")
		rps=$(awk '/Requests\/sec/ {print $2}' "$out")
		hz=$(getconf CLK_TCK)
		cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" 'BEGIN {printf "%.2f", (b - a) / hz}')
		per=$(awk -v c="$cpu" -v r="$reqs" 'BEGIN {printf "%.1f", c * 1e6 / r}')
		printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$v" "$rps" "$cpu" "$per" \
			"$(cut -d' ' -f1 /proc/loadavg)" | tee -a "$TSV"
	done
done
