//! Slow start: a new or recovered instance ramps its effective weight
//! linearly from 0 to its full weight over the service's `slow_start`
//! window (default 10 s), instead of receiving a full share at once.
//!
//! ## Rule
//!
//! `factor(t) = clamp((t − began) / slow_start, 0, 1)`, so at 25 % of the
//! window the instance carries 25 % of its weight. The ramp (re)starts when
//! an instance joins a service that already has members, when its breaker
//! closes after a trip, and when an operator raises its health score from 0.
//! Instances present when a service is first populated start at full weight,
//! as in Envoy: there is no established peer to protect them from.
//!
//! *Why linear:* it is predictable for operators (HAProxy's `slowstart`,
//! Envoy's default aggression 1.0) and enough to warm caches and JITs.
//!
//! Slow start changes *effective weight*, so it steers every strategy that
//! reads it: `weighted`, `weighted_random`, `p2c`, `peak_ewma`, `adaptive`,
//! `least_connections` (load per effective weight) and `round_robin` (each
//! instance admitted in proportion to its factor); only `random` and
//! `consistent_hash` ignore it.

use std::time::Duration;

use crate::clock::Timestamp;

/// The slow-start factor in `[0, 1]` at `now` for a ramp that began at
/// `began` (`None`: no ramp, factor 1) and lasts `window`.
pub fn factor(began: Option<Timestamp>, now: Timestamp, window: Duration) -> f64 {
    let Some(began) = began else { return 1.0 };
    if window.is_zero() {
        return 1.0;
    }
    let elapsed = now.saturating_since(began).as_secs_f64();
    (elapsed / window.as_secs_f64()).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_is_linear_and_ends_at_one() {
        let began = Timestamp::from_nanos(5_000_000_000);
        let w = Duration::from_secs(10);
        for (pct, expect) in [(0u64, 0.0), (25, 0.25), (50, 0.5), (100, 1.0), (150, 1.0)] {
            let now = began + Duration::from_millis(pct * 100);
            assert!(
                (factor(Some(began), now, w) - expect).abs() < 1e-9,
                "{pct}%"
            );
        }
        assert_eq!(factor(None, began, w), 1.0);
        assert_eq!(factor(Some(began), began, Duration::ZERO), 1.0);
    }
}
