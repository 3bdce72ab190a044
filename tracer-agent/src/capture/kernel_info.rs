//! What the kernel programs need to know about the running kernel: tracepoint field
//! offsets (tracefs `format` files), struct member offsets (BTF) and syscall numbers.
//! Nothing here hard-codes one kernel's layout.

use std::{
    fs,
    path::{Path, PathBuf},
};

use btf_rs::{Btf, Type};
use tracer_common::config::{FdOffsets, KernelOffsets, SyscallNumbers, TracepointOffsets};

/// Where the running kernel's BTF lives.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Where tracefs is (or gets) mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum KernelInfoError {
    #[error("cannot read tracepoint format {path}: {source} (is tracefs mounted at {TRACEFS}?)")]
    FormatUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint} has no field `{field}` on this kernel")]
    MissingField { tracepoint: String, field: String },
    #[error(
        "cannot read kernel BTF at {VMLINUX_BTF}: {0} (the kernel needs CONFIG_DEBUG_INFO_BTF=y)"
    )]
    Btf(String),
    #[error("kernel BTF has no member `{member}` in `struct {strukt}`")]
    MissingMember { strukt: String, member: String },
    #[error("kernel BTF describes no function `{0}`")]
    MissingFunction(String),
    #[error("kernel function {function}({params}) does not have the parameters tracer reads")]
    FunctionLayout { function: String, params: String },
    #[error("cannot mount tracefs at {TRACEFS}: {0}")]
    Mount(std::io::Error),
    #[error("unsupported architecture {0}: tracer knows the syscall table of x86_64 and aarch64")]
    Arch(&'static str),
}

/// Offsets of the named fields in one tracepoint's record, from its `format` file.
pub fn tracepoint_fields(
    category: &str,
    name: &str,
    fields: &[&str],
) -> Result<Vec<u16>, KernelInfoError> {
    let path = Path::new(TRACEFS)
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = fs::read_to_string(&path).map_err(|source| KernelInfoError::FormatUnreadable {
        path: path.clone(),
        source,
    })?;
    fields
        .iter()
        .map(|field| {
            field_offset(&text, field).ok_or_else(|| KernelInfoError::MissingField {
                tracepoint: format!("{category}:{name}"),
                field: (*field).to_string(),
            })
        })
        .collect()
}

/// Finds `offset:N;` on the `field:` line declaring `name` (e.g. `field:__u8 saddr[4];`).
fn field_offset(format: &str, name: &str) -> Option<u16> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let ident = decl.rsplit([' ', '*']).next()?;
        let ident = ident.split('[').next()?;
        if ident != name {
            return None;
        }
        let off = rest.split("offset:").nth(1)?.split(';').next()?.trim();
        off.parse().ok()
    })
}

/// Offsets of the `sock:inet_sock_set_state` fields the lifecycle program reads
/// (every backend needs it). The I/O tracepoints' fields are left zero.
pub fn lifecycle_offsets() -> Result<TracepointOffsets, KernelInfoError> {
    let st = tracepoint_fields(
        "sock",
        "inet_sock_set_state",
        &[
            "skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol", "saddr",
            "daddr", "saddr_v6", "daddr_v6",
        ],
    )?;
    Ok(TracepointOffsets {
        state_skaddr: st[0],
        state_oldstate: st[1],
        state_newstate: st[2],
        state_sport: st[3],
        state_dport: st[4],
        state_family: st[5],
        state_protocol: st[6],
        state_saddr: st[7],
        state_daddr: st[8],
        state_saddr_v6: st[9],
        state_daddr_v6: st[10],
        ..TracepointOffsets::default()
    })
}

/// Offsets of the `sock:sock_send_length` / `sock:sock_recv_length` fields (the
/// tracepoints backend), as `(sk, family, protocol, ret, flags)`.
pub fn io_tracepoint_offsets() -> Result<[u16; 5], KernelInfoError> {
    let fields = ["sk", "family", "protocol", "ret", "flags"];
    let send = tracepoint_fields("sock", "sock_send_length", &fields)?;
    let recv = tracepoint_fields("sock", "sock_recv_length", &fields)?;
    if send != recv {
        return Err(KernelInfoError::MissingField {
            tracepoint: "sock:sock_recv_length".into(),
            field: "(layout differs from sock_send_length)".into(),
        });
    }
    Ok([send[0], send[1], send[2], send[3], send[4]])
}

