//! The commands of both binaries: each is an argument struct (clap) that
//! resolves into a library call, and a handler that prints its outcome and
//! maps it to an exit code. `pitr-agent`'s and `pgrestore`'s mains only parse
//! and hand over to [`crate::cli::run_main`].
//!
//! - [`archive`]: `init`, `wal-push`, `wal-fetch` (and its prefetcher);
//! - [`catalog`]: `list` (shared by both binaries), `verify`, `prune`;
//! - `backup` (feature `daemon`, for its Kubernetes Events): `backup`;
//! - `daemon` (feature `daemon`): the sidecar, reusing the one-shot
//!   commands' settings.

pub mod archive;
#[cfg(feature = "daemon")]
pub mod backup;
pub mod catalog;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod filestore;
#[cfg(feature = "daemon")]
pub mod key;
#[cfg(feature = "daemon")]
pub mod rehearse;

#[cfg(feature = "daemon")]
use std::process::ExitCode;
use std::time::SystemTime;

#[cfg(feature = "daemon")]
use crate::cli::RepoArgs;

/// `pitr-agent`'s commands.
#[cfg(feature = "daemon")]
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create the repository (idempotent). Run it once, e.g. in the agent's init container.
    Init(archive::InitArgs),
    /// Archive one WAL file. Use as: archive_command = 'pitr-agent wal-push %p'
    WalPush(archive::WalPushArgs),
    /// Restore one WAL file. Use as: restore_command = 'pitr-agent wal-fetch %f %p'
    WalFetch(archive::WalFetchArgs),
    /// Take a base backup with pg_basebackup, streamed into the repository.
    Backup(backup::BackupArgs),
    /// Show backups and the restorable window.
    List(catalog::ListArgs),
    /// Re-read backups and check WAL continuity. Exit 0 clean or warnings only, 1 errors, 2 failure.
    Verify(catalog::VerifyArgs),
    /// Delete backups and WAL that retention no longer needs.
    Prune(catalog::PruneArgs),
    /// Restore into a scratch directory, check it, report the proven point
    /// and the restore time. Exit 0 proven, 1 a problem found, 2 failure.
    Rehearse(rehearse::RehearseArgs),
    /// Upload the Odoo filestore's new files (each checked against its
    /// SHA-1 name). Exit 0 once all are durable, 1 when a file's content does
    /// not match its name (reported, never uploaded), 2 failure.
    FilestoreSync(filestore::FilestoreSyncArgs),
    /// Manage the age keys of an encrypted repository: `key generate`, `key add`.
    Key(key::KeyArgs),
    /// Run as a sidecar: scheduled backup/verify/prune, /healthz /readyz /status /metrics.
    Daemon(Box<daemon::DaemonArgs>),
    /// Fill the prefetch spool (started by wal-fetch; not for direct use).
    #[command(hide = true)]
    WalPrefetch(archive::WalPrefetchArgs),
}

#[cfg(feature = "daemon")]
impl Command {
    /// The exit status for a failure this command could not report itself:
    /// 128 for `wal-fetch` (see [`crate::archive::FETCH_EXIT_FATAL`]), else 2.
    #[must_use]
    pub fn fatal_exit_code(&self) -> u8 {
        match self {
            Command::WalFetch(_) => crate::archive::FETCH_EXIT_FATAL,
            _ => 2,
        }
    }

    /// Whether the command needs a multi-threaded runtime (the daemon serves
    /// HTTP while jobs run; one-shot commands need one thread).
    #[must_use]
    pub fn multi_threaded(&self) -> bool {
        matches!(self, Command::Daemon(_))
    }

    /// Runs the command.
    ///
    /// # Errors
    /// Whatever the command failed on, with context; printed by `run_main`.
    pub async fn run(self, repo: RepoArgs) -> anyhow::Result<ExitCode> {
        match self {
            Command::Init(args) => args.run(&repo).await,
            Command::WalPush(args) => args.run(&repo).await,
            Command::WalFetch(args) => args.run(&repo).await,
            Command::Backup(args) => args.run(&repo).await,
            Command::List(args) => args.run(&repo).await,
            Command::Verify(args) => args.run(&repo).await,
            Command::Prune(args) => args.run(&repo).await,
            Command::Rehearse(args) => args.run(&repo).await,
            Command::Daemon(args) => args.run(&repo).await,
            Command::FilestoreSync(args) => args.run(&repo).await,
            Command::Key(args) => args.run(&repo).await,
            Command::WalPrefetch(args) => Ok(args.run(&repo).await),
        }
    }
}

/// The time to act as of.
#[derive(Debug, Clone, clap::Args)]
pub struct ClockArgs {
    /// The time to act as of, RFC 3339 (for tests and what-if runs).
    #[arg(long, env = "PITR_NOW", hide = true, value_parser = humantime::parse_rfc3339_weak)]
    pub now: Option<SystemTime>,
}

impl ClockArgs {
    /// `--now`, or the clock.
    #[must_use]
    pub fn now(&self) -> SystemTime {
        self.now.unwrap_or_else(SystemTime::now)
    }
}
