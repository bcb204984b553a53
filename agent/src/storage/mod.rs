//! The object store behind a repository URL: `file:///path` or `s3://bucket/prefix`.
//!
//! Owns atomic, durable writes and the mapping of errors to what an operator can
//! act on. Knows nothing about PostgreSQL: keys are opaque relative paths, and
//! the layout of a repository lives in [`crate::catalog`].

mod local_fs;
mod s3;
pub mod sealed;
#[cfg(feature = "fault-injection")]
pub mod unreliable;

pub use local_fs::LocalFs;
pub use s3::{PART_SIZE as S3_PART_SIZE, S3Options, S3Store};

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncRead;

/// The embedded default repository.
pub const DEFAULT_REPO: &str = "file:///wal_archive";

/// A key relative to the repository root: `/`-separated, no `..`, no leading `/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// Validates a relative key.
    ///
    /// # Errors
    /// An empty key, an absolute key, or one with an empty, `.` or `..` component.
    pub fn new(key: impl Into<String>) -> Result<Self, StorageError> {
        let key = key.into();
        let valid = !key.is_empty()
            && key
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if valid {
            Ok(ObjectKey(key))
        } else {
            Err(StorageError::InvalidKey(key))
        }
    }

    /// The key as a string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last path component.
    #[must_use]
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed repository URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoUrl {
    /// A directory on a local or mounted filesystem.
    File(PathBuf),
    /// A bucket and key prefix on an S3-compatible store.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix without leading or trailing `/`; may be empty.
        prefix: String,
    },
}

impl RepoUrl {
    /// Parses `file:///path` or `s3://bucket[/prefix]`.
    ///
    /// # Errors
    /// Anything else, with the accepted forms in the message.
    pub fn parse(raw: &str) -> Result<Self, StorageError> {
        let bad = |why: &str| StorageError::InvalidUrl {
            url: raw.to_owned(),
            reason: why.to_owned(),
        };
        let url = url::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
        if !url.username().is_empty() || url.password().is_some() {
            // Never repeated: the URL travels into restore_command, process
            // arguments and postgresql.auto.conf, which later backups store.
            let mut shown = url.clone();
            let _ = shown.set_username("");
            let _ = shown.set_password(None);
            return Err(StorageError::InvalidUrl {
                url: shown.to_string(),
                reason: "credentials do not belong in the repository URL (they would be copied \
                         into restore_command and every later backup); remove them and set \
                         AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a web \
                         identity (IRSA) instead"
                    .to_owned(),
            });
        }
        match url.scheme() {
            "file" => {
                if !matches!(url.host_str(), None | Some("" | "localhost")) {
                    return Err(bad("a file URL needs three slashes and an absolute path"));
                }
                let path = url
                    .to_file_path()
                    .map_err(|()| bad("not an absolute path"))?;
                if path.parent().is_none() {
                    return Err(bad("refusing to use / as a repository"));
                }
                Ok(RepoUrl::File(path))
            }
            "s3" => {
                let bucket = url.host_str().unwrap_or_default().to_owned();
                let valid_bucket = (3..=63).contains(&bucket.len())
                    && bucket.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b)
                    })
                    && !bucket.starts_with(['-', '.'])
                    && !bucket.ends_with(['-', '.']);
                if !valid_bucket {
                    return Err(bad(
                        "the bucket name must be 3-63 lowercase letters, digits, '-' or '.'",
                    ));
                }
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(bad("query strings and fragments are not supported"));
                }
                let prefix = url.path().trim_matches('/').to_owned();
                // Check the raw text: the URL parser silently resolves dot segments.
                let raw_path = raw
                    .trim_start_matches("s3://")
                    .split_once('/')
                    .map_or("", |(_, p)| p);
                if raw_path.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
                    return Err(bad("the prefix must not contain '.', '..' or empty parts"));
                }
                Ok(RepoUrl::S3 { bucket, prefix })
            }
            other => Err(bad(&format!("unsupported scheme {other:?}"))),
        }
    }
}

