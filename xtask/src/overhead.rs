//! `cargo xtask bench overhead`: what the agent costs the workloads it watches,
//! measured as alternating runs without and with it (the machine is noisy: only
//! ratios within one run mean anything).
//!
//! - nginx (one worker) serving a 512-byte file over keep-alive to wrk, at
//!   saturation: throughput, p50 and p99 latency, agent CPU per 10k requests.
//! - The floor: the same attach points with programs that do nothing.
//! - The same nginx and wrk over HTTPS (TLS 1.3, an ECDSA certificate): the TLS
//!   probes on OpenSSL in both.
//! - A paced client at fixed rates (10k and 20k requests/s): agent CPU, peak RSS,
//!   events lost.
//! - PostgreSQL under `pgbench -S` and Redis under `redis-benchmark`: database
//!   decoding.
//!
//! The agent exports OTLP (gRPC) to a real collector (rotel, blackhole exporter),
//! running during every run, with and without the agent.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Benchmark settings.
pub struct Options {
    pub pairs: usize,
    pub seconds: u64,
    /// Parts to run (names from [`PARTS`]); every part when empty.
    pub only: Vec<String>,
    pub agent: PathBuf,
    pub rotel: PathBuf,
}

/// The parts of the benchmark, for `--only`.
pub const PARTS: [&str; 6] = ["saturation", "floor", "fixed", "https", "pgbench", "redis"];

impl Options {
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// A child process killed when dropped. Servers started by [`serve`] lead their own
/// process group, and the whole group goes: killing only nginx's master would leave
/// its worker running.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port nobody listens on, never one this run handed out before: the kernel
/// may give a just-released port again, and two servers would then share it.
pub(crate) fn free_port() -> Result<u16> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return Ok(port);
        }
    }
}

pub(crate) fn wait_for_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts a server quietly and waits until it listens on `port`.
pub(crate) fn serve(cmd: &mut Command, port: u16, what: &str) -> Result<Proc> {
    use std::os::unix::process::CommandExt;
    let child = cmd
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let proc = Proc(child);
    wait_for_port(port, what)?;
    Ok(proc)
}

pub(crate) fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tracer-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn output_of(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---- the agent under test ------------------------------------------------------

pub(crate) struct Agent {
    proc: Proc,
    listen: u16,
}

/// CPU time (user + system) and peak RSS of a process.
#[derive(Clone, Copy, Default)]
pub(crate) struct Usage {
    pub(crate) cpu_s: f64,
    pub(crate) peak_rss_mb: f64,
    pub(crate) rss_mb: f64,
}

impl Agent {
    fn start(opts: &Options, collector: u16, extra: &[&str]) -> Result<Self> {
        let endpoint = format!("http://127.0.0.1:{collector}");
        let mut args = vec![
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--output",
            "none",
        ];
        args.extend_from_slice(extra);
        Self::launch(&opts.agent, &args, Stdio::null(), Stdio::null())
    }

    /// Starts `agent` with `args` (and its own `--listen`), its output to `stdout`
    /// and `stderr`; returns once /healthz answers.
    pub(crate) fn launch(
        agent: &Path,
        args: &[&str],
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<Self> {
        let listen = free_port()?;
        let child = Command::new(agent)
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .env("RUST_LOG", "warn")
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .context("starting the agent")?;
        let agent = Self {
            proc: Proc(child),
            listen,
        };
        // /healthz answers once the programs are attached.
        let deadline = Instant::now() + Duration::from_secs(60);
        while agent.get("/healthz").is_err() {
            if Instant::now() > deadline {
                bail!("the agent did not come up");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(agent)
    }

    pub(crate) fn get(&self, path: &str) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.listen))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    }

    pub(crate) fn usage(&self) -> Usage {
        let pid = self.proc.0.id();
        let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                // Fields after the command name (which may hold spaces).
                let rest = stat.rsplit_once(')')?.1;
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
            })
            .unwrap_or(0.0);
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Usage {
            cpu_s: ticks / 100.0, // USER_HZ
            peak_rss_mb: kb("VmHWM:") / 1024.0,
            rss_mb: kb("VmRSS:") / 1024.0,
        }
    }

    /// A counter from /metrics (summed over its label sets).
    pub(crate) fn counter(&self, name: &str) -> f64 {
        sum_of(&self.get("/metrics").unwrap_or_default(), name)
    }

    /// Whether the process is still running.
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.proc.0.try_wait(), Ok(None))
    }

    pub(crate) fn stop(self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.proc.0.id().to_string()])
            .status();
        let mut proc = self.proc;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = proc.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The sum of a metric's samples in a /metrics text, over its label sets whose
