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
const REQ2: &[u8] = b"POST /b HTTP/1.1\r\nHost: localhost:8000\r\nContent-Length: 10000\r\n\r\n";
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

/// A record of TLS plaintext, as the probes on the TLS library send it.
fn tls_data(sock: u64, ts: u64, pid: u32, direction: Direction, bytes: &[u8]) -> Event {
    let Event::Data(mut rec) = data(sock, ts, pid, direction, bytes, bytes.len() as u32) else {
        unreachable!()
    };
    rec.flags = tracer_common::data::flags::TLS;
    Event::Data(rec)
}

/// A TLS record header and a few bytes of its body (`total` bytes in all).
fn ciphertext(sock: u64, ts: u64, direction: Direction, kind: u8, total: u32) -> Event {
    let len = (total - 5) as u16;
    let mut bytes = vec![kind, 3, 3];
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(&[0xa5; 16]);
    data(sock, ts, 200, direction, &bytes, total)
}

/// A TLS connection: the handshake's ciphertext waits, the plaintext the probes
/// bring is decoded as if the connection had just opened, and the socket's own
/// records of it (ciphertext) after that are ignored; the span says https.
#[test]
fn tls_plaintext_from_the_probes_is_decoded_and_its_ciphertext_ignored() {
    let mut r = Replay::new();
    r.feed(vec![
        Event::ConnOpen {
            meta: meta(SOCK_CLIENT, 1, 200),
            endpoints: endpoints(false),
            role: Role::Client,
        },
        ciphertext(SOCK_CLIENT, 2, Direction::Send, 0x16, 517),
        ciphertext(SOCK_CLIENT, 3, Direction::Recv, 0x16, 1400),
        ciphertext(SOCK_CLIENT, 4, Direction::Send, 0x14, 80),
        tls_data(SOCK_CLIENT, 10, 200, Direction::Send, REQ),
        ciphertext(SOCK_CLIENT, 11, Direction::Send, 0x17, 70),
        ciphertext(SOCK_CLIENT, 20, Direction::Recv, 0x17, 80),
        tls_data(SOCK_CLIENT, 21, 200, Direction::Recv, RESP),
    ]);
    assert_eq!(r.spans.len(), 1, "{:#?}", r.spans);
    let span = &r.spans[0];
    assert_eq!(span.name, "GET /a");
    assert_eq!((span.start_unix_nano, span.end_unix_nano), (10, 21));
    assert_eq!(
        span.attr("url.full").map(|v| v.to_string()),
        Some("https://localhost:8000/a".to_string())
    );
    assert_eq!(
        span.attr("tls.protocol.name").map(|v| v.to_string()),
        Some("tls".to_string())
    );
    assert!(r.table.take_not_decoded().is_empty());
    let text = r.telemetry.render();
    assert!(!text.contains("reason=\"unknown_protocol\""), "{text}");
    assert!(!text.contains("reason=\"encrypted\""), "{text}");
}

