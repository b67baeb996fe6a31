#!/usr/bin/env bash
# The 100,000-instance scale run of issue 11 (docs/benchmarks.md, "Scale
# (issue 11)"): the release binary with one service of N instances over 4
# real local backends, HTTP checks every INTERVAL, and what an operator
# would measure.
#
# Backends: 4 NGINX processes on ports 18381-18384, each listening on every
# loopback address, so instance i is 127.1.x.y:1838(1 + i % 4) with 25,000
# distinct addresses: every instance is its own (address, port) pair, as in
# a real fleet, and probe connections do not pile up on four 4-tuples.
# The proxy listens on 18380, its admin endpoint on 18385 (not the 1808x
# bench ports, so this runs beside bench/run.sh).
#
# Phases:
#   1. start with checks on; time until every instance is registered;
#   2. SETTLE seconds of checks with no traffic: RSS, idle CPU, probes/s
#      done vs needed, the effective-interval gauge, sampled every 30 s;
#   3. /metrics, /v1/services/api?limit=100 and /status/data: size, time;
#   4. proxy req/s with checks on vs off, ABBA over ROUNDS rounds (checks
#      are switched by SIGHUP between two files differing only in the
#      health_check table);
#   5. RELOADS reloads of the same file: time (parse and apply, from the
#      reload log line) and RSS after each; then one reload changing K
#      instances.
#
# Usage: flock /tmp/datapunk-bench-scale.lock bench/scale.sh
#   knobs (environment): N=100000 INTERVAL=5s SETTLE=300 ROUNDS=2
#   DURATION=10 CONNS=64 RELOADS=10 K=100 BUILD=1 (0: use the existing
#   target/release/datapunk-lb) DP_BIN (a binary to test instead)
#   ROUNDS=0 skips phase 4 (no traffic: the reloads then follow the settle,
#   which is what "RSS flat across reloads" is about). MIMALLOC_* options in
#   the environment reach the balancer (recorded in the report).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

