//! The event log as the api shows it: a build's history (`GET /api/build/{key}/history`) and
//! the global audit feed (`GET /api/events`).
//!
//! An event is `{"data": {...}, "seq": N, "time": "...", "type": "<event type>"}` (the feed
//! adds `cursor` and `key`); `data` is the event's payload as stored in the log, whose shape
//! depends on `type`: see [`EventData`].

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::de::Error as _;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::build::FailureKind;
use crate::request::BuildRequest;

/// The `type` of an event (the names of the log's `event_type` column); also the values of
/// the feed's `type=a,b` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
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
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an [`EventType`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownEventType(pub String);

impl fmt::Display for UnknownEventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown event type {:?}", self.0)
    }
}

impl std::error::Error for UnknownEventType {}

impl FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownEventType(s.to_owned()))
    }
}

/// The `data` of an event ([`HistoryEvent`], [`FeedEvent`]), one variant per [`EventType`]:
/// serialized as the payload alone (the type is the event's `type` key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventData {
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

impl EventData {
    pub fn event_type(&self) -> EventType {
        match self {
            EventData::Requested(_) => EventType::Requested,
            EventData::Claimed(_) => EventType::Claimed,
            EventData::LeaseRenewed(_) => EventType::LeaseRenewed,
            EventData::StepStarted(_) => EventType::StepStarted,
            EventData::StepFinished(_) => EventType::StepFinished,
            EventData::Output(_) => EventType::Output,
            EventData::Succeeded(_) => EventType::Succeeded,
            EventData::Failed(_) => EventType::Failed,
            EventData::Requeued(_) => EventType::Requeued,
            EventData::Cancelled(_) => EventType::Cancelled,
            EventData::GaveUp(_) => EventType::GaveUp,
            EventData::ArtifactDeleted(_) => EventType::ArtifactDeleted,
            EventData::ReproductionRequested(_) => EventType::ReproductionRequested,
            EventData::ReproductionClaimed(_) => EventType::ReproductionClaimed,
            EventData::Reproduced(_) => EventType::Reproduced,
            EventData::OutputPruned(_) => EventType::OutputPruned,
        }
    }

    /// Reads the `data` of an event of type `event_type`.
    pub fn from_parts(
        event_type: EventType,
        data: serde_json::Value,
    ) -> Result<EventData, serde_json::Error> {
        use serde_json::from_value as v;
        Ok(match event_type {
            EventType::Requested => EventData::Requested(v(data)?),
            EventType::Claimed => EventData::Claimed(v(data)?),
            EventType::LeaseRenewed => EventData::LeaseRenewed(v(data)?),
            EventType::StepStarted => EventData::StepStarted(v(data)?),
            EventType::StepFinished => EventData::StepFinished(v(data)?),
            EventType::Output => EventData::Output(v(data)?),
            EventType::Succeeded => EventData::Succeeded(v(data)?),
            EventType::Failed => EventData::Failed(v(data)?),
            EventType::Requeued => EventData::Requeued(v(data)?),
            EventType::Cancelled => EventData::Cancelled(v(data)?),
            EventType::GaveUp => EventData::GaveUp(v(data)?),
            EventType::ArtifactDeleted => EventData::ArtifactDeleted(v(data)?),
            EventType::ReproductionRequested => EventData::ReproductionRequested(v(data)?),
            EventType::ReproductionClaimed => EventData::ReproductionClaimed(v(data)?),
            EventType::Reproduced => EventData::Reproduced(v(data)?),
            EventType::OutputPruned => EventData::OutputPruned(v(data)?),
        })
    }
}

impl Serialize for EventData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EventData::Requested(e) => e.serialize(s),
            EventData::Claimed(e) => e.serialize(s),
            EventData::LeaseRenewed(e) => e.serialize(s),
            EventData::StepStarted(e) => e.serialize(s),
            EventData::StepFinished(e) => e.serialize(s),
            EventData::Output(e) => e.serialize(s),
            EventData::Succeeded(e) => e.serialize(s),
            EventData::Failed(e) => e.serialize(s),
            EventData::Requeued(e) => e.serialize(s),
            EventData::Cancelled(e) => e.serialize(s),
            EventData::GaveUp(e) => e.serialize(s),
            EventData::ArtifactDeleted(e) => e.serialize(s),
            EventData::ReproductionRequested(e) => e.serialize(s),
            EventData::ReproductionClaimed(e) => e.serialize(s),
            EventData::Reproduced(e) => e.serialize(s),
            EventData::OutputPruned(e) => e.serialize(s),
        }
    }
}

/// `requested`: the build was requested for the first time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Requested {
    /// Who asked: `token:<name>`, or `addr:<16 hex>` (a keyed hash of the address). Left out
    /// when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// Its place in the fair queue; left out when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rank: i64,
    pub request: BuildRequest,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// `claimed`: a worker took the build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Claimed {
    pub attempt: u32,
    pub lease_expires_at: DateTime<Utc>,
    pub worker: String,
}

