//! Export: spans leave the agent as OTLP, JSON lines or a live terminal view;
//! database connection leaks as JSON or terminal lines and as OTLP log events.

pub mod json;
pub mod otlp;
pub mod otlp_metrics;
pub mod otlp_settings;
pub mod pretty;
pub mod prometheus;
pub mod wire;

use std::{
    io::{IsTerminal, Write},
    sync::Arc,
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{metrics::SharedRedMetrics, pools::LeakEvent, spans::Span, telemetry::Telemetry};
use otlp::OtlpExporter;

/// What goes to stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// A readable live view on the terminal.
    Pretty,
    /// One JSON object per line.
    Json,
    /// Nothing (export over OTLP only).
    None,
}

/// How spans, RED metrics and leak events are exported.
pub struct ExportStage {
    pub output: Output,
    pub otlp: Option<OtlpExporter>,
    /// Spans per OTLP request at most.
    pub batch_size: usize,
    /// Longest a span waits in the OTLP batch.
    pub batch_timeout: Duration,
    /// Encoded spans held for OTLP at most, in bytes, while the collector is slow or
    /// down; the oldest are dropped and counted beyond it.
    pub max_buffered_bytes: usize,
    /// RED histograms, exported over OTLP every `metrics_interval` and at the end.
    pub red: SharedRedMetrics,
    pub metrics_interval: Duration,
}

/// OTLP span requests in flight at once.
const IN_FLIGHT: usize = 4;

