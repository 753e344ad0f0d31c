//! The state machine as a table: a history of events, then the expected outcome.

use super::*;
use cbs_domain::BuildRequest;
use cbs_events::{
    Cancelled, Claimed, Failed, GaveUp, Requested, Requeued, StepFinished, StepStarted, Succeeded,
};
use chrono::TimeZone;

fn key() -> BuildKey {
    BuildKey::digest(b"test")
}

fn t(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
}

fn requested() -> Event {
    Event::Requested(Requested {
        request: BuildRequest::new(
            cbs_domain::Platform::new("linux", "amd64", None).unwrap(),
            "v2.8.4".parse().unwrap(),
            vec![],
            vec![],
        )
        .unwrap(),
        client: Some("token:ci".into()),
        rank: 7,
    })
}

fn claimed(attempt: u32) -> Event {
    Event::Claimed(Claimed {
        worker: format!("w{attempt}"),
        attempt,
        lease_expires_at: t(100),
    })
}

fn step(attempt: u32) -> Event {
    Event::StepStarted(StepStarted {
        attempt,
        step: "compile".into(),
    })
}

fn step_done(attempt: u32) -> Event {
    Event::StepFinished(StepFinished {
        attempt,
        step: "compile".into(),
        duration_ms: 5,
        exit_code: Some(0),
    })
}

fn succeeded(attempt: u32) -> Event {
    Event::Succeeded(Succeeded {
        attempt,
        artifact: Artifact {
            location: "builds/x".into(),
            size: 1,
            sha256: "00".repeat(32),
            files: vec![],
            modules_sha256: None,
        },
    })
}

fn failed(attempt: u32, kind: FailureKind) -> Event {
    Event::Failed(Failed {
        attempt,
        kind,
        step: Some("compile".into()),
        message: "boom".into(),
    })
}

fn requeued(attempt: u32, reason: RequeueReason) -> Event {
    Event::Requeued(Requeued {
        attempt,
        reason,
        not_before: t(50),
    })
}

fn cancelled() -> Event {
    Event::Cancelled(Cancelled { reason: "x".into() })
}

fn gave_up(attempt: u32) -> Event {
    Event::GaveUp(GaveUp {
        attempt,
        failures: attempt,
        message: "boom".into(),
    })
}

/// Folds `history`; returns the state or the error of the first refused event.
fn run(history: &[Event]) -> Result<BuildState, FoldError> {
    let mut state = None;
    for (i, e) in history.iter().enumerate() {
        state = Some(apply(state.as_ref(), &key(), i as u32 + 1, t(i as i64), e)?);
    }
    Ok(state.expect("non-empty history"))
}

#[test]
fn accepted_histories_end_in_the_expected_status() {
    use FailureKind::*;
    use RequeueReason::*;
    let cases: Vec<(&str, Vec<Event>, Status)> = vec![
        ("new build", vec![requested()], Status::Queued),
        ("claimed", vec![requested(), claimed(1)], Status::Running),
        (
            "happy path",
            vec![requested(), claimed(1), step(1), step_done(1), succeeded(1)],
            Status::Succeeded,
        ),
        (
            "permanent failure",
            vec![requested(), claimed(1), failed(1, Permanent)],
            Status::Failed,
        ),
        (
            "retry then success",
            vec![
                requested(),
                claimed(1),
                failed(1, Retryable),
                requeued(1, Retry),
                claimed(2),
                succeeded(2),
            ],
            Status::Succeeded,
        ),
        (
            "lease expired then success",
            vec![
                requested(),
                claimed(1),
                requeued(1, LeaseExpired),
                claimed(2),
                succeeded(2),
            ],
            Status::Succeeded,
        ),
        (
            "preempted",
            vec![requested(), claimed(1), requeued(1, Preempted)],
            Status::Queued,
        ),
        (
            "gave up after failures",
            vec![requested(), claimed(1), failed(1, Retryable), gave_up(1)],
            Status::GaveUp,
        ),
        (
            "gave up on an expired lease",
            vec![requested(), claimed(1), gave_up(1)],
            Status::GaveUp,
        ),
        (
            "cancel queued",
            vec![requested(), cancelled()],
            Status::Cancelled,
        ),
        (
            "cancel running",
            vec![requested(), claimed(1), cancelled()],
            Status::Cancelled,
        ),
        (
            "force reopens a permanent failure",
            vec![
                requested(),
                claimed(1),
                failed(1, Permanent),
                requeued(1, Forced),
            ],
            Status::Queued,
        ),
        (
            "force reopens a cancelled build that never ran",
            vec![requested(), cancelled(), requeued(0, Forced), claimed(1)],
            Status::Running,
        ),
    ];
    for (name, history, want) in cases {
        let state = run(&history).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(state.status, want, "{name}");
        assert_eq!(state.last_seq as usize, history.len(), "{name}");
    }
}