/// Checks an S3 endpoint URL: `http` or `https`, a host, no credentials
/// (they would be repeated in every message that names the endpoint).
///
/// # Errors
/// [`StorageError::InvalidEndpoint`], never repeating credentials.
pub fn check_endpoint(endpoint: &str) -> Result<(), StorageError> {
    let bad = |shown: &str, reason: &str| StorageError::InvalidEndpoint {
        endpoint: shown.to_owned(),
        reason: reason.to_owned(),
    };
    let url = match url::Url::parse(endpoint) {
        Ok(url) => url,
        Err(_) if !endpoint.contains("://") => {
            return Err(bad(endpoint, "no scheme (http:// or https://)"));
        }
        Err(e) => return Err(bad(endpoint, &e.to_string())),
    };
    if !url.username().is_empty() || url.password().is_some() {
        let mut shown = url.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        return Err(bad(
            shown.as_str(),
            "credentials do not belong in the endpoint; set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or IRSA) instead",
        ));
    }
    if !matches!(url.scheme(), "http" | "https") {
        // `127.0.0.1:9000` parses as scheme "127.0.0.1".
        return Err(bad(endpoint, "the scheme must be http:// or https://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad(endpoint, "no host"));
    }
    Ok(())
}

impl fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoUrl::File(path) => write!(f, "file://{}", path.display()),
            RepoUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RepoUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Whether a write may replace an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace whatever is there.
    Overwrite,
    /// Fail with [`StorageError::AlreadyExists`] if the key exists.
    CreateOnly,
}

/// S3 Object Lock's retention modes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum LockMode {
    /// Users with `s3:BypassGovernanceRetention` can still delete early.
    Governance,
    /// Nobody can delete early, not even the account's root user.
    Compliance,
}

/// What `head` and `list` report about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: ObjectKey,
    /// Its size in bytes.
    pub size: u64,
    /// When it was written, if the store says.
    pub modified: Option<std::time::SystemTime>,
}

/// A storage failure, classified so that callers decide on retries and messages.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The repository URL cannot be used.
    #[error(
        "invalid repository URL {url:?}: {reason}; use file:///absolute/path or s3://bucket/prefix"
    )]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A key that is not a clean relative path.
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    /// No object under that key.
    #[error("{0} does not exist")]
    NotFound(String),
    /// A create-only write found the key taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// Credentials or permissions refused the operation.
    #[error("access denied to {location}: {detail}; {hint}")]
    AccessDenied {
        /// The path or URL.
        location: String,
        /// What the store said.
        detail: String,
        /// What to check.
        hint: &'static str,
    },
    /// `--s3-endpoint` is not a usable URL.
    #[error(
        "--s3-endpoint (PITR_S3_ENDPOINT) {endpoint:?}: {reason}; give the store's URL with its \
         scheme, such as http://minio:9000 or https://s3.example.com"
    )]
    InvalidEndpoint {
        /// The endpoint, without any credentials it carried.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// No credentials could be found: permanent until someone sets them.
    #[error(
        "no S3 credentials for {location}: tried the environment \
         (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), the profile (AWS_PROFILE, ~/.aws), a web \
         identity (IRSA: AWS_ROLE_ARN, AWS_WEB_IDENTITY_TOKEN_FILE) and the instance metadata \
         service; set one of them (and PITR_S3_ENDPOINT for a store that is not AWS). The SDK \
         said: {detail}"
    )]
    NoCredentials {
        /// The object.
        location: String,
        /// The credential chain's last word.
        detail: String,
    },
    /// The bucket does not exist.
    #[error("bucket {bucket:?} does not exist at {endpoint}; create it or fix the repository URL")]
    NoSuchBucket {
        /// The bucket.
        bucket: String,
        /// The endpoint that said so.
        endpoint: String,
    },
    /// The store could not be reached, after retries.
    #[error(
        "cannot reach the object store at {endpoint} for {location}: {detail}; \
         check PITR_S3_ENDPOINT, the network and the store's health"
    )]
    Unreachable {
        /// The endpoint tried.
        endpoint: String,
        /// The path or URL.
        location: String,
        /// The transport error.
        detail: String,
    },
    /// A `file://` repository's directory is missing: a write never creates
    /// it (only `pitr-agent init` does), so that an unmounted volume is an
    /// error instead of a new archive in the container's own filesystem.
    #[error(
        "the repository directory {0} does not exist: run `pitr-agent init` to create it, or \
         check that the volume is mounted and PITR_REPO names it"
    )]
    NoRoot(String),
    /// An encrypted object cannot be written or read with the keys given.
    #[error("{location}: {detail}")]
    Sealed {
        /// The object.
        location: String,
        /// What is wrong and what to do.
        detail: String,
    },
    /// The filesystem is full.
    #[error(
        "no space left on the device holding {0}; nothing was stored (the partial file was \
         removed): free space or grow the volume"
    )]
    NoSpace(String),
    /// Any other local I/O failure.
    #[error("{op} {location}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        location: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Any other object-store failure.
    #[error("{op} {location}: {detail}")]
    Remote {
        /// What was being done.
        op: &'static str,
        /// The URL.
        location: String,
        /// What the store said.
        detail: String,
    },
}

