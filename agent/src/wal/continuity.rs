//! Which WAL segments recovery reads, and which of them an archive lacks.
//!
//! Recovery from a backup on timeline `t` toward a newer timeline `T` reads,
//! for each segment number, the file of the timeline that held that point in
//! `T`'s history; at a switch, the segment holding the switchpoint may come
//! from either side (recovery prefers the newer). Knows nothing about storage.

use std::collections::{HashMap, HashSet};

use super::{Lsn, SegmentNo, TimelineHistory, TimelineId, WalFileKind, WalFileName};

/// The archived WAL, indexed for continuity questions.
#[derive(Debug, Clone)]
pub struct WalIndex {
    present: HashSet<(TimelineId, SegmentNo)>,
    newest: HashMap<TimelineId, SegmentNo>,
    timelines: HashSet<TimelineId>,
    histories: HashMap<TimelineId, TimelineHistory>,
    segment_size: u32,
}

/// A stretch of a recovery path: from `first` on, segments come from `timeline`.
pub type Stretch = (TimelineId, SegmentNo);

impl WalIndex {
    /// Indexes the archived files `names` and the parsed `.history` files.
    #[must_use]
    pub fn new(
        names: &[WalFileName],
        histories: HashMap<TimelineId, TimelineHistory>,
        segment_size: u32,
    ) -> Self {
        let mut index = WalIndex {
            present: HashSet::new(),
            newest: HashMap::new(),
            timelines: histories.keys().copied().collect(),
            histories,
            segment_size,
        };
        for name in names {
            if !matches!(name.kind(), WalFileKind::Segment | WalFileKind::Partial) {
                continue;
            }
            let Some(segno) = name.segment_no(segment_size) else {
                continue;
            };
            index.present.insert((name.timeline(), segno));
            index.timelines.insert(name.timeline());
            let n = index.newest.entry(name.timeline()).or_insert(segno);
            *n = (*n).max(segno);
        }
        index
    }

    /// The parsed history of `tl`, if the archive has one.
    #[must_use]
    pub fn history(&self, tl: TimelineId) -> Option<&TimelineHistory> {
        self.histories.get(&tl)
    }

    /// The segment size the index was built with.
    #[must_use]
    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }

    /// Whether `target` is `tl`, or branched (directly or not) from `tl` after `lsn`.
    #[must_use]
    pub fn descends(&self, target: TimelineId, tl: TimelineId, lsn: Lsn) -> bool {
        target == tl
            || self.histories.get(&target).is_some_and(|h| {
                h.ancestors
                    .iter()
                    .any(|e| e.parent == tl && e.switchpoint > lsn)
            })
    }

    /// The highest timeline the archive knows, as `recovery_target_timeline =
    /// 'latest'` picks it.
    #[must_use]
    pub fn newest_timeline(&self) -> Option<TimelineId> {
        self.timelines.iter().copied().max()
    }

    /// The newest known timeline that descends from `tl` after `lsn`.
    #[must_use]
    pub fn latest_descendant(&self, tl: TimelineId, lsn: Lsn) -> TimelineId {
        self.timelines
            .iter()
            .copied()
            .filter(|t| self.descends(*t, tl, lsn))
            .max()
            .unwrap_or(tl)
    }

    /// The recovery path from segment `start` on `tl` to `target`, oldest first.
    #[must_use]
    pub fn path(&self, tl: TimelineId, start: SegmentNo, target: TimelineId) -> Vec<Stretch> {
        let mut path = vec![(tl, start)];
        if target == tl {
            return path;
        }
        if let Some(h) = self.histories.get(&target) {
            let mut on_path = false;
            for (i, e) in h.ancestors.iter().enumerate() {
                on_path |= e.parent == tl;
                if !on_path {
                    continue;
                }
                let next = h.ancestors.get(i + 1).map_or(target, |n| n.parent);
                path.push((next, e.switchpoint.segment(self.segment_size).max(start)));
            }
        }
        path
    }

    /// The newest archived segment recovery along `path` can read: the newest
    /// on its last timeline, or its last switch segment if that has none.
    #[must_use]
    pub fn end_of(&self, path: &[Stretch]) -> SegmentNo {
        let (last_tl, last_switch) = *path.last().expect("a path has a start");
        self.newest
            .get(&last_tl)
            .copied()
            .unwrap_or(last_switch)
            .max(last_switch)
    }

    /// The timeline whose file recovery reads for `segno` along `path`.
    #[must_use]
    pub fn timeline_for(path: &[Stretch], segno: SegmentNo) -> TimelineId {
        let idx = path.iter().rposition(|p| p.1 <= segno).unwrap_or(0);
        path[idx].0
    }

    /// Segments in `from..=to` along `path` that are not archived, as
    /// (expected timeline, segment); and how many were present.
    #[must_use]
    pub fn missing(
        &self,
        path: &[Stretch],
        from: SegmentNo,
        to: SegmentNo,
    ) -> (Vec<(TimelineId, SegmentNo)>, u64) {
        let mut missing = Vec::new();
        let mut present = 0;
        let mut segno = from;
        while segno <= to {
            let idx = path.iter().rposition(|p| p.1 <= segno).unwrap_or(0);
            let tl = path[idx].0;
            let mut ok = self.present.contains(&(tl, segno));
            if !ok && idx > 0 && path[idx].1 == segno {
                ok = self.present.contains(&(path[idx - 1].0, segno));
            }
            if ok {
                present += 1;
            } else {
                missing.push((tl, segno));
            }
            segno = SegmentNo(segno.0 + 1);
        }
        (missing, present)
    }

    /// `first..last`, abbreviating the last name to what differs
    /// (`000000010000000A000000F3..F5`), for messages.
    #[must_use]
    pub fn range_text(&self, tl: TimelineId, first: SegmentNo, last: SegmentNo) -> String {
        let a = WalFileName::segment(tl, first, self.segment_size).to_string();
        let b = WalFileName::segment(tl, last, self.segment_size).to_string();
        if a == b {
            a
        } else if a[..22] == b[..22] {
            format!("{a}..{}", &b[22..])
        } else {
            format!("{a}..{b}")
        }
    }
}
