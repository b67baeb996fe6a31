//! Every Prometheus metric of SPEC §3, in one place.
//!
//! ## Two kinds of metric, zero lookups per request
//!
//! - **Derived at scrape** from the core's own exact counters and state (a
//!   [`Collector`]): `datapunk_lb_requests_total`, `active_connections`,
//!   `instance_health_score`, `circuit_state`, `panic_mode`, `instances`.
//!   The request path pays nothing extra for them, and an instance that is
//!   deleted simply stops appearing: no stale series.
//! - **Counted by the server** with handles resolved once per service when
//!   the config is applied ([`ServiceMetrics`]): the duration histogram,
//!   selections by strategy, retries; and, off the request path, health
//!   checks, breaker transitions and reloads.
//! - **Discovery** (etcd, see [`crate::discovery`]):
//!   `datapunk_lb_discovery_stale` (1 while the node serves the last set it
//!   saw because etcd is unreachable or the watch broke, 0 when in sync),
//!   `datapunk_lb_discovery_syncs_total{result}` (full re-lists, `success` or
//!   `failure`) and `datapunk_lb_discovery_invalid_values_total` (values
//!   under the prefix that were skipped).
//! - **Listeners**: `datapunk_lb_accept_errors_total{listener}`, failed
//!   accepts on a proxy listener (out of file descriptors, mostly): the log
//!   says so at most once a second (the accept loop in `proxy/accept.rs`), the counter
//!   has every one, for an alert.
//! - **SNI passthrough**: `datapunk_lb_sni_client_hellos_total{listener,
//!   outcome}`, the ClientHellos a listener with `sni_route`s read, by what
//!   they said (`crate::proxy::sni`), created at 0 when a `tcp` listener
//!   without `tls` starts (a reload may give it `sni_route`s).
//! - **Access log**: `datapunk_lb_access_log_dropped_total`, lines dropped
//!   because the writer thread fell behind (its channel was full) or the
//!   destination failed: the request path never waits for the log.
//!
//! ## Bounded per service: `metrics_instance_series_limit`
//!
//! A service with at most `metrics_instance_series_limit` instances
//! (default 1,000, [`crate::config::DEFAULT_METRICS_INSTANCE_SERIES_LIMIT`])
//! has the per-instance series above. Above it, ~10 series per instance
//! would be more than a Prometheus should hold for one target (27.8 MB a
//! scrape at 100,000), so the service exports aggregates instead, read in
//! one pass over its members ([`crate::scan`]):
//! `datapunk_lb_instances{state}` (as always), the
//! `datapunk_lb_instance_health_score_distribution` histogram (every
//! service has it), the per-instance gauges of its [`WORST_INSTANCES`]
//! worst instances only, and `datapunk_lb_requests_total` summed over every
//! instance under `instance=""` (kept monotonic, see `MonotonicSum`), so
//! `sum by (service)` queries read the same on both sides of the limit.
//! `datapunk_lb_instance_series_limited{service}` says which side a
//! service is on. Sizes and times at 100,000: `docs/benchmarks.md`.
//!
//! ## Every series from the first scrape
//!
//! Alerts and `rate()` see nothing of a series that does not exist yet, so
//! every family is registered at start and the event counters' known label
//! sets are created at 0 before their first event: `config_reloads_total`
//! and `discovery_syncs_total` by `result` at start; per service, when its
//! handles are resolved, `retries_total`, `selections_total` by strategy,
//! `health_checks_total` by `result` and `circuit_transitions_total` for
//! each transition the breaker makes ([`BREAKER_TRANSITIONS`]);
//! `accept_errors_total` per listener when the listener starts.
//!
//! Output is the OpenMetrics text format that `prometheus-client` writes
//! (counters carry the `_total` suffix on their samples).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use datapunk_lb_core::{
    CircuitState, Event, FailureKind, InstanceStatus, Registry as CoreRegistry, StrategyKind,
};
use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::config::DEFAULT_METRICS_INSTANCE_SERIES_LIMIT;
use crate::history::History;

mod per_worker;
use crate::scan::{State, View, Worst};
pub use per_worker::{WorkerCounter, WorkerHistogram};

