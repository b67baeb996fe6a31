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
//!
//! ## What the config layer costs
//!
//! The config layer is the parsed instance list of each service, kept
//! between reloads so the next one can be diffed against it and so an id
//! that a higher layer lets go of can fall back to its config version. Its
//! strings (id, address, zone, tags) are `Arc`s shared with the registry's
//! members, so what it adds is one `ServiceInstance` (80 B) per instance,
//! with no growth slack (the parser sizes the list exactly) and no index
//! beside it: the list is sorted by id, an id is found by binary search
//! (O(log n), 17 steps at 100,000; only the ids a change touches are looked
//! up) and two lists are diffed in one merge pass ([`diff_instances`]).
//! A hash map from id to position cost 33 B per instance at 100,000. A
//! reload keeps the layer's instance wherever the new file's equals it
//! ([`Layers::set_config`]), so the strings stay shared after reloads too.

use std::cmp::Ordering;
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
    /// The config file's services; each instance list sorted by id (the
    /// parser sorts it; [`set_config`](Self::set_config) makes sure).
    config: BTreeMap<String, ServiceConfig>,
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
    ///
    /// An instance equal to the one the layer had keeps the layer's (the
    /// two are swapped: the returned layer holds the new parse's), so the
    /// kept layer goes on sharing its strings with the registry's members,
    /// which a reload leaves untouched: without this, each reload of the
    /// same file left the id and address strings of every instance held
    /// twice (~50 B per instance at 100,000).
    pub(crate) fn set_config(
        &mut self,
        mut services: BTreeMap<String, ServiceConfig>,
    ) -> BTreeMap<String, ServiceConfig> {
        for (name, svc) in services.iter_mut() {
            // One O(n) pass over a parsed (already sorted) list; a list built
            // elsewhere (tests) gets sorted here.
            if !svc.instances.is_sorted_by(|a, b| a.id() <= b.id()) {
                svc.instances.sort_unstable_by(|a, b| a.id().cmp(b.id()));
            }
            if let Some(was) = self.config.get_mut(name) {
                keep_equal(&mut was.instances, &mut svc.instances);
            }
        }
        std::mem::replace(&mut self.config, services)
    }

    /// The config instance `service/id`.
    fn config_instance(&self, service: &str, id: &str) -> Option<&ServiceInstance> {
        let list = &self.config.get(service)?.instances;
        let n = list.binary_search_by(|i| i.id().as_str().cmp(id)).ok()?;
        list.get(n)
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
        self.config_instance(service, id).is_some()
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
        let i = self.config_instance(service, id)?.clone();
        Some((Source::Config, i))
    }

    /// Every instance `service` should have, by [`resolve`](Self::resolve),
    /// in id order.
    pub(crate) fn instances(&self, service: &str) -> Vec<(Source, ServiceInstance)> {
        let mut ids: BTreeSet<&str> = BTreeSet::new();
        if let Some(svc) = self.config.get(service) {
            ids.extend(svc.instances.iter().map(|i| i.id().as_str()));
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

/// What a new config layer changes in one service that both layers have.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ServiceDiff {
    /// Ids whose config instance was added, removed or changed (address,
    /// port, weight, zone or tags), in no particular order.
    pub(crate) ids: Vec<InstanceId>,
}

/// The config instances of `before` and `after` that differ, by id: the
/// ids a reload must resolve again. Every other id resolves as before, so
/// its registry member is left untouched.
///
/// Both lists are sorted by id (as [`Layers`] keeps them), so this is one
/// merge pass: O(n) comparisons, each a full `==` of the two descriptions
/// (id, address, port, weight, zone, tags), so no change can hide; no
/// allocation per unchanged instance.
pub(crate) fn diff_instances(before: &[ServiceInstance], after: &[ServiceInstance]) -> ServiceDiff {
    debug_assert!(
        before.is_sorted_by(|a, b| a.id() < b.id()),
        "before sorted by id"
    );
    debug_assert!(
        after.is_sorted_by(|a, b| a.id() < b.id()),
        "after sorted by id"
    );
    let mut ids = Vec::new();
    let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(was), Some(is)) => was.id().cmp(is.id()),
        };
        match order {
            // Only in `before`: removed.
            Ordering::Less => ids.extend(old.next().map(|i| i.id().clone())),
            // Only in `after`: added.
            Ordering::Greater => ids.extend(new.next().map(|i| i.id().clone())),
            Ordering::Equal => {
                if let (Some(was), Some(is)) = (old.next(), new.next()) {
                    if was != is {
                        ids.push(is.id().clone());
                    }
                }
            }
        }
    }
    ServiceDiff { ids }
}

