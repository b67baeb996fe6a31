//! Configuration: the TOML file of SPEC §3, parsed strictly
//! ([`file`](mod@file)) and validated into the domain types below.
//!
//! `datapunk-lb check`, start-up and SIGHUP reload all go through
//! [`Config::load`] / [`Config::parse`], so a file that `check` accepts is
//! exactly one that `run` and reload accept, and a rejected reload changes
//! nothing. Every error names the key and its line.
//!
//! ## Defaults (every field but listeners, routes and services has one)
//!
//! | key | default |
//! | --- | --- |
//! | `drain_timeout` | 30 s |
//! | `health_check_max_probes_per_second` | 2,000 (above it every interval stretches evenly) |
//! | `admin.listen` | `127.0.0.1:9901` |
//! | `listener.protocol` | `http` |
//! | `listener.tls.min_version` / `client_auth` | `1.2` / `none` (see `tls.rs`) |
//! | `listener.header_read_timeout` / `idle_timeout` / `request_body_timeout` | 10 s / 60 s / 30 s |
//! | `listener.max_connections` | 100,000 |
//! | `route.path_prefix` | `/` |
//! | `service.strategy` | `adaptive` |
//! | `service.hash_key` | none (required by `consistent_hash`) |
//! | `service.error_threshold` / `recovery_threshold` | 3 / 2 |
//! | `service.min_healthy_percent` | 50 |
//! | `service.slow_start` | 10 s |
//! | `service.connect_timeout` / `request_timeout` | 1 s / 30 s |
//! | `service.upgrade_idle_timeout` | 1 h |
//! | `service.per_try_timeout` | none (only `request_timeout`) |
//! | `service.response_idle_timeout` | 5 min |
//! | `service.retries` | 2 |
//! | `service.max_connections` | 10,000 per instance |
//! | `service.metrics_enabled` | true |
//! | `service.upstream_protocol` / `host_header` | `http1` / `preserve` |
//! | `service.tls` | none: plain TCP (see `upstream_tls.rs` for its keys' defaults) |
//! | `service.metrics_instance_series_limit` | 1,000 (above it: aggregates, see `metrics.rs`) |
//! | `service.max_idle_connections` | 1,024 idle upstream connections, all instances together |
//! | `health_check.kind` | `http` (`tcp`, `none`) |
//! | `health_check.path` / `interval` / `timeout` | `/health` / 5 s / 1 s |
//! | `health_check.backoff_max` | 8 × interval, at most 60 s (never below the interval) |
//! | `health_check.expected_statuses` / `host` | `["200-299"]` / the instance's `address:port` |
//! | `service.retry_budget_percent` / `retry_budget_min_per_second` | 20 / 10 |
//! | `breaker.open_base` / `open_max` / `open_jitter` | 5 s / 120 s / 0.2 |
//! | `breaker.failure_rate` / `failure_rate_window` / `min_requests` | 0.5 / 10 s / 20 |
//! | `breaker.half_open_probes` | 1 |
//! | `instance.weight` | 1 |
//! | `discovery.kind` | `static` (`etcd`) |
//! | `discovery.prefix` | `/datapunk/services/` |
//! | `listener.trusted_proxies` | none (`[]`): every peer's forwarding headers are replaced |
//! | `listener.forwarded_header` / `access_log` | false / false |
//! | `access_log_path` | `stdout` |
//!
//! The balancing defaults (thresholds, the breaker table,
//! `min_healthy_percent`, `slow_start`, the instance id limit) are the
//! core's, used here rather than retyped; the server-only ones are the
//! `DEFAULT_*` constants below.
//!
//! `docs/configuration.md` is the operator's reference for every key; a
//! test derives the key set from [`file`](mod@file) with [`keys::all`] and
//! fails when the reference misses one, so add the row with the field.

#[cfg(test)]
mod adaptive_tests;
pub mod cidr;
pub mod etcd_tls;
pub mod file;
#[cfg(test)]
mod forwarding_tests;
pub mod keys;
#[cfg(test)]
mod knobs_tests;
#[cfg(test)]
mod limits_tests;
pub mod sni;
pub mod tls;
pub mod upstream_tls;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use datapunk_lb_core::config::{
    DEFAULT_ERROR_THRESHOLD, DEFAULT_MIN_HEALTHY_PERCENT, DEFAULT_RECOVERY_THRESHOLD,
};
use datapunk_lb_core::{
    AdaptiveConfig, BreakerConfig, LoadBalancerConfig, ServiceInstance, StrategyKind, Weight,
};
use toml::Spanned;

pub use self::cidr::Cidr;
pub use self::etcd_tls::{check_etcd, etcd_url, EtcdField, EtcdIssue, EtcdSettings, EtcdTls};
use self::file::{FileConfig, FileService};
pub use self::sni::SniRoute;
pub use self::tls::{ClientAuth, TlsCertificate, TlsListenerConfig, TlsVersion};
pub use self::upstream_tls::{ClientCertFiles, UpstreamTlsConfig};
pub use crate::proxy::hash_key::HashKey;

/// Default drain timeout: 30 s.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default admin listen address: `127.0.0.1:9901`.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9901));
/// Default connect timeout: 1 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default request timeout: 30 s.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default idle timeout of an upgraded (WebSocket) connection: 1 h, as
/// common proxies allow long-lived quiet sockets.
pub const DEFAULT_UPGRADE_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default longest pause inside a response body: 5 min (Envoy's
/// `stream_idle_timeout`; long polls and event streams pause for minutes).
pub const DEFAULT_RESPONSE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time to receive a request head once it began: 10 s.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client connection may sit with no request: 60 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default longest wait between request body chunks: 30 s.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default client connections per listener: 100,000 (see
/// `proxy/client_limits.rs` for why).
pub const DEFAULT_LISTENER_MAX_CONNECTIONS: u32 = 100_000;
/// Default retries to another instance: 2.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default per-instance connection limit: 10,000.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Default active health check interval: 5 s.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Default active health check timeout: 1 s.
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Default health check path.
pub const DEFAULT_HEALTH_PATH: &str = "/health";
/// Default etcd key prefix: instances live at `{prefix}{service}/{id}`.
pub const DEFAULT_ETCD_PREFIX: &str = "/datapunk/services/";
/// Default health check backoff cap, as a multiple of the interval: 8.
pub const DEFAULT_BACKOFF_FACTOR: u32 = 8;
/// Default health check backoff cap, absolute: 60 s (never below the interval).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Default share of first attempts that may be retried: 20 %.
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;
/// Default retries per second allowed regardless of traffic: 10.
pub const DEFAULT_RETRY_BUDGET_MIN_PER_SECOND: u32 = 10;
/// Default `health_check_max_probes_per_second`: ~10 % of a core at the
/// measured per-probe cost (see `docs/benchmarks.md`), 10,000 instances
/// at a 5 s interval.
pub const DEFAULT_MAX_PROBES_PER_SECOND: u32 = 2_000;

/// Default `metrics_instance_series_limit`: ~10 series per instance, so a
/// service at the limit adds ~10,000 series, what one Prometheus holds
/// comfortably per target.
pub const DEFAULT_METRICS_INSTANCE_SERIES_LIMIT: usize = 1_000;

/// Default `max_idle_connections`: idle upstream connections kept across
/// all of a service's instances. Envoy's default connection limit per
/// cluster; well under the 20,000 file descriptors a process commonly gets
/// and a single NGINX's 8,192 connections.
pub const DEFAULT_MAX_IDLE_CONNECTIONS: usize = 1_024;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    /// The admin endpoint.
    pub admin: AdminConfig,
    /// Listeners, in file order.
    pub listeners: Vec<ListenerConfig>,
    /// Services by name.
    pub services: BTreeMap<String, ServiceConfig>,
    /// Where instances come from besides the config and the admin API.
    pub discovery: DiscoveryConfig,
    /// Where listeners with `access_log = true` write.
    pub access_log_path: AccessLogPath,
    /// Health-check probes per second across all services; above it every
    /// interval is stretched by the same factor.
    pub health_check_max_probes_per_second: u32,
}

/// `access_log_path`: standard output (`"stdout"`, the default) or a file,
/// opened for append.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AccessLogPath {
    /// The process's standard output.
    #[default]
    Stdout,
    /// A file, appended to; reopened on every reload (SIGHUP), so log
    /// rotation is: rename the file, then SIGHUP.
    File(std::path::PathBuf),
}

