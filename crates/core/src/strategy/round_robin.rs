//! `round_robin`: rotation over eligible instances, admitting each in
//! proportion to its effective-weight factor.
//!
//! ## Rule
//!
//! Each thread keeps its own rotation (see *Threads*), which steps to the next
//! position `mod n` on every step. An eligible instance it lands on is taken
//! with probability equal to its factor `f` = health score × slow-start factor
//! (the seeded RNG of the pick; `f = 1` takes it without a draw), else the
//! rotation moves on to the next. Ineligible instances are skipped the same
//! way. After 16 steps without a taker the pick takes the eligible instance
//! with the highest factor it saw (so a service whose instances all ramp still
//! gets picks), else a random eligible one.
//!
//! So with every instance eligible at full factor each gets exactly one of a
//! thread's picks in every `n` consecutive picks of that thread; an instance at
//! factor `f` among `n − 1` full ones gets `f / (n − 1 + f)` of the picks, the
//! share `weighted` gives it: a recovering instance (slow start, lowered health
//! score) ramps up instead of taking a full share at once — the bug Envoy fixed
//! for its round robin in issue 19437. Configured weights do not change the
//! rotation (use `weighted` for that).
//!
//! *Threads.* The rotation is per thread, in the core's per-thread striping
//! (`per_thread`): a thread with a slot of its own keeps its next position
//! there with a plain load and one store per pick (only it writes there); the
//! threads beyond the 16 slots of their own share one slot and move it with a
//! read-modify-write per step, so together they rotate exactly as one. A slot
//! starts, at its first pick from the service, at the number of slots that
//! started before it, `mod n` (one shared read-modify-write per slot, not per
//! pick): the first thread starts at the first instance, as the one counter
//! did, and the first `n` threads to pick start on `n` different instances
//! instead of all on the first. (Starting at the slot's index instead would
//! make a fresh service's first pick depend on which slot a thread holds, and
//! two threads collide whenever their slots are equal mod `n`.)
//!
//! The bound: with every instance eligible at full factor and the member list
//! unchanged since the slots started, each slot's picks are one run of
//! consecutive positions `mod n`, so each instance holds `⌊p/n⌋` or `⌈p/n⌉` of
//! a slot's `p` picks. Summed over the `T` slots in use (threads with a slot of
//! their own, plus one if any thread is on the shared slot), at any moment
//! every instance is within `T·(n − 1)/n < T` picks of its exact share `P/n` of
//! the `P` picks so far, and any two instances' counts differ by at most `T`. A
//! single thread still rotates exactly, and one client connection is served
//! start to end by one worker thread (the proxy's thread per core), so the
//! requests of one connection rotate exactly (the proxy's e2e test counts
//! 100/100/100 over 300 requests on one keep-alive connection, and 99-101
//! each over 300 connections on two workers).
//!
//! *Why:* the one service-wide counter was the only shared read-modify-write a
//! pick made, and its line moved between the cores on every pick: at 100,000
//! instances a select + release took 71-77 ns on one thread but 164-183 ns per
//! thread on two, and 130-134 ns per thread on two at n = 10 (issue 12 asks ≤
//! 100 ns; `random`, which writes nothing shared, took 45-55 ns on two). With a
//! rotation per thread (the picks bench, CPU time, medians of alternating runs,
//! the two threads running at once): at 100,000 instances 79 → 52 ns on one
//! thread and 170 → 60 ns per thread on two; at n = 10, 78 → 55 and 134 → 87
//! (what remains at n = 10 is the ten instances' own lines, which both threads
//! write). One thread gains too: a plain store instead of a locked
//! read-modify-write (a full fence) per step, and no division per step on a
//! slot of its own. NGINX (per worker process) and Envoy (per worker thread)
//! rotate the same way; HAProxy takes a lock.
//!
//! *Cost:* the factor is a health-score load and the slow-start ramp at the
//! pick's `now`, which the context already holds; a full-factor instance costs
//! no random draw.

