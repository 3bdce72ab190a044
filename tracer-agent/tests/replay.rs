//! The whole pipeline stage, replayed without root from a recorded event stream.
//!
//! `testdata/replay/leaky_app.events` was recorded once from real traffic by
//! `record_the_leaky_app_session` (ignored; run it as root to record again): the
//! leaky web app (`support/leaky_app.py`, thread per request, psycopg_pool) serving
//! healthy requests, one request that leaves a transaction open and two that never
//! give their connection back, then healthy traffic for longer than the leak
//! threshold. What the app did (the truth) is kept beside it in
//! `leaky_app.truth.json`. The replay feeds the raw ring-buffer records through the
//! same reader, connection table, parent inference and pool stage as the agent, with
//! the recording's clock moved so that the session ends now.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use support::*;
use tokio::sync::mpsc;
use tracer_agent::{
    capture::{Clock, decode, reader::drain, recording},
    connections::{SpanOptions, TableLimits},
    metrics::RedMetrics,
    pipeline::{PipelineConfig, SharedInventory, process_events},
    pools::{LeakEvent, LeakKind, LeakState},
    spans::{AttrValue, ParentSource, Span, SpanKind},
    telemetry::Telemetry,
};

/// The leak threshold of the session: the healthy traffic after the leaks lasts
/// twice as long.
const LEAK_AFTER_S: u64 = 3;

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/replay")
        .join(name)
}

