//! The stages after capture, joined by bounded channels:
//! events → connections/protocols/spans → stitch (parent inference) → export.

use std::{sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};

use crate::{
    capture::{Event, loader::SocketIgnorer},
    connections::{
        ConnectionTable, DbConnectionRow, PoolSample, PoolSampleKind, SpanOptions, TableLimits,
    },
    export::otlp::unix_nano_now,
    metrics::{PoolId, SharedRedMetrics},
    process::{ProcessResource, ProcessTable},
    recover::RecoveredSocket,
    spans::Span,
    stitch::ParentInference,
    telemetry::{QueueLabel, Telemetry},
};

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
    /// Has the kernel skip sockets user space does not decode.
    pub ignorer: Option<SocketIgnorer>,
}

/// Spans waiting for export at most; beyond it batches are dropped, counted.
const MAX_QUEUED_SPANS: usize = 8192;

/// How often recovered connections that never did I/O are checked for being closed.
const RECOVERED_CHECK: Duration = Duration::from_secs(10);

/// Turns event batches into span batches until the event channel closes, then
/// flushes every span still waiting for relatives.
pub async fn process_events(
    mut rx: mpsc::Receiver<Vec<Event>>,
    tx: mpsc::Sender<Vec<Span>>,
    config: PipelineConfig,
    telemetry: Arc<Telemetry>,
    red: SharedRedMetrics,
    inventory: SharedInventory,
    leaks_tx: mpsc::Sender<Vec<crate::pools::LeakEvent>>,
) {
    let mut leaks = crate::pools::LeakDetector::new(config.leak_after);
    let mut table = ConnectionTable::with_options(config.limits, config.options);
    let mut procs = ProcessTable::new(16384);
    let mut stitch = ParentInference::new(config.parent_wait, config.max_waiting_spans);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut built = Vec::new();
    let mut last_inventory = Instant::now();
    let started = Instant::now();
    let mut last_recovered_check = Instant::now();
    if !config.recovered.is_empty() {
        let added = table.recover(&config.recovered, unix_nano_now());
        log::info!("recovered {added} connections open before the agent started (from /proc)");
    }
    loop {
        let mut ready = Vec::new();
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                telemetry.events_backlog.take(batch.len());
                for event in batch {
                    table.handle(event, &mut procs, &telemetry, &mut built);
                }
                let now = Instant::now().into_std();
                for span in built.drain(..) {
                    stitch.push(span, now, &mut ready);
                }
            }
            _ = tick.tick() => {
                stitch.expire(Instant::now().into_std(), &mut ready);
                telemetry
                    .queue_depth
                    .get_or_create(&QueueLabel::new("waiting"))
                    .set(stitch.pending() as i64);
            }
        }
        record_pool_samples(table.take_pool_samples(), &red, &mut procs);
        let not_decoded = table.take_not_decoded();
        if let Some(ignorer) = &config.ignorer {
            for n in not_decoded {
                ignorer.ignore(n.sock, n.local_port, n.remote_port);
            }
        }
        // Database connections remember the trace their last call ended up in.
        for span in ready.iter().filter(|s| s.attr("db.system.name").is_some()) {
            table.note_trace(span.span_id, span.trace_id);
        }
        send(ready, &tx, &telemetry, &red);
        if last_inventory.elapsed() >= Duration::from_secs(1) {
            last_inventory = Instant::now();
            let mut rows = table.db_inventory(unix_nano_now(), &mut procs);
            let events = leaks.evaluate(&rows, started.elapsed().as_secs_f64());
            leaks.annotate(&mut rows);
            record_pool_counts(&rows, &red, &mut procs);
            if !events.is_empty() && leaks_tx.try_send(events).is_err() {
                telemetry
                    .queue_dropped
                    .get_or_create(&QueueLabel::new("leaks"))
                    .inc();
            }
            if last_recovered_check.elapsed() >= RECOVERED_CHECK {
                last_recovered_check = Instant::now();
                prune_recovered(&mut table);
            }
            if let Ok(mut shared) = inventory.lock() {
                *shared = rows;
            }
        }
    }
    let mut ready = Vec::new();
    stitch.flush(&mut ready);
    send(ready, &tx, &telemetry, &red);
}

/// Forgets recovered connections whose socket their process no longer holds.
fn prune_recovered(table: &mut ConnectionTable) {
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
    table.prune_recovered(|pid, inode| {
        open.get(&pid)
            .and_then(Option::as_ref)
            .is_some_and(|inodes| inodes.contains(&inode))
    });
}

fn pool_id(pid: u32, db_system: &'static str, server: std::net::SocketAddr) -> PoolId {
    PoolId {
        pid,
        db_system,
        server_address: server.ip().to_string(),
        server_port: server.port(),
    }
}

/// Connection create and use times into the pool histograms.
fn record_pool_samples(samples: Vec<PoolSample>, red: &SharedRedMetrics, procs: &mut ProcessTable) {
    if samples.is_empty() {
        return;
    }
    let now = unix_nano_now();
    let Ok(mut red) = red.lock() else { return };
    for s in samples {
        let pool = pool_id(s.pid, s.db_system.as_str(), s.server);
        let resource = Some(procs.get(s.pid, ""));
        match s.kind {
            PoolSampleKind::Create => red.record_pool_create_time(&pool, s.seconds, resource, now),
            PoolSampleKind::Use => red.record_pool_use_time(&pool, s.seconds, resource, now),
        }
    }
}

/// The inventory's idle and used connections per pool into the pool gauges.
fn record_pool_counts(rows: &[DbConnectionRow], red: &SharedRedMetrics, procs: &mut ProcessTable) {
    let mut by_pool: std::collections::BTreeMap<PoolId, (u64, u64)> = Default::default();
    for r in rows {
        let pool = PoolId {
            pid: r.pid,
            db_system: r.db_system,
            server_address: r.server_address.clone(),
            server_port: r.server_port,
        };
        let (idle, used) = by_pool.entry(pool).or_default();
        if r.state == "used" {
            *used += 1;
        } else {
            *idle += 1;
        }
    }
    let counts: Vec<(PoolId, u64, u64)> = by_pool
        .into_iter()
        .map(|(pool, (idle, used))| (pool, idle, used))
        .collect();
    let resources: std::collections::HashMap<u32, Arc<ProcessResource>> = rows
        .iter()
        .map(|r| (r.pid, procs.get(r.pid, &r.executable)))
        .collect();
    if let Ok(mut red) = red.lock() {
        red.set_pool_counts(
            &counts,
            &|pid| resources.get(&pid).cloned(),
            unix_nano_now(),
        );
    }
}

fn send(
    spans: Vec<Span>,
    tx: &mpsc::Sender<Vec<Span>>,
    telemetry: &Telemetry,
    red: &SharedRedMetrics,
) {
    if spans.is_empty() {
        return;
    }
    if let Ok(mut red) = red.lock() {
        spans.iter().for_each(|s| red.record(s));
    }
    let n = spans.len() as u64;
    let room = telemetry
        .spans_backlog
        .try_add(spans.len(), MAX_QUEUED_SPANS);
    if !room || tx.try_send(spans).is_err() {
        if room {
            telemetry.spans_backlog.take(n as usize);
        }
        telemetry
            .queue_dropped
            .get_or_create(&QueueLabel::new("spans"))
            .inc_by(n);
    }
}
