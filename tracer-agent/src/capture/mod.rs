//! Capture: the only stage that knows about BPF.
//!
//! It loads and attaches the kernel programs ([`loader`]), reads the ring buffer
//! through a [`reader::RecordSource`] and turns each raw record into an owned
//! [`Event`], in bounded batches ([`reader::drain`]). Everything downstream consumes
//! `Vec<Event>` batches from a bounded channel, so it can be tested by replaying
//! recorded events without root.

pub mod backend;
pub mod kernel_info;
pub mod loader;
pub mod reader;
pub mod recording;
mod return_probe;
pub mod tls_libs;
pub mod tls_probes;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tracer_common::{
    conn::{AF_INET, AF_INET6, ConnEvent, Role, Tuple},
    data::{DataHeader, Direction, flags},
    event::{EventHeader, EventKind},
};

/// Fields every event carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Unix nanoseconds.
    pub ts_ns: u64,
    /// Process id; 0 when the kernel did not know it (softirq context).
    pub tgid: u32,
    /// Thread id; 0 when unknown.
    pub tid: u32,
    /// Kernel socket address: the connection's identity while it lives.
    pub sock: u64,
    /// Thread name, when known.
    pub comm: Comm,
}

/// A thread name (`comm`, at most 15 bytes), kept inline: copying it costs no
/// allocation per event.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Comm {
    bytes: [u8; 16],
    len: u8,
}

impl Comm {
    /// From the kernel's NUL-padded field; invalid UTF-8 is replaced.
    pub fn from_kernel(raw: &[u8; 16]) -> Self {
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        match std::str::from_utf8(&raw[..end]) {
            Ok(s) => Self::from(s),
            Err(_) => Self::from(String::from_utf8_lossy(&raw[..end]).as_ref()),
        }
    }

    pub fn as_str(&self) -> &str {
        // Only ever filled from a `&str` cut at a char boundary.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl From<&str> for Comm {
    fn from(s: &str) -> Self {
        let mut end = s.len().min(16);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0u8; 16];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        Self {
            bytes,
            len: end as u8,
        }
    }
}

impl std::ops::Deref for Comm {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A TCP connection's endpoints, seen from the local socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoints {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Endpoints {
    pub fn from_tuple(t: &Tuple) -> Option<Self> {
        let addr = |a: &[u8; 16]| -> Option<IpAddr> {
            match t.family {
                AF_INET => Some(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
                AF_INET6 => {
                    let v6 = Ipv6Addr::from(*a);
                    // Dual-stack sockets carry IPv4 peers as ::ffff:a.b.c.d.
                    Some(
                        v6.to_ipv4_mapped()
                            .map(IpAddr::V4)
                            .unwrap_or(IpAddr::V6(v6)),
                    )
                }
                _ => None,
            }
        };
        Some(Self {
            local: SocketAddr::new(addr(&t.local_addr)?, t.local_port),
            remote: SocketAddr::new(addr(&t.remote_addr)?, t.remote_port),
        })
    }

    /// True when either end uses `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.local.port() == port || self.remote.port() == port
    }
}

/// One socket read or write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataRecord {
    pub meta: Meta,
    pub direction: Direction,
    pub syscall: u32,
    /// Bytes the syscall moved.
    pub total_len: u32,
    /// The captured prefix (≤ `total_len`), a slice of its batch's buffer.
    pub payload: bytes::Bytes,
    /// [`tracer_common::data::flags`].
    pub flags: u32,
}

/// An event from the kernel, owned and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    ConnOpen {
        meta: Meta,
        endpoints: Endpoints,
        role: Role,
    },
    ConnClose {
        meta: Meta,
        endpoints: Option<Endpoints>,
    },
    Data(DataRecord),
    ProcExit {
        meta: Meta,
    },
    /// The process's dynamic loader loaded or unloaded objects (the TLS probes'
    /// attacher looks at it; nothing else uses it).
    LibsLoaded {
        meta: Meta,
    },
    /// The connection's first FIN: sent by this end (`by_peer` false: it closed or
    /// shut down writing), or received.
    ConnEnding {
        meta: Meta,
        by_peer: bool,
    },
}

impl Event {
    pub fn meta(&self) -> &Meta {
        match self {
            Event::ConnOpen { meta, .. }
            | Event::ConnClose { meta, .. }
            | Event::ConnEnding { meta, .. }
            | Event::ProcExit { meta }
            | Event::LibsLoaded { meta } => meta,
            Event::Data(d) => &d.meta,
        }
    }
}

