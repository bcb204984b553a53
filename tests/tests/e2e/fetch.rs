//! `wal-fetch` prefetching: the detached prefetcher fills the spool with the
//! next segments, and later calls take them from there.

use std::time::Duration;

use pitr_tests::bins::{agent_cmd, run_ok};
use pitr_tests::fakepg::FakePgData;
use pitr_tests::{RunAs, user_tempdir, wait_for};

#[test]
fn prefetches_the_next_segments_into_the_spool() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    let repo = format!("file://{}/repo", pg.dir.path().display());
    let names: Vec<String> = (1..=6)
        .map(|i| format!("0000000100000000000000{i:02X}"))
        .collect();
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

    let restore = user_tempdir(user, "restore");
    let pg_wal = restore.path().join("pg_wal");
    std::fs::create_dir(&pg_wal).expect("mkdir");
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
}
