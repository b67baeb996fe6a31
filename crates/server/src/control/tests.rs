//! The control module without sockets: commands in, what the registry holds
//! out.

use std::sync::Arc;
use std::time::Duration;

use datapunk_lb_core::{Registry, RegistryError, StrategyKind};
use parking_lot::Mutex;

use super::*;

const CONFIG: &str = "[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nservice = \"api\"\n[service.api]\nstrategy = \"round_robin\"\n[[service.api.instance]]\nid = \"a\"\naddress = \"127.0.0.1\"\nport = 1\n[[service.api.instance]]\nid = \"b\"\naddress = \"127.0.0.1\"\nport = 2\n";

fn config(text: &str) -> Config {
    Config::parse(text).unwrap()
}

fn put(id: &str, port: u16) -> Change {
    Change::Put {
        service: "api".into(),
        id: id.into(),
        spec: InstanceSpec::local(port),
    }
}

fn delete(id: &str) -> Change {
    Change::Delete {
        service: "api".into(),
        id: id.into(),
    }
}

fn delta(changes: Vec<Change>) -> Command {
    Command::Discovery(Update {
        batch: Batch::Delta(changes),
        revision: None,
    })
}

fn full(entries: Vec<Change>) -> Command {
    Command::Discovery(Update {
        batch: Batch::Full {
            entries,
            invalid: Vec::new(),
        },
        revision: None,
    })
}

fn register(id: &str, port: u16) -> Command {
    Command::Write {
        write: Write::Register {
            service: "api".into(),
            id: id.into(),
            spec: InstanceSpec::local(port),
        },
        local: false,
    }
}

fn remove(id: &str, drain: Duration) -> Command {
    Command::Write {
        write: Write::Remove {
            service: "api".into(),
            id: id.into(),
            drain,
        },
        local: false,
    }
}

/// A control over a fresh registry, with `CONFIG` applied.
async fn control() -> (Control, Arc<Registry>) {
    let registry = Arc::new(Registry::new());
    let metrics = Arc::new(Metrics::new(registry.clone()));
    let mut c = Control::new(registry.clone(), metrics, None);
    c.apply(Command::Reload(Box::new(config(CONFIG))))
        .await
        .unwrap();
    (c, registry)
}

/// The port `api/id` is registered with, if it is registered and not
/// draining.
fn serving_port(registry: &Registry, id: &str) -> Option<u16> {
    registry
        .instance("api", id)
        .ok()
        .filter(|st| !st.draining)
        .map(|st| st.instance.port())
}

#[tokio::test]
async fn each_source_overrides_the_one_below_and_a_leaving_key_falls_back_one_layer() {
    let (mut c, reg) = control().await;
    assert_eq!(serving_port(&reg, "a"), Some(1), "config");
    c.apply(register("a", 10)).await.unwrap();
    assert_eq!(serving_port(&reg, "a"), Some(10), "admin API over config");
    c.apply(delta(vec![put("a", 20)])).await.unwrap();
    assert_eq!(serving_port(&reg, "a"), Some(20), "etcd over admin API");
    let applied = c.apply(delta(vec![delete("a")])).await.unwrap();
    assert!(matches!(applied, Reply::Applied(a) if a.restored == 1));
    assert_eq!(
        serving_port(&reg, "a"),
        Some(10),
        "the key left: the override comes back, not the config's version"
    );
    // A reload agrees with what the discovery path left.
    c.apply(Command::Reload(Box::new(config(CONFIG))))
        .await
        .unwrap();
    assert_eq!(serving_port(&reg, "a"), Some(10));
}

#[tokio::test]
async fn a_removal_holds_when_an_etcd_key_of_the_same_id_leaves() {
    let (mut c, reg) = control().await;
    c.apply(remove("b", Duration::ZERO)).await.unwrap();
    assert!(reg.instance("api", "b").is_err(), "removed at once");
    c.apply(delta(vec![put("b", 30)])).await.unwrap();
    assert_eq!(serving_port(&reg, "b"), Some(30), "etcd over the removal");
    let applied = c.apply(delta(vec![delete("b")])).await.unwrap();
    assert!(matches!(applied, Reply::Applied(a) if a.removed == 1 && a.restored == 0));
    assert_eq!(
        serving_port(&reg, "b"),
        None,
        "the config's b must not come back while the removal is in force"
    );
    // Nor on the next reload (which leaves its drain to run out).
    c.apply(Command::Reload(Box::new(config(CONFIG))))
        .await
        .unwrap();
    assert_eq!(serving_port(&reg, "b"), None);
    // A registration lifts the removal.
    c.apply(register("b", 40)).await.unwrap();
    assert_eq!(serving_port(&reg, "b"), Some(40));
}

