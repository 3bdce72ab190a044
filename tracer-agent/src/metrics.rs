//! RED metrics from spans, by the OpenTelemetry semantic conventions:
//! `http.server.request.duration`, `http.client.request.duration` and
//! `db.client.operation.duration` histograms (seconds, cumulative).
//!
//! Cardinality is bounded: URL paths become templates (`/orders/{id}`); one process
//! has at most [`RedMetrics::per_process_limit`] series per metric, beyond which its
//! new attribute sets go to that process's own overflow series (so a client
//! requesting thousands of distinct paths from one server cannot crowd out every
//! other service); past `max_series` series in all, new attribute sets go to one
//! overflow series per metric (`otel.metric.overflow=true`), as the OpenTelemetry
//! SDKs do. A series that records nothing for [`SERIES_FORGET_AFTER_NS`] is
//! forgotten (exited processes, paths no longer asked for), making room again.
//!
//! Database connection pools, by the `db.client.connection.*` conventions: one pool is
//! one process and one database destination (`pools::PoolKey`). `db.client.connection.count`
//! (by state, `idle` | `used`), `db.client.connection.max`,
//! `db.client.connection.create_time` and `db.client.connection.use_time`, each with
//! `db.client.connection.pool.name`, `db.system.name`, `server.address` and
//! `server.port`. At most `max_series` pools are tracked (apart from the RED series);
//! see [`RedMetrics::set_pool_counts`].

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use crate::{
    pools::PoolKey,
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

    pub fn prometheus_name(self) -> &'static str {
        match self {
            RedMetric::HttpServer => "http_server_request_duration_seconds",
            RedMetric::HttpClient => "http_client_request_duration_seconds",
            RedMetric::DbClient => "db_client_operation_duration_seconds",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            RedMetric::HttpServer => "Duration of HTTP server requests",
            RedMetric::HttpClient => "Duration of HTTP client requests",
            RedMetric::DbClient => "Duration of database client operations",
        }
    }

    /// Bucket boundaries advised by the semantic conventions.
    pub fn bounds(self) -> &'static [f64] {
        match self {
            RedMetric::HttpServer | RedMetric::HttpClient => &[
                0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            ],
            RedMetric::DbClient => &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0],
        }
    }

    pub const ALL: [RedMetric; 3] = [
        RedMetric::HttpServer,
        RedMetric::HttpClient,
        RedMetric::DbClient,
    ];

    /// The span attributes that make a series key (in key order); HTTP series add
    /// `url.template` last.
    fn keys(self) -> &'static [&'static str] {
        match self {
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
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    pub metric: RedMetric,
    /// 0 for the overflow series.
    pub pid: u32,
    pub attrs: Vec<(&'static str, String)>,
}

#[derive(Clone, Debug)]
pub struct Series {
    pub resource: Option<Arc<ProcessResource>>,
    pub start_ns: u64,
    /// When it last recorded a span (Unix ns).
    pub last_ns: u64,
    pub hist: HistogramState,
}

/// A RED series that records nothing this long is forgotten.
pub const SERIES_FORGET_AFTER_NS: u64 = 10 * 60 * 1_000_000_000;
/// How often forgotten series are looked for (by span time).
const SWEEP_EVERY_NS: u64 = 60 * 1_000_000_000;

/// The cumulative state of one histogram series.
#[derive(Clone, Debug)]
pub struct HistogramState {
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    /// One more than the bounds: the last is `+Inf`.
    pub buckets: Vec<u64>,
}

impl HistogramState {
    fn new(bounds: &[f64]) -> Self {
        Self {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            buckets: vec![0; bounds.len() + 1],
        }
    }

    fn observe(&mut self, bounds: &[f64], seconds: f64) {
        self.count += 1;
        self.sum += seconds;
        self.min = self.min.min(seconds);
        self.max = self.max.max(seconds);
        let idx = bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(bounds.len());
        if let Some(b) = self.buckets.get_mut(idx) {
            *b += 1;
        }
    }
}

/// A pool that has had no connections and no samples for this long is forgotten
/// (10 minutes).
pub const POOL_FORGET_AFTER_NS: u64 = 10 * 60 * 1_000_000_000;

/// The connection pool metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolMetric {
    /// `db.client.connection.count`, by `db.client.connection.state`.
    Count,
    /// `db.client.connection.max`: the peak number of open connections seen since the
    /// pool was first tracked. The conventions mean the pool's configured limit, which
    /// the agent cannot see from the wire; the observed peak is the nearest it can say.
    Max,
    /// `db.client.connection.create_time`: connect to ready.
    CreateTime,
    /// `db.client.connection.use_time`: taken into use to idle again.
    UseTime,
}

impl PoolMetric {
    pub fn otel_name(self) -> &'static str {
        match self {
            PoolMetric::Count => "db.client.connection.count",
            PoolMetric::Max => "db.client.connection.max",
            PoolMetric::CreateTime => "db.client.connection.create_time",
            PoolMetric::UseTime => "db.client.connection.use_time",
        }
    }

    pub fn prometheus_name(self) -> &'static str {
        match self {
            PoolMetric::Count => "db_client_connection_count",
            PoolMetric::Max => "db_client_connection_max",
            PoolMetric::CreateTime => "db_client_connection_create_time_seconds",
            PoolMetric::UseTime => "db_client_connection_use_time_seconds",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            PoolMetric::Count => {
                "Number of connections of the pool in the state given by db.client.connection.state"
            }
            PoolMetric::Max => {
                "Peak number of open connections of the pool since it was first seen"
            }
            PoolMetric::CreateTime => "Time it took to create a new connection",
            PoolMetric::UseTime => {
                "Time between a connection being taken into use and it being idle again"
            }
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            PoolMetric::Count | PoolMetric::Max => "{connection}",
            PoolMetric::CreateTime | PoolMetric::UseTime => "s",
        }
    }

    /// Bucket boundaries of the two histograms.
    pub fn bounds(self) -> &'static [f64] {
        match self {
            PoolMetric::Count | PoolMetric::Max => &[],
            PoolMetric::CreateTime => &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
            PoolMetric::UseTime => &[
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0,
            ],
        }
    }
}

