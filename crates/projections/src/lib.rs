//! Read models folded from the event log.
//!
//! [`apply`] is a pure fold: the state of a build after an event depends only on the state
//! before it and the event. The store runs it before every append and writes the result in
//! the same transaction; `janitor rebuild-projections` runs it over the whole log and compares.
//! The fold is also where the state machine is enforced: an event that does not fit the state
//! (a success for an attempt that lost its lease, a second claim, ...) is refused here, before
//! anything is written.
//!
//! ```text
//!  requested ──> queued ──claimed──> running ──succeeded──> succeeded ──artifact_deleted──> expired
//!                  ^  ^                │  │ │
//!                  │  └─requeued───────┘  │ └──failed──> failed ──gave_up──> gave_up
//!                  │   (lease expired,    │             │  (retryable and out of attempts)
//!                  │    preempted)        └──gave_up (lease expired, out of attempts)
//!                  └──────────requeued (retry)──────────┘ (retryable)
//!  cancelled from queued, running or a retryable failed; requeued (forced) reopens
//!  failed, gave_up, cancelled and expired builds (Status::reopenable); any request
//!  reopens an expired one.
//! ```
//!
//! A succeeded build may be reproduced: built again by another worker and compared byte for
//! byte ([`Reproduction`], beside the build's status, which it never changes):
//!
//! ```text
//!  reproduction_requested ──> queued ──reproduction_claimed──> running ──reproduced──> matched
//!                               ^                                 │                  mismatched
//!                               └──reproduction_requested─────────┘                  failed
//!                                  (released, lease_expired)
//!  a new request (sample, admin) starts over from matched, mismatched or failed.
//! ```

use cbs_domain::{BuildKey, BuildRequest};
use cbs_events::{
    Artifact, Event, EventType, FailureKind, ReproductionOutcome, ReproductionReason, RequeueReason,
};
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a build is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a worker (from `available_at` on).
    Queued,
    /// A worker holds the lease of the current attempt.
    Running,
    Succeeded,
    /// The last attempt failed; see `last_error.kind` for whether it will be retried.
    Failed,
    Cancelled,
    GaveUp,
    /// Succeeded, but its files were deleted (retention); a new request rebuilds it.
    Expired,
}

impl Status {
    /// Statuses a forced request (`requeued`, reason forced) reopens: the build ended
    /// without an artifact to serve. The api asks this, and the fold enforces it.
    pub fn reopenable(self) -> bool {
        matches!(
            self,
            Status::Failed | Status::GaveUp | Status::Cancelled | Status::Expired
        )
    }

    pub const ALL: [Status; 7] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
        Status::GaveUp,
        Status::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::GaveUp => "gave_up",
            Status::Expired => "expired",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown build status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Where a reproduction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReproductionStatus {
    /// Waiting for a worker other than the one that built the artifact.
    Queued,
    Running,
    Matched,
    Mismatched,
    Failed,
}

impl ReproductionStatus {
    /// A reproduction in this status has ended (a new request may start another).
    pub fn ended(self) -> bool {
        matches!(
            self,
            ReproductionStatus::Matched
                | ReproductionStatus::Mismatched
                | ReproductionStatus::Failed
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReproductionStatus::Queued => "queued",
            ReproductionStatus::Running => "running",
            ReproductionStatus::Matched => "matched",
            ReproductionStatus::Mismatched => "mismatched",
            ReproductionStatus::Failed => "failed",
        }
    }
}

/// The latest reproduction of a succeeded build: an independent second build of its
/// request by another worker, compared with the artifact byte for byte. Stored as JSON in
/// the `builds.reproduction` column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reproduction {
    pub status: ReproductionStatus,
    /// Claims of a reproduction so far (for this artifact); the current one's number.
    pub reproduction: u32,
    /// Why the latest request was made.
    pub reason: ReproductionReason,
    pub requested_at: DateTime<Utc>,
    /// The worker reproducing it (running), or that reproduced it (ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// While running: the janitor gives it to another worker after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Ended: the second build's SHA-256 (absent when it failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_image_id: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Files the second builder stored beside the artifact (its signed provenance).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// The last failure of a build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastError {
    pub attempt: u32,
    pub kind: FailureKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub message: String,
}

