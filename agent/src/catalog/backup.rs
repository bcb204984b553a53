//! Base backups in the repository: their ids, their keys, the `backup.json`
//! record that commits each one, and the catalog read back from a listing.
//!
//! A backup exists only once its `backup.json` does; everything else under
//! `backups/<id>/` without one is debris from an interrupted run.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::compress::{Sha256Digest, gunzip_verified};
use crate::pgdata::SystemId;
use crate::storage::{ObjectKey, ObjectMeta, Storage, StorageError};
use crate::wal::{Lsn, SegmentNo, TimelineHistory, TimelineId, WalFileKind, WalFileName, WalIndex};

use super::{WAL_PREFIX, wal_name_of};

/// The prefix under which backups live.
pub const BACKUPS_PREFIX: &str = "backups/";
/// The record that commits a backup; written last.
pub const RECORD_FILE: &str = "backup.json";
/// Written first, so that an interrupted backup is visible as debris.
pub const STARTED_FILE: &str = "started.json";
/// The compressed tar of the data directory.
pub const DATA_FILE: &str = "base.tar.gz";
/// PostgreSQL's `backup_manifest`, as pg_basebackup produced it.
pub const MANIFEST_FILE: &str = "backup_manifest";
/// The `backup.json` format this build writes and reads.
pub const RECORD_FORMAT: u32 = 1;

/// A backup id: the UTC time it started, `YYYYMMDDTHHMMSSZ`, so ids sort by age.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

impl BackupId {
    /// The id for a backup starting at `time`.
    #[must_use]
    pub fn at(time: SystemTime) -> Self {
        let text = humantime::format_rfc3339_seconds(time).to_string();
        // 2026-11-22T06:52:00Z -> 20261122T065200Z
        BackupId(text.replace(['-', ':'], ""))
    }

    /// When the backup started, from the id.
    #[must_use]
    pub fn time(&self) -> Option<SystemTime> {
        let s = &self.0;
        let rfc = format!(
            "{}-{}-{}T{}:{}:{}Z",
            s.get(0..4)?,
            s.get(4..6)?,
            s.get(6..8)?,
            s.get(9..11)?,
            s.get(11..13)?,
            s.get(13..15)?
        );
        humantime::parse_rfc3339(&rfc).ok()
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix holding this backup's objects.
    #[must_use]
    pub fn prefix(&self) -> String {
        format!("{BACKUPS_PREFIX}{}/", self.0)
    }

    /// The key of one of this backup's files.
    #[must_use]
    pub fn key(&self, file: &str) -> ObjectKey {
        ObjectKey::new(format!("{}{file}", self.prefix()))
            .expect("ids and file names are valid keys")
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for BackupId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let id = BackupId(s.to_owned());
        let suffix_ok = s.get(16..).is_none_or(|rest| {
            rest.is_empty()
                || rest
                    .strip_prefix('-')
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty())
        });
        if s.len() >= 16 && s.as_bytes()[15] == b'Z' && suffix_ok && id.time().is_some() {
            Ok(id)
        } else {
            Err(format!(
                "invalid backup id {s:?}: expected the form 20261122T020000Z, as `pitr-agent list` shows"
            ))
        }
    }
}

impl TryFrom<String> for BackupId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> Self {
        id.0
    }
}

/// `databases.json`, beside `backup.json`: the databases when the backup
/// started, each with its directory `base/<oid>/` and that directory's size
/// in the backup. Not in `objects` (older backups lack it, and a restore
/// that cannot read it restores every database).
pub const DATABASES_FILE: &str = "databases.json";

/// One database of a backup (see [`DATABASES_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DatabaseFiles {
    /// `datname`.
    pub name: String,
    /// Its OID: the files are under `base/<oid>/`.
    pub oid: u32,
    /// The size of `base/<oid>/` in the backup.
    pub bytes: u64,
}

