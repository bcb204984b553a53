//! `pgrestore`: point-in-time recovery from the repository.
//!
//! - [`target`]: recovery targets, timelines, actions, and time parsing;
//! - [`plan`]: the plan computed before the data directory is touched;
//! - [`extract`]: streaming download, gunzip and untar into the directory;
//! - [`files`]: the backup into a directory, and the `restore_command`;
//! - [`recovery`]: recovery settings, starting PostgreSQL, watching it arrive.

pub mod extract;
pub mod files;
pub mod plan;
pub mod recovery;
pub mod target;
pub mod tenant;

use std::path::Path;

/// Why `DIR` cannot receive a restore.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// Not empty.
    #[error(
        "{0} is not empty; pgrestore restores only into an empty or missing directory, so that \
         nothing of another cluster mixes in: move its contents away, or choose another --pgdata"
    )]
    NotEmpty(String),
    /// Not a directory, or unreadable.
    #[error("cannot use {path} as the data directory: {source}")]
    Unusable {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Checks that `dir` is missing or an empty directory; returns whether it exists.
///
/// # Errors
/// [`DirError`].
pub fn check_target_dir(dir: &Path) -> Result<bool, DirError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(true),
            Some(_) => Err(DirError::NotEmpty(dir.display().to_string())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DirError::Unusable {
            path: dir.display().to_string(),
            source,
        }),
    }
}
