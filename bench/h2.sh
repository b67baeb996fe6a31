#!/usr/bin/env bash
# HTTP/2 clients in front of HTTP/1.1 backends: datapunk-lb
# (upstream_protocol = "http1", the default) vs HAProxy (`bind … proto h2`),
# same three NGINX backends, same h2load load (h2c prior knowledge),
# interleaved over ROUNDS rounds. Latency percentiles come from h2load's
# per-request log (--log-file), not from a histogram. See bench/README.md.
#
# UPSTREAM=h2c: HTTP/2 in and out. The backends speak h2c only (NGINX
# `listen … http2`, configs/nginx-backend-h2c.conf), datapunk-lb sends
# h2c (`upstream_protocol = "h2c"`, configs/datapunk-lb-h2c.toml), HAProxy
# `proto h2` to its servers (configs/haproxy-h2c.cfg), and NGINX joins as a
# proxy through `grpc_pass` (configs/nginx-proxy-h2c.conf); the load
# defaults to 100 streams over 10 connections (h2load -c10 -m10).
#
# Usage: flock /tmp/datapunk-bench.lock bench/h2.sh   (knobs are
# environment variables, defaults below)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}     # seconds per measured run
WARMUP=${WARMUP:-2}
UPSTREAM=${UPSTREAM:-http1}  # http1: HTTP/1.1 backends; h2c: HTTP/2 backends
case $UPSTREAM in
http1) CONNS=${CONNS:-50} ;; # h2load client connections
h2c) CONNS=${CONNS:-10} ;;
*) echo "UPSTREAM must be http1 or h2c" >&2; exit 2 ;;
esac
STREAMS=${STREAMS:-10}       # concurrent streams per connection
LB_CPU=${LB_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
LISTEN_PORT=${LISTEN_PORT:-18080}
BACKEND_PORTS=(18081 18082 18083)
BUILD=${BUILD:-1}

STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
NAME=h2-$STAMP
if [[ $UPSTREAM == h2c ]]; then NAME=h2c-$STAMP; fi
RUN_DIR="$RESULTS_DIR/tmp/$NAME"
mkdir -p "$RUN_DIR"
TSV="$RUN_DIR/results.tsv"
REPORT="$RESULTS_DIR/$NAME.md"

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

need_tools haproxy nginx h2load taskset python3 curl

private_binary

if [[ $UPSTREAM == h2c ]]; then
	BACKEND_TEMPLATE="$BENCH_DIR/configs/nginx-backend-h2c.conf"
	DP_TEMPLATE="$BENCH_DIR/configs/datapunk-lb-h2c.toml"
	PROXIES=(haproxy nginx datapunk)
else
	PROXIES=(haproxy datapunk)
fi
# DP_ALT_BIN: a second datapunk-lb build (bench/lib.sh) in every round.
if [[ -n ${DP_ALT_BIN:-} ]]; then PROXIES+=(datapunk_alt); fi
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

for p in "${BACKEND_PORTS[@]}"; do start_nginx_backend "$p"; done

# start_haproxy_h2: HAProxy with an h2c frontend (and h2c servers when
# UPSTREAM=h2c); sets PROXY_PID.
start_haproxy_h2() {
	local servers="" p i=0 conf="$RUN_DIR/haproxy-h2.cfg" tpl=haproxy-h2.cfg server_opts=""
	if [[ $UPSTREAM == h2c ]]; then tpl=haproxy-h2c.cfg server_opts=" proto h2 check-proto h2"; fi
	for p in "${BACKEND_PORTS[@]}"; do
		i=$((i + 1))
		servers+="    server b$i 127.0.0.1:$p check inter 100ms$server_opts"$'\n'
	done
	render "$BENCH_DIR/configs/$tpl" "$conf" LISTEN_PORT="$LISTEN_PORT" SERVERS="$servers"
	taskset -c "$LB_CPU" haproxy -db -f "$conf" >>"$RUN_DIR/haproxy.log" 2>&1 &
	PROXY_PID=$!
	BENCH_PIDS+=("$PROXY_PID")
	wait_port "$LISTEN_PORT" "$PROXY_PID" || die "haproxy did not start"
	sleep 0.5
}

# start_nginx_h2c: NGINX with an h2c frontend and grpc_pass to the h2c
# backends (UPSTREAM=h2c); sets PROXY_PID.
start_nginx_h2c() {
	local servers="" p conf="$RUN_DIR/nginx-proxy-h2c.conf"
	for p in "${BACKEND_PORTS[@]}"; do
		servers+="        server 127.0.0.1:$p max_fails=1 fail_timeout=1s;"$'\n'
	done
	mkdir -p "$RUN_DIR/nginx-proxy-tmp"
	render "$BENCH_DIR/configs/nginx-proxy-h2c.conf" "$conf" DIR="$RUN_DIR" \
		LISTEN_PORT="$LISTEN_PORT" SERVERS="$servers"
	taskset -c "$LB_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/nginx-proxy.error.log" -c "$conf" \
		>>"$RUN_DIR/nginx-proxy.log" 2>&1 &
	PROXY_PID=$!
	BENCH_PIDS+=("$PROXY_PID")
	wait_port "$LISTEN_PORT" "$PROXY_PID" || die "nginx did not start"
	sleep 0.5
}

# run_h2load SECONDS OUT [LOG]
run_h2load() {
	taskset -c "$LOAD_CPU" h2load -c"$CONNS" -m"$STREAMS" -D"$1" ${3:+--log-file="$3"} \
		"http://127.0.0.1:$LISTEN_PORT/" >"$2" 2>&1
}

printf 'round\tproxy\trps\trequests\terrored\tnon2xx\tp50_ms\tp99_ms\tp999_ms\tproxy_cpu_s\tcpu_us_per_req\n' >"$TSV"

run_one() {
	local round=$1 kind=$2 out="$RUN_DIR/r$1-$2.h2load" reqlog="$RUN_DIR/r$1-$2.log" t0 t1
	log "round $round/$ROUNDS $kind"
	case $kind in
	haproxy) start_haproxy_h2 ;;
	nginx) start_nginx_h2c ;;
	datapunk) start_proxy datapunk round_robin true "${BACKEND_PORTS[@]}" ;;
	datapunk_alt) start_proxy datapunk_alt round_robin true "${BACKEND_PORTS[@]}" ;;
	esac
	run_h2load "$WARMUP" "$out.warmup"
	t0=$(proc_ticks "$PROXY_PID")
	run_h2load "$DURATION" "$out" "$reqlog" || die "h2load failed: $(tail -5 "$out")"
	t1=$(proc_ticks "$PROXY_PID")
	stop_proxy
	python3 - "$out" "$reqlog" "$((t1 - t0))" "$(getconf CLK_TCK)" "$round" "$kind" >>"$TSV" <<'PY'
