//! The connection table: every followed TCP connection, its role, its process and
//! its protocol state. Socket events go in; what the table sees goes out through one
//! seam, [`Observer`]: finished spans, what threads read and send (parent
//! inference's causality), and each database connection's life and use (the pool
//! tracker). The table keeps no state of those stages.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

// The hot maps are keyed by kernel addresses, pids and random span ids: a fast,
// randomly seeded hasher is enough.
use foldhash::{HashMap, HashMapExt};

use tracer_common::{conn::Role, data::Direction};

use crate::{
    capture::{DataRecord, Endpoints, Event, Meta},
    pools::{
        inventory::{ConnState, DbConnectionRow, PoolKey},
        tracker::{DbObservation, DbUse, PoolTracker},
    },
    process::{ProcessTable, Scheduling},
    protocols::{
        Chunk,
        db::{DbCall, DbDecoder, DbSystem, TxStatus},
        http1::{self, Http1Decoder, Http1Limits, Http1Message, MessageKind, StartLine},
    },
    recover::RecoveredSocket,
    spans::{AddrText, DbExchange, HttpExchange, Link, Span, SpanId, SpanKind, db_span, http_span},
    stitch::{
        causality::{Cause, Culprit, ThreadEvent},
        traceparent::{self, HeaderAt, HeaderUse, TraceParent},
    },
    telemetry::{DropReason, Telemetry},
};

mod db;
mod http;
mod tls_placement;

use db::DbConn;
use http::HttpConn;

/// What the table reports as it follows connections: the one seam between it and
/// the stages that keep state of their own. Statically dispatched: the table is
/// generic over it.
pub trait Observer {
    /// A span was built.
    fn span(&mut self, span: Span);
    /// A thread read or answered a request, or read the answer to a call.
    fn thread(&mut self, event: ThreadEvent<'_>);
    /// What a call that thread `tid` of `pid` sends at `ts_ns` on connection `conn`
    /// (its socket) is made for.
    fn cause(&mut self, pid: u32, tid: u32, ts_ns: u64, conn: u64) -> Cause;
    /// A request carrying `tp` was read, sent or answered: whether the header is
    /// its span's own or one forwarded unchanged.
    fn traceparent(&mut self, at: HeaderAt, tp: &TraceParent) -> HeaderUse;
    /// The server request `span` being served, as leak reports name it.
    fn culprit(&mut self, span: SpanId) -> Option<Culprit>;
    /// A database client connection's life and use.
    fn db(&mut self, observation: DbObservation);
    /// What the kernel knows of socket `sock` (endpoints, role), for a connection
    /// whose open event was lost. None where there is no kernel (replays).
    fn kernel_socket(&mut self, _sock: u64) -> Option<(Endpoints, Role)> {
        None
    }
}

/// A socket user space stopped decoding, with the ports that identify its
/// connection: the kernel may have reused the socket's address for another one by
/// the time it is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotDecoded {
    pub sock: u64,
    pub local_port: u16,
    pub remote_port: u16,
}

/// The decoders' global byte budget by default: 16,384 HTTP heads of 16 KiB
/// spanning reads (slowloris), or a thousand PostgreSQL connections' statement maps.
pub const DEFAULT_MAX_HELD_BYTES: usize = 256 << 20;

/// A connection's share of the bytes the table's decoders hold (what the global
/// budget counts), given back when the connection goes, however it goes.
struct Held {
    total: Arc<AtomicUsize>,
    mine: usize,
}

impl Held {
    /// Sets the connection's share to `bytes`; returns the table's new total.
    fn set(&mut self, bytes: usize) -> usize {
        let total = if bytes >= self.mine {
            self.total.fetch_add(bytes - self.mine, Ordering::Relaxed) + (bytes - self.mine)
        } else {
            self.total.fetch_sub(self.mine - bytes, Ordering::Relaxed) - (self.mine - bytes)
        };
        self.mine = bytes;
        total
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.total.fetch_sub(self.mine, Ordering::Relaxed);
    }
}

/// Limits of the connection table.
#[derive(Clone, Debug)]
pub struct TableLimits {
    /// Connections tracked at once; the least recently used is evicted beyond it.
    pub max_connections: usize,
    /// Requests waiting for their response on one connection (pipelining depth).
    pub max_pending_requests: usize,
    /// Bytes all connections' decoders may hold between chunks at once (heads
    /// spanning reads, statement texts, kept prefixes: the data held, not the
    /// capacity an idle connection keeps for reuse, which `max_connections`
    /// bounds); beyond it a connection whose decoder grows is no longer decoded.
    pub max_held_bytes: usize,
}

impl Default for TableLimits {
    fn default() -> Self {
        Self {
            max_connections: tracer_common::MAX_SOCKETS as usize,
            max_pending_requests: 64,
            max_held_bytes: DEFAULT_MAX_HELD_BYTES,
        }
    }
}

/// How spans are built.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpanOptions {
    /// Keep SQL literals in `db.query.text` (off by default: they may be secrets).
    pub keep_sql_literals: bool,
}

/// What a connection speaks, as far as we know.
enum Protocol {
    /// Not known yet: the first bytes, kept until they are enough to tell.
    Unknown(Probe),
    Http1(Box<HttpConn>),
    Db(Box<DbConn>),
    /// Not a protocol we decode (or the server end of a database connection): its
    /// traffic is ignored.
    Other,
    /// A TLS handshake: ciphertext, until the TLS probes bring the plaintext
    /// (the connection then starts over as `Unknown`). A process whose TLS library
    /// is not probed never brings any: past [`MAX_CIPHERTEXT_RECORDS`] records
    /// the connection is `Other`, counted as `encrypted`.
    Encrypted {
        records: u32,
    },
}

