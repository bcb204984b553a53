//! `make bench` (filestore part): syncing and restoring an Odoo filestore of
//! mixed files, against `rsync -a` and `tar` + `gzip -6` of the same files,
//! all measured in this run.
//!
//! Corpus (`PITR_BENCH_FILESTORE_FILES`, default 10,000), named by SHA-1 as
//! Odoo names them: 60 % XML/text (1-16 KiB, compresses), 25 % JPEG-like
//! (10-100 KiB, random), 15 % PDF-like (20-200 KiB, half text, half random).
//! The restore reads the files' names from a real PostgreSQL's
//! `ir_attachment`, as `pgrestore --filestore` does after a restore.

use std::fmt::Write as _;
use std::process::Command;
use std::time::Instant;

use pitr_tests::bins::{agent, pgrestore};
use pitr_tests::measure::{bench_setup, dir_size, run_measured, shell, table_header};
use pitr_tests::pg::{PgOptions, Postgres};
use pitr_tests::which;
use rand::{Rng as _, RngCore as _, SeedableRng as _};
use sha1::Digest as _;

fn main() {
    let Some((bin, user, work)) = bench_setup("filestore") else {
        return;
    };
    let count: usize = std::env::var("PITR_BENCH_FILESTORE_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let fs = work.path().join("filestore");
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let words = b"invoice line partner product tax amount total journal account move ";
    let mut names = Vec::with_capacity(count);
    for i in 0..count {
        let kind = i % 20;
        let content: Vec<u8> = if kind < 12 {
            let len = rng.random_range(1 << 10..16 << 10);
            words.iter().copied().cycle().take(len).collect()
        } else if kind < 17 {
            let mut v = vec![0; rng.random_range(10 << 10..100 << 10)];
            rng.fill_bytes(&mut v);
            v[..4].copy_from_slice(&[0xff, 0xd8, 0xff, 0xe0]);
            v
        } else {
            let len = rng.random_range(20 << 10..200 << 10);
            let mut v: Vec<u8> = words.iter().copied().cycle().take(len / 2).collect();
            let mut noise = vec![0; len - len / 2];
            rng.fill_bytes(&mut noise);
            v.extend(noise);
            v[..9].copy_from_slice(b"%PDF-1.7\n");
            v
        };
        let sha = hex::encode(sha1::Sha1::digest(&content));
        let path = fs.join("odoo").join(&sha[..2]).join(&sha);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &content).expect("write");
        names.push(format!("{}/{sha}", &sha[..2]));
    }
    user.chown_tree(work.path());
    let raw = dir_size(&fs, |_| true);
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut report = String::new();
    writeln!(
        report,
        "# Filestore benchmark ({cores} cores): {count} files, {:.1} MiB",
        raw as f64 / f64::from(1 << 20)
    )
    .ok();

    let repo_dir = work.path().join("repo");
    let repo = format!("file://{}", repo_dir.display());
    let mut init = Command::new(agent());
    init.args(["--repo", &repo, "init"]);
    assert!(run_measured(&init).0, "pitr-agent init");
    let timed = |cmd: &Command| {
        let started = Instant::now();
        let (ok, rss) = run_measured(cmd);
        assert!(ok, "{:?} failed", cmd.get_program());
        (started.elapsed().as_secs_f64(), rss)
    };
    let mut sync = Command::new(agent());
    sync.args(["--repo", &repo, "filestore-sync", "--path"])
        .arg(&fs);
    let (sync_s, sync_rss) = timed(&sync);
    let stored = dir_size(&repo_dir.join("filestore"), |_| true);
    let (again_s, _) = timed(&sync);
    let mut rows = vec![(
        "pitr-agent filestore-sync (first)".to_owned(),
        sync_s,
        Some(stored),
        sync_rss,
    )];
    rows.push((
        "pitr-agent filestore-sync (nothing new)".to_owned(),
        again_s,
        None,
        -1,
    ));
    let rsync_dest = work.path().join("rsync");
    if which("rsync").is_some() {
        let (s, rss) = timed(&shell(&format!(
            "rsync -a {}/ {}/",
            fs.display(),
            rsync_dest.display()
        )));
        rows.push((
            "rsync -a".to_owned(),
            s,
            Some(dir_size(&rsync_dest, |_| true)),
            rss,
        ));
    }
    let tgz = work.path().join("filestore.tar.gz");
    let (tar_s, tar_rss) = timed(&shell(&format!(
        "tar cf - -C {} . | gzip -6 > {}",
        fs.display(),
        tgz.display()
    )));
    rows.push((
        "tar + gzip -6".to_owned(),
        tar_s,
        std::fs::metadata(&tgz).ok().map(|m| m.len()),
        tar_rss,
    ));
    writeln!(report, "\n## Sync (the files to the repository)").ok();
    table_header(
        &mut report,
        &[
            "tool",
            "seconds",
            "MiB/s",
            "stored MiB",
            "ratio",
            "x tar+gzip speed",
            "peak RSS MiB",
        ],
    );
    for (tool, s, size, rss) in &rows {
        writeln!(
            report,
            "| {tool} | {s:.2} | {:.0} | {} | {} | {:.2} | {} |",
            raw as f64 / f64::from(1 << 20) / s,
            size.map_or("-".into(), |b| format!(
                "{:.1}",
                b as f64 / f64::from(1 << 20)
            )),
            size.map_or("-".into(), |b| format!(
                "{:.2}",
                raw as f64 / b.max(1) as f64
            )),
            tar_s / s,
            rss_mib(*rss),
        )
        .ok();
    }

    // Restore: the names come from a database, as after a restore.
    let pg = Postgres::start_new(&bin, &PgOptions::default());
    pg.exec("CREATE DATABASE odoo");
    let list = work.path().join("names.txt");
    std::fs::write(&list, names.join("\n") + "\n").expect("write names");
    user.chown_tree(&list);
    let mut psql = Command::new(bin.tool("psql"));
    let mut args = pg.conn_args();
    args[7] = "odoo".into();
    let out = psql
        .args(args)
        .args([
            "-X",
            "-q",
            "-c",
            "CREATE TABLE ir_attachment (id serial PRIMARY KEY, store_fname varchar)",
            "-c",
        ])
        .arg(format!(
            "\\copy ir_attachment (store_fname) FROM '{}'",
            list.display()
        ))
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored = work.path().join("restored");
    let mut fetch = Command::new(pgrestore());
    fetch
        .args(["--repo", &repo, "--quiet", "--filestore"])
        .arg(&restored)
        .env("PGHOST", pg.dir.path())
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres");
    let (restore_s, restore_rss) = timed(&fetch);
    assert_eq!(dir_size(&restored, |_| true), raw, "every byte restored");
    let mut restore_rows = vec![("pgrestore --filestore".to_owned(), restore_s, restore_rss)];
    if which("rsync").is_some() {
        let back = work.path().join("rsync-back");
        let (s, rss) = timed(&shell(&format!(
            "rsync -a {}/ {}/",
            rsync_dest.display(),
            back.display()
        )));
        restore_rows.push(("rsync -a (back)".to_owned(), s, rss));
    }
    let untar = work.path().join("untar");
    std::fs::create_dir_all(&untar).expect("mkdir");
    user.chown_tree(&untar);
    let (untar_s, untar_rss) = timed(&shell(&format!(
        "tar xzf {} -C {}",
        tgz.display(),
        untar.display()
    )));
    restore_rows.push(("tar xzf".to_owned(), untar_s, untar_rss));
    writeln!(
        report,
        "\n## Restore (every file a database references, checked against its SHA-1)"
    )
    .ok();
    table_header(
        &mut report,
        &[
            "tool",
            "seconds",
            "MiB/s",
            "x tar xzf speed",
            "peak RSS MiB",
        ],
    );
    for (tool, s, rss) in &restore_rows {
        writeln!(
            report,
            "| {tool} | {s:.2} | {:.0} | {:.2} | {} |",
            raw as f64 / f64::from(1 << 20) / s,
            untar_s / s,
            rss_mib(*rss),
        )
        .ok();
    }
    drop(pg);
    print!("{report}");
}

/// Peak RSS in MiB from KiB, or `-` when it was not measured.
fn rss_mib(kib: i64) -> String {
    if kib > 0 {
        format!("{:.0}", kib as f64 / 1024.0)
    } else {
        "-".into()
    }
}
