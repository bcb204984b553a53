//! `pitr-agent backup`, `list`, `verify` and `prune` against a real
//! PostgreSQL and both repository kinds.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use pitr_tests::bins::run_ok;
use pitr_tests::pg::{PgBin, Postgres};
use pitr_tests::s3::S3Kind;
use pitr_tests::{RunAs, wait_for};
use serde_json::Value;

use super::{Setup, pg_bin};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until a base backup is streaming files on the server.
fn wait_streaming(pg: &Postgres) {
    wait_for(
        "pg_basebackup to stream database files",
        Duration::from_secs(60),
        || {
            (pg.sql("SELECT count(*) FROM pg_stat_progress_basebackup WHERE phase = 'streaming database files'")
                == "1")
                .then_some(())
        },
    );
}

/// Backs up under pgbench load, restores the tar by hand, checks it with
/// pg_amcheck and compares pg_dumpall with the source at the backup's end.
fn backup_under_load_restores_by_hand(bin: &PgBin, setup: &Setup) {
    let pg = &setup.pg;
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    // Throttled so that the load below runs while the files stream.
    let backup = setup
        .agent(&["backup", "--json", "--max-rate", "4M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pitr-agent backup");
    wait_streaming(pg);
    pg.pgbench(&["-c", "2", "-t", "200", "-n"]);
    let still_running = pg.sql("SELECT count(*) FROM pg_stat_progress_basebackup") == "1";
    let out = backup.wait_with_output().expect("wait for backup");
    assert!(out.status.success(), "backup failed: {}", stderr(&out));
    assert!(
        still_running,
        "the backup finished before the load did; the test proves nothing: lower --max-rate"
    );
    let record: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let id = record["id"].as_str().expect("id");
    // The source is quiet from here on: its state is the one at the backup's end.
    let source_dump = pg.dumpall();

    let listed = setup.list();
    assert_eq!(listed["backups"][0]["id"], record["id"]);
    assert!(listed["restorable-window"]["start"].is_string(), "{listed}");
    setup.archive_now();
    let verify = setup.run(&["verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "verify of a fresh backup: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        stderr(&verify)
    );

    let scratch = tempfile::tempdir().expect("tempdir");
    let tar_gz = scratch.path().join("base.tar.gz");
    setup.fetch(&format!("backups/{id}/base.tar.gz"), &tar_gz);
    let stored = std::fs::metadata(&tar_gz).expect("downloaded").len();
    assert_eq!(Some(stored), record["objects"][0]["bytes"].as_u64());
    let restored = Postgres::from_backup_tar(bin, &tar_gz);
    restored.start();
    assert_eq!(
        restored.sql("SELECT count(*) FROM pgbench_history"),
        "400",
        "every transaction committed before the backup's end is there"
    );
    let restored_dump = restored.dumpall();
    if restored_dump != source_dump {
        let a = scratch.path().join("source.sql");
        let b = scratch.path().join("restored.sql");
        std::fs::write(&a, &source_dump).expect("write");
        std::fs::write(&b, &restored_dump).expect("write");
        let diff = Command::new("diff").arg(&a).arg(&b).output().expect("diff");
        let diff = String::from_utf8_lossy(&diff.stdout);
        let head: Vec<&str> = diff.lines().take(40).collect();
        panic!(
            "pg_dumpall of the restored backup differs from the source:\n{}",
            head.join("\n")
        );
    }
    // Last: --install-missing adds the amcheck extension to every database.
    let amcheck = Command::new(bin.tool("pg_amcheck"))
        .args(restored.conn_args())
        .args(["--install-missing", "--all", "--heapallindexed"])
        .output()
        .expect("run pg_amcheck");
    assert!(
        amcheck.status.success(),
        "pg_amcheck found corruption: {}{}",
        String::from_utf8_lossy(&amcheck.stdout),
        stderr(&amcheck)
    );
}

#[test]
fn backup_under_load_restores_by_hand_from_a_file_repository() {
    let Some(bin) = pg_bin() else { return };
    backup_under_load_restores_by_hand(&bin, &Setup::file(&bin));
}

#[test]
fn backup_under_load_restores_by_hand_from_s3() {
    let Some(bin) = pg_bin() else { return };
    let Some(setup) = Setup::s3(&bin, S3Kind::Moto, "load") else {
        return;
    };
    backup_under_load_restores_by_hand(&bin, &setup);
}

#[test]
fn verify_reports_a_flipped_byte_and_a_missing_segment() {
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file(&bin);
    let pg = &setup.pg;
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    let record = setup.backup();
    let mut segments = Vec::new();
    for _ in 0..3 {
        pg.pgbench(&["-c", "1", "-t", "50", "-n"]);
        segments.push(setup.archive_now());
    }
    let clean = setup.run(&["verify"]);
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );

    let dir = setup.dir.as_ref().expect("file repository");
    let id = record["id"].as_str().expect("id");
    let data = dir.join(format!("backups/{id}/base.tar.gz"));
    let mut bytes = std::fs::read(&data).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&data, &bytes).expect("flip a byte");
    let missing = &segments[1];
    std::fs::remove_file(dir.join(format!("wal/{missing}.gz"))).expect("delete a segment");

    let out = setup.run(&["verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "findings exit with 1: {text}{}",
        stderr(&out)
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("error") && l.contains(id) && l.contains("base.tar.gz")),
        "the flipped byte is reported against the backup:\n{text}"
    );
    assert!(
        text.contains(&format!(
            "gap: {missing} missing; backups before it cannot reach later times; take a new backup"
        )),
        "the missing segment is reported as a gap:\n{text}"
    );
    let json = setup.run(&["verify", "--json"]);
    let report: Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert!(report["findings"].as_array().expect("findings").len() >= 2);
    assert_eq!(json.status.code(), Some(1));
}