/// Ciphertext records a TLS connection may have before its plaintext shows (a
/// handshake is a few in each direction).
pub(super) const MAX_CIPHERTEXT_RECORDS: u32 = 32;

/// True when `bytes` begin a TLS record that starts a connection: a handshake
/// (ClientHello, ServerHello) of SSL 3.0 to TLS 1.3, with a plausible length.
fn looks_like_tls_handshake(bytes: &[u8]) -> bool {
    match bytes {
        [0x16, 0x03, minor, hi, lo, ..] => {
            let len = u16::from_be_bytes([*hi, *lo]);
            *minor <= 0x04 && len > 0 && len <= 16_384 + 2_048
        }
        _ => false,
    }
}

/// A connection's first records are kept while they hold fewer bytes than this in
/// one direction: clients and servers split their writes and reads as they like (a
/// MySQL client reads a packet's 4-byte header, then its payload), and a protocol is
/// told from its first bytes, not from its first syscall.
const PROBE_BYTES: usize = 16;
/// At most this many records are kept for that.
const PROBE_RECORDS: usize = 8;
/// Leading bytes the protocol is told from.
const MAX_PROBE_PREFIX: usize = 128;

/// The first records of a connection whose protocol is not known yet.
#[derive(Default)]
struct Probe {
    records: Vec<DataRecord>,
    bytes: usize,
    /// Times a connection met mid-stream let received bytes go by undecided,
    /// waiting for its own next request (see [`MID_STREAM_WAITS`]).
    waits: u8,
}

/// A connection met mid-stream (opened before the agent) whose first bytes are
/// received rather than sent may be a database client reading the answer to a
/// request sent before the agent started: its protocol is told from what it sends
/// next, this many times at most.
const MID_STREAM_WAITS: u8 = 4;

impl Probe {
    /// Whether `rec` is kept rather than deciding: it continues the first
    /// direction's stream, fully captured, and the bytes are still too few.
    fn holds(&self, rec: &DataRecord) -> bool {
        let direction = self.records.first().map_or(rec.direction, |r| r.direction);
        rec.direction == direction
            && rec.payload.len() == rec.total_len as usize
            && self.bytes + rec.payload.len() < PROBE_BYTES
            && self.records.len() + 1 < PROBE_RECORDS
            && may_begin_a_protocol(
                self.records
                    .first()
                    .map_or(&rec.payload[..], |r| &r.payload[..]),
                direction == Direction::Send,
            )
    }

    /// Keeps a copy of `rec` (not a view of its batch's buffer).
    fn keep(&mut self, rec: &DataRecord) {
        let mut copy = rec.clone();
        copy.payload = bytes::Bytes::copy_from_slice(&rec.payload);
        self.bytes += copy.payload.len();
        self.records.push(copy);
    }
}

/// Whether a stream whose first bytes are `first` (sent by the local end, or
/// received) could still turn out to be one we decode, so that waiting for more is
/// worth it: an HTTP start line (a method or `HTTP/`: letters), a Redis command
/// (`*` or an inline command's letters), a PostgreSQL startup packet (a length under
/// 16 MiB: a zero first byte), a MySQL greeting (a length under 64 KiB and sequence
/// id 0).
fn may_begin_a_protocol(first: &[u8], sent: bool) -> bool {
    let Some(&b0) = first.first() else {
        return true;
    };
    if b0.is_ascii_alphabetic() {
        return true;
    }
    if sent {
        b0 == b'*' || b0 == 0
    } else {
        first.get(2).is_none_or(|&b| b == 0) && first.get(3).is_none_or(|&b| b == 0)
    }
}

/// How long a closed HTTP connection still takes the records reported after its
/// close.
const CLOSE_GRACE_NS: u64 = 100_000_000;
/// When no event comes, closed connections are closed by the clock this much later.
const IDLE_CLOSE_NS: u64 = 1_000_000_000;
/// Closed connections kept for that at most (the oldest are closed first).
const MAX_CLOSING: usize = 4096;

/// Sockets no longer decoded kept for the kernel when nobody takes them.
const MAX_NOT_DECODED: usize = 65536;

/// One followed TCP connection.
pub struct Connection {
    /// Kernel socket address: the table's key.
    sock: u64,
    pub endpoints: Endpoints,
    pub role: Role,
    /// Last process that did I/O on it.
    pub pid: u32,
    pub comm: crate::capture::Comm,
    pub opened_ns: u64,
    pub last_io_ns: u64,
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    /// The kernel saw this connection being connected or accepted (not adopted).
    role_from_kernel: bool,
    /// Found in /proc at start-up, before any of its traffic; its socket inode.
    recovered: bool,
    inode: u64,
    protocol: Protocol,
    /// The endpoints' addresses as text, made at the first span.
    addr_text: Option<AddrText>,
    /// The connection's first FIN, when the kernel reported it: whether the peer
    /// sent it, and when.
    ending: Option<(bool, u64)>,
    /// When the kernel reported it closed (0: not reported).
    closed_ns: u64,
    /// Bytes its decoders hold, in the table's budget.
    held: Held,
    /// Its plaintext comes from the TLS probes (the socket's own records are
    /// ciphertext, and ignored).
    tls: bool,
}

