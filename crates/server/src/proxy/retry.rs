//! [`RetryBudget`]: retries may add at most `retry_budget_percent` (default
//! 20 %) to a service's upstream load, plus a floor of
//! `retry_budget_min_per_second` (default 10) retries per second so that a
//! quiet service can still retry (the scheme of Finagle's `RetryBudget` and
//! gRPC's retry throttling).
//!
//! ## Rule
//!
//! Every first attempt deposits `percent / 100` tokens; every retry
//! withdraws 1 and is refused if fewer than 1 is available. Time adds
//! `min_per_second` tokens per second, but never lifts the balance above
//! `min_per_second` by itself; the balance is capped at 1,000. In an outage
//! where every attempt fails, retries therefore add 20 % (+10/s) to
//! upstream traffic instead of multiplying it by `1 + retries`.

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::RetryBudgetConfig;

const MAX_BALANCE: f64 = 1000.0;

/// A per-service retry budget.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    config: RetryBudgetConfig,
    state: Mutex<(f64, Instant)>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(RetryBudgetConfig::default())
    }
}

impl RetryBudget {
    /// A budget that starts with a full floor.
    pub(crate) fn new(config: RetryBudgetConfig) -> Self {
        Self {
            config,
            state: Mutex::new((f64::from(config.min_per_second), Instant::now())),
        }
    }

    /// The knobs it was built with (a reload with other knobs builds anew).
    pub(crate) fn config(&self) -> RetryBudgetConfig {
        self.config
    }

    /// Records a first attempt.
    pub(crate) fn deposit(&self) {
        let ratio = f64::from(self.config.percent) / 100.0;
        let mut s = self.state.lock();
        s.0 = (s.0 + ratio).min(MAX_BALANCE);
    }

    /// The balance at `now`: under the floor it refills at the floor's
    /// rate since the last withdrawal (one rule for asking and taking).
    fn balance(&self, (balance, since): (f64, Instant), now: Instant) -> f64 {
        let floor = f64::from(self.config.min_per_second);
        if balance < floor {
            let dt = now.saturating_duration_since(since).as_secs_f64();
            (balance + dt * floor).min(floor)
        } else {
            balance
        }
    }

    /// Whether [`try_withdraw`](Self::try_withdraw) would grant a retry
    /// now; withdraws nothing.
    pub(crate) fn holds_one(&self) -> bool {
        let s = *self.state.lock();
        self.balance(s, Instant::now()) >= 1.0
    }

    /// Asks for one retry.
    pub(crate) fn try_withdraw(&self) -> bool {
        let mut s = self.state.lock();
        let now = Instant::now();
        s.0 = self.balance(*s, now);
        s.1 = now;
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

    /// Takes every retry the budget grants now; how many.
    fn drain(b: &RetryBudget) -> u32 {
        let mut n = 0;
        while b.try_withdraw() {
            n += 1;
        }
        n
    }

    /// Deposits 1000 first attempts, each followed by a retry; how many got one.
    fn retries_per_1000(b: &RetryBudget) -> u32 {
        (0..1000)
            .filter(|_| {
                b.deposit();
                b.try_withdraw()
            })
            .count() as u32
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_fifth_of_traffic_plus_a_floor() {
        let b = RetryBudget::default();
        // Drain the initial floor.
        drain(&b);
        let allowed = retries_per_1000(&b);
        assert!((195..=201).contains(&allowed), "{allowed}");
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert_eq!(drain(&b), 10, "one second refills the floor of 10");
    }

    #[tokio::test(start_paused = true)]
    async fn holds_one_says_what_a_withdrawal_would_get_and_spends_nothing() {
        let b = RetryBudget::new(RetryBudgetConfig {
            percent: 50,
            min_per_second: 2,
        });
        for _ in 0..2 {
            assert!(b.holds_one(), "asking spends nothing");
        }
        assert_eq!(drain(&b), 2);
        assert!(!b.holds_one(), "drained");
        b.deposit();
        assert!(!b.holds_one(), "half a token");
        tokio::time::advance(std::time::Duration::from_millis(250)).await;
        assert!(b.holds_one(), "a quarter second refills another half");
        assert!(b.try_withdraw());
        assert!(!b.holds_one());
    }

    #[tokio::test(start_paused = true)]
    async fn the_knobs_set_the_share_and_the_floor() {
        let b = RetryBudget::new(RetryBudgetConfig {
            percent: 50,
            min_per_second: 3,
        });
        assert_eq!(drain(&b), 3, "a new budget holds the floor of 3");
        let allowed = retries_per_1000(&b);
        assert!((495..=501).contains(&allowed), "half of 1000: {allowed}");
        tokio::time::advance(std::time::Duration::from_millis(500)).await;
        assert_eq!(drain(&b), 1, "half a second refills 1.5 of the floor of 3");

        let none = RetryBudget::new(RetryBudgetConfig {
            percent: 0,
            min_per_second: 0,
        });
        for _ in 0..100 {
            none.deposit();
        }
        tokio::time::advance(std::time::Duration::from_secs(10)).await;
        assert!(!none.try_withdraw(), "0 % and no floor: never a retry");
    }
}
