//! `file://` repositories: a directory tree on a local or mounted filesystem.
//!
//! Every write goes to a temp file in the target directory, is fsynced, then
//! linked (create-only) or renamed into place, and the directory is fsynced.
//! Temp files start with `.` and are invisible to `list`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;

use super::{BoxReader, ObjectKey, ObjectMeta, PutMode, StorageError};

/// A repository rooted at a local directory.
#[derive(Debug, Clone)]
pub struct LocalFs {
    root: PathBuf,
}

const STREAM_BUFFER: usize = 1 << 20;

impl LocalFs {
    /// Uses `root`. Opening creates nothing: a read-only command on a wrong
    /// path must not leave a directory behind; writes create what they need.
    ///
    /// # Errors
    /// `root` exists but is not a directory.
    pub async fn open(root: PathBuf) -> Result<Self, StorageError> {
        match std::fs::metadata(&root) {
            Ok(meta) if !meta.is_dir() => Err(io_error(
                "use as a directory",
                &root,
                io::Error::from(io::ErrorKind::NotADirectory),
            )),
            _ => Ok(LocalFs { root }),
        }
    }

    /// The directory this repository lives in.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(super) async fn create_root(&self) -> Result<(), StorageError> {
        let root = self.root.clone();
        blocking(move || create_dirs_durable(&root)).await
    }

    fn path(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    pub(super) fn location(&self, key: &ObjectKey) -> String {
        format!("file://{}", self.path(key).display())
    }

    pub(super) async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        mode: PutMode,
    ) -> Result<(), StorageError> {
        let path = self.path(key);
        let root = self.root.clone();
        blocking(move || {
            create_dirs_below(&root, parent(&path)?)?;
            let tmp = TempFile::create(&path)?;
            tmp.file()
                .write_all(&body)
                .map_err(|e| io_error("write", &tmp.path, e))?;
            tmp.commit(&path, mode)
        })
        .await
    }

    pub(super) async fn put_stream(
        &self,
        key: &ObjectKey,
        mut reader: BoxReader,
    ) -> Result<u64, StorageError> {
        let path = self.path(key);
        let tmp = {
            let path = path.clone();
            let root = self.root.clone();
            blocking(move || {
                create_dirs_below(&root, parent(&path)?)?;
                TempFile::create(&path)
            })
            .await?
        };
        let mut buf = vec![0u8; STREAM_BUFFER];
        let mut total = 0u64;
        let mut out = tokio::fs::File::from_std(
            tmp.file()
                .try_clone()
                .map_err(|e| io_error("open", &tmp.path, e))?,
        );
        loop {
            let n = reader.read(&mut buf).await.map_err(|e| StorageError::Io {
                op: "read the upload source for",
                location: path.display().to_string(),
                source: e,
            })?;
            if n == 0 {
                break;
            }
            tokio::io::AsyncWriteExt::write_all(&mut out, &buf[..n])
                .await
                .map_err(|e| io_error("write", &tmp.path, e))?;
            total += n as u64;
        }
        drop(out);
        blocking(move || tmp.commit(&path, PutMode::Overwrite)).await?;
        Ok(total)
    }

    pub(super) async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError> {
        let path = self.path(key);
        blocking(move || {
            fs::read(&path)
                .map(Bytes::from)
                .map_err(|e| io_error("read", &path, e))
        })
        .await
    }

    pub(super) async fn get_stream(&self, key: &ObjectKey) -> Result<BoxReader, StorageError> {
        let path = self.path(key);
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| io_error("read", &path, e))?;
        Ok(Box::new(tokio::io::BufReader::with_capacity(
            STREAM_BUFFER,
            file,
        )))
    }

    pub(super) async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        let dir = self.root.join(prefix.trim_end_matches('/'));
        blocking(move || match fs::remove_dir_all(&dir) {
            Ok(()) => sync_dir(parent(&dir)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("delete", &dir, e)),
        })
        .await
    }

    pub(super) async fn get_prefix(
        &self,
        key: &ObjectKey,
        len: u64,
    ) -> Result<Bytes, StorageError> {
        let path = self.path(key);
        blocking(move || {
            let file = File::open(&path).map_err(|e| io_error("read", &path, e))?;
            let mut buf = Vec::new();
            file.take(len)
                .read_to_end(&mut buf)
                .map_err(|e| io_error("read", &path, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    pub(super) async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>, StorageError> {
        let path = self.path(key);
        let key = key.clone();
        blocking(move || match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectMeta {
                key,
                size: meta.len(),
                modified: meta.modified().ok(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("stat", &path, e)),
        })
        .await
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(move || {
            let (dir, _) = prefix.rsplit_once('/').unwrap_or(("", ""));
            let mut out = Vec::new();
            walk(&root, &root.join(dir), &prefix, &mut out)?;
            Ok(out)
        })
        .await
    }

    pub(super) async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        let path = self.path(key);
        blocking(move || match fs::remove_file(&path) {
            Ok(()) => sync_dir(parent(&path)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("delete", &path, e)),
        })
        .await
    }
}

impl LocalFs {
    pub(super) async fn remove_stale_temp_files(
        &self,
        older_than: Duration,
    ) -> Result<usize, StorageError> {
        let root = self.root.clone();
        blocking(move || {
            let mut removed = 0;
            let mut dirs = vec![root];
            while let Some(dir) = dirs.pop() {
                let entries = match fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error("list", &dir, e)),
                };
                for entry in entries.filter_map(Result::ok) {
                    let Ok(meta) = entry.metadata() else { continue };
                    let path = entry.path();
                    if meta.is_dir() {
                        dirs.push(path);
                        continue;
                    }
                    let stale = meta
                        .modified()
                        .ok()
                        .and_then(|m| m.elapsed().ok())
                        .is_some_and(|age| age >= older_than);
                    if is_temp_name(&entry.file_name()) && stale {
                        match fs::remove_file(&path) {
                            Ok(()) => removed += 1,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(io_error("delete", &path, e)),
                        }
                    }
                }
            }
            Ok(removed)
        })
        .await
    }
}

/// Whether `name` is one of [`TempFile`]'s names: `.<object>.tmp.<pid>.<hex>`.
fn is_temp_name(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    let mut parts = rest.rsplitn(4, '.');
    let (Some(hex), Some(pid), Some("tmp"), Some(object)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !object.is_empty()
        && hex.len() == 8
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
}

fn walk(
    root: &Path,
    dir: &Path,
    prefix: &str,
    out: &mut Vec<ObjectMeta>,
) -> Result<(), StorageError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("list", dir, e)),
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("list", dir, e)),
        };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let Some(rel) = path
            .strip_prefix(root)
            .ok()
            .and_then(Path::to_str)
            .map(str::to_owned)
        else {
            continue;
        };
        // A file deleted while the walk runs (a concurrent prune, a temp
        // file renamed into place) is simply no longer listed.
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("stat", &path, e)),
        };
        if meta.is_dir() {
            let as_dir = format!("{rel}/");
            if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                walk(root, &path, prefix, out)?;
            }
        } else if meta.is_file()
            && rel.starts_with(prefix)
            && let Ok(key) = ObjectKey::new(rel)
        {
            out.push(ObjectMeta {
                key,
                size: meta.len(),
                modified: meta.modified().ok(),
            });
        }
    }
    Ok(())
}

