//! `cargo xtask soak`: the agent under conditions a node lives through, each
//! scenario for a bounded time, printing its memory over time, what it dropped by
//! cause, whether the spans of honest traffic beside it were right, and whether it
//! recovered by itself.
//!
//! - `outage`: steady HTTP load while the OTLP collector is down (10 minutes by
//!   default), then back on the same port: memory must stay flat, every drop be
//!   counted, and export resume without a restart.
//! - `hostile`: random bytes, half requests, 1 MiB headers, slowloris, TLS bytes,
//!   pipelined floods and a 3,000-path cardinality attack on the HTTP port, beside
//!   honest requests whose spans must all be right.
//!
//! - `restart`: the agent stopped and started again under HTTP keep-alive load and
//!   a PostgreSQL pool (psycopg, 4 connections, a free port: no well-known port to
//!   guess from): the new agent must give right spans on the old connections and
//!   list the pool's connections as recovered.
//!
//! - `connections`: 100,000 keep-alive connections held open, then churn beside
//!   them (short connections, short-lived `curl` processes: new pids, reused
//!   ports), then a sample of the long-lived connections used again.
//!
//! Honest requests carry a unique path (`/honest/<n>`): each must give exactly one
//! SERVER span with that path and status 200 in the agent's JSON output.

use std::{
    collections::HashMap,
    io::{BufRead, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::overhead::{
    Agent, Proc, collector_on, free_port, read_response, scratch_dir, serve, sum_where,
};

/// The scenarios, for `--scenario`.
pub const SCENARIOS: [&str; 4] = ["outage", "hostile", "restart", "connections"];

pub struct Options {
    pub agent: PathBuf,
    pub rotel: PathBuf,
    /// The Python with psycopg (the test venv's).
    pub python: PathBuf,
    /// Scenarios to run; all when empty.
    pub scenarios: Vec<String>,
    /// How long the collector is down in `outage`.
    pub outage_minutes: f64,
    /// How long `hostile` runs.
    pub hostile_seconds: u64,
    /// Honest requests per second beside each scenario.
    pub rate: f64,
    /// Long-lived connections in `connections`, and how long the churn beside
    /// them lasts.
    pub connections: usize,
    pub churn_seconds: u64,
}

/// One scenario's outcome.
struct Outcome {
    scenario: &'static str,
    peak_rss_mb: f64,
    drops: Vec<(String, f64)>,
    honest: u64,
    right: u64,
    recovered: String,
}

pub fn run(opts: &Options) -> Result<()> {
    let wanted = |s: &str| opts.scenarios.is_empty() || opts.scenarios.iter().any(|x| x == s);
    let mut outcomes = Vec::new();
    if wanted("outage") {
        outcomes.push(outage(opts)?);
    }
    if wanted("hostile") {
        outcomes.push(hostile(opts)?);
    }
    if wanted("restart") {
        outcomes.push(restart(opts)?);
    }
    if wanted("connections") {
        outcomes.push(connections(opts)?);
    }
    println!(
        "\nsoak: {} honest requests/s beside each scenario\n",
        opts.rate
    );
    println!(
        "{:<10} {:>12} {:>9} {:>9}  {:<40} drops by cause",
        "scenario", "peak RSS MB", "honest", "right", "recovered by itself"
    );
    for o in &outcomes {
        let drops = if o.drops.is_empty() {
            "none".to_string()
        } else {
            o.drops
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:<10} {:>12.1} {:>9} {:>9}  {:<40} {drops}",
            o.scenario, o.peak_rss_mb, o.honest, o.right, o.recovered
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.right != o.honest || !o.recovered.starts_with("yes"))
        .map(|o| o.scenario)
        .collect();
    if !failed.is_empty() {
        bail!("soak scenarios failed: {failed:?}");
    }
    Ok(())
}

// ---- shared pieces -----------------------------------------------------------

/// nginx answering 200 `ok` on every path (one worker), on a free port.
fn nginx_ok(dir: &Path) -> Result<(Proc, u16)> {
    let port = free_port()?;
    Ok((nginx_serving(dir, &[port], 1, 8192)?, port))
}

/// nginx answering 200 `ok` on every path on `ports`, with `workers` workers of
/// `per_worker` connections each (`reuseport` spreads connections among them).
fn nginx_serving(dir: &Path, ports: &[u16], workers: usize, per_worker: usize) -> Result<Proc> {
    let conf = dir.join("nginx.conf");
    let listens: String = ports
        .iter()
        .map(|p| format!("listen 127.0.0.1:{p} backlog=65535 reuseport; "))
        .collect();
    std::fs::write(
        &conf,
        format!(
            "worker_processes {workers};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections {per_worker}; }}\n\
             http {{ access_log off; keepalive_requests 100000000; keepalive_timeout 600s;\n\
             client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
             uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ {listens} default_type text/plain;\n\
             location / {{ return 200 'ok\\n'; }} }} }}\n",
            d = dir.display(),
        ),
    )?;
    serve(
        Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(dir.join("error.log")),
        ports[0],
        "nginx",
    )
}

