//! Storage conformance: one body, run against every backend.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::StreamExt as _;
use pitr_agent::storage::{ObjectKey, PutMode, RepoUrl, S3Options, Storage, StorageError};
use pitr_tests::faultproxy::{Fault, FaultProxy};
use pitr_tests::s3::{S3Kind, S3Server};
use std::sync::atomic::Ordering;
use tokio::io::{AsyncRead, ReadBuf};

fn key(s: &str) -> ObjectKey {
    ObjectKey::new(s).expect("valid key")
}

/// Pseudo-random, incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A reader that fails after `ok_bytes`.
struct FailingReader {
    data: Vec<u8>,
    pos: usize,
    ok_bytes: usize,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos >= self.ok_bytes {
            return Poll::Ready(Err(io::Error::other("source vanished")));
        }
        let n = buf
            .remaining()
            .min(self.ok_bytes - self.pos)
            .min(self.data.len() - self.pos);
        let pos = self.pos;
        buf.put_slice(&self.data[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

async fn conformance(storage: Storage) {
    // A file:// write never creates the repository directory; init does.
    storage.create_root().await.expect("create the root");
    let a = key("wal/000000010000000000000001.gz");
    let nested = key("backups/20261121T020000Z/base.tar.gz");

    // Missing objects.
    assert!(storage.head(&a).await.expect("head").is_none());
    assert!(matches!(
        storage.get(&a).await,
        Err(StorageError::NotFound(_))
    ));
    storage
        .delete(&a)
        .await
        .expect("deleting a missing object succeeds");

    // Create-only write, then a second create-only write is refused.
    storage
        .put(&a, Bytes::from_static(b"first"), PutMode::CreateOnly)
        .await
        .expect("create");
    let again = storage
        .put(&a, Bytes::from_static(b"second"), PutMode::CreateOnly)
        .await;
    match again {
        Err(StorageError::AlreadyExists(_)) => {}
        // Stores that ignore If-None-Match: the caller's head-before-put covers them,
        // but the object must then hold one of the two complete bodies.
        Ok(()) => eprintln!("note: this store ignores If-None-Match"),
        Err(e) => panic!("unexpected error on create-only rewrite: {e}"),
    }
    let body = storage.get(&a).await.expect("get");
    assert!(body == "first" || body == "second", "torn object: {body:?}");
    storage
        .put(&a, Bytes::from_static(b"replaced"), PutMode::Overwrite)
        .await
        .expect("overwrite");
    assert_eq!(storage.get(&a).await.expect("get"), "replaced");
    assert_eq!(storage.get_prefix(&a, 3).await.expect("prefix"), "rep");
    assert_eq!(
        storage.head(&a).await.expect("head").map(|m| m.size),
        Some(8)
    );

    // Streaming: small (single request) and large (multipart, 3 parts).
    let small = noise(1000, 1);
    let size = storage
        .put_stream(&nested, Box::new(io::Cursor::new(small.clone())))
        .await
        .expect("small stream");
    assert_eq!(size, 1000);
    assert_eq!(storage.get(&nested).await.expect("get"), small);
    let big_key = key("backups/20261121T020000Z/big.tar.gz");
    let big = noise(pitr_agent::storage::S3_PART_SIZE * 2 + 12345, 2);
    let size = storage
        .put_stream(&big_key, Box::new(io::Cursor::new(big.clone())))
        .await
        .expect("multipart stream");
    assert_eq!(size, big.len() as u64);
    assert!(
        storage.get(&big_key).await.expect("get") == big,
        "multipart content differs"
    );

    // A stream that fails midway leaves nothing behind.
    let failed_key = key("backups/20261121T020000Z/failed.tar.gz");
    let reader = FailingReader {
        data: big.clone(),
        pos: 0,
        ok_bytes: pitr_agent::storage::S3_PART_SIZE + 100,
    };
    assert!(
        storage
            .put_stream(&failed_key, Box::new(reader))
            .await
            .is_err()
    );
    assert!(
        storage.head(&failed_key).await.expect("head").is_none(),
        "failed upload is visible"
    );

    // Listing: sorted, prefix-filtered, no temp files.
    let b = key("wal/000000010000000000000002.gz");
    storage
        .put(&b, Bytes::from_static(b"b"), PutMode::CreateOnly)
        .await
        .expect("put");
    let wal: Vec<String> = storage
        .list("wal/")
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.key.to_string())
        .collect();
    assert_eq!(wal, [a.to_string(), b.to_string()]);
    let narrow = storage
        .list("wal/0000000100000000000000")
        .await
        .expect("list");
    assert_eq!(narrow.len(), 2);
    let backups = storage.list("backups/").await.expect("list");
    assert_eq!(backups.len(), 2, "{backups:?}");
    let all = storage.list("").await.expect("list");
    assert_eq!(all.len(), 4, "{all:?}");

    storage.delete(&a).await.expect("delete");
    assert!(storage.head(&a).await.expect("head").is_none());
    assert_eq!(storage.list("wal/").await.expect("list").len(), 1);
}

#[tokio::test]
async fn local_fs_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = RepoUrl::parse(&format!("file://{}/repo", dir.path().display())).expect("url");
    let storage = Storage::open(&url, &S3Options::default())
        .await
        .expect("open");
    conformance(storage).await;
    // No temp files are left anywhere.
    let root = dir.path().join("repo").display().to_string();
    let leftovers: Vec<_> = walk(&dir.path().join("repo"))
        .into_iter()
        .filter(|p| p[root.len()..].contains("/."))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
}

/// Issue 12: the conformance body through the `Unreliable` wrapper: 15 %
/// of attempts fail before reaching the store, 10 % of writes fail after
/// the store applied them, 5 % are slow; the client retries 8 times, as
/// the S3 SDK does. Every retried create-only write meets its own object.
#[tokio::test]
async fn local_fs_conforms_through_the_unreliable_wrapper() {
    use pitr_agent::storage::LocalFs;
    use pitr_agent::storage::unreliable::{FaultPlan, Unreliable};
    let dir = tempfile::tempdir().expect("temp dir");
    let plan =
        FaultPlan::parse("seed=20261201,before=0.15,after=0.1,slow=0.05,delay-ms=2,attempts=8")
            .expect("plan");
    let inner = LocalFs::open(dir.path().join("repo")).await.expect("open");
    let store = std::sync::Arc::new(Unreliable::new(inner, plan));
    conformance(Storage::Unreliable(std::sync::Arc::clone(&store))).await;
    assert!(
        store.injected() >= 10,
        "only {} faults injected; the test proves nothing",
        store.injected()
    );
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

async fn s3_storage(server: &S3Server) -> Storage {
    s3_storage_at(server, &server.endpoint, None, &fresh_prefix()).await
}

fn fresh_prefix() -> String {
    format!("conformance-{:08x}", rand::random::<u32>())
}

/// An S3 store on `server`'s bucket, reached through `endpoint` (the server
/// or a fault proxy in front of it), under a fresh prefix.
async fn s3_storage_at(
    server: &S3Server,
    endpoint: &str,
    attempts: Option<u32>,
    prefix: &str,
) -> Storage {
    let url = RepoUrl::parse(&server.url(prefix)).expect("url");
    // SAFETY of env: the SDK reads credentials from the environment; every test
    // uses the same fixed test credentials, so concurrent tests agree.
    let options = S3Options {
        endpoint: Some(endpoint.to_owned()),
        region: Some("us-east-1".into()),
        force_path_style: true,
        max_attempts: attempts,
        ..S3Options::default()
    };
    Storage::open(&url, &options).await.expect("open")
}

/// Issue 12: the same conformance body with 15 % of requests faulted
/// between the client and the store: 503 before the store sees it, 500
/// after it applied a write, and connections dropped before and after.
/// The client's retries then meet their own applied writes, which
/// create-only puts and multipart completion must accept as success.
async fn conforms_through_faults(kind: S3Kind) {
    set_test_credentials();
    let Some(server) = super::s3_server(kind) else {
        return;
    };
    let proxy = FaultProxy::start(
        &server.endpoint,
        0x0f1a_4e57,
        0.15,
        &[
            Fault::Unavailable,
            Fault::FailedAfterWrite,
            Fault::DropBefore,
            Fault::DropAfter,
        ],
    );
    // 15 % faults, 8 attempts: a request fails for good once in 4 million.
    conformance(s3_storage_at(&server, &proxy.endpoint(), Some(8), &fresh_prefix()).await).await;
    let faulted = proxy.counts.faulted.load(Ordering::Relaxed);
    let requests = proxy.counts.requests.load(Ordering::Relaxed);
    assert!(
        faulted >= 5,
        "the proxy faulted {faulted} of {requests} requests; the test proves nothing"
    );
}

#[tokio::test]
async fn moto_conforms_through_faults() {
    conforms_through_faults(S3Kind::Moto).await;
}

#[tokio::test]
async fn s3s_fs_conforms_through_faults() {
    conforms_through_faults(S3Kind::S3sFs).await;
}

/// Issue 12: listings past one page (S3 returns at most 1000 keys per
/// request): 3000 WAL objects and unfinished multipart uploads past 1000,
/// on both S3 servers and the file store.
async fn lists_past_one_page(storage: Storage, multipart: Option<(&S3Server, &str)>) {
    storage.create_root().await.expect("create the root");
    let keys: Vec<ObjectKey> = (0..3000u64)
        .map(|i| {
            key(&format!(
                "wal/{:024X}.gz",
                0x0000_0001_0000_0000_0000_0000u128 + u128::from(i)
            ))
        })
        .collect();
    futures::stream::iter(keys.iter().cloned())
        .map(|k| {
            let storage = storage.clone();
            async move {
                storage
                    .put(&k, Bytes::from_static(b"x"), PutMode::CreateOnly)
                    .await
                    .expect("put");
            }
        })
        .buffer_unordered(32)
        .collect::<()>()
        .await;
    let listed: Vec<ObjectKey> = storage
        .list("wal/")
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.key)
        .collect();
    assert_eq!(listed.len(), 3000, "every key listed");
    assert_eq!(listed, keys, "sorted, none twice");

    if let Some((server, prefix)) = multipart {
        // 1100 uploads that were never completed (a SIGKILLed backup's parts).
        let client = server.client().await;
        let probe = client
            .list_multipart_uploads()
            .bucket(server.bucket.as_str())
            .send()
            .await;
        if let Err(e) = probe {
            eprintln!(
                "{}: no ListMultipartUploads ({}); the multipart part is skipped here",
                server.endpoint,
                aws_sdk_s3::error::DisplayErrorContext(&e)
            );
            return;
        }
        for i in 0..1100 {
            client
                .create_multipart_upload()
                .bucket(server.bucket.as_str())
                .key(format!("{prefix}/backups/20261121T020000Z/part-{i:04}"))
                .send()
                .await
                .expect("create multipart upload");
        }
        storage
            .delete_prefix("backups/20261121T020000Z/")
            .await
            .expect("delete the incomplete backup");
        let left = client
            .list_multipart_uploads()
            .bucket(server.bucket.as_str())
            .prefix(format!("{prefix}/backups/"))
            .send()
            .await
            .expect("list uploads");
        assert!(
            left.uploads().is_empty(),
            "{} unfinished uploads left after delete_prefix",
            left.uploads().len()
        );
    }
}

#[tokio::test]
async fn local_fs_lists_past_one_page() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = RepoUrl::parse(&format!("file://{}/repo", dir.path().display())).expect("url");
    let storage = Storage::open(&url, &S3Options::default())
        .await
        .expect("open");
    lists_past_one_page(storage, None).await;
}

