//! The `pgrestore` binary: point-in-time recovery from a pitr-agent repository.
//! Parses arguments, then runs plan → extract → configure → (start)
//! ([`restore`]) or the `list` command it shares with `pitr-agent`.

mod args;
mod restore;
mod tenant;

use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand};
use pitr_agent::cli::{RepoArgs, run_main};
use pitr_agent::commands::catalog::ListArgs;

use crate::args::RestoreArgs;

/// Point-in-time recovery for PostgreSQL from a pitr-agent repository.
///
/// Example: pgrestore --target-time '2026-11-21 14:30:00+00' --pgdata /var/lib/postgresql/data --start
#[derive(Debug, Parser)]
#[command(name = "pgrestore", version, about, max_term_width = 100,
          group(ArgGroup::new("recovery_target").args(["target_time", "target_lsn", "target_xid", "target_name", "target"])))]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    restore: RestoreArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show backups and the restorable window (as `pitr-agent list`).
    List(ListArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main("pgrestore", 2, true, async move {
        match cli.command {
            Some(Command::List(args)) => args.run(&cli.repo).await,
            None => restore::restore(&cli.repo, cli.restore).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_text() {
        let help = Cli::command().render_long_help().to_string();
        insta::assert_snapshot!(pitr_agent::cli::help_without_env_values(&help));
    }
}
