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
//! ## Active checks (`on_check_success`, `on_check_failure`)
//!
//! An active health check is evidence about an instance, not traffic, so it
//! may *open the door* but never *close the breaker*:
//!
//! - While `Closed`, a check counts like a request (a failed check is a
//!   failure, so an instance without traffic is still ejected).
//! - While `Open`, `recovery_threshold` consecutive passing checks end the
//!   open window early: the breaker moves to `HalfOpen`
//!   ([`TransitionReason::ChecksPassed`]). A failed check restarts the
//!   count. Once the window has elapsed, one passing check is enough.
//! - While `HalfOpen`, a passing check changes nothing: only
//!   `recovery_threshold` successful *real* requests close the breaker. A
//!   failed check reopens it, as a failed probe does.
//! - If a half-open spell that checks started ends in failure, the checks
//!   passed while real requests failed (a backend that resets requests but
//!   answers `/health`), so the next open window ignores checks and runs in
//!   full. The one after may be cut short again.
//!
//! *Why:* the windows grow so that a flapping instance is held out, but
//! with only the window deciding, an instance that recovered stays open
//! for up to `open_max` (120 s). In the 30-minute soak every instance
//! faulted every 2 minutes, the trip count never reset, three of four
//! instances sat open with passing checks, and panic mode (955 of 1,747 s)
//! sent traffic to the one that was failing. Letting checks shorten the
//! window (as HAProxy's `rise` and Envoy's active-check un-ejection do) puts
//! a recovered instance back within `recovery_threshold` check intervals;
//! requiring real successes to close, and suspending the shortcut after it
//! was wrong, bounds what a lying health endpoint costs: one failed probe
//! per two windows, the windows still growing.
//!
//! Every method that changes the state returns the [`Transition`], so the
//! caller can log and count it; the breaker itself does no I/O.

use std::fmt;
use std::time::Duration;

