//! The Odoo filestore beside the database, at any point in time.
//!
//! Odoo stores attachments as `<data_dir>/filestore/<db>/<xx>/<sha1>`, named
//! by the SHA-1 of their content; it writes the file before the row that
//! references it commits and deletes files only in a later garbage
//! collection. So a repository that keeps every file it has seen serves any
//! point in time, and the database restored to T names exactly the files it
//! needs (`ir_attachment.store_fname`).
//!
//! - [`sync`] uploads the files the repository lacks, each checked against
//!   its name before it is stored, as `filestore/<db>/<xx>/<sha1>` (plain)
//!   or `…/<sha1>.gz` (where gzip pays), and writes one create-only index
//!   object per database and sync (`filestore-index/<db>/<time>.json`).
//! - [`attachments`] reads what a restored database references, and
//!   [`restore_files`] fetches exactly those files, each checked again.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha1::{Digest as _, Sha1};
use tokio::io::{AsyncRead, AsyncWriteExt as _, ReadBuf};

use crate::repository::Repository;
use crate::storage::{ObjectKey, PutMode, StorageError};

/// Where filestore objects live in the repository.
pub const PREFIX: &str = "filestore/";
/// Where the per-sync index objects live.
pub const INDEX_PREFIX: &str = "filestore-index/";
/// Files up to this size are read whole (and get create-only puts with
/// identical-retry semantics); larger ones are streamed.
const WHOLE_LIMIT: u64 = 8 << 20;
/// How much of a file decides whether gzip pays.
const SAMPLE: usize = 128 << 10;
/// Files uploaded (or fetched) at once.
const PARALLEL: usize = 4;
/// Files held as candidates at once while a directory is read.
const BATCH: usize = 256;

/// Why the filestore could not be synced or restored.
#[derive(Debug, thiserror::Error)]
pub enum FilestoreError {
    /// The volume could not be read.
    #[error("read {path}: {source}")]
    Read {
        /// What was read.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The repository failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A stored object under a file's name holds other content.
    #[error(
        "{location} already holds other content than {path}, whose SHA-1 is its name: the \
         stored object is damaged; run `pitr-agent verify`, and remove the object by hand once \
         checked so that the next sync stores the file again"
    )]
    Conflict {
        /// The object.
        location: String,
        /// The file.
        path: String,
    },
    /// An index object cannot be read.
    #[error(
        "filestore index {key} cannot be read ({detail}); it was not written by a sync of this \
         version: move it out of the repository so that prune and the sync can decide again"
    )]
    Index {
        /// The object.
        key: String,
        /// Why.
        detail: String,
    },
    /// The restore directory could not be written.
    #[error("write {path}: {source}")]
    Write {
        /// What was written.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

/// Whether `name` is a SHA-1 in lowercase hex, as Odoo names its files.
#[must_use]
pub fn is_sha1_name(name: &str) -> bool {
    name.len() == 40
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `store_fname` is Odoo's `<xx>/<sha1>`, `xx` the first two
/// characters of the SHA-1: the only form read from a database, so that a
/// damaged or hostile row cannot name a path outside the restore directory.
#[must_use]
pub fn is_store_fname(store_fname: &str) -> bool {
    store_fname
        .split_once('/')
        .is_some_and(|(xx, sha)| is_sha1_name(sha) && sha.starts_with(xx) && xx.len() == 2)
}

/// A database name as a key component: no separator, not `.` or `..`.
fn valid_db(db: &str) -> bool {
    !db.is_empty() && db != "." && db != ".." && !db.contains(['/', '\\', '\0'])
}

/// The key of `db`'s file `store_fname`, plain or gzip.
///
/// # Errors
/// A name that is not a valid key.
pub fn object_key(db: &str, store_fname: &str, gzip: bool) -> Result<ObjectKey, StorageError> {
    ObjectKey::new(format!(
        "{PREFIX}{db}/{store_fname}{}",
        if gzip { ".gz" } else { "" }
    ))
}

/// Whether gzip pays for content that starts with `sample`: a fast pass
/// over it must save at least a tenth. JPEG, PNG, ZIP-based documents and
/// most PDFs do not; text, XML and uncompressed images do.
#[must_use]
pub fn compression_pays(sample: &[u8]) -> bool {
    if sample.len() < 512 {
        return false;
    }
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    if io::Write::write_all(&mut enc, sample).is_err() {
        return false;
    }
    enc.finish()
        .is_ok_and(|out| out.len() * 10 <= sample.len() * 9)
}

/// One sync's index object: what it added for one database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct SyncIndex {
    /// Format version.
    pub format: u32,
    /// When the sync ended (RFC 3339).
    pub time: String,
    /// The database (the directory under the filestore).
    pub database: String,
    /// What was added (or seen again after its removal).
    pub added: Vec<IndexEntry>,
    /// What the repository holds but this sync no longer found on the
    /// volume: removed by Odoo's garbage collection (`<xx>/<sha1>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

/// One file a sync added.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct IndexEntry {
    /// `<xx>/<sha1>`.
    pub store_fname: String,
    /// Its size on the volume.
    pub size: u64,
    /// Stored gzip-compressed.
    pub gzip: bool,
}

/// What one sync did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SyncReport {
    /// Databases (directories) seen.
    pub databases: usize,
    /// Files seen on the volume.
    pub files_seen: u64,
    /// Files uploaded by this sync.
    pub files_uploaded: u64,
    /// Their size on the volume.
    pub bytes_uploaded: u64,
    /// Their size in the repository.
    pub bytes_stored: u64,
    /// Files the repository holds that this sync found removed from the
    /// volume (recorded in the index, for prune).
    pub files_removed: u64,
    /// Files whose content does not hash to their name: never uploaded.
    pub corrupt: Vec<String>,
}