/// A ring-buffer record that could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} record of {len} bytes is shorter than its {need}-byte layout")]
    Truncated {
        kind: EventKind,
        len: usize,
        need: usize,
    },
    #[error("connection event with unknown address family {0}")]
    Family(u16),
}

/// Converts kernel `CLOCK_BOOTTIME` timestamps into Unix nanoseconds.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    boot_to_unix_ns: i128,
}

impl Clock {
    /// Measures the current offset between `CLOCK_REALTIME` and `CLOCK_BOOTTIME`.
    pub fn now() -> Self {
        let read = |id| {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid pointer to a timespec.
            unsafe { libc::clock_gettime(id, &mut ts) };
            ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
        };
        let boot = read(libc::CLOCK_BOOTTIME);
        let real = read(libc::CLOCK_REALTIME);
        Self {
            boot_to_unix_ns: real - boot,
        }
    }

    /// Boot time to Unix time, in nanoseconds.
    pub fn offset_ns(&self) -> i128 {
        self.boot_to_unix_ns
    }

    /// A clock with a fixed offset (for replay and tests).
    pub fn with_offset(boot_to_unix_ns: i128) -> Self {
        Self { boot_to_unix_ns }
    }

    pub fn to_unix_ns(&self, boot_ns: u64) -> u64 {
        (boot_ns as i128 + self.boot_to_unix_ns).clamp(0, u64::MAX as i128) as u64
    }
}

fn read_pod<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked; T is a plain #[repr(C)] type valid for any bit pattern
    // (the kernel/user contract types have only integer fields), read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn meta(h: &EventHeader, clock: &Clock) -> Meta {
    Meta {
        ts_ns: clock.to_unix_ns(h.ts_ns),
        tgid: h.tgid,
        tid: h.tid,
        sock: h.sock,
        comm: Comm::from_kernel(&h.comm),
    }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8], clock: &Clock) -> Result<Event, DecodeError> {
    decode_into(bytes, clock, &mut bytes::BytesMut::new())
}

