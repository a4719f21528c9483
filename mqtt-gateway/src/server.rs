//! The MQTT listeners (plain, TLS, WebSocket) and one task per MQTT
//! connection: CONNECT (login, takeover, the session set up in its broker,
//! CONNACK), then packets and upstream events through [`Session`] until
//! the connection ends, then what the session leaves behind.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use flotilla_amqp::admission::{Admission, Slot};
use flotilla_amqp::policy::{Policy, Principal};
use flotilla_amqp::transport::{Authenticator, Hostnames, TlsState, Verdict};
use flotilla_core::auth::MeshSecret;
use flotilla_core::resources::{AuthorizationRule, Operation};
use futures_util::{Sink, Stream};
use mqtt5_protocol::packet::connect::ConnectPacket;
use mqtt5_protocol::packet::Packet;
use mqtt5_protocol::protocol::v5::properties::Properties;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::codec::{self, DecodeError, V311, V5};
use crate::registry::{Entry, Registry, SessionStats};
use crate::session::{container_of, Limits, Meta, Session, Setup};
use crate::upstream::{
    Cmd, Dest, Ev, Mailbox, Outcome, Pool, WillOp, SIGNAL_CLOSED, SIGNAL_KEEP_ALIVE, SIGNAL_KICK,
    SIGNAL_RECHECK, SIGNAL_SHUTDOWN,
};

/// The principal's space of an operator's tool that logged in with the
/// mesh secret: it may only read `$SYS/flotilla/stat`, of every space.
pub const MESH_SPACE: &str = "$mesh";
/// The topic whose subscribers get a snapshot of the gateway's sessions.
pub const STAT_TOPIC: &str = "$SYS/flotilla/stat";

/// What every connection task shares.
pub struct Shared {
    pub policy: Arc<Policy>,
    pub mesh: Option<MeshSecret>,
    pub pool: Pool,
    pub registry: Registry,
    pub limits: Arc<Limits>,
    pub handshake_timeout: Duration,
    pub next_key: AtomicU64,
    pub shutdown: CancellationToken,
    /// Wills waiting out their delay.
    pub delayed_wills: std::sync::atomic::AtomicUsize,
    /// Names this gateway's will registrations (its id and start time).
    pub will_prefix: String,
    /// Said once: there is no last-will service.
    pub will_fallback_said: std::sync::atomic::AtomicBool,
}

/// Wills that may wait out their delay at once: past this many (clients
/// that come and go with long delays), a will goes out at once instead.
const MAX_DELAYED_WILLS: usize = 10_000;

/// How a listener's connections arrive.
#[derive(Clone)]
pub enum Kind {
    Plain,
    Tls(tokio_rustls::TlsAcceptor),
    WebSocket,
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::Plain => "mqtt",
            Kind::Tls(_) => "mqtts",
            Kind::WebSocket => "mqtt-ws",
        }
    }
}

/// Accepts connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    kind: Kind,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    tracker: TaskTracker,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match admission.begin(peer) {
            Ok(p) => p,
            Err(r) => {
                shared
                    .registry
                    .totals
                    .refused_connections
                    .fetch_add(1, Ordering::Relaxed);
                admission.warn("connection refused", r.reason(), peer);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (shared, admission) = (shared.clone(), admission.clone());
        let listener = kind.name();
        // A task type per kind of stream, each as large as its own kind
        // needs: a plain connection does not carry the room of a TLS one.
        match &kind {
            Kind::Plain => {
                let conn = Conn::new(peer, false, listener, shared, admission, permit);
                tracker.spawn(connection(Box::new(Accepted { stream: tcp, conn })));
            }
            Kind::Tls(acceptor) => {
                let conn = Conn::new(peer, true, listener, shared, admission, permit);
                let acceptor = acceptor.clone();
                tracker.spawn(upgraded(tcp, conn, "TLS", move |tcp| acceptor.accept(tcp)));
            }
            Kind::WebSocket => {
                let conn = Conn::new(peer, false, listener, shared, admission, permit);
                tracker.spawn(upgraded(tcp, conn, "WebSocket", websocket));
            }
        }
    }
}

