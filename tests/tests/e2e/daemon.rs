//! `pitr-agent daemon` against a real PostgreSQL: a per-second schedule takes
//! backups, the HTTP endpoints answer, and SIGTERM during a backup stops the
//! process in time without listing the unfinished backup.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pitr_tests::s3::S3Kind;
use pitr_tests::{free_port, wait_for};

use super::{Setup, pg_bin};

/// `GET path` over plain HTTP/1.0: the status code and the body.
pub(crate) fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// The value of an unlabelled metric in Prometheus text.
pub(crate) fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub(crate) fn start_daemon(setup: &Setup, port: u16, extra: &[&str]) -> Child {
    let mut cmd = setup.agent(&["daemon", "--listen", &format!("127.0.0.1:{port}")]);
    // No rehearsal at 04:00 UTC in the middle of a test (a flag overrides it).
    cmd.env("PITR_REHEARSE_SCHEDULE", "")
        .args(["--refresh", "1s", "--verify-schedule", ""])
        .arg("--pgdata")
        .arg(&setup.pg.data)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("start the daemon");
    wait_for(
        "the daemon to answer /healthz",
        Duration::from_secs(30),
        || get(port, "/healthz").filter(|(c, _)| *c == 200),
    );
    // /metrics answers 503 until the first refresh has read the repository.
    wait_for(
        "the daemon to serve /metrics",
        Duration::from_secs(30),
        || get(port, "/metrics").filter(|(c, _)| *c == 200),
    );
    child
}

pub(crate) fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn scheduled_backups_metrics_and_a_clean_sigterm() {
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file(&bin);
    setup.pg.pgbench(&["-i", "-s", "2", "-q"]);
    let port = free_port();
    let filestore = pitr_tests::user_tempdir(pitr_tests::RunAs::test_user(), "filestore");
    // Streaming on, as the manifests ship it: scheduled backups run beside
    // the stream, and every metric the alerts and dashboard use exists.
    let mut daemon = start_daemon(
        &setup,
        port,
        &[
            "--backup-schedule",
            "*/2 * * * * *",
            "--stream",
            "on",
            "--filestore-path",
            &filestore.path().display().to_string(),
        ],
    );

    let (code, body) = get(port, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    for name in [
        "pitr_backups",
        "pitr_backup_last_success_timestamp_seconds",
        "pitr_archive_ready_segments",
        "pitr_archive_lag_seconds",
        "pitr_repository_bytes",
        "pitr_restorable_window_end_timestamp_seconds",
        "pitr_archive_failures_total",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
    let backups = wait_for("a scheduled backup", Duration::from_secs(90), || {
        let (_, body) = get(port, "/metrics")?;
        metric(&body, "pitr_backups").filter(|n| *n >= 1.0)
    });
    assert!(backups >= 1.0);
    let (_, body) = get(port, "/metrics").expect("metrics");
    assert!(
        metric(&body, "pitr_backup_last_success_timestamp_seconds").is_some_and(|t| t > 1.0e9),
        "{body}"
    );
    assert!(
        body.contains("pitr_backup_runs_total{outcome=\"ok\"}"),
        "{body}"
    );

    // No dead alerts or panels: every metric they use is one the daemon exports.
    let used = pitr_tests::manifests::metrics_used_by_monitoring();
    assert!(used.len() >= 10, "{used:?}");
    for name in used {
        let exported = body
            .lines()
            .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")));
        assert!(
            exported,
            "the alerts or dashboard use {name}, which the daemon does not export:\n{body}"
        );
    }
    let (code, ready) = get(port, "/readyz").expect("readyz");
    assert_eq!(code, 200, "{ready}");
    let (code, status) = get(port, "/status").expect("status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    assert!(
        !status["repository"]["backups"]
            .as_array()
            .expect("backups")
            .is_empty(),
        "{status}"
    );

    let stopped = Instant::now();
    sigterm(&daemon);
    let code = wait_for("the daemon to exit", Duration::from_secs(20), || {
        daemon.try_wait().ok().flatten()
    });
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "exit took {:?}",
        stopped.elapsed()
    );
    assert!(code.success(), "{code:?}");
}

#[test]
fn sigterm_during_a_backup_stops_in_time_and_lists_nothing() {
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file(&bin);
    setup.pg.pgbench(&["-i", "-s", "2", "-q"]);
    let port = free_port();
    let daemon = start_daemon(
        &setup,
        port,
        &["--backup-schedule", "* * * * * *", "--max-rate", "1M"],
    );
    wait_for("a backup to stream", Duration::from_secs(60), || {
        (setup
            .pg
            .sql("SELECT count(*) FROM pg_stat_progress_basebackup")
            == "1")
            .then_some(())
    });
    let stopped = Instant::now();
    sigterm(&daemon);
    let mut daemon = daemon;
    wait_for("the daemon to exit", Duration::from_secs(20), || {
        daemon.try_wait().ok().flatten()
    });
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "exit took {:?}",
        stopped.elapsed()
    );
    assert_eq!(
        setup.backup_ids().len(),
        0,
        "an interrupted backup is never listed"
    );
}

