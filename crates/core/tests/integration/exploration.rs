//! Issue 12, the degraded scenario: how often `peak_ewma` and `adaptive`
//! still try an instance 50× slower than its peers while the proxy stalls,
//! and how fast they give it its share back once it recovers.
//!
//! A scripted backend on the manual clock, closed loop like `bench/run.sh`:
//! 64 clients, each sends its next request when its last one is answered;
//! instances `i0` and `i1` answer in 0.8–1.2 ms, `i2` in 49–51 ms (until
//! it recovers, then like the others). The proxy does not run all the time,
//! as on the bench's shared core (it got 8–20 % of it): it runs 4 ms, then
//! stalls 8–24 ms (seeded). An answer that comes during a stall is handled
//! when the proxy runs again, so its measured latency includes the stall,
//! and the client's next request is picked only then.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use datapunk_lb_core::{Registry, Selection, StrategyKind};

use crate::support::*;

const CLIENTS: usize = 64;
const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;
const SLOW: &str = "i2";

/// Every pick: when (ns since the start) and whether it went to `SLOW`.
struct Run {
    reg: Registry,
    picks: Vec<(u64, bool)>,
}

impl Run {
    /// The share of picks in `[from, to)` seconds that went to `SLOW`,
    /// and how many picks that was.
    fn slow_share(&self, from: u64, to: u64) -> (f64, usize) {
        let window: Vec<bool> = self
            .picks
            .iter()
            .filter(|(t, _)| (from * SEC..to * SEC).contains(t))
            .map(|(_, slow)| *slow)
            .collect();
        let slow = window.iter().filter(|s| **s).count();
        (slow as f64 / window.len().max(1) as f64, window.len())
    }
}

/// When the proxy runs: `[start, end)` periods of 4 ms, 8–24 ms apart.
struct Schedule {
    runs: Vec<(u64, u64)>,
    next: usize,
}

impl Schedule {
    fn new(until: u64, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (mut runs, mut t) = (Vec::new(), 0);
        while t < until + SEC {
            runs.push((t, t + 4 * MS));
            t += 4 * MS + rng.u64(8 * MS..=24 * MS);
        }
        Self { runs, next: 0 }
    }

    /// When the proxy handles something that happens at `t` (non-decreasing
    /// over calls).
    fn handled_at(&mut self, t: u64) -> u64 {
        while self.runs[self.next].1 <= t {
            self.next += 1;
        }
        t.max(self.runs[self.next].0)
    }
}

/// Runs `secs` seconds of the closed loop under `strategy`; `SLOW` answers
/// in ~50 ms until `recovers_at` seconds (if any), then in ~1 ms.
fn simulate(strategy: StrategyKind, secs: u64, recovers_at: Option<u64>) -> Run {
    let (reg, clock) = registry(strategy);
    populate(&reg, &[1, 1, 1]);
    let mut rng = fastrand::Rng::with_seed(12);
    let mut schedule = Schedule::new(secs * SEC, 34);
    let mut latency = |id: &str, t: u64| {
        let slow = id == SLOW && recovers_at.is_none_or(|r| t < r * SEC);
        let base = if slow { 50 * MS } else { MS };
        base - base / 50 + rng.u64(..=base / 25)
    };
    let mut now = 0;
    let mut picks = Vec::new();
    let mut in_flight: Vec<Option<(Selection, u64)>> = Vec::new();
    let mut answers = BinaryHeap::new();
    let mut send = |slot: usize,
                    t: u64,
                    in_flight: &mut Vec<Option<(Selection, u64)>>,
                    answers: &mut BinaryHeap<Reverse<(u64, usize)>>| {
        let s = reg.get_instance(SVC).expect("an eligible instance");
        let id = s.instance().id().as_str().to_owned();
        picks.push((t, id == SLOW));
        answers.push(Reverse((t + latency(&id, t), slot)));
        in_flight[slot] = Some((s, t));
    };
    for slot in 0..CLIENTS {
        in_flight.push(None);
        send(slot, 0, &mut in_flight, &mut answers);
    }
    while let Some(Reverse((answered, slot))) = answers.pop() {
        let t = schedule.handled_at(answered);
        if t >= secs * SEC {
            break;
        }
        clock.advance(Duration::from_nanos(t - now));
        now = t;
        let (s, sent) = in_flight[slot].take().expect("one request per client");
        let _ = s.success(Duration::from_nanos(t - sent));
        send(slot, t, &mut in_flight, &mut answers);
    }
    Run { reg, picks }
}

