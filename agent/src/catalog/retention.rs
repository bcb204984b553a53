//! Retention: which backups, WAL and debris `prune` deletes.
//!
//! [`RetentionPlan::compute`] is pure (catalog, policy, clock in; plan out),
//! so every rule is unit-tested without a repository. Applying a plan lives in
//! the `prune` module.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::backup::{BackupId, Catalog};
use crate::wal::{SegmentNo, TimelineId, WalFileKind, WalFileName, WalIndex};

/// What to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionPolicy {
    /// Keep the newest N backups.
    pub retain_full: Option<usize>,
    /// Keep every point of the last D days restorable.
    pub retain_days: Option<u32>,
    /// Incomplete backups older than this are debris.
    pub debris_grace: Duration,
    /// A filestore file goes only once its removal was recorded this long
    /// before the oldest kept backup started (clock differences).
    pub filestore_margin: Duration,
}

/// Why a policy cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Nothing says what to keep.
    #[error("no retention policy: give --retain-full N and/or --retain-days D")]
    Missing,
    /// A count of zero would delete every backup.
    #[error("--retain-full 0 would delete every backup; keep at least 1")]
    ZeroCount,
}

/// What prune will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RetentionPlan {
    /// Backups kept, oldest first (the live timeline's last), with the reason.
    pub keep: Vec<Kept>,
    /// Backups deleted, oldest first.
    pub delete_backups: Vec<BackupId>,
    /// WAL files deleted: older than every kept backup's start.
    pub delete_wal: Vec<String>,
    /// Their stored bytes.
    pub delete_wal_bytes: u64,
    /// Incomplete backups past the grace period.
    pub delete_debris: Vec<BackupId>,
    /// Filestore objects whose file was removed from the volume before the
    /// oldest kept backup started (see [`crate::filestore::deletable`]).
    pub delete_filestore: Vec<String>,
    /// Their stored bytes.
    pub delete_filestore_bytes: u64,
    /// The oldest segment number still needed, if any backup is kept.
    #[serde(skip)]
    pub wal_floor: Option<SegmentNo>,
    /// The segment size the floor counts in.
    #[serde(skip)]
    pub segment_size: u32,
    /// The summaries of the WAL deleted.
    #[serde(skip)]
    pub delete_summaries: Vec<crate::storage::ObjectKey>,
}

/// A kept backup and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Kept {
    /// The backup.
    pub id: BackupId,
    /// Which rule keeps it.
    pub reason: &'static str,
}

