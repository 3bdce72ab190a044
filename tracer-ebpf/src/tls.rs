//! TLS plaintext: uprobes on OpenSSL's `SSL_read`/`SSL_write` and their `_ex`
//! forms, wherever the agent found a copy of OpenSSL (the system's libssl, a copy
//! bundled with a Python wheel, a copy linked into an executable).
//!
//! The entry probes keep the call's arguments per thread (`TLS_CALLS`). A socket
//! read or write the same thread makes before the call returns is the TLS
//! library's own, on the connection the `SSL*` stands for: `socket_io` notes the
//! socket in the call and sends no event for those bytes (they are ciphertext).
//! The return probe then sends the plaintext as a data event on that socket,
//! flagged `TLS`, and remembers the `SSL*`'s socket (`TLS_SOCKS`) for calls that
//! need no socket I/O (a read served from records already decrypted). A call
//! whose `SSL*` never had socket I/O inside a call (a memory BIO: Node.js,
//! Python's asyncio) cannot be placed on a connection here: its plaintext goes
//! out keyed by the `SSL*` (`flags::TLS_UNBOUND`, counted `tls_unassociated`),
//! and user space places it by the ciphertext the same thread moves beside it.
//!
//! A probe on the dynamic loader's `_dl_debug_state` (which it calls once its
//! list of loaded objects is consistent: at start-up and around each `dlopen`)
//! tells user space at once that a process may have loaded a copy of OpenSSL, so
//! that it is attached before the process's first TLS call in most cases.

use aya_ebpf::{
    bindings::BPF_RB_FORCE_WAKEUP,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use tracer_common::{
    MAX_CAPTURE,
    conn::IGNORED_NOT_DECODED,
    data::{DataEvent, DataHeader, Direction, flags},
    event::{EventHeader, EventKind},
    stats::Counter,
};

use crate::{
    CLOSED, EVENTS, SCRATCH, SOCKS, config, count, excluded_pid, header, header_without_comm,
    io::{announce, copy_contiguous},
    now_ns,
};

/// One `SSL_read`/`SSL_write` call in progress on a thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    ssl: u64,
    buf: u64,
    /// `_ex` forms: where the function writes the bytes it moved.
    out_len: u64,
    /// The socket the TLS library read or wrote inside this call, 0 if none yet.
    pub sock: u64,
    /// A [`Direction`] as `u32`.
    direction: u32,
    /// 1 for the `_ex` forms (return 1 on success, length through `out_len`).
    ex: u32,
}

/// The socket of an `SSL*` in a process.
#[repr(C)]
#[derive(Clone, Copy)]
struct TlsKey {
    tgid: u32,
    _pad: u32,
    ssl: u64,
}

/// Calls in progress, by thread (`pid_tgid`). An LRU: a thread that dies inside
/// a call leaves an entry that nothing else would remove.
#[map(name = "TLS_CALLS")]
pub static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// `SSL*` → socket, learned from the socket I/O inside a call. An LRU: an entry
/// pushed out is learned again at the `SSL*`'s next call with socket I/O; until
/// then its buffered reads are counted as `tls_unassociated`.
#[map(name = "TLS_SOCKS")]
static TLS_SOCKS: LruHashMap<TlsKey, u64> = LruHashMap::with_max_entries(65536, 0);

#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Send, false)
}

#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Send, true)
}

#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Recv, false)
}

#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    enter(&ctx, Direction::Recv, true)
}

/// The dynamic loader's `_dl_debug_state`: this process's loaded objects changed.
#[uprobe]
pub fn dl_debug_state(_ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if excluded_pid(tgid) {
        return 0;
    }
    let event = header(EventKind::LibsLoaded, tgid, pid_tgid as u32, 0, now_ns());
    // Woken at once: the process may be about to use what it loaded.
    match EVENTS.output::<EventHeader>(&event, BPF_RB_FORCE_WAKEUP as u64) {
        Ok(()) => count(Counter::EventsSent, 1),
        Err(_) => count(Counter::RingbufFull, 1),
    }
    0
}

/// Attached to the return of all four functions.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    leave(&ctx);
    0
}

#[inline(always)]
fn enter(ctx: &ProbeContext, direction: Direction, ex: bool) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if excluded_pid((pid_tgid >> 32) as u32) {
        return 0;
    }
    let call = TlsCall {
        ssl: ctx.arg::<u64>(0).unwrap_or(0),
        buf: ctx.arg::<u64>(1).unwrap_or(0),
        out_len: if ex {
            ctx.arg::<u64>(3).unwrap_or(0)
        } else {
            0
        },
        sock: 0,
        direction: direction as u32,
        ex: u32::from(ex),
    };
    let _ = TLS_CALLS.insert(pid_tgid, call, 0);
    0
}

