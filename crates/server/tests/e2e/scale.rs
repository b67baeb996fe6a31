//! The admin endpoint at scale, against the real binary: a service above
//! its `metrics_instance_series_limit` exports aggregates and its worst
//! instances; `GET /v1/services/{svc}` pages worst first with a cursor;
//! `/status/data` stays bounded.
//!
//! `measure_admin_and_metrics_at_100k` is a measurement, not a check: run it
//! in release with
//! `cargo test --release -p datapunk-lb --test e2e measure_admin -- --ignored --nocapture`
//! (numbers in `docs/benchmarks.md`).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::admin::{metric_value, scrape_with_text};
use crate::support::{admin, get, temp_path, Lb, WEB_TO_API};

const TOKEN: &str = "scale-token";

/// A config with the listener `web` to one service `api` of `n` instances (127.0.0.1, ports
/// spread over 1..=60000), no health checks, and an admin token.
fn config_with(n: usize, service_extra: &str) -> String {
    use std::fmt::Write;
    let token_file = temp_path("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut s = format!(
        "{WEB_TO_API}[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n\
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
    let t = Instant::now();
    let (status, body) = admin(addr, "GET", path, Some(TOKEN), None).await;
    (status, body.len(), t.elapsed())
}

/// GET `path` with the token, as JSON; panics unless 200.
async fn get_json(addr: std::net::SocketAddr, path: &str) -> Value {
    let (status, body) = admin(addr, "GET", path, Some(TOKEN), None).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Sets instance `id`'s health score through the admin API.
async fn set_health(addr: std::net::SocketAddr, id: &str, score: f64) {
    let path = format!("/v1/services/api/instances/{id}/health");
    let body = format!("{{\"health_score\": {score}}}");
    let (status, resp) = admin(addr, "POST", &path, Some(TOKEN), Some(body)).await;
    assert_eq!(status, 200, "{resp}");
}

/// 15 instances, limit 5: the scrape has the limited gauge, the counts and
/// histogram of all 15, one request series for the service, and
/// per-instance series for the 10 worst only, which include the two made
/// worst through the admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_above_its_series_limit_exports_aggregates_and_its_worst() {
    let lb = Lb::start(&config_with(15, "metrics_instance_series_limit = 5"));
    let adm = lb.addr("admin");
    set_health(adm, "i000003", 0.2).await;
    set_health(adm, "i000011", 0.0).await;
    let (scrape, text) = scrape_with_text(adm).await;
    let samples = &scrape.samples;
    let api = [("service", "api")];
    assert_eq!(
        metric_value(samples, "datapunk_lb_instance_series_limited", &api),
        Some(1.0),
        "{text}"
    );
    let with_instance = |name: &str| -> HashSet<String> {
        samples
            .iter()
            .filter(|s| s.metric == name && s.labels.get("service") == Some("api"))
            .filter_map(|s| s.labels.get("instance").map(str::to_owned))
            .collect()
    };
    for family in [
        "datapunk_lb_instance_health_score",
        "datapunk_lb_circuit_state",
        "datapunk_lb_active_connections",
    ] {
        let ids = with_instance(family);
        assert_eq!(ids.len(), 10, "{family}: {ids:?}");
        for worst in ["i000003", "i000011"] {
            assert!(ids.contains(worst), "{family} lacks {worst}: {ids:?}");
        }
    }
    // Requests: the service's sum only, not 15 per-instance series.
    assert_eq!(
        with_instance("datapunk_lb_requests_total"),
        HashSet::from([String::new()])
    );
    fn state(s: &str) -> [(&str, &str); 2] {
        [("service", "api"), ("state", s)]
    }
    assert_eq!(
        metric_value(samples, "datapunk_lb_instances", &state("eligible")),
        Some(14.0)
    );
    assert_eq!(
        metric_value(samples, "datapunk_lb_instances", &state("ejected")),
        Some(1.0)
    );
    let count = text.lines().find(|l| {
        l.starts_with("datapunk_lb_instance_health_score_distribution_count{service=\"api\"}")
    });
    assert_eq!(
        count,
        Some("datapunk_lb_instance_health_score_distribution_count{service=\"api\"} 15"),
        "{text}"
    );
}

/// Pages of 4 over 15 instances: worst first, then by id; the cursor walk
/// lists every instance once; totals count all; the state filter and the
/// id search narrow; bad parameters get 400 naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_listing_pages_worst_first_with_a_cursor() {
    let lb = Lb::start(&config_with(15, ""));
    let adm = lb.addr("admin");
    set_health(adm, "i000009", 0.3).await;
    set_health(adm, "i000004", 0.0).await;
    let mut seen = Vec::new();
    let mut path = "/v1/services/api?limit=4".to_owned();
    let mut pages = 0;
    loop {
        let v = get_json(adm, &path).await;
        pages += 1;
        assert_eq!(v["total"], 15, "{v}");
        assert_eq!(v["totals"]["ejected"], 1, "{v}");
        assert_eq!(v["totals"]["healthy"], 14, "{v}");
        let list = v["instances"].as_array().unwrap();
        assert!(list.len() <= 4);
        seen.extend(list.iter().map(|i| i["id"].as_str().unwrap().to_owned()));
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/services/api?limit=4&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, 4);
    assert_eq!(seen.len(), 15);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 15, "{seen:?}");
    // Worst first (0, then 0.3), then every 1.0 by id.
    assert_eq!(&seen[..3], ["i000004", "i000009", "i000000"], "{seen:?}");
    let mut rest = seen[2..].to_vec();
    rest.sort();
    assert_eq!(rest, seen[2..].to_vec());

    let v = get_json(adm, "/v1/services/api?state=ejected").await;
    let ids: Vec<&str> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["i000004"]);
    assert_eq!(v["matched"], 1);
    assert_eq!(v["next_cursor"], Value::Null);
    let v = get_json(adm, "/v1/services/api?id_prefix=i00001").await;
    assert_eq!(v["matched"], 5, "{v}");
    // Without a limit a small service comes whole, as before pages.
    let v = get_json(adm, "/v1/services/api").await;
    assert_eq!(v["instances"].as_array().unwrap().len(), 15);

    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("state=sick", "state"),
        ("cursor=xyz", "cursor"),
    ] {
        let path = format!("/v1/services/api?{query}");
        let (status, body) = admin(adm, "GET", &path, Some(TOKEN), None).await;
        assert_eq!(status, 400, "{query}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["field"], field, "{query}: {body}");
    }
}