impl ExportStage {
    /// Runs until the span channel closes, then flushes everything buffered.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Vec<Span>>,
        mut leaks: mpsc::Receiver<Vec<LeakEvent>>,
        telemetry: Arc<Telemetry>,
    ) {
        let mut printer = pretty::PrettyPrinter::new(std::io::stdout().is_terminal());
        let mut pending = Encoded::default();
        let otlp_depth = telemetry
            .queue_depth
            .get_or_create(&crate::telemetry::QueueLabel::new(
                crate::telemetry::Queue::Otlp,
            ))
            .clone();
        let mut tick = tokio::time::interval(self.batch_timeout);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut metrics_tick = tokio::time::interval(self.metrics_interval);
        metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        metrics_tick.tick().await;
        loop {
            telemetry.health.beat(crate::health::Stage::Export);
            tokio::select! {
                batch = rx.recv() => {
                    let Some(batch) = batch else { break };
                    telemetry.spans_backlog.take(batch.len());
                    self.print(&batch, &mut printer, &telemetry);
                    if self.otlp.as_ref().is_some_and(|o| o.exports_traces()) {
                        pending.push_spans(&batch, self.batch_size);
                        drop(batch);
                        let dropped = pending.shed(self.max_buffered_bytes);
                        if dropped > 0 {
                            telemetry.queue_dropped.get_or_create(&crate::telemetry::QueueLabel::new(crate::telemetry::Queue::Otlp)).inc_by(dropped as u64);
                        }
                        if pending.spans >= self.batch_size {
                            self.flush(&mut pending, &telemetry).await;
                        }
                        otlp_depth.set(pending.spans as i64);
                    }
                }
                _ = tick.tick() => {
                    self.flush(&mut pending, &telemetry).await;
                    otlp_depth.set(pending.spans as i64);
                }
                _ = metrics_tick.tick() => self.export_metrics(&telemetry).await,
                Some(events) = leaks.recv() => {
                    self.print_leaks(&events);
                    self.export_leaks(&events, &telemetry).await;
                }
            }
        }
        // Leaks reported just before the pipeline stopped.
        while let Ok(events) = leaks.try_recv() {
            self.print_leaks(&events);
            self.export_leaks(&events, &telemetry).await;
        }
        self.flush(&mut pending, &telemetry).await;
        self.export_metrics(&telemetry).await;
    }

    async fn export_metrics(&mut self, telemetry: &Telemetry) {
        let Some(otlp) = self.otlp.as_mut() else {
            return;
        };
        let request = match self.red.lock() {
            Ok(red) => otlp_metrics::export_request(&red, otlp::unix_nano_now()),
            Err(_) => return,
        };
        match otlp.export_metrics(request).await {
            Ok(rejected) => note_rejected(telemetry, "metrics", rejected),
            Err(e) => {
                telemetry.export_failed("otlp_metrics");
                log::warn!("{e}");
            }
        }
    }

    /// Sends what the pool stage reported together as one OTLP logs request. Unlike
    /// spans, a failed request is not kept for retry: it is counted and dropped.
    async fn export_leaks(&mut self, events: &[LeakEvent], telemetry: &Telemetry) {
        let Some(otlp) = self.otlp.as_mut() else {
            return;
        };
        match otlp.export_leaks(events).await {
            Ok(rejected) => note_rejected(telemetry, "logs", rejected),
            Err(e) => {
                telemetry.export_failed("otlp_logs");
                log::warn!("{e}; {} leak events dropped", events.len());
            }
        }
    }

    fn print_leaks(&self, events: &[LeakEvent]) {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        for e in events {
            let line = match self.output {
                Output::None => continue,
                Output::Json => json::leak_json(e).to_string(),
                Output::Pretty => pretty::leak_line(e, std::io::stdout().is_terminal()),
            };
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    fn print(&self, batch: &[Span], printer: &mut pretty::PrettyPrinter, telemetry: &Telemetry) {
        let name = match self.output {
            Output::None => return,
            Output::Json => "json",
            Output::Pretty => "pretty",
        };
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut ok = 0u64;
        for span in batch {
            let line = match self.output {
                Output::Json => json::span_line(span),
                _ => printer.line(span),
            };
            if writeln!(out, "{line}").is_ok() {
                ok += 1;
            } else {
                telemetry.export_failed(name);
            }
        }
        let _ = out.flush();
        telemetry.exported(name, ok);
    }

    async fn flush(&mut self, pending: &mut Encoded, telemetry: &Telemetry) {
        let Some(otlp) = self.otlp.as_mut() else {
            return;
        };
        let mut requests = pending.take_requests(self.batch_size.max(1));
        if requests.is_empty() {
            return;
        }
        let mut sent = vec![false; requests.len()];
        // The first request goes alone (it connects when needed); the rest go
        // [`IN_FLIGHT`] at a time over the same channel: the collector's round trip,
        // not our CPU, bounds a one-at-a-time exporter.
        let mut failed = None;
        match otlp.export_encoded(requests[0].bytes.clone()).await {
            Ok(rejected) => {
                sent[0] = true;
                note_rejected(telemetry, "traces", rejected);
            }
            Err(e) => failed = Some(e),
        }
        let mut next = 1;
        while failed.is_none() && next < requests.len() {
            let group: Vec<usize> = (next..requests.len().min(next + IN_FLIGHT)).collect();
            next += group.len();
            let results = futures_util::future::join_all(group.iter().map(|&i| {
                let mut exporter = otlp.clone();
                let body = requests[i].bytes.clone();
                async move { (i, exporter.export_encoded(body).await) }
            }))
            .await;
            for (i, result) in results {
                match result {
                    Ok(rejected) => {
                        sent[i] = true;
                        note_rejected(telemetry, "traces", rejected);
                    }
                    Err(e) => failed = Some(e),
                }
            }
        }
        let exported: usize = requests
            .iter()
            .zip(&sent)
            .filter(|(_, sent)| **sent)
            .map(|(r, _)| r.spans)
            .sum();
        telemetry.exported(otlp.name(), exported as u64);
        // Keep what was not sent, in order and ahead of anything newer, for the
        // next attempt.
        let mut unsent = 0;
        for (part, _) in requests.drain(..).zip(sent).filter(|(_, sent)| !sent).rev() {
            unsent += part.spans;
            pending.push_front(part);
        }
        if let Some(e) = failed {
            telemetry.export_failed(otlp.name());
            log::warn!("{e}; keeping {unsent} spans for the next attempt");
            // The channel may be broken (a clone's reset does not reach us).
            otlp.reset();
        }
    }
}

/// Counts what a collector accepted the request of but rejected
/// (`partial_success`), and says so at most once a minute.
fn note_rejected(telemetry: &Telemetry, signal: &'static str, rejected: otlp::Rejected) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_LOG_SECS: AtomicU64 = AtomicU64::new(0);
    let Some((n, message)) = rejected else {
        return;
    };
    telemetry
        .otlp_rejected
        .get_or_create(&crate::telemetry::ExporterLabel { exporter: signal })
        .inc_by(n.max(0) as u64);
    let now = otlp::unix_nano_now() / 1_000_000_000;
    let last = LAST_LOG_SECS.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST_LOG_SECS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        log::warn!(
            "the collector rejected {n} {signal} items of an export: {message:?} (counted in tracer_otlp_rejected_total)"
        );
    }
}

