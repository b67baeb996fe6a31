//! Health scores through real selections.

use std::time::Duration;

use datapunk_lb_core::{FailureKind, StrategyKind};

use crate::support::*;

#[test]
fn outcomes_move_the_score_and_effective_weight() {
    let (reg, clock) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[4]);
    let s = reg.get_instance(SVC).unwrap();
    s.failure(FailureKind::ServerError);
    let st = reg.instance(SVC, "i0").unwrap();
    assert_eq!(st.health_score, 0.5);
    assert_eq!(
        st.effective_weight, 2.0,
        "effective weight = weight × health × slow start"
    );
    assert_eq!(st.failures, 1);
    clock.advance(Duration::from_secs(1));
    reg.get_instance(SVC)
        .unwrap()
        .success(Duration::from_millis(5));
    let st = reg.instance(SVC, "i0").unwrap();
    assert!((st.health_score - 0.6).abs() < 1e-9, "{}", st.health_score);
    // From the 30 ms default toward 5 ms with weight exp(-1 s / 1 s), in
    // the log domain (the rule of `ewma`).
    let w = (-1.0f64).exp();
    let expect = (30.0f64.ln() * w + 5.0f64.ln() * (1.0 - w)).exp();
    let got = st.latency_ewma.as_secs_f64() * 1e3;
    assert!(
        (got - expect).abs() < 0.01,
        "ewma {got} ms, want {expect} ms"
    );
}

#[test]
fn a_burst_through_selections_costs_less_than_spaced_failures() {
    let (burst, bclock) = registry(StrategyKind::RoundRobin);
    populate(&burst, &[1]);
    for _ in 0..50 {
        burst
            .get_instance(SVC)
            .unwrap()
            .failure(FailureKind::Connect);
        bclock.advance(Duration::from_millis(20));
    }
    let (spaced, sclock) = registry(StrategyKind::RoundRobin);
    populate(&spaced, &[1]);
    for _ in 0..3 {
        spaced
            .report_outcome(
                SVC,
                "i0",
                datapunk_lb_core::Outcome::Failure(FailureKind::Connect),
            )
            .unwrap();
        sclock.advance(Duration::from_secs(10));
    }
    let b = burst.instance(SVC, "i0").unwrap().health_score;
    let s = spaced.instance(SVC, "i0").unwrap().health_score;
    assert!(b >= s, "burst {b} vs spaced {s}");
}
