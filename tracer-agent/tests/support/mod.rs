//! Helpers for the root integration tests: the real agent binary, real servers,
//! real clients. Every test uses its own ports, and the agent is told to follow
//! only those (`--port`), so tests never see each other's traffic.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// True when BPF tests can run. Outside CI, a non-root run skips them with a
/// message; in CI (`CI=true`) not being able to run them is a failure.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!(
            "{test}: BPF integration tests must run as root in CI (run `cargo xtask test` as root)"
        );
    }
    eprintln!(
        "{test}: skipped: needs root to load BPF programs (cargo xtask test runs it with sudo)"
    );
    false
}

/// A port nobody listens on right now, and one this test process has not
/// handed out before. The kernel may give a just-released port again, so two
/// calls in a row (or in tests running side by side) could otherwise name the
/// same port: one server then fails to bind while its twin answers for it.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind an ephemeral port");
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

pub fn wait_for_port(port: u16, what: &str) {
    // Generous: in the kernel matrix's emulated VMs a Python program importing
    // SQLAlchemy takes tens of seconds to start.
    let deadline = Instant::now() + Duration::from_secs(90);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start listening on port {port}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Lines a child writes, collected by a thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    pub fn follow(stream: impl std::io::Read + Send + 'static) -> Self {
        let lines = Self::default();
        let sink = lines.0.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("lines lock").push(line);
            }
        });
        lines
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().expect("lines lock").clone()
    }

    pub fn text(&self) -> String {
        self.snapshot().join("\n")
    }
}

/// The real agent binary, running until dropped or stopped.
pub struct Agent {
    child: Child,
    /// The agent's own HTTP endpoint (`--listen`).
    pub listen: String,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Agent {
    /// Starts `tracer-agent` with `args` and waits until its programs are attached.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(&[], &[], args)
    }

    /// Starts the agent through `wrapper` (e.g. `setpriv …`, empty for none), with
    /// `env` added to its environment.
    pub fn start_with(wrapper: &[&str], env: &[(&str, &str)], args: &[&str]) -> Self {
        Self::start_listening(&format!("127.0.0.1:{}", free_port()), wrapper, env, args)
    }

