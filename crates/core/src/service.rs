//! One [`Service`]: its member list, strategy and configuration, and the
//! rules that tie instances, health, breakers, draining and panic mode
//! together. The [`Registry`](crate::Registry) only maps names to services.
//!
//! ## Concurrency
//!
//! Each service publishes an immutable [`Snapshot`] (members, strategy,
//! config, generation) behind one `ArcSwap`. Selection loads it without a
//! lock; writers (registration, removal, strategy change) serialise on the
//! service's writer lock, build a new snapshot and store it, then publish
//! its generation. A pick does not load the `ArcSwap` itself: its thread
//! keeps a view of the snapshot (see `pick_view`) and replaces it when the
//! published generation moved, so a pick reads one shared atomic that
//! changes only with membership. Per-instance live
//! state is shared between snapshots (see [`instance`](crate::instance)), so
//! a reader holding an old snapshot still reports outcomes to the right
//! place.
//!
//! ## Eligibility and panic mode
//!
//! An instance is eligible when it is not draining, its health score is above
//! 0 and its breaker admits traffic. The service keeps exact counters of
//! members, draining and unavailable (ejected or breaker-open) instances in
//! its [`ServiceStats`], recounted (by `ServiceStats::recount`, the only
//! way they change) whenever an instance's state changes, so deciding panic
//! mode costs three atomic loads per pick: with `eligible <
//! min_healthy_percent × (members − draining)` the service selects across
//! every non-draining instance, ignoring health and breakers, as Envoy does
//! — better to spread load over struggling instances than to crush the few
//! that remain. An instance whose open window has elapsed counts as
//! unavailable until a pick moves it to half-open.
//!
//! **Panic candidates first.** In panic mode the pick first keeps to the
//! *candidates*: instances whose breaker is not open, or open with its
//! latest active check passing (an instance held out by a long window
//! after it recovered). The instances whose breaker is open and whose
//! checks fail, or have not passed since the trip, join only when the
//! candidates are fewer than `min_healthy_percent` of the non-draining
//! instances. *Why:* in the 30-minute soak, panic mode spread traffic
//! evenly over every instance, so the one failing at that moment (answering
//! 500) got a full share while a recovered one was held out; this keeps the
//! spread (at least `min_healthy_percent` of the instances) without
//! feeding the instance that is failing now. The candidates are counted
//! per pick (one pass, a breaker lock per open instance), which only panic
//! mode pays.
//!
//! ## The clock on the pick path
//!
//! A pick reads the clock only if a rule it meets needs the time (a
//! [`LazyNow`]: an open breaker, a slow-start ramp, `adaptive`'s evaluation
//! once it is due, a stale table); a select + release in the steady state
//! reads none, whatever the strategy, and a recorded outcome reads it once
//! (the integration test `clock_reads`). The service keeps its *latest*
//! clock reading (`Recorder::latest`), which every read of its clock (a
//! recorded outcome, a pick that read it, a registration,
//! `Registry::maintain`, a report) moves forward when it is a millisecond
//! or more newer. The chosen instance's `last_used` gets the pick's time if
//! it was read, else that latest reading; `adaptive` asks it whether its
//! evaluation is due, and `peak_ewma` whether an avoided instance is due
//! its probe
//! ([`PickContext::latest`](crate::strategy::PickContext::latest)). So
//! `last_used` is exact when the pick read the clock, and otherwise at most
//! as old as the service's last clock read (to a millisecond): about now
//! while requests complete, at most 100 ms under the server, which calls
//! `Registry::maintain` every 100 ms. Only reports and `peak_ewma`'s probe
//! rule read `last_used`.
//!
//! ## The common case of a pick
//!
//! A `random`, `p2c` or `peak_ewma` pick outside panic mode whose drawn
//! candidates are plainly eligible (not draining or removed, health above
//! 0, breaker closed, no ramp) is decided without the strategy's context
//! (`strategy::drawn`), with the same outcome; every other
//! pick runs the general path (`pick_general`).
//!
//! ## Identity
//!
//! Registering an id that exists updates its description and keeps its live
//! state (health, breaker, counts). Deregistering forgets it; an instance
//! registered again later starts fresh, with slow start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::breaker::{Admission, CircuitState};
use crate::clock::{Clock, LazyNow, OptionalTimestamp, Timestamp};
use crate::config::LoadBalancerConfig;
use crate::event::Event;
use crate::filter::{Filter, NoSelection};
use crate::health::HealthScore;
use crate::hot::{Hot, HotArena};
use crate::instance::{InstanceId, InstanceLive, InstanceStatus, Member, ServiceInstance};
use crate::member_index::MemberIndex;
use crate::members::Members;
use crate::per_thread::{Padded, PerThread};
use crate::pick_view::{self, PickView, ServiceKey};
use crate::recorder::{Outcome, Recorder, Source};
use crate::selection::{PickLocal, Selection, Target};
pub use crate::snapshot::Snapshot;
use crate::stats::{Availability, ServiceStats};
use crate::strategy::drawn::{self, Drawn};
use crate::strategy::{AdaptiveStatus, PickContext, Picked, StrategyKind, Switch};

/// Picks attempted when the chosen instance's breaker refuses admission.
const ADMISSION_ATTEMPTS: usize = 3;

/// One service: its snapshot and writer state, and the [`Recorder`] its
/// selections report to.
#[derive(Debug)]
pub struct Service {
    recorder: Arc<Recorder>,
    snapshot: ArcSwap<Snapshot>,
    /// The generation of the snapshot last stored, so a pick can tell
    /// whether its thread's view is current without loading the snapshot.
    published: Padded<AtomicU64>,
    writer: Mutex<Writer>,
    /// Per-thread pick state (the RNG): see [`selection`](crate::selection).
    local: PerThread<PickLocal>,
    /// The service's key in the threads' view caches (see `pick_view`).
    key: ServiceKey,
}

#[derive(Debug, Default)]
struct Writer {
    index: MemberIndex,
    /// Draining members and when each must be gone (a deadline that can
    /// never pass reads as none). Kept here, not in every instance's live
    /// state: only draining members have one.
    draining: HashMap<InstanceId, OptionalTimestamp>,
    generation: u64,
    /// The service's hot lines (the `hot` module).
    arena: Arc<HotArena>,
}

