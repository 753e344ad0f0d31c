//! The worker role: claims builds, runs their plan with the configured executor, records
//! progress as events, verifies the binary and publishes it.
//!
//! Every event a worker writes names its attempt and goes through `append_latest`, so a
//! worker whose lease was taken away is refused (fenced) and stops that build.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cbs_domain::buildinfo::BuildInfo;
use cbs_domain::failure::{classify, Blame, Observed, ProxyCheck};
use cbs_domain::plan::{plan, BuildPlan};
use cbs_events::{
    Artifact, Event, Failed, FailureKind, LeaseRenewed, Output, RequeueReason, Requeued,
    StepFinished, StepStarted, Succeeded,
};
use cbs_executor::{
    CachePaths, DockerExecutor, DockerSettings, Executor, GoSettings, LocalExecutor, PlanOutcome,
    Progress,
};
use cbs_projections::BuildState;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::publish::{publish, Publisher};
use crate::App;

/// Output lines are coalesced into one event per this many lines...
const OUTPUT_LINES: usize = 64;
/// ...or per this much time, whichever comes first.
const OUTPUT_INTERVAL: Duration = Duration::from_millis(250);
/// Lines of output quoted in a failure message.
const MESSAGE_TAIL: usize = 20;

/// Makes the configured executor.
pub async fn executor(app: &App, worker: &str) -> anyhow::Result<Executor> {
    let w = &app.config.worker;
    let local = matches!(w.executor, cbs_config::ExecutorKind::Local);
    let go = GoSettings {
        goproxy: app.config.go.proxy.clone(),
        gosumdb: app.config.go.sumdb.clone(),
        command_timeout: w.command_timeout,
        gonosumdb: app.config.go.gonosumdb(),
        // The local executor's go reaches the proxy itself; docker builds reach it through
        // the worker's gate, which holds the credentials and authorities itself.
        netrc: if local {
            write_netrc(app)?.map(Arc::new)
        } else {
            None
        },
        proxy_ca: Some(app.config.go.proxy_ca_file.clone())
            .filter(|p| local && !p.as_os_str().is_empty()),
    };
    if go.goproxy.split([',', '|']).any(|p| {
        let p = p.trim();
        p == "direct" || p == "off"
    }) {
        anyhow::bail!(
            "go.proxy must list proxy URLs only: 'direct' and 'off' are not allowed in builds"
        );
    }
    match w.executor {
        cbs_config::ExecutorKind::Local => Ok(Executor::Local(LocalExecutor::new(
            w.local_go.clone(),
            go,
            CachePaths {
                gomodcache: w.cache_dir.join("local/mod"),
                gocache: w.cache_dir.join("local/build"),
                home: w.cache_dir.join("local/home"),
            },
        ))),
        cbs_config::ExecutorKind::Docker => {
            let d = &w.docker;
            let docker = DockerExecutor::connect(
                DockerSettings {
                    host: d.host.clone(),
                    image: d.image.clone(),
                    path: d.path.clone(),
                    user: d.user.clone(),
                    // The gate's proxies: a request may carry a whole module zip, so
                    // it gets a command's time.
                    proxy: Arc::new(
                        cbs_goproxy::Resolver::new(&cbs_goproxy::ProxyConfig {
                            timeout: w.command_timeout,
                            ..app.proxy_config(std::time::Duration::from_secs(1))?
                        })
                        .context("go.proxy")?,
                    ),
                    memory_bytes: d.memory_bytes,
                    cpus: d.cpus,
                    pids_limit: d.pids_limit,
                    tmpfs_size: d.tmpfs_size.clone(),
                    deployment: app
                        .store
                        .deployment_id()
                        .await
                        .context("reading the deployment id")?,
                },
                go,
                w.cache_dir.join("mod"),
                // One build cache per host, whatever the worker's id (which changes with
                // its pid): Go's build cache is safe for concurrent go commands.
                w.cache_dir.join("build"),
                worker.to_owned(),
            )
            .await
            .context("docker executor")?;
            docker
                .remove_orphans()
                .await
                .context("removing orphaned containers")?;
            Ok(Executor::Docker(Box::new(docker)))
        }
    }
}