/// A stored object of a backup, with its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoredObject {
    /// The file name inside the backup's prefix.
    pub name: String,
    /// Stored bytes.
    pub bytes: u64,
    /// SHA-256 of the stored bytes, hex.
    pub sha256: Sha256Digest,
}

/// `backup.json`: everything needed to list, verify and restore a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BackupRecord {
    /// Format version.
    pub format: u32,
    /// The id.
    pub id: BackupId,
    /// The label given to PostgreSQL.
    pub label: String,
    /// The cluster's system identifier, decimal.
    pub system_identifier: SystemId,
    /// `server_version_num`, e.g. 150018.
    pub pg_version: u32,
    /// The WAL segment size in bytes.
    pub wal_segment_size: u32,
    /// Timeline where the backup starts.
    pub start_timeline: TimelineId,
    /// Timeline where it becomes consistent.
    pub timeline: TimelineId,
    /// `START WAL LOCATION`.
    #[serde(with = "lsn_text")]
    pub start_lsn: Lsn,
    /// The LSN where the backup is consistent (end of the WAL range).
    #[serde(with = "lsn_text")]
    pub stop_lsn: Lsn,
    /// The first WAL segment the backup needs.
    pub first_wal: WalFileName,
    /// The last WAL segment the backup needs.
    pub last_wal: WalFileName,
    /// Whether that WAL is inside the tar (`pg_wal/`), so the backup restores alone.
    pub wal_included: bool,
    /// When the backup started (before `pg_basebackup` was launched), RFC 3339.
    #[serde(with = "time_text")]
    pub start_time: SystemTime,
    /// When it ended (after `pg_basebackup` finished), RFC 3339.
    #[serde(with = "time_text")]
    pub stop_time: SystemTime,
    /// Bytes of the uncompressed tar.
    pub raw_bytes: u64,
    /// Bytes stored, over all objects.
    pub stored_bytes: u64,
    /// The checksum algorithm of `backup_manifest`'s per-file checksums.
    pub manifest_checksums: String,
    /// Every object of the backup except this record.
    pub objects: Vec<StoredObject>,
    /// The tool and version that took it.
    pub created_by: String,
}

impl BackupRecord {
    /// How long the backup took.
    #[must_use]
    pub fn duration(&self) -> Duration {
        self.stop_time
            .duration_since(self.start_time)
            .unwrap_or_default()
    }

    /// The segment number where the backup's WAL starts.
    #[must_use]
    pub fn start_segment(&self) -> SegmentNo {
        self.start_lsn.segment(self.wal_segment_size)
    }
}

mod lsn_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::wal::Lsn;

    pub fn serialize<S: Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(lsn)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Lsn, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// RFC 3339 timestamps in UTC.
pub mod time_text {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `2026-11-22T06:52:00.123Z`.
    ///
    /// # Errors
    /// As the serializer's.
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }

    /// Reads RFC 3339 in UTC.
    ///
    /// # Errors
    /// Not a UTC RFC 3339 time.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }
}

/// A backup directory without a readable `backup.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incomplete {
    /// The id.
    pub id: BackupId,
    /// What is there.
    pub objects: Vec<ObjectMeta>,
    /// Why it does not count: missing or unreadable record.
    pub reason: String,
    /// Its `backup.json` exists but cannot be used (damaged, another
    /// backup's, or a newer format): a complete backup whose record needs
    /// attention, never debris for prune.
    pub damaged_record: bool,
}

/// One archived WAL object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalObject {
    /// The WAL file it holds.
    pub name: WalFileName,
    /// Its metadata.
    pub meta: ObjectMeta,
}

