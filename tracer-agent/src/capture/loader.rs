//! Loads the kernel programs, attaches them and reads their ring buffer.

use std::{
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{FExit, KProbe, TracePoint},
};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tokio_util::sync::CancellationToken;
use tracer_common::{
    MAX_CAPTURE,
    config::{FdOffsets, KernelConfig},
    conn::{IGNORED_NOT_DECODED, Role, SockInfo},
    names,
    stats::{COUNTERS, Counter},
};

use super::{
    Clock, Endpoints, Event,
    backend::{Backend, BackendChoice},
    kernel_info::{self, FunctionArgs},
    reader::{drain, take_all},
    recording::{RecordingWriter, Tee},
    return_probe::{self, ReturnProbe},
};
use crate::telemetry::Telemetry;

/// The kernel object built by build.rs from `tracer-ebpf`.
#[cfg(not(tracer_no_ebpf))]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));
#[cfg(tracer_no_ebpf)]
static EBPF_OBJECT: &[u8] = &[];

/// The tracepoints every backend attaches, as (program, category, name).
pub const LIFECYCLE_TRACEPOINTS: [(&str, &str, &str); 2] = [
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// The I/O tracepoints of the tracepoints backend, as (program, category, name).
pub const IO_TRACEPOINTS: [(&str, &str, &str); 2] = [
    ("sock_send_length", "sock", "sock_send_length"),
    ("sock_recv_length", "sock", "sock_recv_length"),
];

/// The fexit backend's programs for this kernel's `tcp_recvmsg` layout, as
/// (program, kernel function).
fn fexit_programs(args: FunctionArgs) -> [(&'static str, &'static str); 2] {
    [
        ("tcp_sendmsg_exit", "tcp_sendmsg"),
        match args.recv_nargs {
            4 => ("tcp_recvmsg_exit4", "tcp_recvmsg"),
            5 => ("tcp_recvmsg_exit5", "tcp_recvmsg"),
            _ => ("tcp_recvmsg_exit6", "tcp_recvmsg"),
        },
    ]
}

/// The kprobe backend's programs, as (program, kernel function).
fn kprobe_programs(args: FunctionArgs) -> [(&'static str, &'static str); 4] {
    [
        ("tcp_sendmsg_entry", "tcp_sendmsg"),
        ("tcp_sendmsg_return", "tcp_sendmsg"),
        if args.recv_flags == 4 {
            ("tcp_recvmsg_nonblock_entry", "tcp_recvmsg")
        } else {
            ("tcp_recvmsg_entry", "tcp_recvmsg")
        },
        ("tcp_recvmsg_return", "tcp_recvmsg"),
    ]
}

/// The do-nothing programs of the benchmark floor, one per program type (an
/// fexit program is bound to one function when it loads).
const EMPTY_PROBE: &str = "empty_probe";
const EMPTY_FEXIT: [(&str, &str); 2] = [
    ("empty_fexit_send", "tcp_sendmsg"),
    ("empty_fexit_recv", "tcp_recvmsg"),
];
const EMPTY_KPROBE: &str = "empty_kprobe";
const EMPTY_KRETPROBE: &str = "empty_kretprobe";

fn program<'a, P>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(program)
        .ok_or(CaptureError::Program {
            program,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(|source| CaptureError::Program { program, source })
}

/// Loads and attaches tracepoint programs (or, for the benchmark floor, the
/// do-nothing program at each of them).
fn attach_tracepoints(
    ebpf: &mut Ebpf,
    tracepoints: &[(&'static str, &'static str, &'static str)],
    empty: bool,
) -> Result<(), CaptureError> {
    for &(name, category, tracepoint) in tracepoints {
        let name = if empty { EMPTY_PROBE } else { name };
        let prog: &mut TracePoint = program(ebpf, name)?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| CaptureError::Program {
                program: name,
                source,
            })?;
        }
        prog.attach(category, tracepoint)
            .map_err(|source| CaptureError::Program {
                program: name,
                source,
            })?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "loading eBPF programs needs root (or CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN); run it with sudo"
    )]
    NotPrivileged,
    #[error("program {program}: {source}")]
    ReturnProbe {
        program: &'static str,
        source: std::io::Error,
    },
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
    #[error("no capture backend can run here: {0}")]
    NoBackend(String),
    #[error("reading the kernel's BTF for {0}: {1}")]
    Btf(&'static str, aya::BtfError),
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
    /// Which capture backend to use (`auto`: the first that works here).
    pub backend: BackendChoice,
    /// Capture TLS plaintext: load the OpenSSL uprobes and attach them to the
    /// copies of OpenSSL found now (and, in [`BpfCapture::run`], later).
    pub tls: bool,
}

/// User space's handle on the kernel's socket maps: it has the kernel skip sockets
/// user space decodes nothing on, and looks up a socket whose open event was lost
/// (its endpoints and role). Cheap to clone; each call is one or two map syscalls.
#[derive(Clone)]
pub struct KernelSockets {
    socks: Arc<std::sync::Mutex<BpfHashMap<MapData, u64, SockInfo>>>,
}

impl std::fmt::Debug for KernelSockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelSockets")
    }
}

