//! The directory backend.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::{Object, StorageError, READ_CHUNK};

#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
}

fn not_found_or(key: &str, e: std::io::Error) -> StorageError {
    if e.kind() == std::io::ErrorKind::NotFound {
        StorageError::NotFound(key.to_owned())
    } else {
        StorageError::Failed(format!("{key}: {e}"))
    }
}

impl FsStorage {
    pub async fn new(root: &Path) -> Result<FsStorage, StorageError> {
        tokio::fs::create_dir_all(root)
            .await
            .map_err(|e| StorageError::Failed(format!("cannot create {}: {e}", root.display())))?;
        Ok(FsStorage {
            root: root.to_owned(),
        })
    }

    pub fn describe(&self) -> String {
        format!("directory {}", self.root.display())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Writes through a temporary file beside the target, fsyncs it, renames it into place
    /// and fsyncs the directory.
    async fn publish<F, Fut>(&self, key: &str, write: F) -> Result<u64, StorageError>
    where
        F: FnOnce(tokio::fs::File) -> Fut,
        Fut: std::future::Future<Output = std::io::Result<u64>>,
    {
        let target = self.path(key);
        let dir = target.parent().expect("a key has a file name").to_owned();
        let name = target
            .file_name()
            .expect("a key has a file name")
            .to_string_lossy()
            .into_owned();
        let fail = |e: std::io::Error| StorageError::Failed(format!("{key}: {e}"));
        tokio::fs::create_dir_all(&dir).await.map_err(fail)?;
        // Starts with '.': never a valid key, so never mistaken for an object.
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        let result = async {
            let file = tokio::fs::File::create(&tmp).await?;
            let size = write(file).await?;
            tokio::fs::rename(&tmp, &target).await?;
            // The rename itself must survive a crash.
            tokio::fs::File::open(&dir).await?.sync_all().await?;
            Ok::<_, std::io::Error>(size)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result.map_err(fail)
    }

    pub async fn put_file(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        let mut src = tokio::fs::File::open(path)
            .await
            .map_err(|e| StorageError::Failed(format!("{}: {e}", path.display())))?;
        self.publish(key, |mut dst| async move {
            let size = tokio::io::copy(&mut src, &mut dst).await?;
            dst.sync_all().await?;
            Ok(size)
        })
        .await
    }

    pub async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        self.publish(key, |mut dst| async move {
            dst.write_all(&data).await?;
            dst.sync_all().await?;
            Ok(data.len() as u64)
        })
        .await
        .map(|_| ())
    }

    /// Written beside the target, then hard-linked into place: a link never replaces.
    pub async fn put_bytes_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        let target = self.path(key);
        let fail = |e: std::io::Error| StorageError::Failed(format!("{key}: {e}"));
        if tokio::fs::symlink_metadata(&target).await.is_ok() {
            return Ok(false);
        }
        let dir = target.parent().expect("a key has a file name").to_owned();
        tokio::fs::create_dir_all(&dir).await.map_err(fail)?;
        let tmp = dir.join(format!(".new.{:016x}.tmp", rand::random::<u64>()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            file.write_all(&data).await?;
            file.sync_all().await?;
            let linked = match tokio::fs::hard_link(&tmp, &target).await {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(e),
            };
            if linked {
                tokio::fs::File::open(&dir).await?.sync_all().await?;
            }
            Ok(linked)
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        result.map_err(fail)
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<crate::Listed>, StorageError> {
        let root = self.root.clone();
        let dir = self.path(prefix);
        let prefix = prefix.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            match list_files(&root, &dir, &mut out) {
                Ok(()) => Ok(out),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(StorageError::Failed(format!("list {prefix}: {e}"))),
            }
        })
        .await
        .map_err(|e| StorageError::Failed(e.to_string()))?
    }

    pub async fn get(&self, key: &str, range: Option<(u64, u64)>) -> Result<Object, StorageError> {
        let mut file = tokio::fs::File::open(self.path(key))
            .await
            .map_err(|e| not_found_or(key, e))?;
        let meta = file.metadata().await.map_err(|e| not_found_or(key, e))?;
        if !meta.is_file() {
            return Err(StorageError::NotFound(key.to_owned()));
        }
        let size = meta.len();
        let (start, len) = range.unwrap_or((0, size));
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(StorageError::Failed(format!(
                "range {start}+{len} is outside {key} ({size} bytes)"
            )));
        }
        if start > 0 {
            file.seek(SeekFrom::Start(start))
                .await
                .map_err(|e| not_found_or(key, e))?;
        }
        let body = tokio_util::io::ReaderStream::with_capacity(file.take(len), READ_CHUNK);
        Ok(Object {
            size,
            start,
            len,
            body: Box::pin(body),
        })
    }

    pub async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        match tokio::fs::metadata(self.path(key)).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::Failed(format!("{key}: {e}"))),
        }
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        let path = self.path(prefix);
        let fail = |e: std::io::Error| StorageError::Failed(format!("{prefix}: {e}"));
        let meta = match tokio::fs::symlink_metadata(&path).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(fail(e)),
        };
        if !meta.is_dir() {
            tokio::fs::remove_file(&path).await.map_err(fail)?;
            return Ok(1);
        }
        let count = tokio::task::spawn_blocking({
            let path = path.clone();
            move || count_files(&path)
        })
        .await
        .map_err(|e| StorageError::Failed(e.to_string()))?
        .map_err(fail)?;
        tokio::fs::remove_dir_all(&path).await.map_err(fail)?;
        Ok(count)
    }
}

/// Every file under `dir` (not the temporary ones, whose names start with '.'), as keys
/// relative to `root`.
fn list_files(root: &Path, dir: &Path, out: &mut Vec<crate::Listed>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let t = entry.file_type()?;
        if t.is_dir() {
            list_files(root, &entry.path(), out)?;
        } else if t.is_file() {
            let meta = entry.metadata()?;
            let path = entry.path();
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            out.push(crate::Listed {
                key: rel.to_string_lossy().into_owned(),
                size: meta.len(),
                modified: meta.modified()?,
            });
        }
    }
    Ok(())
}

fn count_files(dir: &Path) -> std::io::Result<u64> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let t = entry.file_type()?;
        if t.is_dir() {
            n += count_files(&entry.path())?;
        } else if !entry.file_name().to_string_lossy().starts_with('.') {
            n += 1;
        }
    }
    Ok(n)
}
