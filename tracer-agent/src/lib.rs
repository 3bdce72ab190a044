//! tracer-agent: eBPF capture of socket traffic, turned into OpenTelemetry spans.
//!
//! The pipeline (docs/architecture.md): capture → connections → protocols → spans →
//! stitch → export. Only [`capture`] touches BPF.

pub mod agent;
pub mod capture;
pub mod check;
pub mod config;
pub mod connections;
pub mod conns;
pub mod export;
pub mod health;
pub mod kube;
pub mod metrics;
#[cfg(test)]
mod module_graph;
pub mod pipeline;
pub mod pools;
pub mod privileges;
pub mod process;
pub use tracer_protocols as protocols;
pub mod recover;
pub mod server;
pub mod service;
pub mod spans;
pub mod stitch;
pub mod sync;
pub mod telemetry;
pub mod tls;
