//! The wrapper of every successful JSON answer.

use serde::{Deserialize, Serialize};

/// `{"result": ...}`: every successful JSON answer of the api (caddyserver.com's shape), on
/// every route that answers JSON: `/api/build*`, `/api/events`, `/api/packages`,
/// `/api/admin/*`. Errors are [`crate::ErrorBody`] instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub result: T,
}

impl<T> Envelope<T> {
    pub fn new(result: T) -> Envelope<T> {
        Envelope { result }
    }
}
