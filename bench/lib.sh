# shellcheck shell=bash
# Helpers for bench/run.sh: start/stop backends and proxies, run wrk, read
# CPU counters. Sourced, not run. Expects BENCH_DIR, RUN_DIR, LB_CPU,
# LOAD_CPU, LISTEN_PORT, CONNS, DP_BIN to be set.

# Every process this bench starts, so the exit trap can stop exactly those.
declare -a BENCH_PIDS=()
declare -A BACKEND_PID=()
PROXY_PID=""

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# need_tools TOOL...: dies naming the first TOOL not on the PATH.
need_tools() {
	local tool
	for tool in "$@"; do
		command -v "$tool" >/dev/null || die "$tool not found"
	done
}

# port_open PORT: true if something accepts on 127.0.0.1:PORT.
port_open() { bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# wait_port PORT [PID]: until 127.0.0.1:PORT accepts (10 s at most; fails
# early if PID exits).
wait_port() {
	local port=$1 pid=${2:-} deadline=$((SECONDS + 10))
	until port_open "$port"; do
		((SECONDS < deadline)) || return 1
		if [[ -n $pid ]] && ! ours "$pid"; then return 1; fi
		sleep 0.05
	done
}

# wait_port_free PORT: until nothing accepts on 127.0.0.1:PORT (10 s at most).
wait_port_free() {
	local port=$1 deadline=$((SECONDS + 10))
	while port_open "$port"; do
		((SECONDS < deadline)) || return 1
		sleep 0.05
	done
}

# ours PID: true while PID is alive and a child of this shell (a PID this
# bench started and that was not reused by someone else's process).
ours() {
	[[ $(awk '{print $4}' "/proc/$1/stat" 2>/dev/null) == "$$" ]] &&
		[[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# stop_pid PID [SIGNAL]: signal, wait up to 5 s, then SIGKILL.
stop_pid() {
	local pid=$1 sig=${2:-TERM} i
	ours "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
	kill -"$sig" "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		ours "$pid" || break
		sleep 0.05
	done
	if ours "$pid"; then
		log "pid $pid ignored SIG$sig; killing it"
		kill -KILL "$pid" 2>/dev/null || true
	fi
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local pid
	for pid in "${BENCH_PIDS[@]}"; do
		if ours "$pid"; then kill -TERM "$pid" 2>/dev/null || true; fi
	done
	sleep 0.3
	for pid in "${BENCH_PIDS[@]}"; do
		if ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
	done
	wait 2>/dev/null || true
	# The accesslog scenario's file on tmpfs, if run.sh made one.
	if [[ ${ACCESS_LOG_FILE:-} == /dev/shm/datapunk-lb-bench-* ]]; then rm -f "$ACCESS_LOG_FILE"; fi
}

# render TEMPLATE OUT KEY=VALUE...: replaces @KEY@ by VALUE (multi-line ok).
render() {
	local tpl out kv
	tpl=$(<"$1")
	out=$2
	shift 2
	for kv in "$@"; do
		tpl=${tpl//@${kv%%=*}@/${kv#*=}}
	done
	printf '%s\n' "$tpl" >"$out"
	if grep -q '@[A-Z_]*@' "$out"; then die "unrendered placeholder in $out"; fi
}

# private_binary: builds the release binary when BUILD=1, then copies it
# into RUN_DIR/bin and sets DP_BIN to the copy: a concurrent build must not
# swap the binary mid-run. Expects ROOT and BUILD.
private_binary() {
	if ((BUILD)); then
		log "building: cargo build --release -p datapunk-lb"
		(cd "$ROOT" && cargo build --release -p datapunk-lb)
	fi
	mkdir -p "$RUN_DIR/bin"
	cp "$ROOT/target/release/datapunk-lb" "$RUN_DIR/bin/datapunk-lb"
	DP_BIN="$RUN_DIR/bin/datapunk-lb"
	# DP_ALT_BIN: a second build (another allocator, the previous commit)
	# that the proxy kind datapunk_alt runs with the same config.
	if [[ -n ${DP_ALT_BIN:-} ]]; then
		cp "$DP_ALT_BIN" "$RUN_DIR/bin/datapunk-lb-alt"
		DP_ALT_BIN="$RUN_DIR/bin/datapunk-lb-alt"
	fi
}

# --- backends (pinned to LOAD_CPU) ---

# start_nginx_backend PORT: from BACKEND_TEMPLATE (default
# configs/nginx-backend.conf; bench/h2.sh's h2c mode names its own).
start_nginx_backend() {
	local port=$1 conf="$RUN_DIR/backend-$1.conf"
	mkdir -p "$RUN_DIR/backend-$port-tmp"
	render "${BACKEND_TEMPLATE:-$BENCH_DIR/configs/nginx-backend.conf}" "$conf" DIR="$RUN_DIR" PORT="$port"
	if port_open "$port"; then die "port $port is already in use"; fi
	taskset -c "$LOAD_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/backend-$port.error.log" -c "$conf" \
		>>"$RUN_DIR/backend-$port.log" 2>&1 &
	BACKEND_PID[$port]=$!
	BENCH_PIDS+=($!)
	wait_port "$port" "$!" || die "nginx backend on $port did not start (see $RUN_DIR/backend-$port.*)"
}

# start_slow_backend PORT DELAY_SECONDS
start_slow_backend() {
	local port=$1
	if port_open "$port"; then die "port $port is already in use"; fi
	taskset -c "$LOAD_CPU" python3 "$BENCH_DIR/slow_backend.py" --port "$port" --delay "$2" \
		>>"$RUN_DIR/backend-$port.log" 2>&1 &
	BACKEND_PID[$port]=$!
	BENCH_PIDS+=($!)
	wait_port "$port" "$!" || die "slow backend on $port did not start (see $RUN_DIR/backend-$port.log)"
}

# crash_backend PORT: SIGKILL, as a crash would.
crash_backend() {
	local pid=${BACKEND_PID[$1]}
	if ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
	wait "$pid" 2>/dev/null || true
}

# slow_stats [reset]: "<requests> <health checks>" seen by the slow backend.
slow_stats() {
	curl -fsS --max-time 2 "http://127.0.0.1:$SLOW_PORT/__stats${1:+?reset}"
}

# --- proxies (pinned to LB_CPU) ---

# start_proxy KIND BALANCE METRICS PORT...: KIND is haproxy, nginx or
# datapunk; BALANCE is that proxy's algorithm name; METRICS (datapunk only)
# true/false; PROXY_ACCESS_LOG (datapunk only, true/false, default false)
# turns the access log on, written to ACCESS_LOG_FILE; DP_TEMPLATE
# (datapunk only) replaces configs/datapunk-lb.toml. Sets PROXY_PID.
start_proxy() {
	local kind=$1 balance=$2 metrics=$3 servers="" p i=0 conf
	shift 3
	if port_open "$LISTEN_PORT"; then die "port $LISTEN_PORT is already in use"; fi
	case $kind in
	haproxy | haproxy_fwd)
		for p in "$@"; do
			i=$((i + 1))
			servers+="    server b$i 127.0.0.1:$p check inter 100ms"$'\n'
		done
		conf="$RUN_DIR/haproxy.cfg"
		render "$BENCH_DIR/configs/haproxy.cfg" "$conf" LISTEN_PORT="$LISTEN_PORT" \
			BALANCE="$balance" SERVERS="$servers"
		if [[ $kind == haproxy_fwd ]]; then
			# The same header work as datapunk-lb's defaults: X-Forwarded-For
			# and -Proto on each request, a request id on the request and
			# its response.
			sed -i '/^    default_backend be$/r '"$BENCH_DIR/configs/haproxy-forwarding.cfg" "$conf"
		fi
		taskset -c "$LB_CPU" haproxy -db -f "$conf" >>"$RUN_DIR/haproxy.log" 2>&1 &
		;;
	nginx)
		for p in "$@"; do
			servers+="        server 127.0.0.1:$p max_fails=1 fail_timeout=1s;"$'\n'
		done
		[[ $balance == round_robin ]] && balance="" || balance="$balance;"
		conf="$RUN_DIR/nginx-proxy.conf"
		mkdir -p "$RUN_DIR/nginx-proxy-tmp"
		render "$BENCH_DIR/configs/nginx-proxy.conf" "$conf" DIR="$RUN_DIR" \
			LISTEN_PORT="$LISTEN_PORT" BALANCE="$balance" SERVERS="$servers"
		taskset -c "$LB_CPU" nginx -p "$RUN_DIR" -e "$RUN_DIR/nginx-proxy.error.log" -c "$conf" \
			>>"$RUN_DIR/nginx-proxy.log" 2>&1 &
		;;
	datapunk | datapunk_alt)
		local bin=$DP_BIN
		if [[ $kind == datapunk_alt ]]; then bin=${DP_ALT_BIN:?datapunk_alt needs DP_ALT_BIN}; fi
		for p in "$@"; do
			i=$((i + 1))
			servers+="[[service.api.instance]]"$'\n'"id = \"b$i\""$'\n'
			servers+="address = \"127.0.0.1\""$'\n'"port = $p"$'\n\n'
		done
		conf="$RUN_DIR/datapunk-lb.toml"
		render "${DP_TEMPLATE:-$BENCH_DIR/configs/datapunk-lb.toml}" "$conf" LISTEN_PORT="$LISTEN_PORT" \
			STRATEGY="$balance" METRICS="$metrics" INSTANCES="$servers" \
			ACCESS_LOG="${PROXY_ACCESS_LOG:-false}" ACCESS_LOG_PATH="${ACCESS_LOG_FILE:-/dev/null}"
		taskset -c "$LB_CPU" "$bin" run --config "$conf" --threads 1 \
			>>"$RUN_DIR/datapunk-lb.log" 2>&1 &
		;;
	*) die "unknown proxy $kind" ;;
	esac
	PROXY_PID=$!
	BENCH_PIDS+=("$PROXY_PID")
	wait_port "$LISTEN_PORT" "$PROXY_PID" || die "$kind did not start listening on $LISTEN_PORT (see $RUN_DIR/$kind*.log)"
	# Let the first health checks pass before any traffic.
	sleep 0.5
}

stop_proxy() {
	[[ -n $PROXY_PID ]] || return 0
	stop_pid "$PROXY_PID" TERM
	PROXY_PID=""
	wait_port_free "$LISTEN_PORT" || die "port $LISTEN_PORT still open after stopping the proxy"
}

# --- load and counters ---

# run_wrk SECONDS OUT: the load, pinned to LOAD_CPU.
run_wrk() {
	taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$1"s --timeout 2s --latency \
		"http://127.0.0.1:$LISTEN_PORT/" >"$2" 2>&1
}

# proc_ticks PID: user+system clock ticks of PID and its children (NGINX's
# worker is a child of its master).
proc_ticks() {
	local pid total=0 t
	for pid in "$1" $(pgrep -P "$1" || true); do
		t=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
		total=$((total + t))
	done
	echo "$total"
}

# cpu_busy_ticks CPU: "busy total" ticks of one core from /proc/stat.
cpu_busy_ticks() {
	awk -v c="cpu$1" '$1 == c { idle = $5 + $6; t = 0; for (i = 2; i <= 9; i++) t += $i; print t - idle, t }' /proc/stat
}