/// The `builds` read model: one row per build.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildState {
    pub key: BuildKey,
    pub status: Status,
    pub request: BuildRequest,
    /// Claims so far; the current (or last) attempt's number.
    pub attempt: u32,
    /// Failed attempts (the count that max attempts limits).
    pub failures: u32,
    /// Worker holding the lease while running.
    pub owner: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// While queued: the earliest time a worker may claim it (retry backoff).
    pub available_at: DateTime<Utc>,
    /// The step the running attempt is in.
    pub current_step: Option<String>,
    pub last_error: Option<LastError>,
    pub artifact: Option<Artifact>,
    /// Sequence number of the last event folded in.
    pub last_seq: u32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Who requested the build (see [`cbs_events::Requested::client`]).
    pub client: Option<String>,
    /// Its rank in the fair queue (see [`cbs_events::Requested::rank`]); a requeued build
    /// keeps its rank.
    pub queue_rank: i64,
    /// The worker whose attempt produced the artifact (a reproduction must be another).
    pub built_by: Option<String>,
    /// The latest reproduction of the artifact, if one was ever asked for.
    pub reproduction: Option<Reproduction>,
    /// Retention removed the output of attempts `1..=output_pruned` (0: none was removed).
    pub output_pruned: u32,
}

impl BuildState {
    /// No event can change the build any more without a forced reopen.
    pub fn is_terminal(&self) -> bool {
        match self.status {
            Status::Succeeded | Status::Cancelled | Status::GaveUp | Status::Expired => true,
            Status::Failed => self
                .last_error
                .as_ref()
                .is_some_and(|e| e.kind == FailureKind::Permanent),
            Status::Queued | Status::Running => false,
        }
    }
}

/// Why an event does not fit the build's state. Nothing is written when the fold refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FoldError {
    #[error("build {key}: the first event must be `requested`, got `{got}`")]
    NotRequested { key: BuildKey, got: EventType },
    #[error("build {key} was already requested")]
    AlreadyRequested { key: BuildKey },
    #[error("build {key}: event {got} does not follow event {last_seq}")]
    SequenceGap {
        key: BuildKey,
        last_seq: u32,
        got: u32,
    },
    /// The writer's attempt is no longer the build's current one: its lease was taken away.
    #[error("build {key}: attempt {writer_attempt} was fenced off; the build is at attempt {current_attempt} ({status})")]
    Fenced {
        key: BuildKey,
        writer_attempt: u32,
        current_attempt: u32,
        status: Status,
    },
    #[error("build {key}: `{event}` cannot happen while the build is {status}")]
    InvalidTransition {
        key: BuildKey,
        status: Status,
        event: EventType,
    },
    /// The writer's reproduction is no longer the build's current one (the janitor gave it
    /// to another worker, or it ended).
    #[error("build {key}: reproduction {writer} by {worker} was fenced off; the build's reproduction is {current} ({status})")]
    ReproductionFenced {
        key: BuildKey,
        writer: u32,
        worker: String,
        current: u32,
        status: &'static str,
    },
    #[error("build {key}: `{event}` cannot happen while its reproduction is {status}")]
    InvalidReproduction {
        key: BuildKey,
        status: &'static str,
        event: EventType,
    },
    /// A reproduction must be independent: not by the worker that built the artifact.
    #[error("build {key}: worker {worker} built the artifact and cannot reproduce it")]
    SameWorker { key: BuildKey, worker: String },
}

