//! Artifact storage: one interface, two backends.
//!
//! - `fs`: a directory (a local disk or NFS). Writes go to a temporary file in the target
//!   directory, are fsynced and renamed into place, so a reader sees the old object or the
//!   whole new one, never a part.
//! - `s3`: any S3-compatible service through `aws-sdk-s3` (endpoint, region, bucket, prefix,
//!   path-style addressing, static credentials or the SDK's default chain). Large files go up
//!   as multipart uploads, part by part from the file; the SDK retries each request with
//!   exponential backoff and jitter.
//!
//! Reads stream in pieces (constant memory whatever the size) and take an optional byte
//! range. Keys are relative slash-separated paths of `[A-Za-z0-9._-]` segments.

mod fs;
mod s3;

use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use cbs_config::{StorageBackend, StorageConfig};
use futures::{Stream, TryStreamExt};

/// A body being read.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Size of the pieces reads are streamed in.
pub const READ_CHUNK: usize = 256 * 1024;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("no object {0}")]
    NotFound(String),
    #[error("invalid object key {key:?}: {why}")]
    BadKey { key: String, why: &'static str },
    /// Unreachable, timed out, or a server error: trying again later may work.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Anything else (permissions, a missing bucket, a full disk).
    #[error("storage error: {0}")]
    Failed(String),
}

impl StorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound(_))
    }
}

impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> Self {
        StorageError::Failed(e.to_string())
    }
}

/// An object being read: its total size, the byte range being sent (first byte, length),
/// and the bytes of that range.
pub struct Object {
    pub size: u64,
    pub start: u64,
    pub len: u64,
    pub body: ByteStream,
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Object")
            .field("size", &self.size)
            .field("start", &self.start)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Object {
    /// Reads the whole (range of the) object into memory; for small objects only.
    pub async fn bytes(self, limit: u64) -> Result<Bytes, StorageError> {
        if self.len > limit {
            return Err(StorageError::Failed(format!(
                "object of {} bytes is larger than {limit}",
                self.len
            )));
        }
        let mut out = Vec::with_capacity(self.len as usize);
        let mut body = self.body;
        while let Some(chunk) = body.try_next().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out.into())
    }
}

/// One object of a [`Storage::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub modified: std::time::SystemTime,
}

/// The configured backend; cheap to clone.
#[derive(Debug, Clone)]
pub enum Storage {
    Fs(fs::FsStorage),
    S3(s3::S3Storage),
}

/// Checks that `key` is a safe relative path.
pub fn check_key(key: &str) -> Result<(), StorageError> {
    let bad = |why| {
        Err(StorageError::BadKey {
            key: key.to_owned(),
            why,
        })
    };
    if key.is_empty() || key.len() > 512 {
        return bad("must be 1 to 512 bytes");
    }
    for seg in key.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return bad("empty, '.' or '..' segment");
        }
        if seg.starts_with('.') {
            return bad("a segment may not start with '.'");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad("only A-Z a-z 0-9 . _ - and '/' are allowed");
        }
    }
    Ok(())
}

/// Records an operation's latency and whether it failed (a missing object is an answer, not
/// a failure) in the process's metrics.
async fn timed<T>(
    backend: &'static str,
    op: &'static str,
    f: impl std::future::Future<Output = Result<T, StorageError>>,
) -> Result<T, StorageError> {
    let start = std::time::Instant::now();
    // Boxed: the S3 SDK's futures are large (clippy::large_futures).
    let r = Box::pin(f).await;
    let ok = match &r {
        Ok(_) => true,
        Err(e) => e.is_not_found(),
    };
    cbs_metrics::metrics().storage_op(backend, op, start.elapsed(), ok);
    r
}

