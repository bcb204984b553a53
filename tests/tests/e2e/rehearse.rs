//! `pitr-agent rehearse` against a real PostgreSQL and a file:// repository:
//! a good repository is proven restorable to its newest commit; a false
//! operator check, a corrupt base backup, a missing segment and a tiny RTO
//! objective each fail with their reason; the scratch directory is always
//! removed.

use serde_json::Value;

use super::{Setup, pg_bin};

fn rehearse(setup: &Setup, scratch: &std::path::Path, extra: &[&str]) -> (i32, Value) {
    let out = setup
        .agent(&["rehearse", "--json", "--rehearse-dir"])
        .arg(scratch)
        .args(extra)
        .output()
        .expect("run rehearse");
    let record: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "rehearse printed no record: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), record)
}

/// When the source's newest transaction committed, as Unix seconds.
fn newest_commit(setup: &Setup) -> f64 {
    setup
        .pg
        .sql("SELECT extract(epoch FROM (pg_last_committed_xact()).timestamp)")
        .parse()
        .expect("epoch")
}

fn empty(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

#[test]
fn rehearsals_prove_a_good_repository_and_name_each_failure() {
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file_with(&bin, &["track_commit_timestamp = on"]);
    setup
        .pg
        .exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)");
    setup.backup();
    // A whole second between the backup's end and the newest commit, for
    // the random target below.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    setup
        .pg
        .exec("INSERT INTO t SELECT generate_series(101, 250)");
    let _ = setup.archive_now();
    let newest = newest_commit(&setup);
    let scratch = pitr_tests::user_tempdir(pitr_tests::RunAs::test_user(), "rehearse");
    let checks = scratch.path().join("checks.sql");
    std::fs::write(&checks, "-- every row\nselect count(*) = 250 from t;\n").expect("write");
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    pitr_tests::RunAs::test_user().chown_tree(scratch.path());

    // A good repository: restored to its newest commit, every check passes.
    let sql = ["--rehearse-sql", checks.to_str().expect("path")];
    let (code, record) = rehearse(&setup, &work, &sql);
    assert_eq!(code, 0, "{record:#}");
    assert_eq!(record["ok"], true);
    let proven = record["restored-point-unix"]
        .as_f64()
        .expect("restored point");
    assert!(
        (proven - newest).abs() < 0.001,
        "proven {proven}, newest commit {newest}"
    );
    assert!(record["restore-seconds"].as_f64().expect("seconds") > 0.0);
    assert!(record["databases"].as_array().expect("dbs").len() >= 2);
    assert!(empty(&work), "the scratch directory was left behind");
    let list = setup.run(&["list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("last proven restorable:"), "{text}");

    // A random second between the window's start and the proven commit:
    // reached, and never past it.
    let (code, record) = rehearse(&setup, &work, &["--target", "random"]);
    assert_eq!(code, 0, "{record:#}");
    assert!(
        record["target"]
            .as_str()
            .is_some_and(|t| t.starts_with("time ")),
        "a time target: {record:#}"
    );
    if let Some(point) = record["restored-point-unix"].as_f64() {
        assert!(point <= newest + 0.001, "{record:#}");
    }
    assert!(empty(&work));

    // An operator check that is false.
    std::fs::write(&checks, "select count(*) = 999 from t;\n").expect("write");
    let (code, record) = rehearse(&setup, &work, &sql);
    assert_eq!(
        (code, record["reason"].as_str()),
        (1, Some("user-check")),
        "{record:#}"
    );
    assert!(empty(&work));

    // A restore slower than a tiny objective.
    let (code, record) = rehearse(&setup, &work, &["--rto-objective", "1ms"]);
    assert_eq!(
        (code, record["reason"].as_str()),
        (1, Some("too-slow")),
        "{record:#}"
    );

    // A corrupt base backup.
    let dir = setup.dir.as_ref().expect("file repository");
    let id = setup.backup_ids()[0].clone();
    let data = dir.join(format!("backups/{id}/base.tar.gz"));
    let mut bytes = std::fs::read(&data).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&data, &bytes).expect("write");
    let (code, record) = rehearse(&setup, &work, &[]);
    assert_eq!(
        (code, record["reason"].as_str()),
        (1, Some("restore")),
        "{record:#}"
    );
    assert!(empty(&work), "a failed restore left its scratch directory");
    bytes[middle] ^= 0xff;
    std::fs::write(&data, &bytes).expect("write");

    // A missing segment inside the window.
    let segment = setup.list()["restorable-window"]["newest-wal"]
        .as_str()
        .expect("newest WAL")
        .to_owned();
    std::fs::remove_file(dir.join(format!("wal/{segment}.gz"))).expect("remove a segment");
    let _ = setup.archive_now();
    let (code, record) = rehearse(&setup, &work, &[]);
    assert_eq!(code, 1, "{record:#}");
    assert!(
        matches!(record["reason"].as_str(), Some("plan" | "replay")),
        "{record:#}"
    );
    assert!(empty(&work));
    let list = setup.run(&["list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("FAILED"), "{text}");
}

#[test]
fn sigterm_mid_replay_stops_the_server_and_removes_the_scratch_directory() {
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file(&bin);
    setup.pg.pgbench(&["-i", "-s", "1", "-q"]);
    setup.backup();
    setup.pg.pgbench(&["-i", "-s", "2", "-q"]);
    let _ = setup.archive_now();
    let scratch = pitr_tests::user_tempdir(pitr_tests::RunAs::test_user(), "rehearse");
    // Every repository call of the rehearsal and of its wal-fetch waits
    // 1.5 s, so replay is still going when SIGTERM comes.
    let mut child = setup
        .agent(&["rehearse", "--rehearse-dir"])
        .arg(scratch.path())
        .env("PITR_TEST_FAULTS", "seed=3,slow=1,delay-ms=1500")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start rehearse");
    let data = pitr_tests::wait_for(
        "the rehearsal's server to replay",
        std::time::Duration::from_secs(90),
        || {
            let dir = std::fs::read_dir(scratch.path())
                .ok()?
                .flatten()
                .next()?
                .path();
            let data = dir.join("data");
            data.join("postmaster.pid").exists().then_some(data)
        },
    );
    let pid: u32 = std::fs::read_to_string(data.join("postmaster.pid"))
        .expect("pid file")
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("pid");
    let signalled = std::time::Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = pitr_tests::wait_for(
        "rehearse to exit",
        std::time::Duration::from_secs(30),
        || child.try_wait().ok().flatten(),
    );
    let took = signalled.elapsed();
    assert!(
        took < std::time::Duration::from_secs(10),
        "exit took {took:?}"
    );
    assert!(!status.success());
    assert!(
        empty(scratch.path()),
        "the scratch directory is still there"
    );
    // pg_ctl stop waited for the postmaster; a zombie awaiting its reaper is gone.
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    };
    assert!(!running(), "the rehearsal's PostgreSQL {pid} still runs");
}

#[test]
fn the_daemon_rehearses_beside_backups_and_prometheus_sees_the_outcome() {
    use super::daemon::{Prometheus, get, rules_without_for, start_daemon, stop};
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file(&bin);
    setup.pg.pgbench(&["-i", "-s", "1", "-q"]);
    setup.backup();
    let scratch = pitr_tests::user_tempdir(pitr_tests::RunAs::test_user(), "rehearse");
    // The checks take 4 s, so backups every 2 s run while a rehearsal does.
    let checks = scratch.path().join("checks.sql");
    std::fs::write(&checks, "select true from pg_sleep(4);\n").expect("write");
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    pitr_tests::RunAs::test_user().chown_tree(scratch.path());
    let port = pitr_tests::free_port();
    let daemon = start_daemon(
        &setup,
        port,
        &[
            "--backup-schedule",
            "*/2 * * * * *",
            "--rehearse-schedule",
            "*/3 * * * * *",
            "--rehearse-dir",
            work.to_str().expect("path"),
            "--rehearse-sql",
            checks.to_str().expect("path"),
            "--rto-objective",
            "1ms",
        ],
    );
    let prom =
        pitr_tests::which("prometheus").map(|_| Prometheus::start(port, &rules_without_for()));
    let before = setup.backup_ids().len();
    // A rehearsal slower than the 1 ms objective fails as too-slow.
    let record = pitr_tests::wait_for(
        "a scheduled rehearsal",
        std::time::Duration::from_secs(90),
        || {
            let list = setup.list();
            let r = list.get("last-rehearsal")?.clone();
            r.is_object().then_some(r)
        },
    );
    assert_eq!(record["reason"], "too-slow", "{record:#}");
    let after = setup.backup_ids().len();
    assert!(
        after >= before + 2,
        "backups stalled while the rehearsal ran: {before} -> {after}"
    );
    if let Some(prom) = &prom {
        prom.wait_firing("PitrRehearsalFailing", true);
        prom.wait_firing("PitrRestoreTooSlow", true);
    }
    let (_, body) = get(port, "/metrics").expect("metrics");
    assert!(
        body.contains("pitr_rehearsal_failures_total{reason=\"too-slow\"} "),
        "{body}"
    );
    drop(prom);
    stop(daemon);
    let left: Vec<_> = std::fs::read_dir(&work)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a scheduled rehearsal left {left:?}");
}

#[test]
fn a_good_s3_repository_is_proven_restorable_to_its_newest_commit() {
    let Some(bin) = pg_bin() else { return };
    let Some(setup) = Setup::s3_with(
        &bin,
        pitr_tests::s3::S3Kind::Moto,
        "rehearse",
        &["track_commit_timestamp = on"],
    ) else {
        return;
    };
    setup.pg.pgbench(&["-i", "-s", "1", "-q"]);
    setup.backup();
    setup.pg.pgbench(&["-c", "2", "-t", "200"]);
    let _ = setup.archive_now();
    let newest = newest_commit(&setup);
    let scratch = pitr_tests::user_tempdir(pitr_tests::RunAs::test_user(), "rehearse");
    let (code, record) = rehearse(&setup, scratch.path(), &["--rehearse-heapallindexed"]);
    assert_eq!(code, 0, "{record:#}");
    let proven = record["restored-point-unix"]
        .as_f64()
        .expect("restored point");
    assert!(
        (proven - newest).abs() < 0.001,
        "proven {proven}, newest {newest}"
    );
    assert!(empty(scratch.path()));
    // The record is in the repository: list shows it.
    let list = setup.list();
    assert_eq!(list["last-proven"]["id"], record["id"], "{list:#}");
}
