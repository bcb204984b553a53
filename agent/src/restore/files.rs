//! Putting a planned backup into a directory, and the `restore_command`
//! that replays the rest: the steps `pgrestore` and `rehearse` share.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use super::extract::{self, ExtractStats};
use super::plan::RestorePlan;
use crate::catalog::backup::DATA_FILE;
use crate::cli::RepoArgs;
use crate::repository::Repository;
use crate::wal::Lsn;

/// Streams the plan's backup into `dir` (created if `existed` is false,
/// mode 0700). `progress` sees stored and raw bytes so far. With `sync`,
/// one filesystem sync makes the files durable; without it the caller
/// starts PostgreSQL, which syncs the data directory before recovery.
///
/// # Errors
/// The backup cannot be read, is corrupt, or the directory cannot be written.
pub async fn restore_backup(
    repo: &Repository,
    plan: &RestorePlan,
    dir: &Path,
    existed: bool,
    sync: bool,
    progress: impl FnMut(u64, u64),
) -> anyhow::Result<ExtractStats> {
    restore_backup_skipping(repo, plan, dir, existed, sync, &HashSet::new(), progress).await
}

/// [`restore_backup`], with the files of the databases in `skip` left as
/// sparse stand-ins ([`extract::extract_skipping`]).
///
/// # Errors
/// As [`restore_backup`].
pub async fn restore_backup_skipping(
    repo: &Repository,
    plan: &RestorePlan,
    dir: &Path,
    existed: bool,
    sync: bool,
    skip: &HashSet<u32>,
    progress: impl FnMut(u64, u64),
) -> anyhow::Result<ExtractStats> {
    if !existed {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))?;
    let key = plan.backup.id.key(DATA_FILE);
    let reader = repo.storage.get_stream(&key).await?;
    let stats = extract::extract_skipping(reader, dir, skip, progress).await?;
    if sync {
        let synced = std::process::Command::new("sync")
            .arg("-f")
            .arg(dir)
            .status();
        if !synced.is_ok_and(|s| s.success()) {
            bail!(
                "sync -f {} failed; the restored files may not be durable",
                dir.display()
            );
        }
    }
    Ok(stats)
}

/// The stored size of the plan's backup data, for progress.
#[must_use]
pub fn backup_data_bytes(plan: &RestorePlan) -> u64 {
    plan.backup
        .objects
        .iter()
        .find(|o| o.name == DATA_FILE)
        .map_or(0, |o| o.bytes)
}

