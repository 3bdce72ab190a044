//! Attaching the TLS probes (`tracer-ebpf/src/tls.rs`) to every copy of OpenSSL
//! in use: each file once (by device and inode), whatever path or container root
//! it is seen through, and detached once no process maps it any more.
//!
//! Copies are found in `/proc/PID/maps` (see [`super::tls_libs`]): at start-up for
//! every process, then every [`SCAN_EVERY`] for processes that are new or have
//! exec'd another program since (their `exe` changed), and for all of them every
//! [`FULL_SCAN_EVERY`] (a library loaded late, as Python loads libssl at `import
//! ssl`). The host's own libssl is attached at start-up even when no process maps
//! it yet, so that programs started later (curl, a Python script) are covered from
//! their first call.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};

use super::tls_libs::{self, FileId, ProbedFile, SslSymbols};

/// How often processes that are new (or exec'd) are looked at.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);
/// How often every process is looked at again.
pub const FULL_SCAN_EVERY: Duration = Duration::from_secs(15);

/// Entry programs, one per function, and the return program all four share.
type Offset = fn(&SslSymbols) -> Option<u64>;
const ENTRIES: [(&str, Offset); 4] = [
    ("ssl_read", |s| Some(s.read)),
    ("ssl_write", |s| Some(s.write)),
    ("ssl_read_ex", |s| s.read_ex),
    ("ssl_write_ex", |s| s.write_ex),
];
const RETURN: &str = "ssl_return";
/// On the dynamic loader's `_dl_debug_state`.
const LOADER: &str = "dl_debug_state";

/// Where the host's own libssl and dynamic loader live (Debian, Ubuntu, Fedora,
/// Alpine, Arch).
const SYSTEM_LIBRARY_DIRS: [&str; 7] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
    "/lib",
];

struct Attached {
    /// The path it was attached through (for the log).
    path: PathBuf,
    copy: ProbedFile,
    links: Vec<(&'static str, UProbeLinkId)>,
    /// Attached for the host, not because a process mapped it: kept.
    system: bool,
}

/// The thread that owns the loaded object and attaches the TLS probes as
/// processes load OpenSSL ([`crate::privileges::ATTACHER_THREAD`]). It alone
/// keeps the capabilities attaching needs; the threads that read captured traffic
/// give them up. Dropping it stops the thread, which drops the object: every
/// program is detached then.
pub struct TlsAttacher {
    files: Arc<AtomicUsize>,
    requests: Option<mpsc::SyncSender<Request>>,
    thread: Option<JoinHandle<()>>,
    /// Processes the thread was asked to look at since they made their first
    /// connection (forgotten at exit; at most [`MAX_LOOKED_AT`]).
    looked_at: Mutex<HashSet<u32>>,
}

/// What the capture asks of the attacher thread.
enum Request {
    /// A process made its first connection: look at what it maps now.
    Look(u32),
}

/// Processes remembered as looked at; beyond, the set starts over (a process is
/// then looked at again at its next connection, which costs one read of its maps).
const MAX_LOOKED_AT: usize = 65_536;
/// Requests waiting for the thread; beyond, a request is dropped and the process
/// waits for the next scan.
const MAX_REQUESTS: usize = 1_024;

impl TlsAttacher {
    /// Starts the thread with `ebpf` and its loaded `probes`, and returns once it
    /// has attached to the host's libssl and to what running processes map, and
    /// given up the capabilities it does not need.
    pub fn spawn(ebpf: Ebpf, probes: TlsProbes) -> std::io::Result<Self> {
        let files = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = mpsc::sync_channel::<usize>(1);
        let (requests, incoming) = mpsc::sync_channel::<Request>(MAX_REQUESTS);
        let counted = files.clone();
        let thread = std::thread::Builder::new()
            .name(crate::privileges::ATTACHER_THREAD.into())
            .spawn(move || {
                let (mut ebpf, mut probes) = (ebpf, probes);
                let started = probes.start(&mut ebpf);
                counted.store(probes.files(), Ordering::Relaxed);
                match crate::privileges::drop_for_attacher() {
                    Ok(()) => log::info!(
                        "TLS: thread {} alone keeps {} (and the /proc reading ones), to attach \
                         as processes load OpenSSL",
                        crate::privileges::ATTACHER_THREAD,
                        crate::privileges::names(crate::privileges::ATTACHER_KEEPS).join(", ")
                    ),
                    Err(e) => log::warn!("the TLS attacher cannot give up capabilities: {e}"),
                }
                let _ = ready_tx.send(started.attached);
                let mut next_scan = Instant::now() + SCAN_EVERY;
                loop {
                    let wait = next_scan.saturating_duration_since(Instant::now());
                    match incoming.recv_timeout(wait) {
                        Ok(Request::Look(pid)) => probes.look_at(&mut ebpf, pid),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            probes.scan(&mut ebpf, false);
                            next_scan = Instant::now() + SCAN_EVERY;
                        }
                        // The attacher was dropped: stop.
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    counted.store(probes.files(), Ordering::Relaxed);
                }
            })?;
        match ready_rx.recv() {
            Ok(attached) => log::info!("TLS: probes on {attached} copies of OpenSSL"),
            Err(_) => log::warn!("the TLS attacher stopped while starting"),
        }
        Ok(Self {
            files,
            requests: Some(requests),
            thread: Some(thread),
            looked_at: Mutex::new(HashSet::new()),
        })
    }

