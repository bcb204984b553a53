//! `backup`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::builder::TypedValueParser as _;

use super::archive::InitModeArg;
use crate::backup::{self, BackupConfig, Checkpoint};
use crate::cli::RepoArgs;
use crate::compress::DEFAULT_LEVEL;
use crate::daemon::events::EventRecorder;
use crate::pgconn::PgArgs;
use crate::report;

/// How backups are taken, shared by `backup` and the daemon's scheduled ones.
#[derive(Debug, Clone, clap::Args)]
pub struct BackupSettings {
    /// How the backup's checkpoint is taken.
    #[arg(long, env = "PITR_BACKUP_CHECKPOINT", value_enum, default_value_t = Checkpoint::Fast)]
    pub checkpoint: Checkpoint,
    /// Limit the read rate on the server, as pg_basebackup --max-rate (e.g. 100M).
    #[arg(long, env = "PITR_BACKUP_MAX_RATE")]
    pub max_rate: Option<String>,
    /// gzip level, 1 (fastest) to 9 (smallest).
    #[arg(long, env = "PITR_COMPRESS_LEVEL", default_value_t = DEFAULT_LEVEL,
          value_parser = clap::value_parser!(u32).range(1..=9))]
    pub compress_level: u32,
    /// Compression threads [default: the number of CPUs].
    #[arg(long, env = "PITR_COMPRESS_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=256).map(usize::from))]
    pub compress_threads: Option<usize>,
    /// `--init`.
    #[command(flatten)]
    pub init: InitModeArg,
}

impl BackupSettings {
    /// The settings of [`backup::run_backup`].
    #[must_use]
    pub fn resolve(&self) -> BackupConfig {
        BackupConfig {
            checkpoint: self.checkpoint,
            max_rate: self.max_rate.clone(),
            level: self.compress_level,
            threads: self.compress_threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
            }),
            auto_init: self.init.auto(),
        }
    }
}

/// `backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// How to reach PostgreSQL.
    #[command(flatten)]
    pub pg: PgArgs,
    /// How the backup is taken.
    #[command(flatten)]
    pub settings: BackupSettings,
    /// Print the committed backup.json instead of a summary line.
    #[arg(long)]
    pub json: bool,
}

impl BackupArgs {
    /// Takes a backup; exit 0 once its `backup.json` is committed.
    ///
    /// # Errors
    /// See [`backup::BackupError`].
    pub async fn run(self, repo: &RepoArgs) -> anyhow::Result<ExitCode> {
        let repo = repo.open().await?;
        let pg = self.pg.resolve()?;
        let cfg = self.settings.resolve();
        let events = EventRecorder::from_env().await;
        let result = backup::run_backup(&repo, &pg, &cfg).await;
        if let Some(events) = &events {
            events.backup_outcome(&result).await;
        }
        let record =
            result.with_context(|| format!("backup of {} into {}", pg.describe(), repo.url))?;
        if self.json {
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
}
