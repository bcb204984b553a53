//! The repository: one store at one URL, owned by one PostgreSQL cluster.
//!
//! Every command reaches the repository through [`Repository`]: it names the
//! store and the URL for messages, answers who owns it, and creates it
//! (`pitr-agent init`). The layout of keys lives in [`crate::catalog`]; how
//! objects are stored lives in [`crate::storage`].

use std::path::Path;

use crate::catalog::{self, InitOutcome, OwnerError, RepositoryOwner};
use crate::pgdata::SystemId;
use crate::storage::{ObjectKey, Storage};
use crate::wal::WalFileName;

/// The repository a command works on, with its URL for messages and markers.
#[derive(Debug, Clone)]
pub struct Repository {
    /// The store.
    pub storage: Storage,
    /// The URL as configured.
    pub url: String,
}

impl Repository {
    /// The repository record, with the owner filled in from its claim.
    /// Every command but `init` starts here, so that a wrong URL or an
    /// unmounted volume is named instead of looking like an empty archive.
    ///
    /// # Errors
    /// [`OwnerError::NoRepository`] when the URL holds no repository.
    pub async fn owner(&self) -> Result<RepositoryOwner, OwnerError> {
        catalog::read_repository(&self.storage, &self.url).await
    }

    /// `pitr-agent init`: creates the repository if it does not exist.
    ///
    /// # Errors
    /// See [`catalog::init_repository`].
    pub async fn init(&self, system_identifier: Option<u64>) -> Result<InitOutcome, OwnerError> {
        catalog::init_repository(&self.storage, &self.url, system_identifier).await
    }

    /// Before a write: makes sure the repository exists and belongs to the
    /// cluster `system_identifier`, claiming it if `init` named no owner.
    /// `auto_init` (`PITR_INIT=auto`) creates a missing repository.
    ///
    /// # Errors
    /// See [`catalog::ensure_owner`].
    pub async fn claim(
        &self,
        system_identifier: u64,
        cache_file: &Path,
        auto_init: bool,
    ) -> Result<(), OwnerError> {
        // A file:// cache is not trusted: checking the record costs a stat,
        // and the cache outlives an archive volume that is no longer mounted.
        let cache = matches!(self.storage.backend(), Storage::S3(_)).then_some(cache_file);
        catalog::ensure_owner(
            &self.storage,
            &self.url,
            system_identifier,
            cache,
            auto_init,
        )
        .await
    }

    /// The key of WAL file `name`.
    #[must_use]
    pub fn wal(&self, name: &WalFileName) -> ObjectKey {
        catalog::wal_key(name)
    }

    /// What names this repository in the spool (markers and prefetch tag):
    /// endpoint, URL and the owning cluster's system identifier. The same
    /// URL on another endpoint, or a repository replaced at the same URL, is
    /// another repository.
    #[must_use]
    pub fn identity(&self, system_identifier: Option<SystemId>) -> String {
        let owner = system_identifier.map_or_else(|| "unclaimed".to_owned(), |id| id.to_string());
        format!("{} {} {owner}", self.storage.endpoint(), self.url)
    }
}
