//! Active health checks: `http` (GET `path`, with the `host` header if set,
//! must answer one of `expected_statuses`, default 2xx) and `tcp` (connect),
//! per service `interval` and `timeout`, feeding the same core health model
//! as real traffic (`Registry::report_outcome`), so rise and fall follow
//! `recovery_threshold` and `error_threshold`. There are no separate
//! healthy/unhealthy probe thresholds: one breaker judges an instance, so
//! probes and requests cannot disagree about it.
//!
//! ## Schedule (see [`schedule`] for the exact rule)
//!
//! - **Evenly spaced**: each service's instances are probed in turn, one per
//!   `interval / N`, so N instances are never probed at once.
//! - **Budget**: `health_check_max_probes_per_second` (default 2,000) caps
//!   the probes of all services together; when Σ(N / interval) exceeds it,
//!   every interval is stretched by the same factor. The interval in force
//!   is the gauge `datapunk_lb_health_check_interval_effective_seconds`,
//!   and while it is longer than configured a warning is logged at most
//!   once a minute. Checks that fall behind say so.
//! - **Passive first**: an instance with a successful real request since
//!   its previous turn is not probed: real traffic already judged it
//!   (Linkerd relies on passive health the same way). Probes go where
//!   traffic does not, and to ejected instances.
//! - **Backoff**: after `k` consecutive failed probes an instance is next
//!   probed after `interval × 2^k`, capped at `backoff_max` (default 8 ×
//!   interval, at most 60 s). A dead instance costs little; a recovered one
//!   is found within the cap, so the cap is the operator's trade between
//!   probe load and time to notice recovery.
//! - **Bound**: at most [`MAX_IN_FLIGHT`] probes run at once across all
//!   services.
//!
//! Each service's checker reads the current member list every tick, so
//! instances added at runtime are probed too; a reload restarts only the
//! checkers whose check (or upstream protocol) changed, so the others keep
//! their schedule, backoff and kept connections.
//!
//! An `http` probe speaks the service's `upstream_protocol`: HTTP/2 with
//! prior knowledge for `h2c`, HTTP/1.1 for `http1` and `auto` (what every
//! client can send), so a check passes exactly when real traffic could. It
//! keeps one connection per instance between probes ([`probe`]). A service
//! with `[service.X.tls]` is probed over TLS with the same client config as
//! its traffic (CA, name, client certificate, ALPN: `auto` probes in the
//! version the instance picks); a `tcp` probe then includes the handshake.

mod probe;
mod schedule;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use datapunk_lb_core::{CircuitState, FailureKind, InstanceId, Outcome, Registry};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::config::{Config, HealthCheck, HealthCheckKind, UpstreamProtocol};
use crate::metrics::Metrics;
use crate::proxy::upstream_tls::UpstreamTls;
use probe::{Kept, Transport};
use schedule::{Schedule, View};

/// Probes in flight at once, across all services.
pub(crate) const MAX_IN_FLIGHT: usize = 64;

/// Probes one service's checker may have started and not finished
/// (running, or waiting for one of [`MAX_IN_FLIGHT`]). When probes are
/// slower than the schedule (a starved CPU, a slow backend) the checker
/// falls behind instead of queueing a task per instance: at 100,000
/// instances on an overloaded machine that queue grew RSS by ~300 MB.
const MAX_PENDING: usize = 2 * MAX_IN_FLIGHT;

/// A checker sleeps until its next slot, but at least this long (at
/// 2,000 probes/s, 20 per wake-up: probes stay spread, wake-ups few) ...
const TICK: Duration = Duration::from_millis(10);

/// ... and at most this long, so finished probes, new members and the
/// budget are picked up soon even when slots are far apart.
const MAX_TICK: Duration = Duration::from_millis(250);

/// At most one "checks are behind" warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The running checkers, one per checked service; dropping it stops them.
/// A reload keeps the checker of a service whose check did not change, so
/// its schedule (backoff, passive skips) and kept connections carry over.
#[derive(Debug, Default)]
pub(crate) struct HealthChecker {
    running: HashMap<String, Running>,
    shared: Option<Arc<Shared>>,
}