/// Honest requests at `rate` per second over 4 keep-alive connections, each to
/// its own path, until `stop`; counts those answered.
fn honest_load(
    port: u16,
    rate: f64,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<Result<()>>> {
    honest_load_ids(port, rate, stop, done, Arc::new(AtomicU64::new(0)))
}

/// As [`honest_load`], the next request's id in `next_id`.
fn honest_load_ids(
    port: u16,
    rate: f64,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    next_id: Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<Result<()>>> {
    const CONNECTIONS: u64 = 4;
    (0..CONNECTIONS)
        .map(|_| {
            let (stop, done, next_id) = (stop.clone(), done.clone(), next_id.clone());
            std::thread::spawn(move || -> Result<()> {
                let interval = Duration::from_secs_f64(CONNECTIONS as f64 / rate);
                let mut s = TcpStream::connect(("127.0.0.1", port))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut buf = vec![0u8; 4096];
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    let req = format!("GET /honest/{id} HTTP/1.1\r\nHost: soak\r\n\r\n");
                    s.write_all(req.as_bytes())?;
                    read_response(&mut s, &mut buf)?;
                    done.fetch_add(1, Ordering::Relaxed);
                    next += interval;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                }
                Ok(())
            })
        })
        .collect()
}

/// Honest requests that gave exactly one SERVER span with their path and a 200,
/// from the agent's JSON lines.
fn honest_spans_right(json: &Path) -> Result<u64> {
    honest_spans_right_in(json, 0..u64::MAX)
}

/// As [`honest_spans_right`], for the requests whose id is in `ids`.
fn honest_spans_right_in(json: &Path, ids: std::ops::Range<u64>) -> Result<u64> {
    server_spans_right(json, "/honest/", ids)
}

/// Requests for `<prefix><n>`, n in `ids`, that gave exactly one SERVER span with
/// a 200.
fn server_spans_right(json: &Path, prefix: &str, ids: std::ops::Range<u64>) -> Result<u64> {
    spans_right(
        json,
        prefix,
        ids,
        // The server's spans (the client's own spans carry the path too).
        |v| {
            if v["kind"] != "server" {
                return None;
            }
            v["attributes"]["url.path"]
                .as_str()?
                .strip_prefix(prefix)?
                .parse()
                .ok()
        },
        |v| v["attributes"]["http.response.status_code"] == 200 && v["status"] != "error",
    )
}

/// Of the operations numbered `ids`, those with exactly one span in the agent's
/// JSON lines (lines holding `needle`; `id` numbers a span, `right` checks it),
/// and that one right.
fn spans_right(
    json: &Path,
    needle: &str,
    ids: std::ops::Range<u64>,
    id: impl Fn(&serde_json::Value) -> Option<u64>,
    right: impl Fn(&serde_json::Value) -> bool,
) -> Result<u64> {
    let file = std::fs::File::open(json).with_context(|| format!("{}", json.display()))?;
    let mut seen: HashMap<u64, (u32, bool)> = HashMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if !line.contains(needle) {
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["type"] != "span" {
            continue;
        }
        let Some(n) = id(&v).filter(|n| ids.contains(n)) else {
            continue;
        };
        let e = seen.entry(n).or_insert((0, true));
        e.0 += 1;
        e.1 &= right(&v);
    }
    Ok(seen.values().filter(|(n, ok)| *n == 1 && *ok).count() as u64)
}

/// Every nonzero drop counter, by metric and label set.
fn drops(metrics: &str) -> Vec<(String, f64)> {
    const DROPS: [&str; 5] = [
        "tracer_events_lost_total",
        "tracer_queue_dropped_total",
        "tracer_otlp_dropped_total",
        "tracer_traffic_dropped_total",
        "tracer_connections_evicted_total",
    ];
    metrics
        .lines()
        .filter(|l| DROPS.iter().any(|d| l.starts_with(d)))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            let v: f64 = v.parse().ok()?;
            (v > 0.0).then(|| (k.trim_start_matches("tracer_").to_string(), v))
        })
        .collect()
}