impl KernelSockets {
    /// Marks socket `sock` as not decoded, if the kernel still follows that very
    /// connection (same ports: the address may have been reused since; a socket
    /// closed meanwhile is not re-created). Returns whether it was marked.
    pub fn ignore(&self, sock: u64, local_port: u16, remote_port: u16) -> bool {
        let mut socks = crate::sync::lock(&self.socks);
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

    /// What the kernel knows of socket `sock` while it follows it (not once it
    /// closed): its endpoints, when it has them, and its role.
    pub fn lookup(&self, sock: u64) -> Option<(Endpoints, Role)> {
        let info = crate::sync::lock(&self.socks).get(&sock, 0).ok()?;
        Some((
            Endpoints::from_tuple(&info.tuple)?,
            Role::from_u32(info.role),
        ))
    }
}

/// The loaded and attached kernel programs.
pub struct BpfCapture {
    /// The loaded object, while no TLS attacher holds it (the attacher thread owns
    /// it then: it attaches programs to it as processes load OpenSSL). Held for
    /// its attachments: dropping it detaches every program.
    _ebpf: Option<Ebpf>,
    /// The ring buffer, until [`BpfCapture::run`] reads it.
    ring: Option<RingBuf<MapData>>,
    backend: Backend,
    stats: PerCpuArray<MapData, u64>,
    sockets: Option<KernelSockets>,
    /// The kprobe backend's return probes (attached outside aya, see
    /// `return_probe.rs`); dropping them detaches them.
    _return_probes: Vec<ReturnProbe>,
    /// The TLS probes' attacher thread, when their programs loaded.
    tls: Option<super::tls_probes::TlsAttacher>,
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
    let eff = crate::privileges::effective_in_status(&status).unwrap_or(0);
    let has = |bit: u32| eff & (1u64 << bit) != 0;
    has(21) || (has(38) && has(39))
}

impl BpfCapture {
    /// Loads and attaches everything with the first backend of `cfg.backend` that
    /// this kernel has and that loads. Mounts tracefs first when it is missing.
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
        // Mounting tracefs was the last use of CAP_SYS_ADMIN where the kernel
        // lets CAP_BPF and CAP_PERFMON attach, unless TLS probes are to be
        // attached (uprobes need it).
        let uprobes = cfg.tls && !cfg.empty_probes && crate::privileges::can_attach_uprobes();
        match crate::privileges::drop_sys_admin_if_unneeded(uprobes) {
            Ok(true) => log::info!(
                "CAP_SYS_ADMIN given up before loading: kernel.perf_event_paranoid lets CAP_BPF and CAP_PERFMON attach"
            ),
            Ok(false) => {}
            Err(e) => log::warn!("cannot give up CAP_SYS_ADMIN: {e}"),
        }
        let mut passed_over = Vec::new();
        for &backend in cfg.backend.candidates() {
            let attempt = backend
                .requirements()
                .and_then(|()| Self::load_backend(cfg, backend).map_err(|e| e.to_string()));
            match attempt {
                Ok(capture) => {
                    for (other, why) in &passed_over {
                        log::info!("capture backend {other} not used: {why}");
                    }
                    return Ok(capture);
                }
                Err(why) => passed_over.push((backend, why)),
            }
        }
        let mut why = passed_over
            .iter()
            .map(|(b, why)| format!("{b}: {why}"))
            .collect::<Vec<_>>()
            .join("; ");
        if let Some(hint) = crate::privileges::attach_hint() {
            why = format!("{why}. {hint}");
        }
        Err(CaptureError::NoBackend(why))
    }

