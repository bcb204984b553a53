//! `wal-fetch`: prefetching into the spool, and exit codes that never make a
//! failure look like the end of the archive to PostgreSQL.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pitr_tests::bins::{agent_cmd, init_repo, run_ok};
use pitr_tests::fakepg::FakePgData;
use pitr_tests::faultproxy::{Fault, FaultProxy};
use pitr_tests::s3::S3Kind;
use pitr_tests::{RunAs, user_tempdir, wait_for};

#[test]
fn prefetches_the_next_segments_into_the_spool() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    let repo = format!("file://{}/repo", pg.dir.path().display());
    let names: Vec<String> = (1..=6)
        .map(|i| format!("0000000100000000000000{i:02X}"))
        .collect();
    init_repo(user, &repo, &[]);
    for (i, name) in names.iter().enumerate() {
        pg.add_segment(name, i as u64 + 10);
        run_ok(
            agent_cmd(user)
                .current_dir(pg.path())
                .args(["--repo", &repo, "wal-push", &FakePgData::rel(name)])
                .env("PITR_ARCHIVE_PARALLEL", "1"),
            "wal-push",
        );
    }

    // A data directory in archive recovery (PG_VERSION and recovery.signal).
    let restore = user_tempdir(user, "restore");
    let pg_wal = restore.path().join("pg_wal");
    std::fs::create_dir(&pg_wal).expect("mkdir");
    std::fs::write(restore.path().join("PG_VERSION"), "15\n").expect("PG_VERSION");
    std::fs::write(restore.path().join("recovery.signal"), "").expect("signal");
    user.chown_tree(&pg_wal);
    let fetch = |name: &str| {
        run_ok(
            agent_cmd(user)
                .args(["--repo", &repo, "wal-fetch", name])
                .arg(pg_wal.join("RECOVERYXLOG"))
                .env("PITR_FETCH_PREFETCH", "3"),
            "wal-fetch",
        );
        std::fs::read(pg_wal.join("RECOVERYXLOG")).expect("restored")
    };
    let spool = pg_wal.join("pitr_spool/prefetch");
    assert_eq!(
        fetch(&names[0]),
        std::fs::read(pg.path().join("pg_wal").join(&names[0])).expect("seg")
    );
    wait_for(
        "the prefetcher to spool 3 segments",
        Duration::from_secs(30),
        || {
            names[1..4]
                .iter()
                .all(|n| spool.join(n).is_file())
                .then_some(())
        },
    );
    assert!(!spool.join(&names[4]).exists(), "prefetch window respected");

    // The next call takes the spooled file (it moves out of the spool) and
    // the window slides forward.
    assert_eq!(
        fetch(&names[1]),
        std::fs::read(pg.path().join("pg_wal").join(&names[1])).expect("seg")
    );
    assert!(!spool.join(&names[1]).exists(), "taken from the spool");
    wait_for("the window to slide", Duration::from_secs(30), || {
        spool.join(&names[4]).is_file().then_some(())
    });

    // Recovery ends (PostgreSQL removes recovery.signal) while a prefetcher
    // is still to run: it empties the spool instead of filling it.
    std::fs::remove_file(restore.path().join("recovery.signal")).expect("end recovery");
    fetch(&names[2]);
    wait_for(
        "the prefetcher to empty the spool after recovery ended",
        Duration::from_secs(30),
        || (!spool.exists()).then_some(()),
    );
}

