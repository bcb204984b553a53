//! What a new operator hits first, as a table: each case runs the release
//! binary as a subprocess and asserts the exit status and that the first
//! line of stderr names the cause and the fix (a flag, a variable or a
//! command), never a secret it was given.

use std::process::Command;
use std::time::{Duration, Instant};

use pitr_tests::RunAs;
use pitr_tests::bins::{agent_cmd, pgrestore};

/// One case: what to run, the exit status, words the first line must hold,
/// words no output may hold.
struct Case {
    what: &'static str,
    cmd: Command,
    code: i32,
    says: &'static [&'static str],
    never: &'static [&'static str],
}

fn agent(args: &[&str]) -> Command {
    let mut cmd = agent_cmd(RunAs::test_user());
    // No credentials anywhere: not in the environment, no profile.
    for v in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ] {
        cmd.env_remove(v);
    }
    cmd.env("HOME", std::env::temp_dir().join("pitr-no-home"))
        .env_remove("PITR_S3_ENDPOINT")
        .args(args);
    cmd
}

fn restore(args: &[&str]) -> Command {
    let mut cmd = Command::new(pgrestore());
    RunAs::test_user().apply(&mut cmd);
    cmd.current_dir(std::env::temp_dir()).args(args);
    cmd
}

#[test]
fn every_first_error_names_its_cause_and_the_fix() {
    let repo = tempfile::tempdir().expect("tempdir");
    let file_repo = format!("file://{}/repo", repo.path().display());
    std::fs::write(repo.path().join("plain"), "x").expect("write a file");
    let under_file = format!("file://{}/plain/repo", repo.path().display());
    let cases = vec![
        Case {
            what: "an endpoint without a scheme",
            cmd: agent(&[
                "--repo",
                "s3://bkt/p",
                "--s3-endpoint",
                "127.0.0.1:9000",
                "list",
            ]),
            code: 2,
            says: &["--s3-endpoint", "http://"],
            never: &[],
        },
        Case {
            what: "credentials in the endpoint",
            cmd: agent(&[
                "--repo",
                "s3://bkt/p",
                "--s3-endpoint",
                "http://AKIAMARK:s3cr3t-marker@127.0.0.1:9",
                "list",
            ]),
            code: 2,
            says: &["--s3-endpoint", "AWS_ACCESS_KEY_ID"],
            never: &["s3cr3t-marker", "AKIAMARK"],
        },
        Case {
            what: "credentials in the repository URL",
            cmd: agent(&["--repo", "s3://AKIAMARK:s3cr3t-marker@bkt/p", "list"]),
            code: 2,
            says: &["AWS_ACCESS_KEY_ID"],
            never: &["s3cr3t-marker", "AKIAMARK"],
        },
        Case {
            what: "--s3-force-path-style as a bare switch, and no credentials",
            cmd: agent(&[
                "--repo",
                "s3://bkt/p",
                "--s3-endpoint",
                "http://127.0.0.1:9",
                "--s3-force-path-style",
                "init",
            ]),
            code: 2,
            says: &[
                "no S3 credentials",
                "AWS_ACCESS_KEY_ID",
                "AWS_PROFILE",
                "IRSA",
                "PITR_S3_ENDPOINT",
            ],
            never: &["invalid value 'init'"],
        },
        Case {
            what: "wal-fetch without credentials: permanent, at once",
            cmd: agent(&[
                "--repo",
                "s3://bkt/p",
                "--s3-endpoint",
                "http://127.0.0.1:9",
                "wal-fetch",
                "000000010000000000000001",
                "/tmp/pitr-never-written",
            ]),
            code: 128,
            says: &["no S3 credentials"],
            never: &["retrying"],
        },
        Case {
            what: "a transaction id that is not a number",
            cmd: restore(&["--target-xid", "abc", "--pgdata", "/tmp/pitr-x"]),
            code: 2,
            says: &["--target-xid", "such as 7"],
            never: &["invalid digit"],
        },
        Case {
            what: "days with a unit",
            cmd: agent(&["--repo", &file_repo, "prune", "--retain-days", "7d"]),
            code: 2,
            says: &["--retain-days", "without a unit"],
            never: &["invalid digit"],
        },
        Case {
            what: "a timeout that is not a duration",
            cmd: restore(&[
                "--start-timeout",
                "forever",
                "--target",
                "latest",
                "--pgdata",
                "/tmp/pitr-x",
            ]),
            code: 2,
            says: &["--start-timeout", "90s"],
            never: &["expected number"],
        },
        Case {
            what: "init --pgdata that is not a data directory",
            cmd: agent(&[
                "--repo",
                &file_repo,
                "init",
                "--pgdata",
                "/nonexistent/data",
            ]),
            code: 2,
            says: &["--pgdata", "global/pg_control"],
            never: &[],
        },
        Case {
            what: "a repository path under a regular file",
            cmd: agent(&["--repo", &under_file, "init"]),
            code: 2,
            says: &["Not a directory"],
            never: &["Not a directory (os error 20): Not a directory"],
        },
    ];
    for mut case in cases {
        let started = Instant::now();
        let out = case.cmd.output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let all = format!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
        let first = stderr.lines().next().unwrap_or_default();
        assert_eq!(
            out.status.code(),
            Some(case.code),
            "{}: {stderr}",
            case.what
        );
        for word in case.says {
            assert!(
                first.contains(word),
                "{}: the first line lacks {word:?}: {first}",
                case.what
            );
        }
        for word in case.never {
            assert!(
                !all.contains(word),
                "{}: the output holds {word:?}: {all}",
                case.what
            );
        }
        assert!(
            !all.contains('\u{1b}'),
            "{}: colour codes in a pipe: {all:?}",
            case.what
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}: took {:?}",
            case.what,
            started.elapsed()
        );
    }
    assert!(
        !repo.path().join("repo").exists(),
        "a failed command created the repository"
    );
}

