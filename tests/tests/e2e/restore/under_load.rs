//! Randomized point-in-time recovery under load (issue 11).
//!
//! Concurrent writers commit and roll back while the second backup runs.
//! Every target is a time drawn from the commit timestamps: exactly on one
//! (inclusive), one microsecond before one, and near the end of the archive.
//!
//! What "the rows committed at or before the target" means under concurrency:
//! a commit's timestamp is taken before its WAL record is inserted, so
//! concurrent commits are not in timestamp order in the WAL. PostgreSQL
//! replays in WAL order and stops before the first commit or abort record
//! stamped after the target. The expected rows are therefore computed from
//! the WAL itself (`pg_waldump`), and the test also checks the weaker,
//! order-free promise: every restored row committed at or before the target.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use pitr_agent::restore::target::TargetTime;
use pitr_tests::pg::{PgBin, Postgres};
use pitr_tests::s3::S3Kind;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{Restored, Source, ok};
use crate::pg_bin;

/// Concurrent writers on their own connections; some transactions roll back.
struct Load {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<i64>>,
}

impl Load {
    fn start(pg: &Postgres, writers: u64, seed: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(pg.dir.path())
            .port(pg.port)
            .user("postgres")
            .dbname("postgres");
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let next_id = Arc::new(AtomicI64::new(1));
                let mut tasks = Vec::new();
                for w in 0..writers {
                    let (config, flag, next_id) = (config.clone(), flag.clone(), next_id.clone());
                    tasks.push(tokio::spawn(async move {
                        let (client, conn) = config
                            .connect(tokio_postgres::NoTls)
                            .await
                            .expect("connect");
                        tokio::spawn(conn);
                        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (w + 1));
                        let mut rolled_back = Vec::new();
                        while !flag.load(Ordering::Relaxed) {
                            let rows = rng.random_range(1..=3);
                            let ids: Vec<i64> = (0..rows)
                                .map(|_| next_id.fetch_add(1, Ordering::Relaxed))
                                .collect();
                            let values: Vec<String> =
                                ids.iter().map(|id| format!("({id}, {w})")).collect();
                            let commit = rng.random_bool(0.8);
                            let sql = format!(
                                "BEGIN; INSERT INTO load (id, writer) VALUES {}; {}",
                                values.join(", "),
                                if commit { "COMMIT" } else { "ROLLBACK" }
                            );
                            client.batch_execute(&sql).await.expect("load transaction");
                            if !commit {
                                rolled_back.extend(ids);
                            }
                            let pause = rng.random_range(0..3);
                            tokio::time::sleep(Duration::from_millis(pause)).await;
                        }
                        rolled_back
                    }));
                }
                let mut rolled_back = Vec::new();
                for t in tasks {
                    rolled_back.extend(t.await.expect("writer"));
                }
                rolled_back
            })
        });
        Load { stop, thread }
    }

    /// Stops the writers; returns the ids of rows whose transaction rolled back.
    fn stop(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("load thread")
    }
}

/// A transaction end record in WAL order.
#[derive(Debug, Clone, Copy)]
struct XactEnd {
    xid: u32,
    micros: i64,
    committed: bool,
}

/// Commit and abort records between two LSNs, in WAL order, read with
/// `pg_waldump` from the source's `pg_wal` (kept by `wal_keep_size`).
fn xact_ends(pg: &Postgres, from: &str, to: &str) -> Vec<XactEnd> {
    let out = std::process::Command::new(pg.bin.tool("pg_waldump"))
        .env("TZ", "UTC")
        .arg("-p")
        .arg(pg.wal_dir())
        .args(["-s", from, "-e", to, "-r", "Transaction"])
        .output()
        .expect("run pg_waldump");
    assert!(
        out.status.success(),
        "pg_waldump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|line| {
            let (_, desc) = line.split_once("desc: ")?;
            let (committed, rest) = if let Some(r) = desc.strip_prefix("COMMIT ") {
                (true, r)
            } else {
                (false, desc.strip_prefix("ABORT ")?)
            };
            let stamp = rest.split(';').next()?.trim().replace(" UTC", "+00");
            let xid = line
                .split_once("tx:")?
                .1
                .split(',')
                .next()?
                .trim()
                .parse()
                .ok()?;
            let micros = TargetTime::parse(&stamp)
                .unwrap_or_else(|e| panic!("pg_waldump time {stamp:?}: {e}"))
                .micros;
            Some(XactEnd {
                xid,
                micros,
                committed,
            })
        })
        .collect()
}

/// The xids PostgreSQL replays for an inclusive time target: every commit
/// before the first commit or abort record stamped after `target`.
fn replayed_xids(ends: &[XactEnd], target: i64) -> HashSet<u32> {
    ends.iter()
        .take_while(|e| e.micros <= target)
        .filter(|e| e.committed)
        .map(|e| e.xid)
        .collect()
}

/// `micros` as PostgreSQL reads a time: `YYYY-MM-DD HH:MM:SS[.ffffff]+00`.
fn as_text(micros: i64) -> String {
    TargetTime {
        micros,
        assumed_utc: false,
    }
    .to_string()
}

