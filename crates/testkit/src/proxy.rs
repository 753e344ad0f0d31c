//! A module proxy for tests: the fixture modules served over HTTP on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// A running fixture proxy; stops when dropped.
#[derive(Debug)]
pub struct FixtureProxy {
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
    gate: Arc<Gate>,
    /// With HTTPS: the CA certificate (PEM) that signed the proxy's certificate.
    ca: Option<PathBuf>,
    https: bool,
}

/// The proxy's TLS settings: its certificate and key from `dir` (proxy.crt, proxy.key).
fn tls_config(dir: &Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(dir.join("proxy.crt"))
        .expect("proxy.crt")
        .collect::<Result<Vec<_>, _>>()
        .expect("proxy.crt");
    let key = PrivateKeyDer::from_pem_file(dir.join("proxy.key")).expect("proxy.key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("proxy certificate");
    Arc::new(config)
}

/// Serves `app` over TLS, one task per connection.
async fn serve_https(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Arc<rustls::ServerConfig>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Holds the go command's requests while closed (the api's resolver is not held).
#[derive(Debug, Default)]
struct Gate {
    closed: AtomicBool,
    /// Told when a request is being held.
    holding: tokio::sync::Notify,
    /// Told when the gate opens.
    opened: tokio::sync::Notify,
    /// Module zips the go command asked for.
    module_files: std::sync::atomic::AtomicUsize,
}

#[derive(Debug, Clone)]
struct ProxyState {
    root: PathBuf,
    /// The `Authorization` header every request must carry, if any.
    auth: Option<String>,
    gate: Arc<Gate>,
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
        FixtureProxy::serve(addr, None, None).await
    }

    /// A proxy that answers only requests with these basic-auth credentials (401 with a
    /// `WWW-Authenticate` challenge otherwise).
    pub async fn start_with_auth(user: &str, password: &str) -> FixtureProxy {
        let auth = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
        FixtureProxy::serve("127.0.0.1:0".parse().expect("addr"), Some(auth), None).await
    }

    /// From now on, holds requests of the go command (User-Agent `GoCommand/` or
    /// `Go-http-client`) until
    /// [`FixtureProxy::open`]: a resolve container then stays up for inspection.
    pub fn close(&self) {
        self.gate.closed.store(true, Ordering::SeqCst);
    }

    /// Lets held requests go on.
    pub fn open(&self) {
        self.gate.closed.store(false, Ordering::SeqCst);
        self.gate.opened.notify_waiters();
    }

    /// How many module zips the go command asked for so far.
    pub fn zips_served(&self) -> usize {
        self.gate.module_files.load(Ordering::SeqCst)
    }

    /// Returns once a request is being held.
    pub async fn holding(&self) {
        self.gate.holding.notified().await;
    }

    /// The same over HTTPS (the go command sends credentials over HTTPS only), with a
    /// certificate for 127.0.0.1 signed by a CA made for it ([`FixtureProxy::ca_cert`]).
    pub async fn start_https_with_auth(user: &str, password: &str) -> FixtureProxy {
        let auth = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
        let certs = tempfile::tempdir().expect("temp dir");
        crate::make_ca(certs.path(), "ca").expect("test CA");
        crate::make_cert(certs.path(), "ca", "proxy", "IP:127.0.0.1").expect("proxy cert");
        let tls = tls_config(certs.path());
        let mut proxy =
            FixtureProxy::serve("127.0.0.1:0".parse().expect("addr"), Some(auth), Some(tls)).await;
        let ca = proxy._dir.path().join("ca.crt");
        std::fs::copy(certs.path().join("ca.crt"), &ca).expect("copy the CA");
        proxy.ca = Some(ca);
        proxy
    }

    /// Adds the large generated fixture ([`crate::large`]) at `scale`: Caddy
    /// [`crate::large::LARGE_CADDY_VERSION`], its dependency modules and the large plugins.
    pub fn add_large(&self, scale: crate::large::Scale) {
        crate::fixtures::write_large(self._dir.path(), scale).expect("write the large fixture");
    }

    /// The CA certificate of an HTTPS proxy.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    async fn serve(
        addr: SocketAddr,
        auth: Option<String>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> FixtureProxy {
        let dir = tempfile::tempdir().expect("temp dir");
        crate::fixtures::write_proxy(dir.path()).expect("write fixture proxy");
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind fixture proxy");
        let addr = listener.local_addr().expect("addr");
        let gate = Arc::new(Gate::default());
        let state = ProxyState {
            root: dir.path().to_owned(),
            auth,
            gate: gate.clone(),
        };
        let app = axum::Router::new().fallback(answer).with_state(state);
        let https = tls.is_some();
        let task = match tls {
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }),
            Some(tls) => tokio::spawn(serve_https(listener, app, tls)),
        };
        FixtureProxy {
            addr,
            _dir: dir,
            task,
            gate,
            ca: None,
            https,
        }
    }

    /// The GOPROXY URL.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
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

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn answer(State(state): State<ProxyState>, headers: HeaderMap, uri: Uri) -> Response {
    if let Some(want) = &state.auth {
        let given = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
        if given != Some(want.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"fixture proxy\"")],
                "credentials required",
            )
                .into_response();
        }
    }
    let from_go = headers.get(header::USER_AGENT).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"Go-http-client") || v.starts_with(b"GoCommand/")
    });
    if from_go {
        let gate = &state.gate;
        if uri.path().ends_with(".zip") {
            gate.module_files.fetch_add(1, Ordering::SeqCst);
        }
        loop {
            let opened = gate.opened.notified();
            if !gate.closed.load(Ordering::SeqCst) {
                break;
            }
            gate.holding.notify_one();
            opened.await;
        }
    }
    let root = state.root;
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
