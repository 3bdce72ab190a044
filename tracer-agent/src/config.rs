//! Configuration: defaults, then the TOML file, then environment, then flags,
//! merged and validated in one step into [`Config`].

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::{
    capture::backend::BackendChoice,
    export::{Output, otlp_settings::OtlpSettings},
};

#[derive(Debug, Parser)]
#[command(
    name = "tracer-agent",
    version,
    about = "Zero-instrumentation request tracer (eBPF)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Say which kernel features the agent needs and which are present here.
    Check,
    /// Probe a running agent's /healthz: exit 0 when healthy, 1 (and why) when not
    /// (a liveness probe that keeps the endpoint on loopback).
    Health {
        /// The agent's `--listen` address.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
    },
    /// Check the configuration (file, environment and flags given before this
    /// word) and print it as the agent would run with it; header values redacted.
    ConfigCheck,
    /// Show a running agent's database connections per process and destination.
    Conns {
        /// The agent's `--listen` address.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
    },
}

/// Flags of the agent itself. Each one can also be set in the config file.
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// OTLP collector endpoint for every signal, e.g. http://127.0.0.1:4318 (HTTP: the
    /// signal's path is appended) or https://collector:4317 (gRPC)
    /// [env: OTEL_EXPORTER_OTLP_ENDPOINT].
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// Endpoint of traces only, used as it is [env: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT].
    #[arg(long)]
    pub otlp_traces_endpoint: Option<String>,
    /// Endpoint of metrics only [env: OTEL_EXPORTER_OTLP_METRICS_ENDPOINT].
    #[arg(long)]
    pub otlp_metrics_endpoint: Option<String>,
    /// Endpoint of logs (leak reports) only [env: OTEL_EXPORTER_OTLP_LOGS_ENDPOINT].
    #[arg(long)]
    pub otlp_logs_endpoint: Option<String>,
    /// OTLP transport: grpc or http/protobuf [env: OTEL_EXPORTER_OTLP_PROTOCOL;
    /// default: grpc for an endpoint on port 4317, else http/protobuf].
    #[arg(long)]
    pub otlp_protocol: Option<String>,
    /// A header sent with every OTLP request, e.g. an API key (repeatable; over
    /// OTEL_EXPORTER_OTLP_HEADERS by key). Its value is never printed.
    #[arg(long = "otlp-header", value_name = "KEY=VALUE", value_parser = crate::export::otlp_settings::parse_header_flag)]
    pub otlp_headers: Vec<(String, String)>,
    /// gzip or none [env: OTEL_EXPORTER_OTLP_COMPRESSION; default: none].
    #[arg(long)]
    pub otlp_compression: Option<String>,
    /// Longest one OTLP export takes, connecting included [env:
    /// OTEL_EXPORTER_OTLP_TIMEOUT, in milliseconds; default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub otlp_timeout: Option<Duration>,
    /// CA certificates (PEM) trusted besides the system's, for an https collector
    /// [env: OTEL_EXPORTER_OTLP_CERTIFICATE].
    #[arg(long)]
    pub otlp_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS [env: OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE].
    #[arg(long)]
    pub otlp_client_cert: Option<PathBuf>,
    /// The client certificate's key (PEM) [env: OTEL_EXPORTER_OTLP_CLIENT_KEY].
    #[arg(long)]
    pub otlp_client_key: Option<PathBuf>,
    /// What to print on stdout [default: pretty without an OTLP endpoint, else none].
    #[arg(long, value_enum)]
    pub output: Option<Output>,
    /// Trace only this process (repeatable).
    #[arg(long = "pid")]
    pub pids: Vec<u32>,
    /// Trace only connections with this port at either end (repeatable).
    #[arg(long = "port")]
    pub ports: Vec<u16>,
    /// Payload bytes captured per socket read/write [default: 2048, at most 4096].
    #[arg(long)]
    pub capture_bytes: Option<u32>,
    /// TOML config file with the same settings (flags and environment win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// How long a database connection may sit unused before it is reported as leaked [default: 60s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub leak_after: Option<Duration>,
    /// Longest a span waits for its parent or peer spans before export [default: 2s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub parent_wait: Option<Duration>,
    /// Keep literal values in `db.query.text` (by default they are replaced by `?`:
    /// SQL literals may hold personal data or secrets).
    #[arg(long)]
    pub keep_sql_literals: bool,
    /// How to capture socket I/O: auto (the first of tracepoints, fexit, kprobes,
    /// syscalls that this kernel has and that loads), or one of them [default: auto].
    #[arg(long, value_enum, env = "TRACER_CAPTURE_BACKEND")]
    pub capture_backend: Option<BackendChoice>,
    /// Do not capture TLS plaintext (uprobes on OpenSSL's SSL_read/SSL_write). With
    /// it on (the default) the agent keeps CAP_BPF and CAP_PERFMON after attaching,
    /// to attach to copies of OpenSSL that processes load later.
    #[arg(long)]
    pub no_tls: bool,
    /// Benchmark floor: attach the same tracepoints with programs that do nothing
    /// (`cargo xtask bench overhead`). Traces nothing.
    #[arg(long, hide = true)]
    pub empty_probes: bool,
    /// Address of the agent's own HTTP endpoint (/metrics, /healthz) [default: 127.0.0.1:9464].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Write every raw ring-buffer record to FILE, for replay without root (bug reports,
    /// test data). It holds the captured payload prefixes as they are: keep it private.
    #[arg(long, value_name = "FILE")]
    pub record_events: Option<PathBuf>,
    /// Kubernetes metadata: auto (when running in a cluster: KUBERNETES_SERVICE_HOST
    /// is set, or --kube-api given), on (required), off [default: auto].
    #[arg(long, value_enum, env = "TRACER_KUBERNETES")]
    pub kubernetes: Option<KubeMode>,
    /// This node's name, whose pods are watched (set it from the downward API's
    /// spec.nodeName) [default: the host name].
    #[arg(long, env = "K8S_NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubernetes API server URL [default: in-cluster, from KUBERNETES_SERVICE_HOST
    /// and KUBERNETES_SERVICE_PORT]; e.g. http://127.0.0.1:8001 behind `kubectl proxy`.
    #[arg(long, env = "TRACER_KUBE_API")]
    pub kube_api: Option<String>,
    /// Bearer token file for the API server [default: the pod's service account token].
    #[arg(long)]
    pub kube_token_file: Option<PathBuf>,
    /// CA certificate of an https API server [default: the service account's ca.crt].
    #[arg(long)]
    pub kube_ca_file: Option<PathBuf>,
    /// Name services after the well-known labels app.kubernetes.io/instance and
    /// app.kubernetes.io/name before their workload (opt-in, as OpenTelemetry advises).
    #[arg(long)]
    pub kube_well_known_labels: bool,
}

