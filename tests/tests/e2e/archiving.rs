//! Real PostgreSQL archiving through `pitr-agent wal-push`: every segment
//! arrives, decompresses to identical bytes, and an outage loses nothing.

use std::time::Duration;

use pitr_tests::bins::{agent_cmd, run_ok};
use pitr_tests::pg::{ARCHIVE_TIMEOUT, PgBin, Postgres};
use pitr_tests::s3::S3Kind;
use pitr_tests::{RunAs, user_tempdir, wait_for};

use super::{archiving_cluster, pg_bin};

/// Fetches every archived file with `wal-fetch` and compares it with pg_wal.
fn assert_archive_matches(pg: &Postgres, repo: &str, env: &[(String, String)]) -> usize {
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
