//! `wal-fetch`: verified, atomic, retried restores of one WAL file.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::catalog::partial::{PartialPiece, covering_chain, partial_prefix, piece_of};
use crate::compress::{self, GzipError};
use crate::repository::Repository;

use crate::wal::{self, Lsn, WalFileKind, WalFileName};

use super::download::download_to;
use super::spool::{PrefetchDir, data_dir_of};
use super::*;

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
    /// Not archived whole: the streamed part, up to this position, padded
    /// with zeros to a segment (recovery ends where the bytes end).
    Streamed(Lsn),
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
    let spool = spool_dir(cfg.spool.as_deref(), &dest_dir);
    let owner = repo.owner().await?;
    let identity = repo.identity(owner.system_identifier);
    let prefetch_dir = (cfg.prefetch > 0)
        .then(|| PrefetchDir::open(&spool, &identity))
        .flatten();

    let spooled = prefetch_dir.as_ref().and_then(|p| p.take(&name, dest));
    let outcome = if spooled == Some(true) {
        FetchOutcome::Prefetched
    } else {
        match download_to(repo, &name, dest).await {
            Ok(_) => FetchOutcome::Downloaded,
            Err(e) if e.is_not_in_repository() && name.kind() == WalFileKind::Segment => {
                match restore_streamed(repo, &name, dest).await? {
                    Some(end) => return Ok((FetchOutcome::Streamed(end), None)),
                    // The stream stores a completed segment, then deletes
                    // its pieces: between our two reads it may have done
                    // both. Look once more before saying "not found".
                    None => match download_to(repo, &name, dest).await {
                        Ok(_) => FetchOutcome::Downloaded,
                        Err(again) if again.is_not_in_repository() => return Err(e),
                        Err(again) => return Err(again),
                    },
                }
            }
            Err(e) => return Err(e),
        }
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

/// Restores the streamed part of segment `name` (never archived whole) to
/// `dest`: the pieces that cover it from its first byte, then zeros to the
/// segment size, as `pg_receivewal` leaves a `.partial` file. `None` when no
/// piece starts at the segment's first byte.
async fn restore_streamed(
    repo: &Repository,
    name: &WalFileName,
    dest: &Path,
) -> Result<Option<Lsn>, ArchiveError> {
    let Some((mut data, end, seg)) = streamed_bytes(repo, name).await? else {
        return Ok(None);
    };
    data.resize(seg as usize, 0);
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || write_plain(&data, &dest))
        .await
        .map_err(|e| join_error(Path::new(name.as_str()), e))??;
    tracing::info!(file = %name, streamed_to = %end, "restored the streamed part of a segment never archived whole");
    Ok(Some(end))
}

/// The streamed part of segment `name`: the bytes of the pieces that cover
/// it from its first byte, where they end, and the segment size. `None`
/// when no piece starts at the segment's first byte.
///
/// # Errors
/// Listing or reading a piece fails, or a piece is corrupt.
pub(crate) async fn streamed_bytes(
    repo: &Repository,
    name: &WalFileName,
) -> Result<Option<(Vec<u8>, Lsn, u32)>, ArchiveError> {
    let pieces: Vec<PartialPiece> = repo
        .storage
        .list(&partial_prefix(name))
        .await?
        .iter()
        .filter_map(piece_of)
        .filter(|p| &p.segment == name)
        .collect();
    // The piece that starts first holds the segment's long page header,
    // and with it the segment size that places the segment's first byte.
    let Some(first) = pieces.iter().min_by_key(|p| p.start) else {
        return Ok(None);
    };
    let first_bytes = piece_bytes(repo, first).await?;
    let Some(header) = wal::segment_header(&first_bytes) else {
        return Ok(None);
    };
    let seg = header.segment_size;
    let Some(segno) = name.segment_no(seg) else {
        return Ok(None);
    };
    let segment_start = segno.start(seg);
    let chain = covering_chain(&pieces, segment_start);
    let Some(end) = chain.last().map(|p| p.end) else {
        return Ok(None);
    };
    let mut data = Vec::with_capacity(seg as usize);
    for piece in chain {
        let bytes = if piece.meta.key == first.meta.key {
            first_bytes.clone()
        } else {
            piece_bytes(repo, piece).await?
        };
        let covered = segment_start.0 + data.len() as u64;
        let skip = usize::try_from(covered - piece.start.0).unwrap_or(usize::MAX);
        data.extend_from_slice(bytes.get(skip..).unwrap_or_default());
    }
    Ok(Some((data, end, seg)))
}

/// One streamed piece, decompressed and checked against its key's length.
async fn piece_bytes(repo: &Repository, piece: &PartialPiece) -> Result<Vec<u8>, ArchiveError> {
    let location = repo.storage.location(&piece.meta.key);
    let gz = repo.storage.get(&piece.meta.key).await?;
    let mut out = Vec::new();
    compress::gunzip_verified(&gz, &mut out).map_err(|cause| ArchiveError::Corrupt {
        location: location.clone(),
        cause,
    })?;
    if out.len() as u64 != piece.end.0 - piece.start.0 {
        return Err(ArchiveError::Corrupt {
            location,
            cause: GzipError::Corrupt(io::Error::other(format!(
                "holds {} bytes, but its name says {}",
                out.len(),
                piece.end.0 - piece.start.0
            ))),
        });
    }
    Ok(out)
}

fn write_plain(data: &[u8], dest: &Path) -> Result<(), ArchiveError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let file_name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal");
    let tmp = dir.join(format!(".{file_name}.pitr-tmp.{}", std::process::id()));
    let write_err = |source: io::Error| ArchiveError::WriteDest {
        path: dest.display().to_string(),
        cause: source,
        hint: "check the data directory's volume",
    };
    let result = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(write_err)?;
        file.write_all(data).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, dest).map_err(write_err)?;
        sync_dir(dest).map_err(write_err)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
