//! Unpacks a stored `base.tar.gz` into a data directory as it downloads.
//!
//! Download and gunzip run on the async side; file writes run on a blocking
//! thread fed through a small bounded channel, so the three overlap and
//! memory stays at a few MiB. Paths are checked (relative, no `..`), files
//! are created 0600 and directories 0700, as PostgreSQL requires. Nothing is
//! fsynced per file: one `sync -f` of the filesystem at the end is far
//! cheaper, and `pg_control` (last in pg_basebackup's tar) lands last, so an
//! interrupted extraction never looks like a usable cluster.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use async_compression::tokio::bufread::GzipDecoder;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, BufReader};

use crate::backup::tar::{EntryKind, Event, TarError, TarReader};
use crate::storage::{BoxReader, StorageError};

/// What extraction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Compressed bytes read.
    pub stored_bytes: u64,
    /// Bytes written into files.
    pub raw_bytes: u64,
    /// Files written.
    pub files: u64,
    /// Bytes of skipped databases' files, left as sparse stand-ins.
    pub skipped_bytes: u64,
}

/// Why extraction failed.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The repository failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The stream is corrupt.
    #[error(
        "the backup archive is corrupt: {0}; run `pitr-agent verify`, and restore from another backup (--backup)"
    )]
    Corrupt(String),
    /// Writing into the data directory failed.
    #[error("cannot write {path}: {source}{hint}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
        /// What to do.
        hint: &'static str,
    },
}

impl From<TarError> for ExtractError {
    fn from(e: TarError) -> Self {
        ExtractError::Corrupt(e.to_string())
    }
}

enum Op {
    Dir(PathBuf),
    File(PathBuf),
    /// A skipped file: created sparse, at its size, all zeros.
    Sparse(PathBuf, u64),
    Data(Bytes),
    Close,
}

/// Unpacks the gzipped tar from `reader` into `dir` (which must exist and be
/// empty). `progress` sees (stored, raw) byte counts now and then.
///
/// # Errors
/// [`ExtractError`]; the caller removes what was written.
pub async fn extract(
    reader: BoxReader,
    dir: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<ExtractStats, ExtractError> {
    extract_skipping(reader, dir, &std::collections::HashSet::new(), progress).await
}

/// The database OID of a file under `base/<oid>/`.
fn database_of(path: &Path) -> Option<u32> {
    let mut parts = path.components();
    if parts.next()?.as_os_str() != "base" {
        return None;
    }
    parts.next()?.as_os_str().to_str()?.parse().ok()
}

/// [`extract`], with the files of the databases in `skip` (`base/<oid>/`)
/// left as sparse stand-ins of their size: replay can write into them, as
/// with pgBackRest's `--db-include`, and those databases are unusable.
///
/// # Errors
/// [`ExtractError`]; the caller removes what was written.
pub async fn extract_skipping(
    reader: BoxReader,
    dir: &Path,
    skip: &std::collections::HashSet<u32>,
    mut progress: impl FnMut(u64, u64),
) -> Result<ExtractStats, ExtractError> {
    let (tx, rx) = mpsc::sync_channel::<Op>(16);
    let root = dir.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || write_ops(&root, &rx));

    let stored = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&stored);
    let counting = tokio_util::io::InspectReader::new(reader, move |b: &[u8]| {
        counter.fetch_add(b.len() as u64, Ordering::Relaxed);
    });
    let mut decoder = GzipDecoder::new(BufReader::with_capacity(1 << 20, counting));
    decoder.multiple_members(true);
    let mut tar = TarReader::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut stats = ExtractStats::default();
    let mut send_failed = false;
    let mut skipping = false;
    let result: Result<(), ExtractError> = async {
        loop {
            let n = decoder
                .read(&mut buf)
                .await
                .map_err(|e| ExtractError::Corrupt(format!("gzip: {e}")))?;
            if n == 0 {
                break;
            }
            tar.feed(
                &buf[..n],
                &mut |event: Event<'_>| -> Result<(), ExtractError> {
                    let op = match event {
                        Event::Start(e) => {
                            let rel = safe_path(&e.path)?;
                            match e.kind {
                                EntryKind::Directory => Op::Dir(rel),
                                EntryKind::File
                                    if database_of(&rel).is_some_and(|oid| skip.contains(&oid)) =>
                                {
                                    skipping = true;
                                    Op::Sparse(rel, e.size)
                                }
                                EntryKind::File => {
                                    stats.files += 1;
                                    Op::File(rel)
                                }
                                EntryKind::Other => return Ok(()),
                            }
                        }
                        Event::Data(d) if skipping => {
                            stats.skipped_bytes += d.len() as u64;
                            return Ok(());
                        }
                        Event::Data(d) => {
                            stats.raw_bytes += d.len() as u64;
                            Op::Data(Bytes::copy_from_slice(d))
                        }
                        Event::End(_) if skipping => {
                            skipping = false;
                            return Ok(());
                        }
                        Event::End(e) if e.kind == EntryKind::File => Op::Close,
                        Event::End(_) => return Ok(()),
                    };
                    if tx.send(op).is_err() {
                        send_failed = true;
                    }
                    Ok(())
                },
            )?;
            if send_failed {
                break;
            }
            progress(stored.load(Ordering::Relaxed), stats.raw_bytes);
        }
        if !send_failed {
            tar.finish()?;
        }
        Ok(())
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ExtractError::Corrupt(format!("the writer thread failed: {e}")))?;
    written?;
    result?;
    stats.stored_bytes = stored.load(Ordering::Relaxed);
    Ok(stats)
}

