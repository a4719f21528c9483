//! One task per client connection: it owns the socket and the engine's
//! session/link state, turns the engine's events into routing (through
//! [`crate::core`]), and turns other tasks' [`ConnEvent`]s into frames.
//! Everything produced in one wake-up goes out in one write.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use flotilla_amqp::connection::{
    amqp_error, AttachReply, Connection, ConnectionConfig, Delivery, DeliveryRef, Event, LinkId,
};
use flotilla_amqp::driver::{Driver, DriverConfig, Ended, Handler};
use flotilla_amqp::message;
use flotilla_amqp::transport::{BoxIo, Identity};
use flotilla_amqp::types::definitions::{
    AmqpError, ConnectionError, Error as AmqpErrorBody, LinkError, Role, SenderSettleMode,
};
use flotilla_amqp::types::messaging::{Accepted, DeliveryState, Rejected, Target, TargetArchetype};
use flotilla_core::resources::{AddressType, Operation};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::core::{AddressState, ConnEvent, ConnHandle, ConnectionId, Forwarded, Origin, Routed};
use crate::policy::Principal;
use crate::Shared;

/// Stop reading from a peer that does not read what we write.
const WRITE_HIGH_WATER: usize = 4 * 1024 * 1024;
/// Prefix of router-assigned dynamic addresses.
pub const DYNAMIC_PREFIX: &str = "$dynamic/";
/// Offered on Open by the MQTT gateway: its links name their space.
pub const GATEWAY_CAPABILITY: &str = "flotilla.gateway";
/// The MQTT gateway's own addresses (its clients' retained messages and
/// session records), held by the broker of a space's `#`.
pub const MQTT_PREFIX: &str = "$mqtt/";
/// Links the gateway may have on one connection (it multiplexes many
/// MQTT clients' subscriptions).
const GATEWAY_MAX_LINKS: usize = 1 << 20;

enum IncomingTarget {
    Address(Arc<AddressState>),
    /// ANONYMOUS-RELAY: each message routed by its `to`.
    Relay,
}

struct Incoming {
    target: IncomingTarget,
    /// On the MQTT gateway's connection: whose link it is (the space the
    /// gateway named for it).
    principal: Option<Arc<Principal>>,
    /// This link's messages waiting in router queues (they hold its credit).
    held: u32,
}

struct Outgoing {
    address: Arc<AddressState>,
    outstanding: Arc<AtomicU32>,
    /// Receiver asked for pre-settled deliveries.
    presettle: bool,
    dynamic: bool,
}

/// Why a connection ended, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    PeerClosed,
    ProtocolError,
    Unauthorized,
    Shutdown,
    Io,
}

/// What a connection is, once known: a client, a route container (a
/// broker), an operator's tool (a component that only reads `$stat`), or
/// a neighbour router. Each role's state lives in its variant.
pub(crate) enum ConnRole {
    /// A client port's connection whose Open has not come yet.
    Unopened,
    Client(ClientState),
    /// A broker's connection: its container id.
    RouteContainer(String),
    /// A component that is no route container: it may read `$stat`.
    Tool,
    /// The MQTT gateway (a component offering [`GATEWAY_CAPABILITY`]):
    /// each of its links names the space it acts in.
    Gateway,
    /// An inter-router connection.
    Peer(Box<crate::mesh::peer::PeerLink>),
}

/// A client's state.
pub(crate) struct ClientState {
    pub(crate) principal: Principal,
    /// The largest message the client's space allows (its quota).
    message_quota: Option<u64>,
    /// How many links this client has open, for its space's link quota.
    link_count: Arc<std::sync::atomic::AtomicUsize>,
}

/// What other tasks ask of a connection task, besides what the routing
/// core sends ([`ConnEvent`]).
#[derive(Debug)]
pub enum Command {
    /// Link routing: attach onward, answers, credit, transfers, detach.
    Route(crate::linkroute::RouteEvent),
    /// Close this connection (`amqp:connection:forced`).
    Close { reason: String },
}

/// A cloneable handle to a connection task: its core inbox and its
/// command inbox.
#[derive(Debug, Clone)]
pub struct TaskHandle {
    pub core: ConnHandle,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
}

impl TaskHandle {
    pub fn id(&self) -> ConnectionId {
        self.core.id
    }

    /// Sends a command; false if the task is gone.
    pub(crate) fn command(&self, c: Command) -> bool {
        self.commands.send(c).is_ok()
    }

    /// Sends a link-routing event; false if the task is gone.
    pub(crate) fn route(&self, e: crate::linkroute::RouteEvent) -> bool {
        self.command(Command::Route(e))
    }
}

/// What wakes a connection task up besides its socket.
pub(crate) enum Signal {
    /// The router is shutting down: senders get no more credit.
    Shutdown,
    /// What was in flight settled: take back the credit senders still
    /// have.
    Revoke,
    /// Waiting deliveries were released: close.
    Closing,
    /// Events from the routing core (in `core_batch`).
    Core,
    /// Commands from other tasks (in `command_batch`).
    Commands,
    /// A command from the mesh task (peer connections).
    Peer(crate::mesh::PeerCommand),
    /// The tenancy changed: check the client and its links again.
    Tenancy,
}

pub(crate) struct ConnectionTask {
    pub(crate) id: ConnectionId,
    pub(crate) handle: TaskHandle,
    rx: mpsc::UnboundedReceiver<ConnEvent>,
    commands: mpsc::UnboundedReceiver<Command>,
    core_batch: Vec<ConnEvent>,
    command_batch: Vec<Command>,
    pub(crate) conn: Connection,
    pub(crate) shared: Arc<Shared>,
    pub(crate) identity: Identity,
    pub(crate) peer: SocketAddr,
    pub(crate) role: ConnRole,
    incoming: HashMap<LinkId, Incoming>,
    outgoing: HashMap<LinkId, Outgoing>,
    /// Our unsettled deliveries to receivers: token -> (link, origin).
    pub(crate) unsettled: HashMap<u64, Unsettled>,
    pub(crate) next_token: u64,
    dirty: HashSet<LinkId>,
    pub(crate) closing: Option<CloseReason>,
    /// The router is shutting down: no more credit for senders.
    pub(crate) draining: bool,
    /// The credit senders still had was taken back (the last step before
    /// the router closes its connections).
    pub(crate) revoked: bool,
    /// `unsettled.len()` as last added to the router's `in_flight`.
    counted_in_flight: usize,
    /// The client follows `amqp:connection:redirect` (it said so in its
    /// Open, or is known to); others hear `amqp:connection:forced`, which
    /// clients treat as a reason to reconnect.
    follows_redirect: bool,
    /// Receivers of `$stat` waiting for credit to get their snapshot.
    stat_links: Vec<LinkId>,
    /// Links routed to brokers (see [`crate::linkroute`]).
    pub(crate) routes: crate::linkroute::Routes,
    /// The peer's container-id (from its Open).
    pub(crate) remote_container: String,
    /// The client's transactions (see [`crate::transactions`]).
    pub(crate) txns: crate::transactions::Txns,
    /// Messages in and out on this connection (the console's view).
    pub(crate) traffic: Arc<crate::stat::Traffic>,
    /// Its links routed to brokers (the console's view).
    pub(crate) routed: crate::stat::Routed,
    tenancy: tokio::sync::watch::Receiver<u64>,
    pub(crate) peer_commands: Option<mpsc::UnboundedReceiver<crate::mesh::PeerCommand>>,
}

/// One of our unsettled deliveries to a receiver (or a neighbour router).
pub(crate) struct Unsettled {
    pub(crate) origin: Option<Origin>,
    pub(crate) outstanding: Arc<AtomicU32>,
    /// What its sender hears if the delivery is lost unsettled.
    pub(crate) lost: Lost,
    /// The consumer it went to (our outgoing link to a local receiver, or
    /// our data link to a neighbour) and its address: its settlement may
    /// let more of what waits there through (unsettled deliveries in
    /// flight to a consumer are capped).
    pub(crate) receiver: Option<(LinkId, Arc<AddressState>)>,
}

/// The outcome a sender gets for a delivery lost on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lost {
    /// Never acted upon (a receiver of the router's that went away).
    Released,
    /// Handed to a broker that went away: it may have stored it
    /// (`modified` with `delivery-failed`, AMQP 1.0 §3.4.5).
    InDoubt,
    /// A transaction's declare or discharge handed to a broker that went
    /// away: whether it took effect is unknown, and a client reads any
    /// outcome but `rejected` as done, so it is rejected, saying so.
    Transaction,
    /// Nothing: the link's detach tells the broker, which counts the
    /// delivery (a routed consumer's abandoned delivery).
    Silent,
}