/// What the repository is known to hold, kept between syncs (the daemon
/// lists each database's prefix and reads its index once, then adds what it
/// uploads; [`SyncState::expire`] makes it read them again).
#[derive(Debug, Default)]
pub struct SyncState {
    known: HashMap<String, DbState>,
    loaded: Option<std::time::Instant>,
}

/// One database's files in the repository.
#[derive(Debug, Default)]
struct DbState {
    /// Stored in the repository.
    stored: HashSet<String>,
    /// Stored, and recorded as removed from the volume by the newest index
    /// entry that names them.
    removed: HashSet<String>,
}

impl SyncState {
    /// Forgets what it knew once it is older than `max_age`, so that the
    /// next sync lists the repository again: an object deleted behind the
    /// sync's back (a prune racing a file's return) is then uploaded again.
    pub fn expire(&mut self, max_age: std::time::Duration) {
        if self.loaded.is_some_and(|t| t.elapsed() >= max_age) {
            *self = Self::default();
        }
    }

    async fn db(&mut self, repo: &Repository, db: &str) -> Result<&mut DbState, FilestoreError> {
        if !self.known.contains_key(db) {
            let mut state = DbState {
                stored: stored_names(repo, db).await?,
                removed: HashSet::new(),
            };
            for (rel, event) in events(repo, db).await? {
                if event.removed && state.stored.contains(&rel) {
                    state.removed.insert(rel);
                }
            }
            self.loaded.get_or_insert_with(std::time::Instant::now);
            self.known.insert(db.to_owned(), state);
        }
        Ok(self.known.get_mut(db).expect("inserted above"))
    }
}

/// The files (`<xx>/<sha1>`) the repository holds for `db`, plain or gzip.
///
/// # Errors
/// The repository failed.
pub async fn stored_names(repo: &Repository, db: &str) -> Result<HashSet<String>, StorageError> {
    let prefix = format!("{PREFIX}{db}/");
    Ok(repo
        .storage
        .list(&prefix)
        .await?
        .iter()
        .filter_map(|meta| {
            let rel = meta.key.as_str().strip_prefix(&prefix)?;
            let rel = rel.strip_suffix(".gz").unwrap_or(rel);
            is_store_fname(rel).then(|| rel.to_owned())
        })
        .collect())
}

/// The newest index entry naming one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEvent {
    /// The newest entry says removed (else added).
    pub removed: bool,
    /// That index's time.
    pub time: std::time::SystemTime,
}

