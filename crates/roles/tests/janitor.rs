//! The janitor and the worker's crash safety, in-process against a real Postgres and real
//! Docker builds from the fixture proxy: retries with growing backoff until giving up, one
//! leading janitor and its replacement, rescue of a dead worker's build, and preemption
//! notices of every provider (fake metadata servers on loopback).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cbs_domain::BuildKey;
use cbs_events::{Event, RequeueReason};
use cbs_projections::{BuildState, Status};
use cbs_roles::App;
use cbs_testkit::{FixtureProxy, TestDb};
use tokio_util::sync::CancellationToken;

/// Tests that build in Docker take turns, two at a time: each starts with cold Go caches,
/// and ten cold builds at once on two cores starve the workers' lease renewals.
static TURNS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

struct Env {
    _turn: tokio::sync::SemaphorePermit<'static>,
    db: TestDb,
    proxy: FixtureProxy,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn env() -> Env {
    // Role logs show with a failing test's output (`RUST_LOG` filters; default warnings).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    Env {
        _turn: TURNS.acquire().await.unwrap(),
        db: TestDb::new().await,
        proxy: FixtureProxy::start().await,
        dir: tempfile::tempdir().unwrap(),
        shutdown: CancellationToken::new(),
    }
}

impl Env {
    /// A config for a role of this test; `app_name` names its database connections.
    fn config(&self, worker_id: &str, app_name: &str) -> cbs_config::Config {
        let mut c =
            cbs_testkit::role_config(&self.db, &self.proxy.url(), self.dir.path(), worker_id);
        c.database.url =
            cbs_config::DatabaseUrl::new(format!("{}?application_name={app_name}", self.db.url));
        c.worker.lease = Duration::from_secs(5);
        c.worker.claim_poll_interval = Duration::from_millis(500);
        c.janitor.poll_interval = Duration::from_secs(1);
        c.janitor.leader_check_interval = Duration::from_millis(300);
        c
    }

    fn app(&self, config: cbs_config::Config, token: &CancellationToken) -> App {
        App::new(config, token).unwrap()
    }

    fn worker(
        &self,
        config: cbs_config::Config,
    ) -> (App, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let token = self.shutdown.child_token();
        let app = self.app(config, &token);
        let task = tokio::spawn(cbs_roles::worker::run(app.clone(), token));
        (app, task)
    }

    fn janitor(&self, config: cbs_config::Config) -> (App, CancellationToken) {
        let token = self.shutdown.child_token();
        let app = self.app(config, &token);
        tokio::spawn(cbs_roles::janitor::run_services(app.clone(), token.clone()));
        (app, token)
    }
}

async fn request(app: &App, plugins: &[(&str, &str)]) -> BuildKey {
    let r = cbs_testkit::request_with("linux", "amd64", None, plugins);
    let key = r.key();
    app.store.request_build(&key, &r).await.unwrap();
    key
}

