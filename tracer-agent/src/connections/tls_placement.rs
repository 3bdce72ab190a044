//! Placing TLS plaintext read behind a memory BIO (Node.js, Python's asyncio) on
//! its connection.
//!
//! Where OpenSSL does its own socket I/O the kernel ties each `SSL*` to its
//! socket. Behind a memory BIO the application moves the ciphertext itself,
//! outside OpenSSL's calls, so the kernel sends that plaintext keyed by the
//! `SSL*` (`flags::TLS_UNBOUND`). An event loop does both on one thread, next to
//! each other: it reads a socket, then hands the bytes to `SSL_read`; it gives
//! `SSL_write` the plaintext, then writes what came out to the socket. So an
//! `SSL*` is bound to a socket when, on the same thread:
//!
//! - its plaintext read follows a read of TLS application data on that socket,
//!   within [`MAX_READ_GAP_NS`], the ciphertext longer than the plaintext; or
//! - its plaintext write is followed by a write on that socket whose first TLS
//!   record has the length that plaintext gives (plaintext plus the record's
//!   overhead, [`MIN_OVERHEAD`]..=[`MAX_OVERHEAD`]); the plaintext waits for it.
//!
//! A socket already bound to another `SSL*` of the process is never bound again
//! (a wrong connection is worse than none), and a binding is forgotten when its
//! connection ends. Plaintext that cannot be placed is dropped and counted.

use foldhash::{HashMap, HashMapExt};
use tracer_common::data::{Direction, flags};

use crate::capture::DataRecord;

/// Longest time between a ciphertext read and the plaintext read it gave. On a
/// real host this is microseconds (the same callback); the bound only keeps a
/// read from long ago from binding, and it must hold on slow hosts too (with
/// 50 ms, a Node.js server's first request over TLS went unplaced once in an
/// emulated VM).
pub const MAX_READ_GAP_NS: u64 = 1_000_000_000;
/// Longest a plaintext write waits for its ciphertext.
pub const MAX_WAIT_NS: u64 = 2_000_000_000;
/// What a TLS record adds to its plaintext: TLS 1.3 AEAD adds 17 bytes (type +
/// tag), TLS 1.2 AEAD 24 (nonce + tag), ChaCha20 16; CBC with an HMAC and padding
/// up to 96.
pub const MIN_OVERHEAD: u32 = 16;
pub const MAX_OVERHEAD: u32 = 96;
/// Largest plaintext in one record.
const MAX_RECORD_PLAINTEXT: u32 = 16_384;
/// Bindings kept; past it they are all forgotten (and learned again at the next
/// exchange of each connection).
pub const MAX_BINDINGS: usize = 65_536;
/// `SSL*`s with plaintext writes waiting, and records waiting per `SSL*`.
pub const MAX_WAITING: usize = 1_024;
pub const MAX_WAITING_RECORDS: usize = 16;
/// Threads remembered (their last ciphertext read, their waiting write).
pub const MAX_THREADS: usize = 16_384;

/// An `SSL*` in a process.
type Key = (u32, u64);

/// The last TLS application-data read of a thread.
#[derive(Clone, Copy, Debug)]
struct CipherRead {
    sock: u64,
    ts_ns: u64,
    len: u32,
}

#[derive(Debug)]
struct Waiting {
    records: Vec<DataRecord>,
    since_ns: u64,
}

/// What became of plaintext or ciphertext given to [`TlsPlacement`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Plaintext records now on their socket (`meta.sock`), in order, flagged
    /// `TLS` only.
    pub records: Vec<DataRecord>,
    /// Plaintext records dropped: not placeable, or waiting too long or too many.
    pub dropped: u64,
}

