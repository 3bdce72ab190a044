//! Connections opened before the agent started, recovered from /proc.
//!
//! The kernel probes see a connection only when it is established or does I/O. A
//! connection idle since before start-up (one a pool leaked) never shows up there, yet
//! belongs in the connection inventory. [`scan`] lists every ESTABLISHED TCP socket
//! in /proc together with the process holding it.
//!
//! Two passes: the fd tables of all processes give socket inode → owning pid, then the
//! tcp/tcp6 tables of each network namespace (read once, through one of its
//! processes) give addresses and states. Memory stays bounded: by the number of
//! processes (the kernel's `pid_max`), by [`MAX_SOCKET_FDS`], [`MAX_LISTENERS`] and
//! [`MAX_LINE`], and by `max` for the result.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead, BufReader, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::ffi::OsStrExt,
    path::Path,
};

use tracer_common::conn::Role;

/// `TCP_ESTABLISHED` in the `st` column.
const TCP_ESTABLISHED: u8 = 0x01;
/// `TCP_LISTEN` in the `st` column.
const TCP_LISTEN: u8 = 0x0A;
/// Socket fds remembered over all processes. A process whose socket fds no longer
/// fit is counted in [`ScanStats::unreadable`].
const MAX_SOCKET_FDS: usize = 1 << 20;
/// Listening sockets remembered per namespace to decide roles; more are ignored.
const MAX_LISTENERS: usize = 1 << 16;
/// Longest tcp/tcp6 line read; the kernel's are under 200 bytes. Longer lines are
/// skipped.
const MAX_LINE: usize = 512;
/// Processes remembered per namespace to read its tables through, in case the first
/// one exits before its turn.
const READERS_PER_NAMESPACE: usize = 3;

/// One established TCP connection found in /proc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredSocket {
    /// Thread-group id holding the socket; the lowest one when several share it.
    pub pid: u32,
    /// `/proc/<pid>/comm`, trimmed; empty when the process exited meanwhile.
    pub comm: String,
    /// IPv4-mapped IPv6 addresses are given as IPv4.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// `Server` when the local port is listened on in the same network namespace, on
    /// the same address or a wildcard (`0.0.0.0` for IPv4, `::` for both); else `Client`.
    pub role: Role,
    /// Socket inode, as in `/proc/<pid>/fd/N -> socket:[inode]`.
    pub inode: u64,
}

/// What one [`scan`] went through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Process directories looked at (the excluded pid not counted).
    pub processes: usize,
    /// Network namespaces whose tcp tables were read.
    pub namespaces: usize,
    /// Sockets returned.
    pub sockets: usize,
    /// Established, owned sockets left out because `max` was reached.
    pub skipped_over_limit: usize,
    /// Processes whose fds could not all be read (exited, access denied, or beyond
    /// [`MAX_SOCKET_FDS`]), plus namespaces whose tables no process could give.
    pub unreadable: usize,
}

/// Scans `proc_root` (normally "/proc") for ESTABLISHED TCP sockets and the processes
/// holding them. Skips `exclude_pid` (the agent) and keeps at most `max` sockets,
/// counting the rest in [`ScanStats::skipped_over_limit`].
///
/// Processes that vanish or deny access are counted and passed over. The result is
/// sorted by pid, then inode; over `max`, the sockets kept are the first met
/// (namespaces in order of their lowest pid, then table order).
///
/// # Errors
/// Only when `proc_root` itself cannot be listed.
pub fn scan(
    proc_root: &Path,
    exclude_pid: u32,
    max: usize,
) -> std::io::Result<(Vec<RecoveredSocket>, ScanStats)> {
    let mut stats = ScanStats::default();
    let pids = list_pids(proc_root, exclude_pid)?;

    let mut owners = HashMap::new();
    let mut namespaces = NamespaceReaders::default();
    for &pid in &pids {
        stats.processes += 1;
        let dir = proc_root.join(pid.to_string());
        let fds = read_socket_fds(&dir.join("fd"), pid, &mut owners);
        if !fds.complete {
            stats.unreadable += 1;
        }
        let key = namespace_of(&dir, pid);
        // A namespace known only by pid may be one already known: read it only when
        // it can hold sockets of this process.
        if matches!(key, NamespaceKey::Pid(_)) && fds.sockets == 0 {
            continue;
        }
        namespaces.add(key, pid);
    }

    let mut found = Vec::new();
    let mut comms: HashMap<u32, String> = HashMap::new();
    for readers in namespaces.readers() {
        let room = max.saturating_sub(found.len());
        let tables = readers.iter().find_map(|&pid| {
            let net = proc_root.join(pid.to_string()).join("net");
            read_tables(&net, &mut owners, room, &mut stats.skipped_over_limit)
        });
        let Some(tables) = tables else {
            stats.unreadable += 1;
            continue;
        };
        stats.namespaces += 1;
        for s in tables.established {
            let comm = comms
                .entry(s.pid)
                .or_insert_with(|| read_comm(proc_root, s.pid))
                .clone();
            found.push(RecoveredSocket {
                pid: s.pid,
                comm,
                local: s.local,
                remote: s.remote,
                role: role_of(s.local, &tables.listeners),
                inode: s.inode,
            });
        }
    }
    found.sort_by_key(|s| (s.pid, s.inode));
    stats.sockets = found.len();
    Ok((found, stats))
}

