//! Configuration handed to the kernel programs at load time, as one global.
//!
//! Kernel struct offsets and tracepoint field offsets are read by the agent from the
//! running kernel (BTF and tracefs `format` files), never hard-coded.

/// Offsets of the tracepoint fields the programs read (bytes from the start of the
/// tracepoint record), from `/sys/kernel/tracing/events/<cat>/<name>/format`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TracepointOffsets {
    // sock:sock_send_length / sock:sock_recv_length (same layout)
    pub len_sk: u16,
    pub len_family: u16,
    pub len_protocol: u16,
    pub len_ret: u16,
    pub len_flags: u16,
    // sock:inet_sock_set_state
    pub state_skaddr: u16,
    pub state_oldstate: u16,
    pub state_newstate: u16,
    pub state_sport: u16,
    pub state_dport: u16,
    pub state_family: u16,
    pub state_protocol: u16,
    pub state_saddr: u16,
    pub state_daddr: u16,
    pub state_saddr_v6: u16,
    pub state_daddr_v6: u16,
}

const _: () = assert!(core::mem::size_of::<TracepointOffsets>() == 32);

/// Offsets into kernel structs, from the running kernel's BTF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    // struct pt_regs: where the syscall number and its first three arguments live.
    pub regs_syscall_nr: u16,
    pub regs_arg1: u16,
    pub regs_arg2: u16,
    pub regs_arg3: u16,
    // struct sock_common, for sockets that existed before the agent started.
    pub skc_daddr: u16,
    pub skc_rcv_saddr: u16,
    pub skc_dport: u16,
    pub skc_num: u16,
    pub skc_family: u16,
    pub skc_v6_daddr: u16,
    pub skc_v6_rcv_saddr: u16,
    /// `skc_state`: a socket already closed is not added to the live socket map.
    pub skc_state: u16,
    /// 1 when the `skc_*` offsets are valid.
    pub have_sock_offsets: u16,
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 28);

/// What the syscalls backend reads to get from a syscall's file descriptor to its
/// TCP socket (`task->files->fdt->fd[fd]->private_data->sk`), from BTF, and where
/// the `syscalls:sys_exit_*` records keep the return value (from their format).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FdOffsets {
    pub task_files: u16,
    pub files_fdt: u16,
    pub fdt_max_fds: u16,
    pub fdt_fd: u16,
    pub file_inode: u16,
    pub file_private_data: u16,
    pub inode_mode: u16,
    pub socket_sk: u16,
    pub sk_protocol: u16,
    /// `struct pt_regs`: the fourth syscall argument (recvfrom's flags).
    pub regs_arg4: u16,
    /// `ret` in the `syscalls:sys_exit_*` records.
    pub exit_ret: u16,
    /// 1 when the offsets above are valid.
    pub valid: u16,
}

const _: () = assert!(core::mem::size_of::<FdOffsets>() == 24);

/// Syscall numbers the programs decode buffers for (architecture specific).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyscallNumbers {
    pub read: u32,
    pub write: u32,
    pub readv: u32,
    pub writev: u32,
    pub sendto: u32,
    pub recvfrom: u32,
    pub sendmsg: u32,
    pub recvmsg: u32,
}

/// The `CONFIG` global.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelConfig {
    pub tp: TracepointOffsets,
    pub kernel: KernelOffsets,
    pub syscalls: SyscallNumbers,
    pub fd: FdOffsets,
    /// Payload bytes to capture per syscall (≤ `MAX_CAPTURE`).
    pub capture_bytes: u32,
    /// The agent's own process id: its socket I/O is never traced.
    pub agent_tgid: u32,
    /// 1 when only the pids in `FILTER_PIDS` are followed.
    pub filter_pids: u32,
    /// 1 when only connections with a port in `FILTER_PORTS` are followed.
    pub filter_ports: u32,
    /// Wake the reader only once this many bytes wait in the ring buffer; below it
    /// the agent polls on a short timer. Saves a wakeup per event under load.
    pub wakeup_bytes: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<KernelConfig>() == 32 + 28 + 32 + 24 + 24);

#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelConfig {}
