//! The gateway's AMQP connections to its router: a few, each carrying the
//! links of many MQTT clients (never one connection per client). Each is
//! one task on the shared socket driver ([`Driver`]) with [`Upstream`] as
//! its handler; MQTT connections talk to it with [`Cmd`]s and hear back
//! through their own channel of [`Ev`]s.
//!
//! The gateway proves it is a component (the mesh secret, or a mesh-CA
//! certificate) and offers `flotilla.gateway` on Open: the router then
//! trusts the `flotilla:space` (and `flotilla:container-id`) each of our
//! links names. Publications go out on senders shared by every client of
//! a space (one per target: the space's anonymous relay, a queue, a topic
//! tree, the retained store, session state), each client's in order;
//! subscriptions are receivers of the client's own.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use flotilla_amqp::connection::{Connection, ConnectionConfig, DeliveryRef, Event, LinkId};
use flotilla_amqp::driver::{Driver, DriverConfig, Ended, Handler};
use flotilla_amqp::transport::{self, ClientSasl, ConnectConfig};
use flotilla_amqp::types::definitions::{
    Error as AmqpErrorBody, Fields, ReceiverSettleMode, Role, SenderSettleMode,
};
use flotilla_amqp::types::messaging::{DeliveryState, Source, Target, TargetArchetype};
use flotilla_amqp::types::performatives::Attach;
use flotilla_amqp::types::primitives::{Symbol, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Offered on Open: our links name their space.
pub const GATEWAY_CAPABILITY: &str = "flotilla.gateway";
/// An MQTT connection, for the upstream connection it uses.
pub type ClientKey = u64;

/// Where a publication goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dest {
    /// The space's anonymous relay (anycast and multicast addresses): each
    /// message's `to` routes it.
    Relay,
    /// A broker-held address: a queue, or (`topic`) a topic or a topic
    /// tree, where each message's `to` names the topic.
    Address { address: String, topic: bool },
    /// The space's retained messages.
    Retained,
    /// Changes to the space's MQTT sessions.
    SessionState,
    /// The last-will service (`$lwt`): the space's clients' wills.
    Lwt,
}

/// The address of the retained messages, and of a reader of those a
/// filter matches (`RETAINED/FILTER`).
pub const RETAINED: &str = "$mqtt/retained";
/// An MQTT session's subscription.
pub const SESSION: &str = "$mqtt/session";
/// Changes to MQTT sessions.
pub const SESSION_STATE: &str = "$mqtt/session-state";

/// What an MQTT connection asks of its upstream connection.
#[derive(Debug)]
pub enum Cmd {
    /// A new MQTT connection: its events go to `tx`, which also counts
    /// its publications not yet handed to the engine.
    Register { client: ClientKey, tx: EvSender },
    /// Attaches a receiver (`tag` names it to the client) with `credit`.
    Attach {
        client: ClientKey,
        tag: u32,
        attach: Box<Attach>,
        credit: u32,
    },
    Detach {
        client: ClientKey,
        tag: u32,
        closed: bool,
    },
    /// More credit on a receiver.
    Credit {
        client: ClientKey,
        tag: u32,
        add: u32,
    },
    Settle {
        client: ClientKey,
        delivery: DeliveryRef,
        state: DeliveryState,
    },
    /// A publication; unsettled ones hear their outcome as `token`.
    Publish {
        client: ClientKey,
        space: Arc<str>,
        dest: Dest,
        message: Bytes,
        settled: bool,
        token: u32,
    },
    /// The MQTT connection ended: its remaining links detach (not closed).
    Gone { client: ClientKey },
    /// A client's will, to the last-will service ([`crate::lwt`]): a
    /// registration (its outcome comes back as `token`), or a cancel or
    /// fire. The connection keeps what its live clients registered, and
    /// what the service has not acknowledged, to send again when its
    /// `$lwt` link has to be attached again.
    Will {
        client: ClientKey,
        space: Arc<str>,
        op: WillOp,
        message: Bytes,
        token: u32,
    },
}

/// What a [`Cmd::Will`] tells the last-will service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillOp {
    Register,
    Cancel,
    Fire,
    /// The client connected without a will (best effort: not kept when
    /// no service answers).
    Connected,
}

/// The client key of cancels and fires not yet acknowledged (their token
/// names them in [`LwtSpace::unacked`]).
const LWT_OPS: ClientKey = ClientKey::MAX;

/// Cancels and fires kept per space while the last-will service does not
/// acknowledge them (it is away): past this, the oldest go.
const MAX_UNACKED_WILL_OPS: usize = 100_000;

/// One space's wills on this connection.
#[derive(Default)]
struct LwtSpace {
    /// Live clients' registrations: sent again whenever the `$lwt` link is
    /// attached again, followed by `synced`.
    live: HashMap<ClientKey, Bytes>,
    /// Cancels and fires the service has not acknowledged: sent again too.
    unacked: std::collections::BTreeMap<u32, Bytes>,
    /// No last-will service answered: registrations fail at once until then.
    absent_until: Option<std::time::Instant>,
    /// The link broke with wills to keep: attach it again then.
    retry_at: Option<std::time::Instant>,
    /// Said once: operations were dropped for want of room.
    overflowed: bool,
}