/// All followed connections, keyed by kernel socket address.
pub struct ConnectionTable {
    conns: HashMap<u64, Connection>,
    /// What the table knew of connections it evicted (full), for when one of them
    /// comes back: sock → endpoints, role, and its database if it was a client of
    /// one. At most a quarter of `max_connections` (64 at least); cleared when full.
    evicted: HashMap<u64, (Endpoints, Role, Option<DbSystem>)>,
    /// Connections recovered from /proc and not seen by the kernel yet: their
    /// (local, remote) → the key they are kept under until then.
    recovered: HashMap<(SocketAddr, SocketAddr), u64>,
    /// Sockets no longer decoded, for the kernel to skip.
    not_decoded: Vec<NotDecoded>,
    /// TLS plaintext read behind memory BIOs, placed on its connections.
    tls_placement: tls_placement::TlsPlacement,
    /// HTTP connections the kernel reported closed, kept [`CLOSE_GRACE_NS`] for
    /// the records it reports after the close (the last send of a socket reset by
    /// its peer is reported after the reset), then closed: sock → (due, connection).
    closing: HashMap<u64, (u64, Connection)>,
    /// `closing` in the order their grace ends: (due, sock).
    closing_order: VecDeque<(u64, u64)>,
    /// The newest event time seen (Unix ns): the clock closed connections expire by.
    latest_ns: u64,
    limits: TableLimits,
    options: SpanOptions,
    http_limits: Http1Limits,
    /// Bytes all connections' decoders hold (see [`TableLimits::max_held_bytes`]).
    held: Arc<AtomicUsize>,
    scratch: Scratch,
}

/// Everything a connection needs from the table to turn messages into spans.
struct Ctx<'a, O: Observer> {
    procs: &'a mut ProcessTable,
    telemetry: &'a Telemetry,
    options: SpanOptions,
    http_limits: Http1Limits,
    max_pending: usize,
    out: &'a mut O,
    /// Decoded messages between a decoder and the connection that reads them:
    /// one for the whole table, not one per connection.
    scratch: &'a mut Scratch,
}

/// Buffers decoders fill with the messages of one chunk, emptied before the
/// next. Shared by every connection: an idle connection holds none.
#[derive(Default)]
struct Scratch {
    http: Vec<Http1Message>,
    db: Vec<DbCall>,
}

impl<O: Observer> Ctx<'_, O> {
    /// What the call a thread sends now is made for. A process whose runtime moves
    /// work between threads (Go, tokio) is reported first, so that no thread or
    /// timing rule is applied to it.
    fn cause(&mut self, rec: &DataRecord, ts_ns: u64, sock: u64) -> Cause {
        let pid = rec.meta.tgid;
        if let Scheduling::MovesWork(runtime) = self.procs.scheduling(pid) {
            self.out.thread(ThreadEvent::MovesWork { pid, runtime });
        }
        self.out.cause(pid, rec.meta.tid, ts_ns, sock)
    }
}

impl ConnectionTable {
    pub fn new(limits: TableLimits) -> Self {
        Self::with_options(limits, SpanOptions::default())
    }

    pub fn with_options(limits: TableLimits, options: SpanOptions) -> Self {
        Self {
            conns: HashMap::new(),
            evicted: HashMap::new(),
            recovered: HashMap::new(),
            not_decoded: Vec::new(),
            tls_placement: tls_placement::TlsPlacement::new(),
            closing: HashMap::new(),
            closing_order: VecDeque::new(),
            latest_ns: 0,
            limits,
            options,
            http_limits: Http1Limits::default(),
            held: Arc::default(),
            scratch: Scratch::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Bytes all connections' decoders hold between chunks (the budget's count).
    pub fn held_bytes(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn get(&self, sock: u64) -> Option<&Connection> {
        self.conns.get(&sock)
    }

    /// One row per database client connection, for `/connections` and `conns`:
    /// what the table knows of it, with what `pools` tracks of it.
    pub fn db_inventory(
        &self,
        now_ns: u64,
        procs: &mut ProcessTable,
        pools: &PoolTracker,
    ) -> Vec<DbConnectionRow> {
        let mut rows: Vec<DbConnectionRow> = self
            .conns
            .values()
            .filter_map(|c| {
                let Protocol::Db(db) = &c.protocol else {
                    return None;
                };
                let tx = db.decoder.tx_status();
                let member = pools.member(c.sock);
                let pool = member.map_or_else(|| c.pool_key(db), |m| m.pool);
                let order = pools.order(&pool);
                let resource = procs.get(c.pid, &c.comm);
                let (last_query, last_span_id, last_call_ns) = match &db.last_call {
                    Some((q, s, at)) => (q.clone(), Some(s.to_string()), *at),
                    None => (None, None, c.opened_ns),
                };
                Some(DbConnectionRow {
                    pool,
                    executable: resource.executable_name.clone(),
                    service: resource.service_name.clone(),
                    service_namespace: resource.service_namespace.clone(),
                    service_instance_id: resource.service_instance_id.clone(),
                    k8s: crate::pools::inventory::K8sOfRow::of(&resource),
                    namespace: db.decoder.namespace().map(str::to_string),
                    client_port: c.endpoints.local.port(),
                    state: if db.decoder.in_flight() || tx.in_transaction() {
                        ConnState::Used
                    } else {
                        ConnState::Idle
                    },
                    tx_status: tx,
                    idle_seconds: now_ns.saturating_sub(c.last_io_ns.max(last_call_ns)) as f64
                        / 1e9,
                    open_seconds: now_ns.saturating_sub(c.opened_ns) as f64 / 1e9,
                    last_query,
                    last_span_id,
                    last_trace_id: member.and_then(|m| m.last_trace).map(|t| t.to_string()),
                    culprit: db.last_culprit.clone(),
                    recovered: c.recovered,
                    passed_over: member.map_or(0, |m| m.passed_over),
                    pool_fifo: order.is_some_and(|o| o.fifo),
                    newer_in_pool: member
                        .zip(order)
                        .is_some_and(|(m, o)| o.last_open_ns > m.last_use_ns),
                    leak: None,
                })
            })
            .collect();
        rows.sort_by_key(|r| (r.pool.pid, r.pool.server, r.client_port));
        rows
    }

    /// What connections need of the table and its caller to make spans.
    fn ctx<'a, O: Observer>(
        &self,
        procs: &'a mut ProcessTable,
        telemetry: &'a Telemetry,
        out: &'a mut O,
        scratch: &'a mut Scratch,
    ) -> Ctx<'a, O> {
        Ctx {
            procs,
            telemetry,
            options: self.options,
            http_limits: self.http_limits.clone(),
            max_pending: self.limits.max_pending_requests,
            out,
            scratch,
        }
    }

