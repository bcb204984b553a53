//! TLS and authentication rules for the agent's own PostgreSQL connections,
//! with libpq's settings and meanings: `PGSSLMODE` (disable, allow, prefer,
//! require, verify-ca, verify-full), `PGSSLROOTCERT`, `PGSSLCERT`,
//! `PGSSLKEY`, and `PGREQUIREAUTH` (libpq 16's `require_auth`).
//!
//! One difference from libpq, on purpose: over TCP the agent refuses a
//! server that asks for a cleartext or MD5 password unless `PGREQUIREAUTH`
//! says otherwise (its default there is `!password,!md5`), so that a
//! spoofed or misconfigured server never receives `PGPASSWORD` or a hash
//! that replays. Unix sockets keep libpq's default (anything).
//!
//! TLS is rustls (already in the tree for the S3 and Kubernetes clients; no
//! OpenSSL in the images). The checks run on the decrypted side of the
//! stream, before tokio-postgres or the replication client answer.

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS only if the server insists on it; the agent does not retry
    /// with TLS, so this is `disable` (a server that insists refuses).
    Allow,
    /// TLS if the server offers it, unverified (libpq's default).
    Prefer,
    /// TLS, unverified unless a root certificate is given (then as verify-ca).
    Require,
    /// TLS, the certificate chained to the root certificate.
    VerifyCa,
    /// TLS, chained and issued for the host name.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<Self, String> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "PGSSLMODE {other:?} is not one of disable, allow, prefer, require, \
                     verify-ca, verify-full"
                ));
            }
        })
    }

    /// Whether the connection must be encrypted.
    #[must_use]
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// Whether to ask the server for TLS at all.
    #[must_use]
    pub fn tries_tls(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Allow)
    }
}

/// An authentication method as `require_auth` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No authentication request at all (trust, peer, cert).
    None,
    /// Cleartext password.
    Password,
    /// MD5 password hash.
    Md5,
    /// SCRAM-SHA-256 (SASL).
    Scram,
    /// GSSAPI.
    Gss,
    /// SSPI.
    Sspi,
}

impl AuthMethod {
    fn name(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::Scram => "scram-sha-256",
            AuthMethod::Gss => "gss",
            AuthMethod::Sspi => "sspi",
        }
    }

    fn parse(word: &str) -> Option<Self> {
        [
            AuthMethod::None,
            AuthMethod::Password,
            AuthMethod::Md5,
            AuthMethod::Scram,
            AuthMethod::Gss,
            AuthMethod::Sspi,
        ]
        .into_iter()
        .find(|m| m.name() == word)
    }
}

/// Which authentication requests a connection may answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPolicy {
    /// The methods named.
    methods: Vec<AuthMethod>,
    /// Whether `methods` are the refused ones (`!md5`) or the only allowed.
    negated: bool,
    /// The setting as written, for messages.
    text: String,
}

impl AuthPolicy {
    /// Parses libpq's `require_auth`: a comma-separated list of methods,
    /// all plain (only these) or all negated with `!` (all but these).
    ///
    /// # Errors
    /// An unknown method, or plain and negated methods mixed.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut methods = Vec::new();
        let mut negated = None;
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let (neg, name) = match word.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, word),
            };
            if negated.is_some_and(|n| n != neg) {
                return Err(format!(
                    "PGREQUIREAUTH {text:?} mixes negated and plain methods; write either \
                     scram-sha-256 or !password,!md5"
                ));
            }
            negated = Some(neg);
            methods.push(AuthMethod::parse(name).ok_or_else(|| {
                format!(
                    "PGREQUIREAUTH {text:?}: unknown method {name:?}; use password, md5, \
                     scram-sha-256, gss, sspi or none"
                )
            })?);
        }
        Ok(AuthPolicy {
            negated: negated.unwrap_or(true),
            methods,
            text: text.to_owned(),
        })
    }

    /// Everything allowed.
    #[must_use]
    pub fn any() -> Self {
        AuthPolicy {
            methods: Vec::new(),
            negated: true,
            text: String::new(),
        }
    }

    /// Whether the server may authenticate this connection with `method`.
    #[must_use]
    pub fn allows(&self, method: AuthMethod) -> bool {
        self.methods.contains(&method) != self.negated
    }

    /// The refusal, for the server's request of `method`.
    #[must_use]
    pub fn refusal(&self, method: AuthMethod) -> io::Error {
        let what = match method {
            AuthMethod::Password => "a cleartext password",
            AuthMethod::Md5 => "an MD5 password hash",
            AuthMethod::None => "no authentication",
            AuthMethod::Scram => "SCRAM-SHA-256",
            AuthMethod::Gss => "GSSAPI",
            AuthMethod::Sspi => "SSPI",
        };
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the server asked for {what}, which PGREQUIREAUTH={} refuses (nothing was \
                 sent); make pg_hba.conf use scram-sha-256 for this user, or set \
                 PGREQUIREAUTH to allow {}",
                self.text,
                method.name()
            ),
        )
    }
}

