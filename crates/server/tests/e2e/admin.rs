//! The admin API over real HTTP: auth, validation, registration, drain,
//! metrics, state that survives restarts.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const TOKEN: &str = "s3cret-token";

/// A config with an admin token file and optional state file.
fn config(
    backends: &[&std::sync::Arc<Backend>],
    state_file: Option<&std::path::Path>,
) -> (String, std::path::PathBuf) {
    let token_file = temp_path("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let state = state_file.map_or(String::new(), |p| {
        format!("state_file = \"{}\"\n", p.display())
    });
    let cfg = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n{state}",
        // No slow start: an instance added here takes its turn at once.
        http_config(
            "strategy = \"round_robin\"\nslow_start = \"0s\"",
            backends,
            &[1, 1, 1],
        ),
        token_file.display()
    );
    (cfg, token_file)
}

/// A node on [`config`] without a state file.
fn start_with_token(backends: &[&std::sync::Arc<Backend>]) -> Lb {
    Lb::start(&config(backends, None).0)
}

async fn service(admin_addr: std::net::SocketAddr) -> Value {
    let (status, body) = admin(admin_addr, "GET", "/v1/services/api", Some(TOKEN), None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The ids of `api`'s instances.
async fn ids(admin_addr: std::net::SocketAddr) -> Vec<Value> {
    service(admin_addr).await["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].clone())
        .collect()
}

/// Removes an instance without draining.
async fn remove_now(adm: std::net::SocketAddr, id: &str) {
    let path = format!("/v1/services/api/instances/{id}?drain=0s");
    let (status, body) = admin(adm, "DELETE", &path, Some(TOKEN), None).await;
    assert_eq!(status, 202, "{body}");
}

/// What a refused request must not change.
fn essence(v: &Value) -> Value {
    let instances: Vec<Value> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            serde_json::json!([
                i["id"],
                i["port"],
                i["weight"],
                i["health_score"],
                i["draining"]
            ])
        })
        .collect();
    serde_json::json!({ "strategy": v["strategy"], "instances": instances })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mutating_route_needs_the_token_and_validates() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let lb = start_with_token(&[&a]);
    let adm = lb.addr("admin");
    let put_b = format!(r#"{{"address":"127.0.0.1","port":{}}}"#, b.addr.port());
    let routes: Vec<(&str, String, Option<String>)> = vec![
        (
            "PUT",
            "/v1/services/api/instances/b".into(),
            Some(put_b.clone()),
        ),
        (
            "DELETE",
            "/v1/services/api/instances/a?drain=0s".into(),
            None,
        ),
        (
            "POST",
            "/v1/services/api/instances/a/health".into(),
            Some(r#"{"health_score":0.5}"#.into()),
        ),
        (
            "PUT",
            "/v1/services/api/strategy".into(),
            Some(r#"{"strategy":"p2c"}"#.into()),
        ),
    ];
    let before = essence(&service(adm).await);
    for (method, path, body) in &routes {
        for token in [None, Some("wrong-token"), Some("s3cret-token-")] {
            let (status, resp) = admin(adm, method, path, token, body.clone()).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {resp}");
            assert_eq!(
                essence(&service(adm).await),
                before,
                "{method} {path} with {token:?} changed state"
            );
        }
    }
    // A body not declared as JSON is refused (no cross-site text/plain POST).
    let req = hyper::Request::builder()
        .method("POST")
        .uri(format!("http://{adm}/v1/services/api/instances/a/health"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "text/plain")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"health_score":0.1}"#,
        )))
        .unwrap();
    assert_eq!(client().request(req).await.unwrap().status(), 415);
    assert_eq!(essence(&service(adm).await), before);
    // Reads need the token too.
    assert_eq!(admin(adm, "GET", "/v1/services", None, None).await.0, 401);

    // Validation: 400 naming the field, and nothing changes.
    let bad: Vec<(&str, &str, String, &str)> = vec![
        (
            "PUT",
            "/v1/services/api/instances/x",
            "{not json".into(),
            "invalid JSON",
        ),
        (
            "PUT",
            "/v1/services/api/instances/x",
            r#"{"address":"127.0.0.1"}"#.into(),
            "port",
        ),
        (
            "PUT",
            "/v1/services/api/instances/x",
            r#"{"address":"127.0.0.1","port":0}"#.into(),
            "port",
        ),
        (
            "PUT",
            "/v1/services/api/instances/x",
            r#"{"address":"127.0.0.1","port":80,"weight":5000}"#.into(),
            "weight",
        ),
        (
            "POST",
            "/v1/services/api/instances/a/health",
            r#"{"health_score":1.5}"#.into(),
            "health_score",
        ),
        (
            "PUT",
            "/v1/services/api/strategy",
            r#"{"strategy":"fastest"}"#.into(),
            "strategy",
        ),
    ];
    for (method, path, body, field) in bad {
        let (status, resp) = admin(adm, method, path, Some(TOKEN), Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {resp}");
        let v: Value = serde_json::from_str(&resp).unwrap();
        if field == "invalid JSON" {
            assert!(v["error"].as_str().unwrap().contains(field), "{resp}");
        } else {
            assert_eq!(v["field"], field, "{body}: {resp}");
        }
        assert_eq!(essence(&service(adm).await), before);
    }
    let big = format!(r#"{{"address":"{}","port":80}}"#, "a".repeat(65 * 1024));
    let (status, _) = admin(
        adm,
        "PUT",
        "/v1/services/api/instances/x",
        Some(TOKEN),
        Some(big),
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(
        admin(adm, "GET", "/v1/services/nope", Some(TOKEN), None)
            .await
            .0,
        404
    );

    // With the token: each route works and takes effect on the next request.
    let (status, resp) = admin(
        adm,
        "PUT",
        "/v1/services/api/instances/b",
        Some(TOKEN),
        Some(put_b),
    )
    .await;
    assert_eq!(status, 201, "{resp}");
    // On one connection: one worker's rotation (two connections may land
    // on two workers that both stand on `a`).
    let mut one = OneConnection::open(lb.addr("web")).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..2 {
        seen.insert(one.get("/").await.unwrap().1);
    }
    assert!(
        seen.contains("b"),
        "a registered instance gets the next requests: {seen:?}"
    );
    let (status, _) = admin(
        adm,
        "POST",
        "/v1/services/api/instances/a/health",
        Some(TOKEN),
        Some(r#"{"health_score":0.5}"#.into()),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = admin(
        adm,
        "PUT",
        "/v1/services/api/strategy",
        Some(TOKEN),
        Some(r#"{"strategy":"p2c"}"#.into()),
    )
    .await;
    assert_eq!(status, 200);
    let v = service(adm).await;
    assert_eq!(v["strategy"], "p2c");
    let a_row = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "a")
        .unwrap()
        .clone();
    // Set to 0.5; an active check that succeeded since may have nudged it
    // up a little (a success adds a small step), never back near 1.0.
    let score = a_row["health_score"].as_f64().unwrap();
    assert!((0.5..0.55).contains(&score), "health score {score}");
    let (status, list) = admin(adm, "GET", "/v1/services", Some(TOKEN), None).await;
    assert_eq!(status, 200);
    assert!(list.contains("\"panic\""), "{list}");
    remove_now(adm, "b").await;
    assert_eq!(service(adm).await["instances"].as_array().unwrap().len(), 1);
    assert_eq!(admin(adm, "GET", "/healthz", None, None).await.0, 200);
    assert_eq!(admin(adm, "GET", "/readyz", None, None).await.0, 200);
}

/// Without the right token, every `/v1` request gets 401 whatever else is
/// wrong with it: a 415, 413, 400 or 404 would tell an unauthenticated
/// caller how far its request got. With the token, each case gets its own
/// refusal (so each really is wrong in another way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_gets_401_before_any_other_check() {
    let a = Backend::start("a").await;
    let lb = start_with_token(&[&a]);
    let adm = lb.addr("admin");
    let before = essence(&service(adm).await);
    let good = r#"{"address":"127.0.0.1","port":80}"#;
    let big = format!(r#"{{"address":"{}","port":80}}"#, "a".repeat(65 * 1024));
    let (json, text) = (Some("application/json"), Some("text/plain"));
    let (instance, health, strategy) = (
        "/v1/services/api/instances/x",
        "/v1/services/api/instances/a/health",
        "/v1/services/api/strategy",
    );
    // (what is wrong besides the token, method, path, content type, body,
    // the status it gets with the right token)
    #[rustfmt::skip]
    let cases = [
        ("no content type", "PUT", instance, None, good, 415),
        ("text/plain", "PUT", instance, text, good, 415),
        ("no content type", "POST", health, None, r#"{"health_score":0.1}"#, 415),
        ("text/plain", "PUT", strategy, text, r#"{"strategy":"p2c"}"#, 415),
        ("a body over 64 KiB", "PUT", instance, json, big.as_str(), 413),
        ("bad JSON", "PUT", instance, json, "{not json", 400),
        ("bad JSON", "POST", health, json, "{not json", 400),
        ("a bad field", "PUT", instance, json, r#"{"address":"127.0.0.1","port":0}"#, 400),
        ("a bad drain", "DELETE", "/v1/services/api/instances/a?drain=soon", None, "", 400),
        ("unknown service", "PUT", "/v1/services/nope/instances/x", json, good, 404),
        ("unknown service", "PUT", "/v1/services/nope/strategy", json, r#"{"strategy":"p2c"}"#, 404),
        ("unknown service", "DELETE", "/v1/services/nope/instances/x", None, "", 404),
        ("unknown service", "GET", "/v1/services/nope", None, "", 404),
        ("unknown instance", "POST", "/v1/services/api/instances/nope/health", json, r#"{"health_score":0.1}"#, 404),
    ];
    let right = format!("Bearer {TOKEN}");
    for (wrong, method, path, content_type, body, with_token) in &cases {
        for auth in [
            None,
            Some("Bearer wrong-token"),
            Some("Basic s3cret-token"),
            Some(right.as_str()),
        ] {
            let mut headers = Vec::new();
            if let Some(a) = auth {
                headers.push(("authorization", a));
            }
            if let Some(ct) = content_type {
                headers.push(("content-type", *ct));
            }
            let (status, resp) = request(adm, method, path, &headers, body.to_string()).await;
            let want = if auth == Some(right.as_str()) {
                *with_token
            } else {
                assert!(
                    resp.contains("bearer token"),
                    "{method} {path} with {wrong}: the 401 says only that: {resp}"
                );
                401
            };
            assert_eq!(
                status, want,
                "{method} {path} with {wrong} and authorization {auth:?}: {resp}"
            );
        }
    }
    assert_eq!(
        essence(&service(adm).await),
        before,
        "a refused request changed state"
    );
}

/// The auth scheme is case-insensitive (RFC 9110 §11.1); the token is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_and_the_token_is_not() {
    let a = Backend::start("a").await;
    let lb = start_with_token(&[&a]);
    let adm = lb.addr("admin");
    let upper = TOKEN.to_ascii_uppercase();
    for (scheme, token, want) in [
        ("Bearer", TOKEN, 200),
        ("bearer", TOKEN, 200),
        ("BEARER", TOKEN, 200),
        ("bEaReR", TOKEN, 200),
        ("Bearer", upper.as_str(), 401),
        ("bearer", upper.as_str(), 401),
        ("Bearers", TOKEN, 401),
    ] {
        let auth = format!("{scheme} {token}");
        let (status, resp) = request(
            adm,
            "GET",
            "/v1/services",
            &[("authorization", &auth)],
            String::new(),
        )
        .await;
        assert_eq!(status, want, "authorization {auth:?}: {resp}");
    }
    let auth = format!("bearer {TOKEN}");
    let (status, resp) = request(
        adm,
        "PUT",
        "/v1/services/api/strategy",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        r#"{"strategy":"p2c"}"#.into(),
    )
    .await;
    assert_eq!(status, 200, "a lower-case scheme may change state: {resp}");
    assert_eq!(service(adm).await["strategy"], "p2c");
}

/// Instance ids are checked where they enter: an id that could not be an
/// etcd key segment, or would break a log line or a metric label, gets 400
/// naming `id`, and nothing is registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_ids_outside_the_allowed_set_get_400_naming_id() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    // No active checks: the state compared below includes health scores,
    // which a probe timing out on a loaded machine would change.
    let lb = Lb::start(&without_checks(&config(&[&a], None).0));
    let adm = lb.addr("admin");
    let before = essence(&service(adm).await);
    let body = format!(r#"{{"address":"127.0.0.1","port":{}}}"#, b.addr.port());
    // Percent-encoded in the path; the handler sees them decoded.
    for id in [
        "a%2Fb",
        "..%2F..%2Fetc",
        "%2F",
        "%2E%2E",
        "%2E",
        "a%0Ab",
        "a%0D%0Ainjected%3D1",
        "a%00b",
        "a%20b",
        "a%22b",
        "caf%C3%A9",
    ] {
        let path = format!("/v1/services/api/instances/{id}");
        let (status, resp) = admin(adm, "PUT", &path, Some(TOKEN), Some(body.clone())).await;
        assert_eq!(status, 400, "id {id:?}: {resp}");
        let v: Value = serde_json::from_str(&resp).unwrap();
        assert_eq!(v["field"], "id", "id {id:?}: {resp}");
        assert_eq!(
            essence(&service(adm).await),
            before,
            "id {id:?} changed state"
        );
    }
    // Every allowed character (letters, digits and `._:-@`) is accepted.
    let ok = "Api-1.b_c:8080@zone-A";
    let path = format!("/v1/services/api/instances/{ok}");
    let (status, resp) = admin(adm, "PUT", &path, Some(TOKEN), Some(body)).await;
    assert_eq!(status, 201, "{resp}");
    let ids = ids(adm).await;
    assert!(ids.contains(&Value::from(ok)), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_with_drain_lets_in_flight_requests_finish() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let lb = start_with_token(&[&a, &b]);
    let (adm, web) = (lb.addr("admin"), lb.addr("web"));
    b.set_delay(Duration::from_millis(800));
    // Round robin: one of two requests lands on the slow b.
    let reqs: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { get(&client(), web, "/").await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, resp) = admin(
        adm,
        "DELETE",
        "/v1/services/api/instances/b?drain=5s",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 202, "{resp}");
    // While draining, new requests go to a only.
    for _ in 0..4 {
        assert_eq!(get(&client(), web, "/").await.unwrap().1, "a");
    }
    let mut bodies: Vec<String> = Vec::new();
    for r in reqs {
        let (status, body) = r.await.unwrap().unwrap();
        assert_eq!(
            status, 200,
            "an in-flight request on the draining instance failed"
        );
        bodies.push(body);
    }
    assert!(bodies.contains(&"b".to_owned()), "{bodies:?}");
    // Removed once idle (maintain runs every 100 ms).
    let t = Instant::now();
    loop {
        let ids = ids(adm).await;
        if ids == [Value::from("a")] {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "b not removed after its drain: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn metric_value(
    samples: &[prometheus_parse::Sample],
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

async fn scrape(adm: std::net::SocketAddr) -> Vec<prometheus_parse::Sample> {
    scrape_with_text(adm).await.0.samples
}

/// The parsed scrape and its text.
pub(crate) async fn scrape_with_text(
    adm: std::net::SocketAddr,
) -> (prometheus_parse::Scrape, String) {
    let (status, text) = admin(adm, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    (parsed, text)
}

/// Every family SPEC §3 "Metrics" names (and the discovery families of
/// `metrics.rs`), with its type.
const FAMILIES: &[(&str, &str)] = &[
    ("datapunk_lb_requests_total", "counter"),
    ("datapunk_lb_request_duration_seconds", "histogram"),
    ("datapunk_lb_active_connections", "gauge"),
    ("datapunk_lb_instance_health_score", "gauge"),
    ("datapunk_lb_circuit_state", "gauge"),
    ("datapunk_lb_circuit_transitions_total", "counter"),
    ("datapunk_lb_selections_total", "counter"),
    ("datapunk_lb_retries_total", "counter"),
    ("datapunk_lb_health_checks_total", "counter"),
    ("datapunk_lb_panic_mode", "gauge"),
    ("datapunk_lb_instances", "gauge"),
    ("datapunk_lb_config_reloads_total", "counter"),
    ("datapunk_lb_discovery_stale", "gauge"),
    ("datapunk_lb_discovery_syncs_total", "counter"),
    ("datapunk_lb_discovery_invalid_values_total", "counter"),
    ("datapunk_lb_accept_errors_total", "counter"),
    ("datapunk_lb_instance_series_limited", "gauge"),
    (
        "datapunk_lb_instance_health_score_distribution",
        "histogram",
    ),
    ("datapunk_lb_access_log_dropped_total", "counter"),
];

/// Alerts and `rate()` need a series before its first event: the first
/// scrape of a fresh node lists every family, and the known label sets of
/// the event counters at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_is_listed_from_the_first_scrape() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let lb = start_with_token(&[&a, &b]);
    let (scrape, text) = scrape_with_text(lb.addr("admin")).await;
    for (family, kind) in FAMILIES {
        // OpenMetrics names a counter's family without its `_total` suffix.
        let base = family.strip_suffix("_total").unwrap_or(family);
        assert!(
            text.lines().any(|l| l == format!("# TYPE {base} {kind}")),
            "no TYPE {kind} for {family} in the first scrape:\n{text}"
        );
        assert!(
            scrape.docs.contains_key(base),
            "no HELP for {family} in the first scrape:\n{text}"
        );
    }
    let zero = |name: &str, labels: &[(&str, &str)]| {
        assert_eq!(
            metric_value(&scrape.samples, name, labels),
            Some(0.0),
            "{name} {labels:?} at 0 from the first scrape:\n{text}"
        );
    };
    for result in ["success", "failure"] {
        zero("datapunk_lb_config_reloads_total", &[("result", result)]);
        zero("datapunk_lb_discovery_syncs_total", &[("result", result)]);
    }
    for (from, to) in [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
        ("half_open", "open"),
    ] {
        zero(
            "datapunk_lb_circuit_transitions_total",
            &[("service", "api"), ("from", from), ("to", to)],
        );
    }
    zero("datapunk_lb_retries_total", &[("service", "api")]);
    zero("datapunk_lb_discovery_invalid_values_total", &[]);
    zero("datapunk_lb_instance_series_limited", &[("service", "api")]);
    zero("datapunk_lb_access_log_dropped_total", &[]);
    // Both backends pass their checks: failures stay at 0, listed.
    zero(
        "datapunk_lb_health_checks_total",
        &[("service", "api"), ("result", "failure")],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_parseable_complete_and_move() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let lb = start_with_token(&[&a, &b]);
    let (adm, web) = (lb.addr("admin"), lb.addr("web"));
    let c = client();
    let mut answered_by_a = 0.0;
    for _ in 0..10 {
        let (status, body) = get(&c, web, "/").await.unwrap();
        assert_eq!(status, 200);
        answered_by_a += f64::from(u8::from(body == "a"));
    }
    let samples = scrape(adm).await;
    let names: std::collections::HashSet<&str> =
        samples.iter().map(|s| s.metric.as_str()).collect();
    for family in [
        "datapunk_lb_requests_total",
        "datapunk_lb_request_duration_seconds",
        "datapunk_lb_active_connections",
        "datapunk_lb_instance_health_score",
        "datapunk_lb_circuit_state",
        "datapunk_lb_selections_total",
        "datapunk_lb_panic_mode",
        "datapunk_lb_instances",
    ] {
        assert!(names.contains(family), "{family} missing from {names:?}");
    }
    let ok_a = metric_value(
        &samples,
        "datapunk_lb_requests_total",
        &[("instance", "a"), ("outcome", "success")],
    )
    .unwrap();
    // What the client saw (round robin sends 5 of 10 to a unless a probe
    // timing out on a loaded machine halved a health score, which round
    // robin follows; the exact split is tested in `proxy`).
    assert_eq!(
        ok_a, answered_by_a,
        "a's successes: the metric and the client"
    );
    assert!(answered_by_a >= 1.0, "round robin never chose a");
    assert_eq!(
        metric_value(&samples, "datapunk_lb_circuit_state", &[("instance", "b")]),
        Some(0.0)
    );

    // b dies; traffic trips its breaker: state 2 and a counted transition.
    // Round robin admits b in proportion to its health score, which each
    // failure halves, so how many requests it takes to reach the threshold
    // varies (a probe timing out on a loaded machine had lowered it too):
    // send until the gauge says open.
    b.kill().await;
    let t = Instant::now();
    let samples = loop {
        for _ in 0..10 {
            let _ = get(&c, web, "/").await;
        }
        let samples = scrape(adm).await;
        let state = metric_value(&samples, "datapunk_lb_circuit_state", &[("instance", "b")]);
        if state == Some(2.0) {
            break samples;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "b's breaker not open after its death: state {state:?}"
        );
    };
    let trips = metric_value(
        &samples,
        "datapunk_lb_circuit_transitions_total",
        &[("from", "closed"), ("to", "open")],
    )
    .unwrap();
    assert!(trips >= 1.0);
    assert!(
        metric_value(&samples, "datapunk_lb_retries_total", &[("service", "api")]).unwrap() >= 1.0
    );
    // Active checks (every 100 ms) are counted by result; b's now fail.
    let t = Instant::now();
    loop {
        let samples = scrape(adm).await;
        let failed = metric_value(
            &samples,
            "datapunk_lb_health_checks_total",
            &[("result", "failure")],
        )
        .unwrap_or(0.0);
        let passed = metric_value(
            &samples,
            "datapunk_lb_health_checks_total",
            &[("result", "success")],
        )
        .unwrap_or(0.0);
        if failed >= 1.0 && passed >= 1.0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "health checks not counted: {failed} failed, {passed} passed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_errors = metric_value(
        &samples,
        "datapunk_lb_requests_total",
        &[("instance", "b"), ("outcome", "connect")],
    )
    .unwrap();
    assert!(connect_errors >= 1.0);
    // A removed instance leaves no series behind.
    remove_now(adm, "b").await;
    let samples = scrape(adm).await;
    assert!(
        samples
            .iter()
            .all(|s| s.labels.get("instance") != Some("b")),
        "stale series for b"
    );
    // Reloads are counted.
    lb.signal("HUP");
    lb.wait_log("reload", Duration::from_secs(15), |v| {
        v["result"] == "success"
    })
    .await;
    let samples = scrape(adm).await;
    assert_eq!(
        metric_value(
            &samples,
            "datapunk_lb_config_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_survive_restarts_and_corrupt_state_is_moved_aside() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let state = temp_path("state.json");
    let (cfg, _token) = config(&[&a], Some(&state));
    {
        let lb = Lb::start(&cfg);
        let body = format!(
            r#"{{"address":"127.0.0.1","port":{},"weight":3}}"#,
            b.addr.port()
        );
        let (status, resp) = admin(
            lb.addr("admin"),
            "PUT",
            "/v1/services/api/instances/b",
            Some(TOKEN),
            Some(body),
        )
        .await;
        assert_eq!(status, 201, "{resp}");
        let (status, _) = admin(
            lb.addr("admin"),
            "PUT",
            "/v1/services/api/strategy",
            Some(TOKEN),
            Some(r#"{"strategy":"weighted"}"#.into()),
        )
        .await;
        assert_eq!(status, 200);
    }
    let lb = Lb::start(&cfg);
    let v = service(lb.addr("admin")).await;
    assert_eq!(
        v["strategy"], "weighted",
        "strategy change survives a restart"
    );
    let b_row = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "b")
        .cloned();
    assert_eq!(b_row.expect("b survives a restart")["weight"], 3);
    drop(lb);

    std::fs::write(&state, "{ this is not json").unwrap();
    let lb = Lb::start(&cfg);
    lb.wait_log("corrupt state report", Duration::from_secs(5), |v| {
        v["error"].as_str().is_some_and(|e| e.contains("corrupt"))
    })
    .await;
    let v = service(lb.addr("admin")).await;
    assert_eq!(
        v["instances"].as_array().unwrap().len(),
        1,
        "starts from the config alone"
    );
    let dir = state.parent().unwrap();
    let name = state.file_name().unwrap().to_string_lossy().into_owned();
    let moved = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}.corrupt-"))
        });
    assert!(moved, "the corrupt file is moved aside, not deleted");
}
