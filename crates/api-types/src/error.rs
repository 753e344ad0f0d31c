//! The error body of every failed request.

use serde::{Deserialize, Serialize};

/// Every error answer (4xx and 5xx, on every route, including the framework's own errors and
/// unknown paths), in the shape caddyserver.com's clients decode:
/// `{"error":{"id":"<request id>","message":"..."},"status_code":400}`.
///
/// Keys are in that (alphabetical) order, as the api writes them today.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// The HTTP status code, repeated.
    pub status_code: u16,
}

/// The `error` object of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// The request id (also in the `x-request-id` header). Left out only when the body is
    /// made where the id is unknown; every answer that leaves the server has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// What was wrong, for people (Caddy's CLI prints it).
    pub message: String,
}

impl ErrorBody {
    pub fn new(status_code: u16, message: impl Into<String>, id: Option<String>) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                id,
                message: message.into(),
            },
            status_code,
        }
    }
}
