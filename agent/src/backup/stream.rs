//! The streaming path of a backup: tar bytes in, one gzip member out, on
//! every core, with memory bounded by a few chunks whatever the size.
//!
//! Each 1 MiB chunk is deflated on a blocking thread, primed with the 32 KiB
//! before it and sync-flushed ([`crate::compress::deflate_chunk`]); chunks are
//! emitted in order, so the output is a standard `.tar.gz` that `tar xzf`
//! reads. Knows nothing about PostgreSQL or storage.

use std::collections::VecDeque;
use std::io;

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::compress::{
    CHUNK, Sha256Digest, deflate_chunk, deflate_finish, gzip_header, gzip_trailer,
};

/// The last 32 KiB of input, the deflate window for the next chunk.
const WINDOW: usize = 32 * 1024;

/// What went through the compressor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStats {
    /// Uncompressed bytes.
    pub raw_bytes: u64,
    /// Compressed bytes emitted.
    pub stored_bytes: u64,
    /// SHA-256 of the compressed bytes, hex.
    pub stored_sha256: Sha256Digest,
}

/// Compresses what `input` yields into `out`, calling `observe` on every raw
/// chunk first (to parse the tar on the fly). `threads` chunks are in flight
/// at once. `out` receives the gzip member piece by piece; the trailer is
/// sent only after `finish` approves, so a failed source never yields a
/// complete-looking archive.
///
/// # Errors
/// A read error, an error from `observe` or `finish`, or a closed `out`.
pub async fn compress_stream<R, E>(
    mut input: R,
    name: &str,
    level: u32,
    threads: usize,
    out: mpsc::Sender<io::Result<Bytes>>,
    mut observe: impl FnMut(&[u8]) -> Result<(), E>,
    finish: impl AsyncFnOnce() -> Result<(), E>,
) -> Result<StreamStats, E>
where
    R: AsyncRead + Unpin,
    E: From<io::Error>,
{
    let mut sink = Sink {
        out,
        hasher: Sha256::new(),
        bytes: 0,
    };
    sink.send(Bytes::from(gzip_header(name, None))).await?;
    let mut crc = crc32fast::Hasher::new();
    let mut raw_bytes = 0u64;
    let mut window: Bytes = Bytes::new();
    let mut inflight: VecDeque<JoinHandle<Vec<u8>>> = VecDeque::new();
    let threads = threads.max(1);
    loop {
        let chunk = read_chunk(&mut input).await?;
        if chunk.is_empty() {
            break;
        }
        observe(&chunk)?;
        crc.update(&chunk);
        raw_bytes += chunk.len() as u64;
        let dictionary = window.clone();
        window = chunk.slice(chunk.len().saturating_sub(WINDOW)..);
        inflight.push_back(tokio::task::spawn_blocking(move || {
            deflate_chunk(&chunk, &dictionary, false, level)
        }));
        while inflight.len() > threads {
            let part = inflight.pop_front().expect("non-empty");
            sink.send(Bytes::from(join(part).await?)).await?;
        }
    }
    while let Some(part) = inflight.pop_front() {
        sink.send(Bytes::from(join(part).await?)).await?;
    }
    finish().await?;
    let mut tail = deflate_finish();
    tail.extend_from_slice(&gzip_trailer(crc.finalize(), raw_bytes));
    sink.send(Bytes::from(tail)).await?;
    Ok(StreamStats {
        raw_bytes,
        stored_bytes: sink.bytes,
        stored_sha256: Sha256Digest(sink.hasher.finalize().into()),
    })
}

struct Sink {
    out: mpsc::Sender<io::Result<Bytes>>,
    hasher: Sha256,
    bytes: u64,
}

impl Sink {
    async fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.hasher.update(&data);
        self.bytes += data.len() as u64;
        self.out
            .send(Ok(data))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped reading"))
    }
}

async fn join(handle: JoinHandle<Vec<u8>>) -> io::Result<Vec<u8>> {
    handle
        .await
        .map_err(|e| io::Error::other(format!("a compression thread failed: {e}")))
}

/// Reads up to one full chunk; short only at the end of the input.
async fn read_chunk<R: AsyncRead + Unpin>(input: &mut R) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(CHUNK);
    while buf.len() < CHUNK {
        if input.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

/// An `AsyncRead` over what [`compress_stream`] sends, for `Storage::put_stream`.
#[must_use]
pub fn channel_reader(
    rx: mpsc::Receiver<io::Result<Bytes>>,
) -> impl AsyncRead + Send + Unpin + 'static {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    tokio_util::io::StreamReader::new(Box::pin(stream))
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    async fn compress(raw: Vec<u8>, threads: usize) -> (Vec<u8>, StreamStats) {
        let (tx, rx) = mpsc::channel(2);
        let reader = tokio::spawn(async move {
            let mut out = Vec::new();
            channel_reader(rx)
                .read_to_end(&mut out)
                .await
                .expect("read");
            out
        });
        let mut seen = 0usize;
        let stats = compress_stream(
            &raw[..],
            "base.tar",
            6,
            threads,
            tx,
            |chunk| {
                seen += chunk.len();
                Ok::<(), io::Error>(())
            },
            async || Ok(()),
        )
        .await
        .expect("compress");
        assert_eq!(seen, raw.len());
        (reader.await.expect("reader"), stats)
    }

    #[tokio::test]
    async fn output_is_one_gzip_member_whatever_the_size() {
        for size in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12_345] {
            let raw: Vec<u8> = (0..size).map(|i| ((i / 7) % 253) as u8).collect();
            let (gz, stats) = compress(raw.clone(), 2).await;
            assert_eq!(stats.raw_bytes, size as u64);
            assert_eq!(stats.stored_bytes, gz.len() as u64);
            assert_eq!(stats.stored_sha256, Sha256Digest::of(&gz));
            // GzDecoder (not Multi) proves there is exactly one member.
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&gz[..])
                .read_to_end(&mut back)
                .expect("valid gzip");
            assert!(back == raw, "size {size} round-trips");
            let (gz1, _) = compress(raw, 1).await;
            assert!(gz1 == gz, "size {size}: output independent of threads");
        }
    }

    #[tokio::test]
    async fn a_failing_finish_withholds_the_trailer() {
        let (tx, rx) = mpsc::channel(64);
        let result = compress_stream(
            &b"data"[..],
            "x",
            6,
            1,
            tx,
            |_| Ok::<(), io::Error>(()),
            async || Err(io::Error::other("pg_basebackup failed")),
        )
        .await;
        assert!(result.is_err());
        let mut out = Vec::new();
        let _ = channel_reader(rx).read_to_end(&mut out).await;
        let mut back = Vec::new();
        assert!(
            flate2::read::GzDecoder::new(&out[..])
                .read_to_end(&mut back)
                .is_err(),
            "a stream without its trailer must not decompress cleanly"
        );
    }
}
