//! `make bench` (archive part): WAL archiving throughput, latency, ratio and
//! memory, against `cp`, `gzip -6`, `gzip -1`, `pigz -6` and pgBackRest, all
//! measured in this run on the same segments.
//!
//! Corpora (`PITR_BENCH_SEGMENTS`, default 200; `PITR_BENCH_RANDOM_SEGMENTS`,
//! default 60):
//! - `pgbench`: real WAL of `pgbench -i -s 50` and then TPC-B load with 30 s
//!   checkpoints, as a busy server produces it;
//! - `md5-text`: inserts of random hex text, which compresses about 2x, like
//!   much real data (pgbench flatters every gzip-based tool).
//!
//! Each tool replays PostgreSQL's archiver: for every `.ready` segment in
//! order, run the archive command once and mark it `.done` on success. Peak
//! RSS is the largest of any single archive-command process, measured by
//! `/usr/bin/time` (Debian `time`): a child forked straight from this large
//! process would inherit its high-water mark.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pitr_tests::bins::agent;
use pitr_tests::measure::{
    bench_setup, dir_size, pgbackrest_setup, run_measured, shell, size_change, table_header,
    times_faster,
};
use pitr_tests::pg::{PgBin, PgOptions, Postgres};
use pitr_tests::{RunAs, which};

const SEGMENT: u64 = 16 << 20;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let Some((bin, user, work)) = bench_setup("archive") else {
        return;
    };
    let agent_bin = agent().to_path_buf();
    let mut report = String::new();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    writeln!(
        report,
        "# WAL archiving benchmark ({cores} cores, PostgreSQL {})",
        bin.major
    )
    .ok();

    let corpora = [
        ("pgbench", env_usize("PITR_BENCH_SEGMENTS", 200)),
        ("md5-text", env_usize("PITR_BENCH_RANDOM_SEGMENTS", 60)),
    ];
    let mut level_tables = String::new();
    for (label, count) in corpora {
        let pgdata = work.path().join(format!("{label}-data"));
        eprintln!("bench: generating {count} segments of {label} WAL...");
        let segments = generate_corpus(&bin, label, count, &pgdata, user);
        eprintln!("bench: measuring on {} segments", segments.len());
        let raw = segments.len() as u64 * SEGMENT;
        writeln!(
            report,
            "\n## corpus `{label}`: {} segments, {} MiB",
            segments.len(),
            raw >> 20
        )
        .ok();

        let mut rows = Vec::new();
        let repo = |name: &str| work.path().join(format!("{label}-repo-{name}"));
        rows.push(replay(
            &pgdata,
            &segments,
            user,
            "cp + fsync (floor)",
            &repo("cp"),
            |seg, dest| {
                shell(&format!(
                    "cp {seg} {dest}/ && sync {dest}/$(basename {seg})"
                ))
            },
        ));
        rows.push(replay(&pgdata, &segments, user, "gzip -6", &repo("gz6"), |seg, dest| {
            shell(&format!("gzip -6 -c {seg} > {dest}/$(basename {seg}).gz && sync {dest}/$(basename {seg}).gz"))
        }));
        rows.push(replay(&pgdata, &segments, user, "gzip -1", &repo("gz1"), |seg, dest| {
            shell(&format!("gzip -1 -c {seg} > {dest}/$(basename {seg}).gz && sync {dest}/$(basename {seg}).gz"))
        }));
        if which("pigz").is_some() {
            rows.push(replay(&pgdata, &segments, user, "pigz -6", &repo("pigz"), |seg, dest| {
                shell(&format!("pigz -6 -c {seg} > {dest}/$(basename {seg}).gz && sync {dest}/$(basename {seg}).gz"))
            }));
        }
        if which("pgbackrest").is_some() {
            for (name, asynchronous) in [
                ("pgBackRest gz6 sync", false),
                ("pgBackRest gz6 async process-max 2", true),
            ] {
                let dir = repo(if asynchronous {
                    "pgbr-async"
                } else {
                    "pgbr-sync"
                });
                let conf = pgbackrest_setup(
                    &dir,
                    user,
                    &format!("archive-async={}\n", if asynchronous { "y" } else { "n" }),
                    &format!("pg1-path={}\n", pgdata.display()),
                    &["--no-online"],
                );
                rows.push(replay(
                    &pgdata,
                    &segments,
                    user,
                    name,
                    &dir.join("repo"),
                    |seg, _| {
                        let mut c = Command::new("pgbackrest");
                        c.arg(format!("--config={}", conf.display())).args([
                            "--stanza=bench",
                            "archive-push",
                            seg,
                        ]);
                        c
                    },
                ));
            }
        } else {
            writeln!(
                report,
                "(pgBackRest not installed: .ci/install-deps.sh --bench)"
            )
            .ok();
        }
        for parallel in [1, 2, 4] {
            let name = format!("pitr-agent gz6 parallel {parallel}");
            let dir = repo(&format!("agent-p{parallel}"));
            rows.push(replay(
                &pgdata,
                &segments,
                user,
                &name,
                &dir,
                |seg, dest| {
                    let mut c = Command::new(&agent_bin);
                    c.args(["--repo", &format!("file://{dest}"), "wal-push", seg])
                        .env("PITR_ARCHIVE_PARALLEL", parallel.to_string())
                        .env("PITR_INIT", "auto");
                    c
                },
            ));
        }
        // The same, into an encrypted repository: the cost of age.
        let key = work.path().join(format!("{label}-key.txt"));
        let generated = Command::new(&agent_bin)
            .args(["key", "generate", "--out"])
            .arg(&key)
            .output()
            .expect("run pitr-agent key generate");
        let recipient = String::from_utf8_lossy(&generated.stdout).trim().to_owned();
        rows.push(replay(
            &pgdata,
            &segments,
            user,
            "pitr-agent gz6 parallel 1, encrypted (age)",
            &repo("agent-age"),
            |seg, dest| {
                let mut c = Command::new(&agent_bin);
                c.args(["--repo", &format!("file://{dest}"), "wal-push", seg])
                    .env("PITR_ARCHIVE_PARALLEL", "1")
                    .env("PITR_ENCRYPT_TO", &recipient)
                    .env("PITR_INIT", "auto");
                c
            },
        ));
        table(&rows, raw, &mut report);
        writeln!(level_tables, "\n## corpus `{label}`").ok();
        levels_table(&pgdata, &segments, &mut level_tables);
    }
    println!("{report}\n# Compression level (picks the default){level_tables}");
}

