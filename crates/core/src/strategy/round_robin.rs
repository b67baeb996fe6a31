//! `round_robin`: rotation over eligible instances, admitting each in
//! proportion to its effective-weight factor.
//!
//! ## Rule
//!
//! A rotation counter per thread slot (see `per_thread`); the rotation
//! lands on `counter++ mod n`. An
//! eligible instance it lands on is taken with probability equal to its
//! factor `f` = health score × slow-start factor (the seeded RNG of the
//! pick; `f = 1` takes it without a draw), else the rotation moves on to the
//! next. Ineligible instances are skipped the same way. After 16 steps
//! without a taker the pick takes the eligible instance with the highest
//! factor it saw (so a service whose instances all ramp still gets picks),
//! else a random eligible one.
//!
//! So with every instance eligible at full factor each gets exactly one pick
//! in every `n` consecutive picks *of one thread*; an instance at factor `f`
//! among `n − 1` full ones gets `f / (n − 1 + f)` of the picks, the share
//! `weighted` gives it: a recovering instance (slow start, lowered health
//! score) ramps up instead of taking a full share at once — the bug Envoy
//! fixed for its round robin in issue 19437. Configured weights do not
//! change the rotation (use `weighted` for that).
//!
//! *Threads.* One shared counter would be a read-modify-write on one cache
//! line from every thread on every pick, the contention that kept two
//! threads from picking faster than one. Each thread slot therefore keeps its
//! own position, starting at 0: every thread's picks rotate exactly, and the
//! service's picks are the threads' rotations interleaved, so over any `n`
//! picks of each thread every instance gets one from each. Two threads in
//! step may send to the same instance back to back; the counts per instance
//! stay equal within the number of threads.
//!
//! *Cost:* the factor is a health-score load and the slow-start ramp at the
//! pick's `now`, which the context already holds; a full-factor instance
//! costs no random draw.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{FactorDraw, PickContext, Strategy, StrategyKind};
use crate::instance::Member;
use crate::per_thread::PerThread;

/// Steps the rotation may move on (ineligible or not admitted) before the
/// fallback.
const MAX_SKIPS: usize = 16;

/// Rotation over eligible instances.
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// Each thread slot's position in the rotation.
    next: PerThread<AtomicUsize>,
}

impl Strategy for RoundRobin {
    fn kind(&self) -> StrategyKind {
        StrategyKind::RoundRobin
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Arc<Member>> {
        let n = cx.members.len();
        if n == 0 {
            return None;
        }
        let next = self.next.local();
        let mut draw = FactorDraw::default();
        for _ in 0..MAX_SKIPS {
            let i = next.fetch_add(1, Ordering::Relaxed) % n;
            if let Some(m) = cx.members.get(i) {
                if let Some(m) = draw.offer(cx, m) {
                    return Some(m);
                }
            }
        }
        draw.finish(cx)
    }
}
