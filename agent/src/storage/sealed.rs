//! Client-side encryption of a repository's data objects with age (X25519).
//!
//! [`Sealed`] wraps a store: objects whose keys carry data (WAL, streamed
//! pieces, base backups and their manifests, filestore files; the caller
//! says which) are age files, encrypted after compression; everything else
//! (the repository record, `backup.json`, indexes, rehearsal records) passes
//! through in clear. No cryptography is done here beyond calling the `age`
//! crate.
//!
//! The writing side holds only recipients (public keys), so a compromised
//! primary can add to the repository but cannot read its history. The
//! reading side holds an identity file. Each object's age header carries one
//! extra stanza, `-> pitr sha256=<hex> [raw=<hex>] to=<recipient>...`, that
//! age identities ignore: the SHA-256 of what was stored (and of the WAL it
//! holds), so that a writer without the identity still recognises an
//! identical re-push, and the recipients, so that a wrong identity is named.
//! The header's MAC covers the stanza. The digests are of whole objects; like
//! the filestore's own names (the SHA-1 of each file), they can confirm an
//! exact guess of an object's content and reveal nothing else. `age -d -i
//! key.txt OBJECT | gunzip` reads any object by hand.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use age::x25519;
use age_core::format::{FileKey, Stanza};
use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use super::{BoxReader, ObjectKey, ObjectMeta, PutMode, Storage, StorageError};
use crate::compress::Sha256Digest;

/// The first line of every age file.
pub const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";
/// The tag of pitr-agent's own header stanza.
const TAG: &str = "pitr";
/// How many leading bytes hold an object's age header with its tag stanza
/// (an X25519 stanza is about 110 bytes).
const HEADER_PROBE_LEN: u64 = 8 * 1024;

/// Recipients to encrypt to and identities to decrypt with.
#[derive(Clone, Default)]
pub struct Keys {
    recipients: Vec<x25519::Recipient>,
    identities: Vec<x25519::Identity>,
    /// Where the identities came from, for messages.
    identity_file: Option<String>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the identities themselves.
        f.debug_struct("Keys")
            .field("recipients", &self.recipient_ids())
            .field("identities", &self.identities.len())
            .field("identity_file", &self.identity_file)
            .finish()
    }
}

/// A problem with the configured keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `PITR_ENCRYPT_TO` holds something that is not an age X25519 recipient.
    #[error(
        "PITR_ENCRYPT_TO (--encrypt-to): {0:?} is not an age X25519 recipient; give the age1... \
         line that `pitr-agent key generate` printed"
    )]
    BadRecipient(String),
    /// The identity file cannot be used.
    #[error(
        "PITR_IDENTITY_FILE {file}: {reason}; give it a file written by `pitr-agent key generate` \
         (AGE-SECRET-KEY-1... lines)"
    )]
    BadIdentity {
        /// The path.
        file: String,
        /// What is wrong (never the file's content).
        reason: String,
    },
}

/// Parses one `age1...` recipient.
///
/// # Errors
/// [`KeyError::BadRecipient`].
pub fn parse_recipient(text: &str) -> Result<x25519::Recipient, KeyError> {
    x25519::Recipient::from_str(text.trim()).map_err(|_| KeyError::BadRecipient(text.to_owned()))
}

impl Keys {
    /// Keys from `recipients` (`age1...`, separated by commas, spaces or
    /// lines) and an identity file.
    ///
    /// # Errors
    /// A recipient that does not parse; an identity file that cannot be read
    /// or holds no X25519 identity.
    pub fn new(
        recipients: &str,
        identity_file: Option<&std::path::Path>,
    ) -> Result<Self, KeyError> {
        let recipients = recipients
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|r| !r.is_empty())
            .map(parse_recipient)
            .collect::<Result<Vec<_>, _>>()?;
        let (identities, identity_file) = match identity_file {
            Some(path) => (read_identities(path)?, Some(path.display().to_string())),
            None => (Vec::new(), None),
        };
        Ok(Keys {
            recipients,
            identities,
            identity_file,
        })
    }

    /// Whether any key is configured.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.recipients.is_empty() && self.identities.is_empty()
    }

    /// The recipients as `age1...` strings, sorted.
    #[must_use]
    pub fn recipient_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.recipients.iter().map(ToString::to_string).collect();
        ids.sort();
        ids
    }

    /// Whether an identity (to read with) is configured.
    #[must_use]
    pub fn can_read(&self) -> bool {
        !self.identities.is_empty()
    }

    /// The recipients of the configured identities, as `age1...` strings.
    #[must_use]
    pub fn identity_recipients(&self) -> Vec<String> {
        self.identities
            .iter()
            .map(|i| i.to_public().to_string())
            .collect()
    }
}