/// `lease_renewed`: the worker running an attempt is alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseRenewed {
    pub attempt: u32,
    pub lease_expires_at: DateTime<Utc>,
}

/// `step_started`: a build step began.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepStarted {
    pub attempt: u32,
    pub step: String,
}

/// `step_finished`: a build step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepFinished {
    pub attempt: u32,
    pub duration_ms: u64,
    /// `null` (not left out) when the step never exited on its own.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub exit_code: Option<i64>,
    pub step: String,
}

/// `output_pruned`: retention removed the output of attempts up to `attempts` (output now
/// lives outside the log: `GET /api/build/{key}/output`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutputPruned {
    pub attempts: u32,
    /// Bytes of output removed.
    pub bytes: u64,
    /// Chunks of output removed.
    pub chunks: u64,
    pub reason: String,
}

/// `output`: lines a step printed, as builds before the output table recorded them (no
/// longer written; see `GET /api/build/{key}/output`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Output {
    pub attempt: u32,
    pub lines: Vec<String>,
    pub step: String,
}

/// `succeeded`: the build is done and its files are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Succeeded {
    pub artifact: StoredArtifact,
    pub attempt: u32,
}

/// The `artifact` of a [`Succeeded`] event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StoredArtifact {
    /// Every file stored under `location`, the binary first; left out when empty (events
    /// written before artifacts were signed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// Storage location (a key prefix in the server's artifact storage).
    pub location: String,
    /// The binary's module-list hash (as its signature's trusted comment states it); left
    /// out in events written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_sha256: Option<String>,
    /// Lower-case hex SHA-256 of the binary.
    pub sha256: String,
    pub size: u64,
}

/// `failed`: an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Failed {
    pub attempt: u32,
    pub kind: FailureKind,
    pub message: String,
    /// The step that failed; left out when no step did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

/// Why a build went back to the queue: in [`Requeued`] and the SSE `state` of a requeued
/// build ([`crate::StateData::Requeued`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RequeueReason {
    LeaseExpired,
    Preempted,
    Retry,
    Forced,
}

impl RequeueReason {
    pub const ALL: [RequeueReason; 4] = [
        RequeueReason::LeaseExpired,
        RequeueReason::Preempted,
        RequeueReason::Retry,
        RequeueReason::Forced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequeueReason::LeaseExpired => "lease_expired",
            RequeueReason::Preempted => "preempted",
            RequeueReason::Retry => "retry",
            RequeueReason::Forced => "forced",
        }
    }
}

/// `requeued`: the build is claimable again from `not_before` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Requeued {
    /// The attempt that ended (0 when a build that never ran is forced).
    pub attempt: u32,
    pub not_before: DateTime<Utc>,
    pub reason: RequeueReason,
}

/// `cancelled`: the build was cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Cancelled {
    pub reason: String,
}

/// `gave_up`: retryable failures used up every attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GaveUp {
    pub attempt: u32,
    pub failures: u32,
    pub message: String,
}

/// `artifact_deleted`: the files of a succeeded build were deleted (retention).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArtifactDeleted {
    pub attempt: u32,
    pub reason: String,
}

/// Why a reproduction was asked for: in [`ReproductionRequested`] and
/// [`crate::build::ReproductionInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReproductionReason {
    /// The janitor's sample (`janitor.reproduce`).
    Sample,
    /// An admin asked (`POST /api/build/{key}/reproduce`).
    Admin,
    /// The worker reproducing it stopped and gave it back.
    Released,
    /// The worker reproducing it stopped answering.
    LeaseExpired,
}

/// `reproduction_requested`: a second, independent build of the succeeded build was asked
/// for, by a worker other than the one that built it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReproductionRequested {
    pub reason: ReproductionReason,
    /// The claim this request follows (0 before the first).
    pub reproduction: u32,
}

/// `reproduction_claimed`: a worker took the reproduction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReproductionClaimed {
    pub lease_expires_at: DateTime<Utc>,
    /// Claims of a reproduction so far, this one included.
    pub reproduction: u32,
    pub worker: String,
}

/// How a reproduction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReproductionOutcome {
    /// The second build has the artifact's SHA-256.
    Matched,
    /// Other bytes: the builders differ, or the build is not reproducible.
    Mismatched,
    /// No binary to compare.
    Failed,
}

/// `reproduced`: the second build ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Reproduced {
    /// The second builder's image reference; left out when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_image: Option<String>,
    /// Its image id (`sha256:...`); left out when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_image_id: Option<String>,
    /// Files the second builder stored beside the artifact (its signed provenance); left
    /// out when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// What differs, or why it failed; left out when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub outcome: ReproductionOutcome,
    pub reproduction: u32,
    /// SHA-256 of the second build's binary; left out when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub worker: String,
}

