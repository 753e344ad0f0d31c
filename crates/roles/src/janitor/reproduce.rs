//! Duty: reproducibility checks. Asks for a second, independent build of the succeeded
//! builds `janitor.reproduce` selects (`reproduction_requested`, reason `sample`), and gives
//! a reproduction whose worker stopped answering to another worker (reason `lease_expired`),
//! or ends it as failed after [`MAX_CLAIMS`] workers did.
//!
//! The sample follows the global log with a cursor of its own (only `succeeded` events),
//! so its cost is the number of new builds, not of all builds. A janitor that starts
//! sampling for the first time begins at the log's end: turning the check on does not
//! rebuild the past (an admin asks for one build with `POST /api/build/{key}/reproduce`).

use cbs_config::Reproduce;
use cbs_domain::BuildKey;
use cbs_events::{
    Event, EventType, Reproduced, ReproductionOutcome, ReproductionReason, ReproductionRequested,
};
use cbs_projections::{BuildState, ReproductionStatus, Status};
use chrono::{DateTime, Utc};

use super::{record, BATCH};
use crate::App;

/// Name of the sample's cursor in the global log.
const CURSOR: &str = "reproduce";
/// Claims of one reproduction after which the janitor ends it as failed rather than hand it
/// to yet another worker (a request that kills workers must not go round forever).
pub const MAX_CLAIMS: u32 = 3;

/// Where the build's key falls in [0, 1): its first 32 bits (a key is a SHA-256, so keys
/// are spread evenly); the same on every janitor.
pub fn unit(key: &BuildKey) -> f64 {
    let head = u32::from_str_radix(&key.as_str()[..8], 16).unwrap_or(0);
    f64::from(head) / 4_294_967_296.0
}

/// The event that asks for a reproduction of `b` because the sample chose it: only for a
/// succeeded build that was not reproduced yet.
pub fn sample(setting: Reproduce, b: &BuildState) -> Option<Event> {
    if b.status != Status::Succeeded || b.reproduction.is_some() || !setting.selects(unit(&b.key)) {
        return None;
    }
    Some(Event::ReproductionRequested(ReproductionRequested {
        reproduction: 0,
        reason: ReproductionReason::Sample,
    }))
}

/// What to do with a running reproduction whose lease expired at `now`: hand it to another
/// worker, or, after [`MAX_CLAIMS`] claims, end it as failed.
pub fn rescue(b: &BuildState, now: DateTime<Utc>) -> Option<Event> {
    let r = b.reproduction.as_ref()?;
    if r.status != ReproductionStatus::Running || r.lease_expires_at.is_none_or(|t| t > now) {
        return None;
    }
    let worker = r.worker.clone().unwrap_or_default();
    Some(if r.reproduction >= MAX_CLAIMS {
        Event::Reproduced(Reproduced {
            reproduction: r.reproduction,
            worker: worker.clone(),
            outcome: ReproductionOutcome::Failed,
            sha256: None,
            builder_image: None,
            builder_image_id: None,
            message: format!(
                "{} workers took this reproduction and stopped before finishing (the last: {worker}); not tried again",
                r.reproduction
            ),
            files: Vec::new(),
        })
    } else {
        Event::ReproductionRequested(ReproductionRequested {
            reproduction: r.reproduction,
            reason: ReproductionReason::LeaseExpired,
        })
    })
}

/// One pass: expired reproductions, then the sample of newly succeeded builds.
pub(super) async fn run(app: &App) -> anyhow::Result<()> {
    let now = Utc::now();
    for b in app.store.running_reproductions(BATCH).await? {
        if let Some(event) = rescue(&b, now) {
            record(app, &b, event).await;
        }
    }
    let setting = app.config.janitor.reproduce;
    if setting == Reproduce::Off {
        return Ok(());
    }
    let mut cursor = match app.store.janitor_cursor(CURSOR).await? {
        Some(c) => c,
        None => {
            // First pass ever: from the end of the log.
            let (_, end) = app.store.feed_tail(0, &[EventType::Succeeded]).await?;
            app.store.set_janitor_cursor(CURSOR, end).await?;
            end
        }
    };
    loop {
        let (events, next) = app
            .store
            .feed(cursor, BATCH as u32, &[EventType::Succeeded])
            .await?;
        for e in &events {
            if !setting.selects(unit(&e.key)) {
                continue;
            }
            if let Some(b) = app.store.build(&e.key).await? {
                if let Some(event) = sample(setting, &b) {
                    record(app, &b, event).await;
                }
            }
        }
        if next == cursor {
            return Ok(());
        }
        cursor = next;
        app.store.set_janitor_cursor(CURSOR, cursor).await?;
        if events.len() < BATCH as usize {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::janitor::tests::running;
    use cbs_projections::Reproduction;

    fn succeeded() -> BuildState {
        let mut b = running(1, 0);
        b.status = Status::Succeeded;
        b
    }

    fn reproducing(n: u32, expires: DateTime<Utc>) -> BuildState {
        let mut b = succeeded();
        b.reproduction = Some(Reproduction {
            status: ReproductionStatus::Running,
            reproduction: n,
            reason: ReproductionReason::Sample,
            requested_at: expires,
            worker: Some("w2".into()),
            lease_expires_at: Some(expires),
            sha256: None,
            builder_image: None,
            builder_image_id: None,
            message: String::new(),
            files: vec![],
            finished_at: None,
        });
        b
    }

    #[test]
    fn the_sample_is_chosen_by_key_and_only_once() {
        let b = succeeded();
        assert!(sample(Reproduce::All, &b).is_some());
        assert!(sample(Reproduce::Off, &b).is_none());
        let u = unit(&b.key);
        assert!((0.0..1.0).contains(&u));
        assert!(sample(Reproduce::Sample(u + 0.001), &b).is_some());
        assert!(sample(Reproduce::Sample(u), &b).is_none());
        // Not a build that is running, nor one reproduced already.
        assert!(sample(Reproduce::All, &running(1, 0)).is_none());
        assert!(sample(Reproduce::All, &reproducing(1, Utc::now())).is_none());
        // The fraction of a large set of keys is close to the setting.
        let chosen = (0..10_000u32)
            .filter(|i| Reproduce::Sample(0.1).selects(unit(&BuildKey::digest(&i.to_le_bytes()))))
            .count();
        assert!((850..1150).contains(&chosen), "{chosen} of 10000");
    }

    #[test]
    fn an_expired_reproduction_goes_to_another_worker_then_gives_up() {
        let now = Utc::now();
        let later = now + chrono::Duration::seconds(60);
        assert!(rescue(&reproducing(1, later), now).is_none());
        match rescue(&reproducing(1, now - chrono::Duration::seconds(1)), now) {
            Some(Event::ReproductionRequested(r)) => {
                assert_eq!(
                    (r.reproduction, r.reason),
                    (1, ReproductionReason::LeaseExpired)
                )
            }
            other => panic!("expected a new request, got {other:?}"),
        }
        match rescue(&reproducing(MAX_CLAIMS, now), now) {
            Some(Event::Reproduced(r)) => {
                assert_eq!(r.outcome, ReproductionOutcome::Failed);
                assert!(
                    r.message.contains("stopped before finishing"),
                    "{}",
                    r.message
                );
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }
}
