//! `pitr-agent backup`: runs `pg_basebackup`, streams its tar through gzip
//! into `backups/<id>/`, and commits the backup by writing `backup.json` last.
//!
//! `pg_basebackup -Ft -X fetch -D -` puts the WAL the backup needs inside the
//! tar and appends `backup_manifest`, so a backup restores on its own. The tar
//! is parsed on the fly to lift `backup_label` and `backup_manifest`; nothing
//! is staged on local disk. One backup runs at a time per cluster, enforced
//! with a PostgreSQL advisory lock that dies with its session.

pub mod manifest;
pub mod stream;
pub mod tar;

use std::collections::HashMap;
use std::io;
use std::process::Stdio;
use std::time::SystemTime;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::Instrument as _;

use crate::catalog::OwnerError;
use crate::catalog::backup::{
    BackupId, BackupRecord, DATA_FILE, DATABASES_FILE, DatabaseFiles, MANIFEST_FILE, RECORD_FILE,
    RECORD_FORMAT, STARTED_FILE, StoredObject,
};
use crate::compress::Sha256Digest;
use crate::pgconn::{PgError, PgTarget};
use crate::pgdata::SystemId;
use crate::repository::Repository;
use crate::storage::{PutMode, StorageError};
use crate::wal::{Lsn, WalFileName};
use manifest::{BackupLabel, PgManifest};
use tar::{EntryKind, Event, TarError, TarReader};

/// The advisory-lock key that serialises backups of one cluster ("pitrback").
const LOCK_KEY: i64 = 0x7069_7472_6261_636b;

/// How `pg_basebackup` starts the backup's checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Checkpoint {
    /// Right away, with a burst of I/O.
    Fast,
    /// Spread out, as checkpoint_completion_target says; the backup starts later.
    Spread,
}

/// How to take a backup.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// The checkpoint mode.
    pub checkpoint: Checkpoint,
    /// `pg_basebackup --max-rate`, e.g. `100M`.
    pub max_rate: Option<String>,
    /// gzip level.
    pub level: u32,
    /// Compression threads.
    pub threads: usize,
    /// Create the repository if it does not exist (`PITR_INIT=auto`).
    pub auto_init: bool,
}

