//! [`Selection`]: the RAII guard for one request on one instance, and the
//! [`Outcome`] it reports.
//!
//! ## Rule
//!
//! A `Selection` counts one active connection on its instance (and one
//! in-flight request on its service) from the moment it is created until it
//! is dropped. [`success`](Selection::success) and
//! [`failure`](Selection::failure) take `self`, so an outcome is recorded at
//! most once; they feed the health score, the circuit breaker and the
//! latency EWMA, then drop the guard. Dropping a `Selection` without an
//! outcome (a cancelled request) only releases the connection. The counts are
//! therefore exact at every moment, as with tower's pending-request handles
//! and Pingora's inflight guard.
//!
//! The caller measures the latency it reports (the proxy times each attempt
//! itself), so a selection keeps no start time, and a pick reads the clock
//! only when a rule needs it (see [`service`](crate::service), "The clock on
//! the pick path").
//!
//! ## Nothing service-wide is written per pick, nor the member's line
//!
//! A guard must keep its service's [`Recorder`](crate::recorder::Recorder)
//! alive, and its member's description (for
//! [`instance`](Selection::instance)). Cloning one `Arc<Recorder>` per
//! selection would be a read-modify-write on one reference count from
//! every thread, twice per request; cloning the chosen `Arc<Member>` would
//! write the member's own allocation, a cache line apart from the
//! instance's hot line, cold at 100,000 instances (issue 12: a third miss
//! per pick). So a selection holds a *lease* on its thread's *pick view*
//! of the service: an `Arc` of the recorder and of the snapshot the pick
//! read, which a thread keeps per service and hands out again when a
//! selection released on it gives its lease back (see `pick_view`: in the
//! steady state a select + release counts no reference and takes no
//! lock). The selection names its member by position in the view's
//! snapshot, which is immutable and lives as long as the view; a strategy
//! that picked from a table of its own older than the snapshot hands back
//! the member's `Arc` instead (see [`Picked`](crate::strategy::Picked)).
//! A selection counts on its instance (`active`, `last_used`: the
//! instance's own line) and on its thread's slot of the service's
//! counters, nothing else.
//!
//! *What it costs:* a thread keeps the views of the last few services it
//! picked from alive until it picks from a newer snapshot of each (see
//! `pick_view`), and with them the members those snapshots listed; a
//! selection keeps its pick's snapshot alive until it is dropped. Live
//! state outlives a snapshot anyway (see [`instance`](crate::instance)),
//! so nothing reads stale counters: a removed member is marked removed on
//! its live state, which every snapshot shares.
//!
//! ## Randomness: one stream per thread, reproducible
//!
//! A pick draws from its thread slot's RNG state and writes the advanced
//! state back (no shared atomic). A slot's stream is seeded on its first
//! pick from the service's seed counter (`Recorder::next_seed`, the one
//! shared read-modify-write, once per thread and service). So with a seeded
//! registry, the k-th thread slot to pick from a service draws the k-th
//! stream of that seed: a test that picks from one thread gets the same
//! sequence on every run, whichever slot its thread has. Threads without
//! a slot of their own (more than 16 live at once) share one and may
//! reuse a state now and then: two picks with the same draws, which costs
//! a little spread, never correctness.
//!
//! `random`, `p2c` and `peak_ewma` take their first draws from a batch the
//! slot drew ahead from the same stream (see `draw_ahead`: the batch's
//! candidates are loaded together, so at 100,000 instances their cache
//! misses overlap); the slot keeps the batch beside its RNG state.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::draw_ahead::DrawAhead;
use crate::event::Event;
use crate::hot::Hot;
use crate::instance::{Member, ServiceInstance};
use crate::members::Members;
use crate::pick_view::{self, PickView};
use crate::recorder::Source;
pub use crate::recorder::{FailureKind, Outcome};
use crate::strategy::StrategyKind;

/// One request's claim on one instance. See the module doc.
#[must_use = "dropping a Selection at once releases the connection it counts"]
pub struct Selection {
    /// The lease on the pick's view; `None` only while dropping (the
    /// lease goes back to the thread's cache, see `pick_view`).
    lease: Option<Arc<PickView>>,
    target: Target,
    probe: bool,
    strategy: StrategyKind,
    events: Vec<Event>,
}

/// The member a selection is on.
#[derive(Debug)]
pub(crate) enum Target {
    /// Its position in the view's snapshot, and its hot line's number
    /// there (the release goes straight to the line).
    At {
        /// The position.
        index: usize,
        /// The hot line's number.
        line: u32,
    },
    /// The member, from a strategy's table older than the snapshot.
    Held(Arc<Member>),
}

