//! Instances: what an instance *is* (its description) and what is
//! *happening* to it (its live state), joined in a [`Member`].
//!
//! ## The types, one line each
//!
//! | type | what it is |
//! | --- | --- |
//! | [`InstanceId`] | a validated id (see [`ID_CHARS`]); the key everywhere |
//! | [`Weight`] | a validated configured weight, `1..=1000` |
//! | [`ServiceInstance`] | the description: id, address, port, weight, zone, tags; immutable |
//! | [`InstanceLive`] | the live state: its hot line (atomics selection reads), plus the trackers under a lock |
//! | [`Member`] | a registered instance: description + `Arc` of its live state |
//! | [`InstanceStatus`] | a point-in-time report of a member, for the admin API and tests |
//! | [`InstanceError`] | why a description was refused |
//!
//! "Live" is deliberate: the server's "state" is its persisted state file,
//! a different thing. (`InstanceLive` was `InstanceState` before issue 9.)
//!
//! ## Why two halves
//!
//! The description is immutable and replaced wholesale when an instance is
//! re-registered (new address, weight or tags). The live state — active
//! connections, request counts, health score, breaker, latency EWMA, slow
//! start — sits behind an `Arc` that the service carries over to the new
//! `Member` with the same id, so a reload or re-registration keeps history.
//!
//! The selection path reads the live state only through atomics
//! (`admits_traffic`, `effective_weight`, `active_connections`). The health
//! tracker, breaker and latency EWMA change together under a small
//! per-instance lock when an outcome is recorded, and publish what selection
//! needs to those atomics.
//!
//! ## One cache line per pick, in the service's arena
//!
//! Everything a pick reads or writes of an instance — the eligibility
//! inputs (draining, removed, health, breaker state, open window, probes),
//! the cost inputs (active count, weight, slow-start start, latency
//! estimate, whether it ever answered) and `last_used` — is one 64-byte
//! line (module `hot`), kept in its service's arena of lines, not
//! in this allocation: at 100,000 instances the arena's lines span ~1,600
//! pages where lines at the head of each instance spanned ~12,000 (TLB
//! misses). [`InstanceLive`] owns its line (it goes back to the arena when
//! the live state is dropped: the rule is in module `hot`). The
//! member list keeps each member's line number densely beside its slot, so
//! a strategy checks a candidate with that number and the line, reading no
//! `Member` and no `InstanceLive`; the selection names its member by
//! position (see [`selection`](crate::selection)). The weight is copied
//! into the line (and updated when the instance is re-registered) so a
//! cost needs no `Member` either.
//!
//! ## Bytes
//!
//! A service of 100,000 instances holds 100,000 of these, so their size is
//! a budget (issue 11: ≤ 1 KiB of RSS per instance in the whole server).
//! `InstanceLive` is 208 bytes (an `Arc` allocation of 224, no longer
//! 64-aligned: the line is elsewhere): the line's owner reference (16),
//! the outcome counters (56: no separate failure count, it is the sum over
//! the kinds), and the trackers under their lock (136). The line is 64
//! more in the arena. The trackers keep
//! no `Option<Timestamp>` (16 bytes) but an 8-byte `OptionalTimestamp`,
//! the health tracker no failure credit (it is 0 at the last failure and
//! refills from there), the breaker one run counter for its three runs,
//! the EWMA no window `Option` and no time of the window's last sample
//! (the estimate's last sample). A drain's deadline lives with the
//! service's draining set, not in every instance. The description is 48
//! bytes (zone and tags behind one optional pointer), so a `Member` is a
//! 72-byte allocation. A test
//! (`the_live_state_fits_its_budget_with_the_line_in_the_arena`) fails if
//! a field grows the state or the description.
//!
//! *Time only when needed.* The eligibility and factor methods take the
//! time as a closure: a closed breaker and an instance out of slow start
//! need no clock, so a pick that meets only those reads none (see
//! `clock::LazyNow`). A slow-start ramp that has reached its end clears its
//! start time (`factor` 1 either way), so an instance that once ramped does
//! not cost a clock read on every later pick.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use thiserror::Error;

