//! The per-instance [`CircuitBreaker`]: `Closed` → `Open` → `HalfOpen` →
//! `Closed`, in textbook vocabulary (`Open` = no traffic).
//!
//! ## Trip conditions (Closed → Open)
//!
//! - `error_threshold` consecutive failures (default 3): catches a dead
//!   instance quickly, even at low traffic; or
//! - a failure rate ≥ `failure_rate_threshold` (default 50 %) over a tumbling
//!   `failure_rate_window` (10 s) holding at least
//!   `failure_rate_min_requests` (20) outcomes: catches an instance that fails
//!   often but not consecutively, without tripping on two errors out of
//!   three at low volume.
//!
//! ## Open window
//!
//! The n-th consecutive trip opens for `min(open_base × 2^(n−1), open_max)`
//! (5 s, 10 s, 20 s … capped at 120 s), shortened by a uniform random fraction
//! in `[0, open_jitter)` (20 %), so the window lies in
//! `[nominal × (1 − open_jitter), nominal]`: it never exceeds the cap and
//! instances that tripped together do not all probe at once. The trip count
//! returns to zero once the breaker has stayed closed for `open_max`.
//!
//! ## Recovery (Open → HalfOpen → Closed)
//!
//! When the window has elapsed the next admission moves the breaker to
//! `HalfOpen`, which admits at most `half_open_max_probes` requests at once.
//! `recovery_threshold` consecutive successes (default 2) close it; any
//! failure reopens it with the next, longer window.
//!
//! Every method that changes the state returns the [`Transition`], so the
//! caller can log and count it; the breaker itself does no I/O.

use std::fmt;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::error::ConfigError;

/// Default consecutive failures that open a breaker: 3.
pub const DEFAULT_ERROR_THRESHOLD: u32 = 3;
/// Default consecutive half-open successes that close a breaker: 2.
pub const DEFAULT_RECOVERY_THRESHOLD: u32 = 2;

/// Everything the breaker decides on (see the module doc for the rule).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (1..=1000). Default 3.
    pub error_threshold: u32,
    /// Consecutive successes in half-open that close the breaker
    /// (1..=1000). Default 2.
    pub recovery_threshold: u32,
    /// Failure rate (0 < r ≤ 1) over `failure_rate_window` that opens the
    /// breaker once `failure_rate_min_requests` were seen. Default 0.5.
    pub failure_rate_threshold: f64,
    /// Length of the failure-rate window. Default 10 s.
    pub failure_rate_window: Duration,
    /// Minimum requests in the window before the rate may trip. Default 20.
    pub failure_rate_min_requests: u32,
    /// Open window after the first trip; doubles on every further trip.
    /// Default 5 s.
    pub open_base: Duration,
    /// Cap on the open window. Default 120 s.
    pub open_max: Duration,
    /// Jitter: the window is shortened by a uniform fraction in
    /// `[0, open_jitter)`, so it never exceeds the cap and trips of many
    /// instances spread out. In `0.0..1.0`. Default 0.2.
    pub open_jitter: f64,
    /// Probes admitted at once while half-open (≥ 1). Default 1.
    pub half_open_max_probes: u32,
}

/// The state of a circuit breaker. The numeric encoding is that of the
/// `datapunk_lb_circuit_state` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Traffic flows. Encoded 0.
    Closed,
    /// A limited number of probes flow. Encoded 1.
    HalfOpen,
    /// No traffic until the open window elapses. Encoded 2.
    Open,
}

/// Why a breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TransitionReason {
    /// `n` consecutive failures reached `error_threshold`.
    ConsecutiveFailures(u32),
    /// `failures` of `total` outcomes in the window reached the rate threshold.
    FailureRate {
        /// Failures in the window.
        failures: u32,
        /// Outcomes in the window.
        total: u32,
    },
    /// The open window elapsed; probing starts.
    OpenWindowElapsed,
    /// A probe failed while half-open.
    ProbeFailed,
    /// `n` consecutive probes succeeded.
    ProbesSucceeded(u32),
}

