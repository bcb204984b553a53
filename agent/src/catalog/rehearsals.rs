//! Restore rehearsals' records (`rehearsals/<id>.<outcome>.json`): what
//! each proved, and what the repository says about them. Written by
//! `pitr-agent rehearse`, read by `list`, `/status` and the metrics.

use serde::{Deserialize, Serialize};

/// Why a rehearsal failed: a small fixed set, for the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureReason {
    /// No plan: no backup, or the window cannot be reached.
    Plan,
    /// The backup could not be downloaded or extracted (corrupt, missing).
    Restore,
    /// PostgreSQL did not reach the target (missing or corrupt WAL).
    Replay,
    /// `pg_amcheck` found corruption.
    Amcheck,
    /// A database does not accept connections.
    Connect,
    /// An operator check returned false or failed.
    UserCheck,
    /// The restore took longer than the RTO objective.
    TooSlow,
    /// An attachment's filestore file is missing from the repository.
    Filestore,
    /// The rehearsal itself could not run (scratch space, programs).
    Internal,
}

impl FailureReason {
    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plan => "plan",
            Self::Restore => "restore",
            Self::Replay => "replay",
            Self::Amcheck => "amcheck",
            Self::Connect => "connect",
            Self::UserCheck => "user-check",
            Self::TooSlow => "too-slow",
            Self::Filestore => "filestore",
            Self::Internal => "internal",
        }
    }

    /// Every reason, for creating the metric's series.
    pub const ALL: [FailureReason; 9] = [
        Self::Plan,
        Self::Restore,
        Self::Replay,
        Self::Amcheck,
        Self::Connect,
        Self::UserCheck,
        Self::TooSlow,
        Self::Filestore,
        Self::Internal,
    ];
}

/// Seconds per phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Phases {
    /// Download and extract of the base backup.
    pub restore: f64,
    /// Start, replay to the target, promotion.
    pub replay: f64,
    /// amcheck, connections, operator checks.
    pub checks: f64,
}

/// What a rehearsal found; stored as `rehearsals/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RehearsalRecord {
    /// Format version.
    pub format: u32,
    /// When it started, as `YYYYMMDDTHHMMSSZ`.
    pub id: String,
    /// Whether every check passed.
    pub ok: bool,
    /// Why not.
    pub reason: Option<FailureReason>,
    /// What went wrong, in words.
    pub error: Option<String>,
    /// The target, as planned.
    pub target: String,
    /// The backup restored.
    pub backup: Option<String>,
    /// The last replayed commit: the proven restorable point (RPO).
    pub restored_point: Option<String>,
    /// The same, as Unix seconds.
    pub restored_point_unix: Option<f64>,
    /// Where replay ended.
    pub replay_lsn: Option<String>,
    /// Seconds per phase.
    pub phases: Phases,
    /// Restore and replay: the measured time to restore (RTO).
    pub restore_seconds: f64,
    /// The databases that connected.
    pub databases: Vec<String>,
    /// The operator checks that ran, in order.
    pub user_checks: Vec<String>,
    /// Attachments whose filestore file was found in the repository, when
    /// the repository has a filestore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filestore_files: Option<u64>,
    /// When it finished, RFC 3339.
    pub finished_at: String,
}

/// What the repository says about rehearsals: from one listing and at most
/// two small reads.
#[derive(Debug, Clone, Default)]
pub struct Rehearsals {
    /// The newest record.
    pub newest: Option<RehearsalRecord>,
    /// The newest successful record.
    pub newest_ok: Option<RehearsalRecord>,
    /// The newest successful rehearsal of `latest`: the proven restorable
    /// point. A random-target rehearsal proves an earlier point and never
    /// moves it back.
    pub newest_ok_latest: Option<RehearsalRecord>,
    /// Failed rehearsals in the repository, by reason.
    pub failures: Vec<(String, u64)>,
    /// Successful rehearsals in the repository.
    pub successes: u64,
}

/// Reads [`Rehearsals`].
///
/// # Errors
/// Listing or reading fails.
pub async fn load(
    storage: &crate::storage::Storage,
) -> Result<Rehearsals, crate::storage::StorageError> {
    let mut keys: Vec<(String, String, crate::storage::ObjectKey)> = storage
        .list(super::REHEARSALS_PREFIX)
        .await?
        .into_iter()
        .filter_map(|o| {
            let (id, outcome) = super::rehearsal_of(&o.key)?;
            Some((id.to_owned(), outcome.to_owned(), o.key.clone()))
        })
        .collect();
    keys.sort();
    let mut out = Rehearsals::default();
    let mut failures: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for (_, outcome, _) in &keys {
        if outcome == "ok" {
            out.successes += 1;
        } else {
            *failures.entry(outcome.clone()).or_default() += 1;
        }
    }
    out.failures = failures.into_iter().collect();
    let read = |key: crate::storage::ObjectKey| async move {
        match storage.get(&key).await {
            Ok(body) => Ok(serde_json::from_slice::<RehearsalRecord>(&body).ok()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    };
    if let Some((_, outcome, key)) = keys.last() {
        out.newest = read(key.clone()).await?;
        if outcome == "ok" {
            out.newest_ok.clone_from(&out.newest);
        }
    }
    if out.newest_ok.is_none()
        && let Some((_, _, key)) = keys.iter().rev().find(|(_, o, _)| o == "ok")
    {
        out.newest_ok = read(key.clone()).await?;
    }
    // The newest successful `latest` rehearsal, among the newest few.
    if out.newest_ok.as_ref().is_some_and(is_latest) {
        out.newest_ok_latest.clone_from(&out.newest_ok);
    } else {
        for (_, _, key) in keys
            .iter()
            .rev()
            .filter(|(_, o, _)| o == "ok")
            .take(LATEST_LOOKBACK)
        {
            if let Some(r) = read(key.clone()).await?
                && is_latest(&r)
            {
                out.newest_ok_latest = Some(r);
                break;
            }
        }
    }
    Ok(out)
}

/// Successful records read back to find the newest `latest` one.
const LATEST_LOOKBACK: usize = 32;

/// Whether `r` rehearsed `latest` (the whole archive).
///
/// The record keeps the target as text; `RecoveryTarget::Latest` prints
/// as "… (latest)" (a test in `rehearse` holds the two together).
pub fn is_latest(r: &RehearsalRecord) -> bool {
    r.target.ends_with("(latest)")
}