#[tokio::test]
async fn removing_an_override_of_a_config_instance_removes_the_id() {
    let (mut c, reg) = control().await;
    c.apply(register("a", 10)).await.unwrap();
    c.apply(remove("a", Duration::ZERO)).await.unwrap();
    assert!(reg.instance("api", "a").is_err());
    c.apply(Command::Reload(Box::new(config(CONFIG))))
        .await
        .unwrap();
    assert!(
        reg.instance("api", "a").is_err(),
        "the config's a stays removed after a reload"
    );
}

#[tokio::test]
async fn the_strategy_override_survives_a_reload() {
    let (mut c, reg) = control().await;
    let strategy = |reg: &Registry| reg.service("api").unwrap().config().strategy;
    assert_eq!(strategy(&reg), StrategyKind::RoundRobin);
    c.apply(Command::SetStrategy {
        service: "api".into(),
        kind: StrategyKind::LeastConnections,
    })
    .await
    .unwrap();
    assert_eq!(strategy(&reg), StrategyKind::LeastConnections);
    c.apply(Command::Reload(Box::new(config(CONFIG))))
        .await
        .unwrap();
    assert_eq!(strategy(&reg), StrategyKind::LeastConnections);
}

#[tokio::test]
async fn a_reload_keeps_live_state_by_id_and_removes_what_left() {
    let (mut c, reg) = control().await;
    c.apply(Command::SetHealth {
        service: "api".into(),
        id: "a".into(),
        score: 0.5,
    })
    .await
    .unwrap();
    let next = CONFIG.replace("port = 1\n", "port = 11\n").replace(
        "[[service.api.instance]]\nid = \"b\"\naddress = \"127.0.0.1\"\nport = 2\n",
        "",
    );
    c.apply(Command::Reload(Box::new(config(&next))))
        .await
        .unwrap();
    let a = reg.instance("api", "a").unwrap();
    assert_eq!((a.instance.port(), a.health_score), (11, 0.5));
    assert!(reg.instance("api", "b").is_err(), "b left the config");
    // A service that leaves the config leaves the registry.
    let with_web = next.replace(
        "service = \"api\"\n",
        "service = \"api\"\n[[listener.route]]\nservice = \"web\"\npath_prefix = \"/web\"\n",
    ) + "[service.web]\n";
    c.apply(Command::Reload(Box::new(config(&with_web))))
        .await
        .unwrap();
    assert!(reg.service("web").is_some());
    c.apply(Command::Reload(Box::new(config(&next))))
        .await
        .unwrap();
    assert!(reg.service("web").is_none());
}

#[tokio::test]
async fn a_discovery_reset_replaces_the_discovered_set() {
    let (mut c, reg) = control().await;
    c.apply(full(vec![put("x", 5), put("y", 6)])).await.unwrap();
    assert_eq!(
        (serving_port(&reg, "x"), serving_port(&reg, "y")),
        (Some(5), Some(6))
    );
    reg.update_instance_health("api", "y", 0.25).unwrap();
    let applied = c.apply(full(vec![put("y", 6), put("z", 7)])).await.unwrap();
    let Reply::Applied(a) = applied else {
        panic!("{applied:?}")
    };
    assert_eq!((a.added, a.removed, a.unchanged), (1, 1, 1));
    assert!(reg.instance("api", "x").unwrap().draining, "x left: drains");
    assert_eq!(reg.instance("api", "y").unwrap().health_score, 0.25);
    assert_eq!(serving_port(&reg, "z"), Some(7));
    assert_eq!(c.status.borrow().discovered, 2);
    // An empty listing: only the config's instances stay.
    c.apply(full(Vec::new())).await.unwrap();
    assert_eq!(
        (serving_port(&reg, "a"), serving_port(&reg, "y")),
        (Some(1), None)
    );
}

#[tokio::test]
async fn refusals_are_typed() {
    let (mut c, _reg) = control().await;
    let unknown = Command::Write {
        write: Write::Register {
            service: "nope".into(),
            id: "x".into(),
            spec: InstanceSpec::local(1),
        },
        local: false,
    };
    assert!(matches!(
        c.apply(unknown).await,
        Err(ControlError::UnknownService(s)) if s == "nope"
    ));
    assert!(matches!(
        c.apply(Command::SetStrategy {
            service: "nope".into(),
            kind: StrategyKind::Random,
        })
        .await,
        Err(ControlError::UnknownService(_))
    ));
    assert!(matches!(
        c.apply(remove("ghost", Duration::ZERO)).await,
        Err(ControlError::Registry(
            RegistryError::UnknownInstance { .. }
        ))
    ));
    assert!(matches!(
        c.apply(register("p", 0)).await,
        Err(ControlError::Registry(RegistryError::Instance(_)))
    ));
    assert!(matches!(
        c.apply(Command::SetHealth {
            service: "api".into(),
            id: "a".into(),
            score: 2.0,
        })
        .await,
        Err(ControlError::Registry(RegistryError::HealthScore(_)))
    ));
}

