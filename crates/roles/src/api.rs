//! The HTTP API role. The foundation serves the health endpoints; the build endpoints come
//! with the API issue.

use std::future::IntoFuture;
use std::net::SocketAddr;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::App;

/// Binds the configured address.
pub async fn bind(config: &cbs_config::Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.api.listen)
        .await
        .with_context(|| format!("cannot listen on {} (api.listen)", config.api.listen))
}

/// The routes.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(app)
}

/// Serves until `shutdown`, then lets open requests finish for `api.shutdown_grace`.
pub async fn run(
    app: App,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let grace = app.config.api.shutdown_grace;
    info!(%addr, "api listening");
    let stop = shutdown.clone();
    let serve = axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { stop.cancelled().await });
    let mut serve = std::pin::pin!(serve.into_future());
    tokio::select! {
        r = &mut serve => r.context("api server")?,
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => warn!(?grace, "api connections still open after the grace period; closing"),
    }
    info!("api stopped");
    Ok(())
}

/// The process is alive.
async fn healthz() -> &'static str {
    "ok\n"
}

/// The database answers and the schema is current.
async fn readyz(State(app): State<App>) -> Response {
    match app.store.ready().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("not ready: {e}")),
    }
}

/// The error shape every client of caddyserver.com's API decodes.
pub fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({
        "status_code": status.as_u16(),
        "error": { "message": message },
    });
    (status, Json(body)).into_response()
}