impl Unsettled {
    /// Tells the delivery's sender it was lost.
    pub(crate) fn give_back(self) {
        let Some(o) = self.origin else { return };
        let state = match self.lost {
            Lost::Silent => return,
            Lost::Released => crate::core::released(),
            Lost::InDoubt => DeliveryState::Modified(flotilla_amqp::types::messaging::Modified {
                delivery_failed: Some(true),
                undeliverable_here: None,
                message_annotations: None,
            }),
            Lost::Transaction => DeliveryState::Rejected(Rejected {
                error: Some(amqp_error(
                    flotilla_amqp::types::transaction::TransactionError::Timeout,
                    "the broker went away before answering: the transaction may or may not have taken effect",
                )),
            }),
        };
        o.conn.send(ConnEvent::Outcome {
            delivery: o.delivery,
            state,
        });
    }
}

impl ConnectionTask {
    pub(crate) fn new(
        id: ConnectionId,
        shared: Arc<Shared>,
        identity: Identity,
        peer: SocketAddr,
    ) -> Self {
        let (core, rx) = ConnHandle::new(id);
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let cfg = ConnectionConfig {
            container_id: shared.cfg.container_id.clone(),
            max_frame_size: shared.cfg.max_frame_size,
            // The last channel is the router's own (its declares and
            // discharges to brokers, see `transactions::OWN_CHANNEL`).
            channel_max: shared
                .cfg
                .channel_max
                .min(crate::transactions::OWN_CHANNEL - 1),
            idle_timeout: shared.cfg.idle_timeout,
            max_links: shared.cfg.max_links_per_connection,
            max_message_size: shared.cfg.max_message_size,
            hostname: None,
            offered_capabilities: vec!["ANONYMOUS-RELAY"],
        };
        let tenancy = shared.tenancy_version.subscribe();
        ConnectionTask {
            id,
            handle: TaskHandle {
                core,
                commands: commands_tx,
            },
            rx,
            commands,
            core_batch: Vec::with_capacity(512),
            command_batch: Vec::with_capacity(64),
            conn: Connection::new(cfg),
            shared,
            identity,
            peer,
            role: ConnRole::Unopened,
            incoming: HashMap::new(),
            outgoing: HashMap::new(),
            unsettled: HashMap::new(),
            next_token: 0,
            dirty: HashSet::new(),
            closing: None,
            draining: false,
            revoked: false,
            counted_in_flight: 0,
            follows_redirect: false,
            stat_links: Vec::new(),
            routes: Default::default(),
            remote_container: String::new(),
            txns: Default::default(),
            traffic: Arc::default(),
            routed: Arc::default(),
            tenancy,
            peer_commands: None,
        }
    }

    /// The client's principal, on a client's connection.
    pub(crate) fn principal(&self) -> Option<&Principal> {
        match &self.role {
            ConnRole::Client(c) => Some(&c.principal),
            _ => None,
        }
    }

    /// The broker's container id, on a route container's connection.
    pub(crate) fn container(&self) -> Option<&str> {
        match &self.role {
            ConnRole::RouteContainer(c) => Some(c),
            _ => None,
        }
    }

    /// True on an inter-router connection.
    pub(crate) fn is_peer(&self) -> bool {
        matches!(self.role, ConnRole::Peer(_))
    }

    /// Runs the connection on the driver until it closes.
    pub(crate) async fn run(mut self, io: BoxIo, rbuf: BytesMut) -> CloseReason {
        self.peer_start();
        let cfg = DriverConfig {
            high_water: WRITE_HIGH_WATER,
            ..Default::default()
        };
        match Driver::new(io, rbuf, cfg).run(&mut self).await {
            Ended::Closed => {}
            Ended::Eof => {
                // The socket closed with no Close from the peer (that sets
                // `PeerClosed`): the connection was lost.
                self.closing.get_or_insert(CloseReason::Io);
            }
            Ended::Io(e) => {
                debug!(conn.id = self.id.0, error = %e, "connection failed");
                self.closing = Some(CloseReason::Io);
            }
        }
        self.cleanup();
        self.closing.unwrap_or(CloseReason::PeerClosed)
    }

    fn protocol_error(&mut self, e: AmqpErrorBody) {
        info!(conn.id = self.id.0, client.addr = %self.peer, error = ?e.condition, description = e.description.as_deref().unwrap_or(""), "closing connection: protocol error");
        self.closing = Some(CloseReason::ProtocolError);
        self.conn.close(Some(e));
    }

    /// The tenancy changed: the client must still exist and be allowed
    /// in; each of its links must still name an address it may use, as
    /// the same type. What no longer holds is closed or detached with the
    /// reason.
    fn recheck(&mut self) {
        let Some(p) = self.principal().cloned() else {
            return;
        };
        let p = match self.shared.policy.recheck(&p, self.peer, self.identity.tls) {
            Ok(p) => p,
            Err(why) => {
                info!(conn.id = self.id.0, client.addr = %self.peer, reason = %why, "closing connection: no longer authorized");
                self.closing = Some(CloseReason::Unauthorized);
                self.conn
                    .close(Some(amqp_error(AmqpError::UnauthorizedAccess, why)));
                return;
            }
        };
        self.set_principal(p.clone());
        let mut gone: Vec<(LinkId, AmqpErrorBody)> = Vec::new();
        for (link, inc) in &self.incoming {
            if let IncomingTarget::Address(a) = &inc.target {
                if a.address.starts_with(DYNAMIC_PREFIX) {
                    continue;
                }
                if let Some(e) = self.still(&p, Operation::Send, a) {
                    gone.push((*link, e));
                }
            }
        }
        for (link, out) in &self.outgoing {
            if out.dynamic {
                continue;
            }
            if let Some(e) = self.still(&p, Operation::Recv, &out.address) {
                gone.push((*link, e));
            }
        }
        for (link, e) in gone {
            info!(
                conn.id = self.id.0,
                link = link.0,
                reason = e.description.as_deref().unwrap_or(""),
                "detaching link"
            );
            let unsettled = self.conn.detach(link, Some(e));
            self.link_gone(link, unsettled);
        }
        self.route_recheck(&p);
    }

    /// Who the client is from now on, with its space's message-size quota.
    fn set_principal(&mut self, p: Principal) {
        let message_quota = self
            .shared
            .policy
            .tenancy()
            .spaces
            .get(&p.space)
            .and_then(|s| s.quotas.message_size);
        match &mut self.role {
            ConnRole::Client(c) => {
                c.principal = p;
                c.message_quota = message_quota;
            }
            role => {
                *role = ConnRole::Client(ClientState {
                    principal: p,
                    message_quota,
                    link_count: Arc::default(),
                })
            }
        }
    }

    /// The client's link counter (shared with the console's view).
    fn link_counter(&self) -> Arc<std::sync::atomic::AtomicUsize> {
        match &self.role {
            ConnRole::Client(c) => c.link_count.clone(),
            _ => Arc::default(),
        }
    }

    /// The client's message-size quota.
    fn message_quota(&self) -> Option<u64> {
        match &self.role {
            ConnRole::Client(c) => c.message_quota,
            _ => None,
        }
    }

    /// Why a link to `a` for `op` may no longer stay, if so.
    fn still(&self, p: &Principal, op: Operation, a: &AddressState) -> Option<AmqpErrorBody> {
        match self.resolve(p, op, &a.address) {
            Ok(kind) if kind == a.kind => None,
            Ok(_) => Some(amqp_error(
                AmqpError::NotFound,
                format!("address {:?} changed type", a.address),
            )),
            Err(e) => Some(if e.condition == AmqpError::NotFound.into() {
                amqp_error(
                    AmqpError::NotFound,
                    format!("address {:?} was deleted", a.address),
                )
            } else {
                e
            }),
        }
    }

    /// Router shutdown, last step before closing: senders lose the credit
    /// they still have. (Taken back only once what was in flight settled:
    /// a sender that has sent more than the router saw when its credit is
    /// taken keeps the difference as negative credit, and proton carries
    /// that over to its next connection, where it then never sends.)
    fn revoke_credit(&mut self) {
        self.draining = true;
        self.revoked = true;
        let mut links: Vec<LinkId> = self.incoming.keys().copied().collect();
        if matches!(self.role, ConnRole::Client(_)) {
            // A client's senders routed to brokers, too.
            links.extend(
                self.routes
                    .links
                    .keys()
                    .copied()
                    .filter(|l| self.conn.link(*l).is_some_and(|l| l.role == Role::Receiver)),
            );
        }
        for l in links {
            self.conn.flow(l, 0, false);
        }
    }

