//! The latency estimate of an instance: a peak-EWMA, as in Finagle and
//! Linkerd, taken over the *floors* of short windows of samples so that the
//! proxy's own stalls do not count as the instance's latency.
//!
//! ## Rule
//!
//! For a sample `rtt` at `now`, with `e` the estimate, last moved at `t`:
//!
//! - **down, at once**: if `rtt < e`, then `e ← e·w + rtt·(1 − w)` with
//!   `w = exp(−(now − t)/τ_fall)`, `τ_fall` = [`FALL`] (1 s): a time-based
//!   EWMA, so a burst of samples at one instant counts as one instant.
//! - **up, by the floor of a window**: samples are grouped into windows of
//!   [`WINDOW`] (200 ms; a window opens at a sample when none is open and
//!   closes at the first sample [`WINDOW`] or more after it opened). When a
//!   window closes, if its floor (its least sample) is above `e`, then
//!   `e ← floor`: a peak is taken whole, not averaged in.
//! - **reads** decay toward zero: `e·exp(−(now − s)/τ)`, `τ` = [`DECAY`]
//!   (10 s, Linkerd's), `s` the last sample's time, so an instance that has
//!   not been used for a while looks cheaper and is tried again (the
//!   `peak_ewma` strategy adds a bounded probe rate on top; see its module
//!   doc, "Exploration").
//!
//! A new instance starts at [`DEFAULT_RTT`] so that it is neither swamped nor
//! starved before its first response.
//!
//! ## Why the floor of a window
//!
//! The proxy measures a request's latency on its own thread, so a sample
//! includes any time the response waited for that thread. When the thread
//! stalls (a busy or preempted core), every sample then in flight grows by
//! the stall: in issue 12's degraded runs, instances answering in
//! microseconds had plain peak-EWMA estimates of 48–68 ms, the 50 ms
//! instance 84–95 ms, and both `adaptive` and `peak_ewma` kept sending it
//! 1–2 % of requests. A stall only ever *adds* to a sample, and it delays
//! the samples in flight during it, not those answered within the proxy's
//! next running slice. So the least sample of a window is the instance's
//! latency without the proxy's stalls, as TCP BBR keeps a windowed minimum
//! RTT against queueing noise. A real slowdown raises every sample of a
//! window and is taken when that window closes: within 200 ms plus the gap
//! to the instance's next sample.
//!
//! The price: an instance whose own answers are *sometimes* slow is judged
//! by its typical latency, not by its worst one. Its slow answers still
//! weigh through the cost's active-request count while they are in flight.
//!
//! ## Why `τ_fall` = 1 s
//!
//! Recovery. An instance that was `k×` slower than its peers and now
//! answers like them falls to `1 + (k − 1)·exp(−t/τ_fall)` times their
//! latency after `t` seconds of samples (a sample taken `Δt` after the last
//! move weighs `1 − exp(−Δt/τ_fall)`: 63 % for `peak_ewma`'s probes, one a
//! second). It is back under `peak_ewma`'s avoidance ratio `R` (3) after
//! `τ_fall·ln((k − 1)/(R − 1))`: 3.2 s for `k` = 50. With Linkerd's 10 s that
//! would be 32 s. Because stalls no longer reach the estimate, the faster
//! fall does not make it noisy.

use std::time::Duration;

use crate::clock::Timestamp;

/// Read decay time constant: 10 s (Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// Time constant of a fall toward lower samples: 1 s (see the module doc).
pub const FALL: Duration = Duration::from_secs(1);
/// Window whose least sample may raise the estimate: 200 ms (module doc:
/// long enough that some sample escapes the stalls of a proxy short of CPU,
/// short enough that a real slowdown counts within a fraction of a second).
pub const WINDOW: Duration = Duration::from_millis(200);
/// Estimate for an instance with no samples yet: 30 ms (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// A latency estimate in nanoseconds (module doc; the `peak_ewma` strategy
/// is [`strategy::PeakEwma`](crate::strategy::PeakEwma)).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyEwma {
    estimate_ns: f64,
    /// When the estimate last moved (the fall's `t`).
    moved_at: Timestamp,
    /// When the last sample came (or creation): reads decay from here.
    sampled_at: Timestamp,
    /// The open window: when it opened, its least sample so far and when
    /// its last sample came.
    window: Option<Window>,
    samples: u64,
}

/// A window of samples (module doc, "Rule").
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    opened: Timestamp,
    floor: f64,
    last: Timestamp,
}

impl LatencyEwma {
    /// A fresh estimate of [`DEFAULT_RTT`] as of `now`.
    pub fn new(now: Timestamp) -> Self {
        Self {
            estimate_ns: DEFAULT_RTT.as_nanos() as f64,
            moved_at: now,
            sampled_at: now,
            window: None,
            samples: 0,
        }
    }

