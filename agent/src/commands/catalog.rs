//! `list` (shared by `pitr-agent` and `pgrestore`), `verify` and `prune`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

use super::ClockArgs;
use crate::catalog::backup::{BackupId, Catalog};
use crate::catalog::retention::{RetentionPlan, RetentionPolicy};
use crate::cli::RepoArgs;
use crate::repository::Repository;
use crate::verify::{self, VerifyOptions};
use crate::{prune, report};

/// Opens the repository, refuses a location without one, and lists it;
/// errors say `{what} URL`.
///
/// # Errors
/// No repository at the URL; the listing fails.
pub async fn open_catalog(args: &RepoArgs, what: &str) -> anyhow::Result<(Repository, Catalog)> {
    let repo = args.open().await?;
    repo.owner().await?;
    let catalog = Catalog::load(&repo.storage)
        .await
        .with_context(|| format!("{what} {}", repo.url))?;
    Ok((repo, catalog))
}

/// Reads the WAL summaries that end the restorable window (see
/// [`crate::archive::summary::resolve_archive_end`]).
///
/// # Errors
/// Reading the histories or summaries fails.
pub async fn resolve_archive_end(repo: &Repository, catalog: &mut Catalog) -> anyhow::Result<()> {
    let (histories, _) = catalog
        .histories(&repo.storage)
        .await
        .with_context(|| format!("read the timeline histories in {}", repo.url))?;
    let index = catalog.wal_index(histories);
    crate::archive::summary::resolve_archive_end(repo, catalog, &index)
        .await
        .with_context(|| format!("read the WAL summaries in {}", repo.url))?;
    Ok(())
}

/// The archived WAL with every timeline's history, for retention: a history
/// that cannot be read stops prune, which would otherwise not see which
/// backups the timeline descends from.
///
/// # Errors
/// Reading fails, or a history file is unreadable.
pub async fn timeline_index(
    repo: &Repository,
    catalog: &Catalog,
) -> anyhow::Result<crate::wal::WalIndex> {
    let (histories, broken) = catalog
        .histories(&repo.storage)
        .await
        .with_context(|| format!("read the timeline histories in {}", repo.url))?;
    if let Some((name, why)) = broken.first() {
        anyhow::bail!(
            "cannot read timeline history {name} in {} ({why}); prune needs every history to \
             know which backups each timeline descends from, so nothing was deleted: run \
             `pitr-agent verify`",
            repo.url
        );
    }
    Ok(catalog.wal_index(histories))
}

/// `list`.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `--now`.
    #[command(flatten)]
    pub clock: ClockArgs,
}

impl ListArgs {
    /// Prints the backups and the restorable window.
    ///
    /// # Errors
    /// No repository at the URL; the listing fails.
    pub async fn run(self, repo: &RepoArgs) -> anyhow::Result<ExitCode> {
        let (repo, mut catalog) = open_catalog(repo, "list").await?;
        resolve_archive_end(&repo, &mut catalog).await?;
        let listing = report::listing(&catalog, self.clock.now());
        if self.json {
            println!("{}", serde_json::to_string_pretty(&listing)?);
        } else {
            print!("{}", report::listing_table(&listing));
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// `verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Only this backup's data (WAL is checked from its start).
    #[arg(long)]
    pub backup: Option<BackupId>,
    /// An error when the newest backup is older than this, e.g. 26h.
    #[arg(long, env = "PITR_VERIFY_MAX_AGE", value_parser = crate::cli::parse_duration)]
    pub max_age: Option<Duration>,
    /// Exit 1 on warnings too (incomplete backups, old uploads), not only on errors.
    #[arg(long, env = "PITR_VERIFY_STRICT")]
    pub strict: bool,
    /// Store the WAL summaries that are missing (segments archived before
    /// summaries existed, or by another tool): the one write verify makes.
    #[arg(long)]
    pub summarize: bool,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// `--now`.
    #[command(flatten)]
    pub clock: ClockArgs,
}

impl VerifyArgs {
    /// Verifies; exit 0 clean (or warnings only), 1 errors (or warnings
    /// with `--strict`), 2 when it could not run.
    ///
    /// # Errors
    /// No repository at the URL; verify could not run.
    pub async fn run(self, repo: &RepoArgs) -> anyhow::Result<ExitCode> {
        let (repo, catalog) = open_catalog(repo, "verify").await?;
        let opts = VerifyOptions {
            summarize: self.summarize,
            backup: self.backup,
            max_age: self.max_age,
            now: self.clock.now(),
        };
        #[cfg(feature = "daemon")]
        let events = crate::daemon::events::EventRecorder::from_env().await;
        let result = verify::verify(&repo, &catalog, &opts).await;
        #[cfg(feature = "daemon")]
        if let Some(events) = &events {
            events.verify_outcome(&result).await;
        }
        let result = result.with_context(|| format!("verify {}", repo.url))?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&result)?);
        } else {
            print!("{}", report::verify_text(&result));
        }
        Ok(ExitCode::from(result.exit_code(self.strict)))
    }
}

