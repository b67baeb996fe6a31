//! `least_connections`: the instance with the fewest active connections.
//!
//! Up to [`EXACT_LIMIT`] (256) instances the pick is exact: one scan, with
//! ties broken uniformly at random by reservoir sampling (never by position,
//! which would pile every idle-time request onto the first instance). Above
//! that a scan per pick would be the O(n) cost the SPEC forbids at 100,000
//! instances, so the pick takes the least loaded of [`SAMPLES`] (8) random
//! eligible instances — the "best of d choices" that Envoy's least-request
//! balancer also uses, which keeps the maximum load within a small constant
//! of the true minimum.

use std::sync::Arc;

use super::{PickContext, Strategy, StrategyKind};
use crate::instance::Member;

/// Largest service picked by an exact scan.
pub const EXACT_LIMIT: usize = 256;
/// Random samples compared above [`EXACT_LIMIT`].
pub const SAMPLES: usize = 8;

/// Fewest active connections.
#[derive(Debug, Default)]
pub struct LeastConnections;

impl Strategy for LeastConnections {
    fn kind(&self) -> StrategyKind {
        StrategyKind::LeastConnections
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Arc<Member>> {
        let n = cx.members.len();
        if n > EXACT_LIMIT {
            let mut best = cx.random_eligible()?;
            for _ in 1..SAMPLES {
                let m = cx.random_eligible()?;
                if m.active_connections() < best.active_connections() {
                    best = m;
                }
            }
            return Some(best);
        }
        let mut best: Option<&Arc<Member>> = None;
        let mut best_load = u32::MAX;
        let mut ties = 0u32;
        for m in cx.members.iter() {
            if !cx.is_eligible(m) {
                continue;
            }
            let load = m.active_connections();
            if load < best_load {
                best = Some(m);
                best_load = load;
                ties = 1;
            } else if load == best_load {
                ties += 1;
                // Reservoir sampling: the k-th tie replaces with chance 1/k.
                if cx.rng.u32(..ties) == 0 {
                    best = Some(m);
                }
            }
        }
        best.cloned()
    }
}
