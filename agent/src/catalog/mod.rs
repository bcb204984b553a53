//! The repository layout: the one module that builds repository keys, and the
//! record of which PostgreSQL cluster owns a repository.
//!
//! Layout (see docs/repository.md):
//! - `pitr-repository.json`: format version and the owner's system identifier
//!   (written by `pitr-agent init`);
//! - `pitr-owner.json`: the owner, when `init` ran before the cluster existed;
//! - `wal/<walfile>.gz`: every archived WAL file, plain gzip;
//! - `wal-summary/<walfile>[.rp][.damaged].json`: what each segment holds
//!   (see [`crate::wal::summary`]); the name says whether it has restore
//!   points or damage, so that a listing alone finds those;
//! - `wal-partial/<segment>/<start>-<end>.gz`: streamed pieces of the segment
//!   being written (see [`partial`]);
//! - `backups/<id>/`: `base.tar.gz`, `backup_manifest`, and `backup.json` last;
//! - `rehearsals/<time>.json`: what each restore rehearsal proved.
//!
//! Also the retention planner. Knows nothing about how objects are stored or
//! how WAL and backups are produced.

pub mod backup;
mod identity;
pub mod partial;
pub mod rehearsals;
pub mod retention;

pub use identity::{
    Encryption, InitOutcome, ObjectLock, OwnerError, RepositoryOwner, add_recipient, ensure_owner,
    init_repository, read_repository, set_object_lock,
};

use crate::storage::ObjectKey;
use crate::wal::WalFileName;
use crate::wal::summary::SegmentSummary;

/// The key prefix that holds WAL.
pub const WAL_PREFIX: &str = "wal/";

/// The key prefix that holds WAL summaries.
pub const SUMMARY_PREFIX: &str = "wal-summary/";

/// A stored summary, as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryEntry {
    /// The WAL file it summarizes.
    pub name: WalFileName,
    /// Whether the segment has restore points.
    pub restore_points: bool,
    /// Whether the segment has unreadable records.
    pub damaged: bool,
    /// The object.
    pub key: ObjectKey,
}

/// The key of `summary`.
#[must_use]
pub fn summary_key(summary: &SegmentSummary) -> ObjectKey {
    let mut key = format!("{SUMMARY_PREFIX}{}", summary.segment);
    if !summary.restore_points.is_empty() {
        key.push_str(".rp");
    }
    if summary.damage.is_some() {
        key.push_str(".damaged");
    }
    key.push_str(".json");
    ObjectKey::new(key).expect("WAL file names are valid keys")
}

/// The summary a listed object is, if it is one.
#[must_use]
pub fn summary_entry(key: &ObjectKey) -> Option<SummaryEntry> {
    let mut rest = key
        .as_str()
        .strip_prefix(SUMMARY_PREFIX)?
        .strip_suffix(".json")?;
    let damaged = rest.ends_with(".damaged");
    rest = rest.strip_suffix(".damaged").unwrap_or(rest);
    let restore_points = rest.ends_with(".rp");
    rest = rest.strip_suffix(".rp").unwrap_or(rest);
    Some(SummaryEntry {
        name: rest.parse().ok()?,
        restore_points,
        damaged,
        key: key.clone(),
    })
}

/// The key of the repository record; a repository exists once it does.
pub const OWNER_KEY: &str = "pitr-repository.json";

/// The prefix of the rehearsals' records (`pitr-agent rehearse`).
pub const REHEARSALS_PREFIX: &str = "rehearsals/";

/// The key of the record of the rehearsal that started at `id`, with its
/// outcome (`ok` or the failure reason) in the name, so that a listing alone
/// counts successes and failures.
#[must_use]
pub fn rehearsal_key(id: &str, outcome: &str) -> ObjectKey {
    ObjectKey::new(format!("{REHEARSALS_PREFIX}{id}.{outcome}.json"))
        .expect("rehearsal ids and outcomes are valid keys")
}

