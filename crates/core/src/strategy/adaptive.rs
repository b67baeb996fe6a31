//! `adaptive`, the default: uses `weighted`, `p2c` or `peak_ewma`, whichever
//! suits the load the service sees, and says which and why.
//!
//! ## Signals (evaluated at most once per second, from O(1) state)
//!
//! - **latency spread**: slowest ÷ median peak-EWMA latency over up to 32
//!   randomly sampled instances whose breaker is closed and whose estimate
//!   took a sample within the last 30 s (an instance that `peak_ewma` has
//!   stopped sending to drops out, so the service returns to calm and the
//!   instance is tried again rather than being avoided forever);
//! - **error rate**: failures ÷ outcomes since the last evaluation (only when
//!   at least 20 outcomes were seen; otherwise the previous verdict stands);
//! - **concurrency**: requests in flight per eligible instance.
//!
//! ## Rule
//!
//! | condition (enter / leave) | strategy | why |
//! | --- | --- | --- |
//! | spread ≥ 2.0× / < 1.5× | `peak_ewma` | some instances are slower: route by expected latency |
//! | error rate ≥ 5 % / < 2 %, or concurrency ≥ 2 / < 1 per instance | `p2c` | requests queue or fail: route by load per effective weight, which health scores lower |
//! | otherwise | `weighted` | calm: smooth, exact shares by effective weight (a plain rotation when weights are equal) |
//!
//! The first matching row wins. Each signal is a Schmitt trigger — it turns
//! on at the enter threshold and off only below the lower leave threshold —
//! and the strategy changes at most once per 5 s, so noise around a
//! threshold does not make it flap. Every change is reported as an
//! [`Event::StrategySwitch`](crate::Event::StrategySwitch) with the deciding
//! signal and its value (the pick hands a [`Switch`] to its service, which
//! turns it into the event).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{P2c, PeakEwma, PickContext, Strategy, StrategyKind, Switch, Weighted};
use crate::clock::Timestamp;
use crate::instance::Member;
use crate::members::Members;

/// How often the signals are evaluated.
pub const EVAL_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest time between two strategy changes.
pub const MIN_DWELL: Duration = Duration::from_secs(5);
/// Latency spread that turns `peak_ewma` on / lets it go.
pub const SPREAD_ENTER: f64 = 2.0;
/// See [`SPREAD_ENTER`].
pub const SPREAD_LEAVE: f64 = 1.5;
/// Error rate that turns `p2c` on / lets it go.
pub const ERROR_ENTER: f64 = 0.05;
/// See [`ERROR_ENTER`].
pub const ERROR_LEAVE: f64 = 0.02;
/// In-flight requests per instance that turn `p2c` on / let it go.
pub const CONCURRENCY_ENTER: f64 = 2.0;
/// See [`CONCURRENCY_ENTER`].
pub const CONCURRENCY_LEAVE: f64 = 1.0;
/// Latency estimates older than this are left out of the spread: three
/// decay constants (30 s). `peak_ewma` retries an instance `X` times slower
/// than its peers after `τ·ln X` (23 s for 10×), so only instances it has
/// given up on drop out.
const SAMPLE_MAX_AGE: Duration = Duration::from_secs(30);
/// Instances sampled for the latency spread.
const SPREAD_SAMPLE: usize = 32;
/// Outcomes needed in a period to judge the error rate.
const MIN_OUTCOMES: u64 = 20;

/// Chooses among `weighted`, `p2c` and `peak_ewma` by observed load.
#[derive(Debug)]
pub struct Adaptive {
    weighted: Weighted,
    p2c: P2c,
    peak_ewma: PeakEwma,
    mode: AtomicU8,
    next_eval: AtomicU64,
    state: Mutex<State>,
}

/// What `adaptive` uses now, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveStatus {
    /// The strategy in use.
    pub mode: StrategyKind,
    /// The deciding signal and its value.
    pub reason: String,
    /// The signals at the last evaluation.
    pub signals: Signals,
}

/// The load signals `adaptive` decides on.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Signals {
    /// Slowest ÷ median latency EWMA of sampled instances (1.0 if unknown).
    pub latency_spread: f64,
    /// Failures ÷ outcomes in the last period.
    pub error_rate: f64,
    /// In-flight requests per eligible instance.
    pub concurrency: f64,
}

#[derive(Debug)]
struct State {
    mode: StrategyKind,
    since: Option<Timestamp>,
    reason: String,
    signals: Signals,
    last_requests: u64,
    last_failures: u64,
    spread_high: bool,
    errors_high: bool,
    concurrency_high: bool,
}

const MODES: [StrategyKind; 3] = [
    StrategyKind::Weighted,
    StrategyKind::P2c,
    StrategyKind::PeakEwma,
];

impl Default for Adaptive {
    fn default() -> Self {
        Self {
            weighted: Weighted::default(),
            p2c: P2c,
            peak_ewma: PeakEwma,
            mode: AtomicU8::new(0),
            next_eval: AtomicU64::new(0),
            state: Mutex::new(State {
                mode: StrategyKind::Weighted,
                since: None,
                reason: "no traffic observed yet".to_owned(),
                signals: Signals {
                    latency_spread: 1.0,
                    ..Signals::default()
                },
                last_requests: 0,
                last_failures: 0,
                spread_high: false,
                errors_high: false,
                concurrency_high: false,
            }),
        }
    }
}

/// Updates a Schmitt trigger.
fn trigger(on: &mut bool, value: f64, enter: f64, leave: f64) {
    if *on {
        *on = value >= leave;
    } else {
        *on = value >= enter;
    }
}

impl Adaptive {
    /// The strategy in use now.
    pub fn mode(&self) -> StrategyKind {
        MODES[usize::from(self.mode.load(Ordering::Relaxed)).min(2)]
    }

