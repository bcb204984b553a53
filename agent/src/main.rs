//! The `pitr-agent` binary: parses arguments and runs one command from
//! [`pitr_agent::commands`].

use std::process::ExitCode;

use clap::Parser;

use pitr_agent::archive::FETCH_EXIT_FATAL;
use pitr_agent::cli::{RepoArgs, run_main};
use pitr_agent::commands::Command;

/// Continuous WAL archiving and base backups for PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "pitr-agent", version, about, max_term_width = 100)]
struct Cli {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(subcommand)]
    command: Command,
}

fn main() -> ExitCode {
    // restore_command must never exit 1-125 for anything but "not found":
    // PostgreSQL would end recovery there. Usage errors and panics of
    // wal-fetch therefore exit 128 (see archive::FETCH_EXIT_FATAL).
    let fetching = std::env::args().any(|a| a == "wal-fetch");
    if fetching {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("pitr-agent wal-fetch: internal error: {info}; stopping recovery");
            std::process::exit(i32::from(FETCH_EXIT_FATAL));
        }));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if fetching && e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(FETCH_EXIT_FATAL);
        }
        Err(e) => e.exit(),
    };
    let fatal = cli.command.fatal_exit_code();
    let multi_threaded = cli.command.multi_threaded();
    run_main(
        "pitr-agent",
        fatal,
        multi_threaded,
        cli.command.run(cli.repo),
    )
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every command's `--help`: its own flags first, then the shared
    /// Repository flags; a change of interface shows up in review.
    #[test]
    fn help_texts() {
        let mut cli = Cli::command();
        let mut all = pitr_agent::cli::help_without_env_values(&cli.render_long_help().to_string());
        for sub in cli.get_subcommands_mut().filter(|s| !s.is_hide_set()) {
            let name = sub.get_name().to_owned();
            let help = sub.render_long_help().to_string();
            all.push_str(&format!("\n===== pitr-agent {name} --help\n"));
            all.push_str(&pitr_agent::cli::help_without_env_values(&help));
        }
        insta::assert_snapshot!(all);
    }
}
