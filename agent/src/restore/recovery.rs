//! Recovery configuration, and starting PostgreSQL to watch it reach the target.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::NoTls;

use super::target::{RecoveryTarget, TargetAction};

/// The recovery settings pgrestore writes.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    /// The full `restore_command`.
    pub restore_command: String,
    /// Where to stop.
    pub target: RecoveryTarget,
    /// `recovery_target_timeline`.
    pub timeline: String,
    /// `recovery_target_action`.
    pub action: TargetAction,
    /// `recovery_target_inclusive = off`.
    pub exclusive: bool,
    /// The restored cluster replaces the source (`pgrestore --new-primary`):
    /// it keeps the backup's archiving and synchronous settings. Without
    /// it the restore is a copy beside a running source: `archive_mode =
    /// off` and no synchronous standby, so it never writes into the source
    /// repository and its commits never wait for a stream it does not have.
    pub new_primary: bool,
}

/// Marks the lines a side restore adds, so that a later restore of a backup
/// taken from that copy removes them.
const SIDE_MARK: &str = "# pgrestore: a copy beside its source (--new-primary lifts this)";

fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl RecoveryConfig {
    /// The lines appended to `postgresql.auto.conf`.
    #[must_use]
    pub fn lines(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "restore_command = {}", quote(&self.restore_command));
        let target = match &self.target {
            RecoveryTarget::Time(t) => Some(("recovery_target_time", t.to_string())),
            RecoveryTarget::Lsn(l) => Some(("recovery_target_lsn", l.to_string())),
            RecoveryTarget::Xid(x) => Some(("recovery_target_xid", x.to_string())),
            RecoveryTarget::Name(n) => Some(("recovery_target_name", n.clone())),
            RecoveryTarget::Immediate => Some(("recovery_target", "immediate".to_owned())),
            // No target: recovery replays all WAL there is, then promotes.
            RecoveryTarget::Latest => None,
        };
        if let Some((key, value)) = target {
            let _ = writeln!(out, "{key} = {}", quote(&value));
        }
        let _ = writeln!(out, "recovery_target_timeline = {}", quote(&self.timeline));
        let _ = writeln!(
            out,
            "recovery_target_action = {}",
            quote(self.action.as_str())
        );
        if self.exclusive {
            let _ = writeln!(out, "recovery_target_inclusive = off");
        }
        if !self.new_primary {
            let _ = writeln!(out, "archive_mode = 'off'  {SIDE_MARK}");
            let _ = writeln!(out, "synchronous_standby_names = ''  {SIDE_MARK}");
        }
        out
    }

    /// Takes over the recovery settings of `dir`: removes every recovery
    /// setting the restored `postgresql.auto.conf` carries (a cluster restored
    /// earlier keeps pgrestore's lines after promotion, and every later backup
    /// carries them) and any `recovery.signal` / `standby.signal`, then
    /// appends these settings and creates `recovery.signal`. Returns what was
    /// removed, for the operator.
    ///
    /// # Errors
    /// The files cannot be read or written.
    pub fn write(&self, dir: &Path, header: &str) -> std::io::Result<Vec<String>> {
        let conf = dir.join("postgresql.auto.conf");
        let old = match std::fs::read_to_string(&conf) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let (mut text, mut removed) = strip_recovery_settings(&old);
        for signal in ["recovery.signal", "standby.signal"] {
            match std::fs::remove_file(dir.join(signal)) {
                Ok(()) => removed.push(signal.to_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        let _ = writeln!(text, "# {header}");
        text.push_str(&self.lines());
        std::fs::write(&conf, text)?;
        std::fs::write(dir.join("recovery.signal"), "")?;
        Ok(removed)
    }
}

/// Settings that belong to one recovery and must not leak into the next.
fn is_recovery_setting(key: &str) -> bool {
    key.starts_with("recovery_target") || key == "restore_command" || key == "recovery_end_command"
}

/// `postgresql.auto.conf` without recovery settings and pgrestore's header
/// comments; and the lines removed.
fn strip_recovery_settings(text: &str) -> (String, Vec<String>) {
    let mut kept = String::new();
    let mut removed = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        let key = trimmed
            .split(|c: char| c == '=' || c.is_whitespace())
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if trimmed.starts_with("# added by pgrestore") {
            continue;
        }
        if !trimmed.starts_with('#') && (is_recovery_setting(&key) || trimmed.ends_with(SIDE_MARK))
        {
            removed.push(trimmed.to_owned());
            continue;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    (kept, removed)
}

/// How to start the restored server.
#[derive(Debug, Clone)]
pub struct StartConfig {
    /// `pg_ctl` of the backup's major version.
    pub pg_ctl: PathBuf,
    /// Port to listen on.
    pub port: u16,
    /// Unix socket directory.
    pub socket_dir: PathBuf,
    /// The database superuser to connect as.
    pub user: String,
    /// Give up after this long.
    pub timeout: Duration,
    /// Extra environment for the server (so its archive_command and
    /// restore_command reach the repository).
    pub env: Vec<(String, String)>,
    /// The action, to know what "reached" looks like.
    pub action: TargetAction,
    /// More `-c name=value` settings for this start only.
    pub settings: Vec<(String, String)>,
    /// The target recovery was given, to say what was not found.
    pub target: crate::restore::target::RecoveryTarget,
}

/// Where recovery stopped.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Reached {
    /// The last replayed transaction's commit time.
    pub last_transaction_time: Option<String>,
    /// The last replayed WAL position.
    pub replay_lsn: Option<String>,
    /// Whether the server is now open for writes (promoted).
    pub promoted: bool,
    /// Whether the server is running.
    pub running: bool,
    /// The server log.
    pub log: String,
}

/// Why the started server did not reach the target.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// pg_ctl failed.
    #[error("cannot start PostgreSQL with {pg_ctl}: {detail}")]
    PgCtl {
        /// The program.
        pg_ctl: String,
        /// What it said.
        detail: String,
    },
    /// Recovery ended early, or the server died.
    #[error("{0}")]
    Failed(String),
    /// Too slow.
    #[error(
        "recovery did not reach the target within {0:?}: give a longer --start-timeout (a long \
         replay), or start the restored directory yourself and watch its log"
    )]
    Timeout(Duration),
}

