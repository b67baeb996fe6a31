//! Slow start under `round_robin` and `least_connections` through the real
//! binary: a backend that comes back takes a share that ramps over the
//! window instead of a full third at once (the shape and tolerance of the
//! `weighted` case in `failover.rs`).

use std::time::{Duration, Instant};

use crate::support::*;

/// Kills `c` of three backends under load, brings it back and measures its
/// share in the first and the fourth second after its breaker closed, with
/// a 4 s slow-start window.
async fn recovered_share_ramps(strategy: &str) {
    let (a, b, c) = three_backends().await;
    // No active checks: a probe timing out on a loaded machine would halve
    // a health score and move the shares this test compares; the breaker
    // opens and closes on the load's own requests.
    let lb = Lb::start(&without_checks(&http_config(
        &format!("strategy = \"{strategy}\"\nslow_start = \"4s\"\nretries = 2"),
        &[&a, &b, &c],
        &[1, 1, 1],
    )));
    let t0 = Instant::now();
    let load = Load::start(lb.addr("web"), 4, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.kill().await;
    lb.wait_log("c's breaker opening", Duration::from_secs(5), |v| {
        v["instance"] == "c" && v["to"] == "open"
    })
    .await;
    c.restart().await;
    lb.wait_log("c's breaker closing", Duration::from_secs(20), |v| {
        v["instance"] == "c" && v["to"] == "closed"
    })
    .await;
    let closed_at = t0.elapsed().as_millis();
    tokio::time::sleep(Duration::from_millis(4200)).await;
    let (seen, failed) = load.stop().await;
    assert_eq!(failed, 0, "{strategy}: retries must hide the dead instance");

    let share = |from, to| share_in(&seen, "c", from, to);
    let first = share(closed_at, closed_at + 1000);
    let last = share(closed_at + 3000, closed_at + 4000);
    eprintln!(
        "{strategy}: c's share after recovery: first second {first:.3}, fourth second {last:.3}"
    );
    // Over the first second the factor averages 1/8: a share near 0.04,
    // against a third without slow start.
    assert!(
        first < 0.2,
        "{strategy}: c must not take a full share at once ({first:.3})"
    );
    assert!(
        last > first + 0.05,
        "{strategy}: c's share must ramp up: {first:.3} → {last:.3}"
    );
    assert!(
        last > 0.2,
        "{strategy}: by the end of the ramp c is near a third ({last:.3})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_ramps_a_recovered_backend() {
    recovered_share_ramps("round_robin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_ramps_a_recovered_backend() {
    recovered_share_ramps("least_connections").await;
}
