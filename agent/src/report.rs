//! Human-readable tables and JSON documents for `list`, `verify` and `prune`,
//! shared by `pitr-agent` and `pgrestore list`. Knows nothing about storage.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::catalog::backup::{BackupRecord, Catalog, RestorableWindow, time_text};
use crate::catalog::retention::RetentionPlan;
use crate::verify::VerifyReport;

/// `1.5 GiB`.
#[must_use]
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `3d 4h`, `12m 5s`: the two largest units.
#[must_use]
pub fn age(d: Duration) -> String {
    let secs = d.as_secs();
    let (days, hours, mins, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {mins}m")
    } else if mins > 0 {
        format!("{mins}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// One backup as `list --json` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ListedBackup<'a> {
    /// The id.
    pub id: &'a str,
    /// When it ended.
    #[serde(with = "time_text")]
    pub stop_time: SystemTime,
    /// Seconds since it ended.
    pub age_seconds: u64,
    /// Seconds it took.
    pub duration_seconds: u64,
    /// Uncompressed bytes.
    pub raw_bytes: u64,
    /// Stored bytes.
    pub stored_bytes: u64,
    /// Timeline at its end.
    pub timeline: u32,
    /// First WAL segment it needs.
    pub first_wal: &'a str,
    /// Last WAL segment it needs.
    pub last_wal: &'a str,
    /// LSN where it is consistent.
    pub stop_lsn: String,
    /// PostgreSQL version number.
    pub pg_version: u32,
}

/// The `list --json` document.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Listing<'a> {
    /// Committed backups, oldest first.
    pub backups: Vec<ListedBackup<'a>>,
    /// The restorable window, if any backup exists.
    pub restorable_window: Option<RestorableWindow>,
    /// Incomplete backups (ignored by every command).
    pub incomplete: Vec<String>,
    /// Archived WAL files.
    pub wal_files: usize,
    /// Their stored bytes.
    pub wal_bytes: u64,
    /// The newest restore rehearsal (`pitr-agent rehearse`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rehearsal: Option<&'a crate::rehearse::RehearsalRecord>,
    /// The newest successful one: the last proven restorable point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_proven: Option<&'a crate::rehearse::RehearsalRecord>,
    /// Restore points in the archived WAL (`--target-name`), oldest first.
    pub restore_points: Vec<ListedRestorePoint>,
    /// Archived segments with unreadable records: a restore stops there.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub damaged_wal: Vec<String>,
    /// Timelines that both grew after their fork.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub diverged: Vec<crate::catalog::backup::Divergence>,
}

/// A restore point as `list` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ListedRestorePoint {
    /// Its name.
    pub name: String,
    /// When it was made.
    #[serde(with = "time_text")]
    pub time: SystemTime,
    /// Where.
    pub lsn: String,
    /// The segment that holds it.
    pub segment: String,
}

/// Builds the listing.
#[must_use]
pub fn listing(catalog: &Catalog, now: SystemTime) -> Listing<'_> {
    Listing {
        backups: catalog
            .backups
            .iter()
            .map(|b: &BackupRecord| ListedBackup {
                id: b.id.as_str(),
                stop_time: b.stop_time,
                age_seconds: now
                    .duration_since(b.stop_time)
                    .unwrap_or_default()
                    .as_secs(),
                duration_seconds: b.duration().as_secs(),
                raw_bytes: b.raw_bytes,
                stored_bytes: b.stored_bytes,
                timeline: b.timeline.0,
                first_wal: b.first_wal.as_str(),
                last_wal: b.last_wal.as_str(),
                stop_lsn: b.stop_lsn.to_string(),
                pg_version: b.pg_version,
            })
            .collect(),
        restorable_window: catalog.restorable_window(),
        incomplete: catalog
            .incomplete
            .iter()
            .map(|i| i.id.to_string())
            .collect(),
        wal_files: catalog.wal.len(),
        wal_bytes: catalog.wal.iter().map(|w| w.meta.size).sum(),
        last_rehearsal: catalog.rehearsals.newest.as_ref(),
        last_proven: catalog.rehearsals.newest_ok.as_ref(),
        restore_points: catalog
            .archive_end
            .iter()
            .flat_map(|e| &e.restore_points)
            .map(|(segment, rp)| ListedRestorePoint {
                name: rp.name.clone(),
                time: crate::catalog::backup::micros_to_time(rp.time_us),
                lsn: rp.lsn.to_string(),
                segment: segment.to_string(),
            })
            .collect(),
        damaged_wal: catalog
            .archive_end
            .iter()
            .flat_map(|e| &e.damaged)
            .map(ToString::to_string)
            .collect(),
        diverged: catalog
            .archive_end
            .iter()
            .flat_map(|e| &e.diverged)
            .cloned()
            .collect(),
    }
}

