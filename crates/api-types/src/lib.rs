//! The JSON bodies of the HTTP API, as plain serde types: what the api sends and accepts,
//! and what a client decodes. Only serde, serde_json and chrono: no server crates.
//!
//! Every type reproduces the JSON the api writes byte for byte:
//!
//! - **Key order.** The api builds its bodies as `serde_json::Value`s, whose objects (without
//!   serde_json's `preserve_order` feature, which this workspace does not enable) sort their
//!   keys. So every struct here declares its fields in alphabetical order, and serializing it
//!   gives the same bytes as today (`{"error":{...},"status_code":400}`, not the other way
//!   round). The snapshot tests check this for every type.
//! - **Absent vs null.** A field the api leaves out when it has no value is an `Option` with
//!   `skip_serializing_if`; a field the api writes as `null` is a plain `Option`. Each
//!   field's doc says which.
//! - **Timestamps** are `DateTime<Utc>` as chrono's serde writes them (RFC 3339, `Z`,
//!   fractional seconds only when there are some).
//!
//! Successful answers are wrapped in [`Envelope`] (`{"result": ...}`); errors are
//! [`ErrorBody`]. Server-Sent Events (`GET /api/build/{key}/events`) carry the data types of
//! [`stream`].
//!
//! With the `openapi` feature every type also has a JSON Schema (utoipa's `ToSchema`), from
//! which the server builds its OpenAPI document; clients need not turn it on.

pub mod admin;
pub mod build;
pub mod envelope;
pub mod error;
pub mod events;
#[cfg(feature = "openapi")]
mod openapi;
pub mod packages;
pub mod request;
pub mod stream;

pub use admin::{QueueEntry, QueueList, Worker, WorkerBuild, WorkerList};
pub use build::{
    ArtifactInfo, Build, BuildStatus, FailureKind, LastError, Links, ReproductionInfo,
    ReproductionStatus, Resolution,
};
pub use envelope::Envelope;
pub use error::{ErrorBody, ErrorDetail};
pub use events::{
    EventData, EventType, FeedEvent, FeedPage, HistoryEvent, HistoryPage, OutputChunk, OutputPage,
    ReproductionOutcome, ReproductionReason, RequeueReason, UnknownEventType,
};
pub use packages::{Package, PackageModule, PlatformOption, ServerOptions};
pub use request::{
    ArmValue, BuildRequest, BuildSubmission, Plugin, PluginSubmission, Replacement,
    ReplacementSubmission,
};
pub use stream::{LogData, ResultData, StateData, StepData, StreamEvent};

/// `POST /api/build`, `GET /api/build/{key}`, `POST /api/build/{key}/cancel`, and the `202`
/// answers of `GET /api/build/{key}/download` and `/api/download/{key}`: a build's status.
pub type BuildResponse = Envelope<Build>;
/// `GET /api/build/{key}/history`.
pub type HistoryResponse = Envelope<HistoryPage>;
/// `GET /api/build/{key}/output`.
pub type OutputResponse = Envelope<OutputPage>;
/// `GET /api/events`.
pub type FeedResponse = Envelope<FeedPage>;
/// `GET /api/packages`.
pub type PackagesResponse = Envelope<Vec<Package>>;
pub type ResolutionResponse = Envelope<Resolution>;
pub type OptionsResponse = Envelope<ServerOptions>;
pub type BuildsResponse = Envelope<Vec<Build>>;
/// `GET /api/admin/queue`.
pub type QueueResponse = Envelope<QueueList>;
/// `GET /api/admin/workers`.
pub type WorkersResponse = Envelope<WorkerList>;
