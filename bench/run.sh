#!/usr/bin/env bash
# datapunk-lb vs HAProxy and NGINX: same backends, same wrk load, proxies
# interleaved over ROUNDS rounds. See bench/README.md.
#
# Usage: bench/run.sh            (from anywhere; knobs are environment
#                                 variables, defaults below)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

ROUNDS=${ROUNDS:-5}          # interleaved rounds
DURATION=${DURATION:-10}     # seconds per measured run
WARMUP=${WARMUP:-2}          # seconds of the same load before each measured run
CONNS=${CONNS:-64}           # wrk connections (one wrk thread)
SCENARIOS=${SCENARIOS:-"steady degraded kill metrics accesslog"}
METRICS_DURATION=${METRICS_DURATION:-5} # seconds per measured run of the metrics scenario
LB_CPU=${LB_CPU:-0}          # the proxy under test
LOAD_CPU=${LOAD_CPU:-1}      # wrk and the backends
LISTEN_PORT=${LISTEN_PORT:-18080}
BACKEND_PORTS=(18081 18082 18083)
SLOW_PORT=${SLOW_PORT:-18084}
SLOW_DELAY=${SLOW_DELAY:-0.05}
KILL_AT=${KILL_AT:-3}        # kill scenario: SIGKILL the third backend at this second
RESTART_AT=${RESTART_AT:-6}  # ... and start it again at this second
BUILD=${BUILD:-1}            # 0: use the existing target/release/datapunk-lb
# accesslog scenario: where the log goes (tmpfs when there is one; emptied
# after every run). /dev/null measures everything but the write itself.
ACCESS_LOG_FILE=${ACCESS_LOG_FILE:-$([[ -d /dev/shm && -w /dev/shm ]] && echo "/dev/shm/datapunk-lb-bench-$$.access.log" || echo /dev/null)}

# Variants per scenario: kind:balance[:metrics[:access_log]]. Each round runs every
# variant of every scenario once, rotated so no proxy always goes first.
# STEADY_VARIANTS (space-separated, from the environment) replaces the steady
# list, e.g. "haproxy:roundrobin datapunk:adaptive datapunk_alt:adaptive"
# with DP_ALT_BIN=<another build> to compare two builds interleaved;
# haproxy_fwd: HAProxy adding the same forwarding headers and request id.
read -r -a STEADY_VARIANTS <<<"${STEADY_VARIANTS:-haproxy:roundrobin nginx:round_robin datapunk:adaptive datapunk:round_robin}"
DEGRADED_VARIANTS=(haproxy:leastconn nginx:least_conn datapunk:adaptive datapunk:peak_ewma)
KILL_VARIANTS=(haproxy:roundrobin nginx:round_robin datapunk:adaptive)
# metrics: the steady setup, datapunk-lb adaptive with metrics on (A) and off
# (B), back to back in ABBA order (BAAB on even rounds), so a drift in the
# machine's load weighs on both alike.
METRICS_VARIANTS=(datapunk:adaptive datapunk:adaptive:false datapunk:adaptive:false datapunk:adaptive)
# accesslog: the steady setup, datapunk-lb adaptive with the access log on
# (A, to ACCESS_LOG_FILE) and off (B), ABBA like metrics, DURATION-long runs.
ACCESSLOG_VARIANTS=(datapunk:adaptive:true:true datapunk:adaptive datapunk:adaptive datapunk:adaptive:true:true)

STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
RUN_DIR="$RESULTS_DIR/tmp/$STAMP" # raw logs, git-ignored
mkdir -p "$RUN_DIR"
TSV="$RUN_DIR/results.tsv"
META="$RUN_DIR/meta.md"
REPORT="$RESULTS_DIR/$STAMP.md"

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

need_tools haproxy nginx wrk taskset python3 curl
(($(nproc) > LB_CPU && $(nproc) > LOAD_CPU)) || die "need CPUs $LB_CPU and $LOAD_CPU"

private_binary

{
	echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
	echo "- datapunk-lb: commit $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo ' + uncommitted changes in crates/'), release build, \`--threads 1\`"
	echo "- $(haproxy -v | head -1 | cut -d' ' -f1-3), \`nbthread 1\`; $(nginx -v 2>&1 | cut -d' ' -f3), \`worker_processes 1\`; $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
	if [[ -n ${DP_ALT_BIN:-} ]]; then echo "- datapunk_alt: $DP_ALT_BIN (same config, same flags)"; fi
	echo "- machine: $(nproc) vCPUs ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), shared; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "- proxy on core $LB_CPU; wrk -t1 -c$CONNS and the backends on core $LOAD_CPU (taskset)"
	echo "- each run: proxy started fresh, ${WARMUP} s warm-up, ${DURATION} s measured (metrics scenario: ${METRICS_DURATION} s, ABBA); $ROUNDS rounds; scenarios: $SCENARIOS"
	if [[ $SCENARIOS == *accesslog* ]]; then
		echo "- accesslog scenario: ABBA, the access log (human format) to $ACCESS_LOG_FILE, emptied after each run"
	fi
} >"$META"

