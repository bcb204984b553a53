//! `daemon`: the sidecar, with the one-shot commands' own settings.

use std::process::ExitCode;
use std::time::Duration;

use super::backup::BackupSettings;
use super::catalog::RetentionArgs;
use crate::cli::RepoArgs;
use crate::daemon::{self, DaemonConfig, schedule::Schedule};
use crate::pgconn::PgArgs;
use crate::stream::StreamConfig;

/// `daemon`.
#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// How to reach PostgreSQL.
    #[command(flatten)]
    pub pg: PgArgs,
    /// Address for /healthz /readyz /status /metrics (postgres_exporter uses 9187).
    #[arg(long, env = "PITR_LISTEN", default_value = "0.0.0.0:9188")]
    pub listen: std::net::SocketAddr,
    /// Backup schedule, five-field cron in UTC (or six with seconds); empty disables.
    #[arg(long, env = "PITR_BACKUP_SCHEDULE", default_value = "0 2 * * *")]
    pub backup_schedule: String,
    /// Verify schedule; empty disables.
    #[arg(long, env = "PITR_VERIFY_SCHEDULE", default_value = "0 5 * * *")]
    pub verify_schedule: String,
    /// Prune schedule (needs a retention policy); empty disables.
    #[arg(long, env = "PITR_PRUNE_SCHEDULE", default_value = "")]
    pub prune_schedule: String,
    /// How often figures are re-read from the repository and PostgreSQL.
    #[arg(long, env = "PITR_REFRESH", default_value = "60s", value_parser = crate::cli::parse_duration)]
    pub refresh: Duration,
    /// The data directory, for the .ready backlog [default: none].
    #[arg(long, env = "PGDATA")]
    pub pgdata: Option<std::path::PathBuf>,
    /// Scheduled verify: an error when the newest backup is older than this.
    #[arg(long, env = "PITR_VERIFY_MAX_AGE", default_value = "26h", value_parser = crate::cli::parse_duration)]
    pub max_age: Duration,
    /// Stream WAL over the replication protocol as it is written (on/off).
    #[arg(long, env = "PITR_STREAM", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new(), default_value = "off", hide_possible_values = true)]
    pub stream: bool,
    /// The physical replication slot the stream uses, created if missing;
    /// also its application_name for synchronous_standby_names.
    #[arg(long, env = "PITR_STREAM_SLOT", default_value = crate::stream::DEFAULT_SLOT)]
    pub stream_slot: String,
    /// Async stream: how often the segment being written is stored.
    #[arg(long, env = "PITR_STREAM_FLUSH", default_value = "5s", value_parser = crate::cli::parse_duration)]
    pub stream_flush: Duration,
    /// Sync stream: store new WAL at once. With synchronous_standby_names =
    /// 'pitr_agent', a commit returns only once it is in the repository.
    #[arg(long, env = "PITR_STREAM_SYNC", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new(), default_value = "off", hide_possible_values = true)]
    pub stream_sync: bool,
    /// Odoo's filestore (`<data_dir>/filestore`) to sync into the repository
    /// every --filestore-interval; unset: no filestore sync.
    #[arg(long, env = "PITR_FILESTORE_PATH")]
    pub filestore_path: Option<std::path::PathBuf>,
    /// How often the filestore is synced: the longest a new attachment
    /// waits before it is durable in the repository.
    #[arg(long, env = "PITR_FILESTORE_INTERVAL", default_value = "60s", value_parser = crate::cli::parse_duration)]
    pub filestore_interval: Duration,
    /// Restore rehearsal schedule (`pitr-agent rehearse --target latest`); empty disables.
    /// It runs beside backups, never blocking them.
    #[arg(long, env = "PITR_REHEARSE_SCHEDULE", default_value = "0 4 * * *")]
    pub rehearse_schedule: String,
    /// Scheduled rehearsals: the same settings as `rehearse`.
    #[command(flatten)]
    pub rehearse: super::rehearse::RehearseSettings,
    /// Scheduled backups: the same settings as `backup`.
    #[command(flatten)]
    pub backup: BackupSettings,
    /// Scheduled prune: the same policy as `prune`.
    #[command(flatten)]
    pub retention: RetentionArgs,
}

impl DaemonArgs {
    /// The daemon's configuration.
    ///
    /// # Errors
    /// A schedule does not parse; a prune schedule without a retention policy.
    pub fn resolve(self, repo_args: &RepoArgs) -> anyhow::Result<DaemonConfig> {
        let parse = |text: &str| -> anyhow::Result<Option<Schedule>> {
            if text.trim().is_empty() {
                Ok(None)
            } else {
                Ok(Some(text.parse()?))
            }
        };
        let prune = parse(&self.prune_schedule)?;
        if prune.is_some() && !self.retention.is_set() {
            anyhow::bail!(
                "PITR_PRUNE_SCHEDULE is set but no retention policy: set PITR_RETAIN_FULL \
                 and/or PITR_RETAIN_DAYS"
            );
        }
        if self.stream_flush.is_zero() {
            anyhow::bail!("PITR_STREAM_FLUSH must be above zero, e.g. 5s");
        }
        let backup_cfg = self.backup.resolve();
        let stream = self.stream.then(|| StreamConfig {
            slot: self.stream_slot.clone(),
            flush_every: self.stream_flush,
            sync: self.stream_sync,
            level: backup_cfg.level,
            auto_init: backup_cfg.auto_init,
        });
        let rehearse =
            self.rehearse
                .resolve(crate::rehearse::RehearseTarget::Latest, &self.pg, None)?;
        // A writer of an encrypted repository holds no identity: reading
        // jobs would fail every time. They run where the identity is (the
        // restore-rehearsal CronJob, an operator's verify).
        let cannot_read = !repo_args.encrypt_to.is_empty() && repo_args.identity_file.is_none();
        let reading = |name: &str, schedule: &str| -> anyhow::Result<_> {
            let parsed = parse(schedule)?;
            if parsed.is_some() && cannot_read {
                tracing::warn!(
                    job = name,
                    "the repository is encrypted and this daemon has no PITR_IDENTITY_FILE:                      its scheduled {name} is off; run it where the identity is mounted"
                );
                return Ok(None);
            }
            Ok(parsed)
        };
        Ok(DaemonConfig {
            listen: self.listen,
            stream,
            rehearse_schedule: reading("rehearse", &self.rehearse_schedule)?,
            rehearse,
            repo_args: repo_args.clone(),
            backup: parse(&self.backup_schedule)?,
            verify: reading("verify", &self.verify_schedule)?,
            prune,
            refresh: self.refresh,
            pg: self.pg.resolve()?,
            pgdata: self.pgdata,
            backup_cfg,
            retention: self.retention.resolve(),
            verify_max_age: Some(self.max_age),
            filestore: self
                .filestore_path
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| (p, self.filestore_interval.max(Duration::from_secs(1)))),
        })
    }

    /// Runs until SIGTERM or SIGINT.
    ///
    /// # Errors
    /// A bad configuration; the HTTP port cannot be bound.
    pub async fn run(self, repo: &RepoArgs) -> anyhow::Result<ExitCode> {
        let cfg = self.resolve(repo)?;
        let repo = repo.open().await?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            crate::cli::wait_for_signal().await;
            tracing::info!("shutting down");
            token.cancel();
        });
        daemon::run(repo, cfg, shutdown).await?;
        Ok(ExitCode::SUCCESS)
    }
}
