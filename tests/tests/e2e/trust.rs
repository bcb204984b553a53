//! What a restore reports can be trusted: the window ends at the newest
//! commit, a time after it restores everything archived, and damaged WAL
//! in the middle of the archive is found by `verify`, refused by the plan,
//! and never reported as a reached target, by `pgrestore` or `rehearse`.

use std::io::Write as _;
use std::process::Output;

use pitr_agent::wal::records::{self, Completeness};
use pitr_agent::wal::{Lsn, WalFileName};
use pitr_tests::pg::PgBin;
use pitr_tests::s3::S3Kind;
use serde_json::Value;

use super::restore::{Restored, ok};
use super::{Setup, pg_bin};

fn setup(bin: &PgBin, kind: Option<S3Kind>) -> Option<Setup> {
    let conf = ["track_commit_timestamp = on"];
    match kind {
        None => Some(Setup::file_with(bin, &conf)),
        Some(kind) => Setup::s3_with(bin, kind, "trust", &conf),
    }
}

fn ids(r: &Restored) -> String {
    r.sql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM t")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The newest commit as PostgreSQL records it, in microseconds.
fn newest_commit_us(s: &Setup) -> i64 {
    s.pg.sql("SELECT (extract(epoch FROM (pg_last_committed_xact()).timestamp) * 1000000)::bigint")
        .parse()
        .expect("micros")
}

fn rfc3339_us(text: &str) -> i64 {
    let t = humantime::parse_rfc3339_weak(text).expect("RFC 3339");
    i64::try_from(
        t.duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_micros(),
    )
    .expect("fits")
}

fn pg_time(us: i64) -> String {
    pitr_agent::restore::target::TargetTime {
        micros: us,
        assumed_utc: false,
    }
    .to_string()
}

fn window_end_is_the_newest_commit(kind: Option<S3Kind>) {
    let Some(bin) = pg_bin() else { return };
    let Some(s) = setup(&bin, kind) else { return };
    s.pg.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 5)");
    s.backup();
    s.pg.exec("INSERT INTO t SELECT generate_series(6, 10)");
    let _ = s.archive_now();
    let newest = newest_commit_us(&s);
    let list = s.list();
    let w = &list["restorable-window"];
    assert_eq!(w["end-is-last-commit"], true, "{w:#}");
    let last = rfc3339_us(w["last-commit"].as_str().expect("last-commit"));
    assert_eq!(last, newest, "the window ends at the newest commit: {w:#}");
    assert_eq!(
        rfc3339_us(w["end"].as_str().expect("end")) / 1000,
        newest / 1000
    );
    let archived_to = rfc3339_us(w["archived-to"].as_str().expect("archived-to"));
    // Millisecond precision in the listing.
    assert!(archived_to / 1000 >= last / 1000, "{w:#}");
    let archived_to = archived_to.max(last);

    // A time after the newest commit, before the archive's end: everything
    // committed comes back (PostgreSQL alone ends such a recovery with FATAL).
    let target = pg_time(last + (archived_to - last) / 2 + 1);
    let r = Restored::new(&bin);
    let out = r.pgrestore(
        &s,
        &[
            "--target-time",
            &target,
            "--start",
            "--target-action",
            "pause",
        ],
    );
    ok(
        &out,
        &format!("restore to {target}, after the newest commit"),
    );
    assert!(
        stderr(&out).contains("nothing was committed between"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        ids(&r),
        (1..=10)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );

    // A time after the archive's end is refused before anything is
    // downloaded, quoting the newest commit.
    let late = pg_time(archived_to + 3_600_000_000);
    let r = Restored::new(&bin);
    let out = r.pgrestore(&s, &["--target-time", &late, "--start"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("the newest commit in it is at"), "{err}");
    assert!(
        !r.data.exists(),
        "a refused restore created {}",
        r.data.display()
    );
}

#[test]
fn the_window_ends_at_the_newest_commit_on_a_file_repository() {
    window_end_is_the_newest_commit(None);
}

#[test]
fn the_window_ends_at_the_newest_commit_on_s3() {
    window_end_is_the_newest_commit(Some(S3Kind::Moto));
}

/// Rewrites repository object `key` (file://) as plain gzip of `raw`, as a
/// repository filled by `gzip` in archive_command holds it.
fn replace_with_plain_gzip(s: &Setup, key: &str, raw: &[u8]) {
    let dir = s.dir.as_ref().expect("a file:// repository");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(raw).expect("gzip");
    let bytes = gz.finish().expect("gzip");
    let path = dir.join(key);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
}

#[test]
fn damaged_wal_in_the_middle_is_found_refused_and_never_reported_reached() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file_with(&bin, &["track_commit_timestamp = on"]);
    s.pg.exec("CREATE TABLE t (id int PRIMARY KEY)");
    for i in 1..=3 {
        s.pg.exec(&format!("INSERT INTO t VALUES ({i})"));
    }
    s.backup();
    let mut marks = Vec::new();
    for i in 4..=12 {
        s.pg.exec(&format!("INSERT INTO t VALUES ({i})"));
        let lsn: Lsn =
            s.pg.sql("SELECT pg_current_wal_insert_lsn()")
                .parse()
                .expect("lsn");
        let t =
            s.pg.sql("SELECT (pg_last_committed_xact()).timestamp::text");
        marks.push((i, lsn, t));
        if i % 3 == 0 {
            let _ = s.pg.switch_wal();
        }
    }
    let _ = s.archive_now();
    let seg = 16u32 << 20;
    // The segment that holds marker 7's commit: damage a record after it.
    let (_, lsn7, _) = marks
        .iter()
        .find(|(i, _, _)| *i == 7)
        .expect("marker 7")
        .clone();
    let name = WalFileName::segment(pitr_agent::wal::TimelineId(1), lsn7.segment(seg), seg);
    let mut raw = std::fs::read(s.pg.wal_dir().join(name.as_str())).expect("segment in pg_wal");
    let mut after = Vec::new();
    records::read_segment(
        &raw,
        lsn7.segment(seg).start(seg),
        Completeness::Full,
        |r| {
            if r.lsn >= lsn7 {
                after.push(r.lsn.0 % u64::from(seg));
            }
        },
    )
    .expect("reads");
    let at = after
        .iter()
        .map(|l| (*l + 25) as usize)
        .find(|at| at % 8192 > 64 && at % 8192 < 8100)
        .expect("a record after marker 7");
    raw[at] ^= 0x41;
    let key = format!("wal/{name}.gz");
    replace_with_plain_gzip(&s, &key, &raw);
    // As a plain-gzip repository: no summary of it either.
    let dir = s.dir.clone().expect("file repository");
    for e in std::fs::read_dir(dir.join("wal-summary"))
        .expect("summaries")
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with(name.as_str()) {
            std::fs::remove_file(e.path()).expect("remove summary");
        }
    }

    // verify reads every WAL object back and names the damage.
    let out = s.run(&["verify"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("{name}: unreadable WAL at")),
        "{text}"
    );

    // pgrestore --target latest: PostgreSQL cannot reach the archive's end,
    // and pgrestore says so instead of "reached the target".
    let r = Restored::new(&bin);
    let out = r.pgrestore(&s, &["--target", "latest", "--start"]);
    assert!(
        !out.status.success(),
        "a short replay was reported a success"
    );
    let err = stderr(&out);
    assert!(!err.contains("reached the target"), "{err}");
    assert!(err.contains("before reaching the target"), "{err}");
    assert!(
        !r.data.exists(),
        "the failed --start left {} behind",
        r.data.display()
    );
    let histories: Vec<String> = std::fs::read_dir(dir.join("wal"))
        .expect("wal")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".history"))
        .collect();
    assert!(
        histories.is_empty(),
        "the failed restore promoted into the repository: {histories:?}"
    );

    // The rehearsal fails too, with reason replay.
    let scratch = pitr_tests::user_tempdir(pitr_tests::RunAs::test_user(), "rehearse");
    let out = s
        .agent(&["rehearse", "--json", "--rehearse-dir"])
        .arg(scratch.path())
        .output()
        .expect("run rehearse");
    let record: Value = serde_json::from_slice(&out.stdout).expect("a rehearsal record");
    assert_eq!(out.status.code(), Some(1), "{record:#}");
    assert_eq!(record["reason"], "replay", "{record:#}");

    // With the summary stored, the plan refuses before anything is
    // downloaded, and list names the damaged segment.
    let out = s.run(&["verify", "--summarize"]);
    assert_eq!(out.status.code(), Some(1));
    let list = String::from_utf8_lossy(&s.run(&["list"]).stdout).into_owned();
    assert!(list.contains(&format!("DAMAGED WAL: {name}")), "{list}");
    let r = Restored::new(&bin);
    let out = r.pgrestore(&s, &["--target", "latest", "--start"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("WAL damaged at") && err.contains(name.as_str()),
        "{err}"
    );
    assert!(
        !r.data.exists(),
        "the refused restore created {}",
        r.data.display()
    );

    // A target before the damage still restores exactly; --allow-incomplete
    // restores up to it and says so.
    let (_, _, t6) = marks
        .iter()
        .find(|(i, _, _)| *i == 6)
        .expect("marker 6")
        .clone();
    let r = Restored::new(&bin);
    let out = r.pgrestore(
        &s,
        &["--target-time", &t6, "--start", "--target-action", "pause"],
    );
    ok(&out, "restore before the damage");
    assert_eq!(ids(&r), "1,2,3,4,5,6");
    let r = Restored::new(&bin);
    let out = r.pgrestore(&s, &["--target", "latest", "--allow-incomplete", "--start"]);
    ok(&out, "restore up to the damage");
    assert!(
        stderr(&out).contains("replay ends before it"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ids(&r), "1,2,3,4,5,6,7");
}

/// A copy restored beside a running production never archives into the
/// production repository; one restored with --new-primary while
/// production goes on does, and then list and verify name the divergence
/// and `--target latest` refuses to guess a timeline.
#[test]
fn a_copy_never_poisons_its_source_and_a_divergence_is_named() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file_with(&bin, &["track_commit_timestamp = on"]);
    s.pg.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 3)");
    s.backup();
    s.pg.exec("INSERT INTO t VALUES (4)");
    let _ = s.archive_now();
    let dir = s.dir.clone().expect("file repository");
    let histories = || -> Vec<String> {
        std::fs::read_dir(dir.join("wal"))
            .expect("wal")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".history"))
            .collect()
    };

    // The default: a copy. Promoted and written to, it archives nothing here.
    let copy = Restored::new(&bin);
    ok(
        &copy.pgrestore(&s, &["--target", "latest", "--start"]),
        "side restore",
    );
    copy.sql("INSERT INTO t VALUES (1000)");
    let _ = copy.sql("SELECT pg_switch_wal()");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        histories().is_empty(),
        "the copy archived into its source: {:?}",
        histories()
    );
    drop(copy);
    // Production goes on, and latest still follows it.
    s.pg.exec("INSERT INTO t VALUES (5)");
    let _ = s.archive_now();
    let r = Restored::new(&bin);
    ok(
        &r.pgrestore(&s, &["--target", "latest", "--start"]),
        "latest after the copy",
    );
    assert_eq!(ids(&r), "1,2,3,4,5");
    drop(r);

    // A copy restored as if it were the new primary, while production
    // keeps archiving: two timelines grow.
    let wrong = Restored::new(&bin);
    ok(
        &wrong.pgrestore(&s, &["--target", "latest", "--start", "--new-primary"]),
        "restore with --new-primary",
    );
    wrong.sql("INSERT INTO t VALUES (2000)");
    wrong.archive_now();
    drop(wrong);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    s.pg.exec("INSERT INTO t VALUES (6)");
    let _ = s.archive_now();

    let list = String::from_utf8_lossy(&s.run(&["list"]).stdout).into_owned();
    assert!(
        list.contains("DIVERGED: timelines 1 and 2 both grew"),
        "{list}"
    );
    let out = s.run(&["verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("both grew"));
    let r = Restored::new(&bin);
    let out = r.pgrestore(&s, &["--target", "latest", "--start"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--target-timeline 1 or --target-timeline 2"),
        "{err}"
    );
    assert!(!r.data.exists());
    let out = r.pgrestore(
        &s,
        &["--target", "latest", "--target-timeline", "1", "--start"],
    );
    ok(&out, "latest on timeline 1");
    assert_eq!(ids(&r), "1,2,3,4,5,6");
}

/// A segment missing in the middle ends the window where it begins; a
/// backup after it makes the window resume, and the end is the newest
/// commit again.
#[test]
fn a_wal_gap_ends_the_window_until_a_backup_bridges_it() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file_with(&bin, &["track_commit_timestamp = on"]);
    s.pg.exec("CREATE TABLE t (id int PRIMARY KEY)");
    s.backup();
    let mut names = Vec::new();
    for i in 1..=4 {
        s.pg.exec(&format!("INSERT INTO t VALUES ({i})"));
        names.push(s.pg.switch_wal());
    }
    let _ = s.archive_now();
    let dir = s.dir.clone().expect("file repository");
    let victim = &names[1];
    std::fs::remove_file(dir.join(format!("wal/{victim}.gz"))).expect("delete a segment");
    let list = s.list();
    let w = &list["restorable-window"];
    assert_eq!(w["end-is-last-commit"], false, "{w:#}");
    let gap = &w["gaps"][0];
    assert!(
        gap["missing"]
            .as_str()
            .expect("missing")
            .starts_with(victim.as_str()),
        "{w:#}"
    );
    assert!(gap.get("resumes-at").is_none(), "{w:#}");
    let end = rfc3339_us(w["end"].as_str().expect("end"));
    assert!(
        end < newest_commit_us(&s),
        "the window goes past the gap: {w:#}"
    );
    let text = String::from_utf8_lossy(&s.run(&["list"]).stdout).into_owned();
    assert!(text.contains(&format!("WAL GAP: {victim}")), "{text}");

    // A backup after the gap: the window resumes there.
    s.pg.exec("INSERT INTO t VALUES (5)");
    s.backup();
    s.pg.exec("INSERT INTO t VALUES (6)");
    let _ = s.archive_now();
    let w = s.list()["restorable-window"].clone();
    assert!(w["gaps"][0].get("resumes-at").is_some(), "{w:#}");
    assert_eq!(w["end-is-last-commit"], true, "{w:#}");
    assert_eq!(
        rfc3339_us(w["last-commit"].as_str().expect("last-commit")),
        newest_commit_us(&s)
    );
}

/// Backups B8 and B9 on timeline 1; a restore to a time between them forks
/// timeline 2; C1 is timeline 2's first backup. prune, with the clock moved
/// so that the window starts between B9's end and C1's end, keeps B8 (which
/// timeline 2 descends from), not B9 (after the fork), and a point of
/// timeline 2 before C1 still restores.
#[test]
fn retention_after_a_restore_keeps_what_the_live_timeline_needs() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file_with(&bin, &["track_commit_timestamp = on"]);
    s.pg.exec("CREATE TABLE t (id int PRIMARY KEY)");
    let b8 = s.backup()["id"].as_str().expect("id").to_owned();
    for i in 1..=3 {
        s.pg.exec(&format!("INSERT INTO t VALUES ({i})"));
    }
    let mid =
        s.pg.sql("SELECT (pg_last_committed_xact()).timestamp::text");
    std::thread::sleep(std::time::Duration::from_millis(50));
    for i in 4..=6 {
        s.pg.exec(&format!("INSERT INTO t VALUES ({i})"));
    }
    let b9 = s.backup()["id"].as_str().expect("id").to_owned();
    s.pg.exec("INSERT INTO t VALUES (7)");
    let _ = s.archive_now();

    // The restore that replaces production: timeline 2.
    let r1 = Restored::new(&bin);
    ok(
        &r1.pgrestore(
            &s,
            &[
                "--target-time",
                &mid,
                "--start",
                "--target-action",
                "promote",
                "--new-primary",
            ],
        ),
        "restore to between B8 and B9",
    );
    s.pg.stop();
    r1.sql("INSERT INTO t VALUES (101)");
    let t101 = r1.sql("SELECT (pg_last_committed_xact()).timestamp::text");
    r1.archive_now();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let on_r1 = |args: &[&str]| {
        let mut cmd = pitr_tests::bins::agent_cmd(pitr_tests::RunAs::test_user());
        cmd.args(["--repo", &s.repo])
            .env("PGHOST", &r1.socket)
            .env("PGPORT", r1.port.to_string())
            .env("PGUSER", "postgres")
            .args(args);
        cmd.output().expect("run pitr-agent")
    };
    let out = on_r1(&["backup", "--json"]);
    ok(&out, "C1, timeline 2's first backup");
    let c1: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let c1 = c1["id"].as_str().expect("id").to_owned();
    r1.sql("INSERT INTO t VALUES (102)");
    r1.archive_now();
    drop(r1);

    let backups = s.list()["backups"].clone();
    let end_of = |id: &str| -> i64 {
        let b = backups
            .as_array()
            .expect("backups")
            .iter()
            .find(|b| b["id"] == id)
            .expect("listed");
        rfc3339_us(b["stop-time"].as_str().expect("stop-time"))
    };
    let cutoff = (end_of(&b9) + end_of(&c1)) / 2;
    let now = humantime::format_rfc3339_micros(
        std::time::UNIX_EPOCH
            + std::time::Duration::from_micros((cutoff + 86_400_000_000).unsigned_abs()),
    )
    .to_string();
    let out = s.run(&["prune", "--retain-days", "1", "--now", &now]);
    ok(&out, "prune with the clock a day on");
    let kept: Vec<String> = s.backup_ids();
    assert!(
        kept.contains(&b8),
        "B8, which timeline 2 descends from, was deleted: {kept:?}"
    );
    assert!(kept.contains(&c1) && !kept.contains(&b9), "{kept:?}");

    // A point of timeline 2 before C1 still restores.
    let r = Restored::new(&bin);
    ok(
        &r.pgrestore(
            &s,
            &[
                "--target-time",
                &t101,
                "--start",
                "--target-action",
                "pause",
            ],
        ),
        "restore timeline 2 before its first backup",
    );
    assert_eq!(ids(&r), "1,2,3,101");
}

