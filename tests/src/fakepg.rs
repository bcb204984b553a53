//! A data directory with just what `wal-push` reads: `global/pg_control`'s
//! system identifier, and WAL segments with a valid long page header. It lets
//! the CLI and fault tests run in milliseconds; the real-server tests cover
//! the rest.

use std::path::{Path, PathBuf};

use crate::{RunAs, user_tempdir};

/// The segment size the fake cluster uses.
pub const SEGMENT_SIZE: usize = 16 << 20;

/// A fake data directory.
pub struct FakePgData {
    /// Holds everything.
    pub dir: tempfile::TempDir,
    /// The data directory.
    pub data: PathBuf,
    /// Its system identifier.
    pub system_identifier: u64,
    user: RunAs,
}

impl FakePgData {
    /// A data directory with a random system identifier, owned by `user`.
    #[must_use]
    pub fn new(user: RunAs) -> Self {
        let dir = user_tempdir(user, "fakepg");
        let data = dir.path().join("data");
        let system_identifier = rand::random::<u64>() | 1;
        std::fs::create_dir_all(data.join("global")).expect("mkdir");
        std::fs::create_dir_all(data.join("pg_wal/archive_status")).expect("mkdir");
        let mut control = vec![0u8; 8192];
        control[..8].copy_from_slice(&system_identifier.to_le_bytes());
        std::fs::write(data.join("global/pg_control"), control).expect("write pg_control");
        user.chown_tree(dir.path());
        FakePgData {
            dir,
            data,
            system_identifier,
            user,
        }
    }

    /// Writes segment `name` with `seed`-dependent, WAL-like content and marks it `.ready`.
    pub fn add_segment(&self, name: &str, seed: u64) -> PathBuf {
        let bytes = segment_bytes(self.system_identifier, seed);
        let path = self.data.join("pg_wal").join(name);
        std::fs::write(&path, bytes).expect("write segment");
        let ready = self
            .data
            .join("pg_wal/archive_status")
            .join(format!("{name}.ready"));
        std::fs::write(ready, b"").expect("write .ready");
        self.user.chown_tree(&self.data.join("pg_wal"));
        path
    }

    /// `pg_wal/<name>` relative to the data directory, as PostgreSQL passes `%p`.
    #[must_use]
    pub fn rel(name: &str) -> String {
        format!("pg_wal/{name}")
    }

    /// The data directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.data
    }
}

/// A segment of `SEGMENT_SIZE` bytes: a long page header, then compressible
/// but seed-dependent records, then a zero tail, like a switched segment.
#[must_use]
pub fn segment_bytes(system_identifier: u64, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; SEGMENT_SIZE];
    bytes[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    bytes[2..4].copy_from_slice(&0x0002u16.to_le_bytes());
    bytes[24..32].copy_from_slice(&system_identifier.to_le_bytes());
    bytes[32..36].copy_from_slice(&(SEGMENT_SIZE as u32).to_le_bytes());
    bytes[36..40].copy_from_slice(&8192u32.to_le_bytes());
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in bytes[64..SEGMENT_SIZE * 3 / 4].chunks_mut(64) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len().min(12);
        chunk[..n].copy_from_slice(&x.to_le_bytes().repeat(2)[..n]);
    }
    bytes
}
