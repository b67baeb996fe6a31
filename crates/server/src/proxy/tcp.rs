//! TCP listeners: bytes both ways, one instance chosen per connection by the
//! [attempt loop](super::attempt), whose step here is the connect.
//!
//! - A connect that fails, or does not finish within `connect_timeout`, is
//!   reported to the core and retried on an instance not tried yet, at most
//!   `retries` times and while the service's
//!   [`RetryBudget`](super::RetryBudget) allows, as for HTTP. Nothing of the
//!   client's stream is read before the connect, so it is always replayable.
//! - Every instance at `max_connections`, or no instance at all: the client
//!   connection is closed at once, counted `over_limit` / `no_instance` as
//!   HTTP counts its 503.
//! - A connect is a success whose latency is the connect time, recorded when
//!   the connection closes, so the instance's connection count covers the
//!   connection's whole life.
//! - With `hash_key = "client_ip"` (the only key a stream has) the client's
//!   IP is the `consistent_hash` key, so one client keeps its instance.
//! - A `tls` listener terminates TLS first (`super::tls`), in the
//!   connection's task, within the listener's `header_read_timeout`; the
//!   instance is chosen after the handshake and gets the plain bytes.
//! - A `tcp` listener with `sni_route`s (TLS passthrough, [`super::sni`])
//!   first reads the ClientHello, at most `sni::MAX_CLIENT_HELLO` bytes
//!   within the listener's `header_read_timeout`, picks the service by its
//!   server name (no name, no match, not TLS, or the time or size limit
//!   reached: the default `service`, else the connection is closed), and
//!   after the connect writes the bytes read to the instance before
//!   splicing. They are held until then, so a failed connect still retries.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use datapunk_lb_core::ServiceInstance;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::debug;

use super::accept;
use super::accept::{ConnPermit, ConnTracker};
use super::attempt::{self, Attempt, Class, Ended, NoAnswer, Replay, Step};
use super::hash_key::client_ip_digest;
use super::sni::{parse_client_hello, Hello, MAX_CLIENT_HELLO};
use super::tls::{ClientStream, TlsListener};
use super::{ProxyError, Routing};

/// Accepts connections until `stop` turns true; open connections are
/// tracked by `tracker` so a drain can wait for them (a TCP stream has no
/// graceful end, so it runs until either side closes or the drain times out).
// One call site (server.rs), each argument a distinct handle.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve(
    listener: TcpListener,
    name: Arc<str>,
    routing: Arc<ArcSwap<Routing>>,
    stop: watch::Receiver<bool>,
    tracker: ConnTracker,
    accept_errors: Counter,
    max_connections: u32,
    // `tls` listeners: the termination and the handshake's time limit.
    tls: Option<(Arc<TlsListener>, Duration)>,
    // Passthrough listeners: ClientHellos by outcome (`sni::HELLO_OUTCOMES`).
    sni_hellos: Option<Arc<[Counter]>>,
) {
    let on_accept = |client: TcpStream, peer: SocketAddr, permit: ConnPermit| {
        let routing = routing.clone();
        let name = name.clone();
        let tls = tls.clone();
        let sni_hellos = sni_hellos.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut client = client;
            // Passthrough: the ClientHello is read here, off the accept loop.
            let passthrough = if tls.is_none() {
                routing.load().passthrough(&name)
            } else {
                None
            };
            let hello = match passthrough {
                None => None,
                Some(timeout) => match read_client_hello(&mut client, timeout).await {
                    Ok(h) => {
                        if let Some(c) = sni_hellos.as_ref().and_then(|c| c.get(h.hello.outcome()))
                        {
                            c.inc();
                        }
                        Some(h)
                    }
                    Err(e) => {
                        debug!(listener = &*name, %peer, error = %e, "passthrough: no ClientHello");
                        return;
                    }
                },
            };
            // The handshake runs here, off the accept loop.
            let client = match tls {
                None => ClientStream::Plain(client),
                Some((t, timeout)) => match t.accept(client, timeout).await {
                    Ok(s) => ClientStream::Tls(Box::new(s)),
                    Err(e) => {
                        debug!(listener = &*name, %peer, error = %e, "tls handshake failed");
                        return;
                    }
                },
            };
            if let Err(e) = proxy(client, peer, &name, &routing, hello).await {
                debug!(listener = &*name, %peer, error = %e, "tcp connection ended");
            }
        });
    };
    let limit = accept::Limit::new(max_connections);
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

