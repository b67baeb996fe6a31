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
//! ## Drain (SIGTERM, SIGINT)
//!
//! Listeners stop accepting at once; in-flight requests and open TCP
//! connections get up to `drain_timeout` to finish; then the process exits 0.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use datapunk_lb_core::Registry;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Config, ListenerConfig, Protocol};
use crate::health_check::HealthChecker;
use crate::proxy::http::{ConnTracker, HttpContext, UpstreamClients};
use crate::proxy::{RetryBudget, Routing, Upstream};

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

    /// Starts serving `config` on a given registry (the demo and tests use
    /// this to watch the registry).
    pub async fn start_with(
        config: Config,
        registry: Arc<Registry>,
    ) -> Result<Arc<Server>, ServerError> {
        let server = Arc::new(Server {
            registry,
            routing: Arc::new(ArcSwap::from_pointee(Routing::default())),
            config: Mutex::new(config.clone()),
            listeners: Mutex::new(HashMap::new()),
            health: Mutex::new(HealthChecker::default()),
            connections: ConnTracker::default(),
            budgets: Mutex::new(HashMap::new()),
        });
        server.apply(config, true).await?;
        let s = server.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                crate::telemetry::events(s.registry.maintain());
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
        self.apply(config, false).await
    }

    async fn apply(&self, config: Config, first: bool) -> Result<(), ServerError> {
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

        // 2. Services and instances, kept by id.
        let mut upstreams = HashMap::new();
        {
            let mut budgets = self.budgets.lock();
            for (name, svc) in &config.services {
                let err = |source| ServerError::Registry {
                    service: name.clone(),
                    source,
                };
                self.registry
                    .configure_service(name, svc.balancing.clone())
                    .map_err(err)?;
                self.registry
                    .register_instances(name, svc.instances.iter().cloned())
                    .map_err(err)?;
                let service = self.registry.service(name).ok_or_else(|| {
                    err(datapunk_lb_core::RegistryError::UnknownService(
                        name.clone(),
                    ))
                })?;
                // Static instances no longer in the file leave.
                let keep: HashSet<&str> = svc.instances.iter().map(|i| i.id().as_str()).collect();
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
        *self.health.lock() = HealthChecker::start(self.registry.clone(), &config);
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
        match tokio::time::timeout(timeout, self.connections.drain()).await {
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
