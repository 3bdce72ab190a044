//! Root integration tests: database calls of real clients against real PostgreSQL,
//! Redis and MariaDB servers become CLIENT spans with the right SQL and attributes.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::*;

fn client_spans_of(objects: &[Value], pid: u32) -> Vec<Value> {
    spans(objects)
        .into_iter()
        .filter(|s| s["kind"] == "client" && s["resource"]["process.pid"] == pid)
        .cloned()
        .collect()
}

fn stop_and_collect(agent: Agent) -> Vec<Value> {
    std::thread::sleep(Duration::from_millis(500));
    agent.stop_json()
}

#[test]
fn psycopg_session_gives_exactly_its_five_calls() {
    if !require_root("psycopg_session_gives_exactly_its_five_calls") {
        return;
    }
    let pg = Postgres::start();
    let agent = Agent::start(&["--output", "json", "--port", &pg.port.to_string()]);
    let (pid, out) = python_client("db_clients.py", &["pg-session", &pg.port.to_string()]);
    assert!(out.contains("failed as expected"), "{out}");
    agent.wait_json(15, "five psycopg spans", |o| {
        client_spans_of(o, pid).len() >= 5
    });
    let objects = stop_and_collect(agent);
    let calls = client_spans_of(&objects, pid);
    let texts: Vec<&str> = calls
        .iter()
        .map(|s| attr(s, "db.query.text").as_str().unwrap_or(""))
        .collect();
    assert_eq!(calls.len(), 5, "exactly five calls: {texts:#?}");
    for s in &calls {
        assert_span_contract(s);
        assert_eq!(attr(s, "db.system.name"), "postgresql");
        assert_eq!(attr(s, "db.namespace"), "postgres");
        assert_eq!(attr(s, "db.operation.name"), "SELECT");
        assert_eq!(attr(s, "server.port"), pg.port);
    }
    assert_eq!(texts[0], "SELECT ? AS one");
    for t in &texts[1..4] {
        assert_eq!(
            *t, "SELECT $1::int + ? AS answer, ? AS s",
            "the prepared text on every execution"
        );
    }
    assert_eq!(texts[4], "SELECT ? / ?");
    assert_eq!(calls[4]["status"], "error");
    assert_eq!(attr(&calls[4], "db.response.status_code"), "22012");
    assert_eq!(calls[4]["status_message"], "division_by_zero");
    assert!(calls[..4].iter().all(|s| s.get("status_message").is_none()));
    assert!(calls[..4].iter().all(|s| s["status"] == "unset"));
    let everything = serde_json::to_string(&objects).unwrap();
    assert!(
        !everything.contains("secret-literal"),
        "a SQL literal leaked"
    );
    // Calls are in order and do not overlap.
    for pair in calls.windows(2) {
        assert!(pair[0]["end_unix_nano"].as_u64() <= pair[1]["start_unix_nano"].as_u64());
    }
}

#[test]
fn a_redis_pipeline_of_n_commands_gives_n_spans_in_order() {
    if !require_root("a_redis_pipeline_of_n_commands_gives_n_spans_in_order") {
        return;
    }
    let port = free_port();
    let _redis = redis_server(port);
    let agent = Agent::start(&["--output", "json", "--port", &port.to_string()]);
    const N: usize = 25;
    let (pid, out) = python_client(
        "db_clients.py",
        &["redis-pipeline", &port.to_string(), &N.to_string()],
    );
    assert!(out.contains(&format!("pipeline {N}")), "{out}");
    agent.wait_json(15, "the pipeline's spans", |o| {
        client_spans_of(o, pid)
            .iter()
            .filter(|s| attr(s, "db.operation.name") == "SET")
            .count()
            >= N
    });
    let objects = stop_and_collect(agent);
    let calls = client_spans_of(&objects, pid);
    let sets: Vec<&Value> = calls
        .iter()
        .filter(|s| attr(s, "db.operation.name") == "SET")
        .collect();
    assert_eq!(sets.len(), N, "one span per pipelined command");
    for s in &sets {
        assert_span_contract(s);
        assert_eq!(attr(s, "db.system.name"), "redis");
        assert_eq!(attr(s, "db.query.text"), "SET ? ?");
        assert_eq!(s["status"], "unset");
    }
    for pair in sets.windows(2) {
        assert!(
            pair[0]["start_unix_nano"].as_u64() <= pair[1]["start_unix_nano"].as_u64(),
            "in order"
        );
    }
    let everything = serde_json::to_string(&objects).unwrap();
    assert!(!everything.contains("value-1"), "a Redis value leaked");
}

