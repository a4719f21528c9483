//! Everything before the first AMQP frame: TLS (plain `amqps` and the AMQP
//! TLS upgrade header, AMQP 1.0 §5.2), the SASL layer (AMQP 1.0 §5.3) with
//! ANONYMOUS, PLAIN and SCRAM-SHA-256, and the protocol headers — for the
//! accepting end ([`accept`]) and the connecting end ([`connect`]).
//!
//! I/O is generic over `AsyncRead + AsyncWrite`, so TCP, TLS and in-memory
//! duplex streams all fit.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use fe2o3_amqp_types::primitives::{Binary, Symbol};
use fe2o3_amqp_types::sasl::{
    SaslChallenge, SaslCode, SaslInit, SaslMechanisms, SaslOutcome, SaslResponse,
};
use flotilla_core::auth::{
    scram_client_first_username, ScramClient, ScramCredentials, ScramServer,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::frame::{self, Frame, SaslFrame, HEADER_AMQP, HEADER_SASL, HEADER_TLS};

/// Any byte stream a connection can run on.
pub trait AsyncIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> AsyncIo for T {}

/// A boxed stream: TCP, TLS over TCP, or a test duplex.
pub type BoxIo = Box<dyn AsyncIo>;

/// Largest SASL frame we take (challenge/response data is small).
const SASL_MAX_FRAME: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("unsupported protocol header {0:02x?}")]
    BadHeader([u8; 8]),
    #[error("client must authenticate with SASL")]
    SaslRequired,
    #[error("authentication failed ({0})")]
    AuthFailed(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("TLS requested but this listener has no certificate")]
    NoTls,
    #[error("bad frame during SASL: {0}")]
    Frame(#[from] frame::FrameError),
    #[error("unexpected SASL frame: {0}")]
    Unexpected(&'static str),
    #[error("peer closed the connection during the handshake")]
    Eof,
}

/// Who the peer proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `None` for anonymous peers.
    pub user: Option<String>,
    /// The address space the credentials belong to, when the authenticator
    /// could tell (e.g. `user@space`, or the SASL hostname).
    pub space: Option<String>,
    pub mechanism: &'static str,
}

/// Checks credentials for the accepting end. Checks are async so that a
/// credential store behind I/O fits.
pub trait Authenticator: Send + Sync {
    /// Mechanisms to offer to this peer, most preferred first.
    fn mechanisms(&self, peer: SocketAddr) -> Vec<&'static str>;
    /// Whether a client may skip SASL entirely (treated as ANONYMOUS).
    fn allow_no_sasl(&self, peer: SocketAddr) -> bool;
    /// SASL ANONYMOUS.
    fn anonymous(&self, hostname: Option<&str>, peer: SocketAddr) -> Option<Identity>;
    /// SASL PLAIN.
    fn plain(
        &self,
        user: &str,
        password: &str,
        hostname: Option<&str>,
    ) -> impl Future<Output = Option<Identity>> + Send;
    /// The SCRAM keys of `user`, with the identity it proves if the proof holds.
    fn scram(
        &self,
        user: &str,
        hostname: Option<&str>,
    ) -> impl Future<Output = Option<(ScramCredentials, Identity)>> + Send;
}

/// Admits every peer as ANONYMOUS (with or without a SASL layer): for
/// listeners whose peers are vouched for otherwise (mutual TLS between
/// routers) or do not matter (a benchmark's own listening peer).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAnonymous;

impl Authenticator for AllowAnonymous {
    fn mechanisms(&self, _: SocketAddr) -> Vec<&'static str> {
        vec!["ANONYMOUS"]
    }
    fn allow_no_sasl(&self, _: SocketAddr) -> bool {
        true
    }
    fn anonymous(&self, _: Option<&str>, _: SocketAddr) -> Option<Identity> {
        Some(Identity::anonymous())
    }
    async fn plain(&self, _: &str, _: &str, _: Option<&str>) -> Option<Identity> {
        None
    }
    async fn scram(&self, _: &str, _: Option<&str>) -> Option<(ScramCredentials, Identity)> {
        None
    }
}

impl Identity {
    /// A peer that did not authenticate.
    pub fn anonymous() -> Self {
        Identity {
            user: None,
            space: None,
            mechanism: "ANONYMOUS",
        }
    }
}

