//! What pitr-agent reads from a PostgreSQL data directory: the cluster's
//! identity in `global/pg_control` and the archiver's `.ready` queue.
//!
//! Knows nothing about repositories.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::wal::WalFileName;

/// A cluster's system identifier (`pg_controldata`'s "Database system
/// identifier"). Records carry it as a decimal string: it exceeds 2^53, the
/// largest integer many JSON readers keep exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SystemId(pub u64);

impl std::fmt::Display for SystemId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for SystemId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        s.parse()
            .map(SystemId)
            .map_err(|_| format!("{s:?} is not a system identifier (a decimal number)"))
    }
}

serde_as_text!(SystemId);

/// The cluster's system identifier: the first field of `ControlFileData`,
/// stored at byte 0 of `global/pg_control` in every PostgreSQL version.
///
/// # Errors
/// The file is missing, unreadable or too short.
pub fn system_identifier(pgdata: &Path) -> io::Result<u64> {
    let path = pgdata.join("global").join("pg_control");
    let mut buf = [0u8; 8];
    std::fs::File::open(&path)?.read_exact(&mut buf)?;
    let id = u64::from_le_bytes(buf);
    if id == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "pg_control has a zero system identifier",
        ));
    }
    Ok(id)
}

/// The WAL files waiting in `<wal_dir>/archive_status/*.ready`, sorted by name.
///
/// # Errors
/// The status directory cannot be read.
pub fn ready_files(wal_dir: &Path) -> io::Result<Vec<WalFileName>> {
    let mut names: Vec<WalFileName> = std::fs::read_dir(archive_status(wal_dir))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".ready")?.parse().ok())
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(names)
}

/// `<wal_dir>/archive_status`.
#[must_use]
pub fn archive_status(wal_dir: &Path) -> PathBuf {
    wal_dir.join("archive_status")
}

/// Whether `pgdata` is a data directory whose archive recovery has ended:
/// it holds `PG_VERSION` and neither `recovery.signal` nor `standby.signal`
/// (PostgreSQL removes them when recovery ends). `false` for anything that
/// is not a data directory, so that a caller never acts on a guess.
#[must_use]
pub fn recovery_ended(pgdata: &Path) -> bool {
    pgdata.join("PG_VERSION").is_file()
        && !pgdata.join("recovery.signal").exists()
        && !pgdata.join("standby.signal").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_ends_when_the_signal_files_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!recovery_ended(dir.path()), "not a data directory");
        std::fs::write(dir.path().join("PG_VERSION"), "15\n").expect("write");
        std::fs::write(dir.path().join("recovery.signal"), "").expect("write");
        assert!(!recovery_ended(dir.path()));
        std::fs::remove_file(dir.path().join("recovery.signal")).expect("rm");
        std::fs::write(dir.path().join("standby.signal"), "").expect("write");
        assert!(!recovery_ended(dir.path()));
        std::fs::remove_file(dir.path().join("standby.signal")).expect("rm");
        assert!(recovery_ended(dir.path()));
    }
}