/// A shared store that records writes and never delivers them back (a
/// watch that is behind).
#[derive(Debug, Default)]
struct Behind {
    writes: Mutex<Vec<String>>,
    has_key: bool,
}

impl SharedStore for Behind {
    fn key(&self, service: &str, id: &str) -> String {
        format!("/p/{service}/{id}")
    }

    fn put<'a>(
        &'a self,
        service: &'a str,
        id: &'a str,
        _spec: &'a InstanceSpec,
    ) -> StoreFuture<'a, (i64, bool)> {
        self.writes.lock().push(format!("put {service}/{id}"));
        Box::pin(async { Ok((7, true)) })
    }

    fn delete<'a>(&'a self, service: &'a str, id: &'a str) -> StoreFuture<'a, Option<i64>> {
        self.writes.lock().push(format!("delete {service}/{id}"));
        let found = self.has_key.then_some(8);
        Box::pin(async move { Ok(found) })
    }
}

#[tokio::test(start_paused = true)]
async fn with_a_store_admin_writes_go_there_and_apply_here_when_the_watch_is_behind() {
    let (c, reg) = control().await;
    let handle = c.spawn();
    let store = Arc::new(Behind::default());
    handle
        .send(Command::UseStore(Some(store.clone())))
        .await
        .unwrap();

    // Written to the store; the watch never delivers it, so after
    // OWN_WRITE_WAIT it is applied here as a discovered instance.
    let n = Write::Register {
        service: "api".into(),
        id: "n".into(),
        spec: InstanceSpec::local(9),
    };
    assert!(handle.write(n).await.unwrap());
    assert_eq!(store.writes.lock().as_slice(), ["put api/n"]);
    assert_eq!(serving_port(&reg, "n"), Some(9));
    assert_eq!(handle.status().discovered, 1);

    // A removal with no key in the store is applied here.
    let a = Write::Remove {
        service: "api".into(),
        id: "a".into(),
        drain: Duration::ZERO,
    };
    handle.write(a).await.unwrap();
    assert_eq!(
        store.writes.lock().as_slice(),
        ["put api/n", "delete api/a"]
    );
    assert!(reg.instance("api", "a").is_err());

    // Back to no store: writes apply here at once.
    handle.send(Command::UseStore(None)).await.unwrap();
    let m = Write::Register {
        service: "api".into(),
        id: "m".into(),
        spec: InstanceSpec::local(3),
    };
    assert!(handle.write(m).await.unwrap());
    assert_eq!(store.writes.lock().len(), 2);
    assert_eq!(serving_port(&reg, "m"), Some(3));
}

#[tokio::test(start_paused = true)]
async fn a_store_removal_drains_for_the_admin_time_when_the_key_leaves() {
    let (c, reg) = control().await;
    let handle = c.spawn();
    let store = Arc::new(Behind {
        has_key: true,
        ..Behind::default()
    });
    handle.send(Command::UseStore(Some(store))).await.unwrap();
    handle
        .discover(Update {
            batch: Batch::Delta(vec![put("k", 4)]),
            revision: Some(5),
        })
        .await
        .unwrap();
    assert_eq!(handle.status().revision, 5);
    // The delete's revision (8) never arrives: applied here with the
    // admin's zero drain, not DRAIN.
    let k = Write::Remove {
        service: "api".into(),
        id: "k".into(),
        drain: Duration::ZERO,
    };
    handle.write(k).await.unwrap();
    assert!(reg.instance("api", "k").is_err(), "removed at once");
}

#[tokio::test]
async fn a_panic_while_applying_becomes_an_error() {
    let ok = CatchPanic(Box::pin(async { 7 })).await;
    assert_eq!(ok, Ok(7));
    let failed = CatchPanic(Box::pin(async {
        tokio::task::yield_now().await;
        panic!("boom")
    }))
    .await;
    assert_eq!(failed, Err::<(), _>("boom".to_owned()));
}

