//! Connecting to PostgreSQL the way libpq tools do, and finding the client
//! programs (`pg_basebackup`) that match the server's major version.
//!
//! Settings come from `--pg-*` flags or the standard `PGHOST`, `PGPORT`,
//! `PGUSER`, `PGPASSWORD` and `PGDATABASE` variables, then from the
//! `PGSERVICE` section of a connection service file, then from libpq's
//! defaults; the resolved values are handed to child programs, so both see
//! one server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tokio_postgres::{Client, NoTls};

use crate::pgtls::{AuthGuard, SslMode};

/// Drives a connection in the background until it ends.
fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
}

/// Where PostgreSQL is.
#[derive(Debug, Clone, Args)]
pub struct PgArgs {
    /// Server host name, or the directory of its Unix socket.
    /// [default: /var/run/postgresql if it exists, else localhost]
    #[arg(long = "pg-host", env = "PGHOST")]
    pub host: Option<String>,
    /// Server port. [default: 5432]
    #[arg(long = "pg-port", env = "PGPORT")]
    pub port: Option<u16>,
    /// User name; it needs the REPLICATION attribute (or superuser).
    /// [default: the operating-system user]
    #[arg(long = "pg-user", env = "PGUSER")]
    pub user: Option<String>,
    /// Database for the control connection. [default: postgres]
    #[arg(long = "pg-database", env = "PGDATABASE")]
    pub database: Option<String>,
    /// A section of the connection service file (`PGSERVICEFILE`, else
    /// ~/.pg_service.conf, else `PGSYSCONFDIR`/pg_service.conf) that fills in
    /// what the flags and variables above leave unset.
    #[arg(long = "pg-service", env = "PGSERVICE")]
    pub service: Option<String>,
    /// Directory of the PostgreSQL client programs [default: the Debian
    /// directory of the server's major version, else PATH].
    #[arg(long = "pg-bin", env = "PG_BIN")]
    pub bin: Option<PathBuf>,
}

/// The settings resolved, with defaults applied.
#[derive(Debug, Clone)]
pub struct PgTarget {
    /// Host or socket directory.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User.
    pub user: String,
    /// Database.
    pub database: String,
    /// Client programs directory, if set.
    pub bin: Option<PathBuf>,
    /// The password given by the service file, if any.
    pub service_password: Option<String>,
}

/// Why PostgreSQL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// No connection.
    #[error(
        "cannot connect to PostgreSQL at {target}: {detail}; check that the server runs and \
         PGHOST, PGPORT, PGUSER and PGPASSWORD (or --pg-host, --pg-port, --pg-user)"
    )]
    Connect {
        /// host:port as user.
        target: String,
        /// What went wrong.
        detail: String,
    },
    /// A query failed.
    #[error("query on PostgreSQL at {target} failed: {detail}")]
    Query {
        /// host:port as user.
        target: String,
        /// What went wrong.
        detail: String,
    },
    /// No client program of the right major version.
    #[error(
        "no {program} for PostgreSQL {major} found (tried {tried}); install \
         postgresql-client-{major} or set PG_BIN to its bin directory"
    )]
    NoProgram {
        /// The program.
        program: &'static str,
        /// The server's major version.
        major: u32,
        /// Where it looked.
        tried: String,
    },
    /// A client program of another major version.
    #[error(
        "{path} is PostgreSQL {found}, but the server is PostgreSQL {major}; set PG_BIN to the \
         bin directory of PostgreSQL {major}"
    )]
    WrongVersion {
        /// The program.
        path: String,
        /// Its major version.
        found: u32,
        /// The server's.
        major: u32,
    },
    /// `PGSERVICE` names a section that no service file has.
    #[error(
        "no connection service \"{name}\" in {tried}; add a [{name}] section there, set \
         PGSERVICEFILE to the file that has it, or unset PGSERVICE"
    )]
    NoService {
        /// The section.
        name: String,
        /// The files read.
        tried: String,
    },
}

