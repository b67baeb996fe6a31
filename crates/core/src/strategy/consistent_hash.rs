//! `consistent_hash`: Maglev hashing (Eisenbud et al., NSDI 2016) on a key
//! the caller supplies (a header, a cookie, the client IP).
//!
//! ## Rule
//!
//! A lookup table of `M` slots (`M` prime: at least 100 slots per instance
//! and at least 65,537; above a million slots, ten per instance) is filled by letting every instance claim slots in the
//! order of its own permutation `(offset + j·skip) mod M`, taking turns, so
//! each instance owns `⌊M/N⌋` or `⌈M/N⌉` slots. A key maps to
//! `table[hash(key) mod M]`. Adding or removing one of N instances moves
//! about 1/N of the keys to or from it, plus some churn between the other
//! instances that a ring hash would not have (measured with 100,000 keys:
//! 2.5 % extra at N = 10, about 55 % extra at N = 100, total still under
//! 2/N), in exchange for near-perfect balance and an O(1) lookup.
//!
//! If the key's instance is not eligible (or the caller's `select_with`
//! filter refuses it) the lookup walks to the following slots, owned by
//! effectively random other instances, so the displaced keys spread out. It
//! tries up to 8 instances in table order (skipping repeated slots of one
//! already tried, within 64 slots), then falls back to a random instance.
//! The walk is deterministic: a key whose instance is refused goes to the
//! same next instance every time. A pick without a key is random.
//!
//! ## Cost
//!
//! A pick hashes the key and reads the table's slot, which holds the
//! owner's *hot line number*, then the owner's line and its index (a
//! table of the line's member, `index_of_line`): those two loads need only
//! the slot, so they overlap, and the member list's line numbers are not
//! read (one dependent miss fewer than a slot holding the position, which
//! needs the list's line number before the line: issue 12, fifth pass in
//! `docs/benchmarks.md`). Cost: 4 bytes per line of the arena per table
//! (400 KB at 100,000). It reaches the table through its snapshot: the
//! first pick that finds a table built for the snapshot's generation keeps
//! it in the snapshot (`Snapshot::table`), and later picks of that
//! snapshot read it with one load, not the strategy's `ArcSwap` (whose
//! load and guard are two locked instructions). A snapshot kept alive
//! past the next rebuild (by a selection, or a thread that stopped
//! picking) keeps its table alive with it: 4 MiB at 100,000 instances.
//!
//! The table is rebuilt on membership change: O(M log M); at 100,000
//! instances `M` = 1,048,573 slots, 4 MiB, and a rebuild takes tens of
//! milliseconds (see `docs/benchmarks.md`). Up to 1,000 members (`M` =
//! 65,537) it happens at once in [`Strategy::prepare`]; above, in
//! [`Strategy::maintain`] (the server's periodic `Registry::maintain`) or,
//! failing that, inline on a pick at most once a second. One rebuild runs at
//! a time (others keep using the previous table), and a rebuild never
//! replaces a newer table. The table keeps its own member list so a stale
//! table still names valid members (removed ones are skipped like
//! ineligible ones).

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use super::{rebuild_inline, PickContext, Picked, Strategy, StrategyKind};
use crate::clock::Timestamp;
use crate::members::{Members, Slot};

/// Candidate table sizes: primes, smallest first.
const TABLE_SIZES: [u64; 8] = [
    65_537, 131_071, 262_139, 524_287, 1_048_573, 2_097_143, 4_194_301, 8_388_593,
];
/// Instances tried along the table before falling back to random.
const MAX_WALK: u64 = 8;
/// Slots walked at most while looking for those instances.
const MAX_WALK_SLOTS: u64 = 64;

/// Maglev consistent hashing.
#[derive(Debug, Default)]
pub struct ConsistentHash {
    table: ArcSwapOption<Table>,
    /// Held while a rebuild runs, so concurrent picks do not all rebuild.
    rebuilding: parking_lot::Mutex<()>,
}

/// Largest member list whose table is rebuilt inside the registration.
const EAGER_LIMIT: usize = 1_000;

#[derive(Debug)]
struct Table {
    generation: u64,
    built_at: Timestamp,
    /// The members the table was built from, with their live state, so a
    /// lookup checks the owner without reading its `Member`.
    members: Vec<Slot>,
    /// The table: each slot's owner, by its hot line number (module doc,
    /// "Cost").
    slots: Vec<u32>,
    /// Index in `members` of the member on each hot line number
    /// (`u32::MAX` for a line of none).
    index_of_line: Vec<u32>,
}

