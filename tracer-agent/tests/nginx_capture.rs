//! Root integration tests against nginx: keep-alive, pipelining and chunked
//! (gzip) responses, seen from nginx (SERVER spans) and from its clients.

mod support;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use support::*;

struct Nginx {
    port: u16,
    proc: Proc,
    _dir: tempfile::TempDir,
}

/// Starts nginx in the foreground with `http` as its http block, files in `dir`,
/// listening on `port`.
fn spawn_nginx(dir: &std::path::Path, port: u16, http: &str) -> Proc {
    let p = dir.display();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; pid {p}/nginx.pid; error_log {p}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {p}/body; proxy_temp_path {p}/proxy; fastcgi_temp_path {p}/fcgi;
  uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;
  {http}
}}"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let proc = Proc(child);
    wait_for_port(port, "nginx");
    proc
}

fn nginx() -> Nginx {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("html");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("small.txt"), "small file\n").unwrap();
    std::fs::write(root.join("a"), "a\n").unwrap();
    std::fs::write(root.join("b"), "bb\n").unwrap();
    std::fs::write(root.join("c"), "ccc\n").unwrap();
    // 60 kB of text: gzip makes it a chunked response spanning many reads.
    let text: String = (0..3000)
        .map(|i| format!("line {i} of the big file\n"))
        .collect();
    std::fs::write(root.join("big.txt"), text).unwrap();
    let port = free_port();
    let http = format!(
        "default_type text/plain;
  gzip on; gzip_min_length 0; gzip_types text/plain;
  server {{ listen 127.0.0.1:{port}; root {root}; location = /close {{ return 204; }} }}",
        root = root.display()
    );
    let proc = spawn_nginx(dir.path(), port, &http);
    Nginx {
        port,
        proc,
        _dir: dir,
    }
}

