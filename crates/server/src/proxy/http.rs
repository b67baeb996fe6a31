//! HTTP listeners: HTTP/1.1 and HTTP/2 (h2c with prior knowledge) on one
//! port, proxied over pooled keep-alive upstream connections
//! ([`pool`](super::pool)).
//!
//! ## Per connection
//!
//! The protocol is read from the first bytes: the HTTP/2 preface (h2c by
//! prior knowledge; over TLS the client sends it after ALPN `h2` too) →
//! hyper's HTTP/2 server, its streams run in the connection's task
//! ([`stream_tasks`](super::stream_tasks)); anything else → HTTP/1.1,
//! whose common request (a plain HTTP/1.1 request with a body of at most
//! 64 KiB and no upgrade, `Expect`, `Transfer-Encoding` or `TE`) our own
//! loop serves ([`h1_server`](super::h1_server): no hyper dispatcher, no
//! stream executor); the first request that is not hands the connection,
//! with the bytes read so far, to hyper's HTTP/1.1 server for the rest of
//! its life, so upgrades, `100-continue`, chunked uploads and every parse
//! error keep hyper's answers. The bytes read before the choice are put
//! back in front of the socket for whoever serves it.
//!
//! The listener's [client limits](super::client_limits): at most
//! `max_connections` open (above it closed at once), a started request head
//! complete within `header_read_timeout`, no request for `idle_timeout`
//! closes it, a request body pausing longer than `request_body_timeout`
//! ends it. A drain, and the idle close, ask the connection to finish
//! ([`Shutdown`]): an idle one closes at once (HTTP/2: GOAWAY), one
//! mid-request after its response.
//!
//! ## Per request
//!
//! 0. [Hygiene](super::hygiene): no `Host` on HTTP/1.1 or two of them →
//!    400, never forwarded; the target's authority (absolute form, HTTP/2
//!    `:authority`) replaces a different `Host`.
//! 1. Route by host and path prefix (first match wins); none → 404.
//! 2. Read the body: up to 64 KiB with a known length (or HTTP/1.1 chunked
//!    that ends within 64 KiB) is buffered and so replayable; a larger or
//!    streaming body is sent once. Hop-by-hop headers are dropped, the
//!    forwarding headers set ([`headers`](super::headers): replaced, or
//!    appended to from a trusted proxy) and `X-Request-Id` kept or made
//!    ([`request_id`](super::request_id)); the id also goes back on the
//!    response, the proxy's own errors included.
//! 3. Run the [attempt loop](super::attempt), whose [step](super::upstream)
//!    here sends the request over the instance's pooled connection in the
//!    service's `upstream_protocol` (`http1` by default, whatever the client
//!    spoke; `h2c`; `auto`: the client's version; response trailers pass
//!    through), with the client's Host / `:authority` unless `host_header =
//!    "instance"`, and awaits the response headers before `request_timeout`,
//!    one deadline over all attempts (and `per_try_timeout` per attempt
//!    when set). A gRPC request to an `http1` service
//!    is answered at once with `grpc-status: 14` instead (no instance). The
//!    loop answers: no instance → 503; every instance at `max_connections`
//!    → 503; a status below 500 → forwarded, the success recorded when the
//!    response body ends (the claim rides in the body, so the connection
//!    count covers streaming; the latency is the time to the headers); a
//!    5xx → forwarded as it is unless retried; the deadline → 504; no
//!    instance reached → 502.
//!
//! An HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade`, e.g. a
//! WebSocket handshake) takes the same path up to the headers, then goes
//! to [`upgrade`], which keeps the upgrade pair, runs the same attempt loop
//! and joins client and instance after a 101.
//!
//! ## Retries (the rule of [`attempt`])
//!
//! A connect error is retried when the body is replayable; an idempotent
//! request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) with a replayable body is
//! also retried on a reset, a timed-out try (`per_try_timeout`) or a
//! 502/503/504. Never after the deadline. Each
//! retry goes to an instance this request has not tried, at most `retries`
//! times, and only while the service's [`RetryBudget`](super::RetryBudget)
//! allows. When no retry can follow, the only attempt takes the request
//! head instead of cloning it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::debug;

