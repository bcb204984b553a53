//! WAL streaming (`PITR_STREAM=on`): the daemon receives WAL over the
//! replication protocol, on a physical slot, and stores it as it is written.
//!
//! - A complete segment is stored exactly as `wal-push` stores it (same key,
//!   same content, create-only), so the stream and `archive_command` run side
//!   by side and whichever comes second meets an identical object.
//! - The segment being written is stored in pieces under `wal-partial/`
//!   (see [`crate::catalog::partial`]): every `PITR_STREAM_FLUSH` in async
//!   mode, at once in sync mode. `wal-fetch` serves them, padded.
//! - The flush position reported to PostgreSQL is what is durable in the
//!   repository, in both modes. The slot therefore never lets PostgreSQL
//!   recycle WAL the repository does not hold, and with
//!   `synchronous_standby_names = 'pitr_agent'` a commit returns only once it
//!   is in the repository.
//! - Any failure (connection, repository) ends the session; the next one
//!   resumes from the slot, after a backoff.

mod replication;

pub use replication::{ReplicationConnection, ReplicationError, StreamMessage, SystemIdentity};

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::archive::{ArchiveError, store_compressed};
use crate::catalog::{self, partial};
use crate::compress::{self, Sha256Digest};
use crate::pgconn::PgTarget;
use crate::repository::Repository;
use crate::storage::PutMode;
use crate::wal::{Lsn, SegmentNo, TimelineId, WalFileName};

/// The default slot name; also the stream's `application_name`, which
/// `synchronous_standby_names` names for synchronous mode.
pub const DEFAULT_SLOT: &str = "pitr_agent";

/// After this many pieces of one segment, the next piece starts from the
/// segment's first byte and replaces them: a restore reads few objects.
const COMPACT_AFTER: u32 = 32;

/// A status update at least this often, so `wal_sender_timeout` never fires.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Complete segments held in memory while the repository is slow; beyond
/// this the stream stops reading and PostgreSQL keeps the WAL in the slot.
const QUEUED_SEGMENTS: usize = 2;

/// The stream's settings.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// The physical replication slot (and `application_name`).
    pub slot: String,
    /// Async mode: how often the segment being written is stored.
    pub flush_every: Duration,
    /// Sync mode: store new WAL at once, one upload at a time.
    pub sync: bool,
    /// gzip level.
    pub level: u32,
    /// `PITR_INIT=auto`.
    pub auto_init: bool,
}

/// What the stream reports to `/status` and `/metrics`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct StreamStatus {
    /// Whether a replication session is streaming now.
    pub up: bool,
    /// The slot.
    pub slot: String,
    /// Synchronous mode.
    pub sync: bool,
    /// The timeline streamed.
    pub timeline: Option<u32>,
    /// The server's end of WAL, as last reported by it.
    #[serde(serialize_with = "lsn_text")]
    pub server_lsn: u64,
    /// The end of what is durable in the repository.
    #[serde(serialize_with = "lsn_text")]
    pub stored_lsn: u64,
    /// When WAL was last stored, as Unix seconds.
    pub last_stored_unix: Option<f64>,
    /// The last failure, until a session streams again.
    pub last_error: Option<String>,
    /// Times the slot was found invalidated.
    pub slot_invalidations: u64,
}

fn lsn_text<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&Lsn(*v))
}

impl StreamStatus {
    /// Bytes the repository is behind the server.
    #[must_use]
    pub fn lag_bytes(&self) -> u64 {
        self.server_lsn.saturating_sub(self.stored_lsn)
    }
}

/// The shared status handle.
pub type SharedStatus = Arc<Mutex<StreamStatus>>;

fn lock(status: &SharedStatus) -> std::sync::MutexGuard<'_, StreamStatus> {
    status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Streams until `shutdown`, reconnecting with backoff (1 s doubling to 60 s).
