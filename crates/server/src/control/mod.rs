//! The control plane: the one owner of the desired state, and the one place
//! where it changes.
//!
//! ## The desired state
//!
//! Three layers ([`layers`]), lowest precedence first: the **config file**
//! (services, their instances and balancing), the **dynamic overrides** of
//! the admin API (registrations, removals and strategy; what the state file
//! persists) and the **discovered set** (etcd). [`Layers::resolve`] merges
//! them for one instance id; every change below ends in it, so a reload, a
//! discovery update and an admin command cannot disagree on what the core
//! registry should hold.
//!
//! ## Commands
//!
//! Every change arrives as a [`Command`] value and is applied by one task,
//! in arrival order, each to the end before the next: a reload and a
//! discovery batch never interleave. The sender awaits a typed reply
//! ([`ControlError`] on refusal). Through a [`ControlHandle`]:
//!
//! - the server sends `Reload` (after binding listeners; it keeps
//!   lifecycle only);
//! - discovery sends `Discovery` updates (a full listing replaces the
//!   discovered set, a delta changes ids) with the etcd revision they bring
//!   the node to, and publishes its own [`DiscoveryStatus`];
//! - admin handlers send `Write`, `SetStrategy` and `SetHealth`.
//!
//! The task publishes a [`ControlStatus`] (applied etcd revision, discovered
//! count) on a `watch` channel.
//!
//! ## Admin writes on an etcd-backed node
//!
//! An admin registration or removal is one [`Write`]. The task decides where
//! it goes, once for both: with a [`SharedStore`] (etcd discovery running)
//! the write goes to the store, so every node applies it from its watch, and
//! the handle answers once this node has applied its own write (or, after
//! [`OWN_WRITE_WAIT`], applies it locally so the answer holds here at once);
//! otherwise it is applied here and persisted to the state file (atomically,
//! see [`crate::state`]). A removal whose id has no key in the store (a
//! config instance) is applied here.

mod discovered;
mod layers;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use datapunk_lb_core::{Event, Registered, Registry, RegistryError, StrategyKind};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use self::discovered::Tracking;
pub use self::discovered::{Applied, Batch, Change, Discovered};
pub(crate) use self::layers::Layers;
use self::layers::Source;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::{DynamicState, InstanceSpec};

/// How long an admin write on an etcd-backed node waits for this node's
/// watch to deliver it before applying it locally.
pub(crate) const OWN_WRITE_WAIT: Duration = Duration::from_secs(2);

/// Commands waiting for the task; a full queue makes senders wait.
const QUEUE: usize = 64;

/// Why a command was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The service is not in the config.
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// `consistent_hash` was asked for a service whose config has no
    /// `hash_key`: every pick would be random.
    #[error("service {0:?} has no hash_key in its config; consistent_hash needs one (set hash_key and reload first)")]
    NoHashKey(String),
    /// The core refused the change.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The core refused a service of a reloaded config.
    #[error("service {service}: {source}")]
    Service {
        /// Service name.
        service: String,
        /// The core's error.
        source: RegistryError,
    },
    /// The change was applied but the state file could not be written.
    #[error("state file: {0}")]
    Persist(String),
    /// The shared store (etcd) refused or did not answer.
    #[error("{0}")]
    Store(#[source] StoreError),
    /// The control task has stopped (the server is shutting down).
    #[error("the control task has stopped")]
    Stopped,
    /// Applying the command panicked (a bug; the task goes on).
    #[error("applying the change panicked: {0}")]
    Panicked(String),
}

/// An error from a [`SharedStore`].
pub(crate) type StoreError = Box<dyn std::error::Error + Send + Sync>;

/// What a [`SharedStore`] call returns.
pub(crate) type StoreFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where admin writes go on a node whose instances are discovered (etcd):
/// every node follows it, so a write there reaches all of them.
pub(crate) trait SharedStore: Send + Sync + std::fmt::Debug {
    /// The key of `service/id` (for log lines).
    fn key(&self, service: &str, id: &str) -> String;
    /// Writes `service/id`; returns the store's revision of the write and
    /// whether the key is new.
    fn put<'a>(
        &'a self,
        service: &'a str,
        id: &'a str,
        spec: &'a InstanceSpec,
    ) -> StoreFuture<'a, (i64, bool)>;
    /// Deletes `service/id`; returns the revision of the delete, or `None`
    /// when there was no such key.
    fn delete<'a>(&'a self, service: &'a str, id: &'a str) -> StoreFuture<'a, Option<i64>>;
}