/// A state change of a breaker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// State before.
    pub from: CircuitState,
    /// State after.
    pub to: CircuitState,
    /// Why.
    pub reason: TransitionReason,
    /// When the breaker is `Open`: how long it stays open.
    pub open_for: Option<Duration>,
}

/// Whether a request may go to the instance now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Closed: admitted.
    Admitted,
    /// Half-open: admitted as a probe; the caller must call
    /// [`CircuitBreaker::release_probe`] when it finishes. Carries the
    /// Open → HalfOpen transition if this admission caused it.
    Probe(Option<Transition>),
    /// Open, or half-open with every probe slot taken.
    Rejected,
}

/// One instance's circuit breaker. Not synchronised: the owner holds it
/// under a lock and publishes what the selection path needs.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    state: CircuitState,
    consecutive_failures: u32,
    consecutive_successes: u32,
    window_start: Option<Timestamp>,
    window_total: u32,
    window_failures: u32,
    /// Consecutive trips without a long enough closed spell in between.
    trips: u32,
    open_until: Timestamp,
    closed_since: Option<Timestamp>,
    probes_in_flight: u32,
}

// === impl CircuitState ===

impl CircuitState {
    /// The metric encoding: 0 closed, 1 half-open, 2 open.
    pub fn as_u8(self) -> u8 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }

    /// Inverse of [`as_u8`](Self::as_u8); unknown values read as `Open`.
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => CircuitState::Closed,
            1 => CircuitState::HalfOpen,
            _ => CircuitState::Open,
        }
    }

    /// `closed`, `half_open` or `open`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::HalfOpen => "half_open",
            CircuitState::Open => "open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransitionReason::ConsecutiveFailures(n) => write!(f, "{n} consecutive failures"),
            TransitionReason::FailureRate { failures, total } => {
                write!(f, "{failures} of {total} requests failed in the window")
            }
            TransitionReason::OpenWindowElapsed => f.write_str("open window elapsed"),
            TransitionReason::ProbeFailed => f.write_str("half-open probe failed"),
            TransitionReason::ProbesSucceeded(n) => write!(f, "{n} consecutive probes succeeded"),
        }
    }
}

