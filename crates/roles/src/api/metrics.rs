//! `GET /metrics` (Prometheus), the HTTP metrics middleware, and the metrics listener of
//! the roles without an HTTP port (worker, janitor), which also answers `GET /healthz`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{MatchedPath, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::ApiState;
use crate::App;

/// A scrape waits at most this long for the queue's figures; then it answers without them
/// (and counts `cbs_queue_read_errors_total`), so a slow database does not fail the scrape.
const QUEUE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The route template a request matched, carried on its response to [`track`].
#[derive(Clone, Debug)]
struct Route(String);

/// Route layer: tells [`track`] which route template answered.
pub async fn matched(
    path: Option<MatchedPath>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let mut resp = next.run(req).await;
    if let Some(p) = path {
        resp.extensions_mut().insert(Route(p.as_str().to_owned()));
    }
    resp
}

/// Outermost middleware: counts every answer by route template, method and status, and
/// times it to its headers. Methods outside the standard set are one label value
/// (`other`): a client cannot create label values.
pub async fn track(req: axum::extract::Request, next: Next) -> Response {
    let method = match *req.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let start = Instant::now();
    let resp = next.run(req).await;
    let route = resp
        .extensions()
        .get::<Route>()
        .map_or_else(|| "unmatched".to_owned(), |r| r.0.clone());
    let m = cbs_metrics::metrics();
    m.http_requests
        .get_or_create(&cbs_metrics::HttpLabels {
            route: route.clone(),
            method: method.to_owned(),
            status: resp.status().as_u16(),
        })
        .inc();
    m.http_duration
        .get_or_create(&cbs_metrics::RouteLabels {
            route,
            method: method.to_owned(),
        })
        .observe(start.elapsed().as_secs_f64());
    resp
}

/// Reads the queue's figures into the gauges (at most [`QUEUE_READ_TIMEOUT`]).
async fn read_queue(app: &App) {
    let m = cbs_metrics::metrics();
    match tokio::time::timeout(QUEUE_READ_TIMEOUT, app.store.queue_stats()).await {
        Ok(Ok(q)) => m.set_queue(
            q.queued,
            q.running,
            q.oldest_wait_seconds
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64),
        ),
        Ok(Err(e)) => {
            m.queue_read_errors.inc();
            warn!(error = %e, "metrics: cannot read the queue");
        }
        Err(_) => {
            m.queue_read_errors.inc();
            warn!("metrics: reading the queue timed out");
        }
    }
}

/// The metrics in the text format.
async fn exposition(app: &App) -> Response {
    read_queue(app).await;
    let mut resp = cbs_metrics::metrics().encode().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(cbs_metrics::CONTENT_TYPE),
    );
    resp
}

/// `GET /metrics` on the api's port.
pub async fn serve(State(state): State<ApiState>) -> Response {
    exposition(&state.app).await
}

/// Serves `GET /metrics` on `metrics.listen` (worker and janitor roles) until `shutdown`;
/// nothing when no listener is configured.
pub async fn listener(app: App, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Some(addr) = app
        .config
        .metrics
        .listen_addr()
        .map_err(|e| anyhow::anyhow!(e))?
    else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?;
    serve_on(app, listener, shutdown).await
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve_on(
    app: App,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let router = Router::new()
        .route(
            "/metrics",
            get(|State(app): State<App>| async move { exposition(&app).await }),
        )
        // The container's HEALTHCHECK (`caddy-build-server healthcheck`): the process runs.
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(app);
    info!(%addr, "metrics listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("metrics listener")
}
