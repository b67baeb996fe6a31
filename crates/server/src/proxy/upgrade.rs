//! HTTP/1.1 Upgrade (WebSocket, or any protocol the backend accepts)
//! through the proxy: the handshake is one more request of the
//! [attempt loop](super::attempt); after a 101 the client and the instance
//! are joined by a byte tunnel.
//!
//! ## What counts as an upgrade
//!
//! An HTTP/1.1 request whose `Connection` header lists the `upgrade` token
//! and that carries an `Upgrade` header naming any protocol but `h2c`. Any
//! other request is an ordinary one and its `Upgrade` header is stripped as
//! hop-by-hop: an HTTP/1.0 request, a request with `Upgrade` but without
//! `Connection: upgrade` (RFC 9110 §7.8: the upgrade is not meant for the
//! next hop), and `Upgrade: h2c`, which negotiates HTTP/2 with this proxy
//! (that speaks h2c by prior knowledge) and is meaningless past it. HTTP/2
//! extended CONNECT (RFC 8441) is not offered (the listener does not send
//! `SETTINGS_ENABLE_CONNECT_PROTOCOL`), so a WebSocket client on HTTP/2
//! falls back to HTTP/1.1 as RFC 8441 says.
//!
//! ## The handshake
//!
//! The request goes through [`attempt::run`] like any other (with
//! the service's `hash_key`): selection
//! under `max_connections`, the same headers as an ordinary request (the
//! forwarding headers of [`http`](super::http); every hop-by-hop header
//! stripped; Host by the service's `host_header`, decided where an ordinary
//! HTTP/1.1 request's is, in [`upstream`](super::upstream)) except that
//! `Connection: upgrade` and the client's `Upgrade` are sent on. Each
//! attempt opens a fresh connection to the instance (within
//! `connect_timeout`; an upgraded connection is never pooled;
//! TLS with the service's `[service.X.tls]`, offering only `http/1.1`) and
//! awaits the response head before the request's `request_timeout`
//! deadline. A handshake has an empty body, so it is replayable, and a GET
//! is idempotent: a connect failure, a reset or a 502/503/504 moves to
//! another instance under the usual retry rule.
//!
//! - **101**: the client gets 101 with the backend's response headers
//!   (`Connection: upgrade` and the backend's `Upgrade` kept, the other
//!   hop-by-hop headers stripped), then bytes are copied both ways.
//! - **Any other status**: the answer is an ordinary response, passed
//!   through and classified as usual (a 5xx is a failure, maybe retried).
//!
//! ## The tunnel
//!
//! Bytes flow both ways until either side closes: its end of stream is
//! passed on (the other side's sending half is shut down) and the tunnel
//! ends, closing both connections, as NGINX does for WebSocket. A
//! half-closed tunnel is not kept open: WebSocket ends with its own close
//! handshake, after which the server closes, and a client that stops reading
//! once it has the close frame would otherwise hold the instance until the
//! idle timeout. An I/O error on either side ends the tunnel too.
//! `upgrade_idle_timeout` (per service, default 1 h,
//! like common proxies' WebSocket timeouts) closes a tunnel in which no
//! byte has moved either way for that long. There is no other time limit.
//!
//! **Counting.** The attempt's [`Held`] claim lives as long as the tunnel,
//! so the instance's active connection count is 1 for its whole life and
//! `max_connections` covers tunnels. When the tunnel ends (closed, idle, or
//! an I/O error: how peers end a stream is their affair, as for TCP) the
//! success is reported, with the handshake's latency; only an upstream
//! connection that fails to hand over after its 101 counts as a reset.
//!
//! **Logged** at debug level when a tunnel ends: service, bytes each way,
//! duration and why it ended (`closed`, `idle`, `error`).
//!
//! ## Drain
//!
//! hyper's graceful shutdown of the client connection does not wait for
//! upgraded I/O: its connection task ends, and with it the drain permit it
//! held, as soon as the 101 is written. So every upgrade request carries a
//! share of its connection's permit ([`attach_permit`]) and the tunnel task
//! holds it: a drain waits for open tunnels exactly like TCP streams, up to
//! `drain_timeout`, and never cuts one earlier. After `drain_timeout` the
//! process exits and the remaining tunnels are closed with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::accept::ConnPermit;
use datapunk_lb_core::{FailureKind, ServiceInstance};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::attempt::{self, Attempt, Class, Ended, Held, NoAnswer, Replay, Step};
use super::headers::strip_hop_by_hop;
use super::http::{finish_response, ProxyBody};
use super::request_body::ReqBody;
use super::upstream::UpstreamClients;
use super::upstream_tls::UpstreamIo;
use super::{ProxyError, Upstream};

