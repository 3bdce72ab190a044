//! Finding the copies of OpenSSL that processes use, so that the TLS probes can be
//! attached to each file once.
//!
//! A process uses OpenSSL through the system's `libssl.so.3` (or `.so.1.1`), a copy
//! bundled with a Python wheel (`psycopg_binary.libs/libssl-<hash>.so.3`), or a copy
//! linked into its own executable that exports the API (`node`). All of them show in
//! `/proc/PID/maps` as file-backed executable mappings: shared libraries by name, the
//! executable by being the process's `exe`. Files are told apart by device and inode
//! (the same library seen through different paths, or inside different containers'
//! roots, is one file); a file's symbols are read once.

use std::path::{Path, PathBuf};

/// A file as the kernel knows it: the same for every path that reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// What a file the probes attach to is to the processes that map it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbedFile {
    /// A shared library named like OpenSSL's (`libssl.so.3`, `libssl-1a2b.so.3`).
    Library,
    /// The process's own executable, which exports OpenSSL's API (Node.js).
    Executable,
    /// The dynamic loader: not OpenSSL, but it tells when a process loaded
    /// objects, one of which may be (`_dl_debug_state`).
    Loader,
}

/// File offsets of the functions the probes attach to. `SSL_read` and `SSL_write`
/// are always there; the `_ex` forms exist from OpenSSL 1.1.1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslSymbols {
    pub read: u64,
    pub write: u64,
    pub read_ex: Option<u64>,
    pub write_ex: Option<u64>,
}

/// True for the file name of an OpenSSL `libssl` shared object: the system's
/// (`libssl.so`, `libssl.so.3`, `libssl.so.1.1`) and the copies wheels bundle
/// under a hashed name (`libssl-8e9fbb9c.so.3`, `libssl-d2e4f7a3.so.1.1`).
pub fn is_libssl_name(name: &str) -> bool {
    if let Some(rest) = name.strip_prefix("libssl.so") {
        return rest.is_empty() || rest.starts_with('.');
    }
    if let Some(rest) = name.strip_prefix("libssl-") {
        // The hash, then `.so` and an optional version.
        let Some(dot) = rest.find(".so") else {
            return false;
        };
        let hash = &rest[..dot];
        let after = &rest[dot + 3..];
        return !hash.is_empty()
            && hash.bytes().all(|b| b.is_ascii_alphanumeric())
            && (after.is_empty() || after.starts_with('.'));
    }
    false
}

