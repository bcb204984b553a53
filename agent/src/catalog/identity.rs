//! Which PostgreSQL cluster owns a repository, and how a repository comes to be.
//!
//! A repository exists once `pitr-repository.json` does: `pitr-agent init`
//! writes it (create-only, idempotent), never a push or a backup by accident,
//! so that an unmounted volume or a mistyped URL is an error instead of a
//! new, empty archive. `PITR_INIT=auto` lets the first push or backup create it.
//!
//! The owner is the cluster whose system identifier the record holds. `init`
//! often runs before the cluster exists (an init container before `initdb`);
//! then the first push or backup claims the repository by writing
//! `pitr-owner.json`, create-only. Every later push compares, so a reused
//! bucket or a copied configuration can never mix two clusters' WAL. A
//! restored cluster keeps its system identifier and may keep archiving.

use std::path::Path;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{CLAIM_KEY, OWNER_KEY};
use crate::pgdata::SystemId;
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
    /// `None` in the record when `init` ran before the cluster existed; then
    /// [`read_repository`] fills it from `pitr-owner.json` once claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_identifier: Option<SystemId>,
    /// When the repository was first written, RFC 3339.
    pub created_at: String,
    /// The tool and version that created it.
    pub created_by: String,
    /// Set when the repository's data objects are encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Set when S3 Object Lock keeps every new object (`init --object-lock`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_lock: Option<ObjectLock>,
}

/// The bucket's default retention, as `init --object-lock` set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ObjectLock {
    /// Governance or compliance.
    pub mode: crate::storage::LockMode,
    /// Days each object stays locked after it is written.
    pub days: u32,
}

/// How an encrypted repository is encrypted: public keys only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Encryption {
    /// Always `age-x25519`.
    pub scheme: String,
    /// The recipients (`age1...`) writers may encrypt to: `init
    /// --encrypt-to` and every `pitr-agent key add`. A writer takes its
    /// recipients from its own configuration, never from here (a record
    /// swapped in the bucket must not redirect new backups to another key),
    /// and is refused when they are not listed here.
    pub recipients: Vec<String>,
}

/// The scheme of [`Encryption`].
pub const ENCRYPTION_SCHEME: &str = "age-x25519";

