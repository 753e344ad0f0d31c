//! The HTTP API role (default port 8234). README's endpoint table describes every route (a
//! tidy test checks that it lists each one of [`router`]); here they are by file:
//!
//! - builds.rs: `POST /api/build` (JSON body or query parameters), `GET /api/build/{key}`
//!   (status, long-poll with `wait` and `after`), `GET /api/build/{key}/history`,
//!   `GET /api/events` (global audit feed), `GET /api/packages`, `GET /api/resolve` (what a
//!   request resolves to, recording nothing), `GET /api/options` (the choices a request has),
//!   `GET /api/artifacts/{sha256}` and `GET /api/artifacts?modules_sha256=` (builds by their
//!   binary's bytes, or by the modules it links);
//! - web.rs: the web pages `/`, `/build/{key}`, `/build/{key}/history`, `/recent` and their
//!   `/assets/{name}` (embedded; strict Content-Security-Policy);
//! - sse.rs: `GET /api/build/{key}/events` (progress as Server-Sent Events);
//! - download.rs: `GET|HEAD /api/build/{key}/download`, `/api/download/{key}` (the binary);
//!   `/api/build/{key}/download.minisig`, `download.sha256`, `provenance`,
//!   `provenance.minisig`, `reproduction`, `reproduction.minisig`; `GET /api/public-key`; `GET|HEAD /api/download?os&arch&p...` and
//!   `/api/compat?...` (caddyserver.com and the prototype: wait for the build, then the
//!   binary);
//! - admin.rs (admin scope): `POST /api/build/{key}/cancel`, `POST /api/build/{key}/reproduce`,
//!   `GET /api/admin/queue`,
//!   `GET /api/admin/workers`;
//! - openapi.rs: `GET /api/openapi.json` (the OpenAPI 3.1 document of every route);
//! - this file: `/healthz`, `/readyz`, the middleware (request ids, error shape, body
//!   deadline, connection limits) and serving.
//!
//! Every JSON body is a type of crates/api-types (wire.rs converts). Every error is
//! `{"error": {"id", "message"}, "status_code"}`; every response carries `x-request-id`.
//! Served with hyper-util so that slow request headers time out.

pub mod access;
mod admin;
mod builds;
mod download;
mod error;
mod fresh;
pub mod limit;
pub mod metrics;
mod openapi;
mod params;
mod sse;
mod web;
pub mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use cbs_goproxy::Resolver;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::App;
pub use builds::status_body;
pub use error::ApiError;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// Largest request head (request line and headers) read; beyond, hyper answers 431 itself
/// (no body, no request id) and closes the connection.
pub const MAX_HEAD: usize = 64 * 1024;

/// Middleware: a request body must arrive whole within `api.body_timeout` (408 and the
/// connection closed otherwise), so a client that trickles bodies holds no handler.
async fn body_deadline(
    State(timeout): State<Duration>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    if req.method() == axum::http::Method::GET || req.method() == axum::http::Method::HEAD {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
        Ok(Err(_)) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body exceeds the length limit of {MAX_BODY} bytes, or broke off"),
        )
        .into_response(),
        Err(_) => {
            let mut resp = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}",
                    humantime::format_duration(timeout)
                ),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
    }
}

/// What handlers share.
#[derive(Clone, Debug)]
pub struct ApiState {
    pub app: App,
    pub resolver: Arc<Resolver>,
    pub limiter: Option<Arc<limit::Limiter>>,
    pub fresh: Arc<fresh::FreshBuilds>,
    pub storage: cbs_storage::Storage,
    pub downloads: Arc<Downloads>,
    /// The signing public key in minisign's file format, if one is configured.
    pub public_key: Option<Arc<str>>,
    pub tokens: Arc<access::Tokens>,
    pub waits: Arc<limit::Waits>,
    pub package_counts: Arc<builds::PackageCounts>,
    pub caddy_versions: Arc<builds::CaddyVersions>,
    pub trusted_proxies: Arc<Vec<access::Cidr>>,
    /// Key of the hash that turns client addresses into the ids builds record (the
    /// deployment's id: the same in every api process, and not public). Read from the
    /// database on first use, so that the api starts (and /readyz answers) without it.
    pub client_salt: Arc<tokio::sync::OnceCell<String>>,
}

/// Binds the configured address, with a long accept queue: thousands of long-polls and
/// downloads may connect at once (the kernel caps it at net.core.somaxconn).
pub async fn bind(config: &cbs_config::Config) -> anyhow::Result<TcpListener> {
    let addr = config.api.listen;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .context("creating the api socket")?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot listen on {addr} (api.listen)"))?;
    socket
        .listen(8192)
        .with_context(|| format!("cannot listen on {addr} (api.listen)"))
}

