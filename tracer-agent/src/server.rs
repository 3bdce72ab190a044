//! The agent's own HTTP endpoint: `/healthz` (200 `ok`, or 503 and why),
//! `/metrics` and `/connections`.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use tokio_util::sync::CancellationToken;

use crate::{
    metrics::SharedRedMetrics, pipeline::SharedInventory, pools::inventory::pools,
    telemetry::Telemetry,
};

/// The agent's counters followed by the RED histograms, in one OpenMetrics document.
fn render(telemetry: &Telemetry, red: &SharedRedMetrics) -> String {
    let mut text = telemetry.render();
    let body_end = text.rfind("# EOF").unwrap_or(text.len());
    text.truncate(body_end);
    crate::export::prometheus::render(&crate::sync::lock(red), &mut text);
    text.push_str("# EOF\n");
    text
}

pub fn router(
    telemetry: Arc<Telemetry>,
    red: SharedRedMetrics,
    inventory: SharedInventory,
) -> Router {
    let health = telemetry.clone();
    Router::new()
        .route(
            "/healthz",
            get(move || {
                let problems = health.health.problems();
                async move {
                    if problems.is_empty() {
                        (axum::http::StatusCode::OK, "ok\n".to_string())
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            format!("unhealthy: {}\n", problems.join("; ")),
                        )
                    }
                }
            }),
        )
        .route(
            "/connections",
            get(move || {
                let rows = crate::sync::lock(&inventory).clone();
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
