//! The agent's connections to PostgreSQL over TCP: TLS with libpq's
//! settings, against a real server with `ssl = on` and a CA made here, and
//! the refusal of cleartext passwords. The backup connects as `pitr_backup`,
//! a role with REPLICATION and the grants the docs name, not a superuser.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use pitr_tests::{RunAs, free_port, user_tempdir, wait_for};

use super::daemon::get;
use super::{Setup, pg_bin};

/// A CA, a server certificate for `localhost` signed by it, and a second,
/// unrelated CA.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn make() -> Option<Self> {
        let openssl = pitr_tests::which("openssl");
        if !pitr_tests::prerequisite(openssl.is_some(), "openssl (Debian package)") {
            return None;
        }
        let dir = user_tempdir(RunAs::test_user(), "tls");
        let d = dir.path();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .current_dir(d)
                .args(args)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=pitr test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ]);
        }
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(
            d.join("ext.cnf"),
            "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ]);
        std::fs::write(
            d.join("pg_hba.conf"),
            "local all all trust\n\
             host all pitr_plain 127.0.0.1/32 password\n\
             host replication pitr_plain 127.0.0.1/32 password\n\
             hostssl all pitr_backup 127.0.0.1/32 scram-sha-256\n\
             hostssl replication pitr_backup 127.0.0.1/32 scram-sha-256\n",
        )
        .expect("write pg_hba.conf");
        RunAs::test_user().chown_tree(d);
        set_mode(&d.join("server.key"), 0o600);
        Some(Certs { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn conf(&self) -> Vec<String> {
        vec![
            "listen_addresses = '127.0.0.1'".to_owned(),
            "ssl = on".to_owned(),
            format!("ssl_cert_file = '{}'", self.path("server.crt").display()),
            format!("ssl_key_file = '{}'", self.path("server.key").display()),
            format!("hba_file = '{}'", self.path("pg_hba.conf").display()),
            "password_encryption = 'scram-sha-256'".to_owned(),
        ]
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

const PASSWORD: &str = "tls-test-password";

/// A cluster listening on 127.0.0.1 with TLS, archiving into a file://
/// repository, with the roles `pitr_backup` (SCRAM over TLS only) and
/// `pitr_plain` (a cleartext password).
fn tls_cluster(certs: &Certs) -> Option<Setup> {
    let bin = pg_bin()?;
    let conf = certs.conf();
    let conf: Vec<&str> = conf.iter().map(String::as_str).collect();
    let setup = Setup::file_with(&bin, &conf);
    // The role and grants docs/security.md names for the backup.
    setup.pg.exec(&format!(
        "CREATE ROLE pitr_backup LOGIN REPLICATION PASSWORD '{PASSWORD}'; \
         GRANT pg_monitor TO pitr_backup; \
         CREATE ROLE pitr_plain LOGIN SUPERUSER PASSWORD '{PASSWORD}'"
    ));
    Some(setup)
}

/// `pitr-agent args` against the server over TCP as `user`, with `env`.
fn over_tcp(
    setup: &Setup,
    certs: &Certs,
    user: &str,
    env: &[(&str, String)],
    args: &[&str],
) -> Command {
    let mut cmd = setup.agent(args);
    // libpq looks for ~/.postgresql/postgresql.crt: a HOME the test user can read.
    cmd.env("HOME", certs.dir.path())
        .env("PGHOST", "localhost")
        .env("PGPORT", setup.pg.port.to_string())
        .env("PGUSER", user)
        .env("PGPASSWORD", PASSWORD)
        .env("PG_BIN", &setup.pg.bin.dir)
        .envs(env.iter().map(|(k, v)| (*k, v.clone())));
    cmd
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tls_verify_full_works_and_a_wrong_ca_or_host_or_a_cleartext_password_is_refused() {
    let Some(certs) = Certs::make() else { return };
    let Some(setup) = tls_cluster(&certs) else {
        return;
    };
    let ca = certs.path("ca.crt").display().to_string();
    let verify_full = [
        ("PGSSLMODE", "verify-full".to_owned()),
        ("PGSSLROOTCERT", ca.clone()),
    ];

    // verify-full: the control connection and pg_basebackup, as pitr_backup.
    let out = over_tcp(
        &setup,
        &certs,
        "pitr_backup",
        &verify_full,
        &["backup", "--json"],
    )
    .output()
    .expect("run backup");
    assert!(out.status.success(), "verify-full backup: {}", stderr(&out));

    // A wrong CA, and a host name the certificate does not name: refused.
    let wrong_ca = [
        ("PGSSLMODE", "verify-full".to_owned()),
        (
            "PGSSLROOTCERT",
            certs.path("other-ca.crt").display().to_string(),
        ),
    ];
    let out = over_tcp(&setup, &certs, "pitr_backup", &wrong_ca, &["backup"])
        .output()
        .expect("run backup");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("TLS with localhost failed"),
        "{}",
        stderr(&out)
    );

    let mut by_ip = over_tcp(&setup, &certs, "pitr_backup", &verify_full, &["backup"]);
    by_ip.env("PGHOST", "127.0.0.1");
    let out = by_ip.output().expect("run backup");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("TLS with 127.0.0.1 failed"),
        "{}",
        stderr(&out)
    );

    // require: encrypted without verification (libpq's meaning), so even
    // with no CA it connects.
    let require = [("PGSSLMODE", "require".to_owned())];
    let out = over_tcp(
        &setup,
        &certs,
        "pitr_backup",
        &require,
        &["backup", "--json"],
    )
    .output()
    .expect("run backup");
    assert!(out.status.success(), "require backup: {}", stderr(&out));

    // A server asking for a cleartext password over TCP gets nothing...
    let no_tls = [("PGSSLMODE", "disable".to_owned())];
    let out = over_tcp(&setup, &certs, "pitr_plain", &no_tls, &["backup"])
        .output()
        .expect("run backup");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cleartext password") && stderr(&out).contains("nothing was sent"),
        "{}",
        stderr(&out)
    );
    // ...unless told otherwise, as libpq's require_auth (which also shows
    // that the refusal above was the policy, not the setup).
    let allowed = [
        ("PGSSLMODE", "disable".to_owned()),
        ("PGREQUIREAUTH", "password".to_owned()),
    ];
    let out = over_tcp(
        &setup,
        &certs,
        "pitr_plain",
        &allowed,
        &["backup", "--json"],
    )
    .output()
    .expect("run backup");
    assert!(out.status.success(), "cleartext allowed: {}", stderr(&out));

    // The WAL stream's replication connection, over verify-full TLS.
    let port = free_port();
    let mut daemon = over_tcp(
        &setup,
        &certs,
        "pitr_backup",
        &verify_full,
        &[
            "daemon",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--refresh",
            "1s",
            "--verify-schedule",
            "",
            "--backup-schedule",
            "",
            "--stream",
            "on",
            "--stream-flush",
            "1s",
        ],
    );
    daemon
        .arg("--pgdata")
        .arg(&setup.pg.data)
        .env("PITR_REHEARSE_SCHEDULE", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = daemon.spawn().expect("start the daemon");
    wait_for("the WAL stream over TLS", Duration::from_secs(60), || {
        let (code, body) = get(port, "/status")?;
        let s: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 200 && s["stream"]["up"] == serde_json::Value::Bool(true)).then_some(())
    });
    let ssl = setup.pg.sql(
        "SELECT bool_and(s.ssl)::text FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) \
         WHERE r.usename = 'pitr_backup'",
    );
    assert_eq!(ssl, "true", "the replication connection is encrypted");
    let _ = child.kill();
    let _ = child.wait();
}

/// Every command, and a daemon cycle, with a PostgreSQL password, an age
/// identity and an S3 secret that are unique marker strings: none of them
/// appears in any output, log, /status, /metrics, restored configuration or
/// repository object.
#[test]
fn secrets_never_appear_in_outputs_logs_status_metrics_or_the_repository() {
    let Some(bin) = pg_bin() else { return };
    let key = pitr_tests::bins::TestKey::generate(RunAs::test_user());
    let identity_secret = std::fs::read_to_string(&key.identity)
        .expect("identity")
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .expect("secret line")
        .to_owned();
    let pg_secret = format!("PG-SECRET-MARKER-{}", std::process::id());
    let s3_secret = format!("S3-SECRET-MARKER-{}", std::process::id());
    let env = vec![
        ("AWS_SECRET_ACCESS_KEY".to_owned(), s3_secret.clone()),
        ("PGPASSWORD".to_owned(), pg_secret.clone()),
        ("PITR_ENCRYPT_TO".to_owned(), key.recipient.clone()),
    ];
    let Some(mut setup) = Setup::s3_with_env(
        &bin,
        pitr_tests::s3::S3Kind::Moto,
        "secrets",
        env.clone(),
        &[],
    ) else {
        return;
    };
    setup.env.extend(env);
    setup.env.push((
        "PITR_IDENTITY_FILE".to_owned(),
        key.identity.display().to_string(),
    ));
    setup
        .pg
        .exec("CREATE TABLE t AS SELECT generate_series(1, 1000) AS i");
    let mut seen: Vec<(String, Vec<u8>)> = Vec::new();
    let mut run = |what: &str, cmd: &mut Command| {
        let out = cmd.output().expect("run");
        assert!(
            out.status.code().is_some_and(|c| c <= 1),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        seen.push((format!("{what} stdout"), out.stdout));
        seen.push((format!("{what} stderr"), out.stderr));
    };
    run("backup", &mut setup.agent(&["backup", "--json"]));
    let _ = setup.pg.switch_wal();
    setup
        .pg
        .exec("INSERT INTO t SELECT generate_series(1001, 2000)");
    let _ = setup.pg.switch_wal();
    run("list", &mut setup.agent(&["list", "--json"]));
    run("verify", &mut setup.agent(&["verify", "--json"]));
    run(
        "prune",
        &mut setup.agent(&["prune", "--retain-full", "1", "--dry-run"]),
    );
    run("init", &mut setup.agent(&["init"]));
    // A failure's message, too: a wrong identity.
    let other = pitr_tests::bins::TestKey::generate(RunAs::test_user());
    let out = setup
        .agent(&["verify"])
        .env("PITR_IDENTITY_FILE", &other.identity)
        .output()
        .expect("run verify");
    seen.push(("verify, wrong identity".to_owned(), out.stderr));

    // A daemon cycle: /status, /metrics, its log.
    let port = free_port();
    let daemon = super::daemon::start_daemon(&setup, port, &["--backup-schedule", ""]);
    for path in ["/status", "/metrics"] {
        let (_, body) = wait_for("the daemon to answer", Duration::from_secs(30), || {
            get(port, path).filter(|(c, _)| *c == 200)
        });
        seen.push((path.to_owned(), body.into_bytes()));
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", daemon.id())).unwrap_or_default();
    seen.push(("daemon arguments".to_owned(), cmdline));
    super::daemon::sigterm(&daemon);
    let out = daemon.wait_with_output().expect("wait for the daemon");
    seen.push(("daemon log".to_owned(), out.stderr));

    // A restore: its output, and the configuration it leaves (restore_command).
    let r = super::restore::Restored::new(&bin);
    let out = r.pgrestore(&setup, &["--target", "immediate", "--start"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    seen.push(("pgrestore stdout".to_owned(), out.stdout));
    seen.push(("pgrestore stderr".to_owned(), out.stderr));
    for conf in ["postgresql.auto.conf", "postgresql.conf"] {
        seen.push((
            conf.to_owned(),
            std::fs::read(r.data.join(conf)).unwrap_or_default(),
        ));
    }
    seen.push(("server log".to_owned(), setup.pg.log().into_bytes()));
    seen.extend(super::restore::raw_objects(&setup));
    assert!(seen.len() > 30, "{} sources", seen.len());

    let holds =
        |body: &[u8], secret: &str| body.windows(secret.len()).any(|w| w == secret.as_bytes());
    // The check can fail: the identity file itself holds its secret.
    assert!(holds(
        &std::fs::read(&key.identity).expect("identity"),
        &identity_secret
    ));
    for (what, body) in &seen {
        for secret in [&identity_secret, &pg_secret, &s3_secret] {
            assert!(!holds(body, secret), "{what} holds a secret");
        }
    }
}

/// A repository in a bucket with S3 Object Lock: `init --object-lock` makes
/// S3 lock every new object; a version-specific delete of a backup before
/// its retention date fails (what ransomware holding a delete credential
/// meets), and `prune` keeps the locked backup and says when it can go.
#[test]
fn object_lock_keeps_backups_that_a_delete_credential_cannot_erase_and_prune_waits() {
    let Some(bin) = pg_bin() else { return };
    let Some(server) = super::s3_server(pitr_tests::s3::S3Kind::Moto) else {
        return;
    };
    let bucket = format!("pitr-locked-{:08x}", rand::random::<u32>());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = rt.block_on(server.client());
    rt.block_on(
        client
            .create_bucket()
            .bucket(&bucket)
            .object_lock_enabled_for_bucket(true)
            .send(),
    )
    .expect("create a bucket with Object Lock");
    let repo = format!("s3://{bucket}/pitr");
    let env = server.env();
    // Before anything is written (moto sets a default retention only on an
    // empty bucket; AWS on any).
    let out = pitr_tests::bins::agent_cmd(RunAs::test_user())
        .envs(env.iter().cloned())
        .args([
            "--repo",
            &repo,
            "init",
            "--object-lock",
            "1",
            "--lock-mode",
            "governance",
        ])
        .output()
        .expect("run init");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("locked for 1 days"));
    let setup = Setup {
        pg: super::archiving_cluster_with(&bin, &repo, &env, &[]),
        repo,
        env,
        dir: None,
        _tmp: None,
        server: Some(server),
    };
    // Again, as an init container does at every start: nothing changes.
    let out = setup.run(&["init", "--object-lock", "1", "--lock-mode", "governance"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("locked for 1 days"));

    let first = setup.backup()["id"].as_str().expect("id").to_owned();
    setup.pg.exec("CREATE TABLE t AS SELECT 1 AS i");
    let _ = setup.pg.switch_wal();
    setup.backup();

    // The lock S3 put on the first backup's data, read back with HEAD.
    let key = format!("pitr/backups/{first}/base.tar.gz");
    let head = rt
        .block_on(client.head_object().bucket(&bucket).key(&key).send())
        .expect("head");
    let until = head
        .object_lock_retain_until_date()
        .expect("the object is locked");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("epoch")
        .as_secs();
    assert!(
        until.secs() > i64::try_from(now + 20 * 3600).expect("fits"),
        "locked for about a day: {until:?}"
    );
    // A credential that can delete cannot erase it early.
    let deleted = rt.block_on(
        client
            .delete_object()
            .bucket(&bucket)
            .key(&key)
            .version_id(head.version_id().expect("versioned"))
            .send(),
    );
    assert!(deleted.is_err(), "a locked version was deleted");

    // prune: retention would delete the first backup; the lock keeps it.
    let out = setup.run(&["prune", "--retain-full", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("Object Lock still protects") && text.contains("locks expire"),
        "{text}"
    );
    let listed = setup.list();
    assert_eq!(
        listed["backups"].as_array().map(Vec::len),
        Some(2),
        "the locked backup is still listed: {listed}"
    );

    // file:// has no Object Lock: a clear refusal.
    let file = user_tempdir(RunAs::test_user(), "nolock");
    let out = Command::new(pitr_tests::bins::agent())
        .args(["--repo"])
        .arg(format!("file://{}/repo", file.path().display()))
        .args(["init", "--object-lock", "1"])
        .output()
        .expect("run init");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Object Lock is an S3 feature"),
        "{}",
        stderr(&out)
    );
}

/// Keys that do not fit the repository are refused before anything is
/// read or written, each with what to set; `key add` lets writers move to a
/// new recipient.
#[test]
fn keys_that_do_not_fit_the_repository_are_refused_and_key_add_rotates() {
    let user = RunAs::test_user();
    let key = pitr_tests::bins::TestKey::generate(user);
    let next = pitr_tests::bins::TestKey::generate(user);
    let dir = user_tempdir(user, "keys");
    let encrypted = format!("file://{}/encrypted", dir.path().display());
    let clear = format!("file://{}/clear", dir.path().display());
    let agent = |repo: &str, env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = pitr_tests::bins::agent_cmd(user);
        cmd.env_remove("PITR_ENCRYPT_TO")
            .env_remove("PITR_IDENTITY_FILE")
            .envs(env.iter().copied())
            .args(["--repo", repo])
            .args(args);
        cmd.output().expect("run pitr-agent")
    };
    let ok = |out: &Output, what: &str| assert!(out.status.success(), "{what}: {}", stderr(out));
    let refused = |out: &Output, needle: &str| {
        assert_eq!(out.status.code(), Some(2), "{}", stderr(out));
        assert!(
            stderr(out).contains(needle),
            "{needle:?} in {}",
            stderr(out)
        );
    };
    ok(
        &agent(&encrypted, &[], &["init", "--encrypt-to", &key.recipient]),
        "init --encrypt-to",
    );
    ok(&agent(&clear, &[], &["init"]), "init");
    let record =
        std::fs::read_to_string(dir.path().join("encrypted/pitr-repository.json")).expect("record");
    assert!(record.contains(&key.recipient), "{record}");

    // No keys on an encrypted repository; keys on a clear one.
    refused(&agent(&encrypted, &[], &["list"]), "need PITR_ENCRYPT_TO");
    refused(
        &agent(&clear, &[("PITR_ENCRYPT_TO", &key.recipient)], &["list"]),
        "it is not encrypted",
    );
    // A recipient the record does not list, until `key add`.
    let with_next = [("PITR_ENCRYPT_TO", next.recipient.as_str())];
    refused(&agent(&encrypted, &with_next, &["list"]), "key add");
    ok(
        &agent(
            &encrypted,
            &[("PITR_ENCRYPT_TO", &key.recipient)],
            &["key", "add", &next.recipient],
        ),
        "key add",
    );
    ok(
        &agent(&encrypted, &with_next, &["list"]),
        "list after key add",
    );
    // An identity file that is not one is named, never printed.
    let bogus = dir.path().join("bogus.txt");
    std::fs::write(&bogus, "AGE-SECRET-KEY-1NOTAKEY\n").expect("write");
    let out = agent(
        &encrypted,
        &[("PITR_IDENTITY_FILE", bogus.to_str().expect("utf-8"))],
        &["list"],
    );
    refused(&out, "line 1 is not an age X25519 identity");
    assert!(!stderr(&out).contains("NOTAKEY"), "{}", stderr(&out));
    // `key generate` never overwrites.
    let out = pitr_tests::bins::agent_cmd(user)
        .args(["key", "generate", "--out"])
        .arg(&key.identity)
        .output()
        .expect("run key generate");
    assert_ne!(out.status.code(), Some(0), "overwrote an identity");
}