/// A discovery update and the etcd revision it brings the node to.
#[derive(Debug, Clone)]
pub(crate) struct Update {
    /// What changed.
    pub batch: Batch,
    /// The revision, when known.
    pub revision: Option<i64>,
}

/// An admin API registration or removal.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Write {
    /// Register or update `service/id`.
    Register {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// The instance.
        spec: InstanceSpec,
    },
    /// Drain `service/id` for `drain` (zero: at once), then remove it.
    Remove {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// How long in-flight requests get.
        drain: Duration,
    },
}

impl Write {
    /// `(service, id)`.
    pub(crate) fn key(&self) -> (&str, &str) {
        match self {
            Write::Register { service, id, .. } | Write::Remove { service, id, .. } => {
                (service.as_str(), id.as_str())
            }
        }
    }
}

/// Logs an applied admin write: here, or in the shared store with its key
/// and revision.
fn log_write(write: &Write, added: bool, stored: Option<(String, i64)>) {
    let (key, revision) = stored.map_or((None, None), |(k, r)| (Some(k), Some(r)));
    let in_store = key.is_some();
    match write {
        Write::Register { service, id, spec } => info!(
            service = service.as_str(),
            instance = id.as_str(),
            address = spec.address.as_str(),
            port = spec.port,
            weight = spec.weight,
            from = if added { "absent" } else { "registered" },
            to = "registered",
            reason = if in_store {
                "admin API, written to etcd"
            } else {
                "admin API"
            },
            key,
            revision,
            "{}",
            if in_store {
                "instance written to etcd"
            } else {
                "instance registered"
            }
        ),
        Write::Remove { service, id, drain } => info!(
            service = service.as_str(),
            instance = id.as_str(),
            from = "registered",
            to = drained_to(*drain),
            reason = if in_store { "admin API, deleted from etcd" } else { "admin API" },
            key,
            revision,
            drain = ?drain,
            "{}",
            if in_store { "instance deleted from etcd" } else { "instance drain" }
        ),
    }
}

/// A change to the desired state.
#[derive(Debug)]
pub(crate) enum Command {
    /// A new, validated config (its services; listeners are the server's).
    Reload(Box<Config>),
    /// A discovery update.
    Discovery(Update),
    /// The shared store admin writes go to (`None`: apply them here).
    UseStore(Option<Arc<dyn SharedStore>>),
    /// An admin registration or removal; `local` applies it here even on an
    /// etcd-backed node.
    Write {
        /// The write.
        write: Write,
        /// Skip the shared store.
        local: bool,
    },
    /// Forgets the drain a shared-store removal set (the delete failed).
    CancelDrain {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
    },
    /// Changes a service's strategy (persisted).
    SetStrategy {
        /// Service name.
        service: String,
        /// The strategy.
        kind: StrategyKind,
    },
    /// Sets an instance's health score (live state, not persisted).
    SetHealth {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// In 0..=1.
        score: f64,
    },
}

/// What an applied command did.
#[derive(Debug)]
pub(crate) enum Reply {
    /// Applied.
    Done,
    /// A write applied here; `true` when it added an instance.
    Written(bool),
    /// A discovery update applied.
    Applied(Applied),
    /// The write goes to this store (the handle does it).
    Delegated(Arc<dyn SharedStore>),
}

/// What the control task publishes after each command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ControlStatus {
    /// The etcd revision this node has applied.
    pub revision: i64,
    /// Discovered instances, every service.
    pub discovered: usize,
}

/// What discovery publishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DiscoveryStatus {
    /// The first full listing was applied (stays true through outages).
    pub synced: bool,
    /// The last attempt failed: serving the last set seen.
    pub stale: bool,
}

/// Whether the node takes traffic (`/readyz`): listeners bound, not
/// draining, and, with dynamic discovery, the first listing applied.
#[derive(Debug, Clone)]
pub(crate) struct Readiness {
    serving: Arc<AtomicBool>,
    needs_sync: Arc<AtomicBool>,
    discovery: watch::Receiver<DiscoveryStatus>,
}