/// Whether a registration added an instance or updated one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A new id.
    Added,
    /// An existing id: description replaced, live state kept.
    Updated,
}

/// A report of one service, for the admin API.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    /// Service name.
    pub name: String,
    /// Configured strategy.
    pub strategy: StrategyKind,
    /// For `adaptive`: the strategy in use and why.
    pub adaptive: Option<AdaptiveStatus>,
    /// Registered instances.
    pub instances: usize,
    /// Instances eligible for selection (by the service's counters).
    pub eligible: usize,
    /// Draining instances.
    pub draining: usize,
    /// Whether the service is in panic mode.
    pub panic: bool,
    /// Requests in flight.
    pub in_flight: u64,
}

// === impl Service ===

impl Service {
    pub(crate) fn new(
        name: Arc<str>,
        clock: Arc<dyn Clock>,
        config: LoadBalancerConfig,
        seed: u64,
    ) -> Self {
        let strategy = config.strategy.build_with(&config);
        let config = Arc::new(config);
        let recorder = Arc::new(Recorder::new(name, clock, config.clone(), seed));
        let snapshot = Arc::new(Snapshot {
            members: Members::default(),
            generation: 0,
            kind: strategy.kind(),
            strategy,
            config,
            table: Default::default(),
        });
        Self {
            local: PerThread::default(),
            key: ServiceKey::new(),
            recorder,
            snapshot: ArcSwap::new(snapshot),
            published: Padded(AtomicU64::new(0)),
            writer: Mutex::new(Writer::default()),
        }
    }

    /// Reads the clock and keeps the reading as the service's latest.
    fn now(&self) -> Timestamp {
        self.recorder.now()
    }

