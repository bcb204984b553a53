//! The `pitr-agent` binary: parses arguments, sets up logging, runs one command.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};

use anyhow::Context as _;
use clap::builder::TypedValueParser as _;
use clap::{Parser, Subcommand};
use std::time::{Duration, SystemTime};

use pitr_agent::archive::{self, FetchConfig, PrefetchRequest, PushConfig};
use pitr_agent::backup::{self, BackupConfig, Checkpoint};
use pitr_agent::catalog::InitOutcome;
use pitr_agent::catalog::backup::{BackupId, Catalog};
use pitr_agent::catalog::retention::{RetentionPlan, RetentionPolicy};
use pitr_agent::cli::{RepoArgs, init_tracing};
use pitr_agent::compress::DEFAULT_LEVEL;
use pitr_agent::daemon::events::EventRecorder;
use pitr_agent::daemon::{self, DaemonConfig, schedule::Schedule};
use pitr_agent::pgconn::PgArgs;
use pitr_agent::verify::{self, VerifyOptions};
use pitr_agent::wal::WalFileName;
use pitr_agent::{prune, report};

/// Continuous WAL archiving and base backups for PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "pitr-agent", version, about, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the repository (idempotent). Run it once, e.g. in the agent's init container.
    Init(InitArgs),
    /// Archive one WAL file. Use as: archive_command = 'pitr-agent wal-push %p'
    WalPush(WalPushArgs),
    /// Restore one WAL file. Use as: restore_command = 'pitr-agent wal-fetch %f %p'
    WalFetch(WalFetchArgs),
    /// Take a base backup with pg_basebackup, streamed into the repository.
    Backup(BackupArgs),
    /// Show backups and the restorable window.
    List(ListArgs),
    /// Re-read backups and check WAL continuity. Exit 0 clean or warnings only, 1 errors, 2 failure.
    Verify(VerifyArgs),
    /// Delete backups and WAL that retention no longer needs.
    Prune(PruneArgs),
    /// Run as a sidecar: scheduled backup/verify/prune, /healthz /readyz /status /metrics.
    Daemon(DaemonArgs),
    /// Fill the prefetch spool (started by wal-fetch; not for direct use).
    #[command(hide = true)]
    WalPrefetch(WalPrefetchArgs),
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Record this data directory's cluster as the owner [default: none yet;
    /// the first wal-push or backup claims the repository].
    #[arg(long, env = "PGDATA")]
    pgdata: Option<PathBuf>,
}

/// Whether a write may create a missing repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum InitMode {
    /// Refuse: a missing repository is a wrong URL or an unmounted volume.
    Never,
    /// Create it, as `pitr-agent init` would (for demos and docker-compose).
    Auto,
}

#[derive(Debug, clap::Args)]
struct InitModeArg {
    /// Whether wal-push and backup may create a missing repository.
    #[arg(long = "init", env = "PITR_INIT", value_enum, default_value_t = InitMode::Never)]
    init: InitMode,
}

impl InitModeArg {
    fn auto(&self) -> bool {
        self.init == InitMode::Auto
    }
}

#[derive(Debug, clap::Args)]
struct WalPushArgs {
    /// The WAL file, as PostgreSQL's %p (relative to the data directory).
    path: PathBuf,
    /// The data directory [default: the current directory, as for archive_command].
    #[arg(long, env = "PGDATA")]
    pgdata: Option<PathBuf>,
    /// Files pushed at once: the requested one plus the next .ready files.
    #[arg(long, env = "PITR_ARCHIVE_PARALLEL", default_value_t = archive::DEFAULT_ARCHIVE_PARALLEL,
          value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    parallel: usize,
    /// gzip level, 1 (fastest) to 9 (smallest).
    #[arg(long, env = "PITR_COMPRESS_LEVEL", default_value_t = DEFAULT_LEVEL,
          value_parser = clap::value_parser!(u32).range(1..=9))]
    compress_level: u32,
    /// Spool directory for markers [default: pitr_spool beside the WAL file].
    #[arg(long, env = "PITR_SPOOL")]
    spool: Option<PathBuf>,
    #[command(flatten)]
    init: InitModeArg,
}