    /// Sees each event the capture reads: a process's first connection has the
    /// thread look at it at once (a copy of OpenSSL it loaded since the last scan
    /// is attached before most of that connection's traffic), an exit forgets it.
    pub fn seen(&self, event: &super::Event) {
        match event {
            super::Event::ConnOpen { meta, .. } => {
                let first = {
                    let mut looked_at = crate::sync::lock(&self.looked_at);
                    if looked_at.len() >= MAX_LOOKED_AT {
                        looked_at.clear();
                    }
                    looked_at.insert(meta.tgid)
                };
                if first && let Some(requests) = &self.requests {
                    // Full: the process waits for the next scan.
                    let _ = requests.try_send(Request::Look(meta.tgid));
                }
            }
            super::Event::LibsLoaded { meta } => {
                // Full: the process waits for the next scan.
                if let Some(requests) = &self.requests {
                    let _ = requests.try_send(Request::Look(meta.tgid));
                }
            }
            super::Event::ProcExit { meta } => {
                crate::sync::lock(&self.looked_at).remove(&meta.tgid);
            }
            _ => {}
        }
    }

    /// Files attached now.
    pub fn files(&self) -> usize {
        self.files.load(Ordering::Relaxed)
    }
}

impl Drop for TlsAttacher {
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The TLS probes' attachments.
pub struct TlsProbes {
    attached: HashMap<FileId, Attached>,
    /// Files looked at that hold no OpenSSL (most executables) or could not be
    /// attached: not looked at again.
    refused: HashSet<FileId>,
    /// Each process's executable when it was last looked at.
    seen: HashMap<u32, FileId>,
    last_full: Instant,
    proc_root: PathBuf,
}

/// What a scan changed, for the log and `/metrics`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanResult {
    pub attached: usize,
    pub detached: usize,
}

impl TlsProbes {
    /// Loads the six programs (attached to nothing yet).
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, String> {
        for name in ENTRIES.iter().map(|(n, _)| *n).chain([RETURN, LOADER]) {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .ok_or_else(|| format!("program {name} is missing"))?
                .try_into()
                .map_err(|e| format!("{name}: {e}"))?;
            prog.load().map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(Self {
            attached: HashMap::new(),
            refused: HashSet::new(),
            seen: HashMap::new(),
            last_full: Instant::now(),
            proc_root: PathBuf::from("/proc"),
        })
    }

    /// Files attached now.
    pub fn files(&self) -> usize {
        self.attached.len()
    }

    /// Attaches the host's own libssl files, then looks at every process.
    pub fn start(&mut self, ebpf: &mut Ebpf) -> ScanResult {
        let mut result = ScanResult::default();
        for dir in SYSTEM_LIBRARY_DIRS {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let kind = match name.to_str() {
                    Some(n) if tls_libs::is_libssl_name(n) => ProbedFile::Library,
                    Some(n) if tls_libs::is_loader_name(n) => ProbedFile::Loader,
                    _ => continue,
                };
                if self.attach(ebpf, &entry.path(), kind, true) {
                    result.attached += 1;
                }
            }
        }
        let scan = self.scan(ebpf, true);
        result.attached += scan.attached;
        result
    }

    /// Looks at processes new since the last scan (or all of them, when a full
    /// scan is due or `full`), attaching what they map, detaching what no process
    /// maps any more (after a full scan).
    pub fn scan(&mut self, ebpf: &mut Ebpf, full: bool) -> ScanResult {
        let full = full || self.last_full.elapsed() >= FULL_SCAN_EVERY;
        let mut result = ScanResult::default();
        let Ok(dir) = std::fs::read_dir(&self.proc_root) else {
            return result;
        };
        let mut alive: HashMap<u32, FileId> = HashMap::new();
        let mut in_use: HashSet<FileId> = HashSet::new();
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let exe = self.proc_root.join(pid.to_string()).join("exe");
            let Ok(exe_id) = FileId::of(&exe) else {
                continue; // a kernel thread, or gone
            };
            alive.insert(pid, exe_id);
            if !full && self.seen.get(&pid) == Some(&exe_id) {
                continue;
            }
            result.attached += self.attach_mapped(ebpf, pid, &exe, exe_id, &mut in_use);
        }
        self.seen = alive;
        if full {
            self.last_full = Instant::now();
            let unused: Vec<FileId> = self
                .attached
                .iter()
                .filter(|(id, a)| !a.system && !in_use.contains(id))
                .map(|(id, _)| *id)
                .collect();
            for id in unused {
                if let Some(a) = self.attached.remove(&id) {
                    detach(ebpf, a);
                    result.detached += 1;
                }
            }
            // A file refused once may be replaced by another at the same inode
            // number; the set is only a cache.
            if self.refused.len() > 65_536 {
                self.refused.clear();
            }
        }
        result
    }

