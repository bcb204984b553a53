//! Helpers for the benchmarks: run a command under `/usr/bin/time` as the
//! test user and read its peak RSS.

use std::path::Path;
use std::process::Command;

use crate::RunAs;
use crate::pg::PgBin;

/// `sh -c SCRIPT`.
#[must_use]
pub fn shell(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.args(["-c", script]);
    c
}

/// Runs `cmd` under `/usr/bin/time`, returning success and its peak RSS in KiB.
pub fn run_measured(cmd: &Command) -> (bool, i64) {
    let mut timed = Command::new("/usr/bin/time");
    timed
        .args(["-f", "pitr-bench-maxrss=%M"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        timed.current_dir(dir);
    }
    timed
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    RunAs::test_user().apply(&mut timed);
    let out = timed.output().expect("run /usr/bin/time");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        eprintln!("bench: {:?} failed:\n{stderr}", cmd.get_program());
    }
    let rss = stderr
        .lines()
        .find_map(|l| l.strip_prefix("pitr-bench-maxrss="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1);
    (out.status.success(), rss)
}

/// What every benchmark needs first: `None` when cargo only probes the bench
/// with `--list`; exits with a message when PostgreSQL or `/usr/bin/time` is
/// missing. Returns the installation, the user to run as, and a work
/// directory under `/var/tmp` (tmpfs `/tmp` would flatter every tool).
#[must_use]
pub fn bench_setup(label: &str) -> Option<(PgBin, RunAs, tempfile::TempDir)> {
    if std::env::args().any(|a| a == "--list") {
        return None; // cargo bench probes harness=false benches with --list
    }
    let Some(bin) = PgBin::find() else {
        eprintln!("bench: no PostgreSQL found; run .ci/install-deps.sh --bench");
        std::process::exit(2);
    };
    if !Path::new("/usr/bin/time").is_file() {
        eprintln!("bench: /usr/bin/time is missing; run .ci/install-deps.sh --bench");
        std::process::exit(2);
    }
    let user = RunAs::test_user();
    let work = tempfile::Builder::new()
        .prefix(&format!("pitr-bench-{label}-"))
        .tempdir_in("/var/tmp")
        .expect("work dir");
    user.chown_tree(work.path());
    Some((bin, user, work))
}

/// How many times faster than `base` (both in seconds), or `-` without a base.
#[must_use]
pub fn times_faster(base: Option<f64>, secs: f64) -> String {
    base.map_or("-".into(), |b| format!("{:.2}", b / secs))
}

/// `+1.5 %`: how much more `stored` is than `base`, or `-` without a base.
#[must_use]
pub fn size_change(stored: u64, base: Option<u64>) -> String {
    base.map_or("-".into(), |b| {
        format!("{:+.1} %", (stored as f64 / b.max(1) as f64 - 1.0) * 100.0)
    })
}

/// A Markdown table header: the column names and the separator line.
pub fn table_header(out: &mut String, columns: &[&str]) {
    out.push_str(&format!("\n| {} |\n", columns.join(" | ")));
    out.push_str(&format!("|{}\n", "---|".repeat(columns.len())));
}

/// Bytes of the files under `dir` whose names `keep` accepts.
#[must_use]
pub fn dir_size(dir: &Path, keep: impl Fn(&str) -> bool) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().and_then(|n| n.to_str()).is_some_and(&keep) {
                total += e.metadata().map_or(0, |m| m.len());
            }
        }
    }
    total
}

/// A pgBackRest configuration under `dir` (gz level 6, process-max 2) with
/// stanza `bench`, created with `stanza-create ARGS`. `global` and `stanza`
/// are extra lines for their sections. Returns the config file.
#[must_use]
pub fn pgbackrest_setup(
    dir: &Path,
    user: RunAs,
    global: &str,
    stanza: &str,
    create_args: &[&str],
) -> std::path::PathBuf {
    for sub in ["repo", "spool", "lock", "log"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
    }
    let conf = dir.join("pgbackrest.conf");
    let text = format!(
        "[global]\nrepo1-path={repo}\nspool-path={spool}\nlock-path={lock}\nlog-path={log}\n\
         log-level-console=error\nlog-level-file=off\ncompress-type=gz\ncompress-level=6\n\
         process-max=2\n{global}\n[bench]\n{stanza}",
        repo = dir.join("repo").display(),
        spool = dir.join("spool").display(),
        lock = dir.join("lock").display(),
        log = dir.join("log").display(),
    );
    std::fs::write(&conf, text).expect("write pgbackrest.conf");
    user.chown_tree(dir);
    let mut c = Command::new("pgbackrest");
    c.arg(format!("--config={}", conf.display()))
        .arg("--stanza=bench")
        .args(create_args)
        .arg("stanza-create")
        .current_dir(dir);
    user.apply(&mut c);
    let out = c.output().expect("pgbackrest stanza-create");
    assert!(
        out.status.success(),
        "stanza-create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    conf
}