fn busy_and_killed_backup(setup: &Setup) {
    let pg = &setup.pg;
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    let mut first = setup
        .agent(&["backup", "--max-rate", "1M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a slow backup");
    wait_streaming(pg);

    let second = setup.run(&["backup"]);
    assert_eq!(second.status.code(), Some(2), "a second backup is refused");
    let msg = stderr(&second);
    assert!(
        msg.contains("another backup of this cluster is running")
            && msg.contains("pitr-agent backup 20"),
        "the refusal names the running backup: {msg}"
    );

    // Let some data reach the repository, then kill the first one outright.
    std::thread::sleep(Duration::from_millis(1500));
    first.kill().expect("SIGKILL the backup");
    first.wait().expect("reap");
    let listed = setup.list();
    assert_eq!(
        listed["backups"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    let incomplete = listed["incomplete"].as_array().expect("incomplete").clone();
    assert_eq!(
        incomplete.len(),
        1,
        "the killed backup shows as incomplete: {listed}"
    );

    // Prune leaves young debris alone (it might still be running), then removes it.
    let kept = run_ok(&mut setup.agent(&["prune", "--retain-full", "1"]), "prune");
    assert!(String::from_utf8_lossy(&kept.stdout).contains("nothing to prune"));
    assert_eq!(setup.list()["incomplete"].as_array().map(Vec::len), Some(1));
    run_ok(
        &mut setup.agent(&["prune", "--retain-full", "1", "--debris-grace", "0s"]),
        "prune debris",
    );
    assert_eq!(setup.list()["incomplete"].as_array().map(Vec::len), Some(0));
    if let Some(dir) = &setup.dir {
        let id = incomplete[0].as_str().expect("id");
        assert!(
            !dir.join(format!("backups/{id}")).exists(),
            "no temp file of the killed upload is left"
        );
    }

    // The killed backup's lock died with its session: a new backup runs.
    wait_for(
        "the killed backup's session to end",
        Duration::from_secs(30),
        || (pg.sql("SELECT count(*) FROM pg_stat_progress_basebackup") == "0").then_some(()),
    );
    setup.backup();
    assert_eq!(setup.backup_ids().len(), 1);
}

#[test]
fn one_backup_at_a_time_and_a_killed_one_is_debris_on_file() {
    let Some(bin) = pg_bin() else { return };
    busy_and_killed_backup(&Setup::file(&bin));
}

#[test]
fn one_backup_at_a_time_and_a_killed_one_is_debris_on_s3() {
    let Some(bin) = pg_bin() else { return };
    let Some(setup) = Setup::s3(&bin, S3Kind::Moto, "killed") else {
        return;
    };
    busy_and_killed_backup(&setup);
}

#[test]
fn data_checksum_failures_fail_the_backup() {
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file(&bin);
    let pg = &setup.pg;
    pg.exec(
        "CREATE TABLE victim AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 2000) g",
    );
    pg.exec("CHECKPOINT");
    let rel = pg.sql("SELECT pg_relation_filepath('victim')");
    pg.stop();
    let path = pg.data.join(rel);
    let mut bytes = std::fs::read(&path).expect("read relation");
    bytes[4000] ^= 0xFF; // inside the first page's tuples
    std::fs::write(&path, &bytes).expect("corrupt a page");
    pg.start();

    let out = setup.run(&["backup"]);
    let msg = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains("checksum"),
        "the error names checksum failures: {msg}"
    );
    let listed = setup.list();
    assert_eq!(listed["backups"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        listed["incomplete"].as_array().map(Vec::len),
        Some(0),
        "a failed backup cleans up after itself: {listed}"
    );
}

#[test]
fn tablespaces_outside_the_data_directory_are_refused() {
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file(&bin);
    // The first archived segment creates the repository that `list` reads.
    setup.archive_now();
    let pg = &setup.pg;
    let location = pg.dir.path().join("ts");
    std::fs::create_dir(&location).expect("mkdir");
    RunAs::test_user().chown_tree(&location);
    pg.exec(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        location.display()
    ));
    let out = setup.run(&["backup"]);
    let msg = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{msg}");
    assert!(
        msg.contains("tablespaces outside the data directory (extra)"),
        "{msg}"
    );
    assert_eq!(setup.backup_ids().len(), 0);
}

#[test]
fn prune_keeps_what_retained_backups_need() {
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file(&bin);
    let pg = &setup.pg;
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    let mut records = Vec::new();
    for _ in 0..3 {
        pg.pgbench(&["-c", "1", "-t", "100", "-n"]);
        setup.archive_now();
        records.push(setup.backup());
        std::thread::sleep(Duration::from_millis(1100)); // distinct ids
    }
    setup.archive_now();
    let dir = setup.dir.as_ref().expect("file repository");
    let wal_files = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("wal"))
            .expect("wal dir")
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".gz")
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        names
    };
    let before = wal_files();

    let dry = run_ok(
        &mut setup.agent(&["prune", "--retain-full", "2", "--dry-run"]),
        "prune --dry-run",
    );
    let plan = String::from_utf8_lossy(&dry.stdout);
    let oldest = records[0]["id"].as_str().expect("id");
    assert!(
        plan.contains(&format!("would delete backup {oldest}")),
        "{plan}"
    );
    assert_eq!(wal_files(), before, "a dry run deletes nothing");
    assert_eq!(setup.backup_ids().len(), 3);

    // Prune while PostgreSQL keeps archiving.
    let load = {
        let (socket, port) = (pg.dir.path().to_owned(), pg.port);
        let pgbench = bin.tool("pgbench");
        std::thread::spawn(move || {
            Command::new(pgbench)
                .args(["-h", &socket.display().to_string(), "-p", &port.to_string()])
                .args(["-U", "postgres", "-c", "2", "-T", "4", "-n", "postgres"])
                .output()
                .expect("run pgbench")
        })
    };
    run_ok(&mut setup.agent(&["prune", "--retain-full", "2"]), "prune");
    assert!(load.join().expect("load").status.success());
    let last = setup.archive_now();
    assert_eq!(pg.archive_failures(), 0, "{}", pg.log());

    let ids = setup.backup_ids();
    assert_eq!(
        ids,
        vec![
            records[1]["id"].as_str().expect("id"),
            records[2]["id"].as_str().expect("id")
        ]
    );
    let floor = records[1]["first-wal"].as_str().expect("first-wal");
    let after = wal_files();
    assert!(
        after
            .iter()
            .filter(|w| w.len() == 24)
            .all(|w| w.as_str() >= floor),
        "WAL older than the oldest kept backup is gone: {after:?}"
    );
    for name in before.iter().filter(|w| w.as_str() >= floor) {
        assert!(
            after.contains(name),
            "{name}, needed by a kept backup, survived"
        );
    }
    assert!(after.contains(&last));
    let verify = setup.run(&["verify"]);
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // A window policy, with the clock moved 3 days ahead: every backup is older
    // than a 1-day window, so only the newest (which covers its start) stays.
    let later = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + Duration::from_secs(3 * 86_400),
    )
    .to_string();
    run_ok(
        &mut setup.agent(&["prune", "--retain-days", "1", "--now", &later]),
        "prune --retain-days",
    );
    assert_eq!(
        setup.backup_ids(),
        vec![records[2]["id"].as_str().expect("id")]
    );
}