    /// Adds a latency sample observed at `now`.
    pub fn observe(&mut self, rtt: Duration, now: Timestamp) {
        let rtt = rtt.as_nanos() as f64;
        if let Some(w) = self.window {
            if now.saturating_since(w.opened) >= WINDOW {
                self.window = None;
                if w.floor > self.estimate_ns {
                    self.estimate_ns = w.floor;
                    // Dated when the floor was known, so a lower sample now
                    // falls by the time since then (a probe a second apart
                    // moves it by 63 %, not by nothing).
                    self.moved_at = w.last;
                }
            }
        }
        self.window = Some(match self.window {
            Some(w) => Window {
                floor: w.floor.min(rtt),
                last: now,
                ..w
            },
            None => Window {
                opened: now,
                floor: rtt,
                last: now,
            },
        });
        if rtt < self.estimate_ns {
            let w = weight(self.moved_at, now, FALL);
            self.estimate_ns = self.estimate_ns * w + rtt * (1.0 - w);
            self.moved_at = now;
        }
        self.sampled_at = now;
        self.samples += 1;
    }

    /// The estimate in nanoseconds, decayed to `now`.
    pub fn get_at(&self, now: Timestamp) -> f64 {
        self.estimate_ns * decay_weight(self.sampled_at, now)
    }

    /// The estimate as of the last sample, undecayed (for reporting and for
    /// comparing instances with each other).
    pub fn last_estimate_ns(&self) -> f64 {
        self.estimate_ns
    }

    /// When the last sample came (or the estimate was created): reads decay
    /// from here.
    pub fn updated_at(&self) -> Timestamp {
        self.sampled_at
    }

    /// Number of samples seen.
    pub fn samples(&self) -> u64 {
        self.samples
    }
}

/// `exp(−(now − at)/τ)` with `τ` = [`DECAY`]: the read decay.
pub fn decay_weight(at: Timestamp, now: Timestamp) -> f64 {
    weight(at, now, DECAY)
}

/// `exp(−(now − at)/tau)`.
fn weight(at: Timestamp, now: Timestamp, tau: Duration) -> f64 {
    let dt = now.saturating_since(at).as_secs_f64();
    (-dt / tau.as_secs_f64()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: f64 = 1e6;

    fn at(ms: u64) -> Timestamp {
        Timestamp::from_nanos(1_000_000_000 + ms * 1_000_000)
    }

    #[test]
    fn a_lower_sample_pulls_the_estimate_down_by_the_time_since_it_moved() {
        let mut e = LatencyEwma::new(at(0));
        e.observe(Duration::from_millis(10), at(1_000));
        let w = (-1.0f64).exp();
        let expect = 30.0 * MS * w + 10.0 * MS * (1.0 - w);
        assert!((e.last_estimate_ns() - expect).abs() < 1.0);
        // A burst at the same instant moves it no further.
        for _ in 0..100 {
            e.observe(Duration::from_millis(10), at(1_000));
        }
        assert!((e.last_estimate_ns() - expect).abs() < 1.0);
        // Reads decay toward zero from the last sample, with τ = 10 s.
        let read = e.get_at(at(11_000));
        assert!((read - expect * (-1.0f64).exp()).abs() < 1.0, "{read}");
        assert_eq!(e.samples(), 101);
        assert_eq!(e.updated_at(), at(1_000));
    }

    #[test]
    fn a_peak_is_taken_whole_when_its_window_closes() {
        let mut e = LatencyEwma::new(at(0));
        e.observe(Duration::from_millis(100), at(0));
        assert_eq!(e.last_estimate_ns(), 30.0 * MS, "the window is open");
        e.observe(Duration::from_millis(120), at(50));
        e.observe(Duration::from_millis(100), at(200));
        assert_eq!(
            e.last_estimate_ns(),
            100.0 * MS,
            "the window's floor, not its peak"
        );
    }

    #[test]
    fn stalls_that_some_samples_of_each_window_escape_are_not_peaks() {
        let mut e = LatencyEwma::new(at(0));
        for t in 0..2_000 {
            e.observe(Duration::from_millis(1), at(10 * t));
        }
        let settled = e.last_estimate_ns();
        assert!(settled < 1.01 * MS, "{}", settled / MS);
        // For 2 s the proxy stalls 40 ms of every 50: the samples in flight
        // across a stall come back 40 ms late, those answered while it runs
        // stay fast.
        for t in 0..40 {
            let start = 20_000 + 50 * t;
            for k in 0..30 {
                e.observe(Duration::from_millis(40), at(start + k / 10));
            }
            for k in 0..5 {
                e.observe(Duration::from_millis(1), at(start + 5 + k));
            }
        }
        assert!(
            e.last_estimate_ns() <= settled,
            "{} ms after the stalls, {} ms before",
            e.last_estimate_ns() / MS,
            settled / MS
        );
        // A real slowdown: every sample of a window is slow.
        for k in 0..21 {
            e.observe(Duration::from_millis(40), at(23_000 + 10 * k));
        }
        assert_eq!(e.last_estimate_ns(), 40.0 * MS);
    }
}
