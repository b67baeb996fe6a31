#!/usr/bin/env python3
"""Writes the Markdown report of one bench/soak.sh run (and an SVG plot of
the balancer's RSS and open descriptors, with the faults marked) from the
run directory: load.jsonl, h2load.log/.out, metrics.txt, samples.tsv,
faults.tsv, phases.tsv, exit.txt, states.jsonl and (etcd mode)
states-disc.jsonl.

Usage: soak_report.py RUN_DIR DURATION_SECONDS [CYCLE_SECONDS]
"""

import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

run = Path(sys.argv[1])
duration = sys.argv[2]


def read(name: str) -> str:
    p = run / name
    return p.read_text() if p.exists() else ""


# Client side: soak_load.py's totals, h2load's per-request log.
total = {}
# Per second of soak_load.py's clients (HTTP/1.1, TCP, WebSocket; h2load
# logs no time): (t, requests, failed).
per_second = []
for line in read("load.jsonl").splitlines():
    if line.startswith('{"total"'):
        total = json.loads(line)["total"]
    elif line.startswith('{"t"'):
        sec = json.loads(line)
        n = bad = 0
        for proto, causes in sec.items():
            if isinstance(causes, dict):
                n += sum(causes.values())
                bad += sum(v for k, v in causes.items() if k != "ok")
        per_second.append((float(sec["t"]), n, bad))
h2 = Counter()
for line in read("h2load.log").splitlines():
    parts = line.split()
    if len(parts) >= 2:
        code = parts[1]
        # h2load logs a request that got no answer with status -1.
        h2["ok" if code == "200" else f"status_{code}" if code.isdigit() else "no_answer"] += 1
total["http2_get (h2load)"] = dict(h2)

# Balancer side: from /metrics at the end.
metrics = read("metrics.txt")
retries = sum(float(v) for v in re.findall(r"^datapunk_lb_retries_total\{[^}]*\} (\S+)", metrics, re.M))
outcomes = Counter()
for svc, outcome, v in re.findall(
    r'^datapunk_lb_requests_total\{[^}]*service="([^"]+)"[^}]*outcome="([^"]+)"[^}]*\} (\S+)', metrics, re.M
):
    outcomes[(svc, outcome)] += float(v)
reloads = re.findall(r'^datapunk_lb_config_reloads_total\{([^}]*)\} (\S+)', metrics, re.M)

samples = []
for line in read("samples.tsv").splitlines()[1:]:
    t, rss, fds = line.split("\t")
    samples.append((int(t), int(rss), int(fds)))
faults = [l.split("\t", 1) for l in read("faults.tsv").splitlines()[1:] if "\t" in l]
# Seconds (from the harness's start, as in samples.tsv) the load started
# and ended; runs before phases.tsv existed sampled only under load.
phases = {k: int(v) for k, v in (l.split("\t") for l in read("phases.tsv").splitlines() if "\t" in l)}
load_start = phases.get("load_start", samples[0][0] if samples else 0)
load_end = phases.get("load_end", samples[-1][0] if samples else 0)

print(f"# Soak run: {run.name}\n")
print(f"- duration: {duration} s of load; faults every cycle, see the schedule below")
print(f"- {read('exit.txt').strip()}")
print()
print("## Requests by protocol and outcome (client side)\n")
print("| protocol | total | ok | failed | failed by cause |")
print("| --- | ---: | ---: | ---: | --- |")
for proto, causes in total.items():
    n = sum(causes.values())
    if n == 0:
        continue
    ok = causes.get("ok", 0)
    bad = ", ".join(f"{k} {v}" for k, v in sorted(causes.items()) if k != "ok") or "-"
    print(f"| {proto} | {n} | {ok} | {n - ok} | {bad} |")
