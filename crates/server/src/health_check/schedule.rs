//! The probe schedule of one service: pure (no I/O, time passed in as the
//! core's [`Timestamp`]), so it is tested through a manual clock.
//!
//! ## Rule
//!
//! - **Ring, evenly spaced**: the service's instances are visited in member
//!   order, one visit per slot of `effective_interval / N`, so each
//!   instance is visited once per effective interval and probes never
//!   bunch at interval boundaries. After a stall (a slow tick) at most one
//!   interval's worth of slots is caught up; older slots are dropped.
//! - **Budget**: `effective_interval = interval × stretch`, where
//!   [`stretch`] is Σ(N / interval) over all checked services divided by
//!   `health_check_max_probes_per_second`, or 1 when under budget. One
//!   factor for every service, so none is starved.
//! - **Passive first**: at its visit, an instance whose successful real
//!   requests grew since its previous visit (a success within the last
//!   effective interval) and whose breaker is closed is not probed; its
//!   failure count resets. Probes go where traffic does not.
//! - **Backoff**: after `k` consecutive failed probes the next probe waits
//!   [`next_delay`](super::next_delay) (interval × 2^k, capped at
//!   `backoff_max`), taken at the first visit after it, so ejected
//!   instances are probed on their backoff schedule whether or not traffic
//!   flows elsewhere.
//! - An instance whose probe is still running is not probed again.
//!
//! ## Memory: state only where there is something to remember
//!
//! An instance has an [`Entry`] only while it has state that differs from
//! `Entry::NEW`: a probe in flight, failed probes (backoff), or real
//! successes seen. A healthy instance that only probes judge (no real
//! traffic, the usual case of a large idle service) has none between its
//! probes: a missing entry reads as `Entry::NEW` (no failures, no
//! successes seen), exactly what its dropped entry said, so the rule above
//! is unchanged. (An instance new to the schedule starts from "no successes
//! seen" too: one that joins with real successes already counted — a
//! checker restarted by a reload, a re-registered id keeping its live
//! state — takes them as passive evidence and is first probed one visit
//! later, unless ejected.) At 100,000 instances with checks and no traffic
//! the schedule holds the entries of probes in flight (at most the
//! checker's `MAX_PENDING`) instead of 100,000 (54 B each with the id and
//! the map's slack). An entry is 16 bytes: successes are kept as their low
//! 32 bits and compared with wrapping arithmetic (a count cannot move by
//! 2^31 between two visits of one instance).

use std::collections::HashMap;
use std::time::Duration;

use datapunk_lb_core::{InstanceId, Timestamp};

use crate::config::HealthCheck;

/// What the schedule reads of one member at its visit.
#[derive(Debug, Clone)]
pub(crate) struct View {
    /// The instance.
    pub id: InstanceId,
    /// Successful real requests so far (`requests - failures`).
    pub successes: u64,
    /// Whether the breaker is not closed (open or half-open).
    pub ejected: bool,
}

/// Per-instance schedule state, 16 bytes; kept only while it differs from
/// [`Entry::NEW`] (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// No probe before this (backoff), ns; 0 when not backing off.
    not_before: u64,
    /// The low 32 bits of the successes seen at the previous visit.
    successes_seen: u32,
    /// Consecutive failed probes (saturating; the backoff caps long before).
    fails: u16,
    in_flight: bool,
}

impl Entry {
    /// A new instance's state, and what a missing entry means.
    const NEW: Entry = Entry {
        not_before: 0,
        successes_seen: 0,
        fails: 0,
        in_flight: false,
    };
}

/// The low 32 bits of a success count (see the module doc).
fn low(successes: u64) -> u32 {
    successes as u32
}

/// Whether `successes` is past `seen` (wrapping: see the module doc).
fn grew(successes: u64, seen: u32) -> bool {
    (low(successes).wrapping_sub(seen) as i32) > 0
}