pub async fn run(
    repo: Repository,
    pg: PgTarget,
    cfg: StreamConfig,
    status: SharedStatus,
    shutdown: CancellationToken,
) {
    {
        let mut s = lock(&status);
        s.slot.clone_from(&cfg.slot);
        s.sync = cfg.sync;
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            r = session(&repo, &pg, &cfg, &status) => r,
            () = shutdown.cancelled() => return,
        };
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        let error = match result {
            Ok(()) => "the server ended the stream".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        tracing::warn!(error = %error, retry_in = ?backoff, "WAL stream stopped; archive_command still archives whole segments");
        {
            let mut s = lock(&status);
            s.up = false;
            s.last_error = Some(error);
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// An upload in flight, and the position that is durable once it succeeds.
type Upload = JoinHandle<Result<Lsn, ArchiveError>>;

/// One replication session: from connecting to the first failure.
async fn session(
    repo: &Repository,
    pg: &PgTarget,
    cfg: &StreamConfig,
    status: &SharedStatus,
) -> anyhow::Result<()> {
    let control = pg.connect("pitr-agent stream").await?;
    let seg = segment_size(&control).await?;
    let mut conn = ReplicationConnection::connect(pg, &cfg.slot).await?;
    let ident = conn.identify_system().await?;
    repo.claim(
        ident.system_id,
        &std::env::temp_dir().join("pitr-agent-stream-owner"),
        cfg.auto_init,
    )
    .await?;
    let restart = ensure_slot(repo, &control, cfg, ident, seg, status).await?;

    // Start at the first segment the repository does not hold whole.
    let mut segno = restart.segment(seg);
    while segno.end(seg) <= ident.flushed
        && repo
            .storage
            .head(&catalog::wal_key(&WalFileName::segment(
                ident.timeline,
                segno,
                seg,
            )))
            .await?
            .is_some()
    {
        segno = SegmentNo(segno.0 + 1);
    }
    let mut state = SegmentState::new(ident.timeline, segno, seg);
    let name = state.name();
    let pieces: Vec<partial::PartialPiece> = repo
        .storage
        .list(&partial::partial_prefix(&name))
        .await?
        .iter()
        .filter_map(partial::piece_of)
        .collect();
    let mut stored = partial::covering_chain(&pieces, state.start)
        .last()
        .map_or(state.start, |p| p.end);
    state.pieces = u32::try_from(pieces.len()).unwrap_or(u32::MAX);
    conn.start_replication(&cfg.slot, state.start, ident.timeline)
        .await?;
    tracing::info!(slot = %cfg.slot, timeline = ident.timeline.0, start = %state.start, stored = %stored, sync = cfg.sync, "streaming WAL");
    // Once streaming, so that commits never wait for a stream not yet there.
    settle_sync_setting(&control, cfg).await;
    {
        let mut s = lock(status);
        s.up = true;
        s.timeline = Some(ident.timeline.0);
        s.server_lsn = ident.flushed.0;
        s.stored_lsn = stored.0;
        s.last_error = None;
    }

    let mut queue: VecDeque<(WalFileName, Bytes)> = VecDeque::new();
    let mut inflight: Option<Upload> = None;
    let mut flush_due = false;
    let mut flush_tick = tokio::time::interval(cfg.flush_every);
    let mut status_tick = tokio::time::interval(STATUS_EVERY);
    loop {
        if inflight.is_none() {
            if let Some((name, raw)) = queue.front() {
                inflight = Some(tokio::spawn(store_segment(
                    repo.clone(),
                    name.clone(),
                    raw.clone(),
                    cfg.level,
                )));
            } else if (cfg.sync || flush_due) && state.end() > stored {
                flush_due = false;
                let from = if state.pieces >= COMPACT_AFTER {
                    state.start
                } else {
                    stored
                };
                inflight = Some(tokio::spawn(store_piece(
                    repo.clone(),
                    state.name(),
                    from,
                    state.bytes_from(from),
                    cfg.level,
                    from == state.start && state.pieces > 0,
                )));
                state.pieces = if from == state.start {
                    1
                } else {
                    state.pieces + 1
                };
            }
        }
        let reading = queue.len() < QUEUED_SEGMENTS;
        tokio::select! {
            done = async { inflight.as_mut().expect("guarded").await }, if inflight.is_some() => {
                inflight = None;
                let end = done.context("an upload task failed")??;
                if queue
                    .front()
                    .is_some_and(|(n, _)| n.segment_no(seg).map(|s| s.end(seg)) == Some(end))
                {
                    queue.pop_front();
                }
                if end > stored {
                    stored = end;
                }
                {
                    let mut s = lock(status);
                    s.stored_lsn = stored.0;
                    s.last_stored_unix = Some(unix_now());
                }
                conn.send_status(state.end(), stored, false).await?;
            }
            message = conn.recv(), if reading => {
                match message? {
                    StreamMessage::Data { start, server_end, data } => {
                        lock(status).server_lsn = server_end.0;
                        if start != state.end() {
                            anyhow::bail!(
                                "the server sent WAL from {start}, but the stream is at {}",
                                state.end()
                            );
                        }
                        for (name, raw) in state.append(&data) {
                            queue.push_back((name, raw));
                        }
                    }
                    StreamMessage::Keepalive { server_end, reply } => {
                        lock(status).server_lsn = server_end.0;
                        if reply {
                            conn.send_status(state.end(), stored, false).await?;
                        }
                    }
                    StreamMessage::End => return Ok(()),
                }
            }
            _ = flush_tick.tick(), if !cfg.sync => flush_due = true,
            _ = status_tick.tick() => conn.send_status(state.end(), stored, false).await?,
        }
    }
}

/// The segment being received.
struct SegmentState {
    timeline: TimelineId,
    segno: SegmentNo,
    size: u32,
    /// Its first byte's position.
    start: Lsn,
    /// The bytes received, from its first byte.
    buf: Vec<u8>,
    /// Pieces of it stored so far (for compaction).
    pieces: u32,
}

impl SegmentState {
    fn new(timeline: TimelineId, segno: SegmentNo, size: u32) -> Self {
        SegmentState {
            timeline,
            segno,
            size,
            start: segno.start(size),
            buf: Vec::with_capacity(size as usize),
            pieces: 0,
        }
    }

    fn name(&self) -> WalFileName {
        WalFileName::segment(self.timeline, self.segno, self.size)
    }

    /// The position after the last byte received.
    fn end(&self) -> Lsn {
        Lsn(self.start.0 + self.buf.len() as u64)
    }

    fn bytes_from(&self, from: Lsn) -> Bytes {
        let offset = usize::try_from(from.0 - self.start.0).unwrap_or(usize::MAX);
        Bytes::copy_from_slice(self.buf.get(offset..).unwrap_or_default())
    }

    /// Appends WAL; returns the segments it completed.
    fn append(&mut self, mut data: &[u8]) -> Vec<(WalFileName, Bytes)> {
        let mut complete = Vec::new();
        while !data.is_empty() {
            let room = self.size as usize - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.size as usize {
                let name = self.name();
                let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.size as usize));
                complete.push((name, Bytes::from(full)));
                self.segno = SegmentNo(self.segno.0 + 1);
                self.start = self.segno.start(self.size);
                self.pieces = 0;
            }
        }
        complete
    }
}

/// Stores a complete segment as `wal-push` would, then deletes its pieces.
/// Returns the segment's end.
async fn store_segment(
    repo: Repository,
    name: WalFileName,
    raw: Bytes,
    level: u32,
) -> Result<Lsn, ArchiveError> {
    let size = raw.len() as u64;
    let summary = {
        let (raw, name) = (raw.clone(), name.clone());
        tokio::task::spawn_blocking(move || crate::archive::summary::summarize_quietly(&name, &raw))
            .await
            .unwrap_or(None)
    };
    let (digest, gz) = gzip(raw, &name, level).await;
    let outcome =
        store_compressed(&repo.storage, &catalog::wal_key(&name), &name, digest, gz).await?;
    crate::archive::summary::store_summary_best_effort(&repo.storage, summary).await;
    tracing::debug!(file = %name, ?outcome, "streamed segment stored");
    repo.storage
        .delete_prefix(&partial::partial_prefix(&name))
        .await?;
    let seg = u32::try_from(size).unwrap_or(u32::MAX);
    Ok(name.segment_no(seg).unwrap_or(SegmentNo(0)).end(seg))
}

/// Stores the piece of `segment` from `from`; with `replaces`, deletes the
/// pieces it covers. Returns the piece's end.
async fn store_piece(
    repo: Repository,
    segment: WalFileName,
    from: Lsn,
    raw: Bytes,
    level: u32,
    replaces: bool,
) -> Result<Lsn, ArchiveError> {
    let end = Lsn(from.0 + raw.len() as u64);
    let key = partial::partial_key(&segment, from, end);
    let (digest, gz) = gzip(raw, &segment, level).await;
    match repo
        .storage
        .put(&key, Bytes::from(gz), PutMode::CreateOnly)
        .await
    {
        Ok(()) => {}
        // A retried write that had landed: the same bytes by construction
        // (same segment, same positions), but check.
        Err(crate::storage::StorageError::AlreadyExists(_)) => {
            let stored = crate::archive::header_digest_of(&repo.storage, &key).await?;
            if stored != Some(digest) {
                return Err(ArchiveError::Conflict {
                    name: key.as_str().to_owned(),
                    location: repo.storage.location(&key),
                    stored: stored.unwrap_or(digest),
                    local: digest,
                });
            }
        }
        Err(e) => return Err(e.into()),
    }
    if replaces {
        for old in repo
            .storage
            .list(&partial::partial_prefix(&segment))
            .await?
        {
            if old.key != key && partial::piece_of(&old).is_some_and(|p| p.end <= end) {
                repo.storage.delete(&old.key).await?;
            }
        }
    }
    Ok(end)
}

async fn gzip(raw: Bytes, name: &WalFileName, level: u32) -> (Sha256Digest, Vec<u8>) {
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        let digest = Sha256Digest::of(&raw);
        let gz = compress::gzip_with_digest(&raw, &name, digest, level);
        (digest, gz)
    })
    .await
    .expect("gzip does not panic")
}

