//! The running balancer: binds listeners, keeps routing and the registry
//! in step with the config, reloads, and drains.
//!
//! ## Reload (SIGHUP)
//!
//! A new file is validated first ([`Config::load`]); an invalid one is
//! rejected with its reasons and nothing changes. A valid one is applied in
//! an order that never drops a request: new listeners are bound (if any bind
//! fails, the reload is rejected before anything else changed); services are
//! configured and instances registered by id, so health, breakers and
//! connection counts carry over; routing is swapped in one store; instances
//! and services no longer in the file are removed (requests in flight on them
//! finish); listeners no longer in the file stop accepting; health checks
//! restart on the new schedule.
//!
//! ## Discovery
//!
//! With `[discovery] kind = "etcd"` the node also keeps the instances it
//! discovers ([`crate::discovery`]): they are registered next to the
//! config's (a discovered id overrides a config instance with the same id),
//! kept across reloads, and `/readyz` waits for the first etcd sync. Admin
//! API registrations and removals on such a node are written to etcd, so
//! every node applies them; the answer comes once this node has applied its
//! own write (or after 2 s, applying it locally then).
//!
//! ## Drain (SIGTERM, SIGINT)
//!
//! Listeners stop accepting at once; in-flight requests and open TCP
//! connections get up to `drain_timeout` to finish; then the process exits 0.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use datapunk_lb_core::{Event, Registry, RegistryError, StrategyKind};
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{AdminError, AdminState};
use crate::config::{Config, DiscoveryConfig, ListenerConfig, Protocol};
use crate::discovery::{Applied, Batch, Discovered};
use crate::health_check::HealthChecker;
use crate::metrics::Metrics;
use crate::proxy::http::{ConnTracker, HttpContext, UpstreamClients};
use crate::proxy::{RetryBudget, Routing, Upstream};
use crate::state::{DynamicState, InstanceSpec};

/// Why the server could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The config was invalid.
    #[error("invalid config:\n{0}")]
    Config(#[from] crate::config::ConfigErrors),
    /// A listener could not be bound.
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The admin token could not be read.
    #[error("admin token: {0}")]
    Token(String),
    /// The core refused a service or instance.
    #[error("service {service}: {source}")]
    Registry {
        /// Service name.
        service: String,
        /// The core's error.
        source: datapunk_lb_core::RegistryError,
    },
}

