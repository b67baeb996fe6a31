//! The three sources of an instance and the one precedence rule that merges
//! them ([`Layers::resolve`]).
//!
//! Lowest first: the **config file**; the **dynamic overrides** (admin API
//! registrations, removals and strategy, persisted in the state file); the
//! **discovered set** (etcd). A higher layer wins on the same instance id;
//! a dynamic removal hides the config's instance of that id, and nothing
//! below the discovered set comes back while a discovered key exists. When
//! a higher layer lets go of an id (an etcd key leaves, an override is
//! removed) the id resolves to what the layers below say, never straight to
//! the config's version.
//!
//! Every path that changes the registry (reload, discovery updates, admin
//! commands) asks this rule, so they cannot disagree.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use datapunk_lb_core::{InstanceId, LoadBalancerConfig, ServiceInstance, StrategyKind};
use tracing::warn;

use crate::config::ServiceConfig;
use crate::state::{DynamicState, InstanceSpec};

/// Which layer an instance's description comes from, lowest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Source {
    /// The config file.
    Config,
    /// The admin API (the state file).
    Dynamic,
    /// etcd.
    Discovered,
}

impl Source {
    /// The layer's name in log lines.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Dynamic => "admin API",
            Source::Discovered => "discovered",
        }
    }
}

/// The discovered instances, by service and id.
pub(crate) type DiscoveredSet = HashMap<String, HashMap<String, InstanceSpec>>;

/// The desired state: every source, by service.
#[derive(Debug, Default)]
pub(crate) struct Layers {
    /// The config file's services.
    config: BTreeMap<String, ServiceConfig>,
    /// Position of each config instance in its service's list, by id (the
    /// instance's own id `Arc`: no copy of the string).
    config_index: HashMap<String, HashMap<InstanceId, usize>>,
    /// What the state file persists.
    pub(crate) dynamic: DynamicState,
    /// What etcd holds.
    pub(crate) discovered: DiscoveredSet,
}

impl Layers {
    /// Layers over `dynamic` with no config yet.
    pub(crate) fn new(dynamic: DynamicState) -> Self {
        Self {
            dynamic,
            ..Self::default()
        }
    }

    /// Replaces the config layer; returns the previous one.
    pub(crate) fn set_config(
        &mut self,
        services: BTreeMap<String, ServiceConfig>,
    ) -> BTreeMap<String, ServiceConfig> {
        self.config_index = services
            .iter()
            .map(|(name, svc)| (name.clone(), index(&svc.instances)))
            .collect();
        std::mem::replace(&mut self.config, services)
    }

    /// The config's services.
    pub(crate) fn config(&self) -> &BTreeMap<String, ServiceConfig> {
        &self.config
    }

    /// Whether the config has `service` (only configured services are routed
    /// and accept admin changes).
    pub(crate) fn is_configured(&self, service: &str) -> bool {
        self.config.contains_key(service)
    }

    /// Whether the config file has `service/id`.
    pub(crate) fn in_config(&self, service: &str, id: &str) -> bool {
        self.config_index
            .get(service)
            .is_some_and(|ids| ids.contains_key(id))
    }

    /// The rule: what `service/id` should be in the registry, and from which
    /// layer; `None` when no layer wants it.
    pub(crate) fn resolve(&self, service: &str, id: &str) -> Option<(Source, ServiceInstance)> {
        let discovered = self.discovered.get(service).and_then(|m| m.get(id));
        if let Some(i) = discovered.and_then(|spec| valid(service, id, spec)) {
            return Some((Source::Discovered, i));
        }
        let overlay = self.dynamic.services.get(service);
        let registered = overlay.and_then(|o| o.instances.get(id));
        if let Some(i) = registered.and_then(|spec| valid(service, id, spec)) {
            return Some((Source::Dynamic, i));
        }
        if overlay.is_some_and(|o| o.removed.contains(id)) {
            return None;
        }
        let n = *self.config_index.get(service)?.get(id)?;
        let i = self.config.get(service)?.instances.get(n)?.clone();
        Some((Source::Config, i))
    }