impl RetentionPlan {
    /// Plans retention for `catalog` under `policy` at time `now`.
    ///
    /// Both policies may be given; a backup either of them keeps is kept. The
    /// newest backup is always kept. WAL below the oldest kept backup's start
    /// segment is deleted, on every timeline; `.history` files never are.
    ///
    /// # Errors
    /// [`PolicyError`] when the policy keeps nothing by construction.
    pub fn compute(
        catalog: &Catalog,
        index: &WalIndex,
        policy: &RetentionPolicy,
        now: SystemTime,
    ) -> Result<Self, PolicyError> {
        if policy.retain_full.is_none() && policy.retain_days.is_none() {
            return Err(PolicyError::Missing);
        }
        if policy.retain_full == Some(0) {
            return Err(PolicyError::ZeroCount);
        }
        // "Newest" follows the timeline graph, not LSNs: after a restore, the
        // live timeline's first backup can have a smaller LSN than backups of
        // the abandoned one. The live timeline's backups rank newest, each
        // group by time, so the live cluster never loses its newest backup.
        let live = catalog
            .wal
            .iter()
            .map(|w| w.name.timeline())
            .chain(catalog.backups.iter().map(|b| b.timeline))
            .chain(index.newest_timeline())
            .max();
        let mut backups: Vec<&super::backup::BackupRecord> = catalog.backups.iter().collect();
        backups.sort_by_key(|b| (Some(b.timeline) == live, b.stop_time));
        let count = backups.len();
        let mut reasons: Vec<Option<&'static str>> = vec![None; count];
        if let Some(n) = policy.retain_full {
            for reason in reasons.iter_mut().skip(count.saturating_sub(n)) {
                *reason = Some("retain-full");
            }
        }
        if let Some(days) = policy.retain_days {
            let cutoff = now
                .checked_sub(Duration::from_secs(u64::from(days) * 86_400))
                .unwrap_or(SystemTime::UNIX_EPOCH);
            // Every backup that ended inside the window, plus, for the live
            // timeline and every timeline a kept backup is on, the newest one
            // that ended before it and from which recovery reaches that
            // timeline: where a restore to the window's start begins. Not
            // the newest by time alone: after a restore, the newest backup
            // before the window may lie on the abandoned branch.
            for (i, b) in backups.iter().enumerate() {
                if b.stop_time > cutoff {
                    reasons[i].get_or_insert("retain-days");
                }
            }
            let mut timelines: Vec<TimelineId> = backups
                .iter()
                .zip(&reasons)
                .filter(|(_, r)| r.is_some())
                .map(|(b, _)| b.timeline)
                .chain(live)
                .collect();
            timelines.sort();
            timelines.dedup();
            for tl in timelines {
                let anchor = backups
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| {
                        b.stop_time <= cutoff && index.descends(tl, b.timeline, b.stop_lsn)
                    })
                    .max_by_key(|(_, b)| b.stop_time)
                    .map(|(i, _)| i);
                if let Some(i) = anchor {
                    reasons[i].get_or_insert("retain-days (covers the window's start)");
                }
            }
        }
        if let Some(last) = reasons.last_mut() {
            last.get_or_insert("newest backup");
        }
        let mut keep = Vec::new();
        let mut delete_backups = Vec::new();
        for (b, reason) in backups.iter().zip(&reasons) {
            match reason {
                Some(reason) => keep.push(Kept {
                    id: b.id.clone(),
                    reason,
                }),
                None => delete_backups.push(b.id.clone()),
            }
        }
        let wal_floor = backups
            .iter()
            .zip(&reasons)
            .filter(|(_, r)| r.is_some())
            .map(|(b, _)| b.start_segment())
            .min();
        let segment_size = catalog.segment_size();
        let mut delete_wal = Vec::new();
        let mut delete_wal_bytes = 0;
        let mut delete_summaries = Vec::new();
        if let Some(floor) = wal_floor {
            for w in &catalog.wal {
                if is_deletable_wal(&w.name, floor, segment_size) {
                    delete_wal.push(w.name.to_string());
                    delete_wal_bytes += w.meta.size;
                    if let Some(e) = catalog.summaries.get(&w.name) {
                        delete_summaries.push(e.key.clone());
                    }
                }
            }
        }
        let delete_debris = catalog
            .incomplete
            .iter()
            .filter(|inc| !inc.damaged_record)
            .filter(|inc| {
                inc.id
                    .time()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age >= policy.debris_grace)
            })
            .map(|inc| inc.id.clone())
            .collect();
        Ok(RetentionPlan {
            keep,
            delete_backups,
            delete_wal,
            delete_wal_bytes,
            delete_debris,
            delete_filestore: Vec::new(),
            delete_filestore_bytes: 0,
            wal_floor,
            segment_size,
            delete_summaries,
        })
    }

    /// Whether the plan deletes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.delete_backups.is_empty()
            && self.delete_wal.is_empty()
            && self.delete_debris.is_empty()
            && self.delete_filestore.is_empty()
    }

    /// When the oldest kept backup started: nothing restorable is older.
    #[must_use]
    pub fn oldest_kept_start(&self, catalog: &Catalog) -> Option<SystemTime> {
        self.keep
            .iter()
            .filter_map(|k| catalog.backups.iter().find(|b| b.id == k.id))
            .map(|b| b.start_time)
            .min()
    }
}