impl fmt::Display for AccessLogPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessLogPath::Stdout => f.write_str("stdout"),
            AccessLogPath::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// `[discovery]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DiscoveryConfig {
    /// The config's instances and the admin API only (the default).
    #[default]
    Static,
    /// Instances under a prefix in etcd, watched (see [`crate::discovery`]).
    Etcd(EtcdConfig),
}

/// `[discovery] kind = "etcd"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, normalised to `http://host:port` or `https://host:port`
    /// (all one scheme); never empty.
    pub endpoints: Vec<String>,
    /// Key prefix, ending with `/`.
    pub prefix: String,
    /// TLS to etcd (`ca_file`, `cert_file`, `key_file`; see `etcd_tls.rs`):
    /// set exactly when the endpoints are `https`.
    pub tls: Option<EtcdTls>,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Where the admin API listens.
    pub listen: SocketAddr,
    /// File holding the bearer token.
    pub token_file: Option<String>,
    /// Environment variable holding the bearer token.
    pub token_env: Option<String>,
    /// Where dynamic state is kept across restarts.
    pub state_file: Option<String>,
    /// Whether `/metrics` needs the token.
    pub metrics_auth: bool,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 and HTTP/2 (h2c with prior knowledge) on one port.
    Http,
    /// Raw TCP: bytes both ways.
    Tcp,
}

/// `[[listener]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    /// Name, unique among listeners.
    pub name: String,
    /// Address to bind (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Protocol.
    pub protocol: Protocol,
    /// HTTP routes, first match wins.
    pub routes: Vec<Route>,
    /// TCP: the service.
    pub service: Option<String>,
    /// Client-side timeouts and the connection limit.
    pub limits: ClientLimits,
    /// HTTP: peers whose forwarding headers are kept (appended to).
    pub trusted_proxies: Vec<Cidr>,
    /// HTTP: also set the RFC 7239 `Forwarded` header.
    pub forwarded_header: bool,
    /// HTTP: one access log line per request.
    pub access_log: bool,
    /// `https` (an `Http` listener) / `tls` (a `Tcp` listener): TLS
    /// termination.
    pub tls: Option<TlsListenerConfig>,
    /// `tcp`: TLS passthrough routes by SNI (`sni.rs`); `service` is then
    /// the default, optional.
    pub sni_routes: Vec<SniRoute>,
}

/// The client-side limits of a `[[listener]]` (the rules are in
/// `proxy/client_limits.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// A request head must be complete this long after its first byte
    /// (HTTP/1.x). Default 10 s.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    /// Default 60 s.
    pub idle_timeout: Duration,
    /// Longest wait between two chunks of a request body. Default 30 s.
    pub request_body_timeout: Duration,
    /// Open client connections at most; above it a new one is closed at
    /// once. Default 100,000.
    pub max_connections: u32,
}

/// `[[listener.route]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Host to match (without port), case-insensitive; any if `None`.
    pub host: Option<String>,
    /// Path prefix to match.
    pub path_prefix: String,
    /// Service the request goes to.
    pub service: String,
}

/// `[service.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Balancing and health rules for the core.
    pub balancing: LoadBalancerConfig,
    /// What `consistent_hash` hashes; required by it, ignored by the others.
    pub hash_key: Option<HashKey>,
    /// Whether `/metrics` reports this service (`metrics_enabled`).
    pub metrics_enabled: bool,
    /// Most instances for which `/metrics` exports per-instance series;
    /// above it, aggregates and the worst few (see `crate::metrics`).
    pub metrics_instance_series_limit: usize,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout (to response headers).
    pub request_timeout: Duration,
    /// An upgraded connection with no byte either way for this long is closed.
    pub upgrade_idle_timeout: Duration,
    /// Timeout of one attempt (to response headers); `None`: only
    /// `request_timeout` bounds it.
    pub per_try_timeout: Option<Duration>,
    /// Longest pause inside a response body before it is cut.
    pub response_idle_timeout: Duration,
    /// Retries to a different instance.
    pub retries: u32,
    /// Per-instance connection limit.
    pub max_connections: u32,
    /// How many retries the service may add to its upstream load.
    pub retry_budget: RetryBudgetConfig,
    /// Active health check.
    pub health_check: HealthCheck,
    /// Static instances, sorted by id (the file's order is not kept: `check`
    /// lists them by id too).
    pub instances: Vec<ServiceInstance>,
    /// The HTTP version requests go out with (`upstream_protocol`).
    pub upstream_protocol: UpstreamProtocol,
    /// The Host the instance sees (`host_header`).
    pub host_header: HostHeader,
    /// TLS to the instances (`[service.X.tls]`); `None`: plain TCP.
    pub tls: Option<UpstreamTlsConfig>,
    /// Idle upstream connections kept across all instances
    /// (`max_idle_connections`; see `proxy/pool.rs`).
    pub max_idle_connections: usize,
}

/// `upstream_protocol`: the HTTP version spoken to the instances. The
/// default, `http1`, is what every HTTP backend speaks (HAProxy's and
/// NGINX's default too); gRPC needs `h2c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    /// HTTP/1.1, whatever the client spoke.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (cleartext), whatever the client spoke.
    H2c,
    /// The client's version.
    Auto,
}

impl UpstreamProtocol {
    /// Its name in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::Auto => "auto",
        }
    }
}

/// `host_header`: the Host (HTTP/1.1) or `:authority` (HTTP/2) the
/// instance sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostHeader {
    /// The client's, as it sent it (virtual hosts keep working).
    #[default]
    Preserve,
    /// The instance's `address:port`.
    Instance,
}

impl HostHeader {
    /// Its name in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            HostHeader::Preserve => "preserve",
            HostHeader::Instance => "instance",
        }
    }
}

/// `retry_budget_percent` and `retry_budget_min_per_second` of a service
/// (the rule is in `proxy/retry.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryBudgetConfig {
    /// Retries allowed per 100 first attempts (0..=100). Default 20.
    pub percent: u32,
    /// Retries per second allowed regardless of traffic (0..=10,000).
    /// Default 10.
    pub min_per_second: u32,
}

/// HTTP status codes a health probe accepts: inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedStatuses(Vec<(u16, u16)>);

/// How instances are actively checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// `GET path` must answer one of `expected` (default 2xx).
    Http {
        /// Request path.
        path: String,
        /// Host header; the instance's `address:port` if `None`.
        host: Option<String>,
        /// Statuses that count as healthy.
        expected: ExpectedStatuses,
    },
    /// A TCP connect must succeed.
    Tcp,
    /// No active checks (passive only).
    None,
}

/// `[service.NAME.health_check]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Kind.
    pub kind: HealthCheckKind,
    /// Period for a healthy instance.
    pub interval: Duration,
    /// Per-probe timeout.
    pub timeout: Duration,
    /// Cap on the backoff after failed probes (nominal; ±20 % jitter).
    pub backoff_max: Duration,
}

/// One problem in a config file, with the key and line it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The key, dotted (`service.api.instance[1].port`).
    pub key: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// Why a config file was rejected: every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigIssue>);

// === impl ConfigIssue / ConfigErrors ===

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

// === impl RetryBudgetConfig ===

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            percent: DEFAULT_RETRY_BUDGET_PERCENT,
            min_per_second: DEFAULT_RETRY_BUDGET_MIN_PER_SECOND,
        }
    }
}

// === impl ExpectedStatuses ===

impl Default for ExpectedStatuses {
    /// 2xx, what `is_success` accepts.
    fn default() -> Self {
        Self(vec![(200, 299)])
    }
}

impl ExpectedStatuses {
    /// Parses `"200"` or `"200-399"` items; codes must lie in 100..=599.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for item in items {
            let code = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|c| (100..=599).contains(c))
                    .ok_or_else(|| {
                        format!(
                            "{item:?}: expected a status code in 100..=599 or a range \"200-399\""
                        )
                    })
            };
            let (lo, hi) = match item.split_once('-') {
                Some((lo, hi)) => (code(lo)?, code(hi)?),
                None => {
                    let c = code(item)?;
                    (c, c)
                }
            };
            if lo > hi {
                return Err(format!("{item:?}: range runs backwards"));
            }
            ranges.push((lo, hi));
        }
        if ranges.is_empty() {
            return Err("must not be empty".to_owned());
        }
        Ok(Self(ranges))
    }

    /// Whether `status` counts as healthy.
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&status))
    }
}

