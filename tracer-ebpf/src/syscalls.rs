//! Socket I/O from the syscall tracepoints (`syscalls:sys_exit_*`): the last-resort
//! backend, for kernels that have neither `sock:sock_{send,recv}_length` nor
//! trampolines or kprobes on `tcp_sendmsg`/`tcp_recvmsg`.
//!
//! The programs run at the end of every read, write, readv, writev, sendto,
//! recvfrom, sendmsg and recvmsg of every process, on files, pipes and terminals
//! as well as sockets: that is what makes this backend the slowest. Each one
//! follows the syscall's file descriptor to its kernel socket
//! (`task->files->fdt->fd[fd]->private_data->sk`, offsets from BTF), keeps only
//! TCP sockets and hands them to the same core as the other backends. The buffer
//! is read from the task's registers there, as for the others.
//!
//! Not seen by this backend: I/O that does not go through these eight syscalls
//! (sendmmsg/recvmmsg, sendfile, splice, io_uring).

use aya_ebpf::{
    helpers::{
        bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel,
        generated::bpf_task_pt_regs,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::data::Direction;

use crate::{config, io::socket_io};

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const IPPROTO_TCP: u16 = 6;

/// `sys_exit_write`, `sys_exit_writev`, `sys_exit_sendto`, `sys_exit_sendmsg`.
#[tracepoint]
pub fn sys_exit_send(ctx: TracePointContext) -> u32 {
    syscall_io(&ctx, Direction::Send)
}

/// `sys_exit_read`, `sys_exit_readv`, `sys_exit_recvfrom`, `sys_exit_recvmsg`.
#[tracepoint]
pub fn sys_exit_recv(ctx: TracePointContext) -> u32 {
    syscall_io(&ctx, Direction::Recv)
}

#[inline(always)]
fn syscall_io(ctx: &TracePointContext, direction: Direction) -> u32 {
    let fd = &config().fd;
    // SAFETY: the offset comes from this kernel's tracepoint format file.
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(fd.exit_ret as usize) }) else {
        return 0;
    };
    // Failed I/O is never interesting, nor is an empty write; an empty read is
    // the peer's end of stream.
    if ret < 0 || (ret == 0 && direction == Direction::Send) {
        return 0;
    }
    let ret = if ret > i32::MAX as i64 {
        i32::MAX
    } else {
        ret as i32
    };
    match tcp_socket_of_syscall(direction) {
        Some((sk, flags)) => socket_io(direction, sk, ret, flags),
        None => 0,
    }
}

/// The kernel `struct sock *` behind the current syscall's file descriptor when it
/// is a TCP socket, with the read's `MSG_*` flags (0 for writes and plain reads).
#[inline(always)]
fn tcp_socket_of_syscall(direction: Direction) -> Option<(u64, i32)> {
    let cfg = config();
    let off = &cfg.fd;
    let k = &cfg.kernel;
    if off.valid == 0 {
        return None;
    }
    // SAFETY: the helpers return the current task and its user-mode registers;
    // every read goes through bpf_probe_read_kernel, which tolerates bad
    // addresses, at offsets from this kernel's BTF.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf().cast()) as *const u8;
        if regs.is_null() {
            return None;
        }
        let nr: u64 = bpf_probe_read_kernel(regs.add(k.regs_syscall_nr as usize).cast()).ok()?;
        let fd: u64 = bpf_probe_read_kernel(regs.add(k.regs_arg1 as usize).cast()).ok()?;
        let flags: u64 = if direction == Direction::Send {
            0
        } else if nr == cfg.syscalls.recvfrom as u64 {
            bpf_probe_read_kernel(regs.add(off.regs_arg4 as usize).cast()).ok()?
        } else if nr == cfg.syscalls.recvmsg as u64 {
            bpf_probe_read_kernel(regs.add(k.regs_arg3 as usize).cast()).ok()?
        } else {
            0
        };
        let fd = fd as u32 as u64;

        // The task as a plain address: the fields below are read, not followed
        // as typed pointers.
        let task = bpf_get_current_task() as *const u8;
        let files: u64 = bpf_probe_read_kernel(task.add(off.task_files as usize).cast()).ok()?;
        if files == 0 {
            return None;
        }
        let fdt: u64 =
            bpf_probe_read_kernel((files as *const u8).add(off.files_fdt as usize).cast()).ok()?;
        if fdt == 0 {
            return None;
        }
        let fdt = fdt as *const u8;
        let max_fds: u32 = bpf_probe_read_kernel(fdt.add(off.fdt_max_fds as usize).cast()).ok()?;
        if fd >= max_fds as u64 {
            return None;
        }
        let table: u64 = bpf_probe_read_kernel(fdt.add(off.fdt_fd as usize).cast()).ok()?;
        let file: u64 = bpf_probe_read_kernel((table + fd * 8) as *const u64).ok()?;
        if file == 0 {
            return None;
        }
        let file = file as *const u8;
        let inode: u64 = bpf_probe_read_kernel(file.add(off.file_inode as usize).cast()).ok()?;
        let mode: u16 =
            bpf_probe_read_kernel((inode as *const u8).add(off.inode_mode as usize).cast()).ok()?;
        if mode & S_IFMT != S_IFSOCK {
            return None;
        }
        let socket: u64 =
            bpf_probe_read_kernel(file.add(off.file_private_data as usize).cast()).ok()?;
        let sk: u64 =
            bpf_probe_read_kernel((socket as *const u8).add(off.socket_sk as usize).cast()).ok()?;
        if sk == 0 {
            return None;
        }
        let protocol: u16 =
            bpf_probe_read_kernel((sk as *const u8).add(off.sk_protocol as usize).cast()).ok()?;
        if protocol != IPPROTO_TCP {
            return None;
        }
        Some((sk, flags as i32))
    }
}
