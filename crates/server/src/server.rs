//! The running balancer's lifecycle: binds listeners, starts the control
//! task, the admin endpoint and discovery, reloads, and drains. It changes
//! no instance itself: every change to the desired state is a command to
//! `crate::control`.
//!
//! ## Reload (SIGHUP)
//!
//! A new file is validated first ([`Config::load`]); an invalid one is
//! rejected with its reasons and nothing changes. A valid one is applied in
//! an order that never drops a request: new listeners are bound (if any bind
//! fails, the reload is rejected before anything else changed); the control
//! task configures services and registers instances by id, so health,
//! breakers and connection counts carry over, and removes instances and
//! services no longer wanted (requests in flight on them finish); routing is
//! swapped in one store (a service whose settings did not change keeps its
//! upstream and connection pools); listeners no longer in the file stop
//! accepting; health checks of services whose check changed restart (the
//! others keep running, with their schedule and connections).
//!
//! ## Discovery
//!
//! With `[discovery] kind = "etcd"` the server starts discovery
//! ([`crate::discovery`]), which sends what it sees to the control task;
//! `/readyz` waits for its first sync. What the registry holds, and the
//! precedence of the config, the admin API and etcd, is the control
//! module's (`crate::control`); so is where admin writes go on an
//! etcd-backed node.
//!
//! ## Drain (SIGTERM, SIGINT)
//!
//! Listeners stop accepting at once; in-flight requests and open TCP
//! connections get up to `drain_timeout` to finish; then the process exits 0.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use datapunk_lb_core::Registry;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{AdminAccess, AdminState};
use crate::config::{Config, DiscoveryConfig, ListenerConfig, Protocol};
use crate::control::{
    Batch, Command, Control, ControlError, ControlHandle, DiscoveryStatus, Readiness, Update,
};
use crate::health_check::HealthChecker;
use crate::metrics::Metrics;
use crate::proxy::accept::ConnTracker;
use crate::proxy::access_log::AccessLogs;
use crate::proxy::http::HttpContext;
use crate::proxy::tls::{TlsListener, TlsListeners};
use crate::proxy::upstream::UpstreamClients;
use crate::proxy::upstream_tls::UpstreamTls;
use crate::proxy::{RetryBudget, Routing, Upstream};
use crate::workers::PerWorker;
use crate::workers::{self, Workers};