async fn proxy(
    mut client: ClientStream,
    peer: SocketAddr,
    name: &str,
    routing: &ArcSwap<Routing>,
    hello: Option<ReadHello>,
) -> Result<(), TcpError> {
    let up = match &hello {
        None => routing.load().tcp_upstream(name).cloned(),
        Some(h) => {
            let server_name = match &h.hello {
                Hello::ServerName(n) => Some(n.as_str()),
                _ => None,
            };
            let up = routing.load().sni_upstream(name, server_name).cloned();
            debug!(
                listener = name,
                %peer,
                hello = ?h.hello,
                service = up.as_ref().map(|u| u.name.as_str()),
                "passthrough: routed by ClientHello"
            );
            up
        }
    };
    let Some(up) = up else {
        return Ok(());
    };
    let mut step = TcpConnect {
        timeout: up.connect_timeout,
    };
    // `client_ip` is the only key a stream has (config refuses the others).
    let key = up.hash_key.as_ref().map(|_| client_ip_digest(peer));
    match attempt::run(&up, &mut step, key.as_ref().map(|k| &k[..])).await? {
        Ended::Success(held, mut upstream) => {
            let _ = upstream.set_nodelay(true);
            if let Some(h) = &hello {
                upstream.write_all(&h.bytes).await.map_err(TcpError::Io)?;
            }
            let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            // The instance answered; how the stream ends is the peers' affair.
            held.succeed();
            copied.map(|_| ()).map_err(TcpError::Io)
        }
        // A connect has no failed answer; dropping closes the client.
        Ended::Failed(_) => Ok(()),
    }
}

/// What a passthrough listener read before choosing: the bytes (sent on
/// to the instance) and what they say.
struct ReadHello {
    bytes: Vec<u8>,
    hello: Hello,
}

/// Reads until the ClientHello is decided, [`MAX_CLIENT_HELLO`] bytes are
/// read or `timeout` passes (then `Hello::NeedMore`: treated as no name).
/// An error or EOF first: the client is gone.
async fn read_client_hello(client: &mut TcpStream, timeout: Duration) -> io::Result<ReadHello> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bytes = Vec::with_capacity(2048);
    loop {
        let hello = parse_client_hello(&bytes);
        let room = MAX_CLIENT_HELLO.saturating_sub(bytes.len());
        if hello != Hello::NeedMore || room == 0 {
            return Ok(ReadHello { bytes, hello });
        }
        let mut limited = (&mut *client).take(room as u64);
        match tokio::time::timeout_at(deadline, limited.read_buf(&mut bytes)).await {
            Err(_) => return Ok(ReadHello { bytes, hello }),
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the ClientHello",
                ))
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Why a TCP connection ended early.
#[derive(Debug, thiserror::Error)]
enum TcpError {
    /// No instance took the connection.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// Copying between the peers failed.
    #[error(transparent)]
    Io(std::io::Error),
}

/// One TCP attempt: connect within `connect_timeout`.
struct TcpConnect {
    timeout: Duration,
}

impl Step for TcpConnect {
    type Answer = TcpStream;

    fn replay(&self) -> Replay {
        // Nothing of the client's stream is read before the connect.
        Replay {
            idempotent: false,
            replayable: true,
        }
    }

    async fn attempt(&mut self, instance: &ServiceInstance) -> Attempt<TcpStream> {
        let addr = (instance.address(), instance.port());
        match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => Attempt::Answer(stream),
            Ok(Err(_)) => Attempt::NoAnswer(NoAnswer::ConnectFailed),
            Err(_) => Attempt::NoAnswer(NoAnswer::ConnectTimedOut),
        }
    }

    fn classify(_: &TcpStream) -> Class {
        Class::Success
    }
}