/// Tracepoint offsets for every field the programs of the tracepoints backend read.
pub fn tracepoint_offsets() -> Result<TracepointOffsets, KernelInfoError> {
    let len = io_tracepoint_offsets()?;
    Ok(TracepointOffsets {
        len_sk: len[0],
        len_family: len[1],
        len_protocol: len[2],
        len_ret: len[3],
        len_flags: len[4],
        ..lifecycle_offsets()?
    })
}

fn load_btf() -> Result<Btf, KernelInfoError> {
    Btf::from_file(VMLINUX_BTF).map_err(|e| KernelInfoError::Btf(e.to_string()))
}

/// The parameter names of kernel function `name`, from BTF.
fn function_params(btf: &Btf, name: &str) -> Result<Vec<String>, KernelInfoError> {
    let missing = || KernelInfoError::MissingFunction(name.to_string());
    let types = btf.resolve_types_by_name(name).map_err(|_| missing())?;
    let func = types
        .iter()
        .find_map(|t| match t {
            Type::Func(f) => Some(f.clone()),
            _ => None,
        })
        .ok_or_else(missing)?;
    let Ok(Type::FuncProto(proto)) = btf.resolve_chained_type(&func) else {
        return Err(missing());
    };
    Ok(proto
        .parameters
        .iter()
        .map(|p| btf.resolve_name(p).unwrap_or_default())
        .collect())
}

/// Where `tcp_sendmsg` and `tcp_recvmsg` keep the arguments the fexit and kprobe
/// backends read (the kernel programs exist for each layout these allow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionArgs {
    /// Index of `flags` among `tcp_recvmsg`'s parameters: 3 from Linux 5.19, 4
    /// before (a `nonblock` parameter came first).
    pub recv_flags: u16,
    /// Number of `tcp_recvmsg` parameters.
    pub recv_nargs: u16,
    /// Number of `tcp_sendmsg` parameters.
    pub send_nargs: u16,
}

/// The layout of `tcp_sendmsg` and `tcp_recvmsg`, from the running kernel's BTF.
pub fn function_args() -> Result<FunctionArgs, KernelInfoError> {
    function_args_in(&load_btf()?)
}

fn function_args_in(btf: &Btf) -> Result<FunctionArgs, KernelInfoError> {
    let send = function_params(btf, "tcp_sendmsg")?;
    let recv = function_params(btf, "tcp_recvmsg")?;
    check_tcp_params(&send, &recv)
}

/// The layout of the two functions' parameters, refusing any the programs would
/// misread: `tcp_sendmsg(sk, msg, size)`, and `tcp_recvmsg` as 6.10+ has it
/// `(sk, msg, len, flags)`, as 5.19–6.9 have it `(sk, msg, len, flags, addr_len)`,
/// or as before `(sk, msg, len, nonblock, flags, addr_len)`.
fn check_tcp_params(send: &[String], recv: &[String]) -> Result<FunctionArgs, KernelInfoError> {
    let unexpected = |f: &str, params: &[String]| KernelInfoError::FunctionLayout {
        function: f.to_string(),
        params: params.join(", "),
    };
    if send.len() != 3 || send[0] != "sk" {
        return Err(unexpected("tcp_sendmsg", send));
    }
    let flags = recv.iter().position(|p| p == "flags");
    let layout_known = recv.first().map(String::as_str) == Some("sk")
        && matches!((flags, recv.len()), (Some(3), 4 | 5) | (Some(4), 6));
    let (Some(flags), true) = (flags, layout_known) else {
        return Err(unexpected("tcp_recvmsg", recv));
    };
    Ok(FunctionArgs {
        recv_flags: flags as u16,
        recv_nargs: recv.len() as u16,
        send_nargs: send.len() as u16,
    })
}

