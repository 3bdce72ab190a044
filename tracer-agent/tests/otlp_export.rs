//! End to end: spans built from real traffic arrive at a real OpenTelemetry
//! collector (rotel, from PyPI) over OTLP gRPC and OTLP HTTP/protobuf; and over
//! TLS with a required API-key header, the way hosted backends take them: nginx
//! (Debian's) terminates TLS with a certificate the test makes, refuses requests
//! without the key, and passes the rest to rotel.

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

/// A TLS front for `collector` (nginx, as an ingress would be): certificates
/// from a CA the test makes, `x-api-key` required, gRPC to rotel's gRPC
/// receiver and `/v1/*` to its HTTP one. Its access log records each request's
/// protocol, status, TLS version and encoding.
struct TlsFront {
    _proc: Proc,
    port: u16,
    dir: tempfile::TempDir,
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TlsFront {
    fn start(collector: &Collector, api_key: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            d,
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=tracer test CA",
                ],
            ]
            .concat(),
        );
        openssl(
            d,
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        std::fs::create_dir_all(d.join("tmp")).unwrap();
        let port = free_port();
        let p = d.display();
        let conf = format!(
            r#"user root;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format otlp '$request $status $ssl_protocol ce=$http_content_encoding ge=$http_grpc_encoding';
    access_log {p}/access.log otlp;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {p}/server.pem;
        ssl_certificate_key {p}/server.key;
        if ($http_x_api_key != "{api_key}") {{ return 401; }}
        location /v1/ {{ proxy_pass http://127.0.0.1:{http}; }}
        location / {{ grpc_pass grpc://127.0.0.1:{grpc}; }}
    }}
}}
"#,
            http = collector.http,
            grpc = collector.grpc,
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let child = Command::new("/usr/sbin/nginx")
            .arg("-p")
            .arg(d)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nginx (Debian's /usr/sbin/nginx)");
        let proc = Proc(child);
        wait_for_port(port, "nginx TLS front");
        Self {
            _proc: proc,
            port,
            dir,
        }
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}

/// Serves one file and has curl fetch it with the agent following the port.
fn traffic_for(agent_args: &[&str], env: &[(&str, &str)], path: &str) -> (Agent, Proc) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(path.trim_start_matches('/')), "hello").unwrap();
    let server = python_server(port, dir.path(), "1.1");
    let mut args = agent_args.to_vec();
    let port_text = port.to_string();
    args.extend(["--output", "none", "--port", &port_text]);
    let agent = Agent::start_with(&[], env, &args);
    curl(&[&format!("http://127.0.0.1:{port}{path}")]);
    std::thread::sleep(Duration::from_millis(500));
    (agent, server)
}

fn tls_and_header(protocol: &str, compression: &str, path: &str) {
    let collector = rotel();
    let key = format!("key-{}", free_port());
    let front = TlsFront::start(&collector, &key);
    let endpoint = format!("https://localhost:{}", front.port);
    let headers = format!("x-api-key={key}");
    let (agent, _server) = traffic_for(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            protocol,
            "--otlp-ca-file",
            &front.ca(),
            "--otlp-compression",
            compression,
        ],
        &[("OTEL_EXPORTER_OTLP_HEADERS", &headers)],
        path,
    );
    let (_, stderr) = agent.stop();
    collector.wait_for(&[path, "url.template"], 20);
    let log = front.access_log();
    // TLS 1.2 or 1.3, as the two ends agree.
    let (request, encoding) = match protocol {
        "grpc" => (
            "POST /opentelemetry.proto.collector.trace.v1.TraceService/Export HTTP/2.0 200 TLSv1.",
            "ge=gzip",
        ),
        _ => ("POST /v1/traces HTTP/1.1 200 TLSv1.", "ce=gzip"),
    };
    let line = log
        .lines()
        .find(|l| l.starts_with(request))
        .unwrap_or_else(|| panic!("no {request:?} in nginx's access log:\n{log}"));
    if compression == "gzip" {
        assert!(line.contains(encoding), "compressed: {line}");
    }
    assert!(
        !stderr.text().contains(&key),
        "the header's value never reaches the log:\n{}",
        stderr.text()
    );
}

#[test]
fn spans_reach_a_collector_over_grpc_with_tls_a_required_header_and_gzip() {
    if require_root("otlp_grpc_tls_header_gzip") {
        tls_and_header("grpc", "gzip", "/tls-grpc.txt");
    }
}

#[test]
fn spans_reach_a_collector_over_http_protobuf_with_tls_a_required_header_and_gzip() {
    if require_root("otlp_http_tls_header") {
        tls_and_header("http/protobuf", "gzip", "/tls-http.txt");
    }
}

/// A wrong key is refused by the front: the agent says so (with the status,
/// never the key), counts it, and nothing reaches the collector. Without the
/// test CA the handshake fails and the agent names why.
#[test]
fn a_wrong_key_or_an_unknown_ca_is_a_clear_counted_failure() {
    if !require_root("otlp_tls_wrong_key") {
        return;
    }
    let collector = rotel();
    let front = TlsFront::start(&collector, "the-right-key");
    let endpoint = format!("https://localhost:{}", front.port);
    for (protocol, ca) in [
        ("grpc", true),
        ("http/protobuf", true),
        ("grpc", false),
        ("http/protobuf", false),
    ] {
        let ca_file = front.ca();
        let mut args = vec!["--otlp-endpoint", &endpoint, "--otlp-protocol", protocol];
        if ca {
            args.extend(["--otlp-ca-file", &ca_file]);
        }
        let (agent, _server) = traffic_for(
            &args,
            &[("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=wrong-key-s3cr3t")],
            "/refused.txt",
        );
        // The first export runs a second after the span.
        std::thread::sleep(Duration::from_millis(1500));
        let metrics = agent.get("/metrics");
        let (_, stderr) = agent.stop();
        let log = stderr.text();
        let why = if !ca {
            "invalid peer certificate"
        } else {
            "401"
        };
        assert!(
            log.contains(why),
            "{protocol}, CA {ca}: the log says {why:?}:\n{log}"
        );
        assert!(
            !log.contains("s3cr3t"),
            "the key never reaches the log:\n{log}"
        );
        assert!(
            metrics.lines().any(
                |l| l.starts_with("tracer_export_errors_total{exporter=\"otlp_")
                    && !l.ends_with(" 0")
            ),
            "{protocol}: the failure is counted:\n{metrics}"
        );
    }
    assert!(
        !collector.text().contains("/refused.txt"),
        "nothing got through:\n{}",
        collector.text()
    );
}