type Labels = Vec<(&'static str, String)>;

/// Every `(from, to)` a circuit breaker reports: it opens from closed or on
/// a failed probe, goes half-open when its open window elapses, and closes
/// on enough probe successes (from open when the first success both ends
/// the window and meets `recovery_threshold`).
pub const BREAKER_TRANSITIONS: [(CircuitState, CircuitState); 5] = [
    (CircuitState::Closed, CircuitState::Open),
    (CircuitState::Open, CircuitState::HalfOpen),
    (CircuitState::HalfOpen, CircuitState::Closed),
    (CircuitState::HalfOpen, CircuitState::Open),
    (CircuitState::Open, CircuitState::Closed),
];

/// The `result` label values of the success/failure counters.
const RESULTS: [&str; 2] = ["success", "failure"];

/// Creates the series `labels` of `family` (at 0 if it is new).
fn create_at_zero(family: &Family<Labels, Counter>, labels: &Labels) {
    drop(family.get_or_create(labels));
}

fn tls_labels(listener: &str, name: &str) -> Labels {
    vec![("listener", listener.to_owned()), ("name", name.to_owned())]
}

fn result_label(ok: bool) -> Labels {
    vec![("result", RESULTS[usize::from(!ok)].to_owned())]
}

/// The metrics of one process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    durations: Family<Labels, WorkerHistogram>,
    selections: Family<Labels, WorkerCounter>,
    retries: Family<Labels, Counter>,
    health_checks: Family<Labels, Counter>,
    transitions: Family<Labels, Counter>,
    reloads: Family<Labels, Counter>,
    discovery_stale: Gauge,
    health_check_interval: Family<Labels, Gauge<f64, AtomicU64>>,
    discovery_syncs: Family<Labels, Counter>,
    accept_errors: Family<Labels, Counter>,
    sni_hellos: Family<Labels, Counter>,
    access_log_dropped: Counter,
    discovery_invalid: Counter,
    tls_expiry: Family<Labels, Gauge>,
    errors: Arc<Mutex<HashMap<String, Arc<ServiceErrors>>>>,
    limits: Arc<Mutex<HashMap<String, usize>>>,
    sums: Arc<Mutex<HashMap<String, MonotonicSum>>>,
    history: Arc<History>,
}

/// Handles for one service, resolved when the config is applied.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    enabled: bool,
    duration: WorkerHistogram,
    selections: [WorkerCounter; 9],
    retries: Counter,
    errors: Arc<ServiceErrors>,
    transitions: Family<Labels, Counter>,
    history: Arc<History>,
}

/// Requests that failed before reaching an instance.
#[derive(Debug, Default)]
pub struct ServiceErrors {
    no_instance: AtomicU64,
    over_limit: AtomicU64,
}

/// Reads the core registry at scrape time.
#[derive(Debug)]
struct CoreCollector {
    core: Arc<CoreRegistry>,
    errors: Arc<Mutex<HashMap<String, Arc<ServiceErrors>>>>,
    /// `metrics_instance_series_limit` by service.
    limits: Arc<Mutex<HashMap<String, usize>>>,
    /// Request sums of services above their limit.
    sums: Arc<Mutex<HashMap<String, MonotonicSum>>>,
}

/// Instances of a service above its limit that keep per-instance series:
/// the worst by health score (then id).
pub const WORST_INSTANCES: usize = 10;

fn duration_buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

