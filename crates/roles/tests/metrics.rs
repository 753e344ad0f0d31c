//! Metrics of every role, scraped from real processes during builds: `caddy-build-server
//! api` (its own port), `worker` and `janitor` (their `metrics.listen`). The test requests a
//! build that succeeds, one whose plugin does not compile and one the rate limit refuses;
//! holds a build's lease as a worker that never renews it, so that the janitor rescues it;
//! waits on the build with an event stream and a long-poll; then starts the worker. Each
//! role's counters and histograms must have moved by what happened, and the waiter gauges
//! must go back down when the waits end. The roles log JSON: the worker's lines of a build
//! name its key and attempt, and the api's line of a refused request names the request id
//! its error answer showed.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cbs_projections::Status;
use cbs_roles::App;
use cbs_testkit::{FixtureProxy, TestDb};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_caddy-build-server");
const DEADLINE: Duration = Duration::from_secs(240);

/// A child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Role(Child);

impl Drop for Role {
    fn drop(&mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        // Its exit, within 20 s; SIGKILL after.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            if rx.recv_timeout(Duration::from_secs(20)).is_err() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        });
        let _ = self.0.wait();
        let _ = tx.send(());
        let _ = waiter.join();
    }
}

fn spawn(config: &std::path::Path, role: &str, metrics: &str, log: &std::path::Path) -> Role {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Role(
        Command::new(BIN)
            .arg(role)
            .env("CONFIG_PATH", config)
            .env("METRICS_LISTEN", metrics)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scrape: series (`name{labels}`) -> value.
#[derive(Debug, Default)]
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        assert!(text.ends_with("# EOF\n"), "not OpenMetrics text: {text}");
        Scrape(
            text.lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .map(|l| {
                    let (series, value) = l.rsplit_once(' ').expect("series and value");
                    (series.to_owned(), value.parse().expect("a number"))
                })
                .collect(),
        )
    }

    /// The sum of every series of `name` whose labels include all of `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

async fn scrape(http: &reqwest::Client, url: &str) -> Scrape {
    let resp = http.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    Scrape::parse(&resp.text().await.unwrap())
}

/// Scrapes `url` until `ok` holds (a deadline, not a sleep: the figure is what is waited
/// for).
async fn scrape_until(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    ok: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let s = scrape(http, url).await;
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < until, "{url}: {what} never held: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `url` answers 200.
async fn up(http: &reqwest::Client, url: &str) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < until, "{url} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `key`'s build satisfies `ok`.
async fn build_until(
    app: &App,
    key: &cbs_domain::BuildKey,
    what: &str,
    ok: impl Fn(&cbs_projections::BuildState) -> bool,
) -> cbs_projections::BuildState {
    let mut waiter = app.hub.watch_build(key);
    let until = Instant::now() + DEADLINE;
    loop {
        let b = app.store.build(key).await.unwrap().unwrap();
        if ok(&b) {
            return b;
        }
        let left = until.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{key}: {what} never happened: {b:?}");
        let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), waiter.changed()).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_role_reports_what_happened() {
    let db = TestDb::new().await;
    let proxy = FixtureProxy::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = cbs_testkit::signing_key(dir.path());
    let c = cbs_testkit::role_config(&db, &proxy.url(), dir.path(), "metrics-worker");
    let api_port = free_port();
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            r#"database:
  url: "{db}"
  pool_size: 4
notify:
  poll_interval: 1s
api:
  listen: 127.0.0.1:{api_port}
  # Two new builds at once, then one a minute: the third is refused.
  submissions_per_minute: 1
  submission_burst: 2
worker:
  id: metrics-worker
  lease: 5s
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
janitor:
  poll_interval: 1s
  leader_check_interval: 500ms
metrics:
  listen: "{{{{ env('METRICS_LISTEN') }}}}"
log:
  format: json
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
    let log = |role: &str| dir.path().join(format!("{role}.log"));
    let base = format!("http://127.0.0.1:{api_port}");
    let api_metrics = format!("{base}/metrics");
    let janitor_metrics = format!("http://127.0.0.1:{}/metrics", free_port());
    let worker_metrics = format!("http://127.0.0.1:{}/metrics", free_port());
    let addr = |url: &str| {
        url.trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_owned()
    };
    let _janitor = spawn(&config, "janitor", &addr(&janitor_metrics), &log("janitor"));
    let http = reqwest::Client::new();
    up(&http, &janitor_metrics).await;
    let _api = spawn(&config, "api", "", &log("api"));
    up(&http, &format!("{base}/readyz")).await;

    // The containers' HEALTHCHECK: the metrics listener's /healthz when metrics.listen is
    // set (janitor, worker), else the api's; a server that does not answer fails it.
    let healthcheck = |metrics: &str, url: Option<&str>| {
        let mut cmd = Command::new(BIN);
        cmd.arg("healthcheck")
            .env("CONFIG_PATH", &config)
            .env("METRICS_LISTEN", metrics)
            .stderr(Stdio::null());
        if let Some(u) = url {
            cmd.args(["--url", u]);
        }
        cmd.status().unwrap().success()
    };
    assert!(healthcheck(&addr(&janitor_metrics), None));
    assert!(healthcheck("", None), "the api's /healthz");
    let closed = format!("http://127.0.0.1:{}/healthz", free_port());
    assert!(!healthcheck("", Some(&closed)));

    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let app = App::new(c, &shutdown).unwrap();

    let api0 = scrape(&http, &api_metrics).await;
    let janitor0 = scrape(&http, &janitor_metrics).await;

    // Two new builds, then one the submission rate refuses.
    let submit = |plugin: &str| {
        let http = http.clone();
        let url = format!("{base}/api/build?os=linux&arch=amd64&p={plugin}");
        async move {
            let r = http.post(url).send().await.unwrap();
            let status = r.status().as_u16();
            let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, body, id)
        }
    };
    let (status, good, _) = submit("github.com/acme/alpha@v1.0.0").await;
    assert_eq!(status, 202, "{good}");
    let good: cbs_domain::BuildKey = good["result"]["key"].as_str().unwrap().parse().unwrap();
    let (status, broken, _) = submit("example.com/broken").await;
    assert_eq!(status, 202, "{broken}");
    let broken: cbs_domain::BuildKey = broken["result"]["key"].as_str().unwrap().parse().unwrap();
    let (status, refused, refused_id) = submit("github.com/acme/alpha@v1.1.0").await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["id"], refused_id.as_str(), "{refused}");

    // A worker that claims the good build and dies (never renews): the janitor rescues it.
    let claimed = app
        .store
        .claim("metrics-ghost", Duration::from_secs(1))
        .await
        .unwrap()
        .expect("a queued build");
    build_until(&app, &claimed.key, "rescue", |b| {
        b.status == Status::Queued && b.attempt == claimed.attempt
    })
    .await;

    // Wait on the good build: an event stream and a long-poll.
    let sse = http
        .get(format!("{base}/api/build/{good}/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let long_poll = tokio::spawn({
        let http = http.clone();
        let url = format!("{base}/api/build/{good}?wait=50s");
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let waiting = scrape_until(&http, &api_metrics, "open waits", |s| {
        s.sum("cbs_waiters", &[("kind", "sse")]) >= 1.0
            && s.sum("cbs_waiters", &[("kind", "long_poll")]) >= 1.0
    })
    .await;
    assert_eq!(
        waiting.sum("cbs_queue_builds", &[("status", "queued")]),
        2.0,
        "both builds wait for a worker"
    );

    // Now the worker.
    let _worker = spawn(&config, "worker", &addr(&worker_metrics), &log("worker"));
    up(&http, &worker_metrics).await;
    build_until(&app, &good, "success", |b| b.status == Status::Succeeded).await;
    build_until(&app, &broken, "failure", |b| b.status == Status::Failed).await;
    let download = http
        .get(format!("{base}/api/build/{good}/download"))
        .send()
        .await
        .unwrap();
    assert_eq!(download.status(), 200);
    download.bytes().await.unwrap();
    drop(sse);
    let _ = long_poll.await;

    // The api: builds requested, refused, HTTP by route template, waits back to none,
    // notifications of the worker's events, storage reads.
    let api1 = scrape_until(&http, &api_metrics, "waits closed", |s| {
        s.sum("cbs_waiters", &[("kind", "sse")]) == 0.0
            && s.sum("cbs_waiters", &[("kind", "long_poll")]) == 0.0
    })
    .await;
    let d = |name: &str, labels: &[(&str, &str)]| api1.sum(name, labels) - api0.sum(name, labels);
    assert_eq!(d("cbs_builds_requested_total", &[]), 2.0);
    assert_eq!(
        d("cbs_rate_limited_total", &[("limit", "submissions")]),
        1.0
    );
    assert_eq!(
        d(
            "cbs_http_requests_total",
            &[
                ("route", "/api/build"),
                ("method", "POST"),
                ("status", "202")
            ]
        ),
        2.0
    );
    assert_eq!(
        d(
            "cbs_http_requests_total",
            &[
                ("route", "/api/build"),
                ("method", "POST"),
                ("status", "429")
            ]
        ),
        1.0
    );
    assert!(
        d(
            "cbs_http_requests_total",
            &[("route", "/api/build/{key}/events"), ("status", "200")]
        ) >= 1.0
    );
    assert!(
        d(
            "cbs_http_request_duration_seconds_count",
            &[("route", "/api/build/{key}/download"), ("method", "GET")]
        ) >= 1.0
    );
    assert!(d("cbs_notifications_received_total", &[]) >= 1.0);
    assert!(
        d(
            "cbs_storage_operation_duration_seconds_count",
            &[("backend", "fs"), ("op", "get")]
        ) >= 1.0
    );
    assert_eq!(api1.sum("cbs_queue_builds", &[("status", "queued")]), 0.0);
    assert_eq!(api1.sum("cbs_queue_builds", &[("status", "running")]), 0.0);

    // The worker (a new process: its counters start at zero).
    let worker = scrape(&http, &worker_metrics).await;
    let w = |name: &str, labels: &[(&str, &str)]| worker.sum(name, labels);
    assert_eq!(w("cbs_builds_claimed_total", &[]), 2.0);
    assert_eq!(w("cbs_builds_succeeded_total", &[]), 1.0);
    assert_eq!(w("cbs_builds_failed_total", &[("kind", "permanent")]), 1.0);
    assert_eq!(w("cbs_dispatch_latency_seconds_count", &[]), 2.0);
    assert_eq!(
        w(
            "cbs_build_duration_seconds_count",
            &[("os", "linux"), ("arch", "amd64"), ("outcome", "succeeded")]
        ),
        1.0
    );
    assert_eq!(
        w("cbs_build_duration_seconds_count", &[("outcome", "failed")]),
        1.0
    );
    // Both builds compiled (one failed at it).
    assert_eq!(
        w(
            "cbs_step_duration_seconds_count",
            &[("step", "compile"), ("os", "linux"), ("arch", "amd64")]
        ),
        2.0
    );
    assert!(w("cbs_step_duration_seconds_sum", &[("step", "compile")]) > 0.0);
    // Four steps each; one container per phase (resolve, compile) of each build.
    assert_eq!(w("cbs_step_duration_seconds_count", &[]), 8.0);
    let containers = w("cbs_containers_started_total", &[]);
    assert!(
        (4.0..=5.0).contains(&containers),
        "{containers} containers: one per phase, and one at start that compiles the step runner"
    );
    assert_eq!(w("cbs_container_failures_total", &[]), 0.0);
    // Binary, signature, checksum, provenance and its signature.
    assert!(
        w(
            "cbs_storage_operation_duration_seconds_count",
            &[("backend", "fs"), ("op", "put")]
        ) >= 4.0
    );
    assert_eq!(w("cbs_storage_errors_total", &[]), 0.0);

    // The janitor: the rescue, and the events it followed.
    let janitor1 = scrape(&http, &janitor_metrics).await;
    let j = |name: &str, labels: &[(&str, &str)]| {
        janitor1.sum(name, labels) - janitor0.sum(name, labels)
    };
    assert_eq!(j("cbs_builds_rescued_total", &[]), 1.0);
    assert_eq!(j("cbs_builds_given_up_total", &[]), 0.0);
    assert!(j("cbs_notifications_received_total", &[]) >= 1.0);
    assert!(j("cbs_backstop_reads_total", &[]) >= 1.0);
    // Nothing went missing on loopback.
    assert_eq!(janitor1.sum("cbs_lost_notifications_total", &[]), 0.0);

    // Logs (JSON, one object a line). The worker: every line logged in a build's span names
    // the build and the attempt; the good build's claim and end are there.
    let lines = |role: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(log(role))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{role}: {e}: {l}")))
            .collect()
    };
    let build_span = |line: &serde_json::Value| -> Option<serde_json::Value> {
        line["spans"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "build")
            .cloned()
    };
    let worker_lines = lines("worker");
    let mut of_good = Vec::new();
    for line in &worker_lines {
        if let Some(span) = build_span(line) {
            assert!(span["build.key"].is_string(), "{line}");
            assert!(span["attempt"].is_u64(), "{line}");
            assert!(span["worker.id"] == "metrics-worker", "{line}");
            if span["build.key"] == good.as_str() {
                of_good.push(line["message"].as_str().unwrap_or_default().to_owned());
            }
        }
    }
    for m in ["build claimed", "build finished"] {
        assert!(
            of_good.iter().any(|l| l == m),
            "{m:?} not among {of_good:?}"
        );
    }
    // The api: the refused request's line, found by the id its error answer showed.
    let api_lines = lines("api");
    let found = api_lines.iter().find(|l| {
        l["spans"].as_array().is_some_and(|spans| {
            spans
                .iter()
                .any(|s| s["name"] == "http" && s["request.id"] == refused_id.as_str())
        }) && l["status"] == 429
    });
    let found = found.unwrap_or_else(|| panic!("no log line of request {refused_id}"));
    assert_eq!(found["message"], "request refused", "{found}");
    assert_eq!(found["span"]["path"], "/api/build", "{found}");
}