/// The bindings of memory-BIO `SSL*`s to sockets, and the plaintext waiting for one.
#[derive(Default)]
pub struct TlsPlacement {
    bound: HashMap<Key, u64>,
    by_sock: HashMap<u64, Key>,
    waiting: HashMap<Key, Waiting>,
    /// The `SSL*` whose plaintext write waits for this thread's next ciphertext write.
    pending_send: HashMap<u32, Key>,
    last_read: HashMap<u32, CipherRead>,
    last_sweep_ns: u64,
    /// Entries forgotten to stay within the limits since the table last took
    /// the count (it goes to `tracer_state_forgotten_total{table="tls_placement"}`).
    pub forgotten: u64,
}

/// True when `payload` starts with a TLS record of a connection under way
/// (ChangeCipherSpec, alert, handshake or application data: TLS 1.3 sends a
/// ChangeCipherSpec before its Finished, in the same write as the first request).
pub fn is_tls_record(payload: &[u8]) -> bool {
    matches!(payload, [0x14..=0x17, 0x03, 0x01..=0x04, _, _, ..])
}

/// The lengths of the TLS application-data records whose headers lie in the
/// captured `payload` (one write may carry several: TLS 1.3 sends the end of its
/// handshake as application data, and a client's first request with it).
fn app_data_record_lens(payload: &[u8]) -> impl Iterator<Item = u32> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let header = payload.get(pos..pos + 5)?;
        if header[1] != 0x03 {
            return None;
        }
        let len = u16::from_be_bytes([header[3], header[4]]);
        pos += 5 + usize::from(len);
        Some((header[0], u32::from(len)))
    })
    .filter(|(kind, _)| *kind == 0x17)
    .map(|(_, len)| len)
}

impl TlsPlacement {
    pub fn new() -> Self {
        Self {
            bound: HashMap::new(),
            by_sock: HashMap::new(),
            waiting: HashMap::new(),
            pending_send: HashMap::new(),
            last_read: HashMap::new(),
            last_sweep_ns: 0,
            forgotten: 0,
        }
    }

    /// Plaintext keyed by its `SSL*` (`meta.sock`; flags `TLS | TLS_UNBOUND`).
    pub fn plaintext(&mut self, mut rec: DataRecord) -> Placed {
        let mut placed = self.sweep(rec.meta.ts_ns);
        let key = (rec.meta.tgid, rec.meta.sock);
        if let Some(&sock) = self.bound.get(&key) {
            placed.records.push(on_socket(rec, sock));
            return placed;
        }
        match rec.direction {
            Direction::Recv => {
                let read = self.last_read.get(&rec.meta.tid).copied();
                match read {
                    Some(r)
                        if rec.meta.ts_ns.saturating_sub(r.ts_ns) <= MAX_READ_GAP_NS
                            && r.len > rec.total_len.min(MAX_RECORD_PLAINTEXT)
                            && self.bind(key, r.sock) =>
                    {
                        self.last_read.remove(&rec.meta.tid);
                        placed.records.push(on_socket(rec, r.sock));
                    }
                    _ => placed.dropped += 1,
                }
            }
            Direction::Send => {
                if !self.waiting.contains_key(&key) && self.waiting.len() >= MAX_WAITING {
                    placed.dropped += 1;
                    return placed;
                }
                let waiting = self.waiting.entry(key).or_insert_with(|| Waiting {
                    records: Vec::new(),
                    since_ns: rec.meta.ts_ns,
                });
                if waiting.records.len() >= MAX_WAITING_RECORDS {
                    placed.dropped += 1;
                    return placed;
                }
                rec.flags &= !flags::TLS_UNBOUND;
                waiting.records.push(rec.clone());
                if self.pending_send.len() >= MAX_THREADS {
                    self.forgotten += self.pending_send.len() as u64;
                    self.pending_send.clear();
                }
                self.pending_send.insert(rec.meta.tid, key);
            }
        }
        placed
    }

