//! The proxy: HTTP/1.1 + HTTP/2 listeners ([`http`]: the request path;
//! [`headers`]: hop-by-hop and forwarding headers; [`request_body`]: buffered
//! for replay or streamed; [`upstream`]: the HTTP attempt, its protocol and
//! Host; [`pool`]: the upstream connections, pooled per instance;
//! [`body`]: the response body that carries the attempt's claim;
//! [`upgrade`]: HTTP/1.1 Upgrade and WebSocket tunnels;
//! [`request_id`]: `X-Request-Id`; [`access_log`]: one line per request;
//! [`hygiene`]: the Host checks before routing; [`client_limits`]: the
//! head, idle and body timeouts of client connections), TCP
//! listeners ([`tcp`]), TLS termination for both ([`tls`]), the one accept loop both use ([`accept`]: accept
//! errors logged at most once a second and backed off; the drain tracker),
//! routing, the request key `consistent_hash` hashes ([`hash_key`]), the
//! one attempt loop both use ([`attempt`]), the retry budget
//! ([`retry`]) and the errors clients see ([`error`]).
//!
//! Request path: listener → [`Routing::route`] (host, then path prefix,
//! first match wins; a TCP listener has one service) → [`attempt::run`]:
//! select inside the core (`Service::select_with`: an instance not tried by
//! this request, under `max_connections`) → one attempt through the
//! protocol's step (HTTP: request to response headers; TCP: connect) → one
//! classification, one retry decision, one report to the core (health
//! scores, breakers) and to metrics. The rule, with its table, is the doc of
//! [`attempt`]: HTTP and TCP differ only in their step.

pub(crate) mod accept;
pub(crate) mod access_log;
pub(crate) mod attempt;
pub(crate) mod body;
pub(crate) mod client_limits;
pub(crate) mod error;
pub(crate) mod h1_exchange;
pub(crate) mod h1_server;
pub(crate) mod h2_upstream;
pub(crate) mod hash_key;
pub(crate) mod headers;
pub(crate) mod http;
pub(crate) mod hygiene;
pub(crate) mod maybe_tls;
pub(crate) mod pool;
pub(crate) mod raw_head;
pub(crate) mod request_body;
pub(crate) mod request_id;
pub(crate) mod retry;
pub(crate) mod sni;
pub(crate) mod spare_maps;
pub(crate) mod stream_tasks;
pub(crate) mod tcp;
pub(crate) mod tls;
pub(crate) mod upgrade;
pub(crate) mod upstream;
pub(crate) mod upstream_tls;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use datapunk_lb_core::Service;

use crate::config::{Config, ListenerConfig, Route};
use crate::workers::{Aligned, PerWorker};

pub(crate) use self::error::ProxyError;
pub(crate) use self::retry::RetryBudget;

/// Boxed error for bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Per-service proxy settings and handles, resolved once per config.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// The service name.
    pub(crate) name: String,
    /// The core service (selection, outcomes).
    pub(crate) service: Arc<Service>,
    /// Connect timeout.
    pub(crate) connect_timeout: Duration,
    /// Deadline for the response headers, over all attempts.
    pub(crate) request_timeout: Duration,
    /// Deadline of one attempt, within `request_timeout`.
    pub(crate) per_try_timeout: Option<Duration>,
    /// Longest pause inside a response body.
    pub(crate) response_idle_timeout: Duration,
    /// Retries to a different instance.
    pub(crate) retries: u32,
    /// Per-instance connection limit.
    pub(crate) max_connections: u32,
    /// Retry budget, kept across reloads.
    pub(crate) budget: Arc<RetryBudget>,
    /// Pooled upstream clients.
    pub(crate) clients: upstream::UpstreamClients,
    /// Metric handles, resolved once; a copy per worker, since every
    /// success clones them into its response body.
    pub(crate) metrics: crate::workers::PerWorker<crate::metrics::ServiceMetrics>,
    /// An upgraded connection idle this long is closed ([`upgrade`]).
    pub(crate) upgrade_idle_timeout: Duration,
    /// What `consistent_hash` hashes (`hash_key`), if set.
    pub(crate) hash_key: Option<hash_key::HashKey>,
}

/// Routes of every listener plus the upstreams: one immutable value swapped
/// whole on reload.
#[derive(Debug, Default)]
pub(crate) struct Routing {
    listeners: NameMap<ListenerConfig>,
    upstreams: HashMap<String, Arc<Upstream>>,
    /// The same upstreams as each worker's request clones them: an `Arc`
    /// per worker slot, so the clone and drop of every request write a
    /// reference count no other worker writes.
    routed: NameMap<PerWorker<Arc<Upstream>>>,
    /// Per-request rules of each HTTP listener (per worker, as `routed`).
    http: NameMap<PerWorker<Arc<HttpListener>>>,
}

/// A map looked up on every request by a name from the config (listener,
/// service) or an instance id: FNV, not std's SipHash (three lookups a
/// request took ~650 instructions, `bench/instructions.sh`). The keys come
/// from the config and discovery, never from a client, so there is no
/// flooding to defend against.
pub(crate) type NameMap<V, K = String> = HashMap<K, V, fnv::FnvBuildHasher>;

/// What a request holds of its upstream (its worker's copy of the `Arc`).
pub(crate) type RoutedUpstream = Arc<Aligned<Arc<Upstream>>>;

/// An HTTP listener's per-request rules, resolved once per config.
#[derive(Debug, Default)]
pub(crate) struct HttpListener {
    /// Whose forwarding headers are kept; whether `Forwarded` is set.
    pub(crate) forwarding: headers::Forwarding,
    /// The access log, when the listener has `access_log = true`.
    pub(crate) access_log: Option<access_log::AccessLog>,
}