#[derive(Debug, clap::Args)]
struct WalFetchArgs {
    /// The WAL file name, as PostgreSQL's %f.
    name: String,
    /// Where to write it, as PostgreSQL's %p.
    path: PathBuf,
    /// Segments to keep prefetched in the spool; 0 disables prefetching.
    #[arg(long, env = "PITR_FETCH_PREFETCH", default_value_t = archive::DEFAULT_PREFETCH,
          value_parser = clap::value_parser!(u16).range(0..=256).map(usize::from))]
    prefetch: usize,
    /// Spool directory [default: pitr_spool beside the destination].
    #[arg(long, env = "PITR_SPOOL")]
    spool: Option<PathBuf>,
    /// How long to retry a repository that times out or answers 5xx before
    /// exiting 128, which stops recovery (exit 1 means only "not in the repository").
    #[arg(long, env = "PITR_FETCH_RETRY_FOR", default_value = "5m", value_parser = humantime::parse_duration)]
    retry_for: Duration,
}

#[derive(Debug, clap::Args)]
struct BackupArgs {
    #[command(flatten)]
    pg: PgArgs,
    #[command(flatten)]
    init: InitModeArg,
    /// How the backup's checkpoint is taken.
    #[arg(long, env = "PITR_BACKUP_CHECKPOINT", value_enum, default_value_t = Checkpoint::Fast)]
    checkpoint: Checkpoint,
    /// Limit the read rate on the server, as pg_basebackup --max-rate (e.g. 100M).
    #[arg(long, env = "PITR_BACKUP_MAX_RATE")]
    max_rate: Option<String>,
    /// gzip level, 1 (fastest) to 9 (smallest).
    #[arg(long, env = "PITR_COMPRESS_LEVEL", default_value_t = DEFAULT_LEVEL,
          value_parser = clap::value_parser!(u32).range(1..=9))]
    compress_level: u32,
    /// Compression threads [default: the number of CPUs].
    #[arg(long, env = "PITR_COMPRESS_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=256).map(usize::from))]
    compress_threads: Option<usize>,
    /// Print the committed backup.json instead of a summary line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    clock: ClockArgs,
}

#[derive(Debug, clap::Args)]
struct VerifyArgs {
    /// Only this backup's data (WAL is checked from its start).
    #[arg(long)]
    backup: Option<BackupId>,
    /// An error when the newest backup is older than this, e.g. 26h.
    #[arg(long, env = "PITR_VERIFY_MAX_AGE", value_parser = humantime::parse_duration)]
    max_age: Option<Duration>,
    /// Exit 1 on warnings too (incomplete backups, old uploads), not only on errors.
    #[arg(long, env = "PITR_VERIFY_STRICT")]
    strict: bool,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    clock: ClockArgs,
}

#[derive(Debug, clap::Args)]
struct PruneArgs {
    /// Keep the newest N backups.
    #[arg(long, env = "PITR_RETAIN_FULL")]
    retain_full: Option<usize>,
    /// Keep every point of the last D days restorable.
    #[arg(long, env = "PITR_RETAIN_DAYS")]
    retain_days: Option<u32>,
    /// Incomplete backups younger than this are left alone (they may be running).
    #[arg(long, env = "PITR_DEBRIS_GRACE", default_value = "24h", value_parser = humantime::parse_duration)]
    debris_grace: Duration,
    /// Print the plan and delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    clock: ClockArgs,
}

