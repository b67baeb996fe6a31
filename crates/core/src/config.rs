//! Balancing configuration: [`LoadBalancerConfig`] with the SPEC's defaults;
//! the circuit breaker's own knobs are [`BreakerConfig`], which lives with
//! the breaker, and the adaptive strategy's thresholds are
//! [`AdaptiveConfig`], which lives with that strategy (both re-exported
//! here).
//!
//! A [`Registry`](crate::Registry) has one default configuration and any
//! number of per-service overrides (`Registry::configure_service`). Precedence
//! is: the service's own config if set, else the registry default, else the
//! constants below. The server owns the file format (TOML, humantime) and
//! the settings only it uses (health checks, metrics); these are plain
//! structs with `Default` and [`validate`](LoadBalancerConfig::validate),
//! which `check`, start-up and reload all run, so a bad value changes nothing.

use std::time::Duration;

pub use crate::breaker::{BreakerConfig, DEFAULT_ERROR_THRESHOLD, DEFAULT_RECOVERY_THRESHOLD};
use crate::error::ConfigError;
pub use crate::strategy::AdaptiveConfig;
use crate::strategy::StrategyKind;

/// Default minimum share of eligible instances before panic mode: 50 %.
pub const DEFAULT_MIN_HEALTHY_PERCENT: u8 = 50;
/// Default slow-start ramp: 10 s.
pub const DEFAULT_SLOW_START: Duration = Duration::from_secs(10);

/// How one service (or, as the registry default, every service) is balanced.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadBalancerConfig {
    /// Selection strategy. Default: [`StrategyKind::Adaptive`].
    pub strategy: StrategyKind,
    /// Below this share of eligible instances the service panics and selects
    /// across all instances (0..=100; 0 disables panic mode). Default 50.
    pub min_healthy_percent: u8,
    /// Slow-start ramp for new and recovered instances; zero disables it.
    /// Default 10 s.
    pub slow_start: Duration,
    /// Circuit breaker thresholds and windows. See [`BreakerConfig`].
    pub breaker: BreakerConfig,
    /// `adaptive`'s thresholds and periods (read only when `strategy` is
    /// `adaptive`, but always validated). See [`AdaptiveConfig`].
    pub adaptive: AdaptiveConfig,
}

// === impl LoadBalancerConfig ===

impl Default for LoadBalancerConfig {
    fn default() -> Self {
        Self {
            strategy: StrategyKind::Adaptive,
            min_healthy_percent: DEFAULT_MIN_HEALTHY_PERCENT,
            slow_start: DEFAULT_SLOW_START,
            breaker: BreakerConfig::default(),
            adaptive: AdaptiveConfig::default(),
        }
    }
}

impl LoadBalancerConfig {
    /// Checks every field; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.min_healthy_percent > 100 {
            return Err(ConfigError::new(
                "min_healthy_percent",
                format!("must be in 0..=100, got {}", self.min_healthy_percent),
            ));
        }
        self.breaker.validate()?;
        self.adaptive.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_spec_and_validate() {
        let c = LoadBalancerConfig::default();
        assert_eq!(c.breaker.error_threshold, 3);
        assert_eq!(c.breaker.recovery_threshold, 2);
        assert_eq!(c.min_healthy_percent, 50);
        assert_eq!(c.slow_start, Duration::from_secs(10));
        assert_eq!(c.strategy, StrategyKind::Adaptive);
        c.validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = Box<dyn Fn(&mut LoadBalancerConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "error_threshold",
                Box::new(|c| c.breaker.error_threshold = 0),
            ),
            (
                "recovery_threshold",
                Box::new(|c| c.breaker.recovery_threshold = 0),
            ),
            (
                "min_healthy_percent",
                Box::new(|c| c.min_healthy_percent = 101),
            ),
            (
                "failure_rate_threshold",
                Box::new(|c| c.breaker.failure_rate_threshold = f64::NAN),
            ),
            ("open_jitter", Box::new(|c| c.breaker.open_jitter = 1.0)),
            (
                "open_max",
                Box::new(|c| c.breaker.open_max = Duration::from_secs(1)),
            ),
            (
                "half_open_max_probes",
                Box::new(|c| c.breaker.half_open_max_probes = 0),
            ),
            (
                "eval_interval",
                Box::new(|c| c.adaptive.eval_interval = Duration::ZERO),
            ),
            (
                "min_dwell",
                Box::new(|c| c.adaptive.min_dwell = Duration::from_millis(500)),
            ),
            ("spread_enter", Box::new(|c| c.adaptive.spread_enter = 1.0)),
            ("spread_leave", Box::new(|c| c.adaptive.spread_leave = 2.5)),
            (
                "error_rate_enter",
                Box::new(|c| c.adaptive.error_rate_enter = 1.5),
            ),
            (
                "error_rate_leave",
                Box::new(|c| c.adaptive.error_rate_leave = 0.0),
            ),
            (
                "concurrency_enter",
                Box::new(|c| c.adaptive.concurrency_enter = f64::NAN),
            ),
            (
                "concurrency_leave",
                Box::new(|c| c.adaptive.concurrency_leave = -1.0),
            ),
            (
                "concurrency_leave",
                Box::new(|c| c.adaptive.concurrency_leave = 3.0),
            ),
        ];
        for (field, mutate) in cases {
            let mut c = LoadBalancerConfig::default();
            mutate(&mut c);
            let err = c.validate().expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }
}
