#!/usr/bin/env bash
# SNI passthrough cost (docs/tls.md "Passthrough"): new TLS connections per
# second, one request each (wrk with `Connection: close`, TLS 1.3, ECDSA
# P-256), straight to an nginx TLS backend, through datapunk-lb's `tcp`
# listener with `[[listener.sni_route]]`, and through HAProxy's
# `req.ssl_sni`; one core each for the balancers (`--threads 1`,
# `nbthread 1`), rounds interleaved. Prints each run and the medians.
#
#   bench/sni_passthrough.sh [ROUNDS] [SECONDS]     (default 3 rounds of 5 s)
#
# Ports 18191-18193 (not the fixed bench ports 18080-18084).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-5}
dir=$(mktemp -d /tmp/datapunk-sni-bench.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

cargo build --release -q -p datapunk-lb
cp target/release/datapunk-lb "$dir/datapunk-lb"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" -subj /CN=a.example \
    -addext subjectAltName=DNS:a.example,IP:127.0.0.1 2>/dev/null

cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx.err;
events { worker_connections 4096; }
http {
    access_log off;
    server {
        listen 127.0.0.1:18191 ssl;
        ssl_certificate $dir/cert.pem;
        ssl_certificate_key $dir/key.pem;
        ssl_protocols TLSv1.3;
        location / { return 200 "ok\n"; }
    }
}
CONF
nginx -c "$dir/nginx.conf" -p "$dir" &
pids+=($!)

# wrk sends the URL's host as SNI: 127.0.0.1 here.
cat >"$dir/lb.toml" <<CONF
[admin]
listen = "127.0.0.1:0"
[[listener]]
name = "pass"
listen = "127.0.0.1:18192"
protocol = "tcp"
[[listener.sni_route]]
server_names = ["a.example", "127.0.0.1"]
service = "tls"
[service.tls]
strategy = "round_robin"
slow_start = "0s"
[service.tls.health_check]
kind = "none"
[[service.tls.instance]]
id = "nginx"
address = "127.0.0.1"
port = 18191
CONF
"$dir/datapunk-lb" run --config "$dir/lb.toml" --threads 1 2>"$dir/lb.log" &
pids+=($!)

cat >"$dir/haproxy.cfg" <<CONF
global
    nbthread 1
defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend pass
    bind 127.0.0.1:18193
    tcp-request inspect-delay 10s
    tcp-request content accept if { req_ssl_hello_type 1 }
    use_backend tls if { req.ssl_sni -i a.example 127.0.0.1 }
backend tls
    server nginx 127.0.0.1:18191
CONF
haproxy -f "$dir/haproxy.cfg" -db 2>"$dir/haproxy.log" &
pids+=($!)
sleep 1

run() { # name port -> connections/s
    local out
    out=$(wrk -t1 -c16 -d"${secs}s" -H 'Connection: close' "https://127.0.0.1:$2/" 2>&1)
    local rps errors
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    errors=$(grep -E 'Socket errors|Non-2xx' <<<"$out" | tr -s ' ' || true)
    echo "$1 $rps ${errors:+($errors)}" >&2
    echo "$1 $rps"
}
: >"$dir/results"
for r in $(seq 1 "$rounds"); do
    echo "== round $r (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    run direct 18191 >>"$dir/results"
    run datapunk-lb 18192 >>"$dir/results"
    run haproxy 18193 >>"$dir/results"
done
python3 - "$dir/results" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    name, rps = line.split()
    runs.setdefault(name, []).append(float(rps))
med = {k: statistics.median(v) for k, v in runs.items()}
for k, v in runs.items():
    print(f"{k:12} median {med[k]:8.0f} conn/s  runs {' '.join(f'{x:.0f}' for x in v)}")
print(f"datapunk-lb / haproxy = {med['datapunk-lb'] / med['haproxy']:.2f}")
print(f"datapunk-lb / direct  = {med['datapunk-lb'] / med['direct']:.2f}")
PY