impl Metrics {
    /// Registers every family; `core` is read at each scrape.
    pub fn new(core: Arc<CoreRegistry>) -> Self {
        let mut registry = Registry::default();
        let durations = Family::<Labels, WorkerHistogram>::new_with_constructor(|| {
            WorkerHistogram::new(duration_buckets())
        });
        registry.register(
            "datapunk_lb_request_duration_seconds",
            "Time to the upstream answer, by service: HTTP, request to response headers; TCP, the connect",
            durations.clone(),
        );
        let selections = Family::<Labels, WorkerCounter>::default();
        registry.register(
            "datapunk_lb_selections",
            "Instance selections by service and strategy in use",
            selections.clone(),
        );
        let retries = Family::<Labels, Counter>::default();
        registry.register(
            "datapunk_lb_retries",
            "Retries to another instance, by service",
            retries.clone(),
        );
        let health_checks = Family::<Labels, Counter>::default();
        registry.register(
            "datapunk_lb_health_checks",
            "Active health checks by service and result",
            health_checks.clone(),
        );
        let transitions = Family::<Labels, Counter>::default();
        registry.register(
            "datapunk_lb_circuit_transitions",
            "Circuit breaker transitions by service, from and to state",
            transitions.clone(),
        );
        let reloads = Family::<Labels, Counter>::default();
        registry.register(
            "datapunk_lb_config_reloads",
            "Config reloads by result",
            reloads.clone(),
        );
        let discovery_stale = Gauge::default();
        registry.register(
            "datapunk_lb_discovery_stale",
            "1 while discovery is stale (etcd unreachable or the watch broken): the node serves the last instance set it saw",
            discovery_stale.clone(),
        );
        let health_check_interval = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "datapunk_lb_health_check_interval_effective_seconds",
            "The health-check interval in force per service: the configured one, stretched when health_check_max_probes_per_second is exceeded",
            health_check_interval.clone(),
        );
        let discovery_syncs = Family::<Labels, Counter>::default();
        registry.register(
            "datapunk_lb_discovery_syncs",
            "Full discovery syncs (list of the etcd prefix) by result",
            discovery_syncs.clone(),
        );
        let discovery_invalid = Counter::default();
        registry.register(
            "datapunk_lb_discovery_invalid_values",
            "Discovery values skipped as invalid (bad JSON, fields or key shape)",
            discovery_invalid.clone(),
        );
        let accept_errors = Family::<Labels, Counter>::default();
        registry.register(
            "datapunk_lb_accept_errors",
            "Failed accepts on a proxy listener (out of file descriptors, mostly), by listener",
            accept_errors.clone(),
        );
        let sni_hellos = Family::<Labels, Counter>::default();
        registry.register(
            "datapunk_lb_sni_client_hellos",
            "ClientHellos read by a TLS passthrough (sni_route) listener, by listener and outcome: server_name, no_server_name, not_tls, incomplete",
            sni_hellos.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "datapunk_lb_access_log_dropped",
            "Access log lines dropped because the writer fell behind (or could not write)",
            access_log_dropped.clone(),
        );
        let tls_expiry = Family::<Labels, Gauge>::default();
        registry.register(
            "datapunk_lb_tls_certificate_expiry_seconds",
            "Not-after of each certificate a TLS listener serves, Unix seconds, by listener and name (its first DNS name, else its file name)",
            tls_expiry.clone(),
        );
        for ok in [true, false] {
            create_at_zero(&reloads, &result_label(ok));
            create_at_zero(&discovery_syncs, &result_label(ok));
        }
        let errors = Arc::new(Mutex::new(HashMap::new()));
        let limits = Arc::new(Mutex::new(HashMap::new()));
        let sums = Arc::new(Mutex::new(HashMap::new()));
        registry.register_collector(Box::new(CoreCollector {
            core,
            errors: errors.clone(),
            limits: limits.clone(),
            sums: sums.clone(),
        }));
        Self {
            registry,
            history: Arc::new(History::new(durations.clone())),
            durations,
            selections,
            retries,
            health_checks,
            transitions,
            reloads,
            discovery_stale,
            health_check_interval,
            discovery_syncs,
            discovery_invalid,
            accept_errors,
            sni_hellos,
            access_log_dropped,
            tls_expiry,
            errors,
            limits,
            sums,
        }
    }

    /// Access log lines dropped.
    pub(crate) fn access_log_dropped(&self) -> Counter {
        self.access_log_dropped.clone()
    }

    /// Sets the not-after of certificate `name` of TLS listener `listener`.
    pub(crate) fn set_tls_expiry(&self, listener: &str, name: &str, not_after: i64) {
        self.tls_expiry
            .get_or_create(&tls_labels(listener, name))
            .set(not_after);
    }

    /// Drops the series of a certificate no longer served.
    pub(crate) fn remove_tls_expiry(&self, listener: &str, name: &str) {
        self.tls_expiry.remove(&tls_labels(listener, name));
    }

    /// The accept-error counter of `listener`, created at 0.
    pub fn accept_errors(&self, listener: &str) -> Counter {
        self.accept_errors
            .get_or_create(&vec![("listener", listener.to_owned())])
            .clone()
    }

    /// The ClientHello counters of passthrough listener `listener`, one
    /// per outcome in [`crate::proxy::sni::HELLO_OUTCOMES`] order, created
    /// at 0.
    pub(crate) fn sni_hellos(&self, listener: &str) -> Arc<[Counter]> {
        crate::proxy::sni::HELLO_OUTCOMES
            .iter()
            .map(|outcome| {
                self.sni_hellos
                    .get_or_create(&vec![
                        ("listener", listener.to_owned()),
                        ("outcome", (*outcome).to_owned()),
                    ])
                    .clone()
            })
            .collect()
    }

    /// Handles for `service`.
    pub fn service(&self, service: &str, enabled: bool) -> ServiceMetrics {
        let svc = || vec![("service", service.to_owned())];
        let selections = std::array::from_fn(|i| {
            let kind = StrategyKind::ALL[i];
            let mut l = svc();
            l.push(("strategy", kind.as_str().to_owned()));
            self.selections.get_or_create(&l).clone()
        });
        for ok in [true, false] {
            let mut l = svc();
            l.extend(result_label(ok));
            create_at_zero(&self.health_checks, &l);
        }
        for (from, to) in BREAKER_TRANSITIONS {
            create_at_zero(&self.transitions, &transition_labels(service, from, to));
        }
        let errors = self
            .errors
            .lock()
            .entry(service.to_owned())
            .or_default()
            .clone();
        ServiceMetrics {
            enabled,
            duration: self.durations.get_or_create(&svc()).clone(),
            selections,
            retries: self.retries.get_or_create(&svc()).clone(),
            errors,
            transitions: self.transitions.clone(),
            history: self.history.clone(),
        }
    }

    /// Drops per-service series of services no longer configured.
    pub fn retain_services(&self, keep: &dyn Fn(&str) -> bool) {
        self.errors.lock().retain(|k, _| keep(k));
        self.limits.lock().retain(|k, _| keep(k));
        self.sums.lock().retain(|k, _| keep(k));
    }

    /// Sets `service`'s `metrics_instance_series_limit` (services never
    /// set have the default).
    pub fn instance_series_limit(&self, service: &str, limit: usize) {
        self.limits.lock().insert(service.to_owned(), limit);
    }

    /// Counts an active health check.
    pub fn health_check(&self, service: &str, ok: bool) {
        let mut l = vec![("service", service.to_owned())];
        l.extend(result_label(ok));
        self.health_checks.get_or_create(&l).inc();
    }

    /// Sets `service`'s effective health-check interval.
    pub fn health_check_interval_effective(&self, service: &str, interval: std::time::Duration) {
        self.health_check_interval
            .get_or_create(&vec![("service", service.to_owned())])
            .set(interval.as_secs_f64());
    }

    /// Drops every effective-interval series: the checkers (re)started on
    /// a config set them again, so services removed or no longer checked
    /// leave none behind.
    pub fn health_check_intervals_clear(&self) {
        self.health_check_interval.clear();
    }

    /// Counts a config reload.
    pub fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&result_label(ok)).inc();
    }

    /// Sets whether discovery is stale.
    pub fn discovery_stale(&self, stale: bool) {
        self.discovery_stale.set(i64::from(stale));
    }

    /// Counts a full discovery sync.
    pub fn discovery_sync(&self, ok: bool) {
        self.discovery_syncs.get_or_create(&result_label(ok)).inc();
    }

    /// Counts a skipped discovery value.
    pub fn discovery_invalid(&self) {
        self.discovery_invalid.inc();
    }

    /// Logs what the core reported, counts breaker transitions and keeps
    /// the changes for the status page.
    pub fn report(&self, events: Vec<Event>) {
        report(&self.transitions, &self.history, events);
    }

    /// The status page's history (samples and state changes).
    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl ServiceMetrics {
    /// Handles that record nothing (metrics disabled, tests).
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            duration: WorkerHistogram::new(duration_buckets()),
            selections: Default::default(),
            retries: Counter::default(),
            errors: Arc::default(),
            transitions: Family::default(),
            history: Arc::default(),
        }
    }

    /// Logs what the core reported, counts breaker transitions and keeps
    /// the changes for the status page.
    pub fn report(&self, events: Vec<Event>) {
        report(&self.transitions, &self.history, events);
    }

    /// A selection by `strategy`.
    pub fn selected(&self, strategy: StrategyKind) {
        if self.enabled {
            let i = StrategyKind::ALL
                .iter()
                .position(|k| *k == strategy)
                .unwrap_or(0);
            self.selections[i].inc();
        }
    }

    /// Time to response headers.
    pub fn observe(&self, seconds: f64) {
        if self.enabled {
            self.duration.observe(seconds);
        }
    }

    /// A retry.
    pub fn retried(&self) {
        if self.enabled {
            self.retries.inc();
        }
    }

    /// No eligible instance.
    pub fn no_instance(&self) {
        self.errors.no_instance.fetch_add(1, Ordering::Relaxed);
    }

    /// Every instance at its connection limit.
    pub fn over_limit(&self) {
        self.errors.over_limit.fetch_add(1, Ordering::Relaxed);
    }
}

