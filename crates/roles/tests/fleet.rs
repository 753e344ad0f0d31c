//! The fleet of deploy/compose.yml, run for real on this Docker engine, under faults:
//! Postgres, the S3 server, two api replicas behind Caddy, three workers driving the host's
//! engine, two janitors, each in its own container on the compose networks. The server
//! image is made from this build's binary (deploy/server.Dockerfile); the module proxy is
//! the fixture tree served by a Caddy file server in the fleet's network (the only addition,
//! in an override file). Everything the test asks goes through the load balancer on loopback.
//!
//! 30 builds (`CBS_CHAOS_BUILDS`) are requested through the load balancer while clients
//! long-poll every one, stream the events of some and wait on `/api/download` for others.
//! Meanwhile: a compiling worker is cut off from Postgres past its lease, then healed; a
//! compiling worker is paused past its lease, then resumed (the zombie); the S3 server is
//! cut off, then reconnected; a compiling worker and the leading janitor are killed and
//! Postgres is restarted; an api replica is killed while clients wait on it.
//!
//! Then: every build succeeded exactly once; every served binary has its recorded sha256
//! and verifies with stock minisign; no file of a fenced attempt is served; every waiting
//! client got its answer; `janitor rebuild-projections` finds no difference; no build
//! container is left. The test prints the timeline of each fault (fault, rescue, claim,
//! success) and the time to recovery.

mod compose;

use std::process::Command;
use std::time::{Duration, Instant};

use compose::{docker, run, submit, up, wait_build, wait_ready, Fleet, DEADLINE};

/// The builds: plugin sets on five platforms.
fn queries(n: usize) -> Vec<String> {
    let sets: [&[&str]; 6] = [
        &[],
        &["github.com/acme/alpha@v1.0.0"],
        &["github.com/acme/alpha@v1.1.0"],
        &["github.com/Acme/Beta@v0.2.0"],
        &["example.com/gamma/v2@v2.0.0"],
        &[
            "github.com/acme/alpha@v1.0.0",
            "github.com/Acme/Beta@v0.2.0",
        ],
    ];
    let platforms = [
        "os=linux&arch=amd64",
        "os=linux&arch=arm64",
        "os=windows&arch=amd64",
        "os=darwin&arch=arm64",
        "os=linux&arch=arm&arm=7",
    ];
    let mut out = Vec::new();
    for platform in platforms {
        for set in sets {
            let mut q = format!("{platform}&version=v2.8.4");
            for p in set {
                q.push_str(&format!("&p={p}"));
            }
            out.push(q);
        }
    }
    out.truncate(n);
    out
}

/// The global feed as the load balancer serves it, followed in the background.
#[derive(Clone, Default)]
struct Feed {
    events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    news: std::sync::Arc<tokio::sync::Notify>,
}

impl Feed {
    fn follow(&self, http: reqwest::Client, base: String) -> tokio::task::JoinHandle<()> {
        let feed = self.clone();
        tokio::spawn(async move {
            let mut after = String::from("0-0");
            loop {
                let page = async {
                    let r = http
                        .get(format!("{base}/api/events?after={after}&limit=1000"))
                        .send()
                        .await
                        .ok()?;
                    r.status().is_success().then_some(())?;
                    r.json::<serde_json::Value>().await.ok()
                };
                if let Some(p) = page.await {
                    let events = p["result"]["events"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default();
                    after = p["result"]["next"].as_str().unwrap_or(&after).to_owned();
                    if !events.is_empty() {
                        feed.events.lock().unwrap().extend(events);
                        feed.news.notify_waiters();
                        continue;
                    }
                }
                // The feed has no long-poll: read it again shortly (a failed read is retried
                // the same way: a replica may be down).
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }

    /// Events seen so far.
    fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// Waits until an event satisfies `pred`; returns it.
    async fn wait(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_from(0, what, pred).await
    }

    /// Waits until an event after the first `from` satisfies `pred`; returns it.
    async fn wait_from(
        &self,
        from: usize,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + DEADLINE;
        loop {
            let notified = self.news.notified();
            if let Some(e) = self
                .events
                .lock()
                .unwrap()
                .iter()
                .skip(from)
                .find(|e| pred(e))
            {
                return e.clone();
            }
            let left = until.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "never happened: {what}");
            let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), notified).await;
        }
    }

    /// The worker holding `key`'s `attempt` (from its `claimed` event).
    fn owner(&self, key: &str, attempt: u64) -> Option<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "claimed" && e["key"] == key && e["data"]["attempt"] == attempt)
            .and_then(|e| e["data"]["worker"].as_str().map(str::to_owned))
    }
}

