//! Horizontal figures of the fleet of deploy/compose.yml (issue 13, item 4), a benchmark
//! rather than a test (ignored; docs/benchmarks.md has the figures):
//!
//!   cargo test --release -p cbs-roles --test fleet_scale -- --ignored --nocapture
//!
//! 1. Builds completed per minute with 1, 2 and 3 workers on the same fixture workload:
//!    each round is `CBS_SCALE_BUILDS` (default 18) linux/amd64 builds of one Caddy
//!    version with the same plugin sets, a version no earlier round built (so every round
//!    compiles the same packages: the plugins against that Caddy). The fleet's one Go build
//!    cache is warmed first with a plain build of every version, and the round's stopped
//!    workers are stopped cleanly (docker-compose stop), its running ones healthy.
//! 2. Requests per api replica: `CBS_SCALE_CLIENTS` (default 16) clients asking for the
//!    status of a finished build through the load balancer for `CBS_SCALE_SECONDS`
//!    (default 10) seconds, with both replicas and with one.
//!
//! Every figure comes with the host's CPU use over its window (from /proc/stat) and the
//! containers' CPU shares sampled in the middle (docker stats): what limits the fleet.

mod compose;

use std::time::{Duration, Instant};

use compose::{docker, submit, up, wait_build, wait_ready, Fleet};

const VERSIONS: [&str; 3] = ["v2.7.6", "v2.8.4", "v2.9.0-beta.1"];

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The plugin sets of a round (18: every combination of alpha, Beta and gamma, all but the
/// empty one, which the warm-up built).
fn plugin_sets() -> Vec<Vec<&'static str>> {
    let alpha = [
        None,
        Some("github.com/acme/alpha@v1.0.0"),
        Some("github.com/acme/alpha@v1.1.0"),
    ];
    let beta = [None, Some("github.com/Acme/Beta@v0.2.0")];
    let gamma = [
        None,
        Some("example.com/gamma/v2@v2.0.0"),
        Some("example.com/gamma/v2@v2.1.0"),
    ];
    let mut out = Vec::new();
    for a in alpha {
        for b in beta {
            for g in gamma {
                let set: Vec<_> = [a, b, g].into_iter().flatten().collect();
                if !set.is_empty() {
                    out.push(set);
                }
            }
        }
    }
    out
}

fn query(version: &str, set: &[&str]) -> String {
    let mut q = format!("os=linux&arch=amd64&version={version}");
    for p in set {
        q.push_str(&format!("&p={p}"));
    }
    q
}

/// The host's CPU counters: (busy, total) jiffies over all cores.
fn cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn busy_share(from: (u64, u64), to: (u64, u64)) -> f64 {
    (to.0 - from.0) as f64 / (to.1 - from.1).max(1) as f64
}

