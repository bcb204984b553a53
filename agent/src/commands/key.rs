//! `pitr-agent key generate` and `pitr-agent key add`: the age keys of an
//! encrypted repository.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::cli::RepoArgs;
use crate::storage::sealed;

/// `pitr-agent key ...`
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KeyCommand {
    /// Write a new age identity to FILE (mode 0600, never overwritten) and
    /// print its recipient (age1...): give the recipient to writers
    /// (PITR_ENCRYPT_TO) and the file only to restores and rehearsals
    /// (PITR_IDENTITY_FILE).
    Generate {
        /// Where to write the identity.
        #[arg(long)]
        out: PathBuf,
    },
    /// List another recipient in the repository record, so that writers
    /// may switch PITR_ENCRYPT_TO to it (rotation). Objects already stored
    /// keep the recipients they were written to; `verify` lists them.
    Add {
        /// The recipient (age1...).
        recipient: String,
    },
}

impl KeyArgs {
    /// Runs the subcommand.
    ///
    /// # Errors
    /// The file exists or cannot be written; the repository is not
    /// encrypted or cannot be updated.
    pub async fn run(self, repo_args: &RepoArgs) -> anyhow::Result<ExitCode> {
        match self.command {
            KeyCommand::Generate { out } => {
                let (text, recipient) = sealed::generate_identity();
                write_new_secret(&out, text.as_bytes())
                    .with_context(|| format!("cannot write the identity to {}", out.display()))?;
                eprintln!(
                    "wrote the identity to {}; keep it in a Secret mounted only where restores \
                     and rehearsals run. Its recipient:",
                    out.display()
                );
                println!("{recipient}");
                Ok(ExitCode::SUCCESS)
            }
            KeyCommand::Add { recipient } => {
                let parsed = sealed::parse_recipient(&recipient)?.to_string();
                let repo = repo_args.open().await?;
                let added = crate::catalog::add_recipient(&repo.storage, &repo.url, &parsed)
                    .await
                    .with_context(|| format!("key add {}", repo.url))?;
                if added {
                    println!(
                        "repository {} now lists {parsed}; set PITR_ENCRYPT_TO={parsed} on the \
                         writers to encrypt new objects to it",
                        repo.url
                    );
                } else {
                    println!(
                        "repository {} already lists {parsed}; nothing changed",
                        repo.url
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// Creates `path` with `body`, readable by its owner only; never replaces a file.
fn write_new_secret(path: &std::path::Path, body: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(body)?;
    file.sync_all()
}
