//! A backend dies under load and comes back: no failed requests, ejection,
//! recovery through active checks, slow-start ramp.

use std::time::Duration;

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
    let load = Load::start(addr, 4, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill().await;
    let killed_at = load.elapsed_ms();
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
    let closed_at = load.elapsed_ms();
    // Back near a third: c's share over the last second above 0.25. Its
    // health score halved with each failure while it was down and climbs
    // back 0.1 per second of traffic (core `health`), so how soon after the
    // 3 s ramp it gets there depends on how long it was down, which a
    // loaded machine stretches: wait for it (from a score of 0 it takes
    // 10 s), not for a fixed 3.5 s.
    let deadline = closed_at + 20_000;
    let last = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = load.elapsed_ms();
        let last = share_in(&load.seen_so_far(), "c", now - 1000, now);
        if last > 0.25 && now >= closed_at + 2000 {
            break last;
        }
        assert!(
            now < deadline,
            "after the ramp c is back near a third within 20 s ({last:.3})"
        );
    };
    let (seen, failed) = load.stop().await;
    assert_eq!(failed, 0, "retries must hide the dead instance");

    let served_by_c_while_down = seen
        .iter()
        .filter(|(t, who)| *t > killed_at + 50 && *t < closed_at.saturating_sub(3000) && who == "c")
        .count();
    assert_eq!(served_by_c_while_down, 0);
    // Share of c in the first second after its breaker closed: slow start.
    let share = |from: u128, to: u128| share_in(&seen, "c", from, to);
    let first = share(closed_at, closed_at + 1000);
    eprintln!("c's share after recovery: first second {first:.3}, later {last:.3}");
    assert!(
        first < 0.25,
        "slow start: c must not take a full share at once ({first:.3})"
    );
    assert!(
        last > first + 0.05,
        "c's share must ramp up: {first:.3} → {last:.3}"
    );
}