    /// Handles one event from the kernel.
    pub fn handle(
        &mut self,
        event: Event,
        procs: &mut ProcessTable,
        telemetry: &Telemetry,
        out: &mut impl Observer,
    ) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut ctx = self.ctx(procs, telemetry, out, &mut scratch);
        self.handle_in(event, &mut ctx);
        self.scratch = scratch;
    }

    fn handle_in<O: Observer>(&mut self, event: Event, ctx: &mut Ctx<'_, O>) {
        self.latest_ns = self.latest_ns.max(event.meta().ts_ns);
        if self
            .closing_order
            .front()
            .is_some_and(|&(due, _)| due <= self.latest_ns)
        {
            self.expire_closing_at(self.latest_ns, ctx);
        }
        match event {
            Event::ConnOpen {
                meta,
                endpoints,
                role,
            } => {
                if let Some((_, old)) = self.closing.remove(&meta.sock) {
                    old.close(ctx);
                }
                if let Some(old) = self.remove(meta.sock, ctx.out) {
                    // The kernel reused the socket address: the old connection is over.
                    old.close(ctx);
                }
                self.evicted.remove(&meta.sock);
                if let Some(key) = self.recovered.remove(&(endpoints.local, endpoints.remote))
                    && let Some(mut conn) = self.conns.remove(&key)
                {
                    // A connection recovered from /proc does its first I/O under our
                    // watch: from now on it is known by its socket.
                    conn.sock = meta.sock;
                    if matches!(conn.protocol, Protocol::Db(_)) {
                        ctx.out.db(DbObservation::Rekeyed {
                            from: key,
                            to: meta.sock,
                        });
                    }
                    self.conns.insert(meta.sock, conn);
                } else {
                    self.make_room(ctx);
                    self.conns.insert(
                        meta.sock,
                        Connection::new(&meta, endpoints, role, &self.held),
                    );
                }
            }
            Event::Data(rec) => self.data(rec, ctx),
            Event::ConnClose { meta, .. } => {
                self.evicted.remove(&meta.sock);
                self.tls_placement.forget_sock(meta.sock);
                if let Some(mut conn) = self.remove(meta.sock, ctx.out) {
                    conn.closed_ns = meta.ts_ns;
                    if matches!(conn.protocol, Protocol::Http1(_)) {
                        while self.closing.len() >= MAX_CLOSING {
                            // Full: the oldest closes now.
                            let Some((due, sock)) = self.closing_order.pop_front() else {
                                break;
                            };
                            if self.closing.get(&sock).is_some_and(|(d, _)| *d == due)
                                && let Some((_, old)) = self.closing.remove(&sock)
                            {
                                old.close(ctx);
                            }
                        }
                        let due = meta.ts_ns + CLOSE_GRACE_NS;
                        self.closing.insert(meta.sock, (due, conn));
                        self.closing_order.push_back((due, meta.sock));
                    } else {
                        conn.close(ctx);
                    }
                }
            }
            Event::ConnEnding { meta, by_peer } => {
                self.tls_placement.forget_sock(meta.sock);
                if let Some(conn) = self.conns.get_mut(&meta.sock)
                    && conn.ending.is_none()
                {
                    conn.ending = Some((by_peer, meta.ts_ns));
                }
            }
            Event::ProcExit { meta } => {
                ctx.procs.exited(meta.tgid);
                ctx.out
                    .thread(ThreadEvent::ProcessExited { pid: meta.tgid });
            }
            // For the TLS probes' attacher, which sees it in the capture.
            Event::LibsLoaded { .. } => {}
        }
    }

    /// Adds connections that were open before the agent started (found in /proc).
    /// A client connection to a well-known database port gets that database's
    /// decoder, joining its stream wherever the next bytes start; any other
    /// connection learns its protocol from its first traffic. Their idle time
    /// counts from `now_ns`.
    pub fn recover(
        &mut self,
        sockets: &[RecoveredSocket],
        now_ns: u64,
        out: &mut impl Observer,
    ) -> usize {
        let mut added = 0;
        for (i, r) in sockets.iter().enumerate() {
            if self.conns.len() >= self.limits.max_connections {
                break;
            }
            // Kernel socket addresses are kernel pointers (high half): a key with
            // the top bit clear can never collide with one.
            let key = (1u64 << 62) | i as u64;
            let meta = Meta {
                ts_ns: now_ns,
                tgid: r.pid,
                tid: r.pid,
                sock: key,
                comm: r.comm.as_str().into(),
            };
            let endpoints = Endpoints {
                local: r.local,
                remote: r.remote,
            };
            let mut conn = Connection::new(&meta, endpoints, r.role, &self.held);
            conn.role_from_kernel = false;
            conn.recovered = true;
            conn.inode = r.inode;
            if r.role == Role::Client
                && let Some(decoder) = DbDecoder::guess_by_port(r.remote.port())
            {
                let db = DbConn::new(decoder, r.pid, true);
                out.db(DbObservation::Joined {
                    sock: key,
                    pool: conn.pool_key(&db),
                    opened_ns: now_ns,
                    opened_by_kernel: false,
                });
                conn.protocol = Protocol::Db(Box::new(db));
            }
            self.conns.insert(key, conn);
            self.recovered.insert((r.local, r.remote), key);
            added += 1;
        }
        added
    }

    /// Database connections without I/O since `idle_before_ns` (Unix ns), as
    /// (socket, pid, endpoints): the candidates for a leak report, which the
    /// pipeline checks are still open (their close may have been lost).
    pub fn idle_db_connections(&self, idle_before_ns: u64) -> Vec<(u64, u32, Endpoints)> {
        self.conns
            .values()
            .filter(|c| matches!(c.protocol, Protocol::Db(_)) && c.last_io_ns < idle_before_ns)
            .map(|c| (c.sock, c.pid, c.endpoints))
            .collect()
    }

    /// Takes out a connection that is gone although the kernel never reported its
    /// close (the event was lost): out of its pool too, so that it is never
    /// reported as leaked. Returns whether it was there.
    pub fn forget_closed(&mut self, sock: u64, out: &mut impl Observer) -> bool {
        self.recovered.retain(|_, k| *k != sock);
        self.remove(sock, out).is_some()
    }

    /// Recovered connections not seen by the kernel yet, as (pid, socket inode),
    /// so their owner can check they are still open.
    pub fn recovered_sockets(&self) -> Vec<(u32, u64)> {
        self.recovered
            .values()
            .filter_map(|k| self.conns.get(k).map(|c| (c.pid, c.inode)))
            .collect()
    }

    /// Forgets recovered connections that were closed without the kernel seeing
    /// them (they never did I/O under our watch).
    pub fn prune_recovered(&mut self, open: impl Fn(u32, u64) -> bool, out: &mut impl Observer) {
        let gone: Vec<((SocketAddr, SocketAddr), u64)> = self
            .recovered
            .iter()
            .filter(|(_, k)| self.conns.get(k).is_none_or(|c| !open(c.pid, c.inode)))
            .map(|(e, k)| (*e, *k))
            .collect();
        for (ends, key) in gone {
            self.recovered.remove(&ends);
            self.remove(key, out);
        }
    }

    /// Takes a connection out of the table (and, through `out`, out of its pool).
    fn remove(&mut self, sock: u64, out: &mut impl Observer) -> Option<Connection> {
        let conn = self.conns.remove(&sock)?;
        if matches!(conn.protocol, Protocol::Db(_)) {
            out.db(DbObservation::Left { sock });
        }
        Some(conn)
    }

    /// When the table is full, evicts the least recently used 1/64 of it at once
    /// (one pass over the table per 1/64 of its size in new connections, not one
    /// per connection), other connections before database clients (whose pools
    /// and leak tracking an eviction would cut). What it knew of each is kept for
    /// when one comes back (see [`ConnectionTable::evicted`]).
    fn make_room<O: Observer>(&mut self, ctx: &mut Ctx<'_, O>) {
        if self.conns.len() < self.limits.max_connections {
            return;
        }
        let batch = (self.limits.max_connections / 64).max(1);
        let mut order: Vec<(bool, u64, u64)> = self
            .conns
            .values()
            .map(|c| (matches!(c.protocol, Protocol::Db(_)), c.last_io_ns, c.sock))
            .collect();
        if order.len() > batch {
            order.select_nth_unstable(batch - 1);
            order.truncate(batch);
        }
        if self.evicted.len() + order.len() > (self.limits.max_connections / 4).max(64) {
            ctx.telemetry
                .forgotten_in("evicted_connections")
                .inc_by(self.evicted.len() as u64);
            self.evicted.clear();
        }
        for (_, _, sock) in order {
            if let Some(conn) = self.remove(sock, ctx.out) {
                ctx.telemetry.connections_evicted.inc();
                let db = conn.db_system().filter(|_| conn.role == Role::Client);
                self.evicted.insert(sock, (conn.endpoints, conn.role, db));
                conn.close(ctx);
            }
        }
        log::debug!(
            "connection table full ({}): evicted the {batch} least recently used",
            self.limits.max_connections
        );
    }

    /// Closes the connections closed before `now_ns` (Unix ns) less the grace.
    fn expire_closing_at<O: Observer>(&mut self, now_ns: u64, ctx: &mut Ctx<'_, O>) {
        while let Some(&(due, sock)) = self.closing_order.front() {
            if due > now_ns {
                break;
            }
            self.closing_order.pop_front();
            // Gone already (its address was reused) or closed again later.
            if self.closing.get(&sock).is_some_and(|(d, _)| *d == due)
                && let Some((_, conn)) = self.closing.remove(&sock)
            {
                conn.close(ctx);
            }
        }
        if self.closing.is_empty() {
            self.closing_order.clear();
        }
    }

    /// Closes the closed connections whose grace has passed by the events seen, or
    /// by `now_ns` less [`IDLE_CLOSE_NS`] when events stopped coming (every one with
    /// `u64::MAX`, at shutdown). For the pipeline's clock tick: events that wait in
    /// its queue do not see their connection closed under them.
    pub fn expire_closing(
        &mut self,
        now_ns: u64,
        procs: &mut ProcessTable,
        telemetry: &Telemetry,
        out: &mut impl Observer,
    ) {
        if self.closing_order.is_empty() {
            return;
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut ctx = self.ctx(procs, telemetry, out, &mut scratch);
        let by = if now_ns == u64::MAX {
            u64::MAX
        } else {
            self.latest_ns.max(now_ns.saturating_sub(IDLE_CLOSE_NS))
        };
        self.expire_closing_at(by, &mut ctx);
        self.scratch = scratch;
    }

    fn data<O: Observer>(&mut self, rec: DataRecord, ctx: &mut Ctx<'_, O>) {
        use tracer_common::data::flags;
        if rec.flags & flags::TLS_UNBOUND != 0 {
            let placed = self.tls_placement.plaintext(rec);
            self.place(placed, ctx);
            return;
        }
        if rec.flags & flags::TLS == 0 && tls_placement::is_tls_record(&rec.payload) {
            // Ciphertext: it may place plaintext waiting for it, before itself.
            let placed = self.tls_placement.ciphertext(&rec);
            self.place(placed, ctx);
        }
        if !self.closing.is_empty()
            && let Some((due, conn)) = self.closing.remove(&rec.meta.sock)
        {
            // Reported after its close: still its own.
            let sock = rec.meta.sock;
            self.conns.insert(sock, conn);
            self.data_on_known(rec, ctx);
            if let Some(conn) = self.conns.remove(&sock) {
                self.closing.insert(conn.sock, (due, conn));
            }
            return;
        }
        self.data_on_known(rec, ctx);
    }

    /// Plaintext placed on its connection by [`tls_placement::TlsPlacement`].
    fn place<O: Observer>(&mut self, placed: tls_placement::Placed, ctx: &mut Ctx<'_, O>) {
        if placed.dropped > 0 {
            ctx.telemetry
                .dropped_n(DropReason::TlsUnplaced, placed.dropped);
        }
        let forgotten = std::mem::take(&mut self.tls_placement.forgotten);
        if forgotten > 0 {
            ctx.telemetry
                .forgotten_in("tls_placement")
                .inc_by(forgotten);
        }
        for rec in placed.records {
            self.data(rec, ctx);
        }
    }

    fn data_on_known<O: Observer>(&mut self, rec: DataRecord, ctx: &mut Ctx<'_, O>) {
        if !self.conns.contains_key(&rec.meta.sock) {
            let known = self.evicted.remove(&rec.meta.sock);
            let conn = match known {
                // Evicted when the table was full: back with what it was.
                Some((endpoints, role, db)) => {
                    let mut conn = Connection::new(&rec.meta, endpoints, role, &self.held);
                    if let Some(system) = db {
                        let db = DbConn::new(DbDecoder::mid_stream(system), rec.meta.tid, true);
                        ctx.out.db(DbObservation::Joined {
                            sock: rec.meta.sock,
                            pool: conn.pool_key(&db),
                            opened_ns: rec.meta.ts_ns,
                            opened_by_kernel: false,
                        });
                        conn.protocol = Protocol::Db(Box::new(db));
                    }
                    conn
                }
                None => {
                    // Its open event was lost (ring buffer full), or this is a late
                    // record of a connection closed already.
                    ctx.telemetry.dropped(DropReason::ConnectionOpenMissed);
                    // The kernel still follows it: its socket map knows its
                    // endpoints and role. Otherwise (closed, or gone) it is not
                    // followed: it would give spans made-up addresses, share one pool
                    // with every other such connection, and never see its close.
                    let Some((endpoints, role)) = ctx.out.kernel_socket(rec.meta.sock) else {
                        return;
                    };
                    let mut conn = Connection::new(&rec.meta, endpoints, role, &self.held);
                    // Its first bytes may have been lost with its open.
                    conn.role_from_kernel = false;
                    conn
                }
            };
            // Room is made only for a connection that is followed.
            self.make_room(ctx);
            self.conns.insert(rec.meta.sock, conn);
        }
        let Some(conn) = self.conns.get_mut(&rec.meta.sock) else {
            return;
        };
        conn.pid = rec.meta.tgid;
        let was_other = matches!(conn.protocol, Protocol::Other);
        if !rec.meta.comm.is_empty() {
            conn.comm = rec.meta.comm;
        }
        if rec.total_len == 0 {
            // Not a use of the connection: only its end.
            conn.end_of_stream(&rec, ctx);
            return;
        }
        if rec.flags & tracer_common::data::flags::TLS != 0 {
            if !conn.tls {
                conn.begin_plaintext();
            }
        } else if conn.tls {
            // Ciphertext outside the TLS library's reads and writes (the
            // handshake's end, alerts): its plaintext, if any, came from the probes.
            return;
        }
        conn.last_io_ns = rec.meta.ts_ns;
        match rec.direction {
            Direction::Send => conn.bytes_sent += u64::from(rec.total_len),
            Direction::Recv => conn.bytes_recv += u64::from(rec.total_len),
        }
        if let Protocol::Unknown(probe) = &mut conn.protocol {
            if probe.holds(&rec) {
                probe.keep(&rec);
                return;
            }
            let held = std::mem::take(&mut probe.records);
            conn.settle(&held, Some(&rec), ctx);
            for earlier in &held {
                conn.decode(earlier, ctx);
            }
        }
        conn.decode(&rec, ctx);
        let held = conn.held_bytes();
        let grew = held > conn.held.mine;
        if conn.held.set(held) > self.limits.max_held_bytes && grew {
            conn.shed(ctx);
        }
        let now_other = matches!(
            self.conns.get(&rec.meta.sock).map(|c| &c.protocol),
            Some(Protocol::Other)
        );
        // Kernel sockets have kernel (high half) addresses; recovered ones do not.
        if now_other && !was_other && rec.meta.sock >> 63 == 1 {
            if self.not_decoded.len() >= MAX_NOT_DECODED {
                self.not_decoded.remove(0);
            }
            let ends = self.conns.get(&rec.meta.sock).map(|c| c.endpoints);
            if let Some(ends) = ends {
                self.not_decoded.push(NotDecoded {
                    sock: rec.meta.sock,
                    local_port: ends.local.port(),
                    remote_port: ends.remote.port(),
                });
            }
        }
    }

    /// Sockets that user space stopped decoding since the last call (unknown
    /// protocol, a database server's end, a tunnel, encryption): the kernel can
    /// skip their I/O from now on.
    pub fn take_not_decoded(&mut self) -> Vec<NotDecoded> {
        std::mem::take(&mut self.not_decoded)
    }
}