impl fmt::Display for ExpectedStatuses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

// === impl HealthCheck ===

impl HealthCheck {
    /// Today's backoff cap for `interval`: 8 × the interval, at most 60 s,
    /// never below the interval itself.
    pub fn default_backoff_max(interval: Duration) -> Duration {
        interval
            .saturating_mul(DEFAULT_BACKOFF_FACTOR)
            .min(DEFAULT_BACKOFF_MAX)
            .max(interval)
    }

    /// Checks that both periods are positive and a probe ends before the
    /// next is due; the error names the bad key (`interval`, `timeout`).
    fn check_timing(&self) -> Result<(), (&'static str, String)> {
        if self.interval.is_zero() {
            return Err(("interval", "must be greater than 0".to_owned()));
        }
        if self.timeout.is_zero() {
            return Err(("timeout", "must be greater than 0".to_owned()));
        }
        if self.timeout > self.interval {
            return Err((
                "timeout",
                format!(
                    "{:?} is longer than the interval {:?}",
                    self.timeout, self.interval
                ),
            ));
        }
        if self.backoff_max < self.interval {
            return Err((
                "backoff_max",
                format!(
                    "{:?} is shorter than the interval {:?}",
                    self.backoff_max, self.interval
                ),
            ));
        }
        Ok(())
    }
}

// === impl Config ===

/// Collects issues while validating, with the source for line numbers.
struct Checker<'a> {
    src: &'a str,
    issues: Vec<ConfigIssue>,
}

