//! The kernel matrix: the integration tests that matter most, run against the
//! agent built once on the host, inside VMs booting the kernels production nodes
//! run (Debian's packaged kernels, under QEMU, by virtme-ng over the host's own
//! files), and on the host's kernel with the last-resort backend. A kernel that
//! cannot be fetched or booted, or a run that does not finish, fails: never a
//! skip. `bench` runs the overhead benchmark in such a VM.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{Tally, count_results, is_root, output, run, tools_dir, workspace_root};

/// One VM run: a kernel (the newest Debian package whose name matches) and the
/// capture backend the agent is made to use (`auto` lets it choose).
struct Entry {
    /// `apt-cache search` pattern of the kernel package.
    package: &'static str,
    /// The Debian suite it comes from when not one the host's apt knows (looked
    /// up with a private apt state under target/xtask, the host's left alone).
    suite: Option<&'static str>,
    backend: &'static str,
}

const MATRIX: &[Entry] = &[
    // Debian 12, Amazon Linux 2023, COS: no sock_*_length tracepoints, so auto
    // takes fexit there.
    Entry {
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        suite: None,
        backend: "auto",
    },
    // The kprobe backend, on the same kernel (what kernels without BPF
    // trampolines get).
    Entry {
        package: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        suite: None,
        backend: "kprobes",
    },
    // The newest packaged LTS for Debian 12 (bookworm-backports): the
    // sock_*_length tracepoints, and still no private BPF stacks (6.13).
    Entry {
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
        suite: Some("bookworm-backports"),
        backend: "auto",
    },
];

/// The Debian archive the extra suites come from.
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// `apt-get`/`apt-cache` options that make them use only `suite`, from a private
/// state under target/xtask (none when the host's own sources are meant).
fn apt_options(suite: Option<&str>) -> Result<Vec<String>> {
    let Some(suite) = suite else {
        return Ok(Vec::new());
    };
    let dir = tools_dir().join("apt").join(suite);
    std::fs::create_dir_all(dir.join("lists/partial"))?;
    std::fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let list = dir.join("sources.list");
    std::fs::write(&list, format!("deb {DEBIAN_MIRROR} {suite} main\n"))?;
    let options = vec![
        format!("Dir::Etc::SourceList={}", list.display()),
        "Dir::Etc::SourceParts=-".to_string(),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
        format!("Dir::Cache={}", dir.join("cache").display()),
    ];
    let mut update = Command::new("apt-get");
    update.args(["-q", "update"]);
    for o in &options {
        update.arg("-o").arg(o);
    }
    run(&mut update).with_context(|| format!("apt-get update of {suite}"))?;
    Ok(options)
}

/// (test binary, test names): HTTP server and client spans, PostgreSQL, leak
/// detection, the parent chain, Kubernetes metadata from cgroups, the kernel's
/// socket map when full, the agent under the DaemonSet's capabilities only, and
/// HTTPS (OpenSSL and Node.js), PostgreSQL and MySQL over TLS and leaks over TLS
/// through the TLS probes.
const TESTS: &[(&str, &[&str])] = &[
    (
        "http_capture",
        &[
            "python_http_server_and_curl_give_one_server_and_one_client_span",
            "get_404_post_with_body_and_keep_alive",
        ],
    ),
    (
        "db_capture",
        &[
            "psql_simple_and_failing_queries",
            "psycopg_session_gives_exactly_its_five_calls",
        ],
    ),
    (
        "leaks",
        &[
            "leaked_connections_are_reported_with_their_culprit_and_nothing_else",
            "leaked_connections_over_tls_are_reported_like_plaintext_ones",
        ],
    ),
    (
        "parent_chain",
        &[
            "a_three_service_chain_without_headers_gives_the_exact_tree",
            "a_three_service_chain_with_traceparent_headers_gives_the_exact_tree",
        ],
    ),
    (
        "kube_metadata",
        &["spans_of_processes_in_pods_carry_their_pod_and_workload"],
    ),
    (
        "socket_map",
        &["a_full_socket_map_refuses_and_counts_new_sockets_and_keeps_the_live_ones"],
    ),
    (
        "least_privilege",
        &[
            "the_daemonsets_capabilities_are_enough_and_only_proc_reading_ones_stay_after_attach",
            "without_cap_bpf_the_agent_stops_and_says_why",
        ],
    ),
    (
        "tls_capture",
        &[
            "python_https_server_and_clients_give_the_spans_of_their_plaintext_twins",
            "nginx_over_https_gives_curl_and_nginx_the_spans_of_their_plaintext_twins",
            "psycopg_over_tls_gives_the_calls_of_its_plaintext_twin",
            "mysql_connector_over_tls_gives_the_calls_of_its_plaintext_twin",
            "node_https_client_and_server_give_the_spans_of_their_plaintext_twins",
            "node_postgres_over_tls_gives_the_calls_of_its_plaintext_twin",
        ],
    ),
];

