//! Shares and sequences of the strategies.

use std::collections::HashMap;
use std::time::Duration;

use datapunk_lb_core::{LoadBalancerConfig, Registry, StrategyKind};

use crate::support::*;

#[test]
fn smooth_wrr_5_1_1_is_exact_in_every_window_and_never_bunches_light_picks() {
    let (reg, _) = registry(StrategyKind::Weighted);
    populate(&reg, &[5, 1, 1]);
    let seq: Vec<String> = (0..7 * 50).map(|_| pick(&reg)).collect();
    for (start, window) in seq.windows(7).enumerate() {
        let count = |id: &str| window.iter().filter(|x| *x == id).count();
        assert_eq!(
            (count("i0"), count("i1"), count("i2")),
            (5, 1, 1),
            "window starting at pick {start}: {window:?}"
        );
    }
    for pair in seq.windows(2) {
        assert!(
            pair[0] == "i0" || pair[1] == "i0",
            "two light picks in a row: {pair:?} in {:?}",
            &seq[..14]
        );
    }
}

#[test]
fn smooth_wrr_random_weights_exact_over_any_sum_window() {
    let mut rng = fastrand::Rng::with_seed(42);
    for round in 0..5 {
        let weights: Vec<u64> = (0..rng.usize(2..9)).map(|_| rng.u64(1..=20)).collect();
        let total: u64 = weights.iter().sum();
        let (reg, _) = registry(StrategyKind::Weighted);
        let ids = populate(&reg, &weights);
        let seq: Vec<String> = (0..3 * total).map(|_| pick(&reg)).collect();
        for window in seq.windows(total as usize) {
            for (id, &w) in ids.iter().zip(&weights) {
                let got = window.iter().filter(|x| *x == id).count() as u64;
                assert_eq!(
                    got, w,
                    "round {round}, weights {weights:?}: {id} got {got} of {total}"
                );
            }
        }
    }
}

#[test]
fn round_robin_rotates_exactly() {
    let (reg, _) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[1, 5, 1]);
    let seq: Vec<String> = (0..300).map(|_| pick(&reg)).collect();
    for w in seq.chunks(3) {
        let mut w = w.to_vec();
        w.sort();
        assert_eq!(
            w,
            ["i0", "i1", "i2"],
            "round robin ignores weights and rotates"
        );
    }
}

#[test]
fn least_connections_breaks_ties_randomly_not_by_position() {
    let n = 10;
    let (reg, _) = registry(StrategyKind::LeastConnections);
    populate(&reg, &vec![1; n]);
    let picks = 10_000;
    let counts = count_picks(&reg, picks);
    for i in 0..n {
        let s = share(&counts, &format!("i{i}"), picks);
        let ideal = 1.0 / n as f64;
        assert!(
            (s - ideal).abs() <= 0.1 * ideal,
            "i{i} got {s:.4}, want {ideal} ± 10 %: {counts:?}"
        );
    }
}

#[test]
fn least_connections_picks_the_least_loaded() {
    let (reg, _) = registry(StrategyKind::LeastConnections);
    populate(&reg, &[1, 1, 1]);
    let mut held = Vec::new();
    // Hold connections until each instance carries some load: i.e. 2, 2, 2.
    for _ in 0..6 {
        held.push(reg.get_instance(SVC).unwrap());
    }
    let mut load: HashMap<String, u32> = HashMap::new();
    for s in &held {
        *load.entry(s.instance().id().to_string()).or_default() += 1;
    }
    assert_eq!(
        load.values().copied().collect::<Vec<_>>(),
        [2, 2, 2],
        "{load:?}"
    );
    // Release one on i1: the next pick must be i1.
    let idx = held
        .iter()
        .position(|s| s.instance().id().as_str() == "i1")
        .unwrap();
    drop(held.remove(idx));
    assert_eq!(pick(&reg), "i1");
}

#[test]
fn weighted_random_follows_weights() {
    let (reg, _) = registry(StrategyKind::WeightedRandom);
    populate(&reg, &[3, 1]);
    let n = 20_000;
    let counts = count_picks(&reg, n);
    let s = share(&counts, "i0", n);
    assert!(
        (s - 0.75).abs() < 0.03,
        "weight 3:1 must give 75 % ± 3 %, got {s}"
    );
}

#[test]
fn random_is_uniform() {
    let (reg, _) = registry(StrategyKind::Random);
    populate(&reg, &[1, 7, 1, 1]);
    let n = 20_000;
    let counts = count_picks(&reg, n);
    for i in 0..4 {
        let s = share(&counts, &format!("i{i}"), n);
        assert!((s - 0.25).abs() < 0.025, "i{i}: {s}");
    }
}

/// `p2c` and `peak_ewma` draw both positions of their pair before reading
/// either line, and fall back to a loop when a candidate is ineligible:
/// idle instances of equal weight must still share evenly (ties go to the
/// first draw), and a drained one gets nothing. Seeded RNG; ±2.5 points is
/// about 8 σ at 20,000 picks.
#[test]
fn the_pair_strategies_spread_evenly_around_an_ineligible_instance() {
    for kind in [StrategyKind::P2c, StrategyKind::PeakEwma] {
        let (reg, _) = registry(kind);
        populate(&reg, &[1, 1, 1, 1, 1]);
        reg.drain_instance(SVC, "i4", Duration::from_secs(60))
            .unwrap();
        let n = 20_000;
        let counts = count_picks(&reg, n);
        assert_eq!(counts.get("i4"), None, "{kind}: the drained instance");
        for i in 0..4 {
            let s = share(&counts, &format!("i{i}"), n);
            assert!((s - 0.25).abs() < 0.025, "{kind}: i{i}: {s}");
        }
    }
}

