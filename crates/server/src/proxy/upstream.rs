//! The upstream side of an HTTP attempt: pooled clients per service and
//! the [`Step`] that sends one request and awaits its response headers.

use std::time::Duration;

use datapunk_lb_core::ServiceInstance;
use http::header;
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tracing::debug;

use super::attempt::{Attempt, Class, NoAnswer, Replay, Step};
use super::request_body::{ReqBody, UpstreamBody};
use super::ProxyError;

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

/// One HTTP attempt: send the request, await the response headers.
pub(crate) struct HttpStep<'a> {
    /// The request head, hop-by-hop headers stripped.
    pub(crate) parts: http::request::Parts,
    pub(crate) body: ReqBody,
    pub(crate) http2: bool,
    pub(crate) replay: Replay,
    /// Whether a second attempt may follow: if not, the only attempt takes
    /// the headers instead of cloning them.
    pub(crate) may_resend: bool,
    /// `request_timeout` over all attempts.
    pub(crate) deadline: tokio::time::Instant,
    /// `per_try_timeout`: one attempt's limit, within `deadline`.
    pub(crate) per_try_timeout: Option<Duration>,
    pub(crate) clients: &'a UpstreamClients,
    pub(crate) service: &'a str,
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
        let until = self.per_try_timeout.map_or(self.deadline, |t| {
            self.deadline.min(tokio::time::Instant::now() + t)
        });
        match tokio::time::timeout_at(until, client.request(out)).await {
            Err(_) if until < self.deadline => Attempt::NoAnswer(NoAnswer::TryTimedOut),
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

pub(crate) fn upstream_uri(address: &str, port: u16, original: &Uri) -> Result<Uri, http::Error> {
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
