//! `round_robin`: plain rotation over eligible instances.
//!
//! One shared atomic counter; the pick is `counter++ mod n`, skipping
//! ineligible instances for up to 16 steps before falling back to a random
//! eligible one. Weights, health scores and slow start do not change the
//! rotation (use `weighted` for that): with every instance eligible, each
//! gets exactly one pick in every `n` consecutive picks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{PickContext, Strategy, StrategyKind};
use crate::instance::Member;

/// Steps the rotation may skip over ineligible instances.
const MAX_SKIPS: usize = 16;

/// Rotation over eligible instances.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
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
        for _ in 0..MAX_SKIPS.min(n) {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
            match cx.members.get(i) {
                Some(m) if cx.is_eligible(m) => return Some(m.clone()),
                _ => {}
            }
        }
        cx.random_eligible()
    }
}