/// Paths of the file-backed executable mappings in a `/proc/PID/maps` text, each
/// once, in order of appearance. Deleted files (` (deleted)`) are left out: their
/// path reaches another file, or none.
pub fn executable_mappings(maps: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let mut fields = line.splitn(6, ' ');
        let (Some(_), Some(perms), Some(_), Some(_), Some(inode), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let path = path.trim_start();
        if !perms.contains('x') || inode == "0" || !path.starts_with('/') {
            continue;
        }
        if path.ends_with(" (deleted)") {
            continue;
        }
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// The OpenSSL shared libraries among a process's executable mappings.
pub fn libssl_mappings(maps: &str) -> Vec<&str> {
    mappings_named(maps, is_libssl_name)
}

/// The executable mappings whose file name `wanted` accepts.
fn mappings_named(maps: &str, wanted: fn(&str) -> bool) -> Vec<&str> {
    executable_mappings(maps)
        .into_iter()
        .filter(|p| {
            Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(wanted)
        })
        .collect()
}

/// A path inside a process's view of the filesystem, reached from the agent's
/// (its mount namespace may differ: a container's root).
pub fn in_process_root(proc_root: &Path, pid: u32, path: &str) -> PathBuf {
    proc_root
        .join(pid.to_string())
        .join("root")
        .join(path.trim_start_matches('/'))
}

/// Why a file's OpenSSL functions could not be found.
#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} is not an ELF file the agent can read: {1}")]
    Parse(PathBuf, object::Error),
    #[error("{0} does not export the functions the probes attach to")]
    Missing(PathBuf),
}

/// The file offsets of OpenSSL's read and write functions in an ELF file, from its
/// dynamic symbols (what a stripped library or executable still has), then its
/// full symbol table.
pub fn ssl_symbols(path: &Path) -> Result<SslSymbols, SymbolsError> {
    let data = Mapped::open(path).map_err(|e| SymbolsError::Read(path.to_owned(), e))?;
    ssl_symbols_in(data.bytes()).map_err(|e| match e {
        Some(e) => SymbolsError::Parse(path.to_owned(), e),
        None => SymbolsError::Missing(path.to_owned()),
    })
}

/// A file mapped read-only: an executable of a hundred megabytes (Node.js) is
/// looked at without being read into memory.
struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapped {
    fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let file = std::fs::File::open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::other("file too large"))?;
        if len == 0 {
            return Err(std::io::Error::other("empty file"));
        }
        // SAFETY: a private read-only mapping of a file we opened; its length is
        // the file's. The mapping outlives the descriptor (closed at return).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes while `self` lives. A file
        // truncated meanwhile would fault on access; executables in use cannot be
        // written (ETXTBSY) and libraries are replaced, not truncated, by packages.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `open` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// [`ssl_symbols`] of a file's bytes: `Err(None)` when the functions are missing.
pub fn ssl_symbols_in(data: &[u8]) -> Result<SslSymbols, Option<object::Error>> {
    let found = function_offsets(
        data,
        ["SSL_read", "SSL_write", "SSL_read_ex", "SSL_write_ex"],
    )
    .map_err(Some)?;
    match found {
        [Some(read), Some(write), read_ex, write_ex] => Ok(SslSymbols {
            read,
            write,
            read_ex,
            write_ex,
        }),
        _ => Err(None),
    }
}

/// True for the file name of a dynamic loader: glibc's (`ld-linux-x86-64.so.2`,
/// `ld-linux-aarch64.so.1`, `ld-2.31.so`) and musl's (`ld-musl-x86_64.so.1`).
pub fn is_loader_name(name: &str) -> bool {
    name.strip_prefix("ld-")
        .and_then(|rest| rest.find(".so").map(|i| (rest, i)))
        .is_some_and(|(rest, i)| {
            i > 0
                && rest[..i]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
                && rest[i + 3..]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b'.')
        })
}

/// The dynamic loaders among a process's executable mappings (one, normally).
pub fn loader_mappings(maps: &str) -> Vec<&str> {
    mappings_named(maps, is_loader_name)
}

/// The file offset of a dynamic loader's `_dl_debug_state`, which it calls when
/// its list of loaded objects changes (for debuggers).
pub fn loader_symbol(path: &Path) -> Result<u64, SymbolsError> {
    let data = Mapped::open(path).map_err(|e| SymbolsError::Read(path.to_owned(), e))?;
    match function_offsets(data.bytes(), ["_dl_debug_state"]) {
        Ok([Some(offset)]) => Ok(offset),
        Ok([None]) => Err(SymbolsError::Missing(path.to_owned())),
        Err(e) => Err(SymbolsError::Parse(path.to_owned(), e)),
    }
}

