//! The project's binaries, built fresh once per test process and copied to a
//! directory the PostgreSQL user can execute from (the checkout may sit under
//! a home directory it cannot enter).

use std::path::{Path, PathBuf};

use std::process::Command;
use std::sync::OnceLock;

use sha2::Digest as _;

use crate::RunAs;

struct Built {
    agent: PathBuf,
    pgrestore: PathBuf,
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test>, or target/<profile>/<bin> for the demo.
        let mut profile_dir = exe.parent().expect("binary has a directory").to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir.pop();
        }
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        // The same package and target selection as `cargo test --workspace`,
        // so that features unify identically: on a cold checkout this build
        // then adds only the bench target instead of a second AWS/TLS stack.
        build.args(["build", "--quiet", "--workspace", "--all-targets"]);
        if release {
            build.arg("--release");
        }
        // Cargo sets these for the running test; ring's build script tracks
        // CARGO_MANIFEST_DIR, so passing them on would rebuild the TLS stack.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let set_for_targets = key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_")
                || matches!(
                    key.as_ref(),
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "CARGO_RUSTC_CURRENT_DIR"
                        | "OUT_DIR"
                );
            if set_for_targets {
                build.env_remove(key.as_ref());
            }
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
        // One fixed directory per checkout and profile, replaced on every
        // run: a static is never dropped, so a temp dir here would leak a
        // copy of the binaries per test process.
        let digest = sha2::Sha256::digest(profile_dir.as_os_str().as_encoded_bytes());
        let dir = std::env::temp_dir().join(format!("pitr-bin-{}", hex::encode(&digest[..8])));
        std::fs::create_dir_all(&dir).expect("binary dir");
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod binary dir");
        let user = RunAs::test_user();
        let copy = |name: &str| {
            let dest = dir.join(name);
            // Copy beside, then rename: other test processes may be running it.
            let tmp = dir.join(format!(".{name}.{}", std::process::id()));
            std::fs::copy(profile_dir.join(name), &tmp).expect("copy binary");
            user.chown_tree(&tmp);
            std::fs::rename(&tmp, &dest).expect("rename binary");
            dest
        };
        let agent = copy("pitr-agent");
        let pgrestore = copy("pgrestore");
        Built { agent, pgrestore }
    })
}

/// The `pitr-agent` binary.
#[must_use]
pub fn agent() -> &'static Path {
    &built().agent
}

/// The `pgrestore` binary.
#[must_use]
pub fn pgrestore() -> &'static Path {
    &built().pgrestore
}

/// A `pitr-agent` command run as `user`, with a clean S3 environment.
#[must_use]
pub fn agent_cmd(user: RunAs) -> Command {
    let mut cmd = Command::new(agent());
    user.apply(&mut cmd);
    // The checkout may be a directory the test user cannot enter.
    cmd.current_dir(std::env::temp_dir());
    cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    cmd
}

/// `pitr-agent --repo REPO init` as `user` with `env` (S3 settings): what an
/// operator's init container does before PostgreSQL first archives.
pub fn init_repo(user: RunAs, repo: &str, env: &[(String, String)]) {
    run_ok(
        agent_cmd(user)
            .envs(env.iter().cloned())
            .args(["--repo", repo, "init"]),
        "pitr-agent init",
    );
}

/// Runs `cmd` and asserts that it succeeded, showing its stderr if not.
pub fn run_ok(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An age identity made by `pitr-agent key generate`, in a directory the
/// test user owns: the identity file and its recipient.
pub struct TestKey {
    /// The identity file (PITR_IDENTITY_FILE).
    pub identity: std::path::PathBuf,
    /// Its recipient (PITR_ENCRYPT_TO).
    pub recipient: String,
    _dir: tempfile::TempDir,
}

impl TestKey {
    /// Generates one with `pitr-agent key generate --out`.
    #[must_use]
    pub fn generate(user: RunAs) -> Self {
        let dir = crate::user_tempdir(user, "key");
        let identity = dir.path().join("identity.txt");
        let out = run_ok(
            agent_cmd(user)
                .args(["key", "generate", "--out"])
                .arg(&identity),
            "pitr-agent key generate",
        );
        let recipient = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(recipient.starts_with("age1"), "{recipient:?}");
        TestKey {
            identity,
            recipient,
            _dir: dir,
        }
    }
}
