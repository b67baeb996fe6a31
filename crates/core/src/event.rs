//! State changes reported back to the caller as values.
//!
//! The core does no logging and keeps no metrics. Every call that can change
//! what an operator cares about — an outcome, a pick, a health update, a
//! drain — returns the [`Event`]s it caused, and the server turns each into
//! one structured log line and a metric increment.

use std::sync::Arc;

use crate::breaker::Transition;
use crate::instance::InstanceId;
use crate::strategy::StrategyKind;

/// Something that changed in a service.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An instance's circuit breaker changed state.
    Breaker {
        /// Service name.
        service: Arc<str>,
        /// Instance id.
        instance: InstanceId,
        /// The change, with its reason.
        transition: Transition,
    },
    /// An instance became eligible for selection, or stopped being.
    Eligibility {
        /// Service name.
        service: Arc<str>,
        /// Instance id.
        instance: InstanceId,
        /// Eligible now?
        eligible: bool,
        /// Why, for the log line.
        reason: &'static str,
    },
    /// The service entered or left panic mode.
    Panic {
        /// Service name.
        service: Arc<str>,
        /// `true` on entering, `false` on leaving.
        entered: bool,
        /// Eligible instances at the time.
        eligible: usize,
        /// Instances counted (registered and not draining).
        total: usize,
    },
    /// The adaptive strategy changed the strategy it uses.
    StrategySwitch {
        /// Service name.
        service: Arc<str>,
        /// Previous mode.
        from: StrategyKind,
        /// New mode.
        to: StrategyKind,
        /// The signal that decided it, with its value.
        reason: String,
    },
    /// A drained instance was removed.
    Removed {
        /// Service name.
        service: Arc<str>,
        /// Instance id.
        instance: InstanceId,
        /// `"drained"` (no connections left) or `"drain timeout"`.
        reason: &'static str,
    },
}
