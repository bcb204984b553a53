//! Reading the records of one WAL segment: where each starts and ends,
//! whether its CRC-32C and `xl_prev` link hold, and what the few records a
//! restore cares about say (commit and abort times, restore points, a WAL
//! switch).
//!
//! The page and record layout is the same in PostgreSQL 14 to 18
//! (`access/xlog_internal.h`, `access/xlogrecord.h`); only the flags of a
//! compressed full-page image moved in 15, which matters for walking block
//! headers, never for the records summarized here. Knows nothing about
//! storage or compression: it reads bytes already in memory and copies at
//! most one record at a time.

use super::Lsn;

/// `SizeOfXLogRecord`: `xl_tot_len` u32, `xl_xid` u32, `xl_prev` u64,
/// `xl_info` u8, `xl_rmid` u8, two pad bytes, `xl_crc` u32.
pub const RECORD_HEADER_LEN: usize = 24;
/// `offsetof(XLogRecord, xl_crc)`: the header bytes the CRC covers.
const CRC_OFFSET: usize = 20;
const SHORT_PAGE_HEADER: usize = 24;
const LONG_PAGE_HEADER: usize = 40;

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const XLP_LONG_HEADER: u16 = 0x0002;
const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;

const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;

const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// `XLOG_PAGE_MAGIC` of PostgreSQL 14; later majors have larger values.
const PG14_PAGE_MAGIC: u16 = 0xD10D;

/// `MAXNAMELEN` of a restore point's name (`xl_restore_point.rp_name`).
const RESTORE_POINT_NAME_LEN: usize = 64;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Aligns a position as `MAXALIGN` does on every 64-bit platform.
fn maxalign(x: u64) -> u64 {
    (x + 7) & !7
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

/// What a record means to a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKind {
    /// A transaction committed (also `COMMIT PREPARED`); `time` is
    /// `xact_time` in microseconds since the Unix epoch.
    Commit {
        /// When it committed.
        time: i64,
    },
    /// A transaction aborted (also `ROLLBACK PREPARED`).
    Abort {
        /// When it aborted.
        time: i64,
    },
    /// `pg_create_restore_point(name)`.
    RestorePoint {
        /// Its name.
        name: String,
        /// When it was made.
        time: i64,
    },
    /// `pg_switch_wal()`: the rest of the segment is padding.
    Switch,
    /// Anything else.
    Other,
}

/// One record read from WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Where it starts.
    pub lsn: Lsn,
    /// `xl_tot_len`.
    pub len: u32,
    /// `xl_xid`.
    pub xid: u32,
    /// `xl_prev`.
    pub prev: Lsn,
    /// `xl_rmid`.
    pub rmid: u8,
    /// `xl_info`.
    pub info: u8,
    /// What it means.
    pub kind: RecordKind,
}

impl Record {
    /// Where it ends (the position after its last byte).
    #[must_use]
    pub fn end(&self) -> Lsn {
        Lsn(self.lsn.0 + u64::from(self.len))
    }
}

/// Why a record was not accepted: the text says what.
pub type Invalid = String;

/// Decodes `bytes`, one whole record (header included), that starts at `lsn`.
///
/// # Errors
/// [`Invalid`] when the length or CRC-32C does not hold.
pub fn decode(bytes: &[u8], lsn: Lsn, page_magic: u16) -> Result<Record, Invalid> {
    if bytes.len() < RECORD_HEADER_LEN {
        return Err(format!("record at {lsn} is shorter than a record header"));
    }
    let len = u32_at(bytes, 0);
    if len as usize != bytes.len() {
        return Err(format!(
            "record at {lsn} claims {len} bytes, {} read",
            bytes.len()
        ));
    }
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&bytes[RECORD_HEADER_LEN..]),
        &bytes[..CRC_OFFSET],
    );
    let stored = u32_at(bytes, CRC_OFFSET);
    if crc != stored {
        return Err(format!(
            "record at {lsn} fails its CRC-32C (stored {stored:08X}, computed {crc:08X})"
        ));
    }
    let (rmid, info) = (bytes[17], bytes[16]);
    let kind =
        main_data(bytes, page_magic).map_or(RecordKind::Other, |main| kind_of(rmid, info, main));
    Ok(Record {
        lsn,
        len,
        xid: u32_at(bytes, 4),
        prev: Lsn(u64_at(bytes, 8)),
        rmid,
        info,
        kind,
    })
}