#[test]
fn refused_histories_name_the_reason() {
    use FailureKind::*;
    use RequeueReason::*;
    let cases: Vec<(&str, Vec<Event>, &str)> = vec![
        (
            "claim before request",
            vec![claimed(1)],
            "first event must be `requested`",
        ),
        (
            "requested twice",
            vec![requested(), requested()],
            "already requested",
        ),
        (
            "double claim",
            vec![requested(), claimed(1), claimed(2)],
            "`claimed` cannot happen while the build is running",
        ),
        (
            "claim skips an attempt",
            vec![requested(), claimed(2)],
            "attempt 2 was fenced off",
        ),
        (
            "success of a fenced attempt",
            vec![
                requested(),
                claimed(1),
                requeued(1, LeaseExpired),
                claimed(2),
                succeeded(1),
            ],
            "attempt 1 was fenced off; the build is at attempt 2 (running)",
        ),
        (
            "step of a requeued attempt",
            vec![requested(), claimed(1), requeued(1, Preempted), step(1)],
            "attempt 1 was fenced off; the build is at attempt 1 (queued)",
        ),
        (
            "success twice",
            vec![requested(), claimed(1), succeeded(1), succeeded(1)],
            "fenced off",
        ),
        (
            "fail after success",
            vec![requested(), claimed(1), succeeded(1), failed(1, Retryable)],
            "fenced off",
        ),
        (
            "retry a permanent failure",
            vec![
                requested(),
                claimed(1),
                failed(1, Permanent),
                requeued(1, Retry),
            ],
            "cannot happen while the build is failed",
        ),
        (
            "give up a permanent failure",
            vec![requested(), claimed(1), failed(1, Permanent), gave_up(1)],
            "cannot happen while the build is failed",
        ),
        (
            "cancel a success",
            vec![requested(), claimed(1), succeeded(1), cancelled()],
            "`cancelled` cannot happen while the build is succeeded",
        ),
        (
            "force a success",
            vec![requested(), claimed(1), succeeded(1), requeued(1, Forced)],
            "`requeued` cannot happen while the build is succeeded",
        ),
        (
            "force a running build",
            vec![requested(), claimed(1), requeued(1, Forced)],
            "cannot happen while the build is running",
        ),
    ];
    for (name, history, want) in cases {
        let err = run(&history).expect_err(name).to_string();
        assert!(err.contains(want), "{name}: {err}");
    }
}

#[test]
fn sequence_numbers_must_follow_without_gaps() {
    let s1 = apply(None, &key(), 1, t(0), &requested()).unwrap();
    let err = apply(Some(&s1), &key(), 3, t(1), &claimed(1)).unwrap_err();
    assert_eq!(
        err,
        FoldError::SequenceGap {
            key: key(),
            last_seq: 1,
            got: 3
        }
    );
    assert!(apply(None, &key(), 2, t(0), &requested()).is_err());
}