impl Connection {
    fn new(meta: &Meta, endpoints: Endpoints, role: Role, held: &Arc<AtomicUsize>) -> Self {
        Self {
            sock: meta.sock,
            endpoints,
            role,
            pid: meta.tgid,
            comm: meta.comm,
            opened_ns: meta.ts_ns,
            last_io_ns: meta.ts_ns,
            bytes_sent: 0,
            bytes_recv: 0,
            role_from_kernel: role != Role::Unknown,
            recovered: false,
            inode: 0,
            protocol: Protocol::Unknown(Probe::default()),
            addr_text: None,
            ending: None,
            closed_ns: 0,
            held: Held {
                total: held.clone(),
                mine: 0,
            },
            tls: false,
        }
    }

    /// The database this connection talks to, when it is a database client.
    pub fn db_system(&self) -> Option<DbSystem> {
        match &self.protocol {
            Protocol::Db(db) => Some(db.decoder.system()),
            _ => None,
        }
    }

    /// `db.namespace` of a database client connection, when known.
    pub fn db_namespace(&self) -> Option<&str> {
        match &self.protocol {
            Protocol::Db(db) => db.decoder.namespace(),
            _ => None,
        }
    }

    /// Transaction status of a database client connection.
    pub fn tx_status(&self) -> Option<TxStatus> {
        match &self.protocol {
            Protocol::Db(db) => Some(db.decoder.tx_status()),
            _ => None,
        }
    }

