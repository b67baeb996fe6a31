//! etcd discovery (built with the `etcd` cargo feature, on by default): the
//! watch loop of a balancer node (`EtcdDiscovery`), the writes of the
//! admin API on an etcd-backed node (`EtcdWriter`, the control module's
//! shared store) and the `datapunk-lb register` sidecar ([`register`]).
//!
//! The node follows the rule in [`crate::discovery`]: list the prefix at
//! revision `R`, watch from `R + 1`, and on any error mark discovery stale,
//! back off (200 ms doubling to 5 s, each delay jittered to 50–100 %),
//! reconnect with a fresh client to the next member, re-list and re-watch.
//! Each attempt talks to one member (the first one chosen at random, so
//! nodes spread over the cluster); the admin API's writes and the sidecar
//! connect to the first member that answers, from a random one on. A watch
//! that is quiet for `PROGRESS_EVERY` gets a progress request and the
//! member a linearizable read: a failed read (the member lost the quorum,
//! so its watch would miss changes) or no progress answer within another
//! `PROGRESS_EVERY` (a dead stream or half-open connection) counts as a
//! broken watch. Every call to etcd has a deadline (`CALL_TIMEOUT`); HTTP/2
//! keep-alives run every 5 s.
//!
//! Each attempt runs in its own task: a panic in the etcd client or the
//! gRPC stack under it becomes one more error to back off from, never a
//! dead discovery loop.
//!
//! With `https` endpoints every connection is TLS with the `ca_file` and
//! optional client certificate of the config (or the sidecar's flags),
//! files read at each connect (`tls.rs`).
//!
//! The client ([`client`]) is our own, over gRPC code generated from etcd's
//! `.proto` files and checked in ([`pb`], `scripts/gen-etcd-proto.sh`), so
//! the build needs no `protoc`.
//!
//! The sidecar grants a lease of `--ttl` (whole seconds, at least 1),
//! puts `{prefix}{service}/{id}` under it and keeps it alive every ttl/3. If
//! etcd is unreachable it retries with the same backoff; if the lease
//! expired meanwhile it grants a new one and puts the key again. On SIGTERM
//! or SIGINT it revokes the lease (the key leaves at once on every node) and
//! exits 0.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use tokio::sync::watch;

use self::client::{Client, ClientError};
use self::pb::mvccpb::event::EventType;
use super::{parse_key, parse_put, BadEntry, Batch, Change};
use crate::config::{EtcdConfig, EtcdTls};
use crate::control::{ControlHandle, DiscoveryStatus, SharedStore, StoreFuture, Update};
use crate::metrics::Metrics;
use crate::state::InstanceSpec;

pub mod client;
pub mod pb;
mod tls;

/// Deadline of every unary call to etcd (connect, get, put, grant, …).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// A watch quiet this long gets a progress request.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// First retry delay after an error.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Largest retry delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Why talking to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The etcd client reported an error.
    #[error("etcd {endpoints}: {what}: {source}")]
    Etcd {
        /// The endpoints.
        endpoints: String,
        /// What was being done.
        what: &'static str,
        /// The client's error.
        source: ClientError,
    },
    /// etcd did not answer in time.
    #[error("etcd {endpoints}: {what}: no answer within {timeout:?}")]
    Timeout {
        /// The endpoints.
        endpoints: String,
        /// What was being done.
        what: &'static str,
        /// The deadline.
        timeout: Duration,
    },
    /// The watch ended or was cancelled.
    #[error("etcd {endpoints}: watch broken: {reason}")]
    Watch {
        /// The endpoints.
        endpoints: String,
        /// Why.
        reason: String,
    },
    /// The sidecar's lease expired (etcd was unreachable for longer than the TTL).
    #[error("lease {lease:x} expired")]
    LeaseExpired {
        /// The lease id.
        lease: i64,
    },
    /// The etcd client panicked (caught; the loop goes on).
    #[error("etcd client panicked: {0}")]
    Panicked(String),
    /// The instance could not be encoded.
    #[error("encoding the instance: {0}")]
    Encode(String),
}

