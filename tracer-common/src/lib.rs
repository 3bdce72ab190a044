//! Types shared by the kernel programs (`tracer-ebpf`) and the agent (`tracer-agent`).
//!
//! Everything here is `#[repr(C)]`, `Copy`, free of `bool`, explicitly padded and
//! size-checked at compile time, so both sides agree on every byte. There is no
//! logic here: only layouts, numbered kinds and names.
#![no_std]

pub mod config;
pub mod conn;
pub mod data;
pub mod event;
pub mod stats;

/// Names of the maps and globals both sides refer to.
pub mod names {
    /// Ring buffer carrying every event to user space.
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU counters, indexed by [`crate::stats::Counter`].
    pub const STATS: &str = "STATS";
    /// Socket pointer → [`crate::conn::SockInfo`]: the TCP sockets being followed.
    pub const SOCKS: &str = "SOCKS";
    /// Per-CPU scratch space where a data event is assembled before output.
    pub const SCRATCH: &str = "SCRATCH";
    /// Process ids to follow when `--pid` is given.
    pub const FILTER_PIDS: &str = "FILTER_PIDS";
    /// Ports to follow when `--port` is given.
    pub const FILTER_PORTS: &str = "FILTER_PORTS";
    /// The [`crate::config::KernelConfig`] global.
    pub const CONFIG: &str = "CONFIG";
}

/// Sockets the kernel follows at once (the `SOCKS` map; beyond it new sockets are not
/// followed, and counted), and the connections user space tracks by default: one
/// limit for both, so that every socket the kernel follows has room in the
/// connection table.
pub const MAX_SOCKETS: u32 = 65536;

/// Upper bound on captured payload bytes per syscall (`--capture-bytes` is clamped to it).
/// A power of two: the kernel masks lengths with `MAX_CAPTURE - 1`.
pub const MAX_CAPTURE: usize = 4096;
