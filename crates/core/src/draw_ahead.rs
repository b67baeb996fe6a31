//! [`DrawAhead`]: a thread's random draws for its next picks of a service,
//! made in batches of [`AHEAD`], with the drawn candidates' lines loaded
//! together (and their line numbers a batch earlier), so that their cache
//! misses overlap each other instead of each pick waiting for its own.
//!
//! ## Rule
//!
//! `random`, `p2c` and `peak_ewma` (and `adaptive` while it uses one of
//! them) begin a pick with one or two uniform positions in `0..n`, drawn
//! from the thread's RNG stream (see [`selection`](crate::selection))
//! independently of the service's state. So those draws can be made
//! early. A thread slot keeps two batches of [`AHEAD`] positions (12
//! `random` picks, 6 pairs), both drawn for `n` members: *the batch*, whose
//! candidates are **touched** (a relaxed load of the hot line, the result
//! kept with [`black_box`] so it is not optimised away), and *the batch
//! after it*, drawn after it from the stream, whose candidates' line
//! numbers are touched. The picks of that thread and service take the
//! batch's positions in order ([`take`](DrawAhead::take)), **only while
//! the member list still has `n` members**; a pick that finds another
//! count throws both batches away and draws afresh. The pick that takes
//! the batch's last position ([`refill`](DrawAhead::refill)) makes the
//! batch after it the batch (touching its lines: their line numbers are
//! in the cache by then) and draws a new batch after it (touching its
//! line numbers); with no batch after it for `n`, it draws both.
//!
//! A position uniform in `0..n`, drawn independently of everything a later
//! pick reads, is exactly the draw that pick would make itself; the
//! snapshot may have changed in between (a new generation with the same
//! count), which no rule looks at until the pick checks the candidate.
//! Eligibility, costs, probes and breaker admission are all checked at the
//! pick's own time, as before: only *when* the random numbers are drawn
//! moves, not *what* is done with them. A draw is taken once.
//!
//! The stream stays the thread's: the batches are its next values, in
//! order, and the picks take them in order, each once (test
//! `service::tests::drawing_ahead_keeps_the_seeded_stream`: a seeded
//! thread picks exactly its stream's positions). The sequence differs
//! from the one before draws were made ahead (the slot's state is stored
//! `| 1` after every pick that drew, now once a batch; a rejected draw's
//! redraw comes after the batch), the distribution does not (test
//! `shares::draws_made_ahead_stay_uniform_across_membership_changes`).
//!
//! ## Why a batch, and why a load
//!
//! At 100,000 instances a pick *is* its misses: the line number (the
//! member list's 400 KB of them) and the hot line (the 6.4 MB arena),
//! one dependent on the other, 65–210 ns each here (issue 12,
//! `docs/benchmarks.md`). The core forbids `unsafe`, so there is no
//! prefetch instruction (`_mm_prefetch` needs it), and a load cannot
//! retire before its data arrives: a touch of only the *next* pick's
//! candidate overlaps at most the processor's reorder window (a few
//! hundred instructions, less than a pick and its release) and then
//! stalls the thread as the pick would have — measured: no faster. Many
//! independent loads issued together, though, are in flight at once, so a
//! batch costs about the latency of one load, not twelve: the two levels
//! of the chain are split over two batches (the line numbers of the batch
//! after, the lines of the batch), so no load of a refill waits for
//! another. The touch runs inside the pick, before the guard's locked
//! `active` +1, which waits for it: the misses are paid once, together.
//!
//! *Costs:* a thread slot keeps `n`, a cursor and 24 positions (104
//! bytes, inside its 128-byte block beside the RNG state); a refill is 12
//! draws, 12 line numbers and 12 lines loaded every 12 (or 6) picks, and
//! batches drawn for a count that changed are thrown away. Below
//! [`TOUCH_FROM`] members (4,096: 256 KiB of hot lines, which stay in the
//! cache) the batches are drawn but not touched.
//!
//! ## Threads sharing a slot
//!
//! Threads beyond the sixteenth share one slot (see `per_thread`), so two
//! of them may take the same draw now and then (both read the cursor
//! before either moves it): two picks with the same first draw, as with
//! the shared RNG state — a little less spread, never a position out of
//! range (every position taken is checked against the pick's `n`).

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::members::Members;

/// Draws per batch: 12 `random` picks or 6 `p2c` pairs (two batches fit
/// the thread slot's block; 16, 24 and 32 in one batch measured no
/// faster than 16).
pub(crate) const AHEAD: usize = 12;

/// Smallest member list whose batches are touched: below it the hot
/// lines (64 B each, 256 KiB at 4,096) and line numbers stay in the
/// cache between picks, and a touch would be instructions for nothing.
const TOUCH_FROM: usize = 4_096;

/// A thread slot's draws for its next picks of one service; see the
/// module doc.
#[derive(Debug, Default)]
pub(crate) struct DrawAhead {
    /// The member count both batches were drawn for; 0: none.
    n: AtomicU32,
    /// The next draw to take; `AHEAD` when the batch is used up.
    cursor: AtomicU32,
    /// The batch: positions in `0..n`, their lines touched.
    at: [AtomicU32; AHEAD],
    /// The batch after it, drawn after it from the stream: positions in
    /// `0..n`, their line numbers touched.
    then: [AtomicU32; AHEAD],
}