fn kind_of(rmid: u8, info: u8, main: &[u8]) -> RecordKind {
    let time_at_start = || {
        main.get(..8).map(|b| {
            i64::from_le_bytes(b.try_into().expect("eight bytes")) + PG_EPOCH_OFFSET_MICROS
        })
    };
    match (rmid, info & 0xF0) {
        (RM_XLOG_ID, XLOG_SWITCH) => RecordKind::Switch,
        (RM_XLOG_ID, XLOG_RESTORE_POINT) => match (time_at_start(), main.get(8..)) {
            (Some(time), Some(name)) => {
                let name = &name[..name.len().min(RESTORE_POINT_NAME_LEN)];
                let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
                RecordKind::RestorePoint {
                    name: String::from_utf8_lossy(&name[..end]).into_owned(),
                    time,
                }
            }
            _ => RecordKind::Other,
        },
        (RM_XACT_ID, _) => match (info & XLOG_XACT_OPMASK, time_at_start()) {
            (XLOG_XACT_COMMIT | XLOG_XACT_COMMIT_PREPARED, Some(time)) => {
                RecordKind::Commit { time }
            }
            (XLOG_XACT_ABORT | XLOG_XACT_ABORT_PREPARED, Some(time)) => RecordKind::Abort { time },
            _ => RecordKind::Other,
        },
        _ => RecordKind::Other,
    }
}

/// The record's main data: the last bytes of the record, after every block
/// header and block's data (`DecodeXLogRecord` in `xlogreader.c`). `None`
/// when the headers do not parse.
fn main_data(rec: &[u8], page_magic: u16) -> Option<&[u8]> {
    let compressed = |bimg_info: u8| {
        if page_magic <= PG14_PAGE_MAGIC {
            bimg_info & 0x02 != 0
        } else {
            bimg_info & (0x04 | 0x08 | 0x10) != 0
        }
    };
    let mut pos = RECORD_HEADER_LEN;
    let mut data_total = 0usize;
    let take = |pos: &mut usize, n: usize| -> Option<usize> {
        let at = *pos;
        (at + n <= rec.len()).then(|| {
            *pos += n;
            at
        })
    };
    while rec.len() - pos > data_total {
        let id = rec[take(&mut pos, 1)?];
        match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                let n = usize::from(rec[take(&mut pos, 1)?]);
                return rec.len().checked_sub(n).map(|at| &rec[at..]);
            }
            XLR_BLOCK_ID_DATA_LONG => {
                let n = u32_at(rec, take(&mut pos, 4)?) as usize;
                return rec.len().checked_sub(n).map(|at| &rec[at..]);
            }
            XLR_BLOCK_ID_ORIGIN => {
                take(&mut pos, 2)?;
            }
            XLR_BLOCK_ID_TOPLEVEL_XID => {
                take(&mut pos, 4)?;
            }
            id if id <= XLR_MAX_BLOCK_ID => {
                let at = take(&mut pos, 3)?;
                let fork_flags = rec[at];
                data_total += usize::from(u16_at(rec, at + 1));
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let at = take(&mut pos, 5)?;
                    data_total += usize::from(u16_at(rec, at));
                    let bimg_info = rec[at + 4];
                    if bimg_info & BKPIMAGE_HAS_HOLE != 0 && compressed(bimg_info) {
                        take(&mut pos, 2)?;
                    }
                }
                if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    take(&mut pos, 12)?;
                }
                take(&mut pos, 4)?;
            }
            _ => return None,
        }
    }
    // No main data.
    Some(&[])
}