    /// Every instance `service` should have, by [`resolve`](Self::resolve),
    /// in id order.
    pub(crate) fn instances(&self, service: &str) -> Vec<(Source, ServiceInstance)> {
        let mut ids: BTreeSet<&str> = BTreeSet::new();
        if let Some(index) = self.config_index.get(service) {
            ids.extend(index.keys().map(InstanceId::as_str));
        }
        if let Some(o) = self.dynamic.services.get(service) {
            ids.extend(o.instances.keys().map(String::as_str));
        }
        if let Some(m) = self.discovered.get(service) {
            ids.extend(m.keys().map(String::as_str));
        }
        ids.into_iter()
            .filter_map(|id| self.resolve(service, id))
            .collect()
    }

    /// The balancing `service` should run: the config's, with the strategy
    /// set through the admin API if any — except a stored `consistent_hash`
    /// for a service whose config (since reloaded) has no `hash_key`, which
    /// would pick at random: that one is ignored with a warning, as the
    /// admin API refuses it in the first place.
    pub(crate) fn balancing(&self, service: &str) -> Option<LoadBalancerConfig> {
        let svc = self.config.get(service)?;
        let mut balancing = svc.balancing.clone();
        let chosen = self
            .dynamic
            .services
            .get(service)
            .and_then(|o| o.strategy.as_deref())
            .and_then(|k| k.parse().ok());
        match chosen {
            Some(StrategyKind::ConsistentHash) if svc.hash_key.is_none() => {
                warn!(
                    service,
                    strategy = balancing.strategy.as_str(),
                    "ignoring the stored strategy consistent_hash: the service has no hash_key; keeping the config's"
                );
            }
            Some(k) => balancing.strategy = k,
            None => {}
        }
        Some(balancing)
    }
}

/// Each instance's position in `list`, by id.
fn index(list: &[ServiceInstance]) -> HashMap<InstanceId, usize> {
    list.iter()
        .enumerate()
        .map(|(n, i)| (i.id().clone(), n))
        .collect()
}

/// What a new config layer changes in one service that both layers have.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ServiceDiff {
    /// Ids whose config instance was added, removed or changed (address,
    /// port, weight, zone or tags), in no particular order.
    pub(crate) ids: Vec<InstanceId>,
}

/// The config instances of `before` and `after` that differ, by id: the
/// ids a reload must resolve again. Every other id resolves as before, so
/// its registry member is left untouched. O(n) comparisons of two parsed
/// lists (no allocation per unchanged instance); identical lists compare in
/// one pass.
pub(crate) fn diff_instances(before: &[ServiceInstance], after: &[ServiceInstance]) -> ServiceDiff {
    if before == after {
        return ServiceDiff::default();
    }
    let old = index(before);
    let mut seen = 0;
    let mut ids = Vec::new();
    for i in after {
        match old.get(i.id()).and_then(|&n| before.get(n)) {
            Some(was) => {
                seen += 1;
                if was != i {
                    ids.push(i.id().clone());
                }
            }
            None => ids.push(i.id().clone()),
        }
    }
    if seen < before.len() {
        let new: std::collections::HashSet<&InstanceId> = after.iter().map(|i| i.id()).collect();
        ids.extend(
            before
                .iter()
                .map(|i| i.id())
                .filter(|id| !new.contains(id))
                .cloned(),
        );
    }
    ServiceDiff { ids }
}

