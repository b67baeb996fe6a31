//! What the status page draws as history: the last five minutes of each
//! service and of its first instances, and the last state changes.
//!
//! ## Samples: one per second, 300 kept, sampled from counters that exist
//!
//! The upkeep task calls [`History::tick`] every 100 ms; about once a
//! second ([`INTERVAL`]) it reads what the core and the metrics already
//! keep and pushes one [`Point`] per series into a fixed ring of
//! [`SAMPLES`] points (the oldest is overwritten). The request path does
//! nothing more than before:
//!
//! - **requests/s** and **error ratio** are deltas of the core's exact
//!   per-instance `requests` and `failures` counters over the measured time
//!   since the previous sample (a counter that went down means the instance
//!   was registered again, and the new value is the delta);
//! - **p99 latency of a service** is read from the
//!   `datapunk_lb_request_duration_seconds` histogram the proxy already
//!   fills: the bucket counts' deltas since the previous sample, and the
//!   quantile interpolated linearly inside its bucket, as Prometheus'
//!   `histogram_quantile` does (so it is as coarse as the buckets, and
//!   absent in a second without requests or with the service's metrics
//!   disabled);
//! - **latency of an instance** is the core's peak-EWMA latency: no
//!   per-instance histogram exists, and adding one would be per-request
//!   work and memory per instance;
//! - **health** is the instance's health score, and for a service the mean
//!   over all its instances.
//!
//! ## Bounded memory and work
//!
//! A point is 16 bytes (four `f32`), so a series is 4.8 KB, plus ~100 bytes
//! of id and counters: about **4.9 KB per instance with history**. Only the
//! first [`MAX_INSTANCES_PER_SERVICE`] instances of a service (in member
//! order) and the first [`MAX_SERVICES`] services (by name) have history,
//! so with 100,000 instances the history holds at most 64 + 64 × 24 series,
//! ~7.8 MB, whatever the instance count; the other instances show their live
//! values only. The sample walks every instance of those services once a
//! second (the service sums need them all), which costs what a Prometheus
//! scrape of them costs: measured (`measure_a_sample_at_100k_instances`,
//! release build) 26 ms for one service of 100,000 instances, 1.5 ms for
//! 1,000 services of 100 (64 sampled), on the upkeep task.
//!
//! ## Changes: the last [`MAX_CHANGES`]
//!
//! Every core [`Event`] passes through `Metrics::report` (and
//! `ServiceMetrics::report` on the request path), which hands it to
//! [`History::record`]: breaker transitions, ejections and restorations,
//! panic mode, adaptive strategy switches and removals, each with its wall
//! time, service, instance, from → to and reason.
//!
//! ## Incremental reads
//!
//! Every sample has a sequence number and every change an id; the page
//! asks `/status/data?since=<seq>&changes=<id>` and gets only what is
//! newer, so a poll carries one point per series instead of 300. A first
//! load (no `since`) carries a service's 300 points but only the last
//! [`FIRST_LOAD_INSTANCE_POINTS`] of each instance, which keeps it under
//! 100 KB with the 20 instances the page shows per service.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::metrics::WorkerHistogram;
use datapunk_lb_core::{Event, Registry as CoreRegistry};
use parking_lot::Mutex;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry as PromRegistry;
use serde_json::{json, Value};

/// Points kept per series: five minutes at one a second.
pub const SAMPLES: usize = 300;
/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Instances of one service with history (the first, in member order).
pub const MAX_INSTANCES_PER_SERVICE: usize = 24;
/// Services with history (the first, by name).
pub const MAX_SERVICES: usize = 64;
/// State changes kept.
pub const MAX_CHANGES: usize = 200;
/// Points of an instance's series in a first load (no `since`): two
/// minutes. Twenty shown instances with all 300 points made a first load
/// of ~110–140 KB; with 120 it stays under 100 KB (the service's own
/// series still comes whole, and later polls add one point a second).
pub const FIRST_LOAD_INSTANCE_POINTS: usize = 120;

/// A tick this close to [`INTERVAL`] samples: the upkeep ticks every 100 ms
/// with jitter, and waiting for the full second would skip to 1.1 s.
const SLACK: Duration = Duration::from_millis(50);