/// One service's schedule; `C` is the idle connection the prober keeps
/// between probes (none for tests and TCP checks).
#[derive(Debug)]
pub(crate) struct Schedule<C> {
    check: HealthCheck,
    cursor: usize,
    next_slot: Option<Timestamp>,
    /// Instances whose state differs from [`Entry::NEW`].
    entries: HashMap<InstanceId, Entry>,
    /// The instances' idle keep-alive connections, handed to their next
    /// probe. Apart from `entries`: only services small enough to keep
    /// connections have any, so the per-instance entry stays small.
    conns: HashMap<InstanceId, C>,
}

/// The factor every interval is stretched by: 1 under budget, else
/// demand / budget (`demand` in probes/s).
pub(crate) fn stretch(demand: f64, budget: f64) -> f64 {
    if budget > 0.0 && demand > budget {
        demand / budget
    } else {
        1.0
    }
}

impl<C> Schedule<C> {
    pub(crate) fn new(check: HealthCheck) -> Self {
        Self {
            check,
            cursor: 0,
            next_slot: None,
            entries: HashMap::new(),
            conns: HashMap::new(),
        }
    }

    /// The interval stretched by `factor`.
    pub(crate) fn effective_interval(&self, factor: f64) -> Duration {
        self.check.interval.mul_f64(factor.max(1.0))
    }

    /// Visits the slots due at `now` among `n` members (`view(i)` reads
    /// member `i`) and returns the indices to probe now, each marked in
    /// flight with its idle connection taken out; at most `room` of them.
    /// Slots past `room` stay due for the next call (and, as after any
    /// stall, fall off once older than a period): a prober that cannot
    /// keep up falls behind instead of queueing probes without bound.
    pub(crate) fn due(
        &mut self,
        now: Timestamp,
        factor: f64,
        n: usize,
        room: usize,
        view: impl Fn(usize) -> Option<View>,
    ) -> Vec<(usize, InstanceId, Option<C>)> {
        let mut out = Vec::new();
        if n == 0 {
            self.next_slot = None;
            return out;
        }
        let period = self.effective_interval(factor);
        let slot = (period / n as u32).max(Duration::from_nanos(1));
        // Catch up at most one period after a stall.
        let oldest = now
            .as_nanos()
            .saturating_sub(u64::try_from(period.as_nanos()).unwrap_or(u64::MAX));
        let mut next = match self.next_slot {
            Some(t) => Timestamp::from_nanos(t.as_nanos().max(oldest)),
            None => now,
        };
        while next <= now && out.len() < room {
            let i = self.cursor % n;
            self.cursor = (self.cursor + 1) % n;
            next = next + slot;
            let Some(v) = view(i) else { continue };
            // No entry: nothing to remember, no successes seen (module doc).
            let e = self.entries.entry(v.id.clone()).or_insert(Entry::NEW);
            if e.in_flight || now.as_nanos() < e.not_before {
                continue;
            }
            if !v.ejected && grew(v.successes, e.successes_seen) {
                e.successes_seen = low(v.successes);
                e.fails = 0;
                continue;
            }
            e.successes_seen = low(v.successes);
            e.in_flight = true;
            let conn = if self.conns.is_empty() {
                None
            } else {
                self.conns.remove(&v.id)
            };
            out.push((i, v.id, conn));
        }
        self.next_slot = Some(next);
        out
    }

    /// Records a probe's result at `now`; `conn` is the connection to keep
    /// idle for the next probe.
    pub(crate) fn done(
        &mut self,
        id: &InstanceId,
        ok: bool,
        now: Timestamp,
        factor: f64,
        conn: Option<C>,
    ) {
        let period = self.effective_interval(factor);
        let Some(e) = self.entries.get_mut(id) else {
            return;
        };
        e.in_flight = false;
        if let Some(c) = conn {
            self.conns.insert(id.clone(), c);
        }
        if ok {
            e.fails = 0;
            e.not_before = 0;
        } else {
            e.fails = e.fails.saturating_add(1);
            let delay = super::next_delay(&self.check, u32::from(e.fails), 0.5).max(period);
            // Half a period early, so the visit one backoff after the probe
            // is taken even though the result came in after its slot.
            e.not_before = now.saturating_add(delay - period / 2).as_nanos();
        }
        if *e == Entry::NEW {
            // Nothing to remember: its next visit reads it as new.
            self.entries.remove(id);
        }
    }

