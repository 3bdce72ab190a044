//! Lists and watches this node's pods on the API server.
//!
//! One list (paged), then a watch from the list's `resourceVersion`; the watch is
//! renewed when it ends, and the whole cache is listed again when the server says
//! the version is too old (410 Gone), after any error, and every [`RESYNC`] so that
//! a missed event cannot last. Requests carry the service account token, read
//! anew each time (the kubelet rotates it).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::{Kube, KubeConfig, KubeCounters, pod::Pod, pod::PodObject};

/// A full list this often, whatever the watch said.
pub const RESYNC: Duration = Duration::from_secs(600);
/// Pods per list page.
const PAGE: usize = 250;
/// Longest list page read, in bytes (250 large pods).
const MAX_PAGE_BYTES: usize = 64 << 20;
/// Longest watch event read (the API server stores objects of at most 1.5 MiB).
const MAX_EVENT_BYTES: usize = 8 << 20;
/// How long the server keeps one watch open.
const WATCH_SECONDS: u64 = 290;
/// Longest wait for the next bytes of a watch (bookmarks come about every minute).
const WATCH_IDLE: Duration = Duration::from_secs(WATCH_SECONDS + 60);
/// Longest one list request takes.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Empty<Bytes>,
>;

/// Trust for an https API server: the cluster's CA when given (the service
/// account's `ca.crt`), else the system store.
fn tls(config: &KubeConfig) -> crate::tls::TlsFiles {
    crate::tls::TlsFiles {
        system_roots: config.ca_file.is_none(),
        ca_file: config.ca_file.clone(),
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid Kubernetes API URL {0:?}")]
    Url(String),
    #[error("cannot read the service account token {path}: {source}")]
    Token {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("Kubernetes API request failed: {0}")]
    Request(String),
    #[error("Kubernetes API answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("Kubernetes API response too large (over {0} bytes)")]
    TooLarge(usize),
    #[error("Kubernetes API request timed out")]
    Timeout,
    #[error("undecodable Kubernetes API response: {0}")]
    Decode(String),
    /// The watch's version is gone: list again.
    #[error("watch expired (410 Gone)")]
    Gone,
}

/// Checks the config can work at all (a clear error at start, not at first use).
pub fn validate(config: &KubeConfig) -> Result<(), ApiError> {
    let uri: hyper::Uri = config
        .api
        .parse()
        .map_err(|_| ApiError::Url(config.api.clone()))?;
    if uri.host().is_none() {
        return Err(ApiError::Url(config.api.clone()));
    }
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            tls(config)
                .client_config()
                .map_err(|e| ApiError::Request(e.to_string()))?;
        }
        _ => return Err(ApiError::Url(config.api.clone())),
    }
    if let Some(path) = &config.token_file {
        std::fs::read(path).map_err(|source| ApiError::Token {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

struct Api {
    client: HttpClient,
    base: String,
    token_file: Option<std::path::PathBuf>,
    selector: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default)]
    resource_version: String,
    #[serde(default, rename = "continue")]
    next: Option<String>,
}

#[derive(Deserialize)]
struct PodList {
    metadata: ListMeta,
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

/// A `metav1.Status`, as in error answers and watch ERROR events.
#[derive(Deserialize, Default)]
struct Status {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    message: String,
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Api {
    fn new(config: &KubeConfig) -> Result<Self, ApiError> {
        let connector = tls(config)
            .https_connector()
            .map_err(|e| ApiError::Request(e.to_string()))?;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        Ok(Self {
            client,
            base: config.api.trim_end_matches('/').to_string(),
            token_file: config.token_file.clone(),
            selector: percent_encode(&format!("spec.nodeName={}", config.node_name)),
        })
    }

    async fn get(
        &self,
        path_and_query: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ApiError> {
        let url = format!("{}{path_and_query}", self.base);
        let mut req = hyper::Request::get(url.as_str()).header("accept", "application/json");
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path).map_err(|source| ApiError::Token {
                path: path.clone(),
                source,
            })?;
            req = req.header("authorization", format!("Bearer {}", token.trim()));
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| ApiError::Request(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| ApiError::Request(crate::tls::error_chain(&e)))?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Ok(resp);
        }
        if status == 410 {
            return Err(ApiError::Gone);
        }
        // The message of a Status answer says why (Forbidden: which verb is missing).
        let body = read_limited(resp.into_body(), 64 << 10)
            .await
            .unwrap_or_default();
        let message = serde_json::from_slice::<Status>(&body)
            .map(|s| s.message)
            .unwrap_or_default();
        Err(ApiError::Status { status, message })
    }

    /// Every pod of this node, and the version to watch from.
    async fn list(&self) -> Result<(Vec<Pod>, String, usize), ApiError> {
        let mut pods = Vec::new();
        let mut undecodable = 0;
        let mut next: Option<String> = None;
        loop {
            let mut q = format!("/api/v1/pods?fieldSelector={}&limit={PAGE}", self.selector);
            if let Some(c) = &next {
                q.push_str(&format!("&continue={}", percent_encode(c)));
            }
            let resp = self.get(&q).await?;
            let body = read_limited(resp.into_body(), MAX_PAGE_BYTES).await?;
            let list: PodList =
                serde_json::from_slice(&body).map_err(|e| ApiError::Decode(e.to_string()))?;
            for item in list.items {
                match serde_json::from_value::<PodObject>(item)
                    .ok()
                    .and_then(Pod::from_object)
                {
                    Some(p) => pods.push(p),
                    None => undecodable += 1,
                }
            }
            match list.metadata.next.filter(|c| !c.is_empty()) {
                Some(c) => next = Some(c),
                None => return Ok((pods, list.metadata.resource_version, undecodable)),
            }
        }
    }
}

async fn read_limited(mut body: hyper::body::Incoming, max: usize) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::Request(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(ApiError::TooLarge(max));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// What one watch event does to the cache.
enum Applied {
    Changed,
    Bookmark,
    Undecodable,
}

fn apply(kube: &Kube, event: WatchEvent, version: &mut String) -> Result<Applied, ApiError> {
    let rv = event
        .object
        .pointer("/metadata/resourceVersion")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let applied = match event.kind.as_str() {
        "ADDED" | "MODIFIED" | "DELETED" => {
            let deleted = event.kind == "DELETED";
            match serde_json::from_value::<PodObject>(event.object)
                .ok()
                .and_then(Pod::from_object)
            {
                Some(p) if deleted => {
                    kube.update(|c| c.remove(&p.uid));
                    Applied::Changed
                }
                Some(p) => {
                    kube.update(|c| c.upsert(p));
                    Applied::Changed
                }
                None => Applied::Undecodable,
            }
        }
        "BOOKMARK" => Applied::Bookmark,
        "ERROR" => {
            let status: Status = serde_json::from_value(event.object).unwrap_or_default();
            return Err(if status.code == 410 {
                ApiError::Gone
            } else {
                ApiError::Status {
                    status: status.code,
                    message: status.message,
                }
            });
        }
        other => return Err(ApiError::Decode(format!("unknown watch event {other:?}"))),
    };
    if let Some(rv) = rv.filter(|v| !v.is_empty()) {
        *version = rv;
    }
    Ok(applied)
}

/// Watches from `version` until the watch ends (Ok: renew it) or fails.
async fn watch(
    api: &Api,
    kube: &Kube,
    version: &mut String,
    telemetry: &KubeCounters,
    cancel: &CancellationToken,
) -> Result<(), ApiError> {
    let q = format!(
        "/api/v1/pods?fieldSelector={}&watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={}",
        api.selector,
        percent_encode(version)
    );
    let mut body = api.get(&q).await?.into_body();
    let mut line: Vec<u8> = Vec::new();
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            f = tokio::time::timeout(WATCH_IDLE, body.frame()) => f.map_err(|_| ApiError::Timeout)?,
        };
        let Some(frame) = frame else { return Ok(()) };
        let frame = frame.map_err(|e| ApiError::Request(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let mut rest: &[u8] = &data;
        while let Some(nl) = memchr::memchr(b'\n', rest) {
            line.extend_from_slice(&rest[..nl]);
            rest = &rest[nl + 1..];
            if line.iter().all(u8::is_ascii_whitespace) {
                line.clear();
                continue;
            }
            let event: WatchEvent =
                serde_json::from_slice(&line).map_err(|e| ApiError::Decode(e.to_string()))?;
            line.clear();
            if let Applied::Undecodable = apply(kube, event, version)? {
                telemetry.pods_dropped.inc();
            }
            telemetry.pods.set(kube.pods() as i64);
        }
        if line.len() + rest.len() > MAX_EVENT_BYTES {
            return Err(ApiError::TooLarge(MAX_EVENT_BYTES));
        }
        line.extend_from_slice(rest);
    }
}

/// Keeps `kube` in step with the API server until cancelled.
pub async fn run(
    config: KubeConfig,
    kube: Kube,
    telemetry: KubeCounters,
    cancel: CancellationToken,
) {
    let api = match Api::new(&config) {
        Ok(api) => api,
        Err(e) => {
            log::error!("Kubernetes metadata off: {e}");
            return;
        }
    };
    let mut backoff = Duration::from_secs(1);
    let mut failing = false;
    while !cancel.is_cancelled() {
        let listed = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(LIST_TIMEOUT, api.list()) => r.unwrap_or(Err(ApiError::Timeout)),
        };
        let mut version = match listed {
            Ok((pods, version, undecodable)) => {
                let n = pods.len();
                let over = kube.update(|c| {
                    let before = c.over_limit;
                    c.replace_all(pods);
                    c.over_limit - before
                });
                telemetry.pods_dropped.inc_by(undecodable as u64 + over);
                telemetry.pods.set(kube.pods() as i64);
                if failing || !telemetry.listed.load(std::sync::atomic::Ordering::Acquire) {
                    log::info!(
                        "Kubernetes: {n} pods on node {} from {}",
                        config.node_name,
                        config.api
                    );
                }
                telemetry
                    .listed
                    .store(true, std::sync::atomic::Ordering::Release);
                failing = false;
                backoff = Duration::from_secs(1);
                version
            }
            Err(e) => {
                telemetry.api_errors.inc();
                if !failing {
                    log::warn!("Kubernetes: cannot list pods ({e}); retrying");
                }
                failing = true;
                sleep_or_cancel(&mut backoff, &cancel).await;
                continue;
            }
        };
        let resync_at = tokio::time::Instant::now() + RESYNC;
        while tokio::time::Instant::now() < resync_at && !cancel.is_cancelled() {
            match watch(&api, &kube, &mut version, &telemetry, &cancel).await {
                Ok(()) => {}
                Err(ApiError::Gone) => break,
                Err(e) => {
                    telemetry.api_errors.inc();
                    log::warn!("Kubernetes: pod watch failed ({e}); listing again");
                    sleep_or_cancel(&mut backoff, &cancel).await;
                    break;
                }
            }
        }
    }
}

async fn sleep_or_cancel(backoff: &mut Duration, cancel: &CancellationToken) {
    let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 4));
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(*backoff + jitter) => {}
    }
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_events_change_the_cache_and_move_the_version() {
        let kube = Kube::new("node-a", false);
        let mut version = "1".to_string();
        let ev = |json: &str| serde_json::from_str::<WatchEvent>(json).unwrap();
        let added = r#"{"type":"ADDED","object":{"kind":"Pod","metadata":{"name":"a","namespace":"n","uid":"u1","resourceVersion":"5"}}}"#;
        assert!(matches!(
            apply(&kube, ev(added), &mut version),
            Ok(Applied::Changed)
        ));
        assert_eq!((kube.pods(), version.as_str()), (1, "5"));
        let bookmark =
            r#"{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"9"}}}"#;
        assert!(matches!(
            apply(&kube, ev(bookmark), &mut version),
            Ok(Applied::Bookmark)
        ));
        assert_eq!(version, "9");
        let deleted = added.replace("ADDED", "DELETED").replace("\"5\"", "\"10\"");
        apply(&kube, ev(&deleted), &mut version).unwrap();
        assert_eq!((kube.pods(), version.as_str()), (0, "10"));
        let gone = r#"{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old resource version"}}"#;
        assert!(matches!(
            apply(&kube, ev(gone), &mut version),
            Err(ApiError::Gone)
        ));
        let junk = r#"{"type":"MODIFIED","object":{"metadata":{"name":"no-uid"}}}"#;
        assert!(matches!(
            apply(&kube, ev(junk), &mut version),
            Ok(Applied::Undecodable)
        ));
    }

    #[test]
    fn the_node_selector_is_encoded() {
        assert_eq!(
            percent_encode("spec.nodeName=ip-10-0-0-1.ec2"),
            "spec.nodeName%3Dip-10-0-0-1.ec2"
        );
    }
}
