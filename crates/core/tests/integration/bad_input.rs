//! Bad input gets a typed error and changes nothing.

use datapunk_lb_core::{
    HealthScoreError, InstanceError, InstanceStatus, Registry, RegistryError, ServiceInstance,
    ServiceStatus, StrategyKind,
};

use crate::support::*;

fn state(reg: &Registry) -> (Vec<ServiceStatus>, Vec<InstanceStatus>) {
    (reg.services(), reg.instances(SVC).unwrap())
}

#[test]
fn invalid_health_scores_are_rejected_without_change() {
    let (reg, _) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[1, 2]);
    reg.update_instance_health(SVC, "i0", 0.7).unwrap();
    let before = state(&reg);
    for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let e = reg.update_instance_health(SVC, "i0", v).unwrap_err();
        assert!(
            matches!(
                e,
                RegistryError::HealthScore(HealthScoreError::NotFinite(_))
            ),
            "{v}: {e}"
        );
        assert_eq!(state(&reg), before, "{v} changed state");
    }
    for v in [-0.1, 1.1] {
        let e = reg.update_instance_health(SVC, "i0", v).unwrap_err();
        assert_eq!(
            e,
            RegistryError::HealthScore(HealthScoreError::OutOfRange(v))
        );
        assert!(
            e.to_string().contains("health_score"),
            "message names the field: {e}"
        );
        assert_eq!(state(&reg), before, "{v} changed state");
    }
}

#[test]
fn invalid_weights_ids_and_unknown_names_are_rejected_without_change() {
    let (reg, _) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[1, 2]);
    let before = state(&reg);
    for w in [0, 1001] {
        let e = reg.update_instance_weight(SVC, "i0", w).unwrap_err();
        assert_eq!(e, RegistryError::Instance(InstanceError::InvalidWeight(w)));
        assert_eq!(state(&reg), before);
    }
    assert_eq!(
        ServiceInstance::try_new("", "h", 1).unwrap_err(),
        InstanceError::EmptyId
    );
    let e = reg.update_instance_health(SVC, "", 0.5).unwrap_err();
    assert!(matches!(e, RegistryError::UnknownInstance { .. }), "{e}");
    let e = reg.register_instance("", instance("x", 1)).unwrap_err();
    assert_eq!(e, RegistryError::EmptyServiceName);

    let unknown_svc = RegistryError::UnknownService("nope".into());
    assert_eq!(
        reg.update_instance_health("nope", "i0", 0.5).unwrap_err(),
        unknown_svc
    );
    assert_eq!(
        reg.deregister_instance("nope", "i0").unwrap_err(),
        unknown_svc
    );
    assert_eq!(
        reg.drain_instance("nope", "i0", std::time::Duration::ZERO)
            .unwrap_err(),
        unknown_svc
    );
    assert_eq!(
        reg.set_strategy("nope", StrategyKind::P2c).unwrap_err(),
        unknown_svc
    );
    assert!(reg.get_instance("nope").is_none());

    let unknown_inst = RegistryError::UnknownInstance {
        service: SVC.into(),
        instance: "zz".into(),
    };
    assert_eq!(
        reg.update_instance_health(SVC, "zz", 0.5).unwrap_err(),
        unknown_inst
    );
    assert_eq!(
        reg.update_instance_weight(SVC, "zz", 5).unwrap_err(),
        unknown_inst
    );
    assert_eq!(
        reg.deregister_instance(SVC, "zz").unwrap_err(),
        unknown_inst
    );
    assert_eq!(
        reg.drain_instance(SVC, "zz", std::time::Duration::ZERO)
            .unwrap_err(),
        unknown_inst
    );
    assert_eq!(
        reg.report_outcome(
            SVC,
            "zz",
            datapunk_lb_core::Outcome::Success(std::time::Duration::ZERO)
        )
        .unwrap_err(),
        unknown_inst
    );
    assert_eq!(state(&reg), before, "rejected calls changed state");
    assert_eq!(
        reg.service_names(),
        [SVC],
        "no service was created by a failed call"
    );
}

#[test]
fn invalid_service_config_is_rejected_without_change() {
    let (reg, _) = registry(StrategyKind::RoundRobin);
    populate(&reg, &[1]);
    let before = reg.service(SVC).unwrap().config();
    let mut bad = datapunk_lb_core::LoadBalancerConfig::default();
    bad.breaker.error_threshold = 0;
    let e = reg.configure_service(SVC, bad).unwrap_err();
    assert!(e.to_string().contains("error_threshold"), "{e}");
    assert_eq!(reg.service(SVC).unwrap().config(), before);
}