/// `CONFIG` with `n` instances `i0000`.. on ports 1000.., with `edit`
/// applied to each `(index, port)`; `None` leaves the instance out.
fn config_of(n: u16, edit: impl Fn(u16, u16) -> Option<u16>) -> Config {
    use std::fmt::Write as _;
    let mut text = CONFIG
        .split("[[service.api.instance]]")
        .next()
        .unwrap_or_default()
        .to_owned();
    for i in 0..n {
        if let Some(port) = edit(i, 1000 + i) {
            let _ = write!(
                text,
                "[[service.api.instance]]\nid = \"i{i:04}\"\naddress = \"127.0.0.1\"\nport = {port}\n"
            );
        }
    }
    config(&text)
}

/// Each member of `api` by id, as the `Arc` the snapshot holds.
fn members(reg: &Registry) -> std::collections::HashMap<String, Arc<datapunk_lb_core::Member>> {
    reg.service("api")
        .unwrap()
        .members()
        .iter()
        .map(|m| (m.instance().id().to_string(), m.clone()))
        .collect()
}

#[tokio::test]
async fn a_reload_changing_k_instances_touches_only_those() {
    let registry = Arc::new(Registry::new());
    let metrics = Arc::new(Metrics::new(registry.clone()));
    let mut c = Control::new(registry.clone(), metrics, None);
    let reload = |cfg: Config| Command::Reload(Box::new(cfg));
    c.apply(reload(config_of(1000, |_, p| Some(p))))
        .await
        .unwrap();
    // Live state on one unchanged and one changed instance.
    for id in ["i0001", "i0005"] {
        let score = 0.25;
        let set = Command::SetHealth {
            service: "api".into(),
            id: id.into(),
            score,
        };
        c.apply(set).await.unwrap();
    }
    let before = members(&registry);
    // i0005 moves, i0007 leaves, i1000 joins (k = 3).
    let next = config_of(1001, |i, p| match i {
        5 => Some(9005),
        7 => None,
        _ => Some(p),
    });
    c.apply(reload(next)).await.unwrap();
    let after = members(&registry);
    assert_eq!(after.len(), 1000);
    let replaced: Vec<&String> = after
        .iter()
        .filter(|(id, m)| before.get(*id).is_none_or(|b| !Arc::ptr_eq(b, m)))
        .map(|(id, _)| id)
        .collect();
    let mut replaced: Vec<&str> = replaced.into_iter().map(String::as_str).collect();
    replaced.sort_unstable();
    assert_eq!(
        replaced,
        ["i0005", "i1000"],
        "only the changed members are new"
    );
    assert!(
        !after.contains_key("i0007"),
        "the removed one is gone at once"
    );
    let moved = registry.instance("api", "i0005").unwrap();
    assert_eq!((moved.instance.port(), moved.health_score), (9005, 0.25));
    assert_eq!(
        registry.instance("api", "i0001").unwrap().health_score,
        0.25
    );
    assert_eq!(registry.instance("api", "i1000").unwrap().health_score, 1.0);
}

#[tokio::test]
async fn a_reload_of_the_same_file_replaces_no_member_and_keeps_admin_overrides() {
    let registry = Arc::new(Registry::new());
    let metrics = Arc::new(Metrics::new(registry.clone()));
    let mut c = Control::new(registry.clone(), metrics, None);
    let reload = |cfg: Config| Command::Reload(Box::new(cfg));
    c.apply(reload(config_of(300, |_, p| Some(p))))
        .await
        .unwrap();
    // An admin override of a config id, and one the config does not have.
    c.apply(register("i0003", 7003)).await.unwrap();
    c.apply(register("extra", 7777)).await.unwrap();
    let before = members(&registry);
    c.apply(reload(config_of(300, |_, p| Some(p))))
        .await
        .unwrap();
    let after = members(&registry);
    assert_eq!(after.len(), 301);
    assert!(
        after.iter().all(|(id, m)| Arc::ptr_eq(&before[id], m)),
        "no member rebuilt"
    );
    // A change to an overridden id resolves through the layers: the
    // override still wins.
    c.apply(reload(config_of(300, |i, p| {
        Some(if i == 3 { 8003 } else { p })
    })))
    .await
    .unwrap();
    assert_eq!(serving_port(&registry, "i0003"), Some(7003));
    assert_eq!(serving_port(&registry, "extra"), Some(7777));
}

