//! The stage after capture: one task that turns event batches into spans and pool
//! state, synchronously, in this order for every batch:
//! events → [`ConnectionTable`] (connections, protocols, spans) → [`Downstream`]
//! (causality, pool tracker) → [`ParentInference`] (stitch) → pool tracker (settled
//! traces) → span queue → export; once a second [`PoolStage`] takes the inventory,
//! evaluates leaks and sets the pool metrics.

use std::{sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};
use tracer_common::conn::Role;

use crate::{
    capture::{Endpoints, Event, loader::KernelSockets},
    connections::{ConnectionTable, Observer, SpanOptions, TableLimits},
    export::otlp::unix_nano_now,
    metrics::SharedRedMetrics,
    pools::{
        DbConnectionRow, LeakEvent, PoolKey, PoolStage, PoolTracker,
        tracker::{DbObservation, PoolSample, PoolSampleKind},
    },
    process::{ProcessResource, ProcessTable},
    recover::RecoveredSocket,
    spans::{Span, SpanId},
    stitch::{
        ParentInference, StitchCounts,
        causality::{Causality, Cause, Culprit, Refusals, ThreadEvent},
        traceparent::{HeaderAt, HeaderUse, SeenHeaders, TraceParent},
    },
    telemetry::{Queue, QueueLabel, Telemetry},
};

/// What the connection table reports to: parent inference's per-thread causality,
/// the pool tracker, and the spans it built (taken by the caller after each event).
#[derive(Default)]
pub struct Downstream {
    pub causality: Causality,
    pub pools: PoolTracker,
    pub headers: SeenHeaders,
    pub spans: Vec<Span>,
    /// The kernel's socket maps (none in replays).
    pub kernel: Option<KernelSockets>,
}

impl Observer for Downstream {
    fn span(&mut self, span: Span) {
        self.spans.push(span);
    }

    fn thread(&mut self, event: ThreadEvent<'_>) {
        self.causality.observe(event);
    }

    fn cause(&mut self, pid: u32, tid: u32, ts_ns: u64, conn: u64) -> Cause {
        self.causality.cause(pid, tid, ts_ns, conn)
    }

    fn traceparent(&mut self, at: HeaderAt, tp: &TraceParent) -> HeaderUse {
        self.headers.observe(at, tp)
    }

    fn culprit(&mut self, span: SpanId) -> Option<Culprit> {
        self.causality.culprit(span)
    }

    fn db(&mut self, observation: DbObservation) {
        self.pools.observe(observation);
    }

    fn kernel_socket(&mut self, sock: u64) -> Option<(Endpoints, Role)> {
        self.kernel.as_ref()?.lookup(sock)
    }
}

/// The latest database connection inventory, published about once a second.
pub type SharedInventory = Arc<std::sync::Mutex<Vec<DbConnectionRow>>>;

/// How the span stages are set up.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub limits: TableLimits,
    pub options: SpanOptions,
    /// Longest a span waits for its relatives before it is exported unlinked.
    pub parent_wait: Duration,
    /// Spans waiting for relatives at most (older ones go out unlinked first).
    pub max_waiting_spans: usize,
    /// How long a database connection may sit unused before it is a leak.
    pub leak_after: Duration,
    /// Connections open before the agent started, found in /proc.
    pub recovered: Vec<RecoveredSocket>,
    /// Has the kernel skip sockets user space does not decode, and looks up those
    /// whose open event was lost.
    pub kernel_sockets: Option<KernelSockets>,
    /// How processes that do not name themselves are named.
    pub naming: crate::service::ServiceNaming,
    /// This node's pods, in a Kubernetes cluster.
    pub kube: Option<crate::kube::Kube>,
}

/// Spans waiting for export at most; beyond it batches are dropped, counted.
const MAX_QUEUED_SPANS: usize = 8192;

/// How often recovered connections that never did I/O are checked for being closed.
const RECOVERED_CHECK: Duration = Duration::from_secs(10);

/// Adds to `/metrics` what parent inference counted since the last call.
fn publish_parent_counts(
    telemetry: &Telemetry,
    published: &mut (StitchCounts, Refusals),
    stitch: &ParentInference,
    down: &Downstream,
) {
    telemetry.add_stitch_counts(&published.0, &stitch.counts);
    telemetry.add_refusals(&published.1, &down.causality.refused);
    *published = (stitch.counts, down.causality.refused);
}

