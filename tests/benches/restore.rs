//! `make bench` (restore part): time from an empty directory to a promoted,
//! queryable cluster at a target LSN, after a base backup of `pgbench -i -s
//! PITR_BENCH_SCALE` (default 100) and `PITR_BENCH_SEGMENTS` (default 110)
//! segments of pgbench WAL archived after it. Measured in one run:
//!
//! - `pgrestore --start` (pitr-agent's backup and archive);
//! - `pgbackrest restore` + `archive-get` (gz 6, async, process-max 2);
//! - `tar xzf` of pitr-agent's `base.tar.gz` + `gunzip` as restore_command;
//! - the floor: `tar xf` of an uncompressed `pg_basebackup` tar + `cp`.
//!
//! Every source writes to the same disk, and every restore replays the same
//! WAL with the same PostgreSQL settings.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pitr_tests::bins::{agent, pgrestore};
use pitr_tests::measure::{bench_setup, pgbackrest_setup, shell, table_header, times_faster};
use pitr_tests::pg::{PgBin, PgOptions, Postgres};
use pitr_tests::{RunAs, free_port, wait_for, which};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let Some((bin, user, work)) = bench_setup("restore") else {
        return;
    };
    if which("pgbackrest").is_none() {
        eprintln!("bench: pgbackrest is missing; run .ci/install-deps.sh --bench");
        std::process::exit(2);
    }
    let scale = env_u64("PITR_BENCH_SCALE", 100);
    let segments = env_u64("PITR_BENCH_SEGMENTS", 110);
    let w = work.path();
    let repo_dir = w.join("pitr");
    let repo = format!("file://{}", repo_dir.display());
    let floor_wal = w.join("floor-wal");
    std::fs::create_dir_all(&floor_wal).expect("mkdir");
    user.chown_tree(w);

    // One archive_command feeds all three archives; restored clusters do not
    // have BENCH_ARCHIVE set, so they archive nothing and pollute nothing.
    let pg = Postgres::init(
        &bin,
        &PgOptions {
            archive_command: Some(String::new()),
            env: vec![
                ("PITR_REPO".into(), repo.clone()),
                ("PITR_INIT".into(), "auto".into()),
                ("BENCH_ARCHIVE".into(), "1".into()),
            ],
            conf: vec![
                "max_wal_size = '8GB'".into(),
                "shared_buffers = '128MB'".into(),
                // WAL like a busy server's: frequent checkpoints mean full-page
                // images; asynchronous commit lets two cores produce it quickly.
                "checkpoint_timeout = '30s'".into(),
                "synchronous_commit = off".into(),
            ],
            server_args: Vec::new(),
        },
    );
    let pgbr = w.join("pgbackrest");
    let conf = pgbackrest_setup(
        &pgbr,
        user,
        "archive-async=y\narchive-get-queue-max=1GiB\n",
        &format!(
            "pg1-path={}\npg1-socket-path={}\npg1-port={}\npg1-user=postgres\n",
            pg.data.display(),
            pg.dir.path().display(),
            pg.port
        ),
        &["--no-online"],
    );
    let archive_command = format!(
        "[ -z \"$BENCH_ARCHIVE\" ] || ({agent} wal-push %p && pgbackrest --config={conf} \
         --stanza=bench archive-push %p && cp %p {floor}/%f)",
        agent = agent().display(),
        conf = conf.display(),
        floor = floor_wal.display()
    );
    let auto = pg.data.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&auto).expect("read conf").replace(
        "archive_command = ''",
        &format!(
            "archive_command = '{}'",
            archive_command.replace('\'', "''")
        ),
    );
    std::fs::write(&auto, text).expect("write conf");
    pg.start();

    eprintln!("bench: pgbench -i -s {scale}...");
    pg.pgbench(&["-i", "-s", &scale.to_string(), "-q"]);
    pg.exec("CHECKPOINT");
    let env = pg.client_env();
    let run = |what: &str, cmd: &mut Command| {
        eprintln!("bench: {what}");
        cmd.envs(env.iter().cloned()).current_dir(w);
        user.apply(cmd);
        let out = cmd.output().expect("spawn");
        assert!(
            out.status.success(),
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        "pitr-agent backup",
        Command::new(agent()).args(["--repo", &repo, "backup"]),
    );
    run(
        "pgbackrest backup",
        Command::new("pgbackrest")
            .arg(format!("--config={}", conf.display()))
            .args(["--stanza=bench", "--type=full", "--start-fast", "backup"]),
    );
    let floor_base = w.join("floor-base");
    run(
        "pg_basebackup -Ft (floor)",
        Command::new(bin.tool("pg_basebackup"))
            .args(["-Ft", "-X", "fetch", "-c", "fast", "-D"])
            .arg(&floor_base),
    );

    let start_lsn = pg.sql("SELECT pg_current_wal_lsn()");
    let wanted = segments * 16 * 1024 * 1024;
    loop {
        let written: u64 = pg
            .sql(&format!(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '{start_lsn}')::bigint"
            ))
            .parse()
            .expect("a number");
        if written >= wanted {
            break;
        }
        eprintln!(
            "bench: pgbench load, {} of {} MiB of WAL",
            written >> 20,
            wanted >> 20
        );
        pg.pgbench(&["-c", "4", "-j", "2", "-T", "10", "-n"]);
    }
    let target = pg.sql("SELECT pg_current_wal_lsn()");
    let last = pg.switch_wal();
    pg.wait_archived(&last, Duration::from_secs(1800));
    let replayed = pg.sql(&format!(
        "SELECT pg_wal_lsn_diff('{target}', '{start_lsn}')::bigint / 16777216"
    ));
    pg.stop();
    let backup_id = std::fs::read_dir(repo_dir.join("backups"))
        .expect("backups")
        .flatten()
        .next()
        .expect("one backup")
        .file_name()
        .to_string_lossy()
        .into_owned();

    let mut rows: Vec<(String, Duration)> = Vec::new();
    // pgrestore: one command, timed to the promoted cluster.
    {
        let (dir, socket, port) = fresh(w, "r-pitr", user);
        let t = Instant::now();
        run(
            "pgrestore --start",
            Command::new(pgrestore())
                .args(["--repo", &repo, "--quiet", "--target-lsn", &target])
                .args([
                    "--target-action",
                    "promote",
                    "--start",
                    "--port",
                    &port.to_string(),
                ])
                .arg("--pgdata")
                .arg(&dir)
                .arg("--socket-dir")
                .arg(&socket),
        );
        wait_promoted(&bin, &socket, port);
        rows.push(("pgrestore --start".into(), t.elapsed()));
        stop(&bin, &dir, user);
    }
    // pitr-agent rehearse on the same repository and the same WAL (all of
    // it: `--target latest`): its restore plus replay next to pgrestore's,
    // and its checks (pg_amcheck, every database) apart.
    let rehearsal_note = {
        let (scratch, _, _) = fresh(w, "r-rehearse", user);
        std::fs::create_dir_all(&scratch).expect("mkdir");
        user.chown_tree(&scratch);
        eprintln!("bench: pitr-agent rehearse");
        let t = Instant::now();
        let mut cmd = Command::new(agent());
        cmd.args(["--repo", &repo, "rehearse", "--json", "--rehearse-dir"])
            .arg(&scratch)
            .envs(env.iter().cloned())
            .env("PG_BIN", &bin.dir)
            .current_dir(w);
        user.apply(&mut cmd);
        let out = cmd.output().expect("spawn");
        let total = t.elapsed();
        let record: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        assert!(
            out.status.success() && record["ok"] == true,
            "pitr-agent rehearse: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let restore = record["restore-seconds"].as_f64().unwrap_or(f64::NAN);
        let checks = record["phases"]["checks"].as_f64().unwrap_or(f64::NAN);
        rows.push((
            "pitr-agent rehearse (restore + replay)".into(),
            Duration::from_secs_f64(restore),
        ));
        format!(
            "\npitr-agent rehearse, all of it: {:.1} s (restore + replay {restore:.1} s, \
             checks {checks:.1} s: pg_amcheck of every database and a connection to each)\n",
            total.as_secs_f64()
        )
    };
    // pgBackRest: restore, then start; archive-get runs async, process-max 2.
    {
        let (dir, socket, port) = fresh(w, "r-pgbr", user);
        let t = Instant::now();
        run(
            "pgbackrest restore",
            Command::new("pgbackrest")
                .arg(format!("--config={}", conf.display()))
                .arg(format!("--pg1-path={}", dir.display()))
                .args([
                    "--stanza=bench",
                    "--type=lsn",
                    &format!("--target={target}"),
                ])
                .args(["--target-action=promote", "restore"]),
        );
        start(&bin, &dir, &socket, port, user);
        wait_promoted(&bin, &socket, port);
        rows.push((
            "pgbackrest restore + archive-get (async, process-max 2)".into(),
            t.elapsed(),
        ));
        stop(&bin, &dir, user);
    }
    // By hand: tar xzf + gunzip.
    {
        let (dir, socket, port) = fresh(w, "r-gunzip", user);
        let t = Instant::now();
        let tar_gz = repo_dir.join(format!("backups/{backup_id}/base.tar.gz"));
        run(
            "tar xzf",
            &mut shell(&format!(
                "tar xzf {} -C {}",
                tar_gz.display(),
                dir.display()
            )),
        );
        recovery_conf(
            &dir,
            &format!("gunzip -c {}/wal/%f.gz > %p", repo_dir.display()),
            &target,
        );
        start(&bin, &dir, &socket, port, user);
        wait_promoted(&bin, &socket, port);
        rows.push(("tar xzf + gunzip restore_command".into(), t.elapsed()));
        stop(&bin, &dir, user);
    }
    // The floor: no decompression anywhere.
    {
        let (dir, socket, port) = fresh(w, "r-floor", user);
        let t = Instant::now();
        run(
            "tar xf",
            &mut shell(&format!(
                "tar xf {}/base.tar -C {}",
                floor_base.display(),
                dir.display()
            )),
        );
        recovery_conf(&dir, &format!("cp {}/%f %p", floor_wal.display()), &target);
        start(&bin, &dir, &socket, port, user);
        wait_promoted(&bin, &socket, port);
        rows.push(("floor: tar xf + cp restore_command".into(), t.elapsed()));
        stop(&bin, &dir, user);
    }

    let mut report = String::new();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    writeln!(
        report,
        "# Restore benchmark ({cores} cores, PostgreSQL {}, pgbench scale {scale}, {replayed} segments replayed to LSN {target})",
        bin.major
    )
    .ok();
    let pgbr_time = rows
        .iter()
        .find(|r| r.0.starts_with("pgbackrest"))
        .map(|r| r.1.as_secs_f64());
    let floor_time = rows
        .iter()
        .find(|r| r.0.starts_with("floor"))
        .map(|r| r.1.as_secs_f64());
    table_header(
        &mut report,
        &[
            "tool",
            "seconds to a promoted cluster",
            "x pgBackRest",
            "x floor",
        ],
    );
    for (name, time) in &rows {
        let secs = time.as_secs_f64();
        writeln!(
            report,
            "| {name} | {secs:.1} | {} | {} |",
            times_faster(pgbr_time, secs),
            times_faster(floor_time, secs)
        )
        .ok();
    }
    report.push_str(&rehearsal_note);
    println!("{report}");
}