/// What the bytes given to [`read_segment`] are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    /// A whole archived segment: records fill it to its end, or to a WAL
    /// switch. Anything unreadable before that is damage.
    Full,
    /// The start of a segment whose valid WAL may end anywhere: a streamed
    /// segment, or a `.partial` file left by a promotion.
    Partial,
}

/// Something wrong found in a segment, where records should be readable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Where the unreadable record or page starts.
    pub lsn: Lsn,
    /// What is wrong.
    pub reason: String,
}

/// The start of a record that goes on in the next segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    /// Where the record starts.
    pub lsn: Lsn,
    /// Its bytes in this segment (page headers left out).
    pub bytes: Vec<u8>,
}

/// The end of a record begun in an earlier segment, at the start of this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// `xlp_rem_len` of the first page: the record's bytes still to come.
    pub remaining: u32,
    /// The bytes in this segment (page headers left out).
    pub bytes: Vec<u8>,
}

/// What reading one segment found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRead {
    /// `XLOG_PAGE_MAGIC` of the first page (tells the PostgreSQL major).
    pub page_magic: u16,
    /// The end of the record begun in the previous segment.
    pub head: Option<Head>,
    /// The last record that starts here and is complete here, if any.
    pub last: Option<Record>,
    /// `xl_prev` of the first record that starts here.
    pub first_prev: Option<Lsn>,
    /// Where the first record that starts here starts.
    pub first: Option<Lsn>,
    /// Where the readable WAL ends: after the last complete record, or at
    /// the end of the head when no record starts here, or the segment's
    /// end after a switch.
    pub end: Lsn,
    /// A record that starts here and goes on in the next segment.
    pub tail: Option<Tail>,
    /// Whether a WAL switch ended the records.
    pub switched: bool,
    /// What stopped the reading early, in a [`Completeness::Full`] segment.
    pub damage: Option<Damage>,
}

/// Why a segment could not be read at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The first page is not a WAL segment's first page.
    #[error("not a WAL segment: {0}")]
    NotWal(String),
}

/// Page geometry taken from the segment's long page header.
struct Pages<'a> {
    data: &'a [u8],
    start: Lsn,
    block: u64,
    magic: u16,
}

impl Pages<'_> {
    /// The header length of the page at `offset`, after checking it.
    fn check_page(&self, offset: u64) -> Result<(usize, u16, u32), String> {
        let at = offset as usize;
        let len = if offset == 0 {
            LONG_PAGE_HEADER
        } else {
            SHORT_PAGE_HEADER
        };
        let Some(h) = self.data.get(at..at + len) else {
            return Err("the page header is cut off".to_owned());
        };
        let magic = u16_at(h, 0);
        let info = u16_at(h, 2);
        let addr = u64_at(h, 8);
        let expected = self.start.0 + offset;
        if magic != self.magic {
            return Err(format!(
                "page at {} has magic {magic:04X}, not {:04X}",
                Lsn(expected),
                self.magic
            ));
        }
        if addr != expected {
            return Err(format!(
                "page at {} says it is page {}",
                Lsn(expected),
                Lsn(addr)
            ));
        }
        Ok((len, info, u32_at(h, 16)))
    }

    /// Copies `n` bytes of record data starting at `pos` (a position past
    /// any page header), crossing page headers. Returns the bytes and the
    /// position after them; fewer bytes when the data ends first.
    fn copy(&self, mut pos: u64, n: usize, out: &mut Vec<u8>) -> Result<u64, String> {
        let mut left = n;
        while left > 0 {
            if pos.is_multiple_of(self.block) {
                if pos as usize >= self.data.len() {
                    break;
                }
                let (len, info, rem) = self.check_page(pos)?;
                if info & XLP_FIRST_IS_CONTRECORD == 0 {
                    return Err(format!(
                        "page at {} does not continue the record that runs into it",
                        Lsn(self.start.0 + pos)
                    ));
                }
                if rem as usize != left {
                    return Err(format!(
                        "page at {} continues {rem} bytes of a record that has {left} to go",
                        Lsn(self.start.0 + pos)
                    ));
                }
                pos += len as u64;
            }
            let page_end = (pos / self.block + 1) * self.block;
            let avail = (page_end.min(self.data.len() as u64)).saturating_sub(pos) as usize;
            if avail == 0 {
                break;
            }
            let k = avail.min(left);
            out.extend_from_slice(&self.data[pos as usize..pos as usize + k]);
            pos += k as u64;
            left -= k;
        }
        Ok(pos)
    }
}

