//! Root integration tests of TLS capture: real servers and clients over HTTPS,
//! each beside its plaintext twin, must give the same spans and parents; the TLS
//! ones say they were encrypted. Certificates are made by the test (`openssl`).

mod support;

use std::process::{Command, Stdio};

use serde_json::Value;
use support::*;

/// What a span must agree on with its plaintext twin.
fn shape(span: &Value) -> Value {
    serde_json::json!({
        "kind": span["kind"],
        "name": span["name"],
        "status": span["status"],
        "url.path": attr(span, "url.path"),
        "http.request.method": attr(span, "http.request.method"),
        "http.response.status_code": attr(span, "http.response.status_code"),
        "network.protocol.version": attr(span, "network.protocol.version"),
    })
}

fn by_port<'a>(all: &[&'a Value], kind: &str, port: u16) -> Vec<&'a Value> {
    all.iter()
        .copied()
        .filter(|s| s["kind"] == kind)
        .filter(|s| {
            let key = if kind == "server" {
                "server.port"
            } else {
                "network.peer.port"
            };
            attr(s, key) == port
        })
        .collect()
}

/// The client's spans and the server's on one port: as many of each, each server
/// span the child of the client span of the same request, and the TLS ones (and
/// only they) saying so.
fn check_pairs(all: &[&Value], port: u16, tls: bool, requests: usize) -> Vec<Value> {
    let clients = by_port(all, "client", port);
    let servers = by_port(all, "server", port);
    assert_eq!(
        clients.len(),
        requests,
        "client spans on {port}: {clients:#?}"
    );
    assert_eq!(
        servers.len(),
        requests,
        "server spans on {port}: {servers:#?}"
    );
    for s in clients.iter().chain(&servers) {
        assert_span_contract(s);
        let encrypted = attr(s, "tls.protocol.name");
        if tls {
            assert_eq!(encrypted, "tls", "{s:#}");
        } else {
            assert_eq!(encrypted, &Value::Null, "{s:#}");
        }
    }
    let scheme = if tls { "https" } else { "http" };
    for c in &clients {
        let full = attr(c, "url.full").as_str().unwrap_or_default();
        assert!(full.starts_with(&format!("{scheme}://")), "{full}");
    }
    for s in &servers {
        assert_eq!(attr(s, "url.scheme"), scheme, "{s:#}");
        assert!(
            clients.iter().any(|c| c["span_id"] == s["parent_span_id"]
                && c["trace_id"] == s["trace_id"]
                && attr(c, "url.path") == attr(s, "url.path")),
            "server span without its client span as parent: {s:#}\nclients: {clients:#?}"
        );
    }
    let mut shapes: Vec<Value> = clients.iter().chain(&servers).map(|s| shape(s)).collect();
    shapes.sort_by_key(|v| v.to_string());
    shapes
}

#[test]
fn python_https_server_and_clients_give_the_spans_of_their_plaintext_twins() {
    // The server (http.server, blocking ssl), `requests` and curl keep OpenSSL on
    // the socket; aiohttp keeps it behind a memory BIO.
    if !require_root("python_https_server_and_clients_give_the_spans_of_their_plaintext_twins") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_certificate(dir.path());
    let root = dir.path().join("files");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("page.txt"), "a page\n").unwrap();
    let (plain, tls) = (free_port(), free_port());
    let _plain_server = python_server(plain, &root, "1.1");
    let child = Command::new("python3")
        .arg(support_dir().join("http_server.py"))
        .arg(tls.to_string())
        .arg(&root)
        .arg("1.1")
        .arg(&cert)
        .arg(&key)
        .stdout(Stdio::null())
        .spawn()
        .expect("start the HTTPS server");
    let _tls_server = Proc(child);
    wait_for_port(tls, "python https server");
    let agent = Agent::start(&[
        "--output",
        "json",
        "--port",
        &plain.to_string(),
        "--port",
        &tls.to_string(),
    ]);
    let ca = cert.to_string_lossy().into_owned();
    for (port, scheme) in [(plain, "http"), (tls, "https")] {
        // `requests` (urllib3, Python's ssl), three requests on one connection.
        let url = format!("{scheme}://127.0.0.1:{port}/page.txt");
        let (_, out) = python_client("http_clients.py", &["get", &url, "3", &ca]);
        assert_eq!(out.matches("get 200 7").count(), 3, "{out}");
        // curl (libcurl, OpenSSL), one request.
        let url = format!("{scheme}://127.0.0.1:{port}/page.txt?from=curl");
        let (_, body) = curl(&["--cacert", &ca, &url]);
        assert_eq!(body, "a page\n");
        // aiohttp (asyncio: OpenSSL behind a memory BIO), two requests.
        let url = format!("{scheme}://127.0.0.1:{port}/page.txt?from=aiohttp");
        let (_, out) = python_client("http_clients.py", &["aio-get", &url, "2", &ca]);
        assert_eq!(out.matches("get 200 7").count(), 2, "{out}");
    }
    let objects = agent.wait_json(20, "24 spans", |o| spans(o).len() >= 24);
    let all = spans(&objects);
    let plain_shapes = check_pairs(&all, plain, false, 6);
    let tls_shapes = check_pairs(&all, tls, true, 6);
    assert_eq!(plain_shapes, tls_shapes);
}

