//! Runs the whole agent: capture, pipeline, export and the HTTP endpoint, until
//! SIGTERM, SIGINT or SIGHUP, then flushes (a second signal stops at once).

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    capture::loader::{BpfCapture, CaptureConfig, CaptureError},
    config::Config,
    connections::{SpanOptions, TableLimits},
    export::{ExportStage, otlp::OtlpExporter},
    health::Stage,
    metrics::RedMetrics,
    pipeline::{self, PipelineConfig, SharedInventory},
    server,
    telemetry::Telemetry,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Otlp(#[from] crate::export::otlp::OtlpError),
    #[error("cannot listen on {addr}: {source} (choose another address with --listen)")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("a stage of the agent stopped on its own: {0}")]
    Stopped(String),
    #[error("installing the signal handler failed: {0}")]
    Signal(std::io::Error),
    #[error("cannot create the event recording {path}: {source}")]
    Recording {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Event batches waiting between capture and the pipeline (small batches are the
/// norm at low rates; the items they hold are bounded separately).
const EVENT_QUEUE: usize = 1024;
/// Span batches waiting between the pipeline and export.
const SPAN_QUEUE: usize = 1024;
/// RED metric series kept at most (then one overflow series per metric).
const MAX_METRIC_SERIES: usize = 2000;

pub async fn run(config: Config) -> Result<(), AgentError> {
    // Listened for from the start: a stop asked for while the agent starts (it
    // loads, attaches, gives up its capabilities) is acted on once it has, never
    // the signal's default action.
    let mut stop = StopSignals::new().map_err(AgentError::Signal)?;
    let telemetry = Arc::new(Telemetry::new());
    let otlp = if config.otlp.is_empty() {
        None
    } else {
        for signal in crate::export::otlp_settings::SIGNALS {
            if let Some(s) = config.otlp.get(signal) {
                log::info!(
                    "OTLP {}: {} over {}{}{}",
                    signal.name(),
                    s.url,
                    match s.protocol {
                        crate::export::otlp::OtlpProtocol::Grpc => "grpc",
                        crate::export::otlp::OtlpProtocol::HttpProtobuf => "http/protobuf",
                    },
                    if s.protocol_guessed {
                        " (port 4317: set OTEL_EXPORTER_OTLP_PROTOCOL to override)"
                    } else {
                        ""
                    },
                    if s.headers.is_empty() {
                        String::new()
                    } else {
                        let keys: Vec<&str> = s.headers.iter().map(|(k, _)| k.as_str()).collect();
                        format!(", headers {}", keys.join(", "))
                    }
                );
            }
        }
        Some(OtlpExporter::from_settings(&config.otlp)?)
    };
    let listener = server::bind(config.listen)
        .await
        .map_err(|source| AgentError::Listen {
            addr: config.listen,
            source,
        })?;
    if !config.listen.ip().is_loopback() {
        log::warn!(
            "listening on {}, not loopback: /metrics and /connections (database peers, users, \
             client addresses) are open to anyone who reaches it, with no authentication",
            config.listen
        );
    }
    // The connections open already, found in /proc before the programs attach: once
    // they are, events wait in the ring buffer until the capture task reads them,
    // and a scan of a busy host's sockets would let it fill. A socket opened between
    // the scan and the attach is met at its first I/O instead.
    let recovered = recover_connections(&config);
    let capture = BpfCapture::load(&CaptureConfig {
        capture_bytes: config.capture_bytes,
        pids: config.pids.clone(),
        ports: config.ports.clone(),
        ringbuf_bytes: config.ringbuf_bytes,
        max_sockets: config.max_connections as u32,
        empty_probes: config.empty_probes,
        backend: config.capture_backend,
        tls: config.tls,
    })?;
    telemetry.set_capture_backend(capture.backend().name());
    if config.empty_probes {
        log::warn!("--empty-probes: the probes do nothing; this agent traces nothing");
    }
    let kernel_sockets = capture.kernel_sockets();
    // Loading parsed this kernel's BTF (megabytes), now freed: give those pages
    // back to the system rather than keep them as the agent's resident set.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    log::info!(
        "tracing TCP traffic{}{} with the {} capture backend; metrics on http://{}/metrics",
        if config.pids.is_empty() {
            String::new()
        } else {
            format!(" of pids {:?}", config.pids)
        },
        if config.ports.is_empty() {
            String::new()
        } else {
            format!(" on ports {:?}", config.ports)
        },
        capture.backend(),
        config.listen
    );

    let cancel = CancellationToken::new();
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    let (span_tx, span_rx) = mpsc::channel(SPAN_QUEUE);
    let (leak_tx, leak_rx) = mpsc::channel(64);

    let kube = config.kube.as_ref().map(|k| {
        let kube = crate::kube::Kube::new(&k.node_name, k.well_known_labels);
        log::info!(
            "Kubernetes metadata: watching the pods of node {} on {}",
            k.node_name,
            k.api
        );
        tokio::spawn(crate::kube::client::run(
            k.clone(),
            kube.clone(),
            telemetry.kube.clone(),
            cancel.clone(),
        ));
        kube
    });
    let red = RedMetrics::shared(MAX_METRIC_SERIES);
    let inventory = SharedInventory::default();
    let server = tokio::spawn(server::serve(
        listener,
        telemetry.clone(),
        red.clone(),
        inventory.clone(),
        cancel.clone(),
    ));
    let pipeline = tokio::spawn(pipeline::process_events(
        event_rx,
        span_tx,
        PipelineConfig {
            limits: TableLimits {
                max_connections: config.max_connections,
                ..TableLimits::default()
            },
            options: SpanOptions {
                keep_sql_literals: config.keep_sql_literals,
            },
            parent_wait: config.parent_wait,
            max_waiting_spans: 100_000,
            leak_after: config.leak_after,
            recovered,
            kernel_sockets,
            naming: config.naming.clone(),
            kube,
        },
        telemetry.clone(),
        red.clone(),
        inventory,
        leak_tx,
    ));
    let export = tokio::spawn(
        ExportStage {
            output: config.output,
            otlp,
            batch_size: 2048,
            batch_timeout: Duration::from_secs(1),
            // About 27,000 HTTP spans (the outage soak): bounded memory through a
            // collector outage.
            max_buffered_bytes: 16 << 20,
            red,
            metrics_interval: Duration::from_secs(15),
            retry: Default::default(),
        }
        .run(span_rx, leak_rx, telemetry.clone()),
    );
    let recording = match &config.record_events {
        Some(path) => {
            let file = std::fs::File::create(path).map_err(|source| AgentError::Recording {
                path: path.clone(),
                source,
            })?;
            log::warn!(
                "recording raw events (captured payloads included) to {}",
                path.display()
            );
            Some(file)
        }
        None => None,
    };
    // Everything that needs privileges is done: keep only what reading /proc needs.
    match crate::privileges::drop_after_attach() {
        Ok(d) => {
            // The other threads follow when they next park or wake: wake them.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            let mut holding = crate::privileges::threads_holding_more();
            while !holding.is_empty() && tokio::time::Instant::now() < deadline {
                for _ in 0..4 {
                    tokio::spawn(async {});
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                holding = crate::privileges::threads_holding_more();
            }
            log::info!(
                "programs attached; capabilities given up: {}; kept: {}",
                list_or_none(&crate::privileges::names(d.dropped)),
                list_or_none(&crate::privileges::names(d.kept))
            );
            for (thread, caps) in holding {
                log::warn!(
                    "thread {thread} still holds capabilities {}",
                    list_or_none(&crate::privileges::names(caps))
                );
            }
        }
        Err(e) => log::warn!("cannot give up capabilities after attaching: {e}"),
    }
    let capture = tokio::spawn(capture.run(event_tx, telemetry.clone(), cancel.clone(), recording));
    tokio::spawn(return_free_memory(cancel.clone()));

    // A stage that ends before we are told to stop leaves an agent that sees
    // nothing: that is a failure, reported by /healthz and the exit status.
    let stopped = {
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                // Cancel-safe: a signal is kept for the next call.
                name = stop.recv() => {
                    log::info!("{name}: stopping (a second signal stops at once, without flushing)");
                    tokio::spawn(async move {
                        let name = stop.recv().await;
                        log::error!("second signal ({name}): stopping now; what was not exported is lost");
                        std::process::exit(EXIT_FORCED);
                    });
                    break None;
                }
                _ = check.tick() => {
                    let ended = [
                        (Stage::Capture, capture.is_finished()),
                        (Stage::Pipeline, pipeline.is_finished()),
                        (Stage::Export, export.is_finished()),
                    ];
                    if let Some((stage, _)) = ended.into_iter().find(|(_, done)| *done) {
                        break Some(stage);
                    }
                }
            }
        }
    };
    if stopped.is_none() {
        log::info!("flushing spans");
    }
    cancel.cancel();
    // Capture drains the ring buffer and closes the event channel; the pipeline then
    // closes the span channel and export flushes.
    let why = |r: Result<(), tokio::task::JoinError>| match r {
        Ok(()) => "ended".to_string(),
        Err(e) => e.to_string(),
    };
    let mut failure = None;
    let capture = match capture.await {
        Ok(Err(e)) => Err(format!("capture stopped with an error: {e}")),
        Err(e) => Err(format!("capture task failed: {e}")),
        Ok(Ok(())) => Ok(()),
    };
    if let Err(e) = &capture {
        log::error!("{e}");
    }
    let pipeline = pipeline.await;
    let export = export.await;
    if let Some(stage) = stopped {
        let reason = match stage {
            Stage::Capture => capture.err().unwrap_or_else(|| "ended".into()),
            Stage::Pipeline => why(pipeline),
            Stage::Export => why(export),
        };
        telemetry.health.failed(stage, &reason);
        log::error!("the {stage:?} stage stopped on its own ({reason}); the agent stops");
        failure = Some(AgentError::Stopped(format!("{stage:?}: {reason}")));
    }
    // Graceful: requests being answered finish; one that never completes (a
    // client that sent half a request) does not hold the agent up.
    let server_abort = server.abort_handle();
    if tokio::time::timeout(SERVER_STOP, server).await.is_err() {
        log::warn!(
            "the agent's endpoint still had connections after {} s; closed",
            SERVER_STOP.as_secs()
        );
        server_abort.abort();
    }
    failure.map_or(Ok(()), Err)
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// How often heap pages freed by bursts are handed back to the system.
const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// The allocator keeps freed memory for reuse; after a burst (a backlog of spans, a
/// collector outage) that would stay in the agent's resident set for good. Every
/// [`TRIM_INTERVAL`] the free pages go back (a few hundred microseconds of work).
async fn return_free_memory(cancel: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {
                // SAFETY: malloc_trim has no preconditions.
                unsafe { libc::malloc_trim(0) };
            }
        }
    }
}