/// Why a backup failed. None of these leaves a listed backup behind.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// PostgreSQL is unreachable or refused a query.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// The repository failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The repository belongs to another cluster.
    #[error(transparent)]
    Owner(#[from] OwnerError),
    /// Another backup holds the lock.
    #[error(
        "another backup of this cluster is running ({holder}); wait for it to finish, or if it \
         is stuck, end it with SELECT pg_terminate_backend(pid) and try again"
    )]
    Busy {
        /// Who holds the lock.
        holder: String,
    },
    /// Tablespaces outside the data directory.
    #[error(
        "the cluster has tablespaces outside the data directory ({names}); pitr-agent streams \
         one tar per backup and cannot carry them: move their tables to pg_default \
         (ALTER TABLE ... SET TABLESPACE pg_default) and drop them, or back up with \
         pg_basebackup -Ft into a directory"
    )]
    Tablespaces {
        /// Their names.
        names: String,
    },
    /// The server is too old.
    #[error("PostgreSQL {0} is not supported: pitr-agent backup needs PostgreSQL 13 or later")]
    Unsupported(u32),
    /// pg_basebackup failed.
    #[error("pg_basebackup failed ({status}): {stderr}{hint}")]
    BaseBackup {
        /// Exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
        /// What to do.
        hint: &'static str,
    },
    /// pg_basebackup could not be started.
    #[error("cannot run {path}: {source}")]
    Spawn {
        /// The program.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The tar stream is not what pg_basebackup writes.
    #[error("the backup stream is not usable: {0}")]
    Stream(String),
    /// Reading or uploading the stream failed.
    #[error("streaming the backup: {0}")]
    Io(#[from] io::Error),
}

impl From<TarError> for BackupError {
    fn from(e: TarError) -> Self {
        BackupError::Stream(e.to_string())
    }
}

/// Small files lifted from the tar as it streams past.
#[derive(Default)]
struct Captured {
    files: HashMap<&'static str, Vec<u8>>,
    current: Option<&'static str>,
    wal_files: u64,
    entries: u64,
}

const CAPTURE: [&str; 2] = ["backup_label", "backup_manifest"];

impl Captured {
    fn on_event(&mut self, event: Event<'_>) -> Result<(), BackupError> {
        match event {
            Event::Start(entry) => {
                self.entries += 1;
                if entry.kind == EntryKind::File && entry.path.starts_with("pg_wal/") {
                    self.wal_files += 1;
                }
                self.current = CAPTURE.into_iter().find(|c| *c == entry.path);
                if let Some(name) = self.current {
                    self.files.insert(name, Vec::new());
                }
            }
            Event::Data(data) => {
                if let Some(name) = self.current {
                    self.files
                        .get_mut(name)
                        .expect("inserted")
                        .extend_from_slice(data);
                }
            }
            Event::End(_) => self.current = None,
        }
        Ok(())
    }
}

/// Takes one backup of the cluster at `pg` into `repo`.
///
/// # Errors
/// [`BackupError`]; on any error after the first write the partial backup is
/// removed (or, if that fails too, left without `backup.json` for `prune`).
pub async fn run_backup(
    repo: &Repository,
    pg: &PgTarget,
    cfg: &BackupConfig,
) -> Result<BackupRecord, BackupError> {
    let start_time = SystemTime::now();
    let client = pg.connect("pitr-agent backup").await?;
    let version: u32 = pg
        .query_text(&client, "SHOW server_version_num")
        .await?
        .parse()
        .map_err(|e| BackupError::Stream(format!("server_version_num: {e}")))?;
    let major = version / 10_000;
    if major < 13 {
        return Err(BackupError::Unsupported(major));
    }
    let system_identifier: u64 = pg
        .query_text(
            &client,
            "SELECT system_identifier::text FROM pg_control_system()",
        )
        .await?
        .parse()
        .map_err(|e| BackupError::Stream(format!("system_identifier: {e}")))?;
    let segment_size: u32 = pg
        .query_text(
            &client,
            "SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'",
        )
        .await?
        .parse()
        .map_err(|e| BackupError::Stream(format!("wal_segment_size: {e}")))?;
    let tablespaces = pg
        .query_text(
            &client,
            "SELECT coalesce(string_agg(spcname, ', ' ORDER BY spcname), '') FROM pg_tablespace \
             WHERE spcname NOT IN ('pg_default', 'pg_global')",
        )
        .await?;
    if !tablespaces.is_empty() {
        return Err(BackupError::Tablespaces { names: tablespaces });
    }
    if pg.query_text(&client, "SHOW archive_mode").await? == "off" {
        tracing::warn!(
            "archive_mode is off: this backup restores only to its own end; set archive_mode = on \
             and archive_command = 'pitr-agent wal-push %p' for point-in-time recovery"
        );
    }
    let cache = std::env::temp_dir().join(format!(
        "pitr-agent-owner-{}",
        &hex::encode(Sha256::digest(repo.url.as_bytes()))[..16]
    ));
    repo.claim(system_identifier, &cache, cfg.auto_init).await?;

    let locked = pg
        .query_text(
            &client,
            &format!("SELECT pg_try_advisory_lock({LOCK_KEY})::text"),
        )
        .await?;
    if locked != "true" {
        let holder = pg
            .query_text(
                &client,
                &format!(
                    "SELECT coalesce((SELECT format('%s, server pid %s, since %s', \
                     a.application_name, a.pid, date_trunc('second', a.backend_start)) \
                     FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                     WHERE l.locktype = 'advisory' AND l.granted \
                     AND l.classid = {}::oid AND l.objid = {}::oid LIMIT 1), 'unknown holder')",
                    (LOCK_KEY >> 32) & 0xFFFF_FFFF,
                    LOCK_KEY & 0xFFFF_FFFF
                ),
            )
            .await?;
        return Err(BackupError::Busy { holder });
    }

    let id = free_id(repo, start_time).await?;
    let span = tracing::info_span!("backup", backup_id = %id);
    client
        .batch_execute(&format!("SET application_name = 'pitr-agent backup {id}'"))
        .await
        .map_err(|e| PgError::Query {
            target: pg.describe(),
            detail: e.to_string(),
        })?;
    let started = serde_json::json!({
        "id": id,
        "start-time": humantime::format_rfc3339_millis(start_time).to_string(),
        "pid": std::process::id(),
        "host": hostname(),
    });
    repo.storage
        .put(
            &id.key(STARTED_FILE),
            Bytes::from(serde_json::to_vec_pretty(&started).expect("serializable")),
            PutMode::CreateOnly,
        )
        .await?;
    let pg_basebackup = pg.program("pg_basebackup", major)?;
    let databases = client
        .query(
            "SELECT datname, oid::bigint FROM pg_database ORDER BY datname",
            &[],
        )
        .await
        .map_err(|e| PgError::Query {
            target: pg.describe(),
            detail: e.to_string(),
        })?
        .iter()
        .filter_map(|r| {
            Some(DatabaseFiles {
                name: r.get(0),
                oid: u32::try_from(r.get::<_, i64>(1)).ok()?,
                bytes: 0,
            })
        })
        .collect();
    let result = stream_backup(repo, pg, cfg, &id, &pg_basebackup)
        .instrument(span.clone())
        .await;
    let result = match result {
        Ok(taken) => {
            commit(
                repo,
                &id,
                taken,
                Facts {
                    system_identifier,
                    version,
                    segment_size,
                    start_time,
                    databases,
                },
            )
            .instrument(span)
            .await
        }
        Err(e) => Err(e),
    };
    match &result {
        Ok(_) => {
            // Only a marker; the backup is committed whether or not this goes.
            let _ = repo.storage.delete(&id.key(STARTED_FILE)).await;
        }
        Err(_) => {
            if let Err(e) = repo.storage.delete_prefix(&id.prefix()).await {
                tracing::warn!(backup_id = %id, error = %e,
                    "could not remove the failed backup's objects; `pitr-agent prune` removes them");
            }
        }
    }
    drop(client); // releases the advisory lock
    result
}

/// An id for `time` not used yet in the repository.
async fn free_id(repo: &Repository, time: SystemTime) -> Result<BackupId, StorageError> {
    let base = BackupId::at(time);
    for n in 0..100 {
        let id = if n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}").parse().expect("valid suffix")
        };
        if repo.storage.list(&id.prefix()).await?.is_empty() {
            return Ok(id);
        }
    }
    Ok(base)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// What streaming produced, before the record is written.
