//! `Unreliable`: a `file://` store behind a flaky transport, for tests
//! (feature `fault-injection`).
//!
//! It models what an S3 client meets and does about it: each attempt of a
//! call may fail before the store sees it, or (for writes) fail after the
//! store applied it, or be slow; the client then retries, up to `attempts`
//! times, exactly like the AWS SDK under [`super::S3Store`]. A retried write
//! therefore meets its own applied write, which is what the create-only
//! rules of [`super::Storage::put`] and the callers must survive. Faults
//! come from a seed, so a failing run can be replayed.
//!
//! For S3 itself the tests use an HTTP fault proxy in front of a real
//! server instead: the same faults, below the real SDK.
//!
//! Selected by `PITR_TEST_FAULTS` when the feature is compiled in, e.g.
//! `PITR_TEST_FAULTS='seed=7,before=0.15,after=0.1,slow=0.05,attempts=8,log=/tmp/faults'`
//! (each process mixes its PID into the seed; `log` appends one line per
//! injected fault).

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};

use super::{BoxReader, LocalFs, ObjectKey, ObjectMeta, PutMode, StorageError};

/// The environment variable that turns the wrapper on.
pub const FAULTS_ENV: &str = "PITR_TEST_FAULTS";

/// What goes wrong, and how often.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultPlan {
    /// Seed of the fault sequence.
    pub seed: u64,
    /// Share of attempts that fail before reaching the store.
    pub before: f64,
    /// Share of write attempts that fail after the store applied them.
    pub after: f64,
    /// Share of attempts delayed by `delay`.
    pub slow: f64,
    /// How long a slow attempt waits.
    pub delay: Duration,
    /// Attempts per call, the first included (the client's retries).
    pub attempts: u32,
    /// Where to append one line per injected fault.
    pub log: Option<PathBuf>,
}

impl FaultPlan {
    /// Parses `key=value,...` (keys: seed, before, after, slow, delay-ms,
    /// attempts, log).
    ///
    /// # Errors
    /// An unknown key or a value that does not parse.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut plan = FaultPlan {
            seed: 0,
            before: 0.0,
            after: 0.0,
            slow: 0.0,
            delay: Duration::from_millis(20),
            attempts: 4,
            log: None,
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{FAULTS_ENV}: {part:?} is not key=value"))?;
            let bad = || format!("{FAULTS_ENV}: bad value in {part:?}");
            match key {
                "seed" => plan.seed = value.parse().map_err(|_| bad())?,
                "before" => plan.before = value.parse().map_err(|_| bad())?,
                "after" => plan.after = value.parse().map_err(|_| bad())?,
                "slow" => plan.slow = value.parse().map_err(|_| bad())?,
                "delay-ms" => {
                    plan.delay = Duration::from_millis(value.parse().map_err(|_| bad())?);
                }
                "attempts" => plan.attempts = value.parse::<u32>().map_err(|_| bad())?.max(1),
                "log" => plan.log = Some(PathBuf::from(value)),
                _ => return Err(format!("{FAULTS_ENV}: unknown key {key:?}")),
            }
        }
        Ok(plan)
    }
}

/// A local store behind a flaky transport with client retries.
#[derive(Debug)]
pub struct Unreliable {
    inner: LocalFs,
    plan: FaultPlan,
    rng: Mutex<rand::rngs::StdRng>,
    injected: AtomicU64,
}

/// What one attempt meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Before,
    After,
}

