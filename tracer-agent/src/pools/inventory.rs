//! The database connection inventory: one row per database client connection
//! (`/connections`, `tracer-agent conns`, leak reports), and its rows grouped per
//! pool. A pool is one process's connections to one database server: [`PoolKey`].

use std::{collections::HashMap, net::SocketAddr};

use super::leaks::LeakKind;
use crate::{
    protocols::db::{DbSystem, TxStatus},
    stitch::causality::Culprit,
};

/// One pool's identity everywhere: the tracker, the inventory, the leak detector and
/// the pool metrics. In JSON: `pid`, `db_system`, `server_address`, `server_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub pid: u32,
    pub db_system: DbSystem,
    pub server: SocketAddr,
}

impl PoolKey {
    /// `db.client.connection.pool.name`: `<executable>[<pid>] <db_system> <address>:<port>`,
    /// an IPv6 address in brackets, e.g. `python3.11[4242] postgresql 127.0.0.1:5432`.
    pub fn name(&self, executable: &str) -> String {
        // SocketAddr's own format brackets IPv6 addresses.
        format!(
            "{executable}[{}] {} {}",
            self.pid,
            self.db_system.as_str(),
            self.server
        )
    }
}

impl serde::Serialize for PoolKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("PoolKey", 4)?;
        st.serialize_field("pid", &self.pid)?;
        st.serialize_field("db_system", self.db_system.as_str())?;
        st.serialize_field("server_address", &self.server.ip().to_string())?;
        st.serialize_field("server_port", &self.server.port())?;
        st.end()
    }
}

/// Whether a connection is in use: a call in flight or a transaction open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    Idle,
    Used,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Idle => "idle",
            ConnState::Used => "used",
        }
    }
}

fn tx_str<S: serde::Serializer>(v: &TxStatus, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.as_str())
}

/// The Kubernetes side of a connection's process: its pod's attributes, or its
/// node's name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct K8sOfRow {
    pub pod: Option<crate::kube::SharedK8sResource>,
    pub node: Option<std::sync::Arc<str>>,
}

impl K8sOfRow {
    pub fn of(r: &crate::process::ProcessResource) -> Self {
        Self {
            pod: r.k8s.clone(),
            node: r.k8s_node.clone(),
        }
    }

    fn is_empty(&self) -> bool {
        self.pod.is_none() && self.node.is_none()
    }

    fn serialize<S: serde::Serializer>(v: &Self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = v.resource();
        let mut m = s.serialize_map(None)?;
        for (k, v) in r.k8s_attributes() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }

    /// A resource holding only these attributes (to reuse the exporters' code).
    pub fn resource(&self) -> crate::process::ProcessResource {
        crate::process::ProcessResource {
            pid: 0,
            executable_name: String::new(),
            service_name: String::new(),
            service_namespace: None,
            service_instance_id: String::new(),
            host_name: String::new(),
            k8s: self.pod.clone(),
            k8s_node: self.node.clone(),
        }
    }
}

/// One database client connection in the inventory (`/connections`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DbConnectionRow {
    /// Its pool: process, database system and server (out as `pid`, `db_system`,
    /// `server_address`, `server_port`).
    #[serde(flatten)]
    pub pool: PoolKey,
    pub executable: String,
    pub service: String,
    /// The process's `service.namespace` and `service.instance.id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_namespace: Option<String>,
    pub service_instance_id: String,
    /// The process's Kubernetes attributes (`k8s.*`), out as one object.
    #[serde(
        skip_serializing_if = "K8sOfRow::is_empty",
        serialize_with = "K8sOfRow::serialize"
    )]
    pub k8s: K8sOfRow,
    pub namespace: Option<String>,
    pub client_port: u16,
    pub state: ConnState,
    #[serde(serialize_with = "tx_str")]
    pub tx_status: TxStatus,
    pub idle_seconds: f64,
    pub open_seconds: f64,
    pub last_query: Option<String>,
    /// The database span that last used the connection, and its trace once the
    /// stitcher has settled it.
    pub last_span_id: Option<String>,
    pub last_trace_id: Option<String>,
    /// The incoming request that last used the connection (the culprit of a leak).
    pub culprit: Option<Culprit>,
    /// Recovered from /proc: open before the agent started; its protocol is a
    /// guess from the port until traffic confirms it, and its idle time counts
    /// from the agent's start.
    pub recovered: bool,
    /// Leak signals from the pool's behaviour (see `pools::leaks`): times the pool took
    /// another connection while this one was its least recently used idle one...
    pub passed_over: u32,
    /// ... whether the pool is seen to take its least recently used connection
    /// (FIFO), so that being passed over means something ...
    #[serde(skip)]
    pub pool_fifo: bool,
    /// ... and whether the process opened another connection to the same server
    /// after this one's last use (instead of reusing it).
    #[serde(skip)]
    pub newer_in_pool: bool,
    /// The leak reported on this connection, if any (set by the leak detector).
    pub leak: Option<LeakKind>,
}

