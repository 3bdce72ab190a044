//! OTLP export over gRPC or HTTP/protobuf: spans, RED metrics, and database
//! connection leaks as log events (`db.client.connection.leak`).
//!
//! Spans and leaks are grouped by process: each process is its own OpenTelemetry
//! resource (`service.name`, `process.pid`, …), which the SDK's
//! one-resource-per-provider model cannot express, so requests are built from the
//! protocol types directly.

use std::{collections::HashMap, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use opentelemetry_proto::tonic::{
    collector::logs::v1::{ExportLogsServiceRequest, logs_service_client::LogsServiceClient},
    collector::metrics::v1::{
        ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient,
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    resource::v1::Resource,
};
use prost::Message;

use super::otlp_settings::{Compression, OtlpSettings, Signal, SignalSettings};
use crate::{
    pools::{LeakEvent, LeakState},
    process::ProcessResource,
};

/// The semantic-conventions version the attributes follow.
pub(crate) const SCHEMA_URL: &str = "https://opentelemetry.io/schemas/1.37.0";

/// The `event_name` of every leak log record.
pub const LEAK_EVENT_NAME: &str = "db.client.connection.leak";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl std::str::FromStr for OtlpProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" | "http" => Ok(Self::HttpProtobuf),
            other => Err(format!(
                "unknown OTLP protocol {other:?}: use grpc or http/protobuf"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("OTLP/gRPC export to {endpoint} failed: {source}")]
    Grpc {
        endpoint: String,
        source: Box<tonic::Status>,
    },
    #[error("OTLP/gRPC connection to {endpoint} failed: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("OTLP/HTTP export to {url} failed: {reason}")]
    Http {
        url: String,
        reason: String,
        /// The collector's status code, when it answered.
        status: Option<u16>,
        /// How long it asked to wait (`Retry-After`, in seconds).
        retry_after: Option<Duration>,
    },
    #[error("OTLP export to {0} timed out")]
    Timeout(String),
}

impl OtlpError {
    /// Whether the same request may go through later. As the OTLP specification
    /// has it: transport failures and timeouts, HTTP 429, 502, 503 and 504, gRPC
    /// UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED, CANCELLED, DEADLINE_EXCEEDED,
    /// OUT_OF_RANGE and DATA_LOSS (and UNKNOWN, which is how a broken connection
    /// can surface); any other answer refuses the data for good, and sending it
    /// again would only block what comes after it.
    pub fn retryable(&self) -> bool {
        match self {
            OtlpError::Endpoint { .. } => false,
            OtlpError::Connect { .. } | OtlpError::Timeout(_) => true,
            OtlpError::Http { status, .. } => {
                status.is_none_or(|s| matches!(s, 429 | 502 | 503 | 504))
            }
            OtlpError::Grpc { source, .. } => {
                use tonic::Code;
                matches!(
                    source.code(),
                    Code::Unavailable
                        | Code::ResourceExhausted
                        | Code::Aborted
                        | Code::Cancelled
                        | Code::DeadlineExceeded
                        | Code::OutOfRange
                        | Code::DataLoss
                        | Code::Unknown
                )
            }
        }
    }

    /// How long the collector asked the agent to wait before retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            OtlpError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(value),
        ..Default::default()
    }
}

fn str_value(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.to_string())),
    }
}

fn int_value(i: i64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::IntValue(i)),
    }
}

fn double_value(d: f64) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::DoubleValue(d)),
    }
}

fn bool_value(b: bool) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::BoolValue(b)),
    }
}

/// The instrumentation scope every signal is reported under.
pub(crate) const SCOPE_NAME: &str = "tracer";
pub(crate) const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE_NAME.into(),
        version: SCOPE_VERSION.into(),
        ..Default::default()
    }
}

/// A value of a resource attribute.
pub(crate) enum ResourceValue<'a> {
    Str(&'a str),
    Int(i64),
}

/// The attributes of one traced process's OTLP resource, in export order; both
/// encoders (the generated types here, and `wire` for spans) write this list.
pub(crate) fn resource_attributes(
    r: &ProcessResource,
) -> impl Iterator<Item = (&str, ResourceValue<'_>)> {
    use ResourceValue::{Int, Str};
    let namespace = r
        .service_namespace
        .as_deref()
        .map(|ns| ("service.namespace", Str(ns)));
    let instance = Some(r.service_instance_id.as_str())
        .filter(|id| !id.is_empty())
        .map(|id| ("service.instance.id", Str(id)));
    [
        ("service.name", Str(&r.service_name)),
        ("process.pid", Int(i64::from(r.pid))),
        ("process.executable.name", Str(&r.executable_name)),
        ("host.name", Str(&r.host_name)),
        ("telemetry.sdk.name", Str("tracer")),
        ("telemetry.sdk.language", Str("rust")),
        ("telemetry.distro.name", Str("tracer-agent")),
    ]
    .into_iter()
    .chain(namespace)
    .chain(instance)
    .chain(r.k8s_attributes().map(|(k, v)| (k, Str(v))))
}