impl StorageError {
    /// Whether retrying the same call cannot help.
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        !matches!(
            self,
            StorageError::Unreachable { .. } | StorageError::Remote { .. }
        )
    }

    /// Whether this says the object does not exist.
    #[must_use]
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound(_))
    }
}

/// A boxed reader, for streaming uploads.
pub type BoxReader = Box<dyn AsyncRead + Send + Unpin>;

/// The repository's object store.
#[derive(Debug, Clone)]
pub enum Storage {
    /// `file://`
    Local(LocalFs),
    /// `s3://`
    S3(S3Store),
    /// `file://` behind injected faults (tests; see [`unreliable`]).
    #[cfg(feature = "fault-injection")]
    Unreliable(std::sync::Arc<unreliable::Unreliable>),
    /// Another store whose data objects are encrypted (see [`sealed`]).
    Sealed(std::sync::Arc<sealed::Sealed>),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Storage::Local($s) => $call,
            Storage::S3($s) => $call,
            #[cfg(feature = "fault-injection")]
            Storage::Unreliable($s) => $call,
            Storage::Sealed($s) => $call,
        }
    };
}

impl Storage {
    /// Opens the store a URL names. S3 settings come from `options`.
    ///
    /// # Errors
    /// The local directory cannot be created, or the S3 client cannot be configured.
    pub async fn open(url: &RepoUrl, options: &S3Options) -> Result<Self, StorageError> {
        match url {
            #[cfg(feature = "fault-injection")]
            RepoUrl::File(path) if std::env::var_os(unreliable::FAULTS_ENV).is_some() => {
                let spec = std::env::var(unreliable::FAULTS_ENV).unwrap_or_default();
                let mut plan = unreliable::FaultPlan::parse(&spec).map_err(|reason| {
                    StorageError::InvalidUrl {
                        url: url.to_string(),
                        reason,
                    }
                })?;
                plan.seed ^= u64::from(std::process::id());
                let inner = LocalFs::open(path.clone()).await?;
                Ok(Storage::Unreliable(std::sync::Arc::new(
                    unreliable::Unreliable::new(inner, plan),
                )))
            }
            RepoUrl::File(path) => Ok(Storage::Local(LocalFs::open(path.clone()).await?)),
            RepoUrl::S3 { bucket, prefix } => Ok(Storage::S3(
                S3Store::connect(bucket.clone(), prefix.clone(), options).await,
            )),
        }
    }

    /// Which server this store talks to: `file` for a local directory, the
    /// S3 endpoint otherwise. The same `s3://bucket/prefix` on two endpoints
    /// is two repositories.
    #[must_use]
    pub fn endpoint(&self) -> &str {
        match self {
            Storage::Local(_) => "file",
            Storage::S3(s) => s.endpoint(),
            #[cfg(feature = "fault-injection")]
            Storage::Unreliable(_) => "file",
            Storage::Sealed(s) => s.inner().endpoint(),
        }
    }

    /// Where `key` lives, as a URL, for messages.
    #[must_use]
    pub fn location(&self, key: &ObjectKey) -> String {
        dispatch!(self, s => s.location(key))
    }

