//! Peak-EWMA latency, as in Finagle and Linkerd: the estimate jumps up to any
//! sample above it at once (peak sensitivity) and otherwise moves toward new
//! samples with an exponential, time-based weight, `τ` = [`DECAY`] (10 s).
//!
//! ## Rule
//!
//! For a sample `rtt` at `now`, with `e` the estimate last updated at `t`:
//! `w = exp(−(now − t)/τ)`; if `rtt > e` then `e ← rtt`, else
//! `e ← e·w + rtt·(1 − w)`. Reads decay the estimate toward zero with the
//! same `w`, so an instance that has not been used for a while is tried again
//! rather than being shunned forever for one old slow response.
//!
//! A new instance starts at [`DEFAULT_RTT`] so that it is neither swamped nor
//! starved before its first response.

use std::time::Duration;

use crate::clock::Timestamp;

/// Decay time constant: 10 s (Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// Estimate for an instance with no samples yet: 30 ms (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// A peak-EWMA latency estimate in nanoseconds (the `peak_ewma` strategy
/// is [`strategy::PeakEwma`](crate::strategy::PeakEwma)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyEwma {
    estimate_ns: f64,
    at: Timestamp,
    samples: u64,
}

impl LatencyEwma {
    /// A fresh estimate of [`DEFAULT_RTT`] as of `now`.
    pub fn new(now: Timestamp) -> Self {
        Self {
            estimate_ns: DEFAULT_RTT.as_nanos() as f64,
            at: now,
            samples: 0,
        }
    }

    /// Adds a latency sample observed at `now`.
    pub fn observe(&mut self, rtt: Duration, now: Timestamp) {
        let rtt = rtt.as_nanos() as f64;
        let w = decay_weight(self.at, now);
        self.estimate_ns = if rtt > self.estimate_ns {
            rtt
        } else {
            self.estimate_ns * w + rtt * (1.0 - w)
        };
        self.at = now;
        self.samples += 1;
    }

    /// The estimate in nanoseconds, decayed to `now`.
    pub fn get_at(&self, now: Timestamp) -> f64 {
        self.estimate_ns * decay_weight(self.at, now)
    }

    /// The estimate as of the last sample, undecayed (for reporting).
    pub fn last_estimate_ns(&self) -> f64 {
        self.estimate_ns
    }

    /// When the estimate was last updated.
    pub fn updated_at(&self) -> Timestamp {
        self.at
    }

    /// Number of samples seen.
    pub fn samples(&self) -> u64 {
        self.samples
    }
}

/// `exp(−(now − at)/τ)`.
pub fn decay_weight(at: Timestamp, now: Timestamp) -> f64 {
    let dt = now.saturating_since(at).as_secs_f64();
    (-dt / DECAY.as_secs_f64()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_jump_and_lows_decay_in() {
        let t0 = Timestamp::from_nanos(1_000_000_000);
        let mut e = LatencyEwma::new(t0);
        e.observe(Duration::from_millis(100), t0);
        assert_eq!(e.get_at(t0), 100e6, "a peak is taken at once");
        let t1 = t0 + Duration::from_secs(10);
        e.observe(Duration::from_millis(10), t1);
        let w = (-1.0f64).exp();
        let expect = 100e6 * w + 10e6 * (1.0 - w);
        assert!((e.get_at(t1) - expect).abs() < 1.0);
        // Reads decay toward zero.
        let t2 = t1 + Duration::from_secs(10);
        assert!((e.get_at(t2) - expect * w).abs() < 1.0);
        assert_eq!(e.samples(), 2);
    }
}
