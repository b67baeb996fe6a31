//! Time for the core: a [`Clock`] trait with a [`SystemClock`] and a
//! [`ManualClock`].
//!
//! Every time-based rule (health recovery, breaker windows, slow start,
//! latency EWMA decay) reads time only through a `Clock`, so tests move time
//! by hand instead of sleeping. Time is a [`Timestamp`]: nanoseconds since the
//! clock's own origin, kept in a `u64` so it fits an atomic.
//!
//! A pick reads the clock through a [`LazyNow`]: at most once, and only if
//! a rule it meets needs the time (an open breaker's window, a slow-start
//! ramp, `adaptive`'s evaluation once due, a stale table). A `SystemClock`
//! read is about 100 instructions (`clock_gettime` through the vDSO plus
//! the `Instant` arithmetic), a fifth of a whole pick on a small service; a
//! pick on closed breakers with no ramp under way needs none. A rule that
//! only asks whether a period has surely passed (`adaptive`'s evaluation
//! being due, a `peak_ewma` probe being due) asks the service's latest
//! clock reading instead, never later than now and about a millisecond old
//! while requests complete ([`service`](crate::service), "The clock on the
//! pick path").

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A point in time, in nanoseconds since the origin of the clock that made it.
///
/// Timestamps from different clocks are not comparable. `u64` nanoseconds
/// cover 584 years, so overflow is not a concern in practice; arithmetic
/// saturates anyway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

/// An optional [`Timestamp`] in the 8 bytes of one: `u64::MAX` stands for
/// "none", as it does in the instance's atomics. That reading is 584 years
/// after a clock's origin, and the only way to reach it is a saturating
/// `+ Duration::MAX`-like sum, which means "never" where it is stored (a
/// deadline that cannot pass), so reading it back as "none" changes no
/// rule. An `Option<Timestamp>` is 16 bytes; the per-instance trackers
/// hold five of these (see `instance`'s module doc, "Bytes").
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct OptionalTimestamp(u64);

/// Source of the current time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time. Must never go backwards.
    fn now(&self) -> Timestamp;
}

/// The real monotonic clock (`std::time::Instant`), with its origin at
/// construction.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

/// A clock that only moves when told to; for tests and simulations.
///
/// Starts at 1 s rather than 0 so that "time since an event at 0" is never
/// confused with "no event yet".
#[derive(Debug)]
pub struct ManualClock {
    nanos: AtomicU64,
}

/// The time of one pick, read from its clock on first use and then kept.
pub struct LazyNow<'a> {
    clock: &'a dyn Clock,
    at: Cell<Option<Timestamp>>,
}

impl<'a> LazyNow<'a> {
    /// Nothing read yet.
    #[inline]
    pub fn new(clock: &'a dyn Clock) -> Self {
        Self {
            clock,
            at: Cell::new(None),
        }
    }

    /// The time: the clock's reading on the first call, the same after.
    #[inline]
    pub fn get(&self) -> Timestamp {
        match self.at.get() {
            Some(t) => t,
            None => {
                let t = self.clock.now();
                self.at.set(Some(t));
                t
            }
        }
    }

    /// The time if it was read, without reading it.
    #[inline]
    pub fn if_read(&self) -> Option<Timestamp> {
        self.at.get()
    }
}

impl fmt::Debug for LazyNow<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LazyNow").field(&self.at.get()).finish()
    }
}

// === impl Timestamp ===

impl Timestamp {
    /// A timestamp `nanos` nanoseconds after the clock's origin.
    pub const fn from_nanos(nanos: u64) -> Self {
        Self(nanos)
    }

    /// Nanoseconds since the clock's origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// `self + d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_nanos(d)))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, rhs: Duration) -> Timestamp {
        self.saturating_add(rhs)
    }
}

// === impl OptionalTimestamp ===

impl OptionalTimestamp {
    /// No timestamp.
    pub(crate) const NONE: OptionalTimestamp = OptionalTimestamp(u64::MAX);

    /// `t`.
    #[inline]
    pub(crate) const fn some(t: Timestamp) -> Self {
        Self(t.0)
    }

    /// The timestamp, if there is one.
    #[inline]
    pub(crate) fn get(self) -> Option<Timestamp> {
        (self.0 != u64::MAX).then_some(Timestamp(self.0))
    }
}

impl fmt::Debug for OptionalTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.get(), f)
    }
}

/// A `Duration` in nanoseconds, saturating at `u64::MAX`.
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

// === impl SystemClock ===

impl SystemClock {
    /// A system clock whose origin is now.
    #[allow(clippy::disallowed_methods)] // the one place the core reads real time
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one place the core reads real time
    fn now(&self) -> Timestamp {
        Timestamp(duration_nanos(self.origin.elapsed()))
    }
}

// === impl ManualClock ===

impl ManualClock {
    /// A manual clock at 1 s.
    pub fn new() -> Self {
        Self {
            nanos: AtomicU64::new(1_000_000_000),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.nanos.fetch_add(duration_nanos(d), Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.nanos.load(Ordering::SeqCst))
    }
}

/// A [`ManualClock`] that counts its reads: for tests of what reads the
/// clock (a pick that needs no time reads none; issue 12).
#[derive(Debug, Default)]
pub struct CountingClock {
    time: ManualClock,
    reads: AtomicUsize,
}

impl Clock for CountingClock {
    fn now(&self) -> Timestamp {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.time.now()
    }
}

impl CountingClock {
    /// At 1 s, no read yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::Relaxed)
    }

    /// Moves the clock forward by `d` (not a read).
    pub fn advance(&self, d: Duration) {
        self.time.advance(d);
    }

    /// The clock underneath: reading it counts no read.
    pub fn manual(&self) -> &ManualClock {
        &self.time
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_advanced() {
        let c = ManualClock::new();
        let t0 = c.now();
        assert_eq!(c.now(), t0, "manual clock must not move by itself");
        c.advance(Duration::from_millis(1500));
        assert_eq!(c.now().saturating_since(t0), Duration::from_millis(1500));
        assert_eq!(t0.saturating_since(c.now()), Duration::ZERO);
    }

    #[test]
    fn lazy_now_reads_the_clock_once_and_only_when_asked() {
        let c = ManualClock::new();
        let lazy = LazyNow::new(&c);
        c.advance(Duration::from_secs(1));
        assert_eq!(lazy.if_read(), None, "nothing read yet");
        let t = lazy.get();
        assert_eq!(t, c.now(), "the reading at the first get, not at new");
        c.advance(Duration::from_secs(1));
        assert_eq!(lazy.get(), t, "kept");
        assert_eq!(lazy.if_read(), Some(t));
    }

    #[test]
    fn system_clock_is_monotonic() {
        let c = SystemClock::new();
        let a = c.now();
        let b = c.now();
        assert!(b >= a);
    }
}