/// text contains `labels` (empty: all).
pub(crate) fn sum_of(metrics: &str, name: &str) -> f64 {
    sum_where(metrics, name, "")
}

pub(crate) fn sum_where(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let rest = &l[name.len()..];
            (rest.starts_with(' ') || rest.starts_with('{')) && rest.contains(labels)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // Not `sum`: an empty float sum is -0, printed "-0".
        .fold(0.0, |a, b| a + b)
}

// ---- servers ------------------------------------------------------------------

pub(crate) fn collector(rotel: &Path, dir: &Path) -> Result<(Proc, u16)> {
    let (grpc, http) = (free_port()?, free_port()?);
    Ok((collector_on(rotel, dir, grpc, http)?, grpc))
}

/// rotel (blackhole exporter) on these OTLP gRPC and HTTP ports.
pub(crate) fn collector_on(rotel: &Path, dir: &Path, grpc: u16, http: u16) -> Result<Proc> {
    serve(
        Command::new(rotel)
            .args(["start", "--exporter", "blackhole"])
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
            .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
            .arg("--pid-file")
            .arg(dir.join("rotel.pid"))
            .arg("--log-file")
            .arg(dir.join("rotel.log")),
        grpc,
        "rotel",
    )
}

/// nginx (one worker) serving a 512-byte file on a plain port and, with the same
/// settings, over TLS (a certificate made here): (process, plain port, TLS port).
pub(crate) fn nginx(dir: &Path) -> Result<(Proc, u16, u16)> {
    let (port, tls_port) = (free_port()?, free_port()?);
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("small.html"), vec![b'x'; 512])?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    output_of(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    )
    .context("making nginx's certificate (openssl)")?;
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 100000000; keepalive_timeout 300s;\n\
             client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
             uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen 127.0.0.1:{port}; root {w}; }}\n\
             server {{ listen 127.0.0.1:{tls_port} ssl; root {w};\n\
             ssl_certificate {c}; ssl_certificate_key {k}; }} }}\n",
            d = dir.display(),
            w = www.display(),
            c = cert.display(),
            k = key.display(),
        ),
    )?;
    let proc = serve(
        Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir),
        port,
        "nginx",
    )?;
    wait_for_port(tls_port, "nginx (TLS)")?;
    Ok((proc, port, tls_port))
}

pub(crate) struct Postgres {
    _proc: Proc,
    pub(crate) port: u16,
    dir: PathBuf,
}

pub(crate) fn postgres() -> Result<Postgres> {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is installed (cargo xtask setup)")?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .find(|p| p.join("initdb").exists())
        .context("an initdb under /usr/lib/postgresql")?;
    let dir = scratch_dir("pg")?;
    output_of(Command::new("chown").arg("postgres:postgres").arg(&dir))?;
    let data = dir.join("data");
    let as_postgres = |prog: &Path| {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(prog);
        c
    };
    output_of(
        as_postgres(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data),
    )?;
    let port = free_port()?;
    let proc = serve(
        as_postgres(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ]),
        port,
        "postgres",
    )?;
    std::thread::sleep(Duration::from_millis(500));
    output_of(&mut pgbench_cmd(port, &["-i", "-q", "-s", "2"]))?;
    Ok(Postgres {
        _proc: proc,
        port,
        dir,
    })
}

fn redis(dir: &Path) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let proc = serve(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
            ])
            .arg(dir),
        port,
        "redis",
    )?;
    Ok((proc, port))
}

// ---- load generators ------------------------------------------------------------

/// One load run's result: operations per second and latencies (seconds).
#[derive(Clone, Copy, Default)]
struct Load {
    ops: f64,
    rate: f64,
    p50: f64,
    p99: f64,
}

