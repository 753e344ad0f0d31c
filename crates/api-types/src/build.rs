//! A build's status: the answer of the build routes.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::request::BuildRequest;

/// A build's `status` as clients see it. The names are the server's status names, except
/// that a succeeded build reads `complete` (caddyserver.com's name).
///
/// Used in [`Build::status`] (every build-status route, the admin queue) and
/// [`crate::StateData`] (`GET /api/build/{key}/events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker is building it.
    Running,
    /// Done: the binary can be downloaded. Written `complete`, never `succeeded`.
    #[serde(rename = "complete")]
    Succeeded,
    /// The last attempt failed; [`LastError::kind`] says whether it will be retried.
    Failed,
    Cancelled,
    /// Retryable failures used up every attempt.
    GaveUp,
    /// Succeeded, but its files were deleted (retention); a new request rebuilds it.
    Expired,
}

impl BuildStatus {
    pub const ALL: [BuildStatus; 7] = [
        BuildStatus::Queued,
        BuildStatus::Running,
        BuildStatus::Succeeded,
        BuildStatus::Failed,
        BuildStatus::Cancelled,
        BuildStatus::GaveUp,
        BuildStatus::Expired,
    ];

    /// The name as written in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Running => "running",
            BuildStatus::Succeeded => "complete",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
            BuildStatus::GaveUp => "gave_up",
            BuildStatus::Expired => "expired",
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`BuildStatus`] as written in JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownStatus(pub String);

impl fmt::Display for UnknownStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown build status {:?}", self.0)
    }
}

impl std::error::Error for UnknownStatus {}

impl FromStr for BuildStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BuildStatus::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// Whether trying again can help: `retryable` (the server retries) or `permanent` (the
/// request's fault; the same request fails again). In [`LastError`] and the `failed` event's
/// data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    Retryable,
    Permanent,
}

/// A build's status: `result` of `POST /api/build`, `GET /api/build/{key}` (also its
/// long-poll `?wait=&after=`), `POST /api/build/{key}/cancel`, and of the `202 Accepted`
/// answers of `GET /api/build/{key}/download` and `GET /api/download/{key}` for a build that
/// is not done yet. Always wrapped: see [`crate::BuildResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Build {
    /// The binary of a succeeded build; left out otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactInfo>,
    /// Claims so far: the current (or last) attempt's number, 0 before the first.
    pub attempt: u32,
    pub created_at: DateTime<Utc>,
    /// The last failure; left out when there has been none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<LastError>,
    /// Failed attempts.
    pub failures: u32,
    /// The build key: 64 lower-case hex digits.
    pub key: String,
    /// Sequence number of the build's last event (the `after` of a long-poll).
    pub last_seq: u32,
    pub links: Links,
    /// While queued, how many queued builds a worker takes before this one (0: next);
    /// left out otherwise, and on answers other than `GET /api/build/{key}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// The latest reproducibility check of the artifact (a second build by another worker,
    /// compared byte for byte); left out when none was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reproduction: Option<ReproductionInfo>,
    pub request: BuildRequest,
    pub status: BuildStatus,
    /// The step the running attempt is in; left out when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// When the build's last event was recorded.
    pub updated_at: DateTime<Utc>,
}

/// Where a [`ReproductionInfo`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReproductionStatus {
    /// Waiting for a worker other than the one that built the artifact.
    Queued,
    Running,
    /// The second build has the same SHA-256.
    Matched,
    /// The second build has other bytes: the build is marked.
    Mismatched,
    /// No binary to compare.
    Failed,
}

/// The `reproduction` of a [`Build`]: its latest reproducibility check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReproductionInfo {
    /// The second builder's image reference and id; left out until it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_image_id: Option<String>,
    /// When it ended; left out until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// What differs, or why it failed; left out when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `/api/build/{key}/reproduction`: the second builder's signed provenance statement
    /// about the same binary; only when matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<String>,
    pub reason: crate::events::ReproductionReason,
    /// Claims so far (a worker that stops hands it to another).
    pub reproduction: u32,
    pub requested_at: DateTime<Utc>,
    /// The second build's SHA-256; left out until it ended, and when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub status: ReproductionStatus,
    /// The worker reproducing it, or that did; left out while queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// The `artifact` of a [`Build`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArtifactInfo {
    /// The worker that built it; left out when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_by: Option<String>,
    /// Lower-case hex SHA-256 of the binary.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
}

/// The `error` of a [`Build`]: its last failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LastError {
    /// The attempt that failed.
    pub attempt: u32,
    pub kind: FailureKind,
    pub message: String,
    /// The step that failed; `null` (not left out) when no step did.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub step: Option<String>,
}

/// The `links` of a [`Build`]: its routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Links {
    /// `/api/build/{key}/download`.
    pub download: String,
    /// `/api/build/{key}/events` (Server-Sent Events).
    pub events: String,
    /// `/api/build/{key}/history`.
    pub history: String,
    /// `/api/build/{key}`.
    #[serde(rename = "self")]
    pub self_: String,
}

impl Links {
    /// The links of the build with this key, as the api writes them.
    pub fn for_key(key: &str) -> Links {
        Links {
            download: format!("/api/build/{key}/download"),
            events: format!("/api/build/{key}/events"),
            history: format!("/api/build/{key}/history"),
            self_: format!("/api/build/{key}"),
        }
    }
}

/// `result` of `GET /api/resolve`: what a build request resolves to (every `latest` and
/// query made absolute), its build key, and the build of that key if there is one. Nothing
/// is recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Resolution {
    /// The build of this key; `null` when it was never requested.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub build: Option<Build>,
    /// The build key the request would have.
    pub key: String,
    pub request: BuildRequest,
}