use crate::clock::{OptionalTimestamp, Timestamp};
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
    /// `n` consecutive active health checks passed while open: the window
    /// ends early (see the module doc, "Active checks").
    ChecksPassed(u32),
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
///
/// 48 bytes, one of 100,000 at scale. The three runs the rules count —
/// consecutive failures, consecutive successes, consecutive passing
/// checks — are one counter, `run`, read by the state: each is non-zero
/// only in one state (failures while closed, successes while half-open,
/// passing checks while open) and every transition starts it at 0.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    state: CircuitState,
    /// Consecutive failures while `Closed`, consecutive successes while
    /// `HalfOpen`, consecutive passing active checks while `Open`.
    run: u32,
    window_start: OptionalTimestamp,
    window_total: u32,
    window_failures: u32,
    /// Consecutive trips without a long enough closed spell in between.
    trips: u32,
    open_until: Timestamp,
    closed_since: OptionalTimestamp,
    probes_in_flight: u32,
    /// The current half-open spell was started by passing checks.
    half_open_by_checks: bool,
    /// The current open window ignores checks: the last spell that checks
    /// started failed.
    checks_suspended: bool,
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
            TransitionReason::ChecksPassed(n) => {
                write!(f, "{n} consecutive health checks passed while open")
            }
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
            run: 0,
            window_start: OptionalTimestamp::NONE,
            window_total: 0,
            window_failures: 0,
            trips: 0,
            open_until: Timestamp::default(),
            closed_since: OptionalTimestamp::NONE,
            probes_in_flight: 0,
            half_open_by_checks: false,
            checks_suspended: false,
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

    /// Consecutive passing active checks while open (0 otherwise).
    pub fn check_passes(&self) -> u32 {
        if self.state == CircuitState::Open {
            self.run
        } else {
            0
        }
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
        match self.state {
            CircuitState::Closed => {
                self.run = 0; // the failures' run ends
                if let Some(since) = self.closed_since.get() {
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
                self.run += 1;
                if self.run >= cfg.recovery_threshold {
                    let n = self.run;
                    self.state = CircuitState::Closed;
                    self.run = 0;
                    self.closed_since = OptionalTimestamp::some(now);
                    self.half_open_by_checks = false;
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
        // A half-open breaker reopens (its successes' run ends there); an
        // open one keeps its run of passing checks (a late response is not
        // a check).
        match self.state {
            CircuitState::Open => None, // a late response from before the trip
            CircuitState::HalfOpen => {
                Some(self.open(now, TransitionReason::ProbeFailed, cfg, jitter))
            }
            CircuitState::Closed => {
                self.run += 1;
                let b = cfg;
                let reason = if self.run >= cfg.error_threshold {
                    Some(TransitionReason::ConsecutiveFailures(self.run))
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
                    if let Some(since) = self.closed_since.get() {
                        if now.saturating_since(since) >= b.open_max {
                            self.trips = 0;
                        }
                    }
                    self.open(now, r, cfg, jitter)
                })
            }
        }
    }

    /// Records a passing active health check at `now` (see the module doc,
    /// "Active checks"): counts as a success while closed, may end an open
    /// window early, never closes a half-open breaker.
    pub fn on_check_success(&mut self, now: Timestamp, cfg: &BreakerConfig) -> Option<Transition> {
        match self.state {
            CircuitState::Closed => self.on_success(now, cfg),
            CircuitState::HalfOpen => None,
            CircuitState::Open => {
                self.run = self.run.saturating_add(1);
                let reason = if now >= self.open_until {
                    TransitionReason::OpenWindowElapsed
                } else if !self.checks_suspended && self.run >= cfg.recovery_threshold {
                    TransitionReason::ChecksPassed(self.run)
                } else {
                    return None;
                };
                let mut t = self.enter_half_open();
                t.reason = reason;
                self.half_open_by_checks = matches!(reason, TransitionReason::ChecksPassed(_));
                Some(t)
            }
        }
    }

    /// Records a failed active health check at `now`: a failure while closed
    /// or half-open, and the end of any run of passing checks while open.
    pub fn on_check_failure(
        &mut self,
        now: Timestamp,
        cfg: &BreakerConfig,
        jitter: f64,
    ) -> Option<Transition> {
        if self.state == CircuitState::Open {
            self.run = 0; // the passing checks' run ends
        }
        self.on_failure(now, cfg, jitter)
    }

    fn open(
        &mut self,
        now: Timestamp,
        reason: TransitionReason,
        cfg: &BreakerConfig,
        jitter: f64,
    ) -> Transition {
        let from = self.state;
        // A spell that checks started and that failed: they vouched for an
        // instance that fails real traffic, so this window runs in full.
        self.checks_suspended = from == CircuitState::HalfOpen && self.half_open_by_checks;
        self.half_open_by_checks = false;
        self.trips = self.trips.saturating_add(1);
        let nominal = Self::nominal_open_window(self.trips, cfg);
        let jitter = jitter.clamp(0.0, 1.0) * cfg.open_jitter;
        let window = nominal.mul_f64(1.0 - jitter);
        self.state = CircuitState::Open;
        self.open_until = now + window;
        self.run = 0;
        self.closed_since = OptionalTimestamp::NONE;
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
        self.run = 0;
        self.half_open_by_checks = false;
        Transition {
            from: CircuitState::Open,
            to: CircuitState::HalfOpen,
            reason: TransitionReason::OpenWindowElapsed,
            open_for: None,
        }
    }

    fn count_in_window(&mut self, now: Timestamp, failed: bool, cfg: &BreakerConfig) {
        match self.window_start.get() {
            Some(start) if now.saturating_since(start) < cfg.failure_rate_window => {}
            _ => self.reset_window(now),
        }
        self.window_total = self.window_total.saturating_add(1);
        if failed {
            self.window_failures = self.window_failures.saturating_add(1);
        }
    }

    fn reset_window(&mut self, now: Timestamp) {
        self.window_start = OptionalTimestamp::some(now);
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

    /// Trips, then fails half-open probes until the window is `open_max`.
    fn open_at_the_cap(b: &mut CircuitBreaker, clock: &ManualClock, cfg: &BreakerConfig) {
        trip(b, clock, cfg);
        while CircuitBreaker::nominal_open_window(b.trips(), cfg) < cfg.open_max {
            clock.advance(b.open_until().saturating_since(clock.now()));
            assert!(matches!(b.try_admit(clock.now(), cfg), Admission::Probe(_)));
            b.on_failure(clock.now(), cfg, 0.0).expect("probe failed");
            b.release_probe();
        }
        assert!(b.open_until().saturating_since(clock.now()) >= Duration::from_secs(100));
    }

    #[test]
    fn passing_checks_end_a_long_open_window_early_but_do_not_close() {
        let clock = ManualClock::new();
        let cfg = exact();
        let mut b = CircuitBreaker::new();
        open_at_the_cap(&mut b, &clock, &cfg);
        clock.advance(Duration::from_secs(1));
        assert_eq!(b.on_check_success(clock.now(), &cfg), None, "1 of 2");
        assert_eq!(b.state(), CircuitState::Open);
        clock.advance(Duration::from_secs(1));
        let t = b.on_check_success(clock.now(), &cfg).expect("2 of 2");
        assert_eq!((t.from, t.to), (CircuitState::Open, CircuitState::HalfOpen));
        assert_eq!(t.reason, TransitionReason::ChecksPassed(2));
        // Half-open: any number of passing checks does not close it.
        for _ in 0..10 {
            assert_eq!(b.on_check_success(clock.now(), &cfg), None);
        }
        assert_eq!(b.state(), CircuitState::HalfOpen);
        // Real probes do.
        assert!(matches!(
            b.try_admit(clock.now(), &cfg),
            Admission::Probe(None)
        ));
        assert_eq!(b.on_success(clock.now(), &cfg), None);
        let t = b
            .on_success(clock.now(), &cfg)
            .expect("2 real successes close");
        assert_eq!(t.to, CircuitState::Closed);
    }

    /// The one run counter (struct doc) counts one run per state; what
    /// happens in one state never adds to or cuts another state's run.
    #[test]
    fn each_state_keeps_its_own_run() {
        let clock = ManualClock::new();
        let cfg = exact();
        let mut b = CircuitBreaker::new();
        open_at_the_cap(&mut b, &clock, &cfg);
        clock.advance(Duration::from_secs(1));
        // Open: late responses, success or failure, leave the passing
        // checks' run alone.
        assert_eq!(b.on_check_success(clock.now(), &cfg), None);
        assert_eq!(b.on_failure(clock.now(), &cfg, 0.0), None);
        assert_eq!(b.on_success(clock.now(), &cfg), None);
        assert_eq!(b.check_passes(), 1);
        let t = b.on_check_success(clock.now(), &cfg).expect("2 of 2");
        assert_eq!(t.reason, TransitionReason::ChecksPassed(2));
        // Half-open: the successes' run starts at 0, passing checks do not
        // add to it, and no check pass is reported outside `Open`.
        assert_eq!(b.check_passes(), 0);
        assert_eq!(b.on_success(clock.now(), &cfg), None);
        assert_eq!(b.on_check_success(clock.now(), &cfg), None);
        let t = b.on_success(clock.now(), &cfg).expect("2 successes close");
        assert_eq!(t.reason, TransitionReason::ProbesSucceeded(2));
        // Closed: the failures' run starts at 0; a failed check is one of
        // them (it does not restart the run as it does while open).
        assert_eq!(b.on_failure(clock.now(), &cfg, 0.0), None);
        assert_eq!(b.on_check_failure(clock.now(), &cfg, 0.0), None);
        let t = b
            .on_failure(clock.now(), &cfg, 0.0)
            .expect("third in a row");
        assert_eq!(t.reason, TransitionReason::ConsecutiveFailures(3));
    }

    #[test]
    fn a_failed_check_restarts_the_count_of_passing_checks() {
        let clock = ManualClock::new();
        let cfg = exact();
        let mut b = CircuitBreaker::new();
        open_at_the_cap(&mut b, &clock, &cfg);
        for _ in 0..5 {
            assert_eq!(b.on_check_success(clock.now(), &cfg), None);
            assert_eq!(b.on_check_failure(clock.now(), &cfg, 0.0), None);
            clock.advance(Duration::from_secs(1));
        }
        assert_eq!(b.state(), CircuitState::Open);
    }

    #[test]
    fn after_a_failed_spell_started_by_checks_the_next_window_runs_in_full() {
        let clock = ManualClock::new();
        let cfg = exact();
        let mut b = CircuitBreaker::new();
        trip(&mut b, &clock, &cfg); // 5 s window
        b.on_check_success(clock.now(), &cfg);
        let t = b
            .on_check_success(clock.now(), &cfg)
            .expect("checks open the door");
        assert_eq!(t.reason, TransitionReason::ChecksPassed(2));
        // The backend passes checks but resets real requests.
        assert!(matches!(
            b.try_admit(clock.now(), &cfg),
            Admission::Probe(None)
        ));
        let t = b.on_failure(clock.now(), &cfg, 0.0).expect("probe failed");
        b.release_probe();
        assert_eq!(
            t.open_for,
            Some(Duration::from_secs(10)),
            "windows still grow"
        );
        // Checks are ignored for this window...
        for _ in 0..9 {
            clock.advance(Duration::from_secs(1));
            assert_eq!(b.on_check_success(clock.now(), &cfg), None);
        }
        assert_eq!(b.state(), CircuitState::Open);
        // ... until it elapses: then one passing check opens the door.
        clock.advance(Duration::from_secs(1));
        let t = b
            .on_check_success(clock.now(), &cfg)
            .expect("window elapsed");
        assert_eq!(t.reason, TransitionReason::OpenWindowElapsed);
        // That spell was not started early; if it fails, the next window
        // may be cut short by checks again.
        assert!(matches!(
            b.try_admit(clock.now(), &cfg),
            Admission::Probe(None)
        ));
        let t = b.on_failure(clock.now(), &cfg, 0.0).expect("probe failed");
        b.release_probe();
        assert_eq!(t.open_for, Some(Duration::from_secs(20)));
        b.on_check_success(clock.now(), &cfg);
        let t = b
            .on_check_success(clock.now(), &cfg)
            .expect("shortcut again");
        assert_eq!(t.reason, TransitionReason::ChecksPassed(2));
    }

    #[test]
    fn checks_while_closed_count_like_requests() {
        let clock = ManualClock::new();
        let cfg = exact();
        let mut b = CircuitBreaker::new();
        // Failed checks alone eject an instance that gets no traffic.
        b.on_check_failure(clock.now(), &cfg, 0.0);
        b.on_check_failure(clock.now(), &cfg, 0.0);
        // A passing check breaks the run, as a success does.
        assert_eq!(b.on_check_success(clock.now(), &cfg), None);
        b.on_check_failure(clock.now(), &cfg, 0.0);
        b.on_check_failure(clock.now(), &cfg, 0.0);
        let t = b
            .on_check_failure(clock.now(), &cfg, 0.0)
            .expect("3 in a row");
        assert_eq!(t.reason, TransitionReason::ConsecutiveFailures(3));
    }
}
