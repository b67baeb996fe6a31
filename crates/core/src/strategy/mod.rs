//! Selection strategies: one small [`Strategy`] trait, one file per strategy.
//!
//! | name | rule | structure per pick at 100,000 instances |
//! | --- | --- | --- |
//! | `round_robin` | rotation over eligible instances, each admitted with probability health × slow-start factor; one rotation per thread | a counter per thread, O(1) |
//! | `least_connections` | fewest `active / effective weight` among instances admitted with probability health × slow-start factor, ties broken at random | exact scan up to 256 instances; above, best of 8 random samples |
//! | `weighted` | smooth weighted round robin (WF²Q): exactly `wᵢ` picks in every window of `Σw`; equal weights: one rotation per thread, as `round_robin` | binary heaps, O(log n); equal weights: a counter per thread, O(1) |
//! | `random` | uniform | rejection sampling, O(1) expected; the first draw from the thread's batch drawn ahead (`draw_ahead`) |
//! | `weighted_random` | proportional to effective weight | two binary searches over prefix sums, O(log n) |
//! | `p2c` | two random instances, fewer `(active + 1) / effective weight` wins | O(1); the pair from the thread's batch drawn ahead |
//! | `peak_ewma` | two random instances, lower `peak-EWMA latency × (active + 1) / effective weight` wins | O(1); the pair from the thread's batch drawn ahead |
//! | `consistent_hash` | Maglev table on the caller's key; one instance moving remaps ≈ 1/N of keys | table lookup, O(1) |
//! | `adaptive` (default) | picks one of `weighted`, `p2c`, `peak_ewma` from latency spread, concurrency and error rate, with hysteresis | O(1) + the chosen one |
//!
//! ## Eligibility without scanning
//!
//! Strategies never build a filtered candidate list: that would be an O(n)
//! scan per pick. They pick from all members and check the one they picked
//! with [`PickContext::is_eligible`] (a few atomic loads), trying again if
//! it is not. Outside panic mode at least `min_healthy_percent` of instances
//! are eligible, so a random draw succeeds within two tries on average; after
//! [`MAX_DRAWS`] misses the pick falls back to one scan from a random offset,
//! which only happens when nearly every instance is out and panic mode is
//! disabled.
//!
//! ## Weights
//!
//! *Effective weight* = configured weight × health score × slow-start factor.
//! Structures built on membership change (prefix sums, the WF²Q schedule) use
//! the configured weight; the dynamic part (`weight_factor`, in `[0, 1]`) is
//! applied per pick by accepting the structure's choice with that
//! probability. The result is proportional to effective weight without a
//! rebuild whenever a health score moves.

pub mod adaptive;
pub mod consistent_hash;
pub(crate) mod drawn;
pub mod least_connections;
pub mod p2c;
pub mod peak_ewma;
pub mod random;
pub mod round_robin;
pub mod weighted;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use self::adaptive::{Adaptive, AdaptiveConfig, AdaptiveStatus, Signals};
pub use self::consistent_hash::{key_hash, ConsistentHash};
pub use self::least_connections::LeastConnections;
pub use self::p2c::P2c;
pub use self::peak_ewma::PeakEwma;
pub use self::random::{Random, WeightedRandom};
pub use self::round_robin::RoundRobin;
pub use self::weighted::Weighted;

use crate::clock::{LazyNow, Timestamp};
use crate::config::LoadBalancerConfig;
use crate::draw_ahead::DrawAhead;
use crate::filter::Filter;
use crate::hot::Hot;
use crate::instance::Member;
use crate::members::{Candidate, Members};
use crate::snapshot::StrategyTable;
use crate::stats::ServiceStats;

/// Random draws before a pick falls back to a scan.
pub const MAX_DRAWS: usize = 32;
/// Largest member list whose tables are rebuilt at once on a change.
pub const EAGER_REBUILD_LIMIT: usize = 10_000;
/// Shortest time between two rebuilds of a stale table on the request path.
pub const INLINE_REBUILD_INTERVAL: Duration = Duration::from_secs(1);

