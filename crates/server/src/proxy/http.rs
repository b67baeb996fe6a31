//! HTTP listeners: HTTP/1.1 and HTTP/2 (h2c with prior knowledge) on one
//! port, proxied over pooled keep-alive upstream connections.
//!
//! ## Per request
//!
//! 1. Route by host and path prefix (first match wins); none → 404.
//! 2. Read the body: up to 64 KiB with a known length (or HTTP/1.1 chunked
//!    that ends within 64 KiB) is buffered and so replayable; a larger or
//!    streaming body is sent once. Hop-by-hop headers are dropped,
//!    `x-forwarded-for` is appended.
//! 3. Run the [attempt loop](super::attempt), whose step here sends the
//!    request with the inbound HTTP version (HTTP/2 and gRPC as h2c,
//!    HTTP/1.1 as HTTP/1.1; trailers pass through) and awaits the response
//!    headers before `request_timeout`, one deadline over all attempts. The
//!    loop answers: no instance → 503; every instance at `max_connections`
//!    → 503; a status below 500 → forwarded, the success recorded when the
//!    response body ends (the claim rides in the body, so the connection
//!    count covers streaming; the latency is the time to the headers); a
//!    5xx → forwarded as it is unless retried; the deadline → 504; no
//!    instance reached → 502.
//!
//! ## Retries (the rule of [`attempt`])
//!
//! A connect error is retried when the body is replayable; an idempotent
//! request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) with a replayable body is
//! also retried on a reset or a 502/503/504. Never after the deadline. Each
//! retry goes to an instance this request has not tried, at most `retries`
//! times, and only while the service's [`RetryBudget`](super::RetryBudget)
//! allows. When no retry can follow, the only attempt takes the request
//! head instead of cloning it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use datapunk_lb_core::ServiceInstance;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::debug;

use super::accept;
use super::attempt::{self, Attempt, Class, Ended, Held, NoAnswer, Replay, Step};
use super::body::TrackedBody;
use super::{BoxError, ProxyError, Routing, Upstream};

/// Largest request body buffered for retries.
pub(crate) const MAX_REPLAY_BODY: usize = 64 * 1024;
/// Largest request head accepted (HTTP/1.1); larger gets 431.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The body type the proxy answers with.
pub(crate) type ProxyBody = BoxBody<Bytes, BoxError>;
type UpstreamBody = BoxBody<Bytes, BoxError>;

/// Tracks open client connections for a drain: each holds a permit, and
/// the drain flag asks them to finish.
#[derive(Debug, Clone)]
pub(crate) struct ConnTracker {
    permits: Arc<tokio::sync::Semaphore>,
    drain: watch::Sender<bool>,
}

/// Connections tracked at most (a drain acquires all permits).
const MAX_TRACKED: u32 = 1 << 20;

impl Default for ConnTracker {
    fn default() -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(MAX_TRACKED as usize)),
            drain: watch::channel(false).0,
        }
    }
}

impl ConnTracker {
    /// Registers a connection; `None` once draining.
    pub(crate) fn enter(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if *self.drain.borrow() {
            return None;
        }
        self.permits.clone().try_acquire_owned().ok()
    }

    /// A receiver that turns true when the drain begins.
    pub(crate) fn draining(&self) -> watch::Receiver<bool> {
        self.drain.subscribe()
    }

    /// Starts the drain and waits until every tracked connection closed.
    pub(crate) async fn drain(&self) {
        let _ = self.drain.send(true);
        let _ = self.permits.acquire_many(MAX_TRACKED).await;
    }
}

/// Pooled upstream clients of one service.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamClients {
    h1: Client<HttpConnector, UpstreamBody>,
    h2: Client<HttpConnector, UpstreamBody>,
}

impl UpstreamClients {
    /// Clients with `connect_timeout`, TCP_NODELAY and keep-alive pools.
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(connect_timeout));
        conn.set_keepalive(Some(Duration::from_secs(60)));
        let h1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .build(conn.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(conn);
        Self { h1, h2 }
    }
}

/// What an HTTP listener needs.
#[derive(Debug)]
pub(crate) struct HttpContext {
    /// Listener name (routes are looked up under it).
    pub(crate) listener: Arc<str>,
    /// Current routing; swapped on reload.
    pub(crate) routing: Arc<ArcSwap<Routing>>,
}

