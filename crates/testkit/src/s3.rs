//! A real S3-compatible server for tests: moto's server (`pip install 'moto[server]'`) on a
//! free loopback port, with one bucket; and a gate in front of it that a test can close to
//! make the service unreachable.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpListener, TcpStream};

/// Credentials the tests use (moto accepts any).
pub const ACCESS_KEY_ID: &str = "testing-key-id";
pub const SECRET_ACCESS_KEY: &str = "testing-secret-key";

/// A running moto server with bucket `bucket`; killed when dropped.
#[derive(Debug)]
pub struct S3Server {
    _child: tokio::process::Child,
    addr: SocketAddr,
    pub bucket: String,
}

impl S3Server {
    /// Starts moto's server and creates the bucket. Waits for the server's "Running on" line.
    pub async fn start(bucket: &str) -> S3Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut child = tokio::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start moto_server (pip install 'moto[server]')");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let ready = async {
            while let Some(line) = lines.next_line().await.expect("moto output") {
                if line.contains("Running on") {
                    return true;
                }
            }
            false
        };
        let ok = tokio::time::timeout(Duration::from_secs(60), ready)
            .await
            .expect("moto_server did not start within 60 s");
        assert!(ok, "moto_server exited before it was ready");
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let resp = reqwest::Client::new()
            .put(format!("http://{addr}/{bucket}"))
            .send()
            .await
            .expect("create bucket");
        assert!(
            resp.status().is_success(),
            "create bucket: {}",
            resp.status()
        );
        S3Server {
            _child: child,
            addr,
            bucket: bucket.to_owned(),
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Storage config for this server (static test credentials, path style).
    pub fn config(&self, endpoint: &str, prefix: &str) -> cbs_config::StorageConfig {
        let mut c = cbs_config::StorageConfig {
            backend: cbs_config::StorageBackend::S3,
            ..Default::default()
        };
        c.s3.endpoint = endpoint.to_owned();
        c.s3.bucket = self.bucket.clone();
        c.s3.prefix = prefix.to_owned();
        c.s3.access_key_id = ACCESS_KEY_ID.into();
        c.s3.secret_access_key = Some(cbs_config::Secret::new(SECRET_ACCESS_KEY.into()));
        c.s3.max_attempts = 2;
        c.s3.connect_timeout = Duration::from_secs(2);
        c.s3.operation_timeout = Duration::from_secs(30);
        c
    }
}

/// A TCP forwarder to `target` that can be closed: while closed, every new connection is
/// accepted and dropped at once and open ones are cut, as when the service is unreachable.
#[derive(Debug, Clone)]
pub struct Gate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    epoch: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Gate {
    pub async fn start(target: SocketAddr, open: bool) -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gate");
        let addr = listener.local_addr().expect("gate addr");
        let gate = Gate {
            addr,
            open: Arc::new(AtomicBool::new(open)),
            epoch: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let g = gate.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !g.open.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cut = g.epoch.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        gate
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
        if !open {
            self.epoch.send_modify(|e| *e += 1);
        }
    }
}
