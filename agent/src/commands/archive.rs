//! `init`, `wal-push`, `wal-fetch` and the hidden `wal-prefetch`.

use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use clap::builder::TypedValueParser as _;

use crate::archive::{self, FetchConfig, PrefetchRequest, PushConfig};
use crate::catalog::{InitOutcome, RepositoryOwner};
use crate::cli::RepoArgs;
use crate::compress::DEFAULT_LEVEL;
use crate::wal::WalFileName;

/// `pitr-agent init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Record this data directory's cluster as the owner [default: none yet;
    /// the first wal-push or backup claims the repository]. It must hold
    /// global/pg_control. Not read from PGDATA: an init container runs
    /// before initdb, and leaves the claim to the first push.
    #[arg(long)]
    pub pgdata: Option<PathBuf>,
    /// S3 only: lock every object for DAYS after it is written (the
    /// bucket's default Object Lock retention; the bucket must have been
    /// created with Object Lock). Choose at least the retention window
    /// plus a margin: until then no credential can delete an object.
    #[arg(long, value_name = "DAYS")]
    pub object_lock: Option<u32>,
    /// The Object Lock mode.
    #[arg(long, env = "PITR_LOCK_MODE", value_enum, default_value_t = crate::storage::LockMode::Governance)]
    pub lock_mode: crate::storage::LockMode,
}

impl InitArgs {
    /// Creates the repository, or says it exists.
    ///
    /// # Errors
    /// An unreadable `pg_control`; see [`crate::repository::Repository::init`].
    pub async fn run(self, repo: &RepoArgs) -> anyhow::Result<ExitCode> {
        let repo = repo.open().await?;
        let cluster = match &self.pgdata {
            Some(dir) => match crate::pgdata::system_identifier(dir) {
                Ok(id) => Some(id),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    anyhow::bail!(
                        "--pgdata {}: no global/pg_control there, so it is not a PostgreSQL data \
                         directory (or initdb has not run yet); give the data directory, or leave \
                         --pgdata out and the first wal-push or backup claims the repository",
                        dir.display()
                    );
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot read {}", dir.join("global/pg_control").display())
                    });
                }
            },
            None => None,
        };
        // The lock first, so that S3 locks the record too (and some stores
        // set a default retention only on an empty bucket).
        if let Some(days) = self.object_lock {
            if days == 0 {
                anyhow::bail!("--object-lock takes the days to keep each object, at least 1");
            }
            repo.storage
                .set_default_retention(self.lock_mode, days)
                .await
                .with_context(|| format!("init --object-lock {}", repo.url))?;
        }
        let outcome = repo
            .init(cluster)
            .await
            .with_context(|| format!("init {}", repo.url))?;
        if let Some(days) = self.object_lock {
            crate::catalog::set_object_lock(
                &repo.storage,
                &repo.url,
                crate::catalog::ObjectLock {
                    mode: self.lock_mode,
                    days,
                },
            )
            .await
            .with_context(|| format!("init --object-lock {}", repo.url))?;
            println!(
                "every object written to {} from now on is locked for {days} days ({:?} mode)",
                repo.url, self.lock_mode
            );
        }
        let owned_by = |o: &RepositoryOwner| match &o.system_identifier {
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
}

/// Whether a write may create a missing repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitMode {
    /// Refuse: a missing repository is a wrong URL or an unmounted volume.
    Never,
    /// Create it, as `pitr-agent init` would (for demos and docker-compose).
    Auto,
}

/// `--init` / `PITR_INIT`, shared by the commands that write.
#[derive(Debug, Clone, clap::Args)]
pub struct InitModeArg {
    /// Whether wal-push and backup may create a missing repository.
    #[arg(long = "init", env = "PITR_INIT", value_enum, default_value_t = InitMode::Never)]
    pub init: InitMode,
}

impl InitModeArg {
    /// `PITR_INIT=auto`.
    #[must_use]
    pub fn auto(&self) -> bool {
        self.init == InitMode::Auto
    }
}

/// `pitr-agent wal-push`.
#[derive(Debug, clap::Args)]
pub struct WalPushArgs {
    /// The WAL file, as PostgreSQL's %p (relative to the data directory).
    pub path: PathBuf,
    /// The data directory [default: the current directory, as for archive_command].
    #[arg(long, env = "PGDATA")]
    pub pgdata: Option<PathBuf>,
    /// Files pushed at once: the requested one plus the next .ready files.
    #[arg(long, env = "PITR_ARCHIVE_PARALLEL", default_value_t = archive::DEFAULT_ARCHIVE_PARALLEL,
          value_parser = clap::value_parser!(u16).range(1..=64).map(usize::from))]
    pub parallel: usize,
    /// gzip level, 1 (fastest) to 9 (smallest).
    #[arg(long, env = "PITR_COMPRESS_LEVEL", default_value_t = DEFAULT_LEVEL,
          value_parser = clap::value_parser!(u32).range(1..=9))]
    pub compress_level: u32,
    /// Spool directory for markers [default: pitr_spool beside the WAL file].
    #[arg(long, env = "PITR_SPOOL")]
    pub spool: Option<PathBuf>,
    /// `--init`.
    #[command(flatten)]
    pub init: InitModeArg,
}