/// Every file the index objects of `db` name, with the newest entry for
/// each. Index keys sort by time, so they are folded in key order.
///
/// # Errors
/// The repository failed, or an index object is not one.
pub async fn events(
    repo: &Repository,
    db: &str,
) -> Result<HashMap<String, FileEvent>, FilestoreError> {
    let mut out = HashMap::new();
    for meta in repo.storage.list(&format!("{INDEX_PREFIX}{db}/")).await? {
        if !meta.key.as_str().ends_with(".json") {
            continue;
        }
        let body = repo.storage.get(&meta.key).await?;
        let index: SyncIndex =
            serde_json::from_slice(&body).map_err(|e| FilestoreError::Index {
                key: meta.key.to_string(),
                detail: e.to_string(),
            })?;
        let time = humantime::parse_rfc3339(&index.time).map_err(|e| FilestoreError::Index {
            key: meta.key.to_string(),
            detail: format!("time {}: {e}", index.time),
        })?;
        for e in index.added {
            out.insert(
                e.store_fname,
                FileEvent {
                    removed: false,
                    time,
                },
            );
        }
        for rel in index.removed {
            out.insert(
                rel,
                FileEvent {
                    removed: true,
                    time,
                },
            );
        }
    }
    Ok(out)
}

enum Uploaded {
    Stored { size: u64, stored: u64, gzip: bool },
    Corrupt(String),
    Vanished,
}

/// Uploads every file under `root` (`<db>/<xx>/<sha1>`) that the repository
/// lacks. Returns once each file it saw is durable in the repository, or
/// was reported corrupt (its content does not hash to its name) and left
/// out. Memory stays bounded: directories are read in batches, large files
/// streamed.
///
/// # Errors
/// The volume or the repository failed; nothing reported as stored is lost.
pub async fn sync(
    repo: &Repository,
    root: &Path,
    state: &mut SyncState,
    level: u32,
) -> Result<SyncReport, FilestoreError> {
    let read_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| FilestoreError::Read { path, source }
    };
    let mut report = SyncReport::default();
    let mut dbs = tokio::fs::read_dir(root).await.map_err(read_err(root))?;
    while let Some(entry) = dbs.next_entry().await.map_err(read_err(root))? {
        let Some(db) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !valid_db(&db) || !entry.file_type().await.is_ok_and(|t| t.is_dir()) {
            continue;
        }
        report.databases += 1;
        let mut added = Vec::new();
        let mut seen = HashSet::new();
        let db_dir = entry.path();
        let mut shards = tokio::fs::read_dir(&db_dir)
            .await
            .map_err(read_err(&db_dir))?;
        while let Some(shard) = shards.next_entry().await.map_err(read_err(&db_dir))? {
            let Some(xx) = shard.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if xx.len() != 2 || !shard.file_type().await.is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let shard_dir = shard.path();
            let mut files = tokio::fs::read_dir(&shard_dir)
                .await
                .map_err(read_err(&shard_dir))?;
            let mut batch = Vec::new();
            loop {
                let next = files.next_entry().await.map_err(read_err(&shard_dir))?;
                let done = next.is_none();
                if let Some(f) = next {
                    let Some(name) = f.file_name().to_str().map(str::to_owned) else {
                        continue;
                    };
                    let rel = format!("{xx}/{name}");
                    if !is_store_fname(&rel) {
                        continue;
                    }
                    report.files_seen += 1;
                    let known = state.db(repo, &db).await?;
                    if !known.stored.contains(&rel) {
                        batch.push((rel.clone(), f.path()));
                    } else if known.removed.contains(&rel) {
                        // Back after its removal: the object may have been
                        // pruned since, so look before counting on it.
                        known.removed.remove(&rel);
                        match stored_entry(repo, &db, &rel, &f.path()).await? {
                            Some(entry) => added.push(entry),
                            None => {
                                known.stored.remove(&rel);
                                batch.push((rel.clone(), f.path()));
                            }
                        }
                    }
                    seen.insert(rel);
                }
                if batch.len() >= BATCH || (done && !batch.is_empty()) {
                    upload_batch(
                        repo,
                        &db,
                        std::mem::take(&mut batch),
                        level,
                        state,
                        &mut report,
                        &mut added,
                    )
                    .await?;
                }
                if done {
                    break;
                }
            }
        }
        let known = state.db(repo, &db).await?;
        let mut removed: Vec<String> = known
            .stored
            .iter()
            .filter(|rel| !seen.contains(*rel) && !known.removed.contains(*rel))
            .cloned()
            .collect();
        if seen.is_empty() && !removed.is_empty() {
            // An empty directory where the repository holds files is a
            // volume mounted wrong or lost, not a garbage collection: record
            // nothing, so that prune keeps every file.
            tracing::warn!(
                database = %db,
                stored = removed.len(),
                "the filestore directory is empty but the repository holds its files; not \
                 recording them as removed"
            );
            removed.clear();
        }
        removed.sort();
        known.removed.extend(removed.iter().cloned());
        report.files_removed += removed.len() as u64;
        if !added.is_empty() || !removed.is_empty() {
            write_index(repo, &db, added, removed).await?;
        }
    }
    Ok(report)
}

