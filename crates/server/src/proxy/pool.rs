//! The upstream connection layer: connections of our own, pooled **per
//! instance**, so the connection goes to the instance the core picked while
//! the request keeps the authority the client sent. HTTP/1.1 runs on our
//! own exchange (`h1_exchange.rs`: the request's task writes the request
//! and reads the response, no connection task); HTTP/2 on the `h2` crate
//! (`h2_upstream.rs`: the request's task sends the request and awaits its
//! response; one task per connection runs the connection).
//!
//! ## Rules
//!
//! - **Keyed by the instance**: id, address and port. Looked up by
//!   `&ServiceInstance` (the id is an `Arc<str>`; nothing is formatted per
//!   request); an id that reappears with another address gets a fresh pool.
//! - **Connect**: `connect_timeout`, TCP_NODELAY, TCP keepalive 60 s. A
//!   failed connect (or HTTP/2 handshake) is [`SendError::Connect`]: nothing
//!   reached the instance.
//! - **TLS** (`[service.X.tls]`, rules in `upstream_tls.rs`): the handshake
//!   is part of the connect (its own `connect_timeout`; a failure is
//!   `Connect`, logged at warn at most once a minute per instance and
//!   worker, with rustls' reason). Every connection of the service shares one client
//!   config, so later connections resume the TLS session. Under `auto` the
//!   instance's first connection learns the ALPN choice, and every request
//!   to it then goes out in that version (the connection is kept for it).
//! - **HTTP/1.1**: one request at a time per connection. A connection goes
//!   back to the idle list only when the exchange says it may take another
//!   request (`h1_exchange.rs`, **Reuse**): its response body ended cleanly,
//!   framed by length or chunks, with nothing after it, the request was
//!   sent whole and neither side asked to close (a body dropped half-read,
//!   an error or a `Connection: close` closes it instead). At most
//!   [`MAX_IDLE_PER_INSTANCE`] idle connections per instance in total (split
//!   evenly over the worker slots below), and at most
//!   `max_idle_connections` (default [`DEFAULT_MAX_IDLE_PER_SERVICE`]) across
//!   all of the service's instances (also split over the slots, rounded
//!   up): past either, a connection whose
//!   exchange ended is closed instead of kept. The service-wide bound is what
//!   keeps a large service within the balancer's file descriptors and its
//!   backends' connection limits: with traffic spread over 100,000
//!   instances, each instance's connection is reused only after every other
//!   instance had a turn, and unbounded idle lists held ~20,000 sockets
//!   until `accept`, `connect` and the reload's own file read failed with
//!   EMFILE (`docs/benchmarks.md`, "Scale (issue 11)"). One idle longer than
//!   [`IDLE_TIMEOUT`] is closed. **Idle stamps**: a connection counts as
//!   idle from the start of the attempt that last used it, and a checkout
//!   judges its age by the start of the attempt checking it out: the clock
//!   read each attempt makes anyway, not two more per request. The stamp
//!   is never later than the truth, so a connection is at most closed one
//!   exchange's duration early (a reconnect), never kept too long. The newest
//!   idle connection is used first (it is the likeliest alive). Before a
//!   request is written on an idle connection, the socket is read once
//!   without waiting (`H1Conn::is_open`; no system call when the reactor
//!   has seen nothing since the last read): one the server closed, reset or
//!   wrote to while idle is dropped, and the request goes to the next idle
//!   or a fresh connection, so an idle close that has reached us never
//!   fails a request, idempotent or not (hyper's legacy client did the same
//!   with `retry_canceled_requests`). A close still in flight while the
//!   request is written (the server closed the connection as idle while
//!   the request was on its way: nginx drains idle keep-alive connections
//!   when it runs short of `worker_connections`, and every server at its
//!   keep-alive timeout) reaches us as a close or reset before any byte of
//!   a response: the send fails [`Failed::stale`]. The request may have
//!   arrived, so only an idempotent request with a buffered body is sent
//!   again, once, on a new connection to the same instance, inside this
//!   send (the attempt hands the body over again): no retry of the attempt table, no retry
//!   budget, no outcome charged to the instance, as nginx gives a request
//!   that failed on a cached connection an extra try. Any other request
//!   fails the attempt as `Stale` (`attempt.rs`): 502 unless the attempt
//!   table retries it, and not charged to the instance either. A failed connect is `Connect` and the request
//!   is not lost: the caller still holds its head (HTTP/1.1 only borrows
//!   it).
//! - **HTTP/2** (h2c, prior knowledge): one multiplexed connection per
//!   instance (per worker under thread per core, see below), shared by
//!   every request; reopened when it closed (GOAWAY,
//!   error, either side's idle close). A request refused before it was sent
//!   (a GOAWAY racing it) is sent once more on a new connection, and so is
//!   one whose stream the server refused unprocessed (above a graceful
//!   GOAWAY's last stream id, or `REFUSED_STREAM`; `h2_upstream.rs`), if
//!   the attempt can build it again (its body buffered), else it fails
//!   [`Failed::stale`]. Beyond the
//!   server's `SETTINGS_MAX_CONCURRENT_STREAMS`, requests **wait** for a
//!   stream inside `h2` (under the request's deadline) rather than open a
//!   second connection: one connection per instance (per worker) is what
//!   backends size for, and the deadline bounds the wait. Until the server's SETTINGS
//!   arrive a new connection carries one stream at a time, so a burst never
//!   overruns a limit it has not heard yet.
//! - **Closed when**: every [`PRUNE_EVERY`], idle HTTP/1.1 connections past
//!   [`IDLE_TIMEOUT`], idle HTTP/2 connections (below) and every connection
//!   of an instance no longer in the service (discovery removed it) are
//!   dropped, and so is the pool of an
//!   instance left with no connection that no request holds (it is made
//!   again on its next request), so the pools cover the instances with
//!   connections, not every instance that ever took a request; a reload builds new
//!   `Upstream`s, and the old pool with its connections is dropped with the
//!   last request that used it. A connection in use is never cut: it closes
//!   when its exchange ends.
//! - **Idle HTTP/2**: the same [`IDLE_TIMEOUT`] as HTTP/1.1 (Envoy's
//!   upstream `idle_timeout`, HAProxy's idle server connections): a
//!   connection with no stream in flight that took no request for
//!   `IDLE_TIMEOUT` is closed by the sweep, so one instance's connection
//!   does not stay open for hours after its traffic stopped. A connection
//!   carrying a stream (a long gRPC stream, a slow response) is never
//!   closed by this rule, however long it lasts. The request path only
//!   marks the connection used and holds its stream count (a reference
//!   held until the response body is dropped), both in the slot it already
//!   locks; the sweep does the judging: a pass stamps the connection busy
//!   when a request came since the last pass or a stream was in flight at
//!   this pass or the last one, and a later pass finding it quiet
//!   `IDLE_TIMEOUT` after the stamp drops the pool's handle, on which
//!   `h2` sends GOAWAY and closes it. The last request or stream end
//!   comes at most one pass before the stamp, so the connection is closed
//!   between `IDLE_TIMEOUT` and `IDLE_TIMEOUT + PRUNE_EVERY` after it
//!   (90–120 s), as an idle HTTP/1.1 connection left to the sweep is.
//! - **Per worker** (`run --thread-per-core`, `crate::workers`): the pools
//!   are kept per worker slot (slot 0 serves every other thread: the
//!   multi-threaded runtime of the default mode, which shares one): each
//!   slot has its own map of instance pools, its own pool per instance
//!   (idle HTTP/1.1 list, HTTP/2 connection) and its own idle count. A
//!   worker looks up, checks out, opens and returns connections in its own
//!   slot only, so a connection's I/O (HTTP/1.1: in the request's task;
//!   HTTP/2: its connection task) runs on the worker whose requests use it,
//!   registered with that worker's reactor: no cross-thread wake-up per
//!   request, and no lock, reference count or counter written by two
//!   workers on the request path (one map and one pool per instance had
//!   every request of every worker take the map's read lock, clone the
//!   pool's `Arc` and move the service's idle count: six writes a request
//!   to lines the other worker writes too). The idle caps are split over
//!   the slots (`MAX_IDLE_PER_INSTANCE / slots`, at least 1, and the
//!   service's bound likewise), so the totals hold; HTTP/2 opens one
//!   connection per instance per worker that sends to it (as Envoy's
//!   per-worker pools do), so N workers may hold N connections to an
//!   instance. Under TLS each worker learns an instance's ALPN choice from
//!   its own first connection, and a failing handshake is logged at warn
//!   at most once a minute per instance and worker.
//!
//! Returning an HTTP/1.1 connection rides in the response body
//! ([`PooledBody`]): the body reads from the connection as the client's
//! task polls it, and the frame that ends it (or its drop at its end: an
//! empty body may be dropped unpolled) puts the connection back on the idle
//! list at once. No task, no channel and no wake-up of another task per
//! request; hyper's client took two task wake-ups, a oneshot, a body
//! channel and its `want` signalling per exchange.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

