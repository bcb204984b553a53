//! End-to-end scenarios against real PostgreSQL and real S3-compatible servers.
//! One test binary; one module per scenario.

mod archiving;
mod backup;
mod cli;
mod conformance;
mod fetch;
mod restore;

use pitr_tests::bins::agent;
use pitr_tests::pg::{PgBin, PgOptions, Postgres};
use pitr_tests::s3::{S3Kind, S3Server};

/// Starts `kind`'s server, or reports it missing (fatal in CI).
fn s3_server(kind: S3Kind) -> Option<S3Server> {
    pitr_tests::prerequisite(S3Server::available(kind), &format!("{kind:?} S3 server"))
        .then(|| S3Server::start(kind))
}

/// The PostgreSQL installation to test with, or a skip (fatal in CI).
fn pg_bin() -> Option<PgBin> {
    let bin = PgBin::find();
    pitr_tests::prerequisite(
        bin.is_some(),
        "PostgreSQL server binaries (PG_BIN or postgresql-15)",
    )
    .then(|| bin.expect("checked"))
}

/// A running cluster whose archive_command is `pitr-agent wal-push` into `repo`.
fn archiving_cluster(bin: &PgBin, repo: &str, env: &[(String, String)]) -> Postgres {
    let mut env = env.to_vec();
    env.push(("PITR_REPO".into(), repo.into()));
    Postgres::start_new(
        bin,
        &PgOptions {
            archive_command: Some(format!("{} wal-push %p", agent().display())),
            env,
            // Keep every segment in pg_wal so the tests can compare bytes.
            conf: vec![
                "wal_keep_size = '4GB'".into(),
                "max_wal_size = '4GB'".into(),
            ],
        },
    )
}