/// The TLS and authentication settings of one connection.
#[derive(Debug, Clone)]
pub struct ConnSecurity {
    /// `PGSSLMODE`.
    pub mode: SslMode,
    /// `PGSSLROOTCERT`, or `~/.postgresql/root.crt` if it exists.
    pub root_cert: Option<PathBuf>,
    /// `PGSSLCERT` / `PGSSLKEY`, or the `~/.postgresql/postgresql.{crt,key}` pair.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `PGREQUIREAUTH`, or the agent's default for the transport.
    pub auth: AuthPolicy,
}

/// The default `require_auth` over TCP.
pub const TCP_REQUIRE_AUTH: &str = "!password,!md5";

impl ConnSecurity {
    /// The settings from the environment, for a connection over TCP
    /// (`tcp`) or a Unix socket.
    ///
    /// # Errors
    /// A setting that does not parse.
    pub fn from_env(tcp: bool) -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok();
        let mode = SslMode::parse(var("PGSSLMODE").as_deref().unwrap_or("prefer"))?;
        let home = var("HOME").map(|h| PathBuf::from(h).join(".postgresql"));
        let root_cert = var("PGSSLROOTCERT")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                home.as_ref()
                    .map(|h| h.join("root.crt"))
                    .filter(|p| p.is_file())
            });
        let cert = var("PGSSLCERT")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let key = var("PGSSLKEY").filter(|p| !p.is_empty()).map(PathBuf::from);
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (Some(_), None) | (None, Some(_)) => {
                return Err("set both PGSSLCERT and PGSSLKEY, or neither".to_owned());
            }
            (None, None) => home
                .map(|h| (h.join("postgresql.crt"), h.join("postgresql.key")))
                .filter(|(c, k)| c.is_file() && k.is_file()),
        };
        if mode == SslMode::VerifyCa || mode == SslMode::VerifyFull {
            match &root_cert {
                None => {
                    return Err(format!(
                        "PGSSLMODE={} needs the CA certificate: set PGSSLROOTCERT to its file",
                        if mode == SslMode::VerifyCa {
                            "verify-ca"
                        } else {
                            "verify-full"
                        }
                    ));
                }
                Some(p) if !p.is_file() => {
                    return Err(format!(
                        "PGSSLROOTCERT {} does not exist; mount the CA certificate there",
                        p.display()
                    ));
                }
                Some(_) => {}
            }
        }
        let auth = match var("PGREQUIREAUTH") {
            Some(text) => AuthPolicy::parse(&text)?,
            None if tcp => AuthPolicy::parse(TCP_REQUIRE_AUTH)?,
            None => AuthPolicy::any(),
        };
        Ok(ConnSecurity {
            mode,
            root_cert,
            client_cert,
            auth,
        })
    }

    /// The rustls client configuration for a server reached as `host`.
    ///
    /// # Errors
    /// A certificate or key file that cannot be read.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &self.root_cert {
            Some(path) => {
                let mut store = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(|e| format!("PGSSLROOTCERT {}: {e}", path.display()))?;
                let (added, _) = store.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!(
                        "PGSSLROOTCERT {} holds no certificate",
                        path.display()
                    ));
                }
                Some(Arc::new(store))
            }
            None => None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, roots) {
            (SslMode::VerifyFull, Some(roots)) => {
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| e.to_string())?
            }
            // verify-ca, and require with a root certificate (libpq's rule).
            (_, Some(roots)) => Arc::new(ChainOnly(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    provider.clone(),
                )
                .build()
                .map_err(|e| e.to_string())?,
            )),
            (_, None) => Arc::new(Unverified(provider.clone())),
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        match &self.client_cert {
            Some((cert, key)) => {
                let certs = CertificateDer::pem_file_iter(cert)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .map_err(|e| format!("PGSSLCERT {}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("PGSSLKEY {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("PGSSLCERT/PGSSLKEY: {e}"))
            }
            None => Ok(builder.with_no_client_auth()),
        }
    }

    /// Runs the TLS handshake over `stream` (after the server accepted the
    /// SSLRequest) for `host`.
    ///
    /// # Errors
    /// The handshake fails: a certificate not trusted or not for `host`.
    pub async fn handshake<S>(
        &self,
        stream: S,
        host: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.client_config().map_err(io::Error::other)?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::other(format!("{host:?} is not a host name: {e}")))?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, stream)
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "TLS with {host} failed: {e}; check PGSSLROOTCERT (the CA that signed \
                         the server's certificate) and that the certificate names {host}"
                    ),
                )
            })
    }
}

