//! pgrestore's flags, and the recovery target they name.

use std::path::PathBuf;

use anyhow::bail;
use std::time::Duration;

use pitr_agent::catalog::backup::BackupId;
use pitr_agent::restore::target::{RecoveryTarget, TargetAction, TargetTime, TargetTimeline};
use pitr_agent::wal::Lsn;

#[derive(Debug, clap::Args)]
pub(crate) struct RestoreArgs {
    /// The data directory to restore into; must be empty or missing.
    #[arg(long, env = "PGDATA")]
    pub(crate) pgdata: Option<PathBuf>,
    /// Recover to this time, with its UTC offset: '2026-11-21 14:30:00+00' or RFC 3339.
    #[arg(long)]
    pub(crate) target_time: Option<String>,
    /// Read a --target-time without an offset as UTC (otherwise it is refused:
    /// at 3 a.m. in an incident, the local reading is an hour away).
    #[arg(long)]
    pub(crate) utc: bool,
    /// Recover to this WAL position, e.g. 0/16B3748.
    #[arg(long)]
    pub(crate) target_lsn: Option<Lsn>,
    /// Recover to the commit of this transaction id.
    #[arg(long, value_parser = pitr_agent::cli::parse_count::<u64>)]
    pub(crate) target_xid: Option<u64>,
    /// Recover to this restore point (pg_create_restore_point).
    #[arg(long)]
    pub(crate) target_name: Option<String>,
    /// `immediate`: recover only to the end of the backup. `latest`: recover
    /// everything archived and streamed, then promote (the node-loss restore).
    #[arg(long, value_parser = ["immediate", "latest"])]
    pub(crate) target: Option<String>,
    /// Timeline to follow: latest, current (the backup's) or a number.
    #[arg(long, default_value = "latest")]
    pub(crate) target_timeline: TargetTimeline,
    /// What PostgreSQL does at the target. `pause` (PostgreSQL's default) lets
    /// you check the data before the cluster takes writes; then promote with
    /// SELECT pg_wal_replay_resume().
    #[arg(long, value_enum, default_value_t = TargetAction::Pause)]
    pub(crate) target_action: TargetAction,
    /// Stop just before the target instead of just after it.
    #[arg(long)]
    pub(crate) exclusive: bool,
    /// The restored cluster replaces the source and goes on archiving into
    /// this repository on a new timeline (the in-place restore). Without it
    /// the restore is a copy beside a running source: archive_mode=off and
    /// no synchronous standby, so it never writes into the repository.
    #[arg(long, env = "PITR_NEW_PRIMARY")]
    pub(crate) new_primary: bool,
    /// Restore this backup instead of the one pgrestore picks.
    #[arg(long)]
    pub(crate) backup: Option<BackupId>,
    /// Print the plan and touch nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Go on when the target lies beyond the newest archived WAL.
    #[arg(long)]
    pub(crate) allow_incomplete: bool,
    /// Start PostgreSQL and wait until recovery reaches the target.
    #[arg(long)]
    pub(crate) start: bool,
    /// Restore the Odoo filestore too, into this new (or empty) directory:
    /// every file the restored databases' `ir_attachment` rows reference,
    /// as DIR/<db>/<xx>/<sha1>, each checked against its SHA-1. A missing
    /// file is named and makes the exit 1. With a target it needs --start
    /// (and an action other than shutdown) and runs once recovery reached
    /// the target; alone, it reads an already restored server given by
    /// PGHOST, PGPORT and PGUSER.
    #[arg(long, value_name = "DIR")]
    pub(crate) filestore: Option<PathBuf>,
    /// Restore only this database (an Odoo tenant) to the target, into the
    /// live cluster given by PGHOST, PGPORT, PGUSER (a superuser), PGPASSWORD
    /// or --into: the cluster is recovered in a scratch directory (--scratch)
    /// and the database copied out of it as NAME_restored_<time> (or --as).
    /// The other databases are not touched.
    #[arg(long, value_name = "NAME")]
    pub(crate) database: Option<String>,
    /// With --database: the live cluster as a libpq URL,
    /// postgresql://user:password@host:port/postgres, instead of the libpq
    /// variables.
    #[arg(long, value_name = "URL", requires = "database")]
    pub(crate) into: Option<String>,
    /// With --database: the restored database's name.
    #[arg(long = "as", value_name = "NEWNAME", requires = "database")]
    pub(crate) as_name: Option<String>,
    /// With --database: end the live database's sessions and, in one
    /// transaction, rename it to NAME_before_<time> and the restored one to
    /// NAME. Nothing is dropped.
    #[arg(long, requires = "database")]
    pub(crate) replace: bool,
    /// With --database: before anyone can connect, deactivate outgoing mail
    /// servers, scheduled actions and mail fetchers and mark the database
    /// neutralized, as Odoo's `neutralize` does (for a copy to look at or stage).
    #[arg(long, requires = "database")]
    pub(crate) neutralize: bool,
    /// With --database: where the scratch cluster is made [default: the
    /// temp directory]; it needs the plan's scratch space free.
    #[arg(long, env = "PITR_SCRATCH", value_name = "DIR")]
    pub(crate) scratch: Option<PathBuf>,
    /// Port for --start (it names the Unix socket; no TCP listener)
    /// [default: a free one, so a host that runs PostgreSQL never collides].
    #[arg(long = "port")]
    pub(crate) start_port: Option<u16>,
    /// Unix socket directory for --start [default: a new private directory
    /// under the temp directory].
    #[arg(long)]
    pub(crate) socket_dir: Option<PathBuf>,
    /// How long --start waits for recovery.
    #[arg(long, default_value = "1h", value_parser = pitr_agent::cli::parse_duration)]
    pub(crate) start_timeout: Duration,
    /// The database superuser --start connects as, to watch recovery.
    #[arg(long = "pg-user", env = "PGUSER", default_value = "postgres")]
    pub(crate) pg_user: String,
    /// Directory of the PostgreSQL server programs [default: the Debian
    /// directory of the backup's major version, else PATH].
    #[arg(long = "pg-bin", env = "PG_BIN")]
    pub(crate) pg_bin: Option<PathBuf>,
    /// The pitr-agent binary for restore_command [default: beside pgrestore, else PATH].
    #[arg(long, env = "PITR_AGENT")]
    pub(crate) agent: Option<PathBuf>,
    /// Only errors.
    #[arg(long, short)]
    pub(crate) quiet: bool,
    /// Print the plan and the outcome as JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn target_of(args: &RestoreArgs) -> anyhow::Result<RecoveryTarget> {
    Ok(if let Some(t) = &args.target_time {
        RecoveryTarget::Time(TargetTime::parse(t)?)
    } else if let Some(l) = args.target_lsn {
        RecoveryTarget::Lsn(l)
    } else if let Some(x) = args.target_xid {
        RecoveryTarget::Xid(x)
    } else if let Some(n) = &args.target_name {
        RecoveryTarget::Name(n.clone())
    } else if args.target.as_deref() == Some("latest") {
        RecoveryTarget::Latest
    } else if args.target.is_some() {
        RecoveryTarget::Immediate
    } else {
        bail!(
            "no recovery target: give one of --target-time '2026-11-21 14:30:00+00', \
             --target-lsn, --target-xid, --target-name, --target immediate or --target latest"
        )
    })
}

/// The instant `t`'s wall-clock reading denotes in the local time zone, in UTC.
pub(crate) fn local_reading(t: &TargetTime) -> Option<String> {
    use chrono::TimeZone as _;
    let naive = chrono::DateTime::from_timestamp_micros(t.micros)?.naive_utc();
    let local = chrono::Local.from_local_datetime(&naive).earliest()?;
    let micros = local.timestamp_micros();
    Some(format!(
        "{} ({} local)",
        TargetTime {
            micros,
            assumed_utc: false
        },
        local.format("%:z")
    ))
}
