//! The parent-inference accuracy benchmark (`cargo xtask bench parents`): real
//! services whose true call tree is known by construction (chain.py), per server
//! model and concurrency. Ignored by `cargo test`: it measures, it does not assert.
//!
//! Models: `threaded` = A, B, C thread-per-request; `event-loop` = B is an asyncio
//! server; `event-loop-2calls` = B is an asyncio server whose handlers call C
//! twice, the second call after the answer to the first. Always A → B → C →
//! PostgreSQL, plus the load generator's own call.

mod support;

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::Duration,
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

/// The request id a span belongs to, and which call of the asyncio hop (1 or 2)
/// its subtree hangs under.
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
        "r" => 1,
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

fn run(model: &str, concurrency: usize, requests: usize, pg: &Postgres) -> Score {
    let (a, b, c) = (free_port(), free_port(), free_port());
    let svc_c = service(c, &["--pg".into(), pg.port.to_string()]);
    let mut b_args = vec!["--next".to_string(), format!("http://127.0.0.1:{c}")];
    let calls = if model == "event-loop-2calls" { 2 } else { 1 };
    if model.starts_with("event-loop") {
        b_args.extend(["--model".into(), "asyncio".into()]);
        b_args.extend(["--calls".into(), calls.to_string()]);
    }
    let svc_b = service(b, &b_args);
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
    let per_request = 4 + 3 * calls;
    while spans(&agent.json()).len() < requests * per_request
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(2500));
    let (stdout, stderr) = agent.stop();
    if let Ok(dir) = std::env::var("TRACER_BENCH_DUMP") {
        // Keep what the agent printed, to study the links it got wrong.
        let name = format!("{dir}/{model}-{concurrency}");
        std::fs::write(format!("{name}.json"), stdout.text()).expect("dump spans");
        std::fs::write(format!("{name}.log"), stderr.text()).expect("dump log");
        println!(
            "{model} c={concurrency}: pids load {load_pid} A {} B {} C {}",
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
    let pg = Postgres::start();
    println!(
        "\nparent inference accuracy: {requests} requests per run, chain load → A → B → C → PostgreSQL"
    );
    println!(
        "{:<17} {:>4}  {:>12} {:>12} {:>10} {:>10} {:>8}",
        "model", "conc", "edges right", "whole trace", "wrong", "unlinked", "missing"
    );
    for model in ["threaded", "event-loop", "event-loop-2calls"] {
        for concurrency in [1, 8, 32] {
            // TRACER_BENCH_ONLY=event-loop:8 runs one configuration.
            if let Ok(only) = std::env::var("TRACER_BENCH_ONLY")
                && only != format!("{model}:{concurrency}")
            {
                continue;
            }
            let s = run(model, concurrency, requests, &pg);
            let pct = |n: usize, d: usize| 100.0 * n as f64 / d.max(1) as f64;
            println!(
                "{:<17} {:>4}  {:>11.1}% {:>11.1}% {:>9.2}% {:>9.1}% {:>8}",
                model,
                concurrency,
                pct(s.right, s.edges),
                pct(s.whole_traces, s.traces),
                pct(s.wrong, s.edges),
                pct(s.unlinked, s.edges),
                s.missing,
            );
        }
    }
}