printf 'round\tscenario\tvariant\trps\tmean_ms\tp50_ms\tp99_ms\trequests\tnon2xx\tsock_errors\tproxy_cpu_s\telapsed_s\tcpu0\tcpu1\tslow_requests\n' >"$TSV"

log "raw logs in $RUN_DIR"
for p in "${BACKEND_PORTS[@]}"; do start_nginx_backend "$p"; done
start_slow_backend "$SLOW_PORT" "$SLOW_DELAY"

# check_backends: every backend answers "ok" directly.
for p in "${BACKEND_PORTS[@]}" "$SLOW_PORT"; do
	[[ $(curl -fsS --max-time 2 "http://127.0.0.1:$p/") == ok ]] || die "backend $p does not answer ok"
done

# --- degraded: latency from a per-request log (issue 12) ---
# wrk's latency histogram misreads a run in which a few requests are slow
# (issue 12: HAProxy leastconn at "p90 32 ms" while Little's law capped the
# mean at 0.8 ms). In the degraded scenario the load is h2load --h1 instead,
# same connections, one thread, same core, and report.py takes the
# percentiles from its per-request log (OUT.log: start µs, status, µs).
# DEGRADED_LOAD=wrk keeps wrk there. STEADY_LOAD=h2load does the same for
# the steady scenario (default wrk, as in every steady run so far).
DEGRADED_LOAD=${DEGRADED_LOAD:-h2load}
# DEGRADED_RPS=N: each of the CONNS connections sends at most N requests a
# second (h2load --rps), so the degraded load is a fixed rate below every
# proxy's capacity instead of a closed loop. In a closed loop the latency
# of the fast requests is set by the throughput and by how many
# connections wait on the slow backend (Little's law), not by the proxy's
# own delay: see "Degraded at a fixed rate" in docs/benchmarks.md.
DEGRADED_RPS=${DEGRADED_RPS:-}
# STEADY_RPS=N: the same fixed rate for the steady scenario (with
# STEADY_LOAD=h2load): the proxies' own latency at equal throughput.
STEADY_RPS=${STEADY_RPS:-}
STEADY_LOAD=${STEADY_LOAD:-wrk}
if [[ ($DEGRADED_LOAD == h2load && $SCENARIOS == *degraded*) || ($STEADY_LOAD == h2load && $SCENARIOS == *steady*) ]]; then
	command -v h2load >/dev/null || die "h2load not found (or DEGRADED_LOAD=wrk)"
	eval "$(declare -f run_wrk | sed '1s/^run_wrk /run_wrk_itself /')"
	# run_wrk SECONDS OUT: h2load within run_one's degraded (and, with
	# STEADY_LOAD=h2load, steady) scenario (bash sees run_one's local
	# $scenario), wrk elsewhere.
	run_wrk() {
		if ! [[ (${scenario:-} == degraded && $DEGRADED_LOAD == h2load) ||
			(${scenario:-} == steady && $STEADY_LOAD == h2load) ]]; then
			run_wrk_itself "$@"
			return
		fi
		local reqlog=()
		[[ $2 == *.warmup ]] || reqlog=(--log-file="$2.log")
		[[ ${scenario:-} == degraded && -n $DEGRADED_RPS ]] && reqlog+=(--rps="$DEGRADED_RPS")
		[[ ${scenario:-} == steady && -n $STEADY_RPS ]] && reqlog+=(--rps="$STEADY_RPS")
		taskset -c "$LOAD_CPU" h2load --h1 -t1 -c"$CONNS" -D"$1" "${reqlog[@]}" \
			"http://127.0.0.1:$LISTEN_PORT/" >"$2" 2>&1
	}
	echo "- degraded scenario (DEGRADED_LOAD=$DEGRADED_LOAD), steady (STEADY_LOAD=$STEADY_LOAD): h2load means \`h2load --h1 -t1 -c$CONNS\` ($(h2load --version | head -1)), latency percentiles from its per-request log${DEGRADED_RPS:+; degraded at a fixed rate: \`--rps=$DEGRADED_RPS\` per connection}${STEADY_RPS:+; steady at a fixed rate: \`--rps=$STEADY_RPS\` per connection}" >>"$META"
fi

