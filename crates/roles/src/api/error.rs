//! The API's one error type and the JSON shape every client of caddyserver.com's API
//! decodes: `{"status_code": N, "error": {"message": "...", "id": "<request id>"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answer: a status and a message that says what was wrong.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same, with `Retry-After: secs`.
    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// A failure of ours (database, storage): logged here, once; the client gets a 503.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "{context}");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{context}: the service is unavailable, try again later"),
        )
    }
}

impl From<cbs_store::StoreError> for ApiError {
    fn from(e: cbs_store::StoreError) -> ApiError {
        ApiError::internal("database error", e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = error_response(self.status, &self.message, None);
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The error JSON (the request id is added by the middleware that knows it).
pub fn error_response(status: StatusCode, message: &str, id: Option<&str>) -> Response {
    let body = cbs_api_types::ErrorBody::new(status.as_u16(), message, id.map(str::to_owned));
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
