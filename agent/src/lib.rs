//! pitr-agent: continuous WAL archiving and point-in-time recovery for PostgreSQL.
//!
//! This library is shared by the `pitr-agent` and `pgrestore` binaries. Start here:
//! - [`wal`]: LSNs, timelines, WAL file names, `.history` files;
//! - [`storage`]: the repository's object store (`file://`, `s3://`);
//! - [`catalog`]: the repository layout and its owner record;
//! - [`compress`]: gzip with an embedded SHA-256;
//! - [`archive`]: `wal-push` and `wal-fetch`;
//! - [`pgdata`]: what is read from a data directory;
//! - [`cli`]: the flags and environment both binaries share.
#![warn(missing_docs)]

pub mod archive;
pub mod catalog;
pub mod cli;
pub mod compress;
pub mod pgdata;
pub mod storage;
pub mod wal;
