//! The connection table: every followed TCP connection, its role, its process and
//! its protocol state. Socket events go in; finished HTTP spans come out.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use tracer_common::{conn::Role, data::Direction};

use crate::{
    capture::{DataRecord, Endpoints, Event, Meta},
    process::ProcessTable,
    protocols::{
        Chunk,
        http1::{self, Http1Decoder, Http1Limits, Http1Message, MessageKind, StartLine},
    },
    spans::{HttpExchange, Span, SpanKind, http_span},
    stitch,
    telemetry::Telemetry,
};

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

/// What a connection speaks, as far as we know.
enum Protocol {
    /// No payload seen yet.
    Unknown,
    Http1(Box<HttpConn>),
    /// Not a protocol we decode: its traffic is ignored.
    Other,
}

/// One HTTP/1 connection: a decoder per direction and the requests awaiting answers.
struct HttpConn {
    requests: Http1Decoder,
    responses: Http1Decoder,
    pending: VecDeque<PendingRequest>,
    scratch: Vec<Http1Message>,
}

struct PendingRequest {
    message: Http1Message,
    tid: u32,
}

/// One followed TCP connection.
pub struct Connection {
    pub endpoints: Endpoints,
    pub role: Role,
    /// Last process that did I/O on it.
    pub pid: u32,
    pub comm: String,
    pub opened_ns: u64,
    pub last_io_ns: u64,
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    protocol: Protocol,
}