/// A sampler printing the agent's RSS and `extra` metrics every `every`; returns
/// the peak RSS seen.
struct Sampler {
    started: Instant,
    peak_rss_mb: f64,
}

impl Sampler {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            peak_rss_mb: 0.0,
        }
    }

    fn sample(&mut self, agent: &Agent, phase: &str) {
        let usage = agent.usage();
        self.peak_rss_mb = self.peak_rss_mb.max(usage.rss_mb);
        let m = agent.get("/metrics").unwrap_or_default();
        println!(
            "{:>7.0}s {:<10} rss {:>6.1} MB  built {:>8}  exported {:>8}  otlp buffered {:>6}  otlp dropped {:>6}  traffic dropped {:>6}  held {:>8} B",
            self.started.elapsed().as_secs_f64(),
            phase,
            usage.rss_mb,
            sum_where(&m, "tracer_spans_built_total", ""),
            sum_where(&m, "tracer_spans_exported_total", "otlp"),
            sum_where(&m, "tracer_queue_depth", "queue=\"otlp\""),
            sum_where(&m, "tracer_otlp_dropped_total", ""),
            sum_where(&m, "tracer_traffic_dropped_total", ""),
            sum_where(&m, "tracer_decoder_held_bytes", ""),
        );
    }
}

/// Runs `for_` while sampling every `every`; stops early if the agent died.
fn hold(
    agent: &mut Agent,
    sampler: &mut Sampler,
    phase: &str,
    for_: Duration,
    every: Duration,
) -> Result<()> {
    let end = Instant::now() + for_;
    while Instant::now() < end {
        std::thread::sleep(every.min(end.saturating_duration_since(Instant::now())));
        if !agent.alive() {
            bail!("the agent exited during {phase}");
        }
        sampler.sample(agent, phase);
    }
    Ok(())
}

/// The agent following `port`, its spans as JSON lines to `dir/spans.jsonl` and
/// over OTLP gRPC to the collector on `grpc`, its log to `dir/agent.log`.
fn traced_and_exported(opts: &Options, dir: &Path, port: u16, grpc: u16) -> Result<Agent> {
    let endpoint = format!("http://127.0.0.1:{grpc}");
    let port_arg = port.to_string();
    Agent::launch(
        &opts.agent,
        &[
            "--output",
            "json",
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--port",
            &port_arg,
        ],
        Stdio::from(std::fs::File::create(dir.join("spans.jsonl"))?),
        Stdio::from(std::fs::File::create(dir.join("agent.log"))?),
    )
}

/// Stops the honest load and waits for its threads.
fn end_load(stop: &AtomicBool, load: Vec<std::thread::JoinHandle<Result<()>>>) -> Result<()> {
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    }
    Ok(())
}

fn healthy(agent: &Agent) -> bool {
    agent
        .get("/healthz")
        .is_ok_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
}

// ---- outage ------------------------------------------------------------------

