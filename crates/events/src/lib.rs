//! The build event vocabulary.
//!
//! The event log is the source of truth for build state: every change of a build is one of
//! these events, appended with a per-build sequence number. Events are plain serde data; they
//! know nothing of SQL, HTTP or the API's JSON shapes. The store encodes an event as
//! `(event_type, schema_version, payload)` with [`Event::encode`] and reads it back with
//! [`Event::decode`].

use std::fmt;
use std::str::FromStr;

use cbs_domain::{BuildKey, BuildRequest};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Version of every payload schema written by this code. A payload change that old readers
/// cannot read bumps it, and [`Event::decode`] learns to read both.
pub const SCHEMA_VERSION: i16 = 1;

/// One change of a build.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Requested(Requested),
    Claimed(Claimed),
    LeaseRenewed(LeaseRenewed),
    StepStarted(StepStarted),
    StepFinished(StepFinished),
    Output(Output),
    Succeeded(Succeeded),
    Failed(Failed),
    Requeued(Requeued),
    Cancelled(Cancelled),
    GaveUp(GaveUp),
    ArtifactDeleted(ArtifactDeleted),
    ReproductionRequested(ReproductionRequested),
    ReproductionClaimed(ReproductionClaimed),
    Reproduced(Reproduced),
    OutputPruned(OutputPruned),
}

/// A build was requested for the first time: the full normalized request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requested {
    pub request: BuildRequest,
    /// Who asked, as the api counts clients: `token:<name>` for a caller with an API token,
    /// `addr:<16 hex>` (a keyed hash of the address, IPv6 per /64) otherwise. Absent in
    /// events written before clients were recorded and for builds the server made itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The build's place in the fair queue: workers take queued builds by rank, then age.
    /// A client's first queued build gets the queue's current lowest rank, each further
    /// one the next rank after that client's last queued build, so clients take turns.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rank: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// A worker took the build. `attempt` counts claims from 1; every later write of that worker
/// names it, and is refused once another attempt has begun (fencing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claimed {
    pub worker: String,
    pub attempt: u32,
    pub lease_expires_at: DateTime<Utc>,
}

/// A build step began (xcaddy's names: `initialize_module`, `pin_versions`, `compile`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepStarted {
    pub attempt: u32,
    pub step: String,
}

/// A build step ended. `exit_code` is `None` when the step never exited on its own (killed,
/// timed out, or the container could not start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepFinished {
    pub attempt: u32,
    pub step: String,
    pub duration_ms: u64,
    pub exit_code: Option<i64>,
}

/// Lines a step printed, as builds before the output table recorded them: in the log,
/// coalesced into chunks. Still read (the log keeps them); no longer written: output now
/// lives in the store's `build_output` table, outside the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub attempt: u32,
    pub step: String,
    pub lines: Vec<String>,
}

/// Retention removed the output of attempts `1..=attempts` from the output table (see the
/// store's `build_output`): from now on the build's progress stream and output say so
/// instead of showing it. Output of the same attempts that older versions wrote into this
/// log as `output` events is not affected (the log is never changed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputPruned {
    /// The highest attempt whose output went (all earlier ones went too).
    pub attempts: u32,
    /// Chunks and bytes of output removed.
    pub chunks: u64,
    pub bytes: u64,
    /// Why, e.g. "output of succeeded builds is kept for 30days".
    pub reason: String,
}

/// Where a finished artifact lives and what it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Storage location of the published attempt (a key prefix in artifact storage).
    pub location: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the binary.
    pub sha256: String,
    /// Every file stored under `location`, the binary first (`caddy`, `caddy.minisig`,
    /// `caddy.sha256`, `provenance.json`, `provenance.json.minisig`). Empty in events written
    /// before artifacts were signed (their binary is named by the platform alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// The module-list hash of the binary (as its signature's trusted comment states it):
    /// finds the build of the request a binary from elsewhere says it was built from.
    /// Absent in events written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_sha256: Option<String>,
}

/// The build is done and its files are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Succeeded {
    pub attempt: u32,
    pub artifact: Artifact,
}

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Our fault or the world's (proxy timeout, Docker error, full disk): try again later.
    Retryable,
    /// The request's fault (unknown module, compile error): the same request fails again.
    Permanent,
}

/// An attempt failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failed {
    pub attempt: u32,
    pub kind: FailureKind,
    /// The step that failed, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// What a user is shown: which step failed and the tail of its output.
    pub message: String,
}