impl Selection {
    /// A selection on `target` of `view`'s snapshot, picked at `used_at`;
    /// the caller checked that an `At` position is in the snapshot.
    ///
    /// The guard counts on its line once it is built (walking back to the
    /// line through its view, all cached by then). Counting earlier, in
    /// the pick on the line it already held, executed fewer instructions
    /// but measured 2-14 ns *slower* per select + release at n = 10 (issue
    /// 12, sixth pass in `docs/benchmarks.md`).
    #[inline(always)]
    pub(crate) fn new(
        view: Arc<PickView>,
        target: Target,
        used_at: Timestamp,
        probe: bool,
        strategy: StrategyKind,
        events: Vec<Event>,
    ) -> Self {
        let sel = Self {
            lease: Some(view),
            target,
            probe,
            strategy,
            events,
        };
        if let Some(hot) = sel.hot() {
            hot.active.fetch_add(1, Ordering::AcqRel);
            hot.last_used.store(used_at.as_nanos(), Ordering::Relaxed);
        }
        sel.view().recorder.stats.request_started();
        sel
    }

    /// The pick's view.
    #[inline]
    fn view(&self) -> &PickView {
        match &self.lease {
            Some(view) => view,
            None => unreachable!("the lease is taken only by drop"),
        }
    }

    /// The chosen member.
    fn member(&self) -> &Member {
        match &self.target {
            Target::Held(m) => m,
            Target::At { index, .. } => match self.view().snapshot.members.get(*index) {
                Some(m) => m,
                // `new`'s caller checked the position, and the snapshot the
                // view holds never changes.
                None => unreachable!("a selection's position is in its snapshot"),
            },
        }
    }

    /// The chosen instance's hot line, without reading its member when
    /// the selection holds a position.
    #[inline]
    fn hot(&self) -> Option<&Hot> {
        match &self.target {
            Target::Held(m) => Some(m.live().hot()),
            Target::At { line, .. } => self.view().snapshot.members.hot_line(*line),
        }
    }

    /// The chosen instance.
    pub fn instance(&self) -> &ServiceInstance {
        self.member().instance()
    }

    /// The service name.
    pub fn service(&self) -> &str {
        self.view().recorder.name()
    }

    /// Active connections on the chosen instance, this one included.
    pub fn active_connections(&self) -> u32 {
        self.hot().map_or(0, Hot::active_connections)
    }

    /// The strategy that made the pick (for `adaptive`: the one in use).
    pub fn strategy(&self) -> StrategyKind {
        self.strategy
    }

    /// Whether this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Events the pick caused (panic mode, breaker half-open, strategy
    /// switch).
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// Takes the events the pick caused.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Records a success with its latency and releases the connection.
    pub fn success(self, latency: Duration) -> Vec<Event> {
        self.view()
            .recorder
            .record(self.member(), Outcome::Success(latency), Source::Request)
    }

    /// Records a failure and releases the connection.
    pub fn failure(self, kind: FailureKind) -> Vec<Event> {
        self.view()
            .recorder
            .record(self.member(), Outcome::Failure(kind), Source::Request)
    }
}

/// One thread slot's RNG state for picks on one service. See the module
/// doc.
#[derive(Debug, Default)]
pub(crate) struct PickLocal {
    /// The slot's RNG state; 0 until its first pick claims a seed.
    rng: AtomicU64,
    /// The slot's draws for its next picks (see `draw_ahead`).
    pub(crate) ahead: DrawAhead,
}

impl PickLocal {
    /// The slot's RNG, seeded from `seed` on its first use; give it back
    /// with [`put_rng`](Self::put_rng).
    #[inline]
    pub(crate) fn take_rng(&self, seed: impl FnOnce() -> u64) -> fastrand::Rng {
        let mut state = self.rng.load(Ordering::Relaxed);
        if state == 0 {
            state = seed() | 1; // never the "unseeded" 0
        }
        fastrand::Rng::with_seed(state)
    }

    /// Stores the state of an RNG from [`take_rng`](Self::take_rng).
    #[inline]
    pub(crate) fn put_rng(&self, rng: &fastrand::Rng) {
        self.rng.store(rng.get_seed() | 1, Ordering::Relaxed);
    }

    /// Draws the next batch from the slot's stream if the batch is used
    /// up (`draw_ahead`), as a pick that drew its first draws from it
    /// does at its end.
    #[inline]
    pub(crate) fn refill(&self, members: &Members, seed: impl FnOnce() -> u64) {
        if self.ahead.used_up() {
            let mut rng = self.take_rng(seed);
            self.ahead.refill(members, &mut rng);
            self.put_rng(&rng);
        }
    }
}

