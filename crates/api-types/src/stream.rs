//! The `data` of the Server-Sent Events of `GET /api/build/{key}/events` (the names of
//! caddyserver.com's beta page): `state` ([`StateData`]) for every state change, `step`
//! ([`StepData`]), `log` ([`LogData`]) and `result` ([`ResultData`]), which ends the stream.
//!
//! Each message's `data` is one line of compact JSON. Ids (`<seq>`, or `<seq>.<i>` for the
//! i-th line of an output chunk and for a `result`) are SSE framing, not modelled here.

use chrono::{DateTime, Utc};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::build::BuildStatus;
use crate::events::RequeueReason;

/// One message of the stream: its event name and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    State(StateData),
    Step(StepData),
    Log(LogData),
    Result(ResultData),
}

impl StreamEvent {
    /// The SSE event name: `state`, `step`, `log` or `result`.
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::State(_) => "state",
            StreamEvent::Step(_) => "step",
            StreamEvent::Log(_) => "log",
            StreamEvent::Result(_) => "result",
        }
    }

    /// The SSE data: compact JSON, as the api writes it.
    pub fn data(&self) -> String {
        let data = match self {
            StreamEvent::State(d) => serde_json::to_string(d),
            StreamEvent::Step(d) => serde_json::to_string(d),
            StreamEvent::Log(d) => serde_json::to_string(d),
            StreamEvent::Result(d) => serde_json::to_string(d),
        };
        // Plain strings, numbers, booleans and timestamps: serializing cannot fail.
        data.expect("stream data serializes to JSON")
    }

    /// Reads a message from its event name and data.
    pub fn parse(name: &str, data: &str) -> Result<StreamEvent, serde_json::Error> {
        Ok(match name {
            "state" => StreamEvent::State(serde_json::from_str(data)?),
            "step" => StreamEvent::Step(serde_json::from_str(data)?),
            "log" => StreamEvent::Log(serde_json::from_str(data)?),
            "result" => StreamEvent::Result(serde_json::from_str(data)?),
            other => {
                return Err(serde_json::Error::custom(format_args!(
                    "unknown stream event {other:?}; known: state, step, log, result"
                )))
            }
        })
    }
}

/// `event: step`: a build step began. `{"step": "compile"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepData {
    pub step: String,
}

/// `event: log`: one line of output, or the summary of a finished step
/// (`step compile finished in 12.3s (exit status 0)`). `{"line": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogData {
    pub line: String,
}

/// `event: result`: how the build ended; the stream ends after it.
///
/// Success: `{"error":null,"sha256":"...","size":N,"success":true}`; failure (a permanent
/// failure, giving up, a cancellation): `{"error":"...","success":false}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResultData {
    /// What went wrong; `null` (not left out) on success.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub error: Option<String>,
    /// The binary's lower-case hex SHA-256; only on success (left out otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The binary's size in bytes; only on success (left out otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub success: bool,
}

impl ResultData {
    pub fn success(size: u64, sha256: impl Into<String>) -> ResultData {
        ResultData {
            error: None,
            sha256: Some(sha256.into()),
            size: Some(size),
            success: true,
        }
    }

    pub fn failure(error: impl Into<String>) -> ResultData {
        ResultData {
            error: Some(error.into()),
            sha256: None,
            size: None,
            success: false,
        }
    }
}

/// `event: state`: a state change, `{"status": ..., <extras>}`; which extras come with which
/// status is exactly what the variants hold (keys in alphabetical order, as the api writes
/// them):
///
/// | variant | JSON |
/// | --- | --- |
/// | `Queued` (requested) | `{"status":"queued"}` |
/// | `Requeued` | `{"not_before":"...","reason":"retry","status":"queued"}` |
/// | `Running` (claimed) | `{"attempt":1,"status":"running"}` |
/// | `Succeeded` | `{"status":"complete"}` |
/// | `Failed` | `{"error":"...","retryable":true,"status":"failed","step":"compile"}` (`step` may be `null`) |
/// | `Cancelled` | `{"reason":"...","status":"cancelled"}` |
/// | `GaveUp` | `{"failures":3,"status":"gave_up"}` |
/// | `Expired` (artifact deleted) | `{"reason":"...","status":"expired"}` |
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "RawState", try_from = "RawState")]
pub enum StateData {
    /// The build was requested.
    Queued,
    /// The build went back to the queue (status `queued`).
    Requeued {
        not_before: DateTime<Utc>,
        reason: RequeueReason,
    },
    /// A worker took it.
    Running { attempt: u32 },
    /// Status `complete`; a `result` follows.
    Succeeded,
    /// An attempt failed. A permanent failure (`retryable: false`) is followed by a
    /// `result`; a retryable one by a requeue or a give-up.
    Failed {
        error: String,
        retryable: bool,
        /// Written as `null` when no step failed.
        step: Option<String>,
    },
    /// A `result` follows.
    Cancelled { reason: String },
    /// A `result` follows.
    GaveUp { failures: u32 },
    /// The binary was deleted (retention).
    Expired { reason: String },
}

