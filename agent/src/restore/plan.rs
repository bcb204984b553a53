//! The restore plan, computed before anything touches the data directory:
//! which backup, which timeline, which WAL, how many bytes, and every reason
//! the restore cannot reach the target.

use std::time::SystemTime;

use serde::Serialize;

use super::target::{RecoveryTarget, TargetTime, TargetTimeline};
use crate::catalog::backup::{BackupId, BackupRecord, Catalog, RestorableWindow};
use crate::wal::summary::{PathFacts, XactPoint, path_facts};
use crate::wal::{Lsn, SegmentNo, TimelineId, WalFileName, WalIndex};

/// Segments of local room a restore keeps beside the backup's files: the
/// segment being replayed, the prefetch spool, and WAL recovery writes
/// before its first restartpoint recycles it.
pub const DISK_WAL_SEGMENTS: u64 = 16;

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Where to stop.
    pub target: RecoveryTarget,
    /// Which timeline to follow.
    pub timeline: TargetTimeline,
    /// A backup chosen by hand.
    pub backup: Option<BackupId>,
    /// Go on when the target lies beyond the newest archived WAL.
    pub allow_incomplete: bool,
}

/// What the restore will do.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestorePlan {
    /// The backup restored.
    pub backup: BackupRecord,
    /// The timeline recovery ends on.
    pub timeline: TimelineId,
    /// `recovery_target_timeline` as PostgreSQL will be told: the number
    /// pgrestore resolved, never `latest` (PostgreSQL's own resolution stops
    /// at the first history file it cannot fetch).
    pub target_timeline: String,
    /// The first archived segment recovery may fetch.
    pub wal_first: Option<String>,
    /// The last archived segment recovery may fetch.
    pub wal_last: Option<String>,
    /// How many archived segments that is.
    pub wal_segments: u64,
    /// Their stored bytes.
    pub wal_bytes: u64,
    /// Stored bytes of the backup.
    pub backup_bytes: u64,
    /// Local disk the restore needs: the backup's files, and room for the
    /// WAL replay fetches and writes ([`DISK_WAL_SEGMENTS`] segments).
    pub disk_needed: u64,
    /// The restorable window.
    pub window: Option<RestorableWindow>,
    /// Things the operator should know.
    pub notes: Vec<String>,
    /// The target PostgreSQL is given: the one asked for, or where the
    /// WAL summaries put it (see [`RestorePlan::apply_wal_facts`]).
    #[serde(rename = "recovery-target", serialize_with = "as_text")]
    pub recover_to: RecoveryTarget,
    /// Where replay must end for the restore to have reached its target:
    /// checked after recovery.
    #[serde(
        rename = "expected-replay-end",
        skip_serializing_if = "Option::is_none"
    )]
    pub expected_end: Option<Lsn>,
    /// The newest commit replay reaches, from the WAL summaries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_commit: Option<String>,
    /// How many of the segments replayed have a summary.
    pub wal_summarized: u64,
    /// The segments replay reads, oldest first.
    #[serde(skip)]
    pub wal_path: Vec<WalFileName>,
}