/// One event of a build's history (`GET /api/build/{key}/history`):
/// `{"data", "seq", "time", "type"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEvent {
    /// `data` and `type`.
    pub data: EventData,
    /// The build's event sequence number: 1, 2, 3, ... without gaps.
    pub seq: u32,
    /// When the event was recorded.
    pub time: DateTime<Utc>,
}

/// One event of the global feed (`GET /api/events`): a [`HistoryEvent`] with its build's
/// `key` and its `cursor` in the feed: `{"cursor", "data", "key", "seq", "time", "type"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedEvent {
    /// `<transaction>-<position>`: the feed's `after` that continues after this event.
    pub cursor: String,
    /// `data` and `type`.
    pub data: EventData,
    /// The build key.
    pub key: String,
    pub seq: u32,
    pub time: DateTime<Utc>,
}

impl Serialize for HistoryEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Alphabetical, as the api writes it; `type` comes from the data.
        let mut st = s.serialize_struct("HistoryEvent", 4)?;
        st.serialize_field("data", &self.data)?;
        st.serialize_field("seq", &self.seq)?;
        st.serialize_field("time", &self.time)?;
        st.serialize_field("type", &self.data.event_type())?;
        st.end()
    }
}

impl Serialize for FeedEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("FeedEvent", 6)?;
        st.serialize_field("cursor", &self.cursor)?;
        st.serialize_field("data", &self.data)?;
        st.serialize_field("key", &self.key)?;
        st.serialize_field("seq", &self.seq)?;
        st.serialize_field("time", &self.time)?;
        st.serialize_field("type", &self.data.event_type())?;
        st.end()
    }
}

/// Either event as read: `data` is read once its `type` is known.
#[derive(Deserialize)]
struct RawEvent {
    #[serde(default)]
    cursor: Option<String>,
    data: serde_json::Value,
    #[serde(default)]
    key: Option<String>,
    seq: u32,
    time: DateTime<Utc>,
    #[serde(rename = "type")]
    event_type: EventType,
}

impl RawEvent {
    fn data<E: serde::de::Error>(&self) -> Result<EventData, E> {
        EventData::from_parts(self.event_type, self.data.clone())
            .map_err(|e| E::custom(format_args!("data of a {} event: {e}", self.event_type)))
    }
}

impl<'de> Deserialize<'de> for HistoryEvent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawEvent::deserialize(d)?;
        Ok(HistoryEvent {
            data: raw.data()?,
            seq: raw.seq,
            time: raw.time,
        })
    }
}

impl<'de> Deserialize<'de> for FeedEvent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawEvent::deserialize(d)?;
        let data = raw.data()?;
        Ok(FeedEvent {
            cursor: raw
                .cursor
                .ok_or_else(|| D::Error::missing_field("cursor"))?,
            data,
            key: raw.key.ok_or_else(|| D::Error::missing_field("key"))?,
            seq: raw.seq,
            time: raw.time,
        })
    }
}

/// `result` of `GET /api/build/{key}/history[?after=<seq>&limit=<n>]`: a page of a build's
/// events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryPage {
    pub events: Vec<HistoryEvent>,
    /// The build key.
    pub key: String,
    /// The `after` of the next page; `null` (not left out) on the last page. A full page
    /// always has a `next`, so the page after it may be empty.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub next: Option<u32>,
}

/// One chunk of a build's output (`GET /api/build/{key}/output`): lines one step of one
/// attempt printed, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutputChunk {
    /// The build's last event (its `seq`) when the chunk was written: the chunk comes
    /// after that event in the build's progress.
    pub after_seq: u32,
    pub attempt: u32,
    pub lines: Vec<String>,
    /// 1, 2, 3, ... within the attempt.
    pub seq: u32,
    pub step: String,
    pub time: DateTime<Utc>,
    /// The marker of the per-attempt cap: output from here on was counted, not kept.
    pub truncated: bool,
}

/// `result` of `GET /api/build/{key}/output[?after=<attempt>.<seq>&limit=<n>]`: a page of a
/// build's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OutputPage {
    pub chunks: Vec<OutputChunk>,
    /// The build key.
    pub key: String,
    /// The `after` of the next page (`<attempt>.<seq>`); `null` (not left out) on the last
    /// page.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub next: Option<String>,
    /// Retention removed the output of attempts 1 to this one (0: none was removed; the
    /// build's history has the `output_pruned` event). Output that builds of older versions
    /// wrote into the history as `output` events is there, not here.
    pub pruned_attempts: u32,
}

/// `result` of `GET /api/events[?after=<cursor>&limit=N&type=a,b]`: a page of the global
/// audit feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FeedPage {
    pub events: Vec<FeedEvent>,
    /// The `after` of the next page, `<transaction>-<position>`; always present (the feed
    /// has no last page: poll it with the last `next`).
    pub next: String,
}