/// Writes the module proxy's credentials (if any) into a new file only this worker's user
/// can read, in the build root; removed when the executor goes.
fn write_netrc(app: &App) -> anyhow::Result<Option<tempfile::TempPath>> {
    use std::io::Write;
    let Some(text) = app.config.go.netrc() else {
        return Ok(None);
    };
    let root = app.config.worker.build_root();
    check_build_root(&root)?;
    // Created with mode 0600 (tempfile's default), then handed to the builder user.
    let mut file = tempfile::Builder::new()
        .prefix(".netrc-")
        .tempfile_in(&root)
        .with_context(|| format!("creating the proxy credentials file in {}", root.display()))?;
    file.write_all(text.expose().as_bytes())
        .and_then(|()| file.flush())
        .context("writing the proxy credentials file")?;
    Ok(Some(file.into_temp_path()))
}

/// Creates the build root if needed (mode 0700), and refuses one that another user could
/// have prepared: a symbolic link, not owned by this process's user, or writable by others.
pub fn check_build_root(root: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    if std::fs::symlink_metadata(root).is_err() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .with_context(|| format!("creating worker.build_dir {}", root.display()))?;
    }
    let meta = std::fs::symlink_metadata(root)
        .with_context(|| format!("worker.build_dir {}", root.display()))?;
    // /proc/self belongs to the process's effective user.
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    let problem = if meta.file_type().is_symlink() {
        Some("is a symbolic link".to_owned())
    } else if !meta.is_dir() {
        Some("is not a directory".to_owned())
    } else if me.is_some_and(|uid| uid != meta.uid()) {
        Some(format!(
            "is owned by uid {}, not by this worker's user",
            meta.uid()
        ))
    } else if meta.permissions().mode() & 0o022 != 0 {
        Some(format!(
            "is writable by other users (mode {:o})",
            meta.permissions().mode() & 0o777
        ))
    } else {
        None
    };
    match problem {
        Some(p) => anyhow::bail!(
            "worker.build_dir {} {p}: use a directory of the worker's own (empty: <cache_dir>/builds)",
            root.display()
        ),
        None => Ok(()),
    }
}

/// Removes per-worker build caches (`build-<worker id>`, the layout before the cache was
/// shared per host) that nobody used for a day. Never follows a symbolic link.
pub fn prune_old_build_caches(cache_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    let day = Duration::from_secs(24 * 3600);
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let old = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > day);
        if name.starts_with("build-") && meta.is_dir() && old {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => {
                    info!(dir = %e.path().display(), "removed an unused per-worker build cache")
                }
                Err(err) => {
                    warn!(dir = %e.path().display(), error = %err, "cannot remove an old build cache")
                }
            }
        }
    }
}

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
    let mut notice = crate::preempt::watch(&preemption);
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
            Ok(None) => drop(permit),
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

/// Why an attempt did not produce an artifact.
struct Failure {
    kind: FailureKind,
    step: Option<String>,
    message: String,
}

impl Failure {
    fn ours(step: Option<&str>, message: String) -> Failure {
        Failure {
            kind: FailureKind::Retryable,
            step: step.map(str::to_owned),
            message,
        }
    }
}

/// Runs [`clean_host`] every `worker.cleanup_interval`.
async fn clean_host_every(app: App, exec: Arc<Executor>, me: String) {
    let mut tick = tokio::time::interval(app.config.worker.cleanup_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        clean_host(&app, &exec, &me).await;
    }
}