/// What the repository holds, from one listing.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Committed backups, oldest first (by stop LSN, then id).
    pub backups: Vec<BackupRecord>,
    /// Backup directories that do not count.
    pub incomplete: Vec<Incomplete>,
    /// Every WAL object, sorted by name.
    pub wal: Vec<WalObject>,
    /// Streamed segments with no complete copy yet, sorted by name: how far
    /// each reaches (see [`super::partial`]).
    pub streamed: Vec<super::partial::StreamedSegment>,
    /// Restore rehearsals: the newest, the newest that succeeded, counts.
    pub rehearsals: super::rehearsals::Rehearsals,
    /// The stored WAL summaries, by WAL file.
    pub summaries: HashMap<WalFileName, super::SummaryEntry>,
    /// Where the archived WAL ends, once resolved from the summaries
    /// (`crate::archive::summary::resolve_archive_end`).
    pub archive_end: Option<ArchiveEnd>,
}

/// Where the archived WAL of the newest timeline ends, read from the
/// summaries of its newest segments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ArchiveEnd {
    /// The newest commit.
    pub last_commit: Option<crate::wal::summary::XactPoint>,
    /// The segment that holds it.
    pub last_commit_segment: Option<WalFileName>,
    /// Restore points, oldest first, of every timeline.
    pub restore_points: Vec<(WalFileName, crate::wal::summary::RestorePoint)>,
    /// Segments whose records cannot all be read.
    pub damaged: Vec<WalFileName>,
    /// Whether the newest commit was found (or there is none since the
    /// newest backup): else the window's end stays an estimate.
    pub resolved: bool,
    /// Timelines that both grew after their fork.
    pub diverged: Vec<Divergence>,
    /// Holes in the live timeline's WAL: each ends the window, which
    /// resumes at the first backup after it, if there is one.
    pub gaps: Vec<WindowGap>,
}

/// A hole in the WAL that splits (or ends) the restorable window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct WindowGap {
    /// The missing segments.
    pub missing: String,
    /// When the WAL before it was stored: nothing later is restorable from
    /// a backup before the gap.
    #[serde(with = "time_text")]
    pub ends_at: SystemTime,
    /// The end of the first backup after it, where the window resumes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_time_text"
    )]
    pub resumes_at: Option<SystemTime>,
}

impl Catalog {
    /// The holes in the WAL of the newest timeline's recovery path, from its
    /// oldest backup on (see [`WindowGap`]).
    #[must_use]
    pub fn window_gaps(&self, index: &WalIndex) -> Vec<WindowGap> {
        let seg = self.segment_size();
        let Some(live) = index
            .newest_timeline()
            .or_else(|| self.backups.iter().map(|b| b.timeline).max())
        else {
            return Vec::new();
        };
        let on_path: Vec<&BackupRecord> = self
            .backups
            .iter()
            .filter(|b| index.descends(live, b.timeline, b.stop_lsn))
            .collect();
        let Some(first) = on_path.first() else {
            return Vec::new();
        };
        let from = Lsn(first.stop_lsn.0.saturating_sub(1)).segment(seg);
        let path = index.path(first.timeline, from, live);
        let to = index.end_of(&path);
        let (missing, _) = index.missing(&path, from, to);
        // Runs of consecutive missing segments.
        let mut runs: Vec<(SegmentNo, SegmentNo)> = Vec::new();
        for (_, s) in missing {
            match runs.last_mut() {
                Some((_, last)) if last.0 + 1 == s.0 => *last = s,
                _ => runs.push((s, s)),
            }
        }
        runs.into_iter()
            .map(|(a, b)| {
                let tl = WalIndex::timeline_for(&path, a);
                let before = SegmentNo(a.0.saturating_sub(1));
                let before_name =
                    WalFileName::segment(WalIndex::timeline_for(&path, before), before, seg);
                let ends_at = self
                    .stored_time(&before_name)
                    .unwrap_or(first.stop_time)
                    .max(
                        on_path
                            .iter()
                            .filter(|x| x.stop_lsn.segment(seg) < a)
                            .map(|x| x.stop_time)
                            .max()
                            .unwrap_or(first.stop_time),
                    );
                let resumes_at = on_path
                    .iter()
                    .filter(|x| x.start_segment() > b)
                    .map(|x| x.stop_time)
                    .min();
                WindowGap {
                    missing: index.range_text(tl, a, b),
                    ends_at,
                    resumes_at,
                }
            })
            .collect()
    }
}

