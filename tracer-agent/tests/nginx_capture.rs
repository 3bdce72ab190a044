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
    let p = dir.path().display();
    let conf = format!(
        "daemon off; master_process off; worker_processes 1; pid {p}/nginx.pid; error_log {p}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {p}/body; proxy_temp_path {p}/proxy; fastcgi_temp_path {p}/fcgi;
  uwsgi_temp_path {p}/uwsgi; scgi_temp_path {p}/scgi;
  default_type text/plain;
  gzip on; gzip_min_length 0; gzip_types text/plain;
  server {{ listen 127.0.0.1:{port}; root {root}; location = /close {{ return 204; }} }}
}}",
        root = root.display()
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(dir.path().join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let proc = Proc(child);
    wait_for_port(port, "nginx");
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
