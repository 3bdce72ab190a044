//! Root integration tests: the database drivers people use, each running the same
//! session (tests/support/drivers/) against a real server, give the same calls.
//! Drivers split their reads and writes as they like (a header alone, a payload
//! alone, a pipeline in one write): the spans must not depend on it.

mod support;

use std::process::{Command, Stdio};

use serde_json::Value;
use support::*;

fn drivers_dir() -> std::path::PathBuf {
    support_dir().join("drivers")
}

/// Runs one driver's session; its pid.
fn run(driver: &str, port: u16) -> u32 {
    let dir = drivers_dir();
    let mut cmd = match driver {
        "pg" | "ioredis" | "mysql2" => {
            let mut c = Command::new("node");
            c.env("NODE_PATH", node_path()).arg(dir.join("drivers.js"));
            c
        }
        "pgjdbc" | "mariadb" => {
            let classes = tempfile::tempdir().unwrap().keep();
            let javac = Command::new("javac")
                .arg("-d")
                .arg(&classes)
                .arg(dir.join("Drivers.java"))
                .status()
                .expect("javac (openjdk-17-jdk-headless)");
            assert!(javac.success(), "javac Drivers.java");
            let jar = match driver {
                "pgjdbc" => "/usr/share/java/postgresql.jar",
                _ => "/usr/share/java/mariadb-java-client.jar",
            };
            assert!(
                std::path::Path::new(jar).exists(),
                "no {jar}: `cargo xtask setup` installs it"
            );
            let mut c = Command::new("java");
            c.arg("-cp")
                .arg(format!("{jar}:{}", classes.display()))
                .arg("Drivers");
            c
        }
        _ => {
            let mut c = Command::new(python());
            c.arg(dir.join("drivers.py"));
            c
        }
    };
    let child = cmd
        .arg(driver)
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start the {driver} session: {e}"));
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("done"),
        "the {driver} session failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pid
}

/// Runs each driver's session under one agent; the database spans of each, by
/// driver, in order.
fn sessions(port: u16, drivers: &[&str], system: &str) -> Vec<(String, Vec<Value>, String)> {
    let agent = Agent::start(&["--output", "json", "--port", &port.to_string()]);
    let pids: Vec<(String, u32)> = drivers
        .iter()
        .map(|d| (d.to_string(), run(d, port)))
        .collect();
    let last = pids.last().unwrap().1;
    agent.wait_json(20, "the last session's error span", |o| {
        spans(o)
            .iter()
            .any(|s| s["resource"]["process.pid"] == last && s["status"] == "error")
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    let objects = agent.stop_json();
    let everything = serde_json::to_string(&objects).unwrap();
    assert!(
        !everything.contains("secret-literal"),
        "a literal or value leaked"
    );
    pids.into_iter()
        .map(|(driver, pid)| {
            let mut calls: Vec<Value> = spans(&objects)
                .into_iter()
                .filter(|s| {
                    s["resource"]["process.pid"] == pid && attr(s, "db.system.name") == system
                })
                .cloned()
                .collect();
            calls.sort_by_key(|s| s["start_unix_nano"].as_u64());
            calls.iter().for_each(assert_span_contract);
            (driver, calls, everything.clone())
        })
        .collect()
}

fn text(s: &Value) -> String {
    attr(s, "db.query.text").as_str().unwrap_or("").to_string()
}

#[test]
fn postgres_drivers_give_their_calls_however_they_frame_them() {
    if !require_root("postgres_drivers_give_their_calls_however_they_frame_them") {
        return;
    }
    let pg = Postgres::start();
    for (driver, calls, _) in sessions(
        pg.port,
        &["psycopg", "asyncpg", "pg", "pgjdbc"],
        "postgresql",
    ) {
        let answers: Vec<&Value> = calls
            .iter()
            .filter(|s| text(s).contains("+ ?") && s["status"] == "unset")
            .collect();
        assert_eq!(
            answers.len(),
            2,
            "{driver}: the parameterised query twice: {calls:#?}"
        );
        for s in answers {
            assert_eq!(attr(s, "db.operation.name"), "SELECT", "{driver}");
            assert_eq!(attr(s, "db.namespace"), "postgres", "{driver}");
        }
        let failed: Vec<&Value> = calls.iter().filter(|s| s["status"] == "error").collect();
        assert_eq!(failed.len(), 1, "{driver}: {calls:#?}");
        assert_eq!(
            attr(failed[0], "db.response.status_code"),
            "22012",
            "{driver}"
        );
        assert_eq!(failed[0]["status_message"], "division_by_zero", "{driver}");
        assert_eq!(text(failed[0]), "SELECT ? / ?", "{driver}");
    }
}

#[test]
fn redis_drivers_give_their_commands_however_they_frame_them() {
    if !require_root("redis_drivers_give_their_commands_however_they_frame_them") {
        return;
    }
    let port = free_port();
    let _server = redis_server(port);
    for (driver, calls, _) in sessions(port, &["redis-sync", "redis-asyncio", "ioredis"], "redis") {
        let ours: Vec<(String, String)> = calls
            .iter()
            .map(|s| {
                (
                    attr(s, "db.operation.name")
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                    s["status"].as_str().unwrap().to_string(),
                )
            })
            .filter(|(op, _)| ["SET", "GET", "LPUSH"].contains(&op.as_str()))
            .collect();
        assert_eq!(
            ours,
            [
                ("SET".into(), "unset".into()),
                ("GET".into(), "unset".into()),
                ("LPUSH".into(), "error".into())
            ],
            "{driver}: {calls:#?}"
        );
        let failed = calls
            .iter()
            .find(|s| attr(s, "db.operation.name") == "LPUSH")
            .unwrap();
        assert_eq!(
            attr(failed, "db.response.status_code"),
            "WRONGTYPE",
            "{driver}"
        );
    }
}

#[test]
fn mysql_drivers_give_their_calls_however_they_frame_them() {
    if !require_root("mysql_drivers_give_their_calls_however_they_frame_them") {
        return;
    }
    let db = Mariadb::start();
    for (driver, calls, _) in sessions(db.port, &["pymysql", "mysql2", "mariadb"], "mysql") {
        let answers: Vec<&Value> = calls
            .iter()
            .filter(|s| text(s) == "SELECT ? + ? AS answer, ? AS s" && s["status"] == "unset")
            .collect();
        assert_eq!(
            answers.len(),
            2,
            "{driver}: the parameterised query twice: {calls:#?}"
        );
        let failed: Vec<&Value> = calls.iter().filter(|s| s["status"] == "error").collect();
        assert_eq!(failed.len(), 1, "{driver}: {calls:#?}");
        assert_eq!(
            attr(failed[0], "db.response.status_code"),
            "1146",
            "{driver}"
        );
        assert_eq!(failed[0]["status_message"], "ER_NO_SUCH_TABLE", "{driver}");
        assert_eq!(
            attr(failed[0], "db.collection.name"),
            "no_such_table",
            "{driver}"
        );
    }
}
