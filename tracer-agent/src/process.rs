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
    pub host_name: String,
}

/// Bounded cache of process resources, forgotten when the process exits.
pub struct ProcessTable {
    procs: HashMap<u32, Arc<ProcessResource>>,
    /// Exited processes, forgotten a little later: the connections they closed on
    /// exit still finish spans that need their resource.
    exited: std::collections::VecDeque<(u32, std::time::Instant)>,
    host_name: String,
    capacity: usize,
    proc_root: std::path::PathBuf,
}

impl ProcessTable {
    pub fn new(capacity: usize) -> Self {
        Self::with_proc_root(capacity, "/proc")
    }

    /// A table reading from another procfs root (tests).
    pub fn with_proc_root(capacity: usize, root: impl Into<std::path::PathBuf>) -> Self {
        Self {
            procs: HashMap::new(),
            exited: Default::default(),
            host_name: host_name(),
            capacity: capacity.max(1),
            proc_root: root.into(),
        }
    }

    /// The resource for `pid`, reading /proc the first time. `comm` is the thread name
    /// from the kernel, used when /proc has nothing (the process already exited).
    pub fn get(&mut self, pid: u32, comm: &str) -> Arc<ProcessResource> {
        if let Some(r) = self.procs.get(&pid) {
            return r.clone();
        }
        if self.procs.len() >= self.capacity {
            // Evict an arbitrary entry: processes are re-read cheaply when seen again.
            if let Some(&victim) = self.procs.keys().next() {
                self.procs.remove(&victim);
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
        }
    }

    /// Forget a process now.
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    fn read(&self, pid: u32, comm: &str) -> ProcessResource {
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
        let service_name = std::fs::read(dir.join("environ"))
            .ok()
            .and_then(|env| service_name_from_environ(&env))
            .unwrap_or_else(|| executable_name.clone());
        ProcessResource {
            pid,
            executable_name,
            service_name,
            host_name: self.host_name.clone(),
        }
    }
}

/// `OTEL_SERVICE_NAME`, or `service.name` inside `OTEL_RESOURCE_ATTRIBUTES`.
fn service_name_from_environ(environ: &[u8]) -> Option<String> {
    let mut from_attrs = None;
    for var in environ.split(|&b| b == 0) {
        let var = String::from_utf8_lossy(var);
        if let Some(v) = var.strip_prefix("OTEL_SERVICE_NAME=") {
            if !v.is_empty() {
                return Some(v.to_string());
            }
        } else if let Some(attrs) = var.strip_prefix("OTEL_RESOURCE_ATTRIBUTES=") {
            from_attrs = attrs
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k.trim() == "service.name")
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty());
        }
    }
    from_attrs
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
    fn service_name_comes_from_the_environment() {
        assert_eq!(
            service_name_from_environ(b"A=1\0OTEL_SERVICE_NAME=checkout\0B=2\0"),
            Some("checkout".into())
        );
        assert_eq!(
            service_name_from_environ(b"OTEL_RESOURCE_ATTRIBUTES=team=x,service.name=cart\0"),
            Some("cart".into())
        );
        assert_eq!(service_name_from_environ(b"PATH=/bin\0"), None);
    }

    #[test]
    fn reads_this_process_and_falls_back_to_comm_for_gone_ones() {
        let mut t = ProcessTable::new(8);
        let me = t.get(std::process::id(), "ignored");
        assert!(!me.executable_name.is_empty());
        assert_ne!(me.executable_name, "ignored");
        let gone = t.get(u32::MAX - 1, "curl");
        assert_eq!(gone.executable_name, "curl");
        assert_eq!(gone.service_name, "curl");
        t.forget(u32::MAX - 1);
        assert_eq!(t.len(), 1);
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
