//! The normalized build request, as recorded in the `requested` event.
//!
//! The foundation stores it as plain data. Validation into newtypes (Go module paths,
//! versions, platforms) and the canonical serialization behind the build key come with the
//! worker issue; nothing here renders files or command lines.

use serde::{Deserialize, Serialize};

/// What to build: platform, Caddy version and plugins, all versions absolute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    /// GOOS.
    pub os: String,
    /// GOARCH.
    pub arch: String,
    /// GOARM (5, 6 or 7), only with `arch: arm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm: Option<u8>,
    /// Absolute Caddy version (`v2.8.4`).
    pub caddy_version: String,
    /// Plugins, sorted by module path.
    #[serde(default)]
    pub plugins: Vec<Plugin>,
    /// `go mod edit -replace` directives, sorted by old module path.
    #[serde(default)]
    pub replacements: Vec<Replacement>,
}

/// One plugin module at an absolute version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    pub module: String,
    pub version: String,
}

/// A module replacement: `old` is served by `new` at `version`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replacement {
    pub old: String,
    pub new: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}