print()
if per_second:
    print("Failures by 5-minute block (HTTP/1.1, TCP and WebSocket clients; h2load has no timeline):\n")
    print("| minutes | requests | failed | share |")
    print("| --- | ---: | ---: | ---: |")
    blocks = {}
    for t, n, bad in per_second:
        b = blocks.setdefault(int(t // 300), [0, 0])
        b[0] += n
        b[1] += bad
    for k, (n, bad) in sorted(blocks.items()):
        print(f"| {5 * k}-{5 * k + 5} | {n} | {bad} | {100 * bad / max(n, 1):.3f} % |")
    print()
print("## The balancer's view (`/metrics` at the end)\n")
print(f"- retries to another instance: {retries:.0f}")
for (svc, outcome), v in sorted(outcomes.items()):
    if v:
        print(f"- `{svc}` requests with outcome `{outcome}`: {v:.0f}")
for labels, v in reloads:
    print(f"- config reloads {{{labels}}}: {float(v):.0f}")
print()
if samples:
    loaded = [s for s in samples if load_start <= s[0] < load_end] or samples
    before = [s for s in samples if s[0] < load_start]
    after = [s for s in samples if s[0] >= load_end]
    first = [s for s in loaded if s[0] < load_start + 60]
    last = [s for s in loaded if s[0] >= load_end - 60]
    med = lambda xs, i: statistics.median(x[i] for x in xs) if xs else float("nan")
    print("## Resources (sampled every second)\n")
    print("Under load:\n")
    print("| | first minute (median) | last minute (median) | max |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| RSS (MiB) | {med(first, 1) / 1024:.1f} | {med(last, 1) / 1024:.1f} | {max(s[1] for s in loaded) / 1024:.1f} |")
    print(f"| open file descriptors | {med(first, 2):.0f} | {med(last, 2):.0f} | {max(s[2] for s in loaded)} |")
    print()
    # RSS after warm-up: per-minute medians of the load, minute 5 against
    # the last whole minute (the bound: no growth above 10 %).
    minutes = {}
    for t, rss, _ in loaded:
        minutes.setdefault((t - load_start) // 60, []).append(rss)
    whole = sorted(m for m, xs in minutes.items() if len(xs) >= 30)
    if 5 in minutes and whole and whole[-1] > 5:
        m5, mlast = statistics.median(minutes[5]), statistics.median(minutes[whole[-1]])
        print(
            f"RSS after warm-up (per-minute medians): minute 5 {m5 / 1024:.1f} MiB, minute {whole[-1]} "
            f"{mlast / 1024:.1f} MiB: {100 * (mlast - m5) / m5:+.1f} %; largest minute after 5: "
            f"{max(statistics.median(minutes[m]) for m in whole if m >= 5) / 1024:.1f} MiB.\n"
        )
    if before and after:
        # The baseline moves by a descriptor or two (a probe connection
        # replaced): back means at most its highest value.
        base_min, base = min(s[2] for s in before), max(s[2] for s in before)
        back = next((s[0] - load_end for s in after if s[2] <= base), None)
        tail = [s for s in after if s[0] >= after[-1][0] - 10]
        print("Descriptors before and after the load (the load's own are in the table above):\n")
        print("| baseline (before the load, min / max) | peak under load | after the load: last 10 s (median) | back to the baseline |")
        print("| ---: | ---: | ---: | --- |")
        print(
            f"| {base_min} / {base} | {max(s[2] for s in loaded)} | {med(tail, 2):.0f} | "
            + (f"{back} s after the load stopped |" if back is not None else f"**not** within {after[-1][0] - load_end} s |")
        )
        print(
            f"\nRSS: {med(before, 1) / 1024:.1f} MiB before the load, {med(tail, 1) / 1024:.1f} MiB in the last 10 s after it.\n"
        )
    # The plot: RSS and fds over time, faults as ticks.
    w, h, pad = 900, 260, 40
    tmax = max(s[0] for s in samples) or 1
    rmax = max(s[1] for s in samples) or 1
    fmax = max(s[2] for s in samples) or 1
    x = lambda t: pad + (w - 2 * pad) * t / tmax
    y = lambda v, vmax: h - pad - (h - 2 * pad) * v / vmax
    # Load clients count time from the load's start.
    per_second = [(t + load_start, n, bad) for t, n, bad in per_second]
    rss_pts = " ".join(f"{x(t):.1f},{y(r, rmax):.1f}" for t, r, _ in samples)
    fd_pts = " ".join(f"{x(t):.1f},{y(f, fmax):.1f}" for t, _, f in samples)
    # Failed requests per second of the clients, on their own scale.
    emax = max((bad for _, _, bad in per_second), default=0) or 1
    err_pts = " ".join(f"{x(min(t, tmax)):.1f},{y(bad, emax):.1f}" for t, _, bad in per_second)
    ticks = (
        f'<line x1="{x(load_end):.1f}" y1="{pad}" x2="{x(load_end):.1f}" y2="{h - pad}" stroke="#000" '
        f'stroke-dasharray="4"><title>load stops</title></line>'
    )
    ticks += "".join(
        f'<line x1="{x(int(t)):.1f}" y1="{pad}" x2="{x(int(t)):.1f}" y2="{h - pad}" stroke="#ddd"><title>{f}</title></line>'
        for t, f in faults
    )
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">'
        f'<rect width="{w}" height="{h}" fill="white"/>{ticks}'
        f'<polyline points="{rss_pts}" fill="none" stroke="#1f77b4"/>'
        f'<polyline points="{fd_pts}" fill="none" stroke="#d62728"/>'
        f'<polyline points="{err_pts}" fill="none" stroke="#2ca02c"/>'
        f'<text x="{pad + 380}" y="20" fill="#2ca02c">failed requests/s (max {emax})</text>'
        f'<text x="{pad}" y="20" fill="#1f77b4">RSS (max {rmax / 1024:.1f} MiB)</text>'
        f'<text x="{pad + 200}" y="20" fill="#d62728">open fds (max {fmax})</text>'
        f'<text x="{w - pad - 190}" y="20" fill="#999">grey: faults; dashed: load stops; 0–{tmax} s</text></svg>'
    )
    (run / "soak.svg").write_text(svg)
    print(
        f"Plot: `soak-{run.name.removeprefix('soak-')}.svg` (RSS blue, descriptors red, failed requests per second green, "
        "faults grey, the end of the load dashed).\n"
    )
states = []
for line in read("states.jsonl").splitlines():
    try:
        states.append(json.loads(line))
    except ValueError:
        pass
if states:
    print("## The balancer's state of `api` (sampled every second)\n")
    panic = sum(1 for s in states if s.get("panic"))
    eligible = Counter(s.get("eligible") for s in states)
    opened = Counter(
        i["id"] for s in states for i in s.get("instances", []) if i.get("circuit_state") != "closed"
    )
    print(f"- samples: {len(states)}; in panic mode: {panic}")
    print(f"- eligible instances, seconds each: {dict(sorted(eligible.items(), key=str))}")
    print(f"- seconds with a breaker not closed, by instance: {dict(sorted(opened.items()))}")
    by_state = Counter(
        (i["id"], i.get("circuit_state")) for s in states for i in s.get("instances", [])
        if i.get("circuit_state") != "closed"
    )
    print(f"- of which open / half-open: {', '.join(f'{k[0]} {k[1]} {v}' for k, v in sorted(by_state.items()))}")
    print()
disc_states = []
for line in read("states-disc.jsonl").splitlines():
    try:
        disc_states.append(json.loads(line))
    except ValueError:
        pass
if disc_states or any(f.startswith("etcd") for _, f in faults):
    print("## etcd mode: the discovered service `disc`\n")
    ids = [sorted(i["id"] for i in s.get("instances", [])) for s in disc_states]
    print(f"- samples: {len(ids)}; instance sets, seconds each: {dict(Counter(' '.join(x) for x in ids))}")
    missing = sum(1 for x in ids if not {"d1", "d2"} <= set(x))
    print(f"- seconds without d1 or d2 (the sidecars that run throughout): {missing}")
    checks = [f for _, f in faults if f.startswith("etcd check")]
    failed = [f for f in checks if "FAILED" in f]
    for what in ("present after the etcd restart", "absent after its sidecar's SIGTERM"):
        took = [float(m.group(1)) for f in checks if what in f for m in [re.search(r"in ([\d.]+) s$", f)] if m]
        if took:
            print(
                f"- d3 {what}: {len(took)} times, in {min(took):.1f}-{max(took):.1f} s "
                f"(median {statistics.median(took):.1f} s)"
            )
    print(f"- checks failed: {len(failed)}" + "".join(f"\n  - {f}" for f in failed))
    disc = total.get("http1_disc", {})
    if disc:
        n = sum(disc.values())
        print(f"- `GET /disc/item`: {n} requests, {n - disc.get('ok', 0)} failed")
    print()
print("## Faults injected\n")
kinds = Counter(
    re.sub(r"\(generation \d+\)|status \d+|\(discovered:[^)]*\)|, in [\d.]+ s$", "", f).strip() for _, f in faults
)
for k, v in kinds.items():
    print(f"- {v}× {k}")
statuses = Counter(re.search(r"status (\d+)", f).group(1) for _, f in faults if "status" in f)
if statuses:
    print(f"- admin answers: {dict(statuses)}")
