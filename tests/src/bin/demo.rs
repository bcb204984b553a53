//! `make demo`: a throwaway PostgreSQL archives its WAL through `pitr-agent
//! wal-push` into a `file://` repository; `pitr-agent backup` takes a base
//! backup; rows are committed before and after a noted time; then
//! `pgrestore --target-time ... --start` restores a new cluster to that time
//! and the rows are checked: the one before the target is there, the one
//! after is not.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime};

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
    let pg = Postgres::init(
        &bin,
        &PgOptions {
            archive_command: Some(format!("{} wal-push %p", agent().display())),
            env: vec![("PITR_REPO".into(), repo.clone())],
            conf: vec!["max_wal_size = '1GB'".into()],
            server_args: Vec::new(),
        },
    );
    println!("== pitr-agent init (once per repository; the first push claims it)");
    let out = agent_cmd(user)
        .args(["--repo", &repo, "init"])
        .output()
        .expect("run pitr-agent init");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        println!("demo: FAILED (init)");
        return ExitCode::from(1);
    }
    pg.start();
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

    println!("== pgrestore --target-time '{target}' --start (into a fresh directory)");
    let restored_dir = user_tempdir(user, "demo-restore");
    let data = restored_dir.path().join("data");
    let port = pitr_tests::free_port();
    let mut cmd = Command::new(pitr_tests::bins::pgrestore());
    user.apply(&mut cmd);
    let out = cmd
        .current_dir(std::env::temp_dir())
        .env("PG_BIN", &bin.dir)
        .env("PGUSER", "postgres")
        .args(["--repo", &repo, "--target-time", &target, "--pgdata"])
        .arg(&data)
        .args([
            "--start",
            "--target-action",
            "promote",
            "--port",
            &port.to_string(),
        ])
        .arg("--socket-dir")
        .arg(restored_dir.path())
        .output()
        .expect("run pgrestore");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let psql = |sql: &str| {
        let out = Command::new(bin.tool("psql"))
            .args([
                "-h",
                &restored_dir.path().display().to_string(),
                "-p",
                &port.to_string(),
            ])
            .args(["-U", "postgres", "-d", "postgres", "-XAtq", "-c", sql])
            .output()
            .expect("run psql");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let rows = if out.status.success() {
        psql("SELECT string_agg(label, ', ' ORDER BY at) FROM demo_marks")
    } else {
        String::new()
    };
    println!("   rows in the restored cluster: [{rows}]");
    let mut stop = Command::new(bin.tool("pg_ctl"));
    user.apply(&mut stop);
    let _ = stop
        .arg("-D")
        .arg(&data)
        .args(["-w", "-m", "fast", "stop"])
        .output();

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

    let ok = verified && rows == "before the target" && one_segment && pg.archive_failures() == 0;
    println!("{}", if ok { "demo: OK" } else { "demo: FAILED" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