/// The filestore objects retention lets go, given the start of the oldest
/// kept backup (`oldest`): those whose newest index entry records their
/// removal from the volume more than `margin` before it (room for clocks
/// that differ between the Odoo pods and the backups).
///
/// Why that is safe: Odoo writes a file before the row naming it commits and
/// removes only files no committed row names. A file removed before the
/// oldest restorable point is named by no row at any later point, unless it
/// was written again, and then a later sync saw it back and recorded it as
/// added. A file never recorded as removed (no index at all, a database
/// directory gone, an empty directory) is kept.
///
/// # Errors
/// The repository failed, or an index object cannot be read.
pub async fn deletable(
    repo: &Repository,
    oldest: std::time::SystemTime,
    margin: std::time::Duration,
) -> Result<Vec<crate::storage::ObjectMeta>, FilestoreError> {
    let Some(before) = oldest.checked_sub(margin) else {
        return Ok(Vec::new());
    };
    let dbs: std::collections::BTreeSet<String> = repo
        .storage
        .list(INDEX_PREFIX)
        .await?
        .iter()
        .filter_map(|m| {
            let rest = m.key.as_str().strip_prefix(INDEX_PREFIX)?;
            rest.split_once('/').map(|(db, _)| db.to_owned())
        })
        .filter(|db| valid_db(db))
        .collect();
    let mut out = Vec::new();
    for db in dbs {
        let gone: HashSet<String> = events(repo, &db)
            .await?
            .into_iter()
            .filter(|(_, e)| e.removed && e.time < before)
            .map(|(rel, _)| rel)
            .collect();
        if gone.is_empty() {
            continue;
        }
        let prefix = format!("{PREFIX}{db}/");
        for meta in repo.storage.list(&prefix).await? {
            let Some(rel) = meta.key.as_str().strip_prefix(&prefix) else {
                continue;
            };
            if gone.contains(rel.strip_suffix(".gz").unwrap_or(rel)) {
                out.push(meta);
            }
        }
    }
    Ok(out)
}

/// The index entry of a file the repository still holds, or `None`.
async fn stored_entry(
    repo: &Repository,
    db: &str,
    rel: &str,
    path: &Path,
) -> Result<Option<IndexEntry>, FilestoreError> {
    for gzip in [false, true] {
        if repo
            .storage
            .head(&object_key(db, rel, gzip)?)
            .await?
            .is_some()
        {
            let size = tokio::fs::metadata(path).await.map_or(0, |m| m.len());
            return Ok(Some(IndexEntry {
                store_fname: rel.to_owned(),
                size,
                gzip,
            }));
        }
    }
    Ok(None)
}