use super::accept::{self, ConnPermit, ConnTracker};
use super::access_log::{Counted, Entry};
use super::attempt::{self, Ended, Held, Replay};
use super::body::Watched;
use super::client_limits::{
    ClientLimits, ConnWatch, Expiry, InFlight, StallTimeout, WatchedSocket,
};
use super::h1_server::{self, BufferedBody, Prefixed, Served, Shutdown};
use super::headers::{strip_hop_by_hop, Forwarding, Peer, ProxyHeaders};
use super::hygiene;
use super::pool::PooledBody;
use super::raw_head::KeptHead;
use super::request_body::read_body;
use super::request_id::{request_id, X_REQUEST_ID};
use super::spare_maps;
use super::stream_tasks::{StreamTasks, WithStreams};
use super::tls::{ClientIdentity, ClientStream, TlsListener};
use super::upgrade;
use super::upstream::HttpStep;
use super::{BoxError, ProxyError, Routing, Upstream};

/// Largest request head accepted (HTTP/1.1); larger gets 431.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Most header lines in a request head (HTTP/1.1); more gets 431. hyper
/// parses up to 100 into arrays on the stack and any larger limit into two
/// heap arrays per request (two allocations of every request), so the
/// limit is 100 (HAProxy's default is 101; it was 128 before issue 12).
pub(crate) const MAX_HEADERS: usize = 100;

/// A client's request body: streamed through hyper, bounded by
/// `request_body_timeout`, or read whole by our HTTP/1.1 loop
/// ([`h1_server`]).
pub(crate) enum ClientBody {
    /// From hyper (HTTP/2, and HTTP/1.1 requests handed to it).
    Streamed(StallTimeout<Incoming>),
    /// Read by the fast path.
    Buffered(BufferedBody),
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Streamed(b) => std::pin::Pin::new(b).poll_frame(cx),
            ClientBody::Buffered(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Streamed(b) => b.is_end_stream(),
            ClientBody::Buffered(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ClientBody::Streamed(b) => b.size_hint(),
            ClientBody::Buffered(b) => b.size_hint(),
        }
    }
}

/// The body of a response the proxy makes itself (errors, refusals, an
/// upgrade's 101, the access log's wrapper): boxed, off the fast path.
pub(crate) type ProxyBody = BoxBody<Bytes, BoxError>;

/// An instance's answer as the client gets it: its body cut after a pause
/// of `response_idle_timeout`, watched to its end by the attempt's claim (a
/// success), its pooled connection checked in at its end.
pub(crate) type AnswerBody<B> = Watched<StallTimeout<B>, Option<Held>>;

/// The body of every response of an HTTP listener: one concrete type, so
/// the common case, an instance's answer, is neither boxed nor wrapped
/// again.
pub(crate) enum ResponseBody {
    /// An instance's answer.
    Answer(AnswerBody<PooledBody>),
    /// Anything else.
    Other(ProxyBody),
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Answer(b) => std::pin::Pin::new(b).poll_frame(cx),
            ResponseBody::Other(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Answer(b) => b.is_end_stream(),
            ResponseBody::Other(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ResponseBody::Answer(b) => b.size_hint(),
            ResponseBody::Other(b) => b.size_hint(),
        }
    }
}

/// What an HTTP listener needs.
#[derive(Debug)]
pub(crate) struct HttpContext {
    /// Listener name (routes are looked up under it).
    pub(crate) listener: Arc<str>,
    /// Current routing; swapped on reload.
    pub(crate) routing: Arc<ArcSwap<Routing>>,
    /// Client-side timeouts and the connection limit.
    pub(crate) limits: ClientLimits,
    /// `https`: the TLS termination.
    pub(crate) tls: Option<Arc<TlsListener>>,
}

