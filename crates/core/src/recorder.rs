//! The [`Recorder`]: the part of a service that outcomes are recorded
//! into — its name, clock, configuration, counters, panic flag and seed —
//! and the [`Outcome`] and [`FailureKind`] it records.
//!
//! It sits below [`selection`](crate::selection) and
//! [`service`](crate::service): a [`Selection`](crate::Selection) holds an
//! `Arc<Recorder>` (a plain struct, so reporting costs no virtual call), and
//! the [`Service`](crate::Service) owns one beside its snapshot and writer.
//! So the guard reports straight to its service's state without either
//! module importing the other.
//!
//! ## Rule
//!
//! Recording an outcome moves the instance's health tracker, breaker and (for
//! a request) latency EWMA under its lock, publishes what selection reads,
//! recounts the instance in the service's [`ServiceStats`] (the only way
//! those counters change) and re-decides panic mode; every change comes back
//! as an [`Event`].
//!
//! An outcome from an active check (`Source::Probe`) goes to the breaker's
//! check methods: checks may end an open window early but only real
//! requests close a breaker (the `breaker` module doc, "Active checks").

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::breaker::{CircuitState, Transition};
use crate::clock::{Clock, Timestamp};
use crate::config::LoadBalancerConfig;
use crate::event::Event;
use crate::instance::{Member, Trackers};
use crate::per_thread::Padded;
use crate::stats::{Availability, ServiceStats};

/// How much newer a clock reading must be to move a service's
/// [`latest`](Recorder::latest).
const LATEST_STEP_NS: u64 = 1_000_000;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response that counts as success, with its latency.
    Success(Duration),
    /// A failure of the given kind.
    Failure(FailureKind),
}

/// Why a request failed. Every kind counts against health and breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The connection could not be established.
    Connect,
    /// No response within the timeout.
    Timeout,
    /// The connection was reset or closed mid-request.
    Reset,
    /// The instance answered with a server error (5xx).
    ServerError,
    /// The instance broke the protocol.
    Protocol,
    /// An active health check failed.
    HealthCheck,
}

/// Where an outcome came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A request through a `Selection`: counted, feeds the EWMA.
    Request,
    /// An active health check: moves health and breaker only, and the
    /// breaker by its check rule (it never closes on checks alone).
    Probe,
}

/// Where a service's outcomes are recorded. See the module doc.
#[derive(Debug)]
pub struct Recorder {
    pub(crate) name: Arc<str>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: ArcSwap<LoadBalancerConfig>,
    pub(crate) stats: ServiceStats,
    panic: AtomicBool,
    rng: AtomicU64,
    /// The service's latest clock reading, in nanoseconds: see
    /// [`latest`](Self::latest).
    latest: Padded<AtomicU64>,
}

impl FailureKind {
    /// Every kind, in [`index`](Self::index) order.
    pub const ALL: [FailureKind; 6] = [
        FailureKind::Connect,
        FailureKind::Timeout,
        FailureKind::Reset,
        FailureKind::ServerError,
        FailureKind::Protocol,
        FailureKind::HealthCheck,
    ];

    /// Position in [`ALL`](Self::ALL).
    pub fn index(self) -> usize {
        self as usize
    }

    /// A short lower-case name, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Reset => "reset",
            FailureKind::ServerError => "server_error",
            FailureKind::Protocol => "protocol",
            FailureKind::HealthCheck => "health_check",
        }
    }
}

/// A SplitMix64 step: spreads a counter into a well-mixed seed.
#[inline]
pub(crate) fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// === impl Recorder ===

impl Recorder {
    pub(crate) fn new(
        name: Arc<str>,
        clock: Arc<dyn Clock>,
        config: Arc<LoadBalancerConfig>,
        seed: u64,
    ) -> Self {
        Self {
            name,
            clock,
            config: ArcSwap::new(config),
            stats: ServiceStats::default(),
            panic: AtomicBool::new(false),
            rng: AtomicU64::new(seed),
            latest: Padded(AtomicU64::new(0)),
        }
    }

    /// The service name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Now, on the service's clock; the reading becomes the service's
    /// [`latest`](Self::latest).
    #[inline]
    pub(crate) fn now(&self) -> Timestamp {
        let now = self.clock.now();
        self.saw(now);
        now
    }

    /// The service's latest clock reading, without reading the clock:
    /// every reading of the service's clock (a recorded outcome, a pick
    /// that needed the time, `Registry::maintain`, a registration, a
    /// report) moves it forward when it is a millisecond or more newer.
    /// So it is at most a millisecond older than the last reading: while
    /// requests complete, about now; under the server, which calls
    /// `Registry::maintain` every 100 ms, at most 100 ms old. (`service`'s
    /// module doc, "The clock on the pick path".)
    #[inline]
    pub(crate) fn latest(&self) -> &AtomicU64 {
        &self.latest
    }

