//! WAL summaries in the repository: made when a segment is archived (by
//! `wal-push` and the stream), read back by `list`, the restore plan and
//! `verify`, and made on demand from the WAL itself where none was stored
//! (segments archived before summaries existed, and the segment the stream
//! is writing).

use std::collections::HashMap;

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::catalog::{self, SummaryEntry};
use crate::compress;
use crate::repository::Repository;
use crate::storage::{PutMode, Storage, StorageError};
use crate::wal::records::Completeness;
use crate::wal::summary::{self, SegmentSummary};
use crate::wal::{self, WalFileKind, WalFileName};

use super::ArchiveError;

/// Summaries read at once.
const CONCURRENCY: usize = 16;

/// The summary of WAL file `name` whose bytes are `raw`, for the kinds that
/// have records (segments and `.partial` files); `Ok(None)` for the others.
///
/// # Errors
/// The bytes are not WAL of that name (a renamed or overwritten file).
pub fn summarize_file(
    name: &WalFileName,
    raw: &[u8],
) -> Result<Option<SegmentSummary>, summary::ReadError> {
    let completeness = match name.kind() {
        WalFileKind::Segment => Completeness::Full,
        WalFileKind::Partial => Completeness::Partial,
        _ => return Ok(None),
    };
    let Some(header) = wal::segment_header(raw) else {
        return Err(summary::ReadError::NotWal("no long page header".to_owned()));
    };
    summary::summarize(name, raw, header.segment_size, completeness).map(Some)
}

/// [`summarize_file`] where a summary is a bonus: what cannot be
/// summarized is logged (at debug: wal-push checks the header itself) and
/// skipped.
#[must_use]
pub fn summarize_quietly(name: &WalFileName, raw: &[u8]) -> Option<SegmentSummary> {
    summarize_file(name, raw).unwrap_or_else(|e| {
        tracing::debug!(file = %name, error = %e, "cannot summarize WAL");
        None
    })
}

