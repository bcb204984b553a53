//! `pitr-agent prune`: applies a [`RetentionPlan`].
//!
//! Order matters for a crash midway: a deleted backup loses its `backup.json`
//! first, so it stops existing before any of its data goes; WAL goes only
//! below the oldest kept backup's start, which a running `wal-push` (always
//! writing newer segments) or a new backup (always starting later) never needs.

use std::time::Duration;

use serde::Serialize;

use crate::catalog::backup::{BackupId, RECORD_FILE};
use crate::catalog::retention::RetentionPlan;
use crate::storage::{Storage, StorageError};
use crate::wal::WalFileName;

/// What was deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct PruneOutcome {
    /// Backups deleted.
    pub backups: usize,
    /// WAL files deleted.
    pub wal_files: usize,
    /// Their stored bytes.
    pub wal_bytes: u64,
    /// Incomplete backups removed.
    pub debris: usize,
    /// Temp files of interrupted writes removed (`file://` only).
    pub temp_files: usize,
    /// Segments whose streamed pieces were left behind and removed.
    pub streamed_leftovers: usize,
    /// Filestore objects deleted.
    pub filestore_files: usize,
    /// Objects retention would delete that S3 Object Lock still keeps
    /// (a backup counts once); prune deletes them once their locks expire.
    pub locked: usize,
    /// When the last of those locks expires, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<String>,
}

/// The locks prune meets, when the repository has Object Lock.
struct Locks {
    enabled: bool,
    now: std::time::SystemTime,
    kept: usize,
    until: Option<std::time::SystemTime>,
}

impl Locks {
    /// Whether Object Lock still keeps `key`: then prune leaves it.
    async fn keep(
        &mut self,
        storage: &Storage,
        key: &crate::storage::ObjectKey,
    ) -> Result<bool, StorageError> {
        if !self.enabled {
            return Ok(false);
        }
        match storage.locked_until(key).await? {
            Some(until) if until > self.now => {
                self.kept += 1;
                self.until = Some(self.until.map_or(until, |u| u.max(until)));
                tracing::info!(key = %key, until = %humantime::format_rfc3339_seconds(until), "kept: Object Lock still protects it");
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// Deletes what `plan` says, then the temp files that writes killed midway
/// (a SIGKILLed `wal-push`) left for longer than `debris_grace`.
///
/// # Errors
/// The first storage failure; what was deleted before it stays deleted, and
/// running prune again finishes the job.
pub async fn apply(
    storage: &Storage,
    plan: &RetentionPlan,
    debris_grace: Duration,
    object_lock: bool,
) -> Result<PruneOutcome, StorageError> {
    let mut outcome = PruneOutcome::default();
    let mut locks = Locks {
        enabled: object_lock,
        now: std::time::SystemTime::now(),
        kept: 0,
        until: None,
    };
    for id in &plan.delete_backups {
        // Its objects were written together: the record's lock stands for all.
        if locks.keep(storage, &id.key(RECORD_FILE)).await? {
            continue;
        }
        delete_backup(storage, id).await?;
        tracing::info!(backup_id = %id, "deleted backup");
        outcome.backups += 1;
    }
    for name in &plan.delete_wal {
        let Ok(parsed) = name.parse::<WalFileName>() else {
            continue;
        };
        let key = crate::catalog::wal_key(&parsed);
        if locks.keep(storage, &key).await? {
            continue;
        }
        storage.delete(&key).await?;
        outcome.wal_files += 1;
    }
    outcome.wal_bytes = plan.delete_wal_bytes;
    // After their WAL: a summary without its segment is harmless.
    for key in &plan.delete_summaries {
        if !locks.keep(storage, key).await? {
            storage.delete(key).await?;
        }
    }
    for id in &plan.delete_debris {
        // Re-check: a backup that committed since the listing is not debris.
        if storage.head(&id.key(RECORD_FILE)).await?.is_some() {
            continue;
        }
        storage.delete_prefix(&id.prefix()).await?;
        tracing::info!(backup_id = %id, "removed incomplete backup");
        outcome.debris += 1;
    }
    for key in &plan.delete_filestore {
        let key = crate::storage::ObjectKey::new(key.clone())?;
        if locks.keep(storage, &key).await? {
            continue;
        }
        storage.delete(&key).await?;
        outcome.filestore_files += 1;
    }
    outcome.locked = locks.kept;
    outcome.locked_until = locks
        .until
        .map(|u| humantime::format_rfc3339_seconds(u).to_string());
    outcome.streamed_leftovers = remove_streamed_leftovers(storage, plan).await?;
    // A live write's temp file is seconds old; the grace keeps it safe.
    outcome.temp_files = storage.remove_stale_temp_files(debris_grace).await?;
    if outcome.temp_files > 0 {
        tracing::info!(
            count = outcome.temp_files,
            "removed temp files left by interrupted writes"
        );
    }
    Ok(outcome)
}

/// Removes the streamed pieces (`wal-partial/`) of segments that are stored
/// whole, or that retention no longer needs. The streamer deletes them itself
/// once a segment is stored; this catches a streamer killed in between. The
/// segment being streamed has no whole copy and is above the floor, so it
/// is never touched.
async fn remove_streamed_leftovers(
    storage: &Storage,
    plan: &RetentionPlan,
) -> Result<usize, StorageError> {
    use crate::catalog::partial::{PARTIAL_PREFIX, partial_prefix, piece_of};
    let segments: std::collections::HashSet<WalFileName> = storage
        .list(PARTIAL_PREFIX)
        .await?
        .iter()
        .filter_map(piece_of)
        .map(|p| p.segment)
        .collect();
    let mut removed = 0;
    for segment in segments {
        let below_floor = plan.wal_floor.is_some_and(|floor| {
            segment
                .segment_no(plan.segment_size)
                .is_some_and(|s| s < floor)
        });
        let whole = storage
            .head(&crate::catalog::wal_key(&segment))
            .await?
            .is_some();
        if below_floor || whole {
            storage.delete_prefix(&partial_prefix(&segment)).await?;
            tracing::info!(segment = %segment, "removed streamed pieces left behind");
            removed += 1;
        }
    }
    Ok(removed)
}

async fn delete_backup(storage: &Storage, id: &BackupId) -> Result<(), StorageError> {
    storage.delete(&id.key(RECORD_FILE)).await?;
    storage.delete_prefix(&id.prefix()).await
}