/// The one place every core event passes through.
/// The one place core events go: counted, kept for the status page's
/// timeline, logged. Most calls (every request) bring none.
fn report(transitions: &Family<Labels, Counter>, history: &History, events: Vec<Event>) {
    if events.is_empty() {
        return;
    }
    count_transitions(transitions, &events);
    history.record(&events);
    crate::telemetry::events(events);
}

fn count_transitions(family: &Family<Labels, Counter>, events: &[Event]) {
    for e in events {
        if let Event::Breaker {
            service,
            transition,
            ..
        } = e
        {
            family
                .get_or_create(&transition_labels(service, transition.from, transition.to))
                .inc();
        }
    }
}

fn transition_labels(service: &str, from: CircuitState, to: CircuitState) -> Labels {
    vec![
        ("service", service.to_owned()),
        ("from", from.as_str().to_owned()),
        ("to", to.as_str().to_owned()),
    ]
}

/// Per-outcome request counts of a service above its limit: `success`,
/// then [`FailureKind::ALL`] in order.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Outcomes([u64; 1 + FailureKind::ALL.len()]);

impl Outcomes {
    fn add(&mut self, st: &InstanceStatus) {
        self.0[0] += st.requests.saturating_sub(st.failures);
        for kind in FailureKind::ALL {
            self.0[1 + kind.index()] += st.failures_by_kind[kind.index()];
        }
    }