fn outage(opts: &Options) -> Result<Outcome> {
    let dir = scratch_dir("soak-outage")?;
    let (_nginx, port) = nginx_ok(&dir)?;
    let (grpc, http) = (free_port()?, free_port()?);
    let mut collector = Some(collector_on(&opts.rotel, &dir, grpc, http)?);
    let json = dir.join("spans.jsonl");
    let mut agent = traced_and_exported(opts, &dir, port, grpc)?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = honest_load(port, opts.rate, stop.clone(), done.clone());
    let mut sampler = Sampler::new();
    let every = Duration::from_secs(10);
    println!(
        "--- soak outage: collector down {} min",
        opts.outage_minutes
    );
    hold(
        &mut agent,
        &mut sampler,
        "steady",
        Duration::from_secs(20),
        every,
    )?;
    drop(collector.take()); // the collector goes away
    hold(
        &mut agent,
        &mut sampler,
        "outage",
        Duration::from_secs_f64(opts.outage_minutes * 60.0),
        every,
    )?;
    let exported_before = agent.counter("tracer_spans_exported_total");
    collector = Some(collector_on(&opts.rotel, &dir, grpc, http)?);
    // Export resumes by itself within the retry backoff.
    let back = Instant::now();
    let mut resumed = None;
    while back.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_secs(2));
        if agent.counter("tracer_spans_exported_total") > exported_before {
            resumed = Some(back.elapsed());
            break;
        }
    }
    hold(
        &mut agent,
        &mut sampler,
        "recovered",
        Duration::from_secs(20),
        every,
    )?;
    end_load(&stop, load)?;
    std::thread::sleep(Duration::from_secs(3));
    let metrics = agent.get("/metrics").unwrap_or_default();
    let healthy_now = healthy(&agent);
    let peak = agent.usage().peak_rss_mb.max(sampler.peak_rss_mb);
    agent.stop();
    drop(collector);
    let recovered = match resumed {
        Some(after) if healthy_now => {
            format!("yes: export resumed {:.0} s after", after.as_secs_f64())
        }
        Some(_) => "no: /healthz not ok at the end".to_string(),
        None => "no: export did not resume in 120 s".to_string(),
    };
    Ok(Outcome {
        scenario: "outage",
        peak_rss_mb: peak,
        drops: drops(&metrics),
        honest: done.load(Ordering::Relaxed),
        right: honest_spans_right(&json)?,
        recovered,
    })
}

// ---- hostile -----------------------------------------------------------------

/// One kind of hostile client, run in a loop until `stop`.
fn attack(kind: &'static str, port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let connect = || -> Option<TcpStream> {
            let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
            s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
            Some(s)
        };
        let drain = |s: &mut TcpStream| {
            let mut buf = [0u8; 65536];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        };
        let mut slow: Vec<TcpStream> = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            match kind {
                "random" => {
                    if let Some(mut s) = connect() {
                        let bytes: Vec<u8> = (0..4096).map(|_| fastrand::u8(..)).collect();
                        let _ = s.write_all(&bytes);
                        drain(&mut s);
                    }
                }
                "half" => {
                    if let Some(mut s) = connect() {
                        let _ = s.write_all(b"GET /half HTTP/1.1\r\nHost: x\r\nX-A: ");
                    }
                }
                "big-header" => {
                    if let Some(mut s) = connect() {
                        let mut req = b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
                        req.extend(std::iter::repeat_n(b'a', 1 << 20));
                        req.extend_from_slice(b"\r\n\r\n");
                        let _ = s.write_all(&req);
                        drain(&mut s);
                    }
                }
                "slowloris" => {
                    // 200 connections, each a header byte at a time.
                    while slow.len() < 200 {
                        let Some(mut s) = connect() else { break };
                        let _ = s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ");
                        slow.push(s);
                    }
                    // Those the server gave up on are replaced next round.
                    slow.retain_mut(|s| s.write_all(b"a").is_ok());
                    std::thread::sleep(Duration::from_millis(200));
                }
                "tls" => {
                    if let Some(mut s) = connect() {
                        let hello = [
                            0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c, 0x03, 0x03,
                        ];
                        let _ = s.write_all(&hello);
                        let _ = s.write_all(&[0u8; 64]);
                        drain(&mut s);
                    }
                }
                "pipelined" => {
                    if let Some(mut s) = connect() {
                        let one = b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n";
                        let _ = s.write_all(&one.repeat(500));
                        let _ = s.write_all(
                            b"GET /flood HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                        );
                        drain(&mut s);
                    }
                }
                _ => {
                    // The cardinality attack: letter-only paths, never the same.
                    if let Some(mut s) = connect() {
                        let path: String = (0..12).map(|_| fastrand::lowercase()).collect();
                        let req =
                            format!("GET /{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                        let _ = s.write_all(req.as_bytes());
                        drain(&mut s);
                    }
                }
            }
            // About 50 attacks of each kind a second: hostile, not a CPU benchmark.
            if kind != "slowloris" {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    })
}

