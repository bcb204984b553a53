//! Downloading one WAL object into a file: decompressed, checked against
//! its digest, written through a temp file and made durable. `wal-fetch`
//! and the prefetcher both restore through here.

use std::io::{self, Write};
use std::path::Path;

use crate::catalog;
use crate::compress::{self, GzipError, Sha256Digest};
use crate::repository::Repository;
use crate::storage::StorageError;
use crate::wal::WalFileName;

use super::*;

/// Downloads, decompresses and verifies `name` into `dest` through a temp
/// file, durably; returns the content's digest.
pub(super) async fn download_to(
    repo: &Repository,
    name: &WalFileName,
    dest: &Path,
) -> Result<Sha256Digest, ArchiveError> {
    let key = catalog::wal_key(name);
    let location = repo.storage.location(&key);
    let body = match repo.storage.get(&key).await {
        Ok(body) => body,
        Err(StorageError::NotFound(location)) => {
            return Err(ArchiveError::NotInRepository {
                name: name.to_string(),
                location,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || write_verified(&body, &dest, &location))
        .await
        .map_err(|e| join_error(Path::new(name.as_str()), e))?
}

fn write_verified(gz: &[u8], dest: &Path, location: &str) -> Result<Sha256Digest, ArchiveError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let file_name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("wal");
    let tmp = dir.join(format!(".{file_name}.pitr-tmp.{}", std::process::id()));
    let write_err = |source: io::Error| {
        let hint = match source.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => "the volume is full: free space and retry",
            Some(libc::EACCES | libc::EPERM) => "run as the user that owns the data directory",
            _ => "check the data directory's volume",
        };
        ArchiveError::WriteDest {
            path: dest.display().to_string(),
            cause: source,
            hint,
        }
    };
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(write_err)?;
        let mut out = io::BufWriter::with_capacity(1 << 20, file);
        let (digest, _) = compress::gunzip_verified(gz, &mut out).map_err(|e| match e {
            GzipError::Write(source) => write_err(source),
            other => ArchiveError::Corrupt {
                location: location.to_owned(),
                cause: other,
            },
        })?;
        out.flush().map_err(write_err)?;
        out.get_ref().sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, dest).map_err(write_err)?;
        sync_dir(dest).map_err(write_err)?;
        Ok(digest)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