/// The state of one pool.
#[derive(Clone, Debug)]
pub struct PoolSeries {
    pub resource: Option<Arc<ProcessResource>>,
    pub start_ns: u64,
    pub idle: u64,
    pub used: u64,
    /// Peak of `idle + used` since the pool was first tracked.
    pub max: u64,
    create_time: HistogramState,
    use_time: HistogramState,
    /// When the pool last had connections or a sample.
    last_active_ns: u64,
}

impl PoolSeries {
    fn new(resource: Option<Arc<ProcessResource>>, now_ns: u64) -> Self {
        Self {
            resource,
            start_ns: now_ns,
            idle: 0,
            used: 0,
            max: 0,
            create_time: HistogramState::new(PoolMetric::CreateTime.bounds()),
            use_time: HistogramState::new(PoolMetric::UseTime.bounds()),
            last_active_ns: now_ns,
        }
    }

    fn set_counts(&mut self, idle: u64, used: u64, now_ns: u64) {
        self.idle = idle;
        self.used = used;
        let open = idle.saturating_add(used);
        self.max = self.max.max(open);
        if open > 0 {
            self.last_active_ns = now_ns;
        }
    }

    /// The histogram of `metric`, if it is one.
    pub fn histogram(&self, metric: PoolMetric) -> Option<&HistogramState> {
        match metric {
            PoolMetric::CreateTime => Some(&self.create_time),
            PoolMetric::UseTime => Some(&self.use_time),
            PoolMetric::Count | PoolMetric::Max => None,
        }
    }

    /// The pool name; without a process resource the executable part is left empty
    /// (`[4242] postgresql 127.0.0.1:5432`).
    pub fn name(&self, id: &PoolKey) -> String {
        let executable = self
            .resource
            .as_ref()
            .map_or("", |r| r.executable_name.as_str());
        id.name(executable)
    }

    /// The attributes every pool metric carries, as strings (Prometheus labels).
    pub fn attrs(&self, id: &PoolKey) -> Vec<(&'static str, String)> {
        vec![
            ("db.client.connection.pool.name", self.name(id)),
            ("db.system.name", id.db_system.as_str().to_string()),
            ("server.address", id.server.ip().to_string()),
            ("server.port", id.server.port().to_string()),
        ]
    }
}

/// All RED series and connection pools, shared by the pipeline (records), `/metrics`
/// and OTLP export.
pub struct RedMetrics {
    /// Every series, in the order they started (never removed).
    series: Vec<(SeriesKey, Series)>,
    /// Where each key's series is.
    index: HashMap<SeriesKey, usize, foldhash::fast::RandomState>,
    /// Series by a fingerprint of the span values that make their key, so that
    /// recording a span builds no key (see [`RedMetrics::record`]).
    prints: HashMap<u64, usize, foldhash::fast::RandomState>,
    /// Scratch for the URL template of the span being recorded.
    template: String,
    pools: BTreeMap<PoolKey, PoolSeries>,
    max_series: usize,
    overflowed: u64,
    /// Series per (metric, pid), overflow series excluded.
    per_process: HashMap<(RedMetric, u32), usize, foldhash::fast::RandomState>,
    /// Series forgotten for being idle.
    forgotten: u64,
    next_sweep_ns: u64,
}

pub type SharedRedMetrics = Arc<Mutex<RedMetrics>>;

/// Whether `key` is an overflow series (a process's own, or the metric's).
fn is_overflow(key: &SeriesKey) -> bool {
    key.pid == 0
        || key
            .attrs
            .first()
            .is_some_and(|(k, _)| *k == "otel.metric.overflow")
}

/// Whether a span attribute's value is the string a series key holds for it.
fn attr_eq(v: &AttrValue, stored: &str) -> bool {
    match v {
        AttrValue::Str(s) => s == stored,
        AttrValue::Int(i) => stored.parse::<i64>().ok() == Some(*i),
        other => other.to_string() == stored,
    }
}

fn str_attr(span: &Span, key: &str) -> Option<String> {
    span.attr(key).map(|v| match v {
        AttrValue::Str(s) => s.to_string(),
        other => other.to_string(),
    })
}

impl RedMetrics {
    pub fn new(max_series: usize) -> Self {
        Self {
            series: Vec::new(),
            index: HashMap::default(),
            prints: HashMap::default(),
            template: String::new(),
            pools: BTreeMap::new(),
            max_series: max_series.max(1),
            overflowed: 0,
            per_process: HashMap::default(),
            forgotten: 0,
            next_sweep_ns: 0,
        }
    }

    /// Series one process may have per metric: an eighth of `max_series`, at
    /// least 16.
    pub fn per_process_limit(&self) -> usize {
        (self.max_series / 8).max(16).min(self.max_series)
    }

