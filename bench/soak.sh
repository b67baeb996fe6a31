#!/usr/bin/env bash
# Soak and fault harness: mixed load (HTTP/1.1, HTTP/2, TCP, WebSocket)
# through datapunk-lb for DURATION seconds while faults are injected on a
# schedule; reports requests by protocol and outcome cause, retries, and the
# balancer's RSS and open file descriptors sampled every second. See
# bench/README.md, section "Soak".
#
# Usage: bench/soak.sh                 (30 minutes)
#        DURATION=300 bench/soak.sh    (5 minutes)
#        ETCD=1 bench/soak.sh          (etcd mode: also a service discovered
#                                       from a local etcd that is SIGKILLed
#                                       and restarted every cycle)
#
# Descriptors: sampled for BASELINE seconds before the load (the baseline),
# during it, and for POST_LOAD seconds after it (before SIGTERM). Idle
# upstream connections close after the pool's IDLE_TIMEOUT (90 s, not
# configurable; crates/server/src/proxy/pool.rs) at the next sweep (every
# 30 s), so descriptors are back at baseline within 120 s of the last
# request: POST_LOAD defaults to 150.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

DURATION=${DURATION:-1800}   # seconds of load
CYCLE=${CYCLE:-120}          # the fault schedule repeats every CYCLE seconds
BUILD=${BUILD:-1}
ETCD=${ETCD:-0}              # 1: etcd mode (see above)
BASELINE=${BASELINE:-15}     # seconds sampled before the load starts
POST_LOAD=${POST_LOAD:-150}  # seconds sampled after the load stops
HTTP_PORT=18180
TCP_PORT=18190
ADMIN_PORT=18199
BACKENDS=(1 2 3 4)           # HTTP on 1818N, TCP echo on 1828N
# etcd mode: etcd's client and peer ports, and the two backends of the
# discovered service `disc` (HTTP only). bench/scale.sh uses 18380-18385.
ETCD_PORT=18395
ETCD_PEER_PORT=18396
DISC_BACKENDS=(18397 18398)

STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
RESULTS_DIR="$BENCH_DIR/results"
RUN_DIR="$RESULTS_DIR/tmp/soak-$STAMP"
REPORT="$RESULTS_DIR/soak-$STAMP.md"
mkdir -p "$RUN_DIR"

# shellcheck source=bench/lib.sh
source "$BENCH_DIR/lib.sh"
trap cleanup EXIT
trap 'exit 130' INT TERM

TOOLS=(python3 curl h2load)
PORTS=($HTTP_PORT $TCP_PORT $ADMIN_PORT 18181 18182 18183 18184 18281 18282 18283 18284)
if ((ETCD)); then
	TOOLS+=(etcd)
	PORTS+=($ETCD_PORT $ETCD_PEER_PORT "${DISC_BACKENDS[@]}")
fi
need_tools "${TOOLS[@]}"
for p in "${PORTS[@]}"; do
	if port_open "$p"; then die "port $p is already in use"; fi
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

