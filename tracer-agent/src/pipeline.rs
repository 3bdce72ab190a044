//! The stages after capture, joined by bounded channels:
//! events → connections/protocols/spans → stitch (parent inference) → export.

use std::{sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};

use crate::{
    capture::Event,
    connections::{ConnectionTable, DbConnectionRow, SpanOptions, TableLimits},
    metrics::SharedRedMetrics,
    process::ProcessTable,
    spans::Span,
    stitch::ParentInference,
    telemetry::{QueueLabel, Telemetry},
};

/// The latest database connection inventory, published about once a second.
pub type SharedInventory = Arc<std::sync::Mutex<Vec<DbConnectionRow>>>;

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

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
    loop {
        let mut ready = Vec::new();
        tokio::select! {
            batch = rx.recv() => {
                let Some(batch) = batch else { break };
                for event in batch {
                    table.handle(event, &mut procs, &telemetry, &mut built);
                }
                let now = Instant::now().into_std();
                for span in built.drain(..) {
                    stitch.push(span, now, &mut ready);
                }
            }
            _ = tick.tick() => stitch.expire(Instant::now().into_std(), &mut ready),
        }
        send(ready, &tx, &telemetry, &red);
        if last_inventory.elapsed() >= Duration::from_secs(1) {
            last_inventory = Instant::now();
            let rows = table.db_inventory(unix_now_ns(), &mut procs);
            let events = leaks.evaluate(&rows);
            if !events.is_empty() && leaks_tx.try_send(events).is_err() {
                telemetry
                    .queue_dropped
                    .get_or_create(&QueueLabel::new("leaks"))
                    .inc();
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
    if tx.try_send(spans).is_err() {
        telemetry
            .queue_dropped
            .get_or_create(&QueueLabel::new("spans"))
            .inc_by(n);
    }
}