/// Calls to one set of members, each with a deadline.
#[derive(Debug, Clone)]
struct Calls {
    members: Arc<[String]>,
    endpoints: Arc<str>,
    tls: Option<Arc<EtcdTls>>,
}

impl Calls {
    fn new(members: &[String], tls: Option<&EtcdTls>) -> Self {
        Self {
            members: Arc::from(members),
            endpoints: Arc::from(members.join(",")),
            tls: tls.cloned().map(Arc::new),
        }
    }

    /// Runs an etcd call with `CALL_TIMEOUT`.
    async fn call<T>(
        &self,
        what: &'static str,
        f: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, DiscoveryError> {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(DiscoveryError::Etcd {
                endpoints: self.endpoints.to_string(),
                what,
                source,
            }),
            Err(_) => Err(DiscoveryError::Timeout {
                endpoints: self.endpoints.to_string(),
                what,
                timeout: CALL_TIMEOUT,
            }),
        }
    }

    /// Connects to the first member that answers, trying each once from a
    /// random one on (so clients spread over the cluster).
    async fn connect(&self) -> Result<Client, DiscoveryError> {
        let n = self.members.len();
        let first = fastrand::usize(..n.max(1));
        let mut error = None;
        for url in self.members.iter().cycle().skip(first).take(n) {
            let connecting = async {
                match &self.tls {
                    Some(tls) => Client::connect_tls(url, tls).await,
                    None => Client::connect(url).await,
                }
            };
            match self.call("connect", connecting).await {
                Ok(c) => return Ok(c),
                Err(e) => error = Some(e),
            }
        }
        Err(error.unwrap_or_else(|| DiscoveryError::Etcd {
            endpoints: self.endpoints.to_string(),
            what: "connect",
            source: ClientError::Protocol("no endpoints".into()),
        }))
    }
}

/// Exponential backoff with jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The next delay: the current step jittered to 50–100 %, then the step
    /// doubles (up to [`BACKOFF_MAX`]).
    pub(crate) fn delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d.mul_f64(0.5 + 0.5 * fastrand::f64())
    }

    /// Back to the first step.
    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `f` in its own task; a panic becomes [`DiscoveryError::Panicked`].
async fn isolated<T: Send + 'static>(
    f: impl Future<Output = Result<T, DiscoveryError>> + Send + 'static,
) -> Result<T, DiscoveryError> {
    let mut task = AbortOnDrop(tokio::spawn(f));
    match (&mut task.0).await {
        Ok(r) => r,
        Err(e) => Err(DiscoveryError::Panicked(e.to_string())),
    }
}

/// A node's etcd discovery: the watch task (stopped when this is dropped).
#[derive(Debug)]
pub(crate) struct EtcdDiscovery {
    config: EtcdConfig,
    task: JoinHandle<()>,
}

impl Drop for EtcdDiscovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where discovery reports: updates to the control task, counters to the
/// metrics, its status on a `watch` channel.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    /// The control task.
    pub(crate) control: ControlHandle,
    /// The metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// Where the status is published (kept across restarts of discovery).
    pub(crate) status: Arc<watch::Sender<DiscoveryStatus>>,
}

impl EtcdDiscovery {
    /// Starts watching, reporting to `link`. Must run inside a tokio runtime.
    pub(crate) fn start(link: Link, config: EtcdConfig) -> Self {
        let task = tokio::spawn(run(link, config.clone()));
        Self { config, task }
    }

    /// The config it runs.
    pub(crate) fn config(&self) -> &EtcdConfig {
        &self.config
    }
}

/// Staleness, shared by the loop and its sessions.
#[derive(Debug, Default)]
struct Status {
    stale: AtomicBool,
    synced_once: AtomicBool,
}

