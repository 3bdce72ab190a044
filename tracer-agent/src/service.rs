//! `service.name` and friends for a process that does not name itself.
//!
//! In order: the process's own `OTEL_SERVICE_NAME` (or `service.name` in its
//! `OTEL_RESOURCE_ATTRIBUTES`); the first of the user's rules (config file
//! `[[service]]`) that matches its executable, command line or a port it listens
//! on; a name derived from its command line (the script, module, jar or package an
//! interpreter runs); its executable name.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One `[[service]]` rule of the config file: processes matching every given
/// condition are named `name` (and put in `namespace`, when given).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceRule {
    pub name: String,
    pub namespace: Option<String>,
    /// The executable's file name, exactly (`python3.11`, `java`).
    pub executable: Option<String>,
    /// Text the command line (arguments joined by spaces) contains.
    pub cmdline: Option<String>,
    /// A TCP port the process listens on.
    pub port: Option<u16>,
}

impl ServiceRule {
    /// A rule must name a service and say which processes it is for.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("a [[service]] rule needs a name".into());
        }
        if self.executable.is_none() && self.cmdline.is_none() && self.port.is_none() {
            return Err(format!(
                "the [[service]] rule for {:?} matches nothing: give executable, cmdline or port",
                self.name
            ));
        }
        Ok(())
    }

    fn matches(&self, exe: &str, argv: &[String], ports: &mut dyn FnMut() -> Vec<u16>) -> bool {
        self.executable.as_deref().is_none_or(|e| e == exe)
            && self
                .cmdline
                .as_deref()
                .is_none_or(|c| argv.join(" ").contains(c))
            && self.port.is_none_or(|p| ports().contains(&p))
    }
}

/// How services are named on this agent.
#[derive(Clone, Debug, Default)]
pub struct ServiceNaming {
    pub rules: Vec<ServiceRule>,
    /// `service.namespace` for every process that sets none (config
    /// `service-namespace`, or the agent's own `OTEL_RESOURCE_ATTRIBUTES`).
    pub namespace: Option<String>,
}

/// What a process says of itself in its environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnResource {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub instance_id: Option<String>,
}

/// `OTEL_SERVICE_NAME` and the service attributes of `OTEL_RESOURCE_ATTRIBUTES` in
/// a NUL-separated environment. Nothing else of it is kept.
pub fn own_resource(environ: &[u8]) -> OwnResource {
    let mut own = OwnResource::default();
    let mut name_var = None;
    for var in environ.split(|&b| b == 0) {
        if let Some(v) = var.strip_prefix(b"OTEL_SERVICE_NAME=") {
            name_var = Some(String::from_utf8_lossy(v).trim().to_string());
        } else if let Some(attrs) = var.strip_prefix(b"OTEL_RESOURCE_ATTRIBUTES=") {
            own = resource_attributes(&String::from_utf8_lossy(attrs));
        }
    }
    if let Some(name) = name_var.filter(|n| !n.is_empty()) {
        own.name = Some(name);
    }
    own
}