/// Numeric entries of `proc_root`, ascending, without `exclude_pid`.
fn list_pids(proc_root: &Path, exclude_pid: u32) -> std::io::Result<Vec<u32>> {
    let mut pids: Vec<u32> = std::fs::read_dir(proc_root)?
        .filter_map(|e| e.ok())
        .filter_map(|e| parse_decimal(e.file_name().as_bytes()))
        .filter_map(|pid| u32::try_from(pid).ok())
        .filter(|&pid| pid != exclude_pid)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// What reading one process's fd directory gave.
struct FdTable {
    /// Socket fds seen.
    sockets: usize,
    /// False when the directory or some of its links could not be read.
    complete: bool,
}

/// Records in `owners` the socket inodes `pid` holds, unless a lower pid holds them.
fn read_socket_fds(fd_dir: &Path, pid: u32, owners: &mut HashMap<u64, u32>) -> FdTable {
    let mut table = FdTable {
        sockets: 0,
        complete: true,
    };
    let Ok(entries) = std::fs::read_dir(fd_dir) else {
        table.complete = false;
        return table;
    };
    for entry in entries {
        let Ok(entry) = entry else {
            table.complete = false;
            continue;
        };
        let target = match std::fs::read_link(entry.path()) {
            Ok(t) => t,
            // Closed since the directory was listed.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => {
                table.complete = false;
                continue;
            }
        };
        let Some(inode) = socket_inode(target.as_os_str().as_bytes()) else {
            continue;
        };
        table.sockets += 1;
        if owners.contains_key(&inode) {
            continue;
        }
        if owners.len() < MAX_SOCKET_FDS {
            owners.insert(inode, pid);
        } else {
            table.complete = false;
        }
    }
    table
}

/// The socket inodes `pid` holds now, or `None` when its fds cannot be read (it
/// exited, or access is denied): used to forget recovered connections closed
/// before they did any I/O.
pub fn open_socket_inodes(proc_root: &Path, pid: u32) -> Option<HashSet<u64>> {
    let mut owners = HashMap::new();
    let table = read_socket_fds(
        &proc_root.join(pid.to_string()).join("fd"),
        pid,
        &mut owners,
    );
    if !table.complete && owners.is_empty() {
        return None;
    }
    Some(owners.into_keys().collect())
}

/// The TCP connections `pid` holds now, as (local, remote) endpoints of the
/// sockets among its fds that are not listening (established, or closing but
/// still held: a connection in CLOSE_WAIT that the process never closes is still
/// its connection). `None` when that cannot be told: its fds or its network
/// namespace's tables cannot be read.
pub fn open_connections(proc_root: &Path, pid: u32) -> Option<HashSet<(SocketAddr, SocketAddr)>> {
    let inodes = open_socket_inodes(proc_root, pid)?;
    let net = proc_root.join(pid.to_string()).join("net");
    let mut open = HashSet::new();
    let mut read = false;
    for name in ["tcp", "tcp6"] {
        let Ok(file) = std::fs::File::open(net.join(name)) else {
            continue;
        };
        read = true;
        for_each_line(file, |line| {
            if let Some(row) = parse_line(line)
                && row.state != TCP_LISTEN
                && inodes.contains(&row.inode)
            {
                open.insert((row.local, row.remote));
            }
        });
    }
    read.then_some(open)
}

/// The TCP ports `pid` listens on (its sockets in LISTEN in its network
/// namespace), at most [`MAX_LISTENERS`]; empty when they cannot be read.
pub fn listening_ports(proc_root: &Path, pid: u32) -> Vec<u16> {
    let Some(inodes) = open_socket_inodes(proc_root, pid) else {
        return Vec::new();
    };
    let mut ports = Vec::new();
    let net = proc_root.join(pid.to_string()).join("net");
    for name in ["tcp", "tcp6"] {
        let Ok(file) = std::fs::File::open(net.join(name)) else {
            continue;
        };
        for_each_line(file, |line| {
            if let Some(row) = parse_line(line)
                && row.state == TCP_LISTEN
                && inodes.contains(&row.inode)
                && ports.len() < MAX_LISTENERS
            {
                ports.push(row.local.port());
            }
        });
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// `socket:[1234]` → 1234.
fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    parse_decimal(digits).filter(|&inode| inode != 0)
}

/// A network namespace: its inode from `ns/net`, or the pid when that link cannot
/// be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum NamespaceKey {
    Net(u64),
    Pid(u32),
}