    /// Router shutdown, last step: outcomes already on their way to us go
    /// out before the Close.
    fn shut_down(&mut self) {
        if !self.revoked {
            self.revoke_credit();
        }
        while let Ok(ev) = self.rx.try_recv() {
            self.handle_conn_event(ev);
        }
        self.closing = Some(CloseReason::Shutdown);
        let redirect = match (&self.role, &self.shared.cfg.redirect) {
            (ConnRole::Client(_), Some(to)) if self.follows_redirect => redirect_error(to),
            _ => None,
        };
        self.conn.close(Some(redirect.unwrap_or_else(|| {
            amqp_error(ConnectionError::ConnectionForced, "router shutting down")
        })));
    }

    fn handle_event(&mut self, e: Event) {
        let Some(e) = self.route_event_on_link(e) else {
            return;
        };
        if self.is_peer() {
            return self.handle_peer_event(e);
        }
        match e {
            Event::Open(open) => self.handle_open(&open),
            Event::Begin {
                channel,
                answer: true,
            } if self.routes.begun == Some(channel) => self.route_session_ready(channel),
            Event::Begin { .. } | Event::End { .. } => {}
            Event::Discarded { txn } => self.txn_doom(&txn, flotilla_amqp::txn::DISCARDED),
            Event::Attach {
                link,
                attach,
                reply: false,
            } => self.handle_attach(link, *attach),
            Event::Attach { .. } => {}
            Event::Flow { link } => self.handle_flow(link),
            Event::Delivery { link, delivery } => self.handle_delivery(link, delivery),
            Event::Outcome {
                link,
                token,
                state,
                settled,
            } => self.handle_outcome(link, token, state, settled),
            Event::Detach {
                link, unsettled, ..
            } => self.link_gone(link, unsettled),
            Event::Close { error } => {
                if let Some(e) = error {
                    debug!(conn.id = self.id.0, error = ?e.condition, "peer closed with error");
                }
                self.closing.get_or_insert(CloseReason::PeerClosed);
            }
        }
    }

    /// Events on an inter-router connection.
    fn handle_peer_event(&mut self, e: Event) {
        match e {
            Event::Open(open) => self.peer_on_open(&open),
            Event::Begin { channel, answer } => self.peer_on_begin(channel, answer),
            Event::Attach {
                link,
                attach,
                reply,
            } => self.peer_on_attach(link, *attach, reply),
            Event::Flow { link } => self.peer_on_flow(link),
            Event::Delivery { link, delivery } => self.peer_on_delivery(link, delivery),
            Event::Outcome {
                link,
                token,
                state,
                settled,
            } => self.handle_outcome(link, token, state, settled),
            Event::Detach { unsettled, .. } => {
                // The neighbour dropped one of the mesh links: the
                // connection is no use any more.
                for token in unsettled {
                    if let Some(u) = self.unsettled.remove(&token) {
                        u.give_back();
                    }
                }
                self.closing = Some(CloseReason::ProtocolError);
                self.conn.close(Some(amqp_error(
                    AmqpError::IllegalState,
                    "mesh link detached",
                )));
            }
            Event::End { .. } | Event::Discarded { .. } => {}
            Event::Close { .. } => {
                self.closing.get_or_insert(CloseReason::PeerClosed);
            }
        }
    }