/// [`own_resource`] of a process's `environ` file, read in pieces: only the two
/// variables are ever kept, a variable longer than [`MAX_OWN_VARIABLE`] is skipped
/// unread, and the buffer that held the rest (other variables may be secrets) is
/// zeroed before it is freed. `None` when the file cannot be opened.
pub fn read_own_resource(path: &std::path::Path) -> Option<OwnResource> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 64 << 10];
    let mut kept: Vec<u8> = Vec::new();
    // Bytes of an unfinished variable at the start of `buf`, and whether the
    // variable being read is being skipped (too long).
    let mut carry = 0;
    let mut skipping = false;
    loop {
        let n = match file.read(&mut buf[carry..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let filled = carry + n;
        let mut start = 0;
        while let Some(end) = buf[start..filled].iter().position(|&b| b == 0) {
            if !skipping {
                keep_own(&buf[start..start + end], &mut kept);
            }
            skipping = false;
            start += end + 1;
        }
        let rest = filled - start;
        if rest >= MAX_OWN_VARIABLE || skipping {
            // Not one of ours (or far too long to be): skip to its end.
            skipping = true;
            carry = 0;
        } else {
            buf.copy_within(start..filled, 0);
            carry = rest;
        }
    }
    if !skipping && carry > 0 {
        keep_own(&buf[..carry], &mut kept);
    }
    buf.fill(0);
    std::hint::black_box(&buf);
    let own = own_resource(&kept);
    kept.fill(0);
    std::hint::black_box(&kept);
    Some(own)
}

/// Longest environment variable [`read_own_resource`] reads.
pub const MAX_OWN_VARIABLE: usize = 32 << 10;

fn keep_own(var: &[u8], kept: &mut Vec<u8>) {
    if var.starts_with(b"OTEL_SERVICE_NAME=") || var.starts_with(b"OTEL_RESOURCE_ATTRIBUTES=") {
        kept.extend_from_slice(var);
        kept.push(0);
    }
}

/// The service attributes of an `OTEL_RESOURCE_ATTRIBUTES` value
/// (`key=value,key=value`, values percent-decoded).
pub fn resource_attributes(attrs: &str) -> OwnResource {
    let mut own = OwnResource::default();
    for (k, v) in attrs.split(',').filter_map(|kv| kv.split_once('=')) {
        let v = percent_decode(v.trim());
        if v.is_empty() {
            continue;
        }
        match k.trim() {
            "service.name" => own.name = Some(v),
            "service.namespace" => own.namespace = Some(v),
            "service.instance.id" => own.instance_id = Some(v),
            _ => {}
        }
    }
    own
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Everything naming reads of one process.
pub struct ProcessFacts<'a> {
    pub exe: &'a str,
    /// `/proc/PID/cmdline`, split.
    pub argv: &'a [String],
    /// Its working directory as it sees it (relative scripts are found from it).
    pub cwd: Option<&'a Path>,
    /// Its root directory, to open its files through (`/proc/PID/root`).
    pub root: Option<&'a Path>,
    /// The TCP ports it listens on, read only when a rule asks.
    pub ports: &'a mut dyn FnMut() -> Vec<u16>,
    /// The service name of its Kubernetes workload, when it runs in a known pod:
    /// it comes after the rules and before what the command line says.
    pub workload: Option<&'a str>,
}

/// The service of a process that set no `OTEL_SERVICE_NAME`: (name, namespace from
/// a rule).
pub fn name_of(naming: &ServiceNaming, p: &mut ProcessFacts<'_>) -> (String, Option<String>) {
    // Read once, however many rules ask.
    let mut listening: Option<Vec<u16>> = None;
    let mut ports = || listening.get_or_insert_with(|| (p.ports)()).clone();
    for rule in &naming.rules {
        if rule.matches(p.exe, p.argv, &mut ports) {
            return (rule.name.clone(), rule.namespace.clone());
        }
    }
    if let Some(name) = p.workload.filter(|n| !n.is_empty()) {
        return (name.to_string(), None);
    }
    let derived = from_cmdline(p.exe, p.argv, p.cwd, p.root).filter(|n| !n.is_empty());
    (derived.unwrap_or_else(|| p.exe.to_string()), None)
}

/// Names too generic to name a service: the directory holding them does.
const GENERIC_STEMS: &[&str] = &[
    "app",
    "main",
    "server",
    "index",
    "run",
    "start",
    "manage",
    "wsgi",
    "asgi",
    "__main__",
    "service",
    "cli",
    "application",
];
/// Directories too generic to name a service.
const GENERIC_DIRS: &[&str] = &[
    "", "src", "bin", "app", "lib", "dist", "build", "tmp", "srv", "opt", "usr", "code", "home",
    "root",
];

fn is_python(exe: &str) -> bool {
    exe == "python"
        || exe
            .strip_prefix("python")
            .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
        || exe.starts_with("pypy")
}

/// A name from what an interpreter runs, `None` for any other program.
pub fn from_cmdline(
    exe: &str,
    argv: &[String],
    cwd: Option<&Path>,
    root: Option<&Path>,
) -> Option<String> {
    let at = Place { cwd, root };
    let args = argv.get(1..).unwrap_or_default();
    if is_python(exe) {
        return python(args, &at);
    }
    match exe {
        "node" | "nodejs" | "bun" => script_name(
            first_operand(args, &["-r", "--require", "--import", "--loader"])?,
            &at,
        ),
        "deno" => script_name(
            args.iter().find(|a| !a.starts_with('-') && *a != "run")?,
            &at,
        ),
        "java" => java(args),
        "ruby" | "perl" | "php" => {
            script_name(first_operand(args, &["-I", "-r", "-e", "-c", "-d"])?, &at)
        }
        // A Python entry point (`gunicorn`, `uvicorn`, `celery`) runs as itself.
        "gunicorn" | "uvicorn" | "hypercorn" | "daphne" | "granian" => app_module(args),
        _ => None,
    }
}

/// The first argument that is not an option (nor an option's value).
fn first_operand<'a>(args: &'a [String], with_value: &[&str]) -> Option<&'a String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if with_value.contains(&a.as_str()) {
            it.next();
        } else if a == "--" {
            return it.next();
        } else if !a.starts_with('-') {
            return Some(a);
        }
    }
    None
}

