//! Slow start: linear effective weight, and the share it buys.

use std::time::Duration;

use datapunk_lb_core::{CircuitState, Outcome, StrategyKind};

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

#[test]
fn a_recovered_instance_gets_a_ramping_share() {
    let (reg, clock) = registry(StrategyKind::Weighted);
    populate(&reg, &[1, 1, 1, 1]);
    trip(&reg, &clock, "i3");
    clock.advance(Duration::from_secs(5));
    for _ in 0..2 {
        reg.report_outcome(SVC, "i3", Outcome::Success(Duration::from_millis(1)))
            .unwrap();
    }
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
        let want = f / (3.0 + f);
        let counts = count_picks(&reg, n);
        let got = share(&counts, "i3", n);
        assert!(
            (got - want).abs() < 0.02,
            "at {pct} % of slow start the share should be {want:.3}, got {got:.3}"
        );
        assert!(got > last, "share must grow with the ramp");
        last = got;
    }
}
