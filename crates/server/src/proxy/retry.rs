//! [`RetryBudget`]: retries may add at most 20 % to a service's upstream
//! load, plus a floor of 10 retries per second so that a quiet service can
//! still retry (the scheme of Finagle's `RetryBudget` and gRPC's retry
//! throttling).
//!
//! ## Rule
//!
//! Every first attempt deposits 0.2 tokens; every retry withdraws 1 and is
//! refused if fewer than 1 is available. Time adds 10 tokens per second, but
//! never lifts the balance above 10 by itself; the balance is capped at
//! 1,000. In an outage where every attempt fails, retries therefore add
//! 20 % (+10/s) to upstream traffic instead of multiplying it by
//! `1 + retries`.

use parking_lot::Mutex;
use tokio::time::Instant;

/// Share of first attempts that may be retried.
pub(crate) const RATIO: f64 = 0.2;
/// Retries per second allowed regardless of traffic.
pub(crate) const MIN_PER_SEC: f64 = 10.0;
const MAX_BALANCE: f64 = 1000.0;

/// A per-service retry budget.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    state: Mutex<(f64, Instant)>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            state: Mutex::new((MIN_PER_SEC, Instant::now())),
        }
    }
}

impl RetryBudget {
    /// Records a first attempt.
    pub(crate) fn deposit(&self) {
        let mut s = self.state.lock();
        s.0 = (s.0 + RATIO).min(MAX_BALANCE);
    }

    /// Asks for one retry.
    pub(crate) fn try_withdraw(&self) -> bool {
        let mut s = self.state.lock();
        let now = Instant::now();
        let dt = now.saturating_duration_since(s.1).as_secs_f64();
        s.1 = now;
        if s.0 < MIN_PER_SEC {
            s.0 = (s.0 + dt * MIN_PER_SEC).min(MIN_PER_SEC);
        }
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_fifth_of_traffic_plus_a_floor() {
        let b = RetryBudget::default();
        // Drain the initial floor.
        while b.try_withdraw() {}
        let mut allowed = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.try_withdraw() {
                allowed += 1;
            }
        }
        assert!((195..=201).contains(&allowed), "{allowed}");
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        let mut floor = 0;
        while b.try_withdraw() {
            floor += 1;
        }
        assert_eq!(floor, 10, "one second refills the floor of 10");
    }
}
