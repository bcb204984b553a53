//! PostgreSQL's own records of a base backup: `backup_manifest` (JSON, one
//! checksum per file, the WAL range) and `backup_label`.
//!
//! See <https://www.postgresql.org/docs/current/backup-manifest-format.html>.
//! Knows nothing about repositories.

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::wal::{Lsn, TimelineId};

/// A parsed `backup_manifest`.
#[derive(Debug, Clone)]
pub struct PgManifest {
    /// Files by path, relative to the data directory.
    pub files: HashMap<String, ManifestFile>,
    /// The WAL needed to make the backup consistent, oldest first.
    pub wal_ranges: Vec<WalRange>,
}

/// One file the manifest lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    /// Size in bytes.
    pub size: u64,
    /// The checksum, if the backup was taken with one.
    pub checksum: Option<FileChecksum>,
}

/// A file checksum and its algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChecksum {
    /// The algorithm.
    pub algorithm: ChecksumAlgorithm,
    /// The expected value, lowercase hex, as PostgreSQL writes it.
    pub hex: String,
}

/// The per-file checksum algorithms `pg_basebackup --manifest-checksums` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumAlgorithm {
    /// CRC-32C, the default.
    Crc32c,
    /// SHA-224.
    Sha224,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

/// A range of WAL on one timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalRange {
    /// The timeline.
    pub timeline: TimelineId,
    /// Where the range starts.
    pub start: Lsn,
    /// Where it ends.
    pub end: Lsn,
}

/// Why a manifest cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not the JSON PostgreSQL writes.
    #[error("backup_manifest is not valid: {0}")]
    Invalid(String),
    /// The manifest's own checksum does not match its contents.
    #[error(
        "backup_manifest is corrupt: its Manifest-Checksum is {expected}, its contents hash to {actual}"
    )]
    ChecksumMismatch {
        /// Recorded.
        expected: String,
        /// Computed.
        actual: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawManifest {
    files: Vec<RawFile>,
    #[serde(rename = "WAL-Ranges")]
    wal_ranges: Vec<RawRange>,
    #[serde(rename = "Manifest-Checksum")]
    manifest_checksum: String,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "Path")]
    path: Option<String>,
    #[serde(rename = "Encoded-Path")]
    encoded_path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

#[derive(Deserialize)]
struct RawRange {
    #[serde(rename = "Timeline")]
    timeline: u32,
    #[serde(rename = "Start-LSN")]
    start: String,
    #[serde(rename = "End-LSN")]
    end: String,
}