/// Accepts connections until `stop` turns true. Each connection holds a
/// permit of `tracker` so a drain can wait for them, and shuts down
/// gracefully (finishing in-flight requests) when the drain begins. The
/// listener's [client limits](super::client_limits) are enforced here: the
/// connection limit by the accept loop, the head and idle timeouts by a
/// watchdog beside each connection, the body timeout around each request
/// body.
pub(crate) async fn serve(
    listener: TcpListener,
    ctx: Arc<HttpContext>,
    stop: watch::Receiver<bool>,
    tracker: ConnTracker,
    accept_errors: Counter,
) {
    let name = ctx.listener.clone();
    let limits = ctx.limits;
    let draining = tracker.draining();
    let on_accept = |stream: TcpStream, peer: SocketAddr, permit: ConnPermit| {
        let tls = ctx.tls.clone();
        let watch = ConnWatch::new(tokio::time::Instant::now());
        let conn = Arc::new(ClientConn {
            ctx: ctx.clone(),
            // Its X-Forwarded-For value made once for all its requests.
            client: Peer::new(peer),
            // Shared with upgrade tunnels, which outlive the connection task.
            permit: Arc::new(permit),
            identity: std::sync::OnceLock::new(),
            watch: watch.clone(),
            shutdown: Shutdown::default(),
        });
        let mut draining = draining.clone();
        // Read (never marked seen) to tell whether the drain can have begun.
        let drain_moved = draining.clone();
        tokio::spawn(async move {
            // The handshake runs here, off the accept loop, bounded like a head.
            let stream = match tls {
                None => ClientStream::Plain(stream),
                Some(t) => match t.accept(stream, limits.header_read_timeout).await {
                    Ok(s) => {
                        // The verified client certificate's name, set
                        // before any request, for the access log.
                        if let Some(id) = ClientIdentity::of(&s) {
                            let _ = conn.identity.set(id);
                        }
                        ClientStream::Tls(Box::new(s))
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "tls handshake failed");
                        return;
                    }
                },
            };
            let io = WatchedSocket::new(stream, watch.clone());
            let serving = serve_connection(io, conn.clone());
            tokio::pin!(serving);
            let sleep = tokio::time::sleep(limits.idle_timeout);
            tokio::pin!(sleep);
            let mut mode = Watchdog::Serving;
            // Made once: polled in every wake-up of the connection, not
            // rebuilt per turn of the loop.
            let drain = async {
                let _ = draining.wait_for(|d| *d).await;
            };
            tokio::pin!(drain);
            let result = loop {
                let next = match mode {
                    Watchdog::Serving => {
                        Some(watch.next_check(&limits, tokio::time::Instant::now()))
                    }
                    Watchdog::IdleClosing(at) => Some(at),
                    Watchdog::Draining => None,
                };
                if let Some(at) = next {
                    sleep.as_mut().reset(at);
                }
                // Each polled once to register, then only when it can be
                // ready: the drain when its watch moved, the timer when it
                // elapsed. The connection's own task is woken either way; a
                // `select!` polled both on every wake-up (the watch's
                // `Notify` lock and the timer's state per request).
                let mut registered = false;
                let event = std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = serving.as_mut().poll(cx) {
                        return Poll::Ready(ConnEvent::Served(r));
                    }
                    if mode != Watchdog::Draining
                        && (!registered || drain_moved.has_changed().unwrap_or(true))
                        && drain.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(ConnEvent::Drain);
                    }
                    if next.is_some()
                        && (!registered || sleep.is_elapsed())
                        && sleep.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(ConnEvent::Due);
                    }
                    registered = true;
                    Poll::Pending
                })
                .await;
                match event {
                    ConnEvent::Served(r) => break r,
                    ConnEvent::Drain => {
                        conn.shutdown.request();
                        mode = Watchdog::Draining;
                    }
                    ConnEvent::Due => match mode {
                        // The state may have moved on without a wake-up (a
                        // request began): act only on a deadline still due.
                        Watchdog::Serving => match watch.expired(&limits) {
                            Some(Expiry::Head) => {
                                debug!(%peer, "request head not received in time: connection closed");
                                break Ok(());
                            }
                            Some(Expiry::Idle) => {
                                conn.shutdown.request();
                                let grace = tokio::time::Instant::now() + IDLE_CLOSE_GRACE;
                                mode = Watchdog::IdleClosing(grace);
                            }
                            None => {}
                        },
                        // HTTP/2 waits for the client's PING ack after
                        // GOAWAY; a client that never sends it is cut, unless
                        // a request raced the GOAWAY in.
                        Watchdog::IdleClosing(_) if watch.idle() => break Ok(()),
                        _ => mode = Watchdog::Draining,
                    },
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "client connection ended with an error");
            }
        });
    };
    let limit = accept::Limit::new(limits.max_connections);
    accept::serve(
        listener,
        &name,
        stop,
        tracker,
        limit,
        accept_errors,
        on_accept,
    )
    .await;
}

