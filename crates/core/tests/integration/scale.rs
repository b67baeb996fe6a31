//! 100,000 instances in one service: register, select with every strategy,
//! deregister.

use datapunk_lb_core::StrategyKind;

use crate::support::*;

const N: usize = 100_000;

#[test]
fn one_hundred_thousand_instances() {
    let (reg, _) = registry(StrategyKind::Adaptive);
    // One by one, as discovery would: each registration copies O(√n) state,
    // and table rebuilds above 10,000 members are deferred.
    for i in 0..N {
        reg.register_instance(SVC, instance(&format!("inst-{i}"), 1 + (i % 7) as u64))
            .unwrap();
    }
    assert_eq!(reg.service(SVC).unwrap().status().instances, N);
    for kind in StrategyKind::ALL {
        reg.set_strategy(SVC, kind).unwrap();
        reg.maintain(); // off-path rebuild of tables (weighted, consistent_hash)
        let mut distinct = std::collections::HashSet::new();
        for k in 0..500u32 {
            let s = reg
                .get_instance_with_key(SVC, &k.to_le_bytes())
                .unwrap_or_else(|| panic!("{kind} found nothing among {N}"));
            distinct.insert(s.instance().id().clone());
        }
        assert!(
            distinct.len() > 100,
            "{kind} picked only {} distinct instances",
            distinct.len()
        );
    }
    // Remove with a strategy that needs no table, as an operator would batch it.
    reg.set_strategy(SVC, StrategyKind::RoundRobin).unwrap();
    for i in 0..N {
        reg.deregister_instance(SVC, &format!("inst-{i}")).unwrap();
    }
    assert_eq!(reg.service(SVC).unwrap().status().instances, 0);
    assert!(reg.get_instance(SVC).is_none());
}
