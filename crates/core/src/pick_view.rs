//! [`PickView`]: what a [`Selection`](crate::Selection) keeps alive, and
//! each thread's cache of them, so that a pick and its release count no
//! reference and take no lock.
//!
//! ## Rule
//!
//! A view is an `Arc` of a service's recorder and of one snapshot of it. A
//! selection owns one `Arc<PickView>` of the snapshot its pick read: that
//! is what lets it name its member by position (see
//! [`selection`](crate::selection)). Each thread keeps, per service it
//! picked from (at most [`CACHED_SERVICES`], most recently used first):
//!
//! - the service's **current view**, replaced when the service's published
//!   generation moves (the pick compares the two: one plain load of a
//!   shared atomic that changes only with membership or configuration);
//! - up to [`SPARE_LEASES`] **spare leases**: clones of the current view
//!   that selections released on this thread handed back.
//!
//! A pick takes a spare lease if there is one (a move: no count changes)
//! and clones the current view only if there is none; a selection's
//! release hands its lease back to the thread it is dropped on when that
//! thread's entry for the service still has the same view and room, and
//! drops it otherwise. So a thread that picks and releases on one service
//! touches no reference count in the steady state, and no lock: the cache
//! is a `thread_local!` `RefCell`, which no other thread can reach.
//!
//! *Why not a lock in the service's thread slot* (the design before): a
//! `Mutex` lock and unlock, an `Arc` clone and its drop are four locked
//! instructions per select + release, each a full fence that the
//! instance line's cache miss could not overlap (issue 12, fourth pass in
//! `docs/benchmarks.md`).
//!
//! ## What it costs
//!
//! A thread's cache keeps the views of up to [`CACHED_SERVICES`] services
//! alive until the thread picks from a newer snapshot of each, evicts it
//! (least recently used first) or exits: with them, their recorder and
//! the members their snapshot listed. A service that is dropped lets go
//! of the dropping thread's entry at once and counts itself in a
//! process-wide count of dropped services; every other thread compares
//! that count (one load of a line written once per dropped service) on
//! each pick and purges the entries of dead services when it moved, so a
//! removed service's memory goes at each thread's next pick of anything.
//! (Without this the core's memory bench measured 0 B per instance: the
//! previous service's 45 MB were freed during the next one's setup.)
//! Live state outlives a snapshot anyway (see
//! [`instance`](crate::instance)), so nothing reads stale counters.
//! A spare lease is a reference, not a copy: no memory beyond the `Vec`.
//!
//! Every path that cannot use the cache (a reentrant use while the cache
//! is borrowed, a thread whose locals are being destroyed) falls back to a
//! plain clone or drop: slower, never wrong.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use crate::recorder::Recorder;
use crate::snapshot::Snapshot;

/// Services whose views a thread keeps. A proxy worker picks from a few
/// services at a time; beyond this the least recently used is evicted (it
/// costs one clone of its view when it comes back).
pub(crate) const CACHED_SERVICES: usize = 8;
/// Released leases a thread keeps per service for its next picks: enough
/// to cover the swings of one thread's in-flight count on a service
/// between two picks, small enough to be a few cache lines.
pub(crate) const SPARE_LEASES: usize = 16;

/// Identities of services, process-wide, for the thread caches' keys.
static NEXT_SERVICE: AtomicU64 = AtomicU64::new(1);
/// Services dropped so far, process-wide: a thread whose cache saw fewer
/// purges the views of dead services before its next pick.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// A service's identity in the thread caches: its unique number and a
/// handle that tells whether it is still alive.
#[derive(Debug)]
pub(crate) struct ServiceKey {
    id: u64,
    /// `None` only while the key is dropped.
    alive: Option<Arc<()>>,
}

impl ServiceKey {
    /// A key no other service has.
    pub(crate) fn new() -> Self {
        Self {
            id: NEXT_SERVICE.fetch_add(1, Ordering::Relaxed),
            alive: Some(Arc::new(())),
        }
    }
}