impl StateData {
    /// The `status` this state is written with.
    pub fn status(&self) -> BuildStatus {
        match self {
            StateData::Queued | StateData::Requeued { .. } => BuildStatus::Queued,
            StateData::Running { .. } => BuildStatus::Running,
            StateData::Succeeded => BuildStatus::Succeeded,
            StateData::Failed { .. } => BuildStatus::Failed,
            StateData::Cancelled { .. } => BuildStatus::Cancelled,
            StateData::GaveUp { .. } => BuildStatus::GaveUp,
            StateData::Expired { .. } => BuildStatus::Expired,
        }
    }
}

/// [`StateData`] on the wire: every extra, alphabetical, left out when unused (`step` of a
/// failure is written as `null` when none).
#[derive(Serialize, Deserialize)]
struct RawState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_before: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retryable: Option<bool>,
    status: BuildStatus,
    /// Outer `None`: absent; `Some(None)`: `null`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    step: Option<Option<String>>,
}

/// A field that is there, even as `null` (absent fields take the default, `None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl RawState {
    fn new(status: BuildStatus) -> RawState {
        RawState {
            attempt: None,
            error: None,
            failures: None,
            not_before: None,
            reason: None,
            retryable: None,
            status,
            step: None,
        }
    }
}

impl From<StateData> for RawState {
    fn from(s: StateData) -> RawState {
        let mut raw = RawState::new(s.status());
        match s {
            StateData::Queued | StateData::Succeeded => {}
            StateData::Requeued { not_before, reason } => {
                raw.not_before = Some(not_before);
                raw.reason = Some(reason.as_str().to_owned());
            }
            StateData::Running { attempt } => raw.attempt = Some(attempt),
            StateData::Failed {
                error,
                retryable,
                step,
            } => {
                raw.error = Some(error);
                raw.retryable = Some(retryable);
                raw.step = Some(step);
            }
            StateData::Cancelled { reason } | StateData::Expired { reason } => {
                raw.reason = Some(reason)
            }
            StateData::GaveUp { failures } => raw.failures = Some(failures),
        }
        raw
    }
}

impl TryFrom<RawState> for StateData {
    type Error = String;

    fn try_from(raw: RawState) -> Result<StateData, String> {
        let status = raw.status;
        let missing = |field: &str| format!("state {status} without {field}");
        Ok(match status {
            BuildStatus::Queued => match (raw.not_before, raw.reason) {
                (None, None) => StateData::Queued,
                (Some(not_before), Some(reason)) => StateData::Requeued {
                    not_before,
                    reason: RequeueReason::ALL
                        .into_iter()
                        .find(|r| r.as_str() == reason)
                        .ok_or_else(|| format!("unknown requeue reason {reason:?}"))?,
                },
                (None, Some(_)) => return Err(missing("not_before")),
                (Some(_), None) => return Err(missing("reason")),
            },
            BuildStatus::Running => StateData::Running {
                attempt: raw.attempt.ok_or_else(|| missing("attempt"))?,
            },
            BuildStatus::Succeeded => StateData::Succeeded,
            BuildStatus::Failed => StateData::Failed {
                error: raw.error.ok_or_else(|| missing("error"))?,
                retryable: raw.retryable.ok_or_else(|| missing("retryable"))?,
                step: raw.step.flatten(),
            },
            BuildStatus::Cancelled => StateData::Cancelled {
                reason: raw.reason.ok_or_else(|| missing("reason"))?,
            },
            BuildStatus::GaveUp => StateData::GaveUp {
                failures: raw.failures.ok_or_else(|| missing("failures"))?,
            },
            BuildStatus::Expired => StateData::Expired {
                reason: raw.reason.ok_or_else(|| missing("reason"))?,
            },
        })
    }
}
