//! Go module paths and versions, by the rules of golang.org/x/mod (module.CheckPath, semver, the
//! proxy protocol's case escaping).
//!
//! A [`ModulePath`] or [`ModuleVersion`] can only hold a value that passed these checks, so
//! whatever renders go.mod, main.go or an argv from them cannot be injected into: no
//! whitespace, quotes, backslashes, shell metacharacters, `..` elements or leading `-`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest module path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 256;
/// Longest version accepted, in bytes.
pub const MAX_VERSION_LEN: usize = 128;

/// A valid Go module path such as `github.com/caddyserver/caddy/v2`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModulePath(String);

/// A canonical Go module version such as `v2.8.4`, `v0.0.0-20191109021931-daa7c04131f5` or
/// `v17.0.0+incompatible`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ModuleVersion {
    text: String,
    major: u64,
}

/// Why a module path or version is refused. The message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    #[error("module path is empty")]
    EmptyPath,
    #[error("module path is longer than {MAX_PATH_LEN} bytes")]
    PathTooLong,
    #[error("module path {0:?} must not start with '-'")]
    LeadingDash(String),
    #[error("module path {0:?} has an empty element (a leading, trailing or double '/')")]
    EmptyElement(String),
    #[error(
        "module path {path:?}: character {ch:?} is not allowed (only A-Z a-z 0-9 - . _ ~ and '/')"
    )]
    BadChar { path: String, ch: char },
    #[error("module path {path:?}: element {elem:?} {why}")]
    BadElement {
        path: String,
        elem: String,
        why: &'static str,
    },
    #[error("module path {0:?}: the first element must contain a dot and only a-z 0-9 . - (like example.com)")]
    BadFirstElement(String),
    #[error("module path {0:?}: invalid major version suffix (use /v2 or higher, no leading zero, no dots)")]
    BadMajorSuffix(String),
    #[error("version is empty")]
    EmptyVersion,
    #[error("version is longer than {MAX_VERSION_LEN} bytes")]
    VersionTooLong,
    #[error("version {0:?} is not a canonical semantic version like v1.2.3 (or v1.2.3-pre, v0.0.0-20191109021931-daa7c04131f5)")]
    BadVersion(String),
    #[error("version {version} does not fit module {path}: {why}")]
    Mismatch {
        path: String,
        version: String,
        why: String,
    },
}

/// Windows device names, refused as the part of an element before its first dot.
const RESERVED: &[&str] = &[
    "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8",
    "COM9", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
];

fn printable(s: &str) -> String {
    s.chars().take(80).collect()
}

impl ModulePath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The major-version suffix: `/v2` (as `"/v2"`), `.v1` for gopkg.in, or `""`.
    pub fn major_suffix(&self) -> &str {
        split_major(&self.0).map(|(_, m)| m).unwrap_or("")
    }

    /// The path in the module proxy's case encoding: each upper-case letter becomes `!` and
    /// its lower-case form (`github.com/Acme/x` -> `github.com/!acme/x`).
    pub fn escaped(&self) -> String {
        escape(&self.0)
    }
}

/// The module proxy's case encoding of a path, version or query: each upper-case letter
/// becomes `!` and its lower-case form.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('!');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits a path into prefix and major suffix; `None` if the suffix is malformed.
fn split_major(path: &str) -> Option<(&str, &str)> {
    if let Some(rest) = path.strip_prefix("gopkg.in/") {
        // gopkg.in/name.vN or gopkg.in/user/name.vN: the suffix is required.
        let dot = rest.rfind(".v")?;
        let digits = &rest[dot + 2..];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if digits.starts_with('0') && digits != "0" {
            return None;
        }
        let at = "gopkg.in/".len() + dot;
        return Some((&path[..at], &path[at..]));
    }
    let bytes = path.as_bytes();
    let mut i = bytes.len();
    let mut dot = false;
    while i > 0 && (bytes[i - 1].is_ascii_digit() || bytes[i - 1] == b'.') {
        dot |= bytes[i - 1] == b'.';
        i -= 1;
    }
    if i <= 1 || i == bytes.len() || bytes[i - 1] != b'v' || bytes[i - 2] != b'/' {
        return Some((path, ""));
    }
    let major = &path[i - 2..];
    if dot || major.len() <= 2 || major.as_bytes()[2] == b'0' || major == "/v1" {
        return None;
    }
    Some((&path[..i - 2], major))
}

