//! `adaptive`, the default: uses `weighted`, `p2c` or `peak_ewma`, whichever
//! suits the load the service sees, and says which and why.
//!
//! ## Signals (evaluated at most once per second, from O(1) state)
//!
//! - **latency spread**: slowest ÷ median latency estimate over up to 32
//!   randomly sampled instances, not draining, whose estimate took a
//!   sample within the last 30 s (an instance nobody sends to any more
//!   drops out, so its old estimate cannot hold `peak_ewma` on forever; one
//!   that `peak_ewma` avoids is still probed once a second and stays in, and
//!   so does one whose breaker is open for a few seconds: it is coming
//!   back, and the spread must still be known when it does). The estimates are taken over window floors
//!   ([`ewma`](crate::ewma)), so a stall of the proxy's own thread, which
//!   inflates every instance in flight alike, does not shrink the spread:
//!   before, the fast instances' estimates held the stalls' peaks and a 50×
//!   slower instance showed a spread of 1.4–1.7×, under the 2× threshold,
//!   and `adaptive` stayed in `p2c` (issue 12);
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
//! threshold does not make it flap.
//!
//! ## When: an evaluation is due, and no pick reads the clock to see it
//!
//! An evaluation is due `eval_interval` (1 s) after the last one began. A
//! pick does not read the clock to find out: it compares the due time with
//! the service's *latest clock reading* ([`PickContext::latest`]), one
//! relaxed load of a line written at most once a millisecond. Every read
//! of the service's clock moves that reading forward: each recorded
//! outcome (`Selection::success` / `failure`), `Registry::maintain`, a
//! registration, a pick that needed the time for another rule. The first
//! pick that finds the evaluation due takes the lock (`try_lock`: a pick
//! that finds it taken does not wait), reads the clock once, evaluates at
//! that time, and sets the next due time from it, so evaluations stay at
//! least `eval_interval` apart and the dwell is measured on the clock
//! itself. An evaluation therefore runs at most about a millisecond late
//! while requests complete, and at most 100 ms late under the server,
//! which calls `Registry::maintain` every 100 ms whatever the traffic. A
//! service whose clock nobody reads (no outcomes recorded, no `maintain`)
//! is not evaluated: call `maintain` as the registry asks.
//!
//! *Why:* reading the clock on every pick to compare it with the due time
//! was one vDSO `clock_gettime` (about 100 instructions) per request: the
//! proxy's profile put the vDSO clock at 0.84 % of its CPU, the core's
//! pick being one of its 6.6 reads a request (`docs/benchmarks.md`), and
//! issue 12 asks for no clock read on a pick that does not need one.
//! Only the evaluation needs the time: the pick of the mode in use reads
//! the clock only where that strategy's own rules do (see the `strategy`
//! module doc).
//!
//! In `peak_ewma` mode the exploration rule of
//! [`peak_ewma`](super::peak_ewma) applies: an instance 3× or more slower
//! than its pair peer gets one probe a second (under 0.1 % of the requests
//! from 1,000 req/s) and is back under 3× within about 2 s of answering
//! like its peers again; the spread then falls below 1.5× and, after the
//! dwell, `adaptive` returns to calm.
//!
//! The numbers above are the defaults; an operator tunes them per service
//! with [`AdaptiveConfig`] (`[service.NAME.adaptive]` in the server's file).
//! [`AdaptiveConfig::validate`] refuses a set that would break the rule:
//! a leave threshold above its enter threshold (the trigger would turn off
//! while still on, and flap), a spread threshold of 1.0 or below (the
//! spread is never below 1.0, so `peak_ewma` would never be let go), an
//! error rate outside (0, 1], a zero evaluation interval (every pick would
//! take the lock), and a dwell shorter than the interval (the strategy only
//! changes at an evaluation, so such a dwell could not be honoured). A new
//! config on a running service keeps the current mode and triggers; the new
//! thresholds apply from the next evaluation. Every change is reported as an
//! [`Event::StrategySwitch`](crate::Event::StrategySwitch) with the deciding
//! signal and its value (the pick hands a [`Switch`] to its service, which
//! turns it into the event).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use super::{
    LoadBalancerConfig, P2c, PeakEwma, PickContext, Picked, Strategy, StrategyKind, Switch,
    Weighted,
};
use crate::clock::Timestamp;
use crate::error::ConfigError;
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
/// read-decay constants (30 s). `peak_ewma` probes an instance it avoids
/// once a second, so only instances nothing is sent to drop out.
const SAMPLE_MAX_AGE: Duration = Duration::from_secs(30);
/// Instances sampled for the latency spread.
const SPREAD_SAMPLE: usize = 32;
/// Outcomes needed in a period to judge the error rate.
const MIN_OUTCOMES: u64 = 20;