/// A TLS connection whose plaintext never comes (its TLS library is not one the
/// probes cover): after the handshake's few records it is counted `encrypted`,
/// not `unknown_protocol`, and the kernel is told to skip it.
#[test]
fn tls_without_plaintext_is_counted_encrypted_and_skipped() {
    let mut r = Replay::new();
    let mut events = vec![Event::ConnOpen {
        meta: meta(SOCK_CLIENT, 1, 200),
        endpoints: endpoints(false),
        role: Role::Client,
    }];
    events.push(ciphertext(SOCK_CLIENT, 2, Direction::Send, 0x16, 517));
    for i in 0..40u64 {
        let direction = if i % 2 == 0 {
            Direction::Recv
        } else {
            Direction::Send
        };
        events.push(ciphertext(SOCK_CLIENT, 3 + i, direction, 0x17, 300));
    }
    r.feed(events);
    assert!(r.spans.is_empty());
    let text = r.telemetry.render();
    assert!(text.contains("reason=\"encrypted\"} 1"), "{text}");
    assert!(!text.contains("reason=\"unknown_protocol\""), "{text}");
    assert_eq!(
        r.table
            .take_not_decoded()
            .iter()
            .map(|n| n.sock)
            .collect::<Vec<_>>(),
        [SOCK_CLIENT]
    );
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
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
            32,
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
    let switching =
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
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
fn an_event_loop_call_after_two_handlers_woke_is_not_guessed() {
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
    let x = cause_of(41001);
    assert!(x.is_some(), "the first call is X's");
    // X's answer ended after Y's request arrived: two handlers were woken before
    // the next call, which could be either's (the loop may run X's continuation
    // or Y's handler first). Neither of the two calls after is guessed.
    assert_eq!(cause_of(41002), None, "two handlers woken: not guessed");
    assert_eq!(
        cause_of(41003),
        None,
        "nor the call after, from the same crowd"
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
    /// Connections whose traffic is TLS plaintext (from the TLS probes).
    tls: std::collections::HashSet<u16>,
}

impl PoolReplay {
    const SECOND: u64 = 1_000_000_000;

    fn new() -> Self {
        Self {
            r: Replay::new(),
            now: Self::SECOND,
            tls: Default::default(),
        }
    }

    fn sock(port: u16) -> u64 {
        0xffff_8880_1000_0000 + u64::from(port)
    }

    fn io(&mut self, port: u16, dir: Direction, bytes: &[u8]) {
        self.now += 1_000_000;
        let ev = if self.tls.contains(&port) {
            tls_data(Self::sock(port), self.now, 300, dir, bytes)
        } else {
            data(
                Self::sock(port),
                self.now,
                300,
                dir,
                bytes,
                bytes.len() as u32,
            )
        };
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
        if self.tls.contains(&port) {
            // SSLRequest accepted, the handshake's ciphertext; the session's
            // plaintext then comes from the TLS probes.
            let sslrequest = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
            let sock = Self::sock(port);
            let t = self.now;
            self.r.feed(vec![
                data(sock, t + 1, 300, Direction::Send, &sslrequest, 8),
                data(sock, t + 2, 300, Direction::Recv, b"S", 1),
                ciphertext(sock, t + 3, Direction::Send, 0x16, 517),
                ciphertext(sock, t + 4, Direction::Recv, 0x16, 2_000),
                ciphertext(sock, t + 5, Direction::Send, 0x14, 80),
            ]);
            self.now += 10;
        }
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

/// PostgreSQL over TLS (SSLRequest accepted, then plaintext from the TLS probes):
/// the session keeps its decoder and its place in its pool, its calls are spans
/// that say they were encrypted, and a leak is found as over plaintext.
#[test]
fn a_tls_session_is_decoded_pooled_and_its_leak_found_like_a_plaintext_one() {
    use crate::pools::LeakKind;
    let mut p = PoolReplay::new();
    p.tls.extend([1, 2, 3]);
    for port in [1, 2, 3] {
        p.open(port);
    }
    for _ in 0..5 {
        for port in [1, 2, 3] {
            p.query(port, "SELECT 1", b'I');
        }
    }
    assert_eq!(p.r.spans.len(), 15, "{:#?}", p.r.spans);
    for span in &p.r.spans {
        assert_eq!(
            span.attr("db.system.name").unwrap().to_string(),
            "postgresql"
        );
        assert_eq!(span.attr("db.namespace").unwrap().to_string(), "shop");
        assert_eq!(span.attr("tls.protocol.name").unwrap().to_string(), "tls");
    }
    let rows =
        p.r.table
            .db_inventory(p.now, &mut p.r.procs, &p.r.down.pools);
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert_eq!(p.leaks(120), [], "in turn");
    p.query(1, "SELECT * FROM orders WHERE id = 7", b'I');
    for _ in 0..4 {
        for port in [2, 3] {
            p.query(port, "SELECT 1", b'I');
        }
    }
    assert_eq!(p.leaks(120), [(1, LeakKind::NeverReturned)]);
    let text = p.r.telemetry.render();
    assert!(!text.contains("reason=\"encrypted\""), "{text}");
    assert!(!text.contains("postgresql_malformed"), "{text}");
    assert!(p.r.table.take_not_decoded().is_empty());
}

/// A PostgreSQL session that went encrypted and whose plaintext never comes
/// (its TLS library is not covered) leaves its pool, counted `encrypted`.
#[test]
fn a_tls_session_without_plaintext_leaves_its_pool_counted_encrypted() {
    let mut p = PoolReplay::new();
    p.open(1);
    let sock = PoolReplay::sock(1);
    p.r.feed(vec![Event::ConnOpen {
        meta: meta(sock + 1, 1, 300),
        endpoints: Endpoints {
            local: SocketAddr::from(([127, 0, 0, 1], 2)),
            remote: "127.0.0.1:5432".parse().unwrap(),
        },
        role: Role::Client,
    }]);
    let mut events = vec![
        data(
            sock + 1,
            2,
            300,
            Direction::Send,
            &[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
            8,
        ),
        data(sock + 1, 3, 300, Direction::Recv, b"S", 1),
    ];
    for i in 0..40 {
        let dir = if i % 2 == 0 {
            Direction::Send
        } else {
            Direction::Recv
        };
        events.push(ciphertext(sock + 1, 4 + i, dir, 0x17, 200));
    }
    p.r.feed(events);
    let rows =
        p.r.table
            .db_inventory(p.now, &mut p.r.procs, &p.r.down.pools);
    assert_eq!(
        rows.iter().map(|r| r.client_port).collect::<Vec<_>>(),
        [1],
        "{rows:#?}"
    );
    let text = p.r.telemetry.render();
    assert!(text.contains("reason=\"encrypted\"} 1"), "{text}");
    assert!(!text.contains("postgresql_malformed"), "{text}");
    assert_eq!(
        p.r.table
            .take_not_decoded()
            .iter()
            .map(|n| n.sock)
            .collect::<Vec<_>>(),
        [sock + 1]
    );
}

/// A connection whose close event was lost would be reported `never_returned`;
/// once /proc shows it closed the pipeline forgets it, out of its pool, and no
/// leak is reported.
#[test]
fn a_connection_closed_unseen_is_forgotten_and_never_reported() {
    use crate::pools::LeakKind;
    let mut p = PoolReplay::new();
    for port in [1, 2, 3] {
        p.open(port);
    }
    p.query(1, "SELECT 1", b'I');
    for _ in 0..5 {
        for port in [2, 3] {
            p.query(port, "SELECT 1", b'I');
        }
    }
    assert_eq!(
        p.leaks(120),
        [(1, LeakKind::NeverReturned)],
        "the lost close"
    );
    let idle = p.r.table.idle_db_connections(p.now + 1);
    assert_eq!(idle.len(), 3);
    let (sock, pid, ends) = idle
        .iter()
        .copied()
        .find(|(s, _, _)| *s == PoolReplay::sock(1))
        .expect("connection 1 is a candidate");
    assert_eq!((pid, ends.local.port()), (300, 1));
    assert!(p.r.table.forget_closed(sock, &mut p.r.down));
    assert!(!p.r.table.forget_closed(sock, &mut p.r.down), "once");
    assert_eq!(p.leaks(120), []);
    let rows =
        p.r.table
            .db_inventory(p.now, &mut p.r.procs, &p.r.down.pools);
    assert!(
        rows.iter().all(|r| r.client_port != 1),
        "out of the inventory"
    );
    assert_eq!(rows.len(), 2);
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

/// A connection recovered from /proc to `remote` (no well-known database port),
/// announced by the kernel at its first I/O, as after an agent restart.
fn recover_and_announce(p: &mut PoolReplay, port: u16, remote: u16) {
    let ends = Endpoints {
        local: SocketAddr::from(([127, 0, 0, 1], port)),
        remote: SocketAddr::from(([127, 0, 0, 1], remote)),
    };
    let socket = RecoveredSocket {
        pid: 300,
        comm: "app".into(),
        local: ends.local,
        remote: ends.remote,
        role: Role::Client,
        inode: u64::from(port),
    };
    assert_eq!(p.r.table.recover(&[socket], p.now, &mut p.r.down), 1);
    p.now += 1_000_000;
    p.r.feed(vec![Event::ConnOpen {
        meta: meta(PoolReplay::sock(port), p.now, 300),
        endpoints: ends,
        role: Role::Unknown,
    }]);
}

#[test]
fn database_sessions_on_any_port_are_decoded_after_a_restart() {
    let mut p = PoolReplay::new();
    // pgbouncer's port: a simple query, then an extended-protocol batch.
    recover_and_announce(&mut p, 7, 6432);
    p.query(7, "SELECT 1", b'I');
    let mut batch = pg_msg(b'P', b"\0SELECT $1\0\0\0");
    batch.extend(pg_msg(b'B', b"\0\0\0\0\0\x01\0\0\0\x015\0\0"));
    batch.extend(pg_msg(b'E', b"\0\0\0\0\0"));
    batch.extend(pg_msg(b'S', b""));
    p.io(7, Direction::Send, &batch);
    let mut answer = pg_msg(b'1', b"");
    answer.extend(pg_msg(b'2', b""));
    answer.extend(pg_done("SELECT 1", b'I'));
    p.io(7, Direction::Recv, &answer);
    // A MySQL on 3307: COM_QUERY, answered by an OK packet.
    recover_and_announce(&mut p, 8, 3307);
    let mut com_query = vec![17, 0, 0, 0, 0x03];
    com_query.extend_from_slice(b"SET autocommit=1");
    p.io(8, Direction::Send, &com_query);
    p.io(8, Direction::Recv, &[7, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0]);
    // A PostgreSQL client that was waiting for an answer when the agent started:
    // the answer's tail goes by, its next query tells.
    recover_and_announce(&mut p, 9, 6432);
    p.io(9, Direction::Recv, &pg_done("SELECT 1", b'I'));
    p.query(9, "SELECT 2", b'I');
    // Not a database: binary that chains no message lengths.
    recover_and_announce(&mut p, 10, 9000);
    p.io(
        10,
        Direction::Send,
        &[0x16, 3, 1, 0, 0x40, 1, 0, 0, 0x3c, 3, 3],
    );
    p.io(
        10,
        Direction::Recv,
        &[0x16, 3, 3, 0, 0x40, 2, 0, 0, 0x3c, 3, 3],
    );

    let systems: Vec<(u16, Option<DbSystem>)> = [7, 8, 9, 10]
        .into_iter()
        .map(|port| {
            let conn = p.r.table.get(PoolReplay::sock(port));
            (port, conn.and_then(|c| c.db_system()))
        })
        .collect();
    assert_eq!(
        systems,
        [
            (7, Some(DbSystem::Postgresql)),
            (8, Some(DbSystem::Mysql)),
            (9, Some(DbSystem::Postgresql)),
            (10, None),
        ]
    );
    let texts: Vec<(String, String)> =
        p.r.spans
            .iter()
            .map(|s| {
                let text = |k| s.attr(k).map(|v| v.to_string()).unwrap_or_default();
                (text("db.system.name"), text("db.query.text"))
            })
            .collect();
    assert_eq!(
        texts,
        [
            ("postgresql".into(), "SELECT ?".into()),
            ("postgresql".into(), "SELECT $1".into()),
            ("mysql".into(), "SET autocommit=?".into()),
            ("postgresql".into(), "SELECT ?".into()),
        ],
        "one span per call, none for the answer met halfway or the binary"
    );
}

/// The pipeline's observer, with a kernel socket map that knows `known`.
struct WithKernel<'a> {
    down: &'a mut Downstream,
    known: &'a [(u64, Endpoints, Role)],
}

impl Observer for WithKernel<'_> {
    fn span(&mut self, span: Span) {
        self.down.span(span)
    }
    fn thread(&mut self, event: ThreadEvent<'_>) {
        self.down.thread(event)
    }
    fn cause(&mut self, pid: u32, tid: u32, ts_ns: u64, conn: u64) -> Cause {
        self.down.cause(pid, tid, ts_ns, conn)
    }
    fn traceparent(&mut self, at: HeaderAt, tp: &TraceParent) -> HeaderUse {
        self.down.traceparent(at, tp)
    }
    fn culprit(&mut self, span: SpanId) -> Option<Culprit> {
        self.down.culprit(span)
    }
    fn db(&mut self, observation: DbObservation) {
        self.down.db(observation)
    }
    fn kernel_socket(&mut self, sock: u64) -> Option<(Endpoints, Role)> {
        self.known
            .iter()
            .find(|(s, _, _)| *s == sock)
            .map(|&(_, e, r)| (e, r))
    }
}

#[test]
fn connections_whose_open_was_lost_take_the_kernels_endpoints_or_are_not_followed() {
    let mut r = Replay::new();
    let to = |server: [u8; 4], port: u16| Endpoints {
        local: SocketAddr::from(([10, 0, 0, 9], port)),
        remote: SocketAddr::from((server, 5432)),
    };
    // Three PostgreSQL connections of one process whose ConnOpen events were lost:
    // the kernel still has two of them (to two servers), not the third.
    let socks = [
        0xffff_8880_2000_0001u64,
        0xffff_8880_2000_0002,
        0xffff_8880_2000_0003,
    ];
    let known = [
        (socks[0], to([10, 0, 0, 1], 41001), Role::Client),
        (socks[1], to([10, 0, 0, 2], 41002), Role::Client),
    ];
    let mut ts = 1_000_000;
    for &sock in &socks {
        for (dir, bytes) in [
            (Direction::Send, pg_query("SELECT 1")),
            (Direction::Recv, pg_done("SELECT 1", b'I')),
        ] {
            ts += 1_000;
            let ev = data(sock, ts, 300, dir, &bytes, bytes.len() as u32);
            let mut out = WithKernel {
                down: &mut r.down,
                known: &known,
            };
            r.table.handle(ev, &mut r.procs, &r.telemetry, &mut out);
        }
    }
    r.spans.append(&mut r.down.spans);
    let servers: Vec<String> = r
        .spans
        .iter()
        .map(|s| format!("{}", s.attr("server.address").unwrap()))
        .collect();
    assert_eq!(
        servers,
        ["10.0.0.1", "10.0.0.2"],
        "no span for the unknown one"
    );
    assert_eq!(r.table.len(), 2, "the unknown one is not in the table");
    let rows = r.table.db_inventory(ts, &mut r.procs, &r.down.pools);
    let mut pools: Vec<String> = rows.iter().map(|r| r.pool.server.to_string()).collect();
    pools.sort();
    assert_eq!(
        pools,
        ["10.0.0.1:5432", "10.0.0.2:5432"],
        "one pool each, none at 0.0.0.0"
    );
    // One for each known connection's first record, one for each record of the
    // unknown one (never followed, each is looked up again).
    assert!(
        r.telemetry
            .render()
            .contains("tracer_traffic_dropped_total{reason=\"connection_open_missed\"} 4"),
        "{}",
        r.telemetry.render()
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

/// A full table evicts other connections before database clients; a database
/// connection evicted all the same comes back with its endpoints and decoder
/// (its queries are spans again, to the right server), not as an unknown
/// `0.0.0.0:0` connection that is never decoded again.
#[test]
fn eviction_spares_database_connections_and_an_evicted_one_comes_back_whole() {
    let mut p = PoolReplay::new();
    p.r.table = ConnectionTable::new(TableLimits {
        max_connections: 3,
        ..TableLimits::default()
    });
    p.open(1);
    p.query(1, "SELECT 1", b'I');
    // Idle HTTP connections opened after it fill the table.
    for i in 0..5u64 {
        p.now += 1_000_000;
        p.r.feed(vec![Event::ConnOpen {
            meta: meta(1000 + i, p.now, 200),
            endpoints: endpoints(false),
            role: Role::Client,
        }]);
    }
    let rows =
        p.r.table
            .db_inventory(p.now, &mut p.r.procs, &p.r.down.pools);
    assert_eq!(rows.len(), 1, "the older database connection stayed");
    // Only database connections: the least recently used one goes, then returns.
    p.open(2);
    p.open(3);
    p.open(4);
    assert!(p.r.table.get(PoolReplay::sock(1)).is_none(), "evicted");
    p.r.spans.clear();
    p.query(1, "SELECT 2", b'I');
    let conn = p.r.table.get(PoolReplay::sock(1)).expect("back");
    assert_eq!(conn.endpoints.local.port(), 1);
    assert_eq!(conn.endpoints.remote, "127.0.0.1:5432".parse().unwrap());
    assert_eq!(conn.db_system(), Some(DbSystem::Postgresql));
    assert!(
        p.r.spans
            .iter()
            .any(|s| s.attr("server.port") == Some(&crate::spans::AttrValue::Int(5432))),
        "its query is a span again: {:?}",
        p.r.spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert!(
        !p.r.telemetry.render().contains("connection_open_missed"),
        "not an unknown connection"
    );
}

/// A protocol-10 greeting as MariaDB sends it.
fn mysql_greeting() -> Vec<u8> {
    let mut p = vec![10u8];
    p.extend_from_slice(b"5.5.5-10.11.6-MariaDB-0+deb12u1\0");
    p.extend_from_slice(&7u32.to_le_bytes()); // thread id
    p.extend_from_slice(b"abcdefgh\0"); // scramble, part 1
    p.extend_from_slice(&0xf7feu16.to_le_bytes()); // capabilities (low)
    p.push(45); // charset
    p.extend_from_slice(&2u16.to_le_bytes()); // status
    p.extend_from_slice(&0x81ffu16.to_le_bytes()); // capabilities (high)
    p.push(21); // auth data length
    p.extend_from_slice(&[0; 10]);
    p.extend_from_slice(b"ijklmnopqrst\0");
    p.extend_from_slice(b"mysql_native_password\0");
    let mut m = (p.len() as u32).to_le_bytes()[..3].to_vec();
    m.push(0);
    m.extend(p);
    m
}

#[test]
fn a_protocol_is_told_from_the_first_bytes_however_the_peer_split_them() {
    let mut r = Replay::new();
    let open = |sock, ts| Event::ConnOpen {
        meta: meta(sock, ts, 200),
        endpoints: endpoints(false),
        role: Role::Client,
    };
    // mysql-connector-python reads a packet's 4-byte header, then its payload.
    let greeting = mysql_greeting();
    let (head, payload) = greeting.split_at(4);
    r.feed(vec![
        open(SOCK_CLIENT, 1),
        data(SOCK_CLIENT, 2, 200, Direction::Recv, head, 4),
    ]);
    assert!(
        r.table.get(SOCK_CLIENT).unwrap().db_system().is_none(),
        "four bytes decide nothing"
    );
    r.feed(vec![data(
        SOCK_CLIENT,
        3,
        200,
        Direction::Recv,
        payload,
        payload.len() as u32,
    )]);
    assert_eq!(
        r.table.get(SOCK_CLIENT).unwrap().db_system(),
        Some(DbSystem::Mysql)
    );

    // An HTTP request written a few bytes at a time, then answered.
    let sock = SOCK_CLIENT + 1;
    r.feed(vec![open(sock, 10)]);
    for (ts, piece) in (11..).zip([&REQ[..2], &REQ[2..5], &REQ[5..12], &REQ[12..]]) {
        r.feed(vec![data(
            sock,
            ts,
            200,
            Direction::Send,
            piece,
            piece.len() as u32,
        )]);
    }
    r.feed(vec![data(
        sock,
        30,
        200,
        Direction::Recv,
        RESP,
        RESP.len() as u32,
    )]);
    assert_eq!(r.spans.len(), 1, "{:#?}", r.spans);
    assert_eq!(r.spans[0].name, "GET /a");
    assert_eq!(
        r.spans[0].start_unix_nano, 11,
        "the request began with its first piece"
    );

    // A short command, whole, is told when its answer comes.
    let sock = SOCK_CLIENT + 2;
    r.feed(vec![
        open(sock, 40),
        data(sock, 41, 200, Direction::Send, b"PING\r\n", 6),
        data(sock, 42, 200, Direction::Recv, b"+PONG\r\n", 7),
    ]);
    assert_eq!(
        r.table.get(sock).unwrap().db_system(),
        Some(DbSystem::Redis)
    );
    assert_eq!(r.spans.len(), 2, "{:#?}", r.spans);
    // A first write no protocol we decode can begin with is judged at once.
    let sock = SOCK_CLIENT + 3;
    r.feed(vec![
        open(sock, 50),
        data(sock, 51, 200, Direction::Send, b"\x05\x01\x00", 3),
    ]);
    assert_eq!(
        r.table
            .take_not_decoded()
            .iter()
            .map(|n| n.sock)
            .collect::<Vec<_>>(),
        [sock]
    );
    assert!(
        r.telemetry
            .render()
            .contains("reason=\"unknown_protocol\"} 1"),
        "{}",
        r.telemetry.render()
    );
}

/// The spans a recorded connection (`tracer-protocols/testdata`) gives when the
/// client end is traced and every record is cut by `cut` (`None`: whole).
fn spans_of_capture(file: &[u8], cut: Option<usize>) -> Vec<String> {
    let capture = tracer_protocols::testdata::parse(file).expect("capture file");
    let mut r = Replay::new();
    let mut events = vec![Event::ConnOpen {
        meta: meta(SOCK_CLIENT, 1, 200),
        endpoints: endpoints(false),
        role: Role::Client,
    }];
    for rec in &capture.records {
        let direction = if rec.from_client {
            Direction::Send
        } else {
            Direction::Recv
        };
        let ts = rec.ts_ns + 10;
        let pieces = match cut {
            Some(at) if at < rec.bytes.len() => vec![&rec.bytes[..at], &rec.bytes[at..]],
            _ => vec![rec.bytes],
        };
        for piece in pieces {
            events.push(data(
                SOCK_CLIENT,
                ts,
                200,
                direction,
                piece,
                piece.len() as u32,
            ));
        }
    }
    events.push(Event::ConnClose {
        meta: meta(SOCK_CLIENT, u64::MAX / 2, 200),
        endpoints: None,
    });
    r.feed(events);
    r.spans
        .iter()
        .map(|s| {
            let mut attrs: Vec<String> = s
                .attributes
                .iter()
                .filter(|(k, _)| !k.starts_with("tracer.") && *k != "thread.id")
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect();
            attrs.sort();
            format!("{} {:?} {:?} {}", s.name, s.kind, s.status, attrs.join(" "))
        })
        .collect()
}

#[test]
fn recorded_connections_give_the_same_spans_however_each_read_and_write_is_cut() {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tracer-protocols/testdata");
    let mut checked = 0;
    for protocol in ["http1", "mysql", "postgres", "redis"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(protocol))
            .expect("testdata")
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cap"))
            .collect();
        files.sort();
        for path in files {
            let file = std::fs::read(&path).unwrap();
            let whole = spans_of_capture(&file, None);
            // Header and payload apart (MySQL's 4, PostgreSQL's 5 bytes), a method
            // alone, a byte alone.
            for cut in [1, 2, 3, 4, 5, 8] {
                assert_eq!(
                    spans_of_capture(&file, Some(cut)),
                    whole,
                    "{} with every record cut after {cut} bytes",
                    path.display()
                );
            }
            checked += usize::from(!whole.is_empty());
        }
    }
    assert!(checked >= 30, "only {checked} captures gave spans");
}

#[test]
fn a_request_answered_before_its_body_arrived_gets_its_span_and_the_next_one_too() {
    let mut r = Replay::new();
    const BODY: &[u8] = b"{\"name\":\"x\"}";
    const POST: &[u8] =
        b"POST /orders HTTP/1.1\r\nHost: localhost:8000\r\nContent-Length: 12\r\n\r\n";
    const DENIED: &[u8] = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
    r.feed(vec![
        Event::ConnOpen {
            meta: meta(SOCK_SERVER, 1, 100),
            endpoints: endpoints(true),
            role: Role::Server,
        },
        Event::ConnOpen {
            meta: meta(SOCK_CLIENT, 1, 200),
            endpoints: endpoints(false),
            role: Role::Client,
        },
        // The client writes the head, then the body (Python `requests`).
        data(
            SOCK_CLIENT,
            10,
            200,
            Direction::Send,
            POST,
            POST.len() as u32,
        ),
        data(
            SOCK_SERVER,
            11,
            100,
            Direction::Recv,
            POST,
            POST.len() as u32,
        ),
        // The server refuses before reading the body...
        data(
            SOCK_SERVER,
            12,
            100,
            Direction::Send,
            DENIED,
            DENIED.len() as u32,
        ),
        data(
            SOCK_CLIENT,
            13,
            200,
            Direction::Send,
            BODY,
            BODY.len() as u32,
        ),
        data(
            SOCK_CLIENT,
            14,
            200,
            Direction::Recv,
            DENIED,
            DENIED.len() as u32,
        ),
        // ...then reads (drains) it, and the connection goes on.
        data(
            SOCK_SERVER,
            15,
            100,
            Direction::Recv,
            BODY,
            BODY.len() as u32,
        ),
        data(SOCK_CLIENT, 20, 200, Direction::Send, REQ, REQ.len() as u32),
        data(SOCK_SERVER, 21, 100, Direction::Recv, REQ, REQ.len() as u32),
        data(
            SOCK_SERVER,
            22,
            100,
            Direction::Send,
            RESP,
            RESP.len() as u32,
        ),
        data(
            SOCK_CLIENT,
            23,
            200,
            Direction::Recv,
            RESP,
            RESP.len() as u32,
        ),
    ]);
    let spans: Vec<(SpanKind, String, Option<&AttrValue>, u64, u64)> = r
        .spans
        .iter()
        .map(|s| {
            (
                s.kind,
                s.name.to_string(),
                s.attr("http.response.status_code"),
                s.start_unix_nano,
                s.end_unix_nano,
            )
        })
        .collect();
    assert_eq!(
        spans,
        [
            (
                SpanKind::Server,
                "POST /orders".into(),
                Some(&AttrValue::Int(401)),
                11,
                12
            ),
            (
                SpanKind::Client,
                "POST /orders".into(),
                Some(&AttrValue::Int(401)),
                10,
                14
            ),
            (
                SpanKind::Server,
                "GET /a".into(),
                Some(&AttrValue::Int(200)),
                21,
                22
            ),
            (
                SpanKind::Client,
                "GET /a".into(),
                Some(&AttrValue::Int(200)),
                20,
                23
            ),
        ]
    );
    let metrics = r.telemetry.render();
    assert!(!metrics.contains("http_response_unpaired"), "{metrics}");
    // Both ends numbered the exchanges alike: the socket rule pairs them.
    assert_eq!(r.spans[0].link.exchange, r.spans[1].link.exchange);
    assert_eq!(r.spans[2].link.exchange, Some(1));
}

#[test]
fn a_request_the_close_ends_is_a_span_that_says_who_ended_it() {
    let mut r = Replay::new();
    let ms = 1_000_000;
    let ending = |sock, ts, by_peer| Event::ConnEnding {
        meta: meta(sock, ts, 0),
        by_peer,
    };
    let close = |sock, ts| Event::ConnClose {
        meta: meta(sock, ts, 0),
        endpoints: None,
    };
    r.feed(vec![
        Event::ConnOpen {
            meta: meta(SOCK_CLIENT, 1, 200),
            endpoints: endpoints(false),
            role: Role::Client,
        },
        Event::ConnOpen {
            meta: meta(SOCK_SERVER, 1, 100),
            endpoints: endpoints(true),
            role: Role::Server,
        },
        data(SOCK_CLIENT, 10, 200, Direction::Send, REQ, REQ.len() as u32),
        data(SOCK_SERVER, 11, 100, Direction::Recv, REQ, REQ.len() as u32),
        // The client gives up at 1 s; the server answers at 3 s, into a reset.
        ending(SOCK_CLIENT, 1000 * ms, false),
        ending(SOCK_SERVER, 1000 * ms, true),
        close(SOCK_SERVER, 3000 * ms),
        data(
            SOCK_SERVER,
            3000 * ms + 5,
            100,
            Direction::Send,
            RESP,
            RESP.len() as u32,
        ),
        close(SOCK_CLIENT, 3000 * ms + 10),
    ]);
    r.table
        .expire_closing(u64::MAX, &mut r.procs, &r.telemetry, &mut r.down);
    r.spans.append(&mut r.down.spans);
    let got: Vec<(SpanKind, Option<&AttrValue>, Option<&AttrValue>, u64)> = r
        .spans
        .iter()
        .map(|s| {
            (
                s.kind,
                s.attr("http.response.status_code"),
                s.attr("error.type"),
                s.end_unix_nano,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                SpanKind::Server,
                Some(&AttrValue::Int(200)),
                None,
                3000 * ms + 5
            ),
            (
                SpanKind::Client,
                None,
                Some(&AttrValue::Str("timeout".into())),
                1000 * ms
            ),
        ],
        "the server's late answer counts; the client's span ends when it gave up"
    );
    assert_eq!(r.spans[1].status, crate::spans::SpanStatus::Error);
    assert!(r.spans[1].status_message.is_some());

    // A server whose client left before it answered.
    let sock = SOCK_SERVER + 1;
    r.feed(vec![
        Event::ConnOpen {
            meta: meta(sock, 5000 * ms, 100),
            endpoints: endpoints(true),
            role: Role::Server,
        },
        data(sock, 5001 * ms, 100, Direction::Recv, REQ, REQ.len() as u32),
        ending(sock, 5002 * ms, true),
        close(sock, 5003 * ms),
    ]);
    let before = r.spans.len();
    // Any later event past the grace closes it (no clock needed).
    r.feed(vec![Event::ConnOpen {
        meta: meta(sock + 1, 5003 * ms + CLOSE_GRACE_NS, 100),
        endpoints: endpoints(true),
        role: Role::Server,
    }]);
    assert_eq!(r.spans.len(), before + 1);
    let last = r.spans.last().unwrap();
    assert_eq!(last.kind, SpanKind::Server);
    assert_eq!(
        last.attr("error.type"),
        Some(&AttrValue::Str("client_closed".into()))
    );
    assert_eq!(last.end_unix_nano, 5003 * ms);
    assert!(!r.telemetry.render().contains("request_unanswered"));
}

#[test]
fn a_slowloris_on_many_connections_is_held_to_the_byte_budget_and_others_keep_their_spans() {
    const BUDGET: usize = 64 << 10;
    let mut r = Replay::new();
    r.table = ConnectionTable::new(TableLimits {
        max_held_bytes: BUDGET,
        ..TableLimits::default()
    });
    let server = |port: u16| Endpoints {
        local: "127.0.0.1:8000".parse().unwrap(),
        remote: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    const HONEST: u64 = 0xffff_8880_3000_0000;
    let slow = |i: u64| 0xffff_8880_3100_0000 + i;
    let mut ts = 1;
    let mut events = vec![Event::ConnOpen {
        meta: meta(HONEST, ts, 100),
        endpoints: server(40000),
        role: Role::Server,
    }];
    for i in 0..16 {
        events.push(Event::ConnOpen {
            meta: meta(slow(i), ts, 100),
            endpoints: server(41000 + i as u16),
            role: Role::Server,
        });
    }
    r.feed(events);
    let mut honest_requests = 0;
    // Each slow connection sends a head that never ends, a KiB at a time, the
    // honest one full requests between them.
    for round in 0..12 {
        for i in 0..16 {
            ts += 10;
            let piece: Vec<u8> = if round == 0 {
                b"GET /slow HTTP/1.1\r\nX-Pad: ".to_vec()
            } else {
                vec![b'a'; 1024]
            };
            let len = piece.len() as u32;
            r.feed(vec![data(slow(i), ts, 100, Direction::Recv, &piece, len)]);
            assert!(
                r.table.held_bytes() <= BUDGET,
                "{} bytes held, budget {BUDGET}",
                r.table.held_bytes()
            );
        }
        ts += 10;
        r.feed(vec![
            data(HONEST, ts, 100, Direction::Recv, REQ, REQ.len() as u32),
            data(
                HONEST,
                ts + 5,
                100,
                Direction::Send,
                RESP,
                RESP.len() as u32,
            ),
        ]);
        honest_requests += 1;
    }
    assert_eq!(
        r.spans.len(),
        honest_requests,
        "every honest request is a span"
    );
    let metrics = r.telemetry.render();
    let shed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tracer_traffic_dropped_total{reason=\"memory_budget\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // 16 heads of 11 KiB do not fit in 64 KiB: some were shed, not all.
    assert!((1..16).contains(&shed), "{shed} shed:\n{metrics}");
    assert!(
        r.table.held_bytes() > BUDGET / 2,
        "the others are still decoded"
    );
    // Everything held is given back when the connections go.
    let mut closes: Vec<Event> = (0..16)
        .map(|i| Event::ConnClose {
            meta: meta(slow(i), ts + 100, 100),
            endpoints: None,
        })
        .collect();
    closes.push(Event::ConnClose {
        meta: meta(HONEST, ts + 100, 100),
        endpoints: None,
    });
    r.feed(closes);
    r.table
        .expire_closing(u64::MAX, &mut r.procs, &r.telemetry, &mut r.down);
    assert_eq!(r.table.held_bytes(), 0);
}
