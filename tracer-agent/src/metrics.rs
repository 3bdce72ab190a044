//! RED metrics from spans, by the OpenTelemetry semantic conventions:
//! `http.server.request.duration`, `http.client.request.duration` and
//! `db.client.operation.duration` histograms (seconds, cumulative).
//!
//! Cardinality is bounded: URL paths become templates (`/orders/{id}`), and past
//! `max_series` series new attribute sets go to one overflow series per metric
//! (`otel.metric.overflow=true`), as the OpenTelemetry SDKs do.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Histogram, HistogramDataPoint, Metric, ResourceMetrics,
        ScopeMetrics, metric,
    },
};

use crate::{
    process::ProcessResource,
    spans::{AttrValue, Span, SpanKind},
};

/// The three duration histograms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RedMetric {
    HttpServer,
    HttpClient,
    DbClient,
}

impl RedMetric {
    pub fn otel_name(self) -> &'static str {
        match self {
            RedMetric::HttpServer => "http.server.request.duration",
            RedMetric::HttpClient => "http.client.request.duration",
            RedMetric::DbClient => "db.client.operation.duration",
        }
    }

    fn prometheus_name(self) -> &'static str {
        match self {
            RedMetric::HttpServer => "http_server_request_duration_seconds",
            RedMetric::HttpClient => "http_client_request_duration_seconds",
            RedMetric::DbClient => "db_client_operation_duration_seconds",
        }
    }

    fn description(self) -> &'static str {
        match self {
            RedMetric::HttpServer => "Duration of HTTP server requests",
            RedMetric::HttpClient => "Duration of HTTP client requests",
            RedMetric::DbClient => "Duration of database client operations",
        }
    }

    /// Bucket boundaries advised by the semantic conventions.
    fn bounds(self) -> &'static [f64] {
        match self {
            RedMetric::HttpServer | RedMetric::HttpClient => &[
                0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            ],
            RedMetric::DbClient => &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0],
        }
    }

    const ALL: [RedMetric; 3] = [
        RedMetric::HttpServer,
        RedMetric::HttpClient,
        RedMetric::DbClient,
    ];
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    metric: RedMetric,
    /// 0 for the overflow series.
    pid: u32,
    attrs: Vec<(&'static str, String)>,
}

#[derive(Clone, Debug)]
struct Series {
    resource: Option<Arc<ProcessResource>>,
    start_ns: u64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    /// One more than the bounds: the last is `+Inf`.
    buckets: Vec<u64>,
}

/// All RED series, shared by the pipeline (records), `/metrics` and OTLP export.
pub struct RedMetrics {
    series: HashMap<SeriesKey, Series>,
    max_series: usize,
    overflowed: u64,
}

pub type SharedRedMetrics = Arc<Mutex<RedMetrics>>;

/// Replaces path segments that look like identifiers with `{id}` so that metric
/// cardinality stays bounded: numbers, UUIDs, long hex strings and long tokens that
/// mix letters and digits. At most 8 segments are kept.
pub fn url_template(path: &str) -> String {
    let mut out = String::with_capacity(path.len().min(128));
    for (i, seg) in path.split('/').enumerate() {
        if i == 0 {
            continue;
        }
        if i > 8 {
            out.push_str("/{…}");
            break;
        }
        out.push('/');
        if looks_like_id(seg) {
            out.push_str("{id}");
        } else {
            out.push_str(seg);
        }
    }
    if out.is_empty() { "/".to_string() } else { out }
}

fn looks_like_id(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    if digits == seg.len() {
        return true;
    }
    let hexish = seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if hexish && seg.len() >= 8 && digits > 0 {
        return true; // UUIDs, hashes, object ids
    }
    let alnum = seg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    // Long tokens that mix digits in: session ids, base64-ish keys.
    alnum && seg.len() >= 16 && digits >= 2
}

fn str_attr(span: &Span, key: &str) -> Option<String> {
    span.attr(key).map(|v| match v {
        AttrValue::Str(s) => s.clone(),
        other => other.to_string(),
    })
}

impl RedMetrics {
    pub fn new(max_series: usize) -> Self {
        Self {
            series: HashMap::new(),
            max_series: max_series.max(1),
            overflowed: 0,
        }
    }

    pub fn shared(max_series: usize) -> SharedRedMetrics {
        Arc::new(Mutex::new(Self::new(max_series)))
    }