/// Whether a table built at `built_at` for `built_gen` must be rebuilt on a
/// pick of generation `generation` at `now` (read only for a stale table).
pub(crate) fn rebuild_inline(
    built_gen: u64,
    built_at: Timestamp,
    generation: u64,
    now: impl FnOnce() -> Timestamp,
) -> bool {
    built_gen < generation && now().saturating_since(built_at) >= INLINE_REBUILD_INTERVAL
}

/// Chooses one instance of a service.
pub trait Strategy: Send + Sync + fmt::Debug {
    /// Which strategy this is.
    fn kind(&self) -> StrategyKind;

    /// Picks an eligible member, or `None` if there is none.
    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Picked>;

    /// Called by the writer after the member list changed. Table-based
    /// strategies rebuild here when that is cheap (at most
    /// [`EAGER_REBUILD_LIMIT`] members); larger tables wait for
    /// [`maintain`](Self::maintain). `generation` grows with every change.
    fn prepare(&self, _members: &Members, _generation: u64, _now: Timestamp) {}

    /// Called periodically off the request path
    /// ([`Registry::maintain`](crate::Registry::maintain)): rebuild whatever
    /// is stale. If nobody calls it, a pick rebuilds a stale table inline,
    /// at most once per [`INLINE_REBUILD_INTERVAL`].
    fn maintain(&self, _members: &Members, _generation: u64, _now: Timestamp) {}

    /// The strategy that picks now: `kind()`, except for `adaptive`, which
    /// reports the one it uses. Cheap (an atomic load at most).
    fn effective_kind(&self) -> StrategyKind {
        self.kind()
    }

    /// For `adaptive`: the strategy in use and why.
    fn adaptive_status(&self) -> Option<AdaptiveStatus> {
        None
    }

    /// Called when the service's configuration is replaced by one with the
    /// same strategy: take its tunables, keep the state.
    fn reconfigure(&self, _config: &LoadBalancerConfig) {}
}

/// What a strategy picked.
///
/// A position in the snapshot's member list is what the pick path wants:
/// the [`Selection`](crate::Selection) then holds the snapshot (through its
/// thread's pick view) and the position, and never writes the member's
/// reference count. A strategy that picks from a table of its own that may
/// be older than the snapshot (`weighted`'s schedule, a stale
/// `consistent_hash` table) hands back the member itself.
#[derive(Debug, Clone)]
pub enum Picked {
    /// The member at this position of [`PickContext::members`].
    At(usize),
    /// A member from the strategy's own table.
    Member(Arc<Member>),
}

/// The name of a strategy, as written in config (`strategy = "p2c"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Rotation over eligible instances.
    RoundRobin,
    /// Fewest active connections.
    LeastConnections,
    /// Smooth weighted round robin.
    Weighted,
    /// Uniform random.
    Random,
    /// Random by effective weight.
    WeightedRandom,
    /// Power of two choices on connections / weight.
    P2c,
    /// Power of two choices on peak-EWMA latency.
    PeakEwma,
    /// Maglev consistent hashing on a request key.
    ConsistentHash,
    /// Chooses among the others by observed load.
    Adaptive,
}

/// A change of the strategy `adaptive` uses, made during a pick; the
/// service reports it as [`Event::StrategySwitch`](crate::Event::StrategySwitch).
#[derive(Debug, Clone, PartialEq)]
pub struct Switch {
    /// The strategy used before.
    pub from: StrategyKind,
    /// The strategy used from now on.
    pub to: StrategyKind,
    /// The deciding signal and its value.
    pub reason: String,
}

/// An unknown strategy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown strategy {0:?}; expected one of {list}", list = StrategyKind::NAMES.join(", "))]
pub struct UnknownStrategy(pub String);

