//! `weighted`: smooth weighted round robin.
//!
//! ## Rule
//!
//! Over any window of `W = Σ weights` consecutive picks (of one thread when
//! all weights are equal: see below), each instance gets exactly its
//! weight's worth of picks, spread out rather than in runs:
//! weights {5, 1, 1} give `a b a a c a a`, repeating, never two light picks
//! in a row (nginx's smooth WRR has the same property but costs O(n) per
//! pick).
//!
//! ## Structure: WF²Q, O(log n) per pick
//!
//! The schedule is Worst-case Fair Weighted Fair Queueing (Bennett & Zhang,
//! 1996) in exact integer arithmetic. Within a period of `W` picks, instance
//! `i`'s `k`-th pick has start `(k−1)·W/wᵢ` and finish `k·W/wᵢ`; pick `t`
//! goes to the instance with the earliest finish among those whose start is
//! `≤ t`. One heap orders the waiting instances by start, another the
//! eligible ones by finish. Some instance is always eligible (the starts of
//! the `t` picks made so far sum to at most `t`), and an instance that has
//! had `wᵢ` picks waits for the next period, so a period holds exactly `wᵢ`
//! picks of each instance; since the period ends in the state it began in,
//! the sequence repeats and *every* window of `W` picks is exact. Cross
//! multiplication (in `u128`) keeps it exact: no floating point drift, and no
//! periodic reset is needed, so no pick pays an O(n) rebuild.
//!
//! When all configured weights are equal the schedule is a plain rotation and
//! no heap is built: one rotation per thread, as `round_robin`'s (its
//! module doc, *Threads*). So there the rule holds for the picks of each
//! thread, every window of `n` of them exact, and over the `T` thread
//! slots in use every instance stays within `T·(n − 1)/n` picks of its
//! exact share (unequal weights keep one schedule per service, under its
//! lock, exact across threads); a thread
//! picks with a plain load and store, where one service-wide counter moved
//! its line between the cores on every pick (picks bench, 100,000 equal
//! weights: 79 → 53 ns on one thread, 160 → 53 ns per thread on two).
//!
//! ## Dynamic weight
//!
//! The schedule follows configured weights. Health score and slow start
//! (in `[0, 1]`) act per pick: the scheduled instance is accepted with that
//! probability, otherwise the schedule moves on. With every instance
//! healthy the sequence is exactly the WF²Q one.
//!
//! The schedule is rebuilt when the member list changes: O(n), measured in
//! `docs/benchmarks.md`. Up to 10,000 members that happens at once, in
//! [`Strategy::prepare`]; above, in [`Strategy::maintain`] or, failing that,
//! inline on a pick at most once a second, so a burst of registrations into
//! a large service is not O(n²). Until then the previous schedule serves
//! (removed members are skipped; new ones wait, as slow start would make
//! them anyway).

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::round_robin::Rotation;
use super::{
    rebuild_inline, FactorDraw, PickContext, Picked, Strategy, StrategyKind, EAGER_REBUILD_LIMIT,
};
use crate::clock::Timestamp;
use crate::instance::Member;
use crate::members::Members;

/// Scheduled instances tried per pick before the best of them is taken.
const MAX_TRIES: usize = 16;

/// Smooth weighted round robin.
#[derive(Debug, Default)]
pub struct Weighted {
    /// The equal-weights case: a rotation per thread, as `round_robin`'s.
    rotation: Rotation,
    schedule: Mutex<Option<Schedule>>,
}

/// A WF²Q schedule over its own copy of the member list, so that a schedule
/// one generation old still names valid (if perhaps removed) members.
#[derive(Debug)]
struct Schedule {
    generation: u64,
    built_at: Timestamp,
    members: Vec<Arc<Member>>,
    weights: Vec<u64>,
    /// Picks of each member since the schedule was built.
    picks: Vec<u64>,
    total: u64,
    /// Picks made since the schedule was built.
    t: u64,
    eligible: BinaryHeap<Reverse<Finish>>,
    waiting: BinaryHeap<Reverse<Start>>,
}

/// Orders by finish `(k+1)/w`, then index.
#[derive(Debug, PartialEq, Eq)]
struct Finish {
    next: u64,
    w: u64,
    idx: u32,
}

/// Orders by start `k/w`, then index.
#[derive(Debug, PartialEq, Eq)]
struct Start {
    k: u64,
    w: u64,
    idx: u32,
}

// Products in u128: `k` and `t` grow without bound (no period reset, so no
// O(n) rebuild every Σw picks) and u128 cannot overflow in practice.
impl Ord for Finish {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (u128::from(self.next) * u128::from(o.w))
            .cmp(&(u128::from(o.next) * u128::from(self.w)))
            .then(self.idx.cmp(&o.idx))
    }
}
impl PartialOrd for Finish {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Start {
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (self.k * o.w)
            .cmp(&(o.k * self.w))
            .then(self.idx.cmp(&o.idx))
    }
}
impl PartialOrd for Start {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}