/// `items` split by process, in the order each process first appears.
fn by_process<T>(items: &[T], pid: impl Fn(&T) -> u32) -> Vec<Vec<&T>> {
    let mut index: HashMap<u32, usize> = HashMap::new();
    let mut groups: Vec<Vec<&T>> = Vec::new();
    for item in items {
        let i = *index.entry(pid(item)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[i].push(item);
    }
    groups
}

/// The OTLP resource of one traced process.
pub fn resource(r: &ProcessResource) -> Resource {
    Resource {
        attributes: resource_attributes(r)
            .map(|(key, value)| match value {
                ResourceValue::Str(v) => kv(key, str_value(v)),
                ResourceValue::Int(v) => kv(key, int_value(v)),
            })
            .collect(),
        ..Default::default()
    }
}

/// `address:port`, with an IPv6 address in brackets.
/// The record's one-line message. Built from the row's metadata only: the query is
/// left to `db.query.text` (already obfuscated), nothing else from traffic is added.
fn leak_body(e: &LeakEvent) -> String {
    let r = &e.row;
    let state = match e.state {
        LeakState::Found => "",
        LeakState::Resolved => " resolved",
    };
    let mut body = format!(
        "{kind}{state}: connection from local port {local} → {server} idle {idle:.0}s",
        kind = e.kind.as_str(),
        local = r.client_port,
        server = r.pool.server,
        idle = r.idle_seconds,
    );
    if let Some(c) = &r.culprit {
        body.push_str(&format!(", last used by {} {}", c.method, c.path));
    }
    body
}

/// A W3C trace or span id from its lowercase or uppercase hex form; `None` when the
/// length or a digit is wrong, or the id is all zeros (invalid in OTLP).
fn id_bytes<const N: usize>(hex: &str) -> Option<[u8; N]> {
    let digits = hex.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| char::from(c).to_digit(16).map(|v| v as u8);
    let mut id = [0u8; N];
    for (byte, pair) in id.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    (id != [0; N]).then_some(id)
}

fn leak_record(e: &LeakEvent, now_unix_nano: u64) -> LogRecord {
    let r = &e.row;
    let (severity_number, severity_text) = match e.state {
        LeakState::Found => (SeverityNumber::Warn, "WARN"),
        LeakState::Resolved => (SeverityNumber::Info, "INFO"),
    };
    let state = match e.state {
        LeakState::Found => "found",
        LeakState::Resolved => "resolved",
    };
    let mut attributes = vec![
        kv("db.client.connection.leak.kind", str_value(e.kind.as_str())),
        kv("db.client.connection.leak.state", str_value(state)),
        kv("db.system.name", str_value(r.pool.db_system.as_str())),
    ];
    if let Some(ns) = &r.namespace {
        attributes.push(kv("db.namespace", str_value(ns)));
    }
    attributes.extend([
        kv("server.address", str_value(&r.pool.server.ip().to_string())),
        kv("server.port", int_value(i64::from(r.pool.server.port()))),
        kv("client.port", int_value(i64::from(r.client_port))),
        kv(
            "db.client.connection.pool.name",
            str_value(&r.pool.name(&r.executable)),
        ),
        kv(
            "db.client.connection.idle_time",
            double_value(r.idle_seconds),
        ),
    ]);
    if let Some(q) = &r.last_query {
        attributes.push(kv("db.query.text", str_value(q)));
    }
    if let Some(c) = &r.culprit {
        attributes.extend([
            kv("url.path", str_value(&c.path)),
            kv("http.route", str_value(&c.route)),
            kv("http.request.method", str_value(&c.method)),
        ]);
    }
    attributes.push(kv("tracer.recovered", bool_value(r.recovered)));
    // A span id without its trace is not a valid span context: both or neither.
    let ids = r
        .last_trace_id
        .as_deref()
        .and_then(id_bytes::<16>)
        .zip(r.last_span_id.as_deref().and_then(id_bytes::<8>));
    let (trace_id, span_id) = ids
        .map(|(t, s)| (t.to_vec(), s.to_vec()))
        .unwrap_or_default();
    LogRecord {
        time_unix_nano: now_unix_nano,
        observed_time_unix_nano: now_unix_nano,
        severity_number: severity_number as i32,
        severity_text: severity_text.into(),
        body: Some(str_value(&leak_body(e))),
        attributes,
        trace_id,
        span_id,
        event_name: LEAK_EVENT_NAME.into(),
        ..Default::default()
    }
}

/// Builds one logs export request for leak events, one `ResourceLogs` per process
/// with the same resource its spans have. Rows carry no host, so it is passed in.
pub fn leak_export_request(
    events: &[LeakEvent],
    host_name: &str,
    now_unix_nano: u64,
) -> ExportLogsServiceRequest {
    ExportLogsServiceRequest {
        resource_logs: by_process(events, |e| e.row.pool.pid)
            .into_iter()
            .map(|group| {
                let row = &group[0].row;
                let process = ProcessResource {
                    pid: row.pool.pid,
                    executable_name: row.executable.clone(),
                    service_name: row.service.clone(),
                    service_namespace: row.service_namespace.clone(),
                    service_instance_id: row.service_instance_id.clone(),
                    host_name: host_name.to_string(),
                    k8s: row.k8s.pod.clone(),
                    k8s_node: row.k8s.node.clone(),
                };
                ResourceLogs {
                    resource: Some(resource(&process)),
                    scope_logs: vec![ScopeLogs {
                        scope: Some(scope()),
                        log_records: group
                            .into_iter()
                            .map(|e| leak_record(e, now_unix_nano))
                            .collect(),
                        schema_url: String::new(),
                    }],
                    schema_url: SCHEMA_URL.into(),
                }
            })
            .collect(),
    }
}

/// Now, in nanoseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_nano_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

#[derive(Clone)]
enum Transport {
    Grpc {
        /// Shared by every clone of the exporter: one connection, reset for all
        /// when it breaks.
        channel: std::sync::Arc<std::sync::Mutex<Option<tonic::transport::Channel>>>,
        endpoint: Box<tonic::transport::Endpoint>,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: Box<HttpsClient>,
        headers: hyper::HeaderMap,
    },
}

/// What an export carries: its protobuf body.
enum Payload {
    /// An encoded `ExportTraceServiceRequest` (see [`super::wire`]).
    Traces(Bytes),
    Metrics(ExportMetricsServiceRequest),
    Logs(ExportLogsServiceRequest),
}

/// The part of an export the collector refused, from the answer's
/// `partial_success`: (items rejected, its message).
pub type Rejected = Option<(i64, String)>;

/// Sends one signal to its endpoint.
#[derive(Clone)]
struct Sender {
    signal: Signal,
    url: String,
    transport: Transport,
    compression: Compression,
    timeout: Duration,
}

/// Longest collector answer read.
const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// Sends spans, metrics and leak events to their OTLP endpoints (one per signal;
/// a signal without one is not sent). Cheap to clone: clones share the gRPC
/// channel or HTTP connection pool, so several requests can be in flight at once.
#[derive(Clone)]
pub struct OtlpExporter {
    traces: Option<Sender>,
    metrics: Option<Sender>,
    logs: Option<Sender>,
    /// `host.name` of leak resources (span resources carry their own).
    host_name: String,
}

impl Sender {
    fn new(signal: Signal, s: &SignalSettings) -> Result<Self, OtlpError> {
        let bad = |reason: String| OtlpError::Endpoint {
            endpoint: s.url.clone(),
            reason,
        };
        let transport = match s.protocol {
            OtlpProtocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(s.url.clone())
                    .map_err(|e| bad(e.to_string()))?
                    .connect_timeout(s.timeout)
                    .timeout(s.timeout);
                if s.url.starts_with("https://") {
                    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                    if let Some(ca) = &s.tls.ca_file {
                        let pem = std::fs::read(ca).map_err(|e| {
                            bad(format!("cannot read CA file {}: {e}", ca.display()))
                        })?;
                        // Checked the same way as for HTTP, for the same clear error.
                        crate::tls::certificates("CA file", ca).map_err(|e| bad(e.to_string()))?;
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    match (&s.tls.client_cert, &s.tls.client_key) {
                        (None, None) => {}
                        (Some(cert), Some(key)) => {
                            let read = |p: &std::path::Path| {
                                std::fs::read(p)
                                    .map_err(|e| bad(format!("cannot read {}: {e}", p.display())))
                            };
                            tls = tls.identity(tonic::transport::Identity::from_pem(
                                read(cert)?,
                                read(key)?,
                            ));
                        }
                        _ => return Err(bad(crate::tls::TlsError::HalfIdentity.to_string())),
                    }
                    endpoint = endpoint
                        .tls_config(tls)
                        .map_err(|e| bad(crate::tls::error_chain(&e)))?;
                }
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &s.headers {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                        .map_err(|_| bad(format!("header {k:?} is no valid gRPC metadata key")))?;
                    let value = v
                        .parse()
                        .map_err(|_| bad(format!("the value of header {k:?} is not valid")))?;
                    metadata.insert(key, value);
                }
                Transport::Grpc {
                    channel: Default::default(),
                    endpoint: Box::new(endpoint),
                    metadata,
                }
            }
            OtlpProtocol::HttpProtobuf => {
                let connector = s.tls.https_connector().map_err(|e| bad(e.to_string()))?;
                let mut headers = hyper::HeaderMap::new();
                for (k, v) in &s.headers {
                    let name = hyper::header::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| bad(format!("header {k:?} is no valid HTTP header name")))?;
                    let mut value = hyper::header::HeaderValue::from_str(v)
                        .map_err(|_| bad(format!("the value of header {k:?} is not valid")))?;
                    value.set_sensitive(true);
                    headers.insert(name, value);
                }
                Transport::Http {
                    client: Box::new(Client::builder(TokioExecutor::new()).build(connector)),
                    headers,
                }
            }
        };
        Ok(Self {
            signal,
            url: s.url.clone(),
            transport,
            compression: s.compression,
            timeout: s.timeout,
        })
    }

    fn name(&self) -> &'static str {
        match self.transport {
            Transport::Grpc { .. } => "otlp_grpc",
            Transport::Http { .. } => "otlp_http",
        }
    }

    /// Sends one request: connect, send and read the answer all within the timeout.
    async fn send(&mut self, payload: Payload) -> Result<Rejected, OtlpError> {
        let timeout = self.timeout;
        let url = self.url.clone();
        match tokio::time::timeout(timeout, self.send_inner(payload)).await {
            Ok(r) => r,
            Err(_) => {
                self.reset();
                Err(OtlpError::Timeout(url))
            }
        }
    }

    fn reset(&mut self) {
        if let Transport::Grpc { channel, .. } = &self.transport {
            *crate::sync::lock(channel) = None;
        }
    }

    async fn send_inner(&mut self, payload: Payload) -> Result<Rejected, OtlpError> {
        let compression = self.compression;
        match &mut self.transport {
            Transport::Grpc {
                channel,
                endpoint,
                metadata,
            } => {
                let shared = crate::sync::lock(channel).clone();
                let ch = match shared {
                    Some(ch) => ch,
                    None => {
                        let connected =
                            endpoint
                                .connect()
                                .await
                                .map_err(|source| OtlpError::Connect {
                                    endpoint: self.url.clone(),
                                    reason: crate::tls::error_chain(&source),
                                })?;
                        *crate::sync::lock(channel) = Some(connected.clone());
                        connected
                    }
                };
                let gzip = tonic::codec::CompressionEncoding::Gzip;
                let result = match payload {
                    Payload::Traces(body) => {
                        grpc_export_encoded(ch, with_metadata(metadata, body), compression).await
                    }
                    Payload::Metrics(req) => {
                        let mut c = MetricsServiceClient::new(ch);
                        if compression == Compression::Gzip {
                            c = c.send_compressed(gzip);
                        }
                        c.export(with_metadata(metadata, req)).await.map(|r| {
                            r.into_inner()
                                .partial_success
                                .filter(|p| p.rejected_data_points > 0)
                                .map(|p| (p.rejected_data_points, p.error_message))
                        })
                    }
                    Payload::Logs(req) => {
                        let mut c = LogsServiceClient::new(ch);
                        if compression == Compression::Gzip {
                            c = c.send_compressed(gzip);
                        }
                        c.export(with_metadata(metadata, req)).await.map(|r| {
                            r.into_inner()
                                .partial_success
                                .filter(|p| p.rejected_log_records > 0)
                                .map(|p| (p.rejected_log_records, p.error_message))
                        })
                    }
                };
                result.map_err(|status| {
                    // Reconnect next time: the channel may be broken.
                    *crate::sync::lock(channel) = None;
                    OtlpError::Grpc {
                        endpoint: self.url.clone(),
                        source: Box::new(status),
                    }
                })
            }
            Transport::Http { client, headers } => {
                let url = self.url.clone();
                let http = |reason: String| OtlpError::Http {
                    url: url.clone(),
                    reason,
                    status: None,
                    retry_after: None,
                };
                let body = match payload {
                    Payload::Traces(body) => body,
                    Payload::Metrics(r) => Bytes::from(r.encode_to_vec()),
                    Payload::Logs(r) => Bytes::from(r.encode_to_vec()),
                };
                let mut req = hyper::Request::post(url.as_str())
                    .header("content-type", "application/x-protobuf");
                let body = if compression == Compression::Gzip {
                    req = req.header("content-encoding", "gzip");
                    Bytes::from(gzip(&body))
                } else {
                    body
                };
                let mut req = req.body(Full::new(body)).map_err(|e| http(e.to_string()))?;
                req.headers_mut()
                    .extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| http(crate::tls::error_chain(&e)))?;
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get(hyper::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let body = read_limited(resp.into_body(), MAX_RESPONSE_BYTES).await;
                if !status.is_success() {
                    return Err(OtlpError::Http {
                        url,
                        reason: format!("collector answered {status}"),
                        status: Some(status.as_u16()),
                        retry_after,
                    });
                }
                Ok(body.and_then(|b| rejected(self.signal, &b)))
            }
        }
    }
}