/// `--target-name` for a name that was never made: with WAL summaries the
/// plan refuses it before downloading and lists the names there are;
/// without them replay runs to the end and pgrestore says the restore point
/// was not found, not that archiving failed.
#[test]
fn an_unknown_restore_point_is_named_as_such() {
    let Some(bin) = pg_bin() else { return };
    let Some(s) = setup(&bin, None) else { return };
    s.pg.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)");
    s.backup();
    // Two calls: psql -c runs its statements as one transaction.
    s.pg.exec("INSERT INTO t VALUES (2)");
    s.pg.exec("SELECT pg_create_restore_point('before_upgrade')");
    // Segments after it, so that its own is not among the newest two the
    // plan reads from WAL when their summaries are missing.
    for id in 3..=5 {
        s.pg.exec(&format!("INSERT INTO t VALUES ({id})"));
        let _ = s.archive_now();
    }

    let r = Restored::new(&bin);
    let out = r.pgrestore(&s, &["--target-name", "nope", "--start"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("no restore point named \"nope\"") && err.contains("\"before_upgrade\""),
        "{err}"
    );
    assert!(
        !r.data.exists(),
        "a refused plan downloaded into {}",
        r.data.display()
    );

    let summaries = s.dir.as_ref().expect("file repository").join("wal-summary");
    std::fs::remove_dir_all(&summaries).expect("remove the WAL summaries");
    let r = Restored::new(&bin);
    let out = r.pgrestore(&s, &["--target-name", "nope", "--start"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let first = err
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or_default();
    assert!(
        first.contains("without finding restore point \"nope\"")
            && first.contains("pgrestore list"),
        "{err}"
    );
    assert!(
        !r.data.exists(),
        "a failed restore left {}",
        r.data.display()
    );

    // The name that exists still restores, summaries or not.
    let r = Restored::new(&bin);
    let out = r.pgrestore(
        &s,
        &[
            "--target-name",
            "before_upgrade",
            "--start",
            "--target-action",
            "pause",
        ],
    );
    ok(&out, "restore to before_upgrade");
    assert_eq!(ids(&r), "1,2");
}
