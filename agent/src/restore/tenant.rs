//! One database (an Odoo tenant) back to a point in time, into the live
//! cluster, beside or in place of the live one, without touching the others.
//!
//! PostgreSQL restores physical backups and replays WAL for a whole cluster:
//! one database cannot be recovered on its own, because every database
//! shares one WAL stream, one transaction log (`pg_xact`) and one set of
//! shared catalogs. So the cluster is recovered to T in a scratch directory,
//! on a private socket with `archive_mode = off`, and the database is copied
//! out of it with `pg_dump | pg_restore` into the live cluster.
//!
//! Only the tenant's files are extracted where the backup says which
//! `base/<oid>/` is whose (`databases.json`): the other databases' files
//! become sparse stand-ins of their size, so replay can write into them (as
//! pgBackRest's `--db-include` does), and those databases are never read.
//! The `postgres` database is kept, to watch recovery. If the tenant's OID at
//! T differs from the one in the backup (it was dropped and created again
//! since, perhaps from a template that was skipped), the scratch cluster is
//! thrown away and everything is restored.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use rand::Rng as _;
use serde::Serialize;

use crate::catalog::backup::{BackupId, DATABASES_FILE, DatabaseFiles};
use crate::cli::RepoArgs;
use crate::pgconn::PgTarget;
use crate::rehearse::{RemoveOnDrop, Scratch, free_port, rehearsal_settings};
use crate::repository::Repository;
use crate::restore::files;
use crate::restore::plan::{PlanRequest, RestorePlan, plan_restore};
use crate::restore::recovery::{Reached, RecoveryConfig, StartConfig, start_and_wait};
use crate::restore::target::{RecoveryTarget, TargetAction, TargetTimeline};

/// What to restore, and where.
#[derive(Debug, Clone)]
pub struct TenantRequest {
    /// The database.
    pub database: String,
    /// The point.
    pub target: RecoveryTarget,
    /// The timeline to follow.
    pub timeline: TargetTimeline,
    /// Stop just before the target.
    pub exclusive: bool,
    /// The backup to start from, instead of the one the plan picks.
    pub backup: Option<BackupId>,
    /// Go on when the target lies beyond the newest archived WAL.
    pub allow_incomplete: bool,
    /// The restored database's name (`--as`).
    pub new_name: Option<String>,
    /// Swap it in place of the live one.
    pub replace: bool,
    /// Deactivate outgoing mail, scheduled actions and mail fetchers.
    pub neutralize: bool,
    /// Restore the tenant's filestore into `<dir>/<final name>`.
    pub filestore: Option<PathBuf>,
    /// Where the scratch cluster is made.
    pub scratch_parent: PathBuf,
    /// The live cluster (its `database` is where the control connection goes).
    pub live: PgTarget,
    /// The `pitr-agent` for the scratch cluster's `restore_command`.
    pub agent: PathBuf,
    /// How long replay may take.
    pub timeout: Duration,
    /// Plan only.
    pub dry_run: bool,
}

/// The plan, printed before anything is written.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TenantPlan {
    /// The database restored.
    pub database: String,
    /// Its name in the live cluster once copied.
    pub restored_as: String,
    /// With `--replace`: what the live database is renamed to.
    pub live_renamed_to: Option<String>,
    /// The cluster restore underneath.
    pub restore: RestorePlan,
    /// Only the tenant's files (and `postgres`) are extracted.
    pub only_its_files: bool,
    /// Why everything is extracted, when it is.
    pub why_everything: Option<String>,
    /// The tenant's size in the backup, when the backup says.
    pub tenant_bytes: Option<u64>,
    /// What is not extracted (other databases' files).
    pub skipped_bytes: u64,
    /// Scratch space needed.
    pub scratch_needed: u64,
    /// The scratch directory's parent.
    pub scratch: PathBuf,
}

/// What the restore did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TenantOutcome {
    /// The plan.
    pub plan: TenantPlan,
    /// Where recovery of the scratch cluster stopped.
    pub reached: Option<Reached>,
    /// The database now holding the tenant at T.
    pub restored_as: Option<String>,
    /// With `--replace`: the live database's new name.
    pub live_renamed_to: Option<String>,
    /// `--neutralize`: what was deactivated.
    pub neutralized: Vec<String>,
    /// `--neutralize`: tables that do not exist, skipped.
    pub neutralize_skipped: Vec<String>,
    /// `--filestore`.
    pub filestore: Option<crate::filestore::RestoreReport>,
    /// Seconds per phase: scratch restore and replay, copy, the rest.
    pub seconds: Phases,
}