/// Why an object cannot be read with the configured identities.
enum Unreadable {
    /// No identity is configured.
    NoIdentity,
    /// None of the identities is a recipient of the object.
    NoMatch,
    /// Decryption failed: damage or tampering.
    Damaged(String),
}

impl Unreadable {
    fn of(e: &age::DecryptError) -> Self {
        match e {
            age::DecryptError::NoMatchingKeys => Unreadable::NoMatch,
            other => Unreadable::Damaged(other.to_string()),
        }
    }
}

impl Keys {
    fn encryptor(&self, location: &str, tag: SealTag) -> Result<age::Encryptor, StorageError> {
        if self.recipients.is_empty() {
            return Err(StorageError::Sealed {
                location: location.to_owned(),
                detail: "the repository is encrypted and writing needs a recipient: set \
                         PITR_ENCRYPT_TO to the repository's age1... recipient"
                    .to_owned(),
            });
        }
        let tag = TagRecipient(tag);
        let recipients = std::iter::once(&tag as &dyn age::Recipient)
            .chain(self.recipients.iter().map(|r| r as &dyn age::Recipient));
        age::Encryptor::with_recipients(recipients).map_err(|e| StorageError::Sealed {
            location: location.to_owned(),
            detail: format!("cannot encrypt: {e}"),
        })
    }

    /// Encrypts `plain` (whose SHA-256 is `digest`) in one piece, tagged
    /// with its digests.
    fn seal(
        &self,
        location: &str,
        plain: &[u8],
        digest: Sha256Digest,
    ) -> Result<Vec<u8>, StorageError> {
        let tag = SealTag {
            sha256: Some(digest),
            raw: crate::compress::header_digest(plain),
            to: self.recipient_ids(),
        };
        let encryptor = self.encryptor(location, tag)?;
        let mut out = Vec::with_capacity(plain.len() + plain.len() / 4000 + 1024);
        let io = |e: io::Error| StorageError::Io {
            op: "encrypting",
            location: location.to_owned(),
            source: e,
        };
        let mut writer = encryptor.wrap_output(&mut out).map_err(io)?;
        writer.write_all(plain).map_err(io)?;
        writer.finish().map_err(io)?;
        Ok(out)
    }

    /// Decrypts a whole object.
    fn open(&self, location: &str, sealed: &[u8]) -> Result<Vec<u8>, StorageError> {
        if !self.can_read() {
            return Err(self.unreadable(location, sealed, Unreadable::NoIdentity));
        }
        let unreadable =
            |e: &age::DecryptError| self.unreadable(location, sealed, Unreadable::of(e));
        let mut reader = age::Decryptor::new_buffered(sealed)
            .and_then(|d| d.decrypt(self.identities.iter().map(|i| i as &dyn age::Identity)))
            .map_err(|e| unreadable(&e))?;
        let mut out = Vec::with_capacity(sealed.len());
        reader
            .read_to_end(&mut out)
            .map_err(|e| self.unreadable(location, sealed, Unreadable::Damaged(e.to_string())))?;
        Ok(out)
    }

    /// The error for the object at `location`, whose first bytes are `head`.
    fn unreadable(&self, location: &str, head: &[u8], why: Unreadable) -> StorageError {
        let location = location.to_owned();
        if !head.starts_with(AGE_MAGIC) {
            return StorageError::Sealed {
                location,
                detail: "the repository is encrypted but this object is not an age file: it was \
                         written by something else or altered; `pitr-agent verify` lists what \
                         is affected"
                    .to_owned(),
            };
        }
        let to = SealTag::parse(head).map(|t| t.to).unwrap_or_default();
        let to = if to.is_empty() {
            "recipients it does not name".to_owned()
        } else {
            to.join(", ")
        };
        let detail = match (&self.identity_file, why) {
            (None, _) | (_, Unreadable::NoIdentity) => format!(
                "it is encrypted to {to}, and reading it needs the identity: set \
                 PITR_IDENTITY_FILE to the age identity file of one of them"
            ),
            (Some(file), Unreadable::NoMatch) => format!(
                "it is encrypted to {to}, and no identity in {file} (for {}) is one of them: give \
                 PITR_IDENTITY_FILE the identity of one of those recipients",
                self.identity_recipients().join(", ")
            ),
            (Some(_), Unreadable::Damaged(cause)) => format!(
                "decryption failed ({cause}): the object is damaged or was altered; `pitr-agent \
                 verify` lists what is affected"
            ),
        };
        StorageError::Sealed { location, detail }
    }
}