impl Status {
    fn synced(&self, link: &Link, endpoint: &str, revision: i64, instances: usize) {
        link.metrics.discovery_sync(true);
        link.metrics.discovery_stale(false);
        link.status.send_replace(DiscoveryStatus {
            synced: true,
            stale: false,
        });
        if !self.synced_once.swap(true, Ordering::AcqRel) {
            self.stale.store(false, Ordering::Release);
            info!(
                from = "starting",
                to = "synced",
                reason = "first etcd list",
                endpoint,
                revision,
                instances,
                "discovery synced; ready"
            );
        } else if self.stale.swap(false, Ordering::AcqRel) {
            info!(
                from = "stale",
                to = "synced",
                reason = "etcd list after reconnect",
                endpoint,
                revision,
                instances,
                "discovery resynced"
            );
        }
    }

    fn failed(&self, link: &Link, error: &DiscoveryError, listed: bool, retry_in: Duration) {
        if !listed {
            link.metrics.discovery_sync(false);
        }
        link.metrics.discovery_stale(true);
        link.status.send_modify(|s| s.stale = true);
        if !self.stale.swap(true, Ordering::AcqRel) {
            let from = if self.synced_once.load(Ordering::Acquire) {
                "synced"
            } else {
                "starting"
            };
            warn!(
                from,
                to = "stale",
                reason = %error,
                retry_in = ?retry_in,
                instances = link.control.status().discovered,
                "discovery stale: serving the last instance set seen"
            );
        } else {
            debug!(error = %error, retry_in = ?retry_in, "discovery: etcd still unreachable");
        }
    }
}

async fn run(link: Link, config: EtcdConfig) {
    let status = Arc::new(Status::default());
    let mut backoff = Backoff::default();
    let endpoints = config.endpoints.join(",");
    info!(
        endpoints = endpoints.as_str(),
        prefix = config.prefix.as_str(),
        "discovery: watching etcd"
    );
    // One member per attempt, starting at a random one (nodes spread over
    // the cluster), moving to the next after a failure.
    let mut member = fastrand::usize(..config.endpoints.len().max(1));
    loop {
        let started = Instant::now();
        let listed = Arc::new(AtomicBool::new(false));
        let endpoint = config
            .endpoints
            .get(member % config.endpoints.len().max(1))
            .cloned()
            .unwrap_or_default();
        member = member.wrapping_add(1);
        let r = isolated(session(
            link.clone(),
            config.prefix.clone(),
            endpoint,
            config.tls.clone(),
            status.clone(),
            listed.clone(),
        ))
        .await;
        let listed = listed.load(Ordering::Acquire);
        let error = match r {
            Ok(()) => return, // the control task is gone
            Err(e) => e,
        };
        if listed && started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        let delay = backoff.delay();
        status.failed(&link, &error, listed, delay);
        tokio::time::sleep(delay).await;
    }
}

