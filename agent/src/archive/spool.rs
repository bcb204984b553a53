//! The prefetch spool: segments verified ahead of replay, emptied when recovery ends.

use std::path::{Path, PathBuf};

use futures::stream::{self, StreamExt};

use crate::compress::Sha256Digest;
use crate::pgdata;
use crate::repository::Repository;
use crate::wal::WalFileName;

use super::download::download_to;
use super::*;

/// The data directory holding `wal_dir`, if `wal_dir` is its `pg_wal`
/// (PostgreSQL runs `restore_command` in the data directory, with `%p`
/// relative to it).
pub(super) fn data_dir_of(wal_dir: &Path) -> Option<PathBuf> {
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
    let Some(dir) = PrefetchDir::open(&req.spool, &repo.identity(owner.system_identifier)) else {
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
pub(super) struct PrefetchDir {
    pub(super) dir: PathBuf,
}

impl PrefetchDir {
    pub(super) fn open(spool: &Path, identity: &str) -> Option<Self> {
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
    pub(super) fn record_digest(file: &Path, digest: Sha256Digest) {
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
    pub(super) fn take(&self, name: &WalFileName, dest: &Path) -> Option<bool> {
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
    pub(super) fn retain_only(&self, window: &[WalFileName]) {
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
