//! The Odoo filestore restored with the database, at a point in time.
//!
//! A stand-in stores exactly as Odoo does: files named by their SHA-1 under
//! `filestore/<db>/<xx>/`, written before the `ir_attachment` row that
//! references them commits; deletions remove rows, and a later garbage
//! collection removes the files no row references.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pitr_tests::RunAs;
use pitr_tests::s3::S3Kind;
use rand::RngCore as _;
use sha1::Digest as _;

use super::restore::{Restored, ok};
use super::{Setup, pg_bin};

/// The stand-in Odoo: one database `odoo` and its filestore directory.
struct Odoo<'a> {
    s: &'a Setup,
    root: PathBuf,
}

impl Odoo<'_> {
    fn sql(&self, sql: &str) -> String {
        self.s.pg.sql_in("odoo", sql)
    }

    /// Stores `content` as Odoo does: the file first, then the row.
    /// Returns the attachment id and its store_fname.
    fn attach(&self, name: &str, content: &[u8]) -> (String, String) {
        let sha = hex::encode(sha1::Sha1::digest(content));
        let rel = format!("{}/{sha}", &sha[..2]);
        let path = self.root.join("odoo").join(&rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, content).expect("write the file");
        std::fs::rename(&tmp, &path).expect("rename");
        let id = self.sql(&format!(
            "INSERT INTO ir_attachment (name, store_fname, checksum, file_size) \
             VALUES ('{name}', '{rel}', '{sha}', {}) RETURNING id",
            content.len()
        ));
        (id, rel)
    }

    /// Odoo's garbage collection: files no row references go.
    fn gc(&self) {
        let referenced = self.sql("SELECT string_agg(store_fname, ' ') FROM ir_attachment");
        let keep: Vec<&str> = referenced.split(' ').collect();
        for shard in std::fs::read_dir(self.root.join("odoo")).expect("read the filestore") {
            let shard = shard.expect("entry").path();
            for f in std::fs::read_dir(&shard).expect("read a shard") {
                let f = f.expect("entry").path();
                let rel = format!(
                    "{}/{}",
                    shard.file_name().expect("name").to_string_lossy(),
                    f.file_name().expect("name").to_string_lossy()
                );
                if !keep.contains(&rel.as_str()) {
                    std::fs::remove_file(&f).expect("gc");
                }
            }
        }
    }

    /// Deletes the attachment's row, then runs the garbage collection.
    fn detach(&self, rel: &str) {
        self.sql(&format!(
            "DELETE FROM ir_attachment WHERE store_fname = '{rel}'"
        ));
        self.gc();
    }

    fn sync(&self) -> Output {
        self.s
            .agent(&["filestore-sync", "--json", "--path"])
            .arg(&self.root)
            .output()
            .expect("run filestore-sync")
    }
}

fn random(len: usize, header: &[u8]) -> Vec<u8> {
    let mut v = vec![0; len];
    rand::rng().fill_bytes(&mut v);
    v[..header.len()].copy_from_slice(header);
    v
}

fn json(out: &Output) -> serde_json::Value {
    super::stdout_json(out)
}