# --- etcd mode: etcd, the discovered service's backends, the sidecars ---
ETCD_PID=""
start_etcd() {
	# The same data dir every time: a restart keeps the keys and leases
	# (etcd renews every lease's TTL when it comes back).
	etcd --name soak --data-dir "$RUN_DIR/etcd-data" \
		--listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
		--listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster "soak=http://127.0.0.1:$ETCD_PEER_PORT" >>"$RUN_DIR/etcd.log" 2>&1 &
	ETCD_PID=$!
	BENCH_PIDS+=($!)
	wait_port "$ETCD_PORT" "$!" || die "etcd did not start (see $RUN_DIR/etcd.log)"
}
declare -A SIDECAR=()
# start_sidecar ID PORT: `datapunk-lb register` for disc/ID at 127.0.0.1:PORT.
# TTL 15 s: the lease outlives the sidecar's reconnect backoff (up to 5 s)
# after etcd comes back.
start_sidecar() {
	"$DP_BIN" register --etcd "http://127.0.0.1:$ETCD_PORT" --service disc --id "$1" \
		--address 127.0.0.1 --port "$2" --ttl 15s >>"$RUN_DIR/register-$1.log" 2>&1 &
	SIDECAR[$1]=$!
	BENCH_PIDS+=($!)
}
# disc_ids: the ids of the balancer's `disc` instances, one line.
disc_ids() {
	curl -sS --max-time 2 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$ADMIN_PORT/v1/services/disc" 2>/dev/null |
		python3 -c 'import json,sys
try: print(" ".join(sorted(i["id"] for i in json.load(sys.stdin).get("instances", []))))
except ValueError: print("?")'
}
# wait_disc ID present|absent WHAT: in the background, polls until ID is
# (or is no longer) an instance of `disc`, 60 s at most, then logs a fault
# line with the time it took (measured from the call).
wait_disc() {
	(
		local start=$EPOCHREALTIME ids took
		for ((i = 0; i < 300; i++)); do
			ids=" $(disc_ids) "
			if [[ $2 == present && $ids == *" $1 "* ]] || [[ $2 == absent && $ids != *" $1 "* && $ids != " ? " ]]; then
				took=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')
				fault "etcd check: $1 $2 after $3, in $took s"
				exit 0
			fi
			sleep 0.2
		done
		fault "etcd check FAILED: $1 not $2 within 60 s after $3 (instances:$ids)"
	) &
	BENCH_PIDS+=($!)
}
if ((ETCD)); then
	for port in "${DISC_BACKENDS[@]}"; do
		python3 "$BENCH_DIR/soak_backend.py" --name "d$port" --port "$port" >>"$RUN_DIR/backend-$port.log" 2>&1 &
		BENCH_PIDS+=($!)
		wait_port "$port" "$!" || die "backend $port did not start"
	done
	start_etcd
	start_sidecar d1 "${DISC_BACKENDS[0]}"
	start_sidecar d2 "${DISC_BACKENDS[1]}"
fi

# The config; "# generation N" changes on every valid reload.
write_config() {
	local instances="" tcp_instances="" n disc_route="" disc_service=""
	if ((ETCD)); then
		# First match wins: /disc before /.
		disc_route=$'[[listener.route]]\npath_prefix = "/disc"\nservice = "disc"\n'
		disc_service=$'[discovery]\nkind = "etcd"\nendpoints = ["http://127.0.0.1:'$ETCD_PORT$'"]\n\n'
		disc_service+=$'[service.disc]\nstrategy = "round_robin"\nretries = 2\nconnect_timeout = "500ms"\n\n'
		disc_service+=$'[service.disc.health_check]\nkind = "http"\npath = "/health"\ninterval = "1s"\ntimeout = "500ms"\n'
	fi
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

		$disc_route
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
		$disc_service
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
		# The balancer's view of `api` (eligible count, panic, breakers) and
		# in etcd mode of `disc`, in the background so a slow answer on a
		# busy machine does not stretch the 1 s cadence; one append each.
		(
			s=$(curl -sS --max-time 1 -H "Authorization: Bearer $TOKEN" \
				"http://127.0.0.1:$ADMIN_PORT/v1/services/api" 2>/dev/null) &&
				printf '%s\n' "$s" >>"$RUN_DIR/states.jsonl"
			if ((ETCD)); then
				s=$(curl -sS --max-time 1 -H "Authorization: Bearer $TOKEN" \
					"http://127.0.0.1:$ADMIN_PORT/v1/services/disc" 2>/dev/null) &&
					printf '%s\n' "$s" >>"$RUN_DIR/states-disc.jsonl"
			fi
		) &
		sleep 1
	done
) >>"$RUN_DIR/samples.tsv" &
BENCH_PIDS+=($!)

# The baseline: descriptors and RSS with checks running and no load.
log "baseline for $BASELINE s"
sleep "$BASELINE"
PHASES="$RUN_DIR/phases.tsv"
printf 'load_start\t%s\n' "$((EPOCHSECONDS - T0))" >"$PHASES"

