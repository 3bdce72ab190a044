//! Capabilities. Loading and attaching the BPF programs needs `CAP_BPF` and
//! `CAP_PERFMON` (and `CAP_SYS_ADMIN` where `kernel.perf_event_paranoid` is above
//! 2, as Debian and Ubuntu ship it; given up before loading elsewhere); once they are attached, only reading other users' processes in
//! /proc is still needed (`CAP_SYS_PTRACE` to be let in, `CAP_DAC_READ_SEARCH`
//! past the files' modes: `/proc/PID/environ` is 0400 and owned by the process's
//! user), so the rest is given up for good.

use std::{
    cell::Cell,
    io,
    sync::atomic::{AtomicU64, Ordering},
};

/// Linux capability numbers (linux/capability.h).
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// What the agent keeps after attaching, and why.
pub const KEPT_AFTER_ATTACH: &[(u32, &str)] = &[
    (
        CAP_SYS_PTRACE,
        "open /proc/PID/{environ,exe,cwd,root,fd} of processes of other users",
    ),
    (
        CAP_DAC_READ_SEARCH,
        "read those files (mode 0400, owned by the process's user) and its own files through /proc/PID/root",
    ),
];

const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The (effective, permitted) capability sets of this process, as 64-bit masks.
pub fn current() -> io::Result<(u64, u64)> {
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget with a v3 header writes two data structs, which `d` holds.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok((
        join(d[0].effective, d[1].effective),
        join(d[0].permitted, d[1].permitted),
    ))
}

/// The names of the capabilities in `mask` (`bpf`, `sys_ptrace`, …).
pub fn names(mask: u64) -> Vec<String> {
    const NAMES: [&str; 41] = [
        "chown",
        "dac_override",
        "dac_read_search",
        "fowner",
        "fsetid",
        "kill",
        "setgid",
        "setuid",
        "setpcap",
        "linux_immutable",
        "net_bind_service",
        "net_broadcast",
        "net_admin",
        "net_raw",
        "ipc_lock",
        "ipc_owner",
        "sys_module",
        "sys_rawio",
        "sys_chroot",
        "sys_ptrace",
        "sys_pacct",
        "sys_admin",
        "sys_boot",
        "sys_nice",
        "sys_resource",
        "sys_time",
        "sys_tty_config",
        "mknod",
        "lease",
        "audit_write",
        "audit_control",
        "setfcap",
        "mac_override",
        "mac_admin",
        "syslog",
        "wake_alarm",
        "block_suspend",
        "audit_read",
        "perfmon",
        "bpf",
        "checkpoint_restore",
    ];
    (0..64)
        .filter(|i| mask & (1u64 << i) != 0)
        .map(|i| {
            NAMES
                .get(i)
                .map_or_else(|| format!("cap_{i}"), |n| n.to_string())
        })
        .collect()
}

/// `kernel.perf_event_paranoid`, when readable. Above 2 is a distribution's
/// restriction (Debian's and Ubuntu's kernels ship 3 or 4): there `perf_event_open`,
/// which attaching tracepoints and probes goes through, needs `CAP_SYS_ADMIN`, and
/// `CAP_PERFMON` is not enough.
pub fn perf_event_paranoid() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether attaching needs `CAP_SYS_ADMIN` on a kernel with this
/// `perf_event_paranoid` (unknown: assume it may).
pub fn attach_needs_sys_admin(paranoid: Option<i32>) -> bool {
    paranoid.is_none_or(|p| p > 2)
}

/// Why attaching failed for want of `CAP_SYS_ADMIN`, when that is the likely
/// reason: the kernel restricts `perf_event_open` and this process lacks it.
pub fn attach_hint() -> Option<String> {
    let paranoid = perf_event_paranoid()?;
    let (effective, _) = current().ok()?;
    (attach_needs_sys_admin(Some(paranoid)) && effective & (1u64 << CAP_SYS_ADMIN) == 0).then(
        || {
            format!(
                "kernel.perf_event_paranoid is {paranoid} (a Debian/Ubuntu restriction): attaching \
             needs CAP_SYS_ADMIN here, CAP_PERFMON is not enough; grant CAP_SYS_ADMIN (the \
             agent gives it up once attached) or set `sysctl kernel.perf_event_paranoid=2`"
            )
        },
    )
}

