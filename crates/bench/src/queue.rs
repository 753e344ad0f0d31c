//! `bench queue`: build cycles per second and dispatch latency of the queue.
//!
//! A cycle is what a real build writes, minus the build: request, claim, step started, step
//! finished, succeeded; five commits. Dispatch latency is the time from a request's commit to
//! an idle claimer (parked on the process's listening connection, woken by NOTIFY) holding
//! the claim. It writes to the configured database: point it at a scratch one
//! (`scripts/bench-queue` makes a durable throwaway cluster).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use cbs_domain::{BuildKey, BuildRequest};
use cbs_events::{Artifact, Event, StepFinished, StepStarted, Succeeded};
use cbs_store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::print_out;
use cbs_roles::App;

/// Options of `bench queue`.
#[derive(Debug, clap::Args)]
pub struct QueueArgs {
    /// Concurrent claimers of each throughput run.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub claimers: Vec<usize>,
    /// Length of each throughput run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Requests timed for dispatch latency.
    #[arg(long, default_value_t = 1000)]
    pub dispatch_samples: usize,
    /// Idle claimers waiting during the latency run.
    #[arg(long, default_value_t = 4)]
    pub idle_claimers: usize,
}

const LEASE: Duration = Duration::from_secs(60);

fn request() -> BuildRequest {
    BuildRequest::new(
        cbs_domain::Platform::new("linux", "amd64", None).expect("valid platform"),
        "v2.8.4".parse().expect("valid version"),
        vec![],
        vec![],
    )
    .expect("valid request")
}

fn fresh_key() -> BuildKey {
    BuildKey::digest(&rand::random::<[u8; 32]>())
}

/// Runs the benchmark and prints a report.
pub async fn queue(app: App, args: QueueArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut out = String::from("# bench queue\n\nPostgres settings:\n");
    for (name, value) in app.store.server_settings().await? {
        out.push_str(&format!("  {name} = {value}\n"));
    }
    print_out(&out);

    // Wait until the listener is connected and caught up before timing anything.
    let mut epoch = app.hub.epoch();
    tokio::time::timeout(Duration::from_secs(10), epoch.wait_for(|e| *e > 0))
        .await
        .context("the listening connection did not come up within 10 s")??;

    let (from_commit, from_start) =
        dispatch(&app, args.dispatch_samples, args.idle_claimers).await?;
    print_out(&format!(
        "\ndispatch latency (on an idle queue), {} samples, {} idle claimers woken by NOTIFY:\n  request committed -> claimed: {}\n  request sent      -> claimed: {}\n",
        from_commit.len(),
        args.idle_claimers,
        summary(from_commit),
        summary(from_start),
    ));
    print_out("\nthroughput (request, claim, step started, step finished, succeeded):\n");
    for &n in &args.claimers {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let (cycles, elapsed) = throughput(&app.store, n, args.duration).await?;
        print_out(&format!(
            "  {n:>3} claimers: {cycles:>7} cycles in {:.1} s = {:>7.0} cycles/s ({:.0} events/s)\n",
            elapsed.as_secs_f64(),
            cycles as f64 / elapsed.as_secs_f64(),
            5.0 * cycles as f64 / elapsed.as_secs_f64(),
        ));
    }
    Ok(())
}

/// `n` claimers each requesting a build and running whatever they claim through a cycle.
async fn throughput(
    store: &Store,
    n: usize,
    duration: Duration,
) -> anyhow::Result<(u64, Duration)> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (store, done, stop) = (store.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let worker = format!("bench-{i}");
            while !stop.load(Ordering::Relaxed) {
                store.request_build(&fresh_key(), &request()).await?;
                let Some(b) = store.claim(&worker, LEASE).await? else {
                    continue;
                };
                cycle_rest(&store, b).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed();
    // Leave no build behind that a later run would claim.
    while let Some(b) = store.claim("bench-drain", LEASE).await? {
        cycle_rest(store, b).await?;
    }
    Ok((done.load(Ordering::Relaxed), elapsed))
}

/// Step started, step finished, succeeded.
async fn cycle_rest(store: &Store, b: cbs_projections::BuildState) -> anyhow::Result<()> {
    let attempt = b.attempt;
    let b = store
        .append(
            &b,
            Event::StepStarted(StepStarted {
                attempt,
                step: "compile".into(),
            }),
        )
        .await?;
    let b = store
        .append(
            &b,
            Event::StepFinished(StepFinished {
                attempt,
                step: "compile".into(),
                duration_ms: 1,
                exit_code: Some(0),
            }),
        )
        .await?;
    store
        .append(
            &b,
            Event::Succeeded(Succeeded {
                attempt,
                artifact: Artifact {
                    location: cbs_domain::artifact::ArtifactPath {
                        key: &b.key,
                        attempt,
                    }
                    .location(),
                    size: 1,
                    sha256: "0".repeat(64),
                    files: vec![],
                    modules_sha256: None,
                },
            }),
        )
        .await?;
    Ok(())
}

/// Requests builds one at a time while `idle` claimers wait on the hub; returns the
/// latencies from the request's commit, and from its start, to the claim.
async fn dispatch(
    app: &App,
    samples: usize,
    idle: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(BuildKey, Instant)>();
    let stop = CancellationToken::new();
    let mut claimers = Vec::new();
    for i in 0..idle.max(1) {
        let (store, hub, tx, stop) = (app.store.clone(), app.hub.clone(), tx.clone(), stop.clone());
        claimers.push(tokio::spawn(async move {
            let worker = format!("idle-{i}");
            let mut waiter = hub.watch_queue();
            loop {
                // Subscribed before claiming: a request committed after the claim found
                // nothing still wakes us.
                if let Some(b) = store.claim(&worker, LEASE).await? {
                    let _ = tx.send((b.key.clone(), Instant::now()));
                    cycle_rest(&store, b).await?;
                    continue;
                }
                tokio::select! {
                    _ = waiter.changed() => {}
                    _ = stop.cancelled() => return anyhow::Ok(()),
                }
            }
        }));
    }
    let mut from_commit = Vec::with_capacity(samples);
    let mut from_start = Vec::with_capacity(samples);
    for _ in 0..samples {
        let key = fresh_key();
        let t0 = Instant::now();
        app.store.request_build(&key, &request()).await?;
        let t1 = Instant::now();
        let (claimed, at) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .context("no claimer took the build within 10 s")?
            .context("claimers stopped")?;
        anyhow::ensure!(claimed == key, "claimed another build than requested");
        from_commit.push(at - t1);
        from_start.push(at - t0);
        // Let the claimer finish its cycle and park again, so every sample starts idle.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    for c in claimers {
        c.await??;
    }
    Ok((from_commit, from_start))
}

pub fn summary(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(at(0.50)),
        ms(at(0.90)),
        ms(at(0.99)),
        ms(*v.last().expect("non-empty"))
    )
}