/// A tar path as a clean relative path.
fn safe_path(path: &str) -> Result<PathBuf, ExtractError> {
    let p = Path::new(path);
    if path.is_empty()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(ExtractError::Corrupt(format!(
            "unsafe path {path:?} in the archive"
        )));
    }
    Ok(p.to_path_buf())
}

/// Creates `path` (0600) and its missing parents (0700); on failure, the
/// path that failed.
fn create_file(path: &Path) -> Result<File, (PathBuf, io::Error)> {
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| (parent.to_path_buf(), e))?;
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| (path.to_path_buf(), e))
}

fn write_ops(root: &Path, rx: &mpsc::Receiver<Op>) -> Result<(), ExtractError> {
    let mut current: Option<(PathBuf, File)> = None;
    let fail = |path: &Path, source: io::Error| ExtractError::Write {
        path: path.display().to_string(),
        hint: if source.raw_os_error() == Some(libc::ENOSPC) {
            "; the disk is full: free space or grow the volume, then restore again into an empty \
             directory"
        } else {
            ""
        },
        source,
    };
    for op in rx {
        match op {
            Op::Dir(rel) => {
                let path = root.join(rel);
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&path)
                    .map_err(|e| fail(&path, e))?;
            }
            Op::File(rel) => {
                let path = root.join(rel);
                let file = create_file(&path).map_err(|(p, e)| fail(&p, e))?;
                current = Some((path, file));
            }
            Op::Sparse(rel, size) => {
                let path = root.join(rel);
                let file = create_file(&path).map_err(|(p, e)| fail(&p, e))?;
                file.set_len(size).map_err(|e| fail(&path, e))?;
                current = None;
            }
            Op::Data(data) => {
                if let Some((path, file)) = &mut current {
                    file.write_all(&data).map_err(|e| fail(path, e))?;
                }
            }
            Op::Close => current = None,
        }
    }
    Ok(())
}

#[cfg(test)]
mod database_tests {
    use super::database_of;
    use std::path::Path;

    #[test]
    fn only_files_under_base_oid_belong_to_a_database() {
        assert_eq!(database_of(Path::new("base/16384/2619")), Some(16_384));
        assert_eq!(database_of(Path::new("base/1/PG_VERSION")), Some(1));
        assert_eq!(database_of(Path::new("global/1262")), None);
        assert_eq!(database_of(Path::new("base/pgsql_tmp/x")), None);
        assert_eq!(database_of(Path::new("pg_wal/base/5/x")), None);
    }
}
