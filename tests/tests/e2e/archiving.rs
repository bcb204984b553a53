//! Real PostgreSQL archiving through `pitr-agent wal-push`: every segment
//! arrives, decompresses to identical bytes, and an outage loses nothing.

use std::time::Duration;

use pitr_tests::bins::{agent_cmd, run_ok};
use pitr_tests::pg::{ARCHIVE_TIMEOUT, PgBin, Postgres};
use pitr_tests::s3::S3Kind;
use pitr_tests::{RunAs, user_tempdir, wait_for};

use super::{archiving_cluster, pg_bin};

/// Fetches every archived file with `wal-fetch` and compares it with pg_wal.
pub(crate) fn assert_archive_matches(pg: &Postgres, repo: &str, env: &[(String, String)]) -> usize {
    let done = pg.done_files();
    let segments: Vec<&String> = done.iter().filter(|n| n.len() == 24).collect();
    assert!(!segments.is_empty(), "nothing was archived");
    let user = RunAs::test_user();
    let scratch = user_tempdir(user, "compare");
    for name in &segments {
        let dest = scratch.path().join("RECOVERYXLOG");
        run_ok(
            agent_cmd(user)
                .envs(env.iter().cloned())
                .args(["--repo", repo, "wal-fetch", name])
                .arg(&dest)
                .env("PITR_FETCH_PREFETCH", "0"),
            &format!("wal-fetch {name}"),
        );
        let original =
            std::fs::read(pg.wal_dir().join(name)).expect("segment kept by wal_keep_size");
        assert!(
            std::fs::read(&dest).expect("fetched") == original,
            "{name} differs after a round trip"
        );
    }
    segments.len()
}

fn archive_under_load(bin: &PgBin, repo: &str, env: &[(String, String)]) {
    let pg = archiving_cluster(bin, repo, env);
    pg.pgbench(&["-i", "-s", "4", "-q"]);
    pg.pgbench(&["-c", "2", "-T", "3", "-n"]);
    let last = pg.switch_wal();
    pg.pgbench(&["-c", "2", "-T", "2", "-n"]);
    let last = last.max(pg.switch_wal());
    pg.wait_archived(&last, ARCHIVE_TIMEOUT);
    assert_eq!(
        pg.archive_failures(),
        0,
        "archive_command failed:\n{}",
        pg.log()
    );
    let count = assert_archive_matches(&pg, repo, env);
    assert!(
        count >= 5,
        "expected a busy server to produce several segments, got {count}"
    );
}

#[test]
fn archives_every_segment_to_a_file_repository() {
    let Some(bin) = pg_bin() else { return };
    let user = RunAs::test_user();
    let dir = user_tempdir(user, "repo");
    let repo = format!("file://{}/archive", dir.path().display());
    archive_under_load(&bin, &repo, &[]);
}

#[test]
fn archives_every_segment_to_s3() {
    let Some(bin) = pg_bin() else { return };
    let Some(server) = super::s3_server(S3Kind::Moto) else {
        return;
    };
    archive_under_load(&bin, &server.url("cluster-a"), &server.env());
}

#[test]
fn a_repository_outage_loses_nothing() {
    let Some(bin) = pg_bin() else { return };
    let Some(mut server) = super::s3_server(S3Kind::S3sFs) else {
        return;
    };
    let repo = server.url("outage");
    let env = [
        server.env(),
        vec![
            ("PITR_S3_MAX_ATTEMPTS".into(), "2".into()),
            ("PITR_S3_TIMEOUT".into(), "5s".into()),
        ],
    ]
    .concat();
    let pg = archiving_cluster(&bin, &repo, &env);
    let first = pg.switch_wal();
    pg.wait_archived(&first, ARCHIVE_TIMEOUT);

    server.stop();
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    let mut last = pg.switch_wal();
    for _ in 0..3 {
        last = last.max(pg.switch_wal());
    }
    wait_for(
        "archiving to fail while the store is down",
        Duration::from_secs(60),
        || (pg.archive_failures() > 0).then_some(()),
    );
    assert!(
        !pg.ready_files().is_empty(),
        "segments wait while the store is down"
    );

    server.restart();
    pg.wait_archived(&last, ARCHIVE_TIMEOUT);
    let count = assert_archive_matches(&pg, &repo, &env);
    assert!(count >= 4, "{count}");
    assert!(
        pg.log().contains("archive command failed"),
        "PostgreSQL saw the failures and retried"
    );
}

