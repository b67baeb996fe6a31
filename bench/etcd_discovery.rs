//! The etcd discovery measurements quoted in `docs/benchmarks.md` ("etcd
//! discovery"): the time from an etcd put to the first request proxied to
//! the new instance (two real nodes on a real etcd), and the time to apply
//! a batch of 10,000 changes to a service of 100,000 (in process).
//!
//! ```sh
//! cargo bench -p datapunk-lb --bench etcd_discovery                # both
//! cargo bench -p datapunk-lb --bench etcd_discovery -- put_to_first # one, by name
//! ```
//!
//! A bench target (`harness = false`, the `bench` profile: optimised), so
//! `cargo test` never runs it; without `--bench` (as `cargo test
//! --all-targets` calls it) it returns at once. It shares the e2e tests'
//! helpers and etcd harness (`crates/server/tests/e2e/support/`); without
//! etcd installed the put measurement skips with a printed reason.

// Measurement code: a failed unwrap is a failed run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The e2e helpers; this target uses only some of them.
#[allow(dead_code)]
#[path = "../crates/server/tests/e2e/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::etcd::*;
use support::*;

/// The measurements, by name.
const MEASUREMENTS: [&str; 2] = ["put_to_first_request", "apply_10k_changes_to_100k"];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected =
        |name: &str| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()));
    if selected(MEASUREMENTS[0]) {
        eprintln!("== {}", MEASUREMENTS[0]);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(put_to_first_request());
    }
    if selected(MEASUREMENTS[1]) {
        eprintln!("== {}", MEASUREMENTS[1]);
        apply_10k_changes_to_100k();
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Time from an etcd put to the first proxied request reaching the new
/// instance, at each of two nodes, over 100 changes.
async fn put_to_first_request() {
    let Some(bin) = etcd_bin() else { return };
    let etcd = Etcd::start(&bin).await;
    let base = Backend::start("base").await;
    let target = Backend::start("target").await;
    let n1 = start_node(&base, &etcd.url()).await;
    let n2 = start_node(&base, &etcd.url()).await;
    let mut c = etcd_client(&etcd.url()).await;
    let mut took: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    // The put's own round trip (etcd commits with an fsync), for reference.
    let mut put_rtt = Vec::new();
    let changes = 100;
    // Requests back to back (no pause) until one reaches `target`.
    let first_hit = |lb: &Lb| {
        let addr = lb.addr("web");
        async move {
            let c = client();
            let t = Instant::now();
            loop {
                if let Ok((200, body)) = get(&c, addr, "/").await {
                    if body == "target" {
                        return Instant::now();
                    }
                }
                assert!(t.elapsed() < Duration::from_secs(5), "target never routed");
            }
        }
    };
    for k in 0..changes {
        let key = format!("{PREFIX}api/t-{k}");
        let t0 = Instant::now();
        let (a, b, (put, acked)) = tokio::join!(first_hit(&n1), first_hit(&n2), async {
            let r = c.put(key.as_str(), value(&target, 1), 0).await;
            (r, Instant::now())
        });
        put.unwrap();
        took[0].push(a - t0);
        took[1].push(b - t0);
        put_rtt.push(acked - t0);
        c.delete(key.as_str()).await.unwrap();
        until_routes(&n1, "target", false, Duration::from_secs(5)).await;
        until_routes(&n2, "target", false, Duration::from_secs(5)).await;
    }
    for (i, t) in took.iter_mut().enumerate() {
        let max = *t.iter().max().unwrap();
        eprintln!(
            "node {}: put -> first proxied request over {changes} changes: median {:?}, p90 {:?}, max {max:?}",
            i + 1,
            percentile(t, 0.5),
            percentile(t, 0.9),
        );
    }
    eprintln!(
        "the put's own round trip: median {:?}, max {:?}",
        percentile(&mut put_rtt, 0.5),
        put_rtt.iter().max().unwrap()
    );
}

/// Applying a batch of 10,000 changes (5,000 updates, 2,500 new, 2,500
/// deletes) to a discovered service of 100,000 instances.
fn apply_10k_changes_to_100k() {
    use datapunk_lb::config::Config;
    use datapunk_lb::discovery::{parse_key, parse_put, Batch, Change, Discovered};
    use datapunk_lb::metrics::Metrics;
    use datapunk_lb_core::Registry;

    let config = Config::parse(
        "[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nservice = \"api\"\n[service.api]\nstrategy = \"weighted\"\n",
    )
    .unwrap();
    let key = |i: usize| format!("{PREFIX}api/i-{i}");
    let json = |i: usize, w: usize| {
        format!(
            r#"{{"address":"10.{}.{}.{}","port":8080,"weight":{w}}}"#,
            i >> 16,
            (i >> 8) & 255,
            i & 255
        )
    };
    let mut samples = Vec::new();
    let mut parse_samples = Vec::new();
    let mut first = Vec::new();
    let mut core_samples = Vec::new();
    for round in 0..7 {
        let registry = Arc::new(Registry::new());
        let metrics = Metrics::new(registry.clone());
        let mut d = Discovered::default();
        let t = Instant::now();
        let entries: Vec<Change> = (0..100_000)
            .map(|i| parse_put(PREFIX, key(i).as_bytes(), json(i, 1).as_bytes()).unwrap())
            .collect();
        d.apply(
            Batch::Full {
                entries,
                invalid: Vec::new(),
            },
            &registry,
            &config.services,
            &metrics,
        );
        first.push(t.elapsed());
        assert_eq!(registry.instances("api").unwrap().len(), 100_000);
        // The watch batch as raw etcd events: parse, then apply.
        let raw: Vec<(String, Option<String>)> = (0..5_000)
            .map(|i| (key(i * 20), Some(json(i * 20, 2 + round))))
            .chain((0..2_500).map(|i| (key(100_000 + i), Some(json(100_000 + i, 1)))))
            .chain((0..2_500).map(|i| (key(i * 40 + 7), None)))
            .collect();
        let t = Instant::now();
        let changes: Vec<Change> = raw
            .iter()
            .map(|(k, v)| match v {
                Some(v) => parse_put(PREFIX, k.as_bytes(), v.as_bytes()).unwrap(),
                None => {
                    let (service, id) = parse_key(PREFIX, k.as_bytes()).unwrap();
                    Change::Delete { service, id }
                }
            })
            .collect();
        let parsed = t.elapsed();
        let applied = d.apply(Batch::Delta(changes), &registry, &config.services, &metrics);
        let total = t.elapsed();
        assert_eq!(
            (applied.updated, applied.added, applied.removed),
            (5_000, 2_500, 2_500)
        );
        // The core's share: the same changes straight to a registry of
        // 100,000 (one register_instances, then the drains).
        let core = Registry::new();
        core.register_instances(
            "api",
            (0..100_000).map(|i| {
                datapunk_lb::state::InstanceSpec {
                    address: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                    port: 8080,
                    weight: 1,
                    zone: None,
                    tags: Vec::new(),
                }
                .to_instance(&format!("i-{i}"))
                .unwrap()
            }),
        )
        .unwrap();
        let puts: Vec<_> = raw
            .iter()
            .filter_map(|(k, v)| {
                let (_, id) = parse_key(PREFIX, k.as_bytes()).unwrap();
                let v = v.as_ref()?;
                let spec: datapunk_lb::state::InstanceSpec = serde_json::from_str(v).unwrap();
                Some(spec.to_instance(&id).unwrap())
            })
            .collect();
        let deletes: Vec<String> = raw
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| parse_key(PREFIX, k.as_bytes()).unwrap().1)
            .collect();
        let t = Instant::now();
        core.register_instances("api", puts).unwrap();
        for id in &deletes {
            core.drain_instance("api", id, Duration::from_secs(5))
                .unwrap();
        }
        let core_took = t.elapsed();
        if round > 0 {
            samples.push(total);
            parse_samples.push(parsed);
            core_samples.push(core_took);
        }
    }
    eprintln!(
        "first sync of 100,000 (parse + apply): median {:?}",
        percentile(&mut first, 0.5)
    );
    eprintln!(
        "batch of 10,000 changes to 100,000 (parse + apply), {} runs: median {:?}, max {:?}; of which JSON parsing median {:?}",
        samples.len(),
        percentile(&mut samples, 0.5),
        samples.iter().max().unwrap(),
        percentile(&mut parse_samples, 0.5),
    );
    eprintln!(
        "the same changes straight to the core (register_instances + drain_instance): median {:?}",
        percentile(&mut core_samples, 0.5),
    );
}
