//! `pitr-agent daemon`: the sidecar. Runs backup, verify and prune on cron
//! schedules (never two at once), refreshes its figures from the repository
//! and PostgreSQL, and serves `/healthz`, `/readyz`, `/status` and `/metrics`.
//! SIGTERM stops everything; a backup in flight is abandoned before its
//! `backup.json`, so it is never listed.

pub mod events;
pub mod metrics;
pub mod schedule;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::Utc;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::backup::{BackupConfig, run_backup};
use crate::catalog::backup::{Catalog, RecordCache};
use crate::catalog::retention::RetentionPolicy;
use crate::pgconn::PgTarget;
use crate::repository::Repository;
use crate::stream::StreamConfig;
use crate::verify::{Severity, VerifyOptions, verify};
use events::EventRecorder;
use metrics::{Job, Kind, Metrics, Outcome, SeverityLabel, Status, epoch};
use schedule::Schedule;

/// The default port, next to postgres_exporter's 9187.
pub const DEFAULT_PORT: u16 = 9188;

/// Everything the daemon needs.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where to serve HTTP.
    pub listen: SocketAddr,
    /// Backup schedule.
    pub backup: Option<Schedule>,
    /// Verify schedule.
    pub verify: Option<Schedule>,
    /// Prune schedule.
    pub prune: Option<Schedule>,
    /// How often figures are refreshed.
    pub refresh: Duration,
    /// PostgreSQL.
    pub pg: PgTarget,
    /// The data directory, for `.ready` counts (optional).
    pub pgdata: Option<PathBuf>,
    /// How backups are taken.
    pub backup_cfg: BackupConfig,
    /// Retention for scheduled prunes.
    pub retention: RetentionPolicy,
    /// `verify --max-age`.
    pub verify_max_age: Option<Duration>,
    /// WAL streaming, when on.
    pub stream: Option<StreamConfig>,
    /// Restore rehearsal schedule.
    pub rehearse_schedule: Option<Schedule>,
    /// How rehearsals run.
    pub rehearse: crate::rehearse::RehearseConfig,
    /// The repository flags, for the rehearsal's restore_command.
    pub repo_args: crate::cli::RepoArgs,
    /// The filestore to sync, and how often.
    pub filestore: Option<(PathBuf, Duration)>,
}

struct Shared {
    repo: Repository,
    cfg: DaemonConfig,
    metrics: Metrics,
    registry: Registry,
    status: Mutex<Status>,
    /// One job at a time.
    job_lock: tokio::sync::Mutex<()>,
    /// One rehearsal at a time; rehearsals never wait for (or block) backups.
    rehearse_lock: tokio::sync::Mutex<()>,
    last_failed_count: Mutex<Option<i64>>,
    /// What was wrong at the last refresh, by what was read (the
    /// repository, PostgreSQL…): each logged once when it appears or
    /// changes and once when it clears, so that a refresh every few seconds
    /// keeps the log readable (a missing repository answers `/readyz` 503
    /// and would otherwise be silent).
    problems: Problems,
    /// Kubernetes Events on our pod, when running in one.
    events: Option<EventRecorder>,
    /// Set once the first refresh has read the repository. Until then the
    /// gauges hold zeros that mean "not read yet", not "no backup", so
    /// `/metrics` answers 503 and Prometheus keeps the last real samples.
    refreshed: std::sync::atomic::AtomicBool,
    /// `backup.json` records already read: create-only, read once.
    records: RecordCache,
    /// The WAL stream's state, when streaming.
    stream: Option<crate::stream::SharedStatus>,
}

