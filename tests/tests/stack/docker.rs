//! The Docker pieces that can run without an engine: the Odoo image's
//! entrypoint against a real PostgreSQL (with a stand-in `odoo` program),
//! and nginx with the stack's configuration in front of stand-in upstreams.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pitr_tests::{free_port, prerequisite, wait_for, which};

use super::pg_bin;
use super::stack::{nginx_prefix, repo_root};

/// A stand-in for Odoo: logs its arguments, "updates" and exits with
/// --stop-after-init, otherwise serves until SIGTERM, then finishes its
/// request for a second. FAKE_ODOO_IGNORE_TERM=1 makes it ignore SIGTERM.
const FAKE_ODOO: &str = r#"#!/usr/bin/env bash
echo "odoo $*" >> "$FAKE_ODOO_LOG"
case " $* " in *" --stop-after-init "*) echo "fake odoo: modules updated"; exit 0 ;; esac
if [ "${FAKE_ODOO_IGNORE_TERM:-0}" = 1 ]; then
  trap '' TERM
else
  trap 'echo "fake odoo: SIGTERM, finishing the request"; sleep 1; echo "fake odoo: done"; exit 0' TERM
fi
echo "fake odoo: serving"
while :; do sleep 0.1; done
"#;

struct Entrypoint {
    dir: tempfile::TempDir,
}

