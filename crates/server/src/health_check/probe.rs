//! One probe, on a kept-alive connection.
//!
//! An `http` probe reuses the instance's idle connection from the previous
//! probe (HTTP/1.1 keep-alive, or the one HTTP/2 connection for `h2c`) and
//! hands it back for the next one: one connection per instance instead of
//! one per probe, so no TIME_WAIT per probe and no handshake cost. A reused
//! connection that fails (the backend closed it while idle) is retried once
//! on a fresh connection, so an idle timeout on the backend is not a failed
//! check. The response body is read (up to [`MAX_BODY`]) so the connection
//! can carry the next probe; a longer body, or `Connection: close`, costs
//! the connection, not the check. `tcp` probes connect and close: the
//! connect is the check.
//!
//! With `[service.X.tls]` every probe connection is TLS, made with the
//! service's own client config (so the CA, name, client certificate and
//! session cache are the traffic's): `tcp` probes then connect *and*
//! handshake, and under `auto` an `http` probe speaks the version the
//! instance picked by ALPN. The handshake counts against the probe's
//! `timeout`.
//!
//! At most [`MAX_KEPT`] idle probe connections are kept across all
//! services: each is a file descriptor in the balancer and a connection
//! the backend holds, and at 100,000 instances one per instance would
//! exhaust both. Instances past the cap connect per probe, as before.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::{HealthCheck, HealthCheckKind};
use crate::proxy::upstream_tls::{UpstreamIo, UpstreamTls};

/// Longest probe response body read to keep the connection.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// Idle probe connections kept at most, across all services.
pub(crate) const MAX_KEPT: usize = 8_192;

/// An idle connection counted against [`MAX_KEPT`] until taken or dropped.
#[derive(Debug)]
pub(crate) struct Kept {
    conn: Option<Conn>,
    count: Arc<AtomicUsize>,
}

impl Kept {
    /// Keeps `conn` if fewer than [`MAX_KEPT`] are kept; else closes it.
    pub(crate) fn keep(conn: Conn, count: &Arc<AtomicUsize>) -> Option<Kept> {
        if count.fetch_add(1, Ordering::Relaxed) >= MAX_KEPT {
            count.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Kept {
            conn: Some(conn),
            count: count.clone(),
        })
    }

    /// The connection, for the next probe (no longer counted).
    pub(crate) fn take(mut self) -> Option<Conn> {
        self.conn.take()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An instance's idle probe connection.
#[derive(Debug)]
pub(crate) enum Conn {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    fn is_closed(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s) => s.is_closed(),
        }
    }
}

/// How a service's probes connect.
#[derive(Debug, Clone, Default)]
pub(crate) struct Transport {
    /// HTTP/2 with prior knowledge (`h2c`); over TLS, ALPN may decide.
    pub(crate) h2: bool,
    /// The service's upstream TLS, if any.
    pub(crate) tls: Option<Arc<UpstreamTls>>,
}

impl Transport {
    /// Whether `other` connects the same way: the same protocol and the
    /// same TLS settings (the very same built config, not an equal one: a
    /// reload builds them afresh from the files).
    pub(crate) fn same_as(&self, other: &Transport) -> bool {
        self.h2 == other.h2
            && match (&self.tls, &other.tls) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }

    /// A connection to `authority` (`addr`, the name TLS verifies, without
    /// brackets), TLS when the service has it.
    async fn connect(
        &self,
        authority: &str,
        addr: &str,
        timeout: std::time::Duration,
    ) -> Option<UpstreamIo> {
        let stream = tokio::net::TcpStream::connect(authority).await.ok()?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => Some(UpstreamIo::Plain(stream)),
            Some(tls) => tls
                .handshake(stream, addr, timeout)
                .await
                .map_err(|e| tracing::debug!(instance = authority, error = %e, "probe TLS handshake failed"))
                .ok(),
        }
    }
}

/// Probes `addr:port` once within the check's timeout; returns the result
/// and the connection to keep for the next probe.
pub(crate) async fn probe(
    check: &HealthCheck,
    transport: &Transport,
    addr: &str,
    port: u16,
    conn: Option<Conn>,
) -> (bool, Option<Conn>) {
    let authority = if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    };
    match &check.kind {
        HealthCheckKind::None => (true, None),
        HealthCheckKind::Tcp => {
            let ok = matches!(
                tokio::time::timeout(
                    check.timeout,
                    transport.connect(&authority, addr, check.timeout)
                )
                .await,
                Ok(Some(_))
            );
            (ok, None)
        }
        HealthCheckKind::Http {
            path,
            host,
            expected,
        } => {
            let attempt = async {
                let reused = conn.filter(|c| !c.is_closed());
                let was_reused = reused.is_some();
                let fresh = || async {
                    let io = transport.connect(&authority, addr, check.timeout).await?;
                    connect(io, transport.h2).await
                };
                let conn = match reused {
                    Some(c) => c,
                    None => fresh().await?,
                };
                match exchange(conn, &authority, path, host.as_deref()).await {
                    Some(r) => Some(r),
                    // A kept connection the backend dropped while idle: once
                    // more on a fresh one.
                    None if was_reused => {
                        exchange(fresh().await?, &authority, path, host.as_deref()).await
                    }
                    None => None,
                }
            };
            match tokio::time::timeout(check.timeout, attempt).await {
                Ok(Some((status, conn))) => (expected.contains(status), conn),
                _ => (false, None),
            }
        }
    }
}

/// One GET on `conn`; the status and the connection if it can carry
/// another request. `None` when no response came.
async fn exchange(
    mut conn: Conn,
    authority: &str,
    path: &str,
    host: Option<&str>,
) -> Option<(u16, Option<Conn>)> {
    // HTTP/1.1 sends the origin form with a Host header; HTTP/2 needs the
    // authority in the URI (`:authority`).
    let uri = match &conn {
        Conn::H1(_) => path.to_owned(),
        Conn::H2(_) => format!("http://{authority}{path}"),
    };
    let mut req = http::Request::get(uri);
    match (&conn, host) {
        (_, Some(h)) => req = req.header(http::header::HOST, h),
        (Conn::H1(_), None) => req = req.header(http::header::HOST, authority),
        (Conn::H2(_), None) => {}
    }
    let req = req.body(Empty::new()).ok()?;
    let resp = match &mut conn {
        Conn::H1(s) => {
            s.ready().await.ok()?;
            s.send_request(req).await.ok()?
        }
        Conn::H2(s) => {
            s.ready().await.ok()?;
            s.send_request(req).await.ok()?
        }
    };
    let status = resp.status().as_u16();
    let drained = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .is_ok();
    let keep = drained && !conn.is_closed();
    Some((status, keep.then_some(conn)))
}

/// HTTP over `io`: HTTP/2 when TLS's ALPN chose it, else as `h2` says.
async fn connect(io: UpstreamIo, h2: bool) -> Option<Conn> {
    let h2 = io.negotiated_h2().unwrap_or(h2);
    let io = TokioIo::new(io);
    // The connection task ends when its `SendRequest` is dropped (the
    // instance is gone or the connection is not kept).
    if h2 {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io).await.ok()?;
        tokio::spawn(conn);
        Some(Conn::H2(send))
    } else {
        let (send, conn) = http1::handshake(io).await.ok()?;
        tokio::spawn(conn);
        Some(Conn::H1(send))
    }
}