/// One connection to one member: list, then watch until something breaks.
/// `Ok` only when the control task is gone.
async fn session(
    link: Link,
    prefix: String,
    endpoint: String,
    tls: Option<EtcdTls>,
    status: Arc<Status>,
    listed: Arc<AtomicBool>,
) -> Result<(), DiscoveryError> {
    let members = [endpoint];
    let calls = Calls::new(&members, tls.as_ref());
    let endpoints = calls.endpoints.to_string();
    let prefix = prefix.as_str();
    let mut client = calls.connect().await?;
    let resp = calls.call("list", client.get_prefix(prefix)).await?;
    let revision = resp.header.map_or(0, |h| h.revision);
    let mut entries = Vec::with_capacity(resp.kvs.len());
    let mut invalid = Vec::new();
    {
        for kv in &resp.kvs {
            match parse_put(prefix, &kv.key, &kv.value) {
                Ok(c) => entries.push(c),
                Err(e) => {
                    if let BadEntry::Value { service, id, .. } = &e {
                        invalid.push((service.clone(), id.clone()));
                    }
                    report_bad(&link, &e);
                }
            }
        }
        drop(resp);
        let n = entries.len();
        let update = Update {
            batch: Batch::Full { entries, invalid },
            revision: Some(revision),
        };
        if link.control.discover(update).await.is_err() {
            return Ok(());
        }
        listed.store(true, Ordering::Release);
        status.synced(&link, &endpoints, revision, n);
    }

    let mut watch = calls
        .call("watch", client.watch_prefix(prefix, revision + 1))
        .await?;
    let broken = |reason: String| DiscoveryError::Watch {
        endpoints: endpoints.clone(),
        reason,
    };
    let mut awaiting_progress = false;
    loop {
        let msg = match tokio::time::timeout(PROGRESS_EVERY, watch.message()).await {
            Err(_) if awaiting_progress => {
                return Err(DiscoveryError::Timeout {
                    endpoints: endpoints.clone(),
                    what: "watch progress",
                    timeout: PROGRESS_EVERY,
                })
            }
            Err(_) => {
                // Quiet: is the watch alive (progress request), and does this
                // member still have a leader (a linearizable read fails on a
                // member cut off from the quorum, whose watch would silently
                // miss changes)?
                calls
                    .call("watch progress request", watch.request_progress())
                    .await?;
                calls.call("linearizable read", client.get(prefix)).await?;
                awaiting_progress = true;
                continue;
            }
            Ok(Err(source)) => {
                return Err(DiscoveryError::Etcd {
                    endpoints: endpoints.clone(),
                    what: "watch",
                    source,
                })
            }
            Ok(Ok(None)) => return Err(broken("stream closed by etcd".into())),
            Ok(Ok(Some(m))) => m,
        };
        awaiting_progress = false;
        if msg.canceled {
            return Err(broken(format!(
                "cancelled by etcd: {:?} (compact revision {})",
                msg.cancel_reason, msg.compact_revision
            )));
        }
        if msg.compact_revision > 0 {
            return Err(broken(format!(
                "revision compacted up to {}",
                msg.compact_revision
            )));
        }
        let revision = msg.header.map(|h| h.revision);
        let mut changes = Vec::with_capacity(msg.events.len());
        for ev in &msg.events {
            let Some(kv) = &ev.kv else { continue };
            match EventType::try_from(ev.r#type) {
                Ok(EventType::Put) => match parse_put(prefix, &kv.key, &kv.value) {
                    Ok(c) => changes.push(c),
                    Err(e) => report_bad(&link, &e),
                },
                Ok(EventType::Delete) => {
                    // A deleted bad key was never applied: nothing to do.
                    if let Ok((service, id)) = parse_key(prefix, &kv.key) {
                        changes.push(Change::Delete { service, id });
                    }
                }
                // etcd has no other kind of event.
                Err(_) => {}
            }
        }
        // A progress answer (no events) still moves the revision on.
        let update = Update {
            batch: Batch::Delta(changes),
            revision,
        };
        if link.control.discover(update).await.is_err() {
            return Ok(());
        }
    }
}

fn report_bad(link: &Link, e: &BadEntry) {
    link.metrics.discovery_invalid();
    warn!(key = e.key(), error = %e, reason = "invalid value", "discovery: skipping invalid etcd entry");
}

/// Writes instances to etcd for the admin API of an etcd-backed node. Keys
/// it writes have no lease: they stay until deleted (through the admin API
/// of any node, or `etcdctl del`).
#[derive(Clone)]
pub(crate) struct EtcdWriter {
    config: EtcdConfig,
    client: Arc<tokio::sync::Mutex<Option<Client>>>,
}

