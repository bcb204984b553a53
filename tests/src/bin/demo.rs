//! `make demo`: a throwaway PostgreSQL archives its WAL through `pitr-agent
//! wal-push` into a `file://` repository; `pitr-agent backup` takes a base
//! backup; rows are committed before and after a noted time; then the backup
//! is restored to that time by hand (`tar xzf` + `restore_command =
//! 'pitr-agent wal-fetch %f %p'` + `recovery_target_time`) and the rows are
//! checked: the one before the target is there, the one after is not.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

use pitr_tests::bins::{agent, agent_cmd};
use pitr_tests::pg::{ARCHIVE_TIMEOUT, PgBin, PgOptions, Postgres};
use pitr_tests::{RunAs, user_tempdir, wait_for};

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
            conf: vec!["max_wal_size = '1GB'".into()],
        },
    );
    let agent_run = |args: &[&str]| {
        let out = agent_cmd(user)
            .envs(pg.client_env())
            .args(["--repo", &repo])
            .args(args)
            .output()
            .expect("run pitr-agent");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        out.status.code()
    };

    println!("== pgbench: initialise scale 10, then 3 s of TPC-B load");
    pg.pgbench(&["-i", "-s", "10", "-q"]);
    pg.pgbench(&["-c", "2", "-T", "3", "-n"]);

    println!("== pitr-agent backup");
    let started = Instant::now();
    if agent_run(&["backup"]) != Some(0) {
        println!("demo: FAILED (backup)");
        return ExitCode::from(1);
    }
    println!("   took {:.1}s", started.elapsed().as_secs_f64());

    println!("== commit a row, note the time, commit another row");
    pg.exec("CREATE TABLE demo_marks (label text, at timestamptz DEFAULT clock_timestamp())");
    pg.exec("INSERT INTO demo_marks (label) VALUES ('before the target')");
    std::thread::sleep(Duration::from_millis(1100));
    // PostgreSQL's own notation: recovery_target_time rejects the 'T'/'Z' forms.
    let target = humantime::format_rfc3339_millis(SystemTime::now())
        .to_string()
        .replace('T', " ")
        .replace('Z', "+00");
    std::thread::sleep(Duration::from_millis(1100));
    pg.exec("INSERT INTO demo_marks (label) VALUES ('after the target')");
    pg.pgbench(&["-c", "2", "-T", "2", "-n"]);
    let last = pg.switch_wal();
    pg.wait_archived(&last, ARCHIVE_TIMEOUT);
    println!("   target time: {target}; WAL archived up to {last}");

    println!("== pitr-agent list");
    agent_run(&["list"]);
    println!("== pitr-agent verify");
    let verified = agent_run(&["verify"]) == Some(0);

    println!("== restore by hand to the target: tar xzf, restore_command, recovery_target_time");
    let listing = agent_cmd(user)
        .args(["--repo", &repo, "list", "--json"])
        .output()
        .expect("list");
    let listing: serde_json::Value = serde_json::from_slice(&listing.stdout).expect("JSON");
    let id = listing["backups"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let tar_gz = repo_dir.join(format!("backups/{id}/base.tar.gz"));
    println!("   tar xzf {}", tar_gz.display());
    let restored = Postgres::from_backup_tar(&bin, &tar_gz);
    let conf = restored.data.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
    let recovery = format!(
        "restore_command = '{} --repo {repo} wal-fetch %f %p'\n\
         recovery_target_time = '{target}'\nrecovery_target_action = 'promote'\n",
        agent().display()
    );
    print!(
        "{}",
        recovery
            .lines()
            .map(|l| format!("   {l}\n"))
            .collect::<String>()
    );
    text.push_str(&recovery);
    std::fs::write(&conf, text).expect("write recovery settings");
    std::fs::write(restored.data.join("recovery.signal"), "").expect("recovery.signal");
    user.chown_tree(&restored.data);
    let started = Instant::now();
    restored.start();
    wait_for("recovery to reach the target", ARCHIVE_TIMEOUT, || {
        (restored.sql("SELECT pg_is_in_recovery()") == "f").then_some(())
    });
    let rows = restored.sql("SELECT string_agg(label, ', ' ORDER BY at) FROM demo_marks");
    let reached = restored.sql("SELECT max(at) FROM demo_marks");
    println!(
        "   recovered and promoted in {:.1}s; rows: [{rows}] (last committed at {reached})",
        started.elapsed().as_secs_f64()
    );

    let one_segment = Command::new("gunzip")
        .arg("-t")
        .arg(repo_dir.join("wal").join(format!("{last}.gz")))
        .status()
        .is_ok_and(|s| s.success());
    println!(
        "== without pitr-agent: gunzip -c {}/wal/{last}.gz > {last} -> {}",
        repo_dir.display(),
        if one_segment { "valid gzip" } else { "INVALID" }
    );
    println!("   (one command, `pgrestore --target-time`, arrives with the restore issue)");

    let ok = verified && rows == "before the target" && one_segment && pg.archive_failures() == 0;
    println!("{}", if ok { "demo: OK" } else { "demo: FAILED" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
