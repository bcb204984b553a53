//! `pitr-agent verify`: re-reads backups and checks WAL continuity, collecting
//! findings instead of stopping at the first.
//!
//! - Backups: every object's size and SHA-256 against `backup.json`, the gzip
//!   stream, and every file's checksum against PostgreSQL's `backup_manifest`,
//!   all streamed, without restoring anything.
//! - WAL: from each backup's start segment to the newest archived segment,
//!   following timeline `.history` files the way recovery does.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime};

use async_compression::tokio::bufread::GzipDecoder;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::compress::Sha256Digest;
use tokio::io::{AsyncReadExt, BufReader};

use crate::backup::manifest::{FileHasher, PgManifest};
use crate::backup::tar::{EntryKind, Event, TarError, TarReader};
use crate::catalog::backup::{BackupId, BackupRecord, Catalog, DATA_FILE, MANIFEST_FILE};
use crate::catalog::wal_key;
use crate::compress;
use crate::repository::Repository;
use crate::storage::{Storage, StorageError};
use crate::wal::summary::{self, Link, SegmentSummary};
use crate::wal::{SegmentNo, TimelineHistory, TimelineId, WalIndex};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Restores still work, but something needs attention.
    Warning,
    /// Some restores will fail.
    Error,
}

impl Severity {
    /// For tables.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One problem, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// A backup id, `wal`, or `repository`.
    pub subject: String,
    /// What is wrong, and what to do.
    pub message: String,
}

/// What to check.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Store the WAL summaries that are missing (`--summarize`): the only
    /// write `verify` makes.
    pub summarize: bool,
    /// Only this backup (WAL is still checked from its start).
    pub backup: Option<BackupId>,
    /// Warn when the newest backup is older than this.
    pub max_age: Option<Duration>,
    /// The clock.
    pub now: SystemTime,
}

/// What was checked, and what was found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyReport {
    /// Backups whose data was re-read.
    pub backups_checked: Vec<BackupId>,
    /// Files checked against `backup_manifest`, over all backups.
    pub files_checked: u64,
    /// Stored bytes re-read.
    pub bytes_read: u64,
    /// WAL segments found in the ranges checked.
    pub wal_segments_checked: u64,
    /// WAL objects decompressed and checked against their digests.
    pub wal_objects_read: u64,
    /// WAL summaries stored by `--summarize`.
    pub wal_summaries_stored: u64,
    /// Everything found, errors first.
    pub findings: Vec<Finding>,
    /// Encrypted repositories: the recipients each backup's data was
    /// encrypted to, so that rotation keeps the identities restores need.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub recipients: std::collections::BTreeMap<String, Vec<String>>,
}

impl VerifyReport {
    /// Whether any finding is an error: a restore would fail or lose data.
    #[must_use]
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }

    /// `verify`'s exit status: 0 clean, 1 errors found (with `strict`, any
    /// finding). Warnings alone (incomplete-backup debris that `prune`
    /// removes) must not stop the CronJob before it reaches `prune`.
    #[must_use]
    pub fn exit_code(&self, strict: bool) -> u8 {
        u8::from(self.has_errors() || (strict && !self.findings.is_empty()))
    }
}