fn namespace_of(pid_dir: &Path, pid: u32) -> NamespaceKey {
    std::fs::read_link(pid_dir.join("ns").join("net"))
        .ok()
        .and_then(|t| {
            let digits = t
                .as_os_str()
                .as_bytes()
                .strip_prefix(b"net:[")?
                .strip_suffix(b"]")?;
            parse_decimal(digits)
        })
        .map_or(NamespaceKey::Pid(pid), NamespaceKey::Net)
}

/// The first few processes seen in each namespace, namespaces in order of their
/// first process.
#[derive(Default)]
struct NamespaceReaders {
    index: HashMap<NamespaceKey, usize>,
    readers: Vec<Vec<u32>>,
}

impl NamespaceReaders {
    fn add(&mut self, key: NamespaceKey, pid: u32) {
        match self.index.get(&key) {
            Some(&i) => {
                if self.readers[i].len() < READERS_PER_NAMESPACE {
                    self.readers[i].push(pid);
                }
            }
            None => {
                self.index.insert(key, self.readers.len());
                self.readers.push(vec![pid]);
            }
        }
    }

    fn readers(&self) -> impl Iterator<Item = &[u32]> {
        self.readers.iter().map(Vec::as_slice)
    }
}

/// An ESTABLISHED socket with an owner, before its role is known.
struct OwnedSocket {
    pid: u32,
    local: SocketAddr,
    remote: SocketAddr,
    inode: u64,
}

/// What one namespace's tcp and tcp6 tables hold that matters here.
#[derive(Default)]
struct NamespaceTables {
    listeners: HashSet<SocketAddr>,
    established: Vec<OwnedSocket>,
}

/// Reads `net_dir`/tcp and `net_dir`/tcp6. ESTABLISHED sockets found in `owners` are
/// taken out of it (so a namespace read twice yields them once) and kept, up to
/// `room`; the others are counted in `skipped`. `None` when neither file opens.
fn read_tables(
    net_dir: &Path,
    owners: &mut HashMap<u64, u32>,
    room: usize,
    skipped: &mut usize,
) -> Option<NamespaceTables> {
    let files: Vec<std::fs::File> = ["tcp", "tcp6"]
        .iter()
        .filter_map(|name| std::fs::File::open(net_dir.join(name)).ok())
        .collect();
    if files.is_empty() {
        return None;
    }
    let mut tables = NamespaceTables::default();
    for file in files {
        for_each_line(file, |line| {
            let Some(entry) = parse_line(line) else {
                return;
            };
            match entry.state {
                TCP_LISTEN if tables.listeners.len() < MAX_LISTENERS => {
                    tables.listeners.insert(entry.local);
                }
                TCP_ESTABLISHED => {
                    let Some(pid) = owners.remove(&entry.inode) else {
                        return;
                    };
                    if tables.established.len() < room {
                        tables.established.push(OwnedSocket {
                            pid,
                            local: entry.local,
                            remote: entry.remote,
                            inode: entry.inode,
                        });
                    } else {
                        *skipped += 1;
                    }
                }
                _ => {}
            }
        });
    }
    Some(tables)
}

fn role_of(local: SocketAddr, listeners: &HashSet<SocketAddr>) -> Role {
    let any_v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), local.port());
    let any_v6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), local.port());
    let served = listeners.contains(&local)
        || listeners.contains(&any_v6)
        || (local.is_ipv4() && listeners.contains(&any_v4));
    if served { Role::Server } else { Role::Client }
}

fn read_comm(proc_root: &Path, pid: u32) -> String {
    let mut bytes = Vec::new();
    let read = std::fs::File::open(proc_root.join(pid.to_string()).join("comm"))
        .and_then(|f| f.take(256).read_to_end(&mut bytes));
    match read {
        Ok(_) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    }
}

/// Calls `f` on each line of `file` that is UTF-8 and at most [`MAX_LINE`] bytes
/// long. A read error ends the file.
fn for_each_line(file: impl Read, mut f: impl FnMut(&str)) {
    let mut reader = BufReader::new(file);
    let mut line = Vec::with_capacity(MAX_LINE);
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() == MAX_LINE && line.last() != Some(&b'\n') {
            if skip_rest_of_line(&mut reader).is_err() {
                return;
            }
            continue;
        }
        if let Ok(text) = std::str::from_utf8(&line) {
            f(text);
        }
    }
}

fn skip_rest_of_line(reader: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            reader.consume(i + 1);
            return Ok(());
        }
        let n = buf.len();
        reader.consume(n);
    }
}

/// One row of /proc/net/tcp or tcp6.
#[derive(Debug, PartialEq, Eq)]
struct TcpRow {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
    inode: u64,
}