impl Readiness {
    /// Not ready until [`serving`](Self::serving); then waits for
    /// `discovery` to sync if `needs_sync`.
    pub(crate) fn new(discovery: watch::Receiver<DiscoveryStatus>) -> Self {
        Self {
            serving: Arc::new(AtomicBool::new(false)),
            needs_sync: Arc::new(AtomicBool::new(false)),
            discovery,
        }
    }

    /// Listeners bound (`true`) or draining (`false`).
    pub(crate) fn serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    /// Whether readiness waits for discovery's first listing.
    pub(crate) fn needs_sync(&self, needs: bool) {
        self.needs_sync.store(needs, Ordering::Release);
    }

    /// Ready now.
    pub(crate) fn is_ready(&self) -> bool {
        self.serving.load(Ordering::Acquire)
            && (!self.needs_sync.load(Ordering::Acquire) || self.discovery.borrow().synced)
    }
}

/// The desired state and what applies it: owned by the control task.
pub(crate) struct Control {
    layers: Layers,
    tracking: Tracking,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    state_file: Option<PathBuf>,
    store: Option<Arc<dyn SharedStore>>,
    status: watch::Sender<ControlStatus>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

impl Control {
    /// The control of `registry`, with the dynamic overrides of
    /// `state_file` (an unusable file is reported and moved aside; the node
    /// starts from its config alone).
    pub(crate) fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        state_file: Option<PathBuf>,
    ) -> Self {
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
        Self {
            layers: Layers::new(dynamic),
            tracking: Tracking::default(),
            registry,
            metrics,
            state_file,
            store: None,
            status: watch::Sender::new(ControlStatus::default()),
        }
    }

    /// Starts the task that applies commands; it ends when every handle is
    /// dropped.
    pub(crate) fn spawn(mut self) -> ControlHandle {
        let (tx, mut rx) = mpsc::channel::<Request>(QUEUE);
        let status = self.status.subscribe();
        tokio::spawn(async move {
            while let Some((command, reply)) = rx.recv().await {
                // A panic fails this command, not the task: discovery,
                // reloads and the admin API keep going.
                let r = CatchPanic(Box::pin(self.apply(command)))
                    .await
                    .unwrap_or_else(|panic| {
                        error!(panic = panic.as_str(), "control command panicked");
                        Err(ControlError::Panicked(panic))
                    });
                // The sender may have stopped waiting; the change stands.
                let _ = reply.send(r);
            }
        });
        ControlHandle { tx, status }
    }

    /// Applies one command.
    pub(crate) async fn apply(&mut self, command: Command) -> Result<Reply, ControlError> {
        match command {
            Command::Reload(config) => self.reload(*config).map(|()| Reply::Done),
            Command::Discovery(update) => Ok(Reply::Applied(self.discover(update))),
            Command::UseStore(store) => {
                self.store = store;
                // A new watch starts from its own listing.
                self.status.send_modify(|s| s.revision = 0);
                Ok(Reply::Done)
            }
            Command::Write { write, local } => {
                self.check(&write)?;
                match (&self.store, local) {
                    (Some(store), false) => {
                        if let Write::Remove { service, id, drain } = &write {
                            // This node drains for the admin's time, not DRAIN,
                            // when its watch sees the delete.
                            self.tracking.set_drain_override(service, id, *drain);
                        }
                        Ok(Reply::Delegated(store.clone()))
                    }
                    _ => self.write_here(write).await.map(Reply::Written),
                }
            }
            Command::CancelDrain { service, id } => {
                self.tracking.clear_drain_override(&service, &id);
                Ok(Reply::Done)
            }
            Command::SetStrategy { service, kind } => self
                .set_strategy(&service, kind)
                .await
                .map(|()| Reply::Done),
            Command::SetHealth { service, id, score } => {
                let events = self.registry.update_instance_health(&service, &id, score)?;
                self.metrics.report(events);
                Ok(Reply::Done)
            }
        }
    }

