//! [`Members`]: the member list of one service snapshot, a chunked
//! copy-on-write vector.
//!
//! ## Why chunks
//!
//! A snapshot is immutable and shared with readers, so every registration
//! builds a new one. Copying a flat `Vec<Arc<Member>>` of 100,000 entries
//! costs 100,000 reference-count increments (about a millisecond). Here the
//! list is `n / 256` shared chunks of 256 members: a change copies the one or
//! two chunks it touches plus the chunk pointers, O(√n)-ish work, a few
//! microseconds at 100,000. Removal is swap-remove, so every chunk but the
//! last stays full and index → (chunk, slot) is a division.
//!
//! ## Where a pick looks
//!
//! A pick checks a candidate on its instance's hot line
//! (module `hot`) and never reads the `Member` unless a filter or a
//! breaker that is not closed needs it. So each chunk keeps, beside its
//! slots, the members' hot-line numbers densely (`u32`, 4 bytes a member:
//! 400 KB at 100,000, against 1.6 MB of slots), and the list keeps a table
//! of the arena's chunks by number (~400 pointers at 100,000, shared
//! between snapshots until a chunk is added). A candidate costs the line
//! number and the line: two dependent loads, the first of which usually
//! hits the cache. Every line a slot names is owned by the slot's member's
//! live state, so it cannot be reused while the list holds the member.
//! All members of one list take their lines from one arena (the service's):
//! the table is indexed by that arena's chunk numbers.
//!
//! Each chunk keeps inclusive prefix sums of its configured weights, and the
//! list keeps prefix sums over chunks, so a weighted random draw is two
//! binary searches (O(log n)) with no per-pick scan.

use std::sync::Arc;

use crate::hot::{Hot, HotChunk, HotRef, LINES_PER_CHUNK};
use crate::instance::Member;

/// Members per chunk.
const CHUNK: usize = 256;

/// The members of a service, in registration order except for swap-removes.
#[derive(Debug, Clone, Default)]
pub struct Members {
    chunks: Vec<Arc<Chunk>>,
    /// `chunk_cum[i]` = total configured weight of chunks `0..=i`.
    chunk_cum: Vec<u64>,
    len: usize,
    min_weight: u16,
    max_weight: u16,
    /// The hot-line chunks of the members' lines, by chunk number: every
    /// line a slot names is in a chunk listed here (module doc).
    /// A slice, not a `Vec`, behind the `Arc`: a line's lookup reads the
    /// table's entry straight after the list, one dependent load fewer
    /// than through a `Vec`'s header (issue 12, sixth pass).
    hot_chunks: Arc<[Option<Arc<HotChunk>>]>,
}

#[derive(Debug, Clone, Default)]
struct Chunk {
    members: Slots,
    min_weight: u16,
    max_weight: u16,
}

/// A chunk's slots, inline in the chunk's allocation: a lookup follows the
/// chunk pointer to the slot, not a chunk header to a separate buffer (one
/// dependent load and ~400 pages fewer at 100,000 members).
///
/// The slots' prefix sums of configured weights are kept beside them, inline
/// (4 bytes a member: at most 256 × 1,000 fits a `u32`), and a member's
/// weight is the difference of two sums: a change updates the sums after
/// it without reading members (256 cache misses at 100,000 members), and a
/// weighted draw searches them without another allocation.
#[derive(Debug, Clone)]
struct Slots {
    len: usize,
    /// `Some` exactly at `0..len`.
    slots: [Option<Slot>; CHUNK],
    /// `cum[i]` = total configured weight of the members in slots `0..=i`.
    cum: [u32; CHUNK],
    /// `lines[i]` = the hot line number of the member in slot `i`, dense
    /// (module doc, "Where a pick looks").
    lines: [u32; CHUNK],
}

impl Default for Slots {
    fn default() -> Self {
        Self {
            len: 0,
            slots: [const { None }; CHUNK],
            cum: [0; CHUNK],
            lines: [0; CHUNK],
        }
    }
}

impl Slots {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    fn get(&self, i: usize) -> Option<&Slot> {
        self.slots.get(i)?.as_ref()
    }

    /// Total configured weight of the slots.
    fn total(&self) -> u32 {
        self.len.checked_sub(1).map_or(0, |last| self.cum[last])
    }

    /// The configured weight of the member in slot `i` (in `0..len`).
    fn weight(&self, i: usize) -> u32 {
        let before = if i == 0 { 0 } else { self.cum[i - 1] };
        self.cum[i] - before
    }

