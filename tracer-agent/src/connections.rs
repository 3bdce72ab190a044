//! The connection table: every followed TCP connection, its role, its process and
//! its protocol state. Socket events go in; finished spans come out.

use std::{
    collections::VecDeque,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

// The hot maps are keyed by kernel addresses, pids and random span ids: a fast,
// randomly seeded hasher is enough.
use foldhash::{HashMap, HashMapExt};

use tracer_common::{conn::Role, data::Direction};

use crate::{
    capture::{DataRecord, Endpoints, Event, Meta},
    process::ProcessTable,
    protocols::{
        Chunk,
        db::{DbCall, DbSystem, TxStatus},
        http1::{self, Http1Decoder, Http1Limits, Http1Message, MessageKind, StartLine},
        mysql::{self, MysqlDecoder},
        postgres::{self, PgDecoder},
        redis::{self, RedisDecoder},
    },
    recover::RecoveredSocket,
    spans::{
        AddrText, DbExchange, HttpExchange, Link, Span, SpanId, SpanKind, TraceId, db_span,
        http_span,
    },
    stitch,
    telemetry::Telemetry,
};

/// What woke a thread last: the server request it is working for.
#[derive(Clone, Copy, Debug)]
struct Wake {
    parent: SpanId,
}

/// Per-thread causality: which server request each thread is handling, so that the
/// requests it sends can name their parent (`Link::woken_by`).
///
/// A thread that serves one request at a time (thread per request, blocking I/O)
/// works for the request it read last, or for the one whose call it just got an
/// answer to. A thread that interleaves requests (an event loop) resumes its
/// handlers in the order their input arrived, whether that input is a new request
/// or the answer to a call a handler made: every such read queues a wake for the
/// request it serves, a handler that answers its own request takes its wakes out,
/// and a call takes the oldest wake still queued, provided it came within
/// [`MAX_WAKE_TO_SEND_NS`]. Anything less clear is left without a cause.
#[derive(Default)]
struct Causality {
    /// (pid, tid) → the server request whose bytes (or whose child call's answer)
    /// the thread read last.
    wakes: HashMap<(u32, u32), Wake>,
    /// (pid, tid) → server requests read by that thread and not yet answered.
    open: HashMap<(u32, u32), u32>,
    /// (pid, tid) → wakes (request served, when) not yet followed by a call, oldest
    /// first. An answer to a call made for no known request queues `None`: the
    /// handler it resumes may send next, and its call then stays unlinked instead
    /// of taking a neighbour's wake.
    ready: HashMap<(u32, u32), VecDeque<QueuedWake>>,
    /// Server requests being served: span → (method, url.path), for the database
    /// calls made for them (the culprit of a leaked connection).
    serving: HashMap<SpanId, (String, String)>,
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

/// A wake waiting for its handler's call: the request served (if known), the
/// handler it resumes (the request, or for a call of unknown cause the connection
/// it was made on) and when.
#[derive(Clone, Copy, Debug)]
struct QueuedWake {
    parent: Option<SpanId>,
    handler: u64,
    ts: u64,
}

/// `url.path` of a request target, bounded.
fn request_path(target: &str) -> String {
    crate::protocols::bounded_text(crate::spans::url_path(target).as_bytes(), 256)
}

fn handler_of(span: SpanId) -> u64 {
    u64::from_be_bytes(span.0)
}

/// Threads remembered at most; beyond it the table is cleared (threads re-learn
/// on their next request).
const MAX_THREADS: usize = 65536;
/// Wakes remembered per thread at most.
const MAX_READY: usize = 1024;
/// Longest an event-loop handler may take between being woken and sending its call
/// for the two to be tied together.
const MAX_WAKE_TO_SEND_NS: u64 = 2_000_000;
/// More handlers than this woken together and still to send: their order is not
/// trusted.
const MAX_CONTENDERS: usize = 4;
/// Wakes older than this are dropped from a thread's queue.
const STALE_WAKE_NS: u64 = 100 * MAX_WAKE_TO_SEND_NS;

impl Causality {
    fn server_request(&mut self, pid: u32, tid: u32, span: SpanId, ts: u64) {
        if self.wakes.len() >= MAX_THREADS
            || self.open.len() >= MAX_THREADS
            || self.ready.len() >= MAX_THREADS
        {
            self.wakes.clear();
            self.open.clear();
            self.ready.clear();
            self.serving.clear();
        }
        log::trace!(target: "tracer::causality", "{pid}/{tid} {ts} request {span}");
        self.wakes.insert((pid, tid), Wake { parent: span });
        *self.open.entry((pid, tid)).or_default() += 1;
        self.push_ready(
            pid,
            tid,
            QueuedWake {
                parent: Some(span),
                handler: handler_of(span),
                ts,
            },
        );
    }

    /// Queues a wake; a handler woken again (more of an answer, or its end,
    /// arrived) resumes at its latest wake, so an earlier one of it goes.
    fn push_ready(&mut self, pid: u32, tid: u32, wake: QueuedWake) {
        let q = self.ready.entry((pid, tid)).or_default();
        q.retain(|w| w.handler != wake.handler);
        if q.len() >= MAX_READY {
            q.pop_front();
        }
        q.push_back(wake);
    }

    /// Remembers what a server request is, while it is served.
    fn serving(&mut self, span: SpanId, method: &str, path: &str) {
        if self.serving.len() >= MAX_THREADS {
            self.serving.clear();
        }
        self.serving
            .insert(span, (method.to_string(), request_path(path)));
    }

    fn culprit(&self, span: SpanId) -> Option<Culprit> {
        self.serving.get(&span).map(|(method, path)| Culprit {
            method: method.clone(),
            route: crate::metrics::url_template(path),
            path: path.clone(),
            span_id: span.to_string(),
        })
    }

    fn server_answered(&mut self, pid: u32, tid: u32, span: SpanId) {
        self.serving.remove(&span);
        log::trace!(target: "tracer::causality", "{pid}/{tid} answered {span}");
        if let Some(n) = self.open.get_mut(&(pid, tid)) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(&(pid, tid));
            }
        }
        if self
            .wakes
            .get(&(pid, tid))
            .is_some_and(|w| w.parent == span)
        {
            self.wakes.remove(&(pid, tid));
        }
        // Its handler is done: none of its wakes can lead to a call any more. A
        // handler with no wake of its own queued was resumed by an answer to a
        // call of unknown cause (or by input we do not see): the oldest such
        // anonymous wake is its.
        if let Some(q) = self.ready.get_mut(&(pid, tid)) {
            let before = q.len();
            q.retain(|w| w.parent != Some(span));
            if q.len() == before
                && let Some(i) = q.iter().position(|w| w.parent.is_none())
            {
                q.remove(i);
            }
            if q.is_empty() {
                self.ready.remove(&(pid, tid));
            }
        }
    }

    /// The parent candidate of a request this thread sends at `ts`, and whether the
    /// thread serves one request at a time.
    fn cause(&mut self, pid: u32, tid: u32, ts: u64) -> (Option<SpanId>, bool) {
        let dedicated = self.open.get(&(pid, tid)).copied() == Some(1);
        let queued = self.ready.get_mut(&(pid, tid)).and_then(|q| {
            // Wakes long before `ts` can no longer be anybody's cause.
            q.retain(|w| w.ts.saturating_add(STALE_WAKE_NS) >= ts);
            let fits = |w: &QueuedWake| w.ts <= ts && ts - w.ts <= MAX_WAKE_TO_SEND_NS;
            let candidates = q.iter().filter(|w| fits(w)).count();
            if candidates > MAX_CONTENDERS {
                // Too many handlers woken at once to trust their order: do not
                // guess, and forget them.
                q.retain(|w| !fits(w));
                return None;
            }
            // Handlers resume in the order their input arrived: the oldest first.
            let first = q.iter().position(fits);
            first.and_then(|i| q.remove(i)).and_then(|w| w.parent)
        });
        if dedicated {
            return (self.wakes.get(&(pid, tid)).map(|w| w.parent), true);
        }
        (queued, false)
    }

    /// The thread read the answer to a call made for `parent`: that handler
    /// resumes. On a dedicated thread its next call is for the same request; on an
    /// event loop it takes its turn among the other woken handlers.
    /// `conn` names the call's connection, which stands for the handler when its
    /// cause is unknown.
    fn answered_call(&mut self, pid: u32, tid: u32, parent: Option<SpanId>, conn: u64, ts: u64) {
        log::trace!(target: "tracer::causality", "{pid}/{tid} {ts} answer for {:?}", parent.map(|s| s.to_string()));
        if let Some(parent) = parent {
            self.wakes.insert((pid, tid), Wake { parent });
        }
        if self.ready.len() < MAX_THREADS || self.ready.contains_key(&(pid, tid)) {
            let handler = parent.map_or(conn, handler_of);
            self.push_ready(
                pid,
                tid,
                QueuedWake {
                    parent,
                    handler,
                    ts,
                },
            );
        }
    }
}

/// Limits of the connection table.
#[derive(Clone, Debug)]
pub struct TableLimits {
    /// Connections tracked at once; the least recently used is evicted beyond it.
    pub max_connections: usize,
    /// Requests waiting for their response on one connection (pipelining depth).
    pub max_pending_requests: usize,
}

impl Default for TableLimits {
    fn default() -> Self {
        Self {
            max_connections: 65536,
            max_pending_requests: 64,
        }
    }
}

/// How spans are built.
#[derive(Clone, Debug, Default)]
pub struct SpanOptions {
    /// Keep SQL literals in `db.query.text` (off by default: they may be secrets).
    pub keep_sql_literals: bool,
}