/// database network).
fn leading_janitor(fleet: &Fleet) -> String {
    let pg = fleet.container("postgres");
    let addr = docker(&[
        "exec", &pg, "psql", "-U", "postgres", "-d", "caddy_builds", "-tAc",
        "SELECT host(a.client_addr) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE '% leader' LIMIT 1",
    ]);
    for j in ["janitor1", "janitor2"] {
        let c = fleet.container(j);
        let ips = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            &c,
        ]);
        if !addr.is_empty() && ips.split_whitespace().any(|ip| ip == addr) {
            return c;
        }
    }
    panic!("no janitor holds the leader lock (lock held from {addr:?})");
}

impl Feed {
    /// A compile step that starts from now on: the feed's length before it, its build,
    /// attempt and worker.
    async fn next_compile(&self) -> (usize, String, u64, String) {
        let from = self.len();
        let e = self
            .wait_from(from, "a compile step starts", |e| {
                e["type"] == "step_started" && e["data"]["step"] == "compile"
            })
            .await;
        let key = e["key"].as_str().unwrap().to_owned();
        let attempt = e["data"]["attempt"].as_u64().unwrap();
        let worker = self.owner(&key, attempt).unwrap();
        (from, key, attempt, worker)
    }

    /// After `key`'s `attempt` was rescued: when, the claim by a later attempt, the success.
    async fn recovery(&self, key: &str, attempt: u64) -> Vec<(String, Instant)> {
        let mut steps = Vec::new();
        self.wait("rescue", |e| {
            e["key"] == key && e["type"] == "requeued" && e["data"]["attempt"] == attempt
        })
        .await;
        steps.push(("rescued".to_owned(), Instant::now()));
        let claim = self
            .wait("claim by another attempt", |e| {
                e["key"] == key
                    && e["type"] == "claimed"
                    && e["data"]["attempt"].as_u64() > Some(attempt)
            })
            .await;
        let by = claim["data"]["worker"].as_str().unwrap_or("?");
        steps.push((format!("claimed by {by}"), Instant::now()));
        self.wait("success", |e| e["key"] == key && e["type"] == "succeeded")
            .await;
        steps.push(("succeeded".to_owned(), Instant::now()));
        steps
    }
}

/// Applies `fault` to the worker (service name, container) of a compile that starts from
/// now on, and `heal` once its attempt was rescued or ended. Fixture builds compile in
/// seconds: a fault that lands after the attempt ended is tried again on the next compile,
/// at most `tries` times. Returns the recovery and the fenced attempt.
async fn fault_a_compile<A, H>(
    feed: &Feed,
    fleet: &Fleet,
    fault: &'static str,
    tries: usize,
    apply: impl Fn(&str, &str) -> A,
    heal: impl Fn(&str, &str) -> H,
) -> (Recovery, (String, u64)) {
    for _ in 0..tries {
        let (from, key, attempt, worker) = feed.next_compile().await;
        let victim = fleet.container(&worker);
        let at = Instant::now();
        apply(&worker, &victim);
        let hit = rescued_or_ended(feed, from, &key, attempt).await;
        heal(&worker, &victim);
        if hit {
            let steps = feed.recovery(&key, attempt).await;
            let fenced = (key.clone(), attempt);
            return (
                Recovery {
                    fault,
                    key,
                    at,
                    steps,
                },
                fenced,
            );
        }
    }
    panic!("{fault}: no compile was caught in {tries} tries");
}

/// What became of `key`'s `attempt` after a fault: `true` when it was rescued (requeued),
/// `false` when it ended on its own first (the fault came too late).
async fn rescued_or_ended(feed: &Feed, from: usize, key: &str, attempt: u64) -> bool {
    let e = feed
        .wait_from(from, "the attempt's rescue or end", |e| {
            e["key"] == key
                && e["data"]["attempt"] == attempt
                && ["requeued", "succeeded", "failed"].contains(&e["type"].as_str().unwrap_or(""))
        })
        .await;
    e["type"] == "requeued"
}

/// A fault and what followed it, for the report.
struct Recovery {
    fault: &'static str,
    key: String,
    at: Instant,
    steps: Vec<(String, Instant)>,
}

impl Recovery {
    fn print(&self, start: Instant) {
        let mut line = format!(
            "{:>7.1}s {}{}",
            (self.at - start).as_secs_f64(),
            self.fault,
            if self.key.is_empty() {
                String::new()
            } else {
                format!(" ({})", &self.key[..12])
            }
        );
        for (what, t) in &self.steps {
            line.push_str(&format!(" -> {what} +{:.1}s", (*t - self.at).as_secs_f64()));
        }
        eprintln!("{line}");
    }
}