#[test]
fn fold_tracks_lease_owner_step_error_and_artifact() {
    use FailureKind::*;
    let s = run(&[requested(), claimed(1), step(1)]).unwrap();
    assert_eq!(s.owner.as_deref(), Some("w1"));
    assert_eq!(s.lease_expires_at, Some(t(100)));
    assert_eq!(s.current_step.as_deref(), Some("compile"));
    assert_eq!(s.created_at, t(0));
    assert_eq!(s.updated_at, t(2));

    let s = run(&[requested(), claimed(1), step(1), failed(1, Retryable)]).unwrap();
    assert_eq!(s.owner, None);
    assert_eq!(s.lease_expires_at, None);
    assert_eq!(s.current_step, None);
    assert_eq!(s.failures, 1);
    assert!(!s.is_terminal());
    assert_eq!(s.last_error.as_ref().unwrap().message, "boom");

    let s = run(&[
        requested(),
        claimed(1),
        failed(1, Retryable),
        requeued(1, RequeueReason::Retry),
    ])
    .unwrap();
    assert_eq!(s.available_at, t(50));
    assert_eq!(s.failures, 1);

    let s = run(&[requested(), claimed(1), succeeded(1)]).unwrap();
    assert!(s.is_terminal());
    assert_eq!(s.artifact.unwrap().size, 1);
}

#[test]
fn status_names_round_trip() {
    for s in Status::ALL {
        assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
    }
    assert!("done".parse::<Status>().is_err());
}

fn renewed(attempt: u32, at: i64) -> Event {
    Event::LeaseRenewed(cbs_events::LeaseRenewed {
        attempt,
        lease_expires_at: t(at),
    })
}

fn deleted(attempt: u32) -> Event {
    Event::ArtifactDeleted(cbs_events::ArtifactDeleted {
        attempt,
        reason: "retention".into(),
    })
}

#[test]
fn leases_renewals_rescues_and_retention() {
    // A renewal moves the lease; a stale attempt's renewal is fenced.
    let b = run(&[requested(), claimed(1), renewed(1, 500)]).unwrap();
    assert_eq!(b.lease_expires_at, Some(t(500)));
    assert!(matches!(
        run(&[
            requested(),
            claimed(1),
            requeued(1, RequeueReason::LeaseExpired),
            claimed(2),
            renewed(1, 500)
        ]),
        Err(FoldError::Fenced { .. })
    ));
    // A rescue counts as a failed attempt; a preemption does not.
    let b = run(&[
        requested(),
        claimed(1),
        requeued(1, RequeueReason::LeaseExpired),
    ])
    .unwrap();
    assert_eq!((b.status, b.failures), (Status::Queued, 1));
    let b = run(&[
        requested(),
        claimed(1),
        requeued(1, RequeueReason::Preempted),
    ])
    .unwrap();
    assert_eq!((b.status, b.failures), (Status::Queued, 0));
    // Retention: only a succeeded build's published attempt expires; a forced request
    // reopens it.
    let b = run(&[requested(), claimed(1), succeeded(1), deleted(1)]).unwrap();
    assert_eq!(b.status, Status::Expired);
    assert!(b.artifact.is_none() && b.is_terminal());
    let b = run(&[
        requested(),
        claimed(1),
        succeeded(1),
        deleted(1),
        requeued(1, RequeueReason::Forced),
    ])
    .unwrap();
    assert_eq!(b.status, Status::Queued);
    assert!(run(&[requested(), claimed(1), deleted(1)]).is_err());
    assert!(run(&[requested(), claimed(1), succeeded(1), deleted(2)]).is_err());
}

fn repro_requested(n: u32, reason: ReproductionReason) -> Event {
    Event::ReproductionRequested(cbs_events::ReproductionRequested {
        reproduction: n,
        reason,
    })
}

fn repro_claimed(n: u32, worker: &str) -> Event {
    Event::ReproductionClaimed(cbs_events::ReproductionClaimed {
        reproduction: n,
        worker: worker.into(),
        lease_expires_at: t(900),
    })
}

