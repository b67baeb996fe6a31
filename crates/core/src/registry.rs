//! The [`Registry`] of services, each a [`Service`]: the member list,
//! strategy and configuration, and the rules that tie instances, health,
//! breakers, draining and panic mode together.
//!
//! ## Concurrency
//!
//! Each service publishes an immutable [`Snapshot`] (members, strategy,
//! config, generation) behind one `ArcSwap`. Selection loads it without a
//! lock; writers (registration, removal, strategy change) serialise on the
//! service's writer lock, build a new snapshot and store it. Per-instance live
//! state is shared between snapshots (see [`instance`](crate::instance)), so
//! a reader holding an old snapshot still reports outcomes to the right
//! place. The service map itself is another `ArcSwap`, so `get_instance` by
//! name takes no lock either.
//!
//! ## Eligibility and panic mode
//!
//! An instance is eligible when it is not draining, its health score is above
//! 0 and its breaker admits traffic. The service keeps exact counters of
//! members, draining and unavailable (ejected or breaker-open) instances,
//! updated whenever an instance's state changes, so deciding panic mode costs
//! three atomic loads per pick: with `eligible < min_healthy_percent ×
//! (members − draining)` the service selects across every non-draining
//! instance, ignoring health and breakers, as Envoy does — better to spread
//! load over struggling instances than to crush the few that remain. An
//! instance whose open window has elapsed counts as unavailable until a pick
//! moves it to half-open.
//!
//! ## Identity
//!
//! Registering an id that exists updates its description and keeps its live
//! state (health, breaker, counts). Deregistering forgets it; an instance
//! registered again later starts fresh, with slow start.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::breaker::{Admission, CircuitState};
use crate::clock::{Clock, SystemClock, Timestamp};
use crate::config::LoadBalancerConfig;
use crate::error::{ConfigError, RegistryError};
use crate::event::Event;
use crate::health::HealthScore;
use crate::instance::{
    InstanceId, InstanceInner, InstanceState, InstanceStatus, Member, ServiceInstance, Weight,
};
use crate::members::Members;
use crate::selection::{Outcome, Selection};
use crate::strategy::{AdaptiveStatus, PickContext, Strategy, StrategyKind};

/// Picks attempted when the chosen instance's breaker refuses admission.
const ADMISSION_ATTEMPTS: usize = 3;

/// All services and their instances.
///
/// ```
/// use std::time::Duration;
/// use datapunk_lb_core::{Registry, ServiceInstance};
///
/// let registry = Registry::new();
/// registry.register_instance("api", ServiceInstance::try_new("api-1", "10.0.0.1", 8080)?)?;
/// let selection = registry.get_instance("api").expect("one eligible instance");
/// assert_eq!(selection.instance().port(), 8080);
/// let _events = selection.success(Duration::from_millis(3));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Registry {
    services: ArcSwap<HashMap<Arc<str>, Arc<Service>>>,
    write: Mutex<()>,
    defaults: LoadBalancerConfig,
    clock: Arc<dyn Clock>,
    seed: AtomicU64,
}

/// Builds a [`Registry`].
#[derive(Debug, Default)]
pub struct RegistryBuilder {
    config: Option<LoadBalancerConfig>,
    clock: Option<Arc<dyn Clock>>,
    seed: Option<u64>,
}

/// One service: its snapshot, writer state and counters.
#[derive(Debug)]
pub struct Service {
    name: Arc<str>,
    clock: Arc<dyn Clock>,
    config: ArcSwap<LoadBalancerConfig>,
    snapshot: ArcSwap<Snapshot>,
    writer: Mutex<Writer>,
    stats: ServiceStats,
    panic: AtomicBool,
    rng: AtomicU64,
}

/// What selection reads: immutable, replaced on every change.
#[derive(Debug)]
pub struct Snapshot {
    members: Members,
    generation: u64,
    strategy: Arc<dyn Strategy>,
    config: Arc<LoadBalancerConfig>,
}

