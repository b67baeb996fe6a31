//! [`Hot`]: the one cache line of an instance that a pick reads and writes,
//! and [`HotArena`], where a service keeps them side by side.
//!
//! ## The line
//!
//! Everything a pick reads or writes of an instance — the eligibility
//! inputs (draining, removed, health, breaker state, open window, probes),
//! the cost inputs (active count, a copy of the configured weight,
//! slow-start start, latency estimate and its time, whether it ever
//! answered) and `last_used` — is one 64-byte, 64-aligned block (62 bytes
//! used). The instance's trackers publish to it under their lock
//! (see [`instance`](crate::instance)); picks read it with atomic loads.
//!
//! ## Why an arena
//!
//! At 100,000 instances a pick's time is cache and TLB misses, not
//! instructions (`docs/benchmarks.md`, "Issue 12: picks at 100,000"). When
//! each line sat at the head of its own instance's allocation, the 100,000
//! lines were spread over the ~50 MB of instances: one line in each of some
//! 12,000 pages, so a random candidate cost a TLB miss (a two-dimensional
//! page walk under KVM) on top of the line's own miss. Here a service's
//! lines sit in chunks of [`LINES_PER_CHUNK`] (256 lines, 16 KiB, one
//! allocation each): 6.4 MB over ~1,600 pages at 100,000. A member list
//! keeps its members' line numbers densely and a table of the arena's
//! chunks (see [`members`](crate::members)), so a candidate costs its line
//! number and its line, and the line's page is far more often in the TLB.
//!
//! ## Ownership and the rule for reusing a line
//!
//! A line belongs to one instance's live state ([`HotLine`], inside
//! `InstanceLive`), which every snapshot, strategy table and selection
//! that can reach the instance keeps alive through its `Member`. A chunk
//! is shared (`Arc`) by the lines' owners and by the member lists' chunk
//! tables; lines are atomics, so a shared chunk needs no lock.
//!
//! **Rule:** a line goes back to its arena's free list when its owner — the
//! instance's live state — is dropped, and only then; a new instance takes
//! a free line (resetting every field) before it takes a fresh one. The
//! live state is dropped after the last snapshot that listed the instance,
//! the last strategy table built with it and the last selection on it are
//! gone: each of them holds the instance's `Member`, directly or through the
//! snapshot. So a line is never reused while anything can still read or
//! write it, and its `active` count is 0 then (every selection took back
//! the one it added). No epoch and no `unsafe`: the reference counts that
//! already keep an instance alive are the reclamation rule.
//!
//! The arena holds its newest chunk and its free lines; every other chunk
//! is held by its lines' owners and by the member lists' chunk tables. A
//! chunk refers back to its arena weakly (no cycle: a line dropped after
//! its service is gone has no list to return to and is freed with its
//! chunk). Lines are not given back to the allocator while the service
//! lives: an arena keeps the size of the service's largest membership, 64
//! bytes an instance.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use crate::breaker::CircuitState;
use crate::clock::Timestamp;
use crate::ewma;
use crate::slow_start;

/// Lines per chunk: 16 KiB, four pages.
pub(crate) const LINES_PER_CHUNK: usize = 256;

/// "No timestamp" in the atomics.
pub(crate) const NONE: u64 = u64::MAX;

/// The atomics a pick reads and writes, on one 64-byte line; see the module
/// doc. `repr(C)`: the order below packs 62 bytes.
#[derive(Debug)]
#[repr(C, align(64))]
pub(crate) struct Hot {
    pub(crate) health_bits: AtomicU64,
    pub(crate) open_until: AtomicU64,
    pub(crate) slow_start_began: AtomicU64,
    pub(crate) ewma_bits: AtomicU64,
    pub(crate) ewma_at: AtomicU64,
    pub(crate) last_used: AtomicU64,
    pub(crate) active: AtomicU32,
    pub(crate) probes: AtomicU32,
    /// The configured weight of the member registered now.
    pub(crate) weight: AtomicU16,
    pub(crate) breaker_state: AtomicU8,
    pub(crate) draining: AtomicBool,
    pub(crate) removed: AtomicBool,
    /// Whether a request outcome was ever recorded (`peak_ewma` avoids
    /// only instances that answered).
    pub(crate) answered: AtomicBool,
}