    /// The service name.
    pub fn name(&self) -> &str {
        &self.recorder.name
    }

    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.recorder.name
    }

    /// The service's configuration.
    pub fn config(&self) -> Arc<LoadBalancerConfig> {
        self.recorder.config.load_full()
    }

    /// Whether the service was in panic mode at the last pick or change.
    pub fn in_panic(&self) -> bool {
        self.recorder.in_panic()
    }

    /// The current snapshot's member list (cheap to clone).
    pub fn members(&self) -> Members {
        self.snapshot.load().members.clone()
    }

    /// The member with id `id`, if registered.
    pub(crate) fn member(&self, id: &str) -> Option<Arc<Member>> {
        let w = self.writer.lock();
        // Under the writer lock the snapshot's list is the index's.
        let snap = self.snapshot.load();
        let idx = w.index.get(&snap.members, id)?;
        snap.members.get(idx).cloned()
    }

    /// Selects an instance; see [`Registry::get_instance`](crate::Registry::get_instance).
    /// The same as [`select_with`](Self::select_with) with a filter that
    /// accepts all.
    pub fn select(&self, key: Option<&[u8]>) -> Option<Selection> {
        self.pick(key, &Filter::OPEN)
    }

    /// Selects an instance that `accept` accepts, or `None` if no eligible
    /// instance is acceptable.
    ///
    /// `accept` is consulted inside the pick, like eligibility: the strategy
    /// skips refused members, so the caller never re-draws (Pingora's
    /// `select_with`). Use it for "not an instance this request already
    /// tried". (A connection limit is cheaper as
    /// [`select_within`](Self::select_within)'s `max_active`, which reads
    /// no member.) Round robin moves past a
    /// refused instance in its rotation; `consistent_hash` falls over to the
    /// next instance in its table order for the key, the same one every
    /// time; panic mode and half-open probe limits apply as in
    /// [`select`](Self::select).
    ///
    /// ```
    /// use datapunk_lb_core::{Registry, ServiceInstance};
    ///
    /// let registry = Registry::new();
    /// registry.register_instance("api", ServiceInstance::try_new("api-1", "10.0.0.1", 80)?)?;
    /// registry.register_instance("api", ServiceInstance::try_new("api-2", "10.0.0.2", 80)?)?;
    /// let svc = registry.service("api").expect("registered");
    /// let s = svc.select_with(None, |m| m.instance().id().as_str() != "api-1").expect("api-2");
    /// assert_eq!(s.instance().id().as_str(), "api-2");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn select_with(
        &self,
        key: Option<&[u8]>,
        accept: impl Fn(&Member) -> bool,
    ) -> Option<Selection> {
        let over_limit = AtomicBool::new(false);
        self.pick(key, &Filter::new(u32::MAX, Some(&accept), &over_limit))
    }

    /// Selects an instance with fewer than `max_active` active selections
    /// that `accept`, if given, accepts; else says whether some candidate
    /// was refused for the limit ([`NoSelection::OverLimit`]) or none was
    /// acceptable ([`NoSelection::NoneAcceptable`]).
    ///
    /// The rule is [`select_with`](Self::select_with)'s with the limit as
    /// part of the filter, asked after `accept` (module doc of
    /// [`filter`](crate::filter)): a candidate at or over the limit is
    /// skipped as a refused one. The limit is checked on the instance's
    /// hot line, which the pick reads anyway, so a pick with a limit and
    /// no `accept` reads no member (the proxy's first attempt under
    /// `max_connections`); `u32::MAX` is no limit.
    ///
    /// ```
    /// use datapunk_lb_core::filter::NoSelection;
    /// use datapunk_lb_core::{Registry, ServiceInstance};
    ///
    /// let registry = Registry::new();
    /// registry.register_instance("api", ServiceInstance::try_new("api-1", "10.0.0.1", 80)?)?;
    /// let svc = registry.service("api").expect("registered");
    /// let held = svc.select_within(None, 1, None).expect("api-1 is idle");
    /// assert_eq!(svc.select_within(None, 1, None).err(), Some(NoSelection::OverLimit));
    /// drop(held);
    /// let not_api_1 = |m: &datapunk_lb_core::Member| m.instance().id().as_str() != "api-1";
    /// let none = svc.select_within(None, 1, Some(&not_api_1)).err();
    /// assert_eq!(none, Some(NoSelection::NoneAcceptable));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[inline]
    pub fn select_within(
        &self,
        key: Option<&[u8]>,
        max_active: u32,
        accept: Option<&dyn Fn(&Member) -> bool>,
    ) -> Result<Selection, NoSelection> {
        let over_limit = AtomicBool::new(false);
        let filter = Filter::new(max_active, accept, &over_limit);
        self.pick(key, &filter)
    }

    /// The pick of every `select`, answered as the caller's `R`
    /// ([`PickAnswer`]): none when `filter` (with the service's rules)
    /// accepted no candidate; the filter noted whether one was refused for
    /// its limit.
    fn pick<R: PickAnswer>(&self, key: Option<&[u8]>, filter: &Filter<'_>) -> R {
        let local = self.local.local();
        // A lease on the thread's view of the snapshot (and the recorder)
        // the selection keeps: no load of the shared `ArcSwap`, no lock and
        // no reference count per pick in the steady state (`pick_view`).
        let view = pick_view::lease(&self.key, self.published.load(Ordering::Acquire), || {
            PickView::new(&self.key, self.recorder.clone(), self.snapshot.load_full())
        });
        let snap = view.snapshot();
        let mut events = Vec::new();
        // Before the empty check: a service whose last instance left while
        // in panic must leave it (found by the `core_ops` fuzz target).
        let panic = self.recorder.check_panic(&snap.config, &mut events);
        if snap.members.is_empty() {
            pick_view::release(view);
            return R::none(filter);
        }
        // The common case of the strategies that draw ahead, decided
        // without a context (`strategy::drawn`: the same outcome).
        let draws_ahead = matches!(
            snap.kind,
            StrategyKind::Random | StrategyKind::P2c | StrategyKind::PeakEwma
        );
        let mut first_refused = false;
        if draws_ahead && !panic && events.is_empty() && !general_only() {
            let latest = self.recorder.latest();
            let slow_start = snap.config.slow_start;
            let ahead = &local.ahead;
            match drawn::pick(snap.kind, &snap.members, ahead, slow_start, latest, filter) {
                Drawn::Picked(c) => {
                    local.refill(&snap.members, || self.recorder.next_seed());
                    let target = Target::At {
                        index: c.index,
                        line: c.line,
                    };
                    let (kind, used_at) = (snap.kind, latest.load(Ordering::Relaxed));
                    let used_at = Timestamp::from_nanos(used_at);
                    return R::picked(Selection::new(view, target, used_at, false, kind, events));
                }
                Drawn::Refused => first_refused = true,
                Drawn::General => {}
            }
        }
        match self.pick_general(key, filter, local, view, panic, events, first_refused) {
            Some(s) => R::picked(s),
            None => R::none(filter),
        }
    }

    /// [`pick`](Self::pick) past its common case: every rule, through the
    /// strategy's [`pick`](crate::strategy::Strategy::pick);
    /// `first_refused`: the common case took the first draws and the
    /// filter refused them (`PickContext::first_refused`).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    fn pick_general(
        &self,
        key: Option<&[u8]>,
        filter: &Filter<'_>,
        local: &PickLocal,
        view: Arc<PickView>,
        panic: bool,
        mut events: Vec<Event>,
        first_refused: bool,
    ) -> Option<Selection> {
        let snap = view.snapshot();
        let now = LazyNow::new(&*self.recorder.clock);
        let mut rng = local.take_rng(|| self.recorder.next_seed());
        let candidates_only = panic && enough_panic_candidates(&snap.members, &snap.config);
        // The caller's filter is asked only about panic candidates; the
        // limit stays the caller's.
        let accept = filter.accept;
        let panic_filter =
            move |m: &Member| is_panic_candidate(m) && accept.is_none_or(|accept| accept(m));
        let candidates;
        let filter = if candidates_only {
            candidates = filter.with_accept(&panic_filter);
            &candidates
        } else {
            filter
        };
        let mut switched = None;
        for attempt in 0..ADMISSION_ATTEMPTS {
            let mut cx = PickContext {
                members: &snap.members,
                generation: snap.generation,
                key,
                rng: &mut rng,
                now: &now,
                latest: self.recorder.latest(),
                panic,
                slow_start: snap.config.slow_start,
                max_probes: snap.config.breaker.half_open_max_probes,
                stats: &self.recorder.stats,
                switched: &mut switched,
                filter,
                table: &snap.table,
                ahead: &local.ahead,
                line_of_pick: None,
                // Only the first attempt's draws were the common case's.
                first_refused: first_refused && attempt == 0,
            };
            let picked = snap.strategy.pick(&mut cx);
            let line_of_pick = cx.line_of_pick;
            local.put_rng(&rng);
            if let Some(Switch { from, to, reason }) = switched.take() {
                events.push(Event::StrategySwitch {
                    service: self.recorder.name.clone(),
                    from,
                    to,
                    reason,
                });
            }
            let Some(picked) = picked else {
                break;
            };
            let (hot, line): (&Hot, u32) = match &picked {
                Picked::At(i) => {
                    let line = match line_of_pick {
                        Some((at, line)) if at == *i => line,
                        _ => snap.members.line_number(*i)?,
                    };
                    (snap.members.hot_line(line)?, line)
                }
                Picked::Member(m) => (m.live().hot(), 0),
            };
            let member = || match &picked {
                Picked::At(i) => snap.members.get(*i).map(|m| &**m),
                Picked::Member(m) => Some(&**m),
            };
            // Only `adaptive` changes the strategy it uses between picks.
            let kind = match snap.kind {
                StrategyKind::Adaptive => snap.strategy.effective_kind(),
                kind => kind,
            };
            // Panic mode ignores breakers, so it takes no probe slot.
            let probe = if panic {
                false
            } else {
                match self.admit(member, hot, &now, &snap.config, &mut events) {
                    Admission::Admitted => false,
                    Admission::Probe(_) => true,
                    Admission::Rejected => continue,
                }
            };
            let target = match picked {
                Picked::At(index) => Target::At { index, line },
                Picked::Member(m) => Target::Held(m),
            };
            let used_at = match now.if_read() {
                Some(t) => {
                    self.recorder.saw(t);
                    t
                }
                None => Timestamp::from_nanos(self.recorder.latest().load(Ordering::Relaxed)),
            };
            return Some(Selection::new(view, target, used_at, probe, kind, events));
        }
        // No pick: the lease goes back unused.
        pick_view::release(view);
        None
    }

    /// Asks the breaker of the member `member()` (its hot line `hot`) to
    /// admit a request. The member is read only when the breaker is not
    /// closed.
    fn admit<'m>(
        &self,
        member: impl FnOnce() -> Option<&'m Member>,
        hot: &Hot,
        now: &LazyNow<'_>,
        cfg: &LoadBalancerConfig,
        events: &mut Vec<Event>,
    ) -> Admission {
        if hot.circuit_state() == CircuitState::Closed {
            return Admission::Admitted; // the common case: no lock, no clock
        }
        let Some(member) = member() else {
            return Admission::Rejected;
        };
        let live = member.live();
        let mut trackers = live.trackers.lock();
        let admission = trackers.breaker.try_admit(now.get(), &cfg.breaker);
        if let Admission::Probe(Some(t)) = admission {
            events.push(self.recorder.breaker_event(member, t));
        }
        live.publish(&trackers);
        self.recorder.recount(member, &mut trackers, events);
        admission
    }

    /// Records an outcome not tied to a selection; see
    /// [`Registry::report_outcome`](crate::Registry::report_outcome).
    pub(crate) fn report_outcome(&self, member: &Member, outcome: Outcome) -> Vec<Event> {
        self.recorder.record(member, outcome, Source::Probe)
    }

    /// Replaces the configuration; a changed strategy starts fresh, an
    /// unchanged one keeps its state and takes the new tunables.
    pub(crate) fn set_config(&self, config: LoadBalancerConfig) {
        let mut w = self.writer.lock();
        let config = Arc::new(config);
        self.recorder.config.store(config.clone());
        let old = self.snapshot.load();
        let strategy = if old.strategy.kind() == config.strategy {
            old.strategy.reconfigure(&config);
            old.strategy.clone()
        } else {
            config.strategy.build_with(&config)
        };
        w.generation += 1;
        let snap = Snapshot {
            members: old.members.clone(),
            generation: w.generation,
            kind: strategy.kind(),
            strategy: strategy.clone(),
            config,
            table: Default::default(),
        };
        let members = snap.members.clone();
        self.publish(Arc::new(snap));
        strategy.prepare(&members, w.generation, self.now());
    }

    /// Stores `snap` as the current snapshot, then its generation as the
    /// published one (in that order: a pick that reads the generation
    /// loads a snapshot at least that new). Call under the writer lock.
    fn publish(&self, snap: Arc<Snapshot>) {
        let generation = snap.generation;
        self.snapshot.store(snap);
        self.published.store(generation, Ordering::Release);
    }

    /// Runs `f` on a copy of the member list under the writer lock, then
    /// publishes the result as the next snapshot. `f` is told whether new
    /// instances should slow-start.
    fn write<R>(&self, f: impl FnOnce(&mut Writer, &mut Members, Timestamp, bool) -> R) -> R {
        let mut w = self.writer.lock();
        let old = self.snapshot.load_full();
        let mut members = old.members.clone();
        let now = self.now();
        let slow = !old.config.slow_start.is_zero() && !members.is_empty();
        let out = f(&mut w, &mut members, now, slow);
        w.generation += 1;
        let generation = w.generation;
        // The list moves into the snapshot, not a copy: a copy would be a
        // reference-count increment (and later a decrement) per chunk, 391
        // each way at 100,000 members.
        let snap = Arc::new(Snapshot {
            members,
            generation,
            kind: old.kind,
            strategy: old.strategy.clone(),
            config: old.config.clone(),
            table: Default::default(),
        });
        self.publish(snap.clone());
        drop(w);
        drop(old);
        snap.strategy.prepare(&snap.members, generation, now);
        out
    }

    /// Registers or updates one instance.
    pub(crate) fn register(&self, instance: ServiceInstance) -> Registered {
        self.write(|w, members, now, slow| {
            w.upsert(members, instance, now, slow, &self.recorder.stats)
        })
    }

    /// Registers many instances with one snapshot rebuild; instances that
    /// join an empty service start at full weight.
    pub(crate) fn register_many(&self, instances: impl IntoIterator<Item = ServiceInstance>) {
        self.write(|w, members, now, slow| {
            for inst in instances {
                w.upsert(members, inst, now, slow, &self.recorder.stats);
            }
        });
    }

    /// Removes `id` at once; its description if it was there.
    pub(crate) fn deregister(&self, id: &str) -> Option<ServiceInstance> {
        self.write(|w, members, _, _| w.remove(members, id, &self.recorder.stats))
    }

    /// Removes every id of `ids` that is registered, with one snapshot
    /// rebuild; their descriptions.
    pub(crate) fn deregister_many<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Vec<ServiceInstance> {
        self.write(|w, members, _, _| {
            ids.into_iter()
                .filter_map(|id| w.remove(members, id, &self.recorder.stats))
                .collect()
        })
    }

    /// Starts draining `member`; `None` if `id` is not registered.
    pub(crate) fn drain(&self, id: &str, timeout: Duration) -> Option<Vec<Event>> {
        let now = self.now();
        let mut w = self.writer.lock();
        let snap = self.snapshot.load();
        let member = snap.members.get(w.index.get(&snap.members, id)?)?.clone();
        drop(snap);
        let live = member.live();
        let mut events = Vec::new();
        {
            let mut trackers = live.trackers.lock();
            live.set_draining(true);
            self.recorder.recount(&member, &mut trackers, &mut events);
        }
        w.draining.insert(
            member.instance().id().clone(),
            OptionalTimestamp::some(now + timeout),
        );
        drop(w);
        self.recorder
            .check_panic(&self.recorder.config.load(), &mut events);
        Some(events)
    }

    /// Sets `member`'s health score; raising it from 0 starts slow start.
    pub(crate) fn set_health(&self, member: &Member, score: HealthScore) -> Vec<Event> {
        let now = self.now();
        let mut events = Vec::new();
        {
            let live = member.live();
            let mut trackers = live.trackers.lock();
            let was_ejected = trackers.health.score() == HealthScore::EJECTED;
            trackers.health.set(score);
            if was_ejected && score != HealthScore::EJECTED {
                live.start_slow_start(now);
            }
            live.publish(&trackers);
            self.recorder.recount(member, &mut trackers, &mut events);
        }
        self.recorder
            .check_panic(&self.recorder.config.load(), &mut events);
        events
    }

    /// Upkeep at `now`: rebuilds stale strategy tables and removes drained
    /// instances, appending a `Removed` event for each.
    pub(crate) fn maintain(&self, now: Timestamp, events: &mut Vec<Event>) {
        self.recorder.saw(now);
        let snap = self.snapshot.load_full();
        snap.strategy.maintain(&snap.members, snap.generation, now);
        if self.writer.lock().draining.is_empty() {
            return;
        }
        self.write(|w, members, _, _| {
            let ids: Vec<(InstanceId, OptionalTimestamp)> =
                w.draining.iter().map(|(id, &d)| (id.clone(), d)).collect();
            for (id, deadline) in ids {
                let Some(m) = w
                    .index
                    .get(members, id.as_str())
                    .and_then(|i| members.get(i))
                else {
                    w.draining.remove(&id);
                    continue;
                };
                let reason = if m.active_connections() == 0 {
                    "drained"
                } else if deadline.get().is_some_and(|d| now >= d) {
                    "drain timeout"
                } else {
                    continue;
                };
                if let Some(inst) = w.remove(members, id.as_str(), &self.recorder.stats) {
                    events.push(Event::Removed {
                        service: self.recorder.name.clone(),
                        instance: inst.id().clone(),
                        reason,
                    });
                }
            }
        });
    }

    /// Marks every member removed (the service is going away).
    pub(crate) fn mark_all_removed(&self) {
        let snap = self.snapshot.load();
        for m in snap.members.iter() {
            m.live().hot().removed.store(true, Ordering::Release);
        }
    }

    /// A report of this service.
    pub fn status(&self) -> ServiceStatus {
        let snap = self.snapshot.load();
        let (total, eligible) = self.recorder.stats.counted();
        ServiceStatus {
            name: self.recorder.name.to_string(),
            strategy: snap.strategy.kind(),
            adaptive: snap.strategy.adaptive_status(),
            instances: snap.members.len(),
            eligible,
            draining: snap.members.len() - total,
            panic: self.in_panic(),
            in_flight: self.recorder.stats.in_flight(),
        }
    }

    /// A report of `member` now.
    pub(crate) fn member_status(&self, member: &Member) -> InstanceStatus {
        let cfg = self.recorder.config.load();
        member.status(self.now(), cfg.slow_start, cfg.breaker.half_open_max_probes)
    }

    /// A report of every instance, in member order.
    pub fn instances(&self) -> Vec<InstanceStatus> {
        let snap = self.snapshot.load();
        let now = self.now();
        let cfg = &snap.config;
        snap.members
            .iter()
            .map(|m| m.status(now, cfg.slow_start, cfg.breaker.half_open_max_probes))
            .collect()
    }
}

