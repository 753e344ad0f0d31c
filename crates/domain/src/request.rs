//! Build requests: as asked for ([`BuildSpec`], versions may be `latest`) and as resolved
//! ([`BuildRequest`], every version absolute; recorded in the `requested` event and hashed
//! into the build key).

use std::collections::BTreeSet;
use std::fmt;
use std::fmt::Write as _;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::module::{ModuleError, ModulePath, ModuleVersion};
use crate::platform::{Platform, PlatformError};
use crate::BuildKey;

/// Caddy's module path.
pub const CADDY_MODULE: &str = "github.com/caddyserver/caddy/v2";
/// Most plugins (and, separately, replacements) in one request.
pub const MAX_PLUGINS: usize = 50;
/// Longest version query accepted (a branch, tag or commit prefix), in bytes.
pub const MAX_QUERY_LEN: usize = 100;

/// Caddy's module path as a value.
pub fn caddy_module() -> ModulePath {
    CADDY_MODULE.parse().expect("Caddy's path is valid")
}

/// A version as asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VersionQuery {
    /// `latest` or nothing: the newest release, resolved through the module proxy.
    Latest,
    /// An absolute version.
    Exact(ModuleVersion),
    /// Anything else the proxy resolves (a branch, a tag prefix, a commit): letters, digits,
    /// `.`, `_`, `-`, not starting with `-`.
    Query(String),
}

impl FromStr for VersionQuery {
    type Err = RequestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s == "latest" {
            return Ok(VersionQuery::Latest);
        }
        if let Ok(v) = s.parse::<ModuleVersion>() {
            return Ok(VersionQuery::Exact(v));
        }
        let ok = s.len() <= MAX_QUERY_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !s.starts_with(['-', '.']);
        if ok {
            Ok(VersionQuery::Query(s.to_owned()))
        } else {
            Err(RequestError::BadVersionQuery(s.chars().take(80).collect()))
        }
    }
}

impl fmt::Display for VersionQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VersionQuery::Latest => f.write_str("latest"),
            VersionQuery::Exact(v) => write!(f, "{v}"),
            VersionQuery::Query(q) => f.write_str(q),
        }
    }
}

/// A plugin as asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSpec {
    pub module: ModulePath,
    pub version: VersionQuery,
}

/// A replacement as asked for: `old` is served by `new` at `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplacementSpec {
    pub old: ModulePath,
    pub new: ModulePath,
    pub version: VersionQuery,
}

/// A validated request whose versions may still need resolving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    pub platform: Platform,
    pub caddy: VersionQuery,
    pub plugins: Vec<PluginSpec>,
    pub replacements: Vec<ReplacementSpec>,
}

/// Why a request is refused. Messages name the field and say what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("{field}: {source}")]
    Module { field: String, source: ModuleError },
    #[error("version {0:?} is not valid: use latest, an absolute version like v1.2.3, or a branch, tag or commit (letters, digits, . _ -)")]
    BadVersionQuery(String),
    #[error("too many {what}: {count}, at most {MAX_PLUGINS}")]
    TooMany { what: &'static str, count: usize },
    #[error("plugin {0} is listed twice")]
    DuplicatePlugin(String),
    #[error("module {0} is replaced twice")]
    DuplicateReplacement(String),
    #[error("{CADDY_MODULE} is Caddy itself: choose its version with the Caddy version, not as a plugin")]
    CaddyAsPlugin,
}

fn field_err(field: impl Into<String>) -> impl FnOnce(ModuleError) -> RequestError {
    let field = field.into();
    move |source| RequestError::Module { field, source }
}