    /// Decodes one record of a connection whose protocol is known.
    fn decode<O: Observer>(&mut self, rec: &DataRecord, ctx: &mut Ctx<'_, O>) {
        let chunk = Chunk {
            bytes: &rec.payload,
            len: (rec.total_len as usize).max(rec.payload.len()),
            ts_ns: rec.meta.ts_ns,
        };
        match &mut self.protocol {
            Protocol::Http1(_) => self.http_data(rec, &chunk, ctx),
            Protocol::Db(_) => self.db_data(rec, &chunk, ctx),
            Protocol::Encrypted { records } => {
                *records += 1;
                if *records > MAX_CIPHERTEXT_RECORDS {
                    // Its process's TLS library is not one the probes know.
                    self.protocol = Protocol::Other;
                    ctx.telemetry.dropped(DropReason::Encrypted);
                }
            }
            Protocol::Unknown(_) | Protocol::Other => {}
        }
    }

    /// The TLS probes brought this connection's first plaintext: what came before
    /// was ciphertext (a handshake), and the protocol is learned from the
    /// plaintext, as if the connection had just opened.
    /// A database session that asked for TLS (PostgreSQL's SSLRequest, MySQL's)
    /// keeps its decoder and its place in its pool: decoding resumes inside TLS.
    fn begin_plaintext(&mut self) {
        self.tls = true;
        match &mut self.protocol {
            Protocol::Db(db) => {
                db.decoder.resume_in_plaintext();
                db.ciphertext_records = 0;
            }
            Protocol::Unknown(_) | Protocol::Encrypted { .. } | Protocol::Other => {
                self.bytes_sent = 0;
                self.bytes_recv = 0;
                self.protocol = Protocol::Unknown(Probe::default());
            }
            Protocol::Http1(_) => {}
        }
    }