/// Whether each of `names` can be probed, from tracefs's
/// `available_filter_functions`; names it cannot tell about are left out (the file
/// missing or unreadable says nothing either way).
pub fn traceable_functions(names: &[&str]) -> std::collections::HashMap<String, bool> {
    let path = Path::new(TRACEFS).join("available_filter_functions");
    let Ok(text) = fs::read_to_string(path) else {
        return Default::default();
    };
    let mut found: std::collections::HashMap<String, bool> =
        names.iter().map(|n| (n.to_string(), false)).collect();
    for line in text.lines() {
        // `name` or `name [module]`.
        let name = line.split_whitespace().next().unwrap_or_default();
        if let Some(v) = found.get_mut(name) {
            *v = true;
        }
    }
    found
}

/// Byte offset of `member` in `struct strukt`, looking through anonymous unions and structs.
fn member_offset(btf: &Btf, strukt: &str, member: &str) -> Result<u16, KernelInfoError> {
    let missing = || KernelInfoError::MissingMember {
        strukt: strukt.into(),
        member: member.into(),
    };
    let types = btf
        .resolve_types_by_name(strukt)
        .map_err(|e| KernelInfoError::Btf(e.to_string()))?;
    let s = types
        .iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(missing)?;
    let bits = find_member(btf, s, member, 0, 0).ok_or_else(missing)?;
    u16::try_from(bits / 8).map_err(|_| missing())
}

fn find_member(
    btf: &Btf,
    s: &btf_rs::Struct,
    member: &str,
    base_bits: u32,
    depth: u8,
) -> Option<u32> {
    if depth > 4 {
        return None;
    }
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == member {
            return Some(base_bits + m.bit_offset());
        }
        if name.is_empty() {
            let mut t = btf.resolve_chained_type(m).ok()?;
            // Skip typedef/const/volatile wrappers.
            for _ in 0..8 {
                match &t {
                    Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) => {
                        let next = t
                            .as_btf_type()
                            .and_then(|bt| btf.resolve_chained_type(bt).ok())?;
                        t = next;
                    }
                    _ => break,
                }
            }
            if let Type::Struct(inner) | Type::Union(inner) = &t
                && let Some(found) =
                    find_member(btf, inner, member, base_bits + m.bit_offset(), depth + 1)
            {
                return Some(found);
            }
        }
    }
    None
}

/// The syscall exits the syscalls backend attaches to, as (program, name in the
/// `syscalls` category).
pub const SYSCALL_EXITS: [(&str, &str); 8] = [
    ("sys_exit_send", "sys_exit_write"),
    ("sys_exit_send", "sys_exit_writev"),
    ("sys_exit_send", "sys_exit_sendto"),
    ("sys_exit_send", "sys_exit_sendmsg"),
    ("sys_exit_recv", "sys_exit_read"),
    ("sys_exit_recv", "sys_exit_readv"),
    ("sys_exit_recv", "sys_exit_recvfrom"),
    ("sys_exit_recv", "sys_exit_recvmsg"),
];

/// What the syscalls backend reads to follow a file descriptor to its socket
/// (BTF), and where the syscall exit records keep `ret` (their format files, which
/// must agree).
pub fn fd_offsets() -> Result<FdOffsets, KernelInfoError> {
    let mut ret = None;
    for (_, name) in SYSCALL_EXITS {
        let off = tracepoint_fields("syscalls", name, &["ret"])?[0];
        if ret.is_some_and(|r| r != off) {
            return Err(KernelInfoError::MissingField {
                tracepoint: format!("syscalls:{name}"),
                field: "ret (at another offset than in the other syscall exits)".into(),
            });
        }
        ret = Some(off);
    }
    let btf = load_btf()?;
    let byte = |strukt: &str, member: &str| member_offset(&btf, strukt, member);
    let regs_arg4 = match std::env::consts::ARCH {
        "x86_64" => byte("pt_regs", "r10")?,
        "aarch64" => byte("pt_regs", "regs")? + 24,
        other => return Err(KernelInfoError::Arch(other)),
    };
    Ok(FdOffsets {
        task_files: byte("task_struct", "files")?,
        files_fdt: byte("files_struct", "fdt")?,
        fdt_max_fds: byte("fdtable", "max_fds")?,
        fdt_fd: byte("fdtable", "fd")?,
        file_inode: byte("file", "f_inode")?,
        file_private_data: byte("file", "private_data")?,
        inode_mode: byte("inode", "i_mode")?,
        socket_sk: byte("socket", "sk")?,
        sk_protocol: byte("sock", "sk_protocol")?,
        regs_arg4,
        exit_ret: ret.unwrap_or_default(),
        valid: 1,
    })
}

