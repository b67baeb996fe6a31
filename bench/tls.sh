#!/usr/bin/env bash
# TLS termination cost (issue 13, "Speed"; docs/benchmarks.md "TLS
# termination"): datapunk-lb's `https` listener against HAProxy's
# `bind ... ssl` with the same certificate (ECDSA P-256, TLS 1.3 as both
# negotiate with wrk), in front of the same plain-HTTP nginx backend:
#
#   handshake  new TLS connection per request (wrk `Connection: close`):
#              full handshakes per second
#   keepalive  keep-alive HTTPS requests (wrk, 16 connections)
#
# Balancer pinned to core 0 (`--threads 1`, `nbthread 1`), wrk and the
# backend to core 1, rounds interleaved (the order rotates). Prints every
# run (req/s, balancer CPU µs per request from /proc/<pid>/stat) and the
# medians and ratios.
#
#   BUILD=0 bench/tls.sh [ROUNDS] [SECONDS]     (default 3 rounds of 5 s)
#
# Ports 18194-18196 (not the fixed bench ports 18080-18084).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-5}
dir=$(mktemp -d /tmp/datapunk-tls-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

if [ "${BUILD:-1}" = 1 ]; then cargo build --release -q -p datapunk-lb; fi
cp target/release/datapunk-lb "$dir/datapunk-lb"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" -subj /CN=a.example \
    -addext subjectAltName=DNS:a.example,IP:127.0.0.1 2>/dev/null
cat "$dir/cert.pem" "$dir/key.pem" >"$dir/haproxy.pem"

cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx.err;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:18194;
        location / { return 200 "ok\n"; }
    }
}
CONF
taskset -c 1 nginx -c "$dir/nginx.conf" -p "$dir" &
pids+=($!)

cat >"$dir/lb.toml" <<CONF
[admin]
listen = "127.0.0.1:0"
[[listener]]
name = "web"
listen = "127.0.0.1:18195"
protocol = "https"
[[listener.tls.certificate]]
cert_file = "$dir/cert.pem"
key_file = "$dir/key.pem"
server_names = ["a.example", "127.0.0.1"]
[[listener.route]]
path_prefix = "/"
service = "api"
[service.api]
strategy = "round_robin"
slow_start = "0s"
[service.api.health_check]
kind = "none"
[[service.api.instance]]
id = "nginx"
address = "127.0.0.1"
port = 18194
CONF
taskset -c 0 "$dir/datapunk-lb" run --config "$dir/lb.toml" --threads 1 2>"$dir/lb.log" &
lb_pid=$!
pids+=($lb_pid)

cat >"$dir/haproxy.cfg" <<CONF
global
    nbthread 1
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend web
    bind 127.0.0.1:18196 ssl crt $dir/haproxy.pem
    default_backend api
backend api
    http-reuse always
    server nginx 127.0.0.1:18194
CONF
taskset -c 0 haproxy -f "$dir/haproxy.cfg" -db 2>"$dir/haproxy.log" &
hap_pid=$!
pids+=($hap_pid)
sleep 1

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # proxy pid port mode -> "proxy mode req/s cpu_us_per_req"
    local extra=() conns=16 out before after rps n
    if [ "$4" = handshake ]; then extra=(-H 'Connection: close'); fi
    before=$(ticks "$2")
    out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${secs}s" "${extra[@]}" "https://127.0.0.1:$3/" 2>&1)
    after=$(ticks "$2")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    errors=$(grep -E 'Socket errors|Non-2xx' <<<"$out" | tr -s ' ' || true)
    # clock ticks are 10 ms (USER_HZ 100).
    cpu=$(python3 -c "print(f'{($after - $before) * 10000 / max($n, 1):.1f}')")
    echo "$1 $4 $rps ${cpu}us ${errors:+($errors)}" >&2
    echo "$1 $4 $rps $cpu"
}
: >"$dir/results"
for r in $(seq 1 "$rounds"); do
    echo "== round $r (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    for mode in handshake keepalive; do
        if [ $((r % 2)) = 1 ]; then
            run datapunk-lb "$lb_pid" 18195 "$mode" >>"$dir/results"
            run haproxy "$hap_pid" 18196 "$mode" >>"$dir/results"
        else
            run haproxy "$hap_pid" 18196 "$mode" >>"$dir/results"
            run datapunk-lb "$lb_pid" 18195 "$mode" >>"$dir/results"
        fi
    done
done
python3 - "$dir/results" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    proxy, mode, rps, cpu = line.split()
    runs.setdefault((mode, proxy), []).append((float(rps), float(cpu)))
for mode in ("handshake", "keepalive"):
    med = {}
    for proxy in ("datapunk-lb", "haproxy"):
        v = runs[(mode, proxy)]
        med[proxy] = (statistics.median(x for x, _ in v), statistics.median(c for _, c in v))
        print(f"{mode:9} {proxy:11} median {med[proxy][0]:8.0f} req/s {med[proxy][1]:6.1f} µs CPU/req"
              f"  runs {' '.join(f'{x:.0f}' for x, _ in v)}")
    d, h = med["datapunk-lb"], med["haproxy"]
    print(f"{mode:9} datapunk-lb / haproxy: req/s {d[0] / h[0]:.2f}x, CPU per request {d[1] / h[1]:.2f}x")
PY
