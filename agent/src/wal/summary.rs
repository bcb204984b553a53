//! What one WAL segment holds, in a few hundred bytes: where its records
//! start and end, its first and last commit, its restore points, and
//! whether every record's CRC-32C and `xl_prev` link held.
//!
//! A summary is made from the segment alone, so segments can be summarized
//! in any order and in parallel. A record that a segment boundary splits is
//! kept as its two pieces (each segment's [`SegmentSummary::tail`] and the
//! next one's [`SegmentSummary::head`]); [`link`] joins them when both
//! summaries are at hand. Knows nothing about storage.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::records::{self, Completeness, Record, RecordKind};
use super::{Lsn, WalFileName};

/// The summary format this build writes and reads.
pub const SUMMARY_FORMAT: u32 = 1;

/// A split record's piece is carried whole up to this size; a larger one
/// is carried by its length alone, and its CRC is not checked across the
/// boundary (commit and restore-point records are far smaller).
pub const PIECE_KEEP: usize = 64 * 1024;

/// A transaction's end, as a restore target sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct XactPoint {
    /// `xact_time`, microseconds since the Unix epoch.
    pub time_us: i64,
    /// Where the commit record starts.
    pub lsn: Lsn,
    /// Where it ends: what replay reaches once it has applied it.
    pub end: Lsn,
    /// `xl_xid`.
    pub xid: u32,
}

/// A `pg_create_restore_point`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestorePoint {
    /// Its name.
    pub name: String,
    /// When it was made, microseconds since the Unix epoch.
    pub time_us: i64,
    /// Where its record starts.
    pub lsn: Lsn,
}

/// Unreadable WAL where records should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DamageNote {
    /// Where.
    pub lsn: Lsn,
    /// What is wrong.
    pub reason: String,
}

/// One piece of a record split by a segment boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Piece {
    /// The tail's record start; for a head, the bytes still to come
    /// (`xlp_rem_len`) are in `remaining`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<Lsn>,
    /// For a head: `xlp_rem_len`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u32>,
    /// The piece's length.
    pub len: u32,
    /// The piece, base64, when at most [`PIECE_KEEP`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
}

impl Piece {
    fn bytes(&self) -> Option<Vec<u8>> {
        base64::engine::general_purpose::STANDARD
            .decode(self.bytes.as_deref()?)
            .ok()
    }
}

