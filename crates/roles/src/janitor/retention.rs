//! Duty: retention of artifact storage and of build output.
//! - Build output (the output table) of builds finished longer ago than
//!   `janitor.output_retention` (per outcome) is removed, with the `output_pruned` event
//!   that says so, in one transaction.
//! - The shared build cache (`buildcache/v1/`) is kept below
//!   `worker.build_cache.shared_max_bytes`, oldest objects first.
//! - Artifacts neither built nor downloaded for `janitor.retention` expire: the
//!   `artifact_deleted` event comes first (from then on the api no longer serves the files,
//!   and a new request rebuilds the build), then the files go.
//! - Files of attempts that were never published (the attempt failed after uploading, or
//!   its worker was fenced off, or crashed, between upload and its `succeeded` event) are
//!   removed. The duty follows the global event log with a cursor of its own: every event
//!   that ends an attempt (see [`sweep_on`]) makes it remove the files of that build's ended,
//!   unpublished attempts ([`unpublished_attempts`]), once the event is [`sweep_grace`] old.
//!   The api only ever serves the attempt its build's `succeeded` event names, so such files
//!   were never served; this only frees the space.

use std::time::Duration;

use cbs_domain::artifact::{build_folder, ArtifactPath};
use cbs_events::{Event, EventType, RecordedEvent};
use cbs_projections::{BuildState, Status};
use cbs_storage::Storage;
use cbs_store::StoreError;
use chrono::{DateTime, Utc};
use tracing::{debug, info, warn};

use super::BATCH;
use crate::App;

/// Name of the unpublished-files duty's cursor in the global log.
const SWEEP_CURSOR: &str = "retention.unpublished";
/// Events that end an attempt.
const ATTEMPT_ENDS: &[EventType] = &[
    EventType::Succeeded,
    EventType::Failed,
    EventType::Requeued,
    EventType::GaveUp,
    EventType::Cancelled,
];

/// Both retention passes; failures are logged, and the next pass tries again.
pub(super) async fn run(app: &App, storage: &Storage) {
    if !app.config.janitor.retention.is_zero() {
        if let Err(e) = expire(app, storage).await {
            warn!(error = %e, "artifact retention pass failed");
        }
    }
    if let Err(e) = prune_output(app).await {
        warn!(error = %e, "output retention pass failed");
    }
    if let Err(e) = sweep(app, storage).await {
        warn!(error = %e, "removing unpublished attempts' files failed");
    }
    let cache = &app.config.worker.build_cache;
    if cache.enabled && cache.shared {
        match cbs_executor::trim_shared(storage, cache.shared_max_bytes).await {
            Ok((0, _)) => {}
            Ok((n, bytes)) => info!(
                objects = n,
                bytes, "shared build cache trimmed (oldest first)"
            ),
            Err(e) => warn!(error = %e, "trimming the shared build cache failed"),
        }
    }
}

/// The `artifact_deleted` event for a succeeded build whose artifact went unused for
/// `retention`.
pub fn expiry(b: &BuildState, retention: Duration) -> Event {
    Event::ArtifactDeleted(cbs_events::ArtifactDeleted {
        attempt: b.attempt,
        reason: format!(
            "not downloaded for {}",
            humantime::format_duration(retention)
        ),
    })
}

async fn expire(app: &App, storage: &Storage) -> anyhow::Result<()> {
    let retention = app.config.janitor.retention;
    let cutoff = Utc::now() - chrono::Duration::from_std(retention)?;
    // Up to `EXPIRE_PAGES` batches per pass, so that a large backlog drains within hours.
    const EXPIRE_PAGES: usize = 50;
    for _ in 0..EXPIRE_PAGES {
        let stale = app.store.stale_artifacts(cutoff, BATCH).await?;
        let full = stale.len() == BATCH as usize;
        expire_batch(app, storage, stale, retention).await;
        if !full {
            break;
        }
    }
    Ok(())
}