/// Issue 12's proof: `wal-push` SIGKILLed at random moments,
/// `PITR_KILL_LOOPS` times (20 here, 200 in `make test-long`), on a real
/// cluster's WAL while its own archiving is paused. Then a clean push of
/// each file, and PostgreSQL's own archiving again: every segment is in the
/// repository once and byte-identical, and after `prune` no temp file is
/// left and `verify --strict` is clean.
#[test]
fn killed_pushes_leave_nothing_a_retry_and_prune_cannot_fix() {
    use rand::Rng;
    let Some(bin) = pg_bin() else { return };
    let loops: usize = std::env::var("PITR_KILL_LOOPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (_, mut rng) = pitr_tests::seeded_rng("killed pushes");
    let setup = super::Setup::file(&bin);
    let _ = setup.backup();
    // Pause archiving: the WAL waits in .ready for the kill loop.
    let archive_command = setup.pg.sql("SHOW archive_command");
    setup.pg.exec("ALTER SYSTEM SET archive_command = ''");
    setup.pg.exec("SELECT pg_reload_conf()");
    setup.pg.exec("CREATE TABLE filler (x text)");
    for _ in 0..4 {
        setup
            .pg
            .exec("INSERT INTO filler SELECT md5(g::text) FROM generate_series(1, 20000) g");
        let _ = setup.pg.switch_wal();
    }
    let ready: Vec<String> = setup
        .pg
        .ready_files()
        .into_iter()
        .filter(|n| n.len() == 24)
        .collect();
    assert!(ready.len() >= 4, "segments waiting: {ready:?}");
    let user = RunAs::test_user();
    let push = |name: &str| {
        let mut cmd = agent_cmd(user);
        cmd.current_dir(&setup.pg.data)
            .args(["--repo", &setup.repo, "wal-push"])
            .arg(format!("pg_wal/{name}"));
        cmd
    };
    let mut killed_running = 0;
    for i in 0..loops {
        let mut child = push(&ready[i % ready.len()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn wal-push");
        std::thread::sleep(Duration::from_millis(rng.random_range(0..250)));
        if child.try_wait().expect("poll").is_none() {
            killed_running += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(killed_running > 0, "no push was killed while it ran");
    // The clean push PostgreSQL would retry with, then its own archiving.
    for name in &ready {
        run_ok(&mut push(name), &format!("wal-push {name} after the kills"));
    }
    setup.pg.exec(&format!(
        "ALTER SYSTEM SET archive_command = '{}'",
        archive_command.replace('\'', "''")
    ));
    setup.pg.exec("SELECT pg_reload_conf()");
    let last = setup.archive_now();
    assert!(
        setup.pg.archive_failures() == 0,
        "no archive failure after the kills"
    );
    assert_archive_matches(&setup.pg, &setup.repo, &[]);
    let wal = setup.dir.as_ref().expect("file repository").join("wal");
    let temp_files = || -> Vec<String> {
        std::fs::read_dir(&wal)
            .expect("wal/")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    };
    let left = temp_files();
    eprintln!(
        "killed pushes: {killed_running} of {loops} killed while running, {} temp files \
         left, archived up to {last}",
        left.len()
    );
    run_ok(
        &mut setup.agent(&["prune", "--retain-full", "1", "--debris-grace", "0s"]),
        "prune",
    );
    assert!(
        temp_files().is_empty(),
        "temp files after prune: {:?}",
        temp_files()
    );
    run_ok(
        &mut setup.agent(&["verify", "--strict"]),
        "verify --strict after prune",
    );
}
