//! `make bench` (tenant part): one tenant database of a shared cluster back
//! to the archive's end, three ways, measured in one run:
//!
//! - `pgrestore --database t1` (scratch cluster with only t1's files, then
//!   `pg_dump | pg_restore` into the live cluster);
//! - a whole-cluster restore, `pgrestore --pgdata D --start --target latest`
//!   (what a cluster-level tool gives: every tenant goes back);
//! - by hand, as operators do it today: `tar xzf` of the same base backup,
//!   `restore_command` = `pitr-agent wal-fetch`, start and wait for the
//!   promotion, then `pg_dump -Fc | pg_restore` into the live cluster.
//!
//! Three databases of `pgbench -i -s PITR_BENCH_TENANT_SCALE` (default 70,
//! about 1 GiB each, so one 1 GiB tenant out of 3 GiB), one backup, then a
//! minute of pgbench on t1 archived after it.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Instant;

use pitr_tests::bins::{agent, pgrestore};
use pitr_tests::measure::{bench_setup, run_measured, shell, table_header};
use pitr_tests::pg::{PgOptions, Postgres};

fn main() {
    let Some((bin, user, work)) = bench_setup("tenant") else {
        return;
    };
    let scale: u64 = std::env::var("PITR_BENCH_TENANT_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(70);
    let w = work.path();
    let repo_dir = w.join("repo");
    let repo = format!("file://{}", repo_dir.display());
    user.chown_tree(w);
    let pg = Postgres::start_new(
        &bin,
        &PgOptions {
            archive_command: Some(format!("{} wal-push %p", agent().display())),
            env: vec![
                ("PITR_REPO".into(), repo.clone()),
                ("PITR_INIT".into(), "auto".into()),
            ],
            conf: vec![
                "max_wal_size = '4GB'".into(),
                "shared_buffers = '128MB'".into(),
                "synchronous_commit = off".into(),
            ],
            server_args: Vec::new(),
        },
    );
    let db_args = |db: &str| {
        let mut a = pg.conn_args();
        a[7] = db.into();
        a
    };
    for db in ["t1", "t2", "t3"] {
        pg.exec(&format!("CREATE DATABASE {db}"));
        eprintln!("bench: pgbench -i -s {scale} {db}...");
        let out = Command::new(bin.tool("pgbench"))
            .args(db_args(db))
            .args(["-i", "-q", "-s", &scale.to_string()])
            .output()
            .expect("pgbench");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let env = pg.client_env();
    let timed = |what: &str, cmd: &mut Command| -> (f64, i64) {
        eprintln!("bench: {what}");
        cmd.envs(env.iter().cloned()).current_dir(w);
        let started = Instant::now();
        let (ok, rss) = run_measured(cmd);
        assert!(ok, "{what} failed");
        (started.elapsed().as_secs_f64(), rss)
    };
    timed(
        "pitr-agent backup",
        Command::new(agent()).args(["--repo", &repo, "backup"]),
    );
    let out = Command::new(bin.tool("pgbench"))
        .args(db_args("t1"))
        .args(["-n", "-T", "60", "-c", "2"])
        .output()
        .expect("pgbench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = pg.switch_wal();
    pg.wait_archived(&last, std::time::Duration::from_secs(300));
    let digest = |db_args: Vec<String>| {
        let out = Command::new(bin.tool("psql"))
            .args(db_args)
            .args([
                "-X",
                "-A",
                "-t",
                "-c",
                "SELECT count(*) || ' ' || sum(abalance) FROM pgbench_accounts",
            ])
            .output()
            .expect("psql");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let expected = digest(db_args("t1"));
    let cluster_bytes: u64 = pg
        .sql("SELECT sum(pg_database_size(datname)) FROM pg_database")
        .parse()
        .unwrap_or(0);
    let tenant_bytes: u64 = pg.sql("SELECT pg_database_size('t1')").parse().unwrap_or(0);

    let mut rows: Vec<(String, f64, i64)> = Vec::new();
    // 1. pgrestore --database.
    let scratch = w.join("scratch");
    std::fs::create_dir_all(&scratch).expect("mkdir");
    user.chown_tree(&scratch);
    let (s, rss) = timed(
        "pgrestore --database t1",
        Command::new(pgrestore())
            .args([
                "--repo",
                &repo,
                "--quiet",
                "--database",
                "t1",
                "--target",
                "latest",
            ])
            .args(["--as", "t1_tool", "--scratch"])
            .arg(&scratch),
    );
    assert_eq!(
        digest(db_args("t1_tool")),
        expected,
        "pgrestore --database restored t1"
    );
    rows.push((
        "pgrestore --database t1 (into the live cluster)".into(),
        s,
        rss,
    ));

    // 2. The whole cluster, as a cluster-level restore does.
    let whole = w.join("whole");
    let port = pitr_tests::free_port();
    let socket = w.join("whole-socket");
    std::fs::create_dir_all(&socket).expect("mkdir");
    user.chown_tree(&socket);
    let (s, rss) = timed(
        "pgrestore --pgdata --start (whole cluster)",
        Command::new(pgrestore())
            .args([
                "--repo", &repo, "--quiet", "--target", "latest", "--start", "--pgdata",
            ])
            .arg(&whole)
            .args(["--port", &port.to_string(), "--socket-dir"])
            .arg(&socket),
    );
    let whole_args = vec![
        "-h".into(),
        socket.display().to_string(),
        "-p".into(),
        port.to_string(),
        "-U".into(),
        "postgres".into(),
        "-d".into(),
        "t1".into(),
    ];
    assert_eq!(
        digest(whole_args),
        expected,
        "the whole cluster restored t1"
    );
    let _ = Command::new(bin.tool("pg_ctl"))
        .arg("-D")
        .arg(&whole)
        .args(["-m", "fast", "stop"])
        .output();
    rows.push((
        "pgrestore --start, whole cluster (every tenant goes back)".into(),
        s,
        rss,
    ));

    // 3. By hand: scratch restore with tar, then pg_dump | pg_restore.
    let hand = w.join("hand");
    let hand_port = pitr_tests::free_port();
    let backup_id = std::fs::read_dir(repo_dir.join("backups"))
        .expect("backups")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .expect("a backup");
    let script = format!(
        "set -e\n\
         mkdir -m 700 {hand}\n\
         tar xzf {repo_dir}/backups/{backup_id}/base.tar.gz -C {hand}\n\
         touch {hand}/recovery.signal\n\
         cat >> {hand}/postgresql.auto.conf <<EOF\n\
         restore_command = 'PITR_REPO={repo} {agent} wal-fetch %f %p'\n\
         archive_mode = off\n\
         EOF\n\
         {pg_ctl} -D {hand} -w -t 3600 -o '-p {hand_port} -k {socket} -c listen_addresses=' -l {hand}/log start\n\
         until [ \"$({psql} -h {socket} -p {hand_port} -U postgres -d postgres -XAtc 'SELECT pg_is_in_recovery()')\" = f ]; do sleep 0.2; done\n\
         {psql} -h {pghost} -p {pgport} -U postgres -d postgres -Xqc 'CREATE DATABASE t1_hand'\n\
         {pg_dump} -Fc -h {socket} -p {hand_port} -U postgres -d t1 | {pg_restore} -h {pghost} -p {pgport} -U postgres -d t1_hand\n\
         {pg_ctl} -D {hand} -m fast stop\n",
        hand = hand.display(),
        repo_dir = repo_dir.display(),
        agent = agent().display(),
        pg_ctl = bin.tool("pg_ctl").display(),
        psql = bin.tool("psql").display(),
        pg_dump = bin.tool("pg_dump").display(),
        pg_restore = bin.tool("pg_restore").display(),
        socket = socket.display(),
        pghost = pg.dir.path().display(),
        pgport = pg.port,
    );
    let (s, rss) = timed(
        "by hand: tar xzf, replay, pg_dump | pg_restore",
        &mut shell(&script),
    );
    assert_eq!(
        digest(db_args("t1_hand")),
        expected,
        "the hand-run restore restored t1"
    );
    rows.push((
        "by hand: tar xzf + replay + pg_dump \\| pg_restore".into(),
        s,
        rss,
    ));

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut report = String::new();
    writeln!(
        report,
        "# Tenant restore benchmark ({cores} cores): one {:.2} GiB tenant of a {:.2} GiB \
         cluster (3 x pgbench -s {scale}), backup + 60 s of pgbench WAL on it",
        tenant_bytes as f64 / f64::from(1 << 30),
        cluster_bytes as f64 / f64::from(1 << 30)
    )
    .ok();
    table_header(
        &mut report,
        &[
            "how",
            "seconds",
            "x pgrestore --database time",
            "peak RSS MiB",
        ],
    );
    let base = rows[0].1;
    for (how, s, rss) in &rows {
        writeln!(
            report,
            "| {how} | {s:.1} | {:.2} | {} |",
            s / base,
            if *rss < 0 {
                "-".to_owned()
            } else {
                format!("{:.0}", *rss as f64 / 1024.0)
            }
        )
        .ok();
    }
    println!("{report}");
}