/// A connection whose stream a handshake (TLS, WebSocket) must make first,
/// within the handshake timeout.
async fn upgraded<S, F, E>(
    tcp: tokio::net::TcpStream,
    conn: Conn,
    what: &'static str,
    handshake: impl FnOnce(tokio::net::TcpStream) -> F,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: std::future::Future<Output = Result<S, E>>,
    E: std::fmt::Display,
{
    match tokio::time::timeout(conn.shared.handshake_timeout, handshake(tcp)).await {
        Ok(Ok(stream)) => connection(Box::new(Accepted { stream, conn })).await,
        Ok(Err(e)) => debug!(client.addr = %conn.peer, error = %e, "{what} handshake failed"),
        Err(_) => debug!(client.addr = %conn.peer, "{what} handshake timed out"),
    }
}

/// Why a CONNECT is refused: the 5.0 reason code and the 3.1.1 return code.
struct Refusal {
    v5: u8,
    v3: u8,
    why: String,
}

fn refusal(v5: u8, v3: u8, why: impl Into<String>) -> Refusal {
    Refusal {
        v5,
        v3,
        why: why.into(),
    }
}

/// MQTT 5 authentication methods taking a token (in the CONNECT's
/// Authentication Data).
const TOKEN_METHODS: [&str; 2] = ["OAUTHBEARER", "JWT"];

/// MQTT 5 enhanced authentication in one step: the CONNECT's
/// Authentication Data is the token (for `OAUTHBEARER`, either the RFC 7628
/// client response or the bare token), checked as a PLAIN login with the
/// token as its password would be. A second step (an AUTH packet) is
/// never asked for.
async fn token_login(
    shared: &Shared,
    c: &ConnectPacket,
    method: &str,
    peer: SocketAddr,
    tls: bool,
) -> Result<Principal, Refusal> {
    let data = c
        .properties
        .get_authentication_data()
        .ok_or_else(|| refusal(0x87, 5, format!("{method} without Authentication Data")))?;
    let data = std::str::from_utf8(data)
        .map_err(|_| refusal(0x86, 4, "the Authentication Data is not UTF-8"))?;
    let token = data
        .split('\u{1}')
        .find_map(|kv| kv.strip_prefix("auth=").and_then(|v| v.split_once(' ')))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or(data, |(_, t)| t)
        .trim();
    let user = c.username.as_deref().filter(|u| !u.is_empty());
    let names = Hostnames {
        sasl: None,
        open: Some(None),
    };
    let tls_state = TlsState {
        tls,
        client_cert: false,
    };
    let verdict = shared
        .policy
        .token(user, token, names, tls_state, "MQTT-AUTH")
        .await;
    admitted(shared, verdict, peer, tls)
}

/// The principal of a login the policy accepted; a refusal is "bad user
/// name or password".
fn admitted(
    shared: &Shared,
    verdict: Verdict,
    peer: SocketAddr,
    tls: bool,
) -> Result<Principal, Refusal> {
    match verdict {
        Verdict::Accept(mut id) => {
            id.tls = tls;
            shared
                .policy
                .on_open(&id, None, peer)
                .map_err(|why| refusal(0x87, 5, why))
        }
        Verdict::Refuse(why) => Err(refusal(0x86, 4, why)),
        Verdict::AwaitOpen => Err(refusal(0x86, 4, "no address space")),
    }
}

/// Checks a client's credentials: its principal, or why not.
async fn login(
    shared: &Shared,
    c: &ConnectPacket,
    peer: SocketAddr,
    tls: bool,
) -> Result<Principal, Refusal> {
    let password = match &c.password {
        Some(p) => Some(
            std::str::from_utf8(p)
                .map_err(|_| refusal(0x86, 4, "the password is not UTF-8"))?
                .to_string(),
        ),
        None => None,
    };
    let tls_state = TlsState {
        tls,
        client_cert: false,
    };
    match c.username.as_deref() {
        Some(user) if MeshSecret::login_id(user).is_some() => {
            // An operator's tool with the mesh secret: it reads stat only.
            let ok = match (&shared.mesh, &password) {
                (Some(m), Some(p)) => {
                    let (keys, p) = (m.keys().clone(), p.clone());
                    tokio::task::spawn_blocking(move || keys.verify_password(&p))
                        .await
                        .unwrap_or(false)
                }
                _ => false,
            };
            if !ok {
                return Err(refusal(0x86, 4, "wrong mesh credential"));
            }
            Ok(Principal {
                space: MESH_SPACE.into(),
                user: MeshSecret::login_id(user).map(str::to_string),
                rules: vec![AuthorizationRule {
                    addresses: vec!["#".into()],
                    operations: vec![Operation::View],
                }]
                .into(),
                token: None,
                expires_at: None,
            })
        }
        Some(user) => {
            let Some(pass) = password else {
                return Err(refusal(0x86, 4, "a username needs a password"));
            };
            let names = Hostnames {
                sasl: None,
                open: Some(None),
            };
            let verdict = shared.policy.plain(user, &pass, names, tls_state).await;
            admitted(shared, verdict, peer, tls)
        }
        None => {
            if let Some(pass) = password {
                // MQTT 5 allows a password alone: a token's names its space.
                if !flotilla_core::oidc::looks_like_jwt(&pass) {
                    return Err(refusal(0x86, 4, "a password without a username"));
                }
                let names = Hostnames {
                    sasl: None,
                    open: Some(None),
                };
                return admitted(
                    shared,
                    shared.policy.plain("", &pass, names, tls_state).await,
                    peer,
                    tls,
                );
            }
            let Some(mut id) = shared.policy.without_credentials(None, peer, tls_state) else {
                return Err(refusal(
                    0x87,
                    5,
                    "this address space does not allow anonymous clients",
                ));
            };
            id.tls = tls;
            shared
                .policy
                .on_open(&id, None, peer)
                .map_err(|why| refusal(0x87, 5, why))
        }
    }
}

/// Reads the CONNECT (the first packet).
async fn read_connect<R: AsyncRead + Unpin>(
    rd: &mut R,
    rbuf: &mut BytesMut,
    max: usize,
) -> Result<Box<ConnectPacket>, Option<DecodeError>> {
    loop {
        match codec::read_packet(rbuf, None, max) {
            Ok(Some(Packet::Connect(c))) => return Ok(c),
            Ok(Some(_)) => return Err(Some(DecodeError::Protocol("not CONNECT".into()))),
            Ok(None) => {}
            Err(e) => return Err(Some(e)),
        }
        rbuf.reserve(512);
        match rd.read_buf(rbuf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

fn connack(version: u8, present: bool, code: u8, props: Option<&Properties>) -> BytesMut {
    let mut out = BytesMut::new();
    codec::write_connack(&mut out, version, present, code, props);
    out
}

/// A connection a listener accepted, and what it runs with. Boxed and
/// passed whole, so the connection's future keeps no copies of it.
struct Accepted<S> {
    stream: S,
    conn: Conn,
}

/// What a connection runs with besides its stream.
struct Conn {
    /// Bytes read and not yet decoded.
    rbuf: BytesMut,
    peer: SocketAddr,
    tls: bool,
    listener: &'static str,
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    /// A handshake slot, given back once the CONNECT is in.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Conn {
    fn new(
        peer: SocketAddr,
        tls: bool,
        listener: &'static str,
        shared: Arc<Shared>,
        admission: Arc<Admission>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Self {
        Conn {
            rbuf: BytesMut::new(),
            peer,
            tls,
            listener,
            shared,
            admission,
            permit: Some(permit),
        }
    }
}

/// A connection's life.
async fn connection<S>(mut a: Box<Accepted<S>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Boxed: what the handshake needs is not kept for the connection's life.
    if let Some((started, _slot)) = Box::pin(handshake(&mut a)).await {
        run(started, a).await;
    }
}

/// CONNECT, login and the session set up: the connection's session, or
/// `None` once the client was refused.
async fn handshake<S>(a: &mut Accepted<S>) -> Option<(Box<Started>, Slot)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Accepted {
        stream,
        conn:
            Conn {
                rbuf,
                peer,
                tls,
                listener,
                shared,
                admission,
                permit,
            },
    } = a;
    let (peer, tls, listener) = (*peer, *tls, *listener);
    let max = shared.limits.max_packet;
    let connect =
        tokio::time::timeout(shared.handshake_timeout, read_connect(stream, rbuf, max)).await;
    let c = match connect {
        Err(_) => {
            admission.warn("connection closed", "no CONNECT in time", peer);
            return None;
        }
        Ok(Err(None)) => return None,
        Ok(Err(Some(e))) => {
            shared
                .registry
                .totals
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            info!(client.addr = %peer, error = %e, "closing connection: bad CONNECT");
            if let DecodeError::UnsupportedLevel(l) = e {
                let (v, code) = if l >= V5 { (V5, 0x84) } else { (V311, 1) };
                let _ = stream.write_all(&connack(v, false, code, None)).await;
            }
            let _ = stream.shutdown().await;
            return None;
        }
        Ok(Ok(c)) => c,
    };
    let Ok(slot) = admission.establish() else {
        admission.warn("connection refused", "connection limit", peer);
        let (v, code) = if c.protocol_version == V5 {
            (V5, 0x89)
        } else {
            (V311, 3)
        };
        let _ = stream.write_all(&connack(v, false, code, None)).await;
        return None;
    };
    drop(permit.take());
    let version = c.protocol_version;
    match start(shared, &c, peer, tls, listener).await {
        Ok(started) => {
            if rbuf.is_empty() {
                *rbuf = BytesMut::new();
            }
            Some((started, slot))
        }
        Err(r) => {
            shared
                .registry
                .totals
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            warn!(client.addr = %peer, client.id = %c.client_id, user = c.username.as_deref().unwrap_or("<anonymous>"), reason = ?r.why, "connection refused");
            let code = if version == V5 { r.v5 } else { r.v3 };
            let mut props = Properties::default();
            if version == V5 {
                props.set_reason_string(r.why);
            }
            let _ = stream
                .write_all(&connack(version, false, code, Some(&props)))
                .await;
            let _ = stream.shutdown().await;
            None
        }
    }
}

/// A connection accepted: its session, and what it needs to run.
struct Started {
    session: Session,
    /// Its events, signals and gate.
    mailbox: Arc<Mailbox>,
    upstream: mpsc::UnboundedSender<Cmd>,
    will: Option<Box<Will>>,
    /// How much the next read asks for (see Memory in ARCHITECTURE.md).
    read_size: u32,
    /// The client's socket is closed or failed.
    eof: bool,
}

/// A client's will, published if its connection is lost.
struct Will {
    topic: String,
    message: Bytes,
    qos: u8,
    retain: bool,
    delay: u32,
    /// Registered with the last-will service as this registration (else
    /// the gateway publishes it itself).
    remote: Option<String>,
}

/// Waits for the upstream event answering our setup.
async fn answer(mailbox: &Mailbox) -> Option<Ev> {
    tokio::time::timeout(Duration::from_secs(10), mailbox.next())
        .await
        .ok()
        .flatten()
}

/// A client's will operation for its upstream connection (a registration's
/// outcome comes back as token 0).
fn will_cmd(key: u64, space: Arc<str>, will_op: WillOp, op: &crate::lwt::Op) -> Cmd {
    Cmd::Will {
        client: key,
        space,
        op: will_op,
        message: crate::lwt::encode(op),
        token: 0,
    }
}

/// What a setup step's publication came to: accepted, or the AMQP
/// condition (empty when there is none) and why not.
fn accepted(ev: Option<Ev>) -> Result<(), (String, String)> {
    match ev {
        Some(Ev::Outcome {
            outcome: Outcome::Accepted,
            ..
        }) => Ok(()),
        Some(Ev::Outcome {
            outcome: Outcome::Rejected(c, d),
            ..
        }) => Err((c, d)),
        Some(Ev::Outcome { outcome, .. }) => Err((String::new(), format!("{outcome:?}"))),
        _ => Err((String::new(), "no answer".into())),
    }
}

/// CONNECT: checks, login, takeover, the session in its broker.
async fn start(
    shared: &Arc<Shared>,
    c: &ConnectPacket,
    peer: SocketAddr,
    tls: bool,
    listener: &'static str,
) -> Result<Box<Started>, Refusal> {
    let v5 = c.protocol_version == V5;
    let p = &c.properties;
    let method = if v5 {
        p.get_authentication_method()
    } else {
        None
    };
    if let Some(m) = method {
        if !TOKEN_METHODS.contains(&m.as_str()) {
            return Err(refusal(
                0x8c,
                4,
                format!("authentication method {m:?} is not supported (OAUTHBEARER, JWT)"),
            ));
        }
    }
    if v5 && p.get_receive_maximum() == Some(0) {
        return Err(refusal(0x82, 2, "Receive Maximum 0"));
    }
    if v5 && p.get_maximum_packet_size() == Some(0) {
        return Err(refusal(0x82, 2, "Maximum Packet Size 0"));
    }
    let principal = match method {
        Some(m) => token_login(shared, c, m, peer, tls).await?,
        None => login(shared, c, peer, tls).await?,
    };
    let expiry = if v5 {
        p.get_session_expiry_interval().unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        u32::MAX
    };
    let mut client_id = c.client_id.clone();
    let mut assigned = None;
    if client_id.is_empty() {
        if !v5 && !c.clean_start {
            return Err(refusal(0x85, 2, "an empty client id needs a clean session"));
        }
        client_id = format!("flotilla-{:016x}", rand::random::<u64>());
        assigned = Some(client_id.clone());
    }
    if let Some(w) = &c.will {
        if !codec::valid_topic_name(&w.topic) || w.topic.starts_with('$') {
            return Err(refusal(
                0x90,
                2,
                format!("invalid will topic {:?}", w.topic),
            ));
        }
        if !principal.may(Operation::Send, &w.topic) {
            return Err(refusal(
                0x87,
                5,
                format!("not allowed to publish the will to {:?}", w.topic),
            ));
        }
    }
    let space: Arc<str> = principal.space.clone().into();
    let key = shared.next_key.fetch_add(1, Ordering::Relaxed);
    let stats = Arc::new(SessionStats::default());
    let (mailbox, tx) = Mailbox::new_pair();
    // An operator's stat login keeps no session.
    let persistent = expiry > 0 && principal.space != MESH_SPACE;
    // One connection per client id: an earlier one lets go first.
    let old = shared
        .registry
        .claim(
            space.clone(),
            client_id.clone(),
            Entry {
                key,
                user: principal.user.clone(),
                addr: peer,
                listener,
                version: c.protocol_version,
                persistent,
                since_ms: crate::convert::now_ms(),
                stats: stats.clone(),
                mailbox: mailbox.clone(),
                expires_at: principal.expires_at,
            },
        )
        .map_err(|()| refusal(0x87, 5, "the client id is in use by another user"))?;
    let forget = |why: Refusal| {
        shared.registry.release(&space, &client_id, key, &stats);
        mailbox.done.notify_one();
        why
    };
    if let Some(old) = old {
        info!(client.id = %client_id, "session taken over by a new connection");
        old.mailbox.raise(SIGNAL_KICK);
        let _ = tokio::time::timeout(Duration::from_secs(5), old.mailbox.done.notified()).await;
    }
    // The connection to the router this client id goes through.
    let handle = shared.pool.pick(&format!("{space}/{client_id}")).clone();
    let mut ready = handle.ready.clone();
    if !*ready.borrow() {
        let wait = tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| *r)).await;
        if !matches!(wait, Ok(Ok(_))) {
            return Err(forget(refusal(0x88, 3, "the gateway has no router")));
        }
    }
    let _ = handle.tx.send(Cmd::Register { client: key, tx });
    let container = container_of(&client_id);
    let mut meta = None;
    let mut present = false;
    let mut session_tag = None;
    if space.as_ref() != MESH_SPACE {
        if persistent {
            // The session's subscription: resumed, or made (afresh when
            // the client asks for a clean start).
            let tag = 1;
            let attach =
                Session::session_attach(&space, &container, true, expiry, c.clean_start, None);
            let _ = handle.tx.send(Cmd::Attach {
                client: key,
                tag,
                attach: Box::new(attach),
                credit: shared.limits.link_window,
            });
            match answer(&mailbox).await {
                Some(Ev::Attached {
                    resumed, meta: m, ..
                }) => {
                    let m: Option<Meta> = m.and_then(|m| serde_json::from_str(&m).ok());
                    if let Some(m) = &m {
                        if resumed && m.user != principal.user {
                            let _ = handle.tx.send(Cmd::Gone { client: key });
                            return Err(forget(refusal(
                                0x87,
                                5,
                                "the session belongs to another user",
                            )));
                        }
                    }
                    present = resumed && !c.clean_start;
                    meta = if present { m } else { None };
                    session_tag = Some(tag);
                }
                other => {
                    let why = match other {
                        Some(Ev::Detached { error: Some(e), .. }) => {
                            flotilla_amqp::client::describe(&e)
                        }
                        _ => "no answer".into(),
                    };
                    let _ = handle.tx.send(Cmd::Gone { client: key });
                    return Err(forget(refusal(
                        0x88,
                        3,
                        format!("the session cannot be kept: {why}"),
                    )));
                }
            }
        } else {
            // A clean session: whatever an earlier one left is dropped
            // before anything else of this client reaches the broker.
            let body =
                serde_json::json!({"session": container, "delete": true, "user": principal.user})
                    .to_string();
            let message =
                flotilla_amqp::message::encode_message(&flotilla_amqp::message::MessageParts {
                    body: body.as_bytes(),
                    ..Default::default()
                });
            mailbox.add();
            let _ = handle.tx.send(Cmd::Publish {
                client: key,
                space: space.clone(),
                dest: Dest::SessionState,
                message,
                settled: false,
                token: 0,
            });
            match accepted(answer(&mailbox).await) {
                Ok(()) => {}
                Err((c, d)) => {
                    let _ = handle.tx.send(Cmd::Gone { client: key });
                    return Err(forget(if c.contains("unauthorized-access") {
                        refusal(0x87, 5, d)
                    } else {
                        refusal(0x88, 3, format!("the broker did not answer: {d}"))
                    }));
                }
            }
        }
    }
    let will = c.will.as_ref().map(|w| {
        let wp = &w.properties;
        let mut mp = Properties::default();
        if let Some(ct) = &wp.content_type {
            mp.set_content_type(ct.clone());
        }
        if let Some(rt) = &wp.response_topic {
            mp.set_response_topic(rt.clone());
        }
        if let Some(cd) = &wp.correlation_data {
            mp.set_correlation_data(Bytes::from(cd.clone()));
        }
        if let Some(e) = wp.message_expiry_interval {
            mp.set_message_expiry_interval(e);
        }
        if wp.payload_format_indicator == Some(true) {
            mp.set_payload_format_indicator(true);
        }
        for (k, v) in &wp.user_properties {
            mp.add_user_property(k.clone(), v.clone());
        }
        Box::new(Will {
            topic: w.topic.clone(),
            message: crate::convert::to_amqp(&crate::convert::Inbound {
                topic: &w.topic,
                qos: w.qos as u8,
                retain: w.retain,
                client: &container,
                properties: v5.then_some(&mp),
                payload: &w.payload,
            }),
            qos: w.qos as u8,
            retain: w.retain,
            delay: wp.will_delay_interval.unwrap_or(0).min(expiry),
            remote: None,
        })
    });
    let mut will = will;
    if will.is_none() && space.as_ref() != MESH_SPACE {
        // A will of the client's earlier connection that waits out its
        // delay is not published: the client is back (MQTT-3.1.3-9).
        let op = crate::lwt::Op::Connected {
            client: client_id.clone(),
        };
        let _ = handle
            .tx
            .send(will_cmd(key, space.clone(), WillOp::Connected, &op));
    }
    if let Some(w) = will.as_mut().filter(|_| space.as_ref() != MESH_SPACE) {
        // The will is kept by the last-will service, on disk, before the
        // client hears it is connected; with no service in the mesh, the
        // gateway keeps it (in memory).
        let reg = format!("{}/{key}", shared.will_prefix);
        let op = crate::lwt::Op::Register(crate::lwt::Registration {
            client: client_id.clone(),
            reg: reg.clone(),
            user: principal.user.clone(),
            claims: principal.token.as_ref().map(|t| t.claims.to_string()),
            topic: w.topic.clone(),
            qos: w.qos,
            retain: w.retain,
            delay: w.delay,
            message: w.message.clone(),
        });
        mailbox.add();
        let _ = handle
            .tx
            .send(will_cmd(key, space.clone(), WillOp::Register, &op));
        match accepted(answer(&mailbox).await) {
            Ok(()) => w.remote = Some(reg),
            Err((c, why)) if c.contains("not-found") => {
                if !shared.will_fallback_said.swap(true, Ordering::Relaxed) {
                    warn!(reason = %why, "no last-will service: this gateway keeps its clients' wills in memory (a gateway that dies loses them)");
                }
            }
            Err((_, why)) => {
                let _ = handle.tx.send(Cmd::Gone { client: key });
                return Err(forget(refusal(
                    0x88,
                    3,
                    format!("the will could not be stored: {why}"),
                )));
            }
        }
    }
    let limits = shared.limits.clone();
    let mut keep_alive = c.keep_alive;
    let mut props = Properties::default();
    if v5 {
        if keep_alive == 0 || keep_alive > limits.max_keep_alive {
            if limits.max_keep_alive < u16::MAX {
                keep_alive = limits.max_keep_alive;
                props.set_server_keep_alive(keep_alive);
            }
        }
        props.set_receive_maximum(limits.receive_max);
        props.set_maximum_packet_size(limits.max_packet as u32);
        props.set_topic_alias_maximum(limits.topic_alias_max);
        props.set_retain_available(true);
        props.set_wildcard_subscription_available(true);
        props.set_subscription_identifier_available(true);
        props.set_shared_subscription_available(true);
        if let Some(id) = &assigned {
            props.set_assigned_client_identifier(id.clone());
        }
        if let Some(m) = method {
            props.set_authentication_method(m.clone());
        }
        if persistent && expiry != p.get_session_expiry_interval().unwrap_or(0) {
            props.set_session_expiry_interval(expiry);
        }
    }
    let mut early = BytesMut::new();
    codec::write_connack(&mut early, c.protocol_version, present, 0, Some(&props));
    let mut session = Session::new(
        Setup {
            key,
            version: c.protocol_version,
            client_id: client_id.clone(),
            space: space.clone(),
            principal,
            persistent,
            expiry,
            client_receive_max: p.get_receive_maximum().unwrap_or(u16::MAX),
            client_max_packet: p.get_maximum_packet_size().unwrap_or(u32::MAX),
            client_alias_max: p.get_topic_alias_maximum().unwrap_or(0),
            session_tag,
        },
        limits,
        shared.policy.clone(),
        stats,
        meta,
    );
    // CONNACK first, then what the resumed session wrote (PUBRELs).
    early.unsplit(std::mem::take(&mut session.wbuf));
    session.wbuf = early;
    info!(client.addr = %peer, client.id = %client_id, vhost = %space, user = session.principal.user.as_deref().unwrap_or("<anonymous>"), protocol = if v5 { "mqtt5" } else { "mqtt3.1.1" }, persistent, present, "MQTT client connected");
    // The registry's sweep raises SIGNAL_KEEP_ALIVE (`check_keep_alive`).
    mailbox.set_keep_alive(
        (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
    );
    Ok(Box::new(Started {
        session,
        mailbox,
        upstream: handle.tx.clone(),
        will,
        read_size: 64,
        eof: false,
    }))
}

/// Sends the session's commands upstream (counting publications at the gate).
fn push_commands(s: &mut Session, upstream: &mpsc::UnboundedSender<Cmd>, gate: &Mailbox) {
    for c in s.cmds.drain(..) {
        if matches!(c, Cmd::Publish { .. }) {
            gate.add();
        }
        let _ = upstream.send(c);
    }
}

/// Reads of a connection without a read buffer go through the stack, at
/// most this many bytes at a time.
const STACK_READ: usize = 512;

/// What woke a connection.
enum Wake {
    Wrote(std::io::Result<usize>),
    /// Events, and the signals raised.
    Mail(u8, VecDeque<Ev>),
    Read(std::io::Result<usize>),
}

/// The connection after CONNACK: one loop that waits on the socket and the
/// mailbox at once through one small future (`poll_wake`); the work between
/// waits is done by `before_wait` and `on_wake`, so that the future an idle
/// connection holds is a few pointers.
async fn run<S>(mut st: Box<Started>, mut a: Box<Accepted<S>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    st.mailbox.heard();
    if a.conn.shared.shutdown.is_cancelled() {
        st.mailbox.raise(SIGNAL_SHUTDOWN);
    }
    // Packets that came with the CONNECT.
    read_packets(&mut st, &mut a);
    while before_wait(&mut st, &a.conn.shared) {
        let woke = {
            let (stp, ap) = (&mut *st, &mut *a);
            std::future::poll_fn(move |cx| poll_wake(stp, ap, cx)).await
        };
        on_wake(&mut st, &mut a, woke);
    }
    Box::pin(finish(st, a)).await;
}

/// What the connection does before it waits: credit and commands upstream,
/// stat snapshots; false once it must end.
fn before_wait(st: &mut Started, shared: &Shared) -> bool {
    let s = &mut st.session;
    s.flush_credit();
    push_commands(s, &st.upstream, &st.mailbox);
    s.tidy();
    while s.stat_requests > 0 {
        s.stat_requests -= 1;
        let scope = (s.space.as_ref() != MESH_SPACE).then(|| s.space.to_string());
        let body = shared.registry.snapshot(scope.as_deref()).to_string();
        let none = Properties::default();
        codec::write_publish(
            &mut s.wbuf,
            &codec::Publish {
                topic: STAT_TOPIC,
                qos: 0,
                packet_id: 0,
                retain: true,
                dup: false,
                properties: (s.version == V5).then_some(&none),
                payload: body.as_bytes(),
            },
        );
    }
    s.close.is_none() && !st.eof
}

/// Waits for, in order: room to write, events and signals, bytes to read
/// (not while too many publications wait upstream: the mailbox wakes us
/// when they drain).
fn poll_wake<S>(st: &mut Started, a: &mut Accepted<S>, cx: &mut Context<'_>) -> Poll<Wake>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let wbuf = &st.session.wbuf;
    if !wbuf.is_empty() {
        if let Poll::Ready(r) = Pin::new(&mut a.stream).poll_write(cx, wbuf) {
            return Poll::Ready(Wake::Wrote(r));
        }
    }
    let mut events = VecDeque::new();
    if let Poll::Ready(signals) = st.mailbox.poll_take(cx, &mut events, true) {
        return Poll::Ready(Wake::Mail(signals, events));
    }
    let rbuf = &mut a.conn.rbuf;
    if !st.mailbox.gated() && rbuf.len() < a.conn.shared.limits.max_packet + 8 {
        if rbuf.capacity() == 0 && st.read_size as usize <= STACK_READ {
            // A quiet connection holds no read buffer while it waits.
            let mut stack = [0u8; STACK_READ];
            let mut buf = ReadBuf::new(&mut stack);
            if let Poll::Ready(r) = Pin::new(&mut a.stream).poll_read(cx, &mut buf) {
                rbuf.extend_from_slice(buf.filled());
                return Poll::Ready(Wake::Read(r.map(|()| buf.filled().len())));
            }
        } else {
            if rbuf.capacity() - rbuf.len() < st.read_size as usize / 2 {
                rbuf.reserve(st.read_size as usize);
            }
            if let Poll::Ready(r) = tokio_util::io::poll_read_buf(Pin::new(&mut a.stream), cx, rbuf)
            {
                return Poll::Ready(Wake::Read(r));
            }
        }
    }
    Poll::Pending
}

/// Decodes and handles the whole packets read.
fn read_packets<S>(st: &mut Started, a: &mut Accepted<S>) {
    let s = &mut st.session;
    loop {
        match codec::read_packet(
            &mut a.conn.rbuf,
            Some(s.version),
            a.conn.shared.limits.max_packet,
        ) {
            Ok(Some(p)) => {
                tracing::trace!(client.id = %s.client_id, packet = ?p, "packet");
                s.on_packet(p);
            }
            Ok(None) => break,
            Err(e) => {
                a.conn
                    .shared
                    .registry
                    .totals
                    .protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                info!(client.addr = %a.conn.peer, client.id = %s.client_id, error = %e, "closing connection: bad packet");
                s.fail(e.reason(), e.to_string());
                break;
            }
        }
        if s.close.is_some() {
            break;
        }
    }
}

/// Handles what woke the connection.
fn on_wake<S>(st: &mut Started, a: &mut Accepted<S>, woke: Wake) {
    match woke {
        Wake::Wrote(Ok(0) | Err(_)) | Wake::Read(Ok(0) | Err(_)) => st.eof = true,
        Wake::Wrote(Ok(n)) => {
            let s = &mut st.session;
            s.wbuf.advance(n);
            // A small buffer is cheap to make again, a large one costly to
            // keep: either goes once written; a stream's mid-size one stays.
            let cap = s.wbuf.capacity();
            if s.wbuf.is_empty() && (cap > 64 * 1024 || cap <= 1024) {
                s.wbuf = BytesMut::new();
            }
        }
        Wake::Mail(signals, events) => {
            let s = &mut st.session;
            for e in events {
                s.on_event(e);
            }
            if signals & SIGNAL_CLOSED != 0 {
                s.fail(0x88, "the gateway lost its router");
            }
            if signals & SIGNAL_KICK != 0 {
                if s.stats.closed_by_admin.load(Ordering::Acquire) {
                    info!(client.id = %s.client_id, "closing connection: an administrator closed it");
                    s.fail(0x98, "closed by an administrator");
                } else {
                    s.taken_over();
                }
            }
            if signals & SIGNAL_RECHECK != 0 {
                s.recheck(a.conn.peer, a.conn.tls);
            }
            if signals & SIGNAL_SHUTDOWN != 0 {
                s.fail(0x8b, "the gateway is shutting down");
            }
            if signals & SIGNAL_KEEP_ALIVE != 0 && st.mailbox.silent_too_long() {
                info!(client.addr = %a.conn.peer, client.id = %s.client_id, "closing connection: keep-alive timed out");
                s.fail(0x8d, "keep-alive timed out");
            }
        }
        Wake::Read(Ok(n)) => {
            st.mailbox.heard();
            if n >= st.read_size as usize / 2 {
                st.read_size = (st.read_size * 2).min(64 * 1024);
            }
            read_packets(st, a);
            let rbuf = &mut a.conn.rbuf;
            if rbuf.is_empty() && rbuf.capacity() > 4096 {
                *rbuf = BytesMut::new();
                st.read_size = 64;
            } else if rbuf.is_empty() && st.read_size as usize <= STACK_READ {
                *rbuf = BytesMut::new();
            }
        }
    }
}

/// The end: tell the client why (5.0), publish the will of a lost
/// connection, let go of the session.
async fn finish<S>(mut st: Box<Started>, mut a: Box<Accepted<S>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let eof = st.eof;
    let s = &mut st.session;
    let close = s.close.clone();
    if let Some(c) = &close {
        if c.tell && !eof {
            codec::write_disconnect(&mut s.wbuf, c.reason, Some(&c.why));
        }
    }
    if !s.wbuf.is_empty() && !eof {
        let _ = tokio::time::timeout(Duration::from_secs(2), a.stream.write_all(&s.wbuf)).await;
    }
    let _ = a.stream.shutdown().await;
    let shared = &a.conn.shared;
    // No will after a DISCONNECT, nor after a takeover: the new connection
    // for the client id opened before this one closed, so within any will
    // delay (MQTT-3.1.2.5; its own will, if any, replaces this one).
    let no_will = close
        .as_ref()
        .is_some_and(|c| c.graceful || c.reason == 0x8e);
    if let Some(w) = st.will.take().filter(|_| !s.down) {
        // With the router gone, the service heard that this gateway's
        // connection was lost: it publishes the will itself.
        match w.remote {
            Some(reg) => {
                let client = s.client_id.to_string();
                let (op, will_op) = if no_will {
                    (crate::lwt::Op::Cancel { client, reg }, WillOp::Cancel)
                } else {
                    let asked = close.as_ref().is_some_and(|c| c.reason == 0x04);
                    (crate::lwt::Op::Fire { client, reg, asked }, WillOp::Fire)
                };
                debug!(client.id = %s.client_id, op = ?will_op, "telling the last-will service");
                let _ = st
                    .upstream
                    .send(will_cmd(s.key, s.space.clone(), will_op, &op));
            }
            None if !no_will => publish_will(shared, s, &st.upstream, *w),
            None => {}
        }
    }
    s.end();
    push_commands(s, &st.upstream, &st.mailbox);
    shared
        .registry
        .release(&s.space, &s.client_id, s.key, &s.stats);
    st.mailbox.done.notify_one();
    debug!(client.id = %s.client_id, reason = close.as_ref().map_or("connection lost", |c| c.why.as_str()), "MQTT client disconnected");
}

/// Publishes a will: now, or after its delay unless the client is back.
fn publish_will(shared: &Arc<Shared>, s: &Session, upstream: &mpsc::UnboundedSender<Cmd>, w: Will) {
    // Where a PUBLISH to the will's topic would go, checked as one would be.
    let dest = match s.destination(&w.topic) {
        Ok(d) => d,
        Err((_, why)) => {
            info!(client.id = %s.client_id, topic = %w.topic, reason = %why, "will not published");
            return;
        }
    };
    info!(client.id = %s.client_id, topic = %w.topic, delay = w.delay, "publishing the will of a lost connection");
    let send = {
        let (space, upstream) = (s.space.clone(), upstream.clone());
        move || crate::upstream::publish_will(&upstream, space, dest, w.message, w.qos, w.retain)
    };
    if w.delay == 0 {
        send();
        return;
    }
    if shared.delayed_wills.fetch_add(1, Ordering::AcqRel) >= MAX_DELAYED_WILLS {
        shared.delayed_wills.fetch_sub(1, Ordering::AcqRel);
        warn!(client.id = %s.client_id, "too many wills wait out their delay: this one goes now");
        send();
        return;
    }
    let (shared, space, id) = (shared.clone(), s.space.clone(), s.client_id.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = shared.shutdown.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(u64::from(w.delay))) => {
                if !shared.registry.connected(&space, &id) {
                    send();
                }
            }
        }
        shared.delayed_wills.fetch_sub(1, Ordering::AcqRel);
    });
}