    fn outcome(i: usize) -> &'static str {
        match i.checked_sub(1) {
            None => "success",
            Some(k) => FailureKind::ALL[k].as_str(),
        }
    }
}

/// The exported sum of a limited service's requests, kept monotonic: a
/// removed instance takes its counts out of the raw sum, which Prometheus
/// would read as a counter reset (a spike in `rate()`). Growth since the
/// last scrape is added, a drop adds nothing (the traffic of a scrape
/// interval with a removal is undercounted instead).
#[derive(Debug, Default)]
struct MonotonicSum {
    raw: Outcomes,
    out: Outcomes,
}

impl MonotonicSum {
    fn advance(&mut self, raw: Outcomes) -> Outcomes {
        for (i, now) in raw.0.iter().enumerate() {
            self.out.0[i] += now.saturating_sub(self.raw.0[i]);
        }
        self.raw = raw;
        self.out
    }
}

/// Upper bounds of `datapunk_lb_instance_health_score_distribution` (and
/// `+Inf`): tenths, enough to tell "a few slightly degraded" from "many
/// near zero".
const HEALTH_BUCKETS: [f64; 10] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Health scores of one service's instances as a histogram.
#[derive(Debug, Default)]
struct HealthHistogram {
    /// Non-cumulative counts per [`HEALTH_BUCKETS`] bound, then `+Inf`.
    counts: [u64; HEALTH_BUCKETS.len() + 1],
    sum: f64,
}

