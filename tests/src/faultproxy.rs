//! An HTTP/1.1 fault proxy for S3 traffic, on 127.0.0.1.
//!
//! Point `PITR_S3_ENDPOINT` at [`FaultProxy::endpoint`] instead of the S3
//! server: every request is forwarded byte for byte (so SigV4 signatures,
//! which cover the `Host` header, stay valid), and a seeded share of them
//! meets a fault:
//! - `503` (`SlowDown`) before the request reaches the store;
//! - `500` after the store applied it (the write happened; the answer lies);
//! - the connection dropped before the request is forwarded;
//! - the connection dropped after the store applied it;
//! - a slow answer.
//!
//! Faults can also be switched on for every request ([`FaultProxy::outage`]),
//! for "the store misbehaves for a while" scenarios.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 503 SlowDown, not forwarded.
    Unavailable,
    /// Forwarded, then answered 500 InternalError.
    FailedAfterWrite,
    /// The connection closed before forwarding.
    DropBefore,
    /// Forwarded, then the connection closed without an answer.
    DropAfter,
    /// Forwarded after a pause.
    Slow,
}

/// Counts of what the proxy did, for assertions that faults really happened.
#[derive(Debug, Default)]
pub struct Counts {
    /// Requests seen.
    pub requests: AtomicU64,
    /// Requests that met a fault.
    pub faulted: AtomicU64,
}

struct Plan {
    rng: rand::rngs::StdRng,
    probability: f64,
    kinds: Vec<Fault>,
}

/// A running proxy; stops accepting when dropped.
pub struct FaultProxy {
    port: u16,
    plan: Arc<Mutex<Plan>>,
    outage: Arc<Mutex<Option<Fault>>>,
    stop: Arc<AtomicBool>,
    /// What happened so far.
    pub counts: Arc<Counts>,
}

impl FaultProxy {
    /// Proxies to `upstream` (`http://127.0.0.1:PORT`), faulting a share
    /// `probability` of requests with one of `kinds`, chosen from `seed`.
    #[must_use]
    pub fn start(upstream: &str, seed: u64, probability: f64, kinds: &[Fault]) -> Self {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().expect("address").port();
        let plan = Arc::new(Mutex::new(Plan {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            probability,
            kinds: kinds.to_vec(),
        }));
        let outage = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        listener.set_nonblocking(true).expect("nonblocking");
        {
            let (plan, outage, stop, counts) = (
                Arc::clone(&plan),
                Arc::clone(&outage),
                Arc::clone(&stop),
                Arc::clone(&counts),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            let (plan, outage, counts, upstream) = (
                                Arc::clone(&plan),
                                Arc::clone(&outage),
                                Arc::clone(&counts),
                                upstream.clone(),
                            );
                            std::thread::spawn(move || {
                                let _ = serve(client, &upstream, &plan, &outage, &counts);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            });
        }
        FaultProxy {
            port,
            plan,
            outage,
            stop,
            counts,
        }
    }

    /// The endpoint to give clients instead of the server's.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request meets `fault` until [`FaultProxy::outage`] is called
    /// with `None`.
    pub fn outage(&self, fault: Option<Fault>) {
        *self.outage.lock().expect("lock") = fault;
    }

    /// Changes the share of faulted requests.
    pub fn set_probability(&self, probability: f64) {
        self.plan.lock().expect("lock").probability = probability;
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One HTTP message head and body, raw.
struct Message {
    head: Vec<u8>,
    body: Vec<u8>,
}

fn serve(
    client: TcpStream,
    upstream: &str,
    plan: &Mutex<Plan>,
    outage: &Mutex<Option<Fault>>,
    counts: &Counts,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let mut server: Option<(BufReader<TcpStream>, TcpStream)> = None;
    loop {
        let Some((request, method)) = read_request(&mut from_client)? else {
            return Ok(());
        };
        counts.requests.fetch_add(1, Ordering::Relaxed);
        let fault = outage.lock().expect("lock").or_else(|| {
            let mut guard = plan.lock().expect("lock");
            let p = &mut *guard;
            let probability = p.probability.clamp(0.0, 1.0);
            let hit = !p.kinds.is_empty() && p.rng.random_bool(probability);
            hit.then(|| {
                let n = p.kinds.len();
                p.kinds[p.rng.random_range(0..n)]
            })
        });
        if fault.is_some() {
            counts.faulted.fetch_add(1, Ordering::Relaxed);
        }
        match fault {
            Some(Fault::Unavailable) => {
                write_error(
                    &mut to_client,
                    503,
                    "SlowDown",
                    "Please reduce your request rate.",
                )?;
                continue;
            }
            Some(Fault::DropBefore) => {
                let _ = to_client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Some(Fault::Slow) => std::thread::sleep(Duration::from_millis(1500)),
            _ => {}
        }
        if server.is_none() {
            let s = TcpStream::connect(upstream)?;
            server = Some((BufReader::new(s.try_clone()?), s));
        }
        let (from_server, to_server) = server.as_mut().expect("connected");
        to_server.write_all(&request.head)?;
        to_server.write_all(&request.body)?;
        to_server.flush()?;
        let response = read_response(from_server, &method)?;
        match fault {
            Some(Fault::FailedAfterWrite) => {
                write_error(
                    &mut to_client,
                    500,
                    "InternalError",
                    "We encountered an internal error.",
                )?;
            }
            Some(Fault::DropAfter) => {
                let _ = to_client.shutdown(Shutdown::Both);
                return Ok(());
            }
            _ => {
                to_client.write_all(&response.head)?;
                to_client.write_all(&response.body)?;
                to_client.flush()?;
            }
        }
        if header(&response.head, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            return Ok(());
        }
    }
}

fn write_error(out: &mut TcpStream, status: u16, code: &str, message: &str) -> std::io::Result<()> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    );
    let reason = if status == 503 {
        "Service Unavailable"
    } else {
        "Internal Server Error"
    };
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 {
            if head.is_empty() {
                return Ok(None);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            return Ok(Some(head));
        }
    }
}

fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

fn read_body(reader: &mut BufReader<TcpStream>, head: &[u8]) -> std::io::Result<Vec<u8>> {
    if header(head, "transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let mut line = Vec::new();
            reader.read_until(b'\n', &mut line)?;
            body.extend_from_slice(&line);
            let size_text = String::from_utf8_lossy(&line);
            let size = usize::from_str_radix(size_text.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk);
            if size == 0 {
                return Ok(body);
            }
        }
    }
    let len: usize = header(head, "content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(body)
}

fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<(Message, String)>> {
    let Some(head) = read_head(reader)? else {
        return Ok(None);
    };
    let method = String::from_utf8_lossy(&head)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    let body = read_body(reader, &head)?;
    Ok(Some((Message { head, body }, method)))
}

fn read_response(reader: &mut BufReader<TcpStream>, method: &str) -> std::io::Result<Message> {
    let head = read_head(reader)?
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
    let status: u16 = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if method == "HEAD" || status == 204 || status == 304 || status < 200 {
        Vec::new()
    } else {
        read_body(reader, &head)?
    };
    Ok(Message { head, body })
}