/// Publishes a will as the gateway itself (client 0): to `dest`, settled
/// at QoS 0, and to the space's retained messages too when it has the
/// retain flag. The gateway's own wills and the last-will service's go
/// out this way.
pub fn publish_will(
    upstream: &mpsc::UnboundedSender<Cmd>,
    space: Arc<str>,
    dest: Dest,
    message: Bytes,
    qos: u8,
    retain: bool,
) {
    if retain {
        let _ = upstream.send(Cmd::Publish {
            client: 0,
            space: space.clone(),
            dest: Dest::Retained,
            message: message.clone(),
            settled: true,
            token: 0,
        });
    }
    let _ = upstream.send(Cmd::Publish {
        client: 0,
        space,
        dest,
        message,
        settled: qos == 0,
        token: 0,
    });
}

/// What one MQTT connection shares with its upstream connection and the
/// registry, in one allocation (an idle connection should cost little):
/// the events the upstream connection sends it, the signals others raise
/// (a takeover, new tenancy, shutdown), and the count of its publications
/// not yet handed to the engine (its gate: it stops reading from its
/// socket while [`GATE_HIGH`] wait). One waker wakes the connection for
/// all of them.
#[derive(Debug, Default)]
pub struct Mailbox {
    state: std::sync::Mutex<MailState>,
    queued: AtomicU32,
    /// When the client was last heard from ([`mono_ms`]).
    heard_ms: AtomicU64,
    /// 1.5 × its Keep Alive in milliseconds; 0: none.
    keep_alive_ms: AtomicU64,
    /// Told once the connection has let go of its session (a connection
    /// taking it over waits for this).
    pub done: Notify,
}

#[derive(Debug, Default)]
struct MailState {
    /// Allocated only while events wait.
    events: VecDeque<Ev>,
    waker: Option<Waker>,
    signals: u8,
}

/// A new connection takes this session over, or an administrator closes it.
pub const SIGNAL_KICK: u8 = 1;
/// The tenancy changed: the connection checks its user and subscriptions.
pub const SIGNAL_RECHECK: u8 = 2;
/// The gateway is shutting down.
pub const SIGNAL_SHUTDOWN: u8 = 4;
/// The upstream side let go ([`EvSender`] dropped): no more events come.
pub const SIGNAL_CLOSED: u8 = 8;
/// Nothing was heard from the client for longer than its keep-alive.
pub const SIGNAL_KEEP_ALIVE: u8 = 16;

/// Milliseconds on a monotonic clock that starts with the gateway.
pub fn mono_ms() -> u64 {
    static START: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    START.elapsed().as_millis() as u64
}