/// A gRPC request carrying the configured headers as metadata.
fn with_metadata<T>(metadata: &tonic::metadata::MetadataMap, body: T) -> tonic::Request<T> {
    tonic::Request::from_parts(metadata.clone(), tonic::Extensions::default(), body)
}

/// Reads at most `max` bytes of an answer (the rest is left unread).
async fn read_limited(mut body: hyper::body::Incoming, max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.ok()?.into_data().ok();
        if let Some(d) = data {
            if out.len() + d.len() > max {
                return None;
            }
            out.extend_from_slice(&d);
        }
    }
    Some(out)
}

/// The `partial_success` of an HTTP/protobuf answer, when it rejected anything.
fn rejected(signal: Signal, body: &[u8]) -> Rejected {
    use opentelemetry_proto::tonic::collector::{
        logs::v1::ExportLogsServiceResponse, metrics::v1::ExportMetricsServiceResponse,
        trace::v1::ExportTraceServiceResponse,
    };
    let p = match signal {
        Signal::Traces => ExportTraceServiceResponse::decode(body)
            .ok()?
            .partial_success
            .map(|p| (p.rejected_spans, p.error_message)),
        Signal::Metrics => ExportMetricsServiceResponse::decode(body)
            .ok()?
            .partial_success
            .map(|p| (p.rejected_data_points, p.error_message)),
        Signal::Logs => ExportLogsServiceResponse::decode(body)
            .ok()?
            .partial_success
            .map(|p| (p.rejected_log_records, p.error_message)),
    };
    p.filter(|(n, _)| *n > 0)
}

fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    let _ = e.write_all(body);
    e.finish().unwrap_or_default()
}

impl OtlpExporter {
    /// All signals to one endpoint, the way `OTEL_EXPORTER_OTLP_ENDPOINT` means
    /// it: for gRPC the collector's address; for HTTP a base URL to which each
    /// signal's path is appended.
    pub fn new(
        endpoint: &str,
        protocol: OtlpProtocol,
        timeout: Duration,
    ) -> Result<Self, OtlpError> {
        let uri: hyper::Uri = endpoint
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| OtlpError::Endpoint {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(OtlpError::Endpoint {
                endpoint: endpoint.to_string(),
                reason: "expected a URL such as http://127.0.0.1:4317".into(),
            });
        }
        Self::from_settings(&OtlpSettings::single(endpoint, protocol, timeout))
    }

    /// One sender per configured signal; every file (CA, client certificate) is
    /// read and checked now.
    pub fn from_settings(settings: &OtlpSettings) -> Result<Self, OtlpError> {
        let sender = |s: Signal| settings.get(s).map(|cfg| Sender::new(s, cfg)).transpose();
        Ok(Self {
            traces: sender(Signal::Traces)?,
            metrics: sender(Signal::Metrics)?,
            logs: sender(Signal::Logs)?,
            host_name: crate::process::host_name(),
        })
    }

