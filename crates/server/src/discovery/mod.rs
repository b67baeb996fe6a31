//! Discovery: where instances come from besides the config file and the
//! admin API (SPEC §3 "Discovery").
//!
//! - **Static** (the default): the config's instances plus the admin API.
//! - **etcd** (`[discovery] kind = "etcd"`; the `etcd` submodule, built with
//!   the `etcd` cargo feature): every node watches one prefix, so many
//!   balancer nodes share one instance set.
//!
//! ## The etcd rule
//!
//! An instance lives at `{prefix}{service}/{id}` as JSON
//! `{"address", "port", "weight"?, "zone"?, "tags"?}` (the admin API's
//! body; unknown fields are refused), normally under a lease that its
//! `datapunk-lb register` sidecar keeps alive.
//!
//! 1. **List.** A node gets the whole prefix at one revision `R` and makes
//!    the discovered set exactly that listing ([`Batch::Full`]): keys that
//!    are gone leave, changed ones update, new ones join.
//! 2. **Watch** the prefix from `R + 1`, applying each watch response as one
//!    [`Batch::Delta`] (one snapshot rebuild per service per batch). A put
//!    registers or updates by id — an existing id keeps its live state
//!    (health, breaker, connection counts, slow start); a delete drains the
//!    instance for [`DRAIN`] (in-flight requests finish), then the core
//!    removes it.
//! 3. **On any error** (connect, list, watch creation, a broken or cancelled
//!    watch, a compacted revision, no answer to a progress request): the
//!    node marks discovery **stale** (metric `datapunk_lb_discovery_stale` =
//!    1 and one warning), keeps serving the last set it saw, backs off
//!    (exponential from 200 ms to 5 s, jittered) and goes back to 1 with a
//!    fresh connection. The re-list picks up every change made meanwhile.
//! 4. **Bad entries** (a key outside `{service}/{id}`, invalid JSON, port 0,
//!    weight outside 1..=1000, …) are logged with their key, counted in
//!    `datapunk_lb_discovery_invalid_values_total` and skipped. They never
//!    crash a node or remove a valid instance: a key whose new value is bad
//!    keeps its last valid value.
//! 5. **Services not in the config**: their keys are kept (a reload that adds
//!    the service registers them) but not routed; each such service is
//!    logged once.
//!
//! Readiness (`/readyz`) waits for the first successful list, then stays
//! ready through outages. An instance with the id of a config instance
//! overrides it while its key exists; when the key goes the config's
//! instance is restored rather than drained.

#[cfg(feature = "etcd")]
pub mod etcd;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use datapunk_lb_core::{Registry, ServiceInstance};
use tracing::{debug, info, warn};

use crate::config::{DiscoveryConfig, ServiceConfig};
use crate::metrics::Metrics;
use crate::state::InstanceSpec;

/// A node's running dynamic discovery (stopped when dropped).
#[cfg(feature = "etcd")]
pub type Running = etcd::EtcdDiscovery;

/// A node's running dynamic discovery: none in a build without etcd.
#[cfg(not(feature = "etcd"))]
#[derive(Debug)]
pub enum Running {}

/// The config a running discovery follows.
pub fn running_config(r: &Running) -> DiscoveryConfig {
    #[cfg(feature = "etcd")]
    {
        DiscoveryConfig::Etcd(r.config().clone())
    }
    #[cfg(not(feature = "etcd"))]
    match *r {}
}

/// How long an instance whose key left keeps finishing in-flight requests.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Above this many instance changes in one batch, each change is logged at
/// debug and the batch as one info line (a first sync of 100,000 instances
/// should not print 100,000 lines).
pub const LOG_EACH_LIMIT: usize = 1000;

/// One key's change, as the watch reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The key was written with a valid value.
    Put {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// The instance.
        spec: InstanceSpec,
    },
    /// The key was deleted (or its lease expired).
    Delete {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
    },
}

impl Change {
    /// `(service, id)`.
    pub fn key(&self) -> (&str, &str) {
        match self {
            Change::Put { service, id, .. } | Change::Delete { service, id } => {
                (service.as_str(), id.as_str())
            }
        }
    }
}

/// What to apply.
#[derive(Debug, Clone)]
pub enum Batch {
    /// Every valid key under the prefix at one revision: replaces the set.
    /// `invalid` holds the `(service, id)` of keys listed with a bad value:
    /// their last valid value, if any, is kept.
    Full {
        /// Valid entries (only [`Change::Put`]s are meaningful here).
        entries: Vec<Change>,
        /// Keys present with a bad value.
        invalid: Vec<(String, String)>,
    },
    /// Changes from one watch response, in order (the last one per key wins).
    Delta(Vec<Change>),
}

