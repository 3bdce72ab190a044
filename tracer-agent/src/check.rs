//! `tracer-agent check`: what the agent needs from the kernel and what is here.

use std::path::Path;

use crate::capture::{backend::Backend, kernel_info, loader};

/// One requirement and whether it holds.
pub struct Finding {
    pub name: String,
    pub required: bool,
    pub present: bool,
    pub detail: String,
}

/// The oldest kernel tracer supports: the kernel programs use the BPF ring buffer
/// (5.8), `bpf_get_current_task_btf` (5.11) and `bpf_task_pt_regs` (5.15).
pub const OLDEST_KERNEL: (u32, u32) = (5, 15);

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn version_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (Some(a), Some(b)) = (it.next(), it.next()) else {
        return false;
    };
    (a, b) >= (major, minor)
}

/// TLS stacks whose plaintext the agent does not read (their connections are
/// counted as `encrypted`).
pub const TLS_NOT_COVERED: &str = "Go crypto/tls, rustls, BoringSSL, Java JSSE, GnuTLS, NSS";

/// What `check` found: every requirement, each capture backend, and the backend
/// the agent will use (none when it cannot run).
pub struct Report {
    pub findings: Vec<Finding>,
    pub backends: Vec<(Backend, Result<(), String>)>,
    /// Whether the backends were loaded and attached (root) or only looked at.
    pub tried: bool,
}

impl Report {
    /// The backend `auto` picks: the first that works.
    pub fn chosen(&self) -> Option<Backend> {
        self.backends
            .iter()
            .find(|(_, r)| r.is_ok())
            .map(|(b, _)| *b)
    }

    pub fn ready(&self) -> bool {
        self.chosen().is_some() && self.findings.iter().all(|f| f.present || !f.required)
    }
}

/// Checks every feature; tracefs is looked at where it is or would be mounted.
/// With the privileges to load programs, each backend is also attached and
/// detached, so the verdict is what the agent will meet.
pub fn report() -> Report {
    let release = kernel_release();
    let privileged = loader::privileged();
    let mut out = Vec::new();
    out.push(Finding {
        name: "privileges (root, or CAP_BPF+CAP_PERFMON)".into(),
        required: true,
        present: privileged,
        detail: "needed to load eBPF programs".into(),
    });
    let paranoid = crate::privileges::perf_event_paranoid();
    let restricted = crate::privileges::attach_needs_sys_admin(paranoid);
    let has_admin = crate::privileges::current()
        .is_ok_and(|(eff, _)| eff & (1u64 << crate::privileges::CAP_SYS_ADMIN) != 0);
    out.push(Finding {
        name: "perf_event_open allowed".into(),
        required: true,
        present: !restricted || has_admin,
        detail: match paranoid {
            Some(p) if p <= 2 => format!("kernel.perf_event_paranoid={p}: CAP_PERFMON attaches"),
            Some(p) => format!(
                "kernel.perf_event_paranoid={p} (Debian/Ubuntu restriction): attaching needs CAP_SYS_ADMIN{}",
                if has_admin { ", which this process has" } else { ", which this process lacks; or sysctl kernel.perf_event_paranoid=2" }
            ),
            None => "kernel.perf_event_paranoid unreadable: CAP_SYS_ADMIN may be needed".into(),
        },
    });
    let (major, minor) = OLDEST_KERNEL;
    out.push(Finding {
        name: format!("kernel ≥ {major}.{minor} (ring buffer, bpf_task_pt_regs)"),
        required: true,
        present: version_at_least(&release, major, minor),
        detail: format!("running {release}; the oldest kernel tracer supports is {major}.{minor}"),
    });
    out.push(Finding {
        name: "BTF at /sys/kernel/btf/vmlinux".into(),
        required: true,
        present: Path::new(kernel_info::VMLINUX_BTF).exists(),
        detail: "struct offsets are read from it (CONFIG_DEBUG_INFO_BTF)".into(),
    });
    let mut tracefs = kernel_info::tracefs_mounted();
    if !tracefs && privileged && kernel_info::ensure_tracefs().is_ok() {
        tracefs = kernel_info::tracefs_mounted();
    }
    out.push(Finding {
        name: "tracefs".into(),
        required: true,
        present: tracefs,
        detail: if tracefs {
            "mounted".into()
        } else {
            "not mounted: the agent mounts it when run as root".into()
        },
    });
    for (_, category, name) in loader::LIFECYCLE_TRACEPOINTS {
        let present = tracefs
            && Path::new(kernel_info::TRACEFS)
                .join("events")
                .join(category)
                .join(name)
                .is_dir();
        out.push(Finding {
            name: format!("tracepoint {category}:{name}"),
            required: true,
            present,
            detail: "connection lifecycle and process exits (every backend)".into(),
        });
    }
    if tracefs && let Err(e) = kernel_info::lifecycle_offsets() {
        out.push(Finding {
            name: "tracepoint field layout".into(),
            required: true,
            present: false,
            detail: e.to_string(),
        });
    }
    if Path::new(kernel_info::VMLINUX_BTF).exists() {
        let k = kernel_info::kernel_offsets();
        out.push(Finding {
            name: "struct pt_regs / sock_common in BTF".into(),
            required: true,
            present: k.as_ref().is_ok_and(|k| k.have_sock_offsets == 1),
            detail: match k {
                Ok(k) if k.have_sock_offsets == 1 => "found".into(),
                Ok(_) => "sock_common members missing: pre-existing sockets are not traced".into(),
                Err(e) => e.to_string(),
            },
        });
    }
    let uprobes = Path::new("/sys/bus/event_source/devices/uprobe").exists();
    let sys_admin = crate::privileges::can_attach_uprobes();
    out.push(Finding {
        name: "uprobes (TLS plaintext from OpenSSL)".into(),
        required: false,
        present: uprobes && sys_admin,
        detail: match (uprobes, sys_admin) {
            (true, true) => format!(
                "HTTPS and encrypted database sessions read from OpenSSL (system, bundled, \
                 linked into executables, behind memory BIOs); not covered: {TLS_NOT_COVERED}"
            ),
            (true, false) => "CAP_SYS_ADMIN missing, which creating uprobes needs: \
                 encrypted connections are not decoded (Kubernetes: components/tls-capture)"
                .into(),
            (false, _) => "absent: encrypted connections are not decoded".into(),
        },
    });
    let tried = privileged && tracefs;
    let backends = if tried {
        loader::BpfCapture::try_backends()
    } else {
        Backend::ALL
            .iter()
            .map(|&b| (b, b.requirements()))
            .collect()
    };
    Report {
        findings: out,
        backends,
        tried,
    }
}

