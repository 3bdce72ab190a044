//! The connection table: every followed TCP connection, its role, its process and
//! its protocol state. Socket events go in; what the table sees goes out through one
//! seam, [`Observer`]: finished spans, what threads read and send (parent
//! inference's causality), and each database connection's life and use (the pool
//! tracker). The table keeps no state of those stages.

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
    pools::{
        inventory::{ConnState, DbConnectionRow, PoolKey},
        tracker::{DbObservation, DbUse, PoolTracker},
    },
    process::ProcessTable,
    protocols::{
        Chunk,
        db::{DbCall, DbDecoder, DbSystem, TxStatus},
        http1::{self, Http1Decoder, Http1Limits, Http1Message, MessageKind, StartLine},
    },
    recover::RecoveredSocket,
    spans::{AddrText, DbExchange, HttpExchange, Link, Span, SpanId, SpanKind, db_span, http_span},
    stitch::{
        causality::{Cause, Culprit, ThreadEvent},
        traceparent::{self, TraceParent},
    },
    telemetry::{DropReason, Telemetry},
};

/// What the table reports as it follows connections: the one seam between it and
/// the stages that keep state of their own. Statically dispatched: the table is
/// generic over it.
pub trait Observer {
    /// A span was built.
    fn span(&mut self, span: Span);
    /// A thread read or answered a request, or read the answer to a call.
    fn thread(&mut self, event: ThreadEvent<'_>);
    /// What a call that thread `tid` of `pid` sends at `ts_ns` is made for.
    fn cause(&mut self, pid: u32, tid: u32, ts_ns: u64) -> Cause;
    /// The server request `span` being served, as leak reports name it.
    fn culprit(&mut self, span: SpanId) -> Option<Culprit>;
    /// A database client connection's life and use.
    fn db(&mut self, observation: DbObservation);
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
            max_connections: tracer_common::MAX_SOCKETS as usize,
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
    /// The request's `traceparent`, parsed once when the request is read.
    traceparent: Option<TraceParent>,
}

/// The client end of a database connection.
struct DbConn {
    decoder: DbDecoder,
    /// The last call completed on it: its (obfuscated) text and span.
    last_call: Option<(Option<String>, SpanId, u64)>,
    /// Thread that sent the latest request bytes.
    request_tid: u32,
    /// What that thread was working for when it sent them.
    cause: Cause,
    /// The server request the call in flight was made for, and the one the last
    /// completed call was made for.
    call_culprit: Option<Culprit>,
    last_culprit: Option<Culprit>,
    /// The handshake's end was seen (or can no longer be timed).
    ready: bool,
    scratch: Vec<DbCall>,
}

impl DbConn {
    /// `joined_late`: the connection was open before we saw it connect, so its
    /// handshake cannot be timed.
    fn new(decoder: DbDecoder, tid: u32, joined_late: bool) -> Self {
        // Redis has no handshake to wait for.
        let ready = joined_late || matches!(decoder, DbDecoder::Redis(_));
        Self {
            decoder,
            request_tid: tid,
            cause: Cause::default(),
            last_call: None,
            call_culprit: None,
            last_culprit: None,
            ready,
            scratch: Vec::new(),
        }
    }
}

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
}

/// All followed connections, keyed by kernel socket address.
pub struct ConnectionTable {
    conns: HashMap<u64, Connection>,
    /// Connections recovered from /proc and not seen by the kernel yet: their
    /// (local, remote) → the key they are kept under until then.
    recovered: HashMap<(SocketAddr, SocketAddr), u64>,
    /// Sockets no longer decoded, for the kernel to skip.
    not_decoded: Vec<NotDecoded>,
    limits: TableLimits,
    options: SpanOptions,
    http_limits: Http1Limits,
}

const UNKNOWN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// Everything a connection needs from the table to turn messages into spans.
struct Ctx<'a, O: Observer> {
    procs: &'a mut ProcessTable,
    telemetry: &'a Telemetry,
    options: &'a SpanOptions,
    out: &'a mut O,
}

