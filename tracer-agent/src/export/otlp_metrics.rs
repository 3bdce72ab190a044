//! OTLP metrics: the RED histograms and the pool metrics as one
//! `ExportMetricsServiceRequest`, one `ResourceMetrics` per process.

use std::sync::Arc;

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
    },
};

use crate::{
    metrics::{HistogramState, PoolMetric, PoolSeries, RedMetrics},
    pools::PoolKey,
    process::ProcessResource,
};

/// One OTLP metrics request, one `ResourceMetrics` per process.
///
/// The pool counts (`db.client.connection.count`, `.max`) go out as non-monotonic
/// cumulative Sums, not Gauges: the conventions make them UpDownCounters, and that
/// is how an SDK exports an UpDownCounter, so backends see the type they expect
/// (Prometheus shows both as gauges). The pool histograms only go out once they
/// have a sample.
pub fn export_request(red: &RedMetrics, now_ns: u64) -> ExportMetricsServiceRequest {
    let mut by_pid: MetricsByProcess = Vec::new();
    for (key, s) in red.sorted() {
        let metrics = metrics_of(&mut by_pid, key.pid, &s.resource);
        let attributes = key.attrs.iter().map(|(k, v)| kv(k, v)).collect();
        let point = histogram_point(&s.hist, attributes, key.metric.bounds(), s.start_ns, now_ns);
        push_histogram_point(
            metrics,
            key.metric.otel_name(),
            key.metric.description(),
            point,
        );
    }
    for (id, p) in red.pools() {
        let metrics = metrics_of(&mut by_pid, id.pid, &p.resource);
        let attrs = pool_attrs(p, id);
        let number = |attributes: Vec<KeyValue>, value: u64| NumberDataPoint {
            attributes,
            start_time_unix_nano: p.start_ns,
            time_unix_nano: now_ns,
            value: Some(number_data_point::Value::AsInt(
                i64::try_from(value).unwrap_or(i64::MAX),
            )),
            ..Default::default()
        };
        for (state, value) in [("idle", p.idle), ("used", p.used)] {
            let mut attributes = attrs.clone();
            attributes.push(kv("db.client.connection.state", state));
            push_sum_point(metrics, PoolMetric::Count, number(attributes, value));
        }
        push_sum_point(metrics, PoolMetric::Max, number(attrs.clone(), p.max));
        for metric in [PoolMetric::CreateTime, PoolMetric::UseTime] {
            let Some(hist) = p.histogram(metric).filter(|h| h.count > 0) else {
                continue;
            };
            let point = histogram_point(hist, attrs.clone(), metric.bounds(), p.start_ns, now_ns);
            push_histogram_point(metrics, metric.otel_name(), metric.description(), point);
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
                resource: resource.map(|r| super::otlp::resource(&r)),
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

fn histogram_point(
    hist: &HistogramState,
    attributes: Vec<KeyValue>,
    bounds: &[f64],
    start_ns: u64,
    now_ns: u64,
) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start_ns,
        time_unix_nano: now_ns,
        count: hist.count,
        sum: Some(hist.sum),
        bucket_counts: hist.buckets.clone(),
        explicit_bounds: bounds.to_vec(),
        min: hist.min.is_finite().then_some(hist.min),
        max: hist.max.is_finite().then_some(hist.max),
        ..Default::default()
    }
}

/// The same attributes for OTLP, with `server.port` an integer as the conventions
/// type it.
fn pool_attrs(p: &PoolSeries, id: &PoolKey) -> Vec<KeyValue> {
    vec![
        kv("db.client.connection.pool.name", &p.name(id)),
        kv("db.system.name", id.db_system.as_str()),
        kv("server.address", &id.server.ip().to_string()),
        int_kv("server.port", i64::from(id.server.port())),
    ]
}

/// The metrics of each process (pid, resource), in the order first seen.
type MetricsByProcess = Vec<(u32, Option<Arc<ProcessResource>>, Vec<Metric>)>;

/// The metrics of the process `pid`, added after the others if it has none yet.
fn metrics_of<'a>(
    by_pid: &'a mut MetricsByProcess,
    pid: u32,
    resource: &Option<Arc<ProcessResource>>,
) -> &'a mut Vec<Metric> {
    let idx = match by_pid.iter().position(|(p, _, _)| *p == pid) {
        Some(i) => i,
        None => {
            by_pid.push((pid, resource.clone(), Vec::new()));
            by_pid.len() - 1
        }
    };
    let entry = &mut by_pid[idx];
    if entry.1.is_none() {
        entry.1 = resource.clone();
    }
    &mut entry.2
}

/// The data of the metric `name`, added with `empty` data if not there yet.
fn metric_data<'a>(
    metrics: &'a mut Vec<Metric>,
    name: &str,
    description: &str,
    unit: &str,
    empty: fn() -> metric::Data,
) -> &'a mut metric::Data {
    let idx = match metrics.iter().position(|m| m.name == name) {
        Some(i) => i,
        None => {
            metrics.push(Metric {
                name: name.to_string(),
                description: description.to_string(),
                unit: unit.to_string(),
                ..Default::default()
            });
            metrics.len() - 1
        }
    };
    metrics[idx].data.get_or_insert_with(empty)
}

/// Adds a point to the cumulative histogram `name` (unit seconds).
fn push_histogram_point(
    metrics: &mut Vec<Metric>,
    name: &str,
    description: &str,
    point: HistogramDataPoint,
) {
    let data = metric_data(metrics, name, description, "s", || {
        metric::Data::Histogram(Histogram {
            data_points: Vec::new(),
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })
    });
    if let metric::Data::Histogram(h) = data {
        h.data_points.push(point);
    }
}

/// Adds a point to a pool count, a non-monotonic cumulative Sum.
fn push_sum_point(metrics: &mut Vec<Metric>, metric: PoolMetric, point: NumberDataPoint) {
    let data = metric_data(
        metrics,
        metric.otel_name(),
        metric.description(),
        metric.unit(),
        || {
            metric::Data::Sum(Sum {
                data_points: Vec::new(),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: false,
            })
        },
    );
    if let metric::Data::Sum(s) = data {
        s.data_points.push(point);
    }
}

fn int_kv(k: &str, v: i64) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(v)),
        }),
        ..Default::default()
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
