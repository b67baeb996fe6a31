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

use std::fmt;
use std::sync::atomic::Ordering;
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
    recorder: Arc<Recorder>,
    member: Arc<Member>,
    started: Timestamp,
    probe: bool,
    strategy: StrategyKind,
    events: Vec<Event>,
}

impl Selection {
    #[inline]
    pub(crate) fn new(
        recorder: Arc<Recorder>,
        member: Arc<Member>,
        now: Timestamp,
        probe: bool,
        strategy: StrategyKind,
        events: Vec<Event>,
    ) -> Self {
        let live = member.live();
        live.active.fetch_add(1, Ordering::AcqRel);
        live.last_used.store(now.as_nanos(), Ordering::Relaxed);
        recorder.stats.request_started();
        Self {
            recorder,
            member,
            started: now,
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

    /// When the selection was made (on the registry's clock).
    pub fn started(&self) -> Timestamp {
        self.started
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

    /// Records a success, measuring latency on the registry's clock.
    pub fn success_now(self) -> Vec<Event> {
        let latency = self.recorder.now().saturating_since(self.started);
        self.success(latency)
    }

    /// Records a failure and releases the connection.
    pub fn failure(self, kind: FailureKind) -> Vec<Event> {
        self.recorder
            .record(&self.member, Outcome::Failure(kind), Source::Request)
    }
}

impl Drop for Selection {
    #[inline]
    fn drop(&mut self) {
        self.member.live().active.fetch_sub(1, Ordering::AcqRel);
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
