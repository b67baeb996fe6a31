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
//! `min_per_second` tokens per second since the last withdrawal, but never
//! lifts the balance above `min_per_second` by itself; the balance is
//! capped at 1,000 tokens (or at `min_per_second`, when that is higher, so
//! the floor stays reachable). In an outage where every attempt fails,
//! retries therefore add 20 % (+10/s) to upstream traffic instead of
//! multiplying it by `1 + retries`.
//!
//! ## Sharded, exact
//!
//! Every request deposits, so the request path must not share a line
//! between workers. The balance is therefore held in **shards**, one per worker
//! thread plus one for every other thread (`crate::workers`), each on its
//! own cache lines; the service's balance is their sum, capped. A
//! request touches only its worker's shard: a deposit is one atomic add on
//! it (none once it holds the cap).
//!
//! The rule stays exactly the single-balance rule above, because the cap is
//! applied where it can be observed: deposits only add, and a saturating
//! sum of additions clamped once equals the same additions clamped one by
//! one (`min(min(b + x, C) + y, C) = min(b + x + y, C)` for `x, y ≥ 0`), so
//! the shards may run past the cap between withdrawals. Withdrawals (one per
//! retry, so at most `percent` % of requests plus the floor) take the slow
//! path: under one lock they sum the shards, clamp, refill from the floor,
//! take the token, and write the new balance back into the shards (taking
//! from their own worker's shard first). Asking without a whole token in the
//! local shard reads every shard and the time of the last withdrawal, and
//! answers what a withdrawal would. Balances are integers in millionths of a
//! token, so a deposit of `p` % is exactly `p × 10,000` and shards add up
//! without rounding.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::RetryBudgetConfig;
use crate::workers;

/// Millionths of a token per token: the unit of every balance.
const MICROS: u64 = 1_000_000;

/// The cap on the balance, in tokens (see the rule).
const MAX_BALANCE: u64 = 1000;

/// One worker's part of the balance, in millionths of a token, on cache
/// lines of its own. Only its worker adds to it; a withdrawal (under the
/// budget's lock) may take from any shard.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(AtomicU64);

/// A per-service retry budget.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    config: RetryBudgetConfig,
    /// What a first attempt deposits (`percent × 10,000`).
    deposit: u64,
    /// The floor (`min_per_second` tokens).
    floor: u64,
    /// The cap: 1,000 tokens, or the floor if higher.
    cap: u64,
    shards: Box<[Shard]>,
    /// When the budget was made: `last_withdrawal` counts from it.
    epoch: Instant,
    /// Nanoseconds from `epoch` to the last withdrawal (the floor refills
    /// from there); written only under `withdrawing`.
    last_withdrawal: AtomicU64,
    /// Held by a withdrawal: withdrawals are serialised, deposits are not.
    withdrawing: Mutex<()>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new(RetryBudgetConfig::default())
    }
}

impl RetryBudget {
    /// A budget that starts with a full floor, with a shard for every
    /// worker started so far (and one for other threads).
    pub(crate) fn new(config: RetryBudgetConfig) -> Self {
        Self::with_shards(config, 1 + workers::most_started())
    }

    /// A budget of `shards` shards (at least one).
    fn with_shards(config: RetryBudgetConfig, shards: usize) -> Self {
        let floor = u64::from(config.min_per_second) * MICROS;
        let shards: Box<[Shard]> = (0..shards.max(1)).map(|_| Shard::default()).collect();
        shards[0].0.store(floor, Ordering::Relaxed);
        Self {
            config,
            deposit: u64::from(config.percent) * (MICROS / 100),
            floor,
            cap: floor.max(MAX_BALANCE * MICROS),
            shards,
            epoch: Instant::now(),
            last_withdrawal: AtomicU64::new(0),
            withdrawing: Mutex::new(()),
        }
    }

    /// The knobs it was built with (a reload with other knobs builds anew).
    pub(crate) fn config(&self) -> RetryBudgetConfig {
        self.config
    }

    /// The shard of the calling thread: its worker's (`1 + index`), else 0.
    fn local(&self) -> usize {
        workers::slot(self.shards.len())
    }

    /// Records a first attempt.
    pub(crate) fn deposit(&self) {
        self.deposit_on(self.local());
    }

