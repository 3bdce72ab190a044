//! Leak detection over the database connection inventory, per process and
//! destination (a "pool"). Pure logic: inventory rows in, leak events out.
//!
//! - `idle_in_transaction`: a transaction left open and untouched longer than
//!   `leak_after`.
//! - `never_returned`: a connection untouched longer than `leak_after` that its pool
//!   evidently does not hold: the process opened another connection to the same
//!   server after this one's last use (a pool reuses an idle connection before it
//!   opens one), or the pool is seen to take its least recently used connection
//!   (FIFO) and has taken others at least [`MIN_PASSES`] times while this one was
//!   the least recently used. A connection whose last statement was a pool's reset
//!   (ROLLBACK, DISCARD ALL, RESET) was given back.
//! - `pool_growth`: the pool's open connections kept rising over each of the last
//!   two `leak_after` periods while some of its connections sat unused for longer
//!   than `leak_after`. Reported per pool, with its longest unused connection that
//!   is not already reported on its own (a pool whose stale connections are all
//!   `never_returned` or `idle_in_transaction` is explained by them: reporting the
//!   growth too would report the same connection twice).
//!
//! A healthy pool is never reported: FIFO pools reuse every connection in turn;
//! LIFO pools leave spare connections idle but neither open new ones nor take the
//! least recently used; when traffic stops nothing is taken or opened. A leak is
//! reported once when found, again when its kind changes, and as resolved when the
//! connection is used again or closed (for growth: when the growth stops).

use std::collections::{HashMap, HashSet, VecDeque};

use super::inventory::{DbConnectionRow, PoolKey};

/// Times a FIFO pool must pass a connection over before it counts as not returned.
pub const MIN_PASSES: u32 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakKind {
    NeverReturned,
    IdleInTransaction,
    /// The pool (process → destination) keeps opening connections while old ones
    /// sit unused. Reported once per pool, with its oldest unused connection.
    PoolGrowth,
}

impl LeakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakKind::NeverReturned => "never_returned",
            LeakKind::IdleInTransaction => "idle_in_transaction",
            LeakKind::PoolGrowth => "pool_growth",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakState {
    Found,
    Resolved,
}

/// One leak report.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LeakEvent {
    pub state: LeakState,
    pub kind: LeakKind,
    pub row: DbConnectionRow,
}

/// A connection's identity across inventory snapshots: its pool and its client
/// port (0 stands for the pool itself).
type ConnKey = (PoolKey, u16);

fn key(r: &DbConnectionRow) -> ConnKey {
    (r.pool, r.client_port)
}

/// Statements pools send when a connection is given back.
fn is_pool_reset(query: Option<&str>) -> bool {
    let Some(q) = query else { return false };
    let q = q.trim().to_ascii_uppercase();
    q.starts_with("ROLLBACK") || q.starts_with("DISCARD ALL") || q.starts_with("RESET")
}

fn in_transaction(r: &DbConnectionRow) -> bool {
    r.tx_status.in_transaction()
}

/// Remembers reported leaks so each is reported once, and each pool's size over
/// time for `pool_growth`.
pub struct LeakDetector {
    leak_after_s: f64,
    reported: HashMap<ConnKey, (LeakKind, DbConnectionRow)>,
    /// Pool → (time, open connections), one sample per tenth of `leak_after`,
    /// covering a little more than two periods.
    sizes: HashMap<PoolKey, VecDeque<(f64, usize)>>,
}

impl LeakDetector {
    pub fn new(leak_after: std::time::Duration) -> Self {
        Self {
            leak_after_s: leak_after.as_secs_f64().max(0.001),
            reported: HashMap::new(),
            sizes: HashMap::new(),
        }
    }

    /// The leak kind of one connection.
    fn classify(&self, row: &DbConnectionRow) -> Option<LeakKind> {
        if row.idle_seconds <= self.leak_after_s {
            return None;
        }
        if in_transaction(row) {
            return Some(LeakKind::IdleInTransaction);
        }
        if is_pool_reset(row.last_query.as_deref()) {
            return None;
        }
        let passed_over = row.pool_fifo && row.passed_over >= MIN_PASSES;
        (row.newer_in_pool || passed_over).then_some(LeakKind::NeverReturned)
    }