fn pitr_under_load(bin: &PgBin, kind: Option<S3Kind>) {
    // wal_keep_size keeps the load's WAL in pg_wal for pg_waldump.
    let Some(src) = Source::start_with(bin, kind, &["wal_keep_size = '4GB'"]) else {
        return;
    };
    let (seed, mut rng) = pitr_tests::seeded_rng("pitr_under_load");

    src.pg
        .exec("CREATE TABLE load (id bigint PRIMARY KEY, writer int NOT NULL)");
    let _b1 = src.backup_id();
    let from = src.pg.sql("SELECT pg_current_wal_insert_lsn()");
    let load = Load::start(&src.pg, 4, seed);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = src.pg.switch_wal();
    // The second backup runs while the writers commit and roll back.
    let _b2 = src.backup_id();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = src.pg.switch_wal();
    std::thread::sleep(Duration::from_millis(1000));
    let rolled_back = load.stop();
    // A commit after the load, so that a target on the load's last commit
    // is inside the archive, not at its very end.
    std::thread::sleep(Duration::from_millis(20));
    src.pg.exec("CREATE TABLE after_load ()");
    let to = src.pg.sql("SELECT pg_current_wal_insert_lsn()");
    src.archive_now();

    let ends = xact_ends(&src.pg, &from, &to);
    let rows: Vec<(i64, u32, i64)> = src
        .pg
        .sql(
            "SELECT id || '|' || xmin::text || '|' || pg_xact_commit_timestamp(xmin)::text \
             FROM load ORDER BY id",
        )
        .lines()
        .map(|l| {
            let p: Vec<&str> = l.split('|').collect();
            let micros = TargetTime::parse(p[2]).expect("commit time").micros;
            (
                p[0].parse().expect("id"),
                p[1].parse().expect("xid"),
                micros,
            )
        })
        .collect();
    // The WAL's commit records and the commit timestamps agree.
    let stamped: HashMap<u32, i64> = ends
        .iter()
        .filter(|e| e.committed)
        .map(|e| (e.xid, e.micros))
        .collect();
    for (id, xid, micros) in &rows {
        assert_eq!(
            stamped.get(xid),
            Some(micros),
            "row {id}: commit timestamp of xid {xid} as pg_waldump reads it"
        );
    }
    let commits: Vec<i64> = {
        let mut v: Vec<i64> = stamped.values().copied().collect();
        v.sort_unstable();
        v
    };
    assert!(
        commits.len() >= 100 && !rolled_back.is_empty(),
        "the load committed {} transactions and rolled back {} rows",
        commits.len(),
        rolled_back.len()
    );
    let out_of_order = ends
        .windows(2)
        .filter(|w| w[1].micros < w[0].micros)
        .count();
    eprintln!(
        "pitr_under_load: {} rows in {} commits, {} rows rolled back, {out_of_order} \
         transaction ends stamped earlier than the one before them in the WAL",
        rows.len(),
        commits.len(),
        rolled_back.len()
    );

    // Targets: exactly on a commit, 1 µs before one, and near the end.
    let pick = |rng: &mut rand::rngs::StdRng, range: std::ops::Range<usize>| {
        commits[rng.random_range(range)]
    };
    let n = commits.len();
    let mut targets: Vec<(String, i64)> = Vec::new();
    for _ in 0..3 {
        let t = pick(&mut rng, 0..n);
        targets.push(("exactly on a commit".into(), t));
        let t = pick(&mut rng, 0..n);
        targets.push(("1 µs before a commit".into(), t - 1));
    }
    targets.push(("on the last commit of the load".into(), commits[n - 1]));
    let t = pick(&mut rng, n - 5..n);
    targets.push(("1 µs before one of the last 5 commits".into(), t - 1));
    targets.shuffle(&mut rng);

    let gone: HashSet<i64> = rolled_back.iter().copied().collect();
    for (what, target) in &targets {
        let at = as_text(*target);
        let xids = replayed_xids(&ends, *target);
        let expected: Vec<i64> = rows
            .iter()
            .filter(|(_, xid, _)| xids.contains(xid))
            .map(|(id, _, _)| *id)
            .collect();
        let r = Restored::new(bin);
        let out = r.pgrestore(
            &src,
            &["--target-time", &at, "--start", "--target-action", "pause"],
        );
        ok(&out, &format!("restore to {at} ({what}, seed {seed})"));
        let restored: Vec<i64> = r
            .sql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM load")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("id"))
            .collect();
        let missing: Vec<_> = expected
            .iter()
            .filter(|id| !restored.contains(id))
            .collect();
        let extra: Vec<_> = restored
            .iter()
            .filter(|id| !expected.contains(id))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "restore to {at} ({what}, seed {seed}): {} rows expected, {} restored; \
             missing {missing:?}, unexpected {extra:?}",
            expected.len(),
            restored.len()
        );
        let late: Vec<_> = rows
            .iter()
            .filter(|(id, _, micros)| *micros > *target && restored.contains(id))
            .collect();
        assert!(
            late.is_empty(),
            "rows committed after {at} restored: {late:?}"
        );
        let resurrected: Vec<_> = restored.iter().filter(|id| gone.contains(id)).collect();
        assert!(
            resurrected.is_empty(),
            "rolled-back rows restored: {resurrected:?}"
        );
        eprintln!(
            "pitr_under_load: {at} ({what}): {} of {} rows, exact",
            restored.len(),
            rows.len()
        );
    }
}

#[test]
fn randomized_pitr_under_load_on_a_file_repository() {
    let Some(bin) = pg_bin() else { return };
    pitr_under_load(&bin, None);
}

#[test]
fn randomized_pitr_under_load_on_s3() {
    let Some(bin) = pg_bin() else { return };
    pitr_under_load(&bin, Some(S3Kind::Moto));
}