    fn handle_open(&mut self, open: &flotilla_amqp::types::performatives::Open) {
        let hostname = open.hostname.as_deref();
        self.remote_container = open.container_id.clone();
        let offers = |cap: &str| {
            open.offered_capabilities
                .as_ref()
                .is_some_and(|c| c.0.iter().any(|s| s.as_str() == cap))
        };
        self.follows_redirect = follows_redirect(open);
        let route_container = offers(crate::linkroute::ROUTE_CONTAINER_CAPABILITY);
        let gateway = offers(GATEWAY_CAPABILITY);
        if self.identity.is_component() {
            // A broker (or another component): it proved the mesh
            // credential. It serves routed links; it is no tenant. Without
            // the route-container capability it is an operator's tool,
            // which may only read `$stat`.
            info!(conn.id = self.id.0, client.addr = %self.peer, mechanism = self.identity.mechanism, route_container, gateway, "component connected");
            self.conn.open();
            if route_container {
                let id = open.container_id.clone();
                self.route_container_open(&id);
            } else if gateway {
                self.conn.set_max_links(GATEWAY_MAX_LINKS);
                self.role = ConnRole::Gateway;
                self.shared
                    .gateways
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(self.id.0, open.container_id.clone());
            } else {
                self.role = ConnRole::Tool;
            }
            return;
        }
        if route_container {
            // Tenants' credentials, however broad their rules, never make a
            // route container: links of every space could be routed to it.
            warn!(conn.id = self.id.0, client.addr = %self.peer, user = self.identity.user.as_deref().unwrap_or("<anonymous>"), "route container refused: not a component");
            return self.refuse_open(
                AmqpError::UnauthorizedAccess,
                "a route container must authenticate as a component: SCRAM-SHA-256 as ID@$mesh with the mesh secret, or a certificate from the mesh CA".to_string(),
            );
        }
        if gateway {
            // Nor a gateway: its links name the space they act in.
            warn!(conn.id = self.id.0, client.addr = %self.peer, user = self.identity.user.as_deref().unwrap_or("<anonymous>"), "gateway refused: not a component");
            return self.refuse_open(
                AmqpError::UnauthorizedAccess,
                "a gateway must authenticate as a component: SCRAM-SHA-256 as ID@$mesh with the mesh secret, or a certificate from the mesh CA".to_string(),
            );
        }
        match self
            .shared
            .policy
            .on_open(&self.identity, hostname, self.peer)
        {
            Ok(p) if self.over_connection_quota(&p.space) => {
                warn!(conn.id = self.id.0, client.addr = %self.peer, vhost = %p.space, "connection refused: the address space's connection quota is used up");
                self.refuse_open(
                    AmqpError::ResourceLimitExceeded,
                    format!(
                        "address space {:?} has as many connections as its plan allows",
                        p.space
                    ),
                );
            }
            Ok(p) => {
                info!(conn.id = self.id.0, client.addr = %self.peer, vhost = %p.space, user = p.user.as_deref().unwrap_or("<anonymous>"), mechanism = self.identity.mechanism, tls = self.identity.tls, "connection opened");
                self.set_principal(p.clone());
                self.shared
                    .clients
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        self.id.0,
                        crate::stat::ClientInfo {
                            space: p.space.clone(),
                            user: p.user.clone(),
                            addr: self.peer,
                            container: open.container_id.clone(),
                            handle: self.handle.clone(),
                            links: self.link_counter(),
                            traffic: self.traffic.clone(),
                            routed: self.routed.clone(),
                        },
                    );
                self.conn.open();
            }
            Err(why) => {
                warn!(conn.id = self.id.0, client.addr = %self.peer, reason = %why, "connection refused");
                self.refuse_open(AmqpError::UnauthorizedAccess, why);
            }
        }
    }

    /// A receiver of `$stat`: it gets a snapshot once it gives credit.
    fn accept_stat(&mut self, link: LinkId, attach: &flotilla_amqp::types::performatives::Attach) {
        let target = match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => Some(t.clone()),
            _ => None,
        };
        self.conn.accept_attach(
            link,
            AttachReply {
                source: attach.source.as_deref().cloned(),
                target,
                snd_settle_mode: Some(SenderSettleMode::Settled),
                ..Default::default()
            },
        );
        self.stat_links.push(link);
    }

    /// Answers an Open with ours and a Close with `condition` (AMQP 1.0
    /// §2.4.1: a refused connection still gets an Open first).
    fn refuse_open(&mut self, condition: AmqpError, why: String) {
        self.closing = Some(CloseReason::Unauthorized);
        self.conn.close(Some(amqp_error(condition, why)));
    }

    fn handle_attach(&mut self, link: LinkId, attach: flotilla_amqp::types::performatives::Attach) {
        if flotilla_amqp::connection::is_coordinator(&attach) {
            return self.txn_attach(link, &attach);
        }
        if matches!(self.role, ConnRole::Client(_))
            && crate::linkroute::terminus_address(&attach).as_deref()
                == Some(crate::linkroute::REATTACH_ADDRESS)
        {
            return self.reattach(link, attach);
        }
        if self.identity.is_component()
            && self.container().is_none()
            && attach.role == Role::Receiver
            && attach.source.as_ref().and_then(|s| s.address.as_deref())
                == Some(crate::stat::STAT_ADDRESS)
        {
            return self.accept_stat(link, &attach);
        }
        if matches!(self.role, ConnRole::Tool)
            && attach.role == Role::Receiver
            && attach.source.as_ref().and_then(|s| s.address.as_deref())
                == Some(crate::linkroute::LWT_ADDRESS)
        {
            // An operator's tool reads the last-will service's counts
            // (every space's): a link routed to the service.
            let info = crate::linkroute::RouteInfo {
                space: crate::linkroute::OPERATORS_SPACE.to_string(),
                kind: AddressType::Queue,
                placed_by: crate::linkroute::LWT_ADDRESS.to_string(),
                address: crate::linkroute::LWT_ADDRESS.to_string(),
                container: self.remote_container.clone(),
                link_name: attach.name.clone(),
                broker: Some(crate::linkroute::LWT_CONTAINER.to_string()),
                hops: 0,
                topic: None,
                user: None,
                gateway: None,
                claims: None,
            };
            return self.route_attach(link, attach, info);
        }
        if attach.role == Role::Receiver
            && attach.source.as_ref().and_then(|s| s.address.as_deref())
                == Some(crate::linkroute::LWT_ADDRESS)
        {
            // Wills go in, nothing comes out (only an operator's tool reads
            // the service's counts, above).
            let why = "$lwt takes wills: attach a sender";
            warn!(conn.id = self.id.0, link.name = %attach.name, reason = why, "attach refused");
            return self
                .conn
                .refuse_attach(link, amqp_error(AmqpError::NotAllowed, why));
        }
        if matches!(self.role, ConnRole::Gateway) {
            return self.gateway_attach(link, attach);
        }
        let Some(p) = self.principal().cloned() else {
            let why = if self.identity.is_component() {
                "a route container's connection carries only the links routers route to it"
            } else {
                "connection not open"
            };
            warn!(conn.id = self.id.0, link.name = %attach.name, reason = why, "attach refused");
            self.conn
                .refuse_attach(link, amqp_error(AmqpError::NotAllowed, why));
            return;
        };
        if crate::linkroute::terminus_address(&attach).is_some_and(|a| a.starts_with(MQTT_PREFIX)) {
            // The MQTT gateway's records in the broker: no client's.
            let why = "addresses under $mqtt/ belong to the MQTT gateway";
            warn!(conn.id = self.id.0, link.name = %attach.name, reason = why, "attach refused");
            return self
                .conn
                .refuse_attach(link, amqp_error(AmqpError::UnauthorizedAccess, why));
        }
        if let Some(e) = self.over_link_quota(&p.space) {
            warn!(conn.id = self.id.0, client.addr = %self.peer, "attach refused: the address space's link quota is used up");
            return self.conn.refuse_attach(link, e);
        }
        if attach.role == Role::Sender {
            // The space's message-size quota is the link's announced
            // max-message-size: nothing larger is assembled in memory.
            if let Some(q) = self.message_quota() {
                self.conn.limit_message_size(link, q);
            }
        }
        if let Some(info) = self.route_for(&p, &attach, &self.remote_container) {
            return self.route_attach(link, attach, info);
        }
        match attach.role {
            Role::Sender => self.attach_incoming(link, &p, attach, None),
            Role::Receiver => self.attach_outgoing(link, &p, attach),
        }
    }

    /// A client's receiver with no source address asks for its durable
    /// subscription by link name alone (`$reattach`, as JMS unsubscribes):
    /// routed to the broker that holds the space's queues and topics when
    /// one holds them all, else to the one placement picks for the space.
    fn reattach(&mut self, link: LinkId, attach: flotilla_amqp::types::performatives::Attach) {
        let marker = crate::linkroute::REATTACH_ADDRESS;
        let p = match &self.role {
            ConnRole::Client(_) => self.principal().cloned(),
            _ => None,
        };
        let Some(p) = p else {
            let why = "a link with no address is for clients of an address space";
            warn!(conn.id = self.id.0, link.name = %attach.name, reason = why, "attach refused");
            return self
                .conn
                .refuse_attach(link, amqp_error(AmqpError::NotAllowed, why));
        };
        let broker = {
            let t = self.shared.policy.tenancy();
            t.spaces.get(&p.space).and_then(|s| {
                let mut held = s.placements.values();
                let first = held.next()?;
                held.all(|b| b == first).then(|| first.clone())
            })
        };
        let info = crate::linkroute::RouteInfo {
            space: p.space.clone(),
            kind: AddressType::Queue,
            placed_by: marker.to_string(),
            address: marker.to_string(),
            container: self.remote_container.clone(),
            link_name: attach.name.clone(),
            broker,
            hops: 0,
            topic: None,
            user: p.user.clone(),
            gateway: None,
            // A token user is authorized by its claims there.
            claims: p.token.as_ref().map(|t| t.claims.to_string()),
        };
        debug!(conn.id = self.id.0, space = %p.space, link = marker, "routing a link with no address to a broker");
        self.route_attach(link, attach, info)
    }

    /// A link of the MQTT gateway: it acts for one of its clients, in the
    /// space its `flotilla:space` property names (trusted: the gateway
    /// proved the mesh credential and authorized its client itself), for
    /// the durable subscriptions of `flotilla:container-id`.
    fn gateway_attach(
        &mut self,
        link: LinkId,
        attach: flotilla_amqp::types::performatives::Attach,
    ) {
        let prop = |k: &str| match attach
            .properties
            .as_ref()
            .and_then(|p| p.get(&flotilla_amqp::types::primitives::Symbol::from(k)))
        {
            Some(flotilla_amqp::types::primitives::Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let space = prop(crate::linkroute::PROP_SPACE)
            .filter(|s| self.shared.policy.tenancy().spaces.contains_key(s));
        let Some(space) = space else {
            let e = amqp_error(
                AmqpError::NotFound,
                "the gateway's link must name an address space that exists (flotilla:space)",
            );
            return self.conn.refuse_attach(link, e);
        };
        let container =
            prop(crate::linkroute::PROP_CONTAINER).unwrap_or_else(|| self.remote_container.clone());
        let p = Principal {
            space,
            user: None,
            rules: flotilla_core::config::allow_all_shared(),
            token: None,
            expires_at: None,
        };
        if let Some(info) = self.route_for(&p, &attach, &container) {
            return self.route_attach(link, attach, info);
        }
        match attach.role {
            Role::Sender => {
                let p = Arc::new(p);
                self.attach_incoming(link, &p.clone(), attach, Some(p))
            }
            Role::Receiver => self.attach_outgoing(link, &p, attach),
        }
    }

    /// True when `space` already has as many client connections (on this
    /// router) as its quota allows.
    fn over_connection_quota(&self, space: &str) -> bool {
        let t = self.shared.policy.tenancy();
        let Some(max) = t.spaces.get(space).and_then(|s| s.quotas.connections) else {
            return false;
        };
        self.sum_over_clients(space, |_| 1) >= max
    }

    /// Sums `f` over the client connections of `space` on this router.
    fn sum_over_clients(&self, space: &str, f: impl Fn(&crate::stat::ClientInfo) -> u64) -> u64 {
        self.shared
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|c| c.space == space)
            .map(f)
            .sum()
    }

    /// The space has as many links open (on this router) as its quota
    /// allows: the error to refuse another with.
    fn over_link_quota(&self, space: &str) -> Option<AmqpErrorBody> {
        let t = self.shared.policy.tenancy();
        let max = t.spaces.get(space)?.quotas.links?;
        // This connection's count as of now (the new link is not answered).
        let mine = self.conn.link_count().saturating_sub(1);
        self.link_counter()
            .store(mine, std::sync::atomic::Ordering::Relaxed);
        let open = self.sum_over_clients(space, |c| {
            c.links.load(std::sync::atomic::Ordering::Relaxed) as u64
        });
        (open >= max).then(|| {
            amqp_error(
                AmqpError::ResourceLimitExceeded,
                format!("address space {space:?} has as many links as its plan allows ({max})"),
            )
        })
    }

    /// A message larger than the space's quota allows: the error to
    /// reject it with.
    pub(crate) fn over_message_quota(&self, len: usize) -> Option<AmqpErrorBody> {
        let max = self.message_quota()?;
        let p = self.principal()?;
        (len as u64 > max).then(|| {
            amqp_error(
                AmqpError::ResourceLimitExceeded,
                format!(
                    "message of {len} bytes exceeds address space {:?}'s limit of {max}",
                    p.space
                ),
            )
        })
    }

    /// The route to a broker when `attach` names a queue, topic or
    /// subscription the principal may use.
    fn route_for(
        &self,
        p: &Principal,
        attach: &flotilla_amqp::types::performatives::Attach,
        container: &str,
    ) -> Option<crate::linkroute::RouteInfo> {
        let address = crate::linkroute::terminus_address(attach).filter(|a| !a.is_empty())?;
        if address.starts_with(MQTT_PREFIX) && matches!(self.role, ConnRole::Gateway) {
            // The gateway's retained messages and session records: with
            // the space's topics that nobody declared (its `#`).
            let t = self.shared.policy.tenancy();
            let space = t.spaces.get(&p.space)?;
            return Some(crate::linkroute::RouteInfo {
                space: p.space.clone(),
                kind: AddressType::Topic,
                placed_by: "#".to_string(),
                address: address.clone(),
                container: container.to_string(),
                link_name: attach.name.clone(),
                broker: space.placements.get("#").cloned(),
                hops: 0,
                topic: None,
                user: None,
                gateway: None,
                claims: None,
            });
        }
        if address == crate::linkroute::LWT_ADDRESS && attach.role == Role::Sender {
            // A will: to the last-will service, which authorizes each
            // will's destination by the user named here.
            let gateway = matches!(self.role, ConnRole::Gateway);
            return Some(crate::linkroute::RouteInfo {
                space: p.space.clone(),
                kind: AddressType::Queue,
                placed_by: address.clone(),
                address,
                container: container.to_string(),
                link_name: attach.name.clone(),
                broker: Some(crate::linkroute::LWT_CONTAINER.to_string()),
                hops: 0,
                topic: None,
                user: p.user.clone(),
                gateway: gateway.then(|| self.remote_container.clone()),
                claims: p.token.as_ref().map(|t| t.claims.to_string()),
            });
        }
        if address.starts_with('$') {
            // Reserved for the router itself (`$stat`, `$dynamic/…`): never
            // a broker's, whatever capability the client asks with.
            return None;
        }
        let op = match attach.role {
            Role::Receiver => Operation::Recv,
            Role::Sender => Operation::Send,
        };
        if !p.may(op, &address) {
            return None;
        }
        let t = self.shared.policy.tenancy();
        let space = t.spaces.get(&p.space)?;
        let (kind, declared) = match space.declared_as(&address) {
            Some(d) => d,
            // Where undeclared addresses are allowed, a client may ask for
            // a queue or topic by capability (as JMS clients do).
            None if space.undeclared == flotilla_core::resources::Undeclared::Anycast => {
                let caps = match attach.role {
                    Role::Receiver => attach.source.as_ref().and_then(|s| s.capabilities.clone()),
                    Role::Sender => match attach.target.as_deref() {
                        Some(TargetArchetype::Target(t)) => t.capabilities.clone(),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    },
                };
                let has = |c: &str| {
                    caps.as_ref()
                        .is_some_and(|a| a.0.iter().any(|s| s.as_str() == c))
                };
                if has("queue") {
                    (AddressType::Queue, address.as_str())
                } else if has("topic") {
                    // Every undeclared topic of a space lives on one broker
                    // (the one of its `#`), so a wildcard subscription there
                    // sees them all.
                    (AddressType::Topic, "#")
                } else {
                    return None;
                }
            }
            None => return None,
        };
        if kind.is_direct() {
            return None;
        }
        let topic = space.subscriptions.get(&address).cloned();
        // A subscription lives on the broker of its topic.
        let declared = match &topic {
            Some(t) => space.declared_as(t).map_or(t.as_str(), |(_, d)| d),
            None => declared,
        };
        Some(crate::linkroute::RouteInfo {
            space: p.space.clone(),
            kind,
            placed_by: declared.to_string(),
            address: address.clone(),
            container: container.to_string(),
            link_name: attach.name.clone(),
            broker: space.placements.get(declared).cloned(),
            hops: 0,
            topic,
            user: None,
            gateway: None,
            claims: None,
        })
    }

    /// Resolves an address for `op`, or the error to refuse with.
    fn resolve(
        &self,
        p: &Principal,
        op: Operation,
        address: &str,
    ) -> Result<AddressType, AmqpErrorBody> {
        if !p.may(op, address) {
            let what = if op == Operation::Send {
                "send to"
            } else {
                "receive from"
            };
            return Err(amqp_error(
                AmqpError::UnauthorizedAccess,
                format!("not allowed to {what} {address:?}"),
            ));
        }
        let t = self.shared.policy.tenancy();
        let kind = t.spaces.get(&p.space).and_then(|s| s.lookup(address));
        match kind {
            None => Err(amqp_error(AmqpError::NotFound, format!("no address {address:?} in address space {:?}", p.space))),
            Some(k) if !k.is_direct() => Err(amqp_error(
                AmqpError::NotImplemented,
                format!("address {address:?} is held by a broker: attach a link to it (anonymous relay reaches only anycast and multicast addresses)"),
            )),
            Some(k) => Ok(k),
        }
    }

    /// Resolves where a sender sends (a target, or an anonymous-relay
    /// message's `to`): a dynamic address anyone in the space may answer
    /// on, or an address the principal may send to.
    fn resolve_target(&self, p: &Principal, address: &str) -> Result<AddressType, AmqpErrorBody> {
        if address.starts_with(DYNAMIC_PREFIX) {
            return self
                .shared
                .table
                .get(&p.space, address)
                .map(|s| s.kind)
                .ok_or_else(|| {
                    amqp_error(
                        AmqpError::NotFound,
                        format!("no dynamic address {address:?}"),
                    )
                });
        }
        self.resolve(p, Operation::Send, address)
    }

    fn attach_incoming(
        &mut self,
        link: LinkId,
        p: &Principal,
        attach: flotilla_amqp::types::performatives::Attach,
        principal: Option<Arc<Principal>>,
    ) {
        let target = match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => t.clone(),
            #[allow(unreachable_patterns)]
            Some(_) => {
                self.conn.refuse_attach(
                    link,
                    amqp_error(AmqpError::NotImplemented, "transactions are not supported"),
                );
                return;
            }
            None => Target::default(),
        };
        let source = attach.source.as_deref().cloned();
        let address = target.address.clone().filter(|a| !a.is_empty());
        let target_state = match address {
            None => IncomingTarget::Relay,
            Some(a) => match self.resolve_target(p, &a) {
                Ok(kind) => {
                    let core = self.handle.core.clone();
                    let (st, ()) = self
                        .shared
                        .table
                        .with(&p.space, &a, kind, |st| st.add_sender(core, link));
                    IncomingTarget::Address(st)
                }
                Err(e) => {
                    warn!(conn.id = self.id.0, link.name = %attach.name, address = %a, reason = e.description.as_deref().unwrap_or(""), "attach refused");
                    self.conn.refuse_attach(link, e);
                    return;
                }
            },
        };
        debug!(conn.id = self.id.0, link.name = %attach.name, address = target.address.as_deref().unwrap_or("<relay>"), "sender attached");
        self.conn.accept_attach(
            link,
            AttachReply {
                source,
                target: Some(target),
                ..Default::default()
            },
        );
        self.incoming.insert(
            link,
            Incoming {
                target: target_state,
                principal,
                held: 0,
            },
        );
        self.dirty.insert(link);
    }

    fn attach_outgoing(
        &mut self,
        link: LinkId,
        p: &Principal,
        attach: flotilla_amqp::types::performatives::Attach,
    ) {
        let mut source = attach.source.as_deref().cloned().unwrap_or_default();
        let target = match attach.target.as_deref() {
            Some(TargetArchetype::Target(t)) => Some(t.clone()),
            _ => None,
        };
        if source.address.as_deref() == Some(crate::stat::STAT_ADDRESS) {
            if !p.may(Operation::View, "#") {
                let e = amqp_error(
                    AmqpError::UnauthorizedAccess,
                    "viewing router state needs the view operation on all addresses",
                );
                return self.conn.refuse_attach(link, e);
            }
            return self.accept_stat(link, &attach);
        }
        let (address, kind, dynamic) = if source.dynamic {
            let n = self.shared.dynamic_seq.fetch_add(1, Ordering::Relaxed);
            let a = format!(
                "{DYNAMIC_PREFIX}{}/{}.{n}",
                self.shared.cfg.container_id, self.id.0
            );
            source.address = Some(a.clone());
            (a, AddressType::Anycast, true)
        } else {
            let Some(a) = source.address.clone().filter(|a| !a.is_empty()) else {
                self.conn.refuse_attach(
                    link,
                    amqp_error(
                        AmqpError::InvalidField,
                        "a receiver needs a source address or dynamic: true",
                    ),
                );
                return;
            };
            let resolved = if a.starts_with(DYNAMIC_PREFIX) {
                Err(amqp_error(
                    AmqpError::UnauthorizedAccess,
                    "dynamic addresses are consumed only by the link that created them",
                ))
            } else {
                self.resolve(p, Operation::Recv, &a)
            };
            match resolved {
                Ok(k) => (a, k, false),
                Err(e) => {
                    warn!(conn.id = self.id.0, link.name = %attach.name, address = %a, reason = e.description.as_deref().unwrap_or(""), "attach refused");
                    self.conn.refuse_attach(link, e);
                    return;
                }
            }
        };
        // Multicast is at-most-once: we send pre-settled.
        let presettle =
            kind == AddressType::Multicast || attach.snd_settle_mode == SenderSettleMode::Settled;
        let snd = if kind == AddressType::Multicast {
            Some(SenderSettleMode::Settled)
        } else {
            None
        };
        let outstanding = Arc::new(AtomicU32::new(0));
        self.conn.accept_attach(
            link,
            AttachReply {
                source: Some(source),
                target,
                snd_settle_mode: snd,
                ..Default::default()
            },
        );
        let (core, counter) = (self.handle.core.clone(), outstanding.clone());
        // Unsettled deliveries in flight to one receiver are capped at the
        // link capacity (pre-settled ones are bounded by credit and the
        // connection's output).
        let cap = if presettle {
            0
        } else {
            self.shared.receiver_cap
        };
        let (st, ()) = self.shared.table.with(&p.space, &address, kind, |st| {
            st.add_consumer(core, link, counter, cap)
        });
        self.local_receivers_changed();
        debug!(conn.id = self.id.0, link.name = %attach.name, address = %address, "receiver attached");
        self.outgoing.insert(
            link,
            Outgoing {
                address: st,
                outstanding,
                presettle,
                dynamic,
            },
        );
    }

    fn handle_flow(&mut self, link: LinkId) {
        if let Some(i) = self.stat_links.iter().position(|l| *l == link) {
            if self.conn.link(link).is_some_and(|l| l.credit > 0) {
                self.stat_links.swap_remove(i);
                // A tenant sees its own space; a component (an operator's
                // tool with the mesh credential) every space.
                let space = self.principal().map(|p| p.space.clone());
                let body = crate::stat::snapshot(&self.shared, space.as_deref());
                let msg = message::encode_message(&message::MessageParts {
                    body: &body,
                    ..Default::default()
                });
                self.conn.send(link, &msg, true, 0);
            }
            return;
        }
        let drain = self.conn.link(link).is_some_and(|l| l.drain);
        let Some(address) = self.offer_link(link) else {
            return;
        };
        if drain {
            // Nothing more is waiting for this receiver: use up its credit.
            self.conn.drained(link);
            if let Some(l) = self.conn.link(link) {
                let limit = l.delivery_count.wrapping_add(l.credit);
                address.consumer_credit(self.id, link, limit);
            }
        }
    }

    /// Records a receiver's credit with its address and sends it what
    /// waited there. Returns the address.
    fn offer_link(&mut self, link: LinkId) -> Option<Arc<AddressState>> {
        let out = self.outgoing.get(&link)?;
        let l = self.conn.link(link)?;
        let limit = l.delivery_count.wrapping_add(l.credit);
        let address = out.address.clone();
        let outstanding = out.outstanding.clone();
        // Messages routed to this receiver before it ran out of credit may
        // still be in our channel: they go out before what waited in the
        // address's queue (which came after them).
        while let Ok(ev) = self.rx.try_recv() {
            self.handle_conn_event(ev);
        }
        let msgs = address.consumer_credit(self.id, link, limit).msgs;
        if !msgs.is_empty() {
            crate::core::return_credit(&msgs);
        }
        for m in msgs {
            self.deliver(link, m, &address, &outstanding);
        }
        Some(address)
    }

    fn handle_delivery(&mut self, link: LinkId, d: Delivery) {
        if self.is_controller(link) {
            return self.txn_control(link, d);
        }
        self.traffic.r#in.fetch_add(1, Ordering::Relaxed);
        if let Some(e) = self.over_message_quota(d.payload.len()) {
            self.dirty.insert(link);
            return self.reject(&d.id, d.settled, e);
        }
        let under = flotilla_amqp::txn::state_of(d.state.as_ref()).map(|(id, _)| id);
        let Some(inc) = self.incoming.get(&link) else {
            // A link whose route is gone: what came under a transaction
            // on it is lost to the transaction.
            if let Some(id) = under {
                self.txn_doom(&id, flotilla_amqp::txn::DISCARDED);
            }
            return;
        };
        if let Some(id) = under {
            // Only a broker's queues and topics (link-routed) take
            // messages under a transaction.
            self.dirty.insert(link);
            self.txn_doom(&id, crate::transactions::DIRECT);
            let e = amqp_error(AmqpError::NotImplemented, crate::transactions::DIRECT);
            return self.reject(&d.id, d.settled, e);
        }
        let link_principal = inc.principal.clone();
        let Some(p) = link_principal.as_deref().or(self.principal()) else {
            return;
        };
        let origin = (!d.settled).then(|| Origin {
            conn: self.handle.core.clone(),
            delivery: d.id,
        });
        let routed = Routed {
            payload: d.payload,
            settled: d.settled,
            origin,
            sender: Some((self.handle.core.clone(), link)),
            hops: None,
        };
        let state = match &inc.target {
            IncomingTarget::Address(a) => a.clone(),
            IncomingTarget::Relay => {
                let to = match message::to_address(&routed.payload) {
                    Ok(Some(to)) => to.to_string(),
                    Ok(None) => {
                        return self.reject(
                            &d.id,
                            d.settled,
                            amqp_error(
                                AmqpError::InvalidField,
                                "message has no `to` address (anonymous relay)",
                            ),
                        )
                    }
                    Err(e) => {
                        return self.reject(
                            &d.id,
                            d.settled,
                            amqp_error(AmqpError::DecodeError, e.to_string()),
                        )
                    }
                };
                match self.resolve_target(p, &to) {
                    Ok(_) => match self.shared.table.get(&p.space, &to) {
                        Some(s) => s,
                        // Nobody has ever attached: no receiver.
                        None => return self.no_receiver(&d.id, d.settled),
                    },
                    Err(e) => return self.reject(&d.id, d.settled, e),
                }
            }
        };
        self.route(&state, routed, d.id, link);
        self.dirty.insert(link);
    }

    /// Routes a message that came in on our link `link` (a client's, or a
    /// neighbour router's data link) and answers it where the router
    /// decides its outcome.
    pub(crate) fn route(
        &mut self,
        state: &Arc<AddressState>,
        routed: Routed,
        id: DeliveryRef,
        link: LinkId,
    ) {
        let settled = routed.settled;
        let forwarded = if state.kind == AddressType::Multicast {
            let remote = self.forward_multicast_mesh(state, &routed);
            match state.forward_multicast(routed) {
                Forwarded::NoReceiver if remote > 0 => Forwarded::Sent(remote),
                Forwarded::Sent(n) => Forwarded::Sent(n + remote),
                other => other,
            }
        } else {
            state.forward_anycast(routed)
        };
        match forwarded {
            Forwarded::Sent(_) if state.kind == AddressType::Multicast && !settled => {
                // Multicast is at-most-once: accepted once fanned out.
                self.conn.settle(id, DeliveryState::Accepted(Accepted {}));
            }
            Forwarded::Sent(_) => {}
            Forwarded::Queued => {
                debug!(conn.id = self.id.0, address = %state.address, "queued until a receiver has credit");
                if let Some(inc) = self.incoming.get_mut(&link) {
                    inc.held += 1;
                } else {
                    self.peer_held(link, 1, 0);
                }
            }
            Forwarded::NoReceiver => self.no_receiver(&id, settled),
        }
    }

    /// Multicast copies for other routers: to this router's children on the
    /// ingress router's shortest-path tree. Returns how many went.
    fn forward_multicast_mesh(&self, state: &Arc<AddressState>, msg: &Routed) -> usize {
        let Some(mesh) = &self.shared.mesh else {
            return 0;
        };
        let snap = mesh.snapshot();
        let ingress = msg
            .hops
            .as_ref()
            .map_or(mesh.id.as_str(), |h| h.ingress.as_str());
        let mut sent = 0;
        for (neighbor, conn, data) in snap.multicast_hops(&state.space, &state.address, ingress) {
            if msg.visited(&neighbor) {
                continue;
            }
            let copy = Routed {
                payload: msg.payload.clone(),
                settled: true,
                origin: None,
                sender: None,
                hops: msg.hops.clone(),
            };
            let ev = ConnEvent::Deliver {
                link: data,
                msg: copy,
                address: state.clone(),
                outstanding: Default::default(),
            };
            if conn.core.send(ev) {
                sent += 1;
            }
        }
        sent
    }

    pub(crate) fn reject(
        &mut self,
        id: &flotilla_amqp::connection::DeliveryRef,
        settled: bool,
        e: AmqpErrorBody,
    ) {
        debug!(
            conn.id = self.id.0,
            reason = e.description.as_deref().unwrap_or(""),
            "delivery rejected"
        );
        if !settled {
            self.conn
                .settle(*id, DeliveryState::Rejected(Rejected { error: Some(e) }));
        }
    }

    pub(crate) fn no_receiver(
        &mut self,
        id: &flotilla_amqp::connection::DeliveryRef,
        settled: bool,
    ) {
        if !settled {
            self.conn.settle(*id, crate::core::released());
        }
    }

    /// Sends a routed message on our outgoing link, or gives it back.
    /// Sends a message routed to our outgoing link `link` (a receiver's,
    /// or a neighbour router's data link), or gives it back.
    pub(crate) fn deliver(
        &mut self,
        link: LinkId,
        msg: Routed,
        address: &Arc<AddressState>,
        outstanding: &Arc<AtomicU32>,
    ) {
        if matches!(&self.role, ConnRole::Peer(p) if p.data_out == Some(link)) {
            return self.deliver_to_peer(msg, address, outstanding);
        }
        let Some(out) = self.outgoing.get(&link) else {
            address.unsend(self.id, link, msg);
            return;
        };
        let settle_here = msg.settled || out.presettle;
        let max = self.conn.link(link).map_or(0, |l| l.max_message_size);
        if max > 0 && msg.payload.len() as u64 > max {
            // The receiver cannot take it; another receiver might, but
            // bouncing between receivers is worse than telling the sender.
            out.address.unroute(self.id, link, msg.settled);
            if let Some(o) = msg.origin {
                let e = amqp_error(
                    LinkError::MessageSizeExceeded,
                    format!(
                        "message of {} bytes exceeds the receiver's max-message-size {max}",
                        msg.payload.len()
                    ),
                );
                o.conn.send(ConnEvent::Outcome {
                    delivery: o.delivery,
                    state: DeliveryState::Rejected(Rejected { error: Some(e) }),
                });
            }
            return;
        }
        let token = self.next_token;
        if self.conn.send(link, &msg.payload, settle_here, token) {
            self.next_token += 1;
            self.traffic.out.fetch_add(1, Ordering::Relaxed);
            if !settle_here {
                self.unsettled.insert(
                    token,
                    Unsettled {
                        origin: msg.origin,
                        outstanding: outstanding.clone(),
                        lost: Lost::Released,
                        receiver: Some((link, address.clone())),
                    },
                );
            } else if let Some(o) = msg.origin {
                // The receiver takes it pre-settled: accepted for the sender.
                outstanding.fetch_sub(1, Ordering::Relaxed);
                o.conn.send(ConnEvent::Outcome {
                    delivery: o.delivery,
                    state: DeliveryState::Accepted(Accepted {}),
                });
            }
        } else {
            debug!(
                conn.id = self.id.0,
                link = link.0,
                credit = self.conn.link(link).map(|l| l.credit),
                "could not send; re-routing"
            );
            let a = out.address.clone();
            a.unsend(self.id, link, msg);
        }
    }

    pub(crate) fn handle_outcome(
        &mut self,
        link: LinkId,
        token: u64,
        state: Option<DeliveryState>,
        settled: bool,
    ) {
        let state = match state {
            Some(s @ DeliveryState::TransactionalState(_)) => {
                match self.txn_disposition(link, token, s, settled) {
                    Some(s) => Some(s),
                    // It waits for its transaction's declare at the broker.
                    None => return,
                }
            }
            s => s,
        };
        // A coordinator's `declared` and an outcome under a transaction
        // travel back as they are (routed transaction links).
        let terminal = match &state {
            Some(
                DeliveryState::Accepted(_)
                | DeliveryState::Rejected(_)
                | DeliveryState::Released(_)
                | DeliveryState::Modified(_)
                | DeliveryState::Declared(_),
            ) => true,
            Some(DeliveryState::TransactionalState(t)) => t.outcome.is_some(),
            _ => false,
        };
        if !settled && !terminal {
            return;
        }
        let Some(Unsettled {
            origin,
            outstanding,
            receiver,
            ..
        }) = self.unsettled.remove(&token)
        else {
            return;
        };
        let before = outstanding.fetch_sub(1, Ordering::Relaxed);
        if let Some((link, address)) = receiver {
            if before >= self.shared.receiver_cap.min(self.shared.remote_window) {
                // The consumer was at its cap: hand it what waited.
                if self.outgoing.contains_key(&link) {
                    self.offer_link(link);
                } else {
                    // A neighbour's: what waited goes through our channel.
                    let _ = address.offer(self.id, link);
                }
            }
        }
        if let Some(o) = origin {
            let state = match state {
                Some(s) if terminal => s,
                // Settled with no outcome: the receiver consumed it.
                _ => DeliveryState::Accepted(Accepted {}),
            };
            o.conn.send(ConnEvent::Outcome {
                delivery: o.delivery,
                state,
            });
        }
    }

    fn link_gone(&mut self, link: LinkId, unsettled: Vec<u64>) {
        if self.is_controller(link) {
            return self.txn_controller_gone(link);
        }
        if let Some(out) = self.outgoing.remove(&link) {
            out.address.remove_consumer(self.id, link);
            for token in unsettled {
                if let Some(u) = self.unsettled.remove(&token) {
                    u.give_back();
                }
            }
            if out.dynamic {
                out.address.release_all();
            }
            self.shared.table.gc(&out.address);
            self.local_receivers_changed();
        } else if let Some(inc) = self.incoming.remove(&link) {
            if let IncomingTarget::Address(a) = inc.target {
                a.remove_sender(self.id, link);
                self.shared.table.gc(&a);
            }
            self.dirty.remove(&link);
        }
    }

    fn handle_conn_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Deliver {
                link,
                msg,
                address,
                outstanding,
            } => self.deliver(link, msg, &address, &outstanding),
            ConnEvent::Outcome { delivery, state } => {
                if delivery.channel == crate::transactions::OWN_CHANNEL {
                    return self.txn_outcome(delivery.delivery_id, state);
                }
                let state = self.txn_state_back(state);
                self.conn.settle(delivery, state)
            }
            ConnEvent::Credit { link, returned } => {
                if let Some(inc) = self.incoming.get_mut(&link) {
                    inc.held = inc.held.saturating_sub(returned);
                    self.dirty.insert(link);
                } else {
                    self.peer_held(link, 0, returned);
                }
            }
            ConnEvent::Held { link, n } => {
                if let Some(inc) = self.incoming.get_mut(&link) {
                    inc.held += n;
                } else {
                    self.peer_held(link, n, 0);
                }
            }
        }
    }

    fn handle_command(&mut self, c: Command) {
        match c {
            Command::Route(e) => self.route_event(e),
            Command::Close { reason } => {
                info!(conn.id = self.id.0, client.addr = %self.peer, reason = %reason, "closing connection");
                self.closing = Some(CloseReason::Shutdown);
                self.conn
                    .close(Some(amqp_error(ConnectionError::ConnectionForced, reason)));
            }
        }
    }

    /// The connection's output is no longer congested: what waited in
    /// addresses for its receivers (or for the neighbour behind it) goes
    /// now, as far as their credit allows.
    fn offer_waiting(&mut self) {
        let links: Vec<LinkId> = self.outgoing.keys().copied().collect();
        for link in links {
            self.offer_link(link);
        }
        if let ConnRole::Peer(p) = &self.role {
            if let Some(data) = p.data_out {
                for a in self.shared.table.all() {
                    a.offer(self.id, data);
                }
            }
        }
    }

    /// Grants or withdraws credit on incoming links whose situation changed:
    /// a window of `link_capacity` while a receiver exists (anonymous relay
    /// links always), none while no receiver does (anycast and multicast).
    fn top_up_credit(&mut self) {
        if self.closing.is_some() || self.draining {
            return;
        }
        self.peer_top_up();
        if self.dirty.is_empty() {
            return;
        }
        let window = self.shared.cfg.link_capacity;
        for link in std::mem::take(&mut self.dirty) {
            let Some(inc) = self.incoming.get(&link) else {
                continue;
            };
            let Some(l) = self.conn.link(link) else {
                continue;
            };
            let cur = l.credit;
            let reachable = match &inc.target {
                IncomingTarget::Relay => true,
                IncomingTarget::Address(a) => a.has_consumers(),
            };
            if !reachable {
                if cur > 0 {
                    self.conn.flow(link, 0, false);
                }
                continue;
            }
            let want = window.saturating_sub(inc.held);
            if cur + inc.held <= window / 2 && want > cur {
                self.conn.flow(link, want, false);
            }
        }
    }

    /// Tells the mesh that local receivers came or went.
    fn local_receivers_changed(&self) {
        if let Some(m) = &self.shared.mesh {
            m.send(crate::mesh::MeshEvent::LocalAddresses);
        }
    }

    fn cleanup(&mut self) {
        self.shared
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id.0);
        self.shared
            .gateways
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id.0);
        self.txn_cleanup();
        self.route_cleanup();
        for u in std::mem::take(&mut self.unsettled).into_values() {
            u.give_back();
        }
        let outs: Vec<LinkId> = self.outgoing.keys().copied().collect();
        for l in outs {
            self.link_gone(l, Vec::new());
        }
        let ins: Vec<LinkId> = self.incoming.keys().copied().collect();
        for l in ins {
            self.link_gone(l, Vec::new());
        }
        // Deliveries still on their way to us go back (routing to a closed
        // channel fails, so nothing more arrives after this).
        self.rx.close();
        while let Ok(ev) = self.rx.try_recv() {
            match ev {
                ConnEvent::Deliver {
                    link, msg, address, ..
                } => address.unsend(self.id, link, msg),
                ConnEvent::Outcome { .. } | ConnEvent::Credit { .. } | ConnEvent::Held { .. } => {}
            }
        }
        self.commands.close();
        while let Ok(c) = self.commands.try_recv() {
            match c {
                Command::Route(crate::linkroute::RouteEvent::Transfer { msg, .. }) => msg.release(),
                Command::Route(crate::linkroute::RouteEvent::Attach(req)) => {
                    req.from.route(crate::linkroute::RouteEvent::Refused {
                        link: req.from_link,
                        error: amqp_error(AmqpError::NotFound, "the route to the broker closed"),
                    });
                }
                _ => {}
            }
        }
        self.peer_cleanup();
        self.shared
            .in_flight
            .fetch_sub(self.counted_in_flight as i64, Ordering::Relaxed);
        self.counted_in_flight = 0;
        if self.closing == Some(CloseReason::Io) {
            warn!(conn.id = self.id.0, client.addr = %self.peer, "connection lost");
        }
    }
}