async fn upload_batch(
    repo: &Repository,
    db: &str,
    batch: Vec<(String, PathBuf)>,
    level: u32,
    state: &mut SyncState,
    report: &mut SyncReport,
    added: &mut Vec<IndexEntry>,
) -> Result<(), FilestoreError> {
    let results: Vec<(String, PathBuf, Result<Uploaded, FilestoreError>)> =
        futures::stream::iter(batch)
            .map(|(rel, path)| async move {
                let r = upload_file(repo, db, &rel, &path, level).await;
                (rel, path, r)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
    let known = &mut state.db(repo, db).await?.stored;
    let mut first_error = None;
    for (rel, path, result) in results {
        match result {
            Ok(Uploaded::Stored { size, stored, gzip }) => {
                report.files_uploaded += 1;
                report.bytes_uploaded += size;
                report.bytes_stored += stored;
                known.insert(rel.clone());
                added.push(IndexEntry {
                    store_fname: rel,
                    size,
                    gzip,
                });
            }
            Ok(Uploaded::Corrupt(why)) => {
                tracing::error!(file = %path.display(), "{why}; not uploaded");
                report.corrupt.push(format!("{}: {why}", path.display()));
            }
            // Odoo's garbage collection removed it since the directory was read.
            Ok(Uploaded::Vanished) => report.files_seen -= 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // What was stored is in `added` and gets its index before the error is
    // returned by the caller's next step; stop here on the first failure.
    match first_error {
        Some(e) => {
            if !added.is_empty() {
                write_index(repo, db, std::mem::take(added), Vec::new()).await?;
            }
            Err(e)
        }
        None => Ok(()),
    }
}

/// A reader that hashes what passes and, at its end, fails (and sets
/// `mismatch`) when the SHA-1 is not `expected`: the upload it feeds is then
/// aborted and nothing is stored under that name.
struct CheckedReader<R> {
    inner: R,
    hasher: Sha1,
    expected: String,
    mismatch: Arc<AtomicBool>,
    done: bool,
}

impl<R: AsyncRead + Unpin> AsyncRead for CheckedReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() && !self.done {
                    self.done = true;
                    let got = hex::encode(self.hasher.clone().finalize());
                    if got != self.expected {
                        self.mismatch.store(true, Ordering::SeqCst);
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("content hashes to {got}, not to its name"),
                        )));
                    }
                } else {
                    self.hasher.update(new);
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

async fn upload_file(
    repo: &Repository,
    db: &str,
    rel: &str,
    path: &Path,
    level: u32,
) -> Result<Uploaded, FilestoreError> {
    let read_err = |source| FilestoreError::Read {
        path: path.display().to_string(),
        source,
    };
    let expected = rel.rsplit('/').next().unwrap_or_default().to_owned();
    let size = match tokio::fs::metadata(path).await {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Uploaded::Vanished),
        Err(e) => return Err(read_err(e)),
    };
    if size <= WHOLE_LIMIT {
        let data = match tokio::fs::read(path).await {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Uploaded::Vanished),
            Err(e) => return Err(read_err(e)),
        };
        let got = hex::encode(Sha1::digest(&data));
        if got != expected {
            return Ok(Uploaded::Corrupt(format!(
                "content hashes to {got}, not to its name"
            )));
        }
        let gzip = compression_pays(&data[..data.len().min(SAMPLE)]);
        let body = if gzip {
            let mut enc =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
            io::Write::write_all(&mut enc, &data).map_err(read_err)?;
            enc.finish().map_err(read_err)?
        } else {
            data
        };
        let stored = body.len() as u64;
        let key = object_key(db, rel, gzip)?;
        return match repo
            .storage
            .put(&key, Bytes::from(body), PutMode::CreateOnly)
            .await
        {
            Ok(()) => Ok(Uploaded::Stored { size, stored, gzip }),
            Err(StorageError::AlreadyExists(location)) => Err(FilestoreError::Conflict {
                location,
                path: path.display().to_string(),
            }),
            Err(e) => Err(e.into()),
        };
    }
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Uploaded::Vanished),
        Err(e) => return Err(read_err(e)),
    };
    let mut sample = vec![0; SAMPLE];
    let n = tokio::io::AsyncReadExt::read(&mut file, &mut sample)
        .await
        .map_err(read_err)?;
    sample.truncate(n);
    let gzip = compression_pays(&sample);
    tokio::io::AsyncSeekExt::seek(&mut file, io::SeekFrom::Start(0))
        .await
        .map_err(read_err)?;
    let mismatch = Arc::new(AtomicBool::new(false));
    let checked = CheckedReader {
        inner: tokio::io::BufReader::with_capacity(1 << 20, file),
        hasher: Sha1::new(),
        expected,
        mismatch: mismatch.clone(),
        done: false,
    };
    let reader: crate::storage::BoxReader = if gzip {
        Box::new(
            async_compression::tokio::bufread::GzipEncoder::with_quality(
                tokio::io::BufReader::new(checked),
                async_compression::Level::Precise(i32::try_from(level).unwrap_or(6)),
            ),
        )
    } else {
        Box::new(checked)
    };
    let key = object_key(db, rel, gzip)?;
    match repo.storage.put_stream(&key, reader).await {
        Ok(stored) => Ok(Uploaded::Stored { size, stored, gzip }),
        Err(_) if mismatch.load(Ordering::SeqCst) => Ok(Uploaded::Corrupt(
            "content does not hash to its name".to_owned(),
        )),
        Err(e) => Err(e.into()),
    }
}

