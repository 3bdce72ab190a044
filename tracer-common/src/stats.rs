//! Counters the kernel programs keep (per CPU) and the agent exposes.

/// Index into the `STATS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Events written to the ring buffer.
    EventsSent = 0,
    /// Events lost because the ring buffer was full.
    RingbufFull = 1,
    /// Sockets not followed because the `SOCKS` map was full.
    SockMapFull = 2,
    /// Data events whose payload was cut to the capture size.
    PayloadTruncated = 3,
    /// Data events whose user buffer could not be read.
    PayloadUnreadable = 4,
    /// Socket reads/writes skipped by the `--pid`/`--port` filters or the agent's own.
    Filtered = 5,
    /// Payload bytes copied into the ring buffer.
    BytesCaptured = 6,
    /// Socket reads/writes skipped because user space does not decode the socket
    /// (unknown protocol after a first look, a database server's end, a tunnel).
    NotDecoded = 7,
    /// Socket reads/writes lost because the kernel did not report a function's
    /// return (kprobe backend: more threads were inside `tcp_sendmsg`/`tcp_recvmsg`
    /// at once than the kernel keeps return probes for).
    ReturnMissed = 8,
    /// TLS plaintext whose connection the kernel cannot tell: the TLS library
    /// read or wrote without a socket call inside (a memory BIO) and the `SSL*`
    /// had never been seen with one. Sent to user space keyed by its `SSL*`
    /// (`flags::TLS_UNBOUND`), which places it by the ciphertext beside it.
    TlsUnassociated = 9,
}

/// Number of counters (size of the `STATS` array).
pub const COUNTERS: u32 = 10;

impl Counter {
    pub const ALL: [Counter; COUNTERS as usize] = [
        Counter::EventsSent,
        Counter::RingbufFull,
        Counter::SockMapFull,
        Counter::PayloadTruncated,
        Counter::PayloadUnreadable,
        Counter::Filtered,
        Counter::BytesCaptured,
        Counter::NotDecoded,
        Counter::ReturnMissed,
        Counter::TlsUnassociated,
    ];

    /// Name used in the agent's metrics.
    pub fn name(self) -> &'static str {
        match self {
            Counter::EventsSent => "events_sent",
            Counter::RingbufFull => "ringbuf_full",
            Counter::SockMapFull => "sock_map_full",
            Counter::PayloadTruncated => "payload_truncated",
            Counter::PayloadUnreadable => "payload_unreadable",
            Counter::Filtered => "filtered",
            Counter::BytesCaptured => "bytes_captured",
            Counter::NotDecoded => "not_decoded",
            Counter::ReturnMissed => "return_missed",
            Counter::TlsUnassociated => "tls_unassociated",
        }
    }
}
