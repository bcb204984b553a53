//! WAL file names as PostgreSQL writes them (`xlog_internal.h`).
//!
//! A segment is `TTTTTTTTXXXXXXXXYYYYYYYY`: timeline, then the segment number
//! split into a "log id" and the segment within that log id. How the number is
//! split depends on the segment size, so conversions take it as an argument.

use std::fmt;
use std::str::FromStr;

use super::{Lsn, TimelineId};

/// A segment number counted from the start of WAL, independent of the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentNo(pub u64);

impl SegmentNo {
    /// The position of the segment's first byte.
    #[must_use]
    pub fn start(self, segment_size: u32) -> Lsn {
        Lsn(self.0 * u64::from(segment_size))
    }

    /// The position after the segment's last byte.
    #[must_use]
    pub fn end(self, segment_size: u32) -> Lsn {
        Lsn((self.0 + 1) * u64::from(segment_size))
    }
}

/// What kind of file PostgreSQL hands to `archive_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WalFileKind {
    /// A full WAL segment.
    Segment,
    /// The last, incomplete segment of a timeline, archived at promotion.
    Partial,
    /// A backup history file, `<segment>.<offset>.backup`.
    BackupHistory,
    /// A timeline history file, `<timeline>.history`.
    TimelineHistory,
}

/// A validated WAL file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WalFileName {
    name: String,
    kind: WalFileKind,
    timeline: TimelineId,
    /// `(log id, segment within log id)`; zero for history files.
    log_seg: (u32, u32),
}

/// Why a name is not a WAL file name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a WAL file name: expected a 24-digit uppercase hex segment name \
     (optionally with .partial or .XXXXXXXX.backup) or XXXXXXXX.history"
)]
pub struct WalNameError(pub String);

fn parse_hex8(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

fn parse_segment(s: &str) -> Option<(TimelineId, (u32, u32))> {
    if s.len() != 24 || !s.is_ascii() {
        return None;
    }
    let tli = parse_hex8(&s[0..8])?;
    let log = parse_hex8(&s[8..16])?;
    let seg = parse_hex8(&s[16..24])?;
    (tli != 0).then_some((TimelineId(tli), (log, seg)))
}

impl FromStr for WalFileName {
    type Err = WalNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || WalNameError(s.to_owned());
        let make = |kind, timeline, log_seg| WalFileName {
            name: s.to_owned(),
            kind,
            timeline,
            log_seg,
        };
        if let Some((timeline, log_seg)) = parse_segment(s) {
            return Ok(make(WalFileKind::Segment, timeline, log_seg));
        }
        if let Some(base) = s.strip_suffix(".partial") {
            let (timeline, log_seg) = parse_segment(base).ok_or_else(err)?;
            return Ok(make(WalFileKind::Partial, timeline, log_seg));
        }
        if let Some(base) = s.strip_suffix(".history") {
            let tli = parse_hex8(base).filter(|t| *t != 0).ok_or_else(err)?;
            return Ok(make(WalFileKind::TimelineHistory, TimelineId(tli), (0, 0)));
        }
        if let Some(base) = s.strip_suffix(".backup") {
            let (segment, offset) = base.split_once('.').ok_or_else(err)?;
            let (timeline, log_seg) = parse_segment(segment).ok_or_else(err)?;
            parse_hex8(offset).ok_or_else(err)?;
            return Ok(make(WalFileKind::BackupHistory, timeline, log_seg));
        }
        Err(err())
    }
}

serde_as_text!(WalFileName);

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl WalFileName {
    /// The name of segment `segno` on `timeline`.
    #[must_use]
    pub fn segment(timeline: TimelineId, segno: SegmentNo, segment_size: u32) -> Self {
        let per_log = segments_per_log_id(segment_size);
        let log = u32::try_from(segno.0 / per_log).unwrap_or(u32::MAX);
        let seg = u32::try_from(segno.0 % per_log).unwrap_or(u32::MAX);
        WalFileName {
            name: format!("{:08X}{log:08X}{seg:08X}", timeline.0),
            kind: WalFileKind::Segment,
            timeline,
            log_seg: (log, seg),
        }
    }

    /// The history file of `timeline`.
    #[must_use]
    pub fn history(timeline: TimelineId) -> Self {
        WalFileName {
            name: format!("{:08X}.history", timeline.0),
            kind: WalFileKind::TimelineHistory,
            timeline,
            log_seg: (0, 0),
        }
    }

    /// The file name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// What kind of WAL file this is.
    #[must_use]
    pub fn kind(&self) -> WalFileKind {
        self.kind
    }

    /// The timeline the file belongs to.
    #[must_use]
    pub fn timeline(&self) -> TimelineId {
        self.timeline
    }

    /// The segment number, for segment, partial and backup-history files.
    #[must_use]
    pub fn segment_no(&self, segment_size: u32) -> Option<SegmentNo> {
        match self.kind {
            WalFileKind::TimelineHistory => None,
            _ => Some(SegmentNo(
                u64::from(self.log_seg.0) * segments_per_log_id(segment_size)
                    + u64::from(self.log_seg.1),
            )),
        }
    }

    /// The segment that follows this one on the same timeline.
    #[must_use]
    pub fn next_segment(&self, segment_size: u32) -> Option<Self> {
        let segno = self.segment_no(segment_size)?;
        Some(Self::segment(
            self.timeline,
            SegmentNo(segno.0 + 1),
            segment_size,
        ))
    }
}