/// One client connection's facts, shared by its requests.
struct ClientConn {
    ctx: Arc<HttpContext>,
    client: Peer,
    /// The drain permit, shared with its upgrade tunnels.
    permit: Arc<ConnPermit>,
    /// The verified client certificate's name (TLS), for the access log.
    identity: std::sync::OnceLock<ClientIdentity>,
    watch: Arc<ConnWatch>,
    /// Drain or idle close asked by the watchdog.
    shutdown: Shutdown,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one client connection: HTTP/2 when it starts with the preface
/// (h2c by prior knowledge, or `h2` by ALPN: the client sends the preface
/// either way), else HTTP/1.1, the common request on our own loop
/// ([`h1_server`]) and the rest of the connection on hyper's HTTP/1.1
/// server from the first request that is not. Only HTTP/2 connections run
/// under [`WithStreams`] (HTTP/1.1 has no streams to run).
async fn serve_connection(
    mut io: WatchedSocket<ClientStream>,
    conn: Arc<ClientConn>,
) -> Result<(), BoxError> {
    let mut buf = BytesMut::with_capacity(READ_BUF_SIZE);
    // Read until the bytes differ from the preface or hold all of it.
    let h2 = loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            break false;
        }
        if n == H2_PREFACE.len() {
            break true;
        }
        let read = tokio::select! {
            r = io.read_buf(&mut buf) => r?,
            // Nothing sent yet: a drain or idle close ends it.
            () = conn.shutdown.wait() => return Ok(()),
        };
        if read == 0 {
            return Ok(());
        }
    };
    if h2 {
        let io = TokioIo::new(Prefixed::new(buf.freeze(), io));
        let tasks = StreamTasks::default();
        let svc = hyper_service(&conn);
        let mut builder = http2::Builder::new(tasks.clone());
        builder.max_concurrent_streams(1024);
        let served = WithStreams::new(builder.serve_connection(io, svc), tasks);
        tokio::pin!(served);
        tokio::select! {
            r = &mut served => return r.map_err(Into::into),
            () = conn.shutdown.wait() => {}
        }
        if let Some(c) = served.conn() {
            c.graceful_shutdown();
        }
        return served.await.map_err(Into::into);
    }
    let limits = conn.ctx.limits;
    let c = &*conn;
    let served = h1_server::serve(
        &mut io,
        &mut buf,
        &conn.watch,
        &conn.shutdown,
        limits.request_body_timeout,
        // `handle`'s own future, not one around it: the response is not
        // moved through another layer (the loop holds the request in
        // flight until the response is written).
        |req| {
            let mut req = req.map(ClientBody::Buffered);
            if let Some(id) = c.identity.get() {
                req.extensions_mut().insert(id.clone());
            }
            handle(req, &c.ctx, &c.client)
        },
    )
    .await?;
    if let Served::Closed = served {
        return Ok(());
    }
    // Not ours: hyper serves the rest, starting with the bytes we read.
    let io = TokioIo::new(Prefixed::new(buf.freeze(), io));
    let served = http1_builder()
        .serve_connection(io, hyper_service(&conn))
        .with_upgrades();
    tokio::pin!(served);
    if !conn.shutdown.requested() {
        tokio::select! {
            r = &mut served => return r.map_err(Into::into),
            () = conn.shutdown.wait() => {}
        }
    }
    served.as_mut().graceful_shutdown();
    served.await.map_err(Into::into)
}

/// The first read of a connection (the sniff, then the fast path's buffer).
const READ_BUF_SIZE: usize = 8 * 1024;

/// hyper's service for `conn`: each request to [`handle`].
fn hyper_service(
    conn: &Arc<ClientConn>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<InFlight<ResponseBody>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<InFlight<ResponseBody>>, Infallible>> + Send,
> + Clone {
    let conn = conn.clone();
    hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let conn = conn.clone();
        upgrade::attach_permit(&mut req, &conn.permit);
        if let Some(id) = conn.identity.get() {
            req.extensions_mut().insert(id.clone());
        }
        // In flight from the parsed head until the response body is sent.
        let guard = conn.watch.request_started();
        // Not boxed, though the future is a few KB and HTTP/2 moves it
        // a few times (into hyper's stream future, into the connection's
        // stream set): boxed, HTTP/2 cost 3 % less CPU per request and
        // HTTP/1.1 3 % more (an allocation per request where hyper's
        // dispatcher keeps the future in a buffer of its own). Before
        // streams ran in their connection's task (`stream_tasks`), tokio
        // copied it on spawn and at each stage change too, and the box
        // paid ("Fourth pass" in docs/benchmarks.md).
        // `handle` awaited here, not through a function around it: the
        // nested future made this one larger, and HTTP/2 copies it (+0.8 %
        // of the h2c bench's CPU in `memcpy`).
        async move {
            let body_timeout = conn.ctx.limits.request_body_timeout;
            let req = req
                .map(|b| ClientBody::Streamed(StallTimeout::new(b, body_timeout, "request body")));
            let resp = handle(req, &conn.ctx, &conn.client).await;
            // The guard rides in the body and drops with it.
            Ok::<_, Infallible>(resp.map(|b| InFlight::new(b, guard)))
        }
    })
}

