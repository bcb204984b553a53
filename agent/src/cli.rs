//! Flags and environment variables shared by `pitr-agent` and `pgrestore`,
//! and the logging setup. Turns raw arguments into a [`Repository`] before any work.

use std::time::Duration;

use clap::Args;
use tracing_subscriber::EnvFilter;

use crate::repository::Repository;
use crate::storage::{DEFAULT_REPO, RepoUrl, S3Options, Storage, StorageError};

/// Where the repository is and how to reach it. Shown under its own
/// heading, after each command's own flags.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Repository")]
pub struct RepoArgs {
    /// Repository URL: file:///path or s3://bucket/prefix.
    #[arg(long, env = "PITR_REPO", default_value = DEFAULT_REPO, global = true)]
    pub repo: String,
    /// S3 endpoint for non-AWS stores (MinIO, Spaces, Ceph), e.g. http://minio:9000.
    #[arg(long, env = "PITR_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: AWS_REGION, else us-east-1].
    #[arg(long, env = "PITR_S3_REGION", global = true)]
    pub s3_region: Option<String>,
    /// Address buckets by path (endpoint/bucket), as MinIO and Ceph usually need.
    #[arg(long, env = "PITR_S3_FORCE_PATH_STYLE", global = true, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub s3_force_path_style: bool,
    /// Timeout for one S3 request attempt, e.g. 30s.
    #[arg(long, env = "PITR_S3_TIMEOUT", global = true, value_parser = humantime::parse_duration)]
    pub s3_timeout: Option<Duration>,
    /// Attempts per S3 request, the first included.
    #[arg(long, env = "PITR_S3_MAX_ATTEMPTS", global = true)]
    pub s3_max_attempts: Option<u32>,
}

impl RepoArgs {
    /// Parses the URL and opens the store.
    ///
    /// # Errors
    /// A malformed URL or an unusable local directory.
    pub async fn open(&self) -> Result<Repository, StorageError> {
        let url = RepoUrl::parse(&self.repo)?;
        let options = S3Options {
            endpoint: self.s3_endpoint.clone().filter(|e| !e.is_empty()),
            region: self.s3_region.clone().filter(|r| !r.is_empty()),
            force_path_style: self.s3_force_path_style,
            connect_timeout: None,
            attempt_timeout: self.s3_timeout,
            max_attempts: self.s3_max_attempts,
        };
        Ok(Repository {
            storage: Storage::open(&url, &options).await?,
            url: url.to_string(),
        })
    }

    /// The same settings as command-line arguments, for child processes.
    #[must_use]
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--repo".to_owned(), self.repo.clone()];
        if let Some(e) = &self.s3_endpoint {
            args.extend(["--s3-endpoint".to_owned(), e.clone()]);
        }
        if let Some(r) = &self.s3_region {
            args.extend(["--s3-region".to_owned(), r.clone()]);
        }
        args.extend([
            "--s3-force-path-style".to_owned(),
            self.s3_force_path_style.to_string(),
        ]);
        if let Some(t) = self.s3_timeout {
            args.extend([
                "--s3-timeout".to_owned(),
                humantime::format_duration(t).to_string(),
            ]);
        }
        if let Some(n) = self.s3_max_attempts {
            args.extend(["--s3-max-attempts".to_owned(), n.to_string()]);
        }
        args
    }

    /// The S3 settings as `PITR_S3_*` variables, for child processes that
    /// read the environment (a restored server's `archive_command`).
    #[must_use]
    pub fn s3_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(e) = &self.s3_endpoint {
            env.push(("PITR_S3_ENDPOINT".to_owned(), e.clone()));
        }
        if let Some(r) = &self.s3_region {
            env.push(("PITR_S3_REGION".to_owned(), r.clone()));
        }
        env.push((
            "PITR_S3_FORCE_PATH_STYLE".to_owned(),
            self.s3_force_path_style.to_string(),
        ));
        env
    }
}

/// Log to stderr. `PITR_LOG` takes an `EnvFilter` directive; `PITR_LOG_FORMAT=json`
/// switches to JSON lines for log collectors.
pub fn init_tracing(default_level: &str) {
    // The AWS SDK warns about unreadable ~/.aws files when the credentials come
    // from the environment; its real failures reach us as errors.
    let filter = EnvFilter::try_from_env("PITR_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{default_level},aws_config=error,aws_runtime=error,aws_smithy_runtime=error"
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let json = std::env::var("PITR_LOG_FORMAT").is_ok_and(|f| f == "json");
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The shared `main` of both binaries: logging, an async runtime, the work,
/// and an error printed as one line `NAME: error: ...` with exit `fatal`.
pub fn run_main<F>(name: &str, fatal: u8, multi_threaded: bool, work: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = anyhow::Result<std::process::ExitCode>>,
{
    init_tracing("warn");
    let runtime = if multi_threaded {
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
            eprintln!("{name}: error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(fatal);
        }
    };
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            std::process::ExitCode::from(fatal)
        }
    }
}

/// `--help` text with every `[env: NAME=value]` shown as `[env: NAME=]`:
/// clap prints the current value of a set variable, which would make help
/// snapshots depend on the environment.
#[must_use]
pub fn help_without_env_values(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    let mut rest = help;
    while let Some(at) = rest.find("[env: ") {
        let (before, after) = rest.split_at(at);
        out.push_str(before);
        let Some(eq) = after.find('=') else {
            out.push_str(after);
            return out;
        };
        let Some(end) = after[eq..].find(']') else {
            out.push_str(after);
            return out;
        };
        out.push_str(&after[..=eq]);
        out.push(']');
        rest = &after[eq + end + 1..];
    }
    out.push_str(rest);
    out
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT.
pub(crate) async fn wait_for_signal() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_are_hidden_in_help() {
        assert_eq!(
            help_without_env_values("x [env: PGHOST=/run/pg] y [env: PITR_REPO=] z"),
            "x [env: PGHOST=] y [env: PITR_REPO=] z"
        );
        assert_eq!(help_without_env_values("no env"), "no env");
    }
}
