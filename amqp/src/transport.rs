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

/// What kind of peer a connection's credentials prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// A messaging client: a tenant's user, or anonymous.
    Client,
    /// A Flotilla component or router: it proved the mesh credential (the
    /// mesh secret, or a certificate from the mesh CA).
    Component,
}

/// Who the peer proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user (clients), or the claimed id (components); `None` for
    /// anonymous clients.
    pub user: Option<String>,
    /// The address space the login named: the one a user's credentials
    /// were checked in, or the one an anonymous client's SASL hostname
    /// named.
    pub space: Option<String>,
    pub mechanism: &'static str,
    pub kind: PeerKind,
    /// The connection came over TLS.
    pub tls: bool,
    /// The token it logged in with (then `user` is its subject).
    pub token: Option<std::sync::Arc<flotilla_core::oidc::Verified>>,
}

impl Identity {
    /// A client that did not authenticate.
    pub fn anonymous() -> Self {
        Identity {
            user: None,
            space: None,
            mechanism: "ANONYMOUS",
            kind: PeerKind::Client,
            tls: false,
            token: None,
        }
    }

    /// A component or router that proved the mesh credential.
    pub fn component(id: Option<&str>, mechanism: &'static str) -> Self {
        Identity {
            user: id.map(str::to_string),
            space: None,
            mechanism,
            kind: PeerKind::Component,
            tls: false,
            token: None,
        }
    }

    /// True for a component or router.
    pub fn is_component(&self) -> bool {
        self.kind == PeerKind::Component
    }
}

/// What TLS established about the peer before SASL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsState {
    /// The connection is encrypted.
    pub tls: bool,
    /// The peer presented a certificate the listener's client CA signed.
    pub client_cert: bool,
}

/// The names a client gave for its address space (AMQP 1.0 §5.3.3.3 and
/// §2.7.1).
#[derive(Debug, Clone, Copy, Default)]
pub struct Hostnames<'a> {
    /// SASL-init's hostname.
    pub sasl: Option<&'a str>,
    /// Open's hostname: `None` while the Open frame has not been read,
    /// `Some(None)` when it carries none.
    pub open: Option<Option<&'a str>>,
}

/// An authenticator's answer to a PLAIN login.
#[derive(Debug)]
pub enum Verdict {
    Accept(Identity),
    Refuse(String),
    /// Which credentials to check depends on the Open frame's hostname:
    /// ask again once it is read.
    AwaitOpen,
}

/// Checks credentials for the accepting end. Checks are async so that a
/// credential store behind I/O fits.
pub trait Authenticator: Send + Sync {
    /// Mechanisms to offer to this peer, most preferred first.
    fn mechanisms(&self, peer: SocketAddr, tls: TlsState) -> Vec<&'static str>;
    /// Who a peer is that gives no credentials: it skipped SASL, or chose
    /// ANONYMOUS or EXTERNAL (then what TLS proved is all there is).
    /// `None`: such peers are refused.
    fn without_credentials(
        &self,
        hostname: Option<&str>,
        peer: SocketAddr,
        tls: TlsState,
    ) -> Option<Identity>;
    /// SASL PLAIN. Never answers [`Verdict::AwaitOpen`] once
    /// `names.open` is known.
    fn plain(
        &self,
        user: &str,
        password: &str,
        names: Hostnames<'_>,
        tls: TlsState,
    ) -> impl Future<Output = Verdict> + Send;
    /// The SCRAM keys of `user`, with the identity it proves if the proof
    /// holds; `Err` refuses at once (the reason is logged, not sent).
    fn scram(
        &self,
        user: &str,
        hostname: Option<&str>,
        tls: TlsState,
    ) -> impl Future<Output = Result<Option<(ScramCredentials, Identity)>, String>> + Send;
    /// A bearer token (SASL OAUTHBEARER or XOAUTH2) with the username the
    /// login gave, if any. Never answers [`Verdict::AwaitOpen`] once
    /// `names.open` is known.
    fn token(
        &self,
        _user: Option<&str>,
        _token: &str,
        _names: Hostnames<'_>,
        _tls: TlsState,
        _mechanism: &'static str,
    ) -> impl Future<Output = Verdict> + Send {
        async { Verdict::Refuse("tokens are not accepted here".into()) }
    }
}