    /// Whether spans go out over OTLP (and so are buffered for it).
    pub fn exports_traces(&self) -> bool {
        self.traces.is_some()
    }

    /// The exporter label of span exports (`otlp_grpc` or `otlp_http`).
    pub fn name(&self) -> &'static str {
        self.traces.as_ref().map_or("otlp", Sender::name)
    }

    /// Exports an encoded `ExportTraceServiceRequest` (see [`super::wire`]); an error
    /// leaves the exporter usable for the next request.
    pub async fn export_encoded(&mut self, body: Bytes) -> Result<Rejected, OtlpError> {
        match &mut self.traces {
            Some(t) if !body.is_empty() => t.send(Payload::Traces(body)).await,
            _ => Ok(None),
        }
    }

    /// Forgets the gRPC channels: the next export connects anew.
    pub fn reset(&mut self) {
        for s in [&mut self.traces, &mut self.metrics, &mut self.logs]
            .into_iter()
            .flatten()
        {
            s.reset();
        }
    }

    /// Exports a metrics snapshot.
    pub async fn export_metrics(
        &mut self,
        request: ExportMetricsServiceRequest,
    ) -> Result<Rejected, OtlpError> {
        match &mut self.metrics {
            Some(m) if !request.resource_metrics.is_empty() => {
                m.send(Payload::Metrics(request)).await
            }
            _ => Ok(None),
        }
    }

    /// Exports leak events as one logs request, stamped now.
    pub async fn export_leaks(&mut self, events: &[LeakEvent]) -> Result<Rejected, OtlpError> {
        let host = self.host_name.clone();
        match &mut self.logs {
            Some(l) if !events.is_empty() => {
                let request = leak_export_request(events, &host, unix_nano_now());
                l.send(Payload::Logs(request)).await
            }
            _ => Ok(None),
        }
    }
}