/// Largest OTLP request body built from several parts (collectors commonly refuse
/// gRPC messages over 4 MiB).
const MAX_REQUEST_BYTES: usize = 2 << 20;

/// One part of an OTLP trace request: encoded `ResourceSpans` (see [`wire`]) for
/// `spans` spans. Parts joined end to end are a request.
struct Part {
    bytes: bytes::Bytes,
    spans: usize,
}

/// Spans waiting for OTLP export, already encoded: a span costs its wire size
/// (about 400 bytes) while it waits rather than its structure, and is encoded once
/// however often it is retried.
#[derive(Default)]
struct Encoded {
    parts: std::collections::VecDeque<Part>,
    spans: usize,
    bytes: usize,
}

impl Encoded {
    /// Encodes `batch` in parts of at most `per_part` spans.
    fn push_spans(&mut self, batch: &[Span], per_part: usize) {
        for chunk in batch.chunks(per_part.max(1)) {
            let bytes = bytes::Bytes::from(wire::trace_request(chunk));
            self.spans += chunk.len();
            self.bytes += bytes.len();
            self.parts.push_back(Part {
                bytes,
                spans: chunk.len(),
            });
        }
    }

    fn push_front(&mut self, part: Part) {
        self.spans += part.spans;
        self.bytes += part.bytes.len();
        self.parts.push_front(part);
    }

    /// Drops the oldest parts until at most `max_bytes` wait; returns how many spans
    /// were dropped.
    fn shed(&mut self, max_bytes: usize) -> usize {
        let mut dropped = 0;
        while self.bytes > max_bytes {
            let Some(part) = self.parts.pop_front() else {
                break;
            };
            self.spans -= part.spans;
            self.bytes -= part.bytes.len();
            dropped += part.spans;
        }
        dropped
    }

