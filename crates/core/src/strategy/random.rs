//! `random` and `weighted_random`.
//!
//! `random` draws uniformly among eligible instances by rejection sampling
//! (see the module doc of [`strategy`](super)). `weighted_random` draws a
//! point in `[0, Σ configured weights)`, finds its owner by binary search over
//! the member list's prefix sums (O(log n), no per-pick scan), and accepts it
//! with probability health × slow-start factor, so the expected share of each
//! eligible instance is proportional to its effective weight.

use super::{FactorDraw, PickContext, Picked, Strategy, StrategyKind, MAX_DRAWS};

/// Uniform random.
#[derive(Debug, Default)]
pub struct Random;

/// Random by effective weight.
#[derive(Debug, Default)]
pub struct WeightedRandom;

impl Strategy for Random {
    fn kind(&self) -> StrategyKind {
        StrategyKind::Random
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Picked> {
        cx.random_eligible_ahead()
    }
}

impl Strategy for WeightedRandom {
    fn kind(&self) -> StrategyKind {
        StrategyKind::WeightedRandom
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Picked> {
        let total = cx.members.total_weight();
        if total == 0 {
            return None;
        }
        let mut draw = FactorDraw::default();
        for _ in 0..MAX_DRAWS {
            let point = cx.rng.u64(..total);
            let Some(c) = cx
                .members
                .index_by_weight(point)
                .and_then(|i| cx.members.candidate(i))
            else {
                continue;
            };
            let member = || c.member().map(|m| &**m);
            if let Some(m) = draw.offer(cx, c.hot, member, || Picked::At(c.index)) {
                return Some(m);
            }
        }
        draw.finish(cx)
    }
}