/// Admits every peer as an anonymous client (with or without a SASL
/// layer): for listeners whose peers do not matter (a benchmark's own
/// listening peer).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAnonymous;

impl Authenticator for AllowAnonymous {
    fn mechanisms(&self, _: SocketAddr, _: TlsState) -> Vec<&'static str> {
        vec!["ANONYMOUS"]
    }
    fn without_credentials(&self, _: Option<&str>, _: SocketAddr, _: TlsState) -> Option<Identity> {
        Some(Identity::anonymous())
    }
    async fn plain(&self, _: &str, _: &str, _: Hostnames<'_>, _: TlsState) -> Verdict {
        Verdict::Refuse("PLAIN is not offered".into())
    }
    async fn scram(
        &self,
        _: &str,
        _: Option<&str>,
        _: TlsState,
    ) -> Result<Option<(ScramCredentials, Identity)>, String> {
        Err("SCRAM is not offered".into())
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
/// ClientHello or the TLS header, then SASL, then the AMQP header. A PLAIN
/// login whose address space only the Open frame names is checked once
/// that frame is read (it stays in the returned read buffer); refused, it
/// gets an Open and a Close with `amqp:unauthorized-access` (AMQP 1.0
/// §2.4.1).
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
    let mut tls = TlsState::default();
    loop {
        fill(&mut io, &mut buf, 1).await?;
        if buf[0] == 0x16 && !tls.tls {
            // A TLS ClientHello: an `amqps` client.
            let acceptor = cfg.tls.clone().ok_or(HandshakeError::NoTls)?;
            (io, tls) = tls_accept(io, buf.split().freeze(), acceptor).await?;
            continue;
        }
        let header = read_header(&mut io, &mut buf).await?;
        match header {
            HEADER_TLS if !tls.tls => {
                let Some(acceptor) = cfg.tls.clone() else {
                    io.write_all(&HEADER_SASL).await?;
                    return Err(HandshakeError::NoTls);
                };
                io.write_all(&HEADER_TLS).await?;
                (io, tls) = tls_accept(io, buf.split().freeze(), acceptor).await?;
            }
            _ if cfg.require_tls && !tls.tls => {
                io.write_all(&HEADER_TLS).await?;
                return Err(HandshakeError::Tls("this listener requires TLS".into()));
            }
            HEADER_SASL => {
                io.write_all(&HEADER_SASL).await?;
                let login = sasl_server(&mut io, &mut buf, peer, tls, auth).await?;
                let next = read_header(&mut io, &mut buf).await?;
                if next != HEADER_AMQP {
                    io.write_all(&HEADER_AMQP).await?;
                    return Err(HandshakeError::BadHeader(next));
                }
                io.write_all(&HEADER_AMQP).await?;
                let mut identity = match login {
                    Login::Done(identity) => identity,
                    Login::AwaitOpen {
                        user,
                        password,
                        sasl_hostname,
                        mechanism,
                    } => {
                        let login = Deferred {
                            user: &user,
                            secret: &password,
                            sasl_hostname,
                            mechanism,
                        };
                        plain_at_open(&mut io, &mut buf, auth, login, tls).await?
                    }
                };
                identity.tls = tls.tls;
                return Ok(Established {
                    io,
                    read_buf: buf,
                    identity,
                    tls: tls.tls,
                });
            }
            HEADER_AMQP => {
                let Some(mut identity) = auth.without_credentials(None, peer, tls) else {
                    io.write_all(&HEADER_SASL).await?;
                    return Err(HandshakeError::SaslRequired);
                };
                io.write_all(&HEADER_AMQP).await?;
                identity.mechanism = if identity.is_component() {
                    "EXTERNAL"
                } else {
                    "none"
                };
                identity.tls = tls.tls;
                return Ok(Established {
                    io,
                    read_buf: buf,
                    identity,
                    tls: tls.tls,
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
) -> Result<(BoxIo, TlsState), HandshakeError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let s = acceptor
        .accept(Prefixed::new(prefix, io))
        .await
        .map_err(|e| HandshakeError::Tls(e.to_string()))?;
    // rustls hands over a peer certificate only once its verifier (the
    // listener's client CA) accepted it.
    let client_cert = s
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|c| !c.is_empty());
    Ok((
        Box::new(s),
        TlsState {
            tls: true,
            client_cert,
        },
    ))
}

/// What the SASL exchange settled.
enum Login {
    Done(Identity),
    /// PLAIN (or a token), answered `ok`, to be checked against the
    /// space Open names.
    AwaitOpen {
        user: String,
        password: String,
        sasl_hostname: Option<String>,
        mechanism: &'static str,
    },
}

/// A login whose space only the Open frame names.
struct Deferred<'a> {
    user: &'a str,
    /// The password, or the token.
    secret: &'a str,
    sasl_hostname: Option<String>,
    mechanism: &'static str,
}

/// Reads the client's Open (without taking it from `buf`) and checks a
/// PLAIN (or token) login against the space its hostname names.
async fn plain_at_open<A: Authenticator>(
    io: &mut BoxIo,
    buf: &mut BytesMut,
    auth: &A,
    login: Deferred<'_>,
    tls: TlsState,
) -> Result<Identity, HandshakeError> {
    let Deferred {
        user,
        secret: password,
        sasl_hostname,
        mechanism,
    } = login;
    let open = loop {
        let mut peek = buf.clone();
        match frame::decode_frame(&mut peek, SASL_MAX_FRAME)? {
            Some(Frame::Amqp {
                performative: frame::Performative::Open(open),
                ..
            }) => break open,
            Some(Frame::Empty { .. }) => {
                // A heartbeat before Open: skip it.
                *buf = peek;
                continue;
            }
            Some(_) => return Err(HandshakeError::Unexpected("expected open")),
            None => {
                if io.read_buf(buf).await? == 0 {
                    return Err(HandshakeError::Eof);
                }
            }
        }
    };
    let names = Hostnames {
        sasl: sasl_hostname.as_deref(),
        open: Some(open.hostname.as_deref()),
    };
    let verdict = if mechanism == "PLAIN" {
        auth.plain(user, password, names, tls).await
    } else {
        let user = (!user.is_empty()).then_some(user);
        auth.token(user, password, names, tls, mechanism).await
    };
    match verdict {
        Verdict::Accept(mut identity) => {
            identity.mechanism = mechanism;
            Ok(identity)
        }
        verdict => {
            let why = match verdict {
                Verdict::Refuse(why) => why,
                _ => "the authenticator could not decide at Open".to_string(),
            };
            refuse_open(
                io,
                fe2o3_amqp_types::definitions::AmqpError::UnauthorizedAccess,
                "Authentication failed",
            )
            .await?;
            drain(io).await;
            Err(HandshakeError::AuthFailed(why))
        }
    }
}

/// Refuses a connection after its handshake: our Open, then a Close with
/// `condition` (AMQP 1.0 §2.4.1: a peer refusing a connection still opens
/// first). Used for logins refused at Open and for connections past a
/// limit (`amqp:resource-limit-exceeded`).
///
/// # Errors
/// The socket failed.
pub async fn refuse_open(
    io: &mut BoxIo,
    condition: impl Into<fe2o3_amqp_types::definitions::ErrorCondition>,
    description: &str,
) -> Result<(), HandshakeError> {
    use fe2o3_amqp_types::definitions::Error as AmqpErrorBody;
    use fe2o3_amqp_types::performatives::{Close, Open};
    let mut out = BytesMut::new();
    let open = Open {
        container_id: String::new(),
        hostname: None,
        max_frame_size: Default::default(),
        channel_max: Default::default(),
        idle_time_out: None,
        outgoing_locales: None,
        incoming_locales: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: None,
    };
    frame::encode_performative(&mut out, 0, &frame::Performative::Open(Box::new(open)));
    let close = Close {
        error: Some(AmqpErrorBody::new(
            condition.into(),
            Some(description.to_string()),
            None,
        )),
    };
    frame::encode_performative(&mut out, 0, &frame::Performative::Close(close));
    io.write_all(&out).await?;
    io.flush().await?;
    Ok(())
}

/// Reads what the peer sent meanwhile (Begin, Attach...) until it closes
/// too (§2.4.3), for at most a second and 64 KiB: closing the socket on
/// unread bytes would reset it, and the peer could lose our Close.
async fn drain(io: &mut BoxIo) {
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}
async fn sasl_server<A: Authenticator>(
    io: &mut BoxIo,
    buf: &mut BytesMut,
    peer: SocketAddr,
    tls: TlsState,
    auth: &A,
) -> Result<Login, HandshakeError> {
    let mechs = auth.mechanisms(peer, tls);
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
        Some(m @ ("ANONYMOUS" | "EXTERNAL")) => auth
            .without_credentials(hostname, peer, tls)
            .map(|mut i| {
                i.mechanism = m;
                Login::Done(i)
            })
            .ok_or_else(|| format!("{m} not allowed")),
        Some("PLAIN") => {
            // authzid NUL authcid NUL password (RFC 4616)
            let mut parts = response.split(|b| *b == 0);
            let (_authz, user, pass) = (parts.next(), parts.next(), parts.next());
            match (user.map(std::str::from_utf8), pass.map(std::str::from_utf8)) {
                (Some(Ok(u)), Some(Ok(p))) => {
                    let names = Hostnames {
                        sasl: hostname,
                        open: None,
                    };
                    match auth.plain(u, p, names, tls).await {
                        Verdict::Accept(mut i) => {
                            i.mechanism = "PLAIN";
                            Ok(Login::Done(i))
                        }
                        Verdict::Refuse(why) => Err(format!("PLAIN for {u:?} refused: {why}")),
                        Verdict::AwaitOpen => Ok(Login::AwaitOpen {
                            user: u.to_string(),
                            password: p.to_string(),
                            sasl_hostname: hostname.map(str::to_string),
                            mechanism: "PLAIN",
                        }),
                    }
                }
                _ => Err("malformed PLAIN response".to_string()),
            }
        }
        Some("SCRAM-SHA-256") => {
            let (r, fin) = scram_server(io, buf, &response, hostname, tls, auth).await?;
            scram_final = fin;
            r.map(Login::Done)
        }
        Some(m @ ("OAUTHBEARER" | "XOAUTH2")) => match bearer(m, &response) {
            Some((user, token)) => {
                let names = Hostnames {
                    sasl: hostname,
                    open: None,
                };
                match auth.token(user.as_deref(), &token, names, tls, m).await {
                    Verdict::Accept(mut i) => {
                        i.mechanism = m;
                        Ok(Login::Done(i))
                    }
                    Verdict::Refuse(why) => Err(format!("{m} refused: {why}")),
                    Verdict::AwaitOpen => Ok(Login::AwaitOpen {
                        user: user.unwrap_or_default(),
                        password: token,
                        sasl_hostname: hostname.map(str::to_string),
                        mechanism: m,
                    }),
                }
            }
            None => Err(format!("malformed {m} response")),
        },
        _ => Err(format!("mechanism {mech:?} not offered")),
    };
    match result {
        Ok(login) => {
            let additional_data = scram_final.take().map(Binary::from);
            write_sasl(
                io,
                SaslFrame::Outcome(SaslOutcome {
                    code: SaslCode::Ok,
                    additional_data,
                }),
            )
            .await?;
            Ok(login)
        }
        Err(why) => {
            // RFC 7628 §3.2.2: an OAUTHBEARER failure says why, as JSON
            // (here in the outcome: AMQP's SASL ends with it).
            let additional_data = (mech == "OAUTHBEARER")
                .then(|| Binary::from(br#"{"status":"invalid_token"}"#.to_vec()));
            write_sasl(
                io,
                SaslFrame::Outcome(SaslOutcome {
                    code: SaslCode::Auth,
                    additional_data,
                }),
            )
            .await?;
            io.flush().await?;
            Err(HandshakeError::AuthFailed(why))
        }
    }
}

/// The username (if any) and token of an OAUTHBEARER (RFC 7628 §3.1:
/// `n,a=USER,^Aauth=Bearer TOKEN^A^A`) or XOAUTH2
/// (`user=USER^Aauth=Bearer TOKEN^A^A`) initial response.
pub fn bearer(mechanism: &str, response: &[u8]) -> Option<(Option<String>, String)> {
    let text = std::str::from_utf8(response).ok()?;
    let (user, pairs) = if mechanism == "OAUTHBEARER" {
        // gs2-header: a channel-binding flag, then `a=AUTHZID` or nothing.
        let (gs2, rest) = text.split_once(',')?;
        if !matches!(gs2, "n" | "y") {
            return None;
        }
        let (authz, rest) = rest.split_once(',')?;
        let user = match authz {
            "" => None,
            a => Some(
                a.strip_prefix("a=")?
                    .replace("=2C", ",")
                    .replace("=3D", "="),
            ),
        };
        (user, rest)
    } else {
        (None, text)
    };
    let mut user = user;
    let mut token = None;
    for kv in pairs.split('\u{1}').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=')?;
        match k {
            "auth" => {
                let (scheme, t) = v.split_once(' ')?;
                if !scheme.eq_ignore_ascii_case("bearer") {
                    return None;
                }
                token = Some(t.trim().to_string());
            }
            "user" if mechanism == "XOAUTH2" => user = Some(v.to_string()),
            _ => {}
        }
    }
    Some((
        user.filter(|u| !u.is_empty()),
        token.filter(|t| !t.is_empty())?,
    ))
}

/// The SCRAM-SHA-256 exchange after sasl-init; on success also returns the
/// server-final message, sent in the outcome's additional-data.
async fn scram_server<A: Authenticator>(
    io: &mut BoxIo,
    buf: &mut BytesMut,
    client_first: &[u8],
    hostname: Option<&str>,
    tls: TlsState,
    auth: &A,
) -> Result<(Result<Identity, String>, Option<Vec<u8>>), HandshakeError> {
    let Ok(user) = scram_client_first_username(client_first) else {
        return Ok((Err("malformed SCRAM client-first".into()), None));
    };
    // An unknown user still gets a full exchange with throwaway keys, so the
    // answer does not tell which usernames exist.
    let (creds, identity) = match auth.scram(&user, hostname, tls).await {
        Ok(Some((c, i))) => (c, Some(i)),
        Ok(None) => (ScramCredentials::decoy(&user), None),
        Err(why) => return Ok((Err(format!("SCRAM for {user:?} refused: {why}")), None)),
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
        (Ok(server_final), Some(mut identity)) => {
            identity.mechanism = "SCRAM-SHA-256";
            Ok((Ok(identity), Some(server_final)))
        }
        _ => Ok((Err(format!("SCRAM for {user:?} refused")), None)),
    }
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

#[cfg(test)]
mod bearer_tests {
    use super::bearer;

    #[test]
    fn oauthbearer_and_xoauth2_responses_give_user_and_token() {
        let r = b"n,a=dev@space,\x01host=h\x01port=5672\x01auth=Bearer abc.def.ghi\x01\x01";
        assert_eq!(
            bearer("OAUTHBEARER", r),
            Some((Some("dev@space".into()), "abc.def.ghi".into()))
        );
        assert_eq!(
            bearer("OAUTHBEARER", b"n,,\x01auth=bearer t\x01\x01"),
            Some((None, "t".into()))
        );
        assert_eq!(
            bearer("XOAUTH2", b"user=u\x01auth=Bearer t\x01\x01"),
            Some((Some("u".into()), "t".into()))
        );
        for bad in [
            &b""[..],
            b"n,a=u,\x01auth=Basic xyz\x01\x01",
            b"p=tls-unique,,\x01auth=Bearer t\x01\x01",
            b"n,,\x01\x01",
            b"\xff\xfe",
        ] {
            assert_eq!(bearer("OAUTHBEARER", bad), None, "{bad:?}");
        }
    }
}