/// Longest one VM run may take (software emulation: no usable KVM here).
const VM_TIMEOUT_SECS: u64 = 1800;

fn as_root_cmd(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

/// The newest package matching `pattern`, downloaded and unpacked under
/// target/xtask/kernels, its modules visible at /lib/modules/<release> and
/// indexed. Returns (release, vmlinuz).
fn kernel(pattern: &str, suite: Option<&str>) -> Result<(String, PathBuf)> {
    let apt = |tool: &str, options: &[String]| {
        let mut c = Command::new(tool);
        for o in options {
            c.arg("-o").arg(o);
        }
        c
    };
    let options = apt_options(suite)?;
    let list = output(apt("apt-cache", &options).args(["search", "--names-only", pattern]))
        .context("apt-cache search failed")?;
    // 6.1.0-57 → [6, 1, 0, 57]; 6.12.95+deb12 → [6, 12, 95, 12]: newest is largest.
    let version = |name: &str| -> Vec<u64> {
        name.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let package = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|name| version(name))
        .with_context(|| format!("no kernel package matches {pattern} (apt-get update?)"))?
        .to_string();
    // linux-image-6.1.0-57-amd64-unsigned → 6.1.0-57-amd64
    let release = package
        .trim_start_matches("linux-image-")
        .trim_end_matches("-unsigned")
        .to_string();
    let dir = tools_dir().join("kernels").join(&package);
    let root = dir.join("root");
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        std::fs::create_dir_all(&dir)?;
        run(apt("apt-get", &options)
            .current_dir(&dir)
            .args(["download", "-q", &package]))?;
        let deb = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        let _ = std::fs::remove_file(&deb);
    }
    let modules = root.join("lib/modules").join(&release);
    let visible = Path::new("/lib/modules").join(&release);
    if std::fs::read_link(&visible).ok().as_deref() != Some(modules.as_path()) {
        run(as_root_cmd("mkdir").args(["-p", "/lib/modules"]))?;
        run(as_root_cmd("ln").arg("-sfn").arg(&modules).arg(&visible))?;
    }
    if !modules.join("modules.dep.bin").exists() {
        run(as_root_cmd("/sbin/depmod")
            .arg("-b")
            .arg(&root)
            .arg(&release))?;
    }
    Ok((release, vmlinuz))
}