/// The `backup.json` records read so far, by backup and size. They are
/// create-only, so a long-lived reader (the daemon, refreshing every
/// minute) reads each one once instead of every backup on every refresh.
#[derive(Debug, Default)]
pub struct RecordCache {
    records: std::sync::Mutex<HashMap<String, (u64, BackupRecord)>>,
}

impl RecordCache {
    fn get(&self, id: &BackupId, size: u64) -> Option<BackupRecord> {
        let records = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        records
            .get(&id.to_string())
            .filter(|(s, _)| *s == size)
            .map(|(_, r)| r.clone())
    }

    /// Keeps `record`, and forgets every backup not in `listed` (pruned).
    fn update(&self, listed: &[String], fresh: Vec<(u64, BackupRecord)>) {
        let mut records = self
            .records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        records.retain(|id, _| listed.contains(id));
        for (size, record) in fresh {
            records.insert(record.id.to_string(), (size, record));
        }
    }

    /// How many records are cached.
    #[must_use]
    pub fn len(&self) -> usize {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether none are.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Catalog {
    /// Lists the repository and reads every `backup.json`.
    ///
    /// # Errors
    /// Listing or reading fails.
    pub async fn load(storage: &Storage) -> Result<Self, StorageError> {
        Self::load_cached(storage, &RecordCache::default()).await
    }

    /// [`Catalog::load`], reading only the `backup.json` records that
    /// `cache` does not hold yet.
    ///
    /// # Errors
    /// Listing or reading fails.
    pub async fn load_cached(storage: &Storage, cache: &RecordCache) -> Result<Self, StorageError> {
        let mut by_id: BTreeMap<String, Vec<ObjectMeta>> = BTreeMap::new();
        for object in storage.list(BACKUPS_PREFIX).await? {
            let rest = &object.key.as_str()[BACKUPS_PREFIX.len()..];
            if let Some((id, _)) = rest.split_once('/') {
                by_id.entry(id.to_owned()).or_default().push(object);
            }
        }
        let mut catalog = Catalog::default();
        let listed: Vec<String> = by_id.keys().cloned().collect();
        let mut fresh = Vec::new();
        for (id_text, objects) in by_id {
            let Ok(id) = id_text.parse::<BackupId>() else {
                tracing::debug!(dir = %id_text, "ignoring a foreign directory under backups/");
                continue;
            };
            let record_key = id.key(RECORD_FILE);
            let Some(record_size) = objects.iter().find(|o| o.key == record_key).map(|o| o.size)
            else {
                catalog.incomplete.push(Incomplete {
                    id,
                    objects,
                    reason: "no backup.json: the backup was interrupted or is still running".into(),
                    damaged_record: false,
                });
                continue;
            };
            if let Some(record) = cache.get(&id, record_size) {
                catalog.backups.push(record);
                continue;
            }
            let body = match storage.get(&record_key).await {
                Ok(body) => body,
                // Deleted between the listing and now, by a concurrent prune.
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            match serde_json::from_slice::<BackupRecord>(&body) {
                Ok(record) if record.format <= RECORD_FORMAT && record.id == id => {
                    fresh.push((record_size, record.clone()));
                    catalog.backups.push(record);
                }
                Ok(record) if record.id != id => catalog.incomplete.push(Incomplete {
                    id,
                    objects,
                    reason: format!("backup.json names another backup ({})", record.id),
                    damaged_record: true,
                }),
                Ok(record) => catalog.incomplete.push(Incomplete {
                    id,
                    objects,
                    reason: format!(
                        "backup.json format {} is newer than this pitr-agent reads; upgrade",
                        record.format
                    ),
                    damaged_record: true,
                }),
                Err(e) => catalog.incomplete.push(Incomplete {
                    id,
                    objects,
                    reason: format!("backup.json is unreadable: {e}"),
                    damaged_record: true,
                }),
            }
        }
        cache.update(&listed, fresh);
        catalog
            .backups
            .sort_by(|a, b| (a.stop_lsn, &a.id).cmp(&(b.stop_lsn, &b.id)));
        for object in storage.list(WAL_PREFIX).await? {
            if let Some(name) = wal_name_of(&object.key) {
                catalog.wal.push(WalObject { name, meta: object });
            }
        }
        catalog
            .wal
            .sort_by(|a, b| a.name.as_str().cmp(b.name.as_str()));
        let pieces = storage
            .list(super::partial::PARTIAL_PREFIX)
            .await?
            .iter()
            .filter_map(super::partial::piece_of)
            .collect();
        let complete: std::collections::HashSet<&WalFileName> =
            catalog.wal.iter().map(|w| &w.name).collect();
        let streamed = super::partial::streamed_segments(pieces, catalog.segment_size(), |n| {
            complete.contains(n)
        });
        catalog.streamed = streamed;
        catalog.rehearsals = super::rehearsals::load(storage).await?;
        for object in storage.list(super::SUMMARY_PREFIX).await? {
            if let Some(entry) = super::summary_entry(&object.key) {
                catalog.summaries.insert(entry.name.clone(), entry);
            }
        }
        Ok(catalog)
    }

    /// Reads and parses every `.history` file; unreadable ones are returned
    /// with the reason instead.
    ///
    /// # Errors
    /// Reading fails for a reason other than a missing object.
    pub async fn histories(
        &self,
        storage: &Storage,
    ) -> Result<
        (
            HashMap<TimelineId, TimelineHistory>,
            Vec<(WalFileName, String)>,
        ),
        StorageError,
    > {
        let mut histories = HashMap::new();
        let mut broken = Vec::new();
        for w in &self.wal {
            if w.name.kind() != WalFileKind::TimelineHistory {
                continue;
            }
            let body = match storage.get(&super::wal_key(&w.name)).await {
                Ok(body) => body,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            let mut text = Vec::new();
            let parsed = gunzip_verified(&body, &mut text)
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    TimelineHistory::parse(w.name.timeline(), &String::from_utf8_lossy(&text))
                        .map_err(|e| e.to_string())
                });
            match parsed {
                Ok(h) => {
                    histories.insert(w.name.timeline(), h);
                }
                Err(e) => broken.push((w.name.clone(), e)),
            }
        }
        Ok((histories, broken))
    }

    /// The archived WAL and `histories`, indexed for continuity questions.
    #[must_use]
    pub fn wal_index(&self, histories: HashMap<TimelineId, TimelineHistory>) -> WalIndex {
        let mut names: Vec<WalFileName> = self.wal.iter().map(|w| w.name.clone()).collect();
        // The segment the stream is writing counts as present: a restore
        // replays its pieces up to where they reach.
        names.extend(self.stream_end().map(|s| s.name.clone()));
        WalIndex::new(&names, histories, self.segment_size())
    }

    /// The WAL segment size of the repository's backups (the default without any).
    #[must_use]
    pub fn segment_size(&self) -> u32 {
        self.backups
            .last()
            .map_or(crate::wal::DEFAULT_SEGMENT_SIZE, |b| b.wal_segment_size)
    }

    /// The newest archived WAL segment (full or partial) of the newest
    /// timeline: after a restore, the abandoned timeline may reach further
    /// segment numbers, but the live cluster writes the newest timeline.
    #[must_use]
    pub fn newest_segment(&self) -> Option<&WalObject> {
        self.wal
            .iter()
            .filter(|w| matches!(w.name.kind(), WalFileKind::Segment | WalFileKind::Partial))
            .max_by(|a, b| {
                let seg = self.segment_size();
                (a.name.timeline(), a.name.segment_no(seg))
                    .cmp(&(b.name.timeline(), b.name.segment_no(seg)))
            })
    }

    /// The segment the stream was writing last, when it continues the
    /// archive: streamed and newer than every complete segment of its
    /// timeline. Pieces of older segments are leftovers, not the end.
    #[must_use]
    pub fn stream_end(&self) -> Option<&super::partial::StreamedSegment> {
        let seg = self.segment_size();
        let newest = self
            .streamed
            .iter()
            .max_by_key(|s| (s.name.timeline(), s.name.segment_no(seg)))?;
        let beyond = self.wal.iter().all(|w| {
            w.name.kind() != WalFileKind::Segment
                || w.name.timeline() != newest.name.timeline()
                || w.name.segment_no(seg) < newest.name.segment_no(seg)
        });
        beyond.then_some(newest)
    }

    /// When WAL file `name` was stored: its object, else its streamed pieces.
    #[must_use]
    pub fn stored_time(&self, name: &WalFileName) -> Option<SystemTime> {
        self.wal
            .iter()
            .find(|w| &w.name == name)
            .and_then(|w| w.meta.modified)
            .or_else(|| {
                self.streamed
                    .iter()
                    .find(|s| &s.name == name)
                    .and_then(|s| s.modified)
            })
    }

    /// The window of times a restore can reach: from the oldest backup's end
    /// to the newest commit in the archived WAL (or the newest backup's
    /// end, if later). Without resolved summaries ([`Catalog::archive_end`])
    /// the end is when the newest WAL was stored, an estimate.
    #[must_use]
    pub fn restorable_window(&self) -> Option<RestorableWindow> {
        let oldest = self.backups.iter().min_by_key(|b| b.stop_time)?;
        let newest_backup_end = self.backups.iter().map(|b| b.stop_time).max()?;
        let newest_wal = self.newest_segment();
        let wal_time = newest_wal.and_then(|w| w.meta.modified);
        let stream = self.stream_end();
        let archived_to = [wal_time, stream.and_then(|s| s.modified)]
            .into_iter()
            .flatten()
            .fold(newest_backup_end, SystemTime::max);
        let last_commit = self
            .archive_end
            .as_ref()
            .and_then(|e| e.last_commit.as_ref())
            .map(|c| micros_to_time(c.time_us));
        let mut end = match &self.archive_end {
            Some(e) if e.resolved => {
                last_commit.map_or(newest_backup_end, |c| c.max(newest_backup_end))
            }
            _ => archived_to,
        };
        // A hole no later backup bridges ends the window before it.
        let gaps: Vec<WindowGap> = self
            .archive_end
            .as_ref()
            .map(|e| e.gaps.clone())
            .unwrap_or_default();
        let mut end_is_last_commit = last_commit.is_some_and(|c| c >= newest_backup_end);
        if let Some(g) = gaps.iter().find(|g| g.resumes_at.is_none()) {
            end = end.min(g.ends_at);
            end_is_last_commit = false;
        }
        Some(RestorableWindow {
            start: oldest.stop_time,
            // The archive holds everything to its newest commit, whatever
            // the store's clock (S3 times have one-second precision).
            archived_to: archived_to.max(end),
            end,
            end_is_last_commit,
            last_commit,
            gaps,
            newest_wal: newest_wal.map(|w| w.name.to_string()),
            streamed_to: stream.map(|s| s.end.to_string()),
        })
    }
}

/// Two timelines that both grew after one branched from the other: the
/// parent kept archiving after the child's history was stored. What a copy
/// restored and promoted beside a running production leaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Divergence {
    /// The timeline that went on.
    pub parent: TimelineId,
    /// The timeline that branched from it.
    pub child: TimelineId,
    /// Where it branched.
    pub switchpoint: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "timelines {} and {} both grew after {} branched from {} at {}",
            self.parent, self.child, self.child, self.parent, self.switchpoint
        )
    }
}

