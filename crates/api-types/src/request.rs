//! Build requests: as a client submits them ([`BuildSubmission`], the JSON body of
//! `POST /api/build`) and as the server resolved and recorded them ([`BuildRequest`], every
//! version absolute).

use serde::{Deserialize, Serialize};

/// The JSON body of `POST /api/build` (the api also takes the same request as query
/// parameters, `?os&arch&arm&version&p=module[@v]...&r=old=new[@v]...&force`, which this type
/// does not model). Unknown fields are refused, so that a typo does not silently build
/// something else.
///
/// Versions may be `latest` (or left out), an absolute version like `v1.2.3`, or a branch,
/// tag or commit the module proxy resolves. Optional fields are left out when serialized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BuildSubmission {
    /// `GOARCH`, like `amd64`.
    pub arch: String,
    /// `GOARM` for `arch: arm` (5, 6 or 7), as a number or a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm: Option<ArmValue>,
    /// Caddy's version; `latest` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caddy_version: Option<String>,
    /// Rebuild a build that failed, gave up or was cancelled (admin tokens only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub force: bool,
    /// `GOOS`, like `linux`.
    pub os: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<PluginSubmission>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replacements: Vec<ReplacementSubmission>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `GOARM` in a [`BuildSubmission`]: a number (`7`) or a string (`"7"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum ArmValue {
    Number(u64),
    Text(String),
}

/// A plugin of a [`BuildSubmission`] (`POST /api/build`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PluginSubmission {
    /// The Go module path.
    pub module: String,
    /// `latest` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// A replacement of a [`BuildSubmission`] (`POST /api/build`): module `old` is served by
/// `new` at `version`. Replacing needs an admin token unless the server's
/// `packages.replaceable` allows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ReplacementSubmission {
    pub new: String,
    pub old: String,
    /// `new`'s version, `latest` when left out. Also accepted as `new_version` (the
    /// prototype's name); always written as `version`.
    #[serde(
        default,
        alias = "new_version",
        skip_serializing_if = "Option::is_none"
    )]
    pub version: Option<String>,
}

/// A resolved build request, as recorded in the `requested` event and hashed into the build
/// key: the `request` of a [`crate::Build`] (every build-status route) and of the
/// `requested` event's data (`GET /api/build/{key}/history`, `GET /api/events`). Plugins are
/// sorted by module, replacements by old module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BuildRequest {
    pub arch: String,
    /// Left out unless `arch` is `arm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arm: Option<u8>,
    /// Absolute, like `v2.8.4`.
    pub caddy_version: String,
    pub os: String,
    /// Always written, `[]` when there are none.
    #[cfg_attr(feature = "openapi", schema(required))]
    #[serde(default)]
    pub plugins: Vec<Plugin>,
    /// Always written, `[]` when there are none.
    #[cfg_attr(feature = "openapi", schema(required))]
    #[serde(default)]
    pub replacements: Vec<Replacement>,
}

/// A plugin of a resolved [`BuildRequest`], at an absolute version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plugin {
    pub module: String,
    pub version: String,
}

/// A replacement of a resolved [`BuildRequest`]: `old` is served by `new` at `version`
/// (absolute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Replacement {
    pub new: String,
    pub old: String,
    pub version: String,
}
