//! Leak detection end to end: a real Python web app with real pools (psycopg_pool to
//! PostgreSQL, SQLAlchemy's QueuePool to MariaDB) leaks connections on some
//! endpoints while healthy traffic keeps using the pools. The agent must report
//! exactly the leaked connections, by local port, with the right kind and culprit,
//! within twice `--leak-after`, and nothing for the healthy traffic.

mod support;

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;

const LEAK_AFTER_S: u64 = 3;

/// GET `path` from the app; the body, trimmed.
fn get(port: u16, path: &str) -> String {
    http_get(port, path)
}

fn leaks(agent: &Agent, state: &str) -> Vec<Value> {
    agent
        .json()
        .into_iter()
        .filter(|v| v["type"] == "leak" && v["state"] == state)
        .collect()
}

/// (local port, kind, culprit path) of leak lines.
fn summary(leaks: &[Value]) -> BTreeSet<(u64, String, String)> {
    leaks
        .iter()
        .map(|l| {
            (
                l["client.port"].as_u64().unwrap_or(0),
                l["kind"].as_str().unwrap_or("").to_string(),
                l["last_url_path"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn leaked_connections_are_reported_with_their_culprit_and_nothing_else() {
    if !require_root("leaked_connections_are_reported_with_their_culprit_and_nothing_else") {
        return;
    }
    leaks_found(false);
}

/// The same app with its PostgreSQL pool over TLS (`sslmode=require`; psycopg's
/// wheel brings its own libssl): the same leaks, kinds and culprits, read from
/// the TLS probes' plaintext.
#[test]
fn leaked_connections_over_tls_are_reported_like_plaintext_ones() {
    if !require_root("leaked_connections_over_tls_are_reported_like_plaintext_ones") {
        return;
    }
    leaks_found(true);
}

/// The app leaks on both pools beside healthy traffic; `tls`: its PostgreSQL
/// sessions are encrypted.
fn leaks_found(tls: bool) {
    let pg = if tls {
        Postgres::start_tls()
    } else {
        Postgres::start()
    };
    let my = Mariadb::start();
    let app_port = free_port();
    let leak_after = format!("{LEAK_AFTER_S}s");
    let (app, pgp, myp) = (
        app_port.to_string(),
        pg.port.to_string(),
        my.port.to_string(),
    );
    let agent = Agent::start(&[
        "--output",
        "json",
        "--leak-after",
        &leak_after,
        "--port",
        &app,
        "--port",
        &pgp,
        "--port",
        &myp,
    ]);
    let sslmode = if tls { "require" } else { "disable" };
    let child = Command::new(python())
        .arg(support_dir().join("leaky_app.py"))
        .args([&app, &pgp, &myp, sslmode])
        .stdout(Stdio::null())
        .spawn()
        .expect("start leaky_app.py");
    let app_proc = Proc(child);
    wait_for_port(app_port, "leaky app");

    // Healthy traffic on both pools, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                get(app_port, "/pg/ok");
                get(app_port, "/my/ok");
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_secs(2));

    let mut expected = BTreeSet::new();
    for (path, kind) in [
        ("/pg/leak", "never_returned"),
        ("/pg/leak", "never_returned"),
        ("/pg/tx", "idle_in_transaction"),
        ("/my/leak", "never_returned"),
        ("/my/tx", "idle_in_transaction"),
    ] {
        let port: u64 = get(app_port, path).parse().expect("a local port");
        expected.insert((port, kind.to_string(), path.to_string()));
    }
    let leaked_at = Instant::now();

    // Every leak within twice --leak-after (plus the inventory's 1 s tick).
    let deadline = leaked_at + Duration::from_secs(2 * LEAK_AFTER_S + 1);
    while summary(&leaks(&agent, "found")).len() < expected.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let in_time = summary(&leaks(&agent, "found"));
    // Then a while longer with healthy traffic: still nothing else.
    std::thread::sleep(Duration::from_secs(2 * LEAK_AFTER_S));
    let found = leaks(&agent, "found");
    assert_eq!(in_time, expected, "reported within {} s", 2 * LEAK_AFTER_S);
    assert_eq!(summary(&found), expected, "exactly the leaks: {found:#?}");
    assert_eq!(
        found.len(),
        expected.len(),
        "each reported once: {found:#?}"
    );

    let spans: Vec<Value> = agent
        .json()
        .into_iter()
        .filter(|v| v["type"] == "span")
        .collect();
    for leak in &found {
        assert_eq!(leak["pid"], app_proc.pid(), "{leak:#}");
        assert!(leak["idle_seconds"].as_f64().unwrap() >= LEAK_AFTER_S as f64);
        assert!(leak["last_query"].is_string(), "{leak:#}");
        // The culprit is the server request, in the trace the connection last served.
        let server = spans
            .iter()
            .find(|s| s["span_id"] == leak["last_server_span_id"])
            .unwrap_or_else(|| panic!("no server span for {leak:#}"));
        assert_eq!(server["kind"], "server");
        assert_eq!(attr(server, "url.path"), &leak["last_url_path"]);
        assert_eq!(server["trace_id"], leak["last_trace_id"], "{leak:#}");
    }
    let systems: BTreeSet<&str> = found
        .iter()
        .filter_map(|l| l["db.system.name"].as_str())
        .collect();
    assert_eq!(systems, BTreeSet::from(["mysql", "postgresql"]));
    // PostgreSQL's calls say whether they were encrypted; MariaDB's never are.
    let pg_calls: Vec<&Value> = spans
        .iter()
        .filter(|s| attr(s, "db.system.name") == "postgresql")
        .collect();
    assert!(!pg_calls.is_empty());
    for s in &pg_calls {
        let encrypted = attr(s, "tls.protocol.name");
        assert_eq!(encrypted == "tls", tls, "{s:#}");
    }
    assert!(
        spans
            .iter()
            .filter(|s| attr(s, "db.system.name") == "mysql")
            .all(|s| attr(s, "tls.protocol.name").is_null())
    );

    // Pool metrics on /metrics, per pool: counts by state, peak, create and use times.
    let metrics = agent.get("/metrics");
    let pool_name = format!(
        "python3.11[{}] postgresql 127.0.0.1:{}",
        app_proc.pid(),
        pg.port
    );
    for metric in [
        "db_client_connection_count{",
        "db_client_connection_max{",
        "db_client_connection_create_time_seconds_count{",
        "db_client_connection_use_time_seconds_count{",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(metric) && l.contains(&pool_name)),
            "{metric} for {pool_name}:\n{metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("db_client_connection_count{")
                && l.contains(&pool_name)
                && l.contains("db_client_connection_state=\"used\"")
                && !l.ends_with(" 0")),
        "the leaked connections count as used:\n{metrics}"
    );

    // `conns`: the leaking process on top, with its culprit.
    let out = Command::new(env!("CARGO_BIN_EXE_tracer-agent"))
        .args(["conns", "--listen", &agent.listen])
        .output()
        .expect("tracer-agent conns");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{table}");
    assert!(out.status.success(), "{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[1].contains(&format!("[{}]", app_proc.pid())),
        "the leaking process first:\n{table}"
    );
    assert!(
        lines[2].contains("↳") && lines[2].contains("by GET /"),
        "its culprit:\n{table}"
    );
    assert!(table.lines().all(|l| l.chars().count() <= 80), "{table}");

    // Giving the leaked connections back resolves every report: psycopg closes
    // them, SQLAlchemy returns them to its pool, where healthy traffic reuses them
    // (so a resolved report names whoever used the connection last).
    assert_eq!(get(app_port, "/release"), expected.len().to_string());
    let port_kind = |s: BTreeSet<(u64, String, String)>| -> BTreeSet<(u64, String)> {
        s.into_iter().map(|(port, kind, _)| (port, kind)).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while summary(&leaks(&agent, "resolved")).len() < expected.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let healthy = load.join().expect("healthy load");
    assert!(healthy > 50, "healthy requests: {healthy}");
    assert_eq!(
        port_kind(summary(&leaks(&agent, "resolved"))),
        port_kind(expected)
    );
    agent.stop();
}
