//! Capture backends: the four ways the kernel programs can see every TCP socket
//! write and read, what each needs from the kernel, and which one to use.
//!
//! All four feed the same kernel-side core and produce the same events; they
//! differ only in where they attach. `auto` takes the first whose requirements the
//! running kernel meets and whose programs load and attach, in the order of
//! [`Backend::ALL`] (cheapest first; the syscall tracepoints, which run on every
//! read and write of every file, last). Nothing is chosen by kernel version.

use std::path::Path;

use serde::Deserialize;

use super::kernel_info;

/// One way of capturing socket I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `sock:sock_send_length` / `sock:sock_recv_length` (Linux ≥ 6.3).
    Tracepoints,
    /// fexit programs on `tcp_sendmsg` / `tcp_recvmsg` (BPF trampolines, BTF).
    Fexit,
    /// kprobe + kretprobe on `tcp_sendmsg` / `tcp_recvmsg`.
    Kprobes,
    /// `syscalls:sys_exit_{read,write,…}`, each syscall's file descriptor followed
    /// to its socket. The last resort: it runs on every read and write.
    Syscalls,
}

/// `--capture-backend`: a backend, or `auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendChoice {
    #[default]
    Auto,
    Tracepoints,
    Fexit,
    Kprobes,
    Syscalls,
}

impl BackendChoice {
    /// The backends to try, in order.
    pub fn candidates(self) -> &'static [Backend] {
        match self {
            BackendChoice::Auto => &Backend::ALL,
            BackendChoice::Tracepoints => &[Backend::Tracepoints],
            BackendChoice::Fexit => &[Backend::Fexit],
            BackendChoice::Kprobes => &[Backend::Kprobes],
            BackendChoice::Syscalls => &[Backend::Syscalls],
        }
    }
}

/// The kernel functions the fexit and kprobe backends attach to.
pub const TCP_FUNCTIONS: [&str; 2] = ["tcp_sendmsg", "tcp_recvmsg"];

impl Backend {
    /// Every backend, in the order `auto` tries them.
    pub const ALL: [Backend; 4] = [
        Backend::Tracepoints,
        Backend::Fexit,
        Backend::Kprobes,
        Backend::Syscalls,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Tracepoints => "tracepoints",
            Backend::Fexit => "fexit",
            Backend::Kprobes => "kprobes",
            Backend::Syscalls => "syscalls",
        }
    }

    /// What the backend needs, in words (for `check`).
    pub fn needs(self) -> &'static str {
        match self {
            Backend::Tracepoints => {
                "tracepoints sock:sock_send_length and sock:sock_recv_length (Linux ≥ 6.3)"
            }
            Backend::Fexit => {
                "fexit (BPF trampolines) on tcp_sendmsg and tcp_recvmsg, described in BTF"
            }
            Backend::Kprobes => {
                "kprobes on tcp_sendmsg and tcp_recvmsg, and return probes defined in tracefs kprobe_events"
            }
            Backend::Syscalls => {
                "syscall exit tracepoints (CONFIG_FTRACE_SYSCALLS) and struct file/socket in BTF; runs on every read and write, not only on sockets"
            }
        }
    }

    /// Whether this kernel has what the backend needs, as far as can be told
    /// without loading programs (an error says what is missing). Loading can still
    /// fail (a kernel that forbids trampolines, say): the loader then moves on.
    pub fn requirements(self) -> Result<(), String> {
        match self {
            Backend::Tracepoints => {
                for name in ["sock_send_length", "sock_recv_length"] {
                    let dir = Path::new(kernel_info::TRACEFS)
                        .join("events/sock")
                        .join(name);
                    if !dir.is_dir() {
                        return Err(format!("no tracepoint sock:{name}"));
                    }
                }
                kernel_info::io_tracepoint_offsets()
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Backend::Fexit => kernel_info::function_args()
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Backend::Kprobes => {
                if !Path::new("/sys/bus/event_source/devices/kprobe").exists() {
                    return Err("the kernel has no kprobes (CONFIG_KPROBES)".into());
                }
                if !Path::new(kernel_info::TRACEFS)
                    .join("kprobe_events")
                    .exists()
                {
                    return Err(format!(
                        "no {}/kprobe_events (CONFIG_KPROBE_EVENTS)",
                        kernel_info::TRACEFS
                    ));
                }
                kernel_info::function_args()
                    .map(|_| ())
                    .map_err(|e| e.to_string())?;
                let traceable = kernel_info::traceable_functions(&TCP_FUNCTIONS);
                match TCP_FUNCTIONS
                    .iter()
                    .find(|f| traceable.get(**f) == Some(&false))
                {
                    Some(f) => Err(format!("{f} cannot be probed on this kernel")),
                    None => Ok(()),
                }
            }
            Backend::Syscalls => {
                for (_, name) in kernel_info::SYSCALL_EXITS {
                    let dir = Path::new(kernel_info::TRACEFS)
                        .join("events/syscalls")
                        .join(name);
                    if !dir.is_dir() {
                        return Err(format!(
                            "no tracepoint syscalls:{name} (the kernel needs CONFIG_FTRACE_SYSCALLS)"
                        ));
                    }
                }
                kernel_info::fd_offsets()
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
