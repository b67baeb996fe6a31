//! Reading a large service without a report per instance: state counts,
//! the worst instances and pages of the admin API, each in one pass over
//! the service's members that reads their atomics and keeps at most `k`
//! of them.
//!
//! ## The rule
//!
//! - **One state per instance** ([`State::of`]), first match wins:
//!   `draining`; `ejected` (breaker open, or health score 0); `half_open`;
//!   `slow_start` (ramp factor below 1); `healthy`. `/metrics`, the admin
//!   API and the status page count with it, so their totals agree.
//! - **Order**: health score ascending (worst first), then id. The score is
//!   read once per instance per pass, so one pass sorts consistently.
//! - **Pages** ([`page`]): the `limit` smallest keys after the cursor, kept
//!   in a bounded heap: O(N log limit) time and O(limit) memory whatever N,
//!   and what a request allocated is freed when it is answered. The cursor
//!   is the last key returned, not an offset, so instances registered or
//!   removed between two pages do not shift the others: a walk with no
//!   score changes sees every instance exactly once; an instance whose score
//!   changes between pages moves with it (it may then be seen twice or not
//!   at all), as any order by a live value does.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use datapunk_lb_core::{
    CircuitState, InstanceStatus, Member, Members, Registry, Service, Timestamp,
};

/// An instance's state, as every listing and count sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Selectable at full weight.
    Healthy,
    /// Selectable, weight still ramping up.
    SlowStart,
    /// Breaker half-open: probes only.
    HalfOpen,
    /// Breaker open or health score 0: not selected.
    Ejected,
    /// Being removed: no new requests.
    Draining,
}

impl State {
    /// Every state, in [`State::index`] order.
    pub const ALL: [State; 5] = [
        State::Healthy,
        State::SlowStart,
        State::HalfOpen,
        State::Ejected,
        State::Draining,
    ];

    /// The name in JSON and query strings.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::SlowStart => "slow_start",
            State::HalfOpen => "half_open",
            State::Ejected => "ejected",
            State::Draining => "draining",
        }
    }

    /// Position in [`State::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The state of `m` at `now`.
    pub fn of(m: &Member, now: Timestamp, slow_start: Duration) -> State {
        State::classify(m.is_draining(), m.circuit_state(), m.health_score(), || {
            m.slow_start_factor(now, slow_start)
        })
    }

    /// The state of the instance `st` reports.
    pub fn of_status(st: &InstanceStatus) -> State {
        State::classify(st.draining, st.circuit_state, st.health_score, || {
            st.slow_start_factor
        })
    }

    /// The rule (see the module doc); the ramp factor is read last, only
    /// when it decides.
    fn classify(
        draining: bool,
        circuit: CircuitState,
        health: f64,
        slow_start_factor: impl FnOnce() -> f64,
    ) -> State {
        if draining {
            State::Draining
        } else if circuit == CircuitState::Open || health <= 0.0 {
            State::Ejected
        } else if circuit == CircuitState::HalfOpen {
            State::HalfOpen
        } else if slow_start_factor() < 1.0 {
            State::SlowStart
        } else {
            State::Healthy
        }
    }
}

/// One service as of one instant: its members and what reading them needs.
#[derive(Debug)]
pub struct View {
    service: Arc<Service>,
    members: Members,
    now: Timestamp,
    slow_start: Duration,
    max_probes: u32,
}

impl View {
    /// The service `name` now, if it exists.
    pub fn of(registry: &Registry, name: &str) -> Option<View> {
        let service = registry.service(name)?;
        let cfg = service.config();
        Some(View {
            members: service.members(),
            now: registry.clock().now(),
            slow_start: cfg.slow_start,
            max_probes: cfg.breaker.half_open_max_probes,
            service,
        })
    }

    /// The service.
    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// Every member, in member order.
    pub fn members(&self) -> impl Iterator<Item = &Arc<Member>> {
        self.members.iter()
    }

    /// Instances registered.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether no instance is registered.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The state of `m`.
    pub fn state(&self, m: &Member) -> State {
        State::of(m, self.now, self.slow_start)
    }

    /// The full report of `m` (what the admin API shows).
    pub fn status(&self, m: &Member) -> InstanceStatus {
        m.status(self.now, self.slow_start, self.max_probes)
    }

    /// Instances by state, indexed by [`State::index`].
    pub fn counts(&self) -> [usize; 5] {
        let mut counts = [0; 5];
        for m in self.members() {
            counts[self.state(m).index()] += 1;
        }
        counts
    }
}

/// Where a page starts: after this key. Opaque to clients: the score's
/// bits in hex, `.`, the id.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    health: f64,
    id: String,
}

