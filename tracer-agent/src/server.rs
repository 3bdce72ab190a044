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
    }
    pools.sort_by(|a, b| b.oldest_idle_seconds.total_cmp(&a.oldest_idle_seconds));
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
