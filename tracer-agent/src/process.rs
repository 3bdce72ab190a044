//! Who a process is: executable name and service name, for span resources.
//!
//! Read from /proc the first time a process is seen; short-lived processes (curl) may
//! be gone by then, so the thread name the kernel reported is the fallback.

use std::{collections::HashMap, sync::Arc};

/// How long an exited process's resource is kept.
pub const EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The OpenTelemetry resource of one traced process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessResource {
    pub pid: u32,
    pub executable_name: String,
    pub service_name: String,
    /// `service.namespace`, when the process, a rule or the agent's config sets one.
    pub service_namespace: Option<String>,
    /// `service.instance.id`: the process's own, else one made for this process.
    pub service_instance_id: String,
    pub host_name: String,
    /// What Kubernetes says of the process's pod and container (`k8s.*`), when the
    /// agent runs in a cluster and knows the pod.
    pub k8s: Option<crate::kube::SharedK8sResource>,
    /// `k8s.node.name` of a process in no known pod, in a cluster.
    pub k8s_node: Option<Arc<str>>,
}

impl ProcessResource {
    /// The `k8s.*` (and pod-annotated) attributes of the process: its pod's when
    /// known, else the node's name in a cluster.
    pub fn k8s_attributes(&self) -> impl Iterator<Item = (&str, &str)> {
        let pod = self
            .k8s
            .iter()
            .flat_map(|k| k.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let node = self
            .k8s_node
            .as_deref()
            .filter(|_| self.k8s.is_none())
            .map(|n| ("k8s.node.name", n));
        pod.chain(node)
    }
}

/// How a process runs its requests on threads, as far as parent inference cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduling {
    /// Nothing says otherwise: a request's work stays on the thread that runs it
    /// (thread per request, thread pools, event loops).
    Threads,
    /// A runtime that moves one request's work between OS threads (goroutines on
    /// Go's scheduler, tasks on tokio's multi-thread scheduler): which thread does
    /// an I/O says nothing about which request it is for.
    MovesWork(&'static str),
}

/// Bounded cache of process resources, forgotten when the process exits.
pub struct ProcessTable {
    procs: HashMap<u32, Arc<ProcessResource>>,
    /// How each process schedules its work, read once per process.
    scheduling: HashMap<u32, Scheduling>,
    /// Exited processes, forgotten a little later: the connections they closed on
    /// exit still finish spans that need their resource.
    exited: std::collections::VecDeque<(u32, std::time::Instant)>,
    host_name: String,
    capacity: usize,
    proc_root: std::path::PathBuf,
    naming: crate::service::ServiceNaming,
    kube: Option<crate::kube::Kube>,
    /// Processes in a container whose pod was unknown when they were read, with
    /// the metadata generation then: read again once it changes.
    unplaced: HashMap<u32, u64>,
}

impl ProcessTable {
    pub fn new(capacity: usize) -> Self {
        Self::with_proc_root(capacity, "/proc")
    }

    /// A table reading from another procfs root (tests).
    pub fn with_proc_root(capacity: usize, root: impl Into<std::path::PathBuf>) -> Self {
        Self {
            procs: HashMap::new(),
            scheduling: HashMap::new(),
            exited: Default::default(),
            host_name: host_name(),
            capacity: capacity.max(1),
            proc_root: root.into(),
            naming: Default::default(),
            kube: None,
            unplaced: HashMap::new(),
        }
    }

    /// Adds Kubernetes metadata to the resources of processes in pods.
    pub fn with_kube(mut self, kube: Option<crate::kube::Kube>) -> Self {
        self.kube = kube;
        self
    }

    /// Names services that do not name themselves by `naming`.
    pub fn with_naming(mut self, naming: crate::service::ServiceNaming) -> Self {
        self.naming = naming;
        self
    }

    /// The resource for `pid`, reading /proc the first time. `comm` is the thread name
    /// from the kernel, used when /proc has nothing (the process already exited).
    pub fn get(&mut self, pid: u32, comm: &str) -> Arc<ProcessResource> {
        if let Some(r) = self.procs.get(&pid) {
            let stale = match (&self.kube, self.unplaced.get(&pid)) {
                (Some(k), Some(&generation)) => k.generation() != generation,
                _ => false,
            };
            if !stale {
                return r.clone();
            }
            self.procs.remove(&pid);
        }
        if self.procs.len() >= self.capacity {
            // Evict an arbitrary entry: processes are re-read cheaply when seen again.
            if let Some(&victim) = self.procs.keys().next() {
                self.procs.remove(&victim);
                self.unplaced.remove(&victim);
            }
        }
        let r = Arc::new(self.read(pid, comm));
        self.procs.insert(pid, r.clone());
        r
    }

    /// The process exited: forget it once [`EXIT_GRACE`] has passed.
    pub fn exited(&mut self, pid: u32) {
        self.exited.push_back((pid, std::time::Instant::now()));
        while let Some(&(pid, at)) = self.exited.front() {
            if at.elapsed() < EXIT_GRACE && self.exited.len() <= self.capacity {
                break;
            }
            self.exited.pop_front();
            self.procs.remove(&pid);
            self.scheduling.remove(&pid);
            self.unplaced.remove(&pid);
        }
    }

