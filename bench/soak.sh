#!/usr/bin/env bash
# Soak and fault harness: mixed load (HTTP/1.1, HTTP/2, TCP, WebSocket)
# through datapunk-lb for DURATION seconds while faults are injected on a
# schedule; reports requests by protocol and outcome cause, retries, and the
# balancer's RSS and open file descriptors sampled every second. See
# bench/README.md, section "Soak".
#
# Usage: bench/soak.sh                 (30 minutes)
#        DURATION=300 bench/soak.sh    (5 minutes)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

DURATION=${DURATION:-1800}   # seconds of load
CYCLE=${CYCLE:-120}          # the fault schedule repeats every CYCLE seconds
BUILD=${BUILD:-1}
HTTP_PORT=18180
TCP_PORT=18190
ADMIN_PORT=18199
BACKENDS=(1 2 3 4)           # HTTP on 1818N, TCP echo on 1828N

STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
RUN_DIR="$RESULTS_DIR/tmp/soak-$STAMP"
REPORT="$RESULTS_DIR/soak-$STAMP.md"
mkdir -p "$RUN_DIR"

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in python3 curl h2load; do
	command -v "$tool" >/dev/null || die "$tool not found"
done
for p in $HTTP_PORT $TCP_PORT $ADMIN_PORT 18181 18182 18183 18184 18281 18282 18283 18284; do
	port_open "$p" && die "port $p is already in use"
done

private_binary
TOKEN=soak-token-0123456789
printf '%s\n' "$TOKEN" >"$RUN_DIR/token"
FAULTS="$RUN_DIR/faults.tsv"
printf 't\tfault\n' >"$FAULTS"
T0=$EPOCHSECONDS
fault() {
	printf '%s\t%s\n' "$((EPOCHSECONDS - T0))" "$*" >>"$FAULTS"
	log "fault: $*"
}

declare -A SOAK_BACKEND=()
start_backend() {
	local n=$1
	python3 "$BENCH_DIR/soak_backend.py" --name "b$n" --port "1818$n" --tcp-port "1828$n" \
		>>"$RUN_DIR/backend-$n.log" 2>&1 &
	SOAK_BACKEND[$n]=$!
	BENCH_PIDS+=($!)
	wait_port "1818$n" "$!" || die "backend $n did not start"
}
set_mode() { curl -fsS --max-time 2 "http://127.0.0.1:1818$1/__mode/$2" >/dev/null || true; }

for n in "${BACKENDS[@]}"; do start_backend "$n"; done

# The config; "# generation N" changes on every valid reload.
write_config() {
	local instances="" tcp_instances="" n
	for n in "${BACKENDS[@]}"; do
		instances+=$'\n'"[[service.api.instance]]"$'\n'"id = \"b$n\""$'\n'"address = \"127.0.0.1\""$'\n'"port = 1818$n"$'\n'
		tcp_instances+=$'\n'"[[service.echo.instance]]"$'\n'"id = \"t$n\""$'\n'"address = \"127.0.0.1\""$'\n'"port = 1828$n"$'\n'
	done
	cat >"$RUN_DIR/datapunk-lb.toml.new" <<-EOF
		# generation $1
		drain_timeout = "5s"

		[admin]
		listen = "127.0.0.1:$ADMIN_PORT"
		token_file = "$RUN_DIR/token"

		[[listener]]
		name = "web"
		listen = "127.0.0.1:$HTTP_PORT"
		protocol = "http"

		[[listener.route]]
		path_prefix = "/"
		service = "api"

		[[listener]]
		name = "tcp"
		listen = "127.0.0.1:$TCP_PORT"
		protocol = "tcp"
		service = "echo"

		[service.api]
		strategy = "adaptive"
		retries = 2
		connect_timeout = "500ms"
		request_timeout = "5s"

		[service.api.health_check]
		kind = "http"
		path = "/health"
		interval = "1s"
		timeout = "500ms"

		[service.echo]
		strategy = "least_connections"
		retries = 2
		connect_timeout = "500ms"

		[service.echo.health_check]
		kind = "tcp"
		interval = "1s"
		timeout = "500ms"
		$instances
		$tcp_instances
	EOF
	mv "$RUN_DIR/datapunk-lb.toml.new" "$RUN_DIR/datapunk-lb.toml"
}
write_config 1
"$DP_BIN" check --config "$RUN_DIR/datapunk-lb.toml" >"$RUN_DIR/check.log" 2>&1 || die "config rejected: $(cat "$RUN_DIR/check.log")"
"$DP_BIN" run --config "$RUN_DIR/datapunk-lb.toml" >>"$RUN_DIR/datapunk-lb.log" 2>&1 &
LB=$!
BENCH_PIDS+=("$LB")
wait_port "$HTTP_PORT" "$LB" || die "datapunk-lb did not start (see $RUN_DIR/datapunk-lb.log)"
sleep 2