/// Removes the output of builds finished longer ago than their outcome's retention.
/// Returns how many builds' output went.
pub async fn prune_output(app: &App) -> anyhow::Result<u64> {
    let r = app.config.janitor.output_retention;
    let mut pruned = 0u64;
    let classes: [(&[&str], &str, Duration); 2] = [
        (&["succeeded", "expired"], "succeeded", r.succeeded),
        (&["failed", "gave_up", "cancelled"], "failed", r.failed),
    ];
    // Up to `PAGES` batches per class and pass, so that a backlog drains within hours.
    const PAGES: usize = 50;
    for (statuses, class, retention) in classes {
        if retention.is_zero() {
            continue;
        }
        let cutoff = Utc::now() - chrono::Duration::from_std(retention)?;
        let reason = format!(
            "output of {class} builds is kept for {}",
            humantime::format_duration(retention)
        );
        for status in statuses {
            for _ in 0..PAGES {
                let due = app.store.output_to_prune(status, cutoff, BATCH).await?;
                let full = due.len() == BATCH as usize;
                for b in due {
                    match app.store.prune_output(&b, &reason).await {
                        Ok((_, p)) => {
                            pruned += 1;
                            debug!(build.key = %b.key, chunks = p.chunks, bytes = p.bytes, "output removed");
                        }
                        // It changed meanwhile (a forced rebuild, say): the next pass decides.
                        Err(StoreError::Conflict { .. } | StoreError::Rejected(_)) => {}
                        Err(e) => {
                            warn!(build.key = %b.key, error = %e, "cannot remove a build's output")
                        }
                    }
                }
                if !full {
                    break;
                }
            }
        }
    }
    if pruned > 0 {
        info!(builds = pruned, "build output past retention removed");
    }
    Ok(pruned)
}

async fn expire_batch(app: &App, storage: &Storage, stale: Vec<BuildState>, retention: Duration) {
    for b in stale {
        match app.store.append(&b, expiry(&b, retention)).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => {
                warn!(build.key = %b.key, error = %e, "cannot expire an artifact");
                continue;
            }
        }
        match storage.delete_prefix(&build_folder(&b.key)).await {
            Ok(n) => info!(build.key = %b.key, files = n, "expired artifact deleted"),
            // The build is expired either way; the files stay as garbage.
            Err(e) => {
                warn!(build.key = %b.key, error = %e, "cannot delete an expired artifact's files")
            }
        }
    }
}

/// How long after an attempt ended its files are removed: a worker that was fenced off
/// while uploading may still be finishing the upload (it removes its own files when its
/// result is refused; this catches the ones that crashed first).
pub fn sweep_grace(lease: Duration) -> Duration {
    lease.saturating_mul(2)
}

/// Whether `event`, `age` old, is one the sweep acts on now: `Some(true)` act, `Some(false)`
/// skip, `None` not yet (stop reading: the log is in order, later events are younger).
pub fn sweep_on(event: &Event, age: Duration, grace: Duration) -> Option<bool> {
    let ends_attempt = ATTEMPT_ENDS.contains(&event.event_type());
    if !ends_attempt {
        return Some(false);
    }
    if age < grace {
        return None;
    }
    Some(true)
}

/// Attempts of the build whose files may be removed: every attempt that has ended, except
/// the one its `succeeded` event published. A running build's current attempt has not
/// ended; an expired build's files are all gone already.
pub fn unpublished_attempts(b: &BuildState) -> Vec<u32> {
    let ended = match b.status {
        Status::Running => b.attempt.saturating_sub(1),
        Status::Expired => return Vec::new(),
        _ => b.attempt,
    };
    let published = match b.status {
        Status::Succeeded => Some(b.attempt),
        _ => None,
    };
    (1..=ended).filter(|a| Some(*a) != published).collect()
}