/// One service's checker task and what it was started with.
#[derive(Debug)]
struct Running {
    check: HealthCheck,
    transport: Transport,
    task: JoinHandle<()>,
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
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

/// The probe budget shared by every service's checker.
#[derive(Debug)]
struct Budget {
    /// `health_check_max_probes_per_second`, as `f64` bits (a reload may
    /// change it under running checkers).
    per_second: std::sync::atomic::AtomicU64,
    /// Each service's demand, probes/s (instances / interval).
    demand: Mutex<HashMap<String, f64>>,
    last_warn: Mutex<Option<tokio::time::Instant>>,
}

impl Budget {
    /// Records `service`'s demand and returns the stretch factor for all.
    fn factor(&self, service: &str, demand: f64) -> f64 {
        let mut d = self.demand.lock();
        if let Some(v) = d.get_mut(service) {
            *v = demand;
        } else {
            d.insert(service.to_owned(), demand);
        }
        schedule::stretch(d.values().sum(), self.per_second())
    }

    fn per_second(&self) -> f64 {
        f64::from_bits(self.per_second.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Logs that checks are behind, at most once per [`WARN_EVERY`].
    fn warn(&self, service: &str, configured: Duration, effective: Duration) {
        let now = tokio::time::Instant::now();
        let mut last = self.last_warn.lock();
        if last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            return;
        }
        *last = Some(now);
        let demand: f64 = self.demand.lock().values().sum();
        warn!(
            service,
            configured = %humantime::format_duration(configured),
            effective = %humantime::format_duration(Duration::from_millis(effective.as_millis() as u64)),
            needed_per_second = demand.round(),
            budget_per_second = self.per_second(),
            "health checks are behind: intervals stretched to stay within health_check_max_probes_per_second"
        );
    }
}

impl HealthChecker {
    /// Brings the checkers to `config`: stops those of services gone or no
    /// longer checked, restarts those whose check or protocol changed,
    /// starts new ones, and leaves the rest running. `tls` holds the
    /// upstream TLS of the services that have it, built afresh on every
    /// reload (its files re-read), so a TLS service's checker restarts.
    pub(crate) fn update(
        &mut self,
        registry: Arc<Registry>,
        config: &Config,
        tls: &HashMap<String, Arc<UpstreamTls>>,
        metrics: Arc<Metrics>,
    ) {
        use std::sync::atomic::Ordering;
        let shared = self
            .shared
            .get_or_insert_with(|| {
                Arc::new(Shared {
                    limit: Semaphore::new(MAX_IN_FLIGHT),
                    budget: Budget {
                        per_second: Default::default(),
                        demand: Mutex::new(HashMap::new()),
                        last_warn: Mutex::new(None),
                    },
                    kept: Arc::default(),
                    gauges: Default::default(),
                })
            })
            .clone();
        let per_second = f64::from(config.health_check_max_probes_per_second);
        shared
            .budget
            .per_second
            .store(per_second.to_bits(), Ordering::Relaxed);
        let wanted: HashMap<&String, (&HealthCheck, Transport)> = config
            .services
            .iter()
            .filter(|(_, s)| s.health_check.kind != HealthCheckKind::None)
            .map(|(name, s)| {
                let transport = Transport {
                    h2: s.upstream_protocol == UpstreamProtocol::H2c,
                    tls: tls.get(name).cloned(),
                };
                (name, (&s.health_check, transport))
            })
            .collect();
        self.running.retain(|name, r| {
            let keep = wanted
                .get(name)
                .is_some_and(|(check, t)| **check == r.check && t.same_as(&r.transport));
            if !keep {
                r.task.abort();
                shared.budget.demand.lock().remove(name);
            }
            keep
        });
        // Services gone or no longer checked leave no gauge behind; the
        // checkers still running publish theirs again.
        metrics.health_check_intervals_clear();
        shared.gauges.fetch_add(1, Ordering::Relaxed);
        for (name, (check, transport)) in wanted {
            if self.running.contains_key(name) {
                continue;
            }
            let task = tokio::spawn(run_service(
                registry.clone(),
                metrics.clone(),
                name.clone(),
                check.clone(),
                shared.clone(),
                transport.clone(),
            ));
            let check = check.clone();
            self.running.insert(
                name.clone(),
                Running {
                    check,
                    transport,
                    task,
                },
            );
        }
    }
}

/// A finished probe, back to its service's checker.
type Done = (InstanceId, bool, Option<Kept>);

/// What every service's checker shares.
#[derive(Debug)]
struct Shared {
    /// Probes in flight.
    limit: Semaphore,
    budget: Budget,
    /// Idle probe connections kept (see [`probe::MAX_KEPT`]).
    kept: Arc<std::sync::atomic::AtomicUsize>,
    /// Bumped when the effective-interval gauges were cleared: every
    /// checker publishes its gauge again.
    gauges: std::sync::atomic::AtomicU64,
}

async fn run_service(
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    service: String,
    check: HealthCheck,
    shared: Arc<Shared>,
    transport: Transport,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
    let ctx = Arc::new(ProbeContext {
        registry: registry.clone(),
        metrics: metrics.clone(),
        service: Arc::from(service.as_str()),
        check: check.clone(),
        transport,
        shared: shared.clone(),
        done: tx,
    });
    let budget = &shared.budget;
    let mut sched: Schedule<Kept> = Schedule::new(check.clone());
    let clock = registry.clock().clone();
    let mut factor = 1.0;
    let mut shown = None;
    let mut gauges = u64::MAX;
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut last_n = 0;
    loop {
        while let Ok((id, ok, conn)) = rx.try_recv() {
            sched.done(&id, ok, clock.now(), factor, conn);
        }
        let Some(svc) = registry.service(&service) else {
            tokio::time::sleep(TICK).await;
            continue;
        };
        let members = svc.members();
        let n = members.len();
        factor = budget.factor(&service, n as f64 / check.interval.as_secs_f64());
        let effective = sched.effective_interval(factor);
        let cleared = shared.gauges.load(std::sync::atomic::Ordering::Relaxed);
        if shown != Some(effective) || gauges != cleared {
            gauges = cleared;
            metrics.health_check_interval_effective(&service, effective);
            shown = Some(effective);
        }
        if effective > check.interval {
            budget.warn(&service, check.interval, effective);
        }
        // The schedule holds state for few instances (only those with
        // something to remember), so more entries than members is no
        // longer the only sign of a removal: a shrinking service is too.
        // Either way the O(n) pass runs only when members left.
        if sched.len() > n || (n < last_n && sched.len() > 0) {
            let live: HashSet<&InstanceId> = members.iter().map(|m| m.instance().id()).collect();
            sched.retain(|id| live.contains(id));
        }
        last_n = n;
        let room = MAX_PENDING.saturating_sub(pending.load(std::sync::atomic::Ordering::Relaxed));
        let due = sched.due(clock.now(), factor, n, room, |i| {
            members.get(i).map(|m| View {
                id: m.instance().id().clone(),
                successes: m.requests().saturating_sub(m.failures()),
                ejected: m.circuit_state() != CircuitState::Closed,
            })
        });
        let wait = sched
            .until_next(clock.now())
            .map_or(TICK, |d| d.clamp(TICK, MAX_TICK));
        // Keep-alive only where it pays: with more instances than idle
        // connections may be kept, the ring visits every other instance
        // before it comes back to a kept one, so the kept few serve a
        // small share of probes while each holds a socket, a connection
        // task and its buffers (at 100,000 instances, 8,192 of them held
        // ~100 MB of RSS for 8 % of the probes).
        let keep = n <= probe::MAX_KEPT;
        for (i, id, conn) in due {
            // Reference counts only: the member (id, address, port) and
            // the service's probe context; nothing is copied per probe.
            let Some(member) = members.get(i).cloned() else {
                continue;
            };
            let ctx = ctx.clone();
            let pending = Pending::start(&pending);
            tokio::spawn(async move {
                let _pending = pending;
                let _permit = ctx.shared.limit.acquire().await;
                let started = tokio::time::Instant::now();
                let conn = conn.and_then(Kept::take);
                let inst = member.instance();
                let (ok, conn) = probe::probe(
                    &ctx.check,
                    &ctx.transport,
                    inst.address(),
                    inst.port(),
                    conn,
                )
                .await;
                let conn = conn
                    .filter(|_| keep)
                    .and_then(|c| Kept::keep(c, &ctx.shared.kept));
                let outcome = if ok {
                    Outcome::Success(started.elapsed())
                } else {
                    Outcome::Failure(FailureKind::HealthCheck)
                };
                let service = &*ctx.service;
                debug!(service, instance = id.as_str(), ok, "health check");
                ctx.metrics.health_check(service, ok);
                if let Ok(events) = ctx.registry.report_outcome(service, id.as_str(), outcome) {
                    ctx.metrics.report(events);
                }
                let _ = ctx.done.send((id, ok, conn));
            });
        }
        tokio::time::sleep(wait).await;
    }
}

/// What every probe of one service needs, shared by its probe tasks (one
/// reference count per probe instead of a copy of the service name, the
/// check with its path, and the transport).
struct ProbeContext {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    service: Arc<str>,
    check: HealthCheck,
    transport: Transport,
    shared: Arc<Shared>,
    /// Finished probes, back to the checker.
    done: tokio::sync::mpsc::UnboundedSender<Done>,
}

/// One started probe, counted until its task ends however it ends.
struct Pending(Arc<std::sync::atomic::AtomicUsize>);

impl Pending {
    fn start(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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

    #[test]
    fn the_probe_budget_is_a_strict_global_key() {
        let cfg = |extra: &str| {
            format!(
                "{extra}[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\n\
                 [[listener.route]]\npath_prefix = \"/\"\nservice = \"api\"\n[service.api]\n\
                 [[service.api.instance]]\nid = \"a\"\naddress = \"127.0.0.1\"\nport = 1\n"
            )
        };
        let parse = |extra: &str| Config::parse(&cfg(extra)).map_err(|e| e.to_string());
        assert_eq!(
            parse("").map(|c| c.health_check_max_probes_per_second),
            Ok(2_000)
        );
        let c = parse("health_check_max_probes_per_second = 300\n");
        assert_eq!(
            c.as_ref().map(|c| c.health_check_max_probes_per_second),
            Ok(300)
        );
        assert!(c
            .unwrap_or_else(|e| panic!("{e}"))
            .summary()
            .contains("health_check_max_probes_per_second: 300"));
        // A wrong type is toml's error (line, no key), as for every knob.
        let e = parse("health_check_max_probes_per_second = \"fast\"\n");
        assert!(e.is_err_and(|e| e.contains("line 1")));
        for bad in ["0", "1000001"] {
            let e = parse(&format!("health_check_max_probes_per_second = {bad}\n"))
                .err()
                .unwrap_or_default();
            assert!(
                e.contains("line 1") && e.contains("health_check_max_probes_per_second"),
                "{bad}: {e}"
            );
        }
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
            let (ok, _) = probe::probe(
                &check(Some("api.internal"), expected),
                &Transport::default(),
                "127.0.0.1",
                port,
                None,
            )
            .await;
            assert_eq!(ok, want, "{status} against {expected:?}");
            let head = head.await.unwrap();
            assert!(head.starts_with("get /ready http/1.1"), "{head}");
            assert!(head.contains("host: api.internal\r\n"), "{head}");
        }
        let (port, head) = one_response(200).await;
        assert!(
            probe::probe(
                &check(None, &["200"]),
                &Transport::default(),
                "127.0.0.1",
                port,
                None
            )
            .await
            .0
        );
        let head = head.await.unwrap();
        assert!(
            head.contains(&format!("host: 127.0.0.1:{port}\r\n")),
            "default Host is the instance: {head}"
        );
    }
}
