//! The parent-inference accuracy benchmark (`cargo xtask bench parents`): real
//! services whose true call tree is known by construction (chain.py), per server
//! model and concurrency. Ignored by `cargo test`: it measures, it does not assert.
//!
//! Always load → A → B → C → PostgreSQL; A and C are chain.py's threaded services,
//! and the model is hop B. Models: `threaded` = B thread-per-request; `event-loop` =
//! B is an asyncio server; `event-loop-2calls` = B is an asyncio server whose
//! handlers call C twice, the second call after the answer to the first. Then B as
//! the runtimes real services use (tests/support/models/): `node`, `aiohttp`,
//! `uvicorn`, `go` (two calls, no database), `tokio` and `java`. These share one
//! pool of at most 4 keep-alive connections to C among all concurrent requests,
//! and (all but `go`) make a PostgreSQL query of their own (`SELECT 1 AS b_<id>`)
//! through a pool of at most 4 connections, after their calls to C.
//!
//! TRACER_BENCH_MODELS=node,go runs only those models; TRACER_BENCH_ONLY=node:8 one
//! configuration.

mod support;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::*;

fn service(port: u16, extra: &[String]) -> Proc {
    let child = Command::new(python())
        .arg(support_dir().join("chain.py"))
        .args(["serve", &port.to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("start chain service");
    wait_for_port(port, "chain service");
    Proc(child)
}

/// What serves hop B.
#[derive(Clone, Copy)]
enum Hop {
    /// chain.py with these extra arguments.
    Chain(&'static [&'static str]),
    Node,
    Aiohttp,
    Uvicorn,
    Go,
    Tokio,
    Java,
}

struct Model {
    /// What the table prints, and what TRACER_BENCH_MODELS / TRACER_BENCH_ONLY name.
    name: &'static str,
    b: Hop,
    /// Sequential calls B makes to C per request.
    calls: usize,
    /// B makes its own PostgreSQL query, `SELECT 1 AS b_<id>`, after its calls.
    b_db: bool,
}

const MODELS: &[Model] = &[
    Model {
        name: "threaded",
        b: Hop::Chain(&[]),
        calls: 1,
        b_db: false,
    },
    Model {
        name: "event-loop",
        b: Hop::Chain(&["--model", "asyncio", "--calls", "1"]),
        calls: 1,
        b_db: false,
    },
    Model {
        name: "event-loop-2calls",
        b: Hop::Chain(&["--model", "asyncio", "--calls", "2"]),
        calls: 2,
        b_db: false,
    },
    Model {
        name: "node",
        b: Hop::Node,
        calls: 1,
        b_db: true,
    },
    Model {
        name: "aiohttp",
        b: Hop::Aiohttp,
        calls: 1,
        b_db: true,
    },
    Model {
        name: "uvicorn",
        b: Hop::Uvicorn,
        calls: 1,
        b_db: true,
    },
    // The standard library has no PostgreSQL driver: two calls instead.
    Model {
        name: "go",
        b: Hop::Go,
        calls: 2,
        b_db: false,
    },
    Model {
        name: "tokio",
        b: Hop::Tokio,
        calls: 1,
        b_db: true,
    },
    Model {
        name: "java",
        b: Hop::Java,
        calls: 1,
        b_db: true,
    },
];

/// Debian's PostgreSQL JDBC driver (libpostgresql-jdbc-java).
const PG_JDBC: &str = "/usr/share/java/postgresql.jar";

fn models_dir() -> PathBuf {
    support_dir().join("models")
}

fn build_dir() -> PathBuf {
    tools_dir().join("models")
}

/// Runs one build step; a missing tool or a failed build fails the benchmark.
fn build_step(cmd: &mut Command, what: &str) {
    println!("building the {what} model: {cmd:?}");
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "{what} model: cannot run {:?} ({e}): `cargo xtask setup` installs it",
            cmd.get_program()
        )
    });
    assert!(
        status.success(),
        "{what} model: {cmd:?} failed with {status}"
    );
}

