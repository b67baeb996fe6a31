//! HTTP listeners: HTTP/1.1 and HTTP/2 (h2c with prior knowledge) on one
//! port, proxied over pooled keep-alive upstream connections.
//!
//! ## Per request
//!
//! 1. Route by host and path prefix (first match wins); none → 404.
//! 2. Read the body: up to 64 KiB with a known length (or HTTP/1.1 chunked
//!    that ends within 64 KiB) is buffered and so replayable; a larger or
//!    streaming body is sent once. Hop-by-hop headers are dropped, the
//!    forwarding headers set ([`headers`](super::headers): replaced, or
//!    appended to from a trusted proxy) and `X-Request-Id` kept or made
//!    ([`request_id`](super::request_id)); the id also goes back on the
//!    response, the proxy's own errors included.
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

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::debug;

use super::accept::{self, ConnTracker};
use super::access_log::{Counted, Entry};
use super::attempt::{self, Ended, Held, Replay};
use super::body::TrackedBody;
use super::headers::{set_forwarding, strip_hop_by_hop, Forwarding};
use super::request_body::read_body;
use super::request_id::{request_id, X_REQUEST_ID};
use super::upstream::HttpStep;
use super::{BoxError, ProxyError, Routing, Upstream};

/// Largest request head accepted (HTTP/1.1); larger gets 431.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The body type the proxy answers with.
pub(crate) type ProxyBody = BoxBody<Bytes, BoxError>;

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

/// Serves one request.
pub(crate) async fn handle(
    req: Request<Incoming>,
    ctx: &HttpContext,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let id = request_id(req.headers());
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
    // Only with the access log on: a clock read and the request's facts.
    let mut entry = rules.access_log.as_ref().map(|log| {
        let service = up.as_ref().map(|u| u.name.as_str());
        log.entry(&req, peer, &ctx.listener, service, &id)
    });
    let mut resp = match up {
        None => error_response(&ProxyError::NoRoute),
        Some(up) => match proxy(req, &up, peer, &rules.forwarding, &id, entry.as_mut()).await {
            Ok(resp) => resp,
            Err(e) => {
                debug!(
                    service = up.name.as_str(),
                    outcome = e.outcome(),
                    "request failed"
                );
                error_response(&e)
            }
        },
    };
    resp.headers_mut().insert(X_REQUEST_ID, id);
    match entry {
        Some(e) => e.respond(resp),
        None => resp,
    }
}

async fn proxy(
    req: Request<Incoming>,
    up: &Upstream,
    peer: SocketAddr,
    forwarding: &Forwarding,
    id: &HeaderValue,
    mut entry: Option<&mut Entry>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let deadline = tokio::time::Instant::now() + up.request_timeout;
    let (mut parts, body) = req.into_parts();
    let mut body = match read_body(&parts, body).await {
        Ok(b) => b,
        Err(resp) => return Ok(resp),
    };
    if let Some(e) = entry.as_deref_mut() {
        e.count_request_body(&mut body);
    }
    let replay = Replay {
        idempotent: is_idempotent(&parts.method),
        replayable: body.replayable(),
    };
    strip_hop_by_hop(&mut parts.headers);
    // After the strip: a client cannot name these in `Connection`.
    let authority = parts.uri.authority().cloned();
    set_forwarding(
        &mut parts.headers,
        peer,
        "http",
        authority.as_ref(),
        forwarding,
    );
    parts.headers.insert(X_REQUEST_ID, id.clone());
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
    let ended = match entry {
        Some(e) => {
            let mut counted = Counted::new(&mut step);
            let ended = attempt::run(up, &mut counted).await;
            e.attempts(&counted);
            ended
        }
        None => attempt::run(up, &mut step).await,
    };
    Ok(match ended? {
        Ended::Success(held, resp) => finish_response(resp, Some(held)),
        Ended::Failed(resp) => finish_response(resp, None),
    })
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
