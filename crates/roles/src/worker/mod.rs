//! The worker role: claims builds, runs their plan with the configured executor, records
//! progress as events, verifies the binary and publishes it.
//!
//! Every event a worker writes names its attempt and goes through `append_latest`, so a
//! worker whose lease was taken away is refused (fenced) and stops that build.
//!
//! Rooms: this file is the claim loop and the stop (shutdown, preemption); [`setup`] makes
//! the executor from the config; [`attempt`] runs one claimed build to its result;
//! [`progress`] turns the executor's progress into events; [`lease`] renews the lease and
//! watches for cancellation; [`publish`] signs and stores the artifact; [`reproduce`] runs
//! a reproducibility check (a second build of another worker's artifact, compared byte for
//! byte) when no build is claimable; [`preempt`] watches
//! for spot-VM preemption notices; [`clean`] removes what dead workers left on this host.
//! Only the worker writes worker events (claimed, step_*, output, lease_renewed, succeeded,
//! failed, requeued/preempted) and only through the store.

mod attempt;
mod clean;
mod lease;
pub mod preempt;
mod progress;
pub mod publish;
pub mod reproduce;
mod setup;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::App;
use attempt::run_build;
use clean::clean_host_every;
pub use clean::{clean_host, prune_old_build_caches};
use publish::Publisher;
pub use setup::{check_build_root, executor};

/// Runs until `shutdown`; then lets running builds finish.
pub async fn run(app: App, shutdown: CancellationToken) -> anyhow::Result<()> {
    let id = app.config.worker_id();
    let exec = loop {
        match executor(&app, &id).await {
            Ok(e) => break Arc::new(e),
            Err(e) => {
                error!(worker.id = %id, error = format!("{e:#}"), "cannot start the executor; retrying in 30 s (no builds are claimed meanwhile)");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                    _ = shutdown.cancelled() => {
                        info!(worker.id = %id, "worker stopped");
                        return Ok(());
                    }
                }
            }
        }
    };
    let cache_dir = app.config.worker.cache_dir.clone();
    tokio::task::spawn_blocking(move || prune_old_build_caches(&cache_dir));
    // This worker's build directories live under build_dir/<id>/; what is there at start
    // was left by this worker's previous life.
    let build_root = app.config.worker.build_root();
    check_build_root(&build_root)?;
    let own_dir = build_root.join(&id);
    if own_dir.exists() {
        if let Err(e) = tokio::fs::remove_dir_all(&own_dir).await {
            warn!(dir = %own_dir.display(), error = %e, "cannot remove leftover build directories");
        }
    }
    tokio::fs::create_dir_all(&own_dir)
        .await
        .with_context(|| format!("creating {}", own_dir.display()))?;
    // Without its key or its storage a worker could build but never publish: refuse to start.
    let publisher = Arc::new(Publisher::from_config(&app.config).await?);
    // Asked after a failed resolve step whether the module proxy answers.
    let probe = Arc::new(
        cbs_goproxy::Resolver::new(&app.proxy_config(std::time::Duration::ZERO)?)
            .context("go.proxy")?,
    );
    info!(worker.id = %id, storage = %publisher.storage.describe(), signing.key_id = %publisher.signer.key_id(), "publishing set up");
    let permits = Arc::new(Semaphore::new(
        app.config.worker.max_concurrent_builds.max(1),
    ));
    // Cancelled to stop running builds and release them to other workers.
    let stop = CancellationToken::new();
    let preemption = app.config.worker.preemption.clone();
    let mut notice = preempt::watch(&preemption);
    // Subscribed once, before the first claim: a build requested while we claim wakes us.
    let mut queue = app.hub.watch_queue();
    let mut builds = JoinSet::new();
    let cleaner = AbortOnDrop(tokio::spawn(clean_host_every(
        app.clone(),
        exec.clone(),
        id.clone(),
    )));
    info!(worker.id = %id, "worker started");
    let mut preempted = None;
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break,
            n = &mut notice => { preempted = Some(n); break }
        };
        match app.store.claim(&id, app.config.worker.lease).await {
            Ok(Some(build)) => {
                builds.spawn(run_build(
                    app.clone(),
                    exec.clone(),
                    publisher.clone(),
                    probe.clone(),
                    id.clone(),
                    build,
                    stop.clone(),
                    permit,
                ));
                continue;
            }
            Ok(None) => {
                // No build waits: a reproducibility check of another worker's artifact may.
                // Its lease covers the whole build (it is not renewed).
                let lease = app.config.worker.build_timeout + app.config.worker.lease;
                match app.store.claim_reproduction(&id, lease).await {
                    Ok(Some(build)) => {
                        builds.spawn(reproduce::run_reproduction(
                            app.clone(),
                            exec.clone(),
                            publisher.clone(),
                            id.clone(),
                            build,
                            stop.clone(),
                            permit,
                        ));
                        continue;
                    }
                    Ok(None) => drop(permit),
                    Err(e) => {
                        drop(permit);
                        warn!(worker.id = %id, error = %e, "claiming a reproduction failed");
                    }
                }
            }
            Err(e) => {
                drop(permit);
                warn!(worker.id = %id, error = %e, "claim failed");
            }
        }
        // Nothing claimable now: wake at the poll interval, or sooner when a queued build's
        // backoff ends (a retry's not_before makes no notification when it passes).
        let poll = app.config.worker.claim_poll_interval;
        let wait = match app.store.next_available().await {
            Ok(Some(at)) => (at - chrono::Utc::now())
                .to_std()
                .map_or(poll, |d| d.min(poll))
                .max(Duration::from_millis(10)),
            _ => poll,
        };
        tokio::select! {
            _ = queue.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            Some(_) = builds.join_next() => {}
            _ = shutdown.cancelled() => break,
            n = &mut notice => { preempted = Some(n); break }
        }
    }
    match &preempted {
        Some(n) => {
            // The VM goes away soon: release everything now, claim nothing more.
            warn!(worker.id = %id, notice = %n.detail, running = builds.len(), "preemption notice: releasing every build");
            cbs_metrics::metrics()
                .builds_preempted
                .inc_by(builds.len() as u64);
            stop.cancel();
        }
        None if !builds.is_empty() => {
            let grace = app.config.worker.stop_timeout;
            info!(worker.id = %id, running = builds.len(), stop_timeout = ?grace, "stopping: running builds may finish within the stop timeout");
            let finished =
                tokio::time::timeout(grace, async { while builds.join_next().await.is_some() {} })
                    .await;
            if finished.is_err() {
                warn!(worker.id = %id, running = builds.len(), "stop timeout reached: releasing the remaining builds");
                stop.cancel();
            }
        }
        None => {}
    }
    while builds.join_next().await.is_some() {}
    drop(cleaner);
    // Stopped builds' containers are being removed in the background: make sure.
    if let Err(e) = exec.remove_leftovers().await {
        warn!(worker.id = %id, error = %e, "cannot remove leftover containers");
    }
    if let Some(n) = preempted {
        n.acknowledge().await;
        info!(worker.id = %id, "worker stopped after a preemption notice (no more claims)");
        // Claim nothing more; wait to be stopped.
        shutdown.cancelled().await;
        return Ok(());
    }
    info!(worker.id = %id, "worker stopped");
    Ok(())
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
