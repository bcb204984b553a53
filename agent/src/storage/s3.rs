//! `s3://` repositories on any S3-compatible store (AWS, MinIO, DigitalOcean Spaces, Ceph).
//!
//! Credentials come from the standard AWS chain (environment, profile, web
//! identity / IRSA). Every call has bounded timeouts and retries with backoff.
//! Uploads send `Content-MD5`, which every S3-compatible store checks, instead
//! of the newer flexible checksums that several of them reject.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesOrdered, StreamExt};
use md5::{Digest, Md5};
use tokio::io::AsyncReadExt;

use super::{BoxReader, LockMode, ObjectKey, ObjectMeta, PutMode, StorageError};

/// Part size for multipart uploads; S3's minimum is 5 MiB.
pub const PART_SIZE: usize = 8 << 20;
/// Parts uploaded at once; memory is bounded by `PART_SIZE * (PARTS_IN_FLIGHT + 1)`.
const PARTS_IN_FLIGHT: usize = 2;

/// How to reach an S3-compatible store.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Endpoint URL for non-AWS stores, e.g. `http://minio:9000`.
    pub endpoint: Option<String>,
    /// Region; defaults to `AWS_REGION`, then `us-east-1`.
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` rather than `bucket.endpoint`.
    pub force_path_style: bool,
    /// Timeout to open a connection.
    pub connect_timeout: Option<Duration>,
    /// Timeout for one attempt of one call.
    pub attempt_timeout: Option<Duration>,
    /// Attempts per call, including the first.
    pub max_attempts: Option<u32>,
}

/// An S3 bucket and key prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    endpoint: String,
}

impl S3Store {
    /// Builds a client from the AWS credential chain and `options`.
    pub async fn connect(bucket: String, prefix: String, options: &S3Options) -> Self {
        let region = options
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_owned());
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new(region.clone()))
            .load()
            .await;
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(options.connect_timeout.unwrap_or(Duration::from_secs(5)))
            .operation_attempt_timeout(options.attempt_timeout.unwrap_or(Duration::from_secs(60)))
            .build();
        let retries = RetryConfig::standard()
            .with_max_attempts(options.max_attempts.unwrap_or(4))
            .with_initial_backoff(Duration::from_millis(200))
            .with_max_backoff(Duration::from_secs(5));
        let mut config = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(options.force_path_style)
            .timeout_config(timeouts)
            .retry_config(retries)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        let endpoint = match &options.endpoint {
            Some(url) => {
                config = config.endpoint_url(url);
                url.clone()
            }
            None => format!("AWS S3 ({region})"),
        };
        S3Store {
            client: Client::from_conf(config.build()),
            bucket,
            prefix,
            endpoint,
        }
    }

    /// The endpoint URL, or `AWS S3 (<region>)`.
    pub(super) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    pub(super) fn location(&self, key: &ObjectKey) -> String {
        format!("s3://{}/{}", self.bucket, self.full_key(key.as_str()))
    }

    fn classify<E>(&self, op: &'static str, location: String, err: SdkError<E>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(op, location, &self.endpoint, &self.bucket, err)
    }

    pub(super) async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        mode: PutMode,
    ) -> Result<(), StorageError> {
        let location = self.location(key);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key.as_str()))
            .content_md5(content_md5(&body))
            .body(ByteStream::from(body));
        if mode == PutMode::CreateOnly {
            // Honoured by AWS and recent MinIO/Ceph; stores that ignore it fall
            // back to the caller's compare-after-write.
            req = req.if_none_match("*");
        }
        match req.send().await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.classify("upload", location, e)),
        }
    }

    pub(super) async fn put_stream(
        &self,
        key: &ObjectKey,
        mut reader: BoxReader,
    ) -> Result<u64, StorageError> {
        let location = self.location(key);
        let first = read_part(&mut reader, &location).await?;
        if first.len() < PART_SIZE {
            let size = first.len() as u64;
            self.put(key, first, PutMode::Overwrite).await?;
            return Ok(size);
        }
        let full_key = self.full_key(key.as_str());
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .send()
            .await
            .map_err(|e| self.classify("start multipart upload of", location.clone(), e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let result = self
            .upload_parts(&full_key, &upload_id, first, &mut reader, &location)
            .await;
        match result {
            Ok((parts, size, md5s)) => {
                let completed = CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build();
                let done = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(&full_key)
                    .upload_id(&upload_id)
                    .multipart_upload(completed)
                    .send()
                    .await;
                match done {
                    Ok(_) => Ok(size),
                    Err(e) => {
                        let err = self.classify("complete multipart upload of", location, e);
                        // S3 can complete the upload and still fail the answer;
                        // the SDK's retry then hears NoSuchUpload. If the object
                        // is there with our size and multipart ETag, it is ours.
                        if self.completed(&full_key, size, &md5s).await {
                            tracing::debug!(
                                key = full_key,
                                "multipart upload completed despite the error"
                            );
                            return Ok(size);
                        }
                        self.abort(&full_key, &upload_id).await;
                        Err(err)
                    }
                }
            }
            Err(e) => {
                self.abort(&full_key, &upload_id).await;
                Err(e)
            }
        }
    }

    /// Whether `full_key` holds the object a multipart upload of these parts
    /// creates: the same size and, where the store uses S3's multipart ETag
    /// (the MD5 of the parts' MD5s, `-` the part count), the same ETag.
    async fn completed(&self, full_key: &str, size: u64, md5s: &[[u8; 16]]) -> bool {
        let Ok(head) = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full_key)
            .send()
            .await
        else {
            return false;
        };
        if u64::try_from(head.content_length().unwrap_or(-1)).ok() != Some(size) {
            return false;
        }
        let mut all = Md5::new();
        for m in md5s {
            all.update(m);
        }
        let expected = format!("{}-{}", hex::encode(all.finalize()), md5s.len());
        match head.e_tag().map(|t| t.trim_matches('"')) {
            Some(tag) if tag.contains('-') => tag == expected,
            _ => true,
        }
    }

    async fn upload_parts(
        &self,
        full_key: &str,
        upload_id: &str,
        first: Bytes,
        reader: &mut BoxReader,
        location: &str,
    ) -> Result<(Vec<CompletedPart>, u64, Vec<[u8; 16]>), StorageError> {
        let mut md5s = Vec::new();
        let mut parts = Vec::new();
        let mut in_flight = FuturesOrdered::new();
        let mut next = Some(first);
        let mut number = 0i32;
        let mut size = 0u64;
        while let Some(body) = next.take() {
            number += 1;
            size += body.len() as u64;
            let last = body.len() < PART_SIZE;
            let digest: [u8; 16] = Md5::digest(&body).into();
            md5s.push(digest);
            let req = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full_key)
                .upload_id(upload_id)
                .part_number(number)
                .content_md5(base64::engine::general_purpose::STANDARD.encode(digest))
                .body(ByteStream::from(body));
            in_flight.push_back(async move { (number, req.send().await) });
            if in_flight.len() > PARTS_IN_FLIGHT {
                parts.push(self.finish_part(in_flight.next().await, location)?);
            }
            if !last {
                let body = read_part(reader, location).await?;
                if !body.is_empty() {
                    next = Some(body);
                }
            }
        }
        while let Some(done) = in_flight.next().await {
            parts.push(self.finish_part(Some(done), location)?);
        }
        Ok((parts, size, md5s))
    }

    fn finish_part<E>(
        &self,
        done: Option<(
            i32,
            Result<aws_sdk_s3::operation::upload_part::UploadPartOutput, SdkError<E>>,
        )>,
        location: &str,
    ) -> Result<CompletedPart, StorageError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let (number, result) = done.expect("a part is in flight");
        let out = result.map_err(|e| self.classify("upload part of", location.to_owned(), e))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .build())
    }

    async fn abort(&self, full_key: &str, upload_id: &str) {
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(full_key)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = aborted {
            tracing::warn!(
                key = full_key,
                upload_id,
                error = %DisplayErrorContext(&e),
                "could not abort a failed multipart upload; a lifecycle rule for incomplete \
                 uploads will remove it"
            );
        }
    }

    pub(super) async fn get_stream(&self, key: &ObjectKey) -> Result<BoxReader, StorageError> {
        let body = self.get_object(key, None).await?;
        Ok(Box::new(body.into_async_read()))
    }

    pub(super) async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        for object in self.list(prefix).await? {
            self.delete(&object.key).await?;
        }
        // An upload killed midway leaves an invisible multipart upload that
        // still costs storage until it is aborted.
        let full_prefix = self.full_key(prefix);
        let location = format!("s3://{}/{full_prefix}", self.bucket);
        // One page holds at most 1000 uploads: follow the markers.
        let mut markers: (Option<String>, Option<String>) = (None, None);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_key_marker(markers.0.clone())
                .set_upload_id_marker(markers.1.clone())
                .send()
                .await;
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(
                        location,
                        error = %DisplayErrorContext(&e),
                        "could not list unfinished multipart uploads; a lifecycle rule for \
                         incomplete uploads will remove them"
                    );
                    break;
                }
            };
            for upload in page.uploads() {
                if let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) {
                    self.abort(key, id).await;
                }
            }
            let next = (
                page.next_key_marker().map(str::to_owned),
                page.next_upload_id_marker().map(str::to_owned),
            );
            // Stop at the last page, and on a store that does not advance.
            if page.is_truncated() != Some(true) || next.0.is_none() || next == markers {
                break;
            }
            markers = next;
        }
        Ok(())
    }

    pub(super) async fn head_bucket(&self) -> Result<(), StorageError> {
        let location = format!("s3://{}", self.bucket);
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => Err(match self.classify("inspect bucket", location, e) {
                StorageError::NotFound(_) => StorageError::NoSuchBucket {
                    bucket: self.bucket.clone(),
                    endpoint: self.endpoint.clone(),
                },
                other => other,
            }),
        }
    }

    pub(super) async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError> {
        self.get_range(key, None).await
    }

    pub(super) async fn get_prefix(
        &self,
        key: &ObjectKey,
        len: u64,
    ) -> Result<Bytes, StorageError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.get_range(key, Some(format!("bytes=0-{}", len - 1)))
            .await
    }

    async fn get_range(
        &self,
        key: &ObjectKey,
        range: Option<String>,
    ) -> Result<Bytes, StorageError> {
        let body = self.get_object(key, range).await?;
        let body = body
            .collect()
            .await
            .map_err(|e| StorageError::Unreachable {
                endpoint: self.endpoint.clone(),
                location: self.location(key),
                detail: format!("download interrupted: {e}"),
            })?;
        Ok(body.into_bytes())
    }

    /// Starts a download; the body streams from the returned handle.
    async fn get_object(
        &self,
        key: &ObjectKey,
        range: Option<String>,
    ) -> Result<ByteStream, StorageError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key.as_str()))
            .set_range(range)
            .send()
            .await
            .map_err(|e| self.classify("download", self.location(key), e))?;
        Ok(out.body)
    }

    pub(super) async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>, StorageError> {
        let location = self.location(key);
        let result = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key.as_str()))
            .send()
            .await;
        match result {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.clone(),
                size: u64::try_from(out.content_length().unwrap_or(0)).unwrap_or(0),
                modified: out.last_modified().and_then(system_time),
            })),
            Err(e) => match self.classify("inspect", location, e) {
                StorageError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let full_prefix = self.full_key(prefix);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let location = format!("s3://{}/{full_prefix}", self.bucket);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.classify("list", location.clone(), e))?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.get(strip..)) else {
                    continue;
                };
                if let Ok(key) = ObjectKey::new(key) {
                    out.push(ObjectMeta {
                        key,
                        size: u64::try_from(object.size().unwrap_or(0)).unwrap_or(0),
                        modified: object.last_modified().and_then(system_time),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Until when S3 Object Lock keeps `key` (its current version), if it does.
    pub(super) async fn locked_until(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<std::time::SystemTime>, StorageError> {
        let location = self.location(key);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key.as_str()))
            .send()
            .await
        {
            Ok(out) => Ok(out.object_lock_retain_until_date().and_then(system_time)),
            Err(e) => match self.classify("inspect", location, e) {
                StorageError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Sets the bucket's default Object Lock retention, so that S3 locks
    /// every object written from now on, whatever wrote it.
    pub(super) async fn set_default_retention(
        &self,
        mode: LockMode,
        days: u32,
    ) -> Result<(), StorageError> {
        use aws_sdk_s3::types::{
            DefaultRetention, ObjectLockConfiguration, ObjectLockEnabled, ObjectLockRetentionMode,
            ObjectLockRule,
        };
        let location = format!("s3://{}", self.bucket);
        let current = self
            .client
            .get_object_lock_configuration()
            .bucket(&self.bucket)
            .send()
            .await;
        let enabled = current.as_ref().ok().is_some_and(|c| {
            c.object_lock_configuration()
                .and_then(|c| c.object_lock_enabled())
                == Some(&ObjectLockEnabled::Enabled)
        });
        if !enabled {
            return Err(StorageError::Remote {
                op: "enable Object Lock on",
                location,
                detail: "the bucket was not created with Object Lock enabled (S3 turns it on \
                         only at creation, with versioning); create a bucket with \
                         --object-lock-enabled-for-bucket and use it"
                    .to_owned(),
            });
        }
        let wanted_mode = match mode {
            LockMode::Governance => ObjectLockRetentionMode::Governance,
            LockMode::Compliance => ObjectLockRetentionMode::Compliance,
        };
        let already = current.as_ref().ok().is_some_and(|c| {
            c.object_lock_configuration()
                .and_then(|c| c.rule())
                .and_then(|r| r.default_retention())
                .is_some_and(|d| {
                    d.mode() == Some(&wanted_mode)
                        && d.days() == Some(i32::try_from(days).unwrap_or(i32::MAX))
                })
        });
        // Idempotent: init runs at every start of an init container.
        if already {
            return Ok(());
        }
        let retention = DefaultRetention::builder()
            .mode(match mode {
                LockMode::Governance => ObjectLockRetentionMode::Governance,
                LockMode::Compliance => ObjectLockRetentionMode::Compliance,
            })
            .days(i32::try_from(days).unwrap_or(i32::MAX))
            .build();
        let config = ObjectLockConfiguration::builder()
            .object_lock_enabled(ObjectLockEnabled::Enabled)
            .rule(
                ObjectLockRule::builder()
                    .default_retention(retention)
                    .build(),
            )
            .build();
        self.client
            .put_object_lock_configuration()
            .bucket(&self.bucket)
            .object_lock_configuration(config)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify("configure Object Lock on", location, e))
    }

    pub(super) async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        let location = self.location(key);
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key.as_str()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify("delete", location, e))
    }
}

async fn read_part(reader: &mut BoxReader, location: &str) -> Result<Bytes, StorageError> {
    let mut buf = BytesMut::with_capacity(PART_SIZE);
    while buf.len() < PART_SIZE {
        let n = reader
            .read_buf(&mut buf)
            .await
            .map_err(|e| StorageError::Io {
                op: "read the upload source for",
                location: location.to_owned(),
                source: e,
            })?;
        if n == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

/// The messages of an error and its sources, without Debug dumps, deduplicated.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

fn content_md5(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(body))
}

fn classify<E>(
    op: &'static str,
    location: String,
    endpoint: &str,
    bucket: &str,
    err: SdkError<E>,
) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let detail = || error_chain(&err);
    // A missing credential fails before any request is sent; it is not the
    // store being down, and waiting does not fix it.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = source {
        if let Some(c) = e.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
        {
            return StorageError::NoCredentials {
                location,
                detail: error_chain(c),
            };
        }
        source = e.source();
    }
    match &err {
        SdkError::TimeoutError(_) => StorageError::Unreachable {
            endpoint: endpoint.to_owned(),
            location,
            detail: "timed out".to_owned(),
        },
        SdkError::DispatchFailure(d) if d.is_io() || d.is_timeout() => StorageError::Unreachable {
            endpoint: endpoint.to_owned(),
            location,
            detail: detail(),
        },
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code().unwrap_or("");
            let message = service.err().message().unwrap_or("");
            match (status, code) {
                (_, "NoSuchBucket") => StorageError::NoSuchBucket {
                    bucket: bucket.to_owned(),
                    endpoint: endpoint.to_owned(),
                },
                (404, _) | (_, "NoSuchKey" | "NotFound") => StorageError::NotFound(location),
                (412, _) | (_, "PreconditionFailed") => StorageError::AlreadyExists(location),
                (401 | 403, _) => StorageError::AccessDenied {
                    location,
                    detail: format!("{status} {code} {message}").trim().to_owned(),
                    hint: "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the \
                           pod's IAM role (IRSA), and the bucket policy",
                },
                _ if code.is_empty() => StorageError::Remote {
                    op,
                    location,
                    detail: format!("HTTP {status}: {}", detail()),
                },
                _ => StorageError::Remote {
                    op,
                    location,
                    detail: format!("{status} {code} {message}").trim().to_owned(),
                },
            }
        }
        _ => StorageError::Remote {
            op,
            location,
            detail: detail(),
        },
    }
}

fn system_time(t: &aws_sdk_s3::primitives::DateTime) -> Option<std::time::SystemTime> {
    std::time::SystemTime::try_from(*t).ok()
}