    fn strategy(&self, kind: StrategyKind) -> &dyn Strategy {
        match kind {
            StrategyKind::P2c => &self.p2c,
            StrategyKind::PeakEwma => &self.peak_ewma,
            _ => &self.weighted,
        }
    }

    fn measure(&self, st: &mut State, cx: &mut PickContext<'_>) -> Signals {
        let requests = cx.stats.requests();
        let failures = cx.stats.failures();
        let (dr, df) = (
            requests.saturating_sub(st.last_requests),
            failures.saturating_sub(st.last_failures),
        );
        let mut signals = st.signals;
        if dr >= MIN_OUTCOMES {
            signals.error_rate = df as f64 / dr as f64;
            st.last_requests = requests;
            st.last_failures = failures;
        }
        let eligible = cx.stats.available().max(1);
        signals.concurrency = cx.stats.in_flight() as f64 / eligible as f64;

        let n = cx.members.len();
        let mut samples: Vec<f64> = Vec::with_capacity(SPREAD_SAMPLE);
        let draws = if n <= SPREAD_SAMPLE { n } else { SPREAD_SAMPLE };
        for j in 0..draws {
            let i = if n <= SPREAD_SAMPLE {
                j
            } else {
                cx.rng.usize(..n)
            };
            let Some(m) = cx.members.get(i) else { continue };
            // Only closed instances with a recent sample: an instance that is
            // out (or avoided) says nothing about the current spread, and
            // letting its old peak count would keep `peak_ewma` on forever.
            let recent = cx.now.saturating_since(m.latency_updated_at()) < SAMPLE_MAX_AGE;
            if recent
                && m.requests() > 0
                && m.circuit_state() == crate::breaker::CircuitState::Closed
                && cx.admits(m)
            {
                samples.push(m.latency_ewma_ns());
            }
        }
        signals.latency_spread = if samples.len() >= 2 {
            samples.sort_by(f64::total_cmp);
            let median = samples[(samples.len() - 1) / 2].max(1.0);
            samples[samples.len() - 1] / median
        } else {
            1.0
        };
        signals
    }

    fn evaluate(&self, st: &mut State, cx: &mut PickContext<'_>) {
        let s = self.measure(st, cx);
        st.signals = s;
        trigger(
            &mut st.spread_high,
            s.latency_spread,
            SPREAD_ENTER,
            SPREAD_LEAVE,
        );
        trigger(&mut st.errors_high, s.error_rate, ERROR_ENTER, ERROR_LEAVE);
        trigger(
            &mut st.concurrency_high,
            s.concurrency,
            CONCURRENCY_ENTER,
            CONCURRENCY_LEAVE,
        );
        let (want, reason) = if st.spread_high {
            (
                StrategyKind::PeakEwma,
                format!(
                    "latency spread {:.2}x (on at {SPREAD_ENTER}x, off below {SPREAD_LEAVE}x)",
                    s.latency_spread
                ),
            )
        } else if st.errors_high {
            (
                StrategyKind::P2c,
                format!(
                    "error rate {:.1}% (on at {:.0}%, off below 2%)",
                    s.error_rate * 100.0,
                    ERROR_ENTER * 100.0
                ),
            )
        } else if st.concurrency_high {
            (
                StrategyKind::P2c,
                format!(
                    "{:.2} requests in flight per instance (on at {CONCURRENCY_ENTER}, off below {CONCURRENCY_LEAVE})",
                    s.concurrency
                ),
            )
        } else {
            (
                StrategyKind::Weighted,
                format!(
                    "calm: latency spread {:.2}x, error rate {:.1}%, {:.2} in flight per instance",
                    s.latency_spread,
                    s.error_rate * 100.0,
                    s.concurrency
                ),
            )
        };
        if want == st.mode {
            st.reason = reason;
            return;
        }
        let dwelt = st
            .since
            .is_none_or(|since| cx.now.saturating_since(since) >= MIN_DWELL);
        if !dwelt {
            return;
        }
        let from = st.mode;
        st.mode = want;
        st.since = Some(cx.now);
        st.reason.clone_from(&reason);
        let idx = MODES.iter().position(|k| *k == want).unwrap_or(0);
        self.mode.store(idx as u8, Ordering::Relaxed);
        *cx.switched = Some(Switch {
            from,
            to: want,
            reason,
        });
    }
}

impl Strategy for Adaptive {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Adaptive
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Arc<Member>> {
        let now = cx.now.as_nanos();
        if now >= self.next_eval.load(Ordering::Relaxed) {
            if let Some(mut st) = self.state.try_lock() {
                if now >= self.next_eval.load(Ordering::Relaxed) {
                    self.next_eval
                        .store((cx.now + EVAL_INTERVAL).as_nanos(), Ordering::Relaxed);
                    self.evaluate(&mut st, cx);
                }
            }
        }
        self.strategy(self.mode()).pick(cx)
    }

    fn prepare(&self, members: &Members, generation: u64, now: Timestamp) {
        if self.mode() == StrategyKind::Weighted {
            self.weighted.prepare(members, generation, now);
        }
    }

    fn maintain(&self, members: &Members, generation: u64, now: Timestamp) {
        if self.mode() == StrategyKind::Weighted {
            self.weighted.maintain(members, generation, now);
        }
    }

    fn effective_kind(&self) -> StrategyKind {
        self.mode()
    }

    fn adaptive_status(&self) -> Option<AdaptiveStatus> {
        let st = self.state.lock();
        Some(AdaptiveStatus {
            mode: st.mode,
            reason: st.reason.clone(),
            signals: st.signals,
        })
    }
}
