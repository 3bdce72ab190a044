//! Root integration test: the agent runs with exactly the capabilities the
//! DaemonSet grants (read from `deploy/kubernetes/daemonset.yaml`; plus the
//! CAP_SYS_ADMIN of `components/restricted-perf-events` on kernels with
//! `kernel.perf_event_paranoid` above 2, and of `components/tls-capture`; the
//! systemd unit's bounding set is their union), as uid 0 with no_new_privs,
//! through `setpriv`; it must still trace a server of another user (and read that
//! process's environment for its service name), stay healthy, and give up all but
//! `CAP_SYS_PTRACE` and `CAP_DAC_READ_SEARCH` once attached, in every thread but
//! the TLS attacher, which keeps what creating uprobes needs. Without `CAP_BPF` it
//! must fail loudly.

mod support;

use std::{path::Path, process::Command};

use support::*;

fn repo_file(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The capabilities the DaemonSet's container adds (`capabilities: add:`), lower
/// case without `CAP_`, sorted.
fn daemonset_capabilities() -> Vec<String> {
    let text = repo_file("deploy/kubernetes/daemonset.yaml");
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim_start().starts_with("add:"))
        .expect("the DaemonSet adds capabilities");
    let first = lines[at].trim_start().trim_start_matches("add:").trim();
    let mut caps: Vec<String> = if first.starts_with('[') {
        first
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|c| c.trim().trim_matches('"').to_string())
            .collect()
    } else {
        lines[at + 1..]
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.starts_with('#'))
            .take_while(|l| l.starts_with("- "))
            .map(|l| {
                l.trim_start_matches("- ")
                    .split('#')
                    .next()
                    .unwrap()
                    .trim()
                    .trim_matches('"')
                    .to_string()
            })
            .collect()
    };
    for c in &mut caps {
        *c = c.trim_start_matches("CAP_").to_ascii_lowercase();
    }
    caps.retain(|c| !c.is_empty());
    caps.sort();
    caps
}

/// The systemd unit's `CapabilityBoundingSet=`, the same way.
fn unit_capabilities() -> Vec<String> {
    let text = repo_file("deploy/systemd/tracer-agent.service");
    let line = text
        .lines()
        .find(|l| l.starts_with("CapabilityBoundingSet="))
        .expect("the unit bounds capabilities");
    let mut caps: Vec<String> = line
        .trim_start_matches("CapabilityBoundingSet=")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase())
        .collect();
    caps.sort();
    caps
}

/// CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH: what reading other users' /proc needs.
const PROC_READING: u64 = (1 << 19) | (1 << 2);
/// What the TLS attacher thread keeps to attach uprobes as processes load
/// OpenSSL: CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN (uprobes need it).
const ATTACHER: u64 = (1 << 39) | (1 << 38) | (1 << 21);
/// The TLS attacher thread's name.
const ATTACHER_THREAD: &str = "tracer-tls";

/// `CapEff` of a thread (or a process's main thread), as a mask.
fn effective_caps(pid: u32) -> u64 {
    caps_in(&format!("/proc/{pid}/status"))
}

/// `CapEff` of each thread of a process (capabilities belong to threads: one
/// that kept them keeps the process privileged).
fn effective_caps_of_threads(pid: u32) -> Vec<(String, u64)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("task dir")
        .flatten()
        .map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            (
                format!("{} ({})", comm.trim(), t.file_name().to_string_lossy()),
                caps_in(&t.path().join("status").to_string_lossy()),
            )
        })
        .collect()
}

fn caps_in(status_path: &str) -> u64 {
    let status = std::fs::read_to_string(status_path).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex mask")
}

fn setpriv(caps: &[String]) -> Vec<String> {
    let bounding = caps.iter().fold("-all".to_string(), |s, c| s + ",+" + c);
    vec![
        "setpriv".into(),
        "--no-new-privs".into(),
        "--inh-caps=-all".into(),
        format!("--bounding-set={bounding}"),
        "--".into(),
    ]
}

/// `kernel.perf_event_paranoid`; above 2 (Debian's and Ubuntu's kernels) attaching
/// needs CAP_SYS_ADMIN.
fn perf_event_paranoid() -> i32 {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .expect("perf_event_paranoid")
        .trim()
        .parse()
        .expect("a number")
}

/// The capability the component for restricted kernels adds.
fn component_capabilities(component: &str) -> Vec<String> {
    let text = repo_file(&format!(
        "deploy/kubernetes/components/{component}/kustomization.yaml"
    ));
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("value: "))
        .filter(|v| v.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(|v| v.to_ascii_lowercase())
        .collect()
}

