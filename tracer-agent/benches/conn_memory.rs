//! Memory cost of a tracked connection: heap bytes the connection table holds per
//! PostgreSQL client connection that connected, authenticated and ran a few
//! statements (prepared ones included), as the leak detector and the inventory
//! need it; and per idle HTTP/1.1 keep-alive connection (server end and client
//! end) after a few requests, as a proxy with many keep-alive connections holds
//! them. Counted by a global allocator, so the figure is exact for this build.
//! `cargo bench -p tracer-agent --bench conn_memory`.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
};

use tracer_agent::{
    capture::{DataRecord, Endpoints, Event, Meta},
    connections::{ConnectionTable, TableLimits},
    pipeline::Downstream,
    process::ProcessTable,
    telemetry::Telemetry,
};
use tracer_common::{conn::Role, data::Direction};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: delegates to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// The fields every event of one test connection carries.
fn meta_of(sock: u64, ts: u64) -> Meta {
    Meta {
        ts_ns: ts,
        tgid: 4242,
        tid: 4243,
        sock,
        comm: "app".into(),
    }
}

/// A session on one connection: startup, a simple query, a prepared statement
/// parsed and executed, a transaction opened and committed.
fn session(sock: u64, port: u16, t0: u64) -> Vec<Event> {
    let meta = |ts: u64| meta_of(sock, ts);
    let data = |ts: u64, direction: Direction, payload: Vec<u8>| {
        Event::Data(DataRecord {
            meta: meta(ts),
            direction,
            syscall: 0,
            total_len: payload.len() as u32,
            payload: payload.into(),
            flags: 0,
        })
    };
    let mut startup = 196_608u32.to_be_bytes().to_vec();
    startup.extend(b"user\0app\0database\0shop\0\0");
    let mut startup_msg = (startup.len() as u32 + 4).to_be_bytes().to_vec();
    startup_msg.extend(startup);
    let ready = |tx: u8| msg(b'Z', &[tx]);
    let done = |tag: &str, tx: u8| {
        let mut m = msg(b'C', &cstr(tag));
        m.extend(ready(tx));
        m
    };
    let mut auth = msg(b'R', &0u32.to_be_bytes());
    auth.extend(ready(b'I'));
    let mut parse = cstr("s1");
    parse.extend(cstr(
        "SELECT id, total, status FROM orders WHERE customer_id = $1 AND status = 'open'",
    ));
    parse.extend(0u16.to_be_bytes());
    let mut extended = msg(b'P', &parse);
    let mut bind = cstr("");
    bind.extend(cstr("s1"));
    bind.extend([0, 0, 0, 1, 0, 0, 0, 2]);
    bind.extend(b"42");
    bind.extend([0, 0]);
    extended.extend(msg(b'B', &bind));
    extended.extend(msg(b'E', &[0, 0, 0, 0, 0]));
    extended.extend(msg(b'S', &[]));
    let mut parsed = msg(b'1', &[]);
    parsed.extend(msg(b'2', &[]));
    parsed.extend(done("SELECT 3", b'I'));
    vec![
        Event::ConnOpen {
            meta: meta(t0),
            endpoints: Endpoints {
                local: std::net::SocketAddr::from(([10, 0, 0, 7], port)),
                remote: "10.0.0.9:5432".parse().unwrap(),
            },
            role: Role::Client,
        },
        data(t0 + 10, Direction::Send, startup_msg),
        data(t0 + 20, Direction::Recv, auth),
        data(t0 + 30, Direction::Send, msg(b'Q', &cstr("SELECT 1"))),
        data(t0 + 40, Direction::Recv, done("SELECT 1", b'I')),
        data(t0 + 50, Direction::Send, extended),
        data(t0 + 60, Direction::Recv, parsed),
        data(t0 + 70, Direction::Send, msg(b'Q', &cstr("BEGIN"))),
        data(t0 + 80, Direction::Recv, done("BEGIN", b'T')),
        data(
            t0 + 90,
            Direction::Send,
            msg(
                b'Q',
                &cstr("UPDATE orders SET status = 'paid' WHERE id = 42"),
            ),
        ),
        data(t0 + 100, Direction::Recv, done("UPDATE 1", b'T')),
        data(t0 + 110, Direction::Send, msg(b'Q', &cstr("COMMIT"))),
        data(t0 + 120, Direction::Recv, done("COMMIT", b'I')),
    ]
}