impl std::fmt::Debug for EtcdWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdWriter")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EtcdWriter {
    /// A writer for `config`; connects on first use.
    pub(crate) fn new(config: EtcdConfig) -> Self {
        Self {
            config,
            client: Arc::default(),
        }
    }

    /// The key of `service/id`.
    pub(crate) fn key(&self, service: &str, id: &str) -> String {
        format!("{}{service}/{id}", self.config.prefix)
    }

    async fn with_client<T, F, Fut>(&self, f: F) -> Result<T, DiscoveryError>
    where
        F: FnOnce(Client, Calls) -> Fut,
        Fut: Future<Output = Result<T, DiscoveryError>>,
    {
        let calls = Calls::new(&self.config.endpoints, self.config.tls.as_ref());
        let client = {
            let mut slot = self.client.lock().await;
            match &*slot {
                Some(c) => c.clone(),
                None => {
                    let c = calls.connect().await?;
                    *slot = Some(c.clone());
                    c
                }
            }
        };
        let r = f(client, calls).await;
        if r.is_err() {
            *self.client.lock().await = None;
        }
        r
    }

    /// Puts `service/id` (no lease). Returns the revision of the write and
    /// whether the key is new.
    pub(crate) async fn put(
        &self,
        service: &str,
        id: &str,
        spec: &InstanceSpec,
    ) -> Result<(i64, bool), DiscoveryError> {
        let key = self.key(service, id);
        let value =
            serde_json::to_string(spec).map_err(|e| DiscoveryError::Encode(e.to_string()))?;
        self.with_client(|mut c, calls| async move {
            let r = calls.call("put", c.put(key, value, 0)).await?;
            Ok((r.header.map_or(0, |h| h.revision), r.prev_kv.is_none()))
        })
        .await
    }

    /// Deletes `service/id`. Returns the revision of the delete, or `None`
    /// if there was no such key.
    pub(crate) async fn delete(
        &self,
        service: &str,
        id: &str,
    ) -> Result<Option<i64>, DiscoveryError> {
        let key = self.key(service, id);
        self.with_client(|mut c, calls| async move {
            let r = calls.call("delete", c.delete(key)).await?;
            Ok((r.deleted > 0).then(|| r.header.map_or(0, |h| h.revision)))
        })
        .await
    }
}

impl SharedStore for EtcdWriter {
    fn key(&self, service: &str, id: &str) -> String {
        EtcdWriter::key(self, service, id)
    }

    fn put<'a>(
        &'a self,
        service: &'a str,
        id: &'a str,
        spec: &'a InstanceSpec,
    ) -> StoreFuture<'a, (i64, bool)> {
        Box::pin(async move { Ok(EtcdWriter::put(self, service, id, spec).await?) })
    }

    fn delete<'a>(&'a self, service: &'a str, id: &'a str) -> StoreFuture<'a, Option<i64>> {
        Box::pin(async move { Ok(EtcdWriter::delete(self, service, id).await?) })
    }
}

/// What `datapunk-lb register` keeps alive.
#[derive(Debug, Clone)]
pub struct Registration {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix, ending with `/`.
    pub prefix: String,
    /// Service name.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// The instance.
    pub spec: InstanceSpec,
    /// Lease TTL (whole seconds, at least 1).
    pub ttl: Duration,
    /// TLS to etcd (`--ca-file`, `--cert-file`, `--key-file`): set exactly
    /// when the endpoints are `https`.
    pub tls: Option<EtcdTls>,
}

impl Registration {
    /// The key.
    pub fn key(&self) -> String {
        format!("{}{}/{}", self.prefix, self.service, self.id)
    }

    fn ttl_secs(&self) -> i64 {
        i64::try_from(self.ttl.as_millis().div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1)
    }
}