impl WalPushArgs {
    /// The settings of [`archive::wal_push`].
    ///
    /// # Errors
    /// No `--pgdata` and no current directory.
    pub fn resolve(&self) -> anyhow::Result<PushConfig> {
        let cwd = std::env::current_dir().context("cannot determine the current directory")?;
        let pgdata = match &self.pgdata {
            // `pg_ctl -D data` hands the server PGDATA=data, relative to
            // where pg_ctl ran; archive_command runs in the data directory.
            Some(dir)
                if dir.is_relative()
                    && !dir.join("global/pg_control").exists()
                    && cwd.join("global/pg_control").exists() =>
            {
                cwd
            }
            Some(dir) => dir.clone(),
            None => cwd,
        };
        Ok(PushConfig {
            pgdata,
            spool: self.spool.clone(),
            parallel: self.parallel,
            level: self.compress_level,
            auto_init: self.init.auto(),
        })
    }

    /// Archives the file; exit 0 only once it is durable.
    ///
    /// # Errors
    /// See [`archive::ArchiveError`].
    pub async fn run(self, repo: &RepoArgs) -> anyhow::Result<ExitCode> {
        let repo = repo.open().await?;
        let cfg = self.resolve()?;
        let outcome = archive::wal_push(&repo, &self.path, &cfg)
            .await
            .with_context(|| format!("wal-push {}", self.path.display()))?;
        tracing::info!(file = %self.path.display(), ?outcome, "archived");
        Ok(ExitCode::SUCCESS)
    }
}

/// `pitr-agent wal-fetch`.
#[derive(Debug, clap::Args)]
pub struct WalFetchArgs {
    /// The WAL file name, as PostgreSQL's %f.
    pub name: String,
    /// Where to write it, as PostgreSQL's %p.
    pub path: PathBuf,
    /// Segments to keep prefetched in the spool; 0 disables prefetching.
    #[arg(long, env = "PITR_FETCH_PREFETCH", default_value_t = archive::DEFAULT_PREFETCH,
          value_parser = clap::value_parser!(u16).range(0..=256).map(usize::from))]
    pub prefetch: usize,
    /// Spool directory [default: pitr_spool beside the destination].
    #[arg(long, env = "PITR_SPOOL")]
    pub spool: Option<PathBuf>,
    /// How long to retry a repository that times out or answers 5xx before
    /// exiting 128, which stops recovery (exit 1 means only "not in the repository").
    #[arg(long, env = "PITR_FETCH_RETRY_FOR", default_value = "5m", value_parser = crate::cli::parse_duration)]
    pub retry_for: Duration,
}

impl WalFetchArgs {
    /// Restores the file. Exit 1 only when the repository answered that it
    /// does not exist; 128 for every other failure (see
    /// [`archive::FETCH_EXIT_FATAL`] for why).
    ///
    /// # Errors
    /// The repository URL cannot be opened.
    pub async fn run(self, repo_args: &RepoArgs) -> anyhow::Result<ExitCode> {
        let repo = repo_args.open().await?;
        let cfg = FetchConfig {
            spool: self.spool,
            prefetch: self.prefetch,
        };
        match archive::wal_fetch_retrying(&repo, &self.name, &self.path, &cfg, self.retry_for).await
        {
            Ok((outcome, request)) => {
                tracing::info!(file = %self.name, ?outcome, "restored");
                if let Some(request) = request {
                    spawn_prefetcher(repo_args, &request, self.prefetch);
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
                    self.name,
                    archive::FETCH_EXIT_FATAL
                );
                Ok(ExitCode::from(archive::FETCH_EXIT_FATAL))
            }
        }
    }
}

/// `pitr-agent wal-prefetch` (hidden; started by `wal-fetch`).
#[derive(Debug, clap::Args)]
pub struct WalPrefetchArgs {
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

impl WalPrefetchArgs {
    /// Fills the spool. Never fails and never panics: the foreground fetch
    /// covers any gap, and PostgreSQL may be this orphan's reaper (PID 1 in
    /// a container).
    pub async fn run(self, repo: &RepoArgs) -> ExitCode {
        let Ok(after) = self.after.parse::<WalFileName>() else {
            return ExitCode::SUCCESS;
        };
        if let Ok(repo) = repo.open().await {
            let request = PrefetchRequest {
                after,
                segment_size: self.segment_size,
                spool: self.spool,
                data_dir: self.data_dir,
            };
            let count = self.count;
            let task = tokio::spawn(async move { archive::prefetch(&repo, &request, count).await });
            let _ = task.await;
        }
        ExitCode::SUCCESS
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
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    if let Err(e) = cmd.spawn() {
        tracing::debug!(error = %e, "could not start the prefetcher");
    }
}
