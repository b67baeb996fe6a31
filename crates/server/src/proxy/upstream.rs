//! The upstream side of an HTTP attempt: the service's connections
//! ([`Pool`], whose module doc states what is reused when, the bounds and
//! what is closed when) and the [`Step`] that sends one request and awaits
//! its response headers.
//!
//! ## The request that goes out
//!
//! - **Version** (`upstream_protocol`): `http1` (default) sends HTTP/1.1
//!   whatever the client spoke, `h2c` sends HTTP/2 with prior knowledge,
//!   `auto` the client's version. HTTP/2 pseudo-headers become the request
//!   line and Host (our HTTP/1.1 exchange, `h1_exchange.rs`, which writes
//!   the head from the request's own parts: no copy), and hyper's server
//!   turns the response back into HTTP/2. Request trailers from an HTTP/2
//!   client reach an HTTP/1.1 instance only when the client declared them
//!   in a `trailer` header (chunked trailers); otherwise they are dropped,
//!   as HTTP/1.1 has no other way to carry them (hyper's client did the
//!   same).
//! - **Authority** (`host_header`): `preserve` (default) sends the client's
//!   own — the request URI's authority (HTTP/2's `:authority`, an
//!   absolute-form target), else its Host header — as Host on HTTP/1.1 and
//!   as `:authority` on HTTP/2, while the connection goes to the instance;
//!   `instance` sends the instance's `address:port`.
//! - **TLS** (`[service.X.tls]`, see `upstream_tls.rs`): `http1` and `h2c`
//!   go out as above (ALPN `http/1.1` / `h2`); `auto` sends what the
//!   instance chose by ALPN, whatever the client spoke.
//! - **gRPC** (`content-type: application/grpc[+…]`) to an `http1` service
//!   cannot work (gRPC needs HTTP/2 trailers), so it is answered at once,
//!   before any instance is picked, with a trailers-only gRPC answer: HTTP
//!   200, `grpc-status: 14` (UNAVAILABLE) and a `grpc-message` naming the
//!   service and the fix. gRPC clients surface `grpc-status` and its message
//!   as the call's error (a bare 502 surfaces as an opaque "Unavailable:
//!   502"); no instance is charged.
//!
//! ## Errors
//!
//! No connection (connect failure or timeout, HTTP/2 handshake) →
//! `ConnectFailed`; a failure after the request was handed to a connection
//! → `Reset`, as the attempt table says. An idle connection found closed is
//! not a failure of anyone (see [`Pool`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use datapunk_lb_core::{Service, ServiceInstance};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty};
use tracing::debug;

use super::attempt::{Attempt, Class, NoAnswer, Replay, Step};
use super::h1_exchange::RequestHead;
use super::headers::ProxyHeaders;
use super::http::ProxyBody;
use super::pool::{Failed, InstancePool, Pool, PooledBody, SendError};
use super::request_body::{ReqBody, UpstreamBody};
use super::upstream_tls::UpstreamTls;
use super::ProxyError;
use crate::config::{HostHeader, UpstreamProtocol};

/// The connections of one service and how requests go out on them.
#[derive(Debug)]
pub(crate) struct UpstreamClients {
    pool: Pool,
    protocol: UpstreamProtocol,
    host_header: HostHeader,
}

impl UpstreamClients {
    /// Connections with `connect_timeout` for a service speaking
    /// `protocol`, over `tls` when given; `service` lets the pool drop the
    /// connections of instances that leave it.
    pub(crate) fn new(
        connect_timeout: Duration,
        protocol: UpstreamProtocol,
        host_header: HostHeader,
        tls: Option<Arc<UpstreamTls>>,
        service: Option<Arc<Service>>,
    ) -> Self {
        Self {
            pool: Pool::new(connect_timeout, tls, service),
            protocol,
            host_header,
        }
    }

    /// Keeps at most `limit` idle upstream connections across the service's
    /// instances (`max_idle_connections`).
    pub(crate) fn with_idle_limit(mut self, limit: usize) -> Self {
        self.pool = self.pool.with_idle_limit(limit);
        self
    }