impl Catalog {
    /// Pairs of timelines that both grew after their fork (see
    /// [`Divergence`]): the child has WAL of its own, and the parent has WAL
    /// from the switch segment on, stored after the child's history file.
    #[must_use]
    pub fn divergences(&self, index: &WalIndex) -> Vec<Divergence> {
        let seg = self.segment_size();
        let mut found = Vec::new();
        for w in &self.wal {
            if w.name.kind() != WalFileKind::TimelineHistory {
                continue;
            }
            let child = w.name.timeline();
            let (Some(h), Some(born)) = (index.history(child), w.meta.modified) else {
                continue;
            };
            let Some(fork) = h.ancestors.last() else {
                continue;
            };
            let switch_seg = fork.switchpoint.segment(seg);
            let child_grew = self.wal.iter().any(|o| {
                o.name.timeline() == child
                    && o.name.kind() == WalFileKind::Segment
                    && o.name.segment_no(seg).is_some_and(|s| s >= switch_seg)
            });
            let parent_grew = self.wal.iter().any(|o| {
                o.name.timeline() == fork.parent
                    && o.name.kind() == WalFileKind::Segment
                    && o.name.segment_no(seg).is_some_and(|s| s >= switch_seg)
                    && o.meta.modified.is_some_and(|m| m > born)
            });
            if child_grew && parent_grew {
                found.push(Divergence {
                    parent: fork.parent,
                    child,
                    switchpoint: fork.switchpoint.to_string(),
                });
            }
        }
        found
    }
}