/// Why a key or value under the prefix was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadEntry {
    /// The key is not `{prefix}{service}/{id}`.
    #[error("key {key:?} is not {prefix}{{service}}/{{id}}")]
    Key {
        /// The key (lossy UTF-8).
        key: String,
        /// The prefix.
        prefix: String,
    },
    /// The value is not a valid instance.
    #[error("key {key:?}: {reason}")]
    Value {
        /// The key.
        key: String,
        /// Service, from the key.
        service: String,
        /// Instance id, from the key.
        id: String,
        /// What is wrong.
        reason: String,
    },
}

impl BadEntry {
    /// The key.
    pub fn key(&self) -> &str {
        match self {
            BadEntry::Key { key, .. } | BadEntry::Value { key, .. } => key,
        }
    }
}

/// Splits `{prefix}{service}/{id}` into service and id.
pub fn parse_key(prefix: &str, key: &[u8]) -> Result<(String, String), BadEntry> {
    let bad = || BadEntry::Key {
        key: String::from_utf8_lossy(key).into_owned(),
        prefix: prefix.to_owned(),
    };
    let key = std::str::from_utf8(key).map_err(|_| bad())?;
    let rest = key.strip_prefix(prefix).ok_or_else(bad)?;
    let (service, id) = rest.split_once('/').ok_or_else(bad)?;
    if service.is_empty() || id.is_empty() || id.contains('/') {
        return Err(bad());
    }
    Ok((service.to_owned(), id.to_owned()))
}

/// Parses a put: key shape, then the JSON value, validated as the admin
/// API validates a registration.
pub fn parse_put(prefix: &str, key: &[u8], value: &[u8]) -> Result<Change, BadEntry> {
    let (service, id) = parse_key(prefix, key)?;
    let bad = |reason: String| BadEntry::Value {
        key: String::from_utf8_lossy(key).into_owned(),
        service: service.clone(),
        id: id.clone(),
        reason,
    };
    let spec: InstanceSpec =
        serde_json::from_slice(value).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    spec.to_instance(&id).map_err(|e| bad(e.to_string()))?;
    Ok(Change::Put { service, id, spec })
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// New instances registered.
    pub added: usize,
    /// Existing instances whose description changed (live state kept).
    pub updated: usize,
    /// Instances drained (or removed at once) because their key left.
    pub removed: usize,
    /// Config instances restored because the key overriding them left.
    pub restored: usize,
    /// Keys whose value did not change.
    pub unchanged: usize,
    /// Changes for services not in the config (kept, not routed).
    pub unrouted: usize,
}

impl Applied {
    /// Instance changes made to the registry.
    pub fn changes(&self) -> usize {
        self.added + self.updated + self.removed + self.restored
    }
}

/// Every valid instance this node has seen under the prefix, by service and
/// id, and what it is draining. The server owns one, behind the lock that
/// also serialises config reloads.
#[derive(Debug, Default)]
pub struct Discovered {
    services: HashMap<String, HashMap<String, InstanceSpec>>,
    /// Services not in the config already reported.
    warned: HashSet<String>,
    /// Instances drained because their key left, with the drain deadline: a
    /// put of the same id before removal starts a fresh instance.
    draining: HashMap<(String, String), Instant>,
    /// Drain for the next delete of a key, set by the admin API on this node.
    drain_override: HashMap<(String, String), Duration>,
}

/// The last change of each key, in batch order.
fn last_per_key(changes: Vec<Change>) -> Vec<(String, String, Option<InstanceSpec>)> {
    let mut last = vec![false; changes.len()];
    {
        let mut seen = HashSet::with_capacity(changes.len());
        for (i, c) in changes.iter().enumerate().rev() {
            last[i] = seen.insert(c.key());
        }
    }
    changes
        .into_iter()
        .zip(last)
        .filter(|(_, last)| *last)
        .map(|(c, _)| match c {
            Change::Put { service, id, spec } => (service, id, Some(spec)),
            Change::Delete { service, id } => (service, id, None),
        })
        .collect()
}

enum Action {
    Put {
        id: String,
        spec: InstanceSpec,
        new: bool,
    },
    Delete {
        id: String,
    },
}

impl Discovered {
    /// The discovered instances of `service`.
    pub fn instances(&self, service: &str) -> impl Iterator<Item = (&String, &InstanceSpec)> {
        self.services
            .get(service)
            .into_iter()
            .flat_map(|m| m.iter())
    }