struct RunningListener {
    config: ListenerConfig,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

/// A running balancer.
pub struct Server {
    registry: Arc<Registry>,
    routing: Arc<ArcSwap<Routing>>,
    config: Mutex<Config>,
    listeners: Mutex<HashMap<String, RunningListener>>,
    health: Mutex<HealthChecker>,
    connections: ConnTracker,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    metrics: Arc<Metrics>,
    dynamic: tokio::sync::Mutex<DynamicState>,
    state_file: Option<PathBuf>,
    token: ArcSwapOption<String>,
    metrics_auth: AtomicBool,
    ready: AtomicBool,
    admin: Mutex<Option<(SocketAddr, watch::Sender<bool>)>>,
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    me: Weak<Server>,
    /// Discovered instances; also held by `apply` so a reload and a
    /// discovery batch never interleave.
    discovered: Mutex<Discovered>,
    discovery: Mutex<Option<crate::discovery::Running>>,
    /// The etcd revision this node has applied.
    discovery_rev: watch::Sender<i64>,
}

/// How long an admin API write on an etcd-backed node waits for this node's
/// watch to deliver it before applying it locally.
#[cfg(feature = "etcd")]
const OWN_WRITE_WAIT: Duration = Duration::from_secs(2);

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// Starts serving `config`. Must run inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Arc<Server>, ServerError> {
        Self::start_with(config, Arc::new(Registry::new())).await
    }

    /// Starts serving `config` on a given registry (the demo and tests use
    /// this to watch the registry).
    pub async fn start_with(
        config: Config,
        registry: Arc<Registry>,
    ) -> Result<Arc<Server>, ServerError> {
        let state_file = config.admin.state_file.as_ref().map(PathBuf::from);
        let dynamic = match &state_file {
            None => DynamicState::default(),
            Some(path) => match DynamicState::load(path) {
                Ok(s) => {
                    if !s.services.is_empty() {
                        info!(state_file = %path.display(), services = s.services.len(), "restored dynamic state");
                    }
                    s
                }
                Err(e) => {
                    error!(state_file = %path.display(), error = %e, "state file unusable; starting from the config alone");
                    DynamicState::default()
                }
            },
        };
        let metrics = Arc::new(Metrics::new(registry.clone()));
        let server = Arc::new_cyclic(|me| Server {
            registry,
            routing: Arc::new(ArcSwap::from_pointee(Routing::default())),
            config: Mutex::new(config.clone()),
            listeners: Mutex::new(HashMap::new()),
            health: Mutex::new(HealthChecker::default()),
            connections: ConnTracker::default(),
            budgets: Mutex::new(HashMap::new()),
            metrics,
            dynamic: tokio::sync::Mutex::new(dynamic),
            state_file,
            token: ArcSwapOption::empty(),
            metrics_auth: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            admin: Mutex::new(None),
            me: me.clone(),
            discovered: Mutex::new(Discovered::default()),
            discovery: Mutex::new(None),
            discovery_rev: watch::Sender::new(0),
        });
        server.apply(config.clone(), true).await?;
        server.start_admin(&config).await?;
        if config.discovery == DiscoveryConfig::Static {
            // Static discovery: the first sync is the config itself.
            server.ready.store(true, Ordering::Release);
        } else {
            // Ready after the first sync (`discovery_ready`).
            server.sync_discovery(&config.discovery);
        }
        // Periodic upkeep; holds only a weak reference, so it ends with the server.
        let weak = Arc::downgrade(&server);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { break };
                s.metrics.report(s.registry.maintain());
            }
        });
        Ok(server)
    }

    /// The core registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Bound address of each listener, by name.
    pub fn listener_addrs(&self) -> HashMap<String, SocketAddr> {
        self.listeners
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.addr))
            .collect()
    }

    /// Validates and applies a new config; on error nothing changed.
    pub async fn reload(&self, config: Config) -> Result<(), ServerError> {
        let discovery = config.discovery.clone();
        let r = self.apply(config, false).await;
        self.metrics.reload(r.is_ok());
        if r.is_ok() {
            self.sync_discovery(&discovery);
        }
        r
    }

    /// Starts, restarts or stops discovery to match `wanted`.
    fn sync_discovery(&self, wanted: &DiscoveryConfig) {
        let mut running = self.discovery.lock();
        let current = running
            .as_ref()
            .map_or(DiscoveryConfig::Static, crate::discovery::running_config);
        if current == *wanted {
            return;
        }
        // Dropping the old one stops it.
        *running = None;
        match wanted {
            DiscoveryConfig::Static => {
                drop(running);
                // Every discovered instance leaves (config ones are restored).
                self.apply_discovery(
                    Batch::Full {
                        entries: Vec::new(),
                        invalid: Vec::new(),
                    },
                    None,
                );
                info!(
                    from = "etcd",
                    to = "static",
                    reason = "config reload",
                    "discovery changed"
                );
            }
            #[cfg(feature = "etcd")]
            DiscoveryConfig::Etcd(c) => {
                self.discovery_rev.send_replace(0);
                *running = Some(crate::discovery::etcd::EtcdDiscovery::start(
                    self.me.clone(),
                    c.clone(),
                ));
            }
            #[cfg(not(feature = "etcd"))]
            DiscoveryConfig::Etcd(_) => {
                // Refused by the config check in this build.
                error!("etcd discovery requested from a build without the etcd feature");
            }
        }
    }

    /// Applies a discovery batch (see [`crate::discovery`]); `revision` is
    /// the etcd revision it brings the node to.
    pub fn apply_discovery(&self, batch: Batch, revision: Option<i64>) -> Applied {
        let applied = {
            let mut discovered = self.discovered.lock();
            let config = self.config.lock();
            discovered.apply(batch, &self.registry, &config.services, &self.metrics)
        };
        if let Some(r) = revision {
            self.discovery_revision(r);
        }
        applied
    }

    /// Notes that this node has seen etcd up to `revision`.
    pub fn discovery_revision(&self, revision: i64) {
        self.discovery_rev.send_if_modified(|cur| {
            let newer = revision > *cur;
            if newer {
                *cur = revision;
            }
            newer
        });
    }

    /// The first discovery sync is done: the node is ready (unless draining).
    pub fn discovery_ready(&self) {
        if !self.listeners.lock().is_empty() {
            self.ready.store(true, Ordering::Release);
        }
    }

    /// Number of discovered instances.
    pub fn discovered_len(&self) -> usize {
        self.discovered.lock().len()
    }

    /// Waits for this node's watch to apply its own write at `revision`; if
    /// the watch is behind, applies `change` locally so the API's answer
    /// holds on this node at once.
    #[cfg(feature = "etcd")]
    async fn ensure_applied(&self, revision: i64, change: crate::discovery::Change) {
        if self.applied_revision(revision).await {
            return;
        }
        warn!(
            revision,
            change = ?change,
            "discovery watch is behind: applying this node's own etcd write locally"
        );
        self.apply_discovery(Batch::Delta(vec![change]), None);
    }

    /// Waits until this node has applied etcd `revision`.
    #[cfg(feature = "etcd")]
    async fn applied_revision(&self, revision: i64) -> bool {
        let mut rx = self.discovery_rev.subscribe();
        let waited = tokio::time::timeout(OWN_WRITE_WAIT, rx.wait_for(|r| *r >= revision)).await;
        matches!(waited, Ok(Ok(_)))
    }

    #[cfg(feature = "etcd")]
    fn etcd_writer(&self) -> Option<crate::discovery::etcd::EtcdWriter> {
        self.discovery.lock().as_ref().map(|d| d.writer().clone())
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The admin token, if one is configured.
    pub fn admin_token(&self) -> Option<Arc<String>> {
        self.token.load_full()
    }

    /// Whether `/metrics` needs the token.
    pub fn metrics_auth(&self) -> bool {
        self.metrics_auth.load(Ordering::Relaxed)
    }

    /// Ready: listeners bound and the first discovery sync done.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The admin endpoint's bound address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.lock().as_ref().map(|(a, _)| *a)
    }

    /// Logs and counts core events.
    pub fn report(&self, events: Vec<Event>) {
        self.metrics.report(events);
    }

    fn read_token(config: &Config) -> Result<Option<Arc<String>>, ServerError> {
        if let Some(path) = &config.admin.token_file {
            let t = std::fs::read_to_string(path)
                .map_err(|e| ServerError::Token(format!("{path}: {e}")))?;
            let t = t.trim();
            if t.is_empty() {
                return Err(ServerError::Token(format!("{path} is empty")));
            }
            return Ok(Some(Arc::new(t.to_owned())));
        }
        if let Some(var) = &config.admin.token_env {
            let t = std::env::var(var).map_err(|_| {
                ServerError::Token(format!("environment variable {var} is not set"))
            })?;
            let t = t.trim();
            if t.is_empty() {
                return Err(ServerError::Token(format!(
                    "environment variable {var} is empty"
                )));
            }
            return Ok(Some(Arc::new(t.to_owned())));
        }
        Ok(None)
    }

    async fn start_admin(self: &Arc<Self>, config: &Config) -> Result<(), ServerError> {
        let listener = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| ServerError::Bind {
                name: "admin".into(),
                addr: config.admin.listen,
                source,
            })?;
        let addr = listener.local_addr().unwrap_or(config.admin.listen);
        if self.token.load().is_none() {
            warn!(addr = %addr, "admin API has no token: open to local processes (loopback only)");
        }
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(crate::admin::serve(
            listener,
            AdminState {
                server: self.clone(),
            },
            stop_rx,
        ));
        info!(listener = "admin", addr = %addr, protocol = "http", "listening");
        *self.admin.lock() = Some((addr, stop));
        Ok(())
    }

    async fn persist(&self, state: &DynamicState) -> Result<(), AdminError> {
        let Some(path) = self.state_file.clone() else {
            return Ok(());
        };
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.save(&path))
            .await
            .map_err(|e| AdminError::Internal(e.to_string()))?
            .map_err(|e| AdminError::Internal(e.to_string()))
    }

    fn configured(&self, service: &str) -> Result<(), AdminError> {
        if self.config.lock().services.contains_key(service) {
            Ok(())
        } else {
            Err(AdminError::NotFound(format!("unknown service {service:?}")))
        }
    }

    /// Registers or updates an instance through the admin API; returns
    /// whether it was new. Persisted with the state file.
    pub async fn register_dynamic(
        &self,
        service: &str,
        id: &str,
        spec: InstanceSpec,
    ) -> Result<bool, AdminError> {
        self.configured(service)?;
        let instance = spec.to_instance(id).map_err(RegistryError::from)?;
        #[cfg(feature = "etcd")]
        if let Some(writer) = self.etcd_writer() {
            return self.register_etcd(&writer, service, id, spec).await;
        }
        let mut dynamic = self.dynamic.lock().await;
        let registered = self.registry.register_instance(service, instance)?;
        let svc = dynamic.service_mut(service);
        svc.removed.remove(id);
        svc.instances.insert(id.to_owned(), spec.clone());
        info!(
            service,
            instance = id,
            address = spec.address.as_str(),
            port = spec.port,
            weight = spec.weight,
            from = "absent",
            to = "registered",
            reason = "admin API",
            "instance registered"
        );
        self.persist(&dynamic).await?;
        Ok(registered == datapunk_lb_core::Registered::Added)
    }

    /// etcd-backed node: writes the registration to etcd (no lease: it stays
    /// until deleted) and waits for this node to apply it.
    #[cfg(feature = "etcd")]
    async fn register_etcd(
        &self,
        writer: &crate::discovery::etcd::EtcdWriter,
        service: &str,
        id: &str,
        spec: InstanceSpec,
    ) -> Result<bool, AdminError> {
        let (revision, created) = writer
            .put(service, id, &spec)
            .await
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        info!(
            service,
            instance = id,
            address = spec.address.as_str(),
            port = spec.port,
            weight = spec.weight,
            from = if created { "absent" } else { "registered" },
            to = "registered",
            reason = "admin API, written to etcd",
            key = writer.key(service, id),
            revision,
            "instance written to etcd"
        );
        self.ensure_applied(
            revision,
            crate::discovery::Change::Put {
                service: service.to_owned(),
                id: id.to_owned(),
                spec,
            },
        )
        .await;
        Ok(created)
    }

    /// etcd-backed node: deletes the key (every node drains the instance;
    /// this one for `drain`, the others for [`crate::discovery::DRAIN`]).
    /// `Ok(false)` when there was no such key.
    #[cfg(feature = "etcd")]
    async fn remove_etcd(
        &self,
        writer: &crate::discovery::etcd::EtcdWriter,
        service: &str,
        id: &str,
        drain: Duration,
    ) -> Result<bool, AdminError> {
        self.discovered
            .lock()
            .set_drain_override(service, id, drain);
        let revision = match writer.delete(service, id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.discovered.lock().clear_drain_override(service, id);
                return Ok(false);
            }
            Err(e) => {
                self.discovered.lock().clear_drain_override(service, id);
                return Err(AdminError::Internal(e.to_string()));
            }
        };
        info!(
            service,
            instance = id,
            from = "registered",
            to = "draining",
            reason = "admin API, deleted from etcd",
            key = writer.key(service, id),
            revision,
            drain = ?drain,
            "instance deleted from etcd"
        );
        self.ensure_applied(
            revision,
            crate::discovery::Change::Delete {
                service: service.to_owned(),
                id: id.to_owned(),
            },
        )
        .await;
        Ok(true)
    }

    /// Drains then removes an instance (at once for a zero drain). On an
    /// etcd-backed node an instance that has a key in etcd is deleted there;
    /// others (config instances) are removed locally.
    pub async fn remove_dynamic(
        &self,
        service: &str,
        id: &str,
        drain: Duration,
    ) -> Result<(), AdminError> {
        #[cfg(feature = "etcd")]
        if let Some(writer) = self.etcd_writer() {
            if self.remove_etcd(&writer, service, id, drain).await? {
                return Ok(());
            }
        }
        let mut dynamic = self.dynamic.lock().await;
        if drain.is_zero() {
            self.registry.deregister_instance(service, id)?;
        } else {
            let events = self.registry.drain_instance(service, id, drain)?;
            self.report(events);
        }
        info!(service, instance = id, from = "registered", to = "draining", reason = "admin API", drain = ?drain, "instance drain");
        let svc = dynamic.service_mut(service);
        if svc.instances.remove(id).is_none() {
            svc.removed.insert(id.to_owned());
        }
        self.persist(&dynamic).await
    }

    /// Changes a service's strategy through the admin API.
    pub async fn set_strategy_dynamic(
        &self,
        service: &str,
        kind: StrategyKind,
    ) -> Result<(), AdminError> {
        self.configured(service)?;
        let mut dynamic = self.dynamic.lock().await;
        let from = self.registry.service(service).map(|s| s.config().strategy);
        self.registry.set_strategy(service, kind)?;
        info!(
            service,
            from = from.map(|k| k.as_str()),
            to = kind.as_str(),
            reason = "admin API",
            "strategy changed"
        );
        dynamic.service_mut(service).strategy = Some(kind.as_str().to_owned());
        self.persist(&dynamic).await
    }

    async fn apply(&self, config: Config, first: bool) -> Result<(), ServerError> {
        let token = Self::read_token(&config)?;
        let dynamic = self.dynamic.lock().await.clone();
        // 1. Bind new or changed listeners first: failing here changes nothing.
        let mut bound = Vec::new();
        {
            let running = self.listeners.lock();
            for l in &config.listeners {
                let same = running.get(&l.name).is_some_and(|r| {
                    r.config.listen == l.listen && r.config.protocol == l.protocol
                });
                if !same {
                    bound.push(l.clone());
                }
            }
        }
        let mut sockets = Vec::new();
        for l in bound {
            // An unchanged address taken by a listener being renamed would
            // fail here; that is reported, not half-applied.
            let socket = TcpListener::bind(l.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    name: l.name.clone(),
                    addr: l.listen,
                    source,
                })?;
            sockets.push((l, socket));
        }

        // 2. Services and instances, kept by id. Discovery batches wait
        // until the new config is in place.
        let discovered = self.discovered.lock();
        let mut upstreams = HashMap::new();
        {
            let mut budgets = self.budgets.lock();
            for (name, svc) in &config.services {
                let err = |source| ServerError::Registry {
                    service: name.clone(),
                    source,
                };
                let overlay = dynamic.services.get(name);
                let mut balancing = svc.balancing.clone();
                if let Some(k) = overlay
                    .and_then(|o| o.strategy.as_deref())
                    .and_then(|k| k.parse().ok())
                {
                    balancing.strategy = k;
                }
                // The config's instances, minus API removals, plus API
                // registrations (which win on the same id).
                let mut desired: Vec<datapunk_lb_core::ServiceInstance> = svc
                    .instances
                    .iter()
                    .filter(|i| {
                        overlay.is_none_or(|o| {
                            !o.removed.contains(i.id().as_str())
                                && !o.instances.contains_key(i.id().as_str())
                        })
                    })
                    .cloned()
                    .collect();
                if let Some(o) = overlay {
                    for (id, spec) in &o.instances {
                        match spec.to_instance(id) {
                            Ok(i) => desired.push(i),
                            Err(e) => {
                                warn!(service = name.as_str(), instance = id.as_str(), error = %e, "skipping invalid saved instance")
                            }
                        }
                    }
                }
                // Discovered instances win over both on the same id.
                if !discovered.is_empty() {
                    desired.retain(|i| !discovered.contains(name, i.id().as_str()));
                    for (id, spec) in discovered.instances(name) {
                        if let Ok(i) = spec.to_instance(id) {
                            desired.push(i);
                        }
                    }
                }
                self.registry
                    .configure_service(name, balancing)
                    .map_err(err)?;
                self.registry
                    .register_instances(name, desired.iter().cloned())
                    .map_err(err)?;
                let service = self.registry.service(name).ok_or_else(|| {
                    err(datapunk_lb_core::RegistryError::UnknownService(
                        name.clone(),
                    ))
                })?;
                // Instances no longer wanted leave.
                let keep: HashSet<&str> = desired.iter().map(|i| i.id().as_str()).collect();
                let gone: Vec<String> = service
                    .members()
                    .iter()
                    .map(|m| m.instance().id().to_string())
                    .filter(|id| !keep.contains(id.as_str()))
                    .collect();
                for id in gone {
                    let _ = self.registry.deregister_instance(name, &id);
                    info!(
                        service = name.as_str(),
                        instance = id.as_str(),
                        from = "registered",
                        to = "removed",
                        reason = "not in config",
                        "instance removed"
                    );
                }
                let budget = budgets.entry(name.clone()).or_default().clone();
                upstreams.insert(
                    name.clone(),
                    Arc::new(Upstream {
                        name: name.clone(),
                        service,
                        connect_timeout: svc.connect_timeout,
                        request_timeout: svc.request_timeout,
                        retries: svc.retries,
                        max_connections: svc.max_connections,
                        budget,
                        clients: UpstreamClients::new(svc.connect_timeout),
                        metrics: Arc::new(self.metrics.service(name, svc.metrics_enabled)),
                    }),
                );
            }
            budgets.retain(|k, _| config.services.contains_key(k));
        }

        // 3. Routing in one store.
        self.routing
            .store(Arc::new(Routing::new(&config, upstreams)));
        for name in self.registry.service_names() {
            if !config.services.contains_key(&name) {
                let _ = self.registry.remove_service(&name);
                info!(
                    service = name.as_str(),
                    from = "configured",
                    to = "removed",
                    reason = "not in config",
                    "service removed"
                );
            }
        }

        // 4. Listeners: start the new, stop the gone or changed.
        {
            let mut running = self.listeners.lock();
            let wanted: HashSet<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
            let replaced: HashSet<String> = sockets.iter().map(|(l, _)| l.name.clone()).collect();
            running.retain(|name, r| {
                let keep = wanted.contains(name.as_str()) && !replaced.contains(name);
                if !keep {
                    let _ = r.stop.send(true);
                    info!(listener = name.as_str(), addr = %r.addr, "listener stopped");
                }
                keep
            });
            for (l, socket) in sockets {
                let addr = socket.local_addr().unwrap_or(l.listen);
                let (stop, stop_rx) = watch::channel(false);
                match l.protocol {
                    Protocol::Http => {
                        let ctx = Arc::new(HttpContext {
                            listener: Arc::from(l.name.as_str()),
                            routing: self.routing.clone(),
                        });
                        tokio::spawn(crate::proxy::http::serve(
                            socket,
                            ctx,
                            stop_rx,
                            self.connections.clone(),
                        ));
                    }
                    Protocol::Tcp => {
                        tokio::spawn(crate::proxy::tcp::serve(
                            socket,
                            Arc::from(l.name.as_str()),
                            self.routing.clone(),
                            stop_rx,
                            self.connections.clone(),
                        ));
                    }
                }
                info!(listener = l.name.as_str(), addr = %addr, protocol = ?l.protocol, "listening");
                running.insert(
                    l.name.clone(),
                    RunningListener {
                        config: l,
                        addr,
                        stop,
                    },
                );
            }
        }

        // 5. Health checks on the new schedule.
        *self.health.lock() =
            HealthChecker::start(self.registry.clone(), &config, self.metrics.clone());
        self.metrics
            .retain_services(&|s| config.services.contains_key(s));
        self.token.store(token);
        self.metrics_auth
            .store(config.admin.metrics_auth, Ordering::Relaxed);
        if !first {
            info!(
                services = config.services.len(),
                listeners = config.listeners.len(),
                "config reloaded"
            );
        }
        *self.config.lock() = config;
        drop(discovered);
        Ok(())
    }

    /// Stops accepting, waits up to `drain_timeout` for in-flight work.
    /// Returns whether everything finished in time.
    pub async fn drain(&self) -> bool {
        let timeout = self.config.lock().drain_timeout;
        for (name, l) in self.listeners.lock().drain() {
            let _ = l.stop.send(true);
            info!(listener = name.as_str(), "listener stopped for drain");
        }
        *self.health.lock() = HealthChecker::default();
        self.ready.store(false, Ordering::Release);
        // Stop following discovery: nothing new is served.
        self.discovery.lock().take();
        let drained = tokio::time::timeout(timeout, self.connections.drain()).await;
        if let Some((_, stop)) = self.admin.lock().take() {
            let _ = stop.send(true);
        }
        match drained {
            Ok(()) => {
                info!("drained: every request finished");
                true
            }
            Err(_) => {
                warn!(drain_timeout = ?timeout, "drain timeout: closing remaining connections");
                false
            }
        }
    }
}
