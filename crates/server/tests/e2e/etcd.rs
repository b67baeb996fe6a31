//! etcd discovery with a real etcd server (started here on free ports with a
//! temp data dir, stopped by pid) and two real balancer nodes: shared
//! registrations (sidecar and admin API), lease expiry, SIGTERM revocation,
//! an etcd outage with changes made meanwhile, a sidecar whose lease is
//! gone, bad values. Without etcd
//! installed these tests skip with a printed reason (they fail instead under
//! `DATAPUNK_LB_REQUIRE_ALL=1`). The etcd process harness is in
//! `support/etcd.rs`.
//!
//! The measurements for `docs/benchmarks.md` ("etcd discovery") are not
//! here but in `bench/etcd_discovery.rs`: `cargo bench -p datapunk-lb --bench
//! etcd_discovery`.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::etcd::*;
use crate::support::*;

/// `(id, draining)` of the node's `api` instances.
async fn instances(lb: &Lb) -> Vec<(String, bool)> {
    let (status, body) = admin(lb.addr("admin"), "GET", "/v1/services/api", None, None).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let mut out: Vec<(String, bool)> = v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_owned(),
                i["draining"].as_bool().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Live ids (not draining).
async fn live(lb: &Lb) -> Vec<String> {
    instances(lb)
        .await
        .into_iter()
        .filter(|(_, d)| !d)
        .map(|(id, _)| id)
        .collect()
}

async fn metric(lb: &Lb, name: &str) -> Option<f64> {
    let (_, text) = admin(lb.addr("admin"), "GET", "/metrics", None, None).await;
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until `id` is gone from (or draining on) both nodes; returns when.
async fn until_gone(nodes: [&Lb; 2], id: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let mut gone = true;
        for n in nodes {
            gone &= !live(n).await.iter().any(|i| i == id);
        }
        if gone {
            return t.elapsed();
        }
        assert!(t.elapsed() < limit, "{id} still live after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_two_nodes_share_sidecar_and_admin_registrations() {
    let Some(bin) = etcd_bin() else { return };
    let etcd = Etcd::start(&bin).await;
    let base = Backend::start("base").await;
    let (s1, s2, adm) = (
        Backend::start("side-1").await,
        Backend::start("side-2").await,
        Backend::start("adm").await,
    );
    let n1 = start_node(&base, &etcd.url()).await;
    let n2 = start_node(&base, &etcd.url()).await;

    // 1. A sidecar registration reaches both nodes within 1 s of the put.
    let side1 = Sidecar::start(&etcd.url(), "side-1", &s1, "2s");
    let put_at = side1.registered().await;
    for n in [&n1, &n2] {
        until_routes(n, "side-1", true, Duration::from_secs(5)).await;
        let took = put_at.elapsed();
        assert!(took < Duration::from_secs(1), "proxied after {took:?}");
    }

    // 2. SIGKILL: nothing revokes the lease; it expires within the TTL (2 s)
    // and the instance leaves both nodes by TTL + 1 s, not at once.
    side1.signal("KILL");
    let killed = Instant::now();
    until_gone([&n1, &n2], "side-1", Duration::from_secs(3)).await;
    let took = killed.elapsed();
    assert!(
        took > Duration::from_millis(500) && took < Duration::from_secs(3),
        "lease expiry after {took:?}"
    );
    for n in [&n1, &n2] {
        until_routes(n, "side-1", false, Duration::from_secs(1)).await;
    }

    // 3. SIGTERM: the sidecar revokes its lease (TTL 30 s): gone at once, exit 0.
    let mut side2 = Sidecar::start(&etcd.url(), "side-2", &s2, "30s");
    side2.registered().await;
    for n in [&n1, &n2] {
        until_routes(n, "side-2", true, Duration::from_secs(1)).await;
    }
    side2.signal("TERM");
    let termed = Instant::now();
    until_gone([&n1, &n2], "side-2", Duration::from_secs(1)).await;
    for n in [&n1, &n2] {
        until_routes(n, "side-2", false, Duration::from_secs(1)).await;
    }
    let took = termed.elapsed();
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    assert!(side2.wait_exit().success());
    assert!(side2
        .log
        .lock()
        .iter()
        .any(|(_, v)| v["message"] == "register: lease revoked; instance deregistered"));

    // 4. The admin API of one node writes to etcd: both nodes serve it.
    let put = Instant::now();
    let (status, body) = admin(
        n1.addr("admin"),
        "PUT",
        "/v1/services/api/instances/adm",
        None,
        Some(value(&adm, 2)),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    for n in [&n1, &n2] {
        until_routes(n, "adm", true, Duration::from_secs(1)).await;
    }
    assert!(put.elapsed() < Duration::from_secs(1));
    let mut etcd_c = etcd_client(&etcd.url()).await;
    let kv = etcd_c.get(format!("{PREFIX}api/adm")).await.unwrap();
    let stored: Value = serde_json::from_slice(&kv.kvs[0].value).unwrap();
    assert_eq!(
        (stored["port"].as_u64(), stored["weight"].as_u64()),
        (Some(u64::from(adm.addr.port())), Some(2))
    );
    assert_eq!(kv.kvs[0].lease, 0, "admin registrations have no lease");
    // Updating keeps the id (200, not 201); deleting through the other node
    // removes it from both.
    let (status, _) = admin(
        n2.addr("admin"),
        "PUT",
        "/v1/services/api/instances/adm",
        None,
        Some(value(&adm, 3)),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = admin(
        n2.addr("admin"),
        "DELETE",
        "/v1/services/api/instances/adm?drain=0s",
        None,
        None,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    until_gone([&n1, &n2], "adm", Duration::from_secs(1)).await;
    assert!(etcd_c
        .get(format!("{PREFIX}api/adm"))
        .await
        .unwrap()
        .kvs
        .is_empty());
    // The static instance never moved.
    for n in [&n1, &n2] {
        assert_eq!(live(n).await, vec!["base".to_owned()]);
        assert_eq!(metric(n, "datapunk_lb_discovery_stale").await, Some(0.0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_the_last_set_and_resyncs_every_change() {
    let Some(bin) = etcd_bin() else { return };
    let mut etcd = Etcd::start(&bin).await;
    let base = Backend::start("base").await;
    let (b1, b2, b3) = (
        Backend::start("x-1").await,
        Backend::start("x-2").await,
        Backend::start("x-3").await,
    );
    {
        let mut c = etcd_client(&etcd.url()).await;
        c.put(format!("{PREFIX}api/x-1"), value(&b1, 1), 0)
            .await
            .unwrap();
        c.put(format!("{PREFIX}api/x-2"), value(&b2, 1), 0)
            .await
            .unwrap();
    }
    let n1 = start_node(&base, &etcd.url()).await;
    let n2 = start_node(&base, &etcd.url()).await;
    for n in [&n1, &n2] {
        assert_eq!(live(n).await, vec!["base", "x-1", "x-2"]);
    }

    // etcd goes away: both nodes say so and keep serving the last set.
    etcd.stop();
    for n in [&n1, &n2] {
        n.wait_log("discovery stale", Duration::from_secs(10), |v| {
            v["message"] == "discovery stale: serving the last instance set seen"
                && v["to"] == "stale"
        })
        .await;
        assert_eq!(metric(n, "datapunk_lb_discovery_stale").await, Some(1.0));
        assert_eq!(
            admin(n.addr("admin"), "GET", "/readyz", None, None).await.0,
            200,
            "ready stays ready through an outage"
        );
    }
    for n in [&n1, &n2] {
        let seen = bodies(n, 30).await;
        for who in ["base", "x-1", "x-2"] {
            assert!(seen.iter().any(|b| b == who), "{who} not served: {seen:?}");
        }
        assert!(
            seen.iter()
                .all(|b| ["base", "x-1", "x-2"].contains(&b.as_str())),
            "{seen:?}"
        );
    }

    // Meanwhile etcd changes where the nodes cannot see it: the same member
    // (same data dir) on a client port they do not know.
    {
        let (mut other, port) = etcd.same_data_other_port().await;
        let mut c = etcd_client(&format!("http://127.0.0.1:{port}")).await;
        c.delete(format!("{PREFIX}api/x-1")).await.unwrap();
        c.put(format!("{PREFIX}api/x-2"), value(&b2, 7), 0)
            .await
            .unwrap();
        c.put(format!("{PREFIX}api/x-3"), value(&b3, 1), 0)
            .await
            .unwrap();
        drop(c);
        stop_by_pid(&mut other);
    }
    // Still the old set while etcd is away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in [&n1, &n2] {
        assert_eq!(live(n).await, vec!["base", "x-1", "x-2"]);
    }

    // etcd returns: both nodes converge to the new set.
    etcd.start_again().await;
    let back = Instant::now();
    for n in [&n1, &n2] {
        n.wait_log("discovery resynced", Duration::from_secs(15), |v| {
            v["message"] == "discovery resynced"
        })
        .await;
        let t = Instant::now();
        while live(n).await != vec!["base", "x-2", "x-3"] {
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", live(n).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        until_routes(n, "x-3", true, Duration::from_secs(2)).await;
        until_routes(n, "x-1", false, Duration::from_secs(2)).await;
        let (_, body) = admin(n.addr("admin"), "GET", "/v1/services/api", None, None).await;
        let v: Value = serde_json::from_str(&body).unwrap();
        let x2 = v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == "x-2")
            .unwrap();
        assert_eq!(x2["weight"], 7, "the update made during the outage");
        assert_eq!(metric(n, "datapunk_lb_discovery_stale").await, Some(0.0));
    }
    eprintln!("converged {:?} after etcd came back", back.elapsed());
}

/// Waits (up to `limit`) until the sidecar has logged `message` `n` times.
async fn until_logged(side: &Sidecar, message: &str, n: usize, limit: Duration) {
    let t = Instant::now();
    loop {
        let seen = side
            .log
            .lock()
            .iter()
            .filter(|(_, v)| v["message"] == message)
            .count();
        if seen >= n {
            return;
        }
        assert!(
            t.elapsed() < limit,
            "sidecar logged {message:?} {seen} times, not {n}, within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The lease of `key`, read from etcd.
async fn lease_of(url: &str, key: &str) -> i64 {
    let kv = etcd_client(url).await.get(key).await.unwrap();
    kv.kvs.first().map(|kv| kv.lease).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_sidecar_grants_a_new_lease_when_its_lease_is_gone() {
    let Some(bin) = etcd_bin() else { return };
    let mut etcd = Etcd::start(&bin).await;
    let base = Backend::start("base").await;
    let s1 = Backend::start("side-1").await;
    let key = format!("{PREFIX}api/side-1");
    let n = start_node(&base, &etcd.url()).await;
    let side = Sidecar::start(&etcd.url(), "side-1", &s1, "3s");
    side.registered().await;
    until_routes(&n, "side-1", true, Duration::from_secs(2)).await;
    let first = lease_of(&etcd.url(), &key).await;
    assert_ne!(first, 0, "the sidecar's key has a lease");

    // 1. While the sidecar cannot reach etcd, its lease is revoked (through
    // a client port it does not know). When etcd is back, its keep-alive for
    // the old lease is refused: it grants a new lease and puts the key again.
    etcd.stop();
    until_logged(
        &side,
        "register: etcd unreachable; retrying",
        1,
        Duration::from_secs(5),
    )
    .await;
    {
        let (mut other, port) = etcd.same_data_other_port().await;
        let url = format!("http://127.0.0.1:{port}");
        let mut c = etcd_client(&url).await;
        c.lease_revoke(first).await.unwrap();
        assert!(c.get(key.as_str()).await.unwrap().kvs.is_empty());
        drop(c);
        stop_by_pid(&mut other);
    }
    etcd.start_again().await;
    until_logged(
        &side,
        "register: lease expired; granting a new one",
        1,
        Duration::from_secs(15),
    )
    .await;
    until_logged(
        &side,
        "register: instance registered",
        2,
        Duration::from_secs(5),
    )
    .await;
    let second = lease_of(&etcd.url(), &key).await;
    assert!(second != 0 && second != first, "{first:x} then {second:x}");
    until_routes(&n, "side-1", true, Duration::from_secs(10)).await;

    // 2. The lease is revoked under a connected sidecar: its next renewal
    // (every ttl/3 = 1 s) sees it gone and it registers again at once.
    etcd_client(&etcd.url())
        .await
        .lease_revoke(second)
        .await
        .unwrap();
    until_logged(
        &side,
        "register: instance registered",
        3,
        Duration::from_secs(5),
    )
    .await;
    let third = lease_of(&etcd.url(), &key).await;
    assert!(third != 0 && third != second, "{second:x} then {third:x}");
    until_routes(&n, "side-1", true, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_bad_values_are_skipped_and_reported() {
    let Some(bin) = etcd_bin() else { return };
    let etcd = Etcd::start(&bin).await;
    let base = Backend::start("base").await;
    let good = Backend::start("good").await;
    let mut c = etcd_client(&etcd.url()).await;
    // Bad entries already there at the first list ...
    let at_list = [
        ("api/not-json", "{not json".to_owned()),
        (
            "api/port-0",
            r#"{"address":"127.0.0.1","port":0}"#.to_owned(),
        ),
    ];
    c.put(format!("{PREFIX}api/good"), value(&good, 1), 0)
        .await
        .unwrap();
    for (k, v) in &at_list {
        c.put(format!("{PREFIX}{k}"), v.clone(), 0).await.unwrap();
    }
    let n = start_node(&base, &etcd.url()).await;
    assert_eq!(live(&n).await, vec!["base", "good"]);
    // ... and arriving through the watch, including a bad overwrite of a
    // good key, a key of the wrong shape and a service not in the config.
    let watched = [
        (
            "api/heavy",
            format!(
                r#"{{"address":"127.0.0.1","port":{},"weight":5000}}"#,
                good.addr.port()
            ),
        ),
        ("api/a/b", value(&good, 1)),
        ("api/good", "[1, 2]".to_owned()),
        (
            "api/typo",
            r#"{"address":"127.0.0.1","prot":80}"#.to_owned(),
        ),
    ];
    for (k, v) in &watched {
        c.put(format!("{PREFIX}{k}"), v.clone(), 0).await.unwrap();
    }
    c.put(format!("{PREFIX}other/x"), value(&good, 1), 0)
        .await
        .unwrap();
    for (k, _) in at_list.iter().chain(watched.iter()) {
        let key = format!("{PREFIX}{k}");
        n.wait_log(
            &format!("invalid value at {key}"),
            Duration::from_secs(5),
            |v| {
                v["message"] == "discovery: skipping invalid etcd entry" && v["key"] == key.as_str()
            },
        )
        .await;
    }
    n.wait_log("unknown service", Duration::from_secs(5), |v| {
        v["service"] == "other" && v["reason"] == "service not in the config"
    })
    .await;
    assert_eq!(
        metric(&n, "datapunk_lb_discovery_invalid_values_total").await,
        Some(6.0)
    );
    // The valid instances keep serving, `good` with its last valid value.
    assert_eq!(live(&n).await, vec!["base", "good"]);
    let seen = bodies(&n, 10).await;
    assert_eq!(seen.iter().filter(|b| *b == "good").count(), 5, "{seen:?}");
    assert_eq!(seen.iter().filter(|b| *b == "base").count(), 5, "{seen:?}");
    // A fixed value is picked up.
    c.put(format!("{PREFIX}api/port-0"), value(&good, 1), 0)
        .await
        .unwrap();
    let t = Instant::now();
    while live(&n).await != vec!["base", "good", "port-0"] {
        assert!(t.elapsed() < Duration::from_secs(2));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_reload_keeps_discovered_instances_and_follows_discovery_changes() {
    let Some(bin) = etcd_bin() else { return };
    let etcd = Etcd::start(&bin).await;
    let base = Backend::start("base").await;
    let d1 = Backend::start("d-1").await;
    etcd_client(&etcd.url())
        .await
        .put(format!("{PREFIX}api/d-1"), value(&d1, 1), 0)
        .await
        .unwrap();
    let config = node_config(&base, &etcd.url());
    let n = start_node(&base, &etcd.url()).await;
    assert_eq!(live(&n).await, vec!["base", "d-1"]);
    let (status, body) = admin(
        n.addr("admin"),
        "POST",
        "/v1/services/api/instances/d-1/health",
        None,
        Some(r#"{"health_score":0.5}"#.into()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let health = |v: &Value| {
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == "d-1")
            .map(|i| i["health_score"].as_f64().unwrap())
    };
    let reload = |text: String| {
        std::fs::write(&n.config_path, with_free_admin(&text)).unwrap();
        n.signal("HUP");
    };
    let reloads = |n: &Lb| {
        n.log
            .lock()
            .iter()
            .filter(|v| v["message"] == "reload" && v["result"] == "success")
            .count()
    };

    // A reload that changes something else keeps the discovered instance,
    // with its live state.
    reload(config.replace("round_robin", "weighted"));
    n.wait_log("reload 1", Duration::from_secs(5), |v| {
        v["message"] == "reload" && v["result"] == "success"
    })
    .await;
    assert_eq!(live(&n).await, vec!["base", "d-1"]);
    let (_, body) = admin(n.addr("admin"), "GET", "/v1/services/api", None, None).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["strategy"], "weighted");
    assert!(health(&v).unwrap() < 0.9, "live state lost: {body}");

    // Without [discovery]: the discovered instance leaves; etcd keeps the key.
    let static_only = config.split("[discovery]").next().unwrap().to_owned();
    reload(static_only);
    let t = Instant::now();
    while live(&n).await != vec!["base"] {
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", live(&n).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The "reload" log line follows the apply; wait for the reader to see it.
    let t = Instant::now();
    while reloads(&n) != 2 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{} reloads logged",
            reloads(&n)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // And back to etcd: listed again.
    reload(config);
    let t = Instant::now();
    while live(&n).await != vec!["base", "d-1"] {
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", live(&n).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    until_routes(&n, "d-1", true, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_node_started_before_etcd_is_not_ready_until_its_first_sync() {
    let Some(bin) = etcd_bin() else { return };
    let mut etcd = Etcd::not_started(&bin);
    let base = Backend::start("base").await;
    let n = Lb::start(&node_config(&base, &etcd.url()));
    // Serving the config's instances, but not ready, and saying why.
    n.wait_log("stale from the start", Duration::from_secs(10), |v| {
        v["to"] == "stale" && v["from"] == "starting"
    })
    .await;
    assert_eq!(
        admin(n.addr("admin"), "GET", "/readyz", None, None).await.0,
        503
    );
    assert_eq!(metric(&n, "datapunk_lb_discovery_stale").await, Some(1.0));
    assert_eq!(
        bodies(&n, 2).await,
        vec!["base".to_owned(), "base".to_owned()]
    );
    etcd.start_again().await;
    let t = Instant::now();
    while admin(n.addr("admin"), "GET", "/readyz", None, None).await.0 != 200 {
        assert!(t.elapsed() < Duration::from_secs(10), "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&n, "datapunk_lb_discovery_stale").await, Some(0.0));
}

#[test]
fn etcd_discovery_config_is_validated() {
    use datapunk_lb::config::{Config, DiscoveryConfig};
    let base = "[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nservice = \"api\"\n[service.api]\n";
    let parse = |d: &str| Config::parse(&format!("{base}[discovery]\n{d}"));
    let c = parse("kind = \"etcd\"\nendpoints = [\"127.0.0.1:2379\", \"http://10.0.0.2:2379\"]\n")
        .unwrap();
    match &c.discovery {
        DiscoveryConfig::Etcd(e) => {
            assert_eq!(
                e.endpoints,
                ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]
            );
            assert_eq!(e.prefix, PREFIX);
        }
        other => panic!("{other:?}"),
    }
    for (d, want) in [
        ("kind = \"etcd\"\n", "line 8: discovery.endpoints: missing"),
        (
            "kind = \"etcd\"\nendpoints = []\n",
            "line 9: discovery.endpoints: must not be empty",
        ),
        (
            "kind = \"etcd\"\nendpoints = [\"nohost\"]\n",
            "discovery.endpoints[0]",
        ),
        ("kind = \"etcd\"\nendpoints = [\"https://a:1\"]\n", "https"),
        (
            "kind = \"etcd\"\nendpoints = [\"a:1\"]\nprefix = \"/x\"\n",
            "line 10: discovery.prefix",
        ),
        (
            "kind = \"consul\"\n",
            "line 8: discovery.kind: unknown kind",
        ),
        (
            "kind = \"static\"\nendpoints = [\"a:1\"]\n",
            "discovery.endpoints: only for kind",
        ),
        ("kind = \"etcd\"\nendpoint = [\"a:1\"]\n", "endpoint"),
    ] {
        let e = parse(d).unwrap_err().to_string();
        assert!(e.contains(want), "{d:?}: {e:?} lacks {want:?}");
    }
}