/// The upstream side's handle on a [`Mailbox`]; dropping it closes it.
#[derive(Debug)]
pub struct EvSender(Arc<Mailbox>);

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, MailState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new mailbox and the upstream side's handle on it.
    pub fn new_pair() -> (Arc<Mailbox>, EvSender) {
        let m = Arc::new(Mailbox::default());
        (m.clone(), EvSender(m))
    }

    /// Raises `signals` (the `SIGNAL_*` bits) and wakes the connection.
    pub fn raise(&self, signals: u8) {
        let w = {
            let mut st = self.lock();
            st.signals |= signals;
            st.waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    /// The client was heard from: its keep-alive starts again.
    pub fn heard(&self) {
        self.heard_ms.store(mono_ms(), Ordering::Relaxed);
    }

    /// Sets how long the client may stay silent (`None`: for ever).
    pub fn set_keep_alive(&self, limit: Option<Duration>) {
        self.heard();
        let ms = limit.map_or(0, |d| d.as_millis().max(1) as u64);
        self.keep_alive_ms.store(ms, Ordering::Relaxed);
    }

    /// True once the client has been silent for longer than it may be.
    pub fn silent_too_long(&self) -> bool {
        let limit = self.keep_alive_ms.load(Ordering::Relaxed);
        limit > 0 && mono_ms().saturating_sub(self.heard_ms.load(Ordering::Relaxed)) >= limit
    }

    /// Counts a publication handed to the upstream connection.
    pub fn add(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    /// True while too many publications wait upstream to read more.
    pub fn gated(&self) -> bool {
        self.queued.load(Ordering::Acquire) >= GATE_HIGH
    }

    /// Takes the waiting events into `out` (which must be empty) and, with
    /// `signals`, the raised signals; else registers `cx` to be woken.
    /// Ready with the signals taken, plus `SIGNAL_CLOSED` once the upstream
    /// side is gone and no event is left.
    pub fn poll_take(
        &self,
        cx: &mut Context<'_>,
        out: &mut VecDeque<Ev>,
        signals: bool,
    ) -> Poll<u8> {
        let mut st = self.lock();
        // Closed stays raised: it is for good.
        let closed = st.signals & SIGNAL_CLOSED;
        let raised = if signals {
            std::mem::replace(&mut st.signals, closed) & !SIGNAL_CLOSED
        } else {
            0
        };
        if !st.events.is_empty() {
            std::mem::swap(&mut st.events, out);
            return Poll::Ready(raised);
        }
        if raised | closed != 0 {
            return Poll::Ready(raised | closed);
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The next event (signals other than closed stay raised); `None`
    /// once the upstream side is gone.
    pub async fn next(&self) -> Option<Ev> {
        let mut out = VecDeque::new();
        let closed = std::future::poll_fn(|cx| self.poll_take(cx, &mut out, false)).await;
        let e = out.pop_front();
        if !out.is_empty() {
            // Put back what came with it, ahead of anything newer.
            let mut st = self.lock();
            out.append(&mut st.events);
            st.events = out;
        }
        if closed & SIGNAL_CLOSED != 0 && e.is_none() {
            return None;
        }
        e
    }
}

impl EvSender {
    pub fn send(&self, e: Ev) {
        let w = {
            let mut st = self.0.lock();
            st.events.push_back(e);
            st.waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }

    /// `n` of the client's publications reached the engine (or were
    /// dropped): the client may read again once few wait.
    fn gate_done(&self, n: u32) {
        let before = self
            .0
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                Some(q.saturating_sub(n))
            })
            .unwrap_or(0);
        if before >= GATE_LOW && before.saturating_sub(n) < GATE_LOW {
            self.0.raise(0);
        }
    }
}

impl Drop for EvSender {
    fn drop(&mut self) {
        self.0.raise(SIGNAL_CLOSED);
    }
}

/// What an MQTT connection hears from its upstream connection.
#[derive(Debug)]
pub enum Ev {
    /// A receiver was attached; `resumed` and `meta` for a session's.
    Attached {
        tag: u32,
        resumed: bool,
        meta: Option<String>,
    },
    /// A receiver was refused or detached (e.g. `amqp:link:stolen`).
    Detached {
        tag: u32,
        error: Option<AmqpErrorBody>,
    },
    Message {
        tag: u32,
        delivery: DeliveryRef,
        settled: bool,
        payload: Bytes,
    },
    Outcome {
        token: u32,
        outcome: Outcome,
    },
    /// The connection to the router was lost: everything of this client
    /// there is gone.
    Down,
}

/// What became of a publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Nobody took it (an anycast or multicast address with no receiver).
    Released,
    /// Refused: the AMQP condition and description.
    Rejected(String, String),
}

/// Publications of gone clients a sender keeps waiting for credit.
const ORPHANS_MAX: usize = 4096;

/// A client waits for room when this many of its publications are queued.
pub const GATE_HIGH: u32 = 256;
const GATE_LOW: u32 = GATE_HIGH / 2;

/// The gateway's way to its router.
#[derive(Clone)]
pub struct RouterLink {
    pub addr: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub sasl: ClientSasl,
    pub container_id: String,
}

impl RouterLink {
    /// How a component (`id`) reaches its router: TLS checked against the
    /// mesh CA (presenting its own certificate when it has one), and a
    /// SCRAM-SHA-256 login as `ID@$mesh` with the mesh secret when it has
    /// that.
    ///
    /// # Errors
    /// The TLS files do not load.
    pub fn for_component(
        addr: &str,
        id: &str,
        tls_ca: Option<&std::path::Path>,
        tls: Option<&(std::path::PathBuf, std::path::PathBuf)>,
        mesh_secret: Option<&flotilla_core::auth::MeshSecret>,
    ) -> Result<RouterLink, flotilla_amqp::tls::TlsError> {
        let tls = match (tls_ca, tls) {
            (Some(ca), Some((c, k))) => {
                Some(flotilla_amqp::tls::client_config_with_cert(ca, c, k)?)
            }
            (Some(ca), None) => Some(flotilla_amqp::tls::client_config(ca)?),
            _ => None,
        };
        let sasl = match mesh_secret {
            Some(m) => ClientSasl::Scram {
                user: flotilla_core::auth::MeshSecret::username(id),
                password: m.secret().to_string(),
            },
            None => ClientSasl::Anonymous,
        };
        Ok(RouterLink {
            addr: addr.to_string(),
            tls,
            sasl,
            container_id: id.to_string(),
        })
    }
}

/// One upstream connection's handle.
#[derive(Clone)]
pub struct Handle {
    pub tx: mpsc::UnboundedSender<Cmd>,
    /// True while connected to the router.
    pub ready: watch::Receiver<bool>,
}

/// The upstream connections; an MQTT client uses the one its client id
/// hashes to (so a session taken over stays on one connection, in order).
#[derive(Clone)]
pub struct Pool {
    pub handles: Vec<Handle>,
}

impl Pool {
    /// Starts `n` connections to the router, each kept up (re-connected
    /// with backoff) until `shutdown`.
    pub fn start(n: usize, link: RouterLink, shutdown: CancellationToken) -> Pool {
        let handles = (0..n.max(1))
            .map(|i| {
                let (tx, rx) = mpsc::unbounded_channel();
                let (ready_tx, ready) = watch::channel(false);
                tokio::spawn(keep(i, link.clone(), rx, ready_tx, shutdown.clone()));
                Handle { tx, ready }
            })
            .collect();
        Pool { handles }
    }

    pub fn pick(&self, key: &str) -> &Handle {
        // FNV-1a: stable across runs and replicas.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        &self.handles[(h % self.handles.len() as u64) as usize]
    }

    /// True when every connection is up.
    pub fn ready(&self) -> bool {
        self.handles.iter().all(|h| *h.ready.borrow())
    }
}

async fn keep(
    i: usize,
    link: RouterLink,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut redial = flotilla_core::redial::Redial::default();
    while !shutdown.is_cancelled() {
        redial.attempt();
        match connect(&link).await {
            Ok((io, buf)) => {
                info!(router = %link.addr, upstream = i, "connected to router");
                let _ = ready.send(true);
                let mut up = Upstream::new(&link.container_id, i, &mut rx, shutdown.clone());
                let ended = Driver::new(io, buf, DriverConfig::default())
                    .run(&mut up)
                    .await;
                let _ = ready.send(false);
                up.lost();
                match ended {
                    Ended::Io(e) => {
                        warn!(router = %link.addr, upstream = i, error = %e, "connection to router failed")
                    }
                    _ => info!(router = %link.addr, upstream = i, "connection to router closed"),
                }
            }
            Err(e) => {
                debug!(router = %link.addr, error = %e, "cannot reach router; retrying");
                // Clients that came meanwhile hear they cannot go on.
                while let Ok(c) = rx.try_recv() {
                    if let Cmd::Register { tx, .. } = c {
                        tx.send(Ev::Down);
                    }
                }
            }
        }
        if !redial.wait(&shutdown).await {
            return;
        }
    }
}

/// Connects to the router and logs in as [`RouterLink`] says.
///
/// # Errors
/// Why not, for the log.
pub async fn connect(
    link: &RouterLink,
) -> Result<(flotilla_amqp::transport::BoxIo, BytesMut), String> {
    let tcp = tokio::net::TcpStream::connect(&link.addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let host = link
        .addr
        .rsplit_once(':')
        .map_or(link.addr.as_str(), |(h, _)| h);
    let tls = match &link.tls {
        Some(c) => Some((
            c.clone(),
            rustls_pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let cc = ConnectConfig {
        tls,
        sasl: link.sasl.clone(),
        hostname: None,
        tls_header: false,
    };
    match tokio::time::timeout(Duration::from_secs(10), transport::connect(tcp, &cc)).await {
        Ok(Ok(x)) => Ok(x),
        Ok(Err(e)) => {
            warn!(router = %link.addr, error = %e, "the router refused the gateway");
            Err(e.to_string())
        }
        Err(_) => Err("handshake timed out".into()),
    }
}

struct ClientEntry {
    tx: EvSender,
    links: std::collections::BTreeMap<u32, LinkId>,
}

struct Waiting {
    client: ClientKey,
    token: u32,
    message: Bytes,
    settled: bool,
}

struct Sender {
    link: LinkId,
    queue: VecDeque<Waiting>,
}

/// One upstream connection's state.
struct Upstream<'a> {
    conn: Connection,
    channel: Option<u16>,
    rx: &'a mut mpsc::UnboundedReceiver<Cmd>,
    batch: Vec<Cmd>,
    clients: HashMap<ClientKey, ClientEntry>,
    /// Receivers: which client's, and its tag.
    owners: HashMap<LinkId, (ClientKey, u32)>,
    senders: HashMap<(Arc<str>, Dest), Sender>,
    sender_of: HashMap<LinkId, (Arc<str>, Dest)>,
    /// Our unsettled publications: engine token -> (client, its token).
    tokens: HashMap<u64, (ClientKey, u32)>,
    next_token: u64,
    next_link: u64,
    /// Senders with credit and something waiting.
    ready: Vec<LinkId>,
    /// Wills per space ([`Cmd::Will`]).
    lwt: HashMap<Arc<str>, LwtSpace>,
    next_lwt_op: u32,
    shutdown: CancellationToken,
    closing: bool,
    index: usize,
}

impl<'a> Upstream<'a> {
    fn new(
        container: &str,
        index: usize,
        rx: &'a mut mpsc::UnboundedReceiver<Cmd>,
        shutdown: CancellationToken,
    ) -> Self {
        let cfg = ConnectionConfig {
            container_id: format!("{container}.{index}"),
            max_links: 1 << 20,
            offered_capabilities: vec![GATEWAY_CAPABILITY],
            ..Default::default()
        };
        let mut conn = Connection::new(cfg);
        conn.open();
        let channel = conn.begin();
        Upstream {
            conn,
            channel,
            rx,
            batch: Vec::with_capacity(256),
            clients: HashMap::new(),
            owners: HashMap::new(),
            senders: HashMap::new(),
            sender_of: HashMap::new(),
            tokens: HashMap::new(),
            next_token: 1,
            next_link: 0,
            ready: Vec::new(),
            lwt: HashMap::new(),
            next_lwt_op: 0,
            shutdown,
            closing: false,
            index,
        }
    }

    /// The connection is gone: every client hears it.
    fn lost(&mut self) {
        for (_, c) in self.clients.drain() {
            c.tx.send(Ev::Down);
        }
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Register { client, tx } => {
                self.clients.insert(
                    client,
                    ClientEntry {
                        tx,
                        links: std::collections::BTreeMap::new(),
                    },
                );
            }
            Cmd::Attach {
                client,
                tag,
                attach,
                credit,
            } => {
                let (Some(ch), Some(c)) = (self.channel, self.clients.get_mut(&client)) else {
                    debug!(upstream = self.index, client, tag, channel = ?self.channel, "attach for an unknown client dropped");
                    return;
                };
                debug!(upstream = self.index, client, tag, address = ?attach.source.as_ref().and_then(|s| s.address.as_deref()), "attaching");
                let link = self.conn.attach_as(ch, *attach);
                c.links.insert(tag, link);
                self.owners.insert(link, (client, tag));
                if credit > 0 {
                    self.conn.flow(link, credit, false);
                }
            }
            Cmd::Detach {
                client,
                tag,
                closed,
            } => {
                if let Some(link) = self
                    .clients
                    .get_mut(&client)
                    .and_then(|c| c.links.remove(&tag))
                {
                    self.owners.remove(&link);
                    self.conn.detach_with(link, closed, None);
                }
            }
            Cmd::Credit { client, tag, add } => {
                if let Some(&link) = self.clients.get(&client).and_then(|c| c.links.get(&tag)) {
                    let now = self.conn.link(link).map_or(0, |l| l.credit);
                    self.conn.flow(link, now.saturating_add(add), false);
                }
            }
            Cmd::Settle {
                client,
                delivery,
                state,
            } => {
                // A client of an earlier connection settles nothing here.
                if self.clients.contains_key(&client) {
                    self.conn.settle(delivery, state);
                }
            }
            Cmd::Publish {
                client,
                space,
                dest,
                message,
                settled,
                token,
            } => self.publish(client, space, dest, message, settled, token),
            Cmd::Will {
                client,
                space,
                op,
                message,
                token,
            } => self.will(client, space, op, message, token),
            Cmd::Gone { client } => {
                self.will_gone(client);
                if let Some(c) = self.clients.remove(&client) {
                    for (_, link) in c.links {
                        self.owners.remove(&link);
                        self.conn.detach_with(link, false, None);
                    }
                    // Its publications still waiting for credit were taken
                    // from it (a QoS 0 PUBLISH right before DISCONNECT is
                    // the common case): they still go, unless a sender's
                    // queue is already long, when they are dropped so that
                    // clients coming and going cannot fill the gateway.
                    for s in self.senders.values_mut() {
                        if s.queue.len() > ORPHANS_MAX {
                            s.queue.retain(|w| w.client != client);
                        }
                    }
                }
            }
        }
    }

    fn publish(
        &mut self,
        client: ClientKey,
        space: Arc<str>,
        dest: Dest,
        message: Bytes,
        settled: bool,
        token: u32,
    ) {
        let Some(ch) = self.channel else {
            return;
        };
        // Client 0 is the gateway itself (wills of lost connections).
        if client != 0 && client != LWT_OPS && !self.clients.contains_key(&client) {
            return;
        }
        let key = (space, dest);
        let link = match self.senders.get(&key) {
            Some(s) => s.link,
            None => self.attach_sender(ch, &key),
        };
        if let Some(s) = self.senders.get_mut(&key) {
            s.queue.push_back(Waiting {
                client,
                token,
                message,
                settled,
            });
        }
        self.ready.push(link);
    }

    /// Attaches the shared sender for `key`.
    fn attach_sender(&mut self, ch: u16, key: &(Arc<str>, Dest)) -> LinkId {
        let name = match key.1 {
            // Named the same every time: the service knows the wills
            // registered through it by its name (and our container id).
            Dest::Lwt => "lwt".to_string(),
            _ => format!("mqtt-publish.{}", self.next_link),
        };
        let link = self.conn.attach_as(ch, sender_attach(&key.0, &key.1, name));
        self.next_link += 1;
        self.sender_of.insert(link, key.clone());
        self.senders.insert(
            key.clone(),
            Sender {
                link,
                queue: VecDeque::new(),
            },
        );
        link
    }

    fn will(&mut self, client: ClientKey, space: Arc<str>, op: WillOp, message: Bytes, token: u32) {
        let Some(ch) = self.channel else {
            return;
        };
        let now = std::time::Instant::now();
        let st = self.lwt.entry(space.clone()).or_default();
        let (who, t) = match op {
            WillOp::Register => {
                if st.absent_until.is_some_and(|t| now < t) {
                    if let Some(c) = self.clients.get(&client) {
                        c.tx.gate_done(1);
                        c.tx.send(Ev::Outcome {
                            token,
                            outcome: Outcome::Rejected(
                                "amqp:not-found".into(),
                                "no last-will service in the mesh".into(),
                            ),
                        });
                    }
                    return;
                }
                st.live.insert(client, message.clone());
                (client, token)
            }
            WillOp::Connected => {
                if st.absent_until.is_some_and(|t| now < t) || st.retry_at.is_some() {
                    return;
                }
                (0, 0)
            }
            WillOp::Cancel | WillOp::Fire => {
                st.live.remove(&client);
                self.next_lwt_op = self.next_lwt_op.wrapping_add(1);
                let id = self.next_lwt_op;
                if st.unacked.len() >= MAX_UNACKED_WILL_OPS {
                    // The service has been away long: memory stays bounded,
                    // and the oldest operation is given up (logged).
                    st.unacked.pop_first();
                    if !st.overflowed {
                        st.overflowed = true;
                        warn!(upstream = self.index, space = %space, "too many will operations wait for the last-will service: the oldest are dropped");
                    }
                }
                st.unacked.insert(id, message.clone());
                (LWT_OPS, id)
            }
        };
        let key = (space, Dest::Lwt);
        if self.senders.contains_key(&key) {
            self.publish(who, key.0, Dest::Lwt, message, false, t);
        } else if st_retry_pending(&self.lwt, &key.0) && op != WillOp::Register {
            // Sent with the rest when the link is attached again (a
            // `connected` returned above).
        } else {
            let extra = (op == WillOp::Connected).then_some(message);
            self.attach_lwt(ch, &key.0, Some((client, token)), extra);
        }
    }

    /// Attaches the space's `$lwt` link and sends what the service must
    /// hold: every live client's registration (`own`'s with its token),
    /// the cancels and fires not acknowledged, then `synced`, then `extra`
    /// (a `connected`, which is kept nowhere else).
    fn attach_lwt(
        &mut self,
        ch: u16,
        space: &Arc<str>,
        own: Option<(ClientKey, u32)>,
        extra: Option<Bytes>,
    ) {
        let key = (space.clone(), Dest::Lwt);
        let link = self.attach_sender(ch, &key);
        let Some(st) = self.lwt.get_mut(space) else {
            return;
        };
        st.retry_at = None;
        let mut queue = VecDeque::new();
        for (c, m) in &st.live {
            let (client, token) = match own {
                Some((oc, t)) if oc == *c => (oc, t),
                _ => (0, 0),
            };
            queue.push_back(Waiting {
                client,
                token,
                message: m.clone(),
                settled: false,
            });
        }
        for (id, m) in &st.unacked {
            queue.push_back(Waiting {
                client: LWT_OPS,
                token: *id,
                message: m.clone(),
                settled: false,
            });
        }
        queue.push_back(Waiting {
            client: 0,
            token: 0,
            message: crate::lwt::encode(&crate::lwt::Op::Synced),
            settled: false,
        });
        if let Some(message) = extra {
            queue.push_back(Waiting {
                client: 0,
                token: 0,
                message,
                settled: false,
            });
        }
        if let Some(s) = self.senders.get_mut(&key) {
            s.queue = queue;
        }
        self.ready.push(link);
    }

    /// A client left: a registration it never cancelled or fired (its
    /// connection was refused after registering) is cancelled.
    fn will_gone(&mut self, client: ClientKey) {
        let spaces: Vec<Arc<str>> = self
            .lwt
            .iter()
            .filter(|(_, st)| st.live.contains_key(&client))
            .map(|(s, _)| s.clone())
            .collect();
        for space in spaces {
            let Some(m) = self
                .lwt
                .get_mut(&space)
                .and_then(|st| st.live.remove(&client))
            else {
                continue;
            };
            if let Ok(crate::lwt::Op::Register(r)) = crate::lwt::decode(&m) {
                let cancel = crate::lwt::encode(&crate::lwt::Op::Cancel {
                    client: r.client,
                    reg: r.reg,
                });
                self.will(client, space, WillOp::Cancel, cancel, 0);
            }
        }
    }

    /// The `$lwt` link of `space` detached: registrations wait a moment
    /// when no service answered; with wills to keep, it is attached again.
    fn lwt_detached(&mut self, space: &Arc<str>, not_found: bool) {
        let now = std::time::Instant::now();
        let Some(st) = self.lwt.get_mut(space) else {
            return;
        };
        if not_found {
            st.absent_until = Some(now + Duration::from_secs(5));
        }
        if !st.live.is_empty() || !st.unacked.is_empty() {
            let wait = if not_found { 1000 } else { 500 };
            st.retry_at = Some(now + Duration::from_millis(wait));
        }
    }

    /// Attaches again the `$lwt` links whose time has come.
    fn retry_lwt(&mut self) {
        let Some(ch) = self.channel else {
            return;
        };
        let now = std::time::Instant::now();
        let due: Vec<Arc<str>> = self
            .lwt
            .iter()
            .filter(|(_, st)| st.retry_at.is_some_and(|t| t <= now))
            .map(|(s, _)| s.clone())
            .collect();
        for space in due {
            if let Some(st) = self.lwt.get_mut(&space) {
                st.retry_at = None;
                if st.live.is_empty() && st.unacked.is_empty() {
                    continue;
                }
            }
            if !self.senders.contains_key(&(space.clone(), Dest::Lwt)) {
                self.attach_lwt(ch, &space, None, None);
            }
        }
    }

    /// The earliest `$lwt` link to attach again.
    fn lwt_retry_at(&self) -> Option<std::time::Instant> {
        self.lwt.values().filter_map(|st| st.retry_at).min()
    }

    /// Sends what waits on `link` as far as its credit goes.
    fn pump(&mut self, link: LinkId) {
        let Some(key) = self.sender_of.get(&link) else {
            return;
        };
        let Some(s) = self.senders.get_mut(key) else {
            return;
        };
        let mut done: HashMap<ClientKey, u32> = HashMap::new();
        while let Some(w) = s.queue.front() {
            let t = self.next_token;
            if !self.conn.send(link, &w.message, w.settled, t) {
                break;
            }
            let w = s.queue.pop_front().expect("front exists");
            self.next_token += 1;
            if !w.settled {
                self.tokens.insert(t, (w.client, w.token));
            }
            *done.entry(w.client).or_default() += 1;
        }
        for (client, n) in done {
            if let Some(c) = self.clients.get(&client) {
                c.tx.gate_done(n);
            }
        }
    }

    fn outcome(&mut self, token: u64, state: Option<DeliveryState>) {
        let Some((client, t)) = self.tokens.remove(&token) else {
            return;
        };
        if client == LWT_OPS {
            if matches!(state, Some(DeliveryState::Accepted(_))) {
                for st in self.lwt.values_mut() {
                    st.unacked.remove(&t);
                }
            }
            return;
        }
        let outcome = match state {
            Some(DeliveryState::Accepted(_)) => Outcome::Accepted,
            Some(DeliveryState::Released(_)) => Outcome::Released,
            Some(DeliveryState::Modified(_)) => Outcome::Released,
            Some(DeliveryState::Rejected(r)) => {
                let (c, d) = r.error.map_or((String::new(), String::new()), |e| {
                    (
                        flotilla_amqp::client::describe(&e),
                        e.description.unwrap_or_default(),
                    )
                });
                Outcome::Rejected(c, d)
            }
            _ => Outcome::Accepted,
        };
        if let Some(c) = self.clients.get(&client) {
            c.tx.send(Ev::Outcome { token: t, outcome });
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Attach {
                link,
                attach,
                reply: true,
            } => {
                if let Some((space, Dest::Lwt)) = self.sender_of.get(&link) {
                    if attach.target.is_some() {
                        // The service is there: registrations go to it again.
                        if let Some(st) = self.lwt.get_mut(space) {
                            st.absent_until = None;
                        }
                    }
                    return;
                }
                if let Some(&(client, tag)) = self.owners.get(&link) {
                    if attach.source.is_none() {
                        // Refused: its detach follows with the reason.
                        return;
                    }
                    let props = attach.properties.as_ref();
                    let resumed = matches!(
                        props.and_then(|p| p.get(&Symbol::from("flotilla:resumed"))),
                        Some(Value::Bool(true))
                    );
                    let meta =
                        match props.and_then(|p| p.get(&Symbol::from("flotilla:session-meta"))) {
                            Some(Value::String(s)) => Some(s.clone()),
                            _ => None,
                        };
                    if let Some(c) = self.clients.get(&client) {
                        c.tx.send(Ev::Attached { tag, resumed, meta });
                    }
                }
            }
            Event::Attach { link, .. } => {
                // We attach; nobody attaches to us.
                self.conn.refuse_attach(
                    link,
                    flotilla_amqp::connection::amqp_error(
                        flotilla_amqp::types::definitions::AmqpError::NotAllowed,
                        "the MQTT gateway takes no links",
                    ),
                );
            }
            Event::Flow { link } => {
                if self.sender_of.contains_key(&link) {
                    self.ready.push(link);
                }
            }
            Event::Delivery { link, delivery } => {
                let Some(&(client, tag)) = self.owners.get(&link) else {
                    if !delivery.settled {
                        self.conn.settle(delivery.id, flotilla_router_released());
                    }
                    return;
                };
                if let Some(c) = self.clients.get(&client) {
                    c.tx.send(Ev::Message {
                        tag,
                        delivery: delivery.id,
                        settled: delivery.settled,
                        payload: delivery.payload,
                    });
                }
            }
            Event::Outcome {
                token,
                state,
                settled,
                ..
            } => {
                if settled || state.is_some() {
                    self.outcome(token, state);
                }
            }
            Event::Detach {
                link,
                error,
                unsettled,
                ..
            } => {
                if let Some((client, tag)) = self.owners.remove(&link) {
                    if let Some(c) = self.clients.get_mut(&client) {
                        c.links.remove(&tag);
                        c.tx.send(Ev::Detached { tag, error });
                    }
                    return;
                }
                if let Some(key) = self.sender_of.remove(&link) {
                    // A sender refused or lost: what waits on it, and what
                    // it sent without an outcome, fails; the next
                    // publication attaches again.
                    let why = error
                        .as_ref()
                        .map(flotilla_amqp::client::describe)
                        .unwrap_or_else(|| "the link to the broker closed".into());
                    warn!(upstream = self.index, space = %key.0, dest = ?key.1, reason = %why, "publishing link detached");
                    if key.1 == Dest::Lwt {
                        let not_found = error.as_ref().is_some_and(|e| {
                            matches!(
                                e.condition,
                                flotilla_amqp::types::definitions::ErrorCondition::AmqpError(
                                    flotilla_amqp::types::definitions::AmqpError::NotFound
                                )
                            )
                        });
                        self.lwt_detached(&key.0, not_found);
                    }
                    if let Some(s) = self.senders.remove(&key) {
                        for w in s.queue {
                            if let Some(c) = self.clients.get(&w.client) {
                                c.tx.gate_done(1);
                                if !w.settled {
                                    c.tx.send(Ev::Outcome {
                                        token: w.token,
                                        outcome: Outcome::Rejected(why.clone(), why.clone()),
                                    });
                                }
                            }
                        }
                    }
                    for t in unsettled {
                        if let Some((client, token)) = self.tokens.remove(&t) {
                            if let Some(c) = self.clients.get(&client) {
                                c.tx.send(Ev::Outcome {
                                    token,
                                    outcome: Outcome::Rejected(why.clone(), why.clone()),
                                });
                            }
                        }
                    }
                }
            }
            Event::Open(_) | Event::Begin { .. } | Event::Discarded { .. } => {}
            Event::End { .. } => {
                self.closing = true;
                self.conn.close(None);
            }
            Event::Close { error } => {
                if let Some(e) = error {
                    warn!(upstream = self.index, error = %flotilla_amqp::client::describe(&e), "the router closed the connection");
                }
                self.closing = true;
            }
        }
    }
}

fn flotilla_router_released() -> DeliveryState {
    DeliveryState::Released(flotilla_amqp::types::messaging::Released {})
}

/// Link properties naming the space (and the MQTT client) a link acts for.
pub fn link_properties(space: &str, container: Option<&str>, fresh: bool) -> Fields {
    let mut f = Fields::default();
    f.insert(
        Symbol::from("flotilla:space"),
        Value::String(space.to_string()),
    );
    if let Some(c) = container {
        f.insert(
            Symbol::from("flotilla:container-id"),
            Value::String(c.to_string()),
        );
    }
    if fresh {
        f.insert(Symbol::from("mqtt:fresh"), Value::Bool(true));
    }
    f
}

/// True when the `$lwt` link of `space` is to be attached again later.
fn st_retry_pending(lwt: &HashMap<Arc<str>, LwtSpace>, space: &Arc<str>) -> bool {
    lwt.get(space).is_some_and(|st| st.retry_at.is_some())
}

/// The attach of a shared publishing link.
fn sender_attach(space: &str, dest: &Dest, name: String) -> Attach {
    let (address, caps): (Option<String>, Option<Vec<&str>>) = match dest {
        Dest::Relay => (None, None),
        Dest::Address { address, topic } => (Some(address.clone()), topic.then(|| vec!["topic"])),
        Dest::Retained => (Some(RETAINED.into()), None),
        Dest::SessionState => (Some(SESSION_STATE.into()), None),
        Dest::Lwt => (Some(crate::lwt::ADDRESS.into()), None),
    };
    let target = Target {
        address,
        capabilities: caps.map(|c| c.into_iter().map(Symbol::from).collect::<Vec<_>>().into()),
        ..Default::default()
    };
    Attach {
        name,
        handle: flotilla_amqp::types::definitions::Handle(0),
        role: Role::Sender,
        snd_settle_mode: SenderSettleMode::Mixed,
        rcv_settle_mode: ReceiverSettleMode::First,
        source: Some(Box::new(Source::default())),
        target: Some(Box::new(TargetArchetype::Target(target))),
        unsettled: None,
        incomplete_unsettled: false,
        initial_delivery_count: None,
        max_message_size: None,
        offered_capabilities: None,
        desired_capabilities: None,
        properties: Some(link_properties(space, None, false)),
    }
}

/// What wakes an upstream connection besides its socket.
enum Signal {
    Commands,
    Shutdown,
    /// Time to attach `$lwt` links again.
    Retry,
}

impl Handler for Upstream<'_> {
    type Signal = Signal;

    fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn signal(&mut self) -> impl std::future::Future<Output = Option<Signal>> + Send {
        let retry = self.lwt_retry_at().map(tokio::time::Instant::from_std);
        async move {
            let closing = self.closing;
            tokio::select! {
                _ = self.shutdown.cancelled(), if !closing => Some(Signal::Shutdown),
                n = self.rx.recv_many(&mut self.batch, 256) => (n > 0).then_some(Signal::Commands),
                _ = async { tokio::time::sleep_until(retry.expect("guarded")).await }, if retry.is_some() => {
                    Some(Signal::Retry)
                }
            }
        }
    }

    fn on_signal(&mut self, s: Signal) {
        match s {
            Signal::Commands => {
                let mut batch = std::mem::take(&mut self.batch);
                for c in batch.drain(..) {
                    self.command(c);
                }
                self.batch = batch;
            }
            Signal::Shutdown => {
                self.closing = true;
                self.conn.close(None);
            }
            Signal::Retry => self.retry_lwt(),
        }
    }

    fn on_event(&mut self, e: Event) {
        self.event(e);
    }

    fn on_turn(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        ready.sort_unstable();
        ready.dedup();
        for link in ready {
            self.pump(link);
        }
    }

    fn closing(&self) -> bool {
        self.closing
    }
}
