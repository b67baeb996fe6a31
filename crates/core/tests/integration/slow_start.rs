//! Slow start: linear effective weight, and the share it buys.

use std::time::Duration;

use datapunk_lb_core::{CircuitState, StrategyKind};

use crate::support::*;

#[test]
fn a_new_instance_ramps_linearly() {
    let (reg, clock) = registry(StrategyKind::Weighted);
    populate(&reg, &[10, 10]);
    reg.register_instance(SVC, instance("new", 10)).unwrap();
    for pct in [0u64, 25, 50, 100] {
        let st = reg.instance(SVC, "new").unwrap();
        let want = 10.0 * pct as f64 / 100.0;
        assert!(
            (st.effective_weight - want).abs() <= 0.01 * 10.0,
            "at {pct} %: effective weight {} want {want}",
            st.effective_weight
        );
        if pct < 100 {
            let step = if pct == 50 { 50 } else { 25 };
            clock.advance(Duration::from_millis(step * 100)); // of a 10 s window
        }
    }
    // Instances present when the service was first populated do not ramp.
    assert_eq!(reg.instance(SVC, "i0").unwrap().effective_weight, 10.0);
}

/// The share of one instance at factor `f` among three full peers under
/// `weighted` and `round_robin`: in proportion to effective weight.
fn proportional(f: f64) -> f64 {
    f / (3.0 + f)
}

/// The same under `least_connections` at idle: admitted in a fraction `f`
/// of the picks, then one of four tied (its module doc).
fn admitted_among_four(f: f64) -> f64 {
    f / 4.0
}

#[test]
fn a_recovered_instance_gets_a_ramping_share() {
    recovered_share_ramps(StrategyKind::Weighted, proportional);
}

#[test]
fn round_robin_ramps_a_recovered_instance_like_weighted() {
    recovered_share_ramps(StrategyKind::RoundRobin, proportional);
}

#[test]
fn least_connections_ramps_a_recovered_instance() {
    recovered_share_ramps(StrategyKind::LeastConnections, admitted_among_four);
}

/// Under `kind`, an instance whose breaker just closed gets `share(f)` of
/// the picks among three full peers at 25, 50 and 100 % of its 10 s
/// slow-start window (± 0.02), growing each time.
fn recovered_share_ramps(kind: StrategyKind, share_at: fn(f64) -> f64) {
    let (reg, clock) = registry(kind);
    populate(&reg, &[1, 1, 1, 1]);
    trip(&reg, &clock, "i3");
    clock.advance(Duration::from_secs(5));
    close_by_probes(&reg, "i3");
    assert_eq!(
        reg.instance(SVC, "i3").unwrap().circuit_state,
        CircuitState::Closed
    );
    // Health is back to ~1 after the probes? Not quite: reset it so the test
    // isolates slow start.
    reg.update_instance_health(SVC, "i3", 1.0).unwrap();
    let n = 20_000;
    let mut last = 0.0;
    for pct in [25u64, 50, 100] {
        let target = Duration::from_millis(pct * 100);
        let since = reg.instance(SVC, "i3").unwrap().slow_start_factor;
        clock.advance(target - Duration::from_secs_f64(since * 10.0));
        let f = pct as f64 / 100.0;
        let want = share_at(f);
        let counts = count_picks(&reg, n);
        let got = share(&counts, "i3", n);
        assert!(
            (got - want).abs() < 0.02,
            "{kind}: at {pct} % of slow start the share should be {want:.3}, got {got:.3}"
        );
        assert!(got > last, "share must grow with the ramp");
        last = got;
    }
}

/// Under `kind`, an instance whose health score an operator lowered to ½
/// among three full peers gets `share(0.5)` of the picks (± 0.02), and
/// back to a quarter once the score is restored.
fn lowered_score_share(kind: StrategyKind, share_at: fn(f64) -> f64) {
    let (reg, _clock) = registry(kind);
    populate(&reg, &[1, 1, 1, 1]);
    reg.update_instance_health(SVC, "i3", 0.5).unwrap();
    let n = 20_000;
    let got = share(&count_picks(&reg, n), "i3", n);
    let want = share_at(0.5);
    assert!(
        (got - want).abs() < 0.02,
        "{kind}: health 0.5 should buy {want:.3} of the picks, got {got:.3}"
    );
    reg.update_instance_health(SVC, "i3", 1.0).unwrap();
    let got = share(&count_picks(&reg, n), "i3", n);
    assert!(
        (got - 0.25).abs() < 0.02,
        "{kind}: full health should buy a quarter, got {got:.3}"
    );
}

#[test]
fn round_robin_gives_a_lowered_health_score_proportionally_less() {
    lowered_score_share(StrategyKind::RoundRobin, proportional);
}

#[test]
fn least_connections_gives_a_lowered_health_score_proportionally_less() {
    lowered_score_share(StrategyKind::LeastConnections, admitted_among_four);
}

#[test]
fn least_connections_under_load_fills_a_half_weight_instance_half_as_much() {
    let (reg, _clock) = registry(StrategyKind::LeastConnections);
    populate(&reg, &[1, 1]);
    reg.update_instance_health(SVC, "i1", 0.5).unwrap();
    // Held selections: i1 is considered in half the picks, and then only
    // while it holds less than half of i0's connections.
    let held: Vec<_> = (0..300).map(|_| reg.get_instance(SVC).unwrap()).collect();
    let on_i1 = held
        .iter()
        .filter(|s| s.instance().id().as_str() == "i1")
        .count();
    assert!(
        (90..=100).contains(&on_i1),
        "i1 at weight ½ carries a third of 300 held (at most 100), got {on_i1}"
    );
    // Plain least connections (both full) would have split them evenly.
}
