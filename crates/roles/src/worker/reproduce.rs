//! One claimed reproduction: an independent second build of a succeeded build's request on
//! this worker (never the one that built it), compared byte for byte with the published
//! artifact. Nothing is published over the artifact: on a match this worker signs and
//! stores its own provenance statement about the same binary (a second builder); on a
//! mismatch it says what differs between the two binaries' build information. The result is
//! the `reproduced` event; a mismatch also raises `cbs_reproductions_total{outcome=
//! "mismatched"}` and a warning.
//!
//! The second build reads no shared build cache (it compiles everything itself, so that a
//! poisoned or stale cache entry cannot make both builds agree) and shares nothing.
//! Reproductions are background work: a worker takes one only when no build is claimable,
//! and its output is not recorded as events (the build's history is the first build's).

use std::sync::Arc;

use cbs_domain::artifact::{signature_of, stored_file};
use cbs_domain::buildinfo::BuildInfo;
use cbs_domain::plan::plan;
use cbs_events::{
    Event, Reproduced, ReproductionOutcome, ReproductionReason, ReproductionRequested,
};
use cbs_executor::{Executor, PlanOutcome};
use cbs_projections::BuildState;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use super::attempt::{build_dir, step_failure};
use super::publish::{signed_statement, Input, Publisher};
use crate::App;

/// The stored name of the statement a second builder signs for reproduction `n`.
pub fn statement_name(n: u32) -> String {
    format!("reproduction-{n}.json")
}

/// The result of one reproduction, before it is recorded.
struct Result_ {
    outcome: ReproductionOutcome,
    sha256: Option<String>,
    message: String,
    files: Vec<String>,
}

impl Result_ {
    fn failed(message: String) -> Result_ {
        Result_ {
            outcome: ReproductionOutcome::Failed,
            sha256: None,
            message,
            files: Vec::new(),
        }
    }
}

pub(super) async fn run_reproduction(
    app: App,
    exec: Arc<Executor>,
    publisher: Arc<Publisher>,
    worker: String,
    build: BuildState,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let key = build.key.clone();
    let n = build.reproduction.as_ref().map_or(0, |r| r.reproduction);
    let span = tracing::info_span!("reproduction", build.key = %key, reproduction = n, worker.id = %worker);
    async move {
        info!(built_by = build.built_by.as_deref().unwrap_or("unknown"), "reproduction claimed");
        let result = tokio::select! {
            r = reproduce(&app, &exec, &publisher, &worker, &build, n) => Some(r),
            _ = stop.cancelled() => None,
        };
        let (image, image_id) = exec.builder();
        let event = match result {
            // Stopping: give it back for another worker at once.
            None => Event::ReproductionRequested(ReproductionRequested {
                reproduction: n,
                reason: ReproductionReason::Released,
            }),
            Some(r) => Event::Reproduced(Reproduced {
                reproduction: n,
                worker: worker.clone(),
                outcome: r.outcome,
                sha256: r.sha256,
                builder_image: Some(image),
                builder_image_id: Some(image_id).filter(|i| !i.is_empty()),
                message: r.message,
                files: r.files,
            }),
        };
        let outcome = match &event {
            Event::Reproduced(r) => Some((r.outcome, r.message.clone(), r.sha256.clone())),
            _ => None,
        };
        match app.store.append_latest(&key, event).await {
            Ok(_) => match outcome {
                Some((o, message, sha256)) => {
                    let name = match o {
                        ReproductionOutcome::Matched => "matched",
                        ReproductionOutcome::Mismatched => "mismatched",
                        ReproductionOutcome::Failed => "failed",
                    };
                    cbs_metrics::metrics()
                        .reproductions
                        .get_or_create(&cbs_metrics::OutcomeLabel { outcome: name })
                        .inc();
                    match o {
                        ReproductionOutcome::Matched => info!("reproduced: the same bytes"),
                        ReproductionOutcome::Mismatched => warn!(
                            published = build.artifact.as_ref().map(|a| a.sha256.as_str()).unwrap_or_default(),
                            reproduced = sha256.as_deref().unwrap_or_default(),
                            %message,
                            "REPRODUCTION MISMATCH: a second worker built other bytes for this request"
                        ),
                        ReproductionOutcome::Failed => warn!(%message, "reproduction failed"),
                    }
                }
                None => info!("reproduction released for another worker"),
            },
            Err(e) if e.is_fenced() => {
                warn!(error = %e, "reproduction was given to another worker; result discarded")
            }
            Err(e) => error!(error = %e, "cannot record the reproduction's result"),
        }
    }
    .instrument(span)
    .await
}

