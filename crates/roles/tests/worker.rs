//! The worker role end to end: real Postgres, the real Docker engine with the locally built
//! Go image, the fixture module proxy. Builds are requested through the store (the API comes
//! with its own issue) and watched through the process's listening connection.

use std::time::Duration;

use cbs_domain::buildinfo::BuildInfo;
use cbs_domain::{BuildKey, BuildSpec};
use cbs_events::{Event, EventType, FailureKind};
use cbs_goproxy::{ProxyConfig, Resolver};
use cbs_projections::{BuildState, Status};
use cbs_roles::App;
use cbs_testkit::{FixtureProxy, TestDb};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(300);

struct Setup {
    app: App,
    shutdown: CancellationToken,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dirs: tempfile::TempDir,
}

async fn start_worker(db: &TestDb, goproxy: &str, id: &str) -> Setup {
    start_worker_with(db, goproxy, id, |_| {}).await
}

async fn start_worker_with(
    db: &TestDb,
    goproxy: &str,
    id: &str,
    customize: impl FnOnce(&mut cbs_config::Config),
) -> Setup {
    let dirs = tempfile::tempdir().unwrap();
    let mut config = cbs_testkit::role_config(db, goproxy, dirs.path(), id);
    customize(&mut config);
    let shutdown = CancellationToken::new();
    let app = App::new(config, &shutdown).unwrap();
    let worker = tokio::spawn(cbs_roles::worker::run(app.clone(), shutdown.clone()));
    Setup {
        app,
        shutdown,
        worker,
        _dirs: dirs,
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
    let spec = BuildSpec::parse("linux", "amd64", None, None, plugins, &[]).unwrap();
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

async fn history(app: &App, key: &BuildKey) -> Vec<Event> {
    app.store
        .events(key, 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect()
}

/// The build's output chunks, in order.
async fn chunks(app: &App, key: &BuildKey) -> Vec<cbs_store::OutputChunk> {
    app.store.output(key, (0, 0), 10_000).await.unwrap()
}

/// The build's output lines, in order.
async fn output(app: &App, key: &BuildKey) -> Vec<String> {
    chunks(app, key)
        .await
        .into_iter()
        .flat_map(|c| c.lines)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn builds_verifies_and_publishes_and_fails_a_broken_plugin_permanently() {
    let db = TestDb::new().await;
    let proxy = FixtureProxy::start().await;
    let s = start_worker(&db, &proxy.url(), "worker-test").await;

    let key = request(
        &s.app,
        &proxy,
        &[
            ("github.com/acme/alpha", None),
            ("github.com/Acme/Beta", None),
        ],
    )
    .await;
    let b = finished(&s.app, &key).await;
    let events = history(&s.app, &key).await;
    assert_eq!(b.status, Status::Succeeded, "{b:?}\n{events:#?}");
    // Output is not in the log (it has its own table).
    let types: Vec<EventType> = events.iter().map(Event::event_type).collect();
    use EventType::*;
    assert_eq!(
        types,
        [
            Requested,
            Claimed,
            StepStarted,
            StepFinished,
            StepStarted,
            StepFinished,
            StepStarted,
            StepFinished,
            StepStarted,
            StepFinished,
            Succeeded
        ]
    );
    let out = output(&s.app, &key).await;
    assert!(out.iter().any(|l| l == "go mod tidy -e"), "{out:?}");
    assert!(
        out.iter().any(|l| l.contains("go build -o caddy")),
        "{out:?}"
    );

    let artifact = b.artifact.expect("artifact");
    let path = s
        .app
        .config
        .storage
        .dir
        .join(&artifact.location)
        .join("caddy");
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, artifact.size);
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), artifact.sha256);
    BuildInfo::from_binary(&bytes)
        .unwrap()
        .check_matches(&b.request)
        .unwrap();

    // The build cache: what a plugin build compiled serves nobody else (not published);
    // a build of Caddy alone publishes its entries into the shared tier.
    let shared = s.app.config.storage.dir.join(cbs_executor::SHARED_PREFIX);
    let entries = || {
        std::fs::read_dir(shared.join("a"))
            .map(|shards| {
                shards
                    .flatten()
                    .flat_map(|d| std::fs::read_dir(d.path()).unwrap())
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(entries(), 0, "a plugin build published build cache entries");
    let caddy = request(&s.app, &proxy, &[]).await;
    assert_eq!(finished(&s.app, &caddy).await.status, Status::Succeeded);
    assert!(
        entries() > 10,
        "Caddy alone published {} entries",
        entries()
    );

    // A plugin that does not compile: permanent, with the compiler's words in the failure
    // message and in the build's output.
    let key = request(&s.app, &proxy, &[("example.com/broken", None)]).await;
    let b = finished(&s.app, &key).await;
    assert_eq!(b.status, Status::Failed);
    assert!(b.is_terminal(), "a permanent failure is not retried");
    let err = b.last_error.expect("error");
    assert_eq!(err.kind, FailureKind::Permanent);
    assert_eq!(err.step.as_deref(), Some("compile"));
    assert!(
        err.message.starts_with("step compile failed: `go build"),
        "{}",
        err.message
    );
    assert!(
        err.message.contains("undefined: undefinedFunction"),
        "{}",
        err.message
    );
    let out = output(&s.app, &key).await;
    assert!(
        out.iter()
            .any(|l| l.contains("undefined: undefinedFunction")),
        "{out:?}"
    );

    s.shutdown.cancel();
    s.worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn output_beyond_the_cap_is_counted_not_kept_and_the_build_goes_on() {
    let db = TestDb::new().await;
    let proxy = FixtureProxy::start().await;
    const CAP: u64 = 150;
    let s = start_worker_with(&db, &proxy.url(), "worker-cap", |c| {
        c.worker.output_cap_bytes = CAP;
    })
    .await;
    let key = request(&s.app, &proxy, &[("github.com/acme/alpha", None)]).await;
    let b = finished(&s.app, &key).await;
    assert_eq!(b.status, Status::Succeeded, "{b:?}");
    let all = chunks(&s.app, &key).await;
    let (markers, kept): (Vec<_>, Vec<_>) = all.iter().partition(|c| c.truncated);
    let kept_bytes: u64 = kept
        .iter()
        .flat_map(|c| &c.lines)
        .map(|l| l.len() as u64 + 1)
        .sum();
    assert!(kept_bytes <= CAP, "{kept_bytes} bytes kept: {all:#?}");
    assert!(kept_bytes > 0, "{all:#?}");
    // The first marker as soon as the cap was reached, the count at the end; nothing after.
    assert_eq!(markers.len(), 2, "{all:#?}");
    assert!(markers[0].lines[0].contains("the rest is counted, not kept"));
    let last = all.last().unwrap();
    assert!(last.truncated, "{all:#?}");
    let count = &last.lines[0];
    assert!(
        count.contains("more lines") && count.contains("were not kept"),
        "{count}"
    );
    s.shutdown.cancel();
    s.worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_proxy_fails_the_build_as_retryable() {
    let db = TestDb::new().await;
    let proxy = FixtureProxy::start().await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let s = start_worker(&db, &dead, "worker-test-dead").await;
    let key = request(&s.app, &proxy, &[]).await;
    let b = finished(&s.app, &key).await;
    assert_eq!(b.status, Status::Failed);
    let err = b.last_error.expect("error");
    assert_eq!(err.kind, FailureKind::Retryable, "{}", err.message);
    assert_eq!(err.step.as_deref(), Some("pin_versions"));
    // The gate's words, as the go command quotes them.
    assert!(
        err.message
            .to_ascii_lowercase()
            .contains("connection refused"),
        "{}",
        err.message
    );
    s.shutdown.cancel();
    s.worker.await.unwrap().unwrap();
}

/// A compile error whose text looks like a network failure ("connection refused") is still
/// the request's fault: the worker classifies from what it observed (a compile step that
/// exited with status 1), never from the build's output. One attempt, permanent.
#[tokio::test(flavor = "multi_thread")]
async fn output_that_looks_like_a_network_failure_does_not_make_a_failure_retryable() {
    let db = TestDb::new().await;
    let proxy = FixtureProxy::start().await;
    let s = start_worker(&db, &proxy.url(), "worker-test-liar").await;
    let key = request(&s.app, &proxy, &[("example.com/liar", None)]).await;
    let b = finished(&s.app, &key).await;
    assert_eq!(b.status, Status::Failed);
    assert!(b.is_terminal(), "a permanent failure is not retried");
    let err = b.last_error.expect("error");
    assert_eq!(err.kind, FailureKind::Permanent, "{}", err.message);
    assert_eq!(err.step.as_deref(), Some("compile"));
    assert!(
        err.message.contains("connection refused"),
        "{}",
        err.message
    );
    let claims = history(&s.app, &key)
        .await
        .iter()
        .filter(|e| e.event_type() == EventType::Claimed)
        .count();
    assert_eq!(claims, 1, "one attempt");
    s.shutdown.cancel();
    s.worker.await.unwrap().unwrap();
}

/// A module proxy that accepts connections and never answers: `go get` hangs on it.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    (url, task)
}

/// Runs a build against a proxy that never answers, with `limits` applied to the worker's
/// config; returns its (retryable) failure.
async fn hang(
    id: &str,
    limits: impl FnOnce(&mut cbs_config::Config),
) -> cbs_projections::LastError {
    let db = TestDb::new().await;
    let proxy = FixtureProxy::start().await;
    let (hole, _hole) = black_hole().await;
    let s = start_worker_with(&db, &hole, id, limits).await;
    let key = request(&s.app, &proxy, &[("github.com/acme/alpha", None)]).await;
    let b = finished(&s.app, &key).await;
    assert_eq!(b.status, Status::Failed);
    let err = b.last_error.expect("error");
    assert_eq!(err.kind, FailureKind::Retryable, "{}", err.message);
    s.shutdown.cancel();
    s.worker.await.unwrap().unwrap();
    err
}

/// Each go command has its own time limit (enforced inside the container by the runner),
/// and the message states the limit that was applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_command_is_stopped_at_the_command_timeout() {
    let err = hang("worker-test-timeout", |c| {
        c.worker.command_timeout = Duration::from_secs(3);
    })
    .await;
    assert_eq!(err.step.as_deref(), Some("pin_versions"));
    assert!(
        err.message
            .contains("was stopped at its time limit of 3s (worker.command_timeout)"),
        "{}",
        err.message
    );
}

/// A whole attempt has a deadline of its own, whatever its commands' limits.
#[tokio::test(flavor = "multi_thread")]
async fn a_build_is_stopped_at_the_build_timeout() {
    let err = hang("worker-test-deadline", |c| {
        c.worker.build_timeout = Duration::from_secs(2);
    })
    .await;
    assert!(
        err.message.contains("worker.build_timeout (2s)"),
        "{}",
        err.message
    );
}

/// A build directory another user could have prepared is refused: a symbolic link, one
/// owned by another user, one writable by others. The default is under the cache dir.
#[test]
fn the_build_root_must_be_the_workers_own() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ok");
    cbs_roles::worker::check_build_root(&ok).unwrap();
    assert_eq!(
        std::fs::metadata(&ok).unwrap().permissions().mode() & 0o777,
        0o700,
        "made private"
    );
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = cbs_roles::worker::check_build_root(&open)
        .unwrap_err()
        .to_string();
    assert!(err.contains("writable by other users"), "{err}");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&ok, &link).unwrap();
    let err = cbs_roles::worker::check_build_root(&link)
        .unwrap_err()
        .to_string();
    assert!(err.contains("symbolic link"), "{err}");
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let err = cbs_roles::worker::check_build_root(&theirs)
        .unwrap_err()
        .to_string();
    assert!(err.contains("owned by uid 65534"), "{err}");
    let config = cbs_config::WorkerConfig::default();
    assert_eq!(config.build_root(), config.cache_dir.join("builds"));
}

/// The host clean-up removes a dead worker's build directories but never follows a
/// symbolic link planted in the build directory.
#[tokio::test(flavor = "multi_thread")]
async fn the_host_clean_up_never_follows_symbolic_links() {
    let db = TestDb::new().await;
    let dirs = tempfile::tempdir().unwrap();
    let config = cbs_testkit::role_config(&db, "http://127.0.0.1:1", dirs.path(), "me");
    let shutdown = CancellationToken::new();
    let app = App::new(config, &shutdown).unwrap();
    let root = app.config.worker.build_root();
    cbs_roles::worker::check_build_root(&root).unwrap();
    // Something of value elsewhere, shaped like build directories.
    let victim = dirs.path().join("victim");
    std::fs::create_dir_all(victim.join("build-0123456789ab-x")).unwrap();
    std::fs::write(victim.join("build-0123456789ab-x/keep"), "x").unwrap();
    std::os::unix::fs::symlink(&victim, root.join("evil-worker")).unwrap();
    std::fs::create_dir_all(root.join("dead-worker")).unwrap();
    std::os::unix::fs::symlink(
        victim.join("build-0123456789ab-x"),
        root.join("dead-worker/build-0123456789ab-y"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("dead-worker/build-fedcba987654-z")).unwrap();
    let exec = cbs_executor::Executor::Local(cbs_executor::LocalExecutor::new(
        cbs_testkit::go_binary(),
        cbs_executor::GoSettings {
            goproxy: "http://127.0.0.1:1".into(),
            gosumdb: "off".into(),
            command_timeout: Duration::from_secs(5),
            gonosumdb: String::new(),
            netrc: None,
            proxy_ca: None,
        },
        cbs_executor::CachePaths {
            gomodcache: dirs.path().join("mod"),
            gocache: dirs.path().join("gocache"),
            home: dirs.path().join("home"),
        },
    ));
    cbs_roles::worker::clean_host(&app, &exec, "me").await;
    assert!(
        victim.join("build-0123456789ab-x/keep").exists(),
        "followed a link"
    );
    assert!(
        !root.join("dead-worker/build-fedcba987654-z").exists(),
        "a dead worker's real build directory is removed"
    );
    shutdown.cancel();
}
