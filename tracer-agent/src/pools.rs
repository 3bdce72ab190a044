//! Leak detection over the database connection inventory, per process and
//! destination (a "pool"). Pure logic: inventory rows in, leak events out.
//!
//! - `idle_in_transaction`: a transaction left open and untouched longer than
//!   `leak_after`.
//! - `never_returned`: a connection untouched longer than `leak_after` while the same
//!   pool kept working without it for a whole `leak_after` after its last use (the
//!   pool passes it over because it was never given back). A connection whose last
//!   statement was a pool's reset (ROLLBACK, DISCARD ALL, RESET) was given back.
//!
//! A healthy pool is never reported: connections reused in turn are never idle that
//! long, and when traffic stops every connection's last use is within moments of the
//! others'. A leak is reported once when found, again when its kind changes, and as
//! resolved when the connection is used again or closed.

use std::collections::HashMap;

use crate::connections::DbConnectionRow;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakKind {
    NeverReturned,
    IdleInTransaction,
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

/// A connection's identity across inventory snapshots.
type ConnKey = (u32, String, u16, u16);

fn key(r: &DbConnectionRow) -> ConnKey {
    (
        r.pid,
        r.server_address.clone(),
        r.server_port,
        r.client_port,
    )
}

/// Statements pools send when a connection is given back.
fn is_pool_reset(query: Option<&str>) -> bool {
    let Some(q) = query else { return false };
    let q = q.trim().to_ascii_uppercase();
    q.starts_with("ROLLBACK") || q.starts_with("DISCARD ALL") || q.starts_with("RESET")
}

/// Remembers reported leaks so each is reported once.
pub struct LeakDetector {
    leak_after_s: f64,
    reported: HashMap<ConnKey, (LeakKind, DbConnectionRow)>,
}

impl LeakDetector {
    pub fn new(leak_after: std::time::Duration) -> Self {
        Self {
            leak_after_s: leak_after.as_secs_f64(),
            reported: HashMap::new(),
        }
    }

    /// The leak kind of one connection, given its pool.
    fn classify(&self, row: &DbConnectionRow, pool: &[&DbConnectionRow]) -> Option<LeakKind> {
        if row.idle_seconds <= self.leak_after_s {
            return None;
        }
        if row.tx_status == "in_transaction" || row.tx_status == "failed" {
            return Some(LeakKind::IdleInTransaction);
        }
        if is_pool_reset(row.last_query.as_deref()) {
            return None;
        }
        // The pool used another connection a whole threshold after this one's last use.
        let passed_over = pool.iter().any(|other| {
            other.client_port != row.client_port
                && other.idle_seconds + self.leak_after_s < row.idle_seconds
        });
        passed_over.then_some(LeakKind::NeverReturned)
    }

    /// Compares a fresh inventory with what was reported; returns what changed.
    pub fn evaluate(&mut self, rows: &[DbConnectionRow]) -> Vec<LeakEvent> {
        let mut pools: HashMap<(u32, &str, u16), Vec<&DbConnectionRow>> = HashMap::new();
        for r in rows {
            pools
                .entry((r.pid, r.server_address.as_str(), r.server_port))
                .or_default()
                .push(r);
        }
        let mut events = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for r in rows {
            let k = key(r);
            seen.insert(k.clone());
            let pool = &pools[&(r.pid, r.server_address.as_str(), r.server_port)];
            let now = self.classify(r, pool);
            match (now, self.reported.get(&k).map(|(kind, _)| *kind)) {
                (Some(kind), Some(before)) if kind == before => {}
                (Some(kind), _) => {
                    self.reported.insert(k, (kind, r.clone()));
                    events.push(LeakEvent {
                        state: LeakState::Found,
                        kind,
                        row: r.clone(),
                    });
                }
                (None, Some(before)) => {
                    self.reported.remove(&k);
                    events.push(LeakEvent {
                        state: LeakState::Resolved,
                        kind: before,
                        row: r.clone(),
                    });
                }
                (None, None) => {}
            }
        }
        // Closed connections resolve their leaks.
        let closed: Vec<ConnKey> = self
            .reported
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for k in closed {
            if let Some((kind, row)) = self.reported.remove(&k) {
                events.push(LeakEvent {
                    state: LeakState::Resolved,
                    kind,
                    row,
                });
            }
        }
        events
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

    fn row(port: u16, idle: f64, tx: &'static str, last: &str) -> DbConnectionRow {
        DbConnectionRow {
            pid: 7,
            executable: "app".into(),
            service: "app".into(),
            db_system: "postgresql",
            namespace: Some("shop".into()),
            server_address: "127.0.0.1".into(),
            server_port: 5432,
            client_port: port,
            state: if tx == "in_transaction" {
                "used"
            } else {
                "idle"
            },
            tx_status: tx,
            idle_seconds: idle,
            open_seconds: 600.0,
            last_query: Some(last.into()),
            last_span_id: None,
        }
    }

    #[test]
    fn a_healthy_pool_is_never_reported() {
        let mut d = LeakDetector::new(Duration::from_secs(60));
        // Reused in turn: nobody idle for long.
        assert!(
            d.evaluate(&[
                row(1, 1.0, "idle", "SELECT ?"),
                row(2, 2.0, "idle", "SELECT ?")
            ])
            .is_empty()
        );
        // Traffic stopped: all idle long, but last used together.
        assert!(
            d.evaluate(&[
                row(1, 300.0, "idle", "SELECT ?"),
                row(2, 301.0, "idle", "SELECT ?")
            ])
            .is_empty()
        );
        // A LIFO pool's spare connection that was given back (reset on return).
        assert!(
            d.evaluate(&[
                row(1, 1.0, "idle", "SELECT ?"),
                row(2, 500.0, "idle", "ROLLBACK")
            ])
            .is_empty()
        );
    }

    #[test]
    fn each_leak_kind_is_found_once_and_resolved() {
        let mut d = LeakDetector::new(Duration::from_secs(60));
        let leaked = row(2, 200.0, "idle", "SELECT ? FROM orders");
        let in_tx = row(3, 90.0, "in_transaction", "UPDATE orders SET paid = ?");
        let busy = row(1, 0.5, "idle", "SELECT ?");
        let ev = d.evaluate(&[busy.clone(), leaked.clone(), in_tx.clone()]);
        assert_eq!(ev.len(), 2, "{ev:#?}");
        assert!(
            ev.iter()
                .any(|e| e.kind == LeakKind::NeverReturned && e.row.client_port == 2)
        );
        assert!(
            ev.iter()
                .any(|e| e.kind == LeakKind::IdleInTransaction && e.row.client_port == 3)
        );
        assert!(ev.iter().all(|e| e.state == LeakState::Found));
        // Reported once.
        assert!(
            d.evaluate(&[busy.clone(), leaked.clone(), in_tx.clone()])
                .is_empty()
        );
        assert_eq!(d.open_leaks(), 2);
        // The leaked one is used again; the transaction one's connection is closed.
        let ev = d.evaluate(&[busy, row(2, 0.1, "idle", "SELECT ?")]);
        assert_eq!(ev.len(), 2, "{ev:#?}");
        assert!(ev.iter().all(|e| e.state == LeakState::Resolved));
        assert_eq!(d.open_leaks(), 0);
    }

    #[test]
    fn a_connection_alone_in_its_pool_is_not_never_returned() {
        let mut d = LeakDetector::new(Duration::from_secs(60));
        assert!(d.evaluate(&[row(1, 1000.0, "idle", "SELECT ?")]).is_empty());
    }
}
