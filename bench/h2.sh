#!/usr/bin/env bash
# HTTP/2 clients in front of HTTP/1.1 backends: datapunk-lb
# (upstream_protocol = "http1", the default) vs HAProxy (`bind … proto h2`),
# same three NGINX backends, same h2load load (h2c prior knowledge),
# interleaved over ROUNDS rounds. Latency percentiles come from h2load's
# per-request log (--log-file), not from a histogram. See bench/README.md.
#
# Usage: bench/h2.sh   (knobs are environment variables, defaults below)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}     # seconds per measured run
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-50}           # h2load client connections
STREAMS=${STREAMS:-10}       # concurrent streams per connection
LB_CPU=${LB_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
LISTEN_PORT=${LISTEN_PORT:-18080}
BACKEND_PORTS=(18081 18082 18083)
BUILD=${BUILD:-1}

STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
RUN_DIR="$RESULTS_DIR/tmp/h2-$STAMP"
mkdir -p "$RUN_DIR"
TSV="$RUN_DIR/results.tsv"
REPORT="$RESULTS_DIR/h2-$STAMP.md"

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in haproxy nginx h2load taskset python3 curl; do
	command -v "$tool" >/dev/null || die "$tool not found"
done

private_binary

for p in "${BACKEND_PORTS[@]}"; do start_nginx_backend "$p"; done

# start_haproxy_h2: HAProxy with an h2c frontend; sets PROXY_PID.
start_haproxy_h2() {
	local servers="" p i=0 conf="$RUN_DIR/haproxy-h2.cfg"
	for p in "${BACKEND_PORTS[@]}"; do
		i=$((i + 1))
		servers+="    server b$i 127.0.0.1:$p check inter 100ms"$'\n'
	done
	render "$BENCH_DIR/configs/haproxy-h2.cfg" "$conf" LISTEN_PORT="$LISTEN_PORT" SERVERS="$servers"
	taskset -c "$LB_CPU" haproxy -db -f "$conf" >>"$RUN_DIR/haproxy.log" 2>&1 &
	PROXY_PID=$!
	BENCH_PIDS+=("$PROXY_PID")
	wait_port "$LISTEN_PORT" "$PROXY_PID" || die "haproxy did not start"
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

for ((round = 1; round <= ROUNDS; round++)); do
	if ((round % 2)); then order=(haproxy datapunk); else order=(datapunk haproxy); fi
	# DP_ALT_BIN: a second datapunk-lb build (bench/lib.sh), run after them.
	if [[ -n ${DP_ALT_BIN:-} ]]; then
		if ((round % 2)); then order+=(datapunk_alt); else order=(datapunk_alt "${order[@]}"); fi
	fi
	for k in "${order[@]}"; do run_one "$round" "$k"; done
done

python3 - "$TSV" >"$REPORT" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = lambda k, p: statistics.median(float(r[k]) for r in rows if r["proxy"] == p)
print("| proxy | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/request | errors + 4xx/5xx |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for p in [p for p in ("haproxy", "datapunk", "datapunk_alt") if any(r["proxy"] == p for r in rows)]:
    failed = sum(int(r["errored"]) + int(r["non2xx"]) for r in rows if r["proxy"] == p)
    print(f"| {p} | {med('rps', p):.0f} | {med('p50_ms', p):.2f} | {med('p99_ms', p):.2f} | {med('p999_ms', p):.2f} | {med('cpu_us_per_req', p):.1f} | {failed} |")
print()
print(f"datapunk-lb / HAProxy: throughput {med('rps','datapunk')/med('rps','haproxy'):.2f}x, "
      f"CPU per request {med('cpu_us_per_req','datapunk')/med('cpu_us_per_req','haproxy'):.2f}x, "
      f"p99 {med('p99_ms','datapunk')/med('p99_ms','haproxy'):.2f}x (medians of {len({r['round'] for r in rows})} rounds)")
if any(r["proxy"] == "datapunk_alt" for r in rows):
    print(f"datapunk-lb / the alt build: throughput {med('rps','datapunk')/med('rps','datapunk_alt'):.2f}x, "
          f"CPU per request {med('cpu_us_per_req','datapunk')/med('cpu_us_per_req','datapunk_alt'):.2f}x, "
          f"p99 {med('p99_ms','datapunk')/med('p99_ms','datapunk_alt'):.2f}x")
PY
cp "$TSV" "$RESULTS_DIR/h2-$STAMP.tsv"
log "report: $REPORT"
cat "$REPORT"