/// All followed connections, keyed by kernel socket address.
pub struct ConnectionTable {
    conns: HashMap<u64, Connection>,
    limits: TableLimits,
    http_limits: Http1Limits,
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

impl ConnectionTable {
    pub fn new(limits: TableLimits) -> Self {
        Self {
            conns: HashMap::new(),
            limits,
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

    /// Handles one event from the kernel.
    pub fn handle(
        &mut self,
        event: Event,
        procs: &mut ProcessTable,
        telemetry: &Telemetry,
        out: &mut impl SpanSink,
    ) {
        match event {
            Event::ConnOpen {
                meta,
                endpoints,
                role,
            } => {
                if let Some(old) = self.conns.remove(&meta.sock) {
                    // The kernel reused the socket address: the old connection is over.
                    Self::close(old, procs, telemetry, out);
                }
                self.make_room(procs, telemetry, out);
                self.conns
                    .insert(meta.sock, Connection::new(&meta, endpoints, role));
            }
            Event::Data(rec) => self.data(rec, procs, telemetry, out),
            Event::ConnClose { meta, .. } => {
                if let Some(conn) = self.conns.remove(&meta.sock) {
                    Self::close(conn, procs, telemetry, out);
                }
            }
            Event::ProcExit { meta } => procs.exited(meta.tgid),
        }
    }

    fn make_room(
        &mut self,
        procs: &mut ProcessTable,
        telemetry: &Telemetry,
        out: &mut impl SpanSink,
    ) {
        if self.conns.len() < self.limits.max_connections {
            return;
        }
        let victim = self
            .conns
            .iter()
            .min_by_key(|(_, c)| c.last_io_ns)
            .map(|(&sock, _)| sock);
        if let Some(conn) = victim.and_then(|sock| self.conns.remove(&sock)) {
            telemetry.connections_evicted.inc();
            log::debug!(
                "connection table full ({}): evicting the least recently used",
                self.limits.max_connections
            );
            Self::close(conn, procs, telemetry, out);
        }
    }

    fn data(
        &mut self,
        rec: DataRecord,
        procs: &mut ProcessTable,
        telemetry: &Telemetry,
        out: &mut impl SpanSink,
    ) {
        if !self.conns.contains_key(&rec.meta.sock) {
            // Its open event was lost (ring buffer full): follow it with what we know.
            telemetry.dropped("connection_open_missed");
            self.make_room(procs, telemetry, out);
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
        if !rec.meta.comm.is_empty() {
            conn.comm.clone_from(&rec.meta.comm);
        }
        conn.last_io_ns = rec.meta.ts_ns;
        match rec.direction {
            Direction::Send => conn.bytes_sent += u64::from(rec.total_len),
            Direction::Recv => conn.bytes_recv += u64::from(rec.total_len),
        }
        if matches!(conn.protocol, Protocol::Unknown) {
            conn.detect(&rec, self.http_limits.clone());
            if matches!(conn.protocol, Protocol::Other) {
                telemetry.dropped("unknown_protocol");
            }
        }
        let chunk = Chunk {
            bytes: &rec.payload,
            len: (rec.total_len as usize).max(rec.payload.len()),
            ts_ns: rec.meta.ts_ns,
        };
        let Protocol::Http1(http) = &mut conn.protocol else {
            return;
        };
        let requests_flow = match conn.role {
            Role::Server => Direction::Recv,
            _ => Direction::Send,
        };
        if rec.direction == requests_flow {
            http.scratch.clear();
            if let Err(e) = http.requests.feed(&chunk, &mut http.scratch) {
                log::debug!("HTTP request decode error on {:?}: {e}", conn.endpoints);
                telemetry.dropped("http_request_malformed");
            }
            for message in http.scratch.drain(..) {
                if let StartLine::Request { method, .. } = &message.start {
                    http.responses.expect_response_to(method);
                }
                if http.pending.len() >= self.limits.max_pending_requests {
                    http.pending.pop_front();
                    telemetry.dropped("http_pending_overflow");
                }
                http.pending.push_back(PendingRequest {
                    message,
                    tid: rec.meta.tid,
                });
            }
        } else {
            http.scratch.clear();
            if let Err(e) = http.responses.feed(&chunk, &mut http.scratch) {
                log::debug!("HTTP response decode error on {:?}: {e}", conn.endpoints);
                telemetry.dropped("http_response_malformed");
            }
            let responses = std::mem::take(&mut http.scratch);
            for response in &responses {
                conn.answer(response, procs, telemetry, out);
            }
            if let Protocol::Http1(http) = &mut conn.protocol {
                if http.responses.is_tunnel() {
                    // 101 Switching Protocols or CONNECT: what follows is not HTTP/1.
                    conn.protocol = Protocol::Other;
                } else {
                    http.scratch = responses;
                    http.scratch.clear();
                }
            }
        }
    }

    /// Ends a connection: a close-delimited response finishes; unanswered requests are counted.
    fn close(
        mut conn: Connection,
        procs: &mut ProcessTable,
        telemetry: &Telemetry,
        out: &mut impl SpanSink,
    ) {
        let Protocol::Http1(http) = &mut conn.protocol else {
            return;
        };
        let mut finished = Vec::new();
        http.responses.finish(&mut finished);
        for response in &finished {
            conn.answer(response, procs, telemetry, out);
        }
        if let Protocol::Http1(http) = &conn.protocol
            && !http.pending.is_empty()
        {
            for _ in 0..http.pending.len() {
                telemetry.dropped("http_request_unanswered");
            }
        }
    }
}

impl Connection {
    fn new(meta: &Meta, endpoints: Endpoints, role: Role) -> Self {
        Self {
            endpoints,
            role,
            pid: meta.tgid,
            comm: meta.comm.clone(),
            opened_ns: meta.ts_ns,
            last_io_ns: meta.ts_ns,
            bytes_sent: 0,
            bytes_recv: 0,
            protocol: Protocol::Unknown,
        }
    }

    /// Learns the protocol (and, for sockets the kernel did not see connect or
    /// accept, the role) from the first captured payload.
    fn detect(&mut self, rec: &DataRecord, limits: Http1Limits) {
        if rec.payload.is_empty() {
            return;
        }
        let request = http1::looks_like_request(&rec.payload);
        let response = http1::looks_like_response(&rec.payload);
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
            responses: Http1Decoder::new(MessageKind::Response, limits),
            pending: VecDeque::new(),
            scratch: Vec::new(),
        }));
    }

    /// Pairs a response with the oldest waiting request and emits the span.
    fn answer(
        &mut self,
        response: &Http1Message,
        procs: &mut ProcessTable,
        telemetry: &Telemetry,
        out: &mut impl SpanSink,
    ) {
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
            telemetry.dropped("http_response_unpaired");
            return;
        };
        let kind = if self.role == Role::Server {
            SpanKind::Server
        } else {
            SpanKind::Client
        };
        let resource = procs.get(self.pid, &self.comm);
        let mut span = http_span(&HttpExchange {
            kind,
            request: &req.message,
            response,
            local: self.endpoints.local,
            remote: self.endpoints.remote,
            resource,
            tid: req.tid,
        });
        stitch::apply_traceparent(&mut span, req.message.headers.traceparent.as_deref());
        telemetry.spans_built.inc();
        out.span(span);
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
            payload: bytes.to_vec(),
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