struct Taken {
    captured: Captured,
    data: StoredObject,
    raw_bytes: u64,
    stop_time: SystemTime,
}

/// Facts about the server gathered before the backup.
struct Facts {
    system_identifier: u64,
    version: u32,
    segment_size: u32,
    start_time: SystemTime,
    databases: Vec<DatabaseFiles>,
}

async fn stream_backup(
    repo: &Repository,
    pg: &PgTarget,
    cfg: &BackupConfig,
    id: &BackupId,
    pg_basebackup: &std::path::Path,
) -> Result<Taken, BackupError> {
    let mut cmd = Command::new(pg_basebackup);
    cmd.args(["-D", "-", "-F", "tar", "-X", "fetch", "--no-password"])
        .arg(format!(
            "--checkpoint={}",
            match cfg.checkpoint {
                Checkpoint::Fast => "fast",
                Checkpoint::Spread => "spread",
            }
        ))
        .arg("--manifest-checksums=CRC32C")
        .arg(format!("--label=pitr-agent {id}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    pg.configure_child(&mut cmd);
    if let Some(rate) = &cfg.max_rate {
        cmd.arg(format!("--max-rate={rate}"));
    }
    tracing::info!(program = %pg_basebackup.display(), "starting pg_basebackup");
    let mut child = cmd.spawn().map_err(|source| BackupError::Spawn {
        path: pg_basebackup.display().to_string(),
        source,
    })?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let stderr_task = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut tail: Vec<String> = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "pg_basebackup", "{line}");
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
        tail
    });

    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    let data_key = id.key(DATA_FILE);
    let upload = repo
        .storage
        .put_stream(&data_key, Box::new(stream::channel_reader(rx)));
    let mut tar = TarReader::new();
    let mut captured = Captured::default();
    let err_tx = tx.clone();
    let produce = async {
        let result = stream::compress_stream(
            stdout,
            "base.tar",
            cfg.level,
            cfg.threads,
            tx,
            |chunk| tar.feed(chunk, &mut |event| captured.on_event(event)),
            async || {
                let status = child.wait().await?;
                let tail = stderr_task.await.unwrap_or_default();
                if !status.success() {
                    let stderr = tail.join("\n");
                    let hint = if stderr.contains("checksum") {
                        "; data checksum failures mean corrupted pages on disk: find them with \
                         pg_amcheck or pg_checksums, restore the affected relations, and keep the \
                         last good backup"
                    } else {
                        ""
                    };
                    return Err(BackupError::BaseBackup {
                        status: status.to_string(),
                        stderr,
                        hint,
                    });
                }
                Ok(())
            },
        )
        .await;
        // The upload cannot complete while err_tx lives, so this check still counts.
        let result = result.and_then(|stats| {
            tar.finish()?;
            Ok(stats)
        });
        if let Err(e) = &result {
            // Make the upload fail too, so nothing is committed.
            let _ = err_tx
                .send(Err(io::Error::other(format!("backup stream failed: {e}"))))
                .await;
        }
        drop(err_tx);
        result
    };
    let (produced, uploaded) = tokio::join!(produce, upload);
    let stats = produced?;
    let size = uploaded?;
    if size != stats.stored_bytes {
        return Err(BackupError::Stream(format!(
            "uploaded {size} bytes but compressed {}",
            stats.stored_bytes
        )));
    }
    Ok(Taken {
        captured,
        data: StoredObject {
            name: DATA_FILE.to_owned(),
            bytes: stats.stored_bytes,
            sha256: stats.stored_sha256,
        },
        raw_bytes: stats.raw_bytes,
        stop_time: SystemTime::now(),
    })
}