impl PgArgs {
    /// Applies the service file, then libpq's defaults.
    ///
    /// # Errors
    /// [`PgError::NoService`] when `PGSERVICE` names a section no service
    /// file has.
    pub fn resolve(&self) -> Result<PgTarget, PgError> {
        let given = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        let mut service = match given(&self.service) {
            Some(name) => service_settings(&name)?,
            None => std::collections::HashMap::new(),
        };
        let host = given(&self.host)
            .or_else(|| service.remove("host"))
            .unwrap_or_else(|| {
                if Path::new("/var/run/postgresql").is_dir() {
                    "/var/run/postgresql".to_owned()
                } else {
                    "localhost".to_owned()
                }
            });
        let port = self
            .port
            .or_else(|| service.get("port").and_then(|p| p.parse().ok()))
            .unwrap_or(5432);
        let user = given(&self.user)
            .or_else(|| service.remove("user"))
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".to_owned());
        let database = given(&self.database)
            .or_else(|| service.remove("dbname"))
            .unwrap_or_else(|| "postgres".to_owned());
        Ok(PgTarget {
            host,
            port,
            user,
            database,
            bin: self.bin.clone(),
            service_password: service.remove("password"),
        })
    }
}

/// The settings of section `name` of the first service file that has it,
/// searched as libpq does: `PGSERVICEFILE` (else `~/.pg_service.conf`), then
/// `PGSYSCONFDIR/pg_service.conf` (else Debian's
/// `/etc/postgresql-common/pg_service.conf`).
fn service_settings(name: &str) -> Result<std::collections::HashMap<String, String>, PgError> {
    let user_file = std::env::var_os("PGSERVICEFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pg_service.conf")));
    let system_file = std::env::var_os("PGSYSCONFDIR")
        .map_or_else(|| PathBuf::from("/etc/postgresql-common"), PathBuf::from)
        .join("pg_service.conf");
    let files: Vec<PathBuf> = user_file.into_iter().chain([system_file]).collect();
    for file in &files {
        if let Some(settings) = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| service_lookup(&text, name))
        {
            return Ok(settings);
        }
    }
    Err(PgError::NoService {
        name: name.to_owned(),
        tried: files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(" and "),
    })
}

/// The `key=value` lines of section `[name]` of a service file, or `None`
/// when the file has no such section.
#[must_use]
pub fn service_lookup(text: &str, name: &str) -> Option<std::collections::HashMap<String, String>> {
    let mut found = None;
    let mut in_section = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if in_section {
                break;
            }
            in_section = section == name;
            if in_section {
                found = Some(std::collections::HashMap::new());
            }
            continue;
        }
        if let (true, Some(map), Some((key, value))) =
            (in_section, found.as_mut(), line.split_once('='))
        {
            map.entry(key.trim().to_owned())
                .or_insert_with(|| value.trim().to_owned());
        }
    }
    found
}

