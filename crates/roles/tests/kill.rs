//! Kill test with real processes: three `caddy-build-server worker` processes and a
//! `caddy-build-server janitor` process build 30 builds from the fixture proxy in Docker while
//! the test SIGKILLs workers during resolve, during compile and right after compile (while
//! they verify, sign and upload), restarting each under the same id. Every build must end
//! succeeded exactly once with an artifact that verifies, and no container of ours may be
//! left.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cbs_domain::BuildKey;
use cbs_events::{Event, GlobalCursor};
use cbs_projections::Status;
use cbs_roles::App;
use cbs_testkit::{FixtureProxy, TestDb};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_caddy-build-server");
const WORKERS: usize = 3;

fn spawn(config: &std::path::Path, role: &str, worker_id: &str, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(BIN)
        .arg(role)
        .env("CONFIG_PATH", config)
        .env("WORKER_ID", worker_id)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn requests() -> Vec<cbs_domain::BuildRequest> {
    let sets: [&[(&str, &str)]; 15] = [
        &[],
        &[("github.com/acme/alpha", "v1.0.0")],
        &[("github.com/acme/alpha", "v1.1.0")],
        &[("github.com/Acme/Beta", "v0.2.0")],
        &[("example.com/gamma/v2", "v2.0.0")],
        &[("example.com/gamma/v2", "v2.1.0")],
        &[
            ("github.com/acme/alpha", "v1.0.0"),
            ("github.com/Acme/Beta", "v0.2.0"),
        ],
        &[
            ("github.com/acme/alpha", "v1.1.0"),
            ("github.com/Acme/Beta", "v0.2.0"),
        ],
        &[
            ("github.com/acme/alpha", "v1.0.0"),
            ("example.com/gamma/v2", "v2.0.0"),
        ],
        &[
            ("github.com/acme/alpha", "v1.1.0"),
            ("example.com/gamma/v2", "v2.1.0"),
        ],
        &[
            ("github.com/Acme/Beta", "v0.2.0"),
            ("example.com/gamma/v2", "v2.0.0"),
        ],
        &[
            ("github.com/Acme/Beta", "v0.2.0"),
            ("example.com/gamma/v2", "v2.1.0"),
        ],
        &[
            ("github.com/acme/alpha", "v1.1.0"),
            ("github.com/Acme/Beta", "v0.2.0"),
            ("example.com/gamma/v2", "v2.1.0"),
        ],
        &[
            ("github.com/acme/alpha", "v1.0.0"),
            ("github.com/Acme/Beta", "v0.2.0"),
            ("example.com/gamma/v2", "v2.0.0"),
        ],
        &[
            ("github.com/acme/alpha", "v1.0.0"),
            ("example.com/gamma/v2", "v2.1.0"),
        ],
    ];
    let mut out = Vec::new();
    for arch in ["amd64", "arm64"] {
        for set in sets {
            out.push(cbs_testkit::request_with("linux", arch, None, set));
        }
    }
    out
}

/// When to kill: the owner of the first build that reaches each of these points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Point {
    Resolve,
    Compile,
    AfterCompile,
}

fn point(e: &Event) -> Option<Point> {
    match e {
        Event::StepStarted(s) if s.step == "tidy_module" => Some(Point::Resolve),
        Event::StepStarted(s) if s.step == "compile" => Some(Point::Compile),
        Event::StepFinished(s) if s.step == "compile" => Some(Point::AfterCompile),
        _ => None,
    }
}

