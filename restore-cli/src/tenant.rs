//! `pgrestore --database NAME`: one tenant back to a point in time, into the
//! live cluster ([`pitr_agent::restore::tenant`]).

use std::process::ExitCode;

use anyhow::bail;
use pitr_agent::cli::RepoArgs;
use pitr_agent::restore::files;
use pitr_agent::restore::target::{RecoveryTarget, TargetAction};
use pitr_agent::restore::tenant::{TenantRequest, Unfinished, drop_unfinished, restore_tenant};

use crate::args::RestoreArgs;

pub(crate) async fn run(
    repo_args: &RepoArgs,
    args: &RestoreArgs,
    database: &str,
    target: RecoveryTarget,
    say: &(dyn Fn(&str) + Sync),
) -> anyhow::Result<ExitCode> {
    if args.start || args.new_primary {
        bail!(
            "--database copies one database into the live cluster; --start and --new-primary \
             are for restoring a whole cluster into --pgdata: drop them"
        );
    }
    if args.target_action != TargetAction::Pause {
        bail!("--database promotes its scratch cluster at the target; drop --target-action");
    }
    if let Some(dir) = &args.filestore {
        // The tenant's files go to DIR/<its name>; DIR may hold others.
        if dir.exists() && !dir.is_dir() {
            bail!("--filestore {} is not a directory", dir.display());
        }
    }
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let from_env = pitr_agent::pgconn::PgArgs {
        host: env("PGHOST"),
        port: env("PGPORT").and_then(|p| p.parse().ok()),
        user: Some(args.pg_user.clone()),
        database: env("PGDATABASE"),
        service: env("PGSERVICE"),
        bin: args.pg_bin.clone(),
    }
    .resolve()?;
    let live = match &args.into {
        Some(url) => pitr_agent::pgconn::PgTarget::from_url(url, &from_env)?,
        None => from_env,
    };
    let agent = files::find_agent(args.agent.as_deref())?;
    let repo = repo_args.open().await?;
    repo.owner().await?;
    let req = TenantRequest {
        database: database.to_owned(),
        target,
        timeline: args.target_timeline,
        exclusive: args.exclusive,
        backup: args.backup.clone(),
        allow_incomplete: args.allow_incomplete,
        new_name: args.as_name.clone(),
        replace: args.replace,
        neutralize: args.neutralize,
        filestore: args
            .filestore
            .as_ref()
            .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone())),
        scratch_parent: args.scratch.clone().unwrap_or_else(std::env::temp_dir),
        live: live.clone(),
        agent,
        timeout: args.start_timeout,
        dry_run: args.dry_run,
    };
    say(&format!(
        "pgrestore: the live cluster is {}",
        live.describe()
    ));
    let unfinished = Unfinished::default();
    let outcome = tokio::select! {
        r = restore_tenant(&repo, repo_args, &req, say, &unfinished) => r?,
        () = pitr_agent::cli::wait_for_signal() => {
            // The restore's future is dropped here: its children are killed
            // and the scratch cluster stopped and removed.
            let dropped = drop_unfinished(&live, &unfinished).await?;
            bail!(
                "interrupted{}; the scratch cluster was stopped and removed, the live databases \
                 are as they were",
                dropped.map_or(String::new(), |d| format!(": the half-copied {d} was dropped"))
            );
        }
    };
    if args.dry_run {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&outcome.plan)?);
        }
        say("pgrestore: --dry-run: nothing was changed");
        return Ok(ExitCode::SUCCESS);
    }
    let restored = outcome.restored_as.as_deref().unwrap_or_default();
    if let Some(r) = &outcome.reached {
        say(&format!(
            "pgrestore: the scratch cluster reached the target: last replayed transaction at {}, \
             WAL replayed to {}",
            r.last_transaction_time
                .as_deref()
                .unwrap_or("(none replayed)"),
            r.replay_lsn.as_deref().unwrap_or("(unknown)")
        ));
    }
    say(&format!(
        "pgrestore: {database} at the target is now {restored} in the live cluster (extract \
         {:.1}s, replay {:.1}s, copy {:.1}s, total {:.1}s); the scratch cluster was removed",
        outcome.seconds.extract,
        outcome.seconds.replay,
        outcome.seconds.copy,
        outcome.seconds.total
    ));
    if let Some(before) = &outcome.live_renamed_to {
        say(&format!(
            "pgrestore: --replace: the live database before the restore is {before}, closed to \
             connections (ALTER DATABASE \"{before}\" ALLOW_CONNECTIONS true to look at it)"
        ));
    }
    for line in &outcome.neutralized {
        say(&format!("pgrestore: --neutralize: {line}"));
    }
    if !outcome.neutralize_skipped.is_empty() {
        say(&format!(
            "pgrestore: --neutralize: no such tables, skipped: {}",
            outcome.neutralize_skipped.join(", ")
        ));
    }
    let mut missing = false;
    if let Some(report) = &outcome.filestore {
        say(&format!(
            "pgrestore: filestore: restored {} files ({}) into {}",
            report.files,
            pitr_agent::report::bytes(report.bytes),
            args.filestore
                .as_ref()
                .map(|d| d.join(restored).display().to_string())
                .unwrap_or_default()
        ));
        for m in &report.missing {
            eprintln!("pgrestore: error: {m}");
        }
        missing = !report.missing.is_empty();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    }
    Ok(if missing {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
