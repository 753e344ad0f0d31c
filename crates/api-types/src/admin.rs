//! The admin listings (`admin` scope): the queue and the workers.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::build::{ArtifactInfo, Build, BuildStatus, LastError, Links};
use crate::request::BuildRequest;

/// `result` of `GET /api/admin/queue[?limit=N]`: running builds, then queued ones in the
/// order workers take them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueList {
    pub builds: Vec<QueueEntry>,
}

/// A build of the queue (`GET /api/admin/queue`): the fields of [`Build`] plus
/// `available_at`, `lease_expires_at` and `owner`, all in one object in alphabetical order
/// (as the api writes it), hence not a flattened [`Build`]. See [`QueueEntry::new`] and
/// [`QueueEntry::build`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueEntry {
    /// As [`Build::artifact`]: left out when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactInfo>,
    pub attempt: u32,
    /// While queued: the earliest time a worker may claim it (retry backoff).
    pub available_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// As [`Build::error`]: left out when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<LastError>,
    pub failures: u32,
    pub key: String,
    pub last_seq: u32,
    /// When the running attempt's lease ends; `null` (not left out) when none.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub links: Links,
    /// The worker holding the lease; `null` (not left out) when none.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub owner: Option<String>,
    pub request: BuildRequest,
    pub status: BuildStatus,
    /// As [`Build::step`]: left out when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl QueueEntry {
    /// A build's status with the queue's fields.
    pub fn new(
        build: Build,
        available_at: DateTime<Utc>,
        lease_expires_at: Option<DateTime<Utc>>,
        owner: Option<String>,
    ) -> QueueEntry {
        let Build {
            artifact,
            attempt,
            created_at,
            error,
            failures,
            key,
            last_seq,
            links,
            queue_position: _,
            // Queued and running builds have none worth listing.
            reproduction: _,
            request,
            status,
            step,
            updated_at,
        } = build;
        QueueEntry {
            artifact,
            attempt,
            available_at,
            created_at,
            error,
            failures,
            key,
            last_seq,
            lease_expires_at,
            links,
            owner,
            request,
            status,
            step,
            updated_at,
        }
    }

    /// The build's status without the queue's fields.
    pub fn build(&self) -> Build {
        Build {
            artifact: self.artifact.clone(),
            attempt: self.attempt,
            created_at: self.created_at,
            error: self.error.clone(),
            failures: self.failures,
            key: self.key.clone(),
            last_seq: self.last_seq,
            links: self.links.clone(),
            queue_position: None,
            reproduction: None,
            request: self.request.clone(),
            status: self.status,
            step: self.step.clone(),
            updated_at: self.updated_at,
        }
    }
}

/// `result` of `GET /api/admin/workers`: the workers that hold running builds now, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerList {
    pub workers: Vec<Worker>,
}

/// A worker and its running builds (`GET /api/admin/workers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Worker {
    pub builds: Vec<WorkerBuild>,
    /// The worker's name (the lease owner).
    pub worker: String,
}

/// A running build of a [`Worker`] (`GET /api/admin/workers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerBuild {
    pub attempt: u32,
    pub key: String,
    /// `null` (not left out) when none.
    #[cfg_attr(feature = "openapi", schema(required))]
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The step it is in; `null` (not left out) when none, unlike [`Build::step`].
    #[cfg_attr(feature = "openapi", schema(required))]
    pub step: Option<String>,
    /// The build's last event, lease renewals included.
    pub updated_at: DateTime<Utc>,
}
