//! Duty: retry builds that failed for a retryable reason, after a backoff; give up after
//! `janitor.max_attempts` failed attempts.

use std::time::Duration;

use cbs_config::JanitorConfig;
use cbs_events::{Event, GaveUp, RequeueReason, Requeued};
use cbs_projections::BuildState;

use super::{record, BATCH};
use crate::App;

/// The delay before the retry after `failures` failed attempts: `retry_backoff` doubled per
/// further failure, capped at `retry_backoff_max`, scaled by `jitter` (0.8 to 1.2 in use, so
/// that builds failing together do not come back together).
pub fn backoff(cfg: &JanitorConfig, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = cfg
        .retry_backoff
        .saturating_mul(1u32 << exp)
        .min(cfg.retry_backoff_max);
    base.mul_f64(jitter)
}

/// What to do with a build that failed retryably (`b` as read); `jitter` as for [`backoff`].
pub fn decide(cfg: &JanitorConfig, b: &BuildState, jitter: f64) -> Event {
    if b.failures >= cfg.max_attempts {
        let last = b
            .last_error
            .as_ref()
            .map(|e| e.message.as_str())
            .unwrap_or_default();
        Event::GaveUp(GaveUp {
            attempt: b.attempt,
            failures: b.failures,
            message: format!(
                "gave up after {} failed attempts; the last: {last}",
                b.failures
            ),
        })
    } else {
        let delay = backoff(cfg, b.failures, jitter);
        Event::Requeued(Requeued {
            attempt: b.attempt,
            reason: RequeueReason::Retry,
            not_before: b.updated_at
                + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::zero()),
        })
    }
}

/// One pass over the retryable failures.
pub(super) async fn run(app: &App) -> anyhow::Result<()> {
    for b in app.store.retryable_failures(BATCH).await? {
        let jitter = 0.8 + 0.4 * rand::random::<f64>();
        let event = decide(&app.config.janitor, &b, jitter);
        record(app, &b, event).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::janitor::tests::running;

    fn cfg() -> JanitorConfig {
        JanitorConfig {
            max_attempts: 5,
            retry_backoff: Duration::from_secs(10),
            retry_backoff_max: Duration::from_secs(60),
            ..JanitorConfig::default()
        }
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_the_cap() {
        let c = cfg();
        let secs = |f| backoff(&c, f, 1.0).as_secs();
        assert_eq!(
            [secs(0), secs(1), secs(2), secs(3), secs(4), secs(40)],
            [10, 10, 20, 40, 60, 60]
        );
        assert_eq!(backoff(&c, 2, 0.8), Duration::from_secs(16));
        assert_eq!(backoff(&c, 2, 1.2), Duration::from_secs(24));
    }

    #[test]
    fn retries_after_the_backoff_from_the_failure() {
        let mut b = running(2, 2);
        b.status = cbs_projections::Status::Failed;
        match decide(&cfg(), &b, 1.0) {
            Event::Requeued(r) => {
                assert_eq!(r.reason, RequeueReason::Retry);
                assert_eq!(r.attempt, 2);
                assert_eq!(r.not_before, b.updated_at + chrono::Duration::seconds(20));
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[test]
    fn gives_up_with_the_last_error_when_attempts_are_used_up() {
        let mut b = running(5, 5);
        b.status = cbs_projections::Status::Failed;
        b.last_error = Some(cbs_projections::LastError {
            message: "proxy down".into(),
            step: Some("resolve".into()),
            kind: cbs_events::FailureKind::Retryable,
            attempt: 5,
        });
        match decide(&cfg(), &b, 1.0) {
            Event::GaveUp(g) => {
                assert_eq!(g.failures, 5);
                assert!(g.message.ends_with("the last: proxy down"), "{}", g.message);
            }
            other => panic!("expected a give-up, got {other:?}"),
        }
    }
}
