//! Markers of files `wal-push` pushed ahead of PostgreSQL's request.

use std::path::{Path, PathBuf};

use crate::compress::Sha256Digest;
use crate::pgdata;
use crate::wal::WalFileName;

/// Spool markers for files pushed ahead of PostgreSQL's request.
pub(super) struct Markers {
    dir: PathBuf,
    repo_url: String,
}

impl Markers {
    pub(super) fn new(dir: PathBuf, repo_url: &str) -> Self {
        Markers {
            dir,
            repo_url: repo_url.to_owned(),
        }
    }

    pub(super) fn exists(&self, name: &WalFileName) -> bool {
        self.dir.join(name.as_str()).exists()
    }

    /// Records that `name` with `digest` is durable in the repository. Written
    /// only after the object is durable; losing a marker only costs a re-push.
    pub(super) fn record(&self, name: &WalFileName, digest: Sha256Digest) {
        let body = format!("{digest}\n{}\n", self.repo_url);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let ok = std::fs::create_dir_all(&self.dir).is_ok()
            && std::fs::write(&tmp, body).is_ok()
            && std::fs::rename(&tmp, self.dir.join(name.as_str())).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Consumes the marker of `name` if it matches the file at `path` now.
    pub(super) fn take_if_current(&self, name: &WalFileName, path: &Path) -> Option<()> {
        let marker = self.dir.join(name.as_str());
        let body = std::fs::read_to_string(&marker).ok()?;
        let mut lines = body.lines();
        let digest = Sha256Digest::from_hex(lines.next()?)?;
        if lines.next()? != self.repo_url {
            return None;
        }
        let current = Sha256Digest::of(&std::fs::read(path).ok()?);
        let _ = std::fs::remove_file(&marker);
        (current == digest).then_some(())
    }

    /// Removes markers whose file PostgreSQL no longer lists as `.ready`.
    pub(super) fn forget_archived(&self, wal_dir: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let status = pgdata::archive_status(wal_dir);
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !status.join(format!("{name}.ready")).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}
