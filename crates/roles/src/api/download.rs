//! Artifact downloads: by key, and caddyserver.com's `/api/download` (also `/api/compat`),
//! which waits until the build is done. Files are streamed (never read whole into memory),
//! with Content-Length, an ETag (the sha256), and single-range requests.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cbs_domain::artifact as layout;
use cbs_events::FailureKind;
use cbs_projections::{BuildState, Status};

use super::builds::{parse_key, submit};
use super::error::ApiError;
use super::{params, ApiState};

/// `GET|HEAD /api/build/{key}/download` and `/api/download/{key}`.
pub async fn by_key(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = parse_key(&key)?;
    let build = state
        .app
        .store
        .build(&key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no build with key {key}")))?;
    answer(&state, &build, &method, &headers).await
}

/// What a download request gets for a build in any state.
async fn answer(
    state: &ApiState,
    build: &BuildState,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    match build.status {
        Status::Succeeded => serve_artifact(state, build, method, headers).await,
        Status::Failed | Status::GaveUp | Status::Cancelled if build.is_terminal() => {
            Err(failed(build))
        }
        Status::Expired => Err(ApiError::new(
            StatusCode::GONE,
            format!(
                "the files of build {} were deleted after a long time without downloads; request the build again (POST /api/build or /api/download) to rebuild it",
                build.key
            ),
        )),
        _ => Ok((
            StatusCode::ACCEPTED,
            Json(super::wire::build_envelope(build)),
        )
            .into_response()),
    }
}

/// The error of a build that ended without a binary.
fn failed(build: &BuildState) -> ApiError {
    let (status, message) = match (&build.last_error, build.status) {
        (_, Status::Cancelled) => (StatusCode::GONE, "the build was cancelled".to_owned()),
        (Some(e), Status::GaveUp) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the build failed {} times and was given up; last error: {}",
                build.failures, e.message
            ),
        ),
        (Some(e), _) if e.kind == FailureKind::Permanent => (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the build failed: {}", e.message),
        ),
        (Some(e), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the build failed and will be retried: {}", e.message),
        ),
        (None, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the build failed".to_owned(),
        ),
    };
    ApiError::new(status, message)
}

/// A single byte range of a `Range` header; `None` means serve the whole file.
fn parse_range(value: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // several ranges: the whole file is a valid answer
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", "") => return Err(()),
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (s, "") => (s.parse().map_err(|_| ())?, size.saturating_sub(1)),
        (s, e) => {
            let (s, e): (u64, u64) = (s.parse().map_err(|_| ())?, e.parse().map_err(|_| ())?);
            (s, e.min(size.saturating_sub(1)))
        }
    };
    if size == 0 || start > end || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

async fn serve_artifact(
    state: &ApiState,
    build: &BuildState,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let artifact = build
        .artifact
        .as_ref()
        .ok_or_else(|| ApiError::internal("artifact", "succeeded build without artifact"))?;
    let name = artifact
        .files
        .first()
        .map(String::as_str)
        .unwrap_or_else(|| build.request.platform().binary_name());
    let object_key = layout::stored_file(&artifact.location, name);
    let etag = format!("\"{}\"", artifact.sha256);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let s3 = &state.app.config.storage.s3;
    if s3.presign_downloads && method == Method::GET {
        if let Some(url) = state
            .storage
            .presign_get(&object_key, s3.presign_ttl, name)
            .await
            .map_err(|e| storage_error(build, e))?
        {
            // A download all the same: retention must not expire what people fetch.
            state.downloads.touch(&state.app.store, &build.key);
            return Ok((
                StatusCode::FOUND,
                [
                    (header::LOCATION, url),
                    (header::CACHE_CONTROL, "no-store".to_owned()),
                    (
                        header::HeaderName::from_static("x-caddy-build-key"),
                        build.key.to_string(),
                    ),
                ],
            )
                .into_response());
        }
    }
    let size = artifact.size;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) => match parse_range(r, size) {
            Ok(r) => r,
            Err(()) => {
                let mut resp = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!("range {r:?} is not satisfiable for {size} bytes"),
                )
                .into_response();
                resp.headers_mut().insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
                );
                return Ok(resp);
            }
        },
        None => None,
    };
    let (status, start, len) = match range {
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        None => (StatusCode::OK, 0, size),
    };
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename={name}"),
        )
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
        .header("x-caddy-build-key", build.key.as_str())
        .header("x-checksum-sha256", &artifact.sha256);
    if let Some((s, e)) = range {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {s}-{e}/{size}"));
    }
    if method == Method::GET {
        state.downloads.touch(&state.app.store, &build.key);
    }
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        let object = state
            .storage
            .get(&object_key, Some((start, len)))
            .await
            .map_err(|e| storage_error(build, e))?;
        Body::from_stream(object.body)
    };
    builder
        .body(body)
        .map_err(|e| ApiError::internal("response", e))
}