impl Cursor {
    fn of(e: &Ranked) -> Cursor {
        Cursor {
            health: e.health,
            id: e.member.instance().id().as_str().to_owned(),
        }
    }

    /// The text form handed to clients.
    pub fn encode(&self) -> String {
        format!("{:016x}.{}", self.health.to_bits(), self.id)
    }

    /// Parses [`Cursor::encode`]'s form; `None` if it is not one.
    pub fn parse(s: &str) -> Option<Cursor> {
        let (bits, id) = s.split_once('.')?;
        if bits.len() != 16 || id.is_empty() {
            return None;
        }
        let health = f64::from_bits(u64::from_str_radix(bits, 16).ok()?);
        health.is_finite().then(|| Cursor {
            health,
            id: id.to_owned(),
        })
    }

    fn cmp_key(&self, health: f64, id: &str) -> Ordering {
        health
            .total_cmp(&self.health)
            .then_with(|| id.cmp(self.id.as_str()))
    }
}

/// A member with the score it was ranked by (read once).
#[derive(Debug, Clone)]
pub struct Ranked {
    /// The score when read.
    pub health: f64,
    /// The member.
    pub member: Arc<Member>,
}

impl Ranked {
    fn new(member: &Arc<Member>) -> Ranked {
        Ranked {
            health: member.health_score(),
            member: member.clone(),
        }
    }

    fn id(&self) -> &str {
        self.member.instance().id().as_str()
    }
}

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        self.health
            .total_cmp(&other.health)
            .then_with(|| self.id().cmp(other.id()))
    }
}

/// The `k` smallest [`Ranked`] offered, in a max-heap of at most `k`.
#[derive(Debug)]
pub struct Worst {
    k: usize,
    heap: BinaryHeap<Ranked>,
}

impl Worst {
    /// Keeps the `k` worst.
    pub fn new(k: usize) -> Worst {
        Worst {
            k,
            heap: BinaryHeap::with_capacity(k.min(4096) + 1),
        }
    }

    /// Offers `m` with its score read now.
    pub fn offer(&mut self, m: &Arc<Member>) {
        if self.k == 0 {
            return;
        }
        let r = Ranked::new(m);
        if self.heap.len() < self.k {
            self.heap.push(r);
        } else if self.heap.peek().is_some_and(|top| r < *top) {
            self.heap.pop();
            self.heap.push(r);
        }
    }

    /// The kept members, worst first.
    pub fn into_sorted(self) -> Vec<Ranked> {
        self.heap.into_sorted_vec()
    }
}

/// What a listing keeps: all conditions must hold.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Only instances in this state.
    pub state: Option<State>,
    /// Only ids starting with this.
    pub id_prefix: Option<String>,
    /// Only keys after this one.
    pub after: Option<Cursor>,
}

/// One page of a listing.
#[derive(Debug)]
pub struct Page {
    /// At most `limit` instances, worst first.
    pub items: Vec<Ranked>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
    /// Instances that matched the filter (this page and the ones after).
    pub matched: usize,
}

