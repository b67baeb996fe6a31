//! The admin endpoint at scale: one service of 100,000 instances (no
//! backends, no health checks: sizes and times of the answers only),
//! measured against the real binary.
//!
//! `measure_admin_and_metrics_at_100k` is a measurement, not a check: run it
//! in release with
//! `cargo test --release -p datapunk-lb --test e2e measure_admin -- --ignored --nocapture`
//! (numbers in `docs/benchmarks.md`).

use std::time::{Duration, Instant};

use crate::support::{get, temp_path, Lb};

const TOKEN: &str = "scale-token";

/// A config with one service `api` of `n` instances (127.0.0.1, ports
/// spread over 1..=60000), no health checks, and an admin token.
fn config_with(n: usize, service_extra: &str) -> String {
    use std::fmt::Write;
    let token_file = temp_path("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut s = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\
         [service.api]\n{service_extra}\n[service.api.health_check]\nkind = \"none\"\n",
        token_file.display()
    );
    for i in 0..n {
        let _ = write!(
            s,
            "[[service.api.instance]]\nid = \"i{i:06}\"\naddress = \"127.0.0.1\"\nport = {}\n",
            1 + i % 60_000
        );
    }
    s
}

/// GET `path` with the token; `(status, body bytes, time)`.
async fn timed(addr: std::net::SocketAddr, path: &str) -> (u16, usize, Duration) {
    let (status, _, len, took) = timed_body(addr, path).await;
    (status, len, took)
}

async fn timed_body(addr: std::net::SocketAddr, path: &str) -> (u16, String, usize, Duration) {
    let t = Instant::now();
    let (status, body) = crate::support::admin(addr, "GET", path, Some(TOKEN), None).await;
    let took = t.elapsed();
    let len = body.len();
    (status, body, len, took)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// Prints size and time (median of 5, after one warm-up) of `/metrics`,
/// `/v1/services/api?limit=100` and `/status/data` at 100,000 instances,
/// and the RSS before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check: run in release with --ignored --nocapture"]
async fn measure_admin_and_metrics_at_100k() {
    let n = 100_000;
    let lb = Lb::start(&config_with(n, ""));
    let adm = lb.addr("admin");
    // Wait until all instances are registered.
    let c = crate::support::client();
    let start = Instant::now();
    loop {
        let (_, body) = get(&c, adm, "/metrics").await.unwrap();
        if body.contains("datapunk_lb_instances{") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pid = lb.child.id();
    println!("instances {n}, RSS at start {} KB", rss_kb(pid));
    for path in [
        "/metrics",
        "/v1/services/api?limit=100",
        "/v1/services/api",
        "/status/data",
        "/status/data?since=1000000",
    ] {
        let _ = timed(adm, path).await;
        let mut runs = Vec::new();
        let mut size = 0;
        for _ in 0..5 {
            let (status, len, took) = timed(adm, path).await;
            assert_eq!(status, 200, "{path}");
            size = len;
            runs.push(took);
        }
        runs.sort();
        println!(
            "{path}: {size} bytes, median {:.1} ms (min {:.1}, max {:.1}), RSS after {} KB",
            runs[2].as_secs_f64() * 1e3,
            runs[0].as_secs_f64() * 1e3,
            runs[4].as_secs_f64() * 1e3,
            rss_kb(pid)
        );
    }
}
