//! Build-domain values shared by every layer: the build key and the normalized build request.
//!
//! Pure data, no IO. Values are parsed once at the edge and cannot hold invalid content
//! (parse, don't validate): Go module paths and versions ([`module`]), platforms
//! ([`platform`]), requests as asked for and as resolved ([`request`]).

pub mod artifact;
pub mod buildinfo;
pub mod failure;
pub mod goproxy;
mod key;
pub mod module;
pub mod plan;
pub mod platform;
mod request;

pub use key::{BuildKey, BuildKeyError};
pub use module::{ModuleError, ModulePath, ModuleVersion};
pub use platform::{Platform, PlatformError};
pub use request::{
    caddy_module, BuildRequest, BuildSpec, Plugin, PluginSpec, Replacement, ReplacementSpec,
    RequestError, VersionQuery, CADDY_MODULE, MAX_PLUGINS,
};
