//! `least_connections`: the instance with the fewest active connections per
//! unit of effective weight.
//!
//! ## Rule
//!
//! Each eligible instance is first *admitted* to the pick with probability
//! equal to its factor `f` = health score × slow-start factor (the pick's
//! seeded RNG; `f = 1` is admitted without a draw). Among the admitted, the
//! load of an instance is `active / effective weight` (effective weight =
//! configured weight × `f`), as Envoy's least-request balancer divides by
//! weight, and the lowest load wins. Ties are broken at random in proportion
//! to configured weight (never by position, which would pile every
//! idle-time request onto the first instance); with equal weights that is
//! uniform, as before. If no instance is admitted (all ramp, all drew
//! "no") the lowest load over every eligible instance wins.
//!
//! Why both: `active / effective weight` alone lets an idle instance at any
//! factor above 0 beat every busy one, so a recovering instance would take
//! a full share whenever its peers are busy; admission alone would ignore
//! load. Together an instance at factor `f` is considered in a fraction `f`
//! of the picks, and among those is filled until it holds `f` times the
//! connections of a full peer. At idle (every load 0) an instance at factor
//! `f` among `n − 1` full ones gets `f / n` of the picks; with every
//! instance at full health and out of slow start the rule is the plain
//! least-connections of before.
//!
//! ## Cost
//!
//! Up to [`EXACT_LIMIT`] (256) instances the pick is exact: one scan (a
//! second only when nobody was admitted), ties drawn by weighted reservoir
//! sampling. Above that a scan per pick would be the O(n) cost the SPEC
//! forbids at 100,000 instances, so the pick applies the same rule to
//! [`SAMPLES`] (8) random eligible instances (among equals the first, itself
//! a random draw, wins) — the "best of d choices" that
//! Envoy's least-request balancer also uses, which keeps the maximum load
//! within a small constant of the true minimum.

use super::{per_weight, PickContext, Picked, Strategy, StrategyKind};
use crate::hot::Hot;
use crate::members::Candidate;

/// Largest service picked by an exact scan.
pub const EXACT_LIMIT: usize = 256;
/// Random samples compared above [`EXACT_LIMIT`].
pub const SAMPLES: usize = 8;

/// Fewest active connections per effective weight.
#[derive(Debug, Default)]
pub struct LeastConnections;

/// `active / effective weight` of an instance at factor `f`, from its live
/// state alone (one cache line per sample).
#[inline]
fn load(live: &Hot, f: f64) -> f64 {
    per_weight(
        f64::from(live.active_connections()),
        f64::from(live.weight()) * f,
    )
}

/// The least loaded member offered so far, ties drawn by configured weight.
#[derive(Default)]
struct Lowest<'m> {
    best: Option<Candidate<'m>>,
    load: f64,
    /// Sum of the configured weights of the members tied at `load`.
    tied: f64,
}

impl<'m> Lowest<'m> {
    /// Offers `s` at factor `f`.
    fn offer(&mut self, cx: &mut PickContext<'_>, c: Candidate<'m>, f: f64) {
        let weight = f64::from(c.hot.weight());
        let load = load(c.hot, f);
        if self.best.is_none() || load < self.load {
            self.best = Some(c);
            self.load = load;
            self.tied = weight;
        } else if load == self.load {
            self.tied += weight;
            // Weighted reservoir sampling: replace with chance w / Σw.
            if cx.rng.f64() * self.tied < weight {
                self.best = Some(c);
            }
        }
    }

    fn picked(&self) -> Option<Picked> {
        self.best.map(|c| Picked::At(c.index))
    }
}

impl Strategy for LeastConnections {
    fn kind(&self) -> StrategyKind {
        StrategyKind::LeastConnections
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Picked> {
        if cx.members.len() > EXACT_LIMIT {
            sampled(cx)
        } else {
            exact(cx)
        }
    }
}

/// The rule over every member: the lowest load among the eligible and
/// admitted, else among every eligible one.
fn exact(cx: &mut PickContext<'_>) -> Option<Picked> {
    let members = cx.members;
    let mut admitted = Lowest::default();
    let mut any = false;
    for c in members.candidates() {
        if !cx.candidate_eligible(&c) {
            continue;
        }
        any = true;
        let f = cx.live_factor(c.hot);
        if cx.accept(f) {
            admitted.offer(cx, c, f);
        }
    }
    if admitted.best.is_some() || !any {
        return admitted.picked();
    }
    // Nobody admitted (rare: every candidate ramps and drew "no").
    let mut all = Lowest::default();
    for c in members.candidates() {
        if cx.candidate_eligible(&c) {
            let f = cx.live_factor(c.hot);
            all.offer(cx, c, f);
        }
    }
    all.picked()
}

/// The rule over [`SAMPLES`] random eligible members: an admitted one beats
/// one that is not, then the lower load wins. The samples are random draws,
/// so among equals the first wins and no tie draw is needed. A sample reads
/// its list slot and its live state's line; only the winner's `Member` is
/// read (for its reference count).
fn sampled(cx: &mut PickContext<'_>) -> Option<Picked> {
    let mut best: Option<(bool, f64, usize)> = None;
    for _ in 0..SAMPLES {
        let c = cx.random_candidate()?;
        let i = c.index;
        let f = cx.live_factor(c.hot);
        let admitted = cx.accept(f);
        let load = load(c.hot, f);
        let better = best.as_ref().is_none_or(|&(was_admitted, was_load, _)| {
            (admitted && !was_admitted) || (admitted == was_admitted && load < was_load)
        });
        if better {
            best = Some((admitted, load, i));
        }
    }
    best.map(|(_, _, i)| Picked::At(i))
}