/// Gives up `CAP_SYS_ADMIN` before loading when this kernel does not need it:
/// `CAP_BPF` and `CAP_PERFMON` are held, `perf_event_paranoid` is at most 2 and
/// no uprobes (TLS) are to be attached. Returns whether it was given up. A unit
/// or pod may then grant it for the kernels that restrict `perf_event_open` and
/// for TLS capture, and it is used only there.
pub fn drop_sys_admin_if_unneeded(uprobes: bool) -> io::Result<bool> {
    let (effective, permitted) = current()?;
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if uprobes
        || !has(CAP_SYS_ADMIN)
        || !has(CAP_BPF)
        || !has(CAP_PERFMON)
        || attach_needs_sys_admin(perf_event_paranoid())
    {
        return Ok(false);
    }
    if has(CAP_SETPCAP) {
        // SAFETY: prctl with these options takes plain integer arguments.
        unsafe {
            libc::prctl(
                libc::PR_CAPBSET_DROP,
                CAP_SYS_ADMIN as libc::c_ulong,
                0,
                0,
                0,
            )
        };
    }
    let without = !(1u64 << CAP_SYS_ADMIN);
    set(effective & without, permitted & without)?;
    Ok(true)
}

/// Sets the effective and permitted sets (the inheritable one empty).
fn set(effective: u64, permitted: u64) -> io::Result<()> {
    let lo = |m: u64| m as u32;
    let hi = |m: u64| (m >> 32) as u32;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let d = [
        Data {
            effective: lo(effective),
            permitted: lo(permitted),
            inheritable: 0,
        },
        Data {
            effective: hi(effective),
            permitted: hi(permitted),
            inheritable: 0,
        },
    ];
    // SAFETY: capset with a v3 header reads two data structs, which `d` holds.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`drop_after_attach`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Dropped {
    /// Effective capabilities given up.
    pub dropped: u64,
    /// Effective capabilities kept.
    pub kept: u64,
}

/// The capabilities every thread of the agent keeps once [`drop_after_attach`]
/// ran (`u64::MAX`: not yet). Capabilities belong to threads, not processes: the
/// runtime's threads that exist already give theirs up themselves
/// ([`follow_on_this_thread`]); threads started later inherit the smaller sets.
static KEPT_BY_THREADS: AtomicU64 = AtomicU64::new(u64::MAX);

thread_local! {
    /// This thread gave up its capabilities.
    static GIVEN_UP: Cell<bool> = const { Cell::new(false) };
}

/// Gives up every capability but [`KEPT_AFTER_ATTACH`] on the calling thread and
/// has every other thread of the runtime follow ([`follow_on_this_thread`], run by
/// the runtime's hooks; [`threads_holding_more`] tells when they have): from the
/// effective, permitted and inheritable sets, the ambient set and, when allowed
/// (`CAP_SETPCAP`), the bounding set; and sets no_new_privs, so that nothing the
/// agent might run gains any back. The one thread that attaches TLS probes later
/// ([`ATTACHER_THREAD`]) gives up its own, to [`ATTACHER_KEEPS`].
pub fn drop_after_attach() -> io::Result<Dropped> {
    let (effective, permitted) = current()?;
    let kept = permitted & proc_reading();
    KEPT_BY_THREADS.store(kept, Ordering::SeqCst);
    drop_this_thread(kept)?;
    GIVEN_UP.set(true);
    Ok(Dropped {
        dropped: effective & !kept,
        kept,
    })
}

fn proc_reading() -> u64 {
    KEPT_AFTER_ATTACH
        .iter()
        .fold(0, |m, (cap, _)| m | (1u64 << cap))
}

/// The name of the thread that attaches the TLS probes to copies of OpenSSL as
/// processes load them: the only thread that keeps more than [`KEPT_AFTER_ATTACH`].
/// It reads /proc and ELF files and makes `perf_event_open` calls; it never sees
/// captured traffic.
pub const ATTACHER_THREAD: &str = "tracer-tls";

