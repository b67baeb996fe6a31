//! The latency estimate of an instance: an EWMA, time-based as in Finagle's
//! and Linkerd's peak-EWMA, but in the log domain and over the *floors* of
//! short windows of samples, so that the proxy's own stalls do not count as
//! the instance's latency.
//!
//! ## Rule
//!
//! The estimate `e` moves toward a value `x` by `ln e ← ln e·w + ln x·(1 − w)`
//! with `w = exp(−Δt/τ)`, `τ` = [`TAU`] (1 s) and `Δt` the time since `e`
//! last moved: a geometric, time-based EWMA, so a burst of samples at one
//! instant counts as one instant and a value 100× off moves `e` no more in
//! ratio than one 2× off does in difference.
//!
//! - **down, at once**: a sample `rtt < e` moves `e` toward `rtt`.
//! - **up, by the floor of a window**: samples are grouped into windows of
//!   [`WINDOW`] (200 ms; a window opens at a sample when none is open and
//!   closes at the first sample [`WINDOW`] or more after it opened). When a
//!   window closes, if its floor (its least sample) is above `e`, `e` moves
//!   toward the floor (`Δt` up to the window's last sample).
//! - **reads** decay toward zero: `e·exp(−(now − s)/τ_read)`, `τ_read` =
//!   [`DECAY`] (10 s, Linkerd's), `s` the last sample's time, so an instance
//!   that has not been used for a while looks cheaper and is tried again
//!   (the `peak_ewma` strategy adds a bounded probe rate on top; see its
//!   module doc, "Exploration").
//!
//! A new instance starts at [`DEFAULT_RTT`] so that it is neither swamped nor
//! starved before its first response.
//!
//! ## Why window floors, and why not a peak
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
//! RTT against queueing noise.
//!
//! A proxy starved of CPU (5 % of a core in the issue-12 bench, stalls of
//! 0.3–1 s) still sees windows in which *every* sample is stalled: taken
//! whole, as Linkerd takes a peak, one such floor kept a fast instance's
//! estimate near the stall for seconds, and the 50 ms instance still got
//! 0.5–4 % of the requests. In the log domain such a floor moves the
//! estimate by a bounded ratio (a 300 ms floor 300 ms after the last move
//! takes 1 ms to 4.4 ms, still a tenth of a 50 ms instance), and the next
//! clean samples take most of it back within a second.
//!
//! A real slowdown raises every window's floor: a 50× slowdown is 2× after
//! one window and 3.6× after two (0.4 s), past `peak_ewma`'s avoidance
//! ratio (3×); a 10× slowdown passes it after four windows (0.8 s). The
//! price of the floor: an instance whose own answers are *sometimes* slow
//! is judged by its typical latency, not by its worst one; its slow answers
//! still weigh through the cost's active-request count while in flight.
//!
//! ## Why `τ` = 1 s
//!
//! Recovery. A probe a second apart moves `ln e` by `1 − e⁻¹` = 63 % of the
//! way: an instance that was 50× slower and now answers like its peers is
//! at 4.2× after one probe and 1.7× after two, back under `peak_ewma`'s
//! 3×. With Linkerd's 10 s it would take twenty.

use std::time::Duration;

use crate::clock::{OptionalTimestamp, Timestamp};

/// Read decay time constant: 10 s (Linkerd's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// Time constant of the estimate's moves, both ways: 1 s (module doc).
pub const TAU: Duration = Duration::from_secs(1);
/// Window whose least sample may raise the estimate: 200 ms (module doc:
/// long enough that some sample escapes the stalls of a proxy short of CPU,
/// short enough that a real slowdown counts within a fraction of a second).
pub const WINDOW: Duration = Duration::from_millis(200);
/// Estimate for an instance with no samples yet: 30 ms (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// A latency estimate in nanoseconds (module doc; the `peak_ewma` strategy
/// is [`strategy::PeakEwma`](crate::strategy::PeakEwma)).
///
/// 48 bytes, one of 100,000 at scale: the open window is its opening time
/// and its floor, with no `Option` around them (every sample leaves a
/// window open) and no time of its last sample, which is always the
/// estimate's last sample (`sampled_at`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyEwma {
    estimate_ns: f64,
    /// When the estimate last moved (the fall's `t`).
    moved_at: Timestamp,
    /// When the last sample came (or creation): reads decay from here. The
    /// open window's last sample came then too.
    sampled_at: Timestamp,
    /// When the open window opened; none before the first sample.
    window_opened: OptionalTimestamp,
    /// The open window's least sample so far.
    window_floor: f64,
    samples: u64,
}

impl LatencyEwma {
    /// A fresh estimate of [`DEFAULT_RTT`] as of `now`.
    pub fn new(now: Timestamp) -> Self {
        Self {
            estimate_ns: DEFAULT_RTT.as_nanos() as f64,
            moved_at: now,
            sampled_at: now,
            window_opened: OptionalTimestamp::NONE,
            window_floor: 0.0,
            samples: 0,
        }
    }

