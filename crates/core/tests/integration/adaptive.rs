//! The adaptive strategy: switches with the load, does not flap.

use std::time::Duration;

use datapunk_lb_core::clock::Timestamp;
use datapunk_lb_core::{
    AdaptiveConfig, Clock, Event, LoadBalancerConfig, ManualClock, Registry, StrategyKind,
};

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
    // Nothing completes, so nothing reads the clock but the server's
    // upkeep: the evaluation is due once `maintain` saw the time.
    reg.maintain();
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

fn adaptive_with(a: AdaptiveConfig) -> LoadBalancerConfig {
    LoadBalancerConfig {
        strategy: StrategyKind::Adaptive,
        adaptive: a,
        ..LoadBalancerConfig::default()
    }
}

/// Calm for 60 s (every estimate starts at 30 ms and needs a few decay
/// constants to settle at 10 ms), then `seconds` of traffic where i0 answers
/// in `slow` (the others in 10 ms, so the spread is `slow / 10 ms`); returns
/// the switches.
fn spread_for(reg: &Registry, clock: &ManualClock, slow: Duration, seconds: usize) -> Vec<Event> {
    for _ in 0..60 {
        second_of_traffic(reg, clock, Duration::from_millis(10));
    }
    let mut switches = Vec::new();
    for _ in 0..seconds {
        switches.extend(second_of_traffic(reg, clock, slow));
    }
    switches
}

#[test]
fn the_spread_threshold_is_the_configured_one() {
    // Defaults (2.0× on): a 2.5× spread turns peak_ewma on.
    let (reg, clock) = registry(StrategyKind::Adaptive);
    populate(&reg, &[1, 1, 1, 1]);
    let switches = spread_for(&reg, &clock, Duration::from_millis(25), 8);
    assert_eq!(
        mode(&reg),
        StrategyKind::PeakEwma,
        "{switches:?} {:?}",
        reg.service(SVC).unwrap().status().adaptive
    );

    // spread_enter 3.0: 2.5× is not enough …
    let raised = AdaptiveConfig {
        spread_enter: 3.0,
        spread_leave: 2.0,
        ..AdaptiveConfig::default()
    };
    let (reg, clock) = registry_with(adaptive_with(raised));
    populate(&reg, &[1, 1, 1, 1]);
    let switches = spread_for(&reg, &clock, Duration::from_millis(25), 8);
    assert_eq!(mode(&reg), StrategyKind::Weighted);
    assert!(switches.is_empty(), "{switches:?}");
    let status = reg.service(SVC).unwrap().status().adaptive.unwrap();
    assert!(
        (2.4..3.0).contains(&status.signals.latency_spread),
        "{status:?}"
    );

    // … 3.5× is, and the reason quotes the configured thresholds.
    let (reg, clock) = registry_with(adaptive_with(raised));
    populate(&reg, &[1, 1, 1, 1]);
    let switches = spread_for(&reg, &clock, Duration::from_millis(35), 8);
    assert_eq!(mode(&reg), StrategyKind::PeakEwma);
    match &switches[..] {
        [Event::StrategySwitch { reason, .. }] => {
            assert!(reason.contains("on at 3x, off below 2x"), "{reason}");
        }
        other => panic!("expected one switch, got {other:?}"),
    }
}

/// Holds `n` selections (requests in flight) for one evaluation, then lets
/// them go; returns when p2c took over.
fn burst(reg: &Registry, clock: &ManualClock, n: usize) -> Timestamp {
    let held: Vec<_> = (0..n).map(|_| reg.get_instance(SVC).unwrap()).collect();
    clock.advance(Duration::from_millis(1100));
    reg.maintain(); // the only clock read while nothing completes
    let _ = reg.get_instance(SVC).unwrap();
    assert_eq!(mode(reg), StrategyKind::P2c, "20 in flight on 4 instances");
    drop(held);
    clock.now()
}

/// After a burst, how long (in 100 ms steps, up to 20 s) the mode stays
/// `p2c` with nothing in flight; `maintain` every step, as the server.
fn p2c_held_for(reg: &Registry, clock: &ManualClock) -> Duration {
    let start = burst(reg, clock, 20);
    while clock.now().saturating_since(start) < Duration::from_secs(20) {
        clock.advance(Duration::from_millis(100));
        reg.maintain();
        let _ = reg.get_instance(SVC).unwrap();
        if mode(reg) != StrategyKind::P2c {
            break;
        }
    }
    clock.now().saturating_since(start)
}

#[test]
fn the_dwell_is_the_configured_one() {
    let (reg, clock) = registry(StrategyKind::Adaptive);
    populate(&reg, &[1, 1, 1, 1]);
    let held = p2c_held_for(&reg, &clock);
    assert!(
        held >= Duration::from_secs(5) && held <= Duration::from_secs(6),
        "default dwell 5 s, held {held:?}"
    );

    let (reg, clock) = registry_with(adaptive_with(AdaptiveConfig {
        min_dwell: Duration::from_secs(10),
        ..AdaptiveConfig::default()
    }));
    populate(&reg, &[1, 1, 1, 1]);
    let held = p2c_held_for(&reg, &clock);
    assert!(
        held >= Duration::from_secs(10) && held <= Duration::from_secs(11),
        "dwell 10 s, held {held:?}"
    );
}

#[test]
fn a_reload_applies_new_thresholds_and_an_unchanged_one_keeps_the_state() {
    let raised = adaptive_with(AdaptiveConfig {
        spread_enter: 3.0,
        spread_leave: 2.0,
        ..AdaptiveConfig::default()
    });
    let (reg, clock) = registry_with(raised.clone());
    populate(&reg, &[1, 1, 1, 1]);
    spread_for(&reg, &clock, Duration::from_millis(25), 8);
    assert_eq!(mode(&reg), StrategyKind::Weighted, "2.5× under 3.0×");

    // New thresholds on the running service: 2.5× is now over 2.0×.
    reg.configure_service(SVC, adaptive_with(AdaptiveConfig::default()))
        .unwrap();
    let mut switches = Vec::new();
    for _ in 0..3 {
        switches.extend(second_of_traffic(&reg, &clock, Duration::from_millis(25)));
    }
    assert_eq!(mode(&reg), StrategyKind::PeakEwma);
    assert_eq!(switches.len(), 1, "{switches:?}");

    // The same config again, and `set_strategy` to the same strategy: the
    // mode is kept (a fresh adaptive would start in weighted).
    reg.configure_service(SVC, adaptive_with(AdaptiveConfig::default()))
        .unwrap();
    reg.set_strategy(SVC, StrategyKind::Adaptive).unwrap();
    assert_eq!(mode(&reg), StrategyKind::PeakEwma);
    let switches = second_of_traffic(&reg, &clock, Duration::from_millis(25));
    assert!(switches.is_empty(), "{switches:?}");
    assert_eq!(mode(&reg), StrategyKind::PeakEwma);

    // A bad set is refused and changes nothing.
    let bad = adaptive_with(AdaptiveConfig {
        spread_leave: 2.5,
        ..AdaptiveConfig::default()
    });
    let err = reg.configure_service(SVC, bad).unwrap_err();
    assert!(err.to_string().contains("spread_leave"), "{err}");
    assert_eq!(
        reg.service(SVC).unwrap().config().adaptive,
        AdaptiveConfig::default()
    );
}