/// What a connection speaks, as far as we know.
enum Protocol {
    /// No payload seen yet.
    Unknown,
    Http1(Box<HttpConn>),
    Db(Box<DbConn>),
    /// Not a protocol we decode (or the server end of a database connection): its
    /// traffic is ignored.
    Other,
}

/// One HTTP/1 connection: a decoder per direction and the requests awaiting answers.
struct HttpConn {
    requests: Http1Decoder,
    responses: Http1Decoder,
    pending: VecDeque<PendingRequest>,
    scratch: Vec<Http1Message>,
    /// Index of the next request on this connection.
    next_exchange: u64,
    /// Both ends count exchanges alike only when followed from the first byte.
    from_start: bool,
    /// Client end: the cause of the last answered request, once one was answered.
    last_woken_by: Option<Option<SpanId>>,
}

struct PendingRequest {
    message: Http1Message,
    tid: u32,
    span_id: SpanId,
    exchange: u64,
    woken_by: Option<SpanId>,
    dedicated: bool,
}

/// The client end of a database connection.
struct DbConn {
    decoder: DbDecoder,
    /// The last call completed on it: its (obfuscated) text and span.
    last_call: Option<(Option<String>, SpanId, u64)>,
    /// Thread that sent the latest request bytes.
    request_tid: u32,
    /// What that thread was working for when it sent them.
    cause: (Option<SpanId>, bool),
    /// The server request the call in flight was made for, and the one the last
    /// completed call was made for.
    call_culprit: Option<Culprit>,
    last_culprit: Option<Culprit>,
    /// The trace of the last call's span, once the stitcher settled it.
    last_trace: Option<TraceId>,
    /// When the current use began: a request sent on an idle connection. Over
    /// when no call is in flight and no transaction is open.
    in_use_since: Option<u64>,
    /// When the connection was last idle again (its last use ended), or opened.
    last_use_ns: u64,
    /// The handshake's end was seen (or can no longer be timed).
    ready: bool,
    /// Borrows in its pool since its last use that took another connection while
    /// this one was the pool's least recently used idle one.
    passed_over: u32,
    scratch: Vec<DbCall>,
}

impl DbConn {
    /// `joined_late`: the connection was open before we saw it connect, so its
    /// handshake cannot be timed.
    fn new(decoder: DbDecoder, tid: u32, opened_ns: u64, joined_late: bool) -> Self {
        // Redis has no handshake to wait for.
        let ready = joined_late || matches!(decoder, DbDecoder::Redis(_));
        Self {
            decoder,
            request_tid: tid,
            cause: (None, false),
            last_call: None,
            call_culprit: None,
            last_culprit: None,
            last_trace: None,
            in_use_since: None,
            last_use_ns: opened_ns,
            ready,
            passed_over: 0,
            scratch: Vec::new(),
        }
    }
}

/// What a piece of database traffic did to its connection's use.
#[derive(Clone, Copy, Debug, Default)]
struct DbUse {
    /// A request started on an idle connection at this time.
    borrowed: Option<u64>,
}

/// A timing sample for the pool metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSample {
    pub pid: u32,
    pub db_system: DbSystem,
    pub server: SocketAddr,
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

/// One pool (a process's connections to one database server) as the table
/// watches it: its members and how it picks connections.
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

/// Pool samples kept when nobody takes them.
const MAX_POOL_SAMPLES: usize = 65536;
/// Pools watched at most; members per pool at most.
const MAX_POOLS: usize = 16384;
const MAX_POOL_MEMBERS: usize = 4096;
/// A connection passed over this many times by a pool seen to take its least
/// recently used connection no longer votes on the pool's order.
const SUSPECT_PASSES: u32 = 2;

/// The database decoders, each seeing both directions of one connection.
enum DbDecoder {
    Postgres(PgDecoder),
    Mysql(MysqlDecoder),
    Redis(RedisDecoder),
}

impl DbDecoder {
    /// A decoder for a connection met mid-stream, by its server's well-known port.
    fn guess_by_port(port: u16) -> Option<Self> {
        match port {
            5432 => Some(DbDecoder::Postgres(PgDecoder::mid_stream())),
            3306 => Some(DbDecoder::Mysql(MysqlDecoder::new())),
            6379 => Some(DbDecoder::Redis(RedisDecoder::new())),
            _ => None,
        }
    }

    fn system(&self) -> DbSystem {
        match self {
            DbDecoder::Postgres(_) => DbSystem::Postgresql,
            DbDecoder::Mysql(_) => DbSystem::Mysql,
            DbDecoder::Redis(_) => DbSystem::Redis,
        }
    }

    /// Feeds bytes the client sent (`from_client`) or received.
    fn feed(
        &mut self,
        from_client: bool,
        chunk: &Chunk<'_>,
        out: &mut Vec<DbCall>,
    ) -> Result<(), String> {
        match (self, from_client) {
            (DbDecoder::Postgres(d), true) => d.client(chunk, out).map_err(|e| e.to_string()),
            (DbDecoder::Postgres(d), false) => d.server(chunk, out).map_err(|e| e.to_string()),
            (DbDecoder::Mysql(d), true) => d.client(chunk, out).map_err(|e| e.to_string()),
            (DbDecoder::Mysql(d), false) => d.server(chunk, out).map_err(|e| e.to_string()),
            (DbDecoder::Redis(d), true) => d.client(chunk, out).map_err(|e| e.to_string()),
            (DbDecoder::Redis(d), false) => d.server(chunk, out).map_err(|e| e.to_string()),
        }
    }

    fn tx_status(&self) -> TxStatus {
        match self {
            DbDecoder::Postgres(d) => d.tx_status(),
            DbDecoder::Mysql(d) => d.tx_status(),
            DbDecoder::Redis(d) => d.tx_status(),
        }
    }

    fn namespace(&self) -> Option<&str> {
        match self {
            DbDecoder::Postgres(d) => d.namespace(),
            DbDecoder::Mysql(d) => d.namespace(),
            DbDecoder::Redis(d) => d.namespace(),
        }
    }

    fn in_flight(&self) -> bool {
        match self {
            DbDecoder::Postgres(d) => d.in_flight(),
            DbDecoder::Mysql(d) => d.in_flight(),
            DbDecoder::Redis(d) => d.in_flight(),
        }
    }

    fn encrypted(&self) -> bool {
        match self {
            DbDecoder::Postgres(d) => d.is_encrypted(),
            DbDecoder::Mysql(d) => d.is_encrypted(),
            DbDecoder::Redis(_) => false,
        }
    }

    /// The connection closed: how many requests never got an answer.
    fn finish(&mut self) -> usize {
        match self {
            DbDecoder::Postgres(d) => d.finish(),
            DbDecoder::Mysql(d) => d.finish(),
            DbDecoder::Redis(d) => d.finish(),
        }
    }
}

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
}

/// All followed connections, keyed by kernel socket address.
pub struct ConnectionTable {
    conns: HashMap<u64, Connection>,
    /// (pid, server) → the pool of database connections.
    pools: HashMap<(u32, SocketAddr), PoolTrack>,
    /// Span of each database connection's last call → its socket.
    last_db_span: HashMap<SpanId, u64>,
    pool_samples: Vec<PoolSample>,
    /// Connections recovered from /proc and not seen by the kernel yet: their
    /// (local, remote) → the key they are kept under until then.
    recovered: HashMap<(SocketAddr, SocketAddr), u64>,
    /// Sockets no longer decoded, for the kernel to skip.
    not_decoded: Vec<NotDecoded>,
    limits: TableLimits,
    options: SpanOptions,
    http_limits: Http1Limits,
    causality: Causality,
}

/// One database client connection in the inventory (`/connections`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DbConnectionRow {
    pub pid: u32,
    pub executable: String,
    pub service: String,
    pub db_system: &'static str,
    pub namespace: Option<String>,
    pub server_address: String,
    pub server_port: u16,
    pub client_port: u16,
    /// `used` (a call in flight or a transaction open) or `idle`.
    pub state: &'static str,
    pub tx_status: &'static str,
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
    /// Leak signals from the pool's behaviour (see `pools`): times the pool took
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
    pub leak: Option<crate::pools::LeakKind>,
}

#[cfg(test)]
impl DbConnectionRow {
    /// An idle PostgreSQL connection of `pid` to 127.0.0.1:5432, for tests to adjust.
    pub(crate) fn sample(pid: u32, client_port: u16) -> Self {
        Self {
            pid,
            executable: format!("app{pid}"),
            service: format!("svc{pid}"),
            db_system: "postgresql",
            namespace: None,
            server_address: "127.0.0.1".into(),
            server_port: 5432,
            client_port,
            state: "idle",
            tx_status: "idle",
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

/// The server request a database call was made for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Culprit {
    /// `http.request.method`.
    pub method: String,
    /// `url.path` (never the query).
    pub path: String,
    /// The path as a template (`/orders/{id}`), as in the RED metrics.
    pub route: String,
    /// The SERVER span's id.
    pub span_id: String,
}

/// Where the spans built from events go.
pub trait SpanSink {
    fn span(&mut self, span: Span);
}

impl SpanSink for Vec<Span> {
    fn span(&mut self, span: Span) {
        self.push(span);
    }
}

const UNKNOWN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// Everything a connection needs from the table to turn messages into spans.
struct Ctx<'a, S: SpanSink> {
    procs: &'a mut ProcessTable,
    causality: &'a mut Causality,
    pool_samples: &'a mut Vec<PoolSample>,
    telemetry: &'a Telemetry,
    options: &'a SpanOptions,
    out: &'a mut S,
}

impl ConnectionTable {
    pub fn new(limits: TableLimits) -> Self {
        Self::with_options(limits, SpanOptions::default())
    }

