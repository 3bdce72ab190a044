//! The deployment files: `cargo xtask install` (the binary, the systemd unit and a
//! default config on one machine) and `cargo xtask deploy-check`, which `cargo xtask
//! test` runs too: the Kubernetes manifests rendered by kustomize, validated against
//! the API schemas and checked by checkov; the Dockerfile by hadolint and checkov;
//! the systemd unit by systemd-analyze, installed into a scratch root.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use super::{output, run, tools_dir, workspace_root};

/// What `cargo xtask install` lays down.
pub struct Install {
    /// Where the binary goes (`<prefix>/bin`).
    pub prefix: PathBuf,
    /// A root to install under instead of `/` (packaging, tests).
    pub root: PathBuf,
    /// The agent binary to install.
    pub binary: PathBuf,
}

/// The unit, with `ExecStart` pointing into `prefix`.
fn unit_text(prefix: &Path) -> Result<String> {
    let unit =
        std::fs::read_to_string(workspace_root().join("deploy/systemd/tracer-agent.service"))?;
    let bin = prefix.join("bin/tracer-agent");
    Ok(unit.replace("/usr/local/bin/tracer-agent", &bin.display().to_string()))
}

fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Installs binary, unit, config (only when absent) and an env file template
/// (only when absent, mode 0600: it holds API keys). Idempotent.
pub fn install(i: &Install) -> Result<Vec<PathBuf>> {
    if !i.binary.is_file() {
        bail!(
            "{} does not exist: build it first (cargo build --release -p tracer-agent)",
            i.binary.display()
        );
    }
    let mut laid = Vec::new();
    let bin = under(&i.root, &i.prefix.join("bin/tracer-agent"));
    std::fs::create_dir_all(bin.parent().context("bin dir")?)?;
    // Through a temporary file: a running agent's binary cannot be written over.
    let tmp = bin.with_extension("new");
    std::fs::copy(&i.binary, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &bin)?;
    laid.push(bin);
    let unit = under(
        &i.root,
        Path::new("/etc/systemd/system/tracer-agent.service"),
    );
    std::fs::create_dir_all(unit.parent().context("unit dir")?)?;
    std::fs::write(&unit, unit_text(&i.prefix)?)?;
    std::fs::set_permissions(&unit, std::fs::Permissions::from_mode(0o644))?;
    laid.push(unit);
    let etc = under(&i.root, Path::new("/etc/tracer-agent"));
    std::fs::create_dir_all(&etc)?;
    let config = etc.join("config.toml");
    if config.exists() {
        eprintln!("xtask: {} exists: left as it is", config.display());
    } else {
        std::fs::copy(workspace_root().join("deploy/systemd/config.toml"), &config)?;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))?;
        laid.push(config);
    }
    let env = etc.join("env");
    if env.exists() {
        eprintln!("xtask: {} exists: left as it is", env.display());
    } else {
        std::fs::write(
            &env,
            "# Environment of tracer-agent.service (mode 0600: API keys).\n\
             # OTEL_EXPORTER_OTLP_ENDPOINT=https://otlp.example.com\n\
             # OTEL_EXPORTER_OTLP_HEADERS=api-key=...\n",
        )?;
        std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o600))?;
        laid.push(env);
    }
    Ok(laid)
}

/// After installing to `/`: reload systemd when it runs, and say what is next.
pub fn after_install(root: &Path) -> Result<()> {
    if root == Path::new("/") && Path::new("/run/systemd/system").is_dir() {
        run(Command::new("systemctl").arg("daemon-reload"))?;
        println!("installed; start it with: systemctl enable --now tracer-agent");
    } else if root == Path::new("/") {
        println!(
            "installed; systemd is not running here: start the agent with \
             /usr/local/bin/tracer-agent --config /etc/tracer-agent/config.toml"
        );
    } else {
        println!("installed under {}", root.display());
    }
    Ok(())
}