/// The config layer's instances whose id and address strings are the very
/// ones the registry's members hold (not equal copies).
fn shared_with_registry(c: &Control, reg: &Registry) -> usize {
    let members = members(reg);
    c.layers.config()["api"]
        .instances
        .iter()
        .filter(|i| {
            members.get(i.id().as_str()).is_some_and(|m| {
                let r = m.instance();
                r.id().as_str().as_ptr() == i.id().as_str().as_ptr()
                    && r.address().as_ptr() == i.address().as_ptr()
            })
        })
        .count()
}

#[tokio::test]
async fn after_a_reload_the_config_layer_shares_its_strings_with_the_registry() {
    let registry = Arc::new(Registry::new());
    let metrics = Arc::new(Metrics::new(registry.clone()));
    let mut c = Control::new(registry.clone(), metrics, None);
    let reload = |cfg: Config| Command::Reload(Box::new(cfg));
    c.apply(reload(config_of(200, |_, p| Some(p))))
        .await
        .unwrap();
    assert_eq!(shared_with_registry(&c, &registry), 200, "first load");
    // The same file again: a new parse, but the layer keeps the instances
    // the members were built from, so each string is held once.
    c.apply(reload(config_of(200, |_, p| Some(p))))
        .await
        .unwrap();
    assert_eq!(shared_with_registry(&c, &registry), 200, "same file");
    // Ten changed: registered from the new layer, so shared as well.
    c.apply(reload(config_of(200, |i, p| {
        Some(if i < 10 { p + 1 } else { p })
    })))
    .await
    .unwrap();
    assert_eq!(shared_with_registry(&c, &registry), 200, "ten changed");
    assert_eq!(serving_port(&registry, "i0003"), Some(1004));
}

/// Counts live heap bytes for `measure_bytes_per_instance_at_100k` (the
/// wrapper costs two atomic adds per allocation in this test binary).
#[global_allocator]
static ALLOC: cap::Cap<std::alloc::System> = cap::Cap::new(std::alloc::System, usize::MAX);

/// Where the bytes of 100,000 instances go, as live heap (not RSS): the
/// parsed config layer (kept by the control task; its strings are shared
/// with the registry's members), the core registry, and whatever else the
/// control task keeps per instance (nothing since the id index went: the
/// config layer is sorted by id). Printed for docs/benchmarks.md, "Scale
/// (issue 11)".
#[tokio::test]
#[ignore = "a measurement: run with --release --ignored --nocapture"]
async fn measure_bytes_per_instance_at_100k() {
    const N: usize = 100_000;
    let per = |bytes: usize| bytes as f64 / N as f64;
    let mut text = CONFIG
        .split("[[service.api.instance]]")
        .next()
        .unwrap_or_default()
        .to_owned();
    for i in 0..N {
        use std::fmt::Write as _;
        let j = i / 4;
        let _ = write!(
            text,
            "[[service.api.instance]]\nid = \"i{i:06}\"\naddress = \"127.1.{}.{}\"\nport = {}\n",
            j / 250,
            j % 250 + 1,
            18381 + i % 4
        );
    }
    let base = ALLOC.allocated();
    let cfg = config(&text);
    let parsed = ALLOC.allocated() - base;
    let instances = cfg.services["api"].instances.clone();
    // The core alone: descriptions share their strings with the config.
    let before = ALLOC.allocated();
    let core = Registry::new();
    core.register_instances("api", instances.iter().cloned())
        .unwrap();
    let registry = ALLOC.allocated() - before;
    drop(core);
    drop(instances);
    // The whole control path: config layer, the registry.
    let reg = Arc::new(Registry::new());
    let metrics = Arc::new(Metrics::new(reg.clone()));
    let mut c = Control::new(reg.clone(), metrics, None);
    let before_reload = ALLOC.allocated();
    c.apply(Command::Reload(Box::new(cfg))).await.unwrap();
    let control = ALLOC.allocated() + parsed - before_reload;
    // A reload of the same file: a whole new parse, of which nothing may
    // stay (the layer keeps the instances the members share).
    let again = config(&text);
    drop(text);
    let before_again = ALLOC.allocated();
    c.apply(Command::Reload(Box::new(again))).await.unwrap();
    let after_again = ALLOC.allocated() as f64 - before_again as f64 + parsed as f64;
    eprintln!(
        "live heap per instance at {N}: config layer (parsed instances, id and address strings) {:.0} B; \
         core registry (members, live state, index, strategy) {:.0} B; \
         control total (config layer + registry + the control task's own) {:.0} B, so its own {:.0} B",
        per(parsed),
        per(registry),
        per(control),
        per(control) - per(parsed) - per(registry)
    );
    eprintln!(
        "after a reload of the same file the control path holds {:+.0} B per instance more",
        after_again / N as f64
    );
}
