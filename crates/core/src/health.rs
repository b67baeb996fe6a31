//! Health scoring: [`HealthScore`] (a validated `0.0..=1.0`) and
//! [`HealthTracker`], the asymmetric, time-based rule that moves it.
//!
//! ## Rule
//!
//! - **A failure lowers the score fast.** A failure multiplies the score by
//!   `1 − FAILURE_PENALTY × c` where `c ∈ [0, 1]` is the *failure credit*.
//!   With full credit one failure halves the score.
//! - **One incident costs about as much as one failure.** The credit refills
//!   linearly over [`INCIDENT_WINDOW`] (1 s) and each failure uses up all of
//!   it. So failures spaced ≥ 1 s apart each halve the score, while a burst
//!   of 50 failures inside one second uses at most 2 credits in total (the
//!   full one, then what refilled during the second) and lowers the score to
//!   no less than `0.25×` — less than three spaced failures (`0.125×`) do. A
//!   steady stream of failures decays the score by about `e^(−0.5)` per
//!   second, whatever the request rate.
//! - **A success raises it gradually.** A success adds `RECOVERY_RATE × dt`,
//!   where `dt` is the time since the previous outcome, capped at 1 s. The
//!   score therefore rises by at most 0.1 per second of traffic and at most
//!   0.1 per single success: from 0 to 1 takes at least 10 s, so a flapping
//!   instance cannot jump back to full weight on one lucky response.
//!
//! *Why time-based:* counting events would make a busy instance (many
//! requests per incident) look sicker than a quiet one with the same fault,
//! and would let a high request rate heal an instance within milliseconds.
//!
//! The score scales the instance's effective weight; it does not decide
//! eligibility (the circuit breaker does), except that an operator-set score
//! of exactly 0 removes the instance from selection.

use std::time::Duration;

use crate::clock::{OptionalTimestamp, Timestamp};
use crate::error::HealthScoreError;

/// Share of the score removed by one failure with full credit: 0.5.
pub const FAILURE_PENALTY: f64 = 0.5;
/// Time for the failure credit to refill from 0 to 1: 1 s.
pub const INCIDENT_WINDOW: Duration = Duration::from_secs(1);
/// Score regained per second of successful traffic: 0.1.
pub const RECOVERY_RATE: f64 = 0.1;
/// Longest stretch of time a single success can credit: 1 s.
pub const MAX_SUCCESS_CREDIT: Duration = Duration::from_secs(1);

/// A health score in `0.0..=1.0`; 1.0 is fully healthy.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct HealthScore(f64);

/// The evolving health score of one instance.
///
/// 24 bytes (one of 100,000 at scale): a failure uses up the whole failure
/// credit, so the credit is 0 right after the last failure and refills from
/// there; only that failure's time is kept, not the credit itself.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    score: f64,
    /// The last failure: the failure credit was 0 then (full if none).
    failed_at: OptionalTimestamp,
    /// Time of the last outcome, for the success credit.
    last_outcome: OptionalTimestamp,
}

// === impl HealthScore ===

impl HealthScore {
    /// Fully healthy.
    pub const HEALTHY: HealthScore = HealthScore(1.0);
    /// Removed from selection by an operator.
    pub const EJECTED: HealthScore = HealthScore(0.0);

    /// The score as a number in `0.0..=1.0`.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for HealthScore {
    type Error = HealthScoreError;

    fn try_from(v: f64) -> Result<Self, Self::Error> {
        if !v.is_finite() {
            return Err(HealthScoreError::NotFinite(v));
        }
        if !(0.0..=1.0).contains(&v) {
            return Err(HealthScoreError::OutOfRange(v));
        }
        // Normalise -0.0 so that "== 0" means ejected without surprises.
        Ok(HealthScore(if v == 0.0 { 0.0 } else { v }))
    }
}

impl Default for HealthScore {
    fn default() -> Self {
        Self::HEALTHY
    }
}

// === impl HealthTracker ===

impl Default for HealthTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthTracker {
    /// A fully healthy tracker with full failure credit.
    pub fn new() -> Self {
        Self {
            score: 1.0,
            failed_at: OptionalTimestamp::NONE,
            last_outcome: OptionalTimestamp::NONE,
        }
    }

    /// The current score.
    pub fn score(&self) -> HealthScore {
        HealthScore(self.score)
    }

