//! `peak_ewma`: power of two choices on expected latency, as in Finagle and
//! Linkerd.
//!
//! Cost = peak-EWMA latency (see [`ewma`](crate::ewma)) × (active + 1) /
//! effective weight: the latency a new request should expect if requests
//! queue, scaled down for heavy instances and up for unhealthy or
//! slow-starting ones. A peak is taken at once, so an instance that turns
//! slow loses its share after its first slow response; the estimate decays
//! while the instance is idle, so it is retried later rather than shunned
//! forever. O(1) per pick.

use std::sync::Arc;

use super::{per_weight, PickContext, Strategy, StrategyKind};
use crate::instance::Member;

/// Power of two choices on peak-EWMA latency.
#[derive(Debug, Default)]
pub struct PeakEwma;

/// The peak-EWMA cost of `m`.
#[inline]
pub(crate) fn latency_cost(cx: &PickContext<'_>, m: &Member) -> f64 {
    let queue = f64::from(m.active_connections()) + 1.0;
    per_weight(
        m.latency_estimate_ns(cx.now) * queue,
        cx.effective_weight(m),
    )
}

impl Strategy for PeakEwma {
    fn kind(&self) -> StrategyKind {
        StrategyKind::PeakEwma
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Arc<Member>> {
        let (a, b) = cx.random_pair()?;
        Some(cx.cheaper(a, b, latency_cost))
    }
}
