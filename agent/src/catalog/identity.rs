//! Which PostgreSQL cluster owns a repository.
//!
//! The first push records the cluster's system identifier in
//! `pitr-repository.json` (create-only). Every later push compares it, so a
//! reused bucket or a copied configuration can never mix two clusters' WAL.
//! A restored cluster keeps its system identifier and may keep archiving.

use std::path::Path;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::OWNER_KEY;
use crate::storage::{ObjectKey, PutMode, Storage, StorageError};

/// The repository format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The contents of `pitr-repository.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RepositoryOwner {
    /// Repository format version.
    pub format: u32,
    /// The owner's system identifier, as a decimal string (it exceeds 2^53).
    pub system_identifier: String,
    /// When the repository was first written, RFC 3339.
    pub created_at: String,
    /// The tool and version that created it.
    pub created_by: String,
}

/// Why a repository cannot be used by this cluster.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// Another cluster owns it.
    #[error(
        "repository {url} belongs to the PostgreSQL cluster with system identifier {owner}, \
         but this cluster's is {ours}; refusing to mix their WAL: point PITR_REPO at a fresh \
         location (for example a new prefix), or move the old cluster's archive away first"
    )]
    OtherCluster {
        /// The repository.
        url: String,
        /// Its owner.
        owner: String,
        /// This cluster.
        ours: u64,
    },
    /// The owner record is not ours to read.
    #[error(
        "{location} is not a pitr-agent repository record ({detail}); \
         point PITR_REPO at a location used only by pitr-agent"
    )]
    Unreadable {
        /// Where.
        location: String,
        /// What is wrong.
        detail: String,
    },
    /// Nothing at the URL is a pitr-agent repository.
    #[error(
        "no pitr-agent repository at {url} ({OWNER_KEY} is missing): check PITR_REPO / --repo \
         (and, for file://, that the volume is mounted); a repository is created by the first \
         `pitr-agent wal-push` or `pitr-agent backup` of its cluster"
    )]
    NoRepository {
        /// The URL.
        url: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Reads the owner record of the repository at `url`. Read-only commands
/// (`list`, `verify`, `wal-fetch`, `pgrestore`) call this first, so that a
/// wrong URL or an unmounted volume is named instead of looking empty.
///
/// # Errors
/// [`OwnerError::NoRepository`] when there is no record; storage failures.
pub async fn read_repository(storage: &Storage, url: &str) -> Result<RepositoryOwner, OwnerError> {
    let key = ObjectKey::new(OWNER_KEY).expect("constant key");
    read_owner(storage, &key)
        .await?
        .ok_or_else(|| OwnerError::NoRepository {
            url: url.to_owned(),
        })
}

/// Makes sure `storage` belongs to the cluster `system_identifier`, recording it
/// if the repository is new. A positive answer is cached in `cache_file`.
///
/// # Errors
/// [`OwnerError::OtherCluster`] if another cluster owns the repository.
pub async fn ensure_owner(
    storage: &Storage,
    repo_url: &str,
    system_identifier: u64,
    cache_file: &Path,
) -> Result<(), OwnerError> {
    let cached = format!("{repo_url}\n{system_identifier}\n");
    if std::fs::read_to_string(cache_file).is_ok_and(|c| c == cached) {
        return Ok(());
    }
    let key = ObjectKey::new(OWNER_KEY).expect("constant key");
    let owner = match read_owner(storage, &key).await? {
        Some(owner) => owner,
        None => {
            let record = RepositoryOwner {
                format: FORMAT_VERSION,
                system_identifier: system_identifier.to_string(),
                created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
                created_by: concat!("pitr-agent ", env!("CARGO_PKG_VERSION")).to_owned(),
            };
            let body = serde_json::to_vec_pretty(&record).expect("serializable");
            match storage
                .put(&key, Bytes::from(body), PutMode::CreateOnly)
                .await
            {
                Ok(()) => record,
                Err(StorageError::AlreadyExists(_)) => read_owner(storage, &key)
                    .await?
                    .ok_or_else(|| StorageError::NotFound(storage.location(&key)))?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    if owner.system_identifier != system_identifier.to_string() {
        return Err(OwnerError::OtherCluster {
            url: repo_url.to_owned(),
            owner: owner.system_identifier,
            ours: system_identifier,
        });
    }
    // The cache only saves a round trip; failing to write it is harmless.
    if let Some(dir) = cache_file.parent() {
        let _ = std::fs::create_dir_all(dir);
        let tmp = cache_file.with_extension("tmp");
        if std::fs::write(&tmp, cached).is_ok() {
            let _ = std::fs::rename(&tmp, cache_file);
        }
    }
    Ok(())
}

async fn read_owner(
    storage: &Storage,
    key: &ObjectKey,
) -> Result<Option<RepositoryOwner>, OwnerError> {
    match storage.get(key).await {
        Ok(body) => {
            let owner: RepositoryOwner =
                serde_json::from_slice(&body).map_err(|e| OwnerError::Unreadable {
                    location: storage.location(key),
                    detail: e.to_string(),
                })?;
            if owner.format > FORMAT_VERSION {
                return Err(OwnerError::Unreadable {
                    location: storage.location(key),
                    detail: format!(
                        "format {} is newer than this pitr-agent understands ({FORMAT_VERSION}); upgrade pitr-agent",
                        owner.format
                    ),
                });
            }
            Ok(Some(owner))
        }
        Err(StorageError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
