//! [`DrawAhead`]: a thread's random draws for its next picks of a service,
//! made in batches of [`AHEAD`], with the drawn candidates' lines loaded
//! together, so that their cache misses overlap each other instead of
//! each pick waiting for its own.
//!
//! ## Rule
//!
//! `random`, `p2c` and `peak_ewma` (and `adaptive` while it uses one of
//! them) begin a pick with one or two uniform positions in `0..n`, drawn
//! from the thread's RNG stream (see [`selection`](crate::selection))
//! independently of the service's state. So those draws can be made
//! early: when a pick ends and its thread slot has no draw left
//! ([`refill`](DrawAhead::refill)), it draws the first positions of the
//! thread's next [`AHEAD`] draws (16 `random` picks, 8 pairs) from its
//! stream, remembers them with `n`, and **touches** each candidate (a
//! relaxed load of its line number and of its hot line, the result kept
//! with [`black_box`] so it is not optimised away). The next picks of that
//! thread and service take them in order ([`take`](DrawAhead::take)),
//! **only while the member list still has `n` members**; a pick that
//! finds another count (or no draw left) draws afresh.
//!
//! A position uniform in `0..n`, drawn independently of everything a later
//! pick reads, is exactly the draw that pick would make itself; the
//! snapshot may have changed in between (a new generation with the same
//! count), which no rule looks at until the pick checks the candidate.
//! Eligibility, costs, probes and breaker admission are all checked at the
//! pick's own time, as before: only *when* the random numbers are drawn
//! moves, not *what* is done with them. A draw is taken once.
//!
//! The stream stays the thread's: the batch is the next values of its
//! RNG, and the picks take them in order, each once (test
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
//! one dependent on the other, ~100 ns each here (issue 12,
//! `docs/benchmarks.md`). The core forbids `unsafe`, so there is no
//! prefetch instruction (`_mm_prefetch` needs it), and a load cannot
//! retire before its data arrives: a touch of only the *next* pick's
//! candidate overlaps at most the processor's reorder window (a few
//! hundred instructions, less than a pick and its release) and then
//! stalls the thread as the pick would have — measured: no faster. Many
//! independent loads issued together, though, are in flight at once, so a
//! batch of 16 costs about the latency of one chain, not sixteen. The
//! touch runs inside the pick, before the guard's locked `active` +1,
//! which waits for it: the batch's misses are paid once, together.
//!
//! *Costs:* a thread slot keeps `n` and 16 positions (72 bytes, inside its
//! 128-byte block); a batch is 16 draws and 16 lines loaded every 16 (or
//! 8) picks, and a batch drawn for a count that changed is thrown away.
//! Below [`TOUCH_FROM`] members (4,096: 256 KiB of hot lines, which stay
//! in the cache) the batch is drawn but not touched.
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

/// Draws remembered per batch: 16 `random` picks or 8 `p2c` pairs.
pub(crate) const AHEAD: usize = 16;

/// Smallest member list whose batches are touched: below it the hot
/// lines (64 B each, 256 KiB at 4,096) and line numbers stay in the
/// cache between picks, and a touch would be instructions for nothing.
const TOUCH_FROM: usize = 4_096;

/// A thread slot's draws for its next picks of one service; see the
/// module doc.
#[derive(Debug, Default)]
pub(crate) struct DrawAhead {
    /// The member count the batch was drawn for; 0: none.
    n: AtomicU32,
    /// The next draw to take; `AHEAD` when the batch is used up.
    cursor: AtomicU32,
    /// The batch: positions in `0..n`.
    at: [AtomicU32; AHEAD],
}

impl DrawAhead {
    /// The next draw of the batch for a list of `n` members; `None` if
    /// the batch is used up or was drawn for another `n` (then it is
    /// thrown away: the pick's end draws a new one).
    #[inline]
    pub(crate) fn take(&self, n: usize) -> Option<usize> {
        let i = self.cursor.load(Ordering::Relaxed);
        let at = self.at.get(i as usize)?.load(Ordering::Relaxed) as usize;
        if self.n.load(Ordering::Relaxed) as usize != n || at >= n {
            self.cursor.store(AHEAD as u32, Ordering::Relaxed);
            return None;
        }
        self.cursor.store(i + 1, Ordering::Relaxed);
        Some(at)
    }

    /// If the batch is used up: draws a new one of [`AHEAD`] positions in
    /// `0..members.len()` from `rng` and touches their candidates (module
    /// doc). Lists beyond `u32::MAX` members are not drawn ahead for.
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
        let mut seen = 0u32;
        for slot in &self.at {
            // `usize`, as a fresh draw makes it: the same stream, the same
            // positions. Below `n`, so it fits a `u32`.
            let at = rng.usize(..n);
            slot.store(at as u32, Ordering::Relaxed);
            if touch {
                if let Some(hot) = members.hot(at) {
                    seen ^= hot.active.load(Ordering::Relaxed);
                }
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
