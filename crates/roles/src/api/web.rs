//! The web pages: the download page (`/`), a build's page (`/build/{key}`), its history
//! (`/build/{key}/history`) and the recent builds (`/recent`), with their scripts and
//! stylesheet under `/assets/`. Plain HTML, CSS and JavaScript modules from crates/roles/web,
//! compiled into the binary; the pages are shells that the scripts fill from the JSON API.
//!
//! Every page and asset carries a Content-Security-Policy that allows scripts, styles and
//! requests from this origin only (no inline script or style, no other origin, no framing),
//! and an ETag (a hash of the content) for revalidation.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::Digest;

use super::error::ApiError;

/// The policy of every page: nothing from anywhere but this origin, nothing inline.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// One embedded file: its bytes, content type and ETag.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

macro_rules! asset {
    ($file:literal, $type:expr) => {
        Asset {
            body: include_bytes!(concat!("../../web/", $file)),
            content_type: $type,
        }
    };
}

const INDEX: Asset = asset!("index.html", HTML);
const BUILD: Asset = asset!("build.html", HTML);
const HISTORY: Asset = asset!("history.html", HTML);
const RECENT: Asset = asset!("recent.html", HTML);

/// The files under `/assets/`.
fn asset(name: &str) -> Option<Asset> {
    Some(match name {
        "style.css" => asset!("style.css", CSS),
        "common.js" => asset!("common.js", JS),
        "download.js" => asset!("download.js", JS),
        "build.js" => asset!("build.js", JS),
        "history.js" => asset!("history.js", JS),
        "recent.js" => asset!("recent.js", JS),
        "icon.svg" => asset!("icon.svg", SVG),
        _ => return None,
    })
}

/// The names `/assets/{name}` serves (for tests and the OpenAPI document).
pub const ASSETS: [&str; 7] = [
    "style.css",
    "common.js",
    "download.js",
    "build.js",
    "history.js",
    "recent.js",
    "icon.svg",
];

/// Serves an embedded file with the security headers; 304 when the client has it.
fn serve(asset: &Asset, headers: &HeaderMap) -> Response {
    let etag = format!(
        "\"{}\"",
        &hex::encode(sha2::Sha256::digest(asset.body))[..32]
    );
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = resp.headers_mut();
    security_headers(h);
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    // Revalidated every time (the ETag makes that cheap): a new server version is seen at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The headers every page and asset carries.
pub fn security_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=()"),
    );
}

/// `GET /`: the download page.
pub async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

/// `GET /recent`: recent builds, live.
pub async fn recent(headers: HeaderMap) -> Response {
    serve(&RECENT, &headers)
}

/// `GET /build/{key}`: a build's page (any well-formed key: the page says when there is no
/// such build).
pub async fn build(Path(key): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    super::builds::parse_key(&key)?;
    Ok(serve(&BUILD, &headers))
}

/// `GET /build/{key}/history`: a build's history page.
pub async fn history(Path(key): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    super::builds::parse_key(&key)?;
    Ok(serve(&HISTORY, &headers))
}

/// `GET /assets/{name}`: a script or the stylesheet.
pub async fn assets(Path(name): Path<String>, headers: HeaderMap) -> Result<Response, ApiError> {
    match asset(&name) {
        Some(a) => Ok(serve(&a, &headers)),
        None => Err(ApiError::not_found(format!(
            "no asset {:?}; the assets are {}",
            name.chars().take(60).collect::<String>(),
            ASSETS.join(", ")
        ))),
    }
}
