//! `wal-push` and `wal-fetch`: PostgreSQL's `archive_command` and `restore_command`.
//!
//! Push: a WAL file is compressed and stored create-only; the call returns only
//! once it is durable. While pushing the file PostgreSQL asked for, the next
//! `.ready` files are pushed in parallel, and each one that becomes durable gets
//! a marker in the spool (`archived/<name>`, holding its SHA-256 and the
//! repository). When PostgreSQL later asks for that file, the marker is trusted
//! only if the file still hashes the same and the repository is the same.
//!
//! Fetch: the file is decompressed, verified and renamed into place. A detached
//! prefetcher keeps the next segments decompressed in the spool (`prefetch/`),
//! so replay does not wait on one download at a time.
//!
//! Knows the storage API and the catalog's keys; not how objects are stored.
//!
//! - [`push`]: `wal-push`, its memory budget and parallel push-ahead;
//! - [`markers`]: the spool's record of files pushed ahead;
//! - [`fetch`]: `wal-fetch`, its retries and verified writes;
//! - [`spool`]: the prefetch spool and its prefetcher.

mod download;
mod fetch;
mod markers;
mod push;
mod spool;
pub mod summary;

pub use fetch::{FetchConfig, FetchOutcome, PrefetchRequest, wal_fetch, wal_fetch_retrying};
pub use push::{PushConfig, PushOutcome, wal_push};
pub(crate) use push::{header_digest_of, store_compressed};
pub use spool::{clear_spool_after_recovery, prefetch};

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::catalog::OwnerError;
use crate::compress::{GzipError, Sha256Digest};
use crate::storage::StorageError;
use crate::wal::{self, WalFileName};
/// Default number of files one `wal-push` call may push at once.
pub const DEFAULT_ARCHIVE_PARALLEL: usize = 4;
/// Default number of segments `wal-fetch` keeps prefetched.
pub const DEFAULT_PREFETCH: usize = 8;
/// What one `wal-push` call holds in memory at once, raw and compressed
/// bytes together, in segments, whatever `--parallel` says.
pub const IN_FLIGHT_SEGMENTS: u64 = 4;
/// Downloads the prefetcher runs at once.
const PREFETCH_CONCURRENCY: usize = 4;

/// The spool directory's default name, beside the WAL file (normally in `pg_wal`).
pub const SPOOL_DIR_NAME: &str = "pitr_spool";

/// The spool: `configured` (`PITR_SPOOL`), else `pitr_spool` in `wal_dir`.
fn spool_dir(configured: Option<&Path>, wal_dir: &Path) -> PathBuf {
    configured.map_or_else(|| wal_dir.join(SPOOL_DIR_NAME), Path::to_path_buf)
}