/// verify-ca: the chain must lead to a root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer and require without a root certificate: encrypted, not
/// authenticated (libpq's meaning). The handshake's signatures are still
/// checked against the certificate presented.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Where [`AuthGuard`] is in the server's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuardState {
    /// The one-byte answer to an SSLRequest comes first.
    SslAnswer,
    /// Backend messages: checking authentication requests.
    Messages,
    /// Past authentication, or TLS took over below: passing through.
    Off,
}

/// Watches what the server sends until authentication is over and fails
/// the read that carries a request `policy` refuses, so that the client
/// above never answers it.
pub struct AuthGuard<S> {
    inner: S,
    policy: AuthPolicy,
    state: GuardState,
    /// The current message's type, length and first body bytes.
    head: Vec<u8>,
    /// Body bytes of the current message still to pass over.
    skip: usize,
    /// Whether the server asked for any authentication yet.
    asked: bool,
    /// The SHA-256 of the server certificate, for channel binding.
    end_point: Option<Vec<u8>>,
}

impl<S> AuthGuard<S> {
    /// A guard over a stream whose next byte is a backend message.
    pub fn new(inner: S, policy: AuthPolicy) -> Self {
        Self::with_state(inner, policy, GuardState::Messages)
    }

    /// A guard over a raw stream that sent an SSLRequest: the first byte is
    /// the answer; after `S` TLS takes over (and a guard above it checks).
    pub fn after_ssl_request(inner: S, policy: AuthPolicy) -> Self {
        Self::with_state(inner, policy, GuardState::SslAnswer)
    }

    fn with_state(inner: S, policy: AuthPolicy, state: GuardState) -> Self {
        AuthGuard {
            inner,
            policy,
            state,
            head: Vec::with_capacity(9),
            skip: 0,
            asked: false,
            end_point: None,
        }
    }

    /// Inspects bytes the server sent.
    fn inspect(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            match self.state {
                GuardState::Off => return Ok(()),
                GuardState::SslAnswer => {
                    self.state = if bytes[0] == b'S' {
                        GuardState::Off
                    } else {
                        GuardState::Messages
                    };
                    bytes = &bytes[1..];
                }
                GuardState::Messages if self.skip > 0 => {
                    let n = self.skip.min(bytes.len());
                    self.skip -= n;
                    bytes = &bytes[n..];
                }
                GuardState::Messages => {
                    // Type (1) and length (4); for 'R' also the request code (4).
                    let want = if self.head.len() >= 5 && self.head[0] == b'R' {
                        9
                    } else {
                        5
                    };
                    let n = (want - self.head.len()).min(bytes.len());
                    self.head.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if self.head.len() < want || (want == 5 && self.head[0] == b'R') {
                        continue;
                    }
                    let len = u32::from_be_bytes([
                        self.head[1],
                        self.head[2],
                        self.head[3],
                        self.head[4],
                    ]) as usize;
                    let consumed_body = self.head.len() - 5;
                    self.skip = len.saturating_sub(4 + consumed_body);
                    let kind = self.head[0];
                    if kind == b'R' {
                        let code = u32::from_be_bytes([
                            self.head[5],
                            self.head[6],
                            self.head[7],
                            self.head[8],
                        ]);
                        self.check(code)?;
                    } else if kind != b'E' && kind != b'N' && kind != b'v' {
                        // Past authentication (ParameterStatus, BackendKeyData...).
                        self.state = GuardState::Off;
                    }
                    self.head.clear();
                }
            }
        }
        Ok(())
    }

    fn check(&mut self, code: u32) -> io::Result<()> {
        let method = match code {
            0 => {
                // AuthenticationOk: "none" if nothing was asked before.
                let none = !self.asked;
                self.state = GuardState::Off;
                if none && !self.policy.allows(AuthMethod::None) {
                    return Err(self.policy.refusal(AuthMethod::None));
                }
                return Ok(());
            }
            3 => AuthMethod::Password,
            5 => AuthMethod::Md5,
            7 | 8 => AuthMethod::Gss,
            9 => AuthMethod::Sspi,
            10 => AuthMethod::Scram,
            // SASL continue/final: part of the exchange already allowed.
            _ => return Ok(()),
        };
        self.asked = true;
        if self.policy.allows(method) {
            Ok(())
        } else {
            Err(self.policy.refusal(method))
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.state != GuardState::Off
                    && let Err(e) = this.inspect(&buf.filled()[before..])
                {
                    // The client above must not see the request.
                    buf.set_filled(before);
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for AuthGuard<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        match &self.end_point {
            Some(hash) => tokio_postgres::tls::ChannelBinding::tls_server_end_point(hash.clone()),
            None => tokio_postgres::tls::ChannelBinding::none(),
        }
    }
}

/// The tokio-postgres TLS connector: rustls with [`ConnSecurity`]'s rules,
/// and an [`AuthGuard`] above the decrypted stream.
#[derive(Clone)]
pub struct Connector {
    security: Arc<ConnSecurity>,
    host: String,
}

impl Connector {
    /// A connector for `host`.
    #[must_use]
    pub fn new(security: ConnSecurity, host: &str) -> Self {
        Connector {
            security: Arc::new(security),
            host: host.to_owned(),
        }
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = AuthGuard<tokio_rustls::client::TlsStream<S>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Stream>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self.security.handshake(stream, &self.host).await?;
            let end_point = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| sha2::Sha256::digest(c.as_ref()).to_vec());
            let mut guard = AuthGuard::new(tls, self.security.auth.clone());
            guard.end_point = end_point;
            Ok(guard)
        })
    }
}