/// What a strategy may read while picking.
pub struct PickContext<'a> {
    /// The members of the snapshot being picked from.
    pub members: &'a Members,
    /// Generation of `members`.
    pub generation: u64,
    /// The request key for `consistent_hash`, if the caller has one.
    pub key: Option<&'a [u8]>,
    /// Randomness for this pick (seeded from the registry's seed).
    pub rng: &'a mut fastrand::Rng,
    /// The pick's time, read on first use: see [`now`](Self::now).
    pub(crate) now: &'a LazyNow<'a>,
    /// The service's latest clock reading: see [`latest`](Self::latest).
    pub(crate) latest: &'a AtomicU64,
    pub(crate) panic: bool,
    pub(crate) slow_start: Duration,
    pub(crate) max_probes: u32,
    pub(crate) stats: &'a ServiceStats,
    /// Set by `adaptive` when this pick changed the strategy it uses.
    pub(crate) switched: &'a mut Option<Switch>,
    /// The caller's limit and filter from
    /// [`Service::select_within`](crate::Service::select_within) (module
    /// doc of [`filter`](crate::filter)); without a filter a candidate's
    /// member is not read for it, so a plain `select` pays one branch and
    /// one comparison.
    pub(crate) filter: &'a Filter<'a>,
    /// The snapshot's slot for a table of the strategy's built for
    /// `generation` (see [`Snapshot`](crate::service::Snapshot)).
    pub(crate) table: &'a StrategyTable,
    /// The thread's draws for its next picks of this service (see
    /// `draw_ahead`): the first draws of `random`, `p2c` and `peak_ewma`
    /// come from here when they were made for this member count.
    pub(crate) ahead: &'a DrawAhead,
    /// The position picked and its hot line number, when the strategy
    /// checked that candidate on its way (`random`, `p2c`, `peak_ewma`,
    /// `consistent_hash`): the pick then does not read the list's line
    /// numbers again. A hint beside [`Picked`], not in it: a third variant
    /// there cost every strategy ~12 ns at n = 10 (issue 12, fifth pass in
    /// `docs/benchmarks.md`).
    pub(crate) line_of_pick: Option<(usize, u32)>,
    /// Set when the common case (`strategy::drawn`) took this pick's first
    /// draws from the batch and the caller's filter refused them: the
    /// first draws are then counted as drawn and refused, and the pick goes
    /// on from there (`random`: the rest of its rejection sampling; `p2c`,
    /// `peak_ewma`: the redraw after a refused pair).
    pub(crate) first_refused: bool,
}

// === impl StrategyKind ===

impl StrategyKind {
    /// Every kind, in the order of the SPEC's table.
    pub const ALL: [StrategyKind; 9] = [
        StrategyKind::RoundRobin,
        StrategyKind::LeastConnections,
        StrategyKind::Weighted,
        StrategyKind::Random,
        StrategyKind::WeightedRandom,
        StrategyKind::P2c,
        StrategyKind::PeakEwma,
        StrategyKind::ConsistentHash,
        StrategyKind::Adaptive,
    ];

    const NAMES: [&'static str; 9] = [
        "round_robin",
        "least_connections",
        "weighted",
        "random",
        "weighted_random",
        "p2c",
        "peak_ewma",
        "consistent_hash",
        "adaptive",
    ];

    /// The config name.
    pub fn as_str(self) -> &'static str {
        let i = Self::ALL.iter().position(|k| *k == self).unwrap_or(0);
        Self::NAMES[i]
    }

    /// A fresh strategy of this kind with default tunables.
    pub fn build(self) -> Arc<dyn Strategy> {
        self.build_with(&LoadBalancerConfig::default())
    }

    /// A fresh strategy of this kind with `config`'s tunables
    /// (`config.adaptive` for `adaptive`); `config.strategy` is not read.
    pub fn build_with(self, config: &LoadBalancerConfig) -> Arc<dyn Strategy> {
        match self {
            StrategyKind::RoundRobin => Arc::new(RoundRobin::default()),
            StrategyKind::LeastConnections => Arc::new(LeastConnections),
            StrategyKind::Weighted => Arc::new(Weighted::default()),
            StrategyKind::Random => Arc::new(Random),
            StrategyKind::WeightedRandom => Arc::new(WeightedRandom),
            StrategyKind::P2c => Arc::new(P2c),
            StrategyKind::PeakEwma => Arc::new(PeakEwma),
            StrategyKind::ConsistentHash => Arc::new(ConsistentHash::default()),
            StrategyKind::Adaptive => Arc::new(Adaptive::new(config.adaptive)),
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StrategyKind {
    type Err = UnknownStrategy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::NAMES
            .iter()
            .position(|n| *n == s)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| UnknownStrategy(s.to_owned()))
    }
}