/// Builds the request again and compares.
async fn reproduce(
    app: &App,
    exec: &Executor,
    publisher: &Publisher,
    worker: &str,
    build: &BuildState,
    n: u32,
) -> Result_ {
    let started = chrono::Utc::now();
    let Some(artifact) = build.artifact.as_ref() else {
        return Result_::failed("the build has no artifact to compare with".into());
    };
    // Everything compiled from scratch: a cache the first build read (or filled) must not
    // make the second one agree with it.
    let plan = plan(&build.request).independent();
    let dir = match build_dir(app, worker, &build.key, "reproduce") {
        Ok(d) => d,
        Err(e) => return Result_::failed(format!("cannot create a build directory: {e}")),
    };
    // Progress is not recorded: the build's history is the first build's.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let timeout = app.config.worker.build_timeout;
    let outcome = tokio::time::timeout(
        timeout,
        exec.run_plan(&plan, build.key.as_str(), dir.path(), &tx),
    )
    .await;
    drop(tx);
    let _ = drain.await;
    let binary = match outcome {
        Err(_) => {
            return Result_::failed(format!(
                "the second build did not finish within worker.build_timeout ({})",
                humantime::format_duration(timeout)
            ))
        }
        Ok(Err(e)) => return Result_::failed(format!("the second build could not run: {e}")),
        Ok(Ok(PlanOutcome::Failed {
            step,
            command,
            exit,
            tail,
        })) => {
            return Result_::failed(format!(
                "the second build failed: {}",
                step_failure(app, step, &command, &exit, &tail)
            ))
        }
        // An independent rebuild publishes nothing into the build cache.
        Ok(Ok(PlanOutcome::Built { binary, .. })) => binary,
    };
    let bytes = match tokio::fs::read(&binary).await {
        Ok(b) => b,
        Err(e) => return Result_::failed(format!("cannot read the second build's binary: {e}")),
    };
    let sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let info = BuildInfo::from_binary(&bytes);
    if sha256 != artifact.sha256 {
        let message = mismatch(publisher, artifact, &bytes, info.as_ref().ok()).await;
        return Result_ {
            outcome: ReproductionOutcome::Mismatched,
            sha256: Some(sha256),
            message,
            files: Vec::new(),
        };
    }
    // The same bytes: this builder states so, signed, beside the artifact.
    let Ok(info) = info else {
        return Result_::failed("the second build's binary has no build information".into());
    };
    let name = plan.output;
    let file = statement_name(n);
    let now = chrono::Utc::now();
    let input = Input {
        build,
        binary: &binary,
        name,
        size: bytes.len() as u64,
        sha256: &sha256,
        info: &info,
        builder: exec.builder(),
        worker,
        started,
    };
    let invocation = format!("{}/reproduction-{n}", build.key);
    let stored = async {
        let (statement, signature) = signed_statement(publisher, &input, &invocation, &file, now)?;
        let sig = signature_of(&file);
        publisher
            .storage
            .put_bytes(
                &stored_file(&artifact.location, &sig),
                signature.into_bytes().into(),
            )
            .await?;
        publisher
            .storage
            .put_bytes(&stored_file(&artifact.location, &file), statement.into())
            .await?;
        anyhow::Ok(vec![file.clone(), sig])
    }
    .await;
    match stored {
        Ok(files) => Result_ {
            outcome: ReproductionOutcome::Matched,
            sha256: Some(sha256),
            message: String::new(),
            files,
        },
        Err(e) => Result_ {
            outcome: ReproductionOutcome::Matched,
            sha256: Some(sha256),
            message: format!(
                "the same bytes; this builder's provenance could not be stored: {e:#}"
            ),
            files: Vec::new(),
        },
    }
}

/// Says how the second build differs from the published binary: sizes, and what differs
/// in their build information (read from the stored binary).
async fn mismatch(
    publisher: &Publisher,
    artifact: &cbs_events::Artifact,
    ours: &[u8],
    info: Option<&BuildInfo>,
) -> String {
    let mut message = format!(
        "other bytes: {} bytes with SHA-256 {} on this worker, {} bytes with SHA-256 {} published",
        ours.len(),
        short(&hex_sha(ours)),
        artifact.size,
        short(&artifact.sha256)
    );
    let Some(name) = artifact.files.first() else {
        return message;
    };
    let published = match publisher
        .storage
        .get(&stored_file(&artifact.location, name), None)
        .await
    {
        Ok(o) => o.bytes(4 << 30).await,
        Err(e) => Err(e),
    };
    let theirs = published.ok().and_then(|b| BuildInfo::from_binary(&b).ok());
    match (info, theirs) {
        (Some(a), Some(b)) => {
            let d = a.differences(&b, "here", "published");
            if d.is_empty() {
                message.push_str("; the build information is the same, so the toolchains or their environments differ in something Go does not record");
            } else {
                message.push_str("; differences in the build information: ");
                message.push_str(&d.join("; "));
            }
        }
        _ => message.push_str("; the build information of one of them could not be read"),
    }
    message
}

fn hex_sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(16)]
}