/// wal-fetch's warnings go into PostgreSQL's log: no colour codes when
/// stderr is not a terminal.
#[test]
fn warnings_in_a_pipe_carry_no_colour() {
    let out = agent(&[
        "--repo",
        "s3://bkt/p",
        "--s3-endpoint",
        "http://127.0.0.1:9",
        "wal-fetch",
        "--retry-for",
        "2s",
        "000000010000000000000001",
        "/tmp/pitr-never-written",
    ])
    .env("AWS_ACCESS_KEY_ID", "test")
    .env("AWS_SECRET_ACCESS_KEY", "test")
    .env("PITR_S3_MAX_ATTEMPTS", "1")
    .output()
    .expect("run wal-fetch");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128), "{stderr}");
    assert!(stderr.contains("WARN"), "a retry warning: {stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe: {stderr:?}"
    );
}

/// `pgrestore --start` on a host that already runs PostgreSQL: the taken
/// socket is named before anything is downloaded; by default pgrestore
/// picks a free port and a private socket directory.
#[test]
fn a_taken_socket_is_refused_before_downloading() {
    let Some(bin) = super::pg_bin() else { return };
    let s = super::Setup::file(&bin);
    s.pg.exec("CREATE TABLE t (id int); INSERT INTO t VALUES (1)");
    s.backup();
    let target = tempfile::tempdir().expect("tempdir");
    let data = target.path().join("data");
    RunAs::test_user().chown_tree(target.path());
    let port = s.pg.port.to_string();
    let out = restore(&[
        "--repo",
        &s.repo,
        "--target",
        "immediate",
        "--start",
        "--pgdata",
    ])
    .arg(&data)
    .args(["--port", &port, "--socket-dir"])
    .arg(s.pg.dir.path())
    .env("PG_BIN", &bin.dir)
    .output()
    .expect("run pgrestore");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("already has its socket") && stderr.contains("--port"),
        "{stderr}"
    );
    assert!(
        !data.exists(),
        "pgrestore downloaded before checking the socket"
    );
    // Left to itself it picks free ones and restores beside the running server.
    let out = restore(&[
        "--repo",
        &s.repo,
        "--target",
        "immediate",
        "--start",
        "--target-action",
        "shutdown",
        "--pgdata",
    ])
    .arg(&data)
    .env("PG_BIN", &bin.dir)
    .output()
    .expect("run pgrestore");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server that asks for a password: the agent and the pg_basebackup it