# run_one ROUND SCENARIO VARIANT
run_one() {
	local round=$1 scenario=$2 variant=$3 kind balance metrics access_log name backends out
	local t0 t1 c0 c1 l0 l1 elapsed slow=-1 wrk_pid
	IFS=: read -r kind balance metrics access_log <<<"$variant"
	metrics=${metrics:-true}
	PROXY_ACCESS_LOG=${access_log:-false}
	name="$kind-$balance"
	[[ $metrics == false ]] && name+="-nometrics"
	[[ $PROXY_ACCESS_LOG == true ]] && name+="-accesslog"
	case $scenario in
	degraded) backends=("${BACKEND_PORTS[0]}" "${BACKEND_PORTS[1]}" "$SLOW_PORT") ;;
	*) backends=("${BACKEND_PORTS[@]}") ;;
	esac
	out="$RUN_DIR/r$round-$scenario-$name.wrk"
	local duration=$DURATION
	if [[ $scenario == metrics ]]; then
		duration=$METRICS_DURATION
	fi
	if [[ $scenario == metrics || $scenario == accesslog ]]; then
		out="$RUN_DIR/r$round-$scenario-$name-$EPOCHSECONDS.wrk"
	fi
	log "round $round/$ROUNDS $scenario $name"

	start_proxy "$kind" "$balance" "$metrics" "${backends[@]}"
	if ((WARMUP > 0)); then run_wrk "$WARMUP" "$out.warmup"; fi
	[[ $scenario == degraded ]] && slow_stats reset >/dev/null

	t0=$(proc_ticks "$PROXY_PID")
	c0=$(cpu_busy_ticks "$LB_CPU")
	l0=$(cpu_busy_ticks "$LOAD_CPU")
	local start=$EPOCHREALTIME
	if [[ $scenario == kill ]]; then
		run_wrk "$duration" "$out" &
		wrk_pid=$!
		sleep "$KILL_AT"
		crash_backend "${BACKEND_PORTS[2]}"
		log "  killed backend ${BACKEND_PORTS[2]} at $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}') s"
		sleep $((RESTART_AT - KILL_AT))
		start_nginx_backend "${BACKEND_PORTS[2]}"
		log "  restarted it at $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}') s"
		wait "$wrk_pid" || die "wrk failed: $(cat "$out")"
	else
		run_wrk "$duration" "$out" || die "wrk failed: $(cat "$out")"
	fi
	elapsed=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN{print b-a}')
	t1=$(proc_ticks "$PROXY_PID")
	c1=$(cpu_busy_ticks "$LB_CPU")
	l1=$(cpu_busy_ticks "$LOAD_CPU")
	[[ $scenario == degraded ]] && slow=$(slow_stats | cut -d' ' -f1)
	stop_proxy
	if [[ $PROXY_ACCESS_LOG == true && -f $ACCESS_LOG_FILE ]]; then
		log "  access log: $(wc -l <"$ACCESS_LOG_FILE") lines, $(du -h "$ACCESS_LOG_FILE" | cut -f1)"
		: >"$ACCESS_LOG_FILE"
	fi

	local hz parsed proxy_cpu_s core0 core1
	hz=$(getconf CLK_TCK)
	parsed=$(python3 "$BENCH_DIR/report.py" parse "$out")
	proxy_cpu_s=$(awk -v d="$((t1 - t0))" -v hz="$hz" 'BEGIN{printf "%.2f", d / hz}')
	core0=$(awk -v c0="$c0" -v c1="$c1" 'BEGIN{split(c0, a, " "); split(c1, b, " "); printf "%.1f", 100 * (b[1] - a[1]) / (b[2] - a[2])}')
	core1=$(awk -v c0="$l0" -v c1="$l1" 'BEGIN{split(c0, a, " "); split(c1, b, " "); printf "%.1f", 100 * (b[1] - a[1]) / (b[2] - a[2])}')
	printf '%s\t%s\t%s\t%s\t%s\t%.2f\t%s\t%s\t%s\n' "$round" "$scenario" "$name" \
		"$(tr ' ' '\t' <<<"$parsed")" "$proxy_cpu_s" "$elapsed" "$core0" "$core1" "$slow" >>"$TSV"
	log "  $(awk '{printf "%s req/s, p50 %s ms, p99 %s ms, non-2xx %s, socket errors %s", $1, $3, $4, $6, $7}' <<<"$parsed"), proxy CPU ${proxy_cpu_s} s, core $LB_CPU busy $core0 %"
}

# rotate N ITEMS...: the items rotated left by N.
rotate() {
	local n=$1
	shift
	local items=("$@") k=$#
	for ((i = 0; i < k; i++)); do echo "${items[$(((i + n) % k))]}"; done
}

for ((round = 1; round <= ROUNDS; round++)); do
	for scenario in $SCENARIOS; do
		case $scenario in
		steady) variants=("${STEADY_VARIANTS[@]}") ;;
		degraded) variants=("${DEGRADED_VARIANTS[@]}") ;;
		kill) variants=("${KILL_VARIANTS[@]}") ;;
		metrics) variants=("${METRICS_VARIANTS[@]}") ;;
		accesslog) variants=("${ACCESSLOG_VARIANTS[@]}") ;;
		*) die "unknown scenario $scenario" ;;
		esac
		if [[ $scenario == metrics || $scenario == accesslog ]]; then
			order=("${variants[@]}")
			if ((round % 2 == 0)); then order=("${variants[1]}" "${variants[0]}" "${variants[0]}" "${variants[1]}"); fi
		else
			mapfile -t order < <(rotate $((round - 1)) "${variants[@]}")
		fi
		for v in "${order[@]}"; do
			run_one "$round" "$scenario" "$v"
		done
	done
done

echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$META"
python3 "$BENCH_DIR/report.py" summarize "$TSV" "$META" >"$REPORT"
cp "$TSV" "$RESULTS_DIR/$STAMP.tsv"
log "report: $REPORT (raw logs: $RUN_DIR)"
cat "$REPORT"
