//! The janitor role: migrations at start, then the maintenance services (rescue of builds
//! whose worker stopped renewing its lease, retries with backoff, giving up), led by one
//! janitor at a time; and the `rebuild-projections` command.

use std::time::Duration;

use anyhow::Context;
use cbs_events::{Event, GaveUp, RequeueReason, Requeued};
use cbs_store::{Leadership, Store, StoreError};
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::App;

/// Applies migrations if the config asks for it (before anything else connects, so that
/// the listening connection finds its tables).
pub async fn migrate(config: &cbs_config::Config) -> anyhow::Result<()> {
    if config.janitor.migrate_on_start {
        let connector = cbs_store::PgConnector::new(&config.database)?;
        cbs_store::migrate::run(&connector)
            .await
            .with_context(|| format!("migrating {}", connector.display()))?;
    }
    Ok(())
}

/// Name of the janitors' leader lock.
const LEADER_LOCK: &str = "caddy-build-server janitor leader";
/// Builds handled per scan.
const BATCH: i64 = 200;
/// After a notification, a leader waits this long for more before it scans (a burst of
/// events costs one scan).
const SCAN_SPACING: Duration = Duration::from_millis(100);

/// The maintenance services, until `shutdown`. Any number of janitors may run: one leads
/// (holds a Postgres advisory lock on a connection of its own) and acts; the others try to
/// take over every `janitor.leader_check_interval`, so a dead leader is replaced within
/// that interval after Postgres notices its connection is gone.
pub async fn run_services(app: App, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = app.config.janitor.clone();
    // Artifact retention deletes files: the janitor needs the storage (not the signing key).
    let storage = if cfg.retention.is_zero() {
        None
    } else {
        match cbs_storage::Storage::connect(&app.config.storage).await {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "no artifact storage: artifact retention is off");
                None
            }
        }
    };
    info!("janitor started");
    loop {
        let lead = tokio::select! {
            r = app.store.try_lead(LEADER_LOCK) => r,
            _ = shutdown.cancelled() => break,
        };
        match lead {
            Ok(Some(leadership)) => {
                info!("janitor leads");
                lead_while_held(&app, &leadership, storage.as_ref(), &shutdown).await;
                drop(leadership);
                if shutdown.is_cancelled() {
                    break;
                }
                warn!("janitor lost its leadership");
            }
            Ok(None) => debug!("another janitor leads"),
            Err(e) => warn!(error = %e, "cannot reach the database to take the lead"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.leader_check_interval) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    info!("janitor stopped");
    Ok(())
}

/// Acts (rescue, retry) on every notification and at least every poll interval or lease
/// expiry, until the lock is lost or `shutdown`.
async fn lead_while_held(
    app: &App,
    leadership: &Leadership,
    storage: Option<&cbs_storage::Storage>,
    shutdown: &CancellationToken,
) {
    let cfg = &app.config.janitor;
    let mut any = app.hub.watch_any();
    let mut retention = tokio::time::interval(cfg.retention_check_interval);
    retention.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval(cfg.leader_check_interval);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        any.borrow_and_update();
        let next = match scan(app).await {
            Ok(next) => next,
            Err(e) => {
                warn!(error = %e, "janitor scan failed");
                cfg.poll_interval
            }
        };
        let wake = tokio::time::Instant::now() + next.min(cfg.poll_interval);
        loop {
            tokio::select! {
                r = any.changed() => {
                    if r.is_err() {
                        return;
                    }
                    tokio::time::sleep(SCAN_SPACING).await;
                    break;
                }
                _ = tokio::time::sleep_until(wake) => break,
                _ = check.tick() => {
                    if !leadership.still_held().await {
                        return;
                    }
                }
                _ = retention.tick(), if storage.is_some() => {
                    if let Some(s) = storage {
                        if let Err(e) = expire_artifacts(app, s).await {
                            warn!(error = %e, "artifact retention pass failed");
                        }
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// The delay before the retry after `failures` failed attempts: `retry_backoff` doubled per
/// further failure, capped at `retry_backoff_max`, with +-20% jitter (so that builds failing
/// together do not come back together).
pub fn backoff(cfg: &cbs_config::JanitorConfig, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = cfg
        .retry_backoff
        .saturating_mul(1u32 << exp)
        .min(cfg.retry_backoff_max);
    base.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

/// One pass: requeue builds whose lease expired, retry (or give up on) retryable failures.
/// Returns how long until the next lease expires. Every write is conditional on the build's
/// state as read (an append conflicts if anything changed meanwhile), so two janitors acting
/// at once, or a worker renewing a lease just in time, change nothing twice.
async fn scan(app: &App) -> anyhow::Result<Duration> {
    let cfg = &app.config.janitor;
    for b in app.store.expired_leases(BATCH).await? {
        let event = if b.failures + 1 >= cfg.max_attempts {
            Event::GaveUp(GaveUp {
                attempt: b.attempt,
                failures: b.failures + 1,
                message: format!(
                    "gave up after {} attempts: the last one's worker ({}) stopped renewing its lease",
                    b.attempt,
                    b.owner.as_deref().unwrap_or("?")
                ),
            })
        } else {
            Event::Requeued(Requeued {
                attempt: b.attempt,
                reason: RequeueReason::LeaseExpired,
                // Its old place in the queue: it was at the front when it was claimed.
                not_before: b.available_at.min(Utc::now()),
            })
        };
        record(app, &b, event).await;
    }
    for b in app.store.retryable_failures(BATCH).await? {
        let last = b
            .last_error
            .as_ref()
            .map(|e| e.message.clone())
            .unwrap_or_default();
        let event = if b.failures >= cfg.max_attempts {
            Event::GaveUp(GaveUp {
                attempt: b.attempt,
                failures: b.failures,
                message: format!(
                    "gave up after {} failed attempts; the last: {last}",
                    b.failures
                ),
            })
        } else {
            let delay = backoff(cfg, b.failures);
            Event::Requeued(Requeued {
                attempt: b.attempt,
                reason: RequeueReason::Retry,
                not_before: b.updated_at
                    + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero()),
            })
        };
        record(app, &b, event).await;
    }
    Ok(match app.store.next_lease_expiry().await? {
        Some(t) => (t - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .saturating_add(Duration::from_millis(50)),
        None => cfg.poll_interval,
    })
}

/// Deletes the files of succeeded builds neither built nor downloaded for
/// `janitor.retention`. The event comes first (from then on the api no longer serves the
/// files, and a new request rebuilds the build), then the files go.
async fn expire_artifacts(app: &App, storage: &cbs_storage::Storage) -> anyhow::Result<()> {
    let cfg = &app.config.janitor;
    let cutoff = Utc::now() - chrono::Duration::from_std(cfg.retention)?;
    for b in app.store.stale_artifacts(cutoff, BATCH).await? {
        let event = Event::ArtifactDeleted(cbs_events::ArtifactDeleted {
            attempt: b.attempt,
            reason: format!(
                "not downloaded for {}",
                humantime::format_duration(cfg.retention)
            ),
        });
        match app.store.append(&b, event).await {
            Ok(_) => {}
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => {
                warn!(build.key = %b.key, error = %e, "cannot expire an artifact");
                continue;
            }
        }
        let prefix = format!("builds/{}/{}", b.key.shard(), b.key);
        match storage.delete_prefix(&prefix).await {
            Ok(n) => info!(build.key = %b.key, files = n, "expired artifact deleted"),
            // The build is expired either way; the files stay as garbage.
            Err(e) => {
                warn!(build.key = %b.key, error = %e, "cannot delete an expired artifact's files")
            }
        }
    }
    Ok(())
}

async fn record(app: &App, b: &cbs_projections::BuildState, event: Event) {
    let what = event.event_type();
    let detail = match &event {
        Event::Requeued(r) => format!("{:?}, not before {}", r.reason, r.not_before),
        Event::GaveUp(g) => g.message.clone(),
        _ => String::new(),
    };
    match app.store.append(b, event).await {
        Ok(_) => {
            info!(build.key = %b.key, attempt = b.attempt, event = %what, %detail, "janitor acted")
        }
        Err(StoreError::Conflict { .. }) => {
            debug!(build.key = %b.key, "build changed meanwhile; looked at again next pass")
        }
        Err(e) if e.is_fenced() => debug!(build.key = %b.key, error = %e, "already handled"),
        Err(e) => warn!(build.key = %b.key, error = %e, "janitor could not record {what}"),
    }
}

/// Prints what `rebuild-projections` found; an error (non-zero exit) if the projection
/// differs from the log and was not fixed.
pub async fn rebuild_projections(store: &Store, fix: bool) -> anyhow::Result<()> {
    let report = store
        .rebuild_projections(fix)
        .await
        .context("rebuilding projections")?;
    let mut out = format!(
        "rebuilt {} builds from {} events: {} difference(s)\n",
        report.builds,
        report.events,
        report.differences.len()
    );
    for d in &report.differences {
        out.push_str(&format!("  {d}\n"));
    }
    if report.fixed {
        out.push_str("the differing rows were replaced with the rebuilt ones\n");
    }
    print_out(&out);
    if !report.differences.is_empty() && !report.fixed {
        anyhow::bail!(
            "the projection differs from the event log in {} build(s); rerun with --fix to repair",
            report.differences.len()
        );
    }
    Ok(())
}

/// A command's report goes to stdout (logs go to stderr).
#[allow(clippy::print_stdout)]
pub(crate) fn print_out(s: &str) {
    print!("{s}");
}
