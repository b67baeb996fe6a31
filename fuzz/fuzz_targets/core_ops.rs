//! `core_ops`: the core driven by a sequence of operations decoded from the
//! input, with the invariants checked after every step:
//!
//! - connection counts never exceed the selections held (an underflow would
//!   show as a huge `u32`), and are 0 once every selection has ended;
//! - effective weight is in `[0, weight]`;
//! - an instance whose breaker is not closed is selected only as a
//!   half-open probe, at most `half_open_max_probes` at once (or in panic
//!   mode, which ignores breakers by design);
//! - panic mode exactly when `eligible × 100 < min_healthy_percent × total`,
//!   eligible counted independently from the instances' reports;
//! - an active health check (`report_outcome`) never closes a breaker that
//!   was not closed: checks may end an open window, only requests close.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Arbitrary;
use datapunk_lb_core::{
    CircuitState, FailureKind, ManualClock, Outcome, Registry, Selection, ServiceInstance,
    StrategyKind,
};
use libfuzzer_sys::fuzz_target;

const SERVICES: [&str; 2] = ["a", "b"];
const IDS: [&str; 4] = ["i0", "i1", "i2", "i3"];

#[derive(Debug, Arbitrary)]
enum Op {
    Register { svc: u8, id: u8, weight: u16 },
    Deregister { svc: u8, id: u8 },
    Drain { svc: u8, id: u8, timeout_ms: u16 },
    Select { svc: u8 },
    SelectKey { svc: u8, key: u8 },
    Success { at: u8, latency_ms: u16 },
    Failure { at: u8, kind: u8 },
    Drop { at: u8 },
    Health { svc: u8, id: u8, score: u8 },
    Advance { ms: u32 },
    Strategy { svc: u8, kind: u8 },
    Maintain,
    /// An active health check's outcome (`Registry::report_outcome`).
    Check { svc: u8, id: u8, ok: bool },
}

/// A held selection and the generation of its instance when it was made.
struct Held {
    sel: Selection,
    generation: u64,
}

struct World {
    clock: Arc<ManualClock>,
    registry: Registry,
    held: Vec<Held>,
    /// Bumped whenever an instance disappears, so selections of an earlier
    /// life are not counted against a re-registered one.
    generation: HashMap<(usize, usize), u64>,
    present: HashMap<(usize, usize), bool>,
}

fn pick<T: Copy>(xs: &[T], i: u8) -> (usize, T) {
    let i = usize::from(i) % xs.len();
    (i, xs[i])
}

fn key_of(sel: &Selection) -> Option<(usize, usize)> {
    let s = SERVICES.iter().position(|s| *s == sel.service())?;
    let i = IDS
        .iter()
        .position(|i| *i == sel.instance().id().as_str())?;
    Some((s, i))
}

impl World {
    fn new(seed: u64) -> Option<World> {
        let clock = Arc::new(ManualClock::new());
        let registry = Registry::builder()
            .clock(clock.clone())
            .seed(seed)
            .build()
            .ok()?;
        Some(World {
            clock,
            registry,
            held: Vec::new(),
            generation: HashMap::new(),
            present: HashMap::new(),
        })
    }

    fn hold(&mut self, sel: Option<Selection>) {
        let Some(sel) = sel else { return };
        let Some(k) = key_of(&sel) else {
            panic!("selected an unknown instance {:?}", sel.instance().id());
        };
        let svc = SERVICES[k.0];
        // The breaker rule, at the moment of the pick.
        let panic = self.registry.service(svc).is_some_and(|s| s.in_panic());
        if let Ok(st) = self.registry.instance(svc, IDS[k.1]) {
            assert!(!st.draining, "a draining instance was selected");
            if !panic && st.circuit_state != CircuitState::Closed {
                assert!(
                    sel.is_probe(),
                    "breaker {:?} selected without a probe",
                    st.circuit_state
                );
            }
        }
        let generation = self.generation.get(&k).copied().unwrap_or(0);
        self.held.push(Held { sel, generation });
    }

    fn take(&mut self, at: u8) -> Option<Selection> {
        if self.held.is_empty() {
            return None;
        }
        let i = usize::from(at) % self.held.len();
        Some(self.held.swap_remove(i).sel)
    }

