//! Export: spans leave the agent as OTLP, JSON lines or a live terminal view;
//! database connection leaks as JSON or terminal lines and as OTLP log events.

pub mod json;
pub mod otlp;
pub mod pretty;

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
    /// Spans held for OTLP at most while the collector is slow or down; older ones
    /// are dropped and counted.
    pub max_buffered: usize,
    /// RED histograms, exported over OTLP every `metrics_interval` and at the end.
    pub red: SharedRedMetrics,
    pub metrics_interval: Duration,
}

impl ExportStage {
    /// Runs until the span channel closes, then flushes everything buffered.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Vec<Span>>,
        mut leaks: mpsc::Receiver<Vec<LeakEvent>>,
        telemetry: Arc<Telemetry>,
    ) {
        let mut printer = pretty::PrettyPrinter::new(std::io::stdout().is_terminal());
        let mut pending: Vec<Span> = Vec::new();
        let mut tick = tokio::time::interval(self.batch_timeout);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut metrics_tick = tokio::time::interval(self.metrics_interval);
        metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        metrics_tick.tick().await;
        loop {
            tokio::select! {
                batch = rx.recv() => {
                    let Some(batch) = batch else { break };
                    self.print(&batch, &mut printer, &telemetry);
                    if self.otlp.is_some() {
                        pending.extend(batch);
                        if pending.len() > self.max_buffered {
                            let excess = pending.len() - self.max_buffered;
                            pending.drain(..excess);
                            telemetry.queue_dropped.get_or_create(&crate::telemetry::QueueLabel::new("otlp")).inc_by(excess as u64);
                        }
                        if pending.len() >= self.batch_size {
                            self.flush(&mut pending, &telemetry).await;
                        }
                    }
                }
                _ = tick.tick() => self.flush(&mut pending, &telemetry).await,
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
            Ok(red) => red.export_request(otlp::unix_nano_now()),
            Err(_) => return,
        };
        if let Err(e) = otlp.export_metrics(request).await {
            telemetry.export_failed("otlp_metrics");
            log::warn!("{e}");
        }
    }

    /// Sends what the pool stage reported together as one OTLP logs request. Unlike
    /// spans, a failed request is not kept for retry: it is counted and dropped.
    async fn export_leaks(&mut self, events: &[LeakEvent], telemetry: &Telemetry) {
        let Some(otlp) = self.otlp.as_mut() else {
            return;
        };
        if let Err(e) = otlp.export_leaks(events).await {
            telemetry.export_failed("otlp_logs");
            log::warn!("{e}; {} leak events dropped", events.len());
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

    async fn flush(&mut self, pending: &mut Vec<Span>, telemetry: &Telemetry) {
        let Some(otlp) = self.otlp.as_mut() else {
            return;
        };
        // Exported spans leave the buffer in one go at the end: draining the front
        // of a large buffer per request would move all the rest each time.
        let mut done = 0;
        for chunk in pending.chunks(self.batch_size.max(1)) {
            match otlp.export(chunk).await {
                Ok(()) => {
                    telemetry.exported(otlp.name(), chunk.len() as u64);
                    done += chunk.len();
                }
                Err(e) => {
                    telemetry.export_failed(otlp.name());
                    log::warn!(
                        "{e}; keeping {} spans for the next attempt",
                        pending.len() - done
                    );
                    break;
                }
            }
        }
        pending.drain(..done);
    }
}
