//! The S3 backend.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use cbs_config::S3Config;
use futures::{StreamExt, TryStreamExt};

use crate::{Object, StorageError, READ_CHUNK};

/// Parts of one multipart upload in flight at once.
const PART_CONCURRENCY: usize = 4;
/// S3's smallest part (all but the last).
const MIN_PART: u64 = 5 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct S3Storage {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: u64,
    endpoint: String,
}

/// Classifies an SDK error: 404 is "not found"; timeouts, connection failures, throttling and
/// 5xx may pass; the rest is a failure. Messages carry the error chain, never credentials.
fn classify<E>(
    op: &str,
    key: &str,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let key = &format!("{op} {key}");
    match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            if status == 404 {
                return StorageError::NotFound(key.to_owned());
            }
            let what = format!("{key}: HTTP {status} {}", DisplayErrorContext(se.err()));
            if status >= 500 || status == 429 || status == 408 {
                StorageError::Unavailable(what)
            } else {
                StorageError::Failed(what)
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StorageError::Unavailable(format!("{key}: {}", DisplayErrorContext(&e)))
        }
        _ => StorageError::Failed(format!("{key}: {}", DisplayErrorContext(&e))),
    }
}

impl S3Storage {
    pub async fn new(cfg: &S3Config) -> Result<S3Storage, StorageError> {
        if cfg.bucket.is_empty() {
            return Err(StorageError::Failed(
                "storage.s3.bucket is empty: name the bucket".into(),
            ));
        }
        let region = Region::new(cfg.region.clone());
        let timeouts = aws_sdk_s3::config::timeout::TimeoutConfig::builder()
            .connect_timeout(cfg.connect_timeout)
            .operation_attempt_timeout(cfg.operation_timeout)
            .build();
        let mut b = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(region.clone())
            .force_path_style(cfg.path_style)
            .retry_config(
                aws_sdk_s3::config::retry::RetryConfig::standard()
                    .with_max_attempts(cfg.max_attempts.max(1)),
            )
            .timeout_config(timeouts)
            // Many S3-compatible services reject the SDK's default CRC trailers.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if !cfg.endpoint.is_empty() {
            b = b.endpoint_url(cfg.endpoint.clone());
        }
        if !cfg.access_key_id.is_empty() {
            let secret = cfg
                .secret_access_key
                .as_ref()
                .map(|s| s.expose().clone())
                .unwrap_or_default();
            b = b.credentials_provider(Credentials::new(
                cfg.access_key_id.clone(),
                secret,
                None,
                None,
                "caddy-build-server config",
            ));
        } else {
            let sdk = aws_config::defaults(BehaviorVersion::latest())
                .region(region)
                .load()
                .await;
            if let Some(p) = sdk.credentials_provider() {
                b = b.credentials_provider(p);
            }
        }
        let prefix = cfg.prefix.trim_matches('/');
        Ok(S3Storage {
            client: Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            part_size: cfg.part_size.max(MIN_PART),
            endpoint: cfg.endpoint.clone(),
        })
    }

    pub fn describe(&self) -> String {
        let at = if self.endpoint.is_empty() {
            String::new()
        } else {
            format!(" at {}", self.endpoint)
        };
        format!("s3://{}/{}{at}", self.bucket, self.prefix)
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub async fn put_file(&self, key: &str, path: &Path) -> Result<u64, StorageError> {
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| StorageError::Failed(format!("{}: {e}", path.display())))?
            .len();
        if size < self.part_size {
            let body = ByteStream::from_path(path)
                .await
                .map_err(|e| StorageError::Failed(format!("{}: {e}", path.display())))?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .content_length(size as i64)
                .body(body)
                .send()
                .await
                .map_err(|e| classify("put", key, e))?;
            return Ok(size);
        }
        self.multipart(key, path, size).await?;
        Ok(size)
    }

    async fn multipart(&self, key: &str, path: &Path, size: u64) -> Result<(), StorageError> {
        let full = self.full(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| classify("create multipart upload", key, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StorageError::Failed(format!("{key}: no upload id in the answer")))?
            .to_owned();
        let part = self.part_size;
        let count = size.div_ceil(part);
        let parts = futures::stream::iter(0..count)
            .map(|i| {
                let (full, upload_id) = (full.clone(), upload_id.clone());
                async move {
                    let offset = i * part;
                    let len = part.min(size - offset);
                    let body = ByteStream::read_from()
                        .path(path)
                        .offset(offset)
                        .length(Length::Exact(len))
                        .buffer_size(READ_CHUNK)
                        .build()
                        .await
                        .map_err(|e| StorageError::Failed(format!("{}: {e}", path.display())))?;
                    let number = (i + 1) as i32;
                    let done = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(&full)
                        .upload_id(&upload_id)
                        .part_number(number)
                        .content_length(len as i64)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| classify("upload part", key, e))?;
                    Ok::<_, StorageError>(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(done.e_tag().map(str::to_owned))
                            .build(),
                    )
                }
            })
            .buffered(PART_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await;
        let completed = match parts {
            Ok(parts) => self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| classify("complete multipart upload", key, e)),
            Err(e) => Err(e),
        };
        if let Err(e) = completed {
            // Best effort: parts of an abandoned upload cost storage until aborted (a bucket
            // lifecycle rule for incomplete uploads is the backstop).
            if let Err(abort) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(key, error = %DisplayErrorContext(&abort), "cannot abort a failed multipart upload");
            }
            return Err(e);
        }
        Ok(())
    }

    pub async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        let len = data.len() as i64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .content_length(len)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| classify("put", key, e))?;
        Ok(())
    }

    /// A conditional write (`If-None-Match: *`): S3 answers 412 when the key exists (409
    /// while another conditional write of it is in flight).
    pub async fn put_bytes_if_absent(&self, key: &str, data: Bytes) -> Result<bool, StorageError> {
        let len = data.len() as i64;
        let sent = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .content_length(len)
            .if_none_match("*")
            .body(ByteStream::from(data))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(se)) if matches!(se.raw().status().as_u16(), 409 | 412) => {
                Ok(false)
            }
            Err(e) => Err(classify("put", key, e)),
        }
    }

    pub async fn list(&self, prefix: &str) -> Result<Vec<crate::Listed>, StorageError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}/", self.full(prefix)))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("list", prefix, e))?;
            for o in page.contents() {
                let Some(key) = o.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                let modified = o
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok())
                    .unwrap_or(std::time::UNIX_EPOCH);
                out.push(crate::Listed {
                    key: key.to_owned(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified,
                });
            }
        }
        Ok(out)
    }

    pub async fn get(&self, key: &str, range: Option<(u64, u64)>) -> Result<Object, StorageError> {
        if let Some((start, 0)) = range {
            // HTTP ranges cannot say "nothing"; answer from the size alone.
            let size = self
                .head(key)
                .await?
                .ok_or_else(|| StorageError::NotFound(key.to_owned()))?;
            if start > size {
                return Err(StorageError::Failed(format!(
                    "range {start}+0 is outside {key} ({size} bytes)"
                )));
            }
            return Ok(Object {
                size,
                start,
                len: 0,
                body: Box::pin(futures::stream::empty()),
            });
        }
        let resp = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .set_range(range.map(|(s, l)| format!("bytes={s}-{}", s + l - 1)))
            .send()
            .await
            .map_err(|e| match classify("get", key, e) {
                // 416: the range starts beyond the end.
                StorageError::Failed(m) if m.contains("HTTP 416") => {
                    StorageError::Failed(format!("range outside the object: {m}"))
                }
                other => other,
            })?;
        let len = resp.content_length().unwrap_or(0).max(0) as u64;
        let (start, size) = match (range, resp.content_range()) {
            (Some((s, _)), Some(cr)) => {
                let total = cr
                    .rsplit_once('/')
                    .and_then(|(_, t)| t.parse::<u64>().ok())
                    .ok_or_else(|| {
                        StorageError::Failed(format!("{key}: bad Content-Range {cr:?}"))
                    })?;
                (s, total)
            }
            (Some((s, l)), None) if s == 0 && l == len => (0, len),
            (Some(_), None) => {
                return Err(StorageError::Failed(format!(
                    "{key}: the server ignored the range"
                )))
            }
            (None, _) => (0, len),
        };
        if let Some((_, l)) = range {
            if l != len {
                return Err(StorageError::Failed(format!(
                    "range outside the object: asked {l} bytes of {key}, got {len}"
                )));
            }
        }
        let reader = resp.body.into_async_read();
        let body = tokio_util::io::ReaderStream::with_capacity(reader, READ_CHUNK);
        Ok(Object {
            size,
            start,
            len,
            body: Box::pin(body),
        })
    }

    pub async fn head(&self, key: &str) -> Result<Option<u64>, StorageError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .send()
            .await
        {
            Ok(h) => Ok(Some(h.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) => match classify("head", key, e) {
                StorageError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64, StorageError> {
        let mut deleted = 0;
        // The prefix itself, if it is an object.
        if self.head(prefix).await?.is_some() {
            self.delete(prefix, &self.full(prefix)).await?;
            deleted += 1;
        }
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}/", self.full(prefix)))
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("list", prefix, e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        for k in keys {
            self.delete(prefix, &k).await?;
            deleted += 1;
        }
        Ok(deleted)
    }

    async fn delete(&self, what: &str, full: &str) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(|e| classify("delete", what, e))?;
        Ok(())
    }

    pub async fn presign_get(
        &self,
        key: &str,
        ttl: Duration,
        filename: &str,
    ) -> Result<String, StorageError> {
        let cfg = PresigningConfig::expires_in(ttl)
            .map_err(|e| StorageError::Failed(format!("presign ttl: {e}")))?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full(key))
            .response_content_disposition(format!("attachment; filename={filename}"))
            .response_content_type("application/octet-stream")
            .presigned(cfg)
            .await
            .map_err(|e| classify("presign", key, e))?;
        Ok(req.uri().to_owned())
    }
}
