//! The janitor role: migrations at start, then the maintenance duties, led by one janitor
//! at a time; and the `rebuild-projections` command.
//!
//! Rooms: this file is leadership and the wiring of the duties (when each runs); each duty
//! is a file of its own whose decisions are pure functions with unit tests: [`rescue`]
//! (expired leases), [`retry`] (retry with backoff, give up), [`retention`] (expire
//! artifacts nobody downloads; remove files of attempts that were never published),
//! [`reproduce`] (ask for reproducibility checks, rescue abandoned ones);
//! [`rebuild`] is the `rebuild-projections` command. The janitor writes only janitor events
//! (requeued, gave_up, artifact_deleted, reproduction_requested, and `reproduced` as failed
//! for a reproduction that used up its claims), each conditional on the state it read.

pub mod rebuild;
pub mod reproduce;
pub mod rescue;
pub mod retention;
pub mod retry;

use std::time::Duration;

use anyhow::Context;
use cbs_events::Event;
use cbs_store::{Leadership, StoreError};
use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::App;
pub use rebuild::rebuild_projections;

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
    // Retention deletes files: the janitor needs the storage (not the signing key).
    let storage = match cbs_storage::Storage::connect(&app.config.storage).await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "no artifact storage: artifact retention and the removal of unpublished files are off");
            None
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
                        retention::run(app, s).await;
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// One pass of the duties that follow the queue: rescue, then retry. Returns how long until
/// the next lease expires. Every write is conditional on the build's state as read (an
/// append conflicts if anything changed meanwhile), so two janitors acting at once, or a
/// worker renewing a lease just in time, change nothing twice.
pub async fn scan(app: &App) -> anyhow::Result<Duration> {
    rescue::run(app).await?;
    retry::run(app).await?;
    reproduce::run(app).await?;
    Ok(match app.store.next_lease_expiry().await? {
        Some(t) => (t - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .saturating_add(Duration::from_millis(50)),
        None => app.config.janitor.poll_interval,
    })
}

async fn record(app: &App, b: &cbs_projections::BuildState, event: Event) {
    let what = event.event_type();
    let detail = match &event {
        Event::Requeued(r) => format!("{:?}, not before {}", r.reason, r.not_before),
        Event::GaveUp(g) => g.message.clone(),
        Event::ReproductionRequested(r) => format!("{:?}", r.reason),
        Event::Reproduced(r) => r.message.clone(),
        _ => String::new(),
    };
    let metrics = cbs_metrics::metrics();
    let counter = match &event {
        Event::Requeued(r) if r.reason == cbs_events::RequeueReason::LeaseExpired => {
            Some(&metrics.builds_rescued)
        }
        Event::Requeued(r) if r.reason == cbs_events::RequeueReason::Retry => {
            Some(&metrics.builds_retried)
        }
        Event::GaveUp(_) => Some(&metrics.builds_given_up),
        _ => None,
    };
    match app.store.append(b, event).await {
        Ok(_) => {
            if let Some(c) = counter {
                c.inc();
            }
            info!(build.key = %b.key, attempt = b.attempt, event = %what, %detail, "janitor acted")
        }
        Err(StoreError::Conflict { .. }) => {
            debug!(build.key = %b.key, "build changed meanwhile; looked at again next pass")
        }
        Err(e) if e.is_fenced() => debug!(build.key = %b.key, error = %e, "already handled"),
        Err(e) => warn!(build.key = %b.key, error = %e, "janitor could not record {what}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use cbs_domain::{BuildKey, BuildRequest, Platform};
    use cbs_events::{Claimed, Event, Requested};
    use cbs_projections::{apply, BuildState};
    use chrono::Utc;

    /// A build at its `attempt`th claim with `failures` failed attempts counted.
    pub(crate) fn running(attempt: u32, failures: u32) -> BuildState {
        let key = BuildKey::digest(b"janitor test");
        let request = BuildRequest::new(
            Platform::new("linux", "amd64", None).unwrap(),
            "v2.8.4".parse().unwrap(),
            vec![],
            vec![],
        )
        .unwrap();
        let requested = Event::Requested(Requested {
            request,
            client: None,
            rank: 1,
        });
        let mut b = apply(None, &key, 1, Utc::now(), &requested).unwrap();
        b.attempt = attempt - 1;
        let claimed = Event::Claimed(Claimed {
            worker: "w".into(),
            attempt,
            lease_expires_at: Utc::now(),
        });
        let mut b = apply(Some(&b), &key, 2, Utc::now(), &claimed).unwrap();
        b.failures = failures;
        b
    }
}