    /// Whether `service/id` is discovered.
    pub fn contains(&self, service: &str, id: &str) -> bool {
        self.services
            .get(service)
            .is_some_and(|m| m.contains_key(id))
    }

    /// Number of discovered instances, every service.
    pub fn len(&self) -> usize {
        self.services.values().map(HashMap::len).sum()
    }

    /// Whether nothing is discovered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The drain this node uses when the key of `service/id` next leaves.
    pub fn set_drain_override(&mut self, service: &str, id: &str, drain: Duration) {
        self.drain_override
            .insert((service.to_owned(), id.to_owned()), drain);
    }

    /// Forgets a drain override (the delete did not happen).
    pub fn clear_drain_override(&mut self, service: &str, id: &str) {
        self.drain_override
            .remove(&(service.to_owned(), id.to_owned()));
    }

    /// Applies a batch to the set and to `registry` (services in `services`
    /// only): puts in one `register_instances` per service, deletes as
    /// drains. Logs each change (see [`LOG_EACH_LIMIT`]).
    pub fn apply(
        &mut self,
        batch: Batch,
        registry: &Registry,
        services: &BTreeMap<String, ServiceConfig>,
        metrics: &Metrics,
    ) -> Applied {
        let full = matches!(batch, Batch::Full { .. });
        let (plan, mut out) = self.plan(batch);
        let log_each = plan.values().map(Vec::len).sum::<usize>() <= LOG_EACH_LIMIT;
        let now = Instant::now();
        self.draining
            .retain(|_, deadline| *deadline + Duration::from_secs(10) > now);
        for (service, actions) in plan {
            let Some(config) = services.get(&service) else {
                out.unrouted += actions.len();
                if self.warned.insert(service.clone()) {
                    warn!(
                        service = service.as_str(),
                        instances = self.services.get(&service).map_or(0, HashMap::len),
                        reason = "service not in the config",
                        "discovery: skipping instances of an unknown service (no route reaches them)"
                    );
                }
                continue;
            };
            self.apply_service(
                &service, actions, config, registry, metrics, full, log_each, &mut out,
            );
        }
        if !log_each {
            info!(
                added = out.added,
                updated = out.updated,
                removed = out.removed,
                restored = out.restored,
                unchanged = out.unchanged,
                reason = if full { "etcd sync" } else { "etcd watch" },
                "discovery: batch applied"
            );
        }
        out
    }

