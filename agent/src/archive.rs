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

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::catalog::{self, OwnerError};
use crate::compress::{self, GzipError, Sha256Digest};
use crate::pgdata;
use crate::repository::Repository;
use crate::storage::{PutMode, Storage, StorageError};
use crate::wal::{self, WalFileKind, WalFileName};

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

/// [`wal_fetch`], retrying transient failures with exponential backoff for at
/// most `retry_for`. Each retry is logged with its cause.
///
/// # Errors
/// As [`wal_fetch`]: the last error once `retry_for` has passed, or the first
/// one that retrying cannot fix.
pub async fn wal_fetch_retrying(
    repo: &Repository,
    name: &str,
    dest: &Path,
    cfg: &FetchConfig,
    retry_for: std::time::Duration,
) -> Result<(FetchOutcome, Option<PrefetchRequest>), ArchiveError> {
    let started = std::time::Instant::now();
    let mut backoff = std::time::Duration::from_millis(250);
    loop {
        match wal_fetch(repo, name, dest, cfg).await {
            Err(e) if e.is_transient() && started.elapsed() + backoff <= retry_for => {
                tracing::warn!(
                    file = name,
                    error = %e,
                    retry_in = ?backoff,
                    "wal-fetch failed; retrying (PITR_FETCH_RETRY_FOR bounds this)"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(15));
            }
            other => return other,
        }
    }
}

/// Settings for `wal-push`.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// The data directory (for `global/pg_control`).
    pub pgdata: PathBuf,
    /// Where markers live; by default `pitr_spool` beside the WAL file.
    pub spool: Option<PathBuf>,
    /// Create the repository if it does not exist (`PITR_INIT=auto`).
    pub auto_init: bool,
    /// Files pushed at once, the requested one included.
    pub parallel: usize,
    /// gzip level, 1-9.
    pub level: u32,
}

/// What happened to the file PostgreSQL asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Compressed and stored now.
    Stored,
    /// The repository already held identical content.
    AlreadyArchived,
    /// An earlier call pushed it in parallel and it is still identical.
    PushedEarlier,
}

/// Archives the WAL file at `path` (PostgreSQL's `%p`).
///
/// # Errors
/// See [`ArchiveError`]; on any error nothing is reported archived.
pub async fn wal_push(
    repo: &Repository,
    path: &Path,
    cfg: &PushConfig,
) -> Result<PushOutcome, ArchiveError> {
    let name = wal_name_of_path(path)?;
    let cluster =
        pgdata::system_identifier(&cfg.pgdata).map_err(|source| ArchiveError::PgControl {
            path: cfg.pgdata.join("global/pg_control").display().to_string(),
            cause: source,
        })?;
    let wal_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let spool = cfg
        .spool
        .clone()
        .unwrap_or_else(|| wal_dir.join(SPOOL_DIR_NAME));
    repo.claim(cluster, &spool.join("repository-owner"), cfg.auto_init)
        .await?;

    // Markers name the repository by endpoint, URL and owning cluster: the
    // same URL on another endpoint, or a repository replaced at the same
    // URL, never inherits them.
    let markers = Arc::new(Markers::new(
        spool.join("archived"),
        &repo.identity(Some(&cluster.to_string())),
    ));
    // Decide first whether the requested file still needs compressing, so
    // that the cores are split between the files that really do.
    let done_earlier = markers.take_if_current(&name, path).is_some();
    // A marker is a hint, not proof: confirm the object exists (one HEAD).
    let done_earlier = done_earlier && repo.storage.head(&repo.wal(&name)).await?.is_some();
    let ahead = if cfg.parallel > 1 {
        ready_neighbours(&wal_dir, &name, cfg.parallel - 1, &markers)
    } else {
        Vec::new()
    };
    // The memory budget lets IN_FLIGHT_SEGMENTS / 2 segments compress at
    // once (each counts raw plus worst-case gzip); split the cores between those.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let busy = (ahead.len() + usize::from(!done_earlier)).min(IN_FLIGHT_SEGMENTS as usize / 2);
    let compression = Compression {
        level: cfg.level,
        threads: (cores / busy.max(1)).max(1),
    };
    let segment_size =
        segment_size_of(path).map_or(u64::from(wal::DEFAULT_SEGMENT_SIZE), u64::from);
    let budget = MemoryBudget::new(segment_size);
    // The requested file's share first: the files ahead wait for the rest.
    let own = if done_earlier {
        None
    } else {
        Some(budget.acquire_for(path).await)
    };
    let mut neighbours = JoinSet::new();
    for next in ahead {
        let (repo, markers, budget) = (repo.clone(), Arc::clone(&markers), budget.clone());
        let file = wal_dir.join(next.as_str());
        neighbours.spawn(async move {
            let permit = budget.acquire_for(&file).await;
            match push_file(&repo, &next, &file, cluster, compression, &budget, permit).await {
                Ok((_, digest)) => markers.record(&next, digest),
                Err(e) => tracing::warn!(file = %next, error = %e, "parallel push failed; PostgreSQL will retry it"),
            }
        });
    }

    let outcome = match own {
        None => Ok(PushOutcome::PushedEarlier),
        Some(permit) => push_file(repo, &name, path, cluster, compression, &budget, permit)
            .await
            .map(|(o, _)| o),
    };
    while neighbours.join_next().await.is_some() {}
    markers.forget_archived(&wal_dir);
    // The first push after a promotion empties what the restore's prefetcher left.
    clear_spool_after_recovery(&cfg.pgdata, &spool);
    outcome
}

