//! The agent's own counters, exposed as Prometheus text on `/metrics`.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tracer_common::stats::{COUNTERS, Counter as KernelCounter};

use crate::stitch::{SOURCES, StitchCounts, causality::Refusals};

/// The bounded queues (and the spans waiting for relatives), as `queue` labels.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Queue {
    /// Capture → pipeline.
    Events,
    /// Pipeline → export.
    Spans,
    /// Encoded spans waiting for the collector.
    Otlp,
    /// Spans waiting for their relatives in parent inference.
    Waiting,
    /// Leak reports, pipeline → export.
    Leaks,
}

impl Queue {
    pub fn as_str(self) -> &'static str {
        match self {
            Queue::Events => "events",
            Queue::Spans => "spans",
            Queue::Otlp => "otlp",
            Queue::Waiting => "waiting",
            Queue::Leaks => "leaks",
        }
    }
}

impl EncodeLabelValue for Queue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: Queue,
}

impl QueueLabel {
    pub fn new(queue: Queue) -> Self {
        Self { queue }
    }
}

/// Why traffic was skipped or rejected, as `reason` labels of
/// `tracer_traffic_dropped_total`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum DropReason {
    /// Data on a socket whose open event was lost (followed with the endpoints the
    /// kernel still has; ignored when it has none).
    ConnectionOpenMissed,
    /// A connection no longer decoded: the decoders' global byte budget was spent
    /// and its decoder grew.
    MemoryBudget,
    /// A connection's first bytes are no protocol the agent decodes.
    UnknownProtocol,
    /// A TLS connection whose plaintext the TLS probes do not bring (its process
    /// uses a TLS library they do not cover: Go, Java, rustls): not decoded.
    Encrypted,
    /// TLS plaintext read behind a memory BIO (Node.js, asyncio) that could not be
    /// placed on its connection with certainty (records, not connections).
    TlsUnplaced,
    HttpRequestMalformed,
    HttpResponseMalformed,
    /// More requests waiting for answers on one connection than the limit.
    HttpPendingOverflow,
    /// A response with no request waiting for it.
    HttpResponseUnpaired,
    /// Requests still unanswered when their connection closed.
    RequestUnanswered,
    PostgresqlMalformed,
    MysqlMalformed,
    RedisMalformed,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::ConnectionOpenMissed => "connection_open_missed",
            DropReason::MemoryBudget => "memory_budget",
            DropReason::UnknownProtocol => "unknown_protocol",
            DropReason::Encrypted => "encrypted",
            DropReason::TlsUnplaced => "tls_unplaced",
            DropReason::HttpRequestMalformed => "http_request_malformed",
            DropReason::HttpResponseMalformed => "http_response_malformed",
            DropReason::HttpPendingOverflow => "http_pending_overflow",
            DropReason::HttpResponseUnpaired => "http_response_unpaired",
            DropReason::RequestUnanswered => "request_unanswered",
            DropReason::PostgresqlMalformed => "postgresql_malformed",
            DropReason::MysqlMalformed => "mysql_malformed",
            DropReason::RedisMalformed => "redis_malformed",
        }
    }
}

impl EncodeLabelValue for DropReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// A bounded table of the agent's state, for `tracer_state_forgotten_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// See [`Telemetry::forgotten`].
    pub table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExporterLabel {
    /// `json`, `pretty`, `otlp_grpc`, `otlp_http`, `otlp_metrics`, `otlp_logs`.
    pub exporter: &'static str,
}

/// What parent inference did with a span: the `tracer.parent.source` it left with,
/// or what it had to refuse or repair.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ParentLabel {
    /// `header`, `socket`, `thread`, `timing`, `none`; `evicted` (forced out
    /// unlinked, buffer full), `duplicate_id` (renamed), `cycle` (link refused);
    /// calls left unlinked because a rule did not hold: `refused_moves_work` (the
    /// process moves work between threads), `refused_ambiguous` (several handlers
    /// could have sent it), `refused_pool_hand_off` (sent on a pooled connection
    /// right after its previous answer).
    pub outcome: &'static str,
}

/// Why OTLP data was given up, by signal: `rejected` (the collector refused it
/// with an answer that retrying cannot change, such as 400 or 401), `buffer_full`
/// (spans beyond the buffer while the collector was down or slow), `busy` (leak
/// events while earlier ones were still being sent), `failed` (metrics and
/// logs are not retried), `shutdown` (still unsent when the agent had to stop).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OtlpDropLabel {
    pub signal: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: DropReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelLabel {
    pub counter: String,
}

