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
//!    instance for `crate::control::DRAIN` (in-flight requests finish), then the core
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
//! ready through outages. An instance with the id of a config or admin API
//! instance overrides it while its key exists; when the key goes, what the
//! layers below say comes back (see `crate::control`): the admin API's
//! registration, else the config's instance unless the admin API removed
//! it, else the instance drains.
//!
//! ## Shape
//!
//! Discovery only reads etcd and reports: it parses keys and values here,
//! sends each listing or watch response to the control task as a
//! `crate::control::Update` (with the etcd revision) and publishes its
//! `crate::control::DiscoveryStatus`. It never touches the registry or
//! the server; the discovered set and how it merges with the config and
//! the admin API live in `crate::control`.

#[cfg(feature = "etcd")]
pub mod etcd;

use crate::config::DiscoveryConfig;
use crate::state::InstanceSpec;

pub use crate::control::{Applied, Batch, Change, Discovered};

/// A node's running dynamic discovery (stopped when dropped).
#[cfg(feature = "etcd")]
pub(crate) type Running = etcd::EtcdDiscovery;

/// A node's running dynamic discovery: none in a build without etcd.
#[cfg(not(feature = "etcd"))]
#[derive(Debug)]
pub(crate) enum Running {}

/// The config a running discovery follows.
pub(crate) fn running_config(r: &Running) -> DiscoveryConfig {
    #[cfg(feature = "etcd")]
    {
        DiscoveryConfig::Etcd(r.config().clone())
    }
    #[cfg(not(feature = "etcd"))]
    match *r {}
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use datapunk_lb_core::Registry;

    use super::*;
    use crate::config::ServiceConfig;
    use crate::metrics::Metrics;

    const P: &str = "/datapunk/services/";

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
            spec: InstanceSpec::local(port),
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
                spec: InstanceSpec::local(1),
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