/// A share of the client connection's drain permit, carried by an upgrade
/// request to the tunnel task (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct SharedPermit {
    /// Only held: dropping the last share releases the drain permit.
    _shared: Arc<ConnPermit>,
}

/// Gives an upgrade request a share of its connection's drain `permit`;
/// other requests are left alone (no allocation).
pub(crate) fn attach_permit<B>(req: &mut Request<B>, permit: &Arc<ConnPermit>) {
    if protocol(req.version(), req.headers()).is_some() {
        req.extensions_mut().insert(SharedPermit {
            _shared: permit.clone(),
        });
    }
}

/// The `Upgrade` value of an upgrade request (module doc), read before the
/// hop-by-hop headers are stripped; `None` for an ordinary request.
pub(crate) fn requested(parts: &http::request::Parts) -> Option<HeaderValue> {
    protocol(parts.version, &parts.headers)
}

fn protocol(version: Version, headers: &HeaderMap) -> Option<HeaderValue> {
    if version != Version::HTTP_11 || !lists_upgrade(headers) {
        return None;
    }
    let mut values = headers.get_all(header::UPGRADE).iter();
    let first = values.next()?;
    // Several Upgrade lines are one list (RFC 9110 §5.3).
    let value = match values.next() {
        None => first.clone(),
        Some(_) => {
            let joined: Vec<&[u8]> = headers
                .get_all(header::UPGRADE)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect();
            HeaderValue::from_bytes(&joined.join(&b", "[..])).ok()?
        }
    };
    let names_h2c = value
        .as_bytes()
        .split(|b| *b == b',')
        .any(|p| p.trim_ascii().eq_ignore_ascii_case(b"h2c"));
    let empty = value.as_bytes().trim_ascii().is_empty();
    (!names_h2c && !empty).then_some(value)
}

/// Whether `Connection` lists the `upgrade` token.
fn lists_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

/// Proxies an upgrade request asking for `protocol`. `parts` has had its
/// hop-by-hop headers stripped and the forwarding headers added, as for
/// any request; `deadline` is its `request_timeout`.
pub(crate) async fn proxy(
    mut parts: http::request::Parts,
    body: ReqBody,
    replay: Replay,
    protocol: HeaderValue,
    deadline: Instant,
    up: &Upstream,
    key: Option<&[u8]>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let on_client = parts.extensions.remove::<OnUpgrade>();
    let permit = parts.extensions.remove::<SharedPermit>();
    set_upgrade(&mut parts.headers, protocol);
    let mut step = UpgradeStep {
        parts,
        body,
        replay,
        deadline,
        connect_timeout: up.connect_timeout,
        service: &up.name,
        clients: &up.clients,
    };
    Ok(match attempt::run(up, &mut step, key).await? {
        Ended::Success(held, resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            switch(resp, held, on_client, permit, up)
        }
        Ended::Success(held, resp) => finish_response(resp, Some(held), up),
        Ended::Failed(resp) => finish_response(resp, None, up),
    })
}

/// Puts back the two hop-by-hop headers an upgrade carries on.
fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// The 101 for the client, and the tunnel task that joins the two upgraded
/// connections once hyper has handed them over.
fn switch(
    mut resp: Response<Incoming>,
    held: Held,
    on_client: Option<OnUpgrade>,
    permit: Option<SharedPermit>,
    up: &Upstream,
) -> Response<ProxyBody> {
    let on_upstream = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    let (Some(on_client), Some(protocol)) = (on_client, protocol) else {
        // hyper sets OnUpgrade on every HTTP/1.1 request, and a 101 names
        // its protocol: without either there is no tunnel to make.
        held.fail(FailureKind::Reset);
        return super::http::text(StatusCode::BAD_GATEWAY, "upgrade failed");
    };
    set_upgrade(&mut parts.headers, protocol);
    let idle = up.upgrade_idle_timeout;
    let service = up.name.clone();
    tokio::spawn(async move {
        // Held until the tunnel ends, so a drain waits for it.
        let _permit = permit;
        let (client, upstream) = tokio::join!(on_client, on_upstream);
        let upstream = match upstream {
            Ok(u) => u,
            Err(e) => {
                debug!(service, error = %e, "upstream upgrade failed after 101");
                held.fail(FailureKind::Reset);
                return;
            }
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                // The client left before the 101 reached it: not the instance's fault.
                debug!(service, error = %e, "client upgrade failed");
                held.succeed();
                return;
            }
        };
        let started = Instant::now();
        let t = tunnel(TokioIo::new(client), TokioIo::new(upstream), idle).await;
        held.succeed();
        debug!(
            service,
            to_upstream = t.to_upstream,
            to_client = t.to_client,
            duration_ms = started.elapsed().as_millis() as u64,
            ended = t.end.as_str(),
            "upgraded connection ended"
        );
    });
    let body = Empty::new().map_err(|never| match never {}).boxed();
    Response::from_parts(parts, body)
}

