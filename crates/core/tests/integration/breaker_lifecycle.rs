//! The circuit breaker's life, through the registry and the manual clock.

use std::time::Duration;

use datapunk_lb_core::breaker::{Admission, CircuitBreaker};
use datapunk_lb_core::{
    BreakerConfig, CircuitState, Event, FailureKind, LoadBalancerConfig, Outcome, StrategyKind,
    Timestamp, TransitionReason,
};

use crate::support::*;

fn config() -> LoadBalancerConfig {
    LoadBalancerConfig {
        strategy: StrategyKind::RoundRobin,
        min_healthy_percent: 0, // no panic mode: we want to see the breaker alone
        ..LoadBalancerConfig::default()
    }
}

fn breaker_events(events: &[Event]) -> Vec<(CircuitState, CircuitState, TransitionReason)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Breaker { transition: t, .. } => Some((t.from, t.to, t.reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn consecutive_failures_trip_and_probes_close() {
    let (reg, clock) = registry_with(config());
    populate(&reg, &[1, 1]);
    let mut events = Vec::new();
    for _ in 0..2 {
        events.extend(
            reg.report_outcome(SVC, "i0", Outcome::Failure(FailureKind::Timeout))
                .unwrap(),
        );
    }
    assert!(
        breaker_events(&events).is_empty(),
        "two failures must not trip with threshold 3"
    );
    let events = reg
        .report_outcome(SVC, "i0", Outcome::Failure(FailureKind::Timeout))
        .unwrap();
    assert_eq!(
        breaker_events(&events),
        [(
            CircuitState::Closed,
            CircuitState::Open,
            TransitionReason::ConsecutiveFailures(3)
        )]
    );
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Eligibility {
            eligible: false,
            ..
        }
    )));

    // While open: never selected.
    for _ in 0..20 {
        assert_eq!(pick(&reg), "i1", "an open instance must not be selected");
    }

    // After the window (≤ 5 s): the next pick of i0 is a probe.
    clock.advance(Duration::from_secs(5));
    let probe = loop {
        let s = reg.get_instance(SVC).unwrap();
        if s.instance().id().as_str() == "i0" {
            break s;
        }
    };
    assert!(probe.is_probe());
    assert_eq!(
        breaker_events(probe.events()),
        [(
            CircuitState::Open,
            CircuitState::HalfOpen,
            TransitionReason::OpenWindowElapsed
        )]
    );
    // Half-open admits one probe at a time (default half_open_max_probes = 1).
    for _ in 0..10 {
        assert_eq!(pick(&reg), "i1", "a second probe must wait for the first");
    }
    assert!(breaker_events(&probe.success(Duration::from_millis(1))).is_empty());
    // Second success (recovery_threshold = 2) closes.
    let probe = loop {
        let s = reg.get_instance(SVC).unwrap();
        if s.instance().id().as_str() == "i0" {
            break s;
        }
    };
    let events = probe.success(Duration::from_millis(1));
    assert_eq!(
        breaker_events(&events),
        [(
            CircuitState::HalfOpen,
            CircuitState::Closed,
            TransitionReason::ProbesSucceeded(2)
        )]
    );
    let st = reg.instance(SVC, "i0").unwrap();
    assert_eq!(st.circuit_state, CircuitState::Closed);
    assert_eq!(
        st.slow_start_factor, 0.0,
        "closing the breaker restarts slow start"
    );
}

#[test]
fn failure_rate_trips_only_with_volume() {
    let mut cfg = config();
    cfg.breaker.error_threshold = 100;
    let (reg, clock) = registry_with(cfg);
    populate(&reg, &[1, 1]);
    // Two of three failing: a high rate, but under the minimum volume.
    for outcome in [false, true, true] {
        let o = if outcome {
            Outcome::Failure(FailureKind::ServerError)
        } else {
            Outcome::Success(Duration::from_millis(1))
        };
        assert!(breaker_events(&reg.report_outcome(SVC, "i0", o).unwrap()).is_empty());
    }
    clock.advance(Duration::from_secs(11)); // a new window
    let mut tripped = None;
    for i in 0..20 {
        let o = if i % 2 == 1 {
            Outcome::Failure(FailureKind::ServerError)
        } else {
            Outcome::Success(Duration::from_millis(1))
        };
        let ev = breaker_events(&reg.report_outcome(SVC, "i0", o).unwrap());
        if !ev.is_empty() {
            tripped = Some((i, ev));
            break;
        }
    }
    let (at, ev) = tripped.expect("50 % failures over 20 requests must trip");
    assert_eq!(at, 19, "trips exactly when the window reaches 20 requests");
    assert_eq!(
        ev,
        [(
            CircuitState::Closed,
            CircuitState::Open,
            TransitionReason::FailureRate {
                failures: 10,
                total: 20
            }
        )]
    );
}