impl ConnectionTable {
    pub fn new(limits: TableLimits) -> Self {
        Self::with_options(limits, SpanOptions::default())
    }

    pub fn with_options(limits: TableLimits, options: SpanOptions) -> Self {
        Self {
            conns: HashMap::new(),
            recovered: HashMap::new(),
            not_decoded: Vec::new(),
            limits,
            options,
            http_limits: Http1Limits::default(),
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

    /// Handles one event from the kernel.
    pub fn handle(
        &mut self,
        event: Event,
        procs: &mut ProcessTable,
        telemetry: &Telemetry,
        out: &mut impl Observer,
    ) {
        let options = self.options.clone();
        let mut ctx = Ctx {
            procs,
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
                if let Some(old) = self.remove(meta.sock, ctx.out) {
                    // The kernel reused the socket address: the old connection is over.
                    old.close(&mut ctx);
                }
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
                    self.make_room(&mut ctx);
                    self.conns
                        .insert(meta.sock, Connection::new(&meta, endpoints, role));
                }
            }
            Event::Data(rec) => self.data(rec, &mut ctx),
            Event::ConnClose { meta, .. } => {
                if let Some(conn) = self.remove(meta.sock, ctx.out) {
                    conn.close(&mut ctx);
                }
            }
            Event::ProcExit { meta } => ctx.procs.exited(meta.tgid),
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
            let mut conn = Connection::new(&meta, endpoints, r.role);
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

    fn make_room<O: Observer>(&mut self, ctx: &mut Ctx<'_, O>) {
        if self.conns.len() < self.limits.max_connections {
            return;
        }
        let victim = self
            .conns
            .iter()
            .min_by_key(|(_, c)| c.last_io_ns)
            .map(|(&sock, _)| sock);
        if let Some(conn) = victim.and_then(|sock| self.remove(sock, ctx.out)) {
            ctx.telemetry.connections_evicted.inc();
            log::debug!(
                "connection table full ({}): evicting the least recently used",
                self.limits.max_connections
            );
            conn.close(ctx);
        }
    }

    fn data<O: Observer>(&mut self, rec: DataRecord, ctx: &mut Ctx<'_, O>) {
        if !self.conns.contains_key(&rec.meta.sock) {
            // Its open event was lost (ring buffer full): follow it with what we know.
            ctx.telemetry.dropped(DropReason::ConnectionOpenMissed);
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
        if matches!(conn.protocol, Protocol::Unknown) {
            conn.detect(&rec, &self.http_limits);
            if matches!(conn.protocol, Protocol::Other) {
                ctx.telemetry.dropped(DropReason::UnknownProtocol);
            }
            if let Protocol::Db(db) = &conn.protocol {
                ctx.out.db(DbObservation::Joined {
                    sock: rec.meta.sock,
                    pool: conn.pool_key(db),
                    opened_ns: conn.opened_ns,
                    opened_by_kernel: conn.role_from_kernel,
                });
            }
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
            Protocol::Db(_) => conn.db_data(&rec, &chunk, ctx),
            Protocol::Unknown | Protocol::Other => {}
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
    /// The pool a database client connection belongs to.
    fn pool_key(&self, db: &DbConn) -> PoolKey {
        PoolKey {
            pid: self.pid,
            db_system: db.decoder.system(),
            server: self.endpoints.remote,
        }
    }

    /// The peer ended its stream and a thread read that end: on a client
    /// connection that resumes the handler waiting for its answer (a response
    /// delimited by the close, or a reader that reads to the end).
    fn end_of_stream<O: Observer>(&mut self, rec: &DataRecord, ctx: &mut Ctx<'_, O>) {
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
            ctx.out.thread(ThreadEvent::CallAnswered {
                pid: rec.meta.tgid,
                tid: rec.meta.tid,
                ts_ns: rec.meta.ts_ns,
                parent,
                conn: self.sock,
            });
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
        let db = DbDecoder::detect(bytes, sent);
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

    fn http_data<O: Observer>(
        &mut self,
        rec: &DataRecord,
        chunk: &Chunk<'_>,
        max_pending: usize,
        ctx: &mut Ctx<'_, O>,
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
                ctx.telemetry.dropped(DropReason::HttpRequestMalformed);
            }
            let (pid, tid) = (rec.meta.tgid, rec.meta.tid);
            for message in http.scratch.drain(..) {
                if let StartLine::Request { method, .. } = &message.start {
                    http.responses.expect_response_to(method);
                }
                if http.pending.len() >= max_pending {
                    http.pending.pop_front();
                    ctx.telemetry.dropped(DropReason::HttpPendingOverflow);
                }
                let traceparent = message
                    .headers
                    .traceparent
                    .as_deref()
                    .and_then(traceparent::parse_traceparent);
                let (span_id, woken_by, dedicated) = if self.role == Role::Server {
                    let id = SpanId::random();
                    let request = match &message.start {
                        StartLine::Request { method, target } => {
                            Some((method.as_str(), target.as_str()))
                        }
                        StartLine::Response { .. } => None,
                    };
                    ctx.out.thread(ThreadEvent::ServerRequest {
                        pid,
                        tid,
                        ts_ns: rec.meta.ts_ns,
                        span: id,
                        request,
                    });
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
                    let Cause {
                        parent: woken_by,
                        dedicated,
                    } = ctx.out.cause(pid, tid, at);
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
                    traceparent,
                });
                http.next_exchange += 1;
            }
            return;
        }
        http.scratch.clear();
        if let Err(e) = http.responses.feed(chunk, &mut http.scratch) {
            log::debug!("HTTP response decode error on {:?}: {e}", self.endpoints);
            ctx.telemetry.dropped(DropReason::HttpResponseMalformed);
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

    fn db_data<O: Observer>(&mut self, rec: &DataRecord, chunk: &Chunk<'_>, ctx: &mut Ctx<'_, O>) {
        let ips = self.addr_text();
        let Protocol::Db(db) = &mut self.protocol else {
            return;
        };
        let sock = rec.meta.sock;
        let from_client = rec.direction == Direction::Send;
        let mut request_started = false;
        if from_client {
            db.request_tid = rec.meta.tid;
            if !db.decoder.in_flight() {
                // A new request starts: what is this thread working for?
                db.cause = ctx.out.cause(rec.meta.tgid, rec.meta.tid, rec.meta.ts_ns);
                db.call_culprit = db.cause.parent.and_then(|p| ctx.out.culprit(p));
                request_started = db.ready;
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
                DbSystem::Postgresql => DropReason::PostgresqlMalformed,
                DbSystem::Mysql => DropReason::MysqlMalformed,
                DbSystem::Redis => DropReason::RedisMalformed,
            });
        }
        if !from_client && !db.ready && db.decoder.tx_status() != TxStatus::Unknown {
            // The server said it is ready for queries: the connection is made.
            db.ready = true;
            ctx.out.db(DbObservation::Ready {
                sock,
                ts_ns: rec.meta.ts_ns,
            });
        }
        let mut usage = DbUse {
            sock,
            ts_ns: rec.meta.ts_ns,
            request_started,
            completed: None,
            in_flight: db.decoder.in_flight(),
            in_transaction: db.decoder.tx_status().in_transaction(),
        };
        if db.scratch.is_empty() {
            let encrypted = db.decoder.encrypted();
            ctx.out.db(DbObservation::Used(usage));
            if encrypted {
                // Nothing more to decode: it leaves the table's database connections.
                ctx.out.db(DbObservation::Left { sock });
                self.protocol = Protocol::Other;
            }
            return;
        }
        if !from_client {
            ctx.out.thread(ThreadEvent::CallAnswered {
                pid: rec.meta.tgid,
                tid: rec.meta.tid,
                ts_ns: rec.meta.ts_ns,
                parent: db.cause.parent,
                conn: sock,
            });
        }
        let resource = ctx.procs.get(self.pid, &self.comm);
        let link = Link {
            conn: None,
            exchange: None,
            woken_by: db.cause.parent,
            dedicated_thread: db.cause.dedicated,
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
            usage.completed = Some(span.span_id);
            ctx.telemetry.spans_built.inc();
            ctx.out.span(span);
        }
        ctx.out.db(DbObservation::Used(usage));
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
    fn answer<O: Observer>(&mut self, response: &Http1Message, reader: u32, ctx: &mut Ctx<'_, O>) {
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
            ctx.telemetry.dropped(DropReason::HttpResponseUnpaired);
            return;
        };
        let kind = if self.role == Role::Server {
            SpanKind::Server
        } else {
            SpanKind::Client
        };
        let from_start = http.from_start;
        if kind == SpanKind::Server {
            ctx.out.thread(ThreadEvent::ServerAnswered {
                pid: self.pid,
                tid: req.tid,
                span: req.span_id,
            });
        } else if reader != 0 {
            ctx.out.thread(ThreadEvent::CallAnswered {
                pid: self.pid,
                tid: reader,
                ts_ns: response.end_ns,
                parent: req.woken_by,
                conn: sock,
            });
            http.last_woken_by = Some(req.woken_by);
        }
        let resource = ctx.procs.get(self.pid, &self.comm);
        let header = req.traceparent.is_some();
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
        traceparent::apply_traceparent(&mut span, req.traceparent);
        ctx.telemetry.spans_built.inc();
        ctx.out.span(span);
    }

    /// Ends a connection: a close-delimited response finishes; requests that never
    /// got an answer are counted.
    fn close<O: Observer>(mut self, ctx: &mut Ctx<'_, O>) {
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
            .dropped_n(DropReason::RequestUnanswered, unanswered as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pipeline::Downstream, spans::AttrValue};

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
        down: Downstream,
        spans: Vec<Span>,
    }

    impl Replay {
        fn new() -> Self {
            Self {
                table: ConnectionTable::new(TableLimits::default()),
                procs: ProcessTable::with_proc_root(64, "/nonexistent"),
                telemetry: Telemetry::new(),
                down: Downstream::default(),
                spans: Vec::new(),
            }
        }

        fn feed(&mut self, events: Vec<Event>) {
            for e in events {
                self.table
                    .handle(e, &mut self.procs, &self.telemetry, &mut self.down);
            }
            self.spans.append(&mut self.down.spans);
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
            let rows = self.r.table.db_inventory(
                self.now + later * Self::SECOND,
                &mut self.r.procs,
                &self.r.down.pools,
            );
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
        let rows =
            p.r.table
                .db_inventory(p.now, &mut p.r.procs, &p.r.down.pools);
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
        let rows =
            p.r.table
                .db_inventory(p.now, &mut p.r.procs, &p.r.down.pools);
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
        let rows =
            p.r.table
                .db_inventory(p.now, &mut p.r.procs, &p.r.down.pools);
        assert_eq!(rows.len(), 1);
        assert!(p.r.down.pools.pool_sizes().iter().all(|&n| n == 1));
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
            &mut p.r.down,
        );
        assert_eq!(added, 3);
        let rows = p.r.table.db_inventory(
            p.now + 5 * PoolReplay::SECOND,
            &mut p.r.procs,
            &p.r.down.pools,
        );
        assert_eq!(rows.len(), 2, "{rows:#?}");
        assert!(
            rows.iter()
                .all(|r| r.recovered && r.pool.db_system.as_str() == "postgresql")
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
        let rows =
            p.r.table
                .db_inventory(p.now, &mut p.r.procs, &p.r.down.pools);
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
        p.r.table
            .prune_recovered(|_, inode| inode != 80, &mut p.r.down);
        let rows =
            p.r.table
                .db_inventory(p.now, &mut p.r.procs, &p.r.down.pools);
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
