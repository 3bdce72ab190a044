//! `/metrics`: the RED histograms and the pool metrics as OpenMetrics text, appended
//! to the agent's own counters.

use std::fmt::Write as _;

use crate::{
    metrics::{HistogramState, PoolMetric, RedMetric, RedMetrics},
    process::ProcessResource,
};

/// OpenMetrics text for the histograms (appended to the agent's own counters).
pub fn render(red: &RedMetrics, out: &mut String) {
    let _ = write!(
        out,
        "# TYPE tracer_red_series gauge\n\
         # HELP tracer_red_series RED metric series kept (overflow series included).\n\
         tracer_red_series {}\n\
         # TYPE tracer_red_series_overflowed counter\n\
         # HELP tracer_red_series_overflowed Attribute sets recorded into an overflow series (a process's own past its per-process limit, or the metric's past the total), and pool observations over the pool limit.\n\
         tracer_red_series_overflowed_total {}\n\
         # TYPE tracer_red_series_forgotten counter\n\
         # HELP tracer_red_series_forgotten RED metric series forgotten after 10 minutes without a span.\n\
         tracer_red_series_forgotten_total {}\n",
        red.series_count(),
        red.overflowed(),
        red.forgotten()
    );
    let sorted = red.sorted();
    for metric in RedMetric::ALL {
        let rows: Vec<_> = sorted.iter().filter(|(k, _)| k.metric == metric).collect();
        if rows.is_empty() {
            continue;
        }
        let name = metric.prometheus_name();
        write_histogram_header(out, name, metric.description());
        for (key, s) in rows {
            let labels = prometheus_labels(s.resource.as_deref(), &key.attrs);
            write_histogram_samples(out, name, &labels, metric.bounds(), &s.hist);
        }
    }
    render_pools(red, out);
}

/// The pool metrics: the two counts as gauges, the histograms like the RED ones.
fn render_pools(red: &RedMetrics, out: &mut String) {
    if red.pool_count() == 0 {
        return;
    }
    let rows: Vec<_> = red
        .pools()
        .map(|(id, p)| (p, prometheus_labels(p.resource.as_deref(), &p.attrs(id))))
        .collect();
    for metric in [PoolMetric::Count, PoolMetric::Max] {
        let name = metric.prometheus_name();
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "# HELP {name} {}.", metric.description());
        for (p, labels) in &rows {
            if metric == PoolMetric::Count {
                for (state, value) in [("idle", p.idle), ("used", p.used)] {
                    let _ = writeln!(
                        out,
                        "{name}{{{labels}db_client_connection_state=\"{state}\"}} {value}"
                    );
                }
            } else {
                let labels = labels.trim_end_matches(',');
                let _ = writeln!(out, "{name}{{{labels}}} {}", p.max);
            }
        }
    }
    for metric in [PoolMetric::CreateTime, PoolMetric::UseTime] {
        let hists: Vec<_> = rows
            .iter()
            .filter_map(|(p, labels)| {
                let hist = p.histogram(metric).filter(|h| h.count > 0)?;
                Some((hist, labels))
            })
            .collect();
        if hists.is_empty() {
            continue;
        }
        let name = metric.prometheus_name();
        write_histogram_header(out, name, metric.description());
        for (hist, labels) in hists {
            write_histogram_samples(out, name, labels, metric.bounds(), hist);
        }
    }
}

/// `key="value",` for the process resource and then each attribute (dots in keys
/// become underscores), each followed by a comma.
fn prometheus_labels(resource: Option<&ProcessResource>, attrs: &[(&str, String)]) -> String {
    let mut labels = String::new();
    if let Some(r) = resource {
        let _ = write!(
            labels,
            "service_name=\"{}\",process_pid=\"{}\",",
            escape(&r.service_name),
            r.pid
        );
    }
    for (k, v) in attrs {
        let _ = write!(labels, "{}=\"{}\",", k.replace('.', "_"), escape(v));
    }
    labels
}

fn write_histogram_header(out: &mut String, name: &str, description: &str) {
    let _ = writeln!(out, "# TYPE {name} histogram");
    let _ = writeln!(out, "# UNIT {name} seconds");
    let _ = writeln!(out, "# HELP {name} {description}.");
}

/// `_bucket`, `_sum` and `_count` of one series; `labels` as from [`prometheus_labels`].
fn write_histogram_samples(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[f64],
    hist: &HistogramState,
) {
    let mut cumulative = 0;
    for (i, bound) in bounds
        .iter()
        .map(|b| b.to_string())
        .chain(["+Inf".to_string()])
        .enumerate()
    {
        cumulative += hist.buckets.get(i).copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
    }
    let labels = labels.trim_end_matches(',');
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", hist.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", hist.count);
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