/// Keeps `reg` registered until `shutdown` resolves (with the signal's
/// name), then revokes the lease so the instance leaves every node at once.
pub async fn register(
    reg: Registration,
    shutdown: impl Future<Output = &'static str>,
) -> Result<(), DiscoveryError> {
    let value =
        serde_json::to_string(&reg.spec).map_err(|e| DiscoveryError::Encode(e.to_string()))?;
    let key = reg.key();
    let endpoints = reg.endpoints.join(",");
    let mut lease: Option<i64> = None;
    let mut backoff = Backoff::default();
    tokio::pin!(shutdown);
    info!(
        service = reg.service.as_str(),
        instance = reg.id.as_str(),
        key = key.as_str(),
        endpoints = endpoints.as_str(),
        ttl = ?reg.ttl,
        "register: keeping the instance registered"
    );
    let signal = loop {
        let started = Instant::now();
        let error = tokio::select! {
            sig = &mut shutdown => break sig,
            r = keep_registered(&reg, &key, &value, &mut lease) => match r {
                Ok(never) => match never {},
                Err(e) => e,
            },
        };
        if started.elapsed() >= HEALTHY_SESSION {
            backoff.reset();
        }
        let delay = backoff.delay();
        warn!(
            service = reg.service.as_str(),
            instance = reg.id.as_str(),
            error = %error,
            retry_in = ?delay,
            "register: etcd unreachable; retrying"
        );
        tokio::select! {
            sig = &mut shutdown => break sig,
            () = tokio::time::sleep(delay) => {}
        }
    };
    let Some(id) = lease else {
        info!(
            service = reg.service.as_str(),
            instance = reg.id.as_str(),
            signal,
            "register: stopping (no lease held)"
        );
        return Ok(());
    };
    let calls = Calls::new(&reg.endpoints, reg.tls.as_ref());
    let revoked = async {
        let mut c = calls.connect().await?;
        calls.call("lease revoke", c.lease_revoke(id)).await
    }
    .await;
    match revoked {
        Ok(_) => info!(
            service = reg.service.as_str(),
            instance = reg.id.as_str(),
            from = "registered",
            to = "absent",
            reason = signal,
            lease = format!("{id:x}"),
            "register: lease revoked; instance deregistered"
        ),
        Err(e) => warn!(
            service = reg.service.as_str(),
            instance = reg.id.as_str(),
            error = %e,
            reason = signal,
            "register: lease revoke failed; the key leaves when the lease expires"
        ),
    }
    Ok(())
}

/// Connects, (re)grants the lease if needed, puts the key and keeps the
/// lease alive until something fails.
async fn keep_registered(
    reg: &Registration,
    key: &str,
    value: &str,
    lease: &mut Option<i64>,
) -> Result<Infallible, DiscoveryError> {
    let calls = Calls::new(&reg.endpoints, reg.tls.as_ref());
    let endpoints = calls.endpoints.to_string();
    let mut client = calls.connect().await?;
    // A lease that survived a short outage is kept; an expired one replaced.
    let mut kept = None;
    if let Some(id) = *lease {
        match calls
            .call("lease keep-alive", client.lease_keep_alive(id))
            .await
        {
            Ok(k) => kept = Some(k),
            Err(DiscoveryError::Etcd {
                source: ClientError::LeaseNotFound(_),
                ..
            }) => {
                warn!(
                    service = reg.service.as_str(),
                    instance = reg.id.as_str(),
                    lease = format!("{id:x}"),
                    "register: lease expired; granting a new one"
                );
                *lease = None;
            }
            Err(e) => return Err(e),
        }
    }
    let (id, mut keeper) = match (kept, *lease) {
        (Some(k), Some(id)) => (id, k),
        _ => {
            let id = calls
                .call("lease grant", client.lease_grant(reg.ttl_secs()))
                .await?;
            *lease = Some(id);
            let k = calls
                .call("lease keep-alive", client.lease_keep_alive(id))
                .await?;
            (id, k)
        }
    };
    calls.call("put", client.put(key, value, id)).await?;
    info!(
        service = reg.service.as_str(),
        instance = reg.id.as_str(),
        address = reg.spec.address.as_str(),
        port = reg.spec.port,
        from = "absent",
        to = "registered",
        reason = "lease granted and key put",
        lease = format!("{id:x}"),
        ttl_s = reg.ttl_secs(),
        "register: instance registered"
    );
    let every = (reg.ttl / 3).max(Duration::from_millis(300));
    loop {
        tokio::time::sleep(every).await;
        match calls.call("lease keep-alive", keeper.renew()).await? {
            None => {
                return Err(DiscoveryError::Watch {
                    endpoints: endpoints.clone(),
                    reason: "keep-alive stream closed by etcd".into(),
                })
            }
            Some(ttl) if ttl <= 0 => {
                *lease = None;
                return Err(DiscoveryError::LeaseExpired { lease: id });
            }
            Some(_) => {}
        }
    }
}