/// Decodes one ring-buffer record, copying its payload into `arena`: the payloads
/// of a batch share the arena's allocations instead of one allocation each.
pub fn decode_into(
    bytes: &[u8],
    clock: &Clock,
    arena: &mut bytes::BytesMut,
) -> Result<Event, DecodeError> {
    let h: EventHeader = read_pod(bytes).ok_or(DecodeError::Short(bytes.len()))?;
    let kind = EventKind::from_u32(h.kind).ok_or(DecodeError::UnknownKind(h.kind))?;
    let truncated = |need| DecodeError::Truncated {
        kind,
        len: bytes.len(),
        need,
    };
    match kind {
        EventKind::ConnEnding => {
            let c: ConnEvent = read_pod(bytes).ok_or_else(|| truncated(size_of::<ConnEvent>()))?;
            Ok(Event::ConnEnding {
                meta: meta(&c.header, clock),
                by_peer: c.old_state == tracer_common::conn::TCP_CLOSE_WAIT,
            })
        }
        EventKind::ConnOpen | EventKind::ConnClose => {
            let c: ConnEvent = read_pod(bytes).ok_or_else(|| truncated(size_of::<ConnEvent>()))?;
            let endpoints = Endpoints::from_tuple(&c.tuple);
            if kind == EventKind::ConnOpen {
                let endpoints = endpoints.ok_or(DecodeError::Family(c.tuple.family))?;
                Ok(Event::ConnOpen {
                    meta: meta(&c.header, clock),
                    endpoints,
                    role: Role::from_u32(c.role),
                })
            } else {
                Ok(Event::ConnClose {
                    meta: meta(&c.header, clock),
                    endpoints,
                })
            }
        }
        EventKind::Data => {
            let d: DataHeader =
                read_pod(bytes).ok_or_else(|| truncated(size_of::<DataHeader>()))?;
            let start = size_of::<DataHeader>();
            let captured = (d.captured_len as usize).min(d.total_len as usize);
            let payload = bytes
                .get(start..start + captured)
                .ok_or_else(|| truncated(start + captured))?;
            let direction = if d.direction == Direction::Send as u32 {
                Direction::Send
            } else {
                Direction::Recv
            };
            Ok(Event::Data(DataRecord {
                meta: meta(&d.header, clock),
                direction,
                syscall: d.syscall,
                total_len: d.total_len,
                payload: {
                    arena.extend_from_slice(payload);
                    arena.split().freeze()
                },
                flags: d.flags
                    & (flags::UNREADABLE
                        | flags::TRUNCATED
                        | flags::NO_USER_BUFFER
                        | flags::TLS
                        | flags::TLS_UNBOUND),
            }))
        }
        EventKind::ProcExit => Ok(Event::ProcExit {
            meta: meta(&h, clock),
        }),
        EventKind::LibsLoaded => Ok(Event::LibsLoaded {
            meta: meta(&h, clock),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain #[repr(C)] value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn header(kind: EventKind) -> EventHeader {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        EventHeader {
            kind: kind as u32,
            cpu: 0,
            ts_ns: 1_000,
            tgid: 42,
            tid: 43,
            sock: 0xffff_0001,
            comm,
        }
    }

    #[test]
    fn decodes_a_data_event_with_its_payload() {
        let d = DataHeader {
            header: header(EventKind::Data),
            direction: Direction::Send as u32,
            syscall: 44,
            total_len: 100,
            captured_len: 5,
            flags: flags::TRUNCATED,
            _pad: 0,
        };
        let mut bytes = as_bytes(&d);
        bytes.extend_from_slice(b"GET /");
        let ev = decode(&bytes, &Clock::with_offset(10)).unwrap();
        let Event::Data(rec) = ev else {
            panic!("not data: {ev:?}")
        };
        assert_eq!(&rec.payload[..], b"GET /");
        assert_eq!(rec.total_len, 100);
        assert_eq!(rec.meta.ts_ns, 1_010);
        assert_eq!(rec.meta.comm.as_str(), "curl");
        assert_eq!(rec.meta.tgid, 42);
    }

    #[test]
    fn a_data_event_missing_its_payload_is_an_error() {
        let d = DataHeader {
            header: header(EventKind::Data),
            direction: 1,
            syscall: 44,
            total_len: 100,
            captured_len: 50,
            flags: 0,
            _pad: 0,
        };
        let bytes = as_bytes(&d);
        assert!(matches!(
            decode(&bytes, &Clock::with_offset(0)),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn decodes_connection_tuples_including_mapped_ipv4() {
        let mut t = Tuple {
            local_port: 8000,
            remote_port: 5555,
            family: AF_INET6,
            ..Tuple::default()
        };
        t.local_addr = Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped().octets();
        t.remote_addr = Ipv6Addr::LOCALHOST.octets();
        let c = ConnEvent {
            header: header(EventKind::ConnOpen),
            tuple: t,
            role: Role::Server as u32,
            old_state: 0,
        };
        let Event::ConnOpen {
            endpoints, role, ..
        } = decode(&as_bytes(&c), &Clock::with_offset(0)).unwrap()
        else {
            panic!("not an open")
        };
        assert_eq!(role, Role::Server);
        assert_eq!(endpoints.local, "127.0.0.1:8000".parse().unwrap());
        assert_eq!(endpoints.remote, "[::1]:5555".parse().unwrap());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(
            decode(&[1, 2, 3], &Clock::with_offset(0)),
            Err(DecodeError::Short(3))
        );
        let mut h = as_bytes(&header(EventKind::Data));
        h[0] = 99;
        assert_eq!(
            decode(&h, &Clock::with_offset(0)),
            Err(DecodeError::UnknownKind(99))
        );
    }

    #[test]
    fn comm_is_kept_inline_and_always_valid_text() {
        let mut raw = [0u8; 16];
        raw[..6].copy_from_slice(b"nginx\0");
        assert_eq!(Comm::from_kernel(&raw).as_str(), "nginx");
        // All 16 bytes used (no NUL): kept whole.
        assert_eq!(
            Comm::from_kernel(b"abcdefghijklmnop").as_str(),
            "abcdefghijklmnop"
        );
        // Invalid UTF-8 is replaced; a multi-byte char is never cut in half.
        let mut bad = [b'a'; 16];
        bad[3] = 0xff;
        assert!(Comm::from_kernel(&bad).as_str().starts_with("aaa\u{fffd}"));
        assert_eq!(Comm::from("ééééééééé").as_str(), "éééééééé");
        assert!(Comm::default().is_empty());
    }
}