#[derive(Debug, Default)]
struct Writer {
    index: HashMap<InstanceId, usize>,
    draining: HashSet<InstanceId>,
    generation: u64,
}

/// Exact counters of one service, updated on every state change.
#[derive(Debug, Default)]
pub struct ServiceStats {
    pub(crate) inflight: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) failures: AtomicU64,
    members: AtomicUsize,
    draining: AtomicUsize,
    unavailable: AtomicUsize,
}

/// Where an outcome came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A request through a `Selection`: counted, feeds the EWMA.
    Request,
    /// An active health check: moves health and breaker only.
    Probe,
}

/// Whether a registration added an instance or updated one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A new id.
    Added,
    /// An existing id: description replaced, live state kept.
    Updated,
}

/// A report of one service, for the admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Configured strategy.
    pub strategy: StrategyKind,
    /// For `adaptive`: the strategy in use and why.
    pub adaptive: Option<AdaptiveStatus>,
    /// Registered instances.
    pub instances: usize,
    /// Instances eligible for selection (by the service's counters).
    pub eligible: usize,
    /// Draining instances.
    pub draining: usize,
    /// Whether the service is in panic mode.
    pub panic: bool,
    /// Requests in flight.
    pub in_flight: u64,
}

// === impl RegistryBuilder ===

impl RegistryBuilder {
    /// Default configuration for every service. Default: the SPEC defaults.
    pub fn config(mut self, config: LoadBalancerConfig) -> Self {
        self.config = Some(config);
        self
    }

    /// The clock. Default: [`SystemClock`].
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Seed for every random choice. Default: random.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Validates the configuration and builds the registry.
    pub fn build(self) -> Result<Registry, ConfigError> {
        let defaults = self.config.unwrap_or_default();
        defaults.validate()?;
        Ok(Registry {
            services: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
            defaults,
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock::new())),
            seed: AtomicU64::new(self.seed.unwrap_or_else(|| fastrand::u64(..))),
        })
    }
}