fn check_element(path: &str, elem: &str) -> Result<(), ModuleError> {
    let bad = |why| ModuleError::BadElement {
        path: printable(path),
        elem: printable(elem),
        why,
    };
    if elem.bytes().all(|b| b == b'.') {
        return Err(bad("is only dots"));
    }
    if elem.starts_with('.') {
        return Err(bad("starts with a dot"));
    }
    if elem.ends_with('.') {
        return Err(bad("ends with a dot"));
    }
    let short = elem.split('.').next().unwrap_or(elem);
    if RESERVED.iter().any(|r| r.eq_ignore_ascii_case(short)) {
        return Err(bad("is a reserved Windows device name"));
    }
    if let Some(i) = elem.rfind('~') {
        let tail = &elem[i + 1..];
        if !tail.is_empty() && tail.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(
                "ends in a tilde followed by digits (a Windows short name)",
            ));
        }
    }
    Ok(())
}

impl FromStr for ModulePath {
    type Err = ModuleError;

    fn from_str(path: &str) -> Result<Self, Self::Err> {
        if path.is_empty() {
            return Err(ModuleError::EmptyPath);
        }
        if path.len() > MAX_PATH_LEN {
            return Err(ModuleError::PathTooLong);
        }
        if let Some(ch) = path
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '/')))
        {
            return Err(ModuleError::BadChar {
                path: printable(path),
                ch,
            });
        }
        if path.starts_with('-') {
            return Err(ModuleError::LeadingDash(printable(path)));
        }
        let elems: Vec<&str> = path.split('/').collect();
        if elems.iter().any(|e| e.is_empty()) {
            return Err(ModuleError::EmptyElement(printable(path)));
        }
        for e in &elems {
            check_element(path, e)?;
        }
        let first = elems[0];
        if !first.contains('.')
            || !first
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        {
            return Err(ModuleError::BadFirstElement(printable(path)));
        }
        if split_major(path).is_none() {
            return Err(ModuleError::BadMajorSuffix(printable(path)));
        }
        Ok(ModulePath(path.to_owned()))
    }
}

impl TryFrom<String> for ModulePath {
    type Error = ModuleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ModulePath> for String {
    fn from(p: ModulePath) -> String {
        p.0
    }
}

impl fmt::Display for ModulePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ModulePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl ModuleVersion {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn major(&self) -> u64 {
        self.major
    }

    pub fn is_incompatible(&self) -> bool {
        self.text.ends_with("+incompatible")
    }

    /// Whether this version may be used with `path` (its major-version suffix).
    pub fn check_fits(&self, path: &ModulePath) -> Result<(), ModuleError> {
        let mismatch = |why: String| ModuleError::Mismatch {
            path: path.to_string(),
            version: self.text.clone(),
            why,
        };
        let suffix = path.major_suffix();
        if let Some(n) = suffix.strip_prefix(".v") {
            // gopkg.in/x.vN; an old tool bug made v0.0.0 pseudo-versions for .v1: allowed.
            if self.is_incompatible() {
                return Err(mismatch(
                    "+incompatible is not allowed on gopkg.in paths".into(),
                ));
            }
            if n == "1" && self.text.starts_with("v0.0.0-") {
                return Ok(());
            }
            return if self.major.to_string() == n {
                Ok(())
            } else {
                Err(mismatch(format!(
                    "gopkg.in path .v{n} needs major version {n}"
                )))
            };
        }
        if let Some(n) = suffix.strip_prefix("/v") {
            if self.is_incompatible() {
                return Err(mismatch(
                    "+incompatible is only for paths without a major suffix".into(),
                ));
            }
            return if self.major.to_string() == n {
                Ok(())
            } else {
                Err(mismatch(format!(
                    "path suffix /v{n} needs major version {n}"
                )))
            };
        }
        match (self.major, self.is_incompatible()) {
            (0 | 1, false) => Ok(()),
            (0 | 1, true) => Err(mismatch(
                "+incompatible needs major version 2 or higher".into(),
            )),
            (m, false) => Err(mismatch(format!(
                "major version {m} needs the path suffix /v{m} (or a +incompatible version)"
            ))),
            (_, true) => Ok(()),
        }
    }
}

impl FromStr for ModuleVersion {
    type Err = ModuleError;

