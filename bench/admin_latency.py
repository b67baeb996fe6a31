#!/usr/bin/env python3
"""How quickly the control plane answers while the proxy is under load.

Sends GET /healthz to the admin endpoint every INTERVAL ms for DURATION
seconds over one keep-alive connection (open loop: a late answer delays
nothing but itself, so a stall shows as one long request, not as fewer),
then reads /metrics once for the health checks of SERVICE. Prints one
tab-separated line: p50_ms p99_ms max_ms requests probe_ok probe_failed.

    admin_latency.py PORT DURATION [INTERVAL_MS] [SERVICE]

With ADMIN_LATENCY_LOG=path, also writes every request's wall-clock time
and latency there. Used by bench/threads.sh (issue 12: the control runtime under thread per
core); costs ~1 % of a core at the default 20 ms.
"""

import http.client
import os
import sys
import time


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[i]


def probes(conn, service):
    """(ok, failed) health checks of `service` so far, from /metrics."""
    conn.request("GET", "/metrics")
    body = conn.getresponse().read().decode()
    ok = failed = 0.0
    for line in body.splitlines():
        if not line.startswith("datapunk_lb_health_checks_total{"):
            continue
        if f'service="{service}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if 'result="success"' in line:
            ok += value
        elif 'result="failure"' in line:
            failed += value
    return int(ok), int(failed)


def main():
    port = int(sys.argv[1])
    duration = float(sys.argv[2])
    interval = (float(sys.argv[3]) if len(sys.argv) > 3 else 20.0) / 1e3
    service = sys.argv[4] if len(sys.argv) > 4 else "idle"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    ok0, failed0 = probes(conn, service)
    times = []
    samples = []
    start = time.monotonic()
    next_at = start
    while next_at - start < duration:
        now = time.monotonic()
        if next_at > now:
            time.sleep(next_at - now)
        t = time.perf_counter()
        conn.request("GET", "/healthz")
        conn.getresponse().read()
        times.append((time.perf_counter() - t) * 1e3)
        samples.append((time.time(), times[-1]))
        next_at += interval
    ok1, failed1 = probes(conn, service)
    if os.environ.get("ADMIN_LATENCY_LOG"):
        with open(os.environ["ADMIN_LATENCY_LOG"], "w") as f:
            for at, ms in samples:
                f.write(f"{at:.3f}\t{ms:.2f}\n")
    times.sort()
    print(
        f"{percentile(times, 0.5):.2f}\t{percentile(times, 0.99):.2f}\t"
        f"{times[-1]:.2f}\t{len(times)}\t{ok1 - ok0}\t{failed1 - failed0}"
    )


if __name__ == "__main__":
    main()