/// Builds (or checks the prerequisites of) a model's hop B, once per run.
fn prepare(hop: Hop) {
    let out = build_dir();
    std::fs::create_dir_all(&out).expect("create the models' build directory");
    match hop {
        Hop::Chain(_) | Hop::Aiohttp | Hop::Uvicorn => {}
        Hop::Node => {
            let path = node_path();
            assert!(
                path.join("pg/package.json").exists(),
                "node model: the npm package pg is not in {} (TRACER_NODE_PATH): run `cargo xtask setup`",
                path.display()
            );
        }
        Hop::Go => {
            let go = tools_dir().join("go");
            build_step(
                Command::new("go")
                    .arg("build")
                    .arg("-o")
                    .arg(out.join("go_gateway"))
                    .arg(models_dir().join("go_gateway.go"))
                    .env("GO111MODULE", "off")
                    .env("GOCACHE", go.join("cache"))
                    .env("GOPATH", go.join("path"))
                    .env("GOFLAGS", ""),
                "go",
            );
        }
        Hop::Tokio => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            build_step(
                Command::new(cargo)
                    .args(["build", "--release", "--locked", "--manifest-path"])
                    .arg(models_dir().join("tokio_gateway/Cargo.toml"))
                    .arg("--target-dir")
                    .arg(tools_dir().join("tokio_gateway")),
                "tokio",
            );
        }
        Hop::Java => {
            assert!(
                Path::new(PG_JDBC).exists(),
                "java model: no {PG_JDBC}: `cargo xtask setup` installs libpostgresql-jdbc-java"
            );
            build_step(
                Command::new("javac")
                    .arg("-d")
                    .arg(out.join("java"))
                    .arg(models_dir().join("JavaGateway.java")),
                "java",
            );
        }
    }
}

/// The command that serves hop B of `model` on `port`, calling C at `next`.
fn b_command(model: &Model, port: u16, next: &str, pg: u16) -> Command {
    let models = models_dir();
    let mut cmd = match model.b {
        Hop::Chain(_) => unreachable!("chain.py hops start through service()"),
        Hop::Node => {
            let mut c = Command::new("node");
            c.env("NODE_PATH", node_path())
                .arg(models.join("node_gateway.js"));
            c
        }
        Hop::Aiohttp => {
            let mut c = Command::new(python());
            c.arg(models.join("aiohttp_gateway.py"));
            c
        }
        Hop::Uvicorn => {
            let mut c = Command::new(python());
            c.arg(models.join("uvicorn_gateway.py"));
            c
        }
        Hop::Go => {
            let mut c = Command::new(build_dir().join("go_gateway"));
            c.env("GOMAXPROCS", "4");
            c
        }
        Hop::Tokio => Command::new(tools_dir().join("tokio_gateway/release/tokio_gateway")),
        Hop::Java => {
            let mut c = Command::new("java");
            c.args(["-Xmx256m", "-Djdk.httpclient.connectionPoolSize=4", "-cp"])
                .arg(format!("{}:{PG_JDBC}", build_dir().join("java").display()))
                .arg("JavaGateway");
            c
        }
    };
    cmd.arg(port.to_string())
        .args(["--next", next, "--calls", &model.calls.to_string()]);
    if model.b_db {
        cmd.args(["--pg", &pg.to_string()]);
    }
    cmd
}