// === impl Writer ===

impl Writer {
    /// Adds or updates; `slow` is set when a new instance should ramp.
    fn upsert(
        &mut self,
        members: &mut Members,
        instance: ServiceInstance,
        now: Timestamp,
        slow: bool,
        stats: &ServiceStats,
    ) -> Registered {
        if let Some(idx) = self.index.get(members, instance.id().as_str()) {
            if let Some(old) = members.get(idx) {
                old.live().set_weight(instance.weight());
                let m = Member::new(instance, old.live().clone());
                members.set(idx, Arc::new(m));
                return Registered::Updated;
            }
        }
        let id = instance.id().clone();
        let live = Arc::new(InstanceLive::new(&self.arena, now, slow, instance.weight()));
        stats.recount(&mut live.trackers.lock().counted, Availability::Available);
        let idx = members.push(Arc::new(Member::new(instance, live)));
        self.index.insert(members, id.as_str(), idx);
        Registered::Added
    }

    /// Removes `id`; returns its description if it was there.
    fn remove(
        &mut self,
        members: &mut Members,
        id: &str,
        stats: &ServiceStats,
    ) -> Option<ServiceInstance> {
        let idx = self.index.remove(members, id)?;
        self.draining.remove(id);
        let removed = members.swap_remove(idx)?;
        if let Some(moved) = members.get(idx) {
            // It was the last member: at the new length.
            self.index
                .moved(moved.instance().id().as_str(), members.len(), idx);
        }
        let live = removed.live();
        let mut trackers = live.trackers.lock();
        live.hot().removed.store(true, Ordering::Release);
        stats.recount(&mut trackers.counted, Availability::Absent);
        Some(removed.instance().clone())
    }
}