    /// Forget a process now.
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
        self.scheduling.remove(&pid);
        self.unplaced.remove(&pid);
    }

    /// How `pid` schedules its work, read from /proc the first time: its executable
    /// (a Go binary) and its thread names (tokio's workers).
    pub fn scheduling(&mut self, pid: u32) -> Scheduling {
        if let Some(s) = self.scheduling.get(&pid) {
            return *s;
        }
        if self.scheduling.len() >= self.capacity {
            self.scheduling.clear();
        }
        let dir = self.proc_root.join(pid.to_string());
        let s = read_scheduling(&dir);
        self.scheduling.insert(pid, s);
        s
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// Where `pid` runs, for a table with Kubernetes metadata; a process in a pod
    /// the cache does not know yet is marked to be read again.
    fn place(&mut self, dir: &std::path::Path, pid: u32) -> Option<crate::kube::Placement> {
        let kube = self.kube.as_ref()?;
        let generation = kube.generation();
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        let placement = kube.place(&cgroup);
        if matches!(placement, crate::kube::Placement::Unknown(_)) {
            self.unplaced.insert(pid, generation);
        } else {
            self.unplaced.remove(&pid);
        }
        Some(placement)
    }

    fn read(&mut self, pid: u32, comm: &str) -> ProcessResource {
        let dir = self.proc_root.join(pid.to_string());
        let exe = std::fs::read_link(dir.join("exe"))
            .ok()
            .and_then(|p| {
                p.file_name().map(|n| {
                    n.to_string_lossy()
                        .trim_end_matches(" (deleted)")
                        .to_string()
                })
            })
            .filter(|s| !s.is_empty());
        let comm_file = std::fs::read_to_string(dir.join("comm"))
            .ok()
            .map(|s| s.trim().to_string());
        let executable_name = exe.or(comm_file).unwrap_or_else(|| comm.to_string());
        let own = crate::service::read_own_resource(&dir.join("environ")).unwrap_or_default();
        let k8s = match self.place(&dir, pid) {
            Some(crate::kube::Placement::Pod(r)) => Some(r),
            _ => None,
        };
        // A pod's annotation names its service as if the process had; its workload
        // names it when no rule does.
        let annotated = k8s
            .as_ref()
            .filter(|r| r.service_name_annotated)
            .map(|r| r.service_name.clone());
        let workload = k8s
            .as_ref()
            .filter(|r| !r.service_name_annotated)
            .map(|r| r.service_name.as_str());
        let (service_name, rule_namespace) = match own.name.or(annotated) {
            Some(name) => (name, None),
            None => {
                let argv = read_cmdline(&dir.join("cmdline"));
                let cwd = std::fs::read_link(dir.join("cwd")).ok();
                let proc_root = self.proc_root.clone();
                let mut ports = || crate::recover::listening_ports(&proc_root, pid);
                crate::service::name_of(
                    &self.naming,
                    &mut crate::service::ProcessFacts {
                        exe: &executable_name,
                        argv: &argv,
                        cwd: cwd.as_deref(),
                        root: Some(&dir.join("root")),
                        ports: &mut ports,
                        workload,
                    },
                )
            }
        };
        let service_instance_id = own
            .instance_id
            .or_else(|| k8s.as_ref().map(|r| r.service_instance_id.clone()))
            .unwrap_or_else(|| {
                crate::service::instance_id(&self.host_name, pid, start_ticks(&dir))
            });
        ProcessResource {
            pid,
            executable_name,
            service_name,
            service_namespace: own
                .namespace
                .or(rule_namespace)
                .or_else(|| k8s.as_ref().map(|r| r.service_namespace.clone()))
                .or_else(|| self.naming.namespace.clone()),
            service_instance_id,
            host_name: self.host_name.clone(),
            k8s_node: self.kube.as_ref().map(|k| k.node_name.clone()),
            k8s,
        }
    }
}

/// Most command-line bytes read.
const MAX_CMDLINE: u64 = 4096;

/// `/proc/PID/cmdline` as arguments (empty when unreadable, e.g. a kernel thread).
fn read_cmdline(path: &std::path::Path) -> Vec<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let _ = std::fs::File::open(path).and_then(|f| f.take(MAX_CMDLINE).read_to_end(&mut bytes));
    bytes
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The process's start time in clock ticks since boot (`/proc/PID/stat` field 22),
/// 0 when unreadable.
fn start_ticks(dir: &std::path::Path) -> u64 {
    let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
    // The command name (field 2) is in parentheses and may hold spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19)?.parse().ok())
        .unwrap_or(0)
}

/// Threads looked at per process for a runtime's worker names.
const MAX_TASKS_READ: usize = 256;

fn read_scheduling(dir: &std::path::Path) -> Scheduling {
    if std::fs::File::open(dir.join("exe"))
        .ok()
        .is_some_and(|mut f| is_go_binary(&mut f))
    {
        return Scheduling::MovesWork("go");
    }
    let Ok(tasks) = std::fs::read_dir(dir.join("task")) else {
        return Scheduling::Threads;
    };
    for task in tasks.flatten().take(MAX_TASKS_READ) {
        let comm = std::fs::read(task.path().join("comm")).unwrap_or_default();
        // tokio's multi-thread workers are named "tokio-rt-worker" (in older
        // releases "tokio-runtime-worker", of which the kernel keeps 15 bytes);
        // its current-thread runtime spawns none.
        if comm.starts_with(b"tokio-rt-worker") || comm.starts_with(b"tokio-runtime-w") {
            return Scheduling::MovesWork("tokio");
        }
    }
    Scheduling::Threads
}

/// Whether an ELF file is a Go program: the Go linker writes a `.go.buildinfo`
/// section (and `.gopclntab`) into every binary, stripped or not. Reads the section
/// headers only.
pub(crate) fn is_go_binary(f: &mut (impl std::io::Read + std::io::Seek)) -> bool {
    use std::io::SeekFrom;
    let mut read_at = |off: u64, buf: &mut [u8]| -> bool {
        f.seek(SeekFrom::Start(off)).is_ok() && f.read_exact(buf).is_ok()
    };
    let mut eh = [0u8; 64];
    // 64-bit little-endian ELF only (the architectures the agent runs on).
    if !read_at(0, &mut eh) || &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return false;
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(&eh, 0x28),
        u16_at(&eh, 0x3a) as u64,
        u16_at(&eh, 0x3c) as usize,
        u16_at(&eh, 0x3e) as u64,
    );
    if shentsize < 64 || shnum == 0 || shnum > 4096 || shstrndx >= shnum as u64 {
        return false;
    }
    let mut sh = vec![0u8; shnum * shentsize as usize];
    if !read_at(shoff, &mut sh) {
        return false;
    }
    let header = |i: usize| &sh[i * shentsize as usize..i * shentsize as usize + 64];
    let names = header(shstrndx as usize);
    let (names_off, names_len) = (u64_at(names, 0x18), u64_at(names, 0x20));
    if names_len == 0 || names_len > 1 << 20 {
        return false;
    }
    let mut strtab = vec![0u8; names_len as usize];
    if !read_at(names_off, &mut strtab) {
        return false;
    }
    (0..shnum).any(|i| {
        let name = u32_at(header(i), 0) as usize;
        let name = strtab.get(name..).unwrap_or_default();
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        matches!(&name[..end], b".go.buildinfo" | b".gopclntab")
    })
}