/// A storage failure while serving a succeeded build's file.
fn storage_error(build: &BuildState, e: cbs_storage::StorageError) -> ApiError {
    if e.is_not_found() {
        // A succeeded build always has its files; this one's were removed from storage.
        tracing::error!(build.key = %build.key, error = %e, "a published file is missing from storage");
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the files of build {} are missing from artifact storage; the operators were alerted",
                build.key
            ),
        );
    }
    ApiError::internal("artifact storage", e)
}

/// The companion files of an artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Companion {
    Signature,
    Checksum,
    Provenance,
    ProvenanceSignature,
    /// The second builder's statement of the latest matched reproduction.
    Reproduction,
    ReproductionSignature,
}

impl Companion {
    /// The stored file's name, the download's file name and its content type.
    fn file(self, binary: &str) -> (String, String, &'static str) {
        match self {
            Companion::Signature => {
                let n = layout::signature_of(binary);
                (n.clone(), n, "text/plain; charset=utf-8")
            }
            Companion::Checksum => {
                let n = layout::checksum_of(binary);
                (n.clone(), n, "text/plain; charset=utf-8")
            }
            Companion::Provenance => (
                layout::PROVENANCE.to_owned(),
                layout::PROVENANCE.to_owned(),
                "application/vnd.in-toto+json",
            ),
            Companion::ProvenanceSignature => {
                let n = layout::signature_of(layout::PROVENANCE);
                (n.clone(), n, "text/plain; charset=utf-8")
            }
            // Named by the reproduction (see `companion`).
            Companion::Reproduction | Companion::ReproductionSignature => {
                (String::new(), String::new(), "")
            }
        }
    }
}

/// A companion file of a build: 202 while it builds, the build's error if it failed.
async fn companion(
    state: &ApiState,
    key: &str,
    which: Companion,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let key = parse_key(key)?;
    let build = state
        .app
        .store
        .build(&key)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no build with key {key}")))?;
    if build.status != Status::Succeeded {
        return answer(state, &build, method, headers).await;
    }
    let artifact = build
        .artifact
        .as_ref()
        .ok_or_else(|| ApiError::internal("artifact", "succeeded build without artifact"))?;
    let binary = artifact
        .files
        .first()
        .map(String::as_str)
        .unwrap_or_else(|| build.request.platform().binary_name());
    let (stored, download, content_type) = match which {
        Companion::Reproduction | Companion::ReproductionSignature => {
            let statement = build
                .reproduction
                .as_ref()
                .filter(|r| r.status == cbs_projections::ReproductionStatus::Matched)
                .and_then(|r| r.files.first())
                .ok_or_else(|| {
                    ApiError::not_found(format!(
                        "build {key} has no matched reproduction: no second builder has stated that it built the same bytes"
                    ))
                })?;
            if which == Companion::Reproduction {
                (
                    statement.clone(),
                    statement.clone(),
                    "application/vnd.in-toto+json",
                )
            } else {
                let n = layout::signature_of(statement);
                (n.clone(), n, "text/plain; charset=utf-8")
            }
        }
        _ => which.file(binary),
    };
    let known = match which {
        Companion::Reproduction | Companion::ReproductionSignature => build
            .reproduction
            .as_ref()
            .is_some_and(|r| r.files.contains(&stored)),
        _ => artifact.files.contains(&stored),
    };
    if !known {
        return Err(ApiError::not_found(format!(
            "build {key} was published before artifacts were signed: it has no {stored}"
        )));
    }
    let bytes = state
        .storage
        .get(&layout::stored_file(&artifact.location, &stored), None)
        .await
        .map_err(|e| storage_error(&build, e))?
        .bytes(16 * 1024 * 1024)
        .await
        .map_err(|e| storage_error(&build, e))?;
    let mut resp = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename={download}"),
        )
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
        .header("x-caddy-build-key", build.key.as_str());
    if method == Method::HEAD {
        resp = resp.header(header::CONTENT_LENGTH, bytes.len());
    }
    resp.body(if method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(bytes)
    })
    .map_err(|e| ApiError::internal("response", e))
}

/// Route parameters of [`companion_file`].
pub const SIGNATURE: u8 = 0;
pub const CHECKSUM: u8 = 1;
pub const PROVENANCE: u8 = 2;
pub const PROVENANCE_SIGNATURE: u8 = 3;
pub const REPRODUCTION: u8 = 4;
pub const REPRODUCTION_SIGNATURE: u8 = 5;