/// The core description of a stored spec; an invalid one (validated where it
/// entered, so only a hand-edited state file) is logged and skipped.
fn valid(service: &str, id: &str, spec: &InstanceSpec) -> Option<ServiceInstance> {
    match spec.to_instance(id) {
        Ok(i) => Some(i),
        Err(e) => {
            warn!(service, instance = id, error = %e, "skipping an invalid stored instance");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn layers() -> Layers {
        let c = Config::parse(
            "[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nservice = \"api\"\n[service.api]\n[[service.api.instance]]\nid = \"a\"\naddress = \"127.0.0.1\"\nport = 1\n[[service.api.instance]]\nid = \"b\"\naddress = \"127.0.0.1\"\nport = 2\n",
        )
        .unwrap();
        let mut l = Layers::default();
        l.set_config(c.services);
        l
    }

    fn port(l: &Layers, id: &str) -> Option<(Source, u16)> {
        l.resolve("api", id).map(|(s, i)| (s, i.port()))
    }

    #[test]
    fn each_layer_overrides_the_one_below_on_the_same_id() {
        let mut l = layers();
        assert_eq!(port(&l, "a"), Some((Source::Config, 1)));
        l.dynamic
            .service_mut("api")
            .instances
            .insert("a".into(), InstanceSpec::local(10));
        assert_eq!(port(&l, "a"), Some((Source::Dynamic, 10)));
        l.discovered
            .entry("api".into())
            .or_default()
            .insert("a".into(), InstanceSpec::local(20));
        assert_eq!(port(&l, "a"), Some((Source::Discovered, 20)));
        // The key leaves: the override comes back, not the config's version.
        l.discovered.clear();
        assert_eq!(port(&l, "a"), Some((Source::Dynamic, 10)));
        assert_eq!(port(&l, "b"), Some((Source::Config, 2)));
        assert_eq!(port(&l, "nope"), None);
    }

    #[test]
    fn a_removal_hides_the_config_instance_but_not_a_discovered_one() {
        let mut l = layers();
        l.dynamic.service_mut("api").removed.insert("b".into());
        assert_eq!(port(&l, "b"), None);
        l.discovered
            .entry("api".into())
            .or_default()
            .insert("b".into(), InstanceSpec::local(30));
        assert_eq!(port(&l, "b"), Some((Source::Discovered, 30)));
        l.discovered.clear();
        assert_eq!(port(&l, "b"), None, "the key left: the removal holds");
        let ids: Vec<(Source, String)> = l
            .instances("api")
            .into_iter()
            .map(|(s, i)| (s, i.id().to_string()))
            .collect();
        assert_eq!(ids, vec![(Source::Config, "a".to_owned())]);
    }

    #[test]
    fn the_strategy_override_wins_over_the_config() {
        let mut l = layers();
        let configured = l.balancing("api").unwrap().strategy;
        assert_eq!(configured.as_str(), "adaptive");
        l.dynamic.service_mut("api").strategy = Some("least_connections".into());
        assert_eq!(
            l.balancing("api").unwrap().strategy.as_str(),
            "least_connections"
        );
        assert!(l.balancing("nope").is_none());
    }

    #[test]
    fn the_instance_diff_names_exactly_the_added_removed_and_changed_ids() {
        let inst = |id: &str, port: u16| ServiceInstance::try_new(id, "127.0.0.1", port).unwrap();
        let before: Vec<_> = (0..50).map(|i| inst(&format!("i{i}"), 1000 + i)).collect();
        assert_eq!(diff_instances(&before, &before), ServiceDiff::default());
        let mut after: Vec<_> = before.iter().rev().cloned().collect();
        assert!(
            diff_instances(&before, &after).ids.is_empty(),
            "order is not a change"
        );
        after.retain(|i| i.id().as_str() != "i7");
        after.push(inst("new", 1));
        let pos = after.iter().position(|i| i.id().as_str() == "i9").unwrap();
        after[pos] = inst("i9", 9);
        let w = datapunk_lb_core::Weight::try_new(5).unwrap();
        let pos = after.iter().position(|i| i.id().as_str() == "i3").unwrap();
        after[pos] = after[pos].clone().with_weight(w);
        let mut ids: Vec<String> = diff_instances(&before, &after)
            .ids
            .iter()
            .map(|i| i.to_string())
            .collect();
        ids.sort();
        assert_eq!(ids, ["i3", "i7", "i9", "new"]);
    }

    #[test]
    fn a_stored_consistent_hash_without_a_hash_key_is_ignored() {
        let mut l = layers();
        l.dynamic.service_mut("api").strategy = Some("consistent_hash".into());
        assert_eq!(l.balancing("api").unwrap().strategy.as_str(), "adaptive");
    }
}