#[test]
fn nginx_over_https_gives_curl_and_nginx_the_spans_of_their_plaintext_twins() {
    if !require_root("nginx_over_https_gives_curl_and_nginx_the_spans_of_their_plaintext_twins") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_certificate(dir.path());
    let root = dir.path().join("html");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("a"), "a\n").unwrap();
    let (plain, tls) = (free_port(), free_port());
    let p = dir.path().display();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; pid {p}/nginx.pid; error_log {p}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {p}/body; proxy_temp_path {p}/proxy; fastcgi_temp_path {p}/fcgi;
  uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;
  default_type text/plain;
  server {{ listen 127.0.0.1:{plain}; root {root}; }}
  server {{
    listen 127.0.0.1:{tls} ssl; root {root};
    ssl_certificate {cert}; ssl_certificate_key {key};
  }}
}}",
        root = root.display(),
        cert = cert.display(),
        key = key.display(),
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let _nginx = Proc(child);
    wait_for_port(plain, "nginx");
    wait_for_port(tls, "nginx (TLS)");
    let agent = Agent::start(&[
        "--output",
        "json",
        "--port",
        &plain.to_string(),
        "--port",
        &tls.to_string(),
    ]);
    let ca = cert.to_string_lossy().into_owned();
    for (port, scheme) in [(plain, "http"), (tls, "https")] {
        let a = format!("{scheme}://127.0.0.1:{port}/a");
        let missing = format!("{scheme}://127.0.0.1:{port}/missing");
        // Two requests on one keep-alive connection, then a new one.
        let (_, body) = curl(&["--cacert", &ca, &a, &missing]);
        assert!(body.starts_with("a\n"), "{body}");
        curl(&["--cacert", &ca, &a]);
    }
    let objects = agent.wait_json(20, "12 spans", |o| spans(o).len() >= 12);
    let all = spans(&objects);
    let plain_shapes = check_pairs(&all, plain, false, 3);
    let tls_shapes = check_pairs(&all, tls, true, 3);
    assert_eq!(plain_shapes, tls_shapes);
}

/// What a database call must agree on with its plaintext twin.
fn db_shape(span: &Value) -> Value {
    serde_json::json!({
        "name": span["name"],
        "status": span["status"],
        "status_message": span["status_message"],
        "db.system.name": attr(span, "db.system.name"),
        "db.namespace": attr(span, "db.namespace"),
        "db.operation.name": attr(span, "db.operation.name"),
        "db.query.text": attr(span, "db.query.text"),
        "db.response.status_code": attr(span, "db.response.status_code"),
        "server.port": attr(span, "server.port"),
    })
}

/// The CLIENT spans of process `pid`: its database calls.
fn calls_of(objects: &[Value], pid: u32) -> Vec<Value> {
    spans(objects)
        .into_iter()
        .filter(|s| s["kind"] == "client" && s["resource"]["process.pid"] == pid)
        .cloned()
        .collect()
}

