//! `filestore-sync`.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::RepoArgs;
use crate::compress::DEFAULT_LEVEL;
use crate::filestore::{self, SyncState};

/// `filestore-sync`.
#[derive(Debug, clap::Args)]
pub struct FilestoreSyncArgs {
    /// The filestore: Odoo's `<data_dir>/filestore`, holding `<db>/<xx>/<sha1>`.
    #[arg(long, env = "PITR_FILESTORE_PATH")]
    pub path: PathBuf,
    /// gzip level for the files where compression pays, 1 to 9.
    #[arg(long, env = "PITR_COMPRESS_LEVEL", default_value_t = DEFAULT_LEVEL,
          value_parser = clap::value_parser!(u32).range(1..=9))]
    pub compress_level: u32,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Sync again every this long, forever (the sidecar of Odoo's pods),
    /// serving /healthz and the filestore metrics on --listen; without it,
    /// one sync.
    #[arg(long, env = "PITR_FILESTORE_INTERVAL", value_parser = crate::cli::parse_duration)]
    pub every: Option<std::time::Duration>,
    /// Where --every serves /healthz and /metrics.
    #[arg(long, env = "PITR_LISTEN", default_value = "0.0.0.0:9188")]
    pub listen: std::net::SocketAddr,
}

impl FilestoreSyncArgs {
    /// One sync.
    ///
    /// # Errors
    /// The repository is missing, or the volume or the repository failed.
    pub async fn run(self, repo: &RepoArgs) -> anyhow::Result<ExitCode> {
        let repo = repo.open().await?;
        repo.owner().await?;
        if !self.path.is_dir() {
            anyhow::bail!(
                "{} is not a directory: --path (PITR_FILESTORE_PATH) names Odoo's filestore, \
                 <data_dir>/filestore, which holds one directory per database",
                self.path.display()
            );
        }
        if let Some(every) = self.every.filter(|e| !e.is_zero()) {
            let shutdown = tokio_util::sync::CancellationToken::new();
            let token = shutdown.clone();
            tokio::spawn(async move {
                crate::cli::wait_for_signal().await;
                token.cancel();
            });
            crate::daemon::run_filestore_only(
                repo,
                self.path,
                every,
                self.compress_level,
                self.listen,
                shutdown,
            )
            .await?;
            return Ok(ExitCode::SUCCESS);
        }
        let started = std::time::Instant::now();
        let mut state = SyncState::default();
        let report = filestore::sync(&repo, &self.path, &mut state, self.compress_level).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!(
                "filestore {}: {} files in {} databases; {} new stored ({} on the volume, {} in \
                 the repository) in {:.1}s",
                self.path.display(),
                report.files_seen,
                report.databases,
                report.files_uploaded,
                crate::report::bytes(report.bytes_uploaded),
                crate::report::bytes(report.bytes_stored),
                started.elapsed().as_secs_f64()
            );
        }
        if report.corrupt.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        for c in &report.corrupt {
            eprintln!(
                "pitr-agent: error: {c}; not uploaded: the file on the volume is damaged (or not \
                 Odoo's); restore it from the repository or from the attachment's source"
            );
        }
        Ok(ExitCode::from(1))
    }
}