fn keep(bytes: &[u8]) -> Option<String> {
    (bytes.len() <= PIECE_KEEP).then(|| base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// What one segment holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SegmentSummary {
    /// [`SUMMARY_FORMAT`].
    pub format: u32,
    /// The WAL file.
    pub segment: WalFileName,
    /// `XLOG_PAGE_MAGIC` (one per PostgreSQL major).
    pub page_magic: u16,
    /// Whether the bytes were a whole segment (a streamed or `.partial`
    /// one may end anywhere).
    pub complete: bool,
    /// How many records start and end in it.
    pub records: u64,
    /// Where the first record that starts in it starts.
    pub first_record: Option<Lsn>,
    /// That record's `xl_prev`: the start of the record before it.
    pub first_prev: Option<Lsn>,
    /// Where the last record that starts in it starts (a split one included).
    pub last_record: Option<Lsn>,
    /// Where the last record that starts and ends in it starts: a
    /// `recovery_target_lsn` that replay reaches with this segment alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_complete: Option<Lsn>,
    /// Where the readable WAL in it ends.
    pub end: Lsn,
    /// Commits in it.
    pub commits: u64,
    /// Aborts in it.
    pub aborts: u64,
    /// The first commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_commit: Option<XactPoint>,
    /// The last commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_commit: Option<XactPoint>,
    /// The earliest and latest `xact_time` of commits and aborts, which
    /// `recovery_target_time` compares with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_xact_time_us: Option<i64>,
    /// See `first_xact_time_us`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_xact_time_us: Option<i64>,
    /// Its restore points.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restore_points: Vec<RestorePoint>,
    /// Whether `pg_switch_wal()` ended it.
    #[serde(default)]
    pub switched: bool,
    /// Unreadable records before its end: replay stops there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damage: Option<DamageNote>,
    /// The end of a record begun in the segment before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<Piece>,
    /// The start of a record that goes on in the next segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tail: Option<Piece>,
}

/// Why a summary could not be made.
pub use records::ReadError;

/// Folds one record into the summary's counts and points.
fn note(s: &mut SegmentSummary, r: &Record) {
    let xact = |time_us| XactPoint {
        time_us,
        lsn: r.lsn,
        end: r.end(),
        xid: r.xid,
    };
    match &r.kind {
        RecordKind::Commit { time } => {
            s.commits += 1;
            if s.first_commit.is_none() {
                s.first_commit = Some(xact(*time));
            }
            s.last_commit = Some(xact(*time));
        }
        RecordKind::Abort { .. } => s.aborts += 1,
        RecordKind::RestorePoint { name, time } => s.restore_points.push(RestorePoint {
            name: name.clone(),
            time_us: *time,
            lsn: r.lsn,
        }),
        RecordKind::Switch | RecordKind::Other => {}
    }
    if let RecordKind::Commit { time } | RecordKind::Abort { time } = r.kind {
        s.first_xact_time_us = Some(s.first_xact_time_us.map_or(time, |t| t.min(time)));
        s.last_xact_time_us = Some(s.last_xact_time_us.map_or(time, |t| t.max(time)));
    }
}

/// Summarizes `data`, the bytes of WAL file `name` from its first byte.
///
/// # Errors
/// [`ReadError`] when the bytes are not WAL.
pub fn summarize(
    name: &WalFileName,
    data: &[u8],
    segment_size: u32,
    completeness: Completeness,
) -> Result<SegmentSummary, ReadError> {
    let start = name
        .segment_no(segment_size)
        .map(|s| s.start(segment_size))
        .ok_or_else(|| ReadError::NotWal(format!("{name} is not a segment")))?;
    let mut s = SegmentSummary {
        format: SUMMARY_FORMAT,
        segment: name.clone(),
        page_magic: 0,
        complete: completeness == Completeness::Full
            && data.len() as u64 == u64::from(segment_size),
        records: 0,
        first_record: None,
        first_prev: None,
        last_record: None,
        last_complete: None,
        end: start,
        commits: 0,
        aborts: 0,
        first_commit: None,
        last_commit: None,
        first_xact_time_us: None,
        last_xact_time_us: None,
        restore_points: Vec::new(),
        switched: false,
        damage: None,
        head: None,
        tail: None,
    };
    let read = records::read_segment(data, start, completeness, |r| {
        s.records += 1;
        note(&mut s, r);
    })?;
    s.page_magic = read.page_magic;
    s.first_record = read.first;
    s.first_prev = read.first_prev;
    s.last_record = read
        .tail
        .as_ref()
        .map(|t| t.lsn)
        .or(read.last.as_ref().map(|r| r.lsn));
    s.last_complete = read.last.as_ref().map(|r| r.lsn);
    s.end = read.end;
    s.switched = read.switched;
    s.damage = read.damage.map(|d| DamageNote {
        lsn: d.lsn,
        reason: d.reason,
    });
    s.head = read.head.map(|h| Piece {
        lsn: None,
        remaining: Some(h.remaining),
        len: h.bytes.len() as u32,
        bytes: keep(&h.bytes),
    });
    s.tail = read.tail.map(|t| Piece {
        lsn: Some(t.lsn),
        remaining: None,
        len: t.bytes.len() as u32,
        bytes: keep(&t.bytes),
    });
    Ok(s)
}

/// How two consecutive segments meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// They chain; the record split between them, when there is one and
    /// both pieces were kept.
    Chained(Option<Record>),
    /// They do not: replay stops at `lsn`.
    Broken(DamageNote),
}

/// Whether `next` continues `prev` (the segment before it on the recovery
/// path), joining the record the boundary splits.
#[must_use]
pub fn link(prev: &SegmentSummary, next: &SegmentSummary) -> Link {
    let broken = |lsn: Lsn, reason: String| Link::Broken(DamageNote { lsn, reason });
    if prev.damage.is_some() || !prev.complete {
        // Replay has already stopped in `prev`.
        return Link::Chained(None);
    }
    let mut joined = None;
    // A record longer than a segment: `prev` is all continuation, and
    // `next` must continue it by exactly what was left.
    if prev.first_record.is_none()
        && let Some(ph) = &prev.head
        && ph.remaining.unwrap_or(0) > ph.len
    {
        let left = ph.remaining.unwrap_or(0) - ph.len;
        return match &next.head {
            Some(nh) if nh.remaining == Some(left) => Link::Chained(None),
            _ => broken(
                next.end,
                format!(
                    "{} does not continue the {left} bytes of the record that {} leaves unfinished",
                    next.segment, prev.segment
                ),
            ),
        };
    }
    match (&prev.tail, &next.head) {
        (Some(_), Some(head)) if head.remaining.unwrap_or(0) > head.len => {
            // The split record goes on past `next` too: not joinable here.
            return Link::Chained(None);
        }
        (Some(tail), Some(head)) => {
            let (Some(tail_lsn), Some(remaining)) = (tail.lsn, head.remaining) else {
                return Link::Chained(None);
            };
            if let (Some(t), Some(h)) = (tail.bytes(), head.bytes()) {
                let t = records::Tail {
                    lsn: tail_lsn,
                    bytes: t,
                };
                let h = records::Head {
                    remaining,
                    bytes: h,
                };
                match records::join(&t, &h, prev.page_magic) {
                    Ok(r) => {
                        if prev.last_record.is_some_and(|l| l != tail_lsn) {
                            return broken(tail_lsn, "the split record is not the last one".into());
                        }
                        joined = Some(r);
                    }
                    Err(reason) => return broken(tail_lsn, reason),
                }
            }
            if let Some(fp) = next.first_prev
                && fp != tail_lsn
            {
                return broken(
                    next.first_record.unwrap_or(next.end),
                    format!(
                        "the first record of {} links back to {fp}, not to {tail_lsn} where the \
                         record before it starts",
                        next.segment
                    ),
                );
            }
        }
        (Some(tail), None) => {
            return broken(
                tail.lsn.unwrap_or(prev.end),
                format!(
                    "a record starts at the end of {} but {} does not continue it",
                    prev.segment, next.segment
                ),
            );
        }
        (None, Some(_)) if !prev.switched => {
            return broken(
                next.end,
                format!(
                    "{} continues a record, but {} ends with a complete one",
                    next.segment, prev.segment
                ),
            );
        }
        _ => {
            if let (Some(fp), Some(last)) = (next.first_prev, prev.last_record)
                && fp != last
            {
                return broken(
                    next.first_record.unwrap_or(next.end),
                    format!(
                        "the first record of {} links back to {fp}, not to {last} where the last \
                         record of {} starts",
                        next.segment, prev.segment
                    ),
                );
            }
        }
    }
    Link::Chained(joined)
}