fn segments_per_log_id(segment_size: u32) -> u64 {
    0x1_0000_0000 / u64::from(segment_size.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::DEFAULT_SEGMENT_SIZE;

    #[test]
    fn parses_every_kind() {
        let cases = [
            ("000000010000000A000000F3", WalFileKind::Segment, 1),
            ("000000020000000A000000F3.partial", WalFileKind::Partial, 2),
            (
                "000000010000000000000002.00000028.backup",
                WalFileKind::BackupHistory,
                1,
            ),
            ("0000000A.history", WalFileKind::TimelineHistory, 10),
        ];
        for (s, kind, tli) in cases {
            let name: WalFileName = s.parse().expect("valid name");
            assert_eq!(name.kind(), kind, "{s}");
            assert_eq!(name.timeline(), TimelineId(tli), "{s}");
            assert_eq!(name.to_string(), s);
        }
    }

    #[test]
    fn rejects_what_postgres_would_not_write() {
        for s in [
            "",
            "RECOVERYXLOG",
            "000000010000000a000000f3",
            "00000001000000000000000",
            "0000000100000000000000001",
            "000000000000000000000001",
            "00000000.history",
            "0000001.history",
            "000000010000000000000002.backup",
            "000000010000000000000002.0000002G.backup",
            "../../etc/passwd",
            "000000010000000000000002.gz",
        ] {
            assert!(s.parse::<WalFileName>().is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn segment_numbers_round_trip_across_log_ids() {
        let name: WalFileName = "000000010000000A000000FF".parse().expect("valid");
        let segno = name.segment_no(DEFAULT_SEGMENT_SIZE).expect("segment");
        assert_eq!(segno, SegmentNo(0xA * 256 + 0xFF));
        let next = name.next_segment(DEFAULT_SEGMENT_SIZE).expect("next");
        assert_eq!(next.as_str(), "000000010000000B00000000");
        assert_eq!(
            WalFileName::segment(TimelineId(1), segno, DEFAULT_SEGMENT_SIZE),
            name
        );
    }

    #[test]
    fn segment_size_changes_the_split() {
        // 1 GiB segments: four per log id.
        let name = WalFileName::segment(TimelineId(3), SegmentNo(5), 1 << 30);
        assert_eq!(name.as_str(), "000000030000000100000001");
        assert_eq!(name.segment_no(1 << 30), Some(SegmentNo(5)));
    }

    #[test]
    fn history_has_no_segment() {
        let name = WalFileName::history(TimelineId(2));
        assert_eq!(name.as_str(), "00000002.history");
        assert_eq!(name.segment_no(DEFAULT_SEGMENT_SIZE), None);
        assert_eq!(name.next_segment(DEFAULT_SEGMENT_SIZE), None);
    }

    proptest::proptest! {
        #[test]
        fn segment_names_round_trip(
            tl in 1u32..=u32::MAX,
            shift in 20u32..=30,
            segno in 0u64..(1u64 << 40),
        ) {
            let size = 1u32 << shift;
            let segno = segno % ((u64::from(u32::MAX) + 1) * (0x1_0000_0000 / u64::from(size)));
            let name = WalFileName::segment(TimelineId(tl), SegmentNo(segno), size);
            let parsed: WalFileName = name.as_str().parse().expect("a segment name parses");
            proptest::prop_assert_eq!(&parsed, &name);
            proptest::prop_assert_eq!(parsed.timeline(), TimelineId(tl));
            proptest::prop_assert_eq!(parsed.segment_no(size), Some(SegmentNo(segno)));
            proptest::prop_assert_eq!(parsed.kind(), WalFileKind::Segment);
        }

        #[test]
        fn anything_that_parses_prints_back_the_same(text in "[0-9A-F]{24}(\\.partial)?|[0-9A-F]{8}\\.history") {
            if let Ok(name) = text.parse::<WalFileName>() {
                proptest::prop_assert_eq!(name.as_str(), text.as_str());
            }
        }
    }
}