impl Routing {
    /// Builds routing for `config`; `upstreams` must hold every service.
    pub(crate) fn new(config: &Config, upstreams: HashMap<String, Arc<Upstream>>) -> Self {
        let routed = upstreams
            .iter()
            .map(|(name, up)| (name.clone(), PerWorker::new(up.clone())))
            .collect();
        Self {
            listeners: config
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.clone()))
                .collect(),
            upstreams,
            routed,
            http: NameMap::default(),
        }
        .with_access_log(None)
    }

    /// The per-request rules of each HTTP listener, with `log` for those
    /// that have `access_log = true`.
    pub(crate) fn with_access_log(mut self, log: Option<access_log::AccessLog>) -> Self {
        self.http = self
            .listeners
            .values()
            .map(|l| {
                let rules = HttpListener {
                    forwarding: headers::Forwarding {
                        trusted_proxies: l.trusted_proxies.clone(),
                        forwarded_header: l.forwarded_header,
                    },
                    access_log: log.clone().filter(|_| l.access_log),
                };
                (l.name.clone(), PerWorker::new(Arc::new(rules)))
            })
            .collect();
        self
    }

    /// The per-request rules of HTTP listener `listener`.
    pub(crate) fn http_listener(&self, listener: &str) -> Option<&Arc<Aligned<Arc<HttpListener>>>> {
        self.http.get(listener).map(PerWorker::local)
    }

    /// The upstream for a request to `listener` with `host` and `path`.
    pub(crate) fn route(
        &self,
        listener: &str,
        host: Option<&str>,
        path: &str,
    ) -> Option<&RoutedUpstream> {
        let l = self.listeners.get(listener)?;
        let r = matching_route(&l.routes, host, path)?;
        self.routed.get(&r.service).map(PerWorker::local)
    }

    /// The upstream of service `name` (a reload keeps an unchanged one,
    /// with its connection pools).
    pub(crate) fn upstream_of(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.get(name)
    }

    /// The upstream of a TCP listener.
    pub(crate) fn tcp_upstream(&self, listener: &str) -> Option<&Arc<Upstream>> {
        let l = self.listeners.get(listener)?;
        self.upstreams.get(l.service.as_deref()?)
    }

    /// A `tcp` listener with `sni_route`s: how long to wait for the
    /// ClientHello (its `header_read_timeout`); `None` for any other.
    pub(crate) fn passthrough(&self, listener: &str) -> Option<std::time::Duration> {
        let l = self.listeners.get(listener)?;
        (!l.sni_routes.is_empty()).then_some(l.limits.header_read_timeout)
    }

    /// The upstream of a passthrough listener for a ClientHello naming
    /// `server_name` (see `sni.rs`): its route's service, else the
    /// listener's default `service`.
    pub(crate) fn sni_upstream(
        &self,
        listener: &str,
        server_name: Option<&str>,
    ) -> Option<&Arc<Upstream>> {
        let l = self.listeners.get(listener)?;
        let service = sni::route(&l.sni_routes, server_name).or(l.service.as_deref())?;
        self.upstreams.get(service)
    }
}

/// The first route that matches, in file order: its host (if it names one)
/// equals the request's host without its port, in any letter case, and the
/// path starts with its prefix. A route that names a host never matches a
/// request without one.
fn matching_route<'a>(routes: &'a [Route], host: Option<&str>, path: &str) -> Option<&'a Route> {
    let host = host.map(strip_port);
    routes.iter().find(|r| {
        let host_ok = match (&r.host, host) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            (Some(_), None) => false,
        };
        host_ok && path.starts_with(&r.path_prefix)
    })
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split(']')
            .next()
            .map_or(host, |h| h)
            .trim_start_matches('[');
    }
    host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str, service: &str) -> Route {
        Route {
            host: host.map(str::to_owned),
            path_prefix: prefix.to_owned(),
            service: service.to_owned(),
        }
    }

    /// The service each (host, path) request is routed to, in order.
    fn routed(routes: &[Route], requests: &[(Option<&str>, &str)]) -> Vec<Option<String>> {
        requests
            .iter()
            .map(|(h, p)| matching_route(routes, *h, p).map(|r| r.service.clone()))
            .collect()
    }

    #[test]
    fn the_first_matching_route_wins_by_host_then_path_prefix() {
        let routes = [
            route(Some("api.example"), "/v2", "api-v2"),
            route(Some("api.example"), "/", "api"),
            route(None, "/static", "static"),
            route(None, "/", "web"),
        ];
        let got = routed(
            &routes,
            &[
                (Some("api.example"), "/v2/users"),
                (Some("API.Example:8080"), "/v2"),
                (Some("api.example"), "/v1/users"),
                (Some("api.example"), "/static/a.css"),
                (Some("other.example"), "/static/a.css"),
                (Some("other.example"), "/v2/users"),
                (None, "/v2/users"),
                (Some("[::1]:80"), "/"),
            ],
        );
        let want = [
            "api-v2", "api-v2", "api", "api", "static", "web", "web", "web",
        ];
        assert_eq!(got, want.map(|s| Some(s.to_owned())));
    }

    #[test]
    fn no_route_matches_when_host_and_prefix_both_must() {
        let routes = [
            route(Some("api.example"), "/", "api"),
            route(None, "/v1/", "v1"),
        ];
        let got = routed(
            &routes,
            &[
                (None, "/"),
                (Some("api.example.org"), "/"),
                (Some("other"), "/v1"),
                (Some("other"), "/v1/x"),
            ],
        );
        assert_eq!(got, [None, None, None, Some("v1".to_owned())]);
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("api.example:8080"), "api.example");
        assert_eq!(strip_port("api.example"), "api.example");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
