//! Socket I/O: `sock:sock_send_length` and `sock:sock_recv_length` (Linux ≥ 6.3),
//! and the shared core every capture backend feeds ([`socket_io`]; the others are
//! in `tcp_functions.rs`).
//!
//! Both tracepoints fire at the end of `sock_sendmsg`/`sock_recvmsg` in the calling thread, for
//! every socket write and read whatever the syscall (write, send, sendto, sendmsg,
//! writev and their read counterparts). The syscall's number and arguments are in the
//! task's user `pt_regs`, so the user buffer can be read without hooking syscalls.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_probe_read_kernel,
        bpf_probe_read_user, generated::bpf_probe_read_user as probe_read_user_raw,
        generated::bpf_task_pt_regs,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{
    MAX_CAPTURE,
    conn::{AF_INET, AF_INET6, ConnEvent, IGNORED_NOT_DECODED, Role, SockInfo, Tuple},
    data::{DataEvent, DataHeader, Direction, flags},
    event::EventKind,
    stats::Counter,
};

use crate::{
    CLOSED, EVENTS, IOVECS, SCRATCH, SOCKS, config, count, emit, excluded_pid, excluded_ports,
    header, header_without_comm, now_ns,
};

const IPPROTO_TCP: u16 = 6;
const MSG_PEEK: i32 = 2;
const TCP_CLOSE: u8 = 7;
/// iovecs looked at per readv/writev/sendmsg/recvmsg.
const MAX_IOVECS: u32 = 8;
const MASK: usize = MAX_CAPTURE - 1;

#[tracepoint]
pub fn sock_send_length(ctx: TracePointContext) -> u32 {
    match try_io(&ctx, Direction::Send) {
        Ok(v) | Err(v) => v,
    }
}

#[tracepoint]
pub fn sock_recv_length(ctx: TracePointContext) -> u32 {
    match try_io(&ctx, Direction::Recv) {
        Ok(v) | Err(v) => v,
    }
}

fn try_io(ctx: &TracePointContext, direction: Direction) -> Result<u32, u32> {
    let tp = &config().tp;
    // SAFETY: offsets come from this kernel's tracepoint format file.
    let ret: i32 = unsafe { ctx.read_at(tp.len_ret as usize) }.map_err(|_| 1u32)?;
    if ret < 0 || (ret == 0 && direction == Direction::Send) {
        return Ok(0);
    }
    // SAFETY: as above.
    let protocol: u16 = unsafe { ctx.read_at(tp.len_protocol as usize) }.map_err(|_| 1u32)?;
    if protocol != IPPROTO_TCP {
        return Ok(0);
    }
    let flags: i32 = if direction == Direction::Recv {
        // SAFETY: as above.
        unsafe { ctx.read_at(tp.len_flags as usize) }.map_err(|_| 1u32)?
    } else {
        0
    };
    // SAFETY: as above.
    let sk: u64 = unsafe { ctx.read_at(tp.len_sk as usize) }.map_err(|_| 1u32)?;
    Ok(socket_io(direction, sk, ret, flags))
}

