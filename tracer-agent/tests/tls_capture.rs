//! Root integration tests of TLS capture: real servers and clients over HTTPS,
//! each beside its plaintext twin, must give the same spans and parents; the TLS
//! ones say they were encrypted. Certificates are made by the test (`openssl`).

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;
use support::*;

/// A self-signed certificate for 127.0.0.1 (and localhost): (cert, key) paths.
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .output()
        .expect("run openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

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
    if !require_root("python_https_server_and_clients_give_the_spans_of_their_plaintext_twins") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
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
    }
    let objects = agent.wait_json(20, "16 spans", |o| spans(o).len() >= 16);
    let all = spans(&objects);
    let plain_shapes = check_pairs(&all, plain, false, 4);
    let tls_shapes = check_pairs(&all, tls, true, 4);
    assert_eq!(plain_shapes, tls_shapes);
}

#[test]
fn nginx_over_https_gives_curl_and_nginx_the_spans_of_their_plaintext_twins() {
    if !require_root("nginx_over_https_gives_curl_and_nginx_the_spans_of_their_plaintext_twins") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
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