/// Swaps each instance of `new` that equals the one of the same id in
/// `old` with it, so `new` holds `old`'s (shared) strings. Both sorted by
/// id; one merge pass.
fn keep_equal(old: &mut [ServiceInstance], new: &mut [ServiceInstance]) {
    let (mut i, mut j) = (0, 0);
    while let (Some(was), Some(is)) = (old.get_mut(i), new.get_mut(j)) {
        match was.id().cmp(is.id()) {
            Ordering::Less => i += 1,
            Ordering::Greater => j += 1,
            Ordering::Equal => {
                if was == is {
                    std::mem::swap(was, is);
                }
                i += 1;
                j += 1;
            }
        }
    }
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

    /// `list` sorted by id, as the config layer keeps it.
    fn by_id(mut list: Vec<ServiceInstance>) -> Vec<ServiceInstance> {
        list.sort_unstable_by(|a, b| a.id().cmp(b.id()));
        list
    }

    fn diff_ids(before: &[ServiceInstance], after: &[ServiceInstance]) -> Vec<String> {
        let mut ids: Vec<String> = diff_instances(before, after)
            .ids
            .iter()
            .map(|i| i.to_string())
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn the_instance_diff_names_exactly_the_added_removed_and_changed_ids() {
        let inst = |id: &str, port: u16| ServiceInstance::try_new(id, "127.0.0.1", port).unwrap();
        let before = by_id((0..50).map(|i| inst(&format!("i{i}"), 1000 + i)).collect());
        assert_eq!(diff_instances(&before, &before), ServiceDiff::default());
        let mut after = before.clone();
        after.retain(|i| i.id().as_str() != "i7");
        after.push(inst("new", 1));
        after.push(inst("a-first", 1));
        after.push(inst("z-last", 1));
        let pos = after.iter().position(|i| i.id().as_str() == "i9").unwrap();
        after[pos] = inst("i9", 9);
        let w = datapunk_lb_core::Weight::try_new(5).unwrap();
        let pos = after.iter().position(|i| i.id().as_str() == "i3").unwrap();
        after[pos] = after[pos].clone().with_weight(w);
        let after = by_id(after);
        assert_eq!(
            diff_ids(&before, &after),
            ["a-first", "i3", "i7", "i9", "new", "z-last"]
        );
        // The first and the last of the list removed, and nothing after.
        let trimmed = &before[1..before.len() - 1];
        assert_eq!(
            diff_ids(&before, trimmed),
            [before[0].id().to_string(), before[49].id().to_string()]
        );
        assert_eq!(diff_ids(&before, &[]).len(), 50, "all removed");
        assert_eq!(diff_ids(&[], &before).len(), 50, "all added");
    }

    /// A change to any one attribute of an instance, and only that, is a
    /// change: the diff compares whole descriptions, not a digest of them.
    #[test]
    fn the_instance_diff_sees_a_change_in_each_attribute() {
        let base = || {
            ServiceInstance::try_new("x", "10.0.0.1", 80)
                .unwrap()
                .with_weight(datapunk_lb_core::Weight::try_new(2).unwrap())
                .with_zone("z1")
                .with_tags(["a", "b"])
        };
        let others = |x: ServiceInstance| {
            by_id(vec![
                ServiceInstance::try_new("w", "10.0.0.9", 80).unwrap(),
                x,
                ServiceInstance::try_new("y", "10.0.0.9", 80).unwrap(),
            ])
        };
        let before = others(base());
        assert!(diff_instances(&before, &others(base())).ids.is_empty());
        let changed = [
            (
                "address",
                ServiceInstance::try_new("x", "10.0.0.2", 80).unwrap(),
            ),
            (
                "port",
                ServiceInstance::try_new("x", "10.0.0.1", 81).unwrap(),
            ),
            (
                "weight",
                base().with_weight(datapunk_lb_core::Weight::try_new(3).unwrap()),
            ),
            ("zone", base().with_zone("z2")),
            ("tags (one more)", base().with_tags(["a", "b", "c"])),
            ("tags (other order)", base().with_tags(["b", "a"])),
        ];
        for (what, x) in changed {
            // The other attributes as in `base`, where the constructor
            // allows (address and port come with a fresh instance).
            let x = if matches!(what, "address" | "port") {
                x.with_weight(datapunk_lb_core::Weight::try_new(2).unwrap())
                    .with_zone("z1")
                    .with_tags(["a", "b"])
            } else {
                x
            };
            assert_eq!(
                diff_ids(&before, &others(x)),
                ["x"],
                "a changed {what} must be seen"
            );
        }
    }

    #[test]
    fn a_config_instance_is_found_by_id_in_any_file_order() {
        let mut l = Layers::default();
        let mut c = Config::parse(
            "[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nservice = \"api\"\n[service.api]\n[[service.api.instance]]\nid = \"c\"\naddress = \"127.0.0.1\"\nport = 3\n[[service.api.instance]]\nid = \"a\"\naddress = \"127.0.0.1\"\nport = 1\n[[service.api.instance]]\nid = \"b\"\naddress = \"127.0.0.1\"\nport = 2\n",
        )
        .unwrap();
        let ids = |c: &Config| -> Vec<String> {
            c.services["api"]
                .instances
                .iter()
                .map(|i| i.id().to_string())
                .collect()
        };
        assert_eq!(ids(&c), ["a", "b", "c"], "the parser sorts by id");
        // A list built out of order (not by the parser) is sorted on entry.
        c.services.get_mut("api").unwrap().instances.reverse();
        l.set_config(c.services);
        for (id, p) in [("a", 1), ("b", 2), ("c", 3)] {
            assert_eq!(port(&l, id), Some((Source::Config, p)));
            assert!(l.in_config("api", id));
        }
        assert!(!l.in_config("api", "d"));
        assert!(!l.in_config("nope", "a"));
    }

    #[test]
    fn a_stored_consistent_hash_without_a_hash_key_is_ignored() {
        let mut l = layers();
        l.dynamic.service_mut("api").strategy = Some("consistent_hash".into());
        assert_eq!(l.balancing("api").unwrap().strategy.as_str(), "adaptive");
    }
}