async fn segment_size(control: &tokio_postgres::Client) -> anyhow::Result<u32> {
    let row = control
        .query_one(
            "SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size'",
            &[],
        )
        .await
        .context("reading wal_segment_size")?;
    let size: i64 = row.get(0);
    u32::try_from(size).context("wal_segment_size out of range")
}

/// Settles `synchronous_standby_names` with `PITR_STREAM_SYNC`.
///
/// With sync on and the setting never set (source `default`), the stream
/// names itself with `ALTER SYSTEM` and reloads: a setting in
/// `postgresql.auto.conf`, so that the documented release (`ALTER SYSTEM
/// SET synchronous_standby_names = ''`) works; a `-c` on postgres' command
/// line would outrank it. A value the operator set (a release among them)
/// is left alone, with a warning: the operator's word wins until `ALTER
/// SYSTEM RESET synchronous_standby_names`.
async fn settle_sync_setting(control: &tokio_postgres::Client, cfg: &StreamConfig) {
    let Ok(row) = control
        .query_one(
            "SELECT setting, source FROM pg_settings WHERE name = 'synchronous_standby_names'",
            &[],
        )
        .await
    else {
        return;
    };
    let names: String = row.get(0);
    let source: String = row.get(1);
    let named = names
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
        .any(|n| n.eq_ignore_ascii_case(&cfg.slot));
    if cfg.sync && !named {
        if source == "default" {
            let set = format!(
                "ALTER SYSTEM SET synchronous_standby_names = '{}'",
                cfg.slot.replace('\'', "''")
            );
            // Two statements: ALTER SYSTEM refuses to run in the implicit
            // transaction of a multi-statement query.
            let result = match control.batch_execute(&set).await {
                Ok(()) => control.batch_execute("SELECT pg_reload_conf()").await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => tracing::info!(
                    slot = %cfg.slot,
                    "PITR_STREAM_SYNC=on: set synchronous_standby_names with ALTER SYSTEM; commits now wait for the repository. Release in an emergency: ALTER SYSTEM SET synchronous_standby_names = ''; SELECT pg_reload_conf()"
                ),
                Err(e) => {
                    let hint = if e.code()
                        == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
                    {
                        "; the stream's role needs superuser, or GRANT ALTER SYSTEM ON PARAMETER synchronous_standby_names and EXECUTE on pg_reload_conf() (PostgreSQL 15+)"
                    } else {
                        ""
                    };
                    tracing::warn!(
                        error = %crate::pgconn::error_text(&e),
                        "PITR_STREAM_SYNC=on, but setting synchronous_standby_names failed: commits do not wait for the repository{hint}"
                    );
                }
            }
        } else {
            tracing::warn!(synchronous_standby_names = %names, source = %source, slot = %cfg.slot, "PITR_STREAM_SYNC=on, but synchronous_standby_names is set to something else (a release?): commits do not wait for the repository; ALTER SYSTEM RESET synchronous_standby_names, and the stream sets it at its next connection");
        }
    }
    if !cfg.sync && named {
        tracing::warn!(synchronous_standby_names = %names, slot = %cfg.slot, "synchronous_standby_names names the stream but PITR_STREAM_SYNC is off: every commit waits up to PITR_STREAM_FLUSH");
    }
}