    /// Whether a request that came in as `inbound` goes out as HTTP/2.
    fn http2_out(&self, inbound: Version) -> bool {
        match self.protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::H2c => true,
            UpstreamProtocol::Auto => inbound == Version::HTTP_2,
        }
    }

    /// The Host an HTTP/1.1 request to the instance of `to` carries
    /// (module doc, **Authority**), given the client's request target `uri`
    /// and the request's `headers`; `None` keeps the request's own Host.
    /// The one rule for ordinary requests and upgrade handshakes alike.
    fn http1_host(&self, uri: &Uri, headers: &HeaderMap, to: &InstancePool) -> Option<HeaderValue> {
        match self.host_header {
            HostHeader::Instance => Some(to.host().clone()),
            // `preserve` keeps the client's Host as it is, unless the client
            // put the authority in the URI (HTTP/2, absolute form). An
            // authority is always a valid Host value.
            HostHeader::Preserve => match uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                Some(host) => Some(host),
                None if headers.contains_key(header::HOST) => None,
                None => Some(to.host().clone()),
            },
        }
    }

    /// Sets the Host of an upgrade handshake to `instance` by the rule of
    /// every HTTP/1.1 request ([`http1_host`](Self::http1_host)); `uri` is
    /// the client's request target. An upgrade opens its own connection,
    /// but the instance's `address:port` is the pool's, as for any request.
    pub(crate) fn set_upgrade_host(
        &self,
        uri: &Uri,
        headers: &mut HeaderMap,
        instance: &ServiceInstance,
    ) -> Result<(), SendError> {
        let to = self.pool.instance(instance)?;
        if let Some(host) = self.http1_host(uri, headers, &to) {
            headers.insert(header::HOST, host);
        }
        Ok(())
    }

    /// The service's upstream TLS, if it has one (for upgrades, which open
    /// their own connections).
    pub(crate) fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        self.pool.tls()
    }

    /// Whether a request that came in as `inbound` goes out as HTTP/2
    /// whichever instance it goes to (no ALPN choice to learn first).
    pub(crate) fn always_http2(&self, inbound: Version) -> bool {
        !self.alpn_decides() && self.http2_out(inbound)
    }

    /// Whether the instance's ALPN choice sets the version: `auto` over TLS.
    fn alpn_decides(&self) -> bool {
        self.protocol == UpstreamProtocol::Auto && self.pool.tls().is_some()
    }

    /// The answer to a gRPC request this service cannot carry (its
    /// instances speak HTTP/1.1), given before any instance is picked.
    pub(crate) fn refuse_grpc(
        &self,
        parts: &http::request::Parts,
        service: &str,
    ) -> Option<Response<ProxyBody>> {
        if self.http2_out(parts.version) || !is_grpc(&parts.headers) {
            return None;
        }
        debug!(service, "gRPC request to an HTTP/1.1 service refused");
        let message = format!(
            "datapunk-lb: service {service} speaks HTTP/1.1 to its instances and gRPC needs HTTP/2; set upstream_protocol = \"h2c\" in [service.{service}]"
        );
        let mut resp = Response::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert("grpc-status", HeaderValue::from_static("14"));
        // Printable ASCII without '%' needs no percent-encoding.
        if let Ok(v) = HeaderValue::from_str(&message.replace('%', "%25")) {
            h.insert("grpc-message", v);
        }
        Some(resp)
    }
}

/// `content-type: application/grpc`, alone or with a `+format` / `;params`.
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.as_bytes().strip_prefix(b"application/grpc"))
        .is_some_and(|rest| rest.first().is_none_or(|b| *b == b'+' || *b == b';'))
}