/// Accepts connections until `stop` turns true. Each connection holds a
/// permit of `tracker` so a drain can wait for them, and shuts down
/// gracefully (finishing in-flight requests) when the drain begins.
pub(crate) async fn serve(
    listener: TcpListener,
    ctx: Arc<HttpContext>,
    stop: watch::Receiver<bool>,
    tracker: ConnTracker,
    accept_errors: Counter,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(128)
        .keep_alive(true);
    builder.http2().max_concurrent_streams(1024);
    let builder = Arc::new(builder);
    let name = ctx.listener.clone();
    let draining = tracker.draining();
    let on_accept = |stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit| {
        let ctx = ctx.clone();
        let svc = hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(handle(req, &ctx, peer).await) }
        });
        let builder = builder.clone();
        let mut draining = draining.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { let _ = draining.wait_for(|d| *d).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(error = %e, "client connection ended with an error");
            }
        });
    };
    accept::serve(listener, &name, stop, tracker, accept_errors, on_accept).await;
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

/// The request body: replayable bytes, or the stream (sent once).
enum ReqBody {
    Replayable(Bytes),
    Stream(Option<UpstreamBody>),
}

impl ReqBody {
    fn take(&mut self) -> Option<UpstreamBody> {
        match self {
            ReqBody::Replayable(b) if b.is_empty() => {
                Some(Empty::new().map_err(|never| match never {}).boxed())
            }
            ReqBody::Replayable(b) => {
                Some(Full::new(b.clone()).map_err(|never| match never {}).boxed())
            }
            ReqBody::Stream(s) => s.take(),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, ReqBody::Replayable(_))
    }
}

/// Reads the request body for replay when it is small: bodies with a known
/// length up to [`MAX_REPLAY_BODY`], and HTTP/1.1 chunked bodies whose first
/// [`MAX_REPLAY_BODY`] bytes end the body. A malformed body (bad chunk
/// framing) is answered with 400 here, before any upstream sees it. HTTP/2
/// bodies without a length are streamed untouched: a gRPC stream may wait for
/// the response before sending more.
async fn read_body(
    parts: &http::request::Parts,
    mut body: Incoming,
) -> Result<ReqBody, Response<ProxyBody>> {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return Ok(ReqBody::Replayable(Bytes::new()));
    }
    let len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let read_ahead = match len {
        Some(n) => n <= MAX_REPLAY_BODY,
        None => parts.version != Version::HTTP_2,
    };
    if !read_ahead {
        return Ok(ReqBody::Stream(Some(body.map_err(BoxError::from).boxed())));
    }
    let bad = || text(StatusCode::BAD_REQUEST, "invalid request body");
    let mut prefix: Vec<Frame<Bytes>> = Vec::new();
    let mut size = 0usize;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(_)) => return Err(bad()),
            Some(Ok(frame)) => {
                size += frame.data_ref().map_or(0, |d| d.len());
                prefix.push(frame);
                if size > MAX_REPLAY_BODY {
                    // Too big to replay: send what we read, then the rest.
                    let chained = http_body_util::StreamBody::new(Chained {
                        prefix: prefix.into(),
                        rest: body,
                    });
                    return Ok(ReqBody::Stream(Some(chained.boxed())));
                }
            }
        }
    }
    let mut buf = bytes::BytesMut::with_capacity(size);
    for f in prefix {
        if let Ok(d) = f.into_data() {
            buf.extend_from_slice(&d);
        }
    }
    Ok(ReqBody::Replayable(buf.freeze()))
}

/// The frames already read, followed by the rest of the body.
struct Chained {
    prefix: std::collections::VecDeque<Frame<Bytes>>,
    rest: Incoming,
}

impl futures_core::Stream for Chained {
    type Item = Result<Frame<Bytes>, BoxError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use hyper::body::Body as _;
        if let Some(f) = self.prefix.pop_front() {
            return std::task::Poll::Ready(Some(Ok(f)));
        }
        std::pin::Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map(|o| o.map(|r| r.map_err(BoxError::from)))
    }
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let keep_te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if keep_te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Serves one request.
pub(crate) async fn handle(
    req: Request<Incoming>,
    ctx: &HttpContext,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    // Route with borrowed host and path: no allocation per request.
    let up = {
        let routing = ctx.routing.load();
        let host = req.uri().host().or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        match routing.route(&ctx.listener, host, req.uri().path()) {
            Some(up) => up.clone(),
            None => return error_response(&ProxyError::NoRoute),
        }
    };
    match proxy(req, &up, peer).await {
        Ok(resp) => resp,
        Err(e) => {
            debug!(
                service = up.name.as_str(),
                outcome = e.outcome(),
                "request failed"
            );
            error_response(&e)
        }
    }
}