#[inline(always)]
fn leave(ctx: &RetProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: a plain value copied out of the map.
    let Some(call) = (unsafe { TLS_CALLS.get(pid_tgid) }).copied() else {
        return;
    };
    let _ = TLS_CALLS.remove(pid_tgid);
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // Both forms return an int.
    let ret = ctx.ret::<u64>() as i32;
    let moved: u64 = if call.ex != 0 {
        if ret == 1 {
            // SAFETY: user memory read through the helper.
            unsafe { bpf_probe_read_user(call.out_len as *const u64) }.unwrap_or(0)
        } else {
            0
        }
    } else if ret > 0 {
        ret as u64
    } else {
        0
    };
    let key = TlsKey {
        tgid,
        _pad: 0,
        ssl: call.ssl,
    };
    let sock = if call.sock != 0 {
        let _ = TLS_SOCKS.insert(key, call.sock, 0);
        call.sock
    } else {
        // SAFETY: a plain value copied out of the map.
        match unsafe { TLS_SOCKS.get(key) } {
            Some(s) => *s,
            None => {
                if moved > 0 {
                    count(Counter::TlsUnassociated, 1);
                    send_plaintext(
                        &call,
                        call.ssl,
                        moved,
                        pid_tgid,
                        flags::TLS_UNBOUND | WITH_COMM,
                    );
                }
                return;
            }
        }
    };
    if moved == 0 {
        return;
    }
    plaintext(&call, sock, moved, tgid, tid);
}

/// Sends `moved` bytes of plaintext as a data event on `sock`, unless the kernel
/// no longer follows it or user space stopped decoding it. Out of line, like the
/// socket programs' helpers, so that the frames of the call chain stay within the
/// 512-byte stack of kernels before 6.13.
#[inline(never)]
fn plaintext(call: &TlsCall, sock: u64, moved: u64, tgid: u32, tid: u32) {
    let Some(info) = SOCKS.get_ptr_mut(sock).or_else(|| CLOSED.get_ptr_mut(sock)) else {
        // The kernel no longer follows the socket (its map was full when it
        // started): nothing of it reaches user space.
        return;
    };
    // SAFETY: pointer from a successful lookup; the map value outlives this run.
    let info = unsafe { &mut *info };
    if info.ignored != 0 {
        count(
            if info.ignored == IGNORED_NOT_DECODED {
                Counter::NotDecoded
            } else {
                Counter::Filtered
            },
            1,
        );
        return;
    }
    if info.announced == 0 {
        info.announced = 1;
        info.tgid = tgid;
        announce(info, tgid, tid, sock);
    }
    let owner_changed = info.tgid != tgid;
    if owner_changed {
        info.tgid = tgid;
    }
    let pid_tgid = (u64::from(tgid) << 32) | u64::from(tid);
    send_plaintext(
        call,
        sock,
        moved,
        pid_tgid,
        if owner_changed { WITH_COMM } else { 0 },
    );
}

/// In `send_plaintext`'s `extra`: send the thread's name too (not a data flag).
const WITH_COMM: u32 = 1 << 31;

/// Sends `moved` bytes of plaintext (a bounded prefix of `call.buf`) as a data
/// event keyed by `key` (a socket, or the `SSL*` with `flags::TLS_UNBOUND` in
/// `extra`), with the thread's name when `extra` has [`WITH_COMM`]. (BPF
/// functions take at most five arguments.)
#[inline(never)]
fn send_plaintext(call: &TlsCall, key: u64, moved: u64, pid_tgid: u64, extra: u32) {
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    let with_comm = extra & WITH_COMM != 0;
    let extra_flags = extra & !WITH_COMM;
    let Some(event) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, used only by this program run.
    let event = unsafe { &mut *event };
    let now = now_ns();
    let total = if moved > u32::MAX as u64 {
        u32::MAX
    } else {
        moved as u32
    };
    event.hdr = DataHeader {
        header: if with_comm {
            header(EventKind::Data, tgid, tid, key, now)
        } else {
            header_without_comm(EventKind::Data, tgid, tid, key, now)
        },
        direction: call.direction,
        syscall: 0,
        total_len: total,
        captured_len: 0,
        flags: flags::TLS | extra_flags,
        _pad: 0,
    };
    let mut want = config().capture_bytes as usize;
    if want > MAX_CAPTURE {
        want = MAX_CAPTURE;
    }
    if want as u64 > moved {
        want = moved as usize;
    }
    if !copy_contiguous(event, call.buf, want) {
        event.hdr.flags |= flags::UNREADABLE;
        count(Counter::PayloadUnreadable, 1);
    }
    let captured = event.hdr.captured_len as usize;
    if (captured as u64) < moved {
        event.hdr.flags |= flags::TRUNCATED;
        count(Counter::PayloadTruncated, 1);
    }
    count(Counter::BytesCaptured, captured as u64);
    let len = core::mem::size_of::<DataHeader>() + (captured & (MAX_CAPTURE * 2 - 1));
    // SAFETY: `len` is at most the size of the scratch event.
    let bytes = unsafe {
        core::slice::from_raw_parts(
            (event as *const DataEvent).cast::<u8>(),
            len.min(core::mem::size_of::<DataEvent>()),
        )
    };
    match EVENTS.output::<[u8]>(bytes, crate::wakeup_flags()) {
        Ok(()) => count(Counter::EventsSent, 1),
        Err(_) => count(Counter::RingbufFull, 1),
    }
}