impl Hot {
    /// A line in the state of a removed instance: never eligible.
    fn vacant() -> Self {
        Self {
            health_bits: AtomicU64::new(0),
            open_until: AtomicU64::new(0),
            slow_start_began: AtomicU64::new(NONE),
            ewma_bits: AtomicU64::new(0),
            ewma_at: AtomicU64::new(0),
            last_used: AtomicU64::new(NONE),
            active: AtomicU32::new(0),
            probes: AtomicU32::new(0),
            weight: AtomicU16::new(1),
            breaker_state: AtomicU8::new(CircuitState::Closed.as_u8()),
            draining: AtomicBool::new(false),
            removed: AtomicBool::new(true),
            answered: AtomicBool::new(false),
        }
    }

    /// Sets every field to a new instance's: health 1, breaker closed, the
    /// latency estimate `ewma_ns` at `now`, a slow-start ramp from `now` if
    /// `slow_start`, configured weight `weight`.
    fn reset(&self, now: Timestamp, slow_start: bool, weight: u16, ewma_ns: f64) {
        let r = Ordering::Relaxed;
        self.health_bits.store(1.0f64.to_bits(), r);
        self.open_until.store(0, r);
        let began = if slow_start { now.as_nanos() } else { NONE };
        self.slow_start_began.store(began, r);
        self.ewma_bits.store(ewma_ns.to_bits(), r);
        self.ewma_at.store(now.as_nanos(), r);
        self.last_used.store(NONE, r);
        self.active.store(0, r);
        self.probes.store(0, r);
        self.weight.store(weight, r);
        self.breaker_state.store(CircuitState::Closed.as_u8(), r);
        self.draining.store(false, r);
        self.answered.store(false, r);
        // Last, and released: whoever sees the line not removed sees it
        // reset (the snapshot that publishes the instance orders it too).
        self.removed.store(false, Ordering::Release);
    }

    #[inline]
    pub(crate) fn health(&self) -> f64 {
        f64::from_bits(self.health_bits.load(Ordering::Acquire))
    }

