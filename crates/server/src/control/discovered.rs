//! Discovery updates applied to the desired state and the registry: the
//! discovered layer of [`Layers`] changes, then every id the update touched
//! is brought to what [`Layers::resolve`] says.
//!
//! A put registers or updates by id (live state kept). A key that leaves
//! falls back to the layers below it: an admin API registration or the
//! config's instance (unless removed through the admin API) is registered
//! again in place, live state kept; with nothing below, the instance drains
//! for [`DRAIN`] (or the drain the admin API asked for) and the core removes
//! it. Puts of one service go to the core in one `register_instances` (one
//! snapshot rebuild per service per update).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use datapunk_lb_core::{Registry, ServiceInstance};
use tracing::{debug, info, warn};

use super::layers::{Layers, Source};
use crate::config::ServiceConfig;
use crate::metrics::Metrics;
use crate::state::InstanceSpec;

/// How long an instance whose key left keeps finishing in-flight requests.
pub(crate) const DRAIN: Duration = Duration::from_secs(5);

/// Above this many instance changes in one batch, each change is logged at
/// debug and the batch as one info line (a first sync of 100,000 instances
/// should not print 100,000 lines).
pub(crate) const LOG_EACH_LIMIT: usize = 1000;

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

/// What one batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// New instances registered.
    pub added: usize,
    /// Existing instances whose description changed (live state kept).
    pub updated: usize,
    /// Instances drained (or removed at once) because their key left.
    pub removed: usize,
    /// Instances of a lower layer (admin API or config) registered again
    /// because the key overriding them left.
    pub restored: usize,
    /// Keys whose value did not change.
    pub unchanged: usize,
    /// Changes for services not in the config (kept, not routed).
    pub unrouted: usize,
}

/// What discovery remembers besides the set itself.
#[derive(Debug, Default)]
pub(crate) struct Tracking {
    /// Services not in the config already reported.
    warned: HashSet<String>,
    /// Instances drained because their key left, with the drain deadline: a
    /// put of the same id before removal starts a fresh instance.
    draining: HashMap<(String, String), Instant>,
    /// Drain for the next delete of a key, set by the admin API on this node.
    drain_override: HashMap<(String, String), Duration>,
}

impl Tracking {
    /// The drain this node uses when the key of `service/id` next leaves.
    pub(crate) fn set_drain_override(&mut self, service: &str, id: &str, drain: Duration) {
        self.drain_override
            .insert((service.to_owned(), id.to_owned()), drain);
    }

    /// Forgets a drain override (the delete did not happen).
    pub(crate) fn clear_drain_override(&mut self, service: &str, id: &str) {
        self.drain_override
            .remove(&(service.to_owned(), id.to_owned()));
    }
}

/// The discovered set with its tracking, applied over the config alone (no
/// admin API layer): what the discovery benchmark measures. The server
/// applies updates through the control module, over every layer.
#[derive(Debug, Default)]
pub struct Discovered {
    layers: Layers,
    tracking: Tracking,
}

impl Discovered {
    /// Applies a batch to the set and to `registry` (services in `services`
    /// only).
    pub fn apply(
        &mut self,
        batch: Batch,
        registry: &Registry,
        services: &BTreeMap<String, ServiceConfig>,
        metrics: &Metrics,
    ) -> Applied {
        // The same services batch after batch: no clone, no index rebuild.
        if self.layers.config() != services {
            self.layers.set_config(services.clone());
        }
        apply(
            &mut self.layers,
            &mut self.tracking,
            batch,
            registry,
            metrics,
        )
    }

    /// The drain used when the key of `service/id` next leaves.
    pub fn set_drain_override(&mut self, service: &str, id: &str, drain: Duration) {
        self.tracking.set_drain_override(service, id, drain);
    }

    /// Whether `service/id` is discovered.
    pub fn contains(&self, service: &str, id: &str) -> bool {
        self.layers
            .discovered
            .get(service)
            .is_some_and(|m| m.contains_key(id))
    }
}