impl Storage {
    fn backend(&self) -> &'static str {
        match self {
            Storage::Fs(_) => "fs",
            Storage::S3(_) => "s3",
        }
    }

    /// Sets up the configured backend (the fs backend creates its directory; the s3 backend
    /// makes no request until used).
    pub async fn connect(config: &StorageConfig) -> Result<Storage, StorageError> {
        match config.backend {
            StorageBackend::Fs => Ok(Storage::Fs(fs::FsStorage::new(&config.dir).await?)),
            StorageBackend::S3 => Ok(Storage::S3(s3::S3Storage::new(&config.s3).await?)),
        }
    }

    /// Where objects go, for logs (no credentials).
    pub fn describe(&self) -> String {
        match self {
            Storage::Fs(s) => s.describe(),
            Storage::S3(s) => s.describe(),
        }
    }

    /// Stores the file at `path` as `key`, replacing any object there; returns its size.
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        check_key(key)?;
        timed(self.backend(), "put", async {
            match self {
                Storage::Fs(s) => s.put_file(key, path).await,
                Storage::S3(s) => s.put_file(key, path).await,
            }
        })
        .await
    }

    /// Stores a small object held in memory.
    pub async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        check_key(key)?;
        timed(self.backend(), "put", async {
            match self {
                Storage::Fs(s) => s.put_bytes(key, data).await,
                Storage::S3(s) => s.put_bytes(key, data).await,
            }
        })
        .await
    }

    /// Stores a small object unless one is already there (whatever its contents): `true`
    /// if this call stored it. Never replaces an object, also when two writers race.
    pub async fn put_bytes_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        check_key(key)?;
        timed(self.backend(), "put", async {
            match self {
                Storage::Fs(s) => s.put_bytes_if_absent(key, data).await,
                Storage::S3(s) => s.put_bytes_if_absent(key, data).await,
            }
        })
        .await
    }

    /// Every object under `prefix/`, with its size and when it was last written.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        check_key(prefix)?;
        timed(self.backend(), "list", async {
            match self {
                Storage::Fs(s) => s.list(prefix).await,
                Storage::S3(s) => s.list(prefix).await,
            }
        })
        .await
    }

    /// Opens `key` for reading, all of it or `range` = (first byte, length). The range must
    /// lie within the object (the caller knows the size from the build's event); a range
    /// beyond the end is an error.
    pub async fn get(&self, key: &str, range: Option<(u64, u64)>) -> Result<Object, StorageError> {
        check_key(key)?;
        timed(self.backend(), "get", async {
            match self {
                Storage::Fs(s) => s.get(key, range).await,
                Storage::S3(s) => s.get(key, range).await,
            }
        })
        .await
    }

    /// The object's size, or `None` if there is none.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        check_key(key)?;
        timed(self.backend(), "head", async {
            match self {
                Storage::Fs(s) => s.head(key).await,
                Storage::S3(s) => s.head(key).await,
            }
        })
        .await
    }

    /// Deletes every object under `prefix/`; returns how many there were.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        check_key(prefix)?;
        timed(self.backend(), "delete", async {
            match self {
                Storage::Fs(s) => s.delete_prefix(prefix).await,
                Storage::S3(s) => s.delete_prefix(prefix).await,
            }
        })
        .await
    }

    /// A URL that lets anyone GET the object for `ttl`, downloading it as `filename`;
    /// `None` for backends without presigning (fs).
    pub async fn presign_get(
        &self,
        key: &str,
        ttl: Duration,
        filename: &str,
    ) -> Result<Option<String>, StorageError> {
        check_key(key)?;
        match self {
            Storage::Fs(_) => Ok(None),
            Storage::S3(s) => timed("s3", "presign", s.presign_get(key, ttl, filename))
                .await
                .map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_key;

    #[test]
    fn keys() {
        for ok in [
            "builds/ab/abcd/1/caddy",
            "a",
            "x/caddy.exe.minisig",
            "p_q-r",
        ] {
            assert!(check_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/../b",
            "..",
            "a/.hidden",
            "a/b c",
            "a\\b",
            "ä",
            "a/",
        ] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
    }
}
