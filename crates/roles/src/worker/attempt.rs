//! One claimed build, from claim to result: the build directory, the plan run by the
//! executor under the build's deadline, the failure's classification, the binary's
//! verification, publishing, and the result event.

use std::sync::Arc;

use cbs_domain::artifact::ArtifactPath;
use cbs_domain::buildinfo::BuildInfo;
use cbs_domain::failure::{classify, Blame, Observed, ProxyCheck};
use cbs_domain::plan::{plan, BuildPlan};
use cbs_events::{Artifact, Event, Failed, FailureKind, RequeueReason, Requeued, Succeeded};
use cbs_executor::{Executor, PlanOutcome};
use cbs_projections::BuildState;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use super::lease::{renew_lease, watch_cancel};
use super::progress::record;
use super::publish::{publish, Publisher};
use super::AbortOnDrop;
use crate::App;

/// Lines of output quoted in a failure message.
const MESSAGE_TAIL: usize = 20;
/// How much of each of those lines it shows: a failure message goes into the event log,
/// which is never pruned, so it is bounded (20 lines of 300 bytes) whatever a build prints.
const MESSAGE_LINE_BYTES: usize = 300;

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

#[allow(clippy::too_many_arguments)]
pub(super) async fn run_build(
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
        let metrics = cbs_metrics::metrics();
        metrics.builds_claimed.inc();
        // Claimed just now; it was claimable from `available_at` on.
        if let Ok(waited) = (chrono::Utc::now() - build.available_at).to_std() {
            metrics.dispatch_latency.observe(waited.as_secs_f64());
        }
        let claimed_at = std::time::Instant::now();
        let fenced = CancellationToken::new();
        // Aborted when this attempt ends or is dropped (a worker that is torn down must not
        // keep renewing a lease it no longer works under).
        // Spawned tasks log in the build's span too (build.key, attempt, worker.id).
        let renewer = AbortOnDrop(tokio::spawn(
            renew_lease(app.clone(), build.clone(), fenced.clone()).in_current_span(),
        ));
        // An admin may cancel the build: stop at once (the container is removed when the
        // plan's future is dropped).
        let canceller = AbortOnDrop(tokio::spawn(
            watch_cancel(app.clone(), key.clone(), fenced.clone()).in_current_span(),
        ));
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
            Some(Ok(None)) => {
                // Fenced: another attempt owns the build now.
                metrics.builds_fenced.inc();
                return;
            }
            Some(Err(f)) => Event::Failed(Failed {
                attempt,
                kind: f.kind,
                step: f.step,
                message: f.message,
            }),
        };
        let name = event.event_type();
        let published = matches!(event, Event::Succeeded(_));
        let outcome = match &event {
            Event::Succeeded(_) => Some("succeeded"),
            Event::Failed(_) => Some("failed"),
            _ => None,
        };
        let failure_kind = match &event {
            Event::Failed(f) => Some(match f.kind {
                FailureKind::Retryable => "retryable",
                FailureKind::Permanent => "permanent",
            }),
            _ => None,
        };
        match app.store.append_latest(&key, event).await {
            Ok(_) => {
                info!(result = %name, "build finished");
                match (outcome, failure_kind) {
                    (Some("succeeded"), _) => {
                        metrics.builds_succeeded.inc();
                    }
                    (_, Some(kind)) => metrics.failed(kind),
                    _ => {
                        metrics.builds_released.inc();
                    }
                }
                if let Some(outcome) = outcome {
                    let platform = build.request.platform();
                    metrics
                        .build_duration
                        .get_or_create(&cbs_metrics::BuildLabels {
                            os: platform.os(),
                            arch: platform.arch(),
                            outcome,
                        })
                        .observe(claimed_at.elapsed().as_secs_f64());
                }
            }
            Err(e) if e.is_fenced() => {
                metrics.builds_fenced.inc();
                warn!(error = %e, "lease lost; result discarded");
                if published {
                    // Files no event will ever name: remove them now (the janitor's
                    // retention removes them too, should this worker die first).
                    let place = ArtifactPath { key: &key, attempt };
                    match publisher.storage.delete_prefix(&place.location()).await {
                        Ok(n) => info!(files = n, "removed the discarded attempt's files"),
                        Err(e) => warn!(error = %e, "cannot remove the discarded attempt's files"),
                    }
                }
            }
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
    let dir = build_dir(app, worker, &build.key, "build")
        .map_err(|e| Failure::ours(None, format!("cannot create a build directory: {e}")))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let recorder =
        tokio::spawn(record(app.clone(), build.clone(), rx, fenced.clone()).in_current_span());
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
            let message = step_failure(app, step, &command, &exit, &tail);
            Err(Failure {
                kind,
                step: Some(step.to_owned()),
                message,
            })
        }
        Ok(PlanOutcome::Built { binary, cache }) => {
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
                super::publish::Input {
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
            if let Some(cache) = cache {
                publish_cache(app, &plan, cache).await;
            }
            Ok(Some(artifact))
        }
    }
}