/// Waits (woken through the listening connection) until the build satisfies `done`.
async fn wait_build(
    app: &App,
    key: &BuildKey,
    deadline: Duration,
    what: &str,
    done: impl Fn(&BuildState) -> bool,
) -> BuildState {
    let mut waiter = app.hub.watch_build(key);
    tokio::time::timeout(deadline, async {
        loop {
            if let Some(b) = app.store.build(key).await.unwrap() {
                if done(&b) {
                    return b;
                }
            }
            waiter.changed().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"))
}

async fn events(app: &App, key: &BuildKey) -> Vec<cbs_events::RecordedEvent> {
    app.store.events(key, 0, 10_000).await.unwrap()
}

/// A module proxy that accepts connections and never answers: resolve steps hang.
async fn hanging_proxy() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    format!("http://{addr}")
}

fn closed_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn retryable_failures_back_off_more_each_time_then_give_up() {
    let e = env().await;
    // The worker's module proxy is down: every attempt fails retryably.
    let mut wc = e.config("w-retry", "retry-worker");
    wc.go.proxy = closed_port_url();
    // No polling to lean on: the worker must wake when a retry's backoff ends.
    wc.worker.claim_poll_interval = Duration::from_secs(120);
    let (app, _) = e.worker(wc);
    let mut jc = e.config("j", "retry-janitor");
    jc.janitor.max_attempts = 3;
    jc.janitor.retry_backoff = Duration::from_millis(400);
    jc.janitor.retry_backoff_max = Duration::from_secs(30);
    e.janitor(jc);
    let key = request(&app, &[("github.com/acme/alpha", "v1.1.0")]).await;
    // Two retries at the poll interval alone would take 240 s.
    let b = wait_build(&app, &key, Duration::from_secs(100), "gave up", |b| {
        b.status == Status::GaveUp
    })
    .await;
    assert_eq!(b.failures, 3);
    assert_eq!(b.attempt, 3);
    assert!(b.is_terminal());
    let history = events(&app, &key).await;
    let failed: Vec<_> = history
        .iter()
        .filter(|r| matches!(r.event, Event::Failed(_)))
        .collect();
    assert_eq!(failed.len(), 3, "every attempt is in the history");
    // Each retry waits longer after its failure than the one before (400 ms, then 800 ms,
    // each +-20%).
    let mut delays = Vec::new();
    for r in &history {
        if let Event::Requeued(q) = &r.event {
            assert_eq!(q.reason, RequeueReason::Retry);
            let failed_at = history
                .iter()
                .rev()
                .find(|f| f.seq < r.seq && matches!(f.event, Event::Failed(_)))
                .unwrap()
                .recorded_at;
            delays.push((q.not_before - failed_at).to_std().unwrap());
        }
    }
    assert_eq!(delays.len(), 2, "{delays:?}");
    assert!(delays[0] >= Duration::from_millis(300), "{delays:?}");
    assert!(delays[1] > delays[0], "backoff grows: {delays:?}");
    // Nothing claims it again: it is terminal, and the last event says why.
    let last = history.last().unwrap();
    match &last.event {
        Event::GaveUp(g) => {
            assert_eq!(g.failures, 3);
            assert!(
                g.message.contains("gave up after 3 failed attempts"),
                "{}",
                g.message
            );
        }
        other => panic!("last event {other:?}"),
    }
}

/// Who holds the janitors' leader lock in this test's database (the application name of the
/// holding connection; other tests' janitors hold theirs in their own databases).
async fn leader(db: &TestDb) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn wait_leader(db: &TestDb, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = leader(db).await;
        if l.len() == 1 && l[0].starts_with(prefix) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leader never became {prefix}: {l:?}"
        );
        // Polling the catalog: Postgres sends no event when an advisory lock changes hands.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_janitors_one_acts_and_the_other_takes_over_when_it_dies() {
    let e = env().await;
    let (a_app, _a) = e.janitor(e.config("", "janitor-a"));
    wait_leader(&e.db, "janitor-a").await;
    let (_b_app, _b) = e.janitor(e.config("", "janitor-b"));
    // B has tried several times; A still leads, alone.
    let b_tries = Instant::now() + Duration::from_secs(1);
    while Instant::now() < b_tries {
        let l = leader(&e.db).await;
        assert_eq!(l.len(), 1, "{l:?}");
        assert!(l[0].starts_with("janitor-a"), "{l:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A "dies": its leader connection is cut (as when its process is killed).
    e.db.client()
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'janitor-a leader'",
            &[],
        )
        .await
        .unwrap();
    wait_leader(&e.db, "janitor-b").await;
    // The new leader acts: a build whose worker vanished is rescued.
    let key = request(&a_app, &[]).await;
    let b = a_app.store.build(&key).await.unwrap().unwrap();
    a_app
        .store
        .append(
            &b,
            Event::Claimed(cbs_events::Claimed {
                worker: "vanished".into(),
                attempt: 1,
                lease_expires_at: chrono::Utc::now() + chrono::Duration::milliseconds(200),
            }),
        )
        .await
        .unwrap();
    let rescued = wait_build(&a_app, &key, Duration::from_secs(30), "rescued", |b| {
        b.status == Status::Queued && b.attempt == 1
    })
    .await;
    assert_eq!(rescued.failures, 1, "a lost worker counts as an attempt");
    let history = events(&a_app, &key).await;
    assert!(matches!(
        &history.last().unwrap().event,
        Event::Requeued(q) if q.reason == RequeueReason::LeaseExpired
    ));
    // Exactly one requeue: only the leader acted.
    assert_eq!(
        history
            .iter()
            .filter(|r| matches!(r.event, Event::Requeued(_)))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_workers_build_is_rescued_and_built_by_another_worker() {
    let e = env().await;
    // Worker A hangs in resolve (its proxy never answers), then "dies": stopped without
    // releasing anything (its task is dropped mid-build).
    let mut ac = e.config("w-dead", "dead-worker");
    ac.go.proxy = hanging_proxy().await;
    let (a_app, a_task) = e.worker(ac);
    e.janitor(e.config("", "rescue-janitor"));
    let key = request(&a_app, &[("github.com/acme/alpha", "v1.1.0")]).await;
    let claimed = wait_build(&a_app, &key, Duration::from_secs(60), "A runs it", |b| {
        b.status == Status::Running && b.owner.as_deref() == Some("w-dead")
    })
    .await;
    // Renewals keep the lease alive past its 3 s while A lives.
    let first_lease = claimed.lease_expires_at.unwrap();
    wait_build(&a_app, &key, Duration::from_secs(30), "a renewal", |b| {
        b.status == Status::Running
            && b.attempt == 1
            && b.lease_expires_at.is_some_and(|l| l > first_lease)
    })
    .await;
    assert!(events(&a_app, &key)
        .await
        .iter()
        .any(|r| matches!(r.event, Event::LeaseRenewed(_))));
    // A dies without a word, as a crash would: its task is torn down, nothing is released,
    // its renewals stop. (The kill test does this to real processes with SIGKILL.)
    a_task.abort();
    let died = Instant::now();
    // B, healthy, picks it up after the janitor's rescue.
    let (b_app, _) = e.worker(e.config("w-live", "live-worker"));
    let done = wait_build(&b_app, &key, Duration::from_secs(120), "B builds it", |b| {
        b.status == Status::Succeeded
    })
    .await;
    assert_eq!(done.attempt, 2);
    let history = events(&b_app, &key).await;
    let claimed_b = history
        .iter()
        .find(|r| matches!(&r.event, Event::Claimed(c) if c.worker == "w-live"))
        .unwrap();
    assert!(history.iter().any(
        |r| matches!(&r.event, Event::Requeued(q) if q.reason == RequeueReason::LeaseExpired)
    ));
    let took = died.elapsed();
    eprintln!(
        "death to claim by another worker: about {took:?} (lease 5 s); claimed at seq {}",
        claimed_b.seq
    );
}

/// A fake metadata service speaking GCP's, AWS's (IMDSv2) and Azure's dialects, flipped to
/// "preempted" by the test. Azure's event list always holds an event for another VM, which
/// must not count.
#[derive(Clone, Default)]
struct FakeMetadata {
    preempted: Arc<AtomicBool>,
    acks: Arc<std::sync::Mutex<Vec<String>>>,
    acked: Arc<tokio::sync::Notify>,
    polls: Arc<AtomicUsize>,
}

impl FakeMetadata {
    async fn start(&self) -> String {
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{get, put};
        let s = self.clone();
        let gcp = {
            let s = s.clone();
            move |h: HeaderMap| async move {
                s.polls.fetch_add(1, Ordering::SeqCst);
                if h.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
                    return (StatusCode::FORBIDDEN, String::new());
                }
                let p = s.preempted.load(Ordering::SeqCst);
                (StatusCode::OK, if p { "TRUE" } else { "FALSE" }.to_owned())
            }
        };
        let aws = {
            let s = s.clone();
            move |h: HeaderMap| async move {
                s.polls.fetch_add(1, Ordering::SeqCst);
                if h.get("x-aws-ec2-metadata-token")
                    .and_then(|v| v.to_str().ok())
                    != Some("tok")
                {
                    return (StatusCode::UNAUTHORIZED, String::new());
                }
                if s.preempted.load(Ordering::SeqCst) {
                    (
                        StatusCode::OK,
                        r#"{"action": "terminate", "time": "2026-11-28T18:00:00Z"}"#.to_owned(),
                    )
                } else {
                    (StatusCode::NOT_FOUND, String::new())
                }
            }
        };
        let azure = {
            let s = s.clone();
            move |h: HeaderMap| async move {
                s.polls.fetch_add(1, Ordering::SeqCst);
                if h.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
                    return (StatusCode::BAD_REQUEST, String::new());
                }
                let mut events = vec![serde_json::json!({
                    "EventId": "other", "EventType": "Preempt", "Resources": ["vm-2"],
                    "EventStatus": "Scheduled", "NotBefore": "Sat, 28 Nov 2026 18:00:00 GMT"
                })];
                if s.preempted.load(Ordering::SeqCst) {
                    events.push(serde_json::json!({
                        "EventId": "ev-1", "EventType": "Preempt", "Resources": ["vm-1"],
                        "EventStatus": "Scheduled", "NotBefore": "Sat, 28 Nov 2026 18:00:00 GMT"
                    }));
                }
                (
                    StatusCode::OK,
                    serde_json::json!({ "DocumentIncarnation": 1, "Events": events }).to_string(),
                )
            }
        };
        let ack = {
            let s = s.clone();
            move |body: String| async move {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if let Some(id) = v["StartRequests"][0]["EventId"].as_str() {
                    s.acks.lock().unwrap().push(id.to_owned());
                    s.acked.notify_one();
                }
                StatusCode::OK
            }
        };
        let router = axum::Router::new()
            .route("/computeMetadata/v1/instance/preempted", get(gcp))
            .route("/latest/api/token", put(|| async { "tok" }))
            .route("/latest/meta-data/spot/instance-action", get(aws))
            .route("/metadata/instance/compute/name", get(|| async { "vm-1" }))
            .route("/metadata/scheduledevents", get(azure).post(ack));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, router).await });
        format!("http://{addr}")
    }
}

