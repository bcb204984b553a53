//! The daemon's Prometheus metrics and `/status` document.
//!
//! Figures come from the repository (a cached catalog) and from PostgreSQL
//! (`pg_stat_archiver`, `.ready` files), refreshed on an interval, so a
//! restarted daemon reports the same state. Labels come from small fixed
//! sets only: never a key or an LSN.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::catalog::backup::Catalog;
use crate::report;

/// A gauge of seconds or timestamps.
pub type FloatGauge = Gauge<f64, AtomicU64>;

/// `outcome="ok|err|cancelled"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// The outcome.
    pub outcome: &'static str,
}

/// `job="backup|verify|prune"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Job {
    /// The job.
    pub job: &'static str,
}

/// `severity="warning|error"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SeverityLabel {
    /// The severity.
    pub severity: &'static str,
}

/// `kind="backups|wal|debris"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    /// What was deleted.
    pub kind: &'static str,
}

/// `phase="restore|replay|checks"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Phase {
    /// The phase.
    pub phase: &'static str,
}

/// `reason="..."`, one of [`crate::rehearse::FailureReason`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// The reason.
    pub reason: &'static str,
}

/// Every metric the daemon exports.
#[derive(Debug, Default)]
pub struct Metrics {
    /// End of the newest committed backup.
    pub backup_last_success: FloatGauge,
    /// When the last backup run failed.
    pub backup_last_failure: FloatGauge,
    /// Duration of the newest backup.
    pub backup_last_duration: FloatGauge,
    /// Stored size of the newest backup.
    pub backup_last_size: Gauge,
    /// Committed backups.
    pub backups: Gauge,
    /// Backup runs by outcome.
    pub backup_runs: Family<Outcome, Counter>,
    /// Scheduled runs missed because the previous one still ran.
    pub missed_runs: Family<Job, Counter>,
    /// When PostgreSQL last archived a segment.
    pub archive_last_archived: FloatGauge,
    /// Archive failures seen in `pg_stat_archiver` since the daemon started.
    pub archive_failures: Counter,
    /// `.ready` segments waiting.
    pub archive_ready: Gauge,
    /// Age of the oldest `.ready` segment.
    pub archive_lag: FloatGauge,
    /// Restorable window start.
    pub window_start: FloatGauge,
    /// Restorable window end.
    pub window_end: FloatGauge,
    /// Stored bytes in the repository.
    pub repository_bytes: Gauge,
    /// When verify last ran to completion.
    pub verify_last_success: FloatGauge,
    /// Findings of the last verify, by severity.
    pub verify_findings: Family<SeverityLabel, Gauge>,
    /// Objects deleted by prune.
    pub prune_deleted: Family<Kind, Counter>,
    /// 1 while the WAL stream streams.
    pub stream_up: Gauge,
    /// Server end of WAL minus what the stream stored.
    pub stream_lag: Gauge,
    /// When the stream last stored WAL.
    pub stream_last_stored: FloatGauge,
    /// WAL the stream's slot keeps on the server.
    pub slot_retained: Gauge,
    /// Times the stream found its slot invalidated.
    pub slot_invalidations: Gauge,
    /// When the newest successful rehearsal finished.
    pub rehearsal_last_success: FloatGauge,
    /// When the newest rehearsal finished, if it failed.
    pub rehearsal_last_failure: FloatGauge,
    /// The newest rehearsal's phases.
    pub rehearsal_duration: Family<Phase, FloatGauge>,
    /// The newest rehearsal's restore plus replay: the measured RTO.
    pub rehearsal_restore: FloatGauge,
    /// The newest proven restorable point.
    pub rehearsal_restored_point: FloatGauge,
    /// Failed rehearsals in the repository, by reason.
    pub rehearsal_failures: Family<Reason, Counter>,
    /// `PITR_RTO_OBJECTIVE` (0: none).
    pub rto_objective: FloatGauge,
    /// Filestore files uploaded since the daemon started.
    pub filestore_files: Counter,
    /// Their bytes on the volume.
    pub filestore_bytes: Counter,
    /// When the newest filestore sync completed.
    pub filestore_last_sync: FloatGauge,
    /// Files the newest sync found damaged (content not matching the name).
    pub filestore_corrupt: Gauge,
}