N=${N:-100000}
INTERVAL=${INTERVAL:-5s}
SETTLE=${SETTLE:-300}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
RELOADS=${RELOADS:-10}
K=${K:-100}
BUILD=${BUILD:-1}
LB_CPU=${LB_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
LISTEN_PORT=18380
BACKEND_PORTS=(18381 18382 18383 18384)
ADMIN_PORT=18385

STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RUN_DIR="$BENCH_DIR/results/tmp/scale-$STAMP" # raw logs, git-ignored
mkdir -p "$RUN_DIR"
REPORT="$BENCH_DIR/results/scale-$STAMP.md"

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

need_tools nginx wrk taskset python3 curl
for p in "$LISTEN_PORT" "${BACKEND_PORTS[@]}" "$ADMIN_PORT"; do
	if port_open "$p"; then die "port $p is already in use"; fi
done

if [[ -n ${DP_BIN:-} ]]; then
	mkdir -p "$RUN_DIR/bin"
	cp "$DP_BIN" "$RUN_DIR/bin/datapunk-lb"
	DP_BIN="$RUN_DIR/bin/datapunk-lb"
else
	private_binary
fi

out() { printf '%s\n' "$*" | tee -a "$REPORT"; }

# --- backends: NGINX on every loopback address ---
for port in "${BACKEND_PORTS[@]}"; do
	conf="$RUN_DIR/backend-$port.conf"
	mkdir -p "$RUN_DIR/backend-$port-tmp"
	render "$BENCH_DIR/configs/nginx-backend.conf" "$conf" DIR="$RUN_DIR" PORT="$port"
	sed -i "s/listen 127.0.0.1:$port;/listen $port;/" "$conf"
	taskset -c "$LOAD_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/backend-$port.error.log" -c "$conf" \
		>>"$RUN_DIR/backend-$port.log" 2>&1 &
	BENCH_PIDS+=($!)
	wait_port "$port" "$!" || die "nginx backend on $port did not start"
done

# --- configs: checks on, checks off, K instances changed ---
gen() { # gen OUT CHECKS(on/off) CHANGED
	python3 - "$@" "$N" "$INTERVAL" "$LISTEN_PORT" "$ADMIN_PORT" "${BACKEND_PORTS[@]}" <<'EOF'
import sys
out, checks, changed, n, interval, listen, admin = sys.argv[1:8]
ports = [int(p) for p in sys.argv[8:]]
n, changed = int(n), int(changed)
parts = [f'''drain_timeout = "1s"
[admin]
listen = "127.0.0.1:{admin}"
[[listener]]
name = "web"
listen = "127.0.0.1:{listen}"
protocol = "http"
[[listener.route]]
path_prefix = "/"
service = "api"
[service.api]
connect_timeout = "1s"
''']
if checks == "on":
    parts.append(f'[service.api.health_check]\nkind = "http"\npath = "/health"\n'
                 f'interval = "{interval}"\ntimeout = "1s"\n')
for i in range(n):
    j = i // 4
    # The first `changed` instances move to another address.
    x = 200 if i < changed else 1
    parts.append(f'[[service.api.instance]]\nid = "i{i:06d}"\n'
                 f'address = "127.{x}.{j // 250}.{j % 250 + 1}"\nport = {ports[i % 4]}\n')
open(out, "w").write("".join(parts))
EOF
}
CONF="$RUN_DIR/lb.toml"
gen "$RUN_DIR/on.toml" on 0
gen "$RUN_DIR/off.toml" off 0
gen "$RUN_DIR/changed.toml" on "$K"
use() { cp "$RUN_DIR/$1.toml" "$CONF.tmp" && mv "$CONF.tmp" "$CONF"; }

# --- helpers ---
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$LB/status"; }
# where the RSS is: anonymous (heap, stacks) vs file (the binary, libc),
# how much of the anonymous is in transparent huge pages, and threads
rss_parts() {
	awk '/^RssAnon/ {a = $2} /^RssFile/ {f = $2} /^Threads/ {t = $2}
		END {printf "anon %.1f MB, file %.1f MB, %d threads", a / 1024, f / 1024, t}' "/proc/$LB/status"
	awk '/^AnonHugePages/ {printf ", %.1f MB of it in huge pages", $2 / 1024}' "/proc/$LB/smaps_rollup"
}
fds() { find "/proc/$LB/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
ticks() { awk '{print $14 + $15}' "/proc/$LB/stat"; }
HZ=$(getconf CLK_TCK)
metric() { # metric NAME_PREFIX: sum of the samples whose line starts with it
	curl -fsS --max-time 10 "http://127.0.0.1:$ADMIN_PORT/metrics" |
		awk -v m="$1" 'index($0, m) == 1 { s += $NF } END { printf "%.0f", s }'
}
gauge() {
	curl -fsS --max-time 10 "http://127.0.0.1:$ADMIN_PORT/metrics" |
		awk -v m="$1" 'index($0, m) == 1 && !done { print $NF; done = 1 }'
}
# reload: SIGHUP, wait for the reload line; prints "<wall ms> <line>".
reload() {
	local before rejected c0 t0 t1 deadline=$((SECONDS + 60))
	before=$(grep -c '"reason":"SIGHUP"' "$RUN_DIR/lb.log" || true)
	c0=$(ticks)
	t0=$(date +%s%N)
	kill -HUP "$LB"
	rejected=$(grep -c '"reload rejected' "$RUN_DIR/lb.log" || true)
	until (($(grep -c '"reason":"SIGHUP"' "$RUN_DIR/lb.log" || true) > before)); do
		((SECONDS < deadline)) || die "reload did not finish in 60 s"
		# A rejected reload logs its reason instead of "SIGHUP": say it
		# rather than wait (the "hang" of the first runs was one: EMFILE).
		if (($(grep -c '"reload rejected' "$RUN_DIR/lb.log" || true) > rejected)); then
			die "reload rejected: $(grep '"reload rejected' "$RUN_DIR/lb.log" | tail -1)"
		fi
		sleep 0.01
	done
	t1=$(date +%s%N)
	echo "$(((t1 - t0) / 1000000)) $(grep '"reason":"SIGHUP"' "$RUN_DIR/lb.log" | tail -1 |
		python3 -c 'import json, sys; e = json.loads(sys.stdin.read()); print("parse %.0f ms, apply %.0f ms" % (e.get("parse_ms", 0), e.get("apply_ms", 0)), end="")'), CPU $(((($(ticks) - c0) * 1000) / HZ)) ms"
}
timed_get() { # timed_get PATH: "<bytes> <ms>", median of 5
	local i line
	for i in 1 2 3 4 5 6; do
		line=$(curl -sS -o /dev/null --max-time 30 -w '%{size_download} %{time_total}' \
			"http://127.0.0.1:$ADMIN_PORT$1")
		((i > 1)) && echo "$line"
	done | sort -k2 -n | sed -n 3p | awk '{printf "%d bytes, %.1f ms", $1, $2 * 1000}'
}

# --- 1. start ---
use on
out "# Scale run $STAMP"
out ""
out "N=$N INTERVAL=$INTERVAL SETTLE=$SETTLE ROUNDS=$ROUNDS DURATION=$DURATION CONNS=$CONNS RELOADS=$RELOADS K=$K"
out "commit $(git -C "$ROOT" rev-parse --short HEAD), load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
out "mimalloc options from the environment: $(env | grep '^MIMALLOC_' | tr '\n' ' ' || true)"
out ""
t0=$(date +%s%N)
taskset -c "$LB_CPU" "$DP_BIN" run --config "$CONF" --log-format json >>"$RUN_DIR/lb.log" 2>&1 &
LB=$!
BENCH_PIDS+=("$LB")
deadline=$((SECONDS + 120))
until curl -fsS --max-time 10 "http://127.0.0.1:$ADMIN_PORT/v1/services/api?limit=1" 2>/dev/null |
	grep -q "\"instances\":$N\|\"total\":$N"; do
	((SECONDS < deadline)) || die "instances not registered after 120 s (see $RUN_DIR/lb.log)"
	ours "$LB" || die "datapunk-lb exited (see $RUN_DIR/lb.log)"
	sleep 0.2
done
out "- started, $N instances registered in $((($(date +%s%N) - t0) / 1000000)) ms; RSS $(rss_mb) MB"

# --- 2. checks with no traffic ---
needed=$(python3 -c "import sys; s='$INTERVAL'; v=float(s[:-2])/1000 if s.endswith('ms') else float(s[:-1]); print(round($N / v))")
out "- checks, no traffic (sampled every 30 s): needed $needed probes/s at the configured interval"
out ""
out "| t (s) | RSS (MB) | CPU (% of a core) | probes/s done | effective interval (s) |"
out "| ---: | ---: | ---: | ---: | ---: |"
elapsed=0
c0=$(ticks)
p0=$(metric datapunk_lb_health_checks_total)
w0=$(date +%s%N)
while ((elapsed < SETTLE)); do
	step=$((SETTLE - elapsed < 30 ? SETTLE - elapsed : 30))
	sleep "$step"
	elapsed=$((elapsed + step))
	c1=$(ticks)
	p1=$(metric datapunk_lb_health_checks_total)
	w1=$(date +%s%N)
	secs=$(python3 -c "print(($w1 - $w0) / 1e9)")
	out "| $elapsed | $(rss_mb) | $(python3 -c "print(round(100 * ($c1 - $c0) / $HZ / $secs))") | $(python3 -c "print(round(($p1 - $p0) / $secs))") | $(gauge datapunk_lb_health_check_interval_effective_seconds) |"
	c0=$c1 p0=$p1 w0=$w1
done
RSS_SETTLED=$(rss_mb)
out ""
out "- RSS after the settle: $RSS_SETTLED MB ($(rss_parts))"
out ""

# --- 3. admin responses ---
out "- admin responses (median of 5, while checks run):"
for path in /metrics "/v1/services/api?limit=100" /status/data; do
	out "  - \`$path\`: $(timed_get "$path")"
done
out "  - RSS after them: $(rss_mb) MB"
out ""

# --- 4. proxy req/s, checks on vs off ---
if ((ROUNDS > 0)); then
out "- proxy req/s, wrk -t1 -c$CONNS -d${DURATION}s, checks on (A) / off (B), ABBA:"
out ""
out "| round | order | A req/s | B req/s | balancer fds after |"
out "| ---: | --- | ---: | ---: | ---: |"
wrk_rps() {
	taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION"s --timeout 2s \
		"http://127.0.0.1:$LISTEN_PORT/" 2>&1 | tee -a "$RUN_DIR/wrk.log" |
		awk '/Requests\/sec/ { printf "%.0f", $2 }'
}
declare -a A_RUNS=() B_RUNS=()
for ((r = 1; r <= ROUNDS; r++)); do
	order=$([[ $((r % 2)) == 1 ]] && echo ABBA || echo BAAB)
	declare -A got=([A]="" [B]="")
	for v in $(echo "$order" | grep -o .); do
		if [[ $v == A ]]; then use on; else use off; fi
		reload >/dev/null
		sleep 2
		rps=$(wrk_rps)
		got[$v]+="$rps "
		if [[ $v == A ]]; then A_RUNS+=("$rps"); else B_RUNS+=("$rps"); fi
	done
	out "| $r | $order | ${got[A]} | ${got[B]} | $(fds) |"
done
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
ma=$(med "${A_RUNS[@]}")
mb=$(med "${B_RUNS[@]}")
out ""
out "  median A $ma req/s, B $mb req/s, A/B = $(python3 -c "print(f'{$ma / $mb:.2f}')")"
out ""
fi

# --- 5. reloads ---
use on
reload >/dev/null
sleep 5
out "- $RELOADS reloads of the same $N-instance file (checks on), RSS before: $(rss_mb) MB"
out ""
out "| reload | SIGHUP → logged (ms) | logged parse / apply | RSS after (MB) | fds |"
out "| ---: | ---: | --- | ---: | ---: |"
for ((r = 1; r <= RELOADS; r++)); do
	line=$(reload)
	sleep 3
	out "| $r | ${line%% *} | ${line#* } | $(rss_mb) | $(fds) |"
done
use changed
line=$(reload)
out ""
out "- a reload changing $K instances' addresses: ${line%% *} ms (${line#* })"
use on
line=$(reload)
rss_now=$(rss_mb)
sleep 5 # the parse's peak is returned within seconds; read both
out "- and back: ${line%% *} ms (${line#* }); RSS $rss_now MB at once, $(rss_mb) MB 5 s later"
out ""
out "RSS at the end: $(rss_mb) MB ($(rss_parts))"
out "RSS after the settle: $RSS_SETTLED MB = $(python3 -c "print(round($RSS_SETTLED * 1048576 / $N))") bytes per instance; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
log "report: $REPORT (raw logs: $RUN_DIR)"