    /// Number of attribute sets that went to the overflow series.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Records one finished span in its histogram.
    pub fn record(&mut self, span: &Span) {
        let is_db = span.attr("db.system.name").is_some();
        let metric = match (is_db, span.kind) {
            (true, _) => RedMetric::DbClient,
            (false, SpanKind::Server) => RedMetric::HttpServer,
            (false, SpanKind::Client) => RedMetric::HttpClient,
        };
        let keys: &[&'static str] = match metric {
            RedMetric::HttpServer => &[
                "http.request.method",
                "http.response.status_code",
                "server.port",
            ],
            RedMetric::HttpClient => &[
                "http.request.method",
                "http.response.status_code",
                "server.address",
                "server.port",
            ],
            RedMetric::DbClient => &[
                "db.system.name",
                "db.operation.name",
                "db.namespace",
                "db.response.status_code",
                "server.address",
                "server.port",
            ],
        };
        let mut attrs: Vec<(&'static str, String)> = keys
            .iter()
            .filter_map(|&k| str_attr(span, k).map(|v| (k, v)))
            .collect();
        if metric != RedMetric::DbClient {
            let path = str_attr(span, "url.path").unwrap_or_default();
            attrs.push(("url.template", url_template(&path)));
        }
        let mut key = SeriesKey {
            metric,
            pid: span.resource.pid,
            attrs,
        };
        if !self.series.contains_key(&key) && self.series.len() >= self.max_series {
            self.overflowed += 1;
            key = SeriesKey {
                metric,
                pid: 0,
                attrs: vec![("otel.metric.overflow", "true".to_string())],
            };
        }
        let seconds = span.duration_ns() as f64 / 1e9;
        let bounds = metric.bounds();
        let resource = (key.pid != 0).then(|| span.resource.clone());
        let series = self.series.entry(key).or_insert_with(|| Series {
            resource,
            start_ns: span.start_unix_nano,
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            buckets: vec![0; bounds.len() + 1],
        });
        series.count += 1;
        series.sum += seconds;
        series.min = series.min.min(seconds);
        series.max = series.max.max(seconds);
        let idx = bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(bounds.len());
        if let Some(b) = series.buckets.get_mut(idx) {
            *b += 1;
        }
    }

    fn sorted(&self) -> Vec<(&SeriesKey, &Series)> {
        let mut v: Vec<_> = self.series.iter().collect();
        v.sort_by(|a, b| (a.0.metric, a.0.pid, &a.0.attrs).cmp(&(b.0.metric, b.0.pid, &b.0.attrs)));
        v
    }

    /// OpenMetrics text for the histograms (appended to the agent's own counters).
    pub fn render_prometheus(&self, out: &mut String) {
        let sorted = self.sorted();
        for metric in RedMetric::ALL {
            let rows: Vec<_> = sorted.iter().filter(|(k, _)| k.metric == metric).collect();
            if rows.is_empty() {
                continue;
            }
            let name = metric.prometheus_name();
            let _ = writeln!(out, "# TYPE {name} histogram");
            let _ = writeln!(out, "# UNIT {name} seconds");
            let _ = writeln!(out, "# HELP {name} {}.", metric.description());
            for (key, s) in rows {
                let mut labels = String::new();
                if let Some(r) = &s.resource {
                    let _ = write!(
                        labels,
                        "service_name=\"{}\",process_pid=\"{}\",",
                        escape(&r.service_name),
                        r.pid
                    );
                }
                for (k, v) in &key.attrs {
                    let _ = write!(labels, "{}=\"{}\",", k.replace('.', "_"), escape(v));
                }
                let mut cumulative = 0;
                for (i, bound) in metric
                    .bounds()
                    .iter()
                    .map(|b| b.to_string())
                    .chain(["+Inf".to_string()])
                    .enumerate()
                {
                    cumulative += s.buckets.get(i).copied().unwrap_or(0);
                    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
                }
                let labels = labels.trim_end_matches(',');
                let _ = writeln!(out, "{name}_sum{{{labels}}} {}", s.sum);
                let _ = writeln!(out, "{name}_count{{{labels}}} {}", s.count);
            }
        }
    }

    /// One OTLP metrics request, one `ResourceMetrics` per process.
    pub fn export_request(&self, now_ns: u64) -> ExportMetricsServiceRequest {
        let mut by_pid: Vec<(u32, Option<Arc<ProcessResource>>, Vec<Metric>)> = Vec::new();
        for (key, s) in self.sorted() {
            let idx = match by_pid.iter().position(|(pid, _, _)| *pid == key.pid) {
                Some(i) => i,
                None => {
                    by_pid.push((key.pid, s.resource.clone(), Vec::new()));
                    by_pid.len() - 1
                }
            };
            let metrics = &mut by_pid[idx].2;
            let point = HistogramDataPoint {
                attributes: key.attrs.iter().map(|(k, v)| kv(k, v)).collect(),
                start_time_unix_nano: s.start_ns,
                time_unix_nano: now_ns,
                count: s.count,
                sum: Some(s.sum),
                bucket_counts: s.buckets.clone(),
                explicit_bounds: key.metric.bounds().to_vec(),
                min: s.min.is_finite().then_some(s.min),
                max: s.max.is_finite().then_some(s.max),
                ..Default::default()
            };
            match metrics
                .iter_mut()
                .find(|m| m.name == key.metric.otel_name())
            {
                Some(Metric {
                    data: Some(metric::Data::Histogram(h)),
                    ..
                }) => h.data_points.push(point),
                _ => metrics.push(Metric {
                    name: key.metric.otel_name().to_string(),
                    description: key.metric.description().to_string(),
                    unit: "s".to_string(),
                    data: Some(metric::Data::Histogram(Histogram {
                        data_points: vec![point],
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    })),
                    ..Default::default()
                }),
            }
        }
        let scope = InstrumentationScope {
            name: "tracer".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        ExportMetricsServiceRequest {
            resource_metrics: by_pid
                .into_iter()
                .map(|(_, resource, metrics)| ResourceMetrics {
                    resource: resource.map(|r| crate::export::otlp::resource(&r)),
                    scope_metrics: vec![ScopeMetrics {
                        scope: Some(scope.clone()),
                        metrics,
                        schema_url: String::new(),
                    }],
                    schema_url: String::new(),
                })
                .collect(),
        }
    }
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
        ..Default::default()
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::{ParentSource, SpanId, SpanStatus, TraceId};

    fn span(kind: SpanKind, path: &str, status: i64, dur_ms: u64, pid: u32) -> Span {
        Span {
            trace_id: TraceId([1; 16]),
            span_id: SpanId([2; 8]),
            parent_span_id: None,
            parent_source: ParentSource::None,
            parent_confidence: 0.0,
            name: "GET".into(),
            kind,
            start_unix_nano: 1_000_000_000,
            end_unix_nano: 1_000_000_000 + dur_ms * 1_000_000,
            status: SpanStatus::Unset,
            attributes: vec![
                ("http.request.method", AttrValue::Str("GET".into())),
                ("url.path", AttrValue::Str(path.into())),
                ("http.response.status_code", AttrValue::Int(status)),
                ("server.port", AttrValue::Int(8000)),
            ],
            resource: Arc::new(ProcessResource {
                pid,
                executable_name: "app".into(),
                service_name: "app".into(),
                host_name: "h".into(),
            }),
            tid: 1,
            link: Default::default(),
        }
    }

    #[test]
    fn paths_become_templates() {
        assert_eq!(url_template("/orders/12345"), "/orders/{id}");
        assert_eq!(
            url_template("/users/550e8400-e29b-41d4-a716-446655440000/cart"),
            "/users/{id}/cart"
        );
        assert_eq!(url_template("/blob/deadbeef01"), "/blob/{id}");
        assert_eq!(url_template("/static/app.js"), "/static/app.js");
        assert_eq!(url_template("/session/aZ3kq9Lm2pQ8rT5v"), "/session/{id}");
        assert_eq!(url_template("/"), "/");
        assert_eq!(url_template(""), "/");
        assert_eq!(url_template("/a/b/c/d/e/f/g/h/i/j"), "/a/b/c/d/e/f/g/h/{…}");
    }

    #[test]
    fn histograms_aggregate_by_template_and_render() {
        let mut m = RedMetrics::new(100);
        m.record(&span(SpanKind::Server, "/orders/1", 200, 3, 7));
        m.record(&span(SpanKind::Server, "/orders/2", 200, 30, 7));
        m.record(&span(SpanKind::Client, "/orders/3", 500, 3, 8));
        assert_eq!(m.series_count(), 2);
        let mut text = String::new();
        m.render_prometheus(&mut text);
        assert!(
            text.contains("# TYPE http_server_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("http_server_request_duration_seconds_bucket{service_name=\"app\",process_pid=\"7\",http_request_method=\"GET\",http_response_status_code=\"200\",server_port=\"8000\",url_template=\"/orders/{id}\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("http_server_request_duration_seconds_count{service_name=\"app\",process_pid=\"7\",http_request_method=\"GET\",http_response_status_code=\"200\",server_port=\"8000\",url_template=\"/orders/{id}\"} 2"), "{text}");
        let req = m.export_request(2_000_000_000);
        assert_eq!(req.resource_metrics.len(), 2);
        let metric = &req.resource_metrics[0].scope_metrics[0].metrics[0];
        assert_eq!(metric.name, "http.server.request.duration");
        let Some(metric::Data::Histogram(h)) = &metric.data else {
            panic!("not a histogram")
        };
        assert_eq!(h.data_points[0].count, 2);
        assert_eq!(h.data_points[0].bucket_counts.iter().sum::<u64>(), 2);
    }

    #[test]
    fn cardinality_is_bounded_by_an_overflow_series() {
        let mut m = RedMetrics::new(3);
        for i in 0..50 {
            m.record(&span(SpanKind::Server, &format!("/p{i}"), 200, 1, 7));
        }
        assert_eq!(m.series_count(), 4, "three series and the overflow one");
        assert_eq!(m.overflowed(), 47);
    }
}