/// A value as its `Display` text.
fn as_text<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Why there is no plan. Each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Nothing to restore from.
    #[error("the repository has no backup; take one with `pitr-agent backup` first")]
    NoBackups,
    /// `--backup` names nothing.
    #[error("no backup {0} in the repository; `pgrestore list` shows the backups")]
    UnknownBackup(BackupId),
    /// No backup on the requested timeline.
    #[error(
        "no backup can reach timeline {0}: none is on it or on one of its ancestors before it \
         branched; choose another --target-timeline"
    )]
    NoBackupOnTimeline(TimelineId),
    /// The target precedes every backup's end.
    #[error(
        "the target {target} is before the earliest restorable point, {earliest} (the end of the \
         oldest backup{which}); choose a later target"
    )]
    BeforeWindow {
        /// The target.
        target: String,
        /// The earliest point.
        earliest: String,
        /// Which backup, when chosen by hand.
        which: String,
    },
    /// The target lies beyond the archive.
    #[error(
        "the target {target} is beyond the newest archived WAL ({newest}); recovery would end \
         before it. Check that archiving works (pg_stat_archiver), choose an earlier target, or \
         pass --allow-incomplete to recover as far as the archive goes"
    )]
    BeyondArchive {
        /// The target.
        target: String,
        /// What the archive reaches.
        newest: String,
    },
    /// A hole in the WAL after the backup, when the target's position is
    /// known only by replay (xid, restore point).
    #[error(
        "WAL gap: {range} missing from the repository after backup {backup}; where a transaction \
         id or restore point lies is known only by replay, so the target may be before or after \
         the gap. Pass --allow-incomplete to replay up to the gap (recovery stops with an error \
         if the target lies beyond it), or restore a backup taken after it (`pgrestore list`)"
    )]
    GapBeforeUnknownTarget {
        /// The missing segments.
        range: String,
        /// The backup.
        backup: BackupId,
    },
    /// Unreadable WAL before the target.
    #[error(
        "WAL damaged at {lsn} in {segment}: {reason}. Replay stops there: the last commit it \
         reaches is {before}, and the repository holds commits up to {archived}. Choose a target \
         before {before}, or pass --allow-incomplete to restore up to the damage (later commits \
         are lost); `pitr-agent verify` lists every damaged segment"
    )]
    Damaged {
        /// The segment.
        segment: String,
        /// Where.
        lsn: String,
        /// What is wrong.
        reason: String,
        /// The last commit before it.
        before: String,
        /// The newest commit archived.
        archived: String,
    },
    /// `--target-name` names no restore point in the WAL replayed.
    #[error(
        "no restore point named {name:?} in the WAL after backup {backup}; {known}. \
         `pgrestore list` shows every restore point"
    )]
    UnknownRestorePoint {
        /// The name asked for.
        name: String,
        /// The backup.
        backup: BackupId,
        /// The names there are.
        known: String,
    },
    /// Two timelines grew after their fork: `latest` would be a guess.
    #[error(
        "{divergence}: a copy restored and promoted beside production may have archived into \
         this repository. Following the newest timeline ({child}) would leave out what {parent} \
         committed since; choose one with --target-timeline {parent} or --target-timeline {child}"
    )]
    Diverged {
        /// What diverged.
        divergence: String,
        /// The timeline that went on.
        parent: TimelineId,
        /// The one that branched.
        child: TimelineId,
    },
    /// A hole in the WAL the restore needs.
    #[error(
        "WAL gap: {range} missing from the repository; recovery from backup {backup} cannot pass \
         it. Choose a target before it, or a backup taken after it (`pgrestore list`)"
    )]
    Gap {
        /// The missing segments.
        range: String,
        /// The backup.
        backup: BackupId,
    },
}