// ---- MQTT over WebSocket ----

/// Accepts a WebSocket upgrade with the `mqtt` subprotocol.
async fn websocket(
    tcp: tokio::net::TcpStream,
) -> Result<WsIo<tokio::net::TcpStream>, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let offered = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|p| p.eq_ignore_ascii_case("mqtt") || p.eq_ignore_ascii_case("mqttv3.1"))
            .map(str::to_string);
        if let Some(p) = offered {
            if let Ok(v) = p.parse() {
                resp.headers_mut().insert("Sec-WebSocket-Protocol", v);
            }
        }
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async(tcp, callback).await?;
    Ok(WsIo {
        ws,
        rest: Bytes::new(),
    })
}

/// A WebSocket as a byte stream (MQTT packets may span binary messages).
pub struct WsIo<S> {
    ws: tokio_tungstenite::WebSocketStream<S>,
    rest: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        use tokio_tungstenite::tungstenite::Message;
        loop {
            if !self.rest.is_empty() {
                let n = self.rest.len().min(buf.remaining());
                buf.put_slice(&self.rest[..n]);
                self.rest.advance(n);
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.ws).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(std::io::Error::other(e.to_string())))
                }
                Poll::Ready(Some(Ok(Message::Binary(b)))) => self.rest = b,
                Poll::Ready(Some(Ok(Message::Close(_)))) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(Ok(Message::Text(_)))) => {
                    return Poll::Ready(Err(std::io::Error::other(
                        "MQTT over WebSocket takes binary messages",
                    )))
                }
                Poll::Ready(Some(Ok(_))) => {}
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        use tokio_tungstenite::tungstenite::Message;
        let ws = Pin::new(&mut self.ws);
        match ws.poll_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(std::io::Error::other(e.to_string()))),
            Poll::Ready(Ok(())) => {}
        }
        let msg = Message::Binary(Bytes::copy_from_slice(buf));
        match Pin::new(&mut self.ws).start_send(msg) {
            Ok(()) => {
                // Out now: MQTT packets are not held back for more.
                let _ = Pin::new(&mut self.ws).poll_flush(cx);
                Poll::Ready(Ok(buf.len()))
            }
            Err(e) => Poll::Ready(Err(std::io::Error::other(e.to_string()))),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}