/// Reads an event stream to its `result`, reconnecting with Last-Event-ID when it drops.
async fn follow_stream(http: reqwest::Client, base: String, key: String) -> Result<String, String> {
    let until = Instant::now() + DEADLINE;
    let mut last_id: Option<String> = None;
    let mut ids = std::collections::HashSet::new();
    while Instant::now() < until {
        let mut req = http.get(format!("{base}/api/build/{key}/events"));
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id);
        }
        let Ok(mut resp) = req.send().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if !resp.status().is_success() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut buf = String::new();
        let mut event = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(nl) = buf.find('\n') {
                let line: String = buf.drain(..=nl).collect();
                let line = line.trim_end();
                if let Some(id) = line.strip_prefix("id: ") {
                    if !ids.insert(id.to_owned()) {
                        return Err(format!("event {id} of {key} delivered twice"));
                    }
                    last_id = Some(id.to_owned());
                } else if let Some(e) = line.strip_prefix("event: ") {
                    event = e.to_owned();
                } else if let Some(data) = line.strip_prefix("data: ") {
                    if event == "result" {
                        return Ok(data.to_owned());
                    }
                }
            }
        }
    }
    Err(format!("the stream of {key} never ended"))
}

/// Waits on `/api/download` until it answers the binary (503 and dropped connections are
/// retried, as a client of the compat API does); returns its sha256.
async fn download_wait(
    http: reqwest::Client,
    base: String,
    query: String,
) -> Result<String, String> {
    let until = Instant::now() + DEADLINE;
    while Instant::now() < until {
        let Ok(resp) = http
            .get(format!("{base}/api/download?{query}"))
            .send()
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if resp.status() != 200 {
            // 503 after the wait ran out (or a replica down): ask again, as a client does.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let Ok(bytes) = resp.bytes().await else {
            continue;
        };
        use sha2::Digest;
        return Ok(hex::encode(sha2::Sha256::digest(&bytes)));
    }
    Err(format!("/api/download?{query} never answered"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_loses_nothing_and_doubles_nothing_under_faults() {
    let builds: usize = std::env::var("CBS_CHAOS_BUILDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::Builder::new()
        .prefix("cbs-fleet-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let fleet = up(dir.path());
    let base = format!("http://{}", fleet.lb);
    let http = reqwest::Client::new();
    wait_ready(&http, &base).await;
    let start = Instant::now();
    let feed = Feed::default();
    let follower = feed.follow(http.clone(), base.clone());

    // The builds, and their clients.
    let queries = queries(builds);
    let mut keys = Vec::new();
    for q in &queries {
        keys.push(submit(&http, &base, q).await);
    }
    let mut clients = tokio::task::JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        let (h, b, k) = (http.clone(), base.clone(), key.clone());
        clients.spawn(async move {
            let body = wait_build(&h, &b, &k).await;
            Ok::<_, String>(format!("long-poll {k}: {}", body["result"]["status"]))
        });
        let (h, b, k) = (http.clone(), base.clone(), key.clone());
        if i % 3 == 0 {
            clients
                .spawn(async move { follow_stream(h, b, k).await.map(|d| format!("stream: {d}")) });
        } else if i % 3 == 1 {
            let q = queries[i].clone();
            clients.spawn(async move {
                download_wait(h, b, q)
                    .await
                    .map(|s| format!("download sha256 {s}"))
            });
        }
    }

    let mut report: Vec<Recovery> = Vec::new();
    let mut fenced: Vec<(String, u64)> = Vec::new();
    let db_net = format!("{}_db", fleet.project);
    let storage_net = format!("{}_storage", fleet.project);

    // 1. A compiling worker cut off from Postgres past its lease, then healed.
    let (r, f) = fault_a_compile(
        &feed,
        &fleet,
        "partition worker from Postgres",
        5,
        |_, victim| docker(&["network", "disconnect", &db_net, victim]),
        |worker, victim| docker(&["network", "connect", "--alias", worker, &db_net, victim]),
    )
    .await;
    report.push(r);
    fenced.push(f);

    // 2. The S3 server cut off while builds publish, then reconnected.
    let s3 = fleet.container("s3");
    let at = Instant::now();
    docker(&["network", "disconnect", &storage_net, &s3]);
    let from = feed.len();
    let failed = tokio::time::timeout(
        Duration::from_secs(90),
        feed.wait_from(from, "a publish fails", |e| {
            e["type"] == "failed" && e["data"]["kind"] == "retryable"
        }),
    )
    .await
    .ok();
    // With its service name as alias: a reconnected container is found by its container
    // name only, and the fleet knows it as `s3`.
    docker(&["network", "connect", "--alias", "s3", &storage_net, &s3]);
    let mut steps = vec![("reconnected".to_owned(), Instant::now())];
    let mut s3_key = String::new();
    if let Some(f) = failed {
        s3_key = f["key"].as_str().unwrap().to_owned();
        steps.insert(0, ("upload failed (retryable)".to_owned(), Instant::now()));
        let k = s3_key.clone();
        feed.wait("retry", |e| {
            e["key"] == k.as_str() && e["type"] == "requeued"
        })
        .await;
        steps.push(("retried".to_owned(), Instant::now()));
        feed.wait("success after the S3 cut", |e| {
            e["key"] == k.as_str() && e["type"] == "succeeded"
        })
        .await;
        steps.push(("succeeded".to_owned(), Instant::now()));
    }
    report.push(Recovery {
        fault: "S3 cut off",
        key: s3_key,
        at,
        steps,
    });

    // 3. A compiling worker paused past its lease, then resumed (the zombie).
    let (r, f) = fault_a_compile(
        &feed,
        &fleet,
        "pause worker past its lease",
        5,
        |_, victim| docker(&["pause", victim]),
        |_, victim| docker(&["unpause", victim]),
    )
    .await;
    report.push(r);
    fenced.push(f);

    // 4. A compiling worker and the leading janitor killed; Postgres restarted. (Every try
    // restarts Postgres: at most three.)
    let (r, f) = fault_a_compile(
        &feed,
        &fleet,
        "kill worker and leading janitor, restart Postgres",
        3,
        |_, victim| {
            docker(&["kill", victim]);
            let janitor = leading_janitor(&fleet);
            docker(&["kill", &janitor]);
            docker(&["restart", "-t", "2", &fleet.container("postgres")]);
            docker(&["start", victim]);
            docker(&["start", &janitor]);
        },
        |_, _| {},
    )
    .await;
    report.push(r);
    fenced.push(f);

    // 5. An api replica killed while clients wait on it.
    let api = fleet.container("api1");
    let at = Instant::now();
    docker(&["kill", &api]);
    let mut steps = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{base}/api/events?limit=1")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(
            Instant::now() < until,
            "the load balancer never answered without api1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    steps.push(("answered by the other replica".to_owned(), Instant::now()));
    docker(&["start", &api]);
    report.push(Recovery {
        fault: "kill an api replica",
        key: String::new(),
        at,
        steps,
    });

    // Every client gets its answer.
    while let Some(r) = clients.join_next().await {
        let answer = r.unwrap();
        assert!(answer.is_ok(), "{answer:?}");
    }
    follower.abort();

    eprintln!("timeline (seconds from the first request):");
    for r in &report {
        r.print(start);
    }

    let public_key = dir.path().join("minisign.key.pub");
    for key in &keys {
        let status = wait_build(&http, &base, key).await;
        assert_eq!(status["result"]["status"], "complete", "{status}");
        let sha = status["result"]["artifact"]["sha256"].as_str().unwrap();
        let history: serde_json::Value = http
            .get(format!("{base}/api/build/{key}/history"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let events = history["result"]["events"].as_array().unwrap();
        let successes: Vec<_> = events.iter().filter(|e| e["type"] == "succeeded").collect();
        assert_eq!(successes.len(), 1, "{history}");
        // A fenced attempt wrote nothing after its rescue, and its files are not served.
        for (k, a) in &fenced {
            if k == key {
                assert_ne!(successes[0]["data"]["attempt"], *a, "{history}");
                let rescue = events
                    .iter()
                    .position(|e| e["type"] == "requeued" && e["data"]["attempt"] == *a)
                    .unwrap();
                let late: Vec<_> = events[rescue + 1..]
                    .iter()
                    .filter(|e| e["data"]["attempt"] == *a)
                    .collect();
                assert!(
                    late.is_empty(),
                    "fenced attempt {a} of {key} wrote {late:?}"
                );
                let location = status["result"]["artifact"]["location"]
                    .as_str()
                    .unwrap_or_default();
                assert!(!location.contains(&format!("/{a}/")), "{location}");
            }
        }
        let binary = http
            .get(format!("{base}/api/build/{key}/download"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let got = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&binary))
        };
        assert_eq!(got, sha, "build {key}");
        let sig = http
            .get(format!("{base}/api/build/{key}/download.minisig"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let file = dir.path().join(format!("{key}.bin"));
        std::fs::write(&file, &binary).unwrap();
        std::fs::write(dir.path().join(format!("{key}.bin.minisig")), &sig).unwrap();
        run(Command::new("minisign")
            .args(["-V", "-q", "-p"])
            .arg(&public_key)
            .arg("-m")
            .arg(&file));
    }
    // The projections are the fold of the log.
    let janitor = fleet.container("janitor1");
    let report = run(Command::new("docker").args([
        "exec",
        &janitor,
        "caddy-build-server",
        "janitor",
        "rebuild-projections",
    ]));
    assert!(report.contains(": 0 difference(s)"), "{report}");
    // No build container is left.
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        "label=org.caddy-build-server.managed",
    ]);
    assert!(left.is_empty(), "containers left: {left}");
}