impl RestorePlan {
    /// Plans a restore of `catalog` toward `req`; `index` is the catalog's
    /// [`Catalog::wal_index`].
    ///
    /// # Errors
    /// [`PlanError`] for each reason the target cannot be reached.
    pub fn compute(
        catalog: &Catalog,
        index: &WalIndex,
        req: &PlanRequest,
    ) -> Result<Self, PlanError> {
        if catalog.backups.is_empty() {
            return Err(PlanError::NoBackups);
        }
        let seg = index.segment_size();
        let candidates: Vec<&BackupRecord> = match &req.backup {
            Some(id) => vec![
                catalog
                    .backups
                    .iter()
                    .find(|b| &b.id == id)
                    .ok_or_else(|| PlanError::UnknownBackup(id.clone()))?,
            ],
            None => catalog.backups.iter().collect(),
        };
        // Each candidate with the timeline recovery from it would end on.
        let on_timeline: Vec<(&BackupRecord, TimelineId)> = candidates
            .iter()
            .filter_map(|b| {
                // 'latest' is the highest timeline in the archive, as PostgreSQL
                // resolves it, even if that is a branch someone abandoned.
                let tl = match req.timeline {
                    TargetTimeline::Latest => index
                        .newest_timeline()
                        .unwrap_or(b.timeline)
                        .max(b.timeline),
                    TargetTimeline::Current => b.timeline,
                    TargetTimeline::Id(t) => t,
                };
                index
                    .descends(tl, b.timeline, b.stop_lsn)
                    .then_some((*b, tl))
            })
            .collect();
        if req.timeline == TargetTimeline::Latest
            && let Some(newest) = index.newest_timeline()
            && let Some(d) = catalog
                .divergences(index)
                .into_iter()
                .find(|d| index.descends(newest, d.child, Lsn(0)))
        {
            return Err(PlanError::Diverged {
                divergence: d.to_string(),
                parent: d.parent,
                child: d.child,
            });
        }
        if on_timeline.is_empty() {
            let t = match req.timeline {
                TargetTimeline::Id(t) => t,
                _ => index.newest_timeline().unwrap_or(TimelineId(1)),
            };
            return Err(PlanError::NoBackupOnTimeline(t));
        }
        let which = match &req.backup {
            Some(id) => format!(", {id}, chosen with --backup"),
            None => String::new(),
        };
        let mut notes = Vec::new();
        let chosen = match &req.target {
            RecoveryTarget::Time(t) => on_timeline
                .iter()
                .rev()
                .find(|(b, _)| TargetTime::from_system_time(b.stop_time) <= *t)
                .ok_or_else(|| PlanError::BeforeWindow {
                    target: req.target.to_string(),
                    earliest: on_timeline
                        .iter()
                        .map(|(b, _)| TargetTime::from_system_time(b.stop_time))
                        .min()
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    which: which.clone(),
                })?,
            RecoveryTarget::Lsn(l) => on_timeline
                .iter()
                .rev()
                .find(|(b, _)| b.stop_lsn <= *l)
                .ok_or_else(|| PlanError::BeforeWindow {
                    target: req.target.to_string(),
                    earliest: on_timeline
                        .iter()
                        .map(|(b, _)| b.stop_lsn)
                        .min()
                        .map(|l| format!("LSN {l}"))
                        .unwrap_or_default(),
                    which: which.clone(),
                })?,
            RecoveryTarget::Xid(_) | RecoveryTarget::Name(_) => {
                // When a transaction committed or a restore point was made is
                // known only by replaying; the oldest backup reaches them all.
                if req.backup.is_none() && on_timeline.len() > 1 {
                    notes.push(
                        "a transaction's or restore point's position is known only by replay: \
                         starting from the oldest backup; pass --backup to start from a later one"
                            .to_owned(),
                    );
                }
                on_timeline.first().expect("non-empty")
            }
            RecoveryTarget::Immediate | RecoveryTarget::Latest => {
                on_timeline.last().expect("non-empty")
            }
        };
        let (backup, timeline) = (chosen.0, chosen.1);
        let target_timeline = timeline.to_string();

        // The tar holds the WAL up to the backup's end; past that, the archive.
        let last_in_tar = Lsn(backup.stop_lsn.0.saturating_sub(1)).segment(seg);
        let path = index.path(backup.timeline, last_in_tar, timeline);
        let newest = index.end_of(&path);
        let window = catalog.restorable_window();
        let newest_text = WalFileName::segment(WalIndex::timeline_for(&path, newest), newest, seg);
        let end = match &req.target {
            RecoveryTarget::Immediate => None,
            RecoveryTarget::Lsn(l) => {
                let want = l.segment(seg);
                if want > newest && !req.allow_incomplete {
                    return Err(PlanError::BeyondArchive {
                        target: req.target.to_string(),
                        newest: format!("{newest_text}, ending at LSN {}", newest.end(seg)),
                    });
                }
                // In the segment the stream is writing, only what it stored.
                let stream = catalog.stream_end().filter(|st| {
                    st.name
                        == WalFileName::segment(WalIndex::timeline_for(&path, newest), newest, seg)
                });
                if let Some(st) = stream
                    && want == newest
                    && *l > st.end
                    && !req.allow_incomplete
                {
                    return Err(PlanError::BeyondArchive {
                        target: req.target.to_string(),
                        newest: format!("{newest_text}, streamed to LSN {}", st.end),
                    });
                }
                Some(want.min(newest))
            }
            RecoveryTarget::Latest => Some(newest),
            RecoveryTarget::Time(t) => {
                // When the newest segment on this path was archived (other
                // timelines may have gone further), or the backup's end.
                let newest_name =
                    WalFileName::segment(WalIndex::timeline_for(&path, newest), newest, seg);
                let reach = catalog
                    .stored_time(&newest_name)
                    // S3 object times have one-second precision.
                    .map(|m| (m + std::time::Duration::from_secs(1)).max(backup.stop_time))
                    .or(Some(backup.stop_time));
                if reach.is_some_and(|end| TargetTime::from_system_time(end) < *t)
                    && !req.allow_incomplete
                {
                    let commit = window
                        .as_ref()
                        .and_then(|w| w.last_commit)
                        .map(|c| {
                            format!(
                                "; the newest commit in it is at {}",
                                TargetTime::from_system_time(c)
                            )
                        })
                        .unwrap_or_default();
                    return Err(PlanError::BeyondArchive {
                        target: req.target.to_string(),
                        newest: format!(
                            "{newest_text}, archived at {}{commit}",
                            TargetTime::from_system_time(reach.unwrap_or(SystemTime::UNIX_EPOCH))
                        ),
                    });
                }
                Some(newest)
            }
            RecoveryTarget::Xid(_) | RecoveryTarget::Name(_) => Some(newest),
        };
        let (mut wal_first, mut wal_last, mut wal_segments, mut wal_bytes) = (None, None, 0, 0);
        let mut wal_path = Vec::new();
        if let Some(mut end) = end.filter(|e| *e >= last_in_tar) {
            // Only the WAL up to the target is needed: for a time, up to the
            // first segment archived after it (it was closed after the
            // target, so it holds WAL written past it); for an LSN, its
            // segment (`end` already). A gap beyond is only a note.
            if let RecoveryTarget::Time(t) = &req.target {
                let archived: std::collections::HashMap<&WalFileName, SystemTime> = catalog
                    .wal
                    .iter()
                    .filter_map(|w| Some((&w.name, w.meta.modified?)))
                    .chain(
                        catalog
                            .streamed
                            .iter()
                            .filter_map(|st| Some((&st.name, st.modified?))),
                    )
                    .collect();
                let stamped_after = (last_in_tar.0..=end.0).map(SegmentNo).find(|s| {
                    let name = WalFileName::segment(WalIndex::timeline_for(&path, *s), *s, seg);
                    // S3 object times have one-second precision.
                    archived
                        .get(&name)
                        .is_some_and(|m| *m > t.system_time() + std::time::Duration::from_secs(1))
                });
                if let Some(s) = stamped_after {
                    end = s;
                }
            }
            let (all_missing, _) = index.missing(&path, last_in_tar, newest);
            let runs = gap_runs(&all_missing);
            let unknown_position =
                matches!(req.target, RecoveryTarget::Xid(_) | RecoveryTarget::Name(_));
            if let Some(&(tl, first, last)) = runs.iter().find(|(_, first, _)| *first <= end) {
                let range = index.range_text(tl, first, last);
                if !unknown_position {
                    return Err(PlanError::Gap {
                        range,
                        backup: backup.id.clone(),
                    });
                }
                if !req.allow_incomplete {
                    return Err(PlanError::GapBeforeUnknownTarget {
                        range,
                        backup: backup.id.clone(),
                    });
                }
                end = SegmentNo(first.0 - 1);
                notes.push(format!(
                    "--allow-incomplete: replaying only up to the gap at {range}; if the target \
                     lies beyond it, recovery stops there with an error"
                ));
            } else if let Some(&(tl, first, last)) = runs.first() {
                notes.push(format!(
                    "a gap at {} after your target: later targets are not restorable from this \
                     backup",
                    index.range_text(tl, first, last)
                ));
            }
            wal_path = (last_in_tar.0..=end.0)
                .map(|s| {
                    WalFileName::segment(
                        WalIndex::timeline_for(&path, SegmentNo(s)),
                        SegmentNo(s),
                        seg,
                    )
                })
                .collect();
            let wanted: std::collections::HashSet<&WalFileName> = wal_path.iter().collect();
            for w in &catalog.wal {
                if wanted.contains(&w.name) {
                    wal_segments += 1;
                    wal_bytes += w.meta.size;
                }
            }
            wal_first = wal_path.first().map(ToString::to_string);
            wal_last = wal_path.last().map(ToString::to_string);
        }
        Ok(RestorePlan {
            disk_needed: backup.raw_bytes + DISK_WAL_SEGMENTS * u64::from(backup.wal_segment_size),
            backup_bytes: backup.stored_bytes,
            backup: backup.clone(),
            timeline,
            target_timeline,
            wal_first,
            wal_last,
            wal_segments,
            wal_bytes,
            window,
            notes,
            last_commit: None,
            wal_summarized: 0,
            recover_to: req.target.clone(),
            wal_path,
            expected_end: None,
        })
    }