/// One HTTP attempt: send the request, await the response headers.
pub(crate) struct HttpStep<'a> {
    /// The request head, hop-by-hop headers stripped.
    pub(crate) parts: http::request::Parts,
    pub(crate) body: ReqBody,
    pub(crate) replay: Replay,
    /// The headers went out with an HTTP/2 attempt and did not come back:
    /// no further attempt can be built. An HTTP/2 attempt sends a copy of
    /// the headers and keeps them when the body is buffered (a retry, or a
    /// stream the server refuses unprocessed, sent again whatever the
    /// method: `h2_upstream.rs`); otherwise it takes them, and gets them
    /// back only from a send that never left ([`Failed::unsent`]). An
    /// HTTP/1.1 attempt encodes the head from these parts as they are (Host
    /// replaced on the wire): no copy, nothing taken.
    pub(crate) headers_gone: bool,
    /// The Host header the taken headers had before the attempt changed it
    /// (`Some(None)`: none), to put back if they come back.
    pub(crate) host_before: Option<Option<HeaderValue>>,
    /// `request_timeout` over all attempts.
    pub(crate) deadline: tokio::time::Instant,
    /// The first attempt's start when it is the clock read the deadline was
    /// set from (nothing awaited since: the body came with the head); taken
    /// by the first attempt, the others read the clock.
    pub(crate) first_attempt_at: Option<std::time::Instant>,
    /// When the current attempt started: the pool's connection stamps
    /// (checkout, check-in) are taken from it, not from a clock read each.
    pub(crate) attempt_at: std::time::Instant,
    /// `per_try_timeout`: one attempt's limit, within `deadline`.
    pub(crate) per_try_timeout: Option<Duration>,
    /// The forwarding headers and request id not yet in `parts`: HTTP/1.1
    /// encodes them with the head; the first HTTP/2 attempt (`auto` over
    /// TLS) sets them in `parts` (and takes them).
    pub(crate) added: Option<&'a ProxyHeaders<'a>>,
    pub(crate) clients: &'a UpstreamClients,
    pub(crate) service: &'a str,
    /// An HTTP/1.1 answer may keep its head as lines
    /// ([`raw_head`](super::raw_head)): the client is `h1_server`'s.
    pub(crate) raw_response: bool,
}

impl HttpStep<'_> {
    /// The authority the client asked for: the URI's (HTTP/2, absolute
    /// form), else the Host header's.
    fn client_authority(&self) -> Option<Authority> {
        if let Some(a) = self.parts.uri.authority() {
            return Some(a.clone());
        }
        let host = self.parts.headers.get(header::HOST)?;
        Authority::try_from(host.as_bytes()).ok()
    }

    /// The HTTP/2 request for the instance of `to`, or `None` when it
    /// cannot be built. (HTTP/1.1 needs none: its head is encoded from
    /// `parts`.)
    fn build_h2(&mut self, to: &InstancePool) -> Option<Request<UpstreamBody>> {
        let pq = self
            .parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let authority = match self.clients.host_header {
            HostHeader::Preserve => self.client_authority(),
            HostHeader::Instance => None,
        };
        let mut u = http::uri::Parts::default();
        u.scheme = Some(Scheme::HTTP);
        u.authority = Some(authority.unwrap_or_else(|| to.authority().clone()));
        u.path_and_query = Some(pq);
        let uri = Uri::from_parts(u).ok()?;
        if self.headers_gone {
            return None;
        }
        // Set in the request's own map, once (a copy of it has no room to
        // grow into): later attempts, HTTP/1.1 ones too, send it as it is.
        if let Some(added) = self.added.take() {
            added.apply(&mut self.parts.headers);
        }
        let mut headers = if self.replay.replayable {
            self.parts.headers.clone()
        } else {
            self.headers_gone = true;
            std::mem::take(&mut self.parts.headers)
        };
        // h2 carries the authority in the URI; a stale Host would conflict.
        let host_before = Some(headers.remove(header::HOST));
        if self.headers_gone {
            self.host_before = host_before;
        }
        let body = self.body.take()?;
        let mut out = Request::new(body);
        *out.method_mut() = self.parts.method.clone();
        *out.uri_mut() = uri;
        *out.version_mut() = Version::HTTP_2;
        *out.headers_mut() = headers;
        Some(out)
    }
}

impl HttpStep<'_> {
    /// Takes back the headers of a request that never left, as they were
    /// before [`build_h2`](Self::build_h2) changed its Host.
    /// Takes back what a send that never left hands back: the headers (if
    /// they were taken) and the body (a streamed one goes out next time).
    fn headers_back(&mut self, req: Request<UpstreamBody>) {
        let (parts, body) = req.into_parts();
        self.body.give_back(body);
        if !self.headers_gone {
            return;
        }
        self.parts.headers = parts.headers;
        match self.host_before.take() {
            Some(Some(host)) => {
                self.parts.headers.insert(header::HOST, host);
            }
            Some(None) => {
                self.parts.headers.remove(header::HOST);
            }
            None => {}
        }
        self.headers_gone = false;
    }
}