async fn proxy(
    req: Request<Incoming>,
    up: &Upstream,
    peer: SocketAddr,
) -> Result<Response<ProxyBody>, ProxyError> {
    let deadline = tokio::time::Instant::now() + up.request_timeout;
    let (mut parts, body) = req.into_parts();
    let body = match read_body(&parts, body).await {
        Ok(b) => b,
        Err(resp) => return Ok(resp),
    };
    let replay = Replay {
        idempotent: is_idempotent(&parts.method),
        replayable: body.replayable(),
    };
    strip_hop_by_hop(&mut parts.headers);
    append_forwarded_for(&mut parts.headers, peer);
    let mut step = HttpStep {
        http2: parts.version == Version::HTTP_2,
        parts,
        body,
        replay,
        may_resend: up.retries > 0 && replay.replayable,
        deadline,
        clients: &up.clients,
        service: &up.name,
    };
    Ok(match attempt::run(up, &mut step).await? {
        Ended::Success(held, resp) => finish_response(resp, Some(held)),
        Ended::Failed(resp) => finish_response(resp, None),
    })
}

/// One HTTP attempt: send the request, await the response headers.
struct HttpStep<'a> {
    /// The request head, hop-by-hop headers stripped.
    parts: http::request::Parts,
    body: ReqBody,
    http2: bool,
    replay: Replay,
    /// Whether a second attempt may follow: if not, the only attempt takes
    /// the headers instead of cloning them.
    may_resend: bool,
    /// `request_timeout` over all attempts.
    deadline: tokio::time::Instant,
    clients: &'a UpstreamClients,
    service: &'a str,
}

impl Step for HttpStep<'_> {
    type Answer = Response<Incoming>;

    fn replay(&self) -> Replay {
        self.replay
    }

    async fn attempt(&mut self, instance: &ServiceInstance) -> Attempt<Response<Incoming>> {
        let unsendable = || Attempt::Unsendable(ProxyError::Unreachable(self.service.to_owned()));
        let Ok(uri) = upstream_uri(instance.address(), instance.port(), &self.parts.uri) else {
            return unsendable();
        };
        // Always there: a streamed body is never resent (not replayable).
        let Some(body) = self.body.take() else {
            return unsendable();
        };
        let Ok(mut out) = Request::builder()
            .method(self.parts.method.clone())
            .uri(uri)
            .version(if self.http2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            })
            .body(body)
        else {
            return unsendable();
        };
        *out.headers_mut() = if self.may_resend {
            self.parts.headers.clone()
        } else {
            std::mem::take(&mut self.parts.headers)
        };
        if self.http2 {
            // h2 carries the authority in the URI; a stale Host would conflict.
            out.headers_mut().remove(header::HOST);
        }
        let client = if self.http2 {
            &self.clients.h2
        } else {
            &self.clients.h1
        };
        match tokio::time::timeout_at(self.deadline, client.request(out)).await {
            Err(_) => Attempt::NoAnswer(NoAnswer::DeadlineExceeded),
            Ok(Ok(resp)) => Attempt::Answer(resp),
            Ok(Err(e)) => {
                let connect = e.is_connect();
                debug!(service = self.service, error = %e, connect, "upstream attempt failed");
                Attempt::NoAnswer(if connect {
                    NoAnswer::ConnectFailed
                } else {
                    NoAnswer::Reset
                })
            }
        }
    }

    fn classify(resp: &Response<Incoming>) -> Class {
        Class::of_status(resp.status())
    }
}

fn upstream_uri(address: &str, port: u16, original: &Uri) -> Result<Uri, http::Error> {
    let pq = original.path_and_query().map_or("/", |pq| pq.as_str());
    let authority = if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    };
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(pq)
        .build()
}

fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

/// The response for the client; `held` (a success) rides in the body until
/// it ends.
fn finish_response(resp: Response<Incoming>, held: Option<Held>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let body: ProxyBody = match held {
        Some(held) => TrackedBody::new(body, held).boxed(),
        None => body.map_err(BoxError::from).boxed(),
    };
    Response::from_parts(parts, body)
}
