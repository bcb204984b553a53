//! `wal-push`: compress, store create-only, push the next `.ready` files ahead.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::catalog;
use crate::compress::{self, Sha256Digest};
use crate::pgdata;
use crate::repository::Repository;
use crate::storage::{PutMode, Storage, StorageError};
use crate::wal::{self, WalFileKind, WalFileName};

use super::markers::Markers;
use super::*;

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
    let spool = spool_dir(cfg.spool.as_deref(), &wal_dir);
    repo.claim(cluster, &spool.join("repository-owner"), cfg.auto_init)
        .await?;

    // Markers name the repository by endpoint, URL and owning cluster: the
    // same URL on another endpoint, or a repository replaced at the same
    // URL, never inherits them.
    let markers = Arc::new(Markers::new(
        spool.join("archived"),
        &repo.identity(Some(crate::pgdata::SystemId(cluster))),
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
    // The first push after a promotion empties what the restore's
    // prefetcher left (one stat per push when there is nothing to empty).
    if spool.join("prefetch").exists() {
        clear_spool_after_recovery(&cfg.pgdata, &spool);
    }
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
        // Exactly twice: two segments then compress at once within the
        // budget (a unit more would serialize them and idle a core).
        self.acquire(size * 2).await
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
    let (raw, digest, gz, summary) = {
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
            // The records, read from the bytes already in memory.
            let summary = super::summary::summarize_quietly(&file_name, &raw);
            Ok((raw.len(), digest, gz, summary))
        })
        .await
        .map_err(|e| join_error(path, e))??
    };
    budget.shrink(&mut permit, gz.len() as u64);
    tracing::debug!(file = %name, raw, stored = gz.len(), "pushing");
    let outcome =
        store_compressed(&repo.storage, &catalog::wal_key(name), name, digest, gz).await?;
    if let Some(s) = &summary
        && let Some(d) = &s.damage
    {
        tracing::error!(file = %name, lsn = %d.lsn, reason = %d.reason, "archived WAL with unreadable records: a restore stops there; `pitr-agent verify` reports it");
    }
    super::summary::store_summary_best_effort(&repo.storage, summary).await;
    Ok((outcome, digest))
}

/// Stores `gz` (the gzip of content with `digest`) under `key`, create-only:
/// identical content already there is success, different content is
/// [`ArchiveError::Conflict`]. `wal-push` and the WAL stream both store
/// through here, so whichever comes second meets an identical object.
pub(crate) async fn store_compressed(
    storage: &Storage,
    key: &crate::storage::ObjectKey,
    name: &WalFileName,
    digest: Sha256Digest,
    gz: Vec<u8>,
) -> Result<PushOutcome, ArchiveError> {
    // Look first: stores that ignore If-None-Match must never be overwritten.
    if storage.head(key).await?.is_none() {
        match storage.put(key, Bytes::from(gz), PutMode::CreateOnly).await {
            Ok(()) => return Ok(PushOutcome::Stored),
            Err(StorageError::AlreadyExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let stored = stored_digest(storage, key).await?;
    if stored == digest {
        Ok(PushOutcome::AlreadyArchived)
    } else {
        Err(ArchiveError::Conflict {
            name: name.to_string(),
            location: storage.location(key),
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
    if let Some(digest) = header_digest_of(storage, key).await? {
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

/// The raw-content digest a stored object records without being
/// decompressed: from the clear tag of an encrypted object (so that a writer
/// holding only the recipient can compare), else from its gzip header.
///
/// # Errors
/// As the store's.
pub(crate) async fn header_digest_of(
    storage: &Storage,
    key: &crate::storage::ObjectKey,
) -> Result<Option<Sha256Digest>, StorageError> {
    if let Some(tag) = storage.seal_tag(key).await? {
        return Ok(tag.raw);
    }
    let head = storage.get_prefix(key, compress::HEADER_PROBE_LEN).await?;
    Ok(compress::header_digest(&head))
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