/// One sample of one series. `NaN` means "no value" (no requests in the
/// second, or the first sample of a new series), drawn as a gap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Requests per second.
    pub rps: f32,
    /// Failures / requests in the second.
    pub error_ratio: f32,
    /// Service: p99 from the histogram; instance: peak-EWMA latency. Milliseconds.
    pub latency_ms: f32,
    /// Health score, 0 to 1.
    pub health: f32,
}

impl Point {
    const EMPTY: Point = Point {
        rps: f32::NAN,
        error_ratio: f32::NAN,
        latency_ms: f32::NAN,
        health: f32::NAN,
    };
}

/// A fixed ring of the last [`SAMPLES`] points.
#[derive(Debug)]
pub struct Ring {
    points: Box<[Point; SAMPLES]>,
    /// Where the next point goes.
    next: usize,
    /// Points held (≤ [`SAMPLES`]).
    len: usize,
}

impl Default for Ring {
    fn default() -> Self {
        Self {
            points: Box::new([Point::EMPTY; SAMPLES]),
            next: 0,
            len: 0,
        }
    }
}

impl Ring {
    /// Adds `p`, overwriting the oldest point when full.
    pub fn push(&mut self, p: Point) {
        self.points[self.next] = p;
        self.next = (self.next + 1) % SAMPLES;
        self.len = (self.len + 1).min(SAMPLES);
    }

    /// Points held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no point was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The last `n` points (at most [`Ring::len`]), oldest first.
    pub fn last(&self, n: usize) -> impl Iterator<Item = Point> + '_ {
        let n = n.min(self.len);
        let start = (self.next + SAMPLES - n) % SAMPLES;
        (0..n).map(move |i| self.points[(start + i) % SAMPLES])
    }
}

/// One instance as a sample sees it.
#[derive(Debug, Clone, Copy)]
pub struct InstanceReading<'a> {
    /// Instance id.
    pub id: &'a str,
    /// Requests recorded since registration.
    pub requests: u64,
    /// Failures recorded since registration.
    pub failures: u64,
    /// Peak-EWMA latency in milliseconds.
    pub latency_ms: f64,
    /// Health score.
    pub health: f64,
}

/// Sums over every instance of a service, for its own series.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    /// Instances.
    pub count: usize,
    /// Σ requests.
    pub requests: u64,
    /// Σ failures.
    pub failures: u64,
    /// Σ health score.
    pub health: f64,
}

impl Totals {
    /// Adds one instance.
    pub fn add(&mut self, requests: u64, failures: u64, health: f64) {
        self.count += 1;
        self.requests = self.requests.saturating_add(requests);
        self.failures = self.failures.saturating_add(failures);
        self.health += health;
    }

    /// The totals of `instances`.
    pub fn of(instances: &[InstanceReading<'_>]) -> Self {
        let mut t = Totals::default();
        for i in instances {
            t.add(i.requests, i.failures, i.health);
        }
        t
    }
}

/// One service as a sample sees it.
#[derive(Debug, Clone)]
pub struct ServiceReading<'a> {
    /// Service name.
    pub name: &'a str,
    /// The first instances, in member order (at least the first
    /// [`MAX_INSTANCES_PER_SERVICE`]; more are ignored).
    pub instances: Vec<InstanceReading<'a>>,
    /// Sums over every instance.
    pub totals: Totals,
    /// The duration histogram: `(upper bound in seconds, cumulative count)`,
    /// ascending, ending with `+Inf`; `None` if the service has none.
    pub buckets: Option<Vec<(f64, u64)>>,
}

#[derive(Debug, Default)]
struct Counters {
    requests: u64,
    failures: u64,
}

impl Counters {
    /// Requests/s and error ratio since the last call; `None` the first time.
    fn advance(&mut self, requests: u64, failures: u64, dt: f64, first: bool) -> (f32, f32) {
        let delta = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
        let (dr, df) = (
            delta(requests, self.requests),
            delta(failures, self.failures),
        );
        self.requests = requests;
        self.failures = failures;
        if first || dt <= 0.0 {
            return (f32::NAN, f32::NAN);
        }
        let ratio = if dr == 0 {
            f32::NAN
        } else {
            (df.min(dr) as f64 / dr as f64) as f32
        };
        ((dr as f64 / dt) as f32, ratio)
    }
}