    /// RED series forgotten for recording nothing for [`SERIES_FORGET_AFTER_NS`].
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Forgets every series idle since `now_ns - SERIES_FORGET_AFTER_NS`; returns
    /// how many.
    pub fn sweep(&mut self, now_ns: u64) -> usize {
        let cutoff = now_ns.saturating_sub(SERIES_FORGET_AFTER_NS);
        let before = self.series.len();
        self.series.retain(|(_, s)| s.last_ns >= cutoff);
        let gone = before - self.series.len();
        if gone > 0 {
            self.forgotten += gone as u64;
            self.index.clear();
            self.prints.clear();
            self.per_process.clear();
            for (i, (key, _)) in self.series.iter().enumerate() {
                self.index.insert(key.clone(), i);
                if !is_overflow(key) {
                    *self.per_process.entry((key.metric, key.pid)).or_default() += 1;
                }
            }
        }
        gone
    }

    pub fn shared(max_series: usize) -> SharedRedMetrics {
        Arc::new(Mutex::new(Self::new(max_series)))
    }

    /// Number of attribute sets that went to the overflow series, plus the number of
    /// pool observations (snapshot entries and samples) dropped because `max_series`
    /// pools were already tracked.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }

    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    /// Number of connection pools tracked.
    pub fn pool_count(&self) -> usize {
        self.pools.len()
    }

    /// Records one finished span in its histogram.
    ///
    /// The series is found by a fingerprint of the span's key values, checked
    /// against the series' key, so a span of a known series allocates nothing; a
    /// new series (or a fingerprint taken by another) builds its key.
    pub fn record(&mut self, span: &Span) {
        if span.end_unix_nano >= self.next_sweep_ns {
            self.sweep(span.end_unix_nano);
            self.next_sweep_ns = span.end_unix_nano.saturating_add(SWEEP_EVERY_NS);
        }
        let is_db = span.attr("db.system.name").is_some();
        let metric = match (is_db, span.kind) {
            (true, _) => RedMetric::DbClient,
            (false, SpanKind::Server) => RedMetric::HttpServer,
            (false, SpanKind::Client) => RedMetric::HttpClient,
        };
        let keys = metric.keys();
        let templated = metric != RedMetric::DbClient;
        if templated {
            // HTTP spans carry their template; others get one from their path.
            match (span.attr("url.template"), span.attr("url.path")) {
                (Some(AttrValue::Str(t)), _) => {
                    self.template.clear();
                    self.template.push_str(t.as_str());
                }
                (None, Some(AttrValue::Str(p))) => {
                    crate::spans::route::url_template_into(p.as_str(), &mut self.template)
                }
                _ => crate::spans::route::url_template_into("", &mut self.template),
            }
        }
        let print = {
            use std::hash::{BuildHasher, Hash, Hasher};
            let mut h = self.prints.hasher().build_hasher();
            (metric, span.resource.pid).hash(&mut h);
            for &k in keys {
                match span.attr(k) {
                    None => 0u8.hash(&mut h),
                    Some(AttrValue::Str(v)) => (1u8, v.as_str()).hash(&mut h),
                    Some(AttrValue::Int(i)) => (2u8, i).hash(&mut h),
                    Some(AttrValue::Double(d)) => (3u8, d.to_bits()).hash(&mut h),
                }
            }
            if templated {
                self.template.hash(&mut h);
            }
            h.finish()
        };
        let known = self
            .prints
            .get(&print)
            .copied()
            .filter(|&i| self.key_matches(&self.series[i].0, span, keys, templated));
        let i = match known {
            Some(i) => i,
            None => {
                let i = self.series_index(metric, span, keys, templated);
                // The overflow series matches no span's key: spans that go there take
                // the slow path each time, and their fingerprints are not kept.
                if !is_overflow(&self.series[i].0) {
                    if self.prints.len() >= 4 * self.max_series {
                        self.prints.clear();
                    }
                    self.prints.insert(print, i);
                }
                i
            }
        };
        let seconds = span.duration_ns() as f64 / 1e9;
        let series = &mut self.series[i].1;
        series.hist.observe(metric.bounds(), seconds);
        series.last_ns = series.last_ns.max(span.end_unix_nano);
    }

    /// Whether `key` is the key `span` would make (`self.template` holds its template).
    fn key_matches(&self, key: &SeriesKey, span: &Span, keys: &[&str], templated: bool) -> bool {
        if key.pid != span.resource.pid {
            return false;
        }
        let mut stored = key.attrs.iter();
        for &k in keys {
            match span.attr(k) {
                None => continue,
                Some(v) => match stored.next() {
                    Some((sk, sv)) if *sk == k && attr_eq(v, sv) => {}
                    _ => return false,
                },
            }
        }
        if templated {
            match stored.next() {
                Some((sk, sv)) if *sk == "url.template" && *sv == self.template => {}
                _ => return false,
            }
        }
        stored.next().is_none()
    }