/// The thresholds and periods of `adaptive`'s rule (see the module doc).
/// Defaults are the constants above.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// How often the signals are evaluated. Default [`EVAL_INTERVAL`].
    pub eval_interval: Duration,
    /// Shortest time between two strategy changes. Default [`MIN_DWELL`].
    pub min_dwell: Duration,
    /// Latency spread that turns `peak_ewma` on. Default [`SPREAD_ENTER`].
    pub spread_enter: f64,
    /// Latency spread below which `peak_ewma` is let go. Default [`SPREAD_LEAVE`].
    pub spread_leave: f64,
    /// Error rate that turns `p2c` on. Default [`ERROR_ENTER`].
    pub error_rate_enter: f64,
    /// Error rate below which `p2c` is let go. Default [`ERROR_LEAVE`].
    pub error_rate_leave: f64,
    /// In-flight requests per instance that turn `p2c` on. Default
    /// [`CONCURRENCY_ENTER`].
    pub concurrency_enter: f64,
    /// In-flight requests per instance below which `p2c` is let go. Default
    /// [`CONCURRENCY_LEAVE`].
    pub concurrency_leave: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            eval_interval: EVAL_INTERVAL,
            min_dwell: MIN_DWELL,
            spread_enter: SPREAD_ENTER,
            spread_leave: SPREAD_LEAVE,
            error_rate_enter: ERROR_ENTER,
            error_rate_leave: ERROR_LEAVE,
            concurrency_enter: CONCURRENCY_ENTER,
            concurrency_leave: CONCURRENCY_LEAVE,
        }
    }
}

impl AdaptiveConfig {
    /// Checks every field (the rule and why are in the module doc); the
    /// error names the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.problems().into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every bad field, each named by its key (the same names as the
    /// server's `[service.NAME.adaptive]` keys), so a file can report them all.
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut out = Vec::new();
        if self.eval_interval.is_zero() {
            out.push(ConfigError::new("eval_interval", "must be greater than 0"));
        } else if self.min_dwell < self.eval_interval {
            out.push(ConfigError::new(
                "min_dwell",
                format!(
                    "{:?} is shorter than eval_interval {:?}",
                    self.min_dwell, self.eval_interval
                ),
            ));
        }
        let pairs = [
            (
                ("spread_enter", self.spread_enter),
                ("spread_leave", self.spread_leave),
                (1.0, f64::INFINITY),
            ),
            (
                ("error_rate_enter", self.error_rate_enter),
                ("error_rate_leave", self.error_rate_leave),
                (0.0, 1.0),
            ),
            (
                ("concurrency_enter", self.concurrency_enter),
                ("concurrency_leave", self.concurrency_leave),
                (0.0, f64::INFINITY),
            ),
        ];
        for ((enter_key, enter), (leave_key, leave), (lo, hi)) in pairs {
            let mut in_range = true;
            for (key, v) in [(enter_key, enter), (leave_key, leave)] {
                if !(v.is_finite() && v > lo && v <= hi) {
                    in_range = false;
                    let range = if hi.is_finite() {
                        format!("in ({lo}, {hi}]")
                    } else {
                        format!("greater than {lo}")
                    };
                    out.push(ConfigError::new(key, format!("must be {range}, got {v}")));
                }
            }
            if in_range && leave > enter {
                out.push(ConfigError::new(
                    leave_key,
                    format!("{leave} is above {enter_key} {enter}"),
                ));
            }
        }
        out
    }
}

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
    config: AdaptiveConfig,
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
        Self::new(AdaptiveConfig::default())
    }
}

