//! Request-path metrics that workers never write on the same cache line.
//!
//! Under thread per core every worker serves every service. prometheus-client's
//! `Counter` is one atomic and its `Histogram` takes a write lock for each
//! observation, so each request wrote lines the other workers write too,
//! and each such write waited for the line to come back from another core
//! (with 2 workers, `Histogram::observe` and the selection counter were
//! 0.7 % of the proxy's CPU, and nothing at 1 worker). A [`WorkerCounter`]
//! and a [`WorkerHistogram`] keep one shard per worker slot — slot 0 for
//! threads that are not workers, slot `i + 1` for worker `i`, as the retry
//! budget and the connection pool do — each on cache lines of its own; a
//! scrape sums the shards. The exposition is the same as prometheus-client's
//! `Counter` and `Histogram` (tests below compare the text).
//!
//! The shard count is fixed when the metric is made (`1 +`
//! [`workers::most_started`]); a thread whose slot is past it shares a
//! shard by its index modulo the count, which is still exact: shards are
//! atomics, not per-thread cells.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::workers::{self, Aligned};

/// How many shards a metric made now has.
fn shard_count() -> usize {
    1 + workers::most_started()
}

/// A counter summed over per-worker shards.
#[derive(Debug, Clone)]
pub struct WorkerCounter {
    /// One per slot, each alone on its cache lines.
    shards: Arc<[Aligned<AtomicU64>]>,
}

impl Default for WorkerCounter {
    fn default() -> Self {
        Self {
            shards: (0..shard_count()).map(|_| Aligned::default()).collect(),
        }
    }
}

impl WorkerCounter {
    /// Adds one, on this thread's shard.
    pub fn inc(&self) {
        self.shards[workers::slot(self.shards.len())]
            .0
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The sum over the shards.
    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

impl TypedMetric for WorkerCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for WorkerCounter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Most finite bucket bounds a [`WorkerHistogram`] takes (the request
/// duration histogram has 15).
const MAX_BOUNDS: usize = 15;

/// One worker's observations: a count per bucket (`+Inf` last) and the sum
/// (`f64` bits).
#[derive(Debug, Default)]
#[repr(align(128))]
struct HistogramShard {
    counts: [AtomicU64; MAX_BOUNDS + 1],
    sum: AtomicU64,
}

#[derive(Debug)]
struct HistogramInner {
    bounds: Box<[f64]>,
    shards: Box<[HistogramShard]>,
}

/// A histogram summed over per-worker shards: no lock, one shard's lines
/// written per observation.
#[derive(Debug, Clone)]
pub struct WorkerHistogram {
    inner: Arc<HistogramInner>,
}

impl WorkerHistogram {
    /// A histogram with these finite upper bounds (ascending; `+Inf` is
    /// added). Bounds past `MAX_BOUNDS` (15) are dropped: the callers are this
    /// crate's constants.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Box<[f64]> = bounds.into_iter().take(MAX_BOUNDS).collect();
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
        Self {
            inner: Arc::new(HistogramInner {
                bounds,
                shards: (0..shard_count())
                    .map(|_| HistogramShard::default())
                    .collect(),
            }),
        }
    }

    /// Records one value on this thread's shard.
    pub fn observe(&self, v: f64) {
        let inner = &*self.inner;
        let bucket = inner
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(inner.bounds.len());
        let shard = &inner.shards[workers::slot(inner.shards.len())];
        shard.counts[bucket].fetch_add(1, Ordering::Relaxed);
        // Uncontended but for threads that share slot 0: one exchange.
        let _ = shard
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    /// The sum, the count and the non-cumulative count of each bucket
    /// (`(upper bound, count)`, `+Inf` as `f64::MAX`), over the shards.
    pub fn get(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let inner = &*self.inner;
        let mut buckets: Vec<(f64, u64)> = inner
            .bounds
            .iter()
            .copied()
            .chain([f64::MAX])
            .map(|b| (b, 0))
            .collect();
        let mut sum = 0.0;
        for shard in inner.shards.iter() {
            for (b, c) in buckets.iter_mut().zip(&shard.counts) {
                b.1 = b.1.wrapping_add(c.load(Ordering::Relaxed));
            }
            sum += f64::from_bits(shard.sum.load(Ordering::Relaxed));
        }
        let count = buckets.iter().fold(0u64, |n, b| n.wrapping_add(b.1));
        (sum, count, buckets)
    }
}

impl TypedMetric for WorkerHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for WorkerHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.get();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    fn text(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn a_histogram_reads_as_prometheus_clients_with_the_same_observations() {
        let bounds = [0.001, 0.01, 0.1, 1.0];
        let values = [0.0005, 0.001, 0.003, 0.05, 0.05, 0.7, 3.0, 12.5];
        let ours = WorkerHistogram::new(bounds);
        let theirs = Histogram::new(bounds);
        for v in values {
            ours.observe(v);
            theirs.observe(v);
        }
        let a = text(|r| r.register("d", "help", ours.clone()));
        let b = text(|r| r.register("d", "help", theirs.clone()));
        assert_eq!(a, b);
        let (sum, count, buckets) = ours.get();
        assert_eq!(count, 8);
        assert!((sum - values.iter().sum::<f64>()).abs() < 1e-9, "{sum}");
        assert_eq!(
            buckets[0],
            (0.001, 2),
            "v <= bound lands in the bound's bucket"
        );
        assert_eq!(buckets[4], (f64::MAX, 2));
    }

    #[test]
    fn a_counter_reads_as_prometheus_clients_and_sums_every_thread() {
        let ours = WorkerCounter::default();
        let theirs = Counter::<u64>::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        ours.inc();
                        theirs.inc();
                    }
                });
            }
        });
        assert_eq!(ours.get(), 4000);
        let a = text(|r| r.register("c", "help", ours.clone()));
        let b = text(|r| r.register("c", "help", theirs.clone()));
        assert_eq!(a, b);
    }

    #[test]
    fn observations_on_worker_threads_land_in_their_own_shards_and_sum() {
        let workers = workers::Workers::start(2).unwrap();
        // Made after the start: sized by the workers started.
        let h = WorkerHistogram::new([1.0]);
        let (tx, rx) = std::sync::mpsc::channel();
        for handle in workers.handles() {
            let (h, tx) = (h.clone(), tx.clone());
            handle.spawn(async move {
                h.observe(0.5);
                let _ = tx.send(());
            });
        }
        for _ in 0..2 {
            rx.recv().unwrap();
        }
        h.observe(2.0);
        let per_shard: Vec<u64> = h
            .inner
            .shards
            .iter()
            .map(|s| s.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum())
            .collect();
        assert_eq!(per_shard.iter().sum::<u64>(), 3);
        assert!(per_shard.len() >= 3, "{per_shard:?}");
        assert_eq!(per_shard[..3], [1, 1, 1], "slot 0 and one per worker");
    }
}