/// Reads the records of the segment that starts at `start`, whose bytes
/// from its first byte on are `data`, calling `visit` for each complete
/// record that starts in it, in order.
///
/// # Errors
/// [`ReadError`] when the first page is not a WAL segment's.
pub fn read_segment(
    data: &[u8],
    start: Lsn,
    completeness: Completeness,
    mut visit: impl FnMut(&Record),
) -> Result<SegmentRead, ReadError> {
    let first = data
        .get(..LONG_PAGE_HEADER)
        .ok_or_else(|| ReadError::NotWal("shorter than a page header".to_owned()))?;
    let magic = u16_at(first, 0);
    let info = u16_at(first, 2);
    if info & XLP_LONG_HEADER == 0 || magic & 0xFF00 != 0xD100 {
        return Err(ReadError::NotWal(format!(
            "the first page has magic {magic:04X} and flags {info:04X}"
        )));
    }
    let block = u64::from(u32_at(first, 36));
    let seg_size = u64::from(u32_at(first, 32));
    if !block.is_power_of_two() || !(1024..=65536).contains(&block) || block > seg_size {
        return Err(ReadError::NotWal(format!("block size {block}")));
    }
    if u64_at(first, 8) != start.0 {
        return Err(ReadError::NotWal(format!(
            "the first page says it is page {}, not {start}",
            Lsn(u64_at(first, 8))
        )));
    }
    let data = &data[..data.len().min(seg_size as usize)];
    let pages = Pages {
        data,
        start,
        block,
        magic,
    };
    let mut out = SegmentRead {
        page_magic: magic,
        head: None,
        last: None,
        first_prev: None,
        first: None,
        end: start,
        tail: None,
        switched: false,
        damage: None,
    };
    let full = completeness == Completeness::Full && data.len() as u64 == seg_size;
    let at = |pos: u64| Lsn(start.0 + pos);
    let mut pos = LONG_PAGE_HEADER as u64;
    let rem = u32_at(first, 16);
    if info & XLP_FIRST_IS_CONTRECORD != 0 && info & XLP_FIRST_IS_OVERWRITE_CONTRECORD == 0 {
        // The end of a record begun in the previous segment: carried whole
        // so that it can be joined with that segment's tail.
        let mut bytes = Vec::new();
        let mut p = pos;
        let mut left = rem as usize;
        while left > 0 && (p as usize) < data.len() {
            if p.is_multiple_of(block) {
                match pages.check_page(p) {
                    Ok((len, _, _)) => p += len as u64,
                    Err(reason) => {
                        out.damage = full.then(|| Damage { lsn: at(p), reason });
                        out.head = Some(Head {
                            remaining: rem,
                            bytes,
                        });
                        return Ok(out);
                    }
                }
            }
            let page_end = ((p / block + 1) * block).min(data.len() as u64);
            let k = ((page_end - p) as usize).min(left);
            bytes.extend_from_slice(&data[p as usize..p as usize + k]);
            p += k as u64;
            left -= k;
        }
        pos = p;
        out.end = at(pos);
        out.head = Some(Head {
            remaining: rem,
            bytes,
        });
        if left > 0 {
            // The record goes on past this segment.
            return Ok(out);
        }
    }
    let mut prev: Option<Lsn> = None;
    let mut record = Vec::new();
    loop {
        pos = maxalign(pos);
        if pos as usize >= data.len() {
            break;
        }
        if pos.is_multiple_of(block) {
            match pages.check_page(pos) {
                Ok((len, info, _)) => {
                    if info & XLP_FIRST_IS_CONTRECORD != 0 {
                        out.damage = full.then(|| Damage {
                            lsn: at(pos),
                            reason: format!(
                                "page at {} continues a record, but the record before it ended",
                                at(pos)
                            ),
                        });
                        break;
                    }
                    pos += len as u64;
                }
                Err(reason) => {
                    out.damage = full.then(|| Damage {
                        lsn: at(pos),
                        reason,
                    });
                    break;
                }
            }
        }
        let lsn = at(pos);
        let tot = u32_at(data, pos as usize) as usize;
        if tot == 0 || tot < RECORD_HEADER_LEN {
            out.damage = full.then(|| Damage {
                lsn,
                reason: if tot == 0 {
                    format!("no record at {lsn}, before the segment ends (zero length)")
                } else {
                    format!("record at {lsn} has an impossible length {tot}")
                },
            });
            break;
        }
        record.clear();
        let after = match pages.copy(pos, tot, &mut record) {
            Ok(after) => after,
            Err(reason) => {
                out.damage = full.then_some(Damage { lsn, reason });
                break;
            }
        };
        if record.len() < tot {
            // Runs past what is here: into the next segment when the data
            // reaches the segment's end, else where a partial segment ends.
            if data.len() as u64 == seg_size && after as usize == data.len() {
                if let Some(p) = prev {
                    let xl_prev = (record.len() >= 16).then(|| Lsn(u64_at(&record, 8)));
                    if xl_prev.is_some_and(|x| x != p) {
                        out.damage = full.then(|| Damage {
                            lsn,
                            reason: format!(
                                "record at {lsn} links back to {}, not to the record before it at {p}",
                                xl_prev.unwrap_or_default()
                            ),
                        });
                        break;
                    }
                }
                if out.first.is_none() {
                    out.first = Some(lsn);
                    out.first_prev = (record.len() >= 16).then(|| Lsn(u64_at(&record, 8)));
                }
                out.tail = Some(Tail {
                    lsn,
                    bytes: std::mem::take(&mut record),
                });
            }
            break;
        }
        let rec = match decode(&record, lsn, magic) {
            Ok(rec) => rec,
            Err(reason) => {
                out.damage = full.then_some(Damage { lsn, reason });
                break;
            }
        };
        if let Some(p) = prev
            && rec.prev != p
        {
            out.damage = full.then(|| Damage {
                lsn,
                reason: format!(
                    "record at {lsn} links back to {}, not to the record before it at {p}",
                    rec.prev
                ),
            });
            break;
        }
        if out.first.is_none() {
            out.first = Some(lsn);
            out.first_prev = Some(rec.prev);
        }
        visit(&rec);
        prev = Some(lsn);
        pos = after;
        out.end = rec.end();
        let switched = rec.kind == RecordKind::Switch;
        out.last = Some(rec);
        if switched {
            out.switched = true;
            out.end = Lsn(start.0 + seg_size);
            break;
        }
    }
    Ok(out)
}