fn our_containers(ids: &[String]) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "--filter",
            "label=org.caddy-build-server.managed",
            "--format",
            "{{.ID}} {{.Label \"org.caddy-build-server.worker\"}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| ids.iter().any(|id| l.ends_with(&format!(" {id}"))))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_workers_lose_no_build_and_build_none_twice() {
    let db = TestDb::new().await;
    let proxy = FixtureProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = cbs_testkit::signing_key(dir.path());
    let config = dir.path().join("config.yml");
    let c = cbs_testkit::role_config(&db, &proxy.url(), dir.path(), "unused");
    std::fs::write(
        &config,
        format!(
            r#"database:
  url: "{db}"
  pool_size: 4
notify:
  poll_interval: 1s
worker:
  id: "{{{{ env('WORKER_ID') }}}}"
  lease: 3s
  claim_poll_interval: 500ms
  max_concurrent_builds: 2
  build_dir: {build_dir}
  cache_dir: {cache_dir}
  stop_timeout: 60s
  docker:
    image: {image}
    path: /usr/local/go/bin
    user: "{user}"
go:
  proxy: {goproxy}
  sumdb: "off"
storage:
  dir: {storage}
signing:
  key_file: {key}
janitor:
  poll_interval: 1s
  leader_check_interval: 500ms
  max_attempts: 10
  retry_backoff: 200ms
"#,
            db = db.url,
            build_dir = c.worker.build_dir.display(),
            cache_dir = c.worker.cache_dir.display(),
            image = c.worker.docker.image,
            user = c.worker.docker.user,
            goproxy = proxy.url(),
            storage = c.storage.dir.display(),
            key = key_file.display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("processes.log");
    let ids: Vec<String> = (0..WORKERS)
        .map(|i| format!("kill-test-{}-{i}", std::process::id()))
        .collect();
    let mut workers: HashMap<String, Child> = ids
        .iter()
        .map(|id| (id.clone(), spawn(&config, "worker", id, &log)))
        .collect();
    let mut janitor = spawn(&config, "janitor", "", &log);

    let token = CancellationToken::new();
    let _stop = token.clone().drop_guard();
    let app = App::new(c, &token).unwrap();
    let mut any = app.hub.watch_any();
    let mut keys: Vec<BuildKey> = Vec::new();
    for r in requests() {
        let key = r.key();
        app.store.request_build(&key, &r).await.unwrap();
        keys.push(key);
    }
    let all: HashSet<BuildKey> = keys.iter().cloned().collect();
    assert_eq!(all.len(), 30);

    // Watch the global feed; kill at each point twice (different builds).
    let mut cursor = GlobalCursor::default();
    let mut kills: HashMap<Point, usize> = HashMap::new();
    // build key and attempt of a killed worker's builds -> when it was killed
    let mut pending_rescue: HashMap<(BuildKey, u32), Instant> = HashMap::new();
    let mut owner_of: HashMap<BuildKey, (String, u32)> = HashMap::new();
    let mut rescue_times: Vec<Duration> = Vec::new();
    let mut requeue_times: Vec<Duration> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut done: HashSet<BuildKey> = HashSet::new();
    while done.len() < all.len() {
        assert!(
            Instant::now() < deadline,
            "not every build finished: {} of 30; see {}",
            done.len(),
            log.display()
        );
        any.borrow_and_update();
        let page = app.store.feed(cursor, 500, &[]).await.unwrap().0;
        if let Some(last) = page.last() {
            cursor = GlobalCursor {
                tx_id: last.tx_id,
                position: last.position,
            };
        }
        for e in &page {
            match &e.event {
                Event::Requeued(q) => {
                    if let Some(at) = pending_rescue.get(&(e.key.clone(), q.attempt)) {
                        requeue_times.push(at.elapsed());
                    }
                }
                Event::Claimed(c) => {
                    if let Some(at) = pending_rescue.remove(&(e.key.clone(), c.attempt - 1)) {
                        rescue_times.push(at.elapsed());
                    }
                    owner_of.insert(e.key.clone(), (c.worker.clone(), c.attempt));
                }
                Event::Succeeded(_) => {
                    done.insert(e.key.clone());
                }
                Event::GaveUp(g) => panic!("build {} gave up: {}", e.key, g.message),
                Event::Failed(f) if f.kind == cbs_events::FailureKind::Permanent => {
                    panic!("build {} failed: {}", e.key, f.message)
                }
                ev => {
                    let Some(p) = point(ev) else { continue };
                    let n = kills.entry(p).or_default();
                    if *n >= 2 {
                        continue;
                    }
                    let Some((worker, _)) = owner_of.get(&e.key).cloned() else {
                        continue;
                    };
                    *n += 1;
                    let mut child = workers.remove(&worker).unwrap();
                    child.kill().unwrap(); // SIGKILL
                    child.wait().unwrap();
                    let killed = Instant::now();
                    for (k, (w, attempt)) in &owner_of {
                        if *w == worker && !done.contains(k) {
                            pending_rescue.insert((k.clone(), *attempt), killed);
                        }
                    }
                    eprintln!("killed {worker} at {p:?} of {}", e.key);
                    // The same worker comes back (its start removes its orphaned containers).
                    workers.insert(worker.clone(), spawn(&config, "worker", &worker, &log));
                }
            }
        }
        if page.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(2), any.changed()).await;
        }
    }
    assert_eq!(
        kills.values().sum::<usize>(),
        6,
        "every kill happened: {kills:?}"
    );

    // Stop everything cleanly (SIGTERM): the workers are idle and exit at once.
    for (_, mut child) in workers.drain() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let status = child.wait().unwrap();
        assert!(status.success(), "a worker exited with {status}");
    }
    let _ = Command::new("kill")
        .args(["-TERM", &janitor.id().to_string()])
        .status();
    assert!(janitor.wait().unwrap().success());

    // Exactly one success per build, and every artifact verifies.
    let public = std::fs::read_to_string(cbs_signing::public_key_path(&key_file)).unwrap();
    for key in &keys {
        let b = app.store.build(key).await.unwrap().unwrap();
        assert_eq!(b.status, Status::Succeeded);
        let events = app.store.events(key, 0, 10_000).await.unwrap();
        let successes = events
            .iter()
            .filter(|r| matches!(r.event, Event::Succeeded(_)))
            .count();
        assert_eq!(successes, 1, "build {key} succeeded {successes} times");
        let a = b.artifact.unwrap();
        let path = app.config.storage.dir.join(&a.location);
        let binary = std::fs::read(path.join("caddy")).unwrap();
        use sha2::Digest;
        assert_eq!(hex::encode(sha2::Sha256::digest(&binary)), a.sha256);
        let sig = std::fs::read_to_string(path.join("caddy.minisig")).unwrap();
        cbs_signing::verify(&public, &sig, std::io::Cursor::new(&binary))
            .unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    let left = our_containers(&ids);
    assert!(left.is_empty(), "containers left behind: {left:?}");
    rescue_times.sort();
    requeue_times.sort();
    eprintln!("worker death -> its build requeued by the janitor (lease 3 s): {requeue_times:?}");
    eprintln!("worker death -> its build claimed again (lease 3 s): {rescue_times:?}");
    assert!(!rescue_times.is_empty());
}