/// `GET|HEAD /api/build/{key}/download.minisig` (`W` = [`SIGNATURE`]), `download.sha256`
/// ([`CHECKSUM`]: `<sha256>  caddy`, for `sha256sum -c`), `provenance` ([`PROVENANCE`]: the
/// in-toto statement) and `provenance.minisig` ([`PROVENANCE_SIGNATURE`]); `reproduction`
/// ([`REPRODUCTION`]: the statement a second builder signed about the same binary, after a
/// matched reproduction) and `reproduction.minisig` ([`REPRODUCTION_SIGNATURE`]).
pub async fn companion_file<const W: u8>(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let which = match W {
        SIGNATURE => Companion::Signature,
        CHECKSUM => Companion::Checksum,
        PROVENANCE => Companion::Provenance,
        PROVENANCE_SIGNATURE => Companion::ProvenanceSignature,
        REPRODUCTION => Companion::Reproduction,
        _ => Companion::ReproductionSignature,
    };
    companion(&state, &key, which, &method, &headers).await
}

/// `GET /api/public-key`: the signing public key, in minisign's file format.
pub async fn public_key(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let key = state.public_key.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server has no signing public key configured (signing.public_key_file)",
        )
    })?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        key.to_string(),
    )
        .into_response())
}

/// `GET|HEAD /api/download?os&arch&arm&p=...` and `/api/compat?...&version&r=...`: resolve,
/// request (once per key), wait until the build is done, then stream the binary. A client
/// that disconnects does not cancel the build.
pub async fn compat(
    State(state): State<ApiState>,
    client: Option<axum::Extension<super::limit::ClientAddr>>,
    RawQuery(query): RawQuery,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = state.tokens.submitter(&headers)?;
    let parsed = params::from_query(query.as_deref())?;
    // The request is a download wait: its place is taken before anything is recorded, so
    // that a client refused for holding too many waits (429) has queued no build.
    let _wait = super::open_wait(&state, client.as_deref(), "download")?;
    let build = submit(&state, parsed, &caller, client.as_deref()).await?;
    let key = build.key.clone();
    let mut waiter = state.app.hub.watch_build(&key);
    let deadline = tokio::time::Instant::now() + state.app.config.api.download_wait;
    let mut build = build;
    loop {
        let waiting = matches!(build.status, Status::Queued | Status::Running)
            || (build.status == Status::Failed && !build.is_terminal());
        if !waiting {
            return answer(&state, &build, &method, &headers).await;
        }
        if tokio::time::Instant::now() >= deadline {
            // Caddy's CLI writes any answer below 400 to disk as the new executable: a wait
            // that ran out is an error with the error JSON, never a 202 status body.
            return Ok(not_ready(&state, &build));
        }
        tokio::select! {
            _ = waiter.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
        // The database may be away: the wait is what the client asked for, so reads are
        // retried until the deadline.
        build = loop {
            match state.app.store.build(&key).await {
                Ok(b) => break b.ok_or_else(|| ApiError::not_found("build vanished"))?,
                Err(e)
                    if tokio::time::Instant::now() + super::builds::READ_RETRY_PAUSE < deadline =>
                {
                    tracing::warn!(build.key = %key, error = %e, "download wait: read failed; trying again");
                    tokio::time::sleep(super::builds::READ_RETRY_PAUSE).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
    }
}

/// `/api/download` and `/api/compat` after their wait ran out: 503 with `Retry-After` and
/// the error JSON (Caddy's CLI prints the message).
fn not_ready(state: &ApiState, build: &BuildState) -> Response {
    let retry = state.app.config.api.download_retry_after.as_secs().max(1);
    let mut resp = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the build {} is still {} after waiting {}; try again in {retry} s (the build goes on; GET /api/build/{} shows its progress)",
            build.key,
            super::builds::status_name(build.status),
            humantime::format_duration(state.app.config.api.download_wait),
            build.key,
        ),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
    if let Ok(v) = HeaderValue::from_str(build.key.as_str()) {
        resp.headers_mut().insert("x-caddy-build-key", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    proptest::proptest! {
        #![proptest_config(crate::fuzz_config())]

        /// Any Range header and size: a range inside the file, the whole file, or 416; never
        /// a panic (property test; CBS_FUZZ_CASES sets the number of inputs).
        #[test]
        fn any_range_header(
            value in proptest::prop_oneof![
                "bytes=[0-9]{0,21}-[0-9]{0,21}",
                "bytes= ?-?[0-9]{0,5} ?(-|,)? ?[0-9]{0,5}",
                proptest::prelude::any::<String>(),
            ],
            size in proptest::prop_oneof![0u64..4, proptest::prelude::any::<u64>()],
        ) {
            if let Ok(Some((start, end))) = parse_range(&value, size) {
                proptest::prop_assert!(start <= end && end < size, "{} of {}: {}-{}", value, size, start, end);
            }
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=0-1000", 100), Ok(Some((0, 99))));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=5-1", 100), Err(()));
        assert_eq!(parse_range("bytes=x-1", 100), Err(()));
        assert_eq!(parse_range("bytes=-0", 100), Err(()));
    }
}