    /// Records the pool sizes at `now_s` and says which pools grew through the last
    /// two periods.
    fn growing(&mut self, rows: &[DbConnectionRow], now_s: f64) -> HashSet<PoolKey> {
        let mut counts: HashMap<PoolKey, usize> = HashMap::new();
        for r in rows {
            *counts.entry(r.pool).or_default() += 1;
        }
        self.sizes.retain(|k, _| counts.contains_key(k));
        let period = self.leak_after_s;
        let mut growing = HashSet::new();
        for (k, n) in counts {
            let h = self.sizes.entry(k).or_default();
            if h.back().is_none_or(|&(t, _)| now_s - t >= period / 10.0) {
                h.push_back((now_s, n));
            } else if let Some(last) = h.back_mut() {
                last.1 = n;
            }
            // Keep one sample at or before two periods ago, drop older ones.
            while h.len() >= 2 && h[1].0 <= now_s - 2.0 * period {
                h.pop_front();
            }
            let at = |t: f64| h.iter().rev().find(|&&(ts, _)| ts <= t).map(|&(_, c)| c);
            if let (Some(two_ago), Some(one_ago)) = (at(now_s - 2.0 * period), at(now_s - period))
                && n > one_ago
                && one_ago > two_ago
            {
                growing.insert(k);
            }
        }
        growing
    }

    /// Compares a fresh inventory (taken at `now_s`, any monotonic clock in
    /// seconds) with what was reported; returns what changed.
    pub fn evaluate(&mut self, rows: &[DbConnectionRow], now_s: f64) -> Vec<LeakEvent> {
        let growing = self.growing(rows, now_s);
        let mut current: HashMap<ConnKey, (LeakKind, &DbConnectionRow)> = HashMap::new();
        for r in rows {
            if let Some(kind) = self.classify(r) {
                current.insert(key(r), (kind, r));
            }
        }
        // A growing pool with connections unused for a whole period that no other
        // leak explains: the longest unused of those stands for the pool.
        for pool in &growing {
            let oldest = rows
                .iter()
                .filter(|r| r.pool == *pool && !in_transaction(r))
                .filter(|r| r.idle_seconds > self.leak_after_s)
                .filter(|r| !current.contains_key(&key(r)))
                .max_by(|a, b| a.idle_seconds.total_cmp(&b.idle_seconds));
            if let Some(r) = oldest {
                current.insert((*pool, 0), (LeakKind::PoolGrowth, r));
            }
        }
        let mut events = Vec::new();
        for (k, (kind, r)) in &current {
            if self.reported.get(k).map(|(before, _)| *before) == Some(*kind) {
                continue;
            }
            self.reported.insert(*k, (*kind, (*r).clone()));
            events.push(LeakEvent {
                state: LeakState::Found,
                kind: *kind,
                row: (*r).clone(),
            });
        }
        // Used again, closed, or (pools) no longer growing.
        let by_key: HashMap<ConnKey, &DbConnectionRow> = rows.iter().map(|r| (key(r), r)).collect();
        let over: Vec<ConnKey> = self
            .reported
            .keys()
            .filter(|k| !current.contains_key(*k))
            .copied()
            .collect();
        for k in over {
            if let Some((kind, old)) = self.reported.remove(&k) {
                let row = by_key.get(&k).map_or(old, |r| (*r).clone());
                events.push(LeakEvent {
                    state: LeakState::Resolved,
                    kind,
                    row,
                });
            }
        }
        events.sort_by_key(|e| {
            (
                e.state == LeakState::Resolved,
                e.row.pool.pid,
                e.row.client_port,
            )
        });
        events
    }

    /// Marks the rows whose connection has a leak open.
    pub fn annotate(&self, rows: &mut [DbConnectionRow]) {
        for r in rows {
            r.leak = self.reported.get(&key(r)).map(|(kind, _)| *kind);
        }
    }

