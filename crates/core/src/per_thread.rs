//! [`PerThread`]: state striped by thread, so that threads picking from one
//! service do not write the same cache line.
//!
//! ## Rule
//!
//! Each thread gets a small index the first time it asks
//! ([`thread_slot`]): threads are numbered in the order they first touch any
//! `PerThread`, modulo [`SLOTS`]. A `PerThread<T>` holds [`SLOTS`] values of
//! `T`, each on its own 128-byte block (two cache lines: x86 prefetches lines
//! in pairs), and a thread reads and writes only the value at its index. So
//! while at most [`SLOTS`] threads pick, no two share a line, and a
//! read-modify-write on "the service's" counter is an uncontended one on the
//! thread's own; a value that must be exact (an in-flight count) is the sum
//! over the slots, read off the request path. More threads than slots share
//! slots two by two, which stays correct (every slot is atomic) and only
//! brings the sharing back for those threads.
//!
//! ## Why 16
//!
//! The proxy runs one thread per core; 16 covers the machines it is
//! benchmarked on with room to spare, and costs 2 KiB per `PerThread` (a
//! service has two: its request counters and its pick state), small next to
//! the ~500 B per instance a service already holds.

use std::cell::Cell;
use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Slots per [`PerThread`]; a power of two.
pub(crate) const SLOTS: usize = 16;

/// Threads that asked for a slot so far, process-wide.
static THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot, assigned on first use.
    static SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The slot of the calling thread, in `0..SLOTS`: assigned on the thread's
/// first call, in order of first calls, and fixed for its lifetime.
#[inline]
pub(crate) fn thread_slot() -> usize {
    SLOT.with(|slot| match slot.get() {
        Some(i) => i,
        None => {
            let i = THREADS.fetch_add(1, Ordering::Relaxed) % SLOTS;
            slot.set(Some(i));
            i
        }
    })
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

/// [`SLOTS`] values of `T`, one per thread slot. See the module doc.
#[derive(Debug)]
pub(crate) struct PerThread<T> {
    slots: Box<[Padded<T>]>,
}

impl<T> PerThread<T> {
    /// Slots made by `init(index)`.
    pub(crate) fn new(mut init: impl FnMut(usize) -> T) -> Self {
        Self {
            slots: (0..SLOTS).map(|i| Padded(init(i))).collect(),
        }
    }

    /// The calling thread's value.
    #[inline]
    pub(crate) fn local(&self) -> &T {
        // In bounds: `thread_slot() < SLOTS`, the length.
        &self.slots[thread_slot()]
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
    use std::sync::atomic::AtomicU64;

    #[test]
    fn a_thread_keeps_its_slot_and_every_slot_is_in_range() {
        let here = thread_slot();
        assert_eq!(thread_slot(), here, "fixed for the thread's lifetime");
        assert!(here < SLOTS);
        // Threads numbered consecutively land in distinct slots until the
        // slots run out (other tests may take numbers in between, so only
        // the bound and the wrap are checked).
        let slots: Vec<usize> = (0..2 * SLOTS)
            .map(|_| std::thread::spawn(thread_slot).join().unwrap())
            .collect();
        assert!(slots.iter().all(|&s| s < SLOTS));
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
        assert_eq!(total, 40_000, "slots shared by >16 threads stay exact");
        assert_eq!(std::mem::align_of::<Padded<AtomicU64>>(), 128);
    }
}
