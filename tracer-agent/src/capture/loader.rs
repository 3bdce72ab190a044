//! Loads the kernel programs, attaches them and reads their ring buffer.

use std::{os::fd::AsRawFd, sync::Arc, time::Duration};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracer_common::{
    MAX_CAPTURE,
    config::KernelConfig,
    conn::{IGNORED_NOT_DECODED, SockInfo},
    names,
    stats::{COUNTERS, Counter},
};

use super::{
    Clock, Event, kernel_info,
    reader::{drain, take_all},
    recording::{RecordingWriter, Tee},
};
use crate::telemetry::Telemetry;

/// The kernel object built by build.rs from `tracer-ebpf`.
#[cfg(not(tracer_no_ebpf))]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));
#[cfg(tracer_no_ebpf)]
static EBPF_OBJECT: &[u8] = &[];

/// The tracepoints the agent attaches, as (program, category, name).
pub const TRACEPOINTS: [(&str, &str, &str); 4] = [
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("sock_send_length", "sock", "sock_send_length"),
    ("sock_recv_length", "sock", "sock_recv_length"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// The do-nothing program of the benchmark floor.
const EMPTY_PROBE: &str = "empty_probe";

fn tracepoint_program<'a>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
) -> Result<&'a mut TracePoint, CaptureError> {
    ebpf.program_mut(program)
        .ok_or(CaptureError::Program {
            program,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| CaptureError::Program { program, source })
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "loading eBPF programs needs root (or CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN); run it with sudo"
    )]
    NotPrivileged,
    #[error(transparent)]
    KernelInfo(#[from] kernel_info::KernelInfoError),
    #[error("this agent was built without its eBPF object (AYA_BUILD_SKIP was set)")]
    NoObject,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("ring buffer polling: {0}")]
    Io(#[from] std::io::Error),
}

/// What the kernel side should capture.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub capture_bytes: u32,
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub ringbuf_bytes: u32,
    pub max_sockets: u32,
    /// Benchmark floor: attach the same tracepoints with a program that does
    /// nothing (no event ever reaches user space).
    pub empty_probes: bool,
}

/// Tells the kernel to skip sockets user space decodes nothing on. Cheap to clone;
/// each call is two map syscalls, once per such connection.
#[derive(Clone)]
pub struct SocketIgnorer {
    socks: Arc<std::sync::Mutex<BpfHashMap<MapData, u64, SockInfo>>>,
}

impl std::fmt::Debug for SocketIgnorer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SocketIgnorer")
    }
}

impl SocketIgnorer {
    /// Marks socket `sock` as not decoded, if the kernel still follows that very
    /// connection (same ports: the address may have been reused since; a socket
    /// closed meanwhile is not re-created). Returns whether it was marked.
    pub fn ignore(&self, sock: u64, local_port: u16, remote_port: u16) -> bool {
        let Ok(mut socks) = self.socks.lock() else {
            return false;
        };
        let Ok(mut info) = socks.get(&sock, 0) else {
            return false;
        };
        if info.tuple.local_port != local_port || info.tuple.remote_port != remote_port {
            return false;
        }
        info.ignored = IGNORED_NOT_DECODED;
        // BPF_EXIST: update only; never resurrect an entry the kernel removed.
        socks.insert(sock, info, 2).is_ok()
    }
}

/// The loaded and attached kernel programs.
pub struct BpfCapture {
    ebpf: Ebpf,
    stats: PerCpuArray<MapData, u64>,
    ignorer: Option<SocketIgnorer>,
}

/// True when the process can load BPF programs (root or the needed capabilities).
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    // CAP_SYS_ADMIN = 21, CAP_PERFMON = 38, CAP_BPF = 39: read the effective set.
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    has(21) || (has(38) && has(39))
}