// === impl PickContext ===

impl<'a> PickContext<'a> {
    /// Now, on the registry's clock. The first call in a pick reads the
    /// clock; a pick that never asks reads none (module doc of
    /// [`clock`](crate::clock)).
    #[inline]
    pub fn now(&self) -> Timestamp {
        self.now.get()
    }

    /// A time no later than now, without reading the clock: the pick's
    /// time if it read the clock, else the service's latest reading (at
    /// most a millisecond older than the service's last clock read — a
    /// recorded outcome, `Registry::maintain`, a pick that needed the
    /// time; see `Recorder::latest`). For a rule that only asks whether a
    /// period has surely passed, and may answer a little late: `adaptive`'s
    /// evaluation being due, `peak_ewma`'s probe of an avoided instance.
    #[inline]
    pub fn latest(&self) -> Timestamp {
        match self.now.if_read() {
            Some(t) => t,
            None => Timestamp::from_nanos(self.latest.load(Ordering::Relaxed)),
        }
    }

    /// Whether `m` may be picked now: [`admits`](Self::admits) it and the
    /// caller's filter accepts it. Strategies check this on every member
    /// they consider, so a refused member is skipped inside the pick like an
    /// ineligible one and the caller never re-draws.
    #[inline]
    pub fn is_eligible(&self, m: &Member) -> bool {
        self.admits(m) && self.filter.accepts_member(m)
    }

    /// [`is_eligible`](Self::is_eligible) for a candidate: reads the
    /// member only if a filter must see it.
    #[inline]
    pub(crate) fn candidate_eligible(&self, c: &Candidate<'_>) -> bool {
        self.admits_live(c.hot) && self.filter.accepts(c.hot, || c.member().map(|m| &**m))
    }

    /// Whether the service's rules let `m` take traffic now, ignoring the
    /// caller's filter (in panic mode: anything not draining).
    #[inline]
    pub fn admits(&self, m: &Member) -> bool {
        self.admits_live(m.live().hot())
    }

    #[inline]
    fn admits_live(&self, live: &Hot) -> bool {
        if self.panic {
            live.admits_panic_traffic()
        } else {
            live.admits_traffic(|| self.now.get(), self.max_probes)
        }
    }

    /// Whether the service is in panic mode for this pick.
    pub fn in_panic(&self) -> bool {
        self.panic
    }

    /// Health × slow-start factor of `m`, in `[0, 1]`. In panic mode every
    /// instance counts fully, so the load spreads across all of them.
    #[inline]
    pub fn weight_factor(&self, m: &Member) -> f64 {
        self.live_factor(m.live().hot())
    }

    /// [`weight_factor`](Self::weight_factor) from the live state alone.
    #[inline]
    pub(crate) fn live_factor(&self, live: &Hot) -> f64 {
        if self.panic {
            1.0
        } else {
            live.weight_factor(|| self.now.get(), self.slow_start)
        }
    }

    /// Effective weight of `m` (see [`weight_factor`](Self::weight_factor)).
    #[inline]
    pub fn effective_weight(&self, m: &Member) -> f64 {
        f64::from(m.instance().weight().get()) * self.weight_factor(m)
    }

    /// [`effective_weight`](Self::effective_weight) from the live state
    /// alone (its copy of the configured weight).
    #[inline]
    pub(crate) fn live_effective_weight(&self, live: &Hot) -> f64 {
        f64::from(live.weight()) * self.live_factor(live)
    }

    /// Accepts a structural choice with probability `factor`.
    #[inline]
    pub fn accept(&mut self, factor: f64) -> bool {
        factor >= 1.0 || self.rng.f64() < factor
    }