/// One measured tool.
struct Row {
    name: String,
    total: Duration,
    latencies: Vec<Duration>,
    stored: u64,
    peak_rss_kib: i64,
    failures: usize,
}

/// Replays the archiver over `segments` with the command `make` builds.
fn replay(
    pgdata: &Path,
    segments: &[String],
    user: RunAs,
    name: &str,
    repo: &Path,
    make: impl Fn(&str, &str) -> Command,
) -> Row {
    eprintln!("bench: {name}");
    std::fs::create_dir_all(repo).expect("repo dir");
    user.chown_tree(repo);
    let status = pgdata.join("pg_wal/archive_status");
    let _ = std::fs::remove_dir_all(&status);
    std::fs::create_dir_all(&status).expect("archive_status");
    for seg in segments {
        std::fs::write(status.join(format!("{seg}.ready")), b"").expect(".ready");
    }
    let _ = std::fs::remove_dir_all(pgdata.join("pg_wal/pitr_spool"));
    user.chown_tree(&pgdata.join("pg_wal"));
    let mut latencies = Vec::with_capacity(segments.len());
    let mut peak = 0;
    let mut failures = 0;
    let started = Instant::now();
    for seg in segments {
        let rel = format!("pg_wal/{seg}");
        let mut cmd = make(&rel, repo.to_str().expect("utf-8 path"));
        cmd.current_dir(pgdata);
        let t = Instant::now();
        let (ok, rss) = run_measured(&cmd);
        latencies.push(t.elapsed());
        peak = peak.max(rss);
        if ok {
            let _ = std::fs::rename(
                status.join(format!("{seg}.ready")),
                status.join(format!("{seg}.done")),
            );
        } else {
            failures += 1;
        }
    }
    let total = started.elapsed();
    // pgBackRest's async mode returns before its background process finishes.
    std::thread::sleep(Duration::from_millis(200));
    Row {
        name: name.to_owned(),
        total,
        latencies,
        // pgBackRest names objects `<seg>-<sha1>.gz`.
        stored: dir_size(repo, |n| segments.iter().any(|s| n.starts_with(s.as_str()))),
        peak_rss_kib: peak,
        failures,
    }
}

fn table(rows: &[Row], raw: u64, out: &mut String) {
    let base = |name: &str| rows.iter().find(|r| r.name == name);
    let gz6 = base("gzip -6").map(|r| (r.total, r.stored));
    let pgbr = base("pgBackRest gz6 sync").map(|r| r.total);
    let pgbr_async = base("pgBackRest gz6 async process-max 2").map(|r| r.total);
    table_header(
        out,
        &[
            "tool",
            "total s",
            "segments/s",
            "MB/s",
            "median ms",
            "p95 ms",
            "ratio",
            "size vs gzip -6",
            "peak RSS MiB",
            "x gzip -6",
            "x pgBackRest sync",
            "x pgBackRest async",
            "failures",
        ],
    );
    for r in rows {
        let mut lat = r.latencies.clone();
        lat.sort();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 - 1.0) * p) as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        let secs = r.total.as_secs_f64();
        let speedup = |base: Option<Duration>| times_faster(base.map(|b| b.as_secs_f64()), secs);
        let size_vs = size_change(r.stored, gz6.map(|(_, s)| s));
        writeln!(
            out,
            "| {} | {:.2} | {:.1} | {:.0} | {:.1} | {:.1} | {:.2} | {} | {:.1} | {} | {} | {} | {} |",
            r.name,
            secs,
            r.latencies.len() as f64 / secs,
            raw as f64 / 1e6 / secs,
            pct(0.5),
            pct(0.95),
            raw as f64 / r.stored.max(1) as f64,
            size_vs,
            r.peak_rss_kib as f64 / 1024.0,
            speedup(gz6.map(|g| g.0)),
            speedup(pgbr),
            speedup(pgbr_async),
            r.failures
        )
        .ok();
    }
}