/// Times in the read model have the database's precision (microseconds), so a state folded
/// in memory equals the one read back from storage.
fn micros(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

/// Folds one event into a build's state. `prev` is `None` before the first event.
///
/// `seq` and `recorded_at` are the event's place and time in the log, so that folding the
/// stored log always gives back the same state.
pub fn apply(
    prev: Option<&BuildState>,
    key: &BuildKey,
    seq: u32,
    recorded_at: DateTime<Utc>,
    event: &Event,
) -> Result<BuildState, FoldError> {
    let recorded_at = micros(recorded_at);
    let Some(prev) = prev else {
        return match event {
            Event::Requested(r) if seq == 1 => Ok(BuildState {
                key: key.clone(),
                status: Status::Queued,
                request: r.request.clone(),
                attempt: 0,
                failures: 0,
                owner: None,
                lease_expires_at: None,
                available_at: recorded_at,
                current_step: None,
                last_error: None,
                artifact: None,
                last_seq: 1,
                created_at: recorded_at,
                updated_at: recorded_at,
                client: r.client.clone(),
                queue_rank: r.rank,
                built_by: None,
                reproduction: None,
                output_pruned: 0,
            }),
            Event::Requested(_) => Err(FoldError::SequenceGap {
                key: key.clone(),
                last_seq: 0,
                got: seq,
            }),
            other => Err(FoldError::NotRequested {
                key: key.clone(),
                got: other.event_type(),
            }),
        };
    };
    if seq != prev.last_seq + 1 {
        return Err(FoldError::SequenceGap {
            key: key.clone(),
            last_seq: prev.last_seq,
            got: seq,
        });
    }
    let invalid = || FoldError::InvalidTransition {
        key: key.clone(),
        status: prev.status,
        event: event.event_type(),
    };
    // Events of one attempt are refused once a later attempt began or the attempt ended.
    let fence = |attempt: u32, allowed: &[Status]| {
        if attempt != prev.attempt {
            Err(FoldError::Fenced {
                key: key.clone(),
                writer_attempt: attempt,
                current_attempt: prev.attempt,
                status: prev.status,
            })
        } else if !allowed.contains(&prev.status) {
            // The same attempt, but it already ended: for its writer this is fencing too.
            Err(FoldError::Fenced {
                key: key.clone(),
                writer_attempt: attempt,
                current_attempt: prev.attempt,
                status: prev.status,
            })
        } else {
            Ok(())
        }
    };

    let mut next = prev.clone();
    next.last_seq = seq;
    next.updated_at = recorded_at;
    match event {
        Event::Requested(_) => {
            return Err(FoldError::AlreadyRequested { key: key.clone() });
        }
        Event::Claimed(c) => {
            if prev.status != Status::Queued {
                return Err(invalid());
            }
            if c.attempt != prev.attempt + 1 {
                return Err(FoldError::Fenced {
                    key: key.clone(),
                    writer_attempt: c.attempt,
                    current_attempt: prev.attempt,
                    status: prev.status,
                });
            }
            next.status = Status::Running;
            next.attempt = c.attempt;
            next.owner = Some(c.worker.clone());
            next.lease_expires_at = Some(micros(c.lease_expires_at));
            next.current_step = None;
        }
        Event::LeaseRenewed(l) => {
            fence(l.attempt, &[Status::Running])?;
            next.lease_expires_at = Some(micros(l.lease_expires_at));
        }
        Event::StepStarted(s) => {
            fence(s.attempt, &[Status::Running])?;
            next.current_step = Some(s.step.clone());
        }
        Event::StepFinished(s) => {
            fence(s.attempt, &[Status::Running])?;
        }
        Event::Output(o) => {
            fence(o.attempt, &[Status::Running])?;
        }
        Event::Succeeded(s) => {
            fence(s.attempt, &[Status::Running])?;
            next.status = Status::Succeeded;
            next.artifact = Some(s.artifact.clone());
            next.built_by = prev.owner.clone();
            // A new artifact: nothing of it was reproduced yet.
            next.reproduction = None;
            next.owner = None;
            next.lease_expires_at = None;
            next.current_step = None;
        }
        Event::Failed(f) => {
            fence(f.attempt, &[Status::Running])?;
            next.status = Status::Failed;
            next.failures = prev.failures + 1;
            next.last_error = Some(LastError {
                attempt: f.attempt,
                kind: f.kind,
                step: f.step.clone(),
                message: f.message.clone(),
            });
            next.owner = None;
            next.lease_expires_at = None;
            next.current_step = None;
        }
        Event::Requeued(r) => {
            match r.reason {
                RequeueReason::Preempted => {
                    fence(r.attempt, &[Status::Running])?;
                }
                RequeueReason::LeaseExpired => {
                    fence(r.attempt, &[Status::Running])?;
                    // A worker that died with the build may have died of it: it counts.
                    next.failures = prev.failures + 1;
                }
                RequeueReason::Retry => {
                    fence(r.attempt, &[Status::Failed])?;
                    if prev.is_terminal() {
                        return Err(invalid());
                    }
                }
                RequeueReason::Forced => {
                    if r.attempt != prev.attempt {
                        return Err(FoldError::Fenced {
                            key: key.clone(),
                            writer_attempt: r.attempt,
                            current_attempt: prev.attempt,
                            status: prev.status,
                        });
                    }
                    if !prev.status.reopenable() {
                        return Err(invalid());
                    }
                    // A forced build starts counting failures afresh.
                    next.failures = 0;
                }
            }
            next.status = Status::Queued;
            next.available_at = micros(r.not_before);
            next.owner = None;
            next.lease_expires_at = None;
            next.current_step = None;
        }
        Event::ArtifactDeleted(d) => {
            fence(d.attempt, &[Status::Succeeded])?;
            next.status = Status::Expired;
            next.artifact = None;
        }
        Event::Cancelled(_) => {
            let cancellable = match prev.status {
                Status::Queued | Status::Running => true,
                Status::Failed => !prev.is_terminal(),
                Status::Succeeded | Status::Cancelled | Status::GaveUp | Status::Expired => false,
            };
            if !cancellable {
                return Err(invalid());
            }
            next.status = Status::Cancelled;
            next.owner = None;
            next.lease_expires_at = None;
            next.current_step = None;
        }
        Event::GaveUp(g) => {
            fence(g.attempt, &[Status::Running, Status::Failed])?;
            if prev.is_terminal() {
                return Err(invalid());
            }
            next.status = Status::GaveUp;
            next.owner = None;
            next.lease_expires_at = None;
            next.current_step = None;
        }
        Event::ReproductionRequested(_) | Event::ReproductionClaimed(_) | Event::Reproduced(_) => {
            next.reproduction = Some(reproduce(prev, key, recorded_at, event)?);
        }
        Event::OutputPruned(p) => {
            // Only attempts that ended, each once.
            let running = prev.status == Status::Running;
            let ended = if running {
                p.attempts < prev.attempt
            } else {
                p.attempts <= prev.attempt
            };
            if !ended || p.attempts <= prev.output_pruned {
                return Err(invalid());
            }
            next.output_pruned = p.attempts;
            // Housekeeping, not activity: the build's age (which artifact retention and
            // this one go by) stays.
            next.updated_at = prev.updated_at;
        }
    }
    Ok(next)
}

/// The fold of the reproduction events: the build's next [`Reproduction`].
fn reproduce(
    prev: &BuildState,
    key: &BuildKey,
    recorded_at: DateTime<Utc>,
    event: &Event,
) -> Result<Reproduction, FoldError> {
    let current = prev.reproduction.as_ref();
    let count = current.map_or(0, |r| r.reproduction);
    let status = current.map_or("none", |r| r.status.as_str());
    let invalid = || FoldError::InvalidReproduction {
        key: key.clone(),
        status,
        event: event.event_type(),
    };
    let fenced = |writer: u32, worker: &str| FoldError::ReproductionFenced {
        key: key.clone(),
        writer,
        worker: worker.to_owned(),
        current: count,
        status,
    };
    // The running reproduction `n`, if that is what the build has.
    let running =
        |n: u32| current.filter(|r| r.status == ReproductionStatus::Running && r.reproduction == n);
    match event {
        Event::ReproductionRequested(r) => {
            match r.reason {
                ReproductionReason::Sample | ReproductionReason::Admin => {
                    if prev.status != Status::Succeeded {
                        return Err(FoldError::InvalidTransition {
                            key: key.clone(),
                            status: prev.status,
                            event: event.event_type(),
                        });
                    }
                    if current.is_some_and(|c| !c.status.ended()) || r.reproduction != count {
                        return Err(invalid());
                    }
                }
                ReproductionReason::Released | ReproductionReason::LeaseExpired => {
                    if running(r.reproduction).is_none() {
                        return Err(fenced(r.reproduction, "the janitor or its worker"));
                    }
                }
            }
            Ok(Reproduction {
                status: ReproductionStatus::Queued,
                reproduction: count,
                reason: r.reason,
                requested_at: recorded_at,
                worker: None,
                lease_expires_at: None,
                sha256: None,
                builder_image: None,
                builder_image_id: None,
                message: String::new(),
                files: Vec::new(),
                finished_at: None,
            })
        }
        Event::ReproductionClaimed(c) => {
            let Some(queued) = current.filter(|r| r.status == ReproductionStatus::Queued) else {
                return Err(invalid());
            };
            if prev.status != Status::Succeeded {
                return Err(FoldError::InvalidTransition {
                    key: key.clone(),
                    status: prev.status,
                    event: event.event_type(),
                });
            }
            if c.reproduction != count + 1 {
                return Err(fenced(c.reproduction, &c.worker));
            }
            if prev.built_by.as_deref() == Some(c.worker.as_str()) {
                return Err(FoldError::SameWorker {
                    key: key.clone(),
                    worker: c.worker.clone(),
                });
            }
            Ok(Reproduction {
                status: ReproductionStatus::Running,
                reproduction: c.reproduction,
                worker: Some(c.worker.clone()),
                lease_expires_at: Some(micros(c.lease_expires_at)),
                ..queued.clone()
            })
        }
        Event::Reproduced(d) => {
            let Some(run) =
                running(d.reproduction).filter(|r| r.worker.as_ref() == Some(&d.worker))
            else {
                return Err(fenced(d.reproduction, &d.worker));
            };
            Ok(Reproduction {
                status: match d.outcome {
                    ReproductionOutcome::Matched => ReproductionStatus::Matched,
                    ReproductionOutcome::Mismatched => ReproductionStatus::Mismatched,
                    ReproductionOutcome::Failed => ReproductionStatus::Failed,
                },
                lease_expires_at: None,
                sha256: d.sha256.clone(),
                builder_image: d.builder_image.clone(),
                builder_image_id: d.builder_image_id.clone(),
                message: d.message.clone(),
                files: d.files.clone(),
                finished_at: Some(recorded_at),
                ..run.clone()
            })
        }
        _ => unreachable!("reproduce is called with reproduction events only"),
    }
}

/// Folds a build's whole history, in sequence order.
pub fn replay<'a>(
    key: &BuildKey,
    events: impl IntoIterator<Item = (u32, DateTime<Utc>, &'a Event)>,
) -> Result<Option<BuildState>, FoldError> {
    let mut state: Option<BuildState> = None;
    for (seq, at, event) in events {
        state = Some(apply(state.as_ref(), key, seq, at, event)?);
    }
    Ok(state)
}

#[cfg(test)]
mod tests;
