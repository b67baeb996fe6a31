//! A backend dies under load and comes back: no failed requests, ejection,
//! recovery through active checks, slow-start ramp.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_costs_no_requests_and_ramps_back() {
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let lb = Lb::start(&http_config(
        "strategy = \"weighted\"\nslow_start = \"3s\"\nretries = 2",
        &[&a, &b, &c],
        &[1, 1, 1],
    ));
    let addr = lb.addr("web");
    let t0 = Instant::now();
    let load = Load::start(addr, 4, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill().await;
    let killed_at = t0.elapsed().as_millis();
    lb.wait_log("c's breaker opening", Duration::from_secs(5), |v| {
        v["instance"] == "c" && v["to"] == "open"
    })
    .await;
    // While c is down, nothing is served by it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    c.restart().await;
    lb.wait_log("c's breaker closing", Duration::from_secs(20), |v| {
        v["instance"] == "c" && v["to"] == "closed"
    })
    .await;
    let closed_at = t0.elapsed().as_millis();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (seen, failed) = load.stop().await;
    assert_eq!(failed, 0, "retries must hide the dead instance");

    let served_by_c_while_down = seen
        .iter()
        .filter(|(t, who)| *t > killed_at + 50 && *t < closed_at.saturating_sub(3000) && who == "c")
        .count();
    assert_eq!(served_by_c_while_down, 0);
    // Share of c in consecutive 1 s windows after its breaker closed: ramps.
    let share = |from: u128, to: u128| {
        let w: Vec<_> = seen.iter().filter(|(t, _)| *t >= from && *t < to).collect();
        let by: HashMap<&str, usize> = w.iter().fold(HashMap::new(), |mut m, (_, who)| {
            *m.entry(who.as_str()).or_default() += 1;
            m
        });
        by.get("c").copied().unwrap_or(0) as f64 / w.len().max(1) as f64
    };
    let first = share(closed_at, closed_at + 1000);
    let last = share(closed_at + 2500, closed_at + 3500);
    eprintln!("c's share after recovery: first second {first:.3}, fourth second {last:.3}");
    assert!(
        first < 0.25,
        "slow start: c must not take a full share at once ({first:.3})"
    );
    assert!(
        last > first + 0.05,
        "c's share must ramp up: {first:.3} → {last:.3}"
    );
    assert!(
        last > 0.25,
        "after the ramp c is back near a third ({last:.3})"
    );
}