/// A time in microseconds since the Unix epoch (as WAL summaries keep it).
#[must_use]
pub fn micros_to_time(us: i64) -> SystemTime {
    if us >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_micros(us.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_micros(us.unsigned_abs())
    }
}

/// The times a restore can reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestorableWindow {
    /// The oldest backup's end.
    #[serde(with = "time_text")]
    pub start: SystemTime,
    /// The newest commit in the archive (or the newest backup's end, if
    /// later): every second up to it is restorable.
    #[serde(with = "time_text")]
    pub end: SystemTime,
    /// Whether `end` is the newest commit read from the WAL (else the
    /// newest backup's end, or an estimate from storage times).
    pub end_is_last_commit: bool,
    /// The newest commit in the archived WAL.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "opt_time_text"
    )]
    pub last_commit: Option<SystemTime>,
    /// When the newest WAL was stored: a target between `end` and this
    /// restores everything archived (nothing was committed in between).
    #[serde(with = "time_text")]
    pub archived_to: SystemTime,
    /// Holes in the WAL: the window ends at the first one no later backup
    /// bridges, and is split by the others.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gaps: Vec<WindowGap>,
    /// The newest archived WAL segment.
    pub newest_wal: Option<String>,
    /// Where the streamed WAL after it ends (an LSN), when streaming.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed_to: Option<String>,
}

