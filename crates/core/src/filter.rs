//! The caller's say in a pick, beyond the service's rules: a limit on an
//! instance's requests in flight, checked on its hot line, and a filter on
//! the member ([`Service::select_within`](crate::Service::select_within)).
//!
//! ## Rule
//!
//! A candidate that passed the service's rules (eligibility, panic mode)
//! is **accepted** when the caller's filter, if any, accepts its member
//! and then its active count (`Member::active_connections`, the count of
//! selections it holds) is **below `max_active`**. A candidate at or over
//! the limit is refused exactly as one the filter refuses: the strategy
//! skips it and goes on as after any refusal (round robin moves past it,
//! `consistent_hash` falls over to the next in its table order, the pair
//! strategies redraw, the common case of `strategy::drawn` hands over to
//! the general path). The filter is asked first, so it is asked the same
//! questions in the same order as `select_with`'s filter would be; the
//! limit is asked only about candidates the filter accepted. When the pick
//! selects nothing, it says whether some candidate was refused for the
//! limit ([`NoSelection::OverLimit`]) or not
//! ([`NoSelection::NoneAcceptable`]): a candidate the filter refused is
//! never counted as over the limit.
//!
//! No limit is `u32::MAX` (`select` and `select_with`: no count reaches
//! it). The limit compares one field of the candidate's hot line, which
//! the pick has loaded to check eligibility; a filter reads the member
//! (its description and live state, two dependent cache misses at 100,000
//! instances).
//!
//! ## Why
//!
//! The proxy refuses an instance at the service's `max_connections`. As a
//! filter reading the member, that check cost 400–550 ns a pick at 100,000
//! instances, more than the pick itself (issue 12, seventh pass in
//! `docs/benchmarks.md`); on its hot line it costs a comparison: the picks
//! bench's `limit` form against its `filter` form, at 100,000 instances,
//! `p2c` 345 → 88 ns a pick on one thread and 310 → 84 on two,
//! `peak_ewma` 322 → 90, `random` 316 → 57 (CPU time, medians of 5
//! alternating runs, load 3.4); at 10 instances 54 → 57. The proxy gives
//! a filter only on a retry (not an instance already tried), so a first
//! attempt reads no member.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::hot::Hot;
use crate::instance::Member;

/// Why [`Service::select_within`](crate::Service::select_within) selected
/// nothing (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSelection {
    /// No eligible instance was acceptable, and none was refused for the
    /// limit (or the service has no instance).
    NoneAcceptable,
    /// At least one candidate that passed the service's rules and the
    /// caller's filter was refused for being at or over `max_active`.
    OverLimit,
}

/// The caller's limit and filter for one pick (module doc), and the note
/// that a candidate was refused for the limit.
#[derive(Clone, Copy)]
pub(crate) struct Filter<'a> {
    /// Candidates with this many active selections or more are refused.
    pub(crate) max_active: u32,
    /// The caller's filter on the member; `None` accepts every member, so
    /// a pick without one reads no member for it.
    pub(crate) accept: Option<&'a dyn Fn(&Member) -> bool>,
    /// Set when a candidate was refused for the limit (an atomic only so
    /// that [`OPEN`](Self::OPEN) can be a constant; one thread writes it).
    over_limit: &'a AtomicBool,
}

/// The note of [`Filter::OPEN`], which refuses nothing and so never
/// writes it.
static NEVER_NOTED: AtomicBool = AtomicBool::new(false);

impl<'a> Filter<'a> {
    /// No filter and no limit (`select`): a constant, so a pick without a
    /// filter builds none.
    pub(crate) const OPEN: Filter<'static> = Filter {
        max_active: u32::MAX,
        accept: None,
        over_limit: &NEVER_NOTED,
    };

    /// A filter of `max_active` and `accept` that notes a refusal for the
    /// limit in `over_limit`.
    pub(crate) fn new(
        max_active: u32,
        accept: Option<&'a dyn Fn(&Member) -> bool>,
        over_limit: &'a AtomicBool,
    ) -> Self {
        Filter {
            max_active,
            accept,
            over_limit,
        }
    }

    /// This filter with `accept` in place of the caller's filter (panic
    /// candidates: a filter that asks the caller's), the same limit and
    /// note.
    pub(crate) fn with_accept<'b>(&self, accept: &'b dyn Fn(&Member) -> bool) -> Filter<'b>
    where
        'a: 'b,
    {
        Filter {
            max_active: self.max_active,
            accept: Some(accept),
            over_limit: self.over_limit,
        }
    }

    /// Whether the candidate whose hot line is `hot` and whose member is
    /// `member()` is accepted (module doc); the member is read only if
    /// there is a filter.
    #[inline]
    pub(crate) fn accepts<'m>(
        &self,
        hot: &Hot,
        member: impl FnOnce() -> Option<&'m Member>,
    ) -> bool {
        if let Some(accept) = self.accept {
            if !member().is_some_and(accept) {
                return false;
            }
        }
        if hot.active_connections() >= self.max_active {
            self.over_limit.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// [`accepts`](Self::accepts) for a member at hand.
    #[inline]
    pub(crate) fn accepts_member(&self, m: &Member) -> bool {
        self.accepts(m.live().hot(), || Some(m))
    }

    /// Why a pick with this filter that selected nothing did.
    pub(crate) fn no_selection(&self) -> NoSelection {
        if self.over_limit.load(Ordering::Relaxed) {
            NoSelection::OverLimit
        } else {
            NoSelection::NoneAcceptable
        }
    }
}
