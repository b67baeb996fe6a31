#!/usr/bin/env bash
# Where a proxy's CPU per request goes: user space against the kernel, the
# system calls it makes (by kind), the TCP segments and the context
# switches, per request, and the load core's busy time per request, for datapunk-lb and the proxies it is measured
# against, under the same fixed number of requests (h2load --h1 -n N -c
# CONNS, closed loop) on the steady scenario's setup (bench/run.sh: proxy
# on LB_CPU, three NGINX backends and the load on LOAD_CPU; ports
# 18080-18083, so run it under the bench lock).
#
# The closed loop's requests per second can be set by the load's core when
# that core is the busier one (see "Eighth pass" in docs/benchmarks.md);
# the user/kernel split says what a proxy can still gain by itself: two
# proxies making the same system calls pay about the same kernel time.
#
# Usage: flock /tmp/datapunk-bench.lock bench/cpu_split.sh
# Knobs: VARIANTS ("haproxy:roundrobin datapunk:adaptive"; kinds as in
# run.sh: haproxy, haproxy_fwd, nginx, datapunk, datapunk_alt with
# DP_ALT_BIN), ROUNDS (3), REQUESTS (300000), CONNS (64), RPS (none),
# BUILD (1).
# Per-syscall counts need `perf` with the syscalls tracepoints (else "-").
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
ROUNDS=${ROUNDS:-3}
REQUESTS=${REQUESTS:-300000}
CONNS=${CONNS:-64}
# RPS=N: each connection sends at most N requests a second (h2load --rps),
# a fixed rate instead of the closed loop.
RPS=${RPS:-}
BUILD=${BUILD:-1}
LB_CPU=${LB_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
LISTEN_PORT=18080
BACKEND_PORTS=(18081 18082 18083)
read -r -a VARIANTS <<<"${VARIANTS:-haproxy:roundrobin datapunk:adaptive}"

STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
RUN_DIR="$RESULTS_DIR/tmp/cpu-split-$STAMP"
mkdir -p "$RUN_DIR"
TSV="$RESULTS_DIR/cpu-split-$STAMP.tsv"

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

need_tools h2load nginx haproxy nstat taskset
SYSCALLS=(recvfrom sendto read write readv writev epoll_wait epoll_ctl futex clock_gettime)
perf_events=""
if command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter true >/dev/null 2>&1; then
	perf_events="raw_syscalls:sys_enter,context-switches"
	for s in "${SYSCALLS[@]}"; do perf_events+=",syscalls:sys_enter_$s"; done
else
	log "perf with syscall tracepoints not available: system calls are not counted"
fi

private_binary
for p in "${BACKEND_PORTS[@]}"; do start_nginx_backend "$p"; done
log "load average $(cut -d' ' -f1-3 /proc/loadavg); $ROUNDS rounds of ${VARIANTS[*]}, $REQUESTS requests over $CONNS connections each"

# user_sys PID: "user system" clock ticks of PID and its children.
user_sys() {
	local pid u=0 s=0 a b
	for pid in "$1" $(pgrep -P "$1" || true); do
		read -r a b < <(awk '{print $14, $15}' "/proc/$pid/stat" 2>/dev/null || echo "0 0")
		u=$((u + a))
		s=$((s + b))
	done
	echo "$u $s"
}

printf 'round\tproxy\treq_per_s\tuser_us\tsys_us\ttotal_us\tsyscalls\t%s\tctx_switches\ttcp_segments_out\tip_in_octets\tload_core_us\n' \
	"$(IFS=$'\t'; echo "${SYSCALLS[*]}")" >"$TSV"
hz=$(getconf CLK_TCK)
for ((round = 1; round <= ROUNDS; round++)); do
	# Rotated each round, so no proxy always runs first.
	for ((k = 0; k < ${#VARIANTS[@]}; k++)); do
		v=${VARIANTS[$(((k + round - 1) % ${#VARIANTS[@]}))]}
		IFS=: read -r kind balance <<<"$v"
		start_proxy "$kind" "$balance" true "${BACKEND_PORTS[@]}"
		taskset -c "$LOAD_CPU" h2load --h1 -t1 -c"$CONNS" -n $((REQUESTS / 10)) \
			"http://127.0.0.1:$LISTEN_PORT/" >/dev/null
		pids=$PROXY_PID
		for c in $(pgrep -P "$PROXY_PID" || true); do pids+=",$c"; done
		perf_pid=""
		if [[ -n $perf_events ]]; then
			perf stat -e "$perf_events" -x, -p "$pids" -o "$RUN_DIR/perf-$round-$kind.csv" &
			perf_pid=$!
			sleep 0.2
		fi
		nstat -n >/dev/null
		read -r u0 s0 < <(user_sys "$PROXY_PID")
		l0=$(cpu_busy_ticks "$LOAD_CPU")
		out=$(taskset -c "$LOAD_CPU" h2load --h1 -t1 -c"$CONNS" -n "$REQUESTS" ${RPS:+--rps="$RPS"} \
			"http://127.0.0.1:$LISTEN_PORT/")
		read -r u1 s1 < <(user_sys "$PROXY_PID")
		l1=$(cpu_busy_ticks "$LOAD_CPU")
		net=$(nstat 2>/dev/null)
		if [[ -n $perf_pid ]]; then
			kill -INT "$perf_pid"
			wait "$perf_pid" 2>/dev/null || true
		fi
		stop_proxy
		grep -q "$REQUESTS succeeded" <<<"$out" || die "$kind: not every request succeeded: $(grep 'requests:' <<<"$out")"
		rps=$(awk '/finished in/ {print $4}' <<<"$out")
		counts=()
		for e in raw_syscalls:sys_enter "${SYSCALLS[@]/#/syscalls:sys_enter_}" context-switches; do
			if [[ -n $perf_pid ]]; then
				counts+=("$(awk -F, -v e="$e" -v n="$REQUESTS" '$3 == e {printf "%.3f", $1 / n}' "$RUN_DIR/perf-$round-$kind.csv")")
			else
				counts+=(-)
			fi
		done
		segs=$(awk -v n="$REQUESTS" '$1 == "TcpOutSegs" {printf "%.2f", $2 / n}' <<<"$net")
		octets=$(awk -v n="$REQUESTS" '$1 == "IpExtInOctets" {printf "%.0f", $2 / n}' <<<"$net")
		line=$(awk -v u="$((u1 - u0))" -v s="$((s1 - s0))" -v hz="$hz" -v n="$REQUESTS" \
			'BEGIN {printf "%.2f\t%.2f\t%.2f", u / hz * 1e6 / n, s / hz * 1e6 / n, (u + s) / hz * 1e6 / n}')
		# The load core's busy time per request: the load and the backends.
		load_us=$(awk -v a="$l0" -v b="$l1" -v hz="$hz" -v n="$REQUESTS" \
			'BEGIN {split(a, x, " "); split(b, y, " "); printf "%.2f", (y[1] - x[1]) / hz * 1e6 / n}')
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$kind-$balance" "${rps%.*}" "$line" \
			"$(IFS=$'\t'; echo "${counts[*]}")" "${segs:-0}" "${octets:-0}" "$load_us" >>"$TSV"
		log "round $round $kind-$balance: $(tail -n1 "$TSV" | cut -f3-6 | tr '\t' ' ') (req/s, user/sys/total µs per request)"
	done
done
log "load average $(cut -d' ' -f1-3 /proc/loadavg); per-run rows in $TSV"
# Medians per proxy of every column.
python3 - "$TSV" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
cols = [c for c in rows[0] if c not in ("round", "proxy")]
print("| proxy | " + " | ".join(cols) + " |")
print("| --- |" + " ---: |" * len(cols))
for p in dict.fromkeys(r["proxy"] for r in rows):
    vals = []
    for c in cols:
        xs = [float(r[c]) for r in rows if r["proxy"] == p and r[c] not in ("", "-")]
        vals.append(f"{statistics.median(xs):g}" if xs else "-")
    print(f"| {p} | " + " | ".join(vals) + " |")
EOF
