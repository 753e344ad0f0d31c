//! What a published artifact carries besides its bytes: a minisign signature (the prehashed
//! `ED` algorithm, BLAKE2b-512 of the file, what `minisign -Vm` checks by default), a
//! `sha256sum`-style checksum line, and an in-toto Statement with a SLSA provenance predicate
//! (see [`provenance`]).
//!
//! Keys are minisign's own files, so `minisign -G` keys work here and `caddy-build-server
//! keygen` keys work with minisign: the secret key file (encrypted with scrypt under a
//! password, or unencrypted) and the public key file beside it (`<secret>.pub`).
//! Signing runs in the worker, never in a build container.

pub mod provenance;

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::Digest;

/// Why a key could not be loaded or written, or a signature made or checked.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("cannot read the signing key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; remove it first or pick another path")]
    Exists { path: PathBuf },
    #[error("the signing key {path} is encrypted: set signing.password")]
    NeedsPassword { path: PathBuf },
    #[error("the signing key {path} cannot be used: {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("cannot sign: {0}")]
    Sign(String),
    #[error("the signature does not verify: {0}")]
    Verify(String),
}

/// A loaded key pair that signs artifacts.
pub struct Signer {
    sk: minisign::SecretKey,
    pk: minisign::PublicKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

/// The public key file's path for a secret key file: `<secret>.pub`.
pub fn public_key_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

impl Signer {
    /// Loads a minisign secret key file. An empty or absent password means the key is stored
    /// unencrypted (`minisign -G -W`); a password for an encrypted key is never asked for
    /// interactively.
    pub fn load(path: &Path, password: Option<&str>) -> Result<Signer, SigningError> {
        let text = std::fs::read_to_string(path).map_err(|source| SigningError::Read {
            path: path.to_owned(),
            source,
        })?;
        let bad = |e: minisign::PError| SigningError::BadKey {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let sk_box = minisign::SecretKeyBox::from_string(&text).map_err(bad)?;
        let sk = match password.filter(|p| !p.is_empty()) {
            Some(pw) => minisign::SecretKey::from_box(sk_box, Some(pw.to_owned())).map_err(bad)?,
            None => match minisign::SecretKey::from_unencrypted_box(sk_box) {
                Ok(sk) => sk,
                Err(e) if e.to_string().contains("encrypted") => {
                    return Err(SigningError::NeedsPassword {
                        path: path.to_owned(),
                    })
                }
                Err(e) => return Err(bad(e)),
            },
        };
        let pk = minisign::PublicKey::from_secret_key(&sk).map_err(bad)?;
        Ok(Signer { sk, pk })
    }

    /// The key id as minisign prints it (16 upper-case hex digits).
    pub fn key_id(&self) -> String {
        key_id_hex(self.pk.keynum())
    }

    /// The public key in minisign's file format (what `GET /api/public-key` serves).
    pub fn public_key_file(&self) -> String {
        public_key_file(&self.pk)
    }

    /// The public key alone, base64, as `minisign -P` takes it.
    pub fn public_key_base64(&self) -> String {
        self.pk.to_base64()
    }

    /// Signs what `data` yields (BLAKE2b-512 prehash, algorithm `ED`) with `trusted` as the
    /// trusted comment; returns the `.minisig` file's text. Reads all of `data`, in pieces:
    /// memory stays constant whatever its size. CPU-bound: call it off the async runtime.
    pub fn sign(&self, data: impl Read, trusted: &str) -> Result<String, SigningError> {
        if trusted.contains('\n') || trusted.contains('\r') {
            return Err(SigningError::Sign(
                "a trusted comment must be one line".into(),
            ));
        }
        let untrusted = format!("signature from caddy-build-server key {}", self.key_id());
        let sig = minisign::sign(
            Some(&self.pk),
            &self.sk,
            data,
            Some(trusted),
            Some(&untrusted),
        )
        .map_err(|e| SigningError::Sign(e.to_string()))?;
        Ok(sig.into_string())
    }
}

fn key_id_hex(keynum: &[u8]) -> String {
    // minisign prints the id as a little-endian u64 in upper-case hex.
    let mut id = [0u8; 8];
    id.copy_from_slice(&keynum[..8]);
    format!("{:016X}", u64::from_le_bytes(id))
}

fn public_key_file(pk: &minisign::PublicKey) -> String {
    format!(
        "untrusted comment: minisign public key {}\n{}\n",
        key_id_hex(pk.keynum()),
        pk.to_base64()
    )
}

/// Writes a new key pair: the secret key to `path` (mode 0600, encrypted when `password` is
/// non-empty) and the public key to `<path>.pub`. Refuses to overwrite either. Returns the
/// public key file's text.
pub fn keygen(path: &Path, password: Option<&str>) -> Result<String, SigningError> {
    let pub_path = public_key_path(path);
    for p in [path, pub_path.as_path()] {
        if p.exists() {
            return Err(SigningError::Exists { path: p.to_owned() });
        }
    }
    let gen = |e: minisign::PError| SigningError::Sign(e.to_string());
    let pair = match password.filter(|p| !p.is_empty()) {
        Some(pw) => {
            minisign::KeyPair::generate_encrypted_keypair(Some(pw.to_owned())).map_err(gen)?
        }
        None => minisign::KeyPair::generate_unencrypted_keypair().map_err(gen)?,
    };
    let id = key_id_hex(pair.pk.keynum());
    let comment = format!("caddy-build-server secret key {id}");
    let sk_text = pair.sk.to_box(Some(&comment)).map_err(gen)?.into_string();
    let pk_text = public_key_file(&pair.pk);
    write_new(path, sk_text.as_bytes(), 0o600)?;
    write_new(&pub_path, pk_text.as_bytes(), 0o644)?;
    Ok(pk_text)
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SigningError> {
    use std::io::Write;
    let err = |source| SigningError::Write {
        path: path.to_owned(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Parses a public key file's text; returns the key alone, base64 (as `minisign -P` takes
/// it).
pub fn parse_public_key(text: &str) -> Result<String, SigningError> {
    minisign::PublicKeyBox::from_string(text)
        .and_then(|b| b.into_public_key())
        .map(|pk| pk.to_base64())
        .map_err(|e| SigningError::Verify(format!("not a minisign public key: {e}")))
}

/// Checks a `.minisig` text against a public key file's text and the data; returns the
/// trusted comment.
pub fn verify(
    public_key: &str,
    signature: &str,
    data: impl Read + std::io::Seek,
) -> Result<String, SigningError> {
    let v = |e: minisign::PError| SigningError::Verify(e.to_string());
    let pk = minisign::PublicKeyBox::from_string(public_key)
        .and_then(|b| b.into_public_key())
        .map_err(v)?;
    let sig = minisign::SignatureBox::from_string(signature).map_err(v)?;
    let mut data = data;
    minisign::verify(&pk, &sig, &mut data, true, false, false).map_err(v)?;
    sig.trusted_comment().map_err(v)
}

/// The checksum file's text, as `sha256sum` writes it and `sha256sum -c` reads it.
pub fn checksum_file(sha256_hex: &str, name: &str) -> String {
    format!("{sha256_hex}  {name}\n")
}

/// SHA-256 (hex) of the sorted, newline-terminated module lines: the module-list hash of the
/// trusted comment. A line is `module@version`, or `module@version => new@version` for a
/// replaced module (as `go version -m` prints the `dep` and `=>` lines).
pub fn modules_hash<'a>(modules: impl IntoIterator<Item = &'a str>) -> String {
    let mut lines: Vec<&str> = modules.into_iter().collect();
    lines.sort_unstable();
    lines.dedup();
    let mut h = sha2::Sha256::new();
    for l in lines {
        h.update(l.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// What the trusted comment of an artifact's signature says (one line, space-separated
/// `name:value` fields, so a person reading `minisign -V` output can check it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedComment<'a> {
    pub timestamp: i64,
    pub build_key: &'a str,
    pub caddy_version: &'a str,
    pub modules_sha256: &'a str,
    /// Every replacement in the binary, `old=>new@version`; shown as one `replace:` field
    /// (comma-separated) when there are any.
    pub replacements: &'a [String],
    pub file: &'a str,
    pub sha256: &'a str,
}

impl std::fmt::Display for TrustedComment<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "timestamp:{} file:{} build:{} caddy:{} modules:{}",
            self.timestamp, self.file, self.build_key, self.caddy_version, self.modules_sha256,
        )?;
        if !self.replacements.is_empty() {
            write!(f, " replace:{}", self.replacements.join(","))?;
        }
        write!(f, " sha256:{}", self.sha256)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_sign_verify_round_trip_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let pk = keygen(&path, Some("pw")).unwrap();
        assert!(matches!(
            keygen(&path, None),
            Err(SigningError::Exists { .. })
        ));
        assert!(matches!(
            Signer::load(&path, None),
            Err(SigningError::NeedsPassword { .. })
        ));
        assert!(matches!(
            Signer::load(&path, Some("wrong")),
            Err(SigningError::BadKey { .. })
        ));
        let s = Signer::load(&path, Some("pw")).unwrap();
        assert_eq!(s.public_key_file(), pk);
        assert_eq!(std::fs::read_to_string(public_key_path(&path)).unwrap(), pk);
        let data = vec![7u8; 100_000];
        let sig = s.sign(&data[..], "hello world").unwrap();
        assert_eq!(
            verify(&pk, &sig, std::io::Cursor::new(&data)).unwrap(),
            "hello world"
        );
        let mut flipped = data.clone();
        flipped[500] ^= 1;
        assert!(verify(&pk, &sig, std::io::Cursor::new(&flipped)).is_err());
        assert!(s.sign(&data[..], "two\nlines").is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn unencrypted_keys_load_without_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        keygen(&path, None).unwrap();
        let s = Signer::load(&path, Some("")).unwrap();
        let sig = s.sign(&b"x"[..], "t").unwrap();
        assert!(sig.lines().nth(1).unwrap().len() > 80);
        assert!(format!("{s:?}").contains(&s.key_id()));
    }

    #[test]
    fn modules_hash_ignores_order() {
        assert_eq!(
            modules_hash(["b@v1", "a@v2"]),
            modules_hash(["a@v2", "b@v1"])
        );
        assert_ne!(modules_hash(["a@v1"]), modules_hash(["a@v2"]));
        assert_ne!(
            modules_hash(["a@v1"]),
            modules_hash(["a@v1 => fork.example/a@v1.0.1"])
        );
        let mut t = TrustedComment {
            timestamp: 1,
            build_key: "k",
            caddy_version: "v2.8.4",
            modules_sha256: "m",
            replacements: &[],
            file: "caddy",
            sha256: "s",
        };
        assert_eq!(
            t.to_string(),
            "timestamp:1 file:caddy build:k caddy:v2.8.4 modules:m sha256:s"
        );
        let r = ["a=>b@v1".to_owned(), "c=>d@v2".to_owned()];
        t.replacements = &r;
        assert_eq!(
            t.to_string(),
            "timestamp:1 file:caddy build:k caddy:v2.8.4 modules:m replace:a=>b@v1,c=>d@v2 sha256:s"
        );
        assert_eq!(checksum_file("ab", "caddy"), "ab  caddy\n");
    }
}
