//! End-to-end scenarios against real PostgreSQL and real S3-compatible servers.
//! One test binary; one module per scenario.

mod archiving;
mod cli;
mod conformance;
mod fetch;

use pitr_tests::s3::{S3Kind, S3Server};

/// Starts `kind`'s server, or reports it missing (fatal in CI).
fn s3_server(kind: S3Kind) -> Option<S3Server> {
    pitr_tests::prerequisite(S3Server::available(kind), &format!("{kind:?} S3 server"))
        .then(|| S3Server::start(kind))
}