fn python(args: &[String], at: &Place<'_>) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-m" => {
                let module = it.next()?;
                let rest: Vec<String> = it.cloned().collect();
                // A server module runs the application it is given.
                if matches!(
                    module.as_str(),
                    "gunicorn" | "uvicorn" | "hypercorn" | "daphne" | "granian"
                ) {
                    return app_module(&rest).or_else(|| Some(module.clone()));
                }
                let name = module.strip_suffix(".__main__").unwrap_or(module);
                let name = name.strip_suffix(".main").unwrap_or(name);
                return Some(name.to_string());
            }
            "-c" => return None,
            "-W" | "-X" | "-Q" => {
                it.next();
            }
            s if s.starts_with('-') => {}
            script => {
                // `manage.py runserver`: Django's project is the directory.
                return script_name(script, at);
            }
        }
    }
    None
}

/// `module.sub:callable` (gunicorn, uvicorn) → `module`.
fn app_module(args: &[String]) -> Option<String> {
    let app = first_operand(
        args,
        &[
            "-b",
            "--bind",
            "-w",
            "--workers",
            "-k",
            "--worker-class",
            "-c",
            "--config",
            "--host",
            "--port",
            "--chdir",
            "--timeout",
            "--log-level",
            "-t",
            "-u",
            "-g",
            "--user",
            "--group",
            "--env",
            "-e",
            "--app-dir",
            "--threads",
        ],
    )?;
    let module = app.split(':').next()?;
    let first = module.split('.').next()?;
    let name = if GENERIC_STEMS.contains(&first) {
        module
            .split('.')
            .find(|p| !GENERIC_STEMS.contains(p))
            .unwrap_or(first)
    } else {
        first
    };
    Some(name.to_string()).filter(|n| !n.is_empty() && !n.starts_with('-'))
}

/// A script's name: its package's name (`package.json` beside it or above), else
/// its file stem, else (a generic stem such as `app` or `index`) its directory's.
fn script_name(script: &str, at: &Place<'_>) -> Option<String> {
    let path = Path::new(script);
    let full: PathBuf = match (path.is_absolute(), at.cwd) {
        (false, Some(cwd)) => cwd.join(path),
        _ => path.to_path_buf(),
    };
    if let Some(name) = package_json_name(&full, at.root) {
        return Some(name);
    }
    let stem = path.file_stem()?.to_string_lossy().into_owned();
    if !GENERIC_STEMS.contains(&stem.as_str()) {
        return Some(stem);
    }
    full.parent()
        .into_iter()
        .flat_map(|p| p.ancestors())
        .filter_map(|d| d.file_name())
        .map(|d| d.to_string_lossy().into_owned())
        .find(|d| !GENERIC_DIRS.contains(&d.as_str()))
        .or(Some(stem))
}

/// `name` of the nearest `package.json` in the script's directory or the two above
/// it (a Node.js package), when it is a plain name.
fn package_json_name(script: &Path, root: Option<&Path>) -> Option<String> {
    for dir in script.ancestors().skip(1).take(3) {
        let file = dir.join("package.json");
        // Through the process's own root (its mount namespace); `file` is as it sees it.
        let file = match root {
            Some(root) => root.join(file.strip_prefix("/").unwrap_or(&file)),
            None => file,
        };
        let Some(text) = read_small_file(&file, 1 << 20) else {
            continue;
        };
        let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
        let name = value.get("name")?.as_str()?;
        // Scoped packages: `@team/orders` → `orders`.
        let name = name.rsplit('/').next().unwrap_or(name);
        return Some(name.to_string()).filter(|n| !n.is_empty() && n.len() <= 128);
    }
    None
}

/// Where a process's relative paths start, and the root its files are opened
/// through.
struct Place<'a> {
    cwd: Option<&'a Path>,
    root: Option<&'a Path>,
}