    /// Applies a new config layer as a diff against the previous one:
    /// services new to the config are converged whole; in a service both
    /// have, only the ids whose config instance was added, removed or
    /// changed are resolved again ([`layers::diff_instances`]), so a reload
    /// changing k instances costs O(k) registry work (plus an O(n)
    /// comparison of the parsed lists), and every other member, with its
    /// live state (health, breaker, EWMA, connections), is left as it was.
    /// The balancing is re-applied only when it changed. On error the
    /// previous config layer stays.
    fn reload(&mut self, config: Config) -> Result<(), ControlError> {
        let previous = self.layers.set_config(config.services);
        let r = self.converge_changes(&previous);
        if r.is_err() {
            self.layers.set_config(previous);
        }
        r
    }

    /// Brings the registry from the `previous` config layer to the current
    /// one (see [`reload`](Self::reload)).
    fn converge_changes(
        &self,
        previous: &std::collections::BTreeMap<String, crate::config::ServiceConfig>,
    ) -> Result<(), ControlError> {
        for (name, svc) in self.layers.config() {
            let err = |source| ControlError::Service {
                service: name.clone(),
                source,
            };
            let balancing = self
                .layers
                .balancing(name)
                .ok_or_else(|| err(RegistryError::UnknownService(name.clone())))?;
            let running = self.registry.service(name);
            let (Some(running), Some(before)) = (running, previous.get(name)) else {
                // New to the config (or to the registry): the whole service.
                self.registry
                    .configure_service(name, balancing)
                    .map_err(err)?;
                self.converge_service(name).map_err(err)?;
                continue;
            };
            if *running.config() != balancing {
                self.registry
                    .configure_service(name, balancing)
                    .map_err(err)?;
            }
            let changed = layers::diff_instances(&before.instances, &svc.instances).ids;
            if changed.is_empty() {
                continue;
            }
            let mut register = Vec::new();
            let mut gone = Vec::new();
            for id in &changed {
                match self.layers.resolve(name, id.as_str()) {
                    Some((_, instance)) => {
                        self.revive_if_draining(name, id.as_str());
                        register.push(instance);
                    }
                    None => gone.push(id.as_str()),
                }
            }
            self.registry
                .register_instances(name, register)
                .map_err(err)?;
            let removed = self
                .registry
                .deregister_instances(name, gone)
                .map_err(err)?;
            log_removed(name, removed.iter().map(|i| i.id().as_str()));
        }
        for name in self.registry.service_names() {
            if !self.layers.is_configured(&name) {
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
        Ok(())
    }

    /// Registers every instance the layers want in `name` (live state kept
    /// by id) and removes the members no layer wants.
    fn converge_service(&self, name: &str) -> Result<(), RegistryError> {
        let desired = self.layers.instances(name);
        let keep: std::collections::HashSet<datapunk_lb_core::InstanceId> =
            desired.iter().map(|(_, i)| i.id().clone()).collect();
        self.registry
            .register_instances(name, desired.into_iter().map(|(_, i)| i))?;
        let service = self
            .registry
            .service(name)
            .ok_or_else(|| RegistryError::UnknownService(name.to_owned()))?;
        let members = service.members();
        let gone: Vec<&str> = members
            .iter()
            .map(|m| m.instance().id())
            .filter(|id| !keep.contains(*id))
            .map(|id| id.as_str())
            .collect();
        let removed = self.registry.deregister_instances(name, gone)?;
        log_removed(name, removed.iter().map(|i| i.id().as_str()));
        Ok(())
    }

    fn discover(&mut self, update: Update) -> Applied {
        let applied = discovered::apply(
            &mut self.layers,
            &mut self.tracking,
            update.batch,
            &self.registry,
            &self.metrics,
        );
        let count = discovered::count(&self.layers);
        self.status.send_if_modified(|s| {
            let revision = update.revision.unwrap_or(s.revision).max(s.revision);
            let changed = (s.revision, s.discovered) != (revision, count);
            *s = ControlStatus {
                revision,
                discovered: count,
            };
            changed
        });
        applied
    }

    /// Refuses a write that cannot apply anywhere: a registration for a
    /// service not in the config, or an invalid instance.
    fn check(&self, write: &Write) -> Result<(), ControlError> {
        if let Write::Register { service, id, spec } = write {
            if !self.layers.is_configured(service) {
                return Err(ControlError::UnknownService(service.clone()));
            }
            spec.to_instance(id).map_err(RegistryError::from)?;
        }
        Ok(())
    }

    /// Applies a write to the dynamic layer and the registry, then persists.
    /// `true` when it added an instance.
    async fn write_here(&mut self, write: Write) -> Result<bool, ControlError> {
        let added = match &write {
            Write::Register { service, id, spec } => {
                let svc = self.layers.dynamic.service_mut(service);
                svc.removed.remove(id);
                svc.instances.insert(id.clone(), spec.clone());
                match self.converge(service, id, Duration::ZERO)? {
                    Converged::Registered(r) => r == Registered::Added,
                    Converged::Drained(_) => false,
                }
            }
            Write::Remove { service, id, drain } => {
                // Unknown here: 404, nothing changed.
                self.registry.instance(service, id)?;
                self.tracking.clear_drain_override(service, id);
                let in_config = self.layers.in_config(service, id);
                let svc = self.layers.dynamic.service_mut(service);
                svc.instances.remove(id);
                if in_config {
                    svc.removed.insert(id.clone());
                }
                if let Converged::Drained(events) = self.converge(service, id, *drain)? {
                    self.metrics.report(events);
                }
                false
            }
        };
        log_write(&write, added, None);
        self.persist().await?;
        Ok(added)
    }

    /// Brings `service/id` in the registry to what the layers resolve:
    /// registered (live state kept by id), or, when no layer wants it,
    /// drained for `drain` (zero: removed at once).
    fn converge(
        &self,
        service: &str,
        id: &str,
        drain: Duration,
    ) -> Result<Converged, ControlError> {
        match self.layers.resolve(service, id) {
            Some((source, instance)) => {
                if source == Source::Discovered {
                    // A key in etcd still holds this id (admin writes on a
                    // node without a store cannot override it).
                    warn!(
                        service,
                        instance = id,
                        "instance kept: its etcd key still exists"
                    );
                }
                self.revive_if_draining(service, id);
                Ok(Converged::Registered(
                    self.registry.register_instance(service, instance)?,
                ))
            }
            None => Ok(Converged::Drained(drain_instance(
                &self.registry,
                service,
                id,
                drain,
            )?)),
        }
    }

    /// An id wanted again while it drains (a reload does not cut drains
    /// short) comes back as a fresh instance, not as a draining one, as
    /// discovery does.
    fn revive_if_draining(&self, service: &str, id: &str) {
        if self
            .registry
            .instance(service, id)
            .is_ok_and(|st| st.draining)
        {
            let _ = self.registry.deregister_instance(service, id);
        }
    }

    async fn set_strategy(
        &mut self,
        service: &str,
        kind: StrategyKind,
    ) -> Result<(), ControlError> {
        if !self.layers.is_configured(service) {
            return Err(ControlError::UnknownService(service.to_owned()));
        }
        let no_key = |s: &crate::config::ServiceConfig| s.hash_key.is_none();
        if kind == StrategyKind::ConsistentHash
            && self.layers.config().get(service).is_some_and(no_key)
        {
            return Err(ControlError::NoHashKey(service.to_owned()));
        }
        let from = self.registry.service(service).map(|s| s.config().strategy);
        self.registry.set_strategy(service, kind)?;
        info!(
            service,
            from = from.map(|k| k.as_str()),
            to = kind.as_str(),
            reason = "admin API",
            "strategy changed"
        );
        self.layers.dynamic.service_mut(service).strategy = Some(kind.as_str().to_owned());
        self.persist().await
    }

    /// Writes the dynamic layer to the state file, if one is configured.
    async fn persist(&self) -> Result<(), ControlError> {
        let Some(path) = self.state_file.clone() else {
            return Ok(());
        };
        let state = self.layers.dynamic.clone();
        tokio::task::spawn_blocking(move || state.save(&path))
            .await
            .map_err(|e| ControlError::Persist(e.to_string()))?
            .map_err(|e| ControlError::Persist(e.to_string()))
    }
}

/// Logs each instance a reload removed.
fn log_removed<'a>(service: &str, ids: impl Iterator<Item = &'a str>) {
    for id in ids {
        info!(
            service,
            instance = id,
            from = "registered",
            to = "removed",
            reason = "not in config",
            "instance removed"
        );
    }
}

/// What [`Control::converge`] did.
enum Converged {
    Registered(Registered),
    Drained(Vec<Event>),
}

/// Drains `service/id` for `drain`, or removes it at once for a zero drain.
fn drain_instance(
    registry: &Registry,
    service: &str,
    id: &str,
    drain: Duration,
) -> Result<Vec<Event>, RegistryError> {
    if drain.is_zero() {
        registry
            .deregister_instance(service, id)
            .map(|_| Vec::new())
    } else {
        registry.drain_instance(service, id, drain)
    }
}

/// The state a drain of `drain` moves an instance to, for log lines.
fn drained_to(drain: Duration) -> &'static str {
    if drain.is_zero() {
        "removed"
    } else {
        "draining"
    }
}

