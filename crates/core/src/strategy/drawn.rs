//! The common case of a `random`, `p2c` or `peak_ewma` pick, decided
//! without a [`PickContext`](super::PickContext): the thread's draws made
//! ahead, checked on their hot lines (and by the caller's limit and
//! filter), compared by the strategy's own rule.
//!
//! ## Rule
//!
//! A pick outside panic mode, with no event from the panic check, of a
//! service whose strategy is `random`, `p2c` or `peak_ewma` first looks at
//! its thread's next draws for the member list's count
//! ([`DrawAhead::peek`]: one, or a pair) *without taking them*. It goes on
//! here only if the pair is two distinct positions and each candidate is
//! **plainly eligible** ([`Hot::plain_factor`]): not draining or removed,
//! health above 0, breaker closed, no slow-start ramp. Then it takes the
//! draws and asks the caller's filter, if any, and limit
//! (`Service::select_within`, module doc of [`filter`](crate::filter): the
//! limit is checked on the hot line) about each candidate in the general
//! path's order (the first, then the second only if the first passed):
//!
//! - both accepted: `random` picks its one candidate; `p2c` and
//!   `peak_ewma` send the request where their rule says
//!   ([`p2c::cheaper_by`],
//!   [`peak_ewma::second_wins`]: the
//!   functions the general pick calls), each effective weight the
//!   configured weight × the health; the next batch is drawn if this one
//!   is used up, from the slot's stream (`PickLocal::refill`); the
//!   selection counts on the winner, not a probe, stamped with the
//!   service's latest clock reading;
//! - one refused (by the filter or the limit): the general path goes on from there, as after refused
//!   first draws ([`PickContext::first_refused`](super::PickContext)):
//!   `random`'s rejection sampling with the draws it has left, the pair
//!   strategies' redraw.
//!
//! In any other case nothing is taken and the pick runs the general path
//! (`Service::pick_general`), which takes the same draws and applies every
//! rule as before.
//!
//! **The same outcome as the general path.** When both candidates are
//! plainly eligible, every step of the general path is determined: the
//! first draws pass the service's rules, so only the filter or the limit
//! can refuse them (asked the same questions in the same order); their eligibility
//! and weight factors (health × 1) need no clock; `peak_ewma`'s probe rule
//! asks the service's latest reading, as the pick's `latest()` does when
//! it read no clock; the winner's breaker is closed, so admission admits
//! it without a lock, no probe slot and no event; no clock read, so
//! `last_used` is the latest reading. The RNG is touched only by the
//! refill, as in the general path. Test
//! `service::tests::the_common_case_picks_as_the_general_path`: seeded
//! sequences of picks, with no filter, with one refusing a tenth of the
//! instances and with a limit that refuses the busiest, pick exactly what
//! the general path picks (and ask the filter the same questions, and
//! refuse for the limit alike), among draining, ejected, half-healthy,
//! open, half-open and ramping instances and varied loads and latencies.
//!
//! ## Why
//!
//! At 100,000 instances a `p2c` or `peak_ewma` pick was its fixed cost
//! (65–83 ns, ~750 instructions a select + release at n = 10) plus its
//! share of the refills' misses (issue 12, sixth pass in
//! `docs/benchmarks.md`). The general path builds a 13-field context for a
//! virtual call, runs the admission loop, the `adaptive` switch check,
//! the line hint and the filter's plumbing, most of it for rules the
//! common case does not meet. This path is the pick with those taken out:
//! 580 instructions a `p2c` select + release at n = 10 instead of 752,
//! 52 ns instead of 73, and 90–93 ns instead of 120–128 at 100,000 (issue
//! 12, seventh pass in `docs/benchmarks.md`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{p2c, peak_ewma, StrategyKind};
use crate::clock::Timestamp;
use crate::draw_ahead::DrawAhead;
use crate::filter::Filter;
use crate::hot::Hot;
use crate::members::{Candidate, Members};

/// What the common case made of a pick (module doc).
pub(crate) enum Drawn<'a> {
    /// Picked this candidate; its draws are taken.
    Picked(Candidate<'a>),
    /// Took the first draws and the caller's filter or limit refused them: the
    /// general pick goes on from there (`PickContext::first_refused`).
    Refused,
    /// Took nothing: the general pick decides.
    General,
}

/// The common case of the pick (module doc): `slow_start` is the
/// configured window, `latest` the service's latest clock reading,
/// `filter` the caller's limit and filter.
#[inline]
pub(crate) fn pick<'a>(
    kind: StrategyKind,
    members: &'a Members,
    ahead: &DrawAhead,
    slow_start: Duration,
    latest: &AtomicU64,
    filter: &Filter<'_>,
) -> Drawn<'a> {
    // The filter sees a member in the general path's order, once, and
    // only once its candidate passed the service's rules; the limit reads
    // the hot line.
    let refuses = |c: &Candidate<'_>| !filter.accepts(c.hot, || c.member().map(|m| &**m));
    let n = members.len();
    match kind {
        StrategyKind::Random => {
            let Some([i]) = ahead.peek::<1>(n) else {
                return Drawn::General;
            };
            let Some((c, _)) = plain(members, i, slow_start) else {
                return Drawn::General;
            };
            ahead.skip(1);
            if refuses(&c) {
                return Drawn::Refused;
            }
            Drawn::Picked(c)
        }
        StrategyKind::P2c | StrategyKind::PeakEwma => {
            let Some([i, j]) = ahead.peek::<2>(n) else {
                return Drawn::General;
            };
            let (Some((a, factor_a)), Some((b, factor_b))) =
                (plain(members, i, slow_start), plain(members, j, slow_start))
            else {
                return Drawn::General;
            };
            if i == j {
                return Drawn::General;
            }
            ahead.skip(2);
            if refuses(&a) || refuses(&b) {
                return Drawn::Refused;
            }
            let weight_a = f64::from(a.hot.weight()) * factor_a;
            let weight_b = f64::from(b.hot.weight()) * factor_b;
            let b_wins = if kind == StrategyKind::P2c {
                p2c::cheaper_by(a.hot, weight_a, b.hot, weight_b)
            } else {
                peak_ewma::second_wins(
                    a.hot,
                    b.hot,
                    || Timestamp::from_nanos(latest.load(Ordering::Relaxed)),
                    || (weight_a, weight_b),
                )
            };
            Drawn::Picked(if b_wins { b } else { a })
        }
        _ => Drawn::General,
    }
}

/// The member at `at` as a candidate and its weight factor, if it is
/// plainly eligible ([`Hot::plain_factor`]).
#[inline]
fn plain(members: &Members, at: usize, slow_start: Duration) -> Option<(Candidate<'_>, f64)> {
    let c = members.candidate(at)?;
    let factor = Hot::plain_factor(c.hot, slow_start)?;
    Some((c, factor))
}
