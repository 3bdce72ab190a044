//! OTLP trace export over gRPC or HTTP/protobuf.
//!
//! Spans are grouped by process: each process is its own OpenTelemetry resource
//! (`service.name`, `process.pid`, …), which the SDK's one-resource-per-provider
//! model cannot express, so requests are built from the protocol types directly.

use std::{collections::HashMap, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient,
    },
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1::{
        ResourceSpans, ScopeSpans, Span as ProtoSpan, Status, span::SpanKind as ProtoKind,
        status::StatusCode,
    },
};
use prost::Message;

use crate::{
    process::ProcessResource,
    spans::{AttrValue, Span, SpanKind, SpanStatus},
};

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
    #[error("OTLP/gRPC connection to {endpoint} failed: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("OTLP/HTTP export to {url} failed: {reason}")]
    Http { url: String, reason: String },
    #[error("OTLP export to {0} timed out")]
    Timeout(String),
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

fn attr(key: &str, v: &AttrValue) -> KeyValue {
    let value = match v {
        AttrValue::Str(s) => str_value(s),
        AttrValue::Int(i) => int_value(*i),
        AttrValue::Double(d) => AnyValue {
            value: Some(any_value::Value::DoubleValue(*d)),
        },
    };
    kv(key, value)
}

/// The OTLP resource of one traced process.
pub fn resource(r: &ProcessResource) -> Resource {
    Resource {
        attributes: vec![
            kv("service.name", str_value(&r.service_name)),
            kv("process.pid", int_value(i64::from(r.pid))),
            kv("process.executable.name", str_value(&r.executable_name)),
            kv("host.name", str_value(&r.host_name)),
            kv("telemetry.sdk.name", str_value("tracer")),
            kv("telemetry.sdk.language", str_value("rust")),
            kv("telemetry.distro.name", str_value("tracer-agent")),
        ],
        ..Default::default()
    }
}

fn proto_span(s: &Span) -> ProtoSpan {
    let mut attributes: Vec<KeyValue> = s.attributes.iter().map(|(k, v)| attr(k, v)).collect();
    attributes.push(kv(
        "tracer.parent.source",
        str_value(s.parent_source.as_str()),
    ));
    attributes.push(kv(
        "tracer.parent.confidence",
        AnyValue {
            value: Some(any_value::Value::DoubleValue(s.parent_confidence)),
        },
    ));
    ProtoSpan {
        trace_id: s.trace_id.0.to_vec(),
        span_id: s.span_id.0.to_vec(),
        parent_span_id: s.parent_span_id.map(|p| p.0.to_vec()).unwrap_or_default(),
        name: s.name.clone(),
        kind: match s.kind {
            SpanKind::Server => ProtoKind::Server as i32,
            SpanKind::Client => ProtoKind::Client as i32,
        },
        start_time_unix_nano: s.start_unix_nano,
        end_time_unix_nano: s.end_unix_nano,
        attributes,
        status: Some(Status {
            code: match s.status {
                SpanStatus::Unset => StatusCode::Unset as i32,
                SpanStatus::Ok => StatusCode::Ok as i32,
                SpanStatus::Error => StatusCode::Error as i32,
            },
            message: String::new(),
        }),
        ..Default::default()
    }
}

/// Builds one export request, one `ResourceSpans` per process.
pub fn export_request(spans: &[Span]) -> ExportTraceServiceRequest {
    let mut by_process: HashMap<u32, (Arc<ProcessResource>, Vec<ProtoSpan>)> = HashMap::new();
    let mut order = Vec::new();
    for s in spans {
        let entry = by_process.entry(s.resource.pid).or_insert_with(|| {
            order.push(s.resource.pid);
            (s.resource.clone(), Vec::new())
        });
        entry.1.push(proto_span(s));
    }
    let scope = InstrumentationScope {
        name: "tracer".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: order
            .into_iter()
            .filter_map(|pid| by_process.remove(&pid))
            .map(|(res, spans)| ResourceSpans {
                resource: Some(resource(&res)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope.clone()),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: "https://opentelemetry.io/schemas/1.37.0".into(),
            })
            .collect(),
    }
}

enum Transport {
    Grpc {
        channel: Option<tonic::transport::Channel>,
        endpoint: String,
    },
    Http {
        client: Box<Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>>,
        base: String,
    },
}

/// What an export carries: the signal's HTTP path and its protobuf body.
enum Payload {
    Traces(ExportTraceServiceRequest),
    Metrics(ExportMetricsServiceRequest),
}

impl Payload {
    fn path(&self) -> &'static str {
        match self {
            Payload::Traces(_) => "/v1/traces",
            Payload::Metrics(_) => "/v1/metrics",
        }
    }
}

/// Sends span batches to one OTLP endpoint.
pub struct OtlpExporter {
    transport: Transport,
    timeout: Duration,
}