/// Struct offsets from the running kernel's BTF: `pt_regs` (syscall number and
/// arguments) and `sock_common` (addresses of sockets opened before the agent).
pub fn kernel_offsets() -> Result<KernelOffsets, KernelInfoError> {
    let btf = load_btf()?;
    let (nr, a1, a2, a3) = match std::env::consts::ARCH {
        "x86_64" => ("orig_ax", "di", "si", "dx"),
        // aarch64: regs[0..] are x0.., syscallno holds the number; arguments are
        // looked up as the array base plus 8 bytes per register.
        "aarch64" => ("syscallno", "orig_x0", "regs", "regs"),
        other => return Err(KernelInfoError::Arch(other)),
    };
    let mut k = KernelOffsets {
        regs_syscall_nr: member_offset(&btf, "pt_regs", nr)?,
        regs_arg1: member_offset(&btf, "pt_regs", a1)?,
        regs_arg2: member_offset(&btf, "pt_regs", a2)?,
        regs_arg3: member_offset(&btf, "pt_regs", a3)?,
        ..KernelOffsets::default()
    };
    if std::env::consts::ARCH == "aarch64" {
        // x0 holds the first argument until the syscall returns into it, so the
        // first is read from orig_x0; x1 and x2 hold the next two.
        k.regs_arg2 += 8;
        k.regs_arg3 += 16;
    }
    let sock = |m: &str| member_offset(&btf, "sock_common", m);
    match (
        sock("skc_daddr"),
        sock("skc_rcv_saddr"),
        sock("skc_dport"),
        sock("skc_num"),
        sock("skc_family"),
        sock("skc_v6_daddr"),
        sock("skc_v6_rcv_saddr"),
        sock("skc_state"),
    ) {
        (Ok(d), Ok(s), Ok(dp), Ok(n), Ok(f), Ok(d6), Ok(s6), Ok(st)) => {
            k.skc_daddr = d;
            k.skc_rcv_saddr = s;
            k.skc_dport = dp;
            k.skc_num = n;
            k.skc_family = f;
            k.skc_v6_daddr = d6;
            k.skc_v6_rcv_saddr = s6;
            k.skc_state = st;
            k.have_sock_offsets = 1;
        }
        _ => log::warn!(
            "struct sock_common offsets not found in BTF: sockets opened before the agent started will not be traced"
        ),
    }
    Ok(k)
}

/// Syscall numbers of the read/write family on this architecture.
pub fn syscall_numbers() -> Result<SyscallNumbers, KernelInfoError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(SyscallNumbers {
            read: 0,
            write: 1,
            readv: 19,
            writev: 20,
            sendto: 44,
            recvfrom: 45,
            sendmsg: 46,
            recvmsg: 47,
        }),
        // The generic table (asm-generic/unistd.h).
        "aarch64" => Ok(SyscallNumbers {
            read: 63,
            write: 64,
            readv: 65,
            writev: 66,
            sendto: 206,
            recvfrom: 207,
            sendmsg: 211,
            recvmsg: 212,
        }),
        other => Err(KernelInfoError::Arch(other)),
    }
}

/// True when tracefs is mounted (its `events` directory is there).
pub fn tracefs_mounted() -> bool {
    Path::new(TRACEFS).join("events").is_dir()
}

