//! The adaptive strategy: switches with the load, does not flap.

use std::time::Duration;

use datapunk_lb_core::{Event, ManualClock, Registry, StrategyKind};

use crate::support::*;

fn mode(reg: &Registry) -> StrategyKind {
    reg.service(SVC).unwrap().status().adaptive.unwrap().mode
}

/// One second of sequential traffic where instance i0 answers in `slow` and
/// the rest in 10 ms; returns the switch events seen.
fn second_of_traffic(reg: &Registry, clock: &ManualClock, slow: Duration) -> Vec<Event> {
    let mut events = Vec::new();
    for _ in 0..100 {
        let mut s = reg.get_instance(SVC).unwrap();
        events.extend(s.take_events());
        let l = if s.instance().id().as_str() == "i0" {
            slow
        } else {
            Duration::from_millis(10)
        };
        s.success(l);
        clock.advance(Duration::from_millis(10));
    }
    events
        .into_iter()
        .filter(|e| matches!(e, Event::StrategySwitch { .. }))
        .collect()
}

#[test]
fn switches_when_the_load_pattern_changes() {
    let (reg, clock) = registry(StrategyKind::Adaptive);
    populate(&reg, &[1, 1, 1, 1]);
    for _ in 0..3 {
        second_of_traffic(&reg, &clock, Duration::from_millis(10));
    }
    assert_eq!(mode(&reg), StrategyKind::Weighted, "calm load: weighted");

    // Phase 2: i0 turns 10× slower → latency spread → peak_ewma.
    let mut switches = Vec::new();
    for _ in 0..8 {
        switches.extend(second_of_traffic(&reg, &clock, Duration::from_millis(100)));
    }
    assert_eq!(mode(&reg), StrategyKind::PeakEwma);
    match &switches[..] {
        [Event::StrategySwitch {
            from, to, reason, ..
        }] => {
            assert_eq!(
                (*from, *to),
                (StrategyKind::Weighted, StrategyKind::PeakEwma)
            );
            assert!(reason.contains("latency spread"), "{reason}");
        }
        other => panic!("expected one switch, got {other:?}"),
    }
    let status = reg.service(SVC).unwrap().status().adaptive.unwrap();
    assert!(status.signals.latency_spread >= 2.0, "{status:?}");

    // Phase 3: i0 recovers; after the spread falls below 1.5× (the EWMA must
    // forget the peak) it returns to weighted.
    for _ in 0..60 {
        second_of_traffic(&reg, &clock, Duration::from_millis(10));
    }
    assert_eq!(mode(&reg), StrategyKind::Weighted);

    // Phase 4: many requests in flight per instance → p2c.
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(reg.get_instance(SVC).unwrap());
    }
    clock.advance(Duration::from_secs(6));
    let _ = reg.get_instance(SVC).unwrap();
    assert_eq!(
        mode(&reg),
        StrategyKind::P2c,
        "{:?}",
        reg.service(SVC).unwrap().status().adaptive
    );
}

#[test]
fn does_not_flap_under_noise_around_the_threshold() {
    let (reg, clock) = registry(StrategyKind::Adaptive);
    populate(&reg, &[1, 1, 1, 1]);
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..20 {
        second_of_traffic(&reg, &clock, Duration::from_millis(10));
    }
    // Enter peak_ewma once.
    let mut switches = Vec::new();
    for _ in 0..8 {
        switches.extend(second_of_traffic(&reg, &clock, Duration::from_millis(30)));
    }
    assert_eq!(mode(&reg), StrategyKind::PeakEwma);
    assert_eq!(switches.len(), 1);
    // Now the slow instance wanders between 16 and 24 ms (spread ≈ 1.6×–2.4×,
    // around the 2.0× entry threshold but above the 1.5× exit): no switch.
    let mut switches = Vec::new();
    for _ in 0..60 {
        let slow = Duration::from_millis(rng.u64(16..=24));
        switches.extend(second_of_traffic(&reg, &clock, slow));
    }
    assert!(switches.is_empty(), "flapped: {switches:?}");
}