const POLL: Duration = Duration::from_millis(500);

async fn preemption_releases_builds_to_another_worker(
    detector: cbs_config::PreemptionDetector,
    notice: impl FnOnce(&FakeMetadata),
) -> FakeMetadata {
    let e = env().await;
    let meta = FakeMetadata::default();
    let url = meta.start().await;
    let mut ac = e.config("w-spot", "spot-worker");
    ac.go.proxy = hanging_proxy().await;
    ac.worker.preemption = cbs_config::PreemptionConfig {
        detector,
        metadata_url: url,
        poll_interval: POLL,
    };
    let (a_app, _a) = e.worker(ac);
    let key = request(&a_app, &[("github.com/acme/alpha", "v1.1.0")]).await;
    wait_build(
        &a_app,
        &key,
        Duration::from_secs(60),
        "the spot worker runs it",
        |b| b.status == Status::Running && b.owner.as_deref() == Some("w-spot"),
    )
    .await;
    notice(&meta);
    let noticed = Instant::now();
    let released = wait_build(
        &a_app,
        &key,
        2 * POLL + Duration::from_secs(2),
        "released within two poll intervals",
        |b| b.status == Status::Queued,
    )
    .await;
    eprintln!(
        "{detector:?}: notice to release took {:?}",
        noticed.elapsed()
    );
    assert_eq!(released.failures, 0, "a preemption is not a failed attempt");
    let history = events(&a_app, &key).await;
    let release_seq = history.last().unwrap().seq;
    assert!(matches!(
        &history.last().unwrap().event,
        Event::Requeued(q) if q.reason == RequeueReason::Preempted
    ));
    // Another worker finishes it; the preempted one claims nothing more.
    let key2 = request(&a_app, &[("github.com/Acme/Beta", "v0.2.0")]).await;
    let (b_app, _b) = e.worker(e.config("w-b", "b-worker"));
    for k in [&key, &key2] {
        wait_build(
            &b_app,
            k,
            Duration::from_secs(120),
            "the other worker builds it",
            |b| b.status == Status::Succeeded,
        )
        .await;
    }
    for (k, after) in [(&key, release_seq), (&key2, 0)] {
        for r in events(&b_app, k).await {
            if let Event::Claimed(c) = &r.event {
                if r.seq > after {
                    assert_eq!(c.worker, "w-b", "the preempted worker claimed {k}");
                }
            }
        }
    }
    meta
}