/// Records the session (root: it runs the real agent with `--record-events`).
#[test]
#[ignore = "records testdata/replay again; run as root with --ignored"]
fn record_the_leaky_app_session() {
    assert!(
        require_root("record_the_leaky_app_session"),
        "recording needs root"
    );
    let pg = Postgres::start();
    let app_port = free_port();
    // No MariaDB: only the PostgreSQL endpoints are used (the engine connects lazily).
    let unused = free_port();
    let events = testdata("leaky_app.events");
    let (app, pgp) = (app_port.to_string(), pg.port.to_string());
    let agent = Agent::start(&[
        "--output",
        "none",
        "--port",
        &app,
        "--port",
        &pgp,
        "--record-events",
        events.to_str().expect("UTF-8 path"),
    ]);
    let child = std::process::Command::new(python())
        .arg(support_dir().join("leaky_app.py"))
        .args([&app, &pgp, &unused.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start leaky_app.py");
    let app_proc = Proc(child);
    wait_for_port(app_port, "leaky app");
    let mut requests: BTreeMap<String, u64> = BTreeMap::new();
    let mut get = |path: &str| {
        *requests.entry(path.to_string()).or_default() += 1;
        http_get(app_port, path)
    };
    for _ in 0..3 {
        get("/pg/ok");
        std::thread::sleep(Duration::from_millis(100));
    }
    let tx: u16 = get("/pg/tx").parse().expect("a local port");
    let leaked: Vec<u16> = (0..2)
        .map(|_| get("/pg/leak").parse().expect("a local port"))
        .collect();
    let healthy_until = Instant::now() + Duration::from_secs(2 * LEAK_AFTER_S);
    while Instant::now() < healthy_until {
        get("/pg/ok");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop();
    let truth = json!({
        "app_pid": app_proc.pid(),
        "pg_port": pg.port,
        "app_port": app_port,
        "requests": requests,
        "idle_in_transaction": [tx],
        "never_returned": leaked,
        "leak_after_s": LEAK_AFTER_S,
    });
    std::fs::write(
        testdata("leaky_app.truth.json"),
        serde_json::to_string_pretty(&truth).unwrap() + "\n",
    )
    .expect("write the truth");
}

/// What the replay produced.
struct Replayed {
    spans: Vec<Span>,
    leaks: Vec<LeakEvent>,
    rows: Vec<tracer_agent::pools::DbConnectionRow>,
    telemetry: Arc<Telemetry>,
}

/// Replays a recording through the pipeline stage: events in, spans, the last
/// inventory and leak events out. The clock is moved so the session ends now.
fn replay(bytes: &[u8], leak_after: Duration) -> Replayed {
    let (clock, mut records) = recording::read(bytes).expect("a recording");
    let last_boot_ns = {
        let (_, mut all) = recording::read(bytes).expect("a recording");
        let mut last = 0;
        use tracer_agent::capture::reader::RecordSource;
        while let Some(r) = all.next_record() {
            if let Ok(ev) = decode(r, &Clock::with_offset(0)) {
                last = last.max(ev.meta().ts_ns);
            }
        }
        last
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i128;
    let moved = Clock::with_offset(now - i128::from(last_boot_ns));
    assert!(
        moved.offset_ns() >= clock.offset_ns(),
        "recorded in the past"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let telemetry = Arc::new(Telemetry::new());
    let inventory = SharedInventory::default();
    let (event_tx, event_rx) = mpsc::channel(1024);
    let (span_tx, mut span_rx) = mpsc::channel(1024);
    let (leak_tx, mut leak_rx) = mpsc::channel(64);
    let config = PipelineConfig {
        limits: TableLimits::default(),
        options: SpanOptions::default(),
        parent_wait: Duration::from_secs(2),
        max_waiting_spans: 100_000,
        leak_after,
        recovered: Vec::new(),
        kernel_sockets: None,
        naming: Default::default(),
        kube: None,
    };
    let (spans, leaks) = rt.block_on(async {
        let pipeline = tokio::spawn(process_events(
            event_rx,
            span_tx,
            config,
            telemetry.clone(),
            RedMetrics::shared(2000),
            inventory.clone(),
            leak_tx,
        ));
        let collect_spans = tokio::spawn(async move {
            let mut all = Vec::new();
            while let Some(batch) = span_rx.recv().await {
                all.extend(batch);
            }
            all
        });
        while !records.is_empty() {
            drain(&mut records, &moved, &event_tx, &telemetry, &mut |_| {});
            // The pipeline takes what waits before the reader goes on.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The pool stage's once-a-second round sees the whole session.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(event_tx);
        pipeline.await.expect("the pipeline ends");
        let mut leaks = Vec::new();
        while let Some(batch) = leak_rx.recv().await {
            leaks.extend(batch);
        }
        (collect_spans.await.expect("spans collected"), leaks)
    });
    let rows = inventory.lock().expect("inventory").clone();
    Replayed {
        spans,
        leaks,
        rows,
        telemetry,
    }
}

fn text(span: &Span, key: &str) -> Option<String> {
    match span.attr(key)? {
        AttrValue::Str(s) => Some(s.to_string()),
        other => Some(other.to_string()),
    }
}

#[test]
fn a_recorded_session_replays_to_spans_pool_rows_and_leaks() {
    let bytes = std::fs::read(testdata("leaky_app.events")).expect("the recording");
    let truth: Value = serde_json::from_str(
        &std::fs::read_to_string(testdata("leaky_app.truth.json")).expect("the truth"),
    )
    .expect("truth is JSON");
    let app_pid = truth["app_pid"].as_u64().unwrap() as u32;
    let leak_after = Duration::from_secs(truth["leak_after_s"].as_u64().unwrap());
    let r = replay(&bytes, leak_after);
    assert_eq!(r.telemetry.decode_errors.get(), 0, "every record decodes");

    // One SERVER span per request the app answered, by path.
    let servers: Vec<&Span> = r
        .spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server && s.resource.pid == app_pid)
        .collect();
    let mut by_path: BTreeMap<String, u64> = BTreeMap::new();
    for s in &servers {
        *by_path.entry(text(s, "url.path").unwrap()).or_default() += 1;
    }
    let want: BTreeMap<String, u64> =
        serde_json::from_value(truth["requests"].clone()).expect("request counts");
    assert_eq!(by_path, want, "a SERVER span per request");
    // Each is the child of the client's request at the other end of its socket.
    for s in &servers {
        assert_eq!(s.parent_source, ParentSource::Socket, "{s:?}");
        let parent = s.parent_span_id.expect("a parent");
        assert!(
            r.spans
                .iter()
                .any(|c| c.span_id == parent && c.kind == SpanKind::Client),
            "the parent of {s:?} is a CLIENT span"
        );
    }

    // Each of the app's queries is the child of the request that ran it: the
    // thread rule, never another request.
    let server_path: std::collections::HashMap<_, _> = servers
        .iter()
        .map(|s| (s.span_id, text(s, "url.path").unwrap()))
        .collect();
    let endpoint_of = |query: &str| match query {
        "SELECT ? AS healthy" => Some("/pg/ok"),
        "BEGIN" | "SELECT ? AS held" => Some("/pg/tx"),
        "SELECT count(*) FROM pg_class WHERE relname = ?" => Some("/pg/leak"),
        _ => None,
    };
    let mut linked = 0;
    for db in r.spans.iter().filter(|s| {
        s.kind == SpanKind::Client
            && s.resource.pid == app_pid
            && text(s, "db.system.name").as_deref() == Some("postgresql")
    }) {
        let Some(endpoint) = text(db, "db.query.text").as_deref().and_then(endpoint_of) else {
            continue; // the pool's own statements
        };
        let parent = db
            .parent_span_id
            .expect("a query made for a request is linked");
        assert_eq!(db.parent_source, ParentSource::Thread, "{db:?}");
        assert_eq!(
            server_path.get(&parent).map(String::as_str),
            Some(endpoint),
            "{db:?}"
        );
        linked += 1;
    }
    let requests: u64 = want.values().sum();
    assert!(
        linked as u64 >= requests,
        "every request ran its query: {linked}"
    );

    // The inventory holds the app's PostgreSQL pool, the open transaction in use.
    let tx_port = truth["idle_in_transaction"][0].as_u64().unwrap() as u16;
    let app_rows: Vec<_> = r
        .rows
        .iter()
        .filter(|row| row.pool.pid == app_pid)
        .collect();
    assert!(app_rows.len() >= 3, "{app_rows:#?}");
    let tx_row = app_rows
        .iter()
        .find(|row| row.client_port == tx_port)
        .expect("the connection left in a transaction");
    assert_eq!(tx_row.tx_status.as_str(), "in_transaction");
    assert_eq!(tx_row.state.as_str(), "used");

    // Exactly the leaks, each naming the request that leaked it.
    let found: BTreeSet<(u16, &str, String)> = r
        .leaks
        .iter()
        .filter(|e| e.state == LeakState::Found)
        .map(|e| {
            let culprit = e.row.culprit.as_ref().map(|c| c.path.clone());
            (
                e.row.client_port,
                e.kind.as_str(),
                culprit.unwrap_or_default(),
            )
        })
        .collect();
    let mut expected = BTreeSet::from([(
        tx_port,
        LeakKind::IdleInTransaction.as_str(),
        "/pg/tx".to_string(),
    )]);
    for port in truth["never_returned"].as_array().unwrap() {
        expected.insert((
            port.as_u64().unwrap() as u16,
            LeakKind::NeverReturned.as_str(),
            "/pg/leak".to_string(),
        ));
    }
    assert_eq!(found, expected, "{:#?}", r.leaks);
}

#[test]
fn a_recording_that_is_not_one_is_a_clear_error() {
    let err = recording::read(b"HTTP/1.1 200 OK\r\n").expect_err("an error");
    assert!(err.to_string().contains("not an event recording"), "{err}");
}
