//! The header every event starts with, and the numbered event kinds.

/// What an event is. The numbers are part of the kernel/user contract.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A TCP connection became established, or a socket opened before the agent
    /// started was seen for the first time ([`crate::conn::ConnEvent`]).
    ConnOpen = 1,
    /// A prefix of one socket read or write ([`crate::data::DataEvent`]).
    Data = 2,
    /// A TCP connection reached `TCP_CLOSE` ([`crate::conn::ConnEvent`]).
    ConnClose = 3,
    /// A whole process exited ([`EventHeader`] only).
    ProcExit = 4,
    /// A followed TCP connection began to end: this end sent its FIN
    /// (`TCP_FIN_WAIT1`) or the peer's arrived (`TCP_CLOSE_WAIT`), in
    /// [`crate::conn::ConnEvent::old_state`].
    ConnEnding = 5,
    /// A process's dynamic loader finished loading or unloading objects (its
    /// `_dl_debug_state`, at start-up and at each `dlopen`): the agent looks for
    /// copies of OpenSSL among them ([`EventHeader`] only).
    LibsLoaded = 6,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::ConnOpen,
            2 => Self::Data,
            3 => Self::ConnClose,
            4 => Self::ProcExit,
            5 => Self::ConnEnding,
            6 => Self::LibsLoaded,
            _ => return None,
        })
    }
}

/// First bytes of every event in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// CPU the event was produced on.
    pub cpu: u32,
    /// `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`).
    pub ts_ns: u64,
    /// Process id (thread group id) of the task that caused the event; 0 when the
    /// event came from softirq context and the process is not known.
    pub tgid: u32,
    /// Thread id of that task; 0 when unknown.
    pub tid: u32,
    /// Kernel address of the `struct sock`: the connection's identity while it lives.
    pub sock: u64,
    /// `comm` of the task (thread name), NUL-padded.
    pub comm: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<EventHeader>() == 48);
