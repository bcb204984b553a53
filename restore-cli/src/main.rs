//! The `pgrestore` binary: point-in-time recovery from a pitr-agent repository.
//!
//! A skeleton until the restore issue lands: it parses the shared repository
//! flags and says plainly that restore is not implemented yet.

use std::process::ExitCode;

use clap::Parser;
use pitr_agent::cli::RepoArgs;

/// Point-in-time recovery for PostgreSQL from a pitr-agent repository.
#[derive(Debug, Parser)]
#[command(name = "pgrestore", version, about)]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    eprintln!(
        "pgrestore: restore from {} is not implemented yet; until it is, restore by hand: \
         see docs/repository.md",
        cli.repo.repo
    );
    ExitCode::from(2)
}