/// `/status/data` shows 20 instances per service, the worst, with counts
/// over all; its search finds an instance that is not among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_data_is_bounded_and_searchable() {
    let lb = Lb::start(&config_with(300, ""));
    let adm = lb.addr("admin");
    set_health(adm, "i000250", 0.1).await;
    let c = crate::support::client();
    let (status, body) = get(&c, adm, "/status/data").await.unwrap();
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let svc = &v["services"][0];
    let list = svc["instances"].as_array().unwrap();
    assert_eq!(list.len(), 20);
    assert_eq!(list[0]["id"], "i000250", "the worst first");
    assert_eq!(svc["total"], 300);
    assert_eq!(svc["totals"]["healthy"], 300);
    let (_, body) = get(&c, adm, "/status/data?id_prefix=i00029").await.unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    let svc = &v["services"][0];
    assert_eq!(svc["matched"], 10, "{svc}");
    assert_eq!(svc["instances"][0]["id"], "i000290");
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Requests spread over 200 instances (round robin: each one's connection
/// is reused only after every other had a turn) with
/// `max_idle_connections = 20`: the balancer keeps at most 20 of the 200
/// upstream connections idle, so its descriptors stay bounded. Unbounded
/// (per instance only), the 100,000-instance run filled all 20,000 of its
/// descriptors until accepts, connects and the reload's read of its own
/// config file failed (docs/benchmarks.md, "Scale (issue 11)").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_bounded_per_service() {
    use std::fmt::Write;
    let backend = crate::support::Backend::start("b").await;
    let mut cfg = format!(
        "{WEB_TO_API}[service.api]\nstrategy = \"round_robin\"\nslow_start = \"0s\"\n\
         max_idle_connections = 20\n[service.api.health_check]\nkind = \"none\"\n"
    );
    for i in 0..200 {
        let _ = write!(
            cfg,
            "[[service.api.instance]]\nid = \"i{i:03}\"\naddress = \"127.0.0.1\"\nport = {}\n",
            backend.addr.port()
        );
    }
    let lb = Lb::start(&cfg);
    let pid = lb.child.id();
    let web = lb.addr("web");
    let c = crate::support::client();
    assert_eq!(get(&c, web, "/").await.unwrap().0, 200);
    let before = open_fds(pid);
    for i in 0..400 {
        let (status, body) = get(&c, web, "/").await.unwrap();
        assert_eq!((status, body.as_str()), (200, "b"), "request {i}");
    }
    let after = open_fds(pid);
    assert!(
        after <= before + 20,
        "descriptors {before} -> {after}: more than the 20 idle connections allowed"
    );
    assert!(
        backend.state.hits.load(std::sync::atomic::Ordering::SeqCst) >= 400,
        "every request reached the backend"
    );
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
    eprintln!("instances {n}, RSS at start {} KB", rss_kb(pid));
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
        eprintln!(
            "{path}: {size} bytes, median {:.1} ms (min {:.1}, max {:.1}), RSS after {} KB",
            runs[2].as_secs_f64() * 1e3,
            runs[0].as_secs_f64() * 1e3,
            runs[4].as_secs_f64() * 1e3,
            rss_kb(pid)
        );
    }
}