/// A failure of `wal-push` or `wal-fetch`, with what to do in the message.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The file name is not a WAL file name.
    #[error("{cause}")]
    NotWalFile {
        /// The path given.
        path: String,
        /// Why.
        cause: wal::WalNameError,
    },
    /// The WAL file to push cannot be read.
    #[error("cannot read {path}: {cause}; {hint}")]
    ReadSource {
        /// The path.
        path: String,
        /// Why.
        cause: io::Error,
        /// What to check.
        hint: &'static str,
    },
    /// A segment whose size does not match its header.
    #[error(
        "{path} is {len} bytes, but its header says segments are {expected} bytes; \
         refusing to archive an incomplete segment"
    )]
    Truncated {
        /// The path.
        path: String,
        /// Actual length.
        len: u64,
        /// Length from the header.
        expected: u32,
    },
    /// `global/pg_control` cannot be read.
    #[error(
        "cannot read the cluster identity from {path}: {cause}; run wal-push from the data \
         directory (as archive_command does) or set --pgdata / PGDATA"
    )]
    PgControl {
        /// The pg_control path.
        path: String,
        /// Why.
        cause: io::Error,
    },
    /// A segment that was written by another cluster.
    #[error(
        "{path} was written by the cluster with system identifier {segment}, but this data \
         directory's is {cluster}; refusing to archive it"
    )]
    ForeignSegment {
        /// The path.
        path: String,
        /// From the segment header.
        segment: u64,
        /// From pg_control.
        cluster: u64,
    },
    /// The repository already holds different content under this name.
    #[error(
        "{location} already holds a different {name} (stored sha256 {stored}, local sha256 \
         {local}); refusing to overwrite archived WAL: two clusters may share this repository, \
         or this cluster was restored without a new timeline; check PITR_REPO before anything \
         else"
    )]
    Conflict {
        /// The WAL file.
        name: String,
        /// Where it is stored.
        location: String,
        /// Digest of the stored content.
        stored: Sha256Digest,
        /// Digest of the local file.
        local: Sha256Digest,
    },
    /// The repository belongs to another cluster.
    #[error(transparent)]
    Owner(#[from] OwnerError),
    /// The requested WAL file is not in the repository (normal at the end of recovery).
    #[error("{name} is not in the repository ({location})")]
    NotInRepository {
        /// The WAL file.
        name: String,
        /// Where it was looked for.
        location: String,
    },
    /// A stored object does not decompress to what was stored.
    #[error(
        "{location}: {cause}; the stored copy is damaged: restore it from another copy or take a new base backup"
    )]
    Corrupt {
        /// The object.
        location: String,
        /// What is wrong.
        cause: GzipError,
    },
    /// The destination cannot be written.
    #[error("cannot write {path}: {cause}; {hint}")]
    WriteDest {
        /// The path.
        path: String,
        /// Why.
        cause: io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// The object store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ArchiveError {
    /// Whether this is the quiet "not in the repository" answer to `restore_command`.
    #[must_use]
    pub fn is_not_in_repository(&self) -> bool {
        matches!(self, ArchiveError::NotInRepository { .. })
    }

    /// Whether the same call may succeed later: the store timed out, dropped
    /// the connection or answered 5xx. Corrupt objects, refused credentials
    /// and full disks are not transient.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            ArchiveError::Storage(e) | ArchiveError::Owner(OwnerError::Storage(e)) => {
                !e.is_permanent()
            }
            _ => false,
        }
    }
}

/// `wal-fetch`'s exit status when the repository answered that the file does
/// not exist: PostgreSQL reads it as the end of the archive.
pub const FETCH_EXIT_NOT_FOUND: u8 = 1;

/// `wal-fetch`'s exit status for every other failure. PostgreSQL reads any
/// status from 1 to 125 as "not found", ends recovery there and promotes,
/// forking a timeline that lacks committed transactions; only a signal or a
/// status above 125 makes it stop with FATAL. 126 and 127 mean "not
/// executable" and "not found" to the shell and to PostgreSQL's log, so 128.
pub const FETCH_EXIT_FATAL: u8 = 128;

/// How long `wal-fetch` retries a transient failure before giving up
/// (`PITR_FETCH_RETRY_FOR`).
pub const DEFAULT_FETCH_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(300);

/// fsyncs the directory holding `path`.
fn sync_dir(path: &Path) -> io::Result<()> {
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// The segment size recorded in the first page of the WAL segment at `path`.
fn segment_size_of(path: &Path) -> Option<u32> {
    let mut buf = [0u8; 40];
    std::fs::File::open(path).ok()?.read_exact(&mut buf).ok()?;
    wal::segment_header(&buf).map(|h| h.segment_size)
}

fn wal_name_of_path(path: &Path) -> Result<WalFileName, ArchiveError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    file_name
        .parse()
        .map_err(|source| ArchiveError::NotWalFile {
            path: path.display().to_string(),
            cause: source,
        })
}

fn join_error(path: &Path, e: tokio::task::JoinError) -> ArchiveError {
    ArchiveError::ReadSource {
        path: path.display().to_string(),
        cause: io::Error::other(e.to_string()),
        hint: "an internal task failed; report this as a bug",
    }
}