/// The `list` table.
#[must_use]
pub fn listing_table(l: &Listing<'_>) -> String {
    let mut out = String::new();
    if l.backups.is_empty() {
        out.push_str("no backups yet; take one with `pitr-agent backup`\n");
    } else {
        let _ = writeln!(
            out,
            "{:<18} {:<20} {:>8} {:>9} {:>10} {:>10} {:>3}  WAL",
            "BACKUP", "ENDED (UTC)", "AGE", "DURATION", "SIZE", "STORED", "TL"
        );
        for b in &l.backups {
            let _ = writeln!(
                out,
                "{:<18} {:<20} {:>8} {:>9} {:>10} {:>10} {:>3}  {}..{}",
                b.id,
                time(b.stop_time),
                age(Duration::from_secs(b.age_seconds)),
                age(Duration::from_secs(b.duration_seconds)),
                bytes(b.raw_bytes),
                bytes(b.stored_bytes),
                b.timeline,
                b.first_wal,
                b.last_wal
            );
        }
    }
    match &l.restorable_window {
        Some(w) => {
            let streamed = w
                .streamed_to
                .as_ref()
                .map(|lsn| format!(", streamed to {lsn}"))
                .unwrap_or_default();
            let end = match w.last_commit {
                _ if w.gaps.iter().any(|g| g.resumes_at.is_none()) => {
                    format!("{} (where the WAL gap below begins)", time(w.end))
                }
                Some(c) if w.end_is_last_commit => format!(
                    "{} (the newest commit)",
                    humantime::format_rfc3339_micros(c)
                        .to_string()
                        .replace('T', " ")
                        .trim_end_matches('Z')
                ),
                _ if w.end_is_last_commit || w.end != w.archived_to => {
                    format!("{} (the newest backup's end; no commit since)", time(w.end))
                }
                _ => format!("{} (when the newest WAL was stored)", time(w.end)),
            };
            let _ = writeln!(
                out,
                "restorable window: {} .. {end} (newest archived WAL: {}{streamed})",
                time(w.start),
                w.newest_wal.as_deref().unwrap_or("none")
            );
            for g in &w.gaps {
                let _ = writeln!(
                    out,
                    "WAL GAP: {} missing; nothing after {} is restorable from an earlier backup{}",
                    g.missing,
                    time(g.ends_at),
                    match g.resumes_at {
                        Some(r) =>
                            format!("; the window resumes at {} (a backup after it)", time(r)),
                        None => "; take a backup to restore past it".to_owned(),
                    }
                );
            }
        }
        None => out.push_str("restorable window: none (no backup)\n"),
    }
    let _ = writeln!(
        out,
        "archived WAL: {} files, {}",
        l.wal_files,
        bytes(l.wal_bytes)
    );
    for rp in &l.restore_points {
        let _ = writeln!(
            out,
            "restore point {:?}: {} at {} (pgrestore --target-name)",
            rp.name,
            time(rp.time),
            rp.lsn
        );
    }
    for d in &l.diverged {
        let _ = writeln!(
            out,
            "DIVERGED: {d}; a restore must name one with --target-timeline. Only the cluster \
             that replaces production is restored with --new-primary"
        );
    }
    for d in &l.damaged_wal {
        let _ = writeln!(
            out,
            "DAMAGED WAL: {d} has unreadable records; a restore stops there (`pitr-agent verify`)"
        );
    }
    if let Some(r) = l.last_proven {
        let _ = writeln!(
            out,
            "last proven restorable: {}, restore took {:.0} s (rehearsal {})",
            r.restored_point
                .as_deref()
                .unwrap_or("(no transaction replayed)"),
            r.restore_seconds,
            r.id
        );
    }
    match l.last_rehearsal {
        Some(r) if r.ok => {}
        Some(r) => {
            let _ = writeln!(
                out,
                "last rehearsal {} FAILED ({}): {}",
                r.id,
                r.reason
                    .map_or("unknown", crate::rehearse::FailureReason::as_str),
                r.error.as_deref().unwrap_or("")
            );
        }
        None => {}
    }
    if !l.incomplete.is_empty() {
        let _ = writeln!(
            out,
            "incomplete (ignored; prune removes them): {}",
            l.incomplete.join(", ")
        );
    }
    out
}