fn collect(agent: Agent) -> Vec<Value> {
    std::thread::sleep(Duration::from_millis(500));
    let (stdout, _) = agent.stop();
    stdout
        .snapshot()
        .iter()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

fn of(objects: &[Value], kind: &str, pid: u32) -> Vec<Value> {
    spans(objects)
        .into_iter()
        .filter(|s| s["kind"] == kind && s["resource"]["process.pid"] == pid)
        .cloned()
        .collect()
}

fn paths(spans: &[Value]) -> Vec<String> {
    spans
        .iter()
        .map(|s| attr(s, "url.path").as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn pipelined_requests_pair_in_order_on_both_ends() {
    if !require_root("pipelined_requests_pair_in_order_on_both_ends") {
        return;
    }
    let ngx = nginx();
    let agent = Agent::start(&["--output", "json", "--port", &ngx.port.to_string()]);
    let (pid, out) = python_client_plain(
        "http_pipeline.py",
        &[&ngx.port.to_string(), "/a", "/b", "/c", "/missing"],
    );
    assert!(out.contains("responses 5"), "{out}");
    agent.wait_json(15, "ten spans", |o| spans(o).len() >= 10);
    let objects = collect(agent);
    let server = of(&objects, "server", ngx.proc.pid());
    let client = of(&objects, "client", pid);
    let want = ["/a", "/b", "/c", "/missing", "/close"];
    assert_eq!(paths(&server), want, "{server:#?}");
    assert_eq!(paths(&client), want, "{client:#?}");
    let statuses: Vec<&Value> = server
        .iter()
        .map(|s| attr(s, "http.response.status_code"))
        .collect();
    assert_eq!(statuses, [200, 200, 200, 404, 204]);
    server.iter().chain(&client).for_each(assert_span_contract);
    // One connection for all of them.
    assert!(
        client
            .iter()
            .all(|s| attr(s, "network.peer.port") == ngx.port)
    );
    let ports: Vec<&Value> = server.iter().map(|s| attr(s, "client.port")).collect();
    assert!(ports.windows(2).all(|w| w[0] == w[1]), "{ports:?}");
}

#[test]
fn chunked_gzip_responses_on_a_keep_alive_connection() {
    if !require_root("chunked_gzip_responses_on_a_keep_alive_connection") {
        return;
    }
    let ngx = nginx();
    let agent = Agent::start(&["--output", "json", "--port", &ngx.port.to_string()]);
    let base = format!("http://127.0.0.1:{}", ngx.port);
    let (pid, body) = curl(&[
        "--compressed",
        &format!("{base}/big.txt"),
        &format!("{base}/small.txt"),
        &format!("{base}/big.txt"),
    ]);
    assert!(body.contains("line 2999 of the big file"));
    agent.wait_json(15, "six spans", |o| spans(o).len() >= 6);
    let objects = collect(agent);
    let server = of(&objects, "server", ngx.proc.pid());
    let client = of(&objects, "client", pid);
    assert_eq!(
        paths(&server),
        ["/big.txt", "/small.txt", "/big.txt"],
        "{server:#?}"
    );
    assert_eq!(
        paths(&client),
        ["/big.txt", "/small.txt", "/big.txt"],
        "{client:#?}"
    );
    for s in server.iter().chain(&client) {
        assert_span_contract(s);
        assert_eq!(attr(s, "http.response.status_code"), 200);
    }
    // The chunked body's end is found: each exchange ends before the next starts.
    for w in client.windows(2) {
        assert!(
            w[0]["end_unix_nano"].as_u64() <= w[1]["start_unix_nano"].as_u64(),
            "{client:#?}"
        );
    }
}

/// nginx as a reverse proxy that does not instrument: it forwards the caller's
/// `traceparent` unchanged to the backend. Its CLIENT span must not take the
/// header's id (that is curl's span), the backend's SERVER span must hang under
/// nginx's CLIENT span (not skip to curl's), and nothing waits on a cycle.
#[test]
fn a_proxy_forwarding_traceparent_unchanged_keeps_one_exact_tree() {
    if !require_root("a_proxy_forwarding_traceparent_unchanged_keeps_one_exact_tree") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("item"), "item\n").unwrap();
    let backend_port = free_port();
    let backend = python_server(backend_port, dir.path(), "1.1");
    let port = free_port();
    let http = format!(
        "upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 4; }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
    );
    let ngx = spawn_nginx(dir.path(), port, &http);
    let agent = Agent::start(&[
        "--output",
        "json",
        "--port",
        &port.to_string(),
        "--port",
        &backend_port.to_string(),
    ]);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let (curl_pid, body) = curl(&[
        "-H",
        &format!("traceparent: 00-{trace}-{caller}-01"),
        &format!("http://127.0.0.1:{port}/item"),
        &format!("http://127.0.0.1:{port}/item"),
    ]);
    assert_eq!(body, "item\nitem\n");
    agent.wait_json(15, "eight spans", |o| spans(o).len() >= 8);
    std::thread::sleep(Duration::from_millis(500));
    let metrics = agent.get("/metrics");
    let objects = collect(agent);
    let curl_spans = of(&objects, "client", curl_pid);
    let ngx_server = of(&objects, "server", ngx.pid());
    let ngx_client = of(&objects, "client", ngx.pid());
    let backend_server = of(&objects, "server", backend.pid());
    for set in [&curl_spans, &ngx_server, &ngx_client, &backend_server] {
        assert_eq!(set.len(), 2, "{objects:#?}");
    }
    let all: Vec<&Value> = [&curl_spans, &ngx_server, &ngx_client, &backend_server]
        .into_iter()
        .flatten()
        .collect();
    assert!(
        all.iter().all(|s| s["trace_id"] == trace),
        "one trace: {all:#?}"
    );
    let mut ids: Vec<&Value> = all.iter().map(|s| &s["span_id"]).collect();
    ids.sort_by_key(|v| v.to_string());
    ids.dedup();
    assert_eq!(ids.len(), 8, "every span has an id of its own");
    for i in 0..2 {
        // curl sent the header: its span is the header's id (both requests carry
        // the same one, so only the first can own it).
        let c = &curl_spans[i];
        let s = &ngx_server[i];
        let nc = &ngx_client[i];
        let b = &backend_server[i];
        if i == 0 {
            assert_eq!(c["span_id"], caller);
        }
        assert_eq!(
            s["parent_span_id"], c["span_id"],
            "nginx SERVER under curl: {s:#?}"
        );
        assert_eq!(
            nc["parent_span_id"], s["span_id"],
            "nginx CLIENT under its SERVER: {nc:#?}"
        );
        assert_ne!(
            nc["span_id"], caller,
            "nginx did not make the header's span"
        );
        assert_eq!(
            b["parent_span_id"], nc["span_id"],
            "backend under nginx's CLIENT: {b:#?}"
        );
        assert_eq!(attr(b, "tracer.parent.source"), "socket");
    }
    assert!(
        !metrics.contains("outcome=\"cycle\""),
        "no wait cycle: {metrics}"
    );
}