#[derive(Debug, Default)]
struct Series {
    ring: Ring,
    counters: Counters,
    /// The sample that last saw it; series not seen in a sample are dropped.
    seen: u64,
}

#[derive(Debug, Default)]
struct ServiceSeries {
    series: Series,
    buckets: Vec<(f64, u64)>,
    instances: HashMap<String, Series>,
}

/// One state change, as the timeline shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Increasing id, for `?changes=`.
    pub id: u64,
    /// Wall time, Unix milliseconds.
    pub at_ms: u64,
    /// `breaker`, `ejection`, `panic`, `strategy` or `removal`.
    pub kind: &'static str,
    /// Service.
    pub service: Arc<str>,
    /// Instance, when the change is an instance's.
    pub instance: Option<String>,
    /// State before.
    pub from: &'static str,
    /// State after.
    pub to: &'static str,
    /// Why.
    pub reason: String,
}

impl Change {
    fn from_event(e: &Event) -> Change {
        let (kind, service, instance, reason) = match e {
            Event::Breaker {
                service,
                instance,
                transition: t,
            } => ("breaker", service, Some(instance), t.reason.to_string()),
            Event::Eligibility {
                service,
                instance,
                reason,
                ..
            } => ("ejection", service, Some(instance), (*reason).to_owned()),
            Event::Panic {
                service,
                eligible,
                total,
                ..
            } => (
                "panic",
                service,
                None,
                format!("{eligible} of {total} instances eligible"),
            ),
            Event::StrategySwitch {
                service, reason, ..
            } => ("strategy", service, None, reason.clone()),
            Event::Removed {
                service,
                instance,
                reason,
            } => ("removal", service, Some(instance), (*reason).to_owned()),
        };
        let (from, to) = crate::telemetry::from_to(e);
        Change {
            id: 0,
            at_ms: unix_ms(SystemTime::now()),
            kind,
            service: service.clone(),
            instance: instance.map(|i| i.as_str().to_owned()),
            from,
            to,
            reason,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "at_ms": self.at_ms,
            "kind": self.kind,
            "service": &*self.service,
            "instance": self.instance,
            "from": self.from,
            "to": self.to,
            "reason": self.reason,
        })
    }
}

#[derive(Debug, Default)]
struct Samples {
    /// Sequence number of the last sample (0: none yet).
    seq: u64,
    /// Wall time of the last sample, Unix milliseconds.
    at_ms: u64,
    last: Option<Instant>,
    services: HashMap<String, ServiceSeries>,
}

#[derive(Debug, Default)]
struct Changes {
    next_id: u64,
    list: VecDeque<Change>,
}

/// The history of one process: samples and state changes.
pub struct History {
    samples: Mutex<Samples>,
    changes: Mutex<Changes>,
    /// A registry holding only the duration histogram family, encoded to
    /// read its buckets (prometheus-client exposes them no other way).
    durations: PromRegistry,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").finish_non_exhaustive()
    }
}

impl Default for History {
    fn default() -> Self {
        Self::new(Family::new_with_constructor(|| {
            WorkerHistogram::new(std::iter::empty())
        }))
    }
}