/// Starts a model's hop B and waits for its `ready` line and its port; a model
/// that exits or never gets ready fails the benchmark.
fn start_model(model: &Model, mut cmd: Command, port: u16) -> Proc {
    let mut child = Proc(
        cmd.stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{} model: starting {cmd:?}: {e}", model.name)),
    );
    let stdout = Lines::follow(child.0.stdout.take().expect("piped stdout"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stdout.snapshot().iter().any(|l| l.trim() == "ready") {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!(
                "{} model: {cmd:?} exited ({status}) before it was ready",
                model.name
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} model: {cmd:?} printed no `ready` within 60s",
            model.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for_port(port, model.name);
    child
}

/// The request id a span belongs to, and which call of B (1 or 2) its subtree
/// hangs under; B's own query (alias `b_<id>`) counts as leg 1.
fn id_of(span: &Value) -> Option<(u64, u8)> {
    if let Some(path) = attr(span, "url.path").as_str() {
        let (prefix, id) = path.strip_prefix('/')?.split_once('/')?;
        let leg = match prefix {
            "r" => 1,
            "r2" => 2,
            _ => return None,
        };
        return Some((id.parse().ok()?, leg));
    }
    let text = attr(span, "db.query.text").as_str()?;
    let alias = text.rsplit(' ').next()?;
    let (prefix, id) = alias.split_once('_')?;
    let leg = match prefix {
        "r" | "b" => 1,
        "r2" => 2,
        _ => return None,
    };
    Some((id.trim().parse().ok()?, leg))
}

#[derive(Default, Debug)]
struct Score {
    /// Spans of the expected trees that never came out.
    missing: usize,
    edges: usize,
    right: usize,
    wrong: usize,
    unlinked: usize,
    traces: usize,
    whole_traces: usize,
}

fn run(model: &Model, concurrency: usize, requests: usize, pg: &Postgres) -> Score {
    let (a, b, c) = (free_port(), free_port(), free_port());
    let svc_c = service(c, &["--pg".into(), pg.port.to_string()]);
    let next = format!("http://127.0.0.1:{c}");
    let calls = model.calls;
    let svc_b = match model.b {
        Hop::Chain(extra) => {
            let mut b_args = vec!["--next".to_string(), next];
            b_args.extend(extra.iter().map(|a| a.to_string()));
            service(b, &b_args)
        }
        _ => start_model(model, b_command(model, b, &next, pg.port), b),
    };
    let svc_a = service(a, &["--next".into(), format!("http://127.0.0.1:{b}")]);
    let ports: Vec<String> = [a, b, c, pg.port].iter().map(u16::to_string).collect();
    let mut args = vec!["--output", "json"];
    for p in &ports {
        args.extend(["--port", p.as_str()]);
    }
    let agent = Agent::start(&args);
    let url = format!("http://127.0.0.1:{a}");
    let (load_pid, out) = python_client(
        "chain.py",
        &[
            "load",
            &url,
            &requests.to_string(),
            &concurrency.to_string(),
        ],
    );
    assert!(out.contains("errors 0"), "{out}");
    // Wait for every span, but measure what arrived if some never do.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let per_request = 4 + 3 * calls + usize::from(model.b_db);
    while spans(&agent.json()).len() < requests * per_request
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (stdout, stderr) = agent.stop();
    if let Ok(dir) = std::env::var("TRACER_BENCH_DUMP") {
        // Keep what the agent printed, to study the links it got wrong.
        let name = format!("{dir}/{}-{concurrency}", model.name);
        std::fs::write(format!("{name}.json"), stdout.text()).expect("dump spans");
        std::fs::write(format!("{name}.log"), stderr.text()).expect("dump log");
        println!(
            "{} c={concurrency}: pids load {load_pid} A {} B {} C {}",
            model.name,
            svc_a.pid(),
            svc_b.pid(),
            svc_c.pid()
        );
    }
    let objects: Vec<Value> = stdout
        .snapshot()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let all = spans(&objects);
    let mut by_id: HashMap<u64, Vec<(&Value, u8)>> = HashMap::new();
    for s in &all {
        if let Some((id, leg)) = id_of(s) {
            by_id.entry(id).or_default().push((s, leg));
        }
    }
    let pid = |s: &Value| s["resource"]["process.pid"].as_u64().unwrap_or(0) as u32;
    let mut score = Score::default();
    let seen: usize = by_id.values().map(Vec::len).sum();
    score.missing = (requests * per_request).saturating_sub(seen);
    score.traces = requests;
    for spans in by_id.values() {
        let find = |p: u32, kind: &str, db: bool, leg: u8| -> Option<&Value> {
            let found: Vec<&Value> = spans
                .iter()
                .filter(|(s, l)| {
                    *l == leg
                        && pid(s) == p
                        && s["kind"] == kind
                        && attr(s, "db.system.name").is_string() == db
                })
                .map(|(s, _)| *s)
                .collect();
            (found.len() == 1).then(|| found[0])
        };
        // (parent, child) for every edge of the known tree.
        let (load, a_s, a_c, b_s) = (
            find(load_pid, "client", false, 1),
            find(svc_a.pid(), "server", false, 1),
            find(svc_a.pid(), "client", false, 1),
            find(svc_b.pid(), "server", false, 1),
        );
        let mut edges = vec![(load, a_s), (a_s, a_c), (a_c, b_s)];
        if model.b_db {
            edges.push((b_s, find(svc_b.pid(), "client", true, 1)));
        }
        for leg in 1..=calls as u8 {
            let b_c = find(svc_b.pid(), "client", false, leg);
            let c_s = find(svc_c.pid(), "server", false, leg);
            let db = find(svc_c.pid(), "client", true, leg);
            edges.extend([(b_s, b_c), (b_c, c_s), (c_s, db)]);
        }
        let mut whole = spans.len() == per_request;
        for (parent, child) in edges {
            score.edges += 1;
            let (Some(parent), Some(child)) = (parent, child) else {
                score.unlinked += 1;
                whole = false;
                continue;
            };
            if child["parent_span_id"].is_null() {
                score.unlinked += 1;
                whole = false;
            } else if child["parent_span_id"] == parent["span_id"] {
                score.right += 1;
            } else {
                score.wrong += 1;
                whole = false;
            }
        }
        let trace = load.map(|s| &s["trace_id"]);
        whole &= spans.iter().all(|(s, _)| Some(&s["trace_id"]) == trace);
        score.whole_traces += usize::from(whole);
    }
    drop((svc_a, svc_b, svc_c));
    score
}

/// The models TRACER_BENCH_MODELS names (comma-separated), all when unset.
fn selected_models() -> Vec<&'static Model> {
    let Ok(names) = std::env::var("TRACER_BENCH_MODELS") else {
        return MODELS.iter().collect();
    };
    let names: Vec<&str> = names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    for name in &names {
        assert!(
            MODELS.iter().any(|m| m.name == *name),
            "TRACER_BENCH_MODELS: no model {name:?}; the models are {:?}",
            MODELS.iter().map(|m| m.name).collect::<Vec<_>>()
        );
    }
    MODELS.iter().filter(|m| names.contains(&m.name)).collect()
}

#[test]
#[ignore = "a benchmark: run with `cargo xtask bench parents`"]
fn parent_inference_accuracy() {
    if !require_root("parent_inference_accuracy") {
        return;
    }
    let requests: usize = std::env::var("TRACER_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    // TRACER_BENCH_ONLY=event-loop:8 runs one configuration.
    let only = std::env::var("TRACER_BENCH_ONLY").ok();
    let runs: Vec<(&Model, usize)> = selected_models()
        .into_iter()
        .flat_map(|m| [1, 8, 32].map(|c| (m, c)))
        .filter(|(m, c)| {
            only.as_ref()
                .is_none_or(|o| *o == format!("{}:{c}", m.name))
        })
        .collect();
    assert!(
        !runs.is_empty(),
        "no run matches TRACER_BENCH_MODELS / TRACER_BENCH_ONLY={only:?}"
    );
    // Build what the chosen models need, once.
    let mut built: Vec<&str> = Vec::new();
    for (model, _) in &runs {
        if !built.contains(&model.name) {
            prepare(model.b);
            built.push(model.name);
        }
    }
    let pg = Postgres::start();
    println!(
        "\nparent inference accuracy: {requests} requests per run, chain load → A → B → C → PostgreSQL"
    );
    let w = MODELS.iter().map(|m| m.name.len()).max().unwrap_or(5);
    println!(
        "{:<w$} {:>4}  {:>12} {:>12} {:>10} {:>10} {:>8}",
        "model", "conc", "edges right", "whole trace", "wrong", "unlinked", "missing"
    );
    for (model, concurrency) in runs {
        let s = run(model, concurrency, requests, &pg);
        let pct = |n: usize, d: usize| 100.0 * n as f64 / d.max(1) as f64;
        println!(
            "{:<w$} {:>4}  {:>11.1}% {:>11.1}% {:>9.2}% {:>9.1}% {:>8}",
            model.name,
            concurrency,
            pct(s.right, s.edges),
            pct(s.whole_traces, s.traces),
            pct(s.wrong, s.edges),
            pct(s.unlinked, s.edges),
            s.missing,
        );
    }
}