impl Checker<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.src
            .get(..offset.min(self.src.len()))
            .map_or(0, |s| s.bytes().filter(|b| *b == b'\n').count())
            + 1
    }

    fn issue<T>(&mut self, key: impl Into<String>, at: &Spanned<T>, message: impl Into<String>) {
        let line = Some(self.line_of(at.span().start));
        self.issues.push(ConfigIssue {
            key: key.into(),
            line,
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, v: &Option<Spanned<String>>, default: Duration) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) => d,
            Err(e) => {
                self.issue(key, v, format!("invalid duration {:?}: {e}", v.get_ref()));
                default
            }
        }
    }

    /// One of `options` by its name (`name`); `default` when absent. An
    /// unknown name is an issue that lists the accepted ones.
    fn choice<T: Copy>(
        &mut self,
        key: &str,
        v: &Option<Spanned<String>>,
        (default, options): (T, &[T]),
        name: fn(T) -> &'static str,
    ) -> T {
        let Some(v) = v else { return default };
        if let Some(&o) = options.iter().find(|o| name(**o) == v.get_ref()) {
            return o;
        }
        let names: Vec<String> = options.iter().map(|o| format!("{:?}", name(*o))).collect();
        self.issue(
            key,
            v,
            format!("{:?} is not one of {}", v.get_ref(), names.join(", ")),
        );
        default
    }

    /// A float in `lo..hi` (or `lo..=hi` when `hi_inclusive`), exclusive
    /// of `lo` when `lo_exclusive`.
    fn fraction(
        &mut self,
        key: &str,
        v: &Option<Spanned<f64>>,
        (lo, lo_exclusive): (f64, bool),
        (hi, hi_inclusive): (f64, bool),
        default: f64,
    ) -> f64 {
        let Some(v) = v else { return default };
        let x = *v.get_ref();
        let above = if lo_exclusive { x > lo } else { x >= lo };
        let below = if hi_inclusive { x <= hi } else { x < hi };
        if x.is_finite() && above && below {
            x
        } else {
            let (open, close) = (
                if lo_exclusive { '(' } else { '[' },
                if hi_inclusive { ']' } else { ')' },
            );
            self.issue(
                key,
                v,
                format!("must be in {open}{lo}, {hi}{close}, got {x}"),
            );
            default
        }
    }

    /// A duration that must be greater than 0.
    fn positive_duration(
        &mut self,
        key: &str,
        v: &Option<Spanned<String>>,
        default: Duration,
    ) -> Duration {
        let d = self.duration(key, v, default);
        match v {
            Some(v) if d.is_zero() => {
                self.issue(key, v, "must be greater than 0");
                default
            }
            _ => d,
        }
    }

    fn int(
        &mut self,
        key: &str,
        v: &Option<Spanned<i64>>,
        range: std::ops::RangeInclusive<i64>,
        default: i64,
    ) -> i64 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if range.contains(&n) {
            n
        } else {
            self.issue(
                key,
                v,
                format!("must be in {}..={}, got {n}", range.start(), range.end()),
            );
            default
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let src = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigIssue {
                key: path.display().to_string(),
                line: None,
                message: format!("cannot read: {e}"),
            }])
        })?;
        Self::parse(&src)
    }

    /// Parses and validates config text.
    pub fn parse(src: &str) -> Result<Config, ConfigErrors> {
        let file: FileConfig = toml::from_str(src).map_err(|e| {
            let line = e.span().map(|s| {
                src.get(..s.start.min(src.len()))
                    .map_or(0, |p| p.bytes().filter(|b| *b == b'\n').count())
                    + 1
            });
            let message = e.message().to_owned();
            // serde names the unknown key in its message; point at it.
            let key = message
                .split('`')
                .nth(1)
                .filter(|_| {
                    message.starts_with("unknown field") || message.starts_with("missing field")
                })
                .unwrap_or("toml")
                .to_owned();
            ConfigErrors(vec![ConfigIssue { key, line, message }])
        })?;
        let mut ck = Checker {
            src,
            issues: Vec::new(),
        };
        let config = Self::from_file(file, &mut ck);
        if ck.issues.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(ck.issues))
        }
    }

    fn from_file(file: FileConfig, ck: &mut Checker<'_>) -> Config {
        let drain_timeout =
            ck.duration("drain_timeout", &file.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        let admin = admin(file.admin, ck);
        let discovery = file
            .discovery
            .as_ref()
            .map_or(DiscoveryConfig::Static, |d| discovery(d, ck));

        let mut services = BTreeMap::new();
        for (name, svc) in &file.service {
            if let Some(cfg) = service(name, svc, ck) {
                services.insert(name.clone(), cfg);
            }
        }

        let mut listeners = Vec::new();
        let mut names = HashSet::new();
        for (i, l) in file.listener.iter().enumerate() {
            let key = format!("listener[{i}]");
            if !names.insert(l.name.get_ref().clone()) {
                ck.issue(
                    format!("{key}.name"),
                    &l.name,
                    format!("duplicate listener name {:?}", l.name.get_ref()),
                );
            }
            let listen = match l.listen.get_ref().parse::<SocketAddr>() {
                Ok(a) => a,
                Err(_) => {
                    ck.issue(
                        format!("{key}.listen"),
                        &l.listen,
                        format!("{:?} is not an address:port", l.listen.get_ref()),
                    );
                    SocketAddr::from(([127, 0, 0, 1], 0))
                }
            };
            let protocol = match l.protocol.as_ref().map(|p| p.get_ref().as_str()) {
                None | Some("http" | "https") => Protocol::Http,
                Some("tcp" | "tls") => Protocol::Tcp,
                Some(other) => {
                    if let Some(p) = &l.protocol {
                        ck.issue(
                            format!("{key}.protocol"),
                            p,
                            format!("unknown protocol {other:?}; expected \"http\", \"https\", \"tcp\" or \"tls\""),
                        );
                    }
                    Protocol::Http
                }
            };
            let tls_protocol = matches!(
                l.protocol.as_ref().map(|p| p.get_ref().as_str()),
                Some("https" | "tls")
            );
            let tls = tls::listener_tls(&key, &l.name, tls_protocol, l.tls.as_ref(), ck);
            let known = |ck: &mut Checker<'_>, k: String, s: &Spanned<String>| {
                if !file.service.contains_key(s.get_ref()) {
                    ck.issue(
                        k,
                        s,
                        format!("route to undefined service {:?}", s.get_ref()),
                    );
                }
            };
            let mut routes = Vec::new();
            let mut service = None;
            let mut sni_routes = Vec::new();
            if protocol == Protocol::Http {
                // Refused with its key; the tcp arm checks them.
                sni::sni_routes(&key, &l.name, false, &l.sni_route, ck, |_, _, _| {});
            }
            match protocol {
                Protocol::Http => {
                    if let Some(s) = &l.service {
                        ck.issue(
                            format!("{key}.service"),
                            s,
                            "an http listener routes with [[listener.route]], not service",
                        );
                    }
                    if l.route.is_empty() {
                        ck.issue(
                            format!("{key}.route"),
                            &l.name,
                            "an http listener needs at least one [[listener.route]]",
                        );
                    }
                    for (j, r) in l.route.iter().enumerate() {
                        let rk = format!("{key}.route[{j}]");
                        known(ck, format!("{rk}.service"), &r.service);
                        let path_prefix = match &r.path_prefix {
                            Some(p) if !p.get_ref().starts_with('/') => {
                                ck.issue(format!("{rk}.path_prefix"), p, "must start with '/'");
                                "/".to_owned()
                            }
                            Some(p) => p.get_ref().clone(),
                            None => "/".to_owned(),
                        };
                        routes.push(Route {
                            host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                            path_prefix,
                            service: r.service.get_ref().clone(),
                        });
                    }
                }
                Protocol::Tcp => {
                    let tcp = matches!(
                        l.protocol.as_ref().map(|p| p.get_ref().as_str()),
                        Some("tcp")
                    );
                    sni_routes =
                        sni::sni_routes(&key, &l.name, tcp, &l.sni_route, ck, |ck, k, s| {
                            known(ck, k, s);
                            tcp_hash_key(ck, &file.service, s.get_ref(), &l.name);
                        });
                    if !l.route.is_empty() {
                        ck.issue(
                            format!("{key}.route"),
                            &l.name,
                            "a tcp listener takes service = \"…\", not routes",
                        );
                    }
                    match &l.service {
                        Some(s) => {
                            known(ck, format!("{key}.service"), s);
                            tcp_hash_key(ck, &file.service, s.get_ref(), &l.name);
                            service = Some(s.get_ref().clone());
                        }
                        // With SNI routes the default service is optional.
                        None if !sni_routes.is_empty() => {}
                        None => ck.issue(
                            format!("{key}.service"),
                            &l.name,
                            "a tcp listener needs service = \"…\" (or [[listener.sni_route]])",
                        ),
                    }
                }
            }
            let limits = client_limits(&key, l, protocol, ck);
            let (trusted_proxies, forwarded_header, access_log) =
                listener_http_keys(&key, l, protocol, ck);
            listeners.push(ListenerConfig {
                name: l.name.get_ref().clone(),
                listen,
                protocol,
                routes,
                service,
                limits,
                trusted_proxies,
                forwarded_header,
                access_log,
                tls,
                sni_routes,
            });
        }
        if listeners.is_empty() {
            ck.issues.push(ConfigIssue {
                key: "listener".into(),
                line: None,
                message: "at least one [[listener]] is required".into(),
            });
        }
        let access_log_path = match &file.access_log_path {
            None => AccessLogPath::Stdout,
            Some(p) if p.get_ref() == "stdout" => AccessLogPath::Stdout,
            Some(p) if p.get_ref().is_empty() => {
                ck.issue(
                    "access_log_path",
                    p,
                    "must be \"stdout\" or a file path, not empty",
                );
                AccessLogPath::Stdout
            }
            Some(p) => AccessLogPath::File(p.get_ref().into()),
        };
        let health_check_max_probes_per_second = ck.int(
            "health_check_max_probes_per_second",
            &file.health_check_max_probes_per_second,
            1..=1_000_000,
            i64::from(DEFAULT_MAX_PROBES_PER_SECOND),
        ) as u32;
        Config {
            drain_timeout,
            admin,
            listeners,
            services,
            discovery,
            access_log_path,
            health_check_max_probes_per_second,
        }
    }

    /// A human-readable summary, for `check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "drain_timeout: {}",
            humantime::format_duration(self.drain_timeout)
        );
        let _ = writeln!(
            s,
            "health_check_max_probes_per_second: {}",
            self.health_check_max_probes_per_second
        );
        let _ = writeln!(s, "admin: {}", self.admin.listen);
        match &self.discovery {
            DiscoveryConfig::Static => {
                let _ = writeln!(s, "discovery: static");
            }
            DiscoveryConfig::Etcd(e) => {
                let _ = writeln!(
                    s,
                    "discovery: etcd {} prefix {}{}",
                    e.endpoints.join(","),
                    e.prefix,
                    e.tls.as_ref().map_or_else(String::new, |t| format!(
                        " (tls: ca {}{})",
                        t.ca_file.display(),
                        t.client.as_ref().map_or_else(String::new, |(c, _)| format!(
                            ", client certificate {}",
                            c.display()
                        ))
                    ))
                );
            }
        }
        for l in &self.listeners {
            match l.protocol {
                Protocol::Http => {
                    let what = if l.tls.is_some() {
                        "https: http/1.1 + h2 by ALPN"
                    } else {
                        "http/1.1 + h2c"
                    };
                    let _ = writeln!(s, "listener {} on {} ({what})", l.name, l.listen);
                    let d = humantime::format_duration;
                    let _ = writeln!(
                        s,
                        "  header_read_timeout {}, idle_timeout {}, request_body_timeout {}, max_connections {}",
                        d(l.limits.header_read_timeout),
                        d(l.limits.idle_timeout),
                        d(l.limits.request_body_timeout),
                        l.limits.max_connections
                    );
                    let trusted: Vec<String> =
                        l.trusted_proxies.iter().map(Cidr::to_string).collect();
                    let _ = writeln!(
                        s,
                        "  trusted_proxies [{}], forwarded_header {}, access_log {}",
                        trusted.join(", "),
                        l.forwarded_header,
                        if l.access_log {
                            self.access_log_path.to_string()
                        } else {
                            "off".to_owned()
                        }
                    );
                    for r in &l.routes {
                        let _ = writeln!(
                            s,
                            "  route host={} path_prefix={} -> {}",
                            r.host.as_deref().unwrap_or("*"),
                            r.path_prefix,
                            r.service
                        );
                    }
                }
                Protocol::Tcp => {
                    let _ = writeln!(
                        s,
                        "listener {} on {} ({}) -> {}",
                        l.name,
                        l.listen,
                        if l.tls.is_some() { "tls" } else { "tcp" },
                        l.service.as_deref().unwrap_or(if l.sni_routes.is_empty() {
                            "?"
                        } else {
                            "(no default: closed)"
                        })
                    );
                    let _ = writeln!(s, "  max_connections {}", l.limits.max_connections);
                    for r in &l.sni_routes {
                        let _ =
                            writeln!(s, "  sni [{}] -> {}", r.server_names.join(", "), r.service);
                    }
                }
            }
            if let Some(t) = &l.tls {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                t.write_summary(&mut s, now);
            }
        }
        for (name, svc) in &self.services {
            let hc = match &svc.health_check.kind {
                HealthCheckKind::Http { path, .. } => format!("http {path}"),
                HealthCheckKind::Tcp => "tcp".into(),
                HealthCheckKind::None => "none".into(),
            };
            let _ = writeln!(
                s,
                "service {name}: strategy {}, {} instance(s), health check {hc} every {}, retries {}, timeouts connect {} / request {}",
                svc.balancing.strategy,
                svc.instances.len(),
                humantime::format_duration(svc.health_check.interval),
                svc.retries,
                humantime::format_duration(svc.connect_timeout),
                humantime::format_duration(svc.request_timeout),
            );
            if let Some(k) = &svc.hash_key {
                let _ = writeln!(s, "  hash_key {k}");
            }
            svc.write_knobs(&mut s);
            for i in &svc.instances {
                let _ = writeln!(
                    s,
                    "  instance {} {}:{} weight {}",
                    i.id(),
                    i.address(),
                    i.port(),
                    i.weight().get()
                );
            }
        }
        s
    }
}

