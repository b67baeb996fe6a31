#!/usr/bin/env bash
# Threads (issue 12): datapunk-lb's default (one single-threaded runtime
# at 1 thread, thread per core at 2) at 1 and 2 threads, its
# `--shared-runtime` mode (one multi-threaded runtime) at 2, and
# HAProxy `nbthread 1` and `nbthread 2`; nothing pinned (proxy, wrk and the
# backends share every core). Same backends and configs as bench/run.sh
# (steady scenario, round robin). Variants interleaved over ROUNDS rounds,
# rotated so none always goes first. Binds 18080-18084: run it as
#   flock /tmp/datapunk-bench.lock bench/threads.sh
# Prints one TSV line per run and writes them to bench/results/tmp/.
#
# The control plane under load: datapunk-lb's admin listens on 18084 and
# its config has a second service, `idle`, with one instance (the first
# backend) that no route sends to, health-checked every 100 ms with a
# 100 ms timeout, so it is probed all along (traffic spares `api`'s
# instances their probes). During each measured run bench/admin_latency.py
# asks /healthz every 20 ms; the TSV gets its p50, p99 and max and the
# idle service's probes that passed and failed in the run (`-` for
# HAProxy). The last column splits the proxy's CPU over its threads (by
# thread name, in thread-id order): how evenly the kernel's SO_REUSEPORT
# hash spread the connections over the workers.
#
# BIG=N adds a service `big` of N instances that nothing routes to or
# checks, and RELOAD_EVERY=S (with BIG) reloads datapunk-lb every S seconds
# of the measured run, moving every instance of `big` to another port and
# back: control-plane work (the reload's apply, O(N)) during the load, to
# see whether it delays the probes and the admin answers.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
WRK_THREADS=${WRK_THREADS:-2}
BUILD=${BUILD:-1}
BIG=${BIG:-0}
RELOAD_EVERY=${RELOAD_EVERY:-0}
# PERF=stat: `perf stat` (context switches, migrations, syscalls) of the
# proxy over each measured run; PERF=record: `perf record -g` of it (per
# thread: `perf report --sort comm,dso,sym`). Files perf-ROUND-VARIANT.* in
# the run directory.
PERF=${PERF:-}
LISTEN_PORT=18080
BACKEND_PORTS=(18081 18082 18083)
ADMIN_PORT=18084
# Unpinned: taskset over every core (lib.sh pins with these).
ALL_CPUS="0-$(($(nproc) - 1))"
LB_CPU=$ALL_CPUS
LOAD_CPU=$ALL_CPUS
ACCESS_LOG_FILE=/dev/null

# kind:threads[:mode[:VAR=value]]; the last field sets one environment
# variable for the proxy. Mode percore adds --thread-per-core, shared adds
# --shared-runtime (builds since issue 12's per-worker pools: thread per
# core is their default above one thread; before, one shared runtime was).
# Kind haproxy_fwd is HAProxy doing datapunk-lb's default header work
# (forwarding headers, a request id; bench/configs/haproxy-forwarding.cfg).
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
	local kind=$1 threads=$2 mode=$3 env=$4 servers="" p i=0 flags=()
	if port_open "$LISTEN_PORT"; then die "port $LISTEN_PORT is already in use"; fi
	case $kind in
	haproxy | haproxy_fwd)
		for p in "${BACKEND_PORTS[@]}"; do
			i=$((i + 1))
			servers+="    server b$i 127.0.0.1:$p check inter 100ms"$'\n'
		done
		render "$BENCH_DIR/configs/haproxy.cfg" "$RUN_DIR/haproxy.cfg" \
			LISTEN_PORT="$LISTEN_PORT" BALANCE=roundrobin SERVERS="$servers"
		sed -i "s/^    nbthread .*/    nbthread $threads/" "$RUN_DIR/haproxy.cfg"
		if [[ $kind == haproxy_fwd ]]; then
			# datapunk-lb's default header work (as in lib.sh's haproxy_fwd).
			sed -i '/^    default_backend be$/r '"$BENCH_DIR/configs/haproxy-forwarding.cfg" "$RUN_DIR/haproxy.cfg"
		fi
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
			LISTEN_PORT="$LISTEN_PORT" STRATEGY=round_robin METRICS="${DP_METRICS:-true}" INSTANCES="$servers" \
			ACCESS_LOG=false ACCESS_LOG_PATH="$ACCESS_LOG_FILE"
		sed -i "s/^listen = \"127.0.0.1:0\"/listen = \"127.0.0.1:$ADMIN_PORT\"/" "$RUN_DIR/datapunk-lb.toml"
		cat >>"$RUN_DIR/datapunk-lb.toml" <<-EOF

			[service.idle]
			strategy = "round_robin"

			[service.idle.health_check]
			kind = "http"
			path = "/health"
			interval = "100ms"
			timeout = "${IDLE_PROBE_TIMEOUT:-100ms}"

			[[service.idle.instance]]
			id = "i1"
			address = "127.0.0.1"
			port = ${BACKEND_PORTS[0]}
		EOF
		if ((BIG > 0)); then
			# Two configs that differ in every instance of `big` (its port).
			cp "$RUN_DIR/datapunk-lb.toml" "$RUN_DIR/datapunk-lb-b.toml"
			for f in a b; do
				local file="$RUN_DIR/datapunk-lb.toml" port=9
				if [[ $f == b ]]; then file="$RUN_DIR/datapunk-lb-b.toml" port=10; fi
				awk -v n="$BIG" -v port="$port" 'BEGIN {
					print "\n[service.big]\nstrategy = \"round_robin\"\n\n[service.big.health_check]\nkind = \"none\""
					for (i = 0; i < n; i++)
						printf "\n[[service.big.instance]]\nid = \"b%d\"\naddress = \"127.0.0.1\"\nport = %d\n", i, port
				}' >>"$file"
			done
			cp "$RUN_DIR/datapunk-lb.toml" "$RUN_DIR/datapunk-lb-a.toml"
		fi
		case $mode in
		percore) flags=(--thread-per-core) ;;
		shared) flags=(--shared-runtime) ;;
		esac
		env ${env:+"$env"} "$bin" run --config "$RUN_DIR/datapunk-lb.toml" --threads "$threads" \
			"${flags[@]}" >>"$RUN_DIR/datapunk-lb.log" 2>&1 &
		;;
	esac
	PROXY_PID=$!
	BENCH_PIDS+=("$PROXY_PID")
	wait_port "$LISTEN_PORT" "$PROXY_PID" || die "$kind did not start (see $RUN_DIR)"
	# Let the first health checks pass before any traffic.
	sleep 0.5
}

