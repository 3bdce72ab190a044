//! `tracer-agent check`: what the agent needs from the kernel and what is here.

use std::path::Path;

use crate::capture::{kernel_info, loader};

/// One requirement and whether it holds.
pub struct Finding {
    pub name: &'static str,
    pub required: bool,
    pub present: bool,
    pub detail: String,
}

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

/// Checks every feature; tracefs is looked at where it is or would be mounted.
pub fn findings() -> Vec<Finding> {
    let release = kernel_release();
    let mut out = Vec::new();
    out.push(Finding {
        name: "privileges (root, or CAP_BPF+CAP_PERFMON)",
        required: true,
        present: loader::privileged(),
        detail: "needed to load eBPF programs".into(),
    });
    out.push(Finding {
        name: "kernel ≥ 5.15 (ring buffer, bpf_task_pt_regs)",
        required: true,
        present: version_at_least(&release, 5, 15),
        detail: format!("running {release}"),
    });
    out.push(Finding {
        name: "BTF at /sys/kernel/btf/vmlinux",
        required: true,
        present: Path::new(kernel_info::VMLINUX_BTF).exists(),
        detail: "struct offsets are read from it (CONFIG_DEBUG_INFO_BTF)".into(),
    });
    let tracefs = kernel_info::tracefs_mounted();
    out.push(Finding {
        name: "tracefs",
        required: true,
        present: tracefs || Path::new(kernel_info::TRACEFS).is_dir(),
        detail: if tracefs {
            "mounted".into()
        } else {
            "not mounted: the agent mounts it when run as root".into()
        },
    });
    for (_, category, name) in loader::TRACEPOINTS {
        let present = if tracefs {
            Path::new(kernel_info::TRACEFS)
                .join("events")
                .join(category)
                .join(name)
                .is_dir()
        } else {
            version_at_least(&release, 5, 15)
        };
        out.push(Finding {
            name: match name {
                "inet_sock_set_state" => "tracepoint sock:inet_sock_set_state",
                "sock_send_length" => "tracepoint sock:sock_send_length",
                "sock_recv_length" => "tracepoint sock:sock_recv_length",
                _ => "tracepoint sched:sched_process_exit",
            },
            required: true,
            present,
            detail: if tracefs {
                "present in tracefs".into()
            } else {
                "assumed from the kernel version".into()
            },
        });
    }
    if tracefs && let Err(e) = kernel_info::tracepoint_offsets() {
        out.push(Finding {
            name: "tracepoint field layout",
            required: true,
            present: false,
            detail: e.to_string(),
        });
    }
    if Path::new(kernel_info::VMLINUX_BTF).exists() {
        let k = kernel_info::kernel_offsets();
        out.push(Finding {
            name: "struct pt_regs / sock_common in BTF",
            required: true,
            present: k.as_ref().is_ok_and(|k| k.have_sock_offsets == 1),
            detail: match k {
                Ok(k) if k.have_sock_offsets == 1 => "found".into(),
                Ok(_) => "sock_common members missing: pre-existing sockets are not traced".into(),
                Err(e) => e.to_string(),
            },
        });
    }
    out.push(Finding {
        name: "uprobes (TLS libraries, later)",
        required: false,
        present: Path::new("/sys/bus/event_source/devices/uprobe").exists(),
        detail: "optional".into(),
    });
    out.push(Finding {
        name: "kprobes",
        required: false,
        present: Path::new("/sys/bus/event_source/devices/kprobe").exists(),
        detail: "optional speed-up; never required".into(),
    });
    out
}

/// Prints the findings and a verdict; returns true when the agent can run here.
pub fn run() -> bool {
    let all = findings();
    for f in &all {
        let mark = match (f.present, f.required) {
            (true, _) => "ok  ",
            (false, true) => "MISSING",
            (false, false) => "absent",
        };
        println!("{mark:<8} {:<48} {}", f.name, f.detail);
    }
    let ready = all.iter().all(|f| f.present || !f.required);
    if ready {
        println!("verdict: ready: tracer-agent can run on this host");
    } else {
        let missing: Vec<&str> = all
            .iter()
            .filter(|f| f.required && !f.present)
            .map(|f| f.name)
            .collect();
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