/// Why a build went back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequeueReason {
    /// The worker stopped renewing its lease (it died or lost the database).
    LeaseExpired,
    /// The worker's VM is being preempted, or the worker is shutting down; does not count as
    /// a failed attempt.
    Preempted,
    /// A retryable failure, retried after a backoff.
    Retry,
    /// A user asked again (`force=true`) for a build that had ended without success.
    Forced,
}

/// The build is claimable again from `not_before` on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requeued {
    /// The attempt that ended (0 when a build that never ran is forced).
    pub attempt: u32,
    pub reason: RequeueReason,
    pub not_before: DateTime<Utc>,
}

/// The build was cancelled and will not run again unless forced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cancelled {
    pub reason: String,
}

/// Retryable failures used up every attempt: terminal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GaveUp {
    pub attempt: u32,
    /// Failed attempts counted against the limit.
    pub failures: u32,
    pub message: String,
}

/// The published files of a succeeded build were deleted (retention); a new request
/// rebuilds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactDeleted {
    /// The attempt whose files were deleted (the published one).
    pub attempt: u32,
    pub reason: String,
}

/// Why a second, independent build of a succeeded build was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReproductionReason {
    /// The janitor's sample (`janitor.reproduce`: a fraction of builds, or all).
    Sample,
    /// An operator asked (`POST /api/admin/build/{key}/reproduce`).
    Admin,
    /// The worker reproducing it stopped (preemption, shutdown) and gave it back.
    Released,
    /// The worker reproducing it stopped answering; the janitor gave it to another.
    LeaseExpired,
}

/// A second build of a succeeded build's request was asked for, to be run by a worker other
/// than the one that built it, and compared byte for byte. `reproduction` is the claim the
/// request follows (0 before the first): a released or expired reproduction names its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReproductionRequested {
    pub reproduction: u32,
    pub reason: ReproductionReason,
}

/// A worker (never the one that built the artifact) took the reproduction. `reproduction`
/// counts these claims from 1; the result must name it (fencing, as for attempts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReproductionClaimed {
    pub reproduction: u32,
    pub worker: String,
    pub lease_expires_at: DateTime<Utc>,
}

/// How a reproduction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReproductionOutcome {
    /// The second build has the artifact's SHA-256.
    Matched,
    /// It has other bytes: the builders differ, or the build is not reproducible.
    Mismatched,
    /// No binary to compare (the build failed on this worker, or it gave up retrying).
    Failed,
}

/// The result of a reproduction: the other worker's build, its builder and its SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reproduced {
    pub reproduction: u32,
    pub worker: String,
    pub outcome: ReproductionOutcome,
    /// SHA-256 of the second build's binary; absent when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The second builder's image reference and id (`sha256:...`); absent when the janitor
    /// writes the result of a worker that vanished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_image_id: Option<String>,
    /// What differs (build settings, Go version, sizes) or why it failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Files the second builder stored under the artifact's location: its own signed
    /// provenance statement for the same binary when the bytes matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

/// The worker running an attempt is alive: its lease now lasts until `lease_expires_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRenewed {
    pub attempt: u32,
    pub lease_expires_at: DateTime<Utc>,
}

/// The name of an event's type, as stored in the log's `event_type` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Requested,
    Claimed,
    LeaseRenewed,
    StepStarted,
    StepFinished,
    Output,
    Succeeded,
    Failed,
    Requeued,
    Cancelled,
    GaveUp,
    ArtifactDeleted,
    ReproductionRequested,
    ReproductionClaimed,
    Reproduced,
    OutputPruned,
}

impl EventType {
    pub const ALL: [EventType; 16] = [
        EventType::Requested,
        EventType::Claimed,
        EventType::LeaseRenewed,
        EventType::StepStarted,
        EventType::StepFinished,
        EventType::Output,
        EventType::Succeeded,
        EventType::Failed,
        EventType::Requeued,
        EventType::Cancelled,
        EventType::GaveUp,
        EventType::ArtifactDeleted,
        EventType::ReproductionRequested,
        EventType::ReproductionClaimed,
        EventType::Reproduced,
        EventType::OutputPruned,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Requested => "requested",
            EventType::Claimed => "claimed",
            EventType::LeaseRenewed => "lease_renewed",
            EventType::StepStarted => "step_started",
            EventType::StepFinished => "step_finished",
            EventType::Output => "output",
            EventType::Succeeded => "succeeded",
            EventType::Failed => "failed",
            EventType::Requeued => "requeued",
            EventType::Cancelled => "cancelled",
            EventType::GaveUp => "gave_up",
            EventType::ArtifactDeleted => "artifact_deleted",
            EventType::ReproductionRequested => "reproduction_requested",
            EventType::ReproductionClaimed => "reproduction_claimed",
            EventType::Reproduced => "reproduced",
            EventType::OutputPruned => "output_pruned",
        }
    }

    /// Does an event of this type make a build claimable? Idle workers are woken for these.
    pub fn makes_claimable(self) -> bool {
        matches!(
            self,
            EventType::Requested | EventType::Requeued | EventType::ReproductionRequested
        )
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown event type name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown event type {0:?}; known types: requested, claimed, lease_renewed, step_started, step_finished, output, succeeded, failed, requeued, cancelled, gave_up, artifact_deleted, reproduction_requested, reproduction_claimed, reproduced, output_pruned")]
pub struct UnknownEventType(pub String);

impl FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownEventType(s.to_owned()))
    }
}