/// The `verify` report as text.
#[must_use]
pub fn verify_text(r: &VerifyReport) -> String {
    let mut out = String::new();
    for f in &r.findings {
        let _ = writeln!(
            out,
            "{:<7}  {:<18}  {}",
            f.severity.as_str(),
            f.subject,
            f.message
        );
    }
    for (id, to) in &r.recipients {
        let _ = writeln!(out, "backup {id} is encrypted to {}", to.join(", "));
    }
    let errors = r
        .findings
        .iter()
        .filter(|f| f.severity == crate::verify::Severity::Error)
        .count();
    let _ = writeln!(
        out,
        "verified {} ({} files, {} read) and {} WAL segments ({} WAL objects read back{}): \
         {} errors, {} warnings",
        plural(r.backups_checked.len(), "backup"),
        r.files_checked,
        bytes(r.bytes_read),
        r.wal_segments_checked,
        r.wal_objects_read,
        if r.wal_summaries_stored > 0 {
            format!(", {} summaries stored", r.wal_summaries_stored)
        } else {
            String::new()
        },
        errors,
        r.findings.len() - errors
    );
    out
}

/// The `prune` plan as text.
#[must_use]
pub fn plan_text(plan: &RetentionPlan, dry_run: bool) -> String {
    let mut out = String::new();
    let verb = if dry_run { "would delete" } else { "deleting" };
    for k in &plan.keep {
        let _ = writeln!(out, "keep    backup {}  ({})", k.id, k.reason);
    }
    for id in &plan.delete_backups {
        let _ = writeln!(out, "{verb} backup {id}");
    }
    match (plan.delete_wal.first(), plan.delete_wal.last()) {
        (Some(first), Some(last)) => {
            let _ = writeln!(
                out,
                "{verb} {} WAL files ({}): {first} .. {last}",
                plan.delete_wal.len(),
                bytes(plan.delete_wal_bytes)
            );
        }
        _ => out.push_str("no WAL to delete\n"),
    }
    for id in &plan.delete_debris {
        let _ = writeln!(out, "{verb} incomplete backup {id}");
    }
    if !plan.delete_filestore.is_empty() {
        let _ = writeln!(
            out,
            "{verb} {} filestore files ({}) removed from the volume before the oldest kept backup",
            plan.delete_filestore.len(),
            bytes(plan.delete_filestore_bytes)
        );
    }
    if plan.is_empty() {
        out.push_str("nothing to prune\n");
    }
    out
}

/// `1 backup`, `2 backups`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_sizes_and_ages() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(age(Duration::from_secs(59)), "59s");
        assert_eq!(age(Duration::from_secs(3 * 86_400 + 4 * 3600 + 5)), "3d 4h");
        assert_eq!(age(Duration::from_secs(3725)), "1h 2m");
    }
}