async fn s3_lists_past_one_page(kind: S3Kind) {
    set_test_credentials();
    let Some(server) = super::s3_server(kind) else {
        return;
    };
    let prefix = fresh_prefix();
    let storage = s3_storage_at(&server, &server.endpoint, None, &prefix).await;
    lists_past_one_page(storage, Some((&server, &prefix))).await;
}

#[tokio::test]
async fn moto_lists_past_one_page() {
    s3_lists_past_one_page(S3Kind::Moto).await;
}

#[tokio::test]
async fn s3s_fs_lists_past_one_page() {
    s3_lists_past_one_page(S3Kind::S3sFs).await;
}

#[tokio::test]
async fn moto_conforms() {
    set_test_credentials();
    let Some(server) = super::s3_server(S3Kind::Moto) else {
        return;
    };
    conformance(s3_storage(&server).await).await;
}

#[tokio::test]
async fn s3s_fs_conforms() {
    set_test_credentials();
    let Some(server) = super::s3_server(S3Kind::S3sFs) else {
        return;
    };
    conformance(s3_storage(&server).await).await;
}

/// Every S3 server fixture accepts the same credentials.
#[allow(unsafe_code)]
fn set_test_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let server_env = [
            ("AWS_ACCESS_KEY_ID", "pitrtestkey"),
            ("AWS_SECRET_ACCESS_KEY", "pitrtestsecret0123456789"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ];
        for (k, v) in server_env {
            // SAFETY: set once, before any S3 client exists in this process.
            unsafe { std::env::set_var(k, v) };
        }
    });
}