    /// Checks the plan against what the WAL summaries of its segments say
    /// ([`path_facts`] of [`RestorePlan::wal_path`]) and settles the target
    /// PostgreSQL is given:
    /// - damage before the target is refused (or, with
    ///   `--allow-incomplete`, replay ends just before it);
    /// - a time after the newest commit becomes that commit's LSN: the state
    ///   at such a time is everything committed, and PostgreSQL cannot reach
    ///   a time no record carries;
    /// - `latest` becomes the start of the last readable record, so that
    ///   PostgreSQL refuses to promote short of it;
    /// - a restore point that is not there is refused.
    ///
    /// # Errors
    /// [`PlanError::Damaged`] and [`PlanError::UnknownRestorePoint`].
    pub fn apply_wal_facts(
        &mut self,
        req: &PlanRequest,
        facts: &PathFacts,
        archive_last_commit: Option<&XactPoint>,
    ) -> Result<(), PlanError> {
        let time = |micros: i64| {
            TargetTime {
                micros,
                assumed_utc: false,
            }
            .to_string()
        };
        self.wal_summarized = facts.summarized;
        self.last_commit = facts.last_commit.as_ref().map(|c| time(c.time_us));
        let unsummarized = facts.segments - facts.summarized;
        if unsummarized > 0 {
            self.notes.push(format!(
                "{unsummarized} of the {} segments replayed have no WAL summary (archived before \
                 summaries existed, or not readable): damage in them is found only by replay. \
                 `pitr-agent verify --summarize` makes them",
                facts.segments
            ));
        }
        let before = facts
            .last_commit
            .as_ref()
            .map_or("(none since the backup)".to_owned(), |c| time(c.time_us));
        if let Some((segment, d)) = &facts.stop {
            let beyond = match &req.target {
                RecoveryTarget::Time(t) => facts
                    .last_commit
                    .as_ref()
                    .is_none_or(|c| c.time_us < t.micros),
                RecoveryTarget::Lsn(l) => *l > d.lsn,
                RecoveryTarget::Immediate => false,
                RecoveryTarget::Latest | RecoveryTarget::Xid(_) | RecoveryTarget::Name(_) => true,
            };
            if beyond && !req.allow_incomplete {
                return Err(PlanError::Damaged {
                    segment: segment.to_string(),
                    lsn: d.lsn.to_string(),
                    reason: d.reason.clone(),
                    before,
                    archived: facts
                        .archived_last_commit
                        .as_ref()
                        .map_or("(none)".to_owned(), |c| time(c.time_us)),
                });
            }
            if beyond {
                self.notes.push(format!(
                    "--allow-incomplete: WAL is damaged at {} in {segment}; replay ends before it, \
                     at the last commit {before}",
                    d.lsn
                ));
                if let Some(l) = facts.last_complete {
                    self.recover_to = RecoveryTarget::Lsn(l);
                    self.expected_end = facts.end;
                }
            }
        } else if facts.last_summarized {
            match &req.target {
                // The newest commit of the whole archive on this plan's
                // timeline (not of the segments up to the target: which
                // segment was stored after a time says little when archiving
                // was slow).
                RecoveryTarget::Time(t) => match archive_last_commit {
                    Some(c) if c.time_us < t.micros && c.lsn >= self.backup.stop_lsn => {
                        self.notes.push(format!(
                            "nothing was committed between {} and the target; recovering to that \
                             last commit (transaction {}, LSN {})",
                            time(c.time_us),
                            c.xid,
                            c.lsn
                        ));
                        // Its transaction id: PostgreSQL stops right after it
                        // and reports it as the last replayed transaction. An
                        // id reused after wraparound stops earlier, which the
                        // replay check catches.
                        self.recover_to = if c.xid != 0 {
                            RecoveryTarget::Xid(u64::from(c.xid))
                        } else {
                            RecoveryTarget::Lsn(c.lsn)
                        };
                        self.expected_end = Some(c.end);
                    }
                    Some(c) if c.time_us < t.micros => {
                        self.notes.push(format!(
                            "nothing was committed between {} (before the backup's end) and the \
                             target; recovering to the backup's end",
                            time(c.time_us)
                        ));
                        self.recover_to = RecoveryTarget::Immediate;
                    }
                    _ => {}
                },
                RecoveryTarget::Latest => {
                    if let Some(l) = facts.last_complete {
                        self.recover_to = RecoveryTarget::Lsn(l);
                        self.expected_end = facts.end;
                    }
                }
                RecoveryTarget::Name(n)
                    if unsummarized == 0 && !facts.restore_points.iter().any(|r| &r.name == n) =>
                {
                    let mut names: Vec<String> = facts
                        .restore_points
                        .iter()
                        .map(|r| format!("{:?}", r.name))
                        .collect();
                    names.dedup();
                    return Err(PlanError::UnknownRestorePoint {
                        name: n.clone(),
                        backup: self.backup.id.clone(),
                        known: if names.is_empty() {
                            "there are none".to_owned()
                        } else {
                            format!("there are {}", names.join(", "))
                        },
                    });
                }
                _ => {}
            }
        } else if req.target == RecoveryTarget::Latest {
            self.notes.push(
                "the newest segment has no WAL summary: whether replay reaches the archive's end \
                 cannot be checked"
                    .to_owned(),
            );
        }
        Ok(())
    }
}

