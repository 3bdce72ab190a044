//! One socket read or write: its full length and a bounded prefix of its bytes.

use crate::{MAX_CAPTURE, event::EventHeader};

/// Direction of a data event, seen from the local process.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The process wrote to the socket.
    Send = 1,
    /// The process read from the socket.
    Recv = 2,
}

/// Flags in [`DataHeader::flags`].
pub mod flags {
    /// The syscall's buffer could not be located or read: no bytes were captured.
    pub const UNREADABLE: u32 = 1;
    /// Fewer bytes were captured than the syscall moved.
    pub const TRUNCATED: u32 = 2;
    /// The syscall was not a plain read/write family call (sendfile, splice,
    /// io_uring): only the length is known.
    pub const NO_USER_BUFFER: u32 = 4;
    /// Plaintext of a TLS connection, read by the probes on the TLS library's
    /// read/write functions (after decryption, before encryption); the socket's
    /// own records of the same bytes (ciphertext) are not sent.
    pub const TLS: u32 = 8;
    /// With `TLS`: the `SSL*` had no socket I/O inside any of its calls (a memory
    /// BIO: Node.js, Python's asyncio), so the header's `sock` is the `SSL*` (a
    /// user-space address), not a socket; user space places it on the connection
    /// whose ciphertext the same thread moves next to it.
    pub const TLS_UNBOUND: u32 = 16;
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DataHeader {
    pub header: EventHeader,
    /// A [`Direction`] as `u32`.
    pub direction: u32,
    /// Syscall number the I/O came from (architecture specific).
    pub syscall: u32,
    /// Bytes the syscall actually moved.
    pub total_len: u32,
    /// Bytes that follow this header (≤ `total_len`, ≤ the configured capture size).
    pub captured_len: u32,
    /// See [`flags`].
    pub flags: u32,
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<DataHeader>() == 72);

/// The whole data event as assembled in per-CPU scratch. Only
/// `size_of::<DataHeader>() + captured_len` bytes go into the ring buffer.
/// The payload area is twice [`MAX_CAPTURE`] so that copies at a masked offset
/// with a masked length always stay in bounds for the verifier.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataEvent {
    pub hdr: DataHeader,
    pub payload: [u8; MAX_CAPTURE * 2],
}

const _: () = assert!(core::mem::size_of::<DataEvent>() == 72 + MAX_CAPTURE * 2);
