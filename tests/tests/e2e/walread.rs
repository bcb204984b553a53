//! The WAL reader against `pg_waldump` of the same major, on real WAL:
//! full-page images (compressed and not), records across pages and across
//! segments, one longer than a segment, commits, aborts, a restore point, a
//! `pg_switch_wal()` segment and the segment being written, cut where the
//! server had flushed it (what the stream stores).

use std::collections::BTreeMap;
use std::process::Command;

use pitr_agent::wal::records::{Completeness, Record, RecordKind};
use pitr_agent::wal::summary::{self, Link, PIECE_KEEP, SegmentSummary};
use pitr_agent::wal::{Lsn, WalFileName};
use pitr_tests::pg::{PgOptions, Postgres};

use super::pg_bin;

/// One record as pg_waldump prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dumped {
    lsn: Lsn,
    len: u32,
    /// `COMMIT`/`ABORT` time in microseconds, or a restore point's name.
    what: String,
}

/// Parses `rmgr: X len (rec/tot): a/ b, tx: n, lsn: L, prev: P, desc: D`.
fn parse_waldump(text: &str) -> Vec<Dumped> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("rmgr:")) {
        let field = |name: &str| -> &str {
            let at = line
                .find(name)
                .unwrap_or_else(|| panic!("{name} in {line}"))
                + name.len();
            let rest = line[at..].trim_start();
            rest.split(',').next().expect("a field").trim()
        };
        let len = field("len (rec/tot):")
            .split('/')
            .nth(1)
            .expect("rec/tot")
            .trim()
            .parse()
            .expect("a length");
        let lsn: Lsn = field("lsn:").parse().expect("an LSN");
        let rmgr = line[5..].split_whitespace().next().expect("rmgr");
        let desc = line.split_once("desc: ").map_or("", |(_, d)| d);
        let what = match rmgr {
            "Transaction" if desc.starts_with("COMMIT ") || desc.starts_with("ABORT ") => {
                let mut words = desc.split_whitespace();
                let kind = words.next().expect("kind");
                let date = words.next().expect("date");
                let time = words.next().expect("time").trim_end_matches(';');
                let t =
                    pitr_agent::restore::target::TargetTime::parse(&format!("{date} {time}+00"))
                        .expect("pg_waldump time");
                format!("{kind} {}", t.micros)
            }
            "XLOG" if desc.starts_with("RESTORE_POINT ") => {
                format!("RESTORE_POINT {}", &desc["RESTORE_POINT ".len()..])
            }
            _ => String::new(),
        };
        out.push(Dumped { lsn, len, what });
    }
    out
}

fn ours(r: &Record) -> Dumped {
    let what = match &r.kind {
        RecordKind::Commit { time } => format!("COMMIT {time}"),
        RecordKind::Abort { time } => format!("ABORT {time}"),
        RecordKind::RestorePoint { name, .. } => format!("RESTORE_POINT {name}"),
        _ => String::new(),
    };
    Dumped {
        lsn: r.lsn,
        len: r.len,
        what,
    }
}

