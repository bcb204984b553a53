//! Flags and environment variables shared by `pitr-agent` and `pgrestore`,
//! and the logging setup. Turns raw arguments into a [`Repository`] before any work.

use std::time::Duration;

use clap::Args;
use tracing_subscriber::EnvFilter;

use crate::repository::Repository;
use crate::storage::sealed::{Keys, Sealed};
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
    /// Address buckets by path (endpoint/bucket), as MinIO and Ceph usually
    /// need. A plain switch; `--s3-force-path-style=false` turns it off.
    #[arg(long, env = "PITR_S3_FORCE_PATH_STYLE", global = true, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub s3_force_path_style: bool,
    /// Timeout for one S3 request attempt, e.g. 30s.
    #[arg(long, env = "PITR_S3_TIMEOUT", global = true, value_parser = crate::cli::parse_duration)]
    pub s3_timeout: Option<Duration>,
    /// Attempts per S3 request, the first included.
    #[arg(long, env = "PITR_S3_MAX_ATTEMPTS", global = true)]
    pub s3_max_attempts: Option<u32>,
    /// Encrypt the repository's data to this age recipient (age1...; repeat
    /// or separate with commas). Writers need only this; with `init` it
    /// marks a new repository encrypted.
    #[arg(
        long = "encrypt-to",
        env = "PITR_ENCRYPT_TO",
        global = true,
        value_delimiter = ',',
        value_name = "AGE1"
    )]
    pub encrypt_to: Vec<String>,
    /// The age identity file that reads an encrypted repository (restores,
    /// verify, rehearsals, wal-fetch): mount it from a Secret.
    #[arg(long, env = "PITR_IDENTITY_FILE", global = true, value_name = "FILE")]
    pub identity_file: Option<std::path::PathBuf>,
}

impl RepoArgs {
    /// Parses the URL and opens the store.
    ///
    /// # Errors
    /// A malformed URL or an unusable local directory.
    pub async fn open(&self) -> Result<Repository, StorageError> {
        let url = RepoUrl::parse(&self.repo)?;
        if let Some(e) = self.s3_endpoint.as_deref().filter(|e| !e.is_empty()) {
            crate::storage::check_endpoint(e)?;
        }
        let options = S3Options {
            endpoint: self.s3_endpoint.clone().filter(|e| !e.is_empty()),
            region: self.s3_region.clone().filter(|r| !r.is_empty()),
            force_path_style: self.s3_force_path_style,
            connect_timeout: None,
            attempt_timeout: self.s3_timeout,
            max_attempts: self.s3_max_attempts,
        };
        let keys = Keys::new(
            &self.encrypt_to.join(","),
            self.identity_file
                .as_deref()
                .filter(|p| !p.as_os_str().is_empty()),
        )
        .map_err(|e| StorageError::Sealed {
            location: url.to_string(),
            detail: e.to_string(),
        })?;
        let mut storage = Storage::open(&url, &options).await?;
        if !keys.is_empty() {
            storage = Storage::Sealed(std::sync::Arc::new(Sealed::new(
                storage,
                keys,
                crate::catalog::is_data_key,
            )));
        }
        Ok(Repository {
            storage,
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
        args.push(format!(
            "--s3-force-path-style={}",
            self.s3_force_path_style
        ));
        if let Some(t) = self.s3_timeout {
            args.extend([
                "--s3-timeout".to_owned(),
                humantime::format_duration(t).to_string(),
            ]);
        }
        if let Some(n) = self.s3_max_attempts {
            args.extend(["--s3-max-attempts".to_owned(), n.to_string()]);
        }
        if !self.encrypt_to.is_empty() {
            args.extend(["--encrypt-to".to_owned(), self.encrypt_to.join(",")]);
        }
        if let Some(f) = &self.identity_file {
            args.extend(["--identity-file".to_owned(), f.display().to_string()]);
        }
        args
    }

    /// The S3 and key settings as `PITR_*` variables, for child processes
    /// that read the environment (a restored server's `archive_command`).
    /// The identity travels as its file's path, never its content.
    #[must_use]
    pub fn child_env(&self) -> Vec<(String, String)> {
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
        if !self.encrypt_to.is_empty() {
            env.push(("PITR_ENCRYPT_TO".to_owned(), self.encrypt_to.join(",")));
        }
        if let Some(f) = &self.identity_file {
            env.push(("PITR_IDENTITY_FILE".to_owned(), f.display().to_string()));
        }
        env
    }
}

/// Parses a duration flag: humantime's forms, with an example in the error
/// instead of humantime's "expected number at 0".
///
/// # Errors
/// Not a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|_| "not a duration; write it as 90s, 5m, 1h30m or 2d".to_owned())
}

/// An error's chain on one line, each cause once: a cause whose text the
/// line already holds (an io::Error a wrapper quoted) is not repeated.
#[must_use]
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Parses a whole-number flag, with an example in the error instead of
/// "invalid digit found in string".
///
/// # Errors
/// Not a non-negative whole number.
pub fn parse_count<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.trim().parse().map_err(|_| {
        if text.trim_end_matches(|c: char| c.is_ascii_alphabetic()) != text
            && text.chars().next().is_some_and(|c| c.is_ascii_digit())
        {
            format!("a plain whole number without a unit, such as 7 (not {text:?})")
        } else {
            "not a whole number; write it as digits, such as 7".to_owned()
        }
    })
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
    // Colour only on a terminal: wal-fetch's warnings land in PostgreSQL's
    // log and the daemon's in `kubectl logs`, where escape codes are noise.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
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
            eprintln!("{name}: error: {}", error_line(&e));
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
pub async fn wait_for_signal() {
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
    #[test]
    fn an_error_line_names_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(20);
        let e = anyhow::Error::new(io).context(format!(
            "cannot use /tmp/x: {}",
            std::io::Error::from_raw_os_error(20)
        ));
        let line = super::error_line(&e);
        assert_eq!(line.matches("Not a directory").count(), 1, "{line}");
        let e = anyhow::anyhow!("bottom").context("middle").context("top");
        assert_eq!(super::error_line(&e), "top: middle: bottom");
    }

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