fn venv_bin(name: &str) -> PathBuf {
    tools_dir().join("venv/bin").join(name)
}

/// Runs one check, printing its outcome and time; its output on failure.
fn check(name: &str, cmd: &mut Command, passed: &mut Vec<String>) -> Result<String> {
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("{name}: starting {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("deploy check {name} failed ({cmd:?}):\n{text}");
    }
    println!(
        "deploy check {name}: ok ({:.1} s)",
        start.elapsed().as_secs_f64()
    );
    passed.push(name.to_string());
    Ok(text)
}

/// `to` as a path relative to the directory `from` (kustomize refuses absolute ones).
fn relative(from: &Path, to: &Path) -> Result<PathBuf> {
    let from = from.canonicalize()?;
    let to = to.canonicalize()?;
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let mut path = PathBuf::new();
    for _ in from.components().skip(common) {
        path.push("..");
    }
    for part in to.components().skip(common) {
        path.push(part);
    }
    Ok(path)
}

/// Renders one kustomization and checks what it renders: it parses into our
/// objects, the API's schemas accept it and checkov finds nothing.
fn check_manifests(
    variant: &str,
    dir: &Path,
    scratch: &Path,
    passed: &mut Vec<String>,
) -> Result<()> {
    // 1. kustomize renders it; every document parses and is one of ours.
    let rendered = check(
        &format!("kustomize {variant}"),
        Command::new("kubectl").arg("kustomize").arg(dir),
        passed,
    )?;
    if rendered.contains("- SYS_ADMIN") != (variant != "base") {
        bail!("{variant}: CAP_SYS_ADMIN is granted by the component and nowhere else");
    }
    let manifests = scratch.join(format!("{variant}.yaml"));
    // kubectl's stderr is empty on success; what it printed is the YAML.
    std::fs::write(&manifests, &rendered)?;
    let kinds = check(
        &format!("yaml {variant}"),
        Command::new(venv_bin("python")).args([
            "-c",
            "import sys, yaml\n\
             docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]\n\
             kinds = sorted(d['kind'] for d in docs)\n\
             assert all(d['metadata'].get('labels', {}).get('app.kubernetes.io/name') == 'tracer-agent' for d in docs if d['kind'] != 'ConfigMap'), 'every object is labelled'\n\
             print(' '.join(kinds))",
        ])
        .arg(&manifests),
        passed,
    )?;
    let want =
        "ClusterRole ClusterRoleBinding ConfigMap DaemonSet Namespace NetworkPolicy ServiceAccount";
    if kinds.trim() != want {
        bail!(
            "the rendered manifests are {:?}, expected {want:?}",
            kinds.trim()
        );
    }

    // 2. The API's own schemas, strictly (no unknown fields), for the oldest and
    //    newest Kubernetes the validator knows that the manifests target.
    for version in ["1.30.0", "1.37.0"] {
        check(
            &format!("kubernetes-validate {version} {variant}"),
            Command::new(venv_bin("kubernetes-validate"))
                .args(["--strict", "--quiet", "-k", version])
                .arg(&manifests),
            passed,
        )?;
    }

    // 3. checkov: no failed check; the skips the agent's job needs are in the
    //    manifests with their reasons. --skip-download: no network.
    check(
        &format!("checkov kubernetes {variant}"),
        Command::new(venv_bin("checkov"))
            .args([
                "--framework",
                "kubernetes",
                "--compact",
                "--quiet",
                "--skip-download",
                "-f",
            ])
            .arg(&manifests),
        passed,
    )?;
    Ok(())
}