/// Runs until `shutdown` is cancelled (SIGTERM).
///
/// # Errors
/// The HTTP port cannot be bound.
pub async fn run(
    repo: Repository,
    cfg: DaemonConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    if cfg.stream.is_some() {
        metrics.register_stream(&mut registry);
    }
    if cfg.filestore.is_some() {
        metrics.register_filestore(&mut registry);
    }
    metrics.create_label_sets();
    let shared = Arc::new(Shared {
        repo,
        metrics,
        registry,
        status: Mutex::new(Status::default()),
        job_lock: tokio::sync::Mutex::new(()),
        rehearse_lock: tokio::sync::Mutex::new(()),
        last_failed_count: Mutex::new(None),
        problems: Problems::default(),
        events: EventRecorder::from_env().await,
        refreshed: std::sync::atomic::AtomicBool::new(false),
        records: RecordCache::default(),
        stream: cfg
            .stream
            .as_ref()
            .map(|_| crate::stream::SharedStatus::default()),
        cfg,
    });
    let listener = tokio::net::TcpListener::bind(shared.cfg.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e}; choose another --listen",
                shared.cfg.listen
            )
        })?;
    tracing::info!(listen = %shared.cfg.listen, "serving /healthz /readyz /status /metrics");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics_text))
        .with_state(Arc::clone(&shared));

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(refresh_loop(Arc::clone(&shared), shutdown.clone()));
    if let (Some(stream_cfg), Some(status)) = (&shared.cfg.stream, &shared.stream) {
        tasks.spawn(crate::stream::run(
            shared.repo.clone(),
            shared.cfg.pg.clone(),
            stream_cfg.clone(),
            Arc::clone(status),
            shutdown.clone(),
        ));
    }
    if let Some((path, every)) = shared.cfg.filestore.clone() {
        tracing::info!(path = %path.display(), every = ?every, "filestore sync");
        tasks.spawn(filestore_loop(
            Arc::clone(&shared),
            path,
            every,
            shutdown.clone(),
        ));
    }
    for (job, schedule) in [
        ("backup", shared.cfg.backup.clone()),
        ("verify", shared.cfg.verify.clone()),
        ("prune", shared.cfg.prune.clone()),
        ("rehearse", shared.cfg.rehearse_schedule.clone()),
    ] {
        if let Some(schedule) = schedule {
            tracing::info!(job, %schedule, "scheduled");
            tasks.spawn(schedule_loop(
                Arc::clone(&shared),
                job,
                schedule,
                shutdown.clone(),
            ));
        }
    }
    let token = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await?;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Syncs the filestore every `every`, keeping what the repository is known
/// to hold between syncs; a failed sync is logged once and retried.
async fn filestore_loop(
    shared: Arc<Shared>,
    path: PathBuf,
    every: Duration,
    shutdown: CancellationToken,
) {
    sync_filestore_forever(
        &shared.repo,
        &shared.metrics,
        &path,
        every,
        shared.cfg.backup_cfg.level,
        &shutdown,
        |what, problem| note_problem(&shared, what, problem),
    )
    .await;
}