/// The routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/build", post(builds::post_build))
        .route("/api/build/{key}", get(builds::get_build))
        .route("/api/build/{key}/history", get(builds::history))
        .route("/api/build/{key}/output", get(builds::output))
        .route("/api/build/{key}/cancel", post(admin::cancel))
        .route("/api/build/{key}/reproduce", post(admin::reproduce))
        .route("/api/admin/queue", get(admin::queue))
        .route("/api/admin/workers", get(admin::workers))
        .route("/api/build/{key}/events", get(sse::events))
        .route("/api/build/{key}/download", get(download::by_key))
        .route(
            "/api/build/{key}/download.minisig",
            get(download::companion_file::<{ download::SIGNATURE }>),
        )
        .route(
            "/api/build/{key}/download.sha256",
            get(download::companion_file::<{ download::CHECKSUM }>),
        )
        .route(
            "/api/build/{key}/provenance",
            get(download::companion_file::<{ download::PROVENANCE }>),
        )
        .route(
            "/api/build/{key}/provenance.minisig",
            get(download::companion_file::<{ download::PROVENANCE_SIGNATURE }>),
        )
        .route(
            "/api/build/{key}/reproduction",
            get(download::companion_file::<{ download::REPRODUCTION }>),
        )
        .route(
            "/api/build/{key}/reproduction.minisig",
            get(download::companion_file::<{ download::REPRODUCTION_SIGNATURE }>),
        )
        .route("/api/public-key", get(download::public_key))
        .route("/api/download/{key}", get(download::by_key))
        .route("/api/download", get(download::compat))
        .route("/api/compat", get(download::compat))
        .route("/api/events", get(builds::feed))
        .route("/api/packages", get(builds::packages))
        .route("/api/resolve", get(builds::resolve))
        .route("/api/options", get(builds::options))
        .route("/api/artifacts", get(builds::by_modules))
        .route("/api/artifacts/{sha256}", get(builds::by_artifact))
        .route("/", get(web::index))
        .route("/recent", get(web::recent))
        .route("/build/{key}", get(web::build))
        .route("/build/{key}/history", get(web::history))
        .route("/assets/{name}", get(web::assets))
        .route("/api/openapi.json", get(openapi::serve))
        .route("/metrics", get(metrics::serve))
        .route_layer(axum::middleware::from_fn(metrics::matched))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.app.config.api.body_timeout,
            body_deadline,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.tokens.clone(),
            access::read_access,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.trusted_proxies.clone(),
            access::real_client,
        ))
        .layer(axum::middleware::from_fn(request_id))
        .layer(axum::middleware::from_fn(metrics::track))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see the README for the API")
}

/// Gives every request an id (`x-request-id`), and every error answer the JSON error shape
/// with that id, including errors made by the framework (unknown method, too large a body).
///
/// Everything logged while the request is handled is in its span, `http` with `request.id`
/// (the id the error JSON shows), method and path: an error a user reports is found in the
/// logs by its id. The request's end is logged too: at info for client errors, warn for
/// server errors, debug otherwise.
async fn request_id(req: axum::extract::Request, next: Next) -> Response {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let id = format!(
        "{:x}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    // The path only (a query string may hold anything); at most 200 bytes of it.
    let path = req.uri().path();
    let mut end = path.len().min(200);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    let path = &path[..end];
    let span = tracing::info_span!("http", request.id = %id, method = %req.method(), path);
    let start = std::time::Instant::now();
    let mut resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let status = resp.status();
    let took_ms = start.elapsed().as_millis() as u64;
    span.in_scope(|| {
        if status.is_server_error() {
            warn!(status = status.as_u16(), took_ms, "request failed");
        } else if status.is_client_error() {
            info!(status = status.as_u16(), took_ms, "request refused");
        } else {
            tracing::debug!(status = status.as_u16(), took_ms, "request answered");
        }
    });
    if status.is_client_error() || status.is_server_error() {
        let is_json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, MAX_BODY)
            .await
            .unwrap_or_default();
        let message = if is_json {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_default()
        } else {
            String::from_utf8_lossy(&bytes).trim().to_owned()
        };
        let message = if message.is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            message
        };
        let mut shaped = error::error_response(status, &message, Some(&id));
        for (name, value) in parts.headers.iter() {
            if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                shaped.headers_mut().insert(name.clone(), value.clone());
            }
        }
        // What the layers outside learn from the answer (the metrics' route template).
        *shaped.extensions_mut() = parts.extensions;
        resp = shaped;
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Records when builds were last downloaded (what artifact retention goes by), at most once
/// an hour per build and process, in the background.
#[derive(Debug, Default)]
pub struct Downloads {
    recorded: std::sync::Mutex<std::collections::HashMap<cbs_domain::BuildKey, std::time::Instant>>,
}

impl Downloads {
    const EVERY: Duration = Duration::from_secs(3600);

    pub fn touch(&self, store: &cbs_store::Store, key: &cbs_domain::BuildKey) {
        {
            let mut m = self.recorded.lock().expect("downloads lock");
            if m.get(key).is_some_and(|t| t.elapsed() < Self::EVERY) {
                return;
            }
            if m.len() > 100_000 {
                m.retain(|_, t| t.elapsed() < Self::EVERY);
            }
            m.insert(key.clone(), std::time::Instant::now());
        }
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move {
            if let Err(e) = store.record_download(&key).await {
                tracing::warn!(build.key = %key, error = %e, "cannot record a download");
            }
        });
    }
}

