//! A throwaway PostgreSQL cluster: `initdb` into a temp dir, its own Unix
//! socket and port, run as a non-root user, stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::{RunAs, user_tempdir, wait_for};

/// A PostgreSQL installation's `bin` directory.
#[derive(Debug, Clone)]
pub struct PgBin {
    /// The directory.
    pub dir: PathBuf,
    /// Major version, from `postgres --version`.
    pub major: u32,
}

impl PgBin {
    /// `PG_BIN`, else `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
    #[must_use]
    pub fn find() -> Option<Self> {
        let dir = std::env::var_os("PG_BIN")
            .map(PathBuf::from)
            .or_else(|| {
                let out = Command::new("pg_config").arg("--bindir").output().ok()?;
                out.status
                    .success()
                    .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
            })
            .or_else(|| {
                let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                    .ok()?
                    .flatten()
                    .map(|e| e.path().join("bin"))
                    .filter(|p| p.join("postgres").is_file())
                    .collect();
                dirs.sort();
                dirs.pop()
            })?;
        Self::at(dir)
    }

    /// The installation in `dir`, if it has a working `postgres`.
    #[must_use]
    pub fn at(dir: PathBuf) -> Option<Self> {
        let out = Command::new(dir.join("postgres"))
            .arg("--version")
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let major = text
            .split_whitespace()
            .find_map(|w| w.split('.').next()?.parse().ok())?;
        Some(PgBin { dir, major })
    }

    /// A program from this installation.
    #[must_use]
    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Settings for a new cluster.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// `archive_command`; archiving is off when `None`.
    pub archive_command: Option<String>,
    /// Environment for the server (and so for `archive_command`).
    pub env: Vec<(String, String)>,
    /// Extra `postgresql.conf` lines.
    pub conf: Vec<String>,
    /// Arguments for `postgres` itself (`-c name=value` outranks every
    /// configuration file), as a StatefulSet passes them.
    pub server_args: Vec<String>,
}

/// A running (or initialised) cluster.
pub struct Postgres {
    /// Binaries.
    pub bin: PgBin,
    /// The user it runs as.
    pub user: RunAs,
    /// Holds the data directory, socket and log.
    pub dir: tempfile::TempDir,
    /// The data directory.
    pub data: PathBuf,
    /// The port (names the socket).
    pub port: u16,
    env: Vec<(String, String)>,
    server_args: Vec<String>,
}

