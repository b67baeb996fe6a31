//! [`PerThread`]: state striped by thread, so that threads picking from one
//! service do not write the same cache line.
//!
//! ## Rule
//!
//! A thread gets a slot the first time it asks ([`thread_slot`]): one of
//! its own, in `0..SLOTS`, while fewer than [`SLOTS`] live threads hold
//! one, else the **shared** slot (index `SLOTS`). A slot of its own is the
//! thread's until it exits, when it goes back to a free list for the next
//! thread that asks (a thread-local's destructor gives it back; the free
//! list's lock orders the old owner's last writes before the new owner's
//! first). A `PerThread<T>` holds `SLOTS + 1` values of `T`, each on its
//! own 128-byte block (two cache lines: x86 prefetches lines in pairs),
//! and a thread reads and writes only the value at its slot. So while at
//! most [`SLOTS`] threads pick, no two share a line, and a value that must
//! be exact (an in-flight count) is the sum over the slots, read off the
//! request path.
//!
//! **Owned slots need no read-modify-write.** Only its owner writes a slot
//! of its own, so a counter there is moved by a plain load and store
//! ([`add`]), not a locked instruction (each a full fence, ~20 cycles, that
//! a pick's cache miss cannot overlap: issue 12, fourth pass in
//! `docs/benchmarks.md`); readers on other threads only load. The shared
//! slot is written by every thread without one of its own, so there
//! [`add`] is a read-modify-write, and it stays exact. A thread whose
//! thread-locals are being destroyed (a selection dropped by a runtime's
//! exit) uses the shared slot too: its own may already be another's.
//!
//! ## Why 16
//!
//! The proxy runs one thread per core; 16 covers the machines it is
//! benchmarked on with room to spare, and costs 17 × 128 B per `PerThread` (a
//! service has two: its request counters and its pick state; a
//! `round_robin` service a third, its rotations), small next to the ~500 B
//! per instance a service already holds.

use std::cell::Cell;
use std::ops::Deref;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::Mutex;

/// Slots of their own per [`PerThread`]; the shared slot comes after them.
pub(crate) const SLOTS: usize = 16;
/// The index of the shared slot.
const SHARED: usize = SLOTS;

/// The slots of their own not held by a live thread.
struct Claims {
    /// Slots never handed out start here.
    next: usize,
    /// Slots given back by threads that exited.
    free: Vec<usize>,
}

static CLAIMS: Mutex<Claims> = parking_lot::const_mutex(Claims {
    next: 0,
    free: Vec::new(),
});

/// Gives the thread's slot of its own back when the thread exits.
struct Held;

impl Drop for Held {
    fn drop(&mut self) {
        // Later uses on this thread (other thread-locals' destructors)
        // take the shared slot: this one may soon be another thread's.
        let i = SLOT.replace(SHARED);
        if i < SLOTS {
            CLAIMS.lock().free.push(i);
        }
    }
}

/// [`SLOT`] before the thread's first call.
const UNCLAIMED: usize = usize::MAX;

thread_local! {
    /// This thread's slot, claimed on first use. A plain `Cell` with no
    /// destructor, so a pick reads it with one load; [`HELD`] gives it
    /// back.
    static SLOT: Cell<usize> = const { Cell::new(UNCLAIMED) };
    /// Registered with the claim; its destructor frees the slot.
    static HELD: Held = const { Held };
}

/// A slot of its own for the calling thread, or the shared one.
fn claim() -> usize {
    let mut claims = CLAIMS.lock();
    if let Some(i) = claims.free.pop() {
        return i;
    }
    if claims.next < SLOTS {
        claims.next += 1;
        return claims.next - 1;
    }
    SHARED
}

/// The slot of the calling thread, in `0..=SLOTS` (`SLOTS`: the shared
/// one): claimed on the thread's first call and held for its lifetime.
#[inline]
pub(crate) fn thread_slot() -> usize {
    let i = SLOT.get();
    if i != UNCLAIMED {
        return i;
    }
    claim_slot()
}

/// [`thread_slot`]'s first call on a thread.
#[cold]
#[inline(never)]
fn claim_slot() -> usize {
    // The destructor that gives the slot back is registered first: a
    // thread already exiting cannot register it, and takes the shared one.
    let i = match HELD.try_with(|_| ()) {
        Ok(()) => claim(),
        Err(_) => SHARED,
    };
    SLOT.set(i);
    i
}

/// A counter [`add`] moves.
pub(crate) trait Counter {
    /// Adds `delta` with a read-modify-write.
    fn add_shared(&self, delta: i64);
    /// Adds `delta` with a load and a store.
    fn add_owned(&self, delta: i64);
}