/// A stream that first yields bytes already read from it.
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Bytes, io: IO) -> Self {
        Prefixed { prefix, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A stream after the handshake, with bytes already read past it.
pub struct Established {
    pub io: BoxIo,
    pub read_buf: BytesMut,
    pub identity: Identity,
    pub tls: bool,
}

async fn fill(io: &mut BoxIo, buf: &mut BytesMut, n: usize) -> Result<(), HandshakeError> {
    while buf.len() < n {
        if io.read_buf(buf).await? == 0 {
            return Err(HandshakeError::Eof);
        }
    }
    Ok(())
}

async fn read_header(io: &mut BoxIo, buf: &mut BytesMut) -> Result<[u8; 8], HandshakeError> {
    fill(io, buf, 8).await?;
    let mut h = [0u8; 8];
    h.copy_from_slice(&buf[..8]);
    buf.advance(8);
    Ok(h)
}

async fn read_sasl(io: &mut BoxIo, buf: &mut BytesMut) -> Result<SaslFrame, HandshakeError> {
    loop {
        match frame::decode_frame(buf, SASL_MAX_FRAME)? {
            Some(Frame::Sasl(f)) => return Ok(f),
            Some(Frame::Empty { .. }) => continue,
            Some(Frame::Amqp { .. }) => {
                return Err(HandshakeError::Unexpected("AMQP frame during SASL"))
            }
            None => {
                if io.read_buf(buf).await? == 0 {
                    return Err(HandshakeError::Eof);
                }
            }
        }
    }
}

async fn write_sasl(io: &mut BoxIo, f: SaslFrame) -> Result<(), HandshakeError> {
    let mut out = BytesMut::new();
    frame::encode_sasl(&mut out, &f);
    io.write_all(&out).await?;
    Ok(())
}

/// What the accepting end offers.
#[derive(Clone, Default)]
pub struct AcceptConfig {
    /// Certificate and key for TLS (plain `amqps` and the TLS header).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Refuse clients that do not use TLS.
    pub require_tls: bool,
}

/// Runs the accepting end's handshake: TLS if the client starts with a TLS
/// ClientHello or the TLS header, then SASL, then the AMQP header.
///
/// # Errors
/// A protocol header we do not speak (answered with ours first, as AMQP 1.0
/// §2.2 asks), failed authentication, TLS errors, I/O errors.
pub async fn accept<IO, A>(
    io: IO,
    peer: SocketAddr,
    cfg: &AcceptConfig,
    auth: &A,
) -> Result<Established, HandshakeError>
where
    IO: AsyncIo + 'static,
    A: Authenticator,
{
    let mut io: BoxIo = Box::new(io);
    let mut buf = BytesMut::with_capacity(1024);
    let mut tls = false;
    loop {
        fill(&mut io, &mut buf, 1).await?;
        if buf[0] == 0x16 && !tls {
            // A TLS ClientHello: an `amqps` client.
            let acceptor = cfg.tls.clone().ok_or(HandshakeError::NoTls)?;
            io = tls_accept(io, buf.split().freeze(), acceptor).await?;
            tls = true;
            continue;
        }
        let header = read_header(&mut io, &mut buf).await?;
        match header {
            HEADER_TLS if !tls => {
                let Some(acceptor) = cfg.tls.clone() else {
                    io.write_all(&HEADER_SASL).await?;
                    return Err(HandshakeError::NoTls);
                };
                io.write_all(&HEADER_TLS).await?;
                io = tls_accept(io, buf.split().freeze(), acceptor).await?;
                tls = true;
            }
            _ if cfg.require_tls && !tls => {
                io.write_all(&HEADER_TLS).await?;
                return Err(HandshakeError::Tls("this listener requires TLS".into()));
            }
            HEADER_SASL => {
                io.write_all(&HEADER_SASL).await?;
                let identity = sasl_server(&mut io, &mut buf, peer, auth).await?;
                let next = read_header(&mut io, &mut buf).await?;
                if next != HEADER_AMQP {
                    io.write_all(&HEADER_AMQP).await?;
                    return Err(HandshakeError::BadHeader(next));
                }
                io.write_all(&HEADER_AMQP).await?;
                return Ok(Established {
                    io,
                    read_buf: buf,
                    identity,
                    tls,
                });
            }
            HEADER_AMQP => {
                if !auth.allow_no_sasl(peer) {
                    io.write_all(&HEADER_SASL).await?;
                    return Err(HandshakeError::SaslRequired);
                }
                io.write_all(&HEADER_AMQP).await?;
                let identity = Identity {
                    user: None,
                    space: None,
                    mechanism: "none",
                };
                return Ok(Established {
                    io,
                    read_buf: buf,
                    identity,
                    tls,
                });
            }
            other => {
                io.write_all(&HEADER_SASL).await?;
                return Err(HandshakeError::BadHeader(other));
            }
        }
    }
}

async fn tls_accept(
    io: BoxIo,
    prefix: Bytes,
    cfg: Arc<rustls::ServerConfig>,
) -> Result<BoxIo, HandshakeError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let s = acceptor
        .accept(Prefixed::new(prefix, io))
        .await
        .map_err(|e| HandshakeError::Tls(e.to_string()))?;
    Ok(Box::new(s))
}

async fn sasl_server<A: Authenticator>(
    io: &mut BoxIo,
    buf: &mut BytesMut,
    peer: SocketAddr,
    auth: &A,
) -> Result<Identity, HandshakeError> {
    let mechs = auth.mechanisms(peer);
    let list: Vec<Symbol> = mechs.iter().map(|m| Symbol::from(*m)).collect();
    write_sasl(
        io,
        SaslFrame::Mechanisms(SaslMechanisms {
            sasl_server_mechanisms: list.into(),
        }),
    )
    .await?;
    let SaslFrame::Init(init) = read_sasl(io, buf).await? else {
        return Err(HandshakeError::Unexpected("expected sasl-init"));
    };
    let mech = init.mechanism.as_str().to_string();
    let hostname = init.hostname.as_deref();
    let response = init
        .initial_response
        .map(|b| b.into_vec())
        .unwrap_or_default();
    let offered = mechs.iter().find(|m| **m == mech).copied();
    let mut scram_final: Option<Vec<u8>> = None;
    let result = match offered {
        Some("ANONYMOUS") => auth
            .anonymous(hostname, peer)
            .ok_or_else(|| "anonymous not allowed".to_string()),
        Some("PLAIN") => {
            // authzid NUL authcid NUL password (RFC 4616)
            let mut parts = response.split(|b| *b == 0);
            let (_authz, user, pass) = (parts.next(), parts.next(), parts.next());
            match (user.map(std::str::from_utf8), pass.map(std::str::from_utf8)) {
                (Some(Ok(u)), Some(Ok(p))) => auth
                    .plain(u, p, hostname)
                    .await
                    .ok_or_else(|| format!("PLAIN for {u:?} refused")),
                _ => Err("malformed PLAIN response".to_string()),
            }
        }
        Some("SCRAM-SHA-256") => {
            let (r, fin) = scram_server(io, buf, &response, hostname, auth).await?;
            scram_final = fin;
            r
        }
        _ => Err(format!("mechanism {mech:?} not offered")),
    };
    match result {
        Ok(identity) => {
            let additional_data = scram_final.take().map(Binary::from);
            write_sasl(
                io,
                SaslFrame::Outcome(SaslOutcome {
                    code: SaslCode::Ok,
                    additional_data,
                }),
            )
            .await?;
            Ok(identity)
        }
        Err(why) => {
            write_sasl(
                io,
                SaslFrame::Outcome(SaslOutcome {
                    code: SaslCode::Auth,
                    additional_data: None,
                }),
            )
            .await?;
            io.flush().await?;
            Err(HandshakeError::AuthFailed(why))
        }
    }
}

/// The SCRAM-SHA-256 exchange after sasl-init; on success also returns the
/// server-final message, sent in the outcome's additional-data.
async fn scram_server<A: Authenticator>(
    io: &mut BoxIo,
    buf: &mut BytesMut,
    client_first: &[u8],
    hostname: Option<&str>,
    auth: &A,
) -> Result<(Result<Identity, String>, Option<Vec<u8>>), HandshakeError> {
    let Ok(user) = scram_client_first_username(client_first) else {
        return Ok((Err("malformed SCRAM client-first".into()), None));
    };
    // An unknown user still gets a full exchange with throwaway keys, so the
    // answer does not tell which usernames exist.
    let (creds, identity) = match auth.scram(&user, hostname).await {
        Some((c, i)) => (c, Some(i)),
        None => (
            ScramCredentials::derive_with(&random_password(), b"unknown-user-salt".to_vec(), 4096),
            None,
        ),
    };
    let Ok((server, server_first)) = ScramServer::start(client_first, creds) else {
        return Ok((Err("malformed SCRAM client-first".into()), None));
    };
    write_sasl(
        io,
        SaslFrame::Challenge(SaslChallenge {
            challenge: Binary::from(server_first),
        }),
    )
    .await?;
    let SaslFrame::Response(resp) = read_sasl(io, buf).await? else {
        return Err(HandshakeError::Unexpected("expected sasl-response"));
    };
    match (server.finish(&resp.response), identity) {
        (Ok(server_final), Some(identity)) => Ok((Ok(identity), Some(server_final))),
        _ => Ok((Err(format!("SCRAM for {user:?} refused")), None)),
    }
}

fn random_password() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{n:x}-{:p}", &n)
}