async fn write_index(
    repo: &Repository,
    db: &str,
    added: Vec<IndexEntry>,
    removed: Vec<String>,
) -> Result<(), FilestoreError> {
    let now = index_time();
    let index = SyncIndex {
        format: 1,
        time: now.0,
        database: db.to_owned(),
        added,
        removed,
    };
    let key = ObjectKey::new(format!(
        "{INDEX_PREFIX}{db}/{}-{:08x}.json",
        now.1,
        rand::random::<u32>()
    ))?;
    let body = serde_json::to_vec_pretty(&index).map_err(|e| FilestoreError::Write {
        path: key.to_string(),
        source: io::Error::other(e),
    })?;
    repo.storage
        .put(&key, Bytes::from(body), PutMode::CreateOnly)
        .await?;
    Ok(())
}

/// Now as RFC 3339 with microseconds, and as a key-safe sortable stamp.
fn index_time() -> (String, String) {
    let now = std::time::SystemTime::now();
    let text = humantime::format_rfc3339_micros(now).to_string();
    let stamp = text.replace([':', '-'], "").replace('.', "");
    (text, stamp)
}

/// One attachment a restored database references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The database.
    pub database: String,
    /// `ir_attachment.id`.
    pub id: i64,
    /// `ir_attachment.store_fname`.
    pub store_fname: String,
}

/// Every stored attachment of every database (that allows connections and
/// has an `ir_attachment` table) on the server `pg` reaches.
///
/// # Errors
/// A connection or query failed.
pub async fn attachments(pg: &crate::pgconn::PgTarget) -> anyhow::Result<Vec<Attachment>> {
    let client = pg.connect("pgrestore filestore").await?;
    let dbs: Vec<String> = client
        .query(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    drop(client);
    let mut out = Vec::new();
    for db in dbs {
        out.extend(attachments_of(pg, &db).await?);
    }
    Ok(out)
}

/// The stored attachments of one database (none without `ir_attachment`).
///
/// # Errors
/// A connection or query failed.
pub async fn attachments_of(
    pg: &crate::pgconn::PgTarget,
    db: &str,
) -> anyhow::Result<Vec<Attachment>> {
    let mut target = pg.clone();
    db.clone_into(&mut target.database);
    let client = target.connect("pgrestore filestore").await?;
    let has = client
        .query_one("SELECT to_regclass('ir_attachment') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0);
    if !has {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT id::bigint, store_fname FROM ir_attachment \
             WHERE store_fname IS NOT NULL AND store_fname <> '' ORDER BY id",
            &[],
        )
        .await?
        .iter()
        .map(|row| Attachment {
            database: db.to_owned(),
            id: row.get(0),
            store_fname: row.get(1),
        })
        .collect())
}

/// What a filestore restore did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RestoreReport {
    /// Files written.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Attachments whose file the repository lacks (or holds damaged).
    pub missing: Vec<String>,
}

/// Fetches the file of every attachment into `dir/<db>/<store_fname>`,
/// each checked against its SHA-1 and made durable; files several
/// attachments share are fetched once. Missing or damaged files are named
/// in the report, never silent.
///
/// # Errors
/// The repository or the directory failed.
pub async fn restore_files(
    repo: &Repository,
    attachments: &[Attachment],
    dir: &Path,
) -> Result<RestoreReport, FilestoreError> {
    restore_files_as(repo, attachments, dir, None).await
}

