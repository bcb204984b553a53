//! `pitr-agent rehearse`: prove that the repository restores, and measure
//! how long it takes.
//!
//! The rehearsal plans like pgrestore, restores with the same library code
//! ([`crate::restore::files`], [`crate::restore::recovery`]) into a scratch
//! directory, replays with `wal-fetch`, and starts PostgreSQL on a private
//! Unix socket (no TCP) with `archive_mode = off`, so it can never write to
//! the repository. Then it checks what an operator would: the target was
//! reached, `pg_amcheck` is clean, every database connects, and the
//! operator's own `SELECT`s return true. The scratch directory and the
//! server are removed whatever happens ([`Scratch`]'s `Drop`), also when the
//! future is dropped on SIGTERM.
//!
//! The outcome is stored as `rehearsals/<time>.json` (the only write), so
//! `list` and the daemon show the newest proven restorable point.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng as _;
use tokio_postgres::NoTls;

pub use crate::catalog::rehearsals::{FailureReason, Phases, RehearsalRecord, Rehearsals, load};
use crate::catalog::{self, backup::Catalog};
use crate::cli::RepoArgs;
use crate::pgconn::PgTarget;
use crate::repository::Repository;
use crate::restore::files;
use crate::restore::plan::PlanRequest;
use crate::restore::recovery::{RecoveryConfig, StartConfig, start_and_wait};
use crate::restore::target::{RecoveryTarget, TargetAction, TargetTime, TargetTimeline};
use crate::storage::PutMode;

/// Which point to prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RehearseTarget {
    /// Everything archived and streamed: the newest commit.
    Latest,
    /// A random second of the restorable window.
    Random,
}

/// The rehearsal's settings.
#[derive(Debug, Clone)]
pub struct RehearseConfig {
    /// Which point.
    pub target: RehearseTarget,
    /// Where the scratch directory is made.
    pub scratch_parent: PathBuf,
    /// A file of `SELECT`s that must each return true.
    pub sql: Option<PathBuf>,
    /// The database the `SELECT`s run in.
    pub sql_database: String,
    /// `pg_amcheck --heapallindexed`.
    pub heapallindexed: bool,
    /// Fail when the restore takes longer than this (`PITR_RTO_OBJECTIVE`).
    pub rto_objective: Option<Duration>,
    /// The `pitr-agent` for `restore_command`.
    pub agent: PathBuf,
    /// Where PostgreSQL's programs are, and the superuser name.
    pub pg: PgTarget,
    /// Give up on replay after this long.
    pub timeout: Duration,
}