/// In-process zlib-rs compression per level, single thread: picks the default.
fn levels_table(pgdata: &Path, segments: &[String], out: &mut String) {
    use std::io::Write;
    let sample: Vec<Vec<u8>> = segments
        .iter()
        .step_by((segments.len() / 20).max(1))
        .map(|s| std::fs::read(pgdata.join("pg_wal").join(s)).expect("segment"))
        .collect();
    let raw: usize = sample.iter().map(Vec::len).sum();
    let gzip6: u64 = sample
        .iter()
        .map(|s| {
            let mut c = Command::new("gzip");
            c.args(["-6", "-c"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped());
            let mut child = c.spawn().expect("gzip");
            let mut stdin = child.stdin.take().expect("stdin");
            let data = s.clone();
            let writer = std::thread::spawn(move || stdin.write_all(&data));
            let out = child.wait_with_output().expect("gzip output");
            let _ = writer.join();
            out.stdout.len() as u64
        })
        .sum();
    writeln!(
        out,
        "\nzlib-rs by level on {} sampled segments (one core), against `gzip -6` = {:.2}:",
        sample.len(),
        raw as f64 / gzip6 as f64
    )
    .ok();
    writeln!(out, "\n| level | ratio | size vs gzip -6 | MB/s |").ok();
    writeln!(out, "|---|---|---|---|").ok();
    for level in [1, 2, 3, 4, 5, 6, 7, 9] {
        let t = Instant::now();
        let size: usize = sample
            .iter()
            .map(|s| {
                let d = pitr_agent::compress::Sha256Digest::of(s);
                pitr_agent::compress::gzip_with_digest(s, "x", d, level).len()
            })
            .sum();
        let secs = t.elapsed().as_secs_f64();
        writeln!(
            out,
            "| {level} | {:.2} | {:+.1} % | {:.0} |",
            raw as f64 / size as f64,
            (size as f64 / gzip6 as f64 - 1.0) * 100.0,
            raw as f64 / 1e6 / secs
        )
        .ok();
    }
}

/// Runs a cluster until it has written `count` segments of the corpus, then
/// leaves a data directory with `global/pg_control` and those segments.
fn generate_corpus(
    bin: &PgBin,
    label: &str,
    count: usize,
    pgdata: &Path,
    user: RunAs,
) -> Vec<String> {
    let pg = Postgres::start_new(
        bin,
        &PgOptions {
            archive_command: None,
            env: vec![],
            conf: vec![
                "wal_keep_size = '64GB'".into(),
                "max_wal_size = '64GB'".into(),
                "checkpoint_timeout = '30s'".into(),
                "synchronous_commit = off".into(),
            ],
            server_args: Vec::new(),
        },
    );
    let written = |pg: &Postgres| -> usize {
        std::fs::read_dir(pg.wal_dir()).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| n.len() == 24))
                .count()
        })
    };
    match label {
        "pgbench" => {
            pg.pgbench(&["-i", "-s", "50", "-q"]);
            while written(&pg) < count + 2 {
                pg.pgbench(&["-c", "4", "-j", "2", "-T", "10", "-n"]);
            }
        }
        _ => {
            let _ = pg.sql("CREATE TABLE noise (t text)");
            while written(&pg) < count + 2 {
                let _ = pg.sql(
                    "INSERT INTO noise SELECT md5(random()::text) || md5(random()::text) FROM generate_series(1, 300000)",
                );
            }
        }
    }
    let current = pg.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    pg.stop();
    let mut names: Vec<String> = std::fs::read_dir(pg.wal_dir())
        .expect("pg_wal")
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.len() == 24 && n.as_str() < current.as_str())
        .collect();
    names.sort();
    let skip = names.len().saturating_sub(count);
    let names: Vec<String> = names.into_iter().skip(skip).collect();
    std::fs::create_dir_all(pgdata.join("global")).expect("mkdir");
    std::fs::create_dir_all(pgdata.join("pg_wal")).expect("mkdir");
    std::fs::copy(
        pg.data.join("global/pg_control"),
        pgdata.join("global/pg_control"),
    )
    .expect("pg_control");
    std::fs::copy(pg.data.join("PG_VERSION"), pgdata.join("PG_VERSION")).expect("PG_VERSION");
    for n in &names {
        std::fs::rename(pg.wal_dir().join(n), pgdata.join("pg_wal").join(n)).expect("move segment");
    }
    user.chown_tree(pgdata);
    names
}
