//! Where each OTLP signal goes and how: endpoint, protocol, headers, compression,
//! timeout and TLS, resolved from flags, the environment (the OpenTelemetry
//! exporter variables) and the config file.
//!
//! For every value, flags win over the environment and the environment over the
//! file; within each, the signal's own setting (`OTEL_EXPORTER_OTLP_TRACES_…`)
//! wins over the generic one (`OTEL_EXPORTER_OTLP_…`). Headers are merged by key
//! in the same order. A signal with no endpoint anywhere is not sent.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use super::otlp::OtlpProtocol;
use crate::tls::TlsFiles;

/// The OTLP signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

pub const SIGNALS: [Signal; 3] = [Signal::Traces, Signal::Metrics, Signal::Logs];

impl Signal {
    /// The infix of its environment variables (`OTEL_EXPORTER_OTLP_TRACES_…`).
    pub fn env(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
            Signal::Logs => "LOGS",
        }
    }

    /// The path appended to a generic HTTP endpoint.
    pub fn path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
            Signal::Logs => "/v1/logs",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "gzip" => Ok(Self::Gzip),
            "none" | "" => Ok(Self::None),
            other => Err(format!(
                "unknown OTLP compression {other:?}: use gzip or none"
            )),
        }
    }
}

/// The OpenTelemetry default export timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How one signal is sent.
#[derive(Clone, PartialEq, Eq)]
pub struct SignalSettings {
    /// gRPC: the collector's address (`https://host:4317`); HTTP: the full URL the
    /// requests are posted to.
    pub url: String,
    pub protocol: OtlpProtocol,
    /// The protocol was guessed from port 4317 (no protocol was given).
    pub protocol_guessed: bool,
    /// Sent with every request. The values are secrets (API keys): never printed.
    pub headers: Vec<(String, String)>,
    pub compression: Compression,
    pub timeout: Duration,
    pub tls: TlsFiles,
}

impl std::fmt::Debug for SignalSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(k, _)| format!("{k}=<redacted>"))
            .collect();
        f.debug_struct("SignalSettings")
            .field("url", &self.url)
            .field("protocol", &self.protocol)
            .field("protocol_guessed", &self.protocol_guessed)
            .field("headers", &headers)
            .field("compression", &self.compression)
            .field("timeout", &self.timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Every signal's settings; `None` for a signal that is not sent over OTLP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OtlpSettings {
    pub traces: Option<SignalSettings>,
    pub metrics: Option<SignalSettings>,
    pub logs: Option<SignalSettings>,
}

impl OtlpSettings {
    pub fn get(&self, s: Signal) -> Option<&SignalSettings> {
        match s {
            Signal::Traces => self.traces.as_ref(),
            Signal::Metrics => self.metrics.as_ref(),
            Signal::Logs => self.logs.as_ref(),
        }
    }

    fn slot(&mut self, s: Signal) -> &mut Option<SignalSettings> {
        match s {
            Signal::Traces => &mut self.traces,
            Signal::Metrics => &mut self.metrics,
            Signal::Logs => &mut self.logs,
        }
    }

    pub fn is_empty(&self) -> bool {
        SIGNALS.iter().all(|s| self.get(*s).is_none())
    }

    /// All three signals to one endpoint the generic way (tests, benchmarks).
    pub fn single(endpoint: &str, protocol: OtlpProtocol, timeout: Duration) -> Self {
        let mut out = Self::default();
        for s in SIGNALS {
            *out.slot(s) = Some(SignalSettings {
                url: signal_url(endpoint, protocol, s, true),
                protocol,
                protocol_guessed: false,
                headers: Vec::new(),
                compression: Compression::None,
                timeout,
                tls: TlsFiles {
                    system_roots: true,
                    ..Default::default()
                },
            });
        }
        out
    }
}

/// What one source (flags, environment or file) says, generic and per signal.
#[derive(Clone, Debug, Default)]
pub struct Source {
    pub generic: Fields,
    /// Traces, metrics, logs.
    pub signal: [Fields; 3],
}