impl Handler for ConnectionTask {
    type Signal = Signal;

    fn connection(&mut self) -> &mut Connection {
        &mut self.conn
    }

    fn signal(&mut self) -> impl std::future::Future<Output = Option<Signal>> + Send {
        async move {
            let (draining, revoked, closing) =
                (self.draining, self.revoked, self.closing.is_some());
            tokio::select! {
                biased;
                _ = self.shared.shutdown.cancelled(), if !draining => Some(Signal::Shutdown),
                _ = self.shared.revoke.cancelled(), if !revoked => Some(Signal::Revoke),
                _ = self.shared.closing.cancelled(), if !closing => Some(Signal::Closing),
                n = self.rx.recv_many(&mut self.core_batch, 512) => (n > 0).then_some(Signal::Core),
                n = self.commands.recv_many(&mut self.command_batch, 64) => {
                    (n > 0).then_some(Signal::Commands)
                }
                Some(c) = recv_command(&mut self.peer_commands) => Some(Signal::Peer(c)),
                Ok(()) = self.tenancy.changed() => Some(Signal::Tenancy),
            }
        }
    }

    fn on_signal(&mut self, signal: Signal) {
        match signal {
            // Router shutdown, first step: senders get no more credit (and
            // use up what they have).
            Signal::Shutdown => self.draining = true,
            Signal::Revoke => self.revoke_credit(),
            Signal::Closing => self.shut_down(),
            Signal::Core => {
                let mut batch = std::mem::take(&mut self.core_batch);
                for ev in batch.drain(..) {
                    self.handle_conn_event(ev);
                }
                self.core_batch = batch;
            }
            Signal::Commands => {
                let mut batch = std::mem::take(&mut self.command_batch);
                for c in batch.drain(..) {
                    self.handle_command(c);
                }
                self.command_batch = batch;
            }
            Signal::Peer(cmd) => self.peer_command(cmd),
            Signal::Tenancy => self.recheck(),
        }
    }