/// Number of discovered instances, every service.
pub(crate) fn count(layers: &Layers) -> usize {
    layers.discovered.values().map(HashMap::len).sum()
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

/// One id whose discovered value changed.
enum Action {
    Put { id: String, new: bool },
    Delete { id: String },
}

/// Applies a batch: the discovered layer first, then the registry, one
/// service at a time. Logs each change (see [`LOG_EACH_LIMIT`]).
pub(crate) fn apply(
    layers: &mut Layers,
    tracking: &mut Tracking,
    batch: Batch,
    registry: &Registry,
    metrics: &Metrics,
) -> Applied {
    let full = matches!(batch, Batch::Full { .. });
    let (plan, mut out) = plan(&mut layers.discovered, batch);
    let log_each = plan.values().map(Vec::len).sum::<usize>() <= LOG_EACH_LIMIT;
    let now = Instant::now();
    tracking
        .draining
        .retain(|_, deadline| *deadline + Duration::from_secs(10) > now);
    let layers = &*layers;
    for (service, actions) in plan {
        if !layers.is_configured(&service) {
            out.unrouted += actions.len();
            if tracking.warned.insert(service.clone()) {
                warn!(
                    service = service.as_str(),
                    instances = layers.discovered.get(&service).map_or(0, HashMap::len),
                    reason = "service not in the config",
                    "discovery: skipping instances of an unknown service (no route reaches them)"
                );
            }
            continue;
        }
        let reasons = Reasons::new(full, log_each);
        apply_service(
            layers, tracking, &service, actions, registry, metrics, reasons, &mut out,
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

/// Updates the set; returns per-service actions (in batch order) and the
/// unchanged count.
fn plan(
    set: &mut super::layers::DiscoveredSet,
    batch: Batch,
) -> (BTreeMap<String, Vec<Action>>, Applied) {
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
                set.iter()
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
        let current = set.get(&service).and_then(|m| m.get(&id));
        match spec {
            Some(spec) => {
                if current == Some(&spec) {
                    out.unchanged += 1;
                    continue;
                }
                let new = current.is_none();
                set.entry(service.clone())
                    .or_default()
                    .insert(id.clone(), spec);
                plan.entry(service)
                    .or_default()
                    .push(Action::Put { id, new });
            }
            None => {
                if current.is_none() {
                    continue;
                }
                if let Some(m) = set.get_mut(&service) {
                    m.remove(&id);
                    if m.is_empty() {
                        set.remove(&service);
                    }
                }
                plan.entry(service).or_default().push(Action::Delete { id });
            }
        }
    }
    (plan, out)
}

/// The `reason` of each log line of one batch, and whether each change is
/// logged at info.
#[derive(Clone, Copy)]
struct Reasons {
    put: &'static str,
    delete: &'static str,
    log_each: bool,
}

impl Reasons {
    fn new(full: bool, log_each: bool) -> Self {
        Self {
            put: if full { "etcd sync" } else { "etcd put" },
            delete: if full {
                "gone from etcd at sync"
            } else {
                "etcd key deleted"
            },
            log_each,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn apply_service(
    layers: &Layers,
    tracking: &mut Tracking,
    service: &str,
    actions: Vec<Action>,
    registry: &Registry,
    metrics: &Metrics,
    reasons: Reasons,
    out: &mut Applied,
) {
    let mut puts: Vec<ServiceInstance> = Vec::new();
    let mut drains = Vec::new();
    for a in actions {
        match a {
            Action::Put { id, new } => {
                let Some((_, instance)) = layers.resolve(service, &id) else {
                    continue;
                };
                // An id still draining from an earlier delete comes back as
                // a fresh instance, not as a draining one.
                if !tracking.draining.is_empty()
                    && tracking
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
                if reasons.log_each {
                    info!(
                        service,
                        instance = id.as_str(),
                        address = instance.address(),
                        port = instance.port(),
                        weight = instance.weight().get(),
                        from,
                        to = "registered",
                        reason = reasons.put,
                        "instance {}",
                        if new { "registered" } else { "updated" }
                    );
                } else {
                    debug!(
                        service,
                        instance = id.as_str(),
                        from,
                        to = "registered",
                        reason = reasons.put,
                        "instance registered"
                    );
                }
                puts.push(instance);
            }
            Action::Delete { id } => match layers.resolve(service, &id) {
                // A lower layer still wants this id: it comes back in place.
                Some((source, instance)) => {
                    tracking.clear_drain_override(service, &id);
                    out.restored += 1;
                    if reasons.log_each {
                        info!(
                            service,
                            instance = id.as_str(),
                            from = "discovered",
                            to = "registered",
                            source = source.as_str(),
                            reason = restored_reason(source),
                            "instance restored"
                        );
                    }
                    puts.push(instance);
                }
                None => drains.push(id),
            },
        }
    }
    if !puts.is_empty() {
        if let Err(e) = registry.register_instances(service, puts) {
            warn!(service, error = %e, "discovery: registering instances failed");
        }
    }
    for id in drains {
        let key = (service.to_owned(), id);
        let drain = tracking.drain_override.remove(&key).unwrap_or(DRAIN);
        let id = key.1.as_str();
        match super::drain_instance(registry, service, id, drain) {
            Ok(events) => {
                metrics.report(events);
                if !drain.is_zero() {
                    tracking
                        .draining
                        .insert(key.clone(), Instant::now() + drain);
                }
                out.removed += 1;
                let to = super::drained_to(drain);
                if reasons.log_each {
                    info!(service, instance = id, from = "registered", to, reason = reasons.delete, drain = ?drain, "instance {to}");
                } else {
                    debug!(
                        service,
                        instance = id,
                        from = "registered",
                        to,
                        reason = reasons.delete,
                        "instance {to}"
                    );
                }
            }
            Err(e) => {
                debug!(service, instance = id, error = %e, "discovery: delete of an instance not registered")
            }
        }
    }
}

fn restored_reason(source: Source) -> &'static str {
    match source {
        Source::Config => "etcd key left; config instance restored",
        Source::Dynamic => "etcd key left; admin API instance restored",
        // Not reachable: the key just left the discovered layer.
        Source::Discovered => "etcd key left; still discovered",
    }
}
