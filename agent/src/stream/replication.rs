//! A physical replication connection, spoken with postgres-protocol's
//! message codecs: startup with `replication=true`, authentication (trust,
//! password, MD5, SCRAM-SHA-256), simple replication commands, and the
//! CopyBoth stream of `START_REPLICATION`.
//!
//! tokio-postgres has no replication mode, and `pg_receivewal` reports a
//! flush position once its local file is fsynced. Here the caller decides
//! what it reports as flushed, so it can be "durable in the repository".

use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::pgconn::PgTarget;
use crate::pgtls::AuthGuard;
use crate::wal::{Lsn, TimelineId};

/// A failure of the replication connection, with the server's words.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The connection failed or closed.
    #[error("replication connection to {target}: {detail}")]
    Io {
        /// host:port as user.
        target: String,
        /// What happened.
        detail: String,
    },
    /// The server refused something.
    #[error("replication connection to {target}: the server said {severity}: {message}{hint}")]
    Server {
        /// host:port as user.
        target: String,
        /// ERROR, FATAL.
        severity: String,
        /// The message.
        message: String,
        /// SQLSTATE.
        code: String,
        /// The server's hint, with a separator.
        hint: String,
    },
    /// The server sent what the protocol does not allow here.
    #[error("replication connection to {target}: unexpected {what}")]
    Protocol {
        /// host:port as user.
        target: String,
        /// What came.
        what: String,
    },
}

impl ReplicationError {
    /// The SQLSTATE, for server errors.
    #[must_use]
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// What `IDENTIFY_SYSTEM` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SystemIdentity {
    /// The cluster's system identifier.
    pub system_id: u64,
    /// The timeline the server writes.
    pub timeline: TimelineId,
    /// The server's current flush position.
    pub flushed: Lsn,
}

/// A message of the WAL stream.
#[derive(Debug)]
pub enum StreamMessage {
    /// WAL bytes starting at `start`; `server_end` is the server's end of WAL.
    Data {
        /// Position of the first byte.
        start: Lsn,
        /// The server's current end of WAL.
        server_end: Lsn,
        /// The bytes.
        data: Bytes,
    },
    /// The server is alive; answer at once when `reply` is set.
    Keepalive {
        /// The server's current end of WAL.
        server_end: Lsn,
        /// Whether the server asks for a status update now.
        reply: bool,
    },
    /// The server ended the stream (shutdown, or the end of a timeline).
    End,
}

/// An open replication connection.
pub struct ReplicationConnection {
    io: Box<dyn Io>,
    buf: BytesMut,
    target: String,
}

