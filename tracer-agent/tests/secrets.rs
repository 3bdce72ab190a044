//! Root integration test: secrets never leave the agent. Real traffic carries
//! them — an `Authorization` header, a `Cookie`, a `Set-Cookie`, request and
//! response bodies, tokens in URL paths (a JWT, a `;jsessionid=`), SQL literals
//! (in a query and in a failing one, PostgreSQL and MariaDB), a PostgreSQL
//! password sent in clear, a MariaDB login's password and auth data, Redis values
//! written and read back — and every output is searched for them: JSON lines,
//! the terminal view (`--output pretty`), the OTLP requests as sent (traces,
//! metrics, logs: raw protobuf, whose strings are plain bytes), `/connections`,
//! `/metrics` (labels) and the agent's log.

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    process::Command,
    sync::{Arc, Mutex},
};

use support::*;

const SECRETS: [&str; 13] = [
    "tok-AUTH-7f3a",
    "COOKIE-c81b",
    "SETCOOKIE-55aa",
    "REQBODY-9e2d",
    "RESPBODY-4c4c",
    "SQLLIT-1d1d",
    "SQLERR-2e2e",
    "REDISVAL-3f3f",
    // A JWT and a session id in URL paths.
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiJ9.c2lnbmVkYnl0cmFjZXI",
    "JSESS0A1B2C3D4E5F6",
    // PostgreSQL's password (sent in clear), MariaDB's (its auth data is a hash of
    // it), a MariaDB literal.
    "PGPASS-6a6a",
    "MYPASS-7b7b",
    "MYLIT-8c8c",
];

/// An OTLP/HTTP collector that keeps every request body as sent.
fn recording_collector() -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    keep.lock().unwrap().extend_from_slice(&body);
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                    );
                }
            });
        }
    });
    (endpoint, seen)
}

fn assert_clean(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} shows {s}:\n{text}");
    }
}

fn psql(port: u16, sql: &str) -> std::process::Output {
    Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-X", "-q", "-c", sql])
        .output()
        .expect("run psql")
}

fn redis_cli(port: u16, args: &[&str]) {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(out.status.success(), "{out:?}");
}

/// The HTTP exchanges: a GET of a secret file with credentials, a POST of a
/// secret body; every answer sets a secret cookie.
fn http_traffic(port: u16) {
    let url = format!("http://127.0.0.1:{port}/secret.txt");
    let (_, body) = curl(&[
        "-H",
        &format!("Authorization: Bearer {}", SECRETS[0]),
        "-H",
        &format!("Cookie: sid={}", SECRETS[1]),
        &url,
    ]);
    assert!(body.contains(SECRETS[4]), "the server answered its body");
    curl(&[
        "-X",
        "POST",
        "--data-binary",
        &format!("password={}", SECRETS[3]),
        &format!("http://127.0.0.1:{port}/login"),
    ]);
    // Tokens in paths (the server answers 404: the path is what matters).
    curl(&[&format!("http://127.0.0.1:{port}/auth/{}", SECRETS[8])]);
    curl(&[&format!(
        "http://127.0.0.1:{port}/cart;jsessionid={}/items",
        SECRETS[9]
    )]);
}

/// A MariaDB login with a password (mysql_native_password: the handshake
/// response carries a hash of it), then a query with a literal, from the
/// `mariadb` client.
fn mariadb_traffic(port: u16) {
    let root = |sql: &str| {
        let out = Command::new("mariadb")
            .args(["-h", "127.0.0.1", "-P", &port.to_string(), "-u", "root"])
            .args(["-e", sql])
            .output()
            .expect("run mariadb");
        assert!(out.status.success(), "{out:?}");
    };
    root(&format!(
        "CREATE USER app@'%' IDENTIFIED BY '{}'; GRANT ALL ON *.* TO app@'%'",
        SECRETS[11]
    ));
    let out = Command::new("mariadb")
        .args(["-h", "127.0.0.1", "-P", &port.to_string(), "-u", "app"])
        .arg(format!("-p{}", SECRETS[11]))
        .args(["-e", &format!("SELECT '{}' AS v", SECRETS[12])])
        .output()
        .expect("run mariadb");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(SECRETS[12]));
}

fn secret_server() -> (Proc, u16, tempfile::TempDir) {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), format!("{}\n", SECRETS[4])).unwrap();
    let server = Proc(
        Command::new("python3")
            .arg(support_dir().join("http_server.py"))
            .arg(port.to_string())
            .arg(dir.path())
            .arg("HTTP/1.1")
            .env("SET_COOKIE", format!("session={}; HttpOnly", SECRETS[2]))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the HTTP server"),
    );
    wait_for_port(port, "the HTTP server");
    (server, port, dir)
}