/// Whether `name` lies wholly before segment `floor`. History files are
/// always kept: they are tiny, and recovery needs every one of them to pick
/// a fresh timeline.
fn is_deletable_wal(name: &WalFileName, floor: SegmentNo, segment_size: u32) -> bool {
    match name.kind() {
        WalFileKind::TimelineHistory => false,
        WalFileKind::Segment | WalFileKind::Partial | WalFileKind::BackupHistory => name
            .segment_no(segment_size)
            .is_some_and(|segno| segno < floor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::backup::{BackupRecord, Incomplete, WalObject};
    use crate::storage::{ObjectKey, ObjectMeta};
    use crate::wal::{DEFAULT_SEGMENT_SIZE, TimelineHistory};

    /// The catalog's WAL indexed, without histories (each test that has a
    /// fork gives its history).
    fn index_of(c: &Catalog) -> WalIndex {
        c.wal_index(std::collections::HashMap::new())
    }

    const DAY: u64 = 86_400;

    fn at(days: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + days * DAY)
    }

    /// A backup that ended on `day`, starting at segment `segno`.
    fn backup(day: u64, segno: u64) -> BackupRecord {
        crate::catalog::backup::test_support::record(1, segno, at(day))
    }

    fn wal(name: &str) -> WalObject {
        WalObject {
            name: name.parse().expect("valid"),
            meta: ObjectMeta {
                key: ObjectKey::new(format!("wal/{name}.gz")).expect("key"),
                size: 10,
                modified: None,
            },
        }
    }

    /// Backups ending on days 0, 7, 14, 21 at segments 0x10, 0x20, 0x30, 0x40, and WAL around them.
    fn catalog() -> Catalog {
        let mut c = Catalog::default();
        for (day, seg) in [(0, 0x10), (7, 0x20), (14, 0x30), (21, 0x40)] {
            c.backups.push(backup(day, seg));
        }
        for name in [
            "000000010000000000000010",
            "00000001000000000000001F",
            "000000010000000000000020",
            "000000010000000000000020.00000028.backup",
            "00000002.history",
            "00000001000000000000002F.partial",
            "00000002000000000000002F",
            "000000020000000000000041",
        ] {
            c.wal.push(wal(name));
        }
        c
    }

    fn policy(full: Option<usize>, days: Option<u32>) -> RetentionPolicy {
        RetentionPolicy {
            retain_full: full,
            retain_days: days,
            debris_grace: Duration::from_secs(DAY),
            filestore_margin: Duration::from_secs(3600),
        }
    }

    fn ids(plan: &[BackupId], c: &Catalog) -> Vec<usize> {
        plan.iter()
            .map(|id| c.backups.iter().position(|b| &b.id == id).expect("known"))
            .collect()
    }

    /// B1-B5 on timeline 1; a restore to before B4 starts timeline 2 at
    /// segment 0x35; its first backup C1 (0x36) has a smaller LSN than B4.
    #[test]
    fn the_live_timelines_newest_backup_and_its_wal_survive_a_count() {
        let mut c = Catalog::default();
        for (day, seg) in [(0, 0x10), (1, 0x20), (2, 0x30), (3, 0x40), (4, 0x50)] {
            c.backups.push(backup(day, seg));
        }
        let mut c1 = backup(5, 0x36);
        c1.timeline = TimelineId(2);
        c1.start_timeline = TimelineId(2);
        // The catalog orders by LSN: C1 sits between B3 and B4.
        c.backups.insert(3, c1);
        for name in [
            "000000010000000000000030",
            "000000010000000000000035",
            "000000010000000000000050",
            "00000002.history",
            "000000020000000000000035",
            "000000020000000000000036",
            "000000020000000000000037",
        ] {
            c.wal.push(wal(name));
        }
        let plan =
            RetentionPlan::compute(&c, &index_of(&c), &policy(Some(2), None), at(6)).expect("plan");
        let kept: Vec<usize> = plan
            .keep
            .iter()
            .map(|k| c.backups.iter().position(|b| b.id == k.id).expect("known"))
            .collect();
        assert_eq!(kept, vec![5, 3], "B5, then C1 (live timeline) newest");
        assert_eq!(ids(&plan.delete_backups, &c), vec![0, 1, 2, 4]);
        assert_eq!(plan.wal_floor, Some(SegmentNo(0x36)));
        for needed in [
            "000000020000000000000036",
            "000000020000000000000037",
            "000000010000000000000050",
        ] {
            assert!(!plan.delete_wal.iter().any(|w| w == needed), "{needed}");
        }
        // With one kept, it is C1, not B5 (the higher LSN).
        let plan =
            RetentionPlan::compute(&c, &index_of(&c), &policy(Some(1), None), at(6)).expect("plan");
        assert_eq!(plan.keep.len(), 1);
        assert_eq!(plan.keep[0].id, c.backups[3].id);
    }

    #[test]
    fn count_keeps_the_newest_and_the_wal_they_need() {
        let c = catalog();
        let plan = RetentionPlan::compute(&c, &index_of(&c), &policy(Some(2), None), at(22))
            .expect("plan");
        assert_eq!(ids(&plan.delete_backups, &c), vec![0, 1]);
        assert_eq!(plan.keep.len(), 2);
        assert_eq!(plan.wal_floor, Some(SegmentNo(0x30)));
        assert_eq!(
            plan.delete_wal,
            vec![
                "000000010000000000000010",
                "00000001000000000000001F",
                "000000010000000000000020",
                "000000010000000000000020.00000028.backup",
                "00000001000000000000002F.partial",
                "00000002000000000000002F",
            ]
        );
        assert_eq!(plan.delete_wal_bytes, 60);
    }

    #[test]
    fn window_keeps_the_backup_that_covers_its_start() {
        let c = catalog();
        // Window of 10 days on day 22: from day 12. Backup of day 14 and 21 are
        // inside; day 7 is the newest before the window, so it stays too.
        let plan = RetentionPlan::compute(&c, &index_of(&c), &policy(None, Some(10)), at(22))
            .expect("plan");
        assert_eq!(ids(&plan.delete_backups, &c), vec![0]);
        assert_eq!(
            plan.keep[0].reason,
            "retain-days (covers the window's start)"
        );
        assert_eq!(plan.wal_floor, Some(SegmentNo(0x20)));
        assert!(
            plan.delete_wal
                .iter()
                .all(|w| w.as_str() < "000000010000000000000020")
        );
        // A window starting exactly at a backup's end: that backup covers the
        // start, and the one before it is no longer needed.
        let plan = RetentionPlan::compute(&c, &index_of(&c), &policy(None, Some(7)), at(21))
            .expect("plan");
        assert_eq!(ids(&plan.delete_backups, &c), vec![0, 1]);
    }

    #[test]
    fn both_policies_keep_the_union() {
        let c = catalog();
        let plan = RetentionPlan::compute(&c, &index_of(&c), &policy(Some(3), Some(1)), at(22))
            .expect("plan");
        assert_eq!(ids(&plan.delete_backups, &c), vec![0]);
    }

    #[test]
    fn the_newest_backup_always_survives() {
        let c = catalog();
        // Every backup is older than the window: the newest still covers it.
        let plan = RetentionPlan::compute(&c, &index_of(&c), &policy(None, Some(1)), at(400))
            .expect("plan");
        assert_eq!(ids(&plan.delete_backups, &c), vec![0, 1, 2]);
        assert_eq!(plan.keep.len(), 1);
        assert!(RetentionPlan::compute(&c, &index_of(&c), &policy(Some(0), None), at(22)).is_err());
        assert_eq!(
            RetentionPlan::compute(&c, &index_of(&c), &policy(None, None), at(22)),
            Err(PolicyError::Missing)
        );
    }

    #[test]
    fn without_backups_nothing_but_debris_goes() {
        let mut c = catalog();
        c.backups.clear();
        let old = BackupId::at(at(20));
        let fresh = BackupId::at(at(22) - Duration::from_secs(60));
        let damaged = BackupId::at(at(19));
        for (id, damaged_record) in [(&old, false), (&fresh, false), (&damaged, true)] {
            c.incomplete.push(Incomplete {
                id: id.clone(),
                objects: vec![],
                reason: String::new(),
                damaged_record,
            });
        }
        let plan = RetentionPlan::compute(&c, &index_of(&c), &policy(Some(1), None), at(22))
            .expect("plan");
        assert!(plan.delete_backups.is_empty() && plan.delete_wal.is_empty());
        // A damaged record of a complete backup is never debris.
        assert_eq!(plan.delete_debris, vec![old]);
    }

    #[test]
    fn history_files_are_never_deleted() {
        let name: WalFileName = "00000002.history".parse().expect("valid");
        assert!(!is_deletable_wal(
            &name,
            SegmentNo(u64::MAX),
            DEFAULT_SEGMENT_SIZE
        ));
    }

    /// B8 and B9 on timeline 1; a restore to a time between them forks
    /// timeline 2 at segment 0x25; C1 is timeline 2's first backup. With
    /// the window's start between B9's end and C1's end, the backup that
    /// covers it is B8 (timeline 2 descends from it), not B9 (after the
    /// fork, on the abandoned branch), and timeline 2's first segments stay.
    #[test]
    fn the_window_start_is_covered_on_the_live_timeline_after_a_restore() {
        let mut c = Catalog::default();
        c.backups.push(backup(0, 0x20)); // B8
        c.backups.push(backup(2, 0x30)); // B9, after the fork at 0x25
        let mut c1 = backup(4, 0x28);
        c1.timeline = TimelineId(2);
        c1.start_timeline = TimelineId(2);
        c.backups.insert(1, c1);
        for name in [
            "000000010000000000000020",
            "000000010000000000000024",
            "000000010000000000000025",
            "000000010000000000000030",
            "00000002.history",
            "000000020000000000000025",
            "000000020000000000000026",
            "000000020000000000000028",
        ] {
            c.wal.push(wal(name));
        }
        let mut histories = std::collections::HashMap::new();
        let seg = u64::from(DEFAULT_SEGMENT_SIZE);
        histories.insert(
            TimelineId(2),
            TimelineHistory::parse(
                TimelineId(2),
                &format!("1\t0/{:X}\tno recovery target\n", 0x25 * seg + 0x100),
            )
            .expect("history"),
        );
        let index = c.wal_index(histories);
        // The window (3 days) starts on day 1 at `now` = day 4: after B8's
        // end (day 0), before B9's (day 2) and C1's (day 4).
        let plan = RetentionPlan::compute(
            &c,
            &index,
            &policy(None, Some(3)),
            at(4) + Duration::from_secs(60),
        )
        .expect("plan");
        let kept: Vec<&str> = plan.keep.iter().map(|k| k.reason).collect();
        let kept_ids: Vec<&BackupId> = plan.keep.iter().map(|k| &k.id).collect();
        let (b8, c1, b9) = (&c.backups[0].id, &c.backups[1].id, &c.backups[2].id);
        assert!(
            kept_ids.contains(&b8),
            "B8 covers the window's start on timeline 2: {kept:?}"
        );
        assert!(kept_ids.contains(&c1));
        // B9 is kept by the window itself (it ended inside it), never as
        // the backup that covers the start.
        assert!(
            plan.keep
                .iter()
                .any(|k| &k.id == b9 && k.reason == "retain-days")
        );
        assert_eq!(plan.wal_floor, Some(SegmentNo(0x20)));
        for needed in [
            "000000020000000000000025",
            "000000020000000000000026",
            "000000010000000000000024",
        ] {
            assert!(
                !plan.delete_wal.iter().any(|w| w == needed),
                "{needed} is needed"
            );
        }
        // Moved on so that B9 has left the window too: B8 still covers it
        // for timeline 2, and B9 goes.
        let plan = RetentionPlan::compute(
            &c,
            &index,
            &policy(None, Some(1)),
            at(4) + Duration::from_secs(60),
        )
        .expect("plan");
        let kept_ids: Vec<&BackupId> = plan.keep.iter().map(|k| &k.id).collect();
        assert!(
            kept_ids.contains(&b8) && kept_ids.contains(&c1),
            "{:?}",
            plan.keep
        );
        assert!(plan.delete_backups.contains(b9), "{:?}", plan.keep);
    }
}
