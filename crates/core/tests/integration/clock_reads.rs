//! Clock reads per select + release, strategy by strategy (issue 12: no
//! clock read on a pick that does not need one).
//!
//! In the steady state — every breaker closed, no instance ramping, tables
//! built for the current members, no `adaptive` evaluation due — a select
//! and its release (the guard dropped) read the clock **0** times, whatever
//! the strategy, and a select with a recorded outcome **once**: the
//! record's (health recovery, the breaker's window and the latency EWMA
//! are all time-based). A change that adds a read fails here.

use std::time::Duration;

use datapunk_lb_core::{Registry, Selection, StrategyKind};

use crate::support::*;

/// The time between two requests: 210 of them stay under `adaptive`'s
/// 1 s evaluation interval.
const STEP: Duration = Duration::from_millis(1);

/// Selects from `SVC`, with a key for `consistent_hash`.
fn select(reg: &Registry, kind: StrategyKind, i: u64) -> Selection {
    let s = if kind == StrategyKind::ConsistentHash {
        reg.get_instance_with_key(SVC, &i.to_le_bytes())
    } else {
        reg.get_instance(SVC)
    };
    s.expect("an eligible instance")
}

#[test]
fn a_select_and_release_reads_no_clock_and_a_recorded_outcome_one() {
    for kind in StrategyKind::ALL {
        let (reg, clock) = counting_registry(kind);
        // One batch into an empty service: nothing ramps.
        populate(&reg, &[1, 2, 3, 4]);
        // What a first pick does once (`adaptive`'s first evaluation).
        for i in 0..10 {
            let _ = select(&reg, kind, i).success(Duration::from_millis(2));
            clock.advance(STEP);
        }

        let before = clock.reads();
        for i in 0..100 {
            drop(select(&reg, kind, i));
            clock.advance(STEP);
        }
        assert_eq!(clock.reads() - before, 0, "{kind}: select + drop");

        let before = clock.reads();
        for i in 0..100 {
            let _ = select(&reg, kind, i).success(Duration::from_millis(2));
            clock.advance(STEP);
        }
        assert_eq!(
            clock.reads() - before,
            100,
            "{kind}: select + success, the record's one read each"
        );
    }
}

fn mode(reg: &Registry) -> StrategyKind {
    reg.service(SVC).unwrap().status().adaptive.unwrap().mode
}

#[test]
fn adaptive_reads_the_clock_once_per_evaluation_when_a_reading_shows_it_due() {
    let (reg, clock) = counting_registry(StrategyKind::Adaptive);
    populate(&reg, &[1, 1, 1, 1]);
    drop(reg.get_instance(SVC).unwrap()); // the first evaluation: calm
                                          // 5 requests in flight per instance: `p2c` at the next evaluation.
    let held: Vec<_> = (0..20).map(|_| reg.get_instance(SVC).unwrap()).collect();
    clock.advance(Duration::from_millis(1100));

    // Due, but nothing has read the clock since: no pick reads it to see.
    let before = clock.reads();
    for _ in 0..50 {
        drop(reg.get_instance(SVC).unwrap());
    }
    assert_eq!(clock.reads(), before, "no pick reads the clock");
    assert_eq!(mode(&reg), StrategyKind::Weighted, "not evaluated yet");

    // The server's upkeep reads it (one read); the next pick evaluates
    // (one read), the ones after it read none until the next is due.
    reg.maintain();
    drop(reg.get_instance(SVC).unwrap());
    assert_eq!(mode(&reg), StrategyKind::P2c);
    for _ in 0..50 {
        drop(reg.get_instance(SVC).unwrap());
    }
    assert_eq!(clock.reads(), before + 2, "maintain and the evaluation");

    // A recorded outcome is a reading too: its one read shows the next
    // evaluation due, and the pick after it evaluates.
    drop(held);
    clock.advance(Duration::from_millis(1100));
    let s = reg.get_instance(SVC).unwrap();
    let before = clock.reads();
    let _ = s.success(Duration::from_millis(2));
    drop(reg.get_instance(SVC).unwrap());
    for _ in 0..50 {
        drop(reg.get_instance(SVC).unwrap());
    }
    assert_eq!(clock.reads(), before + 2, "the record and the evaluation");
    let status = reg.service(SVC).unwrap().status().adaptive.unwrap();
    assert_eq!(status.signals.concurrency, 0.0, "evaluated: {status:?}");
    assert_eq!(status.mode, StrategyKind::P2c, "the dwell holds it");
}

/// `n` sequential requests a millisecond apart, `i0` answering in 50 ms
/// and the others in 1 ms; how many went to `i0`.
fn slow_i0_traffic(reg: &Registry, clock: &CountingClock, n: usize) -> usize {
    let mut to_i0 = 0;
    for _ in 0..n {
        let s = reg.get_instance(SVC).unwrap();
        let slow = s.instance().id().as_str() == "i0";
        to_i0 += usize::from(slow);
        let _ = s.success(Duration::from_millis(if slow { 50 } else { 1 }));
        clock.advance(STEP);
    }
    to_i0
}

#[test]
fn peak_ewma_probes_an_avoided_instance_once_a_second_without_reading_the_clock() {
    let (reg, clock) = counting_registry(StrategyKind::PeakEwma);
    populate(&reg, &[1, 1, 1]);
    // Each answers once (one that never answered is not avoided), then
    // the estimates settle: i0 is avoided.
    let svc = reg.service(SVC).unwrap();
    for (id, ms) in [("i0", 50), ("i1", 1), ("i2", 1)] {
        let s = svc.select_with(None, |m| m.instance().id().as_str() == id);
        let _ = s.unwrap().success(Duration::from_millis(ms));
    }
    slow_i0_traffic(&reg, &clock, 3000);
    // Two picks in three meet i0 in their pair, avoid it and ask whether
    // it is due its probe: of the service's latest reading, which each
    // request's record moved, not of the clock.
    let before = clock.reads();
    let to_i0 = slow_i0_traffic(&reg, &clock, 5000);
    assert_eq!(clock.reads() - before, 5000, "the records' reads only");
    assert!(
        (4..=6).contains(&to_i0),
        "one probe a second: {to_i0} in 5 s"
    );
}