fn hostile(opts: &Options) -> Result<Outcome> {
    let dir = scratch_dir("soak-hostile")?;
    let (_nginx, port) = nginx_ok(&dir)?;
    let (grpc, http) = (free_port()?, free_port()?);
    let _collector = collector_on(&opts.rotel, &dir, grpc, http)?;
    let json = dir.join("spans.jsonl");
    let log = dir.join("agent.log");
    let mut agent = traced_and_exported(opts, &dir, port, grpc)?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = honest_load(port, opts.rate, stop.clone(), done.clone());
    let attack_stop = Arc::new(AtomicBool::new(false));
    let kinds = [
        "random",
        "half",
        "big-header",
        "slowloris",
        "tls",
        "pipelined",
        "paths",
    ];
    println!(
        "--- soak hostile: {} s of {kinds:?} beside honest traffic",
        opts.hostile_seconds
    );
    let attackers: Vec<_> = kinds
        .iter()
        .map(|k| attack(k, port, attack_stop.clone()))
        .collect();
    let mut sampler = Sampler::new();
    hold(
        &mut agent,
        &mut sampler,
        "hostile",
        Duration::from_secs(opts.hostile_seconds),
        Duration::from_secs(10),
    )?;
    attack_stop.store(true, Ordering::Relaxed);
    for a in attackers {
        let _ = a.join();
    }
    // Honest traffic goes on after the attack: the agent still traces it.
    hold(
        &mut agent,
        &mut sampler,
        "after",
        Duration::from_secs(15),
        Duration::from_secs(5),
    )?;
    end_load(&stop, load)?;
    std::thread::sleep(Duration::from_secs(3));
    let metrics = agent.get("/metrics").unwrap_or_default();
    let healthy_now = healthy(&agent);
    let alive = agent.alive();
    let peak = agent.usage().peak_rss_mb.max(sampler.peak_rss_mb);
    let series = sum_where(&metrics, "tracer_red_series", "");
    agent.stop();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let panicked = log_text.contains("panicked");
    println!("RED series at the end: {series}");
    let recovered = if panicked {
        "no: the agent logged a panic".to_string()
    } else if !alive || !healthy_now {
        "no: not running and healthy at the end".to_string()
    } else {
        format!("yes: healthy, {series} RED series")
    };
    Ok(Outcome {
        scenario: "hostile",
        peak_rss_mb: peak,
        drops: drops(&metrics),
        honest: done.load(Ordering::Relaxed),
        right: honest_spans_right(&json)?,
        recovered,
    })
}

// ---- restart -----------------------------------------------------------------

/// A psycopg client holding 4 connections: query n is `SELECT 1 AS q<n>` (a unique
/// text, no literal kept) on connection n % 4, every 25 ms; the count so far goes
/// to the progress file.
const PG_POOL: &str = r#"
import os, sys, time, psycopg
port, progress = int(sys.argv[1]), sys.argv[2]
conns = [psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) for _ in range(4)]
n = 0
while True:
    conns[n % 4].execute(f"SELECT 1 AS q{n}").fetchall()
    n += 1
    with open(progress + ".tmp", "w") as f:
        f.write(str(n))
    os.replace(progress + ".tmp", progress)
    time.sleep(0.025)
"#;

