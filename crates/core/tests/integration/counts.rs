//! Exact connection counts under concurrency (property test).

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use datapunk_lb_core::{FailureKind, Registry, StrategyKind};
use quickcheck::{QuickCheck, TestResult};

use crate::support::*;

fn run(seed: u64, threads: u8, ops: u16) -> TestResult {
    let threads = usize::from(threads % 4) + 2;
    let ops = usize::from(ops % 2000) + 100;
    let kind = StrategyKind::ALL[(seed % StrategyKind::ALL.len() as u64) as usize];
    let (reg, _) = registry(kind);
    populate(&reg, &[1, 2, 3, 4, 5, 1, 1, 2]);
    let reg: Arc<Registry> = Arc::new(reg);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let reg = reg.clone();
            thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed ^ (t as u64) << 32);
                let mut held = Vec::new();
                for _ in 0..ops {
                    match rng.u8(..10) {
                        0..=4 => {
                            let key = rng.u32(..).to_le_bytes();
                            if let Some(s) = reg.get_instance_with_key(SVC, &key) {
                                held.push(s);
                            }
                        }
                        5..=6 if !held.is_empty() => {
                            let s = held.swap_remove(rng.usize(..held.len()));
                            s.success(Duration::from_micros(rng.u64(1..5000)));
                        }
                        7 if !held.is_empty() => {
                            let s = held.swap_remove(rng.usize(..held.len()));
                            s.failure(FailureKind::Reset);
                        }
                        _ if !held.is_empty() => {
                            drop(held.swap_remove(rng.usize(..held.len())));
                        }
                        _ => {}
                    }
                    // Mid-run health churn from an "operator".
                    if rng.u16(..500) == 0 {
                        let _ = reg.update_instance_health(SVC, "i1", rng.f64());
                    }
                }
                drop(held);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let svc = reg.service(SVC).unwrap();
    if svc.status().in_flight != 0 {
        return TestResult::error(format!(
            "service in_flight {} after all selections ended",
            svc.status().in_flight
        ));
    }
    for st in reg.instances(SVC).unwrap() {
        if st.active_connections != 0 {
            return TestResult::error(format!(
                "{} has {} active after all ended ({kind})",
                st.instance.id(),
                st.active_connections
            ));
        }
    }
    TestResult::passed()
}

#[test]
fn counts_return_to_zero_after_concurrent_selections() {
    QuickCheck::new()
        .tests(24)
        .quickcheck(run as fn(u64, u8, u16) -> TestResult);
}