use datapunk_lb_core::{InstanceId, Service, ServiceInstance};
use http::header::HeaderValue;
use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;
use tower_service::Service as _;
use tracing::{debug, warn};

use super::h1_exchange::{ExchangeError, H1Body, H1Conn, RequestHead};
use super::h2_upstream::{self, H2Body, H2Sender, SendFailure};
use super::raw_head::RawHeaders;
use super::request_body::UpstreamBody;
use super::upstream_tls::{UpstreamIo, UpstreamTls};
use super::BoxError;
use crate::workers;

/// An idle connection is closed after this long: an HTTP/1.1 one on the
/// idle list, an HTTP/2 one with no stream in flight and no request.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per instance, in total over its worker
/// slots (each slot keeps `MAX_IDLE_PER_INSTANCE / slots`).
pub(crate) const MAX_IDLE_PER_INSTANCE: usize = 1024;
/// Idle HTTP/1.1 connections kept across all of a service's instances
/// unless `max_idle_connections` says otherwise.
pub(crate) const DEFAULT_MAX_IDLE_PER_SERVICE: usize = crate::config::DEFAULT_MAX_IDLE_CONNECTIONS;
/// How often idle and departed instances' connections are swept.
pub(crate) const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// TCP keepalive of upstream connections (as before).
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// At most one TLS handshake failure logged at warn per instance this often.
const TLS_WARN_EVERY: Duration = Duration::from_secs(60);

/// Why a send failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be made: nothing reached the instance.
    #[error("connect: {0}")]
    Connect(String),
    /// The HTTP/2 connection failed after the request was handed to it.
    #[error("{0}")]
    Failed(#[from] h2::Error),
    /// The HTTP/1.1 exchange failed after the request was handed to its
    /// connection.
    #[error("{0}")]
    Exchange(#[from] ExchangeError),
}

/// A send that failed: why, and what of the request never left, handed
/// back so that it can go to another instance without a copy: (HTTP/2) the
/// request itself when no connection could be made or the connection
/// failed before it took it; (HTTP/1.1, which only borrows the head) the body,
/// unpolled, when no connection could be made.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) error: SendError,
    pub(crate) unsent: Option<Request<UpstreamBody>>,
    pub(crate) unsent_body: Option<UpstreamBody>,
    /// The instance turned the request away without an answer and without
    /// a failure of its own, and it was not sent again: HTTP/1.1, an idle
    /// connection reused and closed or reset before any byte of a response
    /// (module doc, **HTTP/1.1**: the race with its idle close); HTTP/2, the
    /// stream refused unprocessed (a graceful GOAWAY's or `REFUSED_STREAM`:
    /// `h2_upstream.rs`, **Unsent**).
    pub(crate) stale: bool,
}

impl Failed {
    fn unsent(error: SendError, req: Request<UpstreamBody>) -> Self {
        Self {
            error,
            unsent: Some(req),
            unsent_body: None,
            stale: false,
        }
    }

    fn unsent_body(error: SendError, body: UpstreamBody) -> Self {
        Self {
            error,
            unsent: None,
            unsent_body: Some(body),
            stale: false,
        }
    }

    fn sent(error: impl Into<SendError>) -> Self {
        Self {
            error: error.into(),
            unsent: None,
            unsent_body: None,
            stale: false,
        }
    }
}

/// The connections of one service's instances.
#[derive(Debug)]
pub(crate) struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    connector: HttpConnector,
    /// `[service.X.tls]`, shared by every connection (session resumption).
    tls: Option<Arc<UpstreamTls>>,
    connect_timeout: Duration,
    /// Read by the sweep: which instances are still members.
    service: Option<Arc<Service>>,
    /// Per worker slot ([`workers::slot`]): the pools of the instances its
    /// requests went to, and its share of the service's idle bound.
    slots: Box<[WorkerPools]>,
    sweeping: AtomicBool,
}

/// One worker slot's pools. Only that slot's requests (and the sweep) take
/// its lock and its pools' reference counts, so no line of it is written
/// from two cores per request; aligned to cache lines of its own.
#[derive(Debug)]
#[repr(align(128))]
struct WorkerPools {
    instances: RwLock<super::NameMap<Arc<InstancePool>, InstanceId>>,
    /// The slot's idle connections over every instance, and their bound.
    idle_total: Arc<IdleTotal>,
}

/// The count of a slot's idle connections (every instance) and its bound;
/// on cache lines of its own, as it is written per request.
#[derive(Debug)]
#[repr(align(128))]
struct IdleTotal {
    count: AtomicUsize,
    limit: AtomicUsize,
}

impl IdleTotal {
    /// A place for one more idle connection, if under the bound.
    fn reserve(self: &Arc<Self>) -> Option<IdlePlace> {
        let limit = self.limit.load(Ordering::Relaxed);
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| IdlePlace(self.clone()))
    }
}

/// One idle connection counted in its service's [`IdleTotal`] until the
/// connection leaves the idle list, however it leaves (checked out,
/// expired, swept, or its instance's pool dropped).
#[derive(Debug)]
struct IdlePlace(Arc<IdleTotal>);

