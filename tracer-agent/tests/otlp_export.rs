//! End to end: spans built from real traffic arrive at a real OpenTelemetry
//! collector (rotel, from PyPI) over OTLP gRPC and OTLP HTTP/protobuf.

mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::*;

struct Collector {
    _proc: Proc,
    out: Lines,
    err: Lines,
    grpc: u16,
    http: u16,
    _dir: tempfile::TempDir,
}

fn rotel() -> Collector {
    rotel_logging("traces")
}

/// A collector that prints the `signal` it receives (`traces`, `logs`).
fn rotel_logging(signal: &str) -> Collector {
    let bin = std::env::var("TRACER_ROTEL_AGENT").unwrap_or_else(|_| {
        panic!("TRACER_ROTEL_AGENT is not set: run the integration tests through `cargo xtask test`, which installs rotel")
    });
    let (grpc, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(&bin)
        .args([
            "start",
            "--exporter",
            "blackhole",
            "--debug-log",
            signal,
            "--debug-log-verbosity",
            "detailed",
        ])
        .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
        .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
        .arg("--pid-file")
        .arg(dir.path().join("rotel.pid"))
        .arg("--log-file")
        .arg(dir.path().join("rotel.log"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting rotel-agent {bin}: {e}"));
    let out = Lines::follow(child.stdout.take().expect("stdout"));
    let err = Lines::follow(child.stderr.take().expect("stderr"));
    let proc = Proc(child);
    wait_for_port(grpc, "rotel gRPC receiver");
    wait_for_port(http, "rotel HTTP receiver");
    Collector {
        _proc: proc,
        out,
        err,
        grpc,
        http,
        _dir: dir,
    }
}

impl Collector {
    fn text(&self) -> String {
        format!("{}\n{}", self.out.text(), self.err.text())
    }

    fn wait_for(&self, needles: &[&str], secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let text = self.text();
            if needles.iter().all(|n| text.contains(n)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "collector never received {needles:?}; it printed:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn spans_reach_the_collector(protocol: &str) {
    let collector = rotel();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("otlp-check.txt"), "hello collector").unwrap();
    let _server = python_server(port, dir.path(), "1.1");
    let endpoint = match protocol {
        "grpc" => format!("http://127.0.0.1:{}", collector.grpc),
        _ => format!("http://127.0.0.1:{}", collector.http),
    };
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "service-namespace = \"otlp-check-ns\"\n").unwrap();
    let agent = Agent::start(&[
        "--config",
        config.to_str().unwrap(),
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        protocol,
        "--output",
        "none",
        "--port",
        &port.to_string(),
    ]);
    let path = format!("/otlp-check.txt?via={}", protocol.replace('/', "-"));
    curl(&[&format!("http://127.0.0.1:{port}{path}")]);
    // SIGTERM flushes the batch at once.
    std::thread::sleep(Duration::from_millis(500));
    agent.stop();
    collector.wait_for(
        &[
            "/otlp-check.txt",
            "url.path",
            "url.template",
            "service.name",
            "service.instance.id",
            "service.namespace",
            "otlp-check-ns",
            "http.response.status_code",
        ],
        20,
    );
    let text = collector.text();
    assert!(
        text.contains("curl"),
        "the client span's resource names curl:\n{text}"
    );
    assert!(
        text.contains("python"),
        "the server span's resource names python:\n{text}"
    );
    assert!(
        text.contains("GET /otlp-check.txt"),
        "spans are named {{method}} {{url.template}}:\n{text}"
    );
    assert!(
        text.contains("http_server"),
        "the server's service is named after the script it runs:\n{text}"
    );
    assert!(
        !text.contains("via="),
        "the query string must not be exported:\n{text}"
    );
}

#[test]
fn spans_reach_a_real_collector_over_otlp_grpc() {
    if require_root("spans_reach_a_real_collector_over_otlp_grpc") {
        spans_reach_the_collector("grpc");
    }
}

#[test]
fn spans_reach_a_real_collector_over_otlp_http_protobuf() {
    if require_root("spans_reach_a_real_collector_over_otlp_http_protobuf") {
        spans_reach_the_collector("http/protobuf");
    }
}

/// A transaction left open past --leak-after is reported to the collector as an
/// OTLP log record with the leak event name.
#[test]
fn leak_reports_reach_a_real_collector_as_log_records() {
    if !require_root("leak_reports_reach_a_real_collector_as_log_records") {
        return;
    }
    let collector = rotel_logging("logs");
    let pg = Postgres::start();
    let agent = Agent::start(&[
        "--otlp-endpoint",
        &format!("http://127.0.0.1:{}", collector.grpc),
        "--otlp-protocol",
        "grpc",
        "--output",
        "none",
        "--leak-after",
        "1s",
        "--port",
        &pg.port.to_string(),
    ]);
    let child = Command::new(python())
        .arg(support_dir().join("db_clients.py"))
        .args(["pg-hold", &pg.port.to_string(), "8"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start pg-hold");
    let _client = Proc(child);
    let needles = [
        "db.client.connection.leak",
        "idle_in_transaction",
        "db.client.connection.pool.name",
        "postgresql",
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !needles.iter().all(|n| collector.text().contains(n)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, agent_log) = agent.stop();
    let text = collector.text();
    assert!(
        needles.iter().all(|n| text.contains(n)),
        "collector never received {needles:?}; it printed:\n{text}\nthe agent logged:\n{}",
        agent_log.text()
    );
}