/// A stored event that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    UnknownType(#[from] UnknownEventType),
    #[error("event type {event_type} has schema version {version}, this build reads only version {SCHEMA_VERSION}")]
    UnknownVersion { event_type: EventType, version: i16 },
    #[error("payload of {event_type} event: {source}")]
    Payload {
        event_type: EventType,
        source: serde_json::Error,
    },
}

impl Event {
    pub fn event_type(&self) -> EventType {
        match self {
            Event::Requested(_) => EventType::Requested,
            Event::Claimed(_) => EventType::Claimed,
            Event::LeaseRenewed(_) => EventType::LeaseRenewed,
            Event::StepStarted(_) => EventType::StepStarted,
            Event::StepFinished(_) => EventType::StepFinished,
            Event::Output(_) => EventType::Output,
            Event::Succeeded(_) => EventType::Succeeded,
            Event::Failed(_) => EventType::Failed,
            Event::Requeued(_) => EventType::Requeued,
            Event::Cancelled(_) => EventType::Cancelled,
            Event::GaveUp(_) => EventType::GaveUp,
            Event::ArtifactDeleted(_) => EventType::ArtifactDeleted,
            Event::ReproductionRequested(_) => EventType::ReproductionRequested,
            Event::ReproductionClaimed(_) => EventType::ReproductionClaimed,
            Event::Reproduced(_) => EventType::Reproduced,
            Event::OutputPruned(_) => EventType::OutputPruned,
        }
    }

    /// The attempt an event belongs to, for events written by (or about) one attempt.
    pub fn attempt(&self) -> Option<u32> {
        match self {
            Event::Claimed(e) => Some(e.attempt),
            Event::LeaseRenewed(e) => Some(e.attempt),
            Event::StepStarted(e) => Some(e.attempt),
            Event::StepFinished(e) => Some(e.attempt),
            Event::Output(e) => Some(e.attempt),
            Event::Succeeded(e) => Some(e.attempt),
            Event::Failed(e) => Some(e.attempt),
            Event::Requeued(e) => Some(e.attempt),
            Event::GaveUp(e) => Some(e.attempt),
            Event::ArtifactDeleted(e) => Some(e.attempt),
            Event::Requested(_)
            | Event::Cancelled(_)
            | Event::ReproductionRequested(_)
            | Event::ReproductionClaimed(_)
            | Event::Reproduced(_)
            | Event::OutputPruned(_) => None,
        }
    }

    /// The payload as stored: the variant's fields as a JSON object.
    pub fn encode(&self) -> serde_json::Value {
        let v = match self {
            Event::Requested(e) => serde_json::to_value(e),
            Event::Claimed(e) => serde_json::to_value(e),
            Event::LeaseRenewed(e) => serde_json::to_value(e),
            Event::StepStarted(e) => serde_json::to_value(e),
            Event::StepFinished(e) => serde_json::to_value(e),
            Event::Output(e) => serde_json::to_value(e),
            Event::Succeeded(e) => serde_json::to_value(e),
            Event::Failed(e) => serde_json::to_value(e),
            Event::Requeued(e) => serde_json::to_value(e),
            Event::Cancelled(e) => serde_json::to_value(e),
            Event::GaveUp(e) => serde_json::to_value(e),
            Event::ArtifactDeleted(e) => serde_json::to_value(e),
            Event::ReproductionRequested(e) => serde_json::to_value(e),
            Event::ReproductionClaimed(e) => serde_json::to_value(e),
            Event::Reproduced(e) => serde_json::to_value(e),
            Event::OutputPruned(e) => serde_json::to_value(e),
        };
        // Serializing plain structs of strings, numbers and timestamps into a Value cannot fail.
        v.expect("event payloads serialize to JSON")
    }

