//! plan → extract → configure → (start), from the agent library's `restore` module.

use std::io::IsTerminal as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use anyhow::bail;
use pitr_agent::cli::RepoArgs;
use pitr_agent::commands::catalog::open_catalog;
use pitr_agent::report;
use pitr_agent::restore::plan::{PlanRequest, RestorePlan, plan_restore};
use pitr_agent::restore::recovery::{RecoveryConfig, StartConfig, start_and_wait};
use pitr_agent::restore::target::{RecoveryTarget, TargetAction, TargetTimeline};
use pitr_agent::restore::{check_target_dir, extract, files};

use crate::args::{RestoreArgs, local_reading, target_of};

/// Plan, extract, configure and (with `--start`) start: the restore itself.
pub(crate) async fn restore(repo_args: &RepoArgs, args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let say = |line: &str| {
        if !args.quiet && !args.json {
            eprintln!("{line}");
        }
    };
    let no_target = args.target_time.is_none()
        && args.target_lsn.is_none()
        && args.target_xid.is_none()
        && args.target_name.is_none()
        && args.target.is_none();
    if let (true, false, Some(fs_dir), None) =
        (no_target, args.start, &args.filestore, &args.database)
    {
        return filestore_only(repo_args, &args, fs_dir, &say).await;
    }
    let target = target_of(&args)?;
    if let RecoveryTarget::Time(t) = &target
        && t.assumed_utc
    {
        let typed = args.target_time.as_deref().unwrap_or_default();
        if !args.utc {
            bail!(
                "--target-time {typed:?} has no UTC offset, so it is ambiguous: as UTC it is \
                 {t}; in this machine's time zone it is {}. Add the offset (e.g. '{typed}+00') \
                 or pass --utc to read it as UTC",
                local_reading(t).unwrap_or_else(|| "unknown".to_owned())
            );
        }
        say(&format!("pgrestore: --utc: reading the target as UTC, {t}"));
    }
    if let Some(database) = &args.database {
        return crate::tenant::run(repo_args, &args, database, target, &say).await;
    }
    let Some(dir) = args.pgdata.clone() else {
        bail!("no data directory: pass --pgdata DIR (or set PGDATA)");
    };
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let existed = check_target_dir(&dir)?;
    let filestore = match &args.filestore {
        None => None,
        Some(_) if !args.start => bail!(
            "--filestore with a recovery target restores the files the restored databases \
             reference once recovery reached it, so it needs --start: add --start (or run \
             pgrestore --filestore DIR alone later, against the restored server)"
        ),
        Some(_) if args.target_action == TargetAction::Shutdown => bail!(
            "--filestore reads the restored databases once they reached the target, so the \
             server must stay up: use --target-action pause or promote"
        ),
        Some(fs_dir) => {
            let fs_dir = std::path::absolute(fs_dir).unwrap_or_else(|_| fs_dir.clone());
            if fs_dir.starts_with(&dir) {
                bail!(
                    "--filestore {} lies inside --pgdata {}: give a directory outside the data \
                     directory",
                    fs_dir.display(),
                    dir.display()
                );
            }
            let fs_existed =
                check_target_dir(&fs_dir).map_err(|e| anyhow::anyhow!("--filestore: {e}"))?;
            Some((fs_dir, fs_existed))
        }
    };
    let agent = files::find_agent(args.agent.as_deref())?;

    let (repo, mut catalog) = open_catalog(repo_args, "read the catalog of").await?;
    let (histories, _) = catalog.histories(&repo.storage).await?;
    let index = catalog.wal_index(histories);
    pitr_agent::archive::summary::resolve_archive_end(&repo, &mut catalog, &index).await?;
    let req = PlanRequest {
        target: target.clone(),
        timeline: args.target_timeline,
        backup: args.backup.clone(),
        allow_incomplete: args.allow_incomplete,
    };
    let plan = plan_restore(&repo, &catalog, &index, &req).await?;
    // Without a target PostgreSQL replays all there is and promotes: it
    // cannot pause or shut down there.
    let action = if target == RecoveryTarget::Latest {
        if args.target_action != TargetAction::Pause {
            say("pgrestore: --target latest always promotes; --target-action is ignored");
        }
        TargetAction::Promote
    } else {
        args.target_action
    };
    say(&plan_text(
        &plan,
        &target,
        action,
        &dir,
        args.target_timeline,
    ));
    files::check_free_space(&dir, plan.disk_needed)?;
    // Where --start listens, checked before anything is downloaded.
    let start_at = if args.start {
        files::start_socket(args.start_port, args.socket_dir.as_deref())?
    } else {
        (0, std::path::PathBuf::new())
    };
    if args.dry_run {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        }
        say("pgrestore: --dry-run: nothing was changed");
        return Ok(ExitCode::SUCCESS);
    }

    let started = Instant::now();
    let stats = match restore_files(&repo, &plan, &dir, existed, &args).await {
        Ok(stats) => stats,
        Err(e) => {
            files::clean(&dir, existed);
            return Err(e.context(format!(
                "restore into {} (it was left {})",
                dir.display(),
                if existed { "empty" } else { "absent" }
            )));
        }
    };
    let recovery = RecoveryConfig {
        restore_command: files::restore_command(&agent, repo_args),
        target: plan.recover_to.clone(),
        timeline: plan.target_timeline.clone(),
        action,
        exclusive: args.exclusive,
        new_primary: args.new_primary,
    };
    let header = format!(
        "added by pgrestore at {}: backup {}, recovery to {target}",
        humantime::format_rfc3339_seconds(SystemTime::now()),
        plan.backup.id
    );
    let removed = match recovery.write(&dir, &header) {
        Ok(removed) => removed,
        Err(e) => {
            files::clean(&dir, existed);
            bail!("write the recovery settings into {}: {e}", dir.display());
        }
    };
    if !args.new_primary {
        say(
            "pgrestore: a copy beside its source: archive_mode=off and no synchronous standby, so \
             it never writes into the repository (pass --new-primary when it replaces the source)",
        );
    }
    if !removed.is_empty() {
        say(&format!(
            "pgrestore: the backup carried recovery settings of an earlier restore; removed:\n  {}",
            removed.join("\n  ")
        ));
    }
    say(&format!(
        "pgrestore: restored {} files ({}) in {:.1}s; recovery.signal and the recovery settings \
         are in {}/postgresql.auto.conf",
        stats.files,
        report::bytes(stats.raw_bytes),
        started.elapsed().as_secs_f64(),
        dir.display()
    ));

    let mut reached = None;
    let mut filestore_report: Option<pitr_agent::filestore::RestoreReport> = None;
    if args.start {
        let pg = pitr_agent::pgconn::PgArgs {
            host: None,
            port: None,
            user: Some(args.pg_user.clone()),
            database: None,
            service: None,
            bin: args.pg_bin.clone(),
        }
        .resolve()?;
        let major = plan.backup.pg_version / 10_000;
        let pg_ctl = pg.program("pg_ctl", major)?;
        let mut env = vec![("PITR_REPO".to_owned(), repo.url.clone())];
        env.extend(repo_args.child_env());
        let cfg = StartConfig {
            pg_ctl,
            port: start_at.0,
            socket_dir: start_at.1.clone(),
            user: args.pg_user.clone(),
            timeout: args.start_timeout,
            env,
            action,
            settings: Vec::new(),
            target: plan.recover_to.clone(),
        };
        say(&format!(
            "pgrestore: starting PostgreSQL {major} on port {} (socket {}), waiting for {target}",
            start_at.0,
            start_at.1.display()
        ));
        let r = match start_and_wait(&dir, &cfg).await {
            Ok(r) => r,
            Err(e) => {
                // Whatever went wrong, the directory goes back to how it was
                // found: never a half-recovered cluster that looks good.
                files::stop_server(&cfg.pg_ctl, &dir).await;
                files::clean(&dir, existed);
                return Err(anyhow::Error::new(e).context(format!(
                    "recover {} (it was left {}, as it was found)",
                    dir.display(),
                    if existed { "empty" } else { "absent" }
                )));
            }
        };
        if let Err(short) = files::check_replay_end(&plan, &r) {
            files::stop_server(&cfg.pg_ctl, &dir).await;
            files::clean(&dir, existed);
            bail!(
                "{short}. The server was stopped and {} left {}, as it was found: restore to an \
                 earlier target or repair the WAL (`pitr-agent verify` names what is damaged)",
                dir.display(),
                if existed { "empty" } else { "absent" }
            );
        }
        say(&format!(
            "pgrestore: reached the target: last replayed transaction at {}, WAL replayed to {}; {}",
            r.last_transaction_time
                .as_deref()
                .unwrap_or("(none replayed)"),
            r.replay_lsn.as_deref().unwrap_or("(unknown)"),
            match (r.running, r.promoted) {
                (false, _) => "the server shut down at the target, as asked".to_owned(),
                (true, true) => "the server is promoted and accepts writes".to_owned(),
                (true, false) => "the server is paused at the target, read-only: check the data, \
                                  then SELECT pg_wal_replay_resume() to promote"
                    .to_owned(),
            }
        ));
        reached = Some(r);
        if let Some((fs_dir, fs_existed)) = &filestore {
            let target_pg = pitr_agent::pgconn::PgTarget {
                host: start_at.1.display().to_string(),
                port: start_at.0,
                user: args.pg_user.clone(),
                database: "postgres".to_owned(),
                bin: None,
                service_password: None,
            };
            filestore_report =
                Some(restore_filestore(&repo, &target_pg, fs_dir, *fs_existed, &say).await?);
        }
    } else {
        say(&format!(
            "pgrestore: to recover, start PostgreSQL on it as the user that owns it: pg_ctl -D {0} \
             -l {0}/recovery.log start",
            dir.display()
        ));
    }
    let missing = filestore_report
        .as_ref()
        .is_some_and(|r| !r.missing.is_empty());
    if args.json {
        let doc = serde_json::json!({
            "plan": plan,
            "files": stats.files,
            "raw-bytes": stats.raw_bytes,
            "stored-bytes": stats.stored_bytes,
            "seconds": started.elapsed().as_secs_f64(),
            "removed-settings": removed,
            "reached": reached.map(|mut r| { r.log.clear(); r }),
            "filestore": filestore_report,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(if missing {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `pgrestore --filestore DIR` alone: the filestore of the databases of an
/// already restored server, reached through the libpq variables.
async fn filestore_only(
    repo_args: &RepoArgs,
    args: &RestoreArgs,
    fs_dir: &Path,
    say: &impl Fn(&str),
) -> anyhow::Result<ExitCode> {
    let fs_dir = std::path::absolute(fs_dir).unwrap_or_else(|_| fs_dir.to_path_buf());
    let existed = check_target_dir(&fs_dir).map_err(|e| anyhow::anyhow!("--filestore: {e}"))?;
    let repo = repo_args.open().await?;
    repo.owner().await?;
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let pg = pitr_agent::pgconn::PgArgs {
        host: env("PGHOST"),
        port: env("PGPORT").and_then(|p| p.parse().ok()),
        user: Some(args.pg_user.clone()),
        database: None,
        service: env("PGSERVICE"),
        bin: None,
    }
    .resolve()?;
    say(&format!(
        "pgrestore: filestore of the databases at {} (PGHOST, PGPORT, PGUSER)",
        pg.describe()
    ));
    let report = restore_filestore(&repo, &pg, &fs_dir, existed, say).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(if report.missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The filestore of the restored databases, into `dir`.
async fn restore_filestore(
    repo: &pitr_agent::repository::Repository,
    pg: &pitr_agent::pgconn::PgTarget,
    dir: &Path,
    existed: bool,
    say: &impl Fn(&str),
) -> anyhow::Result<pitr_agent::filestore::RestoreReport> {
    let started = Instant::now();
    let attachments = pitr_agent::filestore::attachments(pg)
        .await
        .map_err(|e| anyhow::anyhow!("read ir_attachment from the restored server: {e:#}"))?;
    let mut databases: Vec<&str> = attachments.iter().map(|a| a.database.as_str()).collect();
    databases.dedup();
    say(&format!(
        "pgrestore: filestore: {} attachments in {} database(s) reference stored files; \
         fetching them into {}",
        attachments.len(),
        databases.len(),
        dir.display()
    ));
    match pitr_agent::filestore::restore_files(repo, &attachments, dir).await {
        Ok(report) => {
            say(&format!(
                "pgrestore: filestore: restored {} files ({}) in {:.1}s, each checked against \
                 its SHA-1",
                report.files,
                report::bytes(report.bytes),
                started.elapsed().as_secs_f64()
            ));
            for m in &report.missing {
                eprintln!("pgrestore: error: {m}");
            }
            if !report.missing.is_empty() {
                eprintln!(
                    "pgrestore: error: the databases are restored, but {} attachment file(s) are \
                     missing from the restored filestore {}: Odoo shows them as broken. Check \
                     that filestore-sync runs (pitr_filestore_last_sync), or restore to an \
                     earlier target",
                    report.missing.len(),
                    dir.display()
                );
            }
            Ok(report)
        }
        Err(e) => {
            files::clean(dir, existed);
            Err(anyhow::Error::new(e).context(format!(
                "restore the filestore into {} (it was left {})",
                dir.display(),
                if existed { "empty" } else { "absent" }
            )))
        }
    }
}

async fn restore_files(
    repo: &pitr_agent::repository::Repository,
    plan: &RestorePlan,
    dir: &Path,
    existed: bool,
    args: &RestoreArgs,
) -> anyhow::Result<extract::ExtractStats> {
    let total = files::backup_data_bytes(plan);
    let bar = (!args.quiet && !args.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} restoring {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut next_line = total / 4;
    let plain = !args.quiet && !args.json && bar.is_none();
    // With --start, PostgreSQL itself syncs the whole data directory before
    // recovery begins (the backup's pg_control says it was not shut down
    // cleanly, so startup runs SyncDataDirectory): a second pass would only
    // cost time. Otherwise one filesystem sync instead of an fsync per file.
    let stats = files::restore_backup(repo, plan, dir, existed, !args.start, |stored, _raw| {
        if let Some(bar) = &bar {
            bar.set_position(stored);
        } else if plain && stored >= next_line && total > 0 {
            eprintln!(
                "pgrestore: {}% of the backup restored",
                stored * 100 / total.max(1)
            );
            next_line = stored + total / 4;
        }
    })
    .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(stats)
}

fn plan_text(
    plan: &RestorePlan,
    target: &RecoveryTarget,
    action: TargetAction,
    dir: &Path,
    asked: TargetTimeline,
) -> String {
    let b = &plan.backup;
    let mut out = format!(
        "pgrestore plan:\n  target:    {target}, timeline {} (--target-timeline {asked}, ends on timeline {}), then {}{}\n  \
         backup:    {} (ended {}, {} stored, PostgreSQL {}, LSN {}..{})\n",
        plan.target_timeline,
        plan.timeline,
        action.as_str(),
        if action == TargetAction::Pause {
            " (the default: inspect, then SELECT pg_wal_replay_resume() to promote)"
        } else {
            ""
        },
        b.id,
        humantime::format_rfc3339_seconds(b.stop_time),
        report::bytes(plan.backup_bytes),
        b.pg_version / 10_000,
        b.start_lsn,
        b.stop_lsn
    );
    match (&plan.wal_first, &plan.wal_last) {
        (Some(first), Some(last)) => out.push_str(&format!(
            "  WAL:       {first}..{last} ({} segments, {} from the archive)\n",
            plan.wal_segments,
            report::bytes(plan.wal_bytes)
        )),
        _ => out.push_str("  WAL:       only what the backup carries\n"),
    }
    out.push_str(&format!(
        "  to fetch:  {}\n",
        report::bytes(plan.backup_bytes + plan.wal_bytes)
    ));
    out.push_str(&format!(
        "  disk:      about {} needed in {}\n",
        report::bytes(plan.disk_needed),
        dir.display()
    ));
    if let Some(w) = &plan.window {
        out.push_str(&format!(
            "  window:    {} .. {}\n",
            humantime::format_rfc3339_seconds(w.start),
            humantime::format_rfc3339_seconds(w.end)
        ));
    }
    out.push_str(&format!("  into:      {}\n", dir.display()));
    for note in &plan.notes {
        out.push_str(&format!("  note:      {note}\n"));
    }
    out.trim_end().to_owned()
}