/// Mounts tracefs when it is missing. Returns true when it mounted it.
pub fn ensure_tracefs() -> Result<bool, KernelInfoError> {
    if tracefs_mounted() {
        return Ok(false);
    }
    let target = std::ffi::CString::new(TRACEFS).expect("constant path has no NUL");
    let fstype = c"tracefs";
    // SAFETY: plain mount(2) with valid NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(KernelInfoError::Mount(std::io::Error::last_os_error()));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
";

    #[test]
    fn finds_field_offsets_in_format_files() {
        assert_eq!(field_offset(FORMAT, "skaddr"), Some(8));
        assert_eq!(field_offset(FORMAT, "oldstate"), Some(16));
        assert_eq!(field_offset(FORMAT, "saddr"), Some(32));
        assert_eq!(field_offset(FORMAT, "saddr_v6"), Some(40));
        assert_eq!(field_offset(FORMAT, "daddr"), None);
    }

    #[test]
    fn reads_this_kernels_btf_when_present() {
        if !Path::new(VMLINUX_BTF).exists() {
            return;
        }
        let k = kernel_offsets().expect("BTF offsets");
        assert!(k.regs_syscall_nr > 0);
        assert_eq!(k.have_sock_offsets, 1, "sock_common members found");
        assert_ne!(k.skc_daddr, k.skc_rcv_saddr);
        // Every kernel tracer supports has both functions with the socket first.
        let f = function_args().expect("tcp_sendmsg/tcp_recvmsg in BTF");
        assert_eq!(f.send_nargs, 3);
        assert!(f.recv_flags == 3 || f.recv_flags == 4, "{f:?}");
        assert!(f.recv_nargs > f.recv_flags, "{f:?}");
    }

    #[test]
    fn follows_file_descriptors_to_sockets_in_this_kernels_btf() {
        if !Path::new(VMLINUX_BTF).exists() {
            return;
        }
        let btf = load_btf().expect("BTF");
        let byte = |s: &str, m: &str| member_offset(&btf, s, m).expect("member");
        // The chain the syscalls backend follows, one struct at a time: each
        // pointer it reads lies inside its struct, and members that share a
        // struct sit at different places.
        assert!(byte("task_struct", "files") > 0);
        assert_ne!(byte("fdtable", "max_fds"), byte("fdtable", "fd"));
        assert_ne!(byte("file", "f_inode"), byte("file", "private_data"));
        assert!(byte("socket", "sk") > 0);
        assert!(byte("sock", "sk_protocol") > byte("sock", "__sk_common"));
        if !tracefs_mounted() {
            return;
        }
        let fd = fd_offsets().expect("syscall exits and file offsets");
        assert_eq!(fd.valid, 1);
        assert_eq!(fd.task_files, byte("task_struct", "files"));
        // `ret` follows the common fields and the syscall number.
        assert!(fd.exit_ret >= 16, "{fd:?}");
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn finds_tcp_recvmsg_flags_on_old_and_new_kernels() {
        let send = names(&["sk", "msg", "size"]);
        // Linux ≥ 6.10.
        let newest =
            check_tcp_params(&send, &names(&["sk", "msg", "len", "flags"])).expect("6.10+ layout");
        assert_eq!((newest.recv_flags, newest.recv_nargs), (3, 4));
        // 5.19 to 6.9.
        let new = check_tcp_params(&send, &names(&["sk", "msg", "len", "flags", "addr_len"]))
            .expect("5.19+ layout");
        assert_eq!((new.recv_flags, new.recv_nargs, new.send_nargs), (3, 5, 3));
        // 5.15: `nonblock` before `flags`.
        let old = check_tcp_params(
            &send,
            &names(&["sk", "msg", "len", "nonblock", "flags", "addr_len"]),
        )
        .expect("5.15 layout");
        assert_eq!((old.recv_flags, old.recv_nargs), (4, 6));
        // A layout the programs would misread is refused, not guessed.
        assert!(check_tcp_params(&send, &names(&["msg", "sk", "len", "flags"])).is_err());
        assert!(check_tcp_params(&send, &names(&["sk", "msg", "len"])).is_err());
        assert!(check_tcp_params(&send, &names(&["sk", "msg", "len", "x", "flags"])).is_err());
        assert!(check_tcp_params(&names(&["s", "m", "n"]), &names(&["sk", "flags"])).is_err());
    }
}