    /// A uniformly random eligible member: rejection sampling, then a scan
    /// from a random offset after [`MAX_DRAWS`] misses.
    pub fn random_eligible(&mut self) -> Option<Arc<Member>> {
        self.random_candidate()?.member().cloned()
    }

    /// [`random_eligible`](Self::random_eligible) as a position.
    #[inline]
    pub(crate) fn random_eligible_at(&mut self) -> Option<Picked> {
        let c = self.random_candidate()?;
        Some(self.choose(c))
    }

    /// Picks the candidate `c`: its position, with its line number kept
    /// as the hint ([`keep_line`](Self::keep_line)).
    #[inline]
    pub(crate) fn choose(&mut self, c: Candidate<'_>) -> Picked {
        self.keep_line(&c);
        Picked::At(c.index)
    }

    /// Keeps `c`'s line number as the hint for the pick of `c`
    /// ([`line_of_pick`](Self::line_of_pick)), for a strategy that builds
    /// its [`Picked`] itself.
    #[inline]
    pub(crate) fn keep_line(&mut self, c: &Candidate<'_>) {
        self.line_of_pick = Some((c.index, c.line));
    }

    /// [`random_eligible`](Self::random_eligible)'s position and slot: a
    /// candidate is checked on its live line alone, its member never read
    /// (the selection names it by position).
    #[inline]
    pub(crate) fn random_candidate(&mut self) -> Option<Candidate<'a>> {
        self.random_candidate_from(None)
    }

    /// [`random_eligible_at`](Self::random_eligible_at) whose first draw
    /// is the thread's next one drawn ahead, if any (`random`); draws the
    /// next batch after it when the batch is used up (see `draw_ahead`).
    #[inline]
    pub(crate) fn random_eligible_ahead(&mut self) -> Option<Picked> {
        let picked = if self.first_refused {
            // The first draw was taken and refused (`first_refused`).
            self.random_candidate_after(None, MAX_DRAWS - 1)
        } else {
            let first = self.ahead.take(self.members.len());
            self.random_candidate_from(first)
        };
        let picked = picked.map(|c| self.choose(c));
        self.draw_ahead();
        picked
    }

    /// Rejection sampling whose first draw is `first` if given.
    #[inline]
    fn random_candidate_from(&mut self, first: Option<usize>) -> Option<Candidate<'a>> {
        self.random_candidate_after(first, MAX_DRAWS)
    }

    /// [`random_candidate_from`](Self::random_candidate_from) with `draws`
    /// draws before the scan.
    #[inline]
    fn random_candidate_after(
        &mut self,
        first: Option<usize>,
        draws: usize,
    ) -> Option<Candidate<'a>> {
        let members = self.members;
        let n = members.len();
        if n == 0 {
            return None;
        }
        let mut first = first;
        for _ in 0..draws {
            let at = match first.take() {
                Some(at) => at,
                None => self.rng.usize(..n),
            };
            let c = members.candidate(at)?;
            if self.candidate_eligible(&c) {
                return Some(c);
            }
        }
        let start = self.rng.usize(..n);
        self.scan_from_candidate(start)
    }

    /// The thread's next position in `0..n`: drawn ahead if there is one
    /// for `n` (`draw_ahead`), else from the stream.
    #[inline]
    fn next_draw(&mut self, n: usize) -> usize {
        let ahead = self.ahead;
        ahead.take(n).unwrap_or_else(|| self.rng.usize(..n))
    }

    /// At the end of a pick that took its first draws from the thread's
    /// batch: draws the next batch (from this pick's stream) and touches
    /// its candidates if this one is used up (module doc of `draw_ahead`).
    #[inline]
    pub(crate) fn draw_ahead(&mut self) {
        self.ahead.refill(self.members, self.rng);
    }

    /// The first eligible member at or after `start`, wrapping around.
    pub fn scan_from(&self, start: usize) -> Option<Arc<Member>> {
        self.scan_from_candidate(start)?.member().cloned()
    }

    fn scan_from_candidate(&self, start: usize) -> Option<Candidate<'a>> {
        let members = self.members;
        let n = members.len();
        (0..n)
            .filter_map(|i| members.candidate((start + i) % n))
            .find(|c| self.candidate_eligible(c))
    }

    /// Two distinct eligible members at random (the second is `None` if only
    /// one could be found), for power-of-two-choices.
    pub fn random_pair(&mut self) -> Option<(Arc<Member>, Option<Arc<Member>>)> {
        let (a, b) = self.random_pair_candidates()?;
        Some((a.member()?.clone(), b.and_then(|b| b.member().cloned())))
    }

    /// [`random_pair`](Self::random_pair)'s slots: the caller compares
    /// their live states and clones only the member it keeps.
    ///
    /// The common case first: two positions drawn before either line is
    /// read, so the two candidates' cache misses overlap; if both are
    /// eligible and distinct they are the pair (a uniform pair, as the
    /// loop below gives: a rejected pair is drawn again from scratch).
    /// The two positions are the thread's next two drawn ahead when there
    /// are (see `draw_ahead`; `p2c` and `peak_ewma` draw the next batch at
    /// their end).
    pub(crate) fn random_pair_candidates(
        &mut self,
    ) -> Option<(Candidate<'a>, Option<Candidate<'a>>)> {
        let n = self.members.len();
        // A pair taken and refused by the common case (`first_refused`)
        // goes on as a refused pair here.
        if n >= 2 && !self.first_refused {
            let (i, j) = (self.next_draw(n), self.next_draw(n));
            let (a, b) = (self.members.candidate(i), self.members.candidate(j));
            if let (Some(a), Some(b)) = (a, b) {
                if i != j && self.candidate_eligible(&a) && self.candidate_eligible(&b) {
                    return Some((a, Some(b)));
                }
            }
        }
        let a = self.random_candidate()?;
        for _ in 0..8 {
            let b = self.random_candidate()?;
            if a.index != b.index {
                return Some((a, Some(b)));
            }
        }
        Some((a, None))
    }

    /// Of two members, the one with the lower cost; ties go to `a`, which the
    /// caller drew at random.
    pub fn cheaper(
        &self,
        a: Arc<Member>,
        b: Option<Arc<Member>>,
        cost: impl Fn(&Self, &Member) -> f64,
    ) -> Arc<Member> {
        match b {
            Some(b) if cost(self, &b) < cost(self, &a) => b,
            _ => a,
        }
    }

    /// [`cheaper`](Self::cheaper) on candidates, by `b_cheaper(cx, a, b)`
    /// (whether `b` costs less than `a`) on their live states: reads no
    /// member. Ties go to `a`.
    #[inline]
    pub(crate) fn cheaper_at(
        &mut self,
        a: Candidate<'_>,
        b: Option<Candidate<'_>>,
        b_cheaper: impl Fn(&Self, &Hot, &Hot) -> bool,
    ) -> Picked {
        match b {
            Some(b) if b_cheaper(self, a.hot, b.hot) => self.choose(b),
            _ => self.choose(a),
        }
    }
}