    /// The index of the series `span` belongs to, started when new (or the
    /// metric's overflow series when `max_series` are already tracked).
    fn series_index(
        &mut self,
        metric: RedMetric,
        span: &Span,
        keys: &[&'static str],
        templated: bool,
    ) -> usize {
        let mut attrs: Vec<(&'static str, String)> = keys
            .iter()
            .filter_map(|&k| str_attr(span, k).map(|v| (k, v)))
            .collect();
        if templated {
            attrs.push(("url.template", self.template.clone()));
        }
        let mut key = SeriesKey {
            metric,
            pid: span.resource.pid,
            attrs,
        };
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        let overflow = || vec![("otel.metric.overflow", "true".to_string())];
        let mine = self
            .per_process
            .get(&(metric, key.pid))
            .copied()
            .unwrap_or(0);
        if mine >= self.per_process_limit() {
            // This process's own overflow series.
            self.overflowed += 1;
            key.attrs = overflow();
            if let Some(&i) = self.index.get(&key) {
                return i;
            }
        }
        if self.series.len() >= self.max_series {
            if !is_overflow(&key) {
                self.overflowed += 1;
            }
            key = SeriesKey {
                metric,
                pid: 0,
                attrs: overflow(),
            };
            if let Some(&i) = self.index.get(&key) {
                return i;
            }
        }
        let resource = (key.pid != 0).then(|| span.resource.clone());
        let series = Series {
            resource,
            start_ns: span.start_unix_nano,
            last_ns: span.end_unix_nano,
            hist: HistogramState::new(metric.bounds()),
        };
        if !is_overflow(&key) {
            *self.per_process.entry((metric, key.pid)).or_default() += 1;
        }
        self.index.insert(key.clone(), self.series.len());
        self.series.push((key, series));
        self.series.len() - 1
    }

    /// Replaces the connection counts of every pool with a fresh snapshot of
    /// `(pool, idle, used)` (entries for the same pool add up). Pools absent from it
    /// keep their max and histograms but report count 0, until forgotten: a pool with
    /// no connections and no samples for [`POOL_FORGET_AFTER_NS`] is dropped.
    /// `resource` gives the process resource for a pid; `now_ns` is Unix time.
    ///
    /// Cardinality is bounded like the RED series: at most `max_series` pools are
    /// tracked. A new pool beyond that is not tracked, and each snapshot that names it
    /// and each of its samples adds one to [`RedMetrics::overflowed`] (after pools
    /// due to be forgotten have made room). An untracked pool with no
    /// connections is not started.
    pub fn set_pool_counts(
        &mut self,
        counts: &[(PoolKey, u64, u64)],
        resource: &dyn Fn(u32) -> Option<Arc<ProcessResource>>,
        now_ns: u64,
    ) {
        let mut snapshot: BTreeMap<&PoolKey, (u64, u64)> = BTreeMap::new();
        for (id, idle, used) in counts {
            let entry = snapshot.entry(id).or_default();
            entry.0 = entry.0.saturating_add(*idle);
            entry.1 = entry.1.saturating_add(*used);
        }
        for (id, pool) in &mut self.pools {
            let (idle, used) = match snapshot.remove(id) {
                Some(counts) => {
                    if pool.resource.is_none() {
                        pool.resource = resource(id.pid);
                    }
                    counts
                }
                None => (0, 0),
            };
            pool.set_counts(idle, used, now_ns);
        }
        self.forget_inactive_pools(now_ns);
        // What is left are pools not tracked yet.
        for (id, (idle, used)) in snapshot {
            if idle == 0 && used == 0 {
                continue;
            }
            if let Some(pool) = self.pool_mut(id, || resource(id.pid), now_ns) {
                pool.set_counts(idle, used, now_ns);
            }
        }
    }

    /// Records the time one connection of `pool` took to create (connect to ready),
    /// in `db.client.connection.create_time`. Negative and non-finite values are
    /// ignored. The pool limit is as for [`RedMetrics::set_pool_counts`].
    pub fn record_pool_create_time(
        &mut self,
        pool: &PoolKey,
        seconds: f64,
        resource: Option<Arc<ProcessResource>>,
        now_ns: u64,
    ) {
        self.record_pool_sample(PoolMetric::CreateTime, pool, seconds, resource, now_ns);
    }

    /// Records the time one connection of `pool` was in use (taken into use to idle
    /// again), in `db.client.connection.use_time`. Negative and non-finite values are
    /// ignored. The pool limit is as for [`RedMetrics::set_pool_counts`].
    pub fn record_pool_use_time(
        &mut self,
        pool: &PoolKey,
        seconds: f64,
        resource: Option<Arc<ProcessResource>>,
        now_ns: u64,
    ) {
        self.record_pool_sample(PoolMetric::UseTime, pool, seconds, resource, now_ns);
    }

    fn record_pool_sample(
        &mut self,
        metric: PoolMetric,
        pool: &PoolKey,
        seconds: f64,
        resource: Option<Arc<ProcessResource>>,
        now_ns: u64,
    ) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let Some(series) = self.pool_mut(pool, move || resource, now_ns) else {
            return;
        };
        let hist = match metric {
            PoolMetric::CreateTime => &mut series.create_time,
            PoolMetric::UseTime => &mut series.use_time,
            PoolMetric::Count | PoolMetric::Max => return,
        };
        hist.observe(metric.bounds(), seconds);
        series.last_active_ns = now_ns;
    }

    /// The pool's state, started if there is room (forgetting inactive pools first
    /// when full); `None`, counted as overflow, when there is none.
    fn pool_mut(
        &mut self,
        id: &PoolKey,
        resource: impl FnOnce() -> Option<Arc<ProcessResource>>,
        now_ns: u64,
    ) -> Option<&mut PoolSeries> {
        if !self.pools.contains_key(id) {
            if self.pools.len() >= self.max_series {
                self.forget_inactive_pools(now_ns);
            }
            if self.pools.len() >= self.max_series {
                self.overflowed += 1;
                return None;
            }
            self.pools.insert(*id, PoolSeries::new(resource(), now_ns));
            return self.pools.get_mut(id);
        }
        let pool = self.pools.get_mut(id)?;
        if pool.resource.is_none() {
            pool.resource = resource();
        }
        Some(pool)
    }

    /// Every tracked pool, in key order.
    pub fn pools(&self) -> impl Iterator<Item = (&PoolKey, &PoolSeries)> {
        self.pools.iter()
    }

    fn forget_inactive_pools(&mut self, now_ns: u64) {
        self.pools.retain(|_, p| {
            p.idle > 0
                || p.used > 0
                || now_ns.saturating_sub(p.last_active_ns) < POOL_FORGET_AFTER_NS
        });
    }

    /// Every series, in (metric, pid, attributes) order.
    pub fn sorted(&self) -> Vec<(&SeriesKey, &Series)> {
        let mut v: Vec<_> = self.series.iter().map(|(k, s)| (k, s)).collect();
        v.sort_by(|a, b| (a.0.metric, a.0.pid, &a.0.attrs).cmp(&(b.0.metric, b.0.pid, &b.0.attrs)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::{
        common::v1::{KeyValue, any_value},
        metrics::v1::{AggregationTemporality, NumberDataPoint, metric, number_data_point},
    };

    fn span(kind: SpanKind, path: &str, status: i64, dur_ms: u64, pid: u32) -> Span {
        Span {
            kind,
            end_unix_nano: 1_000_000_000 + dur_ms * 1_000_000,
            status_message: None,
            attributes: vec![
                ("http.request.method", AttrValue::Str("GET".into())),
                ("url.path", AttrValue::Str(path.to_string().into())),
                ("http.response.status_code", AttrValue::Int(status)),
                ("server.port", AttrValue::Int(8000)),
            ],
            ..crate::spans::sample_span(pid)
        }
    }

    #[test]
    fn histograms_aggregate_by_template_and_render() {
        let mut m = RedMetrics::new(100);
        m.record(&span(SpanKind::Server, "/orders/1", 200, 3, 7));
        m.record(&span(SpanKind::Server, "/orders/2", 200, 30, 7));
        m.record(&span(SpanKind::Client, "/orders/3", 500, 3, 8));
        assert_eq!(m.series_count(), 2);
        let mut text = String::new();
        crate::export::prometheus::render(&m, &mut text);
        assert!(
            text.contains("# TYPE http_server_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("http_server_request_duration_seconds_bucket{service_name=\"svc7\",process_pid=\"7\",http_request_method=\"GET\",http_response_status_code=\"200\",server_port=\"8000\",url_template=\"/orders/{id}\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("http_server_request_duration_seconds_count{service_name=\"svc7\",process_pid=\"7\",http_request_method=\"GET\",http_response_status_code=\"200\",server_port=\"8000\",url_template=\"/orders/{id}\"} 2"), "{text}");
        let req = crate::export::otlp_metrics::export_request(&m, 2_000_000_000);
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
        assert!(m.prints.len() <= 3, "overflowed spans keep no fingerprint");
    }

    /// The cardinality attack: one client asks one server for 2,000 distinct
    /// letter-only paths (no template folds them). Only that server's own
    /// overflow series takes the excess; a new endpoint of another service still
    /// gets its series; once the attack's series stay idle past the forget time
    /// they are forgotten and their room is free again.
    #[test]
    fn one_process_cannot_push_others_into_overflow_and_idle_series_are_forgotten() {
        let mut m = RedMetrics::new(2000);
        let letters = |i: usize| -> String {
            (0..4)
                .map(|k| (b'a' + ((i / 26usize.pow(k)) % 26) as u8) as char)
                .collect()
        };
        for i in 0..2000 {
            m.record(&span(
                SpanKind::Server,
                &format!("/{}", letters(i)),
                404,
                1,
                7,
            ));
        }
        let limit = m.per_process_limit();
        assert_eq!(limit, 250);
        assert_eq!(
            m.series_count(),
            limit + 1,
            "its limit and its own overflow series"
        );
        assert_eq!(m.overflowed(), (2000 - limit) as u64);
        let own_overflow = m
            .series
            .iter()
            .find(|(k, _)| k.pid == 7 && is_overflow(k))
            .expect("pid 7's overflow series");
        assert_eq!(own_overflow.1.hist.count, (2000 - limit) as u64);
        assert!(own_overflow.1.resource.is_some(), "it names its process");

        // Another service's new endpoint: its own series, not an overflow one.
        m.record(&span(SpanKind::Server, "/checkout", 200, 1, 8));
        assert!(
            m.series.iter().any(|(k, _)| k.pid == 8
                && !is_overflow(k)
                && k.attrs
                    .iter()
                    .any(|(a, v)| *a == "url.template" && v == "/checkout")),
            "pid 8's endpoint has its series"
        );

        // Eleven minutes later only pid 8 is still asked for.
        let later = 1_000_000_000 + 11 * 60 * 1_000_000_000;
        let mut fresh = span(SpanKind::Server, "/checkout", 200, 1, 8);
        fresh.start_unix_nano = later - 1_000_000;
        fresh.end_unix_nano = later;
        m.record(&fresh);
        // All went idle before this span (pid 8's too: its series starts anew).
        assert_eq!(m.series_count(), 1, "the idle series are forgotten");
        assert_eq!(m.forgotten(), (limit + 2) as u64);
        // pid 7 gets series again.
        let mut back = span(SpanKind::Server, "/health", 200, 1, 7);
        back.end_unix_nano = later;
        m.record(&back);
        assert!(m.series.iter().any(|(k, _)| k.pid == 7 && !is_overflow(k)));
        let mut text = String::new();
        crate::export::prometheus::render(&m, &mut text);
        assert!(
            text.contains(&format!("tracer_red_series_forgotten_total {}", limit + 2)),
            "{text}"
        );
        assert!(text.contains("tracer_red_series 2"), "{text}");
    }

    /// The fingerprint shortcut finds exactly the series the full key names: spans
    /// that differ in any key value (or in having it), pid or template go apart;
    /// spans equal in all of them go together, whatever their other attributes.
    #[test]
    fn spans_find_their_series_by_fingerprint_exactly() {
        let mut m = RedMetrics::new(100);
        let base = || span(SpanKind::Server, "/orders/1", 200, 1, 7);
        let mut no_port = base();
        no_port.attributes.retain(|(k, _)| *k != "server.port");
        let mut str_status = base();
        str_status.attributes[2].1 = AttrValue::Str("200".into());
        let mut extra = base();
        extra
            .attributes
            .push(("network.peer.address", AttrValue::Str("10.0.0.1".into())));
        let spans = [
            base(),
            span(SpanKind::Server, "/orders/2", 200, 1, 7), // same template
            extra,                                          // not a key attribute
            str_status,                                     // "200" is 200
            span(SpanKind::Server, "/orders/1", 404, 1, 7),
            span(SpanKind::Server, "/carts/1", 200, 1, 7),
            span(SpanKind::Server, "/orders/1", 200, 1, 8),
            span(SpanKind::Client, "/orders/1", 200, 1, 7),
            no_port,
        ];
        for _ in 0..3 {
            for s in &spans {
                m.record(s);
            }
        }
        let counts: Vec<u64> = m.series.iter().map(|(_, s)| s.hist.count).collect();
        assert_eq!(counts, [12, 3, 3, 3, 3, 3]);
        // The keys are the ones the spans make.
        for (key, _) in &m.series {
            let index = m.index[key];
            assert_eq!(m.series[index].0, *key);
        }
        assert_eq!(m.series[5].0.attrs.len(), 3, "method, status, template");
    }

    const SEC: u64 = 1_000_000_000;

    fn pool(pid: u32, address: &str, port: u16) -> PoolKey {
        PoolKey {
            pid,
            db_system: crate::protocols::db::DbSystem::Postgresql,
            server: std::net::SocketAddr::new(address.parse().expect("an IP address"), port),
        }
    }

    fn python(pid: u32) -> Arc<ProcessResource> {
        Arc::new(ProcessResource {
            pid,
            executable_name: "python3.11".into(),
            service_name: "orders".into(),
            service_namespace: None,
            service_instance_id: String::new(),
            host_name: "h".into(),
            k8s: None,
            k8s_node: None,
        })
    }

    fn resources(pid: u32) -> Option<Arc<ProcessResource>> {
        Some(python(pid))
    }

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attrs
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()?.value.as_ref())
    }

    fn str_val(v: &str) -> any_value::Value {
        any_value::Value::StringValue(v.into())
    }

    #[test]
    fn pool_counts_replace_and_max_keeps_the_peak() {
        let mut m = RedMetrics::new(100);
        let a = pool(4242, "127.0.0.1", 5432);
        let b = pool(4242, "10.0.0.2", 5432);
        m.set_pool_counts(&[(a, 2, 3), (b, 1, 0)], &resources, SEC);
        let pa = &m.pools[&a];
        assert_eq!((pa.idle, pa.used, pa.max), (2, 3, 5));
        assert_eq!(pa.resource.as_deref(), Some(&*python(4242)));

        m.set_pool_counts(&[(a, 1, 0)], &resources, 2 * SEC);
        let pa = &m.pools[&a];
        assert_eq!((pa.idle, pa.used, pa.max), (1, 0, 5), "the peak stays");
        let pb = &m.pools[&b];
        assert_eq!((pb.idle, pb.used, pb.max), (0, 0, 1), "absent: count 0");

        // Entries for the same pool add up; a new peak raises max.
        m.set_pool_counts(&[(a, 4, 1), (a, 0, 2)], &resources, 3 * SEC);
        let pa = &m.pools[&a];
        assert_eq!((pa.idle, pa.used, pa.max), (4, 3, 7));
        assert_eq!(m.pool_count(), 2);
    }

    #[test]
    fn idle_pools_are_forgotten_after_ten_minutes() {
        let mut m = RedMetrics::new(100);
        let a = pool(1, "127.0.0.1", 5432);
        let b = pool(2, "127.0.0.1", 5432);
        m.set_pool_counts(&[(a, 1, 0), (b, 1, 0)], &resources, SEC);
        // b closes its connections but records a sample at 5 minutes; a keeps one.
        m.set_pool_counts(&[(a, 1, 0)], &resources, 2 * SEC);
        m.record_pool_use_time(&b, 0.01, None, 300 * SEC);
        m.set_pool_counts(&[(a, 1, 0)], &resources, 899 * SEC);
        assert_eq!(m.pool_count(), 2, "b had a sample less than 10 minutes ago");
        m.set_pool_counts(&[(a, 1, 0)], &resources, 900 * SEC);
        assert_eq!(m.pool_count(), 1);
        assert!(m.pools.contains_key(&a), "a pool with connections is kept");
        // An untracked pool with no connections is not started.
        m.set_pool_counts(&[(a, 1, 0), (b, 0, 0)], &resources, 901 * SEC);
        assert_eq!(m.pool_count(), 1);
    }

    #[test]
    fn pool_histograms_aggregate_into_their_buckets() {
        let mut m = RedMetrics::new(100);
        let a = pool(4242, "127.0.0.1", 5432);
        for s in [0.0005, 0.001, 0.003, 0.2, 1.0, 7.0] {
            m.record_pool_create_time(&a, s, Some(python(4242)), SEC);
        }
        for s in [0.002, 0.7, 59.0, 60.0, 61.0, 400.0] {
            m.record_pool_use_time(&a, s, Some(python(4242)), SEC);
        }
        // Not durations: ignored.
        m.record_pool_use_time(&a, f64::NAN, None, SEC);
        m.record_pool_use_time(&a, -1.0, None, SEC);
        let p = &m.pools[&a];
        // Bounds: 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, +Inf.
        assert_eq!(p.create_time.buckets, [2, 1, 0, 0, 0, 1, 1, 0, 1]);
        assert_eq!(p.create_time.count, 6);
        assert!((p.create_time.sum - 8.2045).abs() < 1e-9);
        assert_eq!((p.create_time.min, p.create_time.max), (0.0005, 7.0));
        // Bounds: 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, +Inf.
        assert_eq!(p.use_time.buckets, [0, 1, 0, 0, 0, 0, 1, 0, 0, 2, 1, 1]);
        assert_eq!(p.use_time.count, 6);
        assert_eq!((p.idle, p.used, p.max), (0, 0, 0));
    }

    #[test]
    fn pool_metrics_render_as_prometheus_text() {
        let mut m = RedMetrics::new(100);
        let a = pool(4242, "127.0.0.1", 5432);
        m.set_pool_counts(&[(a, 2, 3)], &resources, SEC);
        m.set_pool_counts(&[(a, 2, 1)], &resources, 2 * SEC);
        m.record_pool_create_time(&a, 0.003, None, 2 * SEC);
        m.record_pool_create_time(&a, 0.02, None, 2 * SEC);
        m.record_pool_use_time(&a, 0.25, None, 2 * SEC);
        let mut text = String::new();
        crate::export::prometheus::render(&m, &mut text);
        let labels = "service_name=\"orders\",process_pid=\"4242\",db_client_connection_pool_name=\"python3.11[4242] postgresql 127.0.0.1:5432\",db_system_name=\"postgresql\",server_address=\"127.0.0.1\",server_port=\"5432\"";
        let expected = [
            "# TYPE db_client_connection_count gauge".to_string(),
            format!("db_client_connection_count{{{labels},db_client_connection_state=\"idle\"}} 2"),
            format!("db_client_connection_count{{{labels},db_client_connection_state=\"used\"}} 1"),
            "# TYPE db_client_connection_max gauge".to_string(),
            format!("db_client_connection_max{{{labels}}} 5"),
            "# TYPE db_client_connection_create_time_seconds histogram".to_string(),
            "# UNIT db_client_connection_create_time_seconds seconds".to_string(),
            format!("db_client_connection_create_time_seconds_bucket{{{labels},le=\"0.001\"}} 0"),
            format!("db_client_connection_create_time_seconds_bucket{{{labels},le=\"0.005\"}} 1"),
            format!("db_client_connection_create_time_seconds_bucket{{{labels},le=\"0.05\"}} 2"),
            format!("db_client_connection_create_time_seconds_bucket{{{labels},le=\"+Inf\"}} 2"),
            format!("db_client_connection_create_time_seconds_sum{{{labels}}} 0.023"),
            format!("db_client_connection_create_time_seconds_count{{{labels}}} 2"),
            "# TYPE db_client_connection_use_time_seconds histogram".to_string(),
            format!("db_client_connection_use_time_seconds_bucket{{{labels},le=\"0.1\"}} 0"),
            format!("db_client_connection_use_time_seconds_bucket{{{labels},le=\"0.5\"}} 1"),
            format!("db_client_connection_use_time_seconds_bucket{{{labels},le=\"300\"}} 1"),
            format!("db_client_connection_use_time_seconds_bucket{{{labels},le=\"+Inf\"}} 1"),
            format!("db_client_connection_use_time_seconds_sum{{{labels}}} 0.25"),
            format!("db_client_connection_use_time_seconds_count{{{labels}}} 1"),
        ];
        for line in &expected {
            assert!(has_line(&text, line), "missing {line:?} in\n{text}");
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("db_client_connection_use_time_seconds_bucket"))
                .count(),
            12
        );
        assert!(
            !text.contains("# UNIT db_client_connection_count"),
            "{text}"
        );
    }

    #[test]
    fn pool_histograms_without_samples_are_not_rendered() {
        let mut m = RedMetrics::new(100);
        m.set_pool_counts(&[(pool(1, "127.0.0.1", 5432), 1, 0)], &|_| None, SEC);
        let mut text = String::new();
        crate::export::prometheus::render(&m, &mut text);
        assert!(
            has_line(
                &text,
                "db_client_connection_count{db_client_connection_pool_name=\"[1] postgresql 127.0.0.1:5432\",db_system_name=\"postgresql\",server_address=\"127.0.0.1\",server_port=\"5432\",db_client_connection_state=\"idle\"} 1"
            ),
            "{text}"
        );
        assert!(!text.contains("create_time"), "{text}");
        assert!(!text.contains("use_time"), "{text}");
        let req = crate::export::otlp_metrics::export_request(&m, 2 * SEC);
        let names: Vec<_> = req.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(
            names,
            ["db.client.connection.count", "db.client.connection.max"]
        );
    }

    #[test]
    fn pool_metrics_export_over_otlp_under_the_process_resource() {
        let mut m = RedMetrics::new(100);
        m.record(&span(SpanKind::Server, "/orders/1", 200, 3, 7));
        let a = pool(4242, "::1", 5432);
        m.set_pool_counts(&[(a, 2, 1)], &resources, SEC);
        m.record_pool_create_time(&a, 0.003, None, SEC);
        m.record_pool_use_time(&a, 0.25, None, SEC);
        let req = crate::export::otlp_metrics::export_request(&m, 5 * SEC);
        assert_eq!(req.resource_metrics.len(), 2, "process 7 and process 4242");
        assert_eq!(
            req.resource_metrics[0].scope_metrics[0].metrics[0].name,
            "http.server.request.duration"
        );
        let rm = &req.resource_metrics[1];
        let resource = rm.resource.as_ref().expect("a resource");
        assert_eq!(
            attr(&resource.attributes, "process.pid"),
            Some(&any_value::Value::IntValue(4242))
        );
        assert_eq!(
            attr(&resource.attributes, "service.name"),
            Some(&str_val("orders"))
        );
        let metrics = &rm.scope_metrics[0].metrics;
        let names: Vec<_> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "db.client.connection.count",
                "db.client.connection.max",
                "db.client.connection.create_time",
                "db.client.connection.use_time",
            ]
        );
        let pool_attrs_ok = |attrs: &[KeyValue]| {
            assert_eq!(
                attr(attrs, "db.client.connection.pool.name"),
                Some(&str_val("python3.11[4242] postgresql [::1]:5432"))
            );
            assert_eq!(attr(attrs, "db.system.name"), Some(&str_val("postgresql")));
            assert_eq!(attr(attrs, "server.address"), Some(&str_val("::1")));
            assert_eq!(
                attr(attrs, "server.port"),
                Some(&any_value::Value::IntValue(5432))
            );
        };
        let int = |p: &NumberDataPoint| match p.value {
            Some(number_data_point::Value::AsInt(v)) => v,
            _ => panic!("not an int point: {p:?}"),
        };

        assert_eq!(metrics[0].unit, "{connection}");
        let Some(metric::Data::Sum(count)) = &metrics[0].data else {
            panic!("count is not a Sum: {:?}", metrics[0].data)
        };
        assert!(!count.is_monotonic);
        assert_eq!(
            count.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!(count.data_points.len(), 2);
        for (p, state, value) in [
            (&count.data_points[0], "idle", 2),
            (&count.data_points[1], "used", 1),
        ] {
            pool_attrs_ok(&p.attributes);
            assert_eq!(
                attr(&p.attributes, "db.client.connection.state"),
                Some(&str_val(state))
            );
            assert_eq!(int(p), value);
            assert_eq!((p.start_time_unix_nano, p.time_unix_nano), (SEC, 5 * SEC));
        }

        assert_eq!(metrics[1].unit, "{connection}");
        let Some(metric::Data::Sum(max)) = &metrics[1].data else {
            panic!("max is not a Sum: {:?}", metrics[1].data)
        };
        assert!(!max.is_monotonic);
        assert_eq!(max.data_points.len(), 1);
        pool_attrs_ok(&max.data_points[0].attributes);
        assert_eq!(
            attr(&max.data_points[0].attributes, "db.client.connection.state"),
            None
        );
        assert_eq!(int(&max.data_points[0]), 3);

        for (metric, bounds, buckets) in [
            (&metrics[2], PoolMetric::CreateTime.bounds(), 1),
            (&metrics[3], PoolMetric::UseTime.bounds(), 5),
        ] {
            assert_eq!(metric.unit, "s");
            let Some(metric::Data::Histogram(h)) = &metric.data else {
                panic!("{} is not a histogram", metric.name)
            };
            assert_eq!(
                h.aggregation_temporality,
                AggregationTemporality::Cumulative as i32
            );
            assert_eq!(h.data_points.len(), 1);
            let p = &h.data_points[0];
            pool_attrs_ok(&p.attributes);
            assert_eq!(p.count, 1);
            assert_eq!(p.explicit_bounds, bounds);
            assert_eq!(p.bucket_counts.len(), bounds.len() + 1);
            assert_eq!(p.bucket_counts[buckets], 1, "{}", metric.name);
        }
    }

    #[test]
    fn the_pool_limit_holds() {
        let mut m = RedMetrics::new(3);
        // RED series and pools are limited separately.
        for i in 0..5 {
            m.record(&span(SpanKind::Server, &format!("/p{i}"), 200, 1, 7));
        }
        assert_eq!(m.overflowed(), 2);
        let pools: Vec<_> = (0..5)
            .map(|i| (pool(100 + i, "127.0.0.1", 5432), 1, 0))
            .collect();
        m.set_pool_counts(&pools, &resources, SEC);
        assert_eq!(m.pool_count(), 3);
        assert_eq!(m.overflowed(), 4, "two pools left out");
        let untracked = pool(999, "127.0.0.1", 5432);
        m.record_pool_create_time(&untracked, 0.01, None, SEC);
        m.record_pool_use_time(&untracked, 0.01, None, SEC);
        assert_eq!(m.pool_count(), 3);
        assert_eq!(m.overflowed(), 6);
        assert!(!m.pools.contains_key(&untracked));
        // Tracked pools still record.
        m.record_pool_use_time(&pools[0].0, 0.01, None, SEC);
        assert_eq!(m.pools[&pools[0].0].use_time.count, 1);
        assert_eq!(m.overflowed(), 6);
        // Once the tracked pools are forgotten, there is room again.
        m.set_pool_counts(&[], &resources, 2 * SEC);
        m.record_pool_use_time(&untracked, 0.01, None, 2 * SEC + POOL_FORGET_AFTER_NS);
        assert_eq!(m.pool_count(), 1);
        assert!(m.pools.contains_key(&untracked));
    }
}