use crate::breaker::{CircuitBreaker, CircuitState};
use crate::clock::Timestamp;
use crate::ewma::LatencyEwma;
use crate::health::{HealthScore, HealthTracker};
use crate::hot::{Hot, HotArena, HotLine, HotRef, NONE};
use crate::stats::Availability;

/// Longest instance id accepted, in bytes (a DNS name's limit).
pub const MAX_ID_LEN: usize = 253;

/// The characters an instance id may use, as written in error messages.
///
/// Ids become log fields, metric label values and etcd key segments, and
/// arrive from the config file, the admin API, the state file and etcd. A
/// conservative set — ASCII letters, digits and `. _ : - @`, enough for host
/// names, `host:port` and `name@zone` — means none of those needs escaping,
/// and a `/`, a space, a newline or a NUL can never split a key or forge a
/// log line. `.` alone and `..` are refused too: as key segments they read
/// as path steps.
pub const ID_CHARS: &str = "ASCII letters, digits and . _ : - @";

/// A value given for an instance's description is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InstanceError {
    /// The instance id is empty.
    #[error("instance id must not be empty")]
    EmptyId,
    /// The instance id is longer than [`MAX_ID_LEN`] bytes.
    #[error("instance id is {0} bytes long; the limit is {max}", max = MAX_ID_LEN)]
    IdTooLong(usize),
    /// The instance id has a character outside [`ID_CHARS`].
    #[error("instance id has {found:?} at byte {at}; allowed are {allowed}", allowed = ID_CHARS)]
    IdBadChar {
        /// The offending character.
        found: char,
        /// Its byte offset in the id.
        at: usize,
    },
    /// The instance id is `.` or contains `..`, which would read as a path
    /// step where ids become key segments.
    #[error("instance id {0:?} is or contains a '.'/'..' path step")]
    IdDotSegment(String),
    /// The address is empty.
    #[error("address must not be empty")]
    EmptyAddress,
    /// Port 0 cannot be connected to.
    #[error("port must be in 1..=65535, got 0")]
    ZeroPort,
    /// Weight outside `1..=1000`.
    #[error("weight must be in 1..=1000, got {0}")]
    InvalidWeight(u64),
}

impl InstanceError {
    /// The description field at fault (`id`, `address`, `port`, `weight`),
    /// so every entry point reports it under the same key.
    pub fn field(&self) -> &'static str {
        match self {
            InstanceError::EmptyId
            | InstanceError::IdTooLong(_)
            | InstanceError::IdBadChar { .. }
            | InstanceError::IdDotSegment(_) => "id",
            InstanceError::EmptyAddress => "address",
            InstanceError::ZeroPort => "port",
            InstanceError::InvalidWeight(_) => "weight",
        }
    }
}

/// An instance id: 1..=[`MAX_ID_LEN`] characters from [`ID_CHARS`], not
/// `.` and without `..`. Every id in the process is built through
/// [`try_new`](Self::try_new), so every entry point agrees. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(Arc<str>);

/// An instance's configured weight, `1..=1000` (default 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Weight(u16);

/// The description of one instance of a service.
///
/// 48 bytes: the zone and tags, which most instances do not have, sit
/// behind one optional pointer (40 bytes inline otherwise, on every one of
/// 100,000 members).
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceInstance {
    id: InstanceId,
    address: Arc<str>,
    port: u16,
    weight: Weight,
    /// Zone and tags; `None` when neither is set.
    metadata: Option<Arc<Metadata>>,
}

/// An instance's zone and tags.
#[derive(Debug, Clone, PartialEq, Default)]
struct Metadata {
    zone: Option<Arc<str>>,
    tags: Vec<Arc<str>>,
}

/// A registered instance: its description plus its shared live state.
///
/// Picks do not read it (they read the hot line, see the module doc); a
/// selection reads it for [`instance`](crate::Selection::instance) and to
/// record an outcome.
#[derive(Debug)]
pub struct Member {
    live: Arc<InstanceLive>,
    instance: ServiceInstance,
}

