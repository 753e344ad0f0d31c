//! A module proxy for tests: the fixture modules served over HTTP on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// A running fixture proxy; stops when dropped.
#[derive(Debug)]
pub struct FixtureProxy {
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FixtureProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FixtureProxy {
    /// Writes the fixtures and serves them on 127.0.0.1 (a free port).
    pub async fn start() -> FixtureProxy {
        FixtureProxy::start_on("127.0.0.1:0".parse().expect("addr")).await
    }

    /// The same on a given address (to bring a "down" proxy up).
    pub async fn start_on(addr: SocketAddr) -> FixtureProxy {
        let dir = tempfile::tempdir().expect("temp dir");
        crate::fixtures::write_proxy(dir.path()).expect("write fixture proxy");
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind fixture proxy");
        let addr = listener.local_addr().expect("addr");
        let root = dir.path().to_owned();
        let app = axum::Router::new().fallback(serve).with_state(root);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FixtureProxy {
            addr,
            _dir: dir,
            task,
        }
    }

    /// The GOPROXY URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The proxy's files (for GOPROXY=file:// or inspection).
    pub fn root(&self) -> &Path {
        self._dir.path()
    }
}

/// Percent-decodes a URL path (Go sends `!` as `%21`).
fn decode(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

async fn serve(State(root): State<PathBuf>, uri: Uri) -> Response {
    let Some(path) = decode(uri.path()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let path = path.trim_start_matches('/');
    if path.split('/').any(|p| p == ".." || p.is_empty()) {
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(root.join(path)).await {
        Ok(bytes) => bytes.into_response(),
        Err(_) => (StatusCode::NOT_FOUND, format!("not found: {path}")).into_response(),
    }
}
