//! Balancing configuration: [`LoadBalancerConfig`] with the SPEC's defaults,
//! plus [`BreakerConfig`] for the circuit breaker's finer knobs.
//!
//! A [`Registry`](crate::Registry) has one default configuration and any
//! number of per-service overrides (`Registry::configure_service`). Precedence
//! is: the service's own config if set, else the registry default, else the
//! constants below. The server owns the file format (TOML, humantime); these
//! are plain structs with `Default` and [`validate`](LoadBalancerConfig::validate),
//! which `check`, start-up and reload all run, so a bad value changes nothing.

use std::time::Duration;

use crate::error::ConfigError;
use crate::strategy::StrategyKind;

/// Default active health check interval: 5 s.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Default active health check timeout: 1 s.
pub const DEFAULT_HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// Default consecutive failures that open a breaker: 3.
pub const DEFAULT_ERROR_THRESHOLD: u32 = 3;
/// Default consecutive half-open successes that close a breaker: 2.
pub const DEFAULT_RECOVERY_THRESHOLD: u32 = 2;
/// Default minimum share of eligible instances before panic mode: 50 %.
pub const DEFAULT_MIN_HEALTHY_PERCENT: u8 = 50;
/// Default slow-start ramp: 10 s.
pub const DEFAULT_SLOW_START: Duration = Duration::from_secs(10);

/// How one service (or, as the registry default, every service) is balanced.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadBalancerConfig {
    /// Selection strategy. Default: [`StrategyKind::Adaptive`].
    pub strategy: StrategyKind,
    /// Active health check period; used by the server's checker. Default 5 s.
    pub health_check_interval: Duration,
    /// Active health check timeout; must not exceed the interval. Default 1 s.
    pub health_check_timeout: Duration,
    /// Consecutive failures that open the breaker (≥ 1). Default 3.
    pub error_threshold: u32,
    /// Consecutive successes in half-open that close the breaker (≥ 1). Default 2.
    pub recovery_threshold: u32,
    /// Below this share of eligible instances the service panics and selects
    /// across all instances (0..=100; 0 disables panic mode). Default 50.
    pub min_healthy_percent: u8,
    /// Slow-start ramp for new and recovered instances; zero disables it.
    /// Default 10 s.
    pub slow_start: Duration,
    /// Whether the server exports metrics for this service. Default true.
    pub metrics_enabled: bool,
    /// Circuit breaker details. See [`BreakerConfig`].
    pub breaker: BreakerConfig,
}

/// The circuit breaker's knobs beyond the two thresholds above.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Failure rate (0 < r ≤ 1) over `failure_rate_window` that opens the
    /// breaker once `failure_rate_min_requests` were seen. Default 0.5.
    pub failure_rate_threshold: f64,
    /// Length of the failure-rate window. Default 10 s.
    pub failure_rate_window: Duration,
    /// Minimum requests in the window before the rate may trip. Default 20.
    pub failure_rate_min_requests: u32,
    /// Open window after the first trip; doubles on every further trip.
    /// Default 5 s.
    pub open_base: Duration,
    /// Cap on the open window. Default 120 s.
    pub open_max: Duration,
    /// Jitter: the window is shortened by a uniform fraction in
    /// `[0, open_jitter)`, so it never exceeds the cap and trips of many
    /// instances spread out. In `0.0..1.0`. Default 0.2.
    pub open_jitter: f64,
    /// Probes admitted at once while half-open (≥ 1). Default 1.
    pub half_open_max_probes: u32,
}

// === impl LoadBalancerConfig ===