/// The settings one source may give.
#[derive(Clone, Debug, Default)]
pub struct Fields {
    pub endpoint: Option<String>,
    pub protocol: Option<String>,
    pub headers: Vec<(String, String)>,
    pub compression: Option<String>,
    pub timeout: Option<Duration>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// The URL a signal's requests go to. gRPC: the address as given; HTTP: a
/// generic endpoint is a base URL to which the signal's path is appended (a
/// trailing `/v1/traces` is taken off first), a signal's own is used as it is.
fn signal_url(endpoint: &str, protocol: OtlpProtocol, s: Signal, generic: bool) -> String {
    let e = endpoint.trim();
    match protocol {
        OtlpProtocol::Grpc => e.trim_end_matches('/').to_string(),
        OtlpProtocol::HttpProtobuf if generic => {
            let base = e.trim_end_matches('/').trim_end_matches("/v1/traces");
            format!("{base}{}", s.path())
        }
        OtlpProtocol::HttpProtobuf => e.to_string(),
    }
}

/// The port of a URL (or of `host:port`), when it says one.
fn port_of(endpoint: &str) -> Option<u16> {
    let uri: hyper::Uri = endpoint.trim().parse().ok()?;
    uri.port_u16()
}

/// Parses an `OTEL_EXPORTER_OTLP_HEADERS` value: `key=value,key2=value2`, values
/// percent-decoded. Errors name the variable and the entry, never a value.
pub fn parse_headers(what: &str, text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, entry) in text.split(',').enumerate() {
        if entry.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = entry.split_once('=') else {
            return Err(format!(
                "{what}: entry {} has no '=' (expected key=value)",
                i + 1
            ));
        };
        let key = k.trim().to_ascii_lowercase();
        check_header(what, &key, v)?;
        out.push((key, crate::service::percent_decode(v.trim())));
    }
    Ok(out)
}

/// A header name must be an HTTP token; a value must hold no control characters.
fn check_header(what: &str, key: &str, value: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if key.is_empty() || !key.bytes().all(token) {
        return Err(format!("{what}: {key:?} is no valid header name"));
    }
    if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(format!(
            "{what}: the value of header {key:?} holds control characters"
        ));
    }
    Ok(())
}

/// A `--otlp-header KEY=VALUE` flag.
pub fn parse_header_flag(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| "--otlp-header takes KEY=VALUE".to_string())?;
    let key = k.trim().to_ascii_lowercase();
    check_header("--otlp-header", &key, v)?;
    Ok((key, v.trim().to_string()))
}

/// What the OpenTelemetry exporter variables say, read through `env`.
pub fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Source, String> {
    let fields = |prefix: &str| -> Result<Fields, String> {
        let var = |name: &str| env(&format!("{prefix}{name}")).filter(|v| !v.trim().is_empty());
        let headers = match var("HEADERS") {
            Some(h) => parse_headers(&format!("{prefix}HEADERS"), &h)?,
            None => Vec::new(),
        };
        let timeout = match var("TIMEOUT") {
            Some(t) => Some(Duration::from_millis(t.trim().parse().map_err(|_| {
                format!("{prefix}TIMEOUT must be a number of milliseconds, got {t:?}")
            })?)),
            None => None,
        };
        Ok(Fields {
            endpoint: var("ENDPOINT"),
            protocol: var("PROTOCOL"),
            headers,
            compression: var("COMPRESSION"),
            timeout,
            ca_file: var("CERTIFICATE").map(PathBuf::from),
            client_cert: var("CLIENT_CERTIFICATE").map(PathBuf::from),
            client_key: var("CLIENT_KEY").map(PathBuf::from),
        })
    };
    Ok(Source {
        generic: fields("OTEL_EXPORTER_OTLP_")?,
        signal: [
            fields("OTEL_EXPORTER_OTLP_TRACES_")?,
            fields("OTEL_EXPORTER_OTLP_METRICS_")?,
            fields("OTEL_EXPORTER_OTLP_LOGS_")?,
        ],
    })
}