impl Drop for Selection {
    #[inline]
    fn drop(&mut self) {
        if let Some(hot) = self.hot() {
            hot.active.fetch_sub(1, Ordering::AcqRel);
        }
        self.view().recorder.stats.request_finished();
        if self.probe {
            self.view().recorder.release_probe(self.member());
        }
        if let Some(lease) = self.lease.take() {
            pick_view::release(lease);
        }
    }
}

impl fmt::Debug for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selection")
            .field("service", &self.view().recorder.name())
            .field("instance", self.member().instance().id())
            .field("probe", &self.probe)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use crate::{LoadBalancerConfig, Registry, ServiceInstance, StrategyKind};

    /// 200 `random` picks from a fresh registry seeded with `seed`, made by
    /// `threads` threads one after the other (100 / threads each), as ids.
    fn picks(seed: u64, threads: usize) -> Vec<Vec<String>> {
        let registry = Registry::builder().seed(seed).build().unwrap();
        let config = LoadBalancerConfig {
            strategy: StrategyKind::Random,
            ..LoadBalancerConfig::default()
        };
        registry.configure_service("svc", config).unwrap();
        let instances =
            (0..50).map(|i| ServiceInstance::try_new(&format!("i{i}"), "10.0.0.1", 80).unwrap());
        registry
            .register_instances("svc", instances.collect::<Vec<_>>())
            .unwrap();
        let svc = registry.service("svc").unwrap();
        (0..threads)
            .map(|_| {
                let svc = svc.clone();
                std::thread::spawn(move || {
                    (0..200 / threads)
                        .map(|_| svc.select(None).unwrap().instance().id().to_string())
                        .collect()
                })
                .join()
                .unwrap()
            })
            .collect()
    }

    /// The guard names its member by position in the snapshot it holds:
    /// a pick writes nothing of the member's allocation, and the member
    /// stays readable (and its count exact) after it is deregistered.
    #[test]
    fn a_selection_holds_its_snapshot_not_its_members_count() {
        let registry = Registry::builder().seed(1).build().unwrap();
        let config = LoadBalancerConfig {
            strategy: StrategyKind::P2c,
            ..LoadBalancerConfig::default()
        };
        registry.configure_service("svc", config).unwrap();
        for i in 0..4 {
            let inst = ServiceInstance::try_new(&format!("i{i}"), "10.0.0.1", 80).unwrap();
            registry.register_instance("svc", inst).unwrap();
        }
        let svc = registry.service("svc").unwrap();
        let i0 = svc.member("i0").unwrap();
        let count = std::sync::Arc::strong_count(&i0);
        let sel = svc
            .select_with(None, |m| m.instance().id().as_str() == "i0")
            .unwrap();
        assert_eq!(std::sync::Arc::strong_count(&i0), count, "no clone");
        assert_eq!(i0.active_connections(), 1);
        registry.deregister_instance("svc", "i0").unwrap();
        assert_eq!(sel.instance().id().as_str(), "i0");
        assert_eq!(sel.active_connections(), 1);
        // New instances take free hot lines; i0's is not free while the
        // selection can still release on it.
        let fresh =
            (0..20).map(|j| ServiceInstance::try_new(&format!("j{j}"), "10.0.0.1", 80).unwrap());
        registry
            .register_instances("svc", fresh.collect::<Vec<_>>())
            .unwrap();
        for j in 0..20 {
            let status = registry.instance("svc", &format!("j{j}")).unwrap();
            assert_eq!(status.active_connections, 0, "j{j} shares no line");
        }
        drop(sel);
        assert_eq!(i0.active_connections(), 0);
        for j in 0..20 {
            let status = registry.instance("svc", &format!("j{j}")).unwrap();
            assert_eq!(status.active_connections, 0, "j{j} after the release");
        }
        // The thread's view follows the new snapshot: i0 is never picked.
        for _ in 0..50 {
            assert_ne!(svc.select(None).unwrap().instance().id().as_str(), "i0");
        }
    }

    #[test]
    fn a_seeded_thread_draws_the_same_picks_whichever_thread_slot_it_has() {
        // Each call runs on new threads, which take new slots: the stream
        // depends on the seed and on the order threads first pick, not on
        // the slot.
        let first = picks(7, 1);
        assert_eq!(first, picks(7, 1));
        let distinct: std::collections::HashSet<_> = first[0].iter().collect();
        assert!(distinct.len() > 30, "random picks: {}", distinct.len());
        assert_ne!(first, picks(8, 1), "another seed, another stream");
        // The second thread to pick does not replay the first one's draws
        // (it gets the next stream, or, sharing a slot, continues it).
        let two = picks(7, 2);
        assert_ne!(two[0], two[1]);
        assert_eq!(
            two[0][..],
            first[0][..100],
            "thread 1's stream starts alike"
        );
    }
}
