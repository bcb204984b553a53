//! End-to-end scenarios against real PostgreSQL and real S3-compatible servers.
//! One test binary; one module per scenario.

mod archiving;
mod backup;
mod cli;
mod conformance;
mod daemon;
mod fetch;
mod filestore;
mod operator;
mod rehearse;
mod restore;
mod security;
mod stream;
mod tenant;
mod trust;
mod walread;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pitr_tests::bins::{agent, agent_cmd, init_repo, run_ok};
use pitr_tests::pg::{ARCHIVE_TIMEOUT, PgBin, PgOptions, Postgres, pg_bin};
use pitr_tests::s3::{S3Kind, S3Server};
use pitr_tests::{RunAs, user_tempdir};
use serde_json::Value;

/// A command's stdout as JSON, or a panic showing both of its streams.
pub(crate) fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Starts `kind`'s server, or reports it missing (fatal in CI).
fn s3_server(kind: S3Kind) -> Option<S3Server> {
    pitr_tests::prerequisite(S3Server::available(kind), &format!("{kind:?} S3 server"))
        .then(|| S3Server::start(kind))
}

/// A running cluster whose archive_command is `pitr-agent wal-push` into `repo`.
fn archiving_cluster(bin: &PgBin, repo: &str, env: &[(String, String)]) -> Postgres {
    archiving_cluster_with(bin, repo, env, &[])
}

/// [`archiving_cluster`] with extra postgresql.conf lines.
fn archiving_cluster_with(
    bin: &PgBin,
    repo: &str,
    env: &[(String, String)],
    conf: &[&str],
) -> Postgres {
    archiving_cluster_args(bin, repo, env, conf, Vec::new())
}

/// [`archiving_cluster_with`], and arguments for `postgres` itself.
fn archiving_cluster_args(
    bin: &PgBin,
    repo: &str,
    env: &[(String, String)],
    conf: &[&str],
    server_args: Vec<String>,
) -> Postgres {
    let mut env = env.to_vec();
    env.push(("PITR_REPO".into(), repo.into()));
    // Keep every segment in pg_wal so the tests can compare bytes.
    let mut lines = vec![
        "wal_keep_size = '4GB'".to_owned(),
        "max_wal_size = '4GB'".to_owned(),
    ];
    lines.extend(conf.iter().map(|l| (*l).to_owned()));
    let pg = Postgres::init(
        bin,
        &PgOptions {
            archive_command: Some(format!("{} wal-push %p", agent().display())),
            env: env.clone(),
            conf: lines,
            server_args,
        },
    );
    // As in the manifests: `init` first, and the first push claims it.
    init_repo(RunAs::test_user(), repo, &env);
    pg.start();
    pg
}

/// A cluster archiving into a repository, and how to reach both.
pub(crate) struct Setup {
    pub(crate) pg: Postgres,
    pub(crate) repo: String,
    /// S3 settings (empty for file://).
    pub(crate) env: Vec<(String, String)>,
    /// The repository directory, for file://.
    pub(crate) dir: Option<PathBuf>,
    pub(crate) _tmp: Option<tempfile::TempDir>,
    pub(crate) server: Option<S3Server>,
}

impl Setup {
    pub(crate) fn file(bin: &PgBin) -> Self {
        Self::file_with(bin, &[])
    }

    /// A file:// repository; `conf` adds postgresql.conf lines.
    pub(crate) fn file_with(bin: &PgBin, conf: &[&str]) -> Self {
        Self::file_with_env(bin, Vec::new(), conf)
    }

    /// A file:// repository; `env` reaches the server's `archive_command`
    /// and every command the test runs.
    pub(crate) fn file_with_env(bin: &PgBin, env: Vec<(String, String)>, conf: &[&str]) -> Self {
        let tmp = user_tempdir(RunAs::test_user(), "repo");
        let dir = tmp.path().join("archive");
        let repo = format!("file://{}", dir.display());
        Setup {
            pg: archiving_cluster_with(bin, &repo, &env, conf),
            repo,
            env,
            dir: Some(dir),
            _tmp: Some(tmp),
            server: None,
        }
    }