/// The label set of the duration histogram (as `crate::metrics` keys it).
pub(crate) type DurationFamily = Family<Vec<(&'static str, String)>, WorkerHistogram>;

const FAMILY: &str = "d";

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl History {
    /// A history reading service latencies from `durations`.
    pub(crate) fn new(durations: DurationFamily) -> Self {
        let mut registry = PromRegistry::default();
        registry.register(FAMILY, "", durations);
        Self {
            samples: Mutex::default(),
            changes: Mutex::default(),
            durations: registry,
        }
    }

    /// Records the state changes among `events`.
    pub fn record(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let mut c = self.changes.lock();
        for e in events {
            let mut change = Change::from_event(e);
            c.next_id += 1;
            change.id = c.next_id;
            if c.list.len() == MAX_CHANGES {
                c.list.pop_front();
            }
            c.list.push_back(change);
        }
    }

    /// Samples `core` if [`INTERVAL`] has passed since the last sample.
    pub fn tick(&self, core: &CoreRegistry) {
        let now = Instant::now();
        if let Some(last) = self.samples.lock().last {
            if now.duration_since(last) + SLACK < INTERVAL {
                return;
            }
        }
        let mut buckets = self.buckets();
        // One pass over each service's members, reading atomics: no status
        // per instance is built (at 100,000 instances a list of statuses
        // was ~25 MB allocated and freed every second).
        let services: Vec<(String, datapunk_lb_core::Members)> = core
            .service_names()
            .into_iter()
            .take(MAX_SERVICES)
            .filter_map(|name| core.service(&name).map(|s| (name, s.members())))
            .collect();
        let readings: Vec<ServiceReading<'_>> = services
            .iter()
            .map(|(name, members)| {
                let mut totals = Totals::default();
                let mut instances = Vec::with_capacity(MAX_INSTANCES_PER_SERVICE);
                for m in members.iter() {
                    let (requests, failures, health) =
                        (m.requests(), m.failures(), m.health_score());
                    totals.add(requests, failures, health);
                    if instances.len() < MAX_INSTANCES_PER_SERVICE {
                        instances.push(InstanceReading {
                            id: m.instance().id().as_str(),
                            requests,
                            failures,
                            latency_ms: m.latency_ewma_ns() / 1e6,
                            health,
                        });
                    }
                }
                ServiceReading {
                    name,
                    instances,
                    totals,
                    buckets: buckets.remove(name.as_str()),
                }
            })
            .collect();
        self.sample(now, SystemTime::now(), &readings);
    }

    /// Pushes one point per series from `readings`, taken at `now`.
    pub fn sample(&self, now: Instant, wall: SystemTime, readings: &[ServiceReading<'_>]) {
        let mut s = self.samples.lock();
        let dt = s.last.map_or(0.0, |l| now.duration_since(l).as_secs_f64());
        s.last = Some(now);
        s.seq += 1;
        s.at_ms = unix_ms(wall);
        let seq = s.seq;
        for r in readings.iter().take(MAX_SERVICES) {
            let svc = s.services.entry(r.name.to_owned()).or_default();
            let first = svc.series.seen == 0;
            svc.series.seen = seq;
            let Totals {
                count,
                requests,
                failures,
                health: health_sum,
            } = r.totals;
            let (rps, error_ratio) = svc.series.counters.advance(requests, failures, dt, first);
            let p99 = match &r.buckets {
                Some(now_b) => {
                    let q = if first {
                        f64::NAN
                    } else {
                        quantile(0.99, &svc.buckets, now_b)
                    };
                    svc.buckets.clone_from(now_b);
                    q * 1e3
                }
                None => f64::NAN,
            };
            let health = if count == 0 {
                f64::NAN
            } else {
                health_sum / count as f64
            };
            svc.series.ring.push(Point {
                rps,
                error_ratio,
                latency_ms: p99 as f32,
                health: health as f32,
            });
            for i in r.instances.iter().take(MAX_INSTANCES_PER_SERVICE) {
                let ser = svc.instances.entry(i.id.to_owned()).or_default();
                let first = ser.seen == 0;
                ser.seen = seq;
                let (rps, error_ratio) = ser.counters.advance(i.requests, i.failures, dt, first);
                ser.ring.push(Point {
                    rps,
                    error_ratio,
                    latency_ms: i.latency_ms as f32,
                    health: i.health as f32,
                });
            }
            svc.instances.retain(|_, ser| ser.seen == seq);
        }
        s.services.retain(|_, svc| svc.series.seen == seq);
    }

    /// Cumulative bucket counts of every service's duration histogram.
    fn buckets(&self) -> HashMap<String, Vec<(f64, u64)>> {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.durations).is_err() {
            return HashMap::new();
        }
        parse_buckets(&text)
    }

    /// A read of the history for one `/status/data` answer.
    pub fn view(&self, since: Option<u64>, changes_after: Option<u64>) -> View {
        let s = self.samples.lock();
        let changes = self.changes.lock();
        let list: Vec<Value> = changes
            .list
            .iter()
            .filter(|c| changes_after.is_none_or(|after| c.id > after))
            .map(Change::to_json)
            .collect();
        let series = |ser: &Series| series_json(ser, s.seq, since);
        // A first load sends an instance only its last points (see
        // FIRST_LOAD_INSTANCE_POINTS); the page's polls then extend them.
        let instance_since =
            since.or_else(|| Some(s.seq.saturating_sub(FIRST_LOAD_INSTANCE_POINTS as u64)));
        let services = s
            .services
            .iter()
            .map(|(name, svc)| {
                let instances = svc
                    .instances
                    .iter()
                    .map(|(id, ser)| (id.clone(), series_json(ser, s.seq, instance_since)))
                    .collect();
                (name.clone(), (series(&svc.series), instances))
            })
            .collect();
        View {
            head: json!({
                "seq": s.seq,
                "at_ms": s.at_ms,
                "interval_ms": INTERVAL.as_millis() as u64,
                "samples": SAMPLES,
                "changes": list,
            }),
            services,
        }
    }
}

/// The history part of one `/status/data` answer.
#[derive(Debug)]
pub struct View {
    /// `seq`, `at_ms`, `interval_ms`, `samples` and the new `changes`.
    pub head: Value,
    services: HashMap<String, (Value, HashMap<String, Value>)>,
}

impl View {
    /// The service's series, if it has history (once).
    pub fn take_service(&mut self, name: &str) -> Option<Value> {
        self.services.get_mut(name).map(|(v, _)| std::mem::take(v))
    }

    /// The instance's series, if it has history (once).
    pub fn take_instance(&mut self, service: &str, id: &str) -> Option<Value> {
        self.services
            .get_mut(service)
            .and_then(|(_, i)| i.remove(id))
    }
}

/// The points of `ser` newer than `since` (all it holds without `since`):
/// `from` is the sequence number of the first point sent.
fn series_json(ser: &Series, seq: u64, since: Option<u64>) -> Value {
    let held = ser.ring.len() as u64;
    let n = since.map_or(held, |s| seq.saturating_sub(s).min(held));
    let points: Vec<Point> = ser.ring.last(n as usize).collect();
    let col = |f: fn(&Point) -> f32, scale: f64| -> Value {
        points
            .iter()
            .map(|p| {
                let v = f64::from(f(p));
                if v.is_finite() {
                    json!((v * scale).round() / scale)
                } else {
                    Value::Null
                }
            })
            .collect()
    };
    json!({
        "from": seq + 1 - n,
        "rps": col(|p| p.rps, 100.0),
        "error_ratio": col(|p| p.error_ratio, 10_000.0),
        "latency_ms": col(|p| p.latency_ms, 100.0),
        "health": col(|p| p.health, 1000.0),
    })
}

/// The `q` quantile of the observations between two cumulative bucket
/// readings, interpolated linearly inside its bucket (`histogram_quantile`);
/// in the `+Inf` bucket, the largest finite bound. `NaN` if there were none
/// or the bounds differ.
pub fn quantile(q: f64, before: &[(f64, u64)], now: &[(f64, u64)]) -> f64 {
    let delta = |i: usize| -> u64 {
        let old = before.get(i).filter(|b| b.0 == now[i].0).map_or(0, |b| b.1);
        now[i].1.checked_sub(old).unwrap_or(now[i].1)
    };
    let Some(total) = now.len().checked_sub(1).map(delta) else {
        return f64::NAN;
    };
    if total == 0 {
        return f64::NAN;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for (i, &(upper, _)) in now.iter().enumerate() {
        let count = delta(i);
        if count as f64 >= rank {
            if upper.is_infinite() {
                return lower.0;
            }
            let in_bucket = (count - lower.1) as f64;
            let frac = if in_bucket > 0.0 {
                (rank - lower.1 as f64) / in_bucket
            } else {
                1.0
            };
            return lower.0 + (upper - lower.0) * frac;
        }
        lower = (upper, count);
    }
    lower.0
}

/// `d_bucket{le="…",service="…"} N` lines of the text encoding, by
/// service. (prometheus-client 0.23 writes `le` first and does not escape
/// label values: the name runs to the last `"} `.)
fn parse_buckets(text: &str) -> HashMap<String, Vec<(f64, u64)>> {
    let mut out: HashMap<String, Vec<(f64, u64)>> = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("d_bucket{le=\"") else {
            continue;
        };
        let Some((le, rest)) = rest.split_once("\",service=\"") else {
            continue;
        };
        let Some((name, count)) = rest.rsplit_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse() {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        let Ok(count) = count.trim().parse::<u64>() else {
            continue;
        };
        out.entry(name.to_owned()).or_default().push((le, count));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(v: f32) -> Point {
        Point {
            rps: v,
            error_ratio: 0.0,
            latency_ms: 0.0,
            health: 1.0,
        }
    }

    #[test]
    fn ring_wraps_and_stays_bounded() {
        let mut r = Ring::default();
        assert!(r.is_empty());
        for i in 0..(SAMPLES + 7) {
            r.push(point(i as f32));
        }
        assert_eq!(r.len(), SAMPLES);
        let all: Vec<f32> = r.last(usize::MAX).map(|p| p.rps).collect();
        assert_eq!(all.len(), SAMPLES);
        assert_eq!(all[0], 7.0, "the 7 oldest were overwritten");
        assert_eq!(all[SAMPLES - 1], (SAMPLES + 6) as f32);
        assert!(all.windows(2).all(|w| w[1] == w[0] + 1.0), "in order");
        let tail: Vec<f32> = r.last(2).map(|p| p.rps).collect();
        assert_eq!(tail, [(SAMPLES + 5) as f32, (SAMPLES + 6) as f32]);
    }

    fn reading<'a>(
        instances: &[(&'a str, u64, u64)],
        buckets: Option<Vec<(f64, u64)>>,
    ) -> Vec<ServiceReading<'a>> {
        let instances: Vec<InstanceReading<'a>> = instances
            .iter()
            .map(|&(id, requests, failures)| InstanceReading {
                id,
                requests,
                failures,
                latency_ms: 12.5,
                health: 0.5,
            })
            .collect();
        vec![ServiceReading {
            name: "api",
            totals: Totals::of(&instances),
            instances,
            buckets,
        }]
    }

    fn col(v: impl std::borrow::Borrow<Value>, name: &str) -> Vec<Value> {
        let v = v.borrow();
        v[name].as_array().cloned().unwrap_or_default()
    }

    #[test]
    fn rates_and_ratios_come_from_counter_deltas_over_measured_time() {
        let h = History::default();
        let t0 = Instant::now();
        let wall = SystemTime::now();
        h.sample(t0, wall, &reading(&[("a", 100, 10), ("b", 0, 0)], None));
        // 2 s later: a +40 requests (+4 failures), b +20 requests.
        let t1 = t0 + Duration::from_secs(2);
        h.sample(t1, wall, &reading(&[("a", 140, 14), ("b", 20, 0)], None));
        // b re-registered: its counter restarted at 6.
        let t2 = t1 + Duration::from_secs(1);
        h.sample(t2, wall, &reading(&[("a", 140, 14), ("b", 6, 6)], None));

        let mut v = h.view(None, None);
        assert_eq!(v.head["seq"], 3);
        let a = v.take_instance("api", "a").unwrap();
        assert_eq!(a["from"], 1);
        assert_eq!(col(&a, "rps"), [Value::Null, json!(20.0), json!(0.0)]);
        assert_eq!(
            col(&a, "error_ratio"),
            [Value::Null, json!(0.1), Value::Null]
        );
        assert_eq!(col(&a, "latency_ms")[2], json!(12.5));
        let b = v.take_instance("api", "b").unwrap();
        assert_eq!(col(&b, "rps"), [Value::Null, json!(10.0), json!(6.0)]);
        assert_eq!(col(&b, "error_ratio")[2], json!(1.0));
        let svc = v.take_service("api").unwrap();
        assert_eq!(col(&svc, "rps")[1], json!(30.0), "(40 + 20) / 2 s");
        assert_eq!(col(&svc, "health")[1], json!(0.5));

        // Incremental: only what is newer than `since`.
        let mut v = h.view(Some(2), None);
        let a = v.take_instance("api", "a").unwrap();
        assert_eq!(a["from"], 3);
        assert_eq!(col(&a, "rps"), [json!(0.0)]);
        assert_eq!(col(&h.view(Some(3), None).head, "changes").len(), 0);
        assert!(col(
            h.view(Some(3), None).take_instance("api", "a").unwrap(),
            "rps"
        )
        .is_empty());
    }

    #[test]
    fn instances_with_history_are_capped_and_gone_ones_dropped() {
        let h = History::default();
        let ids: Vec<String> = (0..MAX_INSTANCES_PER_SERVICE + 5)
            .map(|i| format!("i{i}"))
            .collect();
        let list: Vec<(&str, u64, u64)> = ids.iter().map(|i| (i.as_str(), 0, 0)).collect();
        let t0 = Instant::now();
        h.sample(t0, SystemTime::now(), &reading(&list, None));
        let mut v = h.view(None, None);
        assert!(v.take_instance("api", "i0").is_some());
        let last = format!("i{}", MAX_INSTANCES_PER_SERVICE - 1);
        assert!(v.take_instance("api", &last).is_some());
        let over = format!("i{MAX_INSTANCES_PER_SERVICE}");
        assert!(v.take_instance("api", &over).is_none(), "over the cap");
        h.sample(t0 + INTERVAL, SystemTime::now(), &reading(&list[1..], None));
        let mut v = h.view(None, None);
        assert!(
            v.take_instance("api", "i0").is_none(),
            "removed instance dropped"
        );
        let moved_in = v.take_instance("api", &over);
        assert_eq!(
            moved_in.map(|o| o["from"].clone()),
            Some(json!(2)),
            "the next one moves in"
        );
        // Many samples: every series holds at most SAMPLES points.
        for k in 0..(SAMPLES as u64 + 10) {
            let t = t0 + INTERVAL * (k as u32 + 2);
            h.sample(t, SystemTime::now(), &reading(&list[1..], None));
        }
        let mut v = h.view(None, None);
        assert_eq!(col(v.take_service("api").unwrap(), "rps").len(), SAMPLES);
        // A first load sends an instance its last points only; a read
        // since 0 gets every point it holds.
        assert_eq!(
            col(v.take_instance("api", "i1").unwrap(), "rps").len(),
            FIRST_LOAD_INSTANCE_POINTS
        );
        assert_eq!(
            col(
                h.view(Some(0), None).take_instance("api", "i1").unwrap(),
                "rps"
            )
            .len(),
            SAMPLES
        );
    }

    /// The history part of a first `/status/data` load at full history:
    /// the service and the 20 instances the page shows, with busy,
    /// non-round values (the longest numbers), under 90 KB, so the whole
    /// answer (their rows add ~7.5 KB) stays under 100 KB.
    #[test]
    fn a_first_load_of_twenty_instances_at_full_history_stays_under_90_kb() {
        let h = History::default();
        let t0 = Instant::now();
        let ids: Vec<String> = (0..20).map(|i| format!("instance-{i:02}")).collect();
        for k in 0..(SAMPLES as u64 + 5) {
            let list: Vec<(&str, u64, u64)> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| (id.as_str(), k * (1237 + i as u64 * 7), k * 13))
                .collect();
            let mut r = reading(&list, Some(vec![(0.01, k * 97), (f64::INFINITY, k * 1299)]));
            for (j, i) in r[0].instances.iter_mut().enumerate() {
                i.latency_ms = 12.3456 + j as f64 / 7.0;
                i.health = 0.987_654 - j as f64 / 1000.0;
            }
            h.sample(t0 + INTERVAL * k as u32, SystemTime::now(), &r);
        }
        let mut v = h.view(None, None);
        let mut size = v.head.to_string().len() + v.take_service("api").unwrap().to_string().len();
        let one = v.take_instance("api", &ids[0]).unwrap();
        assert_eq!(col(&one, "rps").len(), FIRST_LOAD_INSTANCE_POINTS);
        size += one.to_string().len();
        for id in &ids[1..] {
            size += v.take_instance("api", id).unwrap().to_string().len();
        }
        assert!(size < 90_000, "{size} bytes");
    }

    #[test]
    fn p99_comes_from_bucket_deltas() {
        let b = |counts: [u64; 4]| -> Vec<(f64, u64)> {
            [0.01, 0.1, 1.0, f64::INFINITY]
                .into_iter()
                .zip(counts)
                .collect()
        };
        // 1000 old observations, all under 10 ms, must not count.
        let before = b([1000, 1000, 1000, 1000]);
        // Since: 100 new ones, 90 under 10 ms, 10 in (0.1, 1]: the 99th is
        // the 9th of those 10, at 0.1 + 0.9 × (1 − 0.1) = 0.91 s.
        let now = b([1090, 1090, 1100, 1100]);
        assert!((quantile(0.99, &before, &now) - 0.91).abs() < 1e-9);
        assert!(quantile(0.99, &now, &now).is_nan(), "no new observations");
        // In the +Inf bucket: the largest finite bound.
        let now = b([1000, 1000, 1000, 1010]);
        assert_eq!(quantile(0.99, &before, &now), 1.0);
        // Through sample(): the first reading only sets the baseline.
        let h = History::default();
        let t0 = Instant::now();
        h.sample(
            t0,
            SystemTime::now(),
            &reading(&[("a", 0, 0)], Some(before)),
        );
        h.sample(
            t0 + INTERVAL,
            SystemTime::now(),
            &reading(&[("a", 0, 0)], Some(b([1090, 1090, 1100, 1100]))),
        );
        let mut v = h.view(None, None);
        let p99 = col(v.take_service("api").unwrap(), "latency_ms");
        assert_eq!(p99, [Value::Null, json!(910.0)]);
    }

    #[test]
    fn buckets_are_read_from_the_histogram_family() {
        let family = DurationFamily::new_with_constructor(|| WorkerHistogram::new([0.01, 0.1]));
        let h = History::new(family.clone());
        let labels = vec![("service", "we\"ird\\name".to_owned())];
        family.get_or_create(&labels).observe(0.05);
        family.get_or_create(&labels).observe(5.0);
        let b = h.buckets();
        assert_eq!(
            b["we\"ird\\name"],
            [(0.01, 0), (0.1, 1), (f64::INFINITY, 2)],
            "{b:?}"
        );
    }

    #[test]
    fn changes_are_bounded_and_read_incrementally() {
        use datapunk_lb_core::InstanceId;
        let h = History::default();
        let removed = |i: usize| Event::Removed {
            service: Arc::from("api"),
            instance: InstanceId::try_new(&format!("i{i}")).unwrap(),
            reason: "drained",
        };
        let events: Vec<Event> = (0..MAX_CHANGES + 3).map(removed).collect();
        h.record(&events);
        h.record(&[Event::Panic {
            service: Arc::from("api"),
            entered: true,
            eligible: 1,
            total: 4,
        }]);
        let all = col(&h.view(None, None).head, "changes");
        assert_eq!(all.len(), MAX_CHANGES);
        assert_eq!(all[0]["instance"], "i4", "the oldest were dropped");
        let newest = &all[MAX_CHANGES - 1];
        assert_eq!(newest["kind"], "panic");
        assert_eq!(newest["from"], "normal");
        assert_eq!(newest["to"], "panic");
        assert_eq!(newest["reason"], "1 of 4 instances eligible");
        let id = all[MAX_CHANGES - 2]["id"].as_u64().unwrap();
        let newer = col(&h.view(None, Some(id)).head, "changes");
        assert_eq!(newer.len(), 1);
        assert_eq!(newer[0]["kind"], "panic");
    }

    /// Measures one sample at 100,000 instances (run with `--ignored
    /// --nocapture`, in release for realistic numbers).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_a_sample_at_100k_instances() {
        use datapunk_lb_core::ServiceInstance;
        for (services, per) in [(1usize, 100_000usize), (1000, 100)] {
            let core = CoreRegistry::new();
            for s in 0..services {
                let list = (0..per).map(|i| {
                    ServiceInstance::try_new(&format!("i{i}"), "127.0.0.1", 1 + (i % 60000) as u16)
                        .unwrap()
                });
                core.register_instances(&format!("svc{s:04}"), list)
                    .unwrap();
            }
            let h = History::default();
            h.tick(&core);
            let mut times = Vec::new();
            for _ in 0..5 {
                h.samples.lock().last = None;
                let t = Instant::now();
                h.tick(&core);
                times.push(t.elapsed());
            }
            let s = h.samples.lock();
            let series: usize = s.services.values().map(|v| 1 + v.instances.len()).sum();
            eprintln!(
                "{services} services x {per} instances: sample takes {:?} (min of 5), {series} series with history, {} KB of points",
                times.iter().min().unwrap(),
                series * std::mem::size_of::<[Point; SAMPLES]>() / 1024
            );
        }
    }
}
