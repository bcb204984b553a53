//! Real S3-compatible servers on 127.0.0.1 with random ports:
//! - `moto_server` (PyPI `moto[server]`): broad API coverage, accepts any credentials;
//! - `s3s-fs` (crates.io, 0.14.1): stores objects in a directory, checks SigV4
//!   signatures, and survives a restart, so it serves the credential and outage tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for, which};

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Kind {
    /// `moto_server`.
    Moto,
    /// `s3s-fs`.
    S3sFs,
}

/// A running S3-compatible server with one bucket.
pub struct S3Server {
    /// Which server.
    pub kind: S3Kind,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket created for the test.
    pub bucket: String,
    /// Credentials the server accepts.
    pub access_key: String,
    /// Credentials the server accepts.
    pub secret_key: String,
    port: u16,
    child: Option<Child>,
    root: Option<tempfile::TempDir>,
}

const ACCESS_KEY: &str = "pitrtestkey";
const SECRET_KEY: &str = "pitrtestsecret0123456789";

fn s3s_fs_binary() -> Option<PathBuf> {
    which("s3s-fs").or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".cargo/bin/s3s-fs");
        p.is_file().then_some(p)
    })
}

/// Whether moto is importable, for when pip left no `moto_server` on PATH.
fn moto_module() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl S3Server {
    /// Whether `kind`'s server is installed.
    #[must_use]
    pub fn available(kind: S3Kind) -> bool {
        match kind {
            S3Kind::Moto => which("moto_server").is_some() || moto_module(),
            S3Kind::S3sFs => s3s_fs_binary().is_some(),
        }
    }

    /// Starts a server of `kind` with a fresh bucket.
    #[must_use]
    pub fn start(kind: S3Kind) -> Self {
        let root = (kind == S3Kind::S3sFs).then(|| tempfile::tempdir().expect("temp dir"));
        let mut server = S3Server {
            kind,
            endpoint: String::new(),
            bucket: format!("pitr-test-{:08x}", rand::random::<u32>()),
            access_key: ACCESS_KEY.to_owned(),
            secret_key: SECRET_KEY.to_owned(),
            port: free_port(),
            child: None,
            root,
        };
        server.endpoint = format!("http://127.0.0.1:{}", server.port);
        server.launch();
        server.create_bucket();
        server
    }

    fn launch(&mut self) {
        let mut cmd = match self.kind {
            S3Kind::Moto => {
                let mut c = if which("moto_server").is_some() {
                    Command::new("moto_server")
                } else {
                    let mut c = Command::new("python3");
                    c.args(["-m", "moto.server"]);
                    c
                };
                c.args(["-H", "127.0.0.1", "-p", &self.port.to_string()]);
                c
            }
            S3Kind::S3sFs => {
                let mut c = Command::new(s3s_fs_binary().expect("s3s-fs is installed"));
                c.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                    .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                    .arg(self.root.as_ref().expect("s3s-fs root").path());
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("start the S3 server"));
        let addr = format!("127.0.0.1:{}", self.port);
        wait_for("the S3 server to listen", Duration::from_secs(30), || {
            TcpStream::connect(&addr).ok().map(|_| ())
        });
    }

    fn create_bucket(&self) {
        match self.kind {
            S3Kind::S3sFs => {
                let dir = self.root.as_ref().expect("root").path().join(&self.bucket);
                std::fs::create_dir_all(dir).expect("create bucket directory");
            }
            S3Kind::Moto => {
                let mut stream =
                    TcpStream::connect(("127.0.0.1", self.port)).expect("connect to moto");
                write!(
                    stream,
                    "PUT /{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    self.bucket, self.port
                )
                .expect("send CreateBucket");
                let mut reply = String::new();
                let _ = stream.read_to_string(&mut reply);
                assert!(
                    reply.starts_with("HTTP/1.1 200"),
                    "CreateBucket failed: {reply}"
                );
            }
        }
    }

    /// Stops the server; objects survive only with `s3s-fs`.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (s3s-fs keeps its objects).
    pub fn restart(&mut self) {
        assert_eq!(
            self.kind,
            S3Kind::S3sFs,
            "only s3s-fs keeps objects across restarts"
        );
        self.stop();
        self.launch();
    }

    /// The server's endpoint URL, `http://127.0.0.1:PORT`.
    #[must_use]
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `s3://bucket/prefix`.
    #[must_use]
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// An SDK client for this server, for tests that set up what pitr-agent
    /// never does itself (unfinished multipart uploads).
    pub async fn client(&self) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                &self.access_key,
                &self.secret_key,
                None,
                None,
                "pitr-tests",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Environment for `pitr-agent` to reach this server.
    #[must_use]
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", self.access_key.as_str()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.as_str()),
            ("AWS_REGION", "us-east-1"),
            ("PITR_S3_ENDPOINT", self.endpoint.as_str()),
            ("PITR_S3_FORCE_PATH_STYLE", "true"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