use super::{FactorDraw, PickContext, Picked, Strategy, StrategyKind};
use crate::per_thread::PerThread;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Steps the rotation may move on (ineligible or not admitted) before the
/// fallback.
const MAX_SKIPS: usize = 16;

/// A slot's counter before its first pick. (A shared slot's counter
/// reaches it after 2^64 steps and starts again: harmless.)
const UNSTARTED: usize = usize::MAX;

/// Rotation over eligible instances.
#[derive(Debug, Default)]
pub struct RoundRobin {
    rotation: Rotation,
}

/// A rotation per thread over a member list: the module doc's *Threads*
/// (`weighted` rotates with one when all weights are equal).
#[derive(Debug)]
pub(crate) struct Rotation {
    /// Each thread slot's rotation: for a slot of its own, the next
    /// position; for the shared slot, a counter taken `mod n`.
    next: PerThread<AtomicUsize>,
    /// Slots started so far: the next one starts there.
    started: AtomicUsize,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            next: PerThread::new(|_| AtomicUsize::new(UNSTARTED)),
            started: AtomicUsize::new(0),
        }
    }
}

impl Rotation {
    /// One pick along the calling thread's rotation (module doc's rule):
    /// at most `max_steps` positions, then [`FactorDraw`]'s fallback.
    /// `round_robin`'s pick, and `weighted`'s over equal weights.
    #[inline]
    pub(crate) fn pick(&self, cx: &mut PickContext<'_>, max_steps: usize) -> Option<Picked> {
        let n = cx.members.len();
        if n == 0 {
            return None;
        }
        let mut draw = FactorDraw::default();
        for i in self.steps(n).take(max_steps) {
            if let Some(c) = cx.members.candidate(i) {
                let member = || c.member().map(|m| &**m);
                if let Some(m) = draw.offer(cx, c.hot, member, || Picked::At(i)) {
                    // The line number is read: the pick need not read it
                    // again.
                    cx.keep_line(&c);
                    return Some(m);
                }
            }
        }
        draw.finish(cx)
    }

    /// The calling thread's rotation over `n > 0` members, from its next
    /// position on; the positions taken are kept when it is dropped.
    #[inline]
    fn steps(&self, n: usize) -> Steps<'_> {
        let (counter, owned) = self.next.local_owned();
        let mut at = counter.load(Ordering::Relaxed);
        if at == UNSTARTED {
            at = self.start();
            if !owned {
                // Another sharer may start it first: then this start is
                // unused.
                let _ =
                    counter.compare_exchange(UNSTARTED, at, Ordering::Relaxed, Ordering::Relaxed);
            }
        }
        if owned && at >= n {
            at %= n; // a new slot, or fewer members than before
        }
        Steps {
            counter,
            owned,
            at,
            n,
        }
    }

    /// Where a slot's first pick starts: once per slot, not per pick.
    #[cold]
    fn start(&self) -> usize {
        self.started.fetch_add(1, Ordering::Relaxed)
    }
}

/// One pick's steps along a thread's [`Rotation`]: an endless iterator of
/// positions.
pub(crate) struct Steps<'r> {
    counter: &'r AtomicUsize,
    /// A slot of the thread's own: `at` is the next position, stored back
    /// on drop. Else the shared slot's counter moves with every step.
    owned: bool,
    at: usize,
    n: usize,
}

impl Iterator for Steps<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.owned {
            // Only this thread writes its slot: no division per step, one
            // store when the pick is done.
            let i = self.at;
            self.at = if i + 1 == self.n { 0 } else { i + 1 };
            Some(i)
        } else {
            Some(self.counter.fetch_add(1, Ordering::Relaxed) % self.n)
        }
    }
}

impl Drop for Steps<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.owned {
            self.counter.store(self.at, Ordering::Relaxed);
        }
    }
}