/// The filestore sync loop, shared by the daemon and `filestore-sync
/// --every`: one sync, the metrics, `note` for what went wrong (logged once
/// per change by the caller), then sleep.
pub async fn sync_filestore_forever(
    repo: &Repository,
    m: &Metrics,
    path: &std::path::Path,
    every: Duration,
    level: u32,
    shutdown: &CancellationToken,
    note: impl Fn(&'static str, Option<String>),
) {
    let mut state = crate::filestore::SyncState::default();
    loop {
        state.expire(Duration::from_secs(3600));
        // Odoo creates the directory with its first attachment: until then
        // there is nothing to sync, which is not a failure.
        let result = if tokio::fs::metadata(path)
            .await
            .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
        {
            Ok(crate::filestore::SyncReport::default())
        } else {
            tokio::select! {
                r = crate::filestore::sync(repo, path, &mut state, level) => r,
                () = shutdown.cancelled() => return,
            }
        };
        match result {
            Ok(report) => {
                note("the filestore sync failed", None);
                m.filestore_files.inc_by(report.files_uploaded);
                m.filestore_bytes.inc_by(report.bytes_uploaded);
                m.filestore_corrupt
                    .set(i64::try_from(report.corrupt.len()).unwrap_or(i64::MAX));
                m.filestore_last_sync.set(unix_now());
                note(
                    "the filestore holds files whose content does not match their name; they are not uploaded",
                    (!report.corrupt.is_empty()).then(|| report.corrupt.join("; ")),
                );
                if report.files_uploaded > 0 {
                    tracing::info!(
                        files = report.files_uploaded,
                        bytes = report.bytes_uploaded,
                        "filestore synced"
                    );
                }
            }
            Err(e) => note("the filestore sync failed", Some(e.to_string())),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// `filestore-sync --every`: the sync loop alone, as the sidecar of Odoo's
/// pods, serving `/healthz` and the filestore metrics on `/metrics`.
///
/// # Errors
/// `listen` cannot be bound.
pub async fn run_filestore_only(
    repo: Repository,
    path: PathBuf,
    every: Duration,
    level: u32,
    listen: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register_filestore(&mut registry);
    let registry = Arc::new(registry);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}; choose another --listen"))?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                async move { encode_metrics(&registry) }
            }),
        );
    tracing::info!(%listen, path = %path.display(), every = ?every, "filestore sync: serving /healthz /metrics");
    let problems = Problems::default();
    let sync = sync_filestore_forever(
        &repo,
        &metrics,
        &path,
        every,
        level,
        &shutdown,
        |what, problem| {
            problems.note(&repo.url, what, problem);
        },
    );
    let token = shutdown.clone();
    let serve =
        axum::serve(listener, app).with_graceful_shutdown(async move { token.cancelled().await });
    let (served, ()) = tokio::join!(
        async {
            let r = serve.await;
            shutdown.cancel();
            r
        },
        sync
    );
    served?;
    Ok(())
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn refresh_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        refresh(&shared).await;
        tokio::select! {
            () = tokio::time::sleep(shared.cfg.refresh) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// What was wrong, by what was read: each problem is logged once when it
/// appears or changes and once when it clears.
#[derive(Debug, Default)]
struct Problems(Mutex<std::collections::HashMap<&'static str, String>>);

impl Problems {
    /// Logs `problem` under `what` when it appears or changes, and once when
    /// it clears; the same problem at the next round is not logged again.
    fn note(&self, repository: &str, what: &'static str, problem: Option<String>) {
        let mut problems = lock(&self.0);
        match problem {
            Some(p) if problems.get(what) != Some(&p) => {
                tracing::error!(repository, problem = %p, "{what}");
                problems.insert(what, p);
            }
            Some(_) => {}
            None => {
                if problems.remove(what).is_some() {
                    tracing::info!(repository, "resolved: {what}");
                }
            }
        }
    }
}

fn note_problem(shared: &Shared, what: &'static str, problem: Option<String>) {
    shared.problems.note(&shared.repo.url, what, problem);
}

/// Re-reads the repository and PostgreSQL into the metrics and status.
async fn refresh(shared: &Shared) {
    let now = SystemTime::now();
    let owner = shared.repo.owner().await.err().map(|e| e.to_string());
    note_problem(
        shared,
        "the repository is not usable; /readyz answers 503 until it is",
        owner,
    );
    match Catalog::load_cached(&shared.repo.storage, &shared.records).await {
        Ok(mut catalog) => {
            note_problem(shared, "cannot list the repository", None);
            // The window ends at the newest commit, read from the WAL summaries.
            let summaries =
                crate::commands::catalog::resolve_archive_end(&shared.repo, &mut catalog).await;
            note_problem(
                shared,
                "cannot read the WAL summaries; the restorable window's end is an estimate",
                summaries.err().map(|e| format!("{e:#}")),
            );
            shared.metrics.update_from_catalog(&catalog);
            shared
                .metrics
                .update_from_rehearsals(&catalog.rehearsals, shared.cfg.rehearse.rto_objective);
            lock(&shared.status).set_catalog(&catalog, now);
        }
        Err(e) => note_problem(shared, "cannot list the repository", Some(e.to_string())),
    }
    // One connection for everything read from PostgreSQL.
    let client = shared.cfg.pg.connect("pitr-agent daemon").await;
    let archiver = match &client {
        Ok(client) => archiver_stats(client).await,
        Err(e) => Err(anyhow::anyhow!("{e}")),
    };
    note_problem(
        shared,
        "cannot read pg_stat_archiver",
        archiver.as_ref().err().map(ToString::to_string),
    );
    if let Ok((last_wal, last_time, failed)) = archiver {
        if let Some(t) = last_time {
            shared.metrics.archive_last_archived.set(t);
        }
        let mut prev = lock(&shared.last_failed_count);
        if let Some(p) = *prev
            && failed > p
        {
            shared
                .metrics
                .archive_failures
                .inc_by(u64::try_from(failed - p).unwrap_or(0));
        }
        *prev = Some(failed);
        lock(&shared.status).last_archived_wal = last_wal;
    }
    if let Some(pgdata) = &shared.cfg.pgdata {
        let (ready, lag) = ready_backlog(&pgdata.join("pg_wal/archive_status"), now);
        shared
            .metrics
            .archive_ready
            .set(i64::try_from(ready).unwrap_or(i64::MAX));
        shared.metrics.archive_lag.set(lag);
        let mut status = lock(&shared.status);
        status.ready_segments = ready;
        status.archive_lag_seconds = lag;
    }
    if let (Some(cfg), Ok(client)) = (&shared.cfg.stream, &client) {
        match crate::stream::slot_retained_bytes(client, &cfg.slot).await {
            Ok(bytes) => {
                shared.metrics.slot_retained.set(bytes);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read pg_replication_slots"),
        }
    }
    lock(&shared.status).refreshed_at = Some(humantime::format_rfc3339_seconds(now).to_string());
    shared
        .refreshed
        .store(true, std::sync::atomic::Ordering::Release);
}

/// `(last_archived_wal, last_archived_time, failed_count)`.
async fn archiver_stats(
    client: &tokio_postgres::Client,
) -> anyhow::Result<(Option<String>, Option<f64>, i64)> {
    let row = client
        .query_one(
            "SELECT last_archived_wal, extract(epoch FROM last_archived_time)::float8, \
             failed_count FROM pg_stat_archiver",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// `.ready` files and the age of the oldest, from `archive_status`.
fn ready_backlog(dir: &std::path::Path, now: SystemTime) -> (u64, f64) {
    let mut count = 0;
    let mut oldest: Option<SystemTime> = None;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().ends_with(".ready") {
            count += 1;
            if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                oldest = Some(oldest.map_or(m, |o| o.min(m)));
            }
        }
    }
    let lag = oldest
        .and_then(|o| now.duration_since(o).ok())
        .map_or(0.0, |d| d.as_secs_f64());
    (count, lag)
}

async fn schedule_loop(
    shared: Arc<Shared>,
    job: &'static str,
    schedule: Schedule,
    shutdown: CancellationToken,
) {
    loop {
        let Some(next) = schedule.next_after(Utc::now()) else {
            return;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        let lock = if job == "rehearse" {
            &shared.rehearse_lock
        } else {
            &shared.job_lock
        };
        let guard = tokio::select! {
            g = lock.lock() => g,
            () = shutdown.cancelled() => return,
        };
        tokio::select! {
            () = run_job(&shared, job) => {}
            () = shutdown.cancelled() => {
                tracing::warn!(job, "stopped by SIGTERM; an unfinished backup is never committed");
                if job == "backup" {
                    shared.metrics.backup_runs.get_or_create(&Outcome { outcome: "cancelled" }).inc();
                }
                return;
            }
        }
        drop(guard);
        let missed = schedule.missed_between(next, Utc::now());
        if missed > 0 {
            tracing::warn!(
                job,
                missed,
                "scheduled runs were missed: the previous run was still going"
            );
            shared
                .metrics
                .missed_runs
                .get_or_create(&Job { job })
                .inc_by(missed);
        }
        refresh(&shared).await;
    }
}

async fn run_job(shared: &Shared, job: &'static str) {
    let m = &shared.metrics;
    match job {
        "backup" => {
            let result = run_backup(&shared.repo, &shared.cfg.pg, &shared.cfg.backup_cfg).await;
            match &result {
                Ok(record) => {
                    tracing::info!(backup_id = %record.id, "scheduled backup committed");
                    m.backup_runs
                        .get_or_create(&Outcome { outcome: "ok" })
                        .inc();
                    lock(&shared.status).last_backup_error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "scheduled backup failed");
                    m.backup_runs
                        .get_or_create(&Outcome { outcome: "err" })
                        .inc();
                    m.backup_last_failure.set(epoch(SystemTime::now()));
                    lock(&shared.status).last_backup_error = Some(e.to_string());
                }
            }
            if let Some(events) = &shared.events {
                events.backup_outcome(&result).await;
            }
        }
        "rehearse" => {
            // Dropped on SIGTERM, the rehearsal stops its server and removes
            // its scratch directory.
            match crate::rehearse::rehearse(
                &shared.repo,
                &shared.cfg.repo_args,
                &shared.cfg.rehearse,
            )
            .await
            {
                Ok(record) => {
                    if record.ok {
                        tracing::info!("{}", crate::rehearse::summary(&record));
                    } else {
                        tracing::error!("{}", crate::rehearse::summary(&record));
                    }
                    if let Some(events) = &shared.events {
                        events.rehearsal_outcome(&record).await;
                    }
                }
                Err(e) => tracing::error!(error = %e, "scheduled rehearsal could not run"),
            }
        }
        "verify" => {
            let result = async {
                let catalog = Catalog::load_cached(&shared.repo.storage, &shared.records).await?;
                let opts = VerifyOptions {
                    // The sidecar writes the repository anyway: it fills in
                    // summaries that older builds did not store.
                    summarize: true,
                    backup: None,
                    max_age: shared.cfg.verify_max_age,
                    now: SystemTime::now(),
                };
                verify(&shared.repo, &catalog, &opts).await
            }
            .await;
            match &result {
                Ok(report) => {
                    let errors = report
                        .findings
                        .iter()
                        .filter(|f| f.severity == Severity::Error)
                        .count();
                    let warnings = report.findings.len() - errors;
                    for (severity, n) in [("error", errors), ("warning", warnings)] {
                        m.verify_findings
                            .get_or_create(&SeverityLabel { severity })
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                    m.verify_last_success.set(epoch(SystemTime::now()));
                    for f in &report.findings {
                        tracing::warn!(severity = f.severity.as_str(), subject = %f.subject, "{}", f.message);
                    }
                    lock(&shared.status).last_verify = serde_json::to_value(report).ok();
                }
                Err(e) => tracing::error!(error = %e, "scheduled verify could not run"),
            }
            if let Some(events) = &shared.events {
                events.verify_outcome(&result).await;
            }
        }
        _ => {
            let result = async {
                let catalog = Catalog::load_cached(&shared.repo.storage, &shared.records).await?;
                let index =
                    crate::commands::catalog::timeline_index(&shared.repo, &catalog).await?;
                let plan = crate::commands::catalog::plan_retention(
                    &shared.repo,
                    &catalog,
                    &index,
                    &shared.cfg.retention,
                    SystemTime::now(),
                )
                .await?;
                let locked = shared.repo.owner().await?.object_lock.is_some();
                let outcome = crate::prune::apply(
                    &shared.repo.storage,
                    &plan,
                    shared.cfg.retention.debris_grace,
                    locked,
                )
                .await?;
                anyhow::Ok(outcome)
            }
            .await;
            match result {
                Ok(o) => {
                    for (kind, n) in [
                        ("backups", o.backups),
                        ("wal", o.wal_files),
                        ("debris", o.debris),
                        ("filestore", o.filestore_files),
                    ] {
                        m.prune_deleted
                            .get_or_create(&Kind { kind })
                            .inc_by(n as u64);
                    }
                }
                Err(e) => tracing::error!(error = %e, "scheduled prune failed"),
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if let Err(e) = async {
        let client = shared.cfg.pg.connect("pitr-agent readyz").await?;
        client.simple_query("SELECT 1").await?;
        anyhow::Ok(())
    }
    .await
    {
        problems.push(format!("postgresql: {e:#}"));
    }
    if let Err(e) = shared.repo.owner().await {
        problems.push(format!("repository: {e}"));
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("\n") + "\n")
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let mut status = lock(&shared.status).clone();
    status.stream = shared.stream.as_ref().map(|s| lock(s).clone());
    axum::Json(status)
}

async fn metrics_text(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if !shared.refreshed.load(std::sync::atomic::Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "starting: the repository has not been read yet\n".to_owned(),
        );
    }
    if let Some(stream) = &shared.stream {
        shared.metrics.update_from_stream(&lock(stream));
    }
    encode_metrics(&shared.registry)
}

/// `/metrics`: the registry in Prometheus' text format.
fn encode_metrics(
    registry: &Registry,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}