    /// Requests currently holding a selection on this instance.
    #[inline]
    pub(crate) fn active_connections(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// The configured weight of the member registered now.
    #[inline]
    pub(crate) fn weight(&self) -> u16 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Current breaker state as last published.
    #[inline]
    pub(crate) fn circuit_state(&self) -> CircuitState {
        CircuitState::from_u8(self.breaker_state.load(Ordering::Acquire))
    }

    /// Whether normal (non-panic) selection may choose this instance:
    /// not draining or removed, health above 0, and a breaker that is
    /// closed, open past its window (read from `now` only then), or
    /// half-open with a free probe slot.
    #[inline]
    pub(crate) fn admits_traffic(&self, now: impl FnOnce() -> Timestamp, max_probes: u32) -> bool {
        if self.draining.load(Ordering::Acquire) || self.removed.load(Ordering::Acquire) {
            return false;
        }
        if self.health() <= 0.0 {
            return false;
        }
        match self.circuit_state() {
            CircuitState::Closed => true,
            CircuitState::Open => now().as_nanos() >= self.open_until.load(Ordering::Acquire),
            CircuitState::HalfOpen => self.probes.load(Ordering::Acquire) < max_probes,
        }
    }

    /// The weight factor of an instance that normal selection may choose
    /// without reading the time: not draining or removed, health above 0,
    /// breaker closed and no slow-start ramp (or a zero window). Then
    /// [`admits_traffic`](Self::admits_traffic) is true and
    /// [`weight_factor`](Self::weight_factor) is the health (× 1), and
    /// neither reads the clock. `None` for any other instance, eligible or
    /// not: those rules are left to the general pick (`strategy::drawn`).
    #[inline]
    pub(crate) fn plain_factor(&self, slow_start: Duration) -> Option<f64> {
        if self.draining.load(Ordering::Acquire) || self.removed.load(Ordering::Acquire) {
            return None;
        }
        let health = self.health();
        if health <= 0.0 || self.circuit_state() != CircuitState::Closed {
            return None;
        }
        if self.slow_start_began.load(Ordering::Acquire) != NONE && !slow_start.is_zero() {
            return None;
        }
        Some(health)
    }

    /// Whether panic-mode selection may choose this instance: anything not
    /// draining or removed.
    #[inline]
    pub(crate) fn admits_panic_traffic(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && !self.removed.load(Ordering::Acquire)
    }

    /// The slow-start factor, reading the time only during a ramp. A ramp
    /// found at its end is cleared, so it costs no later clock read.
    #[inline]
    pub(crate) fn slow_start_factor(
        &self,
        now: impl FnOnce() -> Timestamp,
        window: Duration,
    ) -> f64 {
        let began = self.slow_start_began.load(Ordering::Acquire);
        if began == NONE || window.is_zero() {
            return 1.0;
        }
        let f = slow_start::factor(Some(Timestamp::from_nanos(began)), now(), window);
        if f >= 1.0 {
            // A restarted ramp (another value) is left alone.
            let _ = self.slow_start_began.compare_exchange(
                began,
                NONE,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
        f
    }

    /// Health score × slow-start factor.
    #[inline]
    pub(crate) fn weight_factor(
        &self,
        now: impl FnOnce() -> Timestamp,
        slow_start: Duration,
    ) -> f64 {
        self.health() * self.slow_start_factor(now, slow_start)
    }

    /// Peak-EWMA latency as of the last sample, undecayed.
    #[inline]
    pub(crate) fn latency_ewma_ns(&self) -> f64 {
        f64::from_bits(self.ewma_bits.load(Ordering::Relaxed))
    }

    /// Peak-EWMA latency as of the last sample, and the sample's time.
    #[inline]
    pub(crate) fn latency_sample(&self) -> (f64, Timestamp) {
        let e = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        (
            e,
            Timestamp::from_nanos(self.ewma_at.load(Ordering::Relaxed)),
        )
    }

    /// Peak-EWMA latency estimate decayed to `now`.
    #[inline]
    pub(crate) fn latency_estimate_ns(&self, now: Timestamp) -> f64 {
        let e = f64::from_bits(self.ewma_bits.load(Ordering::Relaxed));
        let at = Timestamp::from_nanos(self.ewma_at.load(Ordering::Relaxed));
        e * ewma::decay_weight(at, now)
    }
}

/// [`LINES_PER_CHUNK`] lines in one allocation.
#[derive(Debug)]
pub(crate) struct HotChunk {
    lines: [Hot; LINES_PER_CHUNK],
    /// Where a dropped line goes (module doc).
    arena: Weak<HotArena>,
    /// The chunk's number in its arena: lines `number × 256 ..`.
    number: u32,
}

impl HotChunk {
    /// The chunk's number in its arena.
    #[inline]
    pub(crate) fn number(&self) -> usize {
        self.number as usize
    }

    /// Line `i` of the chunk.
    #[inline]
    pub(crate) fn line(&self, i: usize) -> &Hot {
        &self.lines[i % LINES_PER_CHUNK]
    }
}

/// A reference to one line: its chunk and its index there. Cloning it
/// does not own the line (see [`HotLine`]); a member-list slot holds one
/// beside the `Member` that owns the line.
#[derive(Debug, Clone)]
pub(crate) struct HotRef {
    chunk: Arc<HotChunk>,
    index: usize,
}

impl HotRef {
    /// The line.
    #[inline]
    pub(crate) fn get(&self) -> &Hot {
        // `index < LINES_PER_CHUNK`: `HotArena::take` makes every `HotRef`.
        &self.chunk.lines[self.index % LINES_PER_CHUNK]
    }

    /// The line's chunk.
    pub(crate) fn chunk(&self) -> &Arc<HotChunk> {
        &self.chunk
    }

    /// The line's number in its arena: chunk number × 256 + index.
    pub(crate) fn number(&self) -> u32 {
        self.chunk.number * LINES_PER_CHUNK as u32 + self.index as u32
    }
}

/// An instance's ownership of its line: the line goes back to the arena's
/// free list when this is dropped (module doc, the rule).
#[derive(Debug)]
pub(crate) struct HotLine(HotRef);

impl HotLine {
    /// The line.
    #[inline]
    pub(crate) fn get(&self) -> &Hot {
        self.0.get()
    }

    /// A reference to the line, for a member-list slot.
    pub(crate) fn share(&self) -> HotRef {
        self.0.clone()
    }
}

impl Drop for HotLine {
    fn drop(&mut self) {
        if let Some(arena) = self.0.chunk.arena.upgrade() {
            arena.inner.lock().free.push(self.0.clone());
        }
    }
}

/// A service's lines; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct HotArena {
    inner: Mutex<ArenaInner>,
}

#[derive(Debug, Default)]
struct ArenaInner {
    /// Lines whose owner was dropped.
    free: Vec<HotRef>,
    /// The chunk fresh lines come from, and how many it handed out. Full
    /// chunks are kept alive by their lines' owners and the free list.
    last: Option<Arc<HotChunk>>,
    used_in_last: usize,
    /// Chunks allocated: the next chunk's number.
    chunks: usize,
}

impl HotArena {
    /// A line for a new instance, reset (see [`Hot::reset`]): a free one if
    /// there is one, else the next fresh one.
    pub(crate) fn take(
        self: &Arc<Self>,
        now: Timestamp,
        slow_start: bool,
        weight: u16,
        ewma_ns: f64,
    ) -> HotLine {
        let mut inner = self.inner.lock();
        let line = match inner.free.pop() {
            Some(r) => r,
            None => {
                let chunk = match &inner.last {
                    Some(c) if inner.used_in_last < LINES_PER_CHUNK => c.clone(),
                    _ => {
                        let c = Arc::new(HotChunk {
                            lines: std::array::from_fn(|_| Hot::vacant()),
                            arena: Arc::downgrade(self),
                            number: u32::try_from(inner.chunks).unwrap_or(u32::MAX),
                        });
                        inner.last = Some(c.clone());
                        inner.used_in_last = 0;
                        inner.chunks += 1;
                        c
                    }
                };
                let index = inner.used_in_last;
                inner.used_in_last += 1;
                HotRef { chunk, index }
            }
        };
        drop(inner);
        line.get().reset(now, slow_start, weight, ewma_ns);
        HotLine(line)
    }

    /// Lines owned and free, for tests.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        let total = inner.chunks.saturating_sub(1) * LINES_PER_CHUNK + inner.used_in_last;
        (total - inner.free.len(), inner.free.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(arena: &Arc<HotArena>) -> HotLine {
        arena.take(Timestamp::default(), false, 3, 1.0)
    }

    #[test]
    fn a_line_is_reused_only_after_its_owner_is_dropped_and_comes_back_reset() {
        let arena = Arc::new(HotArena::default());
        let lines: Vec<HotLine> = (0..300).map(|_| take(&arena)).collect();
        assert_eq!(arena.counts(), (300, 0));
        // Two chunks; every line distinct.
        let mut seen = std::collections::HashSet::new();
        for l in &lines {
            assert!(seen.insert(std::ptr::from_ref(l.get()) as usize));
        }
        // A shared reference does not keep the line: its owner does.
        let victim = &lines[7];
        let shared = victim.share();
        victim.get().active.store(2, Ordering::Relaxed);
        victim.get().removed.store(true, Ordering::Relaxed);
        let addr = std::ptr::from_ref(victim.get()) as usize;
        let mut lines = lines;
        let owner = lines.remove(7);
        let again = take(&arena);
        assert_ne!(
            std::ptr::from_ref(again.get()) as usize,
            addr,
            "owner alive: fresh line"
        );
        drop(owner);
        assert_eq!(arena.counts(), (300, 1));
        let reused = take(&arena);
        assert_eq!(
            std::ptr::from_ref(reused.get()) as usize,
            addr,
            "the freed line"
        );
        assert_eq!(std::ptr::from_ref(shared.get()) as usize, addr);
        let h = reused.get();
        assert_eq!(h.active_connections(), 0);
        assert!(!h.removed.load(Ordering::Relaxed));
        assert_eq!(h.weight(), 3);
        assert_eq!(h.health(), 1.0);
        assert!(h.admits_traffic(Timestamp::default, 1));
    }

    #[test]
    fn lines_outliving_their_arena_are_dropped_quietly() {
        let arena = Arc::new(HotArena::default());
        let line = take(&arena);
        drop(arena);
        assert_eq!(line.get().weight(), 3);
        drop(line);
    }

    #[test]
    fn a_line_is_one_aligned_cache_line() {
        assert_eq!(std::mem::size_of::<Hot>(), 64);
        assert_eq!(std::mem::align_of::<Hot>(), 64);
        let arena = Arc::new(HotArena::default());
        let line = take(&arena);
        assert_eq!(std::ptr::from_ref(line.get()) as usize % 64, 0);
    }
}