impl HealthHistogram {
    fn observe(&mut self, score: f64) {
        let i = HEALTH_BUCKETS
            .iter()
            .position(|b| score <= *b)
            .unwrap_or(HEALTH_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += score;
    }
}

impl EncodeMetric for HealthHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = HEALTH_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX])
            .zip(self.counts)
            .collect();
        let count = self.counts.iter().sum();
        encoder.encode_histogram::<NoLabelSet>(self.sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// One service as a scrape reads it.
#[derive(Debug)]
struct Scraped {
    name: String,
    /// Above its `metrics_instance_series_limit`.
    limited: bool,
    /// Instances with per-instance series: all (member order), or the
    /// [`WORST_INSTANCES`] worst when limited.
    rows: Vec<InstanceStatus>,
    /// By [`State::index`].
    counts: [usize; 5],
    health: HealthHistogram,
    /// Limited: every instance's requests summed (monotonic).
    requests: Option<Outcomes>,
}

impl CoreCollector {
    /// Reads `name` in one pass over its members: per-instance rows up to
    /// its limit, aggregates and the worst few above it.
    fn scrape(&self, name: &str) -> Option<Scraped> {
        let view = View::of(&self.core, name)?;
        let limit = self
            .limits
            .lock()
            .get(name)
            .copied()
            .unwrap_or(DEFAULT_METRICS_INSTANCE_SERIES_LIMIT);
        let limited = view.len() > limit;
        let mut rows = Vec::with_capacity(if limited { 0 } else { view.len() });
        let mut worst = Worst::new(if limited { WORST_INSTANCES } else { 0 });
        let mut counts = [0; 5];
        let mut health = HealthHistogram::default();
        let mut sums = Outcomes::default();
        for m in view.members() {
            let st = view.status(m);
            counts[State::of_status(&st).index()] += 1;
            health.observe(st.health_score);
            if limited {
                sums.add(&st);
                worst.offer(m);
            } else {
                rows.push(st);
            }
        }
        let requests = limited.then(|| {
            self.sums
                .lock()
                .entry(name.to_owned())
                .or_default()
                .advance(sums)
        });
        if limited {
            rows = worst
                .into_sorted()
                .iter()
                .map(|r| view.status(&r.member))
                .collect();
        } else {
            self.sums.lock().remove(name);
        }
        Some(Scraped {
            name: name.to_owned(),
            limited,
            rows,
            counts,
            health,
            requests,
        })
    }
}

impl Collector for CoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let services = self.core.services();
        let scraped: Vec<Scraped> = services
            .iter()
            .filter_map(|s| self.scrape(&s.name))
            .collect();
        let labels =
            |svc: &str, id: &str| vec![("service", svc.to_owned()), ("instance", id.to_owned())];

        {
            let c = ConstCounter::new(0u64);
            let mut m = encoder.encode_descriptor(
                "datapunk_lb_requests",
                "Requests by service, instance and outcome (success or the failure kind; no_instance and over_limit never reached an instance; instance \"\" also sums every instance of a service above its series limit)",
                None,
                c.metric_type(),
            )?;
            for s in &scraped {
                if let Some(sums) = &s.requests {
                    // Above the limit: one series per outcome for the whole
                    // service, so `sum by (service)` stays right.
                    for (i, n) in sums.0.iter().enumerate() {
                        if i == 0 || *n > 0 {
                            let mut l = labels(&s.name, "");
                            l.push(("outcome", Outcomes::outcome(i).into()));
                            ConstCounter::new(*n).encode(m.encode_family(&l)?)?;
                        }
                    }
                    continue;
                }
                for st in &s.rows {
                    let id = st.instance.id().as_str();
                    let mut l = labels(&s.name, id);
                    l.push(("outcome", "success".into()));
                    ConstCounter::new(st.requests.saturating_sub(st.failures))
                        .encode(m.encode_family(&l)?)?;
                    for kind in FailureKind::ALL {
                        let n = st.failures_by_kind[kind.index()];
                        if n > 0 {
                            let mut l = labels(&s.name, id);
                            l.push(("outcome", kind.as_str().into()));
                            ConstCounter::new(n).encode(m.encode_family(&l)?)?;
                        }
                    }
                }
            }
            for (svc, e) in self.errors.lock().iter() {
                for (outcome, v) in [
                    ("no_instance", &e.no_instance),
                    ("over_limit", &e.over_limit),
                ] {
                    let n = v.load(Ordering::Relaxed);
                    if n > 0 {
                        let l = vec![
                            ("service", svc.clone()),
                            ("instance", String::new()),
                            ("outcome", outcome.to_owned()),
                        ];
                        ConstCounter::new(n).encode(m.encode_family(&l)?)?;
                    }
                }
            }
        }
        let gauge = |encoder: &mut DescriptorEncoder<'_>,
                     name: &'static str,
                     help: &str,
                     rows: Vec<(Labels, f64)>|
         -> Result<(), std::fmt::Error> {
            let mut m = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstGauge::new(0.0f64).metric_type(),
            )?;
            for (l, v) in rows {
                ConstGauge::new(v).encode(m.encode_family(&l)?)?;
            }
            Ok(())
        };
        let per_instance = |f: &dyn Fn(&InstanceStatus) -> f64| {
            scraped
                .iter()
                .flat_map(|s| {
                    s.rows
                        .iter()
                        .map(move |st| (labels(&s.name, st.instance.id().as_str()), f(st)))
                })
                .collect::<Vec<_>>()
        };
        gauge(
            &mut encoder,
            "datapunk_lb_active_connections",
            "Requests holding a connection to the instance now",
            per_instance(&|st| f64::from(st.active_connections)),
        )?;
        gauge(
            &mut encoder,
            "datapunk_lb_instance_health_score",
            "Health score of the instance, 0 to 1",
            per_instance(&|st| st.health_score),
        )?;
        gauge(
            &mut encoder,
            "datapunk_lb_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            per_instance(&|st| f64::from(st.circuit_state.as_u8())),
        )?;
        gauge(
            &mut encoder,
            "datapunk_lb_panic_mode",
            "1 while the service selects across all instances because too few are eligible",
            services
                .iter()
                .map(|s| {
                    (
                        vec![("service", s.name.clone())],
                        if s.panic { 1.0 } else { 0.0 },
                    )
                })
                .collect(),
        )?;
        let mut rows = Vec::new();
        for s in &scraped {
            // The gauge's four states (older than slow start's own state,
            // which counts as eligible here).
            let c = |st: State| s.counts[st.index()];
            for (state, n) in [
                ("eligible", c(State::Healthy) + c(State::SlowStart)),
                ("half_open", c(State::HalfOpen)),
                ("ejected", c(State::Ejected)),
                ("draining", c(State::Draining)),
            ] {
                rows.push((
                    vec![("service", s.name.clone()), ("state", state.to_owned())],
                    n as f64,
                ));
            }
        }
        gauge(
            &mut encoder,
            "datapunk_lb_instances",
            "Instances by service and state",
            rows,
        )?;
        gauge(
            &mut encoder,
            "datapunk_lb_instance_series_limited",
            "1 while the service has more instances than its metrics_instance_series_limit: per-instance series only for its worst instances, requests summed under instance=\"\"",
            scraped
                .iter()
                .map(|s| {
                    (
                        vec![("service", s.name.clone())],
                        f64::from(u8::from(s.limited)),
                    )
                })
                .collect(),
        )?;
        {
            let mut m = encoder.encode_descriptor(
                "datapunk_lb_instance_health_score_distribution",
                "Health scores of the service's instances",
                None,
                MetricType::Histogram,
            )?;
            for s in &scraped {
                s.health
                    .encode(m.encode_family(&vec![("service", s.name.clone())])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn event_counters_exist_at_zero_before_their_first_event() {
        let m = Metrics::new(Arc::new(CoreRegistry::new()));
        let _api = m.service("api", true);
        let text = m.encode();
        for line in [
            r#"datapunk_lb_config_reloads_total{result="success"} 0"#,
            r#"datapunk_lb_config_reloads_total{result="failure"} 0"#,
            r#"datapunk_lb_discovery_syncs_total{result="failure"} 0"#,
            r#"datapunk_lb_health_checks_total{service="api",result="failure"} 0"#,
            r#"datapunk_lb_circuit_transitions_total{service="api",from="closed",to="open"} 0"#,
            r#"datapunk_lb_circuit_transitions_total{service="api",from="open",to="closed"} 0"#,
            r#"datapunk_lb_retries_total{service="api"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // An event counts on the series created at 0.
        m.reload(false);
        assert!(m
            .encode()
            .lines()
            .any(|l| l == r#"datapunk_lb_config_reloads_total{result="failure"} 1"#));
    }

    /// A core with service `api` of `n` instances `i000`…; instance `i`
    /// gets health score `score(i)` and `requests(i)` successes.
    fn core_with(n: usize, score: impl Fn(usize) -> f64, requests: usize) -> Arc<CoreRegistry> {
        use datapunk_lb_core::ServiceInstance;
        let core = Arc::new(CoreRegistry::new());
        let list = (0..n).map(|i| {
            ServiceInstance::try_new(&format!("i{i:03}"), "127.0.0.1", 1 + i as u16).unwrap()
        });
        core.register_instances("api", list).unwrap();
        for i in 0..n {
            let id = format!("i{i:03}");
            for _ in 0..requests {
                request(&core, &id);
            }
            // After the requests, which may move the score.
            core.update_instance_health("api", &id, score(i)).unwrap();
        }
        core
    }

    /// One successful request on `api`'s instance `id`.
    fn request(core: &CoreRegistry, id: &str) {
        let sel = core
            .get_instance_with("api", None, |m| m.instance().id().as_str() == id)
            .unwrap();
        let _ = sel.success(Duration::from_millis(1));
    }

    fn lines_of<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(family)).collect()
    }

    #[test]
    fn at_the_limit_every_instance_has_its_series_above_it_the_worst_ten() {
        let n = 12;
        // Scores 0.9, 0.85, ...: the higher the index, the worse.
        let core = core_with(n, |i| 0.9 - i as f64 * 0.05, 3);
        let m = Metrics::new(core.clone());
        m.instance_series_limit("api", n);
        let text = m.encode();
        assert_eq!(
            lines_of(&text, "datapunk_lb_instance_health_score{").len(),
            n,
            "{text}"
        );
        assert_eq!(lines_of(&text, "datapunk_lb_requests_total{").len(), n);
        assert!(text.contains(r#"datapunk_lb_instance_series_limited{service="api"} 0"#));
        assert!(text.contains(
            r#"datapunk_lb_requests_total{service="api",instance="i000",outcome="success"} 3"#
        ));

        m.instance_series_limit("api", n - 1);
        let text = m.encode();
        assert!(
            text.contains(r#"datapunk_lb_instance_series_limited{service="api"} 1"#),
            "{text}"
        );
        for family in [
            "datapunk_lb_instance_health_score{",
            "datapunk_lb_active_connections{",
            "datapunk_lb_circuit_state{",
        ] {
            let got = lines_of(&text, family);
            assert_eq!(got.len(), WORST_INSTANCES, "{family}: {got:?}");
            // The worst ten are i002..=i011; the two best are gone.
            assert!(
                got.iter()
                    .all(|l| !l.contains("\"i000\"") && !l.contains("\"i001\"")),
                "{got:?}"
            );
            assert!(got.iter().any(|l| l.contains("\"i011\"")), "{got:?}");
        }
        // Requests: one series for the service, summing every instance.
        assert_eq!(
            lines_of(&text, "datapunk_lb_requests_total{"),
            [r#"datapunk_lb_requests_total{service="api",instance="",outcome="success"} 36"#]
        );
        // Counts and the histogram cover all twelve.
        assert!(text.contains(r#"datapunk_lb_instances{service="api",state="eligible"} 12"#));
        assert!(
            text.contains(
                r#"datapunk_lb_instance_health_score_distribution_count{service="api"} 12"#
            ),
            "{text}"
        );
        // 0.9 - 0.05 i <= 0.5 for i >= 8: i008..=i011.
        assert!(
            text.contains(
                r#"datapunk_lb_instance_health_score_distribution_bucket{le="0.5",service="api"} 4"#
            ) || text.contains(
                r#"datapunk_lb_instance_health_score_distribution_bucket{service="api",le="0.5"} 4"#
            ),
            "{text}"
        );
    }

    #[test]
    fn a_limited_services_request_sum_never_goes_down() {
        let core = core_with(4, |_| 1.0, 5);
        let m = Metrics::new(core.clone());
        m.instance_series_limit("api", 2);
        let sum = |m: &Metrics| {
            m.encode()
                .lines()
                .find(|l| l.starts_with(r#"datapunk_lb_requests_total{service="api",instance="",outcome="success"}"#))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        };
        assert_eq!(sum(&m), Some(20));
        // A removal takes 5 out of the raw sum: the export holds.
        core.deregister_instance("api", "i000").unwrap();
        assert_eq!(sum(&m), Some(20));
        // New traffic adds on top.
        request(&core, "i001");
        assert_eq!(sum(&m), Some(21));
    }

    /// Measures `/metrics` encoding at 100,000 instances in one service
    /// (run with `--ignored --nocapture`, in release).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_encode_at_100k_instances() {
        use datapunk_lb_core::ServiceInstance;
        let core = Arc::new(CoreRegistry::new());
        let list = (0..100_000usize).map(|i| {
            ServiceInstance::try_new(&format!("i{i:06}"), "127.0.0.1", 1 + (i % 60000) as u16)
                .unwrap()
        });
        core.register_instances("api", list).unwrap();
        let m = Metrics::new(core);
        for limit in [usize::MAX, DEFAULT_METRICS_INSTANCE_SERIES_LIMIT] {
            m.instance_series_limit("api", limit);
            let mut times = Vec::new();
            let mut size = 0;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                size = m.encode().len();
                times.push(t.elapsed());
            }
            times.sort();
            eprintln!("limit {limit}: {size} bytes, median {:?}", times[2]);
        }
    }
}