/// Removes what a failed restore wrote, leaving `dir` as it was found.
pub fn clean(dir: &Path, existed: bool) {
    if existed {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Whether replay reached where the plan said it must end
/// ([`RestorePlan::expected_end`]): "promoted" is not "reached", since
/// PostgreSQL promotes at the first record it cannot read.
///
/// # Errors
/// A sentence naming where replay stopped, where it should have ended, and
/// what was lost.
pub fn check_replay_end(
    plan: &RestorePlan,
    reached: &super::recovery::Reached,
) -> Result<(), String> {
    let Some(expected) = plan.expected_end else {
        return Ok(());
    };
    if !reached.running && reached.replay_lsn.is_none() {
        // Shut down at the target, as asked: PostgreSQL checked it.
        return Ok(());
    }
    let replayed: Option<Lsn> = reached.replay_lsn.as_deref().and_then(|l| l.parse().ok());
    match replayed {
        Some(r) if r >= expected => Ok(()),
        r => {
            let seg = plan.backup.wal_segment_size;
            let at = r.map_or("an unknown position".to_owned(), |r| {
                let segment = plan
                    .wal_path
                    .iter()
                    .find(|n| n.segment_no(seg) == Some(r.segment(seg)))
                    .map(|n| format!(" in {n}"))
                    .unwrap_or_default();
                format!("{r}{segment}")
            });
            Err(format!(
                "replay stopped at {at}, short of {expected} where the repository's WAL for this \
                 restore ends: the last transaction replayed is from {}, while the last commit \
                 archived is from {}",
                reached.last_transaction_time.as_deref().unwrap_or("(none)"),
                plan.last_commit.as_deref().unwrap_or("(unknown)")
            ))
        }
    }
}

/// Checks that the file system that will hold `dir` (its nearest existing
/// ancestor) has `need` bytes free, before anything is downloaded.
///
/// # Errors
/// Too little space, naming both figures and what to do.
pub fn check_free_space(dir: &Path, need: u64) -> anyhow::Result<()> {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p,
            None => return Ok(()),
        }
    }
    let Ok(st) = rustix::fs::statvfs(at) else {
        return Ok(());
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < need {
        bail!(
            "not enough disk for the restore into {}: it needs about {} (the backup's files and \
             room for WAL), and {} is free on the file system of {}; free space, or choose \
             another --pgdata",
            dir.display(),
            crate::report::bytes(need),
            crate::report::bytes(free),
            at.display()
        );
    }
    Ok(())
}

/// The port and socket directory `pgrestore --start` uses: the ones given,
/// checked free, else a free port and a new private directory, so that a
/// restore on a host that already runs PostgreSQL never collides with it.
///
/// # Errors
/// A server already has a socket there, or the directory cannot be made.
pub fn start_socket(port: Option<u16>, dir: Option<&Path>) -> anyhow::Result<(u16, PathBuf)> {
    let port = port.unwrap_or_else(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_or(54_329, |a| a.port())
    });
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            let d = std::env::temp_dir().join(format!(
                "pgrestore-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir(&d).with_context(|| format!("create {}", d.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("make {} private", d.display()))?;
            }
            d
        }
    };
    let socket = dir.join(format!(".s.PGSQL.{port}"));
    let lock = dir.join(format!(".s.PGSQL.{port}.lock"));
    if socket.exists() || lock.exists() {
        bail!(
            "a PostgreSQL server already has its socket {} (port {port}); choose another --port \
             or --socket-dir, or leave both out and pgrestore picks free ones",
            socket.display()
        );
    }
    Ok((port, dir))
}

/// Stops the server on `dir` (fast shutdown), waiting for it; errors are
/// ignored (the caller is already reporting one).
pub async fn stop_server(pg_ctl: &Path, dir: &Path) {
    let _ = tokio::process::Command::new(pg_ctl)
        .arg("-D")
        .arg(dir)
        .args(["-w", "-t", "60", "-m", "fast", "stop"])
        .output()
        .await;
}

/// The `pitr-agent` binary for `restore_command`: `given`, else beside the
/// running program, else on PATH.
///
/// # Errors
/// None is found.
pub fn find_agent(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return std::path::absolute(p).with_context(|| format!("--agent {}", p.display()));
    }
    if let Some(beside) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("pitr-agent")))
        .filter(|p| p.is_file())
    {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("pitr-agent"))
                .find(|p| p.is_file())
        })
        .context(
            "pitr-agent not found beside pgrestore or on PATH; pass --agent /path/to/pitr-agent",
        )
}

/// `<agent> <repository flags> wal-fetch %f %p`, safe for `sh -c`.
#[must_use]
pub fn restore_command(agent: &Path, repo_args: &RepoArgs) -> String {
    let mut command = format!("{} ", shell_word(&agent.display().to_string()));
    for a in repo_args.to_args() {
        command.push_str(&shell_word(&a));
        command.push(' ');
    }
    command.push_str("wal-fetch %f %p");
    command
}

/// A word safe inside a single-quoted postgresql.conf value run by `sh -c`.
fn shell_word(word: &str) -> String {
    if word
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/:._-=%@+".contains(&b))
    {
        word.to_owned()
    } else {
        format!("\"{}\"", word.replace(['"', '\\', '$', '`'], ""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_little_space_is_named_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("not/yet/there");
        super::check_free_space(&target, 1).expect("a byte is free");
        let e = super::check_free_space(&target, u64::MAX).expect_err("nobody has that much");
        let text = format!("{e:#}");
        assert!(
            text.contains("not enough disk") && text.contains("--pgdata"),
            "{text}"
        );
        assert!(!target.exists(), "the check created {}", target.display());
    }

    #[test]
    fn shell_words_survive_sh() {
        assert_eq!(shell_word("s3://bucket/prefix"), "s3://bucket/prefix");
        assert_eq!(shell_word("a b"), "\"a b\"");
        assert_eq!(shell_word("$(rm)"), "\"(rm)\"");
    }
}