impl DrawAhead {
    /// The next draw of the batch for a list of `n` members; `None` if
    /// the batch is used up or was drawn for another `n` (then both
    /// batches are thrown away: the pick's end draws new ones).
    #[inline]
    pub(crate) fn take(&self, n: usize) -> Option<usize> {
        let i = self.cursor.load(Ordering::Relaxed);
        let at = self.at.get(i as usize)?.load(Ordering::Relaxed) as usize;
        if self.n.load(Ordering::Relaxed) as usize != n || at >= n {
            self.cursor.store(AHEAD as u32, Ordering::Relaxed);
            self.n.store(0, Ordering::Relaxed);
            return None;
        }
        self.cursor.store(i + 1, Ordering::Relaxed);
        Some(at)
    }

    /// The next `K` draws of the batch for a list of `n` members, without
    /// taking them (see [`skip`](Self::skip)); `None` if fewer than `K`
    /// are left or the batch was drawn for another `n` (nothing is thrown
    /// away then: a [`take`](Self::take) does that). For the common case
    /// of a pick (`strategy::drawn`), which takes them only if it decides
    /// the pick; else the general pick takes the same draws.
    #[inline]
    pub(crate) fn peek<const K: usize>(&self, n: usize) -> Option<[usize; K]> {
        let i = self.cursor.load(Ordering::Relaxed) as usize;
        let drawn = self.at.get(i..i.checked_add(K)?)?;
        if self.n.load(Ordering::Relaxed) as usize != n {
            return None;
        }
        let mut out = [0; K];
        for (out, at) in out.iter_mut().zip(drawn) {
            *out = at.load(Ordering::Relaxed) as usize;
            if *out >= n {
                return None;
            }
        }
        Some(out)
    }

    /// Takes the `k` draws [`peek`](Self::peek) returned.
    #[inline]
    pub(crate) fn skip(&self, k: usize) {
        let i = self.cursor.load(Ordering::Relaxed);
        self.cursor.store(i + k as u32, Ordering::Relaxed);
    }

    /// Whether the batch is used up (the pick that used it up draws the
    /// next: [`refill`](Self::refill)).
    #[inline]
    pub(crate) fn used_up(&self) -> bool {
        self.cursor.load(Ordering::Relaxed) as usize >= AHEAD
    }

    /// If the batch is used up: the batch after it becomes the batch and
    /// its lines are touched, and a new batch after it is drawn from `rng`
    /// and its line numbers touched (module doc); both are drawn afresh
    /// if there is no batch after it for `members.len()`. Lists beyond
    /// `u32::MAX` members are not drawn ahead for.
    #[inline]
    pub(crate) fn refill(&self, members: &Members, rng: &mut fastrand::Rng) {
        if (self.cursor.load(Ordering::Relaxed) as usize) < AHEAD {
            return;
        }
        self.draw(members, rng);
    }

    #[inline(never)]
    fn draw(&self, members: &Members, rng: &mut fastrand::Rng) {
        let n = members.len();
        let Ok(n32) = u32::try_from(n) else {
            return;
        };
        if n == 0 {
            return;
        }
        let touch = n >= TOUCH_FROM;
        let fresh = self.n.load(Ordering::Relaxed) != n32;
        let mut seen = 0u32;
        for (slot, then) in self.at.iter().zip(&self.then) {
            // `usize`, as a fresh draw makes it: the same stream, the same
            // positions. Below `n`, so it fits a `u32`.
            let at = if fresh {
                rng.usize(..n)
            } else {
                then.load(Ordering::Relaxed) as usize
            };
            slot.store(at as u32, Ordering::Relaxed);
            if touch {
                if let Some(hot) = members.hot(at) {
                    seen ^= hot.active.load(Ordering::Relaxed);
                }
            }
        }
        for then in &self.then {
            let at = rng.usize(..n);
            then.store(at as u32, Ordering::Relaxed);
            if touch {
                seen ^= members.line_number(at).unwrap_or(0);
            }
        }
        black_box(seen);
        self.n.store(n32, Ordering::Relaxed);
        self.cursor.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch lives in the thread slot's block beside the RNG state:
    /// a service's per-thread pick state stays 17 × 128 bytes.
    #[test]
    fn the_batch_fits_the_thread_slots_block() {
        assert!(std::mem::size_of::<crate::selection::PickLocal>() <= 128);
        assert_eq!(
            std::mem::size_of::<crate::per_thread::Padded<crate::selection::PickLocal>>(),
            128
        );
    }

    #[test]
    fn a_batch_is_taken_once_in_order_and_only_for_its_member_count() {
        let ahead = DrawAhead::default();
        let members = Members::default();
        let mut rng = fastrand::Rng::with_seed(3);
        assert_eq!(ahead.take(10), None, "nothing drawn yet");
        ahead.refill(&members, &mut rng);
        assert_eq!(ahead.take(0), None, "no batch for an empty list");
        // A batch drawn by hand (no members needed for the bookkeeping).
        for (i, slot) in ahead.at.iter().enumerate() {
            slot.store(i as u32 % 10, Ordering::Relaxed);
        }
        ahead.n.store(10, Ordering::Relaxed);
        ahead.cursor.store(0, Ordering::Relaxed);
        let taken: Vec<_> = (0..AHEAD).map(|_| ahead.take(10)).collect();
        let want: Vec<_> = (0..AHEAD).map(|i| Some(i % 10)).collect();
        assert_eq!(taken, want, "each draw once, in order");
        assert_eq!(ahead.take(10), None, "used up");
        ahead.cursor.store(0, Ordering::Relaxed);
        assert_eq!(ahead.take(11), None, "drawn for 10 members, not 11");
        assert_eq!(ahead.take(10), None, "and thrown away");
    }
}
