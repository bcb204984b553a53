//! `wal-push` / `wal-fetch` through the real binary: idempotence, conflicts,
//! ownership, parallel pre-push, and every bad-input and fault case of the
//! archiving issue. Each failure must exit non-zero with one clear line.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use pitr_tests::bins::agent_cmd;
use pitr_tests::fakepg::FakePgData;
use pitr_tests::s3::S3Kind;
use pitr_tests::{RunAs, user_tempdir};

const SEG1: &str = "000000010000000000000001";
const SEG2: &str = "000000010000000000000002";
const SEG3: &str = "000000010000000000000003";
const SEG4: &str = "000000010000000000000004";
const SEG5: &str = "000000010000000000000005";

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run pitr-agent")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a failure with exit code `code` and one stderr line containing every `needle`.
fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "exit status; stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got: {err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
    assert!(!err.contains("panicked"), "panic: {err}");
}

/// `wal-push` of `name`; `PITR_INIT=auto` creates the repository on the
/// first push (these tests are about pushing; `init` has its own).
fn push(pg: &FakePgData, repo: &str, name: &str, user: RunAs) -> Command {
    let mut cmd = agent_cmd(user);
    cmd.current_dir(pg.path())
        .args(["--repo", repo, "wal-push", &FakePgData::rel(name)])
        .env("PITR_ARCHIVE_PARALLEL", "1")
        .env("PITR_INIT", "auto");
    cmd
}

fn file_repo(dir: &Path) -> String {
    format!("file://{}/repo", dir.display())
}

fn gunzip(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open object"))
        .read_to_end(&mut out)
        .expect("plain gunzip works");
    out
}

#[test]
fn push_is_idempotent_and_refuses_different_content() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    let repo = file_repo(pg.dir.path());
    let seg = pg.add_segment(SEG1, 1);

    let out = run(&mut push(&pg, &repo, SEG1, user));
    assert!(out.status.success(), "first push: {}", stderr(&out));
    let object = pg.dir.path().join("repo/wal").join(format!("{SEG1}.gz"));
    assert_eq!(
        gunzip(&object),
        std::fs::read(&seg).expect("segment"),
        "gunzip gives the segment back"
    );

    let out = run(&mut push(&pg, &repo, SEG1, user));
    assert!(
        out.status.success(),
        "identical re-push must succeed: {}",
        stderr(&out)
    );

    pg.add_segment(SEG1, 2);
    let out = run(&mut push(&pg, &repo, SEG1, user));
    assert_fails(
        &out,
        2,
        &[
            "already holds a different",
            SEG1,
            "stored sha256",
            "local sha256",
            "PITR_REPO",
        ],
    );
    // The stored copy is untouched.
    assert_ne!(gunzip(&object), std::fs::read(&seg).expect("segment"));
}

#[test]
fn pushes_history_backup_and_partial_files() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    let repo = file_repo(pg.dir.path());
    let files = [
        (
            "00000002.history",
            b"1\t0/3000000\tno recovery target specified\n".to_vec(),
        ),
        (
            "000000010000000000000002.00000028.backup",
            b"START WAL LOCATION: 0/2000028\n".to_vec(),
        ),
        (
            "000000010000000000000003.partial",
            pitr_tests::fakepg::segment_bytes(pg.system_identifier, 3),
        ),
    ];
    for (name, body) in &files {
        std::fs::write(pg.path().join("pg_wal").join(name), body).expect("write");
        user.chown_tree(&pg.path().join("pg_wal"));
        let out = run(&mut push(&pg, &repo, name, user));
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let object = pg.dir.path().join("repo/wal").join(format!("{name}.gz"));
        assert_eq!(&gunzip(&object), body, "{name}");
    }
}