/// Turns event batches into span batches until the event channel closes, then
/// flushes every span still waiting for relatives.
pub async fn process_events(
    mut rx: mpsc::Receiver<Vec<Event>>,
    tx: mpsc::Sender<Vec<Span>>,
    config: PipelineConfig,
    telemetry: Arc<Telemetry>,
    red: SharedRedMetrics,
    inventory: SharedInventory,
    leaks_tx: mpsc::Sender<Vec<LeakEvent>>,
) {
    let mut pools = PoolStage::new(config.leak_after);
    let mut table = ConnectionTable::with_options(config.limits, config.options);
    let mut procs = ProcessTable::new(16384)
        .with_naming(config.naming)
        .with_kube(config.kube);
    let mut down = Downstream {
        kernel: config.kernel_sockets.clone(),
        ..Downstream::default()
    };
    down.causality.forgotten = telemetry.forgotten_in("causality");
    down.pools.forgotten = telemetry.forgotten_in("pools");
    down.headers.forgotten = telemetry.forgotten_in("traceparent_ids");
    let mut stitch = ParentInference::new(config.parent_wait, config.max_waiting_spans);
    stitch.forgotten = telemetry.forgotten_in("parent_inference");
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_recovered_check = Instant::now();
    let mut idle_checked: std::collections::HashMap<u64, std::time::Instant> = Default::default();
    let mut published = (stitch.counts, down.causality.refused);
    let mut stuck = false;
    if !config.recovered.is_empty() {
        let added = table.recover(&config.recovered, unix_nano_now(), &mut down);
        log::info!("recovered {added} connections open before the agent started (from /proc)");
    }
    loop {
        let mut ready = Vec::new();
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                telemetry.events_backlog.take(batch.len());
                for event in batch {
                    table.handle(event, &mut procs, &telemetry, &mut down);
                }
                stitch_new_spans(&mut down, &mut stitch, &mut ready);
            }
            _ = tick.tick() => {
                telemetry.health.beat(crate::health::Stage::Pipeline);
                telemetry.decoder_held_bytes.set(table.held_bytes() as i64);
                table.expire_closing(unix_nano_now(), &mut procs, &telemetry, &mut down);
                stitch_new_spans(&mut down, &mut stitch, &mut ready);
                stitch.expire(Instant::now().into_std(), &mut ready);
                telemetry
                    .queue_depth
                    .get_or_create(&QueueLabel::new(Queue::Waiting))
                    .set(stitch.pending() as i64);
                publish_parent_counts(&telemetry, &mut published, &stitch, &down);
            }
        }
        record_pool_samples(down.pools.take_samples(), &red, &mut procs);
        let not_decoded = table.take_not_decoded();
        if let Some(kernel) = &config.kernel_sockets {
            for n in not_decoded {
                kernel.ignore(n.sock, n.local_port, n.remote_port);
            }
        }
        // Database connections remember the trace their last call ended up in.
        for span in ready.iter().filter(|s| s.attr("db.system.name").is_some()) {
            down.pools.settled(span.span_id, span.trace_id);
        }
        send(ready, &tx, &telemetry, &red, &mut stuck).await;
        let now = Instant::now();
        if pools.due(now.into_std()) {
            check_idle_connections(
                &mut table,
                &mut down,
                &mut idle_checked,
                config.leak_after,
                &telemetry,
            );
            let rows = table.db_inventory(unix_nano_now(), &mut procs, &down.pools);
            let round = pools.round(rows, now.into_std());
            record_pool_counts(&round.counts, &round.rows, &red, &mut procs);
            if !round.leaks.is_empty() && leaks_tx.try_send(round.leaks).is_err() {
                telemetry
                    .queue_dropped
                    .get_or_create(&QueueLabel::new(Queue::Leaks))
                    .inc();
            }
            if last_recovered_check.elapsed() >= RECOVERED_CHECK {
                last_recovered_check = Instant::now();
                prune_recovered(&mut table, &mut down);
            }
            {
                let mut shared = crate::sync::lock(&inventory);
                *shared = round.rows;
            }
        }
    }
    let mut ready = Vec::new();
    table.expire_closing(u64::MAX, &mut procs, &telemetry, &mut down);
    stitch_new_spans(&mut down, &mut stitch, &mut ready);
    stitch.flush(&mut ready);
    publish_parent_counts(&telemetry, &mut published, &stitch, &down);
    send(ready, &tx, &telemetry, &red, &mut stuck).await;
}

/// Hands the spans the connection table made to the stitcher.
fn stitch_new_spans(down: &mut Downstream, stitch: &mut ParentInference, ready: &mut Vec<Span>) {
    let now = Instant::now().into_std();
    for span in down.spans.drain(..) {
        stitch.push(span, now, ready);
    }
}