fn the_filestore_comes_back_at_a_point_in_time(kind: Option<S3Kind>, large_mb: usize) {
    let Some(bin) = pg_bin() else { return };
    let conf = ["track_commit_timestamp = on"];
    let Some(s) = (match kind {
        None => Some(Setup::file_with(&bin, &conf)),
        Some(kind) => Setup::s3_with(&bin, kind, "filestore", &conf),
    }) else {
        return;
    };
    s.pg.exec("CREATE DATABASE odoo");
    let volume = pitr_tests::user_tempdir(RunAs::test_user(), "odoo-data");
    let odoo = Odoo {
        s: &s,
        root: volume.path().join("filestore"),
    };
    odoo.sql(
        "CREATE TABLE ir_attachment (id serial PRIMARY KEY, name text, store_fname varchar, \
         checksum varchar(40), file_size int)",
    );
    s.backup();
    let text = b"<record model=\"account.move.line\"><field name=\"name\">Line</field></record>\n"
        .repeat(4000);
    let (_, text_rel) = odoo.attach("invoice.xml", &text);
    let pdf = random(300 << 10, b"%PDF-1.7\n");
    let (_, pdf_rel) = odoo.attach("invoice.pdf", &pdf);
    let jpeg = random(200 << 10, &[0xff, 0xd8, 0xff, 0xe0]);
    let (_, jpeg_rel) = odoo.attach("logo.jpg", &jpeg);
    // The same file under two attachments, as Odoo deduplicates.
    let _ = odoo.attach("logo-copy.jpg", &jpeg);
    let large = random(large_mb << 20, b"%PDF-1.4\n");
    let (_, large_rel) = odoo.attach("scan.pdf", &large);
    RunAs::test_user().chown_tree(volume.path());
    let out = odoo.sync();
    ok(&out, "filestore-sync");
    let report = json(&out);
    assert_eq!(report["files-uploaded"], 4, "{report}");
    assert!(
        report["bytes-stored"].as_u64() < report["bytes-uploaded"].as_u64(),
        "the XML was compressed: {report}"
    );
    if let Some(dir) = &s.dir {
        let objects = dir.join("filestore/odoo");
        assert!(
            objects.join(format!("{text_rel}.gz")).exists(),
            "XML compressed"
        );
        assert!(objects.join(&pdf_rel).exists(), "PDF stored as it is");
        assert!(objects.join(&jpeg_rel).exists(), "JPEG stored as it is");
    }
    // Nothing new: a second sync stores nothing.
    let again = json(&odoo.sync());
    assert_eq!(again["files-uploaded"], 0, "{again}");

    std::thread::sleep(std::time::Duration::from_millis(1100));
    let target = s.pg.sql("SELECT now()");
    std::thread::sleep(std::time::Duration::from_millis(1100));

    // After the target: the XML's row is deleted and its file collected;
    // a new attachment arrives.
    odoo.sql(&format!(
        "DELETE FROM ir_attachment WHERE store_fname = '{text_rel}'"
    ));
    odoo.gc();
    assert!(!odoo.root.join("odoo").join(&text_rel).exists());
    let later = random(10 << 10, b"later");
    let (_, later_rel) = odoo.attach("later.bin", &later);
    RunAs::test_user().chown_tree(volume.path());
    ok(&odoo.sync(), "filestore-sync after the target");
    let _ = s.archive_now();

    let r = Restored::new(&bin);
    let restored_fs = r.socket.join("filestore");
    let out = r.pgrestore(
        &s,
        &[
            "--target-time",
            &target,
            "--start",
            "--target-action",
            "promote",
            "--filestore",
            &restored_fs.display().to_string(),
        ],
    );
    ok(&out, "pgrestore --filestore");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("restored 4 files"), "{said}");
    for (rel, content) in [
        (&text_rel, &text),
        (&pdf_rel, &pdf),
        (&jpeg_rel, &jpeg),
        (&large_rel, &large),
    ] {
        let got = std::fs::read(restored_fs.join("odoo").join(rel))
            .unwrap_or_else(|e| panic!("{rel} restored: {e}"));
        assert!(got == *content, "{rel} is byte-identical");
    }
    assert!(
        !restored_fs.join("odoo").join(&later_rel).exists(),
        "a file referenced only after the target is not restored"
    );

    // Later, against the restored server alone (as the Kubernetes restore
    // Job does once PostgreSQL runs again): the same files.
    let again_fs = r.socket.join("filestore-again");
    let mut cmd = Command::new(pitr_tests::bins::pgrestore());
    RunAs::test_user().apply(&mut cmd);
    let out = cmd
        .current_dir(std::env::temp_dir())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(s.env.iter().cloned())
        .env("PGHOST", &r.socket)
        .env("PGPORT", r.port.to_string())
        .env("PGUSER", "postgres")
        .args(["--repo", &s.repo, "--filestore"])
        .arg(&again_fs)
        .output()
        .expect("run pgrestore --filestore");
    ok(&out, "pgrestore --filestore alone");
    for rel in [&text_rel, &pdf_rel, &jpeg_rel, &large_rel] {
        assert!(
            again_fs.join("odoo").join(rel).is_file(),
            "{rel} restored again"
        );
    }
}

#[test]
fn the_filestore_comes_back_at_a_point_in_time_from_a_file_repository() {
    the_filestore_comes_back_at_a_point_in_time(None, 50);
}

#[test]
fn the_filestore_comes_back_at_a_point_in_time_from_s3() {
    the_filestore_comes_back_at_a_point_in_time(Some(S3Kind::S3sFs), 12);
}