/// Follows the log from the duty's cursor, removing unpublished attempts' files of builds
/// whose attempts ended at least the grace period ago. Reads at most `SWEEP_PAGES` pages
/// per pass; the cursor is saved after each page (and before an error), so a pass that
/// stops midway loses nothing and a restart repeats at most one page (removal is
/// idempotent).
async fn sweep(app: &App, storage: &Storage) -> anyhow::Result<()> {
    const SWEEP_PAGES: usize = 50;
    let grace = sweep_grace(app.config.worker.lease);
    let mut cursor = app
        .store
        .janitor_cursor(SWEEP_CURSOR)
        .await?
        .unwrap_or_default();
    for _ in 0..SWEEP_PAGES {
        let (events, next) = app.store.feed(cursor, BATCH as u32, ATTEMPT_ENDS).await?;
        let now = Utc::now();
        let start = cursor;
        let mut young = false;
        for e in &events {
            match sweep_on(&e.event, age(now, e.recorded_at), grace) {
                None => {
                    young = true;
                    break;
                }
                Some(false) => {}
                Some(true) => {
                    if let Err(err) = sweep_build(app, storage, e).await {
                        app.store.set_janitor_cursor(SWEEP_CURSOR, cursor).await?;
                        return Err(err);
                    }
                }
            }
            cursor = e.cursor();
        }
        if !young {
            cursor = next;
        }
        if cursor != start {
            app.store.set_janitor_cursor(SWEEP_CURSOR, cursor).await?;
        }
        if young || cursor == start {
            break;
        }
    }
    Ok(())
}

fn age(now: DateTime<Utc>, at: DateTime<Utc>) -> Duration {
    (now - at).to_std().unwrap_or(Duration::ZERO)
}

/// Removes the unpublished attempts' files of the build `e` belongs to. An error stops the
/// pass (the cursor stays before `e`, so it is tried again).
async fn sweep_build(app: &App, storage: &Storage, e: &RecordedEvent) -> anyhow::Result<()> {
    let Some(b) = app.store.build(&e.key).await? else {
        return Ok(());
    };
    for attempt in unpublished_attempts(&b) {
        let place = ArtifactPath {
            key: &b.key,
            attempt,
        };
        let n = storage.delete_prefix(&place.location()).await?;
        if n > 0 {
            info!(build.key = %b.key, attempt, files = n, "removed the files of an attempt that was never published");
        } else {
            debug!(build.key = %b.key, attempt, "no files of this unpublished attempt");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::janitor::tests::running;

    #[test]
    fn every_ended_attempt_but_the_published_one() {
        let mut b = running(3, 1);
        // Attempt 3 runs: 1 and 2 ended.
        assert_eq!(unpublished_attempts(&b), vec![1, 2]);
        b.status = Status::Succeeded;
        assert_eq!(unpublished_attempts(&b), vec![1, 2]);
        b.status = Status::Failed;
        assert_eq!(unpublished_attempts(&b), vec![1, 2, 3]);
        b.status = Status::Queued;
        assert_eq!(unpublished_attempts(&b), vec![1, 2, 3]);
        b.status = Status::GaveUp;
        assert_eq!(unpublished_attempts(&b), vec![1, 2, 3]);
        b.status = Status::Expired;
        assert!(unpublished_attempts(&b).is_empty());
        let mut first = running(1, 0);
        assert!(unpublished_attempts(&first).is_empty());
        first.status = Status::Succeeded;
        assert!(unpublished_attempts(&first).is_empty());
        first.status = Status::Cancelled;
        assert_eq!(unpublished_attempts(&first), vec![1]);
    }

    #[test]
    fn acts_on_attempt_ends_after_the_grace_period_only() {
        let grace = Duration::from_secs(120);
        let failed = Event::Failed(cbs_events::Failed {
            attempt: 1,
            kind: cbs_events::FailureKind::Retryable,
            step: None,
            message: "x".into(),
        });
        assert_eq!(sweep_on(&failed, Duration::from_secs(10), grace), None);
        assert_eq!(sweep_on(&failed, grace, grace), Some(true));
        let step = Event::StepStarted(cbs_events::StepStarted {
            attempt: 1,
            step: "compile".into(),
        });
        assert_eq!(sweep_on(&step, grace * 10, grace), Some(false));
        assert_eq!(
            sweep_grace(Duration::from_secs(10)),
            Duration::from_secs(20)
        );
        assert_eq!(
            sweep_grace(Duration::from_secs(300)),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn expiry_names_the_attempt_and_the_period() {
        let mut b = running(2, 0);
        b.status = Status::Succeeded;
        match expiry(&b, Duration::from_secs(7 * 24 * 3600)) {
            Event::ArtifactDeleted(d) => {
                assert_eq!(d.attempt, 2);
                assert_eq!(d.reason, "not downloaded for 7days");
            }
            other => panic!("{other:?}"),
        }
    }
}