    /// Adds a latency sample observed at `now`.
    pub fn observe(&mut self, rtt: Duration, now: Timestamp) {
        let rtt = rtt.as_nanos() as f64;
        let mut open = self.window_opened.get();
        if let Some(opened) = open {
            if now.saturating_since(opened) >= WINDOW {
                open = None;
                if self.window_floor > self.estimate_ns {
                    // Dated when the floor was known (the window's last
                    // sample), so a lower sample now moves it by the time
                    // since then (a probe a second apart moves it by 63 %,
                    // not by nothing).
                    self.move_toward(self.window_floor, self.sampled_at);
                }
            }
        }
        match open {
            Some(_) => self.window_floor = self.window_floor.min(rtt),
            None => {
                self.window_opened = OptionalTimestamp::some(now);
                self.window_floor = rtt;
            }
        }
        if rtt < self.estimate_ns {
            self.move_toward(rtt, now);
        }
        self.sampled_at = now;
        self.samples += 1;
    }

    /// `ln e ← ln e·w + ln x·(1 − w)`, `w = exp(−(at − moved_at)/τ)`.
    fn move_toward(&mut self, x: f64, at: Timestamp) {
        let w = weight(self.moved_at, at, TAU);
        let ln = self.estimate_ns.max(1.0).ln() * w + x.max(1.0).ln() * (1.0 - w);
        self.estimate_ns = ln.exp();
        self.moved_at = self.moved_at.max(at);
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

    /// `a` moved toward `b` with weight `w` on `a`, in the log domain.
    fn geo(a: f64, b: f64, w: f64) -> f64 {
        (a.ln() * w + b.ln() * (1.0 - w)).exp()
    }

    #[test]
    fn a_lower_sample_pulls_the_estimate_down_by_the_time_since_it_moved() {
        let mut e = LatencyEwma::new(at(0));
        e.observe(Duration::from_millis(10), at(1_000));
        let expect = geo(30.0 * MS, 10.0 * MS, (-1.0f64).exp());
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
    fn a_window_floor_above_moves_it_up_when_the_window_closes() {
        let mut e = LatencyEwma::new(at(0));
        e.observe(Duration::from_millis(100), at(1_000));
        e.observe(Duration::from_millis(120), at(1_100));
        assert_eq!(e.last_estimate_ns(), 30.0 * MS, "the window is open");
        e.observe(Duration::from_millis(100), at(1_200));
        // Toward the floor (100 ms, not the 120 ms peak), by the 1.1 s from
        // creation to the window's last sample.
        let expect = geo(30.0 * MS, 100.0 * MS, (-1.1f64).exp());
        assert!(
            (e.last_estimate_ns() - expect).abs() < 1.0,
            "{} ms, want {} ms",
            e.last_estimate_ns() / MS,
            expect / MS
        );
    }

    #[test]
    fn stalls_that_some_samples_of_each_window_escape_do_not_raise_it() {
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
    }

    #[test]
    fn a_window_of_only_stalled_samples_moves_it_by_a_bounded_ratio() {
        let mut e = LatencyEwma::new(at(0));
        for t in 0..2_000 {
            e.observe(Duration::from_millis(1), at(10 * t));
        }
        // A 300 ms stall; the proxy then handles only the stalled answers
        // before it stalls again.
        for k in 0..64 {
            e.observe(Duration::from_millis(300), at(20_290 + k / 32));
        }
        e.observe(Duration::from_millis(300), at(20_600));
        let after = e.last_estimate_ns() / MS;
        // ln e moves 1 − exp(−0.3) = 26 % of the way: 300^0.26 = 4.4 ms, far
        // under the 50 ms of a really slow instance.
        assert!(after < 4.5, "{after} ms: a stall is not the instance");
        // Clean samples take most of it back within a second (ln e falls
        // by e⁻¹ a second: 4.4 ms → 1.5 ms).
        for t in 0..100 {
            e.observe(Duration::from_millis(1), at(20_610 + 10 * t));
        }
        assert!(
            e.last_estimate_ns() < 1.6 * MS,
            "{}",
            e.last_estimate_ns() / MS
        );
    }

    #[test]
    fn a_real_slowdown_passes_three_times_within_half_a_second() {
        let mut e = LatencyEwma::new(at(0));
        for t in 0..2_000 {
            e.observe(Duration::from_millis(1), at(10 * t));
        }
        let before = e.last_estimate_ns();
        // Every sample 50 ms from 20 s on, one every 10 ms.
        let mut t = 20_000;
        while t <= 20_500 {
            e.observe(Duration::from_millis(50), at(t));
            t += 10;
        }
        assert!(
            e.last_estimate_ns() >= 3.0 * before,
            "{} ms after 0.5 s of 50 ms answers",
            e.last_estimate_ns() / MS
        );
        while t <= 25_000 {
            e.observe(Duration::from_millis(50), at(t));
            t += 10;
        }
        assert!(
            e.last_estimate_ns() > 45.0 * MS,
            "{}",
            e.last_estimate_ns() / MS
        );
    }
}