    /// A record of ciphertext (starting with a TLS record) on a followed socket:
    /// a read is remembered for the thread's next plaintext read; a write may be
    /// the one a waiting plaintext write gave, whose records are then placed.
    pub fn ciphertext(&mut self, rec: &DataRecord) -> Placed {
        let mut placed = Placed::default();
        match rec.direction {
            Direction::Recv => {
                if self.last_read.len() >= MAX_THREADS {
                    self.forgotten += self.last_read.len() as u64;
                    self.last_read.clear();
                }
                self.last_read.insert(
                    rec.meta.tid,
                    CipherRead {
                        sock: rec.meta.sock,
                        ts_ns: rec.meta.ts_ns,
                        len: rec.total_len,
                    },
                );
            }
            Direction::Send => {
                let Some(&key) = self.pending_send.get(&rec.meta.tid) else {
                    return placed;
                };
                if key.0 != rec.meta.tgid {
                    return placed;
                }
                let Some(first) = self.waiting.get(&key).and_then(|w| w.records.first()) else {
                    self.pending_send.remove(&rec.meta.tid);
                    return placed;
                };
                let n = first.total_len.min(MAX_RECORD_PLAINTEXT);
                let fits = app_data_record_lens(&rec.payload)
                    .any(|len| (n + MIN_OVERHEAD..=n + MAX_OVERHEAD).contains(&len));
                if fits && self.bind(key, rec.meta.sock) {
                    self.pending_send.remove(&rec.meta.tid);
                    if let Some(w) = self.waiting.remove(&key) {
                        let sock = rec.meta.sock;
                        placed
                            .records
                            .extend(w.records.into_iter().map(|r| on_socket(r, sock)));
                    }
                }
            }
        }
        placed
    }

    /// The connection on `sock` ended: its `SSL*` may be freed and its address
    /// reused for another connection.
    pub fn forget_sock(&mut self, sock: u64) {
        if let Some(key) = self.by_sock.remove(&sock) {
            self.bound.remove(&key);
        }
    }

    /// Binds `key` to `sock` unless the socket is bound to another `SSL*`.
    fn bind(&mut self, key: Key, sock: u64) -> bool {
        match self.by_sock.get(&sock) {
            Some(other) if *other != key => return false,
            Some(_) => return true,
            None => {}
        }
        if self.bound.len() >= MAX_BINDINGS {
            self.forgotten += self.bound.len() as u64;
            self.bound.clear();
            self.by_sock.clear();
        }
        if let Some(old) = self.bound.insert(key, sock) {
            self.by_sock.remove(&old);
        }
        self.by_sock.insert(sock, key);
        true
    }

    /// Drops plaintext writes that waited too long (at most once a second).
    fn sweep(&mut self, now_ns: u64) -> Placed {
        let mut placed = Placed::default();
        if now_ns.saturating_sub(self.last_sweep_ns) < 1_000_000_000 {
            return placed;
        }
        self.last_sweep_ns = now_ns;
        self.waiting.retain(|_, w| {
            let keep = now_ns.saturating_sub(w.since_ns) <= MAX_WAIT_NS;
            if !keep {
                placed.dropped += w.records.len() as u64;
            }
            keep
        });
        placed
    }
}

