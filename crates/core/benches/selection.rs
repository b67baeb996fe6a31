//! Criterion benches of the core's hot and warm paths, reported in
//! `docs/benchmarks.md`:
//!
//! - `select_drop/{strategy}/{1t,2t}/{n}`: `Service::select` plus dropping the
//!   `Selection` (a cancelled request), for every strategy at 10, 1,000 and
//!   100,000 instances, on one thread and on two threads at once;
//! - `select_success/{strategy}/1t/100000`: `select` plus `success(100 µs)`;
//! - `lookup/...`: `Registry::get_instance` by name against `Service::select`;
//! - `membership/{register,deregister}[+maintain]/{strategy}/{n}`: adding
//!   one new instance, and removing one, in a service of 100,000 (the call
//!   alone, and followed by the `maintain` that rebuilds stale tables), and
//!   at 9,999 members, where tables are rebuilt inside the call;
//! - before criterion starts, live heap bytes per registered instance at
//!   100,000, from a counting global allocator, and the setup times.
//!
//! Run: `cargo bench -p datapunk-lb-core --bench selection`.

// Benches are not tests, but like tests a failed setup should stop the run
// loudly rather than be handled.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The memory figures are printed to stdout next to criterion's report, and
// the two-thread runs and membership changes are timed with the wall clock
// (the core's `Clock` rule is about model time, not measuring it).
#![allow(clippy::print_stdout, clippy::disallowed_methods)]

use std::alloc::System;
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use cap::Cap;
use criterion::{BenchmarkId, Criterion, SamplingMode};
use datapunk_lb_core::strategy::EAGER_REBUILD_LIMIT;
use datapunk_lb_core::{
    LoadBalancerConfig, Registry, Service, ServiceInstance, StrategyKind, Weight,
};

/// Counts live heap bytes (`allocated()`): `unsafe_code` is forbidden in this
/// workspace, so the `GlobalAlloc` wrapper comes from the `cap` crate rather
/// than being written here. It costs one atomic add per allocation and free;
/// the selection path does not allocate.
#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, usize::MAX);

const SERVICE: &str = "svc";
const SIZES: [usize; 3] = [10, 1_000, 100_000];
const LARGE: usize = 100_000;
/// The core rebuilds strategy tables inside the registry call while a
/// service has at most `EAGER_REBUILD_LIMIT` (10,000) members, later (in
/// `maintain`, or a pick) above it. One below the limit, so that both the
/// timed change and the one undoing it stay on the eager path.
const EAGER: usize = EAGER_REBUILD_LIMIT - 1;

/// Instance `i`: weight `1 + i % 5`, so weights are not uniform and
/// `weighted` (and `adaptive` in its `weighted` mode) runs its WF²Q schedule
/// rather than the plain rotation it uses for equal weights.
fn instance(i: usize) -> ServiceInstance {
    let port = 1024 + (i % 60_000) as u16;
    ServiceInstance::try_new(&format!("inst-{i}"), "10.0.0.1", port)
        .unwrap()
        .with_weight(Weight::try_new(1 + (i % 5) as u64).unwrap())
}

/// A registry with one service of `n` instances balanced by `kind`, ready to
/// pick: registered in one batch, tables built (`maintain` rebuilds what a
/// large service's change left stale), one selection made.
fn service(kind: StrategyKind, n: usize) -> (Registry, Arc<Service>) {
    let (registry, svc, _) = service_timed(kind, n);
    (registry, svc)
}

/// [`service`], also returning how long the batch registration and the
/// first `maintain` took.
fn service_timed(kind: StrategyKind, n: usize) -> (Registry, Arc<Service>, [Duration; 2]) {
    let registry = Registry::builder().seed(1).build().unwrap();
    let config = LoadBalancerConfig {
        strategy: kind,
        ..LoadBalancerConfig::default()
    };
    registry.configure_service(SERVICE, config).unwrap();
    let instances: Vec<_> = (0..n).map(instance).collect();
    let t = Instant::now();
    registry.register_instances(SERVICE, instances).unwrap();
    let register = t.elapsed();
    let t = Instant::now();
    drop(registry.maintain());
    let maintain = t.elapsed();
    let svc = registry.service(SERVICE).unwrap();
    drop(svc.select(Some(b"warm-up")).unwrap());
    (registry, svc, [register, maintain])
}

/// One pick, released at once. `consistent_hash` gets a key that changes
/// with every call (the counter's bytes); the others get none.
#[inline]
fn select_drop(svc: &Arc<Service>, keyed: bool, k: u64) {
    let key = k.to_le_bytes();
    let s = svc.select(keyed.then_some(&key[..])).unwrap();
    drop(black_box(s));
}

/// Runs `op(i)` for `i in 0..iters` on each of two threads at once and
/// returns the wall time from a common start (a barrier) until both are
/// done. Divided by `iters` (criterion does that), this is the time per
/// operation *per thread* while both run; total throughput is two
/// operations in that time.
fn two_threads(iters: u64, op: impl Fn(u64) + Sync) -> Duration {
    let barrier = Barrier::new(3);
    let start = thread::scope(|scope| {
        for t in 0..2u64 {
            let (barrier, op) = (&barrier, &op);
            scope.spawn(move || {
                barrier.wait();
                let base = t << 48; // distinct keys per thread
                for i in 0..iters {
                    op(base + i);
                }
            });
        }
        barrier.wait();
        Instant::now()
    });
    start.elapsed()
}

