//! Plain gzip, with the SHA-256 of the uncompressed content in the header comment.
//!
//! The comment (`pitr-sha256=<hex>`) lets `wal-push` compare a duplicate by
//! reading only the first bytes of the stored object, and lets `wal-fetch`
//! check what it decompressed end to end. `gunzip` ignores the comment, so any
//! object is still restorable by hand. Knows nothing about storage.

use std::io::{self, Read, Write};

use flate2::{Compression, GzBuilder};
use sha2::{Digest, Sha256};

/// The prefix of the gzip header comment that carries the checksum.
const SHA_COMMENT: &str = "pitr-sha256=";

/// How many leading bytes of an object always hold its gzip header.
pub const HEADER_PROBE_LEN: u64 = 512;

/// The default compression level; see `make bench` and docs/repository.md.
pub const DEFAULT_LEVEL: u32 = 6;

/// A SHA-256 digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// Hashes `data`.
    #[must_use]
    pub fn of(data: &[u8]) -> Self {
        Sha256Digest(Sha256::digest(data).into())
    }

    /// Lowercase hex.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses lowercase or uppercase hex.
    #[must_use]
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).ok()?;
        Some(Sha256Digest(out))
    }
}

impl std::fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::str::FromStr for Sha256Digest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::from_hex(s).ok_or_else(|| format!("{s:?} is not a SHA-256 in hex"))
    }
}

serde_as_text!(Sha256Digest);

/// Compresses `raw` into one gzip member named `name`, recording `digest`, on
/// one thread. See [`gzip_parallel`] for the multi-threaded form.
///
/// The output is deterministic (mtime 0), so identical input gives identical objects.
#[must_use]
pub fn gzip_with_digest(raw: &[u8], name: &str, digest: Sha256Digest, level: u32) -> Vec<u8> {
    let out = Vec::with_capacity(raw.len() / 4 + 1024);
    let mut encoder = GzBuilder::new()
        .filename(name.as_bytes())
        .comment(format!("{SHA_COMMENT}{}", digest.to_hex()).into_bytes())
        .mtime(0)
        .write(out, Compression::new(level.min(9)));
    encoder
        .write_all(raw)
        .and_then(|()| encoder.finish())
        .expect("writing into a Vec cannot fail")
}

/// Input per independently compressed chunk in [`gzip_parallel`].
pub const CHUNK: usize = 1 << 20;
/// The deflate window: each chunk is primed with this much preceding input.
const WINDOW: usize = 32 * 1024;

/// Compresses `raw` into one standard gzip member on up to `threads` threads,
/// the way pigz does: 1 MiB chunks, each primed with the 32 KiB before it,
/// sync-flushed and concatenated. The bytes do not depend on `threads`, and
/// any gunzip reads the result; the ratio is within a fraction of a percent
/// of a single-threaded stream.
#[must_use]
pub fn gzip_parallel(
    raw: &[u8],
    name: &str,
    digest: Sha256Digest,
    level: u32,
    threads: usize,
) -> Vec<u8> {
    let chunks: Vec<&[u8]> = raw.chunks(CHUNK).collect();
    // One chunk: the chunked form would be the plain stream anyway.
    if chunks.len() <= 1 {
        return gzip_with_digest(raw, name, digest, level);
    }
    let compress_chunk = |index: usize| -> Vec<u8> {
        let start = index * CHUNK;
        let dictionary = &raw[start.saturating_sub(WINDOW)..start];
        deflate_chunk(chunks[index], dictionary, index + 1 == chunks.len(), level)
    };
    let threads = threads.clamp(1, chunks.len());
    let mut parts: Vec<Vec<u8>> = vec![Vec::new(); chunks.len()];
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let compress_chunk = &compress_chunk;
                let count = chunks.len();
                scope.spawn(move || {
                    (t..count)
                        .step_by(threads)
                        .map(|i| (i, compress_chunk(i)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            for (i, part) in handle.join().expect("a compression thread panicked") {
                parts[i] = part;
            }
        }
    });
    let comment = format!("{SHA_COMMENT}{}", digest.to_hex());
    let mut out = gzip_header(name, Some(&comment));
    out.reserve(parts.iter().map(Vec::len).sum::<usize>() + 8);
    for part in &parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&gzip_trailer(crc32fast::hash(raw), raw.len() as u64));
    out
}