/// Exit status when a second signal cuts stopping short.
const EXIT_FORCED: i32 = 2;

/// Longest the endpoint's open connections may hold up stopping.
const SERVER_STOP: Duration = Duration::from_secs(2);

/// SIGTERM, SIGINT and SIGHUP (a closed terminal), each a request to stop with a
/// flush, listened for from when this is made: until then a signal has its
/// default action.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// The next one's name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Connections open before the agent started, from /proc, within the --pid and
/// --port filters (the kernel applies them to everything else).
fn recover_connections(config: &Config) -> Vec<crate::recover::RecoveredSocket> {
    let me = std::process::id();
    match crate::recover::scan(std::path::Path::new("/proc"), me, config.max_connections) {
        Ok((mut sockets, stats)) => {
            sockets.retain(|s| {
                (config.pids.is_empty() || config.pids.contains(&s.pid))
                    && (config.ports.is_empty()
                        || config.ports.contains(&s.local.port())
                        || config.ports.contains(&s.remote.port()))
            });
            if stats.skipped_over_limit > 0 || stats.unreadable > 0 {
                log::info!(
                    "/proc scan: {} processes, {} sockets kept, {} over the connection limit, {} processes unreadable",
                    stats.processes,
                    sockets.len(),
                    stats.skipped_over_limit,
                    stats.unreadable
                );
            }
            sockets
        }
        Err(e) => {
            log::warn!("cannot scan /proc for connections open before the agent: {e}");
            Vec::new()
        }
    }
}
