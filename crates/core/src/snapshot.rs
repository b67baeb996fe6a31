//! [`Snapshot`]: what one pick of a service reads, immutable.
//!
//! A service publishes a new snapshot on every change (registration,
//! removal, configuration) and never changes one in place, so a reader that
//! holds one sees a consistent member list, strategy and configuration for
//! as long as it holds it. A [`Selection`](crate::Selection) holds the
//! snapshot its pick read (through its thread's pick view, see
//! [`selection`](crate::selection)), which is what lets it name its member
//! by position instead of holding the member's own `Arc`.

use std::any::Any;
use std::sync::{Arc, OnceLock};

use crate::config::LoadBalancerConfig;
use crate::members::Members;
use crate::strategy::{Strategy, StrategyKind};

/// What selection reads: immutable, replaced on every change.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) members: Members,
    pub(crate) generation: u64,
    pub(crate) strategy: Arc<dyn Strategy>,
    /// `strategy.kind()`, read without a call: a pick asks the strategy
    /// which one it used only for `adaptive`.
    pub(crate) kind: StrategyKind,
    pub(crate) config: Arc<LoadBalancerConfig>,
    /// The strategy's table built for this snapshot's generation, once a
    /// pick found it (`consistent_hash`): later picks of this snapshot
    /// reach it with one load instead of a load of the strategy's
    /// `ArcSwap` (two locked instructions). It lives as long as the
    /// snapshot, so a snapshot kept past the next rebuild keeps its table.
    pub(crate) table: StrategyTable,
}

/// A strategy's table, of the strategy's own type; see [`Snapshot`].
pub(crate) type StrategyTable = OnceLock<Arc<dyn Any + Send + Sync>>;