/// An RFC 1952 member header: deflate, FNAME (and FCOMMENT), mtime 0, OS unix.
#[must_use]
pub fn gzip_header(name: &str, comment: Option<&str>) -> Vec<u8> {
    const FNAME: u8 = 0x08;
    const FCOMMENT: u8 = 0x10;
    let flags = FNAME | if comment.is_some() { FCOMMENT } else { 0 };
    let mut out = vec![0x1f, 0x8b, 8, flags, 0, 0, 0, 0, 0, 3];
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    if let Some(comment) = comment {
        out.extend_from_slice(comment.as_bytes());
        out.push(0);
    }
    out
}

/// The member trailer: CRC-32 and length (mod 2^32) of the uncompressed data.
#[must_use]
pub fn gzip_trailer(crc: u32, len: u64) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&crc.to_le_bytes());
    // ISIZE is the length modulo 2^32 (RFC 1952, section 2.3.1).
    out[4..].copy_from_slice(&((len & 0xFFFF_FFFF) as u32).to_le_bytes());
    out
}

/// The deflate blocks that end a stream whose chunks were all sync-flushed:
/// one empty final block.
#[must_use]
pub fn deflate_finish() -> Vec<u8> {
    deflate_chunk(&[], &[], true, 1)
}

/// Compresses one chunk as raw deflate, primed with `dictionary` (the up to
/// 32 KiB of input that precede it). Unless `last`, the output ends with a
/// sync flush, so chunks compressed independently concatenate into one valid
/// stream, the way pigz builds it.
#[must_use]
pub fn deflate_chunk(input: &[u8], dictionary: &[u8], last: bool, level: u32) -> Vec<u8> {
    let mut c = flate2::Compress::new(Compression::new(level.min(9)), false);
    let dictionary = &dictionary[dictionary.len().saturating_sub(WINDOW)..];
    if !dictionary.is_empty() {
        c.set_dictionary(dictionary)
            .expect("a fresh raw deflate stream accepts a dictionary");
    }
    let mut out = Vec::with_capacity(input.len() / 2 + 1024);
    let flush = if last {
        flate2::FlushCompress::Finish
    } else {
        flate2::FlushCompress::Sync
    };
    loop {
        let consumed = usize::try_from(c.total_in()).expect("chunk fits in memory");
        if out.capacity() - out.len() < 1024 {
            out.reserve(input.len() / 4 + 1024);
        }
        let status = c
            .compress_vec(&input[consumed..], &mut out, flush)
            .expect("deflate on memory cannot fail");
        let done = c.total_in() as usize == input.len();
        match status {
            flate2::Status::StreamEnd => break,
            // A sync flush is complete once all input is in and output space remained.
            _ if done && !last && out.capacity() > out.len() => break,
            _ => {}
        }
    }
    out
}

/// Why compressed data cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum GzipError {
    /// Not a gzip stream, truncated, or failing its CRC.
    #[error("corrupt gzip data: {0}")]
    Corrupt(io::Error),
    /// Decompressed fine but does not match the checksum in its header.
    #[error("checksum mismatch: header says sha256 {expected}, content has {actual}")]
    DigestMismatch {
        /// From the header.
        expected: Sha256Digest,
        /// Of the decompressed content.
        actual: Sha256Digest,
    },
    /// The output could not be written.
    #[error("writing the decompressed data: {0}")]
    Write(io::Error),
}

/// Decompresses `gz` into `out`, checking the gzip CRC and, when the header has
/// one, the SHA-256. Returns the digest of what was written and its length.
///
/// # Errors
/// [`GzipError`] for corrupt input, a digest mismatch or a failed write.
pub fn gunzip_verified(gz: &[u8], mut out: impl Write) -> Result<(Sha256Digest, u64), GzipError> {
    let expected = header_digest(gz);
    let mut decoder = flate2::read::MultiGzDecoder::new(gz);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(GzipError::Corrupt(e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(GzipError::Write)?;
        total += n as u64;
    }
    if total == 0 && gz.len() < 18 {
        return Err(GzipError::Corrupt(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "empty or truncated gzip stream",
        )));
    }
    let actual = Sha256Digest(hasher.finalize().into());
    match expected {
        Some(expected) if expected != actual => Err(GzipError::DigestMismatch { expected, actual }),
        _ => Ok((actual, total)),
    }
}