    /// Whether [`try_withdraw`](Self::try_withdraw) would grant a retry
    /// now; withdraws nothing. (Tests only: the request path asked it
    /// before paying for a copy of an HTTP/2 head; it now copies whenever
    /// the body is buffered.)
    #[cfg(test)]
    pub(crate) fn holds_one(&self) -> bool {
        self.holds_one_on(self.local())
    }

    /// Asks for one retry.
    pub(crate) fn try_withdraw(&self) -> bool {
        self.try_withdraw_on(self.local(), Instant::now())
    }

    #[cfg(test)]
    fn holds_one_on(&self, shard: usize) -> bool {
        // A whole token here is a whole token in the sum, and neither the
        // cap (≥ 1,000) nor the refill (which only adds) can take it away:
        // no clock read, no other shard's line.
        self.shards[shard].0.load(Ordering::Relaxed) >= MICROS || self.holds_one_at(Instant::now())
    }

    fn deposit_on(&self, shard: usize) {
        let shard = &self.shards[shard].0;
        // At the cap a deposit changes nothing observable: skip the write.
        if self.deposit > 0 && shard.load(Ordering::Relaxed) < self.cap {
            shard.fetch_add(self.deposit, Ordering::Relaxed);
        }
    }

    /// What the shards hold together (past the cap between withdrawals).
    fn sum(&self) -> u64 {
        self.shards.iter().fold(0u64, |sum, s| {
            sum.saturating_add(s.0.load(Ordering::Relaxed))
        })
    }

    /// `held` refilled at `now`: under the floor it grows by the floor's
    /// rate since the last withdrawal, up to the floor.
    fn refilled(&self, held: u64, now: Instant) -> u64 {
        if held >= self.floor {
            return held;
        }
        let since = self.last_withdrawal.load(Ordering::Relaxed);
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos();
        let dt = elapsed.saturating_sub(u128::from(since));
        // floor tokens/s = min_per_second × 10^6 millionths / 10^9 ns.
        let refill = dt.saturating_mul(u128::from(self.config.min_per_second)) / 1000;
        let refill = u64::try_from(refill).unwrap_or(u64::MAX);
        held.saturating_add(refill).min(self.floor)
    }

    #[cfg(test)]
    fn holds_one_at(&self, now: Instant) -> bool {
        self.refilled(self.sum().min(self.cap), now) >= MICROS
    }

    fn try_withdraw_on(&self, local: usize, now: Instant) -> bool {
        let _withdrawing = self.withdrawing.lock();
        // Only deposits run meanwhile, and they only add: every shard holds
        // at least what is read here until this withdrawal writes.
        let sum = self.sum();
        let balance = self.refilled(sum.min(self.cap), now);
        let nanos = now.saturating_duration_since(self.epoch).as_nanos();
        self.last_withdrawal
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
        let granted = balance >= MICROS;
        let after = if granted { balance - MICROS } else { balance };
        // Make the shards hold `after` instead of `sum` (plus whatever was
        // deposited since they were read).
        if after >= sum {
            self.shards[local]
                .0
                .fetch_add(after - sum, Ordering::Relaxed);
            return granted;
        }
        let mut excess = sum - after;
        let n = self.shards.len();
        for i in 0..n {
            if excess == 0 {
                break;
            }
            let shard = &self.shards[(local + i) % n].0;
            let take = excess.min(shard.load(Ordering::Relaxed));
            shard.fetch_sub(take, Ordering::Relaxed);
            excess -= take;
        }
        granted
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Takes every retry the budget grants at `now` on `shard`; how many.
    fn drain_at(b: &RetryBudget, shard: usize, now: Instant) -> u32 {
        let mut n = 0;
        while b.try_withdraw_on(shard, now) {
            n += 1;
        }
        n
    }

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
        assert_eq!(allowed, 200, "exactly a fifth: the balance is integral");
        tokio::time::advance(Duration::from_secs(1)).await;
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
        tokio::time::advance(Duration::from_millis(250)).await;
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
        assert_eq!(allowed, 500, "half of 1000");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(drain(&b), 1, "half a second refills 1.5 of the floor of 3");

        let none = RetryBudget::new(RetryBudgetConfig {
            percent: 0,
            min_per_second: 0,
        });
        for _ in 0..100 {
            none.deposit();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!none.try_withdraw(), "0 % and no floor: never a retry");
    }