impl Postgres {
    /// Runs `initdb` and writes the configuration; does not start the server.
    #[must_use]
    pub fn init(bin: &PgBin, opts: &PgOptions) -> Self {
        let user = RunAs::test_user();
        let dir = user_tempdir(user, "pg");
        let data = dir.path().join("data");
        let pg = Postgres {
            bin: bin.clone(),
            user,
            data,
            port: crate::free_port(),
            env: opts.env.clone(),
            server_args: opts.server_args.clone(),
            dir,
        };
        pg.run_checked(
            Command::new(bin.tool("initdb"))
                .arg("-D")
                .arg(&pg.data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--data-checksums",
                ]),
        );
        let mut conf = vec![
            format!("port = {}", pg.port),
            "listen_addresses = ''".to_owned(),
            format!("unix_socket_directories = '{}'", pg.dir.path().display()),
            "wal_level = replica".to_owned(),
            "max_wal_senders = 4".to_owned(),
            "shared_buffers = 32MB".to_owned(),
            "fsync = on".to_owned(),
            "log_min_messages = warning".to_owned(),
        ];
        if let Some(cmd) = &opts.archive_command {
            conf.push("archive_mode = on".to_owned());
            conf.push(format!("archive_command = '{}'", cmd.replace('\'', "''")));
        }
        conf.extend(opts.conf.iter().cloned());
        let path = pg.data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in conf {
            text.push_str(&line);
            text.push('\n');
        }
        std::fs::write(&path, text).expect("write postgresql.auto.conf");
        pg
    }

    /// `init` then `start`.
    #[must_use]
    pub fn start_new(bin: &PgBin, opts: &PgOptions) -> Self {
        let pg = Self::init(bin, opts);
        pg.start();
        pg
    }

    /// The server log.
    #[must_use]
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server log's contents.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        let mut cmd = Command::new(self.bin.tool("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "120", "start"]);
        if !self.server_args.is_empty() {
            let quoted: Vec<String> = self
                .server_args
                .iter()
                .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
                .collect();
            cmd.arg("-o").arg(quoted.join(" "));
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.env("AWS_EC2_METADATA_DISABLED", "true");
        self.run_checked(&mut cmd);
    }

    /// Stops the server (fast shutdown), waiting for it.
    pub fn stop(&self) {
        let mut cmd = Command::new(self.bin.tool("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "120", "-m", "fast", "stop"]);
        self.run_checked(&mut cmd);
    }

    /// Runs `sql` through `psql` and returns its unaligned, tuples-only output.
    #[must_use]
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in("postgres", sql)
    }

    /// [`Postgres::sql`] in database `db`.
    #[must_use]
    pub fn sql_in(&self, db: &str, sql: &str) -> String {
        let out = self.psql_in(db, sql);
        assert!(
            out.status.success(),
            "psql failed in {db}: {sql}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs `sql` for its effect, asserting success.
    pub fn exec(&self, sql: &str) {
        let _ = self.sql(sql);
    }

    /// Runs `sql` and returns the raw output, success or not.
    #[must_use]
    pub fn psql(&self, sql: &str) -> Output {
        self.psql_in("postgres", sql)
    }

    /// [`Postgres::psql`] in database `db`.
    #[must_use]
    pub fn psql_in(&self, db: &str, sql: &str) -> Output {
        let mut args = self.conn_args();
        args[7] = db.to_owned();
        Command::new(self.bin.tool("psql"))
            .args(args)
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql")
    }

    /// `-h SOCKETDIR -p PORT -U postgres -d postgres`.
    #[must_use]
    pub fn conn_args(&self) -> Vec<String> {
        vec![
            "-h".into(),
            self.dir.path().display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            "postgres".into(),
            "-d".into(),
            "postgres".into(),
        ]
    }

    /// Runs `pgbench` with `args` against this server.
    pub fn pgbench(&self, args: &[&str]) {
        let mut cmd = Command::new(self.bin.tool("pgbench"));
        cmd.args(self.conn_args()).args(args);
        let out = cmd.output().expect("run pgbench");
        assert!(
            out.status.success(),
            "pgbench {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `PGHOST`, `PGPORT` and `PGUSER` for client programs such as `pitr-agent backup`.
    #[must_use]
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), self.dir.path().display().to_string()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), "postgres".into()),
            ("PG_BIN".into(), self.bin.dir.display().to_string()),
        ]
    }

    /// Unpacks a `.tar.gz` base backup with `tar xzf`, as an operator would by
    /// hand, and configures it to start on its own socket with archiving off.
    /// Does not start it.
    #[must_use]
    pub fn from_backup_tar(bin: &PgBin, tar_gz: &Path) -> Self {
        let user = RunAs::test_user();
        let dir = user_tempdir(user, "restored");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("create data dir");
        let pg = Postgres {
            bin: bin.clone(),
            user,
            data,
            port: crate::free_port(),
            env: Vec::new(),
            server_args: Vec::new(),
            dir,
        };
        let out = Command::new("tar")
            .arg("xzf")
            .arg(tar_gz)
            .arg("-C")
            .arg(&pg.data)
            .output()
            .expect("run tar");
        assert!(
            out.status.success(),
            "tar xzf {}: {}",
            tar_gz.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        user.chown_tree(&pg.data);
        std::fs::set_permissions(
            &pg.data,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod data dir");
        let path = pg.data.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&format!(
            "port = {}\nunix_socket_directories = '{}'\narchive_mode = off\n",
            pg.port,
            pg.dir.path().display()
        ));
        std::fs::write(&path, text).expect("write postgresql.auto.conf");
        pg
    }

    /// `pg_dumpall` of every database, without the per-run `\restrict` keys
    /// that newer minor releases add, so two dumps of equal data compare equal.
    #[must_use]
    pub fn dumpall(&self) -> String {
        // pg_dumpall's -d takes a connection string; -l names the database.
        let mut args = self.conn_args();
        args[6] = "-l".into();
        let out = Command::new(self.bin.tool("pg_dumpall"))
            .args(args)
            .output()
            .expect("run pg_dumpall");
        assert!(
            out.status.success(),
            "pg_dumpall: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The WAL directory.
    #[must_use]
    pub fn wal_dir(&self) -> PathBuf {
        self.data.join("pg_wal")
    }

    /// Names of WAL files PostgreSQL still has to archive.
    #[must_use]
    pub fn ready_files(&self) -> Vec<String> {
        status_files(&self.wal_dir(), ".ready")
    }

    /// Names of WAL files PostgreSQL has archived.
    #[must_use]
    pub fn done_files(&self) -> Vec<String> {
        status_files(&self.wal_dir(), ".done")
    }

    /// Switches to a new segment and returns the name of the one just closed.
    #[must_use]
    pub fn switch_wal(&self) -> String {
        // pg_switch_wal() is a no-op on an idle segment; write something first.
        let _ = self.sql(
            "CREATE TABLE IF NOT EXISTS pitr_switch (i int); INSERT INTO pitr_switch VALUES (1)",
        );
        self.sql("SELECT pg_walfile_name(pg_switch_wal())")
    }

    /// Waits until the archiver has nothing left to do and has archived `name`.
    pub fn wait_archived(&self, name: &str, timeout: Duration) {
        wait_for(&format!("{name} to be archived"), timeout, || {
            let last = self.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
            (last.as_str() >= name && self.ready_files().is_empty()).then_some(())
        });
    }

    /// `pg_stat_archiver.failed_count`.
    #[must_use]
    pub fn archive_failures(&self) -> u64 {
        self.sql("SELECT failed_count FROM pg_stat_archiver")
            .parse()
            .expect("a count")
    }

    fn run_checked(&self, cmd: &mut Command) {
        self.user.apply(cmd);
        cmd.current_dir(self.dir.path());
        let out = cmd.output().expect("spawn a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{cmd:?} failed:\n{}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut cmd = Command::new(self.bin.tool("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-w", "-m", "immediate", "stop"]);
        self.user.apply(&mut cmd);
        let _ = cmd.output();
    }
}

fn status_files(wal_dir: &Path, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(wal_dir.join("archive_status"))
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_suffix(suffix)
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits a bounded time for a condition on a cluster, for readability in tests.
pub const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// The PostgreSQL installation to test with, or a skip (fatal in CI).
#[must_use]
pub fn pg_bin() -> Option<PgBin> {
    let bin = PgBin::find();
    crate::prerequisite(
        bin.is_some(),
        "PostgreSQL server binaries (PG_BIN or postgresql-15)",
    )
    .then(|| bin.expect("checked"))
}