impl Default for LoadBalancerConfig {
    fn default() -> Self {
        Self {
            strategy: StrategyKind::Adaptive,
            health_check_interval: DEFAULT_HEALTH_CHECK_INTERVAL,
            health_check_timeout: DEFAULT_HEALTH_CHECK_TIMEOUT,
            error_threshold: DEFAULT_ERROR_THRESHOLD,
            recovery_threshold: DEFAULT_RECOVERY_THRESHOLD,
            min_healthy_percent: DEFAULT_MIN_HEALTHY_PERCENT,
            slow_start: DEFAULT_SLOW_START,
            metrics_enabled: true,
            breaker: BreakerConfig::default(),
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        reason: reason.into(),
    }
}

impl LoadBalancerConfig {
    /// Checks every field; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.health_check_interval.is_zero() {
            return Err(invalid("health_check.interval", "must be greater than 0"));
        }
        if self.health_check_timeout.is_zero() {
            return Err(invalid("health_check.timeout", "must be greater than 0"));
        }
        if self.health_check_timeout > self.health_check_interval {
            return Err(invalid(
                "health_check.timeout",
                format!(
                    "{:?} is longer than the interval {:?}",
                    self.health_check_timeout, self.health_check_interval
                ),
            ));
        }
        if !(1..=1000).contains(&self.error_threshold) {
            return Err(invalid(
                "error_threshold",
                format!("must be in 1..=1000, got {}", self.error_threshold),
            ));
        }
        if !(1..=1000).contains(&self.recovery_threshold) {
            return Err(invalid(
                "recovery_threshold",
                format!("must be in 1..=1000, got {}", self.recovery_threshold),
            ));
        }
        if self.min_healthy_percent > 100 {
            return Err(invalid(
                "min_healthy_percent",
                format!("must be in 0..=100, got {}", self.min_healthy_percent),
            ));
        }
        self.breaker.validate()
    }
}

// === impl BreakerConfig ===

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_rate_threshold: 0.5,
            failure_rate_window: Duration::from_secs(10),
            failure_rate_min_requests: 20,
            open_base: Duration::from_secs(5),
            open_max: Duration::from_secs(120),
            open_jitter: 0.2,
            half_open_max_probes: 1,
        }
    }
}

impl BreakerConfig {
    /// Checks every field; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = self.failure_rate_threshold;
        if !(r.is_finite() && r > 0.0 && r <= 1.0) {
            return Err(invalid(
                "failure_rate_threshold",
                format!("must be in (0, 1], got {r}"),
            ));
        }
        if self.failure_rate_window.is_zero() {
            return Err(invalid("failure_rate_window", "must be greater than 0"));
        }
        if self.open_base.is_zero() {
            return Err(invalid("open_base", "must be greater than 0"));
        }
        if self.open_max < self.open_base {
            return Err(invalid(
                "open_max",
                format!(
                    "{:?} is shorter than open_base {:?}",
                    self.open_max, self.open_base
                ),
            ));
        }
        let j = self.open_jitter;
        if !(j.is_finite() && (0.0..1.0).contains(&j)) {
            return Err(invalid(
                "open_jitter",
                format!("must be in [0, 1), got {j}"),
            ));
        }
        if self.half_open_max_probes == 0 {
            return Err(invalid("half_open_max_probes", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_spec_and_validate() {
        let c = LoadBalancerConfig::default();
        assert_eq!(c.health_check_interval, Duration::from_secs(5));
        assert_eq!(c.health_check_timeout, Duration::from_secs(1));
        assert_eq!(c.error_threshold, 3);
        assert_eq!(c.recovery_threshold, 2);
        assert_eq!(c.min_healthy_percent, 50);
        assert_eq!(c.slow_start, Duration::from_secs(10));
        assert_eq!(c.strategy, StrategyKind::Adaptive);
        assert!(c.metrics_enabled);
        c.validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = Box<dyn Fn(&mut LoadBalancerConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("error_threshold", Box::new(|c| c.error_threshold = 0)),
            ("recovery_threshold", Box::new(|c| c.recovery_threshold = 0)),
            (
                "min_healthy_percent",
                Box::new(|c| c.min_healthy_percent = 101),
            ),
            (
                "health_check.timeout",
                Box::new(|c| c.health_check_timeout = Duration::from_secs(6)),
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
        ];
        for (field, mutate) in cases {
            let mut c = LoadBalancerConfig::default();
            mutate(&mut c);
            let err = c.validate().expect_err(field);
            assert_eq!(err.field, field, "{err}");
        }
    }
}