/// Seconds per phase.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Phases {
    /// Extract into the scratch directory.
    pub extract: f64,
    /// Replay to the target.
    pub replay: f64,
    /// `pg_dump | pg_restore`.
    pub copy: f64,
    /// Everything.
    pub total: f64,
}

/// The database this run created in the live cluster and has not finished:
/// dropped if the run fails or is interrupted.
pub type Unfinished = Arc<Mutex<Option<String>>>;

/// The longest database name PostgreSQL keeps (NAMEDATALEN - 1).
const MAX_NAME: usize = 63;

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn stamp() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%S").to_string()
}

fn set(unfinished: &Unfinished, value: Option<String>) {
    *unfinished
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = value;
}

async fn exec(client: &tokio_postgres::Client, what: &str, sql: &str) -> anyhow::Result<()> {
    client
        .batch_execute(sql)
        .await
        .map_err(|e| anyhow!("{what}: {}", crate::pgconn::error_text(&e)))
}

/// Plans, and unless `dry_run`, restores the tenant. `unfinished` names the
/// database this run created until it is complete, so that a caller that
/// drops this future (SIGTERM) can drop it ([`drop_unfinished`]).
///
/// # Errors
/// Anything that stops the restore, said once with what to do; a database
/// created by this run is dropped first (or named in the error).
pub async fn restore_tenant(
    repo: &Repository,
    repo_args: &RepoArgs,
    req: &TenantRequest,
    say: &(dyn Fn(&str) + Sync),
    unfinished: &Unfinished,
) -> anyhow::Result<TenantOutcome> {
    let started = Instant::now();
    let name = &req.database;
    if name.is_empty() {
        bail!("--database needs a name");
    }
    let stamp = stamp();
    let restored_as = req
        .new_name
        .clone()
        .unwrap_or_else(|| format!("{name}_restored_{stamp}"));
    let renamed_to = req.replace.then(|| format!("{name}_before_{stamp}"));
    for n in std::iter::once(&restored_as).chain(renamed_to.as_ref()) {
        if n.len() > MAX_NAME {
            bail!(
                "the name {n:?} is longer than PostgreSQL's {MAX_NAME} bytes: choose a shorter \
                 one with --as NEWNAME"
            );
        }
    }
    if req.replace && req.new_name.is_some() {
        bail!("--replace puts the restored database under its own name: drop --as");
    }

    let live = req
        .live
        .connect("pgrestore --database")
        .await
        .context("the live cluster")?;
    let row = live
        .query_one(
            "SELECT rolsuper, current_setting('server_version_num')::int \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| anyhow!("the live cluster: {}", crate::pgconn::error_text(&e)))?;
    let (superuser, live_version): (bool, i32) = (row.get(0), row.get(1));
    if !superuser {
        bail!(
            "{} is not a superuser of the live cluster ({}): pgrestore --database creates a \
             database owned by the tenant's roles and, with --replace, ends its sessions; connect \
             as a superuser (PGUSER)",
            req.live.user,
            req.live.describe()
        );
    }
    let exists = |db: String| {
        let live = &live;
        async move {
            live.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
                .await
                .map(|r| r.is_some())
                .map_err(|e| anyhow!("the live cluster: {}", crate::pgconn::error_text(&e)))
        }
    };
    if exists(restored_as.clone()).await? {
        bail!(
            "database {restored_as} already exists in the live cluster ({}); nothing was \
             changed: choose another name with --as NEWNAME",
            req.live.describe()
        );
    }
    if req.replace {
        if !exists(name.clone()).await? {
            bail!(
                "--replace: database {name} does not exist in the live cluster ({}), so there is \
                 nothing to replace; drop --replace to restore it as {restored_as}",
                req.live.describe()
            );
        }
        if let Some(r) = &renamed_to
            && exists(r.clone()).await?
        {
            bail!("database {r} already exists in the live cluster; run again in a second");
        }
    }
    if let Some(dir) = &req.filestore {
        let dest = dir.join(renamed_to.as_ref().map_or(&restored_as, |_| name));
        if crate::restore::check_target_dir(&dest).is_err() {
            bail!(
                "--filestore: {} is not empty; the tenant's files go to <DIR>/<its name>: give a \
                 new directory (and swap it in after the restore)",
                dest.display()
            );
        }
    }

    let mut catalog = crate::catalog::backup::Catalog::load(&repo.storage)
        .await
        .with_context(|| format!("read the catalog of {}", repo.url))?;
    let (histories, _) = catalog.histories(&repo.storage).await?;
    let index = catalog.wal_index(histories);
    crate::archive::summary::resolve_archive_end(repo, &mut catalog, &index).await?;
    let plan_req = PlanRequest {
        target: req.target.clone(),
        timeline: req.timeline,
        backup: req.backup.clone(),
        allow_incomplete: req.allow_incomplete,
    };
    let restore_plan = plan_restore(repo, &catalog, &index, &plan_req).await?;
    let databases = backup_databases(repo, &restore_plan.backup.id).await;
    let (skip, why_everything, tenant) = match &databases {
        Err(why) => (HashSet::new(), Some(why.clone()), None),
        Ok(list) => match list.iter().find(|d| &d.name == name) {
            None => (
                HashSet::new(),
                Some(format!(
                    "{name} did not exist when backup {} started (created later?)",
                    restore_plan.backup.id
                )),
                None,
            ),
            Some(t) => (
                list.iter()
                    .filter(|d| d.name != *name && d.name != "postgres")
                    .map(|d| d.oid)
                    .collect(),
                None,
                Some(t.clone()),
            ),
        },
    };
    let skipped_bytes: u64 = databases.as_ref().map_or(0, |list| {
        list.iter()
            .filter(|d| skip.contains(&d.oid))
            .map(|d| d.bytes)
            .sum()
    });
    let plan = TenantPlan {
        database: name.clone(),
        restored_as: restored_as.clone(),
        live_renamed_to: renamed_to.clone(),
        only_its_files: !skip.is_empty(),
        why_everything,
        tenant_bytes: tenant.as_ref().map(|t| t.bytes),
        skipped_bytes,
        scratch_needed: restore_plan.disk_needed.saturating_sub(skipped_bytes),
        scratch: req.scratch_parent.clone(),
        restore: restore_plan,
    };
    say(&plan_text(&plan, &req.target));
    files::check_free_space(&req.scratch_parent, plan.scratch_needed)
        .context("--scratch (PITR_SCRATCH) has too little free space for the scratch cluster")?;
    let mut outcome = TenantOutcome {
        plan,
        reached: None,
        restored_as: None,
        live_renamed_to: None,
        neutralized: Vec::new(),
        neutralize_skipped: Vec::new(),
        filestore: None,
        seconds: Phases::default(),
    };
    if req.dry_run {
        return Ok(outcome);
    }

    // The scratch cluster at T; again with every file if the tenant turns
    // out to be another database than the one the backup knew.
    let mut skip = skip;
    let scratch = loop {
        let restore_plan = outcome.plan.restore.clone();
        let s = start_scratch(repo, repo_args, req, &restore_plan, &skip, &mut outcome).await?;
        let Some(oid) = s.tenant_oid(name).await? else {
            bail!(
                "database {name} did not exist at the target {} (the restored cluster has no such \
                 database): choose a target when it existed; `pgrestore list` shows the window",
                req.target
            );
        };
        match &tenant {
            Some(t) if !skip.is_empty() && t.oid != oid => {
                say(&format!(
                    "pgrestore: {name} at the target is not the database the backup held (OID \
                     {oid}, not {}): it was created again since; restoring every database",
                    t.oid
                ));
                drop(s);
                skip.clear();
                outcome.plan.only_its_files = false;
                outcome.plan.why_everything =
                    Some(format!("{name} was created again after the backup"));
            }
            _ => break s,
        }
    };

    // Roles, before anything is created in the live cluster.
    let source = scratch.connect(name).await?;
    let facts = DatabaseFacts::read(&source, name).await?;
    let live_roles: HashSet<String> = live
        .query("SELECT rolname FROM pg_roles", &[])
        .await
        .map_err(|e| anyhow!("the live cluster: {}", crate::pgconn::error_text(&e)))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut missing: Vec<&String> = facts
        .roles
        .iter()
        .filter(|r| !live_roles.contains(*r))
        .collect();
    missing.sort();
    if !missing.is_empty() {
        let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
        bail!(
            "the restored {name} needs roles the live cluster lacks: {}. Nothing was created: \
             create them first (CREATE ROLE ...; pg_dumpall --roles-only from the scratch \
             cluster shows their attributes), then run again",
            names.join(", ")
        );
    }

    let live_pg = &req.live;
    let result = async {
        set(unfinished, Some(restored_as.clone()));
        exec(&live, &format!("create database {restored_as}"), &facts.create_sql(&restored_as, live_version))
            .await?;
        say(&format!(
            "pgrestore: created {restored_as} (no connections but this run's until it is complete); copying {name} into it"
        ));
        let clock = Instant::now();
        copy(req, &scratch, name, live_pg, &restored_as, outcome.plan.restore.backup.pg_version / 10_000).await?;
        outcome.seconds.copy = clock.elapsed().as_secs_f64();
        for statement in facts.settings_sql(&restored_as) {
            exec(&live, "copy the database's settings", &statement).await?;
        }
        if req.neutralize {
            let (done, skipped) = neutralize(live_pg, &restored_as).await?;
            outcome.neutralized = done;
            outcome.neutralize_skipped = skipped;
        }
        if let Some(dir) = &req.filestore {
            let atts = crate::filestore::attachments_of(&scratch.target(), name).await?;
            let final_name = if req.replace { name } else { &restored_as };
            let report =
                crate::filestore::restore_files_as(repo, &atts, dir, Some(final_name)).await?;
            outcome.filestore = Some(report);
        }
        exec(
            &live,
            "open the restored database",
            &format!(
                "ALTER DATABASE {} CONNECTION LIMIT {}",
                ident(&restored_as),
                facts.connection_limit
            ),
        )
        .await?;
        anyhow::Ok(())
    }
    .await;
    drop(source);
    drop(scratch);
    if let Err(e) = result {
        return Err(match drop_unfinished(live_pg, unfinished).await {
            Ok(Some(dropped)) => e.context(format!("{dropped} (created by this run) was dropped")),
            Ok(None) => e,
            Err(d) => e.context(format!("{d}")),
        });
    }
    set(unfinished, None);
    outcome.restored_as = Some(restored_as.clone());
    if let Some(before) = &renamed_to {
        swap(&live, name, &restored_as, before).await?;
        outcome.restored_as = Some(name.clone());
        outcome.live_renamed_to = Some(before.clone());
    }
    outcome.seconds.total = started.elapsed().as_secs_f64();
    Ok(outcome)
}

/// Drops the database `unfinished` names, if any: `Ok(Some(name))` once
/// dropped.
///
/// # Errors
/// It could not be dropped; the error names it, for the operator.
pub async fn drop_unfinished(
    live: &PgTarget,
    unfinished: &Unfinished,
) -> anyhow::Result<Option<String>> {
    let Some(db) = unfinished
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    else {
        return Ok(None);
    };
    let result = async {
        let client = live.connect("pgrestore --database cleanup").await?;
        let version: i32 = client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await?
            .get(0);
        let force = if version >= 130_000 {
            " WITH (FORCE)"
        } else {
            ""
        };
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {}{force}", ident(&db)))
            .await?;
        anyhow::Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok(Some(db)),
        Err(e) => Err(anyhow!(
            "the half-copied database {db} (created by this run) could not be dropped ({e:#}): \
             drop it by hand (DROP DATABASE \"{db}\"); it is incomplete"
        )),
    }
}

/// `databases.json` of a backup, or why it cannot be used.
async fn backup_databases(repo: &Repository, id: &BackupId) -> Result<Vec<DatabaseFiles>, String> {
    match repo.storage.get(&id.key(DATABASES_FILE)).await {
        Ok(body) => serde_json::from_slice(&body)
            .map_err(|e| format!("backup {id}'s {DATABASES_FILE} cannot be read ({e})")),
        Err(e) if e.is_not_found() => Err(format!(
            "backup {id} does not say which files are whose (taken before {DATABASES_FILE})"
        )),
        Err(e) => Err(format!("backup {id}'s {DATABASES_FILE}: {e}")),
    }
}

fn plan_text(plan: &TenantPlan, target: &RecoveryTarget) -> String {
    use std::fmt::Write as _;
    let b = crate::report::bytes;
    let mut out = String::new();
    let r = &plan.restore;
    let _ = writeln!(
        out,
        "pgrestore: restore database {} to {target} into the live cluster as {}",
        plan.database, plan.restored_as
    );
    let _ = writeln!(
        out,
        "  backup {} (PostgreSQL {}, {} stored), then {}",
        r.backup.id,
        r.backup.pg_version / 10_000,
        b(r.backup_bytes),
        match (&r.wal_first, &r.wal_last) {
            (Some(first), Some(last)) => format!(
                "WAL {first}..{last} ({} segments, {})",
                r.wal_segments,
                b(r.wal_bytes)
            ),
            _ => "only the WAL the backup carries".to_owned(),
        }
    );
    for note in &r.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    match (&plan.why_everything, plan.tenant_bytes) {
        (None, Some(t)) => {
            let _ = writeln!(
                out,
                "  scratch cluster: about {} needed ({} for {} at the backup); the other \
                 databases' {} are not extracted",
                b(plan.scratch_needed),
                b(t),
                plan.database,
                b(plan.skipped_bytes)
            );
        }
        (why, _) => {
            let _ = writeln!(
                out,
                "  scratch cluster: every database, about {} needed ({})",
                b(plan.scratch_needed),
                why.as_deref().unwrap_or("")
            );
        }
    }
    let _ = writeln!(out, "  scratch space under {}", plan.scratch.display());
    if let Some(before) = &plan.live_renamed_to {
        let _ = writeln!(
            out,
            "  --replace: the live {} becomes {before}, the restored one takes its name; nothing \
             is dropped",
            plan.database
        );
    }
    out.pop();
    out
}

/// The scratch cluster, stopped and removed when dropped.
struct ScratchCluster {
    _scratch: Scratch,
    _socket: RemoveOnDrop,
    socket: PathBuf,
    port: u16,
    user: String,
}

impl ScratchCluster {
    fn target(&self) -> PgTarget {
        PgTarget {
            host: self.socket.display().to_string(),
            port: self.port,
            user: self.user.clone(),
            database: "postgres".to_owned(),
            bin: None,
            service_password: None,
        }
    }

    async fn connect(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        let mut t = self.target();
        db.clone_into(&mut t.database);
        Ok(t.connect("pgrestore --database").await?)
    }

    async fn tenant_oid(&self, name: &str) -> anyhow::Result<Option<u32>> {
        let client = self.connect("postgres").await?;
        let row = client
            .query_opt(
                "SELECT oid::bigint FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .await?;
        Ok(row.and_then(|r| u32::try_from(r.get::<_, i64>(0)).ok()))
    }
}

async fn start_scratch(
    repo: &Repository,
    repo_args: &RepoArgs,
    req: &TenantRequest,
    plan: &RestorePlan,
    skip: &HashSet<u32>,
    outcome: &mut TenantOutcome,
) -> anyhow::Result<ScratchCluster> {
    let major = plan.backup.pg_version / 10_000;
    let pg_ctl = req.live.program("pg_ctl", major)?;
    std::fs::create_dir_all(&req.scratch_parent)
        .with_context(|| format!("create {}", req.scratch_parent.display()))?;
    let unique = format!("{}-{}", std::process::id(), rand::rng().random::<u32>());
    let dir = req.scratch_parent.join(format!("pitr-tenant-{unique}"));
    std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut scratch = Scratch { dir, pg_ctl: None };
    let socket = std::env::temp_dir().join(format!("pitr-tn-{unique}"));
    std::fs::create_dir(&socket).with_context(|| format!("create {}", socket.display()))?;
    let socket_guard = RemoveOnDrop(socket.clone());
    let data = scratch.dir.join("data");
    let clock = Instant::now();
    files::restore_backup_skipping(repo, plan, &data, false, false, skip, |_, _| {})
        .await
        .context("restore the scratch cluster")?;
    outcome.seconds.extract = clock.elapsed().as_secs_f64();
    RecoveryConfig {
        restore_command: files::restore_command(&req.agent, repo_args),
        target: plan.recover_to.clone(),
        timeline: plan.target_timeline.clone(),
        action: TargetAction::Promote,
        exclusive: req.exclusive,
        new_primary: false,
    }
    .write(
        &data,
        "added by pgrestore --database for its scratch cluster",
    )
    .context("write the scratch cluster's recovery settings")?;
    // The backup's pg_hba.conf may ask for passwords; the socket directory
    // is private to this run, so the scratch cluster trusts it.
    let hba = scratch.dir.join("pg_hba.conf");
    std::fs::write(&hba, "local all all trust\n")
        .with_context(|| format!("write {}", hba.display()))?;
    let mut settings = rehearsal_settings();
    settings.push(("hba_file".to_owned(), hba.display().to_string()));
    let port = free_port();
    let start = StartConfig {
        pg_ctl: pg_ctl.clone(),
        port,
        socket_dir: socket.clone(),
        user: req.live.user.clone(),
        timeout: req.timeout,
        env: {
            let mut env = vec![("PITR_REPO".to_owned(), repo.url.clone())];
            env.extend(repo_args.child_env());
            env
        },
        action: TargetAction::Promote,
        settings,
        target: plan.recover_to.clone(),
    };
    scratch.pg_ctl = Some(pg_ctl);
    let clock = Instant::now();
    let reached = start_and_wait(&data, &start)
        .await
        .context("recover the scratch cluster")?;
    outcome.seconds.replay = clock.elapsed().as_secs_f64();
    files::check_replay_end(plan, &reached).map_err(|e| anyhow!("{e}"))?;
    outcome.reached = Some(Reached {
        log: String::new(),
        ..reached
    });
    Ok(ScratchCluster {
        _scratch: scratch,
        _socket: socket_guard,
        socket,
        port,
        user: req.live.user.clone(),
    })
}

/// What the copy needs to know about the tenant, read in the scratch
/// cluster.
struct DatabaseFacts {
    owner: String,
    encoding: String,
    collate: String,
    ctype: String,
    locale_provider: Option<String>,
    icu_locale: Option<String>,
    connection_limit: i32,
    /// Every role the database's objects and privileges name.
    roles: HashSet<String>,
    /// `ALTER [ROLE r IN] DATABASE SET` entries: (role, name=value).
    settings: Vec<(Option<String>, String)>,
}

impl DatabaseFacts {
    async fn read(client: &tokio_postgres::Client, name: &str) -> anyhow::Result<Self> {
        let row = client
            .query_one(
                "SELECT (to_jsonb(d) || jsonb_build_object('owner', pg_get_userbyid(d.datdba), \
                 'encoding-name', pg_encoding_to_char(d.encoding)))::text \
                 FROM pg_database d WHERE datname = $1",
                &[&name],
            )
            .await?;
        let doc: serde_json::Value = serde_json::from_str(row.get::<_, &str>(0))?;
        let text = |k: &str| doc[k].as_str().map(str::to_owned);
        let roles = client
            .query(
                "SELECT DISTINCT pg_get_userbyid(refobjid) FROM pg_shdepend \
                 WHERE refclassid = 'pg_authid'::regclass \
                 AND dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
                &[&name],
            )
            .await?
            .iter()
            .map(|r| r.get::<_, String>(0))
            .chain(text("owner"))
            .collect();
        let settings = client
            .query(
                "SELECT r.rolname, unnest(s.setconfig) FROM pg_db_role_setting s \
                 LEFT JOIN pg_roles r ON r.oid = s.setrole \
                 WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = $1)",
                &[&name],
            )
            .await?
            .iter()
            .map(|r| (r.get::<_, Option<String>>(0), r.get::<_, String>(1)))
            .collect();
        Ok(Self {
            owner: text("owner").ok_or_else(|| anyhow!("{name} has no owner"))?,
            encoding: text("encoding-name").unwrap_or_else(|| "UTF8".to_owned()),
            collate: text("datcollate").unwrap_or_default(),
            ctype: text("datctype").unwrap_or_default(),
            locale_provider: text("datlocprovider"),
            icu_locale: text("daticulocale").or_else(|| text("datlocale")),
            connection_limit: doc["datconnlimit"]
                .as_i64()
                .and_then(|v| i32::try_from(v).ok())
                .unwrap_or(-1),
            roles,
            settings,
        })
    }

    /// `CREATE DATABASE` for the copy: the tenant's owner, encoding and
    /// locale, from template0, closed to everyone but superusers.
    fn create_sql(&self, new_name: &str, live_version: i32) -> String {
        let mut sql = format!(
            "CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}",
            ident(new_name),
            ident(&self.owner),
            literal(&self.encoding),
            literal(&self.collate),
            literal(&self.ctype)
        );
        if live_version >= 150_000
            && let Some(p) = &self.locale_provider
        {
            match p.as_str() {
                "i" => {
                    sql.push_str(" LOCALE_PROVIDER icu");
                    if let Some(l) = &self.icu_locale {
                        sql.push_str(&format!(" ICU_LOCALE {}", literal(l)));
                    }
                }
                "b" => {
                    sql.push_str(" LOCALE_PROVIDER builtin");
                    if let Some(l) = &self.icu_locale {
                        sql.push_str(&format!(" BUILTIN_LOCALE {}", literal(l)));
                    }
                }
                _ => sql.push_str(" LOCALE_PROVIDER libc"),
            }
        }
        sql.push_str(" CONNECTION LIMIT 0");
        sql
    }

    fn settings_sql(&self, new_name: &str) -> Vec<String> {
        self.settings
            .iter()
            .filter_map(|(role, entry)| {
                let (k, v) = entry.split_once('=')?;
                let scope = role
                    .as_ref()
                    .map_or(String::new(), |r| format!("ROLE {} IN ", ident(r)));
                Some(format!(
                    "ALTER {scope}DATABASE {} SET {} TO {}",
                    ident(new_name),
                    ident(k),
                    setting_value(k, v)
                ))
            })
            .collect()
    }
}

/// A stored setting's value as SQL: list settings (as `pg_dump` knows them)
/// element by element, each element unquoted from its identifier form.
fn setting_value(name: &str, value: &str) -> String {
    const LISTS: [&str; 4] = [
        "search_path",
        "temp_tablespaces",
        "session_preload_libraries",
        "local_preload_libraries",
    ];
    if !LISTS.contains(&name.to_ascii_lowercase().as_str()) {
        return literal(value);
    }
    value
        .split(',')
        .map(|e| {
            let e = e.trim();
            let e = e
                .strip_prefix('"')
                .and_then(|e| e.strip_suffix('"'))
                .map_or_else(|| e.to_owned(), |e| e.replace("\"\"", "\""));
            literal(&e)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `pg_dump -Fc` of the scratch cluster's tenant streamed into `pg_restore`
/// against the live cluster: a pipe between them, no file.
async fn copy(
    req: &TenantRequest,
    scratch: &ScratchCluster,
    name: &str,
    live: &PgTarget,
    new_name: &str,
    major: u32,
) -> anyhow::Result<()> {
    use std::process::Stdio;
    let pg_dump = req.live.program("pg_dump", major)?;
    let pg_restore = req.live.program("pg_restore", major)?;
    let mut dump = tokio::process::Command::new(&pg_dump);
    dump.args(["-Fc", "--no-password", "-h"])
        .arg(&scratch.socket)
        .args([
            "-p",
            &scratch.port.to_string(),
            "-U",
            &scratch.user,
            "-d",
            name,
        ])
        .env_remove("PGSERVICE")
        .env_remove("PGPASSWORD")
        .env_remove("PGOPTIONS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut dump = dump
        .spawn()
        .with_context(|| format!("run {}", pg_dump.display()))?;
    let pipe: Stdio = dump
        .stdout
        .take()
        .ok_or_else(|| anyhow!("pg_dump has no stdout"))?
        .try_into()
        .context("connect pg_dump to pg_restore")?;
    let mut restore = tokio::process::Command::new(&pg_restore);
    live.configure_child(&mut restore);
    if let Some(p) = live.password(new_name) {
        restore.env("PGPASSWORD", p);
    }
    restore
        .args(["--exit-on-error", "--no-password", "-d", new_name])
        .env_remove("PGOPTIONS")
        .stdin(pipe)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let restore = restore
        .spawn()
        .with_context(|| format!("run {}", pg_restore.display()))?;
    let (dumped, restored) = tokio::join!(dump.wait_with_output(), restore.wait_with_output());
    let dumped = dumped.context("pg_dump")?;
    let restored = restored.context("pg_restore")?;
    let tail = |b: &[u8]| {
        let text = String::from_utf8_lossy(b);
        let lines: Vec<&str> = text.lines().rev().take(6).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n  ")
    };
    if !dumped.status.success() {
        bail!(
            "pg_dump of {name} from the scratch cluster failed ({}):\n  {}",
            dumped.status,
            tail(&dumped.stderr)
        );
    }
    if !restored.status.success() {
        bail!(
            "pg_restore into {new_name} on the live cluster failed ({}):\n  {}",
            restored.status,
            tail(&restored.stderr)
        );
    }
    Ok(())
}

/// What Odoo's `neutralize` does for the parts that reach the outside
/// world: outgoing mail servers, scheduled actions (but the database's own
/// autovacuum job) and incoming mail fetchers are deactivated, and the
/// database is marked neutralized. Tables that do not exist are skipped.
async fn neutralize(live: &PgTarget, db: &str) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut t = live.clone();
    db.clone_into(&mut t.database);
    let mut client = t.connect("pgrestore --neutralize").await?;
    let tx = client.transaction().await?;
    let mut done = Vec::new();
    let mut skipped = Vec::new();
    let has = |table: &'static str| {
        let tx = &tx;
        async move {
            tx.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
                .await
                .map(|r| r.get::<_, bool>(0))
        }
    };
    for (table, sql) in [
        (
            "ir_mail_server",
            "UPDATE ir_mail_server SET active = false WHERE active",
        ),
        (
            "fetchmail_server",
            "UPDATE fetchmail_server SET active = false WHERE active",
        ),
    ] {
        if has(table).await? {
            let n = tx.execute(sql, &[]).await?;
            done.push(format!("{table}: {n} deactivated"));
        } else {
            skipped.push(table.to_owned());
        }
    }
    if has("ir_cron").await? {
        let keep = if has("ir_model_data").await? {
            " AND id NOT IN (SELECT res_id FROM ir_model_data WHERE model = 'ir.cron' \
             AND module = 'base' AND name = 'autovacuum_job')"
        } else {
            ""
        };
        let n = tx
            .execute(
                &format!("UPDATE ir_cron SET active = false WHERE active{keep}"),
                &[],
            )
            .await?;
        done.push(format!("ir_cron: {n} deactivated"));
    } else {
        skipped.push("ir_cron".to_owned());
    }
    if has("ir_config_parameter").await? {
        let n = tx
            .execute(
                "UPDATE ir_config_parameter SET value = 'true' WHERE key = 'database.is_neutralized'",
                &[],
            )
            .await?;
        if n == 0 {
            tx.execute(
                "INSERT INTO ir_config_parameter (key, value) VALUES ('database.is_neutralized', 'true')",
                &[],
            )
            .await?;
        }
        done.push("ir_config_parameter: database.is_neutralized = true".to_owned());
    } else {
        skipped.push("ir_config_parameter".to_owned());
    }
    tx.commit().await?;
    Ok((done, skipped))
}

/// `--replace`: close the live database to new sessions, end its sessions,
/// then rename both in one transaction. Nothing is dropped.
async fn swap(
    live: &tokio_postgres::Client,
    name: &str,
    restored: &str,
    before: &str,
) -> anyhow::Result<()> {
    let q = |e: tokio_postgres::Error| anyhow!("{}", crate::pgconn::error_text(&e));
    live.batch_execute(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS false",
        ident(name)
    ))
    .await
    .map_err(q)?;
    let mut last = String::new();
    for _ in 0..50 {
        live.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await
        .map_err(q)?;
        let renamed = live
            .batch_execute(&format!(
                "BEGIN; ALTER DATABASE {n} RENAME TO {b}; ALTER DATABASE {r} RENAME TO {n}; COMMIT",
                n = ident(name),
                b = ident(before),
                r = ident(restored)
            ))
            .await;
        match renamed {
            Ok(()) => return Ok(()),
            Err(e) => {
                let _ = live.batch_execute("ROLLBACK").await;
                last = crate::pgconn::error_text(&e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let _ = live
        .batch_execute(&format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            ident(name)
        ))
        .await;
    bail!(
        "--replace: {name} could not be renamed ({last}); it is open again and unchanged, and \
         the restored copy stays as {restored}: stop what keeps connecting to {name} (scale its \
         Odoo to 0), then rename by hand"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> DatabaseFacts {
        DatabaseFacts {
            owner: "odoo \"admin\"".to_owned(),
            encoding: "UTF8".to_owned(),
            collate: "C.UTF-8".to_owned(),
            ctype: "it's".to_owned(),
            locale_provider: Some("i".to_owned()),
            icu_locale: Some("und".to_owned()),
            connection_limit: 5,
            roles: HashSet::new(),
            settings: vec![
                (None, "work_mem=8MB".to_owned()),
                (
                    Some("odoo".to_owned()),
                    "search_path=\"$user\", public".to_owned(),
                ),
                (None, "not a setting".to_owned()),
            ],
        }
    }

    #[test]
    fn the_copy_is_created_closed_with_the_tenant_s_owner_and_locale() {
        let sql = facts().create_sql("b_restored_1", 170_000);
        assert_eq!(
            sql,
            "CREATE DATABASE \"b_restored_1\" OWNER \"odoo \"\"admin\"\"\" TEMPLATE template0 \
             ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'it''s' LOCALE_PROVIDER icu \
             ICU_LOCALE 'und' CONNECTION LIMIT 0"
        );
        // Before 15 there is no locale provider to name.
        assert!(!facts().create_sql("x", 140_000).contains("LOCALE_PROVIDER"));
    }

    #[test]
    fn database_settings_are_copied_per_role() {
        assert_eq!(
            facts().settings_sql("new"),
            vec![
                "ALTER DATABASE \"new\" SET \"work_mem\" TO '8MB'".to_owned(),
                "ALTER ROLE \"odoo\" IN DATABASE \"new\" SET \"search_path\" TO '$user', 'public'"
                    .to_owned(),
            ]
        );
    }
}
