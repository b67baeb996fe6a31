//! `p2c`: power of two choices on active connections per unit of weight.
//!
//! Draw two distinct eligible instances at random; send to the one with the
//! lower `(active + 1) / effective weight`. Mitzenmacher's result: two random
//! choices cut the maximum load from `O(log n / log log n)` to
//! `O(log log n)` while costing O(1) per pick, and unlike an exact minimum
//! it does not stampede the single least-loaded instance. The `+ 1` makes an
//! idle heavy instance preferable to an idle light one; dividing by effective
//! weight makes unhealthy and slow-starting instances look more loaded.
//!
//! The pair is the thread's next two draws, made ahead in a batch whose
//! candidates' lines are loaded together (see `draw_ahead`): only when the
//! positions are drawn changes, the comparison is made at the pick's time.

use super::{less_per_weight, queue_joined, PickContext, Picked, Strategy, StrategyKind};
use crate::hot::Hot;

/// Power of two choices on connections / weight.
#[derive(Debug, Default)]
pub struct P2c;

/// Whether `b`'s p2c cost, `(active + 1) / effective weight`, is below
/// `a`'s, from their live states alone (one cache line each; see
/// [`instance`](crate::instance)). Compared cross-multiplied, not
/// divided (`strategy::less_per_weight`): the same order, two
/// multiplications instead of two divisions.
#[inline]
pub(crate) fn cheaper_load(cx: &PickContext<'_>, a: &Hot, b: &Hot) -> bool {
    let weight_b = cx.live_effective_weight(b);
    let weight_a = cx.live_effective_weight(a);
    cheaper_by(a, weight_a, b, weight_b)
}

/// [`cheaper_load`] with the effective weights given: the rule itself,
/// which the context-free common case (`strategy::drawn`) shares.
#[inline]
pub(crate) fn cheaper_by(a: &Hot, weight_a: f64, b: &Hot, weight_b: f64) -> bool {
    less_per_weight(queue_joined(b), weight_b, queue_joined(a), weight_a)
}

impl Strategy for P2c {
    fn kind(&self) -> StrategyKind {
        StrategyKind::P2c
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Picked> {
        let (a, b) = cx.random_pair_candidates()?;
        let chosen = cx.cheaper_at(a, b, cheaper_load);
        // The next batch of draws when this one is used up (`draw_ahead`).
        cx.draw_ahead();
        Some(chosen)
    }
}