/// `Option<SystemTime>` as RFC 3339 text.
mod opt_time_text {
    use std::time::SystemTime;

    use serde::Serializer;

    /// Writes `2026-11-22T06:52:00.123456Z` (commit times have microseconds).
    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.collect_str(&humantime::format_rfc3339_micros(*t)),
            None => s.serialize_none(),
        }
    }
}

/// Records for unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::wal::DEFAULT_SEGMENT_SIZE;

    /// A committed backup on timeline `tl` that starts in segment `segno`
    /// and ends at `stop_time` (started ten minutes earlier).
    pub(crate) fn record(tl: u32, segno: u64, stop_time: SystemTime) -> BackupRecord {
        let seg = u64::from(DEFAULT_SEGMENT_SIZE);
        let start = stop_time - Duration::from_secs(600);
        BackupRecord {
            format: 1,
            id: BackupId::at(start),
            label: String::new(),
            system_identifier: SystemId(7_301_234_567_890_123_456),
            pg_version: 150_000,
            wal_segment_size: DEFAULT_SEGMENT_SIZE,
            start_timeline: TimelineId(tl),
            timeline: TimelineId(tl),
            start_lsn: Lsn(segno * seg + 40),
            stop_lsn: Lsn(segno * seg + 400),
            first_wal: WalFileName::segment(TimelineId(tl), SegmentNo(segno), DEFAULT_SEGMENT_SIZE),
            last_wal: WalFileName::segment(TimelineId(tl), SegmentNo(segno), DEFAULT_SEGMENT_SIZE),
            wal_included: true,
            start_time: start,
            stop_time,
            raw_bytes: 0,
            stored_bytes: 0,
            manifest_checksums: "CRC32C".into(),
            objects: vec![StoredObject {
                name: DATA_FILE.into(),
                bytes: 4,
                sha256: crate::compress::Sha256Digest::of(b"data"),
            }],
            created_by: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed format of `backup.json`: a change here is a change of
    /// the repository format (bump RECORD_FORMAT, keep reading the old one).
    #[test]
    fn backup_json_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let record = test_support::record(2, 3, t);
        insta::assert_snapshot!(serde_json::to_string_pretty(&record).expect("json"));
    }

    #[tokio::test]
    async fn records_are_read_once_and_forgotten_when_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::Local(
            crate::storage::LocalFs::open(dir.path().to_owned())
                .await
                .expect("open"),
        );
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let record = test_support::record(1, 3, t);
        let key = record.id.key(RECORD_FILE);
        let body = serde_json::to_vec(&record).expect("json");
        let path = dir.path().join(key.as_str());
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &body).expect("write");

        let cache = RecordCache::default();
        let first = Catalog::load_cached(&storage, &cache).await.expect("load");
        assert_eq!(first.backups, vec![record.clone()]);
        assert_eq!(cache.len(), 1);
        // Same size, other bytes: only a fresh read would notice.
        std::fs::write(&path, vec![b' '; body.len()]).expect("overwrite");
        let cached = Catalog::load_cached(&storage, &cache).await.expect("load");
        assert_eq!(cached.backups, vec![record], "served from the cache");
        let uncached = Catalog::load(&storage).await.expect("load");
        assert!(uncached.backups.is_empty() && uncached.incomplete.len() == 1);
        // Pruned: the cache forgets it.
        std::fs::remove_dir_all(path.parent().expect("dir")).expect("rm");
        let gone = Catalog::load_cached(&storage, &cache).await.expect("load");
        assert!(gone.backups.is_empty());
        assert!(cache.is_empty());
    }

    #[test]
    fn the_newest_segment_is_on_the_newest_timeline() {
        let mut c = Catalog::default();
        for name in [
            "000000010000000000000050",
            "00000002.history",
            "000000020000000000000036",
            "000000020000000000000037",
        ] {
            c.wal.push(WalObject {
                name: name.parse().expect("valid"),
                meta: crate::storage::ObjectMeta {
                    key: crate::storage::ObjectKey::new(format!("wal/{name}.gz")).expect("key"),
                    size: 1,
                    modified: None,
                },
            });
        }
        assert_eq!(
            c.newest_segment().map(|w| w.name.to_string()).as_deref(),
            Some("000000020000000000000037")
        );
    }

    #[test]
    fn ids_round_trip_and_sort() {
        let t = humantime::parse_rfc3339("2026-11-22T06:52:07Z").expect("time");
        let id = BackupId::at(t);
        assert_eq!(id.as_str(), "20261122T065207Z");
        assert_eq!(id.time(), Some(t));
        assert_eq!(
            id.key(RECORD_FILE).as_str(),
            "backups/20261122T065207Z/backup.json"
        );
        assert_eq!(
            "20261122T065207Z-2"
                .parse::<BackupId>()
                .expect("suffix")
                .time(),
            Some(t)
        );
        for bad in [
            "",
            "latest",
            "20261122T065207",
            "20261122T065207Z-",
            "2026112xT065207Z",
            "20261122T065207Z/x",
        ] {
            assert!(bad.parse::<BackupId>().is_err(), "{bad:?} accepted");
        }
        assert!(BackupId::at(t) < BackupId::at(t + Duration::from_secs(1)));
    }
}