/// Runs every check on `catalog`.
///
/// # Errors
/// Only when verify itself cannot run (listing or reading fails for a reason
/// other than a missing or corrupt object).
pub async fn verify(
    repo: &Repository,
    catalog: &Catalog,
    opts: &VerifyOptions,
) -> Result<VerifyReport, StorageError> {
    let storage = &repo.storage;
    let mut report = VerifyReport {
        backups_checked: Vec::new(),
        files_checked: 0,
        bytes_read: 0,
        wal_segments_checked: 0,
        wal_objects_read: 0,
        wal_summaries_stored: 0,
        findings: Vec::new(),
        recipients: std::collections::BTreeMap::new(),
    };
    let selected: Vec<&BackupRecord> = match &opts.backup {
        Some(id) => {
            let found: Vec<_> = catalog.backups.iter().filter(|b| &b.id == id).collect();
            if found.is_empty() {
                report.findings.push(Finding {
                    severity: Severity::Error,
                    subject: id.to_string(),
                    message: format!(
                        "no backup {id} in the repository; `pitr-agent list` shows the backups"
                    ),
                });
            }
            found
        }
        None => catalog.backups.iter().collect(),
    };
    // A restore would fail or lose data: an error, not a warning.
    if catalog.backups.is_empty() {
        report.findings.push(Finding {
            severity: Severity::Error,
            subject: "repository".into(),
            message: "no backups: nothing can be restored; take one with `pitr-agent backup`"
                .into(),
        });
    }
    if let (Some(max_age), Some(newest)) = (
        opts.max_age,
        catalog.backups.iter().map(|b| b.stop_time).max(),
    ) {
        let age = opts.now.duration_since(newest).unwrap_or_default();
        if age > max_age {
            report.findings.push(Finding {
                severity: Severity::Error,
                subject: "repository".into(),
                message: format!(
                    "the newest backup ended {} ago, more than --max-age {}; restores replay \
                     more WAL the older it is: check the backup schedule and take a backup",
                    humantime::format_duration(Duration::from_secs(age.as_secs())),
                    humantime::format_duration(max_age)
                ),
            });
        }
    }
    for inc in catalog.incomplete.iter().filter(|i| i.damaged_record) {
        report.findings.push(Finding {
            severity: Severity::Error,
            subject: inc.id.to_string(),
            message: format!(
                "{}; the backup does not count for restores until its record is readable: its \
                 data may be intact, and prune never removes it. Take a new backup, then remove \
                 this one by hand once it is not needed",
                inc.reason
            ),
        });
    }
    for inc in catalog.incomplete.iter().filter(|i| !i.damaged_record) {
        report.findings.push(Finding {
            severity: Severity::Warning,
            subject: inc.id.to_string(),
            message: format!(
                "incomplete backup ({}); it does not count for restores: `pitr-agent prune` \
                 removes it after the grace period",
                inc.reason
            ),
        });
    }
    for backup in &selected {
        verify_backup(storage, backup, &mut report).await?;
        if let Some(tag) = storage.seal_tag(&backup.id.key(DATA_FILE)).await? {
            report.recipients.insert(backup.id.to_string(), tag.to);
        }
        report.backups_checked.push(backup.id.clone());
    }

    let index = catalog.wal_index(load_histories(storage, catalog, &mut report).await?);
    for d in catalog.divergences(&index) {
        report.findings.push(Finding {
            severity: Severity::Error,
            subject: "wal".into(),
            message: format!(
                "{d}: two clusters archive into this repository (a copy promoted beside \
                 production?); stop the one that is not production from archiving here, and \
                 restore with --target-timeline {} or {}",
                d.parent, d.child
            ),
        });
    }
    let (gaps, checked) = wal_gaps(&selected, &index);
    report.wal_segments_checked = checked;
    for gap in gaps {
        let range = index.range_text(gap.timeline, gap.first, gap.last);
        let ids: Vec<String> = gap.backups.iter().map(ToString::to_string).collect();
        report.findings.push(Finding {
            severity: Severity::Error,
            subject: "wal".into(),
            message: format!(
                "gap: {range} missing; backups before it cannot reach later times; take a new \
                 backup (affects {})",
                ids.join(", ")
            ),
        });
    }
    verify_wal_objects(repo, catalog, opts, &mut report).await?;
    report
        .findings
        .sort_by_key(|f| std::cmp::Reverse(f.severity));
    Ok(report)
}

/// WAL objects read at once: each holds a segment in memory.
const WAL_READERS: usize = 2;

