//! Parent inference end to end: a chain of three real threaded Python services
//! (A → B → C → PostgreSQL) under concurrency 8. Every request must come out as
//! exactly one trace equal to the known tree, with and without `traceparent`
//! headers on the wire.

mod support;

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use support::*;

const REQUESTS: usize = 40;
const CONCURRENCY: &str = "8";

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

fn id_of(span: &Value) -> Option<u64> {
    if let Some(path) = attr(span, "url.path").as_str() {
        return path.strip_prefix("/r/")?.parse().ok();
    }
    let text = attr(span, "db.query.text").as_str()?;
    text.rsplit("r_").next()?.trim().parse().ok()
}

fn chain_gives_one_exact_trace_per_request(with_headers: bool) {
    let pg = Postgres::start();
    let (a, b, c) = (free_port(), free_port(), free_port());
    let propagate: Vec<String> = if with_headers {
        vec!["--propagate".into()]
    } else {
        vec![]
    };
    let with = |mut v: Vec<String>| {
        v.extend(propagate.clone());
        v
    };
    let svc_c = service(c, &with(vec!["--pg".into(), pg.port.to_string()]));
    let svc_b = service(
        b,
        &with(vec!["--next".into(), format!("http://127.0.0.1:{c}")]),
    );
    let svc_a = service(
        a,
        &with(vec!["--next".into(), format!("http://127.0.0.1:{b}")]),
    );
    let ports: Vec<String> = [a, b, c, pg.port].iter().map(u16::to_string).collect();
    let mut args = vec!["--output", "json"];
    for p in &ports {
        args.extend(["--port", p.as_str()]);
    }
    let agent = Agent::start(&args);
    let mut load = vec![
        "load".to_string(),
        format!("http://127.0.0.1:{a}"),
        REQUESTS.to_string(),
        CONCURRENCY.into(),
    ];
    if with_headers {
        load.push("--header".into());
    }
    let load: Vec<&str> = load.iter().map(String::as_str).collect();
    let (load_pid, out) = python_client("chain.py", &load);
    assert!(out.contains("errors 0"), "{out}");
    agent.wait_json(30, "seven spans per request", |o| {
        spans(o).len() >= REQUESTS * 7
    });
    std::thread::sleep(Duration::from_millis(500));
    let objects = agent.stop_json();
    let all = spans(&objects);

    // Group by request id, and find each hop by process and kind.
    let mut by_id: HashMap<u64, Vec<&Value>> = HashMap::new();
    for s in &all {
        if let Some(id) = id_of(s) {
            by_id.entry(id).or_default().push(s);
        }
    }
    assert_eq!(by_id.len(), REQUESTS, "every request seen");
    let pid = |s: &Value| s["resource"]["process.pid"].as_u64().unwrap() as u32;
    let mut trace_ids = std::collections::HashSet::new();
    for (id, spans) in &by_id {
        let find = |p: u32, kind: &str, db: bool| -> &Value {
            let found: Vec<&&Value> = spans
                .iter()
                .filter(|s| {
                    pid(s) == p && s["kind"] == kind && attr(s, "db.system.name").is_string() == db
                })
                .collect();
            assert_eq!(
                found.len(),
                1,
                "request {id}: one {kind} span of pid {p} (db={db}): {spans:#?}"
            );
            found[0]
        };
        let load_client = find(load_pid, "client", false);
        let a_server = find(svc_a.pid(), "server", false);
        let a_client = find(svc_a.pid(), "client", false);
        let b_server = find(svc_b.pid(), "server", false);
        let b_client = find(svc_b.pid(), "client", false);
        let c_server = find(svc_c.pid(), "server", false);
        let c_db = find(svc_c.pid(), "client", true);
        assert_eq!(
            spans.len(),
            7,
            "request {id}: exactly the seven spans of its tree: {spans:#?}"
        );
        let edges = [
            (a_server, load_client),
            (a_client, a_server),
            (b_server, a_client),
            (b_client, b_server),
            (c_server, b_client),
            (c_db, c_server),
        ];
        for (child, parent) in edges {
            assert_eq!(
                child["parent_span_id"],
                parent["span_id"],
                "request {id}: wrong parent for {} {} of pid {}:\n{child:#}\nexpected parent:\n{parent:#}",
                child["kind"],
                child["name"],
                pid(child)
            );
        }
        if !with_headers {
            assert!(
                load_client["parent_span_id"].is_null(),
                "the load generator's call is the root"
            );
        }
        let trace = &load_client["trace_id"];
        assert!(
            spans.iter().all(|s| &s["trace_id"] == trace),
            "request {id}: one trace"
        );
        assert!(
            trace_ids.insert(trace.as_str().unwrap().to_string()),
            "request {id}: a trace of its own"
        );
    }
    let sources: Vec<&str> = all
        .iter()
        .filter_map(|s| attr(s, "tracer.parent.source").as_str())
        .collect();
    let expected_source = if with_headers { "header" } else { "socket" };
    assert!(
        sources.contains(&expected_source) && sources.contains(&"thread"),
        "{sources:?}"
    );
}

#[test]
fn a_three_service_chain_without_headers_gives_the_exact_tree() {
    if require_root("a_three_service_chain_without_headers_gives_the_exact_tree") {
        chain_gives_one_exact_trace_per_request(false);
    }
}

#[test]
fn a_three_service_chain_with_traceparent_headers_gives_the_exact_tree() {
    if require_root("a_three_service_chain_with_traceparent_headers_gives_the_exact_tree") {
        chain_gives_one_exact_trace_per_request(true);
    }
}