impl BuildSpec {
    /// Checks a request as it arrives (from JSON or query parameters).
    pub fn parse(
        os: &str,
        arch: &str,
        arm: Option<&str>,
        caddy_version: Option<&str>,
        plugins: &[(&str, Option<&str>)],
        replacements: &[(&str, &str, Option<&str>)],
    ) -> Result<BuildSpec, RequestError> {
        let platform = Platform::new(os, arch, arm)?;
        let caddy: VersionQuery = caddy_version.unwrap_or("").parse()?;
        if plugins.len() > MAX_PLUGINS {
            return Err(RequestError::TooMany {
                what: "plugins",
                count: plugins.len(),
            });
        }
        if replacements.len() > MAX_PLUGINS {
            return Err(RequestError::TooMany {
                what: "replacements",
                count: replacements.len(),
            });
        }
        let mut seen = BTreeSet::new();
        let mut plugin_specs = Vec::with_capacity(plugins.len());
        for (i, (module, version)) in plugins.iter().enumerate() {
            let module: ModulePath = module
                .parse()
                .map_err(field_err(format!("plugins[{i}].module")))?;
            if module.as_str() == CADDY_MODULE {
                return Err(RequestError::CaddyAsPlugin);
            }
            if !seen.insert(module.clone()) {
                return Err(RequestError::DuplicatePlugin(module.to_string()));
            }
            let version: VersionQuery = version.unwrap_or("").parse()?;
            if let VersionQuery::Exact(v) = &version {
                v.check_fits(&module)
                    .map_err(field_err(format!("plugins[{i}].version")))?;
            }
            plugin_specs.push(PluginSpec { module, version });
        }
        let mut replaced = BTreeSet::new();
        let mut replacement_specs = Vec::with_capacity(replacements.len());
        for (i, (old, new, version)) in replacements.iter().enumerate() {
            let old: ModulePath = old
                .parse()
                .map_err(field_err(format!("replacements[{i}].old")))?;
            let new: ModulePath = new
                .parse()
                .map_err(field_err(format!("replacements[{i}].new")))?;
            if !replaced.insert(old.clone()) {
                return Err(RequestError::DuplicateReplacement(old.to_string()));
            }
            let version: VersionQuery = version.unwrap_or("").parse()?;
            if let VersionQuery::Exact(v) = &version {
                v.check_fits(&new)
                    .map_err(field_err(format!("replacements[{i}].version")))?;
            }
            replacement_specs.push(ReplacementSpec { old, new, version });
        }
        Ok(BuildSpec {
            platform,
            caddy,
            plugins: plugin_specs,
            replacements: replacement_specs,
        })
    }
}

/// One plugin module at an absolute version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    pub module: ModulePath,
    pub version: ModuleVersion,
}

/// A module replacement at an absolute version: `old` is served by `new`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replacement {
    pub old: ModulePath,
    pub new: ModulePath,
    pub version: ModuleVersion,
}

/// What to build, every version absolute; plugins sorted by module, replacements by old
/// module. Recorded in the `requested` event; its [`BuildRequest::key`] names the build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRequest", into = "RawRequest")]
pub struct BuildRequest {
    platform: Platform,
    caddy_version: ModuleVersion,
    plugins: Vec<Plugin>,
    replacements: Vec<Replacement>,
}

/// The stored JSON shape: `{os, arch, arm?, caddy_version, plugins, replacements}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    os: String,
    arch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    arm: Option<u8>,
    caddy_version: ModuleVersion,
    #[serde(default)]
    plugins: Vec<Plugin>,
    #[serde(default)]
    replacements: Vec<Replacement>,
}

impl BuildRequest {
    /// A resolved request; checks the same rules as [`BuildSpec::parse`] and sorts.
    pub fn new(
        platform: Platform,
        caddy_version: ModuleVersion,
        mut plugins: Vec<Plugin>,
        mut replacements: Vec<Replacement>,
    ) -> Result<BuildRequest, RequestError> {
        caddy_version
            .check_fits(&caddy_module())
            .map_err(field_err("caddy_version"))?;
        for (what, count) in [
            ("plugins", plugins.len()),
            ("replacements", replacements.len()),
        ] {
            if count > MAX_PLUGINS {
                return Err(RequestError::TooMany { what, count });
            }
        }
        plugins.sort();
        replacements.sort();
        for w in plugins.windows(2) {
            if w[0].module == w[1].module {
                return Err(RequestError::DuplicatePlugin(w[0].module.to_string()));
            }
        }
        for w in replacements.windows(2) {
            if w[0].old == w[1].old {
                return Err(RequestError::DuplicateReplacement(w[0].old.to_string()));
            }
        }
        for (i, p) in plugins.iter().enumerate() {
            if p.module.as_str() == CADDY_MODULE {
                return Err(RequestError::CaddyAsPlugin);
            }
            p.version
                .check_fits(&p.module)
                .map_err(field_err(format!("plugins[{i}].version")))?;
        }
        for (i, r) in replacements.iter().enumerate() {
            r.version
                .check_fits(&r.new)
                .map_err(field_err(format!("replacements[{i}].version")))?;
        }
        Ok(BuildRequest {
            platform,
            caddy_version,
            plugins,
            replacements,
        })
    }

    pub fn platform(&self) -> &Platform {
        &self.platform
    }

    pub fn caddy_version(&self) -> &ModuleVersion {
        &self.caddy_version
    }

    pub fn plugins(&self) -> &[Plugin] {
        &self.plugins
    }

    pub fn replacements(&self) -> &[Replacement] {
        &self.replacements
    }