/// The containers using the most CPU right now (docker stats), e.g. "go build 120%, pg 30%".
fn top_containers(project: &str) -> String {
    let out = docker(&["stats", "--no-stream", "--format", "{{.Name}} {{.CPUPerc}}"]);
    let mut rows: Vec<(String, f64)> = out
        .lines()
        .filter_map(|l| {
            let (name, pct) = l.rsplit_once(' ')?;
            let pct: f64 = pct.trim_end_matches('%').parse().ok()?;
            let name = name
                .strip_prefix(&format!("{project}_"))
                .map(|n| n.trim_end_matches("_1").to_owned())
                .unwrap_or_else(|| "build container".to_owned());
            Some((name, pct))
        })
        .collect();
    // Build containers summed.
    let builds: f64 = rows
        .iter()
        .filter(|(n, _)| n == "build container")
        .map(|(_, p)| p)
        .sum();
    rows.retain(|(n, _)| n != "build container");
    rows.push(("build containers".to_owned(), builds));
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows.iter()
        .take(4)
        .map(|(n, p)| format!("{n} {p:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Waits until the worker's container reports healthy (its /healthz on metrics.listen), from
/// the engine's own events.
async fn healthy(fleet: &Fleet, service: &str) {
    use tokio::io::AsyncBufReadExt;
    let c = fleet.container(service);
    // Subscribe first, then look: a change in between is seen either way.
    let mut events = tokio::process::Command::new("docker")
        .args(["events", "--format", "{{.Status}}", "--filter"])
        .arg(format!("container={c}"))
        .args(["--filter", "event=health_status"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    if docker(&["inspect", "-f", "{{.State.Health.Status}}", &c]) == "healthy" {
        return;
    }
    let mut lines = tokio::io::BufReader::new(events.stdout.take().unwrap()).lines();
    let became = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "health_status: healthy" {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(became, Ok(true), "{service} never became healthy");
}

/// Seconds between two RFC 3339 times.
fn between(a: &serde_json::Value, b: &serde_json::Value) -> f64 {
    let t =
        |v: &serde_json::Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    (t(b) - t(a)).num_milliseconds() as f64 / 1000.0
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: cargo test --release -p cbs-roles --test fleet_scale -- --ignored --nocapture"]
async fn builds_per_minute_with_1_2_3_workers_and_requests_per_api_replica() {
    let per_round = env_or("CBS_SCALE_BUILDS", 18) as usize;
    let clients = env_or("CBS_SCALE_CLIENTS", 16);
    let seconds = env_or("CBS_SCALE_SECONDS", 10);
    let dir = tempfile::Builder::new()
        .prefix("cbs-fleet-scale-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let fleet = up(dir.path());
    let base = format!("http://{}", fleet.lb);
    let http = reqwest::Client::new();
    wait_ready(&http, &base).await;

    // Warm the fleet's build cache: every version once, and the plugins' modules.
    let mut warm = Vec::new();
    for v in VERSIONS {
        warm.push(submit(&http, &base, &query(v, &[])).await);
    }
    for key in &warm {
        let s = wait_build(&http, &base, key).await;
        assert_eq!(s["result"]["status"], "complete", "{s}");
    }

    let sets = plugin_sets();
    let mut last_key = String::new();
    eprintln!("builds per round: {per_round} (linux/amd64, one Caddy version each)");
    for (round, version) in VERSIONS.iter().enumerate() {
        let workers = round + 1;
        let stop: Vec<String> = (workers + 1..=3).map(|w| format!("worker{w}")).collect();
        let start: Vec<String> = (1..=workers).map(|w| format!("worker{w}")).collect();
        if !stop.is_empty() {
            let mut c = fleet.compose();
            c.arg("stop").args(&stop);
            compose::run(&mut c);
        }
        let mut c = fleet.compose();
        c.arg("start").args(&start);
        compose::run(&mut c);
        for w in &start {
            healthy(&fleet, w).await;
        }

        let cpu0 = cpu();
        let t0 = Instant::now();
        let mut keys = Vec::new();
        for i in 0..per_round {
            keys.push(submit(&http, &base, &query(version, &sets[i % sets.len()])).await);
        }
        let sampler = {
            let project = fleet.project.clone();
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_secs(5));
                top_containers(&project)
            })
        };
        let mut build_secs = Vec::new();
        let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
        for key in &keys {
            let s = wait_build(&http, &base, key).await;
            assert_eq!(s["result"]["status"], "complete", "{s}");
            let h: serde_json::Value = http
                .get(format!("{base}/api/build/{key}/history"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let events = h["result"]["events"].as_array().unwrap();
            let claimed = events.iter().rfind(|e| e["type"] == "claimed").unwrap();
            let done = events.iter().find(|e| e["type"] == "succeeded").unwrap();
            build_secs.push(between(&claimed["time"], &done["time"]));
            *by_worker
                .entry(claimed["data"]["worker"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let busy = busy_share(cpu0, cpu());
        let top = sampler.await.unwrap();
        build_secs.sort_by(f64::total_cmp);
        eprintln!(
            "{workers} worker(s): {per_round} builds in {elapsed:.1} s = {:.1} builds/min; \
             claim to success median {:.1} s, max {:.1} s; per worker {by_worker:?}; \
             host CPU busy {:.0}%; at 5 s: {top}",
            per_round as f64 / elapsed * 60.0,
            build_secs[build_secs.len() / 2],
            build_secs[build_secs.len() - 1],
            busy * 100.0
        );
        last_key = keys[0].clone();
    }

    // Requests per api replica: status reads of a finished build through the balancer.
    for replicas in [2, 1] {
        if replicas == 1 {
            let mut c = fleet.compose();
            c.args(["stop", "api2"]);
            compose::run(&mut c);
            // The balancer's health check takes api2 out; make sure reads are answered.
            let until = Instant::now() + Duration::from_secs(30);
            let mut ok_in_row = 0;
            while ok_in_row < 20 {
                assert!(
                    Instant::now() < until,
                    "the balancer kept failing without api2"
                );
                let ok = http
                    .get(format!("{base}/api/build/{last_key}"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                ok_in_row = if ok { ok_in_row + 1 } else { 0 };
            }
        }
        let cpu0 = cpu();
        let stop_at = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (h, url) = (http.clone(), format!("{base}/api/build/{last_key}"));
            tasks.spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0u64;
                while Instant::now() < stop_at {
                    let t = Instant::now();
                    match h.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                            lat.push(t.elapsed());
                        }
                        _ => errors += 1,
                    }
                }
                (lat, errors)
            });
        }
        let mid = {
            let project = fleet.project.clone();
            tokio::task::spawn_blocking(move || {
                std::thread::sleep(Duration::from_secs(seconds / 2));
                top_containers(&project)
            })
        };
        let mut lat = Vec::new();
        let mut errors = 0;
        while let Some(r) = tasks.join_next().await {
            let (l, e) = r.unwrap();
            lat.extend(l);
            errors += e;
        }
        let busy = busy_share(cpu0, cpu());
        let top = mid.await.unwrap();
        lat.sort();
        let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        eprintln!(
            "{replicas} api replica(s), {clients} clients: {:.0} status reads/s ({:.0} per replica), \
             p50 {:.1} ms, p99 {:.1} ms, {errors} errors; host CPU busy {:.0}%; mid-run: {top}",
            lat.len() as f64 / seconds as f64,
            lat.len() as f64 / seconds as f64 / replicas as f64,
            q(0.5).as_secs_f64() * 1000.0,
            q(0.99).as_secs_f64() * 1000.0,
            busy * 100.0
        );
    }
}
