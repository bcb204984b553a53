//! `make bench` (backup part): base-backup throughput, stored size and peak
//! memory of `pitr-agent backup` against `pg_basebackup -Ft -z`,
//! `pg_basebackup -Ft -D - | pigz -6` and `pgbackrest backup` (gz level 6,
//! process-max 2), all measured in this run on the same database.
//!
//! The database is `pgbench -i -s PITR_BENCH_SCALE` (default 100, about 1.5
//! GB). Every tool writes to the same local disk and syncs its output. Peak
//! RSS is that of the whole command (pipelines included), by `/usr/bin/time`.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pitr_tests::bins::agent;
use pitr_tests::measure::{
    bench_setup, dir_size, pgbackrest_setup, run_measured, shell, size_change, table_header,
    times_faster,
};
use pitr_tests::pg::{PgOptions, Postgres};
use pitr_tests::which;

struct Row {
    name: String,
    time: Duration,
    stored: u64,
    peak_rss_kib: i64,
    ok: bool,
}

fn main() {
    let Some((bin, user, work)) = bench_setup("backup") else {
        return;
    };
    let scale: u32 = std::env::var("PITR_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let pg = Postgres::start_new(
        &bin,
        &PgOptions {
            // Archiving is measured by the archive bench; keep it out of this one.
            archive_command: Some("true".into()),
            env: vec![],
            conf: vec![
                "max_wal_size = '4GB'".into(),
                "shared_buffers = '128MB'".into(),
            ],
            server_args: Vec::new(),
        },
    );
    eprintln!("bench: pgbench -i -s {scale}...");
    pg.pgbench(&["-i", "-s", &scale.to_string(), "-q"]);
    pg.exec("CHECKPOINT");
    let db_size = pg.sql("SELECT pg_size_pretty(sum(pg_database_size(oid))) FROM pg_database");
    let env = pg.client_env();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let run = |name: &str, mut cmd: Command, out_dir: &Path| -> Row {
        eprintln!("bench: {name}");
        std::fs::create_dir_all(out_dir).expect("out dir");
        user.chown_tree(out_dir);
        cmd.envs(env.iter().cloned()).current_dir(work.path());
        let started = Instant::now();
        let (ok, rss) = run_measured(&cmd);
        let time = started.elapsed();
        Row {
            name: name.to_owned(),
            time,
            stored: dir_size(out_dir, |_| true),
            peak_rss_kib: rss,
            ok,
        }
    };
    let mut rows = Vec::new();
    let pb = bin.tool("pg_basebackup");
    let pb = pb.display();

    for (name, flags, dir) in [
        ("pg_basebackup -Ft (no compression)", "", "plain"),
        ("pg_basebackup -Ft -z", "-z", "z"),
    ] {
        let dir = work.path().join(dir);
        let script = format!(
            "{pb} -Ft {flags} -X fetch -c fast -D {}",
            dir.join("b").display()
        );
        rows.push(run(name, shell(&script), &dir));
        let _ = std::fs::remove_dir_all(&dir); // keep the disk for the others
    }

    if which("pigz").is_some() {
        let dir = work.path().join("pigz");
        rows.push(run(
            "pg_basebackup -D - | pigz -6",
            shell(&format!(
                "set -e; {pb} -Ft -X fetch -c fast -D - | pigz -6 > {out}; sync {out}",
                out = dir.join("base.tar.gz").display()
            )),
            &dir,
        ));
    }

    if which("pgbackrest").is_some() {
        let dir = work.path().join("pgbackrest");
        let conf = pgbackrest_setup(
            &dir,
            user,
            "repo1-retention-full=1\n",
            &format!(
                "pg1-path={}\npg1-socket-path={}\npg1-port={}\npg1-user=postgres\n",
                pg.data.display(),
                pg.dir.path().display(),
                pg.port
            ),
            &[],
        );
        let mut c = Command::new("pgbackrest");
        c.arg(format!("--config={}", conf.display())).args([
            "--stanza=bench",
            "--type=full",
            "--start-fast",
            "--no-archive-check",
            "backup",
        ]);
        rows.push(run(
            "pgbackrest backup gz6 process-max 2",
            c,
            &dir.join("repo"),
        ));
    }

    let dir = work.path().join("pitr");
    let repo = format!("file://{}", dir.display());
    let mut c = Command::new(agent());
    c.args(["--repo", &repo, "backup", "--json"])
        .env("PITR_INIT", "auto");
    rows.push(run(
        &format!("pitr-agent backup ({cores} threads)"),
        c,
        &dir,
    ));
    let raw = record_raw_bytes(&dir).unwrap_or(0);
    let mut c = Command::new(agent());
    c.args([
        "--repo",
        &format!("file://{}", work.path().join("pitr1").display()),
    ])
    .args(["backup", "--compress-threads", "1"])
    .env("PITR_INIT", "auto");
    rows.push(run(
        "pitr-agent backup (1 thread)",
        c,
        &work.path().join("pitr1"),
    ));

    let mut report = String::new();
    writeln!(
        report,
        "# Base backup benchmark ({cores} cores, PostgreSQL {}, pgbench scale {scale}: {db_size}, tar {} MiB)",
        bin.major,
        raw >> 20
    )
    .ok();
    table(&rows, raw, &mut report);
    println!("{report}");
}

fn table(rows: &[Row], raw: u64, out: &mut String) {
    let find = |prefix: &str| rows.iter().find(|r| r.name.starts_with(prefix) && r.ok);
    let z = find("pg_basebackup -Ft -z");
    let pigz = find("pg_basebackup -D - | pigz");
    let pgbr = find("pgbackrest");
    table_header(
        out,
        &[
            "tool",
            "s",
            "MB/s",
            "stored MiB",
            "size vs -z",
            "peak RSS MiB",
            "x pg_basebackup -z",
            "x pg_basebackup pigz",
            "x pgBackRest",
            "ok",
        ],
    );
    for r in rows {
        let secs = r.time.as_secs_f64();
        let x = |base: Option<&Row>| times_faster(base.map(|b| b.time.as_secs_f64()), secs);
        let size_vs = size_change(r.stored, z.map(|b| b.stored));
        writeln!(
            out,
            "| {} | {:.1} | {:.0} | {:.1} | {} | {:.1} | {} | {} | {} | {} |",
            r.name,
            secs,
            raw as f64 / 1e6 / secs,
            r.stored as f64 / 1048576.0,
            size_vs,
            r.peak_rss_kib as f64 / 1024.0,
            x(z),
            x(pigz),
            x(pgbr),
            if r.ok { "yes" } else { "FAILED" }
        )
        .ok();
    }
}

/// The raw tar size from the backup.json under `dir`.
fn record_raw_bytes(dir: &Path) -> Option<u64> {
    let backup = std::fs::read_dir(dir.join("backups"))
        .ok()?
        .flatten()
        .next()?;
    let text = std::fs::read_to_string(backup.path().join("backup.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["raw-bytes"].as_u64()
}