    /// Leaks currently open.
    pub fn open_leaks(&self) -> usize {
        self.reported.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{pools::inventory::ConnState, protocols::db::TxStatus};

    fn row(port: u16, idle: f64, tx: &'static str, last: &str) -> DbConnectionRow {
        let tx = match tx {
            "in_transaction" => TxStatus::InTransaction,
            "failed" => TxStatus::Failed,
            "unknown" => TxStatus::Unknown,
            _ => TxStatus::Idle,
        };
        DbConnectionRow {
            executable: "app".into(),
            service: "app".into(),
            service_namespace: None,
            service_instance_id: String::new(),
            k8s: Default::default(),
            namespace: Some("shop".into()),
            state: if tx == TxStatus::InTransaction {
                ConnState::Used
            } else {
                ConnState::Idle
            },
            tx_status: tx,
            idle_seconds: idle,
            last_query: Some(last.into()),
            ..DbConnectionRow::sample(7, port)
        }
    }

    /// A connection its pool passed over `passes` times; `fifo`: the pool takes
    /// its least recently used connection.
    fn passed(mut r: DbConnectionRow, passes: u32, fifo: bool) -> DbConnectionRow {
        r.passed_over = passes;
        r.pool_fifo = fifo;
        r
    }

    fn superseded(mut r: DbConnectionRow) -> DbConnectionRow {
        r.newer_in_pool = true;
        r
    }

    #[test]
    fn a_healthy_pool_is_never_reported() {
        let mut d = LeakDetector::new(Duration::from_secs(60));
        // FIFO reuse in turn: nobody idle for long.
        let ev = d.evaluate(
            &[
                row(1, 1.0, "idle", "SELECT ?"),
                row(2, 2.0, "idle", "SELECT ?"),
            ],
            0.0,
        );
        assert!(ev.is_empty());
        // Traffic stopped: all idle long, nothing taken or opened since.
        let ev = d.evaluate(
            &[
                row(1, 300.0, "idle", "SELECT ?"),
                row(2, 301.0, "idle", "SELECT ?"),
            ],
            300.0,
        );
        assert!(ev.is_empty());
        // LIFO reuse: the spare connection idles while the pool takes the most
        // recently used one, over and over: no order learnt as FIFO, no report.
        let ev = d.evaluate(
            &[
                row(1, 0.1, "idle", "SELECT ?"),
                passed(row(2, 500.0, "idle", "SELECT ?"), 400, false),
            ],
            600.0,
        );
        assert!(ev.is_empty(), "{ev:#?}");
        // A FIFO pool with few passes (a low-traffic rotation) is not a leak yet.
        let ev = d.evaluate(
            &[
                row(1, 0.1, "idle", "SELECT ?"),
                passed(row(2, 90.0, "idle", "SELECT ?"), MIN_PASSES - 1, true),
            ],
            700.0,
        );
        assert!(ev.is_empty(), "{ev:#?}");
        // A spare connection given back with a reset, then superseded.
        let ev = d.evaluate(
            &[
                row(1, 1.0, "idle", "SELECT ?"),
                superseded(row(2, 500.0, "idle", "ROLLBACK")),
            ],
            800.0,
        );
        assert!(ev.is_empty(), "{ev:#?}");
    }

    #[test]
    fn each_leak_kind_is_found_once_and_resolved() {
        let mut d = LeakDetector::new(Duration::from_secs(60));
        let leaked_fifo = passed(row(2, 200.0, "idle", "SELECT ? FROM orders"), 9, true);
        let leaked_lifo = superseded(row(4, 100.0, "idle", "SELECT ? FROM users"));
        let in_tx = row(3, 90.0, "in_transaction", "UPDATE orders SET paid = ?");
        let busy = row(1, 0.5, "idle", "SELECT ?");
        let all = [
            busy.clone(),
            leaked_fifo.clone(),
            in_tx.clone(),
            leaked_lifo.clone(),
        ];
        let ev = d.evaluate(&all, 0.0);
        let found: Vec<(u16, LeakKind)> = ev.iter().map(|e| (e.row.client_port, e.kind)).collect();
        assert_eq!(
            found,
            [
                (2, LeakKind::NeverReturned),
                (3, LeakKind::IdleInTransaction),
                (4, LeakKind::NeverReturned)
            ]
        );
        assert!(ev.iter().all(|e| e.state == LeakState::Found));
        // Reported once.
        assert!(d.evaluate(&all, 1.0).is_empty());
        assert_eq!(d.open_leaks(), 3);
        // The transaction commits but the connection stays out of the pool: the
        // kind changes, reported again.
        let committed = superseded(row(3, 95.0, "idle", "COMMIT"));
        let ev = d.evaluate(
            &[
                busy.clone(),
                leaked_fifo.clone(),
                committed,
                leaked_lifo.clone(),
            ],
            2.0,
        );
        assert_eq!(ev.len(), 1, "{ev:#?}");
        assert_eq!(ev[0].kind, LeakKind::NeverReturned);
        // One is used again, one closed, one closed by the server.
        let ev = d.evaluate(&[busy, row(2, 0.1, "idle", "SELECT ?")], 3.0);
        assert_eq!(ev.len(), 3, "{ev:#?}");
        assert!(ev.iter().all(|e| e.state == LeakState::Resolved));
        assert_eq!(d.open_leaks(), 0);
    }

    #[test]
    fn a_connection_alone_in_its_pool_is_not_never_returned() {
        let mut d = LeakDetector::new(Duration::from_secs(60));
        assert!(
            d.evaluate(&[row(1, 1000.0, "idle", "SELECT ?")], 0.0)
                .is_empty()
        );
    }

    #[test]
    fn a_pool_that_keeps_growing_around_unused_connections_is_reported() {
        let mut d = LeakDetector::new(Duration::from_secs(60));
        let pool = |n: u16, t: f64| -> Vec<DbConnectionRow> {
            // Connection 1 is busy; the rest were each used once, then left.
            (1..=n)
                .map(|i| {
                    let idle = if i == 1 { 0.1 } else { t - f64::from(i) * 20.0 };
                    row(i, idle.max(0.1), "idle", "SELECT ?")
                })
                .collect()
        };
        let mut events = Vec::new();
        let mut t = 0.0;
        while t <= 130.0 {
            let n = 2 + (t / 10.0) as u16; // one more connection every 10 s
            events.extend(d.evaluate(&pool(n, t), t));
            t += 1.0;
        }
        let growth: Vec<_> = events
            .iter()
            .filter(|e| e.kind == LeakKind::PoolGrowth)
            .collect();
        assert_eq!(growth.len(), 1, "{events:#?}");
        assert_eq!(growth[0].state, LeakState::Found);
        assert_eq!(
            growth[0].row.client_port, 2,
            "the longest unused connection"
        );
        // Growth stops: resolved once a whole period of history is flat.
        let mut later = Vec::new();
        while t <= 260.0 {
            later.extend(d.evaluate(&pool(15, t), t));
            t += 1.0;
        }
        assert!(
            later
                .iter()
                .any(|e| e.kind == LeakKind::PoolGrowth && e.state == LeakState::Resolved),
            "{later:#?}"
        );
    }

    #[test]
    fn growth_explained_by_connections_reported_on_their_own_is_not_reported_again() {
        let mut d = LeakDetector::new(Duration::from_secs(60));
        // Connection 1 is busy; every other one was used once and then left
        // while the pool opened a newer one: each is never_returned.
        let pool = |n: u16, t: f64, explained: bool| -> Vec<DbConnectionRow> {
            (1..=n)
                .map(|i| {
                    let idle = if i == 1 { 0.1 } else { t - f64::from(i) * 20.0 };
                    DbConnectionRow {
                        newer_in_pool: explained || i != 2,
                        ..row(i, idle.max(0.1), "idle", "SELECT ?")
                    }
                })
                .collect()
        };
        let run = |d: &mut LeakDetector, explained: bool| {
            let mut events = Vec::new();
            let mut t = 0.0;
            while t <= 130.0 {
                let n = 2 + (t / 10.0) as u16;
                events.extend(d.evaluate(&pool(n, t, explained), t));
                t += 1.0;
            }
            events
        };
        let events = run(&mut d, true);
        assert!(
            events.iter().all(|e| e.kind == LeakKind::NeverReturned),
            "{events:#?}"
        );
        assert!(!events.is_empty());
        let mut ports: Vec<u16> = events.iter().map(|e| e.row.client_port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(
            ports.len(),
            events.len(),
            "each connection once: {events:#?}"
        );

        // The same pool with connection 2 not explained (nothing newer is known
        // to have replaced it): the growth is reported, naming it.
        let mut d = LeakDetector::new(Duration::from_secs(60));
        let events = run(&mut d, false);
        let growth: Vec<_> = events
            .iter()
            .filter(|e| e.kind == LeakKind::PoolGrowth)
            .collect();
        assert_eq!(growth.len(), 1, "{events:#?}");
        assert_eq!(growth[0].row.client_port, 2);
    }

    #[test]
    fn a_pool_that_grows_once_under_load_is_not_growth() {
        let mut d = LeakDetector::new(Duration::from_secs(60));
        let mut events = Vec::new();
        for t in 0..300 {
            let t = f64::from(t);
            // A burst at t = 100 opens 8 more connections; all are reused after.
            let n: u16 = if t < 100.0 { 2 } else { 10 };
            let rows: Vec<_> = (1..=n).map(|i| row(i, 0.5, "idle", "SELECT ?")).collect();
            events.extend(d.evaluate(&rows, t));
        }
        assert!(events.is_empty(), "{events:#?}");
    }
}