    /// Reads a stored event back.
    pub fn decode(
        event_type: &str,
        version: i16,
        payload: serde_json::Value,
    ) -> Result<Event, DecodeError> {
        let event_type: EventType = event_type.parse()?;
        if version != SCHEMA_VERSION {
            return Err(DecodeError::UnknownVersion {
                event_type,
                version,
            });
        }
        let err = |source| DecodeError::Payload { event_type, source };
        Ok(match event_type {
            EventType::Requested => Event::Requested(serde_json::from_value(payload).map_err(err)?),
            EventType::Claimed => Event::Claimed(serde_json::from_value(payload).map_err(err)?),
            EventType::LeaseRenewed => {
                Event::LeaseRenewed(serde_json::from_value(payload).map_err(err)?)
            }
            EventType::StepStarted => {
                Event::StepStarted(serde_json::from_value(payload).map_err(err)?)
            }
            EventType::StepFinished => {
                Event::StepFinished(serde_json::from_value(payload).map_err(err)?)
            }
            EventType::Output => Event::Output(serde_json::from_value(payload).map_err(err)?),
            EventType::Succeeded => Event::Succeeded(serde_json::from_value(payload).map_err(err)?),
            EventType::Failed => Event::Failed(serde_json::from_value(payload).map_err(err)?),
            EventType::Requeued => Event::Requeued(serde_json::from_value(payload).map_err(err)?),
            EventType::Cancelled => Event::Cancelled(serde_json::from_value(payload).map_err(err)?),
            EventType::GaveUp => Event::GaveUp(serde_json::from_value(payload).map_err(err)?),
            EventType::ArtifactDeleted => {
                Event::ArtifactDeleted(serde_json::from_value(payload).map_err(err)?)
            }
            EventType::ReproductionRequested => {
                Event::ReproductionRequested(serde_json::from_value(payload).map_err(err)?)
            }
            EventType::ReproductionClaimed => {
                Event::ReproductionClaimed(serde_json::from_value(payload).map_err(err)?)
            }
            EventType::Reproduced => {
                Event::Reproduced(serde_json::from_value(payload).map_err(err)?)
            }
            EventType::OutputPruned => {
                Event::OutputPruned(serde_json::from_value(payload).map_err(err)?)
            }
        })
    }
}

/// An event as read from the log, with its place in it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Global position (bigint identity). Unique, but NOT commit order: page the global log
    /// by [`GlobalCursor`].
    pub position: i64,
    /// Id of the writing transaction (xid8).
    pub tx_id: u64,
    pub key: BuildKey,
    /// Per-build sequence number: 1, 2, 3, ... without gaps.
    pub seq: u32,
    pub recorded_at: DateTime<Utc>,
    pub event: Event,
}

impl RecordedEvent {
    pub fn cursor(&self) -> GlobalCursor {
        GlobalCursor {
            tx_id: self.tx_id,
            position: self.position,
        }
    }
}

/// A place in the global log: everything at or before `(tx_id, position)` has been read.
///
/// The log is paged by the writing transaction's id first, and only up to the oldest
/// transaction still running, so an event whose transaction commits late is never skipped.
/// Its text form is `<tx_id>-<position>`; `0-0` is the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GlobalCursor {
    pub tx_id: u64,
    pub position: i64,
}

/// A string that is not a cursor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a cursor looks like <transaction>-<position>, two non-negative integers such as 0-0; got {0:?}")]
pub struct BadCursor(pub String);