    /// The canonical text the key hashes: one line per fact, fixed order, values that cannot
    /// contain spaces or newlines (validated), and a format tag so the format can change.
    pub fn canonical(&self) -> String {
        let mut s = String::from("caddy-build-request v1\n");
        let p = &self.platform;
        let _ = writeln!(s, "os {}", p.os());
        let _ = writeln!(s, "arch {}", p.arch());
        if let Some(arm) = p.arm() {
            let _ = writeln!(s, "arm {arm}");
        }
        let _ = writeln!(s, "caddy {}", self.caddy_version);
        for pl in &self.plugins {
            let _ = writeln!(s, "plugin {} {}", pl.module, pl.version);
        }
        for r in &self.replacements {
            let _ = writeln!(s, "replace {} {} {}", r.old, r.new, r.version);
        }
        s
    }

    /// The build key: SHA-256 of [`BuildRequest::canonical`].
    pub fn key(&self) -> BuildKey {
        BuildKey::digest(self.canonical().as_bytes())
    }
}

impl TryFrom<RawRequest> for BuildRequest {
    type Error = RequestError;
    fn try_from(r: RawRequest) -> Result<Self, Self::Error> {
        let arm = r.arm.map(|a| a.to_string());
        let platform = Platform::new(&r.os, &r.arch, arm.as_deref())?;
        BuildRequest::new(platform, r.caddy_version, r.plugins, r.replacements)
    }
}