/// Live state of one instance, shared by every snapshot that lists it and by
/// every [`Selection`](crate::Selection) on it. The service's view of it is
/// read through [`Member`].
#[derive(Debug)]
pub struct InstanceLive {
    /// What a pick touches: the instance's line in its service's arena
    /// (module doc; the `hot` module).
    line: HotLine,
    pub(crate) requests: AtomicU64,
    /// Failures by [`FailureKind::index`](crate::FailureKind::index); their
    /// sum is the failure count (every failure has a kind).
    pub(crate) failures_by_kind: [AtomicU64; 6],
    pub(crate) trackers: Mutex<Trackers>,
}

/// The trackers that change together when an outcome is recorded, under
/// the instance's lock.
#[derive(Debug)]
pub(crate) struct Trackers {
    pub(crate) health: HealthTracker,
    pub(crate) breaker: CircuitBreaker,
    pub(crate) ewma: LatencyEwma,
    /// How the service's [`ServiceStats`](crate::stats::ServiceStats)
    /// count this instance now.
    pub(crate) counted: Availability,
}

/// A point-in-time report of one instance, for the admin API and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStatus {
    /// The description.
    pub instance: ServiceInstance,
    /// Effective weight = weight × health score × slow-start factor.
    pub effective_weight: f64,
    /// Current health score.
    pub health_score: f64,
    /// Breaker state.
    pub circuit_state: CircuitState,
    /// Requests currently holding a [`Selection`](crate::Selection).
    pub active_connections: u32,
    /// Whether the instance is draining.
    pub draining: bool,
    /// Request outcomes recorded (active health checks are not requests).
    pub requests: u64,
    /// Failures recorded.
    pub failures: u64,
    /// Failures by kind, indexed by [`FailureKind::index`](crate::FailureKind::index).
    pub failures_by_kind: [u64; 6],
    /// Peak-EWMA latency as of the last sample.
    pub latency_ewma: Duration,
    /// Slow-start factor now, in `[0, 1]`.
    pub slow_start_factor: f64,
    /// Time of the last selection, if any.
    pub last_used: Option<Timestamp>,
    /// Whether selection may choose the instance now (outside panic mode).
    pub eligible: bool,
}

// === impl InstanceId ===

impl InstanceId {
    /// Validates an id (see the type's doc for the rule).
    pub fn try_new(id: &str) -> Result<Self, InstanceError> {
        if id.is_empty() {
            return Err(InstanceError::EmptyId);
        }
        if id.len() > MAX_ID_LEN {
            return Err(InstanceError::IdTooLong(id.len()));
        }
        if let Some((at, found)) = id.char_indices().find(|&(_, c)| !is_id_char(c)) {
            return Err(InstanceError::IdBadChar { found, at });
        }
        if id == "." || id.contains("..") {
            return Err(InstanceError::IdDotSegment(id.to_owned()));
        }
        Ok(Self(Arc::from(id)))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `c` is in [`ID_CHARS`].
fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-' | '@')
}

impl fmt::Debug for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for InstanceId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

// === impl Weight ===

impl Weight {
    /// The default weight, 1.
    pub const DEFAULT: Weight = Weight(1);
    /// The largest weight, 1000.
    pub const MAX: Weight = Weight(1000);

    /// Validates a weight.
    pub fn try_new(w: u64) -> Result<Self, InstanceError> {
        match u16::try_from(w) {
            Ok(v @ 1..=1000) => Ok(Self(v)),
            _ => Err(InstanceError::InvalidWeight(w)),
        }
    }

    /// The weight as a number.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl Default for Weight {
    fn default() -> Self {
        Self::DEFAULT
    }
}

// === impl ServiceInstance ===

impl ServiceInstance {
    /// Validates and builds an instance with weight 1 and no metadata.
    pub fn try_new(id: &str, address: &str, port: u16) -> Result<Self, InstanceError> {
        let id = InstanceId::try_new(id)?;
        if address.is_empty() {
            return Err(InstanceError::EmptyAddress);
        }
        if port == 0 {
            return Err(InstanceError::ZeroPort);
        }
        Ok(Self {
            id,
            address: Arc::from(address),
            port,
            weight: Weight::DEFAULT,
            metadata: None,
        })
    }

