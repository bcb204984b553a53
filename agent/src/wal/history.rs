//! Timeline `.history` files: which parent timeline a timeline branched from, and where.
//!
//! Each line is `parentTLI <tab> switchpoint <tab> reason`; PostgreSQL writes
//! one line per ancestor, oldest first (see `timeline.c`, `readTimeLineHistory`).

use super::{Lsn, TimelineId};

/// One ancestor: timeline `parent` was left for a newer one at `switchpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The ancestor timeline.
    pub parent: TimelineId,
    /// The first LSN that is no longer on `parent`.
    pub switchpoint: Lsn,
}

/// The parsed history of one timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineHistory {
    /// The timeline the file describes.
    pub timeline: TimelineId,
    /// Its ancestors, oldest first.
    pub ancestors: Vec<HistoryEntry>,
}

/// Why a history file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HistoryError {
    /// A line is not `parentTLI switchpoint reason`.
    #[error("history file of timeline {timeline}, line {line}: {reason}")]
    BadLine {
        /// The timeline being parsed.
        timeline: TimelineId,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

impl TimelineHistory {
    /// Parses the contents of `<timeline>.history`.
    ///
    /// # Errors
    /// A malformed line, a parent that is not older than its child, or
    /// switchpoints that go backwards.
    pub fn parse(timeline: TimelineId, text: &str) -> Result<Self, HistoryError> {
        let mut ancestors: Vec<HistoryEntry> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let bad = |reason: &str| HistoryError::BadLine {
                timeline,
                line: index + 1,
                reason: reason.to_owned(),
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let parent: u32 = fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad("expected a parent timeline number"))?;
            let switchpoint: Lsn = fields
                .next()
                .and_then(|f| f.parse().ok())
                .ok_or_else(|| bad("expected a switchpoint LSN"))?;
            if parent >= timeline.0 {
                return Err(bad("parent timeline is not older than the timeline"));
            }
            if let Some(prev) = ancestors.last()
                && (prev.parent.0 >= parent || prev.switchpoint > switchpoint)
            {
                return Err(bad("entries are not in ascending order"));
            }
            ancestors.push(HistoryEntry {
                parent: TimelineId(parent),
                switchpoint,
            });
        }
        Ok(TimelineHistory {
            timeline,
            ancestors,
        })
    }

    /// The timeline that holds `lsn` when following this timeline's history.
    #[must_use]
    pub fn timeline_of(&self, lsn: Lsn) -> TimelineId {
        self.ancestors
            .iter()
            .find(|e| lsn < e.switchpoint)
            .map_or(self.timeline, |e| e.parent)
    }

    /// Where this timeline branched from its direct parent, if it has one.
    #[must_use]
    pub fn branch_point(&self) -> Option<HistoryEntry> {
        self.ancestors.last().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TLI3: &str = "1\t0/3000000\tno recovery target specified\n\n\
                        2\t0/5000028\tbefore 2026-11-21 14:30:00+00\n";

    #[test]
    fn parses_postgres_history() {
        let h = TimelineHistory::parse(TimelineId(3), TLI3).expect("valid history");
        assert_eq!(h.ancestors.len(), 2);
        assert_eq!(h.ancestors[1].parent, TimelineId(2));
        assert_eq!(h.ancestors[1].switchpoint, Lsn(0x500_0028));
        assert_eq!(h.branch_point().map(|e| e.parent), Some(TimelineId(2)));
    }

    #[test]
    fn finds_the_timeline_of_an_lsn() {
        let h = TimelineHistory::parse(TimelineId(3), TLI3).expect("valid history");
        assert_eq!(h.timeline_of(Lsn(0x100_0000)), TimelineId(1));
        assert_eq!(h.timeline_of(Lsn(0x300_0000)), TimelineId(2));
        assert_eq!(h.timeline_of(Lsn(0x500_0027)), TimelineId(2));
        assert_eq!(h.timeline_of(Lsn(0x500_0028)), TimelineId(3));
    }

    #[test]
    fn empty_history_is_timeline_one_like() {
        let h = TimelineHistory::parse(TimelineId(1), "# comment\n").expect("valid");
        assert!(h.ancestors.is_empty());
        assert_eq!(h.timeline_of(Lsn(u64::MAX)), TimelineId(1));
    }

    #[test]
    fn rejects_malformed_lines() {
        let cases = [
            "x\t0/1\treason",
            "1\tzz\treason",
            "3\t0/1\tparent not older",
            "1\t0/5\ta\n1\t0/6\tb",
            "1\t0/5\ta\n2\t0/4\tb",
        ];
        for text in cases {
            assert!(
                TimelineHistory::parse(TimelineId(3), text).is_err(),
                "{text:?} accepted"
            );
        }
    }
}
