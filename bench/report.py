#!/usr/bin/env python3
"""Parses wrk output and summarises bench results (standard library only).

    report.py parse WRK_OUTPUT
        prints: rps mean_ms p50_ms p99_ms requests non2xx socket_errors
        (h2load output too: latency then from its per-request log,
        WRK_OUTPUT.log, as bench/run.sh writes it in the degraded scenario)
    report.py summarize RESULTS_TSV META_FILE
        prints the Markdown summary (medians over rounds, ratios)

RESULTS_TSV columns (header line first): round scenario variant rps mean_ms
p50_ms p99_ms requests non2xx sock_errors proxy_cpu_s elapsed_s cpu0 cpu1
slow_requests (-1 outside the degraded scenario).
"""

import os
import re
import statistics
import sys
from collections import defaultdict

UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def to_ms(v: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", v)
    if not m:
        raise ValueError(f"latency {v!r}")
    return float(m.group(1)) * UNITS_MS[m.group(2)]


def request_log_ms(path: str):
    """Per-request durations in ms, sorted, from h2load's --log-file (start
    time µs since epoch, status, duration µs per line); None if missing."""
    try:
        with open(path, encoding="utf-8") as f:
            return sorted(int(line.split()[2]) / 1000 for line in f if line.strip())
    except FileNotFoundError:
        return None


def pct(durs, q: float) -> float:
    """The q-quantile of sorted `durs` (nearest rank)."""
    if not durs:
        return float("nan")
    return durs[min(len(durs) - 1, int(q * len(durs)))]


def parse_h2load(path: str, text: str) -> None:
    """Same fields as parse(), from h2load's summary and, for latency, its
    per-request log PATH.log (issue 12: not from a histogram)."""
    rps = re.search(r"finished in [^,]+, ([\d.]+) req/s", text)
    if not rps:
        raise SystemExit(f"{path}: no 'finished in' line:\n{text}")
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, \d+ failed, (\d+) errored", text)
    st = re.search(r"status codes: \d+ 2xx, \d+ 3xx, (\d+) 4xx, (\d+) 5xx", text)
    durs = request_log_ms(path + ".log") or []
    print(
        f"{float(rps.group(1)):.1f}",
        f"{statistics.fmean(durs):.3f}" if durs else "nan",
        f"{pct(durs, 0.5):.3f}",
        f"{pct(durs, 0.99):.3f}",
        m.group(1) if m else "0",
        int(st.group(1)) + int(st.group(2)) if st else 0,
        m.group(2) if m else "0",
    )


def parse(path: str) -> None:
    text = open(path, encoding="utf-8", errors="replace").read()
    if "finished in" in text and "Requests/sec" not in text:
        parse_h2load(path, text)
        return
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not rps:
        raise SystemExit(f"{path}: no Requests/sec line:\n{text}")
    mean = re.search(r"^\s+Latency\s+(\S+)", text, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    reqs = re.search(r"(\d+) requests in", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = sum(int(x) for x in sock.groups()) if sock else 0
    print(
        f"{float(rps.group(1)):.1f}",
        f"{to_ms(mean.group(1)):.3f}" if mean else "nan",
        f"{to_ms(p50.group(1)):.3f}" if p50 else "nan",
        f"{to_ms(p99.group(1)):.3f}" if p99 else "nan",
        reqs.group(1) if reqs else "0",
        non2xx.group(1) if non2xx else "0",
        errors,
    )


# --- summary ---

LABELS = {
    "haproxy-roundrobin": "HAProxy `roundrobin`",
    "haproxy-leastconn": "HAProxy `leastconn`",
    "haproxy_fwd-roundrobin": "HAProxy `roundrobin`, forwarding headers + request id",
    "nginx-round_robin": "NGINX round robin",
    "nginx-least_conn": "NGINX `least_conn`",
    "datapunk-adaptive": "datapunk-lb `adaptive`",
    "datapunk-round_robin": "datapunk-lb `round_robin`",
    "datapunk-peak_ewma": "datapunk-lb `peak_ewma`",
    "datapunk-adaptive-nometrics": "datapunk-lb `adaptive`, metrics off",
    "datapunk-adaptive-accesslog": "datapunk-lb `adaptive`, access log on",
    "datapunk_alt-adaptive": "datapunk-lb (alt build) `adaptive`",
    "datapunk_alt-round_robin": "datapunk-lb (alt build) `round_robin`",
}


def label(v: str) -> str:
    return LABELS.get(v, v)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_rps(x: float) -> str:
    return f"{x:,.0f}"


def fmt_ms(x: float) -> str:
    if x != x:
        return "n/a"
    return f"{x:.2f} ms" if x < 10 else f"{x:.1f} ms"


def load(path: str):
    rows = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().split()
        for line in f:
            if not line.strip():
                continue
            r = dict(zip(header, line.split()))
            for k in header:
                if k not in ("scenario", "variant"):
                    r[k] = float(r[k])
            r["proxy_cpu"] = 100 * r["proxy_cpu_s"] / r["elapsed_s"] if r["elapsed_s"] else float("nan")
            r["cpu_us"] = 1e6 * r["proxy_cpu_s"] / r["requests"] if r["requests"] else float("nan")
            rows.append(r)
    return rows


def by_variant(rows, scenario):
    out = defaultdict(list)
    for r in rows:
        if r["scenario"] == scenario:
            out[r["variant"]].append(r)
    return out


def table(groups, slow=False):
    head = "| proxy | req/s, median (min–max) | mean latency | p50 | p99 | proxy CPU | proxy CPU per request |"
    sep = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if slow:
        head += " to the slow backend |"
        sep += " ---: |"
    lines = [head, sep]
    for v, rs in groups.items():
        rps = [r["rps"] for r in rs]
        line = (
            f"| {label(v)} | {fmt_rps(med(rps))} ({fmt_rps(min(rps))}–{fmt_rps(max(rps))}) "
            f"| {fmt_ms(med([r['mean_ms'] for r in rs]))} "
            f"| {fmt_ms(med([r['p50_ms'] for r in rs]))} | {fmt_ms(med([r['p99_ms'] for r in rs]))} "
            f"| {med([r['proxy_cpu'] for r in rs]):.0f} % | {med([r['cpu_us'] for r in rs]):.1f} µs |"
        )
        if slow:
            share = [100 * r["slow_requests"] / r["requests"] for r in rs if r["requests"] > 0]
            line += f" {med(share):.2f} % |"
        lines.append(line)
    return lines


def paired_ratio(rows, scenario, a, b, key):
    """Median over rounds of a/b, both from the same round."""
    per = defaultdict(dict)
    for r in rows:
        if r["scenario"] == scenario:
            per[r["round"]][r["variant"]] = r[key]
    ratios = [p[a] / p[b] for p in per.values() if a in p and b in p and p[b] > 0]
    return med(ratios), ratios


def ratio_lines(rows, scenario, groups, dp_variants, others):
    lines = [
        "| ratio | req/s (median of medians) | req/s (median of per-round ratios) | p99 | mean latency | proxy CPU per request |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for d in dp_variants:
        for o in others:
            if d not in groups or o not in groups:
                continue
            # Builds against builds only for the same strategy.
            if o.startswith("datapunk") and (d.startswith("datapunk-") or d.split("-", 1)[1] != o.split("-", 1)[1]):
                continue
            rps = med([r["rps"] for r in groups[d]]) / med([r["rps"] for r in groups[o]])
            p99 = med([r["p99_ms"] for r in groups[d]]) / med([r["p99_ms"] for r in groups[o]])
            mean = med([r["mean_ms"] for r in groups[d]]) / med([r["mean_ms"] for r in groups[o]])
            cpu = med([r["cpu_us"] for r in groups[d]]) / med([r["cpu_us"] for r in groups[o]])
            pr, _ = paired_ratio(rows, scenario, d, o, "rps")
            lines.append(f"| {label(d)} / {label(o)} | {rps:.2f} | {pr:.2f} | {p99:.2f} | {mean:.2f} | {cpu:.2f} |")
    return lines


def on_off(rows, scen, on_name, off_name, title, what):
    """The on/off table of `what` in scenario `scen`: medians and per-round ratios."""
    g = by_variant(rows, scen)
    if on_name not in g or off_name not in g:
        return []
    per = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["scenario"] == scen and r["variant"] in (on_name, off_name):
            per[r["round"]][r["variant"]].append(r)
    rps_ratios, cpu_ratios = [], []
    for rnd in sorted(per):
        on, off = per[rnd][on_name], per[rnd][off_name]
        if on and off:
            rps_ratios.append(statistics.mean(x["rps"] for x in on) / statistics.mean(x["rps"] for x in off))
            cpu_ratios.append(statistics.mean(x["cpu_us"] for x in on) / statistics.mean(x["cpu_us"] for x in off))
    on_rps, off_rps = med([r["rps"] for r in g[on_name]]), med([r["rps"] for r in g[off_name]])
    on_cpu, off_cpu = med([r["cpu_us"] for r in g[on_name]]), med([r["cpu_us"] for r in g[off_name]])
    return [
        f"## {title}",
        "",
        f"| | {what} on | {what} off | on / off |",
        "| --- | ---: | ---: | ---: |",
        f"| req/s, median of {len(g[on_name])} / {len(g[off_name])} runs | {fmt_rps(on_rps)} | {fmt_rps(off_rps)} | {on_rps / off_rps:.3f} |",
        f"| proxy CPU per request, median | {on_cpu:.1f} µs | {off_cpu:.1f} µs | {on_cpu / off_cpu:.3f} |",
        f"| req/s, median of per-round ratios | | | {med(rps_ratios):.3f} |",
        f"| CPU per request, median of per-round ratios | | | {med(cpu_ratios):.3f} |",
        "",
        f"Per-round req/s ratios on/off: {', '.join(f'{x:.3f}' for x in rps_ratios)}; "
        f"CPU per request: {', '.join(f'{x:.3f}' for x in cpu_ratios)}.",
        "",
    ]


def per_request_tail(rows, tsv: str):
    """The degraded scenario's percentiles from h2load's per-request logs
    (bench/run.sh, DEGRADED_LOAD=h2load), next to the TSV as
    r<round>-degraded-<variant>.wrk.log: per variant the median over rounds
    of each round's p50/p99/p99.9/max, the same percentiles over all its
    requests pooled, the share to the slow backend, and per-round ratios
    against HAProxy `leastconn`."""
    run_dir = os.path.dirname(os.path.abspath(tsv))
    per = defaultdict(dict)  # variant -> round -> row with percentiles
    pooled = defaultdict(list)
    for r in rows:
        if r["scenario"] != "degraded":
            continue
        durs = request_log_ms(os.path.join(run_dir, f"r{int(r['round'])}-degraded-{r['variant']}.wrk.log"))
        if not durs:
            continue
        per[r["variant"]][int(r["round"])] = {
            "p50": pct(durs, 0.5), "p99": pct(durs, 0.99), "p999": pct(durs, 0.999), "max": durs[-1],
            "n": len(durs), "slow": 100 * r["slow_requests"] / r["requests"] if r["requests"] else float("nan"),
        }
        pooled[r["variant"]].extend(durs)
    if not per:
        return []
    out = [
        "## degraded: latency from h2load's per-request log",
        "",
        "Per round: the percentiles of that run's requests; the table gives the median over rounds, then the same percentiles over every request of every round pooled.",
        "",
        "| proxy | requests (all rounds) | p50 | p99 | p99.9 | max | pooled p50 | pooled p99 | pooled p99.9 | to the slow backend, per round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for v, rounds in per.items():
        rs = list(rounds.values())
        durs = sorted(pooled[v])
        slow_shares = ", ".join("%.3f %%" % rounds[k]["slow"] for k in sorted(rounds))
        out.append(
            f"| {label(v)} | {len(durs):,} | {fmt_ms(med([x['p50'] for x in rs]))} | {fmt_ms(med([x['p99'] for x in rs]))} "
            f"| {fmt_ms(med([x['p999'] for x in rs]))} | {fmt_ms(med([x['max'] for x in rs]))} "
            f"| {fmt_ms(pct(durs, 0.5))} | {fmt_ms(pct(durs, 0.99))} | {fmt_ms(pct(durs, 0.999))} "
            f"| {slow_shares} |"
        )
    base = "haproxy-leastconn"
    if base in per:
        out += ["", "| ratio (median of per-round ratios) | p50 | p99 | p99.9 |", "| --- | ---: | ---: | ---: |"]
        for v in per:
            if v == base:
                continue
            common = [k for k in per[v] if k in per[base]]
            ratios = {q: med([per[v][k][q] / per[base][k][q] for k in common if per[base][k][q] > 0]) for q in ("p50", "p99", "p999")}
            out.append(f"| {label(v)} / {label(base)} | {ratios['p50']:.2f} | {ratios['p99']:.2f} | {ratios['p999']:.2f} |")
    out.append("")
    return out


def summarize(tsv: str, meta: str) -> None:
    rows = load(tsv)
    out = ["# datapunk-lb vs HAProxy and NGINX", ""]
    out += [line.rstrip("\n") for line in open(meta, encoding="utf-8")]
    rounds = int(max(r["round"] for r in rows)) if rows else 0
    out += ["", f"Medians over {rounds} interleaved rounds. Proxy CPU: the proxy's own user+system time over the measured run, as a share of one core.", ""]

    steady = by_variant(rows, "steady")
    if steady:
        out += ["## steady: three healthy backends", ""] + table(steady) + [""]
        out += ratio_lines(rows, "steady", steady,
                           ["datapunk-adaptive", "datapunk-round_robin", "datapunk_alt-adaptive", "datapunk_alt-round_robin"],
                           ["haproxy-roundrobin", "haproxy_fwd-roundrobin", "nginx-round_robin", "datapunk-adaptive", "datapunk-round_robin"]) + [""]
    for scen, title in (("metrics", "metrics on vs off (datapunk-lb `adaptive`, steady setup, ABBA pairs)"),
                        ("steady", "metrics on vs off (datapunk-lb `adaptive`, steady)")):
        lines = on_off(rows, scen, "datapunk-adaptive", "datapunk-adaptive-nometrics", title, "metrics")
        if lines:
            out += lines
            break
    out += on_off(rows, "accesslog", "datapunk-adaptive-accesslog", "datapunk-adaptive",
                  "access log on vs off (datapunk-lb `adaptive`, steady setup, ABBA pairs)", "access log")

    degraded = by_variant(rows, "degraded")
    if degraded:
        out += ["## degraded: one of three backends 50 ms slower", ""] + table(degraded, slow=True) + [""]
        out += ratio_lines(rows, "degraded", degraded, ["datapunk-adaptive", "datapunk-peak_ewma"],
                           ["haproxy-leastconn", "nginx-least_conn"]) + [""]

    out += per_request_tail(rows, tsv)

    kill = by_variant(rows, "kill")
    if kill:
        out += ["## kill: one backend SIGKILLed at 3 s, restarted at 6 s", ""]
        out += [
            "| proxy | failed requests per round (non-2xx + socket errors) | total failed | req/s, median | p99 |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for v, rs in kill.items():
            per = [int(r["non2xx"] + r["sock_errors"]) for r in sorted(rs, key=lambda r: r["round"])]
            detail = ", ".join(
                f"{int(r['non2xx'])}+{int(r['sock_errors'])}" for r in sorted(rs, key=lambda r: r["round"])
            )
            out.append(
                f"| {label(v)} | {detail} | {sum(per)} | {fmt_rps(med([r['rps'] for r in rs]))} "
                f"| {fmt_ms(med([r['p99_ms'] for r in rs]))} |"
            )
        out.append("")

    out += ["## all runs", "", "| round | scenario | proxy | req/s | mean | p50 | p99 | non-2xx | socket errors | proxy CPU | CPU/req | core 0 busy | core 1 busy | slow backend requests |",
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(
            f"| {int(r['round'])} | {r['scenario']} | {label(r['variant'])} | {fmt_rps(r['rps'])} "
            f"| {fmt_ms(r['mean_ms'])} | {fmt_ms(r['p50_ms'])} | {fmt_ms(r['p99_ms'])} | {int(r['non2xx'])} | {int(r['sock_errors'])} "
            f"| {r['proxy_cpu']:.0f} % | {r['cpu_us']:.1f} µs | {r['cpu0']:.0f} % | {r['cpu1']:.0f} % "
            f"| {int(r['slow_requests']) if r['slow_requests'] >= 0 else '–'} |"
        )
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "parse":
        parse(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "summarize":
        summarize(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(__doc__)