/// Joins a segment's [`Tail`] with the next segment's [`Head`] into the
/// record they split, and decodes it.
///
/// # Errors
/// [`Invalid`] when the two do not make one valid record.
pub fn join(tail: &Tail, head: &Head, page_magic: u16) -> Result<Record, Invalid> {
    let mut bytes = Vec::with_capacity(tail.bytes.len() + head.bytes.len());
    bytes.extend_from_slice(&tail.bytes);
    bytes.extend_from_slice(&head.bytes);
    let tot = tail.bytes.get(..4).map(|b| u32_at(b, 0) as usize);
    if tot != Some(tail.bytes.len() + head.remaining as usize) {
        return Err(format!(
            "record at {} does not continue as the next segment says ({} bytes before the \
             boundary, {} after, {} claimed)",
            tail.lsn,
            tail.bytes.len(),
            head.remaining,
            tot.unwrap_or(0)
        ));
    }
    decode(&bytes, tail.lsn, page_magic)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: usize = 8192;
    const SEG: usize = 1 << 20;
    const MAGIC: u16 = 0xD110;

    /// Builds WAL pages the way PostgreSQL lays them out, for unit tests;
    /// the end-to-end tests compare with pg_waldump on real WAL.
    struct Writer {
        data: Vec<u8>,
        start: u64,
        prev: u64,
        /// Where the record written last starts.
        last_start: u64,
    }

    impl Writer {
        fn new(start: u64, cont: usize) -> Self {
            let mut w = Writer {
                data: vec![0; SEG],
                start,
                prev: 0,
                last_start: 0,
            };
            w.page_header(0, cont);
            w
        }

        fn page_header(&mut self, page: usize, rem: usize) {
            let at = page * BLOCK;
            let mut info = if page == 0 { XLP_LONG_HEADER } else { 0 };
            if rem > 0 {
                info |= XLP_FIRST_IS_CONTRECORD;
            }
            self.data[at..at + 2].copy_from_slice(&MAGIC.to_le_bytes());
            self.data[at + 2..at + 4].copy_from_slice(&info.to_le_bytes());
            self.data[at + 4..at + 8].copy_from_slice(&1u32.to_le_bytes());
            self.data[at + 8..at + 16].copy_from_slice(&(self.start + at as u64).to_le_bytes());
            self.data[at + 16..at + 20].copy_from_slice(&(rem as u32).to_le_bytes());
            if page == 0 {
                self.data[at + 32..at + 36].copy_from_slice(&(SEG as u32).to_le_bytes());
                self.data[at + 36..at + 40].copy_from_slice(&(BLOCK as u32).to_le_bytes());
            }
        }

        fn record(rmid: u8, info: u8, prev: u64, main: &[u8]) -> Vec<u8> {
            let mut r = vec![0u8; RECORD_HEADER_LEN];
            if main.len() < 256 {
                r.extend_from_slice(&[XLR_BLOCK_ID_DATA_SHORT, main.len() as u8]);
            } else {
                r.push(XLR_BLOCK_ID_DATA_LONG);
                r.extend_from_slice(&(main.len() as u32).to_le_bytes());
            }
            r.extend_from_slice(main);
            let len = r.len() as u32;
            r[0..4].copy_from_slice(&len.to_le_bytes());
            r[4..8].copy_from_slice(&7u32.to_le_bytes());
            r[8..16].copy_from_slice(&prev.to_le_bytes());
            r[16] = info;
            r[17] = rmid;
            let crc = crc32c::crc32c_append(crc32c::crc32c(&r[RECORD_HEADER_LEN..]), &r[..20]);
            r[20..24].copy_from_slice(&crc.to_le_bytes());
            r
        }

        /// Writes `rec` at `pos`, across page headers, up to the segment's
        /// end; returns the end and what did not fit.
        fn put_upto(&mut self, mut pos: usize, rec: &[u8]) -> (usize, Vec<u8>) {
            let mut rest = rec;
            let mut first = true;
            while !rest.is_empty() && pos < SEG {
                if pos.is_multiple_of(BLOCK) {
                    self.page_header(pos / BLOCK, if first { 0 } else { rest.len() });
                    pos += if pos == 0 {
                        LONG_PAGE_HEADER
                    } else {
                        SHORT_PAGE_HEADER
                    };
                }
                if first {
                    self.last_start = self.start + pos as u64;
                }
                first = false;
                let k = (BLOCK - pos % BLOCK).min(rest.len());
                self.data[pos..pos + k].copy_from_slice(&rest[..k]);
                pos += k;
                rest = &rest[k..];
            }
            (pos, rest.to_vec())
        }

        fn put(&mut self, pos: usize, rec: &[u8]) -> usize {
            let (end, rest) = self.put_upto(pos, rec);
            assert!(rest.is_empty(), "the record fits");
            end
        }

        /// Writes the end of a record begun in the previous segment.
        fn put_head(&mut self, rest: &[u8]) -> usize {
            let mut pos = 0usize;
            let mut rest = rest;
            while !rest.is_empty() {
                if pos.is_multiple_of(BLOCK) {
                    self.page_header(pos / BLOCK, rest.len());
                    pos += if pos == 0 {
                        LONG_PAGE_HEADER
                    } else {
                        SHORT_PAGE_HEADER
                    };
                }
                let k = (BLOCK - pos % BLOCK).min(rest.len());
                self.data[pos..pos + k].copy_from_slice(&rest[..k]);
                pos += k;
                rest = &rest[k..];
            }
            pos
        }
    }

    fn commit(time_pg: i64) -> Vec<u8> {
        time_pg.to_le_bytes().to_vec()
    }

    #[test]
    fn reads_commits_restore_points_and_a_record_across_pages() {
        let mut w = Writer::new(16 * SEG as u64, 0);
        let mut pos = LONG_PAGE_HEADER;
        let mut lsns = Vec::new();
        for i in 0..3 {
            let rec = Writer::record(RM_XACT_ID, XLOG_XACT_COMMIT, w.prev, &commit(1000 + i));
            pos = maxalign(w.put(pos, &rec) as u64) as usize;
            w.prev = w.last_start;
            lsns.push(w.prev);
        }
        let mut rp = 5000i64.to_le_bytes().to_vec();
        let mut name = [0u8; 64];
        name[..6].copy_from_slice(b"before");
        rp.extend_from_slice(&name);
        let rec = Writer::record(RM_XLOG_ID, XLOG_RESTORE_POINT, w.prev, &rp);
        pos = maxalign(w.put(pos, &rec) as u64) as usize;
        w.prev = w.last_start;
        // A big record across two page boundaries.
        let big = Writer::record(9, 0, w.prev, &vec![0xAB; 20_000]);
        pos = maxalign(w.put(pos, &big) as u64) as usize;
        w.prev = w.last_start;
        let rec = Writer::record(RM_XACT_ID, XLOG_XACT_ABORT, w.prev, &commit(6000));
        let end = w.put(pos, &rec);
        let mut seen = Vec::new();
        let read = read_segment(&w.data[..end], Lsn(w.start), Completeness::Partial, |r| {
            seen.push(r.clone())
        })
        .expect("reads");
        assert_eq!(seen.len(), 6);
        assert_eq!(
            seen[0].kind,
            RecordKind::Commit {
                time: 1000 + PG_EPOCH_OFFSET_MICROS
            }
        );
        assert_eq!(
            seen[3].kind,
            RecordKind::RestorePoint {
                name: "before".into(),
                time: 5000 + PG_EPOCH_OFFSET_MICROS
            }
        );
        assert_eq!(seen[4].len as usize, big.len());
        assert_eq!(
            seen[5].kind,
            RecordKind::Abort {
                time: 6000 + PG_EPOCH_OFFSET_MICROS
            }
        );
        assert_eq!(read.end, Lsn(w.start + end as u64));
        assert_eq!(read.damage, None);
        assert_eq!(read.first, Some(Lsn(lsns[0])));

        // The same bytes as a full segment: the zeros after the last
        // record are damage there.
        let read = read_segment(&w.data, Lsn(w.start), Completeness::Full, |_| {}).expect("reads");
        let damage = read.damage.expect("zeros before the end are damage");
        assert_eq!(damage.lsn, Lsn(w.start + maxalign(end as u64)));
    }

    #[test]
    fn a_flipped_byte_is_damage_at_its_record() {
        let mut w = Writer::new(0x0100_0000, 0);
        let mut pos = LONG_PAGE_HEADER;
        let mut starts = Vec::new();
        while pos < SEG - 200 {
            let rec = Writer::record(RM_XACT_ID, XLOG_XACT_COMMIT, w.prev, &commit(pos as i64));
            pos = maxalign(w.put(pos, &rec) as u64) as usize;
            w.prev = w.last_start;
            starts.push((w.last_start - w.start) as usize);
        }
        let read = read_segment(&w.data, Lsn(w.start), Completeness::Partial, |_| {}).expect("ok");
        assert_eq!(read.damage, None);
        let victim = starts[starts.len() / 2];
        w.data[victim + 26] ^= 0xFF;
        let read = read_segment(&w.data, Lsn(w.start), Completeness::Full, |_| {}).expect("ok");
        let damage = read.damage.expect("damaged");
        assert_eq!(damage.lsn, Lsn(w.start + victim as u64));
        assert!(damage.reason.contains("CRC"), "{}", damage.reason);
        assert_eq!(
            read.last.expect("records before").lsn,
            Lsn(w.start + starts[starts.len() / 2 - 1] as u64)
        );
    }

    #[test]
    fn a_record_split_between_segments_joins() {
        // The segment ends inside a 30,000-byte record.
        let mut w = Writer::new(0, 0);
        let mut pos = LONG_PAGE_HEADER;
        let filler = Writer::record(9, 0, 0, &vec![1; 1000]);
        while pos + 2000 < SEG {
            let mut rec = filler.clone();
            rec[8..16].copy_from_slice(&w.prev.to_le_bytes());
            let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[RECORD_HEADER_LEN..]), &rec[..20]);
            rec[20..24].copy_from_slice(&crc.to_le_bytes());
            pos = maxalign(w.put(pos, &rec) as u64) as usize;
            w.prev = w.last_start;
        }
        let big = Writer::record(RM_XACT_ID, XLOG_XACT_COMMIT, w.prev, &{
            let mut m = 77i64.to_le_bytes().to_vec();
            m.extend_from_slice(&vec![3; 30_000]);
            m
        });
        let (_, rest) = w.put_upto(pos, &big);
        let big_lsn = w.last_start;
        assert!(!rest.is_empty(), "the record runs past the segment");
        let mut next = Writer::new(SEG as u64, 0);
        let remaining = rest.len();
        let npos = next.put_head(&rest);
        let after = Writer::record(RM_XACT_ID, XLOG_XACT_COMMIT, big_lsn, &commit(99));
        let nend = next.put(maxalign(npos as u64) as usize, &after);

        let a = read_segment(&w.data, Lsn(0), Completeness::Full, |_| {}).expect("ok");
        assert_eq!(a.damage, None);
        let tail = a.tail.expect("a tail");
        assert_eq!(tail.lsn, Lsn(big_lsn));
        let mut seen = Vec::new();
        let b = read_segment(
            &next.data[..nend],
            Lsn(SEG as u64),
            Completeness::Partial,
            |r| seen.push(r.clone()),
        )
        .expect("ok");
        let head = b.head.expect("a head");
        assert_eq!(head.remaining as usize, remaining);
        assert_eq!(b.first_prev, Some(Lsn(big_lsn)));
        let joined = join(&tail, &head, MAGIC).expect("joins");
        assert_eq!(
            joined.kind,
            RecordKind::Commit {
                time: 77 + PG_EPOCH_OFFSET_MICROS
            }
        );
        assert_eq!(seen.len(), 1);
        // A damaged head does not join.
        let mut bad = head.clone();
        bad.bytes[100] ^= 1;
        assert!(join(&tail, &bad, MAGIC).is_err());
    }

    #[test]
    fn refuses_what_is_not_wal() {
        assert!(read_segment(&[0u8; 100], Lsn(0), Completeness::Full, |_| {}).is_err());
        assert!(read_segment(&[], Lsn(0), Completeness::Full, |_| {}).is_err());
        let w = Writer::new(0, 0);
        assert!(read_segment(&w.data, Lsn(SEG as u64), Completeness::Full, |_| {}).is_err());
    }
}
