//! `make bench` (stream part): what WAL streaming costs commits. One cluster
//! (`pgbench -i -s PITR_BENCH_STREAM_SCALE`, default 10) archiving into a
//! file:// repository on the same disk; `pgbench -c 4 -j 2 -T
//! PITR_BENCH_STREAM_SECONDS` (default 30) three times in one run:
//!
//! - stream off (archive_command only, as before streaming);
//! - async stream (`PITR_STREAM=on`, flush every 5 s);
//! - sync stream (`PITR_STREAM_SYNC=on`, `synchronous_standby_names =
//!   'pitr_agent'`): each commit waits until its WAL is in the repository.
//!
//! Prints TPS and average latency, and each as a ratio to "off".

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pitr_tests::bins::agent;
use pitr_tests::measure::{bench_setup, table_header};
use pitr_tests::pg::{PgOptions, Postgres};
use pitr_tests::{free_port, wait_for};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `(tps, average latency in ms)` from pgbench's report.
fn pgbench_figures(text: &str) -> (f64, f64) {
    let number_after = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(f64::NAN)
    };
    (number_after("tps = "), number_after("latency average = "))
}

fn main() {
    let Some((bin, user, work)) = bench_setup("stream") else {
        return;
    };
    let scale = env_u64("PITR_BENCH_STREAM_SCALE", 10);
    let seconds = env_u64("PITR_BENCH_STREAM_SECONDS", 30);
    let repo = format!("file://{}", work.path().join("pitr").display());
    let pg = Postgres::init(
        &bin,
        &PgOptions {
            archive_command: Some(format!("{} wal-push %p", agent().display())),
            env: vec![
                ("PITR_REPO".into(), repo.clone()),
                ("PITR_INIT".into(), "auto".into()),
            ],
            conf: vec![
                "max_wal_size = '2GB'".into(),
                "max_replication_slots = 4".into(),
            ],
            server_args: Vec::new(),
        },
    );
    pg.start();
    pg.pgbench(&["-i", "-s", &scale.to_string(), "-q"]);
    let _ = pg.switch_wal();

    let mut rows = Vec::new();
    for mode in ["off", "async", "sync"] {
        let names = if mode == "sync" { "pitr_agent" } else { "" };
        pg.exec(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{names}'"
        ));
        pg.exec("SELECT pg_reload_conf()");
        let daemon = (mode != "off").then(|| start_daemon(&pg, &repo, user, mode == "sync"));
        pg.exec("CHECKPOINT");
        let out = Command::new(bin.tool("pgbench"))
            .args(pg.conn_args())
            .args(["-c", "4", "-j", "2", "-T", &seconds.to_string()])
            .output()
            .expect("run pgbench");
        assert!(
            out.status.success(),
            "pgbench ({mode}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (tps, latency) = pgbench_figures(&String::from_utf8_lossy(&out.stdout));
        if let Some(mut d) = daemon {
            let _ = Command::new("kill")
                .args(["-TERM", &d.id().to_string()])
                .status();
            let _ = d.wait();
        }
        eprintln!("bench: stream {mode}: {tps:.0} tps, {latency:.2} ms");
        rows.push((mode, tps, latency));
    }

    let (base_tps, base_latency) = (rows[0].1, rows[0].2);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nCommit cost of WAL streaming: pgbench -c 4 -j 2 -T {seconds}, scale {scale}, \
         file:// repository on the same disk, archive_command on in every run\n"
    );
    table_header(
        &mut out,
        &["stream", "TPS", "x off", "latency avg (ms)", "x off"],
    );
    for (mode, tps, latency) in rows {
        let _ = writeln!(
            out,
            "| {mode} | {tps:.0} | {:.2} | {latency:.2} | {:.2} |",
            tps / base_tps,
            latency / base_latency
        );
    }
    println!("{out}");
}

fn start_daemon(pg: &Postgres, repo: &str, user: pitr_tests::RunAs, sync: bool) -> Child {
    let port = free_port();
    let mut cmd = Command::new(agent());
    user.apply(&mut cmd);
    cmd.env("PITR_REPO", repo)
        .envs(pg.client_env())
        .args(["daemon", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--backup-schedule", "", "--verify-schedule", ""])
        .args(["--rehearse-schedule", ""])
        .args([
            "--stream",
            "on",
            "--stream-sync",
            if sync { "on" } else { "off" },
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd.spawn().expect("start the daemon");
    // Streaming once the slot exists and the stream reported a position.
    wait_for("the stream to connect", Duration::from_secs(60), || {
        let state = pg.sql(
            "SELECT coalesce(string_agg(state, ','), '') FROM pg_stat_replication \
             WHERE application_name = 'pitr_agent'",
        );
        (state == "streaming").then_some(())
    });
    child
}