    #[test]
    fn the_balance_is_capped_at_a_thousand_across_shards() {
        let b = RetryBudget::with_shards(
            RetryBudgetConfig {
                percent: 100,
                min_per_second: 0,
            },
            3,
        );
        // 1,500 tokens deposited on each shard: each alone passes the cap.
        for shard in 0..3 {
            for _ in 0..1500 {
                b.deposit_on(shard);
            }
        }
        assert_eq!(drain_at(&b, 1, b.epoch), 1000);
        for _ in 0..10 {
            b.deposit_on(2);
        }
        assert_eq!(drain_at(&b, 0, b.epoch), 10, "the excess is gone");
    }

    #[test]
    fn tokens_deposited_on_one_shard_serve_retries_on_another() {
        let b = RetryBudget::with_shards(
            RetryBudgetConfig {
                percent: 20,
                min_per_second: 0,
            },
            3,
        );
        let t0 = b.epoch;
        // A fifth of a token on each of shards 0..2 twice: 1.2 tokens, no
        // shard holding one; a withdrawal on shard 2 gathers them.
        for _ in 0..2 {
            for shard in 0..3 {
                b.deposit_on(shard);
            }
        }
        assert!(b
            .shards
            .iter()
            .all(|s| s.0.load(Ordering::Relaxed) < MICROS));
        assert!(b.holds_one_at(t0), "1.2 tokens in all");
        assert!(b.try_withdraw_on(2, t0));
        assert!(!b.holds_one_at(t0), "0.2 left");
        assert!(!b.try_withdraw_on(0, t0));
        let left: u64 = b.shards.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
        assert_eq!(left, MICROS / 5, "exactly 0.2 tokens stay");
    }