fn read_identities(path: &std::path::Path) -> Result<Vec<x25519::Identity>, KeyError> {
    let bad = |reason: String| KeyError::BadIdentity {
        file: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut identities = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        identities.push(
            x25519::Identity::from_str(line)
                .map_err(|_| bad(format!("line {} is not an age X25519 identity", n + 1)))?,
        );
    }
    if identities.is_empty() {
        return Err(bad("it holds no identity".to_owned()));
    }
    Ok(identities)
}

/// Generates a new identity: the identity file's text and its recipient.
#[must_use]
pub fn generate_identity() -> (String, String) {
    let identity = x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let secret = {
        use age::secrecy::ExposeSecret;
        identity.to_string().expose_secret().to_owned()
    };
    let text = format!(
        "# created: {created}\n# public key: {recipient}\n# pitr-agent repository identity: \
         keep it in a Secret that only restores and rehearsals mount\n{secret}\n"
    );
    (text, recipient)
}

/// What the clear stanza of a stored object says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SealTag {
    /// SHA-256 of the stored (compressed) bytes, when written in one piece.
    pub sha256: Option<Sha256Digest>,
    /// The digest recorded in the object's gzip header (a WAL file's raw content).
    pub raw: Option<Sha256Digest>,
    /// The recipients the object was encrypted to.
    pub to: Vec<String>,
}

impl SealTag {
    fn stanza(&self) -> Stanza {
        let mut args = Vec::new();
        if let Some(d) = self.sha256 {
            args.push(format!("sha256={d}"));
        }
        if let Some(d) = self.raw {
            args.push(format!("raw={d}"));
        }
        args.extend(self.to.iter().map(|r| format!("to={r}")));
        if args.is_empty() {
            args.push("v1".to_owned());
        }
        Stanza {
            tag: TAG.to_owned(),
            args,
            body: Vec::new(),
        }
    }

    /// Reads the tag from the start of an age file; `None` if `head` is
    /// not an age file or has no pitr stanza.
    #[must_use]
    pub fn parse(head: &[u8]) -> Option<SealTag> {
        if !head.starts_with(AGE_MAGIC) {
            return None;
        }
        let text = String::from_utf8_lossy(&head[AGE_MAGIC.len()..]);
        for line in text.lines() {
            if line.starts_with("---") {
                break;
            }
            let Some(rest) = line.strip_prefix("-> ") else {
                continue;
            };
            let mut words = rest.split(' ');
            if words.next() != Some(TAG) {
                continue;
            }
            let mut tag = SealTag::default();
            for word in words {
                if let Some(v) = word.strip_prefix("sha256=") {
                    tag.sha256 = Sha256Digest::from_hex(v);
                } else if let Some(v) = word.strip_prefix("raw=") {
                    tag.raw = Sha256Digest::from_hex(v);
                } else if let Some(v) = word.strip_prefix("to=") {
                    tag.to.push(v.to_owned());
                }
            }
            return Some(tag);
        }
        None
    }
}

/// The tag stanza as an age recipient: it wraps nothing, it only rides in
/// the header (identities skip stanzas of other types).
struct TagRecipient(SealTag);

impl age::Recipient for TagRecipient {
    fn wrap_file_key(
        &self,
        _file_key: &FileKey,
    ) -> Result<(Vec<Stanza>, HashSet<String>), age::EncryptError> {
        Ok((vec![self.0.stanza()], HashSet::new()))
    }
}

/// A store whose data objects are age files.
#[derive(Debug)]
pub struct Sealed {
    inner: Storage,
    /// Shared with the blocking tasks that encrypt and decrypt.
    keys: Arc<Keys>,
    is_data: fn(&str) -> bool,
}