    fn on_event(&mut self, event: Event) {
        self.handle_event(event);
    }

    fn on_protocol_error(&mut self, error: AmqpErrorBody) {
        self.protocol_error(error);
    }

    fn on_turn(&mut self) {
        self.top_up_credit();
        let n = self.unsettled.len();
        if n != self.counted_in_flight {
            self.shared
                .in_flight
                .fetch_add(n as i64 - self.counted_in_flight as i64, Ordering::Relaxed);
            self.counted_in_flight = n;
        }
        if let ConnRole::Client(c) = &self.role {
            c.link_count
                .store(self.conn.link_count(), Ordering::Relaxed);
        }
    }

    fn on_congestion(&mut self, congested: bool) {
        self.handle
            .core
            .congested
            .store(congested, Ordering::Relaxed);
        if !congested {
            self.offer_waiting();
        }
    }

    fn deadline(&self) -> Option<std::time::Instant> {
        if self.closing.is_some() {
            return None;
        }
        self.principal().and_then(|p| p.expires_at)
    }

    fn on_deadline(&mut self) {
        let Some(p) = self.principal().cloned() else {
            return;
        };
        if let Some(t) = &p.token {
            flotilla_core::oidc::audit_closed(
                &p.space,
                &t.subject,
                &flotilla_core::oidc::Refused::Expired,
            );
        }
        info!(conn.id = self.id.0, client.addr = %self.peer, "closing connection: its token expired");
        self.closing = Some(CloseReason::Unauthorized);
        self.conn.close(Some(amqp_error(
            AmqpError::UnauthorizedAccess,
            "token expired: authenticate again with a new token",
        )));
    }