fn reproduced(n: u32, worker: &str, outcome: ReproductionOutcome) -> Event {
    Event::Reproduced(cbs_events::Reproduced {
        reproduction: n,
        worker: worker.into(),
        outcome,
        sha256: Some("11".repeat(32)),
        builder_image: Some("builder".into()),
        builder_image_id: Some("sha256:00".into()),
        message: String::new(),
        files: vec![],
    })
}

#[test]
fn reproductions_run_beside_the_build_and_are_fenced() {
    use ReproductionOutcome::*;
    use ReproductionReason::*;
    let built = || vec![requested(), claimed(1), succeeded(1)];
    let with = |more: &[Event]| {
        let mut h = built();
        h.extend_from_slice(more);
        run(&h)
    };
    // The builder is remembered; a reproduction by another worker ends in its outcome and
    // never changes the build's status.
    let b = with(&[
        repro_requested(0, Sample),
        repro_claimed(1, "other"),
        reproduced(1, "other", Mismatched),
    ])
    .unwrap();
    assert_eq!(b.built_by.as_deref(), Some("w1"));
    assert_eq!(b.status, Status::Succeeded);
    let r = b.reproduction.unwrap();
    assert_eq!(
        (r.status, r.reproduction, r.worker.as_deref(), r.finished_at),
        (ReproductionStatus::Mismatched, 1, Some("other"), Some(t(5)))
    );
    // The worker that built the artifact cannot reproduce it.
    assert!(matches!(
        with(&[repro_requested(0, Admin), repro_claimed(1, "w1")]),
        Err(FoldError::SameWorker { .. })
    ));
    // Only a succeeded build is reproduced; only one reproduction at a time.
    assert!(run(&[requested(), repro_requested(0, Sample)]).is_err());
    assert!(with(&[repro_requested(0, Sample), repro_requested(0, Admin)]).is_err());
    // A released or expired reproduction goes back to the queue; the old claim's result is
    // fenced off, the new claim's is taken.
    let h = [
        repro_requested(0, Sample),
        repro_claimed(1, "a"),
        repro_requested(1, LeaseExpired),
        repro_claimed(2, "b"),
    ];
    let mut late = h.to_vec();
    late.push(reproduced(1, "a", Matched));
    assert!(matches!(
        with(&late),
        Err(FoldError::ReproductionFenced { writer: 1, .. })
    ));
    let mut ok = h.to_vec();
    ok.push(reproduced(2, "b", Matched));
    let r = with(&ok).unwrap().reproduction.unwrap();
    assert_eq!((r.status, r.reproduction), (ReproductionStatus::Matched, 2));
    // A result must come from the claiming worker, and a release from the running claim.
    assert!(with(&[
        repro_requested(0, Sample),
        repro_claimed(1, "a"),
        reproduced(1, "b", Matched)
    ])
    .is_err());
    assert!(with(&[repro_requested(0, Sample), repro_requested(0, Released)]).is_err());
    // A claim must be the next one.
    assert!(with(&[repro_requested(0, Sample), repro_claimed(2, "a")]).is_err());
    // After an ended reproduction, a new request starts the next; a new artifact (forced
    // rebuild after expiry) forgets the old reproduction.
    let b = with(&[
        repro_requested(0, Sample),
        repro_claimed(1, "a"),
        reproduced(1, "a", Failed),
        repro_requested(1, Admin),
        repro_claimed(2, "a"),
    ])
    .unwrap();
    assert_eq!(
        b.reproduction.map(|r| (r.status, r.reproduction)),
        Some((ReproductionStatus::Running, 2))
    );
    let b = with(&[
        repro_requested(0, Sample),
        repro_claimed(1, "a"),
        reproduced(1, "a", Matched),
        deleted(1),
        requeued(1, RequeueReason::Forced),
        claimed(2),
        succeeded(2),
    ])
    .unwrap();
    assert_eq!((b.reproduction, b.built_by.as_deref()), (None, Some("w2")));
}