/// Boots `vmlinuz` over the host's files and runs `script` in it as root, with
/// `out` writable (the guest's console is not kept: the script writes there).
/// Returns when the guest powers off or the time runs out.
fn boot(vmlinuz: &Path, out: &Path, script: &Path) -> Result<std::process::ExitStatus> {
    let vng = tools_dir().join("venv/bin/vng");
    // vng runs its helpers (virtme-run) from PATH: the venv's bin first.
    let path = format!(
        "{}:{}",
        tools_dir().join("venv/bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("timeout")
        .env("PATH", path)
        .arg(VM_TIMEOUT_SECS.to_string())
        .arg(&vng)
        .arg("--run")
        .arg(vmlinuz)
        .args([
            "--disable-kvm",
            "--force-9p",
            "--cpus",
            "2",
            "--memory",
            "4G",
        ])
        .arg("--rwdir")
        .arg(out)
        .arg("--")
        .arg(format!("bash {}", script.display()))
        // QEMU reopens its own stdout and stderr by path, truncating a file
        // behind them (a log the caller writes to): give it files of its own.
        .stdout(std::fs::File::create(out.join("vm.stdout"))?)
        .stderr(std::fs::File::create(out.join("vm.stderr"))?)
        .status()
        .with_context(|| format!("starting {}", vng.display()))
}

/// Runs the shell commands `body` as root in a VM booting `vmlinuz` (release
/// `release`), with `out` writable; fails, naming `what`, when the VM did not
/// finish the script or ran another kernel.
fn run_in_vm(vmlinuz: &Path, release: &str, out: &Path, body: &str, what: &str) -> Result<()> {
    let o = out.display();
    let script = format!("#!/bin/bash\nuname -r > {o}/uname\n{body}echo finished > {o}/finished\n");
    let script_path = out.join("run.sh");
    std::fs::write(&script_path, script)?;
    let status = boot(vmlinuz, out, &script_path)?;
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    if read("finished").is_empty() {
        bail!("{what}: the VM did not finish its run ({status}); see {o}");
    }
    if read("uname").trim() != release {
        bail!(
            "{what}: the VM ran {:?}, not {release}",
            read("uname").trim()
        );
    }
    Ok(())
}

/// The backends measured by [`bench`], on the first kernel of the matrix.
const BENCH_BACKENDS: [&str; 3] = ["fexit", "kprobes", "syscalls"];

/// The overhead benchmark's saturation and floor parts inside a VM booting the
/// first kernel of the matrix, once per backend: the agent against no agent in
/// the same VM. Emulation inflates every absolute cost; the ratios are what the
/// run is for.
pub fn bench(pairs: usize, seconds: u64) -> Result<()> {
    run(crate::cargo().args(["build", "--release", "-p", "tracer-agent"]))?;
    let agent = workspace_root().join("target/release/tracer-agent");
    let xtask = std::env::current_exe().context("the xtask binary")?;
    let (release, vmlinuz) = kernel(MATRIX[0].package, MATRIX[0].suite)?;
    let out = tools_dir().join("vm").join(format!("{release}-bench"));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let o = out.display();
    let mut script = format!("cd {}\n", workspace_root().display());
    for backend in BENCH_BACKENDS {
        script += &format!(
            "TRACER_CAPTURE_BACKEND={backend} {x} bench overhead --agent {a} --only saturation,floor --pairs {pairs} --seconds {seconds} > {o}/{backend}.txt 2>&1; echo \"{backend} $?\" >> {o}/rcs\n",
            x = xtask.display(),
            a = agent.display(),
        );
    }
    eprintln!("xtask: overhead benchmark in a VM booting {release}");
    run_in_vm(&vmlinuz, &release, &out, &script, "the benchmark VM")?;
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    for backend in BENCH_BACKENDS {
        println!("--- {release} in a VM (QEMU without KVM), {backend} backend");
        let text = read(&format!("{backend}.txt"));
        // The tables, without the progress lines.
        for line in text.lines().filter(|l| !l.starts_with("xtask: ")) {
            println!("{line}");
        }
    }
    let rcs = read("rcs");
    if rcs.lines().count() != BENCH_BACKENDS.len() || rcs.lines().any(|l| !l.ends_with(" 0")) {
        bail!(
            "the benchmark failed in the VM: {}; see {o}",
            read("rcs").trim()
        );
    }
    Ok(())
}

/// The matrix's tests on the host's own kernel with `backend` forced (the agent
/// fails to start when it cannot load it, so a pass is that backend's). `binaries`
/// are the integration test binaries by name.
pub fn on_host(
    binaries: &[(String, PathBuf)],
    backend: &str,
    rotel: &Path,
    ci: bool,
    only: &[String],
    tally: &mut Tally,
) -> Result<()> {
    eprintln!("xtask: kernel matrix: this kernel ({backend} backend)");
    let passed_before = tally.passed;
    let tests = selected(only)?;
    for (name, tests) in &tests {
        let (_, exe) = binaries
            .iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("no test binary {name}"))?;
        let mut cmd = crate::integration_cmd(exe, rotel, ci)?;
        cmd.env("TRACER_CAPTURE_BACKEND", backend)
            .arg("--exact")
            .args(*tests);
        crate::run_tests(&mut cmd, tally)?;
    }
    let expected: usize = tests.iter().map(|(_, t)| t.len()).sum();
    if tally.passed - passed_before != expected as u64 {
        bail!(
            "kernel matrix, this kernel ({backend} backend): {} of the {expected} tests passed",
            tally.passed - passed_before
        );
    }
    Ok(())
}

/// The matrix's test binaries named in `only` (all of them when it is empty).
fn selected(only: &[String]) -> Result<Vec<(&'static str, &'static [&'static str])>> {
    if let Some(unknown) = only.iter().find(|o| !TESTS.iter().any(|(n, _)| n == o)) {
        let names: Vec<&str> = TESTS.iter().map(|(n, _)| *n).collect();
        bail!("--only {unknown}: the matrix's test binaries are {names:?}");
    }
    Ok(TESTS
        .iter()
        .filter(|(n, _)| only.is_empty() || only.iter().any(|o| o == n))
        .copied()
        .collect())
}

/// Runs every matrix entry (with the test binaries in `only`, or all); their
/// test results join `tally`.
pub fn matrix(rotel: &Path, only: &[String], tally: &mut Tally) -> Result<()> {
    let tests = selected(only)?;
    // Release: the agent's start-up is slow enough under emulation.
    let binaries = crate::integration_tests(true)?;
    let agent = workspace_root().join("target/release/tracer-agent");
    for entry in MATRIX {
        let (release, vmlinuz) = kernel(entry.package, entry.suite)?;
        let label = format!("{release} ({} backend)", entry.backend);
        let out = tools_dir()
            .join("vm")
            .join(format!("{release}-{}", entry.backend));
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out)?;
        let mut script = format!(
            "cd {root}/tracer-agent\nexport CI=true TRACER_ROTEL_AGENT={rotel} TRACER_PYTHON={py}\n",
            root = workspace_root().display(),
            rotel = rotel.display(),
            py = tools_dir().join("venv/bin/python").display(),
        );
        if entry.backend != "auto" {
            script += &format!("export TRACER_CAPTURE_BACKEND={}\n", entry.backend);
        }
        let o = out.display();
        script += &format!(
            "{} check > {o}/check.txt 2>&1; echo $? > {o}/check.rc\n",
            agent.display()
        );
        for (name, tests) in &tests {
            let (_, exe) = binaries
                .iter()
                .find(|(n, _)| n == name)
                .with_context(|| format!("no release test binary {name}"))?;
            script += &format!(
                "{} --test-threads=1 --exact {} >> {o}/tests.txt 2>&1; echo \"{name} $?\" >> {o}/rcs\n",
                exe.display(),
                tests.join(" ")
            );
        }
        eprintln!("xtask: kernel matrix: {label}");
        run_in_vm(
            &vmlinuz,
            &release,
            &out,
            &script,
            &format!("kernel matrix {label}"),
        )?;
        let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
        let check = read("check.txt");
        println!("--- {label}: tracer-agent check\n{check}");
        if read("check.rc").trim() != "0" || !check.contains("verdict: ready") {
            bail!("kernel matrix {label}: tracer-agent check does not say ready");
        }
        let (passed_before, before) = (tally.passed, tally.failed);
        for line in read("tests.txt").lines() {
            println!("{line}");
            count_results(line, tally);
        }
        let failed_binaries: Vec<String> = read("rcs")
            .lines()
            .filter(|l| !l.ends_with(" 0"))
            .map(str::to_string)
            .collect();
        if tally.failed > before || !failed_binaries.is_empty() {
            bail!("kernel matrix {label}: tests failed: {failed_binaries:?}");
        }
        let expected: usize = tests.iter().map(|(_, t)| t.len()).sum();
        if tally.passed - passed_before != expected as u64 {
            bail!(
                "kernel matrix {label}: {} of the {expected} tests passed",
                tally.passed - passed_before
            );
        }
        let ran = read("rcs").lines().count();
        if ran != tests.len() {
            bail!(
                "kernel matrix {label}: {ran} of {} test binaries ran",
                tests.len()
            );
        }
    }
    Ok(())
}