/// The first `limit` instances of `view` that pass `filter`, in order.
pub fn page(view: &View, filter: &Filter, limit: usize) -> Page {
    let mut worst = Worst::new(limit);
    let mut matched = 0;
    for m in view.members() {
        let id = m.instance().id().as_str();
        if let Some(p) = &filter.id_prefix {
            if !id.starts_with(p.as_str()) {
                continue;
            }
        }
        if let Some(st) = filter.state {
            if view.state(m) != st {
                continue;
            }
        }
        if let Some(c) = &filter.after {
            // The score is read here and again by `offer`; a change in
            // between only moves the instance, as a change between pages does.
            if c.cmp_key(m.health_score(), id) != Ordering::Greater {
                continue;
            }
        }
        matched += 1;
        worst.offer(m);
    }
    let items = worst.into_sorted();
    let next = (matched > items.len())
        .then(|| items.last().map(Cursor::of))
        .flatten();
    Page {
        items,
        next,
        matched,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datapunk_lb_core::{LoadBalancerConfig, ManualClock, ServiceInstance};
    use std::collections::HashSet;

    /// A registry whose service `api` has `n` instances `i00000`…, with
    /// health scores set by `score(i)`, and slow start off.
    fn registry(n: usize, score: impl Fn(usize) -> f64) -> Registry {
        let config = LoadBalancerConfig {
            slow_start: Duration::ZERO,
            ..LoadBalancerConfig::default()
        };
        let reg = Registry::builder()
            .config(config)
            .clock(Arc::new(ManualClock::new()))
            .build()
            .unwrap();
        let list = (0..n).map(|i| {
            ServiceInstance::try_new(&format!("i{i:05}"), "127.0.0.1", 1 + (i % 60000) as u16)
                .unwrap()
        });
        reg.register_instances("api", list).unwrap();
        for i in 0..n {
            reg.update_instance_health("api", &format!("i{i:05}"), score(i))
                .unwrap();
        }
        reg
    }

    fn ids(p: &Page) -> Vec<String> {
        p.items.iter().map(|r| r.id().to_owned()).collect()
    }

    #[test]
    fn a_cursor_walk_sees_every_instance_once_worst_first() {
        // Many equal scores, so the id must break ties for the walk to work.
        let n = 1000;
        let reg = registry(n, |i| ((i * 7) % 11) as f64 / 10.0 % 1.0 + 0.05);
        let view = View::of(&reg, "api").unwrap();
        let mut seen = Vec::new();
        let mut filter = Filter::default();
        let mut pages = 0;
        loop {
            let p = page(&view, &filter, 64);
            pages += 1;
            assert!(p.items.len() <= 64);
            seen.extend(p.items.iter().map(|r| (r.health, r.id().to_owned())));
            match p.next {
                Some(c) => {
                    // The cursor survives its text form.
                    filter.after = Some(Cursor::parse(&c.encode()).unwrap());
                }
                None => break,
            }
        }
        assert_eq!(pages, n.div_ceil(64));
        assert_eq!(seen.len(), n);
        let unique: HashSet<_> = seen.iter().map(|(_, id)| id.clone()).collect();
        assert_eq!(unique.len(), n, "an instance was listed twice");
        assert!(
            seen.windows(2)
                .all(|w| w[0].0 < w[1].0 || (w[0].0 == w[1].0 && w[0].1 < w[1].1)),
            "not sorted by score then id"
        );
    }

    #[test]
    fn a_removal_between_pages_does_not_shift_the_rest() {
        let reg = registry(10, |i| 0.1 + i as f64 / 20.0);
        let view = View::of(&reg, "api").unwrap();
        let first = page(&view, &Filter::default(), 4);
        assert_eq!(ids(&first), ["i00000", "i00001", "i00002", "i00003"]);
        // Two already listed instances go away; an offset would skip two.
        reg.deregister_instance("api", "i00000").unwrap();
        reg.deregister_instance("api", "i00001").unwrap();
        let view = View::of(&reg, "api").unwrap();
        let filter = Filter {
            after: first.next,
            ..Filter::default()
        };
        let second = page(&view, &filter, 4);
        assert_eq!(ids(&second), ["i00004", "i00005", "i00006", "i00007"]);
        assert_eq!(second.matched, 6);
    }

    #[test]
    fn state_and_prefix_filters_and_counts_agree() {
        // Every third instance ejected (score 0).
        let reg = registry(30, |i| if i % 3 == 0 { 0.0 } else { 0.9 });
        reg.drain_instance("api", "i00001", Duration::from_secs(60))
            .unwrap();
        let view = View::of(&reg, "api").unwrap();
        let counts = view.counts();
        assert_eq!(counts[State::Ejected.index()], 10);
        assert_eq!(counts[State::Draining.index()], 1);
        assert_eq!(counts[State::Healthy.index()], 19);
        let ejected = page(
            &view,
            &Filter {
                state: Some(State::Ejected),
                ..Filter::default()
            },
            100,
        );
        assert_eq!(ejected.items.len(), 10);
        assert!(ejected.items.iter().all(|r| r.health == 0.0));
        assert!(ejected.next.is_none());
        let draining = page(
            &view,
            &Filter {
                state: Some(State::Draining),
                ..Filter::default()
            },
            100,
        );
        assert_eq!(ids(&draining), ["i00001"]);
        let search = page(
            &view,
            &Filter {
                id_prefix: Some("i0002".into()),
                ..Filter::default()
            },
            3,
        );
        // i00021 is ejected (21 % 3 == 0), so it comes first.
        assert_eq!(ids(&search), ["i00021", "i00024", "i00027"]);
        assert_eq!(search.matched, 10);
        assert!(search.next.is_some());
    }

    #[test]
    fn cursors_that_are_not_ours_do_not_parse() {
        for bad in [
            "",
            "abc",
            "zzzzzzzzzzzzzzzz.i1",
            "3ff0000000000000.",
            "7ff8000000000000.x",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad:?}");
        }
        let c = Cursor {
            health: 0.25,
            id: "a.b".into(),
        };
        assert_eq!(Cursor::parse(&c.encode()), Some(c));
    }
}