/// hyper's HTTP/1.1 server, for the connections our loop hands over.
fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true)
        // One buffer per response (head and body copied into it, one
        // `write`), not a `writev` of the head and each body chunk: hyper's
        // queue of buffers cost more than copying a small body, and a
        // large one is copied by the kernel anyway ("Third pass" in
        // docs/benchmarks.md).
        .writev(false);
    builder
}

/// How long an idle connection told to close (HTTP/2: GOAWAY) may take to
/// finish the exchange before it is cut.
const IDLE_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// What a connection's watchdog is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watchdog {
    /// Enforcing the head and idle deadlines.
    Serving,
    /// Idle and told to close; cut at this instant if still idle.
    IdleClosing(tokio::time::Instant),
    /// Draining (or a request raced the idle close): hyper finishes what is
    /// in flight; the drain timeout bounds it.
    Draining,
}

/// What woke a client connection's task to act.
enum ConnEvent<R> {
    /// Its serving future ended.
    Served(R),
    /// The drain began.
    Drain,
    /// The watchdog's timer is due.
    Due,
}

/// A short plain-text response.
pub(crate) fn text(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    text(e.status(), &e.to_string())
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Serves one request.
#[allow(clippy::manual_async_fn)] // not an `async fn`: see inside
pub(crate) fn handle<'a>(
    mut req: Request<ClientBody>,
    ctx: &'a HttpContext,
    peer: &'a Peer,
) -> impl Future<Output = Response<ResponseBody>> + 'a {
    // An `async` block, not an `async fn`: an `async fn` keeps each
    // argument twice in its future (as given, and moved into a local),
    // and the request's future is moved whole a few times per request.
    async move {
        let id = request_id(req.headers());
        if let Err(why) = hygiene::check(&mut req) {
            let mut resp = text(StatusCode::BAD_REQUEST, &why.to_string());
            resp.headers_mut().insert(X_REQUEST_ID, id);
            return resp.map(ResponseBody::Other);
        }
        // Route with borrowed host and path: no allocation per request.
        let (up, rules) = {
            let routing = ctx.routing.load();
            let rules = routing
                .http_listener(&ctx.listener)
                .cloned()
                .unwrap_or_default();
            let host = req.uri().host().or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            });
            let up = routing
                .route(&ctx.listener, host, req.uri().path())
                .cloned();
            (up, rules)
        };
        // The request's one clock read before its first attempt: the access
        // log's start, the deadline's base and, when no body has to be awaited,
        // the first attempt's start (one read instead of three).
        let received = std::time::Instant::now();
        // Only with the access log on: the request's facts.
        let mut entry = rules.access_log.as_ref().map(|log| {
            let service = up.as_ref().map(|u| u.name.as_str());
            log.entry(&req, peer.addr, &ctx.listener, service, &id, received)
        });
        let mut resp = match up {
            None => error_response(&ProxyError::NoRoute).map(ResponseBody::Other),
            Some(up) => match proxy(
                req,
                &up,
                peer,
                (&rules.forwarding, ctx.tls.is_some()),
                &id,
                received,
                entry.as_mut(),
            )
            .await
            {
                Ok(resp) => resp,
                Err(e) => {
                    debug!(
                        service = up.name.as_str(),
                        outcome = e.outcome(),
                        "request failed"
                    );
                    error_response(&e).map(ResponseBody::Other)
                }
            },
        };
        // A head kept as lines carries the id (`raw_head`); else the map.
        match resp.body_mut().kept_head_mut() {
            Some(raw) => raw.set_request_id(id),
            None => {
                resp.headers_mut().insert(X_REQUEST_ID, id);
            }
        }
        match entry {
            Some(e) => {
                // Boxed below, where `h1_server`'s writer cannot reach a
                // head kept as lines: into the map they go, id and all. A
                // kept head's map is empty with no room: a spare instead.
                if let Some(raw) = resp.body_mut().take_kept_head() {
                    let map = resp.headers_mut();
                    if map.capacity() == 0 {
                        *map = spare_maps::take(0);
                    }
                    raw.into_map(map);
                }
                e.respond(resp).map(ResponseBody::Other)
            }
            None => resp,
        }
    }
}

