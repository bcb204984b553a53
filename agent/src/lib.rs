//! pitr-agent: continuous WAL archiving and point-in-time recovery for PostgreSQL.
//!
//! This library is shared by the `pitr-agent` and `pgrestore` binaries. Start here:
//! - [`wal`]: LSNs, timelines, WAL file names, `.history` files;
//! - [`repository`]: the repository every command works on: its owner, `init`;
//! - [`storage`]: the repository's object store (`file://`, `s3://`);
//! - [`catalog`]: the repository layout, its owner record, backup records, retention;
//! - [`compress`]: gzip with an embedded SHA-256;
//! - [`archive`]: `wal-push` and `wal-fetch`;
//! - [`backup`]: `backup` (pg_basebackup streamed into the repository);
//! - [`verify`]: `verify` (backups and WAL continuity) and its findings;
//! - [`filestore`]: the Odoo filestore, synced and restored beside the database;
//! - [`prune`]: applying a retention plan;
//! - [`rehearse`]: restore rehearsals that prove the repository restores;
//! - [`pgconn`]: connecting to PostgreSQL, finding its client programs;
//! - [`pgdata`]: what is read from a data directory;
//! - [`report`]: tables and JSON for `list`, `verify`, `prune`;
//! - [`restore`]: `pgrestore`'s plan, extraction and recovery;
//! - [`stream`]: WAL streaming over the replication protocol (`PITR_STREAM`);
//! - [`cli`]: the flags and environment both binaries share, and their `main`;
//! - [`commands`]: each command's arguments and handler;
//! - `daemon` (feature `daemon`): schedules, HTTP, metrics for the sidecar.
#![warn(missing_docs)]

/// Serializes a type as its `Display` text and deserializes it with
/// `FromStr`, so that records carry typed values as plain JSON strings.
macro_rules! serde_as_text {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

pub mod archive;
pub mod backup;
pub mod catalog;
pub mod cli;
pub mod commands;
pub mod compress;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod filestore;
pub mod pgconn;
pub mod pgdata;
pub mod pgtls;
pub mod prune;
pub mod rehearse;
pub mod report;
pub mod repository;
pub mod restore;
pub mod storage;
pub mod stream;
pub mod verify;
pub mod wal;