/// The SHA-256 recorded in a gzip header comment, if the header has one.
///
/// Parses the header by hand (RFC 1952, section 2.3) so it works on the first
/// few hundred bytes of an object without touching the compressed body.
#[must_use]
pub fn header_digest(gz: &[u8]) -> Option<Sha256Digest> {
    const FEXTRA: u8 = 0x04;
    const FNAME: u8 = 0x08;
    const FCOMMENT: u8 = 0x10;
    if gz.len() < 10 || gz[0] != 0x1f || gz[1] != 0x8b || gz[2] != 8 {
        return None;
    }
    let flags = gz[3];
    let mut pos = 10;
    if flags & FEXTRA != 0 {
        let len = usize::from(u16::from_le_bytes([*gz.get(pos)?, *gz.get(pos + 1)?]));
        pos += 2 + len;
    }
    let zero_terminated = |pos: &mut usize| -> Option<&[u8]> {
        let rest = gz.get(*pos..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        *pos += end + 1;
        Some(&rest[..end])
    };
    if flags & FNAME != 0 {
        zero_terminated(&mut pos)?;
    }
    if flags & FCOMMENT == 0 {
        return None;
    }
    let comment = std::str::from_utf8(zero_terminated(&mut pos)?).ok()?;
    Sha256Digest::from_hex(comment.strip_prefix(SHA_COMMENT)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trips_and_records_the_digest() {
        let raw = sample();
        let digest = Sha256Digest::of(&raw);
        let gz = gzip_with_digest(&raw, "000000010000000000000001", digest, DEFAULT_LEVEL);
        assert!(gz.len() < raw.len() / 4);
        assert_eq!(
            header_digest(&gz[..HEADER_PROBE_LEN as usize]),
            Some(digest)
        );
        let mut out = Vec::new();
        let (got, len) = gunzip_verified(&gz, &mut out).expect("valid gzip");
        assert_eq!((got, len), (digest, raw.len() as u64));
        assert_eq!(out, raw);
    }

    #[test]
    fn parallel_output_is_one_standard_member_independent_of_threads() {
        // 3.5 chunks, so the last chunk is short and dictionaries are used.
        let raw: Vec<u8> = sample().into_iter().cycle().take(CHUNK * 7 / 2).collect();
        let digest = Sha256Digest::of(&raw);
        let single = gzip_with_digest(&raw, "seg", digest, 6);
        let two = gzip_parallel(&raw, "seg", digest, 6, 2);
        assert_eq!(
            two,
            gzip_parallel(&raw, "seg", digest, 6, 3),
            "bytes depend on threads"
        );
        assert_eq!(
            two,
            gzip_parallel(&raw, "seg", digest, 6, 1),
            "bytes depend on threads"
        );
        assert_eq!(header_digest(&two), Some(digest));
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&two[..])
            .read_to_end(&mut out)
            .expect("single-member gunzip");
        assert_eq!(out, raw);
        assert!(
            two.len() as f64 <= single.len() as f64 * 1.01 + 64.0,
            "{} vs {}",
            two.len(),
            single.len()
        );
        let mut verified = Vec::new();
        gunzip_verified(&two, &mut verified).expect("verified");
        assert_eq!(verified, raw);
        // Small inputs fall back to one thread.
        assert_eq!(
            gzip_parallel(b"tiny", "t", Sha256Digest::of(b"tiny"), 6, 4),
            gzip_with_digest(b"tiny", "t", Sha256Digest::of(b"tiny"), 6)
        );
    }

    #[test]
    fn identical_input_gives_identical_bytes() {
        let raw = sample();
        let d = Sha256Digest::of(&raw);
        assert_eq!(
            gzip_with_digest(&raw, "a", d, 6),
            gzip_with_digest(&raw, "a", d, 6)
        );
    }

    #[test]
    fn plain_gzip_has_no_digest_but_decompresses() {
        let raw = sample();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(&raw).expect("vec write");
        let gz = enc.finish().expect("vec write");
        assert_eq!(header_digest(&gz), None);
        let mut out = Vec::new();
        gunzip_verified(&gz, &mut out).expect("plain gzip");
        assert_eq!(out, raw);
    }

    #[test]
    fn detects_corruption() {
        let raw = sample();
        let d = Sha256Digest::of(&raw);
        let gz = gzip_with_digest(&raw, "a", d, 6);
        let mut flipped = gz.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(gunzip_verified(&flipped, io::sink()).is_err());
        assert!(gunzip_verified(&gz[..gz.len() - 9], io::sink()).is_err());
        assert!(gunzip_verified(b"", io::sink()).is_err());
        assert!(gunzip_verified(b"not gzip at all", io::sink()).is_err());
    }

    #[test]
    fn detects_a_digest_that_does_not_match() {
        let raw = sample();
        let wrong = Sha256Digest::of(b"something else");
        let gz = gzip_with_digest(&raw, "a", wrong, 6);
        assert!(matches!(
            gunzip_verified(&gz, io::sink()),
            Err(GzipError::DigestMismatch { .. })
        ));
    }
}