/// One finished TCP socket write or read of `ret` bytes on kernel socket `sk`, in
/// the calling thread: what every capture backend reports (`flags` are the read's
/// `MSG_*` flags, 0 for writes). Not inlined: each backend's programs stay a thin
/// frame over it, within the verifier's 512-byte stack for a chain of calls.
#[inline(never)]
pub(crate) fn socket_io(direction: Direction, sk: u64, ret: i32, flags: i32) -> u32 {
    match socket_io_inner(direction, sk, ret, flags) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn socket_io_inner(direction: Direction, sk: u64, ret: i32, flags: i32) -> Result<u32, u32> {
    let cfg = config();
    // A read of 0 bytes is the peer's end of stream: it resumes whoever waited for
    // it, which the agent's causality wants to know. Failed I/O is never interesting.
    if ret < 0 || (ret == 0 && direction == Direction::Send) {
        return Ok(0);
    }
    if direction == Direction::Recv && flags & MSG_PEEK != 0 {
        // The same bytes will be read again without MSG_PEEK.
        return Ok(0);
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    if excluded_pid(tgid) {
        count(Counter::Filtered, 1);
        return Ok(0);
    }

    let info = match SOCKS.get_ptr_mut(sk).or_else(|| CLOSED.get_ptr_mut(sk)) {
        Some(p) => p,
        None if ret == 0 => return Ok(0),
        None => adopt_socket(sk).ok_or(0u32)?,
    };
    // SAFETY: pointer from a successful lookup or insert; the map value outlives this program run.
    let info = unsafe { &mut *info };
    // Inside a TLS library's read or write (see `tls.rs`): these bytes are its
    // ciphertext. The call learns its socket; its return sends the plaintext.
    let in_tls = match crate::tls::TLS_CALLS.get_ptr_mut(pid_tgid) {
        Some(call) => {
            // SAFETY: pointer from a successful lookup, this thread's own entry.
            unsafe { (*call).sock = sk };
            true
        }
        None => false,
    };
    if info.ignored != 0 {
        let why = if info.ignored == IGNORED_NOT_DECODED {
            Counter::NotDecoded
        } else {
            Counter::Filtered
        };
        count(why, 1);
        return Ok(0);
    }
    let now = now_ns();
    if ret == 0 {
        // End of stream on a connection user space follows: a bare header.
        if info.announced == 0 {
            return Ok(0);
        }
        emit_eof(direction, tgid, tid, sk, now);
        return Ok(0);
    }
    if info.announced == 0 {
        info.announced = 1;
        info.tgid = tgid;
        announce(info, tgid, tid, sk);
    }
    if in_tls {
        return Ok(0);
    }
    // The thread's name goes out with the socket's first event (above) and again
    // only when another process uses the socket: user space keeps it per connection.
    let owner_changed = info.tgid != tgid;
    if owner_changed {
        info.tgid = tgid;
    }

    let event = SCRATCH.get_ptr_mut(0).ok_or(0u32)?;
    // SAFETY: per-CPU scratch slot, used only by this program run.
    let event = unsafe { &mut *event };
    event.hdr = DataHeader {
        header: if owner_changed {
            header(EventKind::Data, tgid, tid, sk, now)
        } else {
            header_without_comm(EventKind::Data, tgid, tid, sk, now)
        },
        direction: direction as u32,
        syscall: 0,
        total_len: ret as u32,
        captured_len: 0,
        flags: 0,
        _pad: 0,
    };
    let mut want = cfg.capture_bytes as usize;
    if want > MAX_CAPTURE {
        want = MAX_CAPTURE;
    }
    if want > ret as usize {
        want = ret as usize;
    }
    capture(event, want);
    let captured = event.hdr.captured_len as usize;
    if captured < ret as usize && event.hdr.flags & flags::NO_USER_BUFFER == 0 {
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
    Ok(0)
}

// The helpers below are kept out of line: each builds an event on its own stack
// frame, off the call chain that copies the payload (`capture`), so that the
// chain's frames stay within the verifier's 512 bytes on kernels without private
// BPF stacks (before 6.13).

/// End of stream on a connection user space follows: a bare header.
#[inline(never)]
fn emit_eof(direction: Direction, tgid: u32, tid: u32, sk: u64, now: u64) {
    let eof = DataHeader {
        header: header_without_comm(EventKind::Data, tgid, tid, sk, now),
        direction: direction as u32,
        syscall: 0,
        total_len: 0,
        captured_len: 0,
        flags: 0,
        _pad: 0,
    };
    emit(&eof);
}

/// The connection's first event: its tuple and role, with the thread's name.
#[inline(never)]
pub(crate) fn announce(info: &SockInfo, tgid: u32, tid: u32, sk: u64) {
    let open = ConnEvent {
        header: header(EventKind::ConnOpen, tgid, tid, sk, info.opened_ns),
        tuple: info.tuple,
        role: info.role,
        old_state: 0,
    };
    emit(&open);
}

/// A socket seen doing I/O without having been seen established: it existed before
/// the agent started. Its tuple is read from `struct sock_common` with offsets from BTF.
#[inline(never)]
fn adopt_socket(sk: u64) -> Option<*mut SockInfo> {
    let k = &config().kernel;
    if k.have_sock_offsets == 0 {
        return None;
    }
    let base = sk as *const u8;
    // SAFETY: `sk` is the kernel's `struct sock *` from the tracepoint; every read
    // goes through bpf_probe_read_kernel, which tolerates bad addresses.
    let tuple = unsafe {
        let family: u16 = bpf_probe_read_kernel(base.add(k.skc_family as usize).cast()).ok()?;
        let mut t = Tuple {
            family,
            ..Tuple::default()
        };
        t.local_port = bpf_probe_read_kernel(base.add(k.skc_num as usize).cast::<u16>()).ok()?;
        t.remote_port =
            u16::from_be(bpf_probe_read_kernel(base.add(k.skc_dport as usize).cast::<u16>()).ok()?);
        if family == AF_INET {
            let l: [u8; 4] =
                bpf_probe_read_kernel(base.add(k.skc_rcv_saddr as usize).cast()).ok()?;
            let r: [u8; 4] = bpf_probe_read_kernel(base.add(k.skc_daddr as usize).cast()).ok()?;
            t.local_addr[..4].copy_from_slice(&l);
            t.remote_addr[..4].copy_from_slice(&r);
        } else if family == AF_INET6 {
            t.local_addr =
                bpf_probe_read_kernel(base.add(k.skc_v6_rcv_saddr as usize).cast()).ok()?;
            t.remote_addr = bpf_probe_read_kernel(base.add(k.skc_v6_daddr as usize).cast()).ok()?;
        } else {
            return None;
        }
        t
    };
    let info = SockInfo {
        tuple,
        role: Role::Unknown as u32,
        tgid: 0,
        opened_ns: now_ns(),
        announced: 0,
        ignored: u32::from(excluded_ports(tuple.local_port, tuple.remote_port)),
    };
    if SOCKS.insert(sk, info, 0).is_err() {
        count(Counter::SockMapFull, 1);
        return None;
    }
    let p = SOCKS.get_ptr_mut(sk)?;
    // `SOCKS` is not an LRU: an entry leaves it only at TCP_CLOSE. A socket closed
    // already (a read finishing after a reset), or on another CPU since the insert,
    // had its TCP_CLOSE find nothing to remove: it goes where closed ones go. Looked
    // at after the insert, so that no close falls between the look and the insert.
    // The entry is copied from the map's own memory (the combined stack of the
    // programs that get here is at its limit on kernels before 6.13).
    if socket_state(base) == Some(TCP_CLOSE) {
        // SAFETY: pointer from a successful lookup.
        let _ = CLOSED.insert(sk, unsafe { &*p }, 0);
        let _ = SOCKS.remove(sk);
        return CLOSED.get_ptr_mut(sk);
    }
    Some(p)
}

/// `sk->__sk_common.skc_state`, when it can be read.
#[inline(always)]
fn socket_state(base: *const u8) -> Option<u8> {
    let k = &config().kernel;
    // SAFETY: read through bpf_probe_read_kernel, which tolerates bad addresses.
    unsafe { bpf_probe_read_kernel(base.add(k.skc_state as usize).cast::<u8>()).ok() }
}

/// Copies up to `want` bytes of the syscall's user buffer into `event.payload`.
fn capture(event: &mut DataEvent, want: usize) {
    let cfg = config();
    let k = &cfg.kernel;
    let sc = &cfg.syscalls;
    // SAFETY: the helpers return the current task and its user-mode registers; the
    // registers are read with bpf_probe_read_kernel at offsets from BTF.
    let (nr, arg2, arg3) = unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task.cast()) as *const u8;
        if regs.is_null() {
            event.hdr.flags |= flags::UNREADABLE;
            count(Counter::PayloadUnreadable, 1);
            return;
        }
        let nr: u64 =
            bpf_probe_read_kernel(regs.add(k.regs_syscall_nr as usize).cast()).unwrap_or(u64::MAX);
        let a2: u64 = bpf_probe_read_kernel(regs.add(k.regs_arg2 as usize).cast()).unwrap_or(0);
        let a3: u64 = bpf_probe_read_kernel(regs.add(k.regs_arg3 as usize).cast()).unwrap_or(0);
        (nr, a2, a3)
    };
    let nr32 = nr as u32;
    event.hdr.syscall = nr32;
    if nr > u32::MAX as u64 {
        event.hdr.flags |= flags::NO_USER_BUFFER;
        return;
    }
    let ok = if nr32 == sc.read || nr32 == sc.write || nr32 == sc.sendto || nr32 == sc.recvfrom {
        copy_contiguous(event, arg2, want)
    } else if nr32 == sc.readv || nr32 == sc.writev {
        copy_iovecs(event, arg2, arg3, want)
    } else if nr32 == sc.sendmsg || nr32 == sc.recvmsg {
        // struct user_msghdr: msg_iov at 16, msg_iovlen at 24 (UAPI, all 64-bit arches).
        // SAFETY: user memory read through the helper.
        let iov: Option<u64> = unsafe { bpf_probe_read_user((arg2 + 16) as *const u64).ok() };
        let cnt: Option<u64> = unsafe { bpf_probe_read_user((arg2 + 24) as *const u64).ok() };
        match (iov, cnt) {
            (Some(iov), Some(cnt)) => copy_iovecs(event, iov, cnt, want),
            _ => false,
        }
    } else {
        event.hdr.flags |= flags::NO_USER_BUFFER;
        return;
    };
    if !ok {
        event.hdr.flags |= flags::UNREADABLE;
        count(Counter::PayloadUnreadable, 1);
    }
}

#[inline(always)]
pub(crate) fn copy_contiguous(event: &mut DataEvent, src: u64, want: usize) -> bool {
    let n = bounded(want);
    // SAFETY: destination is the scratch payload (n ≤ MAX_CAPTURE ≤ its size); the
    // source is user memory read through the helper.
    let rc = unsafe {
        probe_read_user_raw(event.payload.as_mut_ptr().cast(), n as u32, src as *const _)
    };
    if rc == 0 {
        event.hdr.captured_len = n as u32;
        true
    } else {
        false
    }
}

fn copy_iovecs(event: &mut DataEvent, iov: u64, cnt: u64, want: usize) -> bool {
    let n = if cnt > MAX_IOVECS as u64 {
        MAX_IOVECS as usize
    } else {
        cnt as usize
    };
    if n == 0 {
        return true;
    }
    // struct iovec { void *iov_base; size_t iov_len; }: the entries looked at are
    // read in one go, into per-CPU scratch rather than the stack.
    let Some(vecs) = IOVECS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU scratch slot, used only by this program run.
    let vecs = unsafe { &mut *vecs };
    // 16 to 128 bytes, in a form the verifier can bound (n is 1..=8).
    let size = (((n - 1) & (MAX_IOVECS as usize - 1)) + 1) * 16;
    // SAFETY: destination is the local array (size checked); source is user memory
    // read through the helper.
    let rc = unsafe { probe_read_user_raw(vecs.as_mut_ptr().cast(), size as u32, iov as *const _) };
    if rc != 0 {
        return false;
    }
    let mut off: usize = 0;
    let mut i: usize = 0;
    while i < MAX_IOVECS as usize {
        if i >= n || off >= want {
            break;
        }
        let base = vecs[(2 * i) & (2 * MAX_IOVECS as usize - 1)];
        let len = vecs[(2 * i + 1) & (2 * MAX_IOVECS as usize - 1)];
        // Laundered so that the compiler keeps `bounded`'s clamp, which the verifier
        // needs: it cannot follow `off < want` through this loop.
        // SAFETY: a plain read of a local.
        let room = unsafe { core::ptr::read_volatile(&(want - off)) };
        let take = bounded(if (len as usize) < room {
            len as usize
        } else {
            room
        });
        // Laundered too, so that the mask survives: older verifiers (6.1) cannot
        // bound the running sum otherwise.
        // SAFETY: a plain read of a local.
        let at = unsafe { core::ptr::read_volatile(&off) } & MASK;
        // SAFETY: at ≤ MAX_CAPTURE-1 and take ≤ MAX_CAPTURE, inside the 2×MAX_CAPTURE payload.
        let rc = unsafe {
            probe_read_user_raw(
                event.payload.as_mut_ptr().add(at).cast(),
                take as u32,
                base as *const _,
            )
        };
        if rc != 0 {
            return off > 0;
        }
        off += take;
        event.hdr.captured_len = off as u32;
        i += 1;
    }
    true
}

/// Clamps a length to `[0, MAX_CAPTURE]` in a way every supported verifier can
/// follow: a 32-bit value (never negative to the verifier), laundered so that the
/// compiler keeps the comparison as written.
#[inline(always)]
fn bounded(n: usize) -> usize {
    let n = if n > MAX_CAPTURE {
        MAX_CAPTURE as u32
    } else {
        n as u32
    };
    // SAFETY: a plain read of a local.
    let n = unsafe { core::ptr::read_volatile(&n) };
    (if n > MAX_CAPTURE as u32 {
        MAX_CAPTURE as u32
    } else {
        n
    }) as usize
}