impl OtlpExporter {
    /// `endpoint` follows `OTEL_EXPORTER_OTLP_ENDPOINT`: for gRPC the collector
    /// address (`http://host:4317`); for HTTP the base URL, to which `/v1/traces` is
    /// appended unless the URL already ends with it.
    pub fn new(
        endpoint: &str,
        protocol: OtlpProtocol,
        timeout: Duration,
    ) -> Result<Self, OtlpError> {
        let bad = |reason: &str| OtlpError::Endpoint {
            endpoint: endpoint.to_string(),
            reason: reason.to_string(),
        };
        let uri: hyper::Uri = endpoint
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "https is not supported yet: use a local collector over http",
                ));
            }
            _ => return Err(bad("expected a URL such as http://127.0.0.1:4317")),
        }
        if uri.host().is_none() {
            return Err(bad("no host"));
        }
        let transport = match protocol {
            OtlpProtocol::Grpc => Transport::Grpc {
                channel: None,
                endpoint: endpoint.trim_end_matches('/').to_string(),
            },
            OtlpProtocol::HttpProtobuf => {
                // OTEL_EXPORTER_OTLP_ENDPOINT is a base URL; signal paths are appended.
                let base = endpoint
                    .trim_end_matches('/')
                    .trim_end_matches("/v1/traces")
                    .to_string();
                Transport::Http {
                    client: Box::new(Client::builder(TokioExecutor::new()).build_http()),
                    base,
                }
            }
        };
        Ok(Self { transport, timeout })
    }

    pub fn name(&self) -> &'static str {
        match self.transport {
            Transport::Grpc { .. } => "otlp_grpc",
            Transport::Http { .. } => "otlp_http",
        }
    }

    /// Exports one batch of spans; an error leaves the exporter usable for the next batch.
    pub async fn export(&mut self, spans: &[Span]) -> Result<(), OtlpError> {
        if spans.is_empty() {
            return Ok(());
        }
        self.send(Payload::Traces(export_request(spans))).await
    }

    /// Exports a metrics snapshot.
    pub async fn export_metrics(
        &mut self,
        request: ExportMetricsServiceRequest,
    ) -> Result<(), OtlpError> {
        if request.resource_metrics.is_empty() {
            return Ok(());
        }
        self.send(Payload::Metrics(request)).await
    }

    async fn send(&mut self, payload: Payload) -> Result<(), OtlpError> {
        let timeout = self.timeout;
        match &mut self.transport {
            Transport::Grpc { channel, endpoint } => {
                if channel.is_none() {
                    let connected = tonic::transport::Endpoint::from_shared(endpoint.clone())
                        .map_err(|e| OtlpError::Endpoint {
                            endpoint: endpoint.clone(),
                            reason: e.to_string(),
                        })?
                        .connect_timeout(timeout)
                        .timeout(timeout)
                        .connect()
                        .await
                        .map_err(|source| OtlpError::Connect {
                            endpoint: endpoint.clone(),
                            source,
                        })?;
                    *channel = Some(connected);
                }
                let Some(ch) = channel.clone() else {
                    return Ok(());
                };
                let result = match payload {
                    Payload::Traces(req) => {
                        TraceServiceClient::new(ch).export(req).await.map(|_| ())
                    }
                    Payload::Metrics(req) => {
                        MetricsServiceClient::new(ch).export(req).await.map(|_| ())
                    }
                };
                if let Err(status) = result {
                    // Reconnect next time: the channel may be broken.
                    *channel = None;
                    return Err(OtlpError::Grpc {
                        endpoint: endpoint.clone(),
                        source: Box::new(status),
                    });
                }
                Ok(())
            }
            Transport::Http { client, base } => {
                let url = format!("{base}{}", payload.path());
                let body = match &payload {
                    Payload::Traces(r) => r.encode_to_vec(),
                    Payload::Metrics(r) => r.encode_to_vec(),
                };
                let req = hyper::Request::post(url.as_str())
                    .header("content-type", "application/x-protobuf")
                    .body(Full::new(Bytes::from(body)))
                    .map_err(|e| OtlpError::Http {
                        url: url.clone(),
                        reason: e.to_string(),
                    })?;
                let resp = tokio::time::timeout(timeout, client.request(req))
                    .await
                    .map_err(|_| OtlpError::Timeout(url.clone()))?
                    .map_err(|e| OtlpError::Http {
                        url: url.clone(),
                        reason: e.to_string(),
                    })?;
                let status = resp.status();
                // Read the body so the connection can be reused.
                let _ = resp.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(OtlpError::Http {
                        url,
                        reason: format!("collector answered {status}"),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::{ParentSource, SpanId, TraceId};

    fn span(pid: u32, name: &str) -> Span {
        Span {
            trace_id: TraceId([1; 16]),
            span_id: SpanId([2; 8]),
            parent_span_id: None,
            parent_source: ParentSource::None,
            parent_confidence: 0.0,
            name: name.into(),
            kind: SpanKind::Server,
            start_unix_nano: 1,
            end_unix_nano: 2,
            status: SpanStatus::Error,
            attributes: vec![("url.path", AttrValue::Str("/x".into()))],
            resource: Arc::new(ProcessResource {
                pid,
                executable_name: "p".into(),
                service_name: format!("svc{pid}"),
                host_name: "h".into(),
            }),
            tid: 1,
            link: Default::default(),
        }
    }

    #[test]
    fn groups_spans_by_process_resource() {
        let req = export_request(&[span(1, "a"), span(2, "b"), span(1, "c")]);
        assert_eq!(req.resource_spans.len(), 2);
        let first = &req.resource_spans[0];
        assert_eq!(first.scope_spans[0].spans.len(), 2);
        let attrs = &first.resource.as_ref().unwrap().attributes;
        assert!(
            attrs
                .iter()
                .any(|kv| kv.key == "service.name" && kv.value == Some(str_value("svc1")))
        );
        let s = &first.scope_spans[0].spans[0];
        assert_eq!(s.kind, ProtoKind::Server as i32);
        assert_eq!(s.status.as_ref().unwrap().code, StatusCode::Error as i32);
        assert!(s.parent_span_id.is_empty());
    }

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
}