/// The draw by weight factor that `weighted` and `weighted_random` share:
/// each structural choice is [`offer`](Self::offer)ed and accepted with
/// probability health × slow-start factor; if none is accepted within the
/// caller's tries, [`finish`](Self::finish) takes the one with the highest
/// factor seen (so a service whose instances all ramp still gets picks),
/// else a random eligible member.
#[derive(Default)]
pub(crate) struct FactorDraw {
    best: Option<(f64, Picked)>,
}

impl FactorDraw {
    /// Offers the member `member()`, whose hot line is `live` and which
    /// `picked` names; returns it if it is eligible and accepted now. The
    /// member is read only if the caller's filter must see it.
    #[inline]
    pub(crate) fn offer<'m>(
        &mut self,
        cx: &mut PickContext<'_>,
        live: &Hot,
        member: impl FnOnce() -> Option<&'m Member>,
        picked: impl FnOnce() -> Picked,
    ) -> Option<Picked> {
        if !cx.admits_live(live) || !cx.filter.accepts(live, member) {
            return None;
        }
        let f = cx.live_factor(live);
        if cx.accept(f) {
            return Some(picked());
        }
        if self.best.as_ref().is_none_or(|(best, _)| f > *best) {
            self.best = Some((f, picked()));
        }
        None
    }

    /// The best member offered, else a random eligible one.
    pub(crate) fn finish(self, cx: &mut PickContext<'_>) -> Option<Picked> {
        self.best
            .map(|(_, m)| m)
            .or_else(|| cx.random_eligible_at())
    }
}