#[tokio::test(flavor = "multi_thread")]
async fn gcp_preemption_releases_builds() {
    let meta =
        preemption_releases_builds_to_another_worker(cbs_config::PreemptionDetector::Gcp, |m| {
            m.preempted.store(true, Ordering::SeqCst)
        })
        .await;
    assert!(meta.polls.load(Ordering::SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_preemption_releases_builds() {
    preemption_releases_builds_to_another_worker(cbs_config::PreemptionDetector::Aws, |m| {
        m.preempted.store(true, Ordering::SeqCst)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_preemption_releases_builds_and_is_acknowledged() {
    let meta =
        preemption_releases_builds_to_another_worker(cbs_config::PreemptionDetector::Azure, |m| {
            m.preempted.store(true, Ordering::SeqCst)
        })
        .await;
    // Acknowledged once its builds were released; the other VM's event never was.
    tokio::time::timeout(Duration::from_secs(10), meta.acked.notified())
        .await
        .expect("no acknowledgement");
    assert_eq!(*meta.acks.lock().unwrap(), vec!["ev-1".to_owned()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigusr1_preemption_releases_builds() {
    preemption_releases_builds_to_another_worker(cbs_config::PreemptionDetector::Signal, |_| {
        let ok = std::process::Command::new("kill")
            .args(["-USR1", &std::process::id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_metadata_service_is_not_a_preemption() {
    let e = env().await;
    let mut c = e.config("w-blind", "blind-worker");
    c.worker.preemption = cbs_config::PreemptionConfig {
        detector: cbs_config::PreemptionDetector::Gcp,
        metadata_url: closed_port_url(),
        poll_interval: Duration::from_millis(100),
    };
    let (app, _w) = e.worker(c);
    let key = request(&app, &[("github.com/acme/alpha", "v1.1.0")]).await;
    let b = wait_build(&app, &key, Duration::from_secs(120), "built", |b| {
        b.status == Status::Succeeded
    })
    .await;
    assert_eq!(b.attempt, 1);
    assert!(!events(&app, &key)
        .await
        .iter()
        .any(|r| matches!(r.event, Event::Requeued(_))));
}

#[tokio::test(flavor = "multi_thread")]
async fn on_sigterm_a_worker_waits_stop_timeout_then_releases_its_builds() {
    let e = env().await;
    let mut c = e.config("w-stopping", "stopping-worker");
    c.go.proxy = hanging_proxy().await;
    c.worker.stop_timeout = Duration::from_millis(500);
    let token = e.shutdown.child_token();
    let worker_app = e.app(c, &token);
    let worker = tokio::spawn(cbs_roles::worker::run(worker_app, token.clone()));
    // The test watches through its own process-wide parts (the worker's stop with it).
    let app = e.app(e.config("", "observer"), &e.shutdown);
    let key = request(&app, &[("github.com/acme/alpha", "v1.1.0")]).await;
    wait_build(&app, &key, Duration::from_secs(60), "it runs", |b| {
        b.status == Status::Running
    })
    .await;
    // SIGTERM reaches the worker as its shutdown token.
    token.cancel();
    let released = wait_build(&app, &key, Duration::from_secs(30), "released", |b| {
        b.status == Status::Queued
    })
    .await;
    assert_eq!(released.failures, 0);
    assert!(matches!(
        &events(&app, &key).await.last().unwrap().event,
        Event::Requeued(q) if q.reason == RequeueReason::Preempted
    ));
    tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("the worker stops after releasing")
        .unwrap()
        .unwrap();
    // Its containers are gone with it.
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            "label=org.caddy-build-server.worker=w-stopping",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "containers left: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn labelled_container(deployment: &str, worker: &str, build: &str) -> String {
    docker(&[
        "create",
        "--label",
        "org.caddy-build-server.managed=true",
        "--label",
        &format!("org.caddy-build-server.deployment={deployment}"),
        "--label",
        &format!("org.caddy-build-server.worker={worker}"),
        "--label",
        &format!("org.caddy-build-server.build={build}"),
        &cbs_testkit::builder_image(),
        "/usr/local/go/bin/go",
        "version",
    ])
}

fn exists(container: &str) -> bool {
    !docker(&["ps", "-aq", "--filter", &format!("id={container}")]).is_empty()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_removes_what_dead_workers_left_on_its_host() {
    let e = env().await;
    let c = e.config("cleaner", "cleaner");
    let build_dir = c.worker.build_dir.clone();
    let app = e.app(c, &e.shutdown);
    let exec = cbs_roles::worker::executor(&app, "cleaner").await.unwrap();
    let dep = app.store.deployment_id().await.unwrap();
    // A live worker's build: running under it, with its container and directory.
    let live_key = request(&app, &[]).await;
    let claimed = app
        .store
        .claim("live-w", Duration::from_secs(600))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.key, live_key);
    let live_container = labelled_container(&dep, "live-w", live_key.as_str());
    let live_dir = build_dir
        .join("live-w")
        .join(format!("build-{}-abc", &live_key.as_str()[..12]));
    std::fs::create_dir_all(&live_dir).unwrap();
    // A dead worker's leftovers: a container and a directory of a build it no longer runs.
    let dead_key = request(&app, &[("github.com/acme/alpha", "v1.1.0")]).await;
    let dead_container = labelled_container(&dep, "ghost", dead_key.as_str());
    let dead_dir = build_dir
        .join("ghost")
        .join(format!("build-{}-xyz", &dead_key.as_str()[..12]));
    std::fs::create_dir_all(dead_dir.join("sub")).unwrap();
    // And a container claiming the live build but made by another worker (a stale attempt).
    let stale_container = labelled_container(&dep, "ghost", live_key.as_str());

    // Another deployment's container on the same engine is not ours to judge.
    let foreign = labelled_container("another-deployment", "ghost", dead_key.as_str());

    cbs_roles::worker::clean_host(&app, &exec, "cleaner").await;

    assert!(exists(&live_container), "the live build's container stays");
    assert!(live_dir.exists(), "the live build's directory stays");
    assert!(
        !exists(&dead_container),
        "the dead worker's container is gone"
    );
    assert!(
        !exists(&stale_container),
        "the stale attempt's container is gone"
    );
    assert!(!dead_dir.exists(), "the dead worker's directory is gone");
    assert!(!build_dir.join("ghost").exists());
    assert!(exists(&foreign), "another deployment's container stays");
    docker(&["rm", "-f", &live_container, &foreign]);
}