impl PgTarget {
    /// A server given as a libpq URL (`postgresql://user:password@host:port/db`)
    /// or keyword string; what it leaves out comes from `fallback`.
    ///
    /// # Errors
    /// Not a connection string, or more than one host.
    pub fn from_url(url: &str, fallback: &PgTarget) -> anyhow::Result<PgTarget> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            anyhow::anyhow!(
                "{url:?} is not a connection string ({e}); write \
                 postgresql://user@host:port/database"
            )
        })?;
        let host = match config.get_hosts() {
            [] => fallback.host.clone(),
            [tokio_postgres::config::Host::Tcp(h)] => h.clone(),
            [tokio_postgres::config::Host::Unix(p)] => p.display().to_string(),
            _ => anyhow::bail!("{url:?} names several hosts; give one"),
        };
        Ok(PgTarget {
            host,
            port: config.get_ports().first().copied().unwrap_or(fallback.port),
            user: config
                .get_user()
                .map_or_else(|| fallback.user.clone(), str::to_owned),
            database: config
                .get_dbname()
                .map_or_else(|| fallback.database.clone(), str::to_owned),
            bin: fallback.bin.clone(),
            service_password: config
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .or_else(|| fallback.service_password.clone()),
        })
    }

    /// `host:port as user`, for messages.
    #[must_use]
    pub fn describe(&self) -> String {
        format!("{}:{} as {}", self.host, self.port, self.user)
    }

    /// The libpq variables for child programs
    /// (`PGSERVICE` is resolved here and must be removed from the child's
    /// environment, see [`PgTarget::configure_child`].)
    #[must_use]
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("PGHOST", self.host.clone()),
            ("PGPORT", self.port.to_string()),
            ("PGUSER", self.user.clone()),
            ("PGDATABASE", self.database.clone()),
        ];
        if let Some(p) = &self.service_password {
            env.push(("PGPASSWORD", p.clone()));
        }
        // libpq 16+ reads it (older ones ignore it): the same refusal of
        // cleartext and MD5 passwords over TCP as the agent's own connections.
        if !crate::pgtls::is_socket(&self.host) && std::env::var_os("PGREQUIREAUTH").is_none() {
            env.push(("PGREQUIREAUTH", crate::pgtls::TCP_REQUIRE_AUTH.to_owned()));
        }
        env
    }

    /// Points a child libpq program at this server: the resolved variables,
    /// and no `PGSERVICE`, which libpq would let override them.
    pub fn configure_child(&self, cmd: &mut tokio::process::Command) {
        cmd.envs(self.env()).env_remove("PGSERVICE");
    }

    /// The password for `database` (`replication` for the replication
    /// protocol), as libpq finds it: the service file's, else `PGPASSWORD`,
    /// else the first matching
    /// line of `PGPASSFILE` or `~/.pgpass` (ignored, with a warning, when
    /// others may read it).
    #[must_use]
    pub fn password(&self, database: &str) -> Option<String> {
        if let Some(p) = &self.service_password {
            return Some(p.clone());
        }
        if let Ok(p) = std::env::var("PGPASSWORD") {
            return Some(p);
        }
        let file = std::env::var_os("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pgpass")))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let meta = std::fs::metadata(&file).ok()?;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %file.display(), "the password file has group or world access and is ignored, as libpq does; chmod 0600 it");
                return None;
            }
        }
        let text = std::fs::read_to_string(&file).ok()?;
        // As in libpq, `localhost` stands for the default socket directory
        // (Debian's, or upstream's /tmp); another socket directory is
        // matched by its path.
        let host = match self.host.as_str() {
            "" | "/var/run/postgresql" | "/tmp" => "localhost",
            h => h,
        };
        pgpass_lookup(&text, host, &self.port.to_string(), database, &self.user)
    }

    /// Opens a control connection named `application_name`.
    ///
    /// # Errors
    /// [`PgError::Connect`] with what to check.
    pub async fn connect(&self, application_name: &str) -> Result<Client, PgError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.database)
            .application_name(application_name)
            .connect_timeout(Duration::from_secs(10));
        if let Some(password) = self.password(&self.database) {
            config.password(password);
        }
        let connect_error = |detail: String| PgError::Connect {
            target: self.describe(),
            detail,
        };
        let tcp = !crate::pgtls::is_socket(&self.host);
        let security = crate::pgtls::ConnSecurity::from_env(tcp).map_err(connect_error)?;
        let auth = security.auth.clone();
        let timeout = Duration::from_secs(10);
        if tcp {
            config.ssl_mode(match security.mode {
                SslMode::Disable | SslMode::Allow => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                _ => tokio_postgres::config::SslMode::Require,
            });
            let stream = tokio::time::timeout(
                timeout,
                tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
            )
            .await
            .map_err(|_| connect_error("connecting timed out".to_owned()))?
            .map_err(|e| connect_error(e.to_string()))?;
            let _ = stream.set_nodelay(true);
            let guard = if security.mode.tries_tls() {
                AuthGuard::after_ssl_request(stream, auth)
            } else {
                AuthGuard::new(stream, auth)
            };
            let connector = crate::pgtls::Connector::new(security, &self.host);
            let (client, connection) = config
                .connect_raw(guard, connector)
                .await
                .map_err(|e| connect_error(error_text(&e)))?;
            spawn_connection(connection);
            Ok(client)
        } else {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            let path = format!("{}/.s.PGSQL.{}", self.host, self.port);
            let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&path))
                .await
                .map_err(|_| connect_error(format!("connecting to {path} timed out")))?
                .map_err(|e| connect_error(format!("{path}: {e}")))?;
            let (client, connection) = config
                .connect_raw(AuthGuard::new(stream, auth), NoTls)
                .await
                .map_err(|e| connect_error(error_text(&e)))?;
            spawn_connection(connection);
            Ok(client)
        }
    }

    /// Runs a query that returns one text value.
    ///
    /// # Errors
    /// [`PgError::Query`].
    pub async fn query_text(&self, client: &Client, sql: &str) -> Result<String, PgError> {
        let row = client
            .query_one(sql, &[])
            .await
            .map_err(|e| PgError::Query {
                target: self.describe(),
                detail: format!("{sql}: {}", error_text(&e)),
            })?;
        row.try_get::<_, String>(0).map_err(|e| PgError::Query {
            target: self.describe(),
            detail: format!("{sql}: {}", error_text(&e)),
        })
    }

    /// Finds `program` of PostgreSQL `major`: in `--pg-bin`, in Debian's
    /// `/usr/lib/postgresql/<major>/bin`, then on PATH, checking its version.
    ///
    /// # Errors
    /// [`PgError::NoProgram`] or [`PgError::WrongVersion`].
    pub fn program(&self, program: &'static str, major: u32) -> Result<PathBuf, PgError> {
        let mut candidates = Vec::new();
        if let Some(dir) = &self.bin {
            candidates.push(dir.join(program));
        } else {
            candidates.push(PathBuf::from(format!(
                "/usr/lib/postgresql/{major}/bin/{program}"
            )));
            if let Some(path) = std::env::var_os("PATH") {
                candidates.extend(std::env::split_paths(&path).map(|d| d.join(program)));
            }
        }
        let mut wrong = None;
        for candidate in &candidates {
            if !candidate.is_file() {
                continue;
            }
            match program_major(candidate) {
                Some(found) if found == major => return Ok(candidate.clone()),
                Some(found) => {
                    wrong.get_or_insert(PgError::WrongVersion {
                        path: candidate.display().to_string(),
                        found,
                        major,
                    });
                }
                None => {}
            }
        }
        Err(wrong.unwrap_or_else(|| PgError::NoProgram {
            program,
            major,
            tried: candidates
                .iter()
                .take(3)
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        }))
    }
}