impl PgManifest {
    /// Parses a manifest and checks its `Manifest-Checksum`.
    ///
    /// # Errors
    /// [`ManifestError`] if it is not a valid, intact manifest.
    pub fn parse(text: &[u8]) -> Result<Self, ManifestError> {
        let raw: RawManifest =
            serde_json::from_slice(text).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        // The checksum covers everything before the line that carries it.
        let marker = b"\"Manifest-Checksum\"";
        let covered = text
            .windows(marker.len())
            .rposition(|w| w == marker)
            .ok_or_else(|| ManifestError::Invalid("no Manifest-Checksum".into()))?;
        let actual = hex::encode(Sha256::digest(&text[..covered]));
        if !actual.eq_ignore_ascii_case(&raw.manifest_checksum) {
            return Err(ManifestError::ChecksumMismatch {
                expected: raw.manifest_checksum,
                actual,
            });
        }
        let mut files = HashMap::with_capacity(raw.files.len());
        for f in raw.files {
            let path = match (f.path, f.encoded_path) {
                (Some(p), _) => p,
                (None, Some(hex_path)) => {
                    let bytes = hex::decode(&hex_path).map_err(|_| {
                        ManifestError::Invalid(format!("bad Encoded-Path {hex_path}"))
                    })?;
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                (None, None) => return Err(ManifestError::Invalid("a file without a path".into())),
            };
            let checksum = match (f.algorithm.as_deref(), f.checksum) {
                (None | Some("NONE"), _) | (_, None) => None,
                (Some(alg), Some(hex)) => Some(FileChecksum {
                    algorithm: ChecksumAlgorithm::parse(alg).ok_or_else(|| {
                        ManifestError::Invalid(format!("unknown checksum algorithm {alg}"))
                    })?,
                    hex: hex.to_ascii_lowercase(),
                }),
            };
            files.insert(
                path,
                ManifestFile {
                    size: f.size,
                    checksum,
                },
            );
        }
        let mut wal_ranges = Vec::with_capacity(raw.wal_ranges.len());
        for r in raw.wal_ranges {
            let parse = |s: &str| {
                s.parse::<Lsn>()
                    .map_err(|e| ManifestError::Invalid(e.to_string()))
            };
            wal_ranges.push(WalRange {
                timeline: TimelineId(r.timeline),
                start: parse(&r.start)?,
                end: parse(&r.end)?,
            });
        }
        if wal_ranges.is_empty() {
            return Err(ManifestError::Invalid("no WAL-Ranges".into()));
        }
        wal_ranges.sort_by_key(|r| r.start);
        Ok(PgManifest { files, wal_ranges })
    }

    /// Where the backup's WAL starts, and on which timeline.
    #[must_use]
    pub fn start(&self) -> (TimelineId, Lsn) {
        let first = self.wal_ranges.first().expect("checked in parse");
        (first.timeline, first.start)
    }

    /// Where the backup becomes consistent, and on which timeline.
    #[must_use]
    pub fn stop(&self) -> (TimelineId, Lsn) {
        let last = self.wal_ranges.last().expect("checked in parse");
        (last.timeline, last.end)
    }
}

impl ChecksumAlgorithm {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "CRC32C" => Self::Crc32c,
            "SHA224" => Self::Sha224,
            "SHA256" => Self::Sha256,
            "SHA384" => Self::Sha384,
            "SHA512" => Self::Sha512,
            _ => return None,
        })
    }
}

/// Computes a file's checksum incrementally, as PostgreSQL does.
pub enum FileHasher {
    /// CRC-32C.
    Crc32c(u32),
    /// SHA-224.
    Sha224(sha2::Sha224),
    /// SHA-256.
    Sha256(Sha256),
    /// SHA-384.
    Sha384(sha2::Sha384),
    /// SHA-512.
    Sha512(sha2::Sha512),
}

impl std::fmt::Debug for FileHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileHasher")
    }
}

impl FileHasher {
    /// A hasher for `algorithm`.
    #[must_use]
    pub fn new(algorithm: ChecksumAlgorithm) -> Self {
        match algorithm {
            ChecksumAlgorithm::Crc32c => Self::Crc32c(0),
            ChecksumAlgorithm::Sha224 => Self::Sha224(sha2::Sha224::new()),
            ChecksumAlgorithm::Sha256 => Self::Sha256(Sha256::new()),
            ChecksumAlgorithm::Sha384 => Self::Sha384(sha2::Sha384::new()),
            ChecksumAlgorithm::Sha512 => Self::Sha512(sha2::Sha512::new()),
        }
    }