/// Every counter the agent keeps about itself.
pub struct Telemetry {
    registry: Registry,
    /// Events read from the ring buffer.
    pub events_read: Counter,
    /// Events the kernel could not hand over (ring buffer full).
    pub events_lost: Counter,
    /// Payload bytes captured in the kernel.
    pub bytes_captured: Counter,
    /// Every kernel-side counter, by name.
    pub kernel: Family<KernelLabel, Counter>,
    /// Ring-buffer records that did not decode.
    pub decode_errors: Counter,
    /// Batches or spans dropped because a bounded queue was full.
    pub queue_dropped: Family<QueueLabel, Counter>,
    /// Entries a bounded table of state forgot to stay within its limit (each
    /// limit and what forgetting costs: docs/architecture.md), by table.
    pub forgotten: Family<TableLabel, Counter>,
    /// Items waiting in each bounded queue now (events, spans, otlp), and spans
    /// waiting for their relatives in parent inference (waiting).
    pub queue_depth: Family<QueueLabel, Gauge>,
    /// Spans built from traffic.
    pub spans_built: Counter,
    /// Spans handed to each exporter successfully.
    pub spans_exported: Family<ExporterLabel, Counter>,
    /// Export attempts that failed, per exporter.
    pub export_errors: Family<ExporterLabel, Counter>,
    /// Items a collector took the request of but rejected (`partial_success`),
    /// per signal (`traces`, `metrics`, `logs`).
    pub otlp_rejected: Family<ExporterLabel, Counter>,
    /// OTLP items given up, by signal and reason.
    pub otlp_dropped: Family<OtlpDropLabel, Counter>,
    /// Seconds until the next span export attempt after failures (0: none due).
    pub otlp_retry_delay: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Traffic the decoders skipped or rejected, by reason.
    pub traffic_dropped: Family<ReasonLabel, Counter>,
    /// Connections evicted from the connection table because it was full.
    pub connections_evicted: Counter,
    /// Bytes the connections' decoders hold between chunks (the global budget's
    /// count; beyond it growing connections are no longer decoded).
    pub decoder_held_bytes: Gauge,
    /// Files (OpenSSL copies) the TLS probes are attached to.
    pub tls_files: Gauge,
    /// Database connections found closed in /proc whose close event was lost.
    pub connections_closed_unseen: Counter,
    /// Spans by how parent inference linked them, and what it refused.
    pub parent_inference: Family<ParentLabel, Counter>,
    /// Events waiting between capture and the pipeline, and spans waiting between
    /// the pipeline and export: the channels are bounded in batches, these in items.
    pub events_backlog: Backlog,
    pub spans_backlog: Backlog,
    /// 1 for the capture backend in use (`backend` label).
    pub capture_backend: Family<BackendLabel, Gauge>,
    /// The Kubernetes metadata cache and its API requests.
    pub kube: crate::kube::KubeCounters,
    /// Whether each stage is alive (`/healthz`).
    pub health: crate::health::Health,
}

/// The `backend` label of `tracer_capture_backend`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

/// Items waiting in a channel of batches, counted by both of its ends.
#[derive(Debug, Default)]
pub struct Backlog {
    items: std::sync::atomic::AtomicUsize,
    /// Woken whenever items leave, for a sender waiting for room.
    freed: tokio::sync::Notify,
}