    fn apply(&mut self, op: Op) {
        let r = &self.registry;
        match op {
            Op::Register { svc, id, weight } => {
                let ((s, svc), (i, id)) = (pick(&SERVICES, svc), pick(&IDS, id));
                let w = u64::from(weight % 1001);
                let inst = ServiceInstance::try_new(id, "127.0.0.1", 8000 + i as u16)
                    .and_then(|x| Ok(x.with_weight(datapunk_lb_core::Weight::try_new(w)?)));
                if let Ok(inst) = inst {
                    assert!((1..=1000).contains(&w));
                    r.register_instance(svc, inst)
                        .map(|_| ())
                        .unwrap_or_else(|e| panic!("{e}"));
                    self.present.insert((s, i), true);
                } else {
                    assert!(w == 0, "weight {w} refused");
                }
            }
            Op::Deregister { svc, id } => {
                let (_, svc) = pick(&SERVICES, svc);
                let (_, id) = pick(&IDS, id);
                let _ = r.deregister_instance(svc, id);
            }
            Op::Drain {
                svc,
                id,
                timeout_ms,
            } => {
                let (_, svc) = pick(&SERVICES, svc);
                let (_, id) = pick(&IDS, id);
                let _ = r.drain_instance(svc, id, Duration::from_millis(u64::from(timeout_ms)));
            }
            Op::Select { svc } => {
                let sel = r.get_instance(pick(&SERVICES, svc).1);
                self.hold(sel);
            }
            Op::SelectKey { svc, key } => {
                let sel = r.get_instance_with_key(pick(&SERVICES, svc).1, &[key]);
                self.hold(sel);
            }
            Op::Success { at, latency_ms } => {
                if let Some(s) = self.take(at) {
                    s.success(Duration::from_millis(u64::from(latency_ms)));
                }
            }
            Op::Failure { at, kind } => {
                if let Some(s) = self.take(at) {
                    s.failure(pick(&FailureKind::ALL, kind).1);
                }
            }
            Op::Drop { at } => drop(self.take(at)),
            Op::Health { svc, id, score } => {
                let (_, svc) = pick(&SERVICES, svc);
                let (_, id) = pick(&IDS, id);
                let _ = r.update_instance_health(svc, id, f64::from(score % 101) / 100.0);
            }
            Op::Advance { ms } => self.clock.advance(Duration::from_millis(u64::from(ms))),
            Op::Strategy { svc, kind } => {
                let _ = r.set_strategy(pick(&SERVICES, svc).1, pick(&StrategyKind::ALL, kind).1);
            }
            Op::Maintain => drop(r.maintain()),
            Op::Check { svc, id, ok } => {
                let (_, svc) = pick(&SERVICES, svc);
                let (_, id) = pick(&IDS, id);
                let before = r.instance(svc, id).map(|st| st.circuit_state);
                let outcome = if ok {
                    Outcome::Success(Duration::from_millis(1))
                } else {
                    Outcome::Failure(FailureKind::HealthCheck)
                };
                let _ = r.report_outcome(svc, id, outcome);
                let after = r.instance(svc, id).map(|st| st.circuit_state);
                // Checks may open the door (half-open), never close it.
                if let (Ok(b), Ok(a)) = (before, after) {
                    assert!(
                        b == CircuitState::Closed || a != CircuitState::Closed,
                        "{svc}/{id}: a check closed the breaker ({b:?} -> {a:?})"
                    );
                }
            }
        }
    }

    /// The invariants, after every step.
    fn check(&mut self) {
        for (s, svc) in SERVICES.iter().enumerate() {
            for (i, id) in IDS.iter().enumerate() {
                let here = self.registry.instance(svc, id).is_ok();
                if !here && self.present.get(&(s, i)).copied().unwrap_or(false) {
                    *self.generation.entry((s, i)).or_default() += 1;
                }
                self.present.insert((s, i), here);
            }
            let Some(service) = self.registry.service(svc) else {
                continue;
            };
            let cfg = service.config();
            let status = service.status();
            let mut total = 0usize;
            let mut eligible = 0usize;
            for st in service.instances() {
                let id = st.instance.id().as_str();
                let i = IDS.iter().position(|x| *x == id).unwrap_or(usize::MAX);
                let generation = self.generation.get(&(s, i)).copied().unwrap_or(0);
                let mine = self
                    .held
                    .iter()
                    .filter(|h| h.generation == generation && key_of(&h.sel) == Some((s, i)));
                let (held, probes) = mine.fold((0u32, 0u32), |(n, p), h| {
                    (n + 1, p + u32::from(h.sel.is_probe()))
                });
                assert!(
                    st.active_connections <= held,
                    "{svc}/{id}: {} connections, {held} selections held",
                    st.active_connections
                );
                assert!(
                    probes <= cfg.breaker.half_open_max_probes.max(1),
                    "{svc}/{id}: {probes} probes in flight"
                );
                let w = f64::from(st.instance.weight().get());
                assert!(
                    (0.0..=w + 1e-9).contains(&st.effective_weight),
                    "{svc}/{id}: effective weight {} not in [0, {w}]",
                    st.effective_weight
                );
                if !st.draining {
                    total += 1;
                    if st.health_score > 0.0 && st.circuit_state != CircuitState::Open {
                        eligible += 1;
                    }
                }
            }
            assert_eq!(status.eligible, eligible, "{svc}: eligible count");
            assert_eq!(status.instances - status.draining, total, "{svc}: total");
            // Panic is decided at each pick: read it while the pick is held
            // (an outcome would change health, and so eligibility).
            let held = service.select(None);
            let want = total > 0 && eligible * 100 < usize::from(cfg.min_healthy_percent) * total;
            assert_eq!(
                service.in_panic(),
                want,
                "{svc}: panic with {eligible}/{total}"
            );
            drop(held);
        }
    }

    fn finish(mut self) {
        self.held.clear();
        for svc in SERVICES {
            let Some(service) = self.registry.service(svc) else {
                continue;
            };
            assert_eq!(
                service.status().in_flight,
                0,
                "{svc}: in flight after the end"
            );
            for st in service.instances() {
                assert_eq!(st.active_connections, 0, "{svc}: connections after the end");
            }
        }
    }
}

fuzz_target!(|input: (u64, Vec<Op>)| {
    let (seed, ops) = input;
    let Some(mut world) = World::new(seed) else {
        return;
    };
    for op in ops.into_iter().take(256) {
        world.apply(op);
        world.check();
    }
    world.finish();
});
