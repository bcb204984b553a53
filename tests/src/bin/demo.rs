//! `make demo`: a throwaway PostgreSQL archives its WAL through `pitr-agent
//! wal-push` into a `file://` repository, under pgbench load; then every
//! archived segment is fetched back and compared byte for byte, and one is
//! restored by hand with plain `gunzip`, as an operator without our tool would.

use std::process::{Command, ExitCode};
use std::time::Instant;

use pitr_tests::bins::{agent, agent_cmd};
use pitr_tests::pg::{ARCHIVE_TIMEOUT, PgBin, PgOptions, Postgres};
use pitr_tests::{RunAs, user_tempdir};

fn main() -> ExitCode {
    let Some(bin) = PgBin::find() else {
        eprintln!(
            "demo: no PostgreSQL server found; install it with `sudo apt-get install postgresql-15` \
             (make demo does this when run as root) or set PG_BIN"
        );
        return ExitCode::from(2);
    };
    let user = RunAs::test_user();
    let dir = user_tempdir(user, "demo");
    let repo_dir = dir.path().join("wal_archive");
    let repo = format!("file://{}", repo_dir.display());
    println!(
        "== PostgreSQL {} in a temp dir, archive_command = 'pitr-agent wal-push %p'",
        bin.major
    );
    println!("   repository: {repo}");
    let pg = Postgres::start_new(
        &bin,
        &PgOptions {
            archive_command: Some(format!("{} wal-push %p", agent().display())),
            env: vec![("PITR_REPO".into(), repo.clone())],
            conf: vec![
                "wal_keep_size = '4GB'".into(),
                "max_wal_size = '4GB'".into(),
            ],
        },
    );
    println!("== pgbench: initialise scale 10, then 5 s of TPC-B load");
    let started = Instant::now();
    pg.pgbench(&["-i", "-s", "10", "-q"]);
    pg.pgbench(&["-c", "2", "-T", "5", "-n"]);
    let last = pg.switch_wal();
    pg.wait_archived(&last, ARCHIVE_TIMEOUT);
    let failures = pg.archive_failures();
    let done: Vec<String> = pg
        .done_files()
        .into_iter()
        .filter(|n| n.len() == 24)
        .collect();
    let stored: u64 = std::fs::read_dir(repo_dir.join("wal"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let raw = done.len() as u64 * 16 * 1024 * 1024;
    println!(
        "   archived {} segments in {:.1}s: {} MiB of WAL stored as {:.1} MiB (ratio {:.1}); pg_stat_archiver.failed_count = {failures}",
        done.len(),
        started.elapsed().as_secs_f64(),
        raw >> 20,
        stored as f64 / 1048576.0,
        raw as f64 / stored.max(1) as f64
    );

    println!("== wal-fetch every archived segment and compare with pg_wal");
    let scratch = user_tempdir(user, "demo-fetch");
    let mut identical = 0;
    for name in &done {
        let dest = scratch.path().join("RECOVERYXLOG");
        let out = agent_cmd(user)
            .args(["--repo", &repo, "wal-fetch", name])
            .arg(&dest)
            .env("PITR_FETCH_PREFETCH", "0")
            .output()
            .expect("run wal-fetch");
        let same = out.status.success()
            && std::fs::read(&dest).ok() == std::fs::read(pg.wal_dir().join(name)).ok();
        if same {
            identical += 1;
        } else {
            println!(
                "   MISMATCH {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    println!("   {identical}/{} byte-identical", done.len());

    let first = &done[0];
    let by_hand = Command::new("gunzip")
        .arg("-c")
        .arg(repo_dir.join("wal").join(format!("{first}.gz")))
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let hand_ok = std::fs::read(pg.wal_dir().join(first)).ok() == Some(by_hand);
    println!(
        "== without pitr-agent: gunzip -c {}/wal/{first}.gz > {first}  -> {}",
        repo_dir.display(),
        if hand_ok { "identical" } else { "DIFFERENT" }
    );
    println!(
        "   point-in-time restore (pgrestore) arrives with the restore issue; this demo will then restore too"
    );

    let ok = failures == 0 && identical == done.len() && hand_ok && !done.is_empty();
    println!("{}", if ok { "demo: OK" } else { "demo: FAILED" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
