//! The [`Registry`]: the name → [`Service`] map, and the operations that
//! address a service (and an instance in it) by name.
//!
//! The map is an `ArcSwap`, so `get_instance` by name takes no lock; changes
//! to the map serialise on one writer lock. Everything about one service —
//! its snapshot, selection, outcomes, counters — is in
//! [`service`](crate::service).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use thiserror::Error;

use crate::clock::{Clock, SystemClock};
use crate::config::LoadBalancerConfig;
use crate::error::{ConfigError, HealthScoreError};
use crate::event::Event;
use crate::health::HealthScore;
use crate::instance::{InstanceError, InstanceStatus, Member, ServiceInstance, Weight};
use crate::recorder::splitmix;
use crate::selection::{Outcome, Selection};
use crate::service::{Registered, Service, ServiceStatus};
use crate::strategy::StrategyKind;

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

/// An operation on the [`Registry`] was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RegistryError {
    /// No service by that name is registered.
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// The service exists but has no instance with that id.
    #[error("unknown instance {instance:?} in service {service:?}")]
    UnknownInstance {
        /// The service name.
        service: String,
        /// The instance id that was not found.
        instance: String,
    },
    /// The service name is empty.
    #[error("service name must not be empty")]
    EmptyServiceName,
    /// An instance description was invalid.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// A health score was invalid.
    #[error(transparent)]
    HealthScore(#[from] HealthScoreError),
    /// A configuration was invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
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

    /// The service `service` and its member `id`, or the error naming
    /// whichever is missing.
    fn known_member(
        &self,
        service: &str,
        id: &str,
    ) -> Result<(Arc<Service>, Arc<Member>), RegistryError> {
        let svc = self.known(service)?;
        let member = svc
            .member(id)
            .ok_or_else(|| unknown_instance(service, id))?;
        Ok((svc, member))
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
        next.insert(svc.name_arc().clone(), svc.clone());
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
        let mut cfg = LoadBalancerConfig::clone(&svc.config());
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
        Ok(self.service_or_create(service)?.register(instance))
    }

    /// Registers many instances with one snapshot rebuild. Instances that
    /// join an empty service start at full weight.
    pub fn register_instances(
        &self,
        service: &str,
        instances: impl IntoIterator<Item = ServiceInstance>,
    ) -> Result<(), RegistryError> {
        self.service_or_create(service)?.register_many(instances);
        Ok(())
    }

    /// Removes an instance at once. Selections already made on it finish
    /// normally.
    pub fn deregister_instance(
        &self,
        service: &str,
        id: &str,
    ) -> Result<ServiceInstance, RegistryError> {
        self.known(service)?
            .deregister(id)
            .ok_or_else(|| unknown_instance(service, id))
    }

    /// Removes every registered id of `ids` at once, with one snapshot
    /// rebuild (a reload removing many instances); returns the removed
    /// descriptions. Ids not registered are skipped.
    pub fn deregister_instances<'a>(
        &self,
        service: &str,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<ServiceInstance>, RegistryError> {
        Ok(self.known(service)?.deregister_many(ids))
    }

    /// Stops new selections of an instance; [`maintain`](Self::maintain)
    /// removes it once its connections reach zero or `timeout` passes.
    pub fn drain_instance(
        &self,
        service: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<Vec<Event>, RegistryError> {
        self.known(service)?
            .drain(id, timeout)
            .ok_or_else(|| unknown_instance(service, id))
    }

    /// Periodic upkeep, off the request path; call it every 100 ms or so
    /// (the server does). Removes drained instances whose connections
    /// reached zero or whose drain timeout passed, and rebuilds strategy
    /// tables left stale by changes to large services.
    pub fn maintain(&self) -> Vec<Event> {
        let now = self.clock.now();
        let mut events = Vec::new();
        for svc in self.services.load().values() {
            svc.maintain(now, &mut events);
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
        let (svc, member) = self.known_member(service, id)?;
        Ok(svc.set_health(&member, score))
    }

    /// Changes an instance's configured weight (`1..=1000`).
    pub fn update_instance_weight(
        &self,
        service: &str,
        id: &str,
        weight: u64,
    ) -> Result<(), RegistryError> {
        let weight = Weight::try_new(weight)?;
        let (svc, member) = self.known_member(service, id)?;
        svc.register(member.instance().clone().with_weight(weight));
        Ok(())
    }

    /// Records an outcome not tied to a selection (an active health check).
    /// It moves the health score like a request's outcome, but is not
    /// counted as a request and does not feed the latency EWMA (a probe's
    /// latency says little about a real request's). The breaker takes it as
    /// a check: passing checks may end an open window early, but only real
    /// requests close it ([`CircuitBreaker::on_check_success`](crate::CircuitBreaker::on_check_success)).
    pub fn report_outcome(
        &self,
        service: &str,
        id: &str,
        outcome: Outcome,
    ) -> Result<Vec<Event>, RegistryError> {
        let (svc, member) = self.known_member(service, id)?;
        Ok(svc.report_outcome(&member, outcome))
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
        let (svc, member) = self.known_member(service, id)?;
        Ok(svc.member_status(&member))
    }
}

fn unknown_instance(service: &str, id: &str) -> RegistryError {
    RegistryError::UnknownInstance {
        service: service.to_owned(),
        instance: id.to_owned(),
    }
}