// === impl CircuitBreaker ===

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self::new()
    }
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new() -> Self {
        Self {
            state: CircuitState::Closed,
            consecutive_failures: 0,
            consecutive_successes: 0,
            window_start: None,
            window_total: 0,
            window_failures: 0,
            trips: 0,
            open_until: Timestamp::default(),
            closed_since: None,
            probes_in_flight: 0,
        }
    }

    /// The current state (an elapsed `Open` stays `Open` until the next
    /// admission or outcome moves it).
    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// End of the current open window (meaningful when `Open`).
    pub fn open_until(&self) -> Timestamp {
        self.open_until
    }

    /// Probes currently admitted in half-open.
    pub fn probes_in_flight(&self) -> u32 {
        self.probes_in_flight
    }

    /// Consecutive trips so far (the exponent of the open window).
    pub fn trips(&self) -> u32 {
        self.trips
    }

    /// The nominal (un-jittered) open window for the `trips`-th trip.
    pub fn nominal_open_window(trips: u32, cfg: &BreakerConfig) -> Duration {
        let shift = trips.saturating_sub(1).min(31);
        cfg.open_base
            .checked_mul(1u32 << shift)
            .unwrap_or(cfg.open_max)
            .min(cfg.open_max)
    }

    /// Asks to send a request now.
    pub fn try_admit(&mut self, now: Timestamp, cfg: &BreakerConfig) -> Admission {
        let mut transition = None;
        if self.state == CircuitState::Open {
            if now < self.open_until {
                return Admission::Rejected;
            }
            transition = Some(self.enter_half_open());
        }
        match self.state {
            CircuitState::Closed => Admission::Admitted,
            CircuitState::HalfOpen if self.probes_in_flight < cfg.half_open_max_probes => {
                self.probes_in_flight += 1;
                Admission::Probe(transition)
            }
            _ => Admission::Rejected,
        }
    }

    /// Gives back a probe slot taken by [`Admission::Probe`].
    pub fn release_probe(&mut self) {
        self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
    }

    /// Records a success at `now`.
    pub fn on_success(&mut self, now: Timestamp, cfg: &BreakerConfig) -> Option<Transition> {
        self.count_in_window(now, false, cfg);
        self.consecutive_failures = 0;
        match self.state {
            CircuitState::Closed => {
                if let Some(since) = self.closed_since {
                    if now.saturating_since(since) >= cfg.open_max {
                        self.trips = 0;
                    }
                }
                None
            }
            CircuitState::Open if now < self.open_until => None, // a late response
            CircuitState::Open | CircuitState::HalfOpen => {
                let mut first = None;
                if self.state == CircuitState::Open {
                    first = Some(self.enter_half_open());
                }
                self.consecutive_successes += 1;
                if self.consecutive_successes >= cfg.recovery_threshold {
                    let n = self.consecutive_successes;
                    self.state = CircuitState::Closed;
                    self.consecutive_successes = 0;
                    self.closed_since = Some(now);
                    self.reset_window(now);
                    return Some(Transition {
                        from: first.map_or(CircuitState::HalfOpen, |t| t.from),
                        to: CircuitState::Closed,
                        reason: TransitionReason::ProbesSucceeded(n),
                        open_for: None,
                    });
                }
                first
            }
        }
    }

    /// Records a failure at `now`. `jitter` is a uniform random number in
    /// `[0, 1)` used if this failure opens the breaker.
    pub fn on_failure(
        &mut self,
        now: Timestamp,
        cfg: &BreakerConfig,
        jitter: f64,
    ) -> Option<Transition> {
        self.count_in_window(now, true, cfg);
        self.consecutive_successes = 0;
        match self.state {
            CircuitState::Open => None, // a late response from before the trip
            CircuitState::HalfOpen => {
                Some(self.open(now, TransitionReason::ProbeFailed, cfg, jitter))
            }
            CircuitState::Closed => {
                self.consecutive_failures += 1;
                let b = cfg;
                let reason = if self.consecutive_failures >= cfg.error_threshold {
                    Some(TransitionReason::ConsecutiveFailures(
                        self.consecutive_failures,
                    ))
                } else if self.window_total >= b.failure_rate_min_requests
                    && f64::from(self.window_failures)
                        >= b.failure_rate_threshold * f64::from(self.window_total)
                {
                    Some(TransitionReason::FailureRate {
                        failures: self.window_failures,
                        total: self.window_total,
                    })
                } else {
                    None
                };
                reason.map(|r| {
                    if let Some(since) = self.closed_since {
                        if now.saturating_since(since) >= b.open_max {
                            self.trips = 0;
                        }
                    }
                    self.open(now, r, cfg, jitter)
                })
            }
        }
    }

    fn open(
        &mut self,
        now: Timestamp,
        reason: TransitionReason,
        cfg: &BreakerConfig,
        jitter: f64,
    ) -> Transition {
        let from = self.state;
        self.trips = self.trips.saturating_add(1);
        let nominal = Self::nominal_open_window(self.trips, cfg);
        let jitter = jitter.clamp(0.0, 1.0) * cfg.open_jitter;
        let window = nominal.mul_f64(1.0 - jitter);
        self.state = CircuitState::Open;
        self.open_until = now + window;
        self.consecutive_failures = 0;
        self.consecutive_successes = 0;
        self.closed_since = None;
        self.reset_window(now);
        Transition {
            from,
            to: CircuitState::Open,
            reason,
            open_for: Some(window),
        }
    }

    fn enter_half_open(&mut self) -> Transition {
        self.state = CircuitState::HalfOpen;
        self.consecutive_successes = 0;
        Transition {
            from: CircuitState::Open,
            to: CircuitState::HalfOpen,
            reason: TransitionReason::OpenWindowElapsed,
            open_for: None,
        }
    }

    fn count_in_window(&mut self, now: Timestamp, failed: bool, cfg: &BreakerConfig) {
        match self.window_start {
            Some(start) if now.saturating_since(start) < cfg.failure_rate_window => {}
            _ => self.reset_window(now),
        }
        self.window_total = self.window_total.saturating_add(1);
        if failed {
            self.window_failures = self.window_failures.saturating_add(1);
        }
    }

    fn reset_window(&mut self, now: Timestamp) {
        self.window_start = Some(now);
        self.window_total = 0;
        self.window_failures = 0;
    }
}