/// Polls a future, turning a panic into `Err` with its message.
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                std::task::Poll::Ready(Err(message))
            }
        }
    }
}

type Request = (Command, oneshot::Sender<Result<Reply, ControlError>>);

/// Sends commands to the control task and awaits their replies.
#[derive(Debug, Clone)]
pub(crate) struct ControlHandle {
    tx: mpsc::Sender<Request>,
    status: watch::Receiver<ControlStatus>,
}

impl ControlHandle {
    /// Sends `command` and waits until it is applied.
    pub(crate) async fn request(&self, command: Command) -> Result<Reply, ControlError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((command, tx))
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// The task's last published status.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn status(&self) -> ControlStatus {
        *self.status.borrow()
    }

    /// Sends `command` and waits until it is applied, for commands whose
    /// reply carries nothing.
    pub(crate) async fn send(&self, command: Command) -> Result<(), ControlError> {
        self.request(command).await.map(drop)
    }

    /// Applies a discovery update.
    pub(crate) async fn discover(&self, update: Update) -> Result<Applied, ControlError> {
        match self.request(Command::Discovery(update)).await? {
            Reply::Applied(a) => Ok(a),
            _ => Ok(Applied::default()),
        }
    }

    /// An admin write: applied by the task, or delegated to the shared store
    /// (the task decides); `true` when it added an instance.
    pub(crate) async fn write(&self, write: Write) -> Result<bool, ControlError> {
        let command = Command::Write {
            write: write.clone(),
            local: false,
        };
        match self.request(command).await? {
            Reply::Delegated(store) => self.write_shared(store.as_ref(), write).await,
            Reply::Written(added) => Ok(added),
            _ => Ok(false),
        }
    }

    /// Writes to the shared store, then waits for this node to apply it.
    async fn write_shared(
        &self,
        store: &dyn SharedStore,
        write: Write,
    ) -> Result<bool, ControlError> {
        let (revision, created) = match &write {
            Write::Register { service, id, spec } => store
                .put(service, id, spec)
                .await
                .map_err(ControlError::Store)?,
            Write::Remove { service, id, .. } => match store.delete(service, id).await {
                Ok(Some(revision)) => (revision, false),
                // No key: a config or admin API instance of this node.
                Ok(None) => {
                    let local = Command::Write { write, local: true };
                    return match self.request(local).await? {
                        Reply::Written(added) => Ok(added),
                        _ => Ok(false),
                    };
                }
                Err(e) => {
                    let (service, id) = (service.clone(), id.clone());
                    self.request(Command::CancelDrain { service, id }).await?;
                    return Err(ControlError::Store(e));
                }
            },
        };
        let (service, id) = write.key();
        log_write(&write, created, Some((store.key(service, id), revision)));
        let change = match write {
            Write::Register { service, id, spec } => Change::Put { service, id, spec },
            Write::Remove { service, id, .. } => Change::Delete { service, id },
        };
        self.ensure_applied(revision, change).await?;
        Ok(created)
    }

    /// Waits for this node's watch to apply its own write at `revision`; if
    /// the watch is behind, applies `change` here so the answer holds on this
    /// node at once.
    async fn ensure_applied(&self, revision: i64, change: Change) -> Result<(), ControlError> {
        let mut rx = self.status.clone();
        let seen = tokio::time::timeout(OWN_WRITE_WAIT, rx.wait_for(|s| s.revision >= revision))
            .await
            // The watch guard is not `Send`: keep only whether it came.
            .is_ok_and(|r| r.is_ok());
        if seen {
            return Ok(());
        }
        warn!(
            revision,
            change = ?change,
            "discovery watch is behind: applying this node's own etcd write locally"
        );
        self.discover(Update {
            batch: Batch::Delta(vec![change]),
            revision: None,
        })
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests;