async fn commit(
    repo: &Repository,
    id: &BackupId,
    taken: Taken,
    facts: Facts,
) -> Result<BackupRecord, BackupError> {
    let files = &taken.captured.files;
    let label_text = files
        .get("backup_label")
        .ok_or_else(|| BackupError::Stream("the tar has no backup_label".into()))?;
    let label =
        BackupLabel::parse(&String::from_utf8_lossy(label_text)).map_err(BackupError::Stream)?;
    let manifest_text = files.get("backup_manifest").ok_or_else(|| {
        BackupError::Stream(
            "the tar has no backup_manifest; use pg_basebackup 15 or later and do not pass \
             --no-manifest"
                .into(),
        )
    })?;
    let manifest =
        PgManifest::parse(manifest_text).map_err(|e| BackupError::Stream(e.to_string()))?;
    let (start_timeline, start_lsn) = manifest.start();
    let (timeline, stop_lsn) = manifest.stop();
    if start_lsn != label.start_lsn {
        return Err(BackupError::Stream(format!(
            "backup_label starts at {} but backup_manifest at {start_lsn}",
            label.start_lsn
        )));
    }
    if taken.captured.wal_files == 0 {
        return Err(BackupError::Stream(
            "the tar carries no WAL in pg_wal/".into(),
        ));
    }
    let manifest_body = Bytes::from(manifest_text.clone());
    let manifest_object = StoredObject {
        name: MANIFEST_FILE.to_owned(),
        bytes: manifest_body.len() as u64,
        sha256: Sha256Digest::of(&manifest_body),
    };
    repo.storage
        .put(&id.key(MANIFEST_FILE), manifest_body, PutMode::CreateOnly)
        .await?;
    // Which `base/<oid>/` is which database, and its size in the backup:
    // what a one-tenant restore extracts and skips.
    let mut databases = facts.databases;
    for db in &mut databases {
        let dir = format!("base/{}/", db.oid);
        db.bytes = manifest
            .files
            .iter()
            .filter(|(path, _)| path.starts_with(&dir))
            .map(|(_, f)| f.size)
            .sum();
    }
    repo.storage
        .put(
            &id.key(DATABASES_FILE),
            Bytes::from(serde_json::to_vec_pretty(&databases).expect("serializable")),
            PutMode::CreateOnly,
        )
        .await?;
    let seg = facts.segment_size;
    let record = BackupRecord {
        format: RECORD_FORMAT,
        id: id.clone(),
        label: label.label,
        system_identifier: SystemId(facts.system_identifier),
        pg_version: facts.version,
        wal_segment_size: seg,
        start_timeline,
        timeline,
        start_lsn,
        stop_lsn,
        first_wal: WalFileName::segment(start_timeline, start_lsn.segment(seg), seg),
        last_wal: WalFileName::segment(
            timeline,
            Lsn(stop_lsn.0.saturating_sub(1)).segment(seg),
            seg,
        ),
        wal_included: true,
        start_time: facts.start_time,
        stop_time: taken.stop_time,
        raw_bytes: taken.raw_bytes,
        stored_bytes: taken.data.bytes + manifest_object.bytes,
        manifest_checksums: "CRC32C".to_owned(),
        objects: vec![taken.data, manifest_object],
        created_by: concat!("pitr-agent ", env!("CARGO_PKG_VERSION")).to_owned(),
    };
    let body = serde_json::to_vec_pretty(&record).expect("serializable");
    repo.storage
        .put(&id.key(RECORD_FILE), Bytes::from(body), PutMode::CreateOnly)
        .await?;
    tracing::info!(backup_id = %id, raw = record.raw_bytes, stored = record.stored_bytes, "backup committed");
    Ok(record)
}
