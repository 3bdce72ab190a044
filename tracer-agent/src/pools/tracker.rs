//! The pool tracker: which database connections form each pool, how the pool picks
//! connections (FIFO or LIFO), which connections it passes over, when each was last
//! given back, and the create and use times of the pool metrics. The connection table
//! reports each database connection's life and use ([`DbObservation`]); the
//! tracker keeps the rest. The inventory ([`super::inventory`]) reads it.

use std::{collections::VecDeque, net::SocketAddr};

// Keyed by kernel socket addresses and random span ids: a fast, seeded hasher.
use foldhash::HashMap;

use super::inventory::PoolKey;
use crate::spans::{SpanId, TraceId};

/// What the connection table saw a database client connection do.
#[derive(Clone, Copy, Debug)]
pub enum DbObservation {
    /// A database client connection became known: seen connecting (`opened_by_kernel`),
    /// recovered from /proc, or detected from its first bytes.
    Joined {
        sock: u64,
        pool: PoolKey,
        opened_ns: u64,
        opened_by_kernel: bool,
    },
    /// A connection recovered from /proc did its first I/O under the kernel's
    /// watch: from now on it is known by its socket.
    Rekeyed { from: u64, to: u64 },
    /// The handshake ended: the connection is ready for queries.
    Ready { sock: u64, ts_ns: u64 },
    /// One chunk of its traffic was decoded.
    Used(DbUse),
    /// It closed, or the table forgot it.
    Left { sock: u64 },
}

/// One decoded chunk of a database connection's traffic.
#[derive(Clone, Copy, Debug)]
pub struct DbUse {
    pub sock: u64,
    pub ts_ns: u64,
    /// The client started a request on a connection that is ready (its handshake
    /// done) and had no call in flight.
    pub request_started: bool,
    /// The span of the last call the chunk completed, if it completed any.
    pub completed: Option<SpanId>,
    /// After the chunk: a call is in flight; a transaction is open.
    pub in_flight: bool,
    pub in_transaction: bool,
}

/// A timing sample for the pool metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSample {
    pub pool: PoolKey,
    pub kind: PoolSampleKind,
    pub seconds: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolSampleKind {
    /// Connect to ready (handshake done).
    Create,
    /// Taken into use until idle again.
    Use,
}

/// What the tracker knows of one database connection.
#[derive(Clone, Debug)]
pub struct Member {
    pub pool: PoolKey,
    opened_ns: u64,
    /// When the current use began: a request sent on an idle connection. Over
    /// when no call is in flight and no transaction is open.
    in_use_since: Option<u64>,
    in_flight: bool,
    /// When the connection was last idle again (its last use ended), or opened.
    pub last_use_ns: u64,
    /// Borrows in its pool since its last use that took another connection while
    /// this one was the pool's least recently used idle one.
    pub passed_over: u32,
    /// The span of its last call, and that span's trace once parent inference
    /// settled it.
    last_span: Option<SpanId>,
    pub last_trace: Option<TraceId>,
}

/// One pool as the tracker watches it: its members and how it picks connections.
#[derive(Default)]
struct PoolTrack {
    members: Vec<u64>,
    /// Borrows that took the least recently used idle connection (a FIFO pool) or
    /// the most recently used one (LIFO).
    fifo: u32,
    lifo: u32,
    /// The last connection opened (seen connecting) to this destination.
    last_open_ns: u64,
}

/// What the tracker says of a pool, for the inventory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolOrder {
    /// The pool is seen to take its least recently used connection (FIFO).
    pub fifo: bool,
    /// The last connection the process was seen opening to this server, when.
    pub last_open_ns: u64,
}

/// Pool samples kept when nobody takes them.
const MAX_POOL_SAMPLES: usize = 65536;
/// Pools watched at most; members per pool at most.
const MAX_POOLS: usize = 16384;
const MAX_POOL_MEMBERS: usize = 4096;
/// A connection passed over this many times by a pool seen to take its least
/// recently used connection no longer votes on the pool's order.
const SUSPECT_PASSES: u32 = 2;

