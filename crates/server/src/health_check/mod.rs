//! Active health checks: `http` (GET `path`, with the `host` header if set,
//! must answer one of `expected_statuses`, default 2xx) and `tcp` (connect),
//! per service `interval` and `timeout`, feeding the same core health model
//! as real traffic (`Registry::report_outcome`), so rise and fall follow
//! `recovery_threshold` and `error_threshold`. There are no separate
//! healthy/unhealthy probe thresholds: one breaker judges an instance, so
//! probes and requests cannot disagree about it.
//!
//! ## Schedule
//!
//! - **Spread**: each instance's first probe waits a random fraction of the
//!   interval, so N instances are not probed at once.
//! - **Backoff**: after `k` consecutive failed probes an instance is next
//!   probed after `interval × 2^k`, capped at `backoff_max` (default 8 ×
//!   interval, at most 60 s), with ±20 % jitter. A dead instance costs
//!   little; a recovered one is found within the cap, so the cap is the
//!   operator's trade between probe load and time to notice recovery.
//! - **Bound**: at most [`MAX_IN_FLIGHT`] probes run at once across all
//!   services.
//!
//! Each service's checker reads the current member list every tick, so
//! instances added at runtime are probed too.
//!
//! An `http` probe speaks the service's `upstream_protocol`: HTTP/2 with
//! prior knowledge for `h2c`, HTTP/1.1 for `http1` and `auto` (what every
//! client can send), so a check passes exactly when real traffic could.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use datapunk_lb_core::{FailureKind, Outcome, Registry};
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use crate::config::{Config, HealthCheck, HealthCheckKind, UpstreamProtocol};
use crate::metrics::Metrics;

/// Probes in flight at once, across all services.
pub(crate) const MAX_IN_FLIGHT: usize = 64;

/// The running checkers; dropping it stops them.
#[derive(Debug, Default)]
pub(crate) struct HealthChecker {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// When to probe an instance next after `fails` consecutive failures.
pub(crate) fn next_delay(check: &HealthCheck, fails: u32, jitter: f64) -> Duration {
    let base = if fails == 0 {
        check.interval
    } else {
        let factor = 2u32.saturating_pow(fails.min(31));
        check
            .interval
            .saturating_mul(factor)
            .min(check.backoff_max.max(check.interval))
    };
    // ±20 % jitter, so probes of many instances drift apart.
    base.mul_f64(0.8 + 0.4 * jitter.clamp(0.0, 1.0))
}

impl HealthChecker {
    /// Starts a checker per service of `config` that has a check.
    pub(crate) fn start(registry: Arc<Registry>, config: &Config, metrics: Arc<Metrics>) -> Self {
        let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_max_idle_per_host(0); // a probe should test a fresh connection
        let h1: Client<HttpConnector, Empty<Bytes>> = builder.build(conn.clone());
        let h2: Client<HttpConnector, Empty<Bytes>> = builder.http2_only(true).build(conn);
        let tasks = config
            .services
            .iter()
            .filter(|(_, s)| s.health_check.kind != HealthCheckKind::None)
            .map(|(name, s)| {
                tokio::spawn(run_service(
                    registry.clone(),
                    metrics.clone(),
                    name.clone(),
                    s.health_check.clone(),
                    limit.clone(),
                    if s.upstream_protocol == UpstreamProtocol::H2c {
                        h2.clone()
                    } else {
                        h1.clone()
                    },
                ))
            })
            .collect();
        Self { tasks }
    }
}

struct ProbeState {
    next_at: Instant,
    fails: u32,
    in_flight: bool,
}

async fn run_service(
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    service: String,
    check: HealthCheck,
    limit: Arc<Semaphore>,
    client: Client<HttpConnector, Empty<Bytes>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, bool)>();
    let mut states: HashMap<String, ProbeState> = HashMap::new();
    let tick = (check.interval / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
    loop {
        while let Ok((id, ok)) = rx.try_recv() {
            if let Some(st) = states.get_mut(&id) {
                st.in_flight = false;
                st.fails = if ok { 0 } else { st.fails.saturating_add(1) };
                st.next_at = Instant::now() + next_delay(&check, st.fails, fastrand::f64());
            }
        }
        let Some(svc) = registry.service(&service) else {
            tokio::time::sleep(tick).await;
            continue;
        };
        let members = svc.members();
        let now = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for m in members.iter() {
            let inst = m.instance();
            let id = inst.id().as_str();
            seen.insert(id.to_owned());
            let st = states.entry(id.to_owned()).or_insert_with(|| ProbeState {
                next_at: now + check.interval.mul_f64(fastrand::f64()),
                fails: 0,
                in_flight: false,
            });
            if st.in_flight || st.next_at > now {
                continue;
            }
            st.in_flight = true;
            let (registry, metrics, service, id) = (
                registry.clone(),
                metrics.clone(),
                service.clone(),
                id.to_owned(),
            );
            let (addr, port) = (inst.address().to_owned(), inst.port());
            let (check, limit, client, tx) =
                (check.clone(), limit.clone(), client.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = limit.acquire().await;
                let started = Instant::now();
                let ok = probe(&check, &client, &addr, port).await;
                let outcome = if ok {
                    Outcome::Success(started.elapsed())
                } else {
                    Outcome::Failure(FailureKind::HealthCheck)
                };
                debug!(
                    service = service.as_str(),
                    instance = id.as_str(),
                    ok,
                    "health check"
                );
                metrics.health_check(&service, ok);
                if let Ok(events) = registry.report_outcome(&service, &id, outcome) {
                    metrics.report(events);
                }
                let _ = tx.send((id, ok));
            });
        }
        states.retain(|id, _| seen.contains(id));
        tokio::time::sleep(tick).await;
    }
}

