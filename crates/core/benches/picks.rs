//! A plain loop of `Service::select` + drop, for measurements criterion's
//! wall-clock medians cannot make on a busy machine (`docs/benchmarks.md`,
//! "Per thread, by CPU time"):
//!
//! ```sh
//! cargo bench -p datapunk-lb-core --bench picks --no-run
//! <binary> <strategy> <instances> <picks per thread> <threads> [<work KiB>]
//! <binary> membership <strategy> <instances> <changes>
//! ```
//!
//! `<binary> <strategy> <instances> <picks per thread> <threads> <work KiB> filter`
//! selects with `select_with` and a filter like the proxy's before
//! `select_within` (the member's active connections under 10,000; it reads
//! the member). `limit` instead of `filter` selects as the proxy's first
//! attempt does now, `select_within(key, 10_000, None)` (the limit on the
//! hot line, no member read); `retry` as its retry, the same with a filter
//! refusing one tried instance (not in the service; it reads the member).
//! `limit` and `retry` need a core with `select_within`.
//!
//! `<work KiB>` (default 0) stands in for what a proxy does between two
//! picks of a thread: while it holds each selection, the thread reads that
//! many KiB of a private 16 MiB buffer, on from where the last pick
//! stopped, which evicts lines the picks loaded as a request's own memory
//! traffic would. Compare builds at the same work: the work's own time is
//! in both.
//!
//! Instances weigh `1 + i % 5`; with `PICKS_WEIGHTS=equal` in the
//! environment they all weigh 1 (`weighted` then rotates, as `adaptive`'s
//! calm mode does over equal weights).
//!
//! The `membership` form times changes instead of picks, on one thread: each
//! change deregisters `inst-i` (i spread over the list; a swap-remove) and
//! registers it again (an append), two snapshot rebuilds, and reports CPU
//! ns per change (the pair).
//!
//! Each thread reports the CPU time it ran (from
//! `/proc/thread-self/schedstat`, nanoseconds on a CPU) and the wall time of
//! its loop, per pick. CPU time per pick does not grow when other processes
//! take the cores, only when the threads slow each other down (cache lines
//! moving between cores), so one thread against two is the contention
//! figure. Under `valgrind --tool=callgrind`, runs of 0 and N picks give the
//! instructions per pick. Uses only the public API, so the same file runs
//! against an older core.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(clippy::print_stdout, clippy::disallowed_methods)]

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use datapunk_lb_core::{
    LoadBalancerConfig, Member, Registry, ServiceInstance, StrategyKind, Weight,
};