/// This machine's host name (`host.name`), "unknown" when unreadable.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_falls_back_to_comm_for_gone_ones() {
        let mut t = ProcessTable::new(8);
        let me = t.get(std::process::id(), "ignored");
        assert!(!me.executable_name.is_empty());
        assert_ne!(me.executable_name, "ignored");
        let gone = t.get(u32::MAX - 1, "curl");
        assert_eq!(gone.executable_name, "curl");
        assert_eq!(gone.service_name, "curl");
        assert_eq!(gone.service_instance_id.len(), 36);
        assert_eq!(
            me.service_instance_id,
            t.get(std::process::id(), "x").service_instance_id
        );
        t.forget(u32::MAX - 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn go_binaries_are_told_from_others() {
        // This test binary is Rust, not Go.
        let mut me = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(!is_go_binary(&mut me));
        // A minimal ELF whose section names include .go.buildinfo.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let strtab = b"\0.shstrtab\0.go.buildinfo\0";
        let strtab_off = 64 + 3 * 64;
        elf[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        for (name, off, len) in [
            (0u32, 0u64, 0u64),
            (1, strtab_off, strtab.len() as u64),
            (11, 0, 0),
        ] {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            h[0x20..0x28].copy_from_slice(&len.to_le_bytes());
            elf.extend(h);
        }
        elf.extend(strtab);
        assert!(is_go_binary(&mut std::io::Cursor::new(elf.clone())));
        elf[strtab_off as usize + 11..strtab_off as usize + 14].copy_from_slice(b".rs");
        assert!(!is_go_binary(&mut std::io::Cursor::new(elf)));
        assert!(!is_go_binary(&mut std::io::Cursor::new(
            b"\x7fELF".to_vec()
        )));
    }

    #[test]
    fn a_process_with_tokio_workers_moves_work() {
        // A thread named as tokio names its multi-thread workers, in this process.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (named_tx, named) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::Builder::new()
            .name("tokio-rt-worker".into())
            .spawn(move || {
                // The thread names itself as it starts: running means named.
                named_tx.send(()).unwrap();
                let _ = rx.recv();
            })
            .unwrap();
        named.recv().unwrap();
        let mut t = ProcessTable::new(8);
        assert_eq!(
            t.scheduling(std::process::id()),
            Scheduling::MovesWork("tokio")
        );
        drop(tx);
        worker.join().unwrap();
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = ProcessTable::new(2);
        for pid in 0..10 {
            t.get(u32::MAX - 10 + pid, "x");
        }
        assert!(t.len() <= 2);
    }
}