/// Whether `host` names a Unix socket directory.
#[must_use]
pub fn is_socket(host: &str) -> bool {
    host.starts_with('/') || host.starts_with('@')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth_request(code: u32) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&8u32.to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m
    }

    fn run(policy: &str, stream: &[u8], chunk: usize, ssl: bool) -> io::Result<()> {
        let policy = AuthPolicy::parse(policy).expect("policy");
        let mut g = if ssl {
            AuthGuard::after_ssl_request((), policy)
        } else {
            AuthGuard::new((), policy)
        };
        for part in stream.chunks(chunk) {
            g.inspect(part)?;
        }
        Ok(())
    }

    #[test]
    fn refuses_cleartext_and_md5_by_default_in_any_chunking() {
        for chunk in [1, 2, 3, 5, 100] {
            assert!(run(TCP_REQUIRE_AUTH, &auth_request(3), chunk, false).is_err());
            assert!(run(TCP_REQUIRE_AUTH, &auth_request(5), chunk, false).is_err());
            // After an 'N' answer to the SSLRequest, too.
            let mut s = vec![b'N'];
            s.extend(auth_request(3));
            assert!(run(TCP_REQUIRE_AUTH, &s, chunk, true).is_err());
            // SCRAM (with its SASL body) then Ok then other messages.
            let mut s = vec![b'R'];
            s.extend_from_slice(&23u32.to_be_bytes());
            s.extend_from_slice(&10u32.to_be_bytes());
            s.extend_from_slice(b"SCRAM-SHA-256\0\0");
            s.extend(auth_request(0));
            s.extend_from_slice(b"S\0\0\0\x08ab");
            s.extend(auth_request(3)); // Past authentication: not inspected.
            run(TCP_REQUIRE_AUTH, &s, chunk, false).expect("scram allowed");
            // TLS took over: the raw stream is not inspected.
            let mut s = vec![b'S'];
            s.extend(auth_request(3));
            run(TCP_REQUIRE_AUTH, &s, chunk, true).expect("encrypted bytes pass");
        }
        let e = run(TCP_REQUIRE_AUTH, &auth_request(3), 9, false).expect_err("refused");
        assert!(e.to_string().contains("cleartext password"), "{e}");
    }

    #[test]
    fn require_auth_has_libpqs_meaning() {
        run("password", &auth_request(3), 9, false).expect("allowed");
        assert!(run("scram-sha-256", &auth_request(5), 9, false).is_err());
        assert!(run("scram-sha-256", &auth_request(0), 9, false).is_err());
        run("!md5", &auth_request(0), 9, false).expect("trust");
        assert!(AuthPolicy::parse("md5,!password").is_err());
        assert!(AuthPolicy::parse("kerberos").is_err());
        run("", &auth_request(3), 9, false).expect("empty allows all");
    }
}