/// A regular file's bytes, when it holds at most `max`: never blocks on a FIFO or
/// device, never reads more than `max + 1` bytes.
fn read_small_file(path: &Path, max: u64) -> Option<Vec<u8>> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes).ok()?;
    (bytes.len() as u64 <= max).then_some(bytes)
}

/// `java -jar orders-1.2.3.jar` → `orders`; `java … com.example.OrdersApp` →
/// `OrdersApp`; `java -m module/Main` → `module`.
fn java(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-jar" => {
                let jar = Path::new(it.next()?)
                    .file_stem()?
                    .to_string_lossy()
                    .into_owned();
                return Some(strip_version(&jar).to_string());
            }
            "-m" | "--module" => {
                return it.next()?.split('/').next().map(str::to_string);
            }
            "-cp" | "-classpath" | "--class-path" | "-p" | "--module-path" | "--add-opens"
            | "--add-exports" | "--add-modules" => {
                it.next();
            }
            s if s.starts_with('-') => {}
            class => return class.rsplit('.').next().map(str::to_string),
        }
    }
    None
}

/// `orders-service-1.2.3` → `orders-service`; `app-0.0.1-SNAPSHOT` → `app`.
fn strip_version(stem: &str) -> &str {
    let mut end = stem.len();
    for (i, _) in stem.match_indices('-') {
        if stem[i + 1..].starts_with(|c: char| c.is_ascii_digit()) {
            end = i;
            break;
        }
    }
    &stem[..end]
}