impl Entrypoint {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        let odoo = bin.join("odoo");
        std::fs::write(&odoo, FAKE_ODOO).expect("fake odoo");
        std::fs::set_permissions(&odoo, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        std::fs::create_dir(dir.path().join("data")).expect("data");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The entrypoint with `env`, its output merged into one pipe.
    fn command(&self, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("bash");
        cmd.arg(repo_root().join("docker/odoo/entrypoint.sh"))
            .arg("odoo")
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    self.path("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("FAKE_ODOO_LOG", self.path("odoo.log"))
            .env("ODOO_RC", self.path("conf/odoo.conf"))
            .env("ODOO_DATA_DIR", self.path("data"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn odoo_calls(&self) -> String {
        std::fs::read_to_string(self.path("odoo.log")).unwrap_or_default()
    }
}

/// Collects a child's stdout and stderr lines as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !seen.iter().any(|l| l.contains(needle)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => seen.push(l),
            Err(_) => panic!("no line with {needle:?}; output:\n{}", seen.join("\n")),
        }
    }
}

fn sigterm_and_wait(child: &mut Child) -> (std::process::ExitStatus, Duration) {
    let started = Instant::now();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
    let status = wait_for("the entrypoint to exit", Duration::from_secs(40), || {
        child.try_wait().ok().flatten()
    });
    (status, started.elapsed())
}

fn python_has_psycopg2() -> bool {
    Command::new("python3")
        .args(["-c", "import psycopg2"])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_odoo_entrypoint_gives_up_on_an_absent_database_with_backoff() {
    if !prerequisite(
        python_has_psycopg2(),
        "python3 psycopg2 (PyPI psycopg2-binary)",
    ) {
        return;
    }
    let e = Entrypoint::new();
    let port = free_port().to_string();
    let started = Instant::now();
    let out = e
        .command(&[
            ("DB_HOST", "127.0.0.1"),
            ("DB_PORT", &port),
            ("DB_PASSWORD", "never-printed-1"),
            ("DB_WAIT_TIMEOUT", "4"),
        ])
        .output()
        .expect("run the entrypoint");
    let elapsed = started.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("did not accept connections"), "{text}");
    assert!(text.contains("Check DB_HOST, DB_PORT"), "{text}");
    let retries: Vec<&str> = text.lines().filter(|l| l.contains("retry in")).collect();
    assert!(
        retries.len() >= 2
            && retries[0].ends_with("retry in 1 s")
            && retries[1].ends_with("retry in 2 s"),
        "exponential backoff: {retries:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(4) && elapsed < Duration::from_secs(15),
        "{elapsed:?}"
    );
    assert!(
        !text.contains("never-printed-1"),
        "the password leaked:\n{text}"
    );
    assert!(
        e.odoo_calls().is_empty(),
        "Odoo must not start without its database"
    );
}

#[test]
fn the_odoo_entrypoint_updates_once_per_version_and_stops_gracefully() {
    let Some(bin) = pg_bin() else { return };
    if !prerequisite(
        python_has_psycopg2(),
        "python3 psycopg2 (PyPI psycopg2-binary)",
    ) || !prerequisite(which("flock").is_some(), "flock (util-linux)")
    {
        return;
    }
    let pg = pitr_tests::pg::Postgres::start_new(&bin, &pitr_tests::pg::PgOptions::default());
    let host = pg.dir.path().display().to_string();
    let port = pg.port.to_string();
    let e = Entrypoint::new();
    let env = [
        ("DB_HOST", host.as_str()),
        ("DB_PORT", port.as_str()),
        ("DB_USER", "postgres"),
        ("DB_PASSWORD", "never-printed-2"),
        ("ODOO_ADMIN_PASSWD", "master-never-printed"),
        ("ODOO_DB", "acme"),
        ("ODOO_IMAGE_VERSION", "17.0-1"),
    ];

    // First start of this image version: the module update runs, then Odoo.
    let mut child = e.command(&env).spawn().expect("start the entrypoint");
    let rx = lines(&mut child);
    let mut seen = Vec::new();
    wait_line(&rx, &mut seen, "fake odoo: serving");
    let calls = e.odoo_calls();
    let conf = e.path("conf/odoo.conf");
    assert!(
        calls.contains(&format!(
            "odoo -c {} -d acme -u all --stop-after-init --no-http",
            conf.display()
        )),
        "{calls}"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("migrations: database acme updated")),
        "{seen:?}"
    );
    // The undo point before the update, in the WAL as pg_waldump reads it.
    let point = seen
        .iter()
        .find_map(|l| {
            l.split("restore point '")
                .nth(1)?
                .split('\'')
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no restore point logged: {seen:?}"));
    assert!(
        point.starts_with("odoo-upgrade acme none->17.0-1 "),
        "{point}"
    );
    // A restore point is not flushed by itself; a checkpoint flushes it.
    pg.exec("CHECKPOINT");
    let segment = pg.sql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let dump = Command::new(bin.tool("pg_waldump"))
        .args(["-r", "XLOG"])
        .arg(pg.data.join("pg_wal").join(&segment))
        .output()
        .expect("pg_waldump");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains(&format!("RESTORE_POINT {point}")),
        "pg_waldump shows no restore point {point:?}:\n{dump}"
    );
    let mode = std::fs::metadata(&conf).expect("odoo.conf").permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&conf).expect("read odoo.conf");
    assert!(text.contains("db_password = never-printed-2"), "{text}");
    assert!(
        text.contains("proxy_mode = True") && text.contains("gevent_port = 8072"),
        "{text}"
    );
    let (status, took) = sigterm_and_wait(&mut child);
    seen.extend(rx.try_iter());
    assert!(status.success(), "{status:?}\n{}", seen.join("\n"));
    assert!(
        took >= Duration::from_secs(1),
        "the request in flight was cut short: {took:?}"
    );
    assert!(
        seen.iter().any(|l| l.contains("fake odoo: done")),
        "{seen:?}"
    );
    assert!(
        !seen.join("\n").contains("never-printed"),
        "a password leaked:\n{}",
        seen.join("\n")
    );

    // Same version again: no update. An Odoo that ignores SIGTERM is killed
    // after ODOO_STOP_TIMEOUT.
    let mut env2 = env.to_vec();
    env2.push(("ODOO_STOP_TIMEOUT", "2"));
    env2.push(("FAKE_ODOO_IGNORE_TERM", "1"));
    let mut child = e.command(&env2).spawn().expect("start the entrypoint");
    let rx = lines(&mut child);
    let mut seen = Vec::new();
    wait_line(&rx, &mut seen, "fake odoo: serving");
    assert!(
        seen.iter()
            .any(|l| l.contains("database acme is up to date")),
        "{seen:?}"
    );
    assert_eq!(
        e.odoo_calls().matches("--stop-after-init").count(),
        1,
        "updated twice"
    );
    let (_, took) = sigterm_and_wait(&mut child);
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "a stuck Odoo is killed after ODOO_STOP_TIMEOUT: {took:?}"
    );
}

