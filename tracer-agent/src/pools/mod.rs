//! Database connection pools: one pool is one process's connections to one database
//! server ([`inventory::PoolKey`]).
//!
//! - [`tracker`]: membership, the pool's order (FIFO/LIFO), passed-over connections,
//!   last use, the trace of each connection's last call, create/use time samples; fed
//!   by the connection table's [`tracker::DbObservation`]s and by settled spans.
//! - [`inventory`]: one row per database client connection (`/connections`), with
//!   typed states, and the rows grouped per pool.
//! - [`leaks`]: the leak detector, inventory rows in, leak events out.
//!
//! [`PoolStage`] does the once-a-second round: inventory, leaks, pool counts.

pub mod inventory;
pub mod leaks;
pub mod tracker;

use std::time::{Duration, Instant};

pub use inventory::{ConnState, DbConnectionRow, PoolKey};
pub use leaks::{LeakDetector, LeakEvent, LeakKind, LeakState, MIN_PASSES};
pub use tracker::PoolTracker;

/// How often the inventory is taken and leaks are evaluated.
pub const INVENTORY_EVERY: Duration = Duration::from_secs(1);

/// One round of the pool stage: the inventory (leaks marked), the leak reports that
/// changed, and each pool's idle and used connections for the pool metrics.
pub struct PoolRound {
    pub rows: Vec<DbConnectionRow>,
    pub leaks: Vec<LeakEvent>,
    pub counts: Vec<(PoolKey, u64, u64)>,
}

/// The pool tracker, the leak detector and their once-a-second round.
pub struct PoolStage {
    pub tracker: PoolTracker,
    leaks: LeakDetector,
    started: Instant,
    last_round: Instant,
}

impl PoolStage {
    pub fn new(leak_after: Duration) -> Self {
        let now = Instant::now();
        Self {
            tracker: PoolTracker::new(),
            leaks: LeakDetector::new(leak_after),
            started: now,
            last_round: now,
        }
    }

    /// Whether a round is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now.duration_since(self.last_round) >= INVENTORY_EVERY
    }

    /// Evaluates a fresh inventory (`rows`, from the connection table and the
    /// tracker) at `now`.
    pub fn round(&mut self, mut rows: Vec<DbConnectionRow>, now: Instant) -> PoolRound {
        self.last_round = now;
        let leaks = self
            .leaks
            .evaluate(&rows, now.duration_since(self.started).as_secs_f64());
        self.leaks.annotate(&mut rows);
        let counts = counts(&rows);
        PoolRound {
            rows,
            leaks,
            counts,
        }
    }
}

/// Idle and used connections per pool, in pool order.
pub fn counts(rows: &[DbConnectionRow]) -> Vec<(PoolKey, u64, u64)> {
    let mut by_pool: std::collections::BTreeMap<PoolKey, (u64, u64)> = Default::default();
    for r in rows {
        let (idle, used) = by_pool.entry(r.pool).or_default();
        match r.state {
            ConnState::Used => *used += 1,
            ConnState::Idle => *idle += 1,
        }
    }
    by_pool
        .into_iter()
        .map(|(pool, (idle, used))| (pool, idle, used))
        .collect()
}
