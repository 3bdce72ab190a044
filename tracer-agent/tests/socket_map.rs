//! Root integration test: the kernel's socket map when there are more sockets
//! than it holds. It never pushes a live socket out: connections followed before
//! it filled keep their role and their spans, new sockets beyond it are refused
//! and counted (`tracer_kernel_total{counter="sock_map_full"}`), and once sockets
//! close there is room again. Its own test binary: every TCP socket on the host
//! takes a slot, so no other test may run beside it.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use serde_json::Value;
use support::*;

/// Sockets the map holds: 64 loopback connections, since both ends of each
/// take a slot (with room for the host's other busy sockets beside the early ones).
const MAP_SOCKETS: usize = 128;
const EARLY: usize = 12;
/// Far more than the map holds.
const FLOOD: usize = 200;

/// One keep-alive request for `path` on `conn`; returns the status line.
fn request(conn: &mut TcpStream, path: &str) -> String {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The file served is "hello\n": the answer ends with it.
    while !got.ends_with(b"hello\n") {
        let n = conn.read(&mut buf).expect("read the answer");
        assert!(n > 0, "server closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

fn server_spans_for<'a>(objects: &'a [Value], path: &str) -> Vec<&'a Value> {
    spans(objects)
        .into_iter()
        .filter(|s| s["kind"] == "server" && attr(s, "url.path") == path)
        .collect()
}

fn counter(metrics: &str, name: &str) -> u64 {
    let key = format!("tracer_kernel_total{{counter=\"{name}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_full_socket_map_refuses_and_counts_new_sockets_and_keeps_the_live_ones() {
    if !require_root("socket_map_full") {
        return;
    }
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    for file in ["index.html", "flood", "late"] {
        std::fs::write(dir.path().join(file), "hello\n").unwrap();
    }
    let _server = python_server(port, dir.path(), "1.1");
    wait_for_port(port, "the HTTP server");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("max-connections = {MAP_SOCKETS}\n")).unwrap();
    let port_arg = port.to_string();
    let agent = Agent::start(&[
        "--config",
        config.to_str().unwrap(),
        "--port",
        &port_arg,
        "--output",
        "json",
    ]);

    let addr = format!("127.0.0.1:{port}");
    let mut early: Vec<TcpStream> = (0..EARLY)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    for c in &mut early {
        assert!(request(c, "/").contains("200"));
    }
    agent.wait_json(20, "the early connections' spans", |o| {
        server_spans_for(o, "/").len() >= EARLY
    });

    // Far more sockets than the map holds, each used once and kept open.
    let mut flood: Vec<TcpStream> = (0..FLOOD)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    for c in &mut flood {
        assert!(request(c, "/flood").contains("200"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let refused = counter(&agent.get("/metrics"), "sock_map_full");
    assert!(
        refused > 0,
        "{} sockets in a map of {MAP_SOCKETS}, none counted refused:\n{}",
        2 * (EARLY + FLOOD),
        agent.get("/metrics")
    );

    // The connections followed before the map filled are still followed, as
    // the server side, on the same connections.
    for c in &mut early {
        assert!(request(c, "/index.html").contains("200"));
    }
    let objects = agent.wait_json(20, "the early connections' second spans", |o| {
        server_spans_for(o, "/index.html").len() >= EARLY
    });
    let firsts = server_spans_for(&objects, "/");
    let seconds = server_spans_for(&objects, "/index.html");
    assert_eq!(seconds.len(), EARLY, "one span per second request");
    for s in &seconds {
        assert_span_contract(s);
        let peer = attr(s, "client.port");
        assert!(
            firsts.iter().any(|f| attr(f, "client.port") == peer),
            "a second request on a connection not seen before the flood: {s}"
        );
    }
    // Beyond the map, nothing was made up: at most the flood sockets that found
    // a slot were traced, never more than the map holds.
    let flooded = server_spans_for(&objects, "/flood").len();
    assert!(flooded < MAP_SOCKETS, "{flooded} flood spans");

    // Closing frees the slots: a new connection is followed again.
    drop(flood);
    std::thread::sleep(Duration::from_millis(500));
    let mut late = TcpStream::connect(&addr).expect("connect");
    assert!(request(&mut late, "/late").contains("200"));
    agent.wait_json(
        20,
        "a span of a connection opened after the flood closed",
        |o| server_spans_for(o, "/late").len() == 1,
    );
    drop(early);
    drop(late);
    let objects = agent.stop_json();
    assert_eq!(server_spans_for(&objects, "/late").len(), 1);
}