/// A stand-in upstream: answers each connection with `reply` and sends the
/// request head it received.
fn upstream(reply: &'static str) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let _ = stream.write_all(reply.as_bytes());
            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
        }
    });
    (port, rx)
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "20", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn nginx_routes_by_host_upgrades_websockets_and_refuses_large_uploads() {
    if !prerequisite(which("nginx").is_some(), "nginx (Debian nginx-light)")
        || !prerequisite(which("curl").is_some(), "curl (Debian)")
        || !prerequisite(which("openssl").is_some(), "openssl (Debian)")
    {
        return;
    }
    let (http_port, http_rx) =
        upstream("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nodoo\n");
    let (ws_port, ws_rx) = upstream(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (plain, tls) = (free_port(), free_port());
    // The shipped configuration, with loopback ports for the listeners and
    // the stand-ins in place of Docker's "odoo" host.
    let conf = std::fs::read_to_string(repo_root().join("docker/nginx/nginx.conf"))
        .expect("nginx.conf")
        .replace(
            "listen 80 default_server;",
            &format!("listen 127.0.0.1:{plain} default_server;"),
        )
        .replace(
            "listen 443 ssl http2 default_server;",
            &format!("listen 127.0.0.1:{tls} ssl http2 default_server;"),
        )
        .replace(
            "http://odoo:8069;",
            &format!("http://127.0.0.1:{http_port};"),
        )
        .replace("http://odoo:8072;", &format!("http://127.0.0.1:{ws_port};"))
        .replace(
            "pid /tmp/nginx.pid;",
            &format!("pid {};", dir.path().join("nginx.pid").display()),
        )
        .replace("/tmp/nginx-", &format!("{}/nginx-", dir.path().display()));
    assert!(
        conf.contains(&format!("127.0.0.1:{ws_port}")),
        "the test's rewrite no longer matches nginx.conf"
    );
    let conf_path = nginx_prefix(dir.path(), &conf);
    let _nginx = Nginx(
        Command::new("nginx")
            .args(["-g", "daemon off;", "-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start nginx"),
    );
    wait_for("nginx to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", tls)).ok()
    });
    let base = format!("https://127.0.0.1:{tls}");

    // Plain HTTP redirects to HTTPS, keeping the host.
    let out = curl(&[
        "-H",
        "Host: acme.loomworks.app",
        &format!("http://127.0.0.1:{plain}/web"),
    ]);
    assert!(out.ends_with("\n301"), "{out}");

    // The Host header reaches Odoo unchanged (dbfilter), with the forwarding headers.
    let out = curl(&[
        "-H",
        "Host: acme.loomworks.app",
        &format!("{base}/web/login"),
    ]);
    assert!(out.ends_with("odoo\n\n200"), "{out}");
    let head = http_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the request reached Odoo");
    assert_eq!(header(&head, "Host"), Some("acme.loomworks.app"), "{head}");
    assert_eq!(header(&head, "X-Forwarded-Proto"), Some("https"), "{head}");
    assert!(header(&head, "X-Forwarded-For").is_some(), "{head}");

    // /websocket and /longpolling are upgraded and go to the gevent port.
    for path in ["/websocket", "/longpolling/poll"] {
        let out = curl(&[
            "--http1.1",
            "-H",
            "Host: acme.loomworks.app",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            &format!("{base}{path}"),
        ]);
        assert!(out.ends_with("\n101"), "{path}: {out}");
        let head = ws_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the upgrade reached 8072");
        assert!(head.starts_with(&format!("GET {path} ")), "{head}");
        assert_eq!(header(&head, "Upgrade"), Some("websocket"), "{head}");
        assert_eq!(header(&head, "Connection"), Some("upgrade"), "{head}");
        assert_eq!(header(&head, "Host"), Some("acme.loomworks.app"), "{head}");
    }
    assert!(http_rx.try_recv().is_err(), "a websocket went to 8069");

    // Over 100 MB: a 413 that says so, before Odoo sees anything.
    let out = curl(&[
        "-X",
        "POST",
        "-H",
        "Host: acme.loomworks.app",
        "-H",
        "Content-Length: 104857601",
        "-H",
        "Expect:",
        "--data-binary",
        "x",
        &format!("{base}/web/binary/upload_attachment"),
    ]);
    assert!(out.ends_with("\n413"), "{out}");
    assert!(out.contains("limited to 100 MB"), "{out}");
    assert!(
        http_rx.try_recv().is_err(),
        "the oversized upload reached Odoo"
    );
}

/// Stops nginx when the test ends, pass or fail.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