/// What [`ATTACHER_THREAD`] keeps: [`KEPT_AFTER_ATTACH`], `CAP_BPF`, `CAP_PERFMON`
/// and `CAP_SYS_ADMIN`. Creating a uprobe perf event takes `CAP_SYS_ADMIN`
/// whatever `perf_event_paranoid` says (the kernel briefly accepted
/// `CAP_PERFMON` for it, and went back: stable kernels since 2025 check
/// `CAP_SYS_ADMIN`).
pub const ATTACHER_KEEPS: u64 = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_ADMIN);

/// Whether this thread could attach a uprobe: `CAP_SYS_ADMIN` is effective.
pub fn can_attach_uprobes() -> bool {
    current().is_ok_and(|(effective, _)| effective & (1u64 << CAP_SYS_ADMIN) != 0)
}

/// The attacher thread gives up everything but [`ATTACHER_KEEPS`] and
/// [`KEPT_AFTER_ATTACH`] (and sets no_new_privs), once its first attach is done.
pub fn drop_for_attacher() -> io::Result<()> {
    let (_, permitted) = current()?;
    drop_this_thread(permitted & (ATTACHER_KEEPS | proc_reading()))
}

/// What a runtime thread runs when it parks, unparks or starts: once
/// [`drop_after_attach`] ran, the thread gives up what the first one did (once).
pub fn follow_on_this_thread() {
    let kept = KEPT_BY_THREADS.load(Ordering::Relaxed);
    if kept == u64::MAX || GIVEN_UP.get() {
        return;
    }
    GIVEN_UP.set(true);
    if let Err(e) = drop_this_thread(kept) {
        log::warn!("a thread cannot give up its capabilities: {e}");
    }
}

/// Threads of this process (name, effective set) that hold capabilities beyond
/// what [`drop_after_attach`] kept: none once every thread followed.
pub fn threads_holding_more() -> Vec<(String, u64)> {
    let kept = KEPT_BY_THREADS.load(Ordering::SeqCst);
    if kept == u64::MAX {
        return Vec::new();
    }
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let status = std::fs::read_to_string(t.path().join("status")).ok()?;
            let name = status.lines().find_map(|l| l.strip_prefix("Name:"))?.trim();
            let eff = effective_in_status(&status)?;
            let allowed = if name == ATTACHER_THREAD {
                kept | ATTACHER_KEEPS
            } else {
                kept
            };
            (eff & !allowed != 0).then(|| (name.to_string(), eff))
        })
        .collect()
}

/// The effective set (`CapEff:`) of a `/proc/…/status` text.
pub fn effective_in_status(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The calling thread gives up all capabilities but `kept`.
fn drop_this_thread(kept: u64) -> io::Result<()> {
    let (effective, _) = current()?;
    // SAFETY: prctl with these options takes plain integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    if effective & (1u64 << CAP_SETPCAP) != 0 {
        let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(40)
            .min(63);
        for cap in (0..=last).filter(|c| kept & (1u64 << c) == 0) {
            // SAFETY: as above; a capability the kernel does not know fails harmlessly.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    set(kept, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_masks_are_named() {
        assert_eq!(names((1 << 19) | (1 << 39)), ["sys_ptrace", "bpf"]);
        assert_eq!(names(1 << 45), ["cap_45"]);
        assert!(names(0).is_empty());
    }

    #[test]
    fn only_a_restricted_or_unknown_perf_event_paranoid_needs_sys_admin() {
        assert!(!attach_needs_sys_admin(Some(-1)));
        assert!(!attach_needs_sys_admin(Some(2)));
        assert!(attach_needs_sys_admin(Some(3)));
        assert!(attach_needs_sys_admin(Some(4)));
        assert!(attach_needs_sys_admin(None));
    }

    #[test]
    fn this_process_can_read_its_capabilities() {
        let (effective, permitted) = current().expect("capget");
        assert_eq!(effective & !permitted, 0, "effective is within permitted");
    }
}