fn seconds_of(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else {
        (v, 1.0)
    };
    num.trim().parse::<f64>().ok().map(|n| n * scale)
}

/// wrk, one thread and 16 keep-alive connections, for `seconds` (over TLS with
/// `scheme` https; wrk uses the host's OpenSSL).
fn wrk(scheme: &str, port: u16, seconds: u64) -> Result<Load> {
    let out = output_of(Command::new("wrk").args([
        "-t1",
        "-c16",
        &format!("-d{seconds}s"),
        "--latency",
        &format!("{scheme}://127.0.0.1:{port}/small.html"),
    ]))?;
    let mut load = Load::default();
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            load.rate = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            load.p50 = seconds_of(v).unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("99%") {
            load.p99 = seconds_of(v).unwrap_or(0.0);
        } else if let Some(n) = t
            .split(" requests in ")
            .next()
            .filter(|_| t.contains(" requests in "))
        {
            load.ops = n.trim().parse().unwrap_or(0.0);
        }
    }
    if load.rate == 0.0 {
        bail!("wrk printed no rate:\n{out}");
    }
    Ok(load)
}

/// Requests at a fixed total `rate` over keep-alive connections, for `seconds`.
fn paced(port: u16, rate: f64, seconds: u64) -> Result<Load> {
    const CONNECTIONS: usize = 8;
    let per_conn = rate / CONNECTIONS as f64;
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            std::thread::spawn(move || -> Result<(u64, Vec<f64>)> {
                let mut s = TcpStream::connect(("127.0.0.1", port))?;
                s.set_nodelay(true)?;
                let req = b"GET /small.html HTTP/1.1\r\nHost: bench\r\n\r\n";
                let interval = Duration::from_secs_f64(1.0 / per_conn);
                let mut next = start + interval.mul_f64(i as f64 / CONNECTIONS as f64);
                let mut buf = vec![0u8; 8192];
                let (mut done, mut lat) = (0u64, Vec::new());
                while next < end {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    let t0 = Instant::now();
                    s.write_all(req)?;
                    read_response(&mut s, &mut buf)?;
                    lat.push(t0.elapsed().as_secs_f64());
                    done += 1;
                    next += interval;
                }
                Ok((done, lat))
            })
        })
        .collect();
    let mut total = 0u64;
    let mut lat = Vec::new();
    for w in workers {
        let (n, l) = w
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        total += n;
        lat.extend(l);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Load {
        ops: total as f64,
        rate: total as f64 / seconds as f64,
        p50: pct(0.5),
        p99: pct(0.99),
    })
}

/// Reads one HTTP/1.1 response with a Content-Length body (small: it fits `buf`).
pub(crate) fn read_response(s: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    let mut have = 0;
    let mut want = None;
    loop {
        if let Some(w) = want
            && have >= w
        {
            return Ok(());
        }
        if have == buf.len() {
            bail!("response larger than {} bytes", buf.len());
        }
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            bail!("nginx closed the connection");
        }
        have += n;
        if want.is_none()
            && let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n")
        {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            want = Some(end + 4 + len);
        }
    }
}

/// `pgbench` with `args` against the `postgres` database on 127.0.0.1:`port`.
fn pgbench_cmd(port: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new("pgbench");
    cmd.args(args)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "postgres", "postgres"]);
    cmd
}

fn pgbench(port: u16, seconds: u64) -> Result<Load> {
    let secs = seconds.to_string();
    let out = output_of(&mut pgbench_cmd(
        port,
        &["-S", "-c", "8", "-j", "2", "-T", &secs],
    ))?;
    let mut load = Load::default();
    for line in out.lines() {
        if let Some(v) = line.strip_prefix("tps = ") {
            load.rate = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("latency average = ") {
            load.p50 = seconds_of(&v.replace(' ', "")).unwrap_or(0.0);
        } else if let Some(v) = line.strip_prefix("number of transactions actually processed: ") {
            load.ops = v
                .split('/')
                .next()
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0.0);
        }
    }
    if load.rate == 0.0 {
        bail!("pgbench printed no tps:\n{out}");
    }
    Ok(load)
}