/// Reads every WAL object as a restore would: decompressed, checked
/// against its digest, and (segments) its records read. Damage and
/// segments that do not chain are errors naming the segment and LSN; with
/// `--summarize`, the summaries that are missing are stored.
async fn verify_wal_objects(
    repo: &Repository,
    catalog: &Catalog,
    opts: &VerifyOptions,
    report: &mut VerifyReport,
) -> Result<(), StorageError> {
    use futures::StreamExt as _;
    let jobs: Vec<_> = catalog
        .wal
        .iter()
        .map(|w| {
            let name = w.name.clone();
            async move {
                let key = wal_key(&name);
                let read = match repo.storage.get(&key).await {
                    Ok(gz) => gz,
                    Err(e) if e.is_not_found() => return (name, Ok(None)),
                    Err(e) => return (name, Err(Err(e))),
                };
                let location = repo.storage.location(&key);
                let n = name.clone();
                let checked = tokio::task::spawn_blocking(move || {
                    let mut raw = Vec::new();
                    compress::gunzip_verified(&read, &mut raw)
                        .map_err(|e| format!("{location}: {e}"))
                        .and_then(|_| {
                            crate::archive::summary::summarize_file(&n, &raw)
                                .map_err(|e| format!("{location}: {e}"))
                        })
                })
                .await
                .unwrap_or_else(|e| Err(format!("reading {name}: {e}")));
                (name, checked.map_err(Ok))
            }
        })
        .collect();
    let mut results = futures::stream::iter(jobs).buffered(WAL_READERS);
    let mut summaries: Vec<SegmentSummary> = Vec::new();
    while let Some((name, result)) = results.next().await {
        match result {
            Ok(None) => {}
            Ok(Some(summary)) => {
                report.wal_objects_read += 1;
                if let Some(d) = &summary.damage {
                    report.findings.push(Finding {
                        severity: Severity::Error,
                        subject: "wal".into(),
                        message: format!(
                            "{name}: unreadable WAL at {}: {}; a restore stops there and loses \
                             every later commit. If the primary still has {name} in pg_wal, \
                             compare it; take a new backup so that later targets do not need it",
                            d.lsn, d.reason
                        ),
                    });
                }
                if opts.summarize && !catalog.summaries.contains_key(&name) {
                    crate::archive::summary::store_summary(&repo.storage, &summary).await?;
                    report.wal_summaries_stored += 1;
                }
                summaries.push(summary);
            }
            Err(Ok(message)) => {
                report.wal_objects_read += 1;
                report.findings.push(Finding {
                    severity: Severity::Error,
                    subject: "wal".into(),
                    message: format!(
                        "{name} cannot be read back: {message}; a restore that needs it stops \
                         there. Take a new backup so that later targets do not need it"
                    ),
                });
            }
            Err(Err(e)) => return Err(e),
        }
    }
    // Consecutive segments of one timeline must chain.
    let seg = catalog.segment_size();
    summaries.sort_by_key(|s| (s.segment.timeline(), s.segment.segment_no(seg)));
    for pair in summaries.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let consecutive = a.segment.timeline() == b.segment.timeline()
            && a.segment.kind() == crate::wal::WalFileKind::Segment
            && b.segment.kind() == crate::wal::WalFileKind::Segment
            && a.segment.segment_no(seg).map(|s| s.0 + 1) == b.segment.segment_no(seg).map(|s| s.0);
        if consecutive && let Link::Broken(d) = summary::link(a, b) {
            report.findings.push(Finding {
                severity: Severity::Error,
                subject: "wal".into(),
                message: format!(
                    "{} does not continue {} at {}: {}; a restore stops there",
                    b.segment, a.segment, d.lsn, d.reason
                ),
            });
        }
    }
    Ok(())
}

/// Findings are capped per backup so one broken tar does not flood the report.
const MAX_FILE_FINDINGS: usize = 10;