/// A temp file beside its destination, removed on drop unless committed.
struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    fn create(dest: &Path) -> Result<Self, StorageError> {
        let dir = parent(dest)?;
        let name = dest
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object");
        let path = dir.join(format!(
            ".{name}.tmp.{}.{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error("create", &path, e))?;
        Ok(TempFile {
            path,
            file: Some(file),
        })
    }

    fn file(&self) -> &File {
        self.file.as_ref().expect("file is present until commit")
    }

    /// fsync, then move into place, then fsync the directory.
    fn commit(mut self, dest: &Path, mode: PutMode) -> Result<(), StorageError> {
        let file = self.file.take().expect("file is present until commit");
        file.sync_all()
            .map_err(|e| io_error("fsync", &self.path, e))?;
        drop(file);
        match mode {
            PutMode::Overwrite => {
                fs::rename(&self.path, dest).map_err(|e| io_error("rename", dest, e))?;
            }
            PutMode::CreateOnly => match fs::hard_link(&self.path, dest) {
                Ok(()) => {
                    let _ = fs::remove_file(&self.path);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(StorageError::AlreadyExists(format!(
                        "file://{}",
                        dest.display()
                    )));
                }
                // Filesystems without hard links: a rename that refuses to
                // replace (renameat2 RENAME_NOREPLACE). Never a plain rename,
                // which would overwrite an object another writer created.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOTSUP)) => {
                    rename_noreplace(&self.path, dest).map_err(|e| {
                        if e.kind() == io::ErrorKind::AlreadyExists {
                            StorageError::AlreadyExists(format!("file://{}", dest.display()))
                        } else {
                            io_error("rename", dest, e)
                        }
                    })?;
                }
                Err(e) => return Err(io_error("link", dest, e)),
            },
        }
        self.path = PathBuf::new();
        sync_dir(parent(dest)?)
    }
}