/// runs find it as libpq does, in `PGPASSFILE` and in the `PGSERVICE`
/// section of `PGSERVICEFILE`, and never print it.
#[test]
fn passwords_come_from_pgpass_and_service_files() {
    let Some(bin) = super::pg_bin() else { return };
    let s = super::Setup::file(&bin);
    let secret = "pw-Secret-7361";
    s.pg.exec(&format!("ALTER ROLE postgres PASSWORD '{secret}'"));
    std::fs::write(
        s.pg.data.join("pg_hba.conf"),
        "local all all scram-sha-256\nlocal replication all scram-sha-256\n",
    )
    .expect("write pg_hba.conf");
    s.pg.stop();
    s.pg.start();
    let files = pitr_tests::user_tempdir(RunAs::test_user(), "auth");
    let backup = |envs: &[(&str, String)], unset: &[&str]| {
        let mut cmd = s.agent(&["backup"]);
        cmd.env_remove("PGPASSWORD");
        for v in unset {
            cmd.env_remove(v);
        }
        cmd.envs(envs.iter().map(|(k, v)| (*k, v.clone())));
        let out = cmd.output().expect("run pitr-agent backup");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(secret), "the password was printed: {text}");
        (out.status.success(), text)
    };
    let nowhere = files.path().join("none");
    let (ok, text) = backup(&[("PGPASSFILE", nowhere.display().to_string())], &[]);
    assert!(!ok && text.contains("password"), "{text}");

    let pgpass = files.path().join("pgpass");
    std::fs::write(
        &pgpass,
        // A socket directory other than the default is matched by its path.
        format!(
            "localhost:{port}:*:postgres:wrong\n{}:{port}:*:postgres:{secret}\n",
            s.pg.dir.path().display(),
            port = s.pg.port
        ),
    )
    .expect("write pgpass");
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod pgpass");
    RunAs::test_user().chown_tree(files.path());
    let (ok, text) = backup(&[("PGPASSFILE", pgpass.display().to_string())], &[]);
    assert!(ok, "backup with PGPASSFILE: {text}");

    let services = files.path().join("pg_service.conf");
    std::fs::write(
        &services,
        format!(
            "[elsewhere]\nhost=/nonexistent\n[pitr]\nhost={}\nport={}\nuser=postgres\npassword={secret}\n",
            s.pg.dir.path().display(),
            s.pg.port
        ),
    )
    .expect("write pg_service.conf");
    RunAs::test_user().chown_tree(files.path());
    let service_env = |name: &str| {
        vec![
            ("PGSERVICEFILE", services.display().to_string()),
            ("PGSERVICE", name.to_owned()),
            ("PGPASSFILE", nowhere.display().to_string()),
        ]
    };
    let (ok, text) = backup(&service_env("pitr"), &["PGHOST", "PGPORT", "PGUSER"]);
    assert!(ok, "backup with PGSERVICE: {text}");
    let (ok, text) = backup(&service_env("nope"), &["PGHOST", "PGPORT", "PGUSER"]);
    assert!(
        !ok && text.contains("no connection service \"nope\"") && text.contains("PGSERVICEFILE"),
        "{text}"
    );
    assert_eq!(s.backup_ids().len(), 2, "two backups committed");
}

/// The daemon pointed at a missing repository and a PostgreSQL that is not
/// there: `/readyz` says why, and the log says each problem once, not at
/// every refresh.
#[test]
fn the_daemon_logs_each_problem_once() {
    let repo = tempfile::tempdir().expect("tempdir");
    let port = pitr_tests::free_port();
    let daemon = agent(&[
        "--repo",
        &format!("file://{}/missing", repo.path().display()),
        "daemon",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--refresh",
        "1s",
        "--verify-schedule",
        "",
        "--backup-schedule",
        "",
    ])
    .env("PITR_REHEARSE_SCHEDULE", "")
    .env("PGHOST", "/nonexistent-socket-dir")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("start the daemon");
    let (code, why) = pitr_tests::wait_for("/readyz", Duration::from_secs(30), || {
        super::daemon::get(port, "/readyz")
    });
    assert_eq!(code, 503, "{why}");
    assert!(
        why.contains("pitr-agent init") && why.contains("PGHOST"),
        "{why}"
    );
    // Several refreshes.
    std::thread::sleep(Duration::from_secs(4));
    super::daemon::sigterm(&daemon);
    let out = daemon.wait_with_output().expect("daemon exits");
    let log = String::from_utf8_lossy(&out.stderr);
    for problem in [
        "the repository is not usable",
        "cannot read pg_stat_archiver",
    ] {
        assert_eq!(
            log.matches(problem).count(),
            1,
            "{problem:?} logged once:\n{log}"
        );
    }
    assert!(
        !repo.path().join("missing").exists(),
        "the daemon created the repository"
    );
}

/// A `backup.json` that is not JSON is the damaged record of a backup whose
/// data may be intact: an error for `verify`, never debris for `prune`.
#[test]
fn a_damaged_backup_record_is_an_error_never_debris() {
    let dir = pitr_tests::user_tempdir(RunAs::test_user(), "damaged");
    let repo = format!("file://{}/repo", dir.path().display());
    let out = agent(&["--repo", &repo, "init"]).output().expect("init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = dir.path().join("repo/backups/20260101T000000Z/backup.json");
    std::fs::create_dir_all(record.parent().expect("parent")).expect("mkdir");
    std::fs::write(&record, "{not json").expect("write");
    RunAs::test_user().chown_tree(dir.path());
    let out = agent(&["--repo", &repo, "verify"])
        .output()
        .expect("verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("20260101T000000Z"))
        .unwrap_or_default();
    assert!(
        line.starts_with("error") && line.contains("prune never removes it"),
        "{text}"
    );
    let out = agent(&[
        "--repo",
        &repo,
        "prune",
        "--retain-full",
        "1",
        "--debris-grace",
        "0s",
    ])
    .output()
    .expect("prune");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(record.exists(), "prune removed a damaged record");
}