/// Runs the agent with exactly `caps` (bounding set, uid 0, no_new_privs) and
/// checks that it traces a server of another user, reads its environment, is
/// healthy and keeps only `kept_after` once attached, in every thread but the TLS
/// attacher, which must exist (keeping `kept_after | ATTACHER`) exactly when
/// `attacher`. Returns what the agent logged.
fn traces_with(caps: &[String], tls: bool, attacher: bool) -> String {
    let kept_after = PROC_READING;
    // A server of another user (nobody), naming itself in its environment.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "hello\n").unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let server = Proc(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            // Debian's python: root's own (pyenv) may be out of nobody's reach.
            .arg(if Path::new("/usr/bin/python3").exists() {
                "/usr/bin/python3"
            } else {
                "python3"
            })
            .arg(support_dir().join("http_server.py"))
            .arg(port.to_string())
            .arg(dir.path())
            .arg("HTTP/1.1")
            .env("OTEL_SERVICE_NAME", "nobodys-shop")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the server as nobody"),
    );
    wait_for_port(port, "the server of user nobody");

    let wrapper = setpriv(caps);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let port_arg = port.to_string();
    let mut args = vec!["--output", "json", "--port", &port_arg];
    if !tls {
        args.push("--no-tls");
    }
    let agent = Agent::start_with(&wrapper, &[], &args);
    // The capabilities go right after attaching, which the log says.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while !agent.stderr.text().contains("capabilities given up") {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never said it gave up capabilities:\n{}",
            agent.stderr.text()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kept = effective_caps(agent.pid());
    assert_eq!(
        kept,
        kept_after,
        "only {kept_after:#x} is left once attached (CapEff {kept:#x}, TLS capture {tls})\n{}",
        agent.stderr.text()
    );
    let threads = effective_caps_of_threads(agent.pid());
    assert!(
        threads.len() > 1,
        "the agent runs its runtime's threads: {threads:?}"
    );
    let is_attacher = |t: &str| t.starts_with(&format!("{ATTACHER_THREAD} "));
    assert_eq!(
        threads.iter().filter(|(t, _)| is_attacher(t)).count(),
        usize::from(attacher),
        "a TLS attacher thread exactly when TLS probes can be attached: {threads:?}\n{}",
        agent.stderr.text()
    );
    for (thread, caps) in &threads {
        let allowed = if is_attacher(thread) {
            kept_after | ATTACHER
        } else {
            kept_after
        };
        assert_eq!(
            *caps,
            allowed,
            "thread {thread} kept more than {allowed:#x} (CapEff {caps:#x})\n{}",
            agent.stderr.text()
        );
    }
    curl(&[&format!("http://127.0.0.1:{port}/")]);
    agent.wait_json(20, "the server span", |o| {
        spans(o).iter().any(|s| s["kind"] == "server")
    });
    let health = agent.get("/healthz");
    let log = agent.stderr.text();
    let objects = agent.stop_json();
    assert!(
        health.starts_with("HTTP/1.0 200") && health.ends_with("ok\n"),
        "{health}"
    );
    let all = spans(&objects);
    let srv = all
        .iter()
        .find(|s| s["kind"] == "server")
        .expect("server span");
    assert_eq!(srv["resource"]["process.pid"], server.pid());
    assert_eq!(
        srv["resource"]["service.name"], "nobodys-shop",
        "another user's environment was read"
    );
    assert!(
        all.iter().any(|s| s["kind"] == "client"),
        "curl's span: {objects:?}"
    );
    log
}

/// Runs the agent with exactly `caps`, which must not be enough: it must exit
/// with a failure. Returns what it said.
fn fails_with(caps: &[String]) -> String {
    let mut cmd = setpriv(caps);
    cmd.push(env!("CARGO_BIN_EXE_tracer-agent").into());
    let listen = format!("127.0.0.1:{}", free_port());
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(["--output", "none", "--listen", &listen])
        .output()
        .expect("run the agent");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    stderr
}

#[test]
fn the_daemonsets_capabilities_are_enough_and_only_proc_reading_ones_stay_after_attach() {
    if !require_root("least_privilege") {
        return;
    }
    let caps = daemonset_capabilities();
    assert_eq!(
        caps,
        ["bpf", "dac_read_search", "perfmon", "sys_ptrace"],
        "the capabilities this test proves enough"
    );
    let restricted = component_capabilities("restricted-perf-events");
    assert_eq!(
        restricted,
        ["sys_admin"],
        "what the component for restricted kernels adds"
    );
    assert_eq!(
        component_capabilities("tls-capture"),
        ["sys_admin"],
        "what the component for TLS capture adds"
    );
    let mut with_admin: Vec<String> = caps.iter().chain(&restricted).cloned().collect();
    with_admin.sort();
    assert_eq!(
        unit_capabilities(),
        with_admin,
        "the systemd unit grants the DaemonSet's and the components'"
    );

    if perf_event_paranoid() <= 2 {
        // Upstream's levels: the DaemonSet's four are enough for plaintext; TLS
        // capture says why it is off.
        let log = traces_with(&caps, true, false);
        assert!(
            log.contains("TLS plaintext is not captured") && log.contains("needs CAP_SYS_ADMIN"),
            "{log}"
        );
        // With CAP_SYS_ADMIN (components/tls-capture, the systemd unit) the
        // attacher alone keeps it.
        let log = traces_with(&with_admin, true, true);
        assert!(
            !log.contains("CAP_SYS_ADMIN given up before loading")
                && log.contains("TLS: probes on"),
            "{log}"
        );
        // Without TLS capture CAP_SYS_ADMIN goes before loading.
        let log = traces_with(&with_admin, false, false);
        assert!(
            log.contains("CAP_SYS_ADMIN given up before loading"),
            "{log}"
        );
    } else {
        // A Debian/Ubuntu kernel: the four are not enough, and the agent says
        // what to do; with the component's CAP_SYS_ADMIN it traces, and gives it
        // up everywhere but in the TLS attacher.
        let stderr = fails_with(&caps);
        assert!(
            stderr.contains("kernel.perf_event_paranoid is")
                && stderr.contains("grant CAP_SYS_ADMIN"),
            "{stderr}"
        );
        traces_with(&with_admin, true, true);
        let log = traces_with(&with_admin, false, false);
        assert!(
            !log.contains("CAP_SYS_ADMIN given up before loading"),
            "{log}"
        );
    }
}

#[test]
fn without_cap_bpf_the_agent_stops_and_says_why() {
    if !require_root("least_privilege_no_bpf") {
        return;
    }
    let caps: Vec<String> = daemonset_capabilities()
        .into_iter()
        .filter(|c| c != "bpf")
        .collect();
    let stderr = fails_with(&caps);
    assert!(
        stderr.contains("no capture backend can run here")
            && (stderr.contains("not permitted") || stderr.contains("failed to create map")),
        "{stderr}"
    );
}