#[cfg(test)]
impl DbConnectionRow {
    /// An idle PostgreSQL connection of `pid` to 127.0.0.1:5432, for tests to adjust.
    pub(crate) fn sample(pid: u32, client_port: u16) -> Self {
        Self {
            pool: PoolKey {
                pid,
                db_system: DbSystem::Postgresql,
                server: SocketAddr::from(([127, 0, 0, 1], 5432)),
            },
            executable: format!("app{pid}"),
            service: format!("svc{pid}"),
            service_namespace: None,
            service_instance_id: String::new(),
            k8s: K8sOfRow::default(),
            namespace: None,
            client_port,
            state: ConnState::Idle,
            tx_status: TxStatus::Idle,
            idle_seconds: 0.0,
            open_seconds: 600.0,
            last_query: None,
            last_span_id: None,
            last_trace_id: None,
            culprit: None,
            recovered: false,
            passed_over: 0,
            pool_fifo: false,
            newer_in_pool: false,
            leak: None,
        }
    }
}

/// Connections of one process to one database destination.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct PoolRow {
    pub pid: u32,
    pub executable: String,
    pub db_system: String,
    pub server_address: String,
    pub server_port: u16,
    pub open: usize,
    pub used: usize,
    pub idle: usize,
    pub oldest_idle_seconds: f64,
    /// Connections with a leak reported.
    #[serde(default)]
    pub leaked: usize,
    /// The longest-idle leak: its kind, local port, culprit request and last query.
    #[serde(default)]
    pub worst_leak: Option<LeakSummary>,
}

/// The leak a pool row names.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct LeakSummary {
    pub kind: LeakKind,
    pub client_port: u16,
    pub idle_seconds: f64,
    /// `GET /path` of the request that last used the connection, when known.
    pub culprit: Option<String>,
    pub trace_id: Option<String>,
    pub last_query: Option<String>,
}

/// Groups connections into pools (process × destination), oldest idle first.
pub fn pools(rows: &[DbConnectionRow]) -> Vec<PoolRow> {
    let mut pools: Vec<PoolRow> = Vec::new();
    let mut index: HashMap<PoolKey, usize> = HashMap::new();
    for r in rows {
        let i = *index.entry(r.pool).or_insert_with(|| {
            pools.push(PoolRow {
                pid: r.pool.pid,
                executable: r.executable.clone(),
                db_system: r.pool.db_system.as_str().to_string(),
                server_address: r.pool.server.ip().to_string(),
                server_port: r.pool.server.port(),
                open: 0,
                used: 0,
                idle: 0,
                oldest_idle_seconds: 0.0,
                leaked: 0,
                worst_leak: None,
            });
            pools.len() - 1
        });
        let p = &mut pools[i];
        p.open += 1;
        match r.state {
            ConnState::Used => p.used += 1,
            ConnState::Idle => {
                p.idle += 1;
                p.oldest_idle_seconds = p.oldest_idle_seconds.max(r.idle_seconds);
            }
        }
        if let Some(kind) = r.leak {
            p.leaked += 1;
            if p.worst_leak
                .as_ref()
                .is_none_or(|w| w.idle_seconds < r.idle_seconds)
            {
                p.worst_leak = Some(LeakSummary {
                    kind,
                    client_port: r.client_port,
                    idle_seconds: r.idle_seconds,
                    culprit: r
                        .culprit
                        .as_ref()
                        .map(|c| format!("{} {}", c.method, c.path)),
                    trace_id: r.last_trace_id.clone(),
                    last_query: r.last_query.clone(),
                });
            }
        }
    }
    // Leaking pools first (most leaks first), then the longest idle.
    pools.sort_by(|a, b| {
        b.leaked
            .cmp(&a.leaked)
            .then(b.oldest_idle_seconds.total_cmp(&a.oldest_idle_seconds))
    });
    pools
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(pid: u32, server: &str) -> PoolKey {
        PoolKey {
            pid,
            db_system: DbSystem::Postgresql,
            server: server.parse().expect("a socket address"),
        }
    }

    #[test]
    fn pool_names_put_ipv6_addresses_in_brackets() {
        assert_eq!(
            pool(4242, "127.0.0.1:5432").name("python3.11"),
            "python3.11[4242] postgresql 127.0.0.1:5432"
        );
        assert_eq!(
            pool(4242, "[::1]:5432").name("python3.11"),
            "python3.11[4242] postgresql [::1]:5432"
        );
    }

    #[test]
    fn rows_group_into_pools_used_first_counted() {
        let mut used = DbConnectionRow::sample(7, 2);
        used.state = ConnState::Used;
        let mut idle = DbConnectionRow::sample(7, 1);
        idle.idle_seconds = 30.0;
        let other = DbConnectionRow::sample(8, 1);
        let summary = pools(&[idle, used, other]);
        assert_eq!(summary.len(), 2);
        assert_eq!(
            (
                summary[0].pid,
                summary[0].open,
                summary[0].used,
                summary[0].idle
            ),
            (7, 2, 1, 1)
        );
        assert_eq!(summary[0].oldest_idle_seconds, 30.0);
        assert_eq!((summary[1].pid, summary[1].open), (8, 1));
    }
}