impl Strategy for RoundRobin {
    fn kind(&self) -> StrategyKind {
        StrategyKind::RoundRobin
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Picked> {
        self.rotation.pick(cx, MAX_SKIPS)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    use crate::per_thread::{thread_slot, SLOTS};
    use crate::{LoadBalancerConfig, Registry, Service, ServiceInstance, StrategyKind};

    /// `round_robin`, and `weighted` over equal weights: the same rotation.
    const ROTATING: [StrategyKind; 2] = [StrategyKind::RoundRobin, StrategyKind::Weighted];

    /// A service of `n` instances of equal weight picking with `kind`.
    fn service(kind: StrategyKind, n: usize) -> (Registry, Arc<Service>) {
        let registry = Registry::builder().seed(1).build().unwrap();
        let config = LoadBalancerConfig {
            strategy: kind,
            ..LoadBalancerConfig::default()
        };
        registry.configure_service("svc", config).unwrap();
        let instances: Vec<_> = (0..n)
            .map(|i| ServiceInstance::try_new(&format!("i{i}"), "10.0.0.1", 80).unwrap())
            .collect();
        registry.register_instances("svc", instances).unwrap();
        let svc = registry.service("svc").unwrap();
        (registry, svc)
    }

    /// Selects and releases once; the position in the member list picked.
    fn pick(svc: &Service) -> usize {
        let s = svc.select(None).expect("an eligible instance");
        let id = s.instance().id();
        svc.members()
            .iter()
            .position(|m| m.instance().id() == id)
            .unwrap()
    }

    /// `seq` is one run of consecutive positions `mod n`.
    fn assert_rotation(seq: &[usize], n: usize, who: &str) {
        for (k, &p) in seq.iter().enumerate() {
            let recent = &seq[k.saturating_sub(2 * n)..=k];
            assert_eq!(p, (seq[0] + k) % n, "{who}: pick {k}, ending {recent:?}");
        }
    }

    /// The module doc's bound over `slots` slots: every count within
    /// `slots · (n − 1) / n` of the exact share, any two within `slots`.
    fn assert_within_bound(counts: &[u64], slots: u64, when: &str) {
        let n = counts.len() as u64;
        let total: u64 = counts.iter().sum();
        for &c in counts {
            // |c − total/n| ≤ slots·(n − 1)/n, times n.
            assert!(
                (c * n).abs_diff(total) <= slots * (n - 1),
                "{when}: {counts:?} over {slots} slots"
            );
        }
        let (min, max) = (counts.iter().min(), counts.iter().max());
        assert!(max.unwrap() - min.unwrap() <= slots, "{when}: {counts:?}");
    }

    /// Each thread's picks, `(its slot, its sequence)`, are one rotation;
    /// threads on the shared slot (all 16 held by other tests' threads)
    /// rotate only together, so theirs are not checked alone.
    fn assert_each_rotates(threads: &[(usize, &Vec<usize>)], n: usize, kind: StrategyKind) {
        for (k, (slot, seq)) in threads.iter().enumerate() {
            if *slot != SLOTS {
                assert_rotation(seq, n, &format!("{kind}, thread {k}"));
            }
        }
    }

    /// The number of slots `a` and `b` use: a thread of its own each, or
    /// one if both are on the shared slot (which rotates as one).
    fn slots_in_use(a: usize, b: usize) -> u64 {
        if a == b {
            1
        } else {
            2
        }
    }

    /// Two threads taking turns, one pick each: with one service-wide
    /// counter each would see every other position (n = 4: 0, 2, 0, 2 …);
    /// per thread each rotates exactly, and after every pick the totals
    /// are within the bound.
    #[test]
    fn two_threads_taking_turns_each_rotate_exactly() {
        for kind in ROTATING {
            let n = 4;
            let (_registry, svc) = service(kind, n);
            let turn = Barrier::new(2);
            let counts: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            let run = |first: bool| {
                let slot = thread_slot();
                let mut seq = Vec::new();
                // Each round: the first thread picks, then the second.
                for _ in 0..200 {
                    if !first {
                        turn.wait();
                    }
                    let p = pick(&svc);
                    counts[p].fetch_add(1, Ordering::Relaxed);
                    seq.push(p);
                    if first {
                        turn.wait();
                    }
                    turn.wait();
                }
                (slot, seq)
            };
            let counts_now = || -> Vec<u64> {
                counts
                    .iter()
                    .map(|c| c.load(Ordering::Relaxed) as u64)
                    .collect()
            };
            let ((slot_a, a), (slot_b, b)) = std::thread::scope(|s| {
                let a = s.spawn(|| run(true));
                let b = s.spawn(|| run(false));
                (a.join().unwrap(), b.join().unwrap())
            });
            assert_each_rotates(&[(slot_a, &a), (slot_b, &b)], n, kind);
            // Replay the turns: the totals after every pick.
            let mut replay = vec![0u64; n];
            for (k, (&pa, &pb)) in a.iter().zip(&b).enumerate() {
                replay[pa] += 1;
                assert_within_bound(
                    &replay,
                    slots_in_use(slot_a, slot_b),
                    &format!("{kind}, turn {k}"),
                );
                replay[pb] += 1;
                assert_within_bound(
                    &replay,
                    slots_in_use(slot_a, slot_b),
                    &format!("{kind}, turn {k}"),
                );
            }
            assert_eq!(replay, counts_now(), "{kind}");
        }
    }

    /// Two threads picking at once, free-running: each thread's sequence
    /// is an exact rotation and the totals end within the bound.
    #[test]
    fn two_threads_picking_at_once_each_rotate_exactly() {
        for kind in ROTATING {
            let n = 7;
            let (_registry, svc) = service(kind, n);
            let start = Barrier::new(2);
            let run = || {
                let slot = thread_slot();
                start.wait();
                let seq: Vec<usize> = (0..20_000).map(|_| pick(&svc)).collect();
                (slot, seq)
            };
            let ((slot_a, a), (slot_b, b)) = std::thread::scope(|s| {
                let a = s.spawn(run);
                let b = s.spawn(run);
                (a.join().unwrap(), b.join().unwrap())
            });
            assert_each_rotates(&[(slot_a, &a), (slot_b, &b)], n, kind);
            let mut counts = vec![0u64; n];
            for &p in a.iter().chain(&b) {
                counts[p] += 1;
            }
            assert_within_bound(&counts, slots_in_use(slot_a, slot_b), &kind.to_string());
        }
    }

    /// The first slot to pick from a service starts at its first
    /// instance, the next at the second: two threads that pick once each
    /// from a service of 3 pick different instances (if every slot started
    /// at 0, both would pick the first).
    #[test]
    fn fresh_threads_start_on_different_instances() {
        for kind in ROTATING {
            let (_registry, svc) = service(kind, 3);
            // The first picks, then the second; both live until both picked
            // (an exited thread's slot goes to the next thread).
            let turn = Barrier::new(2);
            let picked = std::thread::scope(|s| {
                let first = s.spawn(|| {
                    let p = pick(&svc);
                    turn.wait();
                    turn.wait();
                    p
                });
                let second = s.spawn(|| {
                    turn.wait();
                    let p = pick(&svc);
                    turn.wait();
                    p
                });
                (first.join().unwrap(), second.join().unwrap())
            });
            assert_eq!(picked, (0, 1), "{kind}");
        }
    }

    /// More threads than slots of their own, picking at once: those with a
    /// slot of their own rotate exactly, and the totals end within the
    /// bound over the slots in use (the shared one counts once).
    #[test]
    fn more_threads_than_slots_stay_within_the_bound() {
        for kind in ROTATING {
            let n = 7;
            let threads = SLOTS + 8;
            let (_registry, svc) = service(kind, n);
            let start = Barrier::new(threads);
            let runs: Vec<(usize, Vec<usize>)> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        s.spawn(|| {
                            let slot = thread_slot();
                            start.wait();
                            (slot, (0..1_000).map(|_| pick(&svc)).collect())
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut counts = vec![0u64; n];
            for (slot, seq) in &runs {
                if *slot != SLOTS {
                    assert_rotation(seq, n, &format!("{kind}, slot {slot}"));
                }
                for &p in seq {
                    counts[p] += 1;
                }
            }
            let slots: HashSet<usize> = runs.iter().map(|(slot, _)| *slot).collect();
            assert_within_bound(&counts, slots.len() as u64, &kind.to_string());
        }
    }
}