fn progress(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// PostgreSQL calls `SELECT ? AS q<n>` with n in `ids` that gave exactly one
/// CLIENT span to `port`, from the agent's JSON lines.
fn pg_spans_right_in(json: &Path, port: u16, ids: std::ops::Range<u64>) -> Result<u64> {
    spans_right(
        json,
        "AS q",
        ids,
        // The pool's calls (the database server's end makes no spans).
        |v| {
            v["attributes"]["db.query.text"]
                .as_str()?
                .strip_prefix("SELECT ? AS q")?
                .parse()
                .ok()
        },
        |v| {
            v["kind"] == "client"
                && v["attributes"]["db.system.name"] == "postgresql"
                && v["attributes"]["server.port"] == port
                && v["status"] != "error"
        },
    )
}

fn restart(opts: &Options) -> Result<Outcome> {
    use std::os::unix::process::CommandExt;
    let dir = scratch_dir("soak-restart")?;
    let (_nginx, port) = nginx_ok(&dir)?;
    let pg = crate::overhead::postgres()?;
    let pool_progress = dir.join("pool.progress");
    let _pool = Proc(
        Command::new(&opts.python)
            .args(["-c", PG_POOL, &pg.port.to_string()])
            .arg(&pool_progress)
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(dir.join("pool.log"))?))
            .spawn()
            .context("starting the psycopg pool")?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while progress(&pool_progress) == 0 {
        if Instant::now() > deadline {
            bail!(
                "the psycopg pool did not start: see {}",
                dir.join("pool.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let next_id = Arc::new(AtomicU64::new(0));
    let load = honest_load_ids(port, opts.rate, stop.clone(), done.clone(), next_id.clone());
    let (http_port, pg_port) = (port.to_string(), pg.port.to_string());
    println!("--- soak restart: the agent stopped and started again under load");
    let start = |name: &str| -> Result<Agent> {
        Agent::launch(
            &opts.agent,
            &["--output", "json", "--port", &http_port, "--port", &pg_port],
            Stdio::from(std::fs::File::create(dir.join(format!("{name}.jsonl")))?),
            Stdio::from(std::fs::File::create(dir.join(format!("{name}.log")))?),
        )
    };
    let mut sampler = Sampler::new();
    let mut first = start("first")?;
    let every = Duration::from_secs(5);
    hold(
        &mut first,
        &mut sampler,
        "first",
        Duration::from_secs(20),
        every,
    )?;
    first.stop();
    std::thread::sleep(Duration::from_secs(2));
    let mut second = start("second")?;
    // Requests and calls sent entirely while the second agent ran (a margin of 8
    // on each side for those in flight at its start and stop).
    let http_from = next_id.load(Ordering::Relaxed) + 8;
    let pg_from = progress(&pool_progress) + 8;
    hold(
        &mut second,
        &mut sampler,
        "second",
        Duration::from_secs(30),
        every,
    )?;
    let http_to = next_id.load(Ordering::Relaxed).saturating_sub(8);
    let pg_to = progress(&pool_progress).saturating_sub(8);
    // The pool's connections, opened before this agent, in its inventory.
    let inventory = second.get("/connections").unwrap_or_default();
    let body = inventory.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let recovered_pool = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|j| {
            j["connections"].as_array().map(|rows| {
                rows.iter()
                    .filter(|r| {
                        r["server_port"] == pg.port
                            && r["db_system"] == "postgresql"
                            && r["recovered"] == true
                    })
                    .count()
            })
        })
        .unwrap_or(0);
    let metrics = second.get("/metrics").unwrap_or_default();
    let healthy_now = healthy(&second);
    let peak = second.usage().peak_rss_mb.max(sampler.peak_rss_mb);
    end_load(&stop, load)?;
    std::thread::sleep(Duration::from_secs(2));
    second.stop();
    let json = dir.join("second.jsonl");
    let http_right = honest_spans_right_in(&json, http_from..http_to)?;
    let pg_right = pg_spans_right_in(&json, pg.port, pg_from..pg_to)?;
    let (http_n, pg_n) = (
        http_to.saturating_sub(http_from),
        pg_to.saturating_sub(pg_from),
    );
    println!(
        "second agent: HTTP {http_right} of {http_n} right, PostgreSQL {pg_right} of {pg_n} right, \
         {recovered_pool} pool connections recovered"
    );
    let recovered = if !healthy_now {
        "no: the second agent was not healthy".to_string()
    } else if recovered_pool != 4 {
        format!("no: {recovered_pool} of 4 pool connections recovered")
    } else {
        "yes: 4 of 4 pool connections recovered".to_string()
    };
    Ok(Outcome {
        scenario: "restart",
        peak_rss_mb: peak,
        drops: drops(&metrics),
        honest: http_n + pg_n,
        right: http_right + pg_right,
        recovered,
    })
}

// ---- connections -------------------------------------------------------------

/// Connections one process holds at most here: its file limit (20,000 on this
/// machine, and no CAP_SYS_RESOURCE to raise it), less some room.
const PER_PROCESS: usize = 18_000;

/// One request for `path` on `s`; whether it was answered.
fn request(s: &mut TcpStream, path: &str, buf: &mut [u8]) -> bool {
    let req = format!("GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n");
    s.write_all(req.as_bytes()).is_ok() && read_response(s, buf).is_ok()
}

fn connections(opts: &Options) -> Result<Outcome> {
    let dir = scratch_dir("soak-connections")?;
    let n = opts.connections;
    // Loopback clients get about 28,000 ephemeral ports per server address: one
    // server port per 25,000 connections.
    let ports: Vec<u16> = (0..n.div_ceil(25_000).max(1))
        .map(|_| free_port())
        .collect::<Result<_>>()?;
    let _nginx = nginx_serving(
        &dir,
        &ports,
        n.div_ceil(PER_PROCESS) + 1,
        PER_PROCESS + 1000,
    )?;
    let json = dir.join("spans.jsonl");
    // Both ends of each loopback connection are sockets the agent follows.
    let config = dir.join("agent.toml");
    std::fs::write(&config, format!("max-connections = {}\n", 2 * n + 65_536))?;
    let port_args: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut agent = Agent::launch(
        &opts.agent,
        &[
            ["--output", "json", "--config"].as_slice(),
            &[config.to_str().context("a UTF-8 temp path")?],
            &port_args
                .iter()
                .flat_map(|p| ["--port", p.as_str()])
                .collect::<Vec<_>>(),
        ]
        .concat(),
        Stdio::from(std::fs::File::create(&json)?),
        Stdio::from(std::fs::File::create(dir.join("agent.log"))?),
    )?;
    println!("--- soak connections: {n} keep-alive connections, then churn");
    let mut sampler = Sampler::new();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = honest_load(ports[0], opts.rate, stop.clone(), done.clone());
    // The long-lived connections, each used once, held by processes under the
    // file limit.
    let opened = Instant::now();
    let port_list = port_args.join(",");
    let mut holders = Vec::new();
    for base in (0..n).step_by(PER_PROCESS) {
        holders.push(Holder::start(
            &opts.python,
            &port_list,
            PER_PROCESS.min(n - base),
            base,
        )?);
    }
    for h in &mut holders {
        let line = h.line()?;
        if line != "ready" {
            bail!("a connection holder said {line:?}");
        }
        sampler.sample(&agent, "opening");
    }
    println!(
        "{n} connections open in {:.0} s",
        opened.elapsed().as_secs_f64()
    );
    // Churn: short connections (one request each) and short-lived processes
    // (curl: new pids, ports reused), beside the long-lived ones.
    let churn_stop = Arc::new(AtomicBool::new(false));
    let short_done = Arc::new(AtomicU64::new(0));
    let short = {
        let (stop, done, port) = (churn_stop.clone(), short_done.clone(), ports[0]);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while !stop.load(Ordering::Relaxed) {
                let id = done.load(Ordering::Relaxed);
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port))
                    && request(&mut s, &format!("/short/{id}"), &mut buf)
                {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let curl_done = Arc::new(AtomicU64::new(0));
    let curls = {
        let (stop, done, port) = (churn_stop.clone(), curl_done.clone(), ports[0]);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let id = done.load(Ordering::Relaxed);
                let ok = Command::new("curl")
                    .args(["-sf", "-o", "/dev/null"])
                    .arg(format!("http://127.0.0.1:{port}/curl/{id}"))
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    hold(
        &mut agent,
        &mut sampler,
        "churn",
        Duration::from_secs(opts.churn_seconds),
        Duration::from_secs(10),
    )?;
    churn_stop.store(true, Ordering::Relaxed);
    let _ = short.join();
    let _ = curls.join();
    // The long-lived connections still give right spans: a sample of 1,000.
    let step = (n / 1000).max(1);
    let mut sampled = 0u64;
    for h in &mut holders {
        writeln!(h.stdin, "{step}")?;
    }
    for h in &mut holders {
        let line = h.line()?;
        sampled += line
            .strip_prefix("sampled ")
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("a connection holder said {line:?}"))?;
    }
    hold(
        &mut agent,
        &mut sampler,
        "after",
        Duration::from_secs(10),
        Duration::from_secs(5),
    )?;
    end_load(&stop, load)?;
    let metrics = agent.get("/metrics").unwrap_or_default();
    let healthy_now = healthy(&agent);
    let peak = agent.usage().peak_rss_mb.max(sampler.peak_rss_mb);
    drop(holders);
    std::thread::sleep(Duration::from_secs(2));
    agent.stop();
    let long_ids = 0..n as u64;
    let long_right = server_spans_right(&json, "/long/", long_ids)?;
    let short_n = short_done.load(Ordering::Relaxed);
    let curl_n = curl_done.load(Ordering::Relaxed);
    let short_right = server_spans_right(&json, "/short/", 0..short_n)?;
    let curl_right = server_spans_right(&json, "/curl/", 0..curl_n)?;
    let honest_n = done.load(Ordering::Relaxed);
    let honest_right = honest_spans_right(&json)?;
    println!(
        "long-lived {long_right}/{sampled}, short {short_right}/{short_n}, curl processes {curl_right}/{curl_n}, honest {honest_right}/{honest_n} right"
    );
    Ok(Outcome {
        scenario: "conns",
        peak_rss_mb: peak,
        drops: drops(&metrics),
        honest: sampled + short_n + curl_n + honest_n,
        right: long_right + short_right + curl_right + honest_right,
        recovered: if healthy_now {
            "yes: healthy".to_string()
        } else {
            "no: not healthy at the end".to_string()
        },
    })
}

/// Holds `n` keep-alive connections to the ports (round robin), each used once
/// (`/open`); prints `ready`; then each line `STEP` on stdin sends `/long/<base+j>`
/// on every STEP-th connection and prints `sampled <answered>`.
const HOLDER: &str = r#"
import socket, sys
ports = [int(p) for p in sys.argv[1].split(",")]
n, base = int(sys.argv[2]), int(sys.argv[3])
def ask(s, path):
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
    got = b""
    while not got.endswith(b"ok\n"):
        chunk = s.recv(4096)
        if not chunk:
            return False
        got += chunk
    return True
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", ports[(base + i) % len(ports)]))
    if not ask(s, "/open"):
        sys.exit(f"connection {i} got no answer")
    socks.append(s)
print("ready", flush=True)
for line in sys.stdin:
    step = int(line)
    ok = sum(1 for j in range(0, n, step) if ask(socks[j], f"/long/{base + j}"))
    print("sampled", ok, flush=True)
"#;

/// One [`HOLDER`] process: (process, its stdin, its stdout lines).
struct Holder {
    _proc: Proc,
    stdin: std::process::ChildStdin,
    stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Holder {
    fn start(python: &Path, ports: &str, n: usize, base: usize) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(python)
            .args(["-c", HOLDER, ports, &n.to_string(), &base.to_string()])
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a connection holder")?;
        let stdin = child.stdin.take().context("holder stdin")?;
        let stdout = std::io::BufReader::new(child.stdout.take().context("holder stdout")?).lines();
        Ok(Self {
            _proc: Proc(child),
            stdin,
            stdout,
        })
    }

    /// The next line it prints.
    fn line(&mut self) -> Result<String> {
        self.stdout
            .next()
            .context("the holder exited")?
            .context("reading the holder")
    }
}
