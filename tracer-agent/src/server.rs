//! The agent's own HTTP endpoint: `/healthz` and `/metrics`.

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use tokio_util::sync::CancellationToken;

use crate::telemetry::Telemetry;

pub fn router(telemetry: Arc<Telemetry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let t = telemetry.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        t.render(),
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
    cancel: CancellationToken,
) {
    let app = router(telemetry);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
    {
        log::error!("agent HTTP endpoint stopped: {e}");
    }
}