/// The floor of an effective weight divided by (or multiplied into a
/// comparison): it may be 0 at the start of slow start.
const MIN_WEIGHT: f64 = 1e-9;

/// Divides by an effective weight that may be 0 (start of slow start).
#[inline]
pub(crate) fn per_weight(load: f64, effective_weight: f64) -> f64 {
    load / effective_weight.max(MIN_WEIGHT)
}

/// The queue a request picking `live` joins: its requests in flight and
/// this one (`active + 1`, so an idle heavy instance beats an idle light
/// one; `p2c`'s and `peak_ewma`'s costs).
#[inline]
pub(crate) fn queue_joined(live: &Hot) -> f64 {
    f64::from(live.active_connections()) + 1.0
}

/// Whether `per_weight(load_b, weight_b) < per_weight(load_a, weight_a)`,
/// without dividing: `load_b · w_a < load_a · w_b` with each weight
/// floored as [`per_weight`] floors it (both positive, so the order is
/// the same; loads and weights are finite and non-negative). Two
/// multiplications instead of two divisions on the pair strategies' path.
#[inline]
pub(crate) fn less_per_weight(load_b: f64, weight_b: f64, load_a: f64, weight_a: f64) -> bool {
    load_b * weight_a.max(MIN_WEIGHT) < load_a * weight_b.max(MIN_WEIGHT)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cross-multiplied comparison orders as the divided costs do, on
    /// 100,000 seeded pairs: loads 1–64 (a queue, or a latency in ns ×
    /// queue up to 10 s), effective weights 0–1,000 with health and ramp
    /// factors (0 included, floored as `per_weight` floors it). Only
    /// near-ties (costs within 1e-12 relative, rounding) may differ.
    #[test]
    fn comparing_cross_multiplied_orders_as_dividing() {
        let mut rng = fastrand::Rng::with_seed(5);
        let weight = |rng: &mut fastrand::Rng| match rng.u8(..10) {
            0 => 0.0,
            1 => f64::from(rng.u16(1..=1000)),
            _ => f64::from(rng.u16(1..=5)) * rng.f64(),
        };
        let mut differ = 0;
        for i in 0..100_000 {
            let load = |rng: &mut fastrand::Rng| {
                let q = f64::from(rng.u32(1..=64));
                if i % 2 == 0 {
                    q
                } else {
                    q * 1e10 * rng.f64()
                }
            };
            let (la, lb) = (load(&mut rng), load(&mut rng));
            let (wa, wb) = (weight(&mut rng), weight(&mut rng));
            let (ca, cb) = (per_weight(la, wa), per_weight(lb, wb));
            if less_per_weight(lb, wb, la, wa) != (cb < ca) {
                assert!((ca - cb).abs() <= 1e-12 * ca.max(cb), "{ca} vs {cb}");
                differ += 1;
            }
        }
        assert!(differ <= 5, "{differ} near-ties differ");
        // Equal costs are a tie either way (the first drawn keeps it).
        assert!(!less_per_weight(2.0, 6.0, 1.0, 3.0));
        assert!(!less_per_weight(1.0, 0.0, 1.0, 0.0));
    }

    #[test]
    fn names_round_trip() {
        for k in StrategyKind::ALL {
            assert_eq!(k.as_str().parse::<StrategyKind>().unwrap(), k);
            assert_eq!(k.build().kind(), k);
        }
        let err = "fastest".parse::<StrategyKind>().unwrap_err();
        assert!(err.to_string().contains("round_robin"), "{err}");
    }
}