/// Plans a restore as [`RestorePlan::compute`] does, then reads the WAL
/// summaries of the segments it replays (making the newest two from the
/// WAL where none is stored) and applies them
/// ([`RestorePlan::apply_wal_facts`]).
///
/// # Errors
/// [`PlanError`], or reading the summaries fails (as text).
pub async fn plan_restore(
    repo: &crate::repository::Repository,
    catalog: &Catalog,
    index: &WalIndex,
    req: &PlanRequest,
) -> anyhow::Result<RestorePlan> {
    let mut plan = RestorePlan::compute(catalog, index, req)?;
    let newest: Vec<WalFileName> = plan.wal_path.iter().rev().take(2).cloned().collect();
    let found =
        crate::archive::summary::read_summaries(repo, &catalog.summaries, &plan.wal_path, &newest)
            .await
            .map_err(|e| anyhow::anyhow!("read the WAL summaries in {}: {e}", repo.url))?;
    let path: Vec<(WalFileName, Option<&crate::wal::summary::SegmentSummary>)> = plan
        .wal_path
        .iter()
        .map(|n| (n.clone(), found.get(n)))
        .collect();
    // The archive's newest commit, when it lies on this plan's timeline.
    let archive_last = catalog.archive_end.as_ref().and_then(|e| {
        let c = e.last_commit.as_ref()?;
        let seg = e.last_commit_segment.as_ref()?;
        (e.resolved && index.descends(plan.timeline, seg.timeline(), c.lsn)).then_some(c)
    });
    plan.apply_wal_facts(req, &path_facts(&path), archive_last)?;
    Ok(plan)
}

/// Missing segments grouped into runs of consecutive numbers on one
/// timeline: `(timeline, first, last)`, oldest first.
fn gap_runs(missing: &[(TimelineId, SegmentNo)]) -> Vec<(TimelineId, SegmentNo, SegmentNo)> {
    let mut runs: Vec<(TimelineId, SegmentNo, SegmentNo)> = Vec::new();
    for &(tl, s) in missing {
        match runs.last_mut() {
            Some((rtl, _, last)) if *rtl == tl && last.0 + 1 == s.0 => *last = s,
            _ => runs.push((tl, s, s)),
        }
    }
    runs
}