    /// Sets the weight.
    pub fn with_weight(mut self, weight: Weight) -> Self {
        self.weight = weight;
        self
    }

    /// Sets the zone (metadata; not used for selection yet).
    pub fn with_zone(self, zone: impl Into<Arc<str>>) -> Self {
        self.with_metadata(|m| m.zone = Some(zone.into()))
    }

    /// Sets the tags (metadata).
    pub fn with_tags<I, S>(self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<Arc<str>>,
    {
        let tags = tags.into_iter().map(Into::into).collect();
        self.with_metadata(|m| m.tags = tags)
    }

    /// Applies `f` to the metadata; metadata left empty is `None`, so a
    /// description with no zone and no tags compares equal however it was
    /// built and allocates nothing for them.
    fn with_metadata(mut self, f: impl FnOnce(&mut Metadata)) -> Self {
        let mut m = self.metadata.take().unwrap_or_default();
        f(Arc::make_mut(&mut m));
        self.metadata = (*m != Metadata::default()).then_some(m);
        self
    }

    /// The id.
    pub fn id(&self) -> &InstanceId {
        &self.id
    }
    /// The address (host name or IP) to connect to.
    pub fn address(&self) -> &str {
        &self.address
    }
    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port
    }
    /// The configured weight.
    pub fn weight(&self) -> Weight {
        self.weight
    }
    /// The zone, if set.
    pub fn zone(&self) -> Option<&str> {
        self.metadata.as_ref()?.zone.as_deref()
    }
    /// The tags.
    pub fn tags(&self) -> impl Iterator<Item = &str> {
        self.metadata
            .iter()
            .flat_map(|m| m.tags.iter().map(|t| &**t))
    }
}

// === impl Member ===

impl Member {
    pub(crate) fn new(instance: ServiceInstance, live: Arc<InstanceLive>) -> Self {
        Self { live, instance }
    }

    /// The description.
    pub fn instance(&self) -> &ServiceInstance {
        &self.instance
    }

    #[inline]
    pub(crate) fn live(&self) -> &Arc<InstanceLive> {
        &self.live
    }

    /// Request outcomes recorded on this instance.
    pub fn requests(&self) -> u64 {
        self.live.requests.load(Ordering::Relaxed)
    }

    /// Failed request outcomes recorded on this instance (active health
    /// checks are not requests); `requests() - failures()` only grows when
    /// real traffic succeeds, which is what passive health reads.
    pub fn failures(&self) -> u64 {
        self.live.failures()
    }

    /// Requests currently holding a selection on this instance. Exact.
    #[inline]
    pub fn active_connections(&self) -> u32 {
        self.live.active_connections()
    }

    /// Current health score.
    #[inline]
    pub fn health_score(&self) -> f64 {
        self.live.health()
    }

    /// Current breaker state as last published.
    #[inline]
    pub fn circuit_state(&self) -> CircuitState {
        self.live.circuit_state()
    }

    /// Whether the instance is draining.
    pub fn is_draining(&self) -> bool {
        self.live.hot().draining.load(Ordering::Acquire)
    }

    /// Whether normal (non-panic) selection may choose this instance at
    /// `now`: not draining or removed, health above 0, and a breaker that is
    /// closed, open past its window (the pick will turn it half-open), or
    /// half-open with a free probe slot. Reads atomics only.
    #[inline]
    pub fn admits_traffic(&self, now: Timestamp, max_probes: u32) -> bool {
        self.live.admits_traffic(|| now, max_probes)
    }

    /// Whether panic-mode selection may choose this instance: anything not
    /// draining or removed (panic ignores health and breakers, not drains).
    #[inline]
    pub fn admits_panic_traffic(&self) -> bool {
        self.live.admits_panic_traffic()
    }

    /// Slow-start factor at `now` for a ramp of `window`.
    #[inline]
    pub fn slow_start_factor(&self, now: Timestamp, window: Duration) -> f64 {
        self.live.slow_start_factor(|| now, window)
    }