#[derive(Debug, clap::Args)]
struct DaemonArgs {
    #[command(flatten)]
    pg: PgArgs,
    #[command(flatten)]
    init: InitModeArg,
    /// Address for /healthz /readyz /status /metrics (postgres_exporter uses 9187).
    #[arg(long, env = "PITR_LISTEN", default_value = "0.0.0.0:9188")]
    listen: std::net::SocketAddr,
    /// Backup schedule, five-field cron in UTC (or six with seconds); empty disables.
    #[arg(long, env = "PITR_BACKUP_SCHEDULE", default_value = "0 2 * * *")]
    backup_schedule: String,
    /// Verify schedule; empty disables.
    #[arg(long, env = "PITR_VERIFY_SCHEDULE", default_value = "0 5 * * *")]
    verify_schedule: String,
    /// Prune schedule (needs a retention policy); empty disables.
    #[arg(long, env = "PITR_PRUNE_SCHEDULE", default_value = "")]
    prune_schedule: String,
    /// How often figures are re-read from the repository and PostgreSQL.
    #[arg(long, env = "PITR_REFRESH", default_value = "60s", value_parser = humantime::parse_duration)]
    refresh: Duration,
    /// The data directory, for the .ready backlog [default: none].
    #[arg(long, env = "PGDATA")]
    pgdata: Option<std::path::PathBuf>,
    /// Keep the newest N backups (scheduled prune).
    #[arg(long, env = "PITR_RETAIN_FULL")]
    retain_full: Option<usize>,
    /// Keep every point of the last D days restorable (scheduled prune).
    #[arg(long, env = "PITR_RETAIN_DAYS")]
    retain_days: Option<u32>,
    /// Warn in verify when the newest backup is older than this.
    #[arg(long, env = "PITR_VERIFY_MAX_AGE", default_value = "26h", value_parser = humantime::parse_duration)]
    max_age: Duration,
    /// Limit scheduled backups' read rate on the server (pg_basebackup --max-rate).
    #[arg(long, env = "PITR_BACKUP_MAX_RATE")]
    max_rate: Option<String>,
}

#[derive(Debug, clap::Args)]
struct ClockArgs {
    /// The time to act as of, RFC 3339 (for tests and what-if runs).
    #[arg(long, env = "PITR_NOW", hide = true, value_parser = humantime::parse_rfc3339_weak)]
    now: Option<SystemTime>,
}

impl ClockArgs {
    fn now(&self) -> SystemTime {
        self.now.unwrap_or_else(SystemTime::now)
    }
}