/// `   0: 0100007F:1F90 0100007F:A2C4 01 00000000:00000000 00:00000000 00000000  0  0 123456 1 ...`
/// (sl, local, remote, st, tx:rx queue, tr:when, retrnsmt, uid, timeout, inode, ...).
/// `None` for the header and anything malformed.
fn parse_line(line: &str) -> Option<TcpRow> {
    let mut fields = line.split_ascii_whitespace();
    fields.next()?.strip_suffix(':')?;
    let local = parse_endpoint(fields.next()?)?;
    let remote = parse_endpoint(fields.next()?)?;
    let state = u8::try_from(parse_hex(fields.next()?, 2)?).ok()?;
    let inode = parse_decimal(fields.nth(5)?.as_bytes())?;
    Some(TcpRow {
        local,
        remote,
        state,
        inode,
    })
}

/// `0100007F:1F90`: the address as 32-bit words in host byte order (one for IPv4,
/// four for IPv6), then the port, big-endian. IPv4-mapped IPv6 becomes IPv4.
fn parse_endpoint(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::try_from(parse_hex(port, 4)?).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(parse_hex(addr, 8)?.to_ne_bytes())),
        32 => {
            let mut octets = [0u8; 16];
            for (i, word) in octets.chunks_exact_mut(4).enumerate() {
                let hex = addr.get(i * 8..i * 8 + 8)?;
                word.copy_from_slice(&parse_hex(hex, 8)?.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(octets);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// 1 to `max_digits` hex digits (no sign, unlike `from_str_radix`).
fn parse_hex(s: &str, max_digits: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

/// Decimal digits only (no sign, unlike `str::parse`); `None` on overflow.
fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{os::unix::fs::symlink, path::PathBuf};

    /// This process's own connections, from the real /proc: held while open,
    /// gone once closed; a pid that does not exist cannot tell.
    #[test]
    fn open_connections_are_what_the_process_holds_now() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let ends = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        let me = std::process::id();
        let open = open_connections(Path::new("/proc"), me).expect("our own /proc");
        assert!(open.contains(&ends), "{ends:?} in {open:?}");
        assert!(
            !open.contains(&(listener.local_addr().unwrap(), "0.0.0.0:0".parse().unwrap())),
            "listening sockets are not connections"
        );
        drop(client);
        drop(server);
        let open = open_connections(Path::new("/proc"), me).expect("our own /proc");
        assert!(!open.contains(&ends), "closed: {open:?}");
        assert!(open_connections(Path::new("/proc"), u32::MAX - 1).is_none());
    }

    const NS_A: u64 = 4026531840;
    const NS_B: u64 = 4026532000;
    const ESTABLISHED: u8 = 0x01;
    const TIME_WAIT: u8 = 0x06;
    const LISTEN: u8 = 0x0A;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// An address as the kernel prints it: 32-bit words in host byte order.
    fn hex_addr(ip: IpAddr) -> String {
        let octets: Vec<u8> = match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        octets
            .chunks_exact(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect()
    }

    /// A tcp/tcp6 row in the kernel's layout. `local`/`remote` may be written as
    /// IPv4-mapped IPv6 ("[::ffff:127.0.0.1]:80") to land in a tcp6 row.
    fn row(slot: usize, local: &str, remote: &str, state: u8, inode: u64) -> String {
        let (l, r) = (addr(local), addr(remote));
        format!(
            "{slot:4}: {}:{:04X} {}:{:04X} {state:02X} 00000000:00000000 00:00000000 \
             00000000     0        0 {inode} 1 0000000000000000 20 0 0 10 -1",
            hex_addr(l.ip()),
            l.port(),
            hex_addr(r.ip()),
            r.port()
        )
    }

    const TCP_HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr \
                              tm->when retrnsmt   uid  timeout inode";

    fn table(rows: &[String]) -> String {
        let mut text = String::from(TCP_HEADER);
        for r in rows {
            text.push('\n');
            text.push_str(r);
        }
        text.push('\n');
        text
    }

    /// A fake /proc under a temporary directory.
    struct FakeProc {
        dir: tempfile::TempDir,
    }

    impl FakeProc {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("self")).unwrap();
            std::fs::create_dir_all(dir.path().join("sys/net")).unwrap();
            std::fs::create_dir_all(dir.path().join("+7/fd")).unwrap();
            std::fs::write(dir.path().join("uptime"), "1.0 1.0\n").unwrap();
            Self { dir }
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn pid_dir(&self, pid: u32) -> PathBuf {
            self.root().join(pid.to_string())
        }

        /// A process; `fds` are (fd, link target); `fds: None` leaves no fd directory.
        fn process(&self, pid: u32, comm: &str, ns: Option<u64>, fds: Option<&[(u32, &str)]>) {
            let dir = self.pid_dir(pid);
            std::fs::create_dir_all(dir.join("ns")).unwrap();
            std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            if let Some(ns) = ns {
                symlink(format!("net:[{ns}]"), dir.join("ns/net")).unwrap();
            }
            if let Some(fds) = fds {
                std::fs::create_dir_all(dir.join("fd")).unwrap();
                for (fd, target) in fds {
                    symlink(target, dir.join("fd").join(fd.to_string())).unwrap();
                }
            }
        }

        fn tables(&self, pid: u32, tcp: Option<String>, tcp6: Option<String>) {
            let net = self.pid_dir(pid).join("net");
            std::fs::create_dir_all(&net).unwrap();
            if let Some(tcp) = tcp {
                std::fs::write(net.join("tcp"), tcp).unwrap();
            }
            if let Some(tcp6) = tcp6 {
                std::fs::write(net.join("tcp6"), tcp6).unwrap();
            }
        }
    }

    const AGENT: u32 = 400;

    /// Namespace A: web (100) and app (200), the agent (400), an exited process (500).
    /// Namespace B: db (300). Process 600 whose namespace cannot be read, process 700
    /// likewise but without sockets.
    fn fake_proc() -> FakeProc {
        let p = FakeProc::new();
        p.process(
            100,
            "web",
            Some(NS_A),
            Some(&[
                (0, "/dev/null"),
                (3, "socket:[1000]"),
                (4, "socket:[1001]"),
                (5, "pipe:[77]"),
                (6, "anon_inode:[eventpoll]"),
                (7, "socket:[]"),
                (8, "socket:[-5]"),
            ]),
        );
        p.process(
            200,
            "app",
            Some(NS_A),
            Some(&[
                (3, "socket:[2001]"),
                (4, "socket:[1001]"),
                (5, "socket:[2002]"),
                (6, "socket:[2003]"),
                (7, "socket:[2004]"),
                (8, "socket:[2005]"),
                (9, "socket:[2006]"),
            ]),
        );
        p.process(
            300,
            "db",
            Some(NS_B),
            Some(&[
                (3, "socket:[3001]"),
                (4, "socket:[3002]"),
                (5, "socket:[3003]"),
            ]),
        );
        p.process(
            AGENT,
            "tracer-agent",
            Some(NS_A),
            Some(&[(3, "socket:[4001]")]),
        );
        p.process(500, "gone", Some(NS_A), None);
        p.process(600, "orphan", None, Some(&[(3, "socket:[6001]")]));
        p.process(700, "quiet", None, Some(&[(0, "/dev/null")]));

        p.tables(
            100,
            Some(table(&[
                row(0, "127.0.0.1:8080", "0.0.0.0:0", LISTEN, 1000),
                row(1, "127.0.0.1:8081", "0.0.0.0:0", LISTEN, 1003),
                // Accepted by web's listener.
                row(2, "127.0.0.1:8080", "127.0.0.1:40001", ESTABLISHED, 1001),
                // app to a database elsewhere.
                row(3, "10.0.0.2:40002", "10.0.0.5:5432", ESTABLISHED, 2001),
                // Port 8081 is only listened on 127.0.0.1.
                row(4, "10.0.0.2:8081", "10.0.0.7:5000", ESTABLISHED, 2003),
                row(5, "10.0.0.2:40005", "10.0.0.5:5432", TIME_WAIT, 2004),
                row(6, "10.0.0.2:40007", "10.0.0.5:5432", ESTABLISHED, 0),
                row(7, "10.0.0.2:40008", "10.0.0.5:5432", ESTABLISHED, 9999),
                row(8, "10.0.0.2:40009", "10.0.0.5:5432", ESTABLISHED, 4001),
                "   9: garbage".to_string(),
                "  10: 0100007F:1F90 0100007F:A2C4 01".to_string(),
                "  11: 0100007G:1F90 0100007F:A2C4 01 00000000:00000000 00:00000000 \
                 00000000     0        0 2001 1"
                    .to_string(),
            ])),
            Some(table(&[
                row(0, "[::]:9000", "[::]:0", LISTEN, 1010),
                row(
                    1,
                    "[::ffff:127.0.0.1]:9000",
                    "[::ffff:127.0.0.1]:40003",
                    ESTABLISHED,
                    2002,
                ),
                row(
                    2,
                    "[::ffff:10.0.0.2]:40006",
                    "[::ffff:10.0.0.8]:6379",
                    ESTABLISHED,
                    2005,
                ),
            ])),
        );
        // Namespace A is read through web: app's view of it must not be read.
        p.tables(
            200,
            Some(table(&[
                row(0, "127.0.0.1:8080", "0.0.0.0:0", LISTEN, 1000),
                row(1, "127.0.0.1:8080", "127.0.0.1:40001", ESTABLISHED, 1001),
                row(2, "10.9.9.9:1", "10.9.9.9:2", ESTABLISHED, 2006),
            ])),
            None,
        );
        p.tables(
            300,
            Some(table(&[
                row(0, "0.0.0.0:5432", "0.0.0.0:0", LISTEN, 3000),
                row(1, "10.0.0.5:5432", "10.0.0.9:40000", ESTABLISHED, 3001),
            ])),
            Some(table(&[
                row(0, "[::]:8443", "[::]:0", LISTEN, 3010),
                row(1, "[fd00::5]:8443", "[fd00::9]:50000", ESTABLISHED, 3002),
                // 8080 is listened on in namespace A, not here.
                row(2, "[fd00::5]:8080", "[fd00::7]:80", ESTABLISHED, 3003),
            ])),
        );
        // IPv6 disabled there: no tcp6.
        p.tables(
            600,
            Some(table(&[row(
                0,
                "192.168.1.2:41000",
                "192.168.1.1:443",
                ESTABLISHED,
                6001,
            )])),
            None,
        );
        p
    }

    fn socket(
        pid: u32,
        comm: &str,
        local: &str,
        remote: &str,
        role: Role,
        inode: u64,
    ) -> RecoveredSocket {
        RecoveredSocket {
            pid,
            comm: comm.into(),
            local: addr(local),
            remote: addr(remote),
            role,
            inode,
        }
    }

    fn all_sockets() -> Vec<RecoveredSocket> {
        use Role::{Client, Server};
        vec![
            socket(
                100,
                "web",
                "127.0.0.1:8080",
                "127.0.0.1:40001",
                Server,
                1001,
            ),
            socket(200, "app", "10.0.0.2:40002", "10.0.0.5:5432", Client, 2001),
            socket(
                200,
                "app",
                "127.0.0.1:9000",
                "127.0.0.1:40003",
                Server,
                2002,
            ),
            socket(200, "app", "10.0.0.2:8081", "10.0.0.7:5000", Client, 2003),
            socket(200, "app", "10.0.0.2:40006", "10.0.0.8:6379", Client, 2005),
            socket(300, "db", "10.0.0.5:5432", "10.0.0.9:40000", Server, 3001),
            socket(300, "db", "[fd00::5]:8443", "[fd00::9]:50000", Server, 3002),
            socket(300, "db", "[fd00::5]:8080", "[fd00::7]:80", Client, 3003),
            socket(
                600,
                "orphan",
                "192.168.1.2:41000",
                "192.168.1.1:443",
                Client,
                6001,
            ),
        ]
    }

    #[test]
    fn finds_established_sockets_with_owner_and_role() {
        let p = fake_proc();
        let (found, stats) = scan(p.root(), AGENT, 100).unwrap();
        assert_eq!(found, all_sockets());
        assert_eq!(
            stats,
            ScanStats {
                // 100, 200, 300, 500, 600, 700.
                processes: 6,
                // A, B, and 600's own.
                namespaces: 3,
                sockets: 9,
                skipped_over_limit: 0,
                // 500 has no fd directory.
                unreadable: 1,
            }
        );
    }

    #[test]
    fn max_bounds_the_result_and_counts_the_rest() {
        let p = fake_proc();
        let (found, stats) = scan(p.root(), AGENT, 4).unwrap();
        // Namespace A's tcp rows first, then its tcp6 rows.
        let first: Vec<u64> = found.iter().map(|s| s.inode).collect();
        assert_eq!(first, [1001, 2001, 2002, 2003]);
        assert_eq!(stats.sockets, 4);
        assert_eq!(stats.skipped_over_limit, 5);

        let (found, stats) = scan(p.root(), AGENT, 0).unwrap();
        assert!(found.is_empty());
        assert_eq!(stats.sockets, 0);
        assert_eq!(stats.skipped_over_limit, 9);
    }

    #[test]
    fn the_excluded_pid_can_be_anyone() {
        let p = fake_proc();
        // Not excluding the agent: its socket shows up.
        let (found, _) = scan(p.root(), 0, 100).unwrap();
        assert!(found.iter().any(|s| s.pid == AGENT && s.inode == 4001));
        // Excluding web: app, the other holder of 1001, gets it.
        let (found, stats) = scan(p.root(), 100, 100).unwrap();
        let s1001 = found.iter().find(|s| s.inode == 1001).unwrap();
        assert_eq!((s1001.pid, s1001.role), (200, Role::Server));
        // Namespace A is now read through app, whose view differs.
        assert!(found.iter().any(|s| s.inode == 2006));
        assert_eq!(stats.processes, 6);
    }

    #[test]
    fn a_namespace_is_read_through_another_process_when_the_first_is_gone() {
        let p = fake_proc();
        std::fs::remove_dir_all(p.pid_dir(100).join("net")).unwrap();
        let (found, stats) = scan(p.root(), AGENT, 100).unwrap();
        // app's view of namespace A: 1001 (still web's) and 2006.
        let inodes: Vec<u64> = found.iter().map(|s| s.inode).collect();
        assert_eq!(inodes, [1001, 2006, 3001, 3002, 3003, 6001]);
        assert_eq!((found[0].pid, found[0].role), (100, Role::Server));
        assert_eq!(stats.namespaces, 3);
        assert_eq!(stats.unreadable, 1);
    }

    #[test]
    fn a_namespace_no_process_can_show_is_counted() {
        let p = fake_proc();
        std::fs::remove_dir_all(p.pid_dir(300).join("net")).unwrap();
        let (found, stats) = scan(p.root(), AGENT, 100).unwrap();
        assert!(found.iter().all(|s| s.pid != 300));
        assert_eq!(stats.namespaces, 2);
        // 500's fds and namespace B.
        assert_eq!(stats.unreadable, 2);
    }

    #[test]
    fn a_missing_proc_root_is_an_error() {
        let p = FakeProc::new();
        assert!(scan(&p.root().join("nope"), 0, 10).is_err());
        let (found, stats) = scan(p.root(), 0, 10).unwrap();
        assert!(found.is_empty());
        assert_eq!(stats, ScanStats::default());
    }

    /// Rows captured from /proc/net/tcp and tcp6 on an x86-64 host (kernel 6.18).
    #[cfg(target_endian = "little")]
    #[test]
    fn parses_captured_kernel_rows() {
        let listen = "   0: 0100007F:DD0D 00000000:0000 0A 00000000:00000000 00:00000000 \
                      00000000     0        0 355959 1 00000000e7e520ad 100 0 0 10 0         ";
        assert_eq!(
            parse_line(listen),
            Some(TcpRow {
                local: addr("127.0.0.1:56589"),
                remote: addr("0.0.0.0:0"),
                state: 0x0A,
                inode: 355959,
            })
        );
        let est = "   3: 0100007F:BDC8 0100007F:DD0D 01 00000000:00000000 00:00000000 \
                   00000000     0        0 355960 2 0000000063edeb3e 20 0 0 10 -1";
        assert_eq!(
            parse_line(est),
            Some(TcpRow {
                local: addr("127.0.0.1:48584"),
                remote: addr("127.0.0.1:56589"),
                state: 0x01,
                inode: 355960,
            })
        );
        let v6 = "   1: 00000000000000000000000001000000:E8BE 00000000000000000000000001000000:8539 \
                  01 00000000:00000000 00:00000000 00000000     0        0 355963 2 \
                  00000000c6ef713b 20 0 0 10 -1";
        assert_eq!(
            parse_line(v6),
            Some(TcpRow {
                local: addr("[::1]:59582"),
                remote: addr("[::1]:34105"),
                state: 0x01,
                inode: 355963,
            })
        );
        let mapped = "   2: 0000000000000000FFFF00000100007F:8539 0000000000000000FFFF00000100007F:CC38 \
                      01 00000000:00000000 00:00000000 00000000     0        0 355966 1 \
                      000000007ef8a5aa 20 0 0 10 -1";
        assert_eq!(
            parse_line(mapped),
            Some(TcpRow {
                local: addr("127.0.0.1:34105"),
                remote: addr("127.0.0.1:52280"),
                state: 0x01,
                inode: 355966,
            })
        );
        let any6 = "   0: 00000000000000000000000000000000:8539 00000000000000000000000000000000:0000 \
                    0A 00000000:00000000 00:00000000 00000000     0        0 355962 1 \
                    000000009c961ee9 100 0 0 10 0";
        assert_eq!(parse_line(any6).unwrap().local, addr("[::]:34105"));
    }

    #[test]
    fn malformed_rows_are_skipped() {
        let good = row(0, "127.0.0.1:80", "127.0.0.1:4000", ESTABLISHED, 42);
        assert!(parse_line(&good).is_some());
        let tail = "01 00000000:00000000 00:00000000 00000000     0        0 42 1";
        for bad in [
            String::new(),
            TCP_HEADER.to_string(),
            "0:".to_string(),
            // No "sl:" column.
            format!("0100007F:0050 0100007F:0FA0 {tail}"),
            format!("0: 0100007F:0050 0100007F {tail}"),
            format!("0: +100007F:0050 0100007F:0FA0 {tail}"),
            format!("0: 0100007F:-050 0100007F:0FA0 {tail}"),
            format!("0: 0100007F:10050 0100007F:0FA0 {tail}"),
            format!("0: 0100007F: 0100007F:0FA0 {tail}"),
            format!("0: 0100007F00:0050 0100007F:0FA0 {tail}"),
            format!("0: 0000000000000000FFFF00000100007:0050 0100007F:0FA0 {tail}"),
            format!("0: 0000000000000000FFFF00000100é7F:0050 0100007F:0FA0 {tail}"),
            "0: 0100007F:0050 0100007F:0FA0 101 00000000:00000000 00:00000000 0 0 0 42".into(),
            "0: 0100007F:0050 0100007F:0FA0 01 00000000:00000000 00:00000000 0 0 0 -42".into(),
            "0: 0100007F:0050 0100007F:0FA0 01 00000000:00000000 00:00000000 0 0 0 +42".into(),
            "0: 0100007F:0050 0100007F:0FA0 01 0:0 0:0 0 0 0 99999999999999999999".into(),
            "0: 0100007F:0050 0100007F:0FA0 01 00000000:00000000 00:00000000 0 0 0".into(),
        ] {
            assert_eq!(parse_line(&bad), None, "{bad:?}");
        }
        assert_eq!(socket_inode(b"socket:[12]"), Some(12));
        for bad in [
            &b"socket:[0]"[..],
            b"socket:[]",
            b"socket:[+1]",
            b"socket:12",
            b"pipe:[12]",
        ] {
            assert_eq!(socket_inode(bad), None);
        }
    }

    #[test]
    fn overlong_and_non_utf8_lines_are_skipped() {
        let good = row(0, "127.0.0.1:80", "127.0.0.1:4000", ESTABLISHED, 42);
        let mut text = Vec::new();
        text.extend_from_slice(format!("{TCP_HEADER}\n").as_bytes());
        text.extend_from_slice(&vec![b'7'; 100_000]);
        text.push(b'\n');
        text.extend_from_slice(b"  1: \xff\xfe\n");
        text.extend_from_slice(good.as_bytes());
        let mut lines = Vec::new();
        for_each_line(&text[..], |l| lines.push(l.to_string()));
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1], good);
        assert!(parse_line(&lines[1]).is_some());

        // An overlong last line without a newline ends the file quietly.
        let mut lines = 0;
        for_each_line(&vec![b'1'; MAX_LINE * 3][..], |_| lines += 1);
        assert_eq!(lines, 0);
    }

    #[test]
    fn random_input_never_panics() {
        let good = row(0, "[fd00::1]:80", "[fd00::2]:4000", ESTABLISHED, 42);
        let alphabet = b"0123456789ABCDEFabcdef:[] \n\t-+xyz\xff";
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2_000 {
            // Random bytes, and the good row with random bytes flipped.
            let len = rng.usize(0..300);
            let noise: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let mut mutated = good.clone().into_bytes();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(..mutated.len());
                mutated[i] = alphabet[rng.usize(..alphabet.len())];
            }
            for input in [noise, mutated] {
                for_each_line(&input[..], |l| {
                    let _ = parse_line(l);
                });
            }
        }
    }

    #[test]
    fn roles_follow_listeners_in_the_namespace() {
        let listeners: HashSet<SocketAddr> = [
            addr("127.0.0.1:8080"),
            addr("0.0.0.0:5432"),
            addr("[::]:9000"),
            addr("[::1]:7000"),
        ]
        .into();
        for (local, role) in [
            ("127.0.0.1:8080", Role::Server),
            ("10.0.0.1:8080", Role::Client),
            ("10.0.0.1:5432", Role::Server),
            ("[::1]:5432", Role::Client),
            ("10.0.0.1:9000", Role::Server),
            ("[fd00::1]:9000", Role::Server),
            ("[::1]:7000", Role::Server),
            ("127.0.0.1:7000", Role::Client),
            ("127.0.0.1:40000", Role::Client),
        ] {
            assert_eq!(role_of(addr(local), &listeners), role, "{local}");
        }
    }

    #[test]
    fn finds_a_loopback_connection_in_the_real_proc() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let me = std::process::id();

        let (found, stats) = scan(Path::new("/proc"), 0, 1_000_000)
            .expect("/proc should be readable by the test process");
        assert!(stats.processes > 0, "{stats:?}");
        assert!(stats.namespaces > 0, "{stats:?}");
        assert_eq!(stats.sockets, found.len());
        assert_eq!(stats.skipped_over_limit, 0);

        let find = |local: SocketAddr, remote: SocketAddr| {
            found
                .iter()
                .find(|s| s.local == local && s.remote == remote)
                .unwrap_or_else(|| panic!("no socket {local} -> {remote} in {found:#?}"))
        };
        let c = find(client.local_addr().unwrap(), client.peer_addr().unwrap());
        assert_eq!((c.pid, c.role), (me, Role::Client), "{c:?}");
        assert!(!c.comm.is_empty());
        let a = find(
            accepted.local_addr().unwrap(),
            accepted.peer_addr().unwrap(),
        );
        assert_eq!((a.pid, a.role), (me, Role::Server), "{a:?}");
        assert_ne!(a.inode, c.inode);

        // Excluding this process hides them.
        let (found, _) = scan(Path::new("/proc"), me, 1_000_000).unwrap();
        assert!(found.iter().all(|s| s.pid != me));
    }
}