    /// Updates the set; returns per-service actions (in batch order) and
    /// the unchanged count.
    fn plan(&mut self, batch: Batch) -> (BTreeMap<String, Vec<Action>>, Applied) {
        let mut out = Applied::default();
        let mut plan: BTreeMap<String, Vec<Action>> = BTreeMap::new();
        // Every key the batch touches, once, with its final value.
        let wanted = match batch {
            Batch::Delta(changes) => last_per_key(changes),
            Batch::Full { entries, invalid } => {
                let mut wanted = last_per_key(entries);
                let gone: Vec<(String, String, Option<InstanceSpec>)> = {
                    let listed: HashSet<(&str, &str)> = wanted
                        .iter()
                        .map(|(s, i, _)| (s.as_str(), i.as_str()))
                        .chain(invalid.iter().map(|(s, i)| (s.as_str(), i.as_str())))
                        .collect();
                    self.services
                        .iter()
                        .flat_map(|(s, ids)| ids.keys().map(move |i| (s, i)))
                        .filter(|(s, i)| !listed.contains(&(s.as_str(), i.as_str())))
                        .map(|(s, i)| (s.clone(), i.clone(), None))
                        .collect()
                };
                wanted.extend(gone);
                wanted
            }
        };
        for (service, id, spec) in wanted {
            let current = self.services.get(&service).and_then(|m| m.get(&id));
            match spec {
                Some(spec) => {
                    if current == Some(&spec) {
                        out.unchanged += 1;
                        continue;
                    }
                    let new = current.is_none();
                    self.services
                        .entry(service.clone())
                        .or_default()
                        .insert(id.clone(), spec.clone());
                    plan.entry(service)
                        .or_default()
                        .push(Action::Put { id, spec, new });
                }
                None => {
                    if current.is_none() {
                        continue;
                    }
                    if let Some(m) = self.services.get_mut(&service) {
                        m.remove(&id);
                        if m.is_empty() {
                            self.services.remove(&service);
                        }
                    }
                    plan.entry(service).or_default().push(Action::Delete { id });
                }
            }
        }
        (plan, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn apply_service(
        &mut self,
        service: &str,
        actions: Vec<Action>,
        config: &ServiceConfig,
        registry: &Registry,
        metrics: &Metrics,
        full: bool,
        log_each: bool,
        out: &mut Applied,
    ) {
        let reason_put = if full { "etcd sync" } else { "etcd put" };
        let reason_delete = if full {
            "gone from etcd at sync"
        } else {
            "etcd key deleted"
        };
        let mut puts: Vec<ServiceInstance> = Vec::new();
        let mut deletes = Vec::new();
        for a in actions {
            match a {
                Action::Put { id, spec, new } => {
                    let instance = match spec.to_instance(&id) {
                        Ok(i) => i,
                        Err(e) => {
                            // Validated when parsed; kept as a guard.
                            warn!(service, instance = id.as_str(), error = %e, "discovery: invalid instance skipped");
                            continue;
                        }
                    };
                    // An id still draining from an earlier delete comes back
                    // as a fresh instance, not as a draining one.
                    if !self.draining.is_empty()
                        && self
                            .draining
                            .remove(&(service.to_owned(), id.clone()))
                            .is_some()
                        && registry.instance(service, &id).is_ok_and(|st| st.draining)
                    {
                        let _ = registry.deregister_instance(service, &id);
                    }
                    let from = if new { "absent" } else { "registered" };
                    if new {
                        out.added += 1;
                    } else {
                        out.updated += 1;
                    }
                    if log_each {
                        info!(
                            service,
                            instance = id.as_str(),
                            address = spec.address.as_str(),
                            port = spec.port,
                            weight = spec.weight,
                            from,
                            to = "registered",
                            reason = reason_put,
                            "instance {}",
                            if new { "registered" } else { "updated" }
                        );
                    } else {
                        debug!(
                            service,
                            instance = id.as_str(),
                            from,
                            to = "registered",
                            reason = reason_put,
                            "instance registered"
                        );
                    }
                    puts.push(instance);
                }
                Action::Delete { id } => deletes.push(id),
            }
        }
        if !puts.is_empty() {
            if let Err(e) = registry.register_instances(service, puts) {
                warn!(service, error = %e, "discovery: registering instances failed");
            }
        }
        for id in deletes {
            let key = (service.to_owned(), id.clone());
            let drain = self.drain_override.remove(&key).unwrap_or(DRAIN);
            if let Some(i) = config.instances.iter().find(|i| i.id().as_str() == id) {
                let _ = registry.register_instance(service, i.clone());
                out.restored += 1;
                if log_each {
                    info!(
                        service,
                        instance = id.as_str(),
                        from = "discovered",
                        to = "registered",
                        reason = "etcd key left; config instance restored",
                        "instance restored"
                    );
                }
                continue;
            }
            let result = if drain.is_zero() {
                registry
                    .deregister_instance(service, &id)
                    .map(|_| Vec::new())
            } else {
                registry.drain_instance(service, &id, drain)
            };
            match result {
                Ok(events) => {
                    metrics.report(events);
                    if !drain.is_zero() {
                        self.draining.insert(key, Instant::now() + drain);
                    }
                    out.removed += 1;
                    let to = if drain.is_zero() {
                        "removed"
                    } else {
                        "draining"
                    };
                    if log_each {
                        info!(service, instance = id.as_str(), from = "registered", to, reason = reason_delete, drain = ?drain, "instance {to}");
                    } else {
                        debug!(
                            service,
                            instance = id.as_str(),
                            from = "registered",
                            to,
                            reason = reason_delete,
                            "instance {to}"
                        );
                    }
                }
                Err(e) => {
                    debug!(service, instance = id.as_str(), error = %e, "discovery: delete of an instance not registered")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/datapunk/services/";

    fn spec(port: u16) -> InstanceSpec {
        InstanceSpec {
            address: "127.0.0.1".into(),
            port,
            weight: 1,
            zone: None,
            tags: vec![],
        }
    }

    #[test]
    fn keys_and_values_are_checked() {
        assert_eq!(
            parse_key(P, b"/datapunk/services/api/a-1").unwrap(),
            ("api".into(), "a-1".into())
        );
        for bad in [
            &b"/datapunk/services/api"[..],
            b"/datapunk/services/api/",
            b"/datapunk/services//a",
            b"/datapunk/services/api/a/b",
            b"/other/api/a",
            b"/datapunk/services/api/\xff",
        ] {
            assert!(
                matches!(parse_key(P, bad), Err(BadEntry::Key { .. })),
                "{bad:?}"
            );
        }
        let k = b"/datapunk/services/api/a";
        assert!(parse_put(P, k, br#"{"address":"10.0.0.1","port":80}"#).is_ok());
        for (v, want) in [
            (&b"{not json"[..], "invalid JSON"),
            (br#"{"address":"10.0.0.1","port":0}"#, "port"),
            (
                br#"{"address":"10.0.0.1","port":80,"weight":5000}"#,
                "weight",
            ),
            (br#"{"address":"","port":80}"#, "address"),
            (br#"{"address":"a","port":80,"colour":1}"#, "colour"),
            (br#"{"address":"a","port":70000}"#, "invalid JSON"),
        ] {
            let e = parse_put(P, k, v).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains("/datapunk/services/api/a"),
                "{e}"
            );
        }
    }

    fn services() -> BTreeMap<String, ServiceConfig> {
        let c = crate::config::Config::parse(
            "[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nservice = \"api\"\n[service.api]\n[[service.api.instance]]\nid = \"static\"\naddress = \"127.0.0.1\"\nport = 1\n",
        )
        .unwrap();
        c.services
    }

    fn put(id: &str, port: u16) -> Change {
        Change::Put {
            service: "api".into(),
            id: id.into(),
            spec: spec(port),
        }
    }

    #[test]
    fn deltas_and_full_syncs_keep_state_by_id() {
        let reg = Registry::new();
        let svcs = services();
        let metrics = Metrics::new(std::sync::Arc::new(Registry::new()));
        let mut d = Discovered::default();
        let a = d.apply(
            Batch::Delta(vec![put("a", 1), put("b", 2), put("a", 3)]),
            &reg,
            &svcs,
            &metrics,
        );
        assert_eq!((a.added, a.updated), (2, 0));
        assert_eq!(reg.instance("api", "a").unwrap().instance.port(), 3);
        // Live state survives an update.
        reg.update_instance_health("api", "a", 0.5).unwrap();
        let a = d.apply(
            Batch::Delta(vec![put("a", 4), put("b", 2)]),
            &reg,
            &svcs,
            &metrics,
        );
        assert_eq!((a.updated, a.unchanged), (1, 1));
        let st = reg.instance("api", "a").unwrap();
        assert_eq!((st.instance.port(), st.health_score), (4, 0.5));
        // A full sync: b is gone (drained), c is new, a keeps its bad-value-free old value.
        let a = d.apply(
            Batch::Full {
                entries: vec![put("c", 5)],
                invalid: vec![("api".into(), "a".into())],
            },
            &reg,
            &svcs,
            &metrics,
        );
        assert_eq!((a.added, a.removed), (1, 1));
        assert!(reg.instance("api", "b").unwrap().draining);
        assert_eq!(reg.instance("api", "a").unwrap().instance.port(), 4);
        // b comes back before its drain ends: fresh, not draining.
        d.apply(Batch::Delta(vec![put("b", 2)]), &reg, &svcs, &metrics);
        assert!(!reg.instance("api", "b").unwrap().draining);
        // A key overriding a config instance: restored when it leaves.
        reg.register_instance("api", svcs["api"].instances[0].clone())
            .unwrap();
        d.apply(Batch::Delta(vec![put("static", 9)]), &reg, &svcs, &metrics);
        assert_eq!(reg.instance("api", "static").unwrap().instance.port(), 9);
        let a = d.apply(
            Batch::Delta(vec![Change::Delete {
                service: "api".into(),
                id: "static".into(),
            }]),
            &reg,
            &svcs,
            &metrics,
        );
        assert_eq!(a.restored, 1);
        let st = reg.instance("api", "static").unwrap();
        assert_eq!((st.instance.port(), st.draining), (1, false));
        // Unknown services are kept, not routed.
        let a = d.apply(
            Batch::Delta(vec![Change::Put {
                service: "nope".into(),
                id: "x".into(),
                spec: spec(1),
            }]),
            &reg,
            &svcs,
            &metrics,
        );
        assert_eq!(a.unrouted, 1);
        assert!(reg.service("nope").is_none());
        assert!(d.contains("nope", "x"));
        // A zero drain override removes at once.
        d.set_drain_override("api", "c", Duration::ZERO);
        d.apply(
            Batch::Delta(vec![Change::Delete {
                service: "api".into(),
                id: "c".into(),
            }]),
            &reg,
            &svcs,
            &metrics,
        );
        assert!(reg.instance("api", "c").is_err());
    }
}