/// `(id, outcome)` of a rehearsal record's key.
#[must_use]
pub fn rehearsal_of(key: &ObjectKey) -> Option<(&str, &str)> {
    let name = key
        .as_str()
        .strip_prefix(REHEARSALS_PREFIX)?
        .strip_suffix(".json")?;
    name.split_once('.')
}

/// Whether the object at `key` holds data (rows, WAL, files) and is
/// therefore encrypted in an encrypted repository: WAL, streamed pieces, base
/// backups and their manifests, filestore files. The rest is metadata that
/// every side reads in clear: the repository record and claim, `backup.json`,
/// `started.json`, `databases.json` (names, OIDs, sizes), timeline history
/// files, WAL summaries
/// (LSNs, times, restore point names), filestore indexes (content hashes
/// and database names), rehearsal records.
#[must_use]
pub fn is_data_key(key: &str) -> bool {
    // Timeline history files hold switch points and reasons only, and the
    // timeline graph (prune, list, the daemon's status) needs no identity.
    (key.starts_with(WAL_PREFIX) && !key.ends_with(".history.gz"))
        || key.starts_with(partial::PARTIAL_PREFIX)
        || key.starts_with(crate::filestore::PREFIX)
        || (key.starts_with(backup::BACKUPS_PREFIX)
            && (key.ends_with(&format!("/{}", backup::DATA_FILE))
                || key.ends_with(&format!("/{}", backup::MANIFEST_FILE))))
}

/// The key of the claim the first cluster writes when `init` named no owner.
pub const CLAIM_KEY: &str = "pitr-owner.json";

/// The key under which a WAL file is stored.
#[must_use]
pub fn wal_key(name: &WalFileName) -> ObjectKey {
    ObjectKey::new(format!("{WAL_PREFIX}{name}.gz")).expect("WAL file names are valid keys")
}

/// The WAL file a key holds, if it is a WAL object.
#[must_use]
pub fn wal_name_of(key: &ObjectKey) -> Option<WalFileName> {
    key.as_str()
        .strip_prefix(WAL_PREFIX)?
        .strip_suffix(".gz")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_keys_round_trip() {
        for name in [
            "000000010000000000000001",
            "00000002.history",
            "000000020000000000000003.partial",
        ] {
            let name: WalFileName = name.parse().expect("valid");
            let key = wal_key(&name);
            assert_eq!(key.as_str(), format!("wal/{name}.gz"));
            assert_eq!(wal_name_of(&key), Some(name));
        }
        assert_eq!(wal_name_of(&ObjectKey::new("wal/x.gz").expect("key")), None);
        assert_eq!(wal_name_of(&ObjectKey::new(OWNER_KEY).expect("key")), None);
    }

    #[test]
    fn summary_keys_carry_their_flags() {
        for (name, rp, damaged, key) in [
            (
                "000000010000000000000003",
                false,
                false,
                "wal-summary/000000010000000000000003.json",
            ),
            (
                "000000010000000000000003",
                true,
                false,
                "wal-summary/000000010000000000000003.rp.json",
            ),
            (
                "000000020000000000000004.partial",
                true,
                true,
                "wal-summary/000000020000000000000004.partial.rp.damaged.json",
            ),
        ] {
            let key = ObjectKey::new(key).expect("key");
            let entry = summary_entry(&key).expect("a summary");
            assert_eq!(entry.name.as_str(), name);
            assert_eq!((entry.restore_points, entry.damaged), (rp, damaged));
        }
        assert_eq!(
            summary_entry(&ObjectKey::new("wal-summary/x.json").expect("key")),
            None
        );
        assert_eq!(
            summary_entry(&ObjectKey::new("wal/000000010000000000000003.gz").expect("key")),
            None
        );
    }

    #[test]
    fn rehearsal_keys_carry_the_outcome() {
        let key = rehearsal_key("20261201T040000Z", "user-check");
        assert_eq!(key.as_str(), "rehearsals/20261201T040000Z.user-check.json");
        assert_eq!(rehearsal_of(&key), Some(("20261201T040000Z", "user-check")));
        assert_eq!(
            rehearsal_of(&ObjectKey::new("rehearsals/x.json").expect("key")),
            None
        );
    }
}