/// Stores `summary`, create-only. A summary already there is accepted:
/// summaries are made from the segment alone, and the segment itself was
/// stored create-only first.
///
/// # Errors
/// The store fails.
pub async fn store_summary(
    storage: &Storage,
    summary: &SegmentSummary,
) -> Result<(), StorageError> {
    let body = serde_json::to_vec(summary).expect("a summary serializes");
    match storage
        .put(
            &catalog::summary_key(summary),
            Bytes::from(body),
            PutMode::CreateOnly,
        )
        .await
    {
        Ok(()) | Err(StorageError::AlreadyExists(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Stores `summary` after its segment was stored; a failure is logged, not
/// returned: the segment is durable, and `verify --summarize` (or a plan,
/// on demand) makes a missing summary again.
pub async fn store_summary_best_effort(storage: &Storage, summary: Option<SegmentSummary>) {
    let Some(summary) = summary else { return };
    if let Err(e) = store_summary(storage, &summary).await {
        tracing::warn!(file = %summary.segment, error = %e, "cannot store the WAL summary; `pitr-agent verify --summarize` makes it later");
    }
}

/// Where a summary comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Only a stored summary.
    Stored,
    /// A stored one, else made now from the WAL object or the streamed
    /// pieces (a download of the segment).
    OnDemand,
}

/// Reads the summary of `name`: the stored one, or (with
/// [`Source::OnDemand`]) one made from its WAL. `None` when there is
/// neither.
///
/// # Errors
/// Reading fails, or the stored summary or the WAL is corrupt.
pub async fn read_summary(
    repo: &Repository,
    listed: &HashMap<WalFileName, SummaryEntry>,
    name: &WalFileName,
    source: Source,
) -> Result<Option<SegmentSummary>, ArchiveError> {
    if let Some(entry) = listed.get(name) {
        match repo.storage.get(&entry.key).await {
            Ok(body) => {
                let s: SegmentSummary =
                    serde_json::from_slice(&body).map_err(|e| ArchiveError::Corrupt {
                        location: repo.storage.location(&entry.key),
                        cause: compress::GzipError::Corrupt(std::io::Error::other(e)),
                    })?;
                if s.format <= summary::SUMMARY_FORMAT && &s.segment == name {
                    return Ok(Some(s));
                }
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    if source == Source::Stored {
        return Ok(None);
    }
    summary_from_wal(repo, name).await
}

/// Makes the summary of `name` from its WAL object, else from its streamed
/// pieces; `None` when the repository has neither.
///
/// # Errors
/// Reading fails, or the WAL is corrupt.
pub async fn summary_from_wal(
    repo: &Repository,
    name: &WalFileName,
) -> Result<Option<SegmentSummary>, ArchiveError> {
    let key = catalog::wal_key(name);
    match repo.storage.get(&key).await {
        Ok(gz) => {
            let location = repo.storage.location(&key);
            let name = name.clone();
            tokio::task::spawn_blocking(move || {
                let mut raw = Vec::new();
                compress::gunzip_verified(&gz, &mut raw)
                    .map_err(|cause| ArchiveError::Corrupt { location, cause })?;
                Ok(summarize_quietly(&name, &raw))
            })
            .await
            .map_err(|e| super::join_error(std::path::Path::new("summary"), e))?
        }
        Err(e) if e.is_not_found() => {
            let Some((data, _, seg)) = super::fetch::streamed_bytes(repo, name).await? else {
                return Ok(None);
            };
            Ok(summary::summarize(name, &data, seg, Completeness::Partial).ok())
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads the summaries of `names` (stored ones, else on demand for the
/// names in `on_demand`), several at once.
///
/// # Errors
/// As [`read_summary`].
pub async fn read_summaries(
    repo: &Repository,
    listed: &HashMap<WalFileName, SummaryEntry>,
    names: &[WalFileName],
    on_demand: &[WalFileName],
) -> Result<HashMap<WalFileName, SegmentSummary>, ArchiveError> {
    // Owned futures: a borrowing closure here makes the daemon's tasks
    // fail the `Send` bound (a known async-closure lifetime limit).
    let jobs: Vec<_> = names
        .iter()
        .cloned()
        .map(|n| {
            let source = if on_demand.contains(&n) {
                Source::OnDemand
            } else {
                Source::Stored
            };
            async move { read_summary(repo, listed, &n, source).await }
        })
        .collect();
    let found: Vec<Option<SegmentSummary>> = futures::stream::iter(jobs)
        .buffered(CONCURRENCY)
        .try_collect()
        .await?;
    Ok(found
        .into_iter()
        .flatten()
        .map(|s| (s.segment.clone(), s))
        .collect())
}

/// At most this many of the newest segments are read back to find the
/// newest commit; past that the window's end stays an estimate.
const WALK_BACK: usize = 256;
/// The newest segments summarized from their WAL when no summary is stored.
const ON_DEMAND_NEWEST: usize = 2;

/// Resolves [`Catalog::archive_end`](crate::catalog::backup::Catalog): the
/// newest commit on the newest timeline (from the newest segments'
/// summaries, made on demand for the newest two when none is stored), the
/// restore points and the damaged segments that the listing names.
///
/// # Errors
/// Reading a summary or the WAL fails.
pub async fn resolve_archive_end(
    repo: &Repository,
    catalog: &mut crate::catalog::backup::Catalog,
    index: &wal::WalIndex,
) -> Result<(), ArchiveError> {
    use crate::catalog::backup::ArchiveEnd;
    let seg = catalog.segment_size();
    let mut end = ArchiveEnd {
        last_commit: None,
        last_commit_segment: None,
        restore_points: Vec::new(),
        damaged: Vec::new(),
        resolved: false,
        diverged: catalog.divergences(index),
        gaps: catalog.window_gaps(index),
    };
    let marked: Vec<WalFileName> = catalog
        .summaries
        .values()
        .filter(|e| e.restore_points)
        .map(|e| e.name.clone())
        .collect();
    for s in read_summaries(repo, &catalog.summaries, &marked, &[])
        .await?
        .into_values()
    {
        end.restore_points.extend(
            s.restore_points
                .iter()
                .map(|rp| (s.segment.clone(), rp.clone())),
        );
    }
    end.damaged = catalog
        .summaries
        .values()
        .filter(|e| e.damaged)
        .map(|e| e.name.clone())
        .collect();
    end.damaged.sort_by(|a, b| a.as_str().cmp(b.as_str()));

    // The newest timeline's path, newest segment first.
    let newest_tl = index.newest_timeline();
    let Some(backup) = catalog
        .backups
        .iter()
        .rev()
        .find(|b| newest_tl.is_none_or(|tl| index.descends(tl, b.timeline, b.stop_lsn)))
    else {
        end.resolved = true;
        catalog.archive_end = Some(end);
        return Ok(());
    };
    let target = newest_tl.unwrap_or(backup.timeline).max(backup.timeline);
    let first = crate::wal::Lsn(backup.stop_lsn.0.saturating_sub(1)).segment(seg);
    let path = index.path(backup.timeline, first, target);
    let last = index.end_of(&path);
    let names: Vec<WalFileName> = (first.0..=last.0)
        .rev()
        .take(WALK_BACK)
        .map(|s| {
            let s = wal::SegmentNo(s);
            WalFileName::segment(wal::WalIndex::timeline_for(&path, s), s, seg)
        })
        .collect();
    let on_demand: Vec<WalFileName> = names.iter().take(ON_DEMAND_NEWEST).cloned().collect();
    let mut newer: Option<SegmentSummary> = None;
    let mut reached_backup = names.len() < WALK_BACK;
    for chunk in names.chunks(CONCURRENCY) {
        let found = read_summaries(repo, &catalog.summaries, chunk, &on_demand).await?;
        for name in chunk {
            let Some(s) = found.get(name) else {
                newer = None;
                continue;
            };
            // A commit split between this segment and the newer one.
            if let Some(n) = &newer
                && let summary::Link::Chained(Some(r)) = summary::link(s, n)
                && let crate::wal::records::RecordKind::Commit { time } = r.kind
                && end.last_commit.is_none()
            {
                end.last_commit = Some(summary::XactPoint {
                    time_us: time,
                    lsn: r.lsn,
                    end: r.end(),
                    xid: r.xid,
                });
                end.last_commit_segment = Some(n.segment.clone());
            }
            if end.last_commit.is_none() && s.last_commit.is_some() {
                end.last_commit.clone_from(&s.last_commit);
                end.last_commit_segment = Some(s.segment.clone());
            }
            for rp in &s.restore_points {
                if !end.restore_points.iter().any(|(_, r)| r.lsn == rp.lsn) {
                    end.restore_points.push((s.segment.clone(), rp.clone()));
                }
            }
            newer = Some(s.clone());
        }
        if end.last_commit.is_some() {
            reached_backup = true;
            break;
        }
    }
    end.restore_points.sort_by_key(|(_, rp)| rp.lsn);
    // With no commit in the newest WALK_BACK segments, the window's end
    // stays an estimate; restore points and damage are still shown.
    end.resolved = end.last_commit.is_some() || reached_backup;
    catalog.archive_end = Some(end);
    Ok(())
}