#[test]
fn summaries_agree_with_pg_waldump() {
    let Some(bin) = pg_bin() else { return };
    let pg = Postgres::start_new(
        &bin,
        &PgOptions {
            conf: vec![
                "wal_keep_size = '1GB'".into(),
                "max_wal_size = '1GB'".into(),
                "wal_compression = off".into(),
            ],
            ..PgOptions::default()
        },
    );
    let first: String = pg.sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");
    pg.exec(
        "CREATE TABLE t (id int primary key, body text); \
         ALTER TABLE t ALTER body SET STORAGE EXTERNAL; \
         INSERT INTO t SELECT i, repeat(md5(i::text), 40) FROM generate_series(1, 4000) i",
    );
    // Full-page images after a checkpoint, uncompressed (with holes) then
    // compressed.
    pg.exec("CHECKPOINT");
    pg.exec("UPDATE t SET body = body || 'x' WHERE id % 7 = 0");
    pg.exec("ALTER SYSTEM SET wal_compression = on");
    pg.exec("SELECT pg_reload_conf()");
    pg.exec("CHECKPOINT");
    pg.exec("UPDATE t SET body = body || 'y' WHERE id % 5 = 0");
    // An abort, a restore point, messages of many sizes (one longer than a
    // segment), and plenty of commits between them.
    pg.exec("BEGIN; INSERT INTO t VALUES (-1, 'gone'); ROLLBACK");
    pg.exec("SELECT pg_create_restore_point('oracle before messages')");
    for (i, size) in [3_000, 40_000, 150_000, 20_000_000, 9_000, 70_000]
        .iter()
        .enumerate()
    {
        pg.exec(&format!(
            "SELECT pg_logical_emit_message(false, 'pitr', repeat('m', {size})); \
             INSERT INTO t VALUES ({}, 'after message')",
            10_000 + i
        ));
    }
    for i in 0..200 {
        pg.exec(&format!(
            "INSERT INTO t VALUES ({}, repeat('z', {}))",
            20_000 + i,
            100 + i * 37
        ));
    }
    let switched: String = pg.sql("SELECT pg_walfile_name(pg_switch_wal())");
    pg.exec("SELECT pg_create_restore_point('oracle last')");
    // A commit flushes what is before it.
    pg.exec("INSERT INTO t VALUES (-2, 'in the segment being written')");
    let flush: Lsn = pg
        .sql("SELECT pg_current_wal_flush_lsn()")
        .parse()
        .expect("lsn");
    let current: String = pg.sql("SELECT pg_walfile_name(pg_current_wal_flush_lsn())");

    // Copies of the segments, as the archive and the stream hold them.
    let seg = 16u32 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut names: Vec<String> = std::fs::read_dir(pg.wal_dir())
        .expect("pg_wal")
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.len() == 24 && n.as_str() >= first.as_str() && n.as_str() <= current.as_str())
        .collect();
    names.sort();
    assert!(names.len() >= 4, "a few segments of WAL: {names:?}");
    let mut summaries: BTreeMap<String, SegmentSummary> = BTreeMap::new();
    let mut records: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for name in &names {
        let bytes = std::fs::read(pg.wal_dir().join(name)).expect("segment");
        std::fs::write(dir.path().join(name), &bytes).expect("copy");
        let wal: WalFileName = name.parse().expect("name");
        let (data, completeness) = if *name == current {
            let upto = (flush.0 % u64::from(seg)) as usize;
            (&bytes[..upto], Completeness::Partial)
        } else {
            (&bytes[..], Completeness::Full)
        };
        let mut seen = Vec::new();
        pitr_agent::wal::records::read_segment(
            data,
            wal.segment_no(seg).expect("segment").start(seg),
            completeness,
            |r| seen.push(r.clone()),
        )
        .expect("reads");
        let s = summary::summarize(&wal, data, seg, completeness).expect("summarizes");
        assert_eq!(s.damage, None, "{name}: {:?}", s.damage);
        assert_eq!(s.records as usize, seen.len());
        records.insert(name.clone(), seen);
        summaries.insert(name.clone(), s);
    }
    assert!(
        summaries[&switched].switched,
        "{switched} ended by a switch"
    );

    // Ours, in order, with the records that segment boundaries split
    // joined from the two summaries.
    let mut mine: Vec<Dumped> = Vec::new();
    let mut unjoined = Vec::new();
    for (i, name) in names.iter().enumerate() {
        if i > 0 {
            let prev = &summaries[&names[i - 1]];
            match summary::link(prev, &summaries[name]) {
                Link::Chained(Some(r)) => mine.push(ours(&r)),
                Link::Chained(None) => {
                    if let Some(t) = &prev.tail {
                        unjoined.push(t.lsn.expect("a tail has its start"));
                    }
                }
                Link::Broken(d) => panic!("{} and {name} do not chain: {d:?}", names[i - 1]),
            }
        }
        mine.extend(records[name].iter().map(ours));
    }
    let tails = summaries.values().filter(|s| s.tail.is_some()).count();
    assert!(tails >= 2, "records were split by segment boundaries");

    let out = Command::new(bin.tool("pg_waldump"))
        .env("TZ", "UTC")
        .arg("-p")
        .arg(dir.path())
        .args([&names[0], &names[names.len() - 2]])
        .output()
        .expect("run pg_waldump");
    let mut theirs = parse_waldump(&String::from_utf8_lossy(&out.stdout));
    // And the segment being written, cut at the flush point: pg_waldump
    // reads it up to the first zeros.
    let out = Command::new(bin.tool("pg_waldump"))
        .env("TZ", "UTC")
        .arg("-p")
        .arg(dir.path())
        .arg(&current)
        .output()
        .expect("run pg_waldump");
    let last = parse_waldump(&String::from_utf8_lossy(&out.stdout));
    let after = theirs.last().map(|t| t.lsn);
    // Only what was flushed: the server may have written more since.
    theirs.extend(
        last.iter()
            .filter(|d| after.is_none_or(|a| d.lsn > a) && d.lsn.0 + u64::from(d.len) <= flush.0)
            .cloned(),
    );
    assert!(
        theirs.len() > 1000,
        "pg_waldump printed records: {}",
        theirs.len()
    );

    // Every record pg_waldump prints is ours, except split records longer
    // than the pieces a summary keeps (the 20 MB message and its like).
    let missing: Vec<&Dumped> = theirs.iter().filter(|d| !mine.contains(d)).collect();
    for d in &missing {
        assert!(
            d.len as usize > PIECE_KEEP && unjoined.contains(&d.lsn),
            "pg_waldump's {d:?} is not among ours"
        );
    }
    assert!(!missing.is_empty() && missing.len() <= 3, "{missing:?}");
    let extra: Vec<&Dumped> = mine.iter().filter(|d| !theirs.contains(d)).collect();
    assert!(
        extra.is_empty(),
        "records pg_waldump does not know: {extra:?}"
    );
    let what = |prefix: &str| theirs.iter().filter(|d| d.what.starts_with(prefix)).count();
    assert!(what("COMMIT") > 200 && what("ABORT") >= 1 && what("RESTORE_POINT") == 2);

    // The last segment's summary ends where pg_waldump's last record does.
    let end = summaries[&current].end;
    let last = theirs.last().expect("records");
    assert_eq!(
        end,
        Lsn(last.lsn.0 + u64::from(last.len)),
        "end of the partial segment"
    );
    assert_eq!(
        summaries[&current]
            .restore_points
            .last()
            .map(|r| r.name.as_str()),
        Some("oracle last")
    );
    let newest_commit = theirs
        .iter()
        .filter_map(|d| d.what.strip_prefix("COMMIT "))
        .next_back()
        .expect("a commit");
    assert_eq!(
        summaries[&current]
            .last_commit_time()
            .map(|t| t.to_string()),
        Some(newest_commit.to_owned())
    );
}

