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
//! ## Nothing service-wide is written per pick
//!
//! A guard must keep its service's [`Recorder`] alive, but cloning one
//! `Arc<Recorder>` per selection would be a read-modify-write on one
//! reference count from every thread, twice per request. So each thread
//! slot (see `per_thread`) of a service holds its own `PickLocal`: an
//! `Arc` of the recorder handle whose count only that slot's selections
//! touch, and that slot's RNG state. A selection counts on its instance
//! (`active`, `last_used`: the instance's own line) and on its thread's slot
//! of the service's counters, nothing else.
//!
//! ## Randomness: one stream per thread, reproducible
//!
//! A pick draws from its thread slot's RNG state and writes the advanced
//! state back (no shared atomic). A slot's stream is seeded on its first
//! pick from the service's seed counter (`Recorder::next_seed`, the one
//! shared read-modify-write, once per thread and service). So with a seeded
//! registry, the k-th thread slot to pick from a service draws the k-th
//! stream of that seed: a test that picks from one thread gets the same
//! sequence on every run, whichever slot its thread has. Two threads that
//! share a slot (more than 16 threads) may reuse a state now and then: two
//! picks with the same draws, which costs a little spread, never
//! correctness.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::event::Event;
use crate::instance::{Member, ServiceInstance};
pub use crate::recorder::{FailureKind, Outcome};
use crate::recorder::{Recorder, Source};
use crate::strategy::StrategyKind;

/// One request's claim on one instance. See the module doc.
#[must_use = "dropping a Selection at once releases the connection it counts"]
pub struct Selection {
    recorder: Arc<RecorderHandle>,
    member: Arc<Member>,
    probe: bool,
    strategy: StrategyKind,
    events: Vec<Event>,
}

impl Selection {
    #[inline]
    pub(crate) fn new(
        recorder: Arc<RecorderHandle>,
        member: Arc<Member>,
        used_at: Timestamp,
        probe: bool,
        strategy: StrategyKind,
        events: Vec<Event>,
    ) -> Self {
        let live = &member.live().hot;
        live.active.fetch_add(1, Ordering::AcqRel);
        live.last_used.store(used_at.as_nanos(), Ordering::Relaxed);
        recorder.stats.request_started();
        Self {
            recorder,
            member,
            probe,
            strategy,
            events,
        }
    }

    /// The chosen instance.
    pub fn instance(&self) -> &ServiceInstance {
        self.member.instance()
    }

    /// The service name.
    pub fn service(&self) -> &str {
        self.recorder.name()
    }

    /// Active connections on the chosen instance, this one included.
    pub fn active_connections(&self) -> u32 {
        self.member.active_connections()
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
        self.recorder
            .record(&self.member, Outcome::Success(latency), Source::Request)
    }

    /// Records a failure and releases the connection.
    pub fn failure(self, kind: FailureKind) -> Vec<Event> {
        self.recorder
            .record(&self.member, Outcome::Failure(kind), Source::Request)
    }
}

/// A thread slot's own reference to the service's recorder: selections
/// clone the `Arc` around it, whose count is the slot's alone.
#[derive(Debug)]
pub(crate) struct RecorderHandle(Arc<Recorder>);

impl std::ops::Deref for RecorderHandle {
    type Target = Recorder;
    #[inline]
    fn deref(&self) -> &Recorder {
        &self.0
    }
}

/// One thread slot's state for picks on one service. See the module doc.
#[derive(Debug)]
pub(crate) struct PickLocal {
    /// The handle selections made on this slot clone.
    recorder: Arc<RecorderHandle>,
    /// The slot's RNG state; 0 until its first pick claims a seed.
    rng: AtomicU64,
}

impl PickLocal {
    pub(crate) fn new(recorder: &Arc<Recorder>) -> Self {
        Self {
            recorder: Arc::new(RecorderHandle(recorder.clone())),
            rng: AtomicU64::new(0),
        }
    }

    /// This slot's recorder handle.
    #[inline]
    pub(crate) fn recorder(&self) -> &Arc<RecorderHandle> {
        &self.recorder
    }

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
}

impl Drop for Selection {
    #[inline]
    fn drop(&mut self) {
        self.member.live().hot.active.fetch_sub(1, Ordering::AcqRel);
        self.recorder.stats.request_finished();
        if self.probe {
            self.recorder.release_probe(&self.member);
        }
    }
}

impl fmt::Debug for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Selection")
            .field("service", &self.recorder.name())
            .field("instance", self.member.instance().id())
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
