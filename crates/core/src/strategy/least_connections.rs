//! `least_connections`: the instance with the fewest active connections per
//! unit of effective weight.
//!
//! ## Rule
//!
//! The load of an instance is `active / effective weight` (effective weight =
//! configured weight × health score × slow-start factor), as Envoy's
//! least-request balancer divides by weight; the lowest load wins. Ties are
//! broken at random in proportion to effective weight (never by position,
//! which would pile every idle-time request onto the first instance): with
//! equal weights that is uniform, and at idle, when every load is 0, the
//! share is proportional to effective weight, so an instance in slow start
//! or with a lowered health score ramps like it does under `weighted`.
//! Under load, one at factor ½ is given new connections until it holds half
//! as many as a full one. An instance at effective weight 0 (the first
//! instant of slow start) is taken only when nothing else is eligible.
//!
//! Up to [`EXACT_LIMIT`] (256) instances the pick is exact: one scan, ties
//! drawn by weighted reservoir sampling. Above that a scan per pick would be
//! the O(n) cost the SPEC forbids at 100,000 instances, so the pick takes the
//! least loaded of [`SAMPLES`] (8) random eligible instances by the same
//! rule — the "best of d choices" that Envoy's least-request balancer also
//! uses, which keeps the maximum load within a small constant of the true
//! minimum.

use std::sync::Arc;

use super::{per_weight, PickContext, Strategy, StrategyKind};
use crate::instance::Member;

/// Largest service picked by an exact scan.
pub const EXACT_LIMIT: usize = 256;
/// Random samples compared above [`EXACT_LIMIT`].
pub const SAMPLES: usize = 8;

/// Tie weight of an instance at effective weight 0, so that a service whose
/// only candidates are at 0 still picks one.
const MIN_TIE_WEIGHT: f64 = 1e-9;

/// Fewest active connections per effective weight.
#[derive(Debug, Default)]
pub struct LeastConnections;

/// The least loaded member offered so far, ties drawn by effective weight.
#[derive(Default)]
struct Lowest<'m> {
    best: Option<&'m Arc<Member>>,
    load: f64,
    /// Sum of the tie weights of the members tied at `load`.
    tied: f64,
}

impl<'m> Lowest<'m> {
    fn offer(&mut self, cx: &mut PickContext<'_>, m: &'m Arc<Member>) {
        let weight = cx.effective_weight(m);
        let load = per_weight(f64::from(m.active_connections()), weight);
        let tie_weight = weight.max(MIN_TIE_WEIGHT);
        if self.best.is_none() || load < self.load {
            self.best = Some(m);
            self.load = load;
            self.tied = tie_weight;
        } else if load == self.load {
            self.tied += tie_weight;
            // Weighted reservoir sampling: replace with chance w / Σw.
            if cx.rng.f64() * self.tied < tie_weight {
                self.best = Some(m);
            }
        }
    }
}

impl Strategy for LeastConnections {
    fn kind(&self) -> StrategyKind {
        StrategyKind::LeastConnections
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Arc<Member>> {
        let n = cx.members.len();
        if n > EXACT_LIMIT {
            let mut samples: [Option<Arc<Member>>; SAMPLES] = Default::default();
            for s in &mut samples {
                *s = Some(cx.random_eligible()?);
            }
            let mut lowest = Lowest::default();
            for m in samples.iter().flatten() {
                lowest.offer(cx, m);
            }
            return lowest.best.cloned();
        }
        let members = cx.members;
        let mut lowest = Lowest::default();
        for m in members.iter() {
            if cx.is_eligible(m) {
                lowest.offer(cx, m);
            }
        }
        lowest.best.cloned()
    }
}
