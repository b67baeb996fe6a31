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
use crate::instance::{InstanceLive, Member};

/// Power of two choices on peak-EWMA latency.
#[derive(Debug, Default)]
pub struct PeakEwma;

/// The peak-EWMA cost of `m`.
#[inline]
pub(crate) fn latency_cost(cx: &PickContext<'_>, live: &InstanceLive) -> f64 {
    let queue = f64::from(live.active_connections()) + 1.0;
    per_weight(
        live.latency_estimate_ns(cx.now()) * queue,
        cx.live_effective_weight(live),
    )
}

impl Strategy for PeakEwma {
    fn kind(&self) -> StrategyKind {
        StrategyKind::PeakEwma
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Arc<Member>> {
        // The costs need the time: read it before the candidates' cache
        // misses, which a clock read (an ordered `rdtsc`) would wait for.
        cx.now();
        let (a, b) = cx.random_pair_slots()?;
        Some(cx.cheaper_slot(a, b, latency_cost))
    }
}
