//! A worker whose clock is off by a minute (libfaketime) neither loses nor doubles a build:
//! leases are renewed until a time of the database's clock, which the janitor's rescue
//! compares with. A worker a minute behind used to write leases that had already expired:
//! the janitor rescued every build it held, again and again.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cbs_events::Event;
use cbs_projections::Status;
use cbs_roles::App;
use cbs_testkit::{FixtureProxy, TestDb};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_caddy-build-server");

struct Role(Child);

impl Drop for Role {
    fn drop(&mut self) {
        // faketime runs the worker as its child: kill the whole process group.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_a_skewed_clock_keeps_its_builds() {
    if Command::new("faketime").arg("-h").output().is_err() {
        panic!("libfaketime's `faketime` is needed (apt-get install faketime)");
    }
    let db = TestDb::new().await;
    let proxy = FixtureProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = cbs_testkit::signing_key(dir.path());
    let mut c = cbs_testkit::role_config(&db, &proxy.url(), dir.path(), "unused");
    c.janitor.poll_interval = Duration::from_millis(500);
    c.janitor.leader_check_interval = Duration::from_millis(500);
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            r#"database:
  url: "{db}"
  pool_size: 4
worker:
  id: "{{{{ env('WORKER_ID') }}}}"
  lease: 3s
  claim_poll_interval: 500ms
  build_dir: {build_dir}
  cache_dir: {cache_dir}
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
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let app = App::new(c, &shutdown).unwrap();
    // The janitor, with the right clock, in this process.
    tokio::spawn(cbs_roles::janitor::run_services(
        app.clone(),
        shutdown.clone(),
    ));

    for (skew, plugin) in [("-60s", "v1.0.0"), ("+60s", "v1.1.0")] {
        let request =
            cbs_testkit::request_with("linux", "amd64", None, &[("github.com/acme/alpha", plugin)]);
        let key = request.key();
        app.store.request_build(&key, &request).await.unwrap();
        let log = std::fs::File::create(dir.path().join(format!("worker{skew}.log"))).unwrap();
        let _worker = Role(
            Command::new("faketime")
                .args(["-f", skew, BIN, "worker"])
                .env("CONFIG_PATH", &config)
                .env("WORKER_ID", format!("skewed{skew}"))
                .process_group(0)
                // Only the wall clock is off, as on a host whose time is wrong.
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let mut waiter = app.hub.watch_build(&key);
        let until = Instant::now() + Duration::from_secs(240);
        let build = loop {
            let b = app.store.build(&key).await.unwrap().unwrap();
            if b.is_terminal() || b.status == Status::Succeeded {
                break b;
            }
            assert!(
                Instant::now() < until,
                "clock {skew}: the build never ended: {b:?}"
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), waiter.changed()).await;
        };
        assert_eq!(build.status, Status::Succeeded, "clock {skew}: {build:?}");
        let events = app.store.events(&key, 0, 1000).await.unwrap();
        let claims = events
            .iter()
            .filter(|e| matches!(e.event, Event::Claimed(_)))
            .count();
        let rescues = events
            .iter()
            .filter(|e| matches!(e.event, Event::Requeued(_)))
            .count();
        assert_eq!(
            (claims, rescues),
            (1, 0),
            "clock {skew}: claimed once, never rescued: {events:#?}"
        );
        // The lease was renewed at least once, to a time of the database's clock.
        let renewed = events.iter().any(|e| match &e.event {
            Event::LeaseRenewed(l) => (l.lease_expires_at - e.recorded_at).num_seconds().abs() <= 4,
            _ => false,
        });
        assert!(renewed, "clock {skew}: {events:#?}");
    }
}