    #[test]
    fn the_floor_refills_the_sum_from_the_last_withdrawal() {
        // Floor of 4/s over 2 shards: time refills the service's balance,
        // not each shard's share of it.
        let b = RetryBudget::with_shards(
            RetryBudgetConfig {
                percent: 0,
                min_per_second: 4,
            },
            2,
        );
        let t0 = b.epoch;
        assert_eq!(drain_at(&b, 1, t0), 4, "the floor starts full");
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.holds_one_at(t1));
        assert_eq!(drain_at(&b, 0, t1), 2, "half a second: 2 of the floor of 4");
        // Refilled from the last withdrawal (t1), up to the floor, not past it.
        assert_eq!(drain_at(&b, 1, t1 + Duration::from_millis(249)), 0);
        assert_eq!(drain_at(&b, 1, t1 + Duration::from_secs(60)), 4);
    }

    /// The rule of the module doc on one balance, in the same units: what
    /// the shards must add up to.
    struct OneBalance {
        deposit: u64,
        floor: u64,
        cap: u64,
        min_per_second: u64,
        balance: u64,
        last: Instant,
    }

    impl OneBalance {
        fn refilled(&self, now: Instant) -> u64 {
            if self.balance >= self.floor {
                return self.balance;
            }
            let dt = now.saturating_duration_since(self.last).as_nanos();
            let refill = u64::try_from(dt * u128::from(self.min_per_second) / 1000).unwrap();
            (self.balance + refill).min(self.floor)
        }

        fn try_withdraw(&mut self, now: Instant) -> bool {
            self.balance = self.refilled(now);
            self.last = now;
            let granted = self.balance >= MICROS;
            if granted {
                self.balance -= MICROS;
            }
            granted
        }
    }

    #[test]
    fn shards_grant_exactly_what_one_balance_grants() {
        // Random deposits, asks and withdrawals on random shards, in
        // healthy stretches (mostly first attempts: the cap is reached) and
        // outages (mostly retries: the budget runs dry and the floor
        // refills it), with time moving in random steps: every answer
        // matches the one-balance rule.
        let mut rng = fastrand::Rng::with_seed(12);
        for (percent, min_per_second) in [(20, 10), (50, 3), (1, 0), (100, 2000), (0, 7)] {
            let config = RetryBudgetConfig {
                percent,
                min_per_second,
            };
            let b = RetryBudget::with_shards(config, 3);
            let floor = u64::from(min_per_second) * MICROS;
            let mut one = OneBalance {
                deposit: u64::from(percent) * 10_000,
                floor,
                cap: floor.max(MAX_BALANCE * MICROS),
                min_per_second: u64::from(min_per_second),
                balance: floor,
                last: b.epoch,
            };
            let mut now = b.epoch;
            let (mut granted, mut refused) = (0, 0);
            let mut outage = false;
            for step in 0..200_000 {
                if rng.u32(0..3000) == 0 {
                    outage = !outage;
                }
                // Percent of steps that deposit, and that ask.
                let (deposits, asks) = if outage { (20, 20) } else { (90, 5) };
                let shard = rng.usize(0..3);
                let op = rng.u32(0..100);
                if op < deposits {
                    b.deposit_on(shard);
                    one.balance = (one.balance + one.deposit).min(one.cap);
                } else if op < deposits + asks {
                    let want = one.refilled(now) >= MICROS;
                    assert_eq!(b.holds_one_at(now), want, "ask {step} ({config:?})");
                } else {
                    let want = one.try_withdraw(now);
                    let got = b.try_withdraw_on(shard, now);
                    assert_eq!(got, want, "withdrawal {step} ({config:?})");
                    if want {
                        granted += 1;
                    } else {
                        refused += 1;
                    }
                }
                if rng.u32(0..10) == 0 {
                    now += Duration::from_micros(rng.u64(0..2_000));
                }
            }
            // Both answers happened, so the comparison meant something.
            if percent > 0 || min_per_second > 0 {
                assert!(
                    granted > 100 && refused > 100,
                    "{config:?}: {granted} granted, {refused} refused"
                );
            }
        }
    }

    /// The budget as it was before the shards: one balance under one lock,
    /// locked twice per request (ask, then deposit) and a clock read to ask.
    struct Locked {
        ratio: f64,
        floor: f64,
        state: Mutex<(f64, std::time::Instant)>,
    }

    impl Locked {
        fn deposit(&self) {
            let mut s = self.state.lock();
            s.0 = (s.0 + self.ratio).min(1000.0);
        }

        fn holds_one(&self) -> bool {
            let (balance, since) = *self.state.lock();
            let balance = if balance < self.floor {
                let dt = since.elapsed().as_secs_f64();
                (balance + dt * self.floor).min(self.floor)
            } else {
                balance
            };
            balance >= 1.0
        }
    }

    /// ns per request (ask + deposit) with `threads` threads at once, each
    /// running `request(thread)` `n` times; the median of 5 runs.
    fn per_request_ns(threads: usize, n: u32, request: &(dyn Fn(usize) + Sync)) -> f64 {
        let mut runs: Vec<f64> = (0..5)
            .map(|_| {
                let start = std::time::Instant::now();
                std::thread::scope(|scope| {
                    for t in 0..threads {
                        scope.spawn(move || (0..n).for_each(|_| request(t)));
                    }
                });
                start.elapsed().as_nanos() as f64 / f64::from(n)
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        runs[2]
    }

    /// Speed of the request path (not a test: it asserts nothing). Run:
    /// `cargo test --release -p datapunk-lb --lib measure_retry_budget --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run by hand"]
    #[allow(clippy::print_stdout)] // the measurement is the output
    fn measure_retry_budget_request_path() {
        let n = 2_000_000;
        let config = RetryBudgetConfig::default();
        let locked = Locked {
            ratio: 0.2,
            floor: 10.0,
            state: Mutex::new((10.0, std::time::Instant::now())),
        };
        let sharded = RetryBudget::with_shards(config, 3);
        let one_shard = RetryBudget::with_shards(config, 1);
        for threads in [1, 2] {
            let old = per_request_ns(threads, n, &|_| {
                std::hint::black_box(locked.holds_one());
                locked.deposit();
            });
            let new = per_request_ns(threads, n, &|t| {
                std::hint::black_box(sharded.holds_one_on(1 + t));
                sharded.deposit_on(1 + t);
            });
            let shared = per_request_ns(threads, n, &|_| {
                std::hint::black_box(one_shard.holds_one_on(0));
                one_shard.deposit_on(0);
            });
            println!(
                "{threads} thread(s): one lock {old:.1} ns/request, a shard per thread {new:.1}, one shard for all {shared:.1}"
            );
        }
    }
}
