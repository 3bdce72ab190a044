//! Root integration tests: stopping. SIGHUP flushes like SIGTERM; a client that
//! sent half a request to the agent's endpoint does not hold stopping up; while a
//! black-holed collector keeps the last flush waiting, a second signal stops the
//! agent at once; a stop asked for while the agent starts is a clean stop.

mod support;

use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use support::*;

/// A server on a fresh port, and the agent tracing it with `extra` arguments.
fn traced(extra: &[&str]) -> (Proc, u16, Agent, tempfile::TempDir) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "hello\n").unwrap();
    let server = python_server(port, dir.path(), "1.1");
    wait_for_port(port, "the HTTP server");
    let port_arg = port.to_string();
    let mut args = vec!["--port", port_arg.as_str()];
    args.extend_from_slice(extra);
    let agent = Agent::start(&args);
    (server, port, agent, dir)
}

#[test]
fn sighup_flushes_and_stops_like_sigterm() {
    if !require_root("shutdown_sighup") {
        return;
    }
    let (_server, port, mut agent, _dir) = traced(&["--output", "json"]);
    curl(&[&format!("http://127.0.0.1:{port}/")]);
    agent.wait_json(20, "the server span", |o| {
        spans(o).iter().any(|s| s["kind"] == "server")
    });
    agent.signal(libc::SIGHUP);
    let status = agent.wait_exit(20).expect("the agent stops on SIGHUP");
    assert!(status.success(), "{status}\n{}", agent.stderr.text());
    assert!(
        agent.stderr.text().contains("SIGHUP: stopping"),
        "{}",
        agent.stderr.text()
    );
}

#[test]
fn a_half_sent_request_on_the_endpoint_does_not_hold_up_stopping() {
    if !require_root("shutdown_half_request") {
        return;
    }
    let (_server, _port, mut agent, _dir) = traced(&["--output", "none"]);
    let mut half = TcpStream::connect(&agent.listen).expect("connect to the endpoint");
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nX-Slow: ")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let asked = Instant::now();
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(15)
        .unwrap_or_else(|| panic!("still running 15 s after SIGTERM:\n{}", agent.stderr.text()));
    assert!(status.success(), "{status}\n{}", agent.stderr.text());
    assert!(asked.elapsed() < Duration::from_secs(15));
    drop(half);
}

#[test]
fn a_second_signal_stops_at_once_while_a_hung_collector_holds_the_flush() {
    if !require_root("shutdown_second_signal") {
        return;
    }
    // Takes connections, never answers.
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", hole.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in hole.incoming().take(64) {
            conns.push(c);
        }
    });
    let (_server, port, mut agent, _dir) = traced(&[
        "--output",
        "none",
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        "http/protobuf",
        "--otlp-timeout",
        "15s",
    ]);
    for _ in 0..5 {
        curl(&[&format!("http://127.0.0.1:{port}/")]);
    }
    // The spans are built (2 s parent wait) and waiting for the collector.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent
        .get("/metrics")
        .contains("tracer_spans_built_total 10")
    {
        assert!(Instant::now() < deadline, "{}", agent.get("/metrics"));
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.signal(libc::SIGTERM);
    assert!(
        agent.wait_exit(2).is_none(),
        "the first signal waits for the collector (up to the stop budget)"
    );
    agent.signal(libc::SIGTERM);
    let status = agent
        .wait_exit(5)
        .unwrap_or_else(|| panic!("a second SIGTERM did not stop it:\n{}", agent.stderr.text()));
    assert_eq!(status.code(), Some(2), "{}", agent.stderr.text());
    assert!(
        agent.stderr.text().contains("second signal (SIGTERM)"),
        "{}",
        agent.stderr.text()
    );
    drop(held);
}

#[test]
fn a_stop_asked_for_while_the_agent_starts_is_a_clean_stop() {
    if !require_root("shutdown_while_starting") {
        return;
    }
    // The endpoint is bound (and takes connections into its backlog) before the
    // programs are loaded: SIGTERM then lands while the agent loads, attaches and
    // gives up its capabilities.
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tracer-agent"))
        .args(["--output", "none", "--listen", &listen])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&listen).is_err() {
        assert!(Instant::now() < deadline, "the agent never bound {listen}");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill with a child's pid and a valid signal.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait for the agent");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(
        status.success(),
        "a SIGTERM during start-up must stop the agent cleanly, not kill it: {status}\n{stderr}"
    );
    assert!(stderr.contains("SIGTERM: stopping"), "{stderr}");
}