/// Whether the agent reads Kubernetes metadata.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KubeMode {
    #[default]
    Auto,
    On,
    Off,
}

/// Where a pod's service account token and cluster CA are mounted.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The config file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub otlp_endpoint: Option<String>,
    pub otlp_traces_endpoint: Option<String>,
    pub otlp_metrics_endpoint: Option<String>,
    pub otlp_logs_endpoint: Option<String>,
    pub otlp_protocol: Option<String>,
    /// Headers of every OTLP request (`[otlp-headers]` table).
    #[serde(default)]
    pub otlp_headers: std::collections::BTreeMap<String, String>,
    pub otlp_compression: Option<String>,
    #[serde(default, with = "humantime_serde_opt")]
    pub otlp_timeout: Option<Duration>,
    pub otlp_ca_file: Option<PathBuf>,
    pub otlp_client_cert: Option<PathBuf>,
    pub otlp_client_key: Option<PathBuf>,
    pub output: Option<Output>,
    #[serde(default)]
    pub pids: Vec<u32>,
    #[serde(default)]
    pub ports: Vec<u16>,
    pub capture_bytes: Option<u32>,
    #[serde(default, with = "humantime_serde_opt")]
    pub leak_after: Option<Duration>,
    pub listen: Option<SocketAddr>,
    pub ringbuf_bytes: Option<u32>,
    pub max_connections: Option<usize>,
    pub keep_sql_literals: Option<bool>,
    #[serde(default, with = "humantime_serde_opt")]
    pub parent_wait: Option<Duration>,
    pub record_events: Option<PathBuf>,
    pub capture_backend: Option<BackendChoice>,
    /// `tls = false`: as `--no-tls`.
    pub tls: Option<bool>,
    /// `service.namespace` of every process that sets none.
    pub service_namespace: Option<String>,
    /// `[[service]]` rules naming processes that do not name themselves.
    #[serde(default)]
    pub service: Vec<crate::service::ServiceRule>,
    pub kubernetes: Option<KubeMode>,
    pub node_name: Option<String>,
    pub kube_api: Option<String>,
    pub kube_token_file: Option<PathBuf>,
    pub kube_ca_file: Option<PathBuf>,
    pub kube_well_known_labels: Option<bool>,
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where each OTLP signal goes (none of them: no OTLP export).
    pub otlp: OtlpSettings,
    pub output: Output,
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    pub capture_bytes: u32,
    pub leak_after: Duration,
    pub listen: SocketAddr,
    pub ringbuf_bytes: u32,
    pub max_connections: usize,
    pub keep_sql_literals: bool,
    pub parent_wait: Duration,
    pub empty_probes: bool,
    pub capture_backend: BackendChoice,
    /// Capture TLS plaintext (OpenSSL uprobes).
    pub tls: bool,
    /// Where raw ring-buffer records are recorded, when asked.
    pub record_events: Option<PathBuf>,
    /// How processes that do not name themselves are named.
    pub naming: crate::service::ServiceNaming,
    /// How to reach the Kubernetes API server, when metadata is read.
    pub kube: Option<crate::kube::KubeConfig>,
}

