//! Duty: rescue builds whose worker stopped renewing its lease (it died, hangs, or lost the
//! database): requeue them at their old place in the queue, or give up when the attempts
//! are used up.

use chrono::{DateTime, Utc};

use cbs_config::JanitorConfig;
use cbs_events::{Event, GaveUp, RequeueReason, Requeued};
use cbs_projections::BuildState;

use super::{record, BATCH};
use crate::App;

/// What to do with a running build whose lease expired (`b` as read), at `now`.
pub fn decide(cfg: &JanitorConfig, b: &BuildState, now: DateTime<Utc>) -> Event {
    if b.failures + 1 >= cfg.max_attempts {
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
            not_before: b.available_at.min(now),
        })
    }
}

/// One pass over the builds whose lease expired.
pub(super) async fn run(app: &App) -> anyhow::Result<()> {
    for b in app.store.expired_leases(BATCH).await? {
        let event = decide(&app.config.janitor, &b, Utc::now());
        record(app, &b, event).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::janitor::tests::running;

    #[test]
    fn requeues_at_the_old_place_while_attempts_remain() {
        let cfg = JanitorConfig {
            max_attempts: 3,
            ..JanitorConfig::default()
        };
        let now = Utc::now();
        let mut b = running(1, 0);
        b.available_at = now - chrono::Duration::minutes(5);
        match decide(&cfg, &b, now) {
            Event::Requeued(r) => {
                assert_eq!(r.attempt, 1);
                assert_eq!(r.reason, RequeueReason::LeaseExpired);
                assert_eq!(r.not_before, b.available_at);
            }
            other => panic!("expected a requeue, got {other:?}"),
        }
        // A build whose place lies in the future (a retry's backoff) comes back now.
        b.available_at = now + chrono::Duration::minutes(5);
        match decide(&cfg, &b, now) {
            Event::Requeued(r) => assert_eq!(r.not_before, now),
            other => panic!("expected a requeue, got {other:?}"),
        }
    }

    #[test]
    fn gives_up_when_this_was_the_last_attempt() {
        let cfg = JanitorConfig {
            max_attempts: 3,
            ..JanitorConfig::default()
        };
        let mut b = running(3, 2);
        b.owner = Some("w-1".into());
        match decide(&cfg, &b, Utc::now()) {
            Event::GaveUp(g) => {
                assert_eq!((g.attempt, g.failures), (3, 3));
                assert!(g.message.contains("w-1"), "{}", g.message);
            }
            other => panic!("expected a give-up, got {other:?}"),
        }
        // One failure fewer: another attempt.
        assert!(matches!(
            decide(&cfg, &running(2, 1), Utc::now()),
            Event::Requeued(_)
        ));
    }
}