    /// Moves [`latest`](Self::latest) to `now` if that is a millisecond or
    /// more newer: a shared write at most once a millisecond, however many
    /// threads read the clock.
    #[inline]
    pub(crate) fn saw(&self, now: Timestamp) {
        let t = now.as_nanos();
        if t >= self
            .latest
            .load(Ordering::Relaxed)
            .saturating_add(LATEST_STEP_NS)
        {
            self.latest.store(t, Ordering::Relaxed);
        }
    }

    /// Whether the service was in panic mode at the last pick or change.
    #[inline]
    pub(crate) fn in_panic(&self) -> bool {
        self.panic.load(Ordering::Relaxed)
    }

    #[inline]
    pub(crate) fn next_seed(&self) -> u64 {
        splitmix(self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed))
    }

    pub(crate) fn breaker_event(&self, member: &Member, transition: Transition) -> Event {
        Event::Breaker {
            service: self.name.clone(),
            instance: member.instance().id().clone(),
            transition,
        }
    }

    /// Records an outcome on `member` and returns the events it caused.
    pub(crate) fn record(&self, member: &Member, outcome: Outcome, source: Source) -> Vec<Event> {
        let now = self.now();
        let cfg = self.config.load();
        let live = member.live();
        let request = source == Source::Request;
        if request {
            let failure = match outcome {
                Outcome::Success(_) => None,
                Outcome::Failure(kind) => Some(kind.index()),
            };
            live.count_outcome(failure);
            self.stats.outcome(failure.is_some());
        }
        let jitter = (self.next_seed() >> 11) as f64 / (1u64 << 53) as f64;
        let mut events = Vec::new();
        {
            let mut trackers = live.trackers.lock();
            let transition = match outcome {
                Outcome::Success(latency) => {
                    trackers.health.on_success(now);
                    if request {
                        trackers.ewma.observe(latency, now);
                    }
                    if request {
                        trackers.breaker.on_success(now, &cfg.breaker)
                    } else {
                        trackers.breaker.on_check_success(now, &cfg.breaker)
                    }
                }
                Outcome::Failure(_) => {
                    trackers.health.on_failure(now);
                    if request {
                        trackers.breaker.on_failure(now, &cfg.breaker, jitter)
                    } else {
                        trackers.breaker.on_check_failure(now, &cfg.breaker, jitter)
                    }
                }
            };
            if let Some(t) = transition {
                if t.to == CircuitState::Closed {
                    live.start_slow_start(now);
                }
                events.push(self.breaker_event(member, t));
            }
            live.publish(&trackers);
            self.recount(member, &mut trackers, &mut events);
        }
        if !events.is_empty() {
            self.check_panic(&cfg, &mut events);
        }
        events
    }

    /// Recounts `member` after a change to its live state, with its trackers
    /// locked, and reports an eligibility change.
    pub(crate) fn recount(
        &self,
        member: &Member,
        trackers: &mut Trackers,
        events: &mut Vec<Event>,
    ) {
        let live = member.live();
        if live.hot().removed.load(Ordering::Acquire) {
            return;
        }
        let now = live.availability(trackers);
        let Some(before) = self.stats.recount(&mut trackers.counted, now) else {
            return;
        };
        let reason = match (before, now, trackers.breaker.state()) {
            (Availability::Absent, _, _) | (_, Availability::Absent, _) => return,
            (_, Availability::Draining, _) => "draining",
            (_, Availability::Unavailable, CircuitState::Open) => "circuit open",
            (_, Availability::Unavailable, _) => "health score 0",
            (_, Availability::Available, CircuitState::HalfOpen) => "circuit half-open: probing",
            (_, Availability::Available, _) => "recovered",
        };
        events.push(Event::Eligibility {
            service: self.name.clone(),
            instance: member.instance().id().clone(),
            eligible: now == Availability::Available,
            reason,
        });
    }

    /// Decides panic mode from the counters; reports a change.
    #[inline]
    pub(crate) fn check_panic(&self, cfg: &LoadBalancerConfig, events: &mut Vec<Event>) -> bool {
        let (total, eligible) = self.stats.counted();
        let panic = total > 0 && eligible * 100 < usize::from(cfg.min_healthy_percent) * total;
        if self.panic.load(Ordering::Relaxed) != panic
            && self.panic.swap(panic, Ordering::AcqRel) != panic
        {
            events.push(Event::Panic {
                service: self.name.clone(),
                entered: panic,
                eligible,
                total,
            });
        }
        panic
    }

    /// Gives back the half-open probe slot `member`'s selection held.
    pub(crate) fn release_probe(&self, member: &Member) {
        let live = member.live();
        let mut trackers = live.trackers.lock();
        trackers.breaker.release_probe();
        live.publish(&trackers);
    }
}
