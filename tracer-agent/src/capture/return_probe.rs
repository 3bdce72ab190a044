//! Return probes with room for every thread a server blocks in a read.
//!
//! The kernel keeps a fixed number of return-probe instances per function, one per
//! thread inside it: by default max(10, 2 × CPUs). A thread-per-connection server
//! keeps one thread blocked in `tcp_recvmsg` per idle keep-alive connection, so a
//! few dozen connections use them all and every later return goes unreported. A
//! return probe made through the perf kprobe PMU (what aya attaches) cannot ask
//! for more; one defined in tracefs (`r<MAXACTIVE>:…` in `kprobe_events`) can.
//! This module defines such an event, opens it as a perf tracepoint and attaches
//! the kretprobe program to it, and removes the event again when dropped.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use super::kernel_info::TRACEFS;

/// The most return-probe instances the kernel lets one probe keep
/// (`KRETPROBE_MAXACTIVE_MAX`): threads that can be inside the function at once
/// and still have their return reported.
pub const MAX_ACTIVE: u32 = 4096;

/// The tracefs group tracer's events are defined in.
const GROUP: &str = "tracer";

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
/// `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;

/// A kretprobe program attached to a tracefs-defined return probe. Dropping it
/// detaches the program and removes the probe.
#[derive(Debug)]
pub struct ReturnProbe {
    perf: Option<OwnedFd>,
    event: String,
}

fn write_events(line: &str) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .append(true)
        .open(Path::new(TRACEFS).join("kprobe_events"))?;
    f.write_all(line.as_bytes())
}

impl ReturnProbe {
    /// Defines a return probe on `function` keeping `max_active` instances, and
    /// attaches the loaded kretprobe program `program` to it.
    pub fn attach(program: BorrowedFd<'_>, function: &str, max_active: u32) -> io::Result<Self> {
        // Event names start with a letter: the function first, the pid last.
        let event = format!("{function}_return_{}", std::process::id());
        // A probe of that name left by an earlier process with this pid.
        let _ = write_events(&format!("-:{GROUP}/{event}\n"));
        write_events(&format!("r{max_active}:{GROUP}/{event} {function}\n")).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("defining a return probe on {function} in {TRACEFS}/kprobe_events: {e}"),
            )
        })?;
        // From here on, dropping `probe` removes the event.
        let mut probe = Self { perf: None, event };
        let id_path = Path::new(TRACEFS)
            .join("events")
            .join(GROUP)
            .join(&probe.event)
            .join("id");
        let id: u64 = std::fs::read_to_string(&id_path)?
            .trim()
            .parse()
            .map_err(|e| io::Error::other(format!("{}: {e}", id_path.display())))?;

        // struct perf_event_attr, in its first published size (64 bytes): type,
        // size, config (the event id), sample_period; everything else zero.
        let mut attr = [0u8; 64];
        attr[0..4].copy_from_slice(&PERF_TYPE_TRACEPOINT.to_ne_bytes());
        attr[4..8].copy_from_slice(&64u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&id.to_ne_bytes());
        attr[16..24].copy_from_slice(&1u64.to_ne_bytes());
        // SAFETY: perf_event_open reads `attr` (its size given inside); pid -1 on
        // CPU 0 is how a tracepoint event for BPF is opened (the program then
        // runs on every CPU).
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                attr.as_ptr(),
                -1 as libc::pid_t,
                0 as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor this process owns.
        let perf = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        // SAFETY: ioctls on the perf descriptor; SET_BPF takes the program's fd.
        unsafe {
            if libc::ioctl(
                perf.as_raw_fd(),
                PERF_EVENT_IOC_SET_BPF as _,
                program.as_raw_fd(),
            ) != 0
                || libc::ioctl(perf.as_raw_fd(), PERF_EVENT_IOC_ENABLE as _, 0) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        probe.perf = Some(perf);
        Ok(probe)
    }

    /// Removes the probes that agents no longer running left behind (killed
    /// before they could remove theirs): the kernel would keep them forever.
    pub fn remove_stale() {
        let Ok(defined) = std::fs::read_to_string(Path::new(TRACEFS).join("kprobe_events")) else {
            return;
        };
        for (name, pid) in defined.lines().filter_map(ours) {
            // The kernel refuses to remove a probe still open elsewhere.
            if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
                let _ = write_events(&format!("-:{GROUP}/{name}\n"));
            }
        }
    }
}

/// One of tracer's probes in a `kprobe_events` line, as (event, pid of the agent
/// that defined it): `r4096:tracer/tcp_recvmsg_return_1234 tcp_recvmsg`.
fn ours(line: &str) -> Option<(&str, u32)> {
    let (_, name) = line.split_whitespace().next()?.split_once(':')?;
    let name = name.strip_prefix(GROUP)?.strip_prefix('/')?;
    let pid = name.rsplit('_').next()?.parse().ok()?;
    Some((name, pid))
}

impl Drop for ReturnProbe {
    fn drop(&mut self) {
        // The event cannot be removed while a perf descriptor holds it open.
        drop(self.perf.take());
        if let Err(e) = write_events(&format!("-:{GROUP}/{}\n", self.event)) {
            log::warn!(
                "could not remove the return probe {GROUP}/{}: {e}",
                self.event
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_its_own_probes() {
        assert_eq!(
            ours("r4096:tracer/tcp_recvmsg_return_1234 tcp_recvmsg"),
            Some(("tcp_recvmsg_return_1234", 1234))
        );
        assert_eq!(
            ours("r4096:kprobes/tcp_recvmsg_return_1234 tcp_recvmsg"),
            None
        );
        assert_eq!(ours("p:tracerx/a_1 tcp_sendmsg"), None);
        assert_eq!(ours("r:tracer/no_pid tcp_sendmsg"), None);
        assert_eq!(ours(""), None);
    }
}