# thread_ticks PID: "name=ticks" for each thread of PID, sorted by TID
# (user + system; comm in /proc/PID/task/TID/stat is in parentheses).
thread_ticks() {
	local t
	for t in /proc/"$1"/task/*; do
		sed -E 's/^[0-9]+ \(([^)]*)\) (.*)$/\1 \2/' "$t/stat" 2>/dev/null |
			awk -v tid="${t##*/}" '{print tid, $1 "=" $13 + $14}'
	done | sort -n | cut -d' ' -f2
}

# thread_split BEFORE AFTER: the CPU seconds each thread used in between,
# for threads that used any ("datapunk-worker-0=3.12,...").
thread_split() {
	awk -v hz="$(getconf CLK_TCK)" 'NR == FNR { split($0, kv, "="); before[NR] = kv[2]; next }
		{ split($0, kv, "="); d = (kv[2] - before[FNR]) / hz
		  if (d > 0) { out = out sep kv[1] "=" sprintf("%.2f", d); sep = "," } }
		END { print (out == "" ? "-" : out) }' <(echo "$1") <(echo "$2")
}

printf 'round\tvariant\trps\tproxy_cpu_s\tcpu_us_per_req\tload1\tadmin_p50_ms\tadmin_p99_ms\tadmin_max_ms\tadmin_n\tprobe_ok\tprobe_failed\tthread_cpu_s\n' | tee "$TSV"
for ((round = 1; round <= ROUNDS; round++)); do
	n=${#VARIANTS[@]}
	for ((k = 0; k < n; k++)); do
		v=${VARIANTS[$(((k + round - 1) % n))]}
		IFS=: read -r kind threads mode env <<<"$v"
		start_variant "$kind" "$threads" "${mode:-}" "${env:-}"
		taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c"$CONNS" -d"$WARMUP"s \
			"http://127.0.0.1:$LISTEN_PORT/" >/dev/null 2>&1
		t0=$(proc_ticks "$PROXY_PID")
		threads0=$(thread_ticks "$PROXY_PID")
		out="$RUN_DIR/wrk-$round-${v//[:=]/-}.txt"
		admin="$RUN_DIR/admin-$round-${v//[:=]/-}.txt"
		pinger=""
		if [[ $kind == datapunk* ]]; then
			python3 "$BENCH_DIR/admin_latency.py" "$ADMIN_PORT" "$DURATION" >"$admin" 2>&1 &
			pinger=$!
		fi
		reloader=""
		if [[ $kind == datapunk* ]] && ((BIG > 0 && RELOAD_EVERY > 0)); then
			(
				for ((r = 1; r * RELOAD_EVERY < DURATION; r++)); do
					sleep "$RELOAD_EVERY"
					if ((r % 2)); then f=b; else f=a; fi
					cp "$RUN_DIR/datapunk-lb-$f.toml" "$RUN_DIR/datapunk-lb.toml"
					kill -HUP "$PROXY_PID"
				done
			) &
			reloader=$!
		fi
		perf_pid=""
		case $PERF in
		stat)
			perf stat -e task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter \
				--per-thread -p "$PROXY_PID" -o "$RUN_DIR/perf-$round-${v//[:=]/-}.txt" \
				-- sleep "$DURATION" &
			perf_pid=$!
			;;
		record)
			perf record -F 999 -g -p "$PROXY_PID" -o "$RUN_DIR/perf-$round-${v//[:=]/-}.data" \
				-- sleep "$DURATION" 2>/dev/null &
			perf_pid=$!
			;;
		esac
		taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION"s --timeout 2s \
			"http://127.0.0.1:$LISTEN_PORT/" >"$out" 2>&1
		t1=$(proc_ticks "$PROXY_PID")
		if [[ -n $perf_pid ]]; then wait "$perf_pid" || true; fi
		split=$(thread_split "$threads0" "$(thread_ticks "$PROXY_PID")")
		if [[ -n $reloader ]]; then wait "$reloader" || true; fi
		control=$'-\t-\t-\t-\t-\t-'
		if [[ -n $pinger ]]; then
			wait "$pinger" || true
			control=$(tail -n1 "$admin")
		fi
		stop_proxy
		reqs=$(awk '/requests in/ {print $1}' "$out")
		rps=$(awk '/Requests\/sec/ {print $2}' "$out")
		hz=$(getconf CLK_TCK)
		cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" 'BEGIN {printf "%.2f", (b - a) / hz}')
		per=$(awk -v c="$cpu" -v r="$reqs" 'BEGIN {printf "%.1f", c * 1e6 / r}')
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$v" "$rps" "$cpu" "$per" \
			"$(cut -d' ' -f1 /proc/loadavg)" "$control" "$split" | tee -a "$TSV"
	done
done