/// The contents of `pitr-owner.json`: the first cluster to use a repository
/// that `init` created without one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct OwnerClaim {
    system_identifier: SystemId,
    claimed_at: String,
    claimed_by: String,
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
        owner: SystemId,
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
        "no repository at {url} ({OWNER_KEY} is missing): run `pitr-agent init` to create it, \
         or set PITR_REPO / --repo to the repository's URL (for file://, check that the volume \
         is mounted)"
    )]
    NoRepository {
        /// The URL.
        url: String,
    },
    /// The keys configured do not fit the repository's encryption.
    #[error("repository {url}: {detail}")]
    Encryption {
        /// The repository.
        url: String,
        /// What does not fit and what to do.
        detail: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What `init` found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitOutcome {
    /// The repository was created now.
    Created(RepositoryOwner),
    /// It existed already; nothing was written.
    Existed(RepositoryOwner),
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

const CREATED_BY: &str = concat!("pitr-agent ", env!("CARGO_PKG_VERSION"));

/// Creates the repository at `url` if it does not exist: the root (for
/// `file://`) and `pitr-repository.json`, naming `system_identifier` as the
/// owner when it is known. Idempotent: an existing repository is left as it
/// is, provided it does not belong to another cluster.
///
/// # Errors
/// [`OwnerError::OtherCluster`] when `system_identifier` is given and the
/// repository belongs to another cluster; storage failures (a missing bucket,
/// no permission to write).
pub async fn init_repository(
    storage: &Storage,
    url: &str,
    system_identifier: Option<u64>,
) -> Result<InitOutcome, OwnerError> {
    let existing = match read_repository(storage, url).await {
        Ok(owner) => Some(owner),
        Err(OwnerError::NoRepository { .. }) => None,
        Err(e) => return Err(e),
    };
    let outcome = match existing {
        Some(owner) => InitOutcome::Existed(owner),
        None => {
            storage.create_root().await?;
            let encryption = match storage.keys() {
                Some(keys) if keys.recipient_ids().is_empty() => {
                    return Err(OwnerError::Encryption {
                        url: url.to_owned(),
                        detail: "an identity alone cannot create an encrypted repository: give \
                                 `init --encrypt-to age1...` (PITR_ENCRYPT_TO) the recipient"
                            .to_owned(),
                    });
                }
                Some(keys) => Some(Encryption {
                    scheme: ENCRYPTION_SCHEME.to_owned(),
                    recipients: keys.recipient_ids(),
                }),
                None => None,
            };
            let record = RepositoryOwner {
                format: FORMAT_VERSION,
                system_identifier: system_identifier.map(SystemId),
                created_at: now_rfc3339(),
                created_by: CREATED_BY.to_owned(),
                encryption,
                object_lock: None,
            };
            let body = serde_json::to_vec_pretty(&record).expect("serializable");
            let key = ObjectKey::new(OWNER_KEY).expect("constant key");
            match storage
                .put(&key, Bytes::from(body), PutMode::CreateOnly)
                .await
            {
                Ok(()) => InitOutcome::Created(record),
                // Another init won the race: use what it wrote.
                Err(StorageError::AlreadyExists(_)) => {
                    InitOutcome::Existed(read_repository(storage, url).await?)
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    if let Some(ours) = system_identifier {
        let owner = match &outcome {
            InitOutcome::Created(o) | InitOutcome::Existed(o) => o,
        };
        match &owner.system_identifier {
            Some(theirs) if *theirs != SystemId(ours) => {
                return Err(OwnerError::OtherCluster {
                    url: url.to_owned(),
                    owner: *theirs,
                    ours,
                });
            }
            Some(_) => {}
            None => claim(storage, url, ours).await?,
        }
    }
    Ok(outcome)
}

/// Reads the owner record of the repository at `url`. Read-only commands
/// (`list`, `verify`, `wal-fetch`, `pgrestore`) call this first, so that a
/// wrong URL or an unmounted volume is named instead of looking empty.
///
/// # Errors
/// [`OwnerError::NoRepository`] when there is no record; storage failures.
pub async fn read_repository(storage: &Storage, url: &str) -> Result<RepositoryOwner, OwnerError> {
    let mut owner = existing_record(storage, url).await?;
    if owner.system_identifier.is_none() {
        owner.system_identifier = read_claim(storage).await?.map(|c| c.system_identifier);
    }
    Ok(owner)
}

/// Whether the keys configured for `storage` fit the repository: none for a
/// clear one; for an encrypted one, recipients it lists (writers) or an
/// identity (readers).
fn check_keys(owner: &RepositoryOwner, storage: &Storage, url: &str) -> Result<(), OwnerError> {
    let refuse = |detail: String| {
        Err(OwnerError::Encryption {
            url: url.to_owned(),
            detail,
        })
    };
    match (&owner.encryption, storage.keys()) {
        (None, None) => Ok(()),
        (None, Some(_)) => refuse(
            "it is not encrypted, but PITR_ENCRYPT_TO or PITR_IDENTITY_FILE is set: unset them \
             for this repository, or create an encrypted one at a new URL with `pitr-agent init \
             --encrypt-to age1...` (a repository is encrypted from its first object or not at all)"
                .to_owned(),
        ),
        (Some(e), None) => refuse(format!(
            "it is encrypted to {}: writers (wal-push, backup, the daemon) need PITR_ENCRYPT_TO \
             set to that recipient, readers (wal-fetch, pgrestore, verify, rehearse) need \
             PITR_IDENTITY_FILE pointing at its identity file",
            e.recipients.join(", ")
        )),
        (Some(e), Some(keys)) => {
            let unknown: Vec<String> = keys
                .recipient_ids()
                .into_iter()
                .filter(|r| !e.recipients.contains(r))
                .collect();
            if unknown.is_empty() {
                Ok(())
            } else {
                refuse(format!(
                    "PITR_ENCRYPT_TO names {}, which the repository does not list (it lists {}): \
                     check the value, or add the recipient with `pitr-agent key add` first",
                    unknown.join(", "),
                    e.recipients.join(", ")
                ))
            }
        }
    }
}

/// The repository record, once the configured keys are checked against it.
async fn existing_record(storage: &Storage, url: &str) -> Result<RepositoryOwner, OwnerError> {
    let key = ObjectKey::new(OWNER_KEY).expect("constant key");
    let owner = read_owner(storage, &key)
        .await?
        .ok_or_else(|| OwnerError::NoRepository {
            url: url.to_owned(),
        })?;
    check_keys(&owner, storage, url)?;
    Ok(owner)
}

/// Rewrites the repository record with what `change` did to it; `change`
/// answers whether it changed anything (nothing is written otherwise).
async fn update_record(
    storage: &Storage,
    url: &str,
    change: impl FnOnce(&mut RepositoryOwner) -> Result<bool, OwnerError>,
) -> Result<bool, OwnerError> {
    let mut owner = existing_record(storage, url).await?;
    if !change(&mut owner)? {
        return Ok(false);
    }
    let body = serde_json::to_vec_pretty(&owner).expect("serializable");
    let key = ObjectKey::new(OWNER_KEY).expect("constant key");
    storage
        .put(&key, Bytes::from(body), PutMode::Overwrite)
        .await?;
    Ok(true)
}

/// `pitr-agent key add`: lists `recipient` in the repository record, so that
/// writers may encrypt new objects to it. Returns whether it was new.
///
/// # Errors
/// The repository is not encrypted, or the record cannot be rewritten.
pub async fn add_recipient(
    storage: &Storage,
    url: &str,
    recipient: &str,
) -> Result<bool, OwnerError> {
    update_record(storage, url, |owner| {
        let Some(encryption) = owner.encryption.as_mut() else {
            return Err(OwnerError::Encryption {
                url: url.to_owned(),
                detail: "it is not encrypted, so it takes no recipients; create an encrypted \
                         repository at a new URL with `pitr-agent init --encrypt-to age1...`"
                    .to_owned(),
            });
        };
        if encryption.recipients.iter().any(|r| r == recipient) {
            return Ok(false);
        }
        encryption.recipients.push(recipient.to_owned());
        Ok(true)
    })
    .await
}

/// `init --object-lock`, once the bucket locks new objects
/// ([`Storage::set_default_retention`]): records it, so that `prune` checks
/// locks before deleting.
///
/// # Errors
/// The record cannot be rewritten.
pub async fn set_object_lock(
    storage: &Storage,
    url: &str,
    lock: ObjectLock,
) -> Result<(), OwnerError> {
    update_record(storage, url, |owner| {
        let changed = owner.object_lock.as_ref() != Some(&lock);
        owner.object_lock = Some(lock);
        Ok(changed)
    })
    .await
    .map(|_| ())
}

/// Makes sure `storage` belongs to the cluster `system_identifier`, claiming
/// it if `init` created it without an owner. Without a repository it fails
/// with [`OwnerError::NoRepository`], unless `create` (`PITR_INIT=auto`)
/// allows creating one. A positive answer is cached in `cache_file`, if given.
///
/// # Errors
/// [`OwnerError::OtherCluster`] if another cluster owns the repository;
/// [`OwnerError::NoRepository`] if there is none and `create` is false.
pub async fn ensure_owner(
    storage: &Storage,
    repo_url: &str,
    system_identifier: u64,
    cache_file: Option<&Path>,
    create: bool,
) -> Result<(), OwnerError> {
    let recipients = storage
        .keys()
        .map(|k| k.recipient_ids().join(","))
        .unwrap_or_default();
    let cached = format!(
        "{}\n{repo_url}\n{system_identifier}\n{recipients}\n",
        storage.endpoint()
    );
    if cache_file.is_some_and(|f| std::fs::read_to_string(f).is_ok_and(|c| c == cached)) {
        return Ok(());
    }
    let owner = match read_repository(storage, repo_url).await {
        Err(OwnerError::NoRepository { .. }) if create => {
            match init_repository(storage, repo_url, Some(system_identifier)).await? {
                InitOutcome::Created(owner) => {
                    tracing::info!(
                        repository = repo_url,
                        "PITR_INIT=auto: created the repository"
                    );
                    owner
                }
                InitOutcome::Existed(owner) => owner,
            }
        }
        other => other?,
    };
    let owner = match owner.system_identifier {
        Some(id) => id,
        None => {
            claim(storage, repo_url, system_identifier).await?;
            SystemId(system_identifier)
        }
    };
    if owner != SystemId(system_identifier) {
        return Err(OwnerError::OtherCluster {
            url: repo_url.to_owned(),
            owner,
            ours: system_identifier,
        });
    }
    // The cache only saves a round trip; failing to write it is harmless.
    if let Some(cache_file) = cache_file
        && let Some(dir) = cache_file.parent()
    {
        let _ = std::fs::create_dir_all(dir);
        let tmp = cache_file.with_extension("tmp");
        if std::fs::write(&tmp, cached).is_ok() {
            let _ = std::fs::rename(&tmp, cache_file);
        }
    }
    Ok(())
}

/// Claims an unowned repository for `system_identifier` (create-only); if
/// another cluster claimed it first, that is an error.
async fn claim(storage: &Storage, url: &str, system_identifier: u64) -> Result<(), OwnerError> {
    let record = OwnerClaim {
        system_identifier: SystemId(system_identifier),
        claimed_at: now_rfc3339(),
        claimed_by: CREATED_BY.to_owned(),
    };
    let body = serde_json::to_vec_pretty(&record).expect("serializable");
    let key = ObjectKey::new(CLAIM_KEY).expect("constant key");
    let owner = match storage
        .put(&key, Bytes::from(body), PutMode::CreateOnly)
        .await
    {
        Ok(()) => {
            tracing::info!(
                repository = url,
                system_identifier,
                "claimed the repository for this cluster"
            );
            return Ok(());
        }
        Err(StorageError::AlreadyExists(_)) => read_claim(storage)
            .await?
            .ok_or_else(|| StorageError::NotFound(storage.location(&key)))?,
        Err(e) => return Err(e.into()),
    };
    if owner.system_identifier == SystemId(system_identifier) {
        Ok(())
    } else {
        Err(OwnerError::OtherCluster {
            url: url.to_owned(),
            owner: owner.system_identifier,
            ours: system_identifier,
        })
    }
}

async fn read_claim(storage: &Storage) -> Result<Option<OwnerClaim>, OwnerError> {
    let key = ObjectKey::new(CLAIM_KEY).expect("constant key");
    match storage.get(&key).await {
        Ok(body) => serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| OwnerError::Unreadable {
                location: storage.location(&key),
                detail: e.to_string(),
            }),
        Err(StorageError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
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