/// One handshake attempt: a fresh connection, the request, the response
/// head before the deadline.
struct UpgradeStep<'a> {
    /// The request head: hop-by-hop stripped but for the upgrade pair.
    parts: http::request::Parts,
    body: ReqBody,
    replay: Replay,
    deadline: Instant,
    connect_timeout: Duration,
    service: &'a str,
    /// The Host rule (`host_header`) and `[service.X.tls]` (the handshake
    /// follows the connect).
    clients: &'a UpstreamClients,
}

impl Step for UpgradeStep<'_> {
    type Answer = Response<Incoming>;

    fn replay(&self) -> Replay {
        self.replay
    }

    async fn attempt(&mut self, instance: &ServiceInstance) -> Attempt<Response<Incoming>> {
        let unsendable = || Attempt::Unsendable(ProxyError::Unreachable(self.service.to_owned()));
        // A streamed body is never resent (not replayable): always there.
        let Some(body) = self.body.take() else {
            return unsendable();
        };
        let pq = self
            .parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str());
        let Ok(mut out) = Request::builder()
            .method(self.parts.method.clone())
            .uri(pq)
            .version(Version::HTTP_11)
            .body(body)
        else {
            return unsendable();
        };
        *out.headers_mut() = self.parts.headers.clone();
        // `host_header` as for any HTTP/1.1 request.
        if let Err(e) = self
            .clients
            .set_upgrade_host(&self.parts.uri, out.headers_mut(), instance)
        {
            debug!(service = self.service, error = %e, "instance address unusable");
            return Attempt::NoAnswer(NoAnswer::ConnectFailed);
        }
        let addr = (instance.address(), instance.port());
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                // A connect timeout is a connect failure for HTTP (attempt table).
                Ok(Err(_)) | Err(_) => return Attempt::NoAnswer(NoAnswer::ConnectFailed),
            };
        let _ = stream.set_nodelay(true);
        let stream = match self.clients.tls() {
            None => UpstreamIo::Plain(stream),
            Some(tls) => match tls
                .handshake_http1(stream, instance.address(), self.connect_timeout)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    debug!(service = self.service, error = %e, "upstream TLS handshake failed");
                    return Attempt::NoAnswer(NoAnswer::ConnectFailed);
                }
            },
        };
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(pair) => pair,
                Err(_) => return Attempt::NoAnswer(NoAnswer::Reset),
            };
        let service = self.service.to_owned();
        tokio::spawn(async move {
            // Ends after the response (no 101) or when the IO is handed over.
            if let Err(e) = conn.with_upgrades().await {
                debug!(service, error = %e, "upgrade handshake connection failed");
            }
        });
        match tokio::time::timeout_at(self.deadline, sender.send_request(out)).await {
            Err(_) => Attempt::NoAnswer(NoAnswer::DeadlineExceeded),
            Ok(Ok(resp)) => Attempt::Answer(resp),
            Ok(Err(e)) => {
                debug!(service = self.service, error = %e, "upgrade handshake failed");
                Attempt::NoAnswer(NoAnswer::Reset)
            }
        }
    }

    fn classify(resp: &Response<Incoming>) -> Class {
        Class::of_status(resp.status())
    }
}

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// A side closed (end of stream).
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// A read or write failed.
    Error,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle",
            End::Error => "error",
        }
    }
}

/// What a tunnel carried, and how it ended.
#[derive(Debug)]
struct Tunnel {
    to_upstream: u64,
    to_client: u64,
    end: End,
}

/// Copies bytes both ways between `client` and `upstream` (module doc:
/// half-close, errors, `idle`).
async fn tunnel<C, U>(client: C, upstream: U, idle: Duration) -> Tunnel
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    // Milliseconds from `start` to the last byte moved, either way.
    let last = AtomicU64::new(0);
    let (to_upstream, to_client) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);
    let closed = |r: std::io::Result<()>| if r.is_ok() { End::Closed } else { End::Error };
    let end = tokio::select! {
        r = pump(&mut client_rx, &mut upstream_tx, &to_upstream, &last, start) => closed(r),
        r = pump(&mut upstream_rx, &mut client_tx, &to_client, &last, start) => closed(r),
        () = idle_watch(&last, start, idle) => End::Idle,
    };
    Tunnel {
        to_upstream: to_upstream.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
        end,
    }
}

/// Copies `from` into `to` until `from` ends, then shuts `to` down to pass
/// the end on; counts bytes into `moved` and stamps `last`.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    moved: &AtomicU64,
    last: &AtomicU64,
    start: Instant,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        last.store(since(start), Ordering::Relaxed);
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        moved.fetch_add(n as u64, Ordering::Relaxed);
        last.store(since(start), Ordering::Relaxed);
    }
}