    /// Puts `slot` (whose member has configured weight `weight`) at `i`
    /// (in `0..len`); returns the slot it replaces.
    fn replace(&mut self, i: usize, slot: Slot, weight: u16) -> Option<Slot> {
        if i >= self.len {
            return None;
        }
        let old = self.weight(i);
        for cum in &mut self.cum[i..self.len] {
            // `*cum ≥ old`: a sum includes the weight it replaces.
            *cum = *cum - old + u32::from(weight);
        }
        self.lines[i] = slot.line;
        self.slots[i].replace(slot)
    }

    /// Appends; the caller checks `len() < CHUNK`.
    fn push(&mut self, slot: Slot, weight: u16) {
        let total = self.total();
        if let Some(free) = self.slots.get_mut(self.len) {
            self.lines[self.len] = slot.line;
            *free = Some(slot);
            self.cum[self.len] = total + u32::from(weight);
            self.len += 1;
        }
    }

    /// Removes the last slot; with its member's weight.
    fn pop(&mut self) -> Option<(Slot, u16)> {
        let last = self.len.checked_sub(1)?;
        let weight = self.weight(last);
        let slot = self.slots.get_mut(last)?.take()?;
        self.len = last;
        // Below 1,001: every weight pushed was a `u16` of at most 1,000.
        Some((slot, u16::try_from(weight).unwrap_or(u16::MAX)))
    }

    fn iter(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().take(self.len).flatten()
    }

    /// The members' configured weights, in slot order.
    fn weights(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).map(|i| self.weight(i))
    }

    /// The prefix sums of the slots in use.
    fn sums(&self) -> &[u32] {
        &self.cum[..self.len]
    }
}

/// One member and its hot line's number; see the module doc.
#[derive(Debug, Clone)]
pub(crate) struct Slot {
    member: Arc<Member>,
    line: u32,
}

impl Slot {
    fn new(member: Arc<Member>, hot: &HotRef) -> Self {
        Self {
            member,
            line: hot.number(),
        }
    }

    /// The member.
    #[inline]
    pub(crate) fn member(&self) -> &Arc<Member> {
        &self.member
    }

    /// The member's hot line number.
    #[inline]
    pub(crate) fn line(&self) -> u32 {
        self.line
    }
}

/// A member considered by a pick: its position and its hot line. The
/// member itself is read only if asked for ([`member`](Self::member)).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate<'a> {
    members: &'a Members,
    /// The position in the member list.
    pub(crate) index: usize,
    /// The hot line's number (the selection keeps it for its release).
    pub(crate) line: u32,
    /// The hot line.
    pub(crate) hot: &'a Hot,
}

impl<'a> Candidate<'a> {
    /// The member (a read of its list slot).
    #[inline]
    pub(crate) fn member(&self) -> Option<&'a Arc<Member>> {
        self.members.get(self.index)
    }
}

impl Members {
    /// Number of members.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The member at `index`.
    #[inline]
    pub fn get(&self, index: usize) -> Option<&Arc<Member>> {
        self.slot(index).map(Slot::member)
    }

    /// The slot at `index`: the member and its live state.
    #[inline]
    pub(crate) fn slot(&self, index: usize) -> Option<&Slot> {
        self.chunks.get(index / CHUNK)?.members.get(index % CHUNK)
    }

    /// The hot line of the member at `index`: the chunk's dense line
    /// number, then the line (module doc, "Where a pick looks").
    #[inline]
    pub(crate) fn hot(&self, index: usize) -> Option<&Hot> {
        self.hot_line(self.line_number(index)?)
    }

    /// The hot-line number of the member at `index`.
    #[inline]
    pub(crate) fn line_number(&self, index: usize) -> Option<u32> {
        let chunk = &self.chunks.get(index / CHUNK)?.members;
        let s = index % CHUNK;
        (s < chunk.len).then(|| chunk.lines[s])
    }

    /// Hot line number `line` (of a member of this list).
    #[inline]
    pub(crate) fn hot_line(&self, line: u32) -> Option<&Hot> {
        let line = line as usize;
        let chunk = self.hot_chunks.get(line / LINES_PER_CHUNK)?.as_ref()?;
        Some(chunk.line(line % LINES_PER_CHUNK))
    }