fn bench_select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select_drop");
    for n in SIZES {
        for kind in StrategyKind::ALL {
            let (_registry, svc) = service(kind, n);
            let keyed = kind == StrategyKind::ConsistentHash;
            g.bench_function(BenchmarkId::new(format!("{kind}/1t"), n), |b| {
                let mut k = 0u64;
                b.iter(|| {
                    k = k.wrapping_add(1);
                    select_drop(&svc, keyed, k);
                });
            });
            g.bench_function(BenchmarkId::new(format!("{kind}/2t"), n), |b| {
                b.iter_custom(|iters| two_threads(iters, |k| select_drop(&svc, keyed, k)));
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("select_success");
    for kind in StrategyKind::ALL {
        let (_registry, svc) = service(kind, LARGE);
        let keyed = kind == StrategyKind::ConsistentHash;
        g.bench_function(BenchmarkId::new(format!("{kind}/1t"), LARGE), |b| {
            let mut k = 0u64;
            b.iter(|| {
                k = k.wrapping_add(1);
                let key = k.to_le_bytes();
                let s = svc.select(keyed.then_some(&key[..])).unwrap();
                black_box(s.success(Duration::from_micros(100)));
            });
        });
    }
    g.finish();
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    for kind in [StrategyKind::RoundRobin, StrategyKind::Adaptive] {
        let (registry, svc) = service(kind, LARGE);
        let id = BenchmarkId::new(format!("get_instance/{kind}"), LARGE);
        g.bench_function(id, |b| {
            b.iter(|| drop(black_box(registry.get_instance(SERVICE).unwrap())));
        });
        let id = BenchmarkId::new(format!("service_select/{kind}"), LARGE);
        g.bench_function(id, |b| {
            b.iter(|| drop(black_box(svc.select(None).unwrap())));
        });
    }
    g.finish();
}

/// Register one new instance / deregister one existing instance in a service
/// of 100,000, timing only that change; the opposite change that restores
/// the service is made untimed. Each is measured twice: the registry call
/// alone, and the call followed by `Registry::maintain`, which rebuilds
/// whatever strategy table the change left stale (the `weighted` schedule,
/// the `consistent_hash` Maglev table), so the second figure is the full
/// cost of a change whether a strategy rebuilds in `prepare` or later.
/// Strategies without tables (`least_connections`, `random`,
/// `weighted_random`, `p2c`, `peak_ewma`) take the same path as
/// `round_robin`.
fn bench_membership(c: &mut Criterion) {
    let mut g = c.benchmark_group("membership");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(2));
    let kinds = [
        StrategyKind::Adaptive,
        StrategyKind::RoundRobin,
        StrategyKind::Weighted,
        StrategyKind::ConsistentHash,
    ];
    let cases = kinds.iter().map(|&k| (k, LARGE)).chain([
        // The largest services whose tables are rebuilt inside the
        // registry call itself.
        (StrategyKind::Weighted, EAGER),
        (StrategyKind::ConsistentHash, EAGER),
    ]);
    for (kind, n) in cases {
        let (registry, _svc) = service(kind, n);
        for maintain in [false, true] {
            if n == EAGER && maintain {
                continue; // nothing is left for maintain to rebuild
            }
            let suffix = if maintain { "+maintain" } else { "" };
            // In the `+maintain` runs, every change (timed or not) is
            // followed by a rebuild, so each timed change starts fresh.
            let settle = || {
                if maintain {
                    drop(registry.maintain());
                }
            };
            let mut next = 0u64;
            let id = BenchmarkId::new(format!("register{suffix}/{kind}"), n);
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        next += 1;
                        let id = format!("extra-{next}");
                        let inst = ServiceInstance::try_new(&id, "10.0.0.2", 8080).unwrap();
                        let t = Instant::now();
                        registry.register_instance(SERVICE, inst).unwrap();
                        settle();
                        timed += t.elapsed();
                        registry.deregister_instance(SERVICE, &id).unwrap();
                        settle();
                    }
                    timed
                });
            });
            let mut next = 0usize;
            let id = BenchmarkId::new(format!("deregister{suffix}/{kind}"), n);
            g.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        // Spread the removals over the list (swap-remove
                        // moves the last member into the hole).
                        next += 1;
                        let id = format!("inst-{}", next.wrapping_mul(7_919) % n);
                        let t = Instant::now();
                        let removed = registry.deregister_instance(SERVICE, &id).unwrap();
                        settle();
                        timed += t.elapsed();
                        registry.register_instance(SERVICE, removed).unwrap();
                        settle();
                    }
                    timed
                });
            });
        }
    }
    g.finish();
}

/// Live heap bytes per instance for a service of 100,000 balanced by `kind`,
/// after one selection (so tables are built): everything the registry holds,
/// divided by the instance count. Also prints how long the setup took.
fn report_memory() {
    println!("memory: live heap bytes per instance, service of {LARGE} (after one select)");
    for kind in StrategyKind::ALL {
        let before = ALLOC.allocated();
        let (registry, svc, [register, maintain]) = service_timed(kind, LARGE);
        let after = ALLOC.allocated();
        drop(svc);
        drop(registry);
        let per = after.saturating_sub(before) as f64 / LARGE as f64;
        println!(
            "memory/{kind}/{LARGE}: {per:.0} B per instance \
             (register_instances of {LARGE}: {register:.1?}, first maintain: {maintain:.1?})"
        );
    }
}

fn main() {
    report_memory();
    let mut c = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300))
        .without_plots()
        .configure_from_args();
    bench_select(&mut c);
    bench_lookup(&mut c);
    bench_membership(&mut c);
    c.final_summary();
}