    fn from_str(v: &str) -> Result<Self, Self::Err> {
        if v.is_empty() {
            return Err(ModuleError::EmptyVersion);
        }
        if v.len() > MAX_VERSION_LEN {
            return Err(ModuleError::VersionTooLong);
        }
        let bad = || ModuleError::BadVersion(printable(v));
        let rest = v.strip_prefix('v').ok_or_else(bad)?;
        // semver refuses leading zeros, empty identifiers and stray characters.
        let parsed = semver::Version::parse(rest).map_err(|_| bad())?;
        if !parsed.build.is_empty() && parsed.build.as_str() != "incompatible" {
            return Err(bad());
        }
        Ok(ModuleVersion {
            text: v.to_owned(),
            major: parsed.major,
        })
    }
}

impl TryFrom<String> for ModuleVersion {
    type Error = ModuleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ModuleVersion> for String {
    fn from(v: ModuleVersion) -> String {
        v.text
    }
}

impl fmt::Display for ModuleVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for ModuleVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl PartialOrd for ModuleVersion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Semantic-version order (pre-releases before releases), then text for equal precedence.
impl Ord for ModuleVersion {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let a = semver::Version::parse(&self.text[1..]).expect("validated");
        let b = semver::Version::parse(&other.text[1..]).expect("validated");
        a.cmp_precedence(&b)
            .then_with(|| self.text.cmp(&other.text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_follow_the_go_rules() {
        let cases: &[(&str, bool)] = &[
            ("x.y/z", true),
            ("github.com/caddyserver/caddy/v2", true),
            ("github.com/go-yaml/yaml", true),
            ("github.com/go-yaml/yaml/v2", true),
            ("github.com/GoogleCloudPlatform/omega", true),
            ("gopkg.in/check.v1", true),
            ("gopkg.in/yaml.v3", true),
            ("x.y/z/v2", true),
            ("x.y/a_b~c/d-e", true),
            (".x/z", false),
            ("-x/z", false),
            ("x.y/z/../../w", false),
            ("x.y/z/./w", false),
            ("x.y/z/v1", false),
            ("x.y/z/v0", false),
            ("x.y/z/v02", false),
            ("x.y/z/v2.0", false),
            ("X.y/z", false),
            ("x.y/aux.foo", false),
            ("x.y/AUX", false),
            ("x.y/com1", false),
            ("x.y/z~0", false),
            ("x.y/z~123", false),
            ("xy/z", false),
            ("x_y.com/z", false),
            ("x.y/z/", false),
            ("/x.y/z", false),
            ("x.y//z", false),
            ("x.y/z.", false),
            ("gopkg.in/check", false),
            ("gopkg.in/check.v01", false),
            ("", false),
        ];
        for (path, ok) in cases {
            assert_eq!(path.parse::<ModulePath>().is_ok(), *ok, "{path:?}");
        }
    }

    #[test]
    fn hostile_paths_are_refused_with_a_reason() {
        let long = format!("example.com/{}", "a".repeat(300));
        let cases: &[(&str, &str)] = &[
            ("example.com/a\nrequire evil v1.0.0", "character '\\n'"),
            ("example.com/a\"b", "character '\"'"),
            ("example.com/a'b", "character '\\''"),
            ("example.com/a b", "character ' '"),
            ("example.com/a\\b", "character '\\\\'"),
            ("example.com/a;rm -rf", "character ';'"),
            ("example.com/$(id)", "character '$'"),
            ("example.com/`id`", "character '`'"),
            ("example.com/a|b", "character '|'"),
            ("example.com/a&b", "character '&'"),
            ("example.com/a*", "character '*'"),
            ("example.com/a:b", "character ':'"),
            ("example.com/a<b>", "character '<'"),
            ("example.com/a?", "character '?'"),
            ("example.com/a+b", "character '+'"),
            ("example.com/é", "character 'é'"),
            ("example.com/a\0", "character '\\0'"),
            ("--help", "must not start with '-'"),
            ("-x.y/z", "must not start with '-'"),
            ("example.com/..", "only dots"),
            ("example.com/../etc", "only dots"),
            (long.as_str(), "longer than 256 bytes"),
        ];
        for (path, want) in cases {
            let err = path.parse::<ModulePath>().unwrap_err().to_string();
            assert!(err.contains(want), "{path:?}: {err}");
        }
    }

    #[test]
    fn versions_must_fit_their_paths() {
        let cases: &[(&str, &str, bool)] = &[
            ("github.com/go-yaml/yaml", "v0.8.0", true),
            ("github.com/go-yaml/yaml", "v1.0.0", true),
            ("github.com/go-yaml/yaml", "v2.0.0", false),
            ("github.com/go-yaml/yaml/v2", "v1.0.0", false),
            ("github.com/go-yaml/yaml/v2", "v2.1.5", true),
            ("github.com/go-yaml/yaml/v2", "v3.0.0", false),
            ("gopkg.in/check.v1", "v0.0.0", false),
            (
                "gopkg.in/check.v1",
                "v0.0.0-20160102150405-abcdef123456",
                true,
            ),
            ("gopkg.in/check.v1", "v1.0.0", true),
            ("rsc.io/quote", "v17.0.0", false),
            ("rsc.io/quote", "v17.0.0+incompatible", true),
            ("rsc.io/quote", "v1.0.0+incompatible", false),
            ("rsc.io/quote/v17", "v17.0.0+incompatible", false),
            ("github.com/caddyserver/caddy/v2", "v2.8.4", true),
            ("github.com/caddyserver/caddy/v2", "v2.9.0-beta.1", true),
        ];
        for (path, version, ok) in cases {
            let p: ModulePath = path.parse().unwrap();
            let v: ModuleVersion = version.parse().unwrap();
            assert_eq!(v.check_fits(&p).is_ok(), *ok, "{path} {version}");
        }
    }

    #[test]
    fn versions_are_canonical_semver() {
        let good = [
            "v0.0.0",
            "v1.2.3",
            "v2.8.4",
            "v1.2.3-pre",
            "v1.2.3-rc.1",
            "v0.0.0-20191109021931-daa7c04131f5",
            "v17.0.0+incompatible",
        ];
        for v in good {
            assert!(v.parse::<ModuleVersion>().is_ok(), "{v}");
        }
        let bad = [
            "",
            "1.2.3",
            "v1",
            "v1.2",
            "v01.2.3",
            "v1.02.3",
            "v1.2.3+build",
            "v1.2.3-",
            "v1.2.3-01",
            "latest",
            "v1.2.3\n",
            "v1.2.3 ",
            "-v1.2.3",
            "v1.2.3;id",
            "v1.2.3\"",
            "V1.2.3",
        ];
        for v in bad {
            assert!(v.parse::<ModuleVersion>().is_err(), "{v:?}");
        }
        assert!("v1.2.3-".repeat(30).parse::<ModuleVersion>().is_err());
    }

    #[test]
    fn escaping_for_the_proxy() {
        let p: ModulePath = "github.com/GoogleCloudPlatform/omega".parse().unwrap();
        assert_eq!(p.escaped(), "github.com/!google!cloud!platform/omega");
        let p: ModulePath = "github.com/caddyserver/caddy/v2".parse().unwrap();
        assert_eq!(p.escaped(), "github.com/caddyserver/caddy/v2");
        assert_eq!(p.major_suffix(), "/v2");
    }

    #[test]
    fn versions_order_by_semver() {
        let mut vs: Vec<ModuleVersion> = ["v1.10.0", "v1.2.0", "v1.2.0-rc.1", "v0.9.9"]
            .iter()
            .map(|v| v.parse().unwrap())
            .collect();
        vs.sort();
        let got: Vec<&str> = vs.iter().map(|v| v.as_str()).collect();
        assert_eq!(got, ["v0.9.9", "v1.2.0-rc.1", "v1.2.0", "v1.10.0"]);
    }
}