/// A file whose content does not hash to its name is reported and never
/// uploaded; a file the sync had not stored yet is named by the restore,
/// which exits 1.
#[test]
fn a_corrupt_file_is_refused_and_a_missing_one_named() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file(&bin);
    s.pg.exec("CREATE DATABASE odoo");
    let volume = pitr_tests::user_tempdir(RunAs::test_user(), "odoo-data");
    let odoo = Odoo {
        s: &s,
        root: volume.path().join("filestore"),
    };
    odoo.sql("CREATE TABLE ir_attachment (id serial PRIMARY KEY, name text, store_fname varchar, checksum varchar(40), file_size int)");
    s.backup();
    let (_, good) = odoo.attach("good.txt", b"good content");
    let bad_sha = hex::encode(sha1::Sha1::digest(b"what it was"));
    let bad = odoo.root.join("odoo").join(&bad_sha[..2]).join(&bad_sha);
    std::fs::create_dir_all(bad.parent().expect("parent")).expect("mkdir");
    std::fs::write(&bad, b"what it became").expect("write");
    RunAs::test_user().chown_tree(volume.path());
    let out = odoo.sync();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&bad_sha) && err.contains("not uploaded"),
        "{err}"
    );
    let repo_dir = s.dir.as_ref().expect("file repository");
    assert!(repo_dir.join("filestore/odoo").join(&good).exists());
    assert!(
        !repo_dir
            .join("filestore/odoo")
            .join(&bad_sha[..2])
            .join(&bad_sha)
            .exists()
            && !repo_dir
                .join("filestore/odoo")
                .join(format!("{}/{bad_sha}.gz", &bad_sha[..2]))
                .exists(),
        "a corrupt file was uploaded"
    );

    // The sync lags: the newest attachment's file is not stored.
    let (late_id, _) = odoo.attach("late.txt", b"written after the last sync");
    let _ = s.archive_now();
    let r = Restored::new(&bin);
    let restored_fs: &Path = &r.socket.join("filestore");
    let out = r.pgrestore(
        &s,
        &[
            "--target",
            "latest",
            "--start",
            "--filestore",
            &restored_fs.display().to_string(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("attachment {late_id} in database odoo"))
            && err.contains("not in the repository"),
        "{err}"
    );
    assert!(
        restored_fs.join("odoo").join(&good).exists(),
        "the stored file came back"
    );
}