/// Forgets recovered connections whose socket their process no longer holds.
fn prune_recovered(table: &mut ConnectionTable, down: &mut Downstream) {
    let sockets = table.recovered_sockets();
    if sockets.is_empty() {
        return;
    }
    let mut open: std::collections::HashMap<u32, Option<std::collections::HashSet<u64>>> =
        Default::default();
    for (pid, _) in &sockets {
        open.entry(*pid).or_insert_with(|| {
            crate::recover::open_socket_inodes(std::path::Path::new("/proc"), *pid)
        });
    }
    table.prune_recovered(
        |pid, inode| {
            open.get(&pid)
                .and_then(Option::as_ref)
                .is_some_and(|inodes| inodes.contains(&inode))
        },
        down,
    );
}

/// How often one idle database connection is looked up in /proc.
const IDLE_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Database connections idle for half the leak threshold are looked up in their
/// process's /proc (each at most every [`IDLE_CHECK_EVERY`]): one the process no
/// longer holds was closed without the kernel's close event reaching us (the ring
/// buffer was full), and is taken out of its pool before it could be reported as
/// leaked. A process whose /proc cannot be read keeps its connections.
fn check_idle_connections(
    table: &mut ConnectionTable,
    down: &mut Downstream,
    checked: &mut std::collections::HashMap<u64, std::time::Instant>,
    leak_after: Duration,
    telemetry: &Telemetry,
) {
    let idle_before = unix_nano_now().saturating_sub((leak_after / 2).as_nanos() as u64);
    let candidates = table.idle_db_connections(idle_before);
    let now = std::time::Instant::now();
    let keep: std::collections::HashSet<u64> = candidates.iter().map(|c| c.0).collect();
    checked.retain(|sock, _| keep.contains(sock));
    let mut open: std::collections::HashMap<
        u32,
        Option<std::collections::HashSet<(u16, std::net::SocketAddr)>>,
    > = Default::default();
    let canonical =
        |a: std::net::SocketAddr| std::net::SocketAddr::new(a.ip().to_canonical(), a.port());
    for (sock, pid, ends) in candidates {
        if ends.local.port() == 0 || ends.remote.ip().is_unspecified() {
            continue; // endpoints unknown: cannot tell
        }
        if checked
            .get(&sock)
            .is_some_and(|t| now.duration_since(*t) < IDLE_CHECK_EVERY)
        {
            continue;
        }
        checked.insert(sock, now);
        let held = open.entry(pid).or_insert_with(|| {
            crate::recover::open_connections(std::path::Path::new("/proc"), pid).map(|set| {
                set.into_iter()
                    .map(|(local, remote)| (local.port(), canonical(remote)))
                    .collect()
            })
        });
        let Some(held) = held else { continue };
        if !held.contains(&(ends.local.port(), canonical(ends.remote)))
            && table.forget_closed(sock, down)
        {
            checked.remove(&sock);
            telemetry.connections_closed_unseen.inc();
            log::debug!(
                "database connection {} → {} of pid {pid} is closed, its close event was lost",
                ends.local,
                ends.remote
            );
        }
    }
}

/// Connection create and use times into the pool histograms.
fn record_pool_samples(samples: Vec<PoolSample>, red: &SharedRedMetrics, procs: &mut ProcessTable) {
    if samples.is_empty() {
        return;
    }
    let now = unix_nano_now();
    let mut red = crate::sync::lock(red);
    for s in samples {
        let resource = Some(procs.get(s.pool.pid, ""));
        match s.kind {
            PoolSampleKind::Create => {
                red.record_pool_create_time(&s.pool, s.seconds, resource, now)
            }
            PoolSampleKind::Use => red.record_pool_use_time(&s.pool, s.seconds, resource, now),
        }
    }
}

/// The inventory's idle and used connections per pool into the pool gauges.
fn record_pool_counts(
    counts: &[(PoolKey, u64, u64)],
    rows: &[DbConnectionRow],
    red: &SharedRedMetrics,
    procs: &mut ProcessTable,
) {
    let resources: std::collections::HashMap<u32, Arc<ProcessResource>> = rows
        .iter()
        .map(|r| (r.pool.pid, procs.get(r.pool.pid, &r.executable)))
        .collect();
    crate::sync::lock(red).set_pool_counts(
        counts,
        &|pid| resources.get(&pid).cloned(),
        unix_nano_now(),
    );
}

/// Spans per batch handed to export: a burst larger than the queue goes out in
/// pieces, each waiting for its room.
const SPANS_PER_BATCH: usize = MAX_QUEUED_SPANS / 8;

