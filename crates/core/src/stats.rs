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

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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
    inflight: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    members: AtomicUsize,
    draining: AtomicUsize,
    unavailable: AtomicUsize,
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
        self.inflight.fetch_add(1, Ordering::AcqRel);
    }

    /// A selection was released.
    #[inline]
    pub(crate) fn request_finished(&self) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }

    /// A request's outcome was recorded.
    pub(crate) fn outcome(&self, failed: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Request outcomes recorded.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Request failures recorded.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
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
}