impl BpfCapture {
    /// Loads and attaches everything. Mounts tracefs first when it is missing.
    pub fn load(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        if !privileged() {
            return Err(CaptureError::NotPrivileged);
        }
        if EBPF_OBJECT.is_empty() {
            return Err(CaptureError::NoObject);
        }
        if kernel_info::ensure_tracefs()? {
            log::info!(
                "tracefs was not mounted: mounted it at {}",
                kernel_info::TRACEFS
            );
        }
        let kernel = KernelConfig {
            tp: kernel_info::tracepoint_offsets()?,
            kernel: kernel_info::kernel_offsets()?,
            syscalls: kernel_info::syscall_numbers()?,
            capture_bytes: cfg.capture_bytes.min(MAX_CAPTURE as u32),
            agent_tgid: std::process::id(),
            filter_pids: u32::from(!cfg.pids.is_empty()),
            filter_ports: u32::from(!cfg.ports.is_empty()),
            wakeup_bytes: (cfg.ringbuf_bytes / 16).max(4096),
            _pad: 0,
        };
        // The ring buffer must be a power-of-two number of pages.
        let ringbuf = cfg.ringbuf_bytes.max(4096).next_power_of_two();
        let mut ebpf = EbpfLoader::new()
            .override_global(names::CONFIG, &kernel, true)
            .map_max_entries(names::EVENTS, ringbuf)
            .map_max_entries(names::SOCKS, cfg.max_sockets.max(64))
            .load(EBPF_OBJECT)
            .map_err(CaptureError::Load)?;

        {
            let map = ebpf
                .map_mut(names::FILTER_PIDS)
                .ok_or(CaptureError::MissingMap(names::FILTER_PIDS))?;
            let mut pids: BpfHashMap<_, u32, u8> =
                BpfHashMap::try_from(map).map_err(|source| CaptureError::Map {
                    map: names::FILTER_PIDS,
                    source,
                })?;
            for pid in &cfg.pids {
                pids.insert(pid, 1, 0).map_err(|source| CaptureError::Map {
                    map: names::FILTER_PIDS,
                    source,
                })?;
            }
        }
        {
            let map = ebpf
                .map_mut(names::FILTER_PORTS)
                .ok_or(CaptureError::MissingMap(names::FILTER_PORTS))?;
            let mut ports: BpfHashMap<_, u16, u8> =
                BpfHashMap::try_from(map).map_err(|source| CaptureError::Map {
                    map: names::FILTER_PORTS,
                    source,
                })?;
            for port in &cfg.ports {
                ports
                    .insert(port, 1, 0)
                    .map_err(|source| CaptureError::Map {
                        map: names::FILTER_PORTS,
                        source,
                    })?;
            }
        }

        if cfg.empty_probes {
            let program = EMPTY_PROBE;
            let prog = tracepoint_program(&mut ebpf, program)?;
            prog.load()
                .map_err(|source| CaptureError::Program { program, source })?;
            for (_, category, name) in TRACEPOINTS {
                prog.attach(category, name)
                    .map_err(|source| CaptureError::Program { program, source })?;
            }
        } else {
            for (program, category, name) in TRACEPOINTS {
                let prog = tracepoint_program(&mut ebpf, program)?;
                prog.load()
                    .map_err(|source| CaptureError::Program { program, source })?;
                prog.attach(category, name)
                    .map_err(|source| CaptureError::Program { program, source })?;
            }
        }
        let socks = ebpf
            .take_map(names::SOCKS)
            .ok_or(CaptureError::MissingMap(names::SOCKS))?;
        let ignorer = BpfHashMap::try_from(socks)
            .map(|socks| SocketIgnorer {
                socks: Arc::new(std::sync::Mutex::new(socks)),
            })
            .map_err(|e| log::warn!("sockets cannot be skipped in the kernel: {e}"))
            .ok();

        let stats = ebpf
            .take_map(names::STATS)
            .ok_or(CaptureError::MissingMap(names::STATS))?;
        let stats = PerCpuArray::try_from(stats).map_err(|source| CaptureError::Map {
            map: names::STATS,
            source,
        })?;
        Ok(Self {
            ebpf,
            stats,
            ignorer,
        })
    }

    /// The handle user space uses to have the kernel skip sockets.
    pub fn socket_ignorer(&self) -> Option<SocketIgnorer> {
        self.ignorer.clone()
    }

    /// Sums of the kernel's per-CPU counters, indexed by [`Counter`].
    pub fn kernel_counters(&self) -> [u64; COUNTERS as usize] {
        let mut out = [0u64; COUNTERS as usize];
        for c in Counter::ALL {
            if let Ok(values) = self.stats.get(&(c as u32), 0) {
                out[c as usize] = values.iter().sum();
            }
        }
        out
    }

    /// Reads the ring buffer until `cancel` fires, sending decoded events in batches.
    /// A full channel drops the batch and counts it: the kernel must never wait for us.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<Vec<Event>>,
        telemetry: Arc<Telemetry>,
        cancel: CancellationToken,
        recording: Option<std::fs::File>,
    ) -> Result<(), CaptureError> {
        let ring = self
            .ebpf
            .take_map(names::EVENTS)
            .ok_or(CaptureError::MissingMap(names::EVENTS))?;
        let ring = RingBuf::try_from(ring).map_err(|source| CaptureError::Map {
            map: names::EVENTS,
            source,
        })?;
        log::debug!("ring buffer fd {}", ring.as_raw_fd());
        // SAFETY: the ring buffer owns its fd and outlives the registration (both
        // live in this function and are dropped together).
        let mut fd =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| CaptureError::Io(e.into()))?;
        let clock = Clock::now();
        let mut recording = recording
            .map(|f| RecordingWriter::new(std::io::BufWriter::new(f), &clock))
            .transpose()?;
        let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
        // The kernel wakes us only when a lot is waiting; below that, poll.
        let mut poll_tick = tokio::time::interval(POLL_INTERVAL);
        poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = [0u64; COUNTERS as usize];
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = stats_tick.tick() => {
                    let now = self.kernel_counters();
                    telemetry.add_kernel_counters(&last, &now);
                    last = now;
                }
                _ = poll_tick.tick() => {
                    let mut source = Tee { source: fd.get_mut(), recording: recording.as_mut() };
                    drain(&mut source, &clock, &tx, &telemetry);
                }
                guard = fd.readable_mut() => {
                    let mut guard = guard?;
                    let mut source =
                        Tee { source: guard.get_inner_mut(), recording: recording.as_mut() };
                    drain(&mut source, &clock, &tx, &telemetry);
                    guard.clear_ready();
                }
            }
        }
        // Drain what is left so that a flush on shutdown sees everything.
        let mut source = Tee {
            source: fd.get_mut(),
            recording: recording.as_mut(),
        };
        let batch = take_all(&mut source, &clock, &telemetry);
        if let Some(r) = recording.as_mut() {
            r.flush();
        }
        if !batch.is_empty() {
            let _ = tx.send(batch).await;
        }
        let now = self.kernel_counters();
        telemetry.add_kernel_counters(&last, &now);
        Ok(())
    }
}

/// Longest an event waits in the ring buffer when the kernel does not wake us.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