/// Publishes what a verified, published build put into the build cache, if its code is
/// trusted (Caddy alone) or the operator shares plugin builds too; logs the figures.
async fn publish_cache(
    app: &App,
    plan: &cbs_domain::plan::BuildPlan,
    cache: cbs_executor::CacheWrites,
) {
    let trusted = plan.shares_build_cache || app.config.worker.build_cache.share_plugin_builds;
    let report = if trusted {
        cache.publish().await
    } else {
        cache.report()
    };
    info!(
        hits.local = report.local_hits,
        hits.shared = report.shared_hits,
        hits.own = report.build_hits,
        misses = report.misses,
        puts = report.puts,
        published = report.published,
        uploaded_bytes = report.uploaded_bytes,
        shared_entries = trusted,
        "build cache"
    );
}

/// A new directory for one build under this worker's own directory (`kind`: `build` or
/// `reproduce`, in its name).
pub(super) fn build_dir(
    app: &App,
    worker: &str,
    key: &cbs_domain::BuildKey,
    kind: &str,
) -> std::io::Result<tempfile::TempDir> {
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
            .prefix(&format!("{kind}-{}-", &key.as_str()[..12]))
            .tempdir_in(&own_dir)
    };
    make().or_else(|_| make())
}

/// What a user is shown of a failed step: the command, how it ended, its last lines.
pub(super) fn step_failure(
    app: &App,
    step: &str,
    command: &str,
    exit: &cbs_executor::Exit,
    tail: &[String],
) -> String {
    let how = match (exit.code, exit.timed_out) {
        (_, true) => format!(
            "was stopped at its time limit of {} (worker.command_timeout)",
            humantime::format_duration(app.config.worker.command_timeout)
        ),
        (Some(c), _) => format!("exited with status {c}"),
        (None, _) => "was killed".to_owned(),
    };
    let shown = &tail[tail.len().saturating_sub(MESSAGE_TAIL)..];
    let mut message = format!("step {step} failed: `{command}` {how}");
    if !shown.is_empty() {
        message.push_str("; its last output:");
        for line in shown {
            message.push('\n');
            message.push_str(clip(line, MESSAGE_LINE_BYTES));
            if clip(line, MESSAGE_LINE_BYTES).len() < line.len() {
                message.push_str(" [...]");
            }
        }
    }
    message
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn phase_of(plan: &BuildPlan, step: &str) -> cbs_domain::plan::Phase {
    plan.steps
        .iter()
        .find(|s| s.name == step)
        .map(|s| s.phase)
        .unwrap_or(cbs_domain::plan::Phase::Resolve)
}

#[cfg(test)]
mod tests {
    use super::clip;

    #[test]
    fn clip_keeps_whole_characters() {
        assert_eq!(clip("short", 300), "short");
        assert_eq!(clip("ééé", 3), "é");
        assert_eq!(clip("ééé", 4), "éé");
        assert_eq!(clip(&"x".repeat(1000), 300).len(), 300);
    }
}
