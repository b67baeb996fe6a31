//! The core's leaf error types: [`ConfigError`] and [`HealthScoreError`].
//! [`InstanceError`](crate::InstanceError) lives with the rules it reports
//! in [`instance`](crate::instance), and
//! [`RegistryError`](crate::RegistryError), which wraps them all, in
//! [`registry`](crate::registry); so this module imports nothing and every
//! module may use it.
//!
//! Every error names what was wrong (the field, the value, the service or
//! instance) so the server can hand it to an operator unchanged. Returning an
//! error always means nothing was changed.

use thiserror::Error;

/// A health score outside `0.0..=1.0`, or not a number.
#[derive(Debug, Clone, Copy, PartialEq, Error)]
pub enum HealthScoreError {
    /// NaN or an infinity.
    #[error("health_score must be a finite number, got {0}")]
    NotFinite(f64),
    /// Finite but outside `0.0..=1.0`.
    #[error("health_score must be in 0.0..=1.0, got {0}")]
    OutOfRange(f64),
}

/// A configuration value is invalid; `field` is the config key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// The config key, as written in the config file (`error_threshold`).
    pub field: &'static str,
    /// Why the value was rejected.
    pub reason: String,
}

impl ConfigError {
    /// An error for `field` with `reason`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}