fn mode(reg: &Registry) -> StrategyKind {
    reg.service(SVC).unwrap().status().adaptive.unwrap().mode
}

#[test]
fn peak_ewma_sends_under_one_in_a_thousand_to_a_50x_slower_instance_despite_stalls() {
    let run = simulate(StrategyKind::PeakEwma, 12, None);
    let (share, n) = run.slow_share(2, 12);
    eprintln!(
        "peak_ewma: {:.4} % of {n} picks to the 50x slower instance",
        share * 100.0
    );
    // The rule: at most one probe a second, so ≤ 10 of the ~50,000 picks
    // of these 10 s (0.02 %); the bound asserted is the 0.1 %.
    assert!(n > 20_000, "{n} picks: the loop must be busy");
    assert!(
        share < 0.001,
        "{:.3} % of {n} picks went to the 50x slower instance",
        share * 100.0
    );
    assert!(share > 0.0, "it is still probed, so a recovery can be seen");
}

#[test]
fn adaptive_sees_the_real_spread_through_stalls_and_avoids_the_slow_instance() {
    let run = simulate(StrategyKind::Adaptive, 12, None);
    assert_eq!(mode(&run.reg), StrategyKind::PeakEwma);
    let status = run.reg.service(SVC).unwrap().status().adaptive.unwrap();
    // The fast instances' estimates stay near 1 ms through the stalls, so
    // the spread is the real one (~50×), far above the 2× threshold.
    assert!(
        status.signals.latency_spread > 10.0,
        "spread {:.1}x: {status:?}",
        status.signals.latency_spread
    );
    // adaptive starts in `weighted` and switches at its second evaluation
    // (1 s); from then on, peak_ewma's rule.
    let (share, n) = run.slow_share(3, 12);
    eprintln!(
        "adaptive: spread {:.1}x, {:.4} % of {n} picks to the 50x slower instance",
        status.signals.latency_spread,
        share * 100.0
    );
    assert!(
        share < 0.001,
        "{:.3} % of {n} picks went to the 50x slower instance",
        share * 100.0
    );
}

#[test]
fn a_recovered_instance_has_its_third_back_within_six_seconds() {
    for strategy in [StrategyKind::PeakEwma, StrategyKind::Adaptive] {
        let run = simulate(strategy, 20, Some(10));
        let (before, _) = run.slow_share(5, 10);
        assert!(before < 0.001, "{strategy}: {:.3} % before", before * 100.0);
        let per_second: Vec<String> = (10..20)
            .map(|s| format!("{:.1} %", run.slow_share(s, s + 1).0 * 100.0))
            .collect();
        // Seconds 14 and 15 after the start: 4–6 s after the recovery (the
        // first probe after it comes within 1 s; the estimate is back under
        // 3× its peers' after two probes, then falls the rest of the way).
        let (after, n) = run.slow_share(14, 16);
        eprintln!("{strategy}: share to the recovered instance per second from its recovery: {per_second:?}");
        assert!(
            (after - 1.0 / 3.0).abs() < 0.08,
            "{strategy}: {:.1} % of {n} picks 4–6 s after the recovery; per second from the recovery: {per_second:?}",
            after * 100.0
        );
    }
}

#[test]
fn adaptive_keeps_the_spread_while_the_slow_instance_is_briefly_out() {
    let (reg, clock) = registry(StrategyKind::Adaptive);
    populate(&reg, &[1, 1, 1]);
    // Sequential traffic: i2 answers in 50 ms, the others in 1 ms.
    let traffic = |ms: u64| {
        for _ in 0..ms {
            let s = reg.get_instance(SVC).unwrap();
            let slow = s.instance().id().as_str() == SLOW;
            let _ = s.success(Duration::from_millis(if slow { 50 } else { 1 }));
            clock.advance(Duration::from_millis(1));
        }
    };
    traffic(3_000);
    assert_eq!(mode(&reg), StrategyKind::PeakEwma);
    // Its breaker opens (in the bench: its health checks time out) for a
    // few seconds, longer than the dwell.
    trip(&reg, &clock, SLOW);
    traffic(6_000);
    assert_eq!(
        mode(&reg),
        StrategyKind::PeakEwma,
        "an instance out for seconds must not make the service look calm: {:?}",
        reg.service(SVC).unwrap().status().adaptive
    );
}