impl FromStr for GlobalCursor {
    type Err = BadCursor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadCursor(s.chars().take(80).collect());
        let (tx, pos) = s.split_once('-').ok_or_else(bad)?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(tx) || !digits(pos) {
            return Err(bad());
        }
        Ok(GlobalCursor {
            tx_id: tx.parse().map_err(|_| bad())?,
            position: pos.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for GlobalCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.tx_id, self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cbs_domain::Plugin;

    fn samples() -> Vec<Event> {
        let t = DateTime::parse_from_rfc3339("2026-11-28T10:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        vec![
            Event::Requested(Requested {
                request: BuildRequest::new(
                    cbs_domain::Platform::new("linux", "arm", Some("7")).unwrap(),
                    "v2.8.4".parse().unwrap(),
                    vec![Plugin {
                        module: "github.com/acme/plugin".parse().unwrap(),
                        version: "v1.0.0".parse().unwrap(),
                    }],
                    vec![],
                )
                .unwrap(),
                client: Some("addr:0123456789abcdef".into()),
                rank: 3,
            }),
            Event::Claimed(Claimed {
                worker: "w1".into(),
                attempt: 1,
                lease_expires_at: t,
            }),
            Event::StepStarted(StepStarted {
                attempt: 1,
                step: "compile".into(),
            }),
            Event::StepFinished(StepFinished {
                attempt: 1,
                step: "compile".into(),
                duration_ms: 1200,
                exit_code: Some(0),
            }),
            Event::Output(Output {
                attempt: 1,
                step: "compile".into(),
                lines: vec!["go: downloading x".into(), "".into()],
            }),
            Event::Succeeded(Succeeded {
                attempt: 1,
                artifact: Artifact {
                    location: "builds/ab/abcd/1".into(),
                    size: 42,
                    sha256: "00".repeat(32),
                    files: vec![],
                    modules_sha256: Some("22".repeat(32)),
                },
            }),
            Event::Failed(Failed {
                attempt: 1,
                kind: FailureKind::Retryable,
                step: Some("pin_versions".into()),
                message: "proxy timed out".into(),
            }),
            Event::Requeued(Requeued {
                attempt: 1,
                reason: RequeueReason::LeaseExpired,
                not_before: t,
            }),
            Event::Cancelled(Cancelled {
                reason: "by operator".into(),
            }),
            Event::GaveUp(GaveUp {
                attempt: 3,
                failures: 3,
                message: "proxy timed out".into(),
            }),
            Event::LeaseRenewed(LeaseRenewed {
                attempt: 1,
                lease_expires_at: t,
            }),
            Event::ArtifactDeleted(ArtifactDeleted {
                attempt: 1,
                reason: "not downloaded for 90days".into(),
            }),
            Event::ReproductionRequested(ReproductionRequested {
                reproduction: 0,
                reason: ReproductionReason::Sample,
            }),
            Event::ReproductionClaimed(ReproductionClaimed {
                reproduction: 1,
                worker: "w2".into(),
                lease_expires_at: t,
            }),
            Event::Reproduced(Reproduced {
                reproduction: 1,
                worker: "w2".into(),
                outcome: ReproductionOutcome::Mismatched,
                sha256: Some("11".repeat(32)),
                builder_image: Some("builder:2".into()),
                builder_image_id: Some("sha256:ab".into()),
                message: "GOAMD64: v1 here, v3 there".into(),
                files: vec![],
            }),
            Event::OutputPruned(OutputPruned {
                attempts: 2,
                chunks: 40,
                bytes: 123_456,
                reason: "output of succeeded builds is kept for 30days".into(),
            }),
        ]
    }

    #[test]
    fn every_event_round_trips_through_its_stored_form() {
        let all = samples();
        assert_eq!(all.len(), EventType::ALL.len(), "a sample for every type");
        for e in all {
            let t = e.event_type();
            let back = Event::decode(t.as_str(), SCHEMA_VERSION, e.encode()).unwrap();
            assert_eq!(back, e);
            assert_eq!(t.as_str().parse::<EventType>().unwrap(), t);
        }
    }

    #[test]
    fn decode_names_what_is_wrong() {
        let cases = [
            (
                "exploded",
                SCHEMA_VERSION,
                "{}",
                "unknown event type \"exploded\"",
            ),
            ("claimed", 7, "{}", "schema version 7"),
            (
                "claimed",
                SCHEMA_VERSION,
                "{\"worker\":1}",
                "payload of claimed event",
            ),
            (
                "cancelled",
                SCHEMA_VERSION,
                "{\"reason\":\"x\",\"extra\":1}",
                "unknown field `extra`",
            ),
        ];
        for (ty, v, payload, want) in cases {
            let err = Event::decode(ty, v, serde_json::from_str(payload).unwrap()).unwrap_err();
            let msg = format!("{err}: {:?}", std::error::Error::source(&err));
            assert!(msg.contains(want), "{ty}: {msg}");
        }
    }

    #[test]
    fn cursors_parse_and_print() {
        let c: GlobalCursor = "123-45".parse().unwrap();
        assert_eq!(
            c,
            GlobalCursor {
                tx_id: 123,
                position: 45
            }
        );
        assert_eq!(c.to_string(), "123-45");
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-2-3",
            "1--2",
            "99999999999999999999999-1",
            " 1-2",
        ] {
            assert!(bad.parse::<GlobalCursor>().is_err(), "{bad:?}");
        }
    }
}