impl Drop for IdlePlace {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connections of one instance that one worker slot uses: their I/O
/// runs on that worker's runtime, so a request and its connection never
/// cross threads.
#[derive(Debug)]
pub(crate) struct InstancePool {
    address: Arc<str>,
    port: u16,
    /// `address:port` (brackets for IPv6): the authority when the instance
    /// is named, and the connect target.
    authority: Authority,
    /// The same as a Host value.
    host: HeaderValue,
    connect_uri: Uri,
    /// Its idle HTTP/1.1 connections and HTTP/2 connection.
    slot: Slot,
    /// Idle HTTP/1.1 connections kept: the per-instance cap split over the
    /// slots, so the instance's total holds.
    idle_cap: usize,
    /// TLS: whether the server chose `h2` by ALPN (first connection).
    alpn_h2: OnceLock<bool>,
    /// TLS: when a handshake failure was last logged at warn.
    tls_warned: Mutex<Option<Instant>>,
    /// The slot's idle count, shared by all of its instances.
    idle_total: Arc<IdleTotal>,
}

/// An instance's connections in one worker slot.
#[derive(Debug, Default)]
struct Slot {
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Option<H2Conn>>,
    /// Held while an HTTP/2 connection is being opened, so concurrent
    /// requests share one connection instead of racing to open several.
    h2_opening: tokio::sync::Mutex<()>,
}

/// A slot's HTTP/2 connection and what the sweep needs to judge it idle.
#[derive(Debug)]
struct H2Conn {
    sender: H2Sender,
    /// Its streams in flight, counted by reference: this handle plus one
    /// [`StreamHold`] per request, taken with the sender and held until its
    /// response body ends or is dropped (an unfinished body resets its
    /// stream then).
    streams: Arc<()>,
    /// Set by each request that takes the connection (and by a sweep pass
    /// that found a stream in flight), cleared by the sweep: the next pass
    /// is to stamp it busy.
    used: bool,
    /// The sweep's last pass that found it in use (or its opening): quiet
    /// since then at least.
    busy_at: Instant,
}

/// One request's hold on its HTTP/2 connection's stream count.
type StreamHold = Arc<()>;

#[derive(Debug)]
struct Idle {
    conn: Box<H1Conn>,
    since: Instant,
    _place: IdlePlace,
}

impl Pool {
    /// An empty pool connecting with `connect_timeout`, over `tls` when
    /// given; `service`, when given, lets the sweep drop instances that
    /// left it.
    pub(crate) fn new(
        connect_timeout: Duration,
        tls: Option<Arc<UpstreamTls>>,
        service: Option<Arc<Service>>,
    ) -> Self {
        // Sized by the workers started so far: `run` starts its workers
        // before it applies the config that makes pools.
        Self::with_slots(connect_timeout, tls, service, 1 + workers::most_started())
    }

    /// [`new`](Self::new) with `slots` worker slots (at least one).
    fn with_slots(
        connect_timeout: Duration,
        tls: Option<Arc<UpstreamTls>>,
        service: Option<Arc<Service>>,
        slots: usize,
    ) -> Self {
        let slots = slots.max(1);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(TCP_KEEPALIVE));
        Self {
            inner: Arc::new(Inner {
                connector,
                tls,
                connect_timeout,
                service,
                slots: (0..slots)
                    .map(|_| WorkerPools {
                        instances: RwLock::new(super::NameMap::default()),
                        idle_total: Arc::new(IdleTotal {
                            count: AtomicUsize::new(0),
                            limit: AtomicUsize::new(0),
                        }),
                    })
                    .collect(),
                sweeping: AtomicBool::new(false),
            }),
        }
        .with_idle_limit(DEFAULT_MAX_IDLE_PER_SERVICE)
    }

    /// Keeps at most `limit` idle connections across all instances
    /// (`max_idle_connections`; 0 keeps none), split evenly over the worker
    /// slots (rounded up: each slot keeps at least one when `limit` is not
    /// 0).
    pub(crate) fn with_idle_limit(self, limit: usize) -> Self {
        let share = limit.div_ceil(self.inner.slots.len());
        for slot in self.inner.slots.iter() {
            slot.idle_total.limit.store(share, Ordering::Relaxed);
        }
        self
    }