import re, sys
out, reqlog, ticks, hz, rnd, kind = sys.argv[1:]
text = open(out).read()
rps = float(re.search(r"finished in [^,]+, ([\d.]+) req/s", text).group(1))
m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
total, done, ok, errored = (int(m.group(i)) for i in (1, 2, 3, 5))
st = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
non2xx = int(st.group(3)) + int(st.group(4))
# --log-file: start time (µs since epoch), status, duration (µs) per request.
durs = sorted(int(l.split()[2]) for l in open(reqlog) if l.strip())
pct = lambda q: durs[min(len(durs) - 1, int(q * len(durs)))] / 1000
cpu_s = int(ticks) / int(hz)
print(f"{rnd}\t{kind}\t{rps:.0f}\t{done}\t{errored}\t{non2xx}\t{pct(0.5):.2f}\t{pct(0.99):.2f}\t{pct(0.999):.2f}\t{cpu_s:.2f}\t{1e6 * cpu_s / max(done, 1):.1f}")
PY
	log "  $(tail -1 "$TSV")"
}

# Each round runs every proxy once, the order rotated by one from round to
# round, so none always goes first.
for ((round = 1; round <= ROUNDS; round++)); do
	n=${#PROXIES[@]} s=$(((round - 1) % ${#PROXIES[@]}))
	order=("${PROXIES[@]:s:n-s}" "${PROXIES[@]:0:s}")
	for k in "${order[@]}"; do run_one "$round" "$k"; done
done

{
	echo "- $(date -u '+%Y-%m-%d %H:%M UTC'), datapunk-lb commit $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- crates Cargo.toml Cargo.lock || echo ' + uncommitted changes in crates/')${DP_ALT_BIN:+, datapunk_alt: $DP_ALT_BIN}"
	echo "- UPSTREAM=$UPSTREAM, h2load -c$CONNS -m$STREAMS, ${WARMUP} s warm-up, ${DURATION} s measured, $ROUNDS rounds; proxy on core $LB_CPU, load and backends on core $LOAD_CPU"
	echo "- load average at start: $LOAD_START; at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
	echo
} >"$REPORT"
python3 - "$TSV" >>"$REPORT" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = lambda k, p: statistics.median(float(r[k]) for r in rows if r["proxy"] == p)
def per_round(k, a, b):
    by = {(r["round"], r["proxy"]): float(r[k]) for r in rows}
    return [by[(n, a)] / by[(n, b)] for n in sorted({r["round"] for r in rows}, key=int) if (n, a) in by and (n, b) in by and by[(n, b)]]
print("| proxy | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/request | errors + 4xx/5xx |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for p in [p for p in ("haproxy", "nginx", "datapunk", "datapunk_alt") if any(r["proxy"] == p for r in rows)]:
    failed = sum(int(r["errored"]) + int(r["non2xx"]) for r in rows if r["proxy"] == p)
    print(f"| {p} | {med('rps', p):.0f} | {med('p50_ms', p):.2f} | {med('p99_ms', p):.2f} | {med('p999_ms', p):.2f} | {med('cpu_us_per_req', p):.1f} | {failed} |")
print()
print(f"datapunk-lb / HAProxy: throughput {med('rps','datapunk')/med('rps','haproxy'):.2f}x, "
      f"CPU per request {med('cpu_us_per_req','datapunk')/med('cpu_us_per_req','haproxy'):.2f}x, "
      f"p99 {med('p99_ms','datapunk')/med('p99_ms','haproxy'):.2f}x (medians of {len({r['round'] for r in rows})} rounds)")
for other in ("haproxy", "nginx", "datapunk_alt"):
    if not any(r["proxy"] == other for r in rows):
        continue
    rps, cpu = per_round("rps", "datapunk", other), per_round("cpu_us_per_req", "datapunk", other)
    print(f"per round, datapunk-lb / {other}: throughput {', '.join(f'{x:.2f}' for x in rps)} "
          f"(median {statistics.median(rps):.2f}); CPU per request {', '.join(f'{x:.2f}' for x in cpu)} "
          f"(median {statistics.median(cpu):.2f})")
if any(r["proxy"] == "nginx" for r in rows):
    print(f"datapunk-lb / NGINX: throughput {med('rps','datapunk')/med('rps','nginx'):.2f}x, "
          f"CPU per request {med('cpu_us_per_req','datapunk')/med('cpu_us_per_req','nginx'):.2f}x, "
          f"p99 {med('p99_ms','datapunk')/med('p99_ms','nginx'):.2f}x")
if any(r["proxy"] == "datapunk_alt" for r in rows):
    print(f"datapunk-lb / the alt build: throughput {med('rps','datapunk')/med('rps','datapunk_alt'):.2f}x, "
          f"CPU per request {med('cpu_us_per_req','datapunk')/med('cpu_us_per_req','datapunk_alt'):.2f}x, "
          f"p99 {med('p99_ms','datapunk')/med('p99_ms','datapunk_alt'):.2f}x")
PY
cp "$TSV" "$RESULTS_DIR/$NAME.tsv"
log "report: $REPORT"
cat "$REPORT"