impl std::fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl ReplicationConnection {
    /// Connects to `pg` in physical replication mode as `application_name`
    /// (the name `synchronous_standby_names` matches). The password is
    /// `PGPASSWORD`, as for every connection the agent opens.
    ///
    /// # Errors
    /// The server cannot be reached or refuses the login.
    pub async fn connect(pg: &PgTarget, application_name: &str) -> Result<Self, ReplicationError> {
        let target = pg.describe();
        let io_err = |detail: String| ReplicationError::Io {
            target: target.clone(),
            detail,
        };
        let tcp = !crate::pgtls::is_socket(&pg.host);
        let security = crate::pgtls::ConnSecurity::from_env(tcp).map_err(&io_err)?;
        let auth = security.auth.clone();
        let io: Box<dyn Io> = if !tcp {
            let path = format!("{}/.s.PGSQL.{}", pg.host, pg.port);
            let s = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::UnixStream::connect(&path),
            )
            .await
            .map_err(|_| io_err(format!("connecting to {path} timed out")))?
            .map_err(|e| io_err(format!("{path}: {e}")))?;
            Box::new(AuthGuard::new(s, auth))
        } else {
            let mut s = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect((pg.host.as_str(), pg.port)),
            )
            .await
            .map_err(|_| io_err("connecting timed out".to_owned()))?
            .map_err(|e| io_err(e.to_string()))?;
            let _ = s.set_nodelay(true);
            if security.mode.tries_tls() {
                // SSLRequest: length 8, code 80877103.
                s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
                    .await
                    .map_err(|e| io_err(e.to_string()))?;
                let mut answer = [0u8; 1];
                s.read_exact(&mut answer)
                    .await
                    .map_err(|e| io_err(e.to_string()))?;
                if answer[0] == b'S' {
                    let tls = security
                        .handshake(s, &pg.host)
                        .await
                        .map_err(|e| io_err(e.to_string()))?;
                    Box::new(AuthGuard::new(tls, auth))
                } else if security.mode.requires_tls() {
                    return Err(io_err(
                        "the server does not accept TLS, and PGSSLMODE requires it; set ssl = on                          on the server"
                            .to_owned(),
                    ));
                } else {
                    Box::new(AuthGuard::new(s, auth))
                }
            } else {
                Box::new(AuthGuard::new(s, auth))
            }
        };
        let mut conn = ReplicationConnection {
            io,
            buf: BytesMut::with_capacity(64 * 1024),
            target,
        };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", pg.user.as_str()),
                ("database", "replication"),
                ("replication", "true"),
                ("application_name", application_name),
            ],
            &mut out,
        )
        .map_err(|e| conn.io_error(&e))?;
        conn.send(&out).await?;
        conn.authenticate(&pg.user, pg.password("replication"))
            .await?;
        Ok(conn)
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<String>,
    ) -> Result<(), ReplicationError> {
        let password = password.unwrap_or_default();
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let mut out = BytesMut::new();
            match self.message().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password.as_bytes(), &mut out)
                        .map_err(|e| self.io_error(&e))?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(user.as_bytes(), password.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|e| self.io_error(&e))?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram_offered = false;
                    while let Some(m) = mechanisms.next().map_err(|e| self.io_error(&e))? {
                        scram_offered |= m == sasl::SCRAM_SHA_256;
                    }
                    if !scram_offered {
                        return Err(self.protocol("SASL mechanisms without SCRAM-SHA-256"));
                    }
                    let s = sasl::ScramSha256::new(
                        password.as_bytes(),
                        sasl::ChannelBinding::unsupported(),
                    );
                    frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut out)
                        .map_err(|e| self.io_error(&e))?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("SASL continuation"))?;
                    s.update(body.data()).map_err(|e| self.io_error(&e))?;
                    frontend::sasl_response(s.message(), &mut out)
                        .map_err(|e| self.io_error(&e))?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| self.protocol("SASL final"))?;
                    s.finish(body.data()).map_err(|e| self.io_error(&e))?;
                }
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(self.server_error(&body)),
                Message::ParameterStatus(_)
                | Message::BackendKeyData(_)
                | Message::NoticeResponse(_) => {}
                _ => return Err(self.protocol("message during authentication")),
            }
            if !out.is_empty() {
                self.send(&out).await?;
            }
        }
    }

    /// Runs a replication command and returns its rows as text.
    ///
    /// # Errors
    /// The server refuses the command.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(|e| self.io_error(&e))?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            match self.message().await? {
                Message::DataRow(row) => {
                    let buffer = row.buffer();
                    let mut ranges = row.ranges();
                    let mut values = Vec::new();
                    while let Some(range) = ranges.next().map_err(|e| self.io_error(&e))? {
                        values
                            .push(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned()));
                    }
                    rows.push(values);
                }
                Message::ErrorResponse(body) => failure = Some(self.server_error(&body)),
                Message::ReadyForQuery(_) => {
                    return match failure {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// `IDENTIFY_SYSTEM`.
    ///
    /// # Errors
    /// The server refuses it or answers what cannot be parsed.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| self.protocol("empty IDENTIFY_SYSTEM"))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let system_id = field(0).parse().ok();
        let timeline = field(1).parse().ok().map(TimelineId);
        let flushed = field(2).parse().ok();
        match (system_id, timeline, flushed) {
            (Some(system_id), Some(timeline), Some(flushed)) => Ok(SystemIdentity {
                system_id,
                timeline,
                flushed,
            }),
            _ => Err(self.protocol(&format!("IDENTIFY_SYSTEM answer {row:?}"))),
        }
    }

    /// `START_REPLICATION SLOT slot PHYSICAL start TIMELINE timeline`:
    /// from here on, [`Self::recv`] and [`Self::send_status`].
    ///
    /// # Errors
    /// The server refuses (e.g. the WAL at `start` was removed).
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        timeline: TimelineId,
    ) -> Result<(), ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT \"{}\" PHYSICAL {start} TIMELINE {}",
            slot.replace('"', "\"\""),
            timeline.0
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out).map_err(|e| self.io_error(&e))?;
        self.send(&out).await?;
        loop {
            let frame = self.frame().await?;
            match frame[0] {
                b'W' => return Ok(()),
                b'N' | b'S' => {}
                _ => {
                    let message = self.parse(frame)?;
                    if let Message::ErrorResponse(body) = message {
                        let e = self.server_error(&body);
                        // The server ends the failed command with ReadyForQuery.
                        let _ = self.message().await;
                        return Err(e);
                    }
                    return Err(self.protocol("answer to START_REPLICATION"));
                }
            }
        }
    }

    /// The next message of the stream. Cancel-safe: a message is taken off
    /// the buffer only once it is whole.
    ///
    /// # Errors
    /// The connection breaks or the server sends an error.
    pub async fn recv(&mut self) -> Result<StreamMessage, ReplicationError> {
        loop {
            let frame = self.frame().await?;
            match frame[0] {
                b'd' => {
                    let mut body = frame.freeze().slice(5..);
                    if body.is_empty() {
                        return Err(self.protocol("empty CopyData"));
                    }
                    let kind = body.get_u8();
                    match kind {
                        b'w' if body.len() >= 24 => {
                            let start = Lsn(body.get_u64());
                            let server_end = Lsn(body.get_u64());
                            let _sent_at = body.get_u64();
                            return Ok(StreamMessage::Data {
                                start,
                                server_end,
                                data: body,
                            });
                        }
                        b'k' if body.len() >= 17 => {
                            let server_end = Lsn(body.get_u64());
                            let _sent_at = body.get_u64();
                            let reply = body.get_u8() != 0;
                            return Ok(StreamMessage::Keepalive { server_end, reply });
                        }
                        other => {
                            return Err(
                                self.protocol(&format!("CopyData message {:?}", char::from(other)))
                            );
                        }
                    }
                }
                b'c' => return Ok(StreamMessage::End),
                b'N' | b'S' => {}
                _ => {
                    let message = self.parse(frame)?;
                    if let Message::ErrorResponse(body) = message {
                        return Err(self.server_error(&body));
                    }
                    return Err(self.protocol("message in the WAL stream"));
                }
            }
        }
    }

    /// Sends a standby status update: `written` received, `flushed` durable
    /// (what the slot and synchronous commit go by). Apply is reported as
    /// the flush position: nothing is replayed here.
    ///
    /// # Errors
    /// The connection breaks.
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        body.put_u64(written.0);
        body.put_u64(flushed.0);
        body.put_u64(flushed.0);
        body.put_i64(pg_epoch_micros(SystemTime::now()));
        body.put_u8(u8::from(reply_requested));
        let mut out = BytesMut::new();
        frontend::CopyData::new(body.freeze())
            .map_err(|e| self.io_error(&e))?
            .write(&mut out);
        self.send(&out).await
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ReplicationError> {
        self.io
            .write_all(bytes)
            .await
            .map_err(|e| self.io_error(&e))?;
        self.io.flush().await.map_err(|e| self.io_error(&e))
    }

    /// One whole message: tag, length, body.
    async fn frame(&mut self) -> Result<BytesMut, ReplicationError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let total = 1 + len as usize;
                if len < 4 {
                    return Err(self.protocol("message length"));
                }
                if self.buf.len() >= total {
                    return Ok(self.buf.split_to(total));
                }
                self.buf.reserve(total - self.buf.len());
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| self.io_error(&e))?;
            if n == 0 {
                return Err(ReplicationError::Io {
                    target: self.target.clone(),
                    detail: "the server closed the connection".to_owned(),
                });
            }
        }
    }

    async fn message(&mut self) -> Result<Message, ReplicationError> {
        let frame = self.frame().await?;
        self.parse(frame)
    }

    fn parse(&self, mut frame: BytesMut) -> Result<Message, ReplicationError> {
        match Message::parse(&mut frame) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(self.protocol("truncated message")),
            Err(e) => Err(self.io_error(&e)),
        }
    }

    fn server_error(
        &self,
        body: &postgres_protocol::message::backend::ErrorResponseBody,
    ) -> ReplicationError {
        let (mut severity, mut message, mut code, mut hint) =
            (String::new(), String::new(), String::new(), String::new());
        let mut fields = body.fields();
        while let Ok(Some(f)) = fields.next() {
            let value = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'S' => severity = value,
                b'M' => message = value,
                b'C' => code = value,
                b'H' => hint = format!(" ({value})"),
                _ => {}
            }
        }
        ReplicationError::Server {
            target: self.target.clone(),
            severity,
            message,
            code,
            hint,
        }
    }

    fn io_error(&self, e: &dyn std::fmt::Display) -> ReplicationError {
        ReplicationError::Io {
            target: self.target.clone(),
            detail: e.to_string(),
        }
    }

    fn protocol(&self, what: &str) -> ReplicationError {
        ReplicationError::Protocol {
            target: self.target.clone(),
            what: what.to_owned(),
        }
    }
}

/// Microseconds since 2000-01-01 UTC, PostgreSQL's epoch.
fn pg_epoch_micros(t: SystemTime) -> i64 {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let unix = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let since = unix.saturating_sub(Duration::from_secs(PG_EPOCH_UNIX_SECS));
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_times_count_from_2000() {
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(946_684_801);
        assert_eq!(super::pg_epoch_micros(t), 1_000_000);
    }
}
