//! The fault schedule of `bench/soak.sh`, replayed on the manual clock: every
//! 120 s one instance is dead for 10 s, one slow for 15 s (its checks time
//! out, its requests succeed), one answers 500 for 15 s (checks too) and one
//! resets every real request for 15 s while its health checks pass.
//!
//! The 30-minute soak of 2026-11-29 failed 5.8 % of requests after minute 6:
//! every instance trips every cycle, so the trip count never resets, the
//! windows reach `open_max` (120 s), and instances whose checks passed again
//! stayed open until panic mode spread traffic over every instance,
//! including the failing one. These tests pin the rule that fixes it
//! (`breaker` module doc, "Active checks"): passing checks end an open
//! window early, real traffic still decides closing.

use std::time::Duration;

use datapunk_lb_core::{
    CircuitState, FailureKind, LoadBalancerConfig, ManualClock, Outcome, Registry, StrategyKind,
};

use crate::support::*;

const CYCLE: u64 = 120;
/// Simulation step and real requests per step: 40 requests/s.
const STEP_MS: u64 = 100;
const REQUESTS_PER_STEP: usize = 4;

/// What instance `i` does at second `s` of the cycle.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    /// Killed: connects fail, checks fail.
    Dead,
    /// Slow: checks time out, requests succeed (late).
    Slow,
    /// 500 to everything, checks included.
    Error,
    /// Resets every real request mid-body; checks pass.
    Reset,
}

fn mode(i: usize, s: u64) -> Mode {
    match (i, s) {
        (0, 10..=19) => Mode::Dead,
        (1, 30..=44) => Mode::Slow,
        (2, 50..=64) => Mode::Error,
        (3, 70..=84) => Mode::Reset,
        _ => Mode::Ok,
    }
}

#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    failed: u64,
    panic_steps: u64,
    steps: u64,
    /// Steps an instance in `Mode::Ok` for ≥ 10 s spent with its breaker
    /// open, per instance.
    open_while_healthy: [u64; 4],
}

/// Runs `cycles` cycles of the schedule; counts from cycle `measure_from`.
fn run(reg: &Registry, clock: &ManualClock, cycles: u64, measure_from: u64) -> Tally {
    let ids = ["i0", "i1", "i2", "i3"];
    let mut t = Tally::default();
    let steps = cycles * CYCLE * 1000 / STEP_MS;
    let mut ok_since = [0u64; 4]; // ms at which each instance last became Ok
    for step in 0..steps {
        let ms = step * STEP_MS;
        let s = (ms / 1000) % CYCLE;
        let measuring = ms / 1000 >= measure_from * CYCLE;
        for (i, since) in ok_since.iter_mut().enumerate() {
            if mode(i, s) != Mode::Ok {
                *since = ms + STEP_MS;
            }
        }
        // Active checks: every instance once a second.
        if ms % 1000 == 0 {
            for (i, id) in ids.iter().enumerate() {
                let o = match mode(i, s) {
                    Mode::Dead | Mode::Slow | Mode::Error => {
                        Outcome::Failure(FailureKind::HealthCheck)
                    }
                    Mode::Ok | Mode::Reset => Outcome::Success(Duration::from_millis(1)),
                };
                reg.report_outcome(SVC, id, o).unwrap();
            }
        }
        for _ in 0..REQUESTS_PER_STEP {
            let Some(sel) = reg.get_instance(SVC) else {
                t.failed += u64::from(measuring);
                t.requests += u64::from(measuring);
                continue;
            };
            let i = ids
                .iter()
                .position(|id| *id == sel.instance().id().as_str())
                .unwrap();
            let failed = match mode(i, s) {
                Mode::Ok | Mode::Slow => {
                    let _ = sel.success(Duration::from_millis(2));
                    false
                }
                Mode::Dead => {
                    let _ = sel.failure(FailureKind::Connect);
                    true
                }
                Mode::Error => {
                    let _ = sel.failure(FailureKind::ServerError);
                    true
                }
                Mode::Reset => {
                    let _ = sel.failure(FailureKind::Reset);
                    true
                }
            };
            if measuring {
                t.requests += 1;
                t.failed += u64::from(failed);
            }
        }
        if measuring {
            t.steps += 1;
            t.panic_steps += u64::from(reg.service(SVC).unwrap().status().panic);
            for (i, id) in ids.iter().enumerate() {
                let healthy_for = ms.saturating_sub(ok_since[i]);
                if healthy_for >= 10_000
                    && reg.instance(SVC, id).unwrap().circuit_state == CircuitState::Open
                {
                    t.open_while_healthy[i] += 1;
                }
            }
        }
        clock.advance(Duration::from_millis(STEP_MS));
    }
    t
}

fn soak_registry() -> (Registry, std::sync::Arc<ManualClock>) {
    let (reg, clock) = registry_with(LoadBalancerConfig {
        strategy: StrategyKind::RoundRobin,
        ..LoadBalancerConfig::default()
    });
    populate(&reg, &[1, 1, 1, 1]);
    (reg, clock)
}

/// Minutes 6 to 30 of the soak's schedule: instances whose checks have
/// passed for 10 s are not held open, panic mode is rare, and the failures
/// are about those the faults make unavoidable.
#[test]
fn soak_schedule_keeps_recovered_instances_in_rotation() {
    let (reg, clock) = soak_registry();
    let t = run(&reg, &clock, 15, 3);
    eprintln!("{t:?}");
    // Before the rule, instances 0 and 2 (checks pass again right after
    // their fault) were open for most of every cycle once the windows
    // reached 120 s: 40-70 % of the steps.
    for i in [0, 1, 2] {
        assert!(
            t.open_while_healthy[i] * 100 < t.steps,
            "i{i} open while healthy in {} of {} steps",
            t.open_while_healthy[i],
            t.steps
        );
    }
    assert!(
        t.panic_steps * 100 < t.steps,
        "panic in {} of {} steps",
        t.panic_steps,
        t.steps
    );
    // i3 (resets requests, passes checks) is another matter: each spell its
    // checks start fails, so every other window runs in full, and at 120 s
    // those windows span the gap between its faults. It is held out most of
    // the time, which is the growing windows doing their job: 3 of 4
    // instances stay eligible, so no panic.
    //
    // Unavoidable failures: each fault costs the requests until its breaker
    // trips (3 consecutive failures) and one failed probe per window. 0.5 %
    // of the requests is about 15 per cycle (measured: 97 in 12 cycles).
    assert!(
        t.failed * 200 < t.requests,
        "{} of {} requests failed",
        t.failed,
        t.requests
    );
}