#[test]
fn a_mariadb_prepared_statement_executed_twice_gives_two_spans_with_its_text() {
    if !require_root("a_mariadb_prepared_statement_executed_twice_gives_two_spans_with_its_text") {
        return;
    }
    mysql_connector_session("c", "CMySQLConnection");
}

/// mysql-connector-python's own Python implementation reads each packet's 4-byte
/// header and its payload in separate `recv` calls, the greeting included.
#[test]
fn mysql_connector_python_reading_headers_and_payloads_apart_is_traced_alike() {
    if !require_root("mysql_connector_python_reading_headers_and_payloads_apart_is_traced_alike") {
        return;
    }
    mysql_connector_session("pure", "MySQLConnection");
}

/// One mysql-connector-python session (`implementation` = `c` or `pure`, whose
/// connection class is `class`): two executions of a prepared statement and a
/// failing one give exactly their spans, with no literal.
fn mysql_connector_session(implementation: &str, class: &str) {
    let db = Mariadb::start();
    let agent = Agent::start(&["--output", "json", "--port", &db.port.to_string()]);
    let (pid, out) = python_client(
        "db_clients.py",
        &["mysql-prepared", &db.port.to_string(), implementation],
    );
    assert!(out.contains(&format!("implementation {class}\n")), "{out}");
    assert!(out.contains("failed as expected"), "{out}");
    agent.wait_json(15, "the prepared statement's spans", |o| {
        client_spans_of(o, pid)
            .iter()
            .any(|s| s["status"] == "error")
    });
    let objects = stop_and_collect(agent);
    let calls = client_spans_of(&objects, pid);
    let prepared: Vec<&Value> = calls
        .iter()
        .filter(|s| attr(s, "db.query.text") == "SELECT ? + ? AS answer, ? AS s")
        .collect();
    assert_eq!(
        prepared.len(),
        2,
        "two executions, no span for the prepare: {calls:#?}"
    );
    for s in &prepared {
        assert_span_contract(s);
        assert_eq!(attr(s, "db.system.name"), "mysql");
        assert_eq!(attr(s, "db.namespace"), "mysql");
        assert_eq!(attr(s, "db.operation.name"), "SELECT");
        assert_eq!(s["status"], "unset");
    }
    let failed: Vec<&Value> = calls.iter().filter(|s| s["status"] == "error").collect();
    assert_eq!(failed.len(), 1, "{calls:#?}");
    assert_eq!(attr(failed[0], "db.response.status_code"), "1146");
    assert_eq!(failed[0]["status_message"], "ER_NO_SUCH_TABLE");
    assert_eq!(
        attr(failed[0], "db.query.text"),
        "SELECT * FROM no_such_table WHERE id = ?"
    );
    assert_eq!(attr(failed[0], "db.collection.name"), "no_such_table");
    let everything = serde_json::to_string(&objects).unwrap();
    assert!(
        !everything.contains("secret-literal"),
        "a SQL literal leaked"
    );
}