    /// How long from `now` until the next slot (zero if due; `None` before
    /// the first visit or with no members).
    pub(crate) fn until_next(&self, now: Timestamp) -> Option<Duration> {
        self.next_slot.map(|t| t.saturating_since(now))
    }

    /// Instances the schedule holds state for (see the module doc: not
    /// every member has state).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drops the state of instances gone from the service (the runner
    /// calls it only when members left: [`len`](Self::len) exceeds the
    /// member count, or the count fell; the steady state costs nothing).
    pub(crate) fn retain(&mut self, keep: impl Fn(&InstanceId) -> bool) {
        self.entries.retain(|id, _| keep(id));
        self.conns.retain(|id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use datapunk_lb_core::{Clock, ManualClock};

    use super::*;
    use crate::config::HealthCheckKind;

    fn check(interval_ms: u64, backoff_max_ms: u64) -> HealthCheck {
        HealthCheck {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(interval_ms / 2),
            backoff_max: Duration::from_millis(backoff_max_ms),
        }
    }

    fn ids(n: usize) -> Vec<InstanceId> {
        (0..n)
            .map(|i| InstanceId::try_new(&format!("i{i}")).unwrap())
            .collect()
    }

    fn view_of(ids: &[InstanceId], i: usize, successes: u64, ejected: bool) -> Option<View> {
        Some(View {
            id: ids[i].clone(),
            successes,
            ejected,
        })
    }

    /// Steps `clock` by 1 ms for `ms` ms; at each step asks for due probes
    /// and answers each at once with `ok(i)`. Returns (time ms, index) of
    /// every probe.
    fn drive(
        s: &mut Schedule<()>,
        clock: &ManualClock,
        factor: f64,
        ms: u64,
        view: impl Fn(usize, u64) -> Option<View>,
        n: usize,
        ok: impl Fn(usize) -> bool,
    ) -> Vec<(u64, usize)> {
        let mut probes = Vec::new();
        let start = clock.now().as_nanos();
        for _ in 0..ms {
            clock.advance(Duration::from_millis(1));
            let now = clock.now();
            // ms since this run began
            let t = (now.as_nanos() - start) / 1_000_000;
            for (i, id, _) in s.due(now, factor, n, usize::MAX, |i| view(i, t)) {
                probes.push((t, i));
                s.done(&id, ok(i), now, factor, None);
            }
        }
        probes
    }

    #[test]
    fn the_budget_stretches_every_interval_evenly() {
        // 100 instances every 1 s need 100 probes/s; a budget of 50/s
        // stretches the interval to 2 s: one probe per 20 ms slot.
        let (n, budget) = (100usize, 50.0);
        let factor = stretch(n as f64 / 1.0, budget);
        assert_eq!(factor, 2.0);
        assert_eq!(stretch(40.0, 50.0), 1.0, "under budget: unchanged");
        let ids = ids(n);
        let clock = ManualClock::new();
        let mut s = Schedule::new(check(1_000, 8_000));
        assert_eq!(s.effective_interval(factor), Duration::from_secs(2));
        let view = |i: usize, _| view_of(&ids, i, 0, false);
        let probes = drive(&mut s, &clock, factor, 6_000, view, n, |_| true);
        // 6 s at 50/s.
        assert!((299..=301).contains(&probes.len()), "{}", probes.len());
        // Evenly spaced: every gap is one 20 ms slot (±1 ms step).
        for w in probes.windows(2) {
            let gap = w[1].0 - w[0].0;
            assert!((19..=21).contains(&gap), "gap {gap} ms at {w:?}");
        }
        // Each instance once per stretched interval.
        for i in 0..n {
            let times: Vec<u64> = probes.iter().filter(|p| p.1 == i).map(|p| p.0).collect();
            assert!(times.len() >= 2, "instance {i}: {times:?}");
            for w in times.windows(2) {
                assert!(
                    (1_980..=2_020).contains(&(w[1] - w[0])),
                    "instance {i}: {times:?}"
                );
            }
        }
    }

    #[test]
    fn an_instance_with_recent_real_success_is_skipped_until_it_is_older_than_the_interval() {
        let ids = ids(2);
        let clock = ManualClock::new();
        let mut s = Schedule::new(check(1_000, 8_000));
        // Instance 0 serves real traffic until t = 5 s (one success every
        // 100 ms), then none; instance 1 never does.
        let successes = |t: u64| t.min(5_000) / 100;
        let view =
            |i: usize, t: u64| view_of(&ids, i, if i == 0 { successes(t) } else { 0 }, false);
        let probes = drive(&mut s, &clock, 1.0, 10_000, view, 2, |_| true);
        let of = |i| -> Vec<u64> { probes.iter().filter(|p| p.1 == i).map(|p| p.0).collect() };
        let busy = of(0);
        let idle = of(1);
        assert_eq!(idle.len(), 10, "idle: once per interval: {idle:?}");
        // The first visit sees a new instance (probed), then no probe while
        // traffic succeeds, then once per interval again from the first
        // visit whose previous visit was after the last success.
        assert!(busy[0] <= 1, "{busy:?}");
        let during: Vec<_> = busy.iter().filter(|&&t| t > 1 && t <= 5_000).collect();
        assert!(during.is_empty(), "probed despite real traffic: {busy:?}");
        let after: Vec<_> = busy.iter().filter(|&&t| t > 5_000).copied().collect();
        assert!(
            (4..=5).contains(&after.len()) && after[0] <= 7_000,
            "probed again within two intervals of the last success: {busy:?}"
        );
    }

    #[test]
    fn ejected_instances_follow_their_backoff_even_with_traffic_elsewhere() {
        let ids = ids(1);
        let clock = ManualClock::new();
        // interval 1 s, backoff_max 8 s: after k failures the next probe
        // waits 2^k s: 2, 4, 8, 8, ...
        let mut s = Schedule::new(check(1_000, 8_000));
        let view = |i: usize, t: u64| {
            // Real successes keep coming, but the breaker is open:
            // passive health does not vouch for an ejected instance.
            view_of(&ids, i, t / 10, true)
        };
        let probes = drive(&mut s, &clock, 1.0, 40_000, view, 1, |_| false);
        let gaps: Vec<u64> = probes
            .windows(2)
            .map(|w| (w[1].0 - w[0].0 + 500) / 1_000)
            .collect();
        assert_eq!(gaps, vec![2, 4, 8, 8, 8, 8], "{probes:?}");
        // A success resets the backoff.
        let ok = RefCell::new(false);
        let mut s = Schedule::new(check(1_000, 8_000));
        let probes = drive(&mut s, &clock, 1.0, 10_000, view, 1, |_| {
            let was = *ok.borrow();
            *ok.borrow_mut() = !was;
            was
        });
        let gaps: Vec<u64> = probes
            .windows(2)
            .map(|w| (w[1].0 - w[0].0 + 500) / 1_000)
            .collect();
        assert_eq!(
            gaps[..5],
            [2, 1, 2, 1, 2],
            "fail, ok, fail, ...: {probes:?}"
        );
    }

    #[test]
    fn a_stall_catches_up_at_most_one_interval_and_gone_instances_are_dropped() {
        let ids = ids(10);
        let clock = ManualClock::new();
        let mut s: Schedule<()> = Schedule::new(check(1_000, 8_000));
        let view = |i: usize| view_of(&ids, i, 0, false);
        clock.advance(Duration::from_millis(1));
        assert_eq!(s.due(clock.now(), 1.0, 10, usize::MAX, view).len(), 1);
        // The next of 10 slots in a 1 s ring is 100 ms away.
        assert_eq!(s.until_next(clock.now()), Some(Duration::from_millis(100)));
        clock.advance(Duration::from_secs(30));
        let due = s.due(clock.now(), 1.0, 10, usize::MAX, view);
        // Those in flight are not probed twice; nothing beyond one ring.
        assert_eq!(due.len(), 9, "{due:?}");
        assert_eq!(s.len(), 10);
        s.retain(|id| ids[..5].contains(id));
        assert_eq!(s.len(), 5);
    }

    #[test]
    fn a_full_prober_takes_no_more_than_its_room_and_the_rest_stay_due() {
        let ids = ids(10);
        let clock = ManualClock::new();
        let mut s: Schedule<()> = Schedule::new(check(1_000, 8_000));
        let view = |i: usize| view_of(&ids, i, 0, false);
        clock.advance(Duration::from_millis(1));
        assert_eq!(s.due(clock.now(), 1.0, 10, 1, view).len(), 1);
        // Half a ring later five slots are due; room for two.
        clock.advance(Duration::from_millis(500));
        let first: Vec<usize> = s
            .due(clock.now(), 1.0, 10, 2, view)
            .into_iter()
            .map(|d| d.0)
            .collect();
        assert_eq!(first, [1, 2]);
        assert_eq!(s.until_next(clock.now()), Some(Duration::ZERO), "still due");
        // No room: nothing is taken, nothing is skipped.
        assert!(s.due(clock.now(), 1.0, 10, 0, view).is_empty());
        let rest: Vec<usize> = s
            .due(clock.now(), 1.0, 10, usize::MAX, view)
            .into_iter()
            .map(|d| d.0)
            .collect();
        assert_eq!(rest, [3, 4, 5], "the slots left over, in ring order");
    }

    #[test]
    fn healthy_instances_without_traffic_hold_no_state_between_probes() {
        let n = 1_000;
        let ids = ids(n);
        let clock = ManualClock::new();
        let mut s = Schedule::new(check(1_000, 8_000));
        // Instance 0 fails every probe; instance 1 has real traffic; the
        // rest are healthy and idle.
        let view = |i: usize, t: u64| view_of(&ids, i, if i == 1 { 1 + t / 10 } else { 0 }, false);
        let probes = drive(&mut s, &clock, 1.0, 3_000, view, n, |i| i != 0);
        assert!(probes.len() >= 2_990, "{}", probes.len());
        // Only the failing one (its backoff) and the one with traffic (the
        // successes seen) have an entry.
        assert_eq!(
            s.len(),
            2,
            "entries: {:?}",
            s.entries.keys().collect::<Vec<_>>()
        );
        assert!(s.entries.contains_key(&ids[0]) && s.entries.contains_key(&ids[1]));
        // An idle healthy instance is still probed once per interval: a
        // missing entry does not skip it.
        let of = |i| probes.iter().filter(|p| p.1 == i).count();
        assert_eq!(of(500), 3, "{probes:?}");
        assert_eq!(of(1), 0, "real traffic vouches for it from its first visit");
        assert_eq!(
            of(0),
            2,
            "failing: probed at 0 s, then after 2 s of backoff"
        );
    }

    #[test]
    fn an_entry_is_sixteen_bytes_and_success_counts_compare_across_the_low_bits_wrap() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
        let seen = low(u64::from(u32::MAX) - 1);
        assert!(grew(u64::from(u32::MAX) + 3, seen), "past 2^32: grew");
        assert!(!grew(u64::from(u32::MAX) - 1, seen), "same: did not");
        // A count read while a request is between its pick and its failure
        // can step back by the requests in flight: not growth.
        assert!(!grew(u64::from(u32::MAX) - 4, seen));
        assert!(grew(7, low(6)) && !grew(6, low(6)) && !grew(5, low(6)));
    }
}