impl Metrics {
    /// Registers every metric under the `pitr_` prefix.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "pitr_backup_last_success_timestamp_seconds",
            "End time of the newest committed backup",
            self.backup_last_success.clone(),
        );
        r.register(
            "pitr_backup_last_failure_timestamp_seconds",
            "When the last backup run failed (0: none since start)",
            self.backup_last_failure.clone(),
        );
        r.register(
            "pitr_backup_last_duration_seconds",
            "Duration of the newest committed backup",
            self.backup_last_duration.clone(),
        );
        r.register(
            "pitr_backup_last_size_bytes",
            "Stored size of the newest committed backup",
            self.backup_last_size.clone(),
        );
        r.register(
            "pitr_backups",
            "Committed backups in the repository",
            self.backups.clone(),
        );
        r.register(
            "pitr_backup_runs",
            "Backup runs by outcome",
            self.backup_runs.clone(),
        );
        r.register(
            "pitr_schedule_missed_runs",
            "Scheduled runs skipped because the previous run was still going",
            self.missed_runs.clone(),
        );
        r.register(
            "pitr_archive_last_archived_timestamp_seconds",
            "When PostgreSQL last archived a WAL file (pg_stat_archiver)",
            self.archive_last_archived.clone(),
        );
        r.register(
            "pitr_archive_failures",
            "archive_command failures (pg_stat_archiver.failed_count increases)",
            self.archive_failures.clone(),
        );
        r.register(
            "pitr_archive_ready_segments",
            "WAL files waiting to be archived (.ready)",
            self.archive_ready.clone(),
        );
        r.register(
            "pitr_archive_lag_seconds",
            "Age of the oldest WAL file waiting to be archived",
            self.archive_lag.clone(),
        );
        r.register(
            "pitr_restorable_window_start_timestamp_seconds",
            "Earliest restorable time (end of the oldest backup)",
            self.window_start.clone(),
        );
        r.register(
            "pitr_restorable_window_end_timestamp_seconds",
            "Latest restorable time (newest archived WAL)",
            self.window_end.clone(),
        );
        r.register(
            "pitr_repository_bytes",
            "Bytes stored in the repository (backups and WAL)",
            self.repository_bytes.clone(),
        );
        r.register(
            "pitr_verify_last_success_timestamp_seconds",
            "When verify last ran to completion",
            self.verify_last_success.clone(),
        );
        r.register(
            "pitr_verify_findings",
            "Findings of the last verify, by severity",
            self.verify_findings.clone(),
        );
        r.register(
            "pitr_prune_deleted",
            "Objects deleted by prune, by kind",
            self.prune_deleted.clone(),
        );
        self.register_rehearsal(r);
    }

    /// Registers the rehearsal metrics.
    fn register_rehearsal(&self, r: &mut Registry) {
        r.register(
            "pitr_rehearsal_last_success_timestamp_seconds",
            "When the newest successful restore rehearsal finished (0: none)",
            self.rehearsal_last_success.clone(),
        );
        r.register(
            "pitr_rehearsal_last_failure_timestamp_seconds",
            "When the newest restore rehearsal finished, if it failed (0: it did not)",
            self.rehearsal_last_failure.clone(),
        );
        r.register(
            "pitr_rehearsal_duration_seconds",
            "The newest restore rehearsal's phases: restore (download and extract), replay, checks",
            self.rehearsal_duration.clone(),
        );
        r.register(
            "pitr_rehearsal_restore_seconds",
            "The newest restore rehearsal's restore plus replay: the measured time to restore",
            self.rehearsal_restore.clone(),
        );
        r.register(
            "pitr_rehearsal_restored_point_timestamp_seconds",
            "The newest point a rehearsal proved restorable (its last replayed commit)",
            self.rehearsal_restored_point.clone(),
        );
        r.register(
            "pitr_rehearsal_failures",
            "Failed restore rehearsals recorded in the repository, by reason",
            self.rehearsal_failures.clone(),
        );
        r.register(
            "pitr_rto_objective_seconds",
            "The restore time objective, PITR_RTO_OBJECTIVE (0: none set)",
            self.rto_objective.clone(),
        );
    }

    /// Copies what the repository says about rehearsals into the gauges.
    pub fn update_from_rehearsals(
        &self,
        r: &crate::rehearse::Rehearsals,
        objective: Option<std::time::Duration>,
    ) {
        self.rto_objective
            .set(objective.map_or(0.0, |o| o.as_secs_f64()));
        let finished = |rec: &crate::rehearse::RehearsalRecord| {
            humantime::parse_rfc3339_weak(&rec.finished_at)
                .map(epoch)
                .unwrap_or(0.0)
        };
        if let Some(ok) = &r.newest_ok {
            self.rehearsal_last_success.set(finished(ok));
        }
        // The proven point comes from `latest` rehearsals only: a random
        // target proves an earlier point and must not move it back.
        if let Some(point) = r
            .newest_ok_latest
            .as_ref()
            .and_then(|ok| ok.restored_point_unix)
        {
            self.rehearsal_restored_point.set(point);
        }
        if let Some(newest) = &r.newest {
            self.rehearsal_last_failure
                .set(if newest.ok { 0.0 } else { finished(newest) });
            for (phase, secs) in [
                ("restore", newest.phases.restore),
                ("replay", newest.phases.replay),
                ("checks", newest.phases.checks),
            ] {
                self.rehearsal_duration
                    .get_or_create(&Phase { phase })
                    .set(secs);
            }
            if newest.restore_seconds > 0.0 {
                self.rehearsal_restore.set(newest.restore_seconds);
            }
        }
        for reason in crate::rehearse::FailureReason::ALL {
            let label = reason.as_str();
            let count = r
                .failures
                .iter()
                .find(|(name, _)| name == label)
                .map_or(0, |(_, n)| *n);
            let counter = self
                .rehearsal_failures
                .get_or_create(&Reason { reason: label });
            let seen = counter.get();
            if count > seen {
                counter.inc_by(count - seen);
            }
        }
    }

    /// Registers the filestore sync's metrics (only with a filestore path).
    pub fn register_filestore(&self, r: &mut Registry) {
        r.register(
            "pitr_filestore_files_synced",
            "Filestore files uploaded since the daemon started",
            self.filestore_files.clone(),
        );
        r.register(
            "pitr_filestore_bytes_synced",
            "Bytes (on the volume) of the filestore files uploaded since the daemon started",
            self.filestore_bytes.clone(),
        );
        r.register(
            "pitr_filestore_last_sync_timestamp_seconds",
            "When the newest filestore sync completed (every file it saw durable)",
            self.filestore_last_sync.clone(),
        );
        r.register(
            "pitr_filestore_corrupt_files",
            "Files the newest filestore sync found whose content does not hash to their name",
            self.filestore_corrupt.clone(),
        );
    }

    /// Registers the stream's metrics (only when streaming is on, so that
    /// a daemon without a stream does not export a permanent "down").
    pub fn register_stream(&self, r: &mut Registry) {
        r.register(
            "pitr_stream_up",
            "1 while the WAL stream is connected and streaming",
            self.stream_up.clone(),
        );
        r.register(
            "pitr_stream_lag_bytes",
            "The server's end of WAL minus the end of what the stream stored",
            self.stream_lag.clone(),
        );
        r.register(
            "pitr_stream_last_stored_timestamp_seconds",
            "When the stream last stored WAL in the repository",
            self.stream_last_stored.clone(),
        );
        r.register(
            "pitr_slot_retained_bytes",
            "WAL the stream's replication slot keeps on the server",
            self.slot_retained.clone(),
        );
        r.register(
            "pitr_slot_invalidations",
            "Times the stream found its replication slot invalidated since the daemon started",
            self.slot_invalidations.clone(),
        );
    }

    /// Copies the stream's state into its gauges.
    pub fn update_from_stream(&self, s: &crate::stream::StreamStatus) {
        self.stream_up.set(i64::from(s.up));
        self.stream_lag
            .set(i64::try_from(s.lag_bytes()).unwrap_or(i64::MAX));
        if let Some(t) = s.last_stored_unix {
            self.stream_last_stored.set(t);
        }
        self.slot_invalidations
            .set(i64::try_from(s.slot_invalidations).unwrap_or(i64::MAX));
    }

    /// Creates every labelled series at zero, so that dashboards and alerts
    /// see them before the first event (no series is not the same as 0).
    pub fn create_label_sets(&self) {
        for outcome in ["ok", "err", "cancelled"] {
            let _ = self.backup_runs.get_or_create(&Outcome { outcome });
        }
        for job in ["backup", "verify", "prune"] {
            let _ = self.missed_runs.get_or_create(&Job { job });
        }
        for severity in ["error", "warning"] {
            let _ = self
                .verify_findings
                .get_or_create(&SeverityLabel { severity });
        }
        for kind in ["backups", "wal", "debris"] {
            let _ = self.prune_deleted.get_or_create(&Kind { kind });
        }
        for phase in ["restore", "replay", "checks"] {
            let _ = self.rehearsal_duration.get_or_create(&Phase { phase });
        }
        for reason in crate::rehearse::FailureReason::ALL {
            let _ = self.rehearsal_failures.get_or_create(&Reason {
                reason: reason.as_str(),
            });
        }
    }

    /// Updates the repository figures from a fresh catalog.
    pub fn update_from_catalog(&self, catalog: &Catalog) {
        self.backups
            .set(i64::try_from(catalog.backups.len()).unwrap_or(i64::MAX));
        if let Some(newest) = catalog.backups.iter().max_by_key(|b| b.stop_time) {
            self.backup_last_success.set(epoch(newest.stop_time));
            self.backup_last_duration
                .set(newest.duration().as_secs_f64());
            self.backup_last_size
                .set(i64::try_from(newest.stored_bytes).unwrap_or(i64::MAX));
        }
        if let Some(w) = catalog.restorable_window() {
            self.window_start.set(epoch(w.start));
            self.window_end.set(epoch(w.end));
        }
        let bytes: u64 = catalog.wal.iter().map(|w| w.meta.size).sum::<u64>()
            + catalog.backups.iter().map(|b| b.stored_bytes).sum::<u64>();
        self.repository_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// Seconds since the Unix epoch.
#[must_use]
pub fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// The `/status` document.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// Backups and the restorable window, as `list --json` shows them.
    pub repository: Option<serde_json::Value>,
    /// `pg_stat_archiver.last_archived_wal`.
    pub last_archived_wal: Option<String>,
    /// Seconds the oldest `.ready` file has waited.
    pub archive_lag_seconds: f64,
    /// `.ready` files.
    pub ready_segments: u64,
    /// The last verify: errors and warnings, and when.
    pub last_verify: Option<serde_json::Value>,
    /// The WAL stream, when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<crate::stream::StreamStatus>,
    /// "last proven restorable: <time>, restore took <duration>", from the
    /// newest successful rehearsal.
    pub proven: Option<String>,
    /// The last backup run's error, if it failed.
    pub last_backup_error: Option<String>,
    /// When the figures were refreshed.
    pub refreshed_at: Option<String>,
}

impl Status {
    /// Fills the repository part from a catalog.
    pub fn set_catalog(&mut self, catalog: &Catalog, now: SystemTime) {
        self.repository = serde_json::to_value(report::listing(catalog, now)).ok();
        self.proven = catalog.rehearsals.newest_ok.as_ref().map(|r| {
            format!(
                "last proven restorable: {}, restore took {}",
                r.restored_point
                    .as_deref()
                    .unwrap_or("(no transaction replayed)"),
                humantime::format_duration(std::time::Duration::from_secs(
                    r.restore_seconds.round() as u64
                ))
            )
        });
    }
}