/// Removes the scratch directory and stops the server started in it, when
/// dropped: on success, on error, and when the rehearsal's future is dropped
/// (SIGTERM).
pub(crate) struct Scratch {
    /// The directory (the data directory is `data/` in it).
    pub(crate) dir: PathBuf,
    /// Set once a start was attempted.
    pub(crate) pg_ctl: Option<PathBuf>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(pg_ctl) = &self.pg_ctl {
            // A start was attempted: the postmaster may still be writing its
            // pid file (pg_ctl -W returns before it does). Give it a moment,
            // then stop it, so that nothing writes into what is removed next.
            let data = self.dir.join("data");
            let pid_file = data.join("postmaster.pid");
            for _ in 0..30 {
                if pid_file.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if pid_file.exists() {
                let _ = Command::new(pg_ctl)
                    .arg("-D")
                    .arg(&data)
                    .args(["-w", "-t", "20", "-m", "immediate", "stop"])
                    .output();
            }
        }
        // A process killed mid-write may still be closing files: retry.
        for attempt in 0..5 {
            match std::fs::remove_dir_all(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if attempt == 4 => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "cannot remove the rehearsal's scratch directory");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// Removes a directory when dropped.
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A failure with its reason.
type Failed = (FailureReason, String);

/// Runs one rehearsal and stores its record. Never returns an error for
/// what the rehearsal found: that is in the record (`ok`, `reason`).
///
/// # Errors
/// Only when the catalog cannot be read at all.
pub async fn rehearse(
    repo: &Repository,
    repo_args: &RepoArgs,
    cfg: &RehearseConfig,
) -> anyhow::Result<RehearsalRecord> {
    let started = SystemTime::now();
    let id = humantime::format_rfc3339_seconds(started)
        .to_string()
        .replace(['-', ':'], "");
    let catalog = Catalog::load(&repo.storage).await?;
    let mut record = RehearsalRecord {
        format: 1,
        id: id.clone(),
        ok: false,
        reason: None,
        error: None,
        target: String::new(),
        backup: None,
        restored_point: None,
        restored_point_unix: None,
        replay_lsn: None,
        phases: Phases::default(),
        restore_seconds: 0.0,
        databases: Vec::new(),
        user_checks: Vec::new(),
        filestore_files: None,
        finished_at: String::new(),
    };
    if let Err((reason, error)) = run(repo, repo_args, cfg, &catalog, &mut record).await {
        record.reason = Some(reason);
        record.error = Some(error);
    } else {
        record.ok = true;
    }
    if record.ok
        && let Some(objective) = cfg.rto_objective
        && record.restore_seconds > objective.as_secs_f64()
    {
        record.ok = false;
        record.reason = Some(FailureReason::TooSlow);
        record.error = Some(format!(
            "the restore took {:.1} s, above the RTO objective of {} (PITR_RTO_OBJECTIVE)",
            record.restore_seconds,
            humantime::format_duration(objective)
        ));
    }
    record.finished_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let body = serde_json::to_vec_pretty(&record)?;
    let outcome = if record.ok {
        "ok"
    } else {
        record.reason.map_or("internal", FailureReason::as_str)
    };
    if let Err(e) = repo
        .storage
        .put(
            &catalog::rehearsal_key(&id, outcome),
            bytes::Bytes::from(body),
            PutMode::CreateOnly,
        )
        .await
    {
        tracing::warn!(error = %e, "cannot store the rehearsal's record; list and the daemon will not show it");
    }
    Ok(record)
}

async fn run(
    repo: &Repository,
    repo_args: &RepoArgs,
    cfg: &RehearseConfig,
    catalog: &Catalog,
    record: &mut RehearsalRecord,
) -> Result<(), Failed> {
    let internal =
        |what: &str, e: &dyn std::fmt::Display| (FailureReason::Internal, format!("{what}: {e}"));
    let (histories, _) = catalog.histories(&repo.storage).await.map_err(|e| {
        (
            FailureReason::Plan,
            format!("reading timeline histories: {e}"),
        )
    })?;
    let index = catalog.wal_index(histories);
    let target = match cfg.target {
        RehearseTarget::Latest => RecoveryTarget::Latest,
        RehearseTarget::Random => random_target(catalog)?,
    };
    record.target = target.to_string();
    let req = PlanRequest {
        target: target.clone(),
        timeline: TargetTimeline::Latest,
        backup: None,
        allow_incomplete: false,
    };
    let plan = crate::restore::plan::plan_restore(repo, catalog, &index, &req)
        .await
        .map_err(|e| (FailureReason::Plan, format!("{e:#}")))?;
    record.backup = Some(plan.backup.id.to_string());
    files::check_free_space(&cfg.scratch_parent, plan.disk_needed)
        .map_err(|e| (FailureReason::Internal, format!("{e:#}")))?;
    let major = plan.backup.pg_version / 10_000;
    let pg_ctl = cfg
        .pg
        .program("pg_ctl", major)
        .map_err(|e| internal("finding pg_ctl", &e))?;
    let amcheck = cfg
        .pg
        .program("pg_amcheck", major)
        .map_err(|e| internal("finding pg_amcheck", &e))?;

    std::fs::create_dir_all(&cfg.scratch_parent)
        .map_err(|e| internal(&format!("creating {}", cfg.scratch_parent.display()), &e))?;
    let unique = format!("{}-{}", std::process::id(), rand::rng().random::<u32>());
    let dir = cfg.scratch_parent.join(format!("pitr-rehearsal-{unique}"));
    std::fs::create_dir(&dir).map_err(|e| internal(&format!("creating {}", dir.display()), &e))?;
    let mut scratch = Scratch { dir, pg_ctl: None };
    let data = scratch.dir.join("data");
    // Unix socket paths are short (107 bytes): a directory of its own in /tmp,
    // removed with the scratch directory's server.
    let socket = std::env::temp_dir().join(format!("pitr-rh-{unique}"));
    std::fs::create_dir(&socket)
        .map_err(|e| internal(&format!("creating {}", socket.display()), &e))?;
    let _socket_dir = RemoveOnDrop(socket.clone());

    let clock = Instant::now();
    files::restore_backup(repo, &plan, &data, false, false, |_, _| {})
        .await
        .map_err(|e| (FailureReason::Restore, format!("{e:#}")))?;
    record.phases.restore = clock.elapsed().as_secs_f64();

    let recovery = RecoveryConfig {
        restore_command: files::restore_command(&cfg.agent, repo_args),
        target: plan.recover_to.clone(),
        timeline: plan.target_timeline.clone(),
        action: TargetAction::Promote,
        exclusive: false,
        new_primary: false,
    };
    recovery
        .write(
            &data,
            &format!("added by pitr-agent rehearse {}", record.id),
        )
        .map_err(|e| internal("writing the recovery settings", &e))?;
    let port = free_port();
    let start = StartConfig {
        pg_ctl: pg_ctl.clone(),
        port,
        socket_dir: socket.clone(),
        user: cfg.pg.user.clone(),
        timeout: cfg.timeout,
        env: {
            let mut env = vec![("PITR_REPO".to_owned(), repo.url.clone())];
            env.extend(repo_args.child_env());
            env
        },
        action: TargetAction::Promote,
        settings: rehearsal_settings(),
        target: plan.recover_to.clone(),
    };
    scratch.pg_ctl = Some(pg_ctl);
    let clock = Instant::now();
    let reached = start_and_wait(&data, &start)
        .await
        .map_err(|e| (FailureReason::Replay, e.to_string()))?;
    record.phases.replay = clock.elapsed().as_secs_f64();
    record.restore_seconds = record.phases.restore + record.phases.replay;
    record.restored_point = reached.last_transaction_time.clone();
    record.restored_point_unix = reached
        .last_transaction_time
        .as_deref()
        .and_then(|t| TargetTime::parse(t).ok())
        .map(|t| t.micros as f64 / 1e6);
    record.replay_lsn = reached.replay_lsn.clone();
    files::check_replay_end(&plan, &reached).map_err(|e| (FailureReason::Replay, e))?;

    let clock = Instant::now();
    let mut result = checks(cfg, &amcheck, &socket, port, record).await;
    if result.is_ok() {
        result = filestore_check(repo, cfg, &socket, port, record).await;
    }
    record.phases.checks = clock.elapsed().as_secs_f64();
    drop(scratch);
    result
}

/// A random whole second between the window's start and the newest commit a
/// rehearsal proved restorable. Not up to the window's end: the window ends
/// when the newest WAL was archived, and a time after the last commit in it
/// cannot be reached (PostgreSQL ends recovery with FATAL). Without a proven
/// commit inside the window, the newest WAL (`latest`) is rehearsed instead.
fn random_target(catalog: &Catalog) -> Result<RecoveryTarget, Failed> {
    let window = catalog.restorable_window().ok_or((
        FailureReason::Plan,
        "the repository has no backup; take one with `pitr-agent backup` first".to_owned(),
    ))?;
    let second = 1_000_000;
    let start = TargetTime::from_system_time(window.start).micros;
    let start = start.div_euclid(second) * second
        + if start.rem_euclid(second) == 0 {
            0
        } else {
            second
        };
    let proven = catalog
        .rehearsals
        .newest_ok_latest
        .as_ref()
        .and_then(|r| r.restored_point_unix)
        .map(|p| (p * 1e6) as i64);
    let Some(end) = proven
        .map(|p| p.div_euclid(second) * second)
        .filter(|e| *e >= start)
    else {
        tracing::info!(
            "no proven commit inside the window yet: rehearsing the newest WAL instead of a random second"
        );
        return Ok(RecoveryTarget::Latest);
    };
    let micros = start + rand::rng().random_range(0..=(end - start) / second) * second;
    Ok(RecoveryTarget::Time(TargetTime {
        micros,
        assumed_utc: false,
    }))
}

/// What the rehearsal's server runs with: private, small, writing nothing
/// outside its directory.
pub(crate) fn rehearsal_settings() -> Vec<(String, String)> {
    [
        // Never archive: the rehearsal must not write to the repository.
        ("archive_mode", "off"),
        ("archive_command", ""),
        // The source's synchronous stream must not make the end-of-recovery
        // checkpoint or the checks wait.
        ("synchronous_standby_names", ""),
        // No connections during replay: the source's max_connections and
        // friends then need not fit here.
        ("hot_standby", "off"),
        ("shared_buffers", "32MB"),
        ("max_connections", "10"),
        ("max_wal_senders", "0"),
        ("max_replication_slots", "0"),
        ("max_worker_processes", "4"),
        ("max_parallel_workers", "0"),
        ("work_mem", "4MB"),
        ("maintenance_work_mem", "32MB"),
        ("autovacuum", "off"),
        ("logging_collector", "off"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

async fn checks(
    cfg: &RehearseConfig,
    amcheck: &Path,
    socket: &Path,
    port: u16,
    record: &mut RehearsalRecord,
) -> Result<(), Failed> {
    let connect = |db: String| {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(socket)
            .port(port)
            .user(&cfg.pg.user)
            .dbname(&db)
            .application_name("pitr-agent rehearse")
            .connect_timeout(Duration::from_secs(10));
        async move {
            let (client, conn) = config.connect(NoTls).await.map_err(|e| {
                (
                    FailureReason::Connect,
                    format!("database {db} does not accept connections: {e}"),
                )
            })?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok::<_, Failed>(client)
        }
    };
    let admin = connect("postgres".to_owned()).await?;
    let rows = admin
        .query(
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname",
            &[],
        )
        .await
        .map_err(|e| (FailureReason::Connect, e.to_string()))?;
    for row in rows {
        let db: String = row.get(0);
        let client = connect(db.clone()).await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| (FailureReason::Connect, format!("database {db}: {e}")))?;
        record.databases.push(db);
    }

    let mut cmd = Command::new(amcheck);
    cmd.arg("-h")
        .arg(socket)
        .args(["-p", &port.to_string(), "-U", &cfg.pg.user])
        .args(["--all", "--install-missing", "--no-strict-names"]);
    if cfg.heapallindexed {
        cmd.arg("--heapallindexed");
    }
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .map_err(|e| (FailureReason::Internal, format!("running pg_amcheck: {e}")))?;
    if !out.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let tail: Vec<&str> = text.lines().take(12).collect();
        return Err((
            FailureReason::Amcheck,
            format!("pg_amcheck found problems:\n{}", tail.join("\n")),
        ));
    }

    if let Some(path) = &cfg.sql {
        let text = std::fs::read_to_string(path).map_err(|e| {
            (
                FailureReason::UserCheck,
                format!("cannot read PITR_REHEARSE_SQL {}: {e}", path.display()),
            )
        })?;
        let client = connect(cfg.sql_database.clone()).await?;
        for statement in user_statements(&text) {
            let row = client
                .query_one(statement.as_str(), &[])
                .await
                .map_err(|e| {
                    (
                        FailureReason::UserCheck,
                        format!(
                            "check `{statement}` failed: {}",
                            crate::pgconn::error_text(&e)
                        ),
                    )
                })?;
            let value: Option<bool> = row.try_get(0).map_err(|e| {
                (
                    FailureReason::UserCheck,
                    format!("check `{statement}` must return one boolean: {e}"),
                )
            })?;
            if value != Some(true) {
                return Err((
                    FailureReason::UserCheck,
                    format!("check `{statement}` returned {value:?}, not true"),
                ));
            }
            record.user_checks.push(statement);
        }
    }
    Ok(())
}

/// When the repository has a filestore: every attachment the restored
/// databases reference has its file in the repository, so a restore to this
/// point gets the whole Odoo back.
async fn filestore_check(
    repo: &Repository,
    cfg: &RehearseConfig,
    socket: &Path,
    port: u16,
    record: &mut RehearsalRecord,
) -> Result<(), Failed> {
    let storage_err = |e: &dyn std::fmt::Display| {
        (
            FailureReason::Filestore,
            format!("listing the filestore: {e}"),
        )
    };
    if repo
        .storage
        .list(crate::filestore::INDEX_PREFIX)
        .await
        .map_err(|e| storage_err(&e))?
        .is_empty()
    {
        return Ok(());
    }
    let mut target = cfg.pg.clone();
    target.host = socket.display().to_string();
    target.port = port;
    target.database = "postgres".to_owned();
    let attachments = crate::filestore::attachments(&target).await.map_err(|e| {
        (
            FailureReason::Connect,
            format!("reading ir_attachment: {e:#}"),
        )
    })?;
    let mut stored: std::collections::HashMap<String, std::collections::HashSet<String>> =
        std::collections::HashMap::new();
    let mut missing = Vec::new();
    for a in &attachments {
        if !stored.contains_key(&a.database) {
            let names = crate::filestore::stored_names(repo, &a.database)
                .await
                .map_err(|e| storage_err(&e))?;
            stored.insert(a.database.clone(), names);
        }
        if !stored[&a.database].contains(&a.store_fname) {
            missing.push(format!(
                "{}: attachment {} ({})",
                a.database, a.id, a.store_fname
            ));
        }
    }
    record.filestore_files = Some((attachments.len() - missing.len()) as u64);
    if missing.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
    Err((
        FailureReason::Filestore,
        format!(
            "{} of {} attachments have no file in the repository (the filestore sync lags or \
             its objects were deleted): {}{}",
            missing.len(),
            attachments.len(),
            shown.join("; "),
            if missing.len() > shown.len() {
                "; ..."
            } else {
                ""
            }
        ),
    ))
}

/// The statements of a checks file: split on `;`, `--` comments dropped.
fn user_statements(text: &str) -> Vec<String> {
    let without_comments: String = text
        .lines()
        .map(|l| l.split_once("--").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| !s.is_empty())
        .collect()
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(54_329, |a| a.port())
}

/// One paragraph for people: what was proven, or what failed.
#[must_use]
pub fn summary(r: &RehearsalRecord) -> String {
    if r.ok {
        format!(
            "rehearsal {}: restorable. Backup {} restored and replayed to {} ({}) in {:.1} s \
             (restore {:.1} s, replay {:.1} s); checks {:.1} s: {} database(s) connect, \
             pg_amcheck clean, {} operator check(s) true{}",
            r.id,
            r.backup.as_deref().unwrap_or("?"),
            r.restored_point
                .as_deref()
                .unwrap_or("(no transaction replayed)"),
            r.target,
            r.restore_seconds,
            r.phases.restore,
            r.phases.replay,
            r.phases.checks,
            r.databases.len(),
            r.user_checks.len(),
            r.filestore_files.map_or(String::new(), |n| format!(
                ", the file of each of {n} attachment(s) in the repository"
            ))
        )
    } else {
        format!(
            "rehearsal {}: FAILED ({}): {}",
            r.id,
            r.reason.map_or("unknown", FailureReason::as_str),
            r.error.as_deref().unwrap_or("")
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_latest_record_is_recognised_by_its_target_text() {
        let mut r: super::RehearsalRecord = serde_json::from_value(serde_json::json!({
            "format": 1, "id": "x", "ok": true, "reason": null, "error": null,
            "target": super::RecoveryTarget::Latest.to_string(), "backup": null,
            "restored-point": null, "restored-point-unix": null, "replay-lsn": null,
            "phases": {"restore": 0.0, "replay": 0.0, "checks": 0.0},
            "restore-seconds": 0.0, "databases": [], "user-checks": [], "finished-at": "x"
        }))
        .expect("a record");
        assert!(crate::catalog::rehearsals::is_latest(&r));
        r.target = super::RecoveryTarget::Lsn(crate::wal::Lsn(5)).to_string();
        assert!(!crate::catalog::rehearsals::is_latest(&r));
    }

    #[test]
    fn checks_files_split_into_statements() {
        let text = "-- Odoo has users\nselect count(*) > 0 from res_users;\n\n\
                    SELECT true -- trailing\n;  ;\nselect 1 = 1";
        assert_eq!(
            super::user_statements(text),
            vec![
                "select count(*) > 0 from res_users",
                "SELECT true",
                "select 1 = 1"
            ]
        );
    }
}