/// Starts PostgreSQL on `dir` and waits until recovery reaches the target
/// (paused, promoted, or shut down, as the action says).
///
/// # Errors
/// [`StartError`] with the end of the server log when recovery ends before the target.
pub async fn start_and_wait(dir: &Path, cfg: &StartConfig) -> Result<Reached, StartError> {
    let log_path = dir.join("pgrestore-recovery.log");
    let mut opts = format!(
        "-p {} -c unix_socket_directories={} -c listen_addresses=''",
        cfg.port,
        quote(&cfg.socket_dir.display().to_string())
    );
    for (name, value) in &cfg.settings {
        let _ = write!(opts, " -c {name}={}", quote(value));
    }
    let out = tokio::process::Command::new(&cfg.pg_ctl)
        .arg("-D")
        .arg(dir)
        .arg("-l")
        .arg(&log_path)
        .args(["-o", &opts, "-W", "start"])
        .envs(cfg.env.iter().cloned())
        .output()
        .await
        .map_err(|e| StartError::PgCtl {
            pg_ctl: cfg.pg_ctl.display().to_string(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(StartError::PgCtl {
            pg_ctl: cfg.pg_ctl.display().to_string(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let deadline = Instant::now() + cfg.timeout;
    let pid_file = dir.join("postmaster.pid");
    // The postmaster writes its pid file a moment after pg_ctl returns.
    tokio::time::sleep(Duration::from_millis(200)).await;
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("recovery ended before configured recovery target was reached") {
            let at = redo_done(&log)
                .map(|l| format!(" at {l}, the last record it could read,"))
                .unwrap_or_default();
            if let RecoveryTarget::Name(_) | RecoveryTarget::Xid(_) = &cfg.target {
                return Err(StartError::Failed(format!(
                    "PostgreSQL replayed the repository's WAL{at} without finding {}: no such \
                     {} was made after the backup, or the WAL that holds it is missing or \
                     unreadable (`pitr-agent verify` names which). `pgrestore list` shows the \
                     restore points the WAL summaries know. The server stopped, with no usable \
                     result in {}. Server log:\n{}",
                    cfg.target,
                    if matches!(cfg.target, RecoveryTarget::Name(_)) {
                        "restore point"
                    } else {
                        "transaction"
                    },
                    dir.display(),
                    tail(&log, 8)
                )));
            }
            return Err(StartError::Failed(format!(
                "PostgreSQL ended recovery{at} before reaching the target: the WAL after that \
                 point is missing from the repository or unreadable (`pitr-agent verify` names \
                 which). The server stopped, with no usable result in {}: restore to an earlier \
                 target. Server log:\n{}",
                dir.display(),
                tail(&log, 8)
            )));
        }
        let running = pid_file.exists();
        if !running {
            // With log_min_messages above LOG the "shutdown at recovery target"
            // line is missing; a clean stop without FATAL is the same outcome.
            // pgrestore's own probe, refused while the server starts, logs a
            // FATAL of its own: not a failure of recovery.
            let fatal = log
                .lines()
                .any(|l| l.contains("FATAL") && !l.contains("not yet accepting connections"));
            if cfg.action == TargetAction::Shutdown
                && (log.contains("shutdown at recovery target") || !fatal)
            {
                return Ok(Reached {
                    running: false,
                    log,
                    ..Reached::default()
                });
            }
            if let Some(cause) = fetch_failure(&log)
                && cause.starts_with("cannot write ")
            {
                // wal-fetch could not write into the data directory: a
                // local problem (a full disk, permissions), not the repository.
                return Err(StartError::Failed(format!(
                    "recovery stopped because WAL could not be written into the data directory: \
                     {cause}\nThe server is stopped; free space on {}'s volume (or choose \
                     another --pgdata) and run pgrestore again. Server log:\n{}",
                    dir.display(),
                    tail(&log, 8)
                )));
            }
            if let Some(cause) = fetch_failure(&log) {
                return Err(StartError::Failed(format!(
                    "recovery stopped because the repository could not deliver WAL: {cause}\n\
                     The server is stopped, with no usable result in {}. Fix the repository (or \
                     set PITR_FETCH_RETRY_FOR longer) and run pgrestore again. Server log:\n{}",
                    dir.display(),
                    tail(&log, 8)
                )));
            }
            if log.contains("could not bind")
                || log.contains("already in use")
                || log.contains("lock file")
            {
                return Err(StartError::Failed(format!(
                    "PostgreSQL could not start: port {} or the socket directory {} is taken by \
                     another server; choose a free --port or another --socket-dir. Server log:\n{}",
                    cfg.port,
                    cfg.socket_dir.display(),
                    tail(&log, 6)
                )));
            }
            return Err(StartError::Failed(format!(
                "PostgreSQL stopped during recovery. Server log:\n{}",
                tail(&log, 12)
            )));
        }
        if let Some(reached) = probe(cfg).await {
            let done = match cfg.action {
                TargetAction::Promote => reached.promoted,
                TargetAction::Pause => reached.running && !reached.promoted,
                TargetAction::Shutdown => false,
            };
            if done {
                return Ok(Reached { log, ..reached });
            }
        }
        if Instant::now() > deadline {
            return Err(StartError::Timeout(cfg.timeout));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks the server where replay is; `None` while it does not accept connections.
/// For `pause`, only a paused server counts as there.
async fn probe(cfg: &StartConfig) -> Option<Reached> {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(&cfg.socket_dir)
        .port(cfg.port)
        .user(&cfg.user)
        .dbname("postgres")
        .application_name("pgrestore")
        .connect_timeout(Duration::from_secs(2));
    let (client, conn) = config.connect(NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), \
             CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, \
             pg_last_xact_replay_timestamp()::text, pg_last_wal_replay_lsn()::text",
            &[],
        )
        .await
        .ok()?;
    let in_recovery: bool = row.get(0);
    let paused: bool = row.get(1);
    if in_recovery && !paused {
        return None;
    }
    Some(Reached {
        last_transaction_time: row.get(2),
        replay_lsn: row.get(3),
        promoted: !in_recovery,
        running: true,
        log: String::new(),
    })
}

/// Where replay ended, from PostgreSQL's `redo done at X/Y` log line.
fn redo_done(log: &str) -> Option<String> {
    log.lines().rev().find_map(|l| {
        let rest = l.split_once("redo done at ")?.1;
        Some(rest.split_whitespace().next()?.to_owned())
    })
}

/// The cause `wal-fetch` printed when it stopped recovery, from the server log.
fn fetch_failure(log: &str) -> Option<String> {
    log.lines()
        .rev()
        .find_map(|l| l.split_once("pitr-agent wal-fetch: FATAL: "))
        .map(|(_, cause)| cause.trim().to_owned())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn earlier_recovery_settings_are_removed_and_the_rest_kept() {
        let text = "# Do not edit this file manually!\n\
                    max_connections = '50'\n\
                    # added by pgrestore at 2026-11-21T14:00:00Z: backup b1, recovery to t\n\
                    restore_command = '/pitr/bin/pitr-agent wal-fetch %f %p'\n\
                    recovery_target_time = '2026-11-21 14:30:00+00'\n\
                    Recovery_Target_Timeline='2'\n\
                    recovery_end_command = 'true'\n\
                    # recovery_target_lsn = '0/1' (a comment stays)\n\
                    archive_command = 'x'\n";
        let (kept, removed) = super::strip_recovery_settings(text);
        assert_eq!(
            kept,
            "# Do not edit this file manually!\nmax_connections = '50'\n\
             # recovery_target_lsn = '0/1' (a comment stays)\narchive_command = 'x'\n"
        );
        assert_eq!(removed.len(), 4, "{removed:?}");
        assert!(removed[1].starts_with("recovery_target_time"));
    }

    #[test]
    fn the_fetch_failure_is_found_in_the_log() {
        let log = "LOG:  starting\npitr-agent wal-fetch: FATAL: cannot restore 000000010000000000000003: \
                   s3://b/p/wal/x.gz: bad\nFATAL:  could not restore file\n";
        assert_eq!(
            super::fetch_failure(log).as_deref(),
            Some("cannot restore 000000010000000000000003: s3://b/p/wal/x.gz: bad")
        );
        assert_eq!(super::fetch_failure("LOG: fine\n"), None);
    }
}