    /// As [`Agent::start_with`], its endpoint on `listen` (`ip:port`).
    pub fn start_listening(
        listen: &str,
        wrapper: &[&str],
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Self {
        let bin = env!("CARGO_BIN_EXE_tracer-agent");
        let listen = listen.to_string();
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = command
            .envs(env.iter().copied())
            .args(args)
            .args(["--listen", &listen])
            // TRACER_TEST_LOG raises the agent's log level when investigating.
            .env(
                "RUST_LOG",
                std::env::var("TRACER_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let stdout = Lines::follow(child.stdout.take().expect("piped stdout"));
        let stderr = Lines::follow(child.stderr.take().expect("piped stderr"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if stderr.text().contains("tracing TCP traffic") {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "tracer-agent exited early ({status}); BPF could not load?\nstderr:\n{}",
                    stderr.text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tracer-agent did not attach within 30s\nstderr:\n{}",
                stderr.text()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            listen,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET a path on the agent's own endpoint (plain HTTP/1.0 over a socket).
    pub fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(&self.listen).expect("connect to the agent's endpoint");
        write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").expect("send request");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read response");
        out
    }

    /// JSON objects printed so far.
    pub fn json(&self) -> Vec<Value> {
        self.stdout
            .snapshot()
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits until `pred` holds on the printed JSON objects, or panics after `secs`.
    pub fn wait_json(&self, secs: u64, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.json();
            if pred(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out waiting for {what}; got {} objects:\n{}\nstderr:\n{}",
                    v.len(),
                    self.stdout.text(),
                    self.stderr.text()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// The agent's exit status once it exits within `secs`, or `None`.
    pub fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("wait for agent") {
                // Let the reader threads reach end of file.
                thread::sleep(Duration::from_millis(100));
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGTERM, then wait: the agent must flush and exit 0.
    pub fn stop(mut self) -> (Lines, Lines) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for agent") {
                assert!(
                    status.success(),
                    "agent exited with {status}\nstderr:\n{}",
                    self.stderr.text()
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within 20s of SIGTERM"
            );
            thread::sleep(Duration::from_millis(50));
        }
        // Let the reader threads reach end of file.
        thread::sleep(Duration::from_millis(100));
        (self.stdout.clone(), self.stderr.clone())
    }

    /// Stops the agent (as [`Self::stop`]) and parses each line it printed as JSON.
    pub fn stop_json(self) -> Vec<Value> {
        let (stdout, _) = self.stop();
        stdout
            .snapshot()
            .iter()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn support_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support")
}

/// The test HTTP server (Python), serving `dir`, HTTP/1.0 or 1.1.
pub fn python_server(port: u16, dir: &Path, version: &str) -> Proc {
    assert!(
        version == "1.0" || version == "1.1",
        "http_server.py takes 1.0 or 1.1, not {version}"
    );
    let child = Command::new("python3")
        .arg(support_dir().join("http_server.py"))
        .arg(port.to_string())
        .arg(dir)
        .arg(version)
        .stdout(Stdio::null())
        .spawn()
        .expect("start python3 http server");
    wait_for_port(port, "python http server");
    Proc(child)
}

/// Runs curl with `args`, returning (pid, stdout). Panics when curl fails.
pub fn curl(args: &[&str]) -> (u32, String) {
    let child = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start curl");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for curl");
    assert!(
        out.status.success(),
        "curl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Spans among the printed objects.
pub fn spans(objects: &[Value]) -> Vec<&Value> {
    objects.iter().filter(|o| o["type"] == "span").collect()
}

pub fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

fn is_hex(v: &Value, len: usize) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

/// Asserts a span object has exactly the form docs/contracts.md defines.
pub fn assert_span_contract(span: &Value) {
    let obj = span.as_object().expect("span is an object");
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    // Error spans may carry a status description.
    if let Some(message) = obj.get("status_message") {
        assert!(message.is_string(), "{span}");
        assert_eq!(obj["status"], "error", "{span}");
        keys.retain(|k| *k != "status_message");
    }
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "attributes",
            "end_unix_nano",
            "kind",
            "name",
            "parent_span_id",
            "resource",
            "span_id",
            "start_unix_nano",
            "status",
            "trace_id",
            "type"
        ],
        "span keys: {span}"
    );
    assert!(is_hex(&span["trace_id"], 32), "trace_id: {span}");
    assert!(is_hex(&span["span_id"], 16), "span_id: {span}");
    assert!(
        span["parent_span_id"].is_null() || is_hex(&span["parent_span_id"], 16),
        "parent: {span}"
    );
    assert!(span["name"].is_string());
    assert!(
        ["server", "client"].contains(&span["kind"].as_str().unwrap_or("")),
        "kind: {span}"
    );
    assert!(
        ["ok", "error", "unset"].contains(&span["status"].as_str().unwrap_or("")),
        "status: {span}"
    );
    let start = span["start_unix_nano"]
        .as_u64()
        .expect("start is an integer");
    let end = span["end_unix_nano"].as_u64().expect("end is an integer");
    assert!(end >= start, "end before start: {span}");
    // Plausible wall-clock times: within ten minutes of now (a boot-relative or
    // otherwise wrong clock is years off; a test in an emulated VM can take
    // minutes between its first span and this check).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    assert!(
        start > now - 600_000_000_000 && start <= now,
        "start is not a recent Unix time: {span}"
    );
    assert!(end - start < 10_000_000_000, "implausible duration: {span}");
    assert!(span["attributes"].is_object());
    let res = &span["resource"];
    assert!(res["process.pid"].is_u64(), "resource: {span}");
    assert!(
        res["process.executable.name"].is_string(),
        "resource: {span}"
    );
    assert!(res["service.name"].is_string(), "resource: {span}");
}

/// The Python with the test clients installed (psycopg, redis, mysql-connector):
/// `cargo xtask test` sets TRACER_PYTHON to its venv.
pub fn python() -> String {
    std::env::var("TRACER_PYTHON").unwrap_or_else(|_| {
        panic!("TRACER_PYTHON is not set: run the integration tests through `cargo xtask test`, which installs the clients")
    })
}

/// Runs a Python client script from tests/support with `args`; returns (pid, stdout).
pub fn python_client(script: &str, args: &[&str]) -> (u32, String) {
    let child = Command::new(python())
        .arg(support_dir().join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {script}: {e}"));
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for python client");
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed certificate for 127.0.0.1 and localhost, made with `openssl`
/// in `dir`: (certificate, key) paths.
pub fn self_signed_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .output()
        .expect("run openssl (Debian's openssl package)");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A throwaway PostgreSQL cluster on 127.0.0.1:`port`, trust authentication.
pub struct Postgres {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `ssl = on` and a certificate made for it: clients may ask for TLS
    /// (`sslmode=require`) or not (`sslmode=disable`).
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is installed (cargo xtask setup)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .expect("an initdb under /usr/lib/postgresql");
        let dir = tempfile::tempdir().expect("temp dir");
        run_ok(
            Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path()),
        );
        let data = dir.path().join("data");
        let as_postgres = |prog: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(prog));
            c
        };
        run_ok(
            as_postgres("initdb")
                .args(["-A", "trust", "-U", "postgres", "-D"])
                .arg(&data),
        );
        let port = free_port();
        let mut options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            dir.path().display()
        );
        if tls {
            let (cert, key) = self_signed_certificate(dir.path());
            run_ok(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&cert)
                    .arg(&key),
            );
            options += &format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            );
        }
        run_ok(
            as_postgres("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.path().join("log"))
                .arg("-o")
                .arg(options)
                .args(["-w", "start"]),
        );
        wait_for_port(port, "PostgreSQL");
        Self { port, dir, bin }
    }
}

impl Postgres {
    /// Adds role `user` with `password`, which logs in over TCP with the
    /// password sent in clear (`password` in pg_hba.conf): its PasswordMessage
    /// carries the password itself.
    pub fn add_cleartext_password_user(&self, user: &str, password: &str) {
        let hba = self.dir.path().join("data/pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        std::fs::write(
            &hba,
            format!("host all {user} 127.0.0.1/32 password\n{rules}"),
        )
        .expect("write pg_hba.conf");
        run_ok(
            Command::new("psql")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
                .arg(format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'"))
                .args(["-c", "SELECT pg_reload_conf()"]),
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

/// A Redis server on 127.0.0.1:`port` without persistence.
pub fn redis_server(port: u16) -> Proc {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("start redis-server");
    wait_for_port(port, "redis-server");
    Proc(child)
}

/// A throwaway MariaDB on 127.0.0.1:`port`; connect as root without a password.
pub struct Mariadb {
    pub port: u16,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl Mariadb {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With a certificate made for it: clients may ask for TLS or not.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        run_ok(
            Command::new("mariadb-install-db")
                .args([
                    "--user=root",
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                ])
                .arg(format!("--datadir={}", data.display())),
        );
        let port = free_port();
        let mut server = Command::new("mariadbd");
        server.args([
            "--no-defaults",
            "--user=root",
            "--bind-address=127.0.0.1",
            "--skip-log-bin",
        ]);
        if tls {
            let (cert, key) = self_signed_certificate(dir.path());
            server
                .arg(format!("--ssl-cert={}", cert.display()))
                .arg(format!("--ssl-key={}", key.display()));
        }
        let child = server
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        let proc = Proc(child);
        wait_for_port(port, "MariaDB");
        Self {
            port,
            _proc: proc,
            _dir: dir,
        }
    }
}

/// Runs a stdlib-only Python script from tests/support; returns (pid, stdout).
pub fn python_client_plain(script: &str, args: &[&str]) -> (u32, String) {
    let child = Command::new("python3")
        .arg(support_dir().join(script))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {script}: {e}"));
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for python client");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (pid, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// GET `path` from a server on `port` with HTTP/1.0 (the connection closes after
/// the answer); asserts a 200 and returns the body, trimmed.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the app");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: app\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the app's answer");
    assert!(
        text.starts_with("HTTP/1.") && text[8..].starts_with(" 200 "),
        "{path}: {text}"
    );
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .unwrap_or_default()
}

/// gunicorn (one sync worker) serving `wsgi_app.py` on 127.0.0.1:`port`. Stopped
/// with SIGTERM, so that the master takes its worker down with it.
pub struct Gunicorn(Child);

impl Gunicorn {
    pub fn start(port: u16) -> Self {
        let child = Command::new(python())
            .args([
                "-m",
                "gunicorn",
                "--workers",
                "1",
                "--timeout",
                "60",
                "--bind",
            ])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--chdir")
            .arg(support_dir())
            .arg("wsgi_app:app")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gunicorn");
        wait_for_port(port, "gunicorn");
        Self(child)
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Where `cargo xtask setup` installs the test tools (TRACER_TOOLS_DIR).
pub fn tools_dir() -> PathBuf {
    std::env::var_os("TRACER_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/xtask"))
}

/// The node_modules directory of the npm packages the tests use (pg, ioredis,
/// mysql2; TRACER_NODE_PATH).
pub fn node_path() -> PathBuf {
    std::env::var_os("TRACER_NODE_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| tools_dir().join("node/node_modules"))
}