log "load for $DURATION s; raw logs in $RUN_DIR"
DISC_CLIENTS=0
((ETCD)) && DISC_CLIENTS=4
python3 "$BENCH_DIR/soak_load.py" --http-addr "127.0.0.1:$HTTP_PORT" --tcp-addr "127.0.0.1:$TCP_PORT" \
	--disc "$DISC_CLIENTS" --duration "$DURATION" >"$RUN_DIR/load.jsonl" 2>"$RUN_DIR/load.err" &
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
LOAD_T0=$EPOCHSECONDS
at() { # at SECOND: sleeps until that second of the current cycle
	local wait=$((cycle_start + $1 - EPOCHSECONDS))
	((wait > 0)) && sleep "$wait"
	((EPOCHSECONDS - LOAD_T0 < DURATION))
}
# etcd mode: 2 SIGKILL etcd, 6 start a sidecar for d3 (it cannot reach
# etcd), 25 restart etcd (d3 must appear: its sidecar retries), 60 SIGTERM
# d3's sidecar (its lease is revoked: d3 must leave). d1 and d2 stay
# registered throughout: the balancer keeps them while etcd is away.
etcd_kill() {
	((ETCD)) || return 0
	fault "etcd: SIGKILL (discovered: $(disc_ids))"
	kill -KILL "$ETCD_PID" 2>/dev/null || true
	wait "$ETCD_PID" 2>/dev/null || true
}
etcd_register_while_down() {
	((ETCD)) || return 0
	fault "etcd: start the sidecar of d3 while etcd is down"
	start_sidecar d3 "${DISC_BACKENDS[0]}"
}
etcd_restart() {
	((ETCD)) || return 0
	start_etcd
	fault "etcd: restarted (discovered: $(disc_ids))"
	wait_disc d3 present "the etcd restart"
}
etcd_deregister() {
	((ETCD)) || return 0
	fault "etcd: SIGTERM the sidecar of d3"
	kill -TERM "${SIDECAR[d3]}" 2>/dev/null || true
	wait "${SIDECAR[d3]}" 2>/dev/null || true
	wait_disc d3 absent "its sidecar's SIGTERM"
}
while ((EPOCHSECONDS - LOAD_T0 < DURATION - 10)); do
	cycle_start=$EPOCHSECONDS
	at 2 || break
	etcd_kill
	at 6 || break
	etcd_register_while_down
	at 10 || break
	fault "SIGKILL backend 1"
	kill -KILL "${SOAK_BACKEND[1]}" 2>/dev/null || true
	wait "${SOAK_BACKEND[1]}" 2>/dev/null || true
	at 20 || break
	fault "restart backend 1"
	start_backend 1
	at 25 || break
	etcd_restart
	at 30 || break
	fault "backend 2 slow (2 s per response)"
	set_mode 2 slow
	at 45 || break
	fault "backend 2 ok"
	set_mode 2 ok
	at 50 || break
	fault "backend 3 answers 500"
	set_mode 3 error
	at 60 || break
	etcd_deregister
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
printf 'load_end\t%s\n' "$((EPOCHSECONDS - T0))" >>"$PHASES"
curl -fsS --max-time 5 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$ADMIN_PORT/metrics" >"$RUN_DIR/metrics.txt" || true
# Idle upstream connections expire (90 s + the 30 s sweep): descriptors
# must come back to the baseline before SIGTERM.
log "no load for $POST_LOAD s (descriptors back to baseline?)"
sleep "$POST_LOAD"
fault "SIGTERM"
term_start=$EPOCHREALTIME
kill -TERM "$LB"
status=0
wait "$LB" || status=$?
term_s=$(awk -v a="$term_start" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.2f", b-a}')
echo "exit status $status after SIGTERM, in $term_s s" >"$RUN_DIR/exit.txt"

python3 "$BENCH_DIR/soak_report.py" "$RUN_DIR" "$DURATION" "$CYCLE" >"$REPORT"
cp "$RUN_DIR/samples.tsv" "$RESULTS_DIR/soak-$STAMP.samples.tsv"
cp "$RUN_DIR/soak.svg" "$RESULTS_DIR/soak-$STAMP.svg" 2>/dev/null || true
log "report: $REPORT"
cat "$REPORT"
