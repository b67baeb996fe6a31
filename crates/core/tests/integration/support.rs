//! Helpers shared by the integration tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use datapunk_lb_core::CountingClock;
use datapunk_lb_core::{
    FailureKind, LoadBalancerConfig, ManualClock, Registry, ServiceInstance, StrategyKind, Weight,
};

pub(crate) const SVC: &str = "svc";

/// A registry on a manual clock with a fixed seed and `strategy` for every
/// service.
pub(crate) fn registry(strategy: StrategyKind) -> (Registry, Arc<ManualClock>) {
    registry_with(LoadBalancerConfig {
        strategy,
        ..LoadBalancerConfig::default()
    })
}

pub(crate) fn registry_with(config: LoadBalancerConfig) -> (Registry, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let reg = Registry::builder()
        .config(config)
        .clock(clock.clone())
        .seed(0x5eed)
        .build()
        .expect("valid config");
    (reg, clock)
}

/// [`registry`] on a [`CountingClock`].
pub(crate) fn counting_registry(strategy: StrategyKind) -> (Registry, Arc<CountingClock>) {
    let clock = Arc::new(CountingClock::default());
    let reg = Registry::builder()
        .config(LoadBalancerConfig {
            strategy,
            ..LoadBalancerConfig::default()
        })
        .clock(clock.clone())
        .seed(0x5eed)
        .build()
        .expect("valid config");
    (reg, clock)
}

pub(crate) fn instance(id: &str, weight: u64) -> ServiceInstance {
    ServiceInstance::try_new(id, "127.0.0.1", 9000)
        .unwrap()
        .with_weight(Weight::try_new(weight).unwrap())
}

/// Registers `weights.len()` instances named `i0`, `i1`, … in one batch
/// (so none of them slow-starts).
pub(crate) fn populate(reg: &Registry, weights: &[u64]) -> Vec<String> {
    let ids: Vec<String> = (0..weights.len()).map(|i| format!("i{i}")).collect();
    reg.register_instances(SVC, ids.iter().zip(weights).map(|(id, &w)| instance(id, w)))
        .unwrap();
    ids
}

/// Selects and releases at once; returns the chosen id.
pub(crate) fn pick(reg: &Registry) -> String {
    let s = reg.get_instance(SVC).expect("an eligible instance");
    s.instance().id().to_string()
}

/// Counts picks per id over `n` immediate select-and-release rounds.
pub(crate) fn count_picks(reg: &Registry, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts.entry(pick(reg)).or_insert(0) += 1;
    }
    counts
}

/// Fails `id` until its breaker opens (selecting until `id` comes up).
pub(crate) fn trip(reg: &Registry, clock: &ManualClock, id: &str) {
    let threshold = reg.service(SVC).unwrap().config().breaker.error_threshold;
    for _ in 0..threshold {
        reg.report_outcome(
            SVC,
            id,
            datapunk_lb_core::Outcome::Failure(FailureKind::Connect),
        )
        .unwrap();
        clock.advance(Duration::from_millis(1));
    }
    let st = reg.instance(SVC, id).unwrap();
    assert_eq!(
        st.circuit_state,
        datapunk_lb_core::CircuitState::Open,
        "{id} must trip after error_threshold failures"
    );
}

pub(crate) fn share(counts: &HashMap<String, usize>, id: &str, total: usize) -> f64 {
    *counts.get(id).unwrap_or(&0) as f64 / total as f64
}

/// Closes `id`'s breaker, whose open window has elapsed, with
/// `recovery_threshold` successful real requests (half-open probes): active
/// checks alone never close a breaker.
pub(crate) fn close_by_probes(reg: &Registry, id: &str) {
    let svc = reg.service(SVC).unwrap();
    for _ in 0..svc.config().breaker.recovery_threshold {
        let s = svc
            .select_with(None, |m| m.instance().id().as_str() == id)
            .unwrap_or_else(|| panic!("{id} must admit a probe"));
        assert!(s.is_probe(), "{id} is half-open");
        let _ = s.success(Duration::from_millis(1));
    }
    assert_eq!(
        reg.instance(SVC, id).unwrap().circuit_state,
        datapunk_lb_core::CircuitState::Closed
    );
}