    /// [`send_h1`](Self::send_h1) for a whole request.
    #[cfg(test)]
    pub(crate) async fn send_h1_request(
        &self,
        to: &Arc<InstancePool>,
        req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, Failed> {
        let (parts, body) = req.into_parts();
        self.send_h1(to, RequestHead::of(&parts), body, Instant::now(), || None)
            .await
    }

    /// Idle connections kept now, every instance together.
    #[cfg(test)]
    fn idle_total(&self) -> usize {
        self.inner
            .slots
            .iter()
            .map(|s| s.idle_total.count.load(Ordering::Acquire))
            .sum()
    }

    /// The connections of `instance` in the calling thread's worker slot,
    /// created on first use.
    pub(crate) fn instance(
        &self,
        instance: &ServiceInstance,
    ) -> Result<Arc<InstancePool>, SendError> {
        let slots = &self.inner.slots;
        let slot = &slots[workers::slot(slots.len())];
        if let Some(p) = slot.instances.read().get(instance.id()) {
            if p.is(instance) {
                return Ok(p.clone());
            }
        }
        let idle_cap = (MAX_IDLE_PER_INSTANCE / slots.len()).max(1);
        let fresh = Arc::new(InstancePool::new(
            instance,
            slot.idle_total.clone(),
            idle_cap,
        )?);
        slot.instances
            .write()
            .insert(instance.id().clone(), fresh.clone());
        self.start_sweep();
        Ok(fresh)
    }

    /// Sends the request `head` with `body` as HTTP/1.1 to `to`, on its
    /// newest idle connection that is still open, else a new one. The
    /// exchange runs in the caller's task (`h1_exchange.rs`) and only
    /// borrows the head: the caller keeps it, and a failed connect hands
    /// back only the body ([`Failed::unsent_body`]). `began`: when the
    /// attempt started, the time the connection's idle stamps are judged
    /// and taken by (module doc, **Idle stamps**). When a reused
    /// connection closes unanswered (module doc, **HTTP/1.1**), `again`
    /// gives the body to send once more, on a new connection, or `None`
    /// when the request may not go out again: then the send fails
    /// [`Failed::stale`].
    pub(crate) async fn send_h1(
        &self,
        to: &Arc<InstancePool>,
        head: RequestHead<'_>,
        body: UpstreamBody,
        began: Instant,
        again: impl FnOnce() -> Option<UpstreamBody>,
    ) -> Result<Response<PooledBody>, Failed> {
        let mut again = Some(again);
        let mut body = body;
        // The one loop sends at most twice: a second send takes no idle
        // connection, so it cannot be stale.
        let mut reuse = true;
        loop {
            let mut reused = false;
            let conn = loop {
                // Not `checkout_h1(..).filter(..)`: that would close the idle
                // connection it took.
                let idle = if reuse { to.checkout_h1(began) } else { None };
                match idle {
                    Some(mut conn) => {
                        if conn.is_open() {
                            reused = true;
                            break conn;
                        }
                        // Closed while idle (or the server wrote to it): the next.
                        debug!("idle upstream connection was closed; trying another");
                    }
                    None => {
                        // Boxed: the connect's state (TCP, TLS) would otherwise
                        // sit in every send's future, moved and copied with it
                        // on the reuse path too.
                        match Box::pin(self.connect(to)).await {
                            Ok(io) => break H1Conn::new(io),
                            // Nothing was read from the body: it goes back.
                            Err(error) => return Err(Failed::unsent_body(error, body)),
                        }
                    }
                }
            };
            let e = match conn.send(head, body).await {
                Ok(resp) => return Ok(resp.map(|body| PooledBody::h1(body, to, began))),
                Err(e) => e,
            };
            let stale = reused && matches!(e, ExchangeError::Unanswered(_));
            match again.take().filter(|_| stale).and_then(|again| again()) {
                Some(next) => {
                    debug!(error = %e, "reused upstream connection closed unanswered; sending again on a new connection");
                    body = next;
                    reuse = false;
                }
                None => {
                    return Err(Failed {
                        stale,
                        ..Failed::sent(e)
                    })
                }
            }
        }
    }

    /// Sends `req` as HTTP/2 to `to` (absolute URI: its authority is the
    /// `:authority` sent).
    /// A stream the server refuses unprocessed goes out once more as the
    /// request `again` builds, or, when that is `None`, fails
    /// [`Failed::stale`].
    pub(crate) async fn send_h2(
        &self,
        to: &InstancePool,
        req: Request<UpstreamBody>,
        again: impl FnOnce() -> Option<Request<UpstreamBody>>,
    ) -> Result<Response<PooledBody>, Failed> {
        let slot = &to.slot;
        let (sender, mut hold) = match self.h2_sender(to, slot).await {
            Ok(taken) => taken,
            Err(error) => return Err(Failed::unsent(error, req)),
        };
        let resp = match sender.send(req).await {
            Ok(resp) => resp,
            // Not taken (the connection was going away): once more on a
            // new connection. Boxed, as a rare path.
            Err(SendFailure::Unsent(e, back)) => {
                debug!(error = %e, "upstream HTTP/2 connection was closing; reopening");
                slot.forget_closed_h2();
                let (resp, new_hold) = Box::pin(self.resend_h2(to, slot, *back)).await?;
                hold = new_hold;
                resp
            }
            Err(SendFailure::Sent(e)) => return Err(Failed::sent(e)),
            // Refused unprocessed: once more, if the caller can build it
            // again. Boxed, as a rare path.
            Err(SendFailure::Refused(e)) => match again() {
                Some(req) => {
                    debug!(error = %e, "upstream HTTP/2 stream refused unprocessed; sending again");
                    let (resp, new_hold) = Box::pin(self.resend_h2(to, slot, req)).await?;
                    hold = new_hold;
                    resp
                }
                None => {
                    return Err(Failed {
                        stale: true,
                        ..Failed::sent(e)
                    })
                }
            },
        };
        // HTTP/2 streams need no check-in (the connection is shared); the
        // body holds its stream's place in the count until it ends.
        Ok(resp.map(|body| PooledBody {
            kind: Kind::H2 { body, _hold: hold },
        }))
    }

    /// Sends `req`, refused by a closing connection (or its stream refused
    /// unprocessed), on the instance's connection: a new one when that one
    /// is going away.
    async fn resend_h2(
        &self,
        to: &InstancePool,
        slot: &Slot,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<H2Body>, StreamHold), Failed> {
        let (sender, hold) = match self.h2_sender(to, slot).await {
            Ok(taken) => taken,
            Err(error) => return Err(Failed::unsent(error, req)),
        };
        match sender.send(req).await {
            Ok(resp) => Ok((resp, hold)),
            Err(SendFailure::Unsent(e, _) | SendFailure::Sent(e) | SendFailure::Refused(e)) => {
                Err(Failed::sent(e))
            }
        }
    }

    /// The instance's HTTP/2 connection, opened when it has none alive,
    /// with a hold on its stream count for the request that takes it.
    async fn h2_sender(
        &self,
        to: &InstancePool,
        slot: &Slot,
    ) -> Result<(H2Sender, StreamHold), SendError> {
        if let Some(taken) = slot.take_h2() {
            return Ok(taken);
        }
        // Boxed: the open's state (lock, TCP, TLS, handshake) would
        // otherwise sit in every request's future, copied with it.
        Box::pin(self.open_h2(to, slot)).await
    }

    /// Opens the instance's HTTP/2 connection for this worker, unless a
    /// request that waited on the same lock already did.
    async fn open_h2(
        &self,
        to: &InstancePool,
        slot: &Slot,
    ) -> Result<(H2Sender, StreamHold), SendError> {
        let _opening = slot.h2_opening.lock().await;
        if let Some(taken) = slot.take_h2() {
            return Ok(taken);
        }
        let io = self.connect(to).await?;
        let sender = handshake_h2(io).await?;
        Ok(slot.keep_h2(sender))
    }

    /// The service's upstream TLS, if any.
    pub(crate) fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        self.inner.tls.as_ref()
    }

    /// Whether `to` speaks HTTP/2 by ALPN, learnt from its first TLS
    /// connection; opening that connection here keeps it for the request
    /// that asked (as `to`'s HTTP/2 connection or an idle HTTP/1.1 one).
    pub(crate) async fn alpn_h2(&self, to: &InstancePool) -> Result<bool, SendError> {
        if let Some(h2) = to.alpn_h2.get() {
            return Ok(*h2);
        }
        let slot = &to.slot;
        let _opening = slot.h2_opening.lock().await;
        if let Some(h2) = to.alpn_h2.get() {
            return Ok(*h2);
        }
        let io = self.connect(to).await?;
        let h2 = self.inner.tls.as_ref().is_some_and(|t| t.speaks_h2(&io));
        if h2 {
            // Kept for the request that asked, which takes it next.
            drop(slot.keep_h2(handshake_h2(io).await?));
        } else {
            to.push_idle(H1Conn::new(io), Instant::now());
        }
        Ok(h2)
    }

    /// A new connection to `to`: TCP, then TLS when the service has it.
    async fn connect(&self, to: &InstancePool) -> Result<UpstreamIo, SendError> {
        let mut connector = self.inner.connector.clone();
        let tcp = connector
            .call(to.connect_uri.clone())
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?
            .into_inner();
        let Some(tls) = &self.inner.tls else {
            return Ok(UpstreamIo::Plain(tcp));
        };
        match tls
            .handshake(tcp, &to.address, self.inner.connect_timeout)
            .await
        {
            Ok(io) => {
                let _ = to.alpn_h2.set(tls.speaks_h2(&io));
                Ok(io)
            }
            Err(e) => {
                let error = format!("TLS handshake: {e}");
                to.warn_tls(&error);
                Err(SendError::Connect(error))
            }
        }
    }

    /// Starts the sweep once, from the first connection on (inside the
    /// runtime); it ends when the pool is dropped.
    fn start_sweep(&self) {
        if self.inner.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(sweep(weak));
    }
}

/// HTTP/2 over a new connection; its task ends with the connection.
async fn handshake_h2(io: UpstreamIo) -> Result<H2Sender, SendError> {
    h2_upstream::handshake(io)
        .await
        .map_err(|e| SendError::Connect(e.to_string()))
}

async fn sweep(pool: Weak<Inner>) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        inner.prune(Instant::now());
    }
}