/// The major version a PostgreSQL program reports with `--version`.
fn program_major(path: &Path) -> Option<u32> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.split('.').next()?.parse().ok())
}

/// The server's message for a database error, else the error chain.
/// The password of the first `.pgpass` line that matches: fields
/// `host:port:database:user:password`, `*` matches anything, `\` escapes
/// `:` and `\`.
#[must_use]
pub fn pgpass_lookup(
    text: &str,
    host: &str,
    port: &str,
    database: &str,
    user: &str,
) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        field.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
                c => field.push(c),
            }
        }
        fields.push(field);
        if fields.len() != 5 {
            continue;
        }
        let matches = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        if matches(&fields[0], host)
            && matches(&fields[1], port)
            && matches(&fields[2], database)
            && matches(&fields[3], user)
        {
            return Some(fields.swap_remove(4));
        }
    }
    None
}

pub(crate) fn error_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn service_sections_are_read_as_libpq_does() {
        let text = "# shared\n[odoo]\nhost=db.example\nport = 6432\ndbname=odoo\n\
                    host=ignored\n[other]\nuser=x\n";
        let odoo = super::service_lookup(text, "odoo").expect("section");
        assert_eq!(odoo.get("host").map(String::as_str), Some("db.example"));
        assert_eq!(odoo.get("port").map(String::as_str), Some("6432"));
        assert_eq!(odoo.get("user"), None);
        assert_eq!(
            super::service_lookup(text, "other")
                .and_then(|m| m.get("user").cloned())
                .as_deref(),
            Some("x")
        );
        assert!(super::service_lookup(text, "missing").is_none());
    }

    #[test]
    fn pgpass_lines_match_as_libpq_does() {
        let text = "# a comment\n\
                    db.example:5432:odoo:app:first\n\
                    localhost:*:*:postgres:pa\\:ss\n\
                    *:*:replication:postgres:repl\n";
        let find = |h, p, d, u| super::pgpass_lookup(text, h, p, d, u);
        assert_eq!(
            find("db.example", "5432", "odoo", "app").as_deref(),
            Some("first")
        );
        assert_eq!(find("db.example", "5433", "odoo", "app"), None);
        assert_eq!(
            find("localhost", "5432", "postgres", "postgres").as_deref(),
            Some("pa:ss")
        );
        assert_eq!(
            find("db.example", "1", "replication", "postgres").as_deref(),
            Some("repl")
        );
    }
}
