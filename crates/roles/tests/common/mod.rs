//! What the api and artifact tests share: the api (and a worker) in-process on a fresh
//! database with the fixture proxy.
#![allow(dead_code)] // each test binary uses a part

use std::time::Duration;

use cbs_config::Config;
use cbs_roles::App;
use cbs_testkit::{FixtureProxy, TestDb};
use tokio_util::sync::CancellationToken;

pub struct Server {
    pub base: String,
    pub app: App,
    pub db: TestDb,
    pub shutdown: CancellationToken,
    pub proxy: FixtureProxy,
    pub dirs: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts the api (and, if `worker`, a worker) on a fresh database.
pub async fn server(worker: bool) -> Server {
    server_with(worker, None).await
}

/// The same; the worker's GOPROXY is `worker_proxy` if given (the api always resolves
/// through the fixture proxy).
pub async fn server_with(worker: bool, worker_proxy: Option<String>) -> Server {
    server_configured(worker, worker_proxy, |_| {}).await
}

/// The same, with a last word on the config.
pub async fn server_configured(
    worker: bool,
    worker_proxy: Option<String>,
    customize: impl FnOnce(&mut Config),
) -> Server {
    let db = TestDb::new().await;
    let proxy = FixtureProxy::start().await;
    let dirs = tempfile::tempdir().unwrap();
    let worker_id = format!("api-test-{}", std::process::id());
    let mut config = cbs_testkit::role_config(&db, &proxy.url(), dirs.path(), &worker_id);
    config.database.pool_size = 32;
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.api.download_wait = Duration::from_secs(240);
    // Many requests come from one address here; the limit has its own test.
    config.api.submissions_per_minute = 0;
    config.api.max_waits_per_client = 0;
    config.api.max_queued_per_client = 0;
    config.api.max_connections_per_client = 0;
    customize(&mut config);
    let shutdown = CancellationToken::new();
    let app = App::new(config, &shutdown).unwrap();
    let listener = cbs_roles::api::bind(&app.config).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(cbs_roles::api::run(app.clone(), listener, shutdown.clone()));
    if worker {
        let mut worker_app = app.clone();
        if let Some(p) = worker_proxy {
            std::sync::Arc::make_mut(&mut worker_app.config).go.proxy = p;
        }
        tokio::spawn(cbs_roles::worker::run(worker_app, shutdown.clone()));
    }
    Server {
        base,
        app,
        db,
        shutdown,
        proxy,
        dirs,
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap()
}