/// The trace service's `Export` over gRPC with a request already encoded.
async fn grpc_export_encoded(
    channel: tonic::transport::Channel,
    request: tonic::Request<Bytes>,
    compression: Compression,
) -> Result<Rejected, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    if compression == Compression::Gzip {
        grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
    }
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("collector not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    );
    grpc.unary(request, path, Encoded)
        .await
        .map(|r| r.into_inner())
}

/// A gRPC codec for requests encoded beforehand; of the answer
/// (`ExportTraceServiceResponse`) only `partial_success` is read.
#[derive(Clone, Copy)]
struct Encoded;

impl tonic::codec::Codec for Encoded {
    type Encode = Bytes;
    type Decode = Rejected;
    type Encoder = Encoded;
    type Decoder = Encoded;
    fn encoder(&mut self) -> Self::Encoder {
        Encoded
    }
    fn decoder(&mut self) -> Self::Decoder {
        Encoded
    }
}

impl tonic::codec::Encoder for Encoded {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Encoded {
    type Item = Rejected;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Rejected>, tonic::Status> {
        use bytes::Buf;
        let body = src.copy_to_bytes(src.remaining());
        Ok(Some(rejected(Signal::Traces, &body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        pools::{DbConnectionRow, LeakKind},
        stitch::causality::Culprit,
    };

    #[test]
    fn endpoints_are_validated() {
        assert!(
            OtlpExporter::new(
                "http://127.0.0.1:4318",
                OtlpProtocol::HttpProtobuf,
                Duration::from_secs(1)
            )
            .is_ok()
        );
        assert!(
            OtlpExporter::new("127.0.0.1:4317", OtlpProtocol::Grpc, Duration::from_secs(1))
                .is_err()
        );
        assert!(OtlpExporter::new("ftp://x", OtlpProtocol::Grpc, Duration::from_secs(1)).is_err());
        assert_eq!("grpc".parse::<OtlpProtocol>(), Ok(OtlpProtocol::Grpc));
        assert!("thrift".parse::<OtlpProtocol>().is_err());
    }

    fn leak(pid: u32, state: LeakState, kind: LeakKind) -> LeakEvent {
        LeakEvent {
            state,
            kind,
            row: DbConnectionRow {
                idle_seconds: 75.4,
                open_seconds: 300.0,
                ..DbConnectionRow::sample(pid, 41234)
            },
        }
    }

    /// A found `never_returned` leak with everything known, and a resolved
    /// `idle_in_transaction` one over IPv6 with nothing optional, in two processes.
    fn two_leaks() -> Vec<LeakEvent> {
        let mut found = leak(7, LeakState::Found, LeakKind::NeverReturned);
        found.row.namespace = Some("shop".into());
        found.row.last_query = Some("SELECT * FROM orders WHERE id = ?".into());
        found.row.last_trace_id = Some("0af7651916cd43dd8448eb211c80319c".into());
        found.row.last_span_id = Some("b7ad6b7169203331".into());
        found.row.culprit = Some(Culprit {
            method: "GET".into(),
            path: "/leak/42".into(),
            route: "/leak/{id}".into(),
            span_id: "00f067aa0ba902b7".into(),
        });
        let mut resolved = leak(9, LeakState::Resolved, LeakKind::IdleInTransaction);
        resolved.row.pool.db_system = crate::protocols::db::DbSystem::Mysql;
        resolved.row.pool.server = "[::1]:3306".parse().unwrap();
        resolved.row.client_port = 50000;
        resolved.row.idle_seconds = 0.5;
        resolved.row.recovered = true;
        // Malformed ids are left out, not guessed at.
        resolved.row.last_trace_id = Some("not-hex".into());
        resolved.row.last_span_id = Some("b7ad6b7169203331".into());
        vec![found, resolved]
    }

    fn attrs(kvs: &[KeyValue]) -> Vec<(&str, any_value::Value)> {
        kvs.iter()
            .map(|kv| {
                let value = kv.value.clone().and_then(|v| v.value);
                (kv.key.as_str(), value.expect("attribute without a value"))
            })
            .collect()
    }

    fn s(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.into())
    }

    fn i(v: i64) -> any_value::Value {
        any_value::Value::IntValue(v)
    }

    fn d(v: f64) -> any_value::Value {
        any_value::Value::DoubleValue(v)
    }

    fn b(v: bool) -> any_value::Value {
        any_value::Value::BoolValue(v)
    }

    fn assert_two_leaks(req: &ExportLogsServiceRequest, now: u64) {
        assert_eq!(req.resource_logs.len(), 2, "one ResourceLogs per process");
        let version = env!("CARGO_PKG_VERSION");

        let found_res = &req.resource_logs[0];
        assert_eq!(
            attrs(&found_res.resource.as_ref().unwrap().attributes),
            vec![
                ("service.name", s("svc7")),
                ("process.pid", i(7)),
                ("process.executable.name", s("app7")),
                ("host.name", s("box")),
                ("telemetry.sdk.name", s("tracer")),
                ("telemetry.sdk.language", s("rust")),
                ("telemetry.distro.name", s("tracer-agent")),
            ]
        );
        assert_eq!(found_res.schema_url, SCHEMA_URL);
        assert_eq!(found_res.scope_logs.len(), 1);
        let scope = found_res.scope_logs[0].scope.as_ref().unwrap();
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("tracer", version)
        );
        assert_eq!(found_res.scope_logs[0].log_records.len(), 1);
        let found = &found_res.scope_logs[0].log_records[0];
        assert_eq!(found.event_name, "db.client.connection.leak");
        assert_eq!(
            (found.time_unix_nano, found.observed_time_unix_nano),
            (now, now)
        );
        assert_eq!(found.severity_number, 13);
        assert_eq!(found.severity_text, "WARN");
        assert_eq!(
            found.body.clone().and_then(|v| v.value),
            Some(s(
                "never_returned: connection from local port 41234 → 127.0.0.1:5432 idle 75s, \
                 last used by GET /leak/42"
            ))
        );
        assert_eq!(
            attrs(&found.attributes),
            vec![
                ("db.client.connection.leak.kind", s("never_returned")),
                ("db.client.connection.leak.state", s("found")),
                ("db.system.name", s("postgresql")),
                ("db.namespace", s("shop")),
                ("server.address", s("127.0.0.1")),
                ("server.port", i(5432)),
                ("client.port", i(41234)),
                (
                    "db.client.connection.pool.name",
                    s("app7[7] postgresql 127.0.0.1:5432")
                ),
                ("db.client.connection.idle_time", d(75.4)),
                ("db.query.text", s("SELECT * FROM orders WHERE id = ?")),
                ("url.path", s("/leak/42")),
                ("http.route", s("/leak/{id}")),
                ("http.request.method", s("GET")),
                ("tracer.recovered", b(false)),
            ]
        );
        assert_eq!(
            found.trace_id,
            [
                0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, 0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80,
                0x31, 0x9c
            ]
        );
        assert_eq!(
            found.span_id,
            [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31]
        );

        let resolved_res = &req.resource_logs[1];
        let resource = attrs(&resolved_res.resource.as_ref().unwrap().attributes);
        assert_eq!(
            resource[..4],
            [
                ("service.name", s("svc9")),
                ("process.pid", i(9)),
                ("process.executable.name", s("app9")),
                ("host.name", s("box")),
            ]
        );
        let resolved = &resolved_res.scope_logs[0].log_records[0];
        assert_eq!(resolved.event_name, "db.client.connection.leak");
        assert_eq!(resolved.severity_number, 9);
        assert_eq!(resolved.severity_text, "INFO");
        assert_eq!(
            resolved.body.clone().and_then(|v| v.value),
            Some(s(
                "idle_in_transaction resolved: connection from local port 50000 → [::1]:3306 idle 0s"
            ))
        );
        assert_eq!(
            attrs(&resolved.attributes),
            vec![
                ("db.client.connection.leak.kind", s("idle_in_transaction")),
                ("db.client.connection.leak.state", s("resolved")),
                ("db.system.name", s("mysql")),
                ("server.address", s("::1")),
                ("server.port", i(3306)),
                ("client.port", i(50000)),
                (
                    "db.client.connection.pool.name",
                    s("app9[9] mysql [::1]:3306")
                ),
                ("db.client.connection.idle_time", d(0.5)),
                ("tracer.recovered", b(true)),
            ]
        );
        assert!(resolved.trace_id.is_empty(), "malformed trace id");
        assert!(resolved.span_id.is_empty(), "a span id without its trace");
    }

    #[test]
    fn leak_events_become_one_log_record_each_under_their_process() {
        let now = 1_700_000_000_123_456_789;
        assert_two_leaks(&leak_export_request(&two_leaks(), "box", now), now);
    }

    #[test]
    fn leak_events_of_one_process_share_its_resource() {
        let events = [
            leak(1, LeakState::Found, LeakKind::PoolGrowth),
            leak(2, LeakState::Found, LeakKind::NeverReturned),
            leak(1, LeakState::Resolved, LeakKind::NeverReturned),
        ];
        let req = leak_export_request(&events, "box", 1);
        assert_eq!(req.resource_logs.len(), 2);
        let kinds: Vec<_> = req.resource_logs[0].scope_logs[0]
            .log_records
            .iter()
            .map(|r| attrs(&r.attributes)[0].1.clone())
            .collect();
        assert_eq!(kinds, [s("pool_growth"), s("never_returned")]);
    }

    #[test]
    fn leaks_of_a_process_in_a_pod_carry_its_pod_in_every_output() {
        let pod = crate::kube::Pod::from_object(
            serde_json::from_str(
                r#"{"metadata": {"name": "api-5d4c3b2a1-abcde", "namespace": "shop", "uid": "u",
                    "labels": {"pod-template-hash": "5d4c3b2a1"},
                    "ownerReferences": [{"kind": "ReplicaSet", "name": "api-5d4c3b2a1", "controller": true}]},
                    "spec": {"nodeName": "node-a"}}"#,
            )
            .unwrap(),
        )
        .unwrap();
        let mut event = leak(7, LeakState::Found, LeakKind::NeverReturned);
        event.row.k8s.pod = Some(std::sync::Arc::new(pod.resource(Some("app"), None, false)));
        let req = leak_export_request(std::slice::from_ref(&event), "box", 1);
        let res = attrs(&req.resource_logs[0].resource.as_ref().unwrap().attributes);
        for (key, value) in [
            ("k8s.pod.name", "api-5d4c3b2a1-abcde"),
            ("k8s.namespace.name", "shop"),
            ("k8s.deployment.name", "api"),
            ("k8s.container.name", "app"),
            ("k8s.node.name", "node-a"),
        ] {
            assert!(res.contains(&(key, s(value))), "{key}: {res:?}");
        }
        let json = crate::export::json::leak_json(&event);
        assert_eq!(json["k8s.deployment.name"], "api");
        let row = serde_json::to_value(&event.row).unwrap();
        assert_eq!(row["k8s"]["k8s.pod.name"], "api-5d4c3b2a1-abcde");
        // Outside a cluster nothing is added.
        let plain =
            serde_json::to_value(&leak(8, LeakState::Found, LeakKind::NeverReturned).row).unwrap();
        assert!(plain.get("k8s").is_none());
    }

