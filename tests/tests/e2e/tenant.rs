//! `pgrestore --database NAME`: one tenant of a shared cluster back to a
//! point in time, into the live cluster, without touching the others.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use pitr_tests::RunAs;
use rand::Rng as _;

use super::restore::ok;
use super::{Setup, pg_bin};

/// `pgrestore --repo REPO ARGS` against the live cluster of `s`, as the test user.
fn pgrestore_cmd(s: &Setup, args: &[&str]) -> Command {
    let mut cmd = Command::new(pitr_tests::bins::pgrestore());
    RunAs::test_user().apply(&mut cmd);
    cmd.current_dir(std::env::temp_dir())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(s.env.iter().cloned())
        .envs(s.pg.client_env())
        .args(["--repo", &s.repo])
        .args(args);
    cmd
}

fn pgrestore(s: &Setup, args: &[&str]) -> Output {
    pgrestore_cmd(s, args).output().expect("run pgrestore")
}

fn sql_in(s: &Setup, db: &str, sql: &str) -> String {
    s.pg.sql_in(db, sql)
}

fn json(out: &Output) -> serde_json::Value {
    super::stdout_json(out)
}

/// The rows of `invoice` (committed at or before `t`, when given), as one digest.
fn digest(s: &Setup, db: &str, t: Option<&str>) -> (u64, String) {
    let filter = t.map_or(String::new(), |t| {
        format!("WHERE pg_xact_commit_timestamp(xmin) <= '{t}'")
    });
    let row = sql_in(
        s,
        db,
        &format!(
            "SELECT count(*) || ' ' || coalesce(md5(string_agg(id || ':' || amount, ',' ORDER BY id)), '-') \
             FROM invoice {filter}"
        ),
    );
    let (n, d) = row.split_once(' ').expect("count and digest");
    (n.parse().expect("count"), d.to_owned())
}

fn databases(s: &Setup, like: &str) -> Vec<String> {
    let list = s.pg.sql(&format!(
        "SELECT coalesce(string_agg(datname, ' ' ORDER BY datname), '') FROM pg_database WHERE datname LIKE '{like}'"
    ));
    list.split_whitespace().map(str::to_owned).collect()
}

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