    /// Everything waiting, joined into requests of at most `per_request` spans and
    /// [`MAX_REQUEST_BYTES`] (a part larger than that goes alone).
    fn take_requests(&mut self, per_request: usize) -> Vec<Part> {
        let mut requests: Vec<Part> = Vec::new();
        let mut current: Option<(bytes::BytesMut, usize)> = None;
        for part in self.parts.drain(..) {
            if let Some((body, spans)) = &mut current {
                if *spans + part.spans <= per_request
                    && body.len() + part.bytes.len() <= MAX_REQUEST_BYTES
                {
                    body.extend_from_slice(&part.bytes);
                    *spans += part.spans;
                    continue;
                }
                let (body, spans) = current.take().unwrap_or_default();
                requests.push(Part {
                    bytes: body.freeze(),
                    spans,
                });
            }
            let mut body = bytes::BytesMut::with_capacity(part.bytes.len().max(64 << 10));
            body.extend_from_slice(&part.bytes);
            current = Some((body, part.spans));
        }
        if let Some((body, spans)) = current {
            requests.push(Part {
                bytes: body.freeze(),
                spans,
            });
        }
        self.spans = 0;
        self.bytes = 0;
        requests
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::{
        export::otlp::OtlpProtocol,
        metrics::RedMetrics,
        spans::{AttrValue, SpanId},
    };

    fn span(n: u8) -> Span {
        Span {
            span_id: SpanId([n; 8]),
            status_message: None,
            attributes: vec![("url.path", AttrValue::Str("/x".into()))],
            ..crate::spans::sample_span(1)
        }
    }

    /// Requests go out several at a time; what a failed request carried, and what
    /// was not tried, stays buffered in order, nothing is sent twice.
    #[tokio::test]
    async fn a_failed_request_keeps_its_spans_and_the_rest_go_out_once() {
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move || {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 2 {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        axum::http::StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let otlp = OtlpExporter::new(
            &format!("http://{addr}"),
            OtlpProtocol::HttpProtobuf,
            Duration::from_secs(5),
        )
        .unwrap();
        let mut stage = ExportStage {
            output: Output::None,
            otlp: Some(otlp),
            batch_size: 2,
            batch_timeout: Duration::from_secs(1),
            max_buffered_bytes: 1 << 20,
            red: RedMetrics::shared(10),
            metrics_interval: Duration::from_secs(60),
        };
        let telemetry = Telemetry::new();
        // Five requests of two spans: the first alone, then four at once, of which
        // the second overall-after-the-first (the third request) fails. Spans
        // arrive one at a time and parts are joined up to two spans a request.
        let mut pending = Encoded::default();
        let all: Vec<Span> = (0..10).map(span).collect();
        for batch in all.chunks(1) {
            pending.push_spans(batch, stage.batch_size);
        }
        assert_eq!(pending.spans, 10);
        stage.flush(&mut pending, &telemetry).await;
        assert_eq!(seen.load(Ordering::SeqCst), 5);
        assert_eq!(pending.spans, 2, "one failed request's spans stay");
        let kept: Vec<u8> = pending
            .parts
            .iter()
            .flat_map(|p| span_ids(&p.bytes))
            .collect();
        // Concurrent requests reach the server in any order: the failed one is one
        // of requests 1..=4.
        assert!(
            [[2, 3], [4, 5], [6, 7], [8, 9]]
                .iter()
                .any(|c| kept == c.to_vec()),
            "{kept:?}"
        );
        let text = telemetry.render();
        assert!(text.contains("} 8"), "eight spans exported:\n{text}");
        // The next flush sends only what was kept.
        stage.flush(&mut pending, &telemetry).await;
        assert_eq!(pending.spans, 0);
        assert!(pending.parts.is_empty());
        assert_eq!(seen.load(Ordering::SeqCst), 6);
    }

    /// The first byte of each span id in an encoded request, in order.
    fn span_ids(body: &[u8]) -> Vec<u8> {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;
        let req = ExportTraceServiceRequest::decode(body).unwrap();
        req.resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .map(|s| s.span_id[0])
            .collect()
    }

    /// Parts join into requests up to the span count; the oldest parts go first
    /// when too many spans wait; a joined request decodes to every span in order.
    #[test]
    fn parts_join_into_requests_and_the_oldest_are_shed() {
        let mut pending = Encoded::default();
        let all: Vec<Span> = (0..10).map(span).collect();
        pending.push_spans(&all[..4], 3); // parts of 3 and 1
        pending.push_spans(&all[4..], 3); // 3, 3
        assert_eq!(pending.parts.len(), 4);
        let first = pending.parts[0].bytes.len();
        assert_eq!(
            pending.shed(pending.bytes - 1),
            3,
            "the first part of three goes"
        );
        assert_eq!(pending.spans, 7);
        assert_eq!(pending.shed(pending.bytes), 0, "within the budget");
        let total: usize = pending.parts.iter().map(|p| p.bytes.len()).sum();
        assert_eq!(pending.bytes, total);
        assert!(first > 0);
        let requests = pending.take_requests(4);
        let sizes: Vec<usize> = requests.iter().map(|r| r.spans).collect();
        assert_eq!(sizes, [4, 3], "1+3 joined, then 3");
        assert_eq!(span_ids(&requests[0].bytes), [3, 4, 5, 6]);
        assert_eq!(span_ids(&requests[1].bytes), [7, 8, 9]);
        assert_eq!(pending.spans, 0);
    }
}