/// Waits until each session (process) has its failing query (every session here
/// ends with one), then stops the agent: everything it printed.
fn stop_after_each_session_ended(agent: Agent, pids: &[u32]) -> Vec<Value> {
    agent.wait_json(20, "every session's failing query", |o| {
        pids.iter()
            .all(|pid| calls_of(o, *pid).iter().any(|s| s["status"] == "error"))
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    agent.stop_json()
}

/// The calls of a session over TLS and of its plaintext twin: each keeps the
/// span contract, only the TLS ones say they were encrypted, and both are the
/// same calls in the same order.
fn assert_db_twins(what: &str, tls: &[Value], plain: &[Value]) {
    for s in tls {
        assert_span_contract(s);
        assert_eq!(attr(s, "tls.protocol.name"), "tls", "{what}: {s:#}");
    }
    for s in plain {
        assert_span_contract(s);
        assert!(attr(s, "tls.protocol.name").is_null(), "{what}: {s:#}");
    }
    let shapes = |calls: &[Value]| calls.iter().map(db_shape).collect::<Vec<_>>();
    assert_eq!(shapes(tls), shapes(plain), "{what}");
}

/// psycopg against a PostgreSQL with `ssl = on`: a session with
/// `sslmode=require`, then the same with `sslmode=disable`. The encrypted one
/// comes first: psycopg's wheel brings its own libssl, which no process had loaded
/// before, so it is attached while the process starts (the loader's probe), not
/// found later by a scan. Both give the same calls (a simple query, a prepared
/// statement executed three times, a failing query); the encrypted ones say so.
#[test]
fn psycopg_over_tls_gives_the_calls_of_its_plaintext_twin() {
    if !require_root("psycopg_over_tls_gives_the_calls_of_its_plaintext_twin") {
        return;
    }
    let pg = Postgres::start_tls();
    let port = pg.port.to_string();
    let agent = Agent::start(&["--output", "json", "--port", &port]);
    let mut sessions = Vec::new();
    for (sslmode, encrypted) in [("require", "True"), ("disable", "False")] {
        let (pid, out) = python_client("db_clients.py", &["pg-session", &port, sslmode]);
        assert!(out.contains(&format!("ssl {encrypted}")), "{out}");
        assert!(out.contains("failed as expected"), "{out}");
        sessions.push(pid);
    }
    let objects = stop_after_each_session_ended(agent, &sessions);
    let (tls, plain) = (
        calls_of(&objects, sessions[0]),
        calls_of(&objects, sessions[1]),
    );
    assert_eq!(plain.len(), 5, "{plain:#?}");
    assert_eq!(tls.len(), 5, "{tls:#?}");
    assert_db_twins("psycopg", &tls, &plain);
    assert_eq!(
        attr(&tls[1], "db.query.text"),
        "SELECT $1::int + ? AS answer, ? AS s",
        "the prepared statement's text, read inside TLS"
    );
    let everything = serde_json::to_string(&objects).unwrap();
    assert!(
        !everything.contains("secret-literal"),
        "a SQL literal leaked"
    );
}

/// mysql-connector-python against a MariaDB with a certificate, in both its
/// implementations: a session over TLS, then the same without. The TLS one gives
/// the same calls (the cipher asked, a server-side prepared statement executed
/// twice, a failing query, and what the implementation sends first), each saying
/// it was encrypted.
#[test]
fn mysql_connector_over_tls_gives_the_calls_of_its_plaintext_twin() {
    if !require_root("mysql_connector_over_tls_gives_the_calls_of_its_plaintext_twin") {
        return;
    }
    let db = Mariadb::start_tls();
    let port = db.port.to_string();
    let agent = Agent::start(&["--output", "json", "--port", &port]);
    // (implementation, tls, pid)
    let mut sessions = Vec::new();
    for implementation in ["pure", "c"] {
        for (tls, encrypted) in [("on", "True"), ("off", "False")] {
            let (pid, out) = python_client(
                "db_clients.py",
                &["mysql-prepared", &port, implementation, tls],
            );
            assert!(out.contains(&format!("ssl {encrypted}")), "{out}");
            assert!(out.contains("failed as expected"), "{out}");
            sessions.push((implementation, tls, pid));
        }
    }
    // Each session ends with its failing query.
    let pids: Vec<u32> = sessions.iter().map(|(_, _, pid)| *pid).collect();
    let objects = stop_after_each_session_ended(agent, &pids);
    for pair in sessions.chunks(2) {
        let (implementation, _, tls_pid) = pair[0];
        let tls = calls_of(&objects, tls_pid);
        let plain = calls_of(&objects, pair[1].2);
        // The pure implementation also sets the session's names and autocommit.
        assert!(tls.len() >= 4, "{implementation}: {tls:#?}");
        assert_db_twins(implementation, &tls, &plain);
        // The namespace comes from the handshake response, read inside TLS.
        assert!(tls.iter().all(|s| attr(s, "db.namespace") == "mysql"));
    }
    let everything = serde_json::to_string(&objects).unwrap();
    assert!(
        !everything.contains("secret-literal"),
        "a SQL literal leaked"
    );
}

/// Runs `tls_node.js` to its end: (pid, stdout).
fn node(args: &[&str]) -> (u32, String) {
    let child = Command::new("node")
        .env("NODE_PATH", node_path())
        .arg(support_dir().join("tls_node.js"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node (Debian's nodejs)");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for node");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "node {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, stdout)
}

/// Node.js keeps OpenSSL behind memory BIOs (libuv moves the ciphertext): its
/// plaintext is placed on the connection by the ciphertext beside it. A Node
/// HTTPS server and a Node HTTPS client (three requests on one keep-alive
/// connection) give the spans and parents of their plaintext twins.
#[test]
fn node_https_client_and_server_give_the_spans_of_their_plaintext_twins() {
    if !require_root("node_https_client_and_server_give_the_spans_of_their_plaintext_twins") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_certificate(dir.path());
    let (plain, tls) = (free_port(), free_port());
    let (cert_s, key_s) = (cert.to_string_lossy(), key.to_string_lossy());
    let mut servers = Vec::new();
    for (mode, port) in [("http", plain), ("https", tls)] {
        let child = Command::new("node")
            .env("NODE_PATH", node_path())
            .arg(support_dir().join("tls_node.js"))
            .args(["serve", mode, &port.to_string(), &cert_s, &key_s])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the node server");
        servers.push(Proc(child));
        wait_for_port(port, "node server");
    }
    let agent = Agent::start(&[
        "--output",
        "json",
        "--port",
        &plain.to_string(),
        "--port",
        &tls.to_string(),
    ]);
    for (mode, port) in [("https", tls), ("http", plain)] {
        let (_, out) = node(&["get", mode, &port.to_string(), "/hello", "3", &cert_s]);
        assert_eq!(out.matches("get 200 16").count(), 3, "{out}");
    }
    let objects = agent.wait_json(20, "12 spans", |o| spans(o).len() >= 12);
    let all = spans(&objects);
    let plain_shapes = check_pairs(&all, plain, false, 3);
    let tls_shapes = check_pairs(&all, tls, true, 3);
    assert_eq!(plain_shapes, tls_shapes);
    let metrics = agent.get("/metrics");
    assert!(
        !metrics.contains("reason=\"tls_unplaced\""),
        "every plaintext record was placed:\n{metrics}"
    );
}

/// node-postgres with `ssl` (Node's TLS over the socket it opened, after the
/// SSLRequest) and without: the same calls, the TLS ones saying so.
#[test]
fn node_postgres_over_tls_gives_the_calls_of_its_plaintext_twin() {
    if !require_root("node_postgres_over_tls_gives_the_calls_of_its_plaintext_twin") {
        return;
    }
    let pg = Postgres::start_tls();
    let port = pg.port.to_string();
    let agent = Agent::start(&["--output", "json", "--port", &port]);
    let mut sessions = Vec::new();
    for (tls, says) in [("on", "true"), ("off", "false")] {
        let (pid, out) = node(&["pg", tls, &port]);
        assert!(out.contains(&format!("ssl {says}")), "{out}");
        assert!(out.contains("done"), "{out}");
        sessions.push(pid);
    }
    let objects = stop_after_each_session_ended(agent, &sessions);
    let (tls, plain) = (
        calls_of(&objects, sessions[0]),
        calls_of(&objects, sessions[1]),
    );
    assert_eq!(plain.len(), 4, "{plain:#?}");
    assert_db_twins("node-postgres", &tls, &plain);
    assert_eq!(
        attr(&tls[1], "db.query.text"),
        "SELECT $1::int + ? AS answer, $2::text AS s"
    );
}