    #[test]
    fn ids_are_parsed_from_hex_or_left_out() {
        assert_eq!(
            id_bytes::<8>("B7AD6B7169203331"),
            Some([0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31])
        );
        assert_eq!(id_bytes::<8>("b7ad6b716920333"), None);
        assert_eq!(id_bytes::<8>("b7ad6b71692033311"), None);
        assert_eq!(id_bytes::<8>("b7ad6b716920333g"), None);
        assert_eq!(id_bytes::<8>("+7ad6b7169203331"), None);
        assert_eq!(id_bytes::<8>("0000000000000000"), None);
        assert_eq!(id_bytes::<8>("é7ad6b716920333"), None);
    }

    /// A collector stand-in: answers 200 on `/v1/logs` and hands over each body.
    async fn http_collector() -> (String, tokio::sync::mpsc::Receiver<Bytes>) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let app = axum::Router::new().route(
            "/v1/logs",
            axum::routing::post(move |body: Bytes| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(body).await;
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the test collector on a free local port");
        let addr = listener.local_addr().expect("test collector address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}"), rx)
    }

    #[tokio::test]
    async fn leak_events_are_posted_to_v1_logs_over_http_protobuf() {
        let (endpoint, mut received) = http_collector().await;
        let mut exporter = OtlpExporter::new(
            &endpoint,
            OtlpProtocol::HttpProtobuf,
            Duration::from_secs(5),
        )
        .expect("a valid endpoint");
        exporter.host_name = "box".into();
        let before = unix_nano_now();
        exporter
            .export_leaks(&two_leaks())
            .await
            .expect("the test collector accepts the logs");
        let body = tokio::time::timeout(Duration::from_secs(5), received.recv())
            .await
            .expect("the collector got a request within 5s")
            .expect("the collector got a request");
        let req = ExportLogsServiceRequest::decode(body).expect("a protobuf logs request");
        let now = req.resource_logs[0].scope_logs[0].log_records[0].time_unix_nano;
        assert!(
            now >= before && now <= unix_nano_now(),
            "stamped at export time"
        );
        assert_two_leaks(&req, now);
        // Nothing to send: no request.
        exporter.export_leaks(&[]).await.unwrap();
        assert!(received.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_failed_logs_export_is_an_error_not_a_panic() {
        // A port nobody listens on: bind, note it, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free local port");
        let mut exporter = OtlpExporter::new(
            &format!("http://{addr}"),
            OtlpProtocol::HttpProtobuf,
            Duration::from_secs(2),
        )
        .unwrap();
        let err = exporter.export_leaks(&two_leaks()).await.unwrap_err();
        assert!(err.to_string().contains("/v1/logs"), "{err}");
    }
}
