//! Test harness: real PostgreSQL clusters and real S3-compatible servers on 127.0.0.1.
//!
//! - [`pg`]: `initdb` into a temp dir and a server on its own socket and port,
//!   run as a non-root user; killed on drop.
//! - [`s3`]: `moto_server` and `s3s-fs`, on random ports; killed on drop.
//! - [`bins`]: the freshly built `pitr-agent` / `pgrestore`, copied where the
//!   PostgreSQL user can execute them.
//!
//! A missing tool skips the test with a message, unless
//! `PITR_REQUIRE_INTEGRATION=1` (set by CI), where it fails instead.
#![allow(clippy::missing_panics_doc, clippy::missing_errors_doc)]

pub mod bins;
pub mod manifests;
pub mod measure;
pub mod pg;
pub mod s3;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Whether missing tools must fail the run instead of skipping.
#[must_use]
pub fn integration_required() -> bool {
    std::env::var("PITR_REQUIRE_INTEGRATION").is_ok_and(|v| v == "1")
}

/// Reports a missing prerequisite: panics in CI, otherwise prints a skip line.
/// Returns `false` so that callers can `if !skip_unless(..) { return }`.
#[must_use]
pub fn prerequisite(available: bool, what: &str) -> bool {
    if !available {
        assert!(
            !integration_required(),
            "{what} is required (PITR_REQUIRE_INTEGRATION=1) but missing; run .ci/install-deps.sh"
        );
        eprintln!("SKIPPED: {what} is not available; run .ci/install-deps.sh to enable this test");
    }
    available
}

/// A seeded random generator for a randomized test: `PITR_TEST_SEED` when
/// set (to replay a run), else a fresh seed. The seed is printed, with
/// `what`, so that a failing run can be replayed.
#[must_use]
pub fn seeded_rng(what: &str) -> (u64, rand::rngs::StdRng) {
    use rand::{Rng as _, SeedableRng as _};
    let seed: u64 = std::env::var("PITR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{what}: seed {seed} (PITR_TEST_SEED={seed} replays it)");
    (seed, rand::rngs::StdRng::seed_from_u64(seed))
}

/// The user that tests run PostgreSQL and archive commands as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl RunAs {
    /// When running as root: `PITR_TEST_USER`, else `postgres`, else `nobody`.
    /// Otherwise: the current user.
    #[must_use]
    pub fn test_user() -> Self {
        let me = std::fs::metadata("/proc/self").expect("procfs is mounted");
        if me.uid() != 0 {
            return RunAs {
                uid: me.uid(),
                gid: me.gid(),
            };
        }
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let wanted = std::env::var("PITR_TEST_USER").ok();
        let candidates = wanted
            .iter()
            .map(String::as_str)
            .chain(["postgres", "nobody"]);
        for name in candidates {
            for line in passwd.lines() {
                let fields: Vec<&str> = line.split(':').collect();
                if fields.len() > 3 && fields[0] == name {
                    let uid = fields[2].parse().expect("numeric uid");
                    let gid = fields[3].parse().expect("numeric gid");
                    return RunAs { uid, gid };
                }
            }
        }
        panic!(
            "running as root but no non-root user (postgres or nobody) exists; set PITR_TEST_USER"
        );
    }

    /// Whether this differs from the current process's user.
    #[must_use]
    pub fn is_switch(&self) -> bool {
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() != self.uid)
    }

    /// Makes `path` (recursively) owned by this user.
    pub fn chown_tree(&self, path: &Path) {
        if !self.is_switch() {
            return;
        }
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).expect("chown");
        if path.is_dir() {
            for entry in std::fs::read_dir(path).expect("read_dir").flatten() {
                self.chown_tree(&entry.path());
            }
        }
    }

    /// Applies this user to a command.
    pub fn apply(&self, cmd: &mut std::process::Command) {
        if self.is_switch() {
            std::os::unix::process::CommandExt::uid(cmd, self.uid);
            std::os::unix::process::CommandExt::gid(cmd, self.gid);
        }
    }
}

/// A temp dir owned by the test user, readable by the test process.
#[must_use]
pub fn user_tempdir(user: RunAs, label: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("pitr-{label}-"))
        .tempdir()
        .expect("create temp dir");
    user.chown_tree(dir.path());
    dir
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free TCP port on 127.0.0.1.
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Finds an executable on `PATH`.
#[must_use]
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

pub mod fakepg;
pub mod faultproxy;
