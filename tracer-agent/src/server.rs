//! The agent's own HTTP endpoint: `/healthz` and `/metrics`.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use tokio_util::sync::CancellationToken;

use crate::{
    connections::DbConnectionRow, metrics::SharedRedMetrics, pipeline::SharedInventory,
    telemetry::Telemetry,
};

/// Connections of one process to one database destination.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct PoolRow {
    pub pid: u32,
    pub executable: String,
    pub db_system: String,
    pub server_address: String,
    pub server_port: u16,
    pub open: usize,
    pub used: usize,
    pub idle: usize,
    pub oldest_idle_seconds: f64,
    /// Connections with a leak reported.
    #[serde(default)]
    pub leaked: usize,
    /// The longest-idle leak: its kind, local port, culprit request and last query.
    #[serde(default)]
    pub worst_leak: Option<LeakSummary>,
}

/// The leak a pool row names.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct LeakSummary {
    pub kind: crate::pools::LeakKind,
    pub client_port: u16,
    pub idle_seconds: f64,
    /// `GET /path` of the request that last used the connection, when known.
    pub culprit: Option<String>,
    pub trace_id: Option<String>,
    pub last_query: Option<String>,
}

/// Groups connections into pools (process × destination), oldest idle first.
pub fn pools(rows: &[DbConnectionRow]) -> Vec<PoolRow> {
    let mut pools: Vec<PoolRow> = Vec::new();
    for r in rows {
        let i = match pools.iter().position(|p| {
            p.pid == r.pid && p.server_address == r.server_address && p.server_port == r.server_port
        }) {
            Some(i) => i,
            None => {
                pools.push(PoolRow {
                    pid: r.pid,
                    executable: r.executable.clone(),
                    db_system: r.db_system.to_string(),
                    server_address: r.server_address.clone(),
                    server_port: r.server_port,
                    open: 0,
                    used: 0,
                    idle: 0,
                    oldest_idle_seconds: 0.0,
                    leaked: 0,
                    worst_leak: None,
                });
                pools.len() - 1
            }
        };
        let p = &mut pools[i];
        p.open += 1;
        if r.state == "used" {
            p.used += 1;
        } else {
            p.idle += 1;
            p.oldest_idle_seconds = p.oldest_idle_seconds.max(r.idle_seconds);
        }
        if let Some(kind) = r.leak {
            p.leaked += 1;
            if p.worst_leak
                .as_ref()
                .is_none_or(|w| w.idle_seconds < r.idle_seconds)
            {
                p.worst_leak = Some(LeakSummary {
                    kind,
                    client_port: r.client_port,
                    idle_seconds: r.idle_seconds,
                    culprit: r
                        .culprit
                        .as_ref()
                        .map(|c| format!("{} {}", c.method, c.path)),
                    trace_id: r.last_trace_id.clone(),
                    last_query: r.last_query.clone(),
                });
            }
        }
    }
    // Leaking pools first (most leaks first), then the longest idle.
    pools.sort_by(|a, b| {
        b.leaked
            .cmp(&a.leaked)
            .then(b.oldest_idle_seconds.total_cmp(&a.oldest_idle_seconds))
    });
    pools
}

/// The agent's counters followed by the RED histograms, in one OpenMetrics document.
fn render(telemetry: &Telemetry, red: &SharedRedMetrics) -> String {
    let mut text = telemetry.render();
    let body_end = text.rfind("# EOF").unwrap_or(text.len());
    text.truncate(body_end);
    if let Ok(red) = red.lock() {
        red.render_prometheus(&mut text);
    }
    text.push_str("# EOF\n");
    text
}

pub fn router(
    telemetry: Arc<Telemetry>,
    red: SharedRedMetrics,
    inventory: SharedInventory,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/connections",
            get(move || {
                let rows = inventory.lock().map(|r| r.clone()).unwrap_or_default();
                async move {
                    axum::Json(serde_json::json!({ "pools": pools(&rows), "connections": rows }))
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = render(&telemetry, &red);
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response()
                }
            }),
        )
}

/// Binds `addr` (so a busy port fails at start, loudly) and serves until cancelled.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    telemetry: Arc<Telemetry>,
    red: SharedRedMetrics,
    inventory: SharedInventory,
    cancel: CancellationToken,
) {
    let app = router(telemetry, red, inventory);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        log::error!("agent HTTP endpoint stopped: {e}");
    }
}