async fn verify_backup(
    storage: &Storage,
    backup: &BackupRecord,
    report: &mut VerifyReport,
) -> Result<(), StorageError> {
    let id = backup.id.to_string();
    let error = |message: String| Finding {
        severity: Severity::Error,
        subject: id.clone(),
        message,
    };
    let restore_hint = "restores from this backup will fail: take a new backup, and restore \
                        from another one";
    let mut manifest = None;
    // Streaming a missing or truncated data object would only repeat the finding.
    let mut data_readable = false;
    for object in &backup.objects {
        let key = backup.id.key(&object.name);
        match storage.head(&key).await? {
            None => {
                report.findings.push(error(format!(
                    "{} is missing; {restore_hint}",
                    storage.location(&key)
                )));
                continue;
            }
            // backup.json records the object before encryption; an
            // encrypted one is checked by its digest below instead.
            Some(meta) if storage.keys().is_none() && meta.size != object.bytes => {
                report.findings.push(error(format!(
                    "{} has {} bytes, backup.json says {}; {restore_hint}",
                    storage.location(&key),
                    meta.size,
                    object.bytes
                )));
                continue;
            }
            Some(_) => data_readable |= object.name == DATA_FILE,
        }
        if object.name == MANIFEST_FILE {
            let body = match storage.get(&key).await {
                Ok(body) => body,
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            };
            report.bytes_read += body.len() as u64;
            let sha = Sha256Digest::of(&body);
            if sha != object.sha256 {
                report.findings.push(error(format!(
                    "{} has sha256 {sha}, backup.json says {}; {restore_hint}",
                    storage.location(&key),
                    object.sha256
                )));
            }
            match PgManifest::parse(&body) {
                Ok(m) => manifest = Some(m),
                Err(e) => report
                    .findings
                    .push(error(format!("{}: {e}", storage.location(&key)))),
            }
        }
    }
    let Some(data) = backup.objects.iter().find(|o| o.name == DATA_FILE) else {
        report
            .findings
            .push(error(format!("backup.json lists no {DATA_FILE}")));
        return Ok(());
    };
    if !data_readable {
        return Ok(());
    }
    let key = backup.id.key(DATA_FILE);
    let reader = match storage.get_stream(&key).await {
        Ok(r) => r,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut hasher = Sha256::new();
    let mut stored = 0u64;
    let inspect = tokio_util::io::InspectReader::new(reader, |bytes: &[u8]| {
        hasher.update(bytes);
        stored += bytes.len() as u64;
    });
    let mut decoder = GzipDecoder::new(BufReader::with_capacity(1 << 20, inspect));
    decoder.multiple_members(true);
    let mut checker = TarChecker::new(manifest.as_ref(), backup);
    let mut tar = TarReader::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut stream_error = None;
    loop {
        match decoder.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = tar.feed(&buf[..n], &mut |ev| checker.on_event(ev)) {
                    stream_error = Some(e.to_string());
                    break;
                }
            }
            Err(e) => {
                stream_error = Some(format!("the gzip stream is corrupt: {e}"));
                break;
            }
        }
    }
    drop(decoder);
    report.bytes_read += stored;
    if stream_error.is_none()
        && let Err(e) = tar.finish()
    {
        stream_error = Some(e.to_string());
    }
    let sha = Sha256Digest(hasher.finalize().into());
    if stream_error.is_none() && sha != data.sha256 {
        stream_error = Some(format!("sha256 is {sha}, backup.json says {}", data.sha256));
    }
    if let Some(e) = &stream_error {
        report.findings.push(error(format!(
            "{}: {e}; {restore_hint}",
            storage.location(&key)
        )));
    }
    report.files_checked += checker.checked;
    // After a broken stream, "missing" files only echo the break.
    let complete = stream_error.is_none();
    let mut problems = checker.finish(complete);
    let total = problems.len();
    problems.truncate(MAX_FILE_FINDINGS);
    for p in problems {
        report.findings.push(error(p));
    }
    if total > 0 {
        report.findings.push(error(format!(
            "{total} files in {DATA_FILE} do not match backup_manifest{}; {restore_hint}",
            if total > MAX_FILE_FINDINGS {
                format!(" (the first {MAX_FILE_FINDINGS} are listed)")
            } else {
                String::new()
            }
        )));
    }
    Ok(())
}

/// Checks tar entries against `backup_manifest` as they stream past.
struct TarChecker<'a> {
    manifest: Option<&'a PgManifest>,
    seen: HashSet<String>,
    wal: HashSet<String>,
    current: Option<(String, u64, Option<FileHasher>)>,
    problems: Vec<String>,
    checked: u64,
    first_wal: &'a str,
    last_wal: &'a str,
    wal_included: bool,
}

impl<'a> TarChecker<'a> {
    fn new(manifest: Option<&'a PgManifest>, backup: &'a BackupRecord) -> Self {
        TarChecker {
            manifest,
            seen: HashSet::new(),
            wal: HashSet::new(),
            current: None,
            problems: Vec::new(),
            checked: 0,
            first_wal: backup.first_wal.as_str(),
            last_wal: backup.last_wal.as_str(),
            wal_included: backup.wal_included,
        }
    }