/// The client-side limits of listener `key` (`listener[i]`); the three
/// timeouts are HTTP-only, `max_connections` applies to both protocols.
fn client_limits(
    key: &str,
    l: &file::FileListener,
    protocol: Protocol,
    ck: &mut Checker<'_>,
) -> ClientLimits {
    let timeouts = [
        ("header_read_timeout", &l.header_read_timeout),
        ("idle_timeout", &l.idle_timeout),
        ("request_body_timeout", &l.request_body_timeout),
    ];
    if protocol == Protocol::Tcp {
        for (k, v) in timeouts {
            // A passthrough listener waits for the ClientHello this long,
            // a `tls` listener for the handshake.
            let hello = k == "header_read_timeout" && (!l.sni_route.is_empty() || l.tls.is_some());
            if let (Some(v), false) = (v, hello) {
                ck.issue(format!("{key}.{k}"), v, "only for an http listener");
            }
        }
    }
    let [header_read_timeout, idle_timeout, request_body_timeout] = [
        (timeouts[0], DEFAULT_HEADER_READ_TIMEOUT),
        (timeouts[1], DEFAULT_IDLE_TIMEOUT),
        (timeouts[2], DEFAULT_REQUEST_BODY_TIMEOUT),
    ]
    .map(|((k, v), default)| ck.positive_duration(&format!("{key}.{k}"), v, default));
    ClientLimits {
        header_read_timeout,
        idle_timeout,
        request_body_timeout,
        max_connections: ck.int(
            &format!("{key}.max_connections"),
            &l.max_connections,
            1..=1_000_000,
            i64::from(DEFAULT_LISTENER_MAX_CONNECTIONS),
        ) as u32,
    }
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_body_timeout: DEFAULT_REQUEST_BODY_TIMEOUT,
            max_connections: DEFAULT_LISTENER_MAX_CONNECTIONS,
        }
    }
}

/// A service behind a TCP listener can hash on `client_ip` only: a stream
/// has no headers, cookies, path or query. Reported at the `hash_key` line.
fn tcp_hash_key(
    ck: &mut Checker<'_>,
    services: &BTreeMap<String, Spanned<FileService>>,
    service: &str,
    listener: &Spanned<String>,
) {
    let Some(spec) = services
        .get(service)
        .and_then(|s| s.get_ref().hash_key.as_ref())
    else {
        return;
    };
    if HashKey::parse(spec.get_ref()).is_ok_and(|k| !k.fits_tcp()) {
        ck.issue(
            format!("service.{service}.hash_key"),
            spec,
            format!(
                "{:?} cannot be read from a TCP stream, and service {service:?} is behind tcp listener {:?}: only \"client_ip\" works there",
                spec.get_ref(),
                listener.get_ref()
            ),
        );
    }
}

/// A listener's forwarding and access log keys: `trusted_proxies`,
/// `forwarded_header`, `access_log`. HTTP only: a TCP listener carries no
/// headers and logs no requests, so it refuses them.
fn listener_http_keys(
    key: &str,
    l: &file::FileListener,
    protocol: Protocol,
    ck: &mut Checker<'_>,
) -> (Vec<Cidr>, bool, bool) {
    if protocol == Protocol::Tcp {
        const HTTP_ONLY: &str = "only an http listener takes this key";
        if let Some(v) = &l.trusted_proxies {
            ck.issue(format!("{key}.trusted_proxies"), v, HTTP_ONLY);
        }
        if let Some(v) = &l.forwarded_header {
            ck.issue(format!("{key}.forwarded_header"), v, HTTP_ONLY);
        }
        if let Some(v) = &l.access_log {
            ck.issue(format!("{key}.access_log"), v, HTTP_ONLY);
        }
        return (Vec::new(), false, false);
    }
    let mut trusted = Vec::new();
    for (i, c) in l
        .trusted_proxies
        .iter()
        .flat_map(|t| t.get_ref())
        .enumerate()
    {
        match c.get_ref().trim().parse::<Cidr>() {
            Ok(n) => trusted.push(n),
            Err(e) => ck.issue(
                format!("{key}.trusted_proxies[{i}]"),
                c,
                format!("{:?}: {e}", c.get_ref()),
            ),
        }
    }
    let flag = |b: &Option<Spanned<bool>>| b.as_ref().is_some_and(|b| *b.get_ref());
    (trusted, flag(&l.forwarded_header), flag(&l.access_log))
}

fn discovery(d: &file::FileDiscovery, ck: &mut Checker<'_>) -> DiscoveryConfig {
    match d.kind.get_ref().as_str() {
        "static" => {
            if let Some(e) = &d.endpoints {
                ck.issue("discovery.endpoints", e, "only for kind = \"etcd\"");
            }
            if let Some(p) = &d.prefix {
                ck.issue("discovery.prefix", p, "only for kind = \"etcd\"");
            }
            for (key, f) in [
                ("ca_file", &d.ca_file),
                ("cert_file", &d.cert_file),
                ("key_file", &d.key_file),
            ] {
                if let Some(f) = f {
                    ck.issue(format!("discovery.{key}"), f, "only for kind = \"etcd\"");
                }
            }
            DiscoveryConfig::Static
        }
        "etcd" if !cfg!(feature = "etcd") => {
            ck.issue(
                "discovery.kind",
                &d.kind,
                "this build of datapunk-lb lacks etcd support (built without the `etcd` cargo feature)",
            );
            DiscoveryConfig::Static
        }
        "etcd" => {
            let (endpoints, tls) = etcd_connection(d, ck);
            let prefix = match &d.prefix {
                None => DEFAULT_ETCD_PREFIX.to_owned(),
                Some(p) if !p.get_ref().ends_with('/') || p.get_ref().len() < 2 => {
                    ck.issue(
                        "discovery.prefix",
                        p,
                        format!(
                            "{:?} must end with '/' (e.g. \"{DEFAULT_ETCD_PREFIX}\")",
                            p.get_ref()
                        ),
                    );
                    DEFAULT_ETCD_PREFIX.to_owned()
                }
                Some(p) => p.get_ref().clone(),
            };
            DiscoveryConfig::Etcd(EtcdConfig {
                endpoints,
                prefix,
                tls,
            })
        }
        other => {
            ck.issue(
                "discovery.kind",
                &d.kind,
                format!("unknown kind {other:?}; expected \"static\" or \"etcd\""),
            );
            DiscoveryConfig::Static
        }
    }
}

/// The endpoints and TLS settings of `[discovery] kind = "etcd"`, checked
/// by the rule of `etcd_tls.rs`; each problem names its key.
fn etcd_connection(
    d: &file::FileDiscovery,
    ck: &mut Checker<'_>,
) -> (Vec<String>, Option<EtcdTls>) {
    let written: Vec<&Spanned<String>> = match &d.endpoints {
        None => {
            ck.issue(
                "discovery.endpoints",
                &d.kind,
                "missing: kind = \"etcd\" needs endpoints = [\"host:port\", ...]",
            );
            return (Vec::new(), None);
        }
        Some(list) if list.get_ref().is_empty() => {
            ck.issue("discovery.endpoints", list, "must not be empty");
            return (Vec::new(), None);
        }
        Some(list) => list.get_ref().iter().collect(),
    };
    let endpoints: Vec<&str> = written.iter().map(|e| e.get_ref().as_str()).collect();
    fn file(f: &Option<Spanned<String>>) -> Option<&str> {
        f.as_ref().map(|f| f.get_ref().as_str())
    }
    let settings = EtcdSettings {
        endpoints: &endpoints,
        ca_file: file(&d.ca_file),
        cert_file: file(&d.cert_file),
        key_file: file(&d.key_file),
    };
    match check_etcd(&settings) {
        Ok(ok) => ok,
        Err(issues) => {
            for i in issues {
                let (key, at) = match i.field {
                    EtcdField::Endpoint(n) => (
                        format!("discovery.endpoints[{n}]"),
                        written.get(n).copied().unwrap_or(&d.kind),
                    ),
                    EtcdField::CaFile => (
                        "discovery.ca_file".into(),
                        d.ca_file.as_ref().unwrap_or(&d.kind),
                    ),
                    EtcdField::CertFile => (
                        "discovery.cert_file".into(),
                        d.cert_file.as_ref().unwrap_or(&d.kind),
                    ),
                    EtcdField::KeyFile => (
                        "discovery.key_file".into(),
                        d.key_file.as_ref().unwrap_or(&d.kind),
                    ),
                };
                ck.issue(key, at, i.message);
            }
            (Vec::new(), None)
        }
    }
}