/// What a pick answers, built where the caller takes it: the selection
/// of the common case is written once, not moved from an `Option` into a
/// `Result` (a move that cost `select_within` ~5 ns a pick at n = 10).
trait PickAnswer {
    /// A selection.
    fn picked(s: Selection) -> Self;
    /// No selection, after `filter`'s questions.
    fn none(filter: &Filter<'_>) -> Self;
}

impl PickAnswer for Option<Selection> {
    #[inline]
    fn picked(s: Selection) -> Self {
        Some(s)
    }

    #[inline]
    fn none(_: &Filter<'_>) -> Self {
        None
    }
}

impl PickAnswer for Result<Selection, NoSelection> {
    #[inline]
    fn picked(s: Selection) -> Self {
        Ok(s)
    }

    #[inline]
    fn none(filter: &Filter<'_>) -> Self {
        Err(filter.no_selection())
    }
}

#[cfg(test)]
thread_local! {
    /// Set by tests: this thread's picks skip the common case.
    static GENERAL_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread's picks skip the common case (`strategy::drawn`):
/// only tests, to compare it with the general path.
#[inline]
fn general_only() -> bool {
    #[cfg(test)]
    return GENERAL_ONLY.with(std::cell::Cell::get);
    #[cfg(not(test))]
    false
}

/// Whether `m` is a panic candidate (module doc, "Panic candidates
/// first"): its breaker is not open, or its latest active check passed.
fn is_panic_candidate(m: &Member) -> bool {
    m.circuit_state() != CircuitState::Open || m.live().trackers.lock().breaker.check_passes() > 0
}

/// Whether the panic candidates among the non-draining `members` make up at
/// least `min_healthy_percent` of them.
fn enough_panic_candidates(members: &Members, cfg: &LoadBalancerConfig) -> bool {
    let (mut total, mut candidates) = (0usize, 0usize);
    for m in members.iter().filter(|m| m.admits_panic_traffic()) {
        total += 1;
        candidates += usize::from(is_panic_candidate(m));
    }
    candidates > 0 && candidates * 100 >= usize::from(cfg.min_healthy_percent) * total
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::{CountingClock, HealthScore, ManualClock, Registry};

    /// A registry on `clock` with `seed`, and the service `svc` of `kind`
    /// with the instances `i0`..`i{n-1}`, `i` of weight `weight(i)`.
    fn weighted_registry(
        kind: StrategyKind,
        clock: Arc<dyn Clock>,
        seed: u64,
        n: usize,
        weight: impl Fn(usize) -> u64,
    ) -> Registry {
        let registry = Registry::builder().clock(clock).seed(seed).build().unwrap();
        let config = LoadBalancerConfig {
            strategy: kind,
            ..LoadBalancerConfig::default()
        };
        registry.configure_service("svc", config).unwrap();
        let instances = (0..n).map(|i| {
            ServiceInstance::try_new(&format!("i{i}"), "10.0.0.1", 80)
                .unwrap()
                .with_weight(crate::Weight::try_new(weight(i)).unwrap())
        });
        registry
            .register_instances("svc", instances.collect::<Vec<_>>())
            .unwrap();
        registry
    }

    fn service(kind: StrategyKind) -> (Registry, Arc<Service>, Arc<CountingClock>) {
        let clock = Arc::new(CountingClock::default());
        let registry = weighted_registry(kind, clock.clone(), 3, 4, |_| 1);
        let svc = registry.service("svc").unwrap();
        (registry, svc, clock)
    }

    fn picks(svc: &Service, n: usize) {
        for i in 0u64..n as u64 {
            drop(svc.select(Some(&i.to_le_bytes())).unwrap());
        }
    }

    /// `random` and `p2c` take their first draws from batches drawn ahead
    /// (`draw_ahead`). The batches are the thread's stream in order, so a
    /// seeded thread whose first draws are all eligible (and, for `p2c`,
    /// idle: ties go to the first of the pair) picks exactly the positions
    /// of its stream: every draw used once, none skipped, none reordered.
    #[test]
    fn drawing_ahead_keeps_the_seeded_stream() {
        const N: usize = 5_000;
        for kind in [StrategyKind::Random, StrategyKind::P2c] {
            let make = || {
                let registry = Registry::builder().seed(11).build().unwrap();
                let config = LoadBalancerConfig {
                    strategy: kind,
                    ..LoadBalancerConfig::default()
                };
                registry.configure_service("svc", config).unwrap();
                let instances = (0..N)
                    .map(|i| ServiceInstance::try_new(&format!("i{i}"), "10.0.0.1", 80).unwrap());
                registry
                    .register_instances("svc", instances.collect::<Vec<_>>())
                    .unwrap();
                let svc = registry.service("svc").unwrap();
                (registry, svc)
            };
            let (_registry, svc) = make();
            let got: Vec<String> = std::thread::spawn(move || {
                (0..100)
                    .map(|_| svc.select(None).unwrap().instance().id().to_string())
                    .collect()
            })
            .join()
            .unwrap();
            // The stream of the first thread to pick from the same service:
            // the first pick draws its own (one position, or a pair whose
            // first wins), then two batches (the batch and the one after
            // it); each pick that used up a batch draws one more batch.
            // The slot stores its state `| 1` after each pick
            // (`PickLocal::put_rng`), which moves it only after a pick
            // that drew.
            let (_again, svc) = make();
            let mut rng = fastrand::Rng::with_seed(svc.recorder.next_seed() | 1);
            let per_pick = if kind == StrategyKind::Random { 1 } else { 2 };
            let ahead = crate::draw_ahead::AHEAD;
            let mut queue: std::collections::VecDeque<usize> =
                (0..per_pick).map(|_| rng.usize(..N)).collect();
            let mut left = 0;
            let mut want = Vec::new();
            while want.len() < 100 {
                let pick: Vec<usize> = queue.drain(..per_pick).collect();
                assert!(
                    per_pick == 1 || pick[0] != pick[1],
                    "a pair of one member: change the seed"
                );
                want.push(format!("i{}", pick[0]));
                let draws = if want.len() == 1 {
                    2 * ahead
                } else {
                    left -= per_pick;
                    if left > 0 {
                        continue;
                    }
                    ahead
                };
                queue.extend((0..draws).map(|_| rng.usize(..N)));
                left = ahead;
                rng = fastrand::Rng::with_seed(rng.get_seed() | 1);
            }
            assert_eq!(got, want, "{kind}");
        }
    }

    /// Picks take the common case of `strategy::drawn` where it applies; a
    /// thread with `GENERAL_ONLY` set always takes the general path. Two
    /// services built alike from one seed, picked from alike (selections
    /// held to vary the loads, the clock moved to end windows and make
    /// probes due), must pick alike, with no filter, with one that
    /// refuses a tenth of the instances, with a limit of one selection
    /// held (`select_within`), and with both: among weights 1–5,
    /// latencies 1–50 ms, and draining, ejected, half-healthy, open,
    /// ramping instances. Fails if the common case decides one pick
    /// otherwise, takes a draw the general path would not, asks the filter
    /// about other members than the general path does, or either picks an
    /// instance at the limit.
    #[test]
    fn the_common_case_picks_as_the_general_path() {
        const N: usize = 40;
        for kind in [
            StrategyKind::Random,
            StrategyKind::P2c,
            StrategyKind::PeakEwma,
        ] {
            // (filter, limit) of each run.
            let run = |common: bool, (filtered, limit): (bool, u32)| -> Vec<String> {
                let clock = Arc::new(ManualClock::default());
                let registry = weighted_registry(kind, clock.clone(), 5, N, |i| 1 + (i % 5) as u64);
                for i in 0..N {
                    let ms = if i % 7 == 0 { 50 } else { 1 + i as u64 % 4 };
                    let ok = Outcome::Success(Duration::from_millis(ms));
                    drop(registry.report_outcome("svc", &format!("i{i}"), ok));
                }
                registry
                    .drain_instance("svc", "i1", Duration::from_secs(3600))
                    .unwrap();
                let ejected = HealthScore::EJECTED.get();
                registry
                    .update_instance_health("svc", "i2", ejected)
                    .unwrap();
                registry.update_instance_health("svc", "i3", 0.5).unwrap();
                registry
                    .update_instance_health("svc", "i5", ejected)
                    .unwrap();
                registry.update_instance_health("svc", "i5", 1.0).unwrap(); // ramps
                for id in ["i4", "i6"] {
                    for _ in 0..20 {
                        let failed = Outcome::Failure(crate::FailureKind::Connect);
                        drop(registry.report_outcome("svc", id, failed));
                    }
                }
                let svc = registry.service("svc").unwrap();
                std::thread::spawn(move || {
                    GENERAL_ONLY.with(|g| g.set(!common));
                    let mut held = std::collections::VecDeque::new();
                    let mut got = Vec::new();
                    let asked = std::cell::RefCell::new(Vec::new());
                    let filter = |m: &Member| {
                        let id = m.instance().id().as_str();
                        asked.borrow_mut().push(id.to_owned());
                        !id.ends_with('3')
                    };
                    let mut over_limit = 0;
                    for p in 0..4000 {
                        let sel = match (filtered, limit) {
                            (false, u32::MAX) => svc.select(None),
                            (true, u32::MAX) => svc.select_with(None, filter),
                            (filtered, limit) => {
                                let accept =
                                    filtered.then_some(&filter as &dyn Fn(&Member) -> bool);
                                svc.select_within(None, limit, accept).ok()
                            }
                        };
                        let sel = sel.unwrap();
                        let id = sel.instance().id().to_string();
                        // Counted on the winner: at most the limit now.
                        let active = svc.member(&id).unwrap().active_connections();
                        assert!(active <= limit, "{kind}: {id} over the limit");
                        over_limit += usize::from(active == limit);
                        got.push(id);
                        held.push_back(sel);
                        while held.len() > 3 + p % 11 {
                            drop(held.pop_front());
                        }
                        if p % 400 == 0 {
                            clock.advance(Duration::from_millis(900));
                        }
                    }
                    if limit != u32::MAX {
                        assert!(
                            over_limit > 100,
                            "{kind}: the limit binds {over_limit} times"
                        );
                    }
                    // The filter's questions, in order, after the picks.
                    got.extend(asked.take());
                    got
                })
                .join()
                .unwrap()
            };
            for filtered in [(false, u32::MAX), (true, u32::MAX), (false, 1), (true, 1)] {
                let (common, general) = (run(true, filtered), run(false, filtered));
                let distinct: std::collections::HashSet<_> = common.iter().collect();
                assert!(distinct.len() > N / 2, "{kind}: {} picked", distinct.len());
                let differ = common.iter().zip(&general).position(|(c, g)| c != g);
                assert_eq!(
                    differ, None,
                    "{kind}, (filter, limit) {filtered:?}: first difference"
                );
                let case = format!("{kind}, (filter, limit) {filtered:?}");
                assert_eq!(common.len(), general.len(), "{case}");
            }
        }
    }

    /// `select_within`'s limit is the filter the proxy gave `select_with`
    /// before (`active < limit`, asked after the caller's filter, noting a
    /// refusal for the limit): two services built alike from one seed,
    /// one picked from each way, pick alike and fail alike (`OverLimit`
    /// only when a candidate the caller's filter accepted was at the
    /// limit), for every strategy, keyed, with loads that often fill every
    /// instance to the limit. Fails if the limit changed a fallback path,
    /// a draw or the order of the filter's questions.
    #[test]
    fn a_limit_picks_as_the_same_limit_in_a_filter() {
        const N: usize = 12;
        const LIMIT: u32 = 2;
        for kind in StrategyKind::ALL {
            let run = |within: bool, filtered: bool| -> Vec<String> {
                let clock = Arc::new(ManualClock::default());
                let registry = weighted_registry(kind, clock, 9, N, |i| 1 + (i % 3) as u64);
                registry.update_instance_health("svc", "i2", 0.5).unwrap();
                let svc = registry.service("svc").unwrap();
                std::thread::spawn(move || {
                    let asked = std::cell::RefCell::new(Vec::new());
                    let tried = |m: &Member| {
                        let id = m.instance().id().as_str();
                        asked.borrow_mut().push(id.to_owned());
                        !id.ends_with('3')
                    };
                    let mut held = std::collections::VecDeque::new();
                    let mut got = Vec::new();
                    for p in 0u64..3000 {
                        let key = p.to_le_bytes();
                        let key = Some(&key[..]);
                        let picked = if within {
                            let accept = filtered.then_some(&tried as &dyn Fn(&Member) -> bool);
                            svc.select_within(key, LIMIT, accept)
                        } else {
                            let over = std::cell::Cell::new(false);
                            let old = |m: &Member| {
                                if filtered && !tried(m) {
                                    return false;
                                }
                                if m.active_connections() >= LIMIT {
                                    over.set(true);
                                    return false;
                                }
                                true
                            };
                            match svc.select_with(key, old) {
                                Some(s) => Ok(s),
                                None if over.get() => Err(NoSelection::OverLimit),
                                None => Err(NoSelection::NoneAcceptable),
                            }
                        };
                        match picked {
                            Ok(sel) => {
                                got.push(sel.instance().id().to_string());
                                held.push_back(sel);
                            }
                            Err(e) => got.push(format!("{e:?}")),
                        }
                        while held.len() > (p % 31) as usize {
                            drop(held.pop_front());
                        }
                    }
                    got.extend(asked.take());
                    got
                })
                .join()
                .unwrap()
            };
            for filtered in [false, true] {
                let (within, with) = (run(true, filtered), run(false, filtered));
                let full = within.iter().filter(|g| *g == "OverLimit").count();
                assert!(full > 50, "{kind}: every instance full {full} times");
                let differ = within.iter().zip(&with).position(|(a, b)| a != b);
                assert_eq!(
                    differ, None,
                    "{kind}, filtered {filtered}: first difference"
                );
                assert_eq!(within.len(), with.len(), "{kind}, filtered {filtered}");
            }
        }
    }

    #[test]
    fn picks_on_closed_breakers_with_no_ramp_read_no_clock() {
        for kind in StrategyKind::ALL {
            let (_registry, svc, clock) = service(kind);
            picks(&svc, 1); // builds what a first pick builds
            let before = clock.reads();
            picks(&svc, 100);
            assert_eq!(clock.reads(), before, "{kind}: no rule needed the time");
        }
    }

    #[test]
    fn a_snapshot_keeps_only_the_consistent_hash_table_built_for_it() {
        let (registry, svc, _clock) = service(StrategyKind::ConsistentHash);
        // Above the eager limit: tables are built by `maintain`.
        let more = (4..2000).map(|i| ServiceInstance::try_new(&format!("i{i}"), "10.0.0.1", 80));
        registry
            .register_instances("svc", more.map(Result::unwrap).collect::<Vec<_>>())
            .unwrap();
        let key = b"user-1";
        let cached = |svc: &Service| svc.snapshot.load().table.get().is_some();
        drop(svc.select(Some(key)).unwrap());
        assert!(!cached(&svc), "the table is older than the snapshot");
        registry.maintain();
        let owner = svc.select(Some(key)).unwrap().instance().id().clone();
        assert!(cached(&svc), "a pick kept the fresh table");
        for _ in 0..10 {
            let again = svc.select(Some(key)).unwrap();
            assert_eq!(again.instance().id(), &owner, "through the kept table");
        }
        // A change: the next snapshot starts without a table, and the old
        // (stale) one is not kept in it, whose owner indices are not the
        // new snapshot's positions.
        registry.deregister_instance("svc", owner.as_str()).unwrap();
        let moved = svc.select(Some(key)).unwrap().instance().id().clone();
        assert_ne!(moved, owner);
        assert!(!cached(&svc));
        registry.maintain();
        let rebuilt = svc.select(Some(key)).unwrap().instance().id().clone();
        assert!(cached(&svc));
        assert_ne!(rebuilt, owner);
    }

    #[test]
    fn a_weight_change_reaches_the_copy_picks_read() {
        // least_connections breaks ties among idle instances by configured
        // weight, read from the live state's copy: the copy must follow
        // `update_instance_weight`.
        let (registry, svc, _clock) = service(StrategyKind::LeastConnections);
        let share_of_i0 = |svc: &Service| {
            let picks = 4000;
            let i0 = (0..picks)
                .filter(|_| svc.select(None).unwrap().instance().id().as_str() == "i0")
                .count();
            i0 as f64 / f64::from(picks)
        };
        let before = share_of_i0(&svc);
        assert!((before - 0.25).abs() < 0.04, "4 equal instances: {before}");
        registry.update_instance_weight("svc", "i0", 7).unwrap();
        // 7 / (7 + 1 + 1 + 1) = 0.7; seeded RNG, ±0.04 is > 5 sigma.
        let after = share_of_i0(&svc);
        assert!((after - 0.7).abs() < 0.04, "i0 at weight 7 of 10: {after}");
    }

    #[test]
    fn a_ramp_costs_clock_reads_until_it_ends_then_none() {
        let (registry, svc, clock) = service(StrategyKind::P2c);
        // 0 then back: slow start (10 s) begins for i0.
        registry
            .update_instance_health("svc", "i0", HealthScore::EJECTED.get())
            .unwrap();
        registry.update_instance_health("svc", "i0", 1.0).unwrap();
        let before = clock.reads();
        picks(&svc, 200);
        assert!(clock.reads() > before, "picks meeting i0 read the time");
        clock.advance(Duration::from_secs(11));
        picks(&svc, 200); // some pick meets i0 at the ramp's end and clears it
        let before = clock.reads();
        picks(&svc, 200);
        assert_eq!(clock.reads(), before, "the ended ramp is cleared");
        let i0 = registry.instance("svc", "i0").unwrap();
        assert_eq!(i0.slow_start_factor, 1.0);
        assert!(i0.active_connections == 0 && i0.last_used.is_some());
    }

    #[test]
    fn last_used_is_the_picks_time_or_the_services_latest_clock_reading() {
        let (registry, svc, clock) = service(StrategyKind::RoundRobin);
        let registered = clock.manual().now();
        clock.advance(Duration::from_secs(5));
        let last_used = |svc: &Service| {
            svc.instances()
                .iter()
                .filter_map(|s| s.last_used)
                .max()
                .unwrap()
        };
        // No rule needs the time: the latest reading (the registration;
        // `instances` itself reads the clock, so look before it).
        drop(svc.select(None).unwrap());
        assert_eq!(last_used(&svc), registered);
        // `maintain` reads the clock (the server calls it every 100 ms).
        registry.maintain();
        clock.advance(Duration::from_millis(300));
        drop(svc.select(None).unwrap());
        let maintained = registered + Duration::from_secs(5);
        assert_eq!(last_used(&svc), maintained);
        // A pick that reads the clock stamps its own time: an open breaker
        // whose window elapsed is probed, reading the clock.
        let (registry, svc, clock) = service(StrategyKind::ConsistentHash);
        let i0 = svc.member("i0").unwrap();
        for _ in 0..20 {
            drop(registry.report_outcome(
                "svc",
                "i0",
                Outcome::Failure(crate::FailureKind::Connect),
            ));
            if i0.circuit_state() == CircuitState::Open {
                break;
            }
        }
        assert_eq!(i0.circuit_state(), CircuitState::Open);
        clock.advance(Duration::from_secs(600));
        let t = clock.manual().now();
        let probe = svc
            .select_with(None, |m| m.instance().id().as_str() == "i0")
            .expect("the elapsed window admits a probe");
        assert!(probe.is_probe());
        assert_eq!(
            i0.live().hot().last_used.load(Ordering::Relaxed),
            t.as_nanos()
        );
    }
}
