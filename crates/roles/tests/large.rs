//! The large generated fixture end to end (issue 16): two worker roles on one database and
//! one artifact storage, the real Docker engine, the real go tool. The first builds the
//! Caddy-like module alone and publishes its build cache; the second, which never built
//! anything, builds it with a plugin, gets most of its compiled packages from the shared
//! tier, and its binary's build information is what was asked for. Small scale
//! (`Scale::TINY`); the calibrated scale is in `bench-cache` (docs/benchmarks.md).

use std::path::Path;
use std::time::Duration;

use cbs_domain::buildinfo::BuildInfo;
use cbs_domain::{BuildKey, BuildSpec};
use cbs_goproxy::{ProxyConfig, Resolver};
use cbs_projections::{BuildState, Status};
use cbs_roles::App;
use cbs_testkit::large::{large_plugin, Scale, LARGE_CADDY_VERSION};
use cbs_testkit::{FixtureProxy, TestDb};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(600);

struct Worker {
    app: App,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn worker(db: &TestDb, proxy: &FixtureProxy, dir: &Path, storage: &Path, id: &str) -> Worker {
    let mut config = cbs_testkit::role_config(db, &proxy.url(), dir, id);
    config.storage.dir = storage.to_owned();
    assert!(config.worker.build_cache.enabled && config.worker.build_cache.shared);
    let shutdown = CancellationToken::new();
    let app = App::new(config, &shutdown).unwrap();
    let task = tokio::spawn(cbs_roles::worker::run(app.clone(), shutdown.clone()));
    Worker {
        app,
        shutdown,
        task,
    }
}

impl Worker {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn request(app: &App, proxy: &FixtureProxy, plugins: &[(&str, Option<&str>)]) -> BuildKey {
    let resolver = Resolver::new(&ProxyConfig {
        goproxy: proxy.url(),
        credentials: vec![],
        ca_pem: None,
        timeout: Duration::from_secs(5),
        cache_ttl: Duration::from_secs(5),
    })
    .unwrap();
    let spec = BuildSpec::parse(
        "linux",
        "amd64",
        None,
        Some(LARGE_CADDY_VERSION),
        plugins,
        &[],
    )
    .unwrap();
    let request = resolver.resolve_spec(&spec).await.unwrap();
    let key = request.key();
    app.store.request_build(&key, &request).await.unwrap();
    key
}

/// Waits (woken by notifications) until the build is no longer queued or running.
async fn finished(app: &App, key: &BuildKey) -> BuildState {
    let mut waiter = app.hub.watch_build(key);
    tokio::time::timeout(DEADLINE, async {
        loop {
            let b = app.store.build(key).await.unwrap().unwrap();
            if !matches!(b.status, Status::Queued | Status::Running) {
                return b;
            }
            waiter.changed().await;
        }
    })
    .await
    .expect("the build finished in time")
}

fn gets(tier: &'static str) -> u64 {
    cbs_metrics::metrics()
        .build_cache_gets
        .get_or_create(&cbs_metrics::CacheLabels { tier })
        .get()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_worker_builds_the_large_fixture_with_a_plugin_from_the_shared_cache() {
    let db = TestDb::new().await;
    let proxy = FixtureProxy::start().await;
    proxy.add_large(Scale::TINY);
    let dirs = tempfile::tempdir().unwrap();
    let storage = dirs.path().join("artifacts");

    // The first worker builds Caddy alone (trusted code: it publishes its cache entries).
    let first = worker(&db, &proxy, &dirs.path().join("a"), &storage, "worker-a");
    let caddy = request(&first.app, &proxy, &[]).await;
    let b = finished(&first.app, &caddy).await;
    assert_eq!(b.status, Status::Succeeded, "{b:?}");
    first.stop().await;
    let shared_before = gets("shared");

    // The second worker has an empty cache of its own.
    let second = worker(&db, &proxy, &dirs.path().join("b"), &storage, "worker-b");
    let plugin = large_plugin(1);
    let key = request(&second.app, &proxy, &[(plugin.as_str(), None)]).await;
    let b = finished(&second.app, &key).await;
    assert_eq!(b.status, Status::Succeeded, "{b:?}");
    assert_eq!(b.built_by.as_deref(), Some("worker-b"));
    let shared_hits = gets("shared") - shared_before;
    assert!(
        shared_hits > 20,
        "the second worker got its peer's packages: {shared_hits} shared hits"
    );

    // The binary is the large Caddy with the plugin, as its build information says.
    let artifact = b.artifact.clone().expect("artifact");
    let bytes = std::fs::read(storage.join(&artifact.location).join("caddy")).unwrap();
    let info = BuildInfo::from_binary(&bytes).unwrap();
    info.check_matches(&b.request).unwrap();
    assert!(
        format!("{info:?}").contains(&plugin) && format!("{info:?}").contains(LARGE_CADDY_VERSION),
        "{info:?}"
    );
    second.stop().await;
}
