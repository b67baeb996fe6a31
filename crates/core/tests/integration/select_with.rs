//! `select_with`: the caller's filter is applied inside the pick.

use std::time::Duration;

use datapunk_lb_core::{CircuitState, LoadBalancerConfig, StrategyKind};

use crate::support::*;

/// Selects with `accept` and releases at once; returns the chosen id.
fn pick_with(reg: &datapunk_lb_core::Registry, key: Option<&[u8]>, refused: &[&str]) -> String {
    let s = reg
        .get_instance_with(SVC, key, |m| !refused.contains(&m.instance().id().as_str()))
        .expect("an acceptable instance");
    s.instance().id().to_string()
}

#[test]
fn round_robin_skips_a_refused_instance_in_exact_rotation() {
    let (reg, _) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[1, 1, 1, 1]);
    let seq: Vec<String> = (0..9).map(|_| pick_with(&reg, None, &["i1"])).collect();
    // Counter 0 → i0, 1 → i1 refused → 2 → i2, 3 → i3, 4 → i0, ...
    assert_eq!(
        seq,
        ["i0", "i2", "i3", "i0", "i2", "i3", "i0", "i2", "i3"],
        "rotation with i1 refused"
    );
}

#[test]
fn no_strategy_returns_a_refused_instance() {
    for kind in StrategyKind::ALL {
        // 300 members puts least_connections in its sampling mode too.
        for n in [6, 300] {
            let (reg, _) = registry(kind);
            populate(&reg, &vec![1 + (n as u64 % 3); n]);
            let svc = reg.service(SVC).unwrap();
            for round in 0..400u32 {
                let key = round.to_le_bytes();
                let s = svc
                    .select_with(Some(&key), |m| !m.instance().id().as_str().ends_with('1'))
                    .unwrap_or_else(|| panic!("{kind}/{n}: no pick in round {round}"));
                let id = s.instance().id().to_string();
                assert!(!id.ends_with('1'), "{kind}/{n}: refused {id} returned");
            }
        }
    }
}

#[test]
fn least_connections_and_p2c_avoid_instances_at_their_limit() {
    for kind in [StrategyKind::LeastConnections, StrategyKind::P2c] {
        let (reg, _) = registry(kind);
        populate(&reg, &[1, 1, 1]);
        let svc = reg.service(SVC).unwrap();
        let under_limit = |m: &datapunk_lb_core::Member| m.active_connections() < 1;
        // Each held selection fills one instance; the fourth finds none.
        let held: Vec<_> = (0..3)
            .map(|i| {
                svc.select_with(None, under_limit)
                    .unwrap_or_else(|| panic!("{kind}: pick {i} has a free instance"))
            })
            .collect();
        let mut ids: Vec<String> = held.iter().map(|s| s.instance().id().to_string()).collect();
        ids.sort();
        assert_eq!(ids, ["i0", "i1", "i2"], "{kind}: one pick per instance");
        assert!(
            svc.select_with(None, under_limit).is_none(),
            "{kind}: all at limit"
        );
    }
}

#[test]
fn nothing_acceptable_gives_none_for_every_strategy() {
    for kind in StrategyKind::ALL {
        let (reg, _) = registry(kind);
        populate(&reg, &[1, 2, 3]);
        let svc = reg.service(SVC).unwrap();
        assert!(svc.select_with(None, |_| false).is_none(), "{kind} no key");
        assert!(
            svc.select_with(Some(b"k"), |_| false).is_none(),
            "{kind} keyed"
        );
        assert_eq!(svc.status().in_flight, 0, "{kind}: nothing left counted");
    }
}

#[test]
fn consistent_hash_falls_over_to_the_same_next_instance_as_for_a_drained_primary() {
    let (reg, _) = registry(StrategyKind::ConsistentHash);
    populate(&reg, &[1; 10]);
    for k in 0..50u32 {
        let key = format!("user-{k}");
        let primary = pick_with(&reg, Some(key.as_bytes()), &[]);
        let next = pick_with(&reg, Some(key.as_bytes()), &[&primary]);
        assert_ne!(next, primary, "key {key}");
        for _ in 0..5 {
            assert_eq!(
                pick_with(&reg, Some(key.as_bytes()), &[&primary]),
                next,
                "key {key}: the fallover must be deterministic"
            );
        }
    }
    // Refusing is the same walk as ineligibility: drain a primary and its
    // keys go where the filter sent them.
    let key = b"user-0";
    let primary = pick_with(&reg, Some(key), &[]);
    let next = pick_with(&reg, Some(key), &[&primary]);
    reg.drain_instance(SVC, &primary, Duration::from_secs(60))
        .unwrap();
    assert_eq!(pick_with(&reg, Some(key), &[]), next);
}

#[test]
fn panic_mode_still_ignores_breakers_but_not_the_filter() {
    let (reg, clock) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[1, 1, 1, 1]);
    for id in ["i0", "i1", "i2"] {
        trip(&reg, &clock, id);
    }
    let svc = reg.service(SVC).unwrap();
    // One eligible of four is below 50 %: panic mode spreads over all.
    let seq: Vec<String> = (0..6).map(|_| pick_with(&reg, None, &["i3"])).collect();
    assert!(svc.in_panic());
    assert!(seq.iter().all(|id| id != "i3"), "{seq:?}");
    assert!(seq.iter().any(|id| id == "i0"), "{seq:?}");
}

#[test]
fn half_open_probe_limit_holds_under_a_filter() {
    let (reg, clock) = registry_with(LoadBalancerConfig {
        strategy: StrategyKind::RoundRobin,
        min_healthy_percent: 0,
        ..LoadBalancerConfig::default()
    });
    populate(&reg, &[1, 1]);
    trip(&reg, &clock, "i0");
    clock.advance(Duration::from_secs(200));
    let probe = reg
        .get_instance_with(SVC, None, |m| m.instance().id().as_str() == "i0")
        .expect("the open window has passed: one probe");
    assert!(probe.is_probe());
    assert_eq!(
        reg.instance(SVC, "i0").unwrap().circuit_state,
        CircuitState::HalfOpen
    );
    assert!(
        reg.get_instance_with(SVC, None, |m| m.instance().id().as_str() == "i0")
            .is_none(),
        "the one probe slot is taken"
    );
    drop(probe);
}