async fn probe(
    check: &HealthCheck,
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: &str,
    port: u16,
) -> bool {
    let authority = if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    };
    match &check.kind {
        HealthCheckKind::None => true,
        HealthCheckKind::Tcp => matches!(
            tokio::time::timeout(check.timeout, tokio::net::TcpStream::connect(authority)).await,
            Ok(Ok(_))
        ),
        HealthCheckKind::Http {
            path,
            host,
            expected,
        } => {
            let Ok(uri) = format!("http://{authority}{path}").parse::<http::Uri>() else {
                return false;
            };
            let mut req = http::Request::get(uri);
            if let Some(host) = host {
                req = req.header(http::header::HOST, host.as_str());
            }
            let Ok(req) = req.body(Empty::new()) else {
                return false;
            };
            match tokio::time::timeout(check.timeout, client.request(req)).await {
                Ok(Ok(resp)) => expected.contains(resp.status().as_u16()),
                _ => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let check = HealthCheck {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            backoff_max: HealthCheck::default_backoff_max(Duration::from_secs(1)),
        };
        assert_eq!(next_delay(&check, 0, 0.5), Duration::from_secs(1));
        assert_eq!(next_delay(&check, 1, 0.5), Duration::from_secs(2));
        assert_eq!(next_delay(&check, 2, 0.5), Duration::from_secs(4));
        assert_eq!(next_delay(&check, 3, 0.5), Duration::from_secs(8));
        assert_eq!(
            next_delay(&check, 10, 0.5),
            Duration::from_secs(8),
            "capped at 8 × interval"
        );
        assert_eq!(next_delay(&check, 3, 0.0), Duration::from_secs_f64(6.4));
        assert_eq!(next_delay(&check, 3, 1.0), Duration::from_secs_f64(9.6));
    }

    #[test]
    fn backoff_max_caps_the_backoff() {
        let check = HealthCheck {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            backoff_max: Duration::from_secs(3),
        };
        assert_eq!(next_delay(&check, 1, 0.5), Duration::from_secs(2));
        assert_eq!(
            next_delay(&check, 2, 0.5),
            Duration::from_secs(3),
            "4 s capped"
        );
        assert_eq!(next_delay(&check, 40, 0.5), Duration::from_secs(3));
        let long = HealthCheck {
            backoff_max: Duration::from_secs(600),
            ..check
        };
        assert_eq!(
            next_delay(&long, 9, 0.5),
            Duration::from_secs(512),
            "no hidden 60 s cap"
        );
    }

    /// One HTTP exchange on a real socket: answers `status`, hands back the
    /// request head it read.
    async fn one_response(status: u16) -> (u16, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            let resp =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            sock.write_all(resp.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&head).to_ascii_lowercase()
        });
        (port, task)
    }

    #[tokio::test]
    async fn http_probe_sends_the_host_and_accepts_the_expected_statuses() {
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        let check = |host: Option<&str>, expected: &[&str]| HealthCheck {
            kind: HealthCheckKind::Http {
                path: "/ready".to_owned(),
                host: host.map(str::to_owned),
                expected: crate::config::ExpectedStatuses::parse(expected.iter().copied()).unwrap(),
            },
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            backoff_max: Duration::from_secs(40),
        };
        for (status, expected, want) in [
            (204, &["200-299"][..], true),
            (503, &["200-299"][..], false),
            (503, &["200", "500-503"][..], true),
            (301, &["200-299"][..], false),
            (301, &["200-399"][..], true),
        ] {
            let (port, head) = one_response(status).await;
            let ok = probe(
                &check(Some("api.internal"), expected),
                &client,
                "127.0.0.1",
                port,
            )
            .await;
            assert_eq!(ok, want, "{status} against {expected:?}");
            let head = head.await.unwrap();
            assert!(head.starts_with("get /ready http/1.1"), "{head}");
            assert!(head.contains("host: api.internal\r\n"), "{head}");
        }
        let (port, head) = one_response(200).await;
        assert!(probe(&check(None, &["200"]), &client, "127.0.0.1", port).await);
        let head = head.await.unwrap();
        assert!(
            head.contains(&format!("host: 127.0.0.1:{port}\r\n")),
            "default Host is the instance: {head}"
        );
    }
}