    /// Adds data.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Crc32c(crc) => *crc = crc32c::crc32c_append(*crc, data),
            Self::Sha224(h) => h.update(data),
            Self::Sha256(h) => h.update(data),
            Self::Sha384(h) => h.update(data),
            Self::Sha512(h) => h.update(data),
        }
    }

    /// The checksum in the manifest's notation.
    #[must_use]
    pub fn finish_hex(self) -> String {
        match self {
            // PostgreSQL hex-encodes the CRC's bytes in memory order, which is
            // little-endian on every platform it ships binaries for.
            Self::Crc32c(crc) => hex::encode(crc.to_le_bytes()),
            Self::Sha224(h) => hex::encode(h.finalize()),
            Self::Sha256(h) => hex::encode(h.finalize()),
            Self::Sha384(h) => hex::encode(h.finalize()),
            Self::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

/// The fields of `backup_label` that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupLabel {
    /// `START WAL LOCATION`.
    pub start_lsn: Lsn,
    /// `CHECKPOINT LOCATION`.
    pub checkpoint_lsn: Lsn,
    /// `START TIMELINE`.
    pub timeline: TimelineId,
    /// `LABEL`.
    pub label: String,
}

impl BackupLabel {
    /// Parses the text PostgreSQL writes.
    ///
    /// # Errors
    /// A required line is missing or malformed.
    pub fn parse(text: &str) -> Result<Self, String> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .ok_or_else(|| format!("backup_label has no {name} line"))
        };
        let lsn_of = |name: &str| -> Result<Lsn, String> {
            let value = field(name)?;
            value
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .parse()
                .map_err(|e| format!("backup_label {name}: {e}"))
        };
        Ok(BackupLabel {
            start_lsn: lsn_of("START WAL LOCATION")?,
            checkpoint_lsn: lsn_of("CHECKPOINT LOCATION")?,
            timeline: TimelineId(
                field("START TIMELINE")?
                    .trim()
                    .parse()
                    .map_err(|e| format!("backup_label START TIMELINE: {e}"))?,
            ),
            label: field("LABEL").unwrap_or_default().trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(body: &str) -> Vec<u8> {
        let head = format!("{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n{body}");
        let sum = hex::encode(Sha256::digest(head.as_bytes()));
        format!("{head}\"Manifest-Checksum\": \"{sum}\"}}\n").into_bytes()
    }

    const BODY: &str = "\"Files\": [\n\
        { \"Path\": \"backup_label\", \"Size\": 5, \"Last-Modified\": \"2026-11-22 06:00:00 GMT\", \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"XXXX\" },\n\
        { \"Encoded-Path\": \"626173652f31\", \"Size\": 0, \"Last-Modified\": \"2026-11-22 06:00:00 GMT\" }\n\
        ],\n\"WAL-Ranges\": [\n\
        { \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n";

    #[test]
    fn parses_a_manifest_and_checks_its_checksum() {
        let crc = {
            let mut h = FileHasher::new(ChecksumAlgorithm::Crc32c);
            h.update(b"hello");
            h.finish_hex()
        };
        let body = BODY.replace("XXXX", &crc);
        let m = PgManifest::parse(&manifest(&body)).expect("valid");
        assert_eq!(m.files.len(), 2);
        assert_eq!(m.files["base/1"].size, 0);
        assert_eq!(
            m.files["backup_label"].checksum,
            Some(FileChecksum {
                algorithm: ChecksumAlgorithm::Crc32c,
                hex: crc
            })
        );
        assert_eq!(
            m.start(),
            (TimelineId(1), "0/2000028".parse().expect("lsn"))
        );
        assert_eq!(m.stop(), (TimelineId(1), "0/2000100".parse().expect("lsn")));

        let mut tampered = manifest(&body);
        let at = tampered
            .windows(4)
            .position(|w| w == b"0/20")
            .expect("has an LSN");
        tampered[at + 2] = b'3';
        assert!(matches!(
            PgManifest::parse(&tampered),
            Err(ManifestError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // CRC-32C of "123456789" is 0xE3069283 (RFC 3720, appendix B.4).
        let mut h = FileHasher::new(ChecksumAlgorithm::Crc32c);
        h.update(b"1234");
        h.update(b"56789");
        assert_eq!(h.finish_hex(), "839206e3");
    }

    #[test]
    fn parses_backup_label() {
        let text = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                    CHECKPOINT LOCATION: 0/2000060\n\
                    BACKUP METHOD: streamed\nBACKUP FROM: primary\n\
                    START TIME: 2026-11-22 06:00:00 UTC\nLABEL: pitr-agent 20261122T060000Z\n\
                    START TIMELINE: 1\n";
        let label = BackupLabel::parse(text).expect("valid");
        assert_eq!(label.start_lsn, "0/2000028".parse().expect("lsn"));
        assert_eq!(label.timeline, TimelineId(1));
        assert_eq!(label.label, "pitr-agent 20261122T060000Z");
        assert!(BackupLabel::parse("LABEL: x\n").is_err());
    }
}