#[test]
fn a_flipped_byte_is_damage_and_a_cut_segment_is_not_complete() {
    let Some(bin) = pg_bin() else { return };
    let pg = Postgres::start_new(&bin, &PgOptions::default());
    pg.exec("CREATE TABLE t (i int, s text)");
    for i in 0..300 {
        pg.exec(&format!("INSERT INTO t VALUES ({i}, repeat('q', 200))"));
    }
    let name: String = pg.sql("SELECT pg_walfile_name(pg_switch_wal())");
    let mut bytes = std::fs::read(pg.wal_dir().join(&name)).expect("segment");
    let seg = 16u32 << 20;
    let wal: WalFileName = name.parse().expect("name");
    let clean = summary::summarize(&wal, &bytes, seg, Completeness::Full).expect("reads");
    assert_eq!(clean.damage, None);
    assert!(clean.switched && clean.commits >= 300);
    // Damage inside a record in the middle of the written part.
    let mut starts = Vec::new();
    pitr_agent::wal::records::read_segment(
        &bytes,
        wal.segment_no(seg).expect("segment").start(seg),
        Completeness::Full,
        |r| {
            starts.push(r.lsn.0 % u64::from(seg));
        },
    )
    .expect("reads");
    let mid = starts
        .iter()
        .skip(starts.len() / 2)
        .map(|s| (*s + 26) as usize)
        .find(|at| at % 8192 > 64 && at % 8192 < 8000)
        .expect("a record inside a page");
    bytes[mid] ^= 0x5A;
    let damaged = summary::summarize(&wal, &bytes, seg, Completeness::Full).expect("reads");
    let d = damaged.damage.expect("damage found");
    assert!(d.lsn.0 % u64::from(seg) <= mid as u64, "{d:?}");
    assert!(damaged.commits < clean.commits);
    assert!(!damaged.switched);

    // A segment cut short (what a stream stores of the segment being
    // written) is not complete, and its cut is not damage.
    let cut =
        summary::summarize(&wal, &bytes[..mid - 100], seg, Completeness::Full).expect("reads");
    assert!(!cut.complete && cut.damage.is_none() && cut.end.0 % u64::from(seg) < mid as u64 - 100);
}