#[allow(clippy::manual_async_fn)] // see `handle`
fn proxy<'a>(
    req: Request<ClientBody>,
    up: &'a Upstream,
    peer: &'a Peer,
    // The rules, and whether the client came over TLS (`X-Forwarded-Proto`).
    (forwarding, https): (&'a Forwarding, bool),
    id: &'a HeaderValue,
    // When the request was received (see `handle`).
    received: std::time::Instant,
    mut entry: Option<&'a mut Entry>,
) -> impl Future<Output = Result<Response<ResponseBody>, ProxyError>> + 'a {
    // An `async` block for the reason given at `handle`.
    async move {
        let deadline = tokio::time::Instant::from_std(received) + up.request_timeout;
        let (mut parts, body) = req.into_parts();
        if let Some(resp) = up.clients.refuse_grpc(&parts, &up.name) {
            return Ok(resp.map(ResponseBody::Other));
        }
        let upgrade = upgrade::requested(&parts);
        // `h1_server`'s fast path: its writer takes a head kept as lines.
        let raw_response = matches!(body, ClientBody::Buffered(_));
        let (mut body, waited) = match read_body(&parts, body).await {
            Ok(read) => (read.body, read.waited),
            Err(resp) => return Ok(resp.map(ResponseBody::Other)),
        };
        if let Some(e) = entry.as_deref_mut() {
            e.count_request_body(&mut body);
        }
        let replay = Replay {
            idempotent: is_idempotent(&parts.method),
            replayable: body.replayable(),
        };
        let key = up
            .hash_key
            .as_ref()
            .and_then(|k| k.digest(&parts, peer.addr));
        strip_hop_by_hop(&mut parts.headers);
        // After the strip: a client cannot name these in `Connection`.
        let added = ProxyHeaders::new(
            &parts.headers,
            peer,
            if https { "https" } else { "http" },
            parts.uri.authority(),
            forwarding,
            Some(id),
        );
        // Set in the map now when no attempt encodes an HTTP/1.1 head (an
        // upgrade, HTTP/2 out): moved in, not copied at an attempt.
        let added = if upgrade.is_some() || up.clients.always_http2(parts.version) {
            added.set_in(&mut parts.headers);
            None
        } else {
            Some(added)
        };
        if let Some(protocol) = upgrade {
            let key = key.as_ref().map(|k| &k[..]);
            // Boxed: the tunnel's state stays out of every request's future.
            return Box::pin(upgrade::proxy(
                parts, body, replay, protocol, deadline, up, key,
            ))
            .await
            .map(|resp| resp.map(ResponseBody::Other));
        }
        let mut step = HttpStep {
            parts,
            body,
            replay,
            headers_gone: false,
            host_before: None,
            deadline,
            // The body's upload is the client's time, not the instance's.
            first_attempt_at: (!waited).then_some(received),
            attempt_at: received,
            per_try_timeout: up.per_try_timeout,
            // Set at each attempt: in the HTTP/1.1 head as it is encoded,
            // in an HTTP/2 attempt's map.
            added: added.as_ref(),
            clients: &up.clients,
            service: &up.name,
            raw_response,
        };
        let key = key.as_ref().map(|k| &k[..]);
        let ended = match entry {
            Some(e) => {
                let mut counted = Counted::new(&mut step);
                let ended = attempt::run(up, &mut counted, key).await;
                e.attempts(&counted);
                ended
            }
            None => attempt::run(up, &mut step, key).await,
        };
        // Its head's map is done with: the next response head parsed on
        // this thread takes it (`spare_maps`).
        spare_maps::give_back(std::mem::take(&mut step.parts.headers));
        let (held, resp) = match ended? {
            Ended::Success(held, resp) => (Some(held), resp),
            Ended::Failed(resp) => (None, resp),
        };
        Ok(answer(resp, held, up).map(ResponseBody::Answer))
    }
}

/// The response for the client; `held` (a success) rides in the body until
/// it ends. Boxed: the upgrade path's (its answer when no 101 came).
pub(crate) fn finish_response<B>(
    resp: Response<B>,
    held: Option<Held>,
    up: &Upstream,
) -> Response<ProxyBody>
where
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    answer(resp, held, up).map(BodyExt::boxed)
}

/// An instance's answer for the client: hop-by-hop headers stripped, the
/// body bounded by `response_idle_timeout` (a body that stops flowing is
/// cut, and the claim charges a Reset) and carrying `held` to its end.
fn answer<B>(resp: Response<B>, held: Option<Held>, up: &Upstream) -> Response<AnswerBody<B>>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body = StallTimeout::new(body, up.response_idle_timeout, "response body");
    Response::from_parts(parts, Watched::new(body, held))
}