/// Renames `from` to `to` unless `to` exists, atomically.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE).map_err(io::Error::from)
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn parent(path: &Path) -> Result<&Path, StorageError> {
    path.parent().ok_or_else(|| StorageError::Io {
        op: "find the directory of",
        location: path.display().to_string(),
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })
}

/// Creates `dir` inside the existing repository directory `root`; never
/// `root` itself (see [`StorageError::NoRoot`]).
fn create_dirs_below(root: &Path, dir: &Path) -> Result<(), StorageError> {
    if !root.is_dir() {
        return Err(StorageError::NoRoot(root.display().to_string()));
    }
    create_dirs_durable(dir)
}

/// Creates `dir` and any missing parents, fsyncing each parent whose entries changed.
fn create_dirs_durable(dir: &Path) -> Result<(), StorageError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(io_error(
                "use as a directory",
                dir,
                io::Error::from(io::ErrorKind::NotADirectory),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("stat", dir, e)),
    }
    let up = parent(dir)?;
    create_dirs_durable(up)?;
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(up),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error("create directory", dir, e)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("fsync directory", dir, e))
}

fn io_error(op: &'static str, path: &Path, e: io::Error) -> StorageError {
    let location = format!("file://{}", path.display());
    if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
        return StorageError::NoSpace(location);
    }
    match e.kind() {
        io::ErrorKind::NotFound if matches!(op, "read" | "stat") => {
            StorageError::NotFound(location)
        }
        io::ErrorKind::PermissionDenied => StorageError::AccessDenied {
            location,
            detail: format!("{op}: {e}"),
            hint: "give the user the agent runs as (the postgres user in archive_command) \
                   read and write access to the repository directory",
        },
        _ => StorageError::Io {
            op,
            location,
            source: e,
        },
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Io {
            op: "run",
            location: "a filesystem task".into(),
            source: io::Error::other(e.to_string()),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_temp_file_names_are_collected() {
        for (name, temp) in [
            (".000000010000000000000001.gz.tmp.1234.0badcafe", true),
            (".pitr-repository.json.tmp.1.ffffffff", true),
            ("000000010000000000000001.gz", false),
            (".000000010000000000000001.gz", false),
            (".x.tmp.12a.0badcafe", false),
            (".x.tmp.12.0badcaf", false),
            (".tmp.12.0badcafe", false),
            ("x.tmp.12.0badcafe", false),
        ] {
            assert_eq!(is_temp_name(std::ffi::OsStr::new(name)), temp, "{name}");
        }
    }

    #[tokio::test]
    async fn stale_temp_files_go_and_fresh_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = dir.path().join("wal");
        fs::create_dir(&wal).expect("mkdir");
        let stale = wal.join(".000000010000000000000001.gz.tmp.99.0badcafe");
        let object = wal.join("000000010000000000000001.gz");
        fs::write(&stale, b"partial").expect("write");
        fs::write(&object, b"object").expect("write");
        let store = LocalFs::open(dir.path().to_owned()).await.expect("open");
        assert_eq!(
            store
                .remove_stale_temp_files(Duration::from_secs(3600))
                .await
                .expect("collect"),
            0,
            "a fresh temp file may belong to a running push"
        );
        assert!(stale.exists());
        assert_eq!(
            store
                .remove_stale_temp_files(Duration::ZERO)
                .await
                .expect("collect"),
            1
        );
        assert!(!stale.exists() && object.exists());
    }
}
