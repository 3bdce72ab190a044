//! Socket I/O on kernels without `sock:sock_{send,recv}_length` (before 6.3): the
//! kernel's own `tcp_sendmsg` and `tcp_recvmsg`, which every TCP write and read
//! goes through (IPv4 and IPv6, whatever the syscall), in the calling thread.
//!
//! Two ways in, chosen by the agent from what the kernel allows:
//! - fexit (BPF trampolines): one program per function sees its arguments and its
//!   return value together. No state, no limit on threads inside the function.
//! - kprobe + kretprobe: the entry keeps the socket and flags per thread, the
//!   return completes them. The kernel keeps a bounded number of return probes
//!   per function; a return it did not report shows up as an entry over an entry
//!   and is counted (`return_missed`).
//!
//! Where each argument is (`tcp_recvmsg` lost its `nonblock` parameter in 5.19)
//! comes from the running kernel's BTF: the agent loads the programs written for
//! the layout it finds, and refuses a layout it has none for.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use tracer_common::{data::Direction, stats::Counter};

use crate::{count, io::socket_io};

/// A `tcp_sendmsg`/`tcp_recvmsg` call in progress (kprobe backend), by thread.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Pending {
    sk: u64,
    flags: i32,
    direction: u32,
}

/// Threads inside `tcp_sendmsg`/`tcp_recvmsg` (kprobe backend). LRU: an entry
/// whose return was never reported ages out instead of filling the map.
#[map(name = "PENDING")]
static PENDING: LruHashMap<u64, Pending> = LruHashMap::with_max_entries(16384, 0);

/// `int tcp_sendmsg(struct sock *sk, struct msghdr *msg, size_t size)`: the return
/// value follows the three arguments.
#[fexit(function = "tcp_sendmsg")]
pub fn tcp_sendmsg_exit(ctx: FExitContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let ret: u64 = ctx.arg(3);
    socket_io(Direction::Send, sk, ret as i32, 0)
}

// `tcp_recvmsg`, one program per parameter layout: the verifier wants every
// context access at a constant offset, so the index of `flags` and of the return
// value cannot come from a variable. The agent loads the one BTF describes.

/// Linux ≥ 6.10: `tcp_recvmsg(sk, msg, len, flags)`.
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg_exit4(ctx: FExitContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(3);
    let ret: u64 = ctx.arg(4);
    socket_io(Direction::Recv, sk, ret as i32, flags as i32)
}

/// 5.19 to 6.9: `tcp_recvmsg(sk, msg, len, flags, addr_len)`.
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg_exit5(ctx: FExitContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(3);
    let ret: u64 = ctx.arg(5);
    socket_io(Direction::Recv, sk, ret as i32, flags as i32)
}

/// Before 5.19: `tcp_recvmsg(sk, msg, len, nonblock, flags, addr_len)`.
#[fexit(function = "tcp_recvmsg")]
pub fn tcp_recvmsg_exit6(ctx: FExitContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(4);
    let ret: u64 = ctx.arg(6);
    socket_io(Direction::Recv, sk, ret as i32, flags as i32)
}

#[inline(always)]
fn enter(sk: u64, flags: i32, direction: Direction) -> u32 {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: read-only lookup of a plain value.
    if unsafe { PENDING.get(key) }.is_some() {
        // This thread entered before and its return never came.
        count(Counter::ReturnMissed, 1);
    }
    let pending = Pending {
        sk,
        flags,
        direction: direction as u32,
    };
    if PENDING.insert(key, pending, 0).is_err() {
        count(Counter::ReturnMissed, 1);
    }
    0
}

#[inline(always)]
fn leave(ret: i32, direction: Direction) -> u32 {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: read-only lookup of a plain value, copied out before the removal.
    let Some(pending) = (unsafe { PENDING.get(key) }).copied() else {
        return 0;
    };
    let _ = PENDING.remove(key);
    if pending.direction != direction as u32 {
        return 0;
    }
    socket_io(direction, pending.sk, ret, pending.flags)
}

#[kprobe]
pub fn tcp_sendmsg_entry(ctx: ProbeContext) -> u32 {
    match ctx.arg::<u64>(0) {
        Some(sk) => enter(sk, 0, Direction::Send),
        None => 0,
    }
}

#[kretprobe]
pub fn tcp_sendmsg_return(ctx: RetProbeContext) -> u32 {
    leave(ctx.ret::<i64>() as i32, Direction::Send)
}

/// Linux ≥ 5.19: `flags` is the fourth argument.
#[kprobe]
pub fn tcp_recvmsg_entry(ctx: ProbeContext) -> u32 {
    match (ctx.arg::<u64>(0), ctx.arg::<u64>(3)) {
        (Some(sk), Some(flags)) => enter(sk, flags as i32, Direction::Recv),
        _ => 0,
    }
}

/// Before 5.19: `flags` is the fifth argument.
#[kprobe]
pub fn tcp_recvmsg_nonblock_entry(ctx: ProbeContext) -> u32 {
    match (ctx.arg::<u64>(0), ctx.arg::<u64>(4)) {
        (Some(sk), Some(flags)) => enter(sk, flags as i32, Direction::Recv),
        _ => 0,
    }
}

#[kretprobe]
pub fn tcp_recvmsg_return(ctx: RetProbeContext) -> u32 {
    leave(ctx.ret::<i64>() as i32, Direction::Recv)
}