/// The `.ready` files after `name` that have no marker yet, at most `n`.
fn ready_neighbours(
    wal_dir: &Path,
    name: &WalFileName,
    n: usize,
    markers: &Markers,
) -> Vec<WalFileName> {
    let Ok(ready) = pgdata::ready_files(wal_dir) else {
        return Vec::new();
    };
    ready
        .into_iter()
        .filter(|r| r != name && r.kind() != WalFileKind::TimelineHistory && !markers.exists(r))
        .filter(|r| wal_dir.join(r.as_str()).is_file())
        .take(n)
        .collect()
}

/// The bytes of WAL a `wal-push` call may hold in memory: a file being
/// compressed counts twice its size (raw, and the worst case of its gzip),
/// a file being uploaded counts its compressed size.
#[derive(Debug, Clone)]
struct MemoryBudget {
    permits: Arc<Semaphore>,
    total: u32,
}

impl MemoryBudget {
    /// A permit is 64 KiB, so that 4 x 1 GiB segments fit a `u32`.
    const UNIT: u64 = 64 * 1024;

    fn new(segment_size: u64) -> Self {
        let total = u32::try_from((IN_FLIGHT_SEGMENTS * segment_size).div_ceil(Self::UNIT))
            .unwrap_or(u32::MAX)
            .max(1);
        MemoryBudget {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Waits until the file at `path` may be compressed: its size, twice
    /// (raw, and gzip's worst case of stored blocks beside it).
    async fn acquire_for(&self, path: &Path) -> OwnedSemaphorePermit {
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        self.acquire(size * 2 + Self::UNIT).await
    }

    fn units(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(Self::UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total)
    }

    async fn acquire(&self, bytes: u64) -> OwnedSemaphorePermit {
        Arc::clone(&self.permits)
            .acquire_many_owned(self.units(bytes))
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Keeps only what `bytes` needs of `permit`, releasing the rest.
    fn shrink(&self, permit: &mut OwnedSemaphorePermit, bytes: u64) {
        let keep = self.units(bytes) as usize;
        if permit.num_permits() > keep {
            drop(permit.split(permit.num_permits() - keep));
        }
    }
}

/// How to compress one file.
#[derive(Debug, Clone, Copy)]
struct Compression {
    level: u32,
    threads: usize,
}

async fn push_file(
    repo: &Repository,
    name: &WalFileName,
    path: &Path,
    cluster: u64,
    compression: Compression,
    budget: &MemoryBudget,
    mut permit: OwnedSemaphorePermit,
) -> Result<(PushOutcome, Sha256Digest), ArchiveError> {
    let (raw, digest, gz) = {
        let (file, file_name) = (path.to_path_buf(), name.clone());
        tokio::task::spawn_blocking(move || -> Result<_, ArchiveError> {
            let raw = read_wal_file(&file, &file_name, cluster)?;
            let digest = Sha256Digest::of(&raw);
            let gz = compress::gzip_parallel(
                &raw,
                file_name.as_str(),
                digest,
                compression.level,
                compression.threads,
            );
            Ok((raw.len(), digest, gz))
        })
        .await
        .map_err(|e| join_error(path, e))??
    };
    budget.shrink(&mut permit, gz.len() as u64);
    let key = catalog::wal_key(name);
    let location = repo.storage.location(&key);
    tracing::debug!(file = %name, raw, stored = gz.len(), "pushing");
    // Look first: stores that ignore If-None-Match must never be overwritten.
    if repo.storage.head(&key).await?.is_none() {
        match repo
            .storage
            .put(&key, Bytes::from(gz), PutMode::CreateOnly)
            .await
        {
            Ok(()) => return Ok((PushOutcome::Stored, digest)),
            Err(StorageError::AlreadyExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let stored = stored_digest(&repo.storage, &key).await?;
    if stored == digest {
        Ok((PushOutcome::AlreadyArchived, digest))
    } else {
        Err(ArchiveError::Conflict {
            name: name.to_string(),
            location,
            stored,
            local: digest,
        })
    }
}

/// The digest of a stored WAL object: from its header, or by decompressing it
/// when another tool wrote it.
async fn stored_digest(
    storage: &Storage,
    key: &crate::storage::ObjectKey,
) -> Result<Sha256Digest, ArchiveError> {
    let head = storage.get_prefix(key, compress::HEADER_PROBE_LEN).await?;
    if let Some(digest) = compress::header_digest(&head) {
        return Ok(digest);
    }
    let body = storage.get(key).await?;
    let location = storage.location(key);
    tokio::task::spawn_blocking(move || compress::gunzip_verified(&body, io::sink()))
        .await
        .map_err(|e| join_error(Path::new(&location), e))?
        .map(|(digest, _)| digest)
        .map_err(|source| ArchiveError::Corrupt {
            location: storage.location(key),
            cause: source,
        })
}

fn read_wal_file(path: &Path, name: &WalFileName, cluster: u64) -> Result<Vec<u8>, ArchiveError> {
    let raw = std::fs::read(path).map_err(|source| {
        let hint = match source.kind() {
            io::ErrorKind::NotFound => {
                "archive_command must be 'pitr-agent wal-push %p', run by PostgreSQL in the data directory"
            }
            io::ErrorKind::PermissionDenied => "run pitr-agent as the user that owns the data directory",
            _ => "check the data directory's volume",
        };
        ArchiveError::ReadSource {
            path: path.display().to_string(),
            cause: source,
            hint,
        }
    })?;
    if name.kind() == WalFileKind::Segment {
        let header = wal::segment_header(&raw);
        if let Some(h) = header {
            if raw.len() as u64 != u64::from(h.segment_size) {
                return Err(ArchiveError::Truncated {
                    path: path.display().to_string(),
                    len: raw.len() as u64,
                    expected: h.segment_size,
                });
            }
            if h.system_identifier != cluster {
                return Err(ArchiveError::ForeignSegment {
                    path: path.display().to_string(),
                    segment: h.system_identifier,
                    cluster,
                });
            }
        }
    }
    Ok(raw)
}

/// Spool markers for files pushed ahead of PostgreSQL's request.
struct Markers {
    dir: PathBuf,
    repo_url: String,
}

impl Markers {
    fn new(dir: PathBuf, repo_url: &str) -> Self {
        Markers {
            dir,
            repo_url: repo_url.to_owned(),
        }
    }

    fn exists(&self, name: &WalFileName) -> bool {
        self.dir.join(name.as_str()).exists()
    }

    /// Records that `name` with `digest` is durable in the repository. Written
    /// only after the object is durable; losing a marker only costs a re-push.
    fn record(&self, name: &WalFileName, digest: Sha256Digest) {
        let body = format!("{digest}\n{}\n", self.repo_url);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let ok = std::fs::create_dir_all(&self.dir).is_ok()
            && std::fs::write(&tmp, body).is_ok()
            && std::fs::rename(&tmp, self.dir.join(name.as_str())).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Consumes the marker of `name` if it matches the file at `path` now.
    fn take_if_current(&self, name: &WalFileName, path: &Path) -> Option<()> {
        let marker = self.dir.join(name.as_str());
        let body = std::fs::read_to_string(&marker).ok()?;
        let mut lines = body.lines();
        let digest = Sha256Digest::from_hex(lines.next()?)?;
        if lines.next()? != self.repo_url {
            return None;
        }
        let current = Sha256Digest::of(&std::fs::read(path).ok()?);
        let _ = std::fs::remove_file(&marker);
        (current == digest).then_some(())
    }

    /// Removes markers whose file PostgreSQL no longer lists as `.ready`.
    fn forget_archived(&self, wal_dir: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let status = pgdata::archive_status(wal_dir);
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !status.join(format!("{name}.ready")).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Settings for `wal-fetch`.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Where prefetched segments wait; by default `pitr_spool` beside `%p`.
    pub spool: Option<PathBuf>,
    /// How many segments to keep prefetched; 0 disables prefetch.
    pub prefetch: usize,
}

/// Where `wal-fetch` found the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Downloaded now.
    Downloaded,
    /// Taken from the prefetch spool.
    Prefetched,
}

/// What the caller should do after a fetch: start a prefetcher for what follows.
#[derive(Debug, Clone)]
pub struct PrefetchRequest {
    /// The segment just restored.
    pub after: WalFileName,
    /// The cluster's segment size, from the segment header.
    pub segment_size: u32,
    /// The spool directory.
    pub spool: PathBuf,
    /// The data directory being recovered, when `%p` lies in its `pg_wal`:
    /// once its recovery has ended, the prefetcher empties the spool
    /// instead of filling it.
    pub data_dir: Option<PathBuf>,
}

/// Restores WAL file `name` (PostgreSQL's `%f`) to `dest` (`%p`), atomically.
///
/// # Errors
/// [`ArchiveError::NotInRepository`] when the file does not exist, which
/// PostgreSQL expects at the end of the archive; other variants are real failures.
pub async fn wal_fetch(
    repo: &Repository,
    name: &str,
    dest: &Path,
    cfg: &FetchConfig,
) -> Result<(FetchOutcome, Option<PrefetchRequest>), ArchiveError> {
    let name: WalFileName = name.parse().map_err(|source| ArchiveError::NotWalFile {
        path: name.to_owned(),
        cause: source,
    })?;
    let dest_dir = dest.parent().unwrap_or(Path::new(".")).to_path_buf();
    let spool = cfg
        .spool
        .clone()
        .unwrap_or_else(|| dest_dir.join(SPOOL_DIR_NAME));
    let owner = repo.owner().await?;
    let identity = repo.identity(owner.system_identifier.as_deref());
    let prefetch_dir = (cfg.prefetch > 0)
        .then(|| PrefetchDir::open(&spool, &identity))
        .flatten();

    let spooled = prefetch_dir.as_ref().and_then(|p| p.take(&name, dest));
    let outcome = if spooled == Some(true) {
        FetchOutcome::Prefetched
    } else {
        download_to(repo, &name, dest).await?;
        FetchOutcome::Downloaded
    };
    let request = (cfg.prefetch > 0 && name.kind() == WalFileKind::Segment)
        .then(|| segment_size_of(dest))
        .flatten()
        .map(|segment_size| PrefetchRequest {
            after: name,
            segment_size,
            spool,
            data_dir: data_dir_of(&dest_dir),
        });
    Ok((outcome, request))
}

/// The data directory holding `wal_dir`, if `wal_dir` is its `pg_wal`
/// (PostgreSQL runs `restore_command` in the data directory, with `%p`
/// relative to it).
fn data_dir_of(wal_dir: &Path) -> Option<PathBuf> {
    if wal_dir.file_name()? != "pg_wal" {
        return None;
    }
    match wal_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => std::path::absolute(p).ok(),
        _ => std::env::current_dir().ok(),
    }
}

/// Removes the prefetch spool if the recovery it served has ended: after
/// promotion nothing will take those files, and nothing else removes them.
/// Returns whether recovery has ended.
pub fn clear_spool_after_recovery(data_dir: &Path, spool: &Path) -> bool {
    if !pgdata::recovery_ended(data_dir) {
        return false;
    }
    let dir = spool.join("prefetch");
    if std::fs::remove_dir_all(&dir).is_ok() {
        tracing::info!(spool = %dir.display(), "recovery has ended: emptied the prefetch spool");
    }
    true
}

/// Fills the spool with the `count` segments after `req.after`, unless another
/// prefetcher holds the spool's lock. Errors are logged, never returned: the
/// foreground `wal-fetch` downloads anything that is missing.
pub async fn prefetch(repo: &Repository, req: &PrefetchRequest, count: usize) {
    let recovery_ended = || {
        req.data_dir
            .as_deref()
            .is_some_and(|d| clear_spool_after_recovery(d, &req.spool))
    };
    if recovery_ended() {
        return;
    }
    let Ok(owner) = repo.owner().await else {
        return;
    };
    let Some(dir) = PrefetchDir::open(
        &req.spool,
        &repo.identity(owner.system_identifier.as_deref()),
    ) else {
        return;
    };
    let Ok(lock) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.dir.join(".lock"))
    else {
        return;
    };
    if lock.try_lock().is_err() {
        return;
    }
    let mut window = Vec::with_capacity(count);
    let mut next = req.after.next_segment(req.segment_size);
    while let Some(name) = next.filter(|_| window.len() < count) {
        next = name.next_segment(req.segment_size);
        window.push(name);
    }
    dir.retain_only(&window);
    let missing: Vec<_> = window
        .into_iter()
        .filter(|n| !dir.dir.join(n.as_str()).exists())
        .collect();
    stream::iter(missing)
        .map(|name| {
            let dest = dir.dir.join(name.as_str());
            async move {
                match download_to(repo, &name, &dest).await {
                    Ok(digest) => PrefetchDir::record_digest(&dest, digest),
                    Err(ArchiveError::NotInRepository { .. }) => {}
                    Err(e) => tracing::warn!(file = %name, error = %e, "prefetch failed"),
                }
            }
        })
        .buffer_unordered(PREFETCH_CONCURRENCY)
        .collect::<()>()
        .await;
    // Recovery may have ended while this ran (the last fetch's prefetcher
    // outlives it): then nothing will take these files.
    recovery_ended();
    drop(lock);
}

/// The spool's `prefetch/` directory, emptied if it holds another repository's files.
struct PrefetchDir {
    dir: PathBuf,
}

impl PrefetchDir {
    fn open(spool: &Path, identity: &str) -> Option<Self> {
        let dir = spool.join("prefetch");
        let tag = dir.join(".repository");
        if std::fs::read_to_string(&tag).ok().as_deref() != Some(identity) {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).ok()?;
            std::fs::write(&tag, identity).ok()?;
        }
        Some(PrefetchDir { dir })
    }

    /// Records the digest of a spooled file, written after the file itself:
    /// a file without one is never served.
    fn record_digest(file: &Path, digest: Sha256Digest) {
        let sidecar = digest_path(file);
        let tmp = sidecar.with_extension("sha256.tmp");
        if std::fs::write(&tmp, digest.to_string()).is_err()
            || std::fs::rename(&tmp, &sidecar).is_err()
        {
            let _ = std::fs::remove_file(&tmp);
            let _ = std::fs::remove_file(file);
        }
    }

    /// Moves the spooled `name` to `dest` if it still hashes to the digest
    /// recorded when it was verified, durably (the file was fsynced when it
    /// was spooled; the rename, then the directory). `None` or
    /// `Some(false)`: download instead.
    fn take(&self, name: &WalFileName, dest: &Path) -> Option<bool> {
        let file = self.dir.join(name.as_str());
        let sidecar = digest_path(&file);
        let recorded = Sha256Digest::from_hex(std::fs::read_to_string(&sidecar).ok()?.trim());
        let body = std::fs::read(&file).ok()?;
        let _ = std::fs::remove_file(&sidecar);
        if recorded != Some(Sha256Digest::of(&body)) {
            tracing::warn!(file = %name, "a spooled segment no longer matches its checksum; downloading it again");
            let _ = std::fs::remove_file(&file);
            return Some(false);
        }
        let durable = std::fs::rename(&file, dest).and_then(|()| sync_dir(dest));
        Some(durable.is_ok())
    }

    /// Deletes spooled files that are not in `window` (already replayed, or another timeline).
    fn retain_only(&self, window: &[WalFileName]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let keep = name.starts_with(".lock")
                || name == ".repository"
                || window
                    .iter()
                    .any(|w| name.strip_suffix(".sha256").unwrap_or(name) == w.as_str());
            if !keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The file holding a spooled file's digest.
fn digest_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    file.with_file_name(name)
}

/// fsyncs the directory holding `path`.
fn sync_dir(path: &Path) -> io::Result<()> {
    std::fs::File::open(path.parent().unwrap_or(Path::new(".")))?.sync_all()
}

/// Downloads, decompresses and verifies `name` into `dest` through a temp
/// file, durably; returns the content's digest.
async fn download_to(
    repo: &Repository,
    name: &WalFileName,
    dest: &Path,
) -> Result<Sha256Digest, ArchiveError> {
    let key = catalog::wal_key(name);
    let location = repo.storage.location(&key);
    let body = match repo.storage.get(&key).await {
        Ok(body) => body,
        Err(StorageError::NotFound(location)) => {
            return Err(ArchiveError::NotInRepository {
                name: name.to_string(),
                location,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || write_verified(&body, &dest, &location))
        .await
        .map_err(|e| join_error(Path::new(name.as_str()), e))?
}

fn write_verified(gz: &[u8], dest: &Path, location: &str) -> Result<Sha256Digest, ArchiveError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let file_name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal");
    let tmp = dir.join(format!(".{file_name}.pitr-tmp.{}", std::process::id()));
    let write_err = |source: io::Error| {
        let hint = match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => "the volume is full: free space and retry",
            Some(libc::EACCES | libc::EPERM) => "run as the user that owns the data directory",
            _ => "check the data directory's volume",
        };
        ArchiveError::WriteDest {
            path: dest.display().to_string(),
            cause: source,
            hint,
        }
    };
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(write_err)?;
        let mut out = io::BufWriter::with_capacity(1 << 20, file);
        let (digest, _) = compress::gunzip_verified(gz, &mut out).map_err(|e| match e {
            GzipError::Write(source) => write_err(source),
            other => ArchiveError::Corrupt {
                location: location.to_owned(),
                cause: other,
            },
        })?;
        out.flush().map_err(write_err)?;
        out.get_ref().sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, dest).map_err(write_err)?;
        sync_dir(dest).map_err(write_err)?;
        Ok(digest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