/// Every check of the deployment files; the names of those that passed. Any
/// failure is an error, never a skip.
pub fn deploy_check(agent: &Path) -> Result<Vec<String>> {
    let root = workspace_root();
    let deploy = root.join("deploy");
    let scratch = tools_dir().join("deploy-check");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let mut passed = Vec::new();

    // The base, and the base with each component (kernels that restrict
    // perf_event_open, TLS capture, both), rendered through an overlay of the kind
    // a user writes.
    check_manifests("base", &deploy.join("kubernetes"), &scratch, &mut passed)?;
    for components in [
        &["restricted-perf-events"][..],
        &["tls-capture"],
        &["restricted-perf-events", "tls-capture"],
    ] {
        let variant = components.join("+");
        let overlay = scratch.join(&variant);
        std::fs::create_dir_all(&overlay)?;
        let mut text = format!(
            "resources:\n  - {}\ncomponents:\n",
            relative(&overlay, &deploy.join("kubernetes"))?.display()
        );
        for c in components {
            let dir = deploy.join("kubernetes/components").join(c);
            text.push_str(&format!("  - {}\n", relative(&overlay, &dir)?.display()));
        }
        std::fs::write(overlay.join("kustomization.yaml"), text)?;
        check_manifests(&variant, &overlay, &scratch, &mut passed)?;
    }
    check(
        "checkov dockerfile",
        Command::new(venv_bin("checkov"))
            .args([
                "--framework",
                "dockerfile",
                "--compact",
                "--quiet",
                "--skip-download",
                "-f",
            ])
            .arg(deploy.join("Dockerfile")),
        &mut passed,
    )?;
    check(
        "hadolint",
        Command::new(venv_bin("hadolint")).arg(deploy.join("Dockerfile")),
        &mut passed,
    )?;

    // 4. The agent reads both shipped configs.
    for config in ["kubernetes/config.toml", "systemd/config.toml"] {
        check(
            &format!("config {config}"),
            Command::new(agent)
                .arg("--config")
                .arg(deploy.join(config))
                .args(["--kubernetes", "off", "config-check"]),
            &mut passed,
        )?;
    }

    // 5. Install into a scratch root, then have systemd check the unit there.
    let install_root = scratch.join("root");
    let laid = install(&Install {
        prefix: PathBuf::from("/usr/local"),
        root: install_root.clone(),
        binary: agent.to_path_buf(),
    })?;
    let mode = |p: &str| -> Result<u32> {
        Ok(std::fs::metadata(install_root.join(p))?
            .permissions()
            .mode()
            & 0o777)
    };
    if laid.len() != 4
        || mode("usr/local/bin/tracer-agent")? != 0o755
        || mode("etc/tracer-agent/env")? != 0o600
        || mode("etc/systemd/system/tracer-agent.service")? != 0o644
    {
        bail!("install laid down {laid:?} with wrong modes");
    }
    // A second install keeps the config the user may have changed.
    std::fs::write(
        install_root.join("etc/tracer-agent/config.toml"),
        "output = \"json\"\n",
    )?;
    install(&Install {
        prefix: PathBuf::from("/usr/local"),
        root: install_root.clone(),
        binary: agent.to_path_buf(),
    })?;
    if std::fs::read_to_string(install_root.join("etc/tracer-agent/config.toml"))?
        != "output = \"json\"\n"
    {
        bail!("a second install overwrote the config");
    }
    passed.push("install".into());
    if output(Command::new("systemd-analyze").arg("--version")).is_none() {
        bail!("systemd-analyze is missing (Debian package systemd)");
    }
    // The unit as installed, pointing at the binary installed in the scratch root
    // (verify checks that ExecStart exists), against this host's systemd units.
    let unit = scratch.join("tracer-agent.service");
    std::fs::write(&unit, unit_text(&install_root.join("usr/local"))?)?;
    // It exits 0 on unknown keys and bad values, with a warning: any output fails.
    let said = check(
        "systemd-analyze verify",
        Command::new("systemd-analyze").arg("verify").arg(&unit),
        &mut passed,
    )?;
    if !said.trim().is_empty() {
        bail!("systemd-analyze verify warns about the unit:\n{said}");
    }
    Ok(passed)
}
