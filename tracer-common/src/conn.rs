//! Connection lifecycle: what the kernel knows about each followed TCP socket.

use crate::event::EventHeader;

/// Which end of the connection the local process is.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not seen being established (the socket existed before the agent started).
    Unknown = 0,
    /// The local socket called `connect()` (SYN_SENT → ESTABLISHED).
    Client = 1,
    /// The local socket was accepted from a listener (SYN_RECV → ESTABLISHED).
    Server = 2,
}

impl Role {
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Client,
            2 => Self::Server,
            _ => Self::Unknown,
        }
    }
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Addresses and ports of one TCP connection, seen from the local socket.
/// IPv4 addresses sit in the first four bytes of the 16-byte arrays.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Host byte order.
    pub local_port: u16,
    /// Host byte order.
    pub remote_port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<Tuple>() == 40);

/// Value of the `SOCKS` map: per-socket state kept in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockInfo {
    pub tuple: Tuple,
    /// A [`Role`] as `u32`.
    pub role: u32,
    /// Process that called `connect()`, then the last process that did I/O on the
    /// socket (whose thread name was last sent); 0 when unknown.
    pub tgid: u32,
    /// `CLOCK_BOOTTIME` ns when the socket was first seen.
    pub opened_ns: u64,
    /// 1 once a `ConnOpen` event was sent for this socket.
    pub announced: u32,
    /// Non-zero when this socket's I/O is skipped after one map lookup:
    /// [`IGNORED_FILTERED`] (the `--port` filter) or [`IGNORED_NOT_DECODED`] (user
    /// space looked at its first bytes and decodes nothing on it).
    pub ignored: u32,
}

/// `SockInfo::ignored`: excluded by the `--port` filter.
pub const IGNORED_FILTERED: u32 = 1;
/// `SockInfo::ignored`: user space does not decode this socket.
pub const IGNORED_NOT_DECODED: u32 = 2;

const _: () = assert!(core::mem::size_of::<SockInfo>() == 64);

/// `TCP_FIN_WAIT1`: this end closed (or shut down writing) first.
pub const TCP_FIN_WAIT1: u32 = 4;
/// `TCP_CLOSE_WAIT`: the peer closed first.
pub const TCP_CLOSE_WAIT: u32 = 8;

/// `ConnOpen` / `ConnClose` / `ConnEnding` event.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnEvent {
    pub header: EventHeader,
    pub tuple: Tuple,
    /// A [`Role`] as `u32`.
    pub role: u32,
    /// TCP state the socket left (`ConnClose`), the state it entered
    /// (`ConnEnding`: [`TCP_FIN_WAIT1`] or [`TCP_CLOSE_WAIT`]), or 0.
    pub old_state: u32,
}

const _: () = assert!(core::mem::size_of::<ConnEvent>() == 96);

#[cfg(feature = "user")]
unsafe impl aya::Pod for SockInfo {}