#[derive(Debug, clap::Args)]
struct WalPrefetchArgs {
    after: String,
    #[arg(long)]
    segment_size: u32,
    #[arg(long)]
    spool: PathBuf,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    // restore_command must never exit 1-125 for anything but "not found":
    // PostgreSQL would end recovery there. Usage errors and panics of
    // wal-fetch therefore exit 128 (see archive::FETCH_EXIT_FATAL).
    let fetching = std::env::args().any(|a| a == "wal-fetch");
    if fetching {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("pitr-agent wal-fetch: internal error: {info}; stopping recovery");
            std::process::exit(i32::from(archive::FETCH_EXIT_FATAL));
        }));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if fetching && e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(archive::FETCH_EXIT_FATAL);
        }
        Err(e) => e.exit(),
    };
    let fatal = if matches!(cli.command, Command::WalFetch(_)) {
        archive::FETCH_EXIT_FATAL
    } else {
        2
    };
    init_tracing("warn");
    // The daemon serves HTTP while jobs run; one-shot commands need one thread.
    let runtime = if matches!(cli.command, Command::Daemon(_)) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pitr-agent: error: cannot start the async runtime: {e}");
            return ExitCode::from(fatal);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pitr-agent: error: {e:#}");
            ExitCode::from(fatal)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Init(args) => {
            let repo = cli.repo.open().await?;
            let cluster = match &args.pgdata {
                Some(dir) => match pitr_agent::pgdata::system_identifier(dir) {
                    Ok(id) => Some(id),
                    // An init container runs before initdb: the first push claims it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("cannot read {}", dir.join("global/pg_control").display())
                        });
                    }
                },
                None => None,
            };
            let outcome = repo
                .init(cluster)
                .await
                .with_context(|| format!("init {}", repo.url))?;
            let owned_by = |o: &pitr_agent::catalog::RepositoryOwner| match &o.system_identifier {
                Some(id) => format!("owned by the cluster with system identifier {id}"),
                None => "no owner yet: the first wal-push or backup claims it".to_owned(),
            };
            match &outcome {
                InitOutcome::Created(o) => {
                    println!("created repository {}; {}", repo.url, owned_by(o));
                }
                InitOutcome::Existed(o) => println!(
                    "repository {} already exists (created {} by {}); nothing changed; {}",
                    repo.url,
                    o.created_at,
                    o.created_by,
                    owned_by(o)
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::WalPush(args) => {
            let repo = cli.repo.open().await?;
            let pgdata = match args.pgdata {
                Some(dir) => dir,
                None => {
                    std::env::current_dir().context("cannot determine the current directory")?
                }
            };
            let cfg = PushConfig {
                pgdata,
                spool: args.spool,
                parallel: args.parallel,
                level: args.compress_level,
                auto_init: args.init.auto(),
            };
            let outcome = archive::wal_push(&repo, &args.path, &cfg)
                .await
                .with_context(|| format!("wal-push {}", args.path.display()))?;
            tracing::info!(file = %args.path.display(), ?outcome, "archived");
            Ok(ExitCode::SUCCESS)
        }
        Command::WalFetch(args) => {
            let repo = cli.repo.open().await?;
            let cfg = FetchConfig {
                spool: args.spool,
                prefetch: args.prefetch,
            };
            match archive::wal_fetch_retrying(&repo, &args.name, &args.path, &cfg, args.retry_for)
                .await
            {
                Ok((outcome, request)) => {
                    tracing::info!(file = %args.name, ?outcome, "restored");
                    if let Some(request) = request {
                        spawn_prefetcher(&cli.repo, &request, args.prefetch);
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) if e.is_not_in_repository() => {
                    // PostgreSQL asks for files past the end of the archive; say so quietly.
                    eprintln!("pitr-agent wal-fetch: {e}");
                    Ok(ExitCode::from(archive::FETCH_EXIT_NOT_FOUND))
                }
                Err(e) => {
                    // One line, in the server log, naming the object and the cause.
                    eprintln!(
                        "pitr-agent wal-fetch: FATAL: cannot restore {}: {e}; stopping recovery \
                         (exit {}) instead of treating it as the end of the archive",
                        args.name,
                        archive::FETCH_EXIT_FATAL
                    );
                    Ok(ExitCode::from(archive::FETCH_EXIT_FATAL))
                }
            }
        }
        Command::Backup(args) => {
            let repo = cli.repo.open().await?;
            let pg = args.pg.resolve();
            let cfg = BackupConfig {
                checkpoint: args.checkpoint,
                max_rate: args.max_rate,
                level: args.compress_level,
                threads: args.compress_threads.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
                }),
                auto_init: args.init.auto(),
            };
            let events = EventRecorder::from_env().await;
            let result = backup::run_backup(&repo, &pg, &cfg).await;
            if let Some(events) = &events {
                events.backup_outcome(&result).await;
            }
            let record =
                result.with_context(|| format!("backup of {} into {}", pg.describe(), repo.url))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&record)?);
            } else {
                println!(
                    "backup {} committed: {} read, {} stored, WAL {}..{} (LSN {}..{}, timeline {}), took {}",
                    record.id,
                    report::bytes(record.raw_bytes),
                    report::bytes(record.stored_bytes),
                    record.first_wal,
                    record.last_wal,
                    record.start_lsn,
                    record.stop_lsn,
                    record.timeline,
                    report::age(record.duration())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List(args) => {
            let repo = cli.repo.open().await?;
            repo.owner().await?;
            let catalog = Catalog::load(&repo.storage)
                .await
                .with_context(|| format!("list {}", repo.url))?;
            let listing = report::listing(&catalog, args.clock.now());
            if args.json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print!("{}", report::listing_table(&listing));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify(args) => {
            let repo = cli.repo.open().await?;
            repo.owner().await?;
            let catalog = Catalog::load(&repo.storage)
                .await
                .with_context(|| format!("verify {}", repo.url))?;
            let opts = VerifyOptions {
                backup: args.backup,
                max_age: args.max_age,
                now: args.clock.now(),
            };
            let events = EventRecorder::from_env().await;
            let result = verify::verify(&repo.storage, &catalog, &opts).await;
            if let Some(events) = &events {
                events.verify_outcome(&result).await;
            }
            let result = result.with_context(|| format!("verify {}", repo.url))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                print!("{}", report::verify_text(&result));
            }
            Ok(ExitCode::from(result.exit_code(args.strict)))
        }
        Command::Prune(args) => {
            let repo = cli.repo.open().await?;
            repo.owner().await?;
            let catalog = Catalog::load(&repo.storage)
                .await
                .with_context(|| format!("prune {}", repo.url))?;
            let policy = RetentionPolicy {
                retain_full: args.retain_full,
                retain_days: args.retain_days,
                debris_grace: args.debris_grace,
            };
            let plan = RetentionPlan::compute(&catalog, &policy, args.clock.now())?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", report::plan_text(&plan, args.dry_run));
            }
            if !args.dry_run {
                let outcome = prune::apply(&repo.storage, &plan, args.debris_grace)
                    .await
                    .with_context(|| format!("prune {}", repo.url))?;
                if !args.json && (!plan.is_empty() || outcome.temp_files > 0) {
                    println!(
                        "deleted {} backups, {} WAL files ({}), {} incomplete backups, \
                         {} temp files of interrupted writes",
                        outcome.backups,
                        outcome.wal_files,
                        report::bytes(outcome.wal_bytes),
                        outcome.debris,
                        outcome.temp_files
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Daemon(args) => {
            let repo = cli.repo.open().await?;
            let parse = |text: &str| -> anyhow::Result<Option<Schedule>> {
                if text.trim().is_empty() {
                    Ok(None)
                } else {
                    Ok(Some(text.parse()?))
                }
            };
            let prune = parse(&args.prune_schedule)?;
            if prune.is_some() && args.retain_full.is_none() && args.retain_days.is_none() {
                anyhow::bail!(
                    "PITR_PRUNE_SCHEDULE is set but no retention policy: set PITR_RETAIN_FULL \
                     and/or PITR_RETAIN_DAYS"
                );
            }
            let cfg = DaemonConfig {
                listen: args.listen,
                backup: parse(&args.backup_schedule)?,
                verify: parse(&args.verify_schedule)?,
                prune,
                refresh: args.refresh,
                pg: args.pg.resolve(),
                pgdata: args.pgdata,
                backup_cfg: BackupConfig {
                    checkpoint: Checkpoint::Fast,
                    max_rate: args.max_rate,
                    level: DEFAULT_LEVEL,
                    threads: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
                    auto_init: args.init.auto(),
                },
                retention: RetentionPolicy {
                    retain_full: args.retain_full,
                    retain_days: args.retain_days,
                    debris_grace: Duration::from_secs(24 * 3600),
                },
                verify_max_age: Some(args.max_age),
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            let token = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutting down");
                token.cancel();
            });
            daemon::run(repo, cfg, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::WalPrefetch(args) => {
            // Never fail and never panic: the foreground fetch covers any gap,
            // and PostgreSQL may be this orphan's reaper (PID 1 in a container).
            let Ok(after) = args.after.parse::<WalFileName>() else {
                return Ok(ExitCode::SUCCESS);
            };
            if let Ok(repo) = cli.repo.open().await {
                let request = PrefetchRequest {
                    after,
                    segment_size: args.segment_size,
                    spool: args.spool,
                    data_dir: args.data_dir,
                };
                let task =
                    tokio::spawn(
                        async move { archive::prefetch(&repo, &request, args.count).await },
                    );
                let _ = task.await;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT.
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Starts a detached prefetcher so that PostgreSQL can replay while it downloads.
fn spawn_prefetcher(repo: &RepoArgs, request: &PrefetchRequest, count: usize) {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(repo.to_args())
        .arg("wal-prefetch")
        .arg(request.after.as_str())
        .arg("--segment-size")
        .arg(request.segment_size.to_string())
        .arg("--spool")
        .arg(&request.spool)
        .arg("--count")
        .arg(count.to_string())
        .args(
            request
                .data_dir
                .iter()
                .flat_map(|d| [std::ffi::OsStr::new("--data-dir"), d.as_os_str()]),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if let Err(e) = cmd.spawn() {
        tracing::debug!(error = %e, "could not start the prefetcher");
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