#[test]
fn no_secret_reaches_json_otlp_connections_metrics_or_logs() {
    if !require_root("secrets") {
        return;
    }
    let (_server, http_port, _dir) = secret_server();
    let pg = Postgres::start();
    pg.add_cleartext_password_user("app", SECRETS[10]);
    let my = Mariadb::start();
    let redis_port = free_port();
    let _redis = redis_server(redis_port);
    let (endpoint, otlp) = recording_collector();
    let ports = [
        http_port.to_string(),
        pg.port.to_string(),
        redis_port.to_string(),
        my.port.to_string(),
    ];
    let mut args = vec!["--output", "json", "--otlp-endpoint", &endpoint];
    args.extend([
        "--otlp-protocol",
        "http/protobuf",
        "--otlp-compression",
        "none",
    ]);
    for p in &ports {
        args.extend(["--port", p.as_str()]);
    }
    let agent = Agent::start(&args);

    http_traffic(http_port);
    let ok = psql(pg.port, &format!("SELECT '{}' AS v", SECRETS[5]));
    assert!(ok.status.success(), "{ok:?}");
    let failed = psql(
        pg.port,
        &format!("SELECT * FROM no_such_table WHERE pw = '{}'", SECRETS[6]),
    );
    assert!(!failed.status.success());
    // A login whose password goes in clear, then a query as that role.
    let login = Command::new("psql")
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "app"])
        .args([
            "-d",
            "postgres",
            "-X",
            "-q",
            "-c",
            "SELECT current_user AS who",
        ])
        .env("PGPASSWORD", SECRETS[10])
        .output()
        .expect("run psql");
    assert!(login.status.success(), "{login:?}");
    redis_cli(redis_port, &["SET", "k", SECRETS[7]]);
    redis_cli(redis_port, &["GET", "k"]);
    mariadb_traffic(my.port);

    agent.wait_json(30, "HTTP, PostgreSQL, MariaDB and Redis spans", |o| {
        let s = spans(o);
        s.iter()
            .any(|x| attr(x, "db.query.text") == "SELECT current_user AS who")
            && s.iter().any(|x| {
                attr(x, "db.query.text") == "SELECT ? AS v" && attr(x, "db.system.name") == "mysql"
            })
            && ["postgresql", "redis"]
                .iter()
                .all(|db| s.iter().any(|x| attr(x, "db.system.name") == *db))
            && s.iter()
                .filter(|x| x["kind"] == "server" && attr(x, "http.request.method").is_string())
                .count()
                >= 4
    });
    let connections = agent.get("/connections");
    let metrics = agent.get("/metrics");
    let stderr = agent.stderr.clone();
    let (stdout, _) = agent.stop();
    let json = stdout.text();
    // The traffic was seen: the spans are there, only without the secrets.
    assert!(
        json.contains("no_such_table"),
        "the failed query's span:\n{json}"
    );
    assert!(json.contains("SELECT ? AS v"), "{json}");
    assert!(
        json.contains("/auth/REDACTED"),
        "the JWT path's span:\n{json}"
    );
    assert!(
        json.contains("/cart/items"),
        "the jsessionid path's span:\n{json}"
    );
    assert_clean("JSON output", &json);
    assert_clean("/connections", &connections);
    assert_clean("/metrics", &metrics);
    assert_clean("the agent's log", &stderr.text());
    let sent = String::from_utf8_lossy(&otlp.lock().unwrap()).into_owned();
    assert!(sent.contains("no_such_table"), "OTLP carried the spans");
    assert_clean("OTLP requests", &sent);
}

#[test]
fn no_secret_reaches_the_terminal_view() {
    if !require_root("secrets_pretty") {
        return;
    }
    let (_server, http_port, _dir) = secret_server();
    let port = http_port.to_string();
    let agent = Agent::start(&["--output", "pretty", "--port", &port]);
    http_traffic(http_port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !agent.stdout.text().contains("/login") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            agent.stdout.text()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let stderr = agent.stderr.clone();
    let (stdout, _) = agent.stop();
    assert!(stdout.text().contains("/secret.txt"), "{}", stdout.text());
    assert_clean("pretty output", &stdout.text());
    assert_clean("the agent's log", &stderr.text());
}