/// Longest `--parent-wait`: every span waits in memory that long.
pub const MAX_PARENT_WAIT: Duration = Duration::from_secs(60);
/// Longest `--leak-after`.
pub const MAX_LEAK_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

pub const DEFAULT_CAPTURE_BYTES: u32 = 2048;
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

impl Config {
    /// Merges flags (and the environment, which clap already folded in) over the file.
    pub fn from_args(args: &RunArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source: Box::new(source),
                })?
            }
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    pub fn merge(args: &RunArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let otlp = otlp_settings(args, &file, &|k| std::env::var(k).ok())?;
        let output = args.output.or(file.output).unwrap_or(if !otlp.is_empty() {
            Output::None
        } else {
            Output::Pretty
        });
        let capture_bytes = args
            .capture_bytes
            .or(file.capture_bytes)
            .unwrap_or(DEFAULT_CAPTURE_BYTES);
        let max = tracer_common::MAX_CAPTURE as u32;
        if capture_bytes == 0 || capture_bytes > max {
            return Err(ConfigError::Invalid(format!(
                "capture-bytes must be between 1 and {max}, got {capture_bytes}"
            )));
        }
        let leak_after = args
            .leak_after
            .or(file.leak_after)
            .unwrap_or(Duration::from_secs(60));
        if leak_after.is_zero() || leak_after > MAX_LEAK_AFTER {
            return Err(ConfigError::Invalid(format!(
                "leak-after must be longer than zero and at most {}, got {}",
                humantime::format_duration(MAX_LEAK_AFTER),
                humantime::format_duration(leak_after)
            )));
        }
        let parent_wait = args
            .parent_wait
            .or(file.parent_wait)
            .unwrap_or(Duration::from_secs(2));
        if parent_wait > MAX_PARENT_WAIT {
            return Err(ConfigError::Invalid(format!(
                "parent-wait must be at most {} (every span waits in memory that long), got {}",
                humantime::format_duration(MAX_PARENT_WAIT),
                humantime::format_duration(parent_wait)
            )));
        }
        let pids = if args.pids.is_empty() {
            file.pids
        } else {
            args.pids.clone()
        };
        let ports = if args.ports.is_empty() {
            file.ports
        } else {
            args.ports.clone()
        };
        if pids.len() > 1024 || ports.len() > 1024 {
            return Err(ConfigError::Invalid(
                "at most 1024 --pid and 1024 --port filters".into(),
            ));
        }
        let ringbuf_bytes = file.ringbuf_bytes.unwrap_or(8 << 20);
        if !(4096..=1 << 30).contains(&ringbuf_bytes) {
            return Err(ConfigError::Invalid(format!(
                "ringbuf-bytes must be between 4096 and 1 GiB, got {ringbuf_bytes}"
            )));
        }
        for rule in &file.service {
            rule.validate().map_err(ConfigError::Invalid)?;
        }
        // The agent's own OTEL_RESOURCE_ATTRIBUTES may carry the namespace; the
        // config file's setting wins.
        let namespace = file
            .service_namespace
            .filter(|n| !n.trim().is_empty())
            .or_else(|| {
                std::env::var("OTEL_RESOURCE_ATTRIBUTES")
                    .ok()
                    .and_then(|attrs| crate::service::resource_attributes(&attrs).namespace)
            });
        let naming = crate::service::ServiceNaming {
            rules: file.service,
            namespace,
        };
        let kube = kube_config(
            args,
            KubeFile {
                mode: file.kubernetes,
                node_name: file.node_name,
                api: file.kube_api,
                token_file: file.kube_token_file,
                ca_file: file.kube_ca_file,
                well_known_labels: file.kube_well_known_labels,
            },
            &|k| std::env::var(k).ok(),
        )?;
        Ok(Self {
            otlp,
            output,
            pids,
            ports,
            capture_bytes,
            leak_after,
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("constant address parses")),
            ringbuf_bytes,
            max_connections: file
                .max_connections
                .unwrap_or(tracer_common::MAX_SOCKETS as usize)
                .max(1),
            keep_sql_literals: args.keep_sql_literals || file.keep_sql_literals.unwrap_or(false),
            parent_wait,
            empty_probes: args.empty_probes,
            capture_backend: args
                .capture_backend
                .or(file.capture_backend)
                .unwrap_or_default(),
            tls: !args.no_tls && file.tls.unwrap_or(true),
            record_events: args.record_events.clone().or(file.record_events),
            naming,
            kube,
        })
    }
}