impl SegmentSummary {
    /// The time of the newest commit in it, microseconds since the Unix epoch.
    #[must_use]
    pub fn last_commit_time(&self) -> Option<i64> {
        self.last_commit.as_ref().map(|c| c.time_us)
    }
}

/// What the summaries of a recovery path, in order, say about replaying it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathFacts {
    /// Segments on the path.
    pub segments: u64,
    /// Of those, how many had a summary.
    pub summarized: u64,
    /// Whether the path's last segment had one (so `end` is its end).
    pub last_summarized: bool,
    /// The newest commit replay reaches (before `stop`).
    pub last_commit: Option<XactPoint>,
    /// The newest commit anywhere on the path, past `stop` too.
    pub archived_last_commit: Option<XactPoint>,
    /// The start of the last record replay can read: a
    /// `recovery_target_lsn` that ends replay at the end of the path.
    pub last_complete: Option<Lsn>,
    /// Where readable WAL ends on the path.
    pub end: Option<Lsn>,
    /// Where replay must stop: a damaged segment or two that do not chain.
    pub stop: Option<(WalFileName, DamageNote)>,
    /// Restore points replay reaches.
    pub restore_points: Vec<RestorePoint>,
}

/// Folds the summaries of a path's segments, oldest first (`None` where a
/// segment has no summary), into [`PathFacts`].
#[must_use]
pub fn path_facts(path: &[(WalFileName, Option<&SegmentSummary>)]) -> PathFacts {
    let mut f = PathFacts {
        segments: path.len() as u64,
        ..PathFacts::default()
    };
    let mut prev: Option<&SegmentSummary> = None;
    let later = |f: &mut PathFacts, c: &XactPoint| {
        if f.archived_last_commit
            .as_ref()
            .is_none_or(|a| a.lsn < c.lsn)
        {
            f.archived_last_commit = Some(c.clone());
        }
    };
    for (i, (name, s)) in path.iter().enumerate() {
        let Some(s) = *s else {
            prev = None;
            continue;
        };
        f.summarized += 1;
        f.last_summarized = i + 1 == path.len();
        if let Some(c) = &s.last_commit {
            later(&mut f, c);
        }
        if f.stop.is_some() {
            continue;
        }
        if let Some(p) = prev {
            match link(p, s) {
                Link::Broken(d) => {
                    f.stop = Some((name.clone(), d));
                    continue;
                }
                Link::Chained(Some(r)) => {
                    if let RecordKind::Commit { time } = r.kind {
                        let c = XactPoint {
                            time_us: time,
                            lsn: r.lsn,
                            end: r.end(),
                            xid: r.xid,
                        };
                        later(&mut f, &c);
                        f.last_commit = Some(c);
                    }
                    if let RecordKind::RestorePoint { name, time } = &r.kind {
                        f.restore_points.push(RestorePoint {
                            name: name.clone(),
                            time_us: *time,
                            lsn: r.lsn,
                        });
                    }
                    f.last_complete = Some(r.lsn);
                    f.end = Some(r.end());
                }
                Link::Chained(None) => {}
            }
        }
        if let Some(c) = &s.last_commit {
            f.last_commit = Some(c.clone());
        }
        f.restore_points.extend(s.restore_points.iter().cloned());
        if s.last_complete.is_some() {
            f.last_complete = s.last_complete;
        }
        f.end = Some(s.end);
        if let Some(d) = &s.damage {
            f.stop = Some((name.clone(), d.clone()));
        }
        prev = Some(s);
    }
    f
}