#[test]
fn refuses_a_repository_owned_by_another_cluster() {
    let user = RunAs::test_user();
    let first = FakePgData::new(user);
    let repo = file_repo(first.dir.path());
    first.add_segment(SEG1, 1);
    assert!(run(&mut push(&first, &repo, SEG1, user)).status.success());

    let second = FakePgData::new(user);
    second.add_segment(SEG2, 2);
    let out = run(&mut push(&second, &repo, SEG2, user));
    assert_fails(
        &out,
        2,
        &[
            "belongs to the PostgreSQL cluster",
            &first.system_identifier.to_string(),
            &second.system_identifier.to_string(),
        ],
    );
    assert!(
        !first
            .dir
            .path()
            .join("repo/wal")
            .join(format!("{SEG2}.gz"))
            .exists()
    );
}

/// Issue 12: no command creates a repository by accident. A push into a
/// location without `pitr-repository.json` (a mistyped URL, an unmounted
/// volume whose mount point exists, the unset default) fails and writes
/// nothing; `init` creates it idempotently, the first push claims it, and
/// `PITR_INIT=auto` is the explicit opt-in.
#[test]
fn a_repository_exists_only_once_init_created_it() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    pg.add_segment(SEG1, 1);
    pg.add_segment(SEG2, 2);
    let strict_push = |repo: &str, name: &str| {
        let mut cmd = push(&pg, repo, name, user);
        cmd.env_remove("PITR_INIT");
        run(&mut cmd)
    };

    // A location that does not exist, and an empty mount point.
    let missing = pg.dir.path().join("missing");
    let mount_point = pg.dir.path().join("mnt");
    std::fs::create_dir(&mount_point).expect("mkdir");
    user.chown_tree(&mount_point);
    for root in [&missing, &mount_point] {
        let repo = format!("file://{}", root.display());
        let out = strict_push(&repo, SEG1);
        assert_fails(
            &out,
            2,
            &[&format!("no repository at {repo}"), "run `pitr-agent init`"],
        );
        assert_eq!(
            std::fs::read_dir(root).map(|d| d.count()).ok(),
            if root == &missing { None } else { Some(0) },
            "{repo}: a refused push writes nothing"
        );
    }
    // The unset default names itself.
    let mut cmd = agent_cmd(user);
    cmd.current_dir(pg.path())
        .env_remove("PITR_REPO")
        .args(["wal-push", &FakePgData::rel(SEG1)]);
    assert_fails(&run(&mut cmd), 2, &["no repository at file:///wal_archive"]);

    // init creates it with no owner; a second init changes nothing.
    let repo = format!("file://{}", missing.display());
    let init = || run(agent_cmd(user).args(["--repo", &repo, "init"]));
    let out = init();
    assert!(out.status.success(), "init: {}", stderr(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("created repository") && said.contains("no owner yet"),
        "{said}"
    );
    let record = std::fs::read(missing.join("pitr-repository.json")).expect("record");
    let out = init();
    assert!(out.status.success(), "second init: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("already exists"));
    assert_eq!(
        std::fs::read(missing.join("pitr-repository.json")).expect("record"),
        record,
        "a second init rewrites nothing"
    );

    // The first push claims it; another cluster is then refused, by push
    // and by `init --pgdata`.
    let out = strict_push(&repo, SEG1);
    assert!(out.status.success(), "push after init: {}", stderr(&out));
    let claim = std::fs::read_to_string(missing.join("pitr-owner.json")).expect("claim");
    assert!(claim.contains(&pg.system_identifier.to_string()), "{claim}");
    let other = FakePgData::new(user);
    other.add_segment(SEG3, 3);
    let mut cmd = push(&other, &repo, SEG3, user);
    cmd.env_remove("PITR_INIT");
    assert_fails(
        &run(&mut cmd),
        2,
        &[
            "belongs to the PostgreSQL cluster",
            &pg.system_identifier.to_string(),
        ],
    );
    let out = run(agent_cmd(user)
        .args(["--repo", &repo, "init", "--pgdata"])
        .arg(other.path()));
    assert_fails(&out, 2, &["belongs to the PostgreSQL cluster"]);
    let out = run(agent_cmd(user)
        .args(["--repo", &repo, "init", "--pgdata"])
        .arg(pg.path()));
    assert!(out.status.success(), "init by the owner: {}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&pg.system_identifier.to_string()));

    // PITR_INIT=auto: the first push creates the repository, owner included.
    let auto = format!("file://{}", pg.dir.path().join("auto").display());
    let out = run(&mut push(&pg, &auto, SEG2, user));
    assert!(
        out.status.success(),
        "PITR_INIT=auto push: {}",
        stderr(&out)
    );
    let record =
        std::fs::read_to_string(pg.dir.path().join("auto/pitr-repository.json")).expect("record");
    assert!(
        record.contains(&pg.system_identifier.to_string()),
        "{record}"
    );
}

/// The same on S3: a fresh prefix is refused until `init`, and `init` names
/// a missing bucket instead of creating anything.
#[test]
fn an_s3_prefix_is_a_repository_only_after_init() {
    let Some(server) = super::s3_server(S3Kind::Moto) else {
        return;
    };
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    pg.add_segment(SEG1, 1);
    let repo = server.url("fresh");
    let mut cmd = push(&pg, &repo, SEG1, user);
    cmd.env_remove("PITR_INIT").envs(server.env());
    assert_fails(&run(&mut cmd), 2, &[&format!("no repository at {repo}")]);
    for read in ["list", "verify"] {
        let out = run(agent_cmd(user)
            .envs(server.env())
            .args(["--repo", &repo, read]));
        assert_fails(&out, 2, &[&format!("no repository at {repo}")]);
    }
    let out = run(agent_cmd(user)
        .envs(server.env())
        .args(["--repo", &repo, "init"]));
    assert!(out.status.success(), "init: {}", stderr(&out));
    let mut cmd = push(&pg, &repo, SEG1, user);
    cmd.env_remove("PITR_INIT").envs(server.env());
    let out = run(&mut cmd);
    assert!(out.status.success(), "push after init: {}", stderr(&out));

    let out =
        run(agent_cmd(user)
            .envs(server.env())
            .args(["--repo", "s3://no-such-bucket/x", "init"]));
    assert_fails(&out, 2, &["bucket \"no-such-bucket\" does not exist"]);
}

/// Issue 12: `wal-push --parallel N` holds at most 4 segments' worth of
/// raw and compressed bytes, whatever N says. Measured as the peak RSS of
/// the process (GNU time): 12 segments at once would add ~11 x 16 MB over a
/// single push; the cap allows 4 x 16 MB (plus slack for threads and
/// allocator caches: uncapped, the difference measured 268 MB, capped 63-74 MB).
#[test]
fn parallel_push_memory_is_capped() {
    if !pitr_tests::prerequisite(
        Path::new("/usr/bin/time").exists(),
        "GNU time (/usr/bin/time)",
    ) {
        return;
    }
    let user = RunAs::test_user();
    let peak_kib = |parallel: usize| -> u64 {
        let pg = FakePgData::new(user);
        let names: Vec<String> = (1..=13)
            .map(|i| format!("0000000100000000000000{i:02X}"))
            .collect();
        for (i, name) in names.iter().enumerate() {
            pg.add_segment(name, i as u64 + 1);
        }
        let repo = file_repo(pg.dir.path());
        let mut cmd = Command::new("/usr/bin/time");
        user.apply(&mut cmd);
        cmd.current_dir(pg.path())
            .env("PITR_INIT", "auto")
            .args(["-f", "peak-rss-kib %M"])
            .arg(pitr_tests::bins::agent())
            .args([
                "--repo",
                &repo,
                "wal-push",
                "--parallel",
                &parallel.to_string(),
            ])
            .arg(FakePgData::rel(&names[0]));
        let out = run(&mut cmd);
        let err = stderr(&out);
        assert!(
            out.status.success(),
            "wal-push --parallel {parallel}: {err}"
        );
        let stored = std::fs::read_dir(pg.dir.path().join("repo/wal"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(stored, parallel, "{parallel} files pushed");
        err.lines()
            .find_map(|l| l.strip_prefix("peak-rss-kib "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no peak RSS in: {err}"))
    };
    let one = peak_kib(1);
    let twelve = peak_kib(12);
    let segment_kib = 16 * 1024;
    eprintln!("peak RSS: --parallel 1 {one} KiB, --parallel 12 {twelve} KiB");
    assert!(
        twelve.saturating_sub(one) <= 4 * segment_kib + 48 * 1024,
        "--parallel 12 used {} KiB more than --parallel 1; the cap is 4 segments ({} KiB)",
        twelve - one,
        4 * segment_kib
    );
}

#[test]
fn parallel_push_records_markers_that_later_calls_trust_only_when_current() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    let repo = file_repo(pg.dir.path());
    for (i, name) in [SEG1, SEG2, SEG3, SEG4, SEG5].iter().enumerate() {
        pg.add_segment(name, i as u64);
    }
    let out = run(push(&pg, &repo, SEG1, user).env("PITR_ARCHIVE_PARALLEL", "4"));
    assert!(out.status.success(), "{}", stderr(&out));
    let wal = pg.dir.path().join("repo/wal");
    for name in [SEG1, SEG2, SEG3, SEG4] {
        assert!(
            wal.join(format!("{name}.gz")).exists(),
            "{name} pushed in parallel"
        );
    }
    assert!(
        !wal.join(format!("{SEG5}.gz")).exists(),
        "parallel limit respected"
    );
    let markers = pg.path().join("pg_wal/pitr_spool/archived");
    assert!(markers.join(SEG2).exists() && markers.join(SEG4).exists());

    // PostgreSQL marks SEG1 done, then asks for SEG2. A marker is a hint,
    // not proof: one HEAD confirms the object. With the object removed
    // behind our back, the marker is not trusted and SEG2 is pushed again.
    std::fs::remove_file(
        pg.path()
            .join("pg_wal/archive_status")
            .join(format!("{SEG1}.ready")),
    )
    .expect("rm");
    std::fs::remove_file(wal.join(format!("{SEG2}.gz"))).expect("rm object");
    let out = run(push(&pg, &repo, SEG2, user).env("PITR_ARCHIVE_PARALLEL", "1"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        wal.join(format!("{SEG2}.gz")).exists(),
        "a marker whose object is gone is not trusted: pushed again"
    );
    assert!(!markers.join(SEG2).exists(), "the marker is consumed");
    // With the object there, the marker answers without another upload.
    std::fs::remove_file(
        pg.path()
            .join("pg_wal/archive_status")
            .join(format!("{SEG2}.ready")),
    )
    .expect("rm");
    let before = std::fs::metadata(wal.join(format!("{SEG4}.gz")))
        .and_then(|m| m.modified())
        .expect("SEG4 stored");
    let out = run(push(&pg, &repo, SEG4, user)
        .env("PITR_ARCHIVE_PARALLEL", "1")
        .env("PITR_LOG", "info"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("PushedEarlier"), "{}", stderr(&out));
    assert_eq!(
        std::fs::metadata(wal.join(format!("{SEG4}.gz")))
            .and_then(|m| m.modified())
            .expect("SEG4 stored"),
        before,
        "answered from the marker, not uploaded again"
    );
    assert!(!markers.join(SEG4).exists(), "the marker is consumed");

    // A marker is trusted only while the file still hashes the same: SEG3
    // changed locally, so the call pushes again and meets the stored copy.
    pg.add_segment(SEG3, 99);
    let out = run(push(&pg, &repo, SEG3, user).env("PITR_ARCHIVE_PARALLEL", "1"));
    assert_fails(&out, 2, &["already holds a different", SEG3]);
    assert!(
        !markers.join(SEG3).exists(),
        "a stale marker is consumed, not trusted"
    );
}

#[test]
fn fetch_restores_atomically_and_reports_missing_quietly() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    let repo = file_repo(pg.dir.path());
    let seg = pg.add_segment(SEG1, 7);
    assert!(run(&mut push(&pg, &repo, SEG1, user)).status.success());

    let restore = user_tempdir(user, "restore");
    let dest = restore.path().join("RECOVERYXLOG");
    let mut fetch = agent_cmd(user);
    fetch
        .args(["--repo", &repo, "wal-fetch", SEG1])
        .arg(&dest)
        .env("PITR_FETCH_PREFETCH", "0");
    let out = run(&mut fetch);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&dest).expect("restored"),
        std::fs::read(&seg).expect("segment")
    );

    let mut missing = agent_cmd(user);
    missing
        .args(["--repo", &repo, "wal-fetch", SEG2])
        .arg(restore.path().join("X"))
        .env("PITR_FETCH_PREFETCH", "0");
    let out = run(&mut missing);
    assert_fails(&out, 1, &[SEG2, "not in the repository"]);
    assert!(
        !stderr(&out).contains("error"),
        "missing is not an error: {}",
        stderr(&out)
    );
}

#[test]
fn corrupt_objects_are_refused_on_fetch() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    let repo = file_repo(pg.dir.path());
    pg.add_segment(SEG1, 7);
    pg.add_segment(SEG2, 8);
    assert!(run(&mut push(&pg, &repo, SEG1, user)).status.success());
    assert!(run(&mut push(&pg, &repo, SEG2, user)).status.success());
    let wal = pg.dir.path().join("repo/wal");
    // One flipped byte in the deflate stream, one truncated object.
    let flipped = wal.join(format!("{SEG1}.gz"));
    let mut bytes = std::fs::read(&flipped).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&flipped, bytes).expect("write");
    let truncated = wal.join(format!("{SEG2}.gz"));
    let bytes = std::fs::read(&truncated).expect("read");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("write");

    let restore = user_tempdir(user, "restore");
    for name in [SEG1, SEG2] {
        let dest = restore.path().join("RECOVERYXLOG");
        let mut fetch = agent_cmd(user);
        fetch
            .args(["--repo", &repo, "wal-fetch", name])
            .arg(&dest)
            .env("PITR_FETCH_PREFETCH", "0");
        let out = run(&mut fetch);
        // 128, not 2: PostgreSQL reads 1-125 as "not found" and would end
        // recovery (and promote) here.
        assert_fails(&out, 128, &[name, "damaged"]);
        assert!(!dest.exists(), "a corrupt segment must not reach %p");
        let leftovers: Vec<_> = std::fs::read_dir(restore.path())
            .expect("ls")
            .flatten()
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    }
}

#[test]
fn bad_input_gets_one_clear_line() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    let repo = file_repo(pg.dir.path());
    pg.add_segment(SEG1, 1);

    // A bad URL.
    let out = run(&mut push(&pg, "file://relative/path", SEG1, user));
    assert_fails(&out, 2, &["file://relative/path", "file:///absolute/path"]);
    let out = run(&mut push(&pg, "ftp://host/x", SEG1, user));
    assert_fails(&out, 2, &["ftp://host/x", "unsupported scheme"]);

    // A missing file.
    let out = run(&mut push(&pg, &repo, SEG2, user));
    assert_fails(&out, 2, &[&format!("pg_wal/{SEG2}"), "archive_command"]);

    // A name that is not a WAL file.
    std::fs::write(pg.path().join("pg_wal/RECOVERYXLOG"), b"x").expect("write");
    let out = run(&mut push(&pg, &repo, "RECOVERYXLOG", user));
    assert_fails(&out, 2, &["RECOVERYXLOG", "is not a WAL file name"]);
    let mut fetch = agent_cmd(user);
    fetch.args(["--repo", &repo, "wal-fetch", "../../etc/passwd", "/tmp/x"]);
    assert_fails(
        &run(&mut fetch),
        128,
        &["../../etc/passwd", "is not a WAL file name"],
    );

    // Not a data directory.
    let mut cmd = push(&pg, &repo, SEG1, user);
    cmd.current_dir(pg.path().join("pg_wal"))
        .args(["--pgdata", "/nonexistent"]);
    let out = run(&mut cmd);
    assert_fails(&out, 2, &["pg_control", "--pgdata"]);

    // Wrong flags: clap's usage error, exit 2.
    let out = run(agent_cmd(user).args(["wal-push"]));
    assert_eq!(out.status.code(), Some(2));
    let out = run(agent_cmd(user).args(["wal-push", "x", "--parallel", "0"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn permission_denied_names_the_path() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    pg.add_segment(SEG1, 1);
    // A repository directory the archive user cannot write.
    let locked = tempfile::tempdir().expect("temp dir");
    let repo_dir = locked.path().join("repo");
    std::fs::create_dir(&repo_dir).expect("mkdir");
    let mut perms = std::fs::metadata(&repo_dir).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
    std::fs::set_permissions(&repo_dir, perms).expect("chmod");
    let mut perms = std::fs::metadata(locked.path())
        .expect("stat")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(locked.path(), perms).expect("chmod");
    if !pitr_tests::prerequisite(
        user.is_switch() || !is_root(),
        "a non-root user for permission tests",
    ) {
        return;
    }
    let out = run(&mut push(
        &pg,
        &format!("file://{}", repo_dir.display()),
        SEG1,
        user,
    ));
    assert_fails(
        &out,
        2,
        &[
            "access denied",
            &repo_dir.display().to_string(),
            "write access",
        ],
    );
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn full_disk_fails_cleanly() {
    if !pitr_tests::prerequisite(
        is_root(),
        "root (to mount a 4 MiB tmpfs) for the full-disk test",
    ) {
        return;
    }
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    pg.add_segment(SEG1, 1);
    let mnt = tempfile::tempdir().expect("temp dir");
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4k,mode=0777", "tmpfs"])
        .arg(mnt.path())
        .status()
        .expect("run mount");
    if !pitr_tests::prerequisite(
        status.success(),
        "permission to mount tmpfs for the full-disk test",
    ) {
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(mnt.path());
    let repo = format!("file://{}", mnt.path().display());
    let out = run(&mut push(&pg, &repo, SEG1, user));
    assert_fails(
        &out,
        2,
        &[
            "no space left",
            mnt.path().to_str().expect("utf-8"),
            "free space",
        ],
    );
    let object = mnt.path().join("wal").join(format!("{SEG1}.gz"));
    assert!(!object.exists(), "a partial object was left behind");
    let hidden: Vec<_> = std::fs::read_dir(mnt.path().join("wal"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(hidden.is_empty(), "temp files left: {hidden:?}");
}

#[test]
fn unreachable_s3_fails_within_bounded_time() {
    let user = RunAs::test_user();
    let pg = FakePgData::new(user);
    pg.add_segment(SEG1, 1);
    let port = pitr_tests::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let _ = pitr_tests::bins::agent(); // build before the clock starts
    let started = Instant::now();
    let out = run(push(&pg, "s3://pitr-unreachable/x", SEG1, user)
        .env("PITR_S3_ENDPOINT", &endpoint)
        .env("PITR_S3_FORCE_PATH_STYLE", "true")
        .env("AWS_ACCESS_KEY_ID", "k")
        .env("AWS_SECRET_ACCESS_KEY", "s")
        .env("PITR_S3_MAX_ATTEMPTS", "3"));
    assert_fails(
        &out,
        2,
        &[
            "cannot reach the object store",
            &endpoint,
            "PITR_S3_ENDPOINT",
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "retries are bounded: {:?}",
        started.elapsed()
    );
}

#[test]
fn wrong_s3_credentials_are_named() {
    let user = RunAs::test_user();
    let Some(server) = super::s3_server(S3Kind::S3sFs) else {
        return;
    };
    let pg = FakePgData::new(user);
    pg.add_segment(SEG1, 1);
    let mut cmd = push(&pg, &server.url("wrongcreds"), SEG1, user);
    cmd.envs(server.env())
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let out = run(&mut cmd);
    assert_fails(
        &out,
        2,
        &["access denied", "AWS_SECRET_ACCESS_KEY", &server.bucket],
    );

    // And the right ones work against the same signature-checking server.
    let mut cmd = push(&pg, &server.url("wrongcreds"), SEG1, user);
    cmd.envs(server.env());
    let out = run(&mut cmd);
    assert!(out.status.success(), "{}", stderr(&out));
}