impl Drop for ServiceKey {
    /// Marks the service dead, then tells every thread's cache (the
    /// count), and purges this thread's at once.
    fn drop(&mut self) {
        drop(self.alive.take());
        DROPPED.fetch_add(1, Ordering::Release);
        let mut dropped = Vec::new();
        let _ = VIEWS.try_with(|views| {
            if let Ok(mut views) = views.try_borrow_mut() {
                views.purge(&mut dropped);
            }
        });
        drop(dropped);
    }
}

/// A service's recorder and one snapshot of it. See the module doc.
#[derive(Debug)]
pub(crate) struct PickView {
    pub(crate) recorder: Arc<Recorder>,
    pub(crate) snapshot: Arc<Snapshot>,
    /// Whose view this is (the thread caches' key).
    service: u64,
    /// Whether that service is alive (the thread caches purge the dead).
    alive: Weak<()>,
}

impl PickView {
    /// A view of `snapshot` for the service `key`.
    pub(crate) fn new(key: &ServiceKey, recorder: Arc<Recorder>, snapshot: Arc<Snapshot>) -> Self {
        Self {
            recorder,
            snapshot,
            service: key.id,
            alive: key.alive.as_ref().map(Arc::downgrade).unwrap_or_default(),
        }
    }

    /// The snapshot this view picks from.
    #[inline]
    pub(crate) fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

/// One service's entry in a thread's cache.
struct Cached {
    /// The service (`PickView::service`) and the generation of its view,
    /// copied here so the pick's check reads no further than the entry.
    service: u64,
    generation: u64,
    view: Arc<PickView>,
    /// Clones of `view` released on this thread: `spare[..spares]`.
    spare: [Option<Arc<PickView>>; SPARE_LEASES],
    spares: usize,
}

/// A thread's cache: inline (no allocation of its own). The entry used
/// last is `front`, the only one a pick and a release look at unless it
/// is another service's.
struct Views {
    front: Option<Cached>,
    others: [Option<Cached>; CACHED_SERVICES - 1],
    /// The entry of `others` the next new service replaces when none is
    /// free (round robin).
    evict: usize,
    /// `DROPPED` as of this cache's last purge.
    purged_at: u64,
}

thread_local! {
    /// This thread's views.
    static VIEWS: RefCell<Views> = const {
        RefCell::new(Views {
            front: None,
            others: [const { None }; CACHED_SERVICES - 1],
            evict: 0,
            purged_at: 0,
        })
    };
}

impl Cached {
    fn new(view: Arc<PickView>) -> Self {
        Self {
            service: view.service,
            generation: view.snapshot.generation,
            view,
            spare: [const { None }; SPARE_LEASES],
            spares: 0,
        }
    }

    /// A spare lease, else a clone of the view.
    #[inline]
    fn take(&mut self) -> Arc<PickView> {
        if let Some(i) = self.spares.checked_sub(1) {
            if let Some(view) = self.spare.get_mut(i).and_then(Option::take) {
                self.spares = i;
                return view;
            }
        }
        self.view.clone()
    }

    /// Keeps `view` as a spare if it is this entry's view and there is
    /// room; gives it back otherwise.
    #[inline]
    fn keep(&mut self, view: Arc<PickView>) -> Option<Arc<PickView>> {
        match self.spare.get_mut(self.spares) {
            Some(slot) if Arc::ptr_eq(&self.view, &view) => {
                *slot = Some(view);
                self.spares += 1;
                None
            }
            _ => Some(view),
        }
    }
}

impl Views {
    /// Makes `id`'s entry the front one if it is cached; whether it is.
    fn bring_to_front(&mut self, id: u64) -> bool {
        if self.front.as_ref().is_some_and(|c| c.service == id) {
            return true;
        }
        let Some(other) = self
            .others
            .iter_mut()
            .find(|c| c.as_ref().is_some_and(|c| c.service == id))
        else {
            return false;
        };
        std::mem::swap(&mut self.front, other);
        true
    }

    /// Lets go of the entries of services that are gone (to `dropped`).
    fn purge(&mut self, dropped: &mut Vec<Cached>) {
        self.purged_at = DROPPED.load(Ordering::Acquire);
        let dead =
            |c: &Option<Cached>| c.as_ref().is_some_and(|c| c.view.alive.strong_count() == 0);
        if dead(&self.front) {
            dropped.extend(self.front.take());
        }
        for other in &mut self.others {
            if dead(other) {
                dropped.extend(other.take());
            }
        }
    }

