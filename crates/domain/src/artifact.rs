//! The artifact storage layout, in one place: every file of a build lives under
//! `builds/<shard>/<key>/<attempt>/`, where `<shard>` is the key's first two characters (so
//! no directory of a file system backend holds millions of entries) and `<attempt>` is the
//! attempt that stored it. Only the attempt a `succeeded` event names is ever served;
//! files of other attempts (failed or fenced after uploading) are the janitor's to remove.
//!
//! The published files of an attempt: the binary (`caddy`, `caddy.exe`), its minisign
//! signature (`<binary>.minisig`), its checksum in sha256sum's format (`<binary>.sha256`),
//! the provenance statement ([`PROVENANCE`]) and its signature.

use crate::BuildKey;

/// Top folder of every build's files.
pub const ROOT: &str = "builds";
/// File name of a build's provenance statement (in-toto).
pub const PROVENANCE: &str = "provenance.json";

/// One attempt's folder in artifact storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArtifactPath<'a> {
    pub key: &'a BuildKey,
    pub attempt: u32,
}

impl ArtifactPath<'_> {
    /// `builds/<shard>/<key>/<attempt>`: the attempt's folder (every file of this attempt,
    /// and nothing of another attempt, lies under `<location>/`), and what a `succeeded`
    /// event records as the artifact's location.
    pub fn location(&self) -> String {
        format!("{}/{}", build_folder(self.key), self.attempt)
    }

    /// The storage key of one file of this attempt.
    pub fn file(&self, name: &str) -> String {
        format!("{}/{name}", self.location())
    }
}

/// The folder of every attempt of a build (`builds/<shard>/<key>`): all its files lie under
/// `<folder>/`.
pub fn build_folder(key: &BuildKey) -> String {
    format!("{ROOT}/{}/{key}", key.shard())
}

/// The storage key of a file of a published artifact, from the location its `succeeded`
/// event recorded.
pub fn stored_file(location: &str, name: &str) -> String {
    format!("{location}/{name}")
}

/// Name of the signature of a published file.
pub fn signature_of(name: &str) -> String {
    format!("{name}.minisig")
}

/// Name of the checksum file of a published binary.
pub fn checksum_of(name: &str) -> String {
    format!("{name}.sha256")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let key: BuildKey = "ab".repeat(32).parse().unwrap();
        let p = ArtifactPath {
            key: &key,
            attempt: 1,
        };
        let k = key.as_str();
        assert_eq!(p.location(), format!("builds/ab/{k}/1"));
        assert_eq!(p.file("caddy"), format!("builds/ab/{k}/1/caddy"));
        assert_eq!(build_folder(&key), format!("builds/ab/{k}"));
        assert_eq!(stored_file(&p.location(), PROVENANCE), p.file(PROVENANCE));
        // Attempt 10's files do not lie under attempt 1's folder.
        let ten = ArtifactPath {
            key: &key,
            attempt: 10,
        };
        assert!(!ten.file("caddy").starts_with(&format!("{}/", p.location())));
        assert!(p
            .file("caddy")
            .starts_with(&format!("{}/", build_folder(&key))));
        assert_eq!(signature_of("caddy"), "caddy.minisig");
        assert_eq!(checksum_of("caddy.exe"), "caddy.exe.sha256");
    }
}