impl Counter for AtomicI64 {
    #[inline]
    fn add_shared(&self, delta: i64) {
        self.fetch_add(delta, Ordering::Relaxed);
    }
    #[inline]
    fn add_owned(&self, delta: i64) {
        let v = self.load(Ordering::Relaxed);
        self.store(v.wrapping_add(delta), Ordering::Relaxed);
    }
}

impl Counter for AtomicU64 {
    #[inline]
    fn add_shared(&self, delta: i64) {
        self.fetch_add(delta as u64, Ordering::Relaxed);
    }
    #[inline]
    fn add_owned(&self, delta: i64) {
        let v = self.load(Ordering::Relaxed);
        self.store(v.wrapping_add(delta as u64), Ordering::Relaxed);
    }
}

/// Adds `delta` to a counter of the value [`PerThread::local_owned`]
/// returned with `owned`: a load and a store on a slot of the thread's
/// own, a read-modify-write on the shared slot (module doc).
#[inline]
pub(crate) fn add(counter: &impl Counter, delta: i64, owned: bool) {
    if owned {
        counter.add_owned(delta);
    } else {
        counter.add_shared(delta);
    }
}

/// One value on its own 128-byte block.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// `SLOTS + 1` values of `T`, one per thread slot and the shared one. See
/// the module doc.
#[derive(Debug)]
pub(crate) struct PerThread<T> {
    slots: Box<[Padded<T>]>,
}

impl<T> PerThread<T> {
    /// Slots made by `init(index)`.
    pub(crate) fn new(mut init: impl FnMut(usize) -> T) -> Self {
        Self {
            slots: (0..=SLOTS).map(|i| Padded(init(i))).collect(),
        }
    }

    /// The calling thread's value.
    #[inline]
    pub(crate) fn local(&self) -> &T {
        self.local_owned().0
    }

    /// The calling thread's value, and whether the slot is the thread's
    /// own (only it writes there: see [`add`]).
    #[inline]
    pub(crate) fn local_owned(&self) -> (&T, bool) {
        let i = thread_slot();
        // In bounds: `thread_slot() <= SLOTS`, the length less one.
        (&self.slots[i], i != SHARED)
    }

    /// Every slot's value, for sums.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|p| &p.0)
    }
}

impl<T: Default> Default for PerThread<T> {
    fn default() -> Self {
        Self::new(|_| T::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_keeps_its_slot_and_every_slot_is_in_range() {
        let here = thread_slot();
        assert_eq!(thread_slot(), here, "fixed for the thread's lifetime");
        assert!(here <= SLOTS);
        // Threads numbered consecutively land in distinct slots until the
        // slots run out (other tests may take numbers in between, so only
        // the bound and the wrap are checked).
        let slots: Vec<usize> = (0..2 * SLOTS)
            .map(|_| std::thread::spawn(thread_slot).join().unwrap())
            .collect();
        assert!(slots.iter().all(|&s| s <= SLOTS));
    }

    #[test]
    fn an_exited_threads_slot_is_claimed_again() {
        // Threads one after the other: each exits before the next asks,
        // so none needs the shared slot, whatever other tests hold.
        let first = std::thread::spawn(thread_slot).join().unwrap();
        if first == SHARED {
            return; // every slot held by live test threads: nothing to see
        }
        let again: Vec<usize> = (0..4)
            .map(|_| std::thread::spawn(thread_slot).join().unwrap())
            .collect();
        assert!(again.iter().all(|&s| s < SLOTS), "{again:?}");
    }

    #[test]
    fn owned_adds_from_more_threads_than_slots_stay_exact() {
        // 40 threads at once: 16 at most own a slot, the rest share one;
        // the owners' load-and-store adds and the sharers' read-modify-
        // writes must all count (a wrong rule loses updates here).
        let counter: PerThread<AtomicI64> = PerThread::default();
        let barrier = std::sync::Barrier::new(40);
        std::thread::scope(|s| {
            for _ in 0..40 {
                s.spawn(|| {
                    barrier.wait();
                    for _ in 0..20_000 {
                        let (c, owned) = counter.local_owned();
                        add(c, 1, owned);
                    }
                });
            }
        });
        let total: i64 = counter.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 800_000);
    }

    #[test]
    fn per_thread_sums_writes_from_many_threads_exactly() {
        let counter: PerThread<AtomicU64> = PerThread::default();
        std::thread::scope(|s| {
            for _ in 0..40 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        counter.local().fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        let total: u64 = counter.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 40_000, "a slot shared by >16 threads stays exact");
        assert_eq!(std::mem::align_of::<Padded<AtomicU64>>(), 128);
    }
}