/// Nanoseconds the calling thread has run on a CPU (0 if unreadable).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`: run a small default then.
    let arg = |i: usize, default: &str| {
        args.get(i)
            .filter(|a| !a.starts_with("--"))
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    };
    if arg(1, "") == "membership" {
        return membership(
            arg(2, "round_robin").parse().unwrap(),
            arg(3, "100000").parse().unwrap(),
            arg(4, "1000").parse().unwrap(),
        );
    }
    let kind: StrategyKind = arg(1, "round_robin").parse().unwrap();
    let n: usize = arg(2, "1000").parse().unwrap();
    let picks: u64 = arg(3, "100000").parse().unwrap();
    let threads: usize = arg(4, "1").parse().unwrap();
    let work_kib: usize = arg(5, "0").parse().unwrap();
    let filter = arg(6, "");
    let tried = [datapunk_lb_core::InstanceId::try_new("tried").unwrap()];
    let untried = |m: &Member| !tried.contains(m.instance().id());
    let mode = match filter.as_str() {
        "filter" => Mode::Filter,
        "limit" => Mode::Limit,
        "retry" => Mode::Retry,
        _ => Mode::Select,
    };

    let registry = service(kind, n);
    let svc = registry.service("svc").unwrap();
    drop(svc.select(Some(b"warm-up")).unwrap());
    let keyed = kind == StrategyKind::ConsistentHash;

    let barrier = Arc::new(Barrier::new(threads));
    let results: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| {
                let (svc, barrier, untried) = (&svc, barrier.clone(), &untried);
                s.spawn(move || {
                    let buffer: Vec<u64> = if work_kib > 0 {
                        (0..WORK_BUFFER / 8).map(|i| i as u64).collect()
                    } else {
                        Vec::new()
                    };
                    let mut at = 0;
                    barrier.wait();
                    let cpu = thread_cpu_ns();
                    let wall = Instant::now();
                    for i in 0..picks {
                        let key = ((t << 48) + i).to_le_bytes();
                        let key = keyed.then_some(&key[..]);
                        let sel = match mode {
                            Mode::Filter => {
                                svc.select_with(key, |m| m.active_connections() < 10_000)
                            }
                            Mode::Limit => svc.select_within(key, 10_000, None).ok(),
                            Mode::Retry => svc.select_within(key, 10_000, Some(untried)).ok(),
                            Mode::Select => svc.select(key),
                        };
                        let sel = sel.unwrap();
                        if work_kib > 0 {
                            at = work(&buffer, at, work_kib * 128);
                        }
                        drop(black_box(sel));
                    }
                    let wall = wall.elapsed().as_nanos() as u64;
                    (thread_cpu_ns().saturating_sub(cpu), wall)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let per = |x: u64| x as f64 / picks.max(1) as f64;
    let cpu: Vec<String> = results.iter().map(|r| format!("{:.0}", per(r.0))).collect();
    let wall: Vec<String> = results.iter().map(|r| format!("{:.0}", per(r.1))).collect();
    let mut work = if work_kib > 0 {
        format!(" work={work_kib}KiB")
    } else {
        String::new()
    };
    if !filter.is_empty() {
        work.push_str(&format!(" {filter}"));
    }
    println!(
        "picks {kind} n={n} threads={threads} picks/thread={picks}{work}: cpu ns/pick per thread [{}], wall ns/pick per thread [{}]",
        cpu.join(", "),
        wall.join(", ")
    );
}

/// How the loop selects (the sixth argument; module doc).
#[derive(Clone, Copy)]
enum Mode {
    Select,
    Filter,
    Limit,
    Retry,
}

/// Bytes of each thread's buffer for `<work KiB>`.
const WORK_BUFFER: usize = 16 << 20;

/// Reads `words` words of `buffer` from `at` on (wrapping); where the next
/// read starts.
fn work(buffer: &[u64], at: usize, words: usize) -> usize {
    let mut sum = 0u64;
    let mut i = at;
    for _ in 0..words {
        sum = sum.wrapping_add(buffer[i]);
        i += 1;
        if i == buffer.len() {
            i = 0;
        }
    }
    black_box(sum);
    i
}

/// The instance `inst-{i}` of the benches' services: weight `1 + i % 5`,
/// or 1 with `PICKS_WEIGHTS=equal` in the environment (module doc).
fn instance(i: usize) -> ServiceInstance {
    static EQUAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let equal = *EQUAL.get_or_init(|| std::env::var("PICKS_WEIGHTS").is_ok_and(|w| w == "equal"));
    let weight = if equal { 1 } else { 1 + (i % 5) as u64 };
    ServiceInstance::try_new(&format!("inst-{i}"), "10.0.0.1", 1024 + (i % 60_000) as u16)
        .unwrap()
        .with_weight(Weight::try_new(weight).unwrap())
}

/// A registry whose service `svc` has `n` instances, tables built.
fn service(kind: StrategyKind, n: usize) -> Registry {
    let registry = Registry::builder().seed(1).build().unwrap();
    let config = LoadBalancerConfig {
        strategy: kind,
        ..LoadBalancerConfig::default()
    };
    registry.configure_service("svc", config).unwrap();
    registry
        .register_instances("svc", (0..n).map(instance).collect::<Vec<_>>())
        .unwrap();
    drop(registry.maintain());
    registry
}

/// `changes` times: deregister one instance, register it again.
fn membership(kind: StrategyKind, n: usize, changes: usize) {
    let registry = service(kind, n);
    let cpu = thread_cpu_ns();
    for k in 0..changes {
        let i = k.wrapping_mul(7919) % n.max(1);
        registry
            .deregister_instance("svc", &format!("inst-{i}"))
            .unwrap();
        registry.register_instance("svc", instance(i)).unwrap();
    }
    let cpu = thread_cpu_ns().saturating_sub(cpu);
    println!(
        "membership {kind} n={n} changes={changes}: cpu ns per deregister + register {:.0}",
        cpu as f64 / changes.max(1) as f64
    );
}