impl Step for HttpStep<'_> {
    type Answer = Response<PooledBody>;

    /// Replayable only while the headers are at hand (kept, or back), and
    /// the body: buffered, or a stream no attempt has read from (handed
    /// back by a send that reached no instance).
    fn replay(&self) -> Replay {
        Replay {
            replayable: (self.replay.replayable || self.body.unread_stream()) && !self.headers_gone,
            ..self.replay
        }
    }

    fn attempt_started(&mut self) -> std::time::Instant {
        self.attempt_at = self
            .first_attempt_at
            .take()
            .unwrap_or_else(std::time::Instant::now);
        self.attempt_at
    }

    async fn attempt(&mut self, instance: &ServiceInstance) -> Attempt<Response<PooledBody>> {
        let unsendable = || Attempt::Unsendable(ProxyError::Unreachable(self.service.to_owned()));
        let to = match self.clients.pool.instance(instance) {
            Ok(to) => to,
            Err(e) => {
                debug!(service = self.service, error = %e, "instance address unusable");
                return Attempt::NoAnswer(NoAnswer::ConnectFailed);
            }
        };
        let until = self.per_try_timeout.map_or(self.deadline, |t| {
            self.deadline.min(tokio::time::Instant::now() + t)
        });
        let http2 = if self.clients.alpn_decides() {
            // The first request to an instance opens the connection that
            // learns its choice (kept for this request).
            // Boxed: a rare path (`auto` over TLS) kept out of every
            // attempt's future.
            let learnt = Box::pin(self.clients.pool.alpn_h2(&to));
            match tokio::time::timeout_at(until, learnt).await {
                Ok(Ok(h2)) => h2,
                Ok(Err(e)) => {
                    debug!(service = self.service, error = %e, connect = true, "upstream attempt failed");
                    return Attempt::NoAnswer(NoAnswer::ConnectFailed);
                }
                Err(_) if until < self.deadline => return Attempt::NoAnswer(NoAnswer::TryTimedOut),
                Err(_) => return Attempt::NoAnswer(NoAnswer::DeadlineExceeded),
            }
        } else {
            self.clients.http2_out(self.parts.version)
        };
        let pool = &self.clients.pool;
        // The body is always there: a streamed body is never resent.
        // A send that fails unanswered may go out once more within the
        // attempt (`pool.rs`, **HTTP/1.1**; `h2_upstream.rs`, **Unsent**):
        // the pool asks for the request again through these closures, from
        // inside its one send, so each send future has one caller and is
        // built in place in the attempt's (a second call site left it out
        // of line: +500 instructions a request).
        let replay = self.replay();
        let sent = if http2 {
            let Some(out) = self.build_h2(&to) else {
                return unsendable();
            };
            // Refused unprocessed: whatever the method, if it can be built
            // again (headers kept, body buffered).
            let again = || replay.replayable.then(|| self.build_h2(&to)).flatten();
            tokio::time::timeout_at(until, pool.send_h2(&to, out, again)).await
        } else {
            if self.headers_gone {
                return unsendable();
            }
            let Some(body) = self.body.take() else {
                return unsendable();
            };
            let host = self
                .clients
                .http1_host(&self.parts.uri, &self.parts.headers, &to);
            let head = RequestHead {
                method: &self.parts.method,
                uri: &self.parts.uri,
                headers: &self.parts.headers,
                host: host.as_ref(),
                raw_response: self.raw_response,
                added: self.added,
            };
            let began = tokio::time::Instant::from_std(self.attempt_at);
            // A reused connection closed unanswered: the request may have
            // arrived, so only an idempotent one goes out again.
            let body_slot = &mut self.body;
            let again = || {
                (replay.idempotent && replay.replayable)
                    .then(|| body_slot.take())
                    .flatten()
            };
            tokio::time::timeout_at(until, pool.send_h1(&to, head, body, began, again)).await
        };
        match sent {
            Err(_) if until < self.deadline => Attempt::NoAnswer(NoAnswer::TryTimedOut),
            Err(_) => Attempt::NoAnswer(NoAnswer::DeadlineExceeded),
            Ok(Ok(resp)) => Attempt::Answer(resp),
            Ok(Err(Failed {
                error: e,
                unsent,
                unsent_body,
                stale,
                ..
            })) => {
                if let Some(req) = unsent {
                    self.headers_back(req);
                }
                if let Some(body) = unsent_body {
                    self.body.give_back(body);
                }
                let connect = matches!(e, SendError::Connect(_));
                debug!(service = self.service, error = %e, connect, stale, "upstream attempt failed");
                Attempt::NoAnswer(if connect {
                    NoAnswer::ConnectFailed
                } else if stale {
                    NoAnswer::Stale
                } else {
                    NoAnswer::Reset
                })
            }
        }
    }

    fn classify(resp: &Response<PooledBody>) -> Class {
        Class::of_status(resp.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GET from an HTTP/1.1 client to `api.test` with a streamed body,
    /// sent without a copy of its head.
    fn uncopied_step(clients: &UpstreamClients) -> HttpStep<'_> {
        let (mut parts, ()) = Request::get("/p?q=1").body(()).unwrap().into_parts();
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("api.test"));
        parts
            .headers
            .insert("x-custom", HeaderValue::from_static("1"));
        HttpStep {
            parts,
            body: ReqBody::Stream(Some(Empty::new().map_err(|never| match never {}).boxed())),
            replay: Replay {
                idempotent: false,
                replayable: false,
            },
            headers_gone: false,
            host_before: None,
            deadline: tokio::time::Instant::now() + Duration::from_secs(1),
            first_attempt_at: None,
            attempt_at: std::time::Instant::now(),
            per_try_timeout: None,
            added: None,
            clients,
            service: "api",
            raw_response: false,
        }
    }

    #[tokio::test]
    async fn an_unsent_request_gives_its_head_back_as_the_client_sent_it() {
        let instance = ServiceInstance::try_new("a", "127.0.0.1", 9).unwrap();
        for (protocol, host_header) in [
            (UpstreamProtocol::H2c, HostHeader::Preserve),
            (UpstreamProtocol::H2c, HostHeader::Instance),
        ] {
            let clients =
                UpstreamClients::new(Duration::from_secs(1), protocol, host_header, None, None);
            let to = clients.pool.instance(&instance).unwrap();
            let mut step = uncopied_step(&clients);
            for attempt in 0..2 {
                let case = format!("{protocol:?} {host_header:?}, attempt {attempt}");
                assert!(step.replay().replayable, "{case}: the head is at hand");
                let out = step.build_h2(&to).expect("built");
                assert!(step.parts.headers.is_empty(), "{case}: taken, not copied");
                assert!(!step.replay().replayable, "{case}: gone with the request");
                let authority = match host_header {
                    HostHeader::Preserve => "http://api.test/p?q=1",
                    HostHeader::Instance => "http://127.0.0.1:9/p?q=1",
                };
                assert_eq!(out.uri(), authority, "{case}");
                assert!(out.headers().get(header::HOST).is_none(), "{case}");
                step.headers_back(out);
                assert_eq!(step.parts.headers[header::HOST], "api.test", "{case}");
                assert_eq!(step.parts.headers["x-custom"], "1", "{case}");
                assert_eq!(step.parts.headers.len(), 2, "{case}");
            }
            // A buffered body: the headers are copied, kept for a resend
            // of a stream the server refuses unprocessed.
            let mut step = HttpStep {
                body: ReqBody::Replayable(Bytes::from_static(b"n1")),
                replay: Replay {
                    idempotent: false,
                    replayable: true,
                },
                ..uncopied_step(&clients)
            };
            step.build_h2(&to).expect("built");
            assert_eq!(
                step.parts.headers.len(),
                2,
                "{protocol:?} {host_header:?}: kept"
            );
            assert!(step.replay().replayable);
        }
    }

    #[test]
    fn grpc_content_types_are_recognised() {
        let grpc = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            is_grpc(&h)
        };
        assert!(grpc("application/grpc"));
        assert!(grpc("application/grpc+proto"));
        assert!(grpc("application/grpc;charset=utf-8"));
        assert!(!grpc("application/grpc-web"));
        assert!(!grpc("application/json"));
        assert!(!is_grpc(&http::HeaderMap::new()));
    }
}
