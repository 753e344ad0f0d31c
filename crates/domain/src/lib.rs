//! Build-domain values shared by every layer: the build key and the normalized build request.
//!
//! Pure data, no IO. Values are parsed once at the edge and cannot hold invalid content
//! (parse, don't validate). The Go module rules and version resolution join this crate with
//! the worker issue; the foundation only needs the key and the request shape.

mod key;
pub mod module;
mod request;

pub use key::{BuildKey, BuildKeyError};
pub use request::{BuildRequest, Plugin, Replacement};