/// The slot's restart position, creating the slot when missing. An
/// invalidated slot is recreated only when the archive holds every segment
/// the stream missed, so the repository has no hole.
async fn ensure_slot(
    repo: &Repository,
    control: &tokio_postgres::Client,
    cfg: &StreamConfig,
    ident: SystemIdentity,
    seg: u32,
    status: &SharedStatus,
) -> anyhow::Result<Lsn> {
    let row = control
        .query_opt(
            "SELECT slot_type, restart_lsn::text, wal_status FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .context("reading pg_replication_slots")?;
    let Some(row) = row else {
        let lsn = create_slot(control, &cfg.slot).await?;
        tracing::info!(slot = %cfg.slot, restart = %lsn, "created the physical replication slot");
        return Ok(lsn);
    };
    let slot_type: String = row.get(0);
    if slot_type != "physical" {
        anyhow::bail!(
            "replication slot {} is a {slot_type} slot; set PITR_STREAM_SLOT to another name",
            cfg.slot
        );
    }
    let restart: Option<String> = row.get(1);
    let wal_status: Option<String> = row.get(2);
    if let Some(lsn) = restart.and_then(|r| r.parse::<Lsn>().ok())
        && wal_status.as_deref() != Some("lost")
    {
        return Ok(lsn);
    }
    lock(status).slot_invalidations += 1;
    tracing::error!(slot = %cfg.slot, "the replication slot was invalidated: PostgreSQL removed WAL the stream had not stored (max_slot_wal_keep_size)");
    // PostgreSQL removes WAL only once archive_command archived it, so the
    // archive normally holds what the stream missed; check before going on.
    let stopped_at = Lsn(lock(status).stored_lsn);
    let current: String = control
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let current: Lsn = current.parse().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let missing = archive_hole(repo, ident.timeline, stopped_at, current, seg).await?;
    if let Some((first, last)) = missing {
        anyhow::bail!(
            "the replication slot {} was invalidated and the archive misses {first}..{last}, so \
             recreating it would leave a hole: make archive_command catch up (pg_stat_archiver), \
             or take a new base backup, then restart the agent",
            cfg.slot
        );
    }
    control
        .execute("SELECT pg_drop_replication_slot($1)", &[&cfg.slot])
        .await
        .context("dropping the invalidated slot")?;
    let lsn = create_slot(control, &cfg.slot).await?;
    tracing::warn!(slot = %cfg.slot, restart = %lsn, "recreated the invalidated slot: the archive holds every segment before it");
    Ok(lsn)
}

async fn create_slot(control: &tokio_postgres::Client, slot: &str) -> anyhow::Result<Lsn> {
    let row = control
        .query_one(
            "SELECT lsn::text FROM pg_create_physical_replication_slot($1, true)",
            &[&slot],
        )
        .await
        .with_context(|| {
            format!(
                "creating the replication slot {slot}; the user needs REPLICATION and \
                 max_replication_slots a free slot"
            )
        })?;
    let lsn: Option<String> = row.get(0);
    lsn.and_then(|l| l.parse().ok())
        .context("the new slot has no restart position")
}

/// The first and last segment of timeline `tl` that the archive lacks
/// between where the stream stopped and `current`. Where it stopped is
/// `stopped_at` when this process streamed before; after a restart, the
/// segment after the newest whole one of `tl` in the repository.
async fn archive_hole(
    repo: &Repository,
    tl: TimelineId,
    stopped_at: Lsn,
    current: Lsn,
    seg: u32,
) -> anyhow::Result<Option<(WalFileName, WalFileName)>> {
    let last = current.segment(seg);
    let archived: std::collections::HashSet<WalFileName> = repo
        .storage
        .list(catalog::WAL_PREFIX)
        .await?
        .iter()
        .filter_map(|o| catalog::wal_name_of(&o.key))
        .collect();
    let newest_whole = archived
        .iter()
        .filter(|n| n.kind() == crate::wal::WalFileKind::Segment && n.timeline() == tl)
        .filter_map(|n| n.segment_no(seg))
        .max();
    let first = match (stopped_at.0, newest_whole) {
        (0, Some(newest)) => SegmentNo(newest.0 + 1),
        (0, None) => SegmentNo(last.0.saturating_sub(1)),
        _ => stopped_at.segment(seg),
    };
    let missing: Vec<WalFileName> = (first.0..last.0)
        .map(|s| WalFileName::segment(tl, SegmentNo(s), seg))
        .filter(|n| !archived.contains(n))
        .collect();
    Ok(missing.first().cloned().zip(missing.last().cloned()))
}

/// The WAL the slot keeps on the server (0 without the slot), for metrics.
///
/// # Errors
/// PostgreSQL cannot be queried.
pub async fn slot_retained_bytes(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT COALESCE(pg_current_wal_lsn() - restart_lsn, 0)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map_or(0, |r| r.get(0)))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_wal_completes_segments_at_their_boundaries() {
        let size = 1024 * 1024;
        let mut state = SegmentState::new(TimelineId(2), SegmentNo(5), size);
        assert_eq!(state.end(), Lsn(5 * u64::from(size)));
        assert!(state.append(&vec![1; 1000]).is_empty());
        let done = state.append(&vec![2; size as usize]);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0.as_str(), "000000020000000000000005");
        assert_eq!(done[0].1.len(), size as usize);
        assert_eq!(done[0].1[999], 1);
        assert_eq!(done[0].1[1000], 2);
        assert_eq!(state.name().as_str(), "000000020000000000000006");
        assert_eq!(state.end(), Lsn(6 * u64::from(size) + 1000));
        assert_eq!(state.bytes_from(Lsn(6 * u64::from(size) + 400)).len(), 600);
    }
}