// === impl Registry ===

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry with SPEC defaults, the system clock and a random seed.
    pub fn new() -> Self {
        Self {
            services: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
            defaults: LoadBalancerConfig::default(),
            clock: Arc::new(SystemClock::new()),
            seed: AtomicU64::new(fastrand::u64(..)),
        }
    }

    /// A builder for a registry with a given config, clock or seed.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// The registry's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The default configuration.
    pub fn defaults(&self) -> &LoadBalancerConfig {
        &self.defaults
    }

    /// The service `name`, if registered. Holding the `Arc` lets a caller
    /// select without looking the name up per request.
    pub fn service(&self, name: &str) -> Option<Arc<Service>> {
        self.services.load().get(name).cloned()
    }

    /// Names of all services.
    pub fn service_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.services.load().keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    fn known(&self, name: &str) -> Result<Arc<Service>, RegistryError> {
        self.service(name)
            .ok_or_else(|| RegistryError::UnknownService(name.to_owned()))
    }

    fn service_or_create(&self, name: &str) -> Result<Arc<Service>, RegistryError> {
        if name.is_empty() {
            return Err(RegistryError::EmptyServiceName);
        }
        if let Some(s) = self.service(name) {
            return Ok(s);
        }
        let _w = self.write.lock();
        let map = self.services.load();
        if let Some(s) = map.get(name) {
            return Ok(s.clone());
        }
        let seed = self
            .seed
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        let svc = Arc::new(Service::new(
            Arc::from(name),
            self.clock.clone(),
            self.defaults.clone(),
            splitmix(seed),
        ));
        let mut next = HashMap::clone(&map);
        next.insert(svc.name.clone(), svc.clone());
        self.services.store(Arc::new(next));
        Ok(svc)
    }

    /// Sets a service's own configuration (creating the service if needed).
    /// A changed strategy takes effect for the next pick.
    pub fn configure_service(
        &self,
        service: &str,
        config: LoadBalancerConfig,
    ) -> Result<(), RegistryError> {
        config.validate()?;
        self.service_or_create(service)?.set_config(config);
        Ok(())
    }

    /// Changes a service's strategy.
    pub fn set_strategy(&self, service: &str, strategy: StrategyKind) -> Result<(), RegistryError> {
        let svc = self.known(service)?;
        let mut cfg = LoadBalancerConfig::clone(&svc.config.load());
        cfg.strategy = strategy;
        svc.set_config(cfg);
        Ok(())
    }

    /// Removes a service and all its instances.
    pub fn remove_service(&self, service: &str) -> Result<(), RegistryError> {
        let _w = self.write.lock();
        let map = self.services.load();
        if !map.contains_key(service) {
            return Err(RegistryError::UnknownService(service.to_owned()));
        }
        let mut next = HashMap::clone(&map);
        if let Some(svc) = next.remove(service) {
            svc.mark_all_removed();
        }
        self.services.store(Arc::new(next));
        Ok(())
    }

    /// Registers an instance, or updates it if its id exists (keeping its
    /// live state). Creates the service if needed. A new instance joining a
    /// service that already has members starts slow start.
    pub fn register_instance(
        &self,
        service: &str,
        instance: ServiceInstance,
    ) -> Result<Registered, RegistryError> {
        let svc = self.service_or_create(service)?;
        let mut out = Registered::Added;
        svc.write(|w, members, now, cfg| {
            out = w.upsert(members, instance, now, cfg, &svc.stats);
        });
        Ok(out)
    }

    /// Registers many instances with one snapshot rebuild. Instances that
    /// join an empty service start at full weight.
    pub fn register_instances(
        &self,
        service: &str,
        instances: impl IntoIterator<Item = ServiceInstance>,
    ) -> Result<(), RegistryError> {
        let svc = self.service_or_create(service)?;
        svc.write(|w, members, now, cfg| {
            let was_empty = members.is_empty();
            for inst in instances {
                let cfg = if was_empty { None } else { cfg };
                w.upsert(members, inst, now, cfg, &svc.stats);
            }
        });
        Ok(())
    }

    /// Removes an instance at once. Selections already made on it finish
    /// normally.
    pub fn deregister_instance(
        &self,
        service: &str,
        id: &str,
    ) -> Result<ServiceInstance, RegistryError> {
        let svc = self.known(service)?;
        let mut removed = None;
        svc.write(|w, members, _, _| {
            removed = w.remove(members, id, &svc.stats);
        });
        removed.ok_or_else(|| unknown_instance(service, id))
    }

    /// Stops new selections of an instance; [`maintain`](Self::maintain)
    /// removes it once its connections reach zero or `timeout` passes.
    pub fn drain_instance(
        &self,
        service: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<Vec<Event>, RegistryError> {
        let svc = self.known(service)?;
        let now = self.clock.now();
        let mut w = svc.writer.lock();
        let snap = svc.snapshot.load();
        let idx = *w
            .index
            .get(id)
            .ok_or_else(|| unknown_instance(service, id))?;
        let member = snap
            .members
            .get(idx)
            .ok_or_else(|| unknown_instance(service, id))?;
        let st = member.state();
        let mut events = Vec::new();
        {
            let mut inner = st.inner.lock();
            inner.drain_deadline = Some(now + timeout);
            st.set_draining(true);
            if !inner.counted_draining {
                inner.counted_draining = true;
                svc.stats.draining.fetch_add(1, Ordering::AcqRel);
                events.push(Event::Eligibility {
                    service: svc.name.clone(),
                    instance: member.instance().id().clone(),
                    eligible: false,
                    reason: "draining",
                });
            }
            svc.refresh_availability(member, &mut inner, now, &mut events);
        }
        w.draining.insert(member.instance().id().clone());
        drop(w);
        svc.check_panic(&svc.config.load(), &mut events);
        Ok(events)
    }

    /// Periodic upkeep, off the request path; call it every 100 ms or so
    /// (the server does). Removes drained instances whose connections
    /// reached zero or whose drain timeout passed, and rebuilds strategy
    /// tables left stale by changes to large services.
    pub fn maintain(&self) -> Vec<Event> {
        let now = self.clock.now();
        let mut events = Vec::new();
        for svc in self.services.load().values() {
            let snap = svc.snapshot.load_full();
            snap.strategy.maintain(&snap.members, snap.generation, now);
            if svc.writer.lock().draining.is_empty() {
                continue;
            }
            svc.write(|w, members, _, _| {
                let ids: Vec<InstanceId> = w.draining.iter().cloned().collect();
                for id in ids {
                    let Some(m) = w.index.get(&id).and_then(|&i| members.get(i)) else {
                        w.draining.remove(&id);
                        continue;
                    };
                    let deadline = m.state().inner.lock().drain_deadline;
                    let reason = if m.active_connections() == 0 {
                        "drained"
                    } else if deadline.is_some_and(|d| now >= d) {
                        "drain timeout"
                    } else {
                        continue;
                    };
                    if let Some(inst) = w.remove(members, id.as_str(), &svc.stats) {
                        events.push(Event::Removed {
                            service: svc.name.clone(),
                            instance: inst.id().clone(),
                            reason,
                        });
                    }
                }
            });
        }
        events
    }

    /// Selects an instance of `service`, or `None` if the service is unknown
    /// or has no eligible instance.
    pub fn get_instance(&self, service: &str) -> Option<Selection> {
        self.service(service)?.select(None)
    }

    /// Like [`get_instance`](Self::get_instance), with a request key for
    /// `consistent_hash` (ignored by other strategies).
    pub fn get_instance_with_key(&self, service: &str, key: &[u8]) -> Option<Selection> {
        self.service(service)?.select(Some(key))
    }

    /// Like [`get_instance_with_key`](Self::get_instance_with_key) (`key`
    /// optional), choosing only among instances `accept` accepts; see
    /// [`Service::select_with`].
    pub fn get_instance_with(
        &self,
        service: &str,
        key: Option<&[u8]>,
        accept: impl Fn(&Member) -> bool,
    ) -> Option<Selection> {
        self.service(service)?.select_with(key, accept)
    }

    /// Sets an instance's health score. Rejects NaN, infinities and values
    /// outside `0..=1`; 0 removes the instance from selection, and raising it
    /// from 0 starts slow start.
    pub fn update_instance_health(
        &self,
        service: &str,
        id: &str,
        score: f64,
    ) -> Result<Vec<Event>, RegistryError> {
        let score = HealthScore::try_from(score)?;
        let svc = self.known(service)?;
        let member = svc
            .member(id)
            .ok_or_else(|| unknown_instance(service, id))?;
        let now = self.clock.now();
        let mut events = Vec::new();
        {
            let st = member.state();
            let mut inner = st.inner.lock();
            let was_ejected = inner.health.score() == HealthScore::EJECTED;
            inner.health.set(score);
            if was_ejected && score != HealthScore::EJECTED {
                st.start_slow_start(now);
            }
            st.publish(&inner);
            svc.refresh_availability(&member, &mut inner, now, &mut events);
        }
        svc.check_panic(&svc.config.load(), &mut events);
        Ok(events)
    }

    /// Changes an instance's configured weight (`1..=1000`).
    pub fn update_instance_weight(
        &self,
        service: &str,
        id: &str,
        weight: u64,
    ) -> Result<(), RegistryError> {
        let weight = Weight::try_new(weight)?;
        let svc = self.known(service)?;
        let member = svc
            .member(id)
            .ok_or_else(|| unknown_instance(service, id))?;
        let inst = member.instance().clone().with_weight(weight);
        self.register_instance(service, inst).map(|_| ())
    }

    /// Records an outcome not tied to a selection (an active health check).
    /// It moves the health score and the breaker like a request's outcome,
    /// but is not counted as a request and does not feed the latency EWMA
    /// (a probe's latency says little about a real request's).
    pub fn report_outcome(
        &self,
        service: &str,
        id: &str,
        outcome: Outcome,
    ) -> Result<Vec<Event>, RegistryError> {
        let svc = self.known(service)?;
        let member = svc
            .member(id)
            .ok_or_else(|| unknown_instance(service, id))?;
        Ok(svc.record(&member, outcome, Source::Probe))
    }

    /// A report of every service, sorted by name.
    pub fn services(&self) -> Vec<ServiceStatus> {
        let mut v: Vec<_> = self.services.load().values().map(|s| s.status()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// A report of one service's instances, in member order.
    pub fn instances(&self, service: &str) -> Result<Vec<InstanceStatus>, RegistryError> {
        Ok(self.known(service)?.instances())
    }

    /// A report of one instance.
    pub fn instance(&self, service: &str, id: &str) -> Result<InstanceStatus, RegistryError> {
        let svc = self.known(service)?;
        let m = svc
            .member(id)
            .ok_or_else(|| unknown_instance(service, id))?;
        let cfg = svc.config.load();
        Ok(m.status(
            self.clock.now(),
            cfg.slow_start,
            cfg.breaker.half_open_max_probes,
        ))
    }
}

fn unknown_instance(service: &str, id: &str) -> RegistryError {
    RegistryError::UnknownInstance {
        service: service.to_owned(),
        instance: id.to_owned(),
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// === impl Service ===

impl Service {
    fn new(name: Arc<str>, clock: Arc<dyn Clock>, config: LoadBalancerConfig, seed: u64) -> Self {
        let strategy = config.strategy.build();
        let config = Arc::new(config);
        Self {
            name,
            clock,
            config: ArcSwap::new(config.clone()),
            snapshot: ArcSwap::from_pointee(Snapshot {
                members: Members::default(),
                generation: 0,
                strategy,
                config,
            }),
            writer: Mutex::new(Writer::default()),
            stats: ServiceStats::default(),
            panic: AtomicBool::new(false),
            rng: AtomicU64::new(seed),
        }
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub(crate) fn stats(&self) -> &ServiceStats {
        &self.stats
    }

    /// The service's configuration.
    pub fn config(&self) -> Arc<LoadBalancerConfig> {
        self.config.load_full()
    }

    /// Whether the service was in panic mode at the last pick or change.
    pub fn in_panic(&self) -> bool {
        self.panic.load(Ordering::Relaxed)
    }

    /// The current snapshot's member list (cheap to clone).
    pub fn members(&self) -> Members {
        self.snapshot.load().members.clone()
    }

    fn next_seed(&self) -> u64 {
        splitmix(self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed))
    }

    fn member(&self, id: &str) -> Option<Arc<Member>> {
        let w = self.writer.lock();
        let idx = *w.index.get(id)?;
        self.snapshot.load().members.get(idx).cloned()
    }

    /// Selects an instance; see [`Registry::get_instance`]. The same as
    /// [`select_with`](Self::select_with) with a filter that accepts all.
    pub fn select(self: &Arc<Self>, key: Option<&[u8]>) -> Option<Selection> {
        self.pick(key, None)
    }

    /// Selects an instance that `accept` accepts, or `None` if no eligible
    /// instance is acceptable.
    ///
    /// `accept` is consulted inside the pick, like eligibility: the strategy
    /// skips refused members, so the caller never re-draws (Pingora's
    /// `select_with`). Use it for "not an instance this request already
    /// tried" or "under its connection limit". Round robin moves past a
    /// refused instance in its rotation; `consistent_hash` falls over to the
    /// next instance in its table order for the key, the same one every
    /// time; panic mode and half-open probe limits apply as in
    /// [`select`](Self::select).
    ///
    /// ```
    /// use datapunk_lb_core::{Registry, ServiceInstance};
    ///
    /// let registry = Registry::new();
    /// registry.register_instance("api", ServiceInstance::try_new("api-1", "10.0.0.1", 80)?)?;
    /// registry.register_instance("api", ServiceInstance::try_new("api-2", "10.0.0.2", 80)?)?;
    /// let svc = registry.service("api").expect("registered");
    /// let s = svc.select_with(None, |m| m.instance().id().as_str() != "api-1").expect("api-2");
    /// assert_eq!(s.instance().id().as_str(), "api-2");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn select_with(
        self: &Arc<Self>,
        key: Option<&[u8]>,
        accept: impl Fn(&Member) -> bool,
    ) -> Option<Selection> {
        self.pick(key, Some(&accept))
    }

    fn pick(
        self: &Arc<Self>,
        key: Option<&[u8]>,
        accept: Option<&dyn Fn(&Member) -> bool>,
    ) -> Option<Selection> {
        let snap = self.snapshot.load();
        if snap.members.is_empty() {
            return None;
        }
        let now = self.clock.now();
        let mut events = Vec::new();
        let panic = self.check_panic(&snap.config, &mut events);
        let mut rng = fastrand::Rng::with_seed(self.next_seed());
        for _ in 0..ADMISSION_ATTEMPTS {
            let mut cx = PickContext {
                members: &snap.members,
                generation: snap.generation,
                key,
                rng: &mut rng,
                now,
                panic,
                slow_start: snap.config.slow_start,
                max_probes: snap.config.breaker.half_open_max_probes,
                stats: &self.stats,
                service: &self.name,
                events: &mut events,
                accept,
            };
            let member = snap.strategy.pick(&mut cx)?;
            let kind = snap.strategy.effective_kind();
            // Panic mode ignores breakers, so it takes no probe slot.
            let probe = if panic {
                false
            } else {
                match self.admit(&member, now, &snap.config, &mut events) {
                    Admission::Admitted => false,
                    Admission::Probe(_) => true,
                    Admission::Rejected => continue,
                }
            };
            return Some(Selection::new(
                self.clone(),
                member,
                now,
                probe,
                kind,
                events,
            ));
        }
        None
    }

    fn admit(
        &self,
        member: &Member,
        now: Timestamp,
        cfg: &LoadBalancerConfig,
        events: &mut Vec<Event>,
    ) -> Admission {
        if member.circuit_state() == CircuitState::Closed {
            return Admission::Admitted; // the common case: no lock
        }
        let st = member.state();
        let mut inner = st.inner.lock();
        let admission = inner.breaker.try_admit(now, cfg);
        if let Admission::Probe(Some(t)) = admission {
            events.push(Event::Breaker {
                service: self.name.clone(),
                instance: member.instance().id().clone(),
                transition: t,
            });
        }
        st.publish(&inner);
        self.refresh_availability(member, &mut inner, now, events);
        admission
    }

    pub(crate) fn release_probe(&self, member: &Member) {
        let st = member.state();
        let mut inner = st.inner.lock();
        inner.breaker.release_probe();
        st.publish(&inner);
    }

    /// Records an outcome on `member` and returns the events it caused.
    pub(crate) fn record(&self, member: &Member, outcome: Outcome, source: Source) -> Vec<Event> {
        let now = self.clock.now();
        let cfg = self.config.load();
        let st = member.state();
        let request = source == Source::Request;
        if request {
            st.requests.fetch_add(1, Ordering::Relaxed);
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
        }
        let jitter = (self.next_seed() >> 11) as f64 / (1u64 << 53) as f64;
        let mut events = Vec::new();
        {
            let mut inner = st.inner.lock();
            let transition = match outcome {
                Outcome::Success(latency) => {
                    inner.health.on_success(now);
                    if request {
                        inner.ewma.observe(latency, now);
                    }
                    inner.breaker.on_success(now, &cfg)
                }
                Outcome::Failure(kind) => {
                    if request {
                        st.failures.fetch_add(1, Ordering::Relaxed);
                        st.failures_by_kind[kind.index()].fetch_add(1, Ordering::Relaxed);
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    inner.health.on_failure(now);
                    inner.breaker.on_failure(now, &cfg, jitter)
                }
            };
            if let Some(t) = transition {
                if t.to == CircuitState::Closed {
                    st.start_slow_start(now);
                }
                events.push(Event::Breaker {
                    service: self.name.clone(),
                    instance: member.instance().id().clone(),
                    transition: t,
                });
            }
            st.publish(&inner);
            self.refresh_availability(member, &mut inner, now, &mut events);
        }
        if !events.is_empty() {
            self.check_panic(&cfg, &mut events);
        }
        events
    }

    /// Re-counts `member` as available or not after a change, with the
    /// instance lock held.
    fn refresh_availability(
        &self,
        member: &Member,
        inner: &mut InstanceInner,
        _now: Timestamp,
        events: &mut Vec<Event>,
    ) {
        let st = member.state();
        if st.removed.load(Ordering::Acquire) {
            return;
        }
        let unavailable = st.is_unavailable(inner);
        if unavailable == inner.counted_unavailable {
            return;
        }
        inner.counted_unavailable = unavailable;
        if unavailable {
            self.stats.unavailable.fetch_add(1, Ordering::AcqRel);
        } else {
            self.stats.unavailable.fetch_sub(1, Ordering::AcqRel);
        }
        let reason = match (unavailable, inner.breaker.state()) {
            (true, CircuitState::Open) => "circuit open",
            (true, _) => "health score 0",
            (false, CircuitState::HalfOpen) => "circuit half-open: probing",
            (false, _) => "recovered",
        };
        events.push(Event::Eligibility {
            service: self.name.clone(),
            instance: member.instance().id().clone(),
            eligible: !unavailable,
            reason,
        });
    }

    /// Decides panic mode from the counters; reports a change.
    fn check_panic(&self, cfg: &LoadBalancerConfig, events: &mut Vec<Event>) -> bool {
        let (total, eligible) = self.stats.counted();
        let panic = total > 0 && eligible * 100 < usize::from(cfg.min_healthy_percent) * total;
        if self.panic.load(Ordering::Relaxed) != panic
            && self.panic.swap(panic, Ordering::AcqRel) != panic
        {
            events.push(Event::Panic {
                service: self.name.clone(),
                entered: panic,
                eligible,
                total,
            });
        }
        panic
    }

    fn set_config(&self, config: LoadBalancerConfig) {
        let mut w = self.writer.lock();
        let config = Arc::new(config);
        self.config.store(config.clone());
        let old = self.snapshot.load();
        let strategy = if old.strategy.kind() == config.strategy {
            old.strategy.clone()
        } else {
            config.strategy.build()
        };
        w.generation += 1;
        let snap = Snapshot {
            members: old.members.clone(),
            generation: w.generation,
            strategy: strategy.clone(),
            config,
        };
        let members = snap.members.clone();
        self.snapshot.store(Arc::new(snap));
        strategy.prepare(&members, w.generation, self.clock.now());
    }

    /// Runs `f` on a copy of the member list under the writer lock, then
    /// publishes the result as the next snapshot. `f` gets the config only
    /// if new instances should slow-start.
    fn write(
        &self,
        f: impl FnOnce(&mut Writer, &mut Members, Timestamp, Option<&LoadBalancerConfig>),
    ) {
        let mut w = self.writer.lock();
        let old = self.snapshot.load_full();
        let mut members = old.members.clone();
        let now = self.clock.now();
        let slow =
            (!old.config.slow_start.is_zero() && !members.is_empty()).then_some(&*old.config);
        f(&mut w, &mut members, now, slow);
        w.generation += 1;
        let generation = w.generation;
        self.snapshot.store(Arc::new(Snapshot {
            members: members.clone(),
            generation,
            strategy: old.strategy.clone(),
            config: old.config.clone(),
        }));
        drop(w);
        old.strategy.prepare(&members, generation, now);
    }

    fn mark_all_removed(&self) {
        let snap = self.snapshot.load();
        for m in snap.members.iter() {
            m.state().removed.store(true, Ordering::Release);
        }
    }

    /// A report of this service.
    pub fn status(&self) -> ServiceStatus {
        let snap = self.snapshot.load();
        let (total, eligible) = self.stats.counted();
        ServiceStatus {
            name: self.name.to_string(),
            strategy: snap.strategy.kind(),
            adaptive: snap.strategy.adaptive_status(),
            instances: snap.members.len(),
            eligible,
            draining: snap.members.len() - total,
            panic: self.in_panic(),
            in_flight: self.stats.inflight.load(Ordering::Relaxed),
        }
    }

    /// A report of every instance, in member order.
    pub fn instances(&self) -> Vec<InstanceStatus> {
        let snap = self.snapshot.load();
        let now = self.clock.now();
        let cfg = &snap.config;
        snap.members
            .iter()
            .map(|m| m.status(now, cfg.slow_start, cfg.breaker.half_open_max_probes))
            .collect()
    }
}

// === impl Writer ===

impl Writer {
    /// Adds or updates; `slow` is set when a new instance should ramp.
    fn upsert(
        &mut self,
        members: &mut Members,
        instance: ServiceInstance,
        now: Timestamp,
        slow: Option<&LoadBalancerConfig>,
        stats: &ServiceStats,
    ) -> Registered {
        if let Some(&idx) = self.index.get(instance.id().as_str()) {
            if let Some(old) = members.get(idx) {
                let m = Member::new(instance, old.state().clone());
                members.set(idx, Arc::new(m));
                return Registered::Updated;
            }
        }
        let id = instance.id().clone();
        let state = Arc::new(InstanceState::new(now, slow.is_some()));
        let idx = members.push(Arc::new(Member::new(instance, state)));
        self.index.insert(id, idx);
        stats.members.fetch_add(1, Ordering::AcqRel);
        Registered::Added
    }

    /// Removes `id`; returns its description if it was there.
    fn remove(
        &mut self,
        members: &mut Members,
        id: &str,
        stats: &ServiceStats,
    ) -> Option<ServiceInstance> {
        let idx = self.index.remove(id)?;
        self.draining.remove(id);
        let removed = members.swap_remove(idx)?;
        if let Some(moved) = members.get(idx) {
            if let Some(slot) = self.index.get_mut(moved.instance().id().as_str()) {
                *slot = idx;
            }
        }
        let st = removed.state();
        let mut inner = st.inner.lock();
        st.removed.store(true, Ordering::Release);
        if inner.counted_unavailable {
            inner.counted_unavailable = false;
            stats.unavailable.fetch_sub(1, Ordering::AcqRel);
        }
        if inner.counted_draining {
            inner.counted_draining = false;
            stats.draining.fetch_sub(1, Ordering::AcqRel);
        }
        stats.members.fetch_sub(1, Ordering::AcqRel);
        Some(removed.instance().clone())
    }
}

// === impl ServiceStats ===

impl ServiceStats {
    /// `(members − draining, eligible)`.
    fn counted(&self) -> (usize, usize) {
        let members = self.members.load(Ordering::Acquire);
        let draining = self.draining.load(Ordering::Acquire);
        let unavailable = self.unavailable.load(Ordering::Acquire);
        let total = members.saturating_sub(draining);
        (total, total.saturating_sub(unavailable))
    }

    /// Instances counted as eligible.
    pub(crate) fn available(&self) -> usize {
        self.counted().1
    }
}