/// Debian's `prometheus` on 127.0.0.1, scraping the daemon every second
/// and evaluating `rules` every second.
pub(crate) struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    pub(crate) fn start(target_port: u16, rules: &serde_yaml_ng::Value) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("rules.yml"),
            serde_yaml_ng::to_string(rules).expect("encode rules"),
        )
        .expect("write rules");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [rules.yml]\n\
             scrape_configs:\n  - job_name: pitr-agent\n    static_configs:\n      \
             - targets: ['127.0.0.1:{target_port}']\n"
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write config");
        let port = free_port();
        let child = Command::new("prometheus")
            .current_dir(dir.path())
            .arg("--config.file=prometheus.yml")
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        wait_for("prometheus to be ready", Duration::from_secs(30), || {
            get(port, "/-/ready").filter(|(c, _)| *c == 200)
        });
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    /// The names of the alerts in state `firing`; `None` if Prometheus did
    /// not answer.
    fn firing(&self) -> Option<Vec<String>> {
        let Some((200, body)) = get(self.port, "/api/v1/alerts") else {
            return None;
        };
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let alerts = v["data"]["alerts"].as_array()?;
        Some(
            alerts
                .iter()
                .filter(|a| a["state"] == "firing")
                .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
                .collect(),
        )
    }

    pub(crate) fn wait_firing(&self, alert: &str, firing: bool) {
        let what = format!(
            "{alert} to be {}",
            if firing { "firing" } else { "resolved" }
        );
        wait_for(&what, Duration::from_secs(60), || {
            let now = self.firing()?;
            (now.iter().any(|a| a == alert) == firing).then_some(())
        });
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped alert rules with every `for:` removed: the same expressions,
/// evaluated by a real Prometheus, without waiting minutes for them.
pub(crate) fn rules_without_for() -> serde_yaml_ng::Value {
    let mut rules = pitr_tests::manifests::yaml("pitr-alerts.rules.yml");
    for group in rules["groups"].as_sequence_mut().expect("groups") {
        for rule in group["rules"].as_sequence_mut().expect("rules") {
            rule.as_mapping_mut().expect("rule").remove("for");
        }
    }
    rules
}

pub(crate) fn stop(mut daemon: Child) {
    sigterm(&daemon);
    wait_for("the daemon to exit", Duration::from_secs(20), || {
        daemon.try_wait().ok().flatten()
    });
}

#[test]
fn prometheus_sees_alerts_fire_and_resolve_and_a_stopped_repository() {
    let Some(bin) = pg_bin() else { return };
    if !pitr_tests::prerequisite(
        pitr_tests::which("prometheus").is_some(),
        "prometheus (Debian package)",
    ) {
        return;
    }
    let Some(mut setup) = Setup::s3(&bin, S3Kind::S3sFs, "prometheus") else {
        return;
    };
    setup.pg.pgbench(&["-i", "-s", "1", "-q"]);
    setup.archive_now();
    let port = free_port();
    let prom = Prometheus::start(port, &rules_without_for());

    // No backup yet: the newest backup is "infinitely" old.
    let daemon = start_daemon(&setup, port, &["--backup-schedule", ""]);
    prom.wait_firing("PitrBackupTooOld", true);
    let (_, body) = get(port, "/metrics").expect("metrics");
    assert_eq!(metric(&body, "pitr_backups"), Some(0.0), "{body}");
    stop(daemon);

    // A per-second schedule takes a backup, and the alert resolves; but
    // only after it: while the daemon restarts, Prometheus sees the target
    // down or the series absent, and that must not read as a fresh backup.
    let daemon = start_daemon(&setup, port, &["--backup-schedule", "* * * * * *"]);
    wait_for(
        "a backup listed in the repository",
        Duration::from_secs(90),
        || {
            // Alerts first, then the listing: a backup committed in between
            // only makes the check weaker, never wrong.
            let firing = prom.firing();
            let listed = !setup.backup_ids().is_empty();
            if let Some(firing) = firing
                && !listed
            {
                assert!(
                    firing.iter().any(|a| a == "PitrBackupTooOld"),
                    "PitrBackupTooOld resolved before any backup was committed"
                );
            }
            listed.then_some(())
        },
    );
    wait_for(
        "the daemon's metrics to show the backup",
        Duration::from_secs(30),
        || {
            let (_, body) = get(port, "/metrics")?;
            let ok = metric(&body, "pitr_backups").is_some_and(|n| n >= 1.0)
                && metric(&body, "pitr_backup_last_success_timestamp_seconds")
                    .is_some_and(|t| t > 1.0e9);
            ok.then_some(())
        },
    );
    prom.wait_firing("PitrBackupTooOld", false);
    stop(daemon);

    // The repository goes away: /readyz fails, archiving fails, and both
    // the metric and the alert move.
    let daemon = start_daemon(&setup, port, &["--backup-schedule", ""]);
    let (code, _) = get(port, "/readyz").expect("readyz");
    assert_eq!(code, 200);
    let (_, body) = get(port, "/metrics").expect("metrics");
    let failures_before = metric(&body, "pitr_archive_failures_total").expect("counter");
    setup.server.as_mut().expect("an S3 server").stop();
    let (code, text) = wait_for("/readyz to fail", Duration::from_secs(30), || {
        get(port, "/readyz").filter(|(c, _)| *c != 200)
    });
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("repository"), "{text}");
    setup.pg.exec("CREATE TABLE after_stop AS SELECT 1");
    let _ = setup.pg.switch_wal();
    wait_for(
        "pitr_archive_failures_total to rise",
        Duration::from_secs(60),
        || {
            let (_, body) = get(port, "/metrics")?;
            metric(&body, "pitr_archive_failures_total").filter(|n| *n > failures_before)
        },
    );
    prom.wait_firing("PitrArchivingFailing", true);

    // Back again: archiving catches up and the daemon is ready.
    setup.server.as_mut().expect("an S3 server").restart();
    setup.archive_now();
    wait_for("/readyz to recover", Duration::from_secs(30), || {
        get(port, "/readyz").filter(|(c, _)| *c == 200)
    });
    stop(daemon);
}