    /// Stores `body` under `key` durably: the call returns only once the object
    /// would survive a crash, and a reader never sees a partial object.
    ///
    /// A create-only write that finds the key holding exactly `body` succeeds:
    /// S3 can apply a write and still fail the answer (a 500 after the write,
    /// a reset connection), and the retry then finds its own object.
    ///
    /// # Errors
    /// [`StorageError::AlreadyExists`] for a key taken by other content in
    /// [`PutMode::CreateOnly`]; otherwise as classified by the backend.
    pub async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        mode: PutMode,
    ) -> Result<(), StorageError> {
        if let Storage::Sealed(s) = self {
            return s.put(key, body, mode).await;
        }
        match dispatch!(self, s => s.put(key, body.clone(), mode).await) {
            Err(StorageError::AlreadyExists(location)) if mode == PutMode::CreateOnly => {
                match self.get(key).await {
                    Ok(stored) if stored == body => {
                        tracing::debug!(%location, "create-only write found identical content");
                        Ok(())
                    }
                    Ok(_) => Err(StorageError::AlreadyExists(location)),
                    Err(e) => Err(e),
                }
            }
            other => other,
        }
    }

    /// Streams `reader` into `key` with bounded memory, atomically; returns the size.
    /// On S3 this is a multipart upload once the data outgrows one part; a failed
    /// upload is aborted and leaves nothing behind.
    ///
    /// # Errors
    /// As classified by the backend; a read error from `reader` aborts the upload.
    pub async fn put_stream(
        &self,
        key: &ObjectKey,
        reader: BoxReader,
    ) -> Result<u64, StorageError> {
        dispatch!(self, s => s.put_stream(key, reader).await)
    }

    /// Reads a whole object.
    ///
    /// # Errors
    /// [`StorageError::NotFound`] when missing; otherwise as classified by the backend.
    pub async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError> {
        dispatch!(self, s => s.get(key).await)
    }

    /// Reads up to `len` bytes from the start of an object.
    ///
    /// # Errors
    /// [`StorageError::NotFound`] when missing; otherwise as classified by the backend.
    pub async fn get_prefix(&self, key: &ObjectKey, len: u64) -> Result<Bytes, StorageError> {
        dispatch!(self, s => s.get_prefix(key, len).await)
    }

    /// The object's metadata, or `None` if it does not exist.
    ///
    /// # Errors
    /// As classified by the backend.
    pub async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>, StorageError> {
        dispatch!(self, s => s.head(key).await)
    }

    /// Every object whose key starts with `prefix`, sorted by key.
    ///
    /// # Errors
    /// As classified by the backend.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let mut objects = dispatch!(self, s => s.list(prefix).await)?;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    /// Streams a whole object, for objects too big to hold in memory.
    ///
    /// # Errors
    /// [`StorageError::NotFound`] when missing; otherwise as classified by the
    /// backend. Failures after the first byte surface as read errors.
    pub async fn get_stream(&self, key: &ObjectKey) -> Result<BoxReader, StorageError> {
        dispatch!(self, s => s.get_stream(key).await)
    }

    /// Deletes every object under `prefix` (which must end in `/`), including
    /// what an interrupted upload left: local temp files, unfinished S3
    /// multipart uploads.
    ///
    /// # Errors
    /// [`StorageError::InvalidKey`] for a prefix not ending in `/`; otherwise as
    /// classified by the backend.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        if !prefix.ends_with('/') || ObjectKey::new(prefix.trim_end_matches('/')).is_err() {
            return Err(StorageError::InvalidKey(prefix.to_owned()));
        }
        dispatch!(self, s => s.delete_prefix(prefix).await)
    }

    /// Creates the repository's root: the directory of a `file://`
    /// repository (and its missing parents, durably). For S3, checks that
    /// the bucket answers; buckets are never created.
    ///
    /// # Errors
    /// The directory cannot be created; the bucket is missing or refuses.
    pub async fn create_root(&self) -> Result<(), StorageError> {
        match self {
            Storage::Local(s) => s.create_root().await,
            Storage::S3(s) => s.head_bucket().await,
            #[cfg(feature = "fault-injection")]
            Storage::Unreliable(s) => s.inner().create_root().await,
            Storage::Sealed(s) => Box::pin(s.inner().create_root()).await,
        }
    }

    /// Removes the temp files of writes that never finished (a process
    /// killed between creating its temp file and renaming it) once they are
    /// older than `older_than`; returns how many. Only `file://` has them:
    /// an S3 PUT is all or nothing, and unfinished multipart uploads are
    /// aborted with the backup they belong to.
    ///
    /// # Errors
    /// A directory cannot be read or a file removed.
    pub async fn remove_stale_temp_files(
        &self,
        older_than: Duration,
    ) -> Result<usize, StorageError> {
        match self {
            Storage::Local(s) => s.remove_stale_temp_files(older_than).await,
            Storage::S3(_) => Ok(0),
            #[cfg(feature = "fault-injection")]
            Storage::Unreliable(s) => s.inner().remove_stale_temp_files(older_than).await,
            Storage::Sealed(s) => Box::pin(s.inner().remove_stale_temp_files(older_than)).await,
        }
    }

    /// Until when S3 Object Lock keeps the object at `key`; `None` when it
    /// is not locked, or the store has no locks (`file://`).
    ///
    /// # Errors
    /// As classified by the backend.
    pub async fn locked_until(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<std::time::SystemTime>, StorageError> {
        match self.backend() {
            Storage::S3(s) => s.locked_until(key).await,
            _ => Ok(None),
        }
    }

    /// `init --object-lock`: S3 locks every new object for `days`.
    ///
    /// # Errors
    /// Not S3, or a bucket created without Object Lock.
    pub async fn set_default_retention(
        &self,
        mode: LockMode,
        days: u32,
    ) -> Result<(), StorageError> {
        match self.backend() {
            Storage::S3(s) => s.set_default_retention(mode, days).await,
            _ => Err(StorageError::InvalidUrl {
                url: "file://".to_owned(),
                reason: "Object Lock is an S3 feature; for file://, see docs/security.md"
                    .to_owned(),
            }),
        }
    }

    /// The store underneath any encryption: what decides local or S3 behaviour.
    #[must_use]
    pub fn backend(&self) -> &Storage {
        match self {
            Storage::Sealed(s) => s.inner().backend(),
            other => other,
        }
    }

    /// The keys, when the repository's data objects are encrypted.
    #[must_use]
    pub fn keys(&self) -> Option<&sealed::Keys> {
        match self {
            Storage::Sealed(s) => Some(s.keys()),
            _ => None,
        }
    }

    /// What the clear stanza of an encrypted object says (its digests and
    /// recipients); `None` for a store that does not encrypt, or an object
    /// without one.
    ///
    /// # Errors
    /// As classified by the backend.
    pub async fn seal_tag(&self, key: &ObjectKey) -> Result<Option<sealed::SealTag>, StorageError> {
        match self {
            Storage::Sealed(s) => s.tag(key).await,
            _ => Ok(None),
        }
    }

    /// Deletes an object; deleting a missing object succeeds.
    ///
    /// # Errors
    /// As classified by the backend.
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        dispatch!(self, s => s.delete(key).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_urls() {
        assert_eq!(
            RepoUrl::parse(DEFAULT_REPO).expect("default parses"),
            RepoUrl::File(PathBuf::from("/wal_archive"))
        );
        assert_eq!(
            RepoUrl::parse("file://localhost/var/lib/archive/").expect("localhost ok"),
            RepoUrl::File(PathBuf::from("/var/lib/archive/"))
        );
        for bad in [
            "file://wal_archive",
            "file:///",
            "/wal_archive",
            "wal_archive",
            "",
        ] {
            assert!(RepoUrl::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_s3_urls() {
        assert_eq!(
            RepoUrl::parse("s3://my-bucket/clusters/odoo/").expect("valid"),
            RepoUrl::S3 {
                bucket: "my-bucket".into(),
                prefix: "clusters/odoo".into()
            }
        );
        assert_eq!(
            RepoUrl::parse("s3://bkt").expect("valid").to_string(),
            "s3://bkt"
        );
        for bad in [
            "s3://",
            "s3://AB/x",
            "s3://a/x",
            "s3://-bucket/x",
            "s3://bucket/a/../b",
            "s3://bucket/a//b",
            "s3://bucket/x?versionId=1",
            "gs://bucket/x",
            "http://bucket/x",
        ] {
            assert!(RepoUrl::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn credentials_in_the_url_are_refused_and_never_repeated() {
        for url in [
            "s3://AKIAKEY:s3cr3t-marker@bucket/p",
            "s3://AKIAKEY@bucket/p",
        ] {
            let msg = RepoUrl::parse(url).expect_err("credentials").to_string();
            assert!(msg.contains("AWS_ACCESS_KEY_ID"), "{msg}");
            assert!(
                !msg.contains("s3cr3t-marker") && !msg.contains("AKIAKEY"),
                "{msg}"
            );
        }
    }

    #[test]
    fn endpoints_need_a_scheme_and_no_credentials() {
        check_endpoint("http://minio:9000").expect("valid");
        check_endpoint("https://s3.example.com").expect("valid");
        for (bad, says) in [
            ("127.0.0.1:9000", "http://"),
            ("minio:9000", "http://"),
            ("ftp://x", "http://"),
            ("http://KEY:s3cr3t-marker@minio:9000", "credentials"),
        ] {
            let msg = check_endpoint(bad).expect_err(bad).to_string();
            assert!(msg.contains(says) && msg.contains("--s3-endpoint"), "{msg}");
            assert!(
                !msg.contains("s3cr3t-marker") && !msg.contains("KEY:"),
                "{msg}"
            );
        }
    }

    #[test]
    fn error_names_the_accepted_forms() {
        let err = RepoUrl::parse("gs://bucket").expect_err("unsupported");
        let msg = err.to_string();
        assert!(
            msg.contains("gs://bucket") && msg.contains("s3://bucket/prefix"),
            "{msg}"
        );
    }

    #[test]
    fn keys_must_be_clean_and_relative() {
        assert_eq!(
            ObjectKey::new("wal/000000010000000000000001.gz")
                .expect("valid")
                .file_name(),
            "000000010000000000000001.gz"
        );
        for bad in ["", "/wal/x", "wal//x", "wal/../x", "./x", "x/"] {
            assert!(ObjectKey::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
