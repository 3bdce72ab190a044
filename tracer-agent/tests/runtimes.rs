//! Root integration tests of parent inference on runtimes whose rules do not hold:
//! a real Go `net/http` service (goroutines move between threads, and its HTTP
//! client writes requests from a goroutine of its own) must get no thread or timing
//! link, while the links across processes (socket rule) stay exact.

mod support;

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use support::*;

/// Builds the benchmark's Go gateway (standard library only) into `dir`.
fn build_go_gateway(dir: &std::path::Path) -> std::path::PathBuf {
    let out = dir.join("go_gateway");
    let status = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&out)
        .arg(support_dir().join("models/go_gateway.go"))
        .env("GO111MODULE", "off")
        .env("GOCACHE", dir.join("cache"))
        .env("GOPATH", dir.join("path"))
        .env("GOFLAGS", "")
        .status()
        .expect("run go build: `cargo xtask setup` installs golang-go");
    assert!(status.success(), "go build failed: {status}");
    out
}

#[test]
fn a_go_service_gets_no_thread_or_timing_links_and_exact_socket_links() {
    if !require_root("a_go_service_gets_no_thread_or_timing_links_and_exact_socket_links") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let gateway = build_go_gateway(dir.path());
    let (b, c) = (free_port(), free_port());
    let svc_c = Proc(
        Command::new(python())
            .arg(support_dir().join("chain.py"))
            .args(["serve", &c.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .expect("start chain service"),
    );
    wait_for_port(c, "chain service");
    let svc_b = Proc(
        Command::new(&gateway)
            .arg(b.to_string())
            .args(["--next", &format!("http://127.0.0.1:{c}"), "--calls", "2"])
            .env("GOMAXPROCS", "4")
            .stdout(Stdio::null())
            .spawn()
            .expect("start the Go gateway"),
    );
    wait_for_port(b, "Go gateway");
    let agent = Agent::start(&[
        "--output",
        "json",
        "--port",
        &b.to_string(),
        "--port",
        &c.to_string(),
    ]);
    let requests = 60;
    let (load_pid, out) = python_client(
        "chain.py",
        &[
            "load",
            &format!("http://127.0.0.1:{b}"),
            &requests.to_string(),
            "8",
        ],
    );
    assert!(out.contains("errors 0"), "{out}");
    // Per request: the load CLIENT, B's SERVER, B's two CLIENTs, C's two SERVERs.
    agent.wait_json(30, "every span", |o| spans(o).len() >= requests * 6);
    std::thread::sleep(Duration::from_millis(500));
    let metrics = agent.get("/metrics");
    let (stdout, _) = agent.stop();
    let objects: Vec<Value> = stdout
        .snapshot()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let all = spans(&objects);
    let pid = |s: &Value| s["resource"]["process.pid"].as_u64().unwrap_or(0) as u32;
    let of = |p: u32, kind: &str| -> Vec<&Value> {
        all.iter()
            .copied()
            .filter(|s| pid(s) == p && s["kind"] == kind)
            .collect()
    };
    let (load, b_server, b_client, c_server) = (
        of(load_pid, "client"),
        of(svc_b.pid(), "server"),
        of(svc_b.pid(), "client"),
        of(svc_c.pid(), "server"),
    );
    assert_eq!(load.len(), requests);
    assert_eq!(b_server.len(), requests);
    assert_eq!(b_client.len(), 2 * requests);
    assert_eq!(c_server.len(), 2 * requests);
    // Never wrong: the Go process's calls are not linked by a rule that assumes a
    // request stays on its thread.
    for s in &b_client {
        assert_eq!(
            attr(s, "tracer.parent.source"),
            "none",
            "a Go call linked by a thread rule: {s:#}"
        );
        assert!(s["parent_span_id"].is_null());
    }
    // Across processes every link is exact: the parent is the span at the other
    // end of the same exchange (same path).
    let by_id: HashMap<&Value, &Value> = all.iter().map(|s| (&s["span_id"], *s)).collect();
    for (children, parents_pid) in [(&b_server, load_pid), (&c_server, svc_b.pid())] {
        for s in children.iter() {
            assert_eq!(attr(s, "tracer.parent.source"), "socket", "{s:#}");
            let parent = by_id
                .get(&s["parent_span_id"])
                .unwrap_or_else(|| panic!("parent not exported: {s:#}"));
            assert_eq!(pid(parent), parents_pid);
            assert_eq!(parent["kind"], "client");
            assert_eq!(attr(parent, "url.path"), attr(s, "url.path"));
        }
    }
    // ... and the refusals are counted.
    let refused: u64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("tracer_parent_inference_total") && l.contains("refused_moves_work")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        refused >= 2 * requests as u64,
        "refused_moves_work {refused}: {metrics}"
    );
}
