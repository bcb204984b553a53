//! Streamed WAL: the segment being written, stored in pieces as it grows.
//!
//! `wal-partial/<segment>/<start>-<end>.gz` holds the segment's bytes from
//! LSN `start` to `end` (16 hex digits each, so names sort by position). A
//! piece is never overwritten; the streamer stores only what is new since
//! the last piece, and now and then one piece from the segment's start that
//! replaces the others. Once the complete segment is in `wal/`, every piece
//! of it is deleted.
//!
//! What a restore can use is the run of pieces that covers the segment from
//! its first byte without a hole: [`covering_chain`].

use std::time::SystemTime;

use crate::storage::{ObjectKey, ObjectMeta};
use crate::wal::{Lsn, WalFileKind, WalFileName};

/// The prefix under which streamed pieces live.
pub const PARTIAL_PREFIX: &str = "wal-partial/";

/// One stored piece of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialPiece {
    /// The segment.
    pub segment: WalFileName,
    /// Position of its first byte.
    pub start: Lsn,
    /// Position after its last byte.
    pub end: Lsn,
    /// The object.
    pub meta: ObjectMeta,
}

/// The prefix of `segment`'s pieces.
#[must_use]
pub fn partial_prefix(segment: &WalFileName) -> String {
    format!("{PARTIAL_PREFIX}{segment}/")
}

/// The key of the piece of `segment` from `start` to `end`.
#[must_use]
pub fn partial_key(segment: &WalFileName, start: Lsn, end: Lsn) -> ObjectKey {
    ObjectKey::new(format!(
        "{}{:016X}-{:016X}.gz",
        partial_prefix(segment),
        start.0,
        end.0
    ))
    .expect("segment names and hex digits are valid keys")
}

/// The piece an object holds, if it is one.
#[must_use]
pub fn piece_of(meta: &ObjectMeta) -> Option<PartialPiece> {
    let rest = meta.key.as_str().strip_prefix(PARTIAL_PREFIX)?;
    let (segment, file) = rest.split_once('/')?;
    let segment: WalFileName = segment.parse().ok()?;
    if segment.kind() != WalFileKind::Segment {
        return None;
    }
    let (start, end) = file.strip_suffix(".gz")?.split_once('-')?;
    if start.len() != 16 || end.len() != 16 {
        return None;
    }
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    (start < end).then(|| PartialPiece {
        segment,
        start: Lsn(start),
        end: Lsn(end),
        meta: meta.clone(),
    })
}

/// The pieces that cover `segment_start..` without a hole, in order: at each
/// step the piece that starts at or before the covered end and reaches
/// furthest. Empty when no piece starts at the segment's first byte.
#[must_use]
pub fn covering_chain(pieces: &[PartialPiece], segment_start: Lsn) -> Vec<&PartialPiece> {
    let mut chain = Vec::new();
    let mut covered = segment_start;
    loop {
        let next = pieces
            .iter()
            .filter(|p| p.start <= covered && p.end > covered)
            .filter(|p| p.start >= segment_start)
            .max_by_key(|p| (p.end, std::cmp::Reverse(p.start)));
        match next {
            Some(p) => {
                covered = p.end;
                chain.push(p);
            }
            None => return chain,
        }
    }
}

/// The newest streamed point of one segment that has no complete copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamedSegment {
    /// The segment.
    pub name: WalFileName,
    /// How far its pieces reach without a hole.
    pub end: Lsn,
    /// When the last of those pieces was stored.
    pub modified: Option<SystemTime>,
    /// Stored bytes of all its pieces.
    pub bytes: u64,
}