/// A stable 64-bit hash (FNV-1a, then a SplitMix64 finaliser for avalanche).
/// Stable across processes and releases, so every balancer node maps a key
/// the same way.
pub fn key_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Table {
    fn build(members: &Members, generation: u64, built_at: Timestamp) -> Self {
        let members: Vec<Slot> = members.slots().cloned().collect();
        let n = members.len() as u64;
        // Many slots per instance keep Maglev's extra churn low; past a
        // million slots, ten per instance bound the table's memory.
        let want = n
            .saturating_mul(1000)
            .min(n.saturating_mul(10).max(1_048_573));
        let m = TABLE_SIZES
            .iter()
            .copied()
            .find(|&s| s >= want)
            .unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1]);
        let mut slots = vec![u32::MAX; m as usize];
        if n == 0 {
            return Table {
                generation,
                built_at,
                members,
                slots: Vec::new(),
                index_of_line: Vec::new(),
            };
        }
        let lines = members.iter().map(|s| s.line() as usize).max().unwrap_or(0) + 1;
        let mut index_of_line = vec![u32::MAX; lines];
        for (i, slot) in members.iter().enumerate() {
            index_of_line[slot.line() as usize] = i as u32;
        }
        let perms: Vec<(u64, u64)> = members
            .iter()
            .map(|mem| {
                let h = key_hash(mem.member().instance().id().as_str().as_bytes());
                let offset = h % m;
                let skip = mix(h ^ 0x9e37_79b9_7f4a_7c15) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; members.len()];
        let mut filled = 0u64;
        'fill: loop {
            for (i, &(offset, skip)) in perms.iter().enumerate() {
                // Bounded by M: a permutation visits every slot once.
                loop {
                    let c = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if slots[c] == u32::MAX {
                        slots[c] = members[i].line();
                        break;
                    }
                }
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Table {
            generation,
            built_at,
            members,
            slots,
            index_of_line,
        }
    }

    /// The key's instance by the walk of the module doc. A table of the
    /// snapshot's generation lists the members in the snapshot's order, so
    /// its owner index is the position (see `Picked`), and an owner is
    /// checked on its hot line, named by the slot, through the snapshot's
    /// list: the table slot and the line are the two cache misses. An
    /// older table checks its own copy of the member.
    fn lookup(&self, hash: u64, cx: &mut PickContext<'_>) -> Option<Picked> {
        let fresh = self.generation == cx.generation;
        let m = self.slots.len() as u64;
        if m == 0 {
            return None;
        }
        let start = (hash % m) as usize;
        let m = m as usize;
        let mut owners_tried = 0;
        let mut last_owner = u32::MAX;
        for step in 0..MAX_WALK_SLOTS.min(m as u64) as usize {
            // `start + step < 2m`: a wrap, not a second division.
            let at = start + step;
            let line = self.slots[if at >= m { at - m } else { at }];
            // A run of slots with the owner just refused says nothing new.
            if line == last_owner {
                continue;
            }
            last_owner = line;
            // The owner's index and its line load in parallel: both need
            // only the slot.
            let owner = *self.index_of_line.get(line as usize)? as usize;
            if fresh {
                let c = cx.members.candidate_on(owner, line)?;
                if cx.candidate_eligible(&c) {
                    return Some(cx.choose(c));
                }
            } else {
                let m = self.members.get(owner)?.member();
                if cx.is_eligible(m) {
                    return Some(Picked::Member(m.clone()));
                }
            }
            owners_tried += 1;
            if owners_tried == MAX_WALK {
                break;
            }
        }
        None
    }
}

impl ConsistentHash {
    /// Rebuilds unless the table is at least as new; call with `rebuilding`
    /// held, so the check and the store cannot interleave with another.
    fn rebuild_locked(&self, members: &Members, generation: u64, now: Timestamp) {
        let current = self.table.load();
        if current.as_ref().is_some_and(|t| t.generation >= generation) {
            return;
        }
        self.table
            .store(Some(Arc::new(Table::build(members, generation, now))));
    }
}

impl Strategy for ConsistentHash {
    fn kind(&self) -> StrategyKind {
        StrategyKind::ConsistentHash
    }

    fn pick(&self, cx: &mut PickContext<'_>) -> Option<Picked> {
        let Some(key) = cx.key else {
            return cx.random_eligible_at();
        };
        let hash = key_hash(key);
        // The snapshot's own table, once a pick found it: one load.
        if let Some(t) = cx.table.get().and_then(|t| t.downcast_ref::<Table>()) {
            return t.lookup(hash, cx).or_else(|| cx.random_eligible_at());
        }
        // A guard, not `load_full`: an `Arc` clone per pick would be a
        // read-modify-write on the table's count from every thread.
        let mut table = self.table.load();
        let rebuild = table.as_ref().is_none_or(|t| {
            (t.members.is_empty() && t.generation < cx.generation)
                || rebuild_inline(t.generation, t.built_at, cx.generation, || cx.now())
        });
        if rebuild {
            // One rebuild at a time; the others keep the table they have.
            if let Some(_guard) = self.rebuilding.try_lock() {
                self.rebuild_locked(cx.members, cx.generation, cx.now());
                table = self.table.load();
            }
        }
        if let Some(t) = table.as_ref().filter(|t| t.generation == cx.generation) {
            // Built for this snapshot: keep it there for the next picks.
            let any: Arc<dyn std::any::Any + Send + Sync> = t.clone();
            let _ = cx.table.set(any);
        }
        table
            .as_ref()
            .and_then(|t| t.lookup(hash, cx))
            .or_else(|| cx.random_eligible_at())
    }

    fn prepare(&self, members: &Members, generation: u64, now: Timestamp) {
        if members.len() <= EAGER_LIMIT {
            let _guard = self.rebuilding.lock();
            self.rebuild_locked(members, generation, now);
        }
    }

    fn maintain(&self, members: &Members, generation: u64, now: Timestamp) {
        let _guard = self.rebuilding.lock();
        self.rebuild_locked(members, generation, now);
    }
}