/// How the connecting end authenticates.
#[derive(Clone)]
pub enum ClientSasl {
    /// No SASL layer at all.
    None,
    Anonymous,
    Plain {
        user: String,
        password: String,
    },
    Scram {
        user: String,
        password: String,
    },
}

impl std::fmt::Debug for ClientSasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientSasl::None => f.write_str("None"),
            ClientSasl::Anonymous => f.write_str("Anonymous"),
            ClientSasl::Plain { user, .. } => write!(f, "Plain({user})"),
            ClientSasl::Scram { user, .. } => write!(f, "Scram({user})"),
        }
    }
}

/// What the connecting end does before AMQP.
#[derive(Clone)]
pub struct ConnectConfig {
    pub tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
    pub sasl: ClientSasl,
    /// The SASL hostname (the address space, for Flotilla).
    pub hostname: Option<String>,
    /// Start TLS with the AMQP TLS header (AMQP 1.0 §5.2.1) rather than
    /// straight away (`amqps`).
    pub tls_header: bool,
}

/// Runs the connecting end's handshake: TLS (as `amqps`), SASL, AMQP header.
///
/// # Errors
/// The server refused our credentials or header; TLS or I/O errors.
pub async fn connect<IO: AsyncIo + 'static>(
    io: IO,
    cfg: &ConnectConfig,
) -> Result<(BoxIo, BytesMut), HandshakeError> {
    let mut io: BoxIo = Box::new(io);
    if let Some((tls, name)) = &cfg.tls {
        if cfg.tls_header {
            io.write_all(&HEADER_TLS).await?;
            let mut hb = BytesMut::new();
            let h = read_header(&mut io, &mut hb).await?;
            if h != HEADER_TLS {
                return Err(HandshakeError::BadHeader(h));
            }
        }
        let c = tokio_rustls::TlsConnector::from(tls.clone());
        io = Box::new(
            c.connect(name.clone(), io)
                .await
                .map_err(|e| HandshakeError::Tls(e.to_string()))?,
        );
    }
    let mut buf = BytesMut::with_capacity(1024);
    let (user, password, mech) = match &cfg.sasl {
        ClientSasl::None => {
            io.write_all(&HEADER_AMQP).await?;
            let h = read_header(&mut io, &mut buf).await?;
            return if h == HEADER_AMQP {
                Ok((io, buf))
            } else {
                Err(HandshakeError::BadHeader(h))
            };
        }
        ClientSasl::Anonymous => ("", "", "ANONYMOUS"),
        ClientSasl::Plain { user, password } => (user.as_str(), password.as_str(), "PLAIN"),
        ClientSasl::Scram { user, password } => (user.as_str(), password.as_str(), "SCRAM-SHA-256"),
    };
    io.write_all(&HEADER_SASL).await?;
    let h = read_header(&mut io, &mut buf).await?;
    if h != HEADER_SASL {
        return Err(HandshakeError::BadHeader(h));
    }
    let SaslFrame::Mechanisms(m) = read_sasl(&mut io, &mut buf).await? else {
        return Err(HandshakeError::Unexpected("expected sasl-mechanisms"));
    };
    if !m
        .sasl_server_mechanisms
        .0
        .iter()
        .any(|s| s.as_str() == mech)
    {
        return Err(HandshakeError::AuthFailed(format!(
            "server does not offer {mech}"
        )));
    }
    let mut scram = None;
    let initial = match mech {
        "PLAIN" => Some(format!("\0{user}\0{password}").into_bytes()),
        "SCRAM-SHA-256" => {
            let (c, first) = ScramClient::new(user, password);
            scram = Some(c);
            Some(first)
        }
        _ => None,
    };
    let init = SaslInit {
        mechanism: Symbol::from(mech),
        initial_response: initial.map(Binary::from),
        hostname: cfg.hostname.clone(),
    };
    write_sasl(&mut io, SaslFrame::Init(init)).await?;
    let outcome = loop {
        match read_sasl(&mut io, &mut buf).await? {
            SaslFrame::Challenge(ch) => {
                let c = scram
                    .as_mut()
                    .ok_or(HandshakeError::Unexpected("challenge without SCRAM"))?;
                let reply = c
                    .respond(&ch.challenge)
                    .map_err(|e| HandshakeError::AuthFailed(e.to_string()))?;
                write_sasl(
                    &mut io,
                    SaslFrame::Response(SaslResponse {
                        response: Binary::from(reply),
                    }),
                )
                .await?;
            }
            SaslFrame::Outcome(o) => break o,
            _ => {
                return Err(HandshakeError::Unexpected(
                    "expected sasl-challenge or sasl-outcome",
                ))
            }
        }
    };
    if outcome.code != SaslCode::Ok {
        return Err(HandshakeError::AuthFailed(format!(
            "server answered {:?}",
            outcome.code
        )));
    }
    if let Some(c) = &scram {
        let data = outcome
            .additional_data
            .map(|b| b.into_vec())
            .unwrap_or_default();
        c.verify(&data).map_err(|_| {
            HandshakeError::AuthFailed("server did not prove it knows the SCRAM keys".into())
        })?;
    }
    io.write_all(&HEADER_AMQP).await?;
    let h = read_header(&mut io, &mut buf).await?;
    if h != HEADER_AMQP {
        return Err(HandshakeError::BadHeader(h));
    }
    Ok((io, buf))
}
