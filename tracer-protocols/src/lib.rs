//! tracer's protocol decoders: pure functions over byte streams.
//!
//! Nothing here touches BPF, sockets, threads or the clock: the agent (tracer-agent)
//! captures the bytes and hands them over as [`Chunk`]s.
//!
//! A connection's two directions are each a sequence of [`Chunk`]s, one per socket
//! read or write. The kernel hands over only a bounded prefix of each syscall's bytes
//! with the syscall's full length, so a chunk may end in a gap of known size: decoders
//! skip bodies by length and never need the bytes they were not given.
//!
//! Decoders are total: any bytes in, messages or an error out, never a panic.

pub mod db;
#[cfg(any(test, fuzzing))]
pub mod fuzz_logic;
pub mod http1;
pub mod http_target;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod sql;
pub mod testdata;

/// One syscall's worth of one direction of a connection's byte stream.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    /// The captured prefix of the bytes the syscall moved.
    pub bytes: &'a [u8],
    /// How many bytes the syscall moved; `len - bytes.len()` bytes after the prefix
    /// were not captured (a gap). Never less than `bytes.len()`.
    pub len: usize,
    /// When the syscall happened, in Unix nanoseconds.
    pub ts_ns: u64,
}

impl<'a> Chunk<'a> {
    /// A fully captured chunk.
    pub fn whole(bytes: &'a [u8], ts_ns: u64) -> Self {
        Self {
            bytes,
            len: bytes.len(),
            ts_ns,
        }
    }

    /// Bytes moved but not captured.
    pub fn gap(&self) -> usize {
        self.len.saturating_sub(self.bytes.len())
    }
}

/// At most `limit` bytes of `bytes` as lossy UTF-8, never cut inside a UTF-8
/// sequence: how every decoder keeps a name, header value or statement text.
pub fn bounded_text(bytes: &[u8], limit: usize) -> String {
    let mut cut = bytes.len().min(limit);
    if cut < bytes.len() {
        // Back up over at most three continuation bytes to a sequence start.
        for _ in 0..3 {
            match bytes.get(cut) {
                Some(b) if b & 0xC0 == 0x80 && cut > 0 => cut -= 1,
                _ => break,
            }
        }
    }
    let mut kept = String::from_utf8_lossy(bytes.get(..cut).unwrap_or(bytes)).into_owned();
    if kept.len() > limit {
        // Replacement characters (3 bytes each) made it longer.
        let mut end = limit;
        while !kept.is_char_boundary(end) {
            end -= 1;
        }
        kept.truncate(end);
    }
    kept
}