/// All database connections' pool state. Bounded by the connection table: every
/// member leaves when its connection does.
#[derive(Default)]
pub struct PoolTracker {
    /// Pools and members not watched, and samples dropped, past their limits
    /// (`tracer_state_forgotten_total{table="pools"}`).
    pub forgotten: prometheus_client::metrics::counter::Counter,
    members: HashMap<u64, Member>,
    pools: HashMap<(u32, SocketAddr), PoolTrack>,
    /// Span of each connection's last call → its socket, until the span is settled.
    last_spans: HashMap<SpanId, u64>,
    samples: VecDeque<PoolSample>,
}

impl PoolTracker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn observe(&mut self, observation: DbObservation) {
        match observation {
            DbObservation::Joined {
                sock,
                pool,
                opened_ns,
                opened_by_kernel,
            } => self.join(sock, pool, opened_ns, opened_by_kernel),
            DbObservation::Rekeyed { from, to } => {
                if let Some(member) = self.leave(from) {
                    let pool = member.pool;
                    if let Some(span) = member.last_span {
                        self.last_spans.insert(span, to);
                    }
                    self.members.insert(to, member);
                    self.enlist(to, pool, None);
                }
            }
            DbObservation::Ready { sock, ts_ns } => {
                if let Some(m) = self.members.get(&sock) {
                    let sample = PoolSample {
                        pool: m.pool,
                        kind: PoolSampleKind::Create,
                        seconds: ts_ns.saturating_sub(m.opened_ns) as f64 / 1e9,
                    };
                    self.sample(sample);
                }
            }
            DbObservation::Used(u) => self.used(u),
            DbObservation::Left { sock } => {
                self.leave(sock);
            }
        }
    }

    fn join(&mut self, sock: u64, pool: PoolKey, opened_ns: u64, opened_by_kernel: bool) {
        self.leave(sock);
        self.members.insert(
            sock,
            Member {
                pool,
                opened_ns,
                in_use_since: None,
                in_flight: false,
                last_use_ns: opened_ns,
                passed_over: 0,
                last_span: None,
                last_trace: None,
            },
        );
        self.enlist(sock, pool, opened_by_kernel.then_some(opened_ns));
    }

    /// Adds a member to its pool's list (bounded), noting when it was seen opening.
    fn enlist(&mut self, sock: u64, pool: PoolKey, opened_ns: Option<u64>) {
        let key = (pool.pid, pool.server);
        if self.pools.len() >= MAX_POOLS && !self.pools.contains_key(&key) {
            self.forgotten.inc();
            return;
        }
        let track = self.pools.entry(key).or_default();
        if !track.members.contains(&sock) {
            if track.members.len() < MAX_POOL_MEMBERS {
                track.members.push(sock);
            } else {
                self.forgotten.inc();
            }
        }
        if let Some(at) = opened_ns {
            track.last_open_ns = track.last_open_ns.max(at);
        }
    }

    /// Takes a connection out of its pool.
    fn leave(&mut self, sock: u64) -> Option<Member> {
        let member = self.members.remove(&sock)?;
        if let Some(span) = member.last_span {
            self.last_spans.remove(&span);
        }
        let key = (member.pool.pid, member.pool.server);
        if let Some(track) = self.pools.get_mut(&key) {
            track.members.retain(|&m| m != sock);
            if track.members.is_empty() {
                self.pools.remove(&key);
            }
        }
        Some(member)
    }

    fn used(&mut self, u: DbUse) {
        let Some(m) = self.members.get_mut(&u.sock) else {
            return;
        };
        let mut borrowed = false;
        if u.request_started && m.in_use_since.is_none() {
            m.in_use_since = Some(u.ts_ns);
            borrowed = true;
        }
        m.in_flight = u.in_flight;
        let mut sample = None;
        if let Some(span) = u.completed {
            m.passed_over = 0;
            let old = m.last_span.replace(span);
            m.last_trace = None;
            if !u.in_flight && !u.in_transaction {
                // Given back: idle again.
                m.last_use_ns = u.ts_ns;
                if let Some(since) = m.in_use_since.take() {
                    sample = Some(PoolSample {
                        pool: m.pool,
                        kind: PoolSampleKind::Use,
                        seconds: u.ts_ns.saturating_sub(since) as f64 / 1e9,
                    });
                }
            }
            if let Some(old) = old {
                self.last_spans.remove(&old);
            }
            self.last_spans.insert(span, u.sock);
        }
        if let Some(s) = sample {
            self.sample(s);
        }
        if borrowed {
            self.borrow(u.sock);
        }
    }

    /// Connection `sock` was taken into use: learn the pool's order, and count the
    /// least recently used idle connection as passed over when another was taken.
    fn borrow(&mut self, sock: u64) {
        let Some(taken) = self.members.get(&sock) else {
            return;
        };
        let taken_last = taken.last_use_ns;
        let Some(pool) = self.pools.get_mut(&(taken.pool.pid, taken.pool.server)) else {
            return;
        };
        // The least recently used idle other: (sock, last use).
        let mut lru: Option<(u64, u64)> = None;
        let (mut older, mut newer) = (0u32, 0u32);
        for &m in &pool.members {
            if m == sock {
                continue;
            }
            let Some(other) = self.members.get(&m) else {
                continue;
            };
            if other.in_use_since.is_some() || other.in_flight {
                continue;
            }
            if lru.is_none_or(|(_, t)| other.last_use_ns < t) {
                lru = Some((m, other.last_use_ns));
            }
            if other.passed_over >= SUSPECT_PASSES {
                continue; // likely not in the pool at all: no vote
            }
            if other.last_use_ns < taken_last {
                older += 1;
            } else {
                newer += 1;
            }
        }
        if older + newer > 0 {
            if older == 0 {
                pool.fifo += 1; // took the least recently used
            } else if newer == 0 {
                pool.lifo += 1; // took the most recently used
            }
        }
        if let Some((m, last)) = lru
            && last < taken_last
            && let Some(other) = self.members.get_mut(&m)
        {
            other.passed_over = other.passed_over.saturating_add(1);
        }
    }

    fn sample(&mut self, sample: PoolSample) {
        if self.samples.len() >= MAX_POOL_SAMPLES {
            // Nobody drains them: keep the newest.
            self.samples.pop_front();
            self.forgotten.inc();
        }
        self.samples.push_back(sample);
    }

    /// Parent inference settled the trace of a span: if it is a connection's last
    /// call, the connection remembers it (leak reports name it).
    pub fn settled(&mut self, span: SpanId, trace: TraceId) {
        let Some(sock) = self.last_spans.remove(&span) else {
            return;
        };
        if let Some(m) = self.members.get_mut(&sock)
            && m.last_span == Some(span)
        {
            m.last_trace = Some(trace);
        }
    }

    /// Pool timing samples gathered since the last call.
    pub fn take_samples(&mut self) -> Vec<PoolSample> {
        std::mem::take(&mut self.samples).into()
    }

    pub fn member(&self, sock: u64) -> Option<&Member> {
        self.members.get(&sock)
    }

    /// How the pool of `key` picks its connections.
    pub fn order(&self, key: &PoolKey) -> Option<PoolOrder> {
        self.pools.get(&(key.pid, key.server)).map(|p| PoolOrder {
            fifo: p.fifo >= 3 && p.fifo >= 3 * p.lifo,
            last_open_ns: p.last_open_ns,
        })
    }

    /// Members of each pool, for tests.
    #[cfg(test)]
    pub fn pool_sizes(&self) -> Vec<usize> {
        self.pools.values().map(|p| p.members.len()).collect()
    }

    /// Database connections tracked.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}