/// Returns once no byte has moved for `idle` (per `last`).
async fn idle_watch(last: &AtomicU64, start: Instant, idle: Duration) {
    loop {
        let due = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        tokio::time::sleep_until(due).await;
        let latest = start + Duration::from_millis(last.load(Ordering::Relaxed));
        if Instant::now().saturating_duration_since(latest) >= idle {
            return;
        }
    }
}

fn since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: Version, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = Request::builder().version(version).uri("/chat");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_http11_with_connection_upgrade_and_a_protocol_is_an_upgrade() {
        let h11 = Version::HTTP_11;
        let asks =
            |v, h: &[(&str, &str)]| requested(&parts(v, h)).map(|p| p.to_str().unwrap().to_owned());
        let ws = Some("websocket".to_owned());
        assert_eq!(
            asks(h11, &[("connection", "Upgrade"), ("upgrade", "websocket")]),
            ws
        );
        assert_eq!(
            asks(
                h11,
                &[
                    ("connection", "keep-alive, UPGRADE"),
                    ("upgrade", "websocket")
                ]
            ),
            ws
        );
        assert_eq!(
            asks(
                h11,
                &[
                    ("connection", "keep-alive"),
                    ("connection", "upgrade"),
                    ("upgrade", "foo/2"),
                    ("upgrade", "bar")
                ]
            ),
            Some("foo/2, bar".to_owned())
        );
        // Not upgrades: no Connection token, HTTP/1.0, no protocol, h2c.
        assert_eq!(asks(h11, &[("upgrade", "websocket")]), None);
        assert_eq!(
            asks(h11, &[("connection", "upgraded"), ("upgrade", "websocket")]),
            None
        );
        assert_eq!(
            asks(
                Version::HTTP_10,
                &[("connection", "upgrade"), ("upgrade", "websocket")]
            ),
            None
        );
        assert_eq!(asks(h11, &[("connection", "upgrade")]), None);
        assert_eq!(
            asks(h11, &[("connection", "upgrade"), ("upgrade", " ")]),
            None
        );
        assert_eq!(
            asks(
                h11,
                &[
                    ("connection", "Upgrade, HTTP2-Settings"),
                    ("upgrade", "h2c")
                ]
            ),
            None
        );
    }

    #[tokio::test]
    async fn a_tunnel_copies_both_ways_and_ends_when_one_side_closes() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (upstream, mut upstream_peer) = tokio::io::duplex(64);
        let t = tokio::spawn(tunnel(client, upstream, Duration::from_secs(60)));
        // Far more than the pipes hold each way, at once: neither direction
        // may wait on the other.
        let up: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..70_000u32).map(|i| (i % 13) as u8).collect();
        let (mut client_rx, mut client_tx) = tokio::io::split(&mut client_peer);
        let (mut upstream_rx, mut upstream_tx) = tokio::io::split(&mut upstream_peer);
        let (mut at_client, mut at_upstream) = (vec![0; down.len()], vec![0; up.len()]);
        let (a, b, c, d) = tokio::join!(
            client_tx.write_all(&up),
            upstream_tx.write_all(&down),
            client_rx.read_exact(&mut at_client),
            upstream_rx.read_exact(&mut at_upstream),
        );
        a.unwrap();
        b.unwrap();
        c.unwrap();
        d.unwrap();
        assert_eq!(at_upstream, up);
        assert_eq!(at_client, down);
        assert!(!t.is_finished());
        // The backend closes: the client sees the end, and the tunnel ends.
        upstream_tx.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(client_rx.read_to_end(&mut rest).await.unwrap(), 0);
        let t = t.await.unwrap();
        assert_eq!(
            (t.to_upstream, t.to_client, t.end),
            (100_000, 70_000, End::Closed)
        );
        // Both connections are closed: the backend sees its end too.
        assert_eq!(upstream_rx.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_closes_after_the_idle_timeout_and_traffic_keeps_it_open() {
        let (client, mut client_peer) = tokio::io::duplex(64);
        let (upstream, mut upstream_peer) = tokio::io::duplex(64);
        let start = Instant::now();
        let t = tokio::spawn(tunnel(client, upstream, Duration::from_secs(10)));
        // A byte every 6 s for 30 s: never 10 s idle, so still open.
        let mut byte = [0u8; 1];
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client_peer.write_all(b"x").await.unwrap();
            upstream_peer.read_exact(&mut byte).await.unwrap();
            assert!(!t.is_finished(), "closed while traffic flowed");
        }
        let t = t.await.unwrap();
        assert_eq!(t.end, End::Idle);
        assert_eq!(
            start.elapsed().as_secs(),
            40,
            "idle 10 s after the last byte at 30 s"
        );
        // Both peers see the tunnel gone.
        let mut rest = Vec::new();
        assert_eq!(client_peer.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