    /// The member at `index` as a pick's candidate.
    #[inline]
    pub(crate) fn candidate(&self, index: usize) -> Option<Candidate<'_>> {
        self.candidate_on(index, self.line_number(index)?)
    }

    /// The member at `index`, whose hot line number the caller knows to be
    /// `line`, as a pick's candidate: no read of the list's line numbers.
    #[inline]
    pub(crate) fn candidate_on(&self, index: usize, line: u32) -> Option<Candidate<'_>> {
        Some(Candidate {
            members: self,
            index,
            line,
            hot: self.hot_line(line)?,
        })
    }

    /// Every member as a candidate, in list order (O(n)).
    pub(crate) fn candidates(&self) -> impl Iterator<Item = Candidate<'_>> {
        (0..self.len).filter_map(|i| self.candidate(i))
    }

    /// Records the chunk of `hot` in the list's table of line chunks.
    fn note_chunk(&mut self, hot: &HotRef) {
        let n = hot.chunk().number();
        let known = self
            .hot_chunks
            .get(n)
            .and_then(Option::as_ref)
            .is_some_and(|c| Arc::ptr_eq(c, hot.chunk()));
        if !known {
            // A new table (the old one may be shared with other snapshots,
            // as `Arc::make_mut` would copy it too): once per chunk of 256
            // lines added or replaced.
            let mut table = self.hot_chunks.to_vec();
            if table.len() <= n {
                table.resize(n + 1, None);
            }
            table[n] = Some(hot.chunk().clone());
            self.hot_chunks = table.into();
        }
    }

    /// Iterates over all members (O(n); not for the selection path).
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Member>> {
        self.slots().map(Slot::member)
    }

    /// Iterates over all slots (O(n)).
    pub(crate) fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.chunks.iter().flat_map(|c| c.members.iter())
    }

    /// Sum of configured weights.
    pub fn total_weight(&self) -> u64 {
        self.chunk_cum.last().copied().unwrap_or(0)
    }

    /// Whether every member has the same configured weight.
    pub fn uniform_weights(&self) -> bool {
        self.min_weight == self.max_weight
    }

    /// The largest configured weight (0 when empty).
    pub fn max_weight(&self) -> u16 {
        self.max_weight
    }

    /// The member whose configured-weight interval holds `point`, for
    /// `point < total_weight()`. O(log n).
    pub fn index_by_weight(&self, point: u64) -> Option<usize> {
        let c = self.chunk_cum.partition_point(|&cum| cum <= point);
        let chunk = self.chunks.get(c)?;
        let before = if c == 0 { 0 } else { self.chunk_cum[c - 1] };
        let within = point - before;
        let i = chunk
            .members
            .sums()
            .partition_point(|&cum| u64::from(cum) <= within);
        (i < chunk.members.len()).then_some(c * CHUNK + i)
    }

    /// Appends a member; returns its index.
    pub(crate) fn push(&mut self, member: Arc<Member>) -> usize {
        if self.chunks.last().is_none_or(|c| c.members.len() == CHUNK) {
            self.chunks.push(Arc::new(Chunk::default()));
            self.chunk_cum.push(0);
        }
        // O(1): only the last chunk and the last prefix sum change.
        let c = self.chunks.len() - 1;
        let w = member.instance().weight().get();
        let before = if c == 0 { 0 } else { self.chunk_cum[c - 1] };
        let hot = member.live().hot_ref();
        self.note_chunk(&hot);
        let chunk = Arc::make_mut(&mut self.chunks[c]);
        chunk.members.push(Slot::new(member, &hot), w);
        let sum = u64::from(chunk.members.total());
        chunk.min_weight = if chunk.members.len() == 1 {
            w
        } else {
            chunk.min_weight.min(w)
        };
        chunk.max_weight = chunk.max_weight.max(w);
        self.chunk_cum[c] = before + sum;
        self.min_weight = if self.len == 0 {
            w
        } else {
            self.min_weight.min(w)
        };
        self.max_weight = self.max_weight.max(w);
        self.len += 1;
        self.len - 1
    }

    /// Replaces the member at `index`.
    pub(crate) fn set(&mut self, index: usize, member: Arc<Member>) {
        let (c, s) = (index / CHUNK, index % CHUNK);
        let hot = member.live().hot_ref();
        self.note_chunk(&hot);
        if let Some(chunk) = self.chunks.get_mut(c) {
            let w = member.instance().weight().get();
            if Arc::make_mut(chunk)
                .members
                .replace(s, Slot::new(member, &hot), w)
                .is_some()
            {
                self.refresh(&[c]);
            }
        }
    }

    /// Removes the member at `index` by moving the last member into its
    /// place. Returns the removed member and, if one moved, the moved
    /// member's new index (its old index was `len()` before the call − 1).
    pub(crate) fn swap_remove(&mut self, index: usize) -> Option<Arc<Member>> {
        if index >= self.len {
            return None;
        }
        let last_c = self.chunks.len() - 1;
        let (last, weight) = Arc::make_mut(&mut self.chunks[last_c]).members.pop()?;
        self.len -= 1;
        let removed = if index == self.len {
            last
        } else {
            let (c, s) = (index / CHUNK, index % CHUNK);
            // Some: `index < len`, and every slot below len is set.
            Arc::make_mut(&mut self.chunks[c])
                .members
                .replace(s, last, weight)?
        };
        let removed = removed.member;
        if self.chunks[last_c].members.is_empty() {
            self.chunks.pop();
            self.chunk_cum.pop();
        }
        let touched = [index / CHUNK, last_c];
        self.refresh(&touched);
        Some(removed)
    }

    /// Recomputes the sums of the chunks in `touched`, then the totals.
    fn refresh(&mut self, touched: &[usize]) {
        for &c in touched {
            if let Some(chunk) = self.chunks.get_mut(c) {
                let chunk = Arc::make_mut(chunk);
                let (mut lo, mut hi) = (u32::from(u16::MAX), 0u32);
                for w in chunk.members.weights() {
                    lo = lo.min(w);
                    hi = hi.max(w);
                }
                // Weights are `u16`s; the fallback is unreachable.
                chunk.min_weight = u16::try_from(lo).unwrap_or(u16::MAX);
                chunk.max_weight = u16::try_from(hi).unwrap_or(u16::MAX);
            }
        }
        let mut sum = 0u64;
        let (mut lo, mut hi) = (u16::MAX, 0u16);
        for (c, chunk) in self.chunks.iter().enumerate() {
            sum += u64::from(chunk.members.total());
            self.chunk_cum[c] = sum;
            lo = lo.min(chunk.min_weight);
            hi = hi.max(chunk.max_weight);
        }
        self.min_weight = if self.len == 0 { 0 } else { lo };
        self.max_weight = hi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::hot::HotArena;
    use crate::instance::{InstanceLive, ServiceInstance, Weight};

    /// One arena for every test member, as a service has (the list's
    /// table of line chunks is by the arena's chunk numbers).
    static ARENA: std::sync::LazyLock<Arc<HotArena>> = std::sync::LazyLock::new(Arc::default);

    fn member(i: usize, w: u64) -> Arc<Member> {
        let inst = ServiceInstance::try_new(&format!("m{i}"), "h", 1)
            .unwrap()
            .with_weight(Weight::try_new(w).unwrap());
        Arc::new(Member::new(
            inst,
            Arc::new(InstanceLive::new(
                &ARENA,
                Timestamp::default(),
                false,
                Weight::try_new(w).unwrap(),
            )),
        ))
    }

    #[test]
    fn push_remove_and_weight_lookup_stay_consistent() {
        let mut m = Members::default();
        let mut model: Vec<(String, u64)> = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        for step in 0..3000 {
            if model.is_empty() || rng.u8(..) < 170 {
                let w = rng.u64(1..=1000);
                m.push(member(step, w));
                model.push((format!("m{step}"), w));
            } else if rng.u8(..) < 128 {
                let i = rng.usize(..model.len());
                let removed = m.swap_remove(i).unwrap();
                assert_eq!(removed.instance().id().as_str(), model.swap_remove(i).0);
            } else {
                // A re-registration with a new weight, in place.
                let i = rng.usize(..model.len());
                let w = rng.u64(1..=1000);
                m.set(i, member(step, w));
                model[i] = (format!("m{step}"), w);
            }
            assert_eq!(m.len(), model.len());
        }
        for (i, (id, _)) in model.iter().enumerate() {
            let member = m.get(i).unwrap();
            assert_eq!(member.instance().id().as_str(), id);
            // The dense line numbers follow every push, swap and replace.
            assert!(std::ptr::eq(m.hot(i).unwrap(), member.live().hot()), "{id}");
        }
        assert!(m.hot(model.len()).is_none());
        let total: u64 = model.iter().map(|x| x.1).sum();
        assert_eq!(m.total_weight(), total);
        let max = model.iter().map(|x| x.1).max().unwrap_or(0);
        assert_eq!(u64::from(m.max_weight()), max);
        // Every weight point maps to the member owning that interval.
        let mut point = 0;
        for (i, (_, w)) in model.iter().enumerate() {
            assert_eq!(m.index_by_weight(point), Some(i));
            assert_eq!(m.index_by_weight(point + w - 1), Some(i));
            point += w;
        }
        assert_eq!(m.index_by_weight(total), None);
        // An old clone is unaffected by later changes (copy-on-write).
        let before = m.clone();
        m.swap_remove(0);
        assert_eq!(before.len(), model.len());
        assert_eq!(before.get(0).unwrap().instance().id().as_str(), model[0].0);
    }
}