/// A shared byte buffer the age writer writes into and the reader drains.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("poisoned buffer"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sealed {
    /// Wraps `inner`; `is_data` says which keys are encrypted.
    #[must_use]
    pub fn new(inner: Storage, keys: Keys, is_data: fn(&str) -> bool) -> Self {
        Sealed {
            inner,
            keys: Arc::new(keys),
            is_data,
        }
    }

    /// The store underneath.
    #[must_use]
    pub fn inner(&self) -> &Storage {
        &self.inner
    }

    /// The keys.
    #[must_use]
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn sealed(&self, key: &ObjectKey) -> bool {
        (self.is_data)(key.as_str())
    }

    /// The tag of the stored object at `key`, if it is an age file with one.
    ///
    /// # Errors
    /// As the store's.
    pub async fn tag(&self, key: &ObjectKey) -> Result<Option<SealTag>, StorageError> {
        let head = Box::pin(self.inner.get_prefix(key, HEADER_PROBE_LEN)).await?;
        Ok(SealTag::parse(&head))
    }

    /// See [`Storage::put`]. A create-only write that finds an object with
    /// the same stored digest succeeds without decrypting anything.
    pub(super) async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        mode: PutMode,
    ) -> Result<(), StorageError> {
        if !self.sealed(key) {
            return Box::pin(self.inner.put(key, body, mode)).await;
        }
        let (keys, location) = (Arc::clone(&self.keys), self.inner.location(key));
        let (digest, sealed) = tokio::task::spawn_blocking(move || {
            let digest = Sha256Digest::of(&body);
            keys.seal(&location, &body, digest)
                .map(|sealed| (digest, sealed))
        })
        .await
        .map_err(|e| join_error(&self.inner.location(key), &e))??;
        match Box::pin(self.inner.put(key, Bytes::from(sealed), mode)).await {
            Err(StorageError::AlreadyExists(location)) if mode == PutMode::CreateOnly => {
                match self.tag(key).await? {
                    Some(tag) if tag.sha256 == Some(digest) => {
                        tracing::debug!(%location, "create-only write found identical content");
                        Ok(())
                    }
                    _ => Err(StorageError::AlreadyExists(location)),
                }
            }
            other => other,
        }
    }

    /// See [`Storage::put_stream`]: encrypts as it streams, and returns the
    /// size of the plaintext (what the caller sent and recorded).
    pub(super) async fn put_stream(
        &self,
        key: &ObjectKey,
        reader: BoxReader,
    ) -> Result<u64, StorageError> {
        if !self.sealed(key) {
            return Box::pin(self.inner.put_stream(key, reader)).await;
        }
        let tag = SealTag {
            to: self.keys.recipient_ids(),
            ..SealTag::default()
        };
        let out = Shared::default();
        let writer = self
            .keys
            .encryptor(&self.inner.location(key), tag)?
            .wrap_output(out.clone())
            .map_err(|e| StorageError::Io {
                op: "encrypting",
                location: self.inner.location(key),
                source: e,
            })?;
        let plain = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reader = EncryptingReader {
            inner: reader,
            writer: Some(writer),
            out,
            scratch: vec![0; 64 * 1024],
            plain: Arc::clone(&plain),
        };
        Box::pin(self.inner.put_stream(key, Box::new(reader))).await?;
        Ok(plain.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// See [`Storage::get`]: decrypts.
    pub(super) async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError> {
        let stored = Box::pin(self.inner.get(key)).await?;
        if !self.sealed(key) {
            return Ok(stored);
        }
        let (keys, location) = (Arc::clone(&self.keys), self.inner.location(key));
        tokio::task::spawn_blocking(move || keys.open(&location, &stored))
            .await
            .map_err(|e| join_error(&self.inner.location(key), &e))?
            .map(Bytes::from)
    }

    /// See [`Storage::get_prefix`]: the first `len` bytes of the plaintext.
    pub(super) async fn get_prefix(
        &self,
        key: &ObjectKey,
        len: u64,
    ) -> Result<Bytes, StorageError> {
        if !self.sealed(key) {
            return Box::pin(self.inner.get_prefix(key, len)).await;
        }
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        let location = self.inner.location(key);
        self.get_stream(key)
            .await?
            .take(len)
            .read_to_end(&mut out)
            .await
            .map_err(|e| StorageError::Sealed {
                location,
                detail: format!("decryption failed ({e}): the object is damaged or was altered"),
            })?;
        Ok(Bytes::from(out))
    }

    /// See [`Storage::get_stream`]: decrypts as it streams. A wrong or
    /// missing identity fails here, before the first byte.
    pub(super) async fn get_stream(&self, key: &ObjectKey) -> Result<BoxReader, StorageError> {
        if !self.sealed(key) {
            return Box::pin(self.inner.get_stream(key)).await;
        }
        if !self.keys.can_read() {
            let head = Box::pin(self.inner.get_prefix(key, HEADER_PROBE_LEN)).await?;
            return Err(self.keys.unreadable(
                &self.inner.location(key),
                &head,
                Unreadable::NoIdentity,
            ));
        }
        let stored = Box::pin(self.inner.get_stream(key)).await?;
        let buffered = tokio::io::BufReader::with_capacity(256 * 1024, stored).compat();
        let result = match age::Decryptor::new_async_buffered(buffered).await {
            Ok(d) => d.decrypt_async(self.keys.identities.iter().map(|i| i as &dyn age::Identity)),
            Err(e) => Err(e),
        };
        match result {
            Ok(reader) => Ok(Box::new(reader.compat())),
            Err(e) => {
                let head = Box::pin(self.inner.get_prefix(key, HEADER_PROBE_LEN)).await?;
                Err(self
                    .keys
                    .unreadable(&self.inner.location(key), &head, Unreadable::of(&e)))
            }
        }
    }

    pub(super) async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>, StorageError> {
        Box::pin(self.inner.head(key)).await
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        Box::pin(self.inner.list(prefix)).await
    }

    pub(super) async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        Box::pin(self.inner.delete_prefix(prefix)).await
    }

    pub(super) async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        Box::pin(self.inner.delete(key)).await
    }

    pub(super) fn location(&self, key: &ObjectKey) -> String {
        self.inner.location(key)
    }
}

