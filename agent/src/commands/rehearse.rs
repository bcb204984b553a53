//! `rehearse`: restore the repository into a scratch directory, check it,
//! and report the proven restorable point and the time it took.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::RepoArgs;
use crate::pgconn::PgArgs;
use crate::rehearse::{self, RehearseConfig, RehearseTarget};
use crate::restore::files;

/// What a rehearsal checks and where it works: `rehearse`'s flags, and the
/// daemon's for its schedule.
#[derive(Debug, Clone, clap::Args)]
pub struct RehearseSettings {
    /// Where the scratch directory is made (removed afterwards, whatever
    /// happens) [default: the system temp directory].
    #[arg(long = "rehearse-dir", env = "PITR_REHEARSE_DIR")]
    pub dir: Option<PathBuf>,
    /// A file of SELECTs that must each return true, e.g.
    /// `select count(*) > 0 from res_users;`.
    #[arg(long = "rehearse-sql", env = "PITR_REHEARSE_SQL")]
    pub sql: Option<PathBuf>,
    /// The database the rehearsal's SQL checks run in.
    #[arg(
        long = "rehearse-database",
        env = "PITR_REHEARSE_DATABASE",
        default_value = "postgres"
    )]
    pub sql_database: String,
    /// pg_amcheck --heapallindexed: slower, also checks that every index
    /// entry's tuple exists.
    #[arg(long = "rehearse-heapallindexed", env = "PITR_REHEARSE_HEAPALLINDEXED")]
    pub heapallindexed: bool,
    /// The restore time you promise (RTO): a rehearsal whose restore and
    /// replay take longer fails, and PitrRestoreTooSlow fires.
    #[arg(long, env = "PITR_RTO_OBJECTIVE", value_parser = crate::cli::parse_duration)]
    pub rto_objective: Option<Duration>,
    /// Give up on replay after this long.
    #[arg(long = "rehearse-timeout", env = "PITR_REHEARSE_TIMEOUT", default_value = "2h", value_parser = crate::cli::parse_duration)]
    pub timeout: Duration,
}

impl RehearseSettings {
    /// The configuration, for `target`, connecting as `pg`'s user with its programs.
    ///
    /// # Errors
    /// This program's path cannot be found (for restore_command).
    pub fn resolve(
        &self,
        target: RehearseTarget,
        pg: &crate::pgconn::PgArgs,
        agent: Option<&std::path::Path>,
    ) -> anyhow::Result<RehearseConfig> {
        let agent = match agent {
            Some(a) => files::find_agent(Some(a))?,
            None => std::env::current_exe()?,
        };
        let mut target_pg = pg.resolve()?;
        if pg.user.as_deref().is_none_or(str::is_empty) {
            "postgres".clone_into(&mut target_pg.user);
        }
        Ok(RehearseConfig {
            target,
            scratch_parent: self.dir.clone().unwrap_or_else(std::env::temp_dir),
            sql: self.sql.clone(),
            sql_database: self.sql_database.clone(),
            heapallindexed: self.heapallindexed,
            rto_objective: self.rto_objective,
            agent,
            pg: target_pg,
            timeout: self.timeout,
        })
    }
}

/// `rehearse`.
#[derive(Debug, clap::Args)]
pub struct RehearseArgs {
    /// Which point to prove: latest (every archived and streamed commit) or
    /// random (a random second of the restorable window).
    #[arg(long, value_enum, default_value_t = RehearseTarget::Latest)]
    pub target: RehearseTarget,
    /// Where, what and how long.
    #[command(flatten)]
    pub settings: RehearseSettings,
    /// The pitr-agent binary for restore_command [default: this one].
    #[arg(long, env = "PITR_AGENT")]
    pub agent: Option<PathBuf>,
    /// Where PostgreSQL's programs are (PG_BIN) and the superuser (PGUSER).
    #[command(flatten)]
    pub pg: PgArgs,
    /// The record as JSON.
    #[arg(long)]
    pub json: bool,
}

impl RehearseArgs {
    /// Runs one rehearsal. Exit 0: restored and every check passed; 1: the
    /// rehearsal found a problem (the record says which); 2: it could not run.
    ///
    /// # Errors
    /// The repository cannot be opened or read.
    pub async fn run(self, repo_args: &RepoArgs) -> anyhow::Result<ExitCode> {
        let repo = repo_args.open().await?;
        repo.owner().await?;
        let cfg = self
            .settings
            .resolve(self.target, &self.pg, self.agent.as_deref())?;
        let record = tokio::select! {
            r = rehearse::rehearse(&repo, repo_args, &cfg) => r?,
            () = crate::cli::wait_for_signal() => {
                // Dropping the rehearsal stopped its server and removed its
                // scratch directory.
                anyhow::bail!("stopped by a signal; the scratch directory and its server are gone");
            }
        };
        #[cfg(feature = "daemon")]
        if let Some(events) = crate::daemon::events::EventRecorder::from_env().await {
            events.rehearsal_outcome(&record).await;
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&record)?);
        } else {
            println!("{}", rehearse::summary(&record));
        }
        Ok(ExitCode::from(u8::from(!record.ok)))
    }
}