    /// Puts `entry` in front; the old front goes to a free place of
    /// `others` (after the entries of services that are gone are
    /// purged), else replaces the one [`evict`](Self::evict) names.
    /// Entries let go of go to `dropped`.
    fn push_front(&mut self, entry: Cached, dropped: &mut Vec<Cached>) {
        for other in &mut self.others {
            if other
                .as_ref()
                .is_some_and(|c| c.view.alive.strong_count() == 0)
            {
                dropped.extend(other.take());
            }
        }
        let Some(old) = self.front.replace(entry) else {
            return;
        };
        if old.view.alive.strong_count() == 0 {
            return dropped.push(old);
        }
        let i = match self.others.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                let i = self.evict % self.others.len();
                self.evict = i + 1;
                i
            }
        };
        if let Some(place) = self.others.get_mut(i) {
            dropped.extend(place.replace(old));
        }
    }
}

/// A lease on the current view of the service `key` at `generation` (its
/// published one): a spare lease of this thread if there is one, else a
/// clone of the thread's current view, which is first replaced by
/// `make()` if it is of another generation. See the module doc.
#[inline]
pub(crate) fn lease(
    key: &ServiceKey,
    generation: u64,
    make: impl FnOnce() -> PickView,
) -> Arc<PickView> {
    // The common case, kept small: the front entry is this service's at
    // this generation (a pick's instruction count is what lets the core
    // overlap one pick's cache miss with the next one's).
    let fast = VIEWS.try_with(|views| {
        let mut views = views.try_borrow_mut().ok()?;
        let current = views.purged_at == DROPPED.load(Ordering::Acquire);
        let front = views.front.as_mut()?;
        (current && front.service == key.id && front.generation == generation).then(|| front.take())
    });
    match fast {
        Ok(Some(view)) => view,
        _ => lease_slow(key, generation, make),
    }
}

/// [`lease`] when the front entry is not the service's current view, or
/// a service was dropped since this thread's cache last purged.
#[cold]
#[inline(never)]
fn lease_slow(key: &ServiceKey, generation: u64, make: impl FnOnce() -> PickView) -> Arc<PickView> {
    let mut make = Some(make);
    let mut build = || match make.take() {
        Some(f) => Arc::new(f()),
        None => unreachable!("a view is built at most once per lease"),
    };
    let mut dropped = Vec::new();
    let got = VIEWS.try_with(|views| {
        let mut views = views.try_borrow_mut().ok()?;
        views.purge(&mut dropped);
        if views.bring_to_front(key.id) {
            let front = views.front.as_mut()?;
            if front.generation != generation {
                dropped.push(std::mem::replace(front, Cached::new(build())));
            }
        } else {
            views.push_front(Cached::new(build()), &mut dropped);
        }
        Some(views.front.as_mut()?.take())
    });
    // Old views are dropped outside the borrow (a snapshot's drop runs
    // strategy and member destructors).
    drop(dropped);
    match got {
        Ok(Some(view)) => view,
        _ => build(),
    }
}