/// Prints the findings and a verdict; returns true when the agent can run here.
pub fn run() -> bool {
    let report = report();
    for f in &report.findings {
        let mark = match (f.present, f.required) {
            (true, _) => "ok  ",
            (false, true) => "MISSING",
            (false, false) => "absent",
        };
        println!("{mark:<8} {:<48} {}", f.name, f.detail);
    }
    println!(
        "capture backends, in the order auto tries them ({}):",
        if report.tried {
            "each loaded, attached and detached here"
        } else {
            "not loaded: that needs root and tracefs"
        }
    );
    let chosen = report.chosen();
    for (backend, result) in &report.backends {
        let mark = match (result, Some(*backend) == chosen) {
            (Ok(()), true) => "use ",
            (Ok(()), false) => "ok  ",
            (Err(_), _) => "no  ",
        };
        println!("{mark:<8} {:<48} needs {}", backend.name(), backend.needs());
        match result {
            Ok(()) if report.tried => println!("{:<8} {:<48} attached", "", ""),
            Ok(()) => println!("{:<8} {:<48} requirements present", "", ""),
            Err(why) => println!("{:<8} {:<48} {why}", "", ""),
        }
    }
    let ready = report.ready();
    if ready {
        println!(
            "verdict: ready: tracer-agent can run on this host with the {} capture backend",
            chosen.map_or("?", Backend::name)
        );
    } else {
        let mut missing: Vec<String> = report
            .findings
            .iter()
            .filter(|f| f.required && !f.present)
            .map(|f| f.name.clone())
            .collect();
        if chosen.is_none() {
            missing.push("a capture backend".into());
        }
        println!("verdict: NOT ready: missing {}", missing.join(", "));
    }
    ready
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_kernel_versions() {
        assert!(version_at_least("6.18.44-fc-v595", 5, 15));
        assert!(version_at_least("5.15.0", 5, 15));
        assert!(!version_at_least("5.4.0-100-generic", 5, 15));
        assert!(!version_at_least("garbage", 5, 15));
    }
}
