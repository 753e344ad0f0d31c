//! The fleet's build cache (GOCACHEPROG) with the real go tool in real containers: a worker
//! that never built a Caddy version gets what its peer compiled through the shared tier.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cbs_domain::plan::plan;
use cbs_domain::BuildRequest;
use cbs_executor::{
    BuildCache, BuildCacheSettings, CacheReport, DockerExecutor, DockerSettings, Executor,
    GoSettings, PlanOutcome,
};
use cbs_testkit::request_with as request;
use cbs_testkit::FixtureProxy;
use sha2::Digest;
use tokio::sync::mpsc;

async fn executor(goproxy: &str, cache: &Path, shared: &Path, worker: &str) -> Executor {
    let settings = DockerSettings {
        container: cbs_config::DockerConfig {
            host: String::new(),
            image: cbs_testkit::builder_image(),
            path: "/usr/local/go/bin".into(),
            user: cbs_testkit::builder_user(),
            memory_bytes: 2 << 30,
            cpus: 2.0,
            pids_limit: 512,
            tmpfs_size: "1g".into(),
        },
        proxy: Arc::new(
            cbs_goproxy::Resolver::new(&cbs_goproxy::ProxyConfig {
                goproxy: goproxy.to_owned(),
                credentials: Vec::new(),
                ca_pem: None,
                timeout: Duration::from_secs(600),
                cache_ttl: Duration::from_secs(1),
            })
            .unwrap(),
        ),
        deployment: "build-cache-tests".into(),
    };
    let go = GoSettings {
        goproxy: goproxy.to_owned(),
        gosumdb: "off".into(),
        command_timeout: Duration::from_secs(600),
        gonosumdb: String::new(),
        netrc: None,
        proxy_ca: None,
    };
    let storage = cbs_storage::Storage::connect(&cbs_config::StorageConfig {
        dir: shared.to_owned(),
        ..Default::default()
    })
    .await
    .unwrap();
    let build_cache = BuildCache::open(BuildCacheSettings {
        dir: cache.join("prog"),
        local_max_bytes: 4 << 30,
        shared: Some(storage),
    })
    .await
    .unwrap();
    let docker = DockerExecutor::connect(
        settings,
        go,
        cache.join("mod"),
        cache.join("build"),
        worker.into(),
    )
    .await
    .unwrap()
    .with_build_cache(build_cache);
    Executor::Docker(Box::new(docker))
}

/// Builds `req` (independently if asked); the binary's SHA-256 and the cache's writes.
async fn build(
    exec: &Executor,
    req: &BuildRequest,
    independent: bool,
) -> (String, cbs_executor::CacheWrites) {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let p = if independent {
        plan(req).independent()
    } else {
        plan(req)
    };
    let outcome = exec
        .run_plan(&p, req.key().as_str(), dir.path(), &tx)
        .await
        .unwrap();
    let PlanOutcome::Built { binary, cache } = outcome else {
        panic!("build failed: {outcome:?}");
    };
    let sha = hex::encode(sha2::Sha256::digest(std::fs::read(binary).unwrap()));
    (sha, cache.expect("the build cache is on"))
}

fn lookups(r: &CacheReport) -> u64 {
    r.build_hits + r.local_hits + r.shared_hits + r.misses
}

#[tokio::test]
async fn a_worker_that_never_built_a_version_gets_what_its_peer_compiled() {
    let proxy = FixtureProxy::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    let peer = executor(&proxy.url(), &tmp.path().join("peer"), &shared, "peer").await;
    let second = executor(&proxy.url(), &tmp.path().join("second"), &shared, "second").await;

    // The peer builds Caddy alone, cold: everything is a miss and is put; it publishes.
    let caddy = request("linux", "amd64", None, &[]);
    let (caddy_sha, writes) = build(&peer, &caddy, false).await;
    let cold = writes.report();
    assert!(cold.misses > 10 && cold.puts > 10, "{cold:?}");
    assert_eq!(cold.local_hits + cold.shared_hits, 0, "{cold:?}");
    let published = writes.publish().await;
    assert!(published.published > 10, "{published:?}");
    assert!(published.uploaded_bytes > 0, "{published:?}");

    // The second worker, which never built anything, builds a plugin set: the standard
    // library and Caddy come from the shared tier; the plugin is compiled.
    let plugin = request(
        "linux",
        "amd64",
        None,
        &[("github.com/acme/alpha", "v1.1.0")],
    );
    let (plugin_sha, writes) = build(&second, &plugin, false).await;
    let first = writes.report();
    assert!(
        first.shared_hits * 2 > lookups(&first),
        "mostly shared: {first:?}"
    );
    assert!(first.misses > 0, "the plugin is compiled: {first:?}");
    assert!(first.hit_rate() > 0.5, "{first:?}");
    assert!(first.fetched_bytes > 0, "{first:?}");
    // Not trusted code: the caller does not publish it; nothing of it reaches the tiers.
    drop(writes);

    // Caddy alone on the second worker now answers from its local tier (filled from the
    // shared one) and gives the peer's bytes.
    let (sha, writes) = build(&second, &caddy, false).await;
    let warm = writes.report();
    assert_eq!(sha, caddy_sha, "the shared cache changes no byte");
    // (The go command also looks up a few actions it never stores: those stay misses.)
    assert!(warm.misses * 50 <= lookups(&warm), "{warm:?}");
    assert!(warm.local_hits > 0, "{warm:?}");

    // An independent rebuild reads no entry of anyone's and gets the same bytes.
    let (sha, writes) = build(&second, &plugin, true).await;
    let independent = writes.report();
    assert_eq!(sha, plugin_sha);
    assert_eq!(
        independent.local_hits + independent.shared_hits,
        0,
        "{independent:?}"
    );
    assert_eq!(writes.publish().await.published, 0);
}
