//! PostgreSQL WAL vocabulary: LSNs, timelines, WAL file names and `.history` files.
//!
//! Owns the rules for what a WAL file name means and which names follow which.
//! Knows nothing about repositories or how files are stored.

mod continuity;
mod history;
mod name;
pub mod records;
pub mod summary;

pub use continuity::{Stretch, WalIndex};
pub use history::{HistoryEntry, TimelineHistory};
pub use name::{SegmentNo, WalFileKind, WalFileName, WalNameError};

use std::fmt;
use std::str::FromStr;

/// The default WAL segment size; `initdb --wal-segsize` can change it.
pub const DEFAULT_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;

/// A WAL position (`XLogRecPtr`), written by PostgreSQL as `X/X` in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The segment that holds this position.
    #[must_use]
    pub fn segment(self, segment_size: u32) -> SegmentNo {
        SegmentNo(self.0 / u64::from(segment_size))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

serde_as_text!(Lsn);

/// Why a string is not an LSN.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {0:?}: expected two hex numbers separated by '/', such as 0/16B3748")]
pub struct LsnParseError(pub String);

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_owned());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// A timeline id: 1 after initdb, incremented by every promotion.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Reads the segment size from the long page header that starts every WAL segment.
///
/// `XLogLongPageHeaderData` keeps `xlp_sysid` at byte 24 and `xlp_seg_size` at
/// byte 32 in every supported PostgreSQL version
/// (<https://github.com/postgres/postgres/blob/master/src/include/access/xlog_internal.h>).
#[must_use]
pub fn segment_header(bytes: &[u8]) -> Option<SegmentHeader> {
    const XLP_LONG_HEADER: u16 = 0x0002;
    let header = bytes.get(..40)?;
    let info = u16::from_le_bytes([header[2], header[3]]);
    if info & XLP_LONG_HEADER == 0 {
        return None;
    }
    let system_identifier = u64::from_le_bytes(header[24..32].try_into().ok()?);
    let segment_size = u32::from_le_bytes(header[32..36].try_into().ok()?);
    (segment_size.is_power_of_two() && segment_size >= 1 << 20).then_some(SegmentHeader {
        system_identifier,
        segment_size,
    })
}

/// What the first page of a WAL segment says about its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// The cluster's WAL segment size.
    pub segment_size: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_and_orders() {
        for s in ["0/0", "0/16B3748", "A/F3000028", "FFFFFFFF/FFFFFFFF"] {
            let lsn: Lsn = s.parse().expect("valid lsn");
            assert_eq!(lsn.to_string(), s);
        }
        assert!(Lsn(1) < "1/0".parse().expect("valid lsn"));
        assert_eq!("1/0".parse::<Lsn>(), Ok(Lsn(1 << 32)));
    }

    #[test]
    fn lsn_rejects_garbage() {
        for s in ["", "0", "/1", "1/", "g/1", "1/2/3", "123456789/0"] {
            assert!(s.parse::<Lsn>().is_err(), "{s:?} parsed");
        }
    }

    #[test]
    fn lsn_segment_uses_segment_size() {
        let lsn: Lsn = "A/F3000028".parse().expect("valid lsn");
        assert_eq!(
            lsn.segment(DEFAULT_SEGMENT_SIZE),
            SegmentNo(0xA * 256 + 0xF3)
        );
        assert_eq!(lsn.segment(64 << 20), SegmentNo(0xA * 64 + 0xF3 / 4));
    }

    #[test]
    fn reads_long_page_header() {
        let mut page = vec![0u8; 64];
        page[2] = 0x02;
        page[24..32].copy_from_slice(&7_312_345_678_901_234_567u64.to_le_bytes());
        page[32..36].copy_from_slice(&DEFAULT_SEGMENT_SIZE.to_le_bytes());
        let header = segment_header(&page).expect("long header");
        assert_eq!(header.system_identifier, 7_312_345_678_901_234_567);
        assert_eq!(header.segment_size, DEFAULT_SEGMENT_SIZE);
        page[2] = 0;
        assert_eq!(segment_header(&page), None);
        assert_eq!(segment_header(&page[..10]), None);
    }

    proptest::proptest! {
        #[test]
        fn lsns_round_trip(x in proptest::prelude::any::<u64>()) {
            let text = Lsn(x).to_string();
            proptest::prop_assert_eq!(text.parse::<Lsn>().expect("parses"), Lsn(x));
        }
    }
}