    /// Health score × slow-start factor: the share of the configured weight
    /// the instance carries now, in `[0, 1]`.
    #[inline]
    pub fn weight_factor(&self, now: Timestamp, slow_start: Duration) -> f64 {
        self.live.weight_factor(|| now, slow_start)
    }

    /// Effective weight = weight × health score × slow-start factor.
    pub fn effective_weight(&self, now: Timestamp, slow_start: Duration) -> f64 {
        f64::from(self.instance.weight.get()) * self.weight_factor(now, slow_start)
    }

    /// Peak-EWMA latency estimate in nanoseconds, decayed to `now`.
    #[inline]
    pub fn latency_estimate_ns(&self, now: Timestamp) -> f64 {
        self.live.latency_estimate_ns(now)
    }

    /// When the latency estimate last took a sample (or was created).
    pub fn latency_updated_at(&self) -> Timestamp {
        Timestamp::from_nanos(self.live.hot().ewma_at.load(Ordering::Relaxed))
    }

    /// Peak-EWMA latency as of the last sample, undecayed.
    pub fn latency_ewma_ns(&self) -> f64 {
        self.live.latency_ewma_ns()
    }

    /// A report of this instance at `now`.
    pub fn status(&self, now: Timestamp, slow_start: Duration, max_probes: u32) -> InstanceStatus {
        let s = &self.live;
        let last = s.hot().last_used.load(Ordering::Relaxed);
        InstanceStatus {
            instance: self.instance.clone(),
            effective_weight: self.effective_weight(now, slow_start),
            health_score: self.health_score(),
            circuit_state: self.circuit_state(),
            active_connections: self.active_connections(),
            draining: self.is_draining(),
            requests: s.requests.load(Ordering::Relaxed),
            failures: s.failures(),
            failures_by_kind: std::array::from_fn(|i| {
                s.failures_by_kind[i].load(Ordering::Relaxed)
            }),
            latency_ewma: Duration::from_nanos(self.latency_ewma_ns() as u64),
            slow_start_factor: self.slow_start_factor(now, slow_start),
            last_used: (last != NONE).then(|| Timestamp::from_nanos(last)),
            eligible: self.admits_traffic(now, max_probes),
        }
    }
}

// === impl InstanceLive ===

impl InstanceLive {
    /// Fresh state at `now` for an instance of configured weight `weight`,
    /// its line taken from `arena`; `slow_start` starts a ramp now.
    pub(crate) fn new(
        arena: &Arc<HotArena>,
        now: Timestamp,
        slow_start: bool,
        weight: Weight,
    ) -> Self {
        let ewma = LatencyEwma::new(now);
        Self {
            line: arena.take(now, slow_start, weight.get(), ewma.last_estimate_ns()),
            requests: AtomicU64::new(0),
            failures_by_kind: Default::default(),
            trackers: Mutex::new(Trackers {
                health: HealthTracker::new(),
                breaker: CircuitBreaker::new(),
                ewma,
                counted: Availability::Absent,
            }),
        }
    }

    /// The instance's hot line.
    #[inline]
    pub(crate) fn hot(&self) -> &Hot {
        self.line.get()
    }

    /// A reference to the hot line, for a member-list slot.
    pub(crate) fn hot_ref(&self) -> HotRef {
        self.line.share()
    }

    #[inline]
    pub(crate) fn health(&self) -> f64 {
        self.hot().health()
    }

    /// Requests currently holding a selection on this instance.
    #[inline]
    pub(crate) fn active_connections(&self) -> u32 {
        self.hot().active_connections()
    }

    /// Records the configured weight of a re-registered member.
    pub(crate) fn set_weight(&self, weight: Weight) {
        self.hot().weight.store(weight.get(), Ordering::Relaxed);
    }

    /// Current breaker state as last published.
    #[inline]
    pub(crate) fn circuit_state(&self) -> CircuitState {
        self.hot().circuit_state()
    }

    /// [`Member::admits_traffic`], reading the time only for a breaker
    /// that is open.
    #[inline]
    pub(crate) fn admits_traffic(&self, now: impl FnOnce() -> Timestamp, max_probes: u32) -> bool {
        self.hot().admits_traffic(now, max_probes)
    }