/// Groups pieces by segment, skipping segments `complete` says are stored
/// whole, and returns each segment's usable reach, sorted by name.
pub fn streamed_segments(
    pieces: Vec<PartialPiece>,
    segment_size: u32,
    complete: impl Fn(&WalFileName) -> bool,
) -> Vec<StreamedSegment> {
    let mut by_segment: std::collections::BTreeMap<String, Vec<PartialPiece>> =
        std::collections::BTreeMap::new();
    for p in pieces {
        by_segment
            .entry(p.segment.as_str().to_owned())
            .or_default()
            .push(p);
    }
    let mut out = Vec::new();
    for pieces in by_segment.into_values() {
        let name = pieces[0].segment.clone();
        if complete(&name) {
            continue;
        }
        let Some(segno) = name.segment_no(segment_size) else {
            continue;
        };
        let start = segno.start(segment_size);
        let chain = covering_chain(&pieces, start);
        let Some(last) = chain.last() else {
            continue;
        };
        out.push(StreamedSegment {
            end: last.end,
            modified: chain.iter().filter_map(|p| p.meta.modified).max(),
            bytes: pieces.iter().map(|p| p.meta.size).sum(),
            name,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(seg: &WalFileName, start: u64, end: u64) -> PartialPiece {
        let key = partial_key(seg, Lsn(start), Lsn(end));
        piece_of(&ObjectMeta {
            key,
            size: 10,
            modified: None,
        })
        .expect("a piece key parses")
    }

    #[test]
    fn keys_round_trip_and_sort_by_position() {
        let seg: WalFileName = "000000020000000100000003".parse().expect("name");
        let p = piece(&seg, 0x1_0300_0000, 0x1_0300_2000);
        assert_eq!(
            p.meta.key.as_str(),
            "wal-partial/000000020000000100000003/0000000103000000-0000000103002000.gz"
        );
        assert_eq!((p.start, p.end), (Lsn(0x1_0300_0000), Lsn(0x1_0300_2000)));
        let later = partial_key(&seg, Lsn(0x1_0300_2000), Lsn(0x1_0310_0000));
        assert!(later.as_str() > p.meta.key.as_str());
        for bad in [
            "wal-partial/000000020000000100000003/x-y.gz",
            "wal-partial/00000002.history/0-1.gz",
            "wal-partial/000000020000000100000003/0000000000000002-0000000000000001.gz",
            "wal/000000020000000100000003.gz",
        ] {
            let meta = ObjectMeta {
                key: ObjectKey::new(bad).expect("key"),
                size: 1,
                modified: None,
            };
            assert_eq!(piece_of(&meta), None, "{bad}");
        }
    }

    #[test]
    fn the_chain_starts_at_the_first_byte_and_stops_at_a_hole() {
        let seg: WalFileName = "000000010000000000000001".parse().expect("name");
        let base = 0x100_0000;
        // Two runs of pieces (a restarted streamer re-sent from the start),
        // a compacted piece, and one piece after a hole.
        let pieces = vec![
            piece(&seg, base, base + 100),
            piece(&seg, base + 100, base + 250),
            piece(&seg, base, base + 180),
            piece(&seg, base + 180, base + 300),
            piece(&seg, base + 400, base + 500),
        ];
        let chain = covering_chain(&pieces, Lsn(base));
        let ends: Vec<u64> = chain.iter().map(|p| p.end.0 - base).collect();
        assert_eq!(ends, vec![180, 300], "furthest reach at each step");
        assert!(covering_chain(&pieces[1..2], Lsn(base)).is_empty());
    }

    #[test]
    fn complete_segments_are_not_streamed_segments() {
        let a: WalFileName = "000000010000000000000001".parse().expect("name");
        let b: WalFileName = "000000010000000000000002".parse().expect("name");
        let seg = crate::wal::DEFAULT_SEGMENT_SIZE;
        let s = u64::from(seg);
        let pieces = vec![piece(&a, s, s + 10), piece(&b, 2 * s, 2 * s + 20)];
        let streamed = streamed_segments(pieces, seg, |n| n == &a);
        assert_eq!(streamed.len(), 1);
        assert_eq!(streamed[0].name, b);
        assert_eq!(streamed[0].end, Lsn(2 * s + 20));
    }
}