impl Inner {
    /// Drops expired idle connections and the pools of departed instances.
    fn prune(&self, now: Instant) {
        if self.slots.iter().all(|s| s.instances.read().is_empty()) {
            return;
        }
        let members = self.service.as_ref().map(|s| s.members());
        // By id, built before the lock: a scan of every member per pooled
        // instance was O(pooled × members), at 100,000 instances and a few
        // thousand pooled ones tens of seconds under the write lock, with
        // every request's checkout waiting.
        let by_id: Option<HashMap<&str, &ServiceInstance>> = members.as_ref().map(|ms| {
            ms.iter()
                .map(|m| (m.instance().id().as_str(), m.instance()))
                .collect()
        });
        for slot in self.slots.iter() {
            slot.instances.write().retain(|id, p| {
                let member = by_id
                    .as_ref()
                    .is_none_or(|ms| ms.get(id.as_str()).is_some_and(|i| p.is(i)));
                if !member {
                    return false;
                }
                let h2_left = p.slot.sweep_h2(now);
                let mut idle = p.slot.idle.lock();
                idle.retain_mut(|i| now.duration_since(i.since) < IDLE_TIMEOUT && i.conn.is_open());
                // A pool with no connection that nothing holds (no request
                // in flight: the lock keeps `instance` from handing out a
                // new reference) goes too, so the map holds the instances
                // with connections, not every instance that ever took a
                // request (~300 B each; all 100,000 under spread traffic).
                !idle.is_empty() || h2_left || Arc::strong_count(p) > 1
            });
        }
    }
}

impl InstancePool {
    fn new(
        instance: &ServiceInstance,
        idle_total: Arc<IdleTotal>,
        idle_cap: usize,
    ) -> Result<Self, SendError> {
        let (address, port) = (instance.address(), instance.port());
        let text = if address.contains(':') {
            format!("[{address}]:{port}")
        } else {
            format!("{address}:{port}")
        };
        let bad = |e: &dyn std::fmt::Display| SendError::Connect(format!("{text}: {e}"));
        let authority: Authority = text.parse().map_err(|e| bad(&e))?;
        let connect_uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| bad(&e))?;
        let host = HeaderValue::from_str(&text).map_err(|e| bad(&e))?;
        Ok(Self {
            address: address.into(),
            port,
            authority,
            host,
            connect_uri,
            slot: Slot::default(),
            idle_cap,
            alpn_h2: OnceLock::new(),
            tls_warned: Mutex::new(None),
            idle_total,
        })
    }

    /// Logs a failed TLS handshake at warn, at most once per
    /// [`TLS_WARN_EVERY`] (a wrong CA fails every connect; one line says
    /// why, the connect-failure metrics count them all).
    fn warn_tls(&self, error: &str) {
        let now = Instant::now();
        {
            let mut last = self.tls_warned.lock();
            if last.is_some_and(|t| now.duration_since(t) < TLS_WARN_EVERY) {
                debug!(instance = %self.authority, error, "upstream TLS handshake failed");
                return;
            }
            *last = Some(now);
        }
        warn!(instance = %self.authority, error, "upstream TLS handshake failed");
    }

    /// Whether this pool connects where `instance` lives.
    fn is(&self, instance: &ServiceInstance) -> bool {
        *self.address == *instance.address() && self.port == instance.port()
    }

    /// The instance's `address:port`.
    pub(crate) fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The instance's `address:port` as a Host value.
    pub(crate) fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// The newest idle connection not past [`IDLE_TIMEOUT`] (the caller
    /// checks that it is still open, outside the lock).
    fn checkout_h1(&self, now: Instant) -> Option<Box<H1Conn>> {
        let mut idle = self.slot.idle.lock();
        let i = idle.pop()?;
        if now.duration_since(i.since) >= IDLE_TIMEOUT {
            // The rest are older still.
            idle.clear();
            return None;
        }
        Some(i.conn)
    }

    /// Keeps `conn`, whose exchange ended and which may take another
    /// request, idle if both bounds allow (the slot's share of the
    /// instance's cap, the slot's share of the service's total); else it is
    /// dropped, which closes the connection.
    fn push_idle(&self, conn: Box<H1Conn>, since: Instant) {
        let mut idle = self.slot.idle.lock();
        if idle.len() >= self.idle_cap {
            return;
        }
        if let Some(place) = self.idle_total.reserve() {
            idle.push(Idle {
                conn,
                since,
                _place: place,
            });
        }
    }

    /// Idle HTTP/1.1 connections.
    #[cfg(test)]
    fn idle_len(&self) -> usize {
        self.slot.idle.lock().len()
    }
}

impl Slot {
    /// The slot's HTTP/2 connection if it is open, marked used, with a hold
    /// on its stream count (taken under the lock the sweep judges it by, so
    /// the sweep never drops a connection a request just took).
    fn take_h2(&self) -> Option<(H2Sender, StreamHold)> {
        let mut slot = self.h2.lock();
        let c = slot.as_mut()?;
        if c.sender.is_closed() {
            *slot = None;
            return None;
        }
        c.used = true;
        Some((c.sender.clone(), c.streams.clone()))
    }

    /// Keeps `sender`, a new connection, as the slot's HTTP/2 connection;
    /// returns it with a hold for the request that opened it.
    fn keep_h2(&self, sender: H2Sender) -> (H2Sender, StreamHold) {
        let streams = StreamHold::default();
        let taken = (sender.clone(), streams.clone());
        *self.h2.lock() = Some(H2Conn {
            sender,
            streams,
            used: true,
            busy_at: Instant::now(),
        });
        taken
    }

    /// The sweep's pass over the slot's HTTP/2 connection at `now`: one in
    /// use (a request since the last pass, or a stream in flight at this
    /// pass or the last one) is stamped busy; one closed, or quiet for
    /// [`IDLE_TIMEOUT`] since it was last stamped, is dropped. Returns
    /// whether it is kept.
    fn sweep_h2(&self, now: Instant) -> bool {
        let mut slot = self.h2.lock();
        let Some(c) = &mut *slot else { return false };
        if c.sender.is_closed() {
            *slot = None;
            return false;
        }
        let in_flight = Arc::strong_count(&c.streams) > 1;
        if c.used || in_flight {
            // A stream in flight now ends before the next pass at the
            // latest: that pass stamps it busy too, so the quiet time is
            // counted from after the stream's end, not from before it.
            c.used = in_flight;
            c.busy_at = now;
            return true;
        }
        if now.saturating_duration_since(c.busy_at) < IDLE_TIMEOUT {
            return true;
        }
        // Dropping the pool's sender closes the connection (`h2` sends
        // GOAWAY once no sender and no stream is left; none is, as
        // nothing holds its count).
        *slot = None;
        false
    }

    /// Forgets the instance's HTTP/2 connection if it is closed: the next
    /// request opens one. (Requests still on the old one finish there.) One
    /// already reopened by another request that met the same closed
    /// connection is kept, so a GOAWAY met by several requests at once
    /// opens one connection, not one each.
    fn forget_closed_h2(&self) {
        let mut slot = self.h2.lock();
        if slot.as_mut().is_some_and(|c| c.sender.is_closed()) {
            *slot = None;
        }
    }
}

/// An upstream response body. An HTTP/1.1 one reads from its connection
/// and checks it back in ([`InstancePool::push_idle`]) as soon as it ended
/// cleanly and may be reused: at its last frame, or when dropped at its end
/// (hyper may drop an empty body unpolled). An error or a drop before the
/// end closes the connection.
#[derive(Debug)]
pub(crate) struct PooledBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    H1 {
        body: H1Body,
        /// Where its connection goes back: its instance's pool in the
        /// worker slot it came from.
        to: Arc<InstancePool>,
        /// When its attempt began: the connection's idle stamp.
        began: Instant,
    },
    H2 {
        body: H2Body,
        /// The stream's place in its connection's count, held until the
        /// body is dropped (the sweep closes no connection with one held).
        _hold: StreamHold,
    },
}