/// `filestore-sync --every` as the sidecar runs it: new files are stored
/// within the interval, `/metrics` counts them, SIGTERM ends it with 0.
#[test]
fn the_sidecar_syncs_on_its_interval_and_exports_metrics() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file(&bin);
    let volume = pitr_tests::user_tempdir(RunAs::test_user(), "odoo-data");
    let root = volume.path().join("filestore");
    std::fs::create_dir_all(root.join("odoo")).expect("mkdir");
    RunAs::test_user().chown_tree(volume.path());
    let port = pitr_tests::free_port();
    let child = s
        .agent(&["filestore-sync", "--every", "1s", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--path")
        .arg(&root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start filestore-sync --every");
    let metric = |name: &str| -> Option<f64> {
        let (_, body) = super::daemon::get(port, "/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
    };
    pitr_tests::wait_for("a first sync", std::time::Duration::from_secs(30), || {
        metric("pitr_filestore_last_sync_timestamp_seconds").filter(|t| *t > 0.0)
    });
    let content = b"an attachment written while the sidecar runs";
    let sha = hex::encode(sha1::Sha1::digest(content));
    let file = root.join("odoo").join(&sha[..2]).join(&sha);
    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    std::fs::write(&file, content).expect("write");
    RunAs::test_user().chown_tree(volume.path());
    pitr_tests::wait_for(
        "the file counted",
        std::time::Duration::from_secs(30),
        || metric("pitr_filestore_files_synced_total").filter(|n| *n >= 1.0),
    );
    let stored = s
        .dir
        .as_ref()
        .expect("file repository")
        .join("filestore/odoo");
    assert!(
        stored.join(&sha[..2]).join(&sha).exists()
            || stored.join(format!("{}/{sha}.gz", &sha[..2])).exists(),
        "the file is in the repository"
    );
    super::daemon::sigterm(&child);
    let out = child.wait_with_output().expect("exit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sync through an S3 store that fails a fifth of its requests (503s,
/// writes applied but answered 500, dropped connections): it ends with
/// every file stored once, a second sync finds nothing to do, and the
/// restore gets every file back byte-identical.
#[test]
fn a_flaky_store_loses_no_file() {
    use pitr_tests::faultproxy::{Fault, FaultProxy};
    let Some(bin) = pg_bin() else { return };
    let Some(s) = Setup::s3(&bin, S3Kind::Moto, "filestore-flaky") else {
        return;
    };
    s.pg.exec("CREATE DATABASE odoo");
    let volume = pitr_tests::user_tempdir(RunAs::test_user(), "odoo-data");
    let odoo = Odoo {
        s: &s,
        root: volume.path().join("filestore"),
    };
    odoo.sql(
        "CREATE TABLE ir_attachment (id serial PRIMARY KEY, name text, store_fname varchar, \
         checksum varchar(40), file_size int)",
    );
    s.backup();
    let mut files = Vec::new();
    for i in 0..40 {
        let content = if i % 2 == 0 {
            format!("<line id=\"{i}\">text that compresses</line>\n")
                .repeat(200)
                .into_bytes()
        } else {
            random(20 << 10, b"\xff\xd8\xff")
        };
        let (_, rel) = odoo.attach(&format!("f{i}"), &content);
        files.push((rel, content));
    }
    let large = random(12 << 20, b"%PDF-1.4\n");
    let (_, large_rel) = odoo.attach("scan.pdf", &large);
    files.push((large_rel, large));
    RunAs::test_user().chown_tree(volume.path());

    let endpoint = s
        .server
        .as_ref()
        .expect("an S3 server")
        .endpoint()
        .to_owned();
    let proxy = FaultProxy::start(
        &endpoint,
        0xf11e,
        0.2,
        &[
            Fault::Unavailable,
            Fault::FailedAfterWrite,
            Fault::DropBefore,
            Fault::DropAfter,
        ],
    );
    let flaky_sync = || {
        s.agent(&["filestore-sync", "--json", "--path"])
            .arg(&odoo.root)
            .env("PITR_S3_ENDPOINT", proxy.endpoint())
            .env("PITR_S3_MAX_ATTEMPTS", "8")
            .output()
            .expect("run filestore-sync")
    };
    let out = flaky_sync();
    ok(&out, "filestore-sync through the faults");
    assert_eq!(json(&out)["files-uploaded"], 41);
    let again = flaky_sync();
    ok(&again, "a second sync through the faults");
    assert_eq!(json(&again)["files-uploaded"], 0);
    assert!(
        proxy
            .counts
            .faulted
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3,
        "faults happened: {:?}",
        proxy.counts
    );

    let _ = s.archive_now();
    let r = Restored::new(&bin);
    let restored_fs = r.socket.join("filestore");
    let out = r.pgrestore(
        &s,
        &[
            "--target",
            "latest",
            "--start",
            "--filestore",
            &restored_fs.display().to_string(),
        ],
    );
    ok(&out, "pgrestore --filestore after the flaky sync");
    for (rel, content) in &files {
        let got = std::fs::read(restored_fs.join("odoo").join(rel)).expect("restored file");
        assert!(got == *content, "{rel} is byte-identical");
    }
}

/// Whether a file repository holds `rel` of database odoo (plain or gzip).
fn stored(s: &Setup, rel: &str) -> bool {
    let dir = s
        .dir
        .as_ref()
        .expect("file repository")
        .join("filestore/odoo");
    dir.join(rel).exists() || dir.join(format!("{rel}.gz")).exists()
}

/// Retention keeps every file a restorable point may reference: a file goes
/// only once its removal from the volume was recorded before the oldest kept
/// backup started; a file that came back, or went after that start, stays;
/// a pruned file that comes back is stored again. The rehearsal then proves
/// every referenced file is in the repository, and fails naming the one
/// deleted behind its back.
#[test]
fn prune_keeps_every_file_a_restorable_point_references() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file(&bin);
    s.pg.exec("CREATE DATABASE odoo");
    let volume = pitr_tests::user_tempdir(RunAs::test_user(), "odoo-data");
    let odoo = Odoo {
        s: &s,
        root: volume.path().join("filestore"),
    };
    odoo.sql("CREATE TABLE ir_attachment (id serial PRIMARY KEY, name text, store_fname varchar, checksum varchar(40), file_size int)");
    s.backup();
    let (keep_id, keep) = odoo.attach("keep.txt", b"kept all along");
    let (_, gone) = odoo.attach("gone.txt", b"collected before the oldest kept backup");
    let (_, back) = odoo.attach("back.txt", b"collected, then attached again");
    let (_, late) = odoo.attach("late.txt", b"collected after the oldest kept backup");
    RunAs::test_user().chown_tree(volume.path());
    assert_eq!(json(&odoo.sync())["files-uploaded"], 4);
    odoo.detach(&gone);
    odoo.detach(&back);
    let report = json(&odoo.sync());
    assert_eq!(report["files-removed"], 2, "{report}");
    let _ = odoo.attach("back-again.txt", b"collected, then attached again");
    RunAs::test_user().chown_tree(volume.path());
    let report = json(&odoo.sync());
    assert_eq!(report["files-uploaded"], 0, "still stored: {report}");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    s.backup();
    odoo.detach(&late);
    assert_eq!(json(&odoo.sync())["files-removed"], 1);

    let prune = |extra: &[&str]| {
        let out = s
            .agent(&["prune", "--retain-full", "1"])
            .args(extra)
            .output()
            .expect("run prune");
        ok(&out, "prune");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The default margin (1 h) covers a removal a second before the backup.
    let said = prune(&["--dry-run"]);
    assert!(!said.contains("filestore"), "{said}");
    let said = prune(&["--filestore-margin", "0s", "--dry-run"]);
    assert!(said.contains("would delete 1 filestore files"), "{said}");
    assert!(stored(&s, &gone), "a dry run deletes nothing");
    let said = prune(&["--filestore-margin", "0s"]);
    assert!(said.contains("1 filestore files"), "{said}");
    assert!(
        !stored(&s, &gone),
        "collected before the oldest kept backup"
    );
    for (rel, why) in [
        (&keep, "referenced"),
        (&back, "attached again"),
        (&late, "collected after the oldest kept backup started"),
    ] {
        assert!(stored(&s, rel), "{rel} is kept: {why}");
    }
    // The pruned file comes back: the next sync stores it again.
    let _ = odoo.attach("gone-again.txt", b"collected before the oldest kept backup");
    RunAs::test_user().chown_tree(volume.path());
    assert_eq!(json(&odoo.sync())["files-uploaded"], 1);
    assert!(stored(&s, &gone));
    let _ = s.archive_now();

    let scratch = pitr_tests::user_tempdir(RunAs::test_user(), "rehearse");
    let rehearse = || {
        let out = s
            .agent(&["rehearse", "--json", "--rehearse-dir"])
            .arg(scratch.path())
            .output()
            .expect("run rehearse");
        let record: serde_json::Value = json(&out);
        (out.status.code(), record)
    };
    let (code, record) = rehearse();
    assert_eq!(code, Some(0), "{record}");
    assert_eq!(record["filestore-files"], 3, "keep, back, gone: {record}");
    let repo_dir = s.dir.as_ref().expect("file repository");
    let keep_object = repo_dir.join("filestore/odoo").join(&keep);
    std::fs::remove_file(&keep_object).expect("delete an object behind the sync's back");
    let (code, record) = rehearse();
    assert_ne!(code, Some(0), "{record}");
    assert_eq!(record["reason"], "filestore", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("attachment {keep_id} ({keep})")),
        "{record}"
    );
}

/// A sync SIGKILLed while it uploads a large file leaves nothing visible
/// under the file's name (only a temp file, which prune removes later); the
/// next sync stores the file whole.
#[test]
fn a_sync_killed_mid_upload_leaves_nothing_half_written() {
    let Some(bin) = pg_bin() else { return };
    let s = Setup::file(&bin);
    let volume = pitr_tests::user_tempdir(RunAs::test_user(), "odoo-data");
    let root = volume.path().join("filestore");
    let large = random(200 << 20, b"%PDF-1.5\n");
    let sha = hex::encode(sha1::Sha1::digest(&large));
    let rel = format!("{}/{sha}", &sha[..2]);
    std::fs::create_dir_all(root.join("odoo").join(&sha[..2])).expect("mkdir");
    std::fs::write(root.join("odoo").join(&rel), &large).expect("write");
    RunAs::test_user().chown_tree(volume.path());
    let shard = s
        .dir
        .as_ref()
        .expect("file repository")
        .join("filestore/odoo")
        .join(&sha[..2]);
    let mut child = s
        .agent(&["filestore-sync", "--path"])
        .arg(&root)
        .spawn()
        .expect("start filestore-sync");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let temp_seen = loop {
        let temp = std::fs::read_dir(&shard).ok().is_some_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains(".tmp."))
        });
        if temp {
            break true;
        }
        if child.try_wait().expect("wait").is_some() || std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(temp_seen, "the upload was not caught midway");
    // SIGKILL: no handler runs, as when the pod is killed.
    child.kill().expect("kill");
    let _ = child.wait();
    assert!(!stored(&s, &rel), "nothing under the file's name");
    let out = s
        .agent(&["filestore-sync", "--json", "--path"])
        .arg(&root)
        .output()
        .expect("run filestore-sync");
    ok(&out, "filestore-sync after the kill");
    assert_eq!(json(&out)["files-uploaded"], 1);
    let got = std::fs::read(shard.join(&sha)).expect("stored plain");
    assert!(got == large, "stored whole");
}