    /// [`Member::admits_panic_traffic`].
    #[inline]
    pub(crate) fn admits_panic_traffic(&self) -> bool {
        self.hot().admits_panic_traffic()
    }

    /// [`Member::slow_start_factor`], reading the time only during a ramp.
    /// A ramp found at its end is cleared (module doc).
    #[inline]
    pub(crate) fn slow_start_factor(
        &self,
        now: impl FnOnce() -> Timestamp,
        window: Duration,
    ) -> f64 {
        self.hot().slow_start_factor(now, window)
    }

    /// [`Member::weight_factor`].
    #[inline]
    pub(crate) fn weight_factor(
        &self,
        now: impl FnOnce() -> Timestamp,
        slow_start: Duration,
    ) -> f64 {
        self.hot().weight_factor(now, slow_start)
    }

    /// [`Member::latency_ewma_ns`].
    #[inline]
    pub(crate) fn latency_ewma_ns(&self) -> f64 {
        self.hot().latency_ewma_ns()
    }

    /// [`Member::latency_estimate_ns`].
    #[inline]
    pub(crate) fn latency_estimate_ns(&self, now: Timestamp) -> f64 {
        self.hot().latency_estimate_ns(now)
    }

    pub(crate) fn set_draining(&self, draining: bool) {
        self.hot().draining.store(draining, Ordering::Release);
    }

    pub(crate) fn start_slow_start(&self, now: Timestamp) {
        self.hot()
            .slow_start_began
            .store(now.as_nanos(), Ordering::Release);
    }

    /// Publishes what the selection path reads. Call with `inner` locked.
    pub(crate) fn publish(&self, inner: &Trackers) {
        let s = self.hot();
        s.health_bits
            .store(inner.health.score().get().to_bits(), Ordering::Release);
        s.open_until
            .store(inner.breaker.open_until().as_nanos(), Ordering::Release);
        s.probes
            .store(inner.breaker.probes_in_flight(), Ordering::Release);
        s.breaker_state
            .store(inner.breaker.state().as_u8(), Ordering::Release);
        s.ewma_bits
            .store(inner.ewma.last_estimate_ns().to_bits(), Ordering::Relaxed);
        s.ewma_at
            .store(inner.ewma.updated_at().as_nanos(), Ordering::Relaxed);
    }

    /// How the service should count this instance now: draining wins;
    /// otherwise ejected (health 0) or breaker open is unavailable.
    pub(crate) fn availability(&self, trackers: &Trackers) -> Availability {
        if self.hot().draining.load(Ordering::Acquire) {
            Availability::Draining
        } else if trackers.health.score() == HealthScore::EJECTED
            || trackers.breaker.state() == CircuitState::Open
        {
            Availability::Unavailable
        } else {
            Availability::Available
        }
    }