/// The retention policy, shared by `prune` and the daemon's scheduled prune.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionArgs {
    /// Keep the newest N backups.
    #[arg(long, env = "PITR_RETAIN_FULL", value_parser = crate::cli::parse_count::<usize>)]
    pub retain_full: Option<usize>,
    /// Keep every point of the last D days restorable.
    #[arg(long, env = "PITR_RETAIN_DAYS", value_parser = crate::cli::parse_count::<u32>)]
    pub retain_days: Option<u32>,
    /// Incomplete backups and temp files younger than this are left alone (they may be running).
    #[arg(long, env = "PITR_DEBRIS_GRACE", default_value = "24h", value_parser = crate::cli::parse_duration)]
    pub debris_grace: Duration,
    /// A filestore file removed from the volume goes only once its removal
    /// was seen this long before the oldest kept backup started: room for
    /// clocks that differ between Odoo's pods and the database.
    #[arg(long, env = "PITR_FILESTORE_MARGIN", default_value = "1h", value_parser = crate::cli::parse_duration)]
    pub filestore_margin: Duration,
}

impl RetentionArgs {
    /// The policy.
    #[must_use]
    pub fn resolve(&self) -> RetentionPolicy {
        RetentionPolicy {
            retain_full: self.retain_full,
            retain_days: self.retain_days,
            debris_grace: self.debris_grace,
            filestore_margin: self.filestore_margin,
        }
    }

    /// Whether any retention is set.
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.retain_full.is_some() || self.retain_days.is_some()
    }
}

/// The retention plan, with the filestore objects it lets go: shared by
/// `prune` and the daemon's scheduled prune.
///
/// # Errors
/// The policy keeps nothing.
pub async fn plan_retention(
    repo: &Repository,
    catalog: &Catalog,
    index: &crate::wal::WalIndex,
    policy: &RetentionPolicy,
    now: std::time::SystemTime,
) -> anyhow::Result<RetentionPlan> {
    let mut plan = RetentionPlan::compute(catalog, index, policy, now)?;
    if let Some(oldest) = plan.oldest_kept_start(catalog) {
        // A filestore index that cannot be read keeps every filestore file
        // and must not stop the backups' and WAL's retention.
        match crate::filestore::deletable(repo, oldest, policy.filestore_margin).await {
            Ok(objects) => {
                plan.delete_filestore_bytes = objects.iter().map(|m| m.size).sum();
                plan.delete_filestore = objects.into_iter().map(|m| m.key.to_string()).collect();
            }
            Err(e) => tracing::warn!(
                repository = %repo.url,
                "the filestore's retention cannot be planned, so no filestore file is deleted: {e}"
            ),
        }
    }
    Ok(plan)
}

/// `prune`.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// The policy.
    #[command(flatten)]
    pub retention: RetentionArgs,
    /// Print the plan and delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// `--now`.
    #[command(flatten)]
    pub clock: ClockArgs,
}

impl PruneArgs {
    /// Plans, prints and (unless `--dry-run`) applies retention.
    ///
    /// # Errors
    /// No repository at the URL; no retention policy; a deletion fails.
    pub async fn run(self, repo: &RepoArgs) -> anyhow::Result<ExitCode> {
        let (repo, catalog) = open_catalog(repo, "prune").await?;
        let policy = self.retention.resolve();
        let index = timeline_index(&repo, &catalog).await?;
        let plan = plan_retention(&repo, &catalog, &index, &policy, self.clock.now()).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            print!("{}", report::plan_text(&plan, self.dry_run));
        }
        if !self.dry_run {
            let locked = repo.owner().await?.object_lock.is_some();
            let outcome = prune::apply(&repo.storage, &plan, policy.debris_grace, locked)
                .await
                .with_context(|| format!("prune {}", repo.url))?;
            if !self.json && (!plan.is_empty() || outcome.temp_files > 0) {
                println!(
                    "deleted {} backups, {} WAL files ({}), {} incomplete backups, \
                     {} filestore files, {} temp files of interrupted writes",
                    outcome.backups,
                    outcome.wal_files,
                    report::bytes(outcome.wal_bytes),
                    outcome.debris,
                    outcome.filestore_files,
                    outcome.temp_files
                );
            }
            if let Some(until) = &outcome.locked_until {
                println!(
                    "kept {} backups or objects that S3 Object Lock still protects; prune \
                     deletes them once their locks expire (the last at {until})",
                    outcome.locked
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
