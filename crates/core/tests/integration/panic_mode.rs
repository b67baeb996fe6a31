//! Panic mode: entered below min_healthy_percent, left above it.

use std::collections::HashSet;
use std::time::Duration;

use datapunk_lb_core::{Event, Outcome, StrategyKind};

use crate::support::*;

fn panic_events(events: &[Event]) -> Vec<bool> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Panic { entered, .. } => Some(*entered),
            _ => None,
        })
        .collect()
}

#[test]
fn panic_spans_all_instances_and_ends_on_recovery() {
    let (reg, clock) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[1, 1, 1, 1]);
    trip(&reg, &clock, "i0");
    trip(&reg, &clock, "i1");
    // 2 of 4 eligible = 50 %: not below the threshold.
    assert!(!reg.service(SVC).unwrap().status().panic);
    let seen: HashSet<String> = (0..40).map(|_| pick(&reg)).collect();
    assert_eq!(seen, HashSet::from(["i2".into(), "i3".into()]));

    // A third trip: 1 of 4 < 50 % → panic, reported by the outcome that caused it.
    let mut events = Vec::new();
    for _ in 0..3 {
        events.extend(
            reg.report_outcome(
                SVC,
                "i2",
                Outcome::Failure(datapunk_lb_core::FailureKind::Connect),
            )
            .unwrap(),
        );
        clock.advance(Duration::from_millis(1));
    }
    assert_eq!(panic_events(&events), [true]);
    let st = reg.service(SVC).unwrap().status();
    assert!(st.panic && st.eligible == 1, "{st:?}");
    let seen: HashSet<String> = (0..40).map(|_| pick(&reg)).collect();
    assert_eq!(
        seen.len(),
        4,
        "panic mode selects across all instances: {seen:?}"
    );

    // i0 recovers: window elapsed, two successes close it → 2 of 4 → panic ends.
    clock.advance(Duration::from_secs(5));
    let mut events = Vec::new();
    for _ in 0..2 {
        events.extend(
            reg.report_outcome(SVC, "i0", Outcome::Success(Duration::from_millis(1)))
                .unwrap(),
        );
    }
    assert_eq!(panic_events(&events), [false], "{events:?}");
    assert!(!reg.service(SVC).unwrap().status().panic);
    // Out of panic, the still-open (and not yet probed) instances are avoided
    // except for single probes once their window elapsed; i0 and i3 carry the rest.
    let held: Vec<_> = (0..40).map(|_| reg.get_instance(SVC).unwrap()).collect();
    let seen: Vec<String> = held.iter().map(|s| s.instance().id().to_string()).collect();
    let others = seen.iter().filter(|id| *id != "i0" && *id != "i3").count();
    assert!(
        others <= 2,
        "only probes may reach the open instances: {seen:?}"
    );
}

#[test]
fn drained_instances_are_not_counted_and_not_selected_in_panic() {
    let (reg, clock) = registry(StrategyKind::Random);
    populate(&reg, &[1, 1, 1]);
    reg.drain_instance(SVC, "i2", Duration::from_secs(30))
        .unwrap();
    trip(&reg, &clock, "i0");
    // 1 of 2 counted = 50 %: no panic; i2 never chosen.
    let seen: HashSet<String> = (0..50).map(|_| pick(&reg)).collect();
    assert_eq!(seen, HashSet::from(["i1".into()]));
    trip(&reg, &clock, "i1");
    let seen: HashSet<String> = (0..50).map(|_| pick(&reg)).collect();
    assert_eq!(
        seen,
        HashSet::from(["i0".into(), "i1".into()]),
        "panic ignores breakers but not drains"
    );
}

#[test]
fn drain_then_maintain_removes_when_idle_or_on_timeout() {
    let (reg, clock) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[1, 1, 1]);
    let held: Vec<_> = (0..3).map(|_| reg.get_instance(SVC).unwrap()).collect();
    reg.drain_instance(SVC, "i0", Duration::from_secs(30))
        .unwrap();
    reg.drain_instance(SVC, "i1", Duration::from_secs(2))
        .unwrap();
    assert!(
        reg.maintain().is_empty(),
        "connections still open, no timeout yet"
    );
    for _ in 0..20 {
        assert_eq!(pick(&reg), "i2");
    }
    let (i0, rest): (Vec<_>, Vec<_>) = held
        .into_iter()
        .partition(|s| s.instance().id().as_str() == "i0");
    drop(i0);
    let ev = reg.maintain();
    assert!(
        matches!(
            &ev[..],
            [Event::Removed {
                reason: "drained",
                ..
            }]
        ),
        "{ev:?}"
    );
    clock.advance(Duration::from_secs(2));
    let ev = reg.maintain();
    assert!(
        matches!(
            &ev[..],
            [Event::Removed {
                reason: "drain timeout",
                ..
            }]
        ),
        "{ev:?}"
    );
    assert_eq!(reg.instances(SVC).unwrap().len(), 1);
    drop(rest); // in-flight selections on removed instances finish normally
}

/// Found by the `core_ops` fuzz target: register one instance, eject it
/// (panic: 0 of 1 eligible), deregister it. The empty service kept
/// reporting panic forever, since a pick on no members returned before
/// re-checking.
#[test]
fn fuzz_core_ops_panic_ends_when_the_last_instance_is_deregistered() {
    let (reg, _clock) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[1]);
    reg.update_instance_health(SVC, "i0", 0.0).unwrap();
    assert!(reg.service(SVC).unwrap().status().panic);
    reg.deregister_instance(SVC, "i0").unwrap();
    assert!(reg.get_instance(SVC).is_none());
    assert!(
        !reg.service(SVC).unwrap().status().panic,
        "0 of 0 is no panic"
    );
}

/// Panic mode keeps to the candidates (breaker not open, or open with its
/// latest active check passing) while they are at least
/// `min_healthy_percent` of the instances: the instance failing now gets
/// nothing. The soak's 500 burst came from an even panic spread.
#[test]
fn panic_prefers_open_instances_whose_checks_pass() {
    let (reg, clock) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[1, 1, 1, 1]);
    for id in ["i1", "i2", "i3"] {
        trip(&reg, &clock, id);
    }
    let check = |id: &str, ok: bool| {
        let o = if ok {
            Outcome::Success(Duration::from_millis(1))
        } else {
            Outcome::Failure(datapunk_lb_core::FailureKind::HealthCheck)
        };
        reg.report_outcome(SVC, id, o).unwrap();
    };
    // One passing check each: still open (recovery_threshold is 2).
    check("i1", true);
    check("i2", true);
    check("i3", false);
    assert!(reg.service(SVC).unwrap().status().panic, "1 of 4 eligible");
    let counts = count_picks(&reg, 400);
    assert_eq!(counts.get("i3"), None, "the failing instance: {counts:?}");
    for id in ["i0", "i1", "i2"] {
        assert!(
            counts.get(id).copied().unwrap_or(0) > 100,
            "{id}: {counts:?}"
        );
    }
    // A failed check takes i2 out of the candidates: 2 of 4 is still
    // min_healthy_percent (50 %).
    check("i2", false);
    let counts = count_picks(&reg, 400);
    assert_eq!(counts.len(), 2, "i0 and i1 only: {counts:?}");
    // i1 too: 1 candidate of 4 is too few to carry the load alone, so
    // panic spreads over every instance again.
    check("i1", false);
    let counts = count_picks(&reg, 400);
    assert_eq!(counts.len(), 4, "every instance: {counts:?}");
}