    fn on_event(&mut self, event: Event<'_>) -> Result<(), TarError> {
        match event {
            Event::Start(entry) if entry.kind == EntryKind::File => {
                // WAL fetched into the tar is not in the manifest; archive_status is.
                let in_wal = entry.path.strip_prefix("pg_wal/");
                if let Some(name) = in_wal {
                    self.wal.insert(name.to_owned());
                }
                if entry.path == "backup_manifest" {
                    return Ok(());
                }
                let Some(manifest) = self.manifest else {
                    return Ok(());
                };
                match manifest.files.get(&entry.path) {
                    None if in_wal.is_some() => {}
                    Some(file) => {
                        self.seen.insert(entry.path.clone());
                        if file.size != entry.size {
                            self.problems.push(format!(
                                "{} has {} bytes in the tar, backup_manifest says {}",
                                entry.path, entry.size, file.size
                            ));
                        }
                        let hasher = file.checksum.as_ref().map(|c| FileHasher::new(c.algorithm));
                        self.current = Some((entry.path.clone(), 0, hasher));
                    }
                    None => self.problems.push(format!(
                        "{} is in the tar but not in backup_manifest",
                        entry.path
                    )),
                }
            }
            Event::Start(_) => {}
            Event::Data(data) => {
                if let Some((_, len, Some(hasher))) = &mut self.current {
                    hasher.update(data);
                    *len += data.len() as u64;
                }
            }
            Event::End(_) => {
                if let Some((path, _, hasher)) = self.current.take() {
                    self.checked += 1;
                    let expected = self
                        .manifest
                        .and_then(|m| m.files.get(&path))
                        .and_then(|f| f.checksum.as_ref());
                    if let (Some(hasher), Some(expected)) = (hasher, expected) {
                        let actual = hasher.finish_hex();
                        if actual != expected.hex {
                            self.problems.push(format!(
                                "{path}: checksum {actual} does not match backup_manifest's {}",
                                expected.hex
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(mut self, complete: bool) -> Vec<String> {
        if !complete {
            return self.problems;
        }
        if let Some(manifest) = self.manifest {
            let mut missing: Vec<&String> = manifest
                .files
                .keys()
                .filter(|p| !self.seen.contains(*p))
                .collect();
            missing.sort();
            for path in missing {
                self.problems.push(format!(
                    "{path} is in backup_manifest but missing from the tar"
                ));
            }
        }
        if self.wal_included {
            for name in [self.first_wal, self.last_wal] {
                if !self.wal.contains(name) {
                    self.problems.push(format!(
                        "pg_wal/{name}, which the backup needs to become consistent, is missing \
                         from the tar"
                    ));
                }
            }
        }
        self.problems
    }
}

async fn load_histories(
    storage: &Storage,
    catalog: &Catalog,
    report: &mut VerifyReport,
) -> Result<HashMap<TimelineId, TimelineHistory>, StorageError> {
    let (histories, broken) = catalog.histories(storage).await?;
    for (name, e) in broken {
        report.findings.push(Finding {
            severity: Severity::Error,
            subject: "wal".into(),
            message: format!(
                "{} is unreadable ({e}); recovery cannot follow timeline {}: restore the \
                 file from the cluster's pg_wal if it still has it",
                storage.location(&wal_key(&name)),
                name.timeline()
            ),
        });
    }
    Ok(histories)
}

/// Consecutive missing segments on one timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The timeline the segments were expected on.
    pub timeline: TimelineId,
    /// The first missing segment.
    pub first: SegmentNo,
    /// The last missing segment.
    pub last: SegmentNo,
    /// The backups whose restores it cuts short.
    pub backups: Vec<BackupId>,
}

/// Finds the segments missing between each backup's start and the newest
/// archived segment on the newest timeline that descends from it. Returns the
/// gaps and how many segment positions were checked.
///
/// At a timeline switch, the segment holding the switchpoint may come from
/// either timeline (recovery prefers the newer one).
#[must_use]
pub fn wal_gaps(backups: &[&BackupRecord], index: &WalIndex) -> (Vec<Gap>, u64) {
    let mut gaps: Vec<Gap> = Vec::new();
    let mut checked = 0u64;
    for backup in backups {
        let tb = backup.start_timeline;
        let start = backup.start_segment();
        let target = index.latest_descendant(tb, backup.start_lsn);
        let path = index.path(tb, start, target);
        let (missing, present) = index.missing(&path, start, index.end_of(&path));
        checked += present;
        for (tl, segno) in missing {
            match gaps
                .iter_mut()
                .find(|g| g.timeline == tl && (g.first.0..=g.last.0 + 1).contains(&segno.0))
            {
                Some(g) => {
                    g.last = g.last.max(segno);
                    if !g.backups.contains(&backup.id) {
                        g.backups.push(backup.id.clone());
                    }
                }
                None => gaps.push(Gap {
                    timeline: tl,
                    first: segno,
                    last: segno,
                    backups: vec![backup.id.clone()],
                }),
            }
        }
    }
    gaps.sort_by_key(|g| (g.first, g.timeline));
    (gaps, checked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{DEFAULT_SEGMENT_SIZE, WalFileName};

    const SEG: u32 = DEFAULT_SEGMENT_SIZE;

    fn backup(tl: u32, segno: u64) -> BackupRecord {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + segno);
        crate::catalog::backup::test_support::record(tl, segno, t)
    }

    fn segs(tl: u32, range: std::ops::RangeInclusive<u64>) -> Vec<WalFileName> {
        range
            .map(|s| WalFileName::segment(TimelineId(tl), SegmentNo(s), SEG))
            .collect()
    }

    #[test]
    fn reports_one_gap_per_hole_naming_the_affected_backups() {
        let (b1, b2) = (backup(1, 0xF0), backup(1, 0xF7));
        let mut wal = segs(1, 0xF0..=0xF2);
        wal.extend(segs(1, 0xF6..=0xF9));
        let (gaps, checked) = wal_gaps(&[&b1, &b2], &WalIndex::new(&wal, HashMap::new(), SEG));
        assert_eq!(
            gaps,
            vec![Gap {
                timeline: TimelineId(1),
                first: SegmentNo(0xF3),
                last: SegmentNo(0xF5),
                backups: vec![b1.id.clone()],
            }]
        );
        assert_eq!(checked, 7 + 3);
        let (gaps, _) = wal_gaps(&[&b2], &WalIndex::new(&wal, HashMap::new(), SEG));
        assert!(gaps.is_empty(), "the later backup is not affected");
    }

    #[test]
    fn follows_a_timeline_switch() {
        let b = backup(1, 0x10);
        // Timeline 2 branched from 1 inside segment 0x14.
        let h2 = TimelineHistory::parse(TimelineId(2), "1\t0/14000100\tpromoted\n").expect("valid");
        let histories = HashMap::from([(TimelineId(2), h2)]);
        let mut wal = segs(1, 0x10..=0x13);
        wal.extend(segs(2, 0x14..=0x16));
        wal.push("00000002.history".parse().expect("valid"));
        // Timeline 1 went on after the branch point (the old primary): irrelevant.
        wal.extend(segs(1, 0x15..=0x20));
        let (gaps, checked) = wal_gaps(&[&b], &WalIndex::new(&wal, histories.clone(), SEG));
        assert!(gaps.is_empty(), "{gaps:?}");
        assert_eq!(checked, 7);

        // Without timeline 2's copy of the switch segment, timeline 1's will do.
        let mut partial = segs(1, 0x10..=0x14);
        partial.extend(segs(2, 0x15..=0x16));
        let (gaps, _) = wal_gaps(&[&b], &WalIndex::new(&partial, histories.clone(), SEG));
        assert!(gaps.is_empty(), "{gaps:?}");

        // A missing segment after the switch is a gap on timeline 2.
        let mut holed = segs(1, 0x10..=0x13);
        holed.extend(segs(2, 0x14..=0x14));
        holed.extend(segs(2, 0x16..=0x16));
        let (gaps, _) = wal_gaps(&[&b], &WalIndex::new(&holed, histories.clone(), SEG));
        assert_eq!(gaps.len(), 1);
        assert_eq!(
            (gaps[0].timeline, gaps[0].first),
            (TimelineId(2), SegmentNo(0x15))
        );
    }

    #[test]
    fn a_backup_after_the_branch_point_stays_on_its_timeline() {
        let b = backup(1, 0x18);
        let h2 = TimelineHistory::parse(TimelineId(2), "1\t0/14000100\tpromoted\n").expect("valid");
        let histories = HashMap::from([(TimelineId(2), h2)]);
        let mut wal = segs(1, 0x10..=0x1A);
        wal.extend(segs(2, 0x14..=0x30));
        let (gaps, checked) = wal_gaps(&[&b], &WalIndex::new(&wal, histories.clone(), SEG));
        assert!(gaps.is_empty(), "{gaps:?}");
        assert_eq!(checked, 3);
    }
}