/// Longest the pipeline waits for export to make room in the span queue.
/// Export never waits on the network (sending runs beside it), so a full queue
/// means it is short of CPU for a moment, as when a burst of spans is released
/// at once; past this wait the batch is dropped and counted.
const SPAN_QUEUE_WAIT: Duration = Duration::from_millis(500);

/// Hands spans to export, waiting up to [`SPAN_QUEUE_WAIT`] for room. Once a
/// wait has run out, later batches do not wait until there is room again, so an
/// export that stays stuck never holds the pipeline up more than once.
async fn send(
    mut spans: Vec<Span>,
    tx: &mpsc::Sender<Vec<Span>>,
    telemetry: &Telemetry,
    red: &SharedRedMetrics,
    stuck: &mut bool,
) {
    if spans.is_empty() {
        return;
    }
    {
        let mut red = crate::sync::lock(red);
        spans.iter().for_each(|s| red.record(s));
    }
    while !spans.is_empty() {
        let rest = spans.split_off(spans.len().min(SPANS_PER_BATCH));
        let batch = std::mem::replace(&mut spans, rest);
        let n = batch.len();
        let backlog = &telemetry.spans_backlog;
        let room = if backlog.try_add(n, MAX_QUEUED_SPANS) {
            *stuck = false;
            true
        } else if *stuck {
            false
        } else {
            let deadline = Instant::now() + SPAN_QUEUE_WAIT;
            let room = backlog.add_within(n, MAX_QUEUED_SPANS, deadline).await;
            *stuck = !room;
            room
        };
        if !room || tx.try_send(batch).is_err() {
            if room {
                backlog.take(n);
            }
            telemetry
                .queue_dropped
                .get_or_create(&QueueLabel::new(Queue::Spans))
                .inc_by(n as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::RedMetrics;

    fn spans(n: usize) -> Vec<Span> {
        (0..n)
            .map(|i| crate::spans::sample_span(i as u32))
            .collect()
    }

    fn dropped(telemetry: &Telemetry) -> u64 {
        telemetry
            .queue_dropped
            .get_or_create(&QueueLabel::new(Queue::Spans))
            .get()
    }

    #[tokio::test]
    async fn a_burst_larger_than_the_span_queue_waits_for_export_and_loses_nothing() {
        let telemetry = Arc::new(Telemetry::new());
        let red: SharedRedMetrics = Arc::new(std::sync::Mutex::new(RedMetrics::new(100)));
        let (tx, mut rx) = mpsc::channel::<Vec<Span>>(1024);
        let t = telemetry.clone();
        let export = tokio::spawn(async move {
            let mut got = 0;
            while let Some(batch) = rx.recv().await {
                tokio::time::sleep(Duration::from_millis(1)).await; // a slow export
                t.spans_backlog.take(batch.len());
                got += batch.len();
            }
            got
        });
        let mut stuck = false;
        let burst = 3 * MAX_QUEUED_SPANS + 17;
        send(spans(burst), &tx, &telemetry, &red, &mut stuck).await;
        drop(tx);
        assert_eq!(export.await.unwrap(), burst);
        assert_eq!(dropped(&telemetry), 0);
        assert!(!stuck);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_export_costs_one_wait_then_batches_are_dropped_and_counted() {
        let telemetry = Telemetry::new();
        let red: SharedRedMetrics = Arc::new(std::sync::Mutex::new(RedMetrics::new(100)));
        let (tx, _rx) = mpsc::channel::<Vec<Span>>(1024); // nobody reads
        let mut stuck = false;
        send(spans(MAX_QUEUED_SPANS), &tx, &telemetry, &red, &mut stuck).await;
        assert_eq!(dropped(&telemetry), 0, "the queue holds its bound");
        let started = Instant::now();
        send(spans(10), &tx, &telemetry, &red, &mut stuck).await;
        assert_eq!(started.elapsed(), SPAN_QUEUE_WAIT, "waited once");
        assert!(stuck);
        assert_eq!(dropped(&telemetry), 10);
        let started = Instant::now();
        send(spans(5), &tx, &telemetry, &red, &mut stuck).await;
        assert_eq!(started.elapsed(), Duration::ZERO, "no second wait");
        assert_eq!(dropped(&telemetry), 15);
        // Export takes some: the next batch fits and waiting is back on.
        telemetry.spans_backlog.take(100);
        send(spans(5), &tx, &telemetry, &red, &mut stuck).await;
        assert!(!stuck);
        assert_eq!(dropped(&telemetry), 15);
    }
}