/// `wal-fetch`'s exit codes (issue 11): PostgreSQL reads 1-125 as "not in
/// the archive" and ends recovery there, so 1 means only that; a corrupt
/// object, a usage error or a store that stays down exits 128, which stops
/// recovery with FATAL instead of promoting early.
#[test]
fn exit_1_only_for_a_missing_file_and_128_for_every_failure() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    let root = pg.dir.path().join("repo");
    let repo = format!("file://{}", root.display());
    let names = ["000000010000000000000001", "000000010000000000000002"];
    init_repo(user, &repo, &[]);
    for (i, name) in names.iter().enumerate() {
        pg.add_segment(name, i as u64 + 3);
        run_ok(
            agent_cmd(user).current_dir(pg.path()).args([
                "--repo",
                &repo,
                "wal-push",
                &FakePgData::rel(name),
            ]),
            "wal-push",
        );
    }
    let restore = user_tempdir(user, "restore");
    let dest = restore.path().join("RECOVERYXLOG");
    let fetch = |name: &str, extra: &[&str]| {
        agent_cmd(user)
            .args(["--repo", &repo, "wal-fetch"])
            .args(extra)
            .arg(name)
            .arg(&dest)
            .env("PITR_FETCH_PREFETCH", "0")
            .output()
            .expect("run wal-fetch")
    };
    let out = fetch("000000010000000000000009", &[]);
    assert_eq!(out.status.code(), Some(1), "missing: {out:?}");

    // A damaged object: never handed to PostgreSQL, and recovery must stop.
    let object = root.join(format!("wal/{}.gz", names[1]));
    let mut bytes = std::fs::read(&object).expect("read the object");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&object, &bytes).expect("damage the object");
    let out = fetch(names[1], &[]);
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128), "corrupt: {msg}");
    assert!(
        msg.contains("FATAL") && msg.contains(&object.display().to_string()),
        "one line naming the object and the cause: {msg}"
    );
    assert_eq!(msg.trim().lines().count(), 1, "{msg}");
    assert!(!dest.exists(), "nothing was handed to PostgreSQL");

    let out = fetch(names[0], &["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(128), "usage error: {out:?}");
    let out = fetch(names[0], &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        std::fs::read(&dest).expect("restored"),
        std::fs::read(pg.path().join("pg_wal").join(names[0])).expect("segment")
    );
}

/// A store that answers 503 or drops connections for a while: wal-fetch
/// waits it out (PITR_FETCH_RETRY_FOR) and delivers the exact bytes; one
/// that stays down past the bound gets exit 128, naming the object.
#[test]
fn a_flaky_store_is_waited_out_and_a_dead_one_stops_recovery() {
    let Some(server) = super::s3_server(S3Kind::S3sFs) else {
        return;
    };
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    let repo = server.url("flaky");
    let name = "000000010000000000000001";
    pg.add_segment(name, 7);
    init_repo(user, &repo, &server.env());
    run_ok(
        agent_cmd(user)
            .current_dir(pg.path())
            .envs(server.env())
            .args(["--repo", &repo, "wal-push", &FakePgData::rel(name)]),
        "wal-push",
    );
    let proxy = FaultProxy::start(server.endpoint(), 11, 0.0, &[]);
    let restore = user_tempdir(user, "restore");
    let dest = restore.path().join("RECOVERYXLOG");
    let fetch = |name: &str, retry_for: &str| {
        agent_cmd(user)
            .envs(server.env())
            .env("PITR_S3_ENDPOINT", proxy.endpoint())
            .env("PITR_S3_MAX_ATTEMPTS", "1")
            .env("PITR_FETCH_RETRY_FOR", retry_for)
            .env("PITR_FETCH_PREFETCH", "0")
            .args(["--repo", &repo, "wal-fetch", name])
            .arg(&dest)
            .output()
            .expect("run wal-fetch")
    };

    proxy.outage(Some(Fault::Unavailable));
    let started = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            proxy.outage(Some(Fault::DropBefore));
            std::thread::sleep(Duration::from_secs(1));
            proxy.outage(None);
        });
        let out = fetch(name, "60s");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    assert!(started.elapsed() >= Duration::from_secs(3), "it waited");
    assert!(proxy.counts.faulted.load(Ordering::Relaxed) >= 2);
    assert_eq!(
        std::fs::read(&dest).expect("restored"),
        std::fs::read(pg.path().join("pg_wal").join(name)).expect("segment")
    );
    std::fs::remove_file(&dest).expect("clean");

    proxy.outage(Some(Fault::DropAfter));
    let out = fetch(name, "2s");
    let msg = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128), "{msg}");
    let last = msg.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("FATAL") && last.contains(name) && last.contains("s3://"),
        "the last line names the file, the object and the cause: {msg}"
    );
    assert!(msg.contains("retrying"), "the retries were logged: {msg}");
    assert!(!dest.exists());
    proxy.outage(None);
    let out = fetch("000000010000000000000002", "2s");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}
