//! The build key: SHA-256 (64 lower-case hex digits) of a resolved build request.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Identifies one build: equal resolved requests have equal keys.
///
/// Always exactly 64 lower-case hex digits, so it is safe in URLs, file paths, SQL
/// parameters and NOTIFY payloads alike.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BuildKey(String);

/// Why a string is not a build key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildKeyError {
    #[error("a build key has 64 hex digits, this one has {0} characters")]
    Length(usize),
    #[error("a build key has only the digits 0-9 and a-f (lower case)")]
    Digit,
}

impl BuildKey {
    /// Length in characters of every key.
    pub const LEN: usize = 64;

    /// The key of arbitrary bytes (the canonical serialization of a resolved request).
    pub fn digest(bytes: &[u8]) -> Self {
        use sha2::Digest;
        BuildKey(hex::encode(sha2::Sha256::digest(bytes)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first two digits: the fan-out directory of artifact storage.
    pub fn shard(&self) -> &str {
        &self.0[..2]
    }
}

impl FromStr for BuildKey {
    type Err = BuildKeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != Self::LEN {
            return Err(BuildKeyError::Length(s.chars().count()));
        }
        if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(BuildKeyError::Digit);
        }
        Ok(BuildKey(s.to_owned()))
    }
}

impl TryFrom<String> for BuildKey {
    type Error = BuildKeyError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<BuildKey> for String {
    fn from(k: BuildKey) -> String {
        k.0
    }
}

/// Lets maps keyed by `BuildKey` be searched with a `&str` (hashes and compares equal).
impl std::borrow::Borrow<str> for BuildKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BuildKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for BuildKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BuildKey({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_64_lower_hex_digits() {
        let good = "a".repeat(64);
        assert_eq!(good.parse::<BuildKey>().unwrap().as_str(), good);
        let cases: &[(&str, BuildKeyError)] = &[
            ("", BuildKeyError::Length(0)),
            ("abc", BuildKeyError::Length(3)),
            (&"A".repeat(64), BuildKeyError::Digit),
            (&"g".repeat(64), BuildKeyError::Digit),
            (&format!("{}\n", "a".repeat(63)), BuildKeyError::Digit),
            (&"a".repeat(65), BuildKeyError::Length(65)),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<BuildKey>().unwrap_err(), *want, "{input:?}");
        }
    }

    #[test]
    fn digest_is_sha256_hex() {
        let k = BuildKey::digest(b"abc");
        assert_eq!(
            k.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(k.shard(), "ba");
    }

    #[test]
    fn serde_rejects_invalid_keys() {
        let ok: BuildKey = serde_json::from_str(&format!("\"{}\"", "0".repeat(64))).unwrap();
        assert_eq!(ok.as_str(), "0".repeat(64));
        assert!(serde_json::from_str::<BuildKey>("\"nope\"").is_err());
    }
}
