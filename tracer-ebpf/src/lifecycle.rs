//! Connection and process lifecycle: `sock:inet_sock_set_state`, `sched:sched_process_exit`.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};
use tracer_common::{
    conn::{AF_INET, AF_INET6, ConnEvent, Role, SockInfo, TCP_CLOSE_WAIT, TCP_FIN_WAIT1, Tuple},
    event::EventKind,
    stats::Counter,
};

use crate::{CLOSED, SOCKS, config, count, emit, excluded_ports, header, now_ns};

const IPPROTO_TCP: u16 = 6;
const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const TCP_CLOSE: i32 = 7;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    match try_inet_sock_set_state(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<u32, u32> {
    let tp = &config().tp;
    // SAFETY: offsets come from this kernel's tracepoint format file.
    let read = |off: u16| -> Result<i32, u32> {
        unsafe { ctx.read_at::<i32>(off as usize) }.map_err(|_| 1u32)
    };
    // SAFETY: as above.
    let protocol: u16 = unsafe { ctx.read_at(tp.state_protocol as usize) }.map_err(|_| 1u32)?;
    if protocol != IPPROTO_TCP {
        return Ok(0);
    }
    // SAFETY: as above.
    let sk: u64 = unsafe { ctx.read_at(tp.state_skaddr as usize) }.map_err(|_| 1u32)?;
    let old = read(tp.state_oldstate)?;
    let new = read(tp.state_newstate)?;

    match new {
        TCP_SYN_SENT => {
            // connect() runs in the calling process: remember who is connecting.
            let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
            if tgid == config().agent_tgid {
                return Ok(0);
            }
            let info = SockInfo {
                tuple: Tuple::default(),
                role: Role::Client as u32,
                tgid,
                opened_ns: now_ns(),
                announced: 0,
                ignored: 0,
            };
            // The address may be a closed socket's, reused.
            let _ = CLOSED.remove(sk);
            if SOCKS.insert(sk, info, 0).is_err() {
                count(Counter::SockMapFull, 1);
            }
        }
        TCP_ESTABLISHED => {
            // The address may be a closed socket's, reused.
            let _ = CLOSED.remove(sk);
            // Runs in softirq context: the current task is not the socket's owner.
            let tuple = read_tuple(ctx)?;
            if tuple.family != AF_INET && tuple.family != AF_INET6 {
                return Ok(0);
            }
            let (role, tgid, opened_ns) = match SOCKS.get_ptr(sk) {
                // SAFETY: pointer from a successful lookup.
                Some(p) => unsafe { ((*p).role, (*p).tgid, (*p).opened_ns) },
                None if old == TCP_SYN_RECV => (Role::Server as u32, 0, now_ns()),
                // A SYN_SENT we never saw (agent's own, or map full): not followed.
                None => return Ok(0),
            };
            // Excluded sockets stay in the map, marked, so their I/O is skipped after one lookup.
            let ignored = u32::from(excluded_ports(tuple.local_port, tuple.remote_port));
            let role = if old == TCP_SYN_SENT || old == TCP_SYN_RECV {
                role
            } else {
                Role::Unknown as u32
            };
            let info = SockInfo {
                tuple,
                role,
                tgid,
                opened_ns,
                announced: 0,
                ignored,
            };
            if SOCKS.insert(sk, info, 0).is_err() {
                count(Counter::SockMapFull, 1);
            }
        }
        // The first FIN of an established connection, either way: when a client
        // gave up waiting, or a server closed without answering.
        n if old == TCP_ESTABLISHED
            && (n as u32 == TCP_FIN_WAIT1 || n as u32 == TCP_CLOSE_WAIT) =>
        {
            let Some(p) = SOCKS.get_ptr(sk) else {
                return Ok(0);
            };
            // SAFETY: pointer from a successful lookup.
            let info = unsafe { *p };
            if info.announced == 0 || info.ignored != 0 {
                return Ok(0);
            }
            let event = ConnEvent {
                header: header(EventKind::ConnEnding, 0, 0, sk, now_ns()),
                tuple: info.tuple,
                role: info.role,
                old_state: n as u32,
            };
            emit(&event);
        }
        TCP_CLOSE => {
            let Some(p) = SOCKS.get_ptr(sk) else {
                return Ok(0);
            };
            // SAFETY: pointer from a successful lookup.
            let info = unsafe { *p };
            let _ = SOCKS.remove(sk);
            if info.announced == 0 {
                return Ok(0);
            }
            let _ = CLOSED.insert(sk, info, 0);
            let event = ConnEvent {
                header: header(EventKind::ConnClose, 0, 0, sk, now_ns()),
                tuple: info.tuple,
                role: info.role,
                old_state: old as u32,
            };
            emit(&event);
        }
        _ => {}
    }
    Ok(0)
}

fn read_tuple(ctx: &TracePointContext) -> Result<Tuple, u32> {
    let tp = &config().tp;
    // SAFETY: offsets come from this kernel's tracepoint format file.
    unsafe {
        let family: u16 = ctx.read_at(tp.state_family as usize).map_err(|_| 1u32)?;
        let local_port: u16 = ctx.read_at(tp.state_sport as usize).map_err(|_| 1u32)?;
        let remote_port: u16 = ctx.read_at(tp.state_dport as usize).map_err(|_| 1u32)?;
        let mut tuple = Tuple {
            local_port,
            remote_port,
            family,
            ..Tuple::default()
        };
        if family == AF_INET {
            let s: [u8; 4] = ctx.read_at(tp.state_saddr as usize).map_err(|_| 1u32)?;
            let d: [u8; 4] = ctx.read_at(tp.state_daddr as usize).map_err(|_| 1u32)?;
            tuple.local_addr[..4].copy_from_slice(&s);
            tuple.remote_addr[..4].copy_from_slice(&d);
        } else {
            tuple.local_addr = ctx.read_at(tp.state_saddr_v6 as usize).map_err(|_| 1u32)?;
            tuple.remote_addr = ctx.read_at(tp.state_daddr_v6 as usize).map_err(|_| 1u32)?;
        }
        Ok(tuple)
    }
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // Only the thread group leader's exit ends the process.
    if tgid != tid || crate::excluded_pid(tgid) {
        return 0;
    }
    emit(&header(EventKind::ProcExit, tgid, tid, 0, now_ns()));
    0
}