/// A `service.instance.id` for one process: a UUID made from the host, the pid and
/// the process's start time, so it is the same every time the agent (or another
/// agent on this host) names that process, and new for its next incarnation.
pub fn instance_id(host: &str, pid: u32, start_ticks: u64) -> String {
    let fnv = |seed: u64| {
        let mut h = seed;
        for b in host
            .bytes()
            .chain(pid.to_le_bytes())
            .chain(start_ticks.to_le_bytes())
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    };
    let (hi, lo) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142));
    // Version 8 (custom), RFC 4122 variant.
    let hi = (hi & !0xf000) | 0x8000;
    let lo = (lo & !(0b11 << 62)) | (0b10 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_string).collect()
    }

    fn derived(exe: &str, line: &str) -> Option<String> {
        from_cmdline(exe, &argv(line), None, None)
    }

    #[test]
    fn interpreters_are_named_after_what_they_run() {
        for (exe, line, name) in [
            (
                "python3.11",
                "python3 /srv/checkout/worker.py --fast",
                Some("worker"),
            ),
            (
                "python3.11",
                "python3 -u /srv/checkout/app.py",
                Some("checkout"),
            ),
            ("python3.11", "python3 manage.py runserver", Some("manage")),
            ("python3", "python -m http.server 8000", Some("http.server")),
            ("python3", "python -m orders.api.main", Some("orders.api")),
            (
                "python3",
                "python -m gunicorn -w 4 -b 0.0.0.0:80 shop.wsgi:application",
                Some("shop"),
            ),
            (
                "python3",
                "python -m uvicorn payments.main:app --port 9000",
                Some("payments"),
            ),
            ("python3", "python -c print(1)", None),
            (
                "gunicorn",
                "/venv/bin/gunicorn --bind :80 billing:app",
                Some("billing"),
            ),
            (
                "node",
                "node --enable-source-maps dist/orders.js",
                Some("orders"),
            ),
            ("node", "node /srv/cart/index.js", Some("cart")),
            (
                "java",
                "java -Xmx1g -jar /opt/inventory-service-2.4.1.jar",
                Some("inventory-service"),
            ),
            (
                "java",
                "java -cp app.jar:lib/* com.example.BillingApp",
                Some("BillingApp"),
            ),
            ("curl", "curl http://x/", None),
        ] {
            assert_eq!(derived(exe, line).as_deref(), name, "{exe}: {line}");
        }
    }

    #[test]
    fn a_node_package_is_named_by_its_package_json() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::write(
            dir.path().join("package.json"),
            r#"{"name": "@acme/ledger", "version": "1.0.0"}"#,
        )
        .unwrap();
        let script = dir.path().join("src/server.js");
        assert_eq!(
            from_cmdline(
                "node",
                &["node".into(), "src/server.js".into()],
                Some(dir.path()),
                None
            )
            .as_deref(),
            Some("ledger"),
            "{script:?}"
        );
    }

    #[test]
    fn a_package_json_that_is_no_regular_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        // A FIFO would block a plain read forever.
        let fifo = dir.path().join("package.json");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert_eq!(
            from_cmdline(
                "node",
                &["node".into(), "index.js".into()],
                Some(dir.path()),
                None
            ),
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        );
        assert_eq!(read_small_file(Path::new("/dev/zero"), 1 << 20), None);
    }

    #[test]
    fn rules_come_first_and_match_on_every_condition_they_give() {
        let naming = ServiceNaming {
            rules: vec![
                ServiceRule {
                    name: "edge".into(),
                    port: Some(8443),
                    ..Default::default()
                },
                ServiceRule {
                    name: "reports".into(),
                    namespace: Some("finance".into()),
                    executable: Some("python3.11".into()),
                    cmdline: Some("reports.py".into()),
                    ..Default::default()
                },
            ],
            namespace: None,
        };
        let args = argv("python3 /srv/reports.py --daily");
        let mut no_ports = || Vec::new();
        let mut p = ProcessFacts {
            exe: "python3.11",
            argv: &args,
            cwd: None,
            root: None,
            ports: &mut no_ports,
            workload: None,
        };
        assert_eq!(
            name_of(&naming, &mut p),
            ("reports".into(), Some("finance".into()))
        );
        let mut p = ProcessFacts {
            exe: "python3.12",
            argv: &args,
            cwd: None,
            root: None,
            ports: &mut no_ports,
            workload: None,
        };
        assert_eq!(
            name_of(&naming, &mut p),
            ("reports".into(), None),
            "derived: the executable differs"
        );
        let mut listening = || vec![80, 8443];
        let mut p = ProcessFacts {
            exe: "nginx",
            argv: &argv("nginx: master process"),
            cwd: None,
            root: None,
            ports: &mut listening,
            workload: None,
        };
        assert_eq!(name_of(&naming, &mut p), ("edge".into(), None));
        assert!(
            ServiceRule {
                name: "x".into(),
                ..Default::default()
            }
            .validate()
            .is_err()
        );
    }

    /// Read in pieces: variables across piece boundaries, after a huge one, and
    /// the huge one itself skipped.
    #[test]
    fn environ_files_are_read_in_pieces_and_only_our_variables_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("environ");
        let mut env = Vec::new();
        env.extend_from_slice(b"SECRET_KEY=");
        env.extend(std::iter::repeat_n(b's', 200 << 10));
        env.push(0);
        for i in 0..5000 {
            env.extend_from_slice(format!("PAD{i}=xxxxxxxxxxxxxxxx").as_bytes());
            env.push(0);
        }
        env.extend_from_slice(
            b"OTEL_RESOURCE_ATTRIBUTES=service.namespace=shop\0OTEL_SERVICE_NAME=cart",
        );
        std::fs::write(&path, &env).unwrap();
        let own = read_own_resource(&path).unwrap();
        assert_eq!(own.name.as_deref(), Some("cart"));
        assert_eq!(own.namespace.as_deref(), Some("shop"));
        // A variable that would otherwise look like ours, buried in a too-long one.
        std::fs::write(
            &path,
            [
                &b"X="[..],
                &vec![b'a'; 100 << 10],
                b"OTEL_SERVICE_NAME=no\0",
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(read_own_resource(&path).unwrap().name, None);
        assert!(read_own_resource(&dir.path().join("missing")).is_none());
    }

    #[test]
    fn own_attributes_come_from_the_environment_only() {
        let own = own_resource(b"A=1\0OTEL_RESOURCE_ATTRIBUTES=service.name=cart,service.namespace=shop%20eu,team=x\0SECRET=s\0");
        assert_eq!(
            own,
            OwnResource {
                name: Some("cart".into()),
                namespace: Some("shop eu".into()),
                instance_id: None
            }
        );
        let own = own_resource(
            b"OTEL_SERVICE_NAME=checkout\0OTEL_RESOURCE_ATTRIBUTES=service.name=cart\0",
        );
        assert_eq!(
            own.name.as_deref(),
            Some("checkout"),
            "OTEL_SERVICE_NAME wins"
        );
        assert_eq!(own_resource(b"PATH=/bin\0"), OwnResource::default());
    }

    #[test]
    fn instance_ids_are_stable_per_process_and_differ_between_processes() {
        let a = instance_id("h", 10, 500);
        assert_eq!(a, instance_id("h", 10, 500));
        assert_ne!(a, instance_id("h", 10, 501));
        assert_ne!(a, instance_id("h", 11, 500));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "8");
    }
}