fn admin(a: Option<file::FileAdmin>, ck: &mut Checker<'_>) -> AdminConfig {
    let default_listen = DEFAULT_ADMIN_LISTEN;
    let Some(a) = a else {
        return AdminConfig {
            listen: default_listen,
            token_file: None,
            token_env: None,
            state_file: None,
            metrics_auth: false,
        };
    };
    let listen = match &a.listen {
        None => default_listen,
        Some(l) => l.get_ref().parse().unwrap_or_else(|_| {
            ck.issue(
                "admin.listen",
                l,
                format!("{:?} is not an address:port", l.get_ref()),
            );
            default_listen
        }),
    };
    if !listen.ip().is_loopback() && a.token_file.is_none() && a.token_env.is_none() {
        if let Some(l) = &a.listen {
            ck.issue(
                "admin.listen",
                l,
                format!("{listen} is not a loopback address: set admin.token_file or admin.token_env, or the admin API (which can change instances) would be open to the network"),
            );
        }
    }
    AdminConfig {
        listen,
        token_file: a.token_file,
        token_env: a.token_env,
        state_file: a.state_file,
        metrics_auth: a.metrics_auth.unwrap_or(false),
    }
}

fn service(
    name: &str,
    spanned: &Spanned<FileService>,
    ck: &mut Checker<'_>,
) -> Option<ServiceConfig> {
    let s = spanned.get_ref();
    let key = format!("service.{name}");
    let before = ck.issues.len();
    if name.is_empty() {
        ck.issue(key.clone(), spanned, "service name must not be empty");
    }
    let mut lb = LoadBalancerConfig::default();
    if let Some(st) = &s.strategy {
        match st.get_ref().parse::<StrategyKind>() {
            Ok(k) => lb.strategy = k,
            Err(e) => ck.issue(format!("{key}.strategy"), st, e.to_string()),
        }
    }
    let hash_key = match &s.hash_key {
        Some(spec) => HashKey::parse(spec.get_ref())
            .map_err(|why| ck.issue(format!("{key}.hash_key"), spec, why))
            .ok(),
        None => None,
    };
    if lb.strategy == StrategyKind::ConsistentHash && s.hash_key.is_none() {
        if let Some(st) = &s.strategy {
            ck.issue(
                format!("{key}.hash_key"),
                st,
                "missing: strategy = \"consistent_hash\" needs hash_key = \"header:NAME\", \"cookie:NAME\", \"client_ip\", \"path\" or \"query:NAME\"",
            );
        }
    }
    lb.breaker.error_threshold = ck.int(
        &format!("{key}.error_threshold"),
        &s.error_threshold,
        1..=1000,
        i64::from(DEFAULT_ERROR_THRESHOLD),
    ) as u32;
    lb.breaker.recovery_threshold = ck.int(
        &format!("{key}.recovery_threshold"),
        &s.recovery_threshold,
        1..=1000,
        i64::from(DEFAULT_RECOVERY_THRESHOLD),
    ) as u32;
    lb.min_healthy_percent = ck.int(
        &format!("{key}.min_healthy_percent"),
        &s.min_healthy_percent,
        0..=100,
        i64::from(DEFAULT_MIN_HEALTHY_PERCENT),
    ) as u8;
    lb.slow_start = ck.duration(&format!("{key}.slow_start"), &s.slow_start, lb.slow_start);
    let metrics_enabled = s.metrics_enabled.unwrap_or(true);
    let upstream_protocol = ck.choice(
        &format!("{key}.upstream_protocol"),
        &s.upstream_protocol,
        (
            UpstreamProtocol::Http1,
            &[
                UpstreamProtocol::Http1,
                UpstreamProtocol::H2c,
                UpstreamProtocol::Auto,
            ],
        ),
        UpstreamProtocol::as_str,
    );
    let host_header = ck.choice(
        &format!("{key}.host_header"),
        &s.host_header,
        (
            HostHeader::Preserve,
            &[HostHeader::Preserve, HostHeader::Instance],
        ),
        HostHeader::as_str,
    );
    let metrics_instance_series_limit = ck.int(
        &format!("{key}.metrics_instance_series_limit"),
        &s.metrics_instance_series_limit,
        0..=10_000_000,
        DEFAULT_METRICS_INSTANCE_SERIES_LIMIT as i64,
    ) as usize;
    let max_idle_connections = ck.int(
        &format!("{key}.max_idle_connections"),
        &s.max_idle_connections,
        0..=1_000_000,
        DEFAULT_MAX_IDLE_CONNECTIONS as i64,
    ) as usize;
    let connect_timeout = ck.duration(
        &format!("{key}.connect_timeout"),
        &s.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    );
    let request_timeout = ck.duration(
        &format!("{key}.request_timeout"),
        &s.request_timeout,
        DEFAULT_REQUEST_TIMEOUT,
    );
    let upgrade_idle_timeout = ck.duration(
        &format!("{key}.upgrade_idle_timeout"),
        &s.upgrade_idle_timeout,
        DEFAULT_UPGRADE_IDLE_TIMEOUT,
    );
    for (k, d, v) in [
        ("connect_timeout", connect_timeout, &s.connect_timeout),
        ("request_timeout", request_timeout, &s.request_timeout),
        (
            "upgrade_idle_timeout",
            upgrade_idle_timeout,
            &s.upgrade_idle_timeout,
        ),
    ] {
        if d.is_zero() {
            if let Some(v) = v {
                ck.issue(format!("{key}.{k}"), v, "must be greater than 0");
            }
        }
    }
    let per_try_timeout = s.per_try_timeout.as_ref().map(|v| {
        let k = format!("{key}.per_try_timeout");
        let d = ck.duration(&k, &Some(v.clone()), request_timeout);
        if d.is_zero() {
            ck.issue(k, v, "must be greater than 0");
        }
        d
    });
    let response_idle_timeout = ck.positive_duration(
        &format!("{key}.response_idle_timeout"),
        &s.response_idle_timeout,
        DEFAULT_RESPONSE_IDLE_TIMEOUT,
    );
    let retries = ck.int(
        &format!("{key}.retries"),
        &s.retries,
        0..=10,
        i64::from(DEFAULT_RETRIES),
    ) as u32;
    let max_connections = ck.int(
        &format!("{key}.max_connections"),
        &s.max_connections,
        1..=10_000_000,
        i64::from(DEFAULT_MAX_CONNECTIONS),
    ) as u32;
    let retry_budget = RetryBudgetConfig {
        percent: ck.int(
            &format!("{key}.retry_budget_percent"),
            &s.retry_budget_percent,
            0..=100,
            i64::from(DEFAULT_RETRY_BUDGET_PERCENT),
        ) as u32,
        min_per_second: ck.int(
            &format!("{key}.retry_budget_min_per_second"),
            &s.retry_budget_min_per_second,
            0..=10_000,
            i64::from(DEFAULT_RETRY_BUDGET_MIN_PER_SECOND),
        ) as u32,
    };
    if let Some(b) = &s.breaker {
        breaker(&format!("{key}.breaker"), b, &mut lb.breaker, ck);
    }
    if let Some(a) = &s.adaptive {
        adaptive(&format!("{key}.adaptive"), a, &mut lb.adaptive, ck);
    }
    if ck.issues.len() == before {
        // Backstop: the core's own rule, should a check above miss one.
        if let Err(e) = lb.validate() {
            ck.issue(format!("{key}.{}", e.field), spanned, e.to_string());
        }
    }

    let hk = format!("{key}.health_check");
    let mut health_check = HealthCheck {
        kind: HealthCheckKind::Http {
            path: DEFAULT_HEALTH_PATH.to_owned(),
            host: None,
            expected: ExpectedStatuses::default(),
        },
        interval: DEFAULT_HEALTH_CHECK_INTERVAL,
        timeout: DEFAULT_HEALTH_CHECK_TIMEOUT,
        backoff_max: HealthCheck::default_backoff_max(DEFAULT_HEALTH_CHECK_INTERVAL),
    };
    if let Some(h) = &s.health_check {
        let path = match &h.path {
            Some(p) if !p.get_ref().starts_with('/') => {
                ck.issue(format!("{hk}.path"), p, "must start with '/'");
                DEFAULT_HEALTH_PATH.to_owned()
            }
            Some(p) => p.get_ref().clone(),
            None => DEFAULT_HEALTH_PATH.to_owned(),
        };
        let is_http = matches!(
            h.kind.as_ref().map(|k| k.get_ref().as_str()),
            None | Some("http")
        );
        let expected = match &h.expected_statuses {
            None => ExpectedStatuses::default(),
            Some(list) => {
                ExpectedStatuses::parse(list.get_ref().iter().map(|i| i.get_ref().as_str()))
                    .unwrap_or_else(|why| {
                        ck.issue(format!("{hk}.expected_statuses"), list, why);
                        ExpectedStatuses::default()
                    })
            }
        };
        let host = match &h.host {
            Some(v)
                if http::HeaderValue::from_str(v.get_ref()).is_err()
                    || v.get_ref().is_empty()
                    || v.get_ref().contains(char::is_whitespace) =>
            {
                ck.issue(
                    format!("{hk}.host"),
                    v,
                    format!("{:?} is not a valid Host header value", v.get_ref()),
                );
                None
            }
            Some(v) => Some(v.get_ref().clone()),
            None => None,
        };
        if !is_http {
            for (k, at) in [
                (
                    "expected_statuses",
                    h.expected_statuses.as_ref().map(|v| v.span()),
                ),
                ("host", h.host.as_ref().map(|v| v.span())),
            ] {
                if let Some(at) = at {
                    let line = Some(ck.line_of(at.start));
                    ck.issues.push(ConfigIssue {
                        key: format!("{hk}.{k}"),
                        line,
                        message: "only for kind = \"http\"".to_owned(),
                    });
                }
            }
        }
        health_check.kind = match h.kind.as_ref().map(|k| k.get_ref().as_str()) {
            None | Some("http") => HealthCheckKind::Http {
                path,
                host,
                expected,
            },
            Some("tcp") => HealthCheckKind::Tcp,
            Some("none") => HealthCheckKind::None,
            Some(other) => {
                if let Some(k) = &h.kind {
                    ck.issue(
                        format!("{hk}.kind"),
                        k,
                        format!("unknown kind {other:?}; expected \"http\", \"tcp\" or \"none\""),
                    );
                }
                HealthCheckKind::None
            }
        };
        health_check.interval = ck.duration(
            &format!("{hk}.interval"),
            &h.interval,
            health_check.interval,
        );
        health_check.timeout =
            ck.duration(&format!("{hk}.timeout"), &h.timeout, health_check.timeout);
        health_check.backoff_max = ck.duration(
            &format!("{hk}.backoff_max"),
            &h.backoff_max,
            HealthCheck::default_backoff_max(health_check.interval),
        );
        if let Err((field, reason)) = health_check.check_timing() {
            let at = match field {
                "backoff_max" => h.backoff_max.as_ref(),
                _ => None,
            }
            .or(h.timeout.as_ref())
            .or(h.interval.as_ref());
            match at {
                Some(at) => ck.issue(format!("{hk}.{field}"), at, reason),
                None => ck.issue(format!("{hk}.{field}"), spanned, reason),
            }
        }
    }

    // Exactly as many slots as instances: the control task keeps this list
    // between reloads (as its config layer), so growth slack would be kept
    // too (~25 B per instance at 100,000).
    let mut instances = Vec::with_capacity(s.instance.len());
    let mut ids = HashSet::new();
    for (i, inst) in s.instance.iter().enumerate() {
        let ik = format!("{key}.instance[{i}]");
        let f = inst.get_ref();
        if !ids.insert(f.id.get_ref().clone()) {
            ck.issue(
                format!("{ik}.id"),
                &f.id,
                format!("duplicate instance id {:?}", f.id.get_ref()),
            );
            continue;
        }
        let port = *f.port.get_ref();
        if !(1..=65535).contains(&port) {
            ck.issue(
                format!("{ik}.port"),
                &f.port,
                format!("must be in 1..=65535, got {port}"),
            );
            continue;
        }
        let mut built =
            match ServiceInstance::try_new(f.id.get_ref(), f.address.get_ref(), port as u16) {
                Ok(b) => b,
                Err(e) => {
                    // Port was checked above: the fault is the id or the address.
                    let (field, at) = match e.field() {
                        "id" => ("id", &f.id),
                        _ => ("address", &f.address),
                    };
                    ck.issue(format!("{ik}.{field}"), at, e.to_string());
                    continue;
                }
            };
        if let Some(w) = &f.weight {
            match u64::try_from(*w.get_ref())
                .map_err(|_| ())
                .and_then(|w| Weight::try_new(w).map_err(|_| ()))
            {
                Ok(w) => built = built.with_weight(w),
                Err(()) => {
                    ck.issue(
                        format!("{ik}.weight"),
                        w,
                        format!("must be in 1..=1000, got {}", w.get_ref()),
                    );
                    continue;
                }
            }
        }
        if let Some(z) = &f.zone {
            built = built.with_zone(z.as_str());
        }
        if !f.tags.is_empty() {
            built = built.with_tags(f.tags.iter().map(String::as_str));
        }
        instances.push(built);
    }
    // By id: the control task finds an instance by binary search and diffs
    // two lists in one merge pass, with no index beside the list.
    instances.sort_unstable_by(|a, b| a.id().cmp(b.id()));
    let tls = s
        .tls
        .as_ref()
        .and_then(|t| upstream_tls::service_tls(&key, t, upstream_protocol, ck));
    if ck.issues.len() > before {
        return None;
    }
    Some(ServiceConfig {
        balancing: lb,
        hash_key,
        metrics_enabled,
        metrics_instance_series_limit,
        connect_timeout,
        request_timeout,
        upgrade_idle_timeout,
        per_try_timeout,
        response_idle_timeout,
        retries,
        max_connections,
        retry_budget,
        health_check,
        instances,
        upstream_protocol,
        host_header,
        tls,
        max_idle_connections,
    })
}