    fn closing(&self) -> bool {
        self.closing.is_some()
    }
}

/// The capability a client desires in its Open to say it follows
/// `amqp:connection:redirect` to another router.
pub const REDIRECT_CAPABILITY: &str = "flotilla:redirect";

/// Whether the client of this Open follows a redirect: it desires
/// [`REDIRECT_CAPABILITY`], or it is Qpid JMS, whose failover does.
/// Python proton and others give up on a redirect (they reconnect after
/// `amqp:connection:forced`).
fn follows_redirect(open: &flotilla_amqp::types::performatives::Open) -> bool {
    use flotilla_amqp::types::primitives::{Symbol, Value};
    let desires = open
        .desired_capabilities
        .as_ref()
        .is_some_and(|c| c.0.iter().any(|s| s.as_str() == REDIRECT_CAPABILITY));
    let jms = open.properties.as_ref().is_some_and(
        |p| matches!(p.get(&Symbol::from("product")), Some(Value::String(s)) if s == "QpidJMS"),
    );
    desires || jms
}

/// `amqp:connection:redirect` to `to` (HOST:PORT), with the host and
/// port in the error's info as AMQP 1.0 §2.8.17 names them; `None` when
/// `to` is not HOST:PORT.
fn redirect_error(to: &str) -> Option<AmqpErrorBody> {
    use flotilla_amqp::types::primitives::{OrderedMap, Symbol, Value};
    let (host, port) = to.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut info = OrderedMap::new();
    info.insert(Symbol::from("hostname"), Value::String(host.to_string()));
    info.insert(
        Symbol::from("network-host"),
        Value::String(host.to_string()),
    );
    info.insert(Symbol::from("port"), Value::Uint(u32::from(port)));
    Some(AmqpErrorBody::new(
        flotilla_amqp::types::definitions::ErrorCondition::ConnectionError(
            ConnectionError::Redirect,
        ),
        Some(format!("router shutting down; reconnect to {to}")),
        Some(info),
    ))
}

/// The next command from the mesh, on peer connections; never on others.
async fn recv_command(
    rx: &mut Option<mpsc::UnboundedReceiver<crate::mesh::PeerCommand>>,
) -> Option<crate::mesh::PeerCommand> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
