//! [`ServiceStats`]: the exact counters of one service, and the one place
//! they change.
//!
//! ## Rule
//!
//! Every instance is counted in exactly one [`Availability`]: `Available`,
//! `Unavailable` (ejected or breaker open), `Draining`, or `Absent`
//! (removed, or not yet added). The instance remembers how it is counted;
//! `ServiceStats::recount` moves it from that to how it should be counted
//! now, adjusting the member, draining and unavailable counters in one step.
//! No other code touches those counters, so they cannot drift apart from
//! the instances they describe. Panic mode reads them (three atomic loads)
//! instead of scanning the members on every pick. Request counters
//! (in flight, outcomes, failures) change only through the methods below.
//!
//! ## Request counters are per thread
//!
//! A select and its release each move the in-flight count, so one shared
//! atomic would be a read-modify-write on the same cache line from every
//! thread on every pick — the line the panic check reads, too. The request
//! counters are therefore striped by thread (`PerThread`): a thread adds to
//! its own slot — with a plain load and store, no locked instruction, as
//! only it writes there (`per_thread`, "Owned slots") — and a reader sums
//! the slots. A selection released on another
//! thread than the one that made it subtracts from that thread's slot, so a
//! slot may go negative; the sum is still exact, and is clamped at 0 only for
//! a reader that races the two halves.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};

use crate::per_thread::{self, PerThread};

/// How the service's counters count one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Availability {
    /// Not counted: never added, or removed.
    #[default]
    Absent,
    /// A member that may be selected.
    Available,
    /// A member that is ejected (health 0) or whose breaker is open.
    Unavailable,
    /// A member on its way out: counted as a member, not as eligible.
    Draining,
}

/// Exact counters of one service.
#[derive(Debug, Default)]
pub struct ServiceStats {
    requests: PerThread<RequestCounters>,
    members: AtomicUsize,
    draining: AtomicUsize,
    unavailable: AtomicUsize,
}

/// One thread's share of the request counters.
#[derive(Debug, Default)]
struct RequestCounters {
    /// Started minus finished on this thread (may be negative: see the
    /// module doc).
    inflight: AtomicI64,
    requests: AtomicU64,
    failures: AtomicU64,
}

impl Availability {
    /// `(members, draining, unavailable)` contributions of one instance.
    fn counts(self) -> [usize; 3] {
        match self {
            Availability::Absent => [0, 0, 0],
            Availability::Available => [1, 0, 0],
            Availability::Unavailable => [1, 0, 1],
            Availability::Draining => [1, 1, 0],
        }
    }
}

impl ServiceStats {
    /// Moves one instance from how it is counted (`counted`) to `now`;
    /// returns the previous availability if it changed. The only way the
    /// member, draining and unavailable counters change.
    pub(crate) fn recount(
        &self,
        counted: &mut Availability,
        now: Availability,
    ) -> Option<Availability> {
        let before = std::mem::replace(counted, now);
        if before == now {
            return None;
        }
        let counters = [&self.members, &self.draining, &self.unavailable];
        for ((counter, b), a) in counters.iter().zip(before.counts()).zip(now.counts()) {
            if a > b {
                counter.fetch_add(1, Ordering::AcqRel);
            } else if b > a {
                counter.fetch_sub(1, Ordering::AcqRel);
            }
        }
        Some(before)
    }

    /// A selection was made: one more request in flight.
    #[inline]
    pub(crate) fn request_started(&self) {
        let (local, owned) = self.requests.local_owned();
        per_thread::add(&local.inflight, 1, owned);
    }

    /// A selection was released.
    #[inline]
    pub(crate) fn request_finished(&self) {
        let (local, owned) = self.requests.local_owned();
        per_thread::add(&local.inflight, -1, owned);
    }

    /// A request's outcome was recorded.
    pub(crate) fn outcome(&self, failed: bool) {
        let (local, owned) = self.requests.local_owned();
        per_thread::add(&local.requests, 1, owned);
        if failed {
            per_thread::add(&local.failures, 1, owned);
        }
    }

    /// Requests in flight (a sum over the threads' slots).
    pub fn in_flight(&self) -> u64 {
        let sum: i64 = self
            .requests
            .iter()
            .map(|c| c.inflight.load(Ordering::Relaxed))
            .sum();
        u64::try_from(sum).unwrap_or(0)
    }

    /// Request outcomes recorded.
    pub fn requests(&self) -> u64 {
        self.requests
            .iter()
            .map(|c| c.requests.load(Ordering::Relaxed))
            .sum()
    }

    /// Request failures recorded.
    pub fn failures(&self) -> u64 {
        self.requests
            .iter()
            .map(|c| c.failures.load(Ordering::Relaxed))
            .sum()
    }

    /// `(members − draining, eligible)`: the panic check's inputs.
    #[inline]
    pub fn counted(&self) -> (usize, usize) {
        let members = self.members.load(Ordering::Acquire);
        let draining = self.draining.load(Ordering::Acquire);
        let unavailable = self.unavailable.load(Ordering::Acquire);
        let total = members.saturating_sub(draining);
        (total, total.saturating_sub(unavailable))
    }

    /// Instances counted as eligible.
    pub fn available(&self) -> usize {
        self.counted().1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Availability::*;

    #[test]
    fn every_transition_moves_exactly_its_counters() {
        let stats = ServiceStats::default();
        let mut a = Absent;
        let mut b = Absent;
        assert_eq!(stats.recount(&mut a, Available), Some(Absent));
        assert_eq!(stats.recount(&mut b, Available), Some(Absent));
        assert_eq!(stats.counted(), (2, 2));
        assert_eq!(stats.recount(&mut a, Available), None, "no change");
        stats.recount(&mut a, Unavailable);
        assert_eq!(stats.counted(), (2, 1));
        // Unavailable → draining: out of both the total and the eligible.
        stats.recount(&mut a, Draining);
        assert_eq!(stats.counted(), (1, 1));
        stats.recount(&mut b, Unavailable);
        assert_eq!(stats.counted(), (1, 0));
        stats.recount(&mut a, Absent);
        stats.recount(&mut b, Absent);
        assert_eq!(stats.counted(), (0, 0));
        assert_eq!(
            [&stats.members, &stats.draining, &stats.unavailable]
                .map(|c| c.load(Ordering::Relaxed)),
            [0, 0, 0]
        );
        assert_eq!((a, b), (Absent, Absent));
    }

    #[test]
    fn in_flight_is_exact_when_released_on_another_thread() {
        let stats = ServiceStats::default();
        stats.request_started();
        stats.request_started();
        assert_eq!(stats.in_flight(), 2);
        // Released elsewhere: that thread's slot goes to -1, the sum to 1.
        std::thread::scope(|s| {
            s.spawn(|| stats.request_finished());
        });
        assert_eq!(stats.in_flight(), 1);
        std::thread::scope(|s| {
            s.spawn(|| stats.outcome(true));
        });
        stats.outcome(false);
        assert_eq!((stats.requests(), stats.failures()), (2, 1));
    }
}