impl Schedule {
    fn build(members: &Members, generation: u64, built_at: Timestamp) -> Self {
        let members: Vec<Arc<Member>> = members.iter().cloned().collect();
        let weights: Vec<u64> = members
            .iter()
            .map(|m| u64::from(m.instance().weight().get()))
            .collect();
        let mut s = Schedule {
            generation,
            built_at,
            picks: vec![0; members.len()],
            total: weights.iter().sum(),
            members,
            weights,
            t: 0,
            eligible: BinaryHeap::new(),
            waiting: BinaryHeap::new(),
        };
        s.restart_period();
        s
    }

    fn restart_period(&mut self) {
        self.t = 0;
        self.picks.iter_mut().for_each(|p| *p = 0);
        self.waiting.clear();
        let v: Vec<_> = self
            .weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Reverse(Finish {
                    next: 1,
                    w,
                    idx: i as u32,
                })
            })
            .collect();
        self.eligible = BinaryHeap::from(v);
    }

    /// The next member in the schedule, with its position in the list the
    /// schedule was built from.
    fn next(&mut self) -> Option<(usize, &Arc<Member>)> {
        if self.members.is_empty() {
            return None;
        }
        while let Some(Reverse(s)) = self.waiting.peek() {
            // Eligible once its start k·W/w ≤ t.
            if u128::from(s.k) * u128::from(self.total) > u128::from(self.t) * u128::from(s.w) {
                break;
            }
            let Reverse(s) = self.waiting.pop()?;
            self.eligible.push(Reverse(Finish {
                next: s.k + 1,
                w: s.w,
                idx: s.idx,
            }));
        }
        let Reverse(f) = self.eligible.pop()?;
        let i = f.idx as usize;
        self.picks[i] += 1;
        self.waiting.push(Reverse(Start {
            k: self.picks[i],
            w: f.w,
            idx: f.idx,
        }));
        self.t += 1;
        Some((i, self.members.get(i)?))
    }
}

impl Weighted {
    fn rebuild_if_stale(&self, members: &Members, generation: u64, now: Timestamp) {
        let mut guard = self.schedule.lock();
        if members.uniform_weights() {
            *guard = None; // the rotation needs no schedule
            return;
        }
        if guard.as_ref().is_none_or(|s| s.generation < generation) {
            // built_at is only used to rate-limit inline rebuilds; a rebuild
            // here keeps the schedule fresh so none is needed.
            *guard = Some(Schedule::build(members, generation, now));
        }
    }

    fn pick_rotation(&self, cx: &mut PickContext<'_>) -> Option<Picked> {
        let steps = MAX_TRIES.min(cx.members.len() * 2);
        self.rotation.pick(cx, steps)
    }

    fn pick_schedule(&self, cx: &mut PickContext<'_>) -> Option<Picked> {
        let mut guard = self.schedule.lock();
        let rebuild = guard
            .as_ref()
            .is_none_or(|s| rebuild_inline(s.generation, s.built_at, cx.generation, || cx.now()));
        if rebuild {
            *guard = Some(Schedule::build(cx.members, cx.generation, cx.now()));
        }
        let sched = guard.as_mut()?;
        // A schedule of the snapshot's generation lists its members in the
        // same order: check the member on its hot line through the
        // snapshot's list and name the pick by position (see `Picked`),
        // reading no `Member`. An older schedule goes through its own copy.
        let fresh = sched.generation == cx.generation;
        let mut draw = FactorDraw::default();
        for _ in 0..MAX_TRIES {
            let Some((i, m)) = sched.next() else { break };
            let offered = if fresh {
                let Some(c) = cx.members.candidate(i) else {
                    continue;
                };
                let member = || c.member().map(|m| &**m);
                draw.offer(cx, c.hot, member, || Picked::At(i))
            } else {
                let picked = || Picked::Member(m.clone());
                draw.offer(cx, m.live().hot(), || Some(&**m), picked)
            };
            if offered.is_some() {
                return offered;
            }
        }
        drop(guard); // the fallback may scan: not under the schedule's lock
        draw.finish(cx)
    }
}

impl Strategy for Weighted {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Weighted
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Picked> {
        if cx.members.is_empty() {
            return None;
        }
        if cx.members.uniform_weights() {
            self.pick_rotation(cx)
        } else {
            self.pick_schedule(cx)
        }
    }

    fn prepare(&self, members: &Members, generation: u64, now: Timestamp) {
        if members.len() <= EAGER_REBUILD_LIMIT {
            self.rebuild_if_stale(members, generation, now);
        }
    }

    fn maintain(&self, members: &Members, generation: u64, now: Timestamp) {
        self.rebuild_if_stale(members, generation, now);
    }
}