/// The file offsets of the functions `names` an ELF file defines, from its
/// dynamic symbols (what a stripped file still has), then its full symbol table.
fn function_offsets<const N: usize>(
    data: &[u8],
    names: [&str; N],
) -> Result<[Option<u64>; N], object::Error> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    let obj = object::File::parse(data)?;
    let mut found: [Option<u64>; N] = [None; N];
    for sym in obj.dynamic_symbols().chain(obj.symbols()) {
        if !sym.is_definition() || sym.kind() != object::SymbolKind::Text {
            continue;
        }
        let Ok(name) = sym.name() else { continue };
        let Some(i) = names.iter().position(|n| *n == name) else {
            continue;
        };
        if found[i].is_some() {
            continue;
        }
        // A virtual address to a file offset, through its section.
        let Some(section) = sym
            .section_index()
            .and_then(|i| obj.section_by_index(i).ok())
        else {
            continue;
        };
        let Some((file_offset, _)) = section.file_range() else {
            continue;
        };
        let Some(delta) = sym.address().checked_sub(section.address()) else {
            continue;
        };
        found[i] = Some(file_offset + delta);
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openssl_library_names_are_told_from_others() {
        for yes in [
            "libssl.so",
            "libssl.so.3",
            "libssl.so.1.1",
            "libssl-8e9fbb9c.so.3",
            "libssl-d2e4f7a3.so.1.1",
            "libssl-1a2b.so",
        ] {
            assert!(is_libssl_name(yes), "{yes}");
        }
        for no in [
            "libssl3.so", // NSS, another library
            "libssl.sox",
            "libssl-.so.3",
            "libssl-abc.txt",
            "libcrypto.so.3",
            "libsslcommon.so",
            "libssl-ab/c.so",
        ] {
            assert!(!is_libssl_name(no), "{no}");
        }
    }

    const MAPS: &str = "\
55d0c8a00000-55d0c8a28000 r--p 00000000 08:01 1311289                    /usr/bin/python3.11
55d0c8a28000-55d0c8d3a000 r-xp 00028000 08:01 1311289                    /usr/bin/python3.11
7f1c2c000000-7f1c2c021000 rw-p 00000000 00:00 0 
7f1c30a00000-7f1c30a5e000 r--p 00000000 08:01 1316061                    /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c30a5e000-7f1c30b3a000 r-xp 0005e000 08:01 1316061                    /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c30c00000-7f1c30c80000 r-xp 00010000 08:01 2400001                    /venv/lib/python3.11/site-packages/psycopg_binary.libs/libssl-8e9fbb9c.so.3
7f1c30d00000-7f1c30d80000 r-xp 00010000 08:01 2400002                    /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f1c30e00000-7f1c30e80000 r-xp 00010000 08:01 2400003                    /tmp/old/libssl.so.3 (deleted)
7f1c30f00000-7f1c30f80000 r-xp 00010000 08:01 2400004                    /opt/my dir/libssl.so.1.1
7ffd5e7c0000-7ffd5e7e1000 rw-p 00000000 00:00 0                          [stack]
7ffd5e7f8000-7ffd5e7fa000 r-xp 00000000 00:00 0                          [vdso]
";

    #[test]
    fn openssl_copies_are_found_in_a_processes_maps_once_each() {
        assert_eq!(
            libssl_mappings(MAPS),
            vec![
                "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                "/venv/lib/python3.11/site-packages/psycopg_binary.libs/libssl-8e9fbb9c.so.3",
                "/opt/my dir/libssl.so.1.1",
            ]
        );
        let all = executable_mappings(MAPS);
        assert_eq!(all[0], "/usr/bin/python3.11");
        assert!(
            !all.iter()
                .any(|p| p.contains("deleted") || p.starts_with('['))
        );
    }

    #[test]
    fn dynamic_loaders_are_told_from_other_libraries() {
        for yes in [
            "ld-linux-x86-64.so.2",
            "ld-linux-aarch64.so.1",
            "ld-linux.so.2",
            "ld-2.31.so",
            "ld-musl-x86_64.so.1",
        ] {
            assert!(is_loader_name(yes), "{yes}");
        }
        for no in [
            "ld-.so.2",
            "ldap.so",
            "libld-linux.so.2",
            "ld-linux.so.x",
            "ld-a/b.so",
        ] {
            assert!(!is_loader_name(no), "{no}");
        }
        let maps = format!(
            "{MAPS}7f1c31000000-7f1c31020000 r-xp 00001000 08:01 2400005                    /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\n"
        );
        assert_eq!(
            loader_mappings(&maps),
            ["/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
        );
        assert!(loader_mappings(MAPS).is_empty());
    }

    /// This very process's loader defines `_dl_debug_state`, where `nm -D` says.
    #[test]
    fn the_loader_of_this_process_has_its_debug_state_function() {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let loader = loader_mappings(&maps);
        assert_eq!(loader.len(), 1, "{maps}");
        let offset = loader_symbol(Path::new(loader[0])).unwrap();
        let nm = std::process::Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(loader[0])
            .output()
            .expect("nm (binutils) is installed");
        let nm = String::from_utf8(nm.stdout).unwrap();
        let address = nm
            .lines()
            .find(|l| l.ends_with(" _dl_debug_state@@GLIBC_PRIVATE"))
            .and_then(|l| u64::from_str_radix(l.split_whitespace().next()?, 16).ok())
            .expect("nm lists _dl_debug_state");
        // In ld.so, text is mapped at the file offset it has in the file.
        let data = std::fs::read(loader[0]).unwrap();
        use object::{Object as _, ObjectSection as _};
        let obj = object::File::parse(&*data).unwrap();
        let text = obj.section_by_name(".text").unwrap();
        let (start, _) = text.file_range().unwrap();
        assert_eq!(offset - start + text.address(), address);
        let me = std::env::current_exe().unwrap();
        assert!(matches!(loader_symbol(&me), Err(SymbolsError::Missing(_))));
    }

    #[test]
    fn a_path_is_reached_through_the_processes_own_root() {
        assert_eq!(
            in_process_root(Path::new("/proc"), 42, "/usr/lib/libssl.so.3"),
            PathBuf::from("/proc/42/root/usr/lib/libssl.so.3")
        );
    }

    #[test]
    fn a_file_that_is_not_elf_or_lacks_the_functions_is_refused() {
        assert!(matches!(ssl_symbols_in(b"not an elf file"), Err(Some(_))));
        // The test binary itself is ELF, and exports no SSL_read.
        let me = std::env::current_exe().unwrap();
        assert!(matches!(ssl_symbols(&me), Err(SymbolsError::Missing(_))));
    }

    /// Debian's libssl (a dependency of the system's Python and curl): the four
    /// functions are found at the addresses `nm -D` gives them.
    #[test]
    fn the_systems_libssl_exports_all_four_functions_where_nm_says() {
        use object::{Object as _, ObjectSection as _};
        let path = [
            "/usr/lib/x86_64-linux-gnu/libssl.so.3",
            "/lib/x86_64-linux-gnu/libssl.so.3",
        ]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("Debian's libssl3 is installed (curl and Python need it)");
        let data = std::fs::read(path).unwrap();
        let s = ssl_symbols_in(&data).unwrap();
        let nm = std::process::Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(path)
            .output()
            .expect("nm (binutils) is installed");
        let nm = String::from_utf8(nm.stdout).unwrap();
        let address = |name: &str| {
            nm.lines()
                .find_map(|l| {
                    let mut f = l.split_whitespace();
                    let (addr, _, sym) = (f.next()?, f.next()?, f.next()?);
                    (sym.split('@').next()? == name).then(|| u64::from_str_radix(addr, 16).unwrap())
                })
                .unwrap_or_else(|| panic!("nm lists {name}"))
        };
        let obj = object::File::parse(&*data).unwrap();
        let to_address = |offset: u64| {
            obj.sections()
                .find_map(|sec| {
                    let (start, size) = sec.file_range()?;
                    (start..start + size)
                        .contains(&offset)
                        .then(|| offset - start + sec.address())
                })
                .unwrap()
        };
        assert_eq!(to_address(s.read), address("SSL_read"));
        assert_eq!(to_address(s.write), address("SSL_write"));
        assert_eq!(to_address(s.read_ex.unwrap()), address("SSL_read_ex"));
        assert_eq!(to_address(s.write_ex.unwrap()), address("SSL_write_ex"));
    }
}