// === impl ServiceConfig ===

impl ServiceConfig {
    /// Every tunable value in effect, defaults included, under the file's
    /// key names: what `check` prints below each service.
    fn write_knobs(&self, s: &mut String) {
        use std::fmt::Write;
        let d = humantime::format_duration;
        let lb = &self.balancing;
        let b = &lb.breaker;
        let hc = &self.health_check;
        let _ = writeln!(
            s,
            "  min_healthy_percent {}, slow_start {}, max_connections {}, metrics_enabled {}, retry_budget_percent {}, retry_budget_min_per_second {}, upstream_protocol {}, host_header {}, metrics_instance_series_limit {}",
            lb.min_healthy_percent,
            d(lb.slow_start),
            self.max_connections,
            self.metrics_enabled,
            self.retry_budget.percent,
            self.retry_budget.min_per_second,
            self.upstream_protocol.as_str(),
            self.host_header.as_str(),
            self.metrics_instance_series_limit,
        );
        let _ = writeln!(s, "  upgrade_idle_timeout {}", d(self.upgrade_idle_timeout));
        let _ = writeln!(s, "  max_idle_connections {}", self.max_idle_connections);
        let _ = writeln!(
            s,
            "  per_try_timeout {}, response_idle_timeout {}",
            self.per_try_timeout
                .map_or_else(|| "none".to_owned(), |t| d(t).to_string()),
            d(self.response_idle_timeout),
        );
        let _ = writeln!(
            s,
            "  breaker: error_threshold {}, recovery_threshold {}, open_base {}, open_max {}, open_jitter {}, failure_rate {}, failure_rate_window {}, min_requests {}, half_open_probes {}",
            b.error_threshold,
            b.recovery_threshold,
            d(b.open_base),
            d(b.open_max),
            b.open_jitter,
            b.failure_rate_threshold,
            d(b.failure_rate_window),
            b.failure_rate_min_requests,
            b.half_open_max_probes,
        );
        if lb.strategy == StrategyKind::Adaptive {
            let a = &lb.adaptive;
            let _ = writeln!(
                s,
                "  adaptive: eval_interval {}, min_dwell {}, spread_enter {}, spread_leave {}, error_rate_enter {}, error_rate_leave {}, concurrency_enter {}, concurrency_leave {}",
                d(a.eval_interval),
                d(a.min_dwell),
                a.spread_enter,
                a.spread_leave,
                a.error_rate_enter,
                a.error_rate_leave,
                a.concurrency_enter,
                a.concurrency_leave,
            );
        }
        let http = match &hc.kind {
            HealthCheckKind::Http {
                path,
                host,
                expected,
            } => format!(
                "kind http, path {path}, host {}, expected_statuses {expected}, ",
                host.as_deref().unwrap_or("(instance address:port)")
            ),
            HealthCheckKind::Tcp => "kind tcp, ".to_owned(),
            HealthCheckKind::None => "kind none, ".to_owned(),
        };
        let _ = writeln!(
            s,
            "  health_check: {http}interval {}, timeout {}, backoff_max {}",
            d(hc.interval),
            d(hc.timeout),
            d(hc.backoff_max),
        );
        if let Some(t) = &self.tls {
            t.write_summary(s);
        }
    }
}