impl PooledBody {
    fn h1(body: H1Body, to: &Arc<InstancePool>, began: Instant) -> Self {
        Self {
            kind: Kind::H1 {
                body,
                to: to.clone(),
                began,
            },
        }
    }

    /// Its HTTP/1.1 response head kept as lines, if it was (taken once;
    /// `raw_head`).
    pub(crate) fn take_kept_head(&mut self) -> Option<RawHeaders> {
        match &mut self.kind {
            Kind::H1 { body, .. } => body.take_kept_head(),
            Kind::H2 { .. } => None,
        }
    }

    /// Its HTTP/1.1 response head kept as lines, left in place.
    pub(crate) fn kept_head_mut(&mut self) -> Option<&mut RawHeaders> {
        match &mut self.kind {
            Kind::H1 { body, .. } => body.kept_head_mut(),
            Kind::H2 { .. } => None,
        }
    }

    /// Checks an HTTP/1.1 connection in if its body ended and it is
    /// reusable (once: the body gives it up).
    fn check_in(&mut self) {
        if let Kind::H1 { body, to, began } = &mut self.kind {
            if let Some(conn) = body.take_reusable() {
                to.push_idle(conn, *began);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::H1 { body, .. } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                if polled.is_ready() && body.is_end_stream() {
                    self.check_in();
                }
                polled.map_err(BoxError::from)
            }
            Kind::H2 { body, .. } => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::H1 { body, .. } => body.is_end_stream(),
            Kind::H2 { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::H1 { body, .. } => body.size_hint(),
            Kind::H2 { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        self.check_in();
    }
}

#[cfg(test)]
mod tests {
    use datapunk_lb_core::Registry;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioExecutor;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpStream;

    use super::*;

    /// A server on a free port that hands each connection to `serve`;
    /// returns the port and a count of the connections accepted.
    async fn server(
        serve: impl Fn(TokioIo<TcpStream>) + Send + 'static,
    ) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = accepts.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                serve(TokioIo::new(s));
            }
        });
        (port, accepts)
    }

    /// Answers `ok` after `delay`.
    async fn ok_after(
        delay: Duration,
    ) -> Result<Response<Full<bytes::Bytes>>, std::convert::Infallible> {
        tokio::time::sleep(delay).await;
        Ok(Response::new(Full::new(bytes::Bytes::from_static(b"ok"))))
    }

    /// An HTTP/1.1 server answering `ok`.
    async fn h1_server() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        server(|io| {
            let svc = hyper::service::service_fn(|_req| ok_after(Duration::ZERO));
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, svc));
        })
        .await
    }

    fn get() -> Request<UpstreamBody> {
        let mut r = Request::new(Empty::new().map_err(|n| match n {}).boxed());
        *r.uri_mut() = Uri::from_static("/");
        r.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("x"));
        r
    }

    /// Sends a GET and reads its body, so the connection can go idle.
    async fn exchange(pool: &Pool, to: &Arc<InstancePool>) {
        let resp = pool.send_h1_request(to, get()).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
    }

    async fn idle_count(to: &InstancePool, want: usize) {
        for _ in 0..200 {
            if to.idle_len() == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("idle connections: {} (want {want})", to.idle_len());
    }

    #[tokio::test]
    async fn idle_connections_are_reused_then_swept_with_departed_instances() {
        let (port, accepts) = h1_server().await;
        let registry = Registry::builder().build().unwrap();
        let inst = ServiceInstance::try_new("a", "127.0.0.1", port).unwrap();
        registry.register_instance("api", inst.clone()).unwrap();
        let pool = Pool::with_slots(Duration::from_secs(1), None, registry.service("api"), 1);
        let to = pool.instance(&inst).unwrap();
        for _ in 0..5 {
            exchange(&pool, &to).await;
            idle_count(&to, 1).await;
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 1, "one connection, reused");
        assert!(Arc::ptr_eq(&to, &pool.instance(&inst).unwrap()));

        // Another address under the same id is another pool.
        let moved = ServiceInstance::try_new("a", "127.0.0.1", port.wrapping_add(1)).unwrap();
        assert!(!Arc::ptr_eq(&to, &pool.instance(&moved).unwrap()));
        let to = pool.instance(&inst).unwrap();
        exchange(&pool, &to).await;
        idle_count(&to, 1).await;

        let now = Instant::now();
        pool.inner.prune(now);
        assert_eq!(to.idle_len(), 1, "young and a member: kept");
        pool.inner.prune(now + IDLE_TIMEOUT);
        assert_eq!(to.idle_len(), 0, "idle past the timeout: closed");
        assert_eq!(pool.inner.slots[0].instances.read().len(), 1);
        registry.deregister_instance("api", "a").unwrap();
        pool.inner.prune(now);
        assert_eq!(
            pool.inner.slots[0].instances.read().len(),
            0,
            "an instance that left the service loses its pool"
        );
    }

    #[test]
    fn the_services_idle_bound_is_split_over_the_worker_slots_rounded_up() {
        let limits = |slots, limit| {
            let pool =
                Pool::with_slots(Duration::from_secs(1), None, None, slots).with_idle_limit(limit);
            let l: Vec<usize> = pool
                .inner
                .slots
                .iter()
                .map(|s| s.idle_total.limit.load(Ordering::Relaxed))
                .collect();
            l
        };
        assert_eq!(limits(1, 2), [2]);
        assert_eq!(limits(3, 2), [1, 1, 1]);
        assert_eq!(limits(3, 300), [100, 100, 100]);
        assert_eq!(limits(2, 0), [0, 0], "0 keeps none");
    }

    #[tokio::test]
    async fn idle_connections_are_bounded_across_the_services_instances() {
        let (port, accepts) = h1_server().await;
        let pool = Pool::with_slots(Duration::from_secs(1), None, None, 1).with_idle_limit(2);
        // Three instances (three ids: three pools) on one server.
        let to: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| {
                pool.instance(&ServiceInstance::try_new(id, "127.0.0.1", port).unwrap())
                    .unwrap()
            })
            .collect();
        exchange(&pool, &to[0]).await;
        idle_count(&to[0], 1).await;
        exchange(&pool, &to[1]).await;
        idle_count(&to[1], 1).await;
        exchange(&pool, &to[2]).await;
        // The third connection ended over the bound: closed, not kept.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(to[2].idle_len(), 0, "over the service's bound");
        assert_eq!(pool.idle_total(), 2);
        // A checked-out connection frees its place while in use, and takes
        // it back when its exchange ends.
        exchange(&pool, &to[0]).await;
        idle_count(&to[0], 1).await;
        assert_eq!(pool.idle_total(), 2);
        assert_eq!(accepts.load(Ordering::SeqCst), 3, "a's connection reused");
        // Expired connections leave the count with the sweep.
        pool.inner.prune(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(pool.idle_total(), 0);
        exchange(&pool, &to[2]).await;
        idle_count(&to[2], 1).await;
        assert_eq!(pool.idle_total(), 1, "room again");
    }

    #[tokio::test]
    async fn the_sweep_drops_instance_pools_without_connections_or_holders() {
        let (port, _) = h1_server().await;
        let registry = Registry::builder().build().unwrap();
        let insts: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| ServiceInstance::try_new(id, "127.0.0.1", port).unwrap())
            .collect();
        registry
            .register_instances("api", insts.iter().cloned())
            .unwrap();
        let pool = Pool::with_slots(Duration::from_secs(1), None, registry.service("api"), 1);
        let a = pool.instance(&insts[0]).unwrap();
        exchange(&pool, &a).await;
        idle_count(&a, 1).await;
        drop(a);
        // b: used once, its connection closed after (a half-read body).
        drop(pool.instance(&insts[1]).unwrap());
        // c: held, as a request in flight holds it.
        let c = pool.instance(&insts[2]).unwrap();
        pool.inner.prune(Instant::now());
        let mut kept: Vec<String> = pool.inner.slots[0]
            .instances
            .read()
            .keys()
            .map(|id| id.as_str().to_owned())
            .collect();
        kept.sort();
        assert_eq!(kept, ["a", "c"], "b has no connection and no holder");
        drop(c);
    }

    #[tokio::test]
    async fn a_connection_is_checked_in_by_its_body_end_and_only_a_whole_body_returns_it() {
        let (port, accepts) = server(|io| {
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                // `/big`: a body much larger than one read.
                let body = if req.uri().path() == "/big" {
                    bytes::Bytes::from(vec![b'x'; 1 << 20])
                } else {
                    bytes::Bytes::from_static(b"ok")
                };
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(body)))
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(io, svc));
        })
        .await;
        let pool = Pool::with_slots(Duration::from_secs(1), None, None, 1);
        let to = pool
            .instance(&ServiceInstance::try_new("a", "127.0.0.1", port).unwrap())
            .unwrap();
        let resp = pool.send_h1_request(&to, get()).await.unwrap();
        assert_eq!(to.idle_len(), 0, "in use until its body ends");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        // No yield since the body ended: no task could have run.
        assert_eq!(to.idle_len(), 1, "checked in by the body's end");

        // A body dropped half-read: its connection is not reused.
        let mut big = get();
        *big.uri_mut() = Uri::from_static("/big");
        let resp = pool.send_h1_request(&to, big).await.unwrap();
        assert_eq!(to.idle_len(), 0);
        drop(resp);
        assert_eq!(to.idle_len(), 0, "a half-read body closes its connection");
        exchange(&pool, &to).await;
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            2,
            "a new connection after it"
        );
    }

    /// An HTTP/2 server that closes each connection (GOAWAY) after its
    /// first response.
    async fn h2_server_closing_after_one() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        server(|io| {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let done_tx = Mutex::new(Some(done_tx));
            let svc = hyper::service::service_fn(move |_req| {
                if let Some(tx) = done_tx.lock().take() {
                    let _ = tx.send(());
                }
                ok_after(Duration::ZERO)
            });
            tokio::spawn(async move {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = done_rx => {}
                }
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            });
        })
        .await
    }

    #[tokio::test]
    async fn an_http2_connection_is_shared_and_reopened_after_goaway() {
        let (port, accepts) = h2_server_closing_after_one().await;
        let pool = Pool::with_slots(Duration::from_secs(1), None, None, 1);
        let to = pool
            .instance(&ServiceInstance::try_new("a", "127.0.0.1", port).unwrap())
            .unwrap();
        let h2_get = || {
            let mut r = get();
            *r.uri_mut() = Uri::from_static("http://api.example/");
            *r.version_mut() = http::Version::HTTP_2;
            r
        };
        for i in 1..=3 {
            let resp = pool.send_h2(&to, h2_get(), || None).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok", "request {i}");
            // Let the GOAWAY arrive before the next request.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            3,
            "a new connection after each GOAWAY"
        );
        // Back to back, racing the GOAWAYs: still no failure.
        for i in 0..10 {
            let resp = pool.send_h2(&to, h2_get(), || None).await;
            assert!(resp.is_ok(), "request {i}: {resp:?}");
        }
    }

    #[tokio::test]
    async fn only_a_closed_http2_connection_is_forgotten() {
        let pool = Pool::with_slots(Duration::from_secs(1), None, None, 1);
        let to = pool
            .instance(&ServiceInstance::try_new("a", "127.0.0.1", 1).unwrap())
            .unwrap();
        // A server that closes every connection at once, and one that serves.
        let (closing, _) = server(drop).await;
        let (serving, _) = server(|io| {
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(
                    io,
                    hyper::service::service_fn(|_req| ok_after(Duration::ZERO)),
                ),
            );
        })
        .await;
        let open = |port: u16| async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            h2_upstream::handshake(UpstreamIo::Plain(tcp))
                .await
                .unwrap()
        };
        let (mut closed, _) = to.slot.keep_h2(open(closing).await);
        for _ in 0..400 {
            if closed.is_closed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(closed.is_closed(), "the server closed it");
        to.slot.forget_closed_h2();
        assert!(!keeps_h2(&to), "a closed connection is forgotten");
        // Reopened by one request; another that met the same closed
        // connection must not drop the new one.
        drop(to.slot.keep_h2(open(serving).await));
        to.slot.forget_closed_h2();
        assert!(keeps_h2(&to), "an open connection is kept");
    }

    /// An HTTP/2 GET of `path` (absolute: its authority is sent).
    fn h2_get(path: &'static str) -> Request<UpstreamBody> {
        let mut r = get();
        *r.uri_mut() = Uri::from_static(path);
        *r.version_mut() = http::Version::HTTP_2;
        r
    }

    /// Whether `to`'s slot 0 (this runtime's) keeps an HTTP/2 connection.
    fn keeps_h2(to: &InstancePool) -> bool {
        to.slot.h2.lock().is_some()
    }

    /// Waits until `count` reaches `want`.
    async fn reaches(count: &AtomicUsize, want: usize, what: &str) {
        for _ in 0..400 {
            if count.load(Ordering::SeqCst) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{what}: {} (want {want})", count.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn the_sweep_closes_an_idle_http2_connection_but_never_one_carrying_a_stream() {
        // `/slow` answers once the test adds a permit; the server counts
        // the connections that ended and the `/slow` requests it got.
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (closed, slow_got) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (port, accepts) = {
            let (release, closed, slow_got) = (release.clone(), closed.clone(), slow_got.clone());
            server(move |io| {
                let (release, closed, slow_got) =
                    (release.clone(), closed.clone(), slow_got.clone());
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (release, slow_got) = (release.clone(), slow_got.clone());
                    async move {
                        if req.uri().path() == "/slow" {
                            slow_got.fetch_add(1, Ordering::SeqCst);
                            release.acquire().await.unwrap().forget();
                        }
                        ok_after(Duration::ZERO).await
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            })
            .await
        };
        let pool = Arc::new(Pool::with_slots(Duration::from_secs(1), None, None, 1));
        let to = pool
            .instance(&ServiceInstance::try_new("a", "127.0.0.1", port).unwrap())
            .unwrap();
        let read = |resp: Response<PooledBody>| async move {
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        };

        // Idle: one exchange, then no stream and no request.
        read(
            pool.send_h2(&to, h2_get("http://api.example/"), || None)
                .await
                .unwrap(),
        )
        .await;
        let mut t = Instant::now();
        pool.inner.prune(t);
        assert!(keeps_h2(&to), "a request since the last pass: busy");
        pool.inner
            .prune(t + IDLE_TIMEOUT - Duration::from_millis(1));
        assert!(keeps_h2(&to), "quiet for less than the timeout: kept");
        t += IDLE_TIMEOUT;
        pool.inner.prune(t);
        assert!(!keeps_h2(&to), "quiet for the timeout: dropped");
        reaches(&closed, 1, "connections closed by the sweep").await;

        // A slow response in flight, and a response body not yet read
        // (a long stream), across sweeps spanning three timeouts.
        let slow = {
            let (pool, to) = (pool.clone(), to.clone());
            tokio::spawn(async move {
                pool.send_h2(&to, h2_get("http://api.example/slow"), || None)
                    .await
            })
        };
        reaches(&slow_got, 1, "/slow requests at the server").await;
        assert_eq!(accepts.load(Ordering::SeqCst), 2, "a new connection");
        for _ in 0..3 {
            t += IDLE_TIMEOUT;
            pool.inner.prune(t);
            assert!(keeps_h2(&to), "a slow response in flight: kept");
        }
        let unread = pool
            .send_h2(&to, h2_get("http://api.example/"), || None)
            .await
            .unwrap();
        release.add_permits(1);
        read(slow.await.unwrap().unwrap()).await;
        for _ in 0..3 {
            t += IDLE_TIMEOUT;
            pool.inner.prune(t);
            assert!(keeps_h2(&to), "a body in flight: kept");
        }
        assert_eq!(
            closed.load(Ordering::SeqCst),
            1,
            "not closed under a stream"
        );
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            2,
            "one connection throughout"
        );

        // Its last stream ended: closed a timeout after the pass that last
        // saw it busy.
        read(unread).await;
        t += IDLE_TIMEOUT;
        pool.inner.prune(t);
        assert!(keeps_h2(&to), "busy at the previous pass");
        t += IDLE_TIMEOUT;
        pool.inner.prune(t);
        assert!(!keeps_h2(&to), "quiet since: dropped");
        reaches(&closed, 2, "connections closed by the sweep").await;
        read(
            pool.send_h2(&to, h2_get("http://api.example/"), || None)
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            3,
            "the next request reopens"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_beyond_the_servers_stream_limit_wait_on_the_one_connection() {
        let (port, accepts) = server(|io| {
            let svc = hyper::service::service_fn(|_req| ok_after(Duration::from_millis(100)));
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(1)
                    .serve_connection(io, svc),
            );
        })
        .await;
        let pool = Arc::new(Pool::with_slots(Duration::from_secs(1), None, None, 1));
        let to = pool
            .instance(&ServiceInstance::try_new("a", "127.0.0.1", port).unwrap())
            .unwrap();
        let one = || {
            let (pool, to) = (pool.clone(), to.clone());
            tokio::spawn(async move {
                let mut r = get();
                *r.uri_mut() = Uri::from_static("http://api.example/");
                *r.version_mut() = http::Version::HTTP_2;
                let resp = pool.send_h2(&to, r, || None).await.unwrap();
                resp.into_body().collect().await.unwrap().to_bytes()
            })
        };
        let started = Instant::now();
        let all = [one(), one(), one()];
        for t in all {
            assert_eq!(&t.await.unwrap()[..], b"ok");
        }
        assert_eq!(accepts.load(Ordering::SeqCst), 1, "one connection");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "one stream at a time: {:?}",
            started.elapsed()
        );
    }

    /// Runs `f` on each of `workers`, `times` times in a row each, with
    /// `inst`'s pool as the worker finds it.
    fn on_each_worker<F, Fut>(
        rt: &tokio::runtime::Runtime,
        workers: &crate::workers::Workers,
        pool: &Arc<Pool>,
        inst: &ServiceInstance,
        times: usize,
        f: F,
    ) where
        F: Fn(Arc<Pool>, Arc<InstancePool>) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        for handle in workers.handles() {
            for _ in 0..times {
                let (pool, inst, f) = (pool.clone(), inst.clone(), f.clone());
                let task = handle.spawn(async move {
                    let to = pool.instance(&inst).unwrap();
                    f(pool, to).await;
                });
                rt.block_on(task).unwrap();
            }
        }
    }

    #[test]
    fn each_worker_opens_reuses_and_returns_its_own_connections() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (port, accepts) = rt.block_on(h1_server());
        let workers = crate::workers::Workers::start(2).unwrap();
        // Slot 0 for other threads, one per worker.
        let pool = Arc::new(Pool::with_slots(Duration::from_secs(1), None, None, 3));
        let inst = ServiceInstance::try_new("a", "127.0.0.1", port).unwrap();
        on_each_worker(&rt, &workers, &pool, &inst, 3, |pool, to| async move {
            exchange(&pool, &to).await;
            for _ in 0..200 {
                if to.idle_len() == 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("the connection did not return to its worker's pool");
        });
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            2,
            "one connection per worker, reused by its next requests"
        );
        let idle: Vec<usize> = pool
            .inner
            .slots
            .iter()
            .map(|s| s.instances.read().get("a").map_or(0, |p| p.idle_len()))
            .collect();
        assert_eq!(idle, [0, 1, 1], "worker i's connection in slot i + 1");
        let p = pool.inner.slots[1].instances.read()["a"].clone();
        assert!(p.idle_cap * 3 <= MAX_IDLE_PER_INSTANCE);
        assert!(
            !Arc::ptr_eq(&p, &pool.inner.slots[2].instances.read()["a"]),
            "each worker has its own pool of the instance"
        );

        // HTTP/2: one connection per worker, shared by its requests.
        let (port, accepts) = rt.block_on(server(|io| {
            let svc = hyper::service::service_fn(|_req| ok_after(Duration::ZERO));
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc),
            );
        }));
        let inst = ServiceInstance::try_new("b", "127.0.0.1", port).unwrap();
        on_each_worker(&rt, &workers, &pool, &inst, 3, |pool, to| async move {
            let mut r = get();
            *r.uri_mut() = Uri::from_static("http://api.example/");
            *r.version_mut() = http::Version::HTTP_2;
            let resp = pool.send_h2(&to, r, || None).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
        });
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            2,
            "one HTTP/2 connection per worker"
        );
    }

    #[tokio::test]
    async fn a_connect_failure_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let pool = Pool::with_slots(Duration::from_secs(1), None, None, 1);
        let to = pool
            .instance(&ServiceInstance::try_new("a", "127.0.0.1", port).unwrap())
            .unwrap();
        for (sent, handed_back) in [
            // HTTP/1.1 borrows the head: nothing to hand back.
            (pool.send_h1_request(&to, get()).await, false),
            (pool.send_h2(&to, get(), || None).await, true),
        ] {
            let Err(failed) = sent else {
                panic!("nothing listens")
            };
            assert!(matches!(failed.error, SendError::Connect(_)));
            assert_eq!(failed.unsent.is_some(), handed_back);
            if let Some(back) = failed.unsent {
                assert_eq!(back.uri(), "/", "the same request");
            }
        }
    }
}