// === impl BreakerConfig ===

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            error_threshold: DEFAULT_ERROR_THRESHOLD,
            recovery_threshold: DEFAULT_RECOVERY_THRESHOLD,
            failure_rate_threshold: 0.5,
            failure_rate_window: Duration::from_secs(10),
            failure_rate_min_requests: 20,
            open_base: Duration::from_secs(5),
            open_max: Duration::from_secs(120),
            open_jitter: 0.2,
            half_open_max_probes: 1,
        }
    }
}

impl BreakerConfig {
    /// Checks every field; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("error_threshold", self.error_threshold),
            ("recovery_threshold", self.recovery_threshold),
        ] {
            if !(1..=1000).contains(&v) {
                return Err(ConfigError::new(
                    field,
                    format!("must be in 1..=1000, got {v}"),
                ));
            }
        }
        let r = self.failure_rate_threshold;
        if !(r.is_finite() && r > 0.0 && r <= 1.0) {
            return Err(ConfigError::new(
                "failure_rate_threshold",
                format!("must be in (0, 1], got {r}"),
            ));
        }
        if self.failure_rate_window.is_zero() {
            return Err(ConfigError::new(
                "failure_rate_window",
                "must be greater than 0",
            ));
        }
        if self.open_base.is_zero() {
            return Err(ConfigError::new("open_base", "must be greater than 0"));
        }
        if self.open_max < self.open_base {
            return Err(ConfigError::new(
                "open_max",
                format!(
                    "{:?} is shorter than open_base {:?}",
                    self.open_max, self.open_base
                ),
            ));
        }
        let j = self.open_jitter;
        if !(j.is_finite() && (0.0..1.0).contains(&j)) {
            return Err(ConfigError::new(
                "open_jitter",
                format!("must be in [0, 1), got {j}"),
            ));
        }
        if self.half_open_max_probes == 0 {
            return Err(ConfigError::new(
                "half_open_max_probes",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    /// Default config without jitter, so windows are exact.
    fn exact() -> BreakerConfig {
        BreakerConfig {
            open_jitter: 0.0,
            ..BreakerConfig::default()
        }
    }

    fn trip(b: &mut CircuitBreaker, clock: &ManualClock, cfg: &BreakerConfig) -> Transition {
        for i in 1..cfg.error_threshold {
            assert_eq!(b.on_failure(clock.now(), cfg, 0.0), None, "failure {i}");
            clock.advance(Duration::from_millis(1));
        }
        b.on_failure(clock.now(), cfg, 0.0)
            .expect("the threshold-th failure trips")
    }

    #[test]
    fn closed_opens_after_exactly_error_threshold_consecutive_failures() {
        let clock = ManualClock::new();
        let cfg = exact();
        let mut b = CircuitBreaker::new();
        // A success in between resets the run: 2 failures, 1 success, 2 failures.
        for ok in [false, false, true, false, false] {
            let t = if ok {
                b.on_success(clock.now(), &cfg)
            } else {
                b.on_failure(clock.now(), &cfg, 0.0)
            };
            assert_eq!(t, None);
            assert_eq!(b.state(), CircuitState::Closed);
        }
        let t = b
            .on_failure(clock.now(), &cfg, 0.0)
            .expect("third in a row");
        assert_eq!((t.from, t.to), (CircuitState::Closed, CircuitState::Open));
        assert_eq!(t.reason, TransitionReason::ConsecutiveFailures(3));
        assert_eq!(t.open_for, Some(Duration::from_secs(5)));
    }

    #[test]
    fn open_rejects_until_the_window_passes_then_admits_one_probe() {
        let clock = ManualClock::new();
        let cfg = exact();
        let mut b = CircuitBreaker::new();
        trip(&mut b, &clock, &cfg);
        clock.advance(Duration::from_millis(4_999));
        assert_eq!(b.try_admit(clock.now(), &cfg), Admission::Rejected);
        clock.advance(Duration::from_millis(1));
        let Admission::Probe(Some(t)) = b.try_admit(clock.now(), &cfg) else {
            panic!("the window has elapsed: a probe and a transition");
        };
        assert_eq!((t.from, t.to), (CircuitState::Open, CircuitState::HalfOpen));
        assert_eq!(t.reason, TransitionReason::OpenWindowElapsed);
        // half_open_max_probes = 1: a second one waits for the first.
        assert_eq!(b.try_admit(clock.now(), &cfg), Admission::Rejected);
        b.release_probe();
        assert_eq!(b.try_admit(clock.now(), &cfg), Admission::Probe(None));
        assert_eq!(b.probes_in_flight(), 1);
    }

    #[test]
    fn half_open_closes_after_exactly_recovery_threshold_successes() {
        let clock = ManualClock::new();
        let cfg = BreakerConfig {
            recovery_threshold: 3,
            half_open_max_probes: 3,
            ..exact()
        };
        let mut b = CircuitBreaker::new();
        trip(&mut b, &clock, &cfg);
        clock.advance(Duration::from_secs(5));
        assert!(matches!(
            b.try_admit(clock.now(), &cfg),
            Admission::Probe(Some(_))
        ));
        assert_eq!(b.on_success(clock.now(), &cfg), None, "1 of 3");
        assert_eq!(b.on_success(clock.now(), &cfg), None, "2 of 3");
        let t = b.on_success(clock.now(), &cfg).expect("3 of 3 closes");
        assert_eq!(
            (t.from, t.to),
            (CircuitState::HalfOpen, CircuitState::Closed)
        );
        assert_eq!(t.reason, TransitionReason::ProbesSucceeded(3));
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_with_a_doubled_window_up_to_the_cap() {
        let clock = ManualClock::new();
        let cfg = exact();
        let mut b = CircuitBreaker::new();
        let first = trip(&mut b, &clock, &cfg);
        let mut windows = vec![first.open_for];
        for _ in 0..7 {
            clock.advance(b.open_until().saturating_since(clock.now()));
            assert!(matches!(
                b.try_admit(clock.now(), &cfg),
                Admission::Probe(_)
            ));
            let t = b.on_failure(clock.now(), &cfg, 0.0).expect("probe failed");
            assert_eq!(t.reason, TransitionReason::ProbeFailed);
            assert_eq!((t.from, t.to), (CircuitState::HalfOpen, CircuitState::Open));
            b.release_probe();
            windows.push(t.open_for);
        }
        let secs = |s| Some(Duration::from_secs(s));
        assert_eq!(
            windows,
            [
                secs(5),
                secs(10),
                secs(20),
                secs(40),
                secs(80),
                secs(120),
                secs(120),
                secs(120)
            ]
        );
        assert_eq!(b.trips(), 8);
    }

    #[test]
    fn jitter_shortens_the_window_by_at_most_open_jitter() {
        let clock = ManualClock::new();
        let cfg = BreakerConfig::default(); // open_jitter 0.2
        let mut b = CircuitBreaker::new();
        for _ in 1..cfg.error_threshold {
            b.on_failure(clock.now(), &cfg, 0.5);
        }
        let t = b.on_failure(clock.now(), &cfg, 0.5).expect("trips");
        // 5 s × (1 − 0.5 × 0.2) = 4.5 s.
        assert_eq!(t.open_for, Some(Duration::from_millis(4_500)));
    }
}