    pub fn with_options(limits: TableLimits, options: SpanOptions) -> Self {
        Self {
            conns: HashMap::new(),
            pools: HashMap::new(),
            last_db_span: HashMap::new(),
            pool_samples: Vec::new(),
            recovered: HashMap::new(),
            not_decoded: Vec::new(),
            limits,
            options,
            http_limits: Http1Limits::default(),
            causality: Causality::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn get(&self, sock: u64) -> Option<&Connection> {
        self.conns.get(&sock)
    }

    /// One row per database client connection, for `/connections` and `conns`.
    pub fn db_inventory(&self, now_ns: u64, procs: &mut ProcessTable) -> Vec<DbConnectionRow> {
        let mut rows: Vec<DbConnectionRow> = self
            .conns
            .values()
            .filter_map(|c| {
                let Protocol::Db(db) = &c.protocol else {
                    return None;
                };
                let tx = db.decoder.tx_status();
                let in_tx = matches!(tx, TxStatus::InTransaction | TxStatus::Failed);
                let pool = self.pools.get(&(c.pid, c.endpoints.remote));
                let resource = procs.get(c.pid, &c.comm);
                let (last_query, last_span_id, last_call_ns) = match &db.last_call {
                    Some((q, s, at)) => (q.clone(), Some(s.to_string()), *at),
                    None => (None, None, c.opened_ns),
                };
                Some(DbConnectionRow {
                    pid: c.pid,
                    executable: resource.executable_name.clone(),
                    service: resource.service_name.clone(),
                    db_system: db.decoder.system().as_str(),
                    namespace: db.decoder.namespace().map(str::to_string),
                    server_address: c.endpoints.remote.ip().to_string(),
                    server_port: c.endpoints.remote.port(),
                    client_port: c.endpoints.local.port(),
                    state: if db.decoder.in_flight() || in_tx {
                        "used"
                    } else {
                        "idle"
                    },
                    tx_status: match tx {
                        TxStatus::Unknown => "unknown",
                        TxStatus::Idle => "idle",
                        TxStatus::InTransaction => "in_transaction",
                        TxStatus::Failed => "failed",
                    },
                    idle_seconds: now_ns.saturating_sub(c.last_io_ns.max(last_call_ns)) as f64
                        / 1e9,
                    open_seconds: now_ns.saturating_sub(c.opened_ns) as f64 / 1e9,
                    last_query,
                    last_span_id,
                    last_trace_id: db.last_trace.map(|t| t.to_string()),
                    culprit: db.last_culprit.clone(),
                    recovered: c.recovered,
                    passed_over: db.passed_over,
                    pool_fifo: pool.is_some_and(|p| p.fifo >= 3 && p.fifo >= 3 * p.lifo),
                    newer_in_pool: pool.is_some_and(|p| p.last_open_ns > db.last_use_ns),
                    leak: None,
                })
            })
            .collect();
        rows.sort_by(|a, b| {
            (a.pid, &a.server_address, a.server_port, a.client_port).cmp(&(
                b.pid,
                &b.server_address,
                b.server_port,
                b.client_port,
            ))
        });
        rows
    }

    /// Handles one event from the kernel.
    pub fn handle(
        &mut self,
        event: Event,
        procs: &mut ProcessTable,
        telemetry: &Telemetry,
        out: &mut impl SpanSink,
    ) {
        let options = self.options.clone();
        let mut causality = std::mem::take(&mut self.causality);
        let mut pool_samples = std::mem::take(&mut self.pool_samples);
        let mut ctx = Ctx {
            procs,
            causality: &mut causality,
            pool_samples: &mut pool_samples,
            telemetry,
            options: &options,
            out,
        };
        match event {
            Event::ConnOpen {
                meta,
                endpoints,
                role,
            } => {
                if let Some(old) = self.remove(meta.sock) {
                    // The kernel reused the socket address: the old connection is over.
                    old.close(&mut ctx);
                }
                if let Some(key) = self.recovered.remove(&(endpoints.local, endpoints.remote))
                    && let Some(mut conn) = self.remove(key)
                {
                    // A connection recovered from /proc does its first I/O under our
                    // watch: from now on it is known by its socket.
                    conn.sock = meta.sock;
                    self.conns.insert(meta.sock, conn);
                    if matches!(
                        self.conns.get(&meta.sock).map(|c| &c.protocol),
                        Some(Protocol::Db(_))
                    ) {
                        self.pool_join(meta.sock);
                    }
                } else {
                    self.make_room(&mut ctx);
                    self.conns
                        .insert(meta.sock, Connection::new(&meta, endpoints, role));
                }
            }
            Event::Data(rec) => self.data(rec, &mut ctx),
            Event::ConnClose { meta, .. } => {
                if let Some(conn) = self.remove(meta.sock) {
                    conn.close(&mut ctx);
                }
            }
            Event::ProcExit { meta } => ctx.procs.exited(meta.tgid),
        }
        self.causality = causality;
        if pool_samples.len() > MAX_POOL_SAMPLES {
            // Nobody drains them: keep the newest.
            let excess = pool_samples.len() - MAX_POOL_SAMPLES;
            pool_samples.drain(..excess);
        }
        self.pool_samples = pool_samples;
    }

    /// Adds connections that were open before the agent started (found in /proc).
    /// A client connection to a well-known database port gets that database's
    /// decoder, joining its stream wherever the next bytes start; any other
    /// connection learns its protocol from its first traffic. Their idle time
    /// counts from `now_ns`.
    pub fn recover(&mut self, sockets: &[RecoveredSocket], now_ns: u64) -> usize {
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
            let mut conn = Connection::new(&meta, endpoints, r.role);
            conn.role_from_kernel = false;
            conn.recovered = true;
            conn.inode = r.inode;
            if r.role == Role::Client
                && let Some(decoder) = DbDecoder::guess_by_port(r.remote.port())
            {
                conn.protocol = Protocol::Db(Box::new(DbConn::new(decoder, r.pid, now_ns, true)));
            }
            self.conns.insert(key, conn);
            self.recovered.insert((r.local, r.remote), key);
            if matches!(self.conns[&key].protocol, Protocol::Db(_)) {
                self.pool_join(key);
            }
            added += 1;
        }
        added
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
    pub fn prune_recovered(&mut self, open: impl Fn(u32, u64) -> bool) {
        let gone: Vec<((SocketAddr, SocketAddr), u64)> = self
            .recovered
            .iter()
            .filter(|(_, k)| self.conns.get(k).is_none_or(|c| !open(c.pid, c.inode)))
            .map(|(e, k)| (*e, *k))
            .collect();
        for (ends, key) in gone {
            self.recovered.remove(&ends);
            self.remove(key);
        }
    }

    /// Pool timing samples gathered since the last call.
    pub fn take_pool_samples(&mut self) -> Vec<PoolSample> {
        std::mem::take(&mut self.pool_samples)
    }

    /// The stitcher settled the trace of a span: if it is a database connection's
    /// last call, the connection remembers it (leak reports name it).
    pub fn note_trace(&mut self, span: SpanId, trace: TraceId) {
        let Some(sock) = self.last_db_span.remove(&span) else {
            return;
        };
        if let Some(Connection {
            protocol: Protocol::Db(db),
            ..
        }) = self.conns.get_mut(&sock)
            && db.last_call.as_ref().is_some_and(|(_, s, _)| *s == span)
        {
            db.last_trace = Some(trace);
        }
    }

    /// Takes a connection out of the table and out of its pool.
    fn remove(&mut self, sock: u64) -> Option<Connection> {
        let conn = self.conns.remove(&sock)?;
        if let Protocol::Db(db) = &conn.protocol {
            if let Some((_, span, _)) = &db.last_call {
                self.last_db_span.remove(span);
            }
            let key = (conn.pid, conn.endpoints.remote);
            if let Some(pool) = self.pools.get_mut(&key) {
                pool.members.retain(|&m| m != sock);
                if pool.members.is_empty() {
                    self.pools.remove(&key);
                }
            }
        }
        Some(conn)
    }

    /// A database connection joined its pool.
    fn pool_join(&mut self, sock: u64) {
        let Some(conn) = self.conns.get(&sock) else {
            return;
        };
        let key = (conn.pid, conn.endpoints.remote);
        if self.pools.len() >= MAX_POOLS && !self.pools.contains_key(&key) {
            return;
        }
        let pool = self.pools.entry(key).or_default();
        if pool.members.len() < MAX_POOL_MEMBERS && !pool.members.contains(&sock) {
            pool.members.push(sock);
        }
        if conn.role_from_kernel {
            pool.last_open_ns = pool.last_open_ns.max(conn.opened_ns);
        }
    }

    /// Connection `sock` was taken into use: learn the pool's order, and count the
    /// least recently used idle connection as passed over when another was taken.
    fn pool_borrow(&mut self, sock: u64) {
        let Some(conn) = self.conns.get(&sock) else {
            return;
        };
        let Protocol::Db(taken) = &conn.protocol else {
            return;
        };
        let taken_last = taken.last_use_ns;
        let key = (conn.pid, conn.endpoints.remote);
        let Some(pool) = self.pools.get_mut(&key) else {
            return;
        };
        // Idle others: (sock, last use, suspect).
        let mut lru: Option<(u64, u64)> = None;
        let (mut older, mut newer) = (0u32, 0u32);
        for &m in &pool.members {
            if m == sock {
                continue;
            }
            let Some(Connection {
                protocol: Protocol::Db(db),
                ..
            }) = self.conns.get(&m)
            else {
                continue;
            };
            if db.in_use_since.is_some() || db.decoder.in_flight() {
                continue;
            }
            if lru.is_none_or(|(_, t)| db.last_use_ns < t) {
                lru = Some((m, db.last_use_ns));
            }
            if db.passed_over >= SUSPECT_PASSES {
                continue; // likely not in the pool at all: no vote
            }
            if db.last_use_ns < taken_last {
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
            && let Some(Connection {
                protocol: Protocol::Db(db),
                ..
            }) = self.conns.get_mut(&m)
        {
            db.passed_over = db.passed_over.saturating_add(1);
        }
    }

    fn make_room<S: SpanSink>(&mut self, ctx: &mut Ctx<'_, S>) {
        if self.conns.len() < self.limits.max_connections {
            return;
        }
        let victim = self
            .conns
            .iter()
            .min_by_key(|(_, c)| c.last_io_ns)
            .map(|(&sock, _)| sock);
        if let Some(conn) = victim.and_then(|sock| self.remove(sock)) {
            ctx.telemetry.connections_evicted.inc();
            log::debug!(
                "connection table full ({}): evicting the least recently used",
                self.limits.max_connections
            );
            conn.close(ctx);
        }
    }

    fn data<S: SpanSink>(&mut self, rec: DataRecord, ctx: &mut Ctx<'_, S>) {
        if !self.conns.contains_key(&rec.meta.sock) {
            // Its open event was lost (ring buffer full): follow it with what we know.
            ctx.telemetry.dropped("connection_open_missed");
            self.make_room(ctx);
            let unknown = Endpoints {
                local: UNKNOWN_ADDR,
                remote: UNKNOWN_ADDR,
            };
            self.conns.insert(
                rec.meta.sock,
                Connection::new(&rec.meta, unknown, Role::Unknown),
            );
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
        conn.last_io_ns = rec.meta.ts_ns;
        match rec.direction {
            Direction::Send => conn.bytes_sent += u64::from(rec.total_len),
            Direction::Recv => conn.bytes_recv += u64::from(rec.total_len),
        }
        let mut joined = false;
        if matches!(conn.protocol, Protocol::Unknown) {
            conn.detect(&rec, &self.http_limits);
            if matches!(conn.protocol, Protocol::Other) {
                ctx.telemetry.dropped("unknown_protocol");
            }
            joined = matches!(conn.protocol, Protocol::Db(_));
        }
        let chunk = Chunk {
            bytes: &rec.payload,
            len: (rec.total_len as usize).max(rec.payload.len()),
            ts_ns: rec.meta.ts_ns,
        };
        match &mut conn.protocol {
            Protocol::Http1(_) => {
                conn.http_data(&rec, &chunk, self.limits.max_pending_requests, ctx)
            }
            Protocol::Db(_) => {
                let before = conn.last_db_span();
                let usage = conn.db_data(&rec, &chunk, ctx);
                let after = conn.last_db_span();
                if after != before {
                    if let Some(old) = before {
                        self.last_db_span.remove(&old);
                    }
                    if let Some(new) = after
                        && self.last_db_span.len() < self.limits.max_connections
                    {
                        self.last_db_span.insert(new, rec.meta.sock);
                    }
                }
                if joined {
                    self.pool_join(rec.meta.sock);
                }
                if usage.borrowed.is_some() {
                    self.pool_borrow(rec.meta.sock);
                }
            }
            Protocol::Unknown | Protocol::Other => {}
        }
        let now_other = matches!(
            self.conns.get(&rec.meta.sock).map(|c| &c.protocol),
            Some(Protocol::Other)
        );
        // Kernel sockets have kernel (high half) addresses; recovered ones do not.
        if now_other && !was_other && rec.meta.sock >> 63 == 1 {
            if self.not_decoded.len() >= MAX_POOL_SAMPLES {
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
    fn last_db_span(&self) -> Option<SpanId> {
        match &self.protocol {
            Protocol::Db(db) => db.last_call.as_ref().map(|(_, s, _)| *s),
            _ => None,
        }
    }

    /// The peer ended its stream and a thread read that end: on a client
    /// connection that resumes the handler waiting for its answer (a response
    /// delimited by the close, or a reader that reads to the end).
    fn end_of_stream<S: SpanSink>(&mut self, rec: &DataRecord, ctx: &mut Ctx<'_, S>) {
        let Protocol::Http1(http) = &self.protocol else {
            return;
        };
        if self.role != Role::Client || rec.direction != Direction::Recv {
            return;
        }
        let cause = match http.pending.front() {
            Some(waiting) => Some(waiting.woken_by),
            None => http.last_woken_by,
        };
        if let Some(parent) = cause {
            ctx.causality.answered_call(
                rec.meta.tgid,
                rec.meta.tid,
                parent,
                self.sock,
                rec.meta.ts_ns,
            );
        }
    }

    fn new(meta: &Meta, endpoints: Endpoints, role: Role) -> Self {
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
            protocol: Protocol::Unknown,
            addr_text: None,
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

    /// Learns the protocol (and, for sockets the kernel did not see connect or
    /// accept, the role) from the first captured payload.
    fn detect(&mut self, rec: &DataRecord, limits: &Http1Limits) {
        let bytes = &rec.payload[..];
        if bytes.is_empty() {
            return;
        }
        let sent = rec.direction == Direction::Send;
        let db = if sent && postgres::looks_like_startup(bytes) {
            Some(DbDecoder::Postgres(PgDecoder::new()))
        } else if !sent && mysql::looks_like_server_greeting(bytes) {
            Some(DbDecoder::Mysql(MysqlDecoder::new()))
        } else if sent && !http1::looks_like_request(bytes) && redis::looks_like_command(bytes) {
            Some(DbDecoder::Redis(RedisDecoder::new()))
        } else {
            None
        };
        if let Some(decoder) = db {
            // We spoke first to a database (or it greeted us): we are its client.
            if self.role == Role::Unknown {
                self.role = Role::Client;
            }
            self.protocol = if self.role == Role::Client {
                Protocol::Db(Box::new(DbConn::new(
                    decoder,
                    rec.meta.tid,
                    self.opened_ns,
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
            scratch: Vec::new(),
            next_exchange: 0,
            // A connection seen connecting or being accepted, whose first bytes are
            // this request: both ends number its exchanges alike.
            from_start: self.role_from_kernel
                && self.bytes_sent + self.bytes_recv == u64::from(rec.total_len),
            last_woken_by: None,
        }));
    }

    fn http_data<S: SpanSink>(
        &mut self,
        rec: &DataRecord,
        chunk: &Chunk<'_>,
        max_pending: usize,
        ctx: &mut Ctx<'_, S>,
    ) {
        let Protocol::Http1(http) = &mut self.protocol else {
            return;
        };
        let requests_flow = if self.role == Role::Server {
            Direction::Recv
        } else {
            Direction::Send
        };
        if rec.direction == requests_flow {
            http.scratch.clear();
            if let Err(e) = http.requests.feed(chunk, &mut http.scratch) {
                log::debug!("HTTP request decode error on {:?}: {e}", self.endpoints);
                ctx.telemetry.dropped("http_request_malformed");
            }
            let (pid, tid) = (rec.meta.tgid, rec.meta.tid);
            for message in http.scratch.drain(..) {
                if let StartLine::Request { method, .. } = &message.start {
                    http.responses.expect_response_to(method);
                }
                if http.pending.len() >= max_pending {
                    http.pending.pop_front();
                    ctx.telemetry.dropped("http_pending_overflow");
                }
                let traceparent = message
                    .headers
                    .traceparent
                    .as_deref()
                    .and_then(stitch::parse_traceparent);
                let (span_id, woken_by, dedicated) = if self.role == Role::Server {
                    let id = SpanId::random();
                    ctx.causality.server_request(pid, tid, id, rec.meta.ts_ns);
                    if let StartLine::Request { method, target } = &message.start {
                        ctx.causality.serving(id, method, target);
                    }
                    (id, None, false)
                } else {
                    // An outgoing traceparent names this very client span.
                    let id = traceparent
                        .map(|tp| tp.parent_id)
                        .unwrap_or_else(SpanId::random);
                    // A handler's call starts at its connect() when it opens a
                    // connection for it: that is the moment closest to its wake.
                    let at = if http.next_exchange == 0 && self.role_from_kernel {
                        self.opened_ns.min(message.start_ns)
                    } else {
                        message.start_ns
                    };
                    let (woken_by, dedicated) = ctx.causality.cause(pid, tid, at);
                    log::trace!(target: "tracer::causality", "{pid}/{tid} {at} call {id} from {:?}", woken_by.map(|s| s.to_string()));
                    (id, woken_by, dedicated)
                };
                http.pending.push_back(PendingRequest {
                    message,
                    tid,
                    span_id,
                    exchange: http.next_exchange,
                    woken_by,
                    dedicated,
                });
                http.next_exchange += 1;
            }
            return;
        }
        http.scratch.clear();
        if let Err(e) = http.responses.feed(chunk, &mut http.scratch) {
            log::debug!("HTTP response decode error on {:?}: {e}", self.endpoints);
            ctx.telemetry.dropped("http_response_malformed");
        }
        let responses = std::mem::take(&mut http.scratch);
        for response in &responses {
            self.answer(response, rec.meta.tid, ctx);
        }
        if let Protocol::Http1(http) = &mut self.protocol {
            if http.responses.is_tunnel() {
                // 101 Switching Protocols or CONNECT: what follows is not HTTP/1.
                self.protocol = Protocol::Other;
            } else {
                http.scratch = responses;
                http.scratch.clear();
            }
        }
    }

    fn db_data<S: SpanSink>(
        &mut self,
        rec: &DataRecord,
        chunk: &Chunk<'_>,
        ctx: &mut Ctx<'_, S>,
    ) -> DbUse {
        let mut usage = DbUse::default();
        let ips = self.addr_text();
        let Protocol::Db(db) = &mut self.protocol else {
            return usage;
        };
        let from_client = rec.direction == Direction::Send;
        if from_client {
            db.request_tid = rec.meta.tid;
            if !db.decoder.in_flight() {
                // A new request starts: what is this thread working for?
                db.cause = ctx
                    .causality
                    .cause(rec.meta.tgid, rec.meta.tid, rec.meta.ts_ns);
                db.call_culprit = db.cause.0.and_then(|p| ctx.causality.culprit(p));
                if db.in_use_since.is_none() && db.ready {
                    db.in_use_since = Some(rec.meta.ts_ns);
                    usage.borrowed = Some(rec.meta.ts_ns);
                }
            }
        }
        db.scratch.clear();
        if let Err(e) = db.decoder.feed(from_client, chunk, &mut db.scratch) {
            log::debug!(
                "{} decode error on {:?}: {e}",
                db.decoder.system().as_str(),
                self.endpoints
            );
            ctx.telemetry.dropped(match db.decoder.system() {
                DbSystem::Postgresql => "postgresql_malformed",
                DbSystem::Mysql => "mysql_malformed",
                DbSystem::Redis => "redis_malformed",
            });
        }
        if !from_client && !db.ready && db.decoder.tx_status() != TxStatus::Unknown {
            // The server said it is ready for queries: the connection is made.
            db.ready = true;
            ctx.pool_samples.push(PoolSample {
                pid: self.pid,
                db_system: db.decoder.system(),
                server: self.endpoints.remote,
                kind: PoolSampleKind::Create,
                seconds: rec.meta.ts_ns.saturating_sub(self.opened_ns) as f64 / 1e9,
            });
        }
        if db.scratch.is_empty() {
            if db.decoder.encrypted() {
                self.protocol = Protocol::Other;
            }
            return usage;
        }
        if !from_client {
            ctx.causality.answered_call(
                rec.meta.tgid,
                rec.meta.tid,
                db.cause.0,
                rec.meta.sock,
                rec.meta.ts_ns,
            );
        }
        let resource = ctx.procs.get(self.pid, &self.comm);
        let link = Link {
            conn: None,
            exchange: None,
            woken_by: db.cause.0,
            dedicated_thread: db.cause.1,
            header: false,
        };
        for call in db.scratch.drain(..) {
            let span = db_span(&DbExchange {
                call: &call,
                local: self.endpoints.local,
                remote: self.endpoints.remote,
                ips: &ips,
                resource: resource.clone(),
                tid: db.request_tid,
                keep_literals: ctx.options.keep_sql_literals,
                link: link.clone(),
            });
            let text = span.attr("db.query.text").map(|t| t.to_string());
            db.last_call = Some((text, span.span_id, call.end_ns));
            db.last_culprit.clone_from(&db.call_culprit);
            db.last_trace = None;
            ctx.telemetry.spans_built.inc();
            ctx.out.span(span);
        }
        db.passed_over = 0;
        let in_tx = matches!(
            db.decoder.tx_status(),
            TxStatus::InTransaction | TxStatus::Failed
        );
        if !db.decoder.in_flight() && !in_tx {
            // Given back: idle again.
            db.last_use_ns = rec.meta.ts_ns;
            if let Some(since) = db.in_use_since.take() {
                ctx.pool_samples.push(PoolSample {
                    pid: self.pid,
                    db_system: db.decoder.system(),
                    server: self.endpoints.remote,
                    kind: PoolSampleKind::Use,
                    seconds: rec.meta.ts_ns.saturating_sub(since) as f64 / 1e9,
                });
            }
        }
        usage
    }

    /// The connection as (client end, server end).
    /// The endpoints' addresses as text (shared with every span of the connection).
    fn addr_text(&mut self) -> AddrText {
        let ends = self.endpoints;
        self.addr_text
            .get_or_insert_with(|| AddrText::of(ends.local, ends.remote))
            .clone()
    }

    fn conn_key(&self) -> Option<(SocketAddr, SocketAddr)> {
        let e = &self.endpoints;
        match self.role {
            Role::Server => Some((e.remote, e.local)),
            Role::Client => Some((e.local, e.remote)),
            Role::Unknown => None,
        }
    }

    /// Pairs a response with the oldest waiting request and emits the span.
    /// `reader` is the thread that read the response (0 when the connection closed).
    fn answer<S: SpanSink>(&mut self, response: &Http1Message, reader: u32, ctx: &mut Ctx<'_, S>) {
        let conn = self.conn_key();
        let sock = self.sock;
        let ips = self.addr_text();
        let Protocol::Http1(http) = &mut self.protocol else {
            return;
        };
        if let StartLine::Response { status } = response.start
            && (100..200).contains(&status)
            && status != 101
        {
            return; // interim response: the final one follows
        }
        let Some(req) = http.pending.pop_front() else {
            ctx.telemetry.dropped("http_response_unpaired");
            return;
        };
        let kind = if self.role == Role::Server {
            SpanKind::Server
        } else {
            SpanKind::Client
        };
        let from_start = http.from_start;
        if kind == SpanKind::Server {
            ctx.causality
                .server_answered(self.pid, req.tid, req.span_id);
        } else if reader != 0 {
            ctx.causality
                .answered_call(self.pid, reader, req.woken_by, sock, response.end_ns);
            http.last_woken_by = Some(req.woken_by);
        }
        let resource = ctx.procs.get(self.pid, &self.comm);
        let header = req
            .message
            .headers
            .traceparent
            .as_deref()
            .and_then(stitch::parse_traceparent)
            .is_some();
        let mut span = http_span(&HttpExchange {
            kind,
            request: &req.message,
            response,
            local: self.endpoints.local,
            remote: self.endpoints.remote,
            ips: &ips,
            resource,
            tid: req.tid,
            span_id: req.span_id,
            link: Link {
                conn,
                exchange: from_start.then_some(req.exchange),
                woken_by: req.woken_by,
                dedicated_thread: req.dedicated,
                header,
            },
        });
        stitch::apply_traceparent(&mut span, req.message.headers.traceparent.as_deref());
        ctx.telemetry.spans_built.inc();
        ctx.out.span(span);
    }

    /// Ends a connection: a close-delimited response finishes; requests that never
    /// got an answer are counted.
    fn close<S: SpanSink>(mut self, ctx: &mut Ctx<'_, S>) {
        let unanswered = match &mut self.protocol {
            Protocol::Http1(http) => {
                let mut finished = Vec::new();
                http.responses.finish(&mut finished);
                for response in &finished {
                    self.answer(response, 0, ctx);
                }
                match &self.protocol {
                    Protocol::Http1(http) => http.pending.len(),
                    _ => 0,
                }
            }
            Protocol::Db(db) => db.decoder.finish(),
            Protocol::Unknown | Protocol::Other => 0,
        };
        ctx.telemetry
            .dropped_n("request_unanswered", unanswered as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::AttrValue;

    const SOCK_SERVER: u64 = 0xffff_8880_0000_1000;
    const SOCK_CLIENT: u64 = 0xffff_8880_0000_2000;

    fn meta(sock: u64, ts: u64, pid: u32) -> Meta {
        Meta {
            ts_ns: ts,
            tgid: pid,
            tid: pid + 1,
            sock,
            comm: if pid == 100 {
                "python3".into()
            } else {
                "curl".into()
            },
        }
    }

    fn endpoints(server_side: bool) -> Endpoints {
        let (s, c): (SocketAddr, SocketAddr) = (
            "127.0.0.1:8000".parse().unwrap(),
            "127.0.0.1:40000".parse().unwrap(),
        );
        if server_side {
            Endpoints {
                local: s,
                remote: c,
            }
        } else {
            Endpoints {
                local: c,
                remote: s,
            }
        }
    }

    fn data(sock: u64, ts: u64, pid: u32, direction: Direction, bytes: &[u8], total: u32) -> Event {
        Event::Data(DataRecord {
            meta: meta(sock, ts, pid),
            direction,
            syscall: 44,
            total_len: total,
            payload: bytes.to_vec().into(),
            flags: 0,
        })
    }

    struct Replay {
        table: ConnectionTable,
        procs: ProcessTable,
        telemetry: Telemetry,
        spans: Vec<Span>,
    }

    impl Replay {
        fn new() -> Self {
            Self {
                table: ConnectionTable::new(TableLimits::default()),
                procs: ProcessTable::with_proc_root(64, "/nonexistent"),
                telemetry: Telemetry::new(),
                spans: Vec::new(),
            }
        }

        fn feed(&mut self, events: Vec<Event>) {
            for e in events {
                self.table
                    .handle(e, &mut self.procs, &self.telemetry, &mut self.spans);
            }
        }
    }

    const REQ: &[u8] = b"GET /a HTTP/1.1\r\nHost: localhost:8000\r\n\r\n";
    const RESP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    const REQ2: &[u8] =
        b"POST /b HTTP/1.1\r\nHost: localhost:8000\r\nContent-Length: 10000\r\n\r\n";
    const RESP2: &[u8] = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn keep_alive_exchanges_on_both_ends_become_server_and_client_spans() {
        let mut r = Replay::new();
        r.feed(vec![
            Event::ConnOpen {
                meta: meta(SOCK_CLIENT, 1, 200),
                endpoints: endpoints(false),
                role: Role::Client,
            },
            data(SOCK_CLIENT, 10, 200, Direction::Send, REQ, REQ.len() as u32),
            Event::ConnOpen {
                meta: meta(SOCK_SERVER, 2, 100),
                endpoints: endpoints(true),
                role: Role::Server,
            },
            data(SOCK_SERVER, 11, 100, Direction::Recv, REQ, REQ.len() as u32),
            data(
                SOCK_SERVER,
                20,
                100,
                Direction::Send,
                RESP,
                RESP.len() as u32,
            ),
            data(
                SOCK_CLIENT,
                21,
                200,
                Direction::Recv,
                RESP,
                RESP.len() as u32,
            ),
            // Second exchange: the POST body goes in a second write, mostly uncaptured.
            data(
                SOCK_CLIENT,
                30,
                200,
                Direction::Send,
                REQ2,
                REQ2.len() as u32,
            ),
            data(SOCK_CLIENT, 31, 200, Direction::Send, b"xxxx", 10_000),
            data(
                SOCK_SERVER,
                32,
                100,
                Direction::Recv,
                REQ2,
                REQ2.len() as u32,
            ),
            data(SOCK_SERVER, 33, 100, Direction::Recv, b"xxxx", 10_000),
            data(
                SOCK_SERVER,
                40,
                100,
                Direction::Send,
                RESP2,
                RESP2.len() as u32,
            ),
            data(
                SOCK_CLIENT,
                41,
                200,
                Direction::Recv,
                RESP2,
                RESP2.len() as u32,
            ),
            Event::ConnClose {
                meta: meta(SOCK_CLIENT, 50, 0),
                endpoints: None,
            },
            Event::ConnClose {
                meta: meta(SOCK_SERVER, 50, 0),
                endpoints: None,
            },
        ]);
        assert_eq!(r.spans.len(), 4, "{:#?}", r.spans);
        let server: Vec<_> = r
            .spans
            .iter()
            .filter(|s| s.kind == SpanKind::Server)
            .collect();
        let client: Vec<_> = r
            .spans
            .iter()
            .filter(|s| s.kind == SpanKind::Client)
            .collect();
        assert_eq!(
            (server[0].start_unix_nano, server[0].end_unix_nano),
            (11, 20)
        );
        assert_eq!(
            (client[0].start_unix_nano, client[0].end_unix_nano),
            (10, 21)
        );
        assert_eq!(server[0].resource.pid, 100);
        assert_eq!(server[0].resource.executable_name, "python3");
        assert_eq!(client[0].resource.executable_name, "curl");
        assert_eq!(
            server[1].attr("url.path"),
            Some(&AttrValue::Str("/b".into()))
        );
        assert_eq!(
            server[1].attr("http.response.status_code"),
            Some(&AttrValue::Int(503))
        );
        assert_eq!(server[1].status, crate::spans::SpanStatus::Error);
        assert_eq!(
            (server[1].start_unix_nano, server[1].end_unix_nano),
            (32, 40)
        );
        assert_eq!(server[0].tid, 101);
        assert!(r.table.is_empty(), "closed connections are removed");
    }

    #[test]
    fn a_socket_opened_before_the_agent_learns_its_role_from_the_traffic() {
        let mut r = Replay::new();
        r.feed(vec![
            Event::ConnOpen {
                meta: meta(SOCK_SERVER, 1, 100),
                endpoints: endpoints(true),
                role: Role::Unknown,
            },
            data(SOCK_SERVER, 11, 100, Direction::Recv, REQ, REQ.len() as u32),
            data(
                SOCK_SERVER,
                20,
                100,
                Direction::Send,
                RESP,
                RESP.len() as u32,
            ),
        ]);
        assert_eq!(r.spans.len(), 1);
        assert_eq!(r.spans[0].kind, SpanKind::Server);
        assert_eq!(r.table.get(SOCK_SERVER).map(|c| c.role), Some(Role::Server));
    }

    #[test]
    fn joining_mid_response_waits_for_the_next_request() {
        let mut r = Replay::new();
        r.feed(vec![
            Event::ConnOpen {
                meta: meta(SOCK_CLIENT, 1, 200),
                endpoints: endpoints(false),
                role: Role::Unknown,
            },
            data(
                SOCK_CLIENT,
                5,
                200,
                Direction::Recv,
                RESP,
                RESP.len() as u32,
            ),
            data(SOCK_CLIENT, 10, 200, Direction::Send, REQ, REQ.len() as u32),
            data(
                SOCK_CLIENT,
                21,
                200,
                Direction::Recv,
                RESP,
                RESP.len() as u32,
            ),
        ]);
        assert_eq!(r.spans.len(), 1, "{:#?}", r.spans);
        assert_eq!(r.spans[0].kind, SpanKind::Client);
        assert_eq!(r.spans[0].start_unix_nano, 10);
    }

    #[test]
    fn other_protocols_are_ignored_and_counted() {
        let mut r = Replay::new();
        r.feed(vec![
            Event::ConnOpen {
                meta: meta(SOCK_CLIENT, 1, 200),
                endpoints: endpoints(false),
                role: Role::Client,
            },
            data(
                SOCK_CLIENT,
                10,
                200,
                Direction::Send,
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                517,
            ),
            data(SOCK_CLIENT, 11, 200, Direction::Send, REQ, REQ.len() as u32),
            data(
                SOCK_CLIENT,
                21,
                200,
                Direction::Recv,
                RESP,
                RESP.len() as u32,
            ),
        ]);
        assert!(r.spans.is_empty());
        assert!(
            r.telemetry
                .render()
                .contains("reason=\"unknown_protocol\"} 1")
        );
        // The kernel is told once to skip it.
        assert_eq!(
            r.table
                .take_not_decoded()
                .iter()
                .map(|n| (n.sock, n.local_port, n.remote_port))
                .collect::<Vec<_>>(),
            [(SOCK_CLIENT, 40000, 8000)]
        );
        assert!(r.table.take_not_decoded().is_empty());
    }

    #[test]
    fn incoming_traceparent_links_the_server_span() {
        let mut r = Replay::new();
        let req = b"GET / HTTP/1.1\r\nHost: x\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";
        r.feed(vec![
            Event::ConnOpen {
                meta: meta(SOCK_SERVER, 1, 100),
                endpoints: endpoints(true),
                role: Role::Server,
            },
            data(SOCK_SERVER, 11, 100, Direction::Recv, req, req.len() as u32),
            data(
                SOCK_SERVER,
                20,
                100,
                Direction::Send,
                RESP,
                RESP.len() as u32,
            ),
        ]);
        assert_eq!(r.spans.len(), 1);
        assert_eq!(
            r.spans[0].trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            r.spans[0].parent_span_id.map(|p| p.to_string()).as_deref(),
            Some("00f067aa0ba902b7")
        );
    }

    #[test]
    fn an_upgraded_connection_stops_being_decoded() {
        let mut r = Replay::new();
        let upgrade =
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let switching = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        r.feed(vec![
            Event::ConnOpen {
                meta: meta(SOCK_CLIENT, 1, 200),
                endpoints: endpoints(false),
                role: Role::Client,
            },
            data(
                SOCK_CLIENT,
                10,
                200,
                Direction::Send,
                upgrade,
                upgrade.len() as u32,
            ),
            data(
                SOCK_CLIENT,
                20,
                200,
                Direction::Recv,
                switching,
                switching.len() as u32,
            ),
            data(SOCK_CLIENT, 30, 200, Direction::Send, b"\x81\x85abcd", 11),
            data(SOCK_CLIENT, 40, 200, Direction::Recv, b"\x81\x05hello", 7),
        ]);
        assert_eq!(r.spans.len(), 1, "the upgrade exchange itself is a span");
        assert_eq!(
            r.spans[0].attr("http.response.status_code"),
            Some(&AttrValue::Int(101))
        );
        assert!(
            !r.telemetry.render().contains("malformed"),
            "{}",
            r.telemetry.render()
        );
    }

    #[test]
    fn a_call_made_while_serving_a_request_names_it_as_its_cause() {
        let mut r = Replay::new();
        const SOCK_OUT: u64 = 0xffff_8880_0000_3000;
        let out_endpoints = Endpoints {
            local: "127.0.0.1:41000".parse().unwrap(),
            remote: "127.0.0.1:9000".parse().unwrap(),
        };
        // Process 100 serves /a on thread 101 and, while doing so, calls /b twice.
        r.feed(vec![
            Event::ConnOpen {
                meta: meta(SOCK_SERVER, 1, 100),
                endpoints: endpoints(true),
                role: Role::Server,
            },
            data(SOCK_SERVER, 10, 100, Direction::Recv, REQ, REQ.len() as u32),
            Event::ConnOpen {
                meta: meta(SOCK_OUT, 11, 100),
                endpoints: out_endpoints,
                role: Role::Client,
            },
            data(
                SOCK_OUT,
                12,
                100,
                Direction::Send,
                b"GET /b HTTP/1.1\r\nHost: b\r\n\r\n",
                28,
            ),
            data(SOCK_OUT, 13, 100, Direction::Recv, RESP, RESP.len() as u32),
            data(
                SOCK_OUT,
                14,
                100,
                Direction::Send,
                b"GET /b HTTP/1.1\r\nHost: b\r\n\r\n",
                28,
            ),
            data(SOCK_OUT, 15, 100, Direction::Recv, RESP, RESP.len() as u32),
            data(
                SOCK_SERVER,
                20,
                100,
                Direction::Send,
                RESP,
                RESP.len() as u32,
            ),
            // After answering, the thread's next call has no cause.
            data(
                SOCK_OUT,
                30,
                100,
                Direction::Send,
                b"GET /b HTTP/1.1\r\nHost: b\r\n\r\n",
                28,
            ),
            data(SOCK_OUT, 31, 100, Direction::Recv, RESP, RESP.len() as u32),
        ]);
        assert_eq!(r.spans.len(), 4, "{:#?}", r.spans);
        let server = r.spans.iter().find(|s| s.kind == SpanKind::Server).unwrap();
        let calls: Vec<_> = r
            .spans
            .iter()
            .filter(|s| s.kind == SpanKind::Client)
            .collect();
        assert_eq!(calls[0].link.woken_by, Some(server.span_id));
        assert!(calls[0].link.dedicated_thread);
        assert_eq!(
            calls[1].link.woken_by,
            Some(server.span_id),
            "woken by the first call's answer"
        );
        assert_eq!(calls[2].link.woken_by, None);
        assert_eq!(calls[0].link.exchange, Some(0));
        assert_eq!(calls[1].link.exchange, Some(1));
        assert_eq!(
            server.link.conn,
            Some((
                "127.0.0.1:40000".parse().unwrap(),
                "127.0.0.1:8000".parse().unwrap()
            ))
        );
    }

    #[test]
    fn an_event_loop_handler_resumes_at_the_end_of_its_answer() {
        let mut r = Replay::new();
        const SOCK_SERVER2: u64 = 0xffff_8880_0000_5000;
        let (out1, out2, out3) = (
            0xffff_8880_0000_6000,
            0xffff_8880_0000_7000,
            0xffff_8880_0000_8000,
        );
        let ends = |local: &str, remote: &str| Endpoints {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        };
        let open = |sock: u64, ts: u64, endpoints: Endpoints, role: Role| Event::ConnOpen {
            meta: meta(sock, ts, 100),
            endpoints,
            role,
        };
        const CALL: &[u8] = b"GET /b HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n";
        // One thread serves two requests for /a, X then Y. X's handler calls /b and reads the
        // answer to its end (EOF) before calling again; Y's request arrives
        // between the answer's bytes and their end, and Y's handler calls first.
        r.feed(vec![
            open(SOCK_SERVER, 1, endpoints(true), Role::Server),
            data(SOCK_SERVER, 10, 100, Direction::Recv, REQ, REQ.len() as u32),
            open(
                out1,
                11,
                ends("127.0.0.1:41001", "127.0.0.1:9000"),
                Role::Client,
            ),
            data(out1, 12, 100, Direction::Send, CALL, CALL.len() as u32),
            data(out1, 100, 100, Direction::Recv, RESP, RESP.len() as u32),
            open(
                SOCK_SERVER2,
                140,
                ends("127.0.0.1:8000", "127.0.0.1:40002"),
                Role::Server,
            ),
            data(
                SOCK_SERVER2,
                150,
                100,
                Direction::Recv,
                REQ,
                REQ.len() as u32,
            ),
            data(out1, 200, 100, Direction::Recv, b"", 0),
            open(
                out2,
                210,
                ends("127.0.0.1:41002", "127.0.0.1:9000"),
                Role::Client,
            ),
            data(out2, 212, 100, Direction::Send, CALL, CALL.len() as u32),
            open(
                out3,
                220,
                ends("127.0.0.1:41003", "127.0.0.1:9000"),
                Role::Client,
            ),
            data(out3, 222, 100, Direction::Send, CALL, CALL.len() as u32),
            data(out2, 300, 100, Direction::Recv, RESP, RESP.len() as u32),
            data(out3, 310, 100, Direction::Recv, RESP, RESP.len() as u32),
        ]);
        let cause_of = |port: u16| {
            r.spans
                .iter()
                .find(|s| {
                    s.kind == SpanKind::Client && s.link.conn.is_some_and(|(c, _)| c.port() == port)
                })
                .unwrap_or_else(|| panic!("no call from port {port}: {:#?}", r.spans))
                .link
                .woken_by
        };
        let (x, y) = (cause_of(41001), cause_of(41002));
        assert!(x.is_some(), "the first call is X's");
        assert_ne!(
            y, x,
            "Y's handler, woken before X's answer ended, calls first"
        );
        assert!(y.is_some());
        assert_eq!(
            cause_of(41003),
            x,
            "X's second call, after the end of its answer"
        );
    }

    #[test]
    fn an_event_loop_ties_calls_to_wakes_in_order_and_refuses_crowds() {
        let mut c = Causality::default();
        let (a, b) = (SpanId::random(), SpanId::random());
        // One thread reads two requests, then its handlers send in that order.
        c.server_request(1, 1, a, 1_000);
        c.server_request(1, 1, b, 1_100);
        assert_eq!(c.cause(1, 1, 1_200), (Some(a), false));
        assert_eq!(c.cause(1, 1, 1_300), (Some(b), false));
        assert_eq!(c.cause(1, 1, 1_400), (None, false), "no wake left");
        // A wake long before the send is nobody's cause any more.
        let late = SpanId::random();
        c.server_request(1, 1, late, 2_000);
        assert_eq!(
            c.cause(1, 1, 2_000 + MAX_WAKE_TO_SEND_NS + 1),
            (None, false)
        );
        // Too many handlers woken at once: no guess.
        for i in 0..=MAX_CONTENDERS as u64 {
            c.server_request(1, 1, SpanId::random(), 10_000_000 + i);
        }
        assert_eq!(c.cause(1, 1, 10_000_100), (None, false));
        // Handlers resumed by answers take their turn in the same queue.
        let (x, y, z) = (SpanId::random(), SpanId::random(), SpanId::random());
        c.server_request(1, 1, x, 20_000_000);
        assert_eq!(c.cause(1, 1, 20_000_010), (Some(x), false));
        c.server_request(1, 1, y, 20_000_020);
        c.answered_call(1, 1, Some(x), 7, 20_000_030);
        c.answered_call(1, 1, Some(x), 7, 20_000_035); // more of the same answer
        c.server_request(1, 1, z, 20_000_040);
        assert_eq!(c.cause(1, 1, 20_000_050), (Some(y), false), "y woke first");
        assert_eq!(
            c.cause(1, 1, 20_000_060),
            (Some(x), false),
            "x's second call"
        );
        assert_eq!(c.cause(1, 1, 20_000_070), (Some(z), false));
        // A handler that answers its request takes its wake out of the queue.
        let (p, q) = (SpanId::random(), SpanId::random());
        c.server_request(1, 1, p, 30_000_000);
        c.server_request(1, 1, q, 30_000_010);
        c.server_answered(1, 1, p);
        assert_eq!(c.cause(1, 1, 30_000_020), (Some(q), false));
        // An answer to a call of unknown cause: whoever sends next stays unlinked
        // rather than take a neighbour's wake.
        let r = SpanId::random();
        c.answered_call(1, 1, None, 8, 40_000_000);
        c.server_request(1, 1, r, 40_000_010);
        assert_eq!(c.cause(1, 1, 40_000_020), (None, false));
        assert_eq!(c.cause(1, 1, 40_000_030), (Some(r), false));
        // ... and once that handler answers (its wake was anonymous), the
        // anonymous wake goes, so it does not shadow the next request.
        let (u, v) = (SpanId::random(), SpanId::random());
        c.server_request(1, 1, u, 50_000_000);
        assert_eq!(c.cause(1, 1, 50_000_010), (Some(u), false));
        c.answered_call(1, 1, None, 9, 50_000_020);
        c.server_answered(1, 1, u);
        c.server_request(1, 1, v, 50_000_030);
        assert_eq!(c.cause(1, 1, 50_000_040), (Some(v), false));
        // A thread with a single open request is dedicated.
        let only = SpanId::random();
        c.server_request(1, 2, only, 5);
        assert_eq!(c.cause(1, 2, 6), (Some(only), true));
    }

    // ---- the pool tracker, on PostgreSQL wire sequences ----------------------

    fn pg_msg(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![ty];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn pg_startup() -> Vec<u8> {
        let mut body = 196_608u32.to_be_bytes().to_vec();
        body.extend(b"user\0app\0database\0shop\0\0");
        let mut m = (body.len() as u32 + 4).to_be_bytes().to_vec();
        m.extend(body);
        m
    }

    /// AuthenticationOk, then ReadyForQuery with transaction status `tx`.
    fn pg_ready(tx: u8) -> Vec<u8> {
        let mut m = pg_msg(b'R', &0u32.to_be_bytes());
        m.extend(pg_msg(b'Z', &[tx]));
        m
    }

    fn pg_query(sql: &str) -> Vec<u8> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        pg_msg(b'Q', &body)
    }

    /// CommandComplete, then ReadyForQuery with transaction status `tx`.
    fn pg_done(tag: &str, tx: u8) -> Vec<u8> {
        let mut body = tag.as_bytes().to_vec();
        body.push(0);
        let mut m = pg_msg(b'C', &body);
        m.extend(pg_msg(b'Z', &[tx]));
        m
    }

    /// One process (pid 300) and its connections to 127.0.0.1:5432, by client port.
    struct PoolReplay {
        r: Replay,
        now: u64,
    }

    impl PoolReplay {
        const SECOND: u64 = 1_000_000_000;

        fn new() -> Self {
            Self {
                r: Replay::new(),
                now: Self::SECOND,
            }
        }

        fn sock(port: u16) -> u64 {
            0xffff_8880_1000_0000 + u64::from(port)
        }

        fn io(&mut self, port: u16, dir: Direction, bytes: &[u8]) {
            self.now += 1_000_000;
            let ev = data(
                Self::sock(port),
                self.now,
                300,
                dir,
                bytes,
                bytes.len() as u32,
            );
            self.r.feed(vec![ev]);
        }

        fn open(&mut self, port: u16) {
            self.now += 1_000_000;
            self.r.feed(vec![Event::ConnOpen {
                meta: meta(Self::sock(port), self.now, 300),
                endpoints: Endpoints {
                    local: SocketAddr::from(([127, 0, 0, 1], port)),
                    remote: "127.0.0.1:5432".parse().unwrap(),
                },
                role: Role::Client,
            }]);
            self.io(port, Direction::Send, &pg_startup());
            self.io(port, Direction::Recv, &pg_ready(b'I'));
        }

        fn query(&mut self, port: u16, sql: &str, tx_after: u8) {
            self.io(port, Direction::Send, &pg_query(sql));
            self.io(port, Direction::Recv, &pg_done("SELECT 1", tx_after));
        }

        fn close(&mut self, port: u16) {
            self.now += 1_000_000;
            self.r.feed(vec![Event::ConnClose {
                meta: meta(Self::sock(port), self.now, 300),
                endpoints: Some(Endpoints {
                    local: SocketAddr::from(([127, 0, 0, 1], port)),
                    remote: "127.0.0.1:5432".parse().unwrap(),
                }),
            }]);
        }

        /// Leak reports a detector with a 60 s threshold makes `later` seconds on.
        fn leaks(&mut self, later: u64) -> Vec<(u16, crate::pools::LeakKind)> {
            let rows = self
                .r
                .table
                .db_inventory(self.now + later * Self::SECOND, &mut self.r.procs);
            let mut d = crate::pools::LeakDetector::new(std::time::Duration::from_secs(60));
            d.evaluate(&rows, 0.0)
                .into_iter()
                .map(|e| (e.row.client_port, e.kind))
                .collect()
        }
    }

    #[test]
    fn a_fifo_pool_reused_in_turn_is_healthy_until_it_passes_one_over() {
        use crate::pools::LeakKind;
        let mut p = PoolReplay::new();
        for port in [1, 2, 3] {
            p.open(port);
        }
        for _ in 0..5 {
            for port in [1, 2, 3] {
                p.query(port, "SELECT 1", b'I');
            }
        }
        assert_eq!(p.leaks(0), [], "in turn");
        assert_eq!(p.leaks(120), [], "traffic stopped");
        // Connection 1 is taken and never given back: the pool rotates the others.
        p.query(1, "SELECT * FROM orders WHERE id = 7", b'I');
        for _ in 0..4 {
            for port in [2, 3] {
                p.query(port, "SELECT 1", b'I');
            }
        }
        let rows = p.r.table.db_inventory(p.now, &mut p.r.procs);
        let one = rows.iter().find(|r| r.client_port == 1).unwrap();
        assert!(
            one.pool_fifo && one.passed_over >= crate::pools::MIN_PASSES,
            "{one:#?}"
        );
        assert_eq!(p.leaks(0), [], "not idle long enough yet");
        assert_eq!(p.leaks(120), [(1, LeakKind::NeverReturned)]);
    }

    #[test]
    fn a_lifo_pool_leaves_spares_idle_without_a_report() {
        let mut p = PoolReplay::new();
        for port in [1, 2, 3] {
            p.open(port);
        }
        // A burst uses all three, then the pool keeps taking the most recent one.
        for port in [1, 2, 3] {
            p.query(port, "SELECT 1", b'I');
        }
        for _ in 0..20 {
            p.query(3, "SELECT 1", b'I');
        }
        let rows = p.r.table.db_inventory(p.now, &mut p.r.procs);
        assert!(rows.iter().all(|r| !r.pool_fifo), "{rows:#?}");
        assert_eq!(p.leaks(600), []);
    }

    #[test]
    fn a_pool_that_opens_a_connection_instead_of_reusing_an_idle_one_leaked_it() {
        use crate::pools::LeakKind;
        let mut p = PoolReplay::new();
        p.open(1);
        p.open(2);
        p.query(1, "SELECT 1", b'I');
        p.query(2, "BEGIN", b'T');
        p.query(2, "UPDATE orders SET paid = 1", b'T');
        // Both are held: the pool opens a third and uses it.
        p.open(3);
        p.query(3, "SELECT 1", b'I');
        assert_eq!(
            p.leaks(120),
            [
                (1, LeakKind::NeverReturned),
                (2, LeakKind::IdleInTransaction)
            ]
        );
        // The server closes the leaked ones: nothing left to report.
        p.close(1);
        p.close(2);
        assert_eq!(p.leaks(120), []);
        let rows = p.r.table.db_inventory(p.now, &mut p.r.procs);
        assert_eq!(rows.len(), 1);
        assert!(p.r.table.pools.values().all(|pool| pool.members.len() == 1));
    }

    #[test]
    fn connections_recovered_from_proc_join_the_inventory_and_their_socket_later() {
        let mut p = PoolReplay::new();
        let recovered = |port: u16, remote: u16, inode: u64| RecoveredSocket {
            pid: 300,
            comm: "app".into(),
            local: SocketAddr::from(([127, 0, 0, 1], port)),
            remote: SocketAddr::from(([127, 0, 0, 1], remote)),
            role: Role::Client,
            inode,
        };
        let added = p.r.table.recover(
            &[
                recovered(7, 5432, 70),
                recovered(8, 5432, 80),
                recovered(9, 8080, 90), // not a database port: learns from traffic
            ],
            p.now,
        );
        assert_eq!(added, 3);
        let rows =
            p.r.table
                .db_inventory(p.now + 5 * PoolReplay::SECOND, &mut p.r.procs);
        assert_eq!(rows.len(), 2, "{rows:#?}");
        assert!(
            rows.iter()
                .all(|r| r.recovered && r.db_system == "postgresql")
        );
        assert!(rows.iter().all(|r| (r.idle_seconds - 5.0).abs() < 0.1));
        // Connection 7 does I/O: the kernel announces it; it keeps its history.
        p.now += 1_000_000;
        p.r.feed(vec![Event::ConnOpen {
            meta: meta(PoolReplay::sock(7), p.now, 300),
            endpoints: Endpoints {
                local: SocketAddr::from(([127, 0, 0, 1], 7)),
                remote: "127.0.0.1:5432".parse().unwrap(),
            },
            role: Role::Unknown,
        }]);
        p.query(7, "SELECT 1", b'I');
        let rows = p.r.table.db_inventory(p.now, &mut p.r.procs);
        let seven = rows.iter().find(|r| r.client_port == 7).unwrap();
        assert!(seven.recovered);
        assert_eq!(seven.last_query.as_deref(), Some("SELECT ?"));
        assert_eq!(
            p.r.spans.len(),
            1,
            "the call on the recovered connection is a span"
        );
        // Connection 8 closes without I/O: pruned when its socket is gone.
        assert_eq!(p.r.table.recovered_sockets().len(), 2);
        p.r.table.prune_recovered(|_, inode| inode != 80);
        let rows = p.r.table.db_inventory(p.now, &mut p.r.procs);
        assert_eq!(
            rows.iter().map(|r| r.client_port).collect::<Vec<_>>(),
            [7],
            "{rows:#?}"
        );
    }

    #[test]
    fn malformed_traffic_is_counted_and_other_connections_keep_their_spans() {
        let mut r = Replay::new();
        const SOCK_BAD: u64 = 0xffff_8880_0000_4000;
        let bad = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: banana\r\n\r\n";
        r.feed(vec![
            Event::ConnOpen {
                meta: meta(SOCK_BAD, 1, 100),
                endpoints: endpoints(true),
                role: Role::Server,
            },
            Event::ConnOpen {
                meta: meta(SOCK_SERVER, 1, 100),
                endpoints: endpoints(true),
                role: Role::Server,
            },
            data(SOCK_BAD, 5, 100, Direction::Recv, bad, bad.len() as u32),
            data(SOCK_SERVER, 6, 100, Direction::Recv, REQ, REQ.len() as u32),
            data(
                SOCK_BAD,
                7,
                100,
                Direction::Recv,
                b"\x00\xff garbage \r\n\r\n",
                16,
            ),
            data(
                SOCK_SERVER,
                8,
                100,
                Direction::Send,
                RESP,
                RESP.len() as u32,
            ),
        ]);
        assert_eq!(r.spans.len(), 1, "{:#?}", r.spans);
        assert_eq!(r.spans[0].start_unix_nano, 6);
        assert!(
            r.telemetry
                .render()
                .contains("reason=\"http_request_malformed\"}"),
            "{}",
            r.telemetry.render()
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let mut r = Replay::new();
        r.table = ConnectionTable::new(TableLimits {
            max_connections: 4,
            ..TableLimits::default()
        });
        for i in 0..10u64 {
            r.feed(vec![Event::ConnOpen {
                meta: meta(i, i, 200),
                endpoints: endpoints(false),
                role: Role::Client,
            }]);
        }
        assert_eq!(r.table.len(), 4);
        assert!(
            r.telemetry
                .render()
                .contains("tracer_connections_evicted_total 6")
        );
    }
}