    /// A file:// repository; the server started with `server_args` (as a
    /// StatefulSet starts it).
    pub(crate) fn file_with_args(bin: &PgBin, conf: &[&str], server_args: Vec<String>) -> Self {
        let tmp = user_tempdir(RunAs::test_user(), "repo");
        let dir = tmp.path().join("archive");
        let repo = format!("file://{}", dir.display());
        Setup {
            pg: archiving_cluster_args(bin, &repo, &[], conf, server_args),
            repo,
            env: Vec::new(),
            dir: Some(dir),
            _tmp: Some(tmp),
            server: None,
        }
    }

    pub(crate) fn s3(bin: &PgBin, kind: S3Kind, prefix: &str) -> Option<Self> {
        Self::s3_with(bin, kind, prefix, &[])
    }

    /// An S3 repository on a fresh `kind` server; `conf` adds postgresql.conf lines.
    pub(crate) fn s3_with(bin: &PgBin, kind: S3Kind, prefix: &str, conf: &[&str]) -> Option<Self> {
        Self::s3_with_env(bin, kind, prefix, Vec::new(), conf)
    }

    /// [`Setup::s3_with`], with `extra` added to the server's environment.
    pub(crate) fn s3_with_env(
        bin: &PgBin,
        kind: S3Kind,
        prefix: &str,
        extra: Vec<(String, String)>,
        conf: &[&str],
    ) -> Option<Self> {
        let server = s3_server(kind)?;
        let repo = server.url(prefix);
        let mut env = server.env();
        env.extend(extra);
        Some(Setup {
            pg: archiving_cluster_with(bin, &repo, &env, conf),
            repo,
            env,
            dir: None,
            _tmp: None,
            server: Some(server),
        })
    }

    /// `pitr-agent --repo REPO ARGS`, as the test user, with the S3 and libpq settings.
    pub(crate) fn agent(&self, args: &[&str]) -> Command {
        let mut cmd = agent_cmd(RunAs::test_user());
        cmd.envs(self.env.iter().cloned())
            .envs(self.pg.client_env())
            .args(["--repo", &self.repo])
            .args(args);
        cmd
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        self.agent(args).output().expect("run pitr-agent")
    }

    pub(crate) fn backup(&self) -> Value {
        let out = run_ok(&mut self.agent(&["backup", "--json"]), "pitr-agent backup");
        serde_json::from_slice(&out.stdout).expect("backup --json prints JSON")
    }

    pub(crate) fn list(&self) -> Value {
        let out = run_ok(&mut self.agent(&["list", "--json"]), "pitr-agent list");
        serde_json::from_slice(&out.stdout).expect("list --json prints JSON")
    }

    pub(crate) fn backup_ids(&self) -> Vec<String> {
        self.list()["backups"]
            .as_array()
            .expect("backups array")
            .iter()
            .map(|b| b["id"].as_str().expect("id").to_owned())
            .collect()
    }

    /// Copies an object out of the repository: `cp` for file://, boto3 for S3.
    pub(crate) fn fetch(&self, key: &str, dest: &Path) {
        if let Some(dir) = &self.dir {
            std::fs::copy(dir.join(key), dest).expect("copy object");
            return;
        }
        let (bucket, prefix) = self
            .repo
            .strip_prefix("s3://")
            .and_then(|r| r.split_once('/'))
            .expect("s3://bucket/prefix");
        let script = "import boto3, os, sys\n\
            s3 = boto3.client('s3', endpoint_url=os.environ['PITR_S3_ENDPOINT'])\n\
            s3.download_file(sys.argv[1], sys.argv[2], sys.argv[3])\n";
        let out = Command::new("python3")
            .args(["-c", script, bucket, &format!("{prefix}/{key}")])
            .arg(dest)
            .envs(self.env.iter().cloned())
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "download {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until the archive holds everything written so far.
    pub(crate) fn archive_now(&self) -> String {
        let last = self.pg.switch_wal();
        self.pg.wait_archived(&last, ARCHIVE_TIMEOUT);
        last
    }
}
