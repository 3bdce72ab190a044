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
    /// When span exports are retried after a failure.
    pub retry: RetryPolicy,
}

/// OTLP span requests in flight at once.
const IN_FLIGHT: usize = 4;

/// Leak-event exports in flight at once; more are dropped and counted.
const LEAK_EXPORTS_IN_FLIGHT: usize = 4;

/// When span exports are retried after a failure: the delay doubles from
/// `first` up to `max` (each with up to a quarter taken off at random, so that
/// the agents of a cluster do not retry in step), or is what the collector asked
/// for (`Retry-After`, at most `max_asked`).
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub first: Duration,
    pub max: Duration,
    pub max_asked: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
            max_asked: Duration::from_secs(300),
        }
    }
}

/// The exponential backoff of span exports.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    until: Option<tokio::time::Instant>,
}

impl Backoff {
    fn ready(&self, now: tokio::time::Instant) -> bool {
        self.until.is_none_or(|t| now >= t)
    }

    /// Records a failure; returns the delay before the next attempt.
    fn failed(&mut self, policy: &RetryPolicy, asked: Option<Duration>) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = match asked {
            Some(d) => d.min(policy.max_asked),
            None => {
                let doubled = policy
                    .first
                    .saturating_mul(1u32 << (self.failures - 1).min(20))
                    .min(policy.max);
                // Up to a quarter off, from the clock's nanoseconds.
                let noise = u64::from(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos()),
                ) % 1024;
                doubled.saturating_sub(doubled.mul_f64(noise as f64 / 4096.0))
            }
        };
        self.until = Some(tokio::time::Instant::now() + delay);
        delay
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.until = None;
    }
}

/// What one round of span requests came to.
struct Sent {
    /// Not sent (a retryable failure stopped the round), in order.
    unsent: Vec<Part>,
    /// The retryable failure that stopped it.
    failure: Option<otlp::OtlpError>,
    /// Spans the collector took.
    exported: usize,
    /// Spans of requests refused for good, and the last such refusal.
    refused: usize,
    refusal: Option<otlp::OtlpError>,
}

/// Sends `requests`: the first alone (it connects when needed), the rest
/// [`IN_FLIGHT`] at a time over the same connection (the collector's round trip,
/// not our CPU, bounds a one-at-a-time exporter). A request refused for good is
/// dropped and the others go on; a retryable failure stops the round and what
/// was not sent is returned, in order.
async fn send_requests(otlp: OtlpExporter, requests: Vec<Part>, telemetry: Arc<Telemetry>) -> Sent {
    let mut done = vec![false; requests.len()];
    let mut out = Sent {
        unsent: Vec::new(),
        failure: None,
        exported: 0,
        refused: 0,
        refusal: None,
    };
    let mut next = 0;
    while out.failure.is_none() && next < requests.len() {
        let width = if next == 0 { 1 } else { IN_FLIGHT };
        let group: Vec<usize> = (next..requests.len().min(next + width)).collect();
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
                    done[i] = true;
                    out.exported += requests[i].spans;
                    note_rejected(&telemetry, "traces", rejected);
                }
                Err(e) if e.retryable() => out.failure = Some(e),
                Err(e) => {
                    done[i] = true;
                    out.refused += requests[i].spans;
                    out.refusal = Some(e);
                }
            }
        }
    }
    out.unsent = requests
        .into_iter()
        .zip(done)
        .filter(|(_, done)| !done)
        .map(|(part, _)| part)
        .collect();
    out
}

/// Waits for the round in flight, if any (never resolves otherwise).
async fn round_done(sending: &mut Option<tokio::task::JoinHandle<Sent>>) -> Option<Sent> {
    match sending {
        Some(handle) => handle.await.ok(),
        None => std::future::pending().await,
    }
}

/// The round in flight, waited for; `None` when there is none (`Some(None)`:
/// its task died).
async fn wait_round(sending: &mut Option<tokio::task::JoinHandle<Sent>>) -> Option<Option<Sent>> {
    let handle = sending.take()?;
    Some(handle.await.ok())
}

/// Longest the export stage takes to stop once the pipeline has drained: within
/// Kubernetes' default 30 s grace, with room for the stages before it.
pub const STOP_BUDGET: Duration = Duration::from_secs(20);

