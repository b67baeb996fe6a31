//! Spare header maps: a map whose head is done with (a request's once its
//! attempts are over, a response's once it is written to the client) is
//! kept, emptied, on its thread for the next head parsed there.
//!
//! ## Why
//!
//! On the HTTP/1.1 fast path a request's head is parsed into a map
//! ([`h1_server`](super::h1_server)) and goes upstream; the response's head
//! is parsed into another ([`h1_exchange`](super::h1_exchange)) and written
//! to the client. Without spares every request made two maps and dropped
//! two: four allocations, four frees, and each new map's index table
//! written twice (made, then filled). Both ends give their map back here
//! and both parsers take one, so in the steady state no map is made. (The
//! client loop used to keep its last response's map for its next request
//! itself; this is that rule, for every map of the thread.)
//!
//! ## Rule and bounds
//!
//! A map given back is cleared and kept if its thread holds fewer than
//! [`MAX_SPARES`] (64) and it has the room of a new map
//! ([`HEADER_MAP_ROOM`], 24 headers), or fewer than [`MAX_LARGE_SPARES`]
//! (8) and it holds no more than [`MAX_KEPT_CAPACITY`] headers without
//! growing (a map a very large head grew is freed: it would keep its
//! memory for heads that do not need it); a map that holds nothing (one
//! whose headers were moved out, as the HTTP/2 path does) is not kept.
//! Taking one pops the newest spare and reserves what the caller asked
//! for, else makes a new map. Per thread: at most 64 maps, 8 of them of
//! up to 128 headers (~10 KiB each) and the rest of 24 (~2.6 KiB), ~230
//! KiB in the worst case, freed with the thread.
//!
//! 64, not 8: a thread's requests in flight each hold their head's map
//! until their attempts end, and with 16 client connections on one thread
//! (`bench/instructions.sh`) 8 spares ran out: a third of the requests
//! made a new map and a third of the maps given back were freed (~130
//! instructions a request, callgrind; more with the 64 connections of
//! `bench/cpu_split.sh`).

use std::cell::RefCell;

use http::HeaderMap;

/// Headers a new map has room for: a response's headers plus the
/// forwarding headers the proxy adds when the map, kept by a client
/// connection, carries that connection's next request to an HTTP/2
/// instance or an upgrade (a map sized for the response alone grew twice
/// per request there; HTTP/1.1 writes them with the head, `ProxyHeaders`).
pub(crate) const HEADER_MAP_ROOM: usize = 24;

/// Spare maps a thread keeps.
pub(crate) const MAX_SPARES: usize = 64;

/// Spare maps a thread keeps, counting those larger than a new map.
pub(crate) const MAX_LARGE_SPARES: usize = 8;

/// The largest capacity (headers without growing) a kept map may have.
pub(crate) const MAX_KEPT_CAPACITY: usize = 128;

thread_local! {
    static SPARES: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for `want` headers: a spare if the thread has one.
pub(crate) fn take(want: usize) -> HeaderMap {
    let spare = SPARES.with(|s| s.borrow_mut().pop());
    match spare {
        Some(mut map) => {
            map.reserve(want);
            map
        }
        None => HeaderMap::with_capacity(want.max(HEADER_MAP_ROOM)),
    }
}

/// Keeps `map`, emptied, for [`take`] on this thread (within the bounds of
/// the module doc); frees it otherwise.
pub(crate) fn give_back(mut map: HeaderMap) {
    let capacity = map.capacity();
    if capacity == 0 || capacity > MAX_KEPT_CAPACITY {
        return;
    }
    SPARES.with(|s| {
        let mut spares = s.borrow_mut();
        let bound = if capacity <= HEADER_MAP_ROOM {
            MAX_SPARES
        } else {
            MAX_LARGE_SPARES
        };
        if spares.len() < bound {
            // Emptied only when kept: a map over the bound is just freed.
            map.clear();
            spares.push(map);
        }
    });
}

#[cfg(test)]
mod tests {
    use http::header::{HeaderValue, HOST};

    use super::*;

    fn spares() -> usize {
        SPARES.with(|s| s.borrow().len())
    }

    #[test]
    fn a_map_given_back_comes_back_empty_with_its_room() {
        let mut map = take(4);
        map.insert(HOST, HeaderValue::from_static("a"));
        let capacity = map.capacity();
        assert!(capacity >= HEADER_MAP_ROOM, "new maps have the room");
        give_back(map);
        assert_eq!(spares(), 1);
        let map = take(4);
        assert!(map.is_empty(), "cleared");
        assert_eq!(map.capacity(), capacity, "the same map, its room kept");
        assert_eq!(spares(), 0);
    }

    #[test]
    fn spares_are_bounded_in_number_and_size() {
        for _ in 0..MAX_SPARES + 3 {
            give_back(HeaderMap::with_capacity(HEADER_MAP_ROOM));
        }
        assert_eq!(spares(), MAX_SPARES, "at most MAX_SPARES kept");
        while spares() > 0 {
            take(1);
        }
        // Larger ones: only while fewer than MAX_LARGE_SPARES are kept.
        for _ in 0..MAX_LARGE_SPARES + 3 {
            give_back(HeaderMap::with_capacity(MAX_KEPT_CAPACITY / 2));
        }
        assert_eq!(spares(), MAX_LARGE_SPARES);
        while spares() > 0 {
            take(1);
        }
        give_back(HeaderMap::with_capacity(MAX_KEPT_CAPACITY * 2));
        give_back(HeaderMap::new());
        assert_eq!(spares(), 0, "neither a grown map nor an empty one is kept");
        let map = take(MAX_KEPT_CAPACITY);
        assert!(map.capacity() >= MAX_KEPT_CAPACITY, "the room asked for");
    }
}