    /// Counts one request outcome; `failure` is the failure kind's index
    /// (below 6: [`FailureKind::index`](crate::FailureKind::index)).
    pub(crate) fn count_outcome(&self, failure: Option<usize>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let answered = &self.hot().answered;
        if !answered.load(Ordering::Relaxed) {
            answered.store(true, Ordering::Relaxed);
        }
        if let Some(c) = failure.and_then(|kind| self.failures_by_kind.get(kind)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Failed request outcomes: the sum over the kinds.
    pub(crate) fn failures(&self) -> u64 {
        self.failures_by_kind
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of an instance (module doc, "Bytes"): each step below is
    /// what a layout that grows back would lose. `Arc<InstanceLive>`'s
    /// allocation is 16 (the counts) + `size_of::<InstanceLive>()`; the hot
    /// line is 64 more, in the service's arena.
    #[test]
    fn the_live_state_fits_its_budget_with_the_line_in_the_arena() {
        use std::mem::{align_of, size_of};
        assert_eq!(size_of::<InstanceLive>(), 208);
        assert_eq!(align_of::<InstanceLive>(), 8);
        assert!(size_of::<Trackers>() <= 136, "{}", size_of::<Trackers>());
        assert_eq!(size_of::<HealthTracker>(), 24);
        assert_eq!(size_of::<CircuitBreaker>(), 48);
        assert_eq!(size_of::<LatencyEwma>(), 48);
        assert_eq!(size_of::<ServiceInstance>(), 48);
        assert_eq!(size_of::<Member>(), 56);
    }

    #[test]
    fn the_live_state_reaches_its_own_line_in_the_arena() {
        let arena = Arc::default();
        let live = InstanceLive::new(&arena, Timestamp::default(), false, Weight::DEFAULT);
        assert_eq!(std::ptr::from_ref(live.hot()) as usize % 64, 0);
        assert!(std::ptr::eq(live.hot(), live.hot_ref().get()));
        let other = InstanceLive::new(&arena, Timestamp::default(), false, Weight::DEFAULT);
        assert!(!std::ptr::eq(live.hot(), other.hot()));
    }

    #[test]
    fn descriptions_are_validated() {
        assert_eq!(
            ServiceInstance::try_new("", "h", 1).unwrap_err(),
            InstanceError::EmptyId
        );
        assert_eq!(
            ServiceInstance::try_new("a", "", 1).unwrap_err(),
            InstanceError::EmptyAddress
        );
        assert_eq!(
            ServiceInstance::try_new("a", "h", 0).unwrap_err(),
            InstanceError::ZeroPort
        );
        let long = "x".repeat(254);
        assert_eq!(
            InstanceId::try_new(&long).unwrap_err(),
            InstanceError::IdTooLong(254)
        );
        assert!(InstanceId::try_new(&"x".repeat(253)).is_ok());
        for w in [0, 1001, 65_536 + 1] {
            assert_eq!(
                Weight::try_new(w).unwrap_err(),
                InstanceError::InvalidWeight(w)
            );
        }
        assert_eq!(Weight::try_new(1000).unwrap().get(), 1000);
        let i = ServiceInstance::try_new("a", "10.0.0.1", 80)
            .unwrap()
            .with_zone("eu-1")
            .with_tags(["canary"]);
        assert_eq!(i.zone(), Some("eu-1"));
        assert_eq!(i.tags().collect::<Vec<_>>(), ["canary"]);
        // No zone and no tags is one description, however it was built.
        let plain = ServiceInstance::try_new("a", "10.0.0.1", 80).unwrap();
        assert_eq!(plain.clone().with_tags(Vec::<&str>::new()), plain);
        assert_eq!(i.clone().with_tags(["x"]).tags().collect::<Vec<_>>(), ["x"]);
        assert_eq!(i.with_tags(["x"]).zone(), Some("eu-1"));
    }

    #[test]
    fn ids_from_the_allowed_set_are_accepted() {
        for id in [
            "api-1",
            "b0",
            "A_z.9",
            "10.0.0.1:8080",
            "web@eu-west-1",
            "x",
            ".hidden",
            "trailing.",
        ] {
            assert_eq!(InstanceId::try_new(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn ids_that_would_split_a_key_or_a_log_line_are_rejected() {
        let bad_char = |id: &str, found: char, at: usize| {
            assert_eq!(
                InstanceId::try_new(id).unwrap_err(),
                InstanceError::IdBadChar { found, at },
                "{id:?}"
            );
        };
        bad_char("a/b", '/', 1);
        bad_char("../etc", '/', 2);
        bad_char("a b", ' ', 1);
        bad_char("line\nbreak", '\n', 4);
        bad_char("tab\t", '\t', 3);
        bad_char("nul\0", '\0', 3);
        bad_char("café", 'é', 3);
        bad_char("a=b", '=', 1);
        bad_char("\"q\"", '"', 0);
        for id in [".", "..", "a..b", "..."] {
            assert_eq!(
                InstanceId::try_new(id).unwrap_err(),
                InstanceError::IdDotSegment(id.to_owned()),
                "{id:?}"
            );
        }
        let msg = InstanceId::try_new("a/b").unwrap_err().to_string();
        assert!(msg.contains("'/'") && msg.contains("byte 1"), "{msg}");
        assert!(InstanceId::try_new(&"x".repeat(254))
            .unwrap_err()
            .to_string()
            .contains("limit is 253"));
    }
}