/// Removes what dead workers left on this host: containers of ours whose build is not
/// running under the worker that made them, and build directories (build_dir/<worker>/
/// build-<key prefix>-...) of builds their worker no longer runs. When the database cannot
/// say, nothing is removed.
pub async fn clean_host(app: &App, exec: &Executor, me: &str) {
    if let Executor::Docker(d) = exec {
        match d.managed_containers().await {
            Ok(list) => {
                for c in list {
                    // Not a build's (a worker compiling its runner): its own worker
                    // removes it if it dies meanwhile (orphans are removed at start).
                    let Ok(k) = c.build.parse::<cbs_domain::BuildKey>() else {
                        continue;
                    };
                    let live = match app.store.build(&k).await {
                        Ok(Some(b)) => {
                            b.status == cbs_projections::Status::Running
                                && b.owner.as_deref() == Some(c.worker.as_str())
                        }
                        Ok(None) => false,
                        Err(_) => continue,
                    };
                    if !live {
                        d.remove_container(&c.id).await;
                        info!(container = %c.id, worker.id = %c.worker, build.key = %c.build, "removed a dead worker's container");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list containers for clean-up"),
        }
    }
    let root = app.config.worker.build_root();
    let Ok(mut workers) = tokio::fs::read_dir(&root).await else {
        return;
    };
    while let Ok(Some(w)) = workers.next_entry().await {
        let worker = w.file_name().to_string_lossy().into_owned();
        // Never through a symbolic link (entries' own types, not what they point at): a
        // link planted here must not make us delete what it points to.
        let is_real_dir = w.file_type().await.is_ok_and(|t| t.is_dir());
        if worker == me || !is_real_dir {
            continue;
        }
        // Directories first, then the running builds: a directory listed here was made
        // after its build's claim committed, so the read below sees that build running
        // (or already finished).
        let Ok(mut entries) = tokio::fs::read_dir(w.path()).await else {
            continue;
        };
        let mut dirs = Vec::new();
        while let Ok(Some(d)) = entries.next_entry().await {
            if d.file_type().await.is_ok_and(|t| t.is_dir()) {
                dirs.push(d);
            }
        }
        let Ok(running) = app.store.running_builds_of(&worker).await else {
            continue;
        };
        let mut left = 0;
        for d in dirs {
            let name = d.file_name().to_string_lossy().into_owned();
            let prefix = name
                .strip_prefix("build-")
                .and_then(|r| r.split('-').next())
                .unwrap_or_default()
                .to_owned();
            if !prefix.is_empty() && running.iter().any(|k| k.starts_with(&prefix)) {
                left += 1;
                continue;
            }
            if let Err(e) = tokio::fs::remove_dir_all(d.path()).await {
                warn!(dir = %d.path().display(), error = %e, "cannot remove a dead worker's build directory");
                left += 1;
            }
        }
        if left == 0 {
            let _ = tokio::fs::remove_dir(w.path()).await;
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Renews the attempt's lease every third of the lease period until the attempt ends;
/// cancels `fenced` if the build was taken away (the lease had expired and the janitor
/// requeued it), which stops the attempt.
async fn renew_lease(app: App, build: BuildState, fenced: CancellationToken) {
    let lease = app.config.worker.lease;
    let mut tick = tokio::time::interval(lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the claim itself set the first lease
    loop {
        tick.tick().await;
        let until = chrono::Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default();
        let event = Event::LeaseRenewed(LeaseRenewed {
            attempt: build.attempt,
            lease_expires_at: until,
        });
        match app.store.append_latest(&build.key, event).await {
            Ok(_) => {}
            Err(e) if e.is_fenced() => {
                warn!(error = %e, "lease lost: stopping the attempt");
                fenced.cancel();
                return;
            }
            // The database may be back before the lease ends; the next tick tries again.
            Err(e) => warn!(error = %e, "cannot renew the lease"),
        }
    }
}

/// Cancels `stop` when the build is cancelled (woken by the build's notifications).
async fn watch_cancel(app: App, key: cbs_domain::BuildKey, stop: CancellationToken) {
    let mut waiter = app.hub.watch_build(&key);
    loop {
        if let Ok(Some(b)) = app.store.build(&key).await {
            if b.status == cbs_projections::Status::Cancelled {
                info!("the build was cancelled: stopping it");
                stop.cancel();
                return;
            }
        }
        waiter.changed().await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_build(
    app: App,
    exec: Arc<Executor>,
    publisher: Arc<Publisher>,
    probe: Arc<cbs_goproxy::Resolver>,
    worker: String,
    build: BuildState,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let key = build.key.clone();
    let attempt = build.attempt;
    let span = tracing::info_span!("build", build.key = %key, attempt, worker.id = %worker);
    async move {
        info!(request = %build.request.canonical().replace('\n', "; "), "build claimed");
        let fenced = CancellationToken::new();
        // Aborted when this attempt ends or is dropped (a worker that is torn down must not
        // keep renewing a lease it no longer works under).
        let renewer = AbortOnDrop(tokio::spawn(renew_lease(
            app.clone(),
            build.clone(),
            fenced.clone(),
        )));
        // An admin may cancel the build: stop at once (the container is removed when the
        // plan's future is dropped).
        let canceller = AbortOnDrop(tokio::spawn(watch_cancel(
            app.clone(),
            key.clone(),
            fenced.clone(),
        )));
        let outcome = tokio::select! {
            r = attempt_build(&app, &exec, &publisher, &probe, &worker, &build, &fenced) => Some(r),
            _ = stop.cancelled() => None,
        };
        drop(renewer);
        drop(canceller);
        let event = match outcome {
            // Stopped (preemption or shutdown): hand the build to another worker at once.
            // Does not count as a failed attempt.
            None => Event::Requeued(Requeued {
                attempt,
                reason: RequeueReason::Preempted,
                // Its old place in the queue, ahead of builds requested since.
                not_before: build.available_at.min(chrono::Utc::now()),
            }),
            Some(Ok(Some(artifact))) => Event::Succeeded(Succeeded { attempt, artifact }),
            Some(Ok(None)) => return, // fenced: another attempt owns the build now
            Some(Err(f)) => Event::Failed(Failed {
                attempt,
                kind: f.kind,
                step: f.step,
                message: f.message,
            }),
        };
        let name = event.event_type();
        match app.store.append_latest(&key, event).await {
            Ok(_) => info!(result = %name, "build finished"),
            Err(e) if e.is_fenced() => warn!(error = %e, "lease lost; result discarded"),
            Err(e) => error!(error = %e, "cannot record the build's result"),
        }
    }
    .instrument(span)
    .await
}

/// Runs one attempt. `Ok(None)` when the attempt was fenced off midway (`fenced` is
/// cancelled by whoever learns it first: the progress recorder or the lease renewal).
async fn attempt_build(
    app: &App,
    exec: &Executor,
    publisher: &Publisher,
    probe: &cbs_goproxy::Resolver,
    worker: &str,
    build: &BuildState,
    fenced: &CancellationToken,
) -> Result<Option<Artifact>, Failure> {
    let started = chrono::Utc::now();
    let plan = plan(&build.request);
    // This worker's directory is made again if it is gone: another worker's host clean-up
    // removes empty directories of workers it believes dead (this one, just restarted). It
    // may do so between the two calls below, hence a second try.
    let own_dir = app.config.worker.build_root().join(worker);
    let make = || -> std::io::Result<tempfile::TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&own_dir)?;
        tempfile::Builder::new()
            .prefix(&format!("build-{}-", &build.key.as_str()[..12]))
            .tempdir_in(&own_dir)
    };
    let dir = make()
        .or_else(|_| make())
        .map_err(|e| Failure::ours(None, format!("cannot create a build directory: {e}")))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let recorder = tokio::spawn(record(app.clone(), build.clone(), rx, fenced.clone()));
    // The whole attempt's deadline; dropping the plan's future removes its container.
    let build_timeout = app.config.worker.build_timeout;
    let outcome = tokio::select! {
        r = tokio::time::timeout(build_timeout, exec.run_plan(&plan, build.key.as_str(), dir.path(), &tx)) => Some(r),
        _ = fenced.cancelled() => None,
    };
    drop(tx);
    let _ = recorder.await;
    let Some(outcome) = outcome else {
        return Ok(None);
    };
    if fenced.is_cancelled() {
        return Ok(None);
    }
    let Ok(outcome) = outcome else {
        return Err(Failure::ours(
            None,
            format!(
                "the build did not finish within worker.build_timeout ({}) and was stopped",
                humantime::format_duration(build_timeout)
            ),
        ));
    };
    match outcome {
        Err(e) => Err(Failure::ours(None, format!("the build could not run: {e}"))),
        Ok(PlanOutcome::Failed {
            step,
            command,
            exit,
            tail,
        }) => {
            let phase = phase_of(&plan, step);
            // A resolve step that exited with an error: ask the proxy ourselves whether it
            // answers (the build's own output says what it likes).
            let proxy = if phase == cbs_domain::plan::Phase::Resolve && exit.code.is_some() {
                match probe.probe_request(&build.request).await {
                    Ok(()) => ProxyCheck::Answered,
                    Err(e) => {
                        warn!(error = %e, "the module proxy does not answer after a failed resolve step");
                        ProxyCheck::Unavailable
                    }
                }
            } else {
                ProxyCheck::NotAsked
            };
            let observed = Observed {
                phase,
                exit_code: exit.code,
                timed_out: exit.timed_out,
                proxy,
            };
            let kind = match classify(&observed) {
                Blame::Request => FailureKind::Permanent,
                Blame::Infrastructure => FailureKind::Retryable,
            };
            let how = match (exit.code, exit.timed_out) {
                (_, true) => format!(
                    "was stopped at its time limit of {} (worker.command_timeout)",
                    humantime::format_duration(app.config.worker.command_timeout)
                ),
                (Some(c), _) => format!("exited with status {c}"),
                (None, _) => "was killed".to_owned(),
            };
            let shown: Vec<&String> = tail
                .iter()
                .skip(tail.len().saturating_sub(MESSAGE_TAIL))
                .collect();
            let mut message = format!("step {step} failed: `{command}` {how}");
            if !shown.is_empty() {
                message.push_str("; its last output:\n");
                message.push_str(
                    &shown
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join("\n"),
                );
            }
            Err(Failure {
                kind,
                step: Some(step.to_owned()),
                message,
            })
        }
        Ok(PlanOutcome::Built(binary)) => {
            let bytes = tokio::fs::read(&binary).await.map_err(|e| {
                Failure::ours(Some("verify"), format!("cannot read the built binary: {e}"))
            })?;
            let info = BuildInfo::from_binary(&bytes).map_err(|e| Failure {
                kind: FailureKind::Permanent,
                step: Some("verify".into()),
                message: format!("the built binary cannot be verified: {e}"),
            })?;
            if let Err(problems) = info.check_matches(&build.request) {
                return Err(Failure {
                    kind: FailureKind::Permanent,
                    step: Some("verify".into()),
                    message: format!(
                        "the built binary does not match the request: {}",
                        problems.join("; ")
                    ),
                });
            }
            let sha256 = {
                use sha2::Digest;
                hex::encode(sha2::Sha256::digest(&bytes))
            };
            let size = bytes.len() as u64;
            drop(bytes);
            let artifact = publish(
                publisher,
                crate::publish::Input {
                    build,
                    binary: &binary,
                    name: plan.output,
                    size,
                    sha256: &sha256,
                    info: &info,
                    builder: exec.builder(),
                    worker,
                    started,
                },
            )
            .await
            .map_err(|e| {
                Failure::ours(Some("publish"), format!("cannot store the artifact: {e:#}"))
            })?;
            Ok(Some(artifact))
        }
    }
}

fn phase_of(plan: &BuildPlan, step: &str) -> cbs_domain::plan::Phase {
    plan.steps
        .iter()
        .find(|s| s.name == step)
        .map(|s| s.phase)
        .unwrap_or(cbs_domain::plan::Phase::Resolve)
}

/// Turns progress into events: steps as they start and finish, output coalesced. Cancels
/// `fenced` if the build's lease was taken away.
async fn record(
    app: App,
    build: BuildState,
    mut rx: mpsc::UnboundedReceiver<Progress>,
    fenced: CancellationToken,
) {
    let key = build.key.clone();
    let attempt = build.attempt;
    let mut pending: Vec<String> = Vec::new();
    let mut pending_step = String::new();
    let append = |event: Event| {
        let app = app.clone();
        let key = key.clone();
        let fenced = fenced.clone();
        async move {
            match app.store.append_latest(&key, event).await {
                Ok(_) => true,
                Err(e) if e.is_fenced() => {
                    warn!(error = %e, "lease lost; stopping the build");
                    fenced.cancel();
                    false
                }
                Err(e) => {
                    // Progress is best effort; the result is what counts.
                    warn!(error = %e, "cannot record build progress");
                    true
                }
            }
        }
    };
    let mut tick = tokio::time::interval(OUTPUT_INTERVAL);
    loop {
        let progress = tokio::select! {
            p = rx.recv() => p,
            _ = tick.tick() => {
                if !pending.is_empty() {
                    let lines = std::mem::take(&mut pending);
                    if !append(Event::Output(Output { attempt, step: pending_step.clone(), lines })).await {
                        return;
                    }
                }
                continue;
            }
        };
        let Some(progress) = progress else { break };
        let flush_first = !matches!(progress, Progress::Line { .. }) && !pending.is_empty();
        if flush_first {
            let lines = std::mem::take(&mut pending);
            if !append(Event::Output(Output {
                attempt,
                step: pending_step.clone(),
                lines,
            }))
            .await
            {
                return;
            }
        }
        let event = match progress {
            Progress::StepStarted { step } => Event::StepStarted(StepStarted {
                attempt,
                step: step.to_owned(),
            }),
            Progress::StepFinished {
                step,
                duration,
                exit_code,
            } => Event::StepFinished(StepFinished {
                attempt,
                step: step.to_owned(),
                duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
                exit_code,
            }),
            Progress::Line { step, line } => {
                pending_step = step.to_owned();
                pending.push(line);
                if pending.len() < OUTPUT_LINES {
                    continue;
                }
                Event::Output(Output {
                    attempt,
                    step: step.to_owned(),
                    lines: std::mem::take(&mut pending),
                })
            }
        };
        if !append(event).await {
            return;
        }
    }
    if !pending.is_empty() {
        append(Event::Output(Output {
            attempt,
            step: pending_step,
            lines: pending,
        }))
        .await;
    }
}