/// Gives back a selection's lease: kept as a spare if this thread's front
/// entry has the same view and room, dropped otherwise.
#[inline]
pub(crate) fn release(view: Arc<PickView>) {
    let rest = VIEWS.try_with(move |views| {
        let Ok(mut views) = views.try_borrow_mut() else {
            return Some(view);
        };
        match views.front.as_mut() {
            Some(front) => front.keep(view),
            None => Some(view),
        }
    });
    // A lease not kept is dropped here, outside the borrow.
    drop(rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LoadBalancerConfig, Registry, ServiceInstance, StrategyKind};

    fn registry_of(services: usize) -> Registry {
        let registry = Registry::builder().seed(1).build().unwrap();
        for s in 0..services {
            let config = LoadBalancerConfig {
                strategy: StrategyKind::Random,
                ..LoadBalancerConfig::default()
            };
            registry
                .configure_service(&format!("s{s}"), config)
                .unwrap();
            let inst = ServiceInstance::try_new("i0", "10.0.0.1", 80).unwrap();
            registry.register_instance(&format!("s{s}"), inst).unwrap();
        }
        registry
    }

    /// The number of views this thread caches, and the spare leases of
    /// the front one.
    fn cached() -> (usize, usize) {
        VIEWS.with(|v| {
            let v = v.borrow();
            let live = v.others.iter().flatten().count() + usize::from(v.front.is_some());
            (live, v.front.as_ref().map_or(0, |c| c.spares))
        })
    }

    #[test]
    fn a_released_lease_is_reused_without_counting_a_reference() {
        std::thread::spawn(|| {
            let registry = registry_of(1);
            let svc = registry.service("s0").unwrap();
            drop(svc.select(None).unwrap());
            assert_eq!(cached(), (1, 1), "the release kept its lease");
            let sel = svc.select(None).unwrap();
            assert_eq!(cached(), (1, 0), "the pick took it back");
            // Many in flight at once: the spares are capped, the rest
            // dropped, and every lease is the one current view.
            let many: Vec<_> = (0..SPARE_LEASES + 10)
                .map(|_| svc.select(None).unwrap())
                .collect();
            drop(many);
            assert_eq!(cached(), (1, SPARE_LEASES));
            drop(sel);
            assert_eq!(cached(), (1, SPARE_LEASES), "no room: dropped");
            // A new snapshot: the next pick replaces the view and drops
            // the spares of the old one; an old lease is not kept.
            let old = svc.select(None).unwrap();
            registry
                .register_instance(
                    "s0",
                    ServiceInstance::try_new("i1", "10.0.0.1", 80).unwrap(),
                )
                .unwrap();
            drop(svc.select(None).unwrap());
            assert_eq!(cached(), (1, 1));
            drop(old);
            assert_eq!(cached(), (1, 1), "a lease of an older view");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_dropped_services_views_go_at_each_threads_next_pick() {
        let registry = registry_of(2);
        let (s0, s1) = (
            registry.service("s0").unwrap(),
            registry.service("s1").unwrap(),
        );
        let member = s1.member("i0").unwrap();
        drop(s1.select(None));
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let other = {
            let (s0, s1) = (s0.clone(), s1.clone());
            std::thread::spawn(move || {
                drop(s1.select(None));
                drop(s0.select(None)); // s0 in front, s1 behind it
                drop(s1);
                done.send(()).unwrap();
                wait.recv().unwrap();
                // Only s0 is picked, on the fast path but for the count
                // of dropped services: s1's view goes.
                drop(s0.select(None));
                done.send(()).unwrap();
            })
        };
        finished.recv().unwrap();
        registry.remove_service("s1").unwrap();
        drop(s1); // the service goes, and with it this thread's view
        assert!(Arc::strong_count(&member) > 1, "the other thread's view");
        go.send(()).unwrap();
        finished.recv().unwrap();
        other.join().unwrap();
        assert_eq!(Arc::strong_count(&member), 1, "no snapshot lists it");
    }

    #[test]
    fn the_cache_is_bounded_and_lets_go_of_dropped_services() {
        std::thread::spawn(|| {
            let registry = registry_of(CACHED_SERVICES + 2);
            for s in 0..CACHED_SERVICES + 2 {
                drop(registry.service(&format!("s{s}")).unwrap().select(None));
            }
            assert_eq!(cached().0, CACHED_SERVICES, "the oldest evicted");
            // The service `s9` goes away; its view (and with it its
            // snapshot and members) is let go of at the next new entry.
            let svc = registry
                .service(&format!("s{}", CACHED_SERVICES + 1))
                .unwrap();
            let member = svc.member("i0").unwrap();
            let held = Arc::strong_count(&member);
            registry
                .remove_service(&format!("s{}", CACHED_SERVICES + 1))
                .unwrap();
            drop(svc);
            let other = registry_of(1);
            drop(other.service("s0").unwrap().select(None));
            assert!(Arc::strong_count(&member) < held, "the dead view is gone");
        })
        .join()
        .unwrap();
    }
}