/// Three keep-alive exchanges on one HTTP/1.1 connection, then idle.
fn http_session(sock: u64, port: u16, t0: u64, role: Role) -> Vec<Event> {
    let meta = |ts: u64| meta_of(sock, ts);
    let (request_flow, response_flow) = match role {
        Role::Server => (Direction::Recv, Direction::Send),
        _ => (Direction::Send, Direction::Recv),
    };
    let data = |ts: u64, direction: Direction, payload: &[u8]| {
        Event::Data(DataRecord {
            meta: meta(ts),
            direction,
            syscall: 0,
            total_len: payload.len() as u32,
            payload: payload.to_vec().into(),
            flags: 0,
        })
    };
    let request = b"GET /api/orders/42?expand=items HTTP/1.1\r\nHost: shop.internal:8080\r\nUser-Agent: app/1.0\r\nAccept: application/json\r\n\r\n";
    let response =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    let mut events = vec![Event::ConnOpen {
        meta: meta(t0),
        endpoints: Endpoints {
            local: std::net::SocketAddr::from(([10, 0, 0, 7], port)),
            remote: "10.0.0.9:8080".parse().unwrap(),
        },
        role,
    }];
    for i in 0..3 {
        events.push(data(t0 + 10 + i * 20, request_flow, request));
        events.push(data(t0 + 20 + i * 20, response_flow, response));
    }
    events
}

/// Heap bytes per connection after `n` connections ran `session` and went idle.
fn per_connection(
    n: u64,
    procs: &mut ProcessTable,
    telemetry: &Telemetry,
    session: &dyn Fn(u64, u16, u64) -> Vec<Event>,
) -> (isize, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    let mut t = ConnectionTable::new(TableLimits::default());
    // The pool tracker and causality state count too: they hold what the
    // table reports of each connection.
    let mut down = Downstream::default();
    for i in 0..n {
        for e in session(
            0xffff_1000_0000 + i,
            (10_000 + i) as u16,
            1_000_000 + i * 1_000,
        ) {
            t.handle(e, procs, telemetry, &mut down);
        }
        down.spans.clear();
    }
    let rows = t.db_inventory(2_000_000_000, procs, &down.pools).len();
    let held = LIVE.load(Ordering::Relaxed) - before;
    drop(t);
    (held, rows)
}

fn main() {
    let telemetry = Telemetry::new();
    let mut procs = ProcessTable::with_proc_root(16, "/nonexistent");
    let mut warm = Downstream::default();
    let mut table = ConnectionTable::new(TableLimits::default());
    // Warm up the table's own maps, so the growth measured is per connection.
    for i in 0..64u64 {
        for e in session(0xffff_0000_0000 + i, 1000 + i as u16, i * 1_000) {
            table.handle(e, &mut procs, &telemetry, &mut warm);
        }
    }
    drop(warm);
    for n in [1_000u64, 10_000] {
        let (held, rows) = per_connection(n, &mut procs, &telemetry, &session);
        assert_eq!(rows as u64, n, "every connection is in the inventory");
        println!(
            "{n:>6} tracked PostgreSQL connections: {:.1} MiB, {} bytes per connection",
            held as f64 / (1024.0 * 1024.0),
            held / n as isize
        );
    }
    for (role, name) in [(Role::Server, "server"), (Role::Client, "client")] {
        let n = 10_000u64;
        let session = |sock, port, t0| http_session(sock, port, t0, role);
        let (held, rows) = per_connection(n, &mut procs, &telemetry, &session);
        assert_eq!(rows, 0, "HTTP connections are not database connections");
        println!(
            "{n:>6} idle HTTP/1.1 keep-alive connections ({name} end): {:.1} MiB, {} bytes per connection",
            held as f64 / (1024.0 * 1024.0),
            held / n as isize
        );
    }
}