fn redis_benchmark(port: u16, seconds: u64) -> Result<Load> {
    // Sized to take about `seconds` at ~60k requests/s.
    let n = (seconds * 60_000).to_string();
    let t0 = Instant::now();
    let out = output_of(Command::new("redis-benchmark").args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-c",
        "16",
        "-n",
        &n,
        "-t",
        "get",
        "--csv",
    ]))?;
    let elapsed = t0.elapsed().as_secs_f64();
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    let row = out
        .lines()
        .find(|l| l.starts_with("\"GET\""))
        .with_context(|| format!("redis-benchmark printed no GET row:\n{out}"))?;
    let f: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|v| v.trim_matches('"').parse().unwrap_or(0.0))
        .collect();
    Ok(Load {
        ops: n.parse().unwrap_or(0.0),
        rate: f
            .first()
            .copied()
            .unwrap_or(n.parse::<f64>().unwrap_or(0.0) / elapsed),
        p50: f.get(3).copied().unwrap_or(0.0) / 1e3,
        p99: f.get(5).copied().unwrap_or(0.0) / 1e3,
    })
}

// ---- runs ------------------------------------------------------------------------

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Results of alternating pairs without and with the agent.
struct Pairs {
    off: Vec<Load>,
    on: Vec<Load>,
    /// Agent CPU seconds and peak RSS over the "on" runs.
    usage: Usage,
    lost: f64,
}

impl Pairs {
    fn ratio(&self, f: impl Fn(&Load) -> f64) -> f64 {
        median(
            self.off
                .iter()
                .zip(&self.on)
                .map(|(off, on)| f(on) / f(off))
                .collect(),
        )
    }

    fn cpu_per_10k(&self) -> f64 {
        let ops: f64 = self.on.iter().map(|l| l.ops).sum();
        self.usage.cpu_s / (ops / 10_000.0)
    }
}

fn pairs(
    opts: &Options,
    collector: u16,
    agent_args: &[&str],
    mut load: impl FnMut() -> Result<Load>,
) -> Result<Pairs> {
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut usage = Usage::default();
    let mut lost = 0.0;
    for i in 0..opts.pairs {
        eprintln!("xtask: pair {}/{}", i + 1, opts.pairs);
        off.push(load()?);
        let agent = Agent::start(opts, collector, agent_args)?;
        let start = agent.usage();
        on.push(load()?);
        // Let the agent finish what it read before its usage is taken.
        std::thread::sleep(Duration::from_millis(500));
        let end = agent.usage();
        usage.cpu_s += end.cpu_s - start.cpu_s;
        usage.peak_rss_mb = usage.peak_rss_mb.max(end.peak_rss_mb);
        lost += agent.counter("tracer_events_lost_total");
        agent.stop();
    }
    Ok(Pairs {
        off,
        on,
        usage,
        lost,
    })
}

