//! Maglev consistent hashing: stickiness and remapping bounds.

use datapunk_lb_core::{Registry, StrategyKind};

use crate::support::*;

const KEYS: usize = 100_000;

fn mapping(reg: &Registry) -> Vec<String> {
    (0..KEYS)
        .map(|k| {
            let key = format!("user-{k}");
            let s = reg.get_instance_with_key(SVC, key.as_bytes()).unwrap();
            s.instance().id().to_string()
        })
        .collect()
}

fn moved(a: &[String], b: &[String]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

#[test]
fn same_key_same_instance() {
    let (reg, _) = registry(StrategyKind::ConsistentHash);
    populate(&reg, &[1; 7]);
    for k in 0..1000 {
        let key = format!("k{k}");
        let first = reg
            .get_instance_with_key(SVC, key.as_bytes())
            .unwrap()
            .instance()
            .id()
            .clone();
        for _ in 0..3 {
            let again = reg.get_instance_with_key(SVC, key.as_bytes()).unwrap();
            assert_eq!(
                again.instance().id(),
                &first,
                "key {key} moved without a membership change"
            );
        }
    }
}

#[test]
fn adding_or_removing_one_of_n_remaps_about_one_nth() {
    for n in [10usize, 100] {
        let (reg, _) = registry(StrategyKind::ConsistentHash);
        populate(&reg, &vec![1; n]);
        let before = mapping(&reg);

        reg.register_instance(SVC, instance("extra", 1)).unwrap();
        let added = mapping(&reg);
        let f = moved(&before, &added);
        let (lo, hi) = (0.5 / n as f64, 2.0 / n as f64);
        assert!(
            f >= lo && f <= hi,
            "N={n}: adding one moved {f:.4} of keys, want [{lo}, {hi}]"
        );
        // Nearly all moved keys go to the new instance (Maglev trades a
        // little extra churn between old instances for balance).
        let to_new = before
            .iter()
            .zip(&added)
            .filter(|(a, b)| a != b && *b == "extra")
            .count();
        let between_old = before
            .iter()
            .zip(&added)
            .filter(|(a, b)| a != b && *b != "extra")
            .count();
        eprintln!("N={n}: {to_new} keys moved to the new instance, {between_old} between old ones");
        assert!(
            (between_old as f64) < 0.6 * to_new as f64,
            "N={n}: {between_old} keys moved between old instances vs {to_new} to the new one"
        );

        reg.deregister_instance(SVC, "extra").unwrap();
        reg.deregister_instance(SVC, "i3").unwrap();
        let removed = mapping(&reg);
        let f = moved(&before, &removed);
        assert!(
            f >= lo && f <= hi,
            "N={n}: removing one moved {f:.4} of keys, want [{lo}, {hi}]"
        );
    }
}

#[test]
fn keys_of_an_ineligible_instance_spread_and_others_stay() {
    let (reg, _) = registry(StrategyKind::ConsistentHash);
    populate(&reg, &[1; 10]);
    let before = mapping(&reg);
    reg.update_instance_health(SVC, "i4", 0.0).unwrap();
    let after = mapping(&reg);
    let mut targets = std::collections::HashSet::new();
    for (a, b) in before.iter().zip(&after) {
        if a == "i4" {
            assert_ne!(b, "i4");
            targets.insert(b.clone());
        } else {
            assert_eq!(a, b, "a key of a healthy instance moved");
        }
    }
    assert!(
        targets.len() >= 5,
        "displaced keys should spread, went to {targets:?}"
    );
}

/// The table names each slot's owner by its hot line and finds the
/// owner's position from the line. After churn (swap-removes move
/// positions; new instances take the freed lines) the instance a keyed
/// selection reports must be the one whose connection it counts, and the
/// same key must keep reaching it.
#[test]
fn after_churn_a_keyed_selection_counts_on_the_instance_it_reports() {
    let (reg, _) = registry(StrategyKind::ConsistentHash);
    populate(&reg, &[1; 40]);
    for i in (0..40).step_by(3) {
        reg.deregister_instance(SVC, &format!("i{i}")).unwrap();
    }
    for j in 0..10 {
        reg.register_instance(SVC, instance(&format!("j{j}"), 1))
            .unwrap();
    }
    let svc = reg.service(SVC).unwrap();
    let mut seen = std::collections::HashSet::new();
    for k in 0u32..2_000 {
        let sel = svc.select(Some(&k.to_le_bytes())).unwrap();
        let id = sel.instance().id().to_string();
        let status = reg.instance(SVC, &id).unwrap();
        assert_eq!(status.active_connections, 1, "key {k} → {id}");
        let again = svc.select(Some(&k.to_le_bytes())).unwrap();
        assert_eq!(again.instance().id().as_str(), id, "key {k}");
        assert_eq!(again.active_connections(), 2, "key {k} → {id}");
        seen.insert(id);
    }
    assert_eq!(seen.len(), 36, "every member owns keys");
}