    /// Looks at one process now (its first connection): attaches what it maps.
    pub fn look_at(&mut self, ebpf: &mut Ebpf, pid: u32) {
        let exe = self.proc_root.join(pid.to_string()).join("exe");
        let Ok(exe_id) = FileId::of(&exe) else {
            return; // gone already
        };
        let mut in_use = HashSet::new();
        self.attach_mapped(ebpf, pid, &exe, exe_id, &mut in_use);
        self.seen.insert(pid, exe_id);
    }

    /// Attaches the copies of OpenSSL process `pid` maps (libraries, or its
    /// executable `exe`), adding each to `in_use`; returns how many were new.
    fn attach_mapped(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        exe: &Path,
        exe_id: FileId,
        in_use: &mut HashSet<FileId>,
    ) -> usize {
        let mut attached = 0;
        let Ok(maps) = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("maps"))
        else {
            return 0;
        };
        let libraries = tls_libs::libssl_mappings(&maps)
            .into_iter()
            .map(|l| (l, ProbedFile::Library));
        let loaders = tls_libs::loader_mappings(&maps)
            .into_iter()
            .map(|l| (l, ProbedFile::Loader));
        for (lib, kind) in libraries.chain(loaders) {
            let path = tls_libs::in_process_root(&self.proc_root, pid, lib);
            if let Ok(id) = FileId::of(&path) {
                in_use.insert(id);
                if self.attach(ebpf, &path, kind, false) {
                    attached += 1;
                }
            }
        }
        // OpenSSL linked into the executable (Node.js exports its API).
        in_use.insert(exe_id);
        if self.attach(ebpf, exe, ProbedFile::Executable, false) {
            attached += 1;
        }
        attached
    }

    /// Attaches the probes to `path` if it exports OpenSSL's functions; false
    /// (and remembered) when it does not or cannot be attached.
    fn attach(&mut self, ebpf: &mut Ebpf, path: &Path, copy: ProbedFile, system: bool) -> bool {
        let Ok(id) = FileId::of(path) else {
            return false;
        };
        if self.attached.contains_key(&id) || self.refused.contains(&id) {
            return false;
        }
        let targets: Vec<(&'static str, u64)> = match copy {
            ProbedFile::Loader => match tls_libs::loader_symbol(path) {
                Ok(offset) => vec![(LOADER, offset)],
                Err(e) => {
                    log::info!("TLS: {e}; libraries it loads are found by the periodic scan");
                    self.refused.insert(id);
                    return false;
                }
            },
            ProbedFile::Library | ProbedFile::Executable => match tls_libs::ssl_symbols(path) {
                Ok(symbols) => ENTRIES
                    .iter()
                    .filter_map(|(name, offset)| Some((*name, offset(&symbols)?)))
                    .flat_map(|(name, offset)| [(name, offset), (RETURN, offset)])
                    .collect(),
                Err(e) => {
                    if copy == ProbedFile::Library {
                        log::info!("TLS: {e}; not attached");
                    }
                    self.refused.insert(id);
                    return false;
                }
            },
        };
        let mut links = Vec::new();
        for (program, offset) in targets {
            match attach_one(ebpf, program, path, offset) {
                Ok(link) => links.push((program, link)),
                Err(e) => {
                    log::warn!("TLS: cannot attach {program} to {}: {e}", path.display());
                    detach(
                        ebpf,
                        Attached {
                            path: path.to_owned(),
                            copy,
                            links,
                            system,
                        },
                    );
                    self.refused.insert(id);
                    return false;
                }
            }
        }
        log::info!(
            "TLS: probes attached to {} ({})",
            path.display(),
            match copy {
                ProbedFile::Library => "OpenSSL library",
                ProbedFile::Executable => "OpenSSL linked into the executable",
                ProbedFile::Loader =>
                    "dynamic loader: processes that load libraries are looked at then",
            }
        );
        self.attached.insert(
            id,
            Attached {
                path: path.to_owned(),
                copy,
                links,
                system,
            },
        );
        true
    }
}

fn attach_one(
    ebpf: &mut Ebpf,
    program: &str,
    path: &Path,
    offset: u64,
) -> Result<UProbeLinkId, String> {
    let prog: &mut UProbe = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} is missing"))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    prog.attach(
        UProbeAttachLocation::AbsoluteOffset(offset),
        path,
        UProbeScope::AllProcesses,
    )
    .map_err(|e| {
        // The kernel's errno is in the source chain, not in the top message.
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    })
}

fn detach(ebpf: &mut Ebpf, attached: Attached) {
    for (program, link) in attached.links {
        if let Some(Ok(prog)) = ebpf.program_mut(program).map(<&mut UProbe>::try_from) {
            let _ = prog.detach(link);
        }
    }
    log::debug!(
        "TLS: probes detached from {} ({:?}): no process maps it",
        attached.path.display(),
        attached.copy
    );
}