impl From<BuildRequest> for RawRequest {
    fn from(r: BuildRequest) -> Self {
        RawRequest {
            os: r.platform.os().to_owned(),
            arch: r.platform.arch().to_owned(),
            arm: r.platform.arm(),
            caddy_version: r.caddy_version,
            plugins: r.plugins,
            replacements: r.replacements,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(m: &str, v: &str) -> Plugin {
        Plugin {
            module: m.parse().unwrap(),
            version: v.parse().unwrap(),
        }
    }

    fn req(plugins: Vec<Plugin>) -> BuildRequest {
        BuildRequest::new(
            Platform::new("linux", "arm", Some("7")).unwrap(),
            "v2.8.4".parse().unwrap(),
            plugins,
            vec![],
        )
        .unwrap()
    }

    #[test]
    fn key_is_independent_of_plugin_order_and_changes_with_any_fact() {
        let a = req(vec![
            plugin("example.com/a", "v1.0.0"),
            plugin("example.com/b", "v1.1.0"),
        ]);
        let b = req(vec![
            plugin("example.com/b", "v1.1.0"),
            plugin("example.com/a", "v1.0.0"),
        ]);
        assert_eq!(a.key(), b.key());
        let c = req(vec![
            plugin("example.com/a", "v1.0.1"),
            plugin("example.com/b", "v1.1.0"),
        ]);
        assert_ne!(a.key(), c.key());
        let d = BuildRequest::new(
            Platform::new("linux", "arm", Some("6")).unwrap(),
            "v2.8.4".parse().unwrap(),
            a.plugins().to_vec(),
            vec![],
        )
        .unwrap();
        assert_ne!(a.key(), d.key(), "GOARM is part of the key");
        assert_eq!(
            a.canonical(),
            "caddy-build-request v1\nos linux\narch arm\narm 7\ncaddy v2.8.4\nplugin example.com/a v1.0.0\nplugin example.com/b v1.1.0\n"
        );
    }

    #[test]
    fn stored_form_round_trips_and_is_checked() {
        let a = req(vec![plugin("example.com/a", "v1.0.0")]);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(
            json,
            r#"{"os":"linux","arch":"arm","arm":7,"caddy_version":"v2.8.4","plugins":[{"module":"example.com/a","version":"v1.0.0"}],"replacements":[]}"#
        );
        assert_eq!(serde_json::from_str::<BuildRequest>(&json).unwrap(), a);
        let bad = json.replace("example.com/a", "example.com/a\\nx");
        assert!(serde_json::from_str::<BuildRequest>(&bad).is_err());
        let bad = json.replace("\"arm\":7", "\"arm\":9");
        assert!(serde_json::from_str::<BuildRequest>(&bad).is_err());
    }

    #[test]
    fn specs_are_checked_field_by_field() {
        let ok = BuildSpec::parse(
            "linux",
            "amd64",
            None,
            Some("latest"),
            &[
                ("example.com/a", None),
                ("example.com/b/v2", Some("v2.0.1")),
                ("example.com/c", Some("main")),
            ],
            &[("example.com/x", "example.com/y", Some("v1.0.0"))],
        )
        .unwrap();
        assert_eq!(ok.caddy, VersionQuery::Latest);
        assert_eq!(ok.plugins[0].version, VersionQuery::Latest);
        assert_eq!(ok.plugins[2].version, VersionQuery::Query("main".into()));

        let many: Vec<(String, Option<&str>)> = (0..51)
            .map(|i| (format!("example.com/p{i}"), None))
            .collect();
        let many: Vec<(&str, Option<&str>)> = many.iter().map(|(m, v)| (m.as_str(), *v)).collect();
        let cases: Vec<(Result<BuildSpec, RequestError>, &str)> = vec![
            (
                BuildSpec::parse("linux", "amd64", None, None, &many, &[]),
                "too many plugins: 51, at most 50",
            ),
            (
                BuildSpec::parse(
                    "linux",
                    "amd64",
                    None,
                    None,
                    &[("example.com/a", None), ("example.com/a", None)],
                    &[],
                ),
                "listed twice",
            ),
            (
                BuildSpec::parse("linux", "amd64", None, None, &[(CADDY_MODULE, None)], &[]),
                "Caddy itself",
            ),
            (
                BuildSpec::parse(
                    "linux",
                    "amd64",
                    None,
                    None,
                    &[("example.com/a b", None)],
                    &[],
                ),
                "plugins[0].module",
            ),
            (
                BuildSpec::parse(
                    "linux",
                    "amd64",
                    None,
                    None,
                    &[("example.com/a", Some("v2.0.0"))],
                    &[],
                ),
                "plugins[0].version",
            ),
            (
                BuildSpec::parse(
                    "linux",
                    "amd64",
                    None,
                    None,
                    &[("example.com/a", Some("-bad"))],
                    &[],
                ),
                "is not valid",
            ),
            (
                BuildSpec::parse(
                    "linux",
                    "amd64",
                    None,
                    None,
                    &[("example.com/a", Some("v1;id"))],
                    &[],
                ),
                "is not valid",
            ),
            (
                BuildSpec::parse("linux", "amd64", None, Some("v1.2.3 "), &[], &[]),
                "is not valid",
            ),
            (
                BuildSpec::parse(
                    "linux",
                    "amd64",
                    None,
                    None,
                    &[],
                    &[("example.com/x", "../y", Some("v1.0.0"))],
                ),
                "replacements[0].new",
            ),
            (
                BuildSpec::parse(
                    "linux",
                    "amd64",
                    None,
                    None,
                    &[],
                    &[
                        ("example.com/x", "example.com/y", None),
                        ("example.com/x", "example.com/z", None),
                    ],
                ),
                "replaced twice",
            ),
            (
                BuildSpec::parse("plan10", "amd64", None, None, &[], &[]),
                "valid choices",
            ),
        ];
        for (result, want) in cases {
            let err = result.expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    /// Hostile values are refused where a request enters, so no file or argv can hold them.
    #[test]
    fn hostile_values_never_become_a_request() {
        let long = format!("example.com/{}", "a".repeat(300));
        let hostile = [
            "example.com/a\nrequire evil.com/x v1.0.0",
            "example.com/a\"\n\tos/exec\"",
            "example.com/a b",
            "example.com/a\\b",
            "example.com/../../etc/passwd",
            "-modfile=/etc/passwd",
            "--help",
            "example.com/$(touch /tmp/pwned)",
            "example.com/a;rm -rf /",
            "example.com/a`id`",
            "example.com/a|b",
            long.as_str(),
        ];
        for h in hostile {
            assert!(
                BuildSpec::parse("linux", "amd64", None, None, &[(h, None)], &[]).is_err(),
                "plugin {h:?}"
            );
            assert!(
                BuildSpec::parse(
                    "linux",
                    "amd64",
                    None,
                    None,
                    &[("example.com/a", Some(h))],
                    &[]
                )
                .is_err(),
                "version {h:?}"
            );
            assert!(
                BuildSpec::parse("linux", "amd64", None, Some(h), &[], &[]).is_err(),
                "caddy version {h:?}"
            );
            assert!(
                BuildSpec::parse(
                    "linux",
                    "amd64",
                    None,
                    None,
                    &[],
                    &[("example.com/a", h, Some("v1.0.0"))]
                )
                .is_err(),
                "replacement {h:?}"
            );
            // Stored requests are checked again when read back.
            let json = serde_json::json!({
                "os": "linux", "arch": "amd64", "caddy_version": "v2.8.4",
                "plugins": [{"module": h, "version": "v1.0.0"}], "replacements": []
            });
            assert!(
                serde_json::from_value::<BuildRequest>(json).is_err(),
                "stored {h:?}"
            );
        }
    }

    #[test]
    fn caddy_versions_must_be_v2() {
        let err = BuildRequest::new(
            Platform::new("linux", "amd64", None).unwrap(),
            "v1.0.4".parse().unwrap(),
            vec![],
            vec![],
        )
        .unwrap_err();
        assert!(err.to_string().contains("caddy_version"), "{err}");
    }
}
