//! The plugin catalog.

use serde::{Deserialize, Serialize};

/// One plugin module of the catalog: an element of `result` of `GET /api/packages`
/// (caddyserver.com's shape, with build counts). See [`crate::PackagesResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Package {
    /// `""` when the catalog has none.
    pub description: String,
    /// Builds that included this module (cached for a minute).
    pub downloads: i64,
    /// The Caddy modules it provides; `[]` when the catalog lists none.
    pub modules: Vec<PackageModule>,
    /// The Go module path.
    pub path: String,
    /// Its source repository; `""` when the catalog has none.
    pub repo: String,
}

/// A Caddy module of a [`Package`] (`GET /api/packages`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PackageModule {
    /// Link to its documentation; `""` when the catalog has none.
    pub docs: String,
    /// The module ID, like `dns.providers.cloudflare`.
    pub name: String,
}

/// `result` of `GET /api/options`: the choices a build request has on this server (what the
/// download page offers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServerOptions {
    /// Caddy versions the module proxy lists, newest first (pre-releases after releases);
    /// `[]` when the proxy could not be asked.
    pub caddy_versions: Vec<String>,
    /// Every target platform (GOOS and GOARCH; `arm` also takes GOARM 5, 6 or 7).
    pub platforms: Vec<PlatformOption>,
    /// Modules anyone may replace (`packages.replaceable`); admin tokens may replace any.
    pub replaceable: Vec<String>,
    /// Whether this caller may ask for replacements at all.
    pub replacements_allowed: bool,
}

/// A target platform of [`ServerOptions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlatformOption {
    pub arch: String,
    pub os: String,
}