/// Reads the public key the api serves (it never needs the secret key). Checked as a
/// minisign public key; a missing or bad file is logged and `/api/public-key` answers 503.
async fn load_public_key(signing: &cbs_config::SigningConfig) -> Option<Arc<str>> {
    let path = signing.public_key_path();
    match tokio::fs::read_to_string(&path).await {
        Ok(text) if cbs_signing::parse_public_key(&text).is_ok() => Some(text.into()),
        Ok(_) => {
            tracing::error!(path = %path.display(), "signing public key file is not a minisign public key");
            None
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no signing public key: GET /api/public-key answers 503");
            None
        }
    }
}

/// Serves until `shutdown`, then lets open requests finish for `api.shutdown_grace`.
pub async fn run(
    app: App,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr: SocketAddr = listener.local_addr()?;
    let resolver =
        Resolver::new(&app.proxy_config(app.config.go.cache_ttl)?).context("go.proxy")?;
    let grace = app.config.api.shutdown_grace;
    let header_timeout = app.config.api.header_read_timeout;
    let app_connections_per_client = app.config.api.max_connections_per_client;
    let app_max_connections = app.config.api.max_connections;
    let limiter = limit::Limiter::new(
        app.config.api.submissions_per_minute,
        app.config.api.submission_burst,
    )
    .map(Arc::new);
    let storage = cbs_storage::Storage::connect(&app.config.storage)
        .await
        .context("artifact storage")?;
    let public_key = load_public_key(&app.config.signing).await;
    let tokens = Arc::new(access::Tokens::new(&app.config.access)?);
    let trusted_proxies = app
        .config
        .api
        .trusted_proxies
        .iter()
        .map(|c| c.parse::<access::Cidr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("api.trusted_proxies: {e}"))?;
    let trusted = trusted_proxies.clone();
    let router = router(ApiState {
        client_salt: Arc::default(),
        tokens,
        package_counts: Arc::new(builds::PackageCounts::default()),
        caddy_versions: Arc::new(builds::CaddyVersions::default()),
        waits: Arc::new(limit::Waits::new(
            app.config.api.max_waits_per_client,
            app.config.api.max_waits,
        )),
        trusted_proxies: Arc::new(trusted_proxies),
        app,
        resolver: Arc::new(resolver),
        limiter,
        fresh: Arc::new(fresh::FreshBuilds::default()),
        storage,
        downloads: Arc::new(Downloads::default()),
        public_key,
    });
    // Open connections, per client and in total: beyond, a new connection is closed at
    // once (before any byte of it is read).
    let connections = Arc::new(limit::Waits::new(
        app_connections_per_client,
        app_max_connections,
    ));
    info!(%addr, "api listening");
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // A trusted proxy carries many clients: it is counted only in the total.
        let per_client = (!trusted.iter().any(|c| c.contains(peer.ip()))).then_some(peer.ip());
        let Ok(held) = connections.open(per_client) else {
            cbs_metrics::metrics().refused("connections");
            drop(stream);
            continue;
        };
        let client = limit::ClientAddr(peer.ip());
        let service =
            hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
                router.clone(),
                move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(client);
                    req
                },
            ));
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .max_buf_size(MAX_HEAD);
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _held = held;
            let _ = conn.await;
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => warn!(?grace, "api connections still open after the grace period; closing"),
    }
    info!("api stopped");
    Ok(())
}

/// Opens a waiting request for `client`: 429 when the client holds too many, 503 with
/// `Retry-After` when the server does.
pub fn open_wait(
    state: &ApiState,
    client: Option<&limit::ClientAddr>,
    kind: &'static str,
) -> Result<limit::WaitGuard, ApiError> {
    let ip = client.map(|c| c.0);
    let metrics = cbs_metrics::metrics();
    state.waits.open(ip).map(|w| w.counted(kind)).map_err(|refused| match refused {
        limit::WaitRefused::Client(n) => {
            metrics.refused("waits_client");
            ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many open waits from {}: at most {n} long-polls, event streams and download waits at once",
                ip.map(limit::client_key).map(|i| i.to_string()).unwrap_or_default()
            ),
        )
        }
        limit::WaitRefused::Server(_) => {
            metrics.refused("waits_server");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server holds as many waiting requests as it can; try again in 5 s",
            )
            .retry_after(5)
        }
    })
}

/// The process is alive.
async fn healthz() -> &'static str {
    "ok\n"
}

/// The database answers and the schema is current.
async fn readyz(State(state): State<ApiState>) -> Response {
    match state.app.store.ready().await {
        Ok(()) => "ready\n".into_response(),
        // Our own word on the schema is shown; a database error is for the operators'
        // log, not for anyone who asks (it can name hosts, users and databases).
        Err(e @ cbs_store::StoreError::Migration(_)) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}"))
                .retry_after(5)
                .into_response()
        }
        Err(e) => {
            warn!(error = %e, "not ready");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: the database is unavailable",
            )
            .retry_after(5)
            .into_response()
        }
    }
}