impl Adaptive {
    /// A fresh `adaptive` (calm: `weighted`) following `config`'s rule.
    pub fn new(config: AdaptiveConfig) -> Self {
        Self {
            weighted: Weighted::default(),
            p2c: P2c,
            peak_ewma: PeakEwma,
            mode: AtomicU8::new(0),
            next_eval: AtomicU64::new(0),
            state: Mutex::new(State {
                config,
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
            // Only instances with a recent sample, so an old estimate cannot
            // keep `peak_ewma` on forever. Not only closed ones: a slow
            // instance whose breaker opens for a few seconds (its checks
            // time out) is coming back, and if it left the sample `adaptive`
            // would turn calm and hand it a full share on its return, for
            // the whole dwell (issue 12's bench: 2.5 % in such a round).
            let recent = cx.now().saturating_since(m.latency_updated_at()) < SAMPLE_MAX_AGE;
            if recent && m.requests() > 0 && !m.is_draining() {
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

    /// The evaluation, by the one pick that takes the lock; at its own
    /// time (the one clock read), from which the next one is due.
    #[cold]
    #[inline(never)]
    fn evaluate_if_due(&self, cx: &mut PickContext<'_>) {
        let Some(mut st) = self.state.try_lock() else {
            return; // another pick is evaluating
        };
        let now = cx.now();
        if now.as_nanos() >= self.next_eval.load(Ordering::Relaxed) {
            self.next_eval.store(
                (now + st.config.eval_interval).as_nanos(),
                Ordering::Relaxed,
            );
            self.evaluate(&mut st, cx);
        }
    }

    fn evaluate(&self, st: &mut State, cx: &mut PickContext<'_>) {
        let s = self.measure(st, cx);
        let c = st.config;
        st.signals = s;
        trigger(
            &mut st.spread_high,
            s.latency_spread,
            c.spread_enter,
            c.spread_leave,
        );
        trigger(
            &mut st.errors_high,
            s.error_rate,
            c.error_rate_enter,
            c.error_rate_leave,
        );
        trigger(
            &mut st.concurrency_high,
            s.concurrency,
            c.concurrency_enter,
            c.concurrency_leave,
        );
        let (want, reason) = if st.spread_high {
            (
                StrategyKind::PeakEwma,
                format!(
                    "latency spread {:.2}x (on at {}x, off below {}x)",
                    s.latency_spread, c.spread_enter, c.spread_leave
                ),
            )
        } else if st.errors_high {
            (
                StrategyKind::P2c,
                format!(
                    "error rate {:.1}% (on at {}%, off below {}%)",
                    s.error_rate * 100.0,
                    c.error_rate_enter * 100.0,
                    c.error_rate_leave * 100.0
                ),
            )
        } else if st.concurrency_high {
            (
                StrategyKind::P2c,
                format!(
                    "{:.2} requests in flight per instance (on at {}, off below {})",
                    s.concurrency, c.concurrency_enter, c.concurrency_leave
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
            .is_none_or(|since| cx.now().saturating_since(since) >= c.min_dwell);
        if !dwelt {
            return;
        }
        let from = st.mode;
        st.mode = want;
        st.since = Some(cx.now());
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

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Picked> {
        // The service's latest clock reading, not the clock (module doc,
        // "When"): a pick with no evaluation due reads no clock.
        if cx.latest().as_nanos() >= self.next_eval.load(Ordering::Relaxed) {
            self.evaluate_if_due(cx);
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

    /// Takes `config.adaptive` for the next evaluation; the mode, its dwell
    /// and the triggers stay as they are.
    fn reconfigure(&self, config: &LoadBalancerConfig) {
        let mut st = self.state.lock();
        if st.config != config.adaptive {
            st.config = config.adaptive;
            // A shorter interval applies at once rather than after the old one.
            self.next_eval.store(0, Ordering::Relaxed);
        }
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