/// `random`, `p2c` and `peak_ewma` draw their first positions in batches
/// ahead of the picks that use them (`draw_ahead`), valid only for the
/// member count they were drawn for. Across membership changes every pick
/// must still find an instance (a batch drawn for 12 members used on 9
/// would name positions past the list), never a removed or drained one,
/// and the eligible ones must share evenly in each phase. Seeded RNG;
/// ±2 points is about 7 σ at 16,000 picks among 8 (p = 12.5 %).
#[test]
fn draws_made_ahead_stay_uniform_across_membership_changes() {
    for kind in [
        StrategyKind::Random,
        StrategyKind::P2c,
        StrategyKind::PeakEwma,
    ] {
        // No slow start: the instance registered later takes a full share.
        let (reg, _) = registry_with(LoadBalancerConfig {
            strategy: kind,
            slow_start: Duration::ZERO,
            ..LoadBalancerConfig::default()
        });
        populate(&reg, &[1; 12]);
        reg.drain_instance(SVC, "i11", Duration::from_secs(600))
            .unwrap();
        let n = 16_000;
        let phase = |reg: &Registry, eligible: &[String], phase: &str| {
            let counts = count_picks(reg, n);
            for (id, count) in &counts {
                assert!(
                    eligible.contains(id),
                    "{kind} {phase}: picked {id} ({count})"
                );
            }
            let even = 1.0 / eligible.len() as f64;
            for id in eligible {
                let s = share(&counts, id, n);
                assert!((s - even).abs() < 0.02, "{kind} {phase}: {id}: {s}");
            }
        };
        let ids = |range: std::ops::Range<usize>| -> Vec<String> {
            range.map(|i| format!("i{i}")).collect()
        };
        phase(&reg, &ids(0..11), "12 members");
        // 12 → 9 members: the batch drawn for 12 is thrown away.
        for i in 8..11 {
            reg.deregister_instance(SVC, &format!("i{i}")).unwrap();
        }
        phase(&reg, &ids(0..8), "9 members");
        // Another snapshot with the same count: draws stay valid, and
        // name the member now at their position.
        reg.deregister_instance(SVC, "i0").unwrap();
        reg.register_instance(SVC, instance("j0", 1)).unwrap();
        let mut eligible = ids(1..8);
        eligible.push("j0".to_owned());
        phase(&reg, &eligible, "9 members, i0 replaced");
    }
}

/// A scripted backend: requests arrive 20 per ms, each holds its selection
/// for its instance's latency (10 ms; 100 ms for the slow one, i0).
fn simulate_slow_instance(strategy: StrategyKind) -> f64 {
    let (reg, clock) = registry(strategy);
    populate(&reg, &[1, 1, 1, 1, 1]);
    let latency = |id: &str| Duration::from_millis(if id == "i0" { 100 } else { 10 });
    let mut in_flight: Vec<(u64, datapunk_lb_core::Selection)> = Vec::new();
    let (mut slow, mut total) = (0usize, 0usize);
    for ms in 0..3_000u64 {
        clock.advance(Duration::from_millis(1));
        let (done, rest): (Vec<_>, Vec<_>) = in_flight.into_iter().partition(|(end, _)| *end <= ms);
        in_flight = rest;
        for (_, s) in done {
            let l = latency(s.instance().id().as_str());
            s.success(l);
        }
        for _ in 0..20 {
            let s = reg.get_instance(SVC).unwrap();
            let id = s.instance().id().to_string();
            if ms >= 500 {
                total += 1;
                slow += usize::from(id == "i0");
            }
            let end = ms + latency(&id).as_millis() as u64;
            in_flight.push((end, s));
        }
    }
    slow as f64 / total as f64
}

#[test]
fn p2c_starves_a_ten_times_slower_instance() {
    let s = simulate_slow_instance(StrategyKind::P2c);
    assert!(
        s < 0.10,
        "slow instance got {:.1} % of picks under p2c",
        s * 100.0
    );
}

#[test]
fn peak_ewma_starves_a_ten_times_slower_instance() {
    let s = simulate_slow_instance(StrategyKind::PeakEwma);
    assert!(
        s < 0.10,
        "slow instance got {:.1} % under peak_ewma (concurrent)",
        s * 100.0
    );

    // And sequentially, where only the EWMA can tell them apart.
    let (reg, clock) = registry(StrategyKind::PeakEwma);
    populate(&reg, &[1, 1, 1, 1, 1]);
    let (mut slow, mut total) = (0usize, 0usize);
    for round in 0..5_000 {
        let s = reg.get_instance(SVC).unwrap();
        let is_slow = s.instance().id().as_str() == "i0";
        let l = Duration::from_millis(if is_slow { 100 } else { 10 });
        clock.advance(l);
        s.success(l);
        if round >= 500 {
            total += 1;
            slow += usize::from(is_slow);
        }
    }
    let s = slow as f64 / total as f64;
    assert!(
        s < 0.10,
        "slow instance got {:.1} % under peak_ewma (sequential)",
        s * 100.0
    );
}