#[test]
fn open_connections_show_in_the_inventory_and_in_conns() {
    if !require_root("open_connections_show_in_the_inventory_and_in_conns") {
        return;
    }
    let pg = Postgres::start();
    let agent = Agent::start(&[
        "--output",
        "json",
        "--leak-after",
        "2s",
        "--port",
        &pg.port.to_string(),
    ]);
    let mut child = std::process::Command::new(python())
        .arg(support_dir().join("db_clients.py"))
        .args(["pg-hold", &pg.port.to_string(), "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start pg-hold");
    let pid = child.id();
    let lines = Lines::follow(child.stdout.take().unwrap());
    let _client = Proc(child);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !lines.text().contains("holding") {
        assert!(
            std::time::Instant::now() < deadline,
            "pg-hold did not get ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pool = loop {
        let body = agent.get("/connections");
        let json: Value =
            serde_json::from_str(body.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or(""))
                .unwrap();
        let ours: Vec<Value> = json["pools"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["pid"] == pid)
            .cloned()
            .collect();
        if ours.first().is_some_and(|p| p["open"] == 3) || std::time::Instant::now() > deadline {
            let conns: Vec<Value> = json["connections"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["pid"] == pid)
                .cloned()
                .collect();
            assert_eq!(conns.len(), 3, "{json:#}");
            let in_tx: Vec<&Value> = conns
                .iter()
                .filter(|c| c["tx_status"] == "in_transaction")
                .collect();
            assert_eq!(in_tx.len(), 1, "{conns:#?}");
            assert_eq!(in_tx[0]["state"], "used");
            assert_eq!(in_tx[0]["last_query"], "SELECT ?");
            assert!(
                conns
                    .iter()
                    .all(|c| c["db_system"] == "postgresql" && c["server_port"] == pg.port)
            );
            break ours[0].clone();
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        (pool["used"].clone(), pool["idle"].clone()),
        (Value::from(1), Value::from(2)),
        "{pool:#}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tracer-agent"))
        .args(["conns", "--listen", &agent.listen])
        .output()
        .expect("tracer-agent conns");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains(&format!("[{pid}]")) && table.contains(&format!("127.0.0.1:{}", pg.port)),
        "{table}"
    );
    assert!(table.lines().all(|l| l.chars().count() <= 80), "{table}");

    // The transaction left open is a leak; the two connections last used together are not.
    agent.wait_json(15, "a leak report", |o| {
        o.iter().any(|v| v["type"] == "leak")
    });
    std::thread::sleep(Duration::from_secs(3));
    let leaks: Vec<Value> = agent
        .json()
        .into_iter()
        .filter(|v| v["type"] == "leak")
        .collect();
    assert!(!leaks.is_empty(), "{leaks:?}");
    assert_eq!(
        leaks.len(),
        1,
        "exactly one leak, reported once: {leaks:#?}"
    );
    let leak = &leaks[0];
    assert_eq!(leak["kind"], "idle_in_transaction");
    assert_eq!(leak["state"], "found");
    assert_eq!(leak["pid"], pid);
    assert_eq!(leak["server.port"], pg.port);
    assert_eq!(leak["last_query"], "SELECT ?");
    assert!(leak["idle_seconds"].as_f64().unwrap() > 2.0);
    let body = agent.get("/connections");
    let json: Value =
        serde_json::from_str(body.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")).unwrap();
    let tx_port = json["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["pid"] == pid && c["tx_status"] == "in_transaction")
        .map(|c| c["client_port"].clone())
        .unwrap();
    assert_eq!(leak["client.port"], tx_port, "the culprit connection");
}

/// Runs a CLI client to completion; returns (pid, stdout+stderr).
fn cli(program: &str, args: &[&str]) -> (u32, String) {
    let child = std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {program}: {e}"));
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for the client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, text)
}

fn texts_of(calls: &[Value]) -> Vec<String> {
    calls
        .iter()
        .map(|s| attr(s, "db.query.text").as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn psql_simple_and_failing_queries() {
    if !require_root("psql_simple_and_failing_queries") {
        return;
    }
    let pg = Postgres::start();
    let agent = Agent::start(&["--output", "json", "--port", &pg.port.to_string()]);
    let port = pg.port.to_string();
    let (pid, out) = cli(
        "psql",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-X",
            "-c",
            "SELECT 42",
            "-c",
            "SELECT * FROM nope",
        ],
    );
    assert!(out.contains("42") && out.contains("nope"), "{out}");
    agent.wait_json(15, "psql's spans", |o| client_spans_of(o, pid).len() >= 2);
    let calls = client_spans_of(&stop_and_collect(agent), pid);
    assert_eq!(
        texts_of(&calls),
        ["SELECT ?", "SELECT * FROM nope"],
        "{calls:#?}"
    );
    assert_eq!(attr(&calls[0], "db.namespace"), "postgres");
    assert_eq!(calls[0]["status"], "unset");
    assert_eq!(calls[1]["status"], "error");
    assert_eq!(attr(&calls[1], "db.response.status_code"), "42P01");
    assert_eq!(calls[1]["status_message"], "undefined_table");
    assert_eq!(attr(&calls[1], "db.collection.name"), "nope");
}

#[test]
fn redis_cli_commands_and_an_error() {
    if !require_root("redis_cli_commands_and_an_error") {
        return;
    }
    let port = free_port();
    let _redis = redis_server(port);
    let agent = Agent::start(&["--output", "json", "--port", &port.to_string()]);
    let p = port.to_string();
    let (set_pid, _) = cli("redis-cli", &["-p", &p, "SET", "greeting", "secret-value"]);
    let (bad_pid, out) = cli("redis-cli", &["-p", &p, "HGET", "greeting", "field"]);
    assert!(out.contains("WRONGTYPE"), "{out}");
    agent.wait_json(15, "redis-cli spans", |o| {
        !client_spans_of(o, set_pid).is_empty() && !client_spans_of(o, bad_pid).is_empty()
    });
    let objects = stop_and_collect(agent);
    let sets: Vec<Value> = client_spans_of(&objects, set_pid)
        .into_iter()
        .filter(|s| attr(s, "db.operation.name") == "SET")
        .collect();
    assert_eq!(texts_of(&sets), ["SET ? ?"]);
    assert_eq!(sets[0]["status"], "unset");
    let bad: Vec<Value> = client_spans_of(&objects, bad_pid)
        .into_iter()
        .filter(|s| attr(s, "db.operation.name") == "HGET")
        .collect();
    assert_eq!(bad.len(), 1, "{bad:#?}");
    assert_eq!(bad[0]["status"], "error");
    assert_eq!(attr(&bad[0], "db.response.status_code"), "WRONGTYPE");
    assert_eq!(
        bad[0]["status_message"],
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    );
    assert!(
        !serde_json::to_string(&objects)
            .unwrap()
            .contains("secret-value")
    );
}

#[test]
fn mariadb_cli_queries_and_an_error() {
    if !require_root("mariadb_cli_queries_and_an_error") {
        return;
    }
    let db = Mariadb::start();
    let agent = Agent::start(&["--output", "json", "--port", &db.port.to_string()]);
    let port = db.port.to_string();
    let (pid, out) = cli(
        "mariadb",
        &[
            "--protocol=tcp",
            "-h",
            "127.0.0.1",
            "-P",
            &port,
            "-u",
            "root",
            "mysql",
            "-e",
            "SELECT 7 AS seven; SELECT * FROM nope",
        ],
    );
    assert!(out.contains("seven") && out.contains("1146"), "{out}");
    agent.wait_json(15, "the CLI's spans", |o| {
        client_spans_of(o, pid)
            .iter()
            .any(|s| s["status"] == "error")
    });
    let calls = client_spans_of(&stop_and_collect(agent), pid);
    let ours: Vec<Value> = calls
        .iter()
        .filter(|s| {
            ["SELECT ? AS seven", "SELECT * FROM nope"]
                .contains(&attr(s, "db.query.text").as_str().unwrap_or(""))
        })
        .cloned()
        .collect();
    assert_eq!(
        texts_of(&ours),
        ["SELECT ? AS seven", "SELECT * FROM nope"],
        "{calls:#?}"
    );
    assert_eq!(attr(&ours[0], "db.namespace"), "mysql");
    assert_eq!(ours[0]["status"], "unset");
    assert_eq!(ours[1]["status"], "error");
    assert_eq!(attr(&ours[1], "db.response.status_code"), "1146");
    assert_eq!(ours[1]["status_message"], "ER_NO_SUCH_TABLE");
}

/// The database client spans of `pid` with `system`, as (text, span).
fn db_calls<'a>(objects: &'a [Value], pid: u32, system: &str) -> Vec<&'a Value> {
    spans(objects)
        .into_iter()
        .filter(|s| {
            s["kind"] == "client"
                && s["resource"]["process.pid"] == pid
                && attr(s, "db.system.name") == system
        })
        .collect()
}

#[test]
fn pooled_connections_opened_before_the_agent_are_decoded_on_any_port_across_restarts() {
    // Neither server is on its well-known port (free ports, like pgbouncer's 6432 or
    // a second MySQL's 3307): the agent can only tell them from their traffic.
    let pg = Postgres::start();
    let my = Mariadb::start();
    let mut child = std::process::Command::new(python())
        .arg(support_dir().join("db_clients.py"))
        .args([
            "pg-mysql-rounds",
            &pg.port.to_string(),
            &my.port.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start pg-mysql-rounds");
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let lines = Lines::follow(child.stdout.take().unwrap());
    let _client = Proc(child);
    let wait_line = |line: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !lines.snapshot().iter().any(|l| l == line) {
            assert!(
                std::time::Instant::now() < deadline,
                "the client never said {line:?}: {}",
                lines.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_line("ready");
    let pid_arg = pid.to_string();
    for round in 1..=2 {
        // Round 1: an agent started after the connections opened; round 2: the
        // agent restarted, the connections still open.
        let agent = Agent::start(&["--output", "json", "--pid", &pid_arg]);
        use std::io::Write;
        writeln!(stdin, "go {round}").unwrap();
        stdin.flush().unwrap();
        wait_line(&format!("done {round}"));
        agent.wait_json(20, "both databases' calls", |o| {
            db_calls(o, pid, "postgresql").len() >= 2 && db_calls(o, pid, "mysql").len() >= 2
        });
        // The inventory is published about once a second.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let inventory = loop {
            let body = agent.get("/connections");
            let json: Value =
                serde_json::from_str(body.split_once("\r\n\r\n").map_or("", |(_, b)| b)).unwrap();
            let ours = json["connections"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["pid"] == pid)
                .count();
            if ours >= 2 || std::time::Instant::now() > deadline {
                break json;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let objects = stop_and_collect(agent);
        // psycopg prepares its statement once per connection: in round 2 it was
        // prepared before this agent started, so its executions carry no text (a
        // span named after the system) rather than a guessed one.
        let twice = if round == 1 {
            "SELECT $1::int * ? AS twice"
        } else {
            ""
        };
        for (system, port, texts) in [
            (
                "postgresql",
                pg.port,
                ["SELECT ? AS s, $1::int AS n", twice],
            ),
            (
                "mysql",
                my.port,
                ["SELECT ? AS s, ? AS n", "SELECT ? * ? AS twice"],
            ),
        ] {
            let calls = db_calls(&objects, pid, system);
            let got: Vec<&str> = calls
                .iter()
                .map(|s| attr(s, "db.query.text").as_str().unwrap_or(""))
                .collect();
            assert_eq!(got, texts, "round {round}, {system}: {calls:#?}");
            for s in &calls {
                assert_span_contract(s);
                assert_eq!(attr(s, "server.port"), port, "round {round}: {s}");
                assert_eq!(s["status"], "unset", "round {round}: {s}");
            }
            // Both connections are in the inventory as that database's, recovered.
            let row = inventory["connections"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["pid"] == pid && c["server_port"] == port)
                .unwrap_or_else(|| {
                    panic!("round {round}: no {system} connection in {inventory:#}")
                });
            assert_eq!(row["db_system"], system, "round {round}: {row}");
            assert_eq!(row["recovered"], true, "round {round}: {row}");
        }
        let everything = serde_json::to_string(&objects).unwrap();
        assert!(!everything.contains("round-secret"), "a SQL literal leaked");
    }
}