    /// Tries every backend in turn, attaching and detaching it: what `check`
    /// reports. Needs the privileges of [`BpfCapture::load`]. The programs are
    /// verified with the largest capture size (the verifier reads the
    /// configuration as constants: a smaller one could hide a path).
    pub fn try_backends() -> Vec<(Backend, Result<(), String>)> {
        let cfg = CaptureConfig {
            capture_bytes: MAX_CAPTURE as u32,
            pids: Vec::new(),
            ports: Vec::new(),
            ringbuf_bytes: 4096,
            max_sockets: 64,
            empty_probes: false,
            backend: BackendChoice::Auto,
            tls: false,
        };
        Backend::ALL
            .iter()
            .map(|&backend| {
                let attempt = backend.requirements().and_then(|()| {
                    Self::load_backend(&cfg, backend)
                        .map(drop)
                        .map_err(|e| e.to_string())
                });
                (backend, attempt)
            })
            .collect()
    }

    /// Loads the object configured for `backend` and attaches the lifecycle
    /// tracepoints and the backend's I/O programs. Dropping the result detaches all.
    fn load_backend(cfg: &CaptureConfig, backend: Backend) -> Result<Self, CaptureError> {
        let kernel = KernelConfig {
            tp: if backend == Backend::Tracepoints {
                kernel_info::tracepoint_offsets()?
            } else {
                kernel_info::lifecycle_offsets()?
            },
            kernel: kernel_info::kernel_offsets()?,
            syscalls: kernel_info::syscall_numbers()?,
            fd: if backend == Backend::Syscalls {
                kernel_info::fd_offsets()?
            } else {
                FdOffsets::default()
            },
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

        attach_tracepoints(&mut ebpf, &LIFECYCLE_TRACEPOINTS, cfg.empty_probes)?;
        let mut return_probes = Vec::new();
        match backend {
            Backend::Tracepoints => {
                attach_tracepoints(&mut ebpf, &IO_TRACEPOINTS, cfg.empty_probes)?
            }
            Backend::Syscalls => {
                let exits =
                    kernel_info::SYSCALL_EXITS.map(|(program, name)| (program, "syscalls", name));
                attach_tracepoints(&mut ebpf, &exits, cfg.empty_probes)?
            }
            Backend::Fexit => {
                let btf = aya::Btf::from_sys_fs().map_err(|e| CaptureError::Btf("fexit", e))?;
                let programs = if cfg.empty_probes {
                    EMPTY_FEXIT
                } else {
                    fexit_programs(kernel_info::function_args()?)
                };
                for (name, function) in programs {
                    let prog: &mut FExit = program(&mut ebpf, name)?;
                    prog.load(function, &btf)
                        .and_then(|()| prog.attach().map(drop))
                        .map_err(|source| CaptureError::Program {
                            program: name,
                            source,
                        })?;
                }
            }
            Backend::Kprobes => {
                ReturnProbe::remove_stale();
                for (name, function) in kprobe_programs(kernel_info::function_args()?) {
                    let is_return = name.ends_with("_return");
                    let name = match (cfg.empty_probes, is_return) {
                        (false, _) => name,
                        (true, false) => EMPTY_KPROBE,
                        (true, true) => EMPTY_KRETPROBE,
                    };
                    let prog: &mut KProbe = program(&mut ebpf, name)?;
                    if prog.fd().is_err() {
                        prog.load().map_err(|source| CaptureError::Program {
                            program: name,
                            source,
                        })?;
                    }
                    if is_return {
                        // With room for as many blocked readers as the kernel allows.
                        let fd = prog.fd().map_err(|source| CaptureError::Program {
                            program: name,
                            source,
                        })?;
                        let probe =
                            ReturnProbe::attach(fd.as_fd(), function, return_probe::MAX_ACTIVE)
                                .map_err(|source| CaptureError::ReturnProbe {
                                    program: name,
                                    source,
                                })?;
                        return_probes.push(probe);
                    } else {
                        prog.attach(function, 0)
                            .map_err(|source| CaptureError::Program {
                                program: name,
                                source,
                            })?;
                    }
                }
            }
        }
        let tls_probes = if cfg.empty_probes || !cfg.tls {
            None
        } else if !crate::privileges::can_attach_uprobes() {
            log::warn!(
                "TLS plaintext is not captured: attaching uprobes to OpenSSL needs CAP_SYS_ADMIN, \
                 which this process lacks (grant it, or pass --no-tls to say so)"
            );
            None
        } else {
            match super::tls_probes::TlsProbes::load(&mut ebpf) {
                Ok(probes) => Some(probes),
                Err(e) => {
                    log::warn!("TLS plaintext is not captured: {e}");
                    None
                }
            }
        };
        let socks = ebpf
            .take_map(names::SOCKS)
            .ok_or(CaptureError::MissingMap(names::SOCKS))?;
        let sockets = BpfHashMap::try_from(socks)
            .map(|socks| KernelSockets {
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
        let ring = ebpf
            .take_map(names::EVENTS)
            .ok_or(CaptureError::MissingMap(names::EVENTS))?;
        let ring = RingBuf::try_from(ring).map_err(|source| CaptureError::Map {
            map: names::EVENTS,
            source,
        })?;
        let (ebpf, tls) = match tls_probes {
            // Before the agent says it is attached: a process started then is
            // covered from its first call.
            Some(probes) => {
                let attacher = super::tls_probes::TlsAttacher::spawn(ebpf, probes)
                    .map_err(CaptureError::Io)?;
                (None, Some(attacher))
            }
            None => (Some(ebpf), None),
        };
        Ok(Self {
            _ebpf: ebpf,
            ring: Some(ring),
            backend,
            stats,
            sockets,
            _return_probes: return_probes,
            tls,
        })
    }

    /// The capture backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The handle user space uses to have the kernel skip sockets and to look
    /// them up.
    pub fn kernel_sockets(&self) -> Option<KernelSockets> {
        self.sockets.clone()
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
            .ring
            .take()
            .ok_or(CaptureError::MissingMap(names::EVENTS))?;
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
        // A process's first connection: the TLS attacher looks at it now (it may
        // have just loaded a copy of OpenSSL) instead of at its next scan.
        let tls = self.tls.as_ref();
        let mut seen = |event: &Event| {
            if let Some(tls) = tls {
                tls.seen(event);
            }
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = stats_tick.tick() => {
                    if let Some(tls) = tls {
                        telemetry.tls_files.set(tls.files() as i64);
                    }
                    let now = self.kernel_counters();
                    telemetry.add_kernel_counters(&last, &now);
                    last = now;
                }
                _ = poll_tick.tick() => {
                    telemetry.health.beat(crate::health::Stage::Capture);
                    let mut source = Tee { source: fd.get_mut(), recording: recording.as_mut() };
                    drain(&mut source, &clock, &tx, &telemetry, &mut seen);
                }
                guard = fd.readable_mut() => {
                    let mut guard = guard?;
                    let mut source =
                        Tee { source: guard.get_inner_mut(), recording: recording.as_mut() };
                    drain(&mut source, &clock, &tx, &telemetry, &mut seen);
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