/// [`restore_files`], with every file written under `dir/<as_db>/` instead
/// of its own database's name (a tenant restored under a new name).
///
/// # Errors
/// The repository or the directory failed.
pub async fn restore_files_as(
    repo: &Repository,
    attachments: &[Attachment],
    dir: &Path,
    as_db: Option<&str>,
) -> Result<RestoreReport, FilestoreError> {
    let mut by_file: HashMap<(String, String), Vec<i64>> = HashMap::new();
    let mut report = RestoreReport::default();
    for a in attachments {
        if !is_store_fname(&a.store_fname) || !valid_db(&a.database) {
            report.missing.push(format!(
                "attachment {} in database {}: store_fname {:?} is not Odoo's <xx>/<sha1>",
                a.id, a.database, a.store_fname
            ));
            continue;
        }
        by_file
            .entry((a.database.clone(), a.store_fname.clone()))
            .or_default()
            .push(a.id);
    }
    let mut files: Vec<_> = by_file.into_iter().collect();
    files.sort();
    let results: Vec<_> = futures::stream::iter(files)
        .map(|((db, rel), ids)| async move {
            let r = fetch_file(repo, &db, &rel, &dir.join(as_db.unwrap_or(&db))).await;
            (db, rel, ids, r)
        })
        .buffer_unordered(PARALLEL * 2)
        .collect()
        .await;
    let mut first_error = None;
    for (db, rel, ids, r) in results {
        match r {
            Ok(Ok(size)) => {
                report.files += 1;
                report.bytes += size;
            }
            Ok(Err(why)) => {
                let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
                report.missing.push(format!(
                    "attachment {} in database {db}: {rel} {why}",
                    ids.join(", ")
                ));
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    report.missing.sort();
    match first_error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// Fetches one file; `Ok(Err(why))` when the repository lacks it or holds
/// it damaged.
async fn fetch_file(
    repo: &Repository,
    db: &str,
    rel: &str,
    db_dir: &Path,
) -> Result<Result<u64, String>, FilestoreError> {
    let dest = db_dir.join(rel);
    let part = dest.with_extension("part");
    let write_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| FilestoreError::Write { path, source }
    };
    for gzip in [true, false] {
        let key = object_key(db, rel, gzip)?;
        let reader = match repo.storage.get_stream(&key).await {
            Ok(r) => r,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let mut reader: crate::storage::BoxReader = if gzip {
            Box::new(async_compression::tokio::bufread::GzipDecoder::new(
                tokio::io::BufReader::new(reader),
            ))
        } else {
            reader
        };
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(write_err(parent))?;
        }
        let mut out = tokio::fs::File::create(&part)
            .await
            .map_err(write_err(&part))?;
        let mut hasher = Sha1::new();
        let mut size = 0u64;
        let mut buf = vec![0; 1 << 20];
        loop {
            let n = match tokio::io::AsyncReadExt::read(&mut reader, &mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&part).await;
                    return Ok(Err(format!(
                        "is damaged in the repository ({}: {e})",
                        repo.storage.location(&key)
                    )));
                }
            };
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
            out.write_all(&buf[..n]).await.map_err(write_err(&part))?;
        }
        let got = hex::encode(hasher.finalize());
        if !rel.ends_with(&got) {
            drop(out);
            let _ = tokio::fs::remove_file(&part).await;
            return Ok(Err(format!(
                "is damaged in the repository ({} hashes to {got})",
                repo.storage.location(&key)
            )));
        }
        out.sync_all().await.map_err(write_err(&part))?;
        drop(out);
        tokio::fs::rename(&part, &dest)
            .await
            .map_err(write_err(&dest))?;
        return Ok(Ok(size));
    }
    Ok(Err(
        "is not in the repository (the filestore sync had not stored it)".to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_fnames_are_odoo_s_form_only() {
        let sha = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
        assert!(is_store_fname(&format!("0a/{sha}")));
        assert!(!is_store_fname(&format!("0b/{sha}")), "shard must match");
        assert!(!is_store_fname(&format!("../{sha}")));
        assert!(!is_store_fname("0a/../../etc/passwd"));
        assert!(!is_store_fname(&format!("0a/{}", sha.to_uppercase())));
        assert!(!valid_db(".."));
        assert!(!valid_db("a/b"));
    }

    #[test]
    fn gzip_is_chosen_where_it_pays() {
        let text = b"<xml>invoice line</xml>\n".repeat(1000);
        assert!(compression_pays(&text));
        let mut noise = vec![0u8; 64 << 10];
        let mut x = 0x9e37_79b9_u32;
        for b in &mut noise {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x.to_le_bytes()[0];
        }
        assert!(
            !compression_pays(&noise),
            "random bytes (as a JPEG's) do not compress"
        );
    }
}