#[test]
fn open_window_doubles_to_the_cap_with_bounded_jitter() {
    let (reg, clock) = registry_with(config());
    populate(&reg, &[1]);
    let b = BreakerConfig::default();
    let mut windows = Vec::new();
    // First trip, then every probe fails: the window grows each time.
    let mut ev = Vec::new();
    for _ in 0..3 {
        ev = reg
            .report_outcome(SVC, "i0", Outcome::Failure(FailureKind::Connect))
            .unwrap();
    }
    for trip in 1..=8u32 {
        let open_for = ev
            .iter()
            .find_map(|e| match e {
                Event::Breaker { transition: t, .. } if t.to == CircuitState::Open => t.open_for,
                _ => None,
            })
            .unwrap_or_else(|| panic!("trip {trip} must open: {ev:?}"));
        let nominal = CircuitBreaker::nominal_open_window(trip, &b);
        assert_eq!(nominal, (b.open_base * 2u32.pow(trip - 1)).min(b.open_max));
        let lo = nominal.mul_f64(1.0 - b.open_jitter);
        assert!(
            open_for >= lo && open_for <= nominal,
            "trip {trip}: {open_for:?} not in [{lo:?}, {nominal:?}]"
        );
        windows.push(open_for);
        // Not selectable just before the window ends…
        clock.advance(open_for - Duration::from_millis(1));
        assert!(
            reg.get_instance(SVC).is_none(),
            "trip {trip}: selected while open"
        );
        // …and a probe right after; the probe fails and reopens.
        clock.advance(Duration::from_millis(1));
        let probe = reg.get_instance(SVC).expect("window elapsed: a probe");
        assert!(probe.is_probe());
        ev = probe.failure(FailureKind::Connect);
        assert_eq!(breaker_events(&ev)[0].2, TransitionReason::ProbeFailed);
    }
    assert!(
        windows[5] <= b.open_max && windows[7] <= b.open_max,
        "capped: {windows:?}"
    );
    assert!(windows[4] > windows[0] * 8, "grew: {windows:?}");
}

#[test]
fn half_open_admits_at_most_the_configured_probes() {
    let mut cfg = config();
    cfg.breaker.half_open_max_probes = 2;
    cfg.breaker.recovery_threshold = 3;
    let (reg, clock) = registry_with(cfg);
    populate(&reg, &[1]);
    trip(&reg, &clock, "i0");
    clock.advance(Duration::from_secs(5));
    let p1 = reg.get_instance(SVC).expect("probe 1");
    let p2 = reg.get_instance(SVC).expect("probe 2");
    assert!(p1.is_probe() && p2.is_probe());
    assert!(
        reg.get_instance(SVC).is_none(),
        "a third concurrent probe must be refused"
    );
    drop(p1); // a cancelled probe frees its slot without an outcome
    let p3 = reg.get_instance(SVC).expect("slot freed");
    // One failure among the probes reopens.
    let ev = p3.failure(FailureKind::Reset);
    assert_eq!(
        breaker_events(&ev),
        [(
            CircuitState::HalfOpen,
            CircuitState::Open,
            TransitionReason::ProbeFailed
        )]
    );
    drop(p2);
    assert!(reg.get_instance(SVC).is_none());
}

#[test]
fn breaker_unit_jitter_and_cap() {
    let cfg = LoadBalancerConfig::default();
    let mut b = CircuitBreaker::new();
    let t0 = Timestamp::from_nanos(1_000_000_000);
    let mut now = t0;
    for trip in 1..=10u32 {
        let mut t = None;
        while t.is_none() {
            if b.state() == CircuitState::Open {
                now = b.open_until();
                assert!(matches!(
                    b.try_admit(now, &cfg.breaker),
                    Admission::Probe(_)
                ));
                t = b.on_failure(now, &cfg.breaker, 0.999_999);
                b.release_probe(); // as dropping the probe's Selection does
            } else {
                t = b.on_failure(now, &cfg.breaker, 0.999_999);
            }
        }
        let nominal = CircuitBreaker::nominal_open_window(trip, &cfg.breaker);
        let w = t.unwrap().open_for.unwrap();
        assert!(
            w <= nominal && w >= nominal.mul_f64(0.8),
            "{w:?} vs {nominal:?}"
        );
        assert_eq!(b.trips(), trip);
    }
    // Staying closed for open_max resets the exponent.
    now = b.open_until();
    assert!(matches!(
        b.try_admit(now, &cfg.breaker),
        Admission::Probe(_)
    ));
    b.release_probe();
    b.on_success(now, &cfg.breaker);
    assert!(b.on_success(now, &cfg.breaker).is_some());
    assert_eq!(b.state(), CircuitState::Closed);
    now = now + cfg.breaker.open_max;
    for _ in 0..3 {
        b.on_failure(now, &cfg.breaker, 0.0);
    }
    assert_eq!(
        b.trips(),
        1,
        "a long closed spell resets the open window to the base"
    );
}
