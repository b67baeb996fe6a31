//! The precedence of the three sources end to end, on a real etcd: config
//! file < admin API changes of the state file < etcd. With a state-file
//! override or removal in force, an etcd key of the same id leaving brings
//! back the override, or nothing, never the config's version.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::etcd::{bodies, etcd_bin, etcd_client, Etcd, PREFIX};
use crate::support::*;

/// `id → (port, draining)` of the node's `api` instances.
async fn instances(lb: &Lb) -> std::collections::BTreeMap<String, (u64, bool)> {
    let (status, body) = admin(lb.addr("admin"), "GET", "/v1/services/api", None, None).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_owned(),
                (
                    i["port"].as_u64().unwrap(),
                    i["draining"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

/// Polls until `check` holds for the node's instances, or panics after 5 s.
async fn until(
    lb: &Lb,
    what: &str,
    check: impl Fn(&std::collections::BTreeMap<String, (u64, bool)>) -> bool,
) {
    let t = Instant::now();
    loop {
        let now = instances(lb).await;
        if check(&now) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_key_leaving_brings_back_the_state_file_layer_not_the_config() {
    let Some(bin) = etcd_bin() else {
        return;
    };
    let etcd = Etcd::start(&bin).await;
    let port = |b: &Backend| u64::from(b.addr.port());
    let (base, old, over, from_etcd) = (
        Backend::start("base").await,
        Backend::start("old").await,
        Backend::start("override").await,
        Backend::start("etcd").await,
    );
    // The state file: `base` overridden (to the `override` backend), `old`
    // removed, as admin API changes made earlier would have left it.
    let state = temp_path("state.json");
    std::fs::write(
        &state,
        format!(
            r#"{{"version":1,"services":{{"api":{{"instances":{{"base":{{"address":"127.0.0.1","port":{}}}}},"removed":["old"]}}}}}}"#,
            over.addr.port()
        ),
    )
    .unwrap();
    let config = format!(
        r#"{WEB_TO_API}
[service.api]
strategy = "round_robin"
slow_start = "0s"
[service.api.health_check]
kind = "none"
[[service.api.instance]]
id = "base"
address = "127.0.0.1"
port = {}
[[service.api.instance]]
id = "old"
address = "127.0.0.1"
port = {}

[admin]
listen = "127.0.0.1:0"
state_file = "{}"

[discovery]
kind = "etcd"
endpoints = ["{}"]
prefix = "{PREFIX}"
"#,
        base.addr.port(),
        old.addr.port(),
        state.display(),
        etcd.url()
    );
    let lb = Lb::start(&config);
    let t = Instant::now();
    while admin(lb.addr("admin"), "GET", "/readyz", None, None)
        .await
        .0
        != 200
    {
        assert!(t.elapsed() < Duration::from_secs(10), "node not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start: Vec<(String, u64)> = instances(&lb)
        .await
        .into_iter()
        .map(|(id, (p, _))| (id, p))
        .collect();
    assert_eq!(
        start,
        vec![("base".to_owned(), port(&over))],
        "state file over config"
    );

    // etcd over both: keys for `base` and `old`, both to the `etcd` backend.
    let mut etcd_c = etcd_client(&etcd.url()).await;
    let value = format!(
        r#"{{"address":"127.0.0.1","port":{}}}"#,
        from_etcd.addr.port()
    );
    for id in ["base", "old"] {
        etcd_c
            .put(format!("{PREFIX}api/{id}"), value.clone(), 0)
            .await
            .unwrap();
    }
    let want = port(&from_etcd);
    until(&lb, "etcd keys over the state file", |m| {
        m.get("base") == Some(&(want, false)) && m.get("old") == Some(&(want, false))
    })
    .await;

    // The keys leave: `base` is the state file's override again, `old`
    // stays removed (it drains), and the config's versions never return.
    for id in ["base", "old"] {
        etcd_c.delete(format!("{PREFIX}api/{id}")).await.unwrap();
    }
    let over_port = port(&over);
    until(&lb, "keys left: the state file layer back", |m| {
        m.get("base") == Some(&(over_port, false))
            && m.get("old").is_none_or(|(_, draining)| *draining)
    })
    .await;
    let seen = bodies(&lb, 12).await;
    assert!(
        seen.iter().all(|b| b == "override"),
        "only the override serves: {seen:?}"
    );

    // A reload agrees with what the discovery path left.
    lb.signal("HUP");
    lb.wait_log("reload", Duration::from_secs(5), |v| {
        v["message"] == "reload" && v["result"] == "success"
    })
    .await;
    let after: Vec<(String, u64)> = instances(&lb)
        .await
        .into_iter()
        .filter(|(_, (_, draining))| !draining)
        .map(|(id, (p, _))| (id, p))
        .collect();
    assert_eq!(after, vec![("base".to_owned(), port(&over))]);
    let _ = std::fs::remove_file(&state);
}
