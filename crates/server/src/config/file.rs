//! The config file as written: strict serde structs (`deny_unknown_fields`),
//! with `Spanned` values wherever validation needs to point at a line.
//!
//! Nothing here is checked beyond TOML types; `Config::from_file`
//! turns a [`FileConfig`] into validated domain types.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub drain_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub admin: Option<FileAdmin>,
    #[serde(default)]
    pub listener: Vec<FileListener>,
    #[serde(default)]
    pub service: BTreeMap<String, Spanned<FileService>>,
    pub discovery: Option<FileDiscovery>,
    /// Where listeners with `access_log = true` write: `"stdout"` or a path.
    pub access_log_path: Option<Spanned<String>>,
    /// The probe budget across all services' health checks, probes/s.
    pub health_check_max_probes_per_second: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub listen: Option<Spanned<String>>,
    pub token_file: Option<String>,
    pub token_env: Option<String>,
    pub state_file: Option<String>,
    pub metrics_auth: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDiscovery {
    pub kind: Spanned<String>,
    pub endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    pub prefix: Option<Spanned<String>>,
    /// TLS to etcd (`config/etcd_tls.rs`).
    pub ca_file: Option<Spanned<String>>,
    pub cert_file: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub name: Spanned<String>,
    pub listen: Spanned<String>,
    pub protocol: Option<Spanned<String>>,
    /// For `protocol = "tcp"`: the service every connection goes to.
    pub service: Option<Spanned<String>>,
    #[serde(default)]
    pub route: Vec<FileRoute>,
    /// Client-side limits (`proxy/client_limits.rs`).
    pub header_read_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub request_body_timeout: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
    /// HTTP: CIDRs whose forwarding headers are kept and appended to.
    pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
    /// HTTP: also set the RFC 7239 `Forwarded` header.
    pub forwarded_header: Option<Spanned<bool>>,
    /// HTTP: one access log line per request.
    pub access_log: Option<Spanned<bool>>,
    /// `https` / `tls`: termination settings (`config/tls.rs`).
    pub tls: Option<super::tls::FileTls>,
    /// `tcp`: TLS passthrough routes by SNI (`config/sni.rs`).
    #[serde(default)]
    pub sni_route: Vec<super::sni::FileSniRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub host: Option<String>,
    pub path_prefix: Option<Spanned<String>>,
    pub service: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileService {
    pub strategy: Option<Spanned<String>>,
    /// What `consistent_hash` hashes: `"header:NAME"`, `"cookie:NAME"`,
    /// `"client_ip"`, `"path"`, `"query:NAME"`.
    pub hash_key: Option<Spanned<String>>,
    pub error_threshold: Option<Spanned<i64>>,
    pub recovery_threshold: Option<Spanned<i64>>,
    pub min_healthy_percent: Option<Spanned<i64>>,
    pub slow_start: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub request_timeout: Option<Spanned<String>>,
    pub upgrade_idle_timeout: Option<Spanned<String>>,
    pub per_try_timeout: Option<Spanned<String>>,
    pub response_idle_timeout: Option<Spanned<String>>,
    pub retries: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub retry_budget_percent: Option<Spanned<i64>>,
    pub retry_budget_min_per_second: Option<Spanned<i64>>,
    pub metrics_enabled: Option<bool>,
    pub upstream_protocol: Option<Spanned<String>>,
    pub host_header: Option<Spanned<String>>,
    pub metrics_instance_series_limit: Option<Spanned<i64>>,
    pub max_idle_connections: Option<Spanned<i64>>,
    pub breaker: Option<FileBreaker>,
    pub adaptive: Option<FileAdaptive>,
    pub health_check: Option<FileHealthCheck>,
    #[serde(default)]
    pub instance: Vec<Spanned<FileInstance>>,
    /// `[service.X.tls]`: TLS to the instances (`config/upstream_tls.rs`).
    pub tls: Option<Spanned<super::upstream_tls::FileUpstreamTls>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    pub kind: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub backoff_max: Option<Spanned<String>>,
    /// Status codes or ranges: `"200"`, `"200-399"`.
    pub expected_statuses: Option<Spanned<Vec<Spanned<String>>>>,
    pub host: Option<Spanned<String>>,
}

/// `[service.NAME.breaker]`: the breaker's windows and rate rule
/// (`error_threshold` / `recovery_threshold` stay in `[service.NAME]`).
/// `[service.NAME.adaptive]`: the `adaptive` strategy's thresholds and
/// periods (the rule is in the core's `strategy::adaptive`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdaptive {
    pub eval_interval: Option<Spanned<String>>,
    pub min_dwell: Option<Spanned<String>>,
    pub spread_enter: Option<Spanned<f64>>,
    pub spread_leave: Option<Spanned<f64>>,
    pub error_rate_enter: Option<Spanned<f64>>,
    pub error_rate_leave: Option<Spanned<f64>>,
    pub concurrency_enter: Option<Spanned<f64>>,
    pub concurrency_leave: Option<Spanned<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBreaker {
    pub open_base: Option<Spanned<String>>,
    pub open_max: Option<Spanned<String>>,
    pub open_jitter: Option<Spanned<f64>>,
    pub failure_rate: Option<Spanned<f64>>,
    pub failure_rate_window: Option<Spanned<String>>,
    pub min_requests: Option<Spanned<i64>>,
    pub half_open_probes: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInstance {
    pub id: Spanned<String>,
    pub address: Spanned<String>,
    pub port: Spanned<i64>,
    pub weight: Option<Spanned<i64>>,
    pub zone: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}
