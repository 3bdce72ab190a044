//! The stages after capture, joined by bounded channels:
//! events → connections/protocols/spans/stitch → export.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::{
    capture::Event,
    connections::{ConnectionTable, SpanOptions, TableLimits},
    metrics::SharedRedMetrics,
    process::ProcessTable,
    spans::Span,
    telemetry::{QueueLabel, Telemetry},
};

/// Turns event batches into span batches until the event channel closes.
pub async fn process_events(
    mut rx: mpsc::Receiver<Vec<Event>>,
    tx: mpsc::Sender<Vec<Span>>,
    limits: TableLimits,
    options: SpanOptions,
    telemetry: Arc<Telemetry>,
    red: SharedRedMetrics,
) {
    let mut table = ConnectionTable::with_options(limits, options);
    let mut procs = ProcessTable::new(16384);
    while let Some(batch) = rx.recv().await {
        let mut spans = Vec::new();
        for event in batch {
            table.handle(event, &mut procs, &telemetry, &mut spans);
        }
        if spans.is_empty() {
            continue;
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
}
