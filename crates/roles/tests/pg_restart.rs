//! Postgres restarts in the middle of a build: the api, the worker and the janitor
//! reconnect, and a long-poll and an SSE stream that were waiting still get their answer.
//! Its own test binary and its own server (the shared test cluster cannot be restarted).

use std::sync::Arc;
use std::time::Duration;

use cbs_projections::Status;
use cbs_roles::App;
use cbs_testkit::{FixtureProxy, PgServer};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A TCP forwarder to `target` that holds every connection until released: the build's
/// resolve step waits on it.
async fn holding_proxy(target: std::net::SocketAddr, release: Arc<Notify>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (release, released) = (release.clone(), released.clone());
        tokio::spawn(async move {
            release.notified().await;
            released.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    let (tx, _) = tokio::sync::watch::channel(());
    let tx = Arc::new(tx);
    {
        let (release, tx) = (release.clone(), tx.clone());
        tokio::spawn(async move {
            release.notified().await;
            tx.send_replace(());
        });
    }
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            let mut go = tx.subscribe();
            let released = released.clone();
            tokio::spawn(async move {
                if !released.load(std::sync::atomic::Ordering::SeqCst) {
                    let _ = go.changed().await;
                }
                if let Ok(mut out) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_reconnect_and_waiting_clients_get_their_answer_after_a_postgres_restart() {
    let pg = PgServer::start().unwrap();
    {
        let (client, conn) = tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client.execute("CREATE DATABASE t", &[]).await.unwrap();
    }
    let proxy = FixtureProxy::start().await;
    let release = Arc::new(Notify::new());
    let proxy_addr: std::net::SocketAddr =
        proxy.url().trim_start_matches("http://").parse().unwrap();
    let held = holding_proxy(proxy_addr, release.clone()).await;
    let dir = tempfile::tempdir().unwrap();

    // role_config wants a TestDb only for its URL: build the config by hand around it.
    let mut config = cbs_config::Config::default();
    config.database.url = cbs_config::DatabaseUrl::new(pg.url("t"));
    config.database.connect_timeout = Duration::from_secs(2);
    config.notify.poll_interval = Duration::from_secs(1);
    config.notify.max_reconnect_backoff = Duration::from_millis(500);
    config.go.proxy = proxy.url();
    config.go.sumdb = "off".into();
    config.storage.dir = dir.path().join("artifacts");
    config.signing.key_file = cbs_testkit::signing_key(dir.path());
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.api.submissions_per_minute = 0;
    config.janitor.poll_interval = Duration::from_secs(1);
    config.janitor.leader_check_interval = Duration::from_millis(300);
    let w = &mut config.worker;
    w.id = "pg-restart-worker".into();
    // Long enough that no renewal (an event) wakes the long-poll before the restart.
    w.lease = Duration::from_secs(60);
    w.claim_poll_interval = Duration::from_millis(500);
    w.executor = cbs_config::ExecutorKind::Docker;
    w.build_dir = dir.path().join("builds");
    w.cache_dir = dir.path().join("cache");
    w.docker.image = cbs_testkit::builder_image();
    w.docker.path = "/usr/local/go/bin".into();
    w.docker.user = cbs_testkit::builder_user();
    cbs_roles::janitor::migrate(&config).await.unwrap();

    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let app = App::new(config.clone(), &shutdown).unwrap();
    let listener = cbs_roles::api::bind(&app.config).await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(cbs_roles::api::run(app.clone(), listener, shutdown.clone()));
    let mut worker_config = config.clone();
    worker_config.go.proxy = held;
    let worker_app = App::new(worker_config, &shutdown).unwrap();
    tokio::spawn(cbs_roles::worker::run(worker_app, shutdown.clone()));
    tokio::spawn(cbs_roles::janitor::run_services(
        app.clone(),
        shutdown.clone(),
    ));

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let query = "os=linux&arch=amd64&p=github.com/acme/alpha";
    let json: Value = client
        .post(format!("{base}/api/build?{query}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key: cbs_domain::BuildKey = json["result"]["key"].as_str().unwrap().parse().unwrap();
    // Wait until the build hangs in resolve (its step started, the proxy holds it).
    let mut waiter = app.hub.watch_build(&key);
    let running = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let b = app.store.build(&key).await.unwrap().unwrap();
            if b.status == Status::Running && b.current_step.as_deref() == Some("pin_versions") {
                return b;
            }
            waiter.changed().await;
        }
    })
    .await
    .expect("the build reaches pin_versions");
    drop(waiter);

    // A long-poll and an SSE stream wait on the build.
    let long_poll = {
        let url = format!(
            "{base}/api/build/{key}?wait=120s&after={}",
            running.last_seq
        );
        let c = client.clone();
        tokio::spawn(async move {
            let r = c.get(url).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let (streaming_tx, streaming) = tokio::sync::oneshot::channel();
    let sse = {
        let url = format!("{base}/api/build/{key}/events");
        let c = client.clone();
        tokio::spawn(async move {
            let mut r = c.get(url).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200);
            // The first chunk (the replay) means the stream is subscribed and live.
            let mut text = String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()).into_owned();
            let _ = streaming_tx.send(());
            // The stream ends after `result`.
            while let Some(chunk) = r.chunk().await.unwrap() {
                text.push_str(&String::from_utf8_lossy(&chunk));
            }
            text
        })
    };
    tokio::time::timeout(Duration::from_secs(30), streaming)
        .await
        .unwrap()
        .unwrap();
    // The long-poll is parked too: the hub watches the build for it (the test's own
    // waiter is gone).
    tokio::time::timeout(Duration::from_secs(30), async {
        while app.hub.watched_builds() < 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();

    pg.restart().unwrap();
    // The proxy answers again; the build goes on and records its events after the restart.
    release.notify_waiters();

    let (status, body) = tokio::time::timeout(Duration::from_secs(180), long_poll)
        .await
        .expect("the long-poll answered")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body["result"]["last_seq"].as_u64().unwrap_or(0) > u64::from(running.last_seq)
            || body["result"]["seq"].as_u64().unwrap_or(0) > u64::from(running.last_seq),
        "the answer is newer than the wait: {body}"
    );
    let stream = tokio::time::timeout(Duration::from_secs(180), sse)
        .await
        .expect("the SSE stream ended")
        .unwrap();
    assert!(stream.contains("event: result"), "{stream}");
    assert!(stream.contains("\"success\":true"), "{stream}");
    // And the binary is there.
    let r = client
        .get(format!("{base}/api/build/{key}/download"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.bytes().await.unwrap().len() > 100_000);
}
