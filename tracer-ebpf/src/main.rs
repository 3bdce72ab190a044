//! tracer's kernel programs.
//!
//! Attach points (see docs/kernel-probes.md for the measured costs):
//! - `sock:inet_sock_set_state`: connection lifecycle, 4-tuple and role.
//! - `sock:sock_send_length` / `sock:sock_recv_length` (Linux ≥ 6.3): every socket
//!   write/read, in the calling thread; the syscall's user buffer is found through
//!   the task's `pt_regs` and a bounded prefix of it is copied out.
//! - Where those are missing, the same from the kernel functions `tcp_sendmsg` /
//!   `tcp_recvmsg`, by fexit or by kprobe + kretprobe (`tcp_functions.rs`). The agent
//!   loads one of the capture backends.
//! - As a last resort, the syscall tracepoints `syscalls:sys_exit_{read,write,…}`,
//!   following each syscall's file descriptor to its socket (`syscalls.rs`).
//! - `sched:sched_process_exit`: process exits, so user space can forget processes.
//! - Uprobes on OpenSSL's `SSL_read`/`SSL_write` (and `_ex`), in every copy of
//!   OpenSSL the agent finds: TLS plaintext on the same connections (`tls.rs`).
//!
//! Nothing but TCP socket I/O and process exits reaches user space.
#![no_std]
#![no_main]

mod io;
mod lifecycle;
mod syscalls;
mod tcp_functions;
mod tls;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_comm, bpf_get_smp_processor_id, bpf_ktime_get_boot_ns},
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    config::KernelConfig,
    conn::SockInfo,
    data::DataEvent,
    event::{EventHeader, EventKind},
    stats::{COUNTERS, Counter},
};

/// Default ring buffer size; the agent overrides it at load time.
const RINGBUF_BYTES: u32 = 8 << 20;
/// Default number of followed sockets; the agent overrides it at load time.
const MAX_SOCKS: u32 = tracer_common::MAX_SOCKETS;

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(RINGBUF_BYTES, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

/// Followed sockets, by `struct sock *`. A plain hash map, not an LRU: a live
/// socket is never pushed out (it would come back mid-stream, its role and pool
/// lost). Entries leave at TCP_CLOSE; when the map is full a new socket is not
/// followed and each refused insert counts as `sock_map_full`.
#[map(name = "SOCKS")]
static SOCKS: HashMap<u64, SockInfo> = HashMap::with_max_entries(MAX_SOCKS, 0);

/// Sockets followed until they reached `TCP_CLOSE`, for the records of syscalls
/// still running then (a send during which the peer's reset closed the socket is
/// reported after the close, and the closed socket has lost its local port). Kept
/// apart so that closed sockets never push live ones out of `SOCKS`.
#[map(name = "CLOSED")]
static CLOSED: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(4096, 0);

#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<DataEvent> = PerCpuArray::with_max_entries(1, 0);

/// Room for the iovecs of one readv/writev/sendmsg/recvmsg (see `io.rs`).
#[map(name = "IOVECS")]
static IOVECS: PerCpuArray<[u64; 16]> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "FILTER_PIDS")]
static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

#[map(name = "FILTER_PORTS")]
static FILTER_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// Written by the agent before load (`override_global`); zero means "not configured".
#[unsafe(no_mangle)]
static CONFIG: KernelConfig = unsafe { core::mem::zeroed() };

/// The configuration, read so that the compiler cannot fold the zeroed initialiser.
#[inline(always)]
fn config() -> &'static KernelConfig {
    // SAFETY: CONFIG is a read-only global; the volatile read of its address keeps
    // the loads from being constant-folded against the zero initialiser.
    unsafe { &*core::ptr::read_volatile(&&raw const CONFIG) }
}

#[inline(always)]
fn count(counter: Counter, n: u64) {
    if let Some(p) = STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += n };
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// An event header with the current thread's name (none for kernel context).
#[inline(always)]
fn header(kind: EventKind, tgid: u32, tid: u32, sock: u64, ts_ns: u64) -> EventHeader {
    let mut h = header_without_comm(kind, tgid, tid, sock, ts_ns);
    if tgid != 0 {
        h.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    }
    h
}

/// A header without the thread's name (user space keeps it per connection; see
/// `io.rs`): reading it is a tenth of the I/O program's cost.
#[inline(always)]
fn header_without_comm(kind: EventKind, tgid: u32, tid: u32, sock: u64, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        // SAFETY: plain helper call.
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns,
        tgid,
        tid,
        sock,
        comm: [0; 16],
    }
}

/// Ring buffer output flags: wake the reader only when enough data waits; below
/// that it polls on a timer, so a busy server does not pay a wakeup per event.
#[inline(always)]
fn wakeup_flags() -> u64 {
    let threshold = config().wakeup_bytes as u64;
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Writes a fixed-size event to the ring buffer, counting the outcome.
#[inline(always)]
fn emit<T: 'static>(event: &T) {
    match EVENTS.output::<T>(event, wakeup_flags()) {
        Ok(()) => count(Counter::EventsSent, 1),
        Err(_) => count(Counter::RingbufFull, 1),
    }
}

/// True when the `--pid`/`--port` filters or the agent's own pid exclude this I/O.
#[inline(always)]
fn excluded_pid(tgid: u32) -> bool {
    let cfg = config();
    if tgid == cfg.agent_tgid {
        return true;
    }
    // SAFETY: read-only lookup of a plain value.
    cfg.filter_pids != 0 && unsafe { FILTER_PIDS.get(tgid) }.is_none()
}

#[inline(always)]
fn excluded_ports(local: u16, remote: u16) -> bool {
    config().filter_ports != 0
        // SAFETY: read-only lookups of plain values.
        && unsafe { FILTER_PORTS.get(local) }.is_none()
        && unsafe { FILTER_PORTS.get(remote) }.is_none()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// The benchmark floor (`--empty-probes`): attached to every tracepoint the agent
/// uses, does nothing. What any tracepoint-based agent costs at least.
#[aya_ebpf::macros::tracepoint]
pub fn empty_probe(_ctx: aya_ebpf::programs::TracePointContext) -> u32 {
    0
}

/// The benchmark floor of the fexit backend, one per function (an fexit program
/// is bound to one function).
#[aya_ebpf::macros::fexit(function = "tcp_sendmsg")]
pub fn empty_fexit_send(_ctx: aya_ebpf::programs::FExitContext) -> u32 {
    0
}

#[aya_ebpf::macros::fexit(function = "tcp_recvmsg")]
pub fn empty_fexit_recv(_ctx: aya_ebpf::programs::FExitContext) -> u32 {
    0
}

/// The benchmark floor of the kprobe backend.
#[aya_ebpf::macros::kprobe]
pub fn empty_kprobe(_ctx: aya_ebpf::programs::ProbeContext) -> u32 {
    0
}

#[aya_ebpf::macros::kretprobe]
pub fn empty_kretprobe(_ctx: aya_ebpf::programs::RetProbeContext) -> u32 {
    0
}