/// Three tenants written concurrently while a backup runs and WAL is
/// archived. Tenant b deletes half its invoices after a random second T;
/// `pgrestore --database b --target-time T` brings b back at T beside the
/// live one, and `--replace` puts it in place, while a and c keep every row
/// written after T.
#[test]
fn one_tenant_comes_back_to_a_random_second_beside_the_others() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file_with(&bin, &["track_commit_timestamp = on"]);
    s.pg.exec("CREATE ROLE odoo LOGIN; CREATE ROLE reporter");
    for db in ["a", "b", "c"] {
        s.pg.exec(&format!("CREATE DATABASE {db} OWNER odoo"));
        sql_in(
            &s,
            db,
            "CREATE TABLE invoice (id serial PRIMARY KEY, amount int NOT NULL); \
             ALTER TABLE invoice OWNER TO odoo; GRANT SELECT ON invoice TO reporter; \
             INSERT INTO invoice (amount) SELECT g FROM generate_series(1, 20000) g",
        );
    }
    s.pg.exec("ALTER DATABASE b SET work_mem = '8MB'");
    s.backup();
    let script = s.pg.dir.path().join("load.sql");
    std::fs::write(
        &script,
        "INSERT INTO invoice (amount) VALUES ((random() * 1000)::int);\n",
    )
    .expect("write the pgbench script");
    RunAs::test_user().chown_tree(&script);
    let load: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|db| {
            let mut args = s.pg.conn_args();
            args[7] = db.into();
            Command::new(s.pg.bin.tool("pgbench"))
                .args(args)
                .args(["-n", "-T", "6", "-c", "1", "-f"])
                .arg(&script)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start pgbench")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    s.backup();
    std::thread::sleep(Duration::from_millis(rand::rng().random_range(300..2000)));
    let t = s.pg.sql("SELECT now()");
    for child in load {
        let out = child.wait_with_output().expect("pgbench");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let expected_b = digest(&s, "b", Some(&t));
    let a_at_t = digest(&s, "a", Some(&t)).0;
    sql_in(&s, "b", "DELETE FROM invoice WHERE id % 2 = 0");
    let live = [
        ("a", digest(&s, "a", None)),
        ("b", digest(&s, "b", None)),
        ("c", digest(&s, "c", None)),
    ];
    assert!(live[0].1.0 > a_at_t, "a was written after T");
    let _ = s.archive_now();

    let scratch = pitr_tests::user_tempdir(RunAs::test_user(), "tenant-scratch");
    let scratch_arg = scratch.path().display().to_string();
    let out = pgrestore(
        &s,
        &[
            "--database",
            "b",
            "--target-time",
            &t,
            "--scratch",
            &scratch_arg,
            "--dry-run",
        ],
    );
    ok(&out, "pgrestore --database b --dry-run");
    let said = String::from_utf8_lossy(&out.stderr);
    eprintln!("{said}");
    assert!(
        said.contains("restore database b to") && said.contains("are not extracted"),
        "{said}"
    );
    assert!(
        databases(&s, "b\\_restored%").is_empty(),
        "a dry run creates nothing"
    );
    assert!(empty(scratch.path()));
    let out = pgrestore(
        &s,
        &[
            "--database",
            "b",
            "--target-time",
            &t,
            "--scratch",
            &scratch_arg,
            "--json",
        ],
    );
    ok(&out, "pgrestore --database b");
    let report = json(&out);
    let restored = report["restored-as"]
        .as_str()
        .expect("restored-as")
        .to_owned();
    assert!(restored.starts_with("b_restored_"), "{report}");
    assert_eq!(report["plan"]["only-its-files"], true, "{report}");
    assert!(
        report["plan"]["skipped-bytes"].as_u64() > Some(0),
        "a and c were not extracted: {report}"
    );
    assert!(empty(scratch.path()), "the scratch cluster was removed");
    assert_eq!(
        digest(&s, &restored, None),
        expected_b,
        "{restored} holds exactly b's rows committed at or before T"
    );
    for (db, before) in &live {
        assert_eq!(&digest(&s, db, None), before, "{db} is untouched");
    }
    assert_eq!(
        sql_in(
            &s,
            &restored,
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        ),
        "odoo"
    );
    assert_eq!(
        sql_in(
            &s,
            &restored,
            "SELECT has_table_privilege('reporter', 'invoice', 'SELECT')::text"
        ),
        "true",
        "privileges came along"
    );
    assert_eq!(
        sql_in(&s, &restored, "SHOW work_mem"),
        "8MB",
        "database settings came along"
    );
    assert_eq!(
        s.pg.sql(&format!(
            "SELECT datconnlimit FROM pg_database WHERE datname = '{restored}'"
        )),
        "-1",
        "open once complete"
    );

    // The same name again is refused before anything is done.
    let out = pgrestore(
        &s,
        &[
            "--database",
            "b",
            "--target-time",
            &t,
            "--as",
            &restored,
            "--scratch",
            &scratch_arg,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("already exists") && err.contains("--as"),
        "{err}"
    );

    // --replace, with a session open on b: it is ended, b is b at T, and
    // the live b stays whole as b_before_*.
    let mut args = s.pg.conn_args();
    args[7] = "b".into();
    let mut session = Command::new(s.pg.bin.tool("psql"))
        .args(args)
        .args(["-X", "-c", "SELECT pg_sleep(120)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("open a session on b");
    std::thread::sleep(Duration::from_millis(300));
    let out = pgrestore(
        &s,
        &[
            "--database",
            "b",
            "--target-time",
            &t,
            "--replace",
            "--scratch",
            &scratch_arg,
        ],
    );
    ok(&out, "pgrestore --database b --replace");
    let status = session.wait().expect("the session ends");
    assert!(!status.success(), "the session on the old b was ended");
    assert_eq!(digest(&s, "b", None), expected_b, "b is b at T");
    let before = databases(&s, "b\\_before\\_%");
    assert_eq!(before.len(), 1, "{before:?}");
    s.pg.exec(&format!(
        "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
        before[0]
    ));
    assert_eq!(
        digest(&s, &before[0], None),
        live[1].1,
        "the old b is kept whole"
    );
    for (db, d) in [&live[0], &live[2]] {
        assert_eq!(&digest(&s, db, None), d, "{db} is untouched");
    }
    assert!(empty(scratch.path()));
}

/// A role the restored database needs and the live cluster lacks is named
/// before anything is created; a SIGTERM mid-copy leaves no half-made
/// database; `--neutralize` leaves no active mail server or cron (but
/// Odoo's autovacuum) and marks the database; `--filestore` brings the
/// tenant's files under its new name.
#[test]
fn a_tenant_restore_refuses_cleans_up_and_neutralizes() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file_with(&bin, &["track_commit_timestamp = on"]);
    s.pg.exec("CREATE ROLE odoo LOGIN; CREATE ROLE auditor");
    s.pg.exec("CREATE DATABASE shop OWNER odoo");
    s.pg.exec("CREATE DATABASE other");
    sql_in(
        &s,
        "shop",
        "CREATE TABLE invoice (id serial PRIMARY KEY, amount int NOT NULL, note text); \
         ALTER TABLE invoice OWNER TO odoo; \
         INSERT INTO invoice (amount, note) SELECT g, repeat('x', 200) FROM generate_series(1, 400000) g; \
         CREATE TABLE audit (id int); ALTER TABLE audit OWNER TO auditor; \
         CREATE TABLE ir_mail_server (id serial PRIMARY KEY, active bool); \
         INSERT INTO ir_mail_server (active) VALUES (true), (true); \
         CREATE TABLE ir_cron (id serial PRIMARY KEY, active bool); \
         INSERT INTO ir_cron (active) VALUES (true), (true), (true); \
         CREATE TABLE ir_model_data (id serial, module text, name text, model text, res_id int); \
         INSERT INTO ir_model_data (module, name, model, res_id) VALUES ('base', 'autovacuum_job', 'ir.cron', 2); \
         CREATE TABLE ir_config_parameter (id serial, key text UNIQUE, value text); \
         CREATE TABLE ir_attachment (id serial PRIMARY KEY, name text, store_fname varchar)",
    );
    // One attachment, stored as Odoo does, and synced.
    let volume = pitr_tests::user_tempdir(RunAs::test_user(), "odoo-data");
    let content = b"an invoice PDF stand-in\n".repeat(100);
    let sha = {
        use sha1::Digest as _;
        hex::encode(sha1::Sha1::digest(&content))
    };
    let rel = format!("{}/{sha}", &sha[..2]);
    let file = volume.path().join("filestore/shop").join(&rel);
    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    std::fs::write(&file, &content).expect("write");
    sql_in(
        &s,
        "shop",
        &format!("INSERT INTO ir_attachment (name, store_fname) VALUES ('invoice.pdf', '{rel}')"),
    );
    RunAs::test_user().chown_tree(volume.path());
    let out = s
        .agent(&["filestore-sync", "--path"])
        .arg(volume.path().join("filestore"))
        .output()
        .expect("filestore-sync");
    ok(&out, "filestore-sync");
    s.backup();
    std::thread::sleep(Duration::from_millis(1100));
    let t = s.pg.sql("SELECT now()");
    std::thread::sleep(Duration::from_millis(1100));
    sql_in(&s, "shop", "DROP TABLE audit");
    s.pg.exec("DROP ROLE auditor");
    let _ = s.archive_now();
    let scratch = pitr_tests::user_tempdir(RunAs::test_user(), "tenant-scratch");
    let scratch_arg = scratch.path().display().to_string();
    let base = [
        "--database",
        "shop",
        "--target-time",
        &t,
        "--scratch",
        &scratch_arg,
    ];

    let out = pgrestore(&s, &base);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("needs roles the live cluster lacks: auditor")
            && err.contains("Nothing was created"),
        "{err}"
    );
    assert!(
        databases(&s, "shop\\_restored%").is_empty(),
        "nothing created"
    );
    assert!(empty(scratch.path()));
    s.pg.exec("CREATE ROLE auditor");

    // SIGTERM once the copy has begun.
    let mut child = pgrestore_cmd(&s, &base)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pgrestore");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if !databases(&s, "shop\\_restored%").is_empty() {
            break;
        }
        assert!(
            child.try_wait().expect("wait").is_none() && std::time::Instant::now() < deadline,
            "the copy was not caught midway"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("pgrestore ends");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("interrupted") && err.contains("was dropped"),
        "{err}"
    );
    assert!(
        databases(&s, "shop\\_restored%").is_empty(),
        "the half-made copy is gone"
    );
    assert!(empty(scratch.path()), "the scratch cluster was removed");

    // --neutralize and --filestore, under a name of our own.
    let fs_dir = volume.path().join("restored-filestore");
    let fs_arg = fs_dir.display().to_string();
    let mut args = base.to_vec();
    args.extend([
        "--as",
        "shop_staging",
        "--neutralize",
        "--filestore",
        &fs_arg,
        "--json",
    ]);
    let out = pgrestore(&s, &args);
    ok(&out, "pgrestore --neutralize --filestore");
    let report = json(&out);
    assert_eq!(report["restored-as"], "shop_staging");
    assert_eq!(
        report["neutralize-skipped"],
        serde_json::json!(["fetchmail_server"]),
        "{report}"
    );
    assert_eq!(
        sql_in(
            &s,
            "shop_staging",
            "SELECT count(*) FROM ir_mail_server WHERE active"
        ),
        "0"
    );
    assert_eq!(
        sql_in(
            &s,
            "shop_staging",
            "SELECT string_agg(id::text, ',') FROM ir_cron WHERE active"
        ),
        "2",
        "only Odoo's autovacuum job stays active"
    );
    assert_eq!(
        sql_in(
            &s,
            "shop_staging",
            "SELECT value FROM ir_config_parameter WHERE key = 'database.is_neutralized'"
        ),
        "true"
    );
    assert_eq!(
        sql_in(&s, "shop_staging", "SELECT count(*) FROM invoice"),
        "400000"
    );
    assert_eq!(
        sql_in(
            &s,
            "shop",
            "SELECT count(*) FROM ir_mail_server WHERE active"
        ),
        "2",
        "the live one keeps its mail"
    );
    let got = std::fs::read(fs_dir.join("shop_staging").join(&rel)).expect("the tenant's file");
    assert!(got == content, "byte-identical");
}

fn psql_at(bin: &pitr_tests::pg::PgBin, socket: &Path, port: u16, db: &str, sql: &str) -> String {
    let out = Command::new(bin.tool("psql"))
        .args(["-h", &socket.display().to_string(), "-p", &port.to_string()])
        .args([
            "-U",
            "postgres",
            "-d",
            db,
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "{db}: {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// On timeline 2: the cluster was restored and promoted (carrying recovery
/// settings into its next backup), tenant t was dropped and created again
/// from a template after that backup, so its OID differs from the backup's.
/// The tenant restore notices, restores every database, and brings back t's
/// rows at T on timeline 2.
#[test]
fn a_tenant_comes_back_on_timeline_2_after_it_was_created_again() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file_with(&bin, &["track_commit_timestamp = on"]);
    s.pg.exec("CREATE DATABASE t");
    s.pg.exec("CREATE DATABASE tmpl");
    sql_in(
        &s,
        "tmpl",
        "CREATE TABLE invoice (id serial PRIMARY KEY, amount int NOT NULL); \
         INSERT INTO invoice (amount) SELECT g FROM generate_series(1, 1000) g",
    );
    s.backup();
    let _ = s.archive_now();
    s.pg.stop();
    let live = super::restore::Restored::new(&bin);
    ok(
        &live.pgrestore(&s, &["--target", "latest", "--start", "--new-primary"]),
        "restore onto timeline 2",
    );
    let at = |db: &str, sql: &str| psql_at(&bin, &live.socket, live.port, db, sql);
    assert_eq!(
        at(
            "postgres",
            "SELECT timeline_id FROM pg_control_checkpoint()"
        ),
        "2"
    );
    let env = [
        ("PGHOST".to_owned(), live.socket.display().to_string()),
        ("PGPORT".to_owned(), live.port.to_string()),
    ];
    let out = s
        .agent(&["backup"])
        .envs(env.clone())
        .output()
        .expect("backup");
    ok(&out, "backup on timeline 2");
    at("postgres", "DROP DATABASE t");
    // FILE_COPY (the only strategy before 15) copies tmpl's files on
    // replay: tmpl's files must be there, so everything is restored.
    let strategy = if bin.major >= 15 {
        " STRATEGY file_copy"
    } else {
        ""
    };
    at(
        "postgres",
        &format!("CREATE DATABASE t TEMPLATE tmpl{strategy}"),
    );
    at(
        "t",
        "INSERT INTO invoice (amount) SELECT g FROM generate_series(1, 500) g",
    );
    std::thread::sleep(Duration::from_millis(1100));
    let t = at("postgres", "SELECT now()");
    std::thread::sleep(Duration::from_millis(1100));
    at("t", "DELETE FROM invoice");
    let last = at("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while at(
        "postgres",
        "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
    ) < last
    {
        assert!(std::time::Instant::now() < deadline, "{last} archived");
        std::thread::sleep(Duration::from_millis(100));
    }

    let scratch = pitr_tests::user_tempdir(RunAs::test_user(), "tenant-scratch");
    let out = pgrestore_cmd(
        &s,
        &[
            "--database",
            "t",
            "--target-time",
            &t,
            "--as",
            "t_at_t",
            "--scratch",
            &scratch.path().display().to_string(),
        ],
    )
    .envs(env)
    .output()
    .expect("run pgrestore");
    ok(&out, "pgrestore --database t on timeline 2");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("it was created again since; restoring every database"),
        "{said}"
    );
    assert_eq!(
        at("t_at_t", "SELECT count(*), sum(amount) FROM invoice"),
        "1500|625750"
    );
    assert_eq!(
        at("t", "SELECT count(*) FROM invoice"),
        "0",
        "the live t is untouched"
    );
    assert!(empty(scratch.path()));
}