impl Backlog {
    /// Reserves room for `n` more items if the backlog stays within `max`.
    pub fn try_add(&self, n: usize, max: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.items
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur + n <= max).then_some(cur + n)
            })
            .is_ok()
    }

    /// Reserves room for `n` more items (at most `max`), waiting until `deadline`
    /// for the receiving end to take some; false if there was no room by then.
    pub async fn add_within(&self, n: usize, max: usize, deadline: tokio::time::Instant) -> bool {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable(); // a take from now on wakes it
            if self.try_add(n, max) {
                return true;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.try_add(n, max);
            }
        }
    }

    /// Items waiting now.
    pub fn len(&self) -> usize {
        self.items.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` items left the channel (or never entered it).
    pub fn take(&self, n: usize) {
        use std::sync::atomic::Ordering;
        let _ = self
            .items
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                Some(cur.saturating_sub(n))
            });
        self.freed.notify_waiters();
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    /// The counter of entries `table` forgot (a handle sharing the family's count:
    /// a table keeps it and adds to it where it forgets).
    pub fn forgotten_in(&self, table: &'static str) -> Counter {
        self.forgotten.get_or_create(&TableLabel { table }).clone()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tracer");
        let t = Self {
            registry: Registry::default(),
            events_backlog: Backlog::default(),
            spans_backlog: Backlog::default(),
            events_read: Counter::default(),
            events_lost: Counter::default(),
            bytes_captured: Counter::default(),
            kernel: Family::default(),
            decode_errors: Counter::default(),
            queue_dropped: Family::default(),
            forgotten: Family::default(),
            otlp_dropped: Family::default(),
            otlp_retry_delay: Gauge::default(),
            decoder_held_bytes: Gauge::default(),
            tls_files: Gauge::default(),
            queue_depth: Family::default(),
            spans_built: Counter::default(),
            spans_exported: Family::default(),
            export_errors: Family::default(),
            otlp_rejected: Family::default(),
            traffic_dropped: Family::default(),
            connections_evicted: Counter::default(),
            connections_closed_unseen: Counter::default(),
            parent_inference: Family::default(),
            capture_backend: Family::default(),
            kube: Default::default(),
            health: Default::default(),
        };
        registry.register(
            "capture_backend",
            "The capture backend in use (tracepoints, fexit, kprobes or syscalls): 1 on its label",
            t.capture_backend.clone(),
        );
        registry.register(
            "events_read",
            "Events read from the kernel ring buffer",
            t.events_read.clone(),
        );
        registry.register(
            "events_lost",
            "Events lost in the kernel because the ring buffer was full",
            t.events_lost.clone(),
        );
        registry.register(
            "bytes_captured",
            "Payload bytes captured in the kernel",
            t.bytes_captured.clone(),
        );
        registry.register("kernel", "Kernel-side counters by name", t.kernel.clone());
        registry.register(
            "decode_errors",
            "Ring buffer records that did not decode",
            t.decode_errors.clone(),
        );
        registry.register(
            "queue_dropped",
            "Items dropped because a bounded queue was full",
            t.queue_dropped.clone(),
        );
        registry.register(
            "state_forgotten",
            "Entries of a bounded table of state forgotten to stay within its limit, by table",
            t.forgotten.clone(),
        );
        registry.register(
            "queue_depth",
            "Items waiting in each bounded queue (events, spans, otlp) and spans waiting for relatives (waiting)",
            t.queue_depth.clone(),
        );
        registry.register(
            "spans_built",
            "Spans built from captured traffic",
            t.spans_built.clone(),
        );
        registry.register(
            "spans_exported",
            "Spans handed to an exporter successfully",
            t.spans_exported.clone(),
        );
        registry.register(
            "export_errors",
            "Failed export attempts",
            t.export_errors.clone(),
        );
        registry.register(
            "otlp_rejected",
            "Items a collector accepted the export of but rejected (partial_success), by signal",
            t.otlp_rejected.clone(),
        );
        registry.register(
            "otlp_dropped",
            "OTLP items given up, by signal and reason (rejected, buffer_full, busy, failed, shutdown)",
            t.otlp_dropped.clone(),
        );
        registry.register(
            "otlp_retry_delay_seconds",
            "Seconds the span exporter waits before its next attempt after failures (0: none due)",
            t.otlp_retry_delay.clone(),
        );
        registry.register(
            "traffic_dropped",
            "Captured traffic skipped or rejected by the decoders",
            t.traffic_dropped.clone(),
        );
        registry.register(
            "decoder_held_bytes",
            "Bytes the connections' decoders hold between chunks; past the budget (256 MiB) a connection whose decoder grows is no longer decoded (traffic_dropped reason memory_budget)",
            t.decoder_held_bytes.clone(),
        );
        registry.register(
            "tls_files_attached",
            "Copies of OpenSSL (libraries, executables that link it) the TLS probes are attached to",
            t.tls_files.clone(),
        );
        registry.register(
            "connections_evicted",
            "Connections evicted because the table was full",
            t.connections_evicted.clone(),
        );
        registry.register(
            "connections_closed_unseen",
            "Idle database connections found closed in /proc although their close event was lost (taken out of their pool, never reported as leaked)",
            t.connections_closed_unseen.clone(),
        );
        registry.register(
            "parent_inference",
            "Spans released by parent inference, by the rule that linked them (outcome = header, socket, thread, timing, none), and links it refused or repaired (evicted, duplicate_id, cycle)",
            t.parent_inference.clone(),
        );
        registry.register(
            "kubernetes_pods",
            "Pods of this node in the Kubernetes metadata cache",
            t.kube.pods.clone(),
        );
        registry.register(
            "kubernetes_pods_dropped",
            "Pods left out of the Kubernetes metadata cache: over its limit, or undecodable",
            t.kube.pods_dropped.clone(),
        );
        registry.register(
            "kubernetes_api_errors",
            "Failed list or watch requests to the Kubernetes API server",
            t.kube.api_errors.clone(),
        );
        Self { registry, ..t }
    }

    fn add_parent(&self, outcome: &'static str, before: u64, now: u64) {
        if now > before {
            self.parent_inference
                .get_or_create(&ParentLabel { outcome })
                .inc_by(now - before);
        }
    }

    /// Adds the calls causality refused to link since `before`.
    pub fn add_refusals(&self, before: &Refusals, now: &Refusals) {
        self.add_parent("refused_moves_work", before.moves_work, now.moves_work);
        self.add_parent("refused_ambiguous", before.ambiguous, now.ambiguous);
        self.add_parent(
            "refused_pool_hand_off",
            before.pool_hand_off,
            now.pool_hand_off,
        );
    }

    /// Adds what parent inference counted since `before`.
    pub fn add_stitch_counts(&self, before: &StitchCounts, now: &StitchCounts) {
        self.add_parent("evicted", before.evicted, now.evicted);
        self.add_parent("duplicate_id", before.duplicate_ids, now.duplicate_ids);
        self.add_parent("cycle", before.cycles, now.cycles);
        for (i, source) in SOURCES.iter().enumerate() {
            self.add_parent(source.as_str(), before.released[i], now.released[i]);
        }
    }

    /// Records which capture backend the kernel programs use (by name).
    pub fn set_capture_backend(&self, backend: &str) {
        self.capture_backend
            .get_or_create(&BackendLabel {
                backend: backend.to_string(),
            })
            .set(1);
    }

    /// Adds the growth of the kernel counters between two reads.
    pub fn add_kernel_counters(
        &self,
        before: &[u64; COUNTERS as usize],
        now: &[u64; COUNTERS as usize],
    ) {
        for c in KernelCounter::ALL {
            let delta = now[c as usize].saturating_sub(before[c as usize]);
            if delta == 0 {
                continue;
            }
            self.kernel
                .get_or_create(&KernelLabel {
                    counter: c.name().to_string(),
                })
                .inc_by(delta);
            match c {
                KernelCounter::RingbufFull => {
                    self.events_lost.inc_by(delta);
                }
                KernelCounter::BytesCaptured => {
                    self.bytes_captured.inc_by(delta);
                }
                _ => {}
            }
        }
    }

    /// Counts one piece of traffic skipped or rejected, by reason.
    pub fn dropped(&self, reason: DropReason) {
        self.dropped_n(reason, 1);
    }

    pub fn dropped_n(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.traffic_dropped
                .get_or_create(&ReasonLabel { reason })
                .inc_by(n);
        }
    }

    pub fn exported(&self, exporter: &'static str, n: u64) {
        self.spans_exported
            .get_or_create(&ExporterLabel { exporter })
            .inc_by(n);
    }

    /// Counts OTLP items given up.
    pub fn otlp_dropped(&self, signal: &'static str, reason: &'static str, n: u64) {
        if n > 0 {
            self.otlp_dropped
                .get_or_create(&OtlpDropLabel { signal, reason })
                .inc_by(n);
        }
    }

    pub fn export_failed(&self, exporter: &'static str) {
        self.export_errors
            .get_or_create(&ExporterLabel { exporter })
            .inc();
    }

    /// Prometheus text exposition of every counter.
    pub fn render(&self) -> String {
        for (queue, backlog) in [
            (Queue::Events, &self.events_backlog),
            (Queue::Spans, &self.spans_backlog),
        ] {
            self.queue_depth
                .get_or_create(&QueueLabel::new(queue))
                .set(backlog.len() as i64);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_kernel_deltas() {
        let t = Telemetry::new();
        t.events_read.inc_by(5);
        let before = [0u64; COUNTERS as usize];
        let mut now = [0u64; COUNTERS as usize];
        now[KernelCounter::RingbufFull as usize] = 3;
        t.add_kernel_counters(&before, &now);
        t.exported("json", 2);
        assert!(t.events_backlog.try_add(7, 10));
        let text = t.render();
        assert!(text.contains("tracer_events_read_total 5"), "{text}");
        assert!(
            text.contains("tracer_queue_depth{queue=\"events\"} 7"),
            "{text}"
        );
        assert!(text.contains("tracer_events_lost_total 3"), "{text}");
        assert!(
            text.contains("tracer_kernel_total{counter=\"ringbuf_full\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("tracer_spans_exported_total{exporter=\"json\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn a_backlog_bounds_items_not_batches() {
        let b = Backlog::default();
        assert!(b.try_add(60, 100));
        assert!(
            !b.try_add(41, 100),
            "over the bound: refused, nothing reserved"
        );
        assert!(b.try_add(40, 100));
        b.take(70);
        assert!(b.try_add(70, 100));
        b.take(1000); // never below zero
        assert!(b.try_add(100, 100));
    }
}