/// Resolves every signal from the sources, highest first (flags, environment,
/// file).
pub fn resolve(sources: &[&Source]) -> Result<OtlpSettings, String> {
    let mut out = OtlpSettings::default();
    for (i, s) in SIGNALS.into_iter().enumerate() {
        // Highest first: each source's signal setting, then its generic one.
        let order: Vec<(&Fields, bool)> = sources
            .iter()
            .flat_map(|src| [(&src.signal[i], false), (&src.generic, true)])
            .collect();
        let first = |pick: &dyn Fn(&Fields) -> bool| order.iter().find(|(f, _)| pick(f)).copied();
        let Some((at, generic)) = first(&|f| f.endpoint.is_some()) else {
            continue;
        };
        let endpoint = at.endpoint.clone().unwrap_or_default();
        let uri: hyper::Uri = endpoint
            .trim()
            .parse()
            .map_err(|e| format!("invalid OTLP {} endpoint {endpoint:?}: {e}", s.name()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "invalid OTLP {} endpoint {endpoint:?}: expected a URL such as http://127.0.0.1:4318 or https://collector:4317",
                s.name()
            ));
        }
        let (protocol, protocol_guessed) = match first(&|f| f.protocol.is_some()) {
            Some((f, _)) => (f.protocol.as_deref().unwrap_or_default().parse()?, false),
            // OTLP's default is http/protobuf, but 4317 is gRPC's port: an
            // endpoint there without a protocol means gRPC.
            None if port_of(&endpoint) == Some(4317) => (OtlpProtocol::Grpc, true),
            None => (OtlpProtocol::HttpProtobuf, false),
        };
        let compression = match first(&|f| f.compression.is_some()) {
            Some((f, _)) => f.compression.as_deref().unwrap_or_default().parse()?,
            None => Compression::None,
        };
        let timeout = first(&|f| f.timeout.is_some())
            .and_then(|(f, _)| f.timeout)
            .unwrap_or(DEFAULT_TIMEOUT);
        if timeout.is_zero() || timeout > Duration::from_secs(600) {
            return Err(format!(
                "the OTLP {} timeout must be between 1 ms and 10 minutes",
                s.name()
            ));
        }
        // Headers by key, lowest first so higher ones overwrite; within the
        // environment a signal's own variable replaces the generic one.
        let mut headers: BTreeMap<String, String> = BTreeMap::new();
        for src in sources.iter().rev() {
            let own = &src.signal[i].headers;
            let chosen = if own.is_empty() {
                &src.generic.headers
            } else {
                own
            };
            for (k, v) in chosen {
                headers.insert(k.clone(), v.clone());
            }
        }
        let path =
            |pick: &dyn Fn(&Fields) -> Option<PathBuf>| order.iter().find_map(|(f, _)| pick(f));
        let tls = TlsFiles {
            system_roots: true,
            ca_file: path(&|f| f.ca_file.clone()),
            client_cert: path(&|f| f.client_cert.clone()),
            client_key: path(&|f| f.client_key.clone()),
        };
        *out.slot(s) = Some(SignalSettings {
            url: signal_url(&endpoint, protocol, s, generic),
            protocol,
            protocol_guessed,
            headers: headers.into_iter().collect(),
            compression,
            timeout,
            tls,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Source {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_env(&move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())).unwrap()
    }

    #[test]
    fn headers_are_percent_decoded_and_bad_ones_named_without_their_value() {
        let h = parse_headers("H", "api-key=abc%3D%3D, X-Team = a%20b ,").unwrap();
        assert_eq!(
            h,
            [
                ("api-key".into(), "abc==".into()),
                ("x-team".into(), "a b".into())
            ]
        );
        let e = parse_headers("H", "ok=1,s3cr3t").unwrap_err();
        assert!(e.contains("entry 2") && !e.contains("s3cr3t"), "{e}");
        let e = parse_headers("H", "bad key=s3cr3t").unwrap_err();
        assert!(e.contains("bad key") && !e.contains("s3cr3t"), "{e}");
        assert!(parse_header_flag("novalue").is_err());
        assert_eq!(
            parse_header_flag("Authorization=Bearer x").unwrap(),
            ("authorization".into(), "Bearer x".into())
        );
    }

    #[test]
    fn a_generic_http_endpoint_gets_each_signals_path_and_a_signals_own_is_used_as_is() {
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/"),
            (
                "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                "https://logs.example/ingest",
            ),
        ]);
        let s = resolve(&[&e]).unwrap();
        assert_eq!(s.traces.as_ref().unwrap().url, "http://c:4318/v1/traces");
        assert_eq!(s.metrics.as_ref().unwrap().url, "http://c:4318/v1/metrics");
        assert_eq!(s.logs.as_ref().unwrap().url, "https://logs.example/ingest");
        // Only traces configured: only traces are sent.
        let s = resolve(&[&env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        )])])
        .unwrap();
        assert!(s.traces.is_some() && s.metrics.is_none() && s.logs.is_none());
    }

    #[test]
    fn port_4317_without_a_protocol_means_grpc_and_a_given_protocol_always_wins() {
        let s = resolve(&[&env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector:4317",
        )])])
        .unwrap();
        let t = s.traces.unwrap();
        assert_eq!((t.protocol, t.protocol_guessed), (OtlpProtocol::Grpc, true));
        assert_eq!(t.url, "http://collector:4317");
        let s = resolve(&[&env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ])])
        .unwrap();
        assert_eq!(s.traces.unwrap().protocol, OtlpProtocol::HttpProtobuf);
        let s = resolve(&[&env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "https://otlp.example",
        )])])
        .unwrap();
        assert_eq!(s.traces.unwrap().protocol, OtlpProtocol::HttpProtobuf);
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file_and_signals_beat_generic() {
        let flags = Source {
            generic: Fields {
                headers: vec![("x-api-key".into(), "from-flag".into())],
                timeout: Some(Duration::from_secs(3)),
                ..Default::default()
            },
            ..Default::default()
        };
        let e = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "x-api-key=from-env,x-tenant=t1",
            ),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-metrics=m"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip"),
        ]);
        let file = Source {
            generic: Fields {
                endpoint: Some("http://file:4318".into()),
                headers: vec![("x-file".into(), "f".into())],
                ..Default::default()
            },
            ..Default::default()
        };
        let s = resolve(&[&flags, &e, &file]).unwrap();
        let t = s.traces.as_ref().unwrap();
        assert_eq!(t.url, "http://env:4318/v1/traces");
        assert_eq!(t.timeout, Duration::from_secs(3));
        assert_eq!(t.compression, Compression::Gzip);
        assert_eq!(
            t.headers,
            [
                ("x-api-key".into(), "from-flag".into()),
                ("x-file".into(), "f".into()),
                ("x-tenant".into(), "t1".into())
            ]
        );
        let m = s.metrics.as_ref().unwrap();
        assert_eq!(m.compression, Compression::None);
        // The signal's own variable replaces the generic one.
        assert_eq!(
            m.headers,
            [
                ("x-api-key".into(), "from-flag".into()),
                ("x-file".into(), "f".into()),
                ("x-metrics".into(), "m".into())
            ]
        );
    }

    #[test]
    fn bad_values_are_clear_errors_and_header_values_never_show() {
        let bad = |vars: &[(&str, &str)]| resolve(&[&env(vars)]).unwrap_err();
        assert!(
            bad(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]).contains("expected a URL")
        );
        assert!(
            bad(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")
            ])
            .contains("zstd")
        );
        assert!(
            from_env(&|k| (k == "OTEL_EXPORTER_OTLP_TIMEOUT").then(|| "10s".to_string()))
                .unwrap_err()
                .contains("milliseconds")
        );
        let s = resolve(&[&env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "authorization=Bearer%20sk_live_123",
            ),
        ])])
        .unwrap();
        let t = s.traces.as_ref().unwrap();
        assert_eq!(t.headers[0].1, "Bearer sk_live_123");
        let shown = format!("{s:?}");
        assert!(
            shown.contains("authorization=<redacted>") && !shown.contains("sk_live"),
            "{shown}"
        );
    }
}