/// Runs everything and prints the table.
pub fn run(opts: &Options) -> Result<()> {
    let dir = scratch_dir("overhead")?;
    let (_rotel, collector) = collector(&opts.rotel, &dir)?;
    let secs = opts.seconds;
    let nginx_needed = ["saturation", "floor", "fixed", "https"]
        .iter()
        .any(|p| opts.runs(p));
    let (_nginx, http, https) = if nginx_needed {
        let (p, port, tls_port) = nginx(&dir)?;
        (Some(p), port, tls_port)
    } else {
        (None, 0, 0)
    };

    let mut sat = None;
    if opts.runs("saturation") {
        eprintln!("xtask: nginx + wrk at saturation, agent off/on");
        sat = Some(pairs(opts, collector, &[], || wrk("http", http, secs))?);
    }
    let mut floor = None;
    if opts.runs("floor") {
        eprintln!("xtask: the floor: empty programs on the same tracepoints");
        floor = Some(pairs(opts, collector, &["--empty-probes"], || {
            wrk("http", http, secs)
        })?);
    }
    let mut tls = None;
    if opts.runs("https") {
        eprintln!("xtask: nginx + wrk over HTTPS at saturation, agent off/on");
        tls = Some(pairs(opts, collector, &[], || wrk("https", https, secs))?);
    }

    let mut fixed = Vec::new();
    for rate in [10_000.0, 20_000.0] {
        if !opts.runs("fixed") {
            break;
        }
        eprintln!("xtask: nginx at a fixed {rate} requests/s with the agent");
        let agent = Agent::start(opts, collector, &[])?;
        let start = agent.usage();
        let load = paced(http, rate, secs)?;
        std::thread::sleep(Duration::from_millis(500));
        let end = agent.usage();
        let lost = agent.counter("tracer_events_lost_total");
        let dropped = agent.counter("tracer_queue_dropped_total");
        let exported = agent.counter("tracer_spans_exported_total");
        agent.stop();
        fixed.push((
            rate,
            load,
            end.cpu_s - start.cpu_s,
            (end.peak_rss_mb, end.rss_mb),
            lost,
            dropped,
            exported,
        ));
    }

    let mut pgb = None;
    if opts.runs("pgbench") {
        eprintln!("xtask: PostgreSQL under pgbench -S");
        let pg = postgres()?;
        pgb = Some(pairs(opts, collector, &[], || pgbench(pg.port, secs))?);
        let _ = std::fs::remove_dir_all(&pg.dir);
    }
    let mut rb = None;
    if opts.runs("redis") {
        eprintln!("xtask: Redis under redis-benchmark");
        let (_redis, rport) = redis(&dir)?;
        rb = Some(pairs(opts, collector, &[], || {
            redis_benchmark(rport, secs)
        })?);
    }

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "overhead: {} pairs of {secs} s runs, agent off/on alternating, {cores} cores; the agent exports OTLP gRPC to rotel",
        opts.pairs
    );
    println!();
    println!(
        "{:<30} {:>11} {:>11} {:>9} {:>9} {:>13} {:>8} {:>7}",
        "workload",
        "off ops/s",
        "on ops/s",
        "ops ratio",
        "p50 ratio",
        "p99 ratio",
        "CPU s/10k",
        "RSS MB"
    );
    let ratio = |v: f64| {
        if v.is_finite() {
            format!("{v:.3}")
        } else {
            "-".into()
        }
    };
    let row = |name: &str, p: &Option<Pairs>| {
        let Some(p) = p else { return };
        println!(
            "{:<30} {:>11.0} {:>11.0} {:>9} {:>9} {:>13} {:>8.3} {:>7.1}",
            name,
            median(p.off.iter().map(|l| l.rate).collect()),
            median(p.on.iter().map(|l| l.rate).collect()),
            ratio(p.ratio(|l| l.rate)),
            ratio(p.ratio(|l| l.p50)),
            ratio(p.ratio(|l| l.p99)),
            p.cpu_per_10k(),
            p.usage.peak_rss_mb,
        );
    };
    row("nginx+wrk c16 (saturation)", &sat);
    row("floor: empty programs", &floor);
    row("nginx+wrk c16 HTTPS (sat.)", &tls);
    row("pgbench -S c8 (p50 = avg)", &pgb);
    row("redis-benchmark GET c16", &rb);
    println!();
    if !fixed.is_empty() {
        println!(
            "{:<24} {:>10} {:>11} {:>9} {:>13} {:>11} {:>8} {:>9}",
            "fixed rate (agent on)",
            "achieved/s",
            "agent cores",
            "CPU s/10k",
            "RSS MB pk/now",
            "events lost",
            "dropped",
            "exported"
        );
        for (rate, load, cpu, rss, lost, dropped, exported) in &fixed {
            println!(
                "{:<24} {:>10.0} {:>11.3} {:>9.3} {:>13} {:>11.0} {:>8.0} {:>9.0}",
                format!("nginx at {rate:.0} req/s"),
                load.rate,
                cpu / secs as f64,
                cpu / (load.ops / 10_000.0),
                format!("{:.1}/{:.1}", rss.0, rss.1),
                lost,
                dropped,
                exported,
            );
        }
    }
    println!();
    let lost = |p: &Option<Pairs>| {
        p.as_ref()
            .map_or("-".to_string(), |p| format!("{:.0}", p.lost))
    };
    println!(
        "events lost at saturation: nginx {}, nginx HTTPS {}, pgbench {}, redis {} (tracer_events_lost_total, summed over runs)",
        lost(&sat),
        lost(&tls),
        lost(&pgb),
        lost(&rb)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