# RSS (KiB) and open descriptors of the balancer, every second.
printf 't\trss_kib\tfds\n' >"$RUN_DIR/samples.tsv"
(
	while kill -0 "$LB" 2>/dev/null; do
		rss=$(awk '/^VmRSS/ {print $2}' "/proc/$LB/status" 2>/dev/null || echo 0)
		fds=$(find "/proc/$LB/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
		printf '%s\t%s\t%s\n' "$((EPOCHSECONDS - T0))" "$rss" "$fds"
		# The balancer's view of `api`: eligible count, panic, breakers.
		curl -sS --max-time 1 -H "Authorization: Bearer $TOKEN" \
			"http://127.0.0.1:$ADMIN_PORT/v1/services/api" >>"$RUN_DIR/states.jsonl" 2>/dev/null &&
			echo >>"$RUN_DIR/states.jsonl"
		sleep 1
	done
) >>"$RUN_DIR/samples.tsv" &
BENCH_PIDS+=($!)

log "load for $DURATION s; raw logs in $RUN_DIR"
python3 "$BENCH_DIR/soak_load.py" --http-addr "127.0.0.1:$HTTP_PORT" --tcp-addr "127.0.0.1:$TCP_PORT" \
	--duration "$DURATION" >"$RUN_DIR/load.jsonl" 2>"$RUN_DIR/load.err" &
LOAD=$!
BENCH_PIDS+=("$LOAD")
# HTTP/2 (h2c prior knowledge): 2 connections of up to 4 streams, 200 requests/s each.
h2load -c2 -m4 --rps=200 -D"$DURATION" --log-file="$RUN_DIR/h2load.log" "http://127.0.0.1:$HTTP_PORT/item" \
	>"$RUN_DIR/h2load.out" 2>&1 &
H2=$!
BENCH_PIDS+=("$H2")

admin() { curl -sS --max-time 5 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$@"; }

# The schedule, at these seconds of every cycle.
generation=1
cycle_start=$EPOCHSECONDS
at() { # at SECOND: sleeps until that second of the current cycle
	local wait=$((cycle_start + $1 - EPOCHSECONDS))
	((wait > 0)) && sleep "$wait"
	((EPOCHSECONDS - T0 < DURATION))
}
while ((EPOCHSECONDS - T0 < DURATION - 10)); do
	cycle_start=$EPOCHSECONDS
	at 10 || break
	fault "SIGKILL backend 1"
	kill -KILL "${SOAK_BACKEND[1]}" 2>/dev/null || true
	wait "${SOAK_BACKEND[1]}" 2>/dev/null || true
	at 20 || break
	fault "restart backend 1"
	start_backend 1
	at 30 || break
	fault "backend 2 slow (2 s per response)"
	set_mode 2 slow
	at 45 || break
	fault "backend 2 ok"
	set_mode 2 ok
	at 50 || break
	fault "backend 3 answers 500"
	set_mode 3 error
	at 65 || break
	fault "backend 3 ok"
	set_mode 3 ok
	at 70 || break
	fault "backend 4 resets mid-body"
	set_mode 4 reset
	at 85 || break
	fault "backend 4 ok"
	set_mode 4 ok
	at 90 || break
	generation=$((generation + 1))
	write_config "$generation"
	fault "SIGHUP, valid config (generation $generation)"
	kill -HUP "$LB"
	at 95 || break
	cp "$RUN_DIR/datapunk-lb.toml" "$RUN_DIR/datapunk-lb.toml.good"
	printf '[service.api]\nstrategy = "no-such-strategy"\n' >>"$RUN_DIR/datapunk-lb.toml"
	fault "SIGHUP, invalid config"
	kill -HUP "$LB"
	sleep 1
	mv "$RUN_DIR/datapunk-lb.toml.good" "$RUN_DIR/datapunk-lb.toml"
	at 100 || break
	fault "admin: register b5 (backend 1's port), status $(admin -X PUT -H 'content-type: application/json' \
		-d '{"address":"127.0.0.1","port":18181}' "http://127.0.0.1:$ADMIN_PORT/v1/services/api/instances/b5")"
	at 110 || break
	fault "admin: remove b5 with a 5 s drain, status $(admin -X DELETE \
		"http://127.0.0.1:$ADMIN_PORT/v1/services/api/instances/b5?drain=5s")"
	at "$CYCLE" || break
done

wait "$LOAD" || true
wait "$H2" || true
curl -fsS --max-time 5 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$ADMIN_PORT/metrics" >"$RUN_DIR/metrics.txt" || true
fault "SIGTERM"
term_start=$EPOCHREALTIME
kill -TERM "$LB"
status=0
wait "$LB" || status=$?
term_s=$(awk -v a="$term_start" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}')
echo "exit status $status after SIGTERM, in $term_s s" >"$RUN_DIR/exit.txt"

python3 "$BENCH_DIR/soak_report.py" "$RUN_DIR" "$DURATION" >"$REPORT"
cp "$RUN_DIR/samples.tsv" "$RESULTS_DIR/soak-$STAMP.samples.tsv"
cp "$RUN_DIR/soak.svg" "$RESULTS_DIR/soak-$STAMP.svg" 2>/dev/null || true
log "report: $REPORT"
cat "$REPORT"