    /// Records a failure at `now` and returns the new score.
    pub fn on_failure(&mut self, now: Timestamp) -> HealthScore {
        let credit = self.credit_at(now);
        self.score *= 1.0 - FAILURE_PENALTY * credit;
        self.failed_at = OptionalTimestamp::some(now);
        self.last_outcome = OptionalTimestamp::some(now);
        self.score()
    }

    /// Records a success at `now` and returns the new score.
    pub fn on_success(&mut self, now: Timestamp) -> HealthScore {
        let dt = match self.last_outcome.get() {
            Some(prev) => now.saturating_since(prev).min(MAX_SUCCESS_CREDIT),
            None => MAX_SUCCESS_CREDIT,
        };
        self.score = (self.score + RECOVERY_RATE * dt.as_secs_f64()).min(1.0);
        self.last_outcome = OptionalTimestamp::some(now);
        self.score()
    }

    /// Sets the score outright (an operator or an external checker).
    pub fn set(&mut self, score: HealthScore) {
        self.score = score.0;
    }

    /// The failure credit at `now`: full before any failure, else 0 at the
    /// last failure plus the linear refill since.
    fn credit_at(&self, now: Timestamp) -> f64 {
        match self.failed_at.get() {
            None => 1.0,
            Some(at) => {
                let refill = now.saturating_since(at).as_secs_f64() / INCIDENT_WINDOW.as_secs_f64();
                refill.min(1.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_nanos(1_000_000_000 + ms * 1_000_000)
    }

    #[test]
    fn score_rejects_bad_values() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert!(matches!(
                HealthScore::try_from(v),
                Err(HealthScoreError::NotFinite(_))
            ));
        }
        for v in [-0.1, 1.1, -1e-9, 1.0 + 1e-9] {
            assert!(matches!(
                HealthScore::try_from(v),
                Err(HealthScoreError::OutOfRange(_))
            ));
        }
        assert_eq!(
            HealthScore::try_from(-0.0).unwrap().get().to_bits(),
            0.0f64.to_bits()
        );
        assert_eq!(HealthScore::try_from(0.5).unwrap().get(), 0.5);
    }

    #[test]
    fn one_failure_halves_a_healthy_score() {
        let mut h = HealthTracker::new();
        assert_eq!(h.on_failure(at(0)).get(), 0.5);
    }

    #[test]
    fn a_burst_costs_no_more_than_three_spaced_failures() {
        let mut burst = HealthTracker::new();
        for i in 0..50 {
            burst.on_failure(at(i * 20)); // 50 failures within 1 s
        }
        let mut spaced = HealthTracker::new();
        for i in 0..3 {
            spaced.on_failure(at(i * 10_000)); // 3 failures 10 s apart
        }
        assert!(
            burst.score().get() >= spaced.score().get(),
            "burst {} must not cost more than 3 spaced failures {}",
            burst.score().get(),
            spaced.score().get()
        );
        // The documented bound: a 1 s burst costs at most two full penalties.
        assert!(
            burst.score().get() >= 0.25 - 1e-12,
            "{}",
            burst.score().get()
        );
        assert!((spaced.score().get() - 0.125).abs() < 1e-12);
    }

    #[test]
    fn recovery_is_gradual_and_bounded() {
        let mut h = HealthTracker::new();
        h.on_failure(at(0));
        h.on_failure(at(10_000));
        h.on_failure(at(20_000));
        let start = h.score().get();
        assert!((start - 0.125).abs() < 1e-12);
        // A single success long after the incident credits at most 1 s.
        let s = h.on_success(at(80_000)).get();
        assert!((s - (start + 0.1)).abs() < 1e-9, "{s}");
        // Then successes every 100 ms: +0.01 each, i.e. 0.1 per second.
        let mut prev = s;
        for i in 1..=50 {
            let now = h.on_success(at(80_000 + i * 100)).get();
            assert!(
                now - prev <= 0.01 + 1e-9,
                "one success may add at most 0.01 here"
            );
            assert!(
                now <= s + 0.1 * (i as f64 * 0.1) + 1e-9,
                "bound: +0.1 per second"
            );
            prev = now;
        }
        assert!(
            (prev - (s + 0.5)).abs() < 1e-9,
            "5 s of successes add 0.5, got {prev}"
        );
        // And it caps at 1.0.
        for i in 0..100 {
            h.on_success(at(90_000 + i * 1000));
        }
        assert_eq!(h.score().get(), 1.0);
    }
}
