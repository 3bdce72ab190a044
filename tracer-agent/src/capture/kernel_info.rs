//! What the kernel programs need to know about the running kernel: tracepoint field
//! offsets (tracefs `format` files), struct member offsets (BTF) and syscall numbers.
//! Nothing here hard-codes one kernel's layout.

use std::{
    fs,
    path::{Path, PathBuf},
};

use btf_rs::{Btf, Type};
use tracer_common::config::{KernelOffsets, SyscallNumbers, TracepointOffsets};

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

/// Tracepoint offsets for every field the programs read.
pub fn tracepoint_offsets() -> Result<TracepointOffsets, KernelInfoError> {
    let len = tracepoint_fields(
        "sock",
        "sock_send_length",
        &["sk", "family", "protocol", "ret", "flags"],
    )?;
    let recv = tracepoint_fields(
        "sock",
        "sock_recv_length",
        &["sk", "family", "protocol", "ret", "flags"],
    )?;
    if len != recv {
        return Err(KernelInfoError::MissingField {
            tracepoint: "sock:sock_recv_length".into(),
            field: "(layout differs from sock_send_length)".into(),
        });
    }
    let st = tracepoint_fields(
        "sock",
        "inet_sock_set_state",
        &[
            "skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol", "saddr",
            "daddr", "saddr_v6", "daddr_v6",
        ],
    )?;
    Ok(TracepointOffsets {
        len_sk: len[0],
        len_family: len[1],
        len_protocol: len[2],
        len_ret: len[3],
        len_flags: len[4],
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
    })
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

/// Struct offsets from the running kernel's BTF: `pt_regs` (syscall number and
/// arguments) and `sock_common` (addresses of sockets opened before the agent).
pub fn kernel_offsets() -> Result<KernelOffsets, KernelInfoError> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| KernelInfoError::Btf(e.to_string()))?;
    let (nr, a1, a2, a3) = match std::env::consts::ARCH {
        "x86_64" => ("orig_ax", "di", "si", "dx"),
        // aarch64: regs[0..] are x0.., syscallno holds the number; arguments are
        // looked up as the array base plus 8 bytes per register.
        "aarch64" => ("syscallno", "regs", "regs", "regs"),
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
        // x0 holds the first argument (orig_x0 after syscall entry), x1 and x2 the next.
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
    ) {
        (Ok(d), Ok(s), Ok(dp), Ok(n), Ok(f), Ok(d6), Ok(s6)) => {
            k.skc_daddr = d;
            k.skc_rcv_saddr = s;
            k.skc_dport = dp;
            k.skc_num = n;
            k.skc_family = f;
            k.skc_v6_daddr = d6;
            k.skc_v6_rcv_saddr = s6;
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
    }
}