    /// Decides the protocol from the records `held` so far and `next` (the record
    /// that ended the wait; `None` when the connection closes), and reports it.
    fn settle<O: Observer>(
        &mut self,
        held: &[DataRecord],
        next: Option<&DataRecord>,
        ctx: &mut Ctx<'_, O>,
    ) {
        let Some(first) = held.first().or(next) else {
            return;
        };
        let mut prefix = Vec::with_capacity(PROBE_BYTES);
        let seen: u64 = held
            .iter()
            .chain(next)
            .map(|r| u64::from(r.total_len))
            .sum();
        // The bytes moved in the first direction before it turned.
        let run = held
            .iter()
            .chain(next)
            .take_while(|r| r.direction == first.direction)
            .map(|r| r.total_len as usize)
            .sum();
        // The leading bytes of the first direction's stream, as far as they were
        // captured without a gap.
        for rec in held.iter().chain(next) {
            if rec.direction != first.direction || prefix.len() >= MAX_PROBE_PREFIX {
                break;
            }
            let room = MAX_PROBE_PREFIX - prefix.len();
            prefix.extend_from_slice(rec.payload.get(..room).unwrap_or(&rec.payload));
            if rec.payload.len() < rec.total_len as usize {
                break;
            }
        }
        self.detect(first, &prefix, seen, run, &ctx.http_limits);
        if matches!(self.protocol, Protocol::Other) {
            ctx.telemetry.dropped(DropReason::UnknownProtocol);
        }
        if let Protocol::Db(db) = &self.protocol {
            ctx.out.db(DbObservation::Joined {
                sock: self.sock,
                pool: self.pool_key(db),
                opened_ns: self.opened_ns,
                opened_by_kernel: self.role_from_kernel,
            });
        }
    }

