//! Error types of the core, one enum per kind of failure.
//!
//! Every error names what was wrong (the field, the value, the service or
//! instance) so the server can hand it to an operator unchanged. Returning an
//! error always means nothing was changed.

use thiserror::Error;

/// A value given for an instance's description is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InstanceError {
    /// The instance id is empty.
    #[error("instance id must not be empty")]
    EmptyId,
    /// The instance id is longer than [`crate::instance::MAX_ID_LEN`] bytes.
    #[error("instance id is {0} bytes long; the limit is {max}", max = crate::instance::MAX_ID_LEN)]
    IdTooLong(usize),
    /// The instance id has a character outside [`crate::instance::ID_CHARS`].
    #[error("instance id has {found:?} at byte {at}; allowed are {allowed}", allowed = crate::instance::ID_CHARS)]
    IdBadChar {
        /// The offending character.
        found: char,
        /// Its byte offset in the id.
        at: usize,
    },
    /// The instance id is `.` or contains `..`, which would read as a path
    /// step where ids become key segments.
    #[error("instance id {0:?} is or contains a '.'/'..' path step")]
    IdDotSegment(String),
    /// The address is empty.
    #[error("address must not be empty")]
    EmptyAddress,
    /// Port 0 cannot be connected to.
    #[error("port must be in 1..=65535, got 0")]
    ZeroPort,
    /// Weight outside `1..=1000`.
    #[error("weight must be in 1..=1000, got {0}")]
    InvalidWeight(u64),
}

impl InstanceError {
    /// The description field at fault (`id`, `address`, `port`, `weight`),
    /// so every entry point reports it under the same key.
    pub fn field(&self) -> &'static str {
        match self {
            InstanceError::EmptyId
            | InstanceError::IdTooLong(_)
            | InstanceError::IdBadChar { .. }
            | InstanceError::IdDotSegment(_) => "id",
            InstanceError::EmptyAddress => "address",
            InstanceError::ZeroPort => "port",
            InstanceError::InvalidWeight(_) => "weight",
        }
    }
}

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

/// An operation on the [`Registry`](crate::Registry) was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RegistryError {
    /// No service by that name is registered.
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// The service exists but has no instance with that id.
    #[error("unknown instance {instance:?} in service {service:?}")]
    UnknownInstance {
        /// The service name.
        service: String,
        /// The instance id that was not found.
        instance: String,
    },
    /// The service name is empty.
    #[error("service name must not be empty")]
    EmptyServiceName,
    /// An instance description was invalid.
    #[error(transparent)]
    Instance(#[from] InstanceError),
    /// A health score was invalid.
    #[error(transparent)]
    HealthScore(#[from] HealthScoreError),
    /// A configuration was invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}