/// The record on its socket, as if the kernel had known it.
fn on_socket(mut rec: DataRecord, sock: u64) -> DataRecord {
    rec.meta.sock = sock;
    rec.flags &= !flags::TLS_UNBOUND;
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Meta;

    const SSL_A: u64 = 0x5555_0000_1000;
    const SSL_B: u64 = 0x5555_0000_2000;
    const SOCK_A: u64 = 0xffff_8880_0000_a000;
    const SOCK_B: u64 = 0xffff_8880_0000_b000;

    fn rec(
        ts: u64,
        tid: u32,
        key: u64,
        dir: Direction,
        payload: &[u8],
        total: u32,
        f: u32,
    ) -> DataRecord {
        DataRecord {
            meta: Meta {
                ts_ns: ts,
                tgid: 7,
                tid,
                sock: key,
                comm: Default::default(),
            },
            direction: dir,
            syscall: 0,
            total_len: total,
            payload: payload.to_vec().into(),
            flags: f,
        }
    }

    fn plain(ts: u64, tid: u32, ssl: u64, dir: Direction, bytes: &[u8]) -> DataRecord {
        rec(
            ts,
            tid,
            ssl,
            dir,
            bytes,
            bytes.len() as u32,
            flags::TLS | flags::TLS_UNBOUND,
        )
    }

    /// A TLS 1.3 application-data record of `n` plaintext bytes (17 of overhead).
    fn cipher(ts: u64, tid: u32, sock: u64, dir: Direction, n: u32) -> DataRecord {
        let len = n + 17;
        let mut bytes = vec![0x17, 0x03, 0x03];
        bytes.extend_from_slice(&(len as u16).to_be_bytes());
        bytes.extend_from_slice(&vec![0xaa; len as usize]);
        rec(ts, tid, sock, dir, &bytes, len + 5, 0)
    }

    #[test]
    fn a_write_waits_for_its_ciphertext_then_reads_follow_the_binding() {
        let mut p = TlsPlacement::new();
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let placed = p.plaintext(plain(10, 1, SSL_A, Direction::Send, req));
        assert!(placed.records.is_empty(), "waits");
        // Another thread's ciphertext does not bind it.
        let c = cipher(11, 2, SOCK_B, Direction::Send, req.len() as u32);
        assert!(p.ciphertext(&c).records.is_empty());
        let c = cipher(12, 1, SOCK_A, Direction::Send, req.len() as u32);
        let placed = p.ciphertext(&c);
        assert_eq!(placed.records.len(), 1);
        assert_eq!(placed.records[0].meta.sock, SOCK_A);
        assert_eq!(placed.records[0].flags, flags::TLS);
        assert_eq!(placed.records[0].meta.ts_ns, 10, "its own time");
        // The answer: bound already, placed at once, whatever the thread read last.
        let placed = p.plaintext(plain(30, 1, SSL_A, Direction::Recv, b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(placed.records[0].meta.sock, SOCK_A);
    }

    #[test]
    fn a_read_is_placed_by_the_ciphertext_its_thread_just_read() {
        let mut p = TlsPlacement::new();
        let req = b"GET / HTTP/1.1\r\n\r\n";
        let c = cipher(10, 1, SOCK_A, Direction::Recv, req.len() as u32);
        p.ciphertext(&c);
        let placed = p.plaintext(plain(11, 1, SSL_A, Direction::Recv, req));
        assert_eq!(placed.records[0].meta.sock, SOCK_A);
        // Too late after the read, or more plaintext than ciphertext: dropped.
        let c = cipher(100, 2, SOCK_B, Direction::Recv, 10);
        p.ciphertext(&c);
        let placed = p.plaintext(plain(
            100 + MAX_READ_GAP_NS + 1,
            2,
            SSL_B,
            Direction::Recv,
            b"0123456789",
        ));
        assert_eq!((placed.records.len(), placed.dropped), (0, 1));
        let c = cipher(200, 2, SOCK_B, Direction::Recv, 4);
        p.ciphertext(&c);
        let placed = p.plaintext(plain(201, 2, SSL_B, Direction::Recv, &[b'x'; 64]));
        assert_eq!((placed.records.len(), placed.dropped), (0, 1));
    }

    #[test]
    fn a_socket_bound_to_one_ssl_is_never_given_to_another() {
        let mut p = TlsPlacement::new();
        let c = cipher(10, 1, SOCK_A, Direction::Recv, 5);
        p.ciphertext(&c);
        assert_eq!(
            p.plaintext(plain(11, 1, SSL_A, Direction::Recv, b"hello"))
                .records
                .len(),
            1
        );
        let c = cipher(12, 1, SOCK_A, Direction::Recv, 5);
        p.ciphertext(&c);
        let placed = p.plaintext(plain(13, 1, SSL_B, Direction::Recv, b"world"));
        assert_eq!((placed.records.len(), placed.dropped), (0, 1));
        // Once the connection ended, its socket address may serve another.
        p.forget_sock(SOCK_A);
        let c = cipher(14, 1, SOCK_A, Direction::Recv, 5);
        p.ciphertext(&c);
        assert_eq!(
            p.plaintext(plain(15, 1, SSL_B, Direction::Recv, b"again"))
                .records[0]
                .meta
                .sock,
            SOCK_A
        );
    }

    /// TLS 1.3: the client's ChangeCipherSpec, its Finished (an application-data
    /// record of its own) and its first request go out in one write.
    #[test]
    fn a_write_is_found_among_the_records_of_one_send() {
        let mut p = TlsPlacement::new();
        let req = b"GET /first HTTP/1.1\r\n\r\n";
        p.plaintext(plain(10, 1, SSL_A, Direction::Send, req));
        let finished = cipher(11, 1, SOCK_A, Direction::Send, 36);
        let request = cipher(11, 1, SOCK_A, Direction::Send, req.len() as u32);
        // ChangeCipherSpec, Finished, the request.
        let mut both = vec![0x14, 0x03, 0x03, 0x00, 0x01, 0x01];
        both.extend_from_slice(&finished.payload);
        both.extend_from_slice(&request.payload);
        let mut c = finished.clone();
        c.total_len = both.len() as u32;
        c.payload = both.into();
        let placed = p.ciphertext(&c);
        assert_eq!(placed.records.len(), 1);
        assert_eq!(placed.records[0].meta.sock, SOCK_A);
        // Records of other lengths only: no binding.
        p.plaintext(plain(20, 2, SSL_B, Direction::Send, &[b'y'; 300]));
        let c = cipher(21, 2, SOCK_B, Direction::Send, 36);
        assert!(p.ciphertext(&c).records.is_empty());
    }

    #[test]
    fn a_write_whose_ciphertext_does_not_fit_keeps_waiting_then_is_dropped() {
        let mut p = TlsPlacement::new();
        let body = [b'x'; 100];
        p.plaintext(plain(10, 1, SSL_A, Direction::Send, &body));
        // A record of another size on another socket (another connection's write).
        let c = cipher(11, 1, SOCK_B, Direction::Send, 500);
        assert!(p.ciphertext(&c).records.is_empty());
        // Two seconds later the wait is over: dropped, counted.
        let placed = p.plaintext(plain(
            10 + MAX_WAIT_NS + 1_000_000_000,
            3,
            SSL_B,
            Direction::Send,
            b"x",
        ));
        assert_eq!(placed.dropped, 1);
        assert!(placed.records.is_empty());
    }

    #[test]
    fn waiting_is_bounded() {
        let mut p = TlsPlacement::new();
        let mut dropped = 0;
        for i in 0..(MAX_WAITING_RECORDS as u64 + 3) {
            dropped += p
                .plaintext(plain(10 + i, 1, SSL_A, Direction::Send, b"abc"))
                .dropped;
        }
        assert_eq!(dropped, 3);
        for i in 0..(MAX_WAITING as u64 + 5) {
            dropped += p
                .plaintext(plain(100, 2, 0x7000_0000 + i * 64, Direction::Send, b"abc"))
                .dropped;
        }
        assert_eq!(dropped, 3 + 6, "one key was there already");
    }

    #[test]
    fn tls_records_are_told_and_application_data_found_among_them() {
        assert!(is_tls_record(&[0x17, 0x03, 0x03, 0x01, 0x00, 0]));
        assert!(is_tls_record(&[0x14, 0x03, 0x03, 0x00, 0x01, 1]));
        assert!(!is_tls_record(&[0x18, 0x03, 0x03, 0x00, 0x01, 1]));
        assert!(!is_tls_record(&[0x17, 0x03]));
        assert!(!is_tls_record(b"GET / HTTP/1.1"));
        // A handshake record, then two application-data records.
        let mut bytes = vec![0x16, 0x03, 0x03, 0x00, 0x02, 1, 2];
        bytes.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 9]);
        bytes.extend_from_slice(&[0x17, 0x03, 0x03, 0x01, 0x00]);
        assert_eq!(app_data_record_lens(&bytes).collect::<Vec<_>>(), [1, 256]);
    }
}