/// A blocking encryption or decryption task that did not finish (a panic).
fn join_error(location: &str, e: &tokio::task::JoinError) -> StorageError {
    StorageError::Io {
        op: "encrypting or decrypting",
        location: location.to_owned(),
        source: io::Error::other(e.to_string()),
    }
}

/// Encrypts a plaintext reader into an age file as it is read; memory stays
/// at about one 64 KiB chunk. A read error from the plaintext is a read
/// error here, so an upload aborts instead of storing a truncated file.
struct EncryptingReader {
    inner: BoxReader,
    writer: Option<age::stream::StreamWriter<Shared>>,
    out: Shared,
    scratch: Vec<u8>,
    plain: Arc<std::sync::atomic::AtomicU64>,
}

impl AsyncRead for EncryptingReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            {
                let mut out = this
                    .out
                    .0
                    .lock()
                    .map_err(|_| io::Error::other("poisoned buffer"))?;
                if !out.is_empty() {
                    let n = out.len().min(buf.remaining());
                    buf.put_slice(&out[..n]);
                    out.drain(..n);
                    return Poll::Ready(Ok(()));
                }
            }
            let Some(writer) = this.writer.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let mut read = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    let writer = this.writer.take().expect("checked above");
                    writer.finish()?;
                }
                Poll::Ready(Ok(())) => {
                    writer.write_all(read.filled())?;
                    this.plain.fetch_add(
                        read.filled().len() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local_fs::LocalFs;

    fn keys() -> (Keys, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (text, recipient) = generate_identity();
        let file = dir.path().join("key.txt");
        std::fs::write(&file, text).expect("write");
        (Keys::new(&recipient, Some(&file)).expect("keys"), recipient)
    }

    fn all_data(_: &str) -> bool {
        true
    }

    async fn store(keys: Keys) -> (tempfile::TempDir, Sealed) {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = Storage::Local(LocalFs::open(dir.path().to_path_buf()).await.expect("open"));
        (dir, Sealed::new(inner, keys, all_data))
    }

    #[tokio::test]
    async fn objects_round_trip_and_are_age_files_with_a_clear_tag() {
        let (keys, recipient) = keys();
        let (dir, sealed) = store(keys).await;
        let key = ObjectKey::new("wal/x").expect("key");
        sealed
            .put(
                &key,
                Bytes::from_static(b"MARKER plaintext"),
                PutMode::CreateOnly,
            )
            .await
            .expect("put");
        let raw = std::fs::read(dir.path().join("wal/x")).expect("raw");
        assert!(raw.starts_with(AGE_MAGIC));
        assert!(!raw.windows(6).any(|w| w == b"MARKER"));
        let tag = SealTag::parse(&raw).expect("tag");
        assert_eq!(tag.to, vec![recipient]);
        assert_eq!(tag.sha256, Some(Sha256Digest::of(b"MARKER plaintext")));
        assert_eq!(
            &sealed.get(&key).await.expect("get")[..],
            b"MARKER plaintext"
        );
        // A retry with identical content succeeds; other content does not.
        sealed
            .put(
                &key,
                Bytes::from_static(b"MARKER plaintext"),
                PutMode::CreateOnly,
            )
            .await
            .expect("identical retry");
        assert!(matches!(
            sealed
                .put(&key, Bytes::from_static(b"other"), PutMode::CreateOnly)
                .await,
            Err(StorageError::AlreadyExists(_))
        ));
    }

    #[tokio::test]
    async fn streams_round_trip_and_a_failing_source_stores_nothing() {
        use tokio::io::AsyncReadExt;
        let (keys, _) = keys();
        let (dir, sealed) = store(keys).await;
        let key = ObjectKey::new("backups/b/base.tar.gz").expect("key");
        let plain: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let size = sealed
            .put_stream(&key, Box::new(std::io::Cursor::new(plain.clone())))
            .await
            .expect("put_stream");
        assert_eq!(size, plain.len() as u64);
        let mut back = Vec::new();
        sealed
            .get_stream(&key)
            .await
            .expect("get_stream")
            .read_to_end(&mut back)
            .await
            .expect("read");
        assert_eq!(back, plain);

        let failing =
            tokio::io::AsyncReadExt::chain(std::io::Cursor::new(vec![1u8; 100_000]), FailingReader);
        let bad = ObjectKey::new("backups/c/base.tar.gz").expect("key");
        assert!(sealed.put_stream(&bad, Box::new(failing)).await.is_err());
        assert!(!dir.path().join("backups/c/base.tar.gz").exists());
    }

    struct FailingReader;
    impl AsyncRead for FailingReader {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::other("source failed")))
        }
    }

    #[tokio::test]
    async fn a_writer_without_identity_cannot_read_and_a_wrong_identity_is_named() {
        let (keys, recipient) = keys();
        let (dir, sealed) = store(keys).await;
        let key = ObjectKey::new("wal/x").expect("key");
        sealed
            .put(&key, Bytes::from_static(b"data"), PutMode::CreateOnly)
            .await
            .expect("put");
        let inner = sealed.inner().clone();

        let push_side = Sealed::new(
            inner.clone(),
            Keys::new(&recipient, None).expect("keys"),
            all_data,
        );
        // It still recognises an identical re-push.
        push_side
            .put(&key, Bytes::from_static(b"data"), PutMode::CreateOnly)
            .await
            .expect("identical re-push without the identity");
        let e = push_side
            .get(&key)
            .await
            .expect_err("no identity")
            .to_string();
        assert!(
            e.contains("PITR_IDENTITY_FILE") && e.contains(&recipient),
            "{e}"
        );
        let e = push_side
            .get_stream(&key)
            .await
            .err()
            .expect("no identity")
            .to_string();
        assert!(e.contains("PITR_IDENTITY_FILE"), "{e}");

        let (other, other_recipient) = self::keys();
        let wrong = Sealed::new(inner, other, all_data);
        let e = wrong
            .get(&key)
            .await
            .expect_err("wrong identity")
            .to_string();
        assert!(
            e.contains(&recipient) && e.contains(&other_recipient),
            "{e}"
        );
        let e = wrong
            .get_stream(&key)
            .await
            .err()
            .expect("wrong")
            .to_string();
        assert!(e.contains(&recipient), "{e}");

        // A flipped byte in the payload is an error, not other plaintext.
        let path = dir.path().join("wal/x");
        let mut raw = std::fs::read(&path).expect("raw");
        let last = raw.len() - 1;
        raw[last] ^= 1;
        std::fs::write(&path, raw).expect("write");
        let e = sealed.get(&key).await.expect_err("altered").to_string();
        assert!(e.contains("damaged or was altered"), "{e}");
    }
}