/// A missing data directory, a socket directory and a port.
fn fresh(work: &Path, label: &str, user: RunAs) -> (std::path::PathBuf, std::path::PathBuf, u16) {
    let base = work.join(label);
    std::fs::create_dir_all(&base).expect("mkdir");
    user.chown_tree(&base);
    let dir = base.join("data");
    if label != "r-pitr" {
        std::fs::create_dir(&dir).expect("mkdir data");
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod");
        user.chown_tree(&dir);
    }
    (dir, base, free_port())
}

fn recovery_conf(dir: &Path, restore_command: &str, target: &str) {
    let conf = dir.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
    text.push_str(&format!(
        "restore_command = '{}'\nrecovery_target_lsn = '{target}'\nrecovery_target_action = 'promote'\n",
        restore_command.replace('\'', "''")
    ));
    std::fs::write(&conf, text).expect("write conf");
    std::fs::write(dir.join("recovery.signal"), "").expect("signal");
}

fn start(bin: &PgBin, dir: &Path, socket: &Path, port: u16, user: RunAs) {
    let mut cmd = Command::new(bin.tool("pg_ctl"));
    cmd.arg("-D")
        .arg(dir)
        .arg("-l")
        .arg(socket.join("log"))
        .arg("-o")
        .arg(format!(
            "-p {port} -c unix_socket_directories='{}' -c listen_addresses=''",
            socket.display()
        ))
        .args(["-W", "start"]);
    user.chown_tree(dir);
    user.apply(&mut cmd);
    let out = cmd.output().expect("pg_ctl");
    assert!(
        out.status.success(),
        "pg_ctl start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_promoted(bin: &PgBin, socket: &Path, port: u16) {
    wait_for("recovery to finish", Duration::from_secs(1800), || {
        let out = Command::new(bin.tool("psql"))
            .args(["-h", &socket.display().to_string(), "-p", &port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-XAtq",
                "-c",
                "SELECT pg_is_in_recovery()",
            ])
            .output()
            .ok()?;
        (String::from_utf8_lossy(&out.stdout).trim() == "f").then_some(())
    });
}

fn stop(bin: &PgBin, dir: &Path, user: RunAs) {
    let mut cmd = Command::new(bin.tool("pg_ctl"));
    cmd.arg("-D")
        .arg(dir)
        .args(["-w", "-m", "immediate", "stop"]);
    user.apply(&mut cmd);
    let _ = cmd.output();
    let _ = std::fs::remove_dir_all(dir);
}