/// The OTLP settings from flags, the environment (through `env`) and the file.
fn otlp_settings(
    args: &RunArgs,
    file: &FileConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<OtlpSettings, ConfigError> {
    use crate::export::otlp_settings::{Fields, Source, from_env, resolve};
    let endpoint_only = |e: &Option<String>| Fields {
        endpoint: e.clone().filter(|e| !e.trim().is_empty()),
        ..Default::default()
    };
    let flags = Source {
        generic: Fields {
            endpoint: args.otlp_endpoint.clone().filter(|e| !e.trim().is_empty()),
            protocol: args.otlp_protocol.clone(),
            headers: args.otlp_headers.clone(),
            compression: args.otlp_compression.clone(),
            timeout: args.otlp_timeout,
            ca_file: args.otlp_ca_file.clone(),
            client_cert: args.otlp_client_cert.clone(),
            client_key: args.otlp_client_key.clone(),
        },
        signal: [
            endpoint_only(&args.otlp_traces_endpoint),
            endpoint_only(&args.otlp_metrics_endpoint),
            endpoint_only(&args.otlp_logs_endpoint),
        ],
    };
    let environment = from_env(env).map_err(ConfigError::Invalid)?;
    let mut file_headers = Vec::new();
    for (k, v) in &file.otlp_headers {
        file_headers.push(
            crate::export::otlp_settings::parse_header_flag(&format!("{k}={v}"))
                .map_err(|e| ConfigError::Invalid(e.replace("--otlp-header", "otlp-headers")))?,
        );
    }
    let from_file = Source {
        generic: Fields {
            endpoint: file.otlp_endpoint.clone().filter(|e| !e.trim().is_empty()),
            protocol: file.otlp_protocol.clone(),
            headers: file_headers,
            compression: file.otlp_compression.clone(),
            timeout: file.otlp_timeout,
            ca_file: file.otlp_ca_file.clone(),
            client_cert: file.otlp_client_cert.clone(),
            client_key: file.otlp_client_key.clone(),
        },
        signal: [
            endpoint_only(&file.otlp_traces_endpoint),
            endpoint_only(&file.otlp_metrics_endpoint),
            endpoint_only(&file.otlp_logs_endpoint),
        ],
    };
    resolve(&[&flags, &environment, &from_file]).map_err(ConfigError::Invalid)
}

/// The Kubernetes keys of the config file.
#[derive(Default)]
struct KubeFile {
    mode: Option<KubeMode>,
    node_name: Option<String>,
    api: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    well_known_labels: Option<bool>,
}

/// Whether and how to read Kubernetes metadata. `auto` reads it in a cluster (the
/// kubelet sets KUBERNETES_SERVICE_HOST in every container) or when an API URL is
/// given, and tries nothing otherwise.
fn kube_config(
    args: &RunArgs,
    file: KubeFile,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<crate::kube::KubeConfig>, ConfigError> {
    let mode = args.kubernetes.or(file.mode).unwrap_or_default();
    if mode == KubeMode::Off {
        return Ok(None);
    }
    let in_cluster = env("KUBERNETES_SERVICE_HOST")
        .filter(|h| !h.is_empty())
        .map(|host| {
            let port = env("KUBERNETES_SERVICE_PORT").unwrap_or_else(|| "443".into());
            if host.contains(':') {
                format!("https://[{host}]:{port}")
            } else {
                format!("https://{host}:{port}")
            }
        });
    let api = args.kube_api.clone().or(file.api).or(in_cluster);
    let Some(api) = api else {
        return if mode == KubeMode::On {
            Err(ConfigError::Invalid(
                "kubernetes = on, but this is no Kubernetes pod (KUBERNETES_SERVICE_HOST is not set) and no --kube-api is given".into(),
            ))
        } else {
            Ok(None)
        };
    };
    let sa = std::path::Path::new(SERVICE_ACCOUNT_DIR);
    let token_file = args
        .kube_token_file
        .clone()
        .or(file.token_file)
        .or_else(|| Some(sa.join("token")).filter(|p| p.exists()));
    let ca_file = args
        .kube_ca_file
        .clone()
        .or(file.ca_file)
        .or_else(|| Some(sa.join("ca.crt")).filter(|p| p.exists()));
    let node_name = args
        .node_name
        .clone()
        .or(file.node_name)
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(crate::process::host_name);
    let config = crate::kube::KubeConfig {
        api,
        token_file,
        ca_file,
        node_name,
        well_known_labels: args.kube_well_known_labels || file.well_known_labels.unwrap_or(false),
    };
    crate::kube::client::validate(&config).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_with_no_file_and_no_flags() {
        let c = Config::merge(&RunArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.output, Output::Pretty);
        assert_eq!(c.capture_bytes, DEFAULT_CAPTURE_BYTES);
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.leak_after, Duration::from_secs(60));
    }

    #[test]
    fn an_endpoint_turns_the_terminal_view_off_unless_asked() {
        let args = RunArgs {
            otlp_endpoint: Some("http://127.0.0.1:4317".into()),
            ..RunArgs::default()
        };
        assert_eq!(
            Config::merge(&args, FileConfig::default()).unwrap().output,
            Output::None
        );
        let args = RunArgs {
            output: Some(Output::Json),
            ..args
        };
        assert_eq!(
            Config::merge(&args, FileConfig::default()).unwrap().output,
            Output::Json
        );
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: FileConfig = toml::from_str(
            "capture-bytes = 512\nports = [80]\nleak-after = \"5m\"\noutput = \"json\"",
        )
        .unwrap();
        let args = RunArgs {
            ports: vec![8080],
            ..RunArgs::default()
        };
        let c = Config::merge(&args, file).unwrap();
        assert_eq!(c.capture_bytes, 512);
        assert_eq!(c.ports, vec![8080]);
        assert_eq!(c.leak_after, Duration::from_secs(300));
        assert_eq!(c.output, Output::Json);
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let args = RunArgs {
            capture_bytes: Some(0),
            ..RunArgs::default()
        };
        let e = Config::merge(&args, FileConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("capture-bytes"), "{e}");
        let args = RunArgs {
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
            otlp_protocol: Some("thrift".into()),
            ..RunArgs::default()
        };
        assert!(Config::merge(&args, FileConfig::default()).is_err());
        assert!(toml::from_str::<FileConfig>("no-such-key = 1").is_err());
        // Durations that would overflow a deadline, or hold every span for
        // years, are refused with the limit.
        for (args, name) in [
            (
                RunArgs {
                    parent_wait: Some(Duration::from_secs(u64::MAX / 2)),
                    ..RunArgs::default()
                },
                "parent-wait must be at most 1m",
            ),
            (
                RunArgs {
                    leak_after: Some(Duration::from_secs(u64::MAX)),
                    ..RunArgs::default()
                },
                "leak-after must be longer than zero and at most 30days",
            ),
        ] {
            let e = Config::merge(&args, FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(name), "{e}");
        }
    }
}