    /// Learns the protocol (and, for sockets the kernel did not see connect or
    /// accept, the role) from the leading bytes `bytes` of the stream `rec` began
    /// (`run` bytes in that direction before it turned), `seen` bytes having been
    /// moved on the connection so far.
    fn detect(
        &mut self,
        rec: &DataRecord,
        bytes: &[u8],
        seen: u64,
        run: usize,
        limits: &Http1Limits,
    ) {
        if bytes.is_empty() {
            return; // nothing captured to tell from: the next record will
        }
        if !self.tls && looks_like_tls_handshake(bytes) {
            self.protocol = Protocol::Encrypted { records: 0 };
            return;
        }
        let sent = rec.direction == Direction::Send;
        // A connection the kernel did not see open (opened before the agent) can be
        // a database session in its middle, on any port: its client's requests tell.
        let mid_stream = !self.role_from_kernel && self.role != Role::Server;
        let db = DbDecoder::detect(bytes, sent)
            .or_else(|| mid_stream.then(|| DbDecoder::detect_mid_stream(bytes, run, sent))?);
        if let Some(decoder) = db {
            // We spoke first to a database (or it greeted us): we are its client.
            if self.role == Role::Unknown {
                self.role = Role::Client;
            }
            self.protocol = if self.role == Role::Client {
                Protocol::Db(Box::new(DbConn::new(
                    decoder,
                    rec.meta.tid,
                    !self.role_from_kernel,
                )))
            } else {
                // The database server's own end: its clients already make the spans.
                Protocol::Other
            };
            return;
        }
        let request = http1::looks_like_request(bytes);
        let response = http1::looks_like_response(bytes);
        if !request && !response {
            if mid_stream
                && !sent
                && let Protocol::Unknown(probe) = &mut self.protocol
                && probe.waits < MID_STREAM_WAITS
            {
                probe.waits += 1;
                return; // what it sends next tells
            }
            self.protocol = Protocol::Other;
            return;
        }
        if self.role == Role::Unknown {
            // Whoever sends a request is the client.
            self.role = match (request, rec.direction) {
                (true, Direction::Send) | (false, Direction::Recv) => Role::Client,
                _ => Role::Server,
            };
        }
        let request_flow = if self.role == Role::Server {
            Direction::Recv
        } else {
            Direction::Send
        };
        // The first bytes must start a request in the request direction; joining a
        // connection in the middle of a response would pair everything wrongly.
        if !(request && rec.direction == request_flow) {
            if response {
                return; // wait for the next request to start cleanly
            }
            self.protocol = Protocol::Other;
            return;
        }
        self.protocol = Protocol::Http1(Box::new(HttpConn {
            requests: Http1Decoder::new(MessageKind::Request, limits.clone()),
            responses: Http1Decoder::new(MessageKind::Response, limits.clone()),
            pending: VecDeque::new(),
            next_exchange: 0,
            // A connection seen connecting or being accepted, whose first bytes are
            // this request: both ends number its exchanges alike.
            from_start: self.role_from_kernel && self.bytes_sent + self.bytes_recv == seen,
            last_woken_by: None,
            open_request: None,
        }));
    }

    /// Bytes its decoders hold between chunks.
    fn held_bytes(&self) -> usize {
        use std::mem::size_of;
        match &self.protocol {
            Protocol::Unknown(probe) => probe.bytes,
            Protocol::Http1(h) => {
                h.requests.held_bytes()
                    + h.responses.held_bytes()
                    + h.pending.len() * size_of::<http::PendingRequest>()
            }
            Protocol::Db(d) => d.decoder.held_bytes(),
            Protocol::Other | Protocol::Encrypted { .. } => 0,
        }
    }

    /// The decoders' budget is spent and this connection's grew: it is no longer
    /// decoded (its memory goes now, the kernel skips it from now on), and counted.
    fn shed<O: Observer>(&mut self, ctx: &mut Ctx<'_, O>) {
        if matches!(self.protocol, Protocol::Db(_)) {
            ctx.out.db(DbObservation::Left { sock: self.sock });
        }
        self.protocol = Protocol::Other;
        self.held.set(0);
        ctx.telemetry.dropped(DropReason::MemoryBudget);
    }

    /// The connection as (client end, server end).
    /// The endpoints' addresses as text (shared with every span of the connection).
    fn addr_text(&mut self) -> AddrText {
        let ends = self.endpoints;
        self.addr_text
            .get_or_insert_with(|| AddrText::of(ends.local, ends.remote))
            .clone()
    }

    /// Ends a connection: a close-delimited response finishes; requests that never
    /// got an answer are counted.
    fn close<O: Observer>(mut self, ctx: &mut Ctx<'_, O>) {
        if let Protocol::Unknown(probe) = &mut self.protocol
            && !probe.records.is_empty()
        {
            // Its first bytes were all it said: decide on them.
            let held = std::mem::take(&mut probe.records);
            self.settle(&held, None, ctx);
            for rec in &held {
                self.decode(rec, ctx);
            }
            if matches!(self.protocol, Protocol::Db(_)) {
                // Joined just now, after the table let it go: leave at once.
                ctx.out.db(DbObservation::Left { sock: self.sock });
            }
        }
        let unanswered = match &mut self.protocol {
            Protocol::Http1(http) => {
                let mut finished = Vec::new();
                http.responses.finish(&mut finished);
                for response in &finished {
                    self.answer(response, 0, ctx);
                }
                // Requests the connection closed on: spans that say so.
                self.abandon(ctx);
                0
            }
            Protocol::Db(db) => db.decoder.finish(),
            Protocol::Unknown(_) | Protocol::Other | Protocol::Encrypted { .. } => 0,
        };
        ctx.telemetry
            .dropped_n(DropReason::RequestUnanswered, unanswered as u64);
    }
}

#[cfg(test)]
mod tests;