/// Spawns `task` on `runtime`, or on the current runtime if `None`.
fn spawn_on(
    runtime: Option<&Handle>,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) {
    match runtime {
        Some(h) => drop(h.spawn(task)),
        None => drop(tokio::spawn(task)),
    }
}

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
    /// The control task refused the config.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The access log destination could not be opened.
    #[error("access_log_path: {0}")]
    AccessLog(std::io::Error),
    /// A TLS listener's certificates could not be loaded.
    #[error("listener {name}: tls: {reason}")]
    Tls {
        /// Listener name.
        name: String,
        /// Which file, and why.
        reason: String,
    },
    /// A service's upstream TLS (`[service.X.tls]`) could not be loaded.
    #[error("service {service}: tls: {reason}")]
    UpstreamTls {
        /// Service name.
        service: String,
        /// Which file, and why.
        reason: String,
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
    control: ControlHandle,
    routing: Arc<ArcSwap<Routing>>,
    config: Mutex<Config>,
    listeners: Mutex<HashMap<String, RunningListener>>,
    health: Mutex<HealthChecker>,
    connections: ConnTracker,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    metrics: Arc<Metrics>,
    access_logs: AccessLogs,
    access: Arc<AdminAccess>,
    readiness: Readiness,
    admin: Mutex<Option<(SocketAddr, watch::Sender<bool>)>>,
    discovery: Mutex<Option<crate::discovery::Running>>,
    /// The TLS side of `https` / `tls` listeners, polled for file changes.
    tls: TlsListeners,
    /// Where discovery publishes its status; kept across its restarts, so a
    /// node stays ready while a changed discovery reconnects.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    discovery_status: Arc<watch::Sender<DiscoveryStatus>>,
    /// Thread per core: the worker runtimes that run the proxy listeners'
    /// accept loops (one `SO_REUSEPORT` socket each); `None` runs them on
    /// the runtime that started the server.
    workers: Option<Arc<Workers>>,
}

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

    /// Starts serving `config` thread-per-core: every proxy listener is
    /// bound once per worker (see [`crate::workers`]) and each worker
    /// accepts and serves on its own socket; the control plane stays on
    /// the calling runtime.
    pub async fn start_on(
        config: Config,
        workers: Arc<Workers>,
    ) -> Result<Arc<Server>, ServerError> {
        Self::start_inner(config, Arc::new(Registry::new()), Some(workers)).await
    }

    /// Starts serving `config` on a given registry (the demo and tests use
    /// this to watch the registry).
    pub(crate) async fn start_with(
        config: Config,
        registry: Arc<Registry>,
    ) -> Result<Arc<Server>, ServerError> {
        Self::start_inner(config, registry, None).await
    }

    async fn start_inner(
        config: Config,
        registry: Arc<Registry>,
        workers: Option<Arc<Workers>>,
    ) -> Result<Arc<Server>, ServerError> {
        let state_file = config.admin.state_file.as_ref().map(PathBuf::from);
        let metrics = Arc::new(Metrics::new(registry.clone()));
        let control = Control::new(registry.clone(), metrics.clone(), state_file).spawn();
        let discovery_status = Arc::new(watch::Sender::new(DiscoveryStatus::default()));
        let readiness = Readiness::new(discovery_status.subscribe());
        let server = Arc::new(Server {
            registry,
            control,
            routing: Arc::new(ArcSwap::from_pointee(Routing::default())),
            config: Mutex::new(config.clone()),
            listeners: Mutex::new(HashMap::new()),
            health: Mutex::new(HealthChecker::default()),
            connections: ConnTracker::default(),
            budgets: Mutex::new(HashMap::new()),
            access_logs: AccessLogs::new(metrics.access_log_dropped(), crate::telemetry::format()),
            metrics,
            access: Arc::new(AdminAccess::default()),
            readiness,
            admin: Mutex::new(None),
            discovery: Mutex::new(None),
            tls: TlsListeners::default(),
            discovery_status,
            workers,
        });
        server.tls.spawn_poller();
        server.apply(config.clone(), true).await?;
        server.start_admin(&config).await?;
        // Static discovery: the first sync is the config itself; otherwise
        // ready after discovery's first sync.
        server
            .readiness
            .needs_sync(config.discovery != DiscoveryConfig::Static);
        server.readiness.serving(true);
        server.sync_discovery(&config.discovery).await;
        // Periodic upkeep; holds only a weak reference, so it ends with the server.
        let weak = Arc::downgrade(&server);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(s) = weak.upgrade() else { break };
                s.metrics.report(s.registry.maintain());
                s.metrics.history().tick(&s.registry);
            }
        });
        Ok(server)
    }

    /// Bound address of each listener, by name.
    pub(crate) fn listener_addrs(&self) -> HashMap<String, SocketAddr> {
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
            self.sync_discovery(&discovery).await;
        }
        r
    }

    /// Starts, restarts or stops discovery to match `wanted`.
    async fn sync_discovery(&self, wanted: &DiscoveryConfig) {
        let current = self
            .discovery
            .lock()
            .as_ref()
            .map_or(DiscoveryConfig::Static, crate::discovery::running_config);
        if current == *wanted {
            return;
        }
        // Dropping the old one stops it.
        *self.discovery.lock() = None;
        let control = &self.control;
        let r = match wanted {
            DiscoveryConfig::Static => {
                self.readiness.needs_sync(false);
                // Admin writes apply here again; every discovered instance
                // leaves (what the layers below hold comes back).
                let r = async {
                    control.send(Command::UseStore(None)).await?;
                    let batch = Batch::Full {
                        entries: Vec::new(),
                        invalid: Vec::new(),
                    };
                    control
                        .discover(Update {
                            batch,
                            revision: None,
                        })
                        .await
                }
                .await;
                info!(
                    from = "etcd",
                    to = "static",
                    reason = "config reload",
                    "discovery changed"
                );
                r.map(drop)
            }
            #[cfg(feature = "etcd")]
            DiscoveryConfig::Etcd(c) => {
                use crate::discovery::etcd::{EtcdDiscovery, EtcdWriter, Link};
                // The store first: its revision starts at 0 before the new
                // watch's first listing can move it.
                let store = Arc::new(EtcdWriter::new(c.clone()));
                let r = control.send(Command::UseStore(Some(store))).await;
                let link = Link {
                    control: control.clone(),
                    metrics: self.metrics.clone(),
                    status: self.discovery_status.clone(),
                };
                *self.discovery.lock() = Some(EtcdDiscovery::start(link, c.clone()));
                r
            }
            #[cfg(not(feature = "etcd"))]
            DiscoveryConfig::Etcd(_) => {
                // Refused by the config check in this build.
                error!("etcd discovery requested from a build without the etcd feature");
                Ok(())
            }
        };
        if let Err(e) = r {
            error!(error = %e, "discovery change not applied");
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The admin endpoint's bound address.
    pub(crate) fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.lock().as_ref().map(|(a, _)| *a)
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

    async fn start_admin(&self, config: &Config) -> Result<(), ServerError> {
        let listener = TcpListener::bind(config.admin.listen)
            .await
            .map_err(|source| ServerError::Bind {
                name: "admin".into(),
                addr: config.admin.listen,
                source,
            })?;
        let addr = listener.local_addr().unwrap_or(config.admin.listen);
        if self.access.token.load().is_none() {
            warn!(addr = %addr, "admin API has no token: open to local processes (loopback only)");
        }
        let (stop, stop_rx) = watch::channel(false);
        let state = AdminState {
            control: self.control.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            readiness: self.readiness.clone(),
            access: self.access.clone(),
        };
        tokio::spawn(crate::admin::serve(listener, state, stop_rx));
        info!(listener = "admin", addr = %addr, protocol = "http", "listening");
        *self.admin.lock() = Some((addr, stop));
        Ok(())
    }

    async fn apply(&self, mut config: Config, first: bool) -> Result<(), ServerError> {
        let token = Self::read_token(&config)?;
        // Opened (reopened on reload) before anything changes.
        let access_log = AccessLogs::open(&config).map_err(ServerError::AccessLog)?;
        // 0. Certificates re-read from disk (even for an unchanged config):
        // failing here changes nothing.
        let mut fresh_tls = HashMap::new();
        for l in &config.listeners {
            if let Some(tls) = &l.tls {
                let alpn_http = l.protocol == Protocol::Http;
                let t = TlsListener::load(&l.name, tls, alpn_http, self.metrics.clone()).map_err(
                    |e| ServerError::Tls {
                        name: l.name.clone(),
                        reason: e.to_string(),
                    },
                )?;
                fresh_tls.insert(l.name.clone(), t);
            }
        }
        // Upstream TLS files re-read too (new connections use them; the
        // session caches start afresh): failing here changes nothing.
        let mut upstream_tls = HashMap::new();
        for (name, svc) in &config.services {
            if let Some(t) = &svc.tls {
                let built = UpstreamTls::build(t, svc.upstream_protocol).map_err(|e| {
                    ServerError::UpstreamTls {
                        service: name.clone(),
                        reason: e.to_string(),
                    }
                })?;
                upstream_tls.insert(name.clone(), Arc::new(built));
            }
        }
        // 1. Bind new or changed listeners first: failing here changes nothing.
        let mut bound = Vec::new();
        {
            let running = self.listeners.lock();
            for l in &config.listeners {
                let same = running.get(&l.name).is_some_and(|r| {
                    r.config.listen == l.listen
                        && r.config.protocol == l.protocol
                        && r.config.tls.is_some() == l.tls.is_some()
                });
                if !same {
                    bound.push(l.clone());
                }
            }
        }
        let mut sockets = Vec::new();
        for l in bound {
            // An unchanged address taken by a listener being renamed would
            // fail here; that is reported, not half-applied. (With
            // `--thread-per-core` the sockets are `SO_REUSEPORT`, so the
            // renamed listener's sockets join the port until the old stop.)
            let socket = workers::bind(l.listen, self.workers.as_deref()).map_err(|source| {
                ServerError::Bind {
                    name: l.name.clone(),
                    addr: l.listen,
                    source,
                }
            })?;
            sockets.push((l, socket));
        }

        // 2. Services and instances: the control task's, applied whole
        // (no discovery batch interleaves).
        // The instance lists move to the control task (which keeps them
        // as its config layer); this copy keeps the settings only, so a
        // 100,000-instance file is held once, not twice.
        let lists: Vec<(String, Vec<_>)> = config
            .services
            .iter_mut()
            .map(|(name, svc)| (name.clone(), std::mem::take(&mut svc.instances)))
            .collect();
        let mut desired = Box::new(config.clone());
        for (name, list) in lists {
            if let Some(d) = desired.services.get_mut(&name) {
                d.instances = list;
            }
        }
        self.control.send(Command::Reload(desired)).await?;

        // 3. Routing in one store. A service whose settings did not change
        // (and whose core service is the same) keeps its upstream: its
        // connection pools and per-service metrics handle carry over.
        let mut upstreams = HashMap::new();
        let running = self.routing.load_full();
        let before = self.config.lock().services.clone();
        {
            let mut budgets = self.budgets.lock();
            for (name, svc) in &config.services {
                let Some(service) = self.registry.service(name) else {
                    continue;
                };
                // A TLS service's pools take the TLS config built afresh
                // above (its files re-read), so it never keeps its upstream.
                let unchanged =
                    !first && before.get(name) == Some(svc) && !upstream_tls.contains_key(name);
                if let Some(kept) = running
                    .upstream_of(name)
                    .filter(|u| unchanged && Arc::ptr_eq(&u.service, &service))
                {
                    upstreams.insert(name.clone(), kept.clone());
                    continue;
                }
                // Kept across reloads (its balance is history) unless its knobs changed.
                let budget = budgets
                    .entry(name.clone())
                    .and_modify(|b| {
                        if b.config() != svc.retry_budget {
                            *b = Arc::new(RetryBudget::new(svc.retry_budget));
                        }
                    })
                    .or_insert_with(|| Arc::new(RetryBudget::new(svc.retry_budget)))
                    .clone();
                upstreams.insert(
                    name.clone(),
                    Arc::new(Upstream {
                        name: name.clone(),
                        clients: UpstreamClients::new(
                            svc.connect_timeout,
                            svc.upstream_protocol,
                            svc.host_header,
                            upstream_tls.get(name).cloned(),
                            Some(service.clone()),
                        )
                        .with_idle_limit(svc.max_idle_connections),
                        service,
                        connect_timeout: svc.connect_timeout,
                        request_timeout: svc.request_timeout,
                        per_try_timeout: svc.per_try_timeout,
                        response_idle_timeout: svc.response_idle_timeout,
                        retries: svc.retries,
                        max_connections: svc.max_connections,
                        budget,
                        metrics: PerWorker::new(self.metrics.service(name, svc.metrics_enabled)),
                        upgrade_idle_timeout: svc.upgrade_idle_timeout,
                        hash_key: svc.hash_key.clone(),
                    }),
                );
            }
            budgets.retain(|k, _| config.services.contains_key(k));
        }
        let access_log = self
            .access_logs
            .install(access_log)
            .map_err(ServerError::AccessLog)?;
        self.routing.store(Arc::new(
            Routing::new(&config, upstreams).with_access_log(access_log),
        ));

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
            self.tls.retain(|name| running.contains_key(name));
            // Listeners that keep running take their new certificates in place.
            for name in running.keys() {
                if let (Some(t), Some(fresh)) = (self.tls.get(name), fresh_tls.remove(name)) {
                    t.adopt(fresh);
                }
            }
            for (l, socket) in sockets {
                let tls = fresh_tls.remove(&l.name).map(|t| {
                    let t = Arc::new(t);
                    t.publish();
                    self.tls.insert(&l.name, t.clone());
                    t
                });
                let addr = socket
                    .first()
                    .and_then(|(_, s)| s.local_addr().ok())
                    .unwrap_or(l.listen);
                let (stop, stop_rx) = watch::channel(false);
                let accept_errors = self.metrics.accept_errors(&l.name);
                // One limit for all of the listener's accept loops.
                let tracker = self.connections.for_listener(l.limits.max_connections);
                let name: Arc<str> = Arc::from(l.name.as_str());
                for (runtime, socket) in socket {
                    let (stop_rx, tracker, accept_errors) =
                        (stop_rx.clone(), tracker.clone(), accept_errors.clone());
                    // One per accept loop (per worker): every request clones
                    // it, and a worker's own copy has a reference count no
                    // other worker writes.
                    let ctx = Arc::new(HttpContext {
                        listener: name.clone(),
                        routing: self.routing.clone(),
                        limits: l.limits,
                        tls: tls.clone(),
                    });
                    match l.protocol {
                        Protocol::Http => spawn_on(
                            runtime.as_ref(),
                            crate::proxy::http::serve(socket, ctx, stop_rx, tracker, accept_errors),
                        ),
                        Protocol::Tcp => spawn_on(
                            runtime.as_ref(),
                            crate::proxy::tcp::serve(
                                socket,
                                name.clone(),
                                self.routing.clone(),
                                stop_rx,
                                tracker,
                                accept_errors,
                                l.limits.max_connections,
                                tls.clone().map(|t| (t, l.limits.header_read_timeout)),
                                // Every plain tcp listener: a reload may
                                // give it sni_routes without a restart.
                                tls.is_none().then(|| self.metrics.sni_hellos(&l.name)),
                            ),
                        ),
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
        self.health.lock().update(
            self.registry.clone(),
            &config,
            &upstream_tls,
            self.metrics.clone(),
        );
        for (name, t) in &upstream_tls {
            if t.is_insecure() {
                warn!(
                    service = name.as_str(),
                    "insecure_skip_verify: the certificates of this service's instances are not verified"
                );
            }
        }
        self.metrics
            .retain_services(&|s| config.services.contains_key(s));
        for (name, svc) in &config.services {
            self.metrics
                .instance_series_limit(name, svc.metrics_instance_series_limit);
        }
        self.access.token.store(token);
        self.access
            .metrics_auth
            .store(config.admin.metrics_auth, Ordering::Relaxed);
        if !first {
            info!(
                services = config.services.len(),
                listeners = config.listeners.len(),
                "config reloaded"
            );
        }
        *self.config.lock() = config;
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
        self.readiness.serving(false);
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