impl Unreliable {
    /// Wraps `inner`.
    #[must_use]
    pub fn new(inner: LocalFs, plan: FaultPlan) -> Self {
        Unreliable {
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(plan.seed)),
            inner,
            plan,
            injected: AtomicU64::new(0),
        }
    }

    /// How many faults were injected so far.
    #[must_use]
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    pub(super) fn inner(&self) -> &LocalFs {
        &self.inner
    }

    fn note(&self, what: &str, op: &str, target: &str) {
        self.injected.fetch_add(1, Ordering::Relaxed);
        if let Some(path) = &self.plan.log
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        {
            let _ = writeln!(f, "{what} {op} {target}");
        }
    }

    /// Draws this attempt's fault; `write` allows "applied, then failed".
    async fn draw(&self, op: &str, target: &str, write: bool) -> Fault {
        let (slow, roll, after) = {
            let mut rng = self
                .rng
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (
                rng.random_bool(self.plan.slow.clamp(0.0, 1.0)),
                rng.random_bool(self.plan.before.clamp(0.0, 1.0)),
                write && rng.random_bool(self.plan.after.clamp(0.0, 1.0)),
            )
        };
        if slow {
            self.note("slow", op, target);
            tokio::time::sleep(self.plan.delay).await;
        }
        if roll {
            self.note("before", op, target);
            Fault::Before
        } else if after {
            Fault::After
        } else {
            Fault::None
        }
    }

    fn gave_up(&self, op: &str, target: &str) -> StorageError {
        StorageError::Unreachable {
            endpoint: "unreliable".to_owned(),
            location: target.to_owned(),
            detail: format!(
                "{op}: injected faults on all {} attempts",
                self.plan.attempts
            ),
        }
    }

    /// Runs `call` with the plan's faults and retries. `write` calls may be
    /// applied and still fail; they are retried like any other.
    async fn attempt<T, F, Fut>(
        &self,
        op: &str,
        target: &str,
        write: bool,
        mut call: F,
    ) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StorageError>>,
    {
        for _ in 0..self.plan.attempts {
            match self.draw(op, target, write).await {
                Fault::Before => continue,
                Fault::After => {
                    let _ = call().await;
                    self.note("after", op, target);
                }
                Fault::None => return call().await,
            }
        }
        Err(self.gave_up(op, target))
    }

    pub(super) fn location(&self, key: &ObjectKey) -> String {
        self.inner.location(key)
    }

    pub(super) async fn put(
        &self,
        key: &ObjectKey,
        body: Bytes,
        mode: PutMode,
    ) -> Result<(), StorageError> {
        self.attempt("put", key.as_str(), true, || {
            self.inner.put(key, body.clone(), mode)
        })
        .await
    }

    /// Only "before" faults and delays: the reader cannot be replayed, as an
    /// S3 client retries parts, not the source.
    pub(super) async fn put_stream(
        &self,
        key: &ObjectKey,
        reader: BoxReader,
    ) -> Result<u64, StorageError> {
        for _ in 0..self.plan.attempts {
            if self.draw("put_stream", key.as_str(), false).await == Fault::None {
                return self.inner.put_stream(key, reader).await;
            }
        }
        Err(self.gave_up("put_stream", key.as_str()))
    }

    pub(super) async fn get(&self, key: &ObjectKey) -> Result<Bytes, StorageError> {
        self.attempt("get", key.as_str(), false, || self.inner.get(key))
            .await
    }

    pub(super) async fn get_prefix(
        &self,
        key: &ObjectKey,
        len: u64,
    ) -> Result<Bytes, StorageError> {
        self.attempt("get_prefix", key.as_str(), false, || {
            self.inner.get_prefix(key, len)
        })
        .await
    }

    pub(super) async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>, StorageError> {
        self.attempt("head", key.as_str(), false, || self.inner.head(key))
            .await
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        self.attempt("list", prefix, false, || self.inner.list(prefix))
            .await
    }

    pub(super) async fn get_stream(&self, key: &ObjectKey) -> Result<BoxReader, StorageError> {
        self.attempt("get_stream", key.as_str(), false, || {
            self.inner.get_stream(key)
        })
        .await
    }

    pub(super) async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        self.attempt("delete_prefix", prefix, true, || {
            self.inner.delete_prefix(prefix)
        })
        .await
    }

    pub(super) async fn delete(&self, key: &ObjectKey) -> Result<(), StorageError> {
        self.attempt("delete", key.as_str(), true, || self.inner.delete(key))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_refuse_unknown_keys() {
        let plan = FaultPlan::parse(
            "seed=7, before=0.15,after=0.1,slow=0.05,delay-ms=5,attempts=8,log=/tmp/f",
        )
        .expect("parses");
        assert_eq!(plan.seed, 7);
        assert_eq!(plan.attempts, 8);
        assert_eq!(plan.delay, Duration::from_millis(5));
        assert_eq!(plan.log.as_deref(), Some(std::path::Path::new("/tmp/f")));
        assert!(FaultPlan::parse("sedd=1").is_err());
        assert!(FaultPlan::parse("before=x").is_err());
    }

    #[tokio::test]
    async fn an_applied_write_that_failed_is_retried_into_its_own_object() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = LocalFs::open(dir.path().to_owned()).await.expect("open");
        inner.create_root().await.expect("root");
        let plan = FaultPlan {
            after: 1.0,
            attempts: 3,
            ..FaultPlan::parse("").expect("empty")
        };
        let store = Unreliable::new(inner, plan);
        let key = ObjectKey::new("wal/x.gz").expect("key");
        // Every attempt applies and fails: the first creates, the rest meet it.
        let err = store
            .put(&key, Bytes::from_static(b"x"), PutMode::CreateOnly)
            .await
            .expect_err("all attempts fail");
        assert!(matches!(err, StorageError::Unreachable { .. }), "{err}");
        assert_eq!(store.injected(), 3);
        assert_eq!(store.inner().get(&key).await.expect("applied"), "x");
    }
}