/// `[service.NAME.adaptive]` into `a`, every problem reported at its key.
/// The ranges and pairings are the core's ([`AdaptiveConfig::problems`]);
/// a problem with a key the file leaves out (a default `min_dwell` below a
/// longer `eval_interval`) is reported at the line of its partner.
fn adaptive(key: &str, f: &file::FileAdaptive, a: &mut AdaptiveConfig, ck: &mut Checker<'_>) {
    let before = ck.issues.len();
    a.eval_interval = ck.duration(
        &format!("{key}.eval_interval"),
        &f.eval_interval,
        a.eval_interval,
    );
    a.min_dwell = ck.duration(&format!("{key}.min_dwell"), &f.min_dwell, a.min_dwell);
    let span = |v: &Option<Spanned<String>>| v.as_ref().map(Spanned::span);
    let fspan = |v: &Option<Spanned<f64>>| v.as_ref().map(Spanned::span);
    // Each key with its partner (the other end of its rule) and their places.
    let pairs = [
        (
            ("eval_interval", span(&f.eval_interval)),
            ("min_dwell", span(&f.min_dwell)),
        ),
        (
            ("spread_enter", fspan(&f.spread_enter)),
            ("spread_leave", fspan(&f.spread_leave)),
        ),
        (
            ("error_rate_enter", fspan(&f.error_rate_enter)),
            ("error_rate_leave", fspan(&f.error_rate_leave)),
        ),
        (
            ("concurrency_enter", fspan(&f.concurrency_enter)),
            ("concurrency_leave", fspan(&f.concurrency_leave)),
        ),
    ];
    for (field, v) in [
        (&mut a.spread_enter, &f.spread_enter),
        (&mut a.spread_leave, &f.spread_leave),
        (&mut a.error_rate_enter, &f.error_rate_enter),
        (&mut a.error_rate_leave, &f.error_rate_leave),
        (&mut a.concurrency_enter, &f.concurrency_enter),
        (&mut a.concurrency_leave, &f.concurrency_leave),
    ] {
        if let Some(v) = v {
            *field = *v.get_ref();
        }
    }
    if ck.issues.len() > before {
        // An unparsable duration: the pairings would be judged on a default.
        return;
    }
    for e in a.problems() {
        let at = pairs.iter().find_map(|(x, y)| match e.field {
            f if f == x.0 => x.1.clone().or_else(|| y.1.clone()),
            f if f == y.0 => y.1.clone().or_else(|| x.1.clone()),
            _ => None,
        });
        ck.issues.push(ConfigIssue {
            key: format!("{key}.{}", e.field),
            line: at.map(|at| ck.line_of(at.start)),
            message: e.reason,
        });
    }
}

/// `[service.NAME.breaker]` into `b`, every problem reported at its key.
fn breaker(key: &str, f: &file::FileBreaker, b: &mut BreakerConfig, ck: &mut Checker<'_>) {
    b.open_base = ck.duration(&format!("{key}.open_base"), &f.open_base, b.open_base);
    b.open_max = ck.duration(&format!("{key}.open_max"), &f.open_max, b.open_max);
    b.open_jitter = ck.fraction(
        &format!("{key}.open_jitter"),
        &f.open_jitter,
        (0.0, false),
        (1.0, false),
        b.open_jitter,
    );
    b.failure_rate_threshold = ck.fraction(
        &format!("{key}.failure_rate"),
        &f.failure_rate,
        (0.0, true),
        (1.0, true),
        b.failure_rate_threshold,
    );
    b.failure_rate_window = ck.duration(
        &format!("{key}.failure_rate_window"),
        &f.failure_rate_window,
        b.failure_rate_window,
    );
    b.failure_rate_min_requests = ck.int(
        &format!("{key}.min_requests"),
        &f.min_requests,
        1..=1_000_000,
        i64::from(b.failure_rate_min_requests),
    ) as u32;
    b.half_open_max_probes = ck.int(
        &format!("{key}.half_open_probes"),
        &f.half_open_probes,
        1..=1000,
        i64::from(b.half_open_max_probes),
    ) as u32;
    for (k, d, at) in [
        ("open_base", b.open_base, &f.open_base),
        (
            "failure_rate_window",
            b.failure_rate_window,
            &f.failure_rate_window,
        ),
    ] {
        if let (true, Some(at)) = (d.is_zero(), at) {
            ck.issue(format!("{key}.{k}"), at, "must be greater than 0");
        }
    }
    if b.open_max < b.open_base {
        if let Some(at) = f.open_max.as_ref().or(f.open_base.as_ref()) {
            ck.issue(
                format!("{key}.open_max"),
                at,
                format!(
                    "{} is shorter than open_base {}",
                    humantime::format_duration(b.open_max),
                    humantime::format_duration(b.open_base)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One listener routing to `api` with one instance; `[service.api]` on line 6.
    pub(super) const BASE: &str = r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
[[listener.route]]
service = "api"
[service.api]
[[service.api.instance]]
id = "api-1"
address = "127.0.0.1"
port = 9001
"#;

    fn error_of(src: &str) -> String {
        match Config::parse(src) {
            Ok(_) => panic!("accepted: {src}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_bad_instance_id_is_reported_at_its_key_and_line() {
        for (id, why) in [
            ("api/1", "'/'"),
            ("api 1", "' '"),
            ("..", "path step"),
            ("", "must not be empty"),
        ] {
            let e = error_of(&BASE.replace("\"api-1\"", &format!("{id:?}")));
            assert!(
                e.contains("line 8: service.api.instance[0].id") && e.contains(why),
                "{id:?}: {e}"
            );
        }
        let long = "x".repeat(datapunk_lb_core::instance::MAX_ID_LEN + 1);
        let e = error_of(&BASE.replace("api-1", &long));
        assert!(e.contains("line 8: service.api.instance[0].id"), "{e}");
        let e = error_of(&BASE.replace("\"127.0.0.1\"\nport", "\"\"\nport"));
        assert!(e.contains("line 9: service.api.instance[0].address"), "{e}");
    }

    /// The server-only settings that left the core's `LoadBalancerConfig`
    /// (moved here from the core's config tests).
    #[test]
    fn health_check_and_metrics_defaults_and_timing_are_the_servers() {
        let c = match Config::parse(BASE) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let api = &c.services["api"];
        assert_eq!(api.health_check.interval, Duration::from_secs(5));
        assert_eq!(api.health_check.timeout, Duration::from_secs(1));
        assert!(api.metrics_enabled);
        assert_eq!(api.balancing.breaker.error_threshold, 3);
        assert_eq!(api.balancing.breaker.recovery_threshold, 2);
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");

        let timing = |extra: &str| {
            error_of(&BASE.replace(
                "[service.api]\n",
                &format!(
                    "[service.api]\nmetrics_enabled = false\n[service.api.health_check]\n{extra}"
                ),
            ))
        };
        let e = timing("interval = \"5s\"\ntimeout = \"6s\"\n");
        assert!(
            e.contains(
                "line 10: service.api.health_check.timeout: 6s is longer than the interval 5s"
            ),
            "{e}"
        );
        let e = timing("interval = \"0s\"\n");
        assert!(
            e.contains("service.api.health_check.interval: must be greater than 0"),
            "{e}"
        );
    }
}