impl ExportStage {
    /// Runs until the span channel closes, then flushes what it can within
    /// [`STOP_BUDGET`]. Sending happens beside the loop, so a slow or
    /// black-holed collector never stops spans from being read, printed and
    /// buffered; after a failure, span exports back off (see [`RetryPolicy`]).
    pub async fn run(
        self,
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
        let mut sending: Option<tokio::task::JoinHandle<Sent>> = None;
        // Spans and bytes of the round in flight.
        let mut in_flight = (0usize, 0usize);
        let mut backoff = Backoff::default();
        let mut side = SideExports::default();
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
                        self.shed(&mut pending, in_flight.1, &telemetry);
                        if pending.spans >= self.batch_size {
                            self.start_round(&mut pending, &mut sending, &mut in_flight, &backoff, &telemetry);
                        }
                    }
                }
                _ = tick.tick() => {
                    self.start_round(&mut pending, &mut sending, &mut in_flight, &backoff, &telemetry);
                }
                done = round_done(&mut sending) => {
                    sending = None;
                    let lost = std::mem::take(&mut in_flight).0;
                    self.end_round(done, lost, &mut pending, &mut backoff, &telemetry);
                }
                _ = metrics_tick.tick() => side.metrics(&self, &telemetry),
                Some(events) = leaks.recv() => {
                    self.print_leaks(&events);
                    side.leaks(&self, events, &telemetry);
                }
            }
            otlp_depth.set((pending.spans + in_flight.0) as i64);
        }
        // Stopping: everything below within the budget, then what is left is
        // counted as dropped.
        let stop = async {
            while let Ok(events) = leaks.try_recv() {
                self.print_leaks(&events);
                side.leaks(&self, events, &telemetry);
            }
            if let Some(done) = wait_round(&mut sending).await {
                let lost = std::mem::take(&mut in_flight).0;
                self.end_round(done, lost, &mut pending, &mut backoff, &telemetry);
            }
            // One last try even while backing off: the collector may be back.
            self.start_round(
                &mut pending,
                &mut sending,
                &mut in_flight,
                &Backoff::default(),
                &telemetry,
            );
            if let Some(done) = wait_round(&mut sending).await {
                let lost = std::mem::take(&mut in_flight).0;
                self.end_round(done, lost, &mut pending, &mut backoff, &telemetry);
            }
            side.metrics(&self, &telemetry);
            side.finish().await;
        };
        if tokio::time::timeout(STOP_BUDGET, stop).await.is_err() {
            log::warn!(
                "the collector did not take what was left within {} s of stopping",
                STOP_BUDGET.as_secs()
            );
        }
        let left = pending.spans + in_flight.0;
        if left > 0 {
            telemetry.otlp_dropped("traces", "shutdown", left as u64);
            log::warn!(
                "{left} spans not exported at shutdown (counted in tracer_otlp_dropped_total)"
            );
        }
    }

    /// Drops the oldest buffered spans beyond the budget (what is in flight
    /// counts against it), counted.
    fn shed(&self, pending: &mut Encoded, in_flight_bytes: usize, telemetry: &Telemetry) {
        let dropped = pending.shed(self.max_buffered_bytes.saturating_sub(in_flight_bytes));
        if dropped > 0 {
            telemetry
                .queue_dropped
                .get_or_create(&crate::telemetry::QueueLabel::new(
                    crate::telemetry::Queue::Otlp,
                ))
                .inc_by(dropped as u64);
            telemetry.otlp_dropped("traces", "buffer_full", dropped as u64);
        }
    }

    /// Starts a round of span requests with everything buffered, unless one is in
    /// flight or the exporter is backing off.
    fn start_round(
        &self,
        pending: &mut Encoded,
        sending: &mut Option<tokio::task::JoinHandle<Sent>>,
        in_flight: &mut (usize, usize),
        backoff: &Backoff,
        telemetry: &Arc<Telemetry>,
    ) {
        let Some(otlp) = self.otlp.as_ref() else {
            return;
        };
        if sending.is_some() || pending.spans == 0 || !backoff.ready(tokio::time::Instant::now()) {
            return;
        }
        *in_flight = (pending.spans, pending.bytes);
        let requests = pending.take_requests(self.batch_size.max(1));
        *sending = Some(tokio::spawn(send_requests(
            otlp.clone(),
            requests,
            telemetry.clone(),
        )));
    }

    /// Takes back what a round did not send and sets the backoff. `done` is
    /// `None` when the round's task died; its `lost` spans are then counted.
    fn end_round(
        &self,
        done: Option<Sent>,
        lost: usize,
        pending: &mut Encoded,
        backoff: &mut Backoff,
        telemetry: &Telemetry,
    ) {
        let Some(otlp) = self.otlp.as_ref() else {
            return;
        };
        let Some(done) = done else {
            telemetry.otlp_dropped("traces", "failed", lost as u64);
            log::error!("the span export task died; {lost} spans lost");
            return;
        };
        telemetry.exported(otlp.name(), done.exported as u64);
        if done.refused > 0 {
            telemetry.export_failed(otlp.name());
            telemetry.otlp_dropped("traces", "rejected", done.refused as u64);
            if let Some(e) = &done.refusal {
                log::warn!(
                    "{e}; {} spans dropped: the collector refused them and retrying cannot help",
                    done.refused
                );
            }
        }
        let mut unsent = 0;
        for part in done.unsent.into_iter().rev() {
            unsent += part.spans;
            pending.push_front(part);
        }
        self.shed(pending, 0, telemetry);
        match done.failure {
            Some(e) => {
                telemetry.export_failed(otlp.name());
                let delay = backoff.failed(&self.retry, e.retry_after());
                telemetry.otlp_retry_delay.set(delay.as_secs_f64());
                // Once per doubling: a long outage logs a line every `max`.
                log::warn!(
                    "{e}; keeping {unsent} spans, next attempt in {:.1} s",
                    delay.as_secs_f64()
                );
            }
            None => {
                if backoff.failures > 0 {
                    log::info!(
                        "span export works again after {} failed attempts",
                        backoff.failures
                    );
                }
                backoff.succeeded();
                telemetry.otlp_retry_delay.set(0.0);
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
}

/// Metrics and leak events go out beside the loop too: one metrics export at a
/// time (a snapshot skipped while the previous is still out loses nothing, the
/// next one carries the same cumulative totals), up to
/// [`LEAK_EXPORTS_IN_FLIGHT`] leak exports. Neither is retried: a failure is
/// counted and logged.
#[derive(Default)]
struct SideExports {
    metrics: Option<tokio::task::JoinHandle<()>>,
    leaks: tokio::task::JoinSet<()>,
}

impl SideExports {
    fn metrics(&mut self, stage: &ExportStage, telemetry: &Arc<Telemetry>) {
        let Some(otlp) = stage.otlp.as_ref() else {
            return;
        };
        if self.metrics.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let request = {
            let red = crate::sync::lock(&stage.red);
            otlp_metrics::export_request(&red, otlp::unix_nano_now())
        };
        let mut otlp = otlp.clone();
        let telemetry = telemetry.clone();
        self.metrics = Some(tokio::spawn(async move {
            match otlp.export_metrics(request).await {
                Ok(rejected) => note_rejected(&telemetry, "metrics", rejected),
                Err(e) => {
                    telemetry.export_failed("otlp_metrics");
                    log::warn!("{e}");
                }
            }
        }));
    }

    /// Sends what the pool stage reported together as one OTLP logs request.
    fn leaks(&mut self, stage: &ExportStage, events: Vec<LeakEvent>, telemetry: &Arc<Telemetry>) {
        let Some(otlp) = stage.otlp.as_ref() else {
            return;
        };
        while self.leaks.try_join_next().is_some() {}
        if self.leaks.len() >= LEAK_EXPORTS_IN_FLIGHT {
            telemetry.otlp_dropped("logs", "busy", events.len() as u64);
            log::warn!(
                "{} leak events dropped: {LEAK_EXPORTS_IN_FLIGHT} exports are still waiting for the collector",
                events.len()
            );
            return;
        }
        let mut otlp = otlp.clone();
        let telemetry = telemetry.clone();
        self.leaks.spawn(async move {
            match otlp.export_leaks(&events).await {
                Ok(rejected) => note_rejected(&telemetry, "logs", rejected),
                Err(e) => {
                    telemetry.export_failed("otlp_logs");
                    telemetry.otlp_dropped("logs", "failed", events.len() as u64);
                    log::warn!("{e}; {} leak events dropped", events.len());
                }
            }
        });
    }

    /// Waits for every export still out.
    async fn finish(&mut self) {
        if let Some(h) = self.metrics.take() {
            let _ = h.await;
        }
        while self.leaks.join_next().await.is_some() {}
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

    impl ExportStage {
        /// One round, waited for, ignoring any backoff.
        async fn flush_now(&self, pending: &mut Encoded, telemetry: &Arc<Telemetry>) {
            let mut sending = None;
            let mut in_flight = (0, 0);
            self.start_round(
                pending,
                &mut sending,
                &mut in_flight,
                &Backoff::default(),
                telemetry,
            );
            if let Some(done) = wait_round(&mut sending).await {
                self.end_round(
                    done,
                    in_flight.0,
                    pending,
                    &mut Backoff::default(),
                    telemetry,
                );
            }
        }
    }

    /// A collector answering with the status `answer` holds (and counting requests).
    async fn collector(answer: Arc<AtomicUsize>, seen: Arc<AtomicUsize>) -> std::net::SocketAddr {
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move || {
                seen.fetch_add(1, Ordering::SeqCst);
                let code = answer.load(Ordering::SeqCst) as u16;
                async move { axum::http::StatusCode::from_u16(code).unwrap() }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn stage_for(addr: std::net::SocketAddr, timeout: Duration) -> ExportStage {
        ExportStage {
            output: Output::None,
            otlp: Some(
                OtlpExporter::new(
                    &format!("http://{addr}"),
                    OtlpProtocol::HttpProtobuf,
                    timeout,
                )
                .unwrap(),
            ),
            batch_size: 2,
            batch_timeout: Duration::from_millis(20),
            max_buffered_bytes: 1 << 20,
            red: RedMetrics::shared(10),
            metrics_interval: Duration::from_secs(3600),
            retry: RetryPolicy {
                first: Duration::from_millis(200),
                max: Duration::from_millis(400),
                max_asked: Duration::from_secs(1),
            },
        }
    }

    fn metric(text: &str, line_start: &str) -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// A collector that takes the request but rejects part of it (`partial_success`
    /// in a 200 answer): the rejected spans are counted, by signal, and not sent
    /// again; an answer rejecting nothing counts nothing.
    #[tokio::test]
    async fn a_partial_success_is_counted_and_not_retried() {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTracePartialSuccess, ExportTraceServiceResponse,
        };
        use prost::Message;
        let rejecting = Arc::new(AtomicUsize::new(1));
        let seen = Arc::new(AtomicUsize::new(0));
        let app = {
            let (rejecting, seen) = (rejecting.clone(), seen.clone());
            axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(move || {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let rejected = rejecting.load(Ordering::SeqCst) as i64;
                    let answer = ExportTraceServiceResponse {
                        partial_success: Some(ExportTracePartialSuccess {
                            rejected_spans: rejected,
                            error_message: if rejected > 0 {
                                "span too old".into()
                            } else {
                                String::new()
                            },
                        }),
                    };
                    async move {
                        (
                            [("content-type", "application/x-protobuf")],
                            answer.encode_to_vec(),
                        )
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let stage = stage_for(addr, Duration::from_secs(5));
        let telemetry = Arc::new(Telemetry::new());
        let rejected_total = || {
            metric(
                &telemetry.render(),
                "tracer_otlp_rejected_total{exporter=\"traces\"}",
            )
        };
        let mut pending = Encoded::default();
        pending.push_spans(&(0..2).map(span).collect::<Vec<_>>(), 2);
        stage.flush_now(&mut pending, &telemetry).await;
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert_eq!(pending.spans, 0, "accepted: nothing kept to resend");
        assert_eq!(rejected_total(), 1, "{}", telemetry.render());
        stage.flush_now(&mut pending, &telemetry).await;
        assert_eq!(seen.load(Ordering::SeqCst), 1, "nothing sent again");
        rejecting.store(0, Ordering::SeqCst);
        pending.push_spans(&(2..4).map(span).collect::<Vec<_>>(), 2);
        stage.flush_now(&mut pending, &telemetry).await;
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert_eq!(
            rejected_total(),
            1,
            "a partial success of 0 rejects nothing"
        );
    }

    /// An answer retrying cannot change (400, 401) drops that request, counted,
    /// and is not sent again; a 503 keeps its spans.
    #[tokio::test]
    async fn a_refused_request_is_dropped_and_counted_not_retried() {
        let answer = Arc::new(AtomicUsize::new(400));
        let seen = Arc::new(AtomicUsize::new(0));
        let addr = collector(answer.clone(), seen.clone()).await;
        let stage = stage_for(addr, Duration::from_secs(5));
        let telemetry = Arc::new(Telemetry::new());
        let mut pending = Encoded::default();
        pending.push_spans(&(0..2).map(span).collect::<Vec<_>>(), 2);
        stage.flush_now(&mut pending, &telemetry).await;
        assert_eq!(pending.spans, 0, "refused for good: not kept");
        stage.flush_now(&mut pending, &telemetry).await;
        assert_eq!(seen.load(Ordering::SeqCst), 1, "not sent again");
        let rejected = || {
            metric(
                &telemetry.render(),
                "tracer_otlp_dropped_total{signal=\"traces\",reason=\"rejected\"}",
            )
        };
        assert_eq!(rejected(), 2);
        answer.store(401, Ordering::SeqCst);
        pending.push_spans(&(2..4).map(span).collect::<Vec<_>>(), 2);
        stage.flush_now(&mut pending, &telemetry).await;
        assert_eq!(pending.spans, 0);
        answer.store(503, Ordering::SeqCst);
        pending.push_spans(&(4..6).map(span).collect::<Vec<_>>(), 2);
        stage.flush_now(&mut pending, &telemetry).await;
        assert_eq!(pending.spans, 2, "503 is retryable: kept");
        assert_eq!(rejected(), 4);
    }

    /// While the collector fails, attempts back off instead of following every
    /// batch; when it is back, export resumes by itself and nothing buffered is
    /// lost.
    #[tokio::test]
    async fn a_failing_collector_is_retried_with_backoff_and_export_resumes() {
        let answer = Arc::new(AtomicUsize::new(503));
        let seen = Arc::new(AtomicUsize::new(0));
        let addr = collector(answer.clone(), seen.clone()).await;
        let stage = stage_for(addr, Duration::from_secs(5));
        let telemetry = Arc::new(Telemetry::new());
        let (tx, rx) = mpsc::channel(4);
        let (_leak_tx, leak_rx) = mpsc::channel(1);
        let run = tokio::spawn(stage.run(rx, leak_rx, telemetry.clone()));
        // 100 batches over one second: without backoff, as many attempts.
        for i in 0..100u8 {
            tx.send(vec![span(i), span(i)]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let attempts = seen.load(Ordering::SeqCst);
        assert!(
            (2..=12).contains(&attempts),
            "a few attempts 200-400 ms apart, not one per batch: {attempts}"
        );
        answer.store(200, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = telemetry.render();
            if metric(&text, "tracer_spans_exported_total{exporter=\"otlp_http\"}") == 200 {
                assert!(text.contains("tracer_otlp_retry_delay_seconds 0"), "{text}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "export never resumed:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(tx);
        run.await.unwrap();
    }

    /// A collector that takes connections and never answers neither blocks the
    /// loop (spans keep being read) nor stopping beyond the export timeout; what
    /// could not go out is counted.
    #[tokio::test]
    async fn a_black_holed_collector_blocks_neither_reading_nor_stopping() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let stage = stage_for(addr, Duration::from_millis(500));
        let telemetry = Arc::new(Telemetry::new());
        let (tx, rx) = mpsc::channel(1);
        let (_leak_tx, leak_rx) = mpsc::channel(1);
        let run = tokio::spawn(stage.run(rx, leak_rx, telemetry.clone()));
        let sending = async {
            for i in 0..200u8 {
                tx.send(vec![span(i)]).await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(5), sending)
            .await
            .expect("the loop kept reading while the collector hung");
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("stopping is bounded by the export timeout")
            .unwrap();
        let text = telemetry.render();
        assert_eq!(
            metric(
                &text,
                "tracer_otlp_dropped_total{signal=\"traces\",reason=\"shutdown\"}"
            ),
            200,
            "{text}"
        );
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
        let stage = ExportStage {
            output: Output::None,
            otlp: Some(otlp),
            batch_size: 2,
            batch_timeout: Duration::from_secs(1),
            max_buffered_bytes: 1 << 20,
            red: RedMetrics::shared(10),
            metrics_interval: Duration::from_secs(60),
            retry: RetryPolicy::default(),
        };
        let telemetry = Arc::new(Telemetry::new());
        // Five requests of two spans: the first alone, then four at once, of which
        // the second overall-after-the-first (the third request) fails. Spans
        // arrive one at a time and parts are joined up to two spans a request.
        let mut pending = Encoded::default();
        let all: Vec<Span> = (0..10).map(span).collect();
        for batch in all.chunks(1) {
            pending.push_spans(batch, stage.batch_size);
        }
        assert_eq!(pending.spans, 10);
        stage.flush_now(&mut pending, &telemetry).await;
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
        stage.flush_now(&mut pending, &telemetry).await;
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
